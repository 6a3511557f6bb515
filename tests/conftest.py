"""Shared fixtures: tiny open_clip ViTs (random weights) for the model tests.

The tiny configs in ``tests/assets`` (width 64, 3 blocks, 2 heads, patch 16, native grid 4x4, embed dim 32)
are registered with open_clip through ``backbone=<path to the .json>``. LayerNorm affines are randomised so
that the last-block formulas in the tests exercise every parameter.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from floss.util.memory import keep_freed_memory

# never let a test reach the network, even by accident
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the suite is an entry point too: glibc keeps freed tensors' memory, as in the stage processes (floss.util.memory)
keep_freed_memory()

ASSETS = Path(__file__).resolve().parent / "assets"
TINY_GELU = str(ASSETS / "tiny-vit-gelu.json")
TINY_QUICKGELU = str(ASSETS / "tiny-vit-quickgelu.json")


def _randomise_norms(model) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.clip.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.add_(0.2 * torch.randn(module.weight.shape, generator=gen))
                module.bias.add_(0.2 * torch.randn(module.bias.shape, generator=gen))


@pytest.fixture(scope="session")
def tiny_gelu_config() -> str:
    return TINY_GELU


@pytest.fixture(scope="session")
def tiny_quickgelu_config() -> str:
    return TINY_QUICKGELU


def _tiny_model(name: str, config: str):
    """A tiny model with random weights (seed 0) and randomised LayerNorm affines."""
    from floss.models import create_model
    torch.manual_seed(0)
    model = create_model(name, backbone=config, pretrained="none")
    _randomise_norms(model)
    return model


@pytest.fixture(scope="session")
def tiny_maskclip():
    return _tiny_model("maskclip", TINY_GELU)


@pytest.fixture(scope="session")
def tiny_clipdinoiser():
    return _tiny_model("clipdinoiser", TINY_GELU)


@pytest.fixture(scope="session")
def tiny_naclip():
    return _tiny_model("naclip", TINY_QUICKGELU)


# `make test` runs the suite on two xdist workers, one file per worker at a time (--dist loadfile), files handed
# out in collection order: the longest files go first so that both workers finish together (measured: the paper
# rehearsal, the rerun checks and the notebooks take most of the suite's time; the rest is many short files).
LONGEST_FIRST = ("test_paper_rehearsal.py", "test_rerun.py", "test_notebooks.py", "test_determinism.py",
                 "test_pipeline.py", "test_readme.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))      # stable: file order kept otherwise


if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers share the cores: one torch thread each for the in-process tests (subprocesses set their own)
    torch.set_num_threads(1)
