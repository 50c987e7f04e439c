"""Train the reference LVLM on the ``shapes`` benchmark with PyTorch Lightning.

``tokenprune train-reference experiments/train_reference.yaml [KEY=VALUE ...]``: seeded, W&B
logging (offline unless the config says otherwise), a checkpoint every ``checkpoint_every`` steps
and at the end (``output_dir/checkpoints/last.ckpt``), resumable (running the same command again
continues from the last checkpoint, the data stream included), and at the end the model and
processor are exported as a standard folder (``export_dir``) that the Auto classes load offline.
Uses a GPU when one is available (``accelerator: auto``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from tokenprune.adapters import get_adapter
from tokenprune.adapters.base import expand_placeholder, layer_hidden
from tokenprune.adapters.qwen2_vl import video_pixels
from tokenprune.core.config import apply_overrides
from tokenprune.core.errors import ConfigError
from tokenprune.core.paths import writable_folder
from tokenprune.core.values import Bool, Fields, Float, Int, ListOf, Optional, Str, check_schema, given
from tokenprune.core.yaml_files import read_yaml, refuse_interpolation
from tokenprune.reference import model as llava_reference
from tokenprune.reference import qwen as qwen_reference
from tokenprune.reference import shapes, shapes_video
from tokenprune.reference.model import ReferenceSize, prompt

DEFAULTS = {
    # the architecture: "llava" (LLaVA-1.5 geometry, the default reference) or "qwen2_5_vl" (tokenprune/reference/qwen.py)
    "family": "llava",
    # what it trains on: "shapes" (images) or "shapes_video" (clips, tokenprune/reference/shapes_video.py; the Qwen
    # family, whose tower takes videos: the answers' loss and, optionally, the attention hints; the image-only signals
    # below off)
    "benchmark": "shapes",
    # null: random weights of `model`'s size; a folder (or `reference`, `reference-qwen`: a shipped reference) of the
    # same family and size to start from — fine-tuning. A video run's vocabulary adds the clips' words: their
    # embedding rows start at the mean of the image words' rows (every image word keeps its id and its rows).
    "init_from": None,
    "seed": 0,
    "output_dir": "runs/train_reference",
    "export_dir": None,  # null: output_dir/model
    "model": {f: getattr(ReferenceSize(), f) for f in ReferenceSize.__dataclass_fields__},
    "data": {"batch_size": 16, "num_workers": 1},
    "optim": {"lr": 1e-3, "vision_lr": None, "weight_decay": 0.01, "warmup_steps": 200, "max_steps": 6000},
    # Shape-size curriculum: batches before step `until` draw shapes of `sizes` px (then the benchmark's 20-60).
    # Small shapes are a needle among 576 patches; starting large teaches the model where to look.
    "curriculum": [],
    # Dense auxiliary loss on the projector's output, the visual tokens the LLM reads: per patch the colour and
    # kind of the shape covering it, whether it holds a shape's centre, and that centre's (x, y). It stands in
    # for the pretrained CLIP tower a real LLaVA starts from; the head is dropped at export. 0: off.
    "aux_weight": 0.0,
    # First steps train only the vision tower, projector and auxiliary head on the patch loss (no LLM
    # forward, ~5x faster): a tower from scratch needs ~1000 steps before it tells shape kinds apart.
    "vision_warmup_steps": 0,
    # From step `from_step`, a `share` of the training samples ask "What is there ?" and are answered with a
    # description of every shape ("red circle top left , blue square bottom right ."): many supervised tokens
    # per image that make the LLM read the visual tokens (LLaVA's captioning stage plays this part). The images
    # are those the samples would have had, so the tower's warm-up is unchanged. Training only.
    "describe": {"share": 0.0, "from_step": 0},
    # From step `from_step`, pull each shape patch's visual token towards the LLM's own embeddings of its colour
    # and kind words (cosine, targets detached): LLaVA's alignment stage in one loss, so the word "triangle" in
    # a question and the patches of a triangle look alike to the LLM and attention can find them. 0: off.
    # `patches`: "shape" aligns every patch of a shape, "center" only the patch holding its centre.
    "align": {"weight": 0.0, "from_step": 0, "patches": "shape"},
    # From step `from_step`, every non-description sample also asks up to `turns - 1` more questions about the
    # same image (one of each other type, as later chat turns): the 576 image tokens dominate a step's cost,
    # so extra questions add supervision almost for free. 1: off.
    "multi_turn": {"turns": 1, "from_step": 0},
    # From step `from_step`, supervise two attention hops at every position that predicts an answer (the last
    # prompt token of each turn): in layer `gather_layer` each of the first `heads` heads attends to the colour
    # and kind words of one shape the question names (head h: the (h % 2)-th name), in layer `retrieve_layer` to
    # the patches of the shapes matching that name, or with `absent: first_token` to the first token when none
    # does; the loss is -log(attention mass on those targets). Without it the LLM sat at the answer priors for
    # thousands of steps: neither hop gets a gradient until the other works (docs/reference_model.md). 0: off.
    # `gather: mass` rewards the total attention on the name's words (a head may put it all on the kind word and
    # drop the colour); `gather: split` asks for an equal share on each word (-mean of log attention per word).
    # `retrieve: shape` targets every patch the matching shapes cover, `retrieve: center` only the patch holding
    # each one's centre (the token `align` and `position_probe` with `patches: center` supervise).
    "attention_hints": {"weight": 0.0, "from_step": 0, "heads": 1, "gather_layer": 0, "retrieve_layer": 1,
                        "absent": "none", "gather": "mass", "retrieve": "shape"},
    # From step `from_step`, a linear head reads the hidden state of each shape's centre token at the input of LLM
    # layer `layer` and predicts that shape's centre (x, y) (squared error, as the patch loss's position term): the
    # LLM's first layers must write where a visual token is into it, from its M-RoPE position, since a rotary-only
    # tower (Qwen's) cannot; the patch loss then asks the tower for no position. Dropped at export. 0: off.
    "position_probe": {"weight": 0.0, "from_step": 0, "layer": 2, "patches": "center"},
    # From step `from_step`, a linear head reads the hidden state entering LLM layer `layer` at each row that predicts
    # an answer (the attention hints' rows: needs attention_hints.weight > 0) and predicts the centre (x, y) of each
    # shape the question names — the mean centre of the shapes matching the name, slots as the hints' (squared
    # error, as the probe's): the state the retrieval left must say where the named shapes are, so the layers after
    # it only compare. Dropped at export. 0: off.
    "answer_probe": {"weight": 0.0, "from_step": 0, "layer": 3},
    "checkpoint_every": 500,
    "val": {"every": 500, "items": 200},
    "logging": {"wandb": True, "project": "tokenprune-reference", "offline": True, "every": 10},
    "accelerator": "auto",
    "overwrite_export": False,  # replace a model already in export_dir (outside output_dir)
}


def _schema() -> dict[str, Any]:
    """Every key of the training config, typed (:mod:`tokenprune.core.values`)."""
    step, weight = Int(0), Float(minimum=0)
    return {
        "family": Str(tuple(FAMILIES)), "benchmark": Str(BENCHMARKS), "init_from": Optional(Str()),
        "seed": Int(0, 2**32 - 1), "output_dir": Str(), "export_dir": Optional(Str()),
        "model": {f: Int(1) for f in ReferenceSize.__dataclass_fields__},
        "data": {"batch_size": Int(1), "num_workers": Int(0)},
        "optim": {"lr": Float(above=0), "vision_lr": Optional(Float(above=0)), "weight_decay": weight,
                  "warmup_steps": step, "max_steps": Int(1)},
        "curriculum": ListOf(Fields({"until": step, "sizes": ListOf(Int(1))}, required=("until", "sizes"))),
        "aux_weight": weight, "vision_warmup_steps": step,
        "describe": {"share": Float(0, 1), "from_step": step},
        "align": {"weight": weight, "from_step": step, "patches": Str(("shape", "center"))},
        "multi_turn": {"turns": Int(1), "from_step": step},
        "attention_hints": {"weight": weight, "from_step": step, "heads": Int(1), "gather_layer": Int(0),
                            "retrieve_layer": Int(0), "absent": Str(HINT_ABSENT), "gather": Str(HINT_GATHER),
                            "retrieve": Str(HINT_RETRIEVE)},
        "position_probe": {"weight": weight, "from_step": step, "layer": Int(0), "patches": Str(("center", "shape"))},
        "answer_probe": {"weight": weight, "from_step": step, "layer": Int(0)},
        "checkpoint_every": Int(1),
        "val": {"every": step, "items": Int(1)},
        "logging": {"wandb": Bool(), "project": Str(), "offline": Bool(), "every": Int(1)},
        "accelerator": Str(("auto", "cpu", "gpu", "cuda", "mps")),
        "overwrite_export": Bool(),
    }


def load_config(path: str | Path | None, overrides: list[str] = ()) -> DictConfig:
    """The training config: defaults, then the YAML file (read strictly), then ``KEY=VALUE`` overrides; every
    key typed and checked (unknown keys, a quoted ``'false'``, a resolver are errors naming the key), and the
    output folders checked before anything is built."""

    schema = _schema()
    raw: Any = {}
    if path is not None:
        raw = read_yaml(path, "training config")
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(None, f"training config {path}: must be a mapping of keys, got {given(raw)}")
    refuse_interpolation(raw, what="a training config")
    try:
        cfg = OmegaConf.merge(OmegaConf.create(DEFAULTS), OmegaConf.create(raw))
    except Exception as e:  # noqa: BLE001 - a section given as a value (optim: 3), say; OmegaConf names the key
        raise ConfigError(getattr(e, "full_key", None) or None, f"training config: {str(e).splitlines()[0]}") \
            from None
    apply_overrides(cfg, overrides, example="optim.max_steps=100", what="a training config")
    cfg = OmegaConf.create(check_schema(OmegaConf.to_container(cfg), schema))
    OmegaConf.set_struct(cfg, True)
    for i, c in enumerate(cfg.curriculum):
        if len(c.sizes) != 2 or c.sizes[0] > c.sizes[1]:
            raise ConfigError(f"curriculum.{i}.sizes", f"must be [MIN, MAX] shape sizes in px, got "
                                                       f"{OmegaConf.to_container(c.sizes)}")
    if cfg.vision_warmup_steps and not cfg.aux_weight:
        raise ConfigError("vision_warmup_steps", f"trains on the auxiliary patch loss only, so it needs aux_weight > 0 "
                          f"(got vision_warmup_steps={cfg.vision_warmup_steps}, aux_weight={cfg.aux_weight})")
    _check_outputs(cfg)
    check_resume(cfg)
    if cfg.benchmark == "shapes_video":
        _check_video(cfg)
    if cfg.init_from is not None:
        init_folder(cfg)
    probe = cfg.position_probe
    if probe.weight and not 0 <= probe.layer < cfg.model.text_layers:
        raise ConfigError("position_probe.layer", f"must be a layer of the LLM, 0..{cfg.model.text_layers - 1}; "
                                                  f"got {probe.layer}")
    if probe.weight and not cfg.aux_weight:
        raise ConfigError("position_probe.weight", "reads the patch loss's labels, so it needs aux_weight > 0 "
                                                   f"(got position_probe.weight={probe.weight}, aux_weight=0)")
    answer = cfg.answer_probe
    if answer.weight and not 0 <= answer.layer < cfg.model.text_layers:
        raise ConfigError("answer_probe.layer", f"must be a layer of the LLM, 0..{cfg.model.text_layers - 1}; "
                                                f"got {answer.layer}")
    if answer.weight and not cfg.attention_hints.weight:
        raise ConfigError("answer_probe.weight", "reads the rows the attention hints mark, so it needs "
                                                 f"attention_hints.weight > 0 (got answer_probe.weight={answer.weight}, "
                                                 "attention_hints.weight=0)")
    hints = cfg.attention_hints
    if hints.weight:
        layers = cfg.model.text_layers
        for key in ("gather_layer", "retrieve_layer"):
            if not 0 <= hints[key] < layers:
                raise ConfigError(f"attention_hints.{key}", f"must be a layer of the LLM, 0..{layers - 1}; got {hints[key]}")
        if hints.gather_layer >= hints.retrieve_layer:
            raise ConfigError("attention_hints.retrieve_layer", f"must come after gather_layer={hints.gather_layer} "
                              f"(the question is gathered first, then the image is read); got {hints.retrieve_layer}")
        if not 1 <= hints.heads <= cfg.model.text_heads:
            raise ConfigError("attention_hints.heads", f"must be 1..{cfg.model.text_heads} (model.text_heads); "
                              f"got {hints.heads}")
    return cfg


BENCHMARKS = ("shapes", "shapes_video")

#: The training signals that read a ``shapes`` image's labels (its shapes, their patches, its questions' names): off
#: on ``shapes_video``, which trains on the answers' loss and, optionally, the attention hints (on the clip's events).
IMAGE_SIGNALS = ("aux_weight", "vision_warmup_steps", "describe.share", "align.weight", "position_probe.weight",
                 "answer_probe.weight")


def _check_video(cfg: DictConfig) -> None:
    """``benchmark: shapes_video`` trains a family whose reference takes clips, on the answers (and the hints)."""
    if not FAMILIES[cfg.family].videos:
        raise ConfigError("benchmark", f"shapes_video trains a family whose reference takes videos "
                                       f"({', '.join(f.name for f in FAMILIES.values() if f.videos)}); "
                                       f"family is {cfg.family!r}")
    off = {**{key: 0 for key in IMAGE_SIGNALS}, "multi_turn.turns": 1, "curriculum": []}
    for key, allowed in off.items():
        value = OmegaConf.select(cfg, key)
        value = OmegaConf.to_container(value) if key == "curriculum" else value
        if value != allowed:
            raise ConfigError(key, f"is a shapes image training signal; benchmark shapes_video trains on the answers "
                                   f"and the attention hints (got {value!r}; allowed: {allowed!r})")
    if cfg.attention_hints.weight and cfg.attention_hints.retrieve != "center":
        raise ConfigError("attention_hints.retrieve", f"on clips the hints retrieve each shape's centre in every frame: "
                                                      f"'center' (got {cfg.attention_hints.retrieve!r})")


def init_folder(cfg: DictConfig) -> Path:
    """The folder ``init_from`` names (``reference``, ``reference-qwen``: the shipped ones), checked: it holds a model
    of the config's family (its config.json's ``model_type``)."""
    try:
        folder = Path(qwen_reference.SHIPPED[cfg.init_from]() if cfg.init_from in qwen_reference.SHIPPED
                      else cfg.init_from)
    except FileNotFoundError as e:
        raise ConfigError("init_from", str(e)) from None
    try:
        config = json.loads((folder / "config.json").read_text())
    except OSError:
        raise ConfigError("init_from", f"{cfg.init_from!r}: no model folder there ({folder / 'config.json'} is "
                                       "missing); give a folder a training run exported, or reference / "
                                       "reference-qwen") from None
    except ValueError as e:
        raise ConfigError("init_from", f"{folder / 'config.json'} is not JSON: {e}") from None
    family = FAMILIES[cfg.family]
    if config.get("model_type") != family.model_type:
        raise ConfigError("init_from", f"{cfg.init_from!r} holds a {config.get('model_type')!r} model; family "
                                       f"{cfg.family!r} starts from a {family.model_type!r} one")
    for key, value in family.size_of(config).items():
        if value != cfg.model[key]:
            raise ConfigError(f"model.{key}", f"init_from {cfg.init_from!r} is a model of {key}={value}; this config "
                                              f"gives {cfg.model[key]} (a fine-tune keeps the checkpoint's sizes)")
    return folder


def start_weights(model, folder: Path) -> None:
    """Load the weights of the model in ``folder`` into ``model`` (a fresh one of the same family and size, whose
    vocabulary may extend the folder's): every tensor copied (read through the Auto class, which maps a saved
    folder's names onto the model's); the embedding and output rows of words the folder's
    model lacks start at the mean of its rows. A tensor of another shape (another ``model`` size) is one
    ConfigError naming it."""
    from transformers import AutoModelForImageTextToText

    try:
        given_ = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True).state_dict()
    except (OSError, ValueError) as e:
        raise ConfigError("init_from", f"{folder}: {str(e).splitlines()[0]}") from None
    mine = model.state_dict()
    grown = {model.get_input_embeddings().weight.data_ptr(), model.get_output_embeddings().weight.data_ptr()}
    missing = sorted(set(mine) - set(given_))
    if missing:
        raise ConfigError("init_from", f"{folder}'s weights lack {missing[0]} (and {len(missing) - 1} more): another "
                                       "architecture than this config's model")
    with torch.no_grad():
        for key, target in mine.items():
            source = given_[key].to(target.dtype)
            if source.shape == target.shape:
                target.copy_(source)
            elif target.data_ptr() in grown and source.shape[1:] == target.shape[1:] and len(source) < len(target):
                target[:len(source)] = source
                target[len(source):] = source.mean(dim=0)
            else:
                raise ConfigError("init_from", f"{folder}'s {key} is {tuple(source.shape)}, this config's model "
                                               f"{tuple(target.shape)}: the model.* sizes must be the checkpoint's")


#: Written into an export: the run (``output_dir``) that exported it, and its steps.
EXPORT_RECORD = "tokenprune_training.json"


def _exported_by(export: Path) -> str | None:
    try:
        return json.loads((export / EXPORT_RECORD).read_text()).get("output_dir")
    except (OSError, ValueError, AttributeError):
        return None


def _check_outputs(cfg: DictConfig) -> None:
    """``output_dir`` and ``export_dir`` writable folders, and an ``export_dir`` that already holds a model another
    run did not export (the shipped checkpoint, say) kept unless ``overwrite_export: true``: checked before hours of
    training. A run exports again into its own export (resuming a finished run)."""
    out = Path(cfg.output_dir)
    writable_folder(out, "output_dir")
    if cfg.export_dir is None:
        return
    export = Path(cfg.export_dir)
    writable_folder(export, "export_dir")
    if (export / "config.json").exists() and not cfg.overwrite_export and _exported_by(export) != str(out.resolve()):
        raise ConfigError("export_dir", f"{export} already holds a model; set overwrite_export=true to replace it, "
                                        "or choose another export_dir")


GRID = 24  # LLaVA reference: visual tokens (patches) per side (336 px / 14)


class Family:
    """What training needs to know of one reference architecture: its model and processor, its visual tokens
    (``grid`` × ``grid``, row-major, each covering ``shapes.SIZE / grid`` px), its chat turns and answer ends, and
    where its tower's output and parameters are."""

    name = "llava"
    model_type = "llava"
    grid = GRID
    size_class = ReferenceSize
    #: its reference takes clips (``benchmark: shapes_video``)
    videos = False
    #: the tower's tokens know where they are (LLaVA's position embeddings, 2-D sin-cos at init): the patch loss
    #: asks them for their shape's centre; a rotary-only tower (Qwen's) cannot know it (relative positions only)
    absolute_positions = True
    turn = " USER: {q} ASSISTANT:"  # a later turn of the conversation (the chat template's format)
    answer = " {a} </s>"

    def build_model(self, size, seed: int, video: bool = False):
        return llava_reference.build_model(size, seed=seed)

    def build_processor(self, video: bool = False):
        return llava_reference.build_processor()

    #: where each ``model`` size sits in a saved config.json: (sub-config, key)
    config_keys = {"vision_hidden": ("vision_config", "hidden_size"),
                   "vision_layers": ("vision_config", "num_hidden_layers"),
                   "vision_heads": ("vision_config", "num_attention_heads"),
                   "text_hidden": ("text_config", "hidden_size"), "text_layers": ("text_config", "num_hidden_layers"),
                   "text_heads": ("text_config", "num_attention_heads"),
                   "text_kv_heads": ("text_config", "num_key_value_heads")}

    def size_of(self, config: dict) -> dict[str, Any]:
        """The ``model`` sizes of a saved model's config.json (None where it does not say)."""
        return {k: config.get(sub, {}).get(key) for k, (sub, key) in self.config_keys.items()}

    def pixels(self, processor, items: list[dict]) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.cat([pixel_values(processor, it["image"]) for it in items])}

    def extra_inputs(self, processor, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def tower_tokens(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, grid², D) visual tokens of the batch's images, the tower alone (the warm-up)."""
        feats = model.model.get_image_features(
            pixel_values=batch["pixel_values"], vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy)
        feats = getattr(feats, "pooler_output", feats)
        tokens = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
        return tokens.reshape(len(batch["input_ids"]), self.grid ** 2, -1)

    def token_module(self, model):
        """The module whose output is the visual tokens the LLM reads (hooked in the joint steps)."""
        return model.model.multi_modal_projector

    def tokens_of(self, output, batch_size: int) -> torch.Tensor:
        return output.reshape(batch_size, self.grid ** 2, -1)

    def vision_modules(self, model) -> list[torch.nn.Module]:
        return [model.model.vision_tower, model.model.multi_modal_projector]

    def training_context(self):
        """Where the training forwards run (a faster, exact path for the tower, where there is one)."""
        return contextlib.nullcontext()


class QwenFamily(Family):
    """The Qwen2.5-VL reference: 144 visual tokens (12 × 12 merged cells of 28 px), ChatML turns."""

    name = "qwen2_5_vl"
    model_type = "qwen2_5_vl"
    videos = True
    grid = qwen_reference.IMAGE_SIDE // (qwen_reference.PATCH * qwen_reference.MERGE)
    size_class = qwen_reference.QwenReferenceSize
    absolute_positions = False
    turn = "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
    answer = "{a}<|im_end|>"

    def build_model(self, size, seed: int, video: bool = False):
        return qwen_reference.build_model(size, seed=seed, video=video)

    def build_processor(self, video: bool = False):
        return qwen_reference.build_processor(video)

    config_keys = {**Family.config_keys, "vision_layers": ("vision_config", "depth"),
                   "vision_heads": ("vision_config", "num_heads")}

    def pixels(self, processor, items: list[dict]) -> dict[str, torch.Tensor]:
        out = processor.image_processor(images=[it["image"] for it in items], return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def extra_inputs(self, processor, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mm_token_type_ids": (input_ids == processor.image_token_id).int()}

    def tower_tokens(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
        return self.tokens_of(out, len(batch["input_ids"]))

    def token_module(self, model):
        return model.model.visual

    def tokens_of(self, output, batch_size: int) -> torch.Tensor:  # the tower's merged tokens, in raster order
        tokens = output.pooler_output  # get_image_features splits it per image in place, after the hook ran
        tokens = torch.cat(tokens) if isinstance(tokens, (list, tuple)) else tokens
        return tokens.reshape(batch_size, self.grid ** 2, -1)

    def vision_modules(self, model) -> list[torch.nn.Module]:
        return [model.model.visual]  # the merger is part of it

    def training_context(self):
        return qwen_reference.batched_windows()


#: The architectures ``train-reference`` trains, by the config's ``family``.
FAMILIES = {f.name: f for f in (Family(), QwenFamily())}


def patch_targets(items: list[dict], grid: int = GRID) -> dict[str, torch.Tensor]:
    """Per-token labels of each item's ``shapes`` on the ``grid`` × ``grid`` visual tokens (row-major).

    ``aux_color`` / ``aux_kind``: class of the shape covering most of the cell (≥ 1/4 of its pixels), else 0
    (background); ``aux_center``: 1 on the cell holding a shape's centre; ``aux_xy``: that shape's centre in
    [0, 1] (``nan`` on background cells).
    """
    colors, kinds = list(shapes.COLORS), list(shapes.KINDS)
    n = len(items)
    color = torch.zeros(n, grid * grid, dtype=torch.long)
    kind = torch.zeros(n, grid * grid, dtype=torch.long)
    center = torch.zeros(n, grid * grid)
    xy = torch.full((n, grid * grid, 2), float("nan"))
    for b, it in enumerate(items):
        for d in it["shapes"]:
            sh = shapes.Shape(**d)
            on = shape_patches(sh, grid)
            color[b, on] = colors.index(sh.color) + 1
            kind[b, on] = kinds.index(sh.kind) + 1
            xy[b, on] = torch.tensor([sh.cx / shapes.SIZE, sh.cy / shapes.SIZE])
            center[b, center_patch(sh, grid)] = 1.0
    return {"aux_color": color, "aux_kind": kind, "aux_center": center, "aux_xy": xy}


def shape_patches(sh: shapes.Shape, grid: int = GRID) -> torch.Tensor:
    """(grid²,) bool: the cells a shape covers (>= 1/4 of their pixels; a small shape still marks its best-covered
    cell), row-major like the visual tokens."""
    m, top, left = shapes.shape_mask(sh)
    cell = shapes.SIZE // grid
    cover = torch.zeros(shapes.SIZE, shapes.SIZE)
    cover[top:top + sh.size, left:left + sh.size] = torch.from_numpy(m).float()
    frac = cover.view(grid, cell, grid, cell).mean(dim=(1, 3)).flatten()
    return (frac >= 0.25) | (frac == frac.max())


def center_patch(sh: shapes.Shape, grid: int = GRID) -> int:
    """The row-major index of the cell holding the shape's centre pixel."""
    cell = shapes.SIZE // grid
    return (sh.cy // cell) * grid + sh.cx // cell


_KINDS_AND_PLURALS = {**{k: k for k in shapes.KINDS}, **{k + "s": k for k in shapes.KINDS}}


def shape_names(words: list[str]) -> list[tuple[int, ...]]:
    """The shapes a question names, in its word order, as the indices of their words: each kind word (plural
    too) with the colour word just before it if there is one ("the red circle" -> (i, i + 1))."""
    return [(i - 1, i) if i and words[i - 1] in shapes.COLORS else (i,)
            for i, w in enumerate(words) if w in _KINDS_AND_PLURALS]


def named_shapes(question: str, scene: list[dict]) -> list[list[dict]]:
    """For each shape ``question`` names (in its order), the shapes of ``scene`` that match the name: of that
    kind, and of that colour if the name has one ("the red circle" -> [red circles]; "How many circles" ->
    [all circles]); an empty list when no shape matches."""
    words = re.sub(r"[?.,]", " ", question).split()
    return [_matching(words, name, scene) for name in shape_names(words)]


def _matching(words: list[str], name: tuple[int, ...], scene: list[dict]) -> list[dict]:
    """The shapes of ``scene`` that the name at word indices ``name`` (from :func:`shape_names`) describes."""
    kind = _KINDS_AND_PLURALS[words[name[-1]]]
    color = words[name[0]] if len(name) == 2 else None
    return [d for d in scene if d["kind"] == kind and color in (None, d["color"])]


class PatchHead(torch.nn.Module):
    """Training-only head on the visual tokens: colour (8), kind (6), centre (1) and centre (x, y) (2)."""

    def __init__(self, width: int, xy: bool = True):
        super().__init__()
        self.xy = xy  # ask each shape token for its shape's centre (only a tower with absolute positions can know)
        self.linear = torch.nn.Linear(width, len(shapes.COLORS) + 1 + len(shapes.KINDS) + 1 + 1 + 2)

    def loss(self, tokens: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:

        out = self.linear(tokens.float())
        c, k = len(shapes.COLORS) + 1, len(shapes.KINDS) + 1
        color, kind, center, xy = out[..., :c], out[..., c:c + k], out[..., c + k], out[..., c + k + 1:]
        loss = F.cross_entropy(color.flatten(0, 1), batch["aux_color"].flatten())
        shape = batch["aux_kind"] > 0  # the kind is learnt on shape patches only (few, and the hard part)
        if shape.any():
            loss = loss + F.cross_entropy(kind[shape], batch["aux_kind"][shape])
        loss = loss + F.binary_cross_entropy_with_logits(center, batch["aux_center"], pos_weight=torch.tensor(20.0))
        on = ~batch["aux_xy"][..., 0].isnan()
        if self.xy and on.any():
            loss = loss + 10 * F.mse_loss(xy.sigmoid()[on], batch["aux_xy"][on])
        return loss


def align_loss(tokens: torch.Tensor, batch: dict[str, torch.Tensor], embeddings: torch.Tensor,
               patches: str = "shape", tokenizer=None) -> torch.Tensor:
    """1 - cosine between the visual token of each shape patch (``patches="shape"``) or of each shape's centre
    patch only (``"center"``: one token per shape, so attention mass on matching tokens counts shapes rather
    than measuring their area) and (embedding of its colour word + of its kind word); the words' ids from
    ``tokenizer`` (default: the LLaVA reference's)."""

    tokenizer = tokenizer or llava_reference.build_tokenizer()
    color_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(shapes.COLORS)), device=tokens.device)
    kind_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(shapes.KINDS)), device=tokens.device)
    shape = batch["aux_kind"] > 0
    if patches == "center":
        shape = shape & (batch["aux_center"] > 0)
    elif patches != "shape":
        raise ConfigError("align.patches", f"must be 'shape' or 'center', got {patches!r}")
    if not shape.any():
        return tokens.sum() * 0.0
    emb = embeddings.detach().float()
    target = emb[color_ids[batch["aux_color"][shape] - 1]] + emb[kind_ids[batch["aux_kind"][shape] - 1]]
    return (1 - F.cosine_similarity(tokens[shape].float(), target, dim=-1)).mean()


def probe_loss(probe: torch.nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor, image_token_id: int,
               aux: dict[str, torch.Tensor], patches: str = "center") -> torch.Tensor:
    """Squared error of ``probe``'s (x, y) (a sigmoid, in [0, 1] of the image) read from the hidden state (B, T, D)
    of each shape's centre token (``aux_center``; ``patches="shape"``: of every token a shape covers) against that
    shape's centre (``aux_xy``), ×10 as the patch loss's position term. The visual tokens are the row's run of
    ``image_token_id`` (one image a row)."""
    n = aux["aux_center"].shape[1]
    start = (input_ids == image_token_id).int().argmax(dim=1)  # the first image token of each row
    index = start[:, None] + torch.arange(n, device=input_ids.device)[None, :]
    visual = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, n, D)
    on = ~aux["aux_xy"][..., 0].isnan()  # the tokens a shape covers
    if patches == "center":
        on = on & (aux["aux_center"] > 0)  # a centre its shape covers (a thin cross may not)
    if not on.any():
        return hidden.sum() * 0.0
    return 10 * F.mse_loss(probe(visual[on].float()).sigmoid(), aux["aux_xy"][on])


def answer_probe_loss(head: torch.nn.Module, hidden: torch.Tensor, rows: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Squared error of ``head``'s (x, y) of each of the two named shapes (a sigmoid, 4 outputs: slot 0's, then
    slot 1's) read from the hidden state (B, L, D) at the answer rows ``rows`` (B, T; -1: no turn), against ``xy``
    (B, T, 2, 2; ``nan`` where no shape matches the name), x10 as the position probe."""
    use = rows >= 0
    if not use.any():
        return hidden.sum() * 0.0
    b = torch.arange(rows.shape[0], device=rows.device)[:, None].expand_as(rows)
    pred = head(hidden[b[use], rows[use]].float()).sigmoid().view(-1, HINT_SLOTS, 2)
    target = xy[use].to(pred.device)
    known = ~target.isnan()
    if not known.any():
        return hidden.sum() * 0.0
    return 10 * F.mse_loss(pred[known], target[known])


HINT_ABSENT = ("none", "first_token")
HINT_GATHER = ("mass", "split")
HINT_RETRIEVE = ("shape", "center")
HINT_SLOTS = 2  # a question names at most two shapes (relations); hinted head h follows name h % 2


def hint_loss(model, captured: dict[int, tuple], batch: dict[str, torch.Tensor], gather_layer: int,
              retrieve_layer: int, heads: int, gather: str = "mass") -> torch.Tensor:
    """-log(attention mass on the targets), averaged over the turns that have targets and over the first
    ``heads`` heads: in ``gather_layer`` from each answer-predicting row to the words of one shape the question
    names (``hint_gather``), in ``retrieve_layer`` to that shape's patches (``hint_retrieve``); head h follows
    the question's name h % 2, so with two heads a relation's two shapes are gathered and retrieved apart.
    ``gather="split"`` replaces the gather term's -log(mass) by the mean over the name's words of -log(attention
    on the word): the minimum is an equal share per word, so "red circle" carries its colour as well as its
    kind (with ``"mass"`` a head can satisfy the hint with the kind word alone, and did).
    ``captured[layer]`` is that layer's input (hidden states and rotary embeddings); the attention rows are
    recomputed from it as the model computes them (causal, no padding keys) with tokenprune's own adapter."""

    adapter = get_adapter(model)
    rows = batch["hint_row"]
    width = batch["input_ids"].shape[1]
    slot = torch.arange(heads, device=rows.device) % HINT_SLOTS
    terms = []
    for layer, key in ((gather_layer, "hint_gather"), (retrieve_layer, "hint_retrieve")):
        hidden, position_embeddings = captured[layer]
        q = adapter.project_queries(layer, hidden, position_embeddings, rows.clamp(min=0))
        k = adapter.project_keys(layer, hidden, position_embeddings)
        q, k = q[:, :heads], k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)[:, :heads]  # grouped-query heads
        scores = (q @ k.transpose(-1, -2)).float() * adapter.attention_scaling(layer)  # (B, h, T, L)
        allowed = (torch.arange(width, device=rows.device)[None, None, :] <= rows[..., None]) \
            & batch["attention_mask"].bool()[:, None, :]
        log_probs = scores.masked_fill(~allowed[:, None], float("-inf")).log_softmax(dim=-1)
        target = batch[key][:, :, slot].permute(0, 2, 1, 3)  # (B, h, T, L): each head's name
        use = (rows >= 0)[:, None] & target.any(dim=-1)
        if not use.any():
            continue
        if key == "hint_gather" and gather == "split":  # mean over the target words of -log(attention on it),
            # from the log-softmax: a word the head ignores (p ~ 1e-18) still gets a gradient, which log(p + eps) loses
            nll = -(log_probs.masked_fill(~target, 0.0)).sum(dim=-1) / target.sum(dim=-1).clamp(min=1)
        else:
            nll = -((log_probs.exp() * target.float()).sum(dim=-1) + 1e-6).log()  # (B, h, T)
        terms.append(nll[use].mean())
    return torch.stack(terms).mean() if terms else rows.new_zeros((), dtype=torch.float)


def pixel_values(processor, image) -> torch.Tensor:
    """(1, 3, 336, 336) pixels of a 336×336 RGB image as ``processor``'s image processor gives them (its resize
    and centre crop are the identity at that size, so only rescale and normalise remain; a test checks it)."""

    ip = processor.image_processor
    x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) * ip.rescale_factor
    mean, std = torch.tensor(ip.image_mean)[:, None, None], torch.tensor(ip.image_std)[:, None, None]
    return ((x - mean) / std)[None]


