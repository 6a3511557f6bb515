"""Peak memory and time of FLOSS fusion against the averaged-classifier prediction, on one 448×448 window.

Run: ``python benchmarks/bench_fusion.py [--classes 171 19] [--size 448] [--repeats 3] [--device cpu]``

Each case runs in a fresh subprocess so peaks do not leak between cases.

Memory method (CPU): ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is the process's peak resident set size.
The subprocess builds its inputs, reads its *current* RSS (``/proc/self/statm``), runs the case once, and
reports ``peak RSS - RSS before the case`` (the extra memory the case needed: temporaries and outputs; the
inputs themselves are listed separately). ``tracemalloc`` is useless here because torch allocates outside
Python's allocator. On CUDA the same is done with ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``.

Cases (same inputs: dense features ``[D=512, 28, 28]`` = a 448 window's patch grid of ViT-B/16, per-template
text embeddings ``[80, K, 512]``, random top-4 experts):

* ``baseline``: averaged classifier ``[K, D]`` -> einsum -> softmax(100·) on the patch grid -> bilinear
  upsample to 448×448 -> argmax (the authors' MaskCLIP/CLIP-DINOiser order).
* ``floss_rows``: K expert classifiers ``[K, K, D]`` + fallback -> einsum -> softmax per expert on the patch
  grid -> :func:`floss.core.fusion.fuse_rows` with :func:`floss.core.fusion.upsampling_expert_fn` (bands of rows, the
  ``[K, K, 448, 448]`` expert maps never exist at once) -> argmax.
* ``floss_dense`` (only when the dense expert maps fit, K <= 40): upsample all maps, then :func:`fuse`.

Measured on the 2-core CPU build machine (torch 2.14.1, fp32, --repeats 1; extra peak = peak RSS - RSS before):

    K=171  baseline     2.2 s   137 MB      floss_rows  187 s (85x)   910 MB   (goal < 2 GB: met)
    K=19   baseline     0.29 s   19 MB      floss_rows  4.1 s (14x)   403 MB    floss_dense 4.7 s  397 MB

FLOSS evaluates K expert classifiers of K classes, i.e. K times the values of the baseline, hence the ratio.
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

FEATURE_DIM, GRID = 512, 28
DENSE_MAX_CLASSES = 40


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_case(case: str, num_classes: int, size: int, repeats: int, device: str) -> dict:
    import torch
    import torch.nn.functional as F

    from floss.core.fusion import fuse, fuse_rows, upsampling_expert_fn
    from floss.core.text import averaged_classifier, expert_classifiers

    gen = torch.Generator().manual_seed(0)
    feats = F.normalize(torch.randn(FEATURE_DIM, GRID, GRID, generator=gen), dim=0).to(device)
    emb = F.normalize(torch.randn(80, num_classes, FEATURE_DIM, generator=gen), dim=-1).to(device)
    experts = [torch.randperm(80, generator=gen)[:4].tolist() for _ in range(num_classes)]
    input_bytes = feats.numel() * 4 + emb.numel() * 4

    def baseline():
        classifier = averaged_classifier(emb)
        probs = torch.einsum("dhw,kd->khw", feats, classifier).mul(100).softmax(dim=0)
        up = F.interpolate(probs[None], size=(size, size), mode="bilinear", align_corners=False)[0]
        return up.argmax(dim=0)

    def expert_maps():
        classifiers = expert_classifiers(emb, experts, renormalize=False)           # [K, K, D]
        low = torch.einsum("dhw,ekd->ekhw", feats, classifiers).mul(100).softmax(dim=1)
        fallback = torch.einsum("dhw,kd->khw", feats, averaged_classifier(emb, renormalize=False))
        fallback = F.interpolate(fallback.mul(100).softmax(dim=0)[None], size=(size, size), mode="bilinear",
                                 align_corners=False)[0]
        return low, fallback

    def floss_rows():
        low, fallback = expert_maps()
        return fuse_rows(upsampling_expert_fn(low, (size, size)), fallback).argmax(dim=0)

    def floss_dense():
        low, fallback = expert_maps()
        up = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
        return fuse(up, fallback).argmax(dim=0)

    fn = {"baseline": baseline, "floss_rows": floss_rows, "floss_dense": floss_dense}[case]
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _current_rss_bytes()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss_bytes()
    return {"case": case, "classes": num_classes, "size": size, "device": device,
            "seconds": statistics.median(times), "extra_peak_mb": (peak - before) / 2**20,
            "inputs_mb": input_bytes / 2**20, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, nargs="+", default=[171, 19])
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.classes[0], args.size, args.repeats, args.device)))
        return
    rows = []
    for k in args.classes:
        cases = ["baseline", "floss_rows"] + (["floss_dense"] if k <= DENSE_MAX_CLASSES else [])
        for case in cases:
            out = subprocess.run([sys.executable, __file__, "--case", case, "--classes", str(k), "--size",
                                  str(args.size), "--repeats", str(args.repeats), "--device", args.device],
                                 check=True, capture_output=True, text=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = {r["classes"]: r["seconds"] for r in rows if r["case"] == "baseline"}
    print(f"{'K':>4} {'case':<12} {'time s':>8} {'x baseline':>10} {'extra peak MB':>14} {'inputs MB':>10}  device")
    for r in rows:
        print(f"{r['classes']:>4} {r['case']:<12} {r['seconds']:>8.3f} {r['seconds'] / base[r['classes']]:>10.1f} "
              f"{r['extra_peak_mb']:>14.0f} {r['inputs_mb']:>10.0f}  {r['device']} ({r['threads']} threads)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
