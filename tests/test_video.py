"""Video inputs (Qwen2-VL, Qwen2.5-VL, Qwen3-VL with its timestamped frames, Qwen3.5): DESIGN.md's oracles 1-4 on a
batch that mixes an image and a video clip and on a batch of two clips of different lengths, against the independent
masked eager reference (tests/reference.py; not for Qwen3.5, whose recurrent layers a mask cannot stand for removal
in: tests/test_qwen3_5.py has its own) or each sample alone; each clip's frames as tiles (per-frame budgets)."""

import functools

import pytest
import torch
from families import assert_sdpa_matches_eager, pair, vision_scores
from reference import reference_greedy, reference_prefill_logits

import tokenprune as tp
from tokenprune.adapters import get_adapter
from tokenprune.reference.tiny import tiny_qwen2_vl_inputs

STEPS = 3
FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"]
#: the families the masked reference stands for
MASKED = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
#: the layer after which the attention-reading stages run (Qwen3.5: after its first attention layer, 3)
SITE = {"qwen3_5": 4}
#: (image grid or None, clip (frames, h, w) or None) per sample
BATCHES = {"image+video": ([(8, 8), (6, 10)], [None, (4, 6, 8)]),  # 16 image tokens; 2 frames x 12
           "two clips": ([(8, 8), (6, 10)], [(6, 4, 4), (4, 6, 8)])}  # 3 frames x 4; 2 frames x 12


@functools.cache
def batch_of(family: str, kind: str) -> dict:
    grids, videos = BATCHES[kind]
    return tiny_qwen2_vl_inputs(pair(family)["sdpa"], grids=grids, videos=videos)


