"""LLaVA-OneVision videos: each frame's pooled tokens a tile, a clip's frames consecutive tiles closed by a newline
token; DESIGN.md's oracles on a batch of an image and a clip per sample and on a batch of two clips, against the
independent masked eager reference (tests/reference.py) and each sample alone; the temporal operators on its
frames."""

import functools

import pytest
import torch
from families import pair, vision_scores
from reference import reference_greedy, reference_prefill_logits

import tokenprune as tp
from tokenprune.reference.tiny import tiny_llava_onevision_inputs

STEPS = 3
#: per batch: image sizes (None: the default image per sample; []: no images) and frames per sample
BATCHES = {"image+video": (None, [2, 2]), "two clips": ([], [3, 3])}


@functools.cache
def batch_of(kind: str) -> dict:
    sizes, videos = BATCHES[kind]
    return tiny_llava_onevision_inputs(pair("llava_onevision")["sdpa"], image_sizes=sizes, videos=videos)


def alone(batch: dict, b: int) -> dict:
    """Sample ``b`` with its own image and clip, unpadded."""
    valid = batch["attention_mask"][b].bool()
    out = {k: batch[k][b:b + 1, valid] for k in ("input_ids", "attention_mask")}
    out["pixel_values_videos"] = batch["pixel_values_videos"][b:b + 1]
    if "pixel_values" in batch:
        out["pixel_values"], out["image_sizes"] = batch["pixel_values"][b:b + 1], batch["image_sizes"][b:b + 1]
    return out


def pipeline(layer=2, keep=0.5, **extra):
    ops = [{"op": "attention", "queries": "last"} if layer else {"op": "random", "seed": 3},
           {"op": "topk", "keep": keep}]
    return tp.load_pipeline({"stages": [{"layer": layer, "operators": ops, **extra}]})


def generate(model, batch, **kw):
    return model.generate(**batch, max_new_tokens=STEPS, do_sample=False, **kw)


@pytest.mark.parametrize("kind", list(BATCHES))
def test_keep_everything_is_identical(kind):
    model, batch = pair("llava_onevision")["sdpa"], batch_of(kind)
    with torch.no_grad():
        ref_logits, ref_gen = model(**batch).logits, generate(model, batch)
        with pipeline(keep=1.0).attach(model):
            logits, gen = model(**batch).logits, generate(model, batch)
    real = batch["attention_mask"].bool()
    assert torch.equal(logits[real], ref_logits[real]) and torch.equal(gen, ref_gen)


@pytest.mark.parametrize("kind", list(BATCHES))
@pytest.mark.parametrize("layer,budget", [(2, "per_image"), (2, "per_tile"), (0, "per_tile")])
def test_prefill_and_generation_equal_the_masked_reference(kind, layer, budget):
    model = pair("llava_onevision")["sdpa"]
    batch = batch_of(kind)
    pipe = pipeline(layer=layer, budget=budget)
    with torch.no_grad(), pipe.attach(model):
        logits = model(**batch).logits.float()
    kept = pipe.trace[0].kept
    ref = reference_prefill_logits(pair("llava_onevision")["eager"], batch, layer, kept)
    for b in range(2):
        assert torch.allclose(logits[b, -len(kept[b]):], ref[b, torch.tensor(kept[b])], atol=1e-4)
    pipe = pipeline(layer=layer, budget=budget)
    with torch.no_grad(), pipe.attach(model):
        out = generate(model, batch, output_logits=True, return_dict_in_generate=True)
    tokens, ref_logits = reference_greedy(pair("llava_onevision")["eager"], batch, layer, pipe.trace[0].kept, STEPS)
    assert torch.equal(out.sequences[:, -STEPS:], tokens)
    for got, want in zip(out.logits, ref_logits):
        assert torch.allclose(got.float(), want, atol=1e-4)


@pytest.mark.parametrize("kind", list(BATCHES))
def test_batch_equals_each_sample_alone(kind):
    model, batch = pair("llava_onevision")["sdpa"], batch_of(kind)
    pipe = pipeline(budget="per_tile")
    with torch.no_grad(), pipe.attach(model):
        together = generate(model, batch)[:, -STEPS:]
        trace = pipe.trace[0]
        for b in range(2):
            gen = generate(model, alone(batch, b))[:, -STEPS:]
            offset = int((batch["attention_mask"][b] == 0).sum())
            assert [i + offset for i in pipe.trace[0].kept[0]] == trace.kept[b]
            assert pipe.trace[0].tiles == [trace.tiles[b]]
            assert torch.equal(gen[0], together[b])


