"""Benchmark: ``TemplateStats.update(probs, size)`` vs the authors' per-template notebook algorithm.

Reference (written here from the protocol's description, §3): for each template, ``F.interpolate`` the
``[K, h, w]`` probabilities to full resolution, entropy map ``-Σ q ln(q + 1e-10)``, ``argmax``, then per
class a masked mean × count (entropy only). Ours runs with its default metrics (entropy, avg-prob, MaNo) and
with entropy only, on the same inputs in the same process, alternating, with ``torch.set_num_threads(N)``.
Statistics are checked: counts identical to the reference, entropy sums to a tight relative tolerance, and
all three metric sums against the straightforward per-template computation (``F.interpolate`` + the metric
registry's functions + per-class sums). ``--iti`` also times entropy+avgprob+mano+ITI with features
``[32, 32, 64]``. A last part measures the peak resident memory of ours alone (fresh subprocess) on a larger
image, where materialising the full-resolution stack would need ``M·K·H·W`` floats.

    python benchmarks/bench_stats.py [--quick] [--device cpu|cuda] [--repeats N] [--threads N] [--iti]

Measured on the 2-core dev container (torch 2.14.1 CPU, 2 threads; two other engineers' jobs intermittently
on the same cores, load average noted), command ``CUDA_VISIBLE_DEVICES= python benchmarks/bench_stats.py --iti``
(M=80 K=19 32x64 -> 256x512, median of 5 alternating runs, load 1.1): counts identical to the reference and
to the straightforward loop; entropy sums vs reference max relative difference 1.8e-7; sums vs the
straightforward loop 0 (entropy), 0 (avgprob), 2.1e-8 (mano).

    reference (authors loop, entropy)      3360 ms   1.00
    ours, default (entropy+avgprob+mano)    674 ms   4.98x
    ours, entropy                           492 ms   6.83x
    ours, default + ITI (D=32)              957 ms   3.51x
    peak memory, M=16 K=19 64x128 -> 1024x2048: +128 MiB RSS (the full-resolution stack: 2432 MiB)

Other runs: ``--quick --repeats 3 --iti`` at load 0.8: 3603 / 860 (4.19x) / 526 (6.86x) / 1029 ms (3.50x).
At load 2.6 (both cores busy with other jobs): with ``OMP_WAIT_POLICY=PASSIVE`` 5746 / 1361 (4.22x) / 853
(6.74x) / 1545 ms (3.72x); with ``--threads 1`` 7074 / 1801 (3.93x) / 1270 ms (5.57x). At load 2.3 without
``OMP_WAIT_POLICY`` the reference's 2-thread ops stall on libgomp's spin-waiting team (70 s per image)
while ours (single-threaded workers, ``floss.util.threads``) took 1.37 s: that 51x says more about the machine
than about the code. Before this change (issue #9, the previous version of this script): default metrics
1.09x, entropy only 3.2x.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from floss.core.stats import TemplateStats


def reference_stats(probs: torch.Tensor, size: tuple[int, int]):
    """The authors' notebook loop: one template at a time at full resolution, per-class masks."""
    m, k = probs.shape[:2]
    sums = torch.zeros(m, k, dtype=torch.float64)
    counts = torch.zeros(m, k, dtype=torch.int64)
    for t in range(m):
        q = F.interpolate(probs[t:t + 1], size=size, mode="bilinear", align_corners=False)[0]
        ent = -(q * torch.log(q + 1e-10)).sum(0)
        pred = q.argmax(0)
        for c in range(k):
            mask = pred == c
            n = int(mask.sum())
            if n:
                sums[t, c] += float(ent[mask].mean()) * n
                counts[t, c] += n
    return counts, sums


def ours_stats(probs: torch.Tensor, size: tuple[int, int], metrics=("entropy",), features=None):
    feature_dim = None if features is None else features.shape[0]
    st = TemplateStats(probs.shape[0], probs.shape[1], metrics=metrics, device=probs.device, feature_dim=feature_dim)
    st.update(probs, size, features=features)
    if probs.device.type == "cuda":
        torch.cuda.synchronize()
    return st


