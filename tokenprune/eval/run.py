"""``tokenprune run CONFIG [KEY=VALUE ...]``: one model, one dataset, one pipeline, and the unpruned model on
the same data; a table of what the pipeline cost and saved.

The config (``experiments/*.yaml``) is the defaults in :data:`DEFAULTS`, then the file, then overrides;
unknown keys are errors that name the key. Generation runs batched in a Lightning ``predict`` loop with
the pipeline attached (``trainer:`` settings; with several devices the data is sharded and the
predictions gathered). The unpruned baseline is cached by a digest of (model, data, generation, batch
size, dtype), so a second run on the same data reuses it. Each run writes its own directory:
``config.yaml`` (resolved), ``predictions.jsonl``, ``metrics.json`` (written last, atomically); see
docs/metrics.md for every metric.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from tokenprune.core.errors import ConfigError
from tokenprune.eval.scoring import data_digest, load_items, open_image, relative_score, summarize

DEFAULTS: dict[str, Any] = {
    "model": {"path": "reference", "dtype": "float32", "attn_implementation": "sdpa", "device_map": None,
              "trust_remote_code": False},
    "data": {"source": "shapes", "split": "test", "limit": None, "path": None, "metric": None,
             "lmms_eval": None},  # lmms-eval tasks instead of items: a list, or {tasks, include_path, metrics}
    "pipeline": "asap",  # a preset name, a YAML path, or an inline mapping
    "overrides": [],  # KEY=VALUE overrides of the pipeline
    "generation": {"max_new_tokens": 4, "do_sample": False},
    "batch_size": 16,
    "seed": 0,
    "flops_convention": "exact",
    "trainer": {"accelerator": "auto", "devices": 1, "strategy": "auto", "precision": "32-true"},
    "logging": {"wandb": {"mode": "offline", "project": "tokenprune", "group": None, "tags": []},
                "progress_bar": True, "samples": 20},
    "output_dir": None,  # null: runs/<pipeline>-<time>
    "baseline_cache": "runs/.baselines",  # null: no cache
}
DTYPES = ("float32", "float16", "bfloat16")
WANDB_MODES = ("offline", "online", "disabled")


def load_run_config(path: str | Path | None, overrides: Iterable[str] = ()) -> DictConfig:
    """Defaults, then the YAML file, then ``KEY=VALUE`` overrides; checked, with errors naming the key."""
    cfg = OmegaConf.create(DEFAULTS)
    OmegaConf.set_struct(cfg, True)
    try:
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(None, f"no such run config: {path}")
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except ConfigError:
        raise
    except Exception as e:  # OmegaConf names the key
        raise ConfigError(None, f"run config{f' {path}' if path else ''}: {e}") from None
    if cfg.model.dtype not in DTYPES:
        raise ConfigError("model.dtype", f"{cfg.model.dtype!r}; allowed: {', '.join(DTYPES)}")
    if not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        raise ConfigError("batch_size", f"must be a positive integer, got {cfg.batch_size!r}")
    if cfg.logging.wandb.mode not in WANDB_MODES:
        raise ConfigError("logging.wandb.mode", f"{cfg.logging.wandb.mode!r}; allowed: {', '.join(WANDB_MODES)}")
    if cfg.flops_convention not in ("fastv", "exact"):
        raise ConfigError("flops_convention", f"{cfg.flops_convention!r}; allowed: fastv, exact")
    if cfg.data.path and path is not None and not Path(cfg.data.path).is_absolute():
        relative = Path(path).parent / cfg.data.path  # a data path relative to the config file, when it is there
        if relative.exists():
            cfg.data.path = str(relative)
    spec = cfg.data.lmms_eval
    if isinstance(spec, DictConfig) and spec.get("include_path") and path is not None \
            and not Path(spec.include_path).is_absolute() and (Path(path).parent / spec.include_path).exists():
        spec.include_path = str(Path(path).parent / spec.include_path)
    return cfg


def resolve_pipeline(cfg: DictConfig):
    """The run's pipeline (validated), or None for ``pipeline: none``."""
    return resolve_pipeline_spec(cfg.pipeline, list(cfg.overrides))


