"""``tokenprune run``: config and data errors, the metrics against hand-computed values, the run directory,
the baseline cache, FLOPs against torch's flop counter, and DDP on two CPU processes."""

import json
import subprocess
import sys

import pytest
import torch
from reference import clip_llava_flops

import tokenprune as tp
from tokenprune.core.errors import ConfigError
from tokenprune.eval.run import run
from tokenprune.eval.run_config import load_run_config
from tokenprune.eval.scoring import load_items, normalize_answer, relative_score, summarize, vqa_accuracy

QUIET = ["logging.wandb.mode=disabled", "logging.progress_bar=false"]


def config(tmp_path, folder, *extra):
    return load_run_config("experiments/asap_shapes.yaml", [
        f"model.path={folder}", "data.limit=6", "batch_size=3", f"output_dir={tmp_path / 'run'}",
        f"baseline_cache={tmp_path / 'cache'}", *QUIET, *extra])


# --- metrics by hand ---------------------------------------------------------------------------------

def test_answer_normalisation_and_vqa_soft_accuracy():
    assert normalize_answer("The Two.") == "2" and normalize_answer(" a  Red  circle!") == "red circle"
    # 3 of 10 humans said "red": leaving out one of them leaves 2 matches (2/3), any other leaves 3 (1)
    answers = ["red"] * 3 + ["blue"] * 7
    assert vqa_accuracy("Red", answers) == pytest.approx((3 * 2 / 3 + 7 * 1.0) / 10)
    assert vqa_accuracy("green", answers) == 0.0
    assert vqa_accuracy("blue", answers) == 1.0


def test_yes_no_accuracy_and_f1_by_hand():
    items = [{"answer": a, "type": "pope", "metric": "yes_no"} for a in ("yes", "yes", "no", "no", "yes")]
    out = summarize(["Yes.", "no", "yes", "no", "maybe"], items)
    # "yes" class: predicted yes at 0, 2 (tp 1, fp 1); true yes at 0, 1, 4 (fn 2): P 1/2, R 1/3, F1 0.4
    assert out["yes_no"]["accuracy"] == pytest.approx(2 / 5) and out["yes_no"]["f1"] == pytest.approx(0.4)
    assert out["accuracy"] == pytest.approx(2 / 5) and out["per_type"] == {"pope": pytest.approx(0.4)}


def test_relative_score_averages_over_tasks():
    assert relative_score({"a": 0.4, "b": 0.9}, {"a": 0.8, "b": 0.9}) == pytest.approx((50 + 100) / 2)
    assert relative_score({"a": 0.4, "b": 0.0}, {"a": 0.8, "b": 0.0}) == pytest.approx(50)  # b: no baseline skill


# --- errors before any model is loaded ---------------------------------------------------------------

def write_jsonl(tmp_path, rows):
    from PIL import Image

    Image.new("RGB", (336, 336), (40, 40, 40)).save(tmp_path / "img.png")
    path = tmp_path / "data.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_rows_are_checked_with_file_and_row(tmp_path):
    good = {"image": "img.png", "question": "What color?", "answer": "red", "type": "color"}
    items = load_items({"source": "jsonl", "path": str(write_jsonl(tmp_path, [good]))})
    assert items[0]["image"] == str((tmp_path / "img.png").resolve()) and items[0]["metric"] == "exact_match"
    cases = [
        ({**good, "image": "missing.png"}, "row 2: image file not found"),
        ({k: v for k, v in good.items() if k != "answer"}, "row 2: missing 'answer'"),
        ('{"image": "img.png", "question": ', "row 2: not valid JSON"),
        ({**good, "metric": "bleu"}, "row 2: unknown metric 'bleu'; allowed: exact_match, vqa, yes_no"),
    ]
    for bad, message in cases:
        path = write_jsonl(tmp_path, [good, bad])
        with pytest.raises(ConfigError, match=message) as e:
            load_items({"source": "jsonl", "path": str(path)})
        assert str(path) in str(e.value) and e.value.key == "data.path"


