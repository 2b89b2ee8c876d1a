"""One edit of the residual stream as one object: what, where, how, how strongly, fitted on what.

    acts = cache_residuals(bridge, tok, train_texts, hook="resid_post", pool="last")
    edit = Edit.fit(acts, train_kinds, how="clamp", layers=[14], strength=0.0,
                    positive=("toxic",), negative=("nontoxic",), model="smollm2-135m")
    with edit.apply(bridge):               # a HookBridge or a TransformerLens model
        bridge.generate(...)
    edit.save("results/smollm2-135m/selected_edit"); edit = Edit.load(...)

``how`` (per edited layer L, at ``blocks.L.hook_{h}`` for h in ``hooks``; d_L a unit direction):

- ``project``: ``x - (x.d) d``;
- ``subtract``: ``x - alpha d``;
- ``clamp``: ``x - max(x.d - t, 0) d``: only the part of the projection above ``t`` goes, so an
  activation that does not look toxic passes exactly as it was;
- ``leace``: ``x - P (x - mu)``, the least-squares concept eraser (:mod:`lens_safety.leace`);
- ``orthogonalize``: the projection baked into every residual writer (all layers, no hooks).

Each layer keeps its own direction, strength and eraser whatever order the layers are given
in (they are sorted together); negative layers count from the end of the model it is applied
to.

:meth:`Edit.fit` fits each edited layer's direction (or eraser) on cached activations of two
class groups, and sets the strength in units of that layer's class gap ``g_L`` (mean projection
of the positive class minus the negative class): subtract ``alpha = strength * g_L``; clamp
``t = (negative-class mean projection) + strength * g_L``. Hook edits leave each row's first
real token alone by default (``skip_first``): in Llama-family models it carries massive
activations (an attention sink), and moving it wrecks the model.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from pruning_bridge.common import UsageError, check_layers
from pruning_bridge.common.atomic import write_json_atomic
from pruning_bridge.common.jsonable import read_json

from .backend import dims, edited_each, residual_hooks
from .caching import hook_name, read_tensors, save_tensors, tensors_sha256
from .directions import class_labels, harmful_direction
from .trace_math import clamp_along, leace_erase, project_out, subtract_along
from .editing import orthogonalize, unit_direction
from .leace import LeaceEraser
from .probes import as_array

HOWS = ("project", "subtract", "clamp", "leace", "orthogonalize")
STATE_FILE, CONFIG_FILE = "edit.safetensors", "edit.json"


@dataclass
class Edit:
    """An edit ready to apply: ``how`` at ``layers`` (and ``hooks``), with one direction (or a
    LEACE eraser) and one strength (``alpha`` / threshold ``t``) per layer, the i-th for the
    i-th layer (stored sorted by layer, each with its own); ``info`` says what it was fitted on
    (model, data, method, classes, strength in class-gap units)."""

    how: str
    layers: list[int]
    directions: Tensor | None = None          # [len(layers), d_model] (or a list), unit rows
    strengths: list[float] | None = None      # alpha (subtract) or t (clamp), per layer
    erasers: list[LeaceEraser] | None = None  # leace, per layer
    hooks: tuple[str, ...] = ("resid_post",)
    skip_first: bool = True
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.how not in HOWS:
            raise UsageError(f"Unknown edit {self.how!r}; use one of {', '.join(HOWS)}.")
        self.layers = [int(layer) for layer in self.layers]
        self.hooks = tuple(self.hooks)
        n = len(self.layers)
        if self.directions is not None:  # [n, d_model] (or n vectors) -> unit rows
            self.directions = torch.stack([unit_direction(d, len(d)) for d in self.directions])
        if self.how == "leace":
            if self.erasers is None or len(self.erasers) != n:
                raise UsageError(f"A leace edit needs one fitted eraser per layer ({n}).")
        elif self.directions is None or self.directions.shape[0] != n:
            raise UsageError(f"A {self.how} edit needs one direction per layer ({n}): "
                             f"directions [{n}, d_model].")
        if self.how in ("subtract", "clamp") and (self.strengths is None
                                                  or len(self.strengths) != n):
            raise UsageError(f"A {self.how} edit needs one strength per layer ({n}).")
        if self.how == "orthogonalize" and n != 1:
            raise UsageError("orthogonalize bakes one direction into every residual writer: "
                             "give exactly one direction (layers=[the layer it came from]).")
        self._sort_layers()

    def _sort_layers(self) -> None:
        """Sort ``layers`` and every per-layer value (directions, strengths, erasers) together."""
        twice = sorted({layer for layer in self.layers if self.layers.count(layer) > 1})
        if twice:
            raise UsageError(f"Layer(s) {twice} given more than once in {self.layers}; give "
                             f"each layer once, with its own direction.")
        order = sorted(range(len(self.layers)), key=self.layers.__getitem__)
        self.layers = [self.layers[i] for i in order]
        if self.directions is not None:
            self.directions = self.directions[order]
        if self.strengths is not None:
            self.strengths = [self.strengths[i] for i in order]
        if self.erasers is not None:
            self.erasers = [self.erasers[i] for i in order]

    # ---------------------------------------------------------------- building
    @classmethod
    def from_direction(cls, direction, how: str = "project", layers: Sequence[int] = (),
                       alpha: float = 1.0, threshold: float = 0.0,
                       hooks: Sequence[str] = ("resid_post",), skip_first: bool = True,
                       **info) -> "Edit":
        """One given direction at each of ``layers`` (``alpha`` for subtract, ``threshold`` for
        clamp); for orthogonalize ``layers`` is the direction's own layer (or empty)."""
        d = torch.as_tensor(direction).detach().float()
        layers = list(layers) or ([0] if how == "orthogonalize" else [])
        if not layers:
            raise UsageError("Say where to edit: layers=[...] (e.g. list(range(n_layers))).")
        strength = {"subtract": alpha, "clamp": threshold}.get(how)
        return cls(how, layers, directions=d.expand(len(layers), -1).clone(),
                   strengths=None if strength is None else [float(strength)] * len(layers),
                   hooks=hooks, skip_first=skip_first, info=info)

    @classmethod
    def fit(cls, acts, labels: Sequence, how: str, layers: Sequence[int],
            strength: float | None = None, method: str = "mean_diff",
            positive: Sequence | None = None, negative: Sequence | None = None,
            direction_layer: int | None = None, hooks: Sequence[str] = ("resid_post",),
            skip_first: bool = True, **info) -> "Edit":
        """Fit an edit on cached activations ``acts`` ``[n_layers, n, d_model]`` (read at the
        hook it will edit) and their ``labels``: per layer of ``layers`` a ``method`` direction
        (or with ``direction_layer``, that layer's direction everywhere) or a LEACE eraser,
        comparing the ``positive`` with the ``negative`` classes (default: harmful vs neutral).
        ``strength`` is in class-gap units (see the module doc; subtract default 1, clamp 0)."""
        if how not in HOWS:
            raise UsageError(f"Unknown edit {how!r}; use one of {', '.join(HOWS)}.")
        X = as_array(acts)
        if X.ndim != 3:
            raise UsageError(f"acts must be [n_layers, n, d_model]; got {tuple(X.shape)}.")
        layers = check_layers(list(layers), X.shape[0])
        rows, y = class_labels(labels, positive, negative)
        info = dict(info, method=method if how != "leace" else "leace",
                    positive=None if positive is None else list(positive),
                    negative=None if negative is None else list(negative),
                    direction_layer=direction_layer, strength=strength, n_fit=int(len(rows)))
        if how == "leace":
            erasers = [LeaceEraser().fit(torch.from_numpy(X[layer][rows]).float(),
                                         torch.from_numpy(y)) for layer in layers]
            return cls(how, layers, erasers=erasers, hooks=hooks, skip_first=skip_first,
                       info=info)
        kw = dict(method=method, positive=positive, negative=negative)
        if direction_layer is not None:
            shared = harmful_direction(X, labels, layer=direction_layer, **kw)
            directions = torch.stack([shared] * len(layers))
        else:
            directions = torch.stack([harmful_direction(X, labels, layer=layer, **kw)
                                      for layer in layers])
        strengths = None
        if how in ("subtract", "clamp"):
            strength = (1.0 if how == "subtract" else 0.0) if strength is None else strength
            info["strength"] = strength
            strengths = []
            for layer, d in zip(layers, directions):
                proj = X[layer][rows].astype(np.float64) @ d.double().numpy()
                pos, neg = proj[y == 1].mean(), proj[y == 0].mean()
                gap = pos - neg
                strengths.append(float(strength * gap if how == "subtract"
                                       else neg + strength * gap))
        if how == "orthogonalize":
            if len(layers) != 1 and direction_layer is None:
                raise UsageError("orthogonalize uses one direction: pass direction_layer=L "
                                 "or a single layer.")
            layers, directions = layers[:1], directions[:1]
        return cls(how, layers, directions=directions, strengths=strengths, hooks=hooks,
                   skip_first=skip_first, info=info)

    # ---------------------------------------------------------------- applying
    def _edit_fn(self, i: int):
        # closures over tensors and edit_math only: they can be sent to an NDIF server
        if self.how == "leace":
            mean, left, right = self.erasers[i]._applied(torch.device("cpu"))
            return lambda x: leace_erase(x, mean, left, right)
        d = self.directions[i]
        if self.how == "project":
            return lambda x: project_out(x, d)
        if self.how == "subtract":
            alpha = self.strengths[i]
            return lambda x: subtract_along(x, d, alpha)
        t = self.strengths[i]
        return lambda x: clamp_along(x, d, t)

    @contextmanager
    def apply(self, model) -> Iterator:
        """Inside the block ``model`` (a HookBridge or a TransformerLens model) runs edited:
        forward, caching and generation; it is exactly as before on exit."""
        n_layers, d_model = dims(model)
        if self.d_model != d_model:
            raise UsageError(f"This edit was fitted on d_model={self.d_model}; the model has "
                             f"d_model={d_model}. Fit it on this model's activations.")
        if self.how == "orthogonalize":
            with orthogonalize(model, self.directions[0]):
                yield model
            return
        blocks = self.blocks(n_layers)
        available = residual_hooks(model)
        missing = [h for h in self.hooks if h not in available]
        if missing:
            raise UsageError(f"This model has no {missing} hooks; use some of {available}.")
        edits = {hook_name(block, hook): self._edit_fn(i)
                 for i, block in enumerate(blocks) for hook in self.hooks}
        with edited_each(model, edits, skip_first=self.skip_first):
            yield model

    def blocks(self, n_layers: int) -> list[int]:
        """The block each of ``layers`` edits in a model of ``n_layers`` blocks (negative
        layers count from the end); out of range, or one block twice, is a ``UsageError``."""
        check_layers(self.layers, n_layers)  # OutOfRangeError names the bad ones
        blocks = [layer % n_layers for layer in self.layers]
        twice = sorted({block for block in blocks if blocks.count(block) > 1})
        if twice:
            raise UsageError(f"Layers {self.layers} edit block(s) {twice} twice in this "
                             f"{n_layers}-layer model; give each block once.")
        return blocks

    # ---------------------------------------------------------------- describing
    @property
    def d_model(self) -> int:
        if self.how == "leace":
            return int(self.erasers[0].mean_.shape[-1])
        return int(self.directions.shape[-1])

    @property
    def config(self) -> dict[str, Any]:
        """What identifies this edit in a sweep's results (JSON; the vectors as a digest)."""
        state = b"".join(t.detach().float().cpu().contiguous().numpy().tobytes()
                         for t in self._tensors().values())
        return {"how": self.how, "layers": self.layers, "hooks": list(self.hooks),
                "strength": self.info.get("strength"), "method": self.info.get("method"),
                "positive": self.info.get("positive"), "negative": self.info.get("negative"),
                "direction_layer": self.info.get("direction_layer"),
                "skip_first": self.skip_first, "vectors": hashlib.sha256(state).hexdigest()[:12]}

    def __str__(self) -> str:
        where = (f"L{self.layers[0]}" if len(self.layers) == 1
                 else f"L{self.layers[0]}-{self.layers[-1]}"
                 if self.layers[0] >= 0
                 and self.layers == list(range(self.layers[0], self.layers[-1] + 1))
                 else "L" + ",".join(map(str, self.layers)))
        if self.how == "orthogonalize":
            where = "weights"
        strength = self.info.get("strength")
        gap = f" {strength:+g} gap" if strength is not None and self.how in (
            "subtract", "clamp") else ""
        classes = ""
        if self.info.get("source"):
            classes = f" [{self.info['source']}]"
        elif self.info.get("positive"):
            classes = f" ({'+'.join(map(str, self.info['positive']))} vs " \
                      f"{'+'.join(map(str, self.info['negative']))})"
        return f"{self.how} {where}{gap}{classes}"

    # ---------------------------------------------------------------- saving
    def _tensors(self) -> dict[str, Tensor]:
        if self.how == "leace":
            return {f"eraser.{i}.{k}": v for i, e in enumerate(self.erasers)
                    for k, v in e.state_dict().items()}
        return {"directions": self.directions}

    def save(self, folder: str | Path) -> Path:
        """``edit.safetensors`` (directions or erasers) + ``edit.json`` (everything else, and
        the tensors' checksum), each written atomically."""
        folder = Path(folder)
        tensors = self._tensors()
        save_tensors(folder / STATE_FILE, tensors)
        write_json_atomic(folder / CONFIG_FILE,
                          {"how": self.how, "layers": self.layers, "strengths": self.strengths,
                           "hooks": list(self.hooks), "skip_first": self.skip_first,
                           "info": self.info, "summary": str(self),
                           "state_sha256": tensors_sha256(tensors)}, indent=1, default=str)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "Edit":
        """The edit saved in ``folder`` by :meth:`save`; a missing, damaged or foreign file is
        a ``UsageError`` naming it and what is wrong."""
        folder = Path(folder)
        config_path, state_path = folder / CONFIG_FILE, folder / STATE_FILE
        if not config_path.exists() or not state_path.exists():
            raise UsageError(f"No saved edit in {folder}: expected {CONFIG_FILE} and "
                             f"{STATE_FILE} (written by Edit.save).")
        fix = "Save the edit again with Edit.save (or rerun the command that wrote it)."
        config = read_json(config_path, fix)
        tensors, _ = read_tensors(state_path, fix)
        try:
            checksum = config.get("state_sha256")
            if checksum is not None and checksum != tensors_sha256(tensors):
                raise UsageError(f"{STATE_FILE} is not the one saved with {CONFIG_FILE}")
            erasers = None
            if config["how"] == "leace":
                erasers = []
                for i in range(len(config["layers"])):
                    prefix = f"eraser.{i}."
                    erasers.append(LeaceEraser.from_state_dict(
                        {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}))
            return cls(config["how"], config["layers"], directions=tensors.get("directions"),
                       strengths=config["strengths"], erasers=erasers,
                       hooks=tuple(config["hooks"]), skip_first=config["skip_first"],
                       info=config["info"])
        except KeyError as error:
            problem = f"{config_path.name} has no key {error}"
        except (AttributeError, TypeError, ValueError) as error:  # UsageError is a ValueError
            problem = str(error).rstrip(".")
        raise UsageError(f"{folder} is not a usable saved edit ({problem}). {fix}")
