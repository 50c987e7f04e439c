"""``tokenprune run CONFIG [KEY=VALUE ...]``: one model, one dataset, one pipeline, and the unpruned model on
the same data; a table of what the pipeline cost and saved.

The config (``experiments/*.yaml``) is the defaults in :data:`DEFAULTS`, then the file, then overrides;
unknown keys are errors that name the key. Generation runs batched in a Lightning ``predict`` loop with
the pipeline attached (``trainer:`` settings; with several devices the data is sharded and the
predictions gathered). The unpruned baseline is cached by a digest of (model, data, generation, batch
size, dtype), so a second run on the same data reuses it. Each run writes its own directory:
``config.yaml`` (resolved), ``predictions.jsonl``, ``metrics.json`` (written last, atomically); see
docs/run.md ("Metrics") for every metric.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from tokenprune.adapters import get_adapter
from tokenprune.core.errors import ConfigError
from tokenprune.core.sites import KVCacheSite
from tokenprune.eval.files import digest, read_cached_records, write_atomic, write_jsonl
from tokenprune.eval.lmms_eval_run import run_lmms_eval
from tokenprune.eval.models import (
    MODEL_RECORD,
    build_prompt,
    check_input_scale,
    check_pipeline_for_model,
    load_model,
    model_changed,
    model_identity,
    model_path,
    read_model_config,
)
from tokenprune.eval.run_config import (
    FINISHED,
    finished_run,
    resolve_filter,
    resolve_pipeline,
    resolved_config_yaml,
    run_directory,
)
from tokenprune.eval.scoring import data_digest, item_score, load_items, open_image, relative_score, summarize
from tokenprune.eval.videos import check_video_family
from tokenprune.measure.flops import LLMShape, ideal_speedups, measured_flops
from tokenprune.measure.memory import cache_bytes, peak_rss, prompt_kv_bytes
from tokenprune.measure.provenance import provenance
from tokenprune.measure.timing import StepClock, VisionClock
from tokenprune.reference.model import prompt

# --- one batch --------------------------------------------------------------------------------------

def generate_batch(model, processor, items: list[Mapping[str, Any]], pipeline, generation: Mapping[str, Any],
                   shape, flops_convention: str, vision_flops_cache: dict | None = None) -> list[dict[str, Any]]:
    """Greedy answers for ``items`` with ``pipeline`` attached (None: unpruned) and what it cost, per item.

    Times are the batch's: ``prefill_ms`` from the call to the first token (the vision side included),
    ``vision_ms`` the part of it inside the vision tower and projector (:class:`~tokenprune.measure.timing.
    VisionClock`), ``llm_prefill_ms`` the rest. ``vision_flops``: the vision side's FLOPs per sample (the batch's
    over its samples; ``exact`` convention, counted on a rerun of its calls after the timed generation)."""
    from transformers import LogitsProcessorList

    processor.tokenizer.padding_side = "left"
    if "video" in items[0]:  # a clip a sample (docs/video.md): the inputs built from the image processor
        clips = [[open_image(f) for f in it["video"]] for it in items]
        if pipeline is not None:
            clips = [pipeline.prepare_images(frames) for frames in clips]
        prompts = [prompt(processor, it["question"], video=True) for it in items]
        enc = get_adapter(model).frame_video_inputs(processor, prompts, clips)
    else:
        prompts = [build_prompt(processor, it["question"]) for it in items]
        images = [open_image(it["image"]) for it in items]
        if pipeline is not None:
            images = pipeline.prepare_images(images)  # the downsampling baseline shows them smaller
        # one list per sample: the processors of the families with several images a prompt (Mllama) need the nesting
        enc = processor(images=[[im] for im in images], text=prompts, return_tensors="pt", padding=True)
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    clock = StepClock(device)
    gen = dict(generation)
    new_tokens = int(gen.pop("max_new_tokens"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad(), VisionClock(model) as vision:
        clock.start()
        if pipeline is None:
            out = model.generate(**enc, max_new_tokens=new_tokens, logits_processor=LogitsProcessorList([clock]),
                                 return_dict_in_generate=True, **gen)
            trace = []
        else:
            with pipeline.attach(model, images_prepared=True):
                out = model.generate(**enc, max_new_tokens=new_tokens, logits_processor=LogitsProcessorList([clock]),
                                     return_dict_in_generate=True, **gen)
                trace = list(pipeline.trace)
    steps = clock.intervals_ms()
    prefill_ms = steps[0] if steps else float("nan")
    vision_ms = vision.ms()
    vision_flops = vision.flops(vision_flops_cache) / len(items)
    decode_ms = statistics.median(steps[1:]) if len(steps) > 1 else float("nan")
    kv = cache_bytes(out.past_key_values) // len(items) if out.past_key_values is not None else 0  # padded, fallback
    dtype_bytes = next(model.parameters()).element_size()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss()
    prompt_len = enc["input_ids"].shape[1]
    texts = processor.tokenizer.batch_decode(out.sequences[:, prompt_len:], skip_special_tokens=True)
    visual_counts = get_adapter(model).visual_token_counts(enc)
    records = []
    for b, (it, text) in enumerate(zip(items, texts)):
        n_tokens = int(enc["attention_mask"][b].sum()) if "attention_mask" in enc else prompt_len
        n_visual = visual_counts[b]
        prefill = [t for t in trace if t.site == "prefill"]  # kv_cache/decode traces do not change the prefill
        stages = [(t.layer, t.tokens_after[b], t.visual_after[b]) for t in prefill if isinstance(t.layer, int)]
        rec: dict[str, Any] = {
            "id": it["id"], "question": it["question"], "answer": it["answer"], "type": it["type"],
            "metric": it["metric"], "prediction": text.strip(),
            "visual_tokens": n_visual, "visual_tokens_kept": [t.visual_after[b] for t in prefill],
            "kv_visual_entries_kept": [t.visual_after[b] for t in trace if t.site == "kv_cache"],
            # decoding steps that chose before attending (decode: {scorer: stage}): their mean hit rate
            "decode_hit_rate": _mean([t.hit_rate[b] for t in trace if t.site == "decode" and t.hit_rate]),
            "prefill_ms": prefill_ms, "vision_ms": vision_ms, "llm_prefill_ms": prefill_ms - vision_ms,
            "decode_ms_per_token": decode_ms, "kv_cache_bytes": kv, "vision_flops": vision_flops,
            "peak_memory_bytes": peak, "operator_ms": sum(t.operator_ms for t in trace),  # this batch's
        }
        if shape is not None and len(stages) == len(prefill):
            rep = measured_flops(shape, n_tokens, n_visual, stages, flops_convention)
            rec.update(flops=rep.flops, baseline_flops=rep.baseline_flops,
                       equivalent_visual_tokens=rep.equivalent_visual_tokens,
                       kv_cache_bytes=prompt_kv_bytes(rep.per_layer_tokens, trace, pipeline, b, shape, dtype_bytes))
        records.append(rec)
    return records


# --- the Lightning loop -----------------------------------------------------------------------------

def predict(cfg: DictConfig, model, processor, items: list[dict[str, Any]], pipeline, shape,
            phase: str = "") -> list[dict[str, Any]]:
    """Run ``generate_batch`` over ``items`` in a Lightning predict loop (sharded across devices, gathered).
    ``phase`` labels the progress bar (``baseline``, or the pipeline's name)."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import TQDMProgressBar

    class PhaseBar(TQDMProgressBar):
        @property
        def predict_description(self) -> str:
            return phase or "Predicting"

        def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            if self.has_dataloader_changed(dataloader_idx):  # the label alone, not "<label> DataLoader 0"
                total = self.total_predict_batches_current_dataloader
                self.predict_progress_bar.reset(total=None if total == float("inf") else int(total))
                self.predict_progress_bar.set_description(self.predict_description)

    class Predictor(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def predict_step(self, batch, batch_idx):
            chunk = [items[i] for i in batch]
            recs = generate_batch(self.model, processor, chunk, pipeline, OmegaConf.to_container(cfg.generation),
                                  shape, cfg.flops_convention, flops_cache)
            for i, r in zip(batch, recs):
                r["index"] = i
            return recs

    flops_cache: dict = {}  # the vision side's FLOPs per distinct call shape
    loader = torch.utils.data.DataLoader(list(range(len(items))), batch_size=cfg.batch_size, shuffle=False,
                                         collate_fn=list)
    trainer = pl.Trainer(accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices,
                         strategy=cfg.trainer.strategy, precision=cfg.trainer.precision, logger=False,
                         enable_progress_bar=bool(cfg.logging.progress_bar), enable_model_summary=False,
                         enable_checkpointing=False, callbacks=[PhaseBar()] if cfg.logging.progress_bar else [])
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
    if all("flops" in r for r in records) and all("flops" in r for r in baseline):
        # the unpruned model's own counts: a pipeline that changes the images (downsampling) changes the prompt
        flops, base_flops = _mean([r["flops"] for r in records]), _mean([r["flops"] for r in baseline])
        metrics.update(flops=flops, baseline_flops=base_flops, flops_reduction=1 - flops / base_flops,
                       equivalent_visual_tokens=_mean([r["equivalent_visual_tokens"] for r in records]))
    else:
        metrics.update(flops=None, baseline_flops=None, flops_reduction=None, equivalent_visual_tokens=None)
    stages = sum(not isinstance(s.site, KVCacheSite) for s in pipeline.stages) if pipeline is not None else 0
    metrics["visual_tokens"] = _mean([r["visual_tokens"] for r in records])  # what the LLM received
    metrics["baseline_visual_tokens"] = _mean([r["visual_tokens"] for r in baseline])
    metrics["visual_tokens_kept"] = [_mean([r["visual_tokens_kept"][s] for r in records
                                            if len(r["visual_tokens_kept"]) > s]) for s in range(stages)]
    kv_layers = max((len(r["kv_visual_entries_kept"]) for r in records), default=0)
    if kv_layers:  # a kv_cache stage: mean visual entries each compressed layer's cache keeps after the prefill
        metrics["kv_visual_entries_kept"] = [_mean([r["kv_visual_entries_kept"][s] for r in records
                                                    if len(r["kv_visual_entries_kept"]) > s]) for s in range(kv_layers)]
    for key in ("prefill_ms", "vision_ms", "llm_prefill_ms", "decode_ms_per_token"):
        metrics[key], metrics[f"baseline_{key}"] = _median([r[key] for r in records]), _median([r[key] for r in baseline])
    metrics.update(protocol_metrics(metrics, _mean([r["vision_flops"] for r in records]),
                                    _mean([r["vision_flops"] for r in baseline])))
    metrics["kv_cache_bytes"] = _mean([r["kv_cache_bytes"] for r in records])
    hits = [r["decode_hit_rate"] for r in records if r.get("decode_hit_rate") is not None]
    if hits:  # decoding steps chose their entries before attending: how many of the step's own top they held
        metrics["decode_hit_rate"] = _mean(hits)
    metrics["baseline_kv_cache_bytes"] = _mean([r["kv_cache_bytes"] for r in baseline])
    metrics["peak_memory_bytes"] = max(r["peak_memory_bytes"] for r in records) if records else None
    metrics["operator_ms"] = _median([r["operator_ms"] for r in records])
    return metrics


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None or den == 0 else num / den


def protocol_metrics(metrics: Mapping[str, Any], vision_flops: float | None,
                     baseline_vision_flops: float | None) -> dict[str, Any]:
    """Where the time goes and what the FLOPs promise, from a run's medians (``prefill_ms``, ``vision_ms``,
    ``llm_prefill_ms``, their ``baseline_`` twins) and mean FLOPs (``flops``/``baseline_flops``: the LLM's
    prefill; ``vision_flops``: the vision tower and projector's, per sample):

    - ``vision_share``: the unpruned prefill's share spent in the vision side, which no pruning after the tower
      removes;
    - ``prefill_speedup`` and ``llm_prefill_speedup``: measured, unpruned over pruned, the whole prefill and the
      part after the tower;
    - ``flops_speedup``: the FLOPs-ideal speed-up of the LLM's prefill (``baseline_flops / flops``);
      ``flops_speedup_with_vision``: the same with the vision side's FLOPs added to both, the ideal of the whole
      prefill."""
    llm, with_vision = ideal_speedups(metrics.get("flops"), metrics.get("baseline_flops"), vision_flops,
                                      baseline_vision_flops)
    return {"vision_flops": vision_flops, "baseline_vision_flops": baseline_vision_flops,
            "vision_share": _ratio(metrics.get("baseline_vision_ms"), metrics.get("baseline_prefill_ms")),
            "prefill_speedup": _ratio(metrics.get("baseline_prefill_ms"), metrics.get("prefill_ms")),
            "llm_prefill_speedup": _ratio(metrics.get("baseline_llm_prefill_ms"), metrics.get("llm_prefill_ms")),
            "flops_speedup": llm, "flops_speedup_with_vision": with_vision}


# --- the run ----------------------------------------------------------------------------------------

def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate the pipeline and the (cached) unpruned baseline; write the run directory; return metrics.json.
    With ``data.lmms_eval`` the evaluation is lmms-eval's (:mod:`tokenprune.eval.lmms_eval_run`)."""
    import pytorch_lightning as pl

    if cfg.data.lmms_eval is not None:

        return run_lmms_eval(cfg)
    pipeline = resolve_pipeline(cfg)  # config errors before any model is loaded
    hard_filter = resolve_filter(cfg)
    name = pipeline.name if pipeline is not None else "unpruned"
    out = run_directory(cfg, name)
    config_text = resolved_config_yaml(cfg, pipeline)
    done = finished_run(out, config_text, cfg.overwrite)
    if done is not None and (changed := model_changed(out, cfg.model)):
        raise ConfigError("output_dir", f"{out} holds this config's finished results on other weights ({changed} of "
                                        f"{cfg.model.path} changed since); set overwrite=true to replace them, or "
                                        "choose another output_dir")
    if done is not None:  # this same run finished before (a rerun after it was killed at the very end)
        return {**done, "output_dir": str(out), "finished_earlier": True}
    items = load_items(cfg.data)
    pl.seed_everything(cfg.seed, verbose=False)
    filter_pipeline = hard_filter[1] if hard_filter is not None else None
    if items and "video" in items[0]:
        check_video_family(read_model_config(cfg.model))
    for pipe, key in ((pipeline, "pipeline"), (filter_pipeline, "data.filter.hard_for")):
        check_pipeline_for_model(read_model_config(cfg.model), pipe)  # config.json alone: before the weights load
        if items:
            first = items[0]["video"][0] if "video" in items[0] else items[0]["image"]
            check_input_scale(OmegaConf.to_container(cfg.model), pipe, open_image(first), key)
    model, processor = load_model(OmegaConf.to_container(cfg.model))
    for pipe in (pipeline, filter_pipeline):
        check_pipeline_for_model(model, pipe)  # the loaded model: before the baseline runs
    shape = _llm_shape(model)

    baseline = None
    cache_file = None
    from_cache = False
    if cfg.baseline_cache:
        cache_file = Path(cfg.baseline_cache) / f"{baseline_key(cfg, items)}.jsonl"
        baseline, damage = read_cached_records(cache_file, [it["id"] for it in items], RECORD_KEYS)
        from_cache = baseline is not None
        if damage:
            print(f"tokenprune: baseline cache {cache_file} is damaged ({damage}); computing the baseline again",
                  file=sys.stderr)
    if baseline is None:
        baseline = predict(cfg, model, processor, items, None, shape, "baseline (unpruned)")
        if cache_file is not None and _is_global_zero():
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            write_jsonl(cache_file, baseline)
    hard = None
    if hard_filter is not None:
        filter_name, filter_pipeline, below = hard_filter
        judged = baseline if filter_pipeline is None else _cached_predictions(
            cfg, items, model, processor, filter_pipeline, shape, f"filter ({filter_name})")
        hard = [i for i, (r, it) in enumerate(zip(judged, items)) if item_score(r["prediction"], it) < below]
    records = predict(cfg, model, processor, items, pipeline, shape, name) if pipeline is not None else baseline
    metrics = run_metrics(records, baseline, items, pipeline)
    if hard_filter is not None:
        metrics.update(hard_metrics(records, baseline, items, hard, hard_filter[0], hard_filter[2]))
    metrics.update(pipeline=name, model=str(cfg.model.path), data=_data_name(cfg), flops_convention=cfg.flops_convention,
                   baseline_cached=from_cache)
    if _is_global_zero():
        out.mkdir(parents=True, exist_ok=True)
        (out / FINISHED).unlink(missing_ok=True)  # overwrite: the old results go only once the new ones exist
        write_atomic(out / "config.yaml", config_text)
        write_atomic(out / "provenance.json", json.dumps(provenance(model_path(cfg.model), pipeline=pipeline), indent=2) + "\n")
        write_atomic(out / MODEL_RECORD, json.dumps(model_identity(cfg.model)) + "\n")
        write_jsonl(out / "predictions.jsonl", [
            {**r, "correct": _correct(r, it), "baseline_prediction": b["prediction"],
             **({"hard": i in hard} if hard is not None else {})}
            for i, (r, b, it) in enumerate(zip(records, baseline, items))])
        _log_wandb(cfg, metrics, records, baseline, out)
        write_atomic(out / "metrics.json", json.dumps(metrics, indent=2, default=str) + "\n")
    metrics["output_dir"] = str(out)
    return metrics


def _cached_predictions(cfg: DictConfig, items, model, processor, pipeline, shape, phase: str):
    """The records of ``pipeline`` on ``items`` (the difficulty filter's), from the baseline cache folder when it
    holds them (keyed like the baseline, with the pipeline's resolved config), else computed and cached."""
    cache_file = None
    if cfg.baseline_cache:
        key = digest({"baseline": baseline_key(cfg, items), "pipeline": OmegaConf.to_container(pipeline.config)})
        cache_file = Path(cfg.baseline_cache) / f"filter-{key}.jsonl"
        cached, damage = read_cached_records(cache_file, [it["id"] for it in items], ("id", "prediction"))
        if cached is not None:
            return cached
        if damage:
            print(f"tokenprune: filter cache {cache_file} is damaged ({damage}); computing it again", file=sys.stderr)
    records = predict(cfg, model, processor, items, pipeline, shape, phase)
    if cache_file is not None and _is_global_zero():
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(cache_file, records)
    return records


def hard_metrics(records: list[dict[str, Any]], baseline: list[dict[str, Any]], items: list[dict[str, Any]],
                 hard: list[int], name: str, below: float) -> dict[str, Any]:
    """The run's scores on the hard items alone (VTC-Bench's difficulty filter): those the filter pipeline
    ``name`` answered with an item score under ``below``. ``hard_n`` of them; accuracy, per type, the unpruned
    model's, relative score and fidelity as :func:`run_metrics` computes them on all items (None when no item is
    hard)."""
    out: dict[str, Any] = {"hard_for": name, "hard_below": below, "hard_n": len(hard)}
    if not hard:
        return {**out, "hard_accuracy": None, "hard_per_type": {}, "hard_baseline_accuracy": None,
                "hard_baseline_per_type": {}, "hard_relative_score": None, "hard_fidelity": None}
    sub = [items[i] for i in hard]
    pruned = summarize([records[i]["prediction"] for i in hard], sub)
    base = summarize([baseline[i]["prediction"] for i in hard], sub)
    same = sum(records[i]["prediction"].strip().lower() == baseline[i]["prediction"].strip().lower() for i in hard)
    return {**out, "hard_accuracy": pruned["accuracy"], "hard_per_type": pruned["per_type"],
            "hard_baseline_accuracy": base["accuracy"], "hard_baseline_per_type": base["per_type"],
            "hard_relative_score": relative_score(pruned["per_type"], base["per_type"]),
            "hard_fidelity": same / len(hard)}


#: What a baseline record needs for the metrics (a cached one is checked for them).
RECORD_KEYS = ("id", "prediction", "visual_tokens", "visual_tokens_kept", "kv_visual_entries_kept", "prefill_ms",
               "vision_ms", "llm_prefill_ms", "vision_flops", "decode_ms_per_token", "kv_cache_bytes",
               "peak_memory_bytes", "operator_ms")


def baseline_key(cfg: DictConfig, items: list[dict[str, Any]]) -> str:
    """The baseline cache's key: everything the unpruned records depend on (the weights, the items, generation,
    batch size, FLOPs convention, precision, seed)."""
    return digest({"model": model_identity(cfg.model), "data": data_digest(items),
                   "generation": OmegaConf.to_container(cfg.generation), "batch_size": cfg.batch_size,
                   "convention": cfg.flops_convention, "precision": str(cfg.trainer.precision), "seed": cfg.seed})


def _correct(record: Mapping[str, Any], item: Mapping[str, Any]) -> float:

    return item_score(record["prediction"], item)


def _data_name(cfg: DictConfig) -> str:
    if cfg.data.source == "shapes":
        return f"shapes/{cfg.data.split}" + (f"[:{cfg.data.limit}]" if cfg.data.limit else "")
    return str(cfg.data.path)


def _llm_shape(model):

    text = getattr(model.config, "text_config", model.config)
    try:
        return LLMShape.from_config(text, name=getattr(model.config, "model_type", "model"))
    except Exception:  # noqa: BLE001 - a config the analytic model does not know: no FLOPs, everything else runs
        return None


def _log_wandb(cfg: DictConfig, metrics: dict[str, Any], records, baseline, out: Path) -> None:
    w = cfg.logging.wandb
    if w.mode == "disabled":
        return
    import wandb  # wandb directly: Lightning's logger passes a deprecated setting W&B warns about on every run

    run = wandb.init(project=w.project, group=w.group, tags=list(w.tags), dir=str(out), mode=w.mode,
                     name=out.name, config=OmegaConf.to_container(cfg), reinit="finish_previous")
    run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None})
    rows = [[r["id"], r["question"], str(r["answer"]), r["prediction"], b["prediction"]]
            for r, b in list(zip(records, baseline))[: int(cfg.logging.samples)]]
    run.log({"predictions": wandb.Table(columns=["id", "question", "answer", "prediction", "unpruned"], data=rows)})
    run.finish()