def alone(batch: dict, b: int) -> dict:
    """Sample ``b`` on its own, unpadded, with its own image or clip."""
    valid = batch["attention_mask"][b].bool()
    out = {k: batch[k][b:b + 1, valid] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    types = batch["mm_token_type_ids"]
    for kind, pixels, thw in ((1, "pixel_values", "image_grid_thw"), (2, "pixel_values_videos", "video_grid_thw")):
        if not bool((types[b] == kind).any()):
            continue
        owners = [i for i in range(types.shape[0]) if bool((types[i] == kind).any())]  # samples in order
        k = owners.index(b)
        sizes = batch[thw].prod(-1).tolist()
        start = sum(sizes[:k])
        out[pixels] = batch[pixels][start:start + sizes[k]]
        out[thw] = batch[thw][k:k + 1]
        if kind == 2 and "second_per_grid_ts" in batch:
            out["second_per_grid_ts"] = batch["second_per_grid_ts"][k:k + 1]
    return out


def fastv(keep=0.5, layer=2, family=None, **extra):
    layer = SITE.get(family, layer) if layer == 2 else layer
    ops = [{"op": "attention", "queries": "last"} if layer else {"op": "random", "seed": 3},
           {"op": "topk", "keep": keep}]
    return tp.load_pipeline({"stages": [{"layer": layer, "operators": ops, **extra}]})


def generate(model, batch, **kw):
    return model.generate(**batch, max_new_tokens=STEPS, do_sample=False, **kw)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", list(BATCHES))
def test_keep_everything_is_identical(family, kind):
    """Oracle 1."""
    model, batch = pair(family)["sdpa"], batch_of(family, kind)
    pipe = fastv(keep=1.0, family=family)
    with torch.no_grad():
        ref_logits, ref_gen = model(**batch).logits, generate(model, batch)
        with pipe.attach(model):
            logits, gen = model(**batch).logits, generate(model, batch)
    real = batch["attention_mask"].bool()
    assert torch.equal(logits[real], ref_logits[real])
    assert torch.equal(gen, ref_gen)


@pytest.mark.parametrize("family", MASKED)
@pytest.mark.parametrize("kind", list(BATCHES))
@pytest.mark.parametrize("layer,compact", [(2, False), (2, True), (0, False)])
def test_prefill_and_generation_equal_the_masked_reference(family, kind, layer, compact):
    """Oracle 2: prefill logits of the kept tokens and every generate() step, video tokens pruned like image ones
    (their 3-D positions, temporal axis included, kept)."""
    model, batch = pair(family)["sdpa"], batch_of(family, kind)
    pipe = fastv(layer=layer)
    with torch.no_grad(), pipe.attach(model):
        logits = model(**batch).logits.float()
    kept = pipe.trace[0].kept
    ref = reference_prefill_logits(pair(family)["eager"], batch, layer, kept)
    for b in range(2):
        assert torch.allclose(logits[b, -len(kept[b]):], ref[b, torch.tensor(kept[b])], atol=1e-4)
    ops = [{"op": "attention"} if layer else {"op": "random", "seed": 3}, {"op": "topk", "keep": 0.5}]
    pipe = tp.load_pipeline({"stages": [{"layer": layer, "operators": ops + ([{"op": "kv_compact"}] if compact else [])}]})
    with torch.no_grad(), pipe.attach(model):
        out = generate(model, batch, output_logits=True, return_dict_in_generate=True)
    tokens, ref_logits = reference_greedy(pair(family)["eager"], batch, layer, pipe.trace[0].kept, STEPS,
                                          compact_earlier=compact)
    assert torch.equal(out.sequences[:, -STEPS:], tokens)
    for got, want in zip(out.logits, ref_logits):
        assert torch.allclose(got.float(), want, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", list(BATCHES))
@pytest.mark.parametrize("budget", ["per_image", "per_tile"])
def test_batch_equals_each_sample_alone(family, kind, budget):
    """Oracle 3: samples with an image and a clip, or clips of different lengths (different visual counts), keep
    and generate what they keep and generate alone — also with per-frame budgets."""
    model, batch = pair(family)["sdpa"], batch_of(family, kind)
    pipe = fastv(budget=budget, family=family)
    with torch.no_grad(), pipe.attach(model):
        together = generate(model, batch)[:, -STEPS:]
        trace = pipe.trace[0]
        assert trace.visual_before[0] != trace.visual_before[1]
        for b in range(2):
            gen = generate(model, alone(batch, b))[:, -STEPS:]
            offset = int((batch["attention_mask"][b] == 0).sum())
            assert [i + offset for i in pipe.trace[0].kept[0]] == trace.kept[b]
            assert pipe.trace[0].tiles == ([trace.tiles[b]] if budget == "per_tile" else [])
            assert torch.equal(gen[0], together[b])


@pytest.mark.parametrize("family", FAMILIES)
def test_sdpa_and_eager_agree(family):
    """Oracle 4."""
    assert_sdpa_matches_eager(family, batch_of(family, "two clips"), lambda: fastv(keep=0.25, family=family), STEPS)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_frame_is_a_tile(family):
    """``budget: per_tile`` on video: each frame (temporal patch) of a clip is a tile of its merged grid, an image
    one tile; each keeps its share. Clips of 3 frames of 2x2 tokens and 2 frames of 3x4: keep 0.5 keeps 2 of each
    2x2 frame and 6 of each 3x4 one."""
    model, batch = pair(family)["sdpa"], batch_of(family, "two clips")
    pipe = fastv(budget="per_tile", family=family)
    with torch.no_grad(), pipe.attach(model):
        model(**batch)
    trace = pipe.trace[0]
    assert trace.tiles == [[(2, 2)] * 3, [(3, 4)] * 2]
    assert trace.visual_after == [2 * 3, 6 * 2]
    visual = batch["input_ids"] == model.config.video_token_id
    for b, frames in enumerate(([4] * 3, [12] * 2)):
        idx = visual[b].nonzero().flatten()
        kept = set(trace.kept[b])
        start = 0
        for n in frames:  # each frame's tokens are a run of the clip's placeholders
            assert sum(int(i) in kept for i in idx[start:start + n]) == n // 2
            start += n


def test_temporal_change_by_hand():
    """Two frames of a 2x2 clip and an image token: the first frame and the image score 3; in the second frame a
    static cell 0, a cell that turned to its opposite 2, an orthogonal one 1, a scaled copy 0 (cosine ignores
    length). topk keeps the first frame, the image and the two changed cells."""
    from tokenprune.core.registry import registered_operators
    from tokenprune.core.state import TokenState

    e = torch.eye(4)
    first = [e[0], e[1], e[2], e[3]]
    second = [e[0], -e[1], e[0] + 0 * e[2], 2 * e[3]]  # static, opposite, orthogonal to e2, scaled
    image = [e[2]]
    hidden = torch.stack(first + second + image)[None]  # (1, 9, 4)
    state = TokenState.from_tensors(hidden, torch.ones(1, 9, dtype=torch.bool), layer=0)
    state.tiles = torch.tensor([[0] * 4 + [1] * 4 + [2]])
    state.tile_grids = [[(2, 2), (2, 2), (1, 1)]]
    state.frames = torch.tensor([[0] * 4 + [1] * 4 + [0]])
    state.cells = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 0]])
    scorer = registered_operators()["temporal_change"](registered_operators()["temporal_change"].parse_params({}))
    scores = scorer.score(state)
    assert scores.tolist() == [[3, 3, 3, 3, 0, 2, 1, 0, 3]]
    state.frames[0, 4:8] = torch.tensor([1, 1, 1, 1])
    state.tiles[0, 4] = 5  # a cell whose previous frame is gone (no tile 4): nothing to compare, kept first
    assert scorer.score(state)[0, 4] == 3


