"""LLaMA-3.2-Vision (Mllama): the cross_attention site, against the eager model with the pruned image
features masked out of every cross-attention layer (oracles 1-4), and Trimmed Llama's selection."""

import functools

import pytest
import torch
from reference import hidden_image_features, pruned_features

import tokenprune as tp
from tokenprune.core.errors import ConfigError
from tokenprune.reference.tiny import tiny_llava, tiny_mllama, tiny_mllama_inputs

STEPS = 3
FEATURES = 4 * 17  # 4 tiles x (16 patches + CLS)


@functools.cache
def pair():
    sdpa, eager = tiny_mllama("sdpa"), tiny_mllama("eager")
    eager.load_state_dict(sdpa.state_dict())
    return {"sdpa": sdpa, "eager": eager}


def batch():
    return tiny_mllama_inputs(pair()["sdpa"])  # 4 tiles and 2 tiles: different visible feature counts


def trimmed(keep=0.1, queries="text"):
    return tp.load_pipeline({"stages": [{"layer": "cross_attention", "operators": [
        {"op": "per_head_union", "keep": keep, "queries": queries}]}]})


def generate(model, inputs, **kw):
    return model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, **kw)


def test_keep_everything_is_identical():
    model, inputs = pair()["sdpa"], batch()
    pipe = trimmed(keep=1.0)
    with torch.no_grad():
        ref_logits, ref_gen = model(**inputs).logits, generate(model, inputs)
        with pipe.attach(model):
            logits, gen = model(**inputs).logits, generate(model, inputs)
    assert pipe.trace[0].visual_after == pipe.trace[0].visual_before == [68, 34]
    assert torch.equal(logits, ref_logits)
    assert torch.equal(gen, ref_gen)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_prefill_and_generation_equal_masked_reference(impl):
    """Oracle 2: prefill logits and every generate() step equal the eager model with the pruned features
    masked in every cross-attention layer; the cross-attention KV cache holds only the kept features."""
    model, inputs = pair()[impl], batch()
    pipe = trimmed(keep=0.1)
    with torch.no_grad(), pipe.attach(model):
        logits = model(**inputs).logits.float()
        cache = model(**inputs, use_cache=True).past_key_values
        out = generate(model, inputs, output_logits=True, return_dict_in_generate=True)
    kept = pipe.trace[0].kept
    assert [len(k) for k in kept] != [FEATURES, 34 + 34]  # something was pruned
    lengths = [layer.keys.shape[-2] for layer in cache.layers]
    assert lengths[1] == lengths[3] == max(len(k) for k in kept)  # cross-attention layers
    eager = pair()["eager"]
    with torch.no_grad(), hidden_image_features(eager, pruned_features(FEATURES, kept)):
        ref_logits = eager(**inputs).logits.float()
        ref = generate(eager, inputs, output_logits=True, return_dict_in_generate=True)
    valid = inputs["attention_mask"].bool()
    assert torch.allclose(logits[valid], ref_logits[valid], atol=1e-4)
    assert torch.equal(out.sequences, ref.sequences)
    for got, want in zip(out.logits, ref.logits):
        assert torch.allclose(got.float(), want.float(), atol=1e-4)


def test_batch_equals_each_sample_alone():
    """Oracle 3: samples with different tile counts keep different numbers of features."""
    model, inputs = pair()["sdpa"], batch()
    pipe = trimmed(keep=0.1)
    with torch.no_grad(), pipe.attach(model):
        together = generate(model, inputs)[:, -STEPS:]
        kept = pipe.trace[0].kept
        assert len(kept[0]) != len(kept[1])
        for b in range(2):
            valid = inputs["attention_mask"][b].bool()
            alone = {"input_ids": inputs["input_ids"][b:b + 1, valid],
                     "attention_mask": inputs["attention_mask"][b:b + 1, valid],
                     "cross_attention_mask": inputs["cross_attention_mask"][b:b + 1, valid],
                     **{k: inputs[k][b:b + 1] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}}
            gen = generate(model, alone)[:, -STEPS:]
            assert pipe.trace[0].kept[0] == kept[b]
            assert torch.equal(gen[0], together[b])


def test_sdpa_and_eager_agree():
    inputs = batch()
    results = {}
    for impl in ("sdpa", "eager"):
        pipe = trimmed(keep=0.1)
        with torch.no_grad(), pipe.attach(pair()[impl]):
            results[impl] = (pipe, generate(pair()[impl], inputs))
    assert results["sdpa"][0].trace[0].kept == results["eager"][0].trace[0].kept
    assert torch.equal(results["sdpa"][1], results["eager"][1])


