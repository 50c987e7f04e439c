"""The kv_cache site: each layer's cached visual keys/values compressed after the prefill (and while decoding),
checked against an independent reference: the unpruned eager model whose layer l stops seeing the pruned
prompt keys from the first decoding step on (tests/reference.py)."""

import pytest
import torch
from reference import fastv_reference_kept, reference_kv_greedy

import tokenprune as tp
from tokenprune.core.errors import ConfigError
from tokenprune.core.kv_cache import adaptive_weights, allocate
from tokenprune.core.state import TokenState

STEPS = 4
N_VISUAL = 64  # tiny LLaVA: 8x8 patches


def kv_pipe(keep=0.25, budget="uniform", layers="all", decode=None, queries="last", merger=None):
    ops = [{"op": "attention", "queries": queries}, {"op": "topk", "keep": keep}]
    if merger:
        ops.append(merger)
    cache = {"layers": layers, "budget": budget, **({"decode": decode} if decode else {})}
    return tp.load_pipeline({"name": "kv", "stages": [{"layer": "kv_cache", "cache": cache, "operators": ops}]})


def kept_by_layer(pipe, site="kv_cache", step=0):
    return {t.layer: t.kept for t in pipe.trace if t.site == site and t.step == step}


def generate(model, batch, pipe, steps=STEPS):
    with torch.no_grad(), pipe.attach(model):
        return model.generate(**batch, max_new_tokens=steps, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)


def assert_matches_reference(out, tokens, ref_logits):
    assert torch.equal(out.sequences[:, -STEPS:], tokens)
    for step, (got, want) in enumerate(zip(out.logits, ref_logits)):
        assert torch.allclose(got.float(), want, atol=1e-4), (step, (got - want).abs().max())


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("budget", ["uniform", "adaptive"])
def test_drop_only_equals_masked_reference(llava_pair, batch, impl, budget):
    """Drop-only at the kv_cache site == the full prefill, then each layer's pruned prompt keys masked from the
    first decoding step on; a left-padded batch through stock generate()."""
    pipe = kv_pipe(keep=0.25, budget=budget)
    out = generate(llava_pair[impl], batch, pipe)
    kept = kept_by_layer(pipe)
    assert sorted(kept) == [0, 1, 2, 3]
    if budget == "adaptive":  # the layers really do keep different numbers (else this test would not test it)
        assert len({len(k[0]) for k in kept.values()}) > 1
    tokens, ref_logits = reference_kv_greedy(llava_pair["eager"], batch, kept, STEPS)
    assert_matches_reference(out, tokens, ref_logits)


def test_each_layer_ranks_by_its_own_attention(llava_pair, batch):
    """At layer l the kept visual entries are the top-k of layer l's own last-row attention (eager map)."""
    pipe = kv_pipe(keep=10, layers=[1, 3])
    with torch.no_grad(), pipe.attach(llava_pair["sdpa"]):
        llava_pair["sdpa"](**batch, use_cache=True)
    kept = kept_by_layer(pipe)
    assert sorted(kept) == [1, 3]
    for layer in (1, 3):
        assert kept[layer] == fastv_reference_kept(llava_pair["eager"], batch, site=layer + 1, keep=10)


def test_kv_bytes_after_prefill_match_the_budget(llava_pair, batch):
    """Uniform: every compressed layer holds the text and exactly `keep` visual entries per sample; adaptive:
    the per-layer counts differ but add up to layers x keep for every sample."""
    model = llava_pair["sdpa"]
    n = batch["input_ids"].shape[1]
    pipe = kv_pipe(keep=10, layers=[0, 2])
    with torch.no_grad(), pipe.attach(model):
        out = model(**batch, use_cache=True)
    cache = out.past_key_values.layers
    heads, head_dim = cache[0].keys.shape[1], cache[0].keys.shape[3]
    lengths = [layer.keys.shape[-2] for layer in cache]
    assert lengths == [n - N_VISUAL + 10, n, n - N_VISUAL + 10, n]
    total = sum(layer.keys.numel() + layer.values.numel() for layer in cache) * 4  # fp32
    assert total == 2 * 2 * heads * head_dim * 4 * (2 * (n - N_VISUAL + 10) + 2 * n)

    pipe = kv_pipe(keep=10, budget="adaptive")
    with torch.no_grad(), pipe.attach(model):
        out = model(**batch, use_cache=True)
    traces = [t for t in pipe.trace if t.site == "kv_cache"]
    for b in range(2):
        assert sum(t.visual_after[b] for t in traces) == 4 * 10
    for t, layer in zip(traces, out.past_key_values.layers):
        # each sample's real text and its kept visual entries, padding dropped; the shorter sample is filled
        real = [int(batch["attention_mask"][b].sum()) - N_VISUAL + t.visual_after[b] for b in range(2)]
        assert layer.keys.shape[-2] == max(real)


