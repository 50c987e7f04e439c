import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def llava_pair():
    """The same tiny random LLaVA weights under SDPA and under eager attention."""
    from tokenprune.reference.tiny import tiny_llava

    sdpa = tiny_llava("sdpa", layers=4)
    eager = tiny_llava("eager", layers=4)
    eager.load_state_dict(sdpa.state_dict())
    return {"sdpa": sdpa, "eager": eager}


@pytest.fixture()
def batch(llava_pair):
    from tokenprune.reference.tiny import tiny_llava_inputs

    return tiny_llava_inputs(llava_pair["sdpa"])


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A random-init model of the reference architecture (576 visual tokens), saved with its processor: a
    model folder for `tokenprune run` / `sweep` tests (its answers are noise, its shapes are real)."""
    from tokenprune.reference.model import ReferenceSize, build_model, build_processor

    path = tmp_path_factory.mktemp("tinyref")
    build_model(ReferenceSize(vision_hidden=32, vision_layers=2, vision_heads=2, text_hidden=64, text_layers=4,
                              text_heads=2, text_kv_heads=1)).save_pretrained(path)
    build_processor().save_pretrained(path)
    return path


#: Families whose end-to-end sweeps (every preset, the real processor) run as ``slow`` tests (``make test-slow``,
#: which CI runs after ``make test``); their oracles and family-specific tests are in the fast suite.
SLOW_FAMILIES = {"llava_onevision", "internvl", "qwen3_vl", "gemma3", "qwen3_5"}


def families(*names: str) -> list:
    """``names`` as pytest parameters, those of :data:`SLOW_FAMILIES` marked ``slow``."""
    import pytest

    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_FAMILIES else n for n in names]


#: Overrides for the tiny models' few visual tokens (16-64): MustDrop's attention thresholds are set for LLaVA's
#: 576, and at 16 every token's share of the instruction's attention passes them. A learned operator's shipped
#: weights fit the reference model's width only: the tiny models run its initialisation.
TINY = {"mustdrop": ["stages.1.operators.1.global_share=0.5", "stages.1.operators.1.individual=0.5"],
        "quecc": ["stages.0.operators.0.weights=init"], "attention_predictor": ["stages.0.operators.0.weights=init"]}


def load_for_tiny(name: str):
    """Preset ``name`` with the overrides a tiny test model needs (:data:`TINY`)."""
    import tokenprune as tp

    return tp.load_pipeline(name, TINY.get(name, []))
