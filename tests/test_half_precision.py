"""Half precision (bf16, fp16) on the CPU: the oracles within the dtype's own noise, and the same kept tokens as
float32 wherever float32's scores are not near-tied at the cut.

Scores are computed in float32 from the model's half-precision states (attention logits, softmax and reductions:
``tokenprune.core.attention.scaled_scores`` casts queries and keys up), so a half model ranks the tokens float32
ranks, up to the rounding of the states it is given."""

import functools

import pytest
import torch
from families import BUILDERS, pair
from reference import reference_greedy

import tokenprune as tp

FAMILIES = ["llava", "llava_next", "qwen2_vl"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
STEPS = 3


@functools.cache
def half(family: str, impl: str, dtype: str):
    model = BUILDERS[family][0](impl)
    model.load_state_dict(pair(family)["sdpa"].state_dict())
    return model.to(DTYPES[dtype])


def batch_of(family: str) -> dict:
    return BUILDERS[family][1](pair(family)["sdpa"])


def fastv(keep=0.5, layer=2):
    return tp.load_pipeline({"stages": [{"layer": layer, "operators": [{"op": "attention"}, {"op": "topk", "keep": keep}]}]})


def generate(model, batch):
    return model.generate(**batch, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_keep_everything_is_identical_in_half(family, dtype):
    """Oracle 1 in half precision: bit-identical."""
    model, batch = half(family, "sdpa", dtype), batch_of(family)
    ref = generate(model, batch)
    pipe = fastv(keep=1.0)
    with pipe.attach(model):
        got = generate(model, batch)
    assert torch.equal(got.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, ref.logits))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_drop_only_in_half_equals_masked_reference_within_the_dtypes_noise(family, dtype):
    """Oracle 2 in half precision: the pruned SDPA model against the masked eager reference in the same dtype. The
    tolerance is the dtype's own: the largest logit difference between the unpruned SDPA and eager models in that
    dtype (the same weights, the same tokens; only the order of the arithmetic differs), times 2 (measured: the
    pruned model is within 1.1 times it in every family and dtype; bf16 about 0.14, fp16 about 0.02)."""
    batch = batch_of(family)
    sdpa, eager = half(family, "sdpa", dtype), half(family, "eager", dtype)
    a, b = generate(sdpa, batch), generate(eager, batch)
    floor = max(float((x.float() - y.float()).abs().max()) for x, y in zip(a.logits, b.logits))
    pipe = fastv()
    with pipe.attach(sdpa):
        out = generate(sdpa, batch)
    tokens, ref_logits = reference_greedy(eager, batch, 2, pipe.trace[0].kept, STEPS)
    assert torch.equal(out.sequences[:, -STEPS:], tokens)
    worst = max(float((x.float() - y).abs().max()) for x, y in zip(out.logits, ref_logits))
    assert worst <= 2 * floor + 1e-6, (worst, floor)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_half_keeps_what_float32_keeps_where_scores_are_not_tied(family, dtype):
    """FastV at layer 2 in half precision against float32's own choice, read off the float32 eager model's
    attention map (layer 1, last query, heads averaged): every visual token whose float32 score is clear of the
    cut by more than ``margin`` (relative) is kept, or dropped, as float32 decides; only near-ties may differ."""
    margin = 0.05
    batch = batch_of(family)
    out = pair(family)["eager"](**batch, output_attentions=True)
    scores = out.attentions[1][:, :, -1, :].float().mean(dim=1)  # (B, N)
    visual = batch["input_ids"] == pair(family)["eager"].config.image_token_id
    pipe = fastv(keep=0.25)
    with pipe.attach(half(family, "sdpa", dtype)):
        half(family, "sdpa", dtype)(**batch)
    clear = 0
    for b, kept in enumerate(pipe.trace[0].kept):
        idx = visual[b].nonzero().flatten()
        s = scores[b, idx]
        k = pipe.trace[0].visual_after[b]
        cut = s.sort(descending=True).values[k - 1:k + 1].mean()  # between the last kept and the first dropped
        kept_set = set(kept)
        for i, v in zip(idx.tolist(), s.tolist()):
            if abs(v - cut) > margin * cut:
                clear += 1
                assert (i in kept_set) == (v > cut), (b, i, v, float(cut))
    assert clear >= 0.8 * int(visual.sum())  # the check is about most tokens, not a few