def test_padded_batch_equals_each_sample_alone(llava_pair, batch):
    model = llava_pair["sdpa"]
    pipe = kv_pipe(keep=0.25, budget="adaptive")
    together = generate(model, batch, pipe)
    kept_together = kept_by_layer(pipe)
    for b in range(2):
        valid = batch["attention_mask"][b].bool()
        alone = {"input_ids": batch["input_ids"][b:b + 1, valid],
                 "attention_mask": batch["attention_mask"][b:b + 1, valid],
                 "pixel_values": batch["pixel_values"][b:b + 1]}
        out = generate(model, alone, pipe)
        offset = int((~valid).sum())
        for layer, kept in kept_by_layer(pipe).items():
            assert [i + offset for i in kept[0]] == kept_together[layer][b]
        assert torch.equal(out.sequences[0, -STEPS:], together.sequences[b, -STEPS:])
        assert torch.allclose(out.logits[-1][0], together.logits[-1][b], atol=1e-4)


@pytest.mark.parametrize("score_layer", [None, 1])
def test_decoding_time_repruning_equals_reference(llava_pair, batch, score_layer):
    """MINT-style re-pruning at decoding steps 1 and 2 == the reference that hides, from that step on, the
    entries each layer let go; with score_layer every later layer keeps layer 1's choice."""
    decode = {"steps": [1, 2], "keep": 0.5, "score_layer": score_layer}
    pipe = kv_pipe(keep=1.0, decode=decode)
    out = generate(llava_pair["sdpa"], batch, pipe)
    prefill = kept_by_layer(pipe)
    step1, step2 = kept_by_layer(pipe, "decode", 1), kept_by_layer(pipe, "decode", 2)
    expected_layers = [0, 1, 2, 3] if score_layer is None else [1, 2, 3]
    assert sorted(step1) == expected_layers and sorted(step2) == expected_layers
    for layer in expected_layers:
        for b in range(2):
            visual = [i for i in step1[layer][b] if batch["input_ids"][b, i] == llava_pair["sdpa"].config.image_token_id]
            assert len(visual) == 32  # half of the 64 held
            assert set(step2[layer][b]) <= set(step1[layer][b])
    if score_layer is not None:
        assert step1[2] == step1[1] and step1[3] == step1[1]
    tokens, ref_logits = reference_kv_greedy(llava_pair["eager"], batch, prefill, STEPS,
                                             kept_from_step={1: step1, 2: step2})
    assert_matches_reference(out, tokens, ref_logits)


