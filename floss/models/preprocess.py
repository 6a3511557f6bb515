"""Image preprocessing and sliding-window geometry of the authors' evaluation pipelines.

Everything here reproduces mmcv/mmseg behaviour without depending on them:

* :func:`rescale_size` / :func:`resize_image` — mmcv ``Resize(scale=(long_max, short_max), keep_ratio=True)``:
  ``s = min(long_max / long_side, short_max / short_side)``, new size ``int(w*s + 0.5) x int(h*s + 0.5)``,
  ``cv2.resize`` with ``INTER_LINEAR`` on the uint8 image. The authors load BGR and swap to RGB after the
  resize; the resize works per channel, so resizing the RGB image gives the same bytes.
* :func:`stretch_image` — GEM's ``torchvision.transforms.Resize((h, w), BICUBIC)`` on a PIL image: PIL's
  bicubic filter (support widened when shrinking) to exactly (h, w), aspect ratio not kept.
* :func:`image_to_unit_tensor`, :func:`pad_to_multiple`, :func:`normalize_clip` — ``/255`` to [0, 1], the
  CLIP-DINOiser zero padding (bottom/right, in [0, 1] space, before normalisation), OpenAI CLIP mean/std.
* :func:`window_boxes` — mmseg ``slide_inference`` grid: ``n = max(H - c + s - 1, 0) // s + 1`` windows per
  axis, ``y1 = i*s, y2 = min(y1 + c, H), y1 = max(y2 - c, 0)`` (the last window is shifted inward).
* :func:`merge_windows` — bilinear (``align_corners=False``) upsampling of each window map to its box, sum
  into a canvas, divide by the per-pixel window count; :func:`resize_to` — the final bilinear resize.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from floss.util.open_clip_data import data_module

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "rescale_size", "resize_image", "stretch_image", "image_to_unit_tensor",
    "pad_to_multiple", "normalize_clip", "window_starts", "window_boxes", "merge_windows", "resize_to", "PreparedImage",
    "prepare_image",
]

#: OpenAI CLIP normalisation constants (used by MaskCLIP, CLIP-DINOiser and NACLIP alike)
CLIP_MEAN: tuple[float, float, float] = tuple(data_module("constants").OPENAI_DATASET_MEAN)
CLIP_STD: tuple[float, float, float] = tuple(data_module("constants").OPENAI_DATASET_STD)


def _check_image(image) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image: expected a numpy.ndarray (H, W, 3) uint8 RGB, received {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image: expected shape (H, W, 3) RGB, received {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image: expected dtype uint8, received {image.dtype}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image: expected a non-empty image, received shape {image.shape}")
    return image


def rescale_size(height: int, width: int, scale: Sequence[int]) -> tuple[int, int]:
    """(new_height, new_width) of mmcv's keep-ratio rescale for ``scale = (long_max, short_max)``.

    As mmcv, the long/short limits are ``max(scale)`` / ``min(scale)`` whatever their order.
    """
    if len(scale) != 2 or any(int(v) != v or v <= 0 for v in scale):
        raise ValueError(f"scale: expected two positive integers (long_max, short_max), received {scale!r}")
    if height <= 0 or width <= 0:
        raise ValueError(f"image size: expected positive height and width, received ({height}, {width})")
    long_max, short_max = max(scale), min(scale)
    s = min(long_max / max(height, width), short_max / min(height, width))
    return int(height * float(s) + 0.5), int(width * float(s) + 0.5)


def resize_image(image: np.ndarray, scale: Sequence[int]) -> np.ndarray:
    """mmcv keep-ratio resize of a uint8 (H, W, 3) image with ``cv2.INTER_LINEAR``."""
    image = _check_image(image)
    new_h, new_w = rescale_size(image.shape[0], image.shape[1], scale)
    return cv2.resize(np.ascontiguousarray(image), (new_w, new_h), interpolation=cv2.INTER_LINEAR)


def stretch_image(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """uint8 (H, W, 3) -> exactly ``size = (h, w)`` with PIL bicubic (GEM's torchvision transform on PIL)."""
    image = _check_image(image)
    if len(size) != 2 or any(isinstance(v, bool) or int(v) != v or v <= 0 for v in size):
        raise ValueError(f"size: expected two positive integers (h, w), received {size!r}")
    h, w = int(size[0]), int(size[1])
    out = Image.fromarray(np.ascontiguousarray(image)).resize((w, h), Image.Resampling.BICUBIC)
    return np.array(out)          # a writable copy (torch.from_numpy warns on read-only arrays)


def image_to_unit_tensor(image: np.ndarray, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 (H, W, 3) RGB -> float32 [3, H, W] in [0, 1] (the authors' ``divide_by_255``)."""
    image = _check_image(image)
    x = torch.from_numpy(np.ascontiguousarray(image)).to(device=device)
    return x.permute(2, 0, 1).to(torch.float32).div_(255.0)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the last two dims on the bottom/right up to a multiple of ``multiple`` (CLIP-DINOiser)."""
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (0, pad_w, 0, pad_h), value=0.0)


def normalize_clip(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std with the OpenAI CLIP constants over the channel dim (-3) of a [.., 3, H, W] tensor."""
    if x.ndim < 3 or x.shape[-3] != 3:
        raise ValueError(f"x: expected [..., 3, H, W], received shape {list(x.shape)}")
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def window_starts(length: int, crop: int, stride: int) -> list[tuple[int, int]]:
    """[(start, end)] of the mmseg slide windows along one axis of size ``length``."""
    if crop <= 0 or stride <= 0:
        raise ValueError(f"crop/stride: expected positive integers, received crop={crop}, stride={stride}")
    n = max(length - crop + stride - 1, 0) // stride + 1
    out = []
    for i in range(n):
        end = min(i * stride + crop, length)
        out.append((max(end - crop, 0), end))
    return out


def window_boxes(height: int, width: int, crop: int | None, stride: int | None) -> np.ndarray:
    """int32 [Nw, 4] boxes (y1, y2, x1, x2), row-major over the window grid; ``crop=None`` = whole image."""
    if crop is None:
        return np.array([[0, height, 0, width]], dtype=np.int32)
    if stride is None:
        raise ValueError("stride: expected an integer when crop is set, received None")
    rows, cols = window_starts(height, crop, stride), window_starts(width, crop, stride)
    return np.array([[y1, y2, x1, x2] for (y1, y2) in rows for (x1, x2) in cols], dtype=np.int32)


def resize_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear (``align_corners=False``) resize of [C, h, w] or [B, C, h, w] to ``size = (H, W)``."""
    if x.ndim not in (3, 4):
        raise ValueError(f"x: expected [C, h, w] or [B, C, h, w], received shape {list(x.shape)}")
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    if x.ndim == 3:
        return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def merge_windows(window_maps: torch.Tensor, boxes, resized_size: Sequence[int], chunk: int = 4) -> torch.Tensor:
    """Average per-window maps [Nw, C, gh, gw] into one [C, H, W] map of the resized image.

    Each window map is bilinearly upsampled (``align_corners=False``) to its box size, summed into a canvas,
    and the canvas is divided by the per-pixel window count (mmseg ``slide_inference``). ``chunk`` bounds how
    many windows are upsampled at once (memory). The canvas has the dtype of ``window_maps``.
    """
    if not isinstance(window_maps, torch.Tensor) or window_maps.ndim != 4:
        got = list(window_maps.shape) if isinstance(window_maps, torch.Tensor) else type(window_maps).__name__
        raise ValueError(f"window_maps: expected a tensor [Nw, C, gh, gw], received {got}")
    boxes_t = torch.as_tensor(np.asarray(boxes), dtype=torch.int64)
    if boxes_t.ndim != 2 or boxes_t.shape[1] != 4 or boxes_t.shape[0] != window_maps.shape[0]:
        raise ValueError(f"boxes: expected [{window_maps.shape[0]}, 4] (y1, y2, x1, x2), "
                         f"received {list(boxes_t.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk: expected a positive integer, received {chunk}")
    H, W = int(resized_size[0]), int(resized_size[1])
    y1, y2, x1, x2 = boxes_t.unbind(1)
    if bool((y1 < 0).any() | (x1 < 0).any() | (y2 > H).any() | (x2 > W).any() | (y2 <= y1).any() | (x2 <= x1).any()):
        raise ValueError(f"boxes: expected 0 <= y1 < y2 <= {H} and 0 <= x1 < x2 <= {W}, received {boxes_t.tolist()}")
    C = window_maps.shape[1]
    canvas = window_maps.new_zeros((C, H, W))
    count = torch.zeros((H, W), dtype=torch.int32, device=window_maps.device)
    sizes = (y2 - y1) * 100_000 + (x2 - x1)
    # windows of one image almost always share one size: upsample them together, ``chunk`` at a time
    for key in torch.unique(sizes).tolist():
        idx = torch.nonzero(sizes == key).flatten().tolist()
        h, w = int(key // 100_000), int(key % 100_000)
        for start in range(0, len(idx), chunk):
            part = idx[start:start + chunk]
            up = F.interpolate(window_maps[part], size=(h, w), mode="bilinear", align_corners=False)
            for j, i in enumerate(part):
                a, b, c, d = (int(v) for v in boxes_t[i])
                canvas[:, a:b, c:d] += up[j]
                count[a:b, c:d] += 1
    if bool((count == 0).any()):
        raise ValueError(f"boxes: the windows do not cover the whole {H}x{W} image")
    return canvas / count.to(canvas.dtype)



class PreparedImage(NamedTuple):
    """One image ready for the encoder: CLIP-normalised windows and the geometry the cache records."""

    crops: torch.Tensor            # [Nw, 3, h, w] float32, CLIP-normalised (padded when the model pads)
    boxes: np.ndarray              # [Nw, 4] int32 (y1, y2, x1, x2) in resized-image coordinates
    resized_size: tuple[int, int]  # (h, w) after the keep-ratio resize
    orig_size: tuple[int, int]     # (H, W) of the input image


def prepare_image(image: np.ndarray, settings, pad_multiple: int | None = None) -> PreparedImage:
    """Resize (``settings.scale``), cut into windows (``settings.crop``/``stride``), pad and normalise, on CPU.

    The model-independent half of :meth:`floss.models.DenseModel.extract`; it runs in DataLoader workers so that
    decoding and resizing overlap with the encoder (:mod:`floss.protocol.extraction`)."""
    image = _check_image(image)
    if getattr(settings, "resize", "keep_ratio") == "stretch_bicubic":
        resized = stretch_image(image, settings.scale)
    else:
        resized = resize_image(image, settings.scale)
    unit = image_to_unit_tensor(resized)
    h, w = resized.shape[:2]
    boxes = window_boxes(h, w, settings.crop, settings.stride)
    crops = torch.stack([unit[:, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes.tolist()])
    if pad_multiple:
        crops = pad_to_multiple(crops, pad_multiple)
    return PreparedImage(normalize_clip(crops), boxes, (h, w), (int(image.shape[0]), int(image.shape[1])))
