"""Feature cache: round trip, laziness, fingerprint refusal, resume after a crash, rank shards and merging."""
from __future__ import annotations

import json

import pytest
import torch

from floss.data.cache import (CacheError, CacheWriter, FeatureCache, ImageRecord, merge_partial_manifests,
                         shard_name)

M, Q, D = 5, 3, 8
META = {"model": "maskclip", "dataset": "cityscapes", "split": "val", "class_names": ["a", "b", "c"],
        "query_names": ["a", "b", "c"], "query_to_class": [0, 1, 2],
        "settings": {"scale": [64, 32], "crop": 16, "stride": 8, "softmax_stage": "window", "logit_scale": 100.0,
                     "renormalize_experts": False, "renormalize_fallback": False, "window_fp16": False,
                     "protocol": "authors"}}
FP = {"model": "maskclip", "weights": "none", "backbone": "tiny", "dataset": "cityscapes", "split": "val"}


def make_record(i: int, windows: int = 2, size=(12, 20)) -> ImageRecord:
    g = torch.Generator().manual_seed(i)
    feats = torch.nn.functional.normalize(torch.randn(windows, D, 2, 2, generator=g), dim=1)
    boxes = torch.tensor([[0, 16, 8 * w, 8 * w + 16] for w in range(windows)], dtype=torch.int32)
    label = torch.randint(0, 3, size, generator=g, dtype=torch.uint8)
    label[0, 0] = 255
    return ImageRecord(f"img{i:03d}", feats, boxes, (16, 8 * windows + 8), size, label)


def text() -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(M, Q, D, generator=torch.Generator().manual_seed(9)), dim=-1)


def write(path, ids, **kw) -> bool:
    with CacheWriter(path, META, FP, text(), **kw) as w:
        for i in ids:
            if f"img{i:03d}" not in w.done_ids:
                w.add(make_record(i))
    return w.complete


def test_round_trip_fp32_exact_and_fp16_close(tmp_path):
    assert write(tmp_path / "c32", range(5), images_per_shard=2, dtype=torch.float32)
    cache = FeatureCache(tmp_path / "c32")
    assert len(cache) == 5 and cache.ids == [f"img{i:03d}" for i in range(5)]
    assert len(cache.manifest["shards"]) == 3 and cache.manifest["complete"]
    assert [s["name"] for s in cache.manifest["shards"]] == [shard_name(0, 1, n) for n in range(3)]
    for i, rec in enumerate(cache):
        ref = make_record(i)
        assert torch.equal(rec.feats, ref.feats) and torch.equal(rec.boxes, ref.boxes)
        assert torch.equal(rec.label, ref.label) and rec.label.dtype == torch.uint8
        assert rec.orig_size == ref.orig_size and rec.resized_size == ref.resized_size
    assert torch.equal(cache.text, text()) and cache.class_names == META["class_names"]
    assert cache["img003"].id == "img003"
    cache.verify()

    assert write(tmp_path / "c32default", range(2))               # the default keeps fp32: exact
    assert FeatureCache(tmp_path / "c32default")[0].feats.dtype == torch.float32
    write(tmp_path / "c16", range(5), images_per_shard=2, dtype=torch.float16)
    c16 = FeatureCache(tmp_path / "c16")
    assert c16[0].feats.dtype == torch.float16
    assert torch.allclose(c16[0].feats.float(), make_record(0).feats, atol=1e-3)
    # fp16 halves the feature bytes; labels are one byte per pixel
    per_image_32 = 2 * D * 2 * 2 * 4 + 2 * 4 * 4 + 12 * 20
    per_image_16 = 2 * D * 2 * 2 * 2 + 2 * 4 * 4 + 12 * 20
    assert per_image_32 < cache.bytes_per_image() < per_image_32 + 400
    assert per_image_16 < c16.bytes_per_image() < per_image_16 + 400


def test_reads_are_lazy_per_shard(tmp_path, monkeypatch):
    write(tmp_path / "c", range(6), images_per_shard=2)
    cache = FeatureCache(tmp_path / "c")
    import floss.data.cache as mod
    opened = []
    real = mod.safe_open
    monkeypatch.setattr(mod, "safe_open", lambda p, **kw: opened.append(str(p)) or real(p, **kw))
    cache[0], cache[1], cache[2]
    assert len(opened) == 2 and opened[0].endswith("00000.safetensors") and opened[1].endswith("00001.safetensors")


