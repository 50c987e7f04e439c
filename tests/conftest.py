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
    from tokenprune.tiny import tiny_llava

    sdpa = tiny_llava("sdpa", layers=4)
    eager = tiny_llava("eager", layers=4)
    eager.load_state_dict(sdpa.state_dict())
    return {"sdpa": sdpa, "eager": eager}


@pytest.fixture()
def batch(llava_pair):
    from tokenprune.tiny import tiny_llava_inputs

    return tiny_llava_inputs(llava_pair["sdpa"])
