"""The correctness oracles of DESIGN.md for LLaVA, against the independent masked reference."""

import pytest
import torch
from reference import (
    fastv_reference_kept,
    generate_positions,
    reference_greedy,
    reference_prefill_logits,
)

import tokenprune as tp

STEPS = 4


def fastv(keep=0.5, layer=2, compact=False):
    ops = [{"op": "attention", "queries": "last"}, {"op": "topk", "keep": keep}]
    if compact:
        ops.append({"op": "kv_compact"})
    return tp.load_pipeline({"name": "fastv", "stages": [{"layer": layer, "operators": ops}]})


def padded_kept(kept: list[list[int]], attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, K) rows of the pruned logits: left padding (kept, non-visual) then the kept valid tokens."""
    rows = []
    for b, row in enumerate(kept):
        pads = (attention_mask[b] == 0).nonzero().flatten().tolist()
        rows.append(pads + row)
    return torch.tensor(rows)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_keep_everything_is_identical(llava_pair, batch, impl):
    """Oracle 1: a pipeline that keeps every token changes neither logits nor generations."""
    model = llava_pair[impl]
    pipe = fastv(keep=1.0)
    with torch.no_grad():
        ref_logits = model(**batch).logits
        ref_gen = model.generate(**batch, max_new_tokens=STEPS, do_sample=False)
        with pipe.attach(model):
            logits = model(**batch).logits
            gen = model.generate(**batch, max_new_tokens=STEPS, do_sample=False)
    assert pipe.trace and pipe.trace[0].visual_after == pipe.trace[0].visual_before
    real = batch["attention_mask"].bool()  # padding leaves at the stage: its rows hold fillers, not padding
    assert torch.equal(logits[real], ref_logits[real])
    assert torch.equal(gen, ref_gen)


def test_fastv_choice_matches_eager_attention_weights(llava_pair, batch):
    """The recomputed last-token attention picks the same tokens as the eager model's own attention map."""
    pipe = fastv(keep=0.5)
    with torch.no_grad(), pipe.attach(llava_pair["sdpa"]):
        llava_pair["sdpa"](**batch)
    expected = fastv_reference_kept(llava_pair["eager"], batch, site=2, keep=32)
    assert [t for t in pipe.trace[0].kept] == expected
    assert pipe.trace[0].visual_after == [32, 32]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("layer,keep", [(2, 0.5), (1, 10), (3, 0.25)])
def test_drop_only_prefill_equals_masked_reference(llava_pair, batch, impl, layer, keep):
    """Oracle 2 (prefill): kept-token logits equal the full eager model with pruned keys masked at layers >= L."""
    model = llava_pair[impl]
    pipe = fastv(keep=keep, layer=layer)
    with torch.no_grad(), pipe.attach(model):
        logits = model(**batch).logits.float()
    kept = pipe.trace[0].kept
    ref = reference_prefill_logits(llava_pair["eager"], batch, layer, kept)
    rows = padded_kept(kept, batch["attention_mask"])
    assert logits.shape[1] == rows.shape[1] < batch["input_ids"].shape[1]
    valid = batch["attention_mask"].gather(1, rows).bool()
    got = logits[valid]
    want = ref.gather(1, rows[..., None].expand(-1, -1, ref.shape[-1]))[valid]
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("compact", [False, True])
def test_generation_equals_masked_reference(llava_pair, batch, impl, compact):
    """Oracle 2 (decoding): stock generate() with FastV attached equals the masked reference step by step,
    with a left-padded batch; with kv_compact the earlier layers lose the pruned keys while decoding."""
    model = llava_pair[impl]
    pipe = fastv(keep=0.5, compact=compact)
    with torch.no_grad(), pipe.attach(model):
        out = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    kept = pipe.trace[0].kept
    tokens, ref_logits = reference_greedy(llava_pair["eager"], batch, 2, kept, STEPS, compact_earlier=compact)
    assert torch.equal(out.sequences[:, -STEPS:], tokens)
    for step, (got, want) in enumerate(zip(out.logits, ref_logits)):
        assert torch.allclose(got.float(), want, atol=1e-4), (step, (got - want).abs().max())


