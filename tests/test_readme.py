"""The README's library example runs as written, and its generated blocks equal the files they name."""
import re

import pytest

from floss import paths
from floss.report import readme

README = paths.ROOT / "README.md"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_library_example_runs():
    block = _python_blocks(README.read_text())[0]
    scope: dict = {}
    exec(compile(block, "README.md:library", "exec"), scope)
    assert len(scope["experts"]) == 3 and all(len(e) == 4 for e in scope["experts"])
    assert scope["fused"].shape == (3, 32, 64) and 0.0 <= scope["miou"] <= 1.0


def test_metric_registration_example_runs():
    import floss
    line = next(b for b in _python_blocks(README.read_text()) if "register_metric" in b)
    try:
        exec(line, {"floss": floss})
        assert "maxprob" in floss.available_metrics()
    finally:
        from floss import metrics_registry
        metrics_registry._REGISTRY.pop("maxprob", None)


def test_generated_blocks_match_their_files():
    found = readme.blocks(README.read_text())
    assert any(path == "tables/tab1_main_results.md" for path, _ in found)
    for path, body in found:
        source = paths.ROOT / path
        if not source.is_file():
            pytest.skip(f"{path} not generated yet (dvc repro)")
        assert body == source.read_text().rstrip("\n") + "\n", f"README block of {path} is stale: " \
            "run python -m floss.report.readme"
