"""Streaming per-(template, class) statistics for expert selection (paper Eqs. 5, 9, 10, 11; protocol §3).

For every image, each template ``m`` yields a probability map ``q [K, H, W]`` at the original resolution;
pixel ``x`` belongs to class ``k`` for template ``m`` when ``argmax_j q(x)[j] = k`` (first index on ties,
like ``torch.argmax``). Every pixel counts (no ground truth, as the authors). Per (m, k) we keep float64 sums
of per-pixel scores, int64 pixel counts and per-template pixel totals: these are sufficient statistics, so
shards merge by addition and per-image records re-aggregate any subset of images (paper Fig. 3).

Entropy accumulation: the authors add ``mean_{pred=k}(H) · count`` per image (an fp32 mean, float64
accumulators); that is the pixel sum of ``H`` up to fp32 rounding. Here per-pixel ``H`` is computed in fp32
(as theirs) and summed in float64 per block of pixels, i.e. the same quantity with less rounding.

This module owns the container (:class:`TemplateStats`: validation, state, per-image records, merge, values,
rankings). Upsampling and speed: the per-image work runs in :mod:`floss.core.kernels.stats` (bounded blocks, fused
kernels, worker threads); saving and loading in :mod:`floss.core.stats_io`. May import: torch, :mod:`floss.core.checks`,
:mod:`floss.core.metrics`, :mod:`floss.core.kernels.stats` and :mod:`floss.core.stats_io`; nothing above them.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterable, Sequence

import torch

from floss.core.checks import check_probabilities, check_tensor, check_finite
from floss.core.metrics import (available_metrics, ensemble_values, entropy_score, get_metric,  # noqa: F401
                                mano_score, register_metric)
from floss.core.stats_io import load_template_stats, save_template_stats
from floss.core.kernels.stats import CHUNK_ELEMENTS, MIN_ROWS, accumulate, iti_values  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

__all__ = ["TemplateStats", "register_metric", "get_metric", "available_metrics", "CHUNK_ELEMENTS"]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, received {value!r}")
    return value


class TemplateStats:
    """Mergeable per-(template, class) statistics of ``num_templates`` single-template classifiers.

    ``metrics``: registered metric names (:func:`available_metrics`); ``"iti"`` needs ``feature_dim``.
    ``track_images=True`` keeps compact per-image records (non-zero (m, k) entries only) for
    :meth:`subset`. Accumulators live on ``device`` (default: the device of the first ``probs``).
    """

    def __init__(self, num_templates: int, num_classes: int, *,
                 metrics: Sequence[str] = ("entropy", "avgprob", "mano"), feature_dim: int | None = None,
                 track_images: bool = False, device: torch.device | str | None = None):
        self.num_templates = _positive_int("num_templates", num_templates)
        self.num_classes = _positive_int("num_classes", num_classes)
        if isinstance(metrics, str) or not isinstance(metrics, Sequence) or not metrics:
            raise ValueError(f"metrics: expected a non-empty sequence of metric names, received {metrics!r}")
        specs = [get_metric(name) for name in metrics]
        if len(set(metrics)) != len(metrics):
            raise ValueError(f"metrics: expected distinct names, received {list(metrics)}")
        self.metrics = tuple(metrics)
        self._pixel_metrics = tuple(s.name for s in specs if s.kind in ("pixel", "map"))   # the summed ones
        for s in specs:
            if s.kind == "ensemble" and not set(s.members) <= set(metrics):
                raise ValueError(f"metrics: {s.name!r} combines {list(s.members)}; expected them tracked too, "
                                 f"missing {[m for m in s.members if m not in metrics]}")
        if "iti" in self.metrics:
            if feature_dim is None:
                raise ValueError("feature_dim: metric 'iti' needs the feature dimension D, received None")
            _positive_int("feature_dim", feature_dim)
        elif feature_dim is not None:
            raise ValueError(f"feature_dim: only used by metric 'iti', which is not in metrics {list(metrics)}")
        self.feature_dim = feature_dim
        if not isinstance(track_images, bool):
            raise TypeError(f"track_images: expected a bool, received {track_images!r}")
        self.track_images = track_images
        self.device = None if device is None else torch.device(device)
        self._records: dict[Any, dict[str, Any]] = {}
        self._state: dict[str, torch.Tensor] | None = None
        self.extra: dict | None = None      # the ``extra`` dict of the file it was loaded from
        if self.device is not None:
            self._init_state(self.device)

    # ------------------------------------------------------------------------------------------ state
    def _init_state(self, device: torch.device) -> None:
        m, k = self.num_templates, self.num_classes
        st = {"counts": torch.zeros(m, k, dtype=torch.int64, device=device),
              "pixels": torch.zeros(m, dtype=torch.int64, device=device),
              "images": torch.zeros(m, dtype=torch.int64, device=device),
              "sums": torch.zeros(len(self._pixel_metrics), m, k, dtype=torch.float64, device=device)}
        if self.feature_dim is not None:  # ITI: per (m, k) #images, Σ f̄^i, Σ ||f̄^i||²
            st["iti_images"] = torch.zeros(m, k, dtype=torch.int64, device=device)
            st["iti_sum"] = torch.zeros(m, k, self.feature_dim, dtype=torch.float64, device=device)
            st["iti_sqsum"] = torch.zeros(m, k, dtype=torch.float64, device=device)
        self._state, self.device = st, device

    def _get_state(self) -> dict[str, torch.Tensor]:
        if self._state is None:
            self._init_state(torch.device("cpu"))
        return self._state

    @property
    def counts(self) -> torch.Tensor:
        """``[M, K]`` int64: pixels that template m predicted as class k."""
        return self._get_state()["counts"]

    @property
    def pixels(self) -> torch.Tensor:
        """``[M]`` int64: total pixels seen per template (``pixel_percentage = 100·counts/pixels``)."""
        return self._get_state()["pixels"]

    @property
    def num_images(self) -> int:
        """Number of images seen (the most over templates; template chunks of one image count once)."""
        return int(self._get_state()["images"].max())

    @property
    def image_ids(self) -> list:
        """Ids of the per-image records (``track_images=True``), in insertion order."""
        return list(self._records)

    # ------------------------------------------------------------------------------------------ update
    def _template_ids(self, templates, m: int) -> torch.Tensor:
        if templates is None:
            if m != self.num_templates:
                raise ValueError(f"templates: probs holds {m} templates but num_templates={self.num_templates}; "
                                 "pass templates=<ids of the probs rows>")
            return torch.arange(m)
        if isinstance(templates, torch.Tensor):
            templates = templates.tolist()
        if isinstance(templates, (str, bytes)) or not isinstance(templates, Iterable):
            raise ValueError(f"templates: expected a sequence of template ids, received {templates!r}")
        ids = list(templates)
        if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
            raise ValueError(f"templates: expected int ids, received {ids!r}")
        if len(ids) != m:
            raise ValueError(f"templates: expected {m} ids (one per probs row), received {len(ids)}")
        bad = [i for i in ids if not 0 <= i < self.num_templates]
        if bad:
            raise ValueError(f"templates: ids must lie in [0, {self.num_templates}), received {bad}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"templates: expected distinct ids, received duplicates in {ids}")
        return torch.tensor(ids, dtype=torch.int64)

    @staticmethod
    def _size(size, h: int, w: int) -> tuple[int, int]:
        if size is None:
            return h, w
        if (not isinstance(size, (tuple, list)) or len(size) != 2
                or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in size)):
            raise ValueError(f"size: expected a pair of positive ints (H, W), received {size!r}")
        return int(size[0]), int(size[1])

    def update(self, probs: torch.Tensor, size: Sequence[int] | None = None, *, templates=None,
               features: torch.Tensor | None = None, image_id=None, normalized: bool = True) -> "TemplateStats":
        """Add one image: ``probs [m, K, h, w]`` for the templates ``templates`` (default all M).

        ``size=(H, W)`` bilinearly upsamples to the original resolution first (no re-softmax); ``features``
        ``[D, h', w']`` (ITI) are upsampled to the same size. ``normalized=False`` only for class scores
        that do not sum to one on purpose (NACLIP's VOC20 synonym max). Returns ``self``.
        """
        check_tensor("probs", probs, ndim=4, floating=True)
        m, k, h, w = probs.shape
        if k != self.num_classes:
            raise ValueError(f"probs: expected {self.num_classes} classes in dim 1, received shape {list(probs.shape)}")
        if m == 0 or h == 0 or w == 0:
            raise ValueError(f"probs: expected non-empty dims, received shape {list(probs.shape)}")
        tids = self._template_ids(templates, m)
        check_probabilities("probs", probs, dim=1, normalized=normalized)
        out_h, out_w = self._size(size, h, w)
        if "iti" in self.metrics:
            if features is None:
                raise ValueError("features: metric 'iti' needs features [D, h', w'] for every update, received None")
            check_tensor("features", features, ndim=3, shape=(self.feature_dim, None, None), floating=True)
            check_finite("features", features)
        elif features is not None:
            raise ValueError("features: given but metric 'iti' is not tracked (metrics="
                             f"{list(self.metrics)})")
        if self.track_images:
            self._check_new_record(image_id, tids, out_h * out_w)
        elif image_id is not None:
            raise ValueError("image_id: per-image records need TemplateStats(..., track_images=True)")
        if self._state is None:
            self._init_state(probs.device)
        st = self._state

        counts, sums, fsum = self._accumulate(probs, (out_h, out_w), features, normalized)
        dev = st["counts"].device
        tids_d = tids.to(dev)
        counts, sums = counts.to(dev), sums.to(dev)
        st["counts"].index_add_(0, tids_d, counts)
        st["sums"].index_add_(1, tids_d, sums)
        st["pixels"].index_add_(0, tids_d, torch.full((m,), out_h * out_w, dtype=torch.int64, device=dev))
        st["images"].index_add_(0, tids_d, torch.ones(m, dtype=torch.int64, device=dev))
        iti = None
        if fsum is not None:  # per-image class-mean features f̄_k^i over the pixels predicted k
            present = counts > 0
            mean = fsum.to(dev, torch.float64) / counts.clamp_min(1).unsqueeze(-1)
            mean = mean * present.unsqueeze(-1)
            iti = (present, mean)
            st["iti_images"].index_add_(0, tids_d, present.long())
            st["iti_sum"].index_add_(0, tids_d, mean)
            st["iti_sqsum"].index_add_(0, tids_d, (mean * mean).sum(-1))
        if self.track_images:
            self._add_record(image_id, tids, counts, sums, out_h * out_w, iti)
        return self

    def _accumulate(self, probs: torch.Tensor, size: tuple[int, int], features: torch.Tensor | None,
                    normalized: bool = True):
        """Per-image ``counts [m, K]`` int64, ``sums [n_metrics, m, K]`` float64, ``fsum [m, K, D]``
        (:func:`floss.core.kernels.stats.accumulate`)."""
        return accumulate(probs, size, features, self._pixel_metrics, normalized)

    # ------------------------------------------------------------------------------ per-image records
    def _check_new_record(self, image_id, tids: torch.Tensor, npix: int) -> None:
        if image_id is None:
            raise ValueError("image_id: track_images=True needs an image_id for every update, received None")
        try:
            hash(image_id)
            json.dumps(image_id)
        except TypeError:
            raise ValueError(f"image_id: expected a hashable JSON value (str or int), received {image_id!r}") from None
        rec = self._records.get(image_id)
        if rec is not None:
            again = sorted(set(rec["templates"].tolist()) & set(tids.tolist()))
            if again:
                raise ValueError(f"image_id: image {image_id!r} already holds templates {again}; "
                                 "an image adds each template once")
            if rec["npix"] != npix:
                raise ValueError(f"size: image {image_id!r} was recorded with {rec['npix']} pixels, "
                                 f"this update has {npix}")

    def _add_record(self, image_id, tids, counts, sums, npix: int, iti) -> None:
        # compact: only the (m, k) entries this image predicted; stored on CPU
        flat = (tids.to(counts.device).unsqueeze(1) * self.num_classes
                + torch.arange(self.num_classes, device=counts.device)).reshape(-1)
        nz = counts.reshape(-1) > 0
        rec = {"templates": tids.cpu(), "npix": npix, "index": flat[nz].cpu(),
               "counts": counts.reshape(-1)[nz].cpu(), "sums": sums.reshape(sums.shape[0], -1)[:, nz].cpu()}
        if iti is not None:
            rec["feat"] = iti[1].reshape(-1, iti[1].shape[-1])[nz].cpu()
        old = self._records.get(image_id)
        if old is not None:  # another template chunk of the same image
            rec = {key: old[key] if key == "npix" else torch.cat([old[key], rec[key]], dim=-1 if key == "sums" else 0)
                   for key in rec}
        self._records[image_id] = rec

    def _apply_record(self, rec: dict) -> None:
        st = self._get_state()
        dev = st["counts"].device
        mk = self.num_templates * self.num_classes
        idx = rec["index"].to(dev)
        st["counts"].view(-1).index_add_(0, idx, rec["counts"].to(dev))
        st["sums"].view(len(self._pixel_metrics), mk).index_add_(1, idx, rec["sums"].to(dev))
        tids = rec["templates"].to(dev)
        st["pixels"].index_add_(0, tids, torch.full_like(tids, rec["npix"]))
        st["images"].index_add_(0, tids, torch.ones_like(tids))
        if "feat" in rec:
            feat = rec["feat"].to(dev)
            st["iti_images"].view(-1).index_add_(0, idx, torch.ones_like(idx))
            st["iti_sum"].view(mk, -1).index_add_(0, idx, feat)
            st["iti_sqsum"].view(-1).index_add_(0, idx, (feat * feat).sum(-1))

    def _empty_like(self, track_images: bool) -> "TemplateStats":
        return TemplateStats(self.num_templates, self.num_classes, metrics=self.metrics,
                             feature_dim=self.feature_dim, track_images=track_images,
                             device=self.device or "cpu")

    def subset(self, image_ids: Iterable) -> "TemplateStats":
        """Statistics of the given images only, re-aggregated from the per-image records (no recomputation)."""
        if not self.track_images:
            raise ValueError("image_ids: subset() needs per-image records; build with track_images=True")
        ids = list(image_ids)
        missing = [i for i in ids if i not in self._records]
        if missing:
            raise ValueError(f"image_ids: unknown image ids {missing[:10]} ({len(missing)} of {len(ids)})")
        if len(set(ids)) != len(ids):
            raise ValueError("image_ids: expected distinct ids, received duplicates")
        out = self._empty_like(track_images=True)
        for i in ids:
            out._apply_record(self._records[i])
            out._records[i] = self._records[i]
        return out

    # ----------------------------------------------------------------------------------------- merge
    def merge(self, other: "TemplateStats") -> "TemplateStats":
        """A new object holding both sets of statistics (per-image records kept when both track them)."""
        if not isinstance(other, TemplateStats):
            raise TypeError(f"other: expected a TemplateStats, received {type(other).__name__}")
        for attr in ("num_templates", "num_classes", "metrics", "feature_dim"):
            if getattr(self, attr) != getattr(other, attr):
                raise ValueError(f"other: incompatible {attr}: {getattr(self, attr)!r} vs {getattr(other, attr)!r}")
        both = self.track_images and other.track_images
        if both:
            common = set(self._records) & set(other._records)
            if common:
                raise ValueError(f"other: image ids present in both ({sorted(map(str, common))[:5]}); "
                                 "merging would count them twice")
        out = self._empty_like(track_images=both)
        st = out._get_state()
        for src in (self, other):
            for key, val in src._get_state().items():
                st[key] += val.to(st[key].device)
            if both:
                out._records.update(src._records)
        return out

    # ---------------------------------------------------------------------------------------- values
    def values(self, metric: str) -> torch.Tensor:
        """``[M, K]`` float64 statistic of ``metric``; NaN where template m never predicts class k."""
        spec = get_metric(metric)
        if metric not in self.metrics:
            raise ValueError(f"metric: {metric!r} was not tracked; tracked metrics: {list(self.metrics)}")
        st = self._get_state()
        counts = st["counts"]
        if spec.kind == "features":
            return self._iti()
        if spec.kind == "ensemble":      # from the members' statistics (floss.core.metrics.ensemble_values)
            return ensemble_values([self.values(m) for m in spec.members],
                                   [get_metric(m).higher_is_better for m in spec.members])
        mean = st["sums"][self._pixel_metrics.index(metric)] / counts.clamp_min(1)
        if spec.finalize is not None:
            mean = spec.finalize(mean)
        return torch.where(counts > 0, mean, torch.full_like(mean, float("nan")))

    def _iti(self) -> torch.Tensor:
        """Eq. 11 (:func:`floss.core.kernels.stats.iti_values`)."""
        return iti_values(self._get_state(), self.num_classes)

    # -------------------------------------------------------------------------------------- rankings
    def rankings(self, class_names: Sequence[str], metric: str = "entropy", model: str | None = None,
                 dataset: str | None = None, split: str = "train", templates=None) -> dict:
        """Rankings in the authors' schema (protocol §3.1), best first, ``rank`` 1..M.

        ``templates``: the template set the statistics are of (a :class:`floss.core.templates.TemplateSet`, a list
        of texts or a file path; M texts). A set other than CLIP's 80 is recorded as the file's ``"templates"``
        list (:func:`floss.core.rankings.with_templates`); with None or CLIP's 80 the dict is the authors' schema.

        Python's stable sort by value (ascending for entropy, descending for higher-is-better metrics) over
        template ids in increasing order. Templates that never predict a class keep value 0.0 and
        ``pixel_percentage`` 0.0 as the authors (for entropy they sort first; ``select_experts`` drops them).
        """
        if isinstance(class_names, str) or not isinstance(class_names, Sequence) \
                or len(class_names) != self.num_classes:
            raise ValueError(f"class_names: expected a sequence of {self.num_classes} names, received {class_names!r}")
        if len(set(class_names)) != len(class_names):
            raise ValueError("class_names: expected distinct names, received duplicates")
        spec = get_metric(metric)
        vals = self.values(metric)
        st = self._get_state()
        pixels = st["pixels"]
        unseen = (pixels == 0).nonzero().flatten().tolist()
        if unseen:
            raise ValueError(f"metric: no pixels seen for templates {unseen[:10]}; update all templates first")
        pct = (100.0 * st["counts"].double() / pixels.double().unsqueeze(1)).cpu().tolist()
        vals = torch.nan_to_num(vals, nan=0.0).cpu().tolist()  # never-predicting -> 0.0 (authors)
        key = "entropy_ranking" if metric == "entropy" else f"{metric}_ranking"
        classes = {}
        for k, name in enumerate(class_names):
            entries = [{"template_id": m, metric: float(vals[m][k]), "pixel_percentage": float(pct[m][k])}
                       for m in range(self.num_templates)]
            entries = sorted(entries, key=lambda e: e[metric], reverse=spec.higher_is_better)
            for rank, e in enumerate(entries, start=1):
                e["rank"] = rank
            classes[name] = {key: entries}
        out = {"model": model, "dataset": dataset, "split": split, "classes": classes}
        if templates is None:
            return out
        from floss.core.rankings import with_templates
        from floss.core.templates import as_template_set
        ts = as_template_set(templates)
        if len(ts) != self.num_templates:
            raise ValueError(f"templates: expected {self.num_templates} templates (num_templates of the statistics), "
                             f"received {len(ts)} ({ts.source})")
        return with_templates(out, ts)

    # ------------------------------------------------------------------------------------- save/load
    def save(self, path: str | os.PathLike, extra: dict | None = None) -> None:
        """Write to a safetensors file (JSON config and image ids in its metadata), atomically; ``extra`` (a JSON
        dict, e.g. the ids a resumable job has done) is stored with it and read back as ``.extra``."""
        save_template_stats(self, path, extra)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None) -> "TemplateStats":
        """Read a file written by :meth:`save` (custom metrics must be registered again first)."""
        return load_template_stats(cls, path, device)
