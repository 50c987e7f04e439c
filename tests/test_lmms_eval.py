"""The lmms-eval integration, end to end and offline: local shapes tasks, the `tokenprune` model found through
lmms-eval's entry point, and `tokenprune run` with `data.lmms_eval`. Scores are checked against a hand
computation with the stock Hugging Face model (generate() and a log-softmax over the answer word), not against
the integration's own output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lmms_eval = pytest.importorskip("lmms_eval", reason="lmms-eval is installed by `make install` (--no-deps)")

from tokenprune.core.errors import ConfigError  # noqa: E402
from tokenprune.reference import shapes  # noqa: E402

LIMIT = 12
ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory):
    from tokenprune.eval.lmms_tasks import write_shapes_task

    return write_shapes_task(tmp_path_factory.mktemp("lmms_tasks"), "test", LIMIT)


@pytest.fixture(scope="module")
def stock():
    """The shipped reference model and processor through the Auto classes, with no tokenprune code."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tokenprune.reference import model as reference

    return AutoModelForImageTextToText.from_pretrained(reference.path()).eval(), \
        AutoProcessor.from_pretrained(reference.path())


def _inputs(processor, item, text):
    return processor(images=item["image"], text=f"USER: <image> {item['question']} ASSISTANT:{text}",
                     return_tensors="pt")


def hand_scores(model, processor, pipeline=None) -> dict[str, float]:
    """Exact-match accuracy of greedy answers and the yes/no choice by answer log-likelihood, computed one item
    at a time with the stock model (``pipeline`` attached, when given) on the same items, the prompts written out
    by hand (the reference chat template's format)."""
    import contextlib

    from tokenprune.eval.scoring import normalize_answer

    items = shapes.load_split("test", size=LIMIT)
    correct, yes_no = [], []
    with torch.no_grad(), (pipeline.attach(model) if pipeline is not None else contextlib.nullcontext()):
        for it in items:
            enc = _inputs(processor, it, "")
            out = model.generate(**enc, max_new_tokens=4, do_sample=False)
            text = processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            correct.append(normalize_answer(text) == normalize_answer(it["answer"]))
            if it["type"] == "exist":  # the answer word's log-probability after the (pruned) prompt
                logits = model(**enc).logits[0, -1].float()
                word = {w: processor.tokenizer.convert_tokens_to_ids(w) for w in ("yes", "no")}
                yes_no.append(("yes" if logits[word["yes"]] > logits[word["no"]] else "no") == it["answer"])
    assert yes_no, "the first items hold no existence question"
    return {"accuracy": sum(correct) / len(correct), "acc": sum(yes_no) / len(yes_no)}


@pytest.fixture(scope="module")
def by_hand(stock):
    return hand_scores(*stock)