def encode(processor, items: list[dict], hints: bool = False, absent: str = "none",
           family: Family | None = None, retrieve: str = "shape") -> dict[str, torch.Tensor]:
    """A training batch of ``family``'s reference (default: LLaVA): prompt + answer and its end (" answer </s>";
    Qwen: "answer<|im_end|>"), right-padded; labels only on the answer and its end.

    ``hints``: also the targets of the attention hints (``attention_hints`` in the config), per sample, turn
    and name (the first and the second shape the question names; a question naming one shape fills both):
    ``hint_row`` (B, T) the position that predicts the turn's answer (-1: no turn), ``hint_gather`` (B, T, 2, L)
    the name's colour and kind words, ``hint_retrieve`` (B, T, 2, L) the patches of the shapes that match it
    (``retrieve="center"``: the patch holding each one's centre), ``hint_xy`` (B, T, 2, 2) their mean centre in
    [0, 1] of the image (``nan`` when none matches).
    When none matches, ``absent="first_token"`` targets the row's first token instead (a place to look that
    is not the image, so that "no such shape" is learnt as such); ``"none"`` leaves no target. Descriptions
    get no hints.
    """
    family = family or FAMILIES["llava"]
    grid, retrieve_at = family.grid, retrieve
    tok = processor.tokenizer
    image_token = tok.convert_ids_to_tokens(processor.image_token_id) if hasattr(processor, "image_token_id") \
        else processor.image_token
    rows, labels, turns = [], [], []
    for it in items:
        text = prompt(processor, it["question"]).replace(image_token, image_token * grid * grid)
        row = tok(text, add_special_tokens=False)["input_ids"]
        label = [-100] * len(row)
        qas = [(it["question"], it["answer"], 0)] + [(q, a, None) for q, a in it.get("more", ())]
        spans = []
        for q, a, start in qas:  # further turns about the same image (the chat template's format)
            if start is None:
                start = len(row)
                turn = tok(family.turn.format(q=q), add_special_tokens=False)["input_ids"]
                row, label = row + turn, label + [-100] * len(turn)
            spans.append((q, start, len(row) - 1))  # the question's tokens, and the row that predicts the answer
            answer = tok(family.answer.format(a=a), add_special_tokens=False)["input_ids"]
            row, label = row + answer, label + answer
        rows.append(row)
        labels.append(label)
        turns.append(spans)
    input_ids, mask, label_t = right_pad(rows, labels, tok.pad_token_id)
    width = input_ids.shape[1]
    batch = {"input_ids": input_ids, "attention_mask": mask, **family.pixels(processor, items), "labels": label_t,
             **family.extra_inputs(processor, input_ids)}
    if hints:
        n, t = len(items), max(len(sp) for sp in turns)
        hint_row = torch.full((n, t), -1)
        gather = torch.zeros(n, t, HINT_SLOTS, width, dtype=torch.bool)
        retrieve = torch.zeros(n, t, HINT_SLOTS, width, dtype=torch.bool)
        xy = torch.full((n, t, HINT_SLOTS, 2), float("nan"))
        for b, (it, spans) in enumerate(zip(items, turns)):
            if it.get("type") == "describe":
                continue
            image = rows[b].index(tok.convert_tokens_to_ids(image_token))
            for j, (_, start, end) in enumerate(spans):
                hint_row[b, j] = end
                words = tok.convert_ids_to_tokens(rows[b][start:end + 1])
                names = shape_names(words)
                matches = [_matching(words, name, it["shapes"]) for name in names]
                for s in range(HINT_SLOTS if names else 0):
                    name, match = names[min(s, len(names) - 1)], matches[min(s, len(names) - 1)]
                    gather[b, j, s, [start + i for i in name]] = True
                    if match:  # the named shapes' mean centre, in [0, 1] of the image
                        xy[b, j, s] = torch.tensor([[d["cx"], d["cy"]] for d in match], dtype=torch.float).mean(0) \
                            / shapes.SIZE
                    for d in match:
                        if retrieve_at == "center":
                            retrieve[b, j, s, image + center_patch(shapes.Shape(**d), grid)] = True
                        else:
                            retrieve[b, j, s, image:image + grid * grid] |= shape_patches(shapes.Shape(**d), grid)
                    if not match and absent == "first_token":
                        retrieve[b, j, s, 0] = True
        batch.update(hint_row=hint_row, hint_gather=gather, hint_retrieve=retrieve, hint_xy=xy)
    return batch


