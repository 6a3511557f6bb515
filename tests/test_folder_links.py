"""Symbolic links in image folders and dataset layouts: followed at most once per real folder and real file (no
duplicates, no loops), broken image links refused by name; own-image folders and dataset layouts share the walk."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from floss.data.datasets import open_dataset
from floss.data.datasets.folder import open_folder
from floss.data.datasets.walk import BrokenLinkError, scan_tree
from layouts import make_dataset, random_image, write_image

IMAGES = ("2024/a.png", "2024/b.jpg", "2024/deep/c.png", "top.png")


def _is_image(name: str) -> bool:
    return name.endswith((".png", ".jpg"))


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for rel in IMAGES:
        write_image(root / rel, random_image(rng, (8, 8)))
    (root / "notes.txt").write_text("not an image\n")
    (tmp_path / "classes.txt").write_text("road\ncar\n")
    return root


def _ids(root):
    return open_folder(root, root.parent / "classes.txt").ids


def test_no_links_lists_every_image_once_in_sorted_order(tree):
    assert scan_tree(tree, _is_image) == sorted(IMAGES)
    assert _ids(tree) == ("2024/a", "2024/b", "2024/deep/c", "top")


def test_latest_link_adds_no_duplicates(tree):
    os.symlink("2024", tree / "latest")
    assert scan_tree(tree, _is_image) == sorted(IMAGES)
    assert _ids(tree) == ("2024/a", "2024/b", "2024/deep/c", "top")


def test_link_sorting_before_its_target_keeps_the_direct_path(tree):
    os.symlink("2024", tree / "0-latest")     # visited first in name order, yet the real path wins
    assert scan_tree(tree, _is_image) == sorted(IMAGES)


def test_self_link_does_not_explode(tree):
    os.symlink(".", tree / "self")
    os.symlink("..", tree / "2024" / "up")
    assert _ids(tree) == ("2024/a", "2024/b", "2024/deep/c", "top")


def test_mutually_recursive_links_terminate(tmp_path):
    root = tmp_path / "root"
    rng = np.random.default_rng(1)
    write_image(root / "x" / "one.png", random_image(rng, (8, 8)))
    write_image(root / "y" / "two.png", random_image(rng, (8, 8)))
    os.symlink("../y", root / "x" / "to_y")
    os.symlink("../x", root / "y" / "to_x")
    # a pair of links to each other's parents outside the root
    outside = tmp_path / "outside"
    (outside / "p").mkdir(parents=True)
    (outside / "q").mkdir()
    write_image(outside / "p" / "three.png", random_image(rng, (8, 8)))
    os.symlink(outside / "q", outside / "p" / "q_link")
    os.symlink(outside / "p", outside / "q" / "p_link")
    os.symlink(outside / "p", root / "ext")
    assert scan_tree(root, _is_image) == ["ext/three.png", "x/one.png", "y/two.png"]


def test_file_link_to_a_listed_image_is_skipped(tree):
    os.symlink("2024/a.png", tree / "alias.png")
    os.symlink(tree / "2024" / "deep" / "c.png", tree / "2024" / "c_again.png")
    assert scan_tree(tree, _is_image) == sorted(IMAGES)


def test_file_link_to_an_image_outside_is_listed_once(tree, tmp_path):
    write_image(tmp_path / "elsewhere" / "e.png", random_image(np.random.default_rng(2), (8, 8)))
    os.symlink(tmp_path / "elsewhere" / "e.png", tree / "e1.png")
    os.symlink(tmp_path / "elsewhere" / "e.png", tree / "e2.png")
    assert scan_tree(tree, _is_image) == sorted([*IMAGES, "e1.png"])


def test_link_to_a_folder_outside_the_root_is_followed_once(tree, tmp_path):
    write_image(tmp_path / "shared" / "s.png", random_image(np.random.default_rng(3), (8, 8)))
    os.symlink(tmp_path / "shared", tree / "shared1")
    os.symlink(tmp_path / "shared", tree / "2024" / "shared2")
    assert scan_tree(tree, _is_image) == ["2024/a.png", "2024/b.jpg", "2024/deep/c.png", "shared1/s.png",
                                          "top.png"]


def test_broken_image_link_is_refused_by_name(tree):
    os.symlink("gone.png", tree / "2024" / "dangling.png")
    with pytest.raises(BrokenLinkError, match=r"--images: broken symbolic link .*2024/dangling\.png -> gone\.png"):
        _ids(tree)


def test_link_loop_on_itself_named_like_an_image_is_refused(tree):
    os.symlink("loop.png", tree / "loop.png")
    with pytest.raises(BrokenLinkError, match=r"loop\.png -> loop\.png"):
        scan_tree(tree, _is_image, what="--images")


def test_other_broken_links_are_skipped_with_a_warning(tree, caplog):
    os.symlink("missing-folder", tree / "old")
    with caplog.at_level(logging.WARNING, logger="floss.data.datasets.walk"):
        assert scan_tree(tree, _is_image) == sorted(IMAGES)
    assert "broken symbolic link" in caplog.text and "old -> missing-folder" in caplog.text


def test_dataset_layout_reader_uses_the_same_walk(tmp_path):
    plain = make_dataset("cityscapes", tmp_path / "plain", n_train=0, n_val=4)
    linked = make_dataset("cityscapes", tmp_path / "linked", n_train=0, n_val=4)
    expected = open_dataset("cityscapes", plain, "val").ids
    val = linked / "leftImg8bit" / "val"
    os.symlink("frankfurt", val / "latest")
    os.symlink(".", val / "self")
    os.symlink("../../gtFine/val/lindau", linked / "gtFine" / "val" / "lindau" / "again")
    ds = open_dataset("cityscapes", linked, "val")
    assert ds.ids == expected and len(ds) == 4
    name = ds.ids[0].split("/")[1] + "_leftImg8bit.png"
    os.symlink("nowhere.png", val / "lindau" / ("x" + name))
    with pytest.raises(BrokenLinkError, match=r"broken symbolic link .*lindau/x.*_leftImg8bit\.png -> nowhere\.png"):
        open_dataset("cityscapes", linked, "val")

