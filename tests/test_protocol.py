"""The measurement protocol: where the prefill's time goes (vision tower, LLM prefill, decoding), the vision
side's FLOPs against a hand count, and the speed-ups run and bench derive from them, by hand."""

import time

import pytest
import torch
from reference import clip_llava_flops

from tokenprune.eval.run import protocol_metrics
from tokenprune.measure.timing import VisionClock
from tokenprune.reference.tiny import tiny_llava, tiny_llava_inputs


@torch.no_grad()
def test_vision_flops_match_a_hand_count_with_sdpa_on_cpu():
    model = tiny_llava("sdpa")
    inputs = tiny_llava_inputs(model)
    with VisionClock(model) as vision:
        model(**inputs)
    assert [type(m).__name__ for m, _, _ in vision.calls] == ["CLIPVisionModel", "LlavaMultiModalProjector"]
    expected = clip_llava_flops(images=2, side=56, patch=7, d=32, m=64, layers=2, text=64)
    assert vision.flops() == expected
    cache: dict = {}
    assert vision.flops(cache) == expected and vision.flops(cache) == expected and len(cache) == 2


@torch.no_grad()
def test_the_vision_clock_times_the_tower_and_the_projector_only():
    model = tiny_llava("sdpa")
    inputs = tiny_llava_inputs(model)
    tower = model.model.vision_tower
    slow = tower.register_forward_hook(lambda *a: time.sleep(0.2))
    try:
        with VisionClock(model) as vision:
            t0 = time.perf_counter()
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
            total = (time.perf_counter() - t0) * 1000
    finally:
        slow.remove()
    assert len(vision.calls) == 2  # the prefill's tower and projector; decoding steps run neither
    assert 200 <= vision.ms() < total


def test_protocol_metrics_by_hand():
    metrics = {"prefill_ms": 60.0, "baseline_prefill_ms": 100.0, "vision_ms": 20.0, "baseline_vision_ms": 20.0,
               "llm_prefill_ms": 40.0, "baseline_llm_prefill_ms": 80.0, "flops": 3e9, "baseline_flops": 9e9}
    got = protocol_metrics(metrics, vision_flops=1e9, baseline_vision_flops=1e9)
    assert got["vision_share"] == pytest.approx(0.2)
    assert got["prefill_speedup"] == pytest.approx(100 / 60) and got["llm_prefill_speedup"] == pytest.approx(2.0)
    assert got["flops_speedup"] == pytest.approx(3.0)
    assert got["flops_speedup_with_vision"] == pytest.approx(10 / 4)
    unknown = protocol_metrics({**metrics, "flops": None}, 1e9, 1e9)
    assert unknown["flops_speedup"] is None and unknown["flops_speedup_with_vision"] is None


# --- reproducibility ------------------------------------------------------------------------------------

def test_provenance_records_the_commit_the_packages_and_the_command(tmp_path):
    import subprocess
    from importlib import metadata

    from tokenprune.measure.provenance import command_line, model_files, provenance

    (tmp_path / "config.json").write_text('{"a": 1}')
    (tmp_path / "w.safetensors").write_bytes(b"x" * 10)
    record = provenance(str(tmp_path), argv=["/venv/bin/tokenprune", "run", "a b.yaml", "data.limit=5"])
    assert record["command"] == "tokenprune run 'a b.yaml' data.limit=5"
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a checkout: its commit, marked when tracked files differ from it
        assert record["commit"].split("+")[0] == head.stdout.strip()
    assert record["packages"]["torch"] == metadata.version("torch") and record["packages"]["tokenprune"] == "0.1.0"
    import hashlib

    assert model_files(str(tmp_path)) == {"folder": str(tmp_path.resolve()),
                                          "files": [("config.json", 8), ("w.safetensors", 10)],
                                          "config_sha256": hashlib.sha256(b'{"a": 1}').hexdigest()}
    assert model_files("org/hub-id") is None and command_line(["x"]) == "x"


