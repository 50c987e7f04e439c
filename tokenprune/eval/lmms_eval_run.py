"""``tokenprune run`` on lmms-eval tasks: ``data: {lmms_eval: [pope, gqa]}`` (or ``{tasks: [...], include_path:
FOLDER, metrics: {task: metric}}``) evaluates the unpruned model and the pipeline on each task through lmms-eval
(the ``tokenprune`` model of :mod:`tokenprune.eval.lmms_eval_model`, loaded once) and reports, per task, both scores
and the relative score the papers report: pruned / unpruned x 100, averaged over the tasks.

The unpruned results are cached like ``tokenprune run``'s baseline (``baseline_cache``), keyed by the model, the
tasks, ``data.limit``, ``include_path``, the batch size and generation length. The run directory gets
``config.yaml``, ``lmms_eval_results.json`` (lmms-eval's ``results`` for both) and ``metrics.json`` (last).
lmms-eval is imported only here, when such a run starts.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from tokenprune.core.errors import ConfigError
from tokenprune.eval.files import digest, write_atomic
from tokenprune.eval.models import check_pipeline_for_model, model_identity, model_path, read_model_config
from tokenprune.eval.run_config import (
    FINISHED,
    finished_run,
    resolve_pipeline,
    resolved_config_yaml,
    run_directory,
)
from tokenprune.measure.provenance import provenance

SPEC_KEYS = ("tasks", "include_path", "metrics")


def lmms_eval_spec(data: DictConfig) -> dict[str, Any]:
    """``{tasks, include_path, metrics}`` from ``data.lmms_eval`` (a list of task names or a mapping), checked
    (a relative ``include_path`` was already tried against the config file's folder by ``load_run_config``)."""
    spec = data.lmms_eval
    spec = OmegaConf.to_container(spec) if isinstance(spec, (DictConfig, ListConfig)) else spec
    if isinstance(spec, str):
        spec = [t.strip() for t in spec.split(",") if t.strip()]
    if isinstance(spec, list):
        spec = {"tasks": spec}
    if not isinstance(spec, dict):
        raise ConfigError("data.lmms_eval", f"a list of lmms-eval task names or a mapping with {', '.join(SPEC_KEYS)}; "
                                            f"got {spec!r}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(f"data.lmms_eval.{unknown[0]}", f"unknown key; allowed: {', '.join(SPEC_KEYS)}")
    tasks = spec.get("tasks")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise ConfigError("data.lmms_eval.tasks", f"a non-empty list of task names, got {tasks!r}")
    include = spec.get("include_path")
    if include is not None:
        path = Path(include)
        if not path.is_dir():
            raise ConfigError("data.lmms_eval.include_path", f"no such folder: {include}")
        include = str(path.resolve())
    metrics = spec.get("metrics") or {}
    if not isinstance(metrics, dict) or not all(isinstance(v, str) for v in metrics.values()):
        raise ConfigError("data.lmms_eval.metrics", f"a mapping task -> metric name, got {metrics!r}")
    extra = sorted(set(metrics) - set(tasks))
    if extra:
        raise ConfigError(f"data.lmms_eval.metrics.{extra[0]}", f"not one of the run's tasks: {', '.join(tasks)}")
    return {"tasks": list(tasks), "include_path": include, "metrics": dict(metrics)}


def main_metric(task_results: Mapping[str, Any], task: str, chosen: str | None = None) -> tuple[str, float]:
    """(metric, value) that stands for ``task``: ``chosen`` when given, else the task's first metric (lmms-eval
    keys are ``metric,filter``; standard errors and the alias are skipped)."""
    names = [k for k in task_results if k != "alias" and "_stderr" not in k and "," in k]
    if chosen is not None:
        match = [k for k in names if k.split(",")[0] == chosen or k == chosen]
        if not match:
            raise ConfigError(f"data.lmms_eval.metrics.{task}", f"{chosen!r} is not a metric of {task}; it has "
                                                                f"{', '.join(k.split(',')[0] for k in names)}")
        names = match
    for k in names:
        v = task_results[k]
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return k.split(",")[0], float(v)
    raise ConfigError(f"data.lmms_eval.metrics.{task}", f"task {task} reported no numeric metric: {dict(task_results)}")


def relative_scores(baseline: Mapping[str, Any], pruned: Mapping[str, Any], tasks: list[str],
                    metrics: Mapping[str, str]) -> dict[str, Any]:
    """Per task {metric, unpruned, pruned, relative (pruned / unpruned x 100; None when unpruned is 0)} and their
    mean ``relative_score`` over the tasks that have one."""
    per_task = {}
    for task in tasks:
        if task not in baseline or task not in pruned:
            raise ConfigError("data.lmms_eval.tasks", f"lmms-eval returned no results for {task!r} (is it a group? "
                                                      "name its tasks)")
        metric, base = main_metric(baseline[task], task, metrics.get(task))
        _, value = main_metric(pruned[task], task, metric)
        per_task[task] = {"metric": metric, "unpruned": base, "pruned": value,
                          "relative": value / base * 100 if base else None}
    rel = [r["relative"] for r in per_task.values() if r["relative"] is not None]
    return {"per_task": per_task, "relative_score": sum(rel) / len(rel) if rel else None}


def _plain(obj: Any) -> Any:
    """lmms-eval's results as JSON values (numpy scalars to floats, NaN to None)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (str, bool)) or obj is None:
        return obj
    try:
        value = float(obj)
    except (TypeError, ValueError):
        return str(obj)
    if math.isnan(value):
        return None
    return int(value) if isinstance(obj, int) else value


def evaluate(lm, tasks: list[str], task_manager, limit: int | None, batch_size: int) -> dict[str, Any]:
    """lmms-eval's ``results`` of ``lm`` on ``tasks`` (JSON values)."""
    from lmms_eval import evaluator

    out = evaluator.simple_evaluate(model=lm, tasks=tasks, limit=limit, batch_size=batch_size,
                                    task_manager=task_manager, log_samples=False)
    return _plain(out["results"])


def _quiet_lmms_eval() -> None:
    """lmms-eval logs through loguru at DEBUG while indexing its ~300 task folders: keep warnings and up."""

    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")


def run_lmms_eval(cfg: DictConfig) -> dict[str, Any]:
    """The run (module docstring); returns metrics.json."""

    spec = lmms_eval_spec(cfg.data)
    other = sorted(k for k in cfg.generation if k not in ("max_new_tokens", "do_sample"))
    if other or cfg.generation.do_sample:
        key = other[0] if other else "do_sample"
        raise ConfigError(f"generation.{key}", "an lmms-eval run takes generation.max_new_tokens only (each task "
                                               "sets its own generation options)")
    pipeline = resolve_pipeline(cfg)  # config errors before lmms-eval or the model load
    check_pipeline_for_model(read_model_config(cfg.model), pipeline)
    name = pipeline.name if pipeline is not None else "unpruned"
    out = run_directory(cfg, f"{name}-lmms")
    config_text = resolved_config_yaml(cfg, pipeline)
    done = finished_run(out, config_text, cfg.overwrite)
    if done is not None:
        return {**done, "output_dir": str(out), "finished_earlier": True}
    try:
        from lmms_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError("data.lmms_eval", "needs lmms-eval: pip install 'tokenprune-lvlm[lmms]'") from None
    from tokenprune.eval.lmms_eval_model import TokenPrune

    _quiet_lmms_eval()
    task_manager = TaskManager("WARNING", include_path=spec["include_path"])
    unknown = [t for t in spec["tasks"] if t not in task_manager.all_tasks]
    if unknown:
        raise ConfigError("data.lmms_eval.tasks", f"unknown lmms-eval task {unknown[0]!r}"
                                                  + (f" (include_path {spec['include_path']})" if spec["include_path"]
                                                     else " (a local task needs data.lmms_eval.include_path)"))
    m = cfg.model
    lm = TokenPrune(pretrained=str(m.path), pipeline="none", dtype=m.dtype, attn_implementation=m.attn_implementation,
                    device_map=m.device_map, trust_remote_code=m.trust_remote_code is True, batch_size=cfg.batch_size,
                    max_new_tokens=int(cfg.generation.max_new_tokens))
    lm.keep_loaded = True  # evaluated twice (unpruned, pruned)
    limit = cfg.data.limit
    baseline, cache_file, from_cache = None, None, False
    if cfg.baseline_cache:
        key = digest({"model": model_identity(cfg.model), "lmms_eval": spec, "limit": limit,
                       "batch_size": cfg.batch_size, "max_new_tokens": cfg.generation.max_new_tokens,
                       "seed": cfg.seed})
        cache_file = Path(cfg.baseline_cache) / f"{key}.lmms_eval.json"
        baseline = _read_cached_results(cache_file, spec["tasks"])
        from_cache = baseline is not None
    def phase(label: str) -> None:  # lmms-eval draws its own unlabelled bars: say whose they are
        if cfg.logging.progress_bar:
            print(f"{label}: lmms-eval {', '.join(spec['tasks'])}", file=sys.stderr, flush=True)

    if baseline is None:
        phase("baseline (unpruned)")
        baseline = evaluate(lm, spec["tasks"], task_manager, limit, cfg.batch_size)
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(cache_file, json.dumps(baseline, indent=1))
    if pipeline is not None:
        lm.pipeline = pipeline
        phase(name)
        pruned = evaluate(lm, spec["tasks"], task_manager, limit, cfg.batch_size)
    else:
        pruned = baseline
    metrics = relative_scores(baseline, pruned, spec["tasks"], spec["metrics"])
    metrics.update(pipeline=name, model=str(m.path), data="lmms_eval:" + ",".join(spec["tasks"]), limit=limit,
                   baseline_cached=from_cache)
    out.mkdir(parents=True, exist_ok=True)
    (out / FINISHED).unlink(missing_ok=True)
    write_atomic(out / "config.yaml", config_text)
    write_atomic(out / "provenance.json", json.dumps(provenance(model_path(m), pipeline=pipeline), indent=2) + "\n")
    write_atomic(out / "lmms_eval_results.json", json.dumps({"unpruned": baseline, name: pruned}, indent=1) + "\n")
    write_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    metrics["output_dir"] = str(out)
    return metrics


def _read_cached_results(path: Path, tasks: list[str]) -> dict[str, Any] | None:
    """Cached unpruned results with an entry per task; None (computed again, said on stderr) when missing or
    damaged."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        data, why = None, f"unreadable ({type(e).__name__})"
    else:
        missing = [t for t in tasks if not isinstance(data, dict) or t not in data]
        why = f"no results for {missing[0]}" if missing else None
    if why:
        print(f"tokenprune: baseline cache {path} is damaged ({why}); evaluating the unpruned model again",
              file=sys.stderr)
        return None
    return data


def summary_table(metrics: Mapping[str, Any]) -> str:
    """The table printed at the end of an lmms-eval run."""
    def num(v):
        return "—" if v is None else f"{v:.4g}"

    lines = [f"tokenprune run: {metrics['pipeline']} on {metrics['data']}"
             + (f" (first {metrics['limit']} docs per task)" if metrics.get("limit") else "")
             + f", model {metrics['model']}", "",
             f"{'task':<24}{'metric':<22}{'unpruned':>10}{metrics['pipeline']:>12}{'relative':>10}"]
    for task, r in metrics["per_task"].items():
        rel = "—" if r["relative"] is None else f"{r['relative']:.1f}"
        lines.append(f"{task:<24}{r['metric']:<22}{num(r['unpruned']):>10}{num(r['pruned']):>12}{rel:>10}")
    rel = metrics["relative_score"]
    lines += ["", f"relative score (mean over tasks) {'—' if rel is None else f'{rel:.1f}'}"]
    if metrics.get("baseline_cached"):
        lines.append("(unpruned results read from the cache)")
    return "\n".join(lines)
