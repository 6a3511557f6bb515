"""Write tiny datasets in the real on-disk layouts read by :mod:`floss.data.datasets` (for tests).

Every ``make_<dataset>(root, n_train, n_val, size, *, seed)`` writes random images and labels under ``root``
(the dataset root that :func:`floss.data.datasets.open_dataset` takes) and returns ``root`` as a :class:`Path`.
``size`` is ``(H, W)``. Images have distinct channel levels (R ~ 200, G ~ 110, B ~ 35, plus noise) so a
channel swap is detectable even after JPEG compression. Labels hold the raw stored values of the real
dataset: class ids and 255 for train-id datasets; 0 (background/unlabelled), 1..K and 255 for the
``reduce_zero_label`` datasets. ``converted=False`` writes the dataset as downloaded, before the conversion
step the reader needs (raw Cityscapes ``labelIds``, raw COCO ids, no PASCAL-Context labels, no halved
Mapillary copy).

>>> root = make_dataset("cityscapes", tmp_path / "cityscapes", n_train=2, n_val=2, size=(32, 64))  # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from PIL import Image

Size = tuple[int, int]
_BASE_RGB = np.array([200, 110, 35], dtype=np.int16)


def random_image(rng: np.random.Generator, size: Size) -> np.ndarray:
    """uint8 RGB ``[H, W, 3]`` with distinct per-channel levels plus noise."""
    noise = rng.integers(-20, 21, size=(*size, 3), dtype=np.int16)
    return np.clip(_BASE_RGB + noise, 0, 255).astype(np.uint8)


def random_label(rng: np.random.Generator, size: Size, num_values: int, ignore_fraction: float = 0.1
                 ) -> np.ndarray:
    """uint8 ``[H, W]`` with values in ``0..num_values-1`` and about ``ignore_fraction`` pixels at 255.

    The first row cycles through every value so that each one occurs in every label.
    """
    label = rng.integers(0, num_values, size=size, dtype=np.int64).astype(np.uint8)
    label[rng.random(size) < ignore_fraction] = 255
    label[0, : min(size[1], num_values)] = np.arange(min(size[1], num_values), dtype=np.uint8)
    return label


def write_image(path: Path, rgb: np.ndarray) -> None:
    """Write an RGB array as PNG or JPEG (by suffix) with OpenCV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")


