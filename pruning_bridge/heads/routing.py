"""Routed attention heads (MoH style): per token, a learned router picks which heads speak.

    router = RoutedHeads(bridge, n_shared=2, top_k=4)
    with router.routing(bridge):
        logits = bridge(ids)                        # head outputs gated before o_proj
    loss = lm_loss + 0.01 * router.balance_loss()   # the routers are nn.Modules: train them

In each routed layer the first ``n_shared`` heads are always on (gate 1); the router ``W_r``
scores the other E heads from the layer's input (``hook_resid_pre`` scaled to unit length in
fp32, so the scores stay finite when the model runs in bf16/fp16 or has massive activations,
and an optimizer step moves them by about the same amount whatever the width), softmax,
top-k, and the selected probabilities are renormalised and scaled by k as in MoH, so gates
average 1 and a uniform router with every head selected is the original model. Gates multiply
``blocks.{L}.attn.hook_z`` (each head's output before the output projection), through the bridge.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from ..bridge import HookBridge, model_dims
from ..bridge.remote import send_by_value
from ..common.errors import UsageError
from ..common.layers import check_layers


def load_balancing_loss(router_probs: Tensor, topk_mask: Tensor) -> Tensor:
    """``E * sum_i f_i * P_i`` over ``[tokens, E]`` router probabilities and top-k mask.

    f_i is the fraction of tokens whose top-k includes routed head i, P_i the mean probability of
    head i. Uniform routing gives k; sending every token to the same few heads gives E times
    their probability mass, more than k; so minimising it spreads tokens over the heads.
    """
    if router_probs.shape != topk_mask.shape or router_probs.ndim != 2:
        raise UsageError(f"router_probs and topk_mask must both be [tokens, routed_heads]; got "
                         f"{tuple(router_probs.shape)} and {tuple(topk_mask.shape)}.")
    n_routed = router_probs.shape[-1]
    f = topk_mask.float().mean(0)
    p = router_probs.float().mean(0)
    return n_routed * (f * p).sum()


@dataclass
class Routing:
    """One layer's routing of a batch: gates over all heads, and the router's view of the
    routed ones (its probabilities and top-k mask)."""

    gates: Tensor  # [..., n_heads], fp32
    probs: Tensor  # [..., n_routed]
    topk_mask: Tensor  # [..., n_routed], bool


class HeadRouter(nn.Module):
    """The router of one attention layer: ``W_r x`` over its routed heads (always fp32).

    The small initialisation starts training from near-uniform probabilities: every gate close
    to 1 and a random choice of heads per token.
    """

    def __init__(self, d_model: int, n_heads: int, n_shared: int, init_std: float = 1e-3,
                 generator: torch.Generator | None = None):
        super().__init__()
        if not 0 <= n_shared < n_heads:
            raise UsageError(f"n_shared must be in [0, {n_heads - 1}] for {n_heads} heads, "
                             f"got {n_shared}.")
        self.n_heads, self.n_shared = n_heads, n_shared
        self.weight = nn.Parameter(torch.empty(n_heads - n_shared, d_model, dtype=torch.float32))
        with torch.no_grad():
            self.weight.normal_(0.0, init_std, generator=generator)

    @property
    def n_routed(self) -> int:
        return self.n_heads - self.n_shared

    def forward(self, x: Tensor, top_k: int) -> Routing:
        """Gates over all heads for inputs ``x`` (``[..., d_model]``), ``top_k`` routed on."""
        return Routing(*route(self.weight, x, top_k, self.n_shared))


def route(weight: Tensor, x: Tensor, top_k: int, n_shared: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(gates over all heads, routed probabilities, top-k mask)`` for inputs ``x``.

    Torch only: it also runs inside remote traces (see ``RoutedHeads.hooks``).
    """
    x = torch.nn.functional.normalize(x.to(weight.device, torch.float32), dim=-1,
                                      eps=1e-6)  # layers may sit on other GPUs
    probs = torch.softmax(x @ weight.T, dim=-1)
    top = probs.topk(top_k, dim=-1).indices
    mask = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, top, True)
    kept = probs * mask
    routed = top_k * kept / kept.sum(-1, keepdim=True).clamp_min(torch.finfo(kept.dtype).eps)
    shared = torch.ones(*routed.shape[:-1], n_shared, device=x.device)
    return torch.cat([shared, routed], -1), probs, mask


