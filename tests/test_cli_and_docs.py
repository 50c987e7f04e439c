"""The console script, the docs that are generated from code, and the package layout."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import load_for_tiny

from tokenprune.cli import main, operators_markdown

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).with_name("tokenprune")


def run_cli(*args, cwd=None):
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd or REPO, timeout=300)


def test_ops_lists_every_operator_with_parameters(capsys):
    assert main(["ops"]) == 0
    out = capsys.readouterr().out
    for line in ("attention  [scorer]", "random  [scorer]", "topk  [selector]", "kv_compact  [compactor]",
                 "keep: float | int = 0.5", "seed: int = 0", "earlier_layers: bool = True"):
        assert line in out


def test_output_piped_into_a_reader_that_has_gone_ends_without_a_traceback():
    # `tokenprune ops | head -1` once head has exited: the pipe's read end is closed before anything is written
    read, write = os.pipe()
    os.close(read)
    try:
        out = subprocess.run([str(SCRIPT), "ops"], stdout=write, stderr=subprocess.PIPE, cwd=REPO, timeout=120)
    finally:
        os.close(write)
    assert out.returncode == 141  # 128 + SIGPIPE, what the shell reports for such a writer
    assert out.stderr == b""


def test_show_prints_the_resolved_config(capsys):
    assert main(["show", "fastv", "stages.0.operators.1.keep=0.25"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["stages"][0]["operators"][1] == {"op": "topk", "keep": 0.25, "scores": ""}
    assert cfg["stages"][0]["operators"][0]["heads"] == "mean"


def test_show_reads_a_run_directory(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"pipeline": {"name": "r", "stages": [
        {"layer": 1, "operators": [{"op": "random"}, {"op": "topk", "keep": 4}]}]}}))
    assert main(["show", str(tmp_path)]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["name"] == "r"


def test_cli_errors_are_one_line_exit_2_no_traceback():
    result = run_cli("show", "fastv", "stages.0.operators.0.op=atention")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        result.stderr.strip()] and "stages.0.operators.0.op" in result.stderr and "'attention'" in result.stderr


def test_demo_prints_the_table():
    result = run_cli("demo")
    assert result.returncode == 0, result.stderr
    assert "[64, 64] -> [32, 32]" in result.stdout
    assert "FLOPs reduction (fastv convention)" in result.stdout and "logits" in result.stdout


def test_operator_reference_is_in_sync():
    assert (REPO / "docs" / "operators.md").read_text() == operators_markdown(), \
        "docs/operators.md is stale: run `tokenprune ops --markdown > docs/operators.md`"


def test_notebooks_have_no_outputs():
    import nbformat

    for path in (REPO / "notebooks").glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{path} has outputs"


def test_operators_import_as_tokenprune_operators_only_in_the_editable_install(tmp_path):
    code = ("import importlib.util, tokenprune.operators as o; "
            "print(o.__file__); print(importlib.util.find_spec('operators') is None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    path, no_top_level = out.stdout.split()
    assert Path(path) == REPO / "operators" / "__init__.py"
    assert no_top_level == "True"


@pytest.mark.skipif(os.environ.get("TOKENPRUNE_SKIP_INSTALL_TEST") == "1", reason="asked to skip")
def test_normal_install_maps_operators_and_presets(tmp_path):
    """A non-editable install ships tokenprune.operators and the presets, and no top-level `operators`."""
    target = tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                            "--target", str(target), str(REPO)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    assert (target / "tokenprune" / "operators" / "scorers.py").is_file()
    assert (target / "tokenprune" / "presets" / "fastv.yaml").is_file()
    assert not (target / "operators").exists()
    code = ("import sys, tokenprune as tp; p = tp.load_pipeline('fastv'); "
            "import tokenprune.operators as o; print(o.__file__); print(p.stages[0].layer)")
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path[:0] = {[str(target)]!r}; "
                          + "import site; site.main(); " + code],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split()
    assert lines[0].startswith(str(target)) and lines[1] == "2"


def test_lmms_task_without_the_datasets_package_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    assert main(["lmms-task", str(tmp_path / "tasks")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["tokenprune: error: lmms-task needs the datasets package: pip install 'tokenprune-lvlm[datasets]'"]
    assert not (tmp_path / "tasks").exists()


def test_the_method_family_matrix_in_the_docs_is_what_the_code_says(capsys):
    from tokenprune.eval.matrix import matrix_markdown

    text = (REPO / "docs" / "families.md").read_text()
    table = text.split("<!-- matrix:start -->\n", 1)[1].split("<!-- matrix:end -->", 1)[0]
    assert table == matrix_markdown(), "docs/families.md's matrix is stale: paste `tokenprune matrix` between its markers"
    assert main(["matrix"]) == 0 and capsys.readouterr().out == table


def test_a_refused_matrix_cell_is_refused_by_attach_and_a_running_one_attaches():
    # independent of the matrix code: the tiny models of the families, attached for real
    from tokenprune.core.errors import ConfigError
    from tokenprune.eval.matrix import method_family_matrix
    from tokenprune.reference.tiny import (
        tiny_gemma3,
        tiny_internvl,
        tiny_llava_next,
        tiny_llava_onevision,
        tiny_qwen2_vl,
        tiny_qwen3_vl,
    )

    cells = {(c.preset, c.family.split(" (")[0]): c.refused for c in method_family_matrix()}
    models = {"LLaVA-NeXT": tiny_llava_next("sdpa", layers=32), "Qwen2-VL / Qwen2.5-VL": tiny_qwen2_vl("sdpa", layers=32),
              "LLaVA-OneVision": tiny_llava_onevision("sdpa", layers=32), "InternVL": tiny_internvl("sdpa", layers=32),
              "Qwen3-VL": tiny_qwen3_vl("sdpa", layers=36), "Gemma 3": tiny_gemma3("sdpa", layers=48)}
    for (preset, family), refused in cells.items():
        if family not in models:
            continue
        pipe = load_for_tiny(preset)  # a learned operator's initialisation: no shipped weights fit a tiny width
        prepared = {"images_prepared": True} if pipe.input is not None else {}  # downsample: images made smaller
        if refused is None:
            with pipe.attach(models[family], guide=models[family], **prepared):
                pass
        else:
            with pytest.raises(ConfigError) as e:
                pipe.attach(models[family], guide=models[family], **prepared)
            # depths and image sizes differ from the checkpoints'
            said, listed = (re.sub(r"\d+", "N", t.split("; allowed")[0]) for t in (e.value.detail, refused[1:]))
            assert said.endswith(listed), (preset, family)
