"""Lazy readers for the mmseg dataset layouts of :mod:`floss.data.datasets.registry`.

``open_dataset`` checks the whole layout at once (every image has its label, nothing is read yet) and fails
with the expected paths, what was found and the conversion step that produces the missing files. Items are
read on access, the way the authors' mmseg pipeline reads them:

* images: ``cv2.imdecode(..., IMREAD_COLOR)`` (mmcv's ``LoadImageFromFile`` default, BGR; EXIF orientation
  applied), then BGR -> RGB, which is what the authors' data preprocessor does (``bgr_to_rgb=True``);
* labels: PIL, ``np.array(Image.open(p))`` keeps the palette INDICES of VOC-style palette PNGs (cv2's
  ``IMREAD_UNCHANGED`` would expand a palette PNG to 3-channel colours), then ``reduce_zero_label`` where the
  dataset uses it. Values must be class ids ``0..K-1`` or the ignore index 255 after reduction.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import cv2
import numpy as np
from PIL import Image

from floss.data.datasets.registry import Layout, get_layout
from floss.data.datasets.walk import scan_tree

logger = logging.getLogger(__name__)

IGNORE_INDEX = 255
#: how many missing/extra file names an error message lists
_EXAMPLES = 3


class DatasetLayoutError(FileNotFoundError):
    """The dataset folder is missing, incomplete or not in the expected (converted) layout."""


class UnreadableFileError(OSError):
    """An image or label file exists but cannot be decoded."""


@dataclass(frozen=True)
class Sample:
    """One dataset item: ``image`` uint8 ``[H, W, 3]`` RGB; ``label`` uint8 ``[H, W]`` (255 = ignore) or None."""

    id: str
    image: np.ndarray
    label: np.ndarray | None


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as the authors do (cv2, colour, BGR) and return it as uint8 RGB ``[H, W, 3]``."""
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {path} does not exist") from None
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if bgr is None:
        raise UnreadableFileError(f"image file {path} ({data.size} bytes) could not be decoded by OpenCV as an "
                                  "image; the file is corrupt, truncated or not an image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_label(path: str | os.PathLike, reduce_zero_label: bool = False) -> np.ndarray:
    """Read a single-channel label PNG as index values (palette indices, not colours); uint8 ``[H, W]``.

    ``reduce_zero_label``: 0 -> 255 and k -> k-1 (255 stays 255), as mmseg's ``LoadAnnotations``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label file {path} does not exist")
    try:
        with Image.open(path) as im:
            mode = im.mode
            label = np.array(im)
    except (OSError, SyntaxError, ValueError) as exc:
        raise UnreadableFileError(f"label file {path} could not be decoded by PIL: {exc}") from None
    if mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
        raise ValueError(f"label file {path}: expected a single-channel index PNG (mode L or P), received mode "
                         f"{mode!r} with shape {label.shape}; colour-coded labels must be converted to class ids")
    if label.dtype != np.uint8:
        top = int(label.max()) if label.size else 0
        if top > 255 or int(label.min()) < 0:
            raise ValueError(f"label file {path}: expected label values in 0..255, received a {mode} image with "
                             f"values up to {top}")
        label = label.astype(np.uint8)
    if reduce_zero_label:
        # uint8 wrap-around: 0 -> 255 directly; 255 -> 254 is put back to 255
        label = label - np.uint8(1)
        label[label == 254] = IGNORE_INDEX
    return label


class SegDataset:
    """A split of one dataset: ids in the authors' (mmseg) order, items read lazily.

    Use :func:`open_dataset` to build one. ``labels=False`` reads images only (e.g. to rank templates on
    the train split, which needs no labels); ``label`` is then ``None``.
    """

    def __init__(self, layout: Layout, root: Path, split: str, ids: Sequence[str], labels: bool = True,
                 check_labels: bool = True):
        self.layout = layout
        self.root = root
        self.split = split
        self.labels = labels
        self.check_labels = check_labels
        self._ids = tuple(ids)
        dirs = layout.splits[split]
        self._img_dir = root / dirs.img_dir
        self._label_dir = root / dirs.label_dir

    # -- description -------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.layout.name

    @property
    def num_classes(self) -> int:
        return self.layout.num_classes

    @property
    def reduce_zero_label(self) -> bool:
        return self.layout.reduce_zero_label

    @property
    def class_names(self) -> list[str]:
        """Class names from :data:`floss.core.classes.CLASS_NAMES` (Cityscapes names for BDD/ACDC/Mapillary)."""
        from floss.core.classes import CLASS_NAMES  # lazy: the class-name module is independent of the readers

        names = list(CLASS_NAMES[self.layout.class_source])
        if len(names) != self.num_classes:
            raise ValueError(f"floss.core.classes.CLASS_NAMES[{self.layout.class_source!r}] has {len(names)} names, "
                             f"but dataset {self.name!r} has {self.num_classes} classes")
        return names

    @property
    def ids(self) -> tuple[str, ...]:
        return self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return (f"SegDataset(name={self.name!r}, split={self.split!r}, root={str(self.root)!r}, "
                f"images={len(self)}, labels={self.labels})")

    # -- items -------------------------------------------------------------------------------------------
    def _index(self, i: int) -> int:
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool):
            raise TypeError(f"index: expected an int, received {type(i).__name__}")
        n = len(self._ids)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {self.name}/{self.split} with {n} images")
        return int(i) % n

    def image_path(self, i: int) -> Path:
        return self._img_dir / (self._ids[self._index(i)] + self.layout.img_suffix)

    def label_path(self, i: int) -> Path | None:
        """The label file of item ``i``; ``None`` when the dataset was opened with ``labels=False``."""
        if not self.labels:
            return None
        return self._label_dir / (self._ids[self._index(i)] + self.layout.label_suffix)

    def __getitem__(self, i: int) -> Sample:
        i = self._index(i)
        image_path = self.image_path(i)
        image = read_image(image_path)
        label = None
        if self.labels:
            label_path = self.label_path(i)
            label = read_label(label_path, self.layout.reduce_zero_label)
            if label.shape != image.shape[:2]:
                raise ValueError(f"label file {label_path} has size {label.shape} (H, W) but its image "
                                 f"{image_path} has size {image.shape[:2]}")
            if self.check_labels:
                self._check_values(label, label_path)
        return Sample(self._ids[i], image, label)

    def _check_values(self, label: np.ndarray, path: Path) -> None:
        bad = (label >= self.num_classes) & (label != IGNORE_INDEX)
        if bad.any():
            values = np.unique(label[bad])
            raw = values + 1 if self.reduce_zero_label else values
            raise ValueError(
                f"label file {path}: expected class ids 0..{self.num_classes - 1} or {IGNORE_INDEX} "
                f"({self.name} has {self.num_classes} classes), received stored values {raw[:10].tolist()} in "
                f"{int(bad.sum())} pixels; are these labels produced by {self.layout.conversion}?")

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    # -- subsets -----------------------------------------------------------------------------------------
    def _with_ids(self, ids: Sequence[str]) -> "SegDataset":
        return SegDataset(self.layout, self.root, self.split, ids, self.labels, self.check_labels)

    def limit(self, n: int | None) -> "SegDataset":
        """The first ``n`` items (``--limit N``); ``None`` keeps all."""
        if n is None:
            return self
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"limit: expected a non-negative int or None, received {n!r}")
        return self._with_ids(self._ids[:int(n)])

    def subset(self, ids: Iterable[str]) -> "SegDataset":
        """The items with the given ids, in the given order; unknown or repeated ids raise."""
        ids = list(ids)
        known = set(self._ids)
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise KeyError(f"subset: {len(unknown)} id(s) not in {self.name}/{self.split}, e.g. "
                           f"{unknown[:_EXAMPLES]}")
        if len(set(ids)) != len(ids):
            seen, dup = set(), []
            for i in ids:
                (dup.append(i) if i in seen else seen.add(i))
            raise ValueError(f"subset: repeated ids {dup[:_EXAMPLES]}")
        return self._with_ids(ids)


# -- opening -----------------------------------------------------------------------------------------------
def _scan(folder: Path, suffix: str) -> list[str]:
    """Relative paths (``/``-separated, suffix removed) of the files under ``folder`` ending with ``suffix``; links
    are followed once per real folder and file (:func:`floss.data.datasets.walk.scan_tree`)."""
    found = scan_tree(folder, lambda f: f.endswith(suffix) and len(f) > len(suffix), what="dataset")
    return [rel[: -len(suffix)] for rel in found]


def _suggest_root(layout: Layout, root: Path, rel: str) -> str:
    """A hint when ``rel`` is found one or two levels below ``root`` (a parent folder was given)."""
    for depth in ("*", "*/*"):
        for candidate in sorted(root.glob(f"{depth}/{rel}")):
            better = Path(str(candidate)[: -len(rel)].rstrip("/\\"))
            return f" (did you mean root={better}?)"
    return f" (the root is usually the {layout.root_hint}/ folder)" if layout.root_hint else ""


def _layout_error(layout: Layout, root: Path, split: str, what: str) -> DatasetLayoutError:
    return DatasetLayoutError(f"dataset {layout.name!r} ({layout.description}), split {split!r} at {root}: "
                              f"{what}. Expected {layout.expected_files(split)}.")


def _missing_labels_message(layout: Layout, label_dir: Path, n_images: int, n_labels: int,
                            missing: list[str]) -> str:
    raw = []
    if label_dir.is_dir():
        for suffix in layout.raw_label_suffixes:
            raw = [r for r in _scan(label_dir, suffix) if not (r + suffix).endswith(layout.label_suffix)]
            if raw:
                raw_msg = (f"; {label_dir} holds {len(raw)} raw *{suffix} files (not converted): run "
                           f"{layout.conversion}")
                break
    if not raw:
        raw_msg = f"; the labels come from {layout.conversion}"
    examples = ", ".join(str(label_dir / (m + layout.label_suffix)) for m in missing[:_EXAMPLES])
    return (f"found {n_images} images but {n_labels} labels (*{layout.label_suffix} in {label_dir}); "
            f"{len(missing)} image(s) have no label, e.g. {examples}{raw_msg}")


def open_dataset(name: str, root: str | os.PathLike, split: str = "val", *, labels: bool = True,
                 limit: int | None = None, check_labels: bool = True) -> SegDataset:
    """Open ``split`` of dataset ``name`` stored under ``root`` in its mmseg layout.

    Fails at once (nothing is decoded) when the root, the split folders, the split file, an image or a
    label is missing, naming the expected paths and the conversion step. ``labels=False`` opens the images
    only. ``limit`` keeps the first N items. ``check_labels`` validates label values on every read.
    """
    layout = get_layout(name)
    if split not in layout.splits:
        raise ValueError(f"unknown split {split!r} for dataset {layout.name!r}; available splits: "
                         f"{', '.join(layout.splits)}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise _layout_error(layout, root, split, f"the dataset root {root} does not exist or is not a folder")
    dirs = layout.splits[split]
    img_dir, label_dir = root / dirs.img_dir, root / dirs.label_dir
    if not img_dir.is_dir():
        made_by = f"; it is written by {layout.conversion}" if layout.images_from_conversion else ""
        raise _layout_error(layout, root, split, f"the image folder {img_dir} does not exist"
                            + _suggest_root(layout, root, dirs.img_dir) + made_by)

    if dirs.split_file is not None:
        split_file = root / dirs.split_file
        if not split_file.is_file():
            hint = f"; it is written by {layout.conversion}" if "convert" in layout.conversion else ""
            raise _layout_error(layout, root, split, f"the split file {split_file} does not exist{hint}")
        ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
        if len(set(ids)) != len(ids):
            raise _layout_error(layout, root, split, f"the split file {split_file} repeats ids")
        present = set(_scan(img_dir, layout.img_suffix))
        absent = [i for i in ids if i not in present]
        if absent:
            raise _layout_error(layout, root, split, (
                f"{split_file} lists {len(ids)} ids but {len(absent)} image(s) are missing, e.g. "
                + ", ".join(str(img_dir / (a + layout.img_suffix)) for a in absent[:_EXAMPLES])))
    else:
        ids = sorted(_scan(img_dir, layout.img_suffix), key=lambda i: i + layout.img_suffix)  # mmseg order
    if not ids:
        raise _layout_error(layout, root, split, f"found no *{layout.img_suffix} images under {img_dir}")

    if labels:
        label_ids = set(_scan(label_dir, layout.label_suffix)) if label_dir.is_dir() else set()
        missing = [i for i in ids if i not in label_ids]
        if missing:
            n_labels = len(ids) - len(missing)
            raise _layout_error(layout, root, split,
                                _missing_labels_message(layout, label_dir, len(ids), n_labels, missing))

    expected = layout.expected_counts.get(split)
    if expected is not None and expected != len(ids):
        logger.warning("%s/%s at %s has %d images; the full split has %d", layout.name, split, root, len(ids),
                       expected)
    dataset = SegDataset(layout, root, split, ids, labels=labels, check_labels=check_labels)
    logger.info("opened %r", dataset)
    return dataset.limit(limit)
