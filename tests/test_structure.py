"""The package's structure shows its architecture (issue "One house, no circles"): no import circle among floss
modules, no module over 400 lines, and no import from a lower layer to a higher one (``LAYERS``, bottom to top:
each sub-package's docstring says what it owns and may import).

Every module under ``floss/`` is parsed with ``ast`` (nothing is imported). Dependencies are every ``import`` and
``from ... import`` of a floss module anywhere in the file, including inside functions (a lazy import is still a
dependency): ``from floss.x import y`` depends on ``floss.x`` and, when ``y`` is a submodule, on ``floss.x.y``;
``import floss.x.y`` depends on ``floss.x.y``; relative imports are resolved; ``from floss import cli`` depends on
``floss.cli`` only (the facade ``floss/__init__.py`` imports nothing eagerly). So a submodule that imports from its
own package (``from floss.models import X`` inside ``floss/models/``) depends on the package's ``__init__``,
which imports the submodule back: a circle.

The known exceptions are exact ratchets: the test fails when a new circle or an over-long module appears *and*
when a listed one is gone (then delete it from the list), so the lists can only shrink. The package analysed is
the one ``import floss`` finds (``PYTHONPATH=<another checkout> pytest tests/test_structure.py`` checks that one).
"""
from __future__ import annotations

import ast
from pathlib import Path

import floss

PACKAGE = Path(floss.__file__).resolve().parent
MAX_LINES = 400

#: import circles that remain, each with why it cannot go yet (a set of the modules of one strongly connected
#: component of the import graph)
KNOWN_CIRCLES: dict[frozenset[str], str] = {}

#: modules over MAX_LINES lines that remain (paths relative to the repository root), each with why
KNOWN_LARGE: dict[str, str] = {}

#: the layers, bottom to top: a module may import its own layer and the ones below, never one above. The package
#: ``floss`` itself (the public facade, names imported lazily from floss.core) and ``floss.__main__`` sit on top.
LAYERS = ("floss.util", "floss.core", "floss.models", "floss.data", "floss.protocol", "floss.cli", "floss.report",
          "floss.pipeline")
