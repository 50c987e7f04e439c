"""The method × family matrix: which preset runs on which model family, and why a cell refuses.

Each cell is the answer of the family adapter's own model checks (:meth:`ModelAdapter.check_pipeline`, the
checks ``pipeline.attach`` runs) for the preset on a configuration of that family at a real checkpoint's
geometry (built from ``transformers``' config classes; no weights), with a guide model given. So the matrix
is what tokenprune does, not a list kept by hand: ``tokenprune matrix`` writes the table in
docs/families.md, and a test keeps the two equal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tokenprune.adapters import adapter_class
from tokenprune.core.config import preset_names
from tokenprune.core.errors import ConfigError
from tokenprune.pipeline import load_pipeline


def family_configs() -> dict[str, Any]:
    """One configuration per family, at the geometry of the checkpoint named in the key (no weights)."""
    from transformers import (
        Gemma3Config,
        InternVLConfig,
        LlavaConfig,
        LlavaNextConfig,
        LlavaOnevisionConfig,
        MllamaConfig,
        Qwen2_5_VLConfig,
        Qwen3_5Config,
        Qwen3VLConfig,
    )

    qwen2_7b = {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                "num_attention_heads": 28, "num_key_value_heads": 4}
    return {
        "LLaVA-1.5 (llava-1.5-7b)": LlavaConfig(),
        "LLaVA-NeXT (llava-v1.6-vicuna-7b)": LlavaNextConfig(),
        "Qwen2-VL / Qwen2.5-VL (Qwen2.5-VL-7B)": Qwen2_5_VLConfig(text_config={"num_hidden_layers": 28}),
        "LLaMA-3.2-Vision (11B)": MllamaConfig(),
        # the default configs' towers and tiling are these checkpoints'; their LLMs are Qwen2-7B's shape
        "LLaVA-OneVision (llava-onevision-qwen2-7b-ov)": LlavaOnevisionConfig(text_config=qwen2_7b),
        "InternVL (InternVL3-8B)": InternVLConfig(text_config=qwen2_7b),
        "Qwen3-VL (Qwen3-VL-8B)": Qwen3VLConfig(text_config={
            "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128}, vision_config={"out_hidden_size": 4096}),
        # five sliding-window (1024) layers to one global, as the released checkpoints
        "Gemma 3 (gemma-3-12b)": Gemma3Config(text_config={
            "hidden_size": 3840, "intermediate_size": 15360, "num_hidden_layers": 48, "num_attention_heads": 16,
            "num_key_value_heads": 8, "head_dim": 256, "sliding_window": 1024,
            "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(48)]}),
        # transformers' defaults are Qwen3.5-9B's: three Gated DeltaNet (linear-attention) layers to one attention
        # layer, so layers 3, 7, ..., 31 attend
        "Qwen3.5 (Qwen3.5-9B)": Qwen3_5Config(),
    }


@dataclass(frozen=True)
class Cell:
    preset: str
    family: str
    #: None: the preset runs on the family; else why it is refused: the error ``attach`` raises, without the key
    #: and the value given (so that presets refused for one reason share it).
    refused: str | None


def method_family_matrix() -> list[Cell]:
    """Every (preset, family) cell, presets in name order, families as :func:`family_configs` lists them."""
    configs = family_configs()
    cells = []
    for name in preset_names():
        pipe = load_pipeline(name)
        for family, config in configs.items():
            adapter = adapter_class(config)
            try:
                adapter.check_pipeline(adapter.facts_from_config(config), pipe, guide=True)
                refused = None
            except ConfigError as e:
                refused = _reason(e.detail)
            cells.append(Cell(name, family, refused))
    return cells


def _reason(detail: str) -> str:
    detail = re.sub(r"^got [^,]+, but ", "", detail)
    return detail[:1].upper() + detail[1:]


def matrix_markdown(cells: list[Cell] | None = None) -> str:
    """The matrix as a markdown table (✓ runs; a number: refused, the reason listed under the table)."""
    cells = method_family_matrix() if cells is None else cells
    families = list(dict.fromkeys(c.family for c in cells))
    presets = list(dict.fromkeys(c.preset for c in cells))
    reasons: dict[str, int] = {}
    at = {(c.preset, c.family): c for c in cells}
    lines = ["| preset | " + " | ".join(families) + " |", "|---|" + "---|" * len(families)]
    for p in presets:
        row = []
        for f in families:
            why = at[(p, f)].refused
            if why is None:
                row.append("✓")
            else:
                n = reasons.setdefault(why, len(reasons) + 1)
                row.append(f"refused ({n})")
        lines.append(f"| {p} | " + " | ".join(row) + " |")
    runs = sum(c.refused is None for c in cells)
    lines += ["", f"{runs} of {len(cells)} cells run. Why the others are refused (what `attach` says):", ""]
    lines += [f"{n}. {why}" for why, n in reasons.items()]
    return "\n".join(lines) + "\n"
