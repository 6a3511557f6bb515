"""Atomic writes: a temporary file in the target's folder, then ``os.replace`` — a reader never sees a
half-written file, and an interrupted write leaves the previous version (or nothing) in place.

Every output written through a temporary file goes through :func:`atomic_write`: the temporary file is created with
mode ``0o666`` filtered by the process umask (0644 under umask 022), as ``open(path, "w")`` would create the output,
not with the 0600 of ``tempfile.mkstemp``."""
from __future__ import annotations

import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any, Callable, Mapping


def _new_temporary(path: Path) -> tuple[str, int]:
    """Create an empty, unique ``.<name>.<random>.tmp`` beside ``path``; returns it and the mode the umask gave it."""
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = os.path.join(path.parent, f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)     # the kernel applies the umask, as for open(path, "w")
        except FileExistsError:
            continue
        try:
            return tmp, stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
    raise FileExistsError(f"could not create a temporary file for {path} in {path.parent}")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then move it into place (mode: see above)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, mode = _new_temporary(path)
    try:
        write(tmp)
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:   # a writer that replaced the file (safetensors makes 0600)
            os.chmod(tmp, mode)
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
