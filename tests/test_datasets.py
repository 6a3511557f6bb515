"""Readers of floss.data.datasets on tiny datasets written in each real layout by tests/layouts.py."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from floss.data.datasets import (DATASETS, DatasetLayoutError, Sample, UnreadableFileError, available_datasets,
                            open_dataset, read_image, read_label)
from tests.layouts import (MAKERS, make_cityscapes, make_cocostuff, make_dataset, make_mapillary, make_pascalco59,
                           make_pascalvoc20, voc_palette, write_label)

SIZE = (32, 64)

# name -> (expected train ids, expected val ids) for make_dataset(name, root, 2, 2)
EXPECTED_IDS = {
    "cityscapes": (["aachen/aachen_000000_000019", "bochum/bochum_000001_000019"],
                   ["frankfurt/frankfurt_000000_000019", "lindau/lindau_000001_000019"]),
    "pascalvoc20": (["2007_000000", "2007_000001"], ["2007_000002", "2007_000003"]),
    "pascalco59": (["2008_000000", "2008_000001"], ["2008_000002", "2008_000003"]),
    "ade20k": (["ADE_train_00000001", "ADE_train_00000002"], ["ADE_val_00000001", "ADE_val_00000002"]),
    "cocostuff": (["000000000009", "000000000010"], ["000000000139", "000000000140"]),
    "bdd": (["0a000000-b0000000", "0a000001-b0000001"], ["7d000000-c0000000", "7d000001-c0000001"]),
    "mapillary": (None, ["000Xq7Tv_mapillary000", "001Xq7Tv_mapillary001"]),
    **{f"acdc_{c}": (["GOPR0351/GOPR0351_frame_000000", "GOPR0351/GOPR0351_frame_000001"],
                     ["GOPR0356/GOPR0356_frame_000000", "GOPR0356/GOPR0356_frame_000001"])
       for c in ("night", "fog", "rain", "snow")},
}


def raw_label(path) -> np.ndarray:
    return np.array(Image.open(path))


def test_every_registered_dataset_has_a_generator_and_expected_ids():
    assert set(MAKERS) == set(available_datasets()) == set(EXPECTED_IDS)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_reader_ids_pairs_shapes_and_labels(tmp_path, name):
    root = make_dataset(name, tmp_path / name, n_train=2, n_val=2, size=SIZE)
    layout = DATASETS[name]
    for split, want in zip(("train", "val"), EXPECTED_IDS[name]):
        if want is None:
            assert split not in layout.splits
            continue
        ds = open_dataset(name, root, split)
        assert (ds.name, ds.split, len(ds), ds.num_classes) == (name, split, 2, layout.num_classes)
        assert ds.ids == tuple(want)
        for i, sample in enumerate(ds):
            assert isinstance(sample, Sample) and sample.id == want[i]
            # pairing rule: <img_dir>/<id><img_suffix> <-> <label_dir>/<id><label_suffix>
            assert ds.image_path(i) == root / layout.splits[split].img_dir / (want[i] + layout.img_suffix)
            assert ds.label_path(i) == root / layout.splits[split].label_dir / (want[i] + layout.label_suffix)
            assert sample.image.dtype == np.uint8 and sample.image.shape == (*SIZE, 3)
            assert sample.label.dtype == np.uint8 and sample.label.shape == SIZE
            # RGB order survives the BGR decode (generated images have R ~ 200 > G ~ 110 > B ~ 35)
            means = sample.image.reshape(-1, 3).mean(0)
            assert means[0] > means[1] > means[2]
            raw = raw_label(ds.label_path(i))
            if layout.reduce_zero_label:
                want_label = np.where(raw == 0, 255, np.where(raw == 255, 255, raw.astype(np.int64) - 1))
            else:
                want_label = raw
            np.testing.assert_array_equal(sample.label, want_label)
            valid = sample.label[sample.label != 255]
            assert valid.size and valid.max() < layout.num_classes


def test_png_images_are_exactly_the_stored_rgb(tmp_path):
    root = make_cityscapes(tmp_path / "cs", 1, 1, SIZE)
    ds = open_dataset("cityscapes", root, "val")
    expected = np.array(Image.open(ds.image_path(0)).convert("RGB"))
    np.testing.assert_array_equal(ds[0].image, expected)
    np.testing.assert_array_equal(read_image(ds.image_path(0)), expected)


def test_reduce_zero_label_mapping_is_exact(tmp_path):
    path = tmp_path / "l.png"
    stored = np.array([[0, 1, 2, 20], [59, 150, 254, 255]], dtype=np.uint8)
    write_label(path, stored)
    np.testing.assert_array_equal(read_label(path, reduce_zero_label=True),
                                  [[255, 0, 1, 19], [58, 149, 253, 255]])
    np.testing.assert_array_equal(read_label(path), stored)


def test_palette_png_reads_indices_not_colours(tmp_path):
    path = tmp_path / "p.png"
    stored = np.array([[0, 1, 15], [20, 255, 7]], dtype=np.uint8)
    write_label(path, stored, palette=True)
    assert Image.open(path).mode == "P"
    np.testing.assert_array_equal(read_label(path), stored)
    # the VOC reader on a palette label: index 15 (person, pink in the palette) -> class 14
    assert voc_palette()[15 * 3: 15 * 3 + 3] == [192, 128, 128]
    np.testing.assert_array_equal(read_label(path, True), [[255, 0, 14], [19, 255, 6]])


def test_colour_label_is_rejected(tmp_path):
    path = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)
    with pytest.raises(ValueError, match=r"rgb.png.*single-channel.*mode 'RGB'"):
        read_label(path)


def test_voc_uses_the_split_file_not_every_jpeg(tmp_path):
    root = make_pascalvoc20(tmp_path / "VOC2012", 2, 2, SIZE)
    assert (root / "JPEGImages/2012_999999.jpg").exists()  # in no segmentation split
    ids = open_dataset("pascalvoc20", root, "train").ids + open_dataset("pascalvoc20", root, "val").ids
    assert "2012_999999" not in ids and len(ids) == 4


def test_lazy_open_labels_false_limit_and_subset(tmp_path):
    root = make_cityscapes(tmp_path / "cs", 2, 3, SIZE)
    img = root / "leftImg8bit/val/lindau/lindau_000001_000019_leftImg8bit.png"  # the last id in mmseg order
    img.write_bytes(b"not an image")  # nothing is decoded at open
    ds = open_dataset("cityscapes", root, "val")
    assert len(ds) == 3 and ds[0].label is not None
    images_only = open_dataset("cityscapes", root, "val", labels=False)
    assert images_only[0].label is None and images_only.label_path(0) is None
    assert open_dataset("cityscapes", root, "val", limit=2).ids == ds.ids[:2]
    assert ds.limit(0).ids == () and ds.limit(None) is ds
    sub = ds.subset([ds.ids[2], ds.ids[0]])
    assert sub.ids == (ds.ids[2], ds.ids[0])
    np.testing.assert_array_equal(sub[1].label, ds[0].label)
    assert ds.image_path(-1) == img
    with pytest.raises(UnreadableFileError):
        ds[-1]
    with pytest.raises(IndexError, match="out of range"):
        ds[3]
    with pytest.raises(KeyError, match="nope"):
        ds.subset(["nope"])
    with pytest.raises(ValueError, match="repeated"):
        ds.subset([ds.ids[0], ds.ids[0]])
    with pytest.raises(ValueError, match="limit"):
        ds.limit(-1)


def test_unreadable_image_names_the_file(tmp_path):
    root = make_cityscapes(tmp_path / "cs", 1, 2, SIZE)
    ds = open_dataset("cityscapes", root, "val")
    ds.image_path(1).write_bytes(b"\x00garbage" * 10)
    ds[0]
    with pytest.raises(UnreadableFileError, match=str(ds.image_path(1))):
        ds[1]
    ds.image_path(0).write_bytes(b"")
    with pytest.raises(UnreadableFileError, match="0 bytes"):
        ds[0]


def test_unreadable_or_deleted_label_names_the_file(tmp_path):
    root = make_cityscapes(tmp_path / "cs", 1, 2, SIZE)
    ds = open_dataset("cityscapes", root, "val")
    ds.label_path(0).write_bytes(b"garbage")
    with pytest.raises(UnreadableFileError, match=str(ds.label_path(0))):
        ds[0]
    ds.label_path(1).unlink()
    with pytest.raises(FileNotFoundError, match=str(ds.label_path(1))):
        ds[1]


def test_label_with_wrong_values_or_size_names_the_file(tmp_path):
    root = make_cityscapes(tmp_path / "cs", 1, 2, SIZE)
    ds = open_dataset("cityscapes", root, "val")
    write_label(ds.label_path(0), np.full(SIZE, 33, np.uint8))  # a raw labelId copied over the train ids
    with pytest.raises(ValueError, match=r"0\.\.18 or 255.*\[33\].*cityscapes\.py"):
        ds[0]
    assert open_dataset("cityscapes", root, "val", check_labels=False)[0].label.max() == 33
    write_label(ds.label_path(1), np.zeros((16, 64), np.uint8))
    with pytest.raises(ValueError, match=r"size \(16, 64\).*\(32, 64\)"):
        ds[1]


def test_missing_root(tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"'cityscapes'.*does not exist.*leftImg8bit/val/<id>_leftImg8bit"):
        open_dataset("cityscapes", tmp_path / "nowhere", "val")


def test_missing_split_folder_and_parent_root_hint(tmp_path):
    root = make_cityscapes(tmp_path / "data" / "cityscapes", 2, 0, SIZE)
    with pytest.raises(DatasetLayoutError, match=r"image folder .*leftImg8bit/val does not exist"):
        open_dataset("cityscapes", root, "val")
    with pytest.raises(DatasetLayoutError, match=r"did you mean root=.*data/cityscapes\?"):
        open_dataset("cityscapes", tmp_path / "data", "train")


def test_missing_cityscapes_train_ids_names_the_conversion(tmp_path):
    root = make_cityscapes(tmp_path / "cs", 2, 3, SIZE, converted=False)
    with pytest.raises(DatasetLayoutError) as err:
        open_dataset("cityscapes", root, "val")
    msg = str(err.value)
    assert "found 3 images but 0 labels" in msg
    assert "_gtFine_labelIds.png" in msg and "tools/convert_datasets/cityscapes.py" in msg
    assert "frankfurt_000000_000019_gtFine_labelTrainIds.png" in msg
    # images only: no labels needed
    assert len(open_dataset("cityscapes", root, "val", labels=False)) == 3


def test_one_missing_label_fails_at_open(tmp_path):
    root = make_cityscapes(tmp_path / "cs", 1, 3, SIZE)
    (root / "gtFine/val/lindau/lindau_000001_000019_gtFine_labelTrainIds.png").unlink()
    with pytest.raises(DatasetLayoutError, match=r"found 3 images but 2 labels.*lindau_000001_000019_gtFine"):
        open_dataset("cityscapes", root, "val")


def test_raw_cocostuff_names_coco_stuff164k(tmp_path):
    root = make_cocostuff(tmp_path / "coco", 1, 2, SIZE, converted=False)
    with pytest.raises(DatasetLayoutError, match=r"found 2 images but 0 labels.*raw \*\.png.*coco_stuff164k\.py"):
        open_dataset("cocostuff", root, "val")


def test_unconverted_pascal_context_names_pascal_context_py(tmp_path):
    root = make_pascalco59(tmp_path / "VOC2010", 1, 1, SIZE, converted=False)
    with pytest.raises(DatasetLayoutError, match=r"SegmentationContext/val\.txt does not exist.*pascal_context\.py"):
        open_dataset("pascalco59", root, "val")


def test_voc_split_file_listing_a_missing_image(tmp_path):
    root = make_pascalvoc20(tmp_path / "VOC2012", 1, 2, SIZE)
    (root / "JPEGImages/2007_000002.jpg").unlink()
    with pytest.raises(DatasetLayoutError, match=r"lists 2 ids but 1 image\(s\) are missing.*2007_000002\.jpg"):
        open_dataset("pascalvoc20", root, "val")


def test_unhalved_mapillary_names_the_resize_step(tmp_path):
    root = make_mapillary(tmp_path / "mapillary", n_val=1, size=SIZE, converted=False)
    with pytest.raises(DatasetLayoutError, match=r"half/val_img does not exist.*mapillary_resize\.py"):
        open_dataset("mapillary", root, "val")


def test_empty_image_folder(tmp_path):
    (tmp_path / "bdd/images/10k/val").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match=r"found no \*\.jpg images"):
        open_dataset("bdd", tmp_path / "bdd", "val")


def test_unknown_dataset_and_split(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'kitti'.*cityscapes.*mapillary"):
        open_dataset("kitti", tmp_path, "val")
    with pytest.raises(ValueError, match=r"unknown split 'test'.*train, val"):
        open_dataset("cityscapes", tmp_path, "test")
    with pytest.raises(ValueError, match=r"unknown split 'train'.*available splits: val"):
        open_dataset("mapillary", tmp_path, "train")


def test_aliases_resolve_to_canonical_names(tmp_path):
    root = make_dataset("bdd", tmp_path / "bdd", 1, 1, SIZE)
    assert open_dataset("bdd10k", root, "val").name == "bdd"


def test_partial_copy_is_logged(tmp_path, caplog):
    root = make_cityscapes(tmp_path / "cs", 1, 1, SIZE)
    with caplog.at_level(logging.WARNING, logger="floss.data.datasets.reader"):
        open_dataset("cityscapes", root, "val")
    assert "has 1 images; the full split has 500" in caplog.text


def test_class_names_come_from_floss_classes(tmp_path):
    classes = pytest.importorskip("floss.core.classes")
    root = make_dataset("acdc_fog", tmp_path / "acdc", 1, 1, SIZE)
    ds = open_dataset("fog-acdc", root, "val")
    assert set(available_datasets()) == set(classes.DATASETS)  # one naming across the project
    assert ds.name == "acdc_fog"
    assert ds.class_names == list(classes.CLASS_NAMES["cityscapes"]) and len(ds.class_names) == 19
