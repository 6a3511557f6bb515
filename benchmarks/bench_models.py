"""Speed per model: images/s of each built-in model's extraction on each paper dataset, at its protocol size.

For every built-in model (``floss.models.BUILT_IN``) and each of the five paper datasets, one synthetic random
uint8 RGB image of the dataset's typical original size (Cityscapes 1024x2048, PASCAL VOC / PASCAL Context
375x500, ADE20K 512x683, COCO-Stuff 480x640) goes through the extraction code path of
:mod:`floss.protocol.extraction` (``extract_split`` / ``rank_images`` with ``workers=0``):

* ``prepare_image`` at the model's protocol settings of that dataset (``model.protocol_settings(dataset)``:
  keep-ratio or stretched resize, sliding windows, padding for CLIP-DINOiser, CLIP normalisation), then
* ``model.encode`` (the model's ``window_features`` over the windows, ``window_batch_size`` at a time),

at the precision extraction picks (``resolve_precision(model, "auto", device)``: fp32 on CPU, the authors'
precision on CUDA). Not timed: decoding an image file, the text tower (computed once per dataset and cached) and
writing the feature cache. Each (model, dataset) is warmed up once (``prepare_image`` and the encoder on the
image's first window, the same window shape as the timed runs; ``--warm-up image``: the whole image), then timed
on ``--repeats`` images (``time.perf_counter``, CUDA synchronised); images/s = repeats / total seconds.
``--budget-s``: no case starts after that many seconds; the cases left are reported as not run (models run in
``--models`` order, both shapes of a model together).

Two shapes (``--shapes``):

* ``tiny``: a narrow random ViT with the depth of ViT-B/16 (12 blocks, width 64, patch 16:
  ``tests/assets/tiny-vit-quickgelu-12.json``, and the same with GELU for the models whose backbone has no
  QuickGELU), so every model's block indices work; the time is mostly the per-image overhead (resize, windows,
  the models' own non-ViT steps).
* ``vitb16``: each model's default backbone (``ViT-B-16`` or ``ViT-B-16-quickgelu``) with random weights
  (``pretrained="none"``): the real architecture, so the compute, and hence the time, is that of the real
  weights (no step depends on the weights' values for its cost).

Prints one markdown table per shape (model x dataset: images/s, seconds per image in brackets) and, with
``--out``, writes a JSON report: the environment (CPU, cores, torch and open_clip versions, threads, device, load
average before and after), and per (shape, model, dataset) the settings, windows and times.

    CUDA_VISIBLE_DEVICES= python benchmarks/bench_models.py [--models maskclip naclip] [--datasets cityscapes ade20k]
        [--shapes tiny,vitb16] [--repeats 2] [--device cpu|cuda] [--threads N] [--warm-up window|image]
        [--budget-s S] [--out speed.json]
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # run as a script from anywhere: the checkout's floss package
    sys.path.insert(0, str(ROOT))

from floss.models import BUILT_IN, create_model  # noqa: E402
import floss.models as floss_models  # noqa: E402
from floss.models.preprocess import prepare_image  # noqa: E402
from floss.protocol.extraction import resolve_precision  # noqa: E402

#: (height, width) of the synthetic image per paper dataset: its typical original size
DATASET_IMAGE_SIZES: dict[str, tuple[int, int]] = {
    "cityscapes": (1024, 2048), "pascalvoc20": (375, 500), "pascalco59": (375, 500), "ade20k": (512, 683),
    "cocostuff": (480, 640)}
SHAPES = ("tiny", "vitb16")
TINY_QUICKGELU_CONFIG = ROOT / "tests" / "assets" / "tiny-vit-quickgelu-12.json"


def tiny_gelu_config(folder: Path) -> Path:
    """The 12-block tiny config without QuickGELU (for MaskCLIP and CLIP-DINOiser, whose ViT-B-16 has none)."""
    config = json.loads(TINY_QUICKGELU_CONFIG.read_text())
    config.pop("quick_gelu", None)
    path = folder / "bench-tiny-vit-gelu-12.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def backbone_for(model_name: str, shape: str, gelu_config: Path) -> str:
    """The backbone of ``model_name`` for ``shape``: its default ViT-B/16 or the tiny config of the same activation."""
    default = getattr(floss_models, BUILT_IN[model_name][1]).default_backbone
    if shape == "vitb16":
        return default
    return str(TINY_QUICKGELU_CONFIG if "quickgelu" in default else gelu_config)


def synthetic_image(dataset: str) -> np.ndarray:
    height, width = DATASET_IMAGE_SIZES[dataset]
    return np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def extract_once(model, image: np.ndarray, settings) -> tuple[float, float, object]:
    """(prepare seconds, encode seconds, features) of one image, as the extraction loop runs it."""
    device = torch.device(model.device)
    start = time.perf_counter()
    prepared = prepare_image(image, settings, model.patch_size if model.pad_to_patch else None)
    prepared_at = time.perf_counter()
    features = model.encode(prepared)
    _synchronize(device)
    return prepared_at - start, time.perf_counter() - prepared_at, features


def warm_up(model, image: np.ndarray, settings, whole_image: bool) -> None:
    """prepare_image, then encode the whole image or (default) only its first window: the same code and window
    shape as the timed runs at a fraction of the cost (ResCLIP's PAMR takes minutes per image on a 2-core CPU)."""
    prepared = prepare_image(image, settings, model.patch_size if model.pad_to_patch else None)
    if not whole_image:
        prepared = prepared._replace(crops=prepared.crops[:1], boxes=prepared.boxes[:1])
    model.encode(prepared)
    _synchronize(torch.device(model.device))


def time_model_on_dataset(model, dataset: str, repeats: int, warm_up_image: bool = False) -> dict:
    settings = model.protocol_settings(dataset)
    image = synthetic_image(dataset)
    warm_up(model, image, settings, warm_up_image)
    prepare_s, encode_s = [], []
    for _ in range(repeats):
        prep, enc, features = extract_once(model, image, settings)
        prepare_s.append(prep)
        encode_s.append(enc)
    total = [p + e for p, e in zip(prepare_s, encode_s)]
    return {"dataset": dataset, "image_size": list(image.shape[:2]), "settings": settings.to_dict(),
            "resized_size": list(features.resized_size), "windows": int(features.feats.shape[0]),
            "feature_grid": list(features.feats.shape[2:]), "repeats": repeats,
            "images_per_s": repeats / sum(total), "s_per_image": sum(total) / repeats,
            "best_s_per_image": min(total), "prepare_s_per_image": sum(prepare_s) / repeats,
            "encode_s_per_image": sum(encode_s) / repeats, "seconds": total}


def benchmark_model(model_name: str, shape: str, datasets: list[str], repeats: int, device: str,
                    gelu_config: Path, warm_up_image: bool = False, deadline: float | None = None) -> dict:
    """Build ``model_name`` at ``shape`` (random weights) and time it on ``datasets``; a dataset whose turn comes
    after ``deadline`` (a ``time.perf_counter`` value) is listed under ``"not_run"`` instead."""
    backbone = backbone_for(model_name, shape, gelu_config)
    precision = resolve_precision(model_name, "auto", device)
    entry = {"shape": shape, "model": model_name, "backbone": Path(backbone).stem, "precision": precision,
             "build_s": None, "datasets": [], "not_run": []}
    if deadline is not None and time.perf_counter() > deadline:
        entry["not_run"] = list(datasets)
        return entry
    torch.manual_seed(0)
    start = time.perf_counter()
    model = create_model(model_name, backbone=backbone, pretrained="none", device=device, precision=precision)
    entry["build_s"] = time.perf_counter() - start
    for dataset in datasets:
        if deadline is not None and time.perf_counter() > deadline:
            entry["not_run"].append(dataset)
        else:
            entry["datasets"].append(time_model_on_dataset(model, dataset, repeats, warm_up_image))
    del model
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return entry


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        with open("/proc/loadavg") as f:
            return [float(v) for v in f.read().split()[:3]]
    except OSError:
        return None


def environment(device: str) -> dict:
    import open_clip
    env = {"cpu": _cpu_name(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
           "torch": torch.__version__, "open_clip": open_clip.__version__, "threads": torch.get_num_threads(),
           "device": device, "platform": platform.platform(),
           "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def markdown_table(results: list[dict], shape: str, datasets: list[str]) -> str:
    """Model x dataset: images/s (seconds per image) of one shape."""
    lines = ["| model | " + " | ".join(datasets) + " |", "|---" * (len(datasets) + 1) + "|"]
    for entry in results:
        if entry["shape"] != shape:
            continue
        by_dataset = {r["dataset"]: r for r in entry["datasets"]}
        cells = [f"{by_dataset[d]['images_per_s']:.3g} ({by_dataset[d]['s_per_image']:.3g} s)" if d in by_dataset
                 else "not run" for d in datasets]
        lines.append(f"| {entry['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _names(text: str, known, what: str) -> list[str]:
    names = [n.strip() for n in text.replace(" ", ",").split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SystemExit(f"{what}: expected names among {', '.join(known)}; received {text!r}")
    return names


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(BUILT_IN), help="built-in models (default: all)")
    parser.add_argument("--datasets", nargs="+", default=list(DATASET_IMAGE_SIZES),
                        help="paper datasets (default: all five)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated: tiny, vitb16")
    parser.add_argument("--repeats", type=int, default=2, help="timed images per (model, dataset), after 1 warm-up")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--warm-up", choices=("window", "image"), default="window",
                        help="warm-up per (model, dataset): prepare the image and encode its first window "
                             "(default) or the whole image")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no (model, shape, dataset) after this many seconds; those left are reported "
                             "as not run (the case running at the deadline finishes)")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)
    models = _names(",".join(args.models), list(BUILT_IN), "--models")
    datasets = _names(",".join(args.datasets), list(DATASET_IMAGE_SIZES), "--datasets")
    shapes = _names(args.shapes, SHAPES, "--shapes")
    if args.repeats < 1:
        raise SystemExit(f"--repeats: expected a positive integer, received {args.repeats}")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here")
    if args.threads:
        torch.set_num_threads(args.threads)
    # pretrained="none" is the point here: the loaders' RANDOM-weights warnings would only repeat it
    logging.getLogger("floss").setLevel(logging.ERROR)
    logging.getLogger().addFilter(lambda record: not record.getMessage().startswith("No pretrained weights"))

    report = {"arguments": sys.argv[1:] if argv is None else list(argv),
              "environment": environment(args.device), "load_average_before": load_average(),
              "weights": "random (pretrained='none'): the same architecture and compute as the real weights",
              "timed": "prepare_image + model.encode per image (floss.protocol.extraction, workers=0)",
              "repeats": args.repeats, "warm_up": args.warm_up, "budget_s": args.budget_s,
              "results": []}
    env = report["environment"]
    print(f"# {env['cpu']} ({env['cpu_count']} cores), torch {env['torch']}, {env['threads']} threads, "
          f"device {env['device']}; load {report['load_average_before']}; {args.repeats} timed images after a "
          f"{args.warm_up} warm-up per (model, dataset); random weights", flush=True)
    started = time.perf_counter()
    deadline = None if args.budget_s is None else started + args.budget_s
    with tempfile.TemporaryDirectory(prefix="bench-models-") as folder:
        gelu_config = tiny_gelu_config(Path(folder))
        for model_name in models:                  # model-major: a budget cut leaves whole models, both shapes
            for shape in shapes:
                entry = benchmark_model(model_name, shape, datasets, args.repeats, args.device, gelu_config,
                                        args.warm_up == "image", deadline)
                report["results"].append(entry)
                summary = ", ".join(f"{r['dataset']} {r['images_per_s']:.3g} img/s ({r['windows']} windows)"
                                    for r in entry["datasets"])
                if entry["not_run"]:
                    summary += f"; not run (time budget): {', '.join(entry['not_run'])}"
                print(f"{shape} {model_name} [{entry['backbone']}]: {summary}", flush=True)
    report["wall_s"] = time.perf_counter() - started
    report["load_average_after"] = load_average()
    for shape in shapes:
        backbones = sorted({e["backbone"] for e in report["results"] if e["shape"] == shape})
        print(f"\n## {shape} ({', '.join(backbones)}): images/s (seconds per image)\n")
        print(markdown_table(report["results"], shape, datasets))
    print(f"\nwall {report['wall_s']:.0f} s; load {report['load_average_before']} -> {report['load_average_after']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