def straightforward_stats(probs: torch.Tensor, size: tuple[int, int], metrics):
    """Per template: F.interpolate, the registry's metric functions, per-class float64 sums (the check)."""
    from floss.core.metrics import get_metric
    m, k = probs.shape[:2]
    counts = torch.zeros(m, k, dtype=torch.int64)
    sums = torch.zeros(len(metrics), m, k, dtype=torch.float64)
    for t in range(m):
        q = F.interpolate(probs[t:t + 1], size=size, mode="bilinear", align_corners=False).reshape(1, k, -1)
        pred = q[0].argmax(0)
        counts[t] = torch.bincount(pred, minlength=k)
        for j, name in enumerate(metrics):
            score = q[0].amax(0) if name == "avgprob" else get_metric(name).pixel_score(q)[0]
            sums[j, t] = torch.zeros(k, dtype=torch.float64).index_add_(0, pred, score.double())
    return counts, sums


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def memory_child(m: int, k: int, low: tuple[int, int], size: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(m, k, *low, generator=g) * 3, dim=1)
    ours_stats(probs[:1], (16, 16), ("entropy", "avgprob", "mano"))  # load kernels/allocator before measuring
    with open("/proc/self/statm") as f:  # current resident set (pages), not the import-time peak
        before_kib = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024
    t, _ = timed(lambda: ours_stats(probs, size, ("entropy", "avgprob", "mano")))
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_delta_mib": max(0.0, peak_kib - before_kib) / 1024, "seconds": t}))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and a smaller memory case")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the reference always runs on the same device)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iti", action="store_true", help="also time the default metrics + ITI (features D=32)")
    ap.add_argument("--memory-child", nargs=7, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        m, k, h, w, big_h, big_w, _ = args.memory_child
        memory_child(m, k, (h, w), (big_h, big_w))
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    device = torch.device(args.device)
    repeats = args.repeats or (2 if args.quick else 5)
    m, k, low, size = 80, 19, (32, 64), (256, 512)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(m, k, *low, generator=g) * 3, dim=1).to(device)

    default = ("entropy", "avgprob", "mano")
    feats = torch.randn(32, *low, generator=g).to(device) if args.iti else None
    times = {"reference": [], "default": [], "entropy": [], "iti": []}
    ours_stats(probs, size, default)  # warm-up (tap tables, allocator)
    for _ in range(repeats):  # alternate so that machine-load drift hits all
        t, (ref_counts, ref_sums) = timed(lambda: reference_stats(probs, size))
        times["reference"].append(t)
        t, st = timed(lambda: ours_stats(probs, size, default))
        times["default"].append(t)
        t, st_ent = timed(lambda: ours_stats(probs, size, ("entropy",)))
        times["entropy"].append(t)
        if feats is not None:
            t, _ = timed(lambda: ours_stats(probs, size, default + ("iti",), features=feats))
            times["iti"].append(t)
    counts_equal = torch.equal(st.counts.cpu(), ref_counts.cpu()) and torch.equal(st_ent.counts.cpu(), ref_counts.cpu())
    ours_sums = st._get_state()["sums"][0].cpu()
    rel = float(((ours_sums - ref_sums.cpu()).abs() / ref_sums.cpu().abs().clamp_min(1e-12)).max())
    # all three metrics against the straightforward per-template computation
    naive_counts, naive_sums = straightforward_stats(probs.cpu(), size, default)
    all_sums = st._get_state()["sums"].cpu()
    rel_all = [float(((all_sums[j] - naive_sums[j]).abs() / naive_sums[j].abs().clamp_min(1e-12)).max())
               for j in range(len(default))]
    print(f"case: M={m} K={k} {low[0]}x{low[1]} -> {size[0]}x{size[1]}, device={device}, "
          f"threads={args.threads}, repeats={repeats} (median of alternating runs), load average {load}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    print(f"counts identical to the reference: {counts_equal} (and to the straightforward loop: "
          f"{torch.equal(st.counts.cpu(), naive_counts)}); entropy sums vs reference: max relative difference "
          f"{rel:.3g}; sums vs straightforward loop (entropy, avgprob, mano): "
          + ", ".join(f"{r:.3g}" for r in rel_all))
    ms = {key: 1e3 * statistics.median(v) for key, v in times.items() if v}
    print(f"{'':40s}{'ms/image':>12s}{'ratio':>8s}")
    labels = {"reference": "reference (authors loop, entropy)", "default": "ours, default (entropy+avgprob+mano)",
              "entropy": "ours, entropy", "iti": "ours, default + ITI (D=32)"}
    for key, val in ms.items():
        print(f"{labels[key]:40s}{val:12.1f}{ms['reference'] / val:8.2f}")
    if not counts_equal or rel > 1e-5 or max(rel_all) > 1e-5:
        raise SystemExit("statistics differ from the reference")

    mm, big = (8, (512, 1024)) if args.quick else (16, (1024, 2048))
    low_big = (big[0] // 16, big[1] // 16)
    if device.type == "cpu":
        cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(args.threads), "--memory-child",
               str(mm), str(k), *map(str, low_big), *map(str, big), "0"]
        res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        stack_mib = mm * k * big[0] * big[1] * 4 / 2 ** 20
        print(f"peak memory of ours, M={mm} K={k} {low_big[0]}x{low_big[1]} -> {big[0]}x{big[1]}: "
              f"+{res['peak_delta_mib']:.0f} MiB RSS ({res['seconds']:.1f} s); the full-resolution stack "
              f"would be {stack_mib:.0f} MiB")


if __name__ == "__main__":
    main()
