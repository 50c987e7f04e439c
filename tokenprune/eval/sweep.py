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
      pooling: {}                                                  # no budget keys: runs once
      pooling_3x3: {preset: pooling, set: {stages.0.operators.0.size: 3}}   # a preset under another name

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
from omegaconf import DictConfig, OmegaConf

from tokenprune.core.config import parse_override
from tokenprune.core.errors import ConfigError
from tokenprune.core.paths import writable_folder
from tokenprune.core.values import ListOf, MappingOf, OneOf, Str, check_schema
from tokenprune.core.yaml_files import read_yaml, refuse_interpolation
from tokenprune.eval.models import check_pipeline_for_model, model_changed, model_path, read_model_config
from tokenprune.eval.run import run
from tokenprune.eval.run_config import (
    DEFAULTS,
    load_run_config,
    resolve_pipeline,
    resolved_config_yaml,
)
from tokenprune.measure.flops import LLMShape, pipeline_flops

SWEEP_SCHEMA = {"name": Str(), "base": OneOf(Str(), MappingOf()), "set": ListOf(Str()), "budget": MappingOf(),
                "grid": MappingOf(), "swap": MappingOf(), "variants": MappingOf(), "methods": MappingOf(),
                "output_dir": Str()}
RESULT_COLUMNS = ["variant", "pipeline", "accuracy", "relative_score", "fidelity", "flops_reduction",
                  "equivalent_visual_tokens", "hard_for", "hard_n", "hard_accuracy", "hard_relative_score",
                  "flops_speedup", "flops_speedup_with_vision", "prefill_ms", "vision_ms",
                  "llm_prefill_ms", "decode_ms_per_token", "kv_cache_bytes", "decode_hit_rate", "error"]


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
        raw = read_yaml(self.path, "sweep file")
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(None, f"{path}: a sweep file is a mapping with keys {', '.join(SWEEP_SCHEMA)}, got "
                                    f"{type(raw).__name__}")
        refuse_interpolation(raw, what="a sweep file")
        raw = check_schema(raw, SWEEP_SCHEMA)
        self.name = str(raw.get("name") or self.path.stem)
        self.base = raw.get("base")
        if self.base is None:
            raise ConfigError("base", f"{path}: a sweep needs a base run config (a path or a mapping)")
        self.set = list(raw.get("set") or [])
        self.set += list(extra_set)
        for item in self.set:
            parse_override(item, "data.limit=100")  # KEY=VALUE, or an error naming the item
        self.budget = raw.get("budget")
        if self.budget is not None and set(self.budget) != {"key", "values"}:
            raise ConfigError("budget", f"must be {{key: KEY, values: [...]}}, got {self.budget!r}")
        if self.budget is not None:
            if not isinstance(self.budget["key"], str) or not self.budget["key"]:
                raise ConfigError("budget.key", f"must be a dotted key, got {self.budget['key']!r}")
            values = self.budget["values"]
            if not isinstance(values, list) or not values:
                raise ConfigError("budget.values", f"must be a non-empty list of numbers, got {values!r}")
            for i, value in enumerate(values):
                if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                    raise ConfigError(f"budget.values.{i}", f"must be a number > 0, got {value!r}")
        self.grid = self._mapping_of_lists(raw, "grid")
        self.swap = self._mapping_of_lists(raw, "swap")
        self.named = raw.get("variants") or {}
        for name, changes in self.named.items():
            if not isinstance(changes, dict) or not changes:
                raise ConfigError(f"variants.{name}", f"must be a mapping of KEY: VALUE, got {changes!r}")
        self.methods = raw.get("methods") or {}
        for name, spec in self.methods.items():
            if not isinstance(spec, dict) or not set(spec) <= {"set", "budget", "preset"}:
                raise ConfigError(f"methods.{name}", f"must be {{preset: NAME, set: {{KEY: VALUE}}, budget: {{KEY: "
                                                     f"FACTOR}}}}, got {spec!r}")
            if spec.get("preset") is not None and not isinstance(spec["preset"], str):
                raise ConfigError(f"methods.{name}.preset", f"a preset name or pipeline YAML path, got "
                                                            f"{spec['preset']!r}")
            if spec.get("set") is not None and not isinstance(spec["set"], dict):
                raise ConfigError(f"methods.{name}.set", f"must be a mapping of KEY: VALUE, got {spec['set']!r}")
            budget = spec.get("budget")
            if budget is not None and not isinstance(budget, dict):
                raise ConfigError(f"methods.{name}.budget", f"must be a mapping of KEY: FACTOR, got {budget!r}")
            for key, factor in (budget or {}).items():
                if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 0:
                    raise ConfigError(f"methods.{name}.budget.{key}", f"a factor of the budget: a number > 0, got "
                                                                      f"{factor!r}")
            if budget and self.budget is None:
                raise ConfigError(f"methods.{name}.budget", "needs a top-level budget: {key, values}")
        self.output_dir = Path(raw.get("output_dir") or f"runs/sweeps/{self.name}")

    @staticmethod
    def _mapping_of_lists(raw: dict, key: str) -> dict[str, list]:
        section = raw.get(key) or {}
        for k, v in section.items():
            if not isinstance(v, list) or not v:
                raise ConfigError(f"{key}.{k}", f"must be a non-empty list of values, got {v!r}")
        return section

    def check(self) -> list[tuple[Variant, DictConfig, Any]]:
        """Every variant with its run config and pipeline, all built before anything runs: a variant's error
        (a typo in ``set``, a bad value on an axis) is a :class:`ConfigError` naming the variant and the key.
        The pipeline keys of ``set`` are checked against the base pipeline even where a method replaces it."""
        out = []
        if self._pipeline_sets():
            try:
                resolve_pipeline(self.base_config(Variant(name="base", pipeline=None, values={})))
            except ConfigError as e:
                raise ConfigError(e.key, f"{e.detail} (variant base)") from None
        for v in self.variants():
            try:
                cfg = self.base_config(v)
                pipe = resolve_pipeline(cfg)
                check_pipeline_for_model(read_model_config(cfg.model), pipe)
            except ConfigError as e:
                raise ConfigError(e.key, f"{e.detail} (variant {v.name})") from None
            out.append((v, cfg, pipe))
        return out

    def _pipeline_sets(self) -> list[str]:
        return [s for s in self.set if s.split("=", 1)[0].split(".")[0] not in DEFAULTS]

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
        pipeline_sets = self._pipeline_sets()
        sets = [s for s in self.set if s not in pipeline_sets]
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
        budget_free: set[str] = set()  # methods without budget keys run once per point of the other axes
        for point in points:
            label = [_short(k, v) for k, v in point.items()]
            out.append(make(None, dict(point), label))
            for key, alternatives in self.swap.items():
                for alt in alternatives:
                    out.append(make(None, {**point, key: alt}, label + [_short(key, alt)]))
            for name, changes in self.named.items():  # each a mapping (checked when the file was read)
                out.append(make(None, {**point, **changes}, label + [str(name)]))
            for method, spec in self.methods.items():
                values = dict(spec.get("set") or {})
                budget = point.get(str(self.budget["key"])) if self.budget is not None else None
                for key, factor in (spec.get("budget") or {}).items():
                    values[key] = round(float(factor) * float(budget), 6)
                # a method shares the grid's run-config axes (data, generation...), not the base pipeline's keys
                grid_rest = {k: v for k, v in point.items() if k.split(".")[0] in run_keys
                             and (self.budget is None or k != self.budget["key"])}
                tag = [_short(str(self.budget["key"]), budget)] if budget is not None and spec.get("budget") else []
                v = make(str(spec.get("preset") or method), {**grid_rest, **values},
                         [str(method)] + tag + [_short(k, val) for k, val in grid_rest.items()])
                if not tag and budget is not None:
                    if v.name in budget_free:
                        continue
                    budget_free.add(v.name)
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
        row: dict[str, Any] = {"variant": v.name, "pipeline": v.pipeline or _base_label(sweep), "flops_reduction": None,
                               "error": ""}
        try:
            cfg = sweep.base_config(v)
            pipe = resolve_pipeline(cfg)
            row["pipeline"] = _label(v, pipe)
            shape = _shape_of(cfg)
            if pipe is not None and shape is not None:
                row["flops_reduction"] = pipeline_flops(pipe, shape, tokens, visual, cfg.flops_convention).reduction
        except ConfigError as e:
            row["error"] = str(e)
        rows.append(row)
    return rows


