"""``tokenprune sweep``: variants and their names, dry runs, resuming, failures recorded, results and plot."""

import csv
import json
import subprocess
import sys

import pytest
import yaml

from tokenprune.core.errors import ConfigError
from tokenprune.eval.sweep import Sweep, run_sweep

REPO_BASE = "experiments/asap_shapes.yaml"


def sweep_file(tmp_path, folder, **sections):
    from pathlib import Path

    spec = {"name": "mini", "base": str(Path(REPO_BASE).resolve()), "output_dir": str(tmp_path / "out"),
            "set": [f"model.path={folder}", "data.limit=2", "batch_size=2", "logging.wandb.mode=disabled",
                    "logging.progress_bar=false", "pipeline=fastv"], **sections}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_variants_are_the_grid_times_base_swaps_variants_and_methods(tmp_path):
    path = sweep_file(tmp_path, "unused",
                      budget={"key": "stages.0.operators.1.keep", "values": [0.5, 0.25]},
                      swap={"stages.0.operators.0": [{"op": "random"}]},
                      variants={"last_only": {"stages.0.operators.0.queries": "last"}},
                      methods={"random": {"budget": {"stages.0.operators.1.keep": 0.5}}})
    variants = Sweep(path).variants()
    assert [v.name for v in variants] == [
        "keep=0.5", "keep=0.5,op0=random", "keep=0.5,last_only", "random,keep=0.5",
        "keep=0.25", "keep=0.25,op0=random", "keep=0.25,last_only", "random,keep=0.25"]
    method = variants[3]
    assert method.pipeline == "random" and method.pipeline_overrides == ["stages.0.operators.1.keep=0.25"]
    assert variants[1].pipeline_overrides == ["stages.0.operators.1.keep=0.5", "stages.0.operators.0={op: random}"]
    cfg = Sweep(path).base_config(variants[4])
    assert cfg.output_dir.endswith("out/keep=0.25") and cfg.logging.wandb.group == "mini"
    assert list(cfg.overrides) == ["stages.0.operators.1.keep=0.25"] and cfg.pipeline == "fastv"


def test_a_method_without_budget_keys_runs_once_and_a_method_may_name_its_preset(tmp_path):
    path = sweep_file(tmp_path, "unused", budget={"key": "stages.0.operators.1.keep", "values": [0.5, 0.25]},
                      methods={"pooling": {}, "pool3": {"preset": "pooling", "set": {"stages.0.operators.0.size": 3}},
                               "fastv": {"budget": {"stages.0.operators.1.keep": 1.0}}})
    variants = Sweep(path).variants()
    assert [v.name for v in variants] == ["keep=0.5", "fastv,keep=0.5", "pool3", "pooling", "keep=0.25",
                                          "fastv,keep=0.25"]  # (the file's keys sorted)
    assert variants[2].pipeline == "pooling" and variants[2].pipeline_overrides == ["stages.0.operators.0.size=3"]
    with pytest.raises(ConfigError) as e:
        Sweep(sweep_file(tmp_path, "x", methods={"a": {"preset": 3}}))
    assert e.value.key == "methods.a.preset"


def test_bad_sweep_files_name_the_key(tmp_path):
    with pytest.raises(ConfigError) as e:
        Sweep(sweep_file(tmp_path, "x", swop={}))
    assert e.value.key == "swop"
    with pytest.raises(ConfigError) as e:
        Sweep(sweep_file(tmp_path, "x", grid={"batch_size": 4}))
    assert e.value.key == "grid.batch_size" and "list" in str(e.value)
    with pytest.raises(ConfigError) as e:
        Sweep(sweep_file(tmp_path, "x", methods={"fastv": {"budget": {"stages.0.operators.1.keep": 1.0}}}))
    assert e.value.key == "methods.fastv.budget"


def test_dry_run_lists_variants_and_flops_without_running(tmp_path, tiny_folder):
    path = sweep_file(tmp_path, tiny_folder, budget={"key": "stages.0.operators.1.keep", "values": [0.5]},
                      swap={"stages.0.operators.0": [{"op": "nope"}]})
    out = subprocess.run([sys.executable, "-m", "tokenprune.cli", "sweep", str(path), "--dry-run"],
                         capture_output=True, text=True)
    assert out.returncode == 2, out.stderr  # one variant's config is wrong: bad input
    lines = out.stdout.splitlines()
    assert lines[0].startswith("2 variants of mini")
    base = next(line for line in lines if line.strip().startswith("keep=0.5 "))
    # fastv keep 0.5 at layer 2 of 4 on 640 tokens (576 visual): the analytic reduction, computed here by hand
    from tokenprune.measure.flops import LLMShape, layer_flops

    shape = LLMShape(name="t", layers=4, hidden=64, intermediate=128, heads=2, kv_heads=1, head_dim=32)
    expected = 1 - (2 * layer_flops(640, shape, "exact") + 2 * layer_flops(352, shape, "exact")) / (
        4 * layer_flops(640, shape, "exact"))
    assert f"{expected:.1%}" in base
    assert "unknown operator 'nope'" in next(line for line in lines if "op0=nope" in line)
    assert not (tmp_path / "out").exists()