def right_pad(rows: list[list[int]], labels: list[list[int]], pad: int) -> tuple[torch.Tensor, ...]:
    """``input_ids``, ``attention_mask`` and ``labels`` (B, longest row) of token ``rows`` and their ``labels``,
    right-padded (``pad``; -100 in the labels)."""
    width = max(len(r) for r in rows)
    return (torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
            torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
            torch.tensor([r + [-100] * (width - len(r)) for r in labels]))


def encode_clips(processor, items: list[dict], family: Family | None = None,
                 hints: bool = False) -> dict[str, torch.Tensor]:
    """A training batch of ``shapes_video`` items for the Qwen reference: each clip's prompt (the chat template's,
    its one ``<|video_pad|>`` written once per merged cell of the clip, as the processor's video path and
    ``tokenprune run`` lay it out), then the answer and its end, right-padded; labels only on the answer and its end.
    The pixels from the image processor frame by frame (:func:`~tokenprune.adapters.qwen2_vl.video_pixels`), each
    temporal patch one second (``second_per_grid_ts``, as ``tokenprune run`` gives Qwen2.5-VL).

    ``hints``: also the attention hints' targets (:func:`encode`'s keys, one turn a clip): ``hint_gather`` the words
    of each shape the question names, ``hint_retrieve`` the visual tokens holding the centre of the shape each slot
    follows (:func:`clip_event_shapes`) in every frame that shows it — the cell of its centre in each temporal
    patch's grid, in both frames of the patch. No ``hint_xy``: the answer probe reads still images."""
    family = family or FAMILIES["qwen2_5_vl"]
    tok = processor.tokenizer
    video_token = tok.convert_tokens_to_ids(processor.video_token)
    merge = processor.image_processor.merge_size
    rows, labels, pixels, grids, ends = [], [], [], [], []
    for it in items:
        pv, thw = video_pixels(processor.image_processor, it["video"])
        text = tok(prompt(processor, it["question"], video=True), add_special_tokens=False)["input_ids"]
        row = expand_placeholder(text, video_token, int(thw.prod()) // merge ** 2)
        answer = tok(family.answer.format(a=it["answer"]), add_special_tokens=False)["input_ids"]
        ends.append(len(row) - 1)  # the row that predicts the answer
        rows.append(row + answer)
        labels.append([-100] * len(row) + answer)
        pixels.append(pv)
        grids.append(thw)
    input_ids, mask, label_t = right_pad(rows, labels, tok.pad_token_id)
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": label_t,
             "pixel_values_videos": torch.cat(pixels), "video_grid_thw": torch.cat(grids),
             "mm_token_type_ids": (input_ids == video_token).long() * 2, "second_per_grid_ts": torch.ones(len(items))}
    if hints:
        n, width = input_ids.shape
        batch["hint_row"] = torch.tensor(ends)[:, None]
        gather = torch.zeros(n, 1, HINT_SLOTS, width, dtype=torch.bool)
        retrieve = torch.zeros(n, 1, HINT_SLOTS, width, dtype=torch.bool)
        for b, (it, thw) in enumerate(zip(items, grids)):
            words = tok.convert_ids_to_tokens(rows[b][:ends[b] + 1])
            names = shape_names(words)
            side = int(thw[0, 1]) // merge  # merged cells per side of a frame
            start = rows[b].index(video_token)
            for s, shape in enumerate(clip_event_shapes(it)):
                if names:
                    gather[b, 0, s, list(names[min(s, len(names) - 1)])] = True
                for f, frame in enumerate(it["events"]):
                    for d in frame:
                        if (d["kind"], d["color"]) == shape:
                            cell = (d["cy"] * side // shapes_video.SIZE) * side + d["cx"] * side // shapes_video.SIZE
                            retrieve[b, 0, s, start + (f // 2) * side * side + cell] = True
        batch.update(hint_gather=gather, hint_retrieve=retrieve)
    return batch


def clip_event_shapes(item: dict) -> list[tuple[str, str]]:
    """``(kind, colour)`` of the shape each hint slot follows in a ``shapes_video`` item: the shapes the question
    names, in its order (one name fills both slots); for "Which shape moved?" the shape whose centre changes, for
    "Which shape appeared?" the one the first frame lacks (each kind and colour is one shape in a clip)."""
    words = re.sub(r"[?.,]", " ", item["question"]).split()
    names = shape_names(words)
    if names:
        found = [(words[n[-1]], words[n[0]]) for n in names]
    else:
        seen: dict[tuple[str, str], set] = {}
        for frame in item["events"]:
            for d in frame:
                seen.setdefault((d["kind"], d["color"]), set()).add((d["cx"], d["cy"]))
        first = {(d["kind"], d["color"]) for d in item["events"][0]}
        event = (lambda key: len(seen[key]) > 1) if item["type"] == "moved" else (lambda key: key not in first)
        found = [key for key in seen if event(key)]
        if len(found) != 1:
            raise ValueError(f"a {item['type']!r} clip with {len(found)} event shapes, expected one")
    return [found[min(s, len(found) - 1)] for s in range(HINT_SLOTS)]


def worker_batches(start: int = 0) -> Iterator[int]:
    """Batch indices ``start, start + 1, ...``; in a DataLoader worker, its share."""
    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info else (0, 1)
    return (b for b in itertools.count(start) if b % workers == worker)


def train_batches(seed: int, batch_size: int, start: int = 0, sizes_at=lambda b: shapes.SIZES):
    """``(b, items)``: batch ``b`` of the ``shapes`` train split ``seed`` (items ``b * batch_size`` on, the question
    types in turn, shapes of ``sizes_at(b)`` px) for b = start, start + 1, ...; in a DataLoader worker, its share."""
    for b in worker_batches(start):
        yield b, [shapes.make_item(f"shapes-train-{seed}/{i}", shapes.TYPES[i % len(shapes.TYPES)],
                                   i // len(shapes.TYPES), sizes_at(b))
                  for i in range(b * batch_size, (b + 1) * batch_size)]


class ClipStream(torch.utils.data.IterableDataset):
    """Endless training batches (:func:`encode_clips`) from ``shapes_video`` train split ``seed`` (the items
    ``shapes_video.load_split("train", seed)`` yields, the question types in turn), from batch ``start`` on."""

    def __init__(self, processor, seed: int, batch_size: int, start: int = 0, family: Family | None = None,
                 hints: bool = False):
        self.processor, self.seed, self.batch_size, self.start, self.family = processor, seed, batch_size, start, family
        self.hints = hints  # add the attention hints' targets (encode_clips(hints=True))

    def __iter__(self):
        for b in worker_batches(self.start):
            items = [shapes_video.make_item(f"shapes-video-train-{self.seed}/{i}",
                                            shapes_video.TYPES[i % len(shapes_video.TYPES)])
                     for i in range(b * self.batch_size, (b + 1) * self.batch_size)]
            yield encode_clips(self.processor, items, self.family, self.hints)


class ShapesStream(torch.utils.data.IterableDataset):
    """Endless training batches from ``shapes`` train split ``seed``, starting at batch ``start`` (resuming).

    ``curriculum``: ``[{until: step, sizes: [lo, hi]}, ...]`` in increasing ``until``; a batch uses the
    sizes of the first entry whose ``until`` is beyond it, else the benchmark's.
    """

    def __init__(self, processor, seed: int, batch_size: int, start: int = 0, curriculum: list | None = None,
                 targets: bool = False, describe: dict | None = None, multi_turn: dict | None = None,
                 hints: bool = False, hint_absent: str = "none", family: Family | None = None,
                 hint_retrieve: str = "shape"):
        self.processor, self.seed, self.batch_size, self.start = processor, seed, batch_size, start
        self.family = family or FAMILIES["llava"]
        # add the attention hints' targets (encode(hints=True))
        self.hints, self.hint_absent, self.hint_retrieve = hints, hint_absent, hint_retrieve
        self.describe_share = float((describe or {}).get("share", 0.0))
        self.describe_from = int((describe or {}).get("from_step", 0))
        self.turns = int((multi_turn or {}).get("turns", 1))
        self.turns_from = int((multi_turn or {}).get("from_step", 0))
        self.targets = targets  # add patch_targets() for the auxiliary loss
        self.curriculum = [(int(c["until"]), tuple(c["sizes"])) for c in (curriculum or [])]

    def sizes_at(self, batch: int) -> tuple[int, int]:
        return next((sizes for until, sizes in self.curriculum if batch < until), shapes.SIZES)

    def __iter__(self):
        for b, items in train_batches(self.seed, self.batch_size, self.start, self.sizes_at):
            if self.turns > 1 and b >= self.turns_from:
                items = [more_turns(it, self.turns, f"shapes-train-{self.seed}/{b * self.batch_size + j}/more")
                         for j, it in enumerate(items)]
            if self.describe_share and b >= self.describe_from:
                every = max(1, round(1 / self.describe_share))
                items = [describe(it) if (b * self.batch_size + j) % every == 0 else it for j, it in enumerate(items)]
            batch = encode(self.processor, items, hints=self.hints, absent=self.hint_absent, family=self.family,
                           retrieve=self.hint_retrieve)
            yield {**batch, **patch_targets(items, self.family.grid)} if self.targets else batch


def more_turns(item: dict, turns: int, seed: str) -> dict:
    """``item`` with ``more``: up to ``turns - 1`` further (question, answer) pairs about its image, drawn with
    the benchmark's own question rules in rounds over the question types (the other types first, then the
    item's own), skipping types the scene cannot carry and repeated questions."""
    scene = [shapes.Shape(**d) for d in item["shapes"]]
    rng = shapes.Rng(seed)
    order = [t for t in shapes.TYPES if t != item["type"]] + [item["type"]]
    more: list[tuple[str, str]] = []
    for qtype in itertools.islice(itertools.cycle(order), 2 * (turns - 1)):  # rounds over the types
        if len(more) >= turns - 1:
            break
        qa = shapes.question(qtype, scene, rng, rng.below(4))
        if qa is not None and qa not in more and qa[0] != item["question"]:
            more.append(qa)
    return {**item, "more": more}


DESCRIBE_QUESTION = "What is there ?"


def describe(item: dict) -> dict:
    """The item's image asked :data:`DESCRIBE_QUESTION`, answered with every shape in reading order (top to
    bottom, then left to right): ``COLOR KIND top|bottom left|right`` joined by ``,`` and ended by ``.``."""
    parts = []
    for d in sorted(item["shapes"], key=lambda d: (d["cy"], d["cx"])):
        vertical = "top" if d["cy"] < shapes.SIZE // 2 else "bottom"
        horizontal = "left" if d["cx"] < shapes.SIZE // 2 else "right"
        parts.append(f"{d['color']} {d['kind']} {vertical} {horizontal}")
    return {**item, "question": DESCRIBE_QUESTION, "answer": " , ".join(parts) + " .", "type": "describe"}


def answer_accuracy(model, processor, items: list[dict], batch_size: int = 16) -> dict:
    """Greedy one-token answers through stock ``generate()``, scored with ``shapes.score``; clips (``video`` items)
    with the inputs ``tokenprune run`` builds for them (the adapter's ``frame_video_inputs``)."""
    preds: list[str] = []
    tok = processor.tokenizer
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        if "video" in chunk[0]:
            prompts = [prompt(processor, it["question"], video=True) for it in chunk]
            enc = get_adapter(model).frame_video_inputs(processor, prompts, [it["video"] for it in chunk])
        else:
            prompts = [prompt(processor, it["question"]) for it in chunk]
            enc = processor(images=[it["image"] for it in chunk], text=prompts, return_tensors="pt", padding=True)
        enc = {k: v.to(model.device) for k, v in enc.items()}
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=2, do_sample=False)
        preds += tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return shapes.score(preds, items)


def _lightning_module(cfg: DictConfig, processor):
    import pytorch_lightning as pl

    family = FAMILIES[cfg.family]

    class ReferenceModule(pl.LightningModule):
        def __init__(self):
            super().__init__()
            video = cfg.benchmark == "shapes_video"
            self.model = family.build_model(family.size_class(**cfg.model), seed=cfg.seed, video=video)
            if cfg.init_from is not None:
                start_weights(self.model, init_folder(cfg))
            self.val_items = (shapes_video if video else shapes).load_split("val", size=cfg.val["items"])
            self.head = PatchHead(cfg.model.text_hidden, xy=family.absolute_positions) if cfg.aux_weight else None
            self.probe = torch.nn.Linear(cfg.model.text_hidden, 2) if cfg.position_probe.weight else None
            self.answer_head = torch.nn.Linear(cfg.model.text_hidden, 2 * HINT_SLOTS) if cfg.answer_probe.weight \
                else None

        def training_step(self, batch, _):
            aux = {k: batch.pop(k) for k in list(batch) if k.startswith("aux_")}
            hint_batch = {k: batch.pop(k) for k in list(batch) if k.startswith("hint_")}
            if self.global_step < cfg.vision_warmup_steps:  # the tower alone, on the patch loss
                with family.training_context():
                    aux_loss = self.head.loss(family.tower_tokens(self.model, batch), aux)
                self.log("train/aux_loss", aux_loss)
                return cfg.aux_weight * aux_loss
            seen: list[torch.Tensor] = []
            hooks = []
            if self.head is not None:
                hooks.append(family.token_module(self.model).register_forward_hook(lambda m, a, o: seen.append(o)))
            hints = cfg.attention_hints
            use_hints = bool(hints.weight) and self.global_step >= hints.from_step and bool(hint_batch)
            captured: dict[int, tuple] = {}
            probe = cfg.position_probe
            use_probe = self.probe is not None and self.global_step >= probe.from_step
            answer = cfg.answer_probe
            use_answer = self.answer_head is not None and self.global_step >= answer.from_step and bool(hint_batch)
            grab_layers = ((hints.gather_layer, hints.retrieve_layer) if use_hints else ()) + \
                ((probe.layer,) if use_probe else ()) + ((answer.layer,) if use_answer else ())
            if grab_layers:
                layers = self.model.model.language_model.layers
                for layer in sorted(set(grab_layers)):
                    def grab(module, args, kwargs, layer=layer):
                        hidden = layer_hidden(args, kwargs)
                        captured[layer] = (hidden, kwargs["position_embeddings"])
                    hooks.append(layers[layer].register_forward_pre_hook(grab, with_kwargs=True))
            try:
                with family.training_context():
                    loss = self.model(**batch).loss
            finally:
                for hook in hooks:
                    hook.remove()
            self.log("train/loss", loss, prog_bar=True)
            if use_hints:
                hint = hint_loss(self.model, captured, {**batch, **hint_batch}, hints.gather_layer,
                                 hints.retrieve_layer, hints.heads, hints.gather)
                self.log("train/hint_loss", hint)
                loss = loss + hints.weight * hint
            if use_answer:
                named = answer_probe_loss(self.answer_head, captured[answer.layer][0], hint_batch["hint_row"],
                                          hint_batch["hint_xy"])
                self.log("train/answer_probe_loss", named)
                loss = loss + answer.weight * named
            if use_probe:
                where = probe_loss(self.probe, captured[probe.layer][0], batch["input_ids"],
                                   self.model.config.image_token_id, aux, probe.patches)
                self.log("train/probe_loss", where)
                loss = loss + probe.weight * where
            if self.head is not None:
                tokens = family.tokens_of(seen[0], len(batch["input_ids"]))
                aux_loss = self.head.loss(tokens, aux)
                self.log("train/aux_loss", aux_loss)
                loss = loss + cfg.aux_weight * aux_loss
                if cfg.align.weight and self.global_step >= cfg.align.from_step:
                    align = align_loss(tokens, aux, self.model.get_input_embeddings().weight, cfg.align.patches,
                                       processor.tokenizer)
                    self.log("train/align_loss", align)
                    loss = loss + cfg.align.weight * align
            return loss

        def on_train_batch_end(self, outputs, batch, batch_idx):
            step = self.global_step
            if cfg.val.every and step % cfg.val.every == 0 and step > cfg.vision_warmup_steps:
                self._validate()

        def _validate(self):
            self.model.eval()
            acc = answer_accuracy(self.model, processor, self.val_items)
            self.model.train()
            self.log("val/accuracy", acc["overall"], prog_bar=True)
            for t, a in acc["per_type"].items():
                self.log(f"val/{t}", a)

        def configure_optimizers(self):
            vision = [p for m in (*family.vision_modules(self.model), self.head) if m is not None for p in m.parameters()]
            # (the position probe trains with the LLM, at its rate)
            ids = {id(p) for p in vision}
            groups = [{"params": [p for p in self.parameters() if id(p) not in ids]},
                      {"params": vision, "lr": cfg.optim.vision_lr or cfg.optim.lr}]
            opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.optim.warmup_steps, cfg.optim.max_steps))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return ReferenceModule()


#: Written into ``output_dir`` when a training run starts: its config, against which a resume is checked.
RUN_CONFIG = "run_config.yaml"

#: Keys a resumed run may change: how long it trains and how it reports, not what it trains.
RESUMABLE_CHANGES = ("output_dir", "export_dir", "export", "overwrite_export", "optim.max_steps", "checkpoint_every",
                     "val", "logging", "data.num_workers", "accelerator")


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def check_resume(cfg: DictConfig) -> None:
    """A run that resumes (``output_dir/checkpoints/last.ckpt`` exists) must train what its checkpoint trained: every
    key but :data:`RESUMABLE_CHANGES` as the run's :data:`RUN_CONFIG` recorded it. Otherwise one ConfigError naming
    the first key that differs, before any model loads (a changed recipe would otherwise fail deep in the checkpoint
    restore, or worse, resume silently into a mixture of two recipes)."""
    out = Path(cfg.output_dir)
    record = out / RUN_CONFIG
    if not (out / "checkpoints" / "last.ckpt").exists() or not record.exists():
        return
    try:
        before = _leaves(OmegaConf.to_container(OmegaConf.load(record)))
    except Exception:  # noqa: BLE001 - an unreadable record cannot be checked against; the restore says the rest
        return
    now = _leaves(OmegaConf.to_container(cfg))
    free = lambda key: any(key == k or key.startswith(k + ".") for k in RESUMABLE_CHANGES)  # noqa: E731
    for key in sorted(set(before) | set(now)):
        if free(key) or before.get(key, "(unset)") == now.get(key, "(unset)"):
            continue
        raise ConfigError(key, f"output_dir {out} holds a run trained with {key}={before.get(key, '(unset)')!r} "
                               f"(checkpoints/last.ckpt resumes it); this config gives {now.get(key, '(unset)')!r}: "
                               "give the recorded value to resume, or choose another output_dir")


def record_run_config(cfg: DictConfig) -> None:
    """Write ``cfg`` into ``output_dir`` (:data:`RUN_CONFIG`) for :func:`check_resume`."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / RUN_CONFIG)


def resume_point(out: Path) -> tuple[Path | None, int]:
    """(last checkpoint of the run in ``out`` or None, its global step): where a training run resumes."""
    last = out / "checkpoints" / "last.ckpt"
    if not last.exists():
        return None, 0
    return last, int(torch.load(last, map_location="cpu", weights_only=False)["global_step"])


def fit(cfg: DictConfig, module, data):
    """Fit a Lightning ``module`` on ``data`` as every ``tokenprune train-*`` command does: ``cfg.optim.max_steps``
    steps on ``cfg.accelerator``, CSV metrics (and W&B per ``cfg.logging``) under ``cfg.output_dir``, a checkpoint every
    ``cfg.checkpoint_every`` steps and at the end (``checkpoints/last.ckpt``), resumed from it when it exists.
    Returns the trainer."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    resume, _ = resume_point(out)
    check_resume(cfg)  # the commands check it before loading anything; a caller of fit() gets the same guard
    record_run_config(cfg)
    # version=None: each start (a resume included) writes the next out/metrics/version_N/metrics.csv, so a resumed run
    # keeps the metrics of the steps before it (one fixed version would be emptied on resume)
    loggers: list[Any] = [CSVLogger(save_dir=str(out), name="metrics", version=None)]
    if cfg.logging.wandb:
        from pytorch_lightning.loggers import WandbLogger

        loggers.append(WandbLogger(project=cfg.logging.project, save_dir=str(out), offline=cfg.logging.offline))
    trainer = pl.Trainer(
        max_steps=cfg.optim.max_steps, accelerator=cfg.accelerator, devices=1, logger=loggers,
        # enable_version_counter=False: a resumed run whose checkpoint_every differs would otherwise not recognise
        # last.ckpt as its own and write last-v1.ckpt, and the next resume would start from the stale last.ckpt
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=cfg.checkpoint_every,
                                   save_top_k=0, enable_version_counter=False)],
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=cfg.logging.every, num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=data, ckpt_path=str(resume) if resume else None)
    trainer.save_checkpoint(ckpt_dir / "last.ckpt")
    return trainer


