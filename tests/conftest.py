"""Shared fixtures. Every test is offline: the hub is switched off before transformers loads."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"

torch.set_num_threads(min(4, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.exists():
        pytest.fail(f"The shared test data is missing: expected {DATA_DIR}")
    return DATA_DIR


@pytest.fixture(scope="session")
def tiny():
    """A cache of tiny models by name: ``tiny("tiny-llama") -> (model, tokenizer)``."""
    from pruning_bridge.models import load_model

    loaded = {}

    def get(name: str):
        if name not in loaded:
            loaded[name] = load_model(name)
        return loaded[name]

    return get


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (converted once from the PyPI GGUF, then cached)."""
    from pruning_bridge.models import load_model

    return load_model("smollm2-135m")
