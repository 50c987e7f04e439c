"""``tokenprune bench CONFIG [--json FILE] [--markdown FILE]``: does pruning turn FLOPs into time?

For each model of the config and each variant (unpruned first) at each batch size: time to first token
(prefill), decode time per token, tokens/s, KV-cache bytes per sample, the analytic FLOPs reduction
with the measured token counts, and the time inside the pipeline's operators. After ``warmup``
rounds, ``repeats`` rounds run every variant once each, in alternation, in this one process;
the table holds medians. Speed-ups are ratios of medians measured in the same run.

Models: ``path`` (a folder, a hub id or ``reference``: inputs from the shapes benchmark through its
processor), or ``synthetic: llava_next`` (a random-init LLaVA-NeXT built from config at a real
geometry: 336-px tiles of 14-px patches, one 672×672 image = base tile + 4 anyres tiles = 2880
visual tokens plus newline tokens, with the LLM given by ``text`` — scaled down for a CPU, or at
LLaVA-NeXT-7B's real shape on a GPU; the vision tower is always a small one), or ``synthetic: mllama``
(LLaMA-3.2-Vision's image geometry, 4 tiles of 560 px = 6404 image features, and the LLM ``text``; its
FLOPs are not modelled and read as unknown). ``dtype``
(float32, bfloat16, float16) and ``device`` place the model; a synthetic model is built there directly. A model
may set its own ``batch_sizes``, ``repeats`` and ``variants`` (names; the unpruned one included): a model at
LLaVA-NeXT-7B's width runs batch 1 and a few variants on a CPU. ``full_layers``: the depth of the real model that
a depth-cut model stands for (32 for LLaVA-NeXT-7B); its decoder layers are then timed in extra forwards and the
operator overhead is also given against the prefill projected to that depth (the measured prefill plus the
missing layers at the measured time per layer), which is what the overhead target reads on that model.
``count_ideal: true``: the stock LLM (no image, no pipeline) is also timed at each distinct token count the
variants' layers run on, and each variant gets the count-ideal prefill (:func:`count_ideal_prefill_ms`): what a
pruning that cost nothing itself would reach on this hardware, the parts outside the decoder layers unchanged. A
speed-up short of the FLOPs-ideal but near the count-ideal is the hardware's rate at short sequences, not the
pruning's cost.

A variant's ``materialize_attention: [layers]`` runs those decoder layers' attention as an explicit
``softmax(QKᵀ)V`` with the (B, H, N, N) weights materialised (:func:`materialized_attention`): with
``pipeline: fastv`` and layer K−1 this is the FastV-style reference, which reads layer K−1's attention map
from an eager forward (Chen et al., ECCV 2024), against tokenprune's recomputed rows.

The config is checked whole before any model loads (:data:`SCHEMA`: every key typed, unknown keys and
interpolation refused, errors naming the key), and so are the ``--json`` and ``--markdown`` paths.

Targets (docs/benchmarks.md) are checked from the results by :func:`check_targets`, never by timed tests, on every
model at 2880 visual tokens or more (:func:`target_models`).
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tokenprune.adapters import get_adapter
from tokenprune.core.config import apply_overrides
from tokenprune.core.errors import ConfigError, PipelineRuntimeError
from tokenprune.core.values import (
    Bool,
    Fields,
    Float,
    Int,
    ListOf,
    MappingOf,
    OneOf,
    Optional,
    Spec,
    Str,
    check_schema,
    given,
)
from tokenprune.core.yaml_files import read_yaml, refuse_interpolation
from tokenprune.eval.models import build_prompt, load_model
from tokenprune.measure.flops import LLMShape, ideal_speedups, measured_flops
from tokenprune.measure.memory import cache_bytes
from tokenprune.measure.provenance import machine
from tokenprune.measure.timing import StepClock, VisionClock
from tokenprune.pipeline import load_pipeline
from tokenprune.reference import shapes
from tokenprune.reference.tiny import (
    TINY_BOS,
    TINY_EOS,
    TINY_IMAGE_TOKEN,
    TINY_PAD,
    tiny_llava_next_inputs,
    tiny_mllama_inputs,
)

DEFAULTS: dict[str, Any] = {
    "models": [],
    "variants": [],  # {name, pipeline (null: unpruned), overrides: [...]}
    "batch_sizes": [1, 8],
    "repeats": 5,
    "warmup": 1,
    "new_tokens": 8,
    "prompt_words": 12,  # synthetic models: text tokens after the image
    "threads": None,  # torch.set_num_threads when set
}
#: ``synthetic:`` model kinds of a bench config (builders in :data:`SYNTHETIC`)
SYNTHETIC_NAMES = ("llava_next", "mllama")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


_TEXT = {"hidden": Int(1), "intermediate": Int(1), "layers": Int(1), "heads": Int(1), "kv_heads": Int(1),
         "cross_attention_layers": ListOf(Int(0))}
SCHEMA: dict[str, Any] = {
    "models": ListOf(Fields({
        "name": Str(), "path": Optional(Str()), "synthetic": Optional(Str(tuple(SYNTHETIC_NAMES))),
        "text": Optional(Fields(_TEXT, required=("hidden", "intermediate", "layers", "heads"))),
        "dtype": Optional(Str(tuple(DTYPES))), "device": Optional(Str()),
        "batch_sizes": Optional(ListOf(Int(1))), "repeats": Optional(Int(1)), "variants": Optional(ListOf(Str())),
        "full_layers": Optional(Int(1)),
        # also time the stock LLM at each variant's per-layer token counts: the prefill a pruning with no cost of
        # its own would reach on this hardware (the count-ideal), beside the FLOPs-ideal
        "count_ideal": Optional(Bool()),
        # every variant's operator overhead is checked against this share of the unpruned prefill (at batch 1; at
        # full_layers where given), and every pruning variant's speed-up against 80% of its FLOPs-ideal
        "overhead_target": Optional(Float(above=0.0))}, required=("name",))),
    "variants": ListOf(Fields({"name": Str(), "pipeline": Optional(OneOf(Str(), MappingOf())),
                               "overrides": Optional(ListOf(Str())),
                               "materialize_attention": Optional(ListOf(Int(0)))}, required=("name",))),
    "batch_sizes": ListOf(Int(1)), "repeats": Int(1), "warmup": Int(0), "new_tokens": Int(1),
    "prompt_words": Int(1), "threads": Optional(Int(1)),
}


def load_bench_config(path: str | Path, overrides: list[str] = ()) -> DictConfig:
    """Defaults, the YAML file (read strictly, no interpolation), then ``KEY=VALUE`` overrides; every value typed
    and checked (:mod:`tokenprune.core.values`), with errors naming the key, before any model loads."""
    raw = read_yaml(path, "bench config")
    if not isinstance(raw, dict):
        raise ConfigError(None, f"bench config {path}: must be a mapping of keys ({', '.join(SCHEMA)}), "
                                f"got {given(raw)}")
    refuse_interpolation(raw, what="a bench config")
    check_schema(raw, _keys_only(SCHEMA))  # unknown top-level keys named before the merge
    try:
        merged = OmegaConf.merge(OmegaConf.create(DEFAULTS), OmegaConf.create(raw))
    except OmegaConfBaseException as e:  # a section given as a value (models: 3), say
        raise ConfigError(getattr(e, "full_key", None) or None, str(e).splitlines()[0]) from None
    apply_overrides(merged, overrides, example="repeats=3", what="a bench config")
    data = check_schema(OmegaConf.to_container(merged), SCHEMA)
    if not data["models"] or not data["variants"]:
        raise ConfigError("models" if not data["models"] else "variants", "a benchmark needs at least one")
    names = [v["name"] for v in data["variants"]]
    for i, m in enumerate(data["models"]):
        if bool(m.get("path")) == bool(m.get("synthetic")):
            raise ConfigError(f"models.{i}", "give exactly one of path, synthetic")
        if m.get("synthetic") and not m.get("text"):
            raise ConfigError(f"models.{i}.text", "a synthetic model needs its LLM shape: {hidden, intermediate, "
                                                  "layers, heads}")
        layers = m["text"]["layers"] if m.get("synthetic") else None
        full = m.get("full_layers")
        if full is not None and full < (layers or 1):
            raise ConfigError(f"models.{i}.full_layers", f"{full!r}; allowed: an integer >= the model's own number of "
                              f"layers{f' ({layers})' if layers else ''}")
        own = m.get("variants")
        if own is not None:
            if not own:
                raise ConfigError(f"models.{i}.variants", f"{own!r}; allowed: a list of variant names ({', '.join(names)})")
            unknown_names = [x for x in own if x not in names]
            if unknown_names:
                raise ConfigError(f"models.{i}.variants", f"unknown variant {unknown_names[0]!r}; allowed: {', '.join(names)}")
            if names[0] not in own:
                raise ConfigError(f"models.{i}.variants", f"must include the unpruned variant {names[0]!r} (speed-ups and "
                                  "overheads are relative to it)")
    if len(set(names)) != len(names):
        raise ConfigError("variants", f"variant names must differ; {names}")
    if data["variants"][0].get("pipeline") is not None:
        raise ConfigError("variants.0", "the first variant must be the unpruned model (pipeline: null)")
    return OmegaConf.create(data)


def _keys_only(schema: dict[str, Any]) -> dict[str, Any]:
    return {k: Spec() for k in schema}


def _plain(value: Any) -> Any:
    """A config value as plain Python (lists and dicts out of OmegaConf's containers)."""
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def synthetic_llava_next(text: dict[str, int], seed: int = 0, dtype: torch.dtype | None = None,
                         device: str | torch.device | None = None):
    """A random-init ``LlavaNextForConditionalGeneration`` at LLaVA-NeXT geometry with the LLM shape ``text``,
    built directly on ``device`` in ``dtype`` (a 7B LLM is never materialised in fp32 on the host)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                              image_size=336, patch_size=14, projection_dim=64)  # 4 layers: VScan reads layer 2
    llm = LlamaConfig(hidden_size=text["hidden"], intermediate_size=text["intermediate"],
                      num_hidden_layers=text["layers"], num_attention_heads=text["heads"],
                      num_key_value_heads=text.get("kv_heads", text["heads"]), vocab_size=256,
                      max_position_embeddings=8192, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = LlavaNextConfig(vision_config=vision, text_config=llm, image_token_id=3,
                             image_grid_pinpoints=[[672, 672]], vision_feature_layer=-2,
                             vision_feature_select_strategy="default", pad_token_id=0)
    with torch.device(device or "cpu"):
        model = LlavaNextForConditionalGeneration._from_config(config, attn_implementation="sdpa",
                                                               dtype=dtype or torch.float32)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # always decode new_tokens steps
    return model.eval()


def synthetic_mllama(text: dict[str, Any], seed: int = 0, dtype: torch.dtype | None = None,
                     device: str | torch.device | None = None):
    """A random-init ``MllamaForConditionalGeneration`` at LLaMA-3.2-11B-Vision's image geometry (560-px tiles of
    14-px patches, up to 4 tiles: 1601 image features a tile) with a small vision tower and the LLM shape ``text``
    (``cross_attention_layers`` default: every 5th layer from layer 3, as the 11B model has them), built on
    ``device`` in ``dtype``. Its cross-attention gates are set to 1 (a random Mllama starts with them at 0, images
    ignored)."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(hidden_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=4, intermediate_size=128,
                  vision_output_dim=192, image_size=560, patch_size=14, max_num_tiles=4,
                  intermediate_layers_indices=[0, 1])
    layers = int(text["layers"])
    llm = dict(vocab_size=256, hidden_size=text["hidden"], intermediate_size=text["intermediate"],
               num_hidden_layers=layers, num_attention_heads=text["heads"],
               num_key_value_heads=text.get("kv_heads", text["heads"]),
               cross_attention_layers=list(text.get("cross_attention_layers") or range(3, layers, 5)),
               bos_token_id=TINY_BOS, eos_token_id=TINY_EOS, pad_token_id=TINY_PAD, max_position_embeddings=8192)
    config = MllamaConfig(vision_config=vision, text_config=llm, image_token_index=TINY_IMAGE_TOKEN)
    with torch.device(device or "cpu"):
        model = MllamaForConditionalGeneration._from_config(config, attn_implementation="sdpa",
                                                            dtype=dtype or torch.float32)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            if hasattr(layer, "cross_attn_attn_gate"):
                layer.cross_attn_attn_gate.fill_(1.0)
                layer.cross_attn_mlp_gate.fill_(1.0)
    model.generation_config.pad_token_id = TINY_PAD
    model.generation_config.eos_token_id = None  # always decode new_tokens steps
    return model.eval()