@pytest.mark.parametrize("family", FAMILIES)
def test_frames_and_cells_come_from_the_positions(family):
    """Clips of 3 frames of 2x2 tokens and 2 frames of 3x4, with an image before the first clip's sample: each
    token's frame within its clip and its raster cell within the frame, as the runtime hands them to an operator."""
    from tokenprune.core.operator import TokenOperator

    seen = {}

    class Spy(TokenOperator):
        kind, op_name, needs_frames = "scorer", "spy", True

        def forward(self, state):
            seen["state"] = state
            return state

    model = pair(family)["sdpa"]
    batch = tiny_qwen2_vl_inputs(model, grids=[(4, 4), (6, 10)], videos=[(6, 4, 4), (4, 6, 8)])
    pipe = fastv(layer=0, keep=1.0)
    pipe.stages[0].operators.insert(0, Spy())
    with torch.no_grad(), pipe.attach(model):
        model(**batch)
    state = seen["state"]
    visual = state.visual_mask
    assert state.frames[0][visual[0]].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert state.cells[0][visual[0]].tolist() == list(range(4)) * 3
    assert state.frames[1][visual[1]].tolist() == [0] * 12 + [1] * 12
    assert state.cells[1][visual[1]].tolist() == list(range(12)) * 2
    assert bool((state.frames[~visual] == -1).all())


@pytest.mark.parametrize("family", MASKED)
def test_static_patches_keeps_the_first_frame_and_the_changed_cells(family):
    """The ``static_patches`` preset on a clip whose second frame repeats the first except in one cell: the first
    frame and that cell are kept, the static cells (changed only through the tower's attention to the new cell)
    dropped — and generate() equals the masked reference."""
    model = pair(family)["sdpa"]
    batch = tiny_qwen2_vl_inputs(model, grids=[(4, 4)], videos=[(4, 4, 4)], prompts=[[10, 11, 12]])
    # patch rows as the processor orders them: frame, then merged token (2x2 grid), then its 2x2 patches
    pixels = batch["pixel_values_videos"].view(2, 4, 4, -1).clone()  # (temporal patch, token, patch, values)
    pixels[1] = pixels[0]
    pixels[1, 3] = torch.randn(4, pixels.shape[-1], generator=torch.Generator().manual_seed(5))  # token 3 changes
    batch["pixel_values_videos"] = pixels.reshape(32, -1)
    pipe = tp.load_pipeline("static_patches", ["stages.0.operators.1.keep=5"])
    with torch.no_grad(), pipe.attach(model):
        out = generate(model, batch, output_logits=True, return_dict_in_generate=True)
    visual = (batch["input_ids"][0] == model.config.video_token_id).nonzero().flatten().tolist()
    kept = [i for i in pipe.trace[0].kept[0] if i in visual]
    assert kept == visual[:4] + [visual[4 + 3]]
    tokens, ref_logits = reference_greedy(pair(family)["eager"], batch, 0, pipe.trace[0].kept, STEPS)
    assert torch.equal(out.sequences[:, -STEPS:], tokens)
    for got, want in zip(out.logits, ref_logits):
        assert torch.allclose(got.float(), want, atol=1e-4)