def resolve_pipeline_spec(spec: Any, overrides: list[str], key: str = "pipeline"):
    """The pipeline ``spec`` names (a preset name, a YAML path or a mapping; None or ``none``: no pipeline), with
    ``overrides``; errors are reported under ``key``."""
    from tokenprune.pipeline import load_pipeline

    if spec is None or spec == "none":
        return None
    try:
        return load_pipeline(OmegaConf.to_container(spec) if isinstance(spec, DictConfig) else spec, overrides)
    except ConfigError as e:
        raise ConfigError(f"{key}{'.' + e.key if e.key else ''}", e.detail) from None


# --- the model --------------------------------------------------------------------------------------

_LOADED: dict[str, Any] = {}  # the last model loaded, so the variants of a sweep load it once


def load_model(model_cfg: Mapping[str, Any]):
    """(model, processor) through the Auto classes; ``path: reference`` is the shipped reference model.
    The last model loaded is kept and returned again for the same ``model`` section (a sweep's variants)."""
    key = json.dumps(dict(model_cfg), sort_keys=True, default=str)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = _load_model(model_cfg)
    return _LOADED[key]


def _load_model(model_cfg: Mapping[str, Any]):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = str(model_cfg["path"])
    if path == "reference":
        from tokenprune.reference import model as reference

        path = str(reference.path())
    kwargs = {"dtype": getattr(torch, model_cfg["dtype"]), "attn_implementation": model_cfg["attn_implementation"],
              "trust_remote_code": bool(model_cfg["trust_remote_code"])}
    if model_cfg.get("device_map"):
        kwargs["device_map"] = model_cfg["device_map"]
    local = Path(path).is_dir()
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=local, **kwargs)
        processor = AutoProcessor.from_pretrained(path, local_files_only=local,
                                                  trust_remote_code=bool(model_cfg["trust_remote_code"]))
    except OSError as e:
        raise ConfigError("model.path", f"cannot load {path!r}: {e}") from None
    return model.eval(), processor


def model_identity(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies the weights for the baseline cache: a folder's files (names, sizes, mtimes), else the id."""
    path = str(model_cfg["path"])
    if path == "reference":
        from tokenprune.reference import model as reference

        path = str(reference.path())
    ident: dict[str, Any] = {"path": str(Path(path).resolve()) if Path(path).is_dir() else path,
                             "dtype": model_cfg["dtype"], "attn": model_cfg["attn_implementation"]}
    if Path(path).is_dir():
        ident["files"] = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in Path(path).iterdir()
                                if p.is_file())
    return ident


def build_prompt(processor, question: str, images: int = 1) -> str:
    """The model's chat template around ``images`` images (before the text) and ``question``, ending where the
    answer starts."""
    return processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": question}]}],
        add_generation_prompt=True)


# --- one batch --------------------------------------------------------------------------------------

