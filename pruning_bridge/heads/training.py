"""Train head routers on a frozen model: language-modelling loss + beta * load-balancing loss.

Only the routers train by default (AdamW, gradient clipping, a step budget). They and the loss
are fp32 whatever the model's dtype; every step is checked for finite values, and a non-finite
one stops training with the step and layer named (the report trained on Qwen3 NaN losses
without noticing). With ``out`` the loss curve is appended as it goes, a checkpoint is written
every ``checkpoint_every`` steps and at the end, and a rerun resumes from the last checkpoint
when it was made with the same training settings, model and data (``training_settings``);
otherwise it says what differs and trains afresh, so a folder never hands back a router trained
for another model or with other settings.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..bridge import HookBridge
from ..common.atomic import atomic_path, write_text_atomic
from ..common.errors import RouterTrainingError, UsageError, require_local_weights
from ..common.identity import model_identity
from ..common.jsonable import JsonDataclass
from .routing import RoutedHeads


@dataclass
class RouterTrainingLog(JsonDataclass):
    """Per-step losses (``lm_loss``, ``balance_loss``, ``loss``, ``seconds``) and the settings."""

    settings: dict = field(default_factory=dict)
    steps: list[dict] = field(default_factory=list)

    @property
    def seconds_per_step(self) -> float:
        """Mean wall time of a training step."""
        return sum(s["seconds"] for s in self.steps) / max(len(self.steps), 1)

    def to_pandas(self):
        """The per-step losses as a DataFrame."""
        return pd.DataFrame(self.steps)


@contextmanager
def frozen(model) -> Iterator[None]:
    """Inside the block no parameter of ``model`` requires gradients; flags restored on exit."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def training_windows(tokenizer, texts: Sequence[str], seq_len: int) -> Tensor:
    """``[n, seq_len]`` token ids: the texts tokenized, joined by EOS, cut without overlap."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text)["input_ids"] + ([eos] if eos is not None else [])
    n = len(stream) // seq_len
    if n == 0:
        raise UsageError(f"The texts give {len(stream)} tokens, fewer than one window of "
                         f"{seq_len}; pass more text or a smaller seq_len.")
    return torch.tensor(stream[: n * seq_len]).view(n, seq_len)


def lm_loss(logits: Tensor, windows: Tensor) -> Tensor:
    """Mean next-token cross-entropy, in fp32."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                           windows[:, 1:].flatten().to(logits.device))


def _check_finite(router: RoutedHeads, step: int, lm: Tensor, dtype: torch.dtype) -> None:
    for layer, routing in sorted(router.last.items()):
        if not (torch.isfinite(routing.probs).all() and torch.isfinite(routing.gates).all()):
            raise RouterTrainingError(
                f"Step {step}: the router of layer {layer} produced non-finite scores (its input "
                f"blocks.{layer}.hook_resid_pre is not finite, or the router weights diverged). "
                f"Lower the learning rate, or run the model in bfloat16/float32 instead of "
                f"{dtype}.")
    if not torch.isfinite(lm):
        raise RouterTrainingError(
            f"Step {step}: the language-modelling loss is {lm.item()} while every routed layer's "
            f"gates are finite, so the base model itself overflows in {dtype} after the last "
            f"routed layer ({max(router.last)}). Run it in bfloat16 or float32.")


def _check_grads(router: RoutedHeads, step: int) -> None:
    for layer, module in router.routers.items():
        if module.weight.grad is not None and not torch.isfinite(module.weight.grad).all():
            raise RouterTrainingError(f"Step {step}: the gradient of layer {layer}'s router is "
                                      f"not finite. Lower the learning rate or beta.")


IGNORED = ("model_name",)  # recorded, but not a reason to retrain (a moved checkpoint)


def training_settings(bridge: HookBridge, router: RoutedHeads, windows: Tensor, *, steps: int,
                      batch_size: int, lr: float, beta: float, max_grad_norm: float,
                      train_base: bool, base_lr: float, seed: int) -> dict:
    """Everything that determines a trained router: its shape, the optimisation, the model
    (weights fingerprint, dtype, device) and a digest of the training windows."""
    model = model_identity(bridge)
    data = hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest()[:16]
    return {**router.settings(), "steps": steps, "batch_size": batch_size,
            "seq_len": windows.shape[1], "lr": lr, "beta": beta, "max_grad_norm": max_grad_norm,
            "train_base": train_base, "base_lr": base_lr if train_base else None, "seed": seed,
            "dtype": model["dtype"], "model": {k: v for k, v in model.items() if k != "name"},
            "model_name": model["name"], "windows": len(windows), "data": data}


def settings_differ(saved: dict, wanted: dict) -> list[str]:
    """The training settings that differ, as ``name: saved -> wanted`` (ignoring the name)."""
    keys = sorted((set(saved) | set(wanted)) - set(IGNORED))
    return [f"{k}: {saved.get(k)} -> {wanted.get(k)}" for k in keys
            if json.dumps(saved.get(k), sort_keys=True, default=str)
            != json.dumps(wanted.get(k), sort_keys=True, default=str)]


