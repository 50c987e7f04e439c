"""Qwen3.5: a hybrid LLM whose layers 0-2 and 4-6 are Gated DeltaNet (linear attention) and 3 and 7 attend.

A masked reference cannot stand for removal here (a masked token still moves a recurrent layer's state), so the
reference is written out layer by layer: the unpruned model's own embeddings and rotary angles for the whole
sequence (one forward of the sample alone), then each decoder layer run by hand on the tokens it sees — every
token before the site, the kept prompt tokens and the generated ones from the site on — with an explicit causal
mask for the attention layers and none for the recurrent ones (one sample, no padding). Greedy decoding is
re-run from scratch each step, without a cache."""

import pytest
import torch
from families import inputs, pair, sample_alone

import tokenprune as tp
from tokenprune.core.errors import ConfigError

STEPS = 3
FAMILY = "qwen3_5"
#: the dense model and the MoE (each token routed on its own: pruning changes no kept token's experts)
FAMILIES = [FAMILY, "qwen3_5_moe"]
#: logits tolerance against the reference (one sample alone): the MoE's expert kernels sum a batch's tokens in
#: another order than one sample's — its unpruned logits, batched vs alone, differ by up to 9e-5
ATOL = {FAMILY: 1e-4, "qwen3_5_moe": 2e-4}


def stage(layer, keep, scorer=None, compact=False, **extra):
    ops = [scorer or {"op": "attention", "queries": "last"}, {"op": "topk", "keep": keep}]
    if compact:
        ops.append({"op": "kv_compact"})
    return tp.load_pipeline({"stages": [{"layer": layer, "operators": ops, **extra}]})


@torch.no_grad()
def reference_logits(model, alone: dict, generated: list[int], site: int | None, kept: list[int] | None,
                     cut: dict[int, list[int]] | None = None) -> torch.Tensor:
    """(T', V) logits of the rows that reach the LM head: sample ``alone`` (one sample, no padding) followed by the
    ``generated`` tokens; from decoder layer ``site`` on only the prompt tokens ``kept`` (indices in ``alone``) and
    the generated ones flow (``site`` None: all flow). ``cut[l]``: attention layer l's cache was cut after the
    prefill to these prompt tokens, so the generated tokens' queries there see no other prompt token."""
    lm = model.model.language_model
    n = alone["input_ids"].shape[1]
    extra = torch.tensor([generated], dtype=torch.long)
    ids = torch.cat([alone["input_ids"], extra], 1)
    full = {**alone, "input_ids": ids, "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": torch.cat([alone["mm_token_type_ids"], torch.zeros_like(extra).int()], 1)}
    seen = {}
    attn = next(i for i, layer in enumerate(lm.layers) if hasattr(layer, "self_attn"))
    handle = lm.layers[attn].register_forward_pre_hook(
        lambda m, a, kw: seen.update(pe=kw["position_embeddings"]), with_kwargs=True)
    try:
        h = model(**full, output_hidden_states=True).hidden_states[0]  # the embeddings, image features placed
    finally:
        handle.remove()
    cos, sin = seen["pe"]
    t = ids.shape[1]
    rows = torch.arange(t)

    def hidden_from_generated(prompt_kept):
        out = torch.ones(t, dtype=torch.bool)
        out[torch.tensor(prompt_kept, dtype=torch.long)] = False
        out[n:] = False
        return out

    for i, layer in enumerate(lm.layers):
        if i == site:
            flowing = (~hidden_from_generated(kept)).nonzero().flatten()
            h, cos, sin, rows = h[:, flowing], cos[:, flowing], sin[:, flowing], rows[flowing]
        if not hasattr(layer, "self_attn"):
            h = layer(h, position_embeddings=(cos, sin), attention_mask=None)
            continue
        allowed = rows[None, :] <= rows[:, None]
        if cut and i in cut:
            allowed &= ~((rows[:, None] >= n) & hidden_from_generated(cut[i])[rows][None, :])
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
        h = layer(h, position_embeddings=(cos, sin), attention_mask=mask)
    return model.lm_head(lm.norm(h))[0].float()