class _Clock:
    """A logits processor that stamps the time of every generation step (CUDA events on a GPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.stamps: list[Any] = []

    def start(self) -> None:
        self.stamps = [self._now()]

    def _now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def __call__(self, input_ids, scores):
        self.stamps.append(self._now())
        return scores

    def intervals_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.stamps, self.stamps[1:])]
        return [(b - a) * 1000.0 for a, b in zip(self.stamps, self.stamps[1:])]


def cache_bytes(cache) -> int:
    """Bytes of the keys and values a KV cache holds (every layer; padding slots included)."""
    total = 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total
    for kv in cache:  # legacy tuples
        total += sum(t.numel() * t.element_size() for t in kv if isinstance(t, torch.Tensor))
    return total


def generate_batch(model, processor, items: list[Mapping[str, Any]], pipeline, generation: Mapping[str, Any],
                   shape, flops_convention: str) -> list[dict[str, Any]]:
    """Greedy answers for ``items`` with ``pipeline`` attached (None: unpruned) and what it cost, per item."""
    from transformers import LogitsProcessorList

    from tokenprune.measure.flops import measured_flops

    prompts = [build_prompt(processor, it["question"]) for it in items]
    images = [open_image(it["image"]) for it in items]
    processor.tokenizer.padding_side = "left"
    enc = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    clock = _Clock(device)
    gen = dict(generation)
    new_tokens = int(gen.pop("max_new_tokens"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        clock.start()
        if pipeline is None:
            out = model.generate(**enc, max_new_tokens=new_tokens, logits_processor=LogitsProcessorList([clock]),
                                 return_dict_in_generate=True, **gen)
            trace = []
        else:
            with pipeline.attach(model):
                out = model.generate(**enc, max_new_tokens=new_tokens, logits_processor=LogitsProcessorList([clock]),
                                     return_dict_in_generate=True, **gen)
                trace = list(pipeline.trace)
    steps = clock.intervals_ms()
    prefill_ms = steps[0] if steps else float("nan")
    decode_ms = statistics.median(steps[1:]) if len(steps) > 1 else float("nan")
    kv = cache_bytes(out.past_key_values) // len(items) if out.past_key_values is not None else 0  # padded, fallback
    dtype_bytes = next(model.parameters()).element_size()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak_rss()
    prompt_len = enc["input_ids"].shape[1]
    texts = processor.tokenizer.batch_decode(out.sequences[:, prompt_len:], skip_special_tokens=True)
    image_id = getattr(model.config, "image_token_id", None)
    records = []
    for b, (it, text) in enumerate(zip(items, texts)):
        n_tokens = int(enc["attention_mask"][b].sum()) if "attention_mask" in enc else prompt_len
        n_visual = int((enc["input_ids"][b] == image_id).sum()) if image_id is not None else 0
        prefill = [t for t in trace if t.site == "prefill"]  # kv_cache/decode traces do not change the prefill
        stages = [(t.layer, t.tokens_after[b], t.visual_after[b]) for t in prefill if isinstance(t.layer, int)]
        rec: dict[str, Any] = {
            "id": it["id"], "question": it["question"], "answer": it["answer"], "type": it["type"],
            "metric": it["metric"], "prediction": text.strip(),
            "visual_tokens": n_visual, "visual_tokens_kept": [t.visual_after[b] for t in prefill],
            "kv_visual_entries_kept": [t.visual_after[b] for t in trace if t.site == "kv_cache"],
            "prefill_ms": prefill_ms, "decode_ms_per_token": decode_ms, "kv_cache_bytes": kv,
            "peak_memory_bytes": peak, "operator_ms": sum(t.operator_ms for t in trace),  # this batch's
        }
        if shape is not None and len(stages) == len(prefill):
            rep = measured_flops(shape, n_tokens, n_visual, stages, flops_convention)
            rec.update(flops=rep.flops, baseline_flops=rep.baseline_flops,
                       equivalent_visual_tokens=rep.equivalent_visual_tokens,
                       kv_cache_bytes=prompt_kv_bytes(rep.per_layer_tokens, trace, pipeline, b, shape, dtype_bytes))
        records.append(rec)
    return records


def prompt_kv_bytes(per_layer_tokens: list[int], trace, pipeline, sample: int, shape, dtype_bytes: int) -> int:
    """Bytes of one sample's prompt keys and values after the prefill: the tokens each layer holds (what entered
    it; a ``kv_compact`` stage also trims the layers before its site to its kept tokens; a ``kv_cache`` stage
    cuts each layer it compresses) times 2 x KV heads x head dim x the element size. Padding and the filler
    slots of ragged batches are not counted; decoding-time re-pruning (later) is not either."""
    held = list(per_layer_tokens)
    for t in trace:
        if t.site == "kv_cache":
            held[t.layer] = min(held[t.layer], t.tokens_after[sample])
            continue
        if t.site != "prefill":
            continue
        stage = pipeline.stages[t.stage]
        if any(getattr(op, "kind", None) == "compactor" and getattr(op.params, "earlier_layers", False)
               for op in stage.operators):
            for layer in range(min(t.layer, len(held))):
                held[layer] = min(held[layer], t.tokens_after[sample])
    return int(sum(held) * 2 * shape.kv_heads * shape.head_dim * dtype_bytes)


def _peak_rss() -> int:
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


# --- the Lightning loop -----------------------------------------------------------------------------

def predict(cfg: DictConfig, model, processor, items: list[dict[str, Any]], pipeline, shape) -> list[dict[str, Any]]:
    """Run ``generate_batch`` over ``items`` in a Lightning predict loop (sharded across devices, gathered)."""
    import pytorch_lightning as pl

    class Predictor(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def predict_step(self, batch, batch_idx):
            chunk = [items[i] for i in batch]
            recs = generate_batch(self.model, processor, chunk, pipeline, OmegaConf.to_container(cfg.generation),
                                  shape, cfg.flops_convention)
            for i, r in zip(batch, recs):
                r["index"] = i
            return recs

    loader = torch.utils.data.DataLoader(list(range(len(items))), batch_size=cfg.batch_size, shuffle=False,
                                         collate_fn=list)
    trainer = pl.Trainer(accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices,
                         strategy=cfg.trainer.strategy, precision=cfg.trainer.precision, logger=False,
                         enable_progress_bar=bool(cfg.logging.progress_bar), enable_model_summary=False,
                         enable_checkpointing=False)
    batches = trainer.predict(Predictor(), dataloaders=loader) or []
    records = [r for batch in batches for r in batch]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, records)
        records = [r for part in gathered for r in part]
    unique = {r["index"]: r for r in records}  # a distributed sampler pads shards with repeats
    return [unique[i] for i in sorted(unique)]


def _is_global_zero() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
        torch.distributed.get_rank() == 0


# --- metrics ----------------------------------------------------------------------------------------

def _median(values: list[float]) -> float | None:
    vals = [v for v in values if v == v]  # drop NaN
    return statistics.median(vals) if vals else None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def run_metrics(records: list[dict[str, Any]], baseline: list[dict[str, Any]], items: list[dict[str, Any]],
                pipeline) -> dict[str, Any]:
    """metrics.json of a run from its records and the baseline's (same items, same order)."""
    pruned = summarize([r["prediction"] for r in records], items)
    base = summarize([r["prediction"] for r in baseline], items)
    same = sum(a["prediction"].strip().lower() == b["prediction"].strip().lower() for a, b in zip(records, baseline))
    metrics: dict[str, Any] = {
        "n": len(records),
        "accuracy": pruned["accuracy"], "per_type": pruned["per_type"],
        "baseline_accuracy": base["accuracy"], "baseline_per_type": base["per_type"],
        "relative_score": relative_score(pruned["per_type"], base["per_type"]),
        "fidelity": same / len(records) if records else None,
    }
    if "yes_no" in pruned:
        metrics["yes_no"], metrics["baseline_yes_no"] = pruned["yes_no"], base["yes_no"]
    if all("flops" in r for r in records):
        flops, base_flops = _mean([r["flops"] for r in records]), _mean([r["baseline_flops"] for r in records])
        metrics.update(flops=flops, baseline_flops=base_flops, flops_reduction=1 - flops / base_flops,
                       equivalent_visual_tokens=_mean([r["equivalent_visual_tokens"] for r in records]))
    else:
        metrics.update(flops=None, baseline_flops=None, flops_reduction=None, equivalent_visual_tokens=None)
    stages = sum(not s.kv_cache for s in pipeline.stages) if pipeline is not None else 0
    metrics["visual_tokens"] = _mean([r["visual_tokens"] for r in records])
    metrics["visual_tokens_kept"] = [_mean([r["visual_tokens_kept"][s] for r in records
                                            if len(r["visual_tokens_kept"]) > s]) for s in range(stages)]
    kv_layers = max((len(r["kv_visual_entries_kept"]) for r in records), default=0)
    if kv_layers:  # a kv_cache stage: mean visual entries each compressed layer's cache keeps after the prefill
        metrics["kv_visual_entries_kept"] = [_mean([r["kv_visual_entries_kept"][s] for r in records
                                                    if len(r["kv_visual_entries_kept"]) > s]) for s in range(kv_layers)]
    for key in ("prefill_ms", "decode_ms_per_token"):
        metrics[key], metrics[f"baseline_{key}"] = _median([r[key] for r in records]), _median([r[key] for r in baseline])
    metrics["kv_cache_bytes"] = _mean([r["kv_cache_bytes"] for r in records])
    metrics["baseline_kv_cache_bytes"] = _mean([r["kv_cache_bytes"] for r in baseline])
    metrics["peak_memory_bytes"] = max(r["peak_memory_bytes"] for r in records) if records else None
    metrics["operator_ms"] = _median([r["operator_ms"] for r in records])
    return metrics