def test_bad_run_configs_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="batchsize"):
        load_run_config("experiments/asap_shapes.yaml", ["batchsize=3"])
    with pytest.raises(ConfigError) as e:
        load_run_config("experiments/asap_shapes.yaml", ["model.dtype=float8"])
    assert e.value.key == "model.dtype" and "float32" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_run_config("experiments/asap_shapes.yaml", ["logging.wandb.mode=cloud"])
    assert e.value.key == "logging.wandb.mode"
    cfg = load_run_config("experiments/asap_shapes.yaml", ["pipeline=fastv", "overrides=[stages.0.operators.0.op=nope]",
                                                          "model.path=/nonexistent", *QUIET])
    with pytest.raises(ConfigError) as e:  # the pipeline fails before the (missing) model is looked for
        run(cfg)
    assert e.value.key == "pipeline.stages.0.operators.0.op"
    with pytest.raises(ConfigError) as e:
        run(load_run_config("experiments/asap_shapes.yaml", ["data.split=dev", "model.path=/nonexistent", *QUIET]))
    assert e.value.key == "data.split"


# --- runs on a tiny model of the reference architecture ----------------------------------------------

def test_keeping_everything_reproduces_the_baseline_and_the_cache_is_reused(tmp_path, tiny_folder):
    keep_all = "pipeline={stages: [{layer: 2, operators: [{op: random}, {op: topk, keep: 1.0}]}]}"
    first = run(config(tmp_path, tiny_folder, keep_all))
    assert not first["baseline_cached"]
    assert first["accuracy"] == first["baseline_accuracy"] and first["fidelity"] == 1.0
    assert first["flops_reduction"] == pytest.approx(0.0) and first["visual_tokens_kept"] == [576.0]
    out = tmp_path / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 6 and set(metrics["per_type"]) == {"color", "count", "exist", "position", "relation"}
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"shapes-test-{i}" for i in range(6)]
    assert all(r["prediction"] == r["baseline_prediction"] for r in rows)
    assert "pipeline" in (out / "config.yaml").read_text()

    second = run(config(tmp_path, tiny_folder, "pipeline=fastv", f"output_dir={tmp_path / 'second'}"))
    assert second["baseline_cached"] and second["baseline_accuracy"] == first["baseline_accuracy"]
    assert second["visual_tokens_kept"] == [288.0]


def test_flops_reduction_is_the_analytic_one_with_the_real_token_counts(tmp_path, tiny_folder):
    from tokenprune.measure.flops import LLMShape, pipeline_flops
    from tokenprune.reference.model import prompt

    metrics = run(config(tmp_path, tiny_folder, "pipeline=fastv"))
    from transformers import AutoConfig, AutoProcessor

    proc = AutoProcessor.from_pretrained(tiny_folder)
    shape = LLMShape.from_config(AutoConfig.from_pretrained(tiny_folder).text_config)
    items = load_items({"source": "shapes", "split": "test", "limit": 6})
    reports, lengths = [], []
    for it in items:
        n = proc(images=it["image"], text=prompt(proc, it["question"]), return_tensors="pt")["input_ids"].shape[1]
        reports.append(pipeline_flops(tp.load_pipeline("fastv"), shape, n, 576, "exact"))
        lengths.append(n)
    expected = 1 - sum(r.flops for r in reports) / sum(r.baseline_flops for r in reports)
    assert metrics["flops_reduction"] == pytest.approx(expected, rel=1e-9)
    # the prompt's KV after prefill: tokens held per layer x 2 (k, v) x 1 KV head x head dim 32 x 4 bytes
    per_token = 2 * shape.kv_heads * shape.head_dim * 4
    assert (shape.kv_heads, shape.head_dim) == (1, 32)
    assert metrics["kv_cache_bytes"] == pytest.approx(sum(sum(r.per_layer_tokens) for r in reports) / 6 * per_token)
    assert metrics["baseline_kv_cache_bytes"] == pytest.approx(sum(shape.layers * n for n in lengths) / 6 * per_token)
    # the vision side: the 2-layer CLIP tower (336 px, patch 14, width 32) and the projector into width 64, per item
    tower = clip_llava_flops(images=1, side=336, patch=14, d=32, m=64, layers=2, text=64)
    assert metrics["vision_flops"] == metrics["baseline_vision_flops"] == tower
    base, pruned = sum(r.baseline_flops for r in reports) / 6, sum(r.flops for r in reports) / 6
    assert metrics["flops_speedup"] == pytest.approx(base / pruned, rel=1e-9)
    assert metrics["flops_speedup_with_vision"] == pytest.approx((base + tower) / (pruned + tower), rel=1e-9)
    assert 0 < metrics["vision_ms"] < metrics["prefill_ms"] and 0 < metrics["vision_share"] < 1
    assert metrics["llm_prefill_ms"] == pytest.approx(metrics["prefill_ms"] - metrics["vision_ms"], rel=0.5)


