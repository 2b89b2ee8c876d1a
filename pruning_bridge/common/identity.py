"""Which model a number came from: part of every saved result's identity.

    model_identity(model)  # {"name": "...", "weights": "3f2a...", "dtype": "float32", "device": "cpu"}

A results row, a trained router or a cached study is reused only for the model that produced
it. ``weights`` fingerprints the parameters (names, shapes, dtypes and up to ``SAMPLE`` evenly
spaced values of each tensor, hashed in their stored dtype), so two checkpoints, two random
initialisations, or a pruned and an unpruned copy never share rows, while fingerprinting even a
billion-parameter model takes milliseconds. ``name`` is informational (where the model was
loaded from); ``dtype`` and the device class (cpu / cuda / mps) are part of the identity because
they change the numbers. A remote bridge (weights on an NDIF server) is identified by its model
key and host.
"""

from __future__ import annotations

import hashlib

import torch

SAMPLE = 4096  # values hashed per tensor


def _tensor_digest(digest, name: str, tensor: torch.Tensor) -> None:
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // SAMPLE)
    sample = flat[::step][:SAMPLE].cpu()
    if sample.dtype == torch.bfloat16:  # numpy has no bfloat16: hash its bits
        sample = sample.view(torch.int16)
    digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    digest.update(sample.contiguous().numpy().tobytes())


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A short hash of ``module``'s parameters and buffers (sampled values, names, shapes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if tensor.device.type == "meta":
            digest.update(f"{name}:{tuple(tensor.shape)}:meta;".encode())
        else:
            _tensor_digest(digest, name, tensor)
    return digest.hexdigest()[:16]


def _name(module) -> str:
    config = getattr(module, "config", None) or getattr(module, "cfg", None)
    for attr in ("_name_or_path", "model_name"):
        value = getattr(config, attr, None)
        if value:
            return str(value)
    return type(module).__name__


def model_identity(model) -> dict[str, str]:
    """``{"name", "weights", "dtype", "device"}`` of an HF model, a ``HookBridge`` or a
    ``HookedTransformer`` (see the module doc)."""
    remote = getattr(model, "remote", None)
    if remote not in (None, "simulate"):  # the weights are on a server
        key = model.lm.to_model_key()
        host = remote if isinstance(remote, str) else "ndif"
        return {"name": key, "weights": f"remote:{key}", "dtype": "server",
                "device": f"remote:{host}"}
    module = getattr(model, "model", None) if hasattr(model, "lm") else None
    module = module if isinstance(module, torch.nn.Module) else model
    first = next(iter(module.parameters()), None)
    return {"name": _name(module), "weights": weights_fingerprint(module),
            "dtype": str(first.dtype).removeprefix("torch.") if first is not None else "none",
            "device": first.device.type if first is not None else "cpu"}


def weights_identity(model) -> dict[str, str]:
    """``model_identity`` without the name (weights digest, dtype, device): what decides
    whether saved results of a model can stand in for running it again."""
    return {k: v for k, v in model_identity(model).items() if k != "name"}