def write_label(path: Path, label: np.ndarray, palette: bool = False) -> None:
    """Write an 8-bit single-channel PNG; ``palette=True`` writes a VOC-style palette ('P') PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(label)
    if palette:
        im.putpalette(voc_palette())  # an 'L' image becomes 'P' with the same indices
    im.save(path)


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (256 RGB triplets, flattened)."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


def _pairs(root: Path, split_ids: dict[str, list[str]], img: str, lab: str, *, num_values: int, seed: int,
           size: Size, palette: bool = False, write_labels: bool = True) -> None:
    """Write ``root/img.format(split=, id=)`` images and ``root/lab.format(...)`` labels for every id."""
    rng = np.random.default_rng(seed)
    for split, ids in split_ids.items():
        for id_ in ids:
            write_image(root / img.format(split=split, id=id_), random_image(rng, size))
            label = random_label(rng, size, num_values)
            if write_labels:
                write_label(root / lab.format(split=split, id=id_), label, palette)


def _write_split_file(path: Path, ids: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids))


def make_cityscapes(root, n_train: int = 2, n_val: int = 2, size: Size = (32, 64), *, seed: int = 0,
                    converted: bool = True) -> Path:
    """``leftImg8bit/{split}/<city>/*_leftImg8bit.png`` + ``gtFine/.../*_gtFine_labelIds.png`` and, when
    ``converted``, ``*_gtFine_labelTrainIds.png`` (0..18, 255). Two cities per split."""
    root = Path(root)
    cities = {"train": ("aachen", "bochum"), "val": ("frankfurt", "lindau")}
    ids = {s: [f"{cities[s][i % 2]}/{cities[s][i % 2]}_{i:06d}_000019" for i in range(n)]
           for s, n in (("train", n_train), ("val", n_val))}
    _pairs(root, ids, "leftImg8bit/{split}/{id}_leftImg8bit.png", "gtFine/{split}/{id}_gtFine_labelTrainIds.png",
           num_values=19, seed=seed, size=size, write_labels=converted)
    rng = np.random.default_rng(seed + 1)
    for split, split_ids in ids.items():  # the raw ids (0..33) the conversion starts from
        for id_ in split_ids:
            write_label(root / f"gtFine/{split}/{id_}_gtFine_labelIds.png", random_label(rng, size, 34, 0.0))
    return root


def make_pascalvoc20(root, n_train: int = 2, n_val: int = 2, size: Size = (32, 64), *, seed: int = 0) -> Path:
    """VOC2012: ``JPEGImages/*.jpg``, palette ``SegmentationClass/*.png`` (0 bg, 1..20, 255 boundary),
    ``ImageSets/Segmentation/{train,val}.txt``; one extra JPEG belongs to no segmentation split."""
    root = Path(root)
    ids = {"train": [f"2007_{i:06d}" for i in range(n_train)],
           "val": [f"2007_{i:06d}" for i in range(n_train, n_train + n_val)]}
    _pairs(root, ids, "JPEGImages/{id}.jpg", "SegmentationClass/{id}.png", num_values=21, seed=seed, size=size,
           palette=True)
    write_image(root / "JPEGImages/2012_999999.jpg", random_image(np.random.default_rng(seed), size))
    for split, split_ids in ids.items():
        _write_split_file(root / f"ImageSets/Segmentation/{split}.txt", split_ids)
    return root


def make_pascalco59(root, n_train: int = 2, n_val: int = 2, size: Size = (32, 64), *, seed: int = 0,
                    converted: bool = True) -> Path:
    """VOC2010 + ``SegmentationClassContext/*.png`` (0 bg, 1..59) and ``ImageSets/SegmentationContext``,
    the output of mmseg's ``pascal_context.py`` (absent when not ``converted``)."""
    root = Path(root)
    ids = {"train": [f"2008_{i:06d}" for i in range(n_train)],
           "val": [f"2008_{i:06d}" for i in range(n_train, n_train + n_val)]}
    _pairs(root, ids, "JPEGImages/{id}.jpg", "SegmentationClassContext/{id}.png", num_values=60, seed=seed,
           size=size, write_labels=converted)
    for split, split_ids in ids.items():
        _write_split_file(root / f"ImageSets/Segmentation/{split}.txt", split_ids)  # VOC2010's own lists
        if converted:
            _write_split_file(root / f"ImageSets/SegmentationContext/{split}.txt", split_ids)
    return root


def make_ade20k(root, n_train: int = 2, n_val: int = 2, size: Size = (32, 64), *, seed: int = 0) -> Path:
    """``ADEChallengeData2016``: ``images/{training,validation}/*.jpg``, ``annotations/.../*.png`` (0..150)."""
    root = Path(root)
    folders = {"training": [f"ADE_train_{i + 1:08d}" for i in range(n_train)],
               "validation": [f"ADE_val_{i + 1:08d}" for i in range(n_val)]}
    _pairs(root, folders, "images/{split}/{id}.jpg", "annotations/{split}/{id}.png", num_values=151,
           seed=seed, size=size)
    return root


def make_cocostuff(root, n_train: int = 2, n_val: int = 2, size: Size = (32, 64), *, seed: int = 0,
                   converted: bool = True) -> Path:
    """COCO-Stuff 164k: ``images/{train2017,val2017}/*.jpg``, raw ``annotations/.../<id>.png`` and, when
    ``converted``, ``<id>_labelTrainIds.png`` (0..170, 255) from mmseg's ``coco_stuff164k.py``."""
    root = Path(root)
    folders = {"train2017": [f"{i + 9:012d}" for i in range(n_train)],
               "val2017": [f"{i + 139:012d}" for i in range(n_val)]}
    _pairs(root, folders, "images/{split}/{id}.jpg", "annotations/{split}/{id}_labelTrainIds.png",
           num_values=171, seed=seed, size=size, write_labels=converted)
    rng = np.random.default_rng(seed + 1)
    for split, split_ids in folders.items():
        for id_ in split_ids:
            write_label(root / f"annotations/{split}/{id_}.png", random_label(rng, size, 182))
    return root


def make_acdc(root, n_train: int = 2, n_val: int = 2, size: Size = (32, 64), *, seed: int = 0,
              condition: str = "night") -> Path:
    """ACDC: ``rgb_anon/<cond>/{split}/<seq>/*_rgb_anon.png`` + ``gt/.../*_gt_labelTrainIds.png``."""
    root = Path(root)
    seqs = {"train": "GOPR0351", "val": "GOPR0356"}
    ids = {s: [f"{seqs[s]}/{seqs[s]}_frame_{i:06d}" for i in range(n)] for s, n in (("train", n_train),
                                                                                   ("val", n_val))}
    _pairs(root, ids, f"rgb_anon/{condition}/{{split}}/{{id}}_rgb_anon.png",
           f"gt/{condition}/{{split}}/{{id}}_gt_labelTrainIds.png", num_values=19, seed=seed, size=size)
    return root


def make_bdd(root, n_train: int = 2, n_val: int = 2, size: Size = (32, 64), *, seed: int = 0) -> Path:
    """BDD100K 10k: ``images/10k/{split}/*.jpg`` + ``labels/sem_seg/masks/{split}/*.png`` (train ids)."""
    root = Path(root)
    ids = {"train": [f"0a{i:06x}-b{i:07x}" for i in range(n_train)],
           "val": [f"7d{i:06x}-c{i:07x}" for i in range(n_val)]}
    _pairs(root, ids, "images/10k/{split}/{id}.jpg", "labels/sem_seg/masks/{split}/{id}.png", num_values=19,
           seed=seed, size=size)
    return root


def make_mapillary(root, n_train: int = 0, n_val: int = 2, size: Size = (32, 64), *, seed: int = 0,
                   converted: bool = True) -> Path:
    """Mapillary v1.2 val: ``validation/images/*.jpg`` (raw) and, when ``converted``, the halved train-id copy
    ``half/val_img/*.jpg`` + ``half/val_label/*.png``. ``n_train`` is accepted for a uniform signature."""
    root = Path(root)
    ids = [f"{i:03d}Xq7Tv_mapillary{i:03d}" for i in range(n_val)]
    rng = np.random.default_rng(seed + 1)
    big = (size[0] * 2, size[1] * 2)
    for id_ in ids:
        write_image(root / f"validation/images/{id_}.jpg", random_image(rng, big))
    if converted:
        _pairs(root, {"val": ids}, "half/val_img/{id}.jpg", "half/val_label/{id}.png", num_values=19, seed=seed,
               size=size)
    return root


def _acdc_maker(condition: str) -> Callable[..., Path]:
    def make(root, n_train: int = 2, n_val: int = 2, size: Size = (32, 64), *, seed: int = 0) -> Path:
        return make_acdc(root, n_train, n_val, size, seed=seed, condition=condition)
    return make


#: dataset name (as in :data:`floss.data.datasets.DATASETS`) -> generator ``(root, n_train, n_val, size, *, seed)``
MAKERS: dict[str, Callable[..., Path]] = {
    "cityscapes": make_cityscapes, "pascalvoc20": make_pascalvoc20, "pascalco59": make_pascalco59,
    "ade20k": make_ade20k, "cocostuff": make_cocostuff,
    **{f"acdc_{c}": _acdc_maker(c) for c in ("night", "fog", "rain", "snow")},
    "bdd": make_bdd, "mapillary": make_mapillary,
}


def make_dataset(name: str, root, n_train: int = 2, n_val: int = 2, size: Size = (32, 64), *,
                 seed: int = 0) -> Path:
    """Write a tiny copy of dataset ``name`` under ``root`` (see :data:`MAKERS`) and return ``root``."""
    return MAKERS[name](root, n_train, n_val, size, seed=seed)
