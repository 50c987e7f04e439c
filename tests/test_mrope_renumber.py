"""``positions: renumber`` under M-RoPE (Qwen2-VL, Qwen2.5-VL): the definition on hand-computed positions, the
prefill against layers run by hand on positions built token by token, and cached decoding against re-running
the pruned prefill (which checks the shift decoding continues from)."""

import pytest
import torch
from families import inputs, pair
from reference import cached_and_reprefilled_logits, hidden_at_layer, reference_from_site

import tokenprune as tp
from tokenprune.core.positions import renumber_grid_positions, visual_runs
from tokenprune.reference.tiny import TINY_VISION_START

SITE = 2


def test_renumbering_keeps_each_images_grid_and_closes_the_gaps_around_it():
    # text 0, 1; an image at origin 2 on a 2x3 grid (t = 2; h = 2..3; w = 2..4); text 5, 6 after it
    h, w = [2, 2, 2, 3, 3, 3], [2, 3, 4, 2, 3, 4]
    pos = torch.tensor([[0, 1] + [2] * 6 + [5, 6], [0, 1] + h + [5, 6], [0, 1] + w + [5, 6]])[:, None]
    runs = visual_runs(torch.tensor([[0, 0] + [1] * 6 + [0, 0]]).bool())
    assert runs[0].tolist() == [-1, -1, 0, 0, 0, 0, 0, 0, -1, -1]
    keep = [0, 1, 2, 3, 5, 8, 9]  # the image loses its last column and the middle of its second row
    new, nxt = renumber_grid_positions(pos[:, :, keep], runs[:, keep], torch.ones(1, 7, dtype=torch.bool))
    # the kept image tokens (2,2,2) (2,2,3) (2,3,2) stay; the text after moves back one column: 4, 5
    assert new[:, 0].tolist() == [[0, 1, 2, 2, 2, 4, 5], [0, 1, 2, 2, 3, 4, 5], [0, 1, 2, 3, 2, 4, 5]]
    assert nxt.tolist() == [6]  # decoding continues at 6, not 7
    everything, nxt = renumber_grid_positions(pos, runs, torch.ones(1, 10, dtype=torch.bool))
    assert torch.equal(everything, pos) and nxt.tolist() == [7]  # nothing moves when everything is kept
    # text 1 removed: the image moves to origin 1, its two tokens on their grid (1,1,1) (1,1,2), the text after
    # to 3, 4; left padding keeps its (masked) position
    padded = torch.cat([torch.ones(3, 1, 1, dtype=torch.long), pos[:, :, [0, 2, 3, 8, 9]]], 2)
    valid = torch.tensor([[False, True, True, True, True, True]])
    new, nxt = renumber_grid_positions(padded, torch.tensor([[-1, -1, 0, 0, -1, -1]]), valid)
    assert new[:, 0].tolist() == [[1, 0, 1, 1, 3, 4], [1, 0, 1, 1, 3, 4], [1, 0, 1, 2, 3, 4]] and nxt.tolist() == [5]


def hand_positions(full: torch.Tensor, input_ids: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor,
                   image_token: int) -> torch.Tensor:
    """The renumbered (3, B, K) positions of the kept ``rows``, token by token: a text token one past the largest
    position so far; an image's tokens keep their offsets from the image's origin (the temporal axis of a
    one-frame image), with the origin one past the largest position before the image."""
    out = torch.ones(3, *rows.shape, dtype=torch.long)
    for b in range(rows.shape[0]):
        top, shift, image = None, None, None
        for j, i in enumerate(rows[b].tolist()):
            if not valid[b, j]:
                continue
            p = full[:, b, i]
            if input_ids[b, i] != image_token:
                p = p.clone().fill_(int(p[0]) if top is None else top + 1)
                image = None
            else:
                which = int((input_ids[b, :i] == TINY_VISION_START).sum())  # images open with vision_start
                if which != image:
                    image, shift = which, (0 if top is None else top + 1) - int(p[0])
                p = p + shift
            out[:, b, j] = p
            top = int(p.max()) if top is None else max(top, int(p.max()))
    return out


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("keep", [0.5, 0.25])
@torch.no_grad()
def test_renumbered_prefill_equals_layers_run_by_hand(family, keep):
    model, batch = pair(family)["eager"], inputs(family)
    pipe = tp.load_pipeline({"stages": [{"layer": SITE, "positions": "renumber", "operators": [
        {"op": "random", "seed": 1}, {"op": "topk", "keep": keep}]}]})
    with pipe.attach(model):
        got = model(**batch).logits.float()
    am = batch["attention_mask"]
    full, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"],
                                         attention_mask=am)
    hidden_all = hidden_at_layer(model, batch, SITE)
    moved = []
    for b, kept in enumerate(pipe.trace[0].kept):  # each sample's kept tokens are its last rows
        rows = torch.tensor([kept])
        valid = torch.ones_like(rows, dtype=torch.bool)
        positions = hand_positions(full[:, b:b + 1], batch["input_ids"][b:b + 1], rows, valid,
                                   model.config.image_token_id)
        hidden = hidden_all[b:b + 1, rows[0]]
        ref = reference_from_site(model, hidden, positions, valid, SITE)[0]
        assert torch.allclose(got[b, -len(kept):], ref, atol=1e-4), b
        kept_positions = full[:, b:b + 1, rows[0]]
        if not torch.equal(positions, kept_positions):  # the renumbering moved something: the answer changes
            moved.append(b)
            assert not torch.allclose(ref, reference_from_site(model, hidden, kept_positions, valid, SITE)[0],
                                      atol=1e-3)
    assert moved

@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("layer", [0, SITE])
@torch.no_grad()
def test_cached_decoding_after_renumbering_equals_rerunning_the_prefill(family, impl, layer):
    """Stock generate() with a KV cache gives, at every step, the logits of a fresh pruned prefill of the prompt
    plus the tokens generated so far: the positions decoding continues from are the renumbered prompt's."""
    model, batch = pair(family)[impl], inputs(family)
    pipe = tp.load_pipeline({"stages": [{"layer": layer, "positions": "renumber", "operators": [
        {"op": "random", "seed": 1}, {"op": "topk", "keep": 0.25}]}]})
    def step_kwargs(ids, am):
        types = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(ids[:, batch["input_ids"].shape[1]:])], dim=1)
        return {"mm_token_type_ids": types, "pixel_values": batch["pixel_values"],
                "image_grid_thw": batch["image_grid_thw"]}

    first = None
    for i, cached, fresh in cached_and_reprefilled_logits(model, pipe, batch, step_kwargs):
        first = cached if i == 0 else first
        assert torch.allclose(cached.float(), fresh.float(), atol=1e-4), i
    # and the renumbering mattered: without it (positions kept) the first step differs
    keep = tp.load_pipeline({"stages": [{"layer": layer, "operators": [
        {"op": "random", "seed": 1}, {"op": "topk", "keep": 0.25}]}]})
    with keep.attach(model):
        other = model.generate(**batch, max_new_tokens=1, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
    assert not torch.allclose(first.float(), other.logits[0].float(), atol=1e-3)
