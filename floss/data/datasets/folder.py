"""Your own images: a folder of images (nested folders allowed), optional labels, and a class-names file.

Class-names file: one class per line, in class order (class id = line index among the non-empty lines); optional
synonyms after a colon, ``name: syn1, syn2`` — every name is prompted and a class scores the max over its names,
as NACLIP's synonym lines do. Blank lines and lines starting with ``#`` are skipped. UTF-8; names differing only in
case or whitespace are one name to the model and are refused (:func:`floss.core.classes.class_key`)::

    road
    car: automobile, vehicle
    sky

Labels (optional, for evaluation): ``<labels>/<id>.png``, single-channel class ids ``0..K-1`` and 255 for ignored
pixels, where ``<id>`` is the image's path relative to the image folder without its extension.
"""
from __future__ import annotations

import codecs
import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from floss.core.classes import class_key
from floss.data.datasets.reader import IGNORE_INDEX, DatasetLayoutError, Sample, read_image, read_label
from floss.data.datasets.walk import scan_tree

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_SUFFIXES", "read_class_file", "FolderDataset", "open_folder"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _class_file_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 class file (a leading byte-order mark dropped); undecodable bytes name their line."""
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(f"{path}:{line}: expected UTF-8 text, found byte 0x{data[err.start]:02x} ({err.reason}); "
                         "save the class-names file as UTF-8") from None


def read_class_file(path: str | os.PathLike) -> list[tuple[str, ...]]:
    """Per class (file order), its names: the class name first, then its synonyms.

    UTF-8 (a byte-order mark is dropped). Two names with one :func:`floss.core.classes.class_key` (they differ only in
    case or whitespace, so the model sees one word) are refused with both lines.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--classes: class-names file {path} does not exist (one class per line, "
                                "optional synonyms as 'name: syn1, syn2')")
    groups, seen = [], {}
    for number, line in enumerate(_class_file_lines(path), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition(":")
        names = (name.strip(), *(s.strip() for s in rest.split(",") if s.strip()))
        if not names[0]:
            raise ValueError(f"{path}:{number}: expected a class name before ':', received {line!r}")
        for n in names:
            key = class_key(n)
            if key in seen:
                first, first_name = seen[key]
                same = "" if first_name == n else f" as {first_name!r} (names differing only in case or " \
                    "whitespace are one class)"
                raise ValueError(f"{path}:{number}: name {n!r} is already used on line {first}{same}")
            seen[key] = number, n
        groups.append(names)
    if len(groups) < 2:
        raise ValueError(f"{path}: expected at least two classes (one per line), found {len(groups)}")
    if len(groups) > 255:
        raise ValueError(f"{path}: at most 255 classes fit uint8 labels with 255 = ignore, found {len(groups)}")
    return groups


class FolderDataset:
    """The images of a folder, read lazily, with the interface of :class:`floss.data.datasets.reader.SegDataset`."""

    split = "images"

    def __init__(self, images: Path, groups: Sequence[tuple[str, ...]], ids: Sequence[str],
                 suffixes: dict[str, str], labels: Path | None = None):
        self.root, self.groups, self._ids, self._suffix, self.labels_dir = images, list(groups), tuple(ids), \
            dict(suffixes), labels
        self.labels = labels is not None

    name = "folder"

    @property
    def ids(self) -> tuple[str, ...]:
        return self._ids

    @property
    def num_classes(self) -> int:
        return len(self.groups)

    @property
    def class_names(self) -> list[str]:
        return [g[0] for g in self.groups]

    def query_names(self) -> tuple[list[str], list[int]]:
        """``(queries, query_to_class)``: every name and synonym, and its class."""
        queries, q2c = [], []
        for k, group in enumerate(self.groups):
            queries += list(group)
            q2c += [k] * len(group)
        return queries, q2c

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return f"FolderDataset(images={str(self.root)!r}, images={len(self)}, classes={self.num_classes}, " \
               f"labels={str(self.labels_dir) if self.labels else None!r})"

    def image_path(self, i: int) -> Path:
        image_id = self._ids[i]
        return self.root / (image_id + self._suffix[image_id])

    def __getitem__(self, i: int) -> Sample:
        image_id = self._ids[i]
        image = read_image(self.image_path(i))
        label = None
        if self.labels:
            path = self.labels_dir / f"{image_id}.png"
            label = read_label(path)
            if label.shape != image.shape[:2]:
                raise ValueError(f"label file {path} has size {label.shape} (H, W) but its image "
                                 f"{self.image_path(i)} has size {image.shape[:2]}")
            bad = (label >= self.num_classes) & (label != IGNORE_INDEX)
            if bad.any():
                raise ValueError(f"label file {path}: expected class ids 0..{self.num_classes - 1} (the class-names "
                                 f"file's lines) or {IGNORE_INDEX}, received {np.unique(label[bad])[:10].tolist()}")
        return Sample(image_id, image, label)

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def subset(self, ids: Sequence[str]) -> "FolderDataset":
        known = set(self._ids)
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise KeyError(f"subset: {len(unknown)} id(s) not in {self.root}, e.g. {unknown[:3]}")
        return FolderDataset(self.root, self.groups, list(ids), self._suffix, self.labels_dir)


def open_folder(images: str | os.PathLike, classes: str | os.PathLike,
                labels: str | os.PathLike | None = None) -> FolderDataset:
    """Scan ``images`` (recursively) and read ``classes``; with ``labels``, every image needs ``<id>.png`` there."""
    images = Path(images)
    if not images.is_dir():
        raise DatasetLayoutError(f"--images: {images} is not a folder of images")
    groups = read_class_file(classes)
    suffixes: dict[str, str] = {}
    for rel in scan_tree(images, lambda f: os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES, what="--images"):
        image_id, ext = os.path.splitext(rel)
        if image_id in suffixes:
            raise DatasetLayoutError(f"--images: two images share the id {image_id!r} "
                                     f"({suffixes[image_id]} and {ext}) in {images / os.path.dirname(rel)}")
        suffixes[image_id] = ext
    if not suffixes:
        raise DatasetLayoutError(f"--images: found no images ({', '.join(IMAGE_SUFFIXES)}) under {images}")
    ids = sorted(suffixes)
    labels_dir = None
    if labels is not None:
        labels_dir = Path(labels)
        if not labels_dir.is_dir():
            raise DatasetLayoutError(f"--labels: {labels_dir} is not a folder of label PNGs")
        missing = [i for i in ids if not (labels_dir / f"{i}.png").is_file()]
        if missing:
            raise DatasetLayoutError(f"--labels: {len(missing)} of {len(ids)} images have no label, e.g. "
                                     + ", ".join(str(labels_dir / f"{m}.png") for m in missing[:3]))
    logger.info("folder %s: %d images, %d classes%s", images, len(ids), len(groups),
                f", labels in {labels_dir}" if labels_dir else "")
    return FolderDataset(images, groups, ids, suffixes, labels_dir)
