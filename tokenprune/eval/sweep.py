"""``tokenprune sweep FILE [--dry-run]``: an ablation study from YAML, resumable, with a table and a plot.

A sweep file (``experiments/ablations/*.yaml``)::

    name: asap_ablation
    base: ../asap_shapes.yaml            # a run config (relative to this file), or an inline mapping
    set: [data.limit=200]                # KEY=VALUE applied to every variant
    budget: {key: stages.0.operators.3.keep, values: [0.5, 0.25, 0.1]}   # a grid axis the methods share
    grid: {KEY: [v1, v2]}                # more axes: the cartesian product
    swap:                                # alternatives tried one at a time against the base
      stages.0.operators.0: [{op: none}, {op: rope_free}]
    variants:                            # named alternatives that change several keys at once
      random_scorer: {stages.0.operators.1: {op: random}}
    methods:                             # other pipelines, at each budget
      fastv: {budget: {stages.0.operators.1.keep: 1.0}}            # key = factor x budget
      pyramiddrop: {set: {stages.0.layer: 1}, budget: {...}}

Keys whose first part is a run-config section (``model``, ``data``, ``pipeline``, ``generation``,
``batch_size`` ...) set the run config; every other key is a pipeline override. Every grid point runs
the base, each swap alternative, each named variant and each method. Variant names are generated from
what differs from the base (``keep=0.25``, ``keep=0.25,op0=rope_free``, ``fastv,keep=0.25``).

Each variant is a normal run directory under ``output_dir/<name>/<variant>``; the unpruned baseline
runs once (a cache shared by the variants). A variant is done when its ``metrics.json`` exists (the run
writes it last, atomically), so a killed sweep started again runs only what is missing; a variant that
fails is recorded (``error.txt``, and its row in ``results.csv``) and the sweep goes on. A finished variant
whose config differs from the one it ran with (the sweep file was edited since) runs again, and its earlier
run directory is moved to ``output_dir/.stale/`` (nothing is deleted).
"""

from __future__ import annotations

import csv
import itertools
import json
import re
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from tokenprune.core.errors import ConfigError
from tokenprune.eval.run import run
from tokenprune.eval.run_config import DEFAULTS, load_run_config, resolve_pipeline, resolved_config_yaml
from tokenprune.measure.flops import LLMShape, pipeline_flops
from tokenprune.reference import model as reference

SWEEP_KEYS = {"name", "base", "set", "budget", "grid", "swap", "variants", "methods", "output_dir"}
RESULT_COLUMNS = ["variant", "pipeline", "accuracy", "relative_score", "fidelity", "flops_reduction",
                  "equivalent_visual_tokens", "prefill_ms", "decode_ms_per_token", "kv_cache_bytes", "error"]


@dataclass
class Variant:
    name: str
    pipeline: str | None  # another preset (a method), or None: the base's pipeline
    values: dict[str, Any]  # key -> value, what differs from the base (grid, swap, variant, budget)
    run_overrides: list[str] = field(default_factory=list)
    pipeline_overrides: list[str] = field(default_factory=list)


def _value_text(value: Any) -> str:
    """A value as OmegaConf dot-list syntax (mappings and lists in flow style)."""
    if isinstance(value, (dict, list)):
        return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    if value is None:
        return "null"
    return str(value)


def _short(key: str, value: Any) -> str:
    """A readable name part: the key's last segment (``operators.N`` -> ``opN``) and the value (an operator's name)."""
    parts = key.split(".")
    if len(parts) >= 2 and parts[-2] == "operators" and parts[-1].isdigit():
        label = f"op{parts[-1]}"
    else:
        label = parts[-1]
    if isinstance(value, Mapping) and "op" in value:
        shown = str(value["op"])
    elif isinstance(value, (dict, list)):
        shown = re.sub(r"[^A-Za-z0-9_.-]+", "", _value_text(value))
    else:
        shown = str(value)
    return f"{label}={shown}"