def test_each_frame_is_a_tile_and_the_closing_newline_stays():
    """Two clips of 3 frames: each frame 4x4 pooled tokens (the 8x8 patch grid halved), then one newline token.
    keep 0.25 per tile: 4 of each frame's 16, and the newline (in no tile) stays: 13 of 49 each."""
    model, batch = pair("llava_onevision")["sdpa"], batch_of("two clips")
    pipe = pipeline(budget="per_tile", keep=0.25)
    with torch.no_grad(), pipe.attach(model):
        model(**batch)
    trace = pipe.trace[0]
    assert trace.tiles == [[(4, 4)] * 3, [(4, 4)] * 3] and trace.visual_after == [13, 13]
    video = batch["input_ids"] == model.config.video_token_id
    for b in range(2):
        idx = video[b].nonzero().flatten()
        kept = set(trace.kept[b])
        assert [sum(int(i) in kept for i in idx[16 * f:16 * f + 16]) for f in range(3)] == [4, 4, 4]
        assert int(idx[-1]) in kept  # the clip's newline


def test_frames_come_from_the_clips_and_images_are_frame_zero():
    """What needs_frames operators read: an image's tiles are frame 0 (its newlines in no frame), a clip's frames
    0, 1, ... in order, its closing newline in none."""
    model, batch = pair("llava_onevision")["sdpa"], batch_of("image+video")
    seen = {}

    class Spy(torch.nn.Module):
        needs_frames = True

        def forward(self, state):
            seen["frames"], seen["tiles"] = state.frames.clone(), state.tiles.clone()
            return state

    pipe = pipeline(layer=2, keep=1.0)
    pipe.stages[0].operators.insert(0, Spy())
    with torch.no_grad(), pipe.attach(model):
        model(**batch)
    video = batch["input_ids"] == model.config.video_token_id
    image = batch["input_ids"] == model.config.image_token_id
    for b in range(2):
        frames, in_tile = seen["frames"][b], seen["tiles"][b] >= 0
        assert bool((frames[image[b] & in_tile] == 0).all()) and bool((frames[image[b] & ~in_tile] == -1).all())
        clip = frames[video[b]]
        assert clip[:-1].tolist() == [0] * 16 + [1] * 16 and int(clip[-1]) == -1  # the newline is in no frame


def eager_pooled_received_attention(batch: dict, layer: int) -> torch.Tensor:
    """(clips, frames * 16): each pooled video token's vision signal by hand from the eager tower's own attention
    maps: the attention each patch receives at ``layer``, averaged over the frame's queries and the heads, then
    averaged over the 2x2 patches the model's pooling mixes (a bilinear halving of the 8x8 grid weighs each of
    them 1/4)."""
    model = pair("llava_onevision")["eager"]
    pixels = batch["pixel_values_videos"]
    clips, frames = pixels.shape[:2]
    with torch.no_grad():
        out = model.model.vision_tower(pixels.flatten(0, 1), output_attentions=True)
    received = out.attentions[layer].mean(dim=2).mean(dim=1)  # (clips * frames, 64): queries, then heads
    pooled = received.view(-1, 4, 2, 4, 2).mean(dim=(2, 4))  # each 2x2 block of the 8x8 grid
    return pooled.reshape(clips, frames * 16)


