"""The on-disk layouts of the datasets the FLOSS authors evaluate on (mmsegmentation conventions).

Every dataset is described by a :class:`Layout`: where the images and labels of each split live relative to
the dataset root, the suffix pairing rule, the label reduction and the conversion step that produces the
labels. The readers in :mod:`floss.data.datasets.reader` only interpret these records, so adding a dataset is one
entry in :data:`DATASETS`.

Pairing rule (as mmseg's ``BaseSegDataset``): an image file ``<img_dir>/<id><img_suffix>`` is paired with the
label file ``<label_dir>/<id><label_suffix>``, where ``<id>`` is the image path relative to ``<img_dir>`` with
the suffix removed (it may contain a sub-folder, e.g. ``aachen/aachen_000000_000019``). Datasets with a split
file (VOC, PASCAL-Context) list the ids, one per line, instead of scanning ``<img_dir>``.

=============  =====================================================  =====================================
dataset        image -> label                                         labels / reduction
=============  =====================================================  =====================================
cityscapes     ``leftImg8bit/{s}/<city>/<n>_leftImg8bit.png``         ``gtFine/{s}/<city>/<n>_gtFine_
                                                                      labelTrainIds.png`` 0..18, 255
pascalvoc20    ``JPEGImages/<id>.jpg`` (ids from                      ``SegmentationClass/<id>.png``
               ``ImageSets/Segmentation/{s}.txt``)                    (palette), reduce_zero_label
pascalco59     ``JPEGImages/<id>.jpg`` (ids from                      ``SegmentationClassContext/<id>.png``,
               ``ImageSets/SegmentationContext/{s}.txt``)             reduce_zero_label
ade20k         ``images/{training,validation}/<id>.jpg``              ``annotations/.../<id>.png``,
                                                                      reduce_zero_label
cocostuff      ``images/{train2017,val2017}/<id>.jpg``                ``annotations/.../<id>_labelTrainIds
                                                                      .png`` 0..170, 255
acdc_<cond>    ``rgb_anon/<cond>/{s}/<seq>/<n>_rgb_anon.png``         ``gt/<cond>/{s}/<seq>/<n>_gt_
                                                                      labelTrainIds.png``
bdd            ``images/10k/{s}/<id>.jpg``                            ``labels/sem_seg/masks/{s}/<id>.png``
mapillary      ``half/val_img/<id>.jpg`` (val only)                   ``half/val_label/<id>.png``
=============  =====================================================  =====================================

reduce_zero_label (mmseg ``LoadAnnotations``): 0 -> 255, k -> k-1 for 1..254, 255 stays 255.
BDD, ACDC and Mapillary have no class names of their own: the authors use the Cityscapes names (and the
Cityscapes rankings) for them, so their ``class_source`` is ``cityscapes``.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SplitDirs:
    """Folders of one split, relative to the dataset root."""

    img_dir: str
    label_dir: str
    #: a file listing the ids (one per line); ``None``: scan ``img_dir`` recursively for ``img_suffix``
    split_file: str | None = None


@dataclass(frozen=True)
class Layout:
    """How one dataset is stored on disk and how its labels are read."""

    name: str
    description: str
    num_classes: int
    #: key of :data:`floss.core.classes.CLASS_NAMES` holding the class names
    class_source: str
    splits: dict[str, SplitDirs]
    img_suffix: str
    label_suffix: str
    reduce_zero_label: bool
    #: the step that produces the label files this reader expects (named in every "labels missing" error)
    conversion: str
    #: label-like files that mean "raw, not converted yet" (e.g. Cityscapes ``_gtFine_labelIds.png``)
    raw_label_suffixes: tuple[str, ...] = ()
    #: what the root folder is usually called (used to suggest a better root)
    root_hint: str = ""
    #: True when the image folders themselves are written by ``conversion`` (Mapillary's half-resolution copy)
    images_from_conversion: bool = False
    #: the number of images of each split in the full dataset (logged when a copy differs; never enforced)
    expected_counts: dict[str, int] = field(default_factory=dict)

    def expected_files(self, split: str) -> str:
        """The two path patterns (image, label) of ``split`` relative to the root, for error messages."""
        d = self.splits[split]
        source = f" (ids listed in {d.split_file})" if d.split_file else ""
        return (f"images {d.img_dir}/<id>{self.img_suffix}{source}, "
                f"labels {d.label_dir}/<id>{self.label_suffix}")


_CITYSCAPES_CONVERSION = ("mmsegmentation's tools/convert_datasets/cityscapes.py <root> (writes "
                          "*_gtFine_labelTrainIds.png beside the *_gtFine_labelIds.png of gtFine/)")


def _acdc(condition: str) -> Layout:
    return Layout(
        name=f"acdc_{condition}",
        description=f"ACDC {condition} (Cityscapes train ids; Cityscapes class names)",
        num_classes=19, class_source="cityscapes",
        splits={s: SplitDirs(f"rgb_anon/{condition}/{s}", f"gt/{condition}/{s}") for s in ("train", "val")},
        img_suffix="_rgb_anon.png", label_suffix="_gt_labelTrainIds.png", reduce_zero_label=False,
        conversion=("the *_gt_labelTrainIds.png files of ACDC's gt_trainval.zip (acdc.vision.ee.ethz.ch), "
                    "unpacked beside rgb_anon/ (gt/<condition>/<split>/<sequence>/)"),
        raw_label_suffixes=("_gt_labelIds.png", "_gt_labelColor.png"), root_hint="acdc",
        expected_counts={"val": {"night": 106, "fog": 100, "rain": 100, "snow": 100}[condition]})


DATASETS: dict[str, Layout] = {layout.name: layout for layout in [
    Layout(
        name="cityscapes", description="Cityscapes fine annotations, 19 train ids",
        num_classes=19, class_source="cityscapes",
        splits={s: SplitDirs(f"leftImg8bit/{s}", f"gtFine/{s}") for s in ("train", "val")},
        img_suffix="_leftImg8bit.png", label_suffix="_gtFine_labelTrainIds.png", reduce_zero_label=False,
        conversion=_CITYSCAPES_CONVERSION,
        raw_label_suffixes=("_gtFine_labelIds.png", "_gtFine_color.png", "_gtFine_polygons.json"),
        root_hint="cityscapes", expected_counts={"train": 2975, "val": 500}),
    Layout(
        name="pascalvoc20", description="PASCAL VOC 2012 segmentation without background, 20 classes",
        num_classes=20, class_source="pascalvoc20",
        splits={s: SplitDirs("JPEGImages", "SegmentationClass", f"ImageSets/Segmentation/{s}.txt")
                for s in ("train", "val")},
        img_suffix=".jpg", label_suffix=".png", reduce_zero_label=True,
        conversion=("the VOC2012 release (VOCtrainval_11-May-2012.tar): SegmentationClass/ holds palette PNGs "
                    "whose indices are the labels"),
        root_hint="VOCdevkit/VOC2012", expected_counts={"train": 1464, "val": 1449}),
    Layout(
        name="pascalco59", description="PASCAL-Context 59 classes (VOC2010 images)",
        num_classes=59, class_source="pascalco59",
        splits={s: SplitDirs("JPEGImages", "SegmentationClassContext", f"ImageSets/SegmentationContext/{s}.txt")
                for s in ("train", "val")},
        img_suffix=".jpg", label_suffix=".png", reduce_zero_label=True,
        conversion=("mmsegmentation's tools/convert_datasets/pascal_context.py <VOCdevkit> "
                    "<trainval_merged.json> (Detail API; writes VOC2010/SegmentationClassContext and "
                    "ImageSets/SegmentationContext)"),
        root_hint="VOCdevkit/VOC2010", expected_counts={"train": 4996, "val": 5104}),
    Layout(
        name="ade20k", description="ADE20K SceneParsing, 150 classes",
        num_classes=150, class_source="ade20k",
        splits={"train": SplitDirs("images/training", "annotations/training"),
                "val": SplitDirs("images/validation", "annotations/validation")},
        img_suffix=".jpg", label_suffix=".png", reduce_zero_label=True,
        conversion="the ADEChallengeData2016.zip release (annotations/ ships with the images)",
        root_hint="ADEChallengeData2016", expected_counts={"train": 20210, "val": 2000}),
    Layout(
        name="cocostuff", description="COCO-Stuff 164k, 171 train ids",
        num_classes=171, class_source="cocostuff",
        splits={"train": SplitDirs("images/train2017", "annotations/train2017"),
                "val": SplitDirs("images/val2017", "annotations/val2017")},
        img_suffix=".jpg", label_suffix="_labelTrainIds.png", reduce_zero_label=False,
        conversion=("mmsegmentation's tools/convert_datasets/coco_stuff164k.py <coco_stuff164k> (maps the 182 "
                    "COCO ids of stuffthingmaps_trainval2017 to *_labelTrainIds.png, 0..170 and 255)"),
        raw_label_suffixes=(".png",), root_hint="coco_stuff164k",
        expected_counts={"train": 118287, "val": 5000}),
    *[_acdc(c) for c in ("night", "fog", "rain", "snow")],
    Layout(
        name="bdd", description="BDD100K semantic segmentation (10k images, Cityscapes train ids)",
        num_classes=19, class_source="cityscapes",
        splits={s: SplitDirs(f"images/10k/{s}", f"labels/sem_seg/masks/{s}") for s in ("train", "val")},
        img_suffix=".jpg", label_suffix=".png", reduce_zero_label=False,
        conversion=("bdd100k_sem_seg_labels_trainval.zip unpacked into labels/ (labels/sem_seg/masks holds the "
                    "train-id PNGs; labels/sem_seg/colormaps are colour images and cannot be used)"),
        root_hint="bdd100k", expected_counts={"val": 1000}),
    Layout(
        name="mapillary", description="Mapillary Vistas v1.2 val mapped to Cityscapes train ids, half resolution",
        num_classes=19, class_source="cityscapes",
        splits={"val": SplitDirs("half/val_img", "half/val_label")},
        img_suffix=".jpg", label_suffix=".png", reduce_zero_label=False,
        conversion=("mapillary2cityscape.py (v1.2 labels -> 19 Cityscapes train ids) then mapillary_resize.py "
                    "(halves validation/: images bicubic into half/val_img, labels nearest into half/val_label)"),
        images_from_conversion=True, root_hint="mapillary", expected_counts={"val": 2000}),
]}

#: other spellings accepted by :func:`resolve_name` (the authors' README says ``bdd10k``; their configs
#: are named ``night-acdc`` etc.). Canonical names are those of :data:`floss.core.classes.DATASETS`.
ALIASES: dict[str, str] = {
    "bdd10k": "bdd", "bdd100k": "bdd",
    **{f"{c}-acdc": f"acdc_{c}" for c in ("night", "fog", "rain", "snow")},
    **{f"acdc-{c}": f"acdc_{c}" for c in ("night", "fog", "rain", "snow")},
    "voc20": "pascalvoc20", "pc59": "pascalco59", "ade": "ade20k", "coco-stuff": "cocostuff",
}


def available_datasets() -> tuple[str, ...]:
    """The canonical dataset names, in registry order."""
    return tuple(DATASETS)


def resolve_name(name: str) -> str:
    """Return the canonical name of ``name`` (an entry of :data:`DATASETS` or an alias); raise otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"dataset name: expected a str, received {type(name).__name__}")
    if name in DATASETS:
        return name
    if name in ALIASES:
        return ALIASES[name]
    raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)} "
                     f"(aliases: {', '.join(sorted(ALIASES))})")


def get_layout(name: str) -> Layout:
    """The :class:`Layout` of a dataset name or alias."""
    return DATASETS[resolve_name(name)]