class Sweep:
    """A parsed sweep file; :meth:`variants` lists what it runs."""

    def __init__(self, path: str | Path, extra_set: list[str] = ()):
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(None, f"no such sweep file: {path}")
        raw = yaml.safe_load(self.path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(None, f"{path}: a sweep file is a mapping")
        unknown = set(raw) - SWEEP_KEYS
        if unknown:
            raise ConfigError(sorted(unknown)[0], f"unknown sweep key in {path}; allowed: {', '.join(sorted(SWEEP_KEYS))}")
        self.name = str(raw.get("name") or self.path.stem)
        self.base = raw.get("base")
        if self.base is None:
            raise ConfigError("base", f"{path}: a sweep needs a base run config (a path or a mapping)")
        self.set = list(raw.get("set") or []) + list(extra_set)
        self.budget = raw.get("budget")
        if self.budget is not None and (not isinstance(self.budget, dict) or set(self.budget) != {"key", "values"}):
            raise ConfigError("budget", f"must be {{key: KEY, values: [...]}}, got {self.budget!r}")
        self.grid = self._mapping_of_lists(raw, "grid")
        self.swap = self._mapping_of_lists(raw, "swap")
        self.named = raw.get("variants") or {}
        self.methods = raw.get("methods") or {}
        for name, spec in self.methods.items():
            if not isinstance(spec, dict) or not set(spec) <= {"set", "budget"}:
                raise ConfigError(f"methods.{name}", f"must be {{set: {{KEY: VALUE}}, budget: {{KEY: FACTOR}}}}, got {spec!r}")
            if spec.get("budget") and self.budget is None:
                raise ConfigError(f"methods.{name}.budget", "needs a top-level budget: {key, values}")
        self.output_dir = Path(raw.get("output_dir") or f"runs/sweeps/{self.name}")

    @staticmethod
    def _mapping_of_lists(raw: dict, key: str) -> dict[str, list]:
        section = raw.get(key) or {}
        if not isinstance(section, dict):
            raise ConfigError(key, f"must be a mapping of KEY: [values], got {section!r}")
        for k, v in section.items():
            if not isinstance(v, list) or not v:
                raise ConfigError(f"{key}.{k}", f"must be a non-empty list of values, got {v!r}")
        return section

    def base_config(self, variant: Variant):
        """The variant's run config (defaults, base, ``set``, its own values)."""

        base_path = None
        overrides: list[str] = []
        if isinstance(self.base, str):
            base_path = (self.path.parent / self.base).resolve()
        elif isinstance(self.base, dict):
            overrides = [f"{k}={_value_text(v)}" for k, v in self.base.items()]  # each section whole
        else:
            raise ConfigError("base", f"a run config path or mapping, got {self.base!r}")
        run_keys = set(DEFAULTS)
        sets = [s for s in self.set if s.split("=", 1)[0].split(".")[0] in run_keys]
        pipeline_sets = [s for s in self.set if s not in sets]
        cfg = load_run_config(base_path, overrides + sets + variant.run_overrides)
        if cfg.data.lmms_eval is not None:
            raise ConfigError("data.lmms_eval", "a sweep evaluates items (data.source shapes, jsonl or datasets); "
                                                "lmms-eval tasks are run one pipeline at a time with `tokenprune run`")
        if variant.pipeline is not None:
            cfg.pipeline = variant.pipeline
            cfg.overrides = list(variant.pipeline_overrides)
        else:
            cfg.overrides = list(cfg.overrides) + pipeline_sets + list(variant.pipeline_overrides)
        cfg.output_dir = str(self.output_dir / variant.name)
        cfg.baseline_cache = str(self.output_dir / ".baselines")
        cfg.logging.wandb.group = self.name
        return cfg

    def variants(self) -> list[Variant]:
        """Every variant, in a stable order; names are unique."""

        run_keys = set(DEFAULTS)

        def make(pipeline: str | None, values: dict[str, Any], label: list[str]) -> Variant:
            v = Variant(name=",".join(label) or "base", pipeline=pipeline, values=values)
            for k, val in values.items():
                target = v.run_overrides if k.split(".")[0] in run_keys else v.pipeline_overrides
                target.append(f"{k}={_value_text(val)}")
            return v

        axes = list(self.grid.items())
        if self.budget is not None:
            axes = [(str(self.budget["key"]), list(self.budget["values"]))] + axes
        points = [dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])] or [{}]
        out: list[Variant] = []
        for point in points:
            label = [_short(k, v) for k, v in point.items()]
            out.append(make(None, dict(point), label))
            for key, alternatives in self.swap.items():
                for alt in alternatives:
                    out.append(make(None, {**point, key: alt}, label + [_short(key, alt)]))
            for name, changes in self.named.items():
                if not isinstance(changes, dict):
                    raise ConfigError(f"variants.{name}", f"must be a mapping of KEY: VALUE, got {changes!r}")
                out.append(make(None, {**point, **changes}, label + [str(name)]))
            for method, spec in self.methods.items():
                values = dict(spec.get("set") or {})
                budget = point.get(str(self.budget["key"])) if self.budget is not None else None
                for key, factor in (spec.get("budget") or {}).items():
                    values[key] = round(float(factor) * float(budget), 6)
                # a method shares the grid's run-config axes (data, generation...), not the base pipeline's keys
                grid_rest = {k: v for k, v in point.items() if k.split(".")[0] in run_keys
                             and (self.budget is None or k != self.budget["key"])}
                tag = [_short(str(self.budget["key"]), budget)] if budget is not None else []
                v = make(method, {**grid_rest, **values},
                         [str(method)] + tag + [_short(k, val) for k, val in grid_rest.items()])
                out.append(v)
        seen: dict[str, int] = {}
        for v in out:
            v.name = re.sub(r"[^A-Za-z0-9_.=,+-]", "_", v.name)
            if v.name in seen:
                seen[v.name] += 1
                v.name = f"{v.name}#{seen[v.name]}"
            else:
                seen[v.name] = 0
        return out


