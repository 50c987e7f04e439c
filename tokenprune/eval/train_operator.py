"""Train one learned operator of a pipeline on ``shapes``, the LVLM frozen: ``tokenprune train-operator CONFIG``.

Lightning, seeded, resumable (running the same command again continues from ``output_dir/checkpoints/last.ckpt``,
the data stream included), W&B offline unless the config says otherwise, a GPU when there is one
(``accelerator: auto``). At the end the operator's weights are written as safetensors (``export``) with the
metadata the operator checks when it loads them (:mod:`tokenprune.core.learned`), and the pipeline is scored on
the validation items.

The loss is the operator's paper's (its ``objective``): ``answer`` — the frozen LVLM's cross-entropy on the answer
tokens, the prompt prefilled through the pipeline (the compressed tokens are all the LLM sees of the image; QueCC);
``attention`` — the cross-entropy of the predicted next-step attention against the one the frozen LVLM pays (each
layer's and head's attention of the first answer token over the prompt's visual entries, from the prompt's last
rows; AttentionPredictor), validated by the hit rate of the predicted top entries.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from tokenprune.core.budget import resolve_keep
from tokenprune.core.config import apply_overrides, load_source
from tokenprune.core.errors import ConfigError
from tokenprune.core.learned import META_TRAINING, learned_operators, read_metadata
from tokenprune.core.paths import writable_file, writable_folder
from tokenprune.core.registry import get_operator_class
from tokenprune.core.values import Bool, Float, Int, ListOf, Optional, Str, check_schema, given
from tokenprune.core.yaml_files import read_yaml, refuse_interpolation
from tokenprune.eval.models import build_prompt, load_model, model_path
from tokenprune.eval.run_config import ATTENTION, DTYPES
from tokenprune.eval.scoring import item_score
from tokenprune.measure.provenance import model_files
from tokenprune.operators.learned import max_pool_entries
from tokenprune.pipeline import build_pipeline
from tokenprune.reference import shapes
from tokenprune.reference.train import check_resume, describe, fit, resume_point, train_batches, warmup_cosine

DEFAULTS: dict[str, Any] = {
    "pipeline": "quecc",  # a preset name or a pipeline YAML file
    "overrides": [],  # KEY=VALUE on the pipeline (stages.0.operators.0.size=3)
    "operator": None,  # key of the learned operator to train (stages.0.operators.0); null: the pipeline's only one
    "model": {"path": "reference", "dtype": "float32", "attn_implementation": "sdpa", "trust_remote_code": False},
    "seed": 0,
    "output_dir": "runs/train_operator",
    "export": None,  # the weights file written at the end; null: output_dir/weights.safetensors
    "overwrite_export": False,  # replace a weights file another run did not write (a shipped one)
    # describe: the share of training items asked "What is there ?" instead (answered with every shape: long
    # answers); steps: `first` trains the attention objective on the first decoding step's row only, `all` on every
    # answer token's row, its history the rows before it (the decoding-time history of `decode: {scorer: stage}`)
    "data": {"batch_size": 16, "num_workers": 0, "describe": 0.0, "steps": "first"},
    "optim": {"lr": 1e-3, "weight_decay": 0.01, "warmup_steps": 100, "max_steps": 1500},
    "checkpoint_every": 250,
    "val": {"every": 250, "items": 200},
    "logging": {"wandb": True, "project": "tokenprune-operators", "offline": True, "every": 10},
    "accelerator": "auto",
}

#: The losses of the learned operators, by their ``objective``.
OBJECTIVES = ("answer", "attention")


def _schema() -> dict[str, Any]:
    step = Int(0)
    return {
        "pipeline": Str(), "overrides": ListOf(Str()), "operator": Optional(Str()),
        "model": {"path": Str(), "dtype": Str(DTYPES), "attn_implementation": Str(ATTENTION),
                  "trust_remote_code": Bool()},
        "seed": Int(0, 2**32 - 1), "output_dir": Str(), "export": Optional(Str()), "overwrite_export": Bool(),
        "data": {"batch_size": Int(1), "num_workers": Int(0), "describe": Float(0, 1), "steps": Str(("first", "all"))},
        "optim": {"lr": Float(above=0), "weight_decay": Float(minimum=0), "warmup_steps": step, "max_steps": Int(1)},
        "checkpoint_every": Int(1),
        "val": {"every": step, "items": Int(1)},
        "logging": {"wandb": Bool(), "project": Str(), "offline": Bool(), "every": Int(1)},
        "accelerator": Str(("auto", "cpu", "gpu", "cuda", "mps")),
    }


def load_config(path: str | Path | None, overrides: list[str] = (), trained: bool = False) -> DictConfig:
    """The training config: defaults, the YAML file (read strictly), then ``KEY=VALUE`` overrides; every key typed
    and checked, the pipeline built and its learned operator found, and the output paths checked — all before any
    model loads. ``trained``: the config of weights already trained (``--evaluate``): its export is read, not
    written."""
    raw: Any = {}
    if path is not None:
        raw = read_yaml(path, "operator training config")
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise ConfigError(None, f"operator training config {path}: must be a mapping of keys, got {given(raw)}")
    refuse_interpolation(raw, what="an operator training config")
    try:
        cfg = OmegaConf.merge(OmegaConf.create(DEFAULTS), OmegaConf.create(raw))
    except Exception as e:  # noqa: BLE001 - a section given as a value; OmegaConf names the key
        raise ConfigError(getattr(e, "full_key", None) or None, f"operator training config: {str(e).splitlines()[0]}") \
            from None
    apply_overrides(cfg, overrides, example="optim.max_steps=100", what="an operator training config")
    cfg = OmegaConf.create(check_schema(OmegaConf.to_container(cfg), _schema()))
    OmegaConf.set_struct(cfg, True)
    _, op = build_trainee(cfg)  # the pipeline and its operator are valid
    if cfg.data.steps != "first" and op.objective != "attention":
        raise ConfigError("data.steps", f"{cfg.data.steps!r} trains on every decoding step's attention, the attention "
                                        f"objective's; {op.op_name!r} trains on the {op.objective!r} objective: use first")
    if trained:
        return cfg
    writable_folder(Path(cfg.output_dir), "output_dir")
    export = export_path(cfg)
    writable_file(export, "export")
    if export.exists() and not cfg.overwrite_export and _written_by(export) != str(Path(cfg.output_dir).resolve()):
        raise ConfigError("export", f"{export} already exists; set overwrite_export=true to replace it, or choose "
                                    "another export")
    check_resume(cfg)
    return cfg


def export_path(cfg: DictConfig) -> Path:
    return Path(cfg.export) if cfg.export else Path(cfg.output_dir) / "weights.safetensors"


def _written_by(path: Path) -> str | None:
    try:
        return json.loads(read_metadata(path, "export").get(META_TRAINING, "{}")).get("output_dir")
    except (ConfigError, ValueError):
        return None


def build_trainee(cfg: DictConfig):
    """(pipeline, operator): the pipeline of ``cfg`` built with the operator to train started afresh (no weights
    file), and that operator."""
    pcfg = apply_overrides(load_source(cfg.pipeline), list(cfg.overrides))
    keys = [f"stages.{i}.operators.{j}" for i, stage in enumerate(pcfg.get("stages") or [])
            for j, spec in enumerate(stage.get("operators") or [])
            if getattr(get_operator_class(spec.get("op"), f"stages.{i}.operators.{j}.op"), "learned", False)]
    if not keys:
        raise ConfigError("pipeline", f"{cfg.pipeline!r} has no learned operator to train")
    key = cfg.operator or keys[0]
    if cfg.operator is None and len(keys) > 1:
        raise ConfigError("operator", f"{cfg.pipeline!r} has {len(keys)} learned operators; name one: {', '.join(keys)}")
    if key not in keys:
        raise ConfigError("operator", f"got {key!r}; the learned operators of {cfg.pipeline!r}: {', '.join(keys)}")
    for k in (f"{key}.weights", f"{key}.sha256"):  # trained from its initialisation
        OmegaConf.update(pcfg, k, "", force_add=True)
    pipe = build_pipeline(pcfg, [Path(cfg.pipeline).parent] if Path(cfg.pipeline).is_file() else [])
    op = next(o for o in learned_operators(pipe.stages) if o.config_key == key)
    if op.objective not in OBJECTIVES:
        raise ConfigError("operator", f"{key} ({op.op_name}) trains on objective {op.objective!r}, which "
                                      f"train-operator does not have; it has: {', '.join(OBJECTIVES)}")
    return pipe, op


class AnswerStream(torch.utils.data.IterableDataset):
    """Endless batches of ``shapes`` train items (seed ``seed``), from batch ``start`` on (resuming): the prompts
    through the model's processor (left-padded) and each answer's token ids."""

    def __init__(self, processor, seed: int, batch_size: int, start: int = 0, full: bool = False,
                 describe: float = 0.0):
        self.processor, self.seed, self.batch_size, self.start = processor, seed, batch_size, start
        self.full = full  # prompt + answer in one sequence (the attention objective), not the prompt alone
        self.describe = describe  # the share of items described instead (every round(1 / describe)-th)

    def __iter__(self):
        every = round(1 / self.describe) if self.describe else 0
        for b, items in train_batches(self.seed, self.batch_size, self.start):
            if every:
                items = [describe(it) if (b * self.batch_size + j) % every == 0 else it for j, it in enumerate(items)]
            yield encode_answers(self.processor, items, full=self.full)


def encode_answers(processor, items: list[dict], full: bool = False) -> dict[str, torch.Tensor]:
    """The processor's inputs for the items' prompts (left-padded) and ``answer_ids`` (B, T) the answers' tokens
    (right-padded with -100): the tokens that extend each prompt to prompt + answer, then the end-of-sequence token
    (the model must stop after the answer). ``full``: the inputs are prompt + answer (left-padded), ``answer_ids``
    without the end token, and ``prompt_end`` (B,) is where each answer starts."""
    tok = processor.tokenizer
    tok.padding_side = "left"
    prompts = [build_prompt(processor, it["question"]) for it in items]
    texts = [p + it["answer"] for p, it in zip(prompts, items)] if full else prompts
    enc = dict(processor(images=[[it["image"]] for it in items], text=texts, return_tensors="pt", padding=True))
    answers = []
    for p, it in zip(prompts, items):
        ids = tok(p + it["answer"], add_special_tokens=False)["input_ids"]
        head = tok(p, add_special_tokens=False)["input_ids"]
        if ids[:len(head)] != head or len(ids) == len(head):
            raise ValueError(f"the answer {it['answer']!r} does not extend the prompt's tokens")
        # the end of the answer too: a model that does not stop after it answers wrongly under exact match
        answers.append(ids[len(head):] + ([tok.eos_token_id] if tok.eos_token_id is not None and not full else []))
    width = max(len(a) for a in answers)
    enc["answer_ids"] = torch.tensor([a + [-100] * (width - len(a)) for a in answers])
    if full:
        enc["prompt_end"] = torch.tensor([enc["input_ids"].shape[1] - len(a) for a in answers])
    return enc


def answer_loss(model, pipeline, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens, the prompt prefilled with ``pipeline`` attached (it prunes there,
    from the prompt alone) and the answer's later tokens decoded on the pruned cache in one forward."""
    answers = batch["answer_ids"]
    inputs = {k: v for k, v in batch.items() if k != "answer_ids"}
    longer = answers.shape[1] > 1
    with pipeline.attach(model):
        out = model(**inputs, use_cache=longer, logits_to_keep=1)
        logits = [out.logits[:, -1]]
        if longer:  # the answer's tokens but the last, after the prompt, on the cache the prefill left
            feed = answers[:, :-1].clamp(min=0)
            mask = torch.cat([inputs["attention_mask"], (answers[:, :-1] >= 0).long()], 1)
            cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
            more = model(input_ids=feed, attention_mask=mask, use_cache=True, **{_cache_keyword(model): cache})
            logits.append(more.logits)
    logits = torch.cat([lg.reshape(answers.shape[0], -1, lg.shape[-1]) for lg in logits], 1)
    return F.cross_entropy(logits.float().flatten(0, 1), answers.flatten(), ignore_index=-100)


