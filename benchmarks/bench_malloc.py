"""glibc malloc settings (floss.util.memory) on and off, side by side: each demo job below runs in fresh processes,
alternately with the settings (``FLOSS_MALLOC_TUNING=1``) and with glibc's defaults (``=0``), ``--repeats`` times
each; prints the job's seconds, system seconds, minor page faults and peak RSS, the speed-up, and checks that both
produce the same bits (a digest of the statistics / the evaluation results). Reads the demo's caches (run
``dvc repro`` first); writes nothing.

    CUDA_VISIBLE_DEVICES= python benchmarks/bench_malloc.py [--threads 1] [--repeats 2]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOBS = [("rank", "maskclip", "cityscapes"), ("rank", "naclip", "ade20k"), ("evaluate", "maskclip", "cityscapes"),
        ("evaluate", "clipdinoiser", "pascalco59")]


def child(kind: str, model: str, dataset: str, threads: int) -> None:
    """One job in this process: the settings as the environment says, then the job; one JSON line on stdout."""
    sys.path.insert(0, str(ROOT))
    import torch

    from floss.util.memory import keep_freed_memory
    applied = keep_freed_memory()
    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_demo_jobs import job                  # the stage's computation of the job
    from floss.pipeline.params import load_params

    params = load_params(ROOT / "params.yaml")
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    result = job(params, kind, model, dataset)
    if kind == "rank":
        digest = hashlib.sha256(b"".join(t.cpu().numpy().tobytes() for t in result._get_state().values()))
    else:
        result.pop("confusion", None)
        digest = hashlib.sha256(json.dumps(result, sort_keys=True, default=str).encode())
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"applied": applied, "seconds": seconds, "sys": after.ru_stime - before.ru_stime,
                      "minflt": after.ru_minflt - before.ru_minflt, "maxrss_mb": after.ru_maxrss / 1024,
                      "digest": digest.hexdigest()}))


def run(job, tuning: str, threads: int) -> dict:
    env = {**os.environ, "FLOSS_MALLOC_TUNING": tuning, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, __file__, "--child", *job, "--threads", str(threads)], env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", nargs=3, metavar=("KIND", "MODEL", "DATASET"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(*args.child, args.threads)
    for job in JOBS:
        if not (ROOT / "data" / "features" / job[1] / job[2] / ("train" if job[0] == "rank" else "val")).is_dir():
            sys.exit(f"data/features/{job[1]}/{job[2]}: no demo cache (run `dvc repro` first)")
        runs = {"1": [], "0": []}
        for _ in range(args.repeats):
            for tuning in ("0", "1"):
                runs[tuning].append(run(job, tuning, args.threads))
        assert runs["1"][0]["applied"] and not runs["0"][0]["applied"], "the settings were not applied"
        same = len({r["digest"] for rs in runs.values() for r in rs}) == 1
        med = {t: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "sys", "minflt", "maxrss_mb")}
               for t, rs in runs.items()}
        d, k = med["0"], med["1"]
        print(f"{'/'.join(job):34s} defaults {d['seconds']:6.2f} s (sys {d['sys']:5.2f} s, {d['minflt'] / 1e6:5.2f} M "
              f"faults, {d['maxrss_mb']:5.0f} MB)   kept {k['seconds']:6.2f} s (sys {k['sys']:5.2f} s, "
              f"{k['minflt'] / 1e6:5.2f} M faults, {k['maxrss_mb']:5.0f} MB)   {d['seconds'] / k['seconds']:.2f}x   "
              f"same bits: {same}", flush=True)


if __name__ == "__main__":
    main()
