"""Benchmark: per-image time of the ranking and the per-template evaluation by original image size, per model.

For each registered model (a tiny random open_clip ViT from ``tests/assets``, ``pretrained="none"``, on CPU)
with its ADE20K protocol settings (``settings_for(model, "ade20k")``: keep-ratio resize, sliding windows, the
authors' fp16 casts), one random RGB image per original size (96×128, 128×256, 256×512, the model's input
size — short side of its resize × twice that, i.e. no final resize —, 512×1024, 1024×2048) is encoded once
(not timed), then, in the same process, side by side:

* ``rank``: :func:`floss.protocol.rank_record` (what ``floss rank`` / ``rank_images`` runs per image) for
  ``--templates`` single-template classifiers of ``--classes`` classes (ADE20K: 150), entropy;
* ``eval``: :func:`floss.protocol.kernels.argmax.per_template_confusion` (``evaluate_cache(per_template=True)``) of the same
  classifiers against a random label.

Prints a markdown table of seconds per image (median of ``--repeats``, the sizes alternating). ``--old`` also
times both with the renderer's previous separable band path (dense float64 matmuls) swapped back in and
checks that every statistic and confusion matrix is identical.

    CUDA_VISIBLE_DEVICES= python benchmarks/bench_sizes.py [--models ...] [--templates 8] [--classes 150]
        [--repeats 3] [--threads 2] [--old] [--sizes 96x128 input ...]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from floss import protocol

from floss.core.kernels import interp as _interp

from floss.protocol import rendering
from floss.protocol.kernels.argmax import per_template_confusion
from floss.data.cache import ImageRecord
from floss.models import available_models, create_model

ASSETS = Path(__file__).resolve().parent.parent / "tests" / "assets"
CONFIG = {"naclip": "tiny-vit-quickgelu.json", "sclip": "tiny-vit-quickgelu.json",
          "clearclip": "tiny-vit-quickgelu.json", "gem": "tiny-vit-quickgelu-deep.json"}   # GEM: depth 7 fits
SIZES = [(96, 128), (128, 256), (256, 512), "input", (512, 1024), (1024, 2048)]


def old_separable(rows: torch.Tensor, x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The previous band path: dense float64 matmuls rounded to float32."""
    width = torch.matmul(x.double(), cols.double().T).float()
    return _interp.rows_matmul(rows.double(), width.double()).to(x.dtype)


def run(record, text, settings, label, k):
    st = protocol.new_template_stats(("entropy",), text.shape[0], k, text.shape[2], False, "cpu")
    t0 = time.perf_counter()
    protocol.rank_record(st, record, text, settings, list(range(k)))
    t1 = time.perf_counter()
    conf = per_template_confusion(record, text, settings, list(range(k)), k, label, "cpu")
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, (st.counts.clone(), st._get_state()["sums"].clone(), conf)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=available_models())
    ap.add_argument("--templates", type=int, default=8)
    ap.add_argument("--classes", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--old", action="store_true", help="also time the previous band path; check equality")
    ap.add_argument("--sizes", nargs="+", default=None, help="HxW or 'input' (default: all six)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    k = args.classes
    g = torch.Generator().manual_seed(0)
    rows, same = [], True
    sizes = SIZES if args.sizes is None else [v if v == "input" else tuple(int(x) for x in v.split("x"))
                                              for v in args.sizes]
    for name in args.models:
        torch.manual_seed(0)
        model = create_model(name, backbone=str(ASSETS / CONFIG.get(name, "tiny-vit-gelu.json")), pretrained="none")
        settings = model.protocol_settings("ade20k")
        text = F.normalize(torch.randn(args.templates, k, model.feature_dim, generator=g), dim=-1)
        short = min(settings.scale)
        cases = []
        for size in sizes:
            H, W = (short, 2 * short) if size == "input" else size          # input: 1:2 as most sizes
            image = (torch.rand(H, W, 3, generator=g) * 255).to(torch.uint8).numpy()
            f = model.extract(np.ascontiguousarray(image), settings)
            label = torch.randint(0, k, (H, W), generator=g).to(torch.uint8)
            record = ImageRecord("x", f.feats.cpu(), torch.as_tensor(f.boxes), f.resized_size, f.orig_size, label)
            cases.append((f"{H}×{W}" + (" (input)" if size == "input" else ""), record, label))
        # the sizes alternate within each repeat (and the previous code after the current one): same conditions
        new = {c[0]: [] for c in cases}
        old = {c[0]: [] for c in cases}
        for _ in range(args.repeats):
            for label_size, record, label in cases:
                new[label_size].append(run(record, text, settings, label, k))
                if args.old:
                    saved, rendering._separable = rendering._separable, old_separable
                    try:
                        old[label_size].append(run(record, text, settings, label, k))
                    finally:
                        rendering._separable = saved
                    same &= all(torch.equal(a, b) for a, b in zip(new[label_size][-1][2], old[label_size][-1][2]))
        cells = []
        for label_size, record, _ in cases:
            cell = [statistics.median(r[i] for r in new[label_size]) for i in (0, 1)]
            if args.old:
                cell += [statistics.median(r[i] for r in old[label_size]) for i in (0, 1)]
            print(f"{name} {label_size}: resized {record.resized_size}, {record.num_windows} windows, rank "
                  f"{cell[0]:.2f} s, eval {cell[1]:.2f} s" + (f" (previous {cell[2]:.2f} / {cell[3]:.2f} s)"
                                                               if args.old else ""), flush=True)
            cells.append((label_size, cell))
        rows.append((name, cells))
    heads = [c for c, _ in rows[0][1]]
    print(f"\nseconds per image, rank + per-template eval ({args.templates} templates, K={k}, ADE20K settings)\n")
    print("| model | " + " | ".join("input (s×2s)" if "(input)" in h else h for h in heads) + " |")
    print("|---" * (len(heads) + 1) + "|")
    for name, cells in rows:
        def fmt(c):
            s = f"{c[0]:.1f} + {c[1]:.1f}"
            return s + (f" (was {c[2]:.1f} + {c[3]:.1f})" if args.old else "")
        print(f"| {name} | " + " | ".join(fmt(c) for _, c in cells) + " |")
    if args.old:
        print(f"\nstatistics and confusion matrices identical to the previous band path: {same}")


if __name__ == "__main__":
    main()
