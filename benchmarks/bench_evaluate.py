"""Benchmark: per-template evaluation and the FLOSS fusions, seconds per image at Cityscapes and ADE20K sizes.

One synthetic image per case, in the real cache format (``ImageRecord``: per-window L2-normalised features
``[Nw, D, gh, gw]``, boxes, sizes, uint8 label; a one-image ``FeatureCache`` on disk for ``evaluate_cache``),
with the authors' protocol geometry (``settings_for``):

* ``cityscapes``: 1024×2048 → 448×896, 3 windows of 448 (28×28 grids), K = 19, per-window softmax (MaskCLIP);
* ``cityscapes-naclip``: 1024×2048 → 560×1120, 224/112 windows (36, 14×14 grids), raw cosines ("final");
* ``ade20k``: 512×683 → 448×598, 2 windows of 448, K = 150, window outputs cast to fp16.

Features: ``blobs`` (default): a smooth random label field (~12 classes per image, 5 % ignore), each patch
``normalize(prototype of its pixel's class + noise·N(0, I/D))`` (``--noise``, default 1.0: noisy, MaskCLIP-like
maps), 80 templates ``normalize(prototype + 0.35·jitter + common)`` (D = 32: a tiny model's dimension; the
cost is in the K-class maps, not D); ``noise``: pure random features (the worst case for the shortcut).

Per image, in one process, alternating: ``per_template_confusion`` (what ``evaluate_cache(per_template=True)``
runs) for all M templates, and the previous rendering loop (``per_template_confusion_reference``: the
renderer's 8-template chunks, every band rendered at full size, argmax) for the first ``--ref-templates``
templates, extrapolated to M (its cost is linear in the templates), with the confusion matrices of those
templates compared exactly. Then ``evaluate_cache`` (baseline + the four FLOSS fusions, authors' protocol)
as is; ``--old-fusion`` also runs it with the previous code swapped back in (the renderer's dense matrix path
for windows over the band budget, i.e. ADE/COCO, and one ``fuse`` call per strategy).

    python benchmarks/bench_evaluate.py [--case cityscapes cityscapes-naclip ade20k] [--templates 80]
        [--ref-templates 8] [--repeats 2] [--threads 2] [--features blobs|noise] [--noise 1.0]
        [--fusions] [--old-fusion]

Measured on the 2-core dev container (torch 2.14.1 CPU, 2 threads, other engineers' jobs intermittently on
the same cores; load average in brackets). ``CUDA_VISIBLE_DEVICES= python benchmarks/bench_evaluate.py``
(``--repeats 2``, load 1.3), seconds per image, per-template evaluation of 80 templates:

    case                 ours    previous loop (from 8 templates)   confusions of those 8 identical
    cityscapes           5.67    68.1   (12.0x)                     yes
    cityscapes-naclip    8.46    92.5   (10.9x)                     yes
    ade20k               9.05    95.7   (10.6x)                     yes

``--features noise`` (pure random features, few uniform cells; load 1.7): 7.58 / 8.52 / 11.47 s (previous
70.2 / 100.3 / 116.5 s); identical confusions except one pixel of 16.8M on cityscapes-naclip, where the
renderer's two top classes tie to the last bit (floss.protocol.kernels.argmax, "Remaining difference"). At load 2.3-2.5 (both
cores taken by other jobs; ``OMP_WAIT_POLICY=PASSIVE`` so that the previous loop's 2-thread ops do not
stall): 15.2 / 18.1 / 21.9 s vs 115 / 141 / 199 s.

``--case cityscapes ade20k --ref-templates 0 --repeats 1 --old-fusion`` (load 1.4), baseline + the four
fusions (highest, average, default, average_all; authors' protocol): cityscapes 7.3 s (previous code 8.0 s,
confusions identical), ade20k 115.7 s (previous code 314.8 s: 2.7x, confusions identical). At ADE20K's
K = 150 the authors' fusion evaluates 151 maps of 150 classes at every window pixel (fp16): the remaining
time is that per-pixel work.
"""
from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from floss import protocol

