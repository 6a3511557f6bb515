"""One prepared GPU profile of the paper profile's work, and its extrapolation to the whole paper profile.

On one GPU (a bare PyTorch environment with open_clip; no DVC), it fabricates Cityscapes-size (1024×2048, K=19),
ADE20K-size (512×683, K=150) and COCO-Stuff-size (480×640, K=171) images as files, then for MaskCLIP, NACLIP and
CLIP-DINOiser on ViT-B/16 (random weights, chosen explicitly: ``pretrained="none"``) and NACLIP on ViT-L/14 it runs

* **extract** — decode (DataLoader workers) → encoder → feature cache (fp32), as ``floss extract``;
* **rank** — the train-split statistics from that cache with the four metrics (entropy, avg-prob, MaNo, ITI);
* **rank-images** — the cache-free ranking (images → windows → statistics, nothing stored), as the paper profile;
* **evaluate** — baseline, FLOSS (four fusions) and the 80 per-template IoUs from the cache;

and prints, per step, images/s, the GPU memory peak, the GPU utilisation (``nvidia-smi`` sampled every 0.2 s) and
where the time goes (decode wait, encoder, logits, rendering, statistics, cache writes; CUDA-synchronised
timers). It then extrapolates the paper profile (3 models × 5 datasets train + val, the six transfer sets, NACLIP
ViT-L/14 on Cityscapes and PASCAL-Context) from the registry's split sizes, with ranking done from images.

    python benchmarks/gpu_profile.py --out /tmp/profile.json            # GPU, about 5 minutes on an H100/H200
    python benchmarks/gpu_profile.py --tiny --out /tmp/profile.json     # CPU smoke run with tiny models (tests)
    bash benchmarks/gpu_profile.sh                                      # the device-machine wrapper

Random weights give the real cost (the arithmetic does not depend on the values), not real numbers.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from floss import protocol  # noqa: E402

from floss.protocol import rendering
from floss.data.cache import CacheWriter, FeatureCache, ImageRecord  # noqa: E402
from floss.core.classes import CLASS_NAMES, query_names  # noqa: E402
from floss.data.datasets.folder import open_folder  # noqa: E402
from floss.data.datasets.registry import DATASETS  # noqa: E402
from floss.protocol.extraction import prepared_images, rank_images  # noqa: E402
from floss.models import base as model_base  # noqa: E402
from floss.models import create_model  # noqa: E402
from floss.core.stats import TemplateStats  # noqa: E402
from floss.core.text import template_embeddings  # noqa: E402

#: (scenario, image size, the dataset whose classes and protocol settings it uses)
SCENARIOS = {"cityscapes": ((1024, 2048), "cityscapes"), "ade20k": ((512, 683), "ade20k"),
             "cocostuff": ((480, 640), "cocostuff")}
MODELS = {"maskclip": ("maskclip", "ViT-B-16"), "naclip": ("naclip", "ViT-B-16-quickgelu"),
          "clipdinoiser": ("clipdinoiser", "ViT-B-16"), "naclip_vitl14": ("naclip", "ViT-L-14-quickgelu")}
TINY = {"maskclip": ("maskclip", "tests/assets/tiny-vit-gelu.json"),
        "naclip": ("naclip", "tests/assets/tiny-vit-quickgelu.json"),
        "clipdinoiser": ("clipdinoiser", "tests/assets/tiny-vit-gelu.json")}
METRICS = ("entropy", "avgprob", "mano", "iti")
FUSIONS = ("highest", "average", "default", "average_all")


# ------------------------------------------------------------------------------------------------ timing
class Timers:
    """Named wall-clock totals of wrapped functions; CUDA is synchronised around each timed call."""

    def __init__(self, cuda: bool):
        self.cuda, self.total, self.depth = cuda, defaultdict(float), 0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def section(self, name: str):
        if self.depth:                      # nested: attributed to the outer section only
            yield
            return
        self.sync()
        self.depth += 1
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.total[name] += time.perf_counter() - start
            self.depth -= 1

    def wrap(self, owner, attr: str, name: str):
        original = getattr(owner, attr)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            with self.section(name):
                return original(*args, **kwargs)
        setattr(owner, attr, timed)
        return original


class GpuSampler:
    """``nvidia-smi`` utilisation samples in a background thread (absent: no samples)."""

    def __init__(self, period: float = 0.2):
        self.period, self.samples, self._stop = period, [], threading.Event()
        self.available = shutil.which("nvidia-smi") is not None and torch.cuda.is_available()

    def _run(self) -> None:
        while not self._stop.is_set():
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                  "-i", str(torch.cuda.current_device())], capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip():
                self.samples.append(float(out.stdout.split()[0]))
            self._stop.wait(self.period)

    def __enter__(self):
        self.samples = []
        if self.available:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.available:
            self._stop.set()
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.samples) if self.samples else None


# ------------------------------------------------------------------------------------------------ inputs
def fabricate(folder: Path, size: tuple[int, int], n: int, num_classes: int, seed: int) -> tuple[Path, Path, Path]:
    """``n`` JPEG images of ``size`` with smooth colour blobs, PNG labels, and a class-names file."""
    import cv2
    from PIL import Image

    rng = np.random.default_rng(seed)
    images, labels = folder / "images", folder / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    H, W = size
    for i in range(n):
        low = rng.integers(0, 256, size=(max(2, H // 64), max(2, W // 64), 3), dtype=np.uint8)
        image = cv2.resize(low, (W, H), interpolation=cv2.INTER_LINEAR)
        cv2.imwrite(str(images / f"{i:04d}.jpg"), image)
        cls = rng.integers(0, num_classes, size=(max(2, H // 128), max(2, W // 128)), dtype=np.uint8)
        label = cv2.resize(cls, (W, H), interpolation=cv2.INTER_NEAREST)
        Image.fromarray(label).save(labels / f"{i:04d}.png")
    return images, labels, folder


def _classes_file(folder: Path, dataset: str) -> Path:
    path = folder / "classes.txt"
    path.write_text("\n".join(n.strip() for n in CLASS_NAMES[dataset]) + "\n")
    return path


# ------------------------------------------------------------------------------------------------ steps
def profile_pair(name: str, model, scenario: str, n: int, workers: int, tmp: Path, cuda: bool,
                 tiny: bool = False) -> dict:
    (H, W), dataset = SCENARIOS[scenario]
    K = len(CLASS_NAMES[dataset])
    folder = tmp / scenario
    if not (folder / "images").is_dir():
        fabricate(folder, (H, W) if not tiny else (H // 16, W // 16), n, K, seed=len(scenario))
    ds = open_folder(folder / "images", _classes_file(folder, dataset), folder / "labels")
    settings = model.protocol_settings(dataset, "authors")
    device = torch.device(model.device)
    queries, q2c = query_names(dataset, MODELS.get(name, TINY.get(name))[0])
    timers = Timers(cuda)
    out = {"model": name, "scenario": scenario, "images": len(ds), "size": [H, W], "classes": K, "steps": {}}
    with timers.section("text"):
        text = template_embeddings(model.encode_text, queries, device="cpu")
    out["text_s"] = timers.total.pop("text")
    restore = [timers.wrap(model, "encode", "encoder"), timers.wrap(protocol, "window_scores", "logits"),
               timers.wrap(protocol._Renderer, "render", "rendering"),
               timers.wrap(TemplateStats, "update", "statistics"), timers.wrap(CacheWriter, "add", "cache writes"),
               timers.wrap(FeatureCache, "__getitem__", "cache reads"), timers.wrap(rendering, "window_scores", "logits")]
    try:
        for step in ("extract", "rank", "rank-images", "evaluate"):
            timers.total.clear()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            with GpuSampler() as gpu:
                start = time.perf_counter()
                _run_step(step, model, ds, settings, text, q2c, tmp / f"{name}-{scenario}", workers, timers, device)
                timers.sync()
                wall = time.perf_counter() - start
            parts = dict(timers.total)
            parts["other (decode wait, python)"] = max(0.0, wall - sum(parts.values()))
            out["steps"][step] = {
                "seconds": wall, "images_per_s": len(ds) / wall,
                "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                "gpu_util_percent": gpu.mean, "parts_s": parts}
    finally:
        model.encode = restore[0]
        protocol.window_scores, protocol._Renderer.render = restore[1], restore[2]
        TemplateStats.update, CacheWriter.add, FeatureCache.__getitem__ = restore[3], restore[4], restore[5]
        rendering.window_scores = restore[6]
    return out


def _run_step(step, model, ds, settings, text, q2c, cache_dir: Path, workers, timers, device) -> None:
    if step == "extract":
        meta = {"model": model.name, "dataset": "folder", "split": "images", "class_names": ds.class_names,
                "query_names": [q for g in ds.groups for q in g], "query_to_class": q2c,
                "settings": settings.to_dict()}
        shutil.rmtree(cache_dir, ignore_errors=True)
        with CacheWriter(cache_dir, meta, {"profile": True}, text, dtype=torch.float32) as writer:
            for image_id, label, prepared in prepared_images(model, ds, list(ds.ids), settings, workers=workers,
                                                             progress=False):
                f = model.encode(prepared)
                writer.add(ImageRecord(image_id, f.feats, torch.as_tensor(f.boxes), f.resized_size, f.orig_size,
                                       torch.from_numpy(label)))
    elif step == "rank":
        protocol.rank_cache(FeatureCache(cache_dir), metrics=METRICS, device=device, progress=False)
    elif step == "rank-images":
        rank_images(model, ds, list(ds.ids), settings, text, q2c, metrics=METRICS, workers=workers, progress=False)
    else:
        cache = FeatureCache(cache_dir)
        protocol.evaluate_cache(cache, experts=[[0, 1, 2, 3]] * cache.num_classes, fusions=FUSIONS,
                                per_template=True, device=device, progress=False)


# ------------------------------------------------------------------------------------------------ paper
def extrapolate(results: list[dict]) -> dict:
    """Hours of the whole paper profile from the measured seconds per image (ranking from images)."""
    per = {(r["model"], r["scenario"]): r["steps"] for r in results}
    like = {"cityscapes": "cityscapes", "pascalvoc20": "cocostuff", "pascalco59": "cocostuff", "ade20k": "ade20k",
            "cocostuff": "cocostuff"}       # VOC/PC59 images are COCO-sized; K is smaller, so this is an upper bound
    count = lambda d, s: DATASETS[d].expected_counts[s]  # noqa: E731
    plan = []
    for model in ("maskclip", "naclip", "clipdinoiser"):
        for d in like:
            plan.append((model, d, "train", "rank-images"))
            plan += [(model, d, "val", "extract"), (model, d, "val", "evaluate")]
        for t in ("acdc_night", "acdc_fog", "acdc_rain", "acdc_snow", "bdd", "mapillary"):
            plan += [(model, t, "val", "extract"), (model, t, "val", "evaluate")]
    for d in ("cityscapes", "pascalco59"):
        plan += [("naclip_vitl14", d, "train", "rank-images"), ("naclip_vitl14", d, "val", "extract"),
                 ("naclip_vitl14", d, "val", "evaluate")]
    seconds, missing = 0.0, set()
    for model, d, split, step in plan:
        scenario = like.get(d, "cityscapes")
        steps = per.get((model, scenario)) or per.get((model, "cityscapes"))
        if steps is None:
            missing.add(model)
            continue
        seconds += count(d, split) / steps[step]["images_per_s"]
    return {"hours": seconds / 3600, "cityscapes_train_rank_minutes":
            count("cityscapes", "train") / per[("clipdinoiser", "cityscapes")]["rank-images"]["images_per_s"] / 60
            if ("clipdinoiser", "cityscapes") in per else None, "not_measured": sorted(missing)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file of every measurement")
    parser.add_argument("--tiny", action="store_true", help="tiny random models, 1/16-size images, CPU (tests)")
    parser.add_argument("--images", type=int, default=16, help="images per scenario")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader decode processes")
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda" if cuda else "cpu"
    table = TINY if args.tiny else MODELS
    names = args.models or list(table)
    torch.backends.cuda.matmul.allow_tf32 = False          # fp32 as the authors (no TF32)
    torch.backends.cudnn.allow_tf32 = False
    results, started = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            base, backbone = table[name]
            torch.manual_seed(0)
            precision = "fp16" if (cuda and model_base.authors_precision(base) == "fp16") else "fp32"
            model = create_model(base, backbone=str(ROOT / backbone) if backbone.endswith(".json") else backbone,
                                 pretrained="none", device=device,
                                 **({"precision": precision} if precision != "fp32" else {}))
            for scenario in args.scenarios:
                r = profile_pair(name, model, scenario, args.images, args.workers, Path(tmp), cuda, args.tiny)
                r["precision"] = precision
                results.append(r)
                line = ", ".join(f"{s} {v['images_per_s']:.2f} img/s" for s, v in r["steps"].items())
                print(f"{name:14s} {scenario:10s} {line}", flush=True)
            del model
            if cuda:
                torch.cuda.empty_cache()
    report = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "tiny": args.tiny, "seconds": time.perf_counter() - started, "results": results,
              "paper_profile": extrapolate(results)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(_table(report))
    return 0


def _table(report: dict) -> str:
    lines = [f"device: {report['device']}, torch {report['torch']}, {report['seconds']:.0f} s",
             "| model | scenario | step | img/s | GPU peak GiB | GPU util % | where the time goes (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        for step, v in r["steps"].items():
            parts = ", ".join(f"{k} {s:.2f}" for k, s in sorted(v["parts_s"].items(), key=lambda kv: -kv[1]) if s > 0.005)
            peak = "–" if v["gpu_peak_gib"] is None else f"{v['gpu_peak_gib']:.1f}"
            util = "–" if v["gpu_util_percent"] is None else f"{v['gpu_util_percent']:.0f}"
            lines.append(f"| {r['model']} | {r['scenario']} | {step} | {v['images_per_s']:.2f} | {peak} | {util} | "
                         f"{parts} |")
    p = report["paper_profile"]
    lines.append(f"paper profile (extrapolated): {p['hours']:.2f} h; Cityscapes train ranking (CLIP-DINOiser, from "
                 f"images): {p['cityscapes_train_rank_minutes'] or float('nan'):.1f} min")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
