"""The lmms-eval model ``tokenprune``: a Hugging Face checkpoint with a tokenprune pipeline attached, evaluated
on any lmms-eval task (GQA, MMBench, MME, POPE, ScienceQA-IMG, TextVQA, VQAv2, ... or a local task)::

    lmms-eval --model tokenprune \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,pipeline=asap,overrides=stages.0.operators.1.keep=0.25 \\
        --tasks pope,gqa --batch_size 8

``--model_args`` (comma-separated ``KEY=VALUE``; see :data:`MODEL_ARGS`): ``pretrained`` a model id or folder
(``reference``: the shipped reference model), ``pipeline`` a preset name, a YAML path or ``none`` (unpruned),
``overrides`` the pipeline's ``KEY=VALUE`` overrides separated by ``;``, ``dtype``, ``attn_implementation``,
``device``, ``device_map``, ``trust_remote_code``, ``max_new_tokens`` (the default when a task sets none).

``generate_until`` is batched (requests grouped by generation settings, then by image count); ``loglikelihood`` runs
one request at a time: the pipeline prunes in the context's prefill, then the continuation is decoded (forced)
from the pruned cache, as it would be generated. Requests are built
with the processor's chat template, the images before the text, as ``tokenprune run`` builds them; lmms-eval's
``<image>`` placeholders in the context are dropped (the template places the images).

lmms-eval finds this class through the entry point in :mod:`tokenprune.eval.lmms_eval_entry`; the rest of
tokenprune never imports this module. See docs/lmms_eval.md.
"""

from __future__ import annotations

import contextlib
import gc
import json
from typing import Any

import torch
from lmms_eval.api.model import lmms

from tokenprune.core.errors import ConfigError
from tokenprune.core.values import Bool, Int, ListOf, OneOf, Optional, Str, check_schema
from tokenprune.eval import models
from tokenprune.eval.models import build_prompt
from tokenprune.eval.run_config import ATTENTION, DTYPES, resolve_pipeline_spec

IMAGE_PLACEHOLDER = "<image>"
#: The type of each model argument. lmms-eval has already turned ``true``/``false`` (any case) into booleans and
#: digits into integers, so ``trust_remote_code=no`` arrives as the string ``'no'`` and is refused.
MODEL_ARG_TYPES = {
    "pretrained": Str(), "pipeline": Str(), "overrides": OneOf(Str(), ListOf(Str())), "dtype": Optional(Str(DTYPES)),
    "attn_implementation": Str(ATTENTION), "device": Optional(Str()), "device_map": Optional(Str()),
    "batch_size": OneOf(Int(1), Str()), "max_batch_size": Optional(Int(1)), "trust_remote_code": Bool(),
    "max_new_tokens": Int(1),
}
MODEL_ARGS = tuple(MODEL_ARG_TYPES)


def check_model_args(args: dict[str, Any]) -> dict[str, Any]:
    """``args`` typed (:data:`MODEL_ARG_TYPES`); errors name ``model_args.KEY``. ``overrides`` may be empty."""
    args = {k: v for k, v in args.items() if not (k == "overrides" and v in ("", None))}
    if isinstance(args.get("pretrained"), int) and not isinstance(args["pretrained"], bool):
        args["pretrained"] = str(args["pretrained"])  # a folder named by digits
    out = check_schema(args, MODEL_ARG_TYPES, "model_args.")
    batch = out.get("batch_size", 1)
    if isinstance(batch, str) and not (batch.isdigit() and int(batch) >= 1):
        raise ConfigError("model_args.batch_size", f"must be a positive integer, got {batch!r}")
    return out


def split_overrides(overrides: str | list | tuple | None) -> list[str]:
    """The pipeline overrides of ``--model_args overrides=A=1;B=2`` (lmms-eval splits model_args on commas, so
    several overrides are separated by ``;``); a list is taken as it is."""
    if overrides is None or overrides == "":
        return []
    if isinstance(overrides, (list, tuple)):
        return [str(o) for o in overrides]
    parts = [p.strip() for p in str(overrides).split(";") if p.strip()]
    for p in parts:
        if "=" not in p:
            raise ConfigError("model_args.overrides", f"each override is KEY=VALUE (several separated by ';'); "
                                                      f"got {p!r}")
    return parts


