"""Batches whose samples keep different numbers of tokens (adaptive budgets, per-sample visual counts)."""

import pytest
import torch
from families import pair, sample_alone
from reference import reference_greedy

import tokenprune as tp
from tokenprune.adapters import get_adapter
from tokenprune.core.masks import mask_key_columns, ragged_keep_index
from tokenprune.reference import tiny

STEPS = 4


def test_ragged_keep_index_left_fills_short_rows():
    keep = torch.tensor([[1, 0, 1, 1, 0],
                         [0, 1, 0, 0, 0],
                         [1, 1, 1, 0, 0]], dtype=torch.bool)
    index, live = ragged_keep_index(keep)
    assert index.tolist() == [[0, 2, 3], [1, 1, 1], [0, 1, 2]]
    assert live.tolist() == [[True, True, True], [False, False, True], [True, True, True]]
    index, live = ragged_keep_index(torch.tensor([[True, False, True]]))
    assert index.tolist() == [[0, 2]] and live is None


def test_mask_key_columns_bool_additive_and_2d():
    live = torch.tensor([[False, True]])
    boolean = torch.ones(1, 1, 2, 3, dtype=torch.bool)
    assert mask_key_columns(boolean, live)[0, 0].tolist() == [[False, True, True]] * 2
    additive = torch.zeros(1, 1, 1, 3)
    out = mask_key_columns(additive, live)[0, 0, 0]
    assert out[0] == torch.finfo(torch.float32).min and out[1:].tolist() == [0.0, 0.0]
    assert mask_key_columns(torch.ones(1, 3, dtype=torch.long), live).tolist() == [[0, 1, 1]]


def adaptive(threshold=0.7, layer=2):
    return tp.load_pipeline({"name": "zipvl-like", "stages": [{"layer": layer, "operators": [
        {"op": "attention", "queries": "last"}, {"op": "cumulative_mass", "threshold": threshold}]}]})


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_different_kept_counts_equal_masked_reference(llava_pair, batch, impl):
    """Oracle 2 with a per-sample budget: samples keep different counts; generate() equals the reference."""
    model = llava_pair[impl]
    pipe = adaptive()
    with torch.no_grad(), pipe.attach(model):
        out = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    counts = pipe.trace[0].visual_after
    assert counts[0] != counts[1], counts  # the case under test
    kept = pipe.trace[0].kept
    tokens, ref_logits = reference_greedy(llava_pair["eager"], batch, 2, kept, STEPS)
    assert torch.equal(out.sequences[:, -STEPS:], tokens)
    for got, want in zip(out.logits, ref_logits):
        assert torch.allclose(got.float(), want, atol=1e-4)


@pytest.mark.parametrize("stages", [
    [{"layer": 2, "operators": [{"op": "attention"}, {"op": "cumulative_mass", "threshold": 0.7}]}],
    [{"layer": 1, "operators": [{"op": "attention"}, {"op": "cumulative_mass", "threshold": 0.7}]},
     {"layer": 3, "operators": [{"op": "attention"}, {"op": "cumulative_mass", "threshold": 0.5},
                                {"op": "kv_compact"}]}],
    [{"layer": 2, "positions": "renumber",
      "operators": [{"op": "attention"}, {"op": "cumulative_mass", "threshold": 0.8}]}],
])
def test_ragged_batch_equals_each_sample_alone(llava_pair, batch, stages):
    """Oracle 3: each sample of a ragged batch gets what it gets alone (kept tokens, generation),
    also over two stages with KV compaction and with renumbered positions."""
    model = llava_pair["sdpa"]
    pipe = tp.load_pipeline({"stages": stages})
    with torch.no_grad(), pipe.attach(model):
        together = model.generate(**batch, max_new_tokens=STEPS, do_sample=False)[:, -STEPS:]
        traces = pipe.trace
        assert any(t.visual_after[0] != t.visual_after[1] for t in traces)
        for b in range(2):
            valid = batch["attention_mask"][b].bool()
            alone = {"input_ids": batch["input_ids"][b:b + 1, valid],
                     "attention_mask": batch["attention_mask"][b:b + 1, valid],
                     "pixel_values": batch["pixel_values"][b:b + 1]}
            gen = model.generate(**alone, max_new_tokens=STEPS, do_sample=False)[:, -STEPS:]
            offset = int((~valid).sum())
            for t_alone, t_together in zip(pipe.trace, traces):
                assert [i + offset for i in t_alone.kept[0]] == t_together.kept[b]
            assert torch.equal(gen[0], together[b])


def test_padding_leaves_the_batch_at_the_first_stage():
    """Left padding is not a kept token: after the site the batch carries as many slots as the most real tokens
    any sample keeps, in the layers after the site and in their caches. Qwen2-VL, a large image with a short
    question (108 tokens, 100 visual) beside a small image with a long one (48 tokens, 4 visual: 60 padding);
    FastV keeps 4 visual tokens each, so by hand the samples keep 108 - 100 + 4 = 12 and 48 - 4 + 4 = 48 real
    tokens, and 48 slots flow on (108 if padding were kept). Each sample's logits and generation equal it alone."""
    model = pair("qwen2_vl")["sdpa"]
    batch = tiny.tiny_qwen2_vl_inputs(model, grids=[(20, 20), (4, 4)], prompts=[[10, 11, 12, 13], list(range(10, 50))])
    assert batch["attention_mask"].sum(1).tolist() == [108, 48] and batch["input_ids"].shape[1] == 108
    pipe = tp.load_pipeline("fastv", ["stages.0.operators.1.keep=4"])
    entering = {}
    layers = get_adapter(model).layers
    with torch.no_grad(), pipe.attach(model):  # hooks after the pipeline's: each layer's input as it runs
        handles = [layers[i].register_forward_pre_hook(
            lambda m, a, kw, i=i: entering.__setitem__(i, (a[0] if a else kw["hidden_states"]).shape[1]),
            with_kwargs=True) for i in range(4)]
        try:
            out = model(**batch, use_cache=True)
        finally:
            for h in handles:
                h.remove()
    assert pipe.trace[0].layer == 2 and pipe.trace[0].tokens_after == [12, 48]
    assert entering == {0: 108, 1: 108, 2: 48, 3: 48}
    assert [layer.keys.shape[-2] for layer in out.past_key_values.layers] == [108, 108, 48, 48]
    with torch.no_grad(), pipe.attach(model):
        gen = model.generate(**batch, max_new_tokens=STEPS, do_sample=False)
    for b in range(2):
        one = sample_alone("qwen2_vl", batch, b)
        with torch.no_grad(), pipe.attach(model):
            alone = model(**one).logits[0, -1]
            gen_alone = model.generate(**one, max_new_tokens=STEPS, do_sample=False)
        assert torch.allclose(out.logits[b, -1], alone, atol=1e-4), b
        assert torch.equal(gen[b, -STEPS:], gen_alone[0, -STEPS:]), b