TOP = ("floss", "floss.__main__")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The floss module ``name`` refers to: itself, or its longest prefix that is a module (``floss.x.attr``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(name: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """floss modules that module ``name`` imports -> the first line that does."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}

    def add(target: str | None, line: int) -> None:
        if target and target != name:
            found.setdefault(target, line)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "floss" or alias.name.startswith("floss."):
                    add(_owner(alias.name, modules), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            if source != "floss" and not source.startswith("floss."):
                continue
            submodules = [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in modules]
            # the facade's __init__ imports nothing eagerly: ``from floss import cli`` depends on floss.cli only
            if source != "floss" or len(submodules) < len(node.names):
                add(_owner(source, modules), node.lineno)
            for sub in submodules:
                add(sub, node.lineno)
    return found


def _graph() -> dict[str, dict[str, int]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _circles(graph: dict[str, dict[str, int]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                members = set()
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    members.add(top)
                    if top == node:
                        break
                if len(members) > 1:
                    out.append(frozenset(members))
    return out


def _describe(circle: frozenset[str], graph: dict[str, dict[str, int]]) -> str:
    modules = _modules()
    edges = [f"    {a} -> {b} ({modules[a].relative_to(PACKAGE.parent)}:{line})"
             for a in sorted(circle) for b, line in sorted(graph[a].items()) if b in circle]
    return " <-> ".join(sorted(circle)) + "\n" + "\n".join(edges)


def _line_counts() -> dict[str, int]:
    return {path.relative_to(PACKAGE.parent).as_posix(): len(path.read_text().splitlines())
            for path in _modules().values()}


def test_the_import_rules(tmp_path):
    """Lazy imports count; ``from floss.x import y`` depends on floss.x and, if y is a submodule, on floss.x.y;
    relative imports resolve; attributes of a module resolve to the module."""
    source = tmp_path / "base.py"
    source.write_text("import os\nfrom floss.pkg import sub, Thing\nfrom . import sibling\n"
                      "def f():\n    import floss.other.attr\n    from ..top import name\n")
    modules = {name: tmp_path for name in ("floss", "floss.pkg", "floss.pkg.sub", "floss.pkg.sibling",
                                           "floss.pkg.base", "floss.other", "floss.top")}
    assert _imports("floss.pkg.base", source, modules) == {"floss.pkg": 2, "floss.pkg.sub": 2,
                                                           "floss.pkg.sibling": 3, "floss.other": 5, "floss.top": 6}
    graph = _graph()
    assert {"floss.data.cache", "floss.models", "floss.models.base", "floss.pipeline"} <= set(graph)
    assert "floss.protocol" in graph["floss.cli"]           # a lazy import in the real package
    assert _circles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [frozenset("abc")]


def test_no_import_circle_but_the_known_ones():
    graph = _graph()
    found = set(_circles(graph))
    new = sorted(found - set(KNOWN_CIRCLES), key=sorted)
    gone = sorted(set(KNOWN_CIRCLES) - found, key=sorted)
    report = "import circles found:\n" + "\n".join(_describe(c, graph) for c in sorted(found, key=sorted))
    assert not new, ("new import circle(s) (a module imports, directly or through others, a module that imports "
                     "it):\n" + "\n".join(_describe(c, graph) for c in new) + "\n\n" + report)
    assert not gone, ("known circle(s) no longer found (or changed members): remove them from KNOWN_CIRCLES in "
                      "tests/test_structure.py:\n" + "\n".join(" <-> ".join(sorted(c)) for c in gone)
                      + "\n\n" + report)


def test_no_module_over_400_lines_but_the_known_ones():
    sizes = _line_counts()
    large = {path: n for path, n in sizes.items() if n > MAX_LINES}
    report = "modules over {} lines: {}".format(
        MAX_LINES, ", ".join(f"{p} ({n})" for p, n in sorted(large.items(), key=lambda x: -x[1])) or "none")
    new = sorted(set(large) - set(KNOWN_LARGE))
    gone = sorted(set(KNOWN_LARGE) - set(large))
    assert not new, f"module(s) over {MAX_LINES} lines: split them: {new}\n{report}"
    assert not gone, (f"known large module(s) now at most {MAX_LINES} lines (or gone): remove them from KNOWN_LARGE in "
                      f"tests/test_structure.py: {gone}\n{report}")


def _layer(module: str) -> int:
    if module in TOP:
        return len(LAYERS)
    for i, layer in enumerate(LAYERS):
        if module == layer or module.startswith(layer + "."):
            return i
    raise AssertionError(f"{module} belongs to no layer: move it into one of {LAYERS} (tests/test_structure.py)")


def test_every_module_belongs_to_a_layer_with_a_docstring():
    graph = _graph()
    for module in graph:
        _layer(module)
    for layer in LAYERS:
        init = PACKAGE.parent / layer.replace(".", "/") / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "import" in doc, f"{init}: the package docstring must say what it owns and may import"


def test_no_import_from_a_lower_layer_up():
    graph = _graph()
    modules = _modules()
    bad = [f"{a} ({LAYERS[_layer(a)]}) imports {b} ({(LAYERS + ('floss',))[_layer(b)]}) at "
           f"{modules[a].relative_to(PACKAGE.parent)}:{line}"
           for a in sorted(graph) if a not in TOP for b, line in sorted(graph[a].items()) if _layer(b) > _layer(a)]
    assert not bad, "imports from a lower layer up:\n" + "\n".join(bad)


def test_the_layer_rule_catches_an_upward_import(tmp_path):
    """The rule itself: a data module importing the pipeline, or any module importing the facade, is refused."""
    assert _layer("floss.data.cache") < _layer("floss.pipeline.params") < _layer("floss")
    assert _layer("floss.core.kernels.fused") == _layer("floss.core")
    source = tmp_path / "bad.py"
    source.write_text("from floss.pipeline.params import load_params\nfrom floss import __version__\n")
    modules = {"floss": tmp_path, "floss.pipeline.params": tmp_path, "floss.data.bad": tmp_path}
    found = _imports("floss.data.bad", source, modules)
    assert [b for b in found if _layer(b) > _layer("floss.data.bad")] == ["floss.pipeline.params", "floss"]


def test_reading_caches_never_imports_open_clip():
    """The pipeline's stages that only read caches (rank/evaluate from a cache, transfer, metrics, the report) pay
    for torch but not for open_clip (about 3 s per process): models are imported when one is built."""
    import subprocess
    import sys
    code = ("import sys, floss.pipeline, floss.pipeline.features, floss.pipeline.evaluate, floss.protocol, "
            "floss.protocol.experiments, floss.report.analysis, floss.data.synthetic, floss.models\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'open_clip'))\n"
            "print(floss.models.authors_precision('naclip'), 'open_clip' in sys.modules)")   # built: imported
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.split("\n")[:2] == ["[]", "fp16 True"], run.stdout


def test_open_clip_data_is_open_clips_own():
    """The constants read from open_clip's files without importing it equal the imported package's."""
    import open_clip.constants
    import open_clip.zero_shot_metadata

    from floss.core.templates import IMAGENET_TEMPLATES
    from floss.models.preprocess import CLIP_MEAN, CLIP_STD
    from floss.util.open_clip_data import data_module
    assert data_module("constants") is not open_clip.constants          # read on its own, not imported
    assert (CLIP_MEAN, CLIP_STD) == (open_clip.constants.OPENAI_DATASET_MEAN, open_clip.constants.OPENAI_DATASET_STD)
    templates = open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES
    assert IMAGENET_TEMPLATES == tuple(t("{}") if callable(t) else t for t in templates)
