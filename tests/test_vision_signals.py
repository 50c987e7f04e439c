"""Vision-tower signals (CLS attention, vision keys) at the layer-0 site, against the eager tower's own
attention maps and hidden states, and the layer-0 site end to end (a VisionZip-style selection)."""

import pytest
import torch
from families import next_packed_rows
from families import pair as family_pair
from reference import capture_state, reference_greedy

import tokenprune as tp
from tokenprune.core.errors import ConfigError

STEPS = 3


def eager_tower(llava_pair, batch):
    tower = llava_pair["eager"].model.vision_tower
    with torch.no_grad():
        return tower(batch["pixel_values"], output_attentions=True, output_hidden_states=True)


@pytest.mark.parametrize("layer", [-2, 0, 1])
@pytest.mark.parametrize("heads", ["mean", "sum"])
def test_cls_attention_equals_the_eager_towers_attention_map(llava_pair, batch, layer, heads):
    """The SDPA model's recomputed CLS row equals the eager tower's attention weights (CLS query,
    patch keys), laid out on each sample's visual tokens in order; 0 on text tokens."""
    state, _ = capture_state(llava_pair["sdpa"], batch, {"layer": 0, "operators": [
        {"op": "random"}, {"op": "topk", "keep": 1.0}]})
    got = state.signals.vision_cls_attention(layer=layer, heads=heads)
    att = eager_tower(llava_pair, batch).attentions[layer][:, :, 0, 1:].float()  # (images, H, 64)
    want = att.mean(1) if heads == "mean" else att.sum(1)
    visual = batch["input_ids"] == llava_pair["sdpa"].config.image_token_id
    for b in range(2):
        assert torch.allclose(got[b][visual[b]], want[b], atol=1e-5)
        assert bool((got[b][~visual[b]] == 0).all())