def reference_greedy(model, alone, steps, site, kept, cut=None):
    """(tokens, last-row logits per step) of greedy decoding from the layer-by-layer reference, without a cache."""
    tokens, logits = [], []
    for _ in range(steps):
        logits.append(reference_logits(model, alone, tokens, site, kept, cut)[-1])
        tokens.append(int(logits[-1].argmax()))
    return tokens, logits


def pad_offset(batch, b):
    return int((batch["attention_mask"][b] == 0).sum())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("layer,keep,scorer", [(4, 0.5, None), (2, 0.5, {"op": "random", "seed": 3}),
                                               (0, 0.25, {"op": "random", "seed": 3}), (7, 0.5, {"op": "random", "seed": 3})])
def test_prefill_equals_the_layer_by_layer_reference(family, impl, layer, keep, scorer):
    """Oracle 2 (prefill): after an attention layer (4: reads layer 3's attention), before a recurrent layer whose
    predecessors are recurrent too (2), before the LLM (0), and before the last attention layer (7)."""
    model, batch = pair(family)[impl], inputs(family)
    pipe = stage(layer, keep, scorer)
    with torch.no_grad(), pipe.attach(model):
        logits = model(**batch).logits.float()
    kept = pipe.trace[0].kept
    assert pipe.trace[0].visual_after != pipe.trace[0].visual_before
    for b in range(2):
        off = pad_offset(batch, b)
        mine = [i - off for i in kept[b]]
        # the model's own layers, of the same attention implementation (their kernels differ by ~1e-4 here)
        want = reference_logits(model, sample_alone(family, batch, b), [], layer, mine)
        got = logits[b, -len(kept[b]):]  # a sample's kept tokens are its last rows
        assert torch.allclose(got, want, atol=ATOL[family]), (b, (got - want).abs().max())


def generate(model, batch, **kw):
    return model.generate(**batch, max_new_tokens=STEPS, do_sample=False, **kw)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("layer,compact,scorer", [(4, False, None), (4, True, None),
                                                  (0, False, {"op": "random", "seed": 3})])
