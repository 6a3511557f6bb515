"""Atomic writes: a temporary file in the target's folder, then ``os.replace`` — a reader never sees a
half-written file, and an interrupted write leaves the previous version (or nothing) in place."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
    return atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """JSON with a trailing newline; NaN/Inf are refused (write them as ``null``)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, allow_nan=False) + "\n")


def save_results(results: Mapping, confusion: Mapping, out: str | os.PathLike) -> Path:
    """``results.json`` and its confusion matrices beside it (``<stem>.confusion.safetensors``); returns the
    latter's path. The layout ``python -m floss evaluate`` and the pipeline's evaluate stage share."""
    from safetensors.torch import save_file

    out = Path(out)
    atomic_write_json(out, results)
    conf_path = out.with_name(out.stem + ".confusion.safetensors")
    tensors = {k: v.contiguous() for k, v in confusion.items()}
    return atomic_write(conf_path, lambda tmp: save_file(tensors, tmp))
