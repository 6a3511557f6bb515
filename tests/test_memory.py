"""floss.util.memory: the glibc settings are applied by the entry points only, can be turned off, and change which
memory the allocator reuses — not what is computed (benchmarks/bench_malloc.py compares whole jobs' bits)."""
from __future__ import annotations

import ctypes
import ctypes.util
import subprocess
import sys

import pytest

import floss.cli
import floss.pipeline
from floss.util import memory, paths


def _glibc() -> bool:
    try:
        return hasattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "gnu_get_libc_version")
    except OSError:
        return False


@pytest.mark.skipif(not _glibc(), reason="glibc only")
def test_a_large_freed_tensor_is_reused_not_mapped_again():
    """With the settings, a freed 256 MB tensor's pages serve the next (smaller: posix_memalign asks for a little
    more than the size) 128 MB one; with glibc's defaults every such tensor is a fresh mmap whose 32,768 pages
    fault in again. Fresh interpreters: the settings are process-wide."""
    probe = ("import resource, torch; from floss.util.memory import keep_freed_memory; applied = keep_freed_memory(); "
             "faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt; x = torch.ones(1 << 26); del x; "
             "before = faults(); y = torch.ones(1 << 25); print(applied, faults() - before)")
    seen = {}
    for setting in ("1", "0"):
        out = subprocess.run([sys.executable, "-c", probe], cwd=paths.ROOT, capture_output=True, text=True,
                             check=True, env={"FLOSS_MALLOC_TUNING": setting, "PATH": "/usr/bin:/bin"})
        applied, faults = out.stdout.split()
        seen[setting] = (applied == "True", int(faults))
    assert seen["1"][0] is True and seen["1"][1] < 1000
    assert seen["0"][0] is False and seen["0"][1] > 30000      # 4 KiB pages: 128 MB is 32,768 of them


def test_off_switch(monkeypatch):
    monkeypatch.setenv(memory.TUNING_ENV, "0")
    assert memory.keep_freed_memory() is False


@pytest.mark.parametrize("entry", ["pipeline", "cli"])
def test_the_entry_points_apply_the_settings(monkeypatch, entry, capsys):
    calls = []
    module = floss.pipeline if entry == "pipeline" else floss.cli
    monkeypatch.setattr(module, "keep_freed_memory", lambda: calls.append(entry) or True)
    assert module.main(["check-params"]) == 0
    assert calls == [entry]


def test_importing_floss_leaves_the_allocator_alone():
    """The library never calls it: only main() of the entry points and the test suite's conftest do."""
    callers = [p.relative_to(paths.ROOT).as_posix() for p in (paths.ROOT / "floss").rglob("*.py")
               if "keep_freed_memory()" in p.read_text() and p.name != "memory.py"]
    assert sorted(callers) == ["floss/cli/__init__.py", "floss/pipeline/__init__.py"]