@pytest.mark.parametrize("queries", ["text", "last"])
def test_per_head_union_matches_the_eager_cross_attention_maps(queries):
    """Trimmed Llama's choice from the eager model's own attention weights of the first cross-attention
    layer: per head, mean over the query rows that see the image, top-k of the visible features,
    union over heads (plus the padding-tile features no text token sees, which stay)."""
    model, inputs = pair()["eager"], batch()
    pipe = trimmed(keep=5, queries=queries)
    with torch.no_grad(), pipe.attach(model):
        model(**inputs)
    with torch.no_grad():
        att = model(**inputs, output_attentions=True).attentions[1].float()  # (B, H, S, M)
    cam = inputs["cross_attention_mask"]  # (B, S, 1, tiles)
    for b in range(2):
        sees = cam[b, :, 0].bool().any(-1) & inputs["attention_mask"][b].bool()  # rows that see the image
        text = inputs["input_ids"][b] != model.config.image_token_index  # the <|image|> placeholder is no text
        rows = (sees & text).nonzero().flatten()
        if queries == "last":
            rows = rows[-1:]
        visible = cam[b, rows[0], 0].bool().repeat_interleave(17)  # (M,) features of the real tiles
        per_head = att[b][:, rows].mean(1)[:, visible]  # (H, V)
        vis_idx = visible.nonzero().flatten()
        chosen = set()
        for h in range(per_head.shape[0]):
            chosen |= set(vis_idx[per_head[h].argsort(descending=True, stable=True)[:5]].tolist())
        expected = sorted(chosen | set((~visible).nonzero().flatten().tolist()))
        assert pipe.trace[0].kept[b] == expected


def test_sites_that_do_not_exist_are_named():
    layer_pipe = tp.load_pipeline({"stages": [{"layer": 2, "operators": [{"op": "random"}, {"op": "topk"}]}]})
    with pytest.raises(ConfigError, match=r"stages\.0\.layer: got 2, but the decoder sequence of LLaMA-3\.2-Vision"):
        layer_pipe.attach(pair()["sdpa"])
    with pytest.raises(ConfigError, match=r"stages\.0\.layer: 'cross_attention' is not a site of LLaVA-1\.5"):
        trimmed().attach(tiny_llava("sdpa", layers=2))
    with pytest.raises(ConfigError, match=r"stages\.1\.layer: a 'cross_attention' stage must be the pipeline's only"):
        tp.load_pipeline({"stages": [{"layer": 1, "operators": [{"op": "random"}, {"op": "topk"}]},
                                     {"layer": "cross_attention", "operators": [{"op": "per_head_union"}]}]})
    with pytest.raises(ConfigError, match=r"stages\.0\.layer: must be an integer >= 0 .* 'cross_attention' .* or 'kv_cache'"):
        tp.load_pipeline({"stages": [{"layer": "cross", "operators": [{"op": "random"}, {"op": "topk"}]}]})


def test_trimmed_llama_preset_runs_through_generate():
    model, inputs = pair()["sdpa"], batch()
    pipe = tp.load_pipeline("trimmed_llama")
    with torch.no_grad(), pipe.attach(model):
        generate(model, inputs)
    t = pipe.trace[0]
    assert all(0 < a < v for a, v in zip(t.visual_after, t.visual_before))


def test_manual_cached_decoding_equals_masked_reference():
    """A plain forward with use_cache (the LLM makes the cache) then manual decoding steps with the
    full-length cross-attention mask: each step equals the reference."""
    model, inputs = pair()["sdpa"], batch()

    def run(m):
        out = m(**inputs, use_cache=True)
        cache, am, cam = out.past_key_values, inputs["attention_mask"], inputs["cross_attention_mask"]
        logits = [out.logits[:, -1].float()]
        for _ in range(STEPS):
            am = torch.cat([am, torch.ones(2, 1, dtype=am.dtype)], 1)
            cam = torch.cat([cam, cam[:, -1:]], 1)
            out = m(input_ids=logits[-1].argmax(-1)[:, None], attention_mask=am, cross_attention_mask=cam,
                    past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits.append(out.logits[:, -1].float())
        return logits

    pipe = trimmed(keep=0.1)
    with torch.no_grad(), pipe.attach(model):
        got = run(model)
    with torch.no_grad(), hidden_image_features(pair()["eager"], pruned_features(FEATURES, pipe.trace[0].kept)):
        want = run(pair()["eager"])
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-4)


# --- vision-tower signals: each feature's own tile's CLS attention, at layer 0 = the image features ---------