def test_generation_equals_the_layer_by_layer_reference(family, impl, layer, compact, scorer):
    """Oracle 2 (decoding through stock generate(), the recurrent layers' states and the attention layers' caches
    carried from the pruned prefill); with ``kv_compact`` attention layer 3's cache is cut to the kept tokens."""
    model, batch = pair(family)[impl], inputs(family)
    pipe = stage(layer, 0.5, scorer, compact=compact)
    with torch.no_grad(), pipe.attach(model):
        out = generate(model, batch, output_logits=True, return_dict_in_generate=True)
    kept = pipe.trace[0].kept
    for b in range(2):
        off = pad_offset(batch, b)
        mine = [i - off for i in kept[b]]
        tokens, logits = reference_greedy(model, sample_alone(family, batch, b), STEPS, layer, mine,
                                          cut={3: mine} if compact else None)
        assert out.sequences[b, -STEPS:].tolist() == tokens
        for step in range(STEPS):
            got = out.logits[step][b].float()
            assert torch.allclose(got, logits[step], atol=ATOL[family]), (b, step, (got - logits[step]).abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_everything_is_identical(family):
    """Oracle 1."""
    model, batch = pair(family)["sdpa"], inputs(family)
    pipe = stage(4, 1.0)
    with torch.no_grad():
        ref_logits, ref_gen = model(**batch).logits, generate(model, batch)
        with pipe.attach(model):
            logits, gen = model(**batch).logits, generate(model, batch)
    assert pipe.trace[0].visual_after == pipe.trace[0].visual_before
    real = batch["attention_mask"].bool()
    assert torch.equal(logits[real], ref_logits[real])
    assert torch.equal(gen, ref_gen)


def unpadded_inputs(family):
    """Two samples of one length (no padding) that keep different numbers of tokens: 16 and 6 visual tokens."""
    from tokenprune.reference.tiny import tiny_qwen2_vl_inputs

    batch = tiny_qwen2_vl_inputs(pair(family)["sdpa"], grids=[(8, 8), (4, 6)],
                                 prompts=[list(range(10, 16)), list(range(20, 36))])
    assert bool(batch["attention_mask"].all())
    return batch


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("layer,scorer", [(4, None), (2, {"op": "random", "seed": 3})])
def test_batch_with_different_visual_counts_equals_each_sample_alone(family, layer, scorer, padded):
    """Oracle 3: the sample that keeps fewer tokens is left-filled; its recurrent layers see zeros there, before
    its first real token, and their states start from it as the sample's alone do — also where the prompt had no
    padding (the model then gives its recurrent layers no mask)."""
    model, batch = pair(family)["sdpa"], inputs(family) if padded else unpadded_inputs(family)
    pipe = stage(layer, 0.5, scorer)
    with torch.no_grad(), pipe.attach(model):
        together = generate(model, batch)[:, -STEPS:]
        trace = pipe.trace[0]
        assert trace.visual_before[0] != trace.visual_before[1]
        assert len(trace.kept[0]) != len(trace.kept[1])  # one of them is filled
        for b in range(2):
            gen = generate(model, sample_alone(family, batch, b))[:, -STEPS:]
            assert [i + pad_offset(batch, b) for i in pipe.trace[0].kept[0]] == trace.kept[b]
            assert torch.equal(gen[0], together[b])


def test_fastv_ranks_by_the_eager_models_own_attention():
    """Oracle 4: FastV at layer 4 keeps the visual tokens that layer 3's attention weights, as the eager model
    returns them, rank highest for the last query (heads averaged)."""
    model, batch = pair(FAMILY)["eager"], inputs(FAMILY)
    weights = []
    handle = model.model.language_model.layers[3].self_attn.register_forward_hook(lambda m, a, o: weights.append(o[1]))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    att = weights[0][:, :, -1].float().mean(1)  # (B, N)
    visual = batch["input_ids"] == model.config.image_token_id
    pipe = tp.load_pipeline({"stages": [{"layer": 4, "operators": [{"op": "attention", "queries": "last"},
                                                                   {"op": "topk", "keep": 5}]}]})
    with torch.no_grad(), pipe.attach(pair(FAMILY)["sdpa"]):
        pair(FAMILY)["sdpa"](**batch)
    for b in range(2):
        idx = visual[b].nonzero().flatten()
        top = idx[att[b, idx].argsort(descending=True, stable=True)[:5]].tolist()
        assert sorted(i for i in pipe.trace[0].kept[b] if visual[b, i]) == sorted(top)


def test_exact_flops_of_a_linear_attention_layer():
    """The ``exact`` convention on a Gated DeltaNet layer: its matmuls as torch.utils.flop_counter counts them when
    the layer's own modules run on n tokens, plus the depthwise convolution and the recurrent delta rule by hand
    (2 x kernel per channel and token; 3 products with the 8 x 8 state per value head and token)."""
    from torch.utils.flop_counter import FlopCounterMode

    from tokenprune.measure.flops import LLMShape, layer_flops

    model = pair(FAMILY)["sdpa"]
    text = model.config.text_config
    shape = LLMShape.from_config(text)
    assert shape.recurrent == (0, 1, 2, 4, 5, 6)
    n = 10
    layer = model.model.language_model.layers[0]
    x = torch.randn(1, n, text.hidden_size)
    net = layer.linear_attn
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        for proj in (net.in_proj_qkv, net.in_proj_z, net.in_proj_a, net.in_proj_b):
            proj(x)
        net.out_proj(torch.randn(1, n, net.value_dim))
        layer.mlp(x)
    conv = 2 * n * (2 * 16 + 32) * 4  # channels: q and k (2 heads x 8) and v (4 heads x 8)
    state = 3 * 2 * n * 4 * 8 * 8
    assert layer_flops(n, shape, "exact", layer=0) == counter.get_total_flops() + conv + state
    attn = layer_flops(n, shape, "exact", layer=3)  # the attention layer keeps the n x n products
    assert attn > layer_flops(n, shape, "exact", layer=0)
    assert layer_flops(n, shape, "fastv", layer=0) == 4 * n * 64 ** 2 + 2 * n * 64 * 128


def test_hybrid_flops_count_each_layer_as_it_is():
    """Pruning at layer 4 of the tiny model: six recurrent and two attention layers, each at its own token count."""
    from tokenprune.measure.flops import LLMShape, layer_flops, pipeline_flops

    shape = LLMShape.from_config(pair(FAMILY)["sdpa"].config.text_config)
    report = pipeline_flops(stage(4, 0.25), shape, n_tokens=100, n_visual=64, convention="exact")
    kinds = [(i, 100 if i < 4 else 52) for i in range(8)]
    assert report.flops == sum(layer_flops(n, shape, "exact", i) for i, n in kinds)
    assert report.baseline_flops == sum(layer_flops(100, shape, "exact", i) for i in range(8))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("budget", ["uniform", "adaptive"])
def test_kv_cache_stage_cuts_the_attention_layers_caches(impl, budget):
    """A ``kv_cache`` stage over ``layers: all`` compresses attention layers 3 and 7, each by its own attention, and
    generation equals the reference whose generated tokens see, at each of those layers, only the prompt entries it
    kept (the recurrent layers' states are untouched: the whole prefill went through them)."""
    model, batch = pair(FAMILY)[impl], inputs(FAMILY)
    pipe = tp.load_pipeline({"stages": [{"layer": "kv_cache", "cache": {"layers": "all", "budget": budget},
                                         "operators": [{"op": "attention", "queries": "last"},
                                                       {"op": "topk", "keep": 0.25}]}]})
    with torch.no_grad(), pipe.attach(model):
        out = generate(model, batch, output_logits=True, return_dict_in_generate=True)
    kept = {t.layer: t.kept for t in pipe.trace if t.site == "kv_cache"}
    assert sorted(kept) == [3, 7]
    for b in range(2):
        off = pad_offset(batch, b)
        cut = {layer: [i - off for i in rows[b]] for layer, rows in kept.items()}
        assert all(len(c) < batch["attention_mask"][b].sum() for c in cut.values())
        tokens, logits = reference_greedy(model, sample_alone(FAMILY, batch, b), STEPS, None, None, cut=cut)
        assert out.sequences[b, -STEPS:].tolist() == tokens
        for step in range(STEPS):
            assert torch.allclose(out.logits[step][b].float(), logits[step], atol=1e-4), (b, step)


@pytest.mark.parametrize("stages,key,match", [
    ([{"layer": 3, "operators": [{"op": "attention"}, {"op": "topk", "keep": 0.5}]}], "stages.0.operators.0.op",
     r"'attention' reads the attention \(queries, keys\) of layer 2, .* a linear-attention \(recurrent\) layer.*"
     r"allowed layers for this stage: 4 \(right after an attention layer\)"),
    ([{"layer": 2, "operators": [{"op": "key_norm"}, {"op": "topk", "keep": 0.5}]}], "stages.0.operators.0.op",
     "'key_norm' reads the attention"),
    ([{"layer": 2, "operators": [{"op": "bipartite", "keep": 0.5}]}], "stages.0.operators.0.op",
     "'bipartite' reads the attention"),
    ([{"layer": "kv_cache", "cache": {"layers": [2, 3]}, "operators": [{"op": "attention"}, {"op": "topk", "keep": 4}]}],
     "stages.0.cache.layers", r"layer 2 of Qwen3.5 is a linear-attention .*allowed: its attention layers 3, 7"),
    ([{"layer": "kv_cache", "cache": {"layers": [3], "decode": {"steps": [1], "keep": 2, "score_layer": 1}},
       "operators": [{"op": "attention"}, {"op": "topk", "keep": 4}]}], "stages.0.cache.decode.score_layer",
     "layer 1 of Qwen3.5 is a linear-attention"),
])
def test_what_a_recurrent_layer_lacks_is_refused_from_the_config(stages, key, match):
    """Refused from config.json alone (before any weights load: what ``tokenprune run`` checks first) and at
    ``attach``, naming the key."""
    from tokenprune.adapters import adapter_class

    model = pair(FAMILY)["sdpa"]
    cls = adapter_class(model.config)
    pipe = tp.load_pipeline({"stages": stages})
    with pytest.raises(ConfigError, match=match) as err:
        cls.check_pipeline(cls.facts_from_config(model.config), pipe)
    assert err.value.key == key
    with pytest.raises(ConfigError, match=match):
        pipe.attach(model)


@pytest.mark.parametrize("stages", [
    [{"layer": 2, "operators": [{"op": "random"}, {"op": "topk", "keep": 0.5}]}],  # reads nothing
    [{"layer": 2, "operators": [{"op": "bipartite", "keep": 0.5, "features": "hidden"}]}],  # the site's input
    [{"layer": 2, "operators": [{"op": "sinkhorn", "features": "layer_io"},
                                {"op": "topk", "keep": 0.5}]}],  # layer 1's input and output, not its attention
])
def test_operators_that_read_no_attention_run_after_a_recurrent_layer(stages):
    model, batch = pair(FAMILY)["sdpa"], inputs(FAMILY)
    pipe = tp.load_pipeline({"stages": stages})
    with torch.no_grad(), pipe.attach(model):
        model(**batch)
    assert all(a < b for a, b in zip(pipe.trace[0].visual_after, pipe.trace[0].visual_before))


def test_a_hybrid_guide_sums_the_attention_of_its_attention_layers():
    """SGL's guide signal on a Qwen3.5 guide: the last query's attention (heads averaged) summed over the layers
    that attend (3 and 7), as the eager guide's own maps give it."""
    from tokenprune.runtime.guide import GuideModel

    model, batch = pair(FAMILY)["eager"], inputs(FAMILY)
    maps = []
    handles = [model.model.language_model.layers[i].self_attn.register_forward_hook(lambda m, a, o: maps.append(o[1]))
               for i in (3, 7)]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    want = sum(m[:, :, -1].float().mean(1) for m in maps)
    images = {k: batch[k] for k in ("pixel_values", "image_grid_thw")}
    got = GuideModel(pair(FAMILY)["sdpa"]).attention(batch["input_ids"], batch["attention_mask"], images, "last", "mean")
    real = batch["attention_mask"].bool()
    assert torch.allclose(got[real], want[real], atol=1e-5)


@pytest.mark.parametrize("layer,compact,scorer", [(4, False, None), (4, True, None),
                                                  (0, False, {"op": "random", "seed": 3})])
def test_generation_under_the_flash_convention_equals_the_reference(layer, compact, scorer):
    """FlashAttention's convention (tokenprune.reference.flash_stand_in: 2-D padding masks, varlen kernels computed
    exactly): the recurrent layers get their 2-D masks in the prefill and none while decoding, the attention layers
    theirs; generation equals the layer-by-layer reference (the SDPA model's layers)."""
    from tokenprune.reference import flash_stand_in
    from tokenprune.reference.tiny import tiny_qwen3_5

    impl = flash_stand_in.register()
    model = tiny_qwen3_5(impl)
    model.load_state_dict(pair(FAMILY)["sdpa"].state_dict())
    batch = inputs(FAMILY)
    pipe = stage(layer, 0.5, scorer, compact=compact)
    with torch.no_grad(), pipe.attach(model):
        out = generate(model, batch, output_logits=True, return_dict_in_generate=True)
    kept = pipe.trace[0].kept
    assert len(kept[0]) != len(kept[1])  # the shorter sample is left-filled
    for b in range(2):
        mine = [i - pad_offset(batch, b) for i in kept[b]]
        tokens, logits = reference_greedy(pair(FAMILY)["sdpa"], sample_alone(FAMILY, batch, b), STEPS, layer, mine,
                                          cut={3: mine} if compact else None)
        assert out.sequences[b, -STEPS:].tolist() == tokens
        for step in range(STEPS):
            assert torch.allclose(out.logits[step][b].float(), logits[step], atol=1e-4), (b, step)


def test_multi_stage_renumbered_pipeline_batch_equals_each_sample_alone():
    """Two stages — before recurrent layer 2 (random) and after attention layer 3 (FastV, with KV compaction) — with
    M-RoPE positions renumbered, on a batch with different visual counts: each sample keeps and generates what it
    keeps and generates alone."""
    model, batch = pair(FAMILY)["sdpa"], inputs(FAMILY)
    pipe = tp.load_pipeline({"stages": [
        {"layer": 2, "positions": "renumber", "operators": [{"op": "random", "seed": 1}, {"op": "topk", "keep": 0.75}]},
        {"layer": 4, "positions": "renumber", "operators": [{"op": "attention"}, {"op": "topk", "keep": 0.5},
                                                            {"op": "kv_compact"}]}]})
    with torch.no_grad(), pipe.attach(model):
        together = generate(model, batch)[:, -STEPS:]
        traces = list(pipe.trace)
        assert traces[1].visual_before == traces[0].visual_after
        for b in range(2):
            gen = generate(model, sample_alone(FAMILY, batch, b))[:, -STEPS:]
            for alone, both in zip(pipe.trace, traces):
                assert [i + pad_offset(batch, b) for i in alone.kept[0]] == both.kept[b]
            assert torch.equal(gen[0], together[b])


def test_the_builtin_qwen3_5_9b_shape_is_the_config_class_defaults():
    """``qwen3.5-9b`` (docs/flops.md) is transformers' Qwen3_5TextConfig defaults, Qwen3.5-9B's geometry."""
    from transformers import Qwen3_5TextConfig

    from tokenprune.measure.flops import BUILTIN_SHAPES, LLMShape

    assert BUILTIN_SHAPES["qwen3.5-9b"] == LLMShape.from_config(Qwen3_5TextConfig(), name="qwen3.5-9b")
    assert len(BUILTIN_SHAPES["qwen3.5-9b"].recurrent) == 24


@pytest.mark.parametrize("layer,scorer", [(4, None), (0, {"op": "random", "seed": 3})])
def test_video_generation_equals_the_layer_by_layer_reference(layer, scorer):
    """A batch of an image and a 3-frame clip (each frame between its timestamp and vision tokens, as Qwen3.5's
    processor lays a video out): generate() against the layer-by-layer reference, per sample."""
    from test_video import alone

    from tokenprune.reference.tiny import tiny_qwen2_vl_inputs

    model = pair(FAMILY)["sdpa"]
    batch = tiny_qwen2_vl_inputs(model, grids=[(8, 8), (6, 8)], videos=[None, (6, 6, 8)])
    pipe = stage(layer, 0.5, scorer)
    with torch.no_grad(), pipe.attach(model):
        out = generate(model, batch, output_logits=True, return_dict_in_generate=True)
    kept = pipe.trace[0].kept
    assert pipe.trace[0].visual_before == [16, 36]
    for b in range(2):
        mine = [i - pad_offset(batch, b) for i in kept[b]]
        tokens, logits = reference_greedy(model, alone(batch, b), STEPS, layer, mine)
        assert out.sequences[b, -STEPS:].tolist() == tokens
        for step in range(STEPS):
            assert torch.allclose(out.logits[step][b].float(), logits[step], atol=1e-4), (b, step)
