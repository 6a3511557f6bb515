"""Templates (from open_clip) and class-name data (typed from the protocol) against the authors' files."""
import json

import pytest
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from floss.core.classes import (CLASS_NAMES, DATASETS, MODELS, RANKING_DATASETS, TRANSFER_DATASETS, class_names,
                           query_groups, query_names, ranking_keys, rankings_dataset)
from floss.util.paths import SHARED
from floss.core.templates import IMAGENET_TEMPLATES, NUM_TEMPLATES, check_template_ids, prompt

RANKINGS = SHARED / "reference" / "authors" / "rankings"


def _authors_keys(model, dataset):
    path = RANKINGS / model / f"template_rankings_{model}_{dataset}.json"
    if not path.is_file():
        pytest.skip(f"authors' rankings not available ({path})")
    return list(json.loads(path.read_text())["classes"])


def test_templates_are_open_clip_strings_in_order():
    assert len(IMAGENET_TEMPLATES) == NUM_TEMPLATES == 80
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)
    # ids of protocol Appendix A
    assert IMAGENET_TEMPLATES[0] == "a bad photo of a {}."
    assert IMAGENET_TEMPLATES[39] == "a photo of a {}."
    assert IMAGENET_TEMPLATES[73] == "itap of a {}."
    assert IMAGENET_TEMPLATES[79] == "a tattoo of the {}."
    for t, src in zip(IMAGENET_TEMPLATES, OPENAI_IMAGENET_TEMPLATES):
        assert t.format("road") == (src("road") if callable(src) else src.format("road"))


def test_prompt_and_errors():
    assert prompt(0, "road") == "a bad photo of a road."
    assert prompt(7, "bed ") == "a bad photo of the bed ."  # ADE's trailing space kept, as the authors
    for bad in (80, -1):
        with pytest.raises(ValueError, match="template_id"):
            prompt(bad, "road")
    for bad in (True, "3", 1.0):
        with pytest.raises(TypeError, match="template_id"):
            prompt(bad, "road")
    with pytest.raises(TypeError, match="class_name"):
        prompt(0, 3)
    with pytest.raises(ValueError, match="duplicates"):
        check_template_ids("experts[2]", [1, 2, 1])
    with pytest.raises(ValueError, match="experts"):
        check_template_ids("experts", [])


def test_class_counts_and_transfer_sets():
    assert {d: len(CLASS_NAMES[d]) for d in RANKING_DATASETS} == {
        "cityscapes": 19, "pascalvoc20": 20, "pascalco59": 59, "ade20k": 150, "cocostuff": 171}
    assert "bed " in CLASS_NAMES["ade20k"]
    assert all(len(set(CLASS_NAMES[d])) == len(CLASS_NAMES[d]) for d in DATASETS)
    for name in ("acdc_night", "acdc_fog", "acdc_rain", "acdc_snow", "bdd", "mapillary"):
        assert TRANSFER_DATASETS[name] == "cityscapes" == rankings_dataset(name)
        assert CLASS_NAMES[name] == CLASS_NAMES["cityscapes"]
        assert ranking_keys(name, "naclip") == ranking_keys("cityscapes", "naclip")
    copy = class_names("cityscapes")
    copy.append("x")
    assert len(CLASS_NAMES["cityscapes"]) == 19


@pytest.mark.parametrize("dataset", RANKING_DATASETS)
@pytest.mark.parametrize("model", ["maskclip", "clipdinoiser"])
def test_metainfo_names_equal_authors_json_keys(model, dataset):
    keys = _authors_keys(model, dataset)
    assert CLASS_NAMES[dataset] == keys == ranking_keys(dataset, model)
    queries, query_to_class = query_names(dataset, model)
    assert queries == keys and query_to_class == list(range(len(keys)))


@pytest.mark.parametrize("dataset", RANKING_DATASETS)
def test_naclip_keys_are_names_without_spaces(dataset):
    keys = _authors_keys("naclip", dataset)
    assert keys == [n.replace(" ", "") for n in CLASS_NAMES[dataset]] == ranking_keys(dataset, "naclip")
    # protocol §6: the number of names that differ from MaskCLIP's is the number containing a space
    differ = sum(a != b for a, b in zip(keys, CLASS_NAMES[dataset]))
    assert differ == {"cityscapes": 2, "pascalvoc20": 2, "pascalco59": 1, "ade20k": 16, "cocostuff": 15}[dataset]
    if dataset != "pascalvoc20":
        assert query_names(dataset, "naclip") == (keys, list(range(len(keys))))


def test_naclip_voc20_queries():
    queries, query_to_class = query_names("pascalvoc20", "naclip")
    assert len(queries) == 30 and len(query_to_class) == 30
    names = CLASS_NAMES["pascalvoc20"]
    by_class = {names[k]: [q for q, c in zip(queries, query_to_class) if c == k] for k in range(20)}
    assert by_class["boat"] == ["ship"] and by_class["dining table"] == ["table"]
    assert by_class["potted plant"] == ["pottedplant"]
    assert by_class["person"] == ["person", "person in shirt", "person in jeans", "person in dress",
                                  "person in sweater", "person in skirt", "person in jacket"]
    assert by_class["tvmonitor"] == ["television monitor", "tv monitor", "monitor", "television", "screen"]
    assert query_to_class == sorted(query_to_class)  # grouped in class order
    assert [len(g) for g in query_groups("pascalvoc20", "naclip")].count(1) == 18


def test_unknown_dataset_or_model_names_the_known_ones():
    with pytest.raises(ValueError, match="cityscapes.*cocostuff"):
        query_names("kitti", "maskclip")
    with pytest.raises(ValueError, match="maskclip, clipdinoiser, naclip"):
        ranking_keys("cityscapes", "segformer")
    with pytest.raises(TypeError, match="dataset"):
        class_names(3)
    assert MODELS == ("maskclip", "clipdinoiser", "naclip", "sclip", "clearclip", "gem", "resclip", "scclip", "gem_quoted")
    assert query_names("cityscapes", None)[0] == CLASS_NAMES["cityscapes"]