def test_the_core_never_imports_lmms_eval():
    code = ("import sys; import tokenprune, tokenprune.eval.run, tokenprune.cli, tokenprune.pipeline, tokenprune.eval.sweep, "
            "tokenprune.eval.bench, tokenprune.eval.lmms_tasks, tokenprune.eval.lmms_eval_run, tokenprune.eval.lmms_eval_entry; "
            "import tokenprune.operators; print('lmms_eval' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, check=True)
    assert out.stdout.strip() == "False"


def test_lmms_eval_finds_the_model_through_its_entry_point():
    from lmms_eval.models import get_model

    from tokenprune.eval.lmms_eval_model import TokenPrune

    assert get_model("tokenprune") is TokenPrune


def test_the_written_tasks_hold_the_benchmark_items(task_folder):
    import datasets

    data = datasets.load_from_disk(str(task_folder / "data"))
    items = shapes.load_split("test", size=LIMIT)
    assert data["test"]["question"] == [it["question"] for it in items]
    assert data["test"]["answer"] == [it["answer"] for it in items]
    assert data["yes_no"]["question"] == [it["question"] for it in items if it["type"] == "exist"]
    assert sorted(p.name for p in task_folder.iterdir()) == ["data", "shapes_vqa.yaml", "shapes_yes_no.yaml",
                                                               "utils.py"]


def test_the_lmms_eval_cli_scores_the_reference_model_as_the_stock_model_does(task_folder, by_hand, tmp_path):
    """`lmms-eval --model tokenprune` (a subprocess: the real CLI, entry point and all): generate_until (batched)
    and loglikelihood (multiple choice) give the hand-computed scores."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "tokenprune", "--model_args", "pretrained=reference",
           "--include_path", str(task_folder), "--tasks", "shapes_vqa,shapes_yes_no", "--batch_size", "5",
           "--output_path", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result_file,) = out.rglob("*_results.json")
    results = json.loads(result_file.read_text())["results"]
    assert results["shapes_vqa"]["accuracy,none"] == pytest.approx(by_hand["accuracy"])
    assert results["shapes_yes_no"]["acc,none"] == pytest.approx(by_hand["acc"])


def _requests(task_folder, kind):
    """lmms-eval's own requests for a task (built by its Task class), and the task dict the model reads docs from."""
    from lmms_eval.tasks import TaskManager, get_task_dict

    task_dict = get_task_dict([kind], TaskManager("WARNING", include_path=str(task_folder)))
    task = task_dict[kind]
    task.build_all_requests(limit=LIMIT, rank=0, world_size=1)
    return task.instances, {kind: task.dataset}


def test_loglikelihood_with_a_pipeline_is_the_pruned_forward_by_hand(task_folder, stock):
    """Pruned: each choice's value is lmms-eval's loss, minus the log-softmax of the last logits of the pruned
    forward over the context alone (the answer is one token, and must not take part in choosing the visual
    tokens), and is_greedy says whether argmax gives the answer; overrides separated by ';' reach the pipeline."""
    from tokenprune.eval.lmms_eval_model import TokenPrune
    from tokenprune.pipeline import load_pipeline

    lm = TokenPrune.create_from_arg_string("pretrained=reference,pipeline=fastv,overrides=stages.0.layer=1;"
                                           "stages.0.operators.1.keep=0.05", {"batch_size": 2})
    stage = lm.pipeline.config.stages[0]
    assert stage.layer == 1 and stage.operators[1].keep == 0.05
    instances, docs = _requests(task_folder, "shapes_yes_no")
    lm.task_dict = docs
    got = lm.loglikelihood(instances)
    model, processor = stock
    by_hand = load_pipeline("fastv", ["stages.0.layer=1", "stages.0.operators.1.keep=0.05"])
    unpruned_differs = False
    for inst, (loss, greedy) in zip(instances, got):
        item = docs["shapes_yes_no"]["yes_no"][inst.args[3]]
        word = inst.args[1].strip()
        context = _inputs(processor, item, "")
        with torch.no_grad(), by_hand.attach(model):
            logits = model(**context).logits[0, -1].float()
        target = processor.tokenizer.convert_tokens_to_ids(word)
        assert loss == pytest.approx(-float(torch.log_softmax(logits, -1)[target]), abs=1e-4)
        assert greedy == bool(logits.argmax() == target)
        with torch.no_grad():
            plain = float(torch.log_softmax(model(**context).logits[0, -1].float(), -1)[target])
        unpruned_differs |= abs(plain + loss) > 1e-3
    assert unpruned_differs, "keeping 5% of the visual tokens from layer 1 changed no log-likelihood"


def test_a_multi_token_continuation_is_scored_token_by_token(task_folder, stock):
    """Unpruned, the loss of a 3-token continuation is the mean of its tokens' negative log-probabilities in one
    stock forward over context + continuation (teacher forcing, by hand)."""
    from lmms_eval.api.instance import Instance

    from tokenprune.eval.lmms_eval_model import TokenPrune

    instances, docs = _requests(task_folder, "shapes_yes_no")
    lm = TokenPrune(pretrained="reference")
    lm.task_dict = docs
    base = instances[0].args
    meta = {"task": "shapes_yes_no", "doc_id": base[3], "repeats": 1}
    asked = [Instance("loglikelihood", (base[0], cont, *base[2:]), idx=0, metadata=meta)
             for cont in (" yes red circle", " no")]
    (loss, greedy), (one, _) = lm.loglikelihood(asked)
    model, processor = stock
    item = docs["shapes_yes_no"]["yes_no"][base[3]]
    for cont, got in ((" yes red circle", loss), (" no", one)):
        full = _inputs(processor, item, cont)
        n = len(cont.split())
        with torch.no_grad():
            logp = torch.log_softmax(model(**full).logits[0, -n - 1:-1].float(), -1)
        target = full["input_ids"][0, -n:]
        assert got == pytest.approx(-float(logp.gather(-1, target[:, None]).mean()), abs=1e-4)
    assert not greedy  # "red circle" after yes/no is not what the model says


def test_generate_until_returns_lmms_eval_order_across_groups_and_batches(task_folder):
    """Requests with different generation settings are batched apart and answered in their own order: the
    same texts as one request at a time; `until` cuts the text."""
    from tokenprune.eval.lmms_eval_model import TokenPrune

    instances, docs = _requests(task_folder, "shapes_vqa")
    for i, inst in enumerate(instances):  # two groups, interleaved
        inst.arguments = (inst.args[0], {**inst.args[1], "max_new_tokens": 3 if i % 2 else 4}, *inst.args[2:])
    lm = TokenPrune(pretrained="reference", batch_size=4)
    lm.task_dict = docs
    batched = lm.generate_until(instances)
    lm.batch_size_per_gpu = 1
    alone = [lm.generate_until([inst])[0] for inst in instances]
    assert batched == alone
    assert any(batched)
    first = instances[0]
    cut_at = batched[0][1:2]  # a character inside the first answer
    first.arguments = (first.args[0], {**first.args[1], "until": [cut_at]}, *first.args[2:])
    assert lm.generate_until([first]) == [batched[0].split(cut_at)[0].strip()]


def test_loglikelihood_pairs_survive_lmms_eval_response_handling():
    """lmms-eval 0.7.3 stringifies non-string responses and strips reasoning tags: the pair must come through
    both (its own functions) and still unpack as (logprob, is_greedy)."""
    from lmms_eval.api.instance import unwrap_generation_output
    from lmms_eval.api.reasoning import strip_reasoning_tags

    from tokenprune.eval.lmms_eval_model import _loglikelihood_result

    pair = _loglikelihood_result(-1.25, True)
    text, _ = unwrap_generation_output(pair)
    text = strip_reasoning_tags(text, [["<think>", "</think>"]])
    logp, greedy = text
    assert (logp, greedy) == (-1.25, True)
    lls, flags = zip(*[text, _loglikelihood_result(-3.0, False)])  # what multiple-choice scoring does
    assert lls == (-1.25, -3.0) and flags == (True, False)


@pytest.mark.parametrize("args, key", [
    ("pretrained=reference,colour=red", "model_args.colour"),
    ("pretrained=reference,pipeline=nope", "model_args.pipeline"),
    ("pretrained=reference,pipeline=fastv,overrides=stages.0.layer", "model_args.overrides"),
    ("pretrained=reference,pipeline=fastv,overrides=stages.0.operators.1.keep=-1", "model_args.pipeline.stages.0.operators.1.keep"),
    ("pretrained=reference,dtype=float64", "model_args.dtype"),
    ("pretrained=/no/such/folder", "model_args.pretrained"),
])
def test_bad_model_args_name_the_argument(args, key):
    from tokenprune.eval.lmms_eval_model import TokenPrune

    with pytest.raises(ConfigError) as e:
        TokenPrune.create_from_arg_string(args)
    assert str(e.value).startswith(key), str(e.value)


def _run_config(tmp_path, task_folder, *extra):
    from tokenprune.eval.run_config import load_run_config

    return load_run_config("experiments/asap_shapes.yaml", [
        f"data.lmms_eval={{tasks: [shapes_vqa, shapes_yes_no], include_path: {task_folder}}}",
        f"output_dir={tmp_path / 'run'}", f"baseline_cache={tmp_path / 'cache'}", "batch_size=6", *extra])


def test_run_reports_relative_scores_per_task_and_caches_the_unpruned_results(tmp_path, task_folder, by_hand, stock,
                                                                            capfd):
    from tokenprune.eval.run import run
    from tokenprune.pipeline import load_pipeline

    overrides = ["stages.0.layer=1", "stages.0.operators.1.keep=0.01"]  # 6 of 576 visual tokens
    metrics = run(_run_config(tmp_path, task_folder, "pipeline=fastv", f"overrides=[{','.join(overrides)}]"))
    vqa, yes_no = metrics["per_task"]["shapes_vqa"], metrics["per_task"]["shapes_yes_no"]
    assert (vqa["metric"], yes_no["metric"]) == ("accuracy", "acc")
    assert vqa["unpruned"] == pytest.approx(by_hand["accuracy"]) and yes_no["unpruned"] == pytest.approx(by_hand["acc"])
    pruned = hand_scores(*stock, load_pipeline("fastv", overrides))
    assert (vqa["pruned"], yes_no["pruned"]) == pytest.approx((pruned["accuracy"], pruned["acc"]))
    assert (pruned["accuracy"], pruned["acc"]) != (by_hand["accuracy"], by_hand["acc"]), \
        "the pipeline changed no score: the check above is void"
    expected = [r["pruned"] / r["unpruned"] * 100 for r in (vqa, yes_no)]
    assert [vqa["relative"], yes_no["relative"]] == pytest.approx(expected)
    assert metrics["relative_score"] == pytest.approx(sum(expected) / 2)
    assert not metrics["baseline_cached"]
    written = json.loads((Path(metrics["output_dir"]) / "metrics.json").read_text())
    assert written["per_task"] == metrics["per_task"]
    phases = [line for line in capfd.readouterr().err.splitlines() if ": lmms-eval " in line]
    assert phases == ["baseline (unpruned): lmms-eval shapes_vqa, shapes_yes_no", "fastv: lmms-eval shapes_vqa, shapes_yes_no"]
    again = run(_run_config(tmp_path, task_folder, "pipeline=none", f"output_dir={tmp_path / 'unpruned'}"))
    assert again["baseline_cached"] and again["relative_score"] == pytest.approx(100.0)
    assert ": lmms-eval " not in capfd.readouterr().err  # the cached baseline is not evaluated again


@pytest.mark.parametrize("spec, key", [
    ("[]", "data.lmms_eval.tasks"),
    ("{tasks: [shapes_vqa], colour: red}", "data.lmms_eval.colour"),
    ("{tasks: [no_such_task_anywhere], include_path: TASKS}", "data.lmms_eval.tasks"),
    ("{tasks: [shapes_vqa], include_path: /no/such/folder}", "data.lmms_eval.include_path"),
    ("{tasks: [shapes_vqa], include_path: TASKS, metrics: {gqa: exact_match}}", "data.lmms_eval.metrics.gqa"),
])
def test_bad_lmms_eval_data_names_the_key_before_loading_a_model(tmp_path, task_folder, spec, key, monkeypatch):
    from tokenprune.eval import models as run_models
    from tokenprune.eval.run import run
    from tokenprune.eval.run_config import load_run_config

    monkeypatch.setattr(run_models, "open_model", lambda cfg: pytest.fail("loaded a model"))
    cfg = load_run_config(None, [f"data.lmms_eval={spec.replace('TASKS', str(task_folder))}",
                                 f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError) as e:
        run(cfg)
    assert str(e.value).startswith(key), str(e.value)
