"""``tokenprune bench``: the config is checked, a micro benchmark runs end to end, and the targets are read
from results (timings are never asserted: they belong to `make bench`, not to tests)."""

import pytest

from tokenprune.bench import check_targets, load_bench_config, markdown, run_bench
from tokenprune.errors import ConfigError


def test_bad_bench_configs_name_the_key(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text("models: [{name: m, path: reference, synthetic: llava_next}]\nvariants: [{name: u, pipeline: null}]\n")
    with pytest.raises(ConfigError) as e:
        load_bench_config(path)
    assert e.value.key == "models.0" and "exactly one of path, synthetic" in str(e.value)
    path.write_text("models: [{name: m, path: reference}]\nvariants: [{name: f, pipeline: fastv}]\n")
    with pytest.raises(ConfigError) as e:
        load_bench_config(path)
    assert e.value.key == "variants.0"


def test_a_micro_benchmark_runs_and_its_counts_are_the_analytic_ones(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text(
        "models: [{name: next-micro, synthetic: llava_next, text: {hidden: 32, intermediate: 64, layers: 4, heads: 2}}]\n"
        "variants: [{name: unpruned, pipeline: null}, {name: fastv-0.25, pipeline: fastv, "
        "overrides: [stages.0.operators.1.keep=0.25]}]\n"
        "batch_sizes: [2]\nrepeats: 1\nwarmup: 0\nnew_tokens: 2\n")
    results = run_bench(load_bench_config(path), log=lambda *_: None)
    base, fastv = results["rows"]
    assert base["visual_tokens"] == 576 + 48 * 48 + 48  # base tile + 4 anyres tiles (48x48) + a newline per row
    assert fastv["visual_tokens_kept"] == round(0.25 * base["visual_tokens"])
    assert base["flops_reduction"] == 0 and 0 < fastv["flops_reduction"] < 1
    assert fastv["kv_ratio"] < 1.0  # layers 2-3 hold a quarter of the visual tokens
    assert "| next-micro | fastv-0.25 | 2 |" in markdown(results, "tokenprune bench b.yaml", [])


def test_targets_are_read_from_the_results():
    rows = [
        {"model": "big", "variant": "unpruned", "batch": 1, "operator_overhead": 0.0, "prefill_speedup": 1.0,
         "ideal_speedup": 1.0, "speedup_vs_ideal": 1.0},
        {"model": "big", "variant": "fastv-0.25", "batch": 1, "operator_overhead": 0.01, "prefill_speedup": 2.0,
         "ideal_speedup": 2.2, "speedup_vs_ideal": 2.0 / 2.2},
        {"model": "big", "variant": "asap-0.25", "batch": 1, "operator_overhead": 0.05, "prefill_speedup": 1.5,
         "ideal_speedup": 2.4, "speedup_vs_ideal": 1.5 / 2.4},
        {"model": "big", "variant": "unpruned", "batch": 8, "kv_ratio": 1.0, "decode_ms_per_token": 60.0},
        {"model": "big", "variant": "fastv-0.25", "batch": 8, "kv_ratio": 0.5, "decode_ms_per_token": 40.0,
         "visual_tokens": 100, "visual_tokens_kept": 25},
        {"model": "big", "variant": "slow-0.25", "batch": 8, "kv_ratio": 0.5, "decode_ms_per_token": 61.0,
         "visual_tokens": 100, "visual_tokens_kept": 25},
    ]
    got = {t: ok for t, ok, _ in check_targets({"rows": rows}, "big")}
    assert got["operator overhead of fastv-0.25 <= 3% of unpruned prefill"] is True
    assert got["operator overhead of asap-0.25 <= 3% of unpruned prefill"] is False
    assert got["fastv-0.25 prefill speed-up >= 80% of FLOPs-ideal"] is True  # 2.0 / 2.2 = 91%
    assert got["fastv-0.25 KV bytes shrink with the tokens removed; decode tokens/s at batch 8 rises"] is True
    assert got["slow-0.25 KV bytes shrink with the tokens removed; decode tokens/s at batch 8 rises"] is False