from floss.protocol import rendering
from floss.protocol.kernels.argmax import per_template_confusion, per_template_confusion_reference
from floss.data.cache import CacheWriter, FeatureCache, ImageRecord
from floss.models.base import settings_for
from floss.models.preprocess import window_boxes

CASES = {
    "cityscapes": dict(model="maskclip", dataset="cityscapes", k=19, orig=(1024, 2048)),
    "cityscapes-naclip": dict(model="naclip", dataset="cityscapes", k=19, orig=(1024, 2048)),
    "ade20k": dict(model="maskclip", dataset="ade20k", k=150, orig=(512, 683)),
}
PATCH = 16


def resized_size(orig: tuple[int, int], scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's keep-ratio Resize: factor min(long_max / long, short_max / short), int(x·s + 0.5)."""
    h, w = orig
    s = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * s + 0.5), int(w * s + 0.5)


def make_case(name: str, templates: int, features: str, noise: float, dim: int = 32, seed: int = 0):
    """(record, text [M, K, D], settings) of one synthetic image of case ``name``."""
    c = CASES[name]
    settings = settings_for(c["model"], c["dataset"])
    k, (H, W) = c["k"], c["orig"]
    h, w = resized_size((H, W), settings.scale)
    g = torch.Generator().manual_seed(seed)
    protos = F.normalize(torch.randn(k, dim, generator=g), dim=1)
    common = F.normalize(torch.randn(dim, generator=g), dim=0)
    text = F.normalize(protos[None] + 0.35 * torch.randn(templates, k, dim, generator=g) / math.sqrt(dim) + common,
                       dim=-1)
    boxes = torch.as_tensor(window_boxes(h, w, settings.crop, settings.stride))
    gh, gw = int(boxes[0, 1] - boxes[0, 0]) // PATCH, int(boxes[0, 3] - boxes[0, 2]) // PATCH
    present = torch.randperm(k, generator=g)[:min(k, 12)]
    logits = torch.randn(len(present), max(2, H // 96), max(2, W // 96), generator=g)
    field = present[F.interpolate(logits[None], size=(H, W), mode="bilinear", align_corners=False)[0].argmax(0)]
    label = field.to(torch.uint8)
    label[torch.rand(H, W, generator=g) < 0.05] = 255
    feats = []
    for y1, y2, x1, x2 in boxes.tolist():
        ys = ((y1 + (torch.arange(gh) + 0.5) * (y2 - y1) / gh) * H / h).long().clamp(0, H - 1)
        xs = ((x1 + (torch.arange(gw) + 0.5) * (x2 - x1) / gw) * W / w).long().clamp(0, W - 1)
        if features == "noise":
            f = torch.randn(gh, gw, dim, generator=g)
        else:
            f = protos[field[ys][:, xs]] + noise * torch.randn(gh, gw, dim, generator=g) / math.sqrt(dim)
        feats.append(F.normalize(f, dim=-1).permute(2, 0, 1))
    record = ImageRecord(f"{name}-0", torch.stack(feats), boxes.to(torch.int32), (h, w), (H, W), label)
    return record, text, settings


def write_cache(path, record: ImageRecord, text: torch.Tensor, settings, name: str) -> FeatureCache:
    k = text.shape[1]
    names = [f"c{i}" for i in range(k)]
    meta = {"model": CASES[name]["model"], "dataset": CASES[name]["dataset"], "split": "val", "class_names": names,
            "query_names": names, "query_to_class": list(range(k)), "settings": settings.to_dict()}
    with CacheWriter(path, meta, {"bench": name}, text, dtype=torch.float32) as writer:
        writer.add(record)
    return FeatureCache(path)


def old_upsample_rows(m: torch.Tensor, size, rows: slice) -> torch.Tensor:
    """An earlier renderer band path: dense interpolation matrices, the whole window's width pass ([R, N, W])."""
    uh = rendering._interp_matrix(m.shape[-2], size[0], str(m.device))[rows]
    uw = rendering._interp_matrix(m.shape[-1], size[1], str(m.device))
    return rendering._rows_matmul(uh, torch.matmul(m, uw.T)).transpose(0, 1)


def old_fuse_many(experts, fallback, strategies):
    """The previous fusion call: one ``fuse`` (checks and self-prediction test included) per strategy."""
    from floss.core.fusion import fuse
    return [fuse(experts, fallback, s) for s in strategies]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--templates", type=int, default=80)
    ap.add_argument("--ref-templates", type=int, default=8, help="templates rendered by the previous loop (0: skip)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--features", choices=["blobs", "noise"], default="blobs")
    ap.add_argument("--noise", type=float, default=1.0)
    ap.add_argument("--fusions", action="store_true", help="also time evaluate_cache with the four fusions")
    ap.add_argument("--old-fusion", action="store_true", help="and with the previous code swapped back in")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"threads={args.threads} templates={args.templates} features={args.features} noise={args.noise} "
          f"load average {' '.join(load)}")
    for name in args.case:
        record, text, settings = make_case(name, args.templates, args.features, args.noise)
        k, q2c = text.shape[1], list(range(text.shape[1]))
        label = record.label
        print(f"\n== {name}: orig {record.orig_size}, resized {record.resized_size}, {record.num_windows} windows "
              f"of {tuple(record.feats.shape[-2:])} patches, K={k}, stage={settings.softmax_stage}, "
              f"fp16={settings.window_fp16}")
        new_t, old_t, equal = [], [], True
        m_ref = min(args.ref_templates, args.templates)
        for _ in range(args.repeats):
            t, fast = timed(lambda: per_template_confusion(record, text, settings, q2c, k, label, "cpu"))
            new_t.append(t)
            if m_ref:
                t, ref = timed(lambda: per_template_confusion_reference(record, text[:m_ref], settings, q2c, k, label,
                                                                          "cpu"))
                old_t.append(t * args.templates / m_ref)
                equal &= torch.equal(fast[:m_ref], ref)
        new_s = statistics.median(new_t)
        line = f"per-template ({args.templates} templates): {new_s:.2f} s/image"
        if m_ref:
            old_s = statistics.median(old_t)
            line += (f"; previous loop {old_s:.1f} s/image (extrapolated from {m_ref} templates) -> "
                     f"{old_s / new_s:.1f}x; confusions of those {m_ref} templates identical: {equal}")
        print(line, flush=True)
        if args.fusions or args.old_fusion:
            experts = [[(4 * c + j) % args.templates for j in range(4)] for c in range(k)]
            fusions = ["highest", "average", "default", "average_all"]
            with tempfile.TemporaryDirectory() as tmp:
                cache = write_cache(tmp, record, text, settings, name)
                t, res = timed(lambda: protocol.evaluate_cache(cache, experts, fusions=fusions, progress=False))
                print(f"baseline + 4 fusions: {t:.1f} s/image", flush=True)
                if args.old_fusion:
                    saved = rendering.upsample_rows, protocol.fuse_many
                    rendering.upsample_rows, protocol.fuse_many = old_upsample_rows, old_fuse_many
                    try:
                        t_old, res_old = timed(lambda: protocol.evaluate_cache(cache, experts, fusions=fusions,
                                                                               progress=False))
                    finally:
                        rendering.upsample_rows, protocol.fuse_many = saved
                    same = all(torch.equal(res["confusion"][key], res_old["confusion"][key]) for key in res["confusion"])
                    print(f"  previous code (dense matrix path, one fuse per strategy): {t_old:.1f} s/image "
                          f"({t_old / t:.1f}x); "
                          f"confusions identical: {same}", flush=True)


if __name__ == "__main__":
    main()