#: ``synthetic:`` model builders of a bench config
SYNTHETIC = dict(zip(SYNTHETIC_NAMES, (synthetic_llava_next, synthetic_mllama)))


def _synthetic_inputs(model, kind: str, batch: int, words: int) -> dict[str, torch.Tensor]:
    """``batch`` identical-length prompts, each with one image — ``llava_next``: 672×672 (all anyres tiles);
    ``mllama``: 4 tiles — and ``words`` text tokens."""
    prompts = [[10 + i % 100 for i in range(words)]] * batch
    if kind == "mllama":
        return tiny_mllama_inputs(model, tiles=[4] * batch, prompts=prompts)
    return tiny_llava_next_inputs(model, image_sizes=[(672, 672)] * batch, prompts=prompts)


def _reference_inputs(processor, batch: int) -> dict[str, torch.Tensor]:

    items = shapes.load_split("test", size=batch)
    processor.tokenizer.padding_side = "left"
    return dict(processor(images=[it["image"] for it in items], text=[build_prompt(processor, it["question"])
                                                                      for it in items], return_tensors="pt", padding=True))


def _load(model_cfg, device: torch.device) -> tuple[Any, Any]:
    if model_cfg.get("synthetic"):
        build = SYNTHETIC[model_cfg.synthetic]
        return build(OmegaConf.to_container(model_cfg.text), dtype=DTYPES[model_cfg.get("dtype") or "float32"],
                     device=device), None

    return load_model({"path": model_cfg.path, "dtype": model_cfg.get("dtype", "float32"),
                       "attn_implementation": "sdpa", "device_map": None, "trust_remote_code": False})


