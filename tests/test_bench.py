"""``tokenprune bench``: the config is checked, a micro benchmark runs end to end, and the targets are read
from results (timings are never asserted: they belong to `make bench`, not to tests)."""

import pytest
import torch

import tokenprune.eval.bench as bench
from tokenprune.core.errors import ConfigError
from tokenprune.eval.bench import check_targets, load_bench_config, markdown, run_bench


@pytest.mark.parametrize("models,variants,key,says", [
    ("[{name: m, path: reference, synthetic: llava_next}]", "[{name: u, pipeline: null}]", "models.0",
     "exactly one of path, synthetic"),
    ("[{name: m, path: reference}]", "[{name: f, pipeline: fastv}]", "variants.0", "unpruned"),
    ("[{name: m, path: reference, dtype: fp8}]", "[{name: u, pipeline: null}]", "models.0.dtype", "bfloat16"),
    ("[{name: m, path: reference}]", "[{name: u, pipeline: null, eager: true}]", "variants.0.eager",
     "materialize_attention"),
    ("[{name: m, path: reference}]", "[{name: u, pipeline: null, materialize_attention: 1}]",
     "variants.0.materialize_attention", "a list, each an integer >= 0"),
    ("[{name: m, path: reference, variants: [u, f]}]", "[{name: u, pipeline: null}]", "models.0.variants",
     "unknown variant 'f'; allowed: u"),
    ("[{name: m, path: reference, variants: [f]}]", "[{name: u, pipeline: null}, {name: f, pipeline: fastv}]",
     "models.0.variants", "must include the unpruned variant 'u'"),
    ("[{name: m, path: reference, batch_sizes: [0]}]", "[{name: u, pipeline: null}]", "models.0.batch_sizes.0",
     "a positive integer, got 0"),
    ("[{name: m, path: reference, repeats: two}]", "[{name: u, pipeline: null}]", "models.0.repeats", "a positive integer, got 'two'"),
    ("[{name: m, synthetic: llava_next, text: {hidden: 8, intermediate: 8, layers: 4, heads: 2}, full_layers: 2}]",
     "[{name: u, pipeline: null}]", "models.0.full_layers", "the model's own number of layers (4)"),
    ("[{name: m, synthetic: llava_next, text: {layers: 4}}]", "[{name: u, pipeline: null}]", "models.0.text.hidden",
     "missing"),
    ("[{name: m, synthetic: llava_next, text: {hidden: '8', intermediate: 8, layers: 4, heads: 2}}]",
     "[{name: u, pipeline: null}]", "models.0.text.hidden", "a string; write the number without quotes"),
    ("[{name: m, synthetic: llava_next}]", "[{name: u, pipeline: null}]", "models.0.text", "LLM shape"),
    ("[{path: reference}]", "[{name: u, pipeline: null}]", "models.0.name", "missing"),
    ("[{name: m, path: reference}]", "[{name: u, pipeline: null}, {name: u, pipeline: fastv}]", "variants",
     "must differ"),
    ("[{name: m, path: '${oc.env:HOME}'}]", "[{name: u, pipeline: null}]", "models.0.path", "not allowed"),
])
def test_bad_bench_configs_name_the_key(tmp_path, models, variants, key, says):
    path = tmp_path / "b.yaml"
    path.write_text(f"models: {models}\nvariants: {variants}\n")
    with pytest.raises(ConfigError) as e:
        load_bench_config(path)
    assert e.value.key == key and says in str(e.value)