# --- the run ----------------------------------------------------------------------------------------

def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    _write_atomic(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate the pipeline and the (cached) unpruned baseline; write the run directory; return metrics.json.
    With ``data.lmms_eval`` the evaluation is lmms-eval's (:mod:`tokenprune.eval.lmms_eval_run`)."""
    import pytorch_lightning as pl

    if cfg.data.lmms_eval is not None:
        from tokenprune.eval.lmms_eval_run import run_lmms_eval

        return run_lmms_eval(cfg)
    pipeline = resolve_pipeline(cfg)  # config errors before any model is loaded
    items = load_items(cfg.data)
    pl.seed_everything(cfg.seed, verbose=False)
    name = pipeline.name if pipeline is not None else "unpruned"
    out = Path(cfg.output_dir or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    model, processor = load_model(OmegaConf.to_container(cfg.model))
    shape = _llm_shape(model)

    baseline = None
    cache_file = None
    from_cache = False
    if cfg.baseline_cache:
        key = _digest({"model": model_identity(cfg.model), "data": data_digest(items),
                       "generation": OmegaConf.to_container(cfg.generation), "batch_size": cfg.batch_size,
                       "convention": cfg.flops_convention})
        cache_file = Path(cfg.baseline_cache) / f"{key}.jsonl"
        if cache_file.is_file():
            baseline = [json.loads(line) for line in cache_file.read_text().splitlines()]
            from_cache = True
    if baseline is None:
        baseline = predict(cfg, model, processor, items, None, shape)
        if cache_file is not None and _is_global_zero():
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            _write_jsonl(cache_file, baseline)
    records = predict(cfg, model, processor, items, pipeline, shape) if pipeline is not None else baseline
    metrics = run_metrics(records, baseline, items, pipeline)
    metrics.update(pipeline=name, model=str(cfg.model.path), data=_data_name(cfg), flops_convention=cfg.flops_convention,
                   baseline_cached=from_cache)
    if _is_global_zero():
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(out / "config.yaml", resolved_config_yaml(cfg, pipeline))
        _write_jsonl(out / "predictions.jsonl", [
            {**r, "correct": _correct(r, it), "baseline_prediction": b["prediction"]}
            for r, b, it in zip(records, baseline, items)])
        _log_wandb(cfg, metrics, records, baseline, out)
        _write_atomic(out / "metrics.json", json.dumps(metrics, indent=2, default=str) + "\n")
    metrics["output_dir"] = str(out)
    return metrics


def resolved_config_yaml(cfg: DictConfig, pipeline) -> str:
    """A run directory's ``config.yaml``: the run config plus ``resolved_pipeline`` (the pipeline's config after
    its overrides; None for the unpruned model). The sweep compares it to tell whether a finished run is stale."""
    resolved = OmegaConf.to_container(cfg)
    resolved["resolved_pipeline"] = OmegaConf.to_container(pipeline.config) if pipeline is not None and \
        pipeline.config is not None else None
    return OmegaConf.to_yaml(OmegaConf.create(resolved))


def _correct(record: Mapping[str, Any], item: Mapping[str, Any]) -> float:
    from tokenprune.eval.scoring import item_score

    return item_score(record["prediction"], item)


def _data_name(cfg: DictConfig) -> str:
    if cfg.data.source == "shapes":
        return f"shapes/{cfg.data.split}" + (f"[:{cfg.data.limit}]" if cfg.data.limit else "")
    return str(cfg.data.path)


def _llm_shape(model):
    from tokenprune.measure.flops import LLMShape

    text = getattr(model.config, "text_config", model.config)
    try:
        return LLMShape.from_config(text, name=getattr(model.config, "model_type", "model"))
    except Exception:  # noqa: BLE001 - a config the analytic model does not know: no FLOPs, everything else runs
        return None


def _log_wandb(cfg: DictConfig, metrics: dict[str, Any], records, baseline, out: Path) -> None:
    w = cfg.logging.wandb
    if w.mode == "disabled":
        return
    from pytorch_lightning.loggers import WandbLogger

    logger = WandbLogger(project=w.project, group=w.group, tags=list(w.tags), save_dir=str(out),
                         offline=w.mode == "offline", name=out.name)
    logger.log_hyperparams(OmegaConf.to_container(cfg))
    logger.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None})
    rows = [[r["id"], r["question"], str(r["answer"]), r["prediction"], b["prediction"]]
            for r, b in list(zip(records, baseline))[: int(cfg.logging.samples)]]
    logger.log_table(key="predictions", columns=["id", "question", "answer", "prediction", "unpruned"], data=rows)
    logger.experiment.finish()


