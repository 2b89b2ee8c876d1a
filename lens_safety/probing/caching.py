"""Pooled residual-stream activations per layer, for probes and directions.

    acts = cache_residuals(model, tokenizer, texts, hook="resid_post", pool="last")
    acts.shape  # [n_layers, n_texts, d_model], float32; acts[L] is block L's activation

``model`` is anything that speaks TransformerLens hook names: a TransformerLens model
(``lens_safety.backend.transformer_lens``) or a ``pruning_bridge.HookBridge``. Texts are
tokenised once, sorted by length (less padding), run in left-padded batches with an attention
mask, and pooled per batch, so memory stays bounded by one batch's activations at the requested
hook points (nothing else is cached). ``pool="last"`` takes the last *real* token,
``pool="mean"`` the mean over real tokens only (never over padding), and
``pool="mean_after_first"`` the same without each row's first token (in Llama-family models it
carries massive activations, an attention sink, that would dominate the mean; a one-token text
keeps its token).
With ``store=path`` the result is saved as safetensors and reloaded on the next call with the
same settings, texts and model weights (active hooks are not part of that check); a damaged
store (truncated, garbage, another shape, a failed checksum) is reported in one warning and
recomputed.

:func:`save_tensors` / :func:`read_tensors` are how the toolkit writes and reads every
safetensors file it saves: written atomically with a checksum; a file that cannot be used is a
``UsageError`` naming it, saying what is wrong and what to do.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from pruning_bridge.common import UsageError, check_layers, left_pad, model_device
from pruning_bridge.common.atomic import atomic_path
from pruning_bridge.common.identity import weights_identity

from ..backend import dims, run_with_cache
from ..edits.trace_math import pool_batch

HOOKS = ("resid_pre", "resid_mid", "resid_post")
POOLS = ("last", "mean", "mean_after_first")


def hook_name(layer: int, hook: str) -> str:
    """``blocks.{layer}.hook_{hook}``; ``hook`` is ``"resid_post"`` or ``"hook_resid_post"`` etc."""
    short = hook.removeprefix("hook_")
    if short not in HOOKS:
        raise UsageError(f"Unknown residual hook {hook!r}; use one of {', '.join(HOOKS)}.")
    return f"blocks.{layer}.hook_{short}"


# ---------------------------------------------------------------- storage

CHECKSUM_KEY = "content_sha256"  # in the metadata of every safetensors file the toolkit saves


def tensors_sha256(tensors: dict[str, Tensor]) -> str:
    """A SHA-256 of named tensors: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def save_tensors(path: str | Path, tensors: dict[str, Tensor],
                 metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` (and string ``metadata``) as safetensors, atomically, with their
    checksum in the metadata; returns the path."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {**(metadata or {}), CHECKSUM_KEY: tensors_sha256(tensors)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def _safetensors_problem(path: Path, error: Exception) -> str:
    """Why ``path`` cannot be read as safetensors, in a few words (it failed with ``error``)."""
    if isinstance(error, OSError):
        return f"unreadable ({error.strerror or error})"
    size = path.stat().st_size
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        header = f.read(min(header_size, size))
    if not header.startswith(b"{"):
        return "not a safetensors file" if size else "empty"
    if size < 8 + header_size:
        return f"truncated ({size} bytes; its header alone needs {8 + header_size})"
    try:
        ends = [entry["data_offsets"][1] for name, entry in json.loads(header).items()
                if name != "__metadata__"]
        needed = 8 + header_size + max(ends, default=0)
    except (ValueError, TypeError, KeyError, IndexError):
        return "not a safetensors file (its header is damaged)"
    if size < needed:
        return f"truncated ({size} of {needed} bytes)"
    return f"damaged ({error})"


def read_tensors(path: str | Path, fix: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file (the checksum checked and left out of the
    metadata when the file has one). A file that cannot be used is a ``UsageError`` naming it,
    saying what is wrong (missing, truncated, not safetensors, checksum) and then ``fix``."""
    path = Path(path)

    def unusable(problem: str) -> UsageError:
        return UsageError(f"{path} is {problem}." + (f" {fix}" if fix else ""))

    if not path.is_file():
        raise unusable("a folder" if path.is_dir() else "not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise unusable(_safetensors_problem(path, error)) from None
    checksum = metadata.pop(CHECKSUM_KEY, None)
    if checksum is not None and checksum != tensors_sha256(tensors):
        raise unusable("damaged (its tensors do not match their checksum)")
    return tensors, metadata


def _fingerprint(model, tokenizer, texts: Sequence[str], hook: str, pool: str,
                 layers: list[int], max_length: int) -> dict[str, str]:
    """What a stored cache must match: settings, texts, tokenizer and the model (a fingerprint
    of all its weights, its dtype and device class: a pruned or edited copy is another model)."""
    texts_hash = hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()
    model_key = weights_identity(model)
    return {"hook": hook, "pool": pool, "layers": json.dumps(layers),
            "max_length": str(max_length), "n_texts": str(len(texts)), "texts_sha256": texts_hash,
            "tokenizer": getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__,
            "model": json.dumps(model_key, sort_keys=True)}


def _load_store(path: Path, expected: dict[str, str], shape: tuple[int, ...]) -> Tensor | None:
    """The residuals stored at ``path`` for these settings, or None (to recompute and
    overwrite), with one warning when a file is there but damaged or for other settings."""
    if not path.exists():
        return None
    recompute = "Recomputing and overwriting it."
    try:
        tensors, found = read_tensors(path, recompute)
    except UsageError as error:
        warnings.warn(str(error), stacklevel=3)
        return None
    if found != expected:
        differ = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
        warnings.warn(f"{path} holds residuals for other settings ({', '.join(differ)} differ); "
                      f"recomputing and overwriting it.", stacklevel=3)
        return None
    residuals = tensors.get("residuals")
    if residuals is None or tuple(residuals.shape) != shape or residuals.dtype != torch.float32:
        found_shape = None if residuals is None else tuple(residuals.shape)
        warnings.warn(f"{path} does not hold float32 residuals of shape {shape} (found "
                      f"{found_shape}). {recompute}", stacklevel=3)
        return None
    return residuals


# ---------------------------------------------------------------- the verb


@torch.no_grad()
def cache_residuals(model, tokenizer, texts: Sequence[str], hook: str = "resid_post",
                    pool: str = "last", layers: Sequence[int] | None = None,
                    batch_size: int = 8, max_length: int = 256, progress: bool = True,
                    store: str | Path | None = None) -> Tensor:
    """Pooled residuals ``[len(layers), n_texts, d_model]`` (float32) at ``blocks.L.hook_{hook}``.

    With ``layers=None`` the first index is the block index. Texts longer than ``max_length``
    tokens are truncated (their first tokens kept). ``tokenizer=None`` uses ``model.tokenizer``.
    """
    if pool not in POOLS:
        raise UsageError(f"Unknown pool {pool!r}; use one of {', '.join(POOLS)}.")
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise UsageError("No texts to cache: pass a non-empty list of strings.")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise UsageError("Pass a tokenizer (the model has none).")
    n_layers, d_model = dims(model)
    layers = check_layers(layers, n_layers)
    names = [hook_name(layer, hook) for layer in layers]
    hook = hook.removeprefix("hook_")

    path = Path(store) if store is not None else None
    if path is not None:
        expected = _fingerprint(model, tokenizer, texts, hook, pool, layers, max_length)
        stored = _load_store(path, expected, (len(layers), len(texts), d_model))
        if stored is not None:
            return stored

    rows = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    empty = [i for i, row in enumerate(rows) if not row]
    if empty:
        raise UsageError(f"Text(s) at index {empty[:5]} tokenise to nothing; remove them.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(texts)), key=lambda i: len(rows[i]))  # similar lengths together
    out = torch.empty(len(layers), len(texts), d_model, dtype=torch.float32)
    device = model_device(model)
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc=f"caching {hook}", disable=not progress):
        index = order[start:start + batch_size]
        ids, mask = left_pad([rows[i] for i in index], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        # pooled where the model runs (on a server, only [batch, d_model] per layer comes back)
        cache = run_with_cache(model, ids, mask, names,
                               reduce=lambda x, mask=mask: pool_batch(x, mask, pool))
        for k, name in enumerate(names):
            out[k, index] = cache[name].cpu()
        del cache

    if path is not None:
        save_tensors(path, {"residuals": out}, metadata=expected)
    return out