def test_a_micro_benchmark_runs_and_its_counts_are_the_analytic_ones(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text(
        "models: [{name: next-micro, synthetic: llava_next, text: {hidden: 32, intermediate: 64, layers: 4, heads: 2}}]\n"
        "variants: [{name: unpruned, pipeline: null}, {name: fastv-0.25, pipeline: fastv, "
        "overrides: [stages.0.operators.1.keep=0.25]}, {name: reference-fastv-0.25, pipeline: fastv, "
        "overrides: [stages.0.operators.1.keep=0.25], materialize_attention: [1]}]\n"
        "batch_sizes: [2]\nrepeats: 1\nwarmup: 0\nnew_tokens: 2\n")
    results = run_bench(load_bench_config(path), log=lambda *_: None)
    base, fastv, reference = results["rows"]
    assert list(fastv["operator_ms_by_op"]) == ["0.0:attention", "0.1:topk"]  # stage 0's operators, in order
    assert sum(fastv["operator_ms_by_op"].values()) <= fastv["operator_ms"] + 1e-6 and base["operator_ms_by_op"] == {}
    assert reference["visual_tokens_kept"] == fastv["visual_tokens_kept"]
    assert reference["flops_reduction"] == fastv["flops_reduction"]
    assert base["visual_tokens"] == 576 + 48 * 48 + 48  # base tile + 4 anyres tiles (48x48) + a newline per row
    assert fastv["visual_tokens_kept"] == round(0.25 * base["visual_tokens"])
    assert base["flops_reduction"] == 0 and 0 < fastv["flops_reduction"] < 1
    assert fastv["kv_ratio"] < 1.0  # layers 2-3 hold a quarter of the visual tokens
    table = markdown(results, "tokenprune bench b.yaml", [])
    assert "| next-micro | fastv-0.25 | 2 |" in table and "| next-micro | fastv-0.25 | 2 | 0.0:attention " in table


def test_a_kv_cache_presets_operators_are_timed_one_by_one_over_its_layers(tmp_path):
    """The by-operator split of a kv_cache stage names each operator once (its scorers run in the prefill, its
    selector and merger after it, at each compressed layer: summed over the layers), and the parts lie inside the
    stage's total (each operator's clock runs within the total's)."""
    path = tmp_path / "b.yaml"
    path.write_text(
        "models: [{name: next-micro, synthetic: llava_next, text: {hidden: 32, intermediate: 64, layers: 4, heads: 2}}]\n"
        "variants: [{name: unpruned, pipeline: null}, {name: elastic_cache, pipeline: elastic_cache}]\n"
        "batch_sizes: [1]\nrepeats: 1\nwarmup: 0\nnew_tokens: 2\n")
    _, kv = run_bench(load_bench_config(path), log=lambda *_: None)["rows"]
    assert list(kv["operator_ms_by_op"]) == ["0.0:attention", "0.1:topk", "0.2:nearest_position_merge"]
    assert 0 < sum(kv["operator_ms_by_op"].values()) <= kv["operator_ms"] + 1e-6


def test_targets_are_read_from_the_results():
    rows = [
        {"model": "big", "variant": "unpruned", "batch": 1, "operator_overhead": 0.0, "prefill_speedup": 1.0,
         "ideal_speedup": 1.0, "speedup_vs_ideal": 1.0, "visual_tokens": 2928},
        {"model": "big", "variant": "fastv-0.25", "batch": 1, "operator_overhead": 0.01, "prefill_speedup": 2.0,
         "ideal_speedup": 2.2, "speedup_vs_ideal": 2.0 / 2.2},
        {"model": "big", "variant": "asap-0.25", "batch": 1, "operator_overhead": 0.05, "prefill_speedup": 1.5,
         "ideal_speedup": 2.4, "speedup_vs_ideal": 1.5 / 2.4},
        {"model": "big", "variant": "unpruned", "batch": 8, "kv_ratio": 1.0, "decode_ms_per_token": 60.0},
        {"model": "big", "variant": "fastv-0.25", "batch": 8, "kv_ratio": 0.5, "decode_ms_per_token": 40.0,
         "visual_tokens": 100, "visual_tokens_kept": 25},
        {"model": "big", "variant": "slow-0.25", "batch": 8, "kv_ratio": 0.5, "decode_ms_per_token": 61.0,
         "visual_tokens": 100, "visual_tokens_kept": 25},
        # 576 visual tokens: not a model the targets are read on
        {"model": "small", "variant": "unpruned", "batch": 1, "operator_overhead": 0.0, "visual_tokens": 576},
        {"model": "small", "variant": "asap-0.25", "batch": 1, "operator_overhead": 0.5, "visual_tokens": 576},
        # 2928 visual tokens at batch 1 only: overheads read, no batch-8 decode target
        {"model": "wide", "variant": "unpruned", "batch": 1, "operator_overhead": 0.0, "visual_tokens": 2928,
         "kv_ratio": 1.0, "decode_ms_per_token": 60.0},
        {"model": "wide", "variant": "asap-0.25", "batch": 1, "operator_overhead": 0.02, "visual_tokens": 2928,
         "speedup_vs_ideal": None, "kv_ratio": 0.5, "decode_ms_per_token": 61.0, "visual_tokens_kept": 700},
        # the exact form a preset's cheaper default stands for: measured, not held to the targets
        {"model": "big", "variant": "asap-0.25-exact", "batch": 1, "operator_overhead": 0.5, "prefill_speedup": 0.9,
         "ideal_speedup": 2.4, "speedup_vs_ideal": 0.9 / 2.4},
    ]
    got = {t: ok for t, ok, _ in check_targets({"rows": rows})}
    assert got.pop("big: operator overhead of fastv-0.25 <= 3% of unpruned prefill") is True
    assert got.pop("big: operator overhead of asap-0.25 <= 3% of unpruned prefill") is False
    assert got.pop("big: fastv-0.25 prefill speed-up >= 80% of FLOPs-ideal") is True  # 2.0 / 2.2 = 91%
    assert got.pop("big: fastv-0.25 KV bytes shrink with the tokens removed; decode tokens/s at batch 8 rises") is True
    assert got.pop("big: slow-0.25 KV bytes shrink with the tokens removed; decode tokens/s at batch 8 rises") is False
    assert got.pop("wide: operator overhead of asap-0.25 <= 3% of unpruned prefill") is True
    assert got == {}  # nothing on "small", no GPU aim without a GPU, no decode target at batch 1
    on_gpu = {t: ok for t, ok, _ in check_targets({"rows": rows, "machine": {"gpu": "NVIDIA H200"}}, "big")}
    assert on_gpu["big: asap-0.25 prefill >= 3.5x faster than unpruned (GPU)"] is False  # x1.5
    assert not any("exact" in t for t in on_gpu)
    assert {t.split(":")[0] for t, _, _ in check_targets({"rows": rows[6:8]})} == {"small"}  # no big model: the last one


def test_a_model_runs_its_own_batch_sizes_repeats_and_variants(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "_measure", lambda model, inputs, pipeline, new_tokens, shape, cache=None: calls.append(
        (inputs["input_ids"].shape[0], pipeline is None)) or {"prefill_ms": 1.0, "decode_ms_per_token": 1.0,
                                                             "tokens_per_s": 1.0, "kv_cache_bytes": 1.0,
                                                             "operator_ms": 0.0, "flops_reduction": 0.0})
    path = tmp_path / "b.yaml"
    path.write_text(
        "models: [{name: a, synthetic: llava_next, text: {hidden: 16, intermediate: 32, layers: 3, heads: 2}},\n"
        "         {name: b, synthetic: llava_next, text: {hidden: 16, intermediate: 32, layers: 3, heads: 2},\n"
        "          batch_sizes: [3], repeats: 2, variants: [unpruned]}]\n"
        "variants: [{name: unpruned, pipeline: null}, {name: fastv, pipeline: fastv}]\n"
        "batch_sizes: [1, 2]\nrepeats: 1\nwarmup: 1\n")
    rows = run_bench(load_bench_config(path), log=lambda *_: None)["rows"]
    assert [(r["model"], r["variant"], r["batch"]) for r in rows] == [
        ("a", "unpruned", 1), ("a", "fastv", 1), ("a", "unpruned", 2), ("a", "fastv", 2), ("b", "unpruned", 3)]
    # model a: (warmup 1 + repeats 1) x 2 variants at batch 1, then at batch 2; model b: (1 + 2) x unpruned at batch 3
    assert calls == [(1, True), (1, False)] * 2 + [(2, True), (2, False)] * 2 + [(3, True)] * 3


@pytest.mark.parametrize("prompts", [None, [[5, 6, 7, 8, 9], [5, 6, 7, 8, 9]]])  # left-padded (a mask), none
def test_materialized_attention_layers_compute_what_sdpa_does_with_the_weights_materialised(monkeypatch, prompts):
    """The FastV-style reference's layers: their attention really runs through the explicit softmax(QKᵀ)V (counted,
    the (B, H, N, N) weights seen), the logits at the real tokens and the greedy generation equal the SDPA model's,
    and the model is SDPA again afterwards."""
    from tokenprune.reference.tiny import tiny_llava, tiny_llava_inputs

    model = tiny_llava()
    inputs = tiny_llava_inputs(model, prompts=prompts) if prompts else tiny_llava_inputs(model)
    real = inputs["attention_mask"].bool()
    seen = []

    def counted(module, query, *args, **kwargs):
        out, weights = materialized(module, query, *args, **kwargs)
        seen.append((module.layer_idx, tuple(weights.shape)))
        return out, weights

    materialized = bench.materialized_attention
    monkeypatch.setattr(bench, "materialized_attention", counted)
    with torch.no_grad():
        want = model(**inputs).logits
        want_tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        with bench.materialize_attention(model, [1, 2]):
            got = model(**inputs).logits
            n = inputs["input_ids"].shape[1]
            assert seen == [(1, (2, 4, n, n)), (2, (2, 4, n, n))]
            got_tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        seen.clear()
        model(**inputs)
    assert seen == []  # restored
    assert torch.allclose(got[real], want[real], atol=1e-4)
    assert torch.equal(got_tokens, want_tokens)
    with pytest.raises(ConfigError, match="4 decoder layers"), bench.materialize_attention(model, [4]):
        pass


def test_a_synthetic_model_is_built_in_the_dtype_asked_for():
    model = bench.synthetic_llava_next({"hidden": 32, "intermediate": 64, "layers": 2, "heads": 2},
                                       dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_the_table_shows_the_gpu_peak_memory_and_a_dash_without_one():
    row = {"model": "m", "variant": "unpruned", "batch": 1, "prefill_ms": 10.0, "prefill_speedup": 1.0,
           "ideal_speedup": 1.0, "speedup_vs_ideal": 1.0, "operator_ms": 0.0, "operator_overhead": 0.0,
           "decode_ms_per_token": 2.0, "tokens_per_s": 100.0, "kv_cache_bytes": 2048, "flops_reduction": 0.0}
    machine = {"cpus": 2, "threads": 2, "platform": "p", "python": "3", "torch": "t"}
    on_gpu = markdown({"machine": {**machine, "gpu": "G"}, "rows": [{**row, "peak_memory_bytes": 3 * 2**20}]}, "c", [])
    assert "| 2 | 3.0 | 0.0% |" in on_gpu  # KV KiB, peak MiB, FLOPs reduction
    on_cpu = markdown({"machine": machine, "rows": [{**row, "peak_memory_bytes": None}]}, "c", [])
    assert "| 2 | — | 0.0% |" in on_cpu


def test_a_synthetic_mllama_benchmark_counts_its_image_features_and_leaves_flops_unmodelled(tmp_path):
    """LLaMA-3.2-Vision's image geometry (4 tiles of 560 px, 14-px patches: 4 x (40 x 40 + 1) features) with a micro
    LLM; Trimmed Llama keeps fewer features and a smaller cross-attention cache; FLOPs, which do not model
    cross-attention, are shown as not known rather than as 0."""
    path = tmp_path / "b.yaml"
    path.write_text(
        "models: [{name: mllama-micro, synthetic: mllama, text: {hidden: 64, intermediate: 128, layers: 5, heads: 4, "
        "kv_heads: 2}}]\nvariants: [{name: unpruned, pipeline: null}, {name: trimmed, pipeline: trimmed_llama}]\n"
        "batch_sizes: [1]\nrepeats: 1\nwarmup: 0\nnew_tokens: 2\n")
    results = run_bench(load_bench_config(path), log=lambda *_: None)
    base, trimmed = results["rows"]
    assert base["visual_tokens"] == trimmed["visual_tokens"] == 4 * (40 * 40 + 1)
    assert 0 < trimmed["visual_tokens_kept"] < base["visual_tokens"] and trimmed["kv_ratio"] < 1.0
    assert base["flops_reduction"] is None and trimmed["ideal_speedup"] is None
    assert "| mllama-micro | trimmed | 1 |" in markdown(results, "c", check_targets(results, "mllama-micro"))
    assert "| — | — |" in markdown(results, "c", [])  # FLOPs-ideal and of-ideal not known


def test_a_depth_cut_model_projects_its_prefill_to_the_full_depth(tmp_path, monkeypatch):
    """``full_layers``: the unpruned prefill (median 100 ms) plus the 29 missing layers at the per-layer time
    (20 ms) = 680 ms; fastv's 10.2 ms of operators are 1.5% of it (10.2% of the measured prefill), and the overhead
    target reads the former on that model."""

    samples = iter([100.0, 10.0, 50.0, 90.0, 10.0, 50.0, 110.0, 10.0, 50.0])  # unpruned / fastv / aircache

    def fake_measure(model, inputs, pipeline, new_tokens, shape, cache=None):
        kv = pipeline is not None and pipeline.name == "aircache"
        return {"prefill_ms": next(samples), "decode_ms_per_token": 1.0, "tokens_per_s": 1.0, "kv_cache_bytes": 1.0,
                "operator_ms": 0.0 if pipeline is None else (8.0 if kv else 10.2), "kv_operator_ms": 6.0 if kv else 0.0,
                "flops_reduction": 0.0, "visual_tokens": 2928}

    monkeypatch.setattr(bench, "_measure", fake_measure)
    monkeypatch.setattr(bench, "_decoder_layer_times", lambda model, inputs, runs: (20.0, 0.9))
    path = tmp_path / "b.yaml"
    path.write_text(
        "models: [{name: cut, synthetic: llava_next, text: {hidden: 16, intermediate: 32, layers: 3, heads: 2},\n"
        "          full_layers: 32}]\n"
        "variants: [{name: unpruned, pipeline: null}, {name: fastv-0.25, pipeline: fastv}, "
        "{name: aircache, pipeline: aircache}]\n"
        "batch_sizes: [1]\nrepeats: 3\nwarmup: 0\n")
    results = run_bench(load_bench_config(path), log=lambda *_: None)
    base, fastv, air = results["rows"]
    # aircache's 6 ms of kv_cache scoring over 3 layers stands for 64 ms over 32; its other 2 ms stay
    assert air["operator_overhead_full_depth"] == pytest.approx((2.0 + 6.0 * 32 / 3) / 680.0)
    assert base["full_depth_prefill_ms"] == fastv["full_depth_prefill_ms"] == 100.0 + 29 * 20.0
    assert fastv["operator_overhead_full_depth"] == pytest.approx(10.2 / 680.0)
    assert fastv["operator_overhead"] == pytest.approx(0.102)
    (target, met, measured), = [t for t in check_targets(results) if "overhead" in t[0] and "fastv" in t[0]]
    assert met and target.startswith("cut: operator overhead of fastv-0.25 <= 3% of unpruned prefill (at 32 layers")
    assert measured == "1.50% (10.20% of the measured prefill)"
    assert "| cut | fastv-0.25 | 1 | 20.0 | 32 | 680 | 10.2 | 1.50% |" in markdown(results, "b", [])


class OneSecondClock:
    """A stand-in for the ``time`` module whose clock advances 1 s at every reading."""

    t = 0.0

    def perf_counter(self):
        self.t += 1.0
        return self.t


def test_the_decoder_layer_clock_is_the_mean_time_of_one_layer_per_forward(monkeypatch):
    """A fake clock that advances 1 s at every reading: each layer reads it at its start and end, so each layer
    takes exactly 1 s whatever the model computes, and the mean per layer is 1000 ms (not the 4 layers' sum)."""
    from tokenprune.reference.tiny import tiny_llava, tiny_llava_inputs

    model = tiny_llava("sdpa", layers=4)
    monkeypatch.setattr(bench, "time", OneSecondClock())
    layer_ms, share = bench._decoder_layer_times(model, tiny_llava_inputs(model), runs=2)
    assert layer_ms == 1000.0
    assert share == pytest.approx(4 / 9)  # the forward's clock advances 9 s: its own 2 readings and 4 layers x 2


def test_a_failing_variant_is_recorded_and_the_benchmark_goes_on(tmp_path):
    """trimmed_llama cannot attach to a LLaVA-NeXT: its row says why, the variant after it is still measured,
    and the targets skip it."""
    path = tmp_path / "b.yaml"
    path.write_text(
        "models: [{name: next-micro, synthetic: llava_next, text: {hidden: 32, intermediate: 64, layers: 4, heads: 2}}]\n"
        "variants: [{name: unpruned, pipeline: null}, {name: trimmed, pipeline: trimmed_llama}, "
        "{name: fastv-0.25, pipeline: fastv, overrides: [stages.0.operators.1.keep=0.25]}]\n"
        "batch_sizes: [1]\nrepeats: 1\nwarmup: 1\nnew_tokens: 2\n")
    said = []
    results = run_bench(load_bench_config(path), log=said.append)
    base, trimmed, fastv = results["rows"]
    assert trimmed["error"].startswith("ConfigError: stages.0.layer: 'cross_attention' is not a site of LLaVA-NeXT")
    assert fastv["visual_tokens_kept"] == round(0.25 * base["visual_tokens"])
    assert sum("trimmed" in line and "failed" in line for line in said) == 1  # once, not once per repeat
    table = markdown(results, "tokenprune bench b.yaml", check_targets(results, "next-micro"))
    row = next(line for line in table.splitlines() if line.startswith("| next-micro | trimmed | 1 |"))
    header = next(line for line in table.splitlines() if line.startswith("| model | variant | batch | prefill"))
    assert "failed: ConfigError: stages.0.layer:" in row and row.count("|") == header.count("|")
    assert not any("trimmed" in t for t, _, _ in check_targets(results, "next-micro"))


def test_the_flops_ideal_keeps_the_vision_towers_time(tmp_path, monkeypatch):
    """Unpruned prefill 100 ms of which the tower takes 40: a pipeline that cuts half the LLM's FLOPs can at best
    reach 40 + 60 / 2 = 70 ms, so its ideal is x1.43 (not x2), and 80 ms is 88% of it."""
    samples = iter([100.0, 80.0])

    def fake_measure(model, inputs, pipeline, new_tokens, shape, cache=None):
        return {"prefill_ms": next(samples), "vision_ms": 40.0, "decode_ms_per_token": 1.0, "tokens_per_s": 1.0,
                "kv_cache_bytes": 1.0, "operator_ms": 0.0, "kv_operator_ms": 0.0,
                "flops_reduction": 0.0 if pipeline is None else 0.5, "visual_tokens": 2928,
                "flops": 100.0 if pipeline is None else 50.0, "baseline_flops": 100.0, "vision_flops": 25.0}

    monkeypatch.setattr(bench, "_measure", fake_measure)
    path = tmp_path / "b.yaml"
    path.write_text(
        "models: [{name: m, synthetic: llava_next, text: {hidden: 16, intermediate: 32, layers: 3, heads: 2}}]\n"
        "variants: [{name: unpruned, pipeline: null}, {name: fastv-0.25, pipeline: fastv}]\n"
        "batch_sizes: [1]\nrepeats: 1\nwarmup: 0\n")
    base, fastv = run_bench(load_bench_config(path), log=lambda *_: None)["rows"]
    assert base["ideal_speedup"] == pytest.approx(1.0)
    assert fastv["ideal_speedup"] == pytest.approx(100.0 / 70.0)
    assert fastv["speedup_vs_ideal"] == pytest.approx((100.0 / 80.0) / (100.0 / 70.0))
    # FLOPs: the LLM's prefill halves (x2); with the tower's 25 on both sides, 125 / 75
    assert fastv["flops_speedup"] == pytest.approx(2.0) and fastv["flops_speedup_with_vision"] == pytest.approx(5 / 3)
    assert base["flops_speedup"] == pytest.approx(1.0)


def test_a_model_with_an_overhead_target_checks_every_variant():
    rows = [{"model": "m", "variant": "unpruned", "batch": 1, "operator_overhead": 0.0, "speedup_vs_ideal": 1.0,
             "flops_reduction": 0.0, "overhead_target": 0.1},
            {"model": "m", "variant": "csp", "batch": 1, "operator_overhead": 3.04, "speedup_vs_ideal": 0.25,
             "prefill_speedup": 0.25, "ideal_speedup": 1.0, "flops_reduction": 0.0, "overhead_target": 0.1},
            {"model": "m", "variant": "tome", "batch": 1, "operator_overhead": 0.007, "speedup_vs_ideal": 0.59,
             "prefill_speedup": 8.9, "ideal_speedup": 15.0, "flops_reduction": 0.93, "overhead_target": 0.1},
            {"model": "m", "variant": "tome", "batch": 8, "operator_overhead": 0.5, "speedup_vs_ideal": 0.1,
             "prefill_speedup": 1.0, "ideal_speedup": 10.0, "flops_reduction": 0.9, "overhead_target": 0.1},
            {"model": "m", "variant": "asap-exact", "batch": 1, "operator_overhead": 0.11, "speedup_vs_ideal": 0.4,
             "prefill_speedup": 2.8, "ideal_speedup": 7.0, "flops_reduction": 0.87, "overhead_target": 0.1}]
    got = check_targets({"machine": {}, "rows": rows}, "m")
    assert [(t, ok) for t, ok, _ in got] == [
        ("m: operator overhead of csp <= 10% of unpruned prefill", False),  # no FLOPs cut: no speed-up target
        ("m: operator overhead of tome <= 10% of unpruned prefill", True),
        ("m: tome prefill speed-up >= 80% of FLOPs-ideal", False)]  # batch 8 and the -exact ablation are not checked


def test_the_table_says_when_and_at_which_commit_it_was_measured():
    results = {"machine": {"cpus": 2, "threads": 2, "platform": "p", "python": "3", "torch": "t", "date": "2026-12-04",
                           "commit": "abc1234"}, "rows": []}
    assert "Produced on 2026-12-04 at commit abc1234 by `tokenprune bench b.yaml`" in markdown(results, "tokenprune bench b.yaml", [])
    assert bench.machine()["commit"] is None or len(bench.machine()["commit"].split("+")[0]) == 7


def test_the_count_ideal_scales_the_layers_share_by_the_stock_layers_ratio():
    """Hand-computed: a 100 ms prefill at 10 tokens spending 80% of a forward in its 4 decoder layers (20 ms outside
    them stay), a stock layer taking n ms at n tokens; each layer's count given (as measured_flops lays the trace's
    cuts out). One cut at layer 2 to 4 tokens: the layers run at
    (1 + 1 + 0.4 + 0.4) / 4 = 70% of their time, 100 x (1 - 0.8 x 0.3) = 76 ms. Two cuts (layer 1 to 6 tokens,
    layer 3 to 2): 60%, 68 ms. A stage at layer 0 to 5 tokens: 60 ms."""
    ms = lambda n: float(n)  # noqa: E731
    assert bench.count_ideal_prefill_ms(100.0, 0.8, 10, dict(enumerate([10, 10, 4, 4])), ms) == pytest.approx(76.0)
    assert bench.count_ideal_prefill_ms(100.0, 0.8, 10, dict(enumerate([10, 6, 6, 2])), ms) == pytest.approx(68.0)
    json_keys = {"0": 5, "1": 5, "2": 5, "3": 5}  # layer keys as JSON has them
    assert bench.count_ideal_prefill_ms(100.0, 0.8, 10, json_keys, ms) == pytest.approx(60.0)
    assert bench.count_ideal_prefill_ms(100.0, 0.8, 10, dict(enumerate([10] * 4)), ms) == pytest.approx(100.0)


def test_stock_layer_times_run_the_bare_llm_on_the_asked_count_once_per_count(monkeypatch):
    """The stock LLM's layers see (batch, n, hidden) and nothing of a pipeline; each count is measured once (after a
    warm-up call); with a clock advancing 1 s a reading, each layer takes 1000 ms."""
    from tokenprune.reference.tiny import tiny_llava

    model = tiny_llava("sdpa", layers=3)
    seen = []
    first = bench.get_adapter(model).layers[0]
    first.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(tuple(
        (args[0] if args else kwargs["hidden_states"]).shape)), with_kwargs=True)
    monkeypatch.setattr(bench, "time", OneSecondClock())
    times = bench.StockLayerTimes(model, batch=2, runs=2)
    assert times(7) == 1000.0 and times(7) == 1000.0 and times(5) == 1000.0
    hidden = model.config.text_config.hidden_size
    assert seen == [(2, 7, hidden)] * 3 + [(2, 5, hidden)] * 3  # a warm-up call, then the timed ones


def test_count_ideal_rows_targets_and_table(tmp_path, monkeypatch):
    """``count_ideal: true``: the unpruned prefill takes 500 ms at 1000 tokens, 80% of a forward in its 4 decoder
    layers; a stock layer takes n/10 ms at n tokens. A variant cutting layers 1..3 to 100 tokens runs its layers at
    (1 + 3 x 0.1) / 4 = 32.5% of their time, 500 x (1 - 0.8 x 0.675) = 230 ms:
    count-ideal 230 ms (x2.17), and its measured 250 ms is 92% of it, 60% of the FLOPs-ideal (x3.33). The target
    line gives both ideals; the table has a row of its own."""
    samples = iter([500.0, 250.0])

    def fake_measure(model, inputs, pipeline, new_tokens, shape, cache=None):
        pruned = pipeline is not None
        return {"prefill_ms": next(samples), "decode_ms_per_token": 1.0, "tokens_per_s": 1.0, "kv_cache_bytes": 1.0,
                "operator_ms": 1.0 if pruned else 0.0, "kv_operator_ms": 0.0, "flops_reduction": 0.7 if pruned else 0.0,
                "layer_tokens": dict(enumerate([1000, 100, 100, 100] if pruned else [1000] * 4)), "visual_tokens": 2928}

    class FakeStock:
        def __init__(self, model, batch, runs):
            pass

        def __call__(self, n):
            return n / 10.0

    monkeypatch.setattr(bench, "_measure", fake_measure)
    monkeypatch.setattr(bench, "StockLayerTimes", FakeStock)
    monkeypatch.setattr(bench, "_decoder_layer_times", lambda model, inputs, runs: (100.0, 0.8))
    monkeypatch.setattr(bench, "_synthetic_inputs", lambda model, kind, batch, words: {
        "input_ids": torch.ones(1, 1000, dtype=torch.long), "attention_mask": torch.ones(1, 1000, dtype=torch.long)})
    path = tmp_path / "b.yaml"
    path.write_text(
        "models: [{name: m, synthetic: llava_next, text: {hidden: 16, intermediate: 32, layers: 4, heads: 2},\n"
        "          count_ideal: true, overhead_target: 0.1}]\n"
        "variants: [{name: unpruned, pipeline: null}, {name: fastv, pipeline: fastv}]\n"
        "batch_sizes: [1]\nrepeats: 1\nwarmup: 0\n")
    results = run_bench(load_bench_config(path), log=lambda *_: None)
    base, fastv = results["rows"]
    assert base["count_ideal_prefill_ms"] == 500.0
    assert fastv["count_ideal_prefill_ms"] == pytest.approx(230.0)
    assert fastv["speedup_vs_count_ideal"] == pytest.approx(230.0 / 250.0)
    (target, met, measured), = [t for t in check_targets(results) if "FLOPs-ideal" in t[0]]
    assert not met and measured == "x2.00 of ideal x3.33 = 60% (count-ideal x2.17: 92% of it)"
    assert "| m | fastv | 1 | 250.0 | 230.0 | x2.00 | x2.17 | x3.33 | 92% | 60% |" in markdown(results, "b", [])