def warmup_cosine(warm: int, total: int):
    """The learning-rate factor of step ``step``: linear warm-up over ``warm`` steps, then cosine to 10% at ``total``."""

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        frac = (step - warm) / max(1, total - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))

    return schedule


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train (or resume), export the model folder, and return ``{"export_dir", "steps", "val"}``."""
    import pytorch_lightning as pl

    pl.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.output_dir)
    _, start = resume_point(out)
    family = FAMILIES[cfg.family]
    video = cfg.benchmark == "shapes_video"
    processor = family.build_processor(video)
    module = _lightning_module(cfg, processor)
    curriculum = OmegaConf.to_container(cfg.curriculum)
    if video:
        stream = ClipStream(processor, cfg.seed, cfg.data.batch_size, start, family, bool(cfg.attention_hints.weight))
    else:
        stream = ShapesStream(processor, cfg.seed, cfg.data.batch_size, start, curriculum, targets=bool(cfg.aux_weight),
                              describe=OmegaConf.to_container(cfg.describe),
                              multi_turn=OmegaConf.to_container(cfg.multi_turn),
                              hints=bool(cfg.attention_hints.weight), hint_absent=cfg.attention_hints.absent,
                              family=family, hint_retrieve=cfg.attention_hints.retrieve)
    data = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.data.num_workers)
    trainer = fit(cfg, module, data)
    export = Path(cfg.export_dir) if cfg.export_dir else out / "model"
    module.model.save_pretrained(export)
    processor.save_pretrained(export)
    (export / EXPORT_RECORD).write_text(json.dumps({"output_dir": str(out.resolve()), "steps": trainer.global_step})
                                        + "\n")
    val = answer_accuracy(module.model.eval(), processor, module.val_items)
    return {"export_dir": str(export), "steps": trainer.global_step, "val": val}