def test_kv_compact_shrinks_every_layers_cache(llava_pair, batch):
    """Layers >= L cache only kept tokens; kv_compact trims the layers before L too."""
    model = llava_pair["sdpa"]
    n = batch["input_ids"].shape[1]
    for compact, early_len in [(False, n), (True, n - 32)]:
        pipe = fastv(keep=0.5, compact=compact)
        with torch.no_grad(), pipe.attach(model):
            out = model(**batch, use_cache=True)
        lengths = [layer.keys.shape[-2] for layer in out.past_key_values.layers]
        assert lengths == [early_len, early_len, n - 32, n - 32]


def test_sdpa_and_eager_agree(llava_pair, batch):
    """Oracle 4: SDPA and eager pick the same tokens and produce the same outputs."""
    results = {}
    for impl in ("sdpa", "eager"):
        pipe = fastv(keep=0.25)
        with torch.no_grad(), pipe.attach(llava_pair[impl]):
            logits = llava_pair[impl](**batch).logits
            gen = llava_pair[impl].generate(**batch, max_new_tokens=STEPS, do_sample=False)
        rows = padded_kept(pipe.trace[0].kept, batch["attention_mask"])
        valid = batch["attention_mask"].gather(1, rows).bool()  # padding rows are undefined in both
        results[impl] = (pipe.trace[0].kept, logits[valid], gen)
    assert results["sdpa"][0] == results["eager"][0]
    assert torch.allclose(results["sdpa"][1], results["eager"][1], atol=1e-4)
    assert torch.equal(results["sdpa"][2], results["eager"][2])


def test_batch_equals_each_sample_alone(llava_pair, batch):
    """A left-padded batch under generate() gives each sample the tokens and generation it gets alone."""
    model = llava_pair["sdpa"]
    pipe = fastv(keep=0.5)
    with torch.no_grad(), pipe.attach(model):
        together = model.generate(**batch, max_new_tokens=STEPS, do_sample=False)[:, -STEPS:]
        kept_together = pipe.trace[0].kept
        for b in range(2):
            valid = batch["attention_mask"][b].bool()
            alone = {"input_ids": batch["input_ids"][b:b + 1, valid], "attention_mask": batch["attention_mask"][b:b + 1, valid],
                     "pixel_values": batch["pixel_values"][b:b + 1]}
            gen = model.generate(**alone, max_new_tokens=STEPS, do_sample=False)[:, -STEPS:]
            offset = int((~valid).sum())
            assert [i + offset for i in pipe.trace[0].kept[0]] == kept_together[b]
            assert torch.equal(gen[0], together[b])


def test_positions_of_kept_tokens_are_original(llava_pair, batch):
    """Kept tokens keep their original position ids (not renumbered)."""
    model = llava_pair["sdpa"]
    seen = {}

    def spy(module, args, kwargs):
        seen["pos"] = kwargs["position_ids"].clone()

    pipe = fastv(keep=0.5)
    with torch.no_grad(), pipe.attach(model):
        # registered after attach's hooks, so it sees what layer 3 receives
        handle = model.model.language_model.layers[3].register_forward_pre_hook(spy, with_kwargs=True)
        try:
            model(**batch, position_ids=generate_positions(batch["attention_mask"]))
        finally:
            handle.remove()
    full = generate_positions(batch["attention_mask"])
    rows = padded_kept(pipe.trace[0].kept, batch["attention_mask"])
    assert torch.equal(seen["pos"], full.gather(1, rows))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_pruning_before_the_llm_equals_masked_reference(llava_pair, batch, impl):
    """Oracle 2 at layer 0 (before the LLM; every layer caches only kept tokens), prefill and decoding."""
    model = llava_pair[impl]
    pipe = tp.load_pipeline({"stages": [{"layer": 0, "operators": [{"op": "random", "seed": 1}, {"op": "topk", "keep": 0.25}]}]})
    with torch.no_grad(), pipe.attach(model):
        out = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        cache = model(**batch, use_cache=True).past_key_values
    kept = pipe.trace[0].kept
    assert pipe.trace[0].visual_after == [16, 16]
    assert {layer.keys.shape[-2] for layer in cache.layers} == {batch["input_ids"].shape[1] - 48}
    tokens, ref_logits = reference_greedy(llava_pair["eager"], batch, 0, kept, STEPS)
    assert torch.equal(out.sequences[:, -STEPS:], tokens)
    for got, want in zip(out.logits, ref_logits):
        assert torch.allclose(got.float(), want, atol=1e-4)