def _label(variant: Variant, pipeline) -> str:
    """What a variant's row and plot marker are labelled: its method, or the base pipeline's name."""
    if variant.pipeline is not None:
        return variant.pipeline
    return pipeline.name if pipeline is not None else "unpruned"


def _base_label(sweep: Sweep) -> str:
    return Path(sweep.base).stem if isinstance(sweep.base, str) else "base"


def _shape_of(cfg):
    """The LLM shape from the model's config.json (no weights loaded), or None."""
    from transformers import AutoConfig

    try:
        path = model_path(cfg.model)
        config = AutoConfig.from_pretrained(path, local_files_only=Path(path).is_dir())
    except (OSError, ConfigError):  # not trained, not downloaded, offline
        return None
    return LLMShape.from_config(getattr(config, "text_config", config), name=getattr(config, "model_type", "model"))


def _changed_since_run(vdir: Path, cfg) -> str | None:
    """Where the variant's run config (with its resolved pipeline) differs from the one its finished run wrote to
    ``config.yaml`` (``"data.limit: 300 -> 500"``), or None. A sweep file edited after a run — a ``set`` key, a
    budget value, an override — would otherwise be answered with the old run's results; so would a model retrained
    into the same folder (its files changed since the run: ``"model.safetensors of model M written since"``). Code
    changes, such as an operator's defaults, are not seen: the config records what was asked for, not the defaults
    it ran with."""

    stored_file = vdir / "config.yaml"
    if not stored_file.is_file():
        return None
    try:
        pipeline = resolve_pipeline(cfg)
    except ConfigError:
        return None  # the variant cannot run; its earlier result stands until the config is fixed
    current = OmegaConf.to_container(OmegaConf.create(resolved_config_yaml(cfg, pipeline)))
    stored = OmegaConf.to_container(OmegaConf.load(stored_file))
    changed = _first_difference(stored, current)
    if changed is None and (files := model_changed(vdir, cfg.model)):
        return f"{files} of model {cfg.model.path} written since"
    return changed


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

    checked = sweep.check()  # every variant's config and pipeline before anything runs
    writable_folder(sweep.output_dir, "output_dir")
    sweep.output_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    baseline = None
    for v, cfg, pipe in checked:
        vdir = sweep.output_dir / v.name
        done = vdir / "metrics.json"
        row: dict[str, Any] = {"variant": v.name, "pipeline": _label(v, pipe),
                               **{k: _value_text(val) for k, val in v.values.items()}}
        changed = _changed_since_run(vdir, cfg) if done.is_file() else None
        if changed is not None:
            aside = _set_aside(vdir, sweep.output_dir)
            print(f"[{v.name}] its config or model changed since it ran ({changed}): running it again; the earlier run is "
                  f"kept in {aside}", flush=True)
        if done.is_file():
            metrics = json.loads(done.read_text())
            status = "done earlier"
        else:
            try:
                metrics = run(cfg)
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
                                "prefill_ms": metrics.get("baseline_prefill_ms"),
                                "vision_ms": metrics.get("baseline_vision_ms"),
                                "hard_accuracy": metrics.get("hard_baseline_accuracy")}
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
    analytic LLM-prefill FLOPs reduction, the layer-averaged visual tokens, the FLOPs-ideal speed-up of the LLM's
    prefill and of the whole prefill (the vision tower's FLOPs added to both sides), and the median prefill time
    with the part of it spent in the vision tower. With a difficulty filter (``data.filter``) a column after the
    accuracy gives the accuracy on the items its pipeline gets wrong, and how many."""
    hard = next((r["hard_for"] for r in rows if r.get("hard_for")), None)
    hard_head = f" hard for {hard} |" if hard else ""
    lines = [f"| variant | pipeline | accuracy |{hard_head} relative score | fidelity | FLOPs reduction | visual tokens "
             "(layer avg.) | ideal speed-up LLM / with tower | prefill ms | of it vision tower |",
             "| --- | --- | ---: |" + (" ---: |" if hard else "") + " ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    if baseline:
        hard_base = f" {_pct(baseline.get('hard_accuracy'))} |" if hard else ""
        lines.append(f"| unpruned | — | {_pct(baseline.get('accuracy'))} |{hard_base} 100.0 | 100.0% | 0.0% | — | — | "
                     f"{_num(baseline.get('prefill_ms'))} | {_num(baseline.get('vision_ms'))} |")
    order = list(dict.fromkeys(r["pipeline"] for r in rows))
    for r in sorted(rows, key=lambda r: order.index(r["pipeline"])):
        if r.get("error"):
            lines.append(f"| {r['variant']} | {r['pipeline']} | failed: {r['error'][:80]} | | | | | | | |"
                         + (" |" if hard else ""))
            continue
        hard_cell = f" {_pct(r.get('hard_accuracy'))} of {r.get('hard_n')} |" if hard else ""
        lines.append(f"| {r['variant']} | {r['pipeline']} | {_pct(r.get('accuracy'))} |{hard_cell} "
                     f"{_num(r.get('relative_score'))} | {_pct(r.get('fidelity'))} | {_pct(r.get('flops_reduction'))} | "
                     f"{_num(r.get('equivalent_visual_tokens'))} | {_speedups(r)} | {_num(r.get('prefill_ms'))} | "
                     f"{_num(r.get('vision_ms'))} |")
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
    markers = "osD^vP*XhH<>"
    for i, (name, rs) in enumerate(groups.items()):  # the sweep's order: the base pipeline first
        # hollow markers of different shapes, so variants at the same point stay visible
        ax.scatter([100 * r["flops_reduction"] for r in rs], [100 * r["accuracy"] for r in rs], label=name, s=36,
                   marker=markers[i % len(markers)], facecolors="none", edgecolors=f"C{i % 10}", linewidths=1.2)
    at: dict[tuple[float, float], list[str]] = {}  # variants at one point share one label, one name a line
    for r in pts:
        at.setdefault((round(100 * r["flops_reduction"], 1), round(100 * r["accuracy"], 1)), []).append(r["variant"])
    for (x, y), names in at.items():
        # of points close together, the highest is labelled above, the others below, so labels do not overprint
        near = [q for q in at if abs(q[0] - x) < 4 and abs(q[1] - y) < 3]
        above = y >= max(q[1] for q in near)
        ax.annotate("\n".join(names), (x, y), fontsize=6, xytext=(4, 3 if above else -3),
                    textcoords="offset points", va="bottom" if above else "top")
    if baseline and baseline.get("accuracy") is not None:
        ax.scatter([0], [100 * baseline["accuracy"]], marker="*", s=140, color="black", label="unpruned")
    ax.margins(x=0.15, y=0.08)  # room for the labels of the outermost points
    ax.set_xlabel("LLM prefill FLOPs reduction (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def summary(rows: list[dict[str, Any]], baseline: dict[str, Any] | None) -> str:
    lines = [f"{'variant':<44}{'accuracy':>9}{'rel.':>7}{'fidel.':>8}{'FLOPs red.':>11}{'prefill ms':>11}"]
    if baseline:
        lines.append(f"{'unpruned':<44}{_pct(baseline.get('accuracy')):>9}{'100.0':>7}{'':>8}{'0.0%':>11}"
                     f"{_num(baseline.get('prefill_ms')):>11}")
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['variant']:<44}  FAILED: {r['error'][:60]}")
            continue
        lines.append(f"{r['variant']:<44}{_pct(r['accuracy']):>9}{_num(r['relative_score']):>7}"
                     f"{_pct(r['fidelity']):>8}{_pct(r['flops_reduction']):>11}{_num(r['prefill_ms']):>11}")
    return "\n".join(lines)


def _pct(v):
    return "—" if v is None else f"{100 * v:.1f}%"


def _speedups(row: dict[str, Any]) -> str:
    def x(v):
        return "—" if v is None else f"x{v:.2f}"

    return f"{x(row.get('flops_speedup'))} / {x(row.get('flops_speedup_with_vision'))}"


def _num(v):
    return "—" if v is None else f"{v:.1f}"
