"""The effect of an fp16 feature cache against the exact fp32 one: experts that change and Δ mIoU.

Extracts the train and val splits once in fp32 (the default) and once in fp16, ranks both train caches
(entropy), selects the top-N experts per class, and evaluates baseline and FLOSS on both val caches. Reports how
many classes change at least one expert, how many expert slots change, and the mIoU differences (pp).

    python benchmarks/bench_cache_dtype.py --model naclip --dataset cityscapes --data-root /data/cityscapes
    python benchmarks/bench_cache_dtype.py --fabricate --model maskclip        # tiny random model, generated data

Random weights (``--fabricate``) show the mechanics, not the size of the effect on CLIP features: run it with the
real weights on a real dataset for the number that matters (the README quotes what was measured, and on what).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from floss import cli  # noqa: E402
from floss.data.cache import FeatureCache  # noqa: E402
from floss.protocol import evaluate_cache, rank_cache  # noqa: E402
from floss.core.rankings import select_experts  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="maskclip")
    p.add_argument("--dataset", default="cityscapes")
    p.add_argument("--data-root", type=Path)
    p.add_argument("--backbone")
    p.add_argument("--pretrained")
    p.add_argument("--checkpoint")
    p.add_argument("--device", default=None)
    p.add_argument("--limit", type=int, help="first N images per split")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--fabricate", action="store_true", help="tiny random model on generated data (no weights needed)")
    p.add_argument("--out", type=Path, help="JSON of the measurement")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_args = []
        if args.fabricate:
            from layouts import make_dataset
            args.data_root = make_dataset(args.dataset, tmp / "data", n_train=6, n_val=4, size=(96, 192))
            config = "tiny-vit-quickgelu.json" if args.model in ("naclip", "sclip", "clearclip", "gem") \
                else "tiny-vit-gelu.json"
            model_args = ["--backbone", str(ROOT / "tests/assets" / config), "--pretrained", "none"]
        else:
            for key in ("backbone", "pretrained", "checkpoint"):
                if getattr(args, key):
                    model_args += [f"--{key}", getattr(args, key)]
        if args.device:
            model_args += ["--device", args.device]
        caches = {}
        for dtype in ("fp32", "fp16"):
            for split in ("train", "val"):
                out = tmp / dtype / split
                code = cli.main(["extract", "--model", args.model, "--dataset", args.dataset, "--split", split,
                                 "--data-root", str(args.data_root), "--out", str(out), "--dtype", dtype,
                                 "--workers", "0", *model_args, *(["--limit", str(args.limit)] if args.limit else [])])
                if code:
                    return code
                caches[dtype, split] = FeatureCache(out)
        experts, results = {}, {}
        for dtype in ("fp32", "fp16"):
            st = rank_cache(caches[dtype, "train"], metrics=("entropy",), progress=False)
            names = cli.rankings_keys(caches[dtype, "train"])
            experts[dtype] = select_experts(st.rankings(names), n=args.n)
            res = evaluate_cache(caches[dtype, "val"], experts=experts[dtype], fusions=("highest",), progress=False)
            results[dtype] = {m: res["methods"][m]["miou"] for m in ("baseline", "floss")}
        changed_classes = sum(a != b for a, b in zip(experts["fp32"], experts["fp16"]))
        changed_slots = sum(len(set(a) - set(b)) for a, b in zip(experts["fp32"], experts["fp16"]))
        report = {"model": args.model, "dataset": args.dataset, "fabricated": args.fabricate,
                  "classes": len(experts["fp32"]), "classes_with_changed_experts": changed_classes,
                  "expert_slots_changed": changed_slots, "slots": args.n * len(experts["fp32"]),
                  "miou_fp32": results["fp32"], "miou_fp16": results["fp16"],
                  "delta_pp": {m: results["fp16"][m] - results["fp32"][m] for m in ("baseline", "floss")},
                  "train_images": len(caches["fp32", "train"]), "val_images": len(caches["fp32", "val"])}
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
