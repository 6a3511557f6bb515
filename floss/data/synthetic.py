"""A synthetic data source written in the real feature-cache format, with a planted, known ground truth.

The demo profile runs the whole pipeline (ranking, evaluation, every table and figure) on these caches, on CPU
and offline. Nothing downstream knows the data are synthetic except the manifest's ``"source": "synthetic"``
(carried into captions). The generative model plants **class-expert templates**, so the FLOSS effect can be
checked against a known truth:

* **Classes.** Prototypes ``mu_k`` (unit vectors) live in a semantic subspace of the ``D``-dim feature space;
  close prototypes are naturally confusable. A "void" prototype stands for ignored pixels (255), which real
  rankings also see (protocol §3: ignore pixels are not masked when ranking).
* **Text.** Every embedding shares a common direction (real CLIP text embeddings are highly correlated) plus a
  semantic part. For class ``k``, its ``planted_per_class`` planted expert templates get
  ``normalize(mu_k + small noise)``; every other template drifts toward the class's nearest (confusable)
  prototype by a template-specific strength, plus noise. Hence single templates differ per class, the 80-average
  is decent (the random drifts cancel, the confusable pull does not), experts are better on their class, and
  their predictions are more confident (low entropy), though ranking on finite data is imperfect.
* **Images.** A label field of random smooth blobs (present classes chosen so that every class appears in the
  split when there are enough images) with void blobs (255), plus thin 255 boundaries on VOC. Per window
  (laid out by the model's ProtocolSettings, geometry scaled down by :data:`GEOMETRY_SCALE`), each patch gets
  ``normalize(common + eps * (mu_label + sigma * noise + shift_image) + nuisance)``; ``shift_image`` is a mild
  per-image domain shift, stronger on the driving transfer sets (night > snow > ...).

Label fields depend on (seed, dataset, split, image) only — every model sees the same "images", as with real
datasets — while text embeddings depend on the model's text encoder (MaskCLIP and CLIP-DINOiser share
open_clip's, so they share planted experts) and feature noise on the model (CLIP-DINOiser cleanest, MaskCLIP
noisiest, as in the paper's Table 1). Everything is a deterministic function of the seed: the same arguments give
byte-identical shards.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from floss.util.io import atomic_write_text
from floss.data.cache import FeatureCache
from floss.data.cache_manifest import MANIFEST, ImageRecord
from floss.data.cache_writer import CacheWriter
from floss.util.provenance import code_identity
from floss.core.classes import CLASS_NAMES, TRANSFER_DATASETS, query_names, rankings_dataset
from floss.models.base import KNOWN_DATASETS, ProtocolSettings, settings_for
from floss.models.preprocess import rescale_size, window_boxes

logger = logging.getLogger(__name__)

__all__ = ["write_synthetic_cache", "planted_experts", "synthetic_settings", "SYNTHETIC_MODELS",
           "default_num_images", "GENERATOR_VERSION"]

#: bump when the generative model changes (part of every synthetic cache's fingerprint)
GENERATOR_VERSION = 3
NUM_TEMPLATES = 80
#: real window/scale geometry is divided by this (448-px windows become 64 px = a 4×4 grid of 16-px patches);
#: ADE20K / COCO-Stuff use twice that (2×2 grids): FLOSS costs K² maps per window and K is 150 / 171 there
GEOMETRY_SCALE = 7
_GEOMETRY_SCALE = {"ade20k": 14, "cocostuff": 14}
PATCH = 16


@dataclass(frozen=True)
class _ModelKnobs:
    protocol_model: str     # whose ProtocolSettings / class-name conventions apply
    text_encoder: str       # models sharing a text encoder share text embeddings (and planted experts)
    signal: float           # eps: weight of the semantic part of a patch feature (sets the softmax sharpness)
    noise: float            # sigma: patch noise relative to the prototype


#: the model keys of the pipeline matrix and their synthetic knobs
SYNTHETIC_MODELS: dict[str, _ModelKnobs] = {
    "maskclip": _ModelKnobs("maskclip", "openclip-vitb16", 0.16, 1.15),
    "clipdinoiser": _ModelKnobs("clipdinoiser", "openclip-vitb16", 0.18, 0.75),
    "naclip": _ModelKnobs("naclip", "openai-vitb16", 0.17, 0.95),
    "naclip_vitl14": _ModelKnobs("naclip", "openai-vitl14", 0.18, 0.85),
    # beyond the paper: the OpenAI CLIP text tower of NACLIP (so the same planted experts), their own protocols
    "sclip": _ModelKnobs("sclip", "openai-vitb16", 0.17, 1.0),
    "sclip_vitl14": _ModelKnobs("sclip", "openai-vitl14", 0.16, 1.1),
    "clearclip": _ModelKnobs("clearclip", "openai-vitb16", 0.175, 0.9),
    "gem": _ModelKnobs("gem", "openai-vitb16", 0.17, 0.92),
    "gem_vitl14": _ModelKnobs("gem", "openai-vitl14", 0.17, 0.95),
    "gem_quoted": _ModelKnobs("gem_quoted", "openai-vitb16", 0.17, 0.9),
    # 2025 methods on OpenAI CLIP ViT-B/16 (the same text tower: the same planted experts)
    "resclip": _ModelKnobs("resclip", "openai-vitb16", 0.18, 0.85),
    "scclip": _ModelKnobs("scclip", "openai-vitb16", 0.18, 0.9),
}

# per dataset: classes drawn per image, void (255) weight, image sizes (H, W) at original resolution
_CLASSES_PER_IMAGE = {"cityscapes": 9, "pascalvoc20": 3, "pascalco59": 7, "ade20k": 10, "cocostuff": 10}
_VOID_WEIGHT = {"cityscapes": 0.8, "pascalvoc20": 0.6, "pascalco59": 0.25, "ade20k": 0.3, "cocostuff": 0.3}
_DRIVING_SIZES = {"cityscapes": [(48, 96)], "bdd": [(45, 80)], "mapillary": [(48, 64), (48, 72), (54, 96)],
                  **{f"acdc_{c}": [(48, 85)] for c in ("night", "fog", "rain", "snow")}}
_OTHER_SIZES = [(48, 64), (64, 48), (48, 72), (56, 64)]
_LARGE_K_SIZES = [(24, 32), (32, 24), (24, 36), (28, 32)]
#: per-image domain-shift strength (relative to a prototype); transfer sets are harder than Cityscapes
_SHIFT = {"acdc_night": 0.9, "acdc_snow": 0.7, "acdc_fog": 0.6, "acdc_rain": 0.6, "bdd": 0.45, "mapillary": 0.4}
_DEFAULT_SHIFT = 0.2
#: default image counts per split (chosen so the whole demo runs in minutes on 2 CPU cores)
_DEFAULT_COUNTS = {"cityscapes": (24, 12), "pascalvoc20": (24, 12), "pascalco59": (16, 8),
                   "ade20k": (12, 6), "cocostuff": (12, 6)}
_TRANSFER_COUNT = 12


def _seed(*parts) -> int:
    """A 63-bit seed from any parts (stable across processes, unlike ``hash``)."""
    digest = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(*parts))


def default_num_images(dataset: str, split: str) -> int:
    """The demo's image count for ``(dataset, split)``."""
    if dataset in TRANSFER_DATASETS:
        return _TRANSFER_COUNT
    train, val = _DEFAULT_COUNTS[dataset]
    return train if split == "train" else val


