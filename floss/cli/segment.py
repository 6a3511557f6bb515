"""``floss segment``: what FLOSS changes on your images — baseline and FLOSS masks side by side.

    python -m floss segment --model clipdinoiser --checkpoint model_weights.pth --images DIR --classes classes.txt \\
        --rankings rankings.json --out masks/

For every image: ``<out>/baseline/<id>.png`` and ``<out>/floss/<id>.png`` (palette PNGs whose pixel values are the
class ids), ``<out>/side_by_side/<id>.png`` (image | baseline | FLOSS | pixels FLOSS changed, in white) and
``<out>/classes.json`` (class id -> name and colour). The decisions are exactly the evaluation's
(:class:`floss.protocol.Predictor`: per-window fusion as the authors, at the original resolution).
"""
from __future__ import annotations

import argparse
import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["palette", "side_by_side", "run_segment"]


def palette(num_classes: int) -> np.ndarray:
    """[K, 3] uint8 colours, distinct and stable (a hash of the class id, brightened); 255 (ignore) is black."""
    colours = np.zeros((num_classes, 3), dtype=np.uint8)
    for k in range(num_classes):
        digest = hashlib.sha256(f"floss-class-{k}".encode()).digest()
        colours[k] = 64 + np.frombuffer(digest[:3], dtype=np.uint8) // 4 * 3
    return colours


def _colour(label: np.ndarray, colours: np.ndarray) -> np.ndarray:
    out = np.zeros((*label.shape, 3), dtype=np.uint8)
    valid = label < len(colours)
    out[valid] = colours[label[valid]]
    return out


def side_by_side(image: np.ndarray, baseline: np.ndarray, fused: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """One RGB strip: the image, the baseline's and FLOSS's colour masks, and the changed pixels (white)."""
    changed = np.repeat(((baseline != fused) * 255).astype(np.uint8)[..., None], 3, axis=2)
    gap = np.full((image.shape[0], 4, 3), 255, dtype=np.uint8)
    return np.concatenate([image, gap, _colour(baseline, colours), gap, _colour(fused, colours), gap, changed], 1)


def _save_index_png(path: Path, label: np.ndarray, colours: np.ndarray) -> None:
    from PIL import Image

    from floss.util.io import atomic_write
    img = Image.fromarray(label.astype(np.uint8))
    flat = np.zeros((256, 3), dtype=np.uint8)
    flat[:len(colours)] = colours
    img.putpalette(flat.reshape(-1).tolist())
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def _configure(p: argparse.ArgumentParser) -> None:
    from floss.cli import inputs as cli_inputs
    p.add_argument("--model", required=True, help="a registered model (maskclip, clipdinoiser, naclip, ...)")
    cli_inputs._configure_images(p, split_default="val")
    cli_inputs._configure_model(p)
    p.add_argument("--protocol", choices=("authors", "paper"), default="authors")
    p.add_argument("--rankings", required=True, type=Path, help="rankings JSON (floss rank) that selects the experts")
    p.add_argument("--n-experts", type=int, default=4)
    p.add_argument("--metric", default="entropy")
    p.add_argument("--fusion", default="highest", choices=("highest", "average", "default", "average_all"))
    p.add_argument("--limit", type=int, help="only the first N images")
    p.add_argument("--out", required=True, type=Path, help="folder for baseline/, floss/, side_by_side/")
    p.add_argument("--templates", type=Path, metavar="FILE",
                   help="prompt templates, one per line with '{}' (default: the ones the --rankings file names, i.e. "
                        "CLIP's 80 for a file of the authors' schema); must be the set the rankings were made with")


def run_segment(args: argparse.Namespace) -> int:
    from PIL import Image

    from floss.cli import inputs as cli_inputs
    from floss.util.io import atomic_write, atomic_write_json
    from floss.data.cache_manifest import ImageRecord
    from floss.core.classes import match_rankings_classes
    from floss.protocol.extraction import prepared_images, text_embeddings
    from floss.protocol import Predictor
    from floss.core.rankings import check_rankings_templates, load_rankings, rankings_templates, select_experts

    source = cli_inputs.ImageSource(args, labels=False, model=args.model)
    rankings = load_rankings(args.rankings)
    if args.templates is not None:
        templates = cli_inputs.load_template_arg(args)
        check_rankings_templates(rankings, templates, f"--rankings: {args.rankings}", args.metric,
                                 against=f"the --templates {args.templates}")
    else:
        templates = rankings_templates(rankings, args.metric)
    keys = match_rankings_classes(rankings, source.keys, args.rankings)
    experts = select_experts(rankings, n=args.n_experts, metric=args.metric, class_names=keys)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = cli_inputs.load_model(args, device)
    settings = model.protocol_settings(source.settings_dataset, args.protocol)
    text = text_embeddings(model, source.queries, cache_dir=args.text_cache, templates=templates).to(device)
    predictor = Predictor(text, settings, source.query_to_class, len(source.class_names), experts, (args.fusion,))
    colours = palette(len(source.class_names))
    ids = sorted(source.ds.ids)[:args.limit] if args.limit else sorted(source.ds.ids)
    position = {image_id: i for i, image_id in enumerate(source.ds.ids)}
    changed_total = pixels_total = 0
    for image_id, _, prepared in prepared_images(model, source.ds, ids, settings, workers=args.workers,
                                                 desc="segment"):
        f = model.encode(prepared)
        record = ImageRecord(image_id, f.feats, torch.as_tensor(f.boxes), f.resized_size, f.orig_size)
        maps = {k: v.cpu().numpy() for k, v in predictor.predict(record).items()}
        baseline, fused = maps["baseline"], maps[f"floss_{args.fusion}"]
        _save_index_png(args.out / "baseline" / f"{image_id}.png", baseline, colours)
        _save_index_png(args.out / "floss" / f"{image_id}.png", fused, colours)
        image = source.ds[position[image_id]].image        # decoded again: only for the picture
        strip = Image.fromarray(side_by_side(image, baseline, fused, colours))
        atomic_write(args.out / "side_by_side" / f"{image_id}.png", lambda tmp: strip.save(tmp, format="PNG"))
        changed_total += int((baseline != fused).sum())
        pixels_total += baseline.size
    atomic_write_json(args.out / "classes.json", {str(k): {"name": n, "rgb": colours[k].tolist(),
                                                           "experts": experts[k]}
                                                  for k, n in enumerate(source.class_names)})
    logger.info("wrote baseline, FLOSS and side-by-side masks of %d images to %s; FLOSS changed %.2f %% of the "
                "pixels", len(ids), args.out, 100.0 * changed_total / max(pixels_total, 1))
    return 0


def register() -> None:
    from floss import cli
    if "segment" not in cli.COMMANDS:
        cli.add_subcommand("segment", _configure, run_segment,
                           "baseline and FLOSS colour masks (and a side-by-side PNG) for a folder of images")


register()
