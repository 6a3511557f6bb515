"""tools/compare_outputs.py, the behaviour-neutrality check of a refactor: only the recorded code digest may differ."""
from __future__ import annotations

import importlib.util
import json

from floss.util import paths

_spec = importlib.util.spec_from_file_location("compare_outputs", paths.ROOT / "tools" / "compare_outputs.py")
compare_outputs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_outputs)


def _tree(root, miou: float, digest: str, extra: bool = False):
    (root / "results/eval/m").mkdir(parents=True)
    (root / "tables").mkdir()
    doc = {"methods": {"floss": {"miou": miou}},
           "config": {"fingerprint": {"code": {"floss": digest, "torch": "2.14.1"}}}}
    (root / "results/eval/m/cityscapes.json").write_text(json.dumps(doc))
    (root / "tables/tab1.md").write_text("| a | 1.0 |\n")
    if extra:
        (root / "tables/new.md").write_text("x")
    return root


def test_only_the_code_digest_may_differ(tmp_path, capsys):
    a = _tree(tmp_path / "a", 42.0, "sha256:aaa")
    b = _tree(tmp_path / "b", 42.0, "sha256:bbb")
    assert compare_outputs.main([str(b), "--this", str(a)]) == 0
    out = capsys.readouterr().out
    assert "same: 1 files" in out and "code digest only: 1 files" in out and "different: 0 files" in out


def test_a_moved_number_a_moved_library_or_a_missing_file_fails(tmp_path, capsys):
    a = _tree(tmp_path / "a", 42.0, "sha256:aaa")
    assert compare_outputs.main([str(_tree(tmp_path / "b", 42.1, "sha256:aaa")), "--this", str(a)]) == 1
    assert "results/eval/m/cityscapes.json" in capsys.readouterr().out
    c = _tree(tmp_path / "c", 42.0, "sha256:aaa", extra=True)
    assert compare_outputs.main([str(c), "--this", str(a)]) == 1
    assert "tables/new.md" in capsys.readouterr().out
    d = tmp_path / "d"
    _tree(d, 42.0, "sha256:aaa")
    doc = json.loads((d / "results/eval/m/cityscapes.json").read_text())
    doc["config"]["fingerprint"]["code"]["torch"] = "2.15.0"          # another library is not the code digest
    (d / "results/eval/m/cityscapes.json").write_text(json.dumps(doc))
    assert compare_outputs.main([str(d), "--this", str(a)]) == 1