#: What a run measures of the machine rather than of the method (timings, memory, the cache's state): a rerun
#: (``tokenprune run --from``) must give every other metric again.
MACHINE_KEYS = frozenset({
    "prefill_ms", "vision_ms", "llm_prefill_ms", "decode_ms_per_token", "operator_ms", "vision_share",
    "prefill_speedup", "llm_prefill_speedup", "peak_memory_bytes", "baseline_cached", "finished_earlier",
    "output_dir", *(f"baseline_{k}" for k in ("prefill_ms", "vision_ms", "llm_prefill_ms", "decode_ms_per_token"))})


def compare_runs(before: Path, after: Path) -> list[str]:
    """What differs between two finished run directories' results: every metric of ``metrics.json`` but
    :data:`MACHINE_KEYS` (numbers to 1e-9 relative), and the items whose answers changed, pruned or unpruned
    (``predictions.jsonl``; an lmms-eval run has none); empty when a rerun reproduced them."""
    old, new = (json.loads((d / "metrics.json").read_text()) for d in (before, after))
    keys = [k for k in dict.fromkeys([*old, *new]) if k not in MACHINE_KEYS]
    diffs = [f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys if not _same(old.get(k), new.get(k))]
    if not all((d / "predictions.jsonl").is_file() for d in (before, after)):
        return diffs
    rows = [[json.loads(line) for line in (d / "predictions.jsonl").read_text().splitlines()] for d in (before, after)]
    for key, label in (("prediction", "pipeline"), ("baseline_prediction", "unpruned")):
        changed = [a["id"] for a, b in zip(*rows) if a.get(key) != b.get(key)]
        if changed:
            diffs.append(f"{len(changed)} {label} answers changed (first: {changed[0]})")
    return diffs


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


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
    lines.append(f"{'visual tokens (layer mean)':<28}{num(metrics.get('baseline_visual_tokens')):>14}"
                 f"{num(metrics['equivalent_visual_tokens']):>14}")
    lines.append(f"{'prefill ms (median batch)':<28}{num(metrics['baseline_prefill_ms']):>14}"
                 f"{num(metrics['prefill_ms']):>14}")
    lines.append(f"{'  vision tower ms':<28}{num(metrics['baseline_vision_ms']):>14}{num(metrics['vision_ms']):>14}")
    lines.append(f"{'  LLM prefill ms':<28}{num(metrics['baseline_llm_prefill_ms']):>14}"
                 f"{num(metrics['llm_prefill_ms']):>14}")
    lines.append(f"{'decode ms / token':<28}{num(metrics['baseline_decode_ms_per_token'], '{:.2f}'):>14}"
                 f"{num(metrics['decode_ms_per_token'], '{:.2f}'):>14}")
    lines.append(f"{'KV cache KiB / sample':<28}{num(_kib(metrics['baseline_kv_cache_bytes'])):>14}"
                 f"{num(_kib(metrics['kv_cache_bytes'])):>14}")
    lines.append("")
    lines.append(f"relative score {num(metrics['relative_score'])}   fidelity {pct(metrics['fidelity'])}   "
                 f"FLOPs reduction {pct(metrics['flops_reduction'])} ({metrics['flops_convention']})   "
                 f"visual tokens kept per stage {[round(v, 1) for v in metrics['visual_tokens_kept'] if v is not None]}   "
                 f"operator ms / batch {num(metrics['operator_ms'], '{:.2f}')}")
    lines.append(f"prefill speed-up x{num(metrics['prefill_speedup'], '{:.2f}')} measured "
                 f"(LLM part x{num(metrics['llm_prefill_speedup'], '{:.2f}')}), FLOPs-ideal "
                 f"x{num(metrics['flops_speedup'], '{:.2f}')} (LLM) / "
                 f"x{num(metrics['flops_speedup_with_vision'], '{:.2f}')} (with the vision tower)   "
                 f"vision tower share of the unpruned prefill {pct(metrics['vision_share'])}")
    if metrics.get("hard_for") is not None:
        lines.append(f"hard for {metrics['hard_for']} ({metrics['hard_n']} of {metrics['n']} items it gets wrong): "
                     f"accuracy {pct(metrics['hard_accuracy'])}, unpruned {pct(metrics['hard_baseline_accuracy'])}, "
                     f"relative score {num(metrics['hard_relative_score'])}")
    if metrics.get("baseline_cached"):
        lines.append("(unpruned baseline read from the cache)")
    if metrics.get("finished_earlier"):
        lines.append(f"(this run had finished: read from {metrics['output_dir']}/metrics.json; overwrite=true "
                     "runs it again)")
    return "\n".join(lines)


def _kib(v):
    return None if v is None else v / 1024
