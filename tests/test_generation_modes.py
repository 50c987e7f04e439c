"""generate()'s other modes with a pipeline attached: sampling and beam search against the masked reference (the
unpruned eager model with the pruned keys hidden, run through the same generate() call), beam search with a
decoding-time re-pruning against a replay of its best beam, and static caches refused before any layer runs."""

import pytest
import torch
from families import inputs, pair, sample_alone
from reference import hidden_keys, position_kwargs, pruned_columns
from transformers import LogitsProcessor, LogitsProcessorList

import tokenprune as tp
from tokenprune.core.errors import ConfigError, PipelineRuntimeError

LAYER = 2
FAMILIES = ["llava", "qwen2_vl", "llava_next"]


def fastv():
    return tp.load_pipeline({"stages": [{"layer": LAYER, "operators": [{"op": "attention"}, {"op": "topk", "keep": 0.5}]}]})


def reference_generate(family: str, batch: dict, kept: list[list[int]], **kw):
    """The masked reference through generate() itself: layers >= LAYER of the eager model never see the pruned keys
    (their columns hidden in the prefill and at every decoding step)."""
    eager = pair(family)["eager"]
    cols = pruned_columns(batch["attention_mask"].shape[1], kept, batch["attention_mask"])
    with hidden_keys(eager, {layer: cols for layer in range(LAYER, len(eager.model.language_model.layers))}):
        return eager.generate(**batch, **kw)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_sampling_draws_what_the_masked_reference_draws(family):
    """do_sample with temperature and top-p, the same seed: the same tokens as the masked reference."""
    model, batch = pair(family)["sdpa"], inputs(family)
    pipe = fastv()
    kw = dict(max_new_tokens=6, do_sample=True, temperature=1.7, top_p=0.95)
    with pipe.attach(model):
        torch.manual_seed(11)
        got = model.generate(**batch, **kw)
    torch.manual_seed(11)
    want = reference_generate(family, batch, pipe.trace[0].kept, **kw)
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_beam_search_finds_the_masked_references_beams(family):
    """num_beams=3 on one sample: the beams' copies of the prompt keep the same tokens, and the search returns what
    the masked reference's search returns, with the same scores."""
    model, batch = pair(family)["sdpa"], sample_alone(family, inputs(family), 0)
    pipe = fastv()
    kw = dict(max_new_tokens=5, do_sample=False, num_beams=3, num_return_sequences=3, output_scores=True,
              return_dict_in_generate=True)
    with pipe.attach(model):
        got = model.generate(**batch, **kw)
    kept = pipe.trace[0].kept
    assert len(kept) == 3 and all(k == kept[0] for k in kept)
    want = reference_generate(family, batch, kept[:1], **kw)
    assert torch.equal(got.sequences, want.sequences)
    assert torch.allclose(got.sequences_scores, want.sequences_scores, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_beam_search_on_a_padded_batch_equals_each_sample_alone(family):
    """Oracle 3 under beam search: the beams of a padded batch of two (different kept counts) are each sample's."""
    model, batch = pair(family)["sdpa"], inputs(family)
    kw = dict(max_new_tokens=4, do_sample=False, num_beams=3)
    pipe = fastv()
    with pipe.attach(model):
        together = model.generate(**batch, **kw)[:, -4:]
        for b in range(2):
            alone = model.generate(**sample_alone(family, batch, b), **kw)[:, -4:]
            assert torch.equal(alone[0], together[b])


class Force(LogitsProcessor):
    """Greedy decoding forced onto ``tokens`` (one row per step)."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens, self.step = tokens, 0

    def __call__(self, input_ids, scores):
        out = torch.full_like(scores, float("-inf"))
        out[:, self.tokens[self.step]] = 0.0
        self.step += 1
        return out


@pytest.mark.parametrize("preset", ["mint"])
@torch.no_grad()
def test_beams_that_re_prune_at_decoding_keep_their_own_entries(preset):
    """A decoding-time re-pruning (MINT) leaves the beams of one sample holding different cache entries, and beam
    search reorders the cache's rows between steps: each beam's score is still the log-probability of its tokens
    under the pipeline. Checked against replaying each returned beam alone (greedy decoding forced onto its
    tokens, the same pipeline attached, its sample alone): the replay's summed log-probabilities are the beam's score
    (length_penalty 0: the plain sum). A left-padded batch of two, so that decoding masks read which entries each
    row's cache holds."""
    model, batch = pair("llava")["sdpa"], inputs("llava")  # left-padded: decoding masks read each row's entries
    steps = 4
    with tp.load_pipeline(preset).attach(model) as attached:
        got = model.generate(**batch, max_new_tokens=steps, do_sample=False, num_beams=3, num_return_sequences=3,
                             length_penalty=0.0, output_scores=True, return_dict_in_generate=True)
        decode = [t for t in attached.pipeline.trace if t.site == "decode"]
    assert decode and any(len(set(map(tuple, t.kept))) > 1 for t in decode)  # the beams hold different entries
    for i, (seq, score) in enumerate(zip(got.sequences, got.sequences_scores)):
        tokens = seq[-steps:]
        with tp.load_pipeline(preset).attach(model):
            replay = model.generate(**sample_alone("llava", batch, i // 3), max_new_tokens=steps, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True, logits_processor=LogitsProcessorList([Force(tokens)]))
        logp = sum(float(torch.log_softmax(x[0].float(), -1)[t]) for x, t in zip(replay.logits, tokens))
        assert abs(logp - float(score)) < 1e-4, (logp, float(score))


@torch.no_grad()
def test_under_beams_each_rows_record_names_the_entries_its_cache_holds():
    """Beam search moves cache rows between beams (``reorder_cache``); after a decoding-time re-pruning the beams of a
    sample hold different prompt entries, and the record of which (what later re-prunings and decoding masks read)
    must move with the rows. Checked against the cache itself: each row's held prompt keys at every compressed
    layer are the unpruned prefill's keys of the entries the record names."""
    model, batch = pair("llava")["sdpa"], inputs("llava")
    full = model(**batch, **position_kwargs(model, batch["attention_mask"]), use_cache=True).past_key_values  # as generate() positions them
    beams = 4  # MINT re-pruning at the first two steps: the beams' different tokens choose different entries
    with tp.load_pipeline("mint", ["stages.0.cache.decode.steps=[1, 2]"]).attach(model) as attached:
        out = model.generate(**batch, max_new_tokens=2, do_sample=False, num_beams=beams, return_dict_in_generate=True)
        ep = attached.episode
    differ = 0
    for layer, held in ep.held.items():
        keys = out.past_key_values.layers[layer].keys
        k = held.index.shape[1]
        for r in range(keys.shape[0]):
            want = full.layers[layer].keys[r // beams][:, held.index[r]]
            assert torch.allclose(keys[r, :, :k], want, atol=1e-5), (layer, r)
        differ += sum(not torch.equal(held.index[r], held.index[r - r % beams]) for r in range(keys.shape[0]))
    assert differ > 0  # some beams of a sample hold other entries than its first beam


@torch.no_grad()
def test_a_static_cache_is_refused_before_any_layer_runs(monkeypatch):
    """generate(cache_implementation="static") with a pipeline: refused in the prefill's first hook (no decoder
    layer ran); a model whose generation config asks for a static cache is refused at attach."""
    model, batch = pair("llava")["sdpa"], inputs("llava")
    ran = []
    handle = model.model.language_model.layers[0].register_forward_pre_hook(lambda *a: ran.append(1))
    try:
        with pytest.raises(PipelineRuntimeError, match=r"^cache_implementation: 'static'; a static cache"):
            with fastv().attach(model):
                model.generate(**batch, max_new_tokens=2, do_sample=False, cache_implementation="static")
    finally:
        handle.remove()
    assert ran == []
    monkeypatch.setattr(model.generation_config, "cache_implementation", "static")
    with pytest.raises(ConfigError, match=r"^generation_config\.cache_implementation: 'static'; a static cache"):
        fastv().attach(model)


@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace")  # the operator clock breaks the graph
@torch.no_grad()
def test_a_compiled_forward_runs_the_pipeline_as_the_masked_reference():
    """``model.forward = torch.compile(model.forward)`` (TorchDynamo, with the ``eager`` backend to keep CI short:
    tracing and graph breaks around tokenprune's hooks are what can go wrong, not code generation): FastV at layer 2
    through generate() equals the masked eager reference."""
    from reference import reference_greedy

    model, batch = pair("llava")["sdpa"], inputs("llava")
    torch._dynamo.reset()
    forward = model.forward
    model.forward = torch.compile(forward, backend="eager")
    try:
        pipe = fastv()
        with pipe.attach(model):
            out = model.generate(**batch, max_new_tokens=3, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
    finally:
        model.forward = forward
        torch._dynamo.reset()
    tokens, ref_logits = reference_greedy(pair("llava")["eager"], batch, LAYER, pipe.trace[0].kept, 3)
    assert torch.equal(out.sequences[:, -3:], tokens)
    for got, want in zip(out.logits, ref_logits):
        assert torch.allclose(got.float(), want, atol=1e-4)
