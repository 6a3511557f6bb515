"""The README's library example runs as written, and its generated blocks equal the files they name."""
import re

import pytest

from floss.util import paths
from floss.report import readme

README = paths.ROOT / "README.md"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def _run_cli_commands(commands, tmp_path, monkeypatch) -> None:
    """The README's ``python -m floss`` commands as printed, in ``tmp_path``, on a tiny random CLIP-DINOiser
    (its head checkpoint written where the default points)."""
    import json
    import shlex

    import torch
    from conftest import TINY_GELU

    from floss import cli
    from floss.models.clipdinoiser import CorrelationHead

    width = json.loads(open(TINY_GELU).read())["vision_cfg"]["width"]
    head = {f"model.{k}": v for k, v in CorrelationHead(width).state_dict().items()}
    (tmp_path / "checkpoints/clip_dinoiser").mkdir(parents=True)
    torch.save({"state_dict": head}, tmp_path / "checkpoints/clip_dinoiser/model_weights.pth")
    monkeypatch.chdir(tmp_path)
    tiny = ["--backbone", TINY_GELU, "--pretrained", "none", "--device", "cpu", "--workers", "0"]
    for command in commands:
        argv = shlex.split(command)
        assert argv[:3] == ["python", "-m", "floss"], command
        argv = argv[3:] + (tiny if "--model" in argv else [])
        assert cli.main(argv) == 0, command


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
        from floss.core import metrics as metrics_registry
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


def test_subset_recipe_is_accepted_as_printed(tmp_path):
    """The README's subset flags, applied by DVC's own override code to params.yaml with the paper profile, give
    parameters the pipeline accepts (no other key needed). The rehearsal runs them end to end."""
    import shlex
    import shutil

    from dvc.utils.hydra import apply_overrides

    from floss.pipeline.params import load_params, low_data_datasets

    text = README.read_text()
    sentence = text[text.index("A subset:"):]
    flags = re.findall(r"`(-S '[^']*')`", sentence[:sentence.index(";")])
    assert len(flags) == 3, flags
    shutil.copy(paths.ROOT / "params.yaml", tmp_path / "params.yaml")
    apply_overrides(tmp_path / "params.yaml", ["profile=paper", "data_root=/data"] + [shlex.split(f)[1] for f in flags])
    params = load_params(tmp_path / "params.yaml", check_paths=False)
    assert "gem" not in params["models"] and params["models"]["clipdinoiser"] == ["cityscapes"]
    assert params["transfer"]["models"] == [] and low_data_datasets(params) == ["cityscapes"]


def _bash_block_after(text: str, heading: str) -> list[str]:
    """The commands of the first ```bash block after ``heading`` (continuation lines joined)."""
    section = text[text.index(heading):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_own_images_recipe_runs_as_printed(tmp_path, monkeypatch):
    """The four commands of "FLOSS on your own images", run as printed in a folder holding what they name (a
    tiny random CLIP-DINOiser substituted for the real weights)."""
    import json

    import numpy as np

    from layouts import random_image, random_label, write_image, write_label

    commands = _bash_block_after(README.read_text(), "## FLOSS on your own images")
    assert [c.split()[3] for c in commands] == ["rank", "segment", "extract", "evaluate"]
    rng = np.random.default_rng(0)
    for i, rel in enumerate(["street/a", "street/b", "c"]):
        write_image(tmp_path / "my_images" / f"{rel}.jpg", random_image(rng, (40 + 8 * i, 72)))
        write_label(tmp_path / "my_labels" / f"{rel}.png", random_label(rng, (40 + 8 * i, 72), 3))
    (tmp_path / "classes.txt").write_text("road\ncar: automobile, vehicle\nsky\n")
    _run_cli_commands(commands, tmp_path, monkeypatch)
    experts = json.loads((tmp_path / "my_rankings.experts.json").read_text())
    assert list(experts["experts"]) == ["road", "car", "sky"]
    assert sorted(p.relative_to(tmp_path / "my_masks/floss").as_posix()
                  for p in (tmp_path / "my_masks/floss").rglob("*.png")) == ["c.png", "street/a.png", "street/b.png"]
    res = json.loads((tmp_path / "my_results.json").read_text())
    assert {"baseline", "floss"} <= set(res["methods"])


def test_any_template_set_recipe_runs_as_printed(tmp_path, monkeypatch):
    """"Any template set": the template file, the four commands and the library snippet, as printed (a tiny random
    CLIP-DINOiser substituted for the real weights)."""
    import json

    import numpy as np

    from layouts import random_image, random_label, write_image, write_label

    text = README.read_text()
    section = text[text.index("### Any template set"):]
    section = section[:section.index("\n## ")]
    templates = re.search(r"```text\n(.*?)```", section, re.S).group(1)
    commands = _bash_block_after(section, "### Any template set")
    assert [c.split()[3] for c in commands] == ["rank", "extract", "evaluate", "segment"]
    rng = np.random.default_rng(0)
    for i, rel in enumerate(["street/a", "c"]):
        write_image(tmp_path / "my_images" / f"{rel}.jpg", random_image(rng, (40 + 8 * i, 72)))
        write_label(tmp_path / "my_labels" / f"{rel}.png", random_label(rng, (40 + 8 * i, 72), 3))
    (tmp_path / "classes.txt").write_text("road\ncar: automobile, vehicle\nsky\n")
    (tmp_path / "my_templates.txt").write_text(templates)
    _run_cli_commands(commands, tmp_path, monkeypatch)
    seven = templates.splitlines()
    assert len(seven) == 7 and json.loads((tmp_path / "my_rankings7.json").read_text())["templates"] == seven
    res = json.loads((tmp_path / "my_results7.json").read_text())
    assert len(res["per_template"]) == 7 and res["templates"] == seven
    assert (tmp_path / "my_masks7/floss/c.png").is_file()
    snippet = _python_blocks(section)[0]
    scope: dict = {}
    exec(compile(snippet, "README.md:templates", "exec"), scope)
    assert len(scope["experts"]) == 3 and all(0 < len(e) <= 7 for e in scope["experts"])
    assert scope["rankings"]["templates"] == seven


def test_own_metric_recipe_runs_as_printed(tmp_path, monkeypatch):
    """"Your own metric": the plug-in module and the rank command, as printed, on a tiny synthetic train cache."""
    import json
    import shlex
    import sys

    from floss import cli
    from floss.core import metrics as registry
    from floss.data.synthetic import write_synthetic_cache

    text = README.read_text()
    section = text[text.index("### Your own metric"):]
    section = section[:section.index("\n## ")]
    module = _python_blocks(section)[0]
    assert module.startswith("# my_metrics.py\n")
    (tmp_path / "my_metrics.py").write_text(module)
    commands = _bash_block_after(section, "### Your own metric")
    assert len(commands) == 1
    write_synthetic_cache(tmp_path / "data/features/maskclip/cityscapes/train", "maskclip", "cityscapes", "train",
                          num_images=2, seed=0)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))      # `python -m` puts the current folder on sys.path
    try:
        argv = shlex.split(commands[0])
        assert argv[:3] == ["python", "-m", "floss"]
        assert cli.main(argv[3:]) == 0
        doc = json.loads((tmp_path / "rankings.top2mass.json").read_text())
        assert len(doc["classes"]["road"]["top2mass_ranking"]) == 80
        assert (tmp_path / "rankings.entropy.json").is_file()
    finally:
        registry._REGISTRY.pop("top2mass", None)
        registry._PLUGINS.pop("my_metrics:register", None)
        sys.modules.pop("my_metrics", None)
