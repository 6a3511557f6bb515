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

from floss._io import atomic_write

logger = logging.getLogger(__name__)

__all__ = ["resolve_precision", "weights_id", "text_embeddings", "default_text_cache", "prepared_images",
           "extract_split", "cache_fingerprint", "rank_images"]

#: bump when the text-embedding computation changes (part of every text-cache key)
TEXT_CACHE_VERSION = 1


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


def weights_id(pretrained: str | None, default: str | None) -> str:
    """What identifies the weights in a fingerprint: the tag, or a weight file's sha256."""
    from floss.cache import file_sha256

    tag = pretrained or default or "default"
    if tag == "none":
        return "none (random, seed 0)"
    if os.path.isfile(tag):
        return f"sha256:{file_sha256(tag)}"
    return f"tag:{tag}"


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
                    use_cache: bool = True, progress: bool = True) -> torch.Tensor:
    """The ``[80, Q, D]`` per-template embeddings of ``queries`` (float32, CPU), batched on the model's device.

    With ``use_cache`` they are read from / written to ``cache_dir`` (default :func:`default_text_cache`) under a
    key of everything that determines them, so each (text tower, query set) is encoded once.
    """
    from floss.templates import IMAGENET_TEMPLATES
    from floss.text import template_embeddings

    ident = _text_identity(model) if use_cache else None
    path = None
    if ident is not None:
        key = {"version": TEXT_CACHE_VERSION, **ident, "templates": list(IMAGENET_TEMPLATES),
               "queries": list(queries)}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        path = Path(cache_dir or default_text_cache()) / f"{digest}.safetensors"
        if path.is_file():
            from safetensors.torch import load_file
            logger.info("text embeddings of %d queries from %s", len(queries), path)
            return load_file(path)["templates"]
    emb = template_embeddings(model.encode_text, list(queries), device="cpu", progress=progress,
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
        except Exception as err:      # handed to the main process as is (a worker would wrap it in a traceback)
            return err


def _identity(item):
    return item


def prepared_images(model, ds, ids: Sequence[str], settings, *, workers: int = 0,
                    progress: bool = True, desc: str = "images") -> Iterator:
    """Yield ``(id, label, PreparedImage)`` for ``ids`` of dataset ``ds`` in order; ``workers`` processes decode
    and resize ahead of the consumer (pinned memory on CUDA)."""
    data = _PreparedDataset(ds, ids, settings, model.patch_size if model.pad_to_patch else None)
    loader = torch.utils.data.DataLoader(
        data, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_identity,
        pin_memory=torch.device(model.device).type == "cuda", prefetch_factor=4 if workers else None)
    for item in tqdm(loader, total=len(data), desc=desc, disable=None if progress else True):
        if isinstance(item, Exception):
            raise item
        yield item


def cache_fingerprint(model, model_name: str, dataset: str, split: str, settings, *, dtype: str,
                      limit: int | None = None, pretrained: str | None = None,
                      checkpoint: str | None = None) -> dict:
    """The fingerprint of a feature cache: a cache is reused only when every value is equal."""
    from floss.cache import file_sha256
    from floss.cli import floss_version

    return {"model": model_name, "backbone": getattr(model, "backbone", None),
            "weights": weights_id(pretrained, getattr(model, "pretrained", None)),
            "checkpoint": f"sha256:{file_sha256(checkpoint)}" if checkpoint else None,
            "precision": getattr(model, "precision", "fp32"), "settings": settings.to_dict(), "dataset": dataset,
            "split": split, "limit": limit, "floss_version": floss_version(), "dtype": dtype}


def extract_split(model, ds, out: str | os.PathLike, *, ids: Sequence[str], settings, text: torch.Tensor,
                  meta: Mapping, fingerprint: Mapping, dtype: torch.dtype = torch.float32, rank: int = 0,
                  world_size: int = 1, images_per_shard: int = 256, workers: int = 0, progress: bool = True) -> int:
    """Encode ``ids`` of ``ds`` into the feature cache ``out`` (resuming what is there); returns how many images
    were encoded now."""
    from floss.cache import CacheWriter, ImageRecord

    done = 0
    with CacheWriter(out, meta, fingerprint, text, rank=rank, world_size=world_size,
                     images_per_shard=images_per_shard, dtype=dtype) as writer:
        todo = [i for i in ids if i not in writer.done_ids]
        logger.info("rank %d/%d: %d of %d images to extract into %s", rank, world_size, len(todo), len(ids), out)
        for image_id, label, prepared in prepared_images(model, ds, todo, settings, workers=workers,
                                                         progress=progress, desc=f"extract[{rank}]"):
            f = model.encode(prepared)
            writer.add(ImageRecord(image_id, f.feats, torch.as_tensor(f.boxes), f.resized_size, f.orig_size,
                                   None if label is None else torch.from_numpy(label)))
            done += 1
    return done


def rank_images(model, ds, ids: Sequence[str], settings, text: torch.Tensor, query_to_class: Sequence[int], *,
                metrics: Sequence[str] = ("entropy",), track_images: bool = False, state: str | os.PathLike | None = None,
                fingerprint: Mapping | None = None, save_every: int = 64, workers: int = 0, template_chunk: int = 8,
                restart_stale: bool = False, progress: bool = True):
    """Cache-free ranking: images -> windows -> probabilities -> :class:`floss.stats.TemplateStats` on the model's
    device, the same per-image computation as :func:`floss.protocol.rank_cache` (only statistics are kept).

    ``state``: a checkpoint file (statistics + the ids done + ``fingerprint``), rewritten atomically every
    ``save_every`` images, so an interrupted job resumes where it stopped; a checkpoint of another fingerprint is
    refused (``restart_stale=True``: discarded, the ranking starts over). Under torchrun each rank passes its own ``ids`` share and ``state`` file; merge the returned statistics
    with :meth:`TemplateStats.merge`.
    """
    from floss.cache import CacheError, ImageRecord, fingerprint_differences
    from floss.protocol import new_template_stats, rank_record
    from floss.stats import TemplateStats

    device = torch.device(model.device)
    text = text.to(device)
    fingerprint = dict(fingerprint or {})
    st, done = None, []
    state = Path(state) if state is not None else None
    if state is not None and state.is_file():
        st = TemplateStats.load(state, device=device)
        extra = st.extra or {}
        diff = fingerprint_differences(extra.get("fingerprint", {}), fingerprint)
        if diff and not restart_stale:
            raise CacheError(f"{state}: a ranking checkpoint of other settings; differing keys: " + "; ".join(diff)
                             + ". Delete it to start over.")
        if diff:
            logger.info("%s: checkpoint of other settings (%s); starting over", state, "; ".join(diff))
            st = None
        else:
            done = list(extra.get("done", []))
            logger.info("resuming the ranking in %s: %d of %d images done", state, len(done), len(ids))
    if st is None:
        st = new_template_stats(metrics, text.shape[0], len(set(query_to_class)), text.shape[2], track_images,
                                device)
    done_set = set(done)
    todo = [i for i in ids if i not in done_set]

    def save() -> None:
        if state is not None:
            state.parent.mkdir(parents=True, exist_ok=True)
            st.save(state, extra={"fingerprint": fingerprint, "done": done})

    for n, (image_id, _, prepared) in enumerate(prepared_images(model, ds, todo, settings, workers=workers,
                                                                 progress=progress, desc="rank"), start=1):
        f = model.encode(prepared)
        record = ImageRecord(image_id, f.feats, torch.as_tensor(f.boxes), f.resized_size, f.orig_size)
        rank_record(st, record, text, settings, query_to_class, template_chunk)
        done.append(image_id)
        if n % save_every == 0:
            save()
    save()
    return st