def eager_vision_maps(monkeypatch, model, inputs):
    """The eager tower's own attention probabilities per vision layer (local layers, then global), and each
    layer's input hidden states."""
    import transformers.models.mllama.modeling_mllama as mm

    stock, maps, running, inputs_of = mm.eager_attention_forward, {}, [], {}

    def recording(*args, **kwargs):
        out, weights = stock(*args, **kwargs)
        maps[running[-1]] = weights.detach().float()
        return out, weights

    monkeypatch.setattr(mm, "eager_attention_forward", recording)
    vm = model.model.vision_model
    layers = [*vm.transformer.layers, *vm.global_transformer.layers]

    def pre(i):
        def hook(module, args, kwargs):
            running.append(i)
            inputs_of[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    handles = [layer.register_forward_pre_hook(pre(i), with_kwargs=True) for i, layer in enumerate(layers)]
    with torch.no_grad():
        vm(inputs["pixel_values"], inputs["aspect_ratio_ids"], inputs["aspect_ratio_mask"])
    for h in handles:
        h.remove()
    return maps, inputs_of, layers


@pytest.mark.parametrize("layer,index", [(0, 0), (-2, 1), (-1, 2)])  # two local layers, then the global one
def test_cls_attention_is_each_tiles_own_cls_row_of_the_eager_towers_map(monkeypatch, layer, index):
    """Feature (tile t, token j) — j = 0 its CLS, then 16 patches — reads the eager tower's attention of tile t's
    CLS query (the image's tiles are one sequence, 24 tokens a tile with padding) to it; keys likewise."""
    model, inputs = pair()["sdpa"], batch()
    seen = {}

    class Spy(torch.nn.Module):
        needs_vision = True

        def forward(self, state):
            seen["state"] = state
            return state

    pipe = tp.load_pipeline({"stages": [{"layer": 0, "operators": [{"op": "random"}, {"op": "topk", "keep": 1.0}]}]})
    pipe.stages[0].operators.insert(0, Spy())
    with torch.no_grad(), pipe.attach(model):
        model(**inputs)
    state = seen["state"]
    got = state.signals.vision_cls_attention(layer=layer, heads="mean")  # (B, 68)
    maps, inputs_of, layers = eager_vision_maps(monkeypatch, pair()["eager"], inputs)
    probs = maps[index].mean(1)  # (B, 96, 96): 4 tiles x 24 tokens
    want = torch.stack([torch.cat([probs[b, t * 24, t * 24:t * 24 + 17] for t in range(4)]) for b in range(2)])
    assert torch.allclose(got, want, atol=1e-5)
    keys = state.signals.vision_keys(layer=layer).flatten(2)  # (B, 68, H*hd)
    block = layers[index]
    with torch.no_grad():
        k = block.self_attn.k_proj(block.input_layernorm(inputs_of[index])).view(2, 4, 24, -1)[:, :, :17]
    assert torch.allclose(keys, k.reshape(2, 68, -1), atol=1e-5)


def test_dominant_features_at_layer_0_equal_the_masked_reference(monkeypatch):
    """`layer: 0` on Mllama is its image features: a VisionZip-style top-k by CLS attention keeps the eager
    tower's top features per sample, and generate() equals the eager model with the others masked out of
    every cross-attention layer."""
    model, inputs = pair()["sdpa"], batch()
    pipe = tp.load_pipeline({"stages": [{"layer": 0, "operators": [
        {"op": "cls_attention", "layer": -1}, {"op": "topk", "keep": 8}]}]})
    with torch.no_grad(), pipe.attach(model):
        out = generate(model, inputs, output_logits=True, return_dict_in_generate=True)
    kept = pipe.trace[0].kept
    eager = pair()["eager"]
    maps, _, _ = eager_vision_maps(monkeypatch, eager, inputs)
    monkeypatch.undo()
    probs = maps[2].mean(1)
    valid_tiles = inputs["aspect_ratio_mask"][:, 0].tolist()  # padding tiles' features no text token sees
    for b in range(2):
        ref_att = torch.cat([probs[b, t * 24, t * 24:t * 24 + 17] for t in range(4)])
        visible = torch.tensor([valid_tiles[b][j // 17] == 1 for j in range(68)])
        order = torch.where(visible, ref_att, -1.0).argsort(descending=True, stable=True)[:8]
        assert set(k for k in kept[b] if visible[k]) == set(order.tolist())
    with torch.no_grad(), hidden_image_features(eager, pruned_features(FEATURES, kept)):
        ref = generate(eager, inputs, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref.sequences)
    for got, want in zip(out.logits, ref.logits):
        assert torch.allclose(got.float(), want.float(), atol=1e-4)


def test_per_tile_budgets_on_the_image_features():
    """`budget: per_tile` on Mllama: each real tile's 4x4 patch grid keeps every second row and column, and every
    CLS feature (in no tile) is kept."""
    model, inputs = pair()["sdpa"], batch()
    pipe = tp.load_pipeline({"stages": [{"layer": "cross_attention", "budget": "per_tile", "operators": [
        {"op": "uniform_grid", "stride": 2}]}]})
    with torch.no_grad(), pipe.attach(model):
        model(**inputs)
    for b, tiles in enumerate([4, 2]):
        want = set()
        for t in range(tiles):
            want |= {t * 17} | {t * 17 + 1 + r * 4 + c for r in (0, 2) for c in (0, 2)}
        visible = set(range(tiles * 17))
        assert set(pipe.trace[0].kept[b]) & visible == want