def test_a_run_reruns_from_its_directory_with_the_pipeline_as_resolved_then(tmp_path, tiny_folder, capsys):
    import json

    import yaml

    from tokenprune.cli import main
    from tokenprune.eval.run import compare_runs
    from tokenprune.measure.provenance import command_line

    first = tmp_path / "first"
    args = ["run", "experiments/asap_shapes.yaml", f"model.path={tiny_folder}", "data.limit=4", "batch_size=2",
            "pipeline=fastv", "overrides=[stages.0.operators.1.keep=0.25]", f"output_dir={first}",
            f"baseline_cache={tmp_path / 'cache'}", "logging.wandb.mode=disabled", "logging.progress_bar=false"]
    assert main(args) == 0
    assert json.loads((first / "provenance.json").read_text())["command"] == command_line()  # this process's argv
    recorded = yaml.safe_load((first / "config.yaml").read_text())
    recorded["pipeline"] = "no_such_preset"  # the rerun takes resolved_pipeline, not the name
    (first / "config.yaml").write_text(yaml.safe_dump(recorded))
    capsys.readouterr()
    assert main(["run", "--from", str(first), f"output_dir={tmp_path / 'again'}"]) == 0
    out = capsys.readouterr().out
    assert f"reproduced {first}: the same results" in out
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["visual_tokens_kept"] == [144.0] and not again["baseline_cached"]  # keep 0.25 of 576, baseline rerun
    assert yaml.safe_load((tmp_path / "again" / "config.yaml").read_text())["baseline_cache"] is None

    metrics = json.loads((first / "metrics.json").read_text())
    metrics["accuracy"] += 0.25
    (first / "metrics.json").write_text(json.dumps(metrics))
    rows = (first / "predictions.jsonl").read_text().splitlines()
    row = json.loads(rows[1])
    row["prediction"] = "something else"
    (first / "predictions.jsonl").write_text("\n".join([rows[0], json.dumps(row), *rows[2:]]) + "\n")
    diffs = compare_runs(first, tmp_path / "again")
    assert len(diffs) == 2 and diffs[0].startswith("accuracy: ")
    assert diffs[1] == f"1 pipeline answers changed (first: {row['id']})"


def test_run_from_refuses_what_is_not_a_run_directory(tmp_path, capsys):
    from tokenprune.cli import main

    assert main(["run", "--from", str(tmp_path / "none")]) == 2
    assert main(["run", "--from", str(tmp_path)]) == 2
    assert main(["run", "--from", str(tmp_path), "limit"]) == 2
    assert main(["run"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"tokenprune: error: --from: '{tmp_path / 'none'}' is not a folder (a run directory: tokenprune "
                   "run writes one)",
                   f"tokenprune: error: --from: '{tmp_path}' holds no config.yaml: not a run directory",
                   "tokenprune: error: --from: with --from every argument after it is KEY=VALUE; got 'limit' (the "
                   "config is the run directory's)",
                   "tokenprune: error: config: tokenprune run needs a run config (experiments/asap_shapes.yaml) or "
                   "--from RUN_DIR"]


# --- the difficulty filter ------------------------------------------------------------------------------

def test_the_difficulty_filter_scores_the_items_the_filter_pipeline_gets_wrong(tmp_path):
    """The hard items are read off a run of the filter pipeline of its own (its predictions' scores), and the
    run's hard accuracy off its own predictions on them: nothing of the filter's code in the reference."""
    import json

    from tokenprune.eval.run import run
    from tokenprune.eval.run_config import load_run_config

    common = ["data.limit=24", "batch_size=8", "generation.max_new_tokens=3", f"baseline_cache={tmp_path / 'cache'}",
              "logging.wandb.mode=disabled", "logging.progress_bar=false"]
    random10 = "overrides=[stages.0.operators.1.keep=0.1]"
    run(load_run_config("experiments/asap_shapes.yaml", [*common, "pipeline=random", random10,
                                                         f"output_dir={tmp_path / 'filter'}"]))
    filtered = run(load_run_config("experiments/asap_shapes.yaml", [
        *common, "pipeline=fastv", f"output_dir={tmp_path / 'fastv'}",
        "data.filter={hard_for: random, overrides: [stages.0.operators.1.keep=0.1]}"]))
    judged = [json.loads(line) for line in (tmp_path / "filter" / "predictions.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (tmp_path / "fastv" / "predictions.jsonl").read_text().splitlines()]
    hard = [i for i, r in enumerate(judged) if r["correct"] < 0.5]
    assert 0 < len(hard) < 24, "the reference model answers some items right with 10% of its tokens, not all"
    assert filtered["hard_for"] == "random" and filtered["hard_n"] == len(hard)
    assert [r["hard"] for r in rows] == [i in hard for i in range(24)]
    assert filtered["hard_accuracy"] == pytest.approx(sum(rows[i]["correct"] for i in hard) / len(hard))
    assert filtered["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / 24)  # the plain score beside it
    unpruned_hard = sum(judged[i]["baseline_prediction"].strip().lower() == str(judged[i]["answer"]).lower()
                        for i in hard) / len(hard)
    assert filtered["hard_baseline_accuracy"] == pytest.approx(unpruned_hard)


@torch.no_grad()
def test_on_a_gpu_the_vision_clock_reads_cuda_events_around_each_outer_call(monkeypatch):
    """The CUDA path on a CPU: events stand in for CUDA's (each record() a tick of a clock), the GPU is synchronised
    before they are read; the tower's and the projector's calls are two spans of one tick each."""
    ticks, synced = iter(range(100)), []

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self):
            self.t = next(ticks)

        def elapsed_time(self, end):
            assert synced, "read before the GPU was synchronised"
            return float(end.t - self.t)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: synced.append(True))
    model = tiny_llava("sdpa")
    with VisionClock(model) as vision:
        vision.cuda = True
        model(**tiny_llava_inputs(model))
    assert len(vision.spans) == 2 and vision.ms() == 2.0
