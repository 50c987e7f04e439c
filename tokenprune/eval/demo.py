"""``make demo``: the FastV preset on a tiny LLaVA built from config, with a table of what it did."""

from __future__ import annotations

import time

import torch

from tokenprune.adapters import get_adapter
from tokenprune.measure.flops import LLMShape, pipeline_flops
from tokenprune.pipeline import load_pipeline
from tokenprune.reference.tiny import tiny_llava, tiny_llava_inputs


def run_demo(pipeline: str = "fastv", overrides: tuple[str, ...] = (), new_tokens: int = 8) -> str:
    """Run ``pipeline`` and the unpruned model on the same batch; return the printed table."""
    model = tiny_llava("sdpa", layers=8)
    inputs = tiny_llava_inputs(model)
    pipe = load_pipeline(pipeline, overrides)
    gen = {"max_new_tokens": new_tokens, "do_sample": False}
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)  # warm-up: the first call pays one-off costs
        t0 = time.perf_counter()
        base_logits = model(**inputs).logits[:, -1]
        base_tokens = model.generate(**inputs, **gen)[:, -new_tokens:]
        t1 = time.perf_counter()
        with pipe.attach(model):
            logits = model(**inputs).logits[:, -1]
            trace = list(pipe.trace)
            tokens = model.generate(**inputs, **gen)[:, -new_tokens:]
        t2 = time.perf_counter()
    valid = inputs["attention_mask"].sum(1).tolist()
    visual = get_adapter(model).visual_token_counts(inputs)
    shape = LLMShape.from_config(model.config.text_config, name="tiny")
    lines = [f"tokenprune demo: pipeline {pipe.name!r} on a tiny random-init LLaVA "
             f"({shape.layers} layers, SDPA), batch of {len(valid)} left-padded prompts", ""]
    lines.append(f"{'stage':>5} {'layer':>5}  {'visual tokens per sample':<26} {'tokens per sample':<22}")
    for t in trace:
        lines.append(f"{t.stage:>5} {t.layer:>5}  {_arrow(t.visual_before, t.visual_after):<26} "
                     f"{_arrow(t.tokens_before, t.tokens_after):<22}")
    lines.append("")
    for conv in ("fastv", "exact"):
        reports = [pipeline_flops(pipe, shape, n, v, conv) for n, v in zip(valid, visual)]
        red = sum(r.reduction for r in reports) / len(reports)
        eq = sum(r.equivalent_visual_tokens for r in reports) / len(reports)
        lines.append(f"LLM prefill FLOPs reduction ({conv} convention): {red:6.1%}   "
                     f"layer-averaged visual tokens: {eq:.1f}")
    diff = (logits - base_logits).abs().max().item()
    same = (tokens == base_tokens).all(dim=1).sum().item()
    lines.append(f"last-token logits, max |pruned - unpruned|: {diff:.4f}")
    lines.append(f"greedy {new_tokens}-token generations identical to unpruned: {same}/{len(valid)} "
                 "(a random-init model; accuracy needs a trained one)")
    lines.append(f"time (one forward + one generate each, after a warm-up): unpruned {t1 - t0:.2f}s, "
                 f"pruned {t2 - t1:.2f}s")
    return "\n".join(lines)


def _arrow(before: list[int], after: list[int]) -> str:
    return f"{before} -> {after}"
