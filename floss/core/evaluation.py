"""Semantic-segmentation evaluation as mmseg's IoUMetric (protocol §5): a confusion matrix summed over the whole
split (not a mean of per-image scores), IoU_k = I_k / U_k with NaN for classes absent from both ground truth
and prediction, and mIoU = nanmean.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from floss.core.checks import check_tensor

#: mmseg's ignore label
IGNORE_INDEX = 255


def _check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes: expected a positive int, received {num_classes!r}")
    return num_classes


def _check_ignore(ignore_index, num_classes: int) -> int | None:
    if ignore_index is None:
        return None
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index: expected an int or None, received {ignore_index!r}")
    if 0 <= ignore_index < num_classes:
        raise ValueError(f"ignore_index: expected a label outside the classes [0, {num_classes - 1}], "
                         f"received {ignore_index}")
    return ignore_index


def _describe_bad(values: torch.Tensor) -> str:
    uniq = torch.unique(values)
    return f"{uniq[:10].tolist()}{' ...' if uniq.numel() > 10 else ''}"


def confusion_matrix(pred: torch.Tensor, gt: torch.Tensor, num_classes: int,
                     ignore_index: int | None = IGNORE_INDEX) -> torch.Tensor:
    """``[K, K]`` int64 confusion counts, rows = ground truth, columns = prediction.

    ``pred`` and ``gt`` are integer label tensors of equal shape (any rank, e.g. ``[H, W]`` or ``[B, H, W]``).
    Pixels whose ground truth is ``ignore_index`` are skipped. ``gt`` must hold labels in ``[0, K)`` or
    ``ignore_index``; ``pred`` labels in ``[0, K)``.
    """
    num_classes = _check_num_classes(num_classes)
    ignore_index = _check_ignore(ignore_index, num_classes)
    check_tensor("pred", pred)
    check_tensor("gt", gt)
    for name, x in (("pred", pred), ("gt", gt)):
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise ValueError(f"{name}: expected an integer label tensor, received dtype {x.dtype}")
    if pred.shape != gt.shape:
        raise ValueError(f"pred, gt: expected equal shapes, received pred {list(pred.shape)} and gt {list(gt.shape)}")
    gt = gt.reshape(-1).long()
    pred = pred.reshape(-1).to(gt.device).long()
    bad_pred = (pred < 0) | (pred >= num_classes)
    if bool(bad_pred.any()):
        raise ValueError(f"pred: expected labels in [0, {num_classes - 1}], received {_describe_bad(pred[bad_pred])}")
    keep = torch.ones_like(gt, dtype=torch.bool) if ignore_index is None else gt != ignore_index
    bad_gt = keep & ((gt < 0) | (gt >= num_classes))
    if bool(bad_gt.any()):
        raise ValueError(f"gt: expected labels in [0, {num_classes - 1}] or ignore_index={ignore_index}, "
                         f"received {_describe_bad(gt[bad_gt])}")
    codes = gt[keep] * num_classes + pred[keep]
    return torch.bincount(codes, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _check_confusion(confusion) -> torch.Tensor:
    check_tensor("confusion", confusion, ndim=2)
    if confusion.shape[0] != confusion.shape[1] or confusion.shape[0] == 0:
        raise ValueError(f"confusion: expected a square [K, K] matrix, received {list(confusion.shape)}")
    if confusion.is_floating_point():
        if not bool(torch.isfinite(confusion).all()):
            raise ValueError("confusion: expected finite counts, received NaN/Inf")
    elif confusion.dtype == torch.bool or confusion.is_complex():
        raise ValueError(f"confusion: expected counts, received dtype {confusion.dtype}")
    if bool((confusion < 0).any()):
        raise ValueError("confusion: expected non-negative counts, received negative entries")
    return confusion


#: the authors' per-template IoU epsilon (``EntropyMetric``: I / (U + 1e-10), protocol §5 and §9.12)
PER_TEMPLATE_EPS = 1e-10


def miou(confusion: torch.Tensor, *, absent: str = "nan") -> tuple[torch.Tensor, float]:
    """``(iou [K] float64 in [0, 1], mean IoU)`` of a confusion matrix.

    ``absent="nan"`` (the main mIoU, mmseg's IoUMetric): a class absent from both ground truth and prediction has
    NaN IoU and is left out of the mean, which is NaN when no class occurs at all. ``absent="zero"`` (the authors'
    per-template IoU, ``EntropyMetric``): IoU = I / (U + 1e-10), so such a class counts 0 (protocol §9.12).
    """
    if absent not in ("nan", "zero"):
        raise ValueError(f"absent: expected 'nan' or 'zero', received {absent!r}")
    confusion = _check_confusion(confusion).double().cpu()
    intersection = confusion.diagonal()
    union = confusion.sum(dim=0) + confusion.sum(dim=1) - intersection
    if absent == "zero":
        iou = intersection / (union + PER_TEMPLATE_EPS)
        return iou, float(iou.mean())
    iou = torch.where(union > 0, intersection / union.clamp(min=1), torch.full_like(union, math.nan))
    present = iou[~torch.isnan(iou)]
    return iou, float(present.mean()) if present.numel() else math.nan


class ConfusionMeter:
    """Streaming confusion matrix over a split: ``update`` per image (or batch), ``merge`` across workers."""

    def __init__(self, num_classes: int, ignore_index: int | None = IGNORE_INDEX,
                 device: torch.device | str | None = None):
        self.num_classes = _check_num_classes(num_classes)
        self.ignore_index = _check_ignore(ignore_index, self.num_classes)
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long, device=device)
        self.num_updates = 0

    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> "ConfusionMeter":
        """Add the counts of one prediction/label pair (computed on ``gt``'s device)."""
        counts = confusion_matrix(pred, gt, self.num_classes, self.ignore_index)
        self.confusion += counts.to(self.confusion.device)
        self.num_updates += 1
        return self

    def merge(self, other: "ConfusionMeter") -> "ConfusionMeter":
        """A new meter holding the sum of both (e.g. from two torchrun ranks)."""
        if not isinstance(other, ConfusionMeter):
            raise TypeError(f"other: expected a ConfusionMeter, received {type(other).__name__}")
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(f"other: expected num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
                             f"received num_classes={other.num_classes}, ignore_index={other.ignore_index}")
        out = ConfusionMeter(self.num_classes, self.ignore_index, device=self.confusion.device)
        out.confusion = self.confusion + other.confusion.to(self.confusion.device)
        out.num_updates = self.num_updates + other.num_updates
        return out

    def reset(self) -> None:
        self.confusion.zero_()
        self.num_updates = 0

    def iou(self) -> tuple[torch.Tensor, float]:
        """:func:`miou` of the accumulated counts."""
        return miou(self.confusion)


def iou_percent_dict(iou: torch.Tensor, class_names: Sequence[str]) -> dict[str, float | None]:
    """``{class name: IoU in percent}`` for results JSON (NaN -> ``None``, written as ``null``)."""
    check_tensor("iou", iou, ndim=1, floating=True)
    if len(class_names) != iou.shape[0]:
        raise ValueError(f"class_names: expected {iou.shape[0]} names (one per IoU entry), received {len(class_names)}")
    if len(set(class_names)) != len(class_names):
        raise ValueError("class_names: expected distinct names, received duplicates")
    return {name: (None if math.isnan(v) else 100.0 * v) for name, v in zip(class_names, iou.double().tolist())}