def test_vision_signals_on_a_clip_are_its_frames_signals_pooled_as_the_features():
    """cls_attention (SigLIP: the attention a patch receives) on two 3-frame clips: the tokens kept are the top of
    the pooled eager attention maps, and generate() equals the masked reference."""
    model, batch = pair("llava_onevision")["sdpa"], batch_of("two clips")
    layers = model.config.vision_config.num_hidden_layers
    pipe = tp.load_pipeline({"stages": [{"layer": 0, "operators": [{"op": "cls_attention", "layer": -2},
                                                                   {"op": "topk", "keep": 0.25}]}]})
    with torch.no_grad(), pipe.attach(model):
        out = generate(model, batch, output_logits=True, return_dict_in_generate=True)
    trace = pipe.trace[0]
    want = eager_pooled_received_attention(batch, layers - 2)
    video = batch["input_ids"] == model.config.video_token_id
    for b in range(2):
        idx = video[b].nonzero().flatten()[:-1]  # the frames' tokens (the closing newline has no patch)
        kept = torch.tensor([int(i) in set(trace.kept[b]) for i in idx])
        n = int(kept.sum())
        assert 0 < n < 48
        order = torch.sort(want[b], descending=True, stable=True).values
        assert float(order[n - 1] - order[n]) > 1e-6  # no tie at the cut, so the choice is the ranking's
        assert torch.equal(kept, want[b] >= order[n - 1])
    tokens, ref_logits = reference_greedy(pair("llava_onevision")["eager"], batch, 0, trace.kept, STEPS)
    assert torch.equal(out.sequences[:, -STEPS:], tokens)


def test_vision_signals_on_a_batch_of_images_and_clips_join_the_two_tower_calls():
    """A batch of an image and a 2-frame clip per sample runs the tower twice; the signals of its clips are the
    pooled eager attention maps of their frames, those of its images what the images alone give (their tiles are
    the first call's)."""
    model, batch = pair("llava_onevision")["sdpa"], batch_of("image+video")
    layers = model.config.vision_config.num_hidden_layers
    scores = vision_scores(model, batch, -2)
    want = eager_pooled_received_attention(batch, layers - 2)
    video = batch["input_ids"] == model.config.video_token_id
    image = batch["input_ids"] == model.config.image_token_id
    for b in range(2):
        assert torch.allclose(scores[b][video[b]][:-1], want[b], atol=1e-6)
        keep = batch["attention_mask"][b].bool() & ~video[b]
        alone = {"input_ids": batch["input_ids"][b:b + 1, keep], "attention_mask": batch["attention_mask"][b:b + 1, keep],
                 "pixel_values": batch["pixel_values"][b:b + 1], "image_sizes": batch["image_sizes"][b:b + 1]}
        own = vision_scores(model, alone, -2)
        assert torch.allclose(scores[b][image[b]], own[0][alone["input_ids"][0] == model.config.image_token_id],
                              atol=1e-6)


def test_temporal_windows_on_the_clips_frames_generate_as_the_reference():
    """DyCoke's temporal merging before the LLM on two 3-frame clips: frame 0 whole, frames 1 and 2 keep
    int(0.3 x 16) = 4 cells each, the newline stays: 16 + 4 + 4 + 1 of 49; generate() equals the masked reference."""
    model, batch = pair("llava_onevision")["sdpa"], batch_of("two clips")
    pipe = tp.load_pipeline({"stages": [{"layer": 0, "operators": [{"op": "temporal_windows", "keep": 0.3}]}]})
    with torch.no_grad(), pipe.attach(model):
        out = generate(model, batch, output_logits=True, return_dict_in_generate=True)
    trace = pipe.trace[0]
    assert trace.visual_after == [25, 25]
    tokens, ref_logits = reference_greedy(pair("llava_onevision")["eager"], batch, 0, trace.kept, STEPS)
    assert torch.equal(out.sequences[:, -STEPS:], tokens)
    for got, want in zip(out.logits, ref_logits):
        assert torch.allclose(got.float(), want, atol=1e-4)


@pytest.mark.parametrize("name", ["static_patches", "dycoke", "fastv", "pooling", "divprune"])
@pytest.mark.parametrize("kind", list(BATCHES))
def test_the_video_presets_and_per_frame_image_presets_generate_under_the_no_eager_guard(name, kind, monkeypatch):
    """On a 32-layer tiny LLaVA-OneVision (every preset's layers exist), the eager attention made to raise."""
    import importlib

    def eager(*args, **kwargs):
        raise AssertionError("eager attention ran")

    for module in ("qwen2", "siglip", "llava_onevision"):
        monkeypatch.setattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"),
                            "eager_attention_forward", eager, raising=False)
    model = deep_onevision()
    sizes, videos = BATCHES[kind]
    batch = tiny_llava_onevision_inputs(model, image_sizes=sizes, videos=videos)
    pipe = tp.load_pipeline(name)
    with torch.no_grad(), pipe.attach(model):
        out = generate(model, batch)
    assert out.shape[1] == batch["input_ids"].shape[1] + STEPS
    first, last = pipe.trace[0], [t for t in pipe.trace if t.site == "prefill"][-1]
    assert sum(last.visual_after) < sum(first.visual_before), pipe.report()


