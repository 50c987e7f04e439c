"""Learned operators: an operator with trainable weights (an ``nn.Module`` inside it), saved as safetensors.

A learned operator's parameters carry ``weights`` (a shipped name — ``experiments/presets/weights/NAME.safetensors``,
packaged as ``tokenprune.presets`` — or a path ending in ``.safetensors``) and ``sha256`` (the file's digest: filled
in when the pipeline is built, so the resolved config and the run directory pin the exact weights; given, a file
whose digest differs is refused). The file's metadata names the operator, the parameters its tensors' shapes depend
on, and the LLM width it was trained for: each is checked — the name and the parameters when the pipeline is built,
before any model loads, the width when the pipeline is attached (:meth:`LearnedOperator.bind`). Every failure is a
:class:`~tokenprune.core.errors.ConfigError` naming the operator's key and the file.

Without ``weights`` the network is the operator's untrained initialisation: only ``tokenprune train-operator``
runs it so (:meth:`LearnedOperator.bind` with ``untrained=True``); attaching refuses it otherwise. ``weights: init``
asks for the initialisation explicitly (an ablation — what the method does untrained —, and tiny test models, whose
width no shipped file fits).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from tokenprune.core.config import preset_dir
from tokenprune.core.errors import ConfigError

#: ``weights: init``: the untrained initialisation, asked for explicitly.
INIT = "init"
#: Folder of the shipped weights, beside the presets.
WEIGHTS_FOLDER = "weights"
#: Metadata keys every weights file carries (besides the operator's shape parameters, as ``param.NAME``).
META_OP, META_HIDDEN, META_MODEL, META_TRAINING = "op", "hidden_size", "model", "training"


def weights_dir() -> Path:
    """Folder of the shipped learned-operator weights."""
    return preset_dir() / WEIGHTS_FOLDER


def shipped_weights() -> list[str]:
    return sorted(p.stem for p in weights_dir().glob("*.safetensors"))


def weights_path(name: str) -> Path:
    """The file ``weights: name`` means: a path when it ends in ``.safetensors``, else a shipped name."""
    if name.endswith(".safetensors"):
        return Path(name)
    return weights_dir() / f"{name}.safetensors"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_metadata(path: Path, key: str) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - not a safetensors file (truncated, another format): say which file
        raise ConfigError(key, f"{path} is not a readable safetensors file ({str(e).splitlines()[0]})") from None


class LearnedOperator:
    """Mixin for a :class:`~tokenprune.core.operator.TokenOperator` with trainable weights.

    A subclass's ``Params`` has ``weights: str = ""`` and ``sha256: str = ""``, lists in :attr:`shape_params` the
    parameters its tensors' shapes depend on, and builds its network in :meth:`build_network` for an LLM of width
    ``hidden_size``; its ``forward`` runs ``self.network``. The network is built and loaded by :meth:`bind`, which
    the runtime calls when the pipeline is attached.
    """

    learned: ClassVar[bool] = True
    shape_params: ClassVar[tuple[str, ...]] = ()
    #: the loss ``tokenprune train-operator`` trains it with (``answer``: the frozen LVLM's answer loss)
    objective: ClassVar[str] = ""

    network: nn.Module | None
    bound_hidden: int | None

    def init_learned(self) -> None:
        """Check the weights file (when given) against the parameters; the subclass's ``__init__`` calls it."""
        self.network = None
        self.bound_hidden = None
        self.weights_file: Path | None = None
        self.weights_meta: dict[str, str] = {}
        if self.params.weights in ("", INIT):
            return
        wkey = f"{self.config_key}.weights"
        path = weights_path(self.params.weights)
        if not path.is_file():
            shipped = ", ".join(shipped_weights()) or "none"
            raise ConfigError(wkey, f"{self.op_name}: weights file {path} not found; give a shipped name ({shipped}) "
                                    "or a path ending in .safetensors (tokenprune train-operator writes one)")
        digest = file_sha256(path)
        if self.params.sha256 and self.params.sha256 != digest:
            raise ConfigError(f"{self.config_key}.sha256", f"{self.op_name}: weights file {path} has sha256 {digest}, "
                                                           f"not the {self.params.sha256} the config pins")
        meta = read_metadata(path, wkey)
        if meta.get(META_OP) != self.op_name:
            raise ConfigError(wkey, f"{path} holds weights of operator {meta.get(META_OP)!r}, not {self.op_name!r}")
        for name in self.shape_params:
            trained = meta.get(f"param.{name}")
            if trained is None or json.loads(trained) != getattr(self.params, name):
                raise ConfigError(f"{self.config_key}.{name}", f"{self.op_name}: weights file {path} was trained with "
                                  f"{name}={trained}, not {getattr(self.params, name)!r}; allowed: {trained}")
        self.params.sha256 = digest
        self.weights_file = path
        self.weights_meta = meta

    def build_network(self, hidden_size: int) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def bind(self, hidden_size: int, device: torch.device | str | None = None, untrained: bool = False,
             seed: int | None = 0) -> None:
        """Build the network for an LLM of width ``hidden_size`` and load the weights file into it (on ``device``).
        ``untrained``: allow no weights file (training starts from the initialisation). The initialisation is drawn
        from ``seed`` (the same network every time: ``weights: init`` gives the same results on every model it is
        attached to), or from the global random state with ``seed=None`` (train-operator's, seeded by its config).
        Binding again to the same width keeps the network (a trained one stays trained)."""
        wkey = f"{self.config_key}.weights"
        untrained = untrained or self.params.weights == INIT
        if self.weights_file is None and not untrained and self.bound_hidden is None:
            shipped = ", ".join(shipped_weights()) or "none"
            raise ConfigError(wkey, f"{self.op_name} is a learned operator and has no trained weights: give weights: "
                                    f"NAME (shipped: {shipped}), a .safetensors path, or {INIT} (the untrained "
                                    "initialisation); tokenprune train-operator trains them")
        if self.bound_hidden == hidden_size:
            if device is not None:
                self.network.to(device)
            return
        if self.bound_hidden is not None:
            raise ConfigError(wkey, f"{self.op_name} is bound to an LLM of width {self.bound_hidden}; this model's is "
                                    f"{hidden_size} (build the pipeline again for another model)")
        if self.weights_file is not None:
            trained = int(self.weights_meta.get(META_HIDDEN, -1))
            if trained != hidden_size:
                raise ConfigError(wkey, f"{self.op_name}: weights file {self.weights_file} was trained for an LLM of "
                                        f"width {trained} ({self.weights_meta.get(META_MODEL, 'unknown model')}); this "
                                        f"model's width is {hidden_size}")
        if seed is None:
            network = self.build_network(hidden_size)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                network = self.build_network(hidden_size)
        if self.weights_file is not None:
            tensors = load_file(str(self.weights_file))
            mine = network.state_dict()
            if set(tensors) != set(mine) or any(tensors[k].shape != mine[k].shape for k in mine):
                raise ConfigError(wkey, f"{self.op_name}: weights file {self.weights_file} does not fit the network "
                                        f"(tensors {sorted(set(tensors) ^ set(mine)) or 'of other shapes'})")
            network.load_state_dict(tensors)
            network.eval()
        self.network = network.to(device) if device is not None else network
        self.bound_hidden = hidden_size

    def save_weights(self, path: Path, model: str, training: dict[str, Any] | None = None) -> str:
        """Write the bound network's weights to ``path`` with the metadata :meth:`init_learned` checks; return the
        file's sha256."""
        if self.network is None:
            raise RuntimeError(f"{self.op_name}: no network to save (bind it first)")
        meta = {META_OP: self.op_name, META_HIDDEN: str(self.bound_hidden), META_MODEL: model,
                **{f"param.{n}": json.dumps(getattr(self.params, n)) for n in self.shape_params}}
        if training is not None:
            meta[META_TRAINING] = json.dumps(training, sort_keys=True)
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.network.state_dict().items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=meta)
        path.chmod(0o644)  # shipped with the presets: readable by everyone
        return file_sha256(path)

    def weights_record(self) -> dict[str, Any] | None:
        """``{op, key, file, sha256}`` of the loaded weights, for a run directory (None without a file)."""
        if self.weights_file is None:
            return None
        return {"op": self.op_name, "key": self.config_key, "file": str(self.weights_file),
                "sha256": self.params.sha256, "model": self.weights_meta.get(META_MODEL)}


def learned_operators(stages) -> list[Any]:
    """Every learned operator of a pipeline's stages, in order."""
    return [op for s in stages for op in s.operators if getattr(op, "learned", False)]
