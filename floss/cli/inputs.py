"""Command-line inputs shared by the commands that read images (``extract``, ``rank`` from images, ``segment``):
their arguments (image source, model, bad images), the image source they name (:class:`ImageSource`: a dataset
of the paper or the user's own folder) and the model they load (:func:`load_model`, weight files checked first).

May import: the standard library, torch, and (lazily, inside the functions) :mod:`floss.core.classes`,
:mod:`floss.data.datasets`, :mod:`floss.protocol.extraction`, :mod:`floss.models` and :mod:`floss.util.provenance`; never
:mod:`floss.cli` (which builds on this module and re-exports its names) or the pipeline.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch


def _configure_bad_images(p: argparse.ArgumentParser) -> None:
    p.add_argument("--on-bad-image", choices=("stop", "skip"), default="stop",
                   help="an unreadable or too-small image: stop naming it (default), or skip it and list it with "
                        "its reason in <out>.skipped.json")


def _configure_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", help="open_clip model name or model-config .json (default: the model's)")
    p.add_argument("--pretrained", help="open_clip tag, weight file, or 'none' for random weights (tests only)")
    p.add_argument("--checkpoint", help="extra head weights (CLIP-DINOiser)")
    p.add_argument("--device", help="cpu | cuda | cuda:i (default: cuda if available; torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--precision", choices=("auto", "fp32", "fp16"), default="auto",
                   help="model precision; auto = the authors' (NACLIP fp16 on CUDA, fp32 on CPU; others fp32)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes decoding images (0: none)")
    p.add_argument("--text-cache", type=Path, help="folder of cached text embeddings (default ~/.cache/floss/text)")


def _configure_templates(p: argparse.ArgumentParser) -> None:
    p.add_argument("--templates", type=Path, metavar="FILE",
                   help="prompt templates, one per line with '{}' where the class name goes (UTF-8; blank lines and "
                        "'#' comments ignored; default: CLIP's 80 ImageNet templates)")


def load_template_arg(args: argparse.Namespace):
    """The :class:`floss.core.templates.TemplateSet` of ``--templates`` (CLIP's 80 when not given); a bad file is
    refused naming ``--templates`` and ``file:line``."""
    from floss.core.templates import load_templates

    value = getattr(args, "templates", None)
    try:
        return load_templates(value)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"--templates: {err}") from None
    except ValueError as err:
        raise ValueError(f"--templates: {err}") from None


def check_weight_file(flag: str, value) -> None:
    """A weight file named on the command line exists and looks loadable (refused before any other work)."""
    from floss.util.provenance import weight_file_problem

    if value is None or value == "none":
        return
    path = Path(value)
    if path.is_dir():
        raise ValueError(f"{flag}: {value} is a folder; expected a weight file")
    if path.suffix in (".pt", ".pth", ".bin", ".safetensors", ".ckpt") and not path.is_file():
        raise FileNotFoundError(f"{flag}: weight file {value} does not exist")
    if path.is_file() and (problem := weight_file_problem(path)):
        raise ValueError(f"{flag}: {problem}")


def load_model(args: argparse.Namespace, device):
    """The model of ``--model/--backbone/--pretrained/--checkpoint/--precision`` on ``device``."""
    from floss.protocol.extraction import resolve_precision
    from floss.models import available_models, create_model

    if args.model not in available_models():
        raise ValueError(f"--model: unknown model {args.model!r}; available: {', '.join(available_models())}")
    if args.workers < 0:
        raise ValueError(f"--workers: expected a non-negative integer, received {args.workers}")
    for flag, value in (("--pretrained", args.pretrained), ("--checkpoint", args.checkpoint)):
        check_weight_file(flag, value)
    precision = resolve_precision(args.model, args.precision, device)
    if args.pretrained == "none":
        torch.manual_seed(0)      # random weights must be identical across ranks and resumed runs
    kwargs = {"precision": precision} if precision != "fp32" else {}
    return create_model(args.model, backbone=args.backbone, pretrained=args.pretrained,
                        checkpoint=args.checkpoint, device=device, **kwargs)


def _configure_images(p: argparse.ArgumentParser, split_default: str | None = None) -> None:
    p.add_argument("--dataset", help="a dataset of the paper in its mmseg layout (with --data-root)")
    p.add_argument("--data-root", type=Path, help="the dataset folder in its mmseg layout")
    p.add_argument("--split", choices=("train", "val"), default=split_default)
    p.add_argument("--images", type=Path, help="your own images: a folder (nested folders allowed)")
    p.add_argument("--classes", type=Path, help="with --images: class names, one per line ('name: syn1, syn2')")
    p.add_argument("--labels", type=Path, help="with --images: <id>.png class-id labels (255 = ignore), optional")
    p.add_argument("--settings-of", default="pascalco59",
                   help="with --images: use the model's resize/window settings of this dataset (default pascalco59)")


class ImageSource:
    """The images a command reads: a dataset of the paper (``--dataset --data-root --split``) or a folder of the
    user's own (``--images --classes [--labels]``), with its class names, query words and protocol dataset."""

    def __init__(self, args: argparse.Namespace, *, labels: bool, model: str | None):
        from floss.core.classes import CLASS_NAMES, MODELS as NAMED_MODELS, query_names, ranking_keys
        from floss.data.datasets import open_dataset, resolve_name
        from floss.data.datasets.folder import open_folder

        named = model if model in NAMED_MODELS else None
        if args.images is not None:
            if args.dataset is not None:
                raise ValueError("--images/--dataset: give one source, not both")
            if args.classes is None:
                raise ValueError("--classes: required with --images (one class name per line)")
            self.ds = open_folder(args.images, args.classes, args.labels if labels else None)
            self.dataset, self.settings_dataset = "folder", resolve_name(args.settings_of)
            self.class_names = self.ds.class_names
            self.queries, self.query_to_class = self.ds.query_names()
            self.keys = list(self.class_names)
        elif args.dataset is not None:
            if args.data_root is None:
                raise ValueError("--data-root: required with --dataset (the dataset folder in its mmseg layout)")
            if args.split is None:
                raise ValueError("--split: required with --dataset (train or val)")
            self.dataset = self.settings_dataset = resolve_name(args.dataset)
            self.ds = open_dataset(self.dataset, args.data_root, args.split, labels=labels)
            self.class_names = list(CLASS_NAMES[self.dataset])
            self.queries, self.query_to_class = query_names(self.dataset, named)
            self.keys = ranking_keys(self.dataset, named)
        else:
            raise ValueError("source: give --dataset with --data-root, or --images with --classes")