def test_temporal_windows_by_hand():
    """DyCoke's temporal merging on a 5-frame clip of 2x2 cells, keep 0.5 (2 cells of a compared frame): frame 0
    whole; frame 1 against frame 0, frame 2 against frame 0, frame 3 against frame 2 (the least similar two cells
    kept); frame 4 starts the next window, whole. An image token stays."""
    from tokenprune.core.registry import registered_operators
    from tokenprune.core.state import TokenState

    e = torch.eye(4)
    frames = [[e[0], e[1], e[2], e[3]],
              [e[0], -e[1], e[0], 2 * e[3]],  # vs frame 0: similarities 1, -1, 0, 1 -> cells 1, 2
              [e[0], e[1], -e[2], e[0]],  # vs frame 0: 1, 1, -1, 0 -> cells 2, 3
              [-e[0], e[1], -e[2], e[3]],  # vs frame 2 (e0, e1, -e2, e0): -1, 1, 1, 0 -> cells 0, 3
              [e[0], e[0], e[0], e[0]]]  # a new window: whole
    hidden = torch.stack([v for f in frames for v in f] + [e[1]])[None]  # (1, 21, 4)
    state = TokenState.from_tensors(hidden, torch.ones(1, 21, dtype=torch.bool), layer=0)
    state.tiles = torch.tensor([[f for f in range(5) for _ in range(4)] + [5]])
    state.tile_grids = [[(2, 2)] * 5 + [(1, 1)]]
    state.frames = torch.tensor([[f for f in range(5) for _ in range(4)] + [0]])
    state.cells = torch.tensor([[0, 1, 2, 3] * 5 + [0]])
    cls = registered_operators()["temporal_windows"]
    keep = cls(cls.parse_params({"keep": 0.5})).select(state)[0]
    expect = [0, 1, 2, 3] + [4 + 1, 4 + 2] + [8 + 2, 8 + 3] + [12 + 0, 12 + 3] + [16, 17, 18, 19] + [20]
    assert keep.nonzero().flatten().tolist() == expect


@pytest.mark.parametrize("family", MASKED)
def test_temporal_windows_keep_their_share_of_each_frame_and_generate_as_the_reference(family):
    """Before the LLM on a 3-frame clip of 3x4 tokens (and an image in the other sample): frame 0 whole, frames 1
    and 2 keep int(0.3 x 12) = 3 cells each; generate() equals the masked reference."""
    model = pair(family)["sdpa"]
    batch = tiny_qwen2_vl_inputs(model, grids=[(8, 8), (6, 8)], videos=[None, (6, 6, 8)])
    pipe = tp.load_pipeline({"stages": [{"layer": 0, "operators": [{"op": "temporal_windows", "keep": 0.3}]}]})
    with torch.no_grad(), pipe.attach(model):
        out = generate(model, batch, output_logits=True, return_dict_in_generate=True)
    trace = pipe.trace[0]
    assert trace.visual_after == [16, 12 + 3 + 3]
    tokens, ref_logits = reference_greedy(pair(family)["eager"], batch, 0, trace.kept, STEPS)
    assert torch.equal(out.sequences[:, -STEPS:], tokens)
    for got, want in zip(out.logits, ref_logits):
        assert torch.allclose(got.float(), want, atol=1e-4)