class TokenPrune(lmms):
    """lmms-eval's interface (:class:`lmms_eval.api.model.lmms`) over a model with a tokenprune pipeline.

    ``pipeline`` (a :class:`tokenprune.pipeline.Pipeline` or None) may be swapped between evaluations; the model
    stays loaded (``tokenprune run`` with ``data.lmms_eval`` evaluates unpruned and pruned this way).
    """

    is_simple = True

    def __init__(self, pretrained: str = "reference", pipeline: str = "none", overrides: str = "",
                 dtype: str | None = None, attn_implementation: str = "sdpa", device: str | None = None,
                 device_map: str | None = None, batch_size: int | str = 1, max_batch_size: int | None = None,
                 trust_remote_code: bool = False, max_new_tokens: int = 128, **unknown: Any) -> None:
        super().__init__()
        given = dict(pretrained=pretrained, pipeline=pipeline, overrides=overrides, dtype=dtype,
                     attn_implementation=attn_implementation, device=device, device_map=device_map,
                     batch_size=batch_size, max_batch_size=max_batch_size, trust_remote_code=trust_remote_code,
                     max_new_tokens=max_new_tokens, **unknown)
        args = check_model_args(given)
        self.batch_size_per_gpu = int(args["batch_size"])
        cuda = torch.cuda.is_available()
        dtype = args["dtype"] or ("bfloat16" if cuda else "float32")
        self.pipeline = resolve_pipeline_spec(pipeline, split_overrides(overrides), key="model_args.pipeline")
        self.model_config = {"path": str(pretrained), "dtype": dtype, "attn_implementation": attn_implementation,
                             "device_map": device_map, "trust_remote_code": trust_remote_code}
        models.check_pipeline_for_model(models.read_model_config(self.model_config, key="model_args.pretrained"),
                                        self.pipeline, key="model_args.pipeline")
        try:
            self.model, self.processor = models.open_model(self.model_config)
        except ConfigError as e:
            raise ConfigError("model_args.pretrained", e.detail) from None
        if device_map is None:
            self.model.to(torch.device(device) if device else torch.device("cuda" if cuda else "cpu"))
        self.max_new_tokens = max_new_tokens
        self.keep_loaded = False  # True: lmms-eval's clean() after an evaluation keeps the model (run reuses it)

    # --- lmms-eval's interface ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def generate_until(self, requests) -> list[str]:
        """Generated text for each request (``args``: context, generation kwargs, doc_to_visual, doc_id, task,
        split), cut at the first ``until`` string; batched ``batch_size`` at a time among requests with the same
        generation settings (and, within a batch, the same number of images), in lmms-eval's order on return.
        Images are loaded one batch at a time."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        results: list[str | None] = [None] * len(requests)
        for indices in groups.values():
            gen_kwargs = dict(requests[indices[0]].args[1] or {})
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                prepared = {i: self._prepare(requests[i].args[0], requests[i].args[2], *requests[i].args[3:6])
                            for i in chunk}
                by_images: dict[int, list[int]] = {}
                for i in chunk:
                    by_images.setdefault(len(prepared[i][1]), []).append(i)
                for same in by_images.values():
                    for i, text in zip(same, self._generate([prepared[i] for i in same], gen_kwargs)):
                        results[i] = text
                        self.cache_hook.add_partial("generate_until", (requests[i].args[0], gen_kwargs), text)
        return results  # type: ignore[return-value]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(loss, whether greedy decoding gives the continuation) per request (``args``: context, continuation or
        doc_to_target, doc_to_visual, doc_id, task, split).

        The loss is lmms-eval's convention, not lm-eval's log-likelihood: the mean negative log-probability of the
        continuation's tokens, as every lmms-eval model returns it (the models' ``outputs.loss``); lmms-eval's
        multiple-choice scoring picks the choice with the *smallest* value (its api/task.py, argmin).

        The continuation is scored the way it would be generated: the pipeline prunes in the prefill of the
        context alone, then the continuation's tokens are decoded one by one with the pruned cache (``generate()``
        forced to emit them; the log-probabilities are read from its raw logits). Scoring context + continuation in
        one forward would let the continuation steer the pruning (FastV-style scorers rank the visual tokens by
        the last token's attention, which would be the answer being scored)."""
        from transformers import LogitsProcessorList

        out = []
        for req in requests:
            context, target, doc_to_visual, doc_id, task, split = req.args
            doc = self._doc(task, split, doc_id)
            continuation = target if isinstance(target, str) else target(doc)
            prompt, images = self._prepare(context, doc_to_visual, doc_id, task, split)
            enc = self._encode([prompt], [images])
            ids = self._encode([prompt + continuation], [images])["input_ids"][0]
            n = ids.shape[0] - enc["input_ids"].shape[1]
            if n < 1 or not torch.equal(ids[:-n], enc["input_ids"][0]):
                raise ValueError(f"task {task!r} doc {doc_id}: the continuation {continuation!r} does not extend the "
                                 "context's tokens (the tokenizer merges across the boundary)")
            cont = ids[-n:].to(self.device)
            with torch.no_grad(), self._attached():
                gen = self.model.generate(**self._to_device(enc), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                          num_beams=1, logits_processor=LogitsProcessorList([_Force(cont)]),
                                          output_logits=True, return_dict_in_generate=True)
            logits = torch.cat([step[:1].float() for step in gen.logits])  # (n, V), raw
            if logits.shape[0] != n:
                raise RuntimeError(f"task {task!r} doc {doc_id}: decoded {logits.shape[0]} of {n} continuation tokens")
            logprobs = torch.log_softmax(logits, dim=-1)
            loss = -float(logprobs.gather(-1, cont[:, None]).mean())
            greedy = bool((logits.argmax(-1) == cont).all())
            out.append(_loglikelihood_result(loss, greedy))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), (loss, greedy))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("the tokenprune model does not run multi-round generation tasks yet")

    def clean(self) -> None:
        """lmms-eval calls this after its requests: drops the model unless ``keep_loaded``."""
        if self.keep_loaded:

            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return
        super().clean()

    # --- helpers -------------------------------------------------------------------------------------
    def _doc(self, task: str, split: str, doc_id: int) -> dict:
        return self.task_dict[task][split][doc_id]

    def _prepare(self, context: str, doc_to_visual, doc_id: int, task: str, split: str) -> tuple[str, list]:
        """(prompt through the chat template, RGB images) of one request."""

        visuals = doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual is not None else []
        images = [v.convert("RGB") for v in (visuals or []) if v is not None]
        text = context.replace(IMAGE_PLACEHOLDER, "").strip()
        return build_prompt(self.processor, text, images=len(images)), images

    def _encode(self, prompts: list[str], images: list[list]) -> dict[str, torch.Tensor]:
        self.processor.tokenizer.padding_side = "left"
        if any(images):
            if self.pipeline is not None:
                images = self.pipeline.prepare_images(images)  # the downsampling baseline shows them smaller
            return dict(self.processor(images=images, text=prompts, return_tensors="pt", padding=True))
        return dict(self.processor(text=prompts, return_tensors="pt", padding=True))

    def _to_device(self, enc: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dtype = next(self.model.parameters()).dtype
        return {k: v.to(self.device, dtype=dtype) if v.is_floating_point() else v.to(self.device)
                for k, v in enc.items()}

    def _attached(self):

        return self.pipeline.attach(self.model, images_prepared=True) if self.pipeline is not None else \
            contextlib.nullcontext()

    def _generate(self, prepared: list[tuple[str, list]], gen_kwargs: dict) -> list[str]:
        until = gen_kwargs.get("until")
        until = [until] if isinstance(until, str) else list(until or [])
        new_tokens = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
        temperature = float(gen_kwargs.get("temperature") or 0)
        sample = bool(gen_kwargs.get("do_sample")) or temperature > 0
        options: dict[str, Any] = {"max_new_tokens": new_tokens, "do_sample": sample,
                                   "num_beams": int(gen_kwargs.get("num_beams") or 1)}
        if sample:
            options["temperature"] = temperature or 1.0
            if gen_kwargs.get("top_p") is not None:
                options["top_p"] = float(gen_kwargs["top_p"])
        enc = self._to_device(self._encode([p for p, _ in prepared], [im for _, im in prepared]))
        with torch.no_grad(), self._attached():
            out = self.model.generate(**enc, **options)
        texts = self.processor.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return [_cut(t, until).strip() for t in texts]


class LoglikelihoodResult(str):
    """A (loss, is_greedy) pair that lmms-eval 0.7.3's evaluator keeps intact.

    That version passes every response through ``unwrap_generation_output``, which turns anything that is not a
    string (the (float, bool) tuples every ``loglikelihood`` returns) into its ``str()``; its multiple-choice
    scoring then unpacks the string and fails. A ``str`` is passed through unchanged, so the pair travels as a
    ``str`` (its text is the tuple's, as lmms-eval would log it) that unpacks, indexes and compares as the tuple,
    and survives the CLI's reasoning-tag stripping (which finds no tag in it and returns ``.strip()``).
    Used only where that lmms-eval stringifies tuples (:func:`_loglikelihood_result`).
    """

    def __new__(cls, loss: float, greedy: bool):
        obj = super().__new__(cls, str((loss, greedy)))
        obj.pair = (loss, greedy)
        return obj

    def __iter__(self):
        return iter(self.pair)

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i):
        return self.pair[i]

    def __eq__(self, other) -> bool:
        return self.pair == tuple(other) if isinstance(other, (tuple, LoglikelihoodResult)) else NotImplemented

    __hash__ = str.__hash__

    def strip(self, chars=None):  # the CLI's reasoning-tag stripping ends with .strip(); the text has no padding
        return self


def _stringifies_tuples() -> bool:
    try:
        from lmms_eval.api.instance import unwrap_generation_output
    except ImportError:  # older lmms-eval: responses are kept as returned
        return False
    return isinstance(unwrap_generation_output((0.0, True))[0], str)


_WRAP_PAIRS = _stringifies_tuples()


def _loglikelihood_result(loss: float, greedy: bool):
    return LoglikelihoodResult(loss, greedy) if _WRAP_PAIRS else (loss, greedy)


class _Force:
    """A logits processor that makes ``generate()`` emit ``tokens`` (one per step), whatever the model prefers."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = min(self._step(input_ids), self.tokens.shape[0] - 1)
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.tokens[step]] = 0.0
        return forced

    def _step(self, input_ids: torch.Tensor) -> int:
        if not hasattr(self, "_start"):
            self._start = input_ids.shape[1]
        return input_ids.shape[1] - self._start


def _cut(text: str, until: list[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text
