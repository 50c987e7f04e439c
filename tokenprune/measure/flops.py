"""Analytic FLOPs of the LLM with the real token count at each layer.

Two conventions:

- ``fastv``: FastV's per-layer ``4nd² + 2n²d + 2ndm`` (n tokens, d hidden size, m FFN size), as used
  to report theoretical FLOPs reductions in FastV (ECCV 2024) and the papers that follow it.
- ``exact``: 2 FLOPs per multiply-add of every matmul of a decoder layer: q/k/v/o projections with
  grouped-query attention (k/v are ``n_kv_heads * head_dim`` wide), the full ``n x n`` score and
  value products as an SDPA kernel computes them, and the gated MLP's three projections. Norms,
  rotary embedding and softmax are not counted (no matmuls). It matches ``torch.utils.flop_counter``.

Hybrid LLMs (Qwen3.5: three Gated DeltaNet layers in four) count their linear-attention layers without the
``n x n`` term, which they do not have. ``fastv``: ``4nd² + 2ndm``. ``exact``: the input projections (q, k, v,
the output gate z, the decay and write gates a, b), the depthwise causal convolution (``kernel`` multiply-adds per
channel and token), the output projection, the MLP, and the delta rule in its recurrent form — per token and value
head, three products with the ``d_k x d_v`` state (read with the key, write, read with the query). A chunked
prefill kernel computes more than the recurrent form (its intra-chunk products); that excess is not counted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from tokenprune.core.errors import ConfigError
from tokenprune.core.sites import CrossAttentionSite
from tokenprune.pipeline import Pipeline

CONVENTIONS = ("fastv", "exact")


@dataclass(frozen=True)
class LLMShape:
    """Geometry of an LLM: layers, hidden size d, FFN size m, attention heads."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    #: Linear-attention (Gated DeltaNet) layers of a hybrid LLM, and their geometry: key and value heads, their
    #: head dims, and the causal convolution's kernel width.
    recurrent: tuple[int, ...] = ()
    linear_key_heads: int = 0
    linear_value_heads: int = 0
    linear_key_dim: int = 0
    linear_value_dim: int = 0
    linear_conv: int = 0

    @classmethod
    def from_config(cls, text_config: Any, name: str = "model") -> LLMShape:
        heads = text_config.num_attention_heads
        types = getattr(text_config, "layer_types", None) or ()
        recurrent = tuple(i for i, t in enumerate(types) if t == "linear_attention")
        linear = {}
        if recurrent:
            linear = dict(linear_key_heads=text_config.linear_num_key_heads,
                          linear_value_heads=text_config.linear_num_value_heads,
                          linear_key_dim=text_config.linear_key_head_dim,
                          linear_value_dim=text_config.linear_value_head_dim,
                          linear_conv=text_config.linear_conv_kernel_dim)
        return cls(name=name, layers=text_config.num_hidden_layers, hidden=text_config.hidden_size,
                   intermediate=text_config.intermediate_size, heads=heads,
                   kv_heads=getattr(text_config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(text_config, "head_dim", None) or text_config.hidden_size // heads,
                   recurrent=recurrent, **linear)


def _shape(name: str, layers: int, d: int, m: int, heads: int, kv_heads: int, head_dim: int | None = None) -> LLMShape:
    return LLMShape(name, layers, d, m, heads, kv_heads, head_dim or d // heads)


def _hybrid(name: str, layers: int, d: int, m: int, heads: int, kv_heads: int, head_dim: int, every: int,
            key_heads: int, value_heads: int, key_dim: int, value_dim: int, conv: int) -> LLMShape:
    """A hybrid LLM whose every ``every``-th layer attends and the others are Gated DeltaNet layers."""
    return LLMShape(name, layers, d, m, heads, kv_heads, head_dim,
                    recurrent=tuple(i for i in range(layers) if (i + 1) % every),
                    linear_key_heads=key_heads, linear_value_heads=value_heads, linear_key_dim=key_dim,
                    linear_value_dim=value_dim, linear_conv=conv)


#: LLM geometries of the checkpoints papers report on (from their config.json files).
BUILTIN_SHAPES: dict[str, LLMShape] = {
    s.name: s for s in (
        _shape("llava-1.5-7b", 32, 4096, 11008, 32, 32),    # Vicuna-7B
        _shape("llava-1.5-13b", 40, 5120, 13824, 40, 40),   # Vicuna-13B
        _shape("llava-next-7b", 32, 4096, 11008, 32, 32),   # LLaVA-NeXT (v1.6) Vicuna-7B
        _shape("qwen2-vl-7b", 28, 3584, 18944, 28, 4),      # Qwen2-7B
        _shape("llava-onevision-7b", 28, 3584, 18944, 28, 4),  # llava-onevision-qwen2-7b: Qwen2-7B
        _shape("internvl3-8b", 28, 3584, 18944, 28, 4),     # InternVL3-8B: Qwen2.5-7B
        _shape("qwen3-vl-8b", 36, 4096, 12288, 32, 8),      # Qwen3-VL-8B: Qwen3-8B
        _shape("gemma-3-12b", 48, 3840, 15360, 16, 8, 256),  # Gemma 3 12B (head dim 256, not d / heads)
        # Qwen3.5-9B: layers 3, 7, ..., 31 attend; Gated DeltaNet with 16 key and 32 value heads of 128, conv 4
        _hybrid("qwen3.5-9b", 32, 4096, 12288, 16, 4, 256, 4, 16, 32, 128, 128, 4),
    )
}


def parse_shape(spec: str) -> LLMShape:
    """A built-in shape name, or ``d=4096,m=11008,layers=32[,heads=32,kv_heads=8]``."""
    if spec in BUILTIN_SHAPES:
        return BUILTIN_SHAPES[spec]
    if "=" not in spec:
        raise ConfigError("--shape", f"unknown shape {spec!r}; built-in: {', '.join(BUILTIN_SHAPES)}, "
                                     "or d=..,m=..,layers=..[,heads=..,kv_heads=..]")
    fields: dict[str, int] = {}
    for part in spec.split(","):
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in ("d", "m", "layers", "heads", "kv_heads"):
            raise ConfigError("--shape", f"unknown field {key!r} in {spec!r}; allowed: d, m, layers, heads, kv_heads")
        try:
            fields[key] = int(value)
        except ValueError:
            raise ConfigError("--shape", f"{key} must be an integer, got {value!r}") from None
        if fields[key] < 1:
            raise ConfigError("--shape", f"{key} must be >= 1, got {fields[key]}")
    missing = [k for k in ("d", "m", "layers") if k not in fields]
    if missing:
        raise ConfigError("--shape", f"missing {', '.join(missing)} in {spec!r}")
    heads = fields.get("heads", max(1, fields["d"] // 128))
    if fields["d"] % heads:
        raise ConfigError("--shape", f"d={fields['d']} is not divisible by heads={heads}")
    return _shape("custom", fields["layers"], fields["d"], fields["m"], heads, fields.get("kv_heads", heads))


def layer_flops(n: int, shape: LLMShape, convention: str = "fastv", layer: int | None = None) -> float:
    """FLOPs of decoder ``layer`` over ``n`` tokens (prefill); ``layer`` None: an attention layer."""
    d, m = shape.hidden, shape.intermediate
    if layer is not None and layer in shape.recurrent:
        return _recurrent_layer_flops(n, shape, convention)
    if convention == "fastv":
        return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m
    if convention == "exact":
        q_width, kv_width = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
        projections = 2 * n * d * (2 * q_width + 2 * kv_width)  # q, o and k, v
        attention = 2 * 2 * n * n * q_width  # Q K^T and P V over all heads
        mlp = 3 * 2 * n * d * m  # gate, up, down
        return projections + attention + mlp
    raise ConfigError("--convention", f"unknown convention {convention!r}; allowed: {', '.join(CONVENTIONS)}")


def _recurrent_layer_flops(n: int, shape: LLMShape, convention: str) -> float:
    """FLOPs of a Gated DeltaNet layer over ``n`` tokens (the module docstring says what is counted)."""
    d, m = shape.hidden, shape.intermediate
    if convention == "fastv":
        return 4 * n * d * d + 2 * n * d * m
    if convention == "exact":
        keys = shape.linear_key_heads * shape.linear_key_dim
        values = shape.linear_value_heads * shape.linear_value_dim
        projections = 2 * n * d * (2 * keys + values + values + 2 * shape.linear_value_heads)  # qkv, z, a and b
        conv = 2 * n * (2 * keys + values) * shape.linear_conv
        state = 3 * 2 * n * shape.linear_value_heads * shape.linear_key_dim * shape.linear_value_dim
        out = 2 * n * values * d
        mlp = 3 * 2 * n * d * m
        return projections + conv + state + out + mlp
    raise ConfigError("--convention", f"unknown convention {convention!r}; allowed: {', '.join(CONVENTIONS)}")


def layer_token_counts(pipeline: Pipeline | None, num_layers: int, n_tokens: int, n_visual: int) -> list[tuple[int, int]]:
    """(tokens, visual tokens) entering each decoder layer under ``pipeline`` (None: unpruned)."""
    if not 0 <= n_visual <= n_tokens:
        raise ConfigError("--visual", f"must be in 0..{n_tokens} (the prompt length), got {n_visual}")
    sites = {}
    if pipeline is not None:
        pipeline.validate_for_depth(num_layers)
        for i, stage in enumerate(pipeline.stages):
            if isinstance(stage.site, CrossAttentionSite):
                raise ConfigError(f"stages.{i}.layer", "analytic FLOPs model decoder-only LVLMs; a 'cross_attention' "
                                  "site (Mllama) is not modelled yet")
        sites = {stage.site.decoder_layer: (i, stage) for i, stage in enumerate(pipeline.stages)
                 if stage.site.decoder_layer is not None}
    counts, n, v = [], n_tokens, n_visual
    if pipeline is not None and pipeline.input is not None:
        # images shown at ``scale`` per side: about scale² of the visual tokens (the processor rounds each side to
        # its patch grid; a run counts the real ones)
        v = round(n_visual * pipeline.input["scale"] ** 2)
        n = n_tokens - (n_visual - v)
    for layer in range(num_layers):
        if layer in sites:
            i, stage = sites[layer]
            try:
                kept = stage.expected_kept(v)
            except NotImplementedError as e:
                raise ConfigError(f"stages.{i}", f"{e}: its kept count depends on the input, so analytic FLOPs need "
                                  "the measured counts (run the pipeline and read its trace)") from None
            n, v = n - (v - kept), kept
        counts.append((n, v))
    return counts


@dataclass
class FlopsReport:
    flops: float
    baseline_flops: float
    reduction: float
    equivalent_visual_tokens: float
    convention: str
    per_layer_tokens: list[int]

    def as_json(self) -> dict[str, float]:
        d = asdict(self)
        return {k: d[k] for k in ("flops", "baseline_flops", "reduction", "equivalent_visual_tokens")}


def pipeline_flops(pipeline: Pipeline | None, shape: LLMShape, n_tokens: int, n_visual: int,
                   convention: str = "fastv") -> FlopsReport:
    """Total LLM prefill FLOPs over all layers with and without ``pipeline``.

    ``n_tokens`` is the prompt length of which ``n_visual`` are visual. ``reduction`` is
    ``1 - flops / baseline_flops``; ``equivalent_visual_tokens`` the layer-averaged visual-token count.
    """
    if convention not in CONVENTIONS:
        raise ConfigError("--convention", f"unknown convention {convention!r}; allowed: {', '.join(CONVENTIONS)}")
    counts = layer_token_counts(pipeline, shape.layers, n_tokens, n_visual)
    flops = sum(layer_flops(n, shape, convention, i) for i, (n, _) in enumerate(counts))
    baseline = sum(layer_flops(n_tokens, shape, convention, i) for i in range(shape.layers))
    return FlopsReport(flops=float(flops), baseline_flops=float(baseline), reduction=1.0 - flops / baseline,
                       equivalent_visual_tokens=sum(v for _, v in counts) / len(counts), convention=convention,
                       per_layer_tokens=[n for n, _ in counts])


def measured_flops(shape: LLMShape, n_tokens: int, n_visual: int, stages: list[tuple[int, int, int]],
                   convention: str = "exact") -> FlopsReport:
    """Like :func:`pipeline_flops`, from the counts a run measured: ``stages`` lists ``(layer, tokens_after,
    visual_after)`` of one sample for each stage that ran (``pipeline.trace``), so adaptive budgets and
    merges that add tokens are counted as they happened."""
    if convention not in CONVENTIONS:
        raise ConfigError("flops_convention", f"unknown convention {convention!r}; allowed: {', '.join(CONVENTIONS)}")
    after = {layer: (n, v) for layer, n, v in stages}
    counts, n, v = [], n_tokens, n_visual
    for layer in range(shape.layers):
        if layer in after:
            n, v = after[layer]
        counts.append((n, v))
    flops = sum(layer_flops(k, shape, convention, i) for i, (k, _) in enumerate(counts))
    baseline = sum(layer_flops(n_tokens, shape, convention, i) for i in range(shape.layers))
    return FlopsReport(flops=float(flops), baseline_flops=float(baseline), reduction=1.0 - flops / baseline,
                       equivalent_visual_tokens=sum(x for _, x in counts) / len(counts), convention=convention,
                       per_layer_tokens=[k for k, _ in counts])


def ideal_speedups(flops: float | None, baseline_flops: float | None, vision_flops: float | None = None,
                   baseline_vision_flops: float | None = None) -> tuple[float | None, float | None]:
    """The FLOPs-ideal speed-ups of a prefill: of the LLM's (``baseline_flops / flops``), and of the whole prefill,
    the vision side's FLOPs added to both sides; None where a count is unknown (or zero)."""
    if not flops or baseline_flops is None:
        return None, None
    if vision_flops is None or baseline_vision_flops is None or not flops + vision_flops:
        return baseline_flops / flops, None
    return baseline_flops / flops, (baseline_flops + baseline_vision_flops) / (flops + vision_flops)
