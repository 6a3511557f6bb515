"""Class-names files: a byte-order mark is dropped, undecodable bytes name the file and line, names that the model
cannot tell apart (case, whitespace) are refused with both lines, and the one class key (floss.core.classes.class_key)
matches rankings to classes, so what ``rank`` writes for a class file ``segment`` accepts for it."""
from __future__ import annotations

import json
import unicodedata

import numpy as np
import pytest

from conftest import TINY_GELU
from floss import cli
from floss.core.classes import class_key, match_rankings_classes
from floss.data.datasets.folder import read_class_file
from floss.core.rankings import load_rankings, save_rankings
from floss.core.templates import NUM_TEMPLATES
from layouts import random_image, write_image

MODEL = ["--backbone", TINY_GELU, "--pretrained", "none", "--device", "cpu", "--workers", "0"]


def _write(tmp_path, data: bytes):
    path = tmp_path / "classes.txt"
    path.write_bytes(data)
    return path


def test_class_key():
    assert class_key("Traffic  Light") == class_key("traffic\tlight") == class_key("trafficlight") == "trafficlight"
    assert class_key("bed ") == "bed"
    assert class_key(unicodedata.normalize("NFD", "Café")) == class_key("café")


def test_byte_order_mark_is_dropped(tmp_path):
    path = _write(tmp_path, "road\nsky: heaven\n".encode("utf-8-sig"))
    assert read_class_file(path) == [("road",), ("sky", "heaven")]


def test_latin1_file_names_the_file_and_line(tmp_path):
    path = _write(tmp_path, "road\nsky\nStraße\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{tmp_path}/classes\.txt:3: expected UTF-8 text, found byte 0xdf"):
        read_class_file(path)


@pytest.mark.parametrize("text, message", [
    ("road\ncar\n# comment\nCar\n", r"classes\.txt:4: name 'Car' is already used on line 2 as 'car'"),
    ("traffic light\nsky\ntrafficlight\n",
     r"classes\.txt:3: name 'trafficlight' is already used on line 1 as 'traffic light'"),
    ("road\nsky: Road\n", r"classes\.txt:2: name 'Road' is already used on line 1 as 'road'"),
    ("road\nsky\n" + unicodedata.normalize("NFD", "café") + "\ncafé\n", r"classes\.txt:4: name 'café'"),
])
def test_names_the_model_cannot_tell_apart_are_refused(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        read_class_file(_write(tmp_path, text.encode()))


def _rankings(names):
    entries = [{"template_id": t, "entropy": float(t), "pixel_percentage": 1.0, "rank": t + 1}
               for t in range(NUM_TEMPLATES)]
    return {"model": "m", "dataset": "folder", "split": "images",
            "classes": {n: {"entropy_ranking": entries} for n in names}}


def test_rankings_written_for_a_class_file_match_it_back(tmp_path):
    path = _write(tmp_path, "Traffic Light\nsky: heaven\nroad  sign\n".encode("utf-8-sig"))
    names = [g[0] for g in read_class_file(path)]
    save_rankings(_rankings(names), tmp_path / "r.json")
    assert match_rankings_classes(load_rankings(tmp_path / "r.json"), names, "r.json") == names
    # the NACLIP spelling of the same classes, in another order, matches too
    assert match_rankings_classes(_rankings(["roadsign", "trafficlight", "sky"]), names, "x") == \
        ["trafficlight", "sky", "roadsign"]


def test_ambiguous_rankings_are_refused():
    with pytest.raises(ValueError, match="'traffic light' and 'trafficlight' are one class"):
        match_rankings_classes(_rankings(["traffic light", "trafficlight", "sky"]), ["traffic light", "sky"], "x")


def test_rank_then_segment_accepts_its_own_rankings(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        write_image(tmp_path / "images" / f"{name}.png", random_image(rng, (32, 48)))
    classes = _write(tmp_path, "\ufeffTraffic Light\nroad  sign\nsky\n".encode())
    src = ["--images", str(tmp_path / "images"), "--classes", str(classes)]
    assert cli.main(["rank", "--model", "maskclip", *src, *MODEL, "--out", str(tmp_path / "r.json")]) == 0
    assert list(json.loads((tmp_path / "r.json").read_text())["classes"]) == ["Traffic Light", "road  sign", "sky"]
    assert cli.main(["segment", "--model", "maskclip", *src, *MODEL, "--rankings", str(tmp_path / "r.json"),
                     "--out", str(tmp_path / "masks")]) == 0
    bad = _write(tmp_path, b"traffic light\nsky\ntrafficlight\n")
    assert cli.main(["rank", "--model", "maskclip", "--images", str(tmp_path / "images"), "--classes", str(bad),
                     *MODEL, "--out", str(tmp_path / "r2.json")]) == 2
    assert not (tmp_path / "r2.json").exists()
