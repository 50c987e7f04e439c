"""DESIGN.md's oracles 1-4 for every decoder-only family (LLaVA-1.5, Qwen2-VL, Qwen2.5-VL, LLaVA-NeXT,
LLaVA-OneVision, InternVL, Qwen3-VL, Gemma 3), against the independent masked eager reference of ``reference.py``."""

import pytest
import torch
from families import assert_sdpa_matches_eager, inputs, pair, sample_alone
from reference import fastv_reference_kept, reference_greedy, reference_prefill_logits

import tokenprune as tp
from tokenprune.core.errors import ConfigError

STEPS = 3
FAMILIES = ["llava_next", "qwen2_vl", "qwen2_5_vl", "llava_next_sliding", "qwen2_vl_sliding", "llava_onevision", "internvl", "qwen3_vl",
            "qwen3_vl_moe", "gemma3"]


def attention_topk(keep=0.5, layer=2, compact=False, scorer=None):
    ops = [scorer or {"op": "attention", "queries": "last"}, {"op": "topk", "keep": keep}]
    if compact:
        ops.append({"op": "kv_compact"})
    return tp.load_pipeline({"stages": [{"layer": layer, "operators": ops}]})


def generate(model, batch, **kw):
    return model.generate(**batch, max_new_tokens=STEPS, do_sample=False, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_everything_is_identical(family):
    """Oracle 1."""
    model, batch = pair(family)["sdpa"], inputs(family)
    pipe = attention_topk(keep=1.0)
    with torch.no_grad():
        ref_logits, ref_gen = model(**batch).logits, generate(model, batch)
        with pipe.attach(model):
            logits, gen = model(**batch).logits, generate(model, batch)
    assert pipe.trace[0].visual_after == pipe.trace[0].visual_before
    real = batch["attention_mask"].bool()  # padding leaves at the stage: its rows hold fillers, not padding
    assert torch.equal(logits[real], ref_logits[real])
    assert torch.equal(gen, ref_gen)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("layer,keep", [(2, 0.5), (0, 0.25)])
def test_drop_only_prefill_equals_masked_reference(family, impl, layer, keep):
    """Oracle 2 (prefill), at a layer inside the LLM and before it."""
    model, batch = pair(family)[impl], inputs(family)
    scorer = {"op": "random", "seed": 3} if layer == 0 else None
    pipe = attention_topk(keep=keep, layer=layer, scorer=scorer)
    with torch.no_grad(), pipe.attach(model):
        logits = model(**batch).logits.float()
    kept = pipe.trace[0].kept
    ref = reference_prefill_logits(pair(family)["eager"], batch, layer, kept)
    assert logits.shape[1] == max(len(k) for k in kept)  # the most real tokens a sample keeps: no padding slot
    for b in range(len(kept)):
        got = logits[b, -len(kept[b]):]  # a sample's kept tokens are its last rows
        want = ref[b, torch.tensor(kept[b])]
        assert torch.allclose(got, want, atol=1e-4), (b, (got - want).abs().max())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("layer,compact", [(2, False), (2, True), (0, False)])
def test_generation_equals_masked_reference(family, impl, layer, compact):
    """Oracle 2 (decoding through stock generate())."""
    model, batch = pair(family)[impl], inputs(family)
    scorer = {"op": "random", "seed": 3} if layer == 0 else None
    pipe = attention_topk(keep=0.5, layer=layer, compact=compact, scorer=scorer)
    with torch.no_grad(), pipe.attach(model):
        out = generate(model, batch, output_logits=True, return_dict_in_generate=True)
    kept = pipe.trace[0].kept
    tokens, ref_logits = reference_greedy(pair(family)["eager"], batch, layer, kept, STEPS, compact_earlier=compact)
    assert torch.equal(out.sequences[:, -STEPS:], tokens)
    for step, (got, want) in enumerate(zip(out.logits, ref_logits)):
        assert torch.allclose(got.float(), want, atol=1e-4), (step, (got - want).abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_with_different_visual_counts_equals_each_sample_alone(family):
    """Oracle 3: a padded batch whose samples hold different numbers of visual tokens."""
    model, batch = pair(family)["sdpa"], inputs(family)
    pipe = attention_topk(keep=0.5)
    with torch.no_grad(), pipe.attach(model):
        together = generate(model, batch)[:, -STEPS:]
        trace = pipe.trace[0]
        assert trace.visual_before[0] != trace.visual_before[1]
        for b in range(2):
            alone = sample_alone(family, batch, b)
            gen = generate(model, alone)[:, -STEPS:]
            offset = int((batch["attention_mask"][b] == 0).sum())
            assert [i + offset for i in pipe.trace[0].kept[0]] == trace.kept[b]
            assert torch.equal(gen[0], together[b])


@pytest.mark.parametrize("family", FAMILIES)
def test_sdpa_and_eager_agree(family):
    """Oracle 4."""
    assert_sdpa_matches_eager(family, inputs(family), lambda: attention_topk(keep=0.25), STEPS)


@pytest.mark.parametrize("family", ["qwen2_vl"])
def test_uniform_grid_uses_each_samples_image_grid(family):
    """Qwen grids differ per sample (4x4 and 3x5 merged tokens): uniform_grid reads each one."""
    model, batch = pair(family)["sdpa"], inputs(family)
    pipe = tp.load_pipeline({"stages": [{"layer": 2, "operators": [{"op": "uniform_grid", "stride": 2}]}]})
    with torch.no_grad(), pipe.attach(model):
        model(**batch)
    # 4x4 with stride 2: rows 0,2 x cols 0,2 = 4; 3x5: rows 0,2 x cols 0,2,4 = 6
    assert pipe.trace[0].visual_after == [4, 6]


def test_llava_next_newlines_can_be_protected():
    """Both tiny images pick the 2x2-tile pinpoint (a 16x16 patch grid) and are unpadded to 16 rows x 10
    columns (100x60) and 10 rows x 16 columns (60x100); every grid row ends in an image_newline token,
    after the 64 tokens of the base tile. Protected, all 16 and 10 newlines survive, and ``keep``
    applies to the other visual tokens of each sample."""
    family = "llava_next"
    model, batch = pair(family)["sdpa"], inputs(family)
    visual = batch["input_ids"] == model.config.image_token_id
    assert visual.sum(1).tolist() == [64 + 16 * 11, 64 + 10 * 17]
    newline_offsets = [[64 + 11 * r + 10 for r in range(16)], [64 + 17 * r + 16 for r in range(10)]]
    for protect, expect in [([], [60, 59]), (["image_newline"], [56 + 16, 56 + 10])]:
        pipe = tp.load_pipeline({"stages": [{"layer": 2, "protect": protect, "operators": [
            {"op": "random", "seed": 0}, {"op": "topk", "keep": 0.25}]}]})
        with torch.no_grad(), pipe.attach(model):
            model(**batch)
        trace = pipe.trace[0]
        assert trace.visual_after == expect  # 0.25 * 224 = 56 (protected) or of 240 / 234 (not)
        if protect:
            for b in range(2):
                first = int(visual[b].nonzero()[0])
                assert {first + o for o in newline_offsets[b]} <= set(trace.kept[b])


def test_protect_names_an_unknown_kind():
    pipe = tp.load_pipeline({"stages": [{"layer": 2, "protect": ["image_newline"], "operators": [
        {"op": "random"}, {"op": "topk", "keep": 0.5}]}]})
    with pytest.raises(ConfigError, match=r"stages\.0\.protect: 'image_newline' is not a token kind of Qwen2-VL"):
        pipe.attach(pair("qwen2_vl")["sdpa"])


@pytest.mark.parametrize("family", FAMILIES)
def test_multi_stage_pipeline_batch_equals_each_sample_alone(family):
    """PyramidDrop-style stages at layers 1 and 3, renumbered (M-RoPE too), each seeing what the earlier left, on
    a batch with different visual counts, with KV compaction."""
    model, batch = pair(family)["sdpa"], inputs(family)
    positions = "renumber"
    pipe = tp.load_pipeline({"stages": [
        {"layer": 1, "positions": positions, "operators": [{"op": "attention"}, {"op": "topk", "keep": 0.5}]},
        {"layer": 3, "positions": positions, "operators": [{"op": "attention"}, {"op": "topk", "keep": 0.5},
                                                           {"op": "kv_compact"}]}]})
    with torch.no_grad(), pipe.attach(model):
        together = generate(model, batch)[:, -STEPS:]
        traces = list(pipe.trace)
        assert [t.visual_before for t in traces][1] == traces[0].visual_after
        for b in range(2):
            gen = generate(model, sample_alone(family, batch, b))[:, -STEPS:]
            offset = int((batch["attention_mask"][b] == 0).sum())
            for alone, both in zip(pipe.trace, traces):
                assert [i + offset for i in alone.kept[0]] == both.kept[b]
            assert torch.equal(gen[0], together[b])


@pytest.mark.parametrize("family", FAMILIES)
def test_per_tile_budgets_keep_all_identical_and_batch_equals_each_sample_alone(family):
    """Oracles 1 and 3 with ``budget: per_tile`` (LLaVA-NeXT: base tile and every anyres crop; Qwen: each image):
    keeping every token changes nothing, and a batch whose samples have different tiles keeps, per sample, what
    the sample keeps alone, and generates the same."""
    model, batch = pair(family)["sdpa"], inputs(family)

    def per_tile(keep):
        return tp.load_pipeline({"stages": [{"layer": 2, "budget": "per_tile", "operators": [
            {"op": "attention"}, {"op": "topk", "keep": keep}]}]})

    with torch.no_grad():
        ref = model(**batch).logits
        real = batch["attention_mask"].bool()  # padding rows hold fillers after a stage
        with per_tile(1.0).attach(model):
            assert torch.equal(model(**batch).logits[real], ref[real])
        pipe = per_tile(0.5)
        with pipe.attach(model):
            together = generate(model, batch)[:, -STEPS:]
            trace = pipe.trace[0]
            assert trace.tiles[0] != trace.tiles[1]
            for b in range(2):
                gen = generate(model, sample_alone(family, batch, b))[:, -STEPS:]
                offset = int((batch["attention_mask"][b] == 0).sum())
                assert pipe.trace[0].tiles[0] == trace.tiles[b]
                assert [i + offset for i in pipe.trace[0].kept[0]] == trace.kept[b]
                assert torch.equal(gen[0], together[b])


@pytest.mark.parametrize("family,keep,expect", [
    ("llava_next", 0.1, [24, 23]),  # round(0.1 * 240) and round(0.1 * 234)
    ("llava_next", 10, [10, 10]),  # a count is per sample too
    ("qwen2_vl", 0.5, [8, 8]),  # 16 and 15 visual tokens: round(8.0), round(7.5) (halves round up)
    ("qwen2_vl", 10, [10, 10]),
])
def test_budgets_are_per_sample(family, keep, expect):
    model, batch = pair(family)["sdpa"], inputs(family)
    pipe = tp.load_pipeline({"stages": [{"layer": 2, "operators": [{"op": "random"}, {"op": "topk", "keep": keep}]}]})
    with torch.no_grad(), pipe.attach(model):
        model(**batch)
    assert pipe.trace[0].visual_after == expect


@pytest.mark.parametrize("family", ["llava", *FAMILIES])
def test_attention_signals_gather_the_layers_own_query_projection(family, monkeypatch):
    """The stage's queries come from the query projection the layer before the site ran in its own forward:
    that projection runs once per forward (the model's call, none by the signals), and ASAP keeps the same
    tokens as when the signals project the queries again themselves (the capture turned off)."""
    from tokenprune.adapters import get_adapter
    from tokenprune.adapters.base import LlamaStyleAdapter

    model, batch = pair(family)["sdpa"], inputs(family)
    calls = []
    handle = get_adapter(model).layers[1].self_attn.q_proj.register_forward_hook(
        lambda m, a, o: calls.append(a[0].shape[1]))
    try:
        captured = tp.load_pipeline("asap")
        with torch.no_grad(), captured.attach(model):
            model(**batch)
        assert calls == [batch["input_ids"].shape[1]]  # the model's own projection of every token, only
        monkeypatch.setattr(LlamaStyleAdapter, "query_projection", lambda self, layer: None)
        calls.clear()
        projected = tp.load_pipeline("asap")
        with torch.no_grad(), projected.attach(model):
            model(**batch)
        assert len(calls) > 1  # the signals projected the queries again
    finally:
        handle.remove()
    assert captured.trace[0].kept == projected.trace[0].kept
    assert all(a < b for a, b in zip(captured.trace[0].visual_after, captured.trace[0].visual_before))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_fastv_on_a_sliding_window_layer_ranks_what_its_query_sees(impl):
    """The scorer applies the window its layer applies: FastV's choice is the eager model's own attention map's."""
    model, batch = pair("llava_next_sliding")[impl], inputs("llava_next_sliding")
    pipe = tp.load_pipeline("fastv", ["stages.0.operators.1.keep=16"])
    with torch.no_grad(), pipe.attach(model):
        model(**batch)
    kept = pipe.trace[0].kept
    assert kept == fastv_reference_kept(pair("llava_next_sliding")["eager"], batch, site=2, keep=16)
    visual = batch["input_ids"] == model.config.image_token_id
    last, window = batch["input_ids"].shape[1] - 1, model.config.text_config.sliding_window
    for b, row in enumerate(kept):  # every kept visual token is one the last query can see at layer 1
        assert all(i > last - window for i in row if visual[b, i]), (b, row)
