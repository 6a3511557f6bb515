"""torchrun sharding: two CPU processes (gloo) write the same cache content as one process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_GELU
from floss.util import distributed
from floss.data.cache import FeatureCache
from layouts import make_dataset

ROOT = Path(__file__).resolve().parents[1]


def test_context_and_shard_from_environment(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ctx = distributed.context()
    assert (ctx.rank, ctx.world_size, ctx.local_rank) == (1, 3, 1) and not ctx.is_main
    ids = [f"id{i}" for i in (5, 3, 0, 6, 1, 4, 2)]
    shares = [distributed.shard(ids, distributed.DistContext(r, 3)) for r in range(3)]
    assert shares[1] == ["id1", "id4"] and sorted(sum(shares, [])) == sorted(ids)   # disjoint, no padding
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ValueError, match="RANK < WORLD_SIZE"):
        distributed.context()


def _extract_args(root, out) -> list[str]:
    return ["--model", "maskclip", "--dataset", "cityscapes", "--split", "train", "--data-root", str(root),
            "--out", str(out), "--backbone", TINY_GELU, "--pretrained", "none", "--device", "cpu", "--dtype", "fp32",
            "--images-per-shard", "1"]


def _extract(root, out, nproc: int) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")   # same kernels in every process
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    cmd = launcher + ["-m", "floss", "extract", *_extract_args(root, out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    root = make_dataset("cityscapes", tmp_path / "cityscapes", n_train=3, n_val=0)
    from floss import cli
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # the same kernels as the OMP_NUM_THREADS=1 worker processes
    try:
        assert cli.main(["extract", *_extract_args(root, tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    _extract(root, tmp_path / "two", 2)
    one, two = FeatureCache(tmp_path / "one"), FeatureCache(tmp_path / "two")
    assert two.manifest["complete"] and two.manifest["world_size"] == 2
    assert {s["name"] for s in two.manifest["shards"]} == {
        "rank000-of-002-00000", "rank000-of-002-00001", "rank001-of-002-00000"}
    assert one.ids == two.ids and len(one) == 3
    for a, b in zip(one, two):
        assert torch.equal(a.feats, b.feats) and torch.equal(a.boxes, b.boxes) and torch.equal(a.label, b.label)
    assert torch.equal(one.text, two.text)
    from floss.protocol import rank_cache
    sa, sb = rank_cache(one, progress=False), rank_cache(two, progress=False)
    assert torch.equal(sa.counts, sb.counts)
    assert torch.equal(sa.values("entropy").nan_to_num(-1.0), sb.values("entropy").nan_to_num(-1.0))
