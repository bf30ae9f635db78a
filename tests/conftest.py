"""Suite-wide settings: deterministic seeds, a CPU thread count that fits CI's 2 cores, and a
hypothesis profile without deadlines (a shared CI machine makes per-example timing noise)."""
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
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
