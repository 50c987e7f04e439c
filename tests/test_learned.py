"""Learned operators: QueCC's compressor against the paper's formulation written out here (a strided depthwise
Conv2d, per-block multi-head cross-attention), the operator by hand, the weights file's save/load and every way it
can be wrong, and the runtime's autograd path."""

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F
from reference import reference_kv_greedy

import tokenprune as tp
from tokenprune.core.errors import ConfigError
from tokenprune.core.registry import registered_operators
from tokenprune.core.state import TokenState


def quecc(**params):
    cls = registered_operators()["quecc"]
    return cls(cls.parse_params(params, key="stages.0.operators.0"), key="stages.0.operators.0")


def randomised(net, seed=0):
    """Every parameter of ``net`` random (the initialisation zeroes the output and makes the kernel a mean)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net


def paper_quecc(net, tokens, text, rows, cols, k):
    """QueCC as Li et al. write it, on a (rows, cols) grid zero-padded to whole k x k blocks: Conv2d(groups=dim,
    kernel=stride=k) over the query-conditioned grid, each block's query attending to its own tokens."""
    x = net.inp(tokens)
    q = net.q_mlp(x + net.text(text))
    dim = q.shape[1]
    R, C = -(-rows // k), -(-cols // k)
    pad = (0, 0, 0, C * k - cols, 0, R * k - rows)
    grid = F.pad(q.view(rows, cols, dim), pad).permute(2, 0, 1)[None]  # (1, dim, R*k, C*k)
    conv = F.conv2d(grid, net.down.view(dim, 1, k, k), net.down_bias, stride=k, groups=dim)  # (1, dim, R, C)
    queries = conv[0].permute(1, 2, 0).reshape(R * C, 1, dim)

    def blocks(t):  # (rows*cols, dim) -> (R*C, k*k, dim), block by block in raster order
        g = F.pad(t.view(rows, cols, dim), pad)
        return g.view(R, k, C, k, dim).permute(0, 2, 1, 3, 4).reshape(R * C, k * k, dim)

    present = F.pad(torch.ones(rows, cols, 1), pad).view(R, k, C, k).permute(0, 2, 1, 3).reshape(R * C, k * k)
    out, _ = net.attn(queries, blocks(net.k_mlp(x)), blocks(net.v_mlp(x)), key_padding_mask=present == 0)
    return net.out(out[:, 0])


@pytest.mark.parametrize("rows,cols,k", [(6, 6, 3), (5, 7, 3), (4, 4, 4)])
def test_quecc_network_is_the_papers_conv_and_cross_attention(rows, cols, k):
    op = quecc(size=k, dim=8, heads=2)
    op.bind(12, untrained=True)
    net = randomised(op.network).eval()
    torch.manual_seed(1)
    tokens, text = torch.randn(rows * cols, 12), torch.randn(12)
    from tokenprune.operators.mergers import grid_blocks

    block, slot, first = grid_blocks(rows, cols, k, "cpu")
    with torch.no_grad():
        got = net(tokens, text, block, slot, first.numel())
        want = paper_quecc(net, tokens, text, rows, cols, k)
    assert got.shape == (-(-rows // k) * -(-cols // k), 12)
    assert torch.allclose(got, want, atol=1e-5)


def test_quecc_operator_by_hand():
    """A 4x4 tile compressed by 2 with text after it: four tokens, each its block's mean plus the network's output
    for that block with the question = the mean of the text tokens after the image; the text stays."""
    op = quecc(size=2, dim=8, heads=2)
    op.bind(6, untrained=True)
    net = randomised(op.network).eval()
    torch.manual_seed(0)
    h = torch.randn(1, 1 + 16 + 3, 6)
    visual = torch.zeros(1, 20, dtype=torch.bool)
    visual[0, 1:17] = True
    state = TokenState.from_tensors(h, visual, layer=0)
    state.tiles = torch.where(visual, 0, -1)
    state.tile_grids = [[(4, 4)]]
    with torch.no_grad():
        out = op(state)
    kept = out.keep_mask[0].nonzero().flatten().tolist()
    tops = [1, 3, 9, 11]
    assert kept == [0] + tops + [17, 18, 19]
    grid = h[0, 1:17].view(4, 4, 6)
    question = h[0, 17:].mean(0)
    with torch.no_grad():
        added = paper_quecc(net, h[0, 1:17], question, 4, 4, 2)
    for i, t in enumerate(tops):
        r, c = divmod(i, 2)
        mean = grid[2 * r:2 * r + 2, 2 * c:2 * c + 2].reshape(-1, 6).mean(0)
        assert torch.allclose(out.hidden[0, t], mean + added[i], atol=1e-5)
    assert out.sizes[0, tops].tolist() == [4] * 4
    assert torch.equal(out.hidden[0, 17:], h[0, 17:])


def test_untrained_quecc_is_grid_pool_through_the_runtime(llava_pair, batch):
    """At its initialisation (output projection zero, kernel a mean) QueCC adds nothing to the pooled tokens: the
    model's logits equal the ``grid_pool`` pipeline's, which test_pooling checks against the pooled features."""
    model = llava_pair["sdpa"]
    logits = {}
    for op in ("quecc", "grid_pool"):
        pipe = tp.load_pipeline({"name": op, "stages": [{"layer": 0, "positions": "renumber",
                                                         "operators": [{"op": op, "size": 2}]}]})
        if op == "quecc":
            pipe.stages[0].operators[0].bind(model.get_input_embeddings().embedding_dim, untrained=True)
        with torch.no_grad(), pipe.attach(model):
            logits[op] = model(**batch).logits
    assert torch.allclose(logits["quecc"], logits["grid_pool"], atol=1e-5)


def test_a_learned_operator_without_weights_is_refused_at_attach(llava_pair, batch):
    pipe = tp.load_pipeline({"name": "q", "stages": [{"layer": 0, "operators": [{"op": "quecc", "size": 2}]}]})
    with pytest.raises(ConfigError, match=r"stages\.0\.operators\.0\.weights: quecc is a learned operator and has no "
                                          "trained weights"):
        pipe.attach(llava_pair["sdpa"])


def saved(tmp_path, hidden=16, **params):
    op = quecc(**params)
    op.bind(hidden, untrained=True)
    randomised(op.network, seed=3)
    path = tmp_path / "q.safetensors"
    op.save_weights(path, model="tiny", training={"steps": 1})
    return op, path


def test_weights_round_trip_and_the_digest_in_the_resolved_config(tmp_path):
    op, path = saved(tmp_path, size=3, dim=8, heads=2)
    cfg = {"name": "q", "stages": [{"layer": 0, "operators": [{"op": "quecc", "size": 3, "dim": 8, "heads": 2,
                                                                "weights": str(path)}]}]}
    resolved = tp.resolve_pipeline_config(cfg)
    assert resolved.stages[0].operators[0].sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = tp.load_pipeline(cfg).stages[0].operators[0]
    loaded.bind(16)
    for (name, a), (_, b) in zip(op.network.state_dict().items(), loaded.network.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.weights_record()["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_wrong_weights_file_is_one_clear_error(tmp_path):
    op, path = saved(tmp_path, size=3, dim=8, heads=2)
    base = {"op": "quecc", "size": 3, "dim": 8, "heads": 2, "weights": str(path)}

    def build(**change):
        return tp.load_pipeline({"name": "q", "stages": [{"layer": 0, "operators": [{**base, **change}]}]})

    missing = tmp_path / "none.safetensors"
    with pytest.raises(ConfigError, match=rf"stages\.0\.operators\.0\.weights: quecc: weights file {missing} not found"):
        build(weights=str(missing))
    with pytest.raises(ConfigError, match=r"stages\.0\.operators\.0\.weights: .*not found; give a shipped name"):
        build(weights="no_such_name")
    with pytest.raises(ConfigError, match=r"stages\.0\.operators\.0\.sha256: quecc: weights file .* has sha256 "):
        build(sha256="0" * 64)
    with pytest.raises(ConfigError, match=r"stages\.0\.operators\.0\.size: quecc: weights file .* was trained with "
                                          r"size=3, not 4"):
        build(size=4)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match=r"stages\.0\.operators\.0\.weights: .*junk\.safetensors is not a readable"):
        build(weights=str(junk))
    pipe = build()
    with pytest.raises(ConfigError, match=r"stages\.0\.operators\.0\.weights: quecc: weights file .* was trained for "
                                          r"an LLM of width 16 \(tiny\); this model's width is 32"):
        pipe.stages[0].operators[0].bind(32)
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other.safetensors"
    meta = {"op": "grid_pool", "hidden_size": "16"}
    save_file(load_file(str(path)), str(other), metadata=meta)
    with pytest.raises(ConfigError, match=r"holds weights of operator 'grid_pool', not 'quecc'"):
        build(weights=str(other))


def test_run_refuses_a_missing_weights_file_before_the_model_loads(tmp_path, capsys):
    from tokenprune.cli import main

    pipe = tmp_path / "p.yaml"
    pipe.write_text(f"name: q\nstages:\n  - layer: 0\n    operators:\n      - {{op: quecc, weights: {tmp_path}/x.safetensors}}\n")
    code = main(["run", "experiments/asap_shapes.yaml", f"pipeline={pipe}", "model.path=/nonexistent/model",
                 f"output_dir={tmp_path}/out"])
    err = capsys.readouterr().err
    assert code == 2
    assert "stages.0.operators.0.weights" in err and "x.safetensors not found" in err
    assert len(err.strip().splitlines()) == 1


def test_gradients_reach_the_operator_only_in_training(llava_pair, batch):
    """A training step's loss reaches the compressor's weights through the pruned forward (the frozen LVLM gets no
    gradient); in eval mode no graph is built."""
    model = llava_pair["sdpa"]
    pipe = tp.load_pipeline({"name": "q", "stages": [{"layer": 0, "operators": [{"op": "quecc", "size": 2}]}]})
    op = pipe.stages[0].operators[0]
    op.bind(model.get_input_embeddings().embedding_dim, untrained=True)
    model.requires_grad_(False)
    try:
        pipe.train()
        with pipe.attach(model):
            loss = model(**batch).logits[:, -1].logsumexp(-1).sum()
        loss.backward()
        assert op.network.out.weight.grad is not None and op.network.out.weight.grad.abs().sum() > 0
        pipe.eval()
        with pipe.attach(model):
            assert not model(**batch).logits.requires_grad
    finally:
        model.requires_grad_(True)


def micro(tmp_path, name, tiny_folder, steps):
    return [f"model.path={tiny_folder}", "pipeline=quecc", "overrides=[stages.0.operators.0.size=12]",
            "data.batch_size=2", "val.items=2", "val.every=0", "logging.wandb=false", "logging.every=1",
            "checkpoint_every=2", "optim.warmup_steps=10", f"optim.max_steps={steps}", "accelerator=cpu",
            f"output_dir={tmp_path / name}"]


def test_train_operator_trains_resumes_exactly_and_writes_a_loadable_file(tmp_path, tiny_folder):
    """Four steps in one go and two + two (a resume from the checkpoint, the data stream continued) write the same
    weights (the warm-up is linear over 10 steps, so the schedule does not depend on max_steps); the file carries
    the metadata the operator checks and loads into a pipeline."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from tokenprune.eval.train_operator import load_config, train_operator

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: every sum in one order, so the two runs can be compared bit for bit
    try:
        whole = train_operator(load_config("experiments/train_quecc.yaml", micro(tmp_path, "a", tiny_folder, 4)))
        train_operator(load_config("experiments/train_quecc.yaml", micro(tmp_path, "b", tiny_folder, 2)))
        resumed = train_operator(load_config("experiments/train_quecc.yaml", micro(tmp_path, "b", tiny_folder, 4)))
    finally:
        torch.set_num_threads(threads)
    assert whole["steps"] == resumed["steps"] == 4
    a, b = load_file(whole["export"]), load_file(resumed["export"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def losses(run):
        rows = [r.split(",") for f in sorted((tmp_path / run / "metrics").glob("version_*/metrics.csv"))
                for r in f.read_text().splitlines()[1:]]
        return [float(r[2]) for r in rows if r[2]]

    assert len(losses("a")) == 4 and losses("a") == losses("b")
    assert a["out.weight"].abs().sum() > 0  # trained away from the zero initialisation
    assert whole["sha256"] == hashlib.sha256(open(whole["export"], "rb").read()).hexdigest()
    with safe_open(whole["export"], framework="pt") as f:
        meta = f.metadata()
    assert meta["op"] == "quecc" and meta["hidden_size"] == "64" and json.loads(meta["param.size"]) == 12
    assert json.loads(meta["training"])["steps"] == 4
    pipe = tp.load_pipeline("quecc", ["stages.0.operators.0.size=12", f"stages.0.operators.0.weights={whole['export']}"])
    pipe.stages[0].operators[0].bind(64)
    # --evaluate: the file loaded afresh scores the validation items as the trained network did at the end
    from tokenprune.eval.train_operator import evaluate_operator

    again = evaluate_operator(load_config("experiments/train_quecc.yaml", micro(tmp_path, "a", tiny_folder, 4),
                                          trained=True), "val", 2)
    assert again == whole["val"]


def test_answer_loss_decodes_longer_answers_on_the_pruned_cache(tiny_folder):
    """Answers of two and one words, each with its end token: the loss equals the cross-entropy of the logits
    generate() gives when forced to emit them one by one, with grid_pool — what the untrained compressor equals —
    attached."""
    from transformers import LogitsProcessor

    from tokenprune.eval.models import load_model
    from tokenprune.eval.train_operator import answer_loss, encode_answers
    from tokenprune.reference import shapes

    model, proc = load_model({"path": str(tiny_folder), "dtype": "float32", "attn_implementation": "sdpa",
                              "trust_remote_code": False})
    items = [{**shapes.make_item(f"t/{i}", "color"), "answer": a} for i, a in enumerate(["red circle", "blue"])]
    batch = encode_answers(proc, items)
    eos = proc.tokenizer.eos_token_id
    ids = proc.tokenizer.convert_tokens_to_ids(["red", "circle", "blue"])
    assert batch["answer_ids"].tolist() == [[ids[0], ids[1], eos], [ids[2], eos, -100]]  # the end token is learnt too
    q = tp.load_pipeline({"name": "q", "stages": [{"layer": 0, "operators": [{"op": "quecc", "size": 6}]}]})
    q.stages[0].operators[0].bind(64, untrained=True)
    with torch.no_grad():
        got = answer_loss(model, q, batch)

    pool = tp.load_pipeline({"name": "p", "stages": [{"layer": 0, "operators": [{"op": "grid_pool", "size": 6}]}]})
    losses = []
    for b in range(2):
        want = batch["answer_ids"][b][batch["answer_ids"][b] >= 0]

        class Force(LogitsProcessor):  # emit the answer's tokens, whatever the model prefers
            def __init__(self, want, start):
                self.want, self.start = want, start

            def __call__(self, input_ids, scores):
                out = torch.full_like(scores, float("-inf"))
                out[:, self.want[input_ids.shape[1] - self.start]] = 0
                return out

        enc = {k: v[b:b + 1] for k, v in batch.items() if k != "answer_ids"}
        with torch.no_grad(), pool.attach(model):
            gen = model.generate(**enc, max_new_tokens=len(want), min_new_tokens=len(want), do_sample=False,
                                 logits_processor=[Force(want, enc["input_ids"].shape[1])], output_logits=True,
                                 return_dict_in_generate=True)
        logits = torch.cat([s.float() for s in gen.logits])
        losses.append(-torch.log_softmax(logits, -1).gather(1, want[:, None]).flatten())
    assert torch.allclose(got, torch.cat(losses).mean(), atol=1e-5)


def test_train_operator_config_errors(tmp_path, tiny_folder):
    from tokenprune.eval.train_operator import load_config

    with pytest.raises(ConfigError, match="pipeline: 'fastv' has no learned operator to train"):
        load_config("experiments/train_quecc.yaml", ["pipeline=fastv"])
    with pytest.raises(ConfigError, match=r"operator: got 'stages\.0\.operators\.1'; the learned operators of 'quecc': "
                                          r"stages\.0\.operators\.0"):
        load_config("experiments/train_quecc.yaml", ["operator=stages.0.operators.1"])
    with pytest.raises(ConfigError, match="optim.max_steps: must be a positive integer, got 0"):
        load_config("experiments/train_quecc.yaml", ["optim.max_steps=0"])
    taken = tmp_path / "w.safetensors"
    taken.write_bytes(b"x")
    with pytest.raises(ConfigError, match="export: .*already exists; set overwrite_export=true"):
        load_config("experiments/train_quecc.yaml", [f"export={taken}"])


def test_a_run_directory_pins_the_weights_and_a_rerun_refuses_changed_ones(tmp_path, tiny_folder, capsys):
    """`tokenprune run` with a learned operator: config.yaml's resolved pipeline carries the file's SHA-256 and
    provenance.json the file; after the file changes, `run --from` is refused naming the sha256 key (exit 2)."""
    import yaml

    from tokenprune.cli import main

    _, path = saved(tmp_path, hidden=64, size=12, dim=8, heads=2)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    first = tmp_path / "first"
    args = ["run", "experiments/asap_shapes.yaml", f"model.path={tiny_folder}", "data.limit=2", "batch_size=2",
            "pipeline=quecc", f"overrides=[stages.0.operators.0.size=12, stages.0.operators.0.dim=8, "
            f"stages.0.operators.0.heads=2, stages.0.operators.0.weights={path}]", f"output_dir={first}",
            "baseline_cache=null", "logging.wandb.mode=disabled", "logging.progress_bar=false"]
    assert main(args) == 0
    recorded = yaml.safe_load((first / "config.yaml").read_text())
    assert recorded["resolved_pipeline"]["stages"][0]["operators"][0]["sha256"] == digest
    weights = json.loads((first / "provenance.json").read_text())["operator_weights"]
    assert weights == [{"op": "quecc", "key": "stages.0.operators.0", "file": str(path), "sha256": digest,
                        "model": "tiny"}]
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))  # the same file, retrained: one tensor changed, the metadata kept
    tensors["out.bias"] = tensors["out.bias"] + 1
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file(tensors, str(path), metadata=meta)
    capsys.readouterr()
    assert main(["run", "--from", str(first), f"output_dir={tmp_path / 'again'}"]) == 2
    err = capsys.readouterr().err
    assert "stages.0.operators.0.sha256" in err and "not the " + digest in err


# --- AttentionPredictor --------------------------------------------------------------------------------------------


def predictor(**params):
    cls = registered_operators()["attention_predictor"]
    return cls(cls.parse_params(params, key="stages.0.operators.0"), key="stages.0.operators.0")


def identity_network(op):
    """The network made to pass channel 0 straight through: conv1 and conv2 a centred delta into channel 0, the head
    reading channel 0 — its output is then N times the history's mean over time (all inputs are >= 0)."""
    net = op.network
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.conv1.weight[0, 0, 1, 1] = 1.0
        net.conv2.weight[0, 0, 1, 1] = 1.0
        net.head.weight[0, 0, 0] = 1.0
    return net


def test_attention_predictor_network_and_prediction_by_hand():
    op = predictor(history=3, block=2)
    op.bind(16, untrained=True)
    net = identity_network(op)
    hist = torch.tensor([[[0.1, 0.2, 0.3, 0.4, 0.0], [0.3, 0.3, 0.2, 0.1, 0.1], [0.2, 0.2, 0.2, 0.2, 0.2]],
                         [[0.5, 0.1, 0.1, 0.1, 0.2], [0.4, 0.2, 0.2, 0.1, 0.1], [0.6, 0.1, 0.1, 0.1, 0.1]]])
    with torch.no_grad():
        assert torch.allclose(net(hist), 5 * hist.mean(1), atol=1e-6)
        got = op.predict(hist)
    # by hand: max over runs of 2 entries (the last run holds one), x3 (pooled N), mean over time, softmax per head,
    # mean over heads, each entry its run's value
    pooled = torch.stack([hist[..., 0:2].amax(-1), hist[..., 2:4].amax(-1), hist[..., 4]], -1)
    probs = torch.softmax(3 * pooled.mean(1), -1).mean(0)
    assert torch.allclose(got, probs[[0, 0, 1, 1, 2]], atol=1e-6)


def test_the_runtime_gives_the_predictor_the_models_own_attention_and_keeps_its_top_entries():
    """On a tiny eager LLaVA (a padded batch): at every layer, the history the operator reads is the model's own
    attention (output_attentions) of the last 3 real rows over the sample's real entries, and the cache keeps the
    top 25% of the visual entries by the prediction from it."""
    from tokenprune.core.budget import resolve_keep
    from tokenprune.reference.tiny import tiny_llava, tiny_llava_inputs

    model = tiny_llava("eager", layers=3)
    batch = tiny_llava_inputs(model)
    pipe = tp.load_pipeline("attention_predictor", ["stages.0.operators.0.weights=init",  # chosen once, for good
                                                    "stages.0.operators.0.history=3", "stages.0.operators.1.keep=0.25",
                                                    "stages.0.cache.decode.steps=[]"])
    op = pipe.stages[0].operators[0]
    seen = []
    real_predict = op.predict
    op.predict = lambda history: seen.append(history) or real_predict(history)
    with torch.no_grad():
        attentions = model(**batch, output_attentions=True).attentions
        with pipe.attach(model):
            model.generate(**batch, max_new_tokens=2, do_sample=False)
    traces = [t for t in pipe.trace if t.site == "kv_cache"]
    assert len(seen) == 3 * 2 and len(traces) == 3  # every layer, both samples
    image = model.config.image_token_id
    for layer, trace in enumerate(traces):
        for b in range(2):
            valid = batch["attention_mask"][b].bool()
            rows = valid.nonzero().flatten()[-3:]
            want = attentions[layer][b][:, rows][:, :, valid]
            assert torch.allclose(seen[2 * layer + b], want, atol=1e-5)
            visual = (batch["input_ids"][b] == image)[valid]
            with torch.no_grad():
                scores = real_predict(want)[visual]
            k = resolve_keep(0.25, int(visual.sum()))
            top = set(valid.nonzero().flatten()[visual.nonzero().flatten()[scores.topk(k).indices]].tolist())
            kept_visual = {i for i in trace.kept[b] if int(batch["input_ids"][b, i]) == image}
            assert kept_visual == top


def generate_greedy(model, batch, pipe, steps):
    with torch.no_grad(), pipe.attach(model):
        return model.generate(**batch, max_new_tokens=steps, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)


def _decoding_predictor(keep):
    """``(pipe, seen, predict)``: the attention_predictor preset at the paper's regime on a tiny model — the cache
    kept whole after the prefill, every decoding step shown the ``keep`` share of each layer's visual entries its
    prediction ranks highest — with every history its predictor reads appended to ``seen``, and the predictor."""
    pipe = tp.load_pipeline("attention_predictor", ["stages.0.operators.0.weights=init",
                                                    "stages.0.operators.0.history=3",
                                                    "stages.0.operators.1.keep=1.0",
                                                    f"stages.0.cache.decode.keep={keep}"])
    op = pipe.stages[0].operators[0]
    seen = []
    real_predict = op.predict
    op.predict = lambda history: seen.append(history) or real_predict(history)
    return pipe, seen, real_predict


def test_each_decoding_step_predicts_from_the_models_own_attention_history(llava_pair, batch):
    """Nothing hidden (keep 1.0), so generation is the unpruned model's: at decoding step s, the history each layer's
    predictor reads is the eager model's own attention on the sequence so far — the last 3 rows before the step's
    token (prompt rows, then decoded tokens' rows) — over the sample's real prompt entries, renormalised over them."""
    pipe, seen, _ = _decoding_predictor(1.0)
    steps, layers = 4, 4
    out = generate_greedy(llava_pair["sdpa"], batch, pipe, steps)
    n = batch["input_ids"].shape[1]
    assert len(seen) == layers * 2 * steps  # the prefill's, then decoding steps 1-3, every layer, both samples
    for s in range(1, steps):
        seq = out.sequences[:, :n + s - 1]  # up to the token before the step's
        am = torch.cat([batch["attention_mask"], torch.ones(2, s - 1, dtype=torch.long)], 1)
        with torch.no_grad():
            att = llava_pair["eager"](input_ids=seq, attention_mask=am, pixel_values=batch["pixel_values"],
                                      output_attentions=True).attentions
        for layer in range(layers):
            for b in range(2):
                prompt = batch["attention_mask"][b].bool()
                rows = am[b].bool().nonzero().flatten()[-3:]
                want = att[layer][b][:, rows][:, :, :n][:, :, prompt].float()
                want = want / want.sum(-1, keepdim=True)
                got = seen[layers * 2 * s + 2 * layer + b]
                assert torch.allclose(got, want, atol=1e-5), (s, layer, b)
    assert all(all(r == 1.0 for r in t.hit_rate) for t in pipe.trace if t.site == "decode")


def test_each_decoding_step_shows_the_layers_the_entries_predicted_from_the_history(llava_pair, batch):
    """keep 0.25: at every decoding step each layer sees, of the 64 visual entries, only the 16 the prediction from
    its history ranks highest (the text stays), the cache keeps every entry, and generation equals the eager
    reference that hides each step's unchosen entries from that layer; each step's hit rate is the share of them
    in the top 16 of the exact attention the step then pays (here: by hand from a spy on the predictor and
    the runtime's own rows)."""
    from tokenprune.core.budget import resolve_keep

    pipe, seen, real_predict = _decoding_predictor(0.25)
    steps, layers = 4, 4
    out = generate_greedy(llava_pair["sdpa"], batch, pipe, steps)
    image = llava_pair["sdpa"].config.image_token_id
    n = batch["input_ids"].shape[1]
    kept_from_step = {}
    for s in range(1, steps):
        traces = {t.layer: t for t in pipe.trace if t.site == "decode" and t.step == s}
        assert sorted(traces) == list(range(layers))
        kept_from_step[s] = {layer: t.kept for layer, t in traces.items()}
        for layer, t in traces.items():
            for b in range(2):
                prompt = batch["attention_mask"][b].bool().nonzero().flatten()
                visual = batch["input_ids"][b, prompt] == image
                with torch.no_grad():
                    scores = real_predict(seen[layers * 2 * s + 2 * layer + b])[visual]
                k = resolve_keep(0.25, int(visual.sum()))
                top = set(prompt[visual.nonzero().flatten()[scores.topk(k).indices]].tolist())
                assert {i for i in t.kept[b] if batch["input_ids"][b, i] == image} == top
                assert len(t.kept[b]) == len(prompt) - 64 + 16
                assert 0.0 <= t.hit_rate[b] <= 1.0 and (t.hit_rate[b] * 16).is_integer()
    assert out.past_key_values.layers[0].keys.shape[-2] == n + steps - 1  # nothing evicted
    tokens, ref_logits = reference_kv_greedy(llava_pair["eager"], batch, {}, steps, kept_from_step=kept_from_step)
    assert torch.equal(out.sequences[:, -steps:], tokens)
    for got, want in zip(out.logits, ref_logits):
        assert torch.allclose(got.float(), want, atol=1e-4)


def test_attention_examples_per_decoding_step_by_hand(llava_pair, batch):
    """``steps=True``: for a 3-token answer (the last 3 tokens of each left-padded row), step s's target is the row
    of the answer's token s - 1 over the sample's prompt entries, its history the 2 rows before it (prompt rows, then
    answer rows), each renormalised over the prompt entries — from the eager model's own attention."""
    from tokenprune.eval.train_operator import attention_examples

    width = batch["input_ids"].shape[1]
    full = {**batch, "prompt_end": torch.tensor([width - 3] * 2), "answer_ids": batch["input_ids"][:, -3:]}
    examples = attention_examples(llava_pair["eager"], full, history=2, steps=True)
    with torch.no_grad():
        att = llava_pair["eager"](**batch, output_attentions=True).attentions
    assert [ex["step"] for ex in examples] == [1, 2, 3] * 2
    image = llava_pair["eager"].config.image_token_id
    for i, ex in enumerate(examples):
        b, s = divmod(i, 3)
        start = int(batch["attention_mask"][b].nonzero()[0])
        row = width - 3 + s
        for layer in range(4):
            for h in range(att[layer].shape[1]):
                want_t = att[layer][b, h, row, start:width - 3]
                want_h = att[layer][b, h, row - 2:row, start:width - 3]
                got_t, got_h = ex["target"][layer * att[layer].shape[1] + h], ex["history"][layer * att[layer].shape[1] + h]
                assert torch.allclose(got_t, want_t / want_t.sum(), atol=1e-6)
                assert torch.allclose(got_h, want_h / want_h.sum(-1, keepdim=True), atol=1e-6)
        assert torch.equal(ex["visual"], batch["input_ids"][b, start:width - 3] == image)


def test_the_training_stream_describes_the_share_of_items_asked():
    """``data.describe: 0.5``: every second training item (0, 2, ...) is asked "What is there ?" and answered with
    its shapes; the others keep their question."""
    from tokenprune.eval.train_operator import AnswerStream
    from tokenprune.reference.model import build_processor
    from tokenprune.reference.train import DESCRIBE_QUESTION, describe, train_batches

    proc = build_processor()
    batch = next(iter(AnswerStream(proc, seed=0, batch_size=4, full=True, describe=0.5)))
    _, items = next(train_batches(0, 4))
    texts = proc.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    for j, (it, text) in enumerate(zip(items, texts)):
        asked = describe(it) if j % 2 == 0 else it
        assert (DESCRIBE_QUESTION in text) == (j % 2 == 0)
        assert text.rstrip().endswith(asked["answer"].strip())
    with pytest.raises(ConfigError, match="data.steps: 'all' trains on every decoding step's attention"):
        from tokenprune.eval.train_operator import load_config

        load_config("experiments/train_quecc.yaml", ["data.steps=all"])


def test_decoding_hit_rates_by_hand():
    """Visual entries 1-4 of five, two kept: the truth's top two are 3 and 4; one sample chose 2 and 3 (half), the
    other 3 and 4 (all); a sample that keeps none scores 1."""
    from tokenprune.runtime.kv_cache import hit_rates as decode_hit_rates

    truth = torch.tensor([[0.5, 0.1, 0.1, 0.2, 0.1], [0.5, 0.1, 0.1, 0.2, 0.1], [0.5, 0.1, 0.1, 0.2, 0.1]])
    truth[:, 4] = 0.15
    visual = torch.tensor([[False, True, True, True, True]] * 3)
    chosen = torch.tensor([[True, False, True, True, False], [True, False, False, True, True], [True] + [False] * 4])
    assert decode_hit_rates(chosen, truth, visual, torch.tensor([2, 2, 0])) == [0.5, 1.0, 1.0]


def test_hit_rates_by_hand():
    """Two layers of one head, visual entries 1-4 of five, keep 50% (two): in layer 0 the last row's top two are the
    truth's and the window mean's none of them; in layer 1 both find both. The predictor (made to rank by the
    window mean) scores as the window mean."""
    from tokenprune.eval.train_operator import hit_rates

    op = predictor(history=2)
    op.bind(16, untrained=True)
    identity_network(op)  # predicts softmax(N x the mean over time): the window mean's order
    target = torch.tensor([[0.2, 0.35, 0.25, 0.15, 0.05],     # truth's visual top two: entries 1, 2
                           [0.1, 0.05, 0.15, 0.3, 0.4]])      # entries 4, 3
    history = torch.tensor([[[0.0, 0.0, 0.0, 0.6, 0.4], [0.1, 0.4, 0.3, 0.1, 0.1]],    # last row: 1, 2; mean: 3, 4
                            [[0.0, 0.4, 0.3, 0.2, 0.1], [0.1, 0.05, 0.05, 0.4, 0.4]]])  # last row: 3, 4; mean: 3, 4
    visual = torch.tensor([False, True, True, True, True])
    rates = hit_rates(op, [{"history": history, "target": target, "visual": visual, "layers": 2}], keep=0.5)
    assert rates == pytest.approx({"predictor": 0.5, "last_row": 1.0, "window_mean": 0.5})


def test_attention_loss_by_hand():
    """The cross-entropy over the visual entries only: the observed row renormalised over them against the softmax
    of the network's logits over them (here N x the history's mean, by the identity network)."""
    from tokenprune.eval.train_operator import attention_loss

    op = predictor(history=2)
    op.bind(16, untrained=True)
    identity_network(op)
    history = torch.tensor([[[0.5, 0.1, 0.2, 0.2], [0.3, 0.3, 0.3, 0.1]]])
    target = torch.tensor([[0.6, 0.1, 0.1, 0.2]])
    visual = torch.tensor([False, True, True, True])
    logits = 4 * history.mean(1)[0, 1:]
    want = -(torch.tensor([0.25, 0.25, 0.5]) * torch.log_softmax(logits, -1)).sum()
    with torch.no_grad():
        got = attention_loss(op, [{"history": history, "target": target, "visual": visual, "layers": 1}])
    assert torch.allclose(got, want, atol=1e-6)


def test_the_initialisation_is_the_same_network_on_every_bind():
    """``weights: init`` attached to two models (SDPA and FlashAttention, say) is one network, not two draws."""
    a, b = predictor(weights="init"), predictor(weights="init")
    torch.manual_seed(1)
    a.bind(16)
    torch.manual_seed(2)
    b.bind(16)
    assert all(torch.equal(x, y) for x, y in zip(a.network.state_dict().values(), b.network.state_dict().values()))