def _measure(model, inputs, pipeline, new_tokens: int, shape, flops_cache: dict | None = None) -> dict[str, Any]:
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    clock = StepClock(device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  logits_processor=LogitsProcessorList([clock]), return_dict_in_generate=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        t0 = time.perf_counter()
        with VisionClock(model) as vision:
            clock.start()
            if pipeline is None:
                out = model.generate(**inputs, **kwargs)
                trace = []
            else:
                with pipeline.attach(model):
                    out = model.generate(**inputs, **kwargs)
                    trace = list(pipeline.trace)
        steps = clock.intervals_ms()
        total = (time.perf_counter() - t0) * 1000.0
        vision_ms = vision.ms()
        vision_flops = vision.flops(flops_cache) / inputs["input_ids"].shape[0]
    b = inputs["input_ids"].shape[0]
    n = int(inputs["attention_mask"][0].sum())
    prefill = [t for t in trace if t.site == "prefill"]
    adapter = get_adapter(model)
    v = adapter.visual_token_counts(inputs)[0]
    report = None  # analytic FLOPs do not model cross-attention yet (docs/flops.md)
    if adapter.decoder_only:
        report = measured_flops(shape, n, v, [(t.layer, t.tokens_after[0], t.visual_after[0]) for t in prefill],
                                "exact")
    return {"prefill_ms": steps[0], "vision_ms": vision_ms, "llm_prefill_ms": steps[0] - vision_ms,
            "decode_ms_per_token": statistics.median(steps[1:]) if len(steps) > 1 else None,
            "tokens_per_s": b * new_tokens / (total / 1000.0), "kv_cache_bytes": cache_bytes(out.past_key_values) / b,
            "operator_ms": sum(t.operator_ms for t in trace), "flops_reduction": report.reduction if report else None,
            # per sample, exact convention: the LLM's prefill (pruned and unpruned) and the vision side's
            "flops": report.flops if report else None, "baseline_flops": report.baseline_flops if report else None,
            "vision_flops": vision_flops,
            # the part spent scoring and cutting the caches of kv_cache stages, which grows with the layers compressed
            "kv_operator_ms": sum(t.operator_ms for t in trace if t.site == "kv_cache"),
            # per operator, "<stage>.<index>:<op>" (a lazy signal is charged to the first operator that asks for it;
            # a kv_cache stage's operators summed over the layers they compress)
            "operator_ms_by_op": _by_op([t for t in trace if t.site in ("prefill", "kv_cache")]),
            # {layer: the tokens it runs on} (decoder layers; the count-ideal reads it)
            "layer_tokens": dict(enumerate(report.per_layer_tokens)) if report else None,
            "visual_tokens": v, "visual_tokens_kept": prefill[-1].visual_after[0] if prefill else v,
            # a kv_cache stage: the visual entries its layers' caches keep, averaged over the layers
            "kv_visual_kept": statistics.mean(t.visual_after[0] for t in kv) if (kv := [
                t for t in trace if t.site == "kv_cache"]) else None,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}


def _by_op(traces) -> dict[str, float]:
    """``{"<stage>.<index>:<op>": ms}`` over ``traces``, summed where a stage ran several times (one entry a layer
    at the kv_cache site)."""
    out: dict[str, float] = {}
    for t in traces:
        for k, ms in t.operator_ms_by_op.items():
            out[f"{t.stage}.{k}"] = out.get(f"{t.stage}.{k}", 0.0) + ms
    return out


def _clock(cuda: bool):
    """A wall clock in seconds that waits for the GPU's queued work first when ``cuda``."""
    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    return now


def _layer_times(layers, forward, runs: int, cuda: bool) -> tuple[float, float]:
    """(mean wall time of one of ``layers`` in a call of ``forward()`` in ms, the share of the call's time spent in
    them), medians over ``runs`` calls, timed by hooks on the layers."""
    now = _clock(cuda)
    starts: list[float] = []
    spent: list[float] = []

    handles = [m.register_forward_pre_hook(lambda *a: starts.append(now())) for m in layers]
    handles += [m.register_forward_hook(lambda *a: spent.append(now() - starts.pop())) for m in layers]
    per_run, shares = [], []
    try:
        with torch.no_grad():
            for _ in range(runs):
                spent.clear()
                t0 = now()
                forward()
                total = now() - t0
                per_run.append(1000.0 * sum(spent) / len(spent))
                shares.append(sum(spent) / total)
    finally:
        for h in handles:
            h.remove()
    return statistics.median(per_run), statistics.median(shares)


def _decoder_layer_times(model, inputs, runs: int) -> tuple[float, float]:
    """(mean wall time of one decoder layer in ms, the share of the forward spent in the decoder layers) in prefill
    forwards of ``inputs`` of their own (not the measured ones), medians over ``runs``."""
    return _layer_times(get_adapter(model).layers, lambda: model(**inputs), runs, next(model.parameters()).is_cuda)


class StockLayerTimes:
    """Mean wall time of one decoder layer of the stock LLM (no image, no pipeline, the model's own causal mask) on
    ``batch`` sequences of n tokens, measured once per n (:meth:`__call__`, ms)."""

    def __init__(self, model, batch: int, runs: int):
        self.adapter = get_adapter(model)
        self.batch, self.runs = batch, runs
        self.cuda = next(model.parameters()).is_cuda
        self.vocab = self.adapter.language_model.get_input_embeddings().num_embeddings
        self.device = next(model.parameters()).device
        self.ms: dict[int, float] = {}

    def __call__(self, tokens: int) -> float:
        if tokens not in self.ms:
            g = torch.Generator().manual_seed(tokens)
            ids = torch.randint(0, self.vocab, (self.batch, tokens), generator=g).to(self.device)
            lm = self.adapter.language_model
            with torch.no_grad():
                lm(input_ids=ids, use_cache=False)  # a first call at a new length pays one-off allocations
            self.ms[tokens] = _layer_times(self.adapter.layers, lambda: lm(input_ids=ids, use_cache=False), self.runs,
                                           self.cuda)[0]
        return self.ms[tokens]


def count_ideal_prefill_ms(base_prefill_ms: float, layer_share: float, tokens: int, layer_tokens: dict[int, int],
                           layer_ms) -> float:
    """The prefill a pruning that cost nothing itself would take: the unpruned prefill with the part spent in the
    decoder layers (``layer_share`` of a forward, measured in the model's own forwards) scaled layer by layer by the
    stock LLM's time at the count that layer runs on over its time at ``tokens`` (``layer_tokens``: ``{layer: tokens
    it runs on}`` for every decoder layer, :func:`~tokenprune.measure.flops.measured_flops`'s counts; ``layer_ms(n)``:
    one stock layer at n tokens). Everything outside the decoder layers (the vision tower, the projector, the image
    features' packing, the embedding, the head) stays. Only ratios of times measured together enter, so timings taken
    at different moments never subtract. Below the FLOPs-ideal where short sequences run below the FLOP rate of long
    ones, and where the parts outside the layers are not negligible; the gap from it to the measured prefill is the
    pruning's own cost (operators, gathers, hooks)."""
    ratio = statistics.mean(layer_ms(int(n)) / layer_ms(tokens) for n in layer_tokens.values())
    return base_prefill_ms * (1.0 - layer_share * (1.0 - ratio))


def run_bench(cfg: DictConfig, log=print) -> dict[str, Any]:
    """Measure every (model, variant, batch size); returns ``{"machine", "rows": [...]}``."""

    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    pipelines = {v.name: (load_pipeline(v.pipeline, list(v.get("overrides") or [])) if v.get("pipeline") else None)
                 for v in cfg.variants}
    for p in pipelines.values():
        if p is not None:
            p.time_operators = True  # operator_ms_by_op (synchronises between operators on a GPU)
    rows: list[dict[str, Any]] = []
    for m in cfg.models:
        device = torch.device(m.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, processor = _load(m, device)
        model.to(device)
        shape = LLMShape.from_config(model.config.text_config, name=m.name) if get_adapter(model).decoder_only \
            else None
        variants = [v for v in cfg.variants if m.get("variants") is None or v.name in m.variants]
        repeats = cfg.repeats if m.get("repeats") is None else int(m.repeats)
        for batch in (m.get("batch_sizes") or cfg.batch_sizes):
            inputs = _synthetic_inputs(model, m.synthetic, batch, cfg.prompt_words) if m.get("synthetic") else \
                _reference_inputs(processor, batch)
            inputs = {k: t.to(device) for k, t in inputs.items()}
            samples: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
            flops_cache: dict = {}  # the vision side's FLOPs, counted once per input shape
            failed: dict[str, str] = {}  # a variant that fails is recorded and left out of the later repeats
            for r in range(cfg.warmup + repeats):
                for v in variants:  # in alternation, so drifts in machine load hit every variant alike
                    if v.name in failed:
                        continue
                    try:
                        with materialize_attention(model, list(v.get("materialize_attention") or [])):
                            res = _measure(model, inputs, pipelines[v.name], cfg.new_tokens, shape, flops_cache)
                    except (ConfigError, PipelineRuntimeError, RuntimeError, ValueError, NotImplementedError) as e:
                        if v is variants[0]:
                            raise  # the unpruned model is what every speed-up is read against
                        failed[v.name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                        log(f"{m.name:<18} {v.name:<14} batch {batch}: failed ({failed[v.name]}); going on")
                        continue
                    if r >= cfg.warmup:
                        samples[v.name].append(res)
            full = m.get("full_layers")
            depth = model.config.text_config.num_hidden_layers
            if full is not None or m.get("count_ideal"):  # one decoder layer's time in the model's own prefill
                layer_ms, layer_share = _decoder_layer_times(model, inputs, repeats)
            if full is not None:  # the prefill of the real depth: the measured one plus the missing layers' time
                full_prefill = statistics.median(x["prefill_ms"] for x in samples[variants[0].name]) \
                    + (full - depth) * layer_ms
            stock = StockLayerTimes(model, batch, repeats) if m.get("count_ideal") else None
            base = None
            for v in variants:
                if v.name in failed:
                    rows.append({"model": m.name, "variant": v.name, "batch": batch, "error": failed[v.name]})
                    continue
                row = {"model": m.name, "variant": v.name, "batch": batch, **_medians(samples[v.name])}
                if full is not None:  # kv_cache stages score every compressed layer: that part grows with depth
                    ops_full = row["operator_ms"] + row["kv_operator_ms"] * (full / depth - 1)
                    row.update(full_layers=full, layer_ms=layer_ms, full_depth_prefill_ms=full_prefill,
                               operator_ms_full_depth=ops_full, operator_overhead_full_depth=ops_full / full_prefill)
                if base is None:
                    base = row
                if m.get("overhead_target") is not None:
                    row["overhead_target"] = float(m.overhead_target)
                row["prefill_speedup"] = base["prefill_ms"] / row["prefill_ms"]
                modelled = row["flops_reduction"] is not None  # None: FLOPs not modelled (Mllama's cross-attention)
                # the ideal: the vision tower's time (the unpruned one's) is fixed, the rest shrinks with the LLM's
                # FLOPs
                fixed = min(base.get("vision_ms") or 0.0, base["prefill_ms"])
                row["ideal_speedup"] = base["prefill_ms"] / (fixed + (base["prefill_ms"] - fixed) * max(
                    1e-9, 1.0 - row["flops_reduction"])) if modelled else None
                row["speedup_vs_ideal"] = row["prefill_speedup"] / row["ideal_speedup"] if modelled else None
                # the vision side's FLOPs are the variant's own on both sides: pruning after the tower keeps them
                row["flops_speedup"], row["flops_speedup_with_vision"] = ideal_speedups(
                    row.get("flops"), row.get("baseline_flops"), row.get("vision_flops"), row.get("vision_flops"))
                if stock is not None and row.get("layer_tokens") is not None:
                    row["count_ideal_prefill_ms"] = count_ideal_prefill_ms(
                        base["prefill_ms"], layer_share, int(inputs["attention_mask"][0].sum()), row["layer_tokens"],
                        stock)
                    row["count_ideal_speedup"] = base["prefill_ms"] / row["count_ideal_prefill_ms"]
                    row["speedup_vs_count_ideal"] = row["count_ideal_prefill_ms"] / row["prefill_ms"]
                row["operator_overhead"] = row["operator_ms"] / base["prefill_ms"]
                row["kv_ratio"] = row["kv_cache_bytes"] / base["kv_cache_bytes"]
                row["tokens_per_s_ratio"] = row["tokens_per_s"] / base["tokens_per_s"]
                rows.append(row)
                log(f"{m.name:<18} {v.name:<14} batch {batch}: prefill {row['prefill_ms']:.1f} ms "
                    f"(x{row['prefill_speedup']:.2f}, ideal {_x(row['ideal_speedup'])}), "
                    f"operators {row['operator_ms']:.1f} ms, "
                    f"{row['tokens_per_s']:.1f} tok/s")
        del model
    return {"machine": machine(), "rows": rows}


def materialized_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention as an eager forward computes it: ``softmax(QKᵀ · scaling + mask) V`` with the (B, H, Q, K)
    weights materialised (and returned). A transformers attention function (registered as
    ``"tokenprune_materialized"``); it reads the masks the model built for SDPA — none (causal, the queries
    being the last Q of the K positions), a boolean (True = attend) or an additive one."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)).float() * scaling  # (B, H, Q, K)
    q_len, k_len = weights.shape[-2:]
    lowest = torch.finfo(weights.dtype).min  # as transformers' eager path: a padding row attends uniformly, no NaN
    if attention_mask is None:
        if q_len > 1:
            causal = torch.ones(q_len, k_len, dtype=torch.bool, device=weights.device).tril(k_len - q_len)
            weights = weights.masked_fill(~causal, lowest)
    elif attention_mask.dtype == torch.bool:
        weights = weights.masked_fill(~attention_mask[..., :k_len], lowest)
    else:
        weights = weights + attention_mask[..., :k_len].float()
    weights = torch.softmax(weights, dim=-1).to(query.dtype)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (B, Q, H, hd)
    return out, weights


class materialize_attention:  # noqa: N801 - used as a context manager, named for what it does
    """Within the block, decoder layers ``layers`` of ``model`` run :func:`materialized_attention`.

    Each listed layer's attention module gets its own copy of the config naming that function; the other
    layers, and the layers afterwards, keep the model's implementation (SDPA)."""

    def __init__(self, model, layers: list[int]):
        self.model, self.layers, self.saved = model, layers, []

    def __enter__(self):
        if not self.layers:
            return self

        from transformers import AttentionInterface

        AttentionInterface.register("tokenprune_materialized", materialized_attention)
        adapter = get_adapter(self.model)
        for i in self.layers:
            if i >= adapter.num_layers:
                raise ConfigError("materialize_attention", f"layer {i}; the model has {adapter.num_layers} decoder "
                                  "layers")
            attn = adapter.attention_module(i)
            self.saved.append((attn, attn.config))
            attn.config = copy.copy(attn.config)
            attn.config._attn_implementation = "tokenprune_materialized"
        return self

    def __exit__(self, *exc):
        for attn, config in self.saved:
            attn.config = config
        self.saved = []
        return False


def _medians(samples: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in samples[0]:
        vals = [s[key] for s in samples if s[key] is not None]
        if vals and isinstance(vals[0], dict):  # per-key medians (operator_ms_by_op)
            out[key] = {k: statistics.median(v[k] for v in vals if k in v) for k in vals[0]}
        else:
            out[key] = statistics.median(vals) if vals else None
    return out


def target_models(results: dict[str, Any], visual_tokens: int = 2880) -> list[str]:
    """The models a benchmark's targets are read on: those at ``visual_tokens`` visual tokens or more (the issue's
    2880: LLaVA-NeXT's geometry), or else the last model."""
    names = list(dict.fromkeys(r["model"] for r in results["rows"]))
    big = [n for n in names if any(r["model"] == n and r.get("visual_tokens", 0) >= visual_tokens for r in results["rows"])]
    return big or names[-1:]


def check_targets(results: dict[str, Any], models: str | list[str] | None = None,
                  operator_variants: tuple[str, ...] = ("fastv", "asap"),
                  speedup_variant: str = "fastv-0.25") -> list[tuple[str, bool, str]]:
    """The issue's targets read from a benchmark's results, for each of ``models`` (default
    :func:`target_models`): ``[(target, met, measured)]``, each target named ``"<model>: ..."``."""
    if models is None:
        models = target_models(results)
    out = []
    for model in [models] if isinstance(models, str) else models:
        out += [(f"{model}: {t}", ok, v) for t, ok, v in _model_targets(
            [r for r in results["rows"] if r["model"] == model and not r.get("error")],
            bool(results.get("machine", {}).get("gpu")),
            operator_variants, speedup_variant)]
    return out


def _model_targets(rows: list[dict[str, Any]], gpu: bool, operator_variants: tuple[str, ...],
                   speedup_variant: str) -> list[tuple[str, bool, str]]:
    limit = next((r["overhead_target"] for r in rows if r.get("overhead_target") is not None), None)
    if limit is not None:  # a model that checks every variant
        return _every_variant_targets(rows, limit)
    out = []
    for name in operator_variants:
        for r in rows:
            if r["variant"].split("-")[0] != name or r["batch"] != 1 or _exact_ablation(r):
                continue
            if r.get("full_layers"):  # a depth-cut model: against the prefill of the depth it stands for
                out.append((f"operator overhead of {r['variant']} <= 3% of unpruned prefill (at {r['full_layers']} "
                            "layers: the measured prefill plus the missing layers at the measured time per layer)",
                            r["operator_overhead_full_depth"] <= 0.03,
                            f"{r['operator_overhead_full_depth']:.2%} ({r['operator_overhead']:.2%} of the measured "
                            "prefill)"))
            else:
                out.append((f"operator overhead of {r['variant']} <= 3% of unpruned prefill",
                            r["operator_overhead"] <= 0.03, f"{r['operator_overhead']:.2%}"))
    if gpu:  # the GPU aim: ASAP's prefill at least 3.5x faster than unpruned
        for r in rows:
            if r["variant"].split("-")[0] == "asap" and r["batch"] == 1 and not _exact_ablation(r):
                out.append((f"{r['variant']} prefill >= 3.5x faster than unpruned (GPU)", r["prefill_speedup"] >= 3.5,
                            f"x{r['prefill_speedup']:.2f}"))
    for r in rows:
        if r["variant"] == speedup_variant and r["batch"] == 1 and r["speedup_vs_ideal"] is not None:
            out.append((f"{speedup_variant} prefill speed-up >= 80% of FLOPs-ideal", r["speedup_vs_ideal"] >= 0.8,
                        f"x{r['prefill_speedup']:.2f} of ideal x{r['ideal_speedup']:.2f} = {r['speedup_vs_ideal']:.0%}"))
    biggest = max((x["batch"] for x in rows), default=0)  # the decode target is about batch 8: none below it
    base = next((x for x in rows if x["variant"] == "unpruned" and x["batch"] == biggest and biggest >= 8), None)
    for r in rows:
        if r["variant"] != "unpruned" and not r["variant"].startswith("reference") and r["batch"] == biggest \
                and base is not None:  # reference-* variants are baselines to compare against, not checked
            kept = (r.get("kv_visual_kept") or r["visual_tokens_kept"]) / r["visual_tokens"]
            decode = base["decode_ms_per_token"] / r["decode_ms_per_token"]  # decode tokens/s, pruned / unpruned
            out.append((f"{r['variant']} KV bytes shrink with the tokens removed; decode tokens/s at batch {r['batch']} rises",
                        r["kv_ratio"] < 1.0 and decode > 1.0,
                        f"KV x{r['kv_ratio']:.2f} (visual kept {kept:.2f}), decode tokens/s x{decode:.2f}"))
    return out


def _exact_ablation(row: dict[str, Any]) -> bool:
    """A variant named ``*-exact``: a method's exact, costlier form kept for ablations next to its preset's cheaper
    default (ASAP's every visual query); measured and shown, not held to the targets."""
    return row["variant"].endswith("-exact")


def _every_variant_targets(rows: list[dict[str, Any]], limit: float) -> list[tuple[str, bool, str]]:
    """Every variant at batch 1: operator overhead <= ``limit`` of the unpruned prefill (at full depth where the
    model is depth-cut), and, where it cuts the LLM's FLOPs, a prefill speed-up >= 80% of the FLOPs-ideal one."""
    out = []
    for r in rows:
        if r["batch"] != 1 or r["variant"] == "unpruned" or _exact_ablation(r):
            continue
        over = r.get("operator_overhead_full_depth", r["operator_overhead"])
        out.append((f"operator overhead of {r['variant']} <= {limit:.0%} of unpruned prefill", over <= limit,
                    f"{over:.2%}"))
        if r["speedup_vs_ideal"] is not None and r["flops_reduction"]:
            measured = f"x{r['prefill_speedup']:.2f} of ideal x{r['ideal_speedup']:.2f} = {r['speedup_vs_ideal']:.0%}"
            if r.get("count_ideal_speedup") is not None:  # what the hardware allows at these token counts
                measured += (f" (count-ideal x{r['count_ideal_speedup']:.2f}: {r['speedup_vs_count_ideal']:.0%} of "
                             "it)")
            out.append((f"{r['variant']} prefill speed-up >= 80% of FLOPs-ideal", r["speedup_vs_ideal"] >= 0.8,
                        measured))
    return out


def markdown(results: dict[str, Any], command: str, targets: list[tuple[str, bool, str]]) -> str:
    m = results["machine"]
    when = f" on {m['date']}" + (f" at commit {m['commit']}" if m.get("commit") else "") if m.get("date") else ""
    lines = ["# Benchmarks", "", f"Produced{when} by `{command}` on {m.get('gpu') or 'CPU'} ({m['cpus']} CPUs, {m['threads']} "
             f"torch threads; {m['platform']}; Python {m['python']}, torch {m['torch']}, transformers "
             f"{m.get('transformers')}). Medians over the repetitions; every variant measured in the same process, "
             "in alternation. Speed-ups are ratios of those medians. Peak memory is the GPU's peak allocation during "
             "a generate() call (— on a CPU, where no per-call peak is measured).", "",
             "The prefill (time to the first token) splits into the vision tower and projector (vision ms, timed "
             "around their calls inside the measured generate()) and the rest (LLM ms: the LLM's prefill with the "
             "pipeline's operators). FLOPs-ideal is the prefill speed-up if the unpruned vision time stayed and the "
             "rest shrank with the LLM's FLOPs. FLOPs ×: the FLOPs-ideal speed-up of the LLM's prefill alone, and "
             "with the vision side's FLOPs (exact convention, torch's flop counter) on both sides.", "",
             "| model | variant | batch | prefill ms | vision ms | LLM ms | speed-up | FLOPs-ideal | of ideal | "
             "FLOPs × LLM / with tower | operators ms | overhead | decode ms/tok | tokens/s | KV KiB/sample | "
             "peak MiB | FLOPs − |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["rows"]:
        if r.get("error"):
            lines.append(f"| {r['model']} | {r['variant']} | {r['batch']} | failed: {_cell(r['error'])} |"
                         + " |" * 13)
            continue
        lines.append(f"| {r['model']} | {r['variant']} | {r['batch']} | {r['prefill_ms']:.1f} | "
                     f"{_f(r.get('vision_ms'))} | {_f(r.get('llm_prefill_ms'))} | x{r['prefill_speedup']:.2f} | "
                     f"{_x(r['ideal_speedup'])} | {_pct(r['speedup_vs_ideal'], 0)} | "
                     f"{_x(r.get('flops_speedup'))} / {_x(r.get('flops_speedup_with_vision'))} | {r['operator_ms']:.1f} | "
                     f"{r['operator_overhead']:.1%} | {_f(r['decode_ms_per_token'])} | {r['tokens_per_s']:.1f} | "
                     f"{r['kv_cache_bytes'] / 1024:.0f} | {_f(_mib(r.get('peak_memory_bytes')))} | "
                     f"{_pct(r['flops_reduction'], 1)} |")
    deep = [r for r in results["rows"] if r.get("full_layers") and not r.get("error")]
    if deep:
        lines += ["", "Depth-cut models: the unpruned prefill projected to the real model's depth (the measured prefill "
                  "plus the missing decoder layers at the measured mean time per layer, timed in forwards of their "
                  "own), and each variant's operator time against it (a layer site's operators run once, so their time does "
                  "not grow with depth; a kv_cache stage's scale with the layers, taken to be all of them):", "",
                  "| model | variant | batch | ms per decoder layer | layers | prefill ms at full depth | operators ms "
                  "| overhead at full depth |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['model']} | {r['variant']} | {r['batch']} | {r['layer_ms']:.1f} | {r['full_layers']} | "
                  f"{r['full_depth_prefill_ms']:.0f} | {r.get('operator_ms_full_depth', r['operator_ms']):.1f} | "
                  f"{r['operator_overhead_full_depth']:.2%} |" for r in deep]
    counted = [r for r in results["rows"] if r.get("count_ideal_prefill_ms") is not None and not r.get("error")]
    if counted:
        lines += ["", "Count-ideal: the unpruned prefill with each decoder layer's time in it scaled by the stock "
                  "LLM's time (no image, no pipeline, timed in forwards of its own at each token count) at the count "
                  "that layer runs on over its time at the full count; everything outside the decoder layers (vision "
                  "tower, projector, feature packing, embedding, head) stays. What a pruning that cost nothing itself "
                  "would reach on this hardware: below the FLOPs-ideal where short sequences run below the FLOP rate "
                  "of long ones and where the parts outside the layers weigh; the gap from it to the measured prefill "
                  "is the pruning's own cost (operators, gathers, hooks).", "",
                  "| model | variant | batch | prefill ms | count-ideal ms | speed-up | count-ideal | FLOPs-ideal | "
                  "of count-ideal | of FLOPs-ideal |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['model']} | {r['variant']} | {r['batch']} | {r['prefill_ms']:.1f} | "
                  f"{r['count_ideal_prefill_ms']:.1f} | x{r['prefill_speedup']:.2f} | x{r['count_ideal_speedup']:.2f} | "
                  f"{_x(r['ideal_speedup'])} | {r['speedup_vs_count_ideal']:.0%} | {_pct(r['speedup_vs_ideal'], 0)} |"
                  for r in counted]
    split = [r for r in results["rows"] if r.get("operator_ms_by_op")]
    if split:
        lines += ["", "Operator time by operator (ms per call of `generate()`, medians; a lazily computed signal is "
                  "charged to the first operator that asks for it):", "", "| model | variant | batch | operators |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {r['model']} | {r['variant']} | {r['batch']} | "
                  + ", ".join(f"{k} {ms:.1f}" for k, ms in r["operator_ms_by_op"].items()) + " |" for r in split]
    if targets:
        lines += ["", "## Targets", "", "| target | met | measured |", "| --- | --- | --- |"]
        lines += [f"| {t} | {'yes' if ok else '**no**'} | {v} |" for t, ok, v in targets]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """Text for a markdown table cell (no pipes, no line breaks)."""
    return " ".join(text.replace("|", "/").split())


def _f(v):
    return "—" if v is None else f"{v:.1f}"


def _x(v):
    return "—" if v is None else f"x{v:.2f}"


def _pct(v, digits: int):
    return "—" if v is None else f"{v:.{digits}%}"


def _mib(v):
    return None if v is None else v / 2**20


def write_json(results: dict[str, Any], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2) + "\n")
