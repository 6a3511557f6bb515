"""Any template set: the file format, the expert rule and its fallback for any M (CLIP's 7-template ensemble, a
generated 300-template set, M = 1), rankings that record their template texts (CLIP's 80: the authors' schema,
unchanged), keys that change with the template set (text embeddings, feature cache, rank checkpoint), and the
command line's ``--templates`` for rank, extract, evaluate and segment on a tiny random model."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

import floss
from conftest import TINY_GELU
from floss import cli
from floss.core.rankings import (check_rankings_templates, load_rankings, rankings_templates, save_rankings,
                                 select_experts, validate_rankings, with_templates)
from floss.core.stats import TemplateStats
from floss.core.templates import (DEFAULT_TEMPLATES, IMAGENET_TEMPLATES, TemplateSet, load_templates,
                                  templates_key)
from floss.core.text import expert_classifiers, template_embeddings, averaged_classifier

#: CLIP's 7-template ensemble (the "prompt engineering" notebook of the CLIP repository)
CLIP7 = ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
         "a {} in a video game.", "art of the {}.", "a photo of the small {}."]
GENERATED = [f"a photo number {i} of a {{}}." for i in range(300)]
NAMES = ["road", "car", "sky"]
MODEL = ["--backbone", TINY_GELU, "--pretrained", "none", "--device", "cpu", "--workers", "0"]


def _stats(m: int, k: int = 3, never: int | None = None, seed: int = 0) -> TemplateStats:
    """Statistics of ``m`` templates over a few random images; class ``never`` is predicted by no template."""
    g = torch.Generator().manual_seed(seed)
    st = TemplateStats(m, k)
    for _ in range(3):
        logits = 3 * torch.randn(m, k, 6, 8, generator=g)
        if never is not None:
            logits[:, never] = -100.0
        st.update(logits.softmax(dim=1), size=(12, 16))
    return st


# ------------------------------------------------------------------------------------------------ the file
def test_template_file_format(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_bytes(("\ufeff# my templates\n\n  a photo of a {}.  \r\nart of the {}.\n   # indented comment\n"
                      "a {} in a vídeo game.\n").encode("utf-8"))
    ts = load_templates(path)
    assert isinstance(ts, TemplateSet) and list(ts) == ["a photo of a {}.", "art of the {}.", "a {} in a vídeo game."]
    assert ts.prompt(2, "car") == "a car in a vídeo game." and ts.source == str(path)
    assert not ts.is_default and templates_key(ts) == ts.digest and ts.digest.startswith("sha256:")
    assert load_templates(None) is DEFAULT_TEMPLATES and DEFAULT_TEMPLATES.is_default
    assert DEFAULT_TEMPLATES == IMAGENET_TEMPLATES and len(DEFAULT_TEMPLATES) == 80 and templates_key(None) is None
    assert TemplateSet(list(reversed(IMAGENET_TEMPLATES))).is_default is False
    assert TemplateSet(CLIP7).digest != TemplateSet(CLIP7[::-1]).digest        # the order is the ids: keyed
    assert floss.load_templates(path) == ts


@pytest.mark.parametrize("body, match", [
    ("a photo of a {}.\nno placeholder\n", r"bad.txt:2: expected exactly one '\{\}'"),
    ("# c\n\na {} and a {}.\n", r"bad.txt:3: expected exactly one '\{\}'"),
    ("a {0} photo.\n", r"bad.txt:1: expected exactly one '\{\}'"),
    ("a {}.\nthe {}.\n\na {}.\n", r"bad.txt:4: expected distinct templates, received 'a \{\}.' again \(first on "
                                  r"line 1\)"),
    ("# only comments\n\n", r"bad.txt: expected at least one template"),
])
def test_bad_template_files_are_refused_with_file_and_line(tmp_path, body, match):
    (tmp_path / "bad.txt").write_text(body)
    with pytest.raises(ValueError, match=match):
        load_templates(tmp_path / "bad.txt")


def test_undecodable_and_missing_template_files(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("a {}.\nthe caf\xe9 {}.\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt:2: expected UTF-8 text"):
        load_templates(tmp_path / "latin1.txt")
    with pytest.raises(FileNotFoundError, match="nope.txt does not exist"):
        load_templates(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="template 1 'a \\{\\}.' repeats template 0"):
        TemplateSet(["a {}.", "a {}."])
    with pytest.raises(ValueError, match="at least one template"):
        TemplateSet([])


# ------------------------------------------------------------------ statistics -> rankings -> experts -> fusion
@pytest.mark.parametrize("texts", [CLIP7, GENERATED], ids=["clip7", "generated300"])
def test_any_m_from_statistics_to_fusion(tmp_path, texts, caplog):
    ts = TemplateSet(texts)
    m, k = len(ts), len(NAMES)
    rankings = _stats(m, never=2).rankings(NAMES, templates=ts, model="mine", dataset="folder")
    assert list(rankings) == ["model", "dataset", "split", "templates", "classes"]
    assert rankings["templates"] == texts and all(len(c["entropy_ranking"]) == m for c in rankings["classes"].values())
    save_rankings(rankings, tmp_path / "r.json")
    back = load_rankings(tmp_path / "r.json")
    validate_rankings(back)
    assert rankings_templates(back) == ts
    with caplog.at_level(logging.WARNING, logger="floss.core.rankings"):
        experts = select_experts(back, n=4)
    # sky is predicted by no template: the authors' fallback, all M templates (the averaged classifier)
    assert experts[2] == list(range(m)) and f"all {m} templates" in caplog.text
    assert all(len(e) == 4 and len(set(e)) == 4 and all(0 <= t < m for t in e) for e in experts[:2])
    assert experts[:2] == [[e["template_id"] for e in back["classes"][n]["entropy_ranking"]
                            if e["pixel_percentage"] > 0][:4] for n in NAMES[:2]]
    with pytest.raises(ValueError, match="'sky' has only 0 valid templates"):
        select_experts(back, n=4, fewer="error")
    # expert classifiers and fusion on small tensors
    emb = template_embeddings(lambda prompts: torch.randn(len(prompts), 16, generator=torch.Generator()
                                                          .manual_seed(len(prompts))), NAMES, templates=ts)
    assert emb.shape == (m, k, 16)
    w_experts, w_all = expert_classifiers(emb, experts), averaged_classifier(emb)
    torch.testing.assert_close(w_experts[2], w_all)              # the fallback expert is W_CLIP
    feats = torch.nn.functional.normalize(torch.randn(16, 5, 7), dim=0)
    expert_probs = torch.einsum("eqd,dhw->eqhw", w_experts, feats).mul(50).softmax(dim=1)
    fallback = torch.einsum("qd,dhw->qhw", w_all, feats).mul(50).softmax(dim=0)
    fused = floss.fuse(expert_probs, fallback)
    assert fused.shape == (k, 5, 7) and torch.allclose(fused.sum(0), torch.ones(5, 7))
    # the ids mean these prompts: another template set is refused
    with pytest.raises(ValueError, match=f"ranks {m} templates .* are 80"):
        check_rankings_templates(back, None)
    check_rankings_templates(back, texts)


def test_a_single_template(caplog):
    ts = TemplateSet(["a photo of a {}."])
    rankings = _stats(1, never=1).rankings(NAMES, templates=ts)
    assert rankings["templates"] == ["a photo of a {}."]
    with caplog.at_level(logging.WARNING, logger="floss.core.rankings"):
        assert select_experts(rankings, n=4) == [[0], [0], [0]]     # fewer than 4 valid: the one; none: all (= [0])
    assert select_experts(rankings, n=1) == [[0], [0], [0]]
    with pytest.raises(ValueError, match="fewer than n=2"):
        select_experts(rankings, n=2, fewer="error")
    emb = torch.nn.functional.normalize(torch.randn(1, 3, 8), dim=-1)
    torch.testing.assert_close(expert_classifiers(emb, [[0]] * 3)[0], averaged_classifier(emb))


def test_default_templates_keep_the_authors_schema_byte_for_byte(tmp_path):
    st = _stats(80)
    plain = st.rankings(NAMES)
    for templates in (None, DEFAULT_TEMPLATES, list(IMAGENET_TEMPLATES)):
        assert json.dumps(st.rankings(NAMES, templates=templates)) == json.dumps(plain)
    assert "templates" not in plain and with_templates(plain, None) is plain
    assert rankings_templates(plain) is DEFAULT_TEMPLATES
    # a custom set of 80 other texts is recorded (the same M is no proof of the same prompts)
    other = st.rankings(NAMES, templates=[f"{i} {{}}" for i in range(80)])
    assert other["templates"][0] == "0 {}" and other["classes"] == plain["classes"]
    with pytest.raises(ValueError, match="expected 80 templates"):
        st.rankings(NAMES, templates=CLIP7)
    # M != 80 without recorded texts: readable, but it cannot name its prompts
    seven = _stats(7).rankings(NAMES)
    validate_rankings(seven)
    assert len(select_experts(seven, n=2)) == 3
    with pytest.raises(ValueError, match="7 templates per class but no 'templates' list"):
        rankings_templates(seven)


# ------------------------------------------------------------------------------------------- keys and caches
class _CountingModel:
    """Enough of a model for floss.protocol.extraction.text_embeddings, with a registry tag (cacheable)."""
    backbone, pretrained, precision, device = "tiny", "some-tag", "fp32", "cpu"

    def __init__(self):
        self.prompts = 0

    def encode_text(self, prompts):
        self.prompts += len(prompts)
        return torch.stack([torch.randn(8, generator=torch.Generator().manual_seed(hash(p) % 2**31)) for p in prompts])


def test_text_embeddings_are_keyed_by_the_template_texts(tmp_path):
    from floss.protocol.extraction import text_embeddings

    model = _CountingModel()
    default = text_embeddings(model, NAMES, cache_dir=tmp_path, progress=False)
    assert default.shape == (80, 3, 8) and model.prompts == 240
    text_embeddings(model, NAMES, cache_dir=tmp_path, progress=False)
    assert model.prompts == 240                                   # served from the cache
    seven = text_embeddings(model, NAMES, cache_dir=tmp_path, progress=False, templates=CLIP7)
    assert seven.shape == (7, 3, 8) and model.prompts == 240 + 21  # another set: encoded, not the 80's file
    text_embeddings(model, NAMES, cache_dir=tmp_path, progress=False, templates=CLIP7[::-1])
    assert model.prompts == 240 + 42                              # the same texts in another order: other ids
    assert len(list(tmp_path.glob("*.safetensors"))) == 3


def test_synthetic_cache_with_a_template_set_is_keyed_and_recorded(tmp_path, caplog):
    from floss.data.cache import FeatureCache
    from floss.data.synthetic import write_synthetic_cache
    from floss.protocol import evaluate_cache, rank_cache

    out = tmp_path / "cache"
    write_synthetic_cache(out, "maskclip", "cityscapes", "val", num_images=2, templates=CLIP7)
    cache = FeatureCache(out)
    assert cache.num_templates == 7 and cache.templates == tuple(CLIP7) and cache.text.shape[0] == 7
    assert cache.fingerprint["templates"] == TemplateSet(CLIP7).digest
    st = rank_cache(cache, progress=False)
    experts = select_experts(st.rankings(cache.class_names, templates=cache.templates), n=2)
    res = evaluate_cache(cache, experts=experts, per_template=True, progress=False)
    assert sorted(res["per_template"], key=int) == [str(i) for i in range(7)] and res["templates"] == CLIP7
    # a rerun with another template file is not served from the old cache
    with caplog.at_level(logging.INFO, logger="floss.data.cache"):
        write_synthetic_cache(out, "maskclip", "cityscapes", "val", num_images=2, templates=GENERATED)
    assert "templates: cached=" in caplog.text and "extracting every image again" in caplog.text
    assert FeatureCache(out).num_templates == 300
    write_synthetic_cache(out, "maskclip", "cityscapes", "val", num_images=2)
    default = FeatureCache(out)
    assert "templates" not in default.manifest and "templates" not in default.fingerprint
    assert default.templates is DEFAULT_TEMPLATES


# ----------------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from layouts import random_image, random_label, write_image, write_label

    root = tmp_path_factory.mktemp("tpl")
    rng = np.random.default_rng(1)
    for i, rel in enumerate(["a", "b"]):
        write_image(root / "images" / f"{rel}.png", random_image(rng, (40 + 8 * i, 64)))
        write_label(root / "labels" / f"{rel}.png", random_label(rng, (40 + 8 * i, 64), 3))
    (root / "classes.txt").write_text("road\ncar\nsky\n")
    (root / "clip7.txt").write_text("# CLIP's 7-template ensemble\n" + "\n".join(CLIP7) + "\n")
    (root / "gen300.txt").write_text("\n".join(GENERATED) + "\n")
    return root


def test_cli_rank_extract_evaluate_segment_with_templates(folder, tmp_path, capsys):
    src = ["--images", str(folder / "images"), "--classes", str(folder / "classes.txt")]
    t7 = ["--templates", str(folder / "clip7.txt")]
    # rank straight from the images, with a checkpoint
    assert cli.main(["rank", "--model", "maskclip", *src, *MODEL, *t7, "--out", str(tmp_path / "r7.json"),
                     "--n-experts", "2", "--state", str(tmp_path / "state")]) == 0
    r7 = load_rankings(tmp_path / "r7.json")
    assert r7["templates"] == CLIP7 and all(len(c["entropy_ranking"]) == 7 for c in r7["classes"].values())
    experts = json.loads((tmp_path / "r7.experts.json").read_text())["experts"]
    assert all(0 < len(e) <= 2 or e == list(range(7)) for e in experts.values())
    # the same images through a feature cache
    assert cli.main(["extract", "--model", "maskclip", *src, "--labels", str(folder / "labels"), *MODEL, *t7,
                     "--out", str(tmp_path / "cache")]) == 0
    manifest = json.loads((tmp_path / "cache/manifest.json").read_text())
    assert manifest["num_templates"] == 7 and manifest["templates"] == CLIP7
    assert manifest["fingerprint"]["templates"] == TemplateSet(CLIP7).digest
    assert cli.main(["rank", "--features", str(tmp_path / "cache"), "--out", str(tmp_path / "c7.json")]) == 0
    c7 = load_rankings(tmp_path / "c7.json")
    assert c7["templates"] == CLIP7 and c7["classes"] == r7["classes"]        # the same statistics either way
    assert cli.main(["evaluate", "--features", str(tmp_path / "cache"), "--rankings", str(tmp_path / "r7.json"),
                     "--per-template", "--out", str(tmp_path / "res.json")]) == 0
    res = json.loads((tmp_path / "res.json").read_text())
    assert len(res["per_template"]) == 7 and res["templates"] == CLIP7
    # segment: the rankings name their templates; --templates, if given, must be the same set
    assert cli.main(["segment", "--model", "maskclip", *src, *MODEL, "--rankings", str(tmp_path / "r7.json"),
                     "--out", str(tmp_path / "masks")]) == 0
    assert cli.main(["segment", "--model", "maskclip", *src, *MODEL, *t7, "--rankings", str(tmp_path / "r7.json"),
                     "--out", str(tmp_path / "masks2")]) == 0
    assert (tmp_path / "masks/floss/a.png").read_bytes() == (tmp_path / "masks2/floss/a.png").read_bytes()
    capsys.readouterr()
    # mismatches are refused, naming the arguments
    assert cli.main(["segment", "--model", "maskclip", *src, *MODEL, "--rankings", str(tmp_path / "r7.json"),
                     "--templates", str(folder / "gen300.txt"), "--out", str(tmp_path / "m3")]) == 2
    assert "--rankings" in capsys.readouterr().err
    assert cli.main(["rank", "--features", str(tmp_path / "cache"), "--templates", str(folder / "gen300.txt"),
                     "--out", str(tmp_path / "x.json")]) == 2
    assert "--templates" in capsys.readouterr().err
    assert cli.main(["rank", "--model", "maskclip", *src, *MODEL, "--out", str(tmp_path / "r80.json")]) == 0
    assert cli.main(["evaluate", "--features", str(tmp_path / "cache"), "--rankings", str(tmp_path / "r80.json"),
                     "--out", str(tmp_path / "bad.json")]) == 2
    assert "ranks 80 templates" in capsys.readouterr().err
    # a rerun with another template file: neither the checkpoint nor the cache is reused
    t300 = ["--templates", str(folder / "gen300.txt")]
    capsys.readouterr()        # the CLI logs to stderr (its own logging configuration)
    assert cli.main(["rank", "--model", "maskclip", *src, *MODEL, *t300, "--out", str(tmp_path / "r7.json"),
                     "--n-experts", "2", "--state", str(tmp_path / "state")]) == 0
    assert "checkpoint of other code, weights or settings (templates: cached=" in capsys.readouterr().err
    assert cli.main(["extract", "--model", "maskclip", *src, "--labels", str(folder / "labels"), *MODEL, *t300,
                     "--out", str(tmp_path / "cache")]) == 0
    assert "(templates: cached=" in (err := capsys.readouterr().err) and "extracting every image again" in err
    assert len(load_rankings(tmp_path / "r7.json")["templates"]) == 300
    assert json.loads((tmp_path / "cache/manifest.json").read_text())["num_templates"] == 300


def test_cli_refuses_a_bad_template_file_before_any_model_work(folder, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a {}.\n# fine\na photo of a thing.\n")
    src = ["--images", str(folder / "images"), "--classes", str(folder / "classes.txt")]
    for command in (["rank", "--model", "maskclip", *src, *MODEL, "--out", str(tmp_path / "r.json")],
                    ["extract", "--model", "maskclip", *src, *MODEL, "--out", str(tmp_path / "c")],
                    ["segment", "--model", "maskclip", *src, *MODEL, "--rankings", str(tmp_path / "r.json"),
                     "--out", str(tmp_path / "m")]):
        (tmp_path / "r.json").write_text("{}")
        assert cli.main([*command, "--templates", str(bad)]) == 2
        err = capsys.readouterr().err
        assert f"--templates: {bad}:3: expected exactly one '{{}}'" in err, err
    assert cli.main(["rank", "--model", "maskclip", *src, *MODEL, "--out", str(tmp_path / "r.json"),
                     "--templates", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- the pipeline
def test_pipeline_parameter_templates(tmp_path):
    import yaml

    from floss.pipeline.params import ParamsError, num_templates, pipeline_templates, validate_params
    from floss.util import paths

    params = yaml.safe_load((paths.ROOT / "params.yaml").read_text())
    assert params["templates"] is None and pipeline_templates(params) is DEFAULT_TEMPLATES
    (tmp_path / "t7.txt").write_text("\n".join(CLIP7) + "\n")
    params["templates"] = str(tmp_path / "t7.txt")
    with pytest.raises(ParamsError, match=r"topn: expected a non-empty list of integers in 1..7"):
        validate_params(params, check_paths=False)        # Fig. 4(d)'s N = 8 needs 8 templates
    params["topn"] = [1, 2, 4]
    validate_params(params, check_paths=False)
    assert num_templates(params) == 7 and pipeline_templates(params) == tuple(CLIP7)
    params["evaluate"]["n_experts"] = 8
    with pytest.raises(ParamsError, match=r"evaluate.n_experts: expected an integer in 1..7, got 8"):
        validate_params(params, check_paths=False)
    params["evaluate"]["n_experts"] = 4
    (tmp_path / "bad.txt").write_text("a {}.\na {}.\n")
    params["templates"] = str(tmp_path / "bad.txt")
    with pytest.raises(ParamsError, match="params.yaml: templates: .*bad.txt:2: expected distinct templates"):
        validate_params(params, check_paths=False)
    params["templates"] = "no/such/file.txt"
    with pytest.raises(ParamsError, match="templates: expected an existing template file"):
        validate_params(params)
    params["templates"] = 7
    with pytest.raises(ParamsError, match="templates: expected null"):
        validate_params(params, check_paths=False)