def attention_examples(model, batch: dict[str, torch.Tensor], history: int,
                       steps: bool = False) -> list[dict[str, torch.Tensor]]:
    """Per sample of a ``full`` batch (:func:`encode_answers`): the frozen model's own attention (eager, every layer)
    as AttentionPredictor sees it at the end of the prefill — ``history`` (L·H, T, N) the last ``T`` prompt rows over
    the sample's ``N`` prompt entries, ``target`` (L·H, N) the first answer token's row over them (renormalised),
    ``visual`` (N,) the image's entries. ``steps``: one example per answer token instead — decoding step ``s``'s row
    as the target, the ``T`` rows before it (the prompt's last, then the answer's tokens before) as the history, each
    renormalised over the prompt entries as the runtime's history is (``step`` says which)."""
    inputs = {k: v for k, v in batch.items() if k not in ("answer_ids", "prompt_end")}
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    if attentions is None or any(a is None for a in attentions):
        raise ConfigError("model.attn_implementation", "the attention objective reads the model's attention "
                                                       "weights: use eager")
    image = model.config.image_token_id
    out = []
    for b, end in enumerate(batch["prompt_end"].tolist()):
        start = int(inputs["attention_mask"][b].float().argmax())  # the first real token (left padding)
        per_layer = [a[b, :, :, start:end] for a in attentions]  # (H, L_all, N)
        visual = inputs["input_ids"][b, start:end] == image
        for s in range(int((batch["answer_ids"][b] >= 0).sum()) if steps else 1):
            row = end + s  # the row of decoding step s + 1 (its token: the answer's s-th)
            rows = torch.arange(max(start, row - history), row)
            hist = torch.cat([a[:, rows] for a in per_layer]).float()
            target = torch.cat([a[:, row] for a in per_layer]).float()
            out.append({"history": hist / hist.sum(-1, keepdim=True).clamp_min(1e-12),
                        "target": target / target.sum(-1, keepdim=True).clamp_min(1e-12),
                        "visual": visual, "layers": len(per_layer), "step": s + 1})
    return out