@torch.no_grad()
def test_exact_flops_convention_matches_torch_flop_counter():
    """The analytic `exact` count of the decoder layers is within 2% of torch.utils.flop_counter (eager
    attention, whose matmuls the counter sees), unpruned and with tokens dropped at layer 2."""
    from torch.utils.flop_counter import FlopCounterMode

    from tokenprune.measure.flops import LLMShape, measured_flops
    from tokenprune.reference.tiny import tiny_llava, tiny_llava_inputs

    model = tiny_llava("eager", layers=4)
    inputs = {k: v[:1] for k, v in tiny_llava_inputs(model).items()}  # one sample: no padding
    real = inputs["attention_mask"][0].bool()
    inputs["input_ids"], inputs["attention_mask"] = inputs["input_ids"][:, real], inputs["attention_mask"][:, real]
    shape = LLMShape.from_config(model.config.text_config)
    n = inputs["input_ids"].shape[1]
    v = int((inputs["input_ids"] == model.config.image_token_id).sum())
    layers = [f"LlavaForConditionalGeneration.model.language_model.layers.{i}" for i in range(shape.layers)]

    def counted(pipe=None):
        with FlopCounterMode(display=False) as fc:
            if pipe is None:
                model(**inputs)
            else:
                with pipe.attach(model):
                    model(**inputs)
        counts = fc.get_flop_counts()
        return sum(sum(counts[k].values()) for k in layers)

    assert counted() == pytest.approx(measured_flops(shape, n, v, [], "exact").flops, rel=0.02)
    pipe = tp.load_pipeline({"stages": [{"layer": 2, "operators": [{"op": "random"}, {"op": "topk", "keep": 0.25}]}]})
    flops = counted(pipe)
    t = pipe.trace[0]
    report = measured_flops(shape, n, v, [(t.layer, t.tokens_after[0], t.visual_after[0])], "exact")
    assert t.visual_after[0] < v and flops == pytest.approx(report.flops, rel=0.02)


def test_two_cpu_processes_give_the_same_metrics_as_one(tmp_path, tiny_folder):
    def cli(devices, name):
        args = [sys.executable, "-m", "tokenprune.cli", "run", "experiments/asap_shapes.yaml", f"model.path={tiny_folder}",
                "data.limit=6", "batch_size=2", "pipeline=fastv", f"output_dir={tmp_path / name}", "baseline_cache=null",
                "trainer.accelerator=cpu", f"trainer.devices={devices}",
                f"trainer.strategy={'ddp' if devices > 1 else 'auto'}", *QUIET]
        subprocess.run(args, check=True, capture_output=True, text=True, timeout=300)
        return json.loads((tmp_path / name / "metrics.json").read_text())

    one, two = cli(1, "one"), cli(2, "two")
    for key in ("n", "accuracy", "per_type", "baseline_accuracy", "fidelity", "flops", "baseline_flops",
                "flops_reduction", "visual_tokens_kept", "kv_cache_bytes"):
        assert one[key] == two[key], key
    rows = [json.loads(line)["id"] for line in (tmp_path / "two" / "predictions.jsonl").read_text().splitlines()]
    assert rows == [f"shapes-test-{i}" for i in range(6)]  # gathered from both shards, in order, once each


