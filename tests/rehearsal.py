"""The paper profile's ingredients, fabricated: the eight dataset layouts on disk, tiny random open_clip models
saved as weight files (a QuickGELU one for NACLIP, a second architecture standing in for ViT-L/14), a CLIP-DINOiser
head file in the layout of the authors' ``model_weights.pth``, and a scratch copy of the repository (a git repo,
as ``dvc exp run`` needs) — everything ``tests/test_paper_rehearsal.py`` runs the README's recipe on.

Image shapes are small and elongated on purpose: the protocol resizes every image to a short side of 336–560
(long side ≤ 2048), so a 12×1024 image becomes 24×2048 — a few thousand patches — instead of 448×597, while the
original (where labels and per-template IoUs live) stays tiny. Labels use only a few values, so most classes are
absent, and contain the stored value 0 (ignored after reduce_zero_label) and 255.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from floss.util import paths

from layouts import make_dataset

ASSETS = Path(__file__).resolve().parent / "assets"
#: dataset -> (height, width) of the fabricated images (see the module docstring)
SIZES = {"cityscapes": (20, 1024), "pascalvoc20": (12, 1024), "pascalco59": (12, 1024), "ade20k": (8, 1024),
         "cocostuff": (8, 1024), "acdc_night": (22, 1024), "acdc_fog": (22, 1024), "acdc_rain": (22, 1024),
         "acdc_snow": (22, 1024), "bdd": (22, 1024), "mapillary": (22, 1024)}
#: dataset -> folder under the data root (the layouts' usual folder names: params.yaml needs no dataset_dirs)
FOLDERS = {"cityscapes": "cityscapes", "pascalvoc20": "VOCdevkit/VOC2012", "pascalco59": "VOCdevkit/VOC2010",
           "ade20k": "ADEChallengeData2016", "cocostuff": "coco_stuff164k", "bdd": "bdd100k",
           "mapillary": "mapillary", **{f"acdc_{c}": "acdc" for c in ("night", "fog", "rain", "snow")}}
#: stored label values the fabricated labels use (besides 255): a few classes, the rest absent
LABEL_VALUES = (0, 1, 2, 3, 5, 8)


def _restrict_labels(root: Path) -> None:
    """Map every label PNG under ``root`` onto :data:`LABEL_VALUES` (255 kept; palette kept)."""
    for path in root.rglob("*.png"):
        if not any(part in ("gtFine", "SegmentationClass", "SegmentationClassContext", "annotations", "gt",
                            "labels", "val_label") for part in path.parts):
            continue
        if path.name.endswith("_gtFine_labelIds.png"):
            continue
        with Image.open(path) as im:
            mode, palette = im.mode, im.getpalette() if im.mode == "P" else None
            label = np.array(im)
        values = np.asarray(LABEL_VALUES, dtype=np.uint8)
        out = np.where(label == 255, 255, values[label % len(values)]).astype(np.uint8)
        img = Image.fromarray(out)
        if mode == "P":
            img.putpalette(palette)        # an L image becomes P with its values as palette indices
        img.save(path)


def make_paper_datasets(data_root: Path, n_train: int = 2, n_val: int = 1) -> Path:
    """All eight layouts (the four ACDC conditions share one root) under ``data_root``; returns it."""
    for i, (name, folder) in enumerate(FOLDERS.items()):
        root = data_root / folder
        make_dataset(name, root, n_train=n_train, n_val=n_val, size=SIZES[name], seed=i)
        _restrict_labels(root)
    return data_root


def _tiny_weights(config: Path, out: Path, seed: int) -> Path:
    """Random weights (seed) of the open_clip config ``config`` saved as a plain state-dict file."""
    import open_clip
    from floss.models.backbone import resolve_backbone

    name = resolve_backbone(str(config))
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    with torch.no_grad():           # non-trivial LayerNorm affines: every parameter matters
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.add_(0.2 * torch.randn(module.weight.shape))
                module.bias.add_(0.2 * torch.randn(module.bias.shape))
    torch.save(model.state_dict(), out)
    return out


def make_weights(folder: Path) -> dict[str, dict[str, str]]:
    """``extract.weights`` entries for every model of ``params.yaml``, pointing at fabricated files: a tiny GELU
    ViT, a tiny QuickGELU ViT (OpenAI CLIP's activation), a wider patch-14 one standing in for ViT-L/14, and
    CLIP-DINOiser's head."""
    folder.mkdir(parents=True, exist_ok=True)
    gelu = folder / "tiny-vit-gelu.json"
    quick = folder / "tiny-vit-quickgelu.json"
    large = folder / "tiny-vit-l-quickgelu.json"
    shutil.copy(ASSETS / "tiny-vit-gelu.json", gelu)
    shutil.copy(ASSETS / "tiny-vit-quickgelu.json", quick)
    cfg = json.loads(quick.read_text())          # the ViT-L/14 stand-in: patch 14, wider, one more block
    cfg["vision_cfg"].update(image_size=56, patch_size=14, width=96, layers=4, head_width=32)
    large.write_text(json.dumps(cfg, indent=1))
    gelu_w = _tiny_weights(gelu, folder / "tiny-vit-gelu.pt", 0)
    quick_w = _tiny_weights(quick, folder / "tiny-vit-quickgelu.pt", 1)
    large_w = _tiny_weights(large, folder / "tiny-vit-l-quickgelu.pt", 2)
    # CLIP-DINOiser's head in the authors' model_weights.pth layout: "model."-prefixed keys in a "state_dict"
    width = json.loads(gelu.read_text())["vision_cfg"]["width"]
    gen = torch.Generator().manual_seed(3)
    head = {"model.obj_proj.weight": 0.05 * torch.randn(256, width, 3, 3, generator=gen),
            "model.obj_proj.bias": 0.05 * torch.randn(256, generator=gen),
            "model.bkg_decoder.weight": 0.05 * torch.randn(1, width, 1, 1, generator=gen),
            "model.bkg_decoder.bias": torch.zeros(1)}
    head_path = folder / "model_weights.pth"
    torch.save({"state_dict": head}, head_path)
    # GEM's self-self path spans the last six blocks: deeper stand-ins for its entries
    deep = {}
    for seed, (name, src) in enumerate([("tiny-vit-quickgelu-6", quick), ("tiny-vit-l-quickgelu-6", large)], 4):
        cfg = json.loads(src.read_text())
        cfg["vision_cfg"]["layers"] = 6
        (folder / f"{name}.json").write_text(json.dumps(cfg, indent=1))
        deep[src] = (folder / f"{name}.json", _tiny_weights(folder / f"{name}.json", folder / f"{name}.pt", seed))
    # ResCLIP (RCS over blocks 6-9) and SC-CLIP (blocks 4-10) need the 12 blocks of a ViT-B: a 12-block tiny one
    twelve = folder / "tiny-vit-quickgelu-12.json"
    shutil.copy(ASSETS / "tiny-vit-quickgelu-12.json", twelve)
    twelve_w = _tiny_weights(twelve, folder / "tiny-vit-quickgelu-12.pt", 6)
    # every weights entry of params.yaml, by the kind of its official backbone
    official = yaml.safe_load((paths.ROOT / "params.yaml").read_text())["extract"]["weights"]
    out = {}
    for model, entry in official.items():
        name = entry["backbone"]
        config, state = ((large, large_w) if name.startswith("ViT-L-14") else
                         (quick, quick_w) if "quickgelu" in name else (gelu, gelu_w))
        if model.startswith("gem") and config in deep:
            config, state = deep[config]
        if model in ("resclip", "scclip"):
            config, state = twelve, twelve_w
        out[model] = {"backbone": str(config), "pretrained": str(state),
                      "checkpoint": str(head_path) if entry.get("checkpoint") else None}
    return out


def copy_repository(src: Path, dest: Path) -> Path:
    """The working tree of ``src`` (tracked and untracked-not-ignored files) as a fresh one-commit git repo."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=src,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        if not (src / rel).is_file():          # deleted in the working tree
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, dest / rel)
    env = git_env()
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "rehearsal"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env)
    return dest


def git_env() -> dict[str, str]:
    return {**os.environ, "GIT_AUTHOR_NAME": "floss", "GIT_AUTHOR_EMAIL": "floss@example.org",
            "GIT_COMMITTER_NAME": "floss", "GIT_COMMITTER_EMAIL": "floss@example.org"}