@pytest.mark.parametrize("family", MASKED)
def test_dycoke_generates_as_the_reference(family):
    """The ``dycoke`` preset on a 4-frame clip of 3x4 tokens beside an image: temporal merging before the LLM (each
    compared frame keeps int(0.7 x 12) = 8 cells), then at every decoding step layer 3 sees the fifth of the kept
    visual entries that the step's token attends to most at layer 2. generate() equals the masked reference: every
    layer without the merged-away tokens from the prefill on, layer 3 also without that step's unchosen ones."""
    from reference import masked_greedy, pruned_columns

    model = pair(family)["sdpa"]
    batch = tiny_qwen2_vl_inputs(model, grids=[(8, 8), (6, 8)], videos=[None, (8, 6, 8)])
    pipe = tp.load_pipeline("dycoke")
    with torch.no_grad(), pipe.attach(model):
        out = generate(model, batch, output_logits=True, return_dict_in_generate=True)
    merged = pipe.trace[0]
    assert merged.visual_after == [16, 12 + 8 + 8 + 8]
    am = batch["attention_mask"]
    base = pruned_columns(am.shape[1], merged.kept, am)
    chosen = {t.step: pruned_columns(am.shape[1], t.kept, am) for t in pipe.trace if t.site == "decode"}
    assert sorted(chosen) == [1, 2] and all(t.layer == 3 for t in pipe.trace if t.site == "decode")
    prefill = {layer: base for layer in range(4)}
    tokens, ref_logits = masked_greedy(pair(family)["eager"], batch, STEPS, prefill,
                                       lambda step: {0: base, 1: base, 2: base, 3: base | chosen[step]})
    assert torch.equal(out.sequences[:, -STEPS:], tokens)
    for got, want in zip(out.logits, ref_logits):
        assert torch.allclose(got.float(), want, atol=1e-4)


@pytest.mark.parametrize("family", MASKED)
def test_fastvid_runs_on_clips_with_its_budgets(family, monkeypatch):
    """The ``fastvid`` preset on two clips through generate(), the model's eager attention never running: a clip of
    three 2x2 frames is cut at every transition (7 cuts allowed), each frame a segment keeping int(4 x 0.27) = 1
    token, a contextual one; a clip of two 4x4 frames keeps int(16 x 0.27) = 4 per frame (3 salient, 1
    contextual)."""
    import importlib

    def eager(*args, **kwargs):
        raise AssertionError("eager attention ran")

    for name in ("qwen2", "qwen2_vl", "qwen2_5_vl", "qwen3", "qwen3_vl"):
        monkeypatch.setattr(importlib.import_module(f"transformers.models.{name}.modeling_{name}"),
                            "eager_attention_forward", eager, raising=False)
    model = pair(family)["sdpa"]
    batch = tiny_qwen2_vl_inputs(model, grids=[(8, 8), (8, 8)], videos=[(6, 4, 4), (4, 8, 8)])
    pipe = tp.load_pipeline("fastvid")
    with torch.no_grad(), pipe.attach(model):
        out = generate(model, batch)
    assert out.shape[1] == batch["input_ids"].shape[1] + STEPS
    assert pipe.trace[0].visual_after == [3, 8]


@pytest.mark.parametrize("family", MASKED)
def test_prunevid_merges_static_cells_and_prunes_in_the_llm(family):
    """The ``prunevid`` preset (its in-LLM stage at layer 2 of the tiny model) on two clips through generate(): a
    clip whose two temporal patches repeat is one segment whose 16 cells are all static (one token each: 16 cells
    > 14, so clustered into 8 means); the other, random, keeps its 2 x 16 dynamic tokens clustered into 8 a frame.
    After layer 1 each frame keeps int(0.4 x its tokens), and every earlier layer's cache holds only what stays."""
    model = pair(family)["sdpa"]
    batch = tiny_qwen2_vl_inputs(model, grids=[(8, 8), (8, 8)], videos=[(4, 8, 8), (4, 8, 8)])
    pixels = batch["pixel_values_videos"].view(2, 2, 16, 4, -1).clone()  # (clip, temporal patch, token, patch, .)
    pixels[0, 1] = pixels[0, 0]  # clip 0: the second temporal patch repeats the first
    batch["pixel_values_videos"] = pixels.reshape(2 * 2 * 64, -1)
    pipe = tp.load_pipeline("prunevid", ["stages.1.layer=2"])
    with torch.no_grad(), pipe.attach(model):
        out = generate(model, batch, return_dict_in_generate=True)
    merged, selected = pipe.trace[0], pipe.trace[1]
    assert merged.visual_after == [8, 16]
    assert selected.visual_after == [int(0.4 * 8), 2 * int(0.4 * 8)]
    held = [out.past_key_values.layers[layer].keys.shape[-2] for layer in range(4)]
    assert len(set(held)) == 1  # layers 0 and 1 cut to what layers 2 and 3 cached