def synthetic_settings(model: str, dataset: str, protocol: str = "authors") -> ProtocolSettings:
    """The model's :class:`ProtocolSettings` with the geometry (scale, crop, stride) divided by 7 (14 on
    ADE20K / COCO-Stuff)."""
    knobs = _knobs(model)
    real = settings_for(knobs.protocol_model, dataset, protocol)
    factor = _GEOMETRY_SCALE.get(dataset, GEOMETRY_SCALE)
    div = lambda v: None if v is None else max(1, int(round(v / factor)))  # noqa: E731
    return dataclasses.replace(real, scale=(div(real.scale[0]), div(real.scale[1])), crop=div(real.crop),
                               stride=div(real.stride))


def _knobs(model: str) -> _ModelKnobs:
    if model not in SYNTHETIC_MODELS:
        raise ValueError(f"model: expected one of {sorted(SYNTHETIC_MODELS)}, received {model!r}")
    return SYNTHETIC_MODELS[model]


# ---------------------------------------------------------------------------------------------- the world
@dataclass
class _World:
    prototypes: torch.Tensor   # [K + 1, Ds] unit vectors (last row: void)
    common: torch.Tensor       # [D] unit vector shared by text and image features
    text: torch.Tensor         # [M, Q, D] unit vectors
    experts: list[list[int]]   # planted expert template ids per class (sorted)
    confusable: list[int]      # nearest other class per class