def test_wandb_offline_run_is_written_next_to_the_run(tmp_path, tiny_folder, capfd):
    cfg = load_run_config("experiments/asap_shapes.yaml", [
        f"model.path={tiny_folder}", "data.limit=2", "batch_size=2", f"output_dir={tmp_path / 'run'}",
        "baseline_cache=null", "logging.progress_bar=false", "pipeline=fastv"])
    assert cfg.logging.wandb.mode == "offline"  # the shipped default: nothing leaves the machine
    run(cfg)
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    # the predictions table holds what predictions.jsonl holds, row for row
    table, = (tmp_path / "run" / "wandb").glob("offline-run-*/files/media/table/predictions_*.table.json")
    table = json.loads(table.read_text())
    written = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert table["columns"] == ["id", "question", "answer", "prediction", "unpruned"]
    assert [row[0] for row in table["data"]] == [r["id"] for r in written]
    assert [row[3] for row in table["data"]] == [r["prediction"] for r in written]
    assert "anonymous" not in capfd.readouterr().err  # no deprecated W&B setting passed


def test_a_local_datasets_folder_is_read_and_checked(tmp_path):
    datasets = pytest.importorskip("datasets")  # a dev dependency; the core does not need it
    from PIL import Image

    images = [Image.new("RGB", (336, 336), (200, 40, 40)), Image.new("RGB", (336, 336), (40, 40, 200))]
    ds = datasets.Dataset.from_dict({"image": images, "question": ["What color?", "What color?"],
                                     "answer": [["red"] * 10, ["blue"] * 10], "metric": ["vqa", "vqa"]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "question": datasets.Value("string"),
                                                                "answer": datasets.Sequence(datasets.Value("string")),
                                                                "metric": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "vqa"))
    items = load_items({"source": "datasets", "path": str(tmp_path / "vqa")})
    assert [it["answer"] for it in items] == [["red"] * 10, ["blue"] * 10] and items[1]["metric"] == "vqa"
    assert items[0]["image"].getpixel((0, 0)) == (200, 40, 40)
    assert summarize(["red", "red"], items)["accuracy"] == pytest.approx(0.5)
    datasets.Dataset.from_dict({"image": images, "question": ["q", "q"], "answer": ["red", ""]},
                               features=datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                                           "answer": datasets.Value("string")})
                               ).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(ConfigError, match=r"bad, row 1: missing 'answer'"):
        load_items({"source": "datasets", "path": str(tmp_path / "bad")})


def test_a_kv_cache_method_keeps_the_prefill_flops_and_cuts_the_prompt_kv(tmp_path, tiny_folder):
    """AirCache: the prefill runs whole (no FLOPs saved); the prompt's KV after the prefill holds, over the L
    layers, the text plus L x round(0.1 x 576) = L x 58 visual entries per item (adaptive budgets, exact total)."""
    from transformers import AutoConfig, AutoProcessor

    from tokenprune.measure.flops import LLMShape
    from tokenprune.reference.model import prompt

    metrics = run(config(tmp_path, tiny_folder, "pipeline=aircache"))
    proc = AutoProcessor.from_pretrained(tiny_folder)
    shape = LLMShape.from_config(AutoConfig.from_pretrained(tiny_folder).text_config)
    items = load_items({"source": "shapes", "split": "test", "limit": 6})
    lengths = [proc(images=it["image"], text=prompt(proc, it["question"]), return_tensors="pt")["input_ids"].shape[1]
               for it in items]
    per_token = 2 * shape.kv_heads * shape.head_dim * 4
    assert metrics["flops_reduction"] == pytest.approx(0.0)
    assert metrics["visual_tokens_kept"] == []  # no prefill stage
    expected = sum(shape.layers * (n - 576 + 58) for n in lengths) / 6 * per_token
    assert metrics["kv_cache_bytes"] == pytest.approx(expected)


# --- killed and resumed; two runs sharing one baseline cache -------------------------------------------------

TIMINGS = {"prefill_ms", "baseline_prefill_ms", "decode_ms_per_token", "baseline_decode_ms_per_token", "operator_ms",
           "vision_ms", "baseline_vision_ms", "llm_prefill_ms", "baseline_llm_prefill_ms", "vision_share",
           "prefill_speedup", "llm_prefill_speedup", "peak_memory_bytes", "baseline_cached", "finished_earlier",
           "output_dir"}


