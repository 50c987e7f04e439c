"""attach(): hooks only, removed on exit and on exceptions, visible when nothing was pruned."""

import pytest
import torch

import tokenprune as tp
from tokenprune.reference.tiny import tiny_llava_inputs


def hook_count(model):
    # transformers installs its own output-capturing hooks on a model's first forward: count after one.
    with torch.no_grad():
        model(**tiny_llava_inputs(model))
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_state_dict_unchanged_and_hooks_removed(llava_pair, batch):
    model = llava_pair["sdpa"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = hook_count(model)
    pipe = tp.load_pipeline("fastv")
    with torch.no_grad(), pipe.attach(model):
        assert sum(len(m._forward_pre_hooks) for m in model.modules()) > 0
        assert list(model.state_dict()) == list(before)
        model(**batch)
    assert hook_count(model) == hooks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert model(**batch).logits.shape[1] == batch["input_ids"].shape[1]  # unpruned again


def test_hooks_removed_on_exception(llava_pair, batch):
    model = llava_pair["sdpa"]
    hooks = hook_count(model)
    pipe = tp.load_pipeline("fastv")
    with pytest.raises(ValueError, match="boom"), pipe.attach(model):
        raise ValueError("boom")
    assert hook_count(model) == hooks
    bad = {**batch, "attention_mask": batch["attention_mask"][:, :5]}
    with pytest.raises((RuntimeError, IndexError, ValueError)), torch.no_grad(), pipe.attach(model):
        model(**bad)
    assert hook_count(model) == hooks


def test_trace_indexes_the_input_sequence(llava_pair, batch):
    model = llava_pair["sdpa"]
    pipe = tp.load_pipeline("fastv", ["stages.0.operators.1.keep=8"])
    with torch.no_grad(), pipe.attach(model):
        model(**batch)
    (t,) = pipe.trace
    assert t.visual_before == [64, 64] and t.visual_after == [8, 8]
    assert t.tokens_before == batch["attention_mask"].sum(1).tolist()
    for b, kept in enumerate(t.kept):
        ids = batch["input_ids"][b, kept]
        assert int((ids == model.config.image_token_id).sum()) == 8
        assert kept == sorted(kept) and all(batch["attention_mask"][b, kept] == 1)
    assert "[64, 64] -> [8, 8]" in pipe.report()


def test_warns_when_nothing_was_pruned(llava_pair):
    model = llava_pair["sdpa"]
    pipe = tp.load_pipeline("fastv")
    text_only = {"input_ids": torch.tensor([[1, 5, 6, 7]])}
    with pytest.warns(RuntimeWarning, match="never pruned"), torch.no_grad(), pipe.attach(model):
        model(**text_only)


def test_time_operators_splits_the_stage_time_by_operator(llava_pair, batch):
    """Off by default; on, each operator of the stage has its own entry, in order, within the stage's time."""
    model = llava_pair["sdpa"]
    pipe = tp.load_pipeline("asap", ["stages.0.operators.3.keep=8"])
    with torch.no_grad(), pipe.attach(model):
        model(**batch)
    assert pipe.trace[0].operator_ms_by_op == {}
    pipe.time_operators = True
    with torch.no_grad(), pipe.attach(model):
        model(**batch)
    (t,) = pipe.trace
    assert list(t.operator_ms_by_op) == ["0:bidirectional_soft_mask", "1:attention", "2:attention", "3:topk",
                                         "4:weighted_soft_merge"]
    assert all(ms >= 0 for ms in t.operator_ms_by_op.values())
    assert sum(t.operator_ms_by_op.values()) <= t.operator_ms
