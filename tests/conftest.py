"""Suite-wide settings: deterministic seeds, one intra-op thread, and a hypothesis profile
without deadlines (a shared CI machine makes per-example timing noise).

Every test works on tiny shapes, where waking a second intra-op thread costs more than the
arithmetic (measured 16x slower on a loaded 2-core machine), so the suite runs single-threaded;
benchmarks under bench/ set their own thread counts."""
import os

import pytest
import torch

try:
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "moefx",
        deadline=None,
        max_examples=int(os.environ.get("MOEFX_HYPOTHESIS_EXAMPLES", "30")),
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.load_profile("moefx")
except ImportError:  # hypothesis is a dev extra
    pass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