def _results(metrics):
    return {k: v for k, v in metrics.items() if k not in TIMINGS}


class Killed(BaseException):
    """Stands for SIGKILL at one point of a run (not an Exception: nothing may catch it)."""


@pytest.mark.parametrize("point", ["baseline", "pruned", "config.yaml", "predictions.jsonl", "metrics.json"])
def test_a_run_killed_at_any_point_finishes_on_rerun_with_the_same_metrics(tmp_path, tiny_folder, monkeypatch, point):
    from tokenprune.eval import run as run_module

    reference = _results(run(config(tmp_path / "ref", tiny_folder, "pipeline=fastv")))
    calls = {"predict": 0}
    real_predict, real_write = run_module.predict, run_module.write_atomic

    def predict(*args, **kwargs):
        calls["predict"] += 1
        if (point, calls["predict"]) in (("baseline", 1), ("pruned", 2)):
            raise Killed
        return real_predict(*args, **kwargs)

    def write_atomic(path, text):
        real_write(path, text)
        if path.name == point:
            raise Killed

    monkeypatch.setattr(run_module, "predict", predict)
    monkeypatch.setattr(run_module, "write_atomic", write_atomic)
    monkeypatch.setattr(run_module, "write_jsonl", lambda path, rows: write_atomic(
        path, "".join(json.dumps(r, default=str) + "\n" for r in rows)))
    with pytest.raises(Killed):
        run(config(tmp_path, tiny_folder, "pipeline=fastv"))
    monkeypatch.undo()
    out = tmp_path / "run"
    assert (out / "metrics.json").exists() == (point == "metrics.json")  # written last: absent means unfinished
    again = run(config(tmp_path, tiny_folder, "pipeline=fastv"))
    assert _results(again) == reference
    assert again.get("finished_earlier", False) == (point == "metrics.json")
    assert _results(json.loads((out / "metrics.json").read_text())) == reference
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and not list(out.glob("*.tmp"))


def test_a_finished_run_is_not_read_back_for_a_model_retrained_into_the_same_folder(tmp_path, tiny_folder):
    """The same config on other weights (a model trained again into the folder the config names): the finished
    run's results are refused, not returned; overwrite=true computes them on the new weights."""
    import os
    import shutil

    from tokenprune.reference.model import ReferenceSize, build_model

    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    run(config(tmp_path, folder, "pipeline=fastv"))
    answers = lambda: [json.loads(r)["prediction"] for r in (tmp_path / "run" / "predictions.jsonl").open()]  # noqa: E731
    first = answers()
    assert run(config(tmp_path, folder, "pipeline=fastv")).get("finished_earlier")  # unchanged: read back
    build_model(ReferenceSize(vision_hidden=32, vision_layers=2, vision_heads=2, text_hidden=64, text_layers=4,
                              text_heads=2, text_kv_heads=1), seed=7).save_pretrained(folder)
    later = (folder / "model.safetensors").stat().st_mtime + 10  # written again in the same second, maybe
    os.utime(folder / "model.safetensors", (later, later))
    with pytest.raises(ConfigError, match=r"^output_dir: .* holds this config's finished results on other weights "
                                          r"\(.*model.safetensors of .* changed since\)"):
        run(config(tmp_path, folder, "pipeline=fastv"))
    again = run(config(tmp_path, folder, "pipeline=fastv", "overwrite=true"))
    assert not again.get("finished_earlier") and not again["baseline_cached"]  # the cache key has the files too
    assert answers() != first  # other weights, other answers


def test_a_damaged_baseline_cache_is_computed_again(tmp_path, tiny_folder, capsys):
    reference = _results(run(config(tmp_path / "ref", tiny_folder, "pipeline=fastv")))
    (cache,) = (tmp_path / "ref" / "cache").glob("*.jsonl")
    lines = cache.read_text().splitlines()
    cache.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])  # truncated mid-record
    again = run(config(tmp_path / "ref", tiny_folder, "pipeline=fastv", f"output_dir={tmp_path / 'again'}"))
    assert "is damaged" in capsys.readouterr().err and not again["baseline_cached"]
    assert _results(again) == reference and len(cache.read_text().splitlines()) == 6


