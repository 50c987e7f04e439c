"""SGL's guide model: a small VLM's attention, summed over all its layers, ranks the large model's tokens."""

import pytest
import torch

import tokenprune as tp
from tokenprune.core.errors import ConfigError
from tokenprune.reference.tiny import tiny_llava, tiny_llava_inputs


@pytest.fixture(scope="module")
def models():
    big = tiny_llava("sdpa", layers=4, seed=0)
    guide_sdpa, guide_eager = tiny_llava("sdpa", layers=3, seed=7), tiny_llava("eager", layers=3, seed=7)
    guide_eager.load_state_dict(guide_sdpa.state_dict())
    return big, guide_sdpa, guide_eager


def sgl(keep=12, layer=2):
    return tp.load_pipeline({"name": "sgl", "stages": [{"layer": layer, "operators": [
        {"op": "guide_model", "queries": "last"}, {"op": "topk", "keep": keep}]}]})


@pytest.mark.parametrize("run", ["forward", "generate"])
def test_guide_ranks_tokens_by_its_attention_summed_over_layers(models, run):
    """The kept tokens are the top ones of the eager guide's own attention maps: last query, heads
    averaged, summed over all 3 of its layers. Under generate() the images reach the guide too."""
    big, guide, guide_eager = models
    batch = tiny_llava_inputs(big)
    pipe = sgl()
    run_with_guide(big, guide, batch, pipe, run)
    assert_guides_top(guide_eager, big, batch, pipe, 12)


def run_with_guide(big, guide, batch, pipe, run):
    with torch.no_grad(), pipe.attach(big, guide=guide):
        if run == "forward":
            big(**batch)
        else:
            big.generate(**batch, max_new_tokens=2, do_sample=False)


def assert_guides_top(guide_eager, big, batch, pipe, keep):
    """The kept visual tokens of each sample are the top ``keep`` of the eager guide's attention maps: last query,
    heads averaged, summed over all of its layers."""
    with torch.no_grad():
        att = guide_eager(**batch, output_attentions=True).attentions
    total = sum(a[:, :, -1, :].float().mean(1) for a in att)  # (B, N)
    visual = batch["input_ids"] == big.config.image_token_id
    for b in range(visual.shape[0]):
        vis = visual[b].nonzero().flatten()
        top = set(vis[total[b, vis].argsort(descending=True, stable=True)[:keep]].tolist())
        assert set(pipe.trace[0].kept[b]) & set(vis.tolist()) == top


def test_the_guides_choice_differs_from_the_large_models_own(models):
    """So the test above can fail: FastV on the large model keeps other tokens."""
    big, guide, _ = models
    batch = tiny_llava_inputs(big)
    kept = {}
    for name, pipe, kw in [("sgl", sgl(), {"guide": guide}), ("fastv", tp.load_pipeline(
            {"stages": [{"layer": 2, "operators": [{"op": "attention"}, {"op": "topk", "keep": 12}]}]}), {})]:
        with torch.no_grad(), pipe.attach(big, **kw):
            big(**batch)
        kept[name] = pipe.trace[0].kept
    assert kept["sgl"] != kept["fastv"]


def test_a_missing_guide_is_named(models):
    with pytest.raises(ConfigError, match=r"stages\.0\.operators\.0\.op: 'guide_model' needs a guide model"):
        sgl().attach(models[0])


def test_families_whose_images_cannot_reach_a_guide_refuse():
    with pytest.raises(ConfigError, match=r"'guide_model' needs the images .* which LLaMA-3.2-Vision .* cannot give: .*holds none"):
        from tokenprune.reference.tiny import tiny_mllama

        model = tiny_mllama("sdpa")
        tp.load_pipeline({"stages": [{"layer": "cross_attention", "operators": [
            {"op": "guide_model"}, {"op": "topk", "keep": 0.5}]}]}).attach(model, guide=model)


def _family(name, impl, layers, seed):
    from tokenprune.reference import tiny

    if name == "qwen2_vl":
        return tiny.tiny_qwen2_vl(impl, layers=layers, seed=seed)
    return tiny.tiny_llava_next(impl, layers=layers, seed=seed)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next"])
@pytest.mark.parametrize("run", ["forward", "generate"])
def test_a_guide_sees_the_images_of_the_forward(family, run):
    """The guide's images are rebuilt from the large model's image call (Qwen2-VL: pixel patches and grids from
    the tower; LLaVA-NeXT: tiles and image sizes from get_image_features, which generate() runs before the
    prefill): the kept tokens are the top ones of the eager guide's own attention maps, summed over its layers."""
    from tokenprune.reference import tiny

    big = _family(family, "sdpa", 4, 0)
    guide, guide_eager = _family(family, "sdpa", 3, 7), _family(family, "eager", 3, 7)
    guide_eager.load_state_dict(guide.state_dict())
    batch = tiny.tiny_qwen2_vl_inputs(big) if family == "qwen2_vl" else tiny.tiny_llava_next_inputs(big)
    pipe = sgl(keep=6)
    run_with_guide(big, guide, batch, pipe, run)
    assert_guides_top(guide_eager, big, batch, pipe, 6)
