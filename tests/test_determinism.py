"""Bit-identical demo results whatever the thread count and the CPU's vector instruction set (issue "Both doors
open", item 6): the synthetic source, ranking and evaluation run twice in fresh processes — 1 thread with ATen's
AVX2 kernels (``ATEN_CPU_CAPABILITY=avx2``) and 2 threads with the machine's best ones (AVX-512 where the CPU has
it) — and every file they write must hash the same.

Not covered: ATen's portable kernels (``ATEN_CPU_CAPABILITY=default``, no SIMD and no fused multiply-add, which
no x86 machine of the last decade selects by itself) change the last bits of ranking statistics and, rarely, an
argmax at an exact tie.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from floss.util import paths

pytestmark = pytest.mark.slow

RUN = """
import copy, sys, torch, yaml
from floss import pipeline
from floss.pipeline.params import validate_params
torch.set_num_threads(int(sys.argv[2]))
params = yaml.safe_load(open(sys.argv[1]))
params["models"] = {"maskclip": ["cityscapes"], "naclip": ["cityscapes"]}    # window and final softmax
params["transfer"] = {"models": [], "datasets": []}
params["synthetic"]["images"] = {"cityscapes": {"train": 6, "val": 3}}
params["low_data"].update(model="maskclip", datasets=["cityscapes"])
params = validate_params(params)
for model in params["models"]:
    pipeline.stage_extract(params, model)
    pipeline.stage_rank(params, model)
    pipeline.stage_evaluate(params, model)
"""


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "manifest" not in p.name
            and p.suffix != ".log"}


def _run(root: Path, threads: int, capability: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "FLOSS_ROOT")}
    env.update(FLOSS_ROOT=str(root), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               CUDA_VISIBLE_DEVICES="", TQDM_DISABLE="1")
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    root.mkdir(parents=True)
    run = subprocess.run([sys.executable, "-c", RUN, str(paths.ROOT / "params.yaml"), str(threads)], env=env,
                         capture_output=True, text=True, cwd=root)
    assert run.returncode == 0, run.stderr[-4000:]
    return {**_hashes(root / "data" / "features"), **_hashes(root / "results")}


def test_demo_outputs_do_not_depend_on_threads_or_instruction_set(tmp_path):
    avx2 = _run(tmp_path / "avx2", 1, "avx2")
    native = _run(tmp_path / "native", 2, None)
    assert len(avx2) > 10 and any(k.startswith("eval/") for k in avx2)
    differ = sorted(k for k in avx2.keys() | native.keys() if avx2.get(k) != native.get(k))
    assert not differ, f"differ between 1 thread/AVX2 kernels and 2 threads/native kernels: {differ}"