def summary_table(metrics: Mapping[str, Any]) -> str:
    """The one-screen table printed at the end of a run."""
    def pct(v):
        return "—" if v is None else f"{100 * v:.1f}%"

    def num(v, fmt="{:.1f}"):
        return "—" if v is None else fmt.format(v)

    lines = [f"tokenprune run: {metrics['pipeline']} on {metrics['data']} ({metrics['n']} items), model "
             f"{metrics['model']}", ""]
    lines.append(f"{'':<28}{'unpruned':>14}{metrics['pipeline']:>14}")
    lines.append(f"{'accuracy':<28}{pct(metrics['baseline_accuracy']):>14}{pct(metrics['accuracy']):>14}")
    for t, base in metrics["baseline_per_type"].items():
        lines.append(f"{'  ' + t:<28}{pct(base):>14}{pct(metrics['per_type'].get(t)):>14}")
    gflops = None if metrics["flops"] is None else metrics["flops"] / 1e9
    base_gflops = None if metrics["baseline_flops"] is None else metrics["baseline_flops"] / 1e9
    lines.append(f"{'LLM prefill GFLOPs':<28}{num(base_gflops, '{:.3f}'):>14}{num(gflops, '{:.3f}'):>14}")
    lines.append(f"{'visual tokens (layer mean)':<28}{num(metrics['visual_tokens']):>14}"
                 f"{num(metrics['equivalent_visual_tokens']):>14}")
    lines.append(f"{'prefill ms (median batch)':<28}{num(metrics['baseline_prefill_ms']):>14}"
                 f"{num(metrics['prefill_ms']):>14}")
    lines.append(f"{'decode ms / token':<28}{num(metrics['baseline_decode_ms_per_token'], '{:.2f}'):>14}"
                 f"{num(metrics['decode_ms_per_token'], '{:.2f}'):>14}")
    lines.append(f"{'KV cache KiB / sample':<28}{num(_kib(metrics['baseline_kv_cache_bytes'])):>14}"
                 f"{num(_kib(metrics['kv_cache_bytes'])):>14}")
    lines.append("")
    lines.append(f"relative score {num(metrics['relative_score'])}   fidelity {pct(metrics['fidelity'])}   "
                 f"FLOPs reduction {pct(metrics['flops_reduction'])} ({metrics['flops_convention']})   "
                 f"visual tokens kept per stage {[round(v, 1) for v in metrics['visual_tokens_kept'] if v is not None]}   "
                 f"operator ms / batch {num(metrics['operator_ms'], '{:.2f}')}")
    if metrics.get("baseline_cached"):
        lines.append("(unpruned baseline read from the cache)")
    return "\n".join(lines)


def _kib(v):
    return None if v is None else v / 1024