def test_a_killed_sweep_resumes_and_failures_are_recorded(tmp_path, tiny_folder, monkeypatch):
    from tokenprune.eval import sweep as sweep_module

    real_run = sweep_module.run

    def run_or_fail(cfg):  # a variant that fails while running (not a config error): recorded, the sweep goes on
        if cfg.output_dir.endswith("op0=random"):
            raise RuntimeError("out of memory (simulated)")
        return real_run(cfg)

    monkeypatch.setattr(sweep_module, "run", run_or_fail)
    path = sweep_file(tmp_path, tiny_folder, budget={"key": "stages.0.operators.1.keep", "values": [0.5, 0.25]},
                      swap={"stages.0.operators.0": [{"op": "random"}]})
    rows, baseline = run_sweep(Sweep(path))
    out = tmp_path / "out"
    assert [r["variant"] for r in rows] == ["keep=0.5", "keep=0.5,op0=random", "keep=0.25", "keep=0.25,op0=random"]
    assert [bool(r["error"]) for r in rows] == [False, True, False, True]
    assert rows[0]["pipeline"] == "fastv"  # the base pipeline's name, not "base"
    assert "out of memory (simulated)" in (out / "keep=0.5,op0=random" / "error.txt").read_text()
    with (out / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["variant"] for r in table] == [r["variant"] for r in rows]
    assert table[0]["stages.0.operators.1.keep"] == "0.5" and float(table[2]["flops_reduction"]) > float(
        table[0]["flops_reduction"])
    assert (out / "accuracy_vs_flops.png").stat().st_size > 1000
    assert (out / "results.md").read_text().count("\n") == 2 + 1 + len(rows)  # header, unpruned, variants
    assert len(list((out / ".baselines").glob("*.jsonl"))) == 1  # the unpruned baseline ran once

    # "kill" it mid-variant: keep=0.25 left without its metrics.json (a partial run directory)
    done = out / "keep=0.5" / "metrics.json"
    first_mtime = done.stat().st_mtime_ns
    (out / "keep=0.25" / "metrics.json").unlink()
    rows2, _ = run_sweep(Sweep(path))
    assert [bool(r["error"]) for r in rows2] == [False, True, False, True]
    assert done.stat().st_mtime_ns == first_mtime  # finished variants are not run again
    again = json.loads((out / "keep=0.25" / "metrics.json").read_text())
    assert again["visual_tokens_kept"] == [144.0] and again["baseline_cached"]
    assert [r["accuracy"] for r in rows2 if not r["error"]] == [r["accuracy"] for r in rows if not r["error"]]


def test_a_variant_with_a_config_error_stops_the_sweep_before_anything_runs(tmp_path, tiny_folder):
    path = sweep_file(tmp_path, tiny_folder, budget={"key": "stages.0.operators.1.keep", "values": [0.5]},
                      swap={"stages.0.operators.0": [{"op": "nope"}]})
    with pytest.raises(ConfigError) as e:
        run_sweep(Sweep(path))
    assert e.value.key == "pipeline.stages.0.operators.0.op" and "variant keep=0.5,op0=nope" in str(e.value)
    assert not (tmp_path / "out").exists()  # nothing ran, nothing written