@pytest.mark.parametrize("family", MASKED)
def test_holitom_video_merges_static_cells_before_and_tokens_inside_the_llm(family):
    """The ``holitom_video`` preset (its in-LLM merge at layer 2 of the tiny model) on two clips through generate():
    a clip whose two temporal patches repeat is one window, all 16 cells static (16 of 32 tokens saved), so
    r = 0.15 x 32 / 16 = 0.3 and round(16 x 0.3) = 5 cluster centres stay; the other, random, keeps ceil(16 x 0.15)
    = 3 of each frame's 16 dynamic tokens. Inside the LLM half of each sample's visual tokens are merged away."""
    model = pair(family)["sdpa"]
    batch = tiny_qwen2_vl_inputs(model, grids=[(8, 8), (8, 8)], videos=[(4, 8, 8), (4, 8, 8)])
    pixels = batch["pixel_values_videos"].view(2, 2, 16, 4, -1).clone()  # (clip, temporal patch, token, patch, .)
    pixels[0, 1] = pixels[0, 0]
    batch["pixel_values_videos"] = pixels.reshape(2 * 2 * 64, -1)
    pipe = tp.load_pipeline("holitom_video", ["stages.1.layer=2"])
    with torch.no_grad(), pipe.attach(model):
        out = generate(model, batch)
    assert out.shape[1] == batch["input_ids"].shape[1] + STEPS
    temporal, inner = pipe.trace[0], pipe.trace[1]
    assert temporal.visual_after == [5, 6]
    assert inner.visual_after == [round(5 * 0.5 + 0.01), 3]


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_signals_of_a_batch_of_images_and_clips_are_each_sample_alones(family):
    """The forward runs the tower on the images, then on the clips; the two calls are joined, so every visual
    token's signal is the one its sample gets alone (a call of its image or of its clip only)."""
    model, batch = pair(family)["sdpa"], batch_of(family, "image+video")
    together = vision_scores(model, batch, 0)
    visual = get_adapter(model).visual_mask(batch["input_ids"])
    for b in range(2):
        own = alone(batch, b)
        mine = vision_scores(model, own, 0)[0][get_adapter(model).visual_mask(own["input_ids"])[0]]
        assert mine.numel() > 0
        assert torch.allclose(together[b][visual[b]], mine, atol=1e-6)


@pytest.mark.parametrize("family", MASKED)
def test_fastvid_runs_on_a_batch_of_images_and_clips(family, monkeypatch):
    """fastvid ranks by the tower's attention, now joined over the forward's two tower calls."""
    import importlib

    def eager(*args, **kwargs):
        raise AssertionError("eager attention ran")

    for name in ("qwen2", "qwen2_vl", "qwen2_5_vl", "qwen3", "qwen3_vl"):
        monkeypatch.setattr(importlib.import_module(f"transformers.models.{name}.modeling_{name}"),
                            "eager_attention_forward", eager, raising=False)
    model, batch = pair(family)["sdpa"], batch_of(family, "image+video")
    pipe = tp.load_pipeline("fastvid")
    with torch.no_grad(), pipe.attach(model):
        out = generate(model, batch)
    assert out.shape[1] == batch["input_ids"].shape[1] + STEPS
    assert all(a < b for a, b in zip(pipe.trace[0].visual_after, pipe.trace[0].visual_before))