def test_stale_cache_is_refused_naming_the_keys(tmp_path, caplog):
    write(tmp_path / "c", range(3))
    cache = FeatureCache(tmp_path / "c")
    cache.check_fingerprint(FP)
    with pytest.raises(CacheError, match=r"weights: cached='none' expected='sha256:abc'"):
        cache.check_fingerprint({**FP, "weights": "sha256:abc"})
    with pytest.raises(CacheError, match="split"):
        FeatureCache(tmp_path / "c", expected_fingerprint={**FP, "split": "train"})
    # the writer does not reuse it: it starts over, saying which keys differ
    with caplog.at_level("INFO", logger="floss.data.cache"):
        with CacheWriter(tmp_path / "c", META, {**FP, "backbone": "ViT-B-16"}, text()) as w:
            assert w.done_ids == set() and not w.complete
            w.add(make_record(7))
    assert "backbone: cached='tiny' expected='ViT-B-16'" in caplog.text and "extracting every image again" in caplog.text
    assert FeatureCache(tmp_path / "c").ids == ["img007"]


def test_interrupted_extraction_resumes_with_identical_shards(tmp_path):
    write(tmp_path / "ref", range(7), images_per_shard=3)

    class Crash(RuntimeError):
        pass

    with pytest.raises(Crash):
        with CacheWriter(tmp_path / "run", META, FP, text(), images_per_shard=3) as w:
            for i in range(7):
                w.add(make_record(i))
                if i == 4:     # shard 0 (3 images) is written, images 3 and 4 are buffered
                    raise Crash()
    with pytest.raises(CacheError, match="incomplete cache.*unfinished: \\[0\\]"):
        FeatureCache(tmp_path / "run")
    with CacheWriter(tmp_path / "run", META, FP, text(), images_per_shard=3) as w:
        # shard 0, and the two images buffered at the crash (kept aside, not lost)
        assert w.done_ids == {"img000", "img001", "img002", "img003", "img004"}
        added = [i for i in range(7) if f"img{i:03d}" not in w.done_ids]
        for i in added:
            w.add(make_record(i))
    assert added == [5, 6]
    ref, run = FeatureCache(tmp_path / "ref"), FeatureCache(tmp_path / "run")
    for s_ref, s_run in zip(ref.manifest["shards"], run.manifest["shards"], strict=True):
        assert s_ref == s_run          # same names and sha256: byte-identical shard files
    assert ref.manifest["images"] == run.manifest["images"]
    assert write(tmp_path / "run", range(7), images_per_shard=3)   # complete: a rerun is a no-op


def test_rank_shards_merge_into_one_cache(tmp_path):
    ids = list(range(7))
    assert not write(tmp_path / "c", ids[0::2], rank=0, world_size=2, images_per_shard=2, dtype=torch.float16)
    with pytest.raises(CacheError, match="ranks missing: \\[1\\]"):
        FeatureCache(tmp_path / "c")
    import shutil
    shutil.copytree(tmp_path / "c", tmp_path / "other")     # another number of processes: a fresh start
    with CacheWriter(tmp_path / "other", META, FP, text(), rank=0, world_size=3) as w:
        assert w.done_ids == set()
    assert not (tmp_path / "other" / "manifest.rank1.json").exists()
    assert write(tmp_path / "c", ids[1::2], rank=1, world_size=2, images_per_shard=2, dtype=torch.float16)
    merged = FeatureCache(tmp_path / "c")
    assert merged.ids == [f"img{i:03d}" for i in ids]
    assert {s["name"] for s in merged.manifest["shards"]} == {
        "rank000-of-002-00000", "rank000-of-002-00001", "rank001-of-002-00000", "rank001-of-002-00001"}
    for i, rec in enumerate(merged):
        assert torch.equal(rec.feats, make_record(i).feats.half())
    # merging again from the partial manifests gives the same manifest
    on_disk = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert merge_partial_manifests(tmp_path / "c", write=False) == on_disk


def test_bad_records_are_rejected(tmp_path):
    with CacheWriter(tmp_path / "c", META, FP, text()) as w:
        rec = make_record(0)
        with pytest.raises(ValueError, match=r"feats: expected float \[Nw, 8, gh, gw\]"):
            w.add(ImageRecord("x", rec.feats[:, :4], rec.boxes, rec.resized_size, rec.orig_size, rec.label))
        with pytest.raises(ValueError, match="label: expected shape"):
            w.add(ImageRecord("x", rec.feats, rec.boxes, rec.resized_size, (3, 3), rec.label))
        with pytest.raises(ValueError, match="boxes: expected .* inside the resized size"):
            w.add(ImageRecord("x", rec.feats, rec.boxes + 100, rec.resized_size, rec.orig_size, rec.label))
        w.add(rec)
        with pytest.raises(ValueError, match="already in the cache"):
            w.add(rec)
    with pytest.raises(ValueError, match="meta: missing keys"):
        CacheWriter(tmp_path / "d", {"model": "x"}, FP, text())
    with pytest.raises(CacheError, match="not found"):
        FeatureCache(tmp_path / "nothing")
