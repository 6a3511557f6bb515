"""Constants from open_clip's plain-data modules, without importing the open_clip package.

``from open_clip.constants import X`` imports all of open_clip first (models, tokenizers, about 3 s per process on
2 cores), and every pipeline stage that only reads caches would pay for it. ``constants.py`` and
``zero_shot_metadata.py`` hold data only, so they are executed on their own from the installed package's folder.
Should a future open_clip make that impossible, the normal import is used: the values always come from open_clip.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def data_module(name: str) -> ModuleType:
    """open_clip's submodule ``name`` (e.g. ``"constants"``), read from its file without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")        # locates the package; does not import it
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / f"{name}.py"
        try:
            file_spec = importlib.util.spec_from_file_location(f"_floss_open_clip_{name}", path)
            module = importlib.util.module_from_spec(file_spec)
            file_spec.loader.exec_module(module)
            return module
        except Exception:  # noqa: BLE001 - any failure: the package import below (slow but always right)
            logger.debug("open_clip/%s.py cannot be read on its own; importing open_clip", name)
    return importlib.import_module(f"open_clip.{name}")
