"""The package's structure shows its architecture (issue "One house, no circles"): no import circle among floss
modules, no module over 400 lines, and no import from a lower layer to a higher one (``LAYERS``, bottom to top:
each sub-package's docstring says what it owns and may import); and the layer diagram of docs/architecture.md is
the one the code's imports give.

The import graph, ``LAYERS`` and the diagram live in ``tools/import_graph.py`` (a development tool, not part of the
package), shared by these tests and the diagram's generator. Every module under ``floss/`` is parsed with ``ast``
(nothing is imported). Dependencies are every ``import`` and ``from ... import`` of a floss module anywhere in the
file, including inside functions (a lazy import is still a dependency): ``from floss.x import y`` depends on
``floss.x`` and, when ``y`` is a submodule, on ``floss.x.y``; ``import floss.x.y`` depends on ``floss.x.y``;
relative imports are resolved; ``from floss import cli`` depends on ``floss.cli`` only (the facade
``floss/__init__.py`` imports nothing eagerly). So a submodule that imports from its own package (``from
floss.models import X`` inside ``floss/models/``) depends on the package's ``__init__``, which imports the
submodule back: a circle.

The known exceptions are exact ratchets: the test fails when a new circle or an over-long module appears *and*
when a listed one is gone (then delete it from the list), so the lists can only shrink. The package analysed is
the one ``import floss`` finds (``PYTHONPATH=<another checkout> pytest tests/test_structure.py`` checks that one);
the diagram is checked against this checkout's package and docs/architecture.md.
"""
from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import floss

PACKAGE = Path(floss.__file__).resolve().parent
REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 400


def _load_tool():
    """tools/import_graph.py of this checkout, loaded by path (``tools/`` is not a package on sys.path)."""
    spec = importlib.util.spec_from_file_location("import_graph", REPO / "tools" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("import_graph", module)
    spec.loader.exec_module(module)
    return module


import_graph = _load_tool()

#: import circles that remain, each with why it cannot go yet (a set of the modules of one strongly connected
#: component of the import graph)
KNOWN_CIRCLES: dict[frozenset[str], str] = {}

#: modules over MAX_LINES lines that remain (paths relative to the repository root), each with why
KNOWN_LARGE: dict[str, str] = {}

#: the layers, bottom to top (defined in tools/import_graph.py, which draws them): a module may import its own layer
#: and the ones below, never one above; ``TOP`` (the facade ``floss`` and ``floss.__main__``) sits on top.
LAYERS = import_graph.LAYERS
TOP = import_graph.TOP
_imports = import_graph.imports
_circles = import_graph.circles
_layer = import_graph.layer


def _modules() -> dict[str, Path]:
    return import_graph.modules(PACKAGE)


def _graph() -> dict[str, dict[str, int]]:
    return import_graph.graph(PACKAGE)


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


def test_the_layer_diagram_counts_module_edges_between_layers():
    """The diagram's arrows: one per pair of layers with imports, labelled with the number of module-level edges,
    from the importing layer to the imported one; imports inside a layer are counted in its box."""
    graph = {"floss.pipeline.a": {"floss.util.x": 1, "floss.util.y": 2, "floss.pipeline.b": 3},
             "floss.pipeline.b": {"floss.core.z": 1}, "floss.util.x": {}, "floss.util.y": {"floss.util.x": 1},
             "floss.core.z": {}}
    assert import_graph.layer_edges(graph) == {(7, 0): 2, (7, 7): 1, (7, 1): 1, (0, 0): 1}
    chart = import_graph.mermaid(graph)
    assert chart.startswith("```mermaid\nflowchart TB\n") and "  L7 -->|2| L0" in chart and "  L7 -->|1| L1" in chart
    assert "L7 -->|1| L7" not in chart and "a · b" in chart and "imports inside: 1" in chart


def test_the_layer_diagram_in_the_docs_is_current(tmp_path):
    """docs/architecture.md opens with the diagram tools/import_graph.py draws from this checkout's imports (the
    block between its markers); the generator resolves its paths from the repository root, not the cwd."""
    import subprocess

    doc = (REPO / "docs" / "architecture.md").read_text()
    fix = "run: python tools/import_graph.py --write docs/architecture.md"
    assert import_graph.BEGIN in doc and import_graph.END in doc, f"docs/architecture.md has no diagram block: {fix}"
    assert doc.index(import_graph.BEGIN) < doc.index("\n## One image"), "the diagram must open docs/architecture.md"
    assert import_graph.embedded(doc) == import_graph.block(REPO / "floss"), f"the layer diagram is stale: {fix}"
    run = subprocess.run([sys.executable, str(REPO / "tools" / "import_graph.py"), "--check", "docs/architecture.md"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


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