def attention_loss(op, examples: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Mean cross-entropy of the predicted next-step attention against the observed one, both as distributions over
    the visual entries (pooled runs that hold one: the observed mass summed over the run, the prediction a softmax
    of the network's logits): the cache chooses among its visual entries — the text stays — so the prediction is
    trained to rank those, not to place the mass the first token and the text take. The network reads the whole
    history."""
    dev = next(op.network.parameters()).device
    block = op.params.block
    losses = []
    for ex in examples:
        logits = op.network(max_pool_entries(ex["history"].to(dev), block))
        pad = (-ex["target"].shape[-1]) % block
        target = F.pad(ex["target"].to(dev), (0, pad)).unflatten(-1, (-1, block)).sum(-1)
        visual = F.pad(ex["visual"].to(dev), (0, pad)).unflatten(-1, (-1, block)).any(-1)
        target = target[:, visual]
        target = target / target.sum(-1, keepdim=True).clamp_min(1e-12)
        losses.append(-(target * torch.log_softmax(logits[:, visual], -1)).sum(-1).mean())
    return torch.stack(losses).mean()


def hit_rates(op, examples: list[dict[str, torch.Tensor]], keep: float = 0.25) -> dict[str, float]:
    """How many of the ``keep`` share of visual entries the next step attends to most (its head-averaged attention,
    per layer) each prediction's top entries hold, averaged: the predictor's, the last prompt row's (the attention
    FastV and H2O rank by) and the mean over the history window (SnapKV's observation window)."""
    with torch.no_grad():
        hits: dict[str, list[float]] = {"predictor": [], "last_row": [], "window_mean": []}
        for ex in examples:
            vis, per = ex["visual"], ex["target"].shape[0] // ex["layers"]  # rows: layers x heads
            k = resolve_keep(keep, int(vis.sum()))
            group = lambda t, per=per: t.view(-1, per, t.shape[-1]).mean(1)  # noqa: E731 - (L, N) head means
            truth = group(ex["target"])
            guesses = {"predictor": group(op.predict_rows(ex["history"]).cpu()),
                       "last_row": group(ex["history"][:, -1]), "window_mean": group(ex["history"].mean(1))}
            true_top = truth[:, vis].topk(k, -1).indices
            for name, g in guesses.items():
                top = g[:, vis].topk(k, -1).indices
                same = (top[:, :, None] == true_top[:, None, :]).any(-1).float().mean(-1)  # per layer
                hits[name].extend(same.tolist())
    return {name: sum(v) / len(v) for name, v in hits.items()}


def _cache_keyword(model) -> str:
    """The forward's name for the KV cache: ``cache`` from transformers 5.24 on, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def pipeline_accuracy(model, processor, pipeline, items: list[dict], batch_size: int = 16) -> dict:
    """Greedy answers (three new tokens, as the shipped run configs) through ``generate()`` with ``pipeline``
    attached, scored as ``tokenprune run`` scores them: the whole answer must match (a model that does not stop
    after the right word is wrong). ``{"overall", "per_type"}``."""
    preds: list[str] = []
    tok = processor.tokenizer
    tok.padding_side = "left"
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        enc = processor(images=[[it["image"]] for it in chunk], text=[build_prompt(processor, it["question"])
                                                                    for it in chunk], return_tensors="pt", padding=True)
        enc = {k: v.to(model.device) for k, v in enc.items()}
        with torch.no_grad(), pipeline.attach(model):
            out = model.generate(**enc, max_new_tokens=3, do_sample=False)
        preds += tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    hits: dict[str, list[float]] = {}
    for pred, it in zip(preds, items):
        hits.setdefault(it["type"], []).append(item_score(pred, {**it, "metric": "exact_match"}))
    return {"overall": sum(sum(h) for h in hits.values()) / len(items),
            "per_type": {t: sum(h) / len(h) for t, h in sorted(hits.items())}}


def validate(cfg: DictConfig, model, processor, pipeline, op, items: list[dict]) -> dict[str, float]:
    """The validation metrics of the operator's objective: ``answer`` — the pipeline's accuracy (overall and per
    question type); ``attention`` — the hit rates (:func:`hit_rates`) on the items' attention."""
    if op.objective == "attention":
        examples = []
        for i in range(0, len(items), cfg.data.batch_size):
            batch = encode_answers(processor, items[i:i + cfg.data.batch_size], full=True)
            examples += attention_examples(model, {k: v.to(model.device) for k, v in batch.items()},
                                           op.params.history)
        rates = hit_rates(op, examples)
        return {"hit_rate": rates["predictor"], "hit_rate_last_row": rates["last_row"],
                "hit_rate_window_mean": rates["window_mean"]}
    acc = pipeline_accuracy(model, processor, pipeline, items)
    return {"accuracy": acc["overall"], **acc["per_type"]}


def decoding_hit_rates(cfg: DictConfig, model, processor, op, items: list[dict]) -> dict[str, float]:
    """The hit rates (:func:`hit_rates`) at every decoding step after the first, on long answers: each item's image
    described ("What is there ?" answered with every shape), the history at step s the rows before it — the prompt's
    last and the answer's own — as the runtime keeps it for ``decode: {scorer: stage}``; the last row is then the
    previous step's. Also how many (item, step) pairs were scored."""
    examples = []
    described = [describe(it) for it in items]
    for i in range(0, len(described), cfg.data.batch_size):
        batch = encode_answers(processor, described[i:i + cfg.data.batch_size], full=True)
        examples += [ex for ex in attention_examples(model, {k: v.to(model.device) for k, v in batch.items()},
                                                     op.params.history, steps=True) if ex["step"] > 1]
    rates = hit_rates(op, examples)
    return {"decode_hit_rate": rates["predictor"], "decode_hit_rate_previous_row": rates["last_row"],
            "decode_hit_rate_window_mean": rates["window_mean"], "decode_steps_scored": len(examples)}


def _lightning_module(cfg: DictConfig, model, processor, pipeline, op):
    import pytorch_lightning as pl

    class OperatorModule(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.pipeline = pipeline  # holds the operator's network: the only parameters trained and checkpointed
            self.__dict__["lvlm"] = model  # frozen, outside the module's parameters and checkpoints
            self.val_items = shapes.load_split("val", size=cfg.val["items"])

        def on_fit_start(self):
            self.lvlm.to(self.device)
            self.pipeline.train()  # Lightning keeps each module's mode: the operator must build its graph

        def training_step(self, batch, _):
            if op.objective == "attention":
                loss = attention_loss(op, attention_examples(self.lvlm, batch, op.params.history,
                                                             steps=cfg.data.steps == "all"))
            else:
                loss = answer_loss(self.lvlm, self.pipeline, batch)
            self.log("train/loss", loss, prog_bar=True)
            return loss

        def on_train_batch_end(self, outputs, batch, batch_idx):
            if cfg.val.every and self.global_step % cfg.val.every == 0:
                self._validate()

        def _validate(self):
            self.pipeline.eval()
            for name, value in validate(cfg, self.lvlm, processor, self.pipeline, op, self.val_items).items():
                self.log(f"val/{name}", value, prog_bar=name in ("accuracy", "hit_rate"))
            self.pipeline.train()

        def configure_optimizers(self):
            opt = torch.optim.AdamW(op.network.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.optim.warmup_steps, cfg.optim.max_steps))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return OperatorModule()


def train_operator(cfg: DictConfig) -> dict[str, Any]:
    """Train (or resume) the operator, write its weights file, and return ``{"export", "sha256", "steps", "val"}``
    (``val``: :func:`validate`'s metrics)."""
    import pytorch_lightning as pl

    pl.seed_everything(cfg.seed, workers=True)
    pipeline, op = build_trainee(cfg)
    model_cfg = OmegaConf.to_container(cfg.model)
    model, processor = load_model(model_cfg)
    model.requires_grad_(False)
    model.eval()
    op.bind(model.get_input_embeddings().embedding_dim, untrained=True, seed=None)  # drawn after seed_everything
    _, start = resume_point(Path(cfg.output_dir))
    stream = AnswerStream(processor, cfg.seed, cfg.data.batch_size, start, full=op.objective == "attention",
                          describe=cfg.data.describe)
    data = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.data.num_workers)
    module = _lightning_module(cfg, model, processor, pipeline, op)
    trainer = fit(cfg, module, data)
    pipeline.eval()
    model.to("cpu")
    op.network.to("cpu")
    export = export_path(cfg)
    files = model_files(model_path(model_cfg)) or {}
    identity = {"path": cfg.model.path, "config_sha256": files.get("config_sha256")}
    record = {"output_dir": str(Path(cfg.output_dir).resolve()), "steps": trainer.global_step, "seed": cfg.seed,
              "pipeline": cfg.pipeline, "overrides": list(cfg.overrides), "operator": op.config_key,
              "optim": OmegaConf.to_container(cfg.optim), "batch_size": cfg.data.batch_size}
    digest = op.save_weights(export, model=json.dumps(identity, sort_keys=True), training=record)
    val = validate(cfg, model, processor, pipeline, op, module.val_items)
    return {"export": str(export), "sha256": digest, "steps": trainer.global_step, "val": val}


def evaluate_operator(cfg: DictConfig, split: str = "test", items: int | None = None) -> dict[str, float]:
    """:func:`validate`'s metrics of the trained weights (``export``) on ``items`` of ``shapes`` split ``split``,
    without training: the numbers docs/results.md quotes."""
    export = export_path(cfg)
    if not export.is_file():
        raise ConfigError("export", f"{export} does not exist: train first (tokenprune train-operator without "
                                    "--evaluate)")
    pipeline, op = build_trainee(cfg)
    op.params.weights = str(export)
    op.init_learned()
    model, processor = load_model(OmegaConf.to_container(cfg.model))
    model.eval()
    op.bind(model.get_input_embeddings().embedding_dim, device=model.device)
    chosen = shapes.load_split(split, size=items)
    metrics = validate(cfg, model, processor, pipeline.eval(), op, chosen)
    if op.objective == "attention":  # and at the later decoding steps, where the history holds decoded rows
        metrics.update(decoding_hit_rates(cfg, model, processor, op, chosen))
    return metrics