def gate_heads(z: Tensor, gates: Tensor) -> Tensor:
    """``hook_z`` ``[..., heads, d_head]`` times each head's gate (fp32; the bridge casts back)."""
    return z.float() * gates.to(z.device).unsqueeze(-1)


def top_k_for(fraction: float, n_heads: int, n_shared: int) -> int:
    """The ``top_k`` (routed heads per token) whose active fraction ``(n_shared + k) / n_heads``
    is nearest ``fraction``, kept within ``[1, n_heads - n_shared]``."""
    k = round(fraction * n_heads) - n_shared
    return min(max(k, 1), n_heads - n_shared)


class RoutedHeads(nn.Module):
    """A router per routed layer, applied to a ``HookBridge`` by ``routing()``.

    ``top_k`` may be changed between runs to trade quality for active heads. While routing, each
    layer's last ``Routing`` is kept in ``self.last`` (for the balance loss) and, when
    ``record()`` is on, mean gates are accumulated (head importance).
    """

    def __init__(self, model_or_bridge, n_shared: int = 1, top_k: int | None = None,
                 layers: Sequence[int] | None = None, seed: int = 0):
        super().__init__()
        config = model_or_bridge.config
        dims = model_dims(config)
        d_model, n_heads, n_layers = dims.d_model, dims.n_heads, dims.n_layers
        layers = check_layers(layers, n_layers)
        n_routed = n_heads - n_shared
        top_k = (n_routed + 1) // 2 if top_k is None else top_k
        generator = torch.Generator().manual_seed(seed)
        self.routers = nn.ModuleDict({str(i): HeadRouter(d_model, n_heads, n_shared,
                                                         generator=generator) for i in layers})
        self.n_layers, self.n_heads, self.n_shared = n_layers, n_heads, n_shared
        self.top_k = top_k  # checked by the property setter
        self.last: dict[int, Routing] = {}
        self._gate_sum: Tensor | None = None  # accumulating inside record()
        self._token_count = 0
        self._recorded: tuple[Tensor | None, int] = (None, 0)

    # ---------------------------------------------------------------- settings
    @property
    def layers(self) -> list[int]:
        return [int(i) for i in self.routers]

    @property
    def n_routed(self) -> int:
        return self.n_heads - self.n_shared

    @property
    def top_k(self) -> int:
        return self._top_k

    @top_k.setter
    def top_k(self, value: int) -> None:
        if not 1 <= value <= self.n_routed:
            raise UsageError(f"top_k must be in [1, {self.n_routed}] (the routed heads: "
                             f"{self.n_heads} heads - {self.n_shared} shared), got {value}.")
        self._top_k = int(value)

    @property
    def active_fraction(self) -> float:
        """Fraction of all attention heads that run per token (unrouted layers count fully)."""
        routed = len(self.routers)
        per_routed = (self.n_shared + self.top_k) / self.n_heads
        return (routed * per_routed + (self.n_layers - routed)) / self.n_layers

    # ---------------------------------------------------------------- running
    def route(self, layer: int, resid_pre: Tensor) -> Routing:
        """Routing of one layer's input; also kept in ``self.last`` and the gate record."""
        routing = self.routers[str(layer)](resid_pre, self.top_k)
        self.last[layer] = routing
        if self._gate_sum is not None:
            gates = routing.gates.detach().flatten(0, -2)
            self._gate_sum[layer] += gates.sum(0).to(self._gate_sum.device)
            if layer == self.layers[0]:
                self._token_count += gates.shape[0]
        return routing

    def hooks(self, sendable: bool = False) -> list[tuple[str, callable]]:
        """Bridge hooks: read each routed layer's input, gate its ``hook_z`` before o_proj.

        ``sendable=True``: hooks that hold only the routers' weights and torch functions, for a
        remote bridge (inference only: nothing is recorded here, no gradients).
        """
        hooks = []
        for layer in self.layers:
            if sendable:
                weight, k, shared = self.routers[str(layer)].weight.detach(), self.top_k, \
                    self.n_shared
                last: dict = {}

                def read(x, name, weight=weight, k=k, shared=shared, last=last):
                    last["gates"] = route(weight, x, k, shared)[0]

                def gate(z, name, last=last):
                    return gate_heads(z, last["gates"])
            else:
                def read(x, name, layer=layer):
                    self.route(layer, x)

                def gate(z, name, layer=layer):
                    return gate_heads(z, self.last[layer].gates)

            hooks += [(f"blocks.{layer}.hook_resid_pre", read),
                      (f"blocks.{layer}.attn.hook_z", gate)]
        return hooks

    @contextmanager
    def routing(self, bridge: HookBridge) -> Iterator[HookBridge]:
        """Inside the block every forward and generation of ``bridge`` is routed (on a remote
        bridge too, at inference: the routers' weights travel with each request)."""
        if not isinstance(bridge, HookBridge):
            raise TypeError("routing() needs a HookBridge: HookBridge(model, tokenizer).")
        self.to(bridge.device)
        with bridge.hooks(self.hooks(sendable=bridge.remote is not None)):
            yield bridge

    def balance_loss(self) -> Tensor:
        """Mean over routed layers of the load-balancing loss of the last forward."""
        if not self.last:
            raise RuntimeError("No routing recorded yet: run a forward inside routing() first.")
        losses = [load_balancing_loss(r.probs.flatten(0, -2), r.topk_mask.flatten(0, -2))
                  for r in self.last.values()]
        return torch.stack(losses).mean()

    @contextmanager
    def record(self) -> Iterator[None]:
        """Accumulate mean gates per (layer, head) over every forward in the block."""
        self._gate_sum = torch.zeros(self.n_layers, self.n_heads, dtype=torch.float64)
        self._token_count = 0
        try:
            yield
        finally:
            self._recorded = (self._gate_sum, self._token_count)
            self._gate_sum = None

    def mean_gates(self) -> Tensor:
        """``[n_layers, n_heads]`` mean gate of the last ``record()``; unrouted layers are 1."""
        gate_sum, count = self._recorded
        if not count:
            raise RuntimeError("No gates recorded: run forwards inside `with router.record():`.")
        means = (gate_sum / count).float()
        unrouted = [i for i in range(self.n_layers) if str(i) not in self.routers]
        means[unrouted] = 1.0
        return means

    # ---------------------------------------------------------------- persistence
    def settings(self) -> dict:
        """The shape and routing settings (saved next to the weights)."""
        return {"n_layers": self.n_layers, "n_heads": self.n_heads, "n_shared": self.n_shared,
                "top_k": self.top_k, "layers": self.layers}

    def save(self, path: str | Path) -> Path:
        """Write ``router.pt`` (weights) and ``router.json`` (settings) into directory ``path``."""
        from ..common.atomic import atomic_path, write_json_atomic  # not sent to servers

        path = Path(path)
        with atomic_path(path / "router.pt") as tmp:
            torch.save({k: v.detach().cpu() for k, v in self.state_dict().items()}, tmp)
        write_json_atomic(path / "router.json", self.settings(), indent=1)
        return path

    @classmethod
    def load(cls, path: str | Path, model_or_bridge) -> "RoutedHeads":
        """A router set saved by ``save`` for ``model_or_bridge`` (its shapes are checked)."""
        path = Path(path)
        if not (path / "router.json").exists():
            raise UsageError(f"No saved router in {path} (expected router.json and router.pt, "
                             f"written by RoutedHeads.save).")
        settings = json.loads((path / "router.json").read_text())
        dims = model_dims(model_or_bridge.config)
        n_heads, n_layers = dims.n_heads, dims.n_layers
        if (settings["n_heads"], settings["n_layers"]) != (n_heads, n_layers):
            raise UsageError(f"The router in {path} was trained for {settings['n_layers']} "
                             f"layers x {settings['n_heads']} heads; this model has "
                             f"{n_layers} x {n_heads}.")
        router = cls(model_or_bridge, settings["n_shared"], settings["top_k"], settings["layers"])
        router.load_state_dict(torch.load(path / "router.pt", weights_only=True))
        return router


send_by_value(sys.modules[__name__])  # route / gate_heads run inside remote traces
