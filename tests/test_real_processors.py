"""Every family end to end through its real processor: a tiny saved model of LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL,
Qwen2.5-VL, Qwen3-VL, Qwen3.5, InternVL, Gemma 3 and Mllama with the family's processor class (its image processor, a tokenizer with its special tokens and chat
template), run by `tokenprune run` and by the lmms-eval model. Each answer is checked against stock `generate()`
(and each log-likelihood against a stock forward) on the same item alone, with the prompt written out by hand in
the family's chat format, never against tokenprune's own batched output."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import families

import tokenprune as tp
from tokenprune.adapters import get_adapter
from tokenprune.eval.models import load_processor
from tokenprune.eval.run import run
from tokenprune.eval.run_config import load_run_config
from tokenprune.reference import shapes
from tokenprune.reference.processors import FAMILIES, save_tiny

QUIET = ["logging.wandb.mode=disabled", "logging.progress_bar=false"]
LIMIT = 4

#: the family's chat format, written out (not through the chat template)
PROMPTS = {
    "llava_next": "USER: <image>\n{q} ASSISTANT:",
    "llava_onevision": "<|im_start|>user <image>\n{q}<|im_end|>\n<|im_start|>assistant\n",
    "internvl": "<|im_start|>user\n<IMG_CONTEXT>\n{q}<|im_end|>\n<|im_start|>assistant\n",
    "gemma3": "<bos><start_of_turn>user\n<start_of_image>{q}<end_of_turn>\n<start_of_turn>model\n",
    "qwen2_vl": "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{q}<|im_end|>\n<|im_start|>assistant\n",
    "mllama": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>{q}<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
}
PROMPTS["qwen2_5_vl"] = PROMPTS["qwen3_vl"] = PROMPTS["qwen3_5"] = PROMPTS["qwen2_vl"]

#: a pipeline that acts on each family (Mllama's images enter through cross-attention: trim its features),
#: harsh enough to change answers of a random model
PIPELINES = {"llava_next": ("fastv", ["stages.0.operators.1.keep=0.05"]),
             "llava_onevision": ("fastv", ["stages.0.operators.1.keep=0.05"]),
             "internvl": ("fastv", ["stages.0.operators.1.keep=0.05"]),
             "gemma3": ("fastv", ["stages.0.operators.1.keep=0.05"]),
             "qwen2_vl": ("fastv", ["stages.0.operators.1.keep=0.05"]),
             "qwen2_5_vl": ("fastv", ["stages.0.operators.1.keep=0.05"]),
             "qwen3_vl": ("fastv", ["stages.0.operators.1.keep=0.05"]),
             # FastV reads the layer before its site: on Qwen3.5 an attention layer is 3, 7, ...
             "qwen3_5": ("fastv", ["stages.0.layer=4", "stages.0.operators.1.keep=0.05"]),
             "mllama": ("trimmed_llama", ["stages.0.operators.0.keep=0.05"])}

#: what the family's processor must hand the model (the inputs its adapter reads)
INPUTS = {"llava_next": {"pixel_values", "image_sizes"},
          "llava_onevision": {"pixel_values", "image_sizes", "batch_num_images"},
          "internvl": {"pixel_values"},
          "gemma3": {"pixel_values", "token_type_ids"},
          "qwen2_vl": {"pixel_values", "image_grid_thw", "mm_token_type_ids"},
          "qwen2_5_vl": {"pixel_values", "image_grid_thw", "mm_token_type_ids"},
          "qwen3_vl": {"pixel_values", "image_grid_thw", "mm_token_type_ids"},
          "qwen3_5": {"pixel_values", "image_grid_thw", "mm_token_type_ids"},
          "mllama": {"pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask"}}


@pytest.fixture(scope="module", params=families(*FAMILIES))
def saved(request, tmp_path_factory):
    """(family, folder, stock model, processor): the tiny model saved with its processor, loaded back through the
    Auto classes."""
    from transformers import AutoModelForImageTextToText

    family = request.param
    folder = save_tiny(family, tmp_path_factory.mktemp(family), seed=1)
    with warnings.catch_warnings(action="ignore"):  # the no-torchvision warning, tested on its own below
        processor = load_processor(str(folder), True)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    return family, folder, model, processor


def by_hand(family, model, processor, item, pipeline=None, new_tokens=3):
    """Stock greedy generate() on one item alone, the prompt in the family's format written out by hand."""
    import contextlib

    enc = processor(images=[[item["image"]]], text=[PROMPTS[family].format(q=item["question"])], return_tensors="pt")
    with torch.no_grad(), (pipeline.attach(model) if pipeline is not None else contextlib.nullcontext()):
        out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False)
    return processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip(), enc


def test_the_processor_gives_the_family_inputs_and_the_template_the_written_prompt(saved):
    family, _, model, processor = saved
    item = shapes.load_split("test", size=1)[0]
    from tokenprune.eval.models import build_prompt

    assert build_prompt(processor, item["question"]) == PROMPTS[family].format(q=item["question"])
    _, enc = by_hand(family, model, processor, item)
    assert INPUTS[family] <= set(enc)
    ids = enc["input_ids"][0]
    image_id = model.config.image_token_id if family != "mllama" else model.config.image_token_index
    counted = get_adapter(model).visual_token_counts(enc)[0]
    if family == "mllama":  # one <|image|> token; the tiles' features enter through cross-attention
        assert int((ids == image_id).sum()) == 1
    else:  # one placeholder per visual token the model's vision tower gives
        assert int((ids == image_id).sum()) == counted > 0