def train_router(model, tokenizer, texts: Sequence[str] | Tensor, *, n_shared: int = 1,
                 top_k: int | None = None, layers: Sequence[int] | None = None,
                 router: RoutedHeads | None = None, steps: int = 100, batch_size: int = 4,
                 seq_len: int = 256, lr: float = 1e-2, beta: float = 0.01,
                 max_grad_norm: float = 1.0, train_base: bool = False, base_lr: float = 1e-5,
                 seed: int = 0, out: str | Path | None = None, checkpoint_every: int = 25,
                 progress: bool = True) -> tuple[RoutedHeads, RouterTrainingLog]:
    """Train a ``RoutedHeads`` (new, or ``router``) on ``texts``; return it and its loss log.

    ``texts`` are strings (tokenized into ``seq_len`` windows) or a ``[n, seq_len]`` id tensor.
    Batches follow a seeded schedule, so a resumed run sees the same data as an uninterrupted one.
    ``train_base`` also updates the model's own weights (AdamW at ``base_lr``); otherwise the
    model is frozen and left exactly as it was. With ``out``, a finished or interrupted run
    there with the same ``training_settings`` is resumed (a finished one is just loaded).
    """
    require_local_weights(model, "Training a router (gradients through the model)")
    bridge = model if isinstance(model, HookBridge) else HookBridge(model, tokenizer)
    windows = texts if isinstance(texts, Tensor) else training_windows(tokenizer, texts, seq_len)
    router = router or RoutedHeads(bridge, n_shared, top_k, layers, seed=seed)
    router.to(bridge.device)
    dtype = next(bridge.parameters()).dtype
    settings = training_settings(bridge, router, windows, steps=steps, batch_size=batch_size,
                                 lr=lr, beta=beta, max_grad_norm=max_grad_norm,
                                 train_base=train_base, base_lr=base_lr, seed=seed)
    out = Path(out) if out is not None else None
    log = RouterTrainingLog(settings)

    groups = [{"params": list(router.parameters()), "lr": lr}]
    if train_base:
        groups.append({"params": [p for p in bridge.parameters() if p.requires_grad],
                       "lr": base_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)

    start = _resume(out, router, optimizer, log) if out is not None else 0
    schedule = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(windows), generator=schedule)
                       for _ in range(math.ceil(steps * batch_size / len(windows)) + 1)])
    try:
        with nullcontext() if train_base else frozen(bridge.model), router.routing(bridge):
            bar = tqdm(range(start, steps), desc="router training", disable=not progress,
                       initial=start, total=steps)
            for step in bar:
                tic = time.perf_counter()
                batch = windows[order[step * batch_size:(step + 1) * batch_size]]
                logits, _ = bridge.forward(batch, grad=True)
                lm = lm_loss(logits, batch)
                _check_finite(router, step, lm, dtype)
                balance = router.balance_loss()
                loss = lm + beta * balance
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                _check_grads(router, step)
                torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]],
                                               max_grad_norm)
                optimizer.step()
                row = {"step": step, "lm_loss": lm.item(), "balance_loss": balance.item(),
                       "loss": loss.item(), "seconds": time.perf_counter() - tic}
                log.steps.append(row)
                bar.set_postfix(lm=f"{row['lm_loss']:.3f}", balance=f"{row['balance_loss']:.3f}")
                if out is not None:
                    with open(out / "loss_curve.jsonl", "a") as f:
                        f.write(json.dumps(row) + "\n")
                    if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
                        _checkpoint(out, router, optimizer, step + 1, settings)
    finally:
        router.last.clear()  # drop the autograd graph of the last batch
    if out is not None:
        router.save(out)
        log.to_json(out / "training_log.json")
    return router, log


def _checkpoint(out: Path, router: RoutedHeads, optimizer, step: int, settings: dict) -> None:
    with atomic_path(out / "checkpoint.pt") as tmp:
        torch.save({"step": step, "router": router.state_dict(),
                    "optimizer": optimizer.state_dict(), "settings": settings}, tmp)


def _loss_rows(path: Path) -> list[dict]:
    """The loss curve's rows (a line cut short by a crash is skipped)."""
    rows = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def _start_afresh(out: Path) -> int:
    for name in ("checkpoint.pt", "loss_curve.jsonl", "training_log.json"):
        (out / name).unlink(missing_ok=True)
    return 0


def _resume(out: Path, router: RoutedHeads, optimizer, log: RouterTrainingLog) -> int:
    """Load the last checkpoint in ``out`` if it was made with ``log.settings`` (else say what
    differs and start afresh); keep the loss curve up to it. Returns the step to start at."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "checkpoint.pt"
    if not path.exists():
        return _start_afresh(out)
    try:
        state = torch.load(path, weights_only=False)
        saved = state["settings"]
    except Exception as error:  # a damaged checkpoint is our own file: recompute it
        warnings.warn(f"{path} cannot be read ({type(error).__name__}); training the router "
                      f"afresh.", stacklevel=3)
        return _start_afresh(out)
    differ = settings_differ(saved, log.settings)
    if differ:
        warnings.warn(f"{out} holds a router trained with other settings ({'; '.join(differ)}); "
                      f"training it afresh for these.", stacklevel=3)
        return _start_afresh(out)
    router.load_state_dict(state["router"])
    optimizer.load_state_dict(state["optimizer"])
    log.steps = [r for r in _loss_rows(out / "loss_curve.jsonl") if r["step"] < state["step"]]
    write_text_atomic(out / "loss_curve.jsonl", "".join(json.dumps(r) + "\n" for r in log.steps))
    return state["step"]
