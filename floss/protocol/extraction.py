"""Images -> window features, in one place: the model at the authors' precision, the text embeddings (computed
once per text tower and query set, cached on disk), image decoding in DataLoader workers, and the extraction loop
that ``floss extract``, the pipeline's extract stage and the cache-free ranking share.

Text embeddings are the expensive part on a CPU (ADE20K: 80 × 150 prompts through the text tower) and identical for
every split of a dataset, for the driving sets that reuse the Cityscapes names, and for MaskCLIP and CLIP-DINOiser
(the same open_clip text tower and weights): they are keyed by what determines them (backbone, weights, precision,
device type, templates, query words) and stored under ``$FLOSS_CACHE/text`` (default ``~/.cache/floss/text``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from floss.util.io import atomic_write, atomic_write_json
from floss.util.provenance import code_identity, file_sha256, input_identities, inputs_digest, weights_id

#: what ``on_bad_image`` accepts: stop at the first unreadable or unusable image (naming it), or skip and list it
ON_BAD_IMAGE = ("stop", "skip")

logger = logging.getLogger(__name__)

__all__ = ["resolve_precision", "weights_id", "text_embeddings", "default_text_cache", "prepared_images",
           "extract_split", "cache_fingerprint", "rank_images", "BadImageError", "ON_BAD_IMAGE"]

#: the layout of the text-cache key (the computation itself is keyed by :func:`floss.util.provenance.code_identity`)
TEXT_CACHE_VERSION = 2


class BadImageError(ValueError):
    """An input image that cannot be used (unreadable, empty, too small for the model's windows)."""

    def __init__(self, image_id: str, path, reason: str):
        self.image_id, self.path, self.reason = image_id, path, reason
        super().__init__(f"image {image_id!r} ({path}): {reason} (--on-bad-image skip: skip such images and "
                         "list them in a report beside the output)")

    def __reduce__(self):          # crosses from DataLoader workers: rebuilt from its fields, not its message
        return type(self), (self.image_id, self.path, self.reason)


def resolve_precision(model: str, precision: str, device) -> str:
    """``"auto"`` -> the precision the model's original runs in on ``device`` (fp16 models run fp32 on CPU, with a
    logged note); ``"fp32"``/``"fp16"`` are returned as given (fp16 needs CUDA: the model refuses it on CPU)."""
    from floss.models import authors_precision

    if precision in ("fp32", "fp16"):
        return precision
    if precision != "auto":
        raise ValueError(f"precision: expected auto, fp32 or fp16, received {precision!r}")
    wanted = authors_precision(model)
    if wanted == "fp16" and torch.device(device).type != "cuda":
        logger.info("%s: the authors run it in fp16 on CUDA; on %s it runs in fp32 (rounding-level differences, "
                    "which can flip near-tied argmaxes)", model, device)
        return "fp32"
    return wanted


def default_text_cache() -> Path:
    return Path(os.environ.get("FLOSS_CACHE") or Path.home() / ".cache" / "floss") / "text"


def _text_identity(model) -> dict | None:
    """What determines a model's text embeddings, or None when the model cannot say (plug-in models)."""
    backbone = getattr(model, "backbone", None)
    if backbone is None or not hasattr(model, "pretrained"):
        return None
    ident = {"backbone": backbone, "weights": weights_id(model.pretrained, None),
             "precision": getattr(model, "precision", "fp32"), "device": torch.device(model.device).type}
    if ident["weights"].startswith("none"):
        # random weights depend on the seed state when the model was built: never shared through a cache
        return None
    return ident


@torch.no_grad()
def text_embeddings(model, queries: Sequence[str], *, cache_dir: str | os.PathLike | None = None,
                    use_cache: bool = True, progress: bool = True, templates=None) -> torch.Tensor:
    """The ``[M, Q, D]`` per-template embeddings of ``queries`` (float32, CPU), batched on the model's device.

    ``templates``: the template set (:func:`floss.core.templates.as_template_set`: None = CLIP's 80, a file path,
    a list of texts). With ``use_cache`` they are read from / written to ``cache_dir`` (default
    :func:`default_text_cache`) under a key of everything that determines them (the template texts included), so
    each (text tower, template set, query set) is encoded once.
    """
    from floss.core.templates import as_template_set
    from floss.core.text import template_embeddings

    ts = as_template_set(templates)
    ident = _text_identity(model) if use_cache else None
    path = None
    if ident is not None:
        key = {"version": TEXT_CACHE_VERSION, "code": code_identity(), **ident, "templates": list(ts),
               "queries": list(queries)}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        path = Path(cache_dir or default_text_cache()) / f"{digest}.safetensors"
        if path.is_file():
            from safetensors.torch import load_file
            logger.info("text embeddings of %d queries from %s", len(queries), path)
            return load_file(path)["templates"]
    emb = template_embeddings(model.encode_text, list(queries), templates=ts, device="cpu", progress=progress,
                              batch_size=getattr(model, "text_batch_size", 256))
    if path is not None:
        from safetensors.torch import save_file
        try:
            atomic_write(path, lambda tmp: save_file({"templates": emb.contiguous()}, tmp,
                                                     metadata={"key": json.dumps(key)}))
        except OSError as err:      # a read-only home is no reason to fail the extraction
            logger.warning("could not cache text embeddings in %s (%s)", path, err)
    return emb


class _PreparedDataset(torch.utils.data.Dataset):
    """``(id, label or None, PreparedImage)`` per id: decoding and resizing, done in DataLoader workers."""

    def __init__(self, ds, ids: Sequence[str], settings, pad_multiple: int | None):
        self.ds, self.ids, self.settings, self.pad = ds.subset(list(ids)), list(ids), settings, pad_multiple

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        from floss.models.preprocess import prepare_image
        try:
            sample = self.ds[i]
            return sample.id, sample.label, prepare_image(sample.image, self.settings, self.pad)
        except Exception as err:      # handed to the main process (a worker would wrap it in a traceback)
            path = self.ds.image_path(i) if hasattr(self.ds, "image_path") else "?"
            return BadImageError(self.ids[i], path, f"{type(err).__name__}: {err}")


def _identity(item):
    return item


def prepared_images(model, ds, ids: Sequence[str], settings, *, workers: int = 0,
                    progress: bool = True, desc: str = "images", on_bad_image: str = "stop") -> Iterator:
    """Yield ``(id, label, PreparedImage)`` for ``ids`` of dataset ``ds`` in order; ``workers`` processes decode
    and resize ahead of the consumer (pinned memory on CUDA). An image that cannot be read or prepared raises
    :class:`BadImageError` naming it (``on_bad_image="stop"``) or is yielded as ``(id, None, BadImageError)``
    (``"skip"``)."""
    if on_bad_image not in ON_BAD_IMAGE:
        raise ValueError(f"on_bad_image: expected one of {ON_BAD_IMAGE}, received {on_bad_image!r}")
    data = _PreparedDataset(ds, ids, settings, model.patch_size if model.pad_to_patch else None)
    loader = torch.utils.data.DataLoader(
        data, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_identity,
        pin_memory=torch.device(model.device).type == "cuda", prefetch_factor=4 if workers else None)
    for item in tqdm(loader, total=len(data), desc=desc, disable=None if progress else True):
        if isinstance(item, BadImageError):
            if on_bad_image == "stop":
                raise item
            logger.warning("skipping %s", item.args[0].split(" (--on-bad-image")[0])
            item = (item.image_id, None, item)
        yield item


def encode_or_skip(model, image_id: str, prepared, path) -> tuple:
    """``model.encode(prepared)``, or ``(None, BadImageError)`` for an image the model cannot take (too small
    for its windows, ...): errors of one image are the image's, named as such."""
    try:
        return model.encode(prepared), None
    except (ValueError, RuntimeError) as err:
        return None, BadImageError(image_id, path, f"{type(err).__name__}: {err}")


def cache_fingerprint(model, model_name: str, dataset: str, split: str, settings, *, dtype: str,
                      limit: int | None = None, pretrained: str | None = None,
                      checkpoint: str | None = None, inputs: Sequence[Sequence[str]] | None = None,
                      templates=None) -> dict:
    """The fingerprint of a feature cache or ranking checkpoint: everything that determines its bytes (code,
    weights, settings, the input list ``inputs`` of :func:`floss.util.provenance.input_identities`, and the
    template set: a ``"templates"`` digest for any set but CLIP's 80, whose fingerprints stay as they were)."""
    from floss.core.templates import templates_key

    key = templates_key(templates)
    return ({"templates": key} if key is not None else {}) | {"code": code_identity(), "inputs": None if inputs is None else inputs_digest(inputs),
            "model": model_name, "backbone": getattr(model, "backbone", None),
            "weights": weights_id(pretrained, getattr(model, "pretrained", None)),
            "checkpoint": f"sha256:{file_sha256(checkpoint)}" if checkpoint else None,
            "precision": getattr(model, "precision", "fp32"), "settings": settings.to_dict(), "dataset": dataset,
            "split": split, "limit": limit, "dtype": dtype}


def _image_path(ds, image_id: str):
    if not hasattr(ds, "image_path"):
        return "?"
    return ds.image_path(list(ds.ids).index(image_id))


def extract_split(model, ds, out: str | os.PathLike, *, ids: Sequence[str], settings, text: torch.Tensor,
                  meta: Mapping, fingerprint: Mapping, dtype: torch.dtype = torch.float32, rank: int = 0,
                  world_size: int = 1, images_per_shard: int = 256, workers: int = 0, progress: bool = True,
                  inputs: Sequence[Sequence[str]] | None = None, on_bad_image: str = "stop") -> int:
    """Encode ``ids`` of ``ds`` into the feature cache ``out`` (resuming what is there and still current); returns
    how many images were encoded now. ``inputs``: the ``[id, identity]`` pairs of ``ids`` (computed when None)."""
    from floss.data.cache_manifest import ImageRecord
    from floss.data.cache_writer import CacheWriter

    inputs = input_identities(ds, ids) if inputs is None else inputs
    done = 0
    with CacheWriter(out, meta, fingerprint, text, rank=rank, world_size=world_size,
                     images_per_shard=images_per_shard, dtype=dtype, inputs=inputs) as writer:
        todo = [i for i in ids if i not in writer.done_ids]
        logger.info("rank %d/%d: %d of %d images to extract into %s", rank, world_size, len(todo), len(ids), out)
        for image_id, label, prepared in prepared_images(model, ds, todo, settings, workers=workers,
                                                         progress=progress, desc=f"extract[{rank}]",
                                                         on_bad_image=on_bad_image):
            f, bad = (None, prepared) if isinstance(prepared, BadImageError) else \
                encode_or_skip(model, image_id, prepared, _image_path(ds, image_id))
            if bad is not None:
                if on_bad_image == "stop":
                    raise bad
                writer.skip(image_id, bad.reason)
                continue
            writer.add(ImageRecord(image_id, f.feats, torch.as_tensor(f.boxes), f.resized_size, f.orig_size,
                                   None if label is None else torch.from_numpy(label)))
            done += 1
    return done


class RankCheckpoint:
    """A cache-free ranking's checkpoint: the statistics so far, the ``[id, identity]`` pairs processed (in order,
    skipped images included), the skipped images with their reasons, and the fingerprint. Reused only for the
    same code, weights and settings, and only while the images processed are, in order, the leading current
    inputs with the same files (so the statistics equal a fresh run's bit for bit); otherwise the ranking starts
    over, with a line in the log saying why."""

    def __init__(self, path, fingerprint: Mapping, inputs: Sequence[Sequence[str]]):
        self.path = Path(path) if path is not None else None
        self.fingerprint = dict(fingerprint)
        self.inputs = [list(x) for x in inputs]
        self.stats, self.processed, self.skipped = None, [], []

    def load(self, device):
        """The saved statistics if still reusable (else None); sets :attr:`processed` and :attr:`skipped`."""
        from floss.data.cache_manifest import fingerprint_differences
        from floss.util.provenance import describe_input_change, reusable_prefix
        from floss.core.stats import TemplateStats

        if self.path is None or not self.path.is_file():
            return None
        try:
            st = TemplateStats.load(self.path, device=device)
        except Exception as err:          # a checkpoint cut short by a crash: recomputed, never trusted
            logger.info("%s: unreadable checkpoint (%s); ranking from the start", self.path, err)
            return None
        extra = st.extra or {}
        diff = [d for d in fingerprint_differences(extra.get("fingerprint", {}), self.fingerprint)
                if not d.startswith("inputs:")]
        processed = [list(x) for x in extra.get("processed", [])]
        if diff:
            logger.info("%s: checkpoint of other code, weights or settings (%s); ranking from the start", self.path,
                        "; ".join(diff))
            return None
        if reusable_prefix(processed, self.inputs) < len(processed):
            logger.info("%s: inputs changed since the checkpoint (%s); ranking from the start", self.path,
                        describe_input_change(processed, self.inputs))
            return None
        self.stats, self.processed, self.skipped = st, processed, list(extra.get("skipped", []))
        logger.info("resuming the ranking in %s: %d of %d images done", self.path, len(processed), len(self.inputs))
        return st

    def save(self, st) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            st.save(self.path, extra={"fingerprint": self.fingerprint, "processed": self.processed,
                                      "skipped": self.skipped})


def rank_images(model, ds, ids: Sequence[str], settings, text: torch.Tensor, query_to_class: Sequence[int], *,
                metrics: Sequence[str] = ("entropy",), track_images: bool = False, state: str | os.PathLike | None = None,
                fingerprint: Mapping | None = None, save_every: int = 64, workers: int = 0, template_chunk: int = 8,
                progress: bool = True, on_bad_image: str = "stop",
                inputs: Sequence[Sequence[str]] | None = None):
    """Cache-free ranking: images -> windows -> probabilities -> :class:`floss.core.stats.TemplateStats` on the model's
    device, the same per-image computation as :func:`floss.protocol.rank_cache` (only statistics are kept).

    ``state``: a checkpoint file (:class:`RankCheckpoint`), rewritten atomically every ``save_every`` images and on
    any error, so an interrupted job resumes where it stopped. Skipped images (``on_bad_image="skip"``) are in
    ``st.extra["skipped"]``. Under torchrun each rank passes its own ``ids`` share and ``state`` file; merge the
    returned statistics with :meth:`TemplateStats.merge`.
    """
    from floss.data.cache_manifest import ImageRecord
    from floss.protocol import new_template_stats, rank_record

    device = torch.device(model.device)
    text = text.to(device)
    inputs = input_identities(ds, ids) if inputs is None else inputs
    ckpt = RankCheckpoint(state, {**(fingerprint or {}), "inputs": inputs_digest(inputs)}, inputs)
    st = ckpt.load(device)
    if st is None:
        st = new_template_stats(metrics, text.shape[0], len(set(query_to_class)), text.shape[2], track_images,
                                device)
    identity = dict(map(tuple, inputs))
    todo = [i for i in ids if i not in {p for p, _ in ckpt.processed}]
    consistent = True       # False while an image is half added to the statistics: such a state is never saved
    try:
        n = 0
        for image_id, _, prepared in prepared_images(model, ds, todo, settings, workers=workers, progress=progress,
                                                     desc="rank", on_bad_image=on_bad_image):
            f, bad = (None, prepared) if isinstance(prepared, BadImageError) else \
                encode_or_skip(model, image_id, prepared, _image_path(ds, image_id))
            if bad is not None:
                if on_bad_image == "stop":
                    raise bad
                ckpt.skipped.append({"id": image_id, "reason": bad.reason})
            else:
                record = ImageRecord(image_id, f.feats, torch.as_tensor(f.boxes), f.resized_size, f.orig_size)
                consistent = False
                rank_record(st, record, text, settings, query_to_class, template_chunk)
                consistent = True
            ckpt.processed.append([image_id, identity[image_id]])
            n += 1
            if n % save_every == 0:
                ckpt.save(st)
    finally:                 # also on an error or an interrupt: no finished image is lost
        if consistent:
            ckpt.save(st)
    st.extra = {**(st.extra or {}), "skipped": list(ckpt.skipped)}
    return st


def rank_dataset(model, ds, settings, text: torch.Tensor, query_to_class: Sequence[int], *, ctx, state_of,
                 fingerprint: Mapping, **kwargs):
    """:func:`rank_images` of every image of ``ds`` (sorted ids), sharded over the torchrun ranks of ``ctx``
    (``floss.util.distributed``), each with its checkpoint ``state_of(rank)``; ``fingerprint``: the keys of
    :func:`cache_fingerprint` but ``inputs``, which is added here. Returns the merged statistics on the main rank
    (skipped images of all ranks in ``.extra["skipped"]``), None on the others. The CLI and the pipeline share it."""
    from floss.util import distributed
    from floss.core.stats import TemplateStats

    ids = sorted(ds.ids)
    inputs = input_identities(ds, ids)
    mine = set(distributed.shard(ids, ctx))
    st = rank_images(model, ds, [i for i in ids if i in mine], settings, text, query_to_class,
                     state=state_of(ctx.rank), fingerprint={**fingerprint, "world_size": ctx.world_size},
                     inputs=[x for x in inputs if x[0] in mine], **kwargs)
    distributed.barrier()
    if not ctx.is_main:
        return None
    skipped = list(st.extra["skipped"])
    for r in range(1, ctx.world_size):
        other = TemplateStats.load(state_of(r), device=st.device)
        skipped += (other.extra or {}).get("skipped", [])
        st = st.merge(other)
    st.extra = {"skipped": sorted(skipped, key=lambda s: s["id"])}
    return st


def write_skipped_report(skipped: list, path: Path) -> None:
    """``<out>.skipped.json``: every image left out (``--on-bad-image skip``) with its reason; removed when none
    was, so an old report never outlives its cause."""
    if not skipped:
        path.unlink(missing_ok=True)
        return
    atomic_write_json(path, {"skipped_images": len(skipped),
                             "images": [{"id": s["id"], "reason": s["reason"]} for s in skipped]})
    logger.warning("%d images skipped (unreadable or unusable); listed with their reasons in %s", len(skipped), path)