def _world(model: str, dataset: str, seed: int, feature_dim: int, planted_per_class: int,
           num_templates: int = NUM_TEMPLATES) -> _World:
    """Class prototypes and text embeddings; shared by every split and by the transfer sets of a class set."""
    knobs = _knobs(model)
    source = rankings_dataset(dataset)          # transfer sets live in the Cityscapes world
    num_classes = len(CLASS_NAMES[source])
    sem_dim = feature_dim - max(2, feature_dim // 4)   # the rest of the dimensions is image nuisance
    # prototypes and the common direction depend on the dataset only: the "visual world" is model independent
    g = _generator(seed, "prototypes", source, feature_dim)
    protos = F.normalize(torch.randn(num_classes + 1, sem_dim, generator=g, dtype=torch.float64), dim=1)
    common = torch.zeros(feature_dim, dtype=torch.float64)
    common[sem_dim] = 1.0                         # first nuisance axis: shared by text and features
    cos = protos[:num_classes] @ protos[:num_classes].T
    cos.fill_diagonal_(-2.0)
    confusable = cos.argmax(dim=1).tolist()
    # text embeddings: per text encoder (MaskCLIP and CLIP-DINOiser share open_clip's)
    g = _generator(seed, "text", knobs.text_encoder, source, feature_dim)
    experts = [sorted(torch.randperm(num_templates, generator=g)[:planted_per_class].tolist())
               for _ in range(num_classes)]
    strength = 0.3 + 0.5 * torch.rand(num_templates, generator=g, dtype=torch.float64)    # per template
    difficulty = 0.4 + 0.6 * torch.rand(num_classes, generator=g, dtype=torch.float64)    # per class
    queries, query_to_class = query_names(source, knobs.protocol_model)
    q_class = torch.tensor(query_to_class)
    mu = protos[q_class]                                            # [Q, Ds]
    toward = protos[torch.tensor(confusable)[q_class]] - mu          # [Q, Ds]
    pull = (strength[:, None] * difficulty[q_class][None] + 0.1 * torch.randn(
        num_templates, len(queries), generator=g, dtype=torch.float64)).clamp(0.0, 0.75)
    jitter = torch.randn(num_templates, len(queries), sem_dim, generator=g, dtype=torch.float64)
    is_expert = torch.zeros(num_templates, num_classes, dtype=torch.bool)
    for k, ids in enumerate(experts):
        is_expert[ids, k] = True
    expert_q = is_expert[:, q_class]                                 # [M, Q]
    pull = torch.where(expert_q, torch.zeros_like(pull), pull)
    jitter_scale = torch.where(expert_q, 0.08, 0.3).to(torch.float64)[..., None] / math.sqrt(sem_dim)
    semantic = F.normalize(mu + pull[..., None] * toward + jitter_scale * jitter, dim=-1)
    text = torch.zeros(num_templates, len(queries), feature_dim, dtype=torch.float64)
    text[..., :sem_dim] = semantic
    text = F.normalize(text + 1.6 * common, dim=-1)    # cos between class embeddings ~0.7, as CLIP's
    return _World(protos, common, text.float(), experts, confusable)


# ---------------------------------------------------------------------------------------------- the images
def _image_size(dataset: str, g: torch.Generator) -> tuple[int, int]:
    sizes = _DRIVING_SIZES.get(dataset, _LARGE_K_SIZES if dataset in _GEOMETRY_SCALE else _OTHER_SIZES)
    return sizes[int(torch.randint(len(sizes), (1,), generator=g))]


def _label_field(dataset: str, index: int, num_images: int, num_classes: int, size: tuple[int, int],
                 g: torch.Generator) -> torch.Tensor:
    """[H, W] int64 label map: class ids, or ``num_classes`` for void blobs (written as 255)."""
    source = rankings_dataset(dataset)
    per_image = min(_CLASSES_PER_IMAGE[source], num_classes)
    # round-robin over a fixed class permutation, so every class appears once the split has enough images
    order = torch.randperm(num_classes, generator=_generator("class-order", dataset))
    block = max(per_image, math.ceil(num_classes / max(num_images, 1)))
    present = order[torch.arange(index * block, index * block + block) % num_classes].unique()
    H, W = size
    h0, w0 = max(2, H // 12), max(2, W // 12)
    # class weights with a long tail (frequent "stuff" classes, rare objects)
    weight = 1.0 / (1.0 + order.argsort()[present].to(torch.float64)) ** 0.3
    logits = torch.randn(len(present) + 1, h0, w0, generator=g, dtype=torch.float64)
    logits[:-1] += 1.5 * weight.log()[:, None, None]
    logits[-1] += math.log(_VOID_WEIGHT[source])
    field = F.interpolate(logits[None], size=(H, W), mode="bilinear", align_corners=False)[0]
    top2 = field.topk(2, dim=0).values
    idx = field.argmax(dim=0)
    labels = torch.cat([present, torch.tensor([num_classes])])[idx]
    if source == "pascalvoc20":                      # VOC's 255 object boundaries
        labels[(top2[0] - top2[1]) < 0.08] = num_classes
    return labels


def _patch_centres(boxes: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Resized-image coordinates [Nw, gh, gw] of the patch centres of every window."""
    gh, gw = grid
    y1, y2, x1, x2 = (boxes[:, i, None].to(torch.float64) for i in range(4))
    ys = y1 + (torch.arange(gh, dtype=torch.float64) + 0.5) * (y2 - y1) / gh      # [Nw, gh]
    xs = x1 + (torch.arange(gw, dtype=torch.float64) + 0.5) * (x2 - x1) / gw      # [Nw, gw]
    return ys[:, :, None].expand(-1, gh, gw), xs[:, None, :].expand(-1, gh, gw)


def _image_record(model: str, dataset: str, split: str, index: int, num_images: int, seed: int,
                  world: _World, settings: ProtocolSettings) -> ImageRecord:
    knobs = _knobs(model)
    num_classes = world.prototypes.shape[0] - 1
    g_label = _generator(seed, "label", dataset, split, index)
    size = _image_size(dataset, g_label)
    field = _label_field(dataset, index, num_images, num_classes, size, g_label)
    H, W = size
    h, w = rescale_size(H, W, settings.scale)
    boxes = torch.from_numpy(window_boxes(h, w, settings.crop, settings.stride))
    bh, bw = int(boxes[0, 1] - boxes[0, 0]), int(boxes[0, 3] - boxes[0, 2])
    grid = (max(1, bh // PATCH), max(1, bw // PATCH))
    ys, xs = _patch_centres(boxes, grid)
    # nearest original pixel of each patch centre (the label field is the "image content")
    oy = ((ys + 0.5) * H / h - 0.5).round().clamp(0, H - 1).long()
    ox = ((xs + 0.5) * W / w - 0.5).round().clamp(0, W - 1).long()
    proto_idx = field[oy, ox]                                           # [Nw, gh, gw]
    g = _generator(seed, "features", model, dataset, split, index)
    sem_dim = world.prototypes.shape[1]
    D = world.text.shape[2]
    shift = _SHIFT.get(dataset, _DEFAULT_SHIFT) * torch.randn(sem_dim, generator=g, dtype=torch.float64) \
        / math.sqrt(sem_dim)
    noise = torch.randn(*proto_idx.shape, sem_dim, generator=g, dtype=torch.float64) / math.sqrt(sem_dim)
    semantic = world.prototypes[proto_idx] + knobs.noise * noise + shift
    nuisance = torch.randn(*proto_idx.shape, D - sem_dim - 1, generator=g, dtype=torch.float64) \
        / math.sqrt(D - sem_dim - 1)
    feats = torch.cat([knobs.signal * semantic, torch.full((*proto_idx.shape, 1), 0.25, dtype=torch.float64),
                       nuisance], dim=-1)
    feats = F.normalize(feats, dim=-1).permute(0, 3, 1, 2).float().contiguous()   # [Nw, D, gh, gw]
    label = torch.where(field == num_classes, 255, field).to(torch.uint8)
    return ImageRecord(f"{dataset}_{split}_{index:05d}", feats, boxes.to(torch.int32), (h, w), (H, W), label)


# ---------------------------------------------------------------------------------------------- public API
def write_synthetic_cache(out_dir: str | os.PathLike, model: str, dataset: str, split: str, *,
                          num_images: int | None = None, seed: int = 0, feature_dim: int = 32,
                          protocol: str = "authors", planted_per_class: int = 4,
                          images_per_shard: int = 256, templates=None) -> Path:
    """Write a complete synthetic feature cache for ``(model, dataset, split)`` into ``out_dir``.

    ``num_images`` defaults to :func:`default_num_images`. The manifest carries ``"source": "synthetic"`` and
    ``"synthetic": {"seed", "planted_experts", "confusable", "generator_version", ...}``. An existing complete
    cache written with the same arguments and code is left as is (the fingerprint covers every argument and the
    code identity); one written otherwise is replaced (a line in the log names the differing keys).
    Returns ``Path(out_dir)``.
    """
    knobs = _knobs(model)
    if dataset not in KNOWN_DATASETS:
        raise ValueError(f"dataset: expected one of {KNOWN_DATASETS}, received {dataset!r}")
    if split not in ("train", "val"):
        raise ValueError(f"split: expected 'train' or 'val', received {split!r}")
    if dataset in TRANSFER_DATASETS and split != "val":
        raise ValueError(f"split: the transfer set {dataset!r} is evaluation-only (split 'val'), received {split!r}")
    if num_images is None:
        num_images = default_num_images(dataset, split)
    for name, value, low in (("num_images", num_images, 1), ("feature_dim", feature_dim, 8),
                             ("planted_per_class", planted_per_class, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an integer >= {low}, received {value!r}")
    from floss.core.templates import as_template_set
    ts = as_template_set(templates)       # only M matters to the generator; the texts are recorded and keyed
    if planted_per_class > len(ts):
        raise ValueError(f"planted_per_class: expected at most {len(ts)} (templates), received {planted_per_class}")
    settings = synthetic_settings(model, dataset, protocol)
    world = _world(model, dataset, seed, feature_dim, planted_per_class, len(ts))
    queries, query_to_class = query_names(rankings_dataset(dataset), knobs.protocol_model)
    meta = {"model": model, "dataset": dataset, "split": split, "class_names": list(CLASS_NAMES[dataset]),
            "query_names": queries, "query_to_class": query_to_class, "settings": settings.to_dict()}
    synthetic = {"seed": seed, "generator_version": GENERATOR_VERSION, "num_images": num_images,
                 "feature_dim": feature_dim, "planted_per_class": planted_per_class,
                 "planted_experts": world.experts, "confusable": world.confusable,
                 "signal": knobs.signal, "noise": knobs.noise, "text_encoder": knobs.text_encoder,
                 "domain_shift": _SHIFT.get(dataset, _DEFAULT_SHIFT)}
    fingerprint = {"source": "synthetic", "code": code_identity(), "model": model, "dataset": dataset, "split": split, "seed": seed,
                   "num_images": num_images, "feature_dim": feature_dim, "protocol": protocol,
                   "planted_per_class": planted_per_class, "generator_version": GENERATOR_VERSION}
    if not ts.is_default:      # CLIP's 80 keep the fingerprint and manifest they always had
        fingerprint["templates"], meta["templates"] = ts.digest, list(ts)
    out = Path(out_dir)
    # fp16 on disk: the generator works in float64, and rounding to fp16 makes the stored bytes the same on every
    # CPU (a last-bit difference of a float64 operation cannot survive it)
    with CacheWriter(out, meta, fingerprint, world.text, images_per_shard=images_per_shard,
                     dtype=torch.float16) as writer:
        for i in range(num_images):
            record_id = f"{dataset}_{split}_{i:05d}"
            if writer.complete or record_id in writer.done_ids:
                continue
            writer.add(_image_record(model, dataset, split, i, num_images, seed, world, settings))
    _annotate_manifest(out, synthetic)
    logger.info("synthetic cache %s: %s/%s/%s, %d images", out, model, dataset, split, num_images)
    return out


def _annotate_manifest(root: Path, synthetic: dict) -> None:
    """Add ``source``/``synthetic`` to the merged manifest (the writer keeps only the core meta keys)."""
    path = root / MANIFEST
    manifest = json.loads(path.read_text())
    if manifest.get("source") == "synthetic" and manifest.get("synthetic") == synthetic:
        return
    manifest["source"], manifest["synthetic"] = "synthetic", synthetic
    atomic_write_text(path, json.dumps(manifest, indent=1))


def planted_experts(cache: FeatureCache | str | os.PathLike) -> list[list[int]]:
    """The planted expert template ids per class (class order) of a synthetic cache."""
    if not isinstance(cache, FeatureCache):
        cache = FeatureCache(cache)
    info = cache.manifest.get("synthetic")
    if cache.manifest.get("source") != "synthetic" or not isinstance(info, dict):
        raise ValueError(f"cache: {cache.root} is not a synthetic cache (its manifest has no 'synthetic' record)")
    return [list(ids) for ids in info["planted_experts"]]
