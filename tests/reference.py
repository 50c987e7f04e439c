"""Independent references for the oracles of DESIGN.md, written without tokenprune's attach code.

The reference is the *unpruned* eager model on the full sequence, with an extra additive mask
that hides the pruned tokens' keys from every layer >= L (and, for a compacted cache, from every
layer while decoding). Positions are the original ones; nothing is gathered.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def hidden_keys(model, layers_hidden: dict[int, torch.Tensor], total: int | None = None):
    """While active, layer l's attention cannot see the key columns where ``layers_hidden[l]`` (B, T) is True.

    Columns beyond the tensor's width (tokens fed later) stay visible. A mask narrower than the sequence so far
    (a sliding-window layer's decoding mask, ``total``: the tokens fed so far) holds its last columns.
    """
    lm = model.model.language_model
    handles = []

    def make(hidden):
        def hook(module, args, kwargs):
            mask = kwargs["attention_mask"]
            assert mask is not None and mask.dim() == 4 and mask.is_floating_point(), "reference needs eager masks"
            t = mask.shape[-1]
            start = 0 if total is None else total - t  # the sequence index of the mask's first column
            frame = torch.zeros(hidden.shape[0], max(start + t, hidden.shape[1]), dtype=torch.bool)
            frame[:, : hidden.shape[1]] = hidden
            cols = frame[:, start:start + t]
            extra = torch.zeros(cols.shape, dtype=mask.dtype).masked_fill(cols, torch.finfo(mask.dtype).min)
            kwargs["attention_mask"] = (mask + extra[:, None, None, :]).clamp(min=torch.finfo(mask.dtype).min)
            return args, kwargs
        return hook

    for layer, hidden in layers_hidden.items():
        handles.append(lm.layers[layer].register_forward_pre_hook(make(hidden), with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def pruned_columns(input_len: int, kept: list[list[int]], attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, N) True on valid prompt tokens that are not in ``kept[b]``."""
    b = len(kept)
    cols = attention_mask.bool().clone()
    for i, row in enumerate(kept):
        cols[i, torch.tensor(row, dtype=torch.long)] = False
    assert cols.shape == (b, input_len)
    return cols


def position_kwargs(model, attention_mask: torch.Tensor, last: int | None = None,
                    prefill_last: torch.Tensor | None = None, prompt_len: int = 0) -> dict:
    """Position ids to pass as ``generate()`` would: 1-D cumsum positions of the mask. For M-RoPE
    models (Qwen2-VL) the prefill passes none (the model builds 3-D positions from
    ``mm_token_type_ids``), and decoding steps continue every axis from the prompt's last position
    (``prefill_last`` (3, B), the positions the LLM got for the last of the ``prompt_len`` prompt tokens), one
    per token, as
    ``generate()`` does. (That is the cumsum position plus the model's ``rope_deltas``, except where a video's
    temporal positions run past the text's — Qwen2.5-VL's time-scaled frames — where ``rope_deltas`` counts from
    the larger.)"""
    pos = generate_positions(attention_mask)
    if model.config.model_type.startswith("qwen"):
        if last is None:
            return {}
        if prefill_last is None:
            return {"position_ids": pos[None, :, -last:].expand(3, -1, -1) + model.model.rope_deltas[None]}
        # tokens fed after the prompt before this forward's: the mask's columns beyond the prompt, minus ``last``
        fed = attention_mask.shape[1] - last - prompt_len
        return {"position_ids": prefill_last[:, :, None] + fed + torch.arange(1, last + 1)}
    return {"position_ids": pos if last is None else pos[:, -last:]}


def prompt_end(model, inputs: dict) -> torch.Tensor | None:
    """The M-RoPE positions the LLM gets for the prompt's last token in ``model(**inputs)`` (Qwen), else None."""
    if not model.config.model_type.startswith("qwen"):
        return None
    seen = {}
    lm = model.model.language_model
    handle = lm.register_forward_pre_hook(lambda m, a, kw: seen.update(pos=kw.get("position_ids")), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen["pos"][-3:, :, -1]


def generate_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as ``generate()`` derives them: cumsum of the mask, padding at 0."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


@torch.no_grad()
def masked_greedy(model, inputs: dict, steps: int, prefill_hidden: dict, decode_hidden):
    """Greedy decoding with hidden key columns: (tokens (B, steps), per-step logits list of (B, V)).

    ``prefill_hidden`` ({layer: (B, N) bool}) applies to the prompt's forward; ``decode_hidden(step)`` gives
    the columns hidden at decoding step ``step`` (1 = the first forward after the prefill).
    """
    am = inputs["attention_mask"]
    end = prompt_end(model, inputs)  # unaffected by the hidden keys: positions come from the inputs alone
    with hidden_keys(model, prefill_hidden):
        out = model(**inputs, **position_kwargs(model, am), use_cache=True)
    cache = out.past_key_values
    logits = [out.logits[:, -1].float()]
    tokens = [logits[-1].argmax(-1)]
    for step in range(1, steps):
        am = torch.cat([am, torch.ones(am.shape[0], 1, dtype=am.dtype)], dim=1)
        with hidden_keys(model, decode_hidden(step), total=am.shape[1]):
            out = model(input_ids=tokens[-1][:, None], attention_mask=am,
                        **position_kwargs(model, am, last=1, prefill_last=end, prompt_len=inputs["input_ids"].shape[1]),
                        past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits.append(out.logits[:, -1].float())
        tokens.append(logits[-1].argmax(-1))
    return torch.stack(tokens, dim=1), logits


def reference_greedy(model, inputs: dict, site: int, kept: list[list[int]], steps: int,
                     compact_earlier: bool = False, compact_from: int = 0):
    """Greedy decoding of the masked reference: (tokens (B, steps), per-step logits list of (B, V)).

    Layers >= ``site`` never see the pruned keys; with ``compact_earlier`` the layers ``compact_from`` ..
    ``site - 1`` stop seeing them from the first decoding step on (their prefill is unchanged).
    """
    am = inputs["attention_mask"]
    cols = pruned_columns(am.shape[1], kept, am)
    num_layers = len(model.model.language_model.layers)
    late = {layer: cols for layer in range(site, num_layers)}
    masks = dict(late)
    if compact_earlier:
        masks.update({layer: cols for layer in range(compact_from, site)})
    return masked_greedy(model, inputs, steps, late, lambda step: masks)


@torch.no_grad()
def reference_prefill_logits(model, inputs: dict, site: int, kept: list[list[int]]) -> torch.Tensor:
    """(B, N, V) logits of the masked reference on the prompt (positions as ``model(**inputs)`` uses)."""
    am = inputs["attention_mask"]
    cols = pruned_columns(am.shape[1], kept, am)
    late = {layer: cols for layer in range(site, len(model.model.language_model.layers))}
    with hidden_keys(model, late):
        return model(**inputs).logits.float()


def fastv_reference_kept(model_eager, inputs: dict, site: int, keep: int) -> list[list[int]]:
    """FastV's choice from the eager model's own attention weights: layer ``site-1``, last query,
    heads averaged, the ``keep`` largest visual tokens (plus every non-visual valid token)."""
    with torch.no_grad():
        out = model_eager(**inputs, output_attentions=True)
    att = out.attentions[site - 1][:, :, -1, :].float().mean(dim=1)  # (B, N)
    visual = inputs["input_ids"] == model_eager.config.image_token_id  # the image placeholder, in every family
    kept = []
    for b in range(att.shape[0]):
        vis_idx = visual[b].nonzero().flatten()
        top = vis_idx[att[b, vis_idx].argsort(descending=True, stable=True)[:keep]]
        text = (~visual[b] & inputs["attention_mask"][b].bool()).nonzero().flatten()
        kept.append(sorted(top.tolist() + text.tolist()))
    return kept


@torch.no_grad()
def hidden_at_layer(model, inputs: dict, layer: int) -> torch.Tensor:
    """(B, N, D) hidden states entering decoder ``layer`` of the unpruned model."""
    return model(**inputs, output_hidden_states=True).hidden_states[layer]


@torch.no_grad()
def reference_from_site(model, hidden: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, site: int,
                        key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """(B, K, V) logits of running decoder layers ``site..`` by hand on the tokens ``hidden`` (B, K, D).

    Written without tokenprune: rotary angles from ``positions`` (B, K) through the LLM's own
    rotary module, an additive causal mask over ``valid`` keys (B, K) plus ``key_bias`` (B, K) on
    every key column (ToMe's proportional attention), then the final norm and the LM head. For
    an eager-attention model.
    """
    lm = model.model.language_model
    b, k, _ = hidden.shape
    pe = lm.rotary_emb(hidden, positions)
    causal = torch.ones(k, k, dtype=torch.bool).tril()
    allowed = causal[None] & valid.bool()[:, None, :]
    allowed = allowed | torch.eye(k, dtype=torch.bool)[None]  # padding rows see themselves (no NaN)
    mask = torch.zeros(b, 1, k, k, dtype=hidden.dtype).masked_fill(~allowed[:, None], torch.finfo(hidden.dtype).min)
    if key_bias is not None:
        mask = mask + key_bias[:, None, None, :].to(hidden.dtype)
    h = hidden
    for layer in lm.layers[site:]:
        out = layer(h, attention_mask=mask, position_ids=positions, position_embeddings=pe)
        h = out[0] if isinstance(out, tuple) else out
    return model.lm_head(lm.norm(h)).float()


@contextlib.contextmanager
def hidden_image_features(model, pruned: torch.Tensor):
    """While active, no cross-attention layer of an Mllama model attends to the image features where
    ``pruned`` (B, M) is True (an additive min on those columns of its cross-attention mask), in the
    prefill and in every decoding step."""
    lm = model.model.language_model

    def hook(module, args, kwargs):
        mask = kwargs.get("cross_attention_mask")
        if mask is None:
            return None
        assert mask.is_floating_point() and mask.shape[-1] == pruned.shape[1]
        extra = torch.zeros(pruned.shape, dtype=mask.dtype).masked_fill(pruned, torch.finfo(mask.dtype).min)
        kwargs["cross_attention_mask"] = (mask + extra[:, None, None, :]).clamp(min=torch.finfo(mask.dtype).min)
        return args, kwargs

    handles = [lm.layers[i].register_forward_pre_hook(hook, with_kwargs=True) for i in lm.cross_attention_layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def pruned_features(num_features: int, kept: list[list[int]]) -> torch.Tensor:
    """(B, M) True on image features not in ``kept[b]``."""
    cols = torch.ones(len(kept), num_features, dtype=torch.bool)
    for i, row in enumerate(kept):
        cols[i, torch.tensor(row, dtype=torch.long)] = False
    return cols


def reference_kv_greedy(model, inputs: dict, kept_by_layer: dict[int, list[list[int]]], steps: int,
                        kept_from_step: dict[int, dict[int, list[list[int]]]] | None = None):
    """Greedy decoding of the KV-cache reference: the prefill is the full unpruned model; from the first
    decoding step on, layer l cannot see the prompt keys outside ``kept_by_layer[l][b]`` (input-frame
    indices; layers not named see everything). ``kept_from_step[s]`` replaces the kept sets of the layers
    it names from decoding step ``s`` (1 = the first token after the prefill) on. Returns (tokens (B, steps),
    per-step logits list of (B, V))."""
    am = inputs["attention_mask"]

    def hidden_at(step):
        kept_now = dict(kept_by_layer)
        for s in sorted(kept_from_step or {}):
            if s <= step:
                kept_now.update(kept_from_step[s])
        return {layer: pruned_columns(am.shape[1], kept, am) for layer, kept in kept_now.items()}

    return masked_greedy(model, inputs, steps, {}, hidden_at)


def cached_and_reprefilled_logits(model, pipe, batch, step_kwargs, steps: int = 3):
    """Per decoding step i of stock generate() under ``pipe``: (i, its logits (B, V), the last-token logits of a fresh
    pruned prefill of the prompt plus the i tokens generated before it). ``step_kwargs(ids, attention_mask)``: the
    forward's other keyword arguments (the images, and what the family needs besides)."""
    with pipe.attach(model):
        out = model.generate(**batch, max_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    new = out.sequences[:, batch["input_ids"].shape[1]:]
    for i in range(steps):
        ids = torch.cat([batch["input_ids"], new[:, :i]], dim=1)
        am = torch.cat([batch["attention_mask"], torch.ones_like(new[:, :i])], dim=1)
        with pipe.attach(model):
            fresh = model(input_ids=ids, attention_mask=am, **step_kwargs(ids, am))
        yield i, out.logits[i], fresh.logits[:, -1]


def clip_llava_flops(images: int, side: int, patch: int, d: int, m: int, layers: int, text: int) -> int:
    """Hand count (2 per multiply-add) of a CLIP tower and LLaVA's two-layer projector on ``images`` images:
    the patch convolution, per layer q/k/v/o projections, QKᵀ and AV over the patches and the CLS token, the
    MLP; the projector on the patch tokens (the CLS token dropped: ``default`` feature selection)."""
    patches = (side // patch) ** 2
    n = patches + 1
    conv = 2 * patches * (3 * patch * patch) * d
    layer = 2 * 4 * n * d * d + 2 * 2 * n * n * d + 2 * 2 * n * d * m
    projector = 2 * patches * (d * text + text * text)
    return images * (conv + layers * layer + projector)


def capture_state(model, batch, stage):
    """Run ``stage`` at layer 0 and hand back the TokenState it saw (with its signals)."""
    seen = {}

    class Spy(torch.nn.Module):
        needs_vision = True  # the tower's layers are hooked for pipelines that read them

        def forward(self, state):
            seen["state"] = state
            return state

    import tokenprune as tp

    pipe = tp.load_pipeline({"stages": [stage]})
    pipe.stages[0].operators.insert(0, Spy())
    with torch.no_grad(), pipe.attach(model):
        model(**batch)
    return seen["state"], pipe