def test_two_runs_sharing_a_baseline_cache_at_once(tmp_path, tiny_folder):
    def start(name):
        return subprocess.Popen(
            [sys.executable, "-m", "tokenprune.cli", "run", "experiments/asap_shapes.yaml", f"model.path={tiny_folder}",
             "data.limit=6", "batch_size=2", "pipeline=fastv", f"output_dir={tmp_path / name}",
             f"baseline_cache={tmp_path / 'cache'}", "trainer.accelerator=cpu", *QUIET],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    procs = [start("a"), start("b")]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    a, b = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in "ab")
    assert _results(a) == _results(b)
    (cache,) = (tmp_path / "cache").glob("*.jsonl")
    assert [json.loads(line)["id"] for line in cache.read_text().splitlines()] == [f"shapes-test-{i}" for i in range(6)]
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_a_run_killed_by_sigkill_after_its_baseline_resumes_from_the_cache(tmp_path, tiny_folder):
    import signal
    import time

    args = [sys.executable, "-m", "tokenprune.cli", "run", "experiments/asap_shapes.yaml", f"model.path={tiny_folder}",
            "data.limit=12", "batch_size=1", "pipeline=fastv", f"output_dir={tmp_path / 'run'}",
            f"baseline_cache={tmp_path / 'cache'}", "trainer.accelerator=cpu", *QUIET]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not list((tmp_path / "cache").glob("*.jsonl")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # during the pruned run (or, on a fast machine, after it)
    proc.wait()
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    reference = run(load_run_config("experiments/asap_shapes.yaml", [
        f"model.path={tiny_folder}", "data.limit=12", "batch_size=1", "pipeline=fastv",
        f"output_dir={tmp_path / 'ref'}", "baseline_cache=null", *QUIET]))
    assert _results(metrics) == _results(reference) and metrics["baseline_cached"]


def test_the_run_command_keeps_library_notices_off_unless_verbose(tmp_path, tiny_folder):
    def cli(*extra):
        return subprocess.run([sys.executable, "-m", "tokenprune.cli", "run", "experiments/asap_shapes.yaml",
                               f"model.path={tiny_folder}", "data.limit=2", "batch_size=2", "pipeline=fastv",
                               f"output_dir={tmp_path / ('v' if extra else 'q')}", "baseline_cache=null",
                               "trainer.accelerator=cpu", *QUIET, *extra], capture_output=True, text=True, timeout=300)

    quiet, verbose = cli(), cli("--verbose")
    assert quiet.returncode == 0 and verbose.returncode == 0, quiet.stderr + verbose.stderr
    assert "GPU available" in verbose.stderr and "Loading weights" in verbose.stderr  # the checks below are not void
    assert "GPU available" not in quiet.stderr and "Loading weights" not in quiet.stderr and "Tip:" not in quiet.stderr and "deprecated" not in quiet.stderr
    assert "accuracy" in quiet.stdout


def test_the_run_command_labels_one_progress_bar_per_phase(tmp_path, tiny_folder):
    args = [sys.executable, "-m", "tokenprune.cli", "run", "experiments/asap_shapes.yaml", f"model.path={tiny_folder}",
            "data.limit=2", "batch_size=1", "pipeline=fastv", f"output_dir={tmp_path / 'r'}",
            f"baseline_cache={tmp_path / 'cache'}", "trainer.accelerator=cpu", "logging.wandb.mode=disabled",
            "logging.progress_bar=true"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    bars = first.stdout + first.stderr
    assert "baseline (unpruned): 100%" in bars and "fastv: 100%" in bars.split("baseline (unpruned)", 1)[1]
    assert "Predicting" not in bars and "DataLoader" not in bars  # Lightning's unlabelled default
    # a rerun takes the baseline from the cache: only the pipeline's bar is drawn
    again = subprocess.run([*args, "overwrite=true"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "baseline (unpruned)" not in again.stdout + again.stderr and "fastv: 100%" in again.stdout + again.stderr
