"""A corpus of malformed inputs through the command line (``tokenprune.cli.main``, in process) and the lmms-eval
model's ``model_args``: each is exit code 2 with one line on stderr naming the key (or argument), no traceback,
no model loaded, no user code run, and no file that was already there changed."""

import json
from pathlib import Path

import pytest

from tokenprune.cli import main
from tokenprune.core.errors import ConfigError
from tokenprune.eval import bench as bench_module
from tokenprune.eval import models
from tokenprune.eval import run as run_module
from tokenprune.reference import train as train_module

QUIET = ["logging.wandb.mode=disabled", "logging.progress_bar=false"]
CANARY = "CANARY_WAS_RUN"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def d(tmp_path_factory, tiny_folder):
    """The malformed files of the corpus (and some good ones to point at)."""
    from PIL import Image

    d = tmp_path_factory.mktemp("bad")
    canary = d / CANARY

    def write(name, text, mode="w"):
        p = d / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if mode == "wb":
            p.write_bytes(text)
        else:
            p.write_text(text)
        return p

    good_stage = "stages:\n  - layer: 2\n    operators:\n      - {op: attention}\n      - {op: topk, keep: 0.5}\n"
    write("p_dup.yaml", "name: a\nname: b\n" + good_stage)
    write("p_tag.yaml", f"name: !!python/object/apply:os.system ['touch {canary}']\n" + good_stage)
    write("p_utf.yaml", b"name: \xff\xfe\n", "wb")
    write("p_syntax.yaml", "name: [unclosed\n" + good_stage)
    write("p_env.yaml", "name: ${oc.env:HOME}\n" + good_stage)
    write("p_ref.yaml", "name: ${stages}\n" + good_stage)
    write("p_empty.yaml", "")
    write("p_list.yaml", "- layer: 2\n")
    write("p_unknown.yaml", "nme: x\n" + good_stage)
    write("p_stages.yaml", "stages: {layer: 2}\n")
    (d / "p_dir.yaml").mkdir()
    # plugins: none of these may run (the canary), or each fails in one line
    write("quiet_side_effect.py", f"open({str(canary)!r}, 'w').write('x')\n")
    write("plug_syntax.py", "from tokenprune.core.registry import register_operator\nx = (\n")
    write("plug_taken.py", "from tokenprune.core.registry import register_operator\nfrom tokenprune.core.operator "
                           "import Scorer\n@register_operator('topk')\nclass T(Scorer):\n    pass\n")
    write("plug_nothing.py", "# mentions register_operator but registers nothing\n")
    write("plug_raises.py", "from tokenprune.core.registry import register_operator\nraise RuntimeError('boom')\n")
    for name, plugin in [("p_plug_side.yaml", "quiet_side_effect"), ("p_plug_syntax.yaml", "plug_syntax"),
                         ("p_plug_taken.yaml", "plug_taken"), ("p_plug_nothing.yaml", "plug_nothing"),
                         ("p_plug_raises.yaml", "plug_raises"), ("p_plug_missing.yaml", "no_such_plugin_module"),
                         ("p_plug_os.yaml", "os"), ("p_plug_dash.yaml", "my-ops")]:
        write(name, f"plugins: [{plugin}]\n" + good_stage)
    write("p_plug_str.yaml", "plugins: quiet_side_effect\n" + good_stage)
    # run configs
    write("r_dup.yaml", "seed: 1\nseed: 2\n")
    write("r_tag.yaml", f"seed: !!python/object/apply:os.system ['touch {canary}']\n")
    write("r_utf.yaml", b"seed: \xc3\x28\n", "wb")
    write("r_syntax.yaml", "model: {path: x\n")
    write("r_list.yaml", "- seed\n")
    write("r_unknown.yaml", "modle: {path: reference}\n")
    write("r_env.yaml", "output_dir: ${oc.env:HOME}\n")
    (d / "r_dir.yaml").mkdir()
    # data
    Image.new("RGB", (32, 32)).save(d / "ok.png")
    write("broken.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "wb")
    png = (d / "ok.png").read_bytes()
    write("truncated.png", png[: len(png) // 2], "wb")
    row = {"image": "ok.png", "question": "What?", "answer": "red"}

    def jsonl(name, *rows):
        return write(name, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))

    jsonl("j_broken_image.jsonl", row, {**row, "image": "broken.png"})
    jsonl("j_truncated_image.jsonl", row, {**row, "image": "truncated.png"})
    jsonl("j_missing_image.jsonl", {**row, "image": "nope.png"})
    jsonl("j_bad_json.jsonl", row, '{"image": ')
    jsonl("j_not_object.jsonl", "[1, 2]")
    jsonl("j_no_answer.jsonl", {k: v for k, v in row.items() if k != "answer"})
    jsonl("j_answer_int.jsonl", {**row, "answer": 3})
    jsonl("j_image_int.jsonl", {**row, "image": 3})
    jsonl("j_metric.jsonl", {**row, "metric": "bleu"})
    jsonl("j_dup_id.jsonl", {**row, "id": "a"}, {**row, "id": "a"})
    write("j_empty.jsonl", "\n\n")
    write("j_utf.jsonl", json.dumps(row).encode() + b"\n\xff\xfe\n", "wb")
    # model folders
    (d / "m_empty").mkdir()
    write("m_text/config.json", json.dumps({"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 2,
                                            "num_attention_heads": 2, "intermediate_size": 16}))
    write("m_remote/config.json", json.dumps({"model_type": "my_vlm", "auto_map": {
        "AutoModelForImageTextToText": "modeling_my.MyModel"}}))
    write("m_remote/modeling_my.py", f"open({str(canary)!r}, 'w').write('x')\n")
    write("m_badjson/config.json", "{not json")
    # outputs
    write("a_file", "keep me\n")
    finished = d / "finished"
    finished.mkdir()
    write("finished/metrics.json", '{"accuracy": 0.5}\n')
    write("finished/config.yaml", "another: run\n")
    # sweeps
    sweep_ok = f"name: s\nbase: {{model: {{path: {tiny_folder}}}}}\noutput_dir: {d / 'sweep_out'}\n"
    write("s_ok.yaml", sweep_ok)
    write("s_out_file.yaml", f"name: s\nbase: {{model: {{path: {tiny_folder}}}}}\noutput_dir: {d / 'a_file'}\n")
    write("s_syntax.yaml", "name: [x\n")
    write("s_tag.yaml", f"name: !!python/object/apply:os.system ['touch {canary}']\n")
    write("s_utf.yaml", b"name: \xff\n", "wb")
    write("s_methods_list.yaml", sweep_ok + "methods: [fastv, random]\n")
    write("s_variants_list.yaml", sweep_ok + "variants: [a, b]\n")
    write("s_budget_scalar.yaml", sweep_ok + "budget: 0.5\n")
    write("s_budget_values.yaml", sweep_ok + "budget: {key: stages.0.operators.3.keep, values: 0.5}\n")
    write("s_budget_str.yaml", sweep_ok + "budget: {key: stages.0.operators.3.keep, values: [0.5, half]}\n")
    write("s_grid_scalar.yaml", sweep_ok + "grid: {stages.0.operators.3.keep: 0.5}\n")
    write("s_set_typo.yaml", sweep_ok + "set: [data.limt=5]\nmethods: {fastv: {}}\n")
    write("s_set_pipeline_typo.yaml", sweep_ok + "set: [stages.0.operators.9.keep=0.3]\nmethods: {fastv: {}}\n")
    write("s_set_noeq.yaml", sweep_ok + "set: [data.limit]\n")
    write("s_set_str.yaml", sweep_ok + "set: data.limit=5\n")
    write("s_unknown.yaml", sweep_ok + "swop: {}\n")
    write("s_variant_op.yaml", sweep_ok + "variants: {bad: {stages.0.operators.1: {op: atention}}}\n")
    write("s_method_unknown.yaml", sweep_ok + "methods: {fastvv: {}}\n")
    write("s_method_factor.yaml", sweep_ok + "budget: {key: stages.0.operators.3.keep, values: [0.5]}\n"
                                             "methods: {fastv: {budget: {stages.0.operators.1.keep: lots}}}\n")
    write("s_method_set_list.yaml", sweep_ok + "methods: {fastv: {set: [a]}}\n")
    write("s_env.yaml", sweep_ok + "variants: {v: {stages.0.operators.3.keep: '${oc.env:HOME}'}}\n")
    # bench configs
    bench_ok = "models: [{name: r, path: reference}]\nvariants: [{name: u, pipeline: null}, {name: f, pipeline: fastv}]\n"
    write("b_ok.yaml", bench_ok)
    write("b_tag.yaml", f"repeats: !!python/object/apply:os.system ['touch {canary}']\n" + bench_ok)
    write("b_syntax.yaml", "models: [{name: r\n")
    write("b_list.yaml", "- models\n")
    write("b_unknown.yaml", bench_ok + "repeat: 3\n")
    write("b_repeats_str.yaml", bench_ok + "repeats: '3'\n")
    write("b_threads_bool.yaml", bench_ok + "threads: true\n")
    write("b_env.yaml", "models: [{name: r, path: '${oc.env:HOME}'}]\nvariants: [{name: u, pipeline: null}]\n")
    write("b_variant_key.yaml", "models: [{name: r, path: reference}]\nvariants: [{name: u, pipeline: null, "
                                "overide: [x]}]\n")
    write("b_pipeline_typo.yaml", "models: [{name: r, path: reference}]\nvariants: [{name: u, pipeline: null}, "
                                  "{name: f, pipeline: fastvv}]\n")
    # training configs
    write("t_tag.yaml", f"seed: !!python/object/apply:os.system ['touch {canary}']\n")
    write("t_unknown.yaml", "optim: {learning_rate: 1}\n")
    write("t_wandb_str.yaml", "logging: {wandb: 'false'}\n")
    write("t_env.yaml", "output_dir: ${oc.env:HOME}\n")
    write("s_dup.yaml", sweep_ok + "name: again\n")
    write("s_list.yaml", "- a\n")
    write("s_no_base.yaml", "name: s\n")
    write("s_base_int.yaml", "name: s\nbase: 5\n")
    write("s_layer_deep.yaml", sweep_ok + "variants: {deep: {stages.0.layer: 40}}\n")
    return d


def _run(d, *extra):
    return ["run", str(REPO / "experiments" / "asap_shapes.yaml"), f"output_dir={d / 'out_run'}", f"baseline_cache={d / 'cache'}",
            "data.limit=2", *QUIET, *extra]


def _jsonl(d, name):
    return _run(d, "data.source=jsonl", f"data.path={d / name}")


SHOW = [
    ("show-unknown-preset", lambda d: ["show", "fastvv"], "fastvv"),
    ("show-op-typo", lambda d: ["show", "fastv", "stages.0.operators.0.op=atention"], "stages.0.operators.0.op"),
    ("show-keep-range", lambda d: ["show", "fastv", "stages.0.operators.1.keep=1.5"], "stages.0.operators.1.keep"),
    ("show-keep-string", lambda d: ["show", "fastv", "stages.0.operators.1.keep=half"], "stages.0.operators.1.keep"),
    ("show-keep-quoted-number", lambda d: ["show", "fastv", "stages.0.operators.1.keep='0.5'"],
     "stages.0.operators.1.keep"),
    ("show-unknown-param", lambda d: ["show", "fastv", "stages.0.operators.1.kep=0.5"], "stages.0.operators.1.kep"),
    ("show-layer-negative", lambda d: ["show", "fastv", "stages.0.layer=-1"], "stages.0.layer"),
    ("show-layer-string", lambda d: ["show", "fastv", "stages.0.layer=two"], "stages.0.layer"),
    ("show-positions", lambda d: ["show", "fastv", "stages.0.positions=shuffle"], "stages.0.positions"),
    ("show-index-range", lambda d: ["show", "fastv", "stages.9.layer=2"], "stages.9"),
    ("show-override-noeq", lambda d: ["show", "fastv", "stages.0.layer"], "stages.0.layer"),
    ("show-override-nokey", lambda d: ["show", "fastv", "=1"], "'=1'"),
    ("show-override-env", lambda d: ["show", "fastv", "name=${oc.env:HOME}"], "name"),
    ("show-override-dupkey", lambda d: ["show", "fastv", "stages.0.operators.1={op: topk, op: random}"],
     "stages.0.operators.1"),
    ("show-dup-key", lambda d: ["show", str(d / "p_dup.yaml")], "p_dup.yaml"),
    ("show-python-tag", lambda d: ["show", str(d / "p_tag.yaml")], "p_tag.yaml"),
    ("show-not-utf8", lambda d: ["show", str(d / "p_utf.yaml")], "p_utf.yaml"),
    ("show-syntax", lambda d: ["show", str(d / "p_syntax.yaml")], "p_syntax.yaml"),
    ("show-env-interpolation", lambda d: ["show", str(d / "p_env.yaml")], "name"),
    ("show-interpolation", lambda d: ["show", str(d / "p_ref.yaml")], "name"),
    ("show-empty", lambda d: ["show", str(d / "p_empty.yaml")], "p_empty.yaml"),
    ("show-list", lambda d: ["show", str(d / "p_list.yaml")], "p_list.yaml"),
    ("show-unknown-key", lambda d: ["show", str(d / "p_unknown.yaml")], "nme"),
    ("show-stages-mapping", lambda d: ["show", str(d / "p_stages.yaml")], "stages"),
    ("show-directory", lambda d: ["show", str(d / "p_dir.yaml")], "p_dir.yaml"),
    ("show-plugin-side-effect", lambda d: ["show", str(d / "p_plug_side.yaml")], "plugins.0"),
    ("show-plugin-syntax", lambda d: ["show", str(d / "p_plug_syntax.yaml")], "plugins.0"),
    ("show-plugin-taken", lambda d: ["show", str(d / "p_plug_taken.yaml")], "plugins.0"),
    ("show-plugin-nothing", lambda d: ["show", str(d / "p_plug_nothing.yaml")], "plugins.0"),
    ("show-plugin-raises", lambda d: ["show", str(d / "p_plug_raises.yaml")], "plugins.0"),
    ("show-plugin-missing", lambda d: ["show", str(d / "p_plug_missing.yaml")], "plugins.0"),
    ("show-plugin-stdlib", lambda d: ["show", str(d / "p_plug_os.yaml")], "plugins.0"),
    ("show-plugin-dash", lambda d: ["show", str(d / "p_plug_dash.yaml")], "plugins.0"),
    ("show-plugins-string", lambda d: ["show", str(d / "p_plug_str.yaml")], "plugins"),
    ("show-run-dir-without-config", lambda d: ["show", str(d / "m_empty")], "m_empty"),
    ("ops-plugin-side-effect", lambda d: ["ops", "--plugins", "quiet_side_effect"], "--plugins"),
    ("ops-plugin-missing", lambda d: ["ops", "--plugins", "no_such_plugin_module"], "--plugins"),
    ("unknown-command", lambda d: ["shwo", "fastv"], "shwo"),
]

FLOPS = [
    ("flops-tokens-zero", lambda d: ["flops", "fastv", "--tokens", "0", "--visual", "0"], "--tokens"),
    ("flops-visual-above", lambda d: ["flops", "fastv", "--tokens", "10", "--visual", "576"], "--visual"),
    ("flops-visual-negative", lambda d: ["flops", "fastv", "--tokens", "10", "--visual", "-1"], "--visual"),
    ("flops-tokens-text", lambda d: ["flops", "fastv", "--tokens", "many", "--visual", "5"], "--tokens"),
    ("flops-no-tokens", lambda d: ["flops", "fastv", "--visual", "5"], "--tokens"),
    ("flops-shape-unknown", lambda d: ["flops", "fastv", "--shape", "gpt-5", "--tokens", "9", "--visual", "5"],
     "--shape"),
    ("flops-shape-field", lambda d: ["flops", "fastv", "--shape", "d=64,m=x,layers=2", "--tokens", "9", "--visual",
                                     "5"], "--shape"),
    ("flops-shape-missing", lambda d: ["flops", "fastv", "--shape", "d=64,layers=2", "--tokens", "9", "--visual",
                                       "5"], "--shape"),
    ("flops-shape-folder", lambda d: ["flops", "fastv", "--shape", str(d / "m_empty"), "--tokens", "9", "--visual",
                                      "5"], "--shape"),
    ("flops-convention", lambda d: ["flops", "fastv", "--convention", "paper", "--tokens", "9", "--visual", "5"],
     "--convention"),
    ("flops-pipeline-typo", lambda d: ["flops", "fastv", "stages.0.operators.1.keep=-1", "--tokens", "9",
                                       "--visual", "5"], "stages.0.operators.1.keep"),
]

RUN = [
    ("run-trust-string", lambda d: _run(d, "model.trust_remote_code='false'"), "model.trust_remote_code"),
    ("run-trust-yes-string", lambda d: _run(d, "model.trust_remote_code='yes'"), "model.trust_remote_code"),
    ("run-trust-int", lambda d: _run(d, "model.trust_remote_code=1"), "model.trust_remote_code"),
    ("run-max-new-zero", lambda d: _run(d, "generation.max_new_tokens=0"), "generation.max_new_tokens"),
    ("run-max-new-negative", lambda d: _run(d, "generation.max_new_tokens=-3"), "generation.max_new_tokens"),
    ("run-max-new-string", lambda d: _run(d, "generation.max_new_tokens='8'"), "generation.max_new_tokens"),
    ("run-min-above-max", lambda d: _run(d, "generation.min_new_tokens=9"), "generation.min_new_tokens"),
    ("run-temperature", lambda d: _run(d, "generation.temperature=0"), "generation.temperature"),
    ("run-top-p", lambda d: _run(d, "generation.top_p=1.5"), "generation.top_p"),
    ("run-do-sample-string", lambda d: _run(d, "generation.do_sample=maybe"), "generation.do_sample"),
    ("run-num-beams", lambda d: _run(d, "generation.num_beams=4"), "generation.num_beams"),
    ("run-generation-unknown", lambda d: _run(d, "generation.max_length=9"), "generation.max_length"),
    ("run-seed-text", lambda d: _run(d, "seed=abc"), "seed"),
    ("run-seed-negative", lambda d: _run(d, "seed=-1"), "seed"),
    ("run-seed-float", lambda d: _run(d, "seed=1.5"), "seed"),
    ("run-accelerator", lambda d: _run(d, "trainer.accelerator=tpu"), "trainer.accelerator"),
    ("run-precision", lambda d: _run(d, "trainer.precision=8"), "trainer.precision"),
    ("run-devices", lambda d: _run(d, "trainer.devices=0"), "trainer.devices"),
    ("run-strategy", lambda d: _run(d, "trainer.strategy=magic"), "trainer.strategy"),
    ("run-overrides-int", lambda d: _run(d, "overrides=5"), "overrides"),
    ("run-overrides-item", lambda d: _run(d, "overrides=[5]"), "overrides.0"),
    ("run-overrides-bad", lambda d: _run(d, "overrides=[stages.0.operators.0.op=nope]"), "pipeline.stages.0"),
    ("run-override-nokey", lambda d: _run(d, "=1"), "'=1'"),
    ("run-override-noeq", lambda d: _run(d, "seed"), "seed"),
    ("run-unknown-key", lambda d: _run(d, "batchsize=3"), "batchsize"),
    ("run-unknown-nested", lambda d: _run(d, "model.paht=x"), "model.paht"),
    ("run-value-as-section", lambda d: _run(d, "seed.x=1"), "seed"),
    ("run-dtype", lambda d: _run(d, "model.dtype=float8"), "model.dtype"),
    ("run-attn", lambda d: _run(d, "model.attn_implementation=fast"), "model.attn_implementation"),
    ("run-batch-zero", lambda d: _run(d, "batch_size=0"), "batch_size"),
    ("run-batch-string", lambda d: _run(d, "batch_size='8'"), "batch_size"),
    ("run-wandb-mode", lambda d: _run(d, "logging.wandb.mode=cloud"), "logging.wandb.mode"),
    ("run-progress-string", lambda d: _run(d, "logging.progress_bar=yes_please"), "logging.progress_bar"),
    ("run-tags-string", lambda d: _run(d, "logging.wandb.tags=demo"), "logging.wandb.tags"),
    ("run-samples-negative", lambda d: _run(d, "logging.samples=-1"), "logging.samples"),
    ("run-data-source", lambda d: _run(d, "data.source=s3"), "data.source"),
    ("run-data-limit-zero", lambda d: _run(d, "data.limit=0"), "data.limit"),
    ("run-data-metric", lambda d: _run(d, "data.metric=bleu"), "data.metric"),
    ("run-data-split", lambda d: _run(d, "data.split=dev"), "data.split"),
    ("run-flops-convention", lambda d: _run(d, "flops_convention=paper"), "flops_convention"),
    ("run-overwrite-string", lambda d: _run(d, "overwrite='true'"), "overwrite"),
    ("run-pipeline-int", lambda d: _run(d, "pipeline=5"), "pipeline"),
    ("run-pipeline-typo", lambda d: _run(d, "pipeline=fastvv"), "pipeline"),
    ("run-pipeline-inline-typo", lambda d: _run(d, "pipeline={stages: [{layer: 2, operators: [{op: atention}]}]}"),
     "pipeline.stages.0.operators.0.op"),
    ("run-pipeline-plugin", lambda d: _run(d, f"pipeline={d / 'p_plug_side.yaml'}"), "pipeline.plugins.0"),
    ("run-layer-beyond-depth", lambda d: _run(d, "pipeline=fastv", "overrides=[stages.0.layer=40]"),
     "pipeline.stages.0.layer"),
    ("run-env-resolver", lambda d: _run(d, "output_dir=${oc.env:HOME}"), "output_dir"),
    ("run-missing-interpolation", lambda d: _run(d, "output_dir=${nope}"), "output_dir"),
    ("run-output-is-file", lambda d: _run(d, f"output_dir={d / 'a_file'}"), "output_dir"),
    ("run-output-below-file", lambda d: _run(d, f"output_dir={d / 'a_file' / 'run'}"), "output_dir"),
    ("run-cache-is-file", lambda d: _run(d, f"baseline_cache={d / 'a_file'}"), "baseline_cache"),
    ("run-output-finished", lambda d: _run(d, f"output_dir={d / 'finished'}"), "output_dir"),
    ("run-config-missing", lambda d: ["run", str(d / "no_such.yaml")], "no_such.yaml"),
    ("run-config-dir", lambda d: ["run", str(d / "r_dir.yaml")], "r_dir.yaml"),
    ("run-config-dup", lambda d: ["run", str(d / "r_dup.yaml")], "r_dup.yaml"),
    ("run-config-tag", lambda d: ["run", str(d / "r_tag.yaml")], "r_tag.yaml"),
    ("run-config-utf", lambda d: ["run", str(d / "r_utf.yaml")], "r_utf.yaml"),
    ("run-config-syntax", lambda d: ["run", str(d / "r_syntax.yaml")], "r_syntax.yaml"),
    ("run-config-list", lambda d: ["run", str(d / "r_list.yaml")], "r_list.yaml"),
    ("run-config-unknown", lambda d: ["run", str(d / "r_unknown.yaml")], "modle"),
    ("run-config-env", lambda d: ["run", str(d / "r_env.yaml")], "output_dir"),
    ("run-jsonl-broken-image", lambda d: _jsonl(d, "j_broken_image.jsonl"), "data.path"),
    ("run-jsonl-truncated-image", lambda d: _jsonl(d, "j_truncated_image.jsonl"), "data.path"),
    ("run-jsonl-missing-image", lambda d: _jsonl(d, "j_missing_image.jsonl"), "data.path"),
    ("run-jsonl-bad-json", lambda d: _jsonl(d, "j_bad_json.jsonl"), "data.path"),
    ("run-jsonl-not-object", lambda d: _jsonl(d, "j_not_object.jsonl"), "data.path"),
    ("run-jsonl-no-answer", lambda d: _jsonl(d, "j_no_answer.jsonl"), "data.path"),
    ("run-jsonl-answer-int", lambda d: _jsonl(d, "j_answer_int.jsonl"), "data.path"),
    ("run-jsonl-image-int", lambda d: _jsonl(d, "j_image_int.jsonl"), "data.path"),
    ("run-jsonl-metric", lambda d: _jsonl(d, "j_metric.jsonl"), "data.path"),
    ("run-jsonl-dup-id", lambda d: _jsonl(d, "j_dup_id.jsonl"), "data.path"),
    ("run-jsonl-empty", lambda d: _jsonl(d, "j_empty.jsonl"), "data.path"),
    ("run-jsonl-not-utf8", lambda d: _jsonl(d, "j_utf.jsonl"), "data.path"),
    ("run-jsonl-missing-file", lambda d: _jsonl(d, "nope.jsonl"), "data.path"),
    ("run-jsonl-no-path", lambda d: _run(d, "data.source=jsonl"), "data.path"),
    ("run-model-missing", lambda d: _run(d, f"model.path={d / 'no_model'}"), "model.path"),
    ("run-model-empty", lambda d: _run(d, f"model.path={d / 'm_empty'}"), "model.path"),
    ("run-model-text-only", lambda d: _run(d, f"model.path={d / 'm_text'}"), "model.path"),
    ("run-model-remote-code", lambda d: _run(d, f"model.path={d / 'm_remote'}"), "model.trust_remote_code"),
    ("run-model-bad-json", lambda d: _run(d, f"model.path={d / 'm_badjson'}"), "model.path"),
    ("run-lmms-extra-generation", lambda d: _run(d, "data.lmms_eval=[pope]", "generation.temperature=0.5"),
     "generation.temperature"),
    ("run-lmms-empty", lambda d: _run(d, "data.lmms_eval=[]"), "data.lmms_eval"),
]

SWEEP = [
    ("sweep-missing", lambda d: ["sweep", str(d / "no_sweep.yaml")], "no_sweep.yaml"),
    ("sweep-syntax", lambda d: ["sweep", str(d / "s_syntax.yaml")], "s_syntax.yaml"),
    ("sweep-tag", lambda d: ["sweep", str(d / "s_tag.yaml")], "s_tag.yaml"),
    ("sweep-utf", lambda d: ["sweep", str(d / "s_utf.yaml")], "s_utf.yaml"),
    ("sweep-dup", lambda d: ["sweep", str(d / "s_dup.yaml")], "s_dup.yaml"),
    ("sweep-list", lambda d: ["sweep", str(d / "s_list.yaml")], "s_list.yaml"),
    ("sweep-no-base", lambda d: ["sweep", str(d / "s_no_base.yaml")], "base"),
    ("sweep-base-int", lambda d: ["sweep", str(d / "s_base_int.yaml")], "base"),
    ("sweep-methods-list", lambda d: ["sweep", str(d / "s_methods_list.yaml")], "methods"),
    ("sweep-variants-list", lambda d: ["sweep", str(d / "s_variants_list.yaml")], "variants"),
    ("sweep-budget-scalar", lambda d: ["sweep", str(d / "s_budget_scalar.yaml")], "budget"),
    ("sweep-budget-values", lambda d: ["sweep", str(d / "s_budget_values.yaml")], "budget.values"),
    ("sweep-budget-str", lambda d: ["sweep", str(d / "s_budget_str.yaml")], "budget.values.1"),
    ("sweep-grid-scalar", lambda d: ["sweep", str(d / "s_grid_scalar.yaml")], "grid.stages.0.operators.3.keep"),
    ("sweep-set-typo", lambda d: ["sweep", str(d / "s_set_typo.yaml")], "data.limt"),
    ("sweep-set-pipeline-typo", lambda d: ["sweep", str(d / "s_set_pipeline_typo.yaml")], "stages.0.operators.9"),
    ("sweep-set-noeq", lambda d: ["sweep", str(d / "s_set_noeq.yaml")], "data.limit"),
    ("sweep-set-string", lambda d: ["sweep", str(d / "s_set_str.yaml")], "set"),
    ("sweep-unknown", lambda d: ["sweep", str(d / "s_unknown.yaml")], "swop"),
    ("sweep-variant-op", lambda d: ["sweep", str(d / "s_variant_op.yaml")], "pipeline.stages.0.operators.1.op"),
    ("sweep-variant-op-dry", lambda d: ["sweep", str(d / "s_variant_op.yaml"), "--dry-run"], None),
    ("sweep-method-unknown", lambda d: ["sweep", str(d / "s_method_unknown.yaml")], "fastvv"),
    ("sweep-method-factor", lambda d: ["sweep", str(d / "s_method_factor.yaml")], "methods.fastv.budget"),
    ("sweep-method-set-list", lambda d: ["sweep", str(d / "s_method_set_list.yaml")], "methods.fastv.set"),
    ("sweep-env", lambda d: ["sweep", str(d / "s_env.yaml")], "variants.v"),
    ("sweep-layer-deep", lambda d: ["sweep", str(d / "s_layer_deep.yaml")], "pipeline.stages.0.layer"),
    ("sweep-cli-set-type", lambda d: ["sweep", str(d / "s_ok.yaml"), "data.limit=x"], "data.limit"),
    ("sweep-cli-set-unknown", lambda d: ["sweep", str(d / "s_ok.yaml"), "data.limt=3"], "data.limt"),
    ("sweep-output-is-file", lambda d: ["sweep", str(d / "s_out_file.yaml")], "output_dir"),
]

BENCH = [
    ("bench-missing", lambda d: ["bench", str(d / "no_bench.yaml")], "no_bench.yaml"),
    ("bench-tag", lambda d: ["bench", str(d / "b_tag.yaml")], "b_tag.yaml"),
    ("bench-syntax", lambda d: ["bench", str(d / "b_syntax.yaml")], "b_syntax.yaml"),
    ("bench-list", lambda d: ["bench", str(d / "b_list.yaml")], "b_list.yaml"),
    ("bench-unknown", lambda d: ["bench", str(d / "b_unknown.yaml")], "repeat"),
    ("bench-repeats-string", lambda d: ["bench", str(d / "b_repeats_str.yaml")], "repeats"),
    ("bench-threads-bool", lambda d: ["bench", str(d / "b_threads_bool.yaml")], "threads"),
    ("bench-env", lambda d: ["bench", str(d / "b_env.yaml")], "models.0.path"),
    ("bench-variant-key", lambda d: ["bench", str(d / "b_variant_key.yaml")], "variants.0.overide"),
    ("bench-pipeline-typo", lambda d: ["bench", str(d / "b_pipeline_typo.yaml")], "fastvv"),
    ("bench-override-type", lambda d: ["bench", str(d / "b_ok.yaml"), "warmup=-1"], "warmup"),
    ("bench-override-string", lambda d: ["bench", str(d / "b_ok.yaml"), "new_tokens='8'"], "new_tokens"),
    ("bench-override-list-index", lambda d: ["bench", str(d / "b_ok.yaml"), "models.0.batch_sizes=[0]"],
     "models.0.batch_sizes.0"),
    ("bench-json-is-dir", lambda d: ["bench", str(d / "b_ok.yaml"), "--json", str(d / "m_empty")], "--json"),
    ("bench-markdown-below-file", lambda d: ["bench", str(d / "b_ok.yaml"), "--markdown", str(d / "a_file" / "b.md")],
     "--markdown"),
]

TRAIN = [
    ("train-missing", lambda d: ["train-reference", str(d / "no_train.yaml")], "no_train.yaml"),
    ("train-tag", lambda d: ["train-reference", str(d / "t_tag.yaml")], "t_tag.yaml"),
    ("train-unknown", lambda d: ["train-reference", str(d / "t_unknown.yaml")], "optim.learning_rate"),
    ("train-wandb-string", lambda d: ["train-reference", str(d / "t_wandb_str.yaml")], "logging.wandb"),
    ("train-env", lambda d: ["train-reference", str(d / "t_env.yaml")], "output_dir"),
    ("train-override-string", lambda d: ["train-reference", str(REPO / "experiments" / "train_reference.yaml"), "seed='1'"], "seed"),
    ("train-output-is-file", lambda d: ["train-reference", str(REPO / "experiments" / "train_reference.yaml"),
                                        f"output_dir={d / 'a_file'}"], "output_dir"),
    ("train-export-shipped", lambda d: ["train-reference", str(REPO / "experiments" / "train_reference.yaml"),
                                        f"output_dir={d / 'train_out'}",
                                        f"export_dir={REPO / 'tokenprune' / 'reference' / 'checkpoint'}"],
     "export_dir"),
]

CASES = SHOW + FLOPS + RUN + SWEEP + BENCH + TRAIN


@pytest.fixture
def guarded(monkeypatch):
    """Loading a model fails the test: every error must come before."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the error")
    monkeypatch.setattr(models, "open_model", refuse)
    monkeypatch.setattr(run_module, "load_model", refuse)
    monkeypatch.setattr(bench_module, "load_model", refuse)
    for family in train_module.FAMILIES.values():  # the training builds its model through its family
        monkeypatch.setattr(family, "build_model", refuse)


def _snapshot(d):
    return {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case, argv, key", CASES, ids=[c[0] for c in CASES])
def test_malformed_input_is_one_line_exit_2(case, argv, key, d, guarded, capsys, monkeypatch):
    monkeypatch.chdir(d.parent)  # plugins are looked up in the working directory too: none must run from here
    monkeypatch.syspath_prepend(str(d))  # the corpus' plugin modules are importable
    before = _snapshot(d)
    try:
        code = main(argv(d))
    except SystemExit as e:  # argparse's own errors (an option's type or choices)
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, (case, err)
    assert "Traceback" not in err
    if key is not None:  # a dry run lists every variant with its error (stdout) instead
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert key in lines[0], lines[0]
    assert not (d / CANARY).exists(), "user code ran"
    after = _snapshot(d)
    assert {p: b for p, b in after.items() if p in before} == before, "a file that was there changed"


def test_the_corpus_is_large_and_covers_each_command():
    assert len(CASES) + len(MODEL_ARGS) >= 100
    assert {c[0].split("-")[0] for c in CASES} >= {"show", "flops", "run", "sweep", "ops", "bench", "train"}


# --- lmms-eval's model_args, parsed by lmms-eval itself -------------------------------------------------------

MODEL_ARGS = [
    ("trust_remote_code=no", "model_args.trust_remote_code"),
    ("trust_remote_code=1", "model_args.trust_remote_code"),
    ("max_new_tokens=0", "model_args.max_new_tokens"),
    ("max_new_tokens=many", "model_args.max_new_tokens"),
    ("batch_size=zero", "model_args.batch_size"),
    ("batch_size=0", "model_args.batch_size"),
    ("max_batch_size=0", "model_args.max_batch_size"),
    ("dtype=float8", "model_args.dtype"),
    ("attn_implementation=fast", "model_args.attn_implementation"),
    ("pipeline=fastvv", "model_args.pipeline"),
    ("pipeline=fastv,overrides=stages.0.layer", "model_args.overrides"),
    ("pipeline=fastv,overrides=stages.0.operators.1.keep=-1", "model_args.pipeline.stages.0.operators.1.keep"),
    ("colour=red", "model_args.colour"),
    ("pretrained=/no/such/model", "model_args.pretrained"),
]


@pytest.mark.parametrize("args, key", MODEL_ARGS, ids=[a for a, _ in MODEL_ARGS])
def test_lmms_eval_model_args_are_typed(args, key, guarded):
    pytest.importorskip("lmms_eval")
    from tokenprune.eval.lmms_eval_model import TokenPrune

    with pytest.raises(ConfigError) as e:
        TokenPrune.create_from_arg_string(args)
    assert str(e.value).startswith(key), str(e.value)
    assert len(str(e.value).splitlines()) == 1
