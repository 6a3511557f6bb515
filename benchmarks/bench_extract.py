"""Extraction throughput and peak memory per model, and cache bytes per image.

For each model (MaskCLIP, CLIP-DINOiser, NACLIP, SCLIP, ClearCLIP, GEM; ``gem_448`` = GEM with its own
448x448 transform) and backbone (the tiny test ViT of ``tests/assets`` — 8 blocks for GEM, whose default depth
needs 6 — and ViT-B-16 with random weights: the real architecture, so the timing is that of the real weights),
a fresh subprocess builds the model, runs ``model.extract`` on ``--images`` random uint8 images of ``--size``
(the same images for every model) with the authors' protocol settings of ``--dataset`` (``--settings-of M``:
every model with model M's settings, i.e. the same windows, to compare the cost per forward), and reports
images/s (after one warm-up image), the fastest single image ("best", the least disturbed by other processes
on a shared machine) and its ratio to MaskCLIP's on the same backbone (when MaskCLIP is among ``--models``),
the peak resident memory (``ru_maxrss``) minus the memory before the first image, and the bytes the cache
stores per image (fp16 features + uint8 label, the format of :mod:`floss.data.cache`).

    python benchmarks/bench_extract.py [--dataset pascalvoc20] [--size 375 500] [--images 2] [--device cpu]
        [--threads 2] [--backbones tiny ViT-B-16] [--models maskclip sclip clearclip gem] [--settings-of maskclip]
        [--clock wall|process]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = {"maskclip": "tests/assets/tiny-vit-gelu.json", "clipdinoiser": "tests/assets/tiny-vit-gelu.json",
        **{m: "tests/assets/tiny-vit-quickgelu.json" for m in ("naclip", "sclip", "clearclip")},
        **{m: "tests/assets/tiny-vit-quickgelu-deep.json" for m in ("gem", "gem_448")}}
REAL = {"maskclip": "ViT-B-16", "clipdinoiser": "ViT-B-16",
        **{m: "ViT-B-16-quickgelu" for m in ("naclip", "sclip", "clearclip", "gem", "gem_448")}}
#: benchmark name -> (registered model, extra create_model arguments)
BUILD = {"gem_448": ("gem", {"transform": "gem"})}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_case(model_name: str, backbone: str, dataset: str, size: tuple[int, int], images: int, device: str,
             threads: int, settings_of: str | None = None, clock: str = "wall") -> dict:
    import numpy as np
    import torch

    from floss.models import create_model, settings_for

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    registered, extra = BUILD.get(model_name, (model_name, {}))
    model = create_model(registered, backbone=backbone, pretrained="none", device=device, **extra)
    settings = settings_for(settings_of, dataset) if settings_of else model.protocol_settings(dataset)
    rng = np.random.default_rng(0)
    batch = [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(images + 1)]
    before = _rss_bytes()
    model.extract(batch[0], settings)                                  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    timer = time.process_time if clock == "process" else time.perf_counter
    times = []
    for image in batch[1:]:
        start = timer()
        feats = model.extract(image, settings)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(timer() - start)
    elapsed = sum(times)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cache_bytes = feats.feats.numel() * 2 + 16 * len(feats.boxes) + size[0] * size[1]
    return {"model": model_name, "backbone": Path(backbone).stem, "windows": int(feats.feats.shape[0]),
            "grid": list(feats.feats.shape[2:]), "images_per_s": images / elapsed, "s_per_image": elapsed / images,
            "best_s_per_image": min(times),
            "extra_peak_mib": (peak - before) / 2**20, "cache_mib_per_image": cache_bytes / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="pascalvoc20")
    parser.add_argument("--size", type=int, nargs=2, default=(375, 500), metavar=("H", "W"))
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backbones", nargs="+", default=["tiny", "ViT-B-16"], choices=["tiny", "ViT-B-16"])
    parser.add_argument("--models", nargs="+", default=["maskclip", "clipdinoiser", "naclip"], choices=sorted(TINY))
    parser.add_argument("--settings-of", choices=("maskclip", "clipdinoiser", "naclip", "sclip", "clearclip", "gem",
                                                  "gem_448"),
                        help="use this model's protocol settings for every model (default: each model's own)")
    parser.add_argument("--clock", choices=("wall", "process"), default="wall",
                        help="process = CPU time of the process (with --threads 1: robust to other processes "
                             "sharing the cores; CPU only)")
    parser.add_argument("--case", help=argparse.SUPPRESS)                # internal: one case per subprocess
    args = parser.parse_args()
    if args.case:
        model_name, backbone = args.case.split("|")
        print(json.dumps(run_case(model_name, backbone, args.dataset, tuple(args.size), args.images, args.device,
                                  args.threads, args.settings_of, args.clock)))
        return
    which = f"{args.settings_of}'s settings for every model" if args.settings_of else "each model's own settings"
    print(f"dataset {args.dataset} ({which}); image {args.size[0]}x{args.size[1]}; {args.images} images; "
          f"device {args.device}; {args.threads} threads; {args.clock} clock")
    print(f"{'model':<13}{'backbone':<28}{'windows':>8}{'grid':>9}{'img/s':>9}{'s/img':>8}{'best':>8}"
          f"{'x MaskCLIP':>11}{'peak MiB':>10}{'cache MiB/img':>15}")
    for backbone_kind in args.backbones:
        reference = None
        for model_name in args.models:
            backbone = str(ROOT / TINY[model_name]) if backbone_kind == "tiny" else REAL[model_name]
            cmd = [sys.executable, __file__, "--case", f"{model_name}|{backbone}", "--dataset", args.dataset,
                   "--size", *map(str, args.size), "--images", str(args.images), "--device", args.device,
                   "--threads", str(args.threads), "--clock", args.clock]
            cmd += ["--settings-of", args.settings_of] if args.settings_of else []
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ,
                                                                                   "HF_HUB_OFFLINE": "1"})
            if out.returncode != 0:
                print(f"{model_name} {backbone_kind}: failed\n{out.stderr[-2000:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            if model_name == "maskclip":
                reference = r["best_s_per_image"]
            ratio = f"{r['best_s_per_image'] / reference:.2f}" if reference else "-"
            print(f"{model_name:<13}{r['backbone']:<28}{r['windows']:>8}{'x'.join(map(str, r['grid'])):>9}"
                  f"{r['images_per_s']:>9.2f}{r['s_per_image']:>8.2f}{r['best_s_per_image']:>8.2f}{ratio:>11}"
                  f"{r['extra_peak_mib']:>10.0f}{r['cache_mib_per_image']:>15.2f}")


if __name__ == "__main__":
    main()