def test_tokenprune_run_answers_as_stock_generate_on_each_item(saved, tmp_path):
    family, folder, model, processor = saved
    name, overrides = PIPELINES[family]
    metrics = run(load_run_config("experiments/asap_shapes.yaml", [
        f"model.path={folder}", f"data.limit={LIMIT}", "batch_size=2", f"pipeline={name}",
        f"overrides=[{', '.join(overrides)}]", f"output_dir={tmp_path / 'run'}", "baseline_cache=null", *QUIET]))
    assert metrics["n"] == LIMIT
    rows = {r["id"]: r for r in map(json.loads, (tmp_path / "run" / "predictions.jsonl").read_text().splitlines())}
    pipeline = tp.load_pipeline(name, overrides)
    changed = 0
    for i, item in enumerate(shapes.load_split("test", size=LIMIT)):
        plain, _ = by_hand(family, model, processor, item)
        pruned, _ = by_hand(family, model, processor, item, pipeline)
        assert rows[f"shapes-test-{i}"]["baseline_prediction"] == plain
        assert rows[f"shapes-test-{i}"]["prediction"] == pruned
        changed += pruned != plain
    assert changed, f"keeping 5% of the visual tokens changed no answer of the random {family} model"


def test_the_lmms_eval_model_generates_and_scores_as_the_stock_model(saved, tmp_path):
    pytest.importorskip("lmms_eval", reason="lmms-eval is installed by `make install` (--no-deps)")
    from lmms_eval.tasks import TaskManager, get_task_dict

    from tokenprune.eval.lmms_eval_model import TokenPrune
    from tokenprune.eval.lmms_tasks import write_shapes_task

    family, folder, model, processor = saved
    tasks = write_shapes_task(tmp_path / "tasks", "test", LIMIT * 3)
    name, overrides = PIPELINES[family]
    with warnings.catch_warnings(action="ignore"):  # the no-torchvision warning, tested on its own below
        lm = TokenPrune.create_from_arg_string(f"pretrained={folder},pipeline={name},overrides={';'.join(overrides)}",
                                               {"batch_size": 2})
    pipeline = tp.load_pipeline(name, overrides)
    for kind in ("shapes_vqa", "shapes_yes_no"):
        task = get_task_dict([kind], TaskManager("WARNING", include_path=str(tasks)))[kind]
        task.build_all_requests(limit=LIMIT, rank=0, world_size=1)
        lm.task_dict = {kind: task.dataset}
        if kind == "shapes_vqa":
            for inst, text in zip(task.instances, lm.generate_until(task.instances)):
                item = task.dataset[inst.args[5]][inst.args[3]]
                want, _ = by_hand(family, model, processor, {**item, "question": inst.args[0]}, pipeline,
                                  new_tokens=int(inst.args[1].get("max_new_tokens") or lm.max_new_tokens))
                assert text == want
            continue
        for inst, (loss, greedy) in zip(task.instances, lm.loglikelihood(task.instances)):
            item = task.dataset[inst.args[5]][inst.args[3]]
            prompt = PROMPTS[family].format(q=inst.args[0])
            context = processor(images=[[item["image"]]], text=[prompt], return_tensors="pt")
            full = processor(images=[[item["image"]]], text=[prompt + inst.args[1]], return_tensors="pt")["input_ids"][0]
            start = context["input_ids"].shape[1]  # the continuation's tokens: one word's, or its letters
            targets = full[start:].tolist()
            assert targets and torch.equal(full[:start], context["input_ids"][0])
            # pruned in the prefill of the context alone, the continuation then decoded token by token (stock
            # generate(), forced to it); the loss is the mean negative log-likelihood of its tokens
            with torch.no_grad(), pipeline.attach(model):
                out = model.generate(**context, max_new_tokens=len(targets), do_sample=False, output_logits=True,
                                     return_dict_in_generate=True,
                                     prefix_allowed_tokens_fn=lambda b, ids, t=targets, s=start: [t[ids.shape[0] - s]])
            logits = torch.cat(out.logits).float()  # (tokens, V), the raw logits
            want = -float(torch.log_softmax(logits, -1)[torch.arange(len(targets)), targets].mean())
            assert loss == pytest.approx(want, abs=1e-4)
            assert greedy == (logits.argmax(-1).tolist() == targets)


def test_without_torchvision_the_qwen_processors_load_for_images_with_a_warning(tmp_path, monkeypatch):
    """transformers cannot build Qwen2-VL's processor without torchvision (its video processor needs it): the
    loader falls back to the same class without a video processor and says so."""
    import transformers

    from tokenprune.eval import models
    from tokenprune.reference import processors

    monkeypatch.setattr(processors, "has_torchvision", lambda: False)
    monkeypatch.setattr(models, "has_torchvision", lambda: False)
    folder = save_tiny("qwen2_5_vl", tmp_path / "q")
    with pytest.warns(UserWarning, match="torchvision is not installed: Qwen2_5_VLProcessor of .* without its video "
                                         "processor"):
        processor = models.load_processor(str(folder), True)
    assert isinstance(processor, transformers.Qwen2_5_VLProcessor) and not hasattr(processor, "video_processor")
    assert json.loads((folder / "processor_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"