def test_merging_writes_importance_weighted_means_into_the_cache(llava_pair, batch):
    """weighted_soft_merge (1 neighbour) at the kv_cache site: each kept visual entry becomes the importance-
    weighted mean of itself and the pruned entries most similar to it ([keys | values] cosine), computed here
    from the unpruned cache and key-norm importances."""
    model = llava_pair["sdpa"]
    one = {k: v[:1] for k, v in batch.items()}
    with torch.no_grad():
        full = model(**one, use_cache=True).past_key_values.layers[2]
    pipe = tp.load_pipeline({"name": "m", "stages": [{"layer": "kv_cache", "cache": {"layers": [2]}, "operators": [
        {"op": "key_norm"}, {"op": "topk", "keep": 8}, {"op": "weighted_soft_merge", "neighbors": 1}]}]})
    with torch.no_grad(), pipe.attach(model):
        got = model(**one, use_cache=True).past_key_values.layers[2]
    k, v = full.keys[0], full.values[0]  # (H, N, hd)
    flat = torch.cat([k.transpose(0, 1).flatten(1), v.transpose(0, 1).flatten(1)], dim=1)  # (N, 2 H hd)
    mass = k.norm(dim=-1).mean(0)  # key norm, heads averaged
    visual = (one["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    top = visual[mass[visual].argsort(descending=True, stable=True)[:8]].sort().values
    pruned = torch.tensor([i for i in visual.tolist() if i not in top.tolist()])
    unit = torch.nn.functional.normalize(flat, dim=1)
    owner = top[(unit[pruned] @ unit[top].T).argmax(1)]
    real = one["attention_mask"][0].bool()  # padding entries leave the cache with the pruned ones
    kept_rows = [i for i in range(flat.shape[0]) if bool(real[i]) and i not in pruned.tolist()]
    got_flat = torch.cat([got.keys[0].transpose(0, 1).flatten(1), got.values[0].transpose(0, 1).flatten(1)], dim=1)
    assert got_flat.shape[0] == len(kept_rows)
    assert len(set(owner.tolist())) > 1  # several anchors take merged entries
    for row, i in enumerate(kept_rows):
        if i not in top.tolist():  # text entries are left as they are
            assert torch.equal(got_flat[row], flat[i]), i
            continue
        group = [i] + pruned[owner == i].tolist()
        w = mass[group]
        want = (w[:, None] * flat[group]).sum(0) / w.sum()
        assert torch.allclose(got_flat[row], want, atol=1e-5), i


def test_adaptive_weights_follow_strength_and_skewness():
    flat = torch.full((8,), 0.05)  # mass 0.4, no skew
    peaked = torch.tensor([0.33, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01])  # mass 0.4, right-skewed
    w = adaptive_weights([flat, peaked, flat * 2])
    v = peaked.double()
    skew = float(((v - v.mean()) ** 3).mean() / v.std(unbiased=False) ** 3)  # 2.27 by hand: (7 - 1) / sqrt(7)
    assert abs(skew - 6 / 7 ** 0.5) < 1e-9
    assert torch.allclose(w, torch.tensor([0.4, 0.4 / (1 + skew), 0.8], dtype=torch.float64))


def test_allocate_is_exact_and_respects_the_bounds():
    assert allocate(torch.tensor([1.0, 1.0, 1.0, 1.0]), 10, [5, 5, 5, 5]) == [3, 3, 2, 2]
    assert allocate(torch.tensor([10.0, 1.0, 1.0, 1.0]), 12, [5, 5, 5, 5]) == [5, 3, 2, 2]  # capped, re-shared
    assert allocate(torch.tensor([0.0, 0.0, 0.0]), 7, [5, 5, 5]) == [3, 2, 2]
    assert allocate(torch.tensor([1.0, 2.0, 3.0]), 100, [5, 5, 5]) == [5, 5, 5]  # more than fits
    assert allocate(torch.tensor([1.0, 0.0]), 4, [3, 3]) == [3, 1]  # the floor of 1
    assert allocate(torch.tensor([3.0, 1.0]), 8, [2, 10]) == [2, 6]  # per-layer caps


def test_named_scores_give_separate_budgets():
    """CSP's shape: two scorers into two named sets, a union of a top-2 from each."""
    vis = torch.tensor([[False, True, True, True, True, True, True]])
    state = TokenState.from_tensors(torch.zeros(1, 7, 4), vis)
    state.add_scores(torch.tensor([[0, 9, 8, 1, 1, 1, 1.0]]), into="cross")
    state.add_scores(torch.tensor([[0, 9, 1, 1, 7, 6, 1.0]]), into="self")
    sel = tp.build_operator("union", of=[{"op": "topk", "keep": 2, "scores": "cross"},
                                                  {"op": "topk", "keep": 2, "scores": "self"}])
    assert sel(state).keep_mask.tolist() == [[True, True, True, False, True, False, False]]
    with pytest.raises(RuntimeError, match=r"no scores 'other'.*present: 'cross', 'self'"):
        tp.build_operator("topk", keep=2, scores="other")(state)


def test_elite_window_drops_the_inconsistent_rows():
    """Three window rows agree on token 2, one looks at token 4: with elite 0.75 the odd row is left out and the
    score is the mean of the three (hand-computed softmax rows)."""
    from tokenprune.core.attention import LogitsSource

    n = 9  # [bos, v1..v4, t5..t8]: visual 1-4, the instruction is 5-8
    vis = torch.tensor([[False, True, True, True, True, False, False, False, False]])
    logits = torch.zeros(1, 1, n, n)
    for row, hot in ((5, 2), (6, 2), (7, 4), (8, 2)):
        logits[0, 0, row, hot] = 3.0
    state = TokenState.from_tensors(torch.zeros(1, n, 4), vis, attention=LogitsSource(logits))
    op = tp.build_operator("elite_window", window=4, elite=0.75)
    got = op(state).scores[0]

    def row(r, hot):  # softmax over keys 0..r with one key at logit 3
        p = torch.ones(r + 1)
        p[hot] = torch.e ** 3
        return p / p.sum()

    want = (row(5, 2)[1:5] + row(6, 2)[1:5] + row(8, 2)[1:5]) / 3
    assert torch.allclose(got[1:5], want, atol=1e-6)
    assert float(got[0]) == 0.0 and float(got[5:].abs().sum()) == 0.0


@pytest.mark.parametrize("cfg,key,match", [
    ({"stages": [{"layer": "kv_cache", "operators": [{"op": "random"}, {"op": "topk"}]},
                 {"layer": 2, "operators": [{"op": "random"}, {"op": "topk"}]}]}, "stages.0.layer", "last stage"),
    ({"stages": [{"layer": 2, "cache": {}, "operators": [{"op": "random"}, {"op": "topk"}]}]}, "stages.0.cache",
     "only a 'kv_cache' stage"),
    ({"stages": [{"layer": "kv_cache", "cache": {"budget": "adaptive"}, "operators": [
        {"op": "random"}, {"op": "cumulative_mass"}]}]}, "stages.0.cache.budget", "topk"),
    ({"stages": [{"layer": "kv_cache", "cache": {"budget": "greedy"}, "operators": [
        {"op": "random"}, {"op": "topk"}]}]}, "stages.0.cache.budget", "uniform, adaptive"),
    ({"stages": [{"layer": "kv_cache", "cache": {"decode": {"steps": [0]}}, "operators": [
        {"op": "random"}, {"op": "topk"}]}]}, "stages.0.cache.decode.steps", ">= 1"),
    ({"stages": [{"layer": "kv_cache", "cache": {"layers": [1, "x"]}, "operators": [
        {"op": "random"}, {"op": "topk"}]}]}, "stages.0.cache.layers", r"'all', \{from: L\} or a non-empty list"),
    ({"stages": [{"layer": "kv_cache", "cache": {"layers": {"from": -1}}, "operators": [
        {"op": "random"}, {"op": "topk"}]}]}, "stages.0.cache.layers", r"\{from: L\} with L a decoder layer"),
    ({"stages": [{"layer": "kv_cache", "cache": {"decode": {"steps": "every"}}, "operators": [
        {"op": "random"}, {"op": "topk"}]}]}, "stages.0.cache.decode.steps", "'all' or a list"),
    ({"stages": [{"layer": "kv_cache", "cache": {"decode": {"steps": "all", "mode": "drop"}}, "operators": [
        {"op": "random"}, {"op": "topk"}]}]}, "stages.0.cache.decode.mode", "allowed: evict, mask"),
    ({"stages": [{"layer": "kv_cache", "cache": {"decode": {"steps": "all", "scorer": "oracle"}}, "operators": [
        {"op": "random"}, {"op": "topk"}]}]}, "stages.0.cache.decode.scorer", "allowed: attention, stage"),
    ({"stages": [{"layer": "kv_cache", "cache": {"decode": {"steps": "all", "scorer": "stage", "score_layer": 1}},
                  "operators": [{"op": "random"}, {"op": "topk"}]}]}, "stages.0.cache.decode.score_layer",
     "scorer: stage ranks each layer's entries by its own attention history"),
    ({"stages": [{"layer": "kv_cache", "cache": {"decode": {"steps": "all", "scorer": "stage", "history": 0}},
                  "operators": [{"op": "random"}, {"op": "topk"}]}]}, "stages.0.cache.decode.history", "integer >= 1"),
    ({"stages": [{"layer": "kv_cache", "cache": {"decode": {"steps": "all", "history": 4}},
                  "operators": [{"op": "random"}, {"op": "topk"}]}]}, "stages.0.cache.decode.history",
     "only scorer: stage keeps an attention history"),
    ({"stages": [{"layer": "kv_cache", "cache": {"layer": [1]}, "operators": [
        {"op": "random"}, {"op": "topk"}]}]}, "stages.0.cache.layer", "unknown cache key"),
    ({"stages": [{"layer": "kv_cache", "operators": [{"op": "random"}, {"op": "topk"}, {"op": "kv_compact"}]}]},
     "stages.0.operators.2", "compactor"),
])
def test_bad_kv_configs_name_the_key(cfg, key, match):
    with pytest.raises(ConfigError, match=match) as e:
        tp.load_pipeline({"name": "bad", **cfg})
    assert e.value.key == key


def test_layers_beyond_the_depth_name_the_key(llava_pair):
    pipe = kv_pipe(layers=[1, 7])
    with pytest.raises(ConfigError, match=r"layer 7 is beyond the model's depth: it has 4") as e:
        pipe.attach(llava_pair["sdpa"])
    assert e.value.key == "stages.0.cache.layers"


def test_mllama_refuses_the_kv_cache_site():
    from tokenprune.reference.tiny import tiny_mllama

    with pytest.raises(ConfigError, match="cross_attention"):
        kv_pipe().attach(tiny_mllama())


def test_a_forward_without_a_cache_leaves_the_logits_alone(llava_pair, batch):
    """use_cache=False: nothing is cached, so a kv_cache stage has nothing to cut; the logits are the unpruned
    ones and leaving the block warns that the pipeline never pruned."""
    model = llava_pair["sdpa"]
    with torch.no_grad():
        want = model(**batch, use_cache=False).logits
        with pytest.warns(RuntimeWarning, match="never pruned"), kv_pipe().attach(model):
            got = model(**batch, use_cache=False).logits
    assert torch.equal(got, want)


def test_dynamic_masking_at_every_step_equals_reference(llava_pair, batch):
    """DyCoke's dynamic pruning (``decode: {steps: all, mode: mask}``): at every decoding step layers 2 and 3 see only
    the quarter of the visual entries that the step's token attends to most at layer 1 (heads averaged) — the eager
    model's own attention row on the sequence so far, chosen anew each step, so an entry hidden at one step can
    return — and every entry stays cached. Generation equals the reference that hides, at each step, that step's
    unchosen entries from layers 2-3 only."""
    cache = {"layers": {"from": 2}, "decode": {"steps": "all", "keep": 0.25, "score_layer": 1, "mode": "mask"}}
    pipe = tp.load_pipeline({"name": "dyn", "stages": [{"layer": "kv_cache", "cache": cache, "operators": [
        {"op": "attention", "queries": "last"}, {"op": "topk", "keep": 1.0}]}]})
    out = generate(llava_pair["sdpa"], batch, pipe)
    image = llava_pair["sdpa"].config.image_token_id
    n = batch["input_ids"].shape[1]
    steps = {s: kept_by_layer(pipe, "decode", s) for s in range(1, STEPS)}
    for s, kept in steps.items():
        assert sorted(kept) == [2, 3] and kept[2] == kept[3]
        seq = out.sequences[:, :n + s]  # the step's token last
        am = torch.cat([batch["attention_mask"], torch.ones(2, s, dtype=torch.long)], 1)
        with torch.no_grad():
            att = llava_pair["eager"](input_ids=seq, attention_mask=am, pixel_values=batch["pixel_values"],
                                      output_attentions=True).attentions[1][:, :, -1, :n].float().mean(1)
        for b in range(2):
            vis = (batch["input_ids"][b] == image).nonzero().flatten()
            top = vis[att[b, vis].argsort(descending=True, stable=True)[:16]].tolist()
            assert sorted(i for i in kept[2][b] if batch["input_ids"][b, i] == image) == sorted(top)
            assert len(kept[2][b]) == int(batch["attention_mask"][b].sum()) - 64 + 16  # text and 16 of 64 visual
    assert steps[1][2] != steps[2][2] or steps[2][2] != steps[3][2]  # the choice moves (so entries come back)
    held = out.past_key_values.layers[2].keys.shape[-2]
    assert held == n + STEPS - 1  # nothing evicted
    tokens, ref_logits = reference_kv_greedy(llava_pair["eager"], batch, {}, STEPS, kept_from_step=steps)
    assert_matches_reference(out, tokens, ref_logits)


def test_a_heuristic_scorer_chooses_from_the_attention_history(llava_pair, batch):
    """``decode: {scorer: stage, history: 3}`` with the attention scorer over every history row (SnapKV's window as a
    next-step predictor): decoding step 1 shows each layer the 16 visual entries with the most attention from the
    prompt's last 3 rows, heads and rows averaged — the eager model's own prefill attention, by hand."""
    cache = {"layers": "all", "decode": {"steps": [1], "keep": 16, "mode": "mask", "scorer": "stage", "history": 3}}
    pipe = tp.load_pipeline({"name": "window", "stages": [{"layer": "kv_cache", "cache": cache, "operators": [
        {"op": "attention", "queries": "all"}, {"op": "topk", "keep": 1.0}]}]})
    generate(llava_pair["sdpa"], batch, pipe)
    image = llava_pair["sdpa"].config.image_token_id
    with torch.no_grad():
        att = llava_pair["eager"](**batch, output_attentions=True).attentions
    kept = kept_by_layer(pipe, "decode", 1)
    assert sorted(kept) == [0, 1, 2, 3] and not kept_by_layer(pipe, "decode", 2)  # step 1 only
    for layer, rows in kept.items():
        for b in range(2):
            real = batch["attention_mask"][b].bool().nonzero().flatten()
            mean = att[layer][b][:, real[-3:]].float().mean((0, 1))
            vis = (batch["input_ids"][b] == image).nonzero().flatten()
            top = vis[mean[vis].argsort(descending=True, stable=True)[:16]].tolist()
            assert sorted(i for i in rows[b] if batch["input_ids"][b, i] == image) == sorted(top), (layer, b)
