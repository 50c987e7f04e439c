"""What a measured number depends on besides its config: the package versions, tokenprune's git commit, the
machine, the exact command. Each run directory keeps it as ``provenance.json``; benchmark tables quote it."""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from tokenprune.core.learned import learned_operators

#: The distributions whose versions can change a number (the model code, the kernels, the processors, the loop).
PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "accelerate", "numpy", "pillow", "torchvision",
            "pytorch-lightning", "omegaconf", "lmms-eval", "wandb")


def package_versions() -> dict[str, str | None]:
    """``{distribution: version}`` for :data:`PACKAGES` and tokenprune itself (its distribution,
    ``tokenprune-lvlm``; None: not installed)."""
    out: dict[str, str | None] = {}
    for name in ("tokenprune-lvlm", *PACKAGES):
        try:
            out[name.removesuffix("-lvlm")] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name.removesuffix("-lvlm")] = None
    return out


def commit() -> str | None:
    """The commit of the checkout tokenprune is imported from (``+changes`` when its tracked files differ from
    it), or None outside git (an installed wheel)."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+changes" if dirty else "")


def machine() -> dict[str, Any]:
    """The platform, Python, torch (and transformers), CPUs and torch threads, the GPU if any, today's date and
    the commit (short)."""
    full = commit()
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
            "commit": None if full is None else full[:7] + full[40:]}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed, shell-quoted (``tokenprune run ...``; the program's name without its path)."""
    argv = list(sys.argv if argv is None else argv)
    if argv:
        argv[0] = Path(argv[0]).name
    return shlex.join(argv)


def model_files(path: str) -> dict[str, Any] | None:
    """For a model folder: each file's name and size, and the SHA-256 of its ``config.json`` (the weights are
    not hashed: tens of GB); None for anything else (a hub id)."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    files = sorted((p.name, p.stat().st_size) for p in folder.iterdir() if p.is_file())
    config = folder / "config.json"
    return {"folder": str(folder.resolve()), "files": files,
            "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None}


def provenance(model_path: str | None = None, argv: list[str] | None = None, pipeline: Any = None) -> dict[str, Any]:
    """A run directory's ``provenance.json``: the command, the working directory, the time, tokenprune's commit,
    the package versions, the machine, the model folder's files, and the weights files of the pipeline's learned
    operators (each file and its SHA-256)."""
    out = {"command": command_line(argv), "cwd": os.getcwd(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "commit": commit(), "packages": package_versions(), "machine": machine(),
           "model": model_files(model_path) if model_path else None}
    weights = [op.weights_record() for op in learned_operators(pipeline.stages)] if pipeline is not None else []
    if any(weights):
        out["operator_weights"] = [w for w in weights if w]
    return out