def test_results_markdown_table_by_hand():
    from tokenprune.eval.sweep import results_markdown

    rows = [{"variant": "keep=0.5", "pipeline": "base", "accuracy": 0.875, "relative_score": 97.2222,
             "fidelity": 0.9, "flops_reduction": 0.4123, "equivalent_visual_tokens": 250.0, "prefill_ms": 12.34,
             "vision_ms": 4.0, "flops_speedup": 1 / (1 - 0.4123), "flops_speedup_with_vision": 1.5, "error": ""},
            {"variant": "fastv,keep=0.5", "pipeline": "fastv", "error": "ValueError: bad"},
            {"variant": "keep=0.25", "pipeline": "base", "accuracy": 0.5, "relative_score": 55.5555,
             "fidelity": 0.5, "flops_reduction": 0.7, "equivalent_visual_tokens": 100.0, "prefill_ms": None,
             "error": ""}]
    table = results_markdown(rows, {"accuracy": 0.9, "prefill_ms": 20.0, "vision_ms": 4.5}).splitlines()
    assert table[2] == "| unpruned | — | 90.0% | 100.0 | 100.0% | 0.0% | — | — | 20.0 | 4.5 |"
    assert table[3] == "| keep=0.5 | base | 87.5% | 97.2 | 90.0% | 41.2% | 250.0 | x1.70 / x1.50 | 12.3 | 4.0 |"
    assert table[4] == "| keep=0.25 | base | 50.0% | 55.6 | 50.0% | 70.0% | 100.0 | — / — | — | — |"  # by pipeline
    assert table[5] == "| fastv,keep=0.5 | fastv | failed: ValueError: bad | | | | | | | |"
    # a difficulty filter: its column after the accuracy, on every row
    rows[0].update(hard_for="downsample", hard_n=12, hard_accuracy=0.25)
    table = results_markdown(rows, {"accuracy": 0.9, "prefill_ms": 20.0, "hard_accuracy": 0.5}).splitlines()
    assert table[0].startswith("| variant | pipeline | accuracy | hard for downsample | relative score |")
    assert table[1].count("|") == table[0].count("|") == table[3].count("|") == table[5].count("|")
    assert table[2].startswith("| unpruned | — | 90.0% | 50.0% | 100.0 |")
    assert table[3].startswith("| keep=0.5 | base | 87.5% | 25.0% of 12 | 97.2 |")



def test_a_sweep_over_lmms_eval_tasks_is_refused_with_the_key(tmp_path):
    from tokenprune.eval.sweep import Sweep

    sweep = Sweep(sweep_file(tmp_path, "x", grid={"stages.0.operators.1.keep": [0.5]}))
    sweep.set = list(sweep.set) + ["data.lmms_eval=[pope]"]
    with pytest.raises(ConfigError, match=r"^data\.lmms_eval: a sweep evaluates items"):
        sweep.base_config(sweep.variants()[0])


def test_a_variant_whose_config_changed_since_it_ran_runs_again_and_its_old_run_is_kept(tmp_path, tiny_folder, capsys):
    path = sweep_file(tmp_path, tiny_folder, budget={"key": "stages.0.operators.1.keep", "values": [0.5]})
    out = tmp_path / "out"
    run_sweep(Sweep(path))
    first = (out / "keep=0.5" / "metrics.json").read_text()
    run_sweep(Sweep(path))  # the same sweep file: nothing runs again
    assert (out / "keep=0.5" / "metrics.json").read_text() == first and not (out / ".stale").exists()
    capsys.readouterr()
    run_sweep(Sweep(path, ["stages.0.layer=3"]))  # the sweep file edited: FastV at layer 3 instead of 2
    assert "its config or model changed since it ran (overrides: " in capsys.readouterr().out
    assert (out / ".stale" / "keep=0.5.1" / "metrics.json").read_text() == first  # kept, not overwritten
    rerun = yaml.safe_load((out / "keep=0.5" / "config.yaml").read_text())
    assert rerun["resolved_pipeline"]["stages"][0]["layer"] == 3


def test_a_variant_runs_again_when_its_model_was_written_again_since(tmp_path, tiny_folder, capsys):
    """A model retrained into the folder the sweep names (same config): the variant runs again on the new weights,
    its earlier run kept aside."""
    import os
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    path = sweep_file(tmp_path, folder, budget={"key": "stages.0.operators.1.keep", "values": [0.5]})
    out = tmp_path / "out"
    run_sweep(Sweep(path))
    first = (out / "keep=0.5" / "metrics.json").read_text()
    later = (folder / "model.safetensors").stat().st_mtime + 10
    os.utime(folder / "model.safetensors", (later, later))  # written again (the same bytes will do)
    capsys.readouterr()
    run_sweep(Sweep(path))
    assert f"changed since it ran (model.safetensors of model {folder} written since)" in capsys.readouterr().out
    assert (out / ".stale" / "keep=0.5.1" / "metrics.json").read_text() == first
    capsys.readouterr()
    run_sweep(Sweep(path))  # and then it stands
    assert "changed since" not in capsys.readouterr().out