def test_vision_keys_equal_keys_of_the_towers_hidden_states(llava_pair, batch):
    state, _ = capture_state(llava_pair["sdpa"], batch, {"layer": 0, "operators": [
        {"op": "random"}, {"op": "topk", "keep": 1.0}]})
    keys = state.signals.vision_keys(layer=1)  # (B, N, H, hd)
    tower = llava_pair["eager"].model.vision_tower
    block = getattr(tower, "vision_model", tower).encoder.layers[1]
    h_in = eager_tower(llava_pair, batch).hidden_states[1]  # input of encoder layer 1
    with torch.no_grad():
        k = block.self_attn.k_proj(block.layer_norm1(h_in))[:, 1:]  # (images, 64, H*hd), CLS dropped
    visual = batch["input_ids"] == llava_pair["sdpa"].config.image_token_id
    for b in range(2):
        assert torch.allclose(keys[b][visual[b]].flatten(1), k[b], atol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_cls_attention_topk_before_the_llm_equals_reference(llava_pair, batch, impl):
    """A VisionZip-style dominant-token selection at layer 0: picks the eager tower's top CLS-attention
    patches, and stock generate() equals the masked reference with every layer caching only them."""
    model = llava_pair[impl]
    pipe = tp.load_pipeline({"stages": [{"layer": 0, "positions": "keep", "operators": [
        {"op": "cls_attention", "layer": -2}, {"op": "topk", "keep": 16}]}]})
    with torch.no_grad(), pipe.attach(model):
        out = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    kept = pipe.trace[0].kept
    att = eager_tower(llava_pair, batch).attentions[-2][:, :, 0, 1:].float().mean(1)
    visual = batch["input_ids"] == model.config.image_token_id
    for b in range(2):
        vis_idx = visual[b].nonzero().flatten()
        top = set(vis_idx[att[b].argsort(descending=True, stable=True)[:16]].tolist())
        assert set(kept[b]) & set(vis_idx.tolist()) == top
    tokens, ref_logits = reference_greedy(llava_pair["eager"], batch, 0, kept, STEPS)
    assert torch.equal(out.sequences[:, -STEPS:], tokens)
    for got, want in zip(out.logits, ref_logits):
        assert torch.allclose(got.float(), want, atol=1e-4)


def test_vision_layer_out_of_range_is_named(llava_pair, batch):
    pipe = tp.load_pipeline({"stages": [{"layer": 0, "operators": [
        {"op": "cls_attention", "layer": 5}, {"op": "topk", "keep": 0.5}]}]})
    with pytest.raises(ValueError, match=r"vision layer 5 does not exist: the tower has 2 layers \(allowed: -2\.\.1\)"):
        with torch.no_grad(), pipe.attach(llava_pair["sdpa"]):
            llava_pair["sdpa"](**batch)


def test_a_tower_that_packs_cls_features_refuses_at_attach():
    from tokenprune.reference.tiny import tiny_llava_next

    model = tiny_llava_next("sdpa", layers=2)
    model.config.vision_feature_select_strategy = "full"
    pipe = tp.load_pipeline({"stages": [{"layer": 0, "operators": [
        {"op": "cls_attention"}, {"op": "topk", "keep": 0.5}]}]})
    with pytest.raises(ConfigError, match=r"stages\.0\.operators\.0\.op: 'cls_attention' needs vision-tower "
                                          r"signals, which LLaVA-NeXT cannot give: vision_feature_select_strategy"):
        pipe.attach(model)


# --- LLaVA-NeXT: per patch of each tile, laid out as the model packs its features ----------------

@pytest.fixture(scope="module")
def next_pair():
    """A tiny LLaVA-NeXT (SDPA and eager, same weights) and a batch of a tall and a wide image: different anyres
    grids, both unpadded (so the crop offsets matter), and different visual-token counts."""
    pair = family_pair("llava_next")
    from tokenprune.reference.tiny import tiny_llava_next_inputs

    return pair, tiny_llava_next_inputs(pair["sdpa"], image_sizes=[(100, 60), (50, 110)])


def next_tower(model, batch, tiles):
    pixels = torch.cat([pv[:t] for pv, t in zip(batch["pixel_values"], tiles)])
    with torch.no_grad():
        return model.model.vision_tower(pixels, output_attentions=True, output_hidden_states=True)


@pytest.mark.parametrize("layer", [-2, 1])
def test_next_cls_attention_is_each_tiles_map_laid_out_as_the_model_packs(next_pair, layer):
    """Every visual token reads its tile's eager CLS attention to its patch, at the cell the model's own feature
    packing puts it (base tile, then the unpadded anyres grid); newline tokens read 0, as text does."""
    pair, batch = next_pair
    state, _ = capture_state(pair["sdpa"], batch, {"layer": 0, "operators": [
        {"op": "random"}, {"op": "topk", "keep": 1.0}]})
    rows, tiles = next_packed_rows(pair["sdpa"], batch)
    out = next_tower(pair["eager"], batch, tiles)
    att = out.attentions[layer][:, :, 0, 1:].float().mean(1).flatten()  # (tiles*patches,) heads averaged
    visual = batch["input_ids"] == pair["sdpa"].config.image_token_id
    got = state.signals.vision_cls_attention(layer=layer, heads="mean")[visual]
    assert got.numel() == rows.numel() and bool((rows == -1).any())
    assert torch.allclose(got[rows >= 0], att[rows[rows >= 0]], atol=1e-5)
    assert bool((got[rows < 0] == 0).all())
    keys = state.signals.vision_keys(layer=1)[visual].flatten(1)  # (visual tokens, H*hd)
    tower = pair["eager"].model.vision_tower
    block = getattr(tower, "vision_model", tower).encoder.layers[1]
    with torch.no_grad():
        k = block.self_attn.k_proj(block.layer_norm1(out.hidden_states[1]))[:, 1:].flatten(0, 1)
    assert torch.allclose(keys[rows >= 0], k[rows[rows >= 0]], atol=1e-5)


def test_next_dominant_tokens_under_generate_equal_the_reference(next_pair):
    """A VisionZip-style selection on LLaVA-NeXT inside generate() (which encodes the images before the prefill):
    the eager tower's top CLS-attention patches are kept, and decoding equals the masked reference."""
    pair, batch = next_pair
    model = pair["sdpa"]
    pipe = tp.load_pipeline({"stages": [{"layer": 0, "protect": ["image_newline"], "operators": [
        {"op": "cls_attention", "layer": -2}, {"op": "topk", "keep": 40}]}]})
    with torch.no_grad(), pipe.attach(model):
        out = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    assert "get_image_features" not in model.model.__dict__  # the wrapper is gone with the pipeline
    rows, tiles = next_packed_rows(model, batch)
    att = next_tower(pair["eager"], batch, tiles).attentions[-2][:, :, 0, 1:].float().mean(1).flatten()
    visual = batch["input_ids"] == model.config.image_token_id
    counts = visual.sum(1).tolist()
    for b, r in enumerate(rows.split(counts)):
        vis_idx = visual[b].nonzero().flatten()
        patch = r >= 0
        order = att[r[patch]].argsort(descending=True, stable=True)[:40]
        want = set(vis_idx[patch][order].tolist()) | set(vis_idx[~patch].tolist())  # newlines protected
        assert set(pipe.trace[0].kept[b]) & set(vis_idx.tolist()) == want
    tokens, ref_logits = reference_greedy(pair["eager"], batch, 0, pipe.trace[0].kept, STEPS)
    assert torch.equal(out.sequences[:, -STEPS:], tokens)
    for got, want in zip(out.logits, ref_logits):
        assert torch.allclose(got.float(), want, atol=1e-4)


# --- Qwen2-VL / Qwen2.5-VL: attention received, per merged 2x2 block ---------------------------

@pytest.fixture(scope="module", params=["2", "2.5", "3.5"])
def qwen_deep(request):
    """A tiny Qwen2-VL / Qwen2.5-VL / Qwen3.5 with a 4-block tower (2.5: full attention in blocks 1 and 3, 2x2-token
    windows elsewhere; 3.5: Qwen3-VL's tower, learned position embeddings), SDPA and eager with the same weights, and
    a batch whose two images have different grids."""
    from tokenprune.reference.tiny import tiny_qwen2_vl, tiny_qwen2_vl_inputs, tiny_qwen3_5

    if request.param == "3.5":
        sdpa, eager = (tiny_qwen3_5(impl, layers=4, vision_layers=4) for impl in ("sdpa", "eager"))
    else:
        sdpa, eager = (tiny_qwen2_vl(impl, layers=2, version=request.param, vision_layers=4) for impl in ("sdpa", "eager"))
    eager.load_state_dict(sdpa.state_dict())
    return request.param, sdpa, eager, tiny_qwen2_vl_inputs(sdpa, grids=[(8, 8), (4, 12)])


def eager_qwen_attention(monkeypatch, model, batch):
    """The eager tower's own attention probabilities: {block: [one map per segment it attends within]}."""
    import importlib

    name = model.config.model_type if model.config.model_type in ("qwen2_5_vl", "qwen3_5") else "qwen2_vl"
    module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    stock, calls, running = module.eager_attention_forward, {}, []

    def recording(*args, **kwargs):
        out, weights = stock(*args, **kwargs)
        calls.setdefault(running[-1], []).append(weights.detach().float())
        return out, weights

    monkeypatch.setattr(module, "eager_attention_forward", recording)
    handles = [blk.register_forward_pre_hook(lambda m, a, i=i: running.append(i))
               for i, blk in enumerate(model.model.visual.blocks)]
    with torch.no_grad():
        model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
    for h in handles:
        h.remove()
    return calls


def qwen_reference(model, calls, batch, block):
    """Per LLM visual token (images in order), the attention its 2x2 patches receive at ``block`` (mean over the
    image's query patches, summed over the 4 patches), read off the eager maps: (tokens, H)."""
    grids = batch["image_grid_thw"].tolist()
    full = getattr(model.config.vision_config, "fullatt_block_indexes", None)
    assert full is None or block in full
    maps = calls[block]
    assert len(maps) == len(grids)  # a full-attention block attends within each image
    rows = torch.cat([m[0].mean(1).T for m in maps])  # (patches, H) in the tower's order
    units = rows.view(-1, 4, rows.shape[-1])
    if full is not None:  # undo Qwen2.5-VL's window order with the model's own window index
        from transformers.vision_utils import get_vision_window_index

        v = model.config.vision_config
        index, _ = get_vision_window_index(batch["image_grid_thw"], v.spatial_merge_size, v.window_size, v.patch_size)
        units = units[torch.argsort(index)]
    return units.sum(1)


@pytest.mark.parametrize("layer,block", [(0, 0), (1, 1), (-2, 2), (3, 3)])
def test_qwen_received_attention_equals_the_eager_towers_maps(qwen_deep, monkeypatch, layer, block):
    version, sdpa, eager, batch = qwen_deep
    if version == "2.5":
        block = {0: 1, 1: 1, 2: 3, 3: 3}[block]  # a windowed block reads the next full-attention block
    state, _ = capture_state(sdpa, batch, {"layer": 0, "operators": [{"op": "random"}, {"op": "topk", "keep": 1.0}]})
    want = qwen_reference(eager, eager_qwen_attention(monkeypatch, eager, batch), batch, block)
    visual = batch["input_ids"] == sdpa.config.image_token_id
    got_mean = state.signals.vision_cls_attention(layer=layer, heads="mean")
    got_sum = state.signals.vision_cls_attention(layer=layer, heads="sum")
    counts = visual.sum(1).tolist()
    assert counts == [16, 12]
    for b, rows in enumerate(want.split(counts)):
        assert torch.allclose(got_mean[b][visual[b]], rows.mean(-1), atol=1e-5)
        assert torch.allclose(got_sum[b][visual[b]], rows.sum(-1), atol=1e-5)
        assert bool((got_mean[b][~visual[b]] == 0).all())
    assert torch.allclose(got_mean[visual].sum(), torch.tensor(2.0))  # each image's map sums to 1


def test_qwen_vision_keys_are_the_patch_keys_averaged_per_merged_token(qwen_deep):
    version, sdpa, eager, batch = qwen_deep
    state, _ = capture_state(sdpa, batch, {"layer": 0, "operators": [{"op": "random"}, {"op": "topk", "keep": 1.0}]})
    keys = state.signals.vision_keys(layer=1)  # (B, N, H, hd); block 1 attends over the whole image in both
    tower = eager.model.visual
    seen = {}

    def hook(module, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]

    handle = tower.blocks[1].register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        tower(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
        handle.remove()
        block = tower.blocks[1]
        width = block.attn.qkv.out_features // 3
        k = block.attn.qkv(block.norm1(seen["h"]))[:, width:2 * width]  # (q, k, v) stacked: the keys
    units = k.view(-1, 4, k.shape[-1])
    if version == "2.5":
        from transformers.vision_utils import get_vision_window_index

        v = eager.config.vision_config
        index, _ = get_vision_window_index(batch["image_grid_thw"], v.spatial_merge_size, v.window_size, v.patch_size)
        units = units[torch.argsort(index)]
    want = units.mean(1)
    visual = batch["input_ids"] == sdpa.config.image_token_id
    assert torch.allclose(torch.cat([keys[b][visual[b]].flatten(1) for b in range(2)]), want, atol=1e-5)


def test_fastervlm_keeps_the_top_of_the_eager_towers_cls_row(llava_pair, batch):
    """The ``fastervlm`` preset keeps the visual tokens whose patches the eager tower's [CLS] row ranks highest at
    layer -2 (heads averaged): round(0.1 x 64) = 6 per sample, every text token kept."""
    att = eager_tower(llava_pair, batch).attentions[-2][:, :, 0, 1:].float().mean(1)  # (B, 64)
    pipe = tp.load_pipeline("fastervlm")
    with torch.no_grad(), pipe.attach(llava_pair["sdpa"]):
        llava_pair["sdpa"](**batch)
    visual = batch["input_ids"] == llava_pair["sdpa"].config.image_token_id
    for b in range(2):
        idx = visual[b].nonzero().flatten()
        top = idx[att[b].argsort(descending=True, stable=True)[:6]].tolist()
        kept = pipe.trace[0].kept[b]
        assert sorted(i for i in kept if visual[b, i]) == sorted(top)
        assert len(kept) == int(batch["attention_mask"][b].sum()) - 64 + 6
