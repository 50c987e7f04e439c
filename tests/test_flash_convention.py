"""FlashAttention-2's convention on the CPU (tokenprune.reference.flash_stand_in): transformers' own FlashAttention
route — 2-D padding masks or none, unpadding into varlen sequences, packed-sequence detection from position ids,
bottom-right causal alignment — with the kernels computed exactly. The oracles and every preset run under it,
against the masked eager reference, the SDPA model, or a refusal at attach that names the stage and the feature."""

import functools

import pytest
import torch
from conftest import load_for_tiny
from families import BUILDERS, pair, sample_alone
from reference import reference_greedy

import tokenprune as tp
from tokenprune.adapters import get_adapter
from tokenprune.core.config import preset_names
from tokenprune.core.errors import ConfigError
from tokenprune.reference import flash_stand_in
from tokenprune.reference.flash_stand_in import flash_attn_func, flash_attn_varlen_func

FLASH = flash_stand_in.register()
NO_FLASH_NAME = flash_stand_in.register("tokenprune_varlen_cpu")  # the convention under a name without "flash"
FAMILIES = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"]
STEPS = 3


@functools.cache
def flash_model(family: str, impl: str = FLASH):
    flash_stand_in.register(impl)
    build = BUILDERS[family][0]
    model = build(impl)
    model.load_state_dict(pair(family)["sdpa"].state_dict())
    return model


def batch_of(family: str) -> dict:
    return BUILDERS[family][1](pair(family)["sdpa"])


def generate(model, batch, **kw):
    return model.generate(**batch, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, **kw)


def by_hand(q, k, v, scale):
    """Attention of one sequence written out: q (Sq, H, D), k/v (Sk, H, D); query i at key position Sk - Sq + i."""
    sq, sk = q.shape[0], k.shape[0]
    out = torch.zeros_like(q)
    for h in range(q.shape[1]):
        for i in range(sq):
            logits = [float(q[i, h] @ k[j, h]) * scale for j in range(sk - sq + i + 1)]
            w = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)
            out[i, h] = sum(w[j] * v[j, h].double() for j in range(len(logits))).float()
    return out


def test_the_stand_in_kernels_are_causal_from_the_bottom_right_per_sequence():
    """Two packed sequences of 3 and 2 queries over 4 and 5 keys: each query sees its own sequence's keys up to its
    bottom-right-aligned position (a decoding query sees all of them), computed by hand; the plain kernel gives the
    same on a batch of equal lengths; grouped key heads are shared by their query heads."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, 2, 4, generator=g) for n in (5, 9, 9))
    cu_q, cu_k = torch.tensor([0, 3, 5], dtype=torch.int32), torch.tensor([0, 4, 9], dtype=torch.int32)
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 3, 5, softmax_scale=0.5, causal=True)
    assert torch.allclose(out[:3], by_hand(q[:3], k[:4], v[:4], 0.5), atol=1e-5)
    assert torch.allclose(out[3:], by_hand(q[3:], k[4:], v[4:], 0.5), atol=1e-5)
    plain = flash_attn_func(q[None, :3], k[None, :4], v[None, :4], softmax_scale=0.5, causal=True)[0]
    assert torch.allclose(plain, out[:3], atol=1e-6)
    grouped = flash_attn_func(q[None, :3], k[None, :4, :1], v[None, :4, :1], softmax_scale=0.5, causal=True)[0]
    shared = by_hand(q[:3], k[:4, :1].expand(-1, 2, -1), v[:4, :1].expand(-1, 2, -1), 0.5)
    assert torch.allclose(grouped, shared, atol=1e-5)


@pytest.mark.parametrize("impl", [FLASH, NO_FLASH_NAME])
def test_the_runtime_reads_the_convention_not_the_name(impl):
    model = flash_model("llava", impl)
    assert get_adapter(model).mask_format == "2d"
    assert get_adapter(pair("llava")["sdpa"]).mask_format == "bool"
    assert get_adapter(pair("llava")["eager"]).mask_format == "additive"


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_the_unpruned_model_under_the_stand_in_is_the_sdpa_model(family):
    """transformers' FlashAttention route (a left-padded batch: unpadded, varlen) with the stand-in kernels."""
    batch = batch_of(family)
    a, b = generate(pair(family)["sdpa"], batch), generate(flash_model(family), batch)
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.allclose(x, y, atol=1e-4) for x, y in zip(a.logits, b.logits))


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_keep_everything_is_identical_under_flash(family):
    """Oracle 1 under FlashAttention: a pipeline that keeps every token changes no logit."""
    model, batch = flash_model(family), batch_of(family)
    pipe = tp.load_pipeline({"stages": [{"layer": 2, "operators": [{"op": "attention"}, {"op": "topk", "keep": 1.0}]}]})
    ref = generate(model, batch)
    with pipe.attach(model):
        got = generate(model, batch)
    assert torch.equal(got.sequences, ref.sequences)
    assert all(torch.equal(x, y) for x, y in zip(got.logits, ref.logits))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layer,compact", [(2, False), (2, True), (0, False)])