# --- running -----------------------------------------------------------------------------------------

def dry_run(sweep: Sweep, tokens: int = 640, visual: int = 576) -> list[dict[str, Any]]:
    """Each variant with its analytic FLOPs reduction on the model's LLM shape (``tokens`` of which ``visual``),
    nothing run; a variant whose config is wrong shows its error."""

    rows = []
    for v in sweep.variants():
        row: dict[str, Any] = {"variant": v.name, "pipeline": v.pipeline or "base", "flops_reduction": None, "error": ""}
        try:
            cfg = sweep.base_config(v)
            pipe = resolve_pipeline(cfg)
            shape = _shape_of(cfg)
            if pipe is not None and shape is not None:
                row["flops_reduction"] = pipeline_flops(pipe, shape, tokens, visual, cfg.flops_convention).reduction
        except ConfigError as e:
            row["error"] = str(e)
        rows.append(row)
    return rows


def _shape_of(cfg):
    """The LLM shape from the model's config.json (no weights loaded), or None."""
    from transformers import AutoConfig

    path = str(cfg.model.path)
    try:
        if path == "reference":

            path = str(reference.path())
        config = AutoConfig.from_pretrained(path, local_files_only=Path(path).is_dir())
    except OSError:  # FileNotFoundError included: not trained, not downloaded, offline
        return None
    return LLMShape.from_config(getattr(config, "text_config", config), name=getattr(config, "model_type", "model"))