@functools.cache
def deep_onevision():
    from tokenprune.reference.tiny import tiny_llava_onevision

    return tiny_llava_onevision("sdpa", layers=32)


def forbid_eager(monkeypatch):
    import importlib

    def eager(*args, **kwargs):
        raise AssertionError("eager attention ran")

    for name in ("qwen2", "siglip", "llava_onevision"):
        monkeypatch.setattr(importlib.import_module(f"transformers.models.{name}.modeling_{name}"),
                            "eager_attention_forward", eager, raising=False)


def static_and_random_clips() -> dict:
    """Two 3-frame clips: clip 0 one frame three times, clip 1 three random frames."""
    batch = dict(batch_of("two clips"))
    pixels = batch["pixel_values_videos"].clone()
    pixels[0, 1] = pixels[0, 2] = pixels[0, 0]
    batch["pixel_values_videos"] = pixels
    return batch


def test_fastvid_runs_on_onevision_clips_with_its_budgets(monkeypatch):
    """``fastvid`` ranks by the tower's attention, pooled onto the clips' tokens. Two transitions and 7 cuts
    allowed: every frame is a segment keeping int(16 x 0.27) = 4 of its 16 tokens; the newline stays: 13 each."""
    forbid_eager(monkeypatch)
    model, batch = pair("llava_onevision")["sdpa"], static_and_random_clips()
    pipe = tp.load_pipeline("fastvid")
    with torch.no_grad(), pipe.attach(model):
        out = generate(model, batch)
    assert out.shape[1] == batch["input_ids"].shape[1] + STEPS
    assert pipe.trace[0].visual_after == [13, 13]


def test_holitom_video_runs_on_onevision_clips_with_its_budgets(monkeypatch):
    """``holitom_video`` (its in-LLM merge at layer 2): the repeated frame is one window of 16 static cells (32 of
    48 tokens saved), so r = 0.15 x 48 / 16 = 0.45 and round(16 x 0.45) = 7 centres stay; the random clip keeps
    ceil(16 x 0.15) = 3 of each frame's dynamic tokens; each keeps its newline: 8 and 10. Inside the LLM half of
    each sample's visual tokens are merged away: 4 and 5."""
    forbid_eager(monkeypatch)
    model, batch = pair("llava_onevision")["sdpa"], static_and_random_clips()
    pipe = tp.load_pipeline("holitom_video", ["stages.1.layer=2"])
    with torch.no_grad(), pipe.attach(model):
        out = generate(model, batch)
    assert out.shape[1] == batch["input_ids"].shape[1] + STEPS
    assert [t.visual_after for t in pipe.trace[:2]] == [[8, 10], [4, 5]]


@pytest.mark.parametrize("preset,over", [("fastvid", []), ("holitom_video", ["stages.1.layer=2"])])
def test_the_vision_ranked_video_presets_run_on_a_batch_of_images_and_clips(preset, over, monkeypatch):
    """Both tower calls' signals in one forward: fastvid keeps int(16 x 0.27) = 4 of each 2-frame clip's frames
    and the newline (9 of 33); both prune the images too."""
    forbid_eager(monkeypatch)
    model, batch = pair("llava_onevision")["sdpa"], batch_of("image+video")
    pipe = tp.load_pipeline(preset, over)
    with torch.no_grad(), pipe.attach(model):
        out = generate(model, batch)
    assert out.shape[1] == batch["input_ids"].shape[1] + STEPS
    trace = pipe.trace[0]
    video = batch["input_ids"] == model.config.video_token_id
    image = batch["input_ids"] == model.config.image_token_id
    for b in range(2):
        kept = torch.zeros_like(video[b])
        kept[torch.tensor(trace.kept[b])] = True
        assert int((kept & image[b]).sum()) < int(image[b].sum())
        if preset == "fastvid":
            assert int((kept & video[b]).sum()) == 9