@torch.no_grad()
def test_drop_only_generation_under_flash_equals_masked_reference(family, layer, compact):
    """Oracle 2 under FlashAttention, through stock generate(): a stage inside the LLM, the same with the earlier
    layers' caches compacted (the first layer's cache trimmed), and a stage before the LLM."""
    model, batch = flash_model(family), batch_of(family)
    ops = [{"op": "random", "seed": 3} if layer == 0 else {"op": "attention"}, {"op": "topk", "keep": 0.5}]
    pipe = tp.load_pipeline({"stages": [{"layer": layer, "operators": ops + ([{"op": "kv_compact"}] if compact else [])}]})
    with pipe.attach(model):
        out = generate(model, batch)
    kept = pipe.trace[0].kept
    tokens, ref_logits = reference_greedy(pair(family)["eager"], batch, layer, kept, STEPS, compact_earlier=compact)
    assert torch.equal(out.sequences[:, -STEPS:], tokens)
    for got, want in zip(out.logits, ref_logits):
        assert torch.allclose(got.float(), want, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layer", [2, 0])
@torch.no_grad()
def test_a_padded_batch_under_flash_equals_each_sample_alone(family, layer):
    """Oracle 3 under FlashAttention: the samples keep different numbers of tokens (padding leaves at the stage and
    visual counts differ; the shorter sample's slots hold fillers, masked out of the 2-D mask), and each sample alone runs unpadded, its kept positions no longer one
    increasing run (transformers' packed-sequence route)."""
    model, batch = flash_model(family), batch_of(family)
    ops = [{"op": "random", "seed": 3} if layer == 0 else {"op": "attention"}, {"op": "topk", "keep": 0.5}]
    pipe = tp.load_pipeline({"stages": [{"layer": layer, "operators": ops}]})
    with pipe.attach(model):
        together = generate(model, batch)
        trace = pipe.trace[0]
        assert len(trace.kept[0]) != len(trace.kept[1])  # the shorter sample's slots hold fillers
        for b in range(2):
            alone = generate(model, sample_alone(family, batch, b))
            assert torch.equal(alone.sequences[0, -STEPS:], together.sequences[b, -STEPS:])
            for x, y in zip(alone.logits, together.logits):
                assert torch.allclose(x[0], y[b], atol=1e-4)


@pytest.fixture(scope="module")
def llava32_pair():
    from tokenprune.reference.tiny import tiny_llava

    sdpa = tiny_llava("sdpa", layers=32, vision_layers=4)
    flash = tiny_llava(flash_stand_in.register(), layers=32, vision_layers=4)
    flash.load_state_dict(sdpa.state_dict())
    return sdpa, flash


#: Presets refused under FlashAttention on a model without sliding windows, and the key they are refused under.
REFUSED = {"tome": "stages.0.operators.0.proportional_attention"}


# (downsample acts on the images before the processor, nothing inside the model: tests/test_downsample.py)
@pytest.mark.parametrize("name", sorted(set(preset_names()) - {"trimmed_llama", "sgl", "downsample"}))
@torch.no_grad()
def test_every_preset_under_flash_is_the_preset_under_sdpa_or_refused(llava32_pair, name):
    """Each preset on a 32-layer tiny LLaVA (a padded batch of two) under FlashAttention keeps the same tokens and
    generates the same as under SDPA, or is refused at attach, before any forward, naming the stage's key."""
    from tokenprune.reference.tiny import tiny_llava_inputs

    sdpa, flash = llava32_pair
    batch = tiny_llava_inputs(sdpa)
    if name in REFUSED:
        with pytest.raises(ConfigError, match=f"^{REFUSED[name]}: .*use attn_implementation: sdpa"):
            with load_for_tiny(name).attach(flash):
                raise AssertionError("attached")
        return
    runs = {}
    for model in (sdpa, flash):
        pipe = load_for_tiny(name)
        with pipe.attach(model):
            runs[model] = (generate(model, batch), [t.kept for t in pipe.trace])
    (a, kept_a), (b, kept_b) = runs[sdpa], runs[flash]
    assert kept_a == kept_b
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.allclose(x, y, atol=1e-4) for x, y in zip(a.logits, b.logits))


@pytest.mark.parametrize("preset", ["fastv", "aircache", "random"])
def test_pruning_ahead_of_a_sliding_window_layer_is_refused_under_flash(preset):
    """Under FlashAttention the kernel counts a sliding window over the tokens it is given: once tokens are gone the
    window would cover other keys than the model's, so the stage is refused at attach, naming its layer."""
    model = flash_model("llava_next_sliding")
    with pytest.raises(ConfigError, match=r"^stages\.0\.layer: .* prunes ahead of sliding-window layer \d+; under "
                                          f"{FLASH}"):
        with tp.load_pipeline(preset).attach(model):
            raise AssertionError("attached")