def _changed_since_run(vdir: Path, cfg) -> str | None:
    """Where the variant's run config (with its resolved pipeline) differs from the one its finished run wrote to
    ``config.yaml`` (``"data.limit: 300 -> 500"``), or None. A sweep file edited after a run — a ``set`` key, a
    budget value, an override — would otherwise be answered with the old run's results. Code changes, such as an
    operator's defaults, are not seen: the config records what was asked for, not the defaults it ran with."""

    stored_file = vdir / "config.yaml"
    if not stored_file.is_file():
        return None
    try:
        pipeline = resolve_pipeline(cfg)
    except ConfigError:
        return None  # the variant cannot run; its earlier result stands until the config is fixed
    current = OmegaConf.to_container(OmegaConf.create(resolved_config_yaml(cfg, pipeline)))
    stored = OmegaConf.to_container(OmegaConf.load(stored_file))
    return _first_difference(stored, current)


def _first_difference(old: Any, new: Any, where: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            found = _first_difference(old.get(key), new.get(key), f"{where}.{key}" if where else str(key))
            if found:
                return found
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            found = _first_difference(a, b, f"{where}.{i}")
            if found:
                return found
        return None
    return None if old == new else f"{where}: {_value_text(old)} -> {_value_text(new)}"


def _set_aside(vdir: Path, output_dir: Path) -> Path:
    """Move a variant's earlier run directory under ``output_dir/.stale/`` (never overwriting one kept before)."""
    stale = output_dir / ".stale"
    stale.mkdir(parents=True, exist_ok=True)
    n = 1
    while (stale / f"{vdir.name}.{n}").exists():
        n += 1
    return vdir.rename(stale / f"{vdir.name}.{n}")


def run_sweep(sweep: Sweep) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Run every variant not yet done; write results.csv and accuracy_vs_flops.png. Returns (rows, baseline)."""

    sweep.output_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    baseline = None
    for v in sweep.variants():
        vdir = sweep.output_dir / v.name
        done = vdir / "metrics.json"
        row: dict[str, Any] = {"variant": v.name, "pipeline": v.pipeline or "base",
                               **{k: _value_text(val) for k, val in v.values.items()}}
        changed = _changed_since_run(vdir, sweep.base_config(v)) if done.is_file() else None
        if changed is not None:
            aside = _set_aside(vdir, sweep.output_dir)
            print(f"[{v.name}] its config changed since it ran ({changed}): running it again; the earlier run is "
                  f"kept in {aside}", flush=True)
        if done.is_file():
            metrics = json.loads(done.read_text())
            status = "done earlier"
        else:
            try:
                metrics = run(sweep.base_config(v))
                (vdir / "error.txt").unlink(missing_ok=True)
                status = "ran"
            except Exception as e:  # noqa: BLE001 - a failed variant is recorded and the sweep goes on
                vdir.mkdir(parents=True, exist_ok=True)
                (vdir / "error.txt").write_text(traceback.format_exc())
                row["error"] = f"{type(e).__name__}: {e}"
                rows.append(row)
                print(f"[{v.name}] failed: {row['error']}", flush=True)
                continue
        for col in RESULT_COLUMNS[2:-1]:
            row[col] = metrics.get(col)
        row["error"] = ""
        baseline = baseline or {"accuracy": metrics.get("baseline_accuracy"),
                                "prefill_ms": metrics.get("baseline_prefill_ms")}
        rows.append(row)
        print(f"[{v.name}] {status}: accuracy {metrics['accuracy']:.3f}, FLOPs reduction "
              f"{_fmt(metrics.get('flops_reduction'))}", flush=True)
    write_results(sweep, rows, baseline)
    return rows, baseline


def _fmt(v):
    return "—" if v is None else f"{v:.1%}"


def write_results(sweep: Sweep, rows: list[dict[str, Any]], baseline: dict[str, Any] | None) -> None:
    value_cols = sorted({k for r in rows for k in r} - set(RESULT_COLUMNS))
    columns = RESULT_COLUMNS[:2] + value_cols + RESULT_COLUMNS[2:]
    tmp = sweep.output_dir / "results.csv.tmp"
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({c: r.get(c, "") for c in columns})
    tmp.replace(sweep.output_dir / "results.csv")
    tmp = sweep.output_dir / "results.md.tmp"
    tmp.write_text(results_markdown(rows, baseline))
    tmp.replace(sweep.output_dir / "results.md")
    plot_accuracy_vs_flops(rows, baseline, sweep.output_dir / "accuracy_vs_flops.png", title=sweep.name)


def results_markdown(rows: list[dict[str, Any]], baseline: dict[str, Any] | None) -> str:
    """The results as a Markdown table (``results.md`` next to ``results.csv``; docs/results.md quotes it):
    one row per variant under the unpruned one, grouped by pipeline in the sweep's order, with accuracy,
    relative score (pruned / unpruned x 100), fidelity (answers identical to the unpruned model's), the
    analytic LLM-prefill FLOPs reduction, the layer-averaged visual tokens, and the median prefill time."""
    lines = ["| variant | pipeline | accuracy | relative score | fidelity | FLOPs reduction | visual tokens "
             "(layer avg.) | prefill ms |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    if baseline:
        lines.append(f"| unpruned | — | {_pct(baseline.get('accuracy'))} | 100.0 | 100.0% | 0.0% | — | "
                     f"{_num(baseline.get('prefill_ms'))} |")
    order = list(dict.fromkeys(r["pipeline"] for r in rows))
    for r in sorted(rows, key=lambda r: order.index(r["pipeline"])):
        if r.get("error"):
            lines.append(f"| {r['variant']} | {r['pipeline']} | failed: {r['error'][:80]} | | | | | |")
            continue
        lines.append(f"| {r['variant']} | {r['pipeline']} | {_pct(r.get('accuracy'))} | "
                     f"{_num(r.get('relative_score'))} | {_pct(r.get('fidelity'))} | {_pct(r.get('flops_reduction'))} | "
                     f"{_num(r.get('equivalent_visual_tokens'))} | {_num(r.get('prefill_ms'))} |")
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_flops(rows: list[dict[str, Any]], baseline: dict[str, Any] | None, path: Path,
                           title: str = "") -> None:
    """One marker per variant (x: FLOPs reduction, y: accuracy), the unpruned point, labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    pts = [r for r in rows if not r.get("error") and r.get("accuracy") is not None and r.get("flops_reduction") is not None]
    groups: dict[str, list] = {}
    for r in pts:
        groups.setdefault(r["pipeline"], []).append(r)
    for name, rs in sorted(groups.items()):
        ax.scatter([100 * r["flops_reduction"] for r in rs], [100 * r["accuracy"] for r in rs], label=name, s=28)
        for r in rs:
            ax.annotate(r["variant"], (100 * r["flops_reduction"], 100 * r["accuracy"]), fontsize=6,
                        xytext=(3, 2), textcoords="offset points")
    if baseline and baseline.get("accuracy") is not None:
        ax.scatter([0], [100 * baseline["accuracy"]], marker="*", s=140, color="black", label="unpruned")
    ax.set_xlabel("LLM prefill FLOPs reduction (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def summary(rows: list[dict[str, Any]], baseline: dict[str, Any] | None) -> str:
    lines = [f"{'variant':<44}{'accuracy':>9}{'rel.':>7}{'fidel.':>8}{'FLOPs -':>9}{'prefill ms':>11}"]
    if baseline:
        lines.append(f"{'unpruned':<44}{_pct(baseline.get('accuracy')):>9}{'100.0':>7}{'':>8}{'0.0%':>9}"
                     f"{_num(baseline.get('prefill_ms')):>11}")
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['variant']:<44}  FAILED: {r['error'][:60]}")
            continue
        lines.append(f"{r['variant']:<44}{_pct(r['accuracy']):>9}{_num(r['relative_score']):>7}"
                     f"{_pct(r['fidelity']):>8}{_pct(r['flops_reduction']):>9}{_num(r['prefill_ms']):>11}")
    return "\n".join(lines)


def _pct(v):
    return "—" if v is None else f"{100 * v:.1f}%"


def _num(v):
    return "—" if v is None else f"{v:.1f}"
