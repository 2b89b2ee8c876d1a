"""One activation edit as one object: what, where, how, how strongly, fitted on what.

    acts = cache_residuals(bridge, tok, train_texts, hook="resid_post", pool="last")
    edit = Edit.fit(acts, train_kinds, how="clamp", layers=[14], strength=0.0,
                    positive=("toxic",), negative=("nontoxic",), model="smollm2-135m")
    with edit.apply(bridge):               # a HookBridge or a TransformerLens model
        bridge.generate(...)
    edit.save("results/smollm2-135m/selected_edit"); edit = Edit.load(...)

``Edit`` is the only way ``lens_safety`` edits activations.

Where: at ``blocks.L.{w}`` for each edited layer L and each block-relative hook name w of
``where`` (default ``("hook_resid_post",)``; ``resid_pre`` / ``resid_mid`` / ``resid_post``
are short for the residual hooks). Any hook the model has can be named (``hook_mlp_out``,
``ln2.hook_normalized``, ``mlp.hook_post``, ``attn.hook_z``...); the hows below act on the last
axis, so they need an activation of the direction's width (the residual-shaped hooks
``[..., d_model]``). To edit every residual hook of every layer, give
``where=("hook_resid_pre", "hook_resid_mid", "hook_resid_post")`` and every layer (GPT-NeoX /
Pythia run attention and MLP in parallel and have no ``hook_resid_mid``).

How (per edited layer L; d_L a unit direction):

- ``project``: ``x - (x.d) d``, at the chosen hooks, each row's first real token left alone
  (see ``skip_first``). This is the one meaning of "project" in ``lens_safety``;
- ``subtract``: ``x - alpha d``;
- ``clamp``: ``x - max(x.d - t, 0) d``: only the part of the projection above ``t`` goes, so an
  activation that does not look toxic passes exactly as it was;
- ``leace``: ``x - P (x - mu)``, the least-squares concept eraser
  (:mod:`lens_safety.edits.leace`);
- ``orthogonalize``: ``x - (x.d) d`` baked into every parameter that writes to the residual
  stream (all layers, every token, no hooks: ``where`` and ``skip_first`` do not apply); the
  weights, and a tied output head, are restored bit for bit when the ``with`` block ends;
- the published detox edits ``aura``, ``mean_act``, ``linear_act``, ``iti_c``, ``caa``
  (:mod:`lens_safety.edits.peers`): a fitted ``state`` per hook point and one ``strength``
  (None: the paper's), fitted from texts by ``Edit.fit(model, labels, how=..., texts=...)``;
  the first real token is never edited.

Each layer keeps its own direction, strength and eraser whatever order the layers are given
in (they are sorted together); negative layers count from the end of the model it is applied
to.

:meth:`Edit.fit` fits each edited layer's direction (or eraser) on cached activations of two
class groups, and sets the strength in units of that layer's class gap ``g_L`` (mean projection
of the positive class minus the negative class): subtract ``alpha = strength * g_L``; clamp
``t = (negative-class mean projection) + strength * g_L``. Hook edits leave each row's first
real token alone by default (``skip_first``): in Llama-family models it carries massive
activations (an attention sink), and moving it wrecks the model. ``skip_first=False`` edits it
too.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from pruning_bridge.common import UsageError, check_layers
from pruning_bridge.common.atomic import write_json_atomic
from pruning_bridge.common.errors import require_local_weights
from pruning_bridge.common.jsonable import read_json

from ..backend import check_block_hooks, dims, edited_each, residual_writers, tied_head
from ..probing.caching import read_tensors, save_tensors, tensors_sha256
from ..probing.directions import class_labels, harmful_direction
from ..probing.probes import as_array
from .leace import LeaceEraser
from .peers import KINDS as PEER_HOWS
from .peers import PeerEdit, fit_peer
from .trace_math import clamp_along, leace_erase, project_out, subtract_along

DIRECTION_HOWS = ("project", "subtract", "clamp", "leace", "orthogonalize")
HOWS = DIRECTION_HOWS + PEER_HOWS  # the peers: aura, mean_act, linear_act, iti_c, caa
RESIDUAL = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")
# block-relative hooks whose activations are [..., d_model] (the width check of ``apply``)
D_MODEL_HOOKS = (*RESIDUAL, "hook_attn_out", "hook_mlp_out", "hook_mlp_in",
                 "ln1.hook_normalized", "ln2.hook_normalized")
STATE_FILE, CONFIG_FILE = "edit.safetensors", "edit.json"


def block_hook(name: str) -> str:
    """A block-relative hook name as the model spells it: ``resid_post`` -> ``hook_resid_post``
    (the short residual forms); anything else as given, checked to be block-relative."""
    name = str(name)
    if name in ("resid_pre", "resid_mid", "resid_post"):
        return "hook_" + name
    if name.startswith("blocks.") or not name or name.startswith(".") or name.endswith("."):
        raise UsageError(f"where={name!r}: give hook names inside a block, such as "
                         f"'hook_resid_post' or 'ln2.hook_normalized' (the layers come from "
                         f"layers=[...]).")
    return name


def unit_direction(direction, d_model: int) -> Tensor:
    """``direction`` as a unit float32 vector, checked to have the model's width."""
    d = torch.as_tensor(direction).detach().float()
    if d.shape != (d_model,):
        raise UsageError(f"The direction has shape {tuple(d.shape)} but this model's residual "
                         f"stream has width d_model={d_model}: use a direction [d_model] found "
                         f"on the same model.")
    norm = d.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise UsageError("The direction is zero or not finite.")
    return d / norm


@dataclass
class Edit:
    """An edit ready to apply: ``how`` at ``layers`` and the block-relative hooks ``where``
    (see the module doc), with one direction (or a LEACE eraser) and one strength (``alpha`` /
    threshold ``t``) per layer, the i-th for the i-th layer (stored sorted by layer, each with
    its own); ``info`` says what it was fitted on (model, data, method, classes, strength in
    class-gap units)."""

    how: str
    layers: list[int]
    directions: Tensor | None = None          # [len(layers), d_model] (or a list), unit rows
    strengths: list[float] | None = None      # alpha (subtract) or t (clamp), per layer
    erasers: list[LeaceEraser] | None = None  # leace, per layer
    where: tuple[str, ...] = ("hook_resid_post",)
    skip_first: bool = True
    info: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Tensor] | None = None    # a peer's fitted state {blocks.L.hook.key: ...}
    strength: float | None = None             # a peer's strength (None: the published one)

    def __post_init__(self):
        if self.how not in HOWS:
            raise UsageError(f"Unknown edit {self.how!r}; use one of {', '.join(HOWS)}.")
        self.layers = [int(layer) for layer in self.layers]
        where = (self.where,) if isinstance(self.where, str) else tuple(self.where)
        if not where:
            raise UsageError("where=() edits nothing: name at least one hook, e.g. "
                             "where=('hook_resid_post',).")
        self.where = tuple(dict.fromkeys(block_hook(name) for name in where))
        if self.how in PEER_HOWS:
            self._check_peer()
            return
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

    def _check_peer(self) -> None:
        """A peer's state holds exactly the hooks ``where`` at ``layers`` (and its kind's keys)."""
        if self.state is None:
            raise UsageError(f"A {self.how} edit needs its fitted state: Edit.fit(model, labels, "
                             f"how={self.how!r}, texts=...) or Edit.from_state(...).")
        peer = PeerEdit(self.how, dict(self.state), self.strength)  # keys and strength checked
        self.state, self.strength = peer.state, peer.strength
        if any(layer < 0 for layer in self.layers):
            raise UsageError(f"A {self.how} edit's layers are the blocks its state was fitted "
                             f"at (0 or more); got {self.layers}.")
        self._sort_layers()
        expected = {f"blocks.{layer}.{hook}" for layer in self.layers for hook in self.where}
        held = set(peer.names)
        if expected != held:
            raise UsageError(
                f"The {self.how} state holds {sorted(held)[:4]}..., not where={self.where} at "
                f"layers={self.layers}: build it with Edit.from_state(how, state) (they are read "
                f"from the state).")

    # ---------------------------------------------------------------- building
    @classmethod
    def from_state(cls, how: str, state: dict[str, Tensor], strength: float | None = None,
                   **info) -> "Edit":
        """A peer edit (``aura``, ``mean_act``, ``linear_act``, ``iti_c``, ``caa``) from a state
        fitted by :func:`lens_safety.edits.peers.fit_peer`; ``layers`` and ``where`` are read
        from its keys."""
        if how not in PEER_HOWS:
            raise UsageError(f"from_state builds the fitted peers ({', '.join(PEER_HOWS)}); "
                             f"got {how!r}.")
        peer = PeerEdit(how, dict(state), strength)
        layers = sorted({int(name.split(".")[1]) for name in peer.names})
        where = tuple(dict.fromkeys(name.split(".", 2)[2] for name in peer.names))
        return cls(how, layers, where=where, state=peer.state, strength=peer.strength,
                   info=info)

    @classmethod
    def from_direction(cls, direction, how: str = "project", layers: Sequence[int] = (),
                       alpha: float = 1.0, threshold: float = 0.0,
                       where: Sequence[str] = ("hook_resid_post",), skip_first: bool = True,
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
                   where=where, skip_first=skip_first, info=info)

    @classmethod
    def fit(cls, acts, labels: Sequence, how: str, layers: Sequence[int] | None = None,
            strength: float | None = None, method: str = "mean_diff",
            positive: Sequence | None = None, negative: Sequence | None = None,
            direction_layer: int | None = None, where: Sequence[str] | None = None,
            skip_first: bool = True, texts: Sequence[str] | None = None,
            fit_options: dict[str, Any] | None = None, **info) -> "Edit":
        """Fit an edit on cached activations ``acts`` ``[n_layers, n, d_model]`` (read at the
        hook it will edit) and their ``labels``: per layer of ``layers`` a ``method`` direction
        (or with ``direction_layer``, that layer's direction everywhere) or a LEACE eraser,
        comparing the ``positive`` with the ``negative`` classes (default: harmful vs neutral).
        ``strength`` is in class-gap units (see the module doc; subtract default 1, clamp 0)."""
        if how not in HOWS:
            raise UsageError(f"Unknown edit {how!r}; use one of {', '.join(HOWS)}.")
        if how in PEER_HOWS:  # acts is the model; texts and labels say what to fit on
            if texts is None or len(texts) != len(labels):
                raise UsageError(f"A {how} edit is fitted on texts: pass texts=[...] with one "
                                 f"label each ({len(labels)} labels).")
            rows, y = class_labels(labels, positive, negative)
            chosen = [texts[i] for i in rows]
            state = fit_peer(how, acts, [t for t, c in zip(chosen, y) if c == 1],
                             [t for t, c in zip(chosen, y) if c == 0], where=where,
                             layers=layers, **(fit_options or {}))
            return cls.from_state(how, state, strength, **dict(
                info, positive=None if positive is None else list(positive),
                negative=None if negative is None else list(negative), n_fit=int(len(rows))))
        if layers is None:
            raise UsageError("Say where to edit: layers=[...] (e.g. list(range(n_layers))).")
        where = ("hook_resid_post",) if where is None else where
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
            return cls(how, layers, erasers=erasers, where=where, skip_first=skip_first,
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
        return cls(how, layers, directions=directions, strengths=strengths, where=where,
                   skip_first=skip_first, info=info)

    # ---------------------------------------------------------------- applying
    def _edit_fn(self, i: int):
        # closures over tensors and trace_math only: they can be sent to an NDIF server
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
        if self.how in PEER_HOWS:
            if max(self.layers) >= dims(model)[0]:
                raise UsageError(f"This {self.how} edit was fitted at layers {self.layers}; the "
                                 f"model has {dims(model)[0]}. Fit it on this model.")
            with PeerEdit(self.how, self.state, self.strength).apply(model):
                yield model
            return
        n_layers, d_model = dims(model)
        if self.d_model != d_model and (self.how == "orthogonalize"
                                        or set(self.where) <= set(D_MODEL_HOOKS)):
            raise UsageError(f"This edit was fitted on d_model={self.d_model}; the model has "
                             f"d_model={d_model}. Fit it on this model's activations.")
        if self.how == "orthogonalize":
            with _orthogonalized(model, self.directions[0]):
                yield model
            return
        blocks = self.blocks(n_layers)
        check_block_hooks(model, self.where)
        edits = {f"blocks.{block}.{hook}": self._edit_fn(i)
                 for i, block in enumerate(blocks) for hook in self.where}
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
        if self.how in PEER_HOWS:
            return PeerEdit(self.how, self.state, self.strength, self.info).config
        state = b"".join(t.detach().float().cpu().contiguous().numpy().tobytes()
                         for t in self._tensors().values())
        return {"how": self.how, "layers": self.layers, "where": list(self.where),
                "strength": self.info.get("strength"), "method": self.info.get("method"),
                "positive": self.info.get("positive"), "negative": self.info.get("negative"),
                "direction_layer": self.info.get("direction_layer"),
                "skip_first": self.skip_first, "vectors": hashlib.sha256(state).hexdigest()[:12]}

    def __str__(self) -> str:
        if self.how in PEER_HOWS:
            return str(PeerEdit(self.how, self.state, self.strength))
        where = (f"L{self.layers[0]}" if len(self.layers) == 1
                 else f"L{self.layers[0]}-{self.layers[-1]}"
                 if self.layers[0] >= 0
                 and self.layers == list(range(self.layers[0], self.layers[-1] + 1))
                 else "L" + ",".join(map(str, self.layers)))
        if self.how == "orthogonalize":
            where = "weights"
        elif self.where != ("hook_resid_post",):
            where += "@" + "+".join(name.removeprefix("hook_") for name in self.where)
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
        if self.how in PEER_HOWS:
            return dict(self.state)
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
                           "strength": self.strength,
                           "where": list(self.where), "skip_first": self.skip_first,
                           "info": self.info, "summary": str(self),
                           "state_sha256": tensors_sha256(tensors)}, indent=1, default=str)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "Edit":
        """The edit saved in ``folder`` by :meth:`save` (or a ``CombinedEdit`` saved there by
        its own ``save``); a missing, damaged or foreign file is
        a ``UsageError`` naming it and what is wrong."""
        folder = Path(folder)
        from .combined import COMBINED_FILE, CombinedEdit

        if (folder / COMBINED_FILE).exists():  # several edits saved together
            return CombinedEdit.load(folder)
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
            peer = config["how"] in PEER_HOWS
            return cls(config["how"], config["layers"], directions=tensors.get("directions"),
                       state=tensors if peer else None, strength=config.get("strength"),
                       strengths=config["strengths"], erasers=erasers,
                       where=tuple(config["where"] if "where" in config
                                   else config["hooks"]),  # files saved before `where`
                       skip_first=config["skip_first"],
                       info=config["info"])
        except KeyError as error:
            problem = f"{config_path.name} has no key {error}"
        except (AttributeError, TypeError, ValueError) as error:  # UsageError is a ValueError
            problem = str(error).rstrip(".")
        raise UsageError(f"{folder} is not a usable saved edit ({problem}). {fix}")


# ---------------------------------------------------------------- orthogonalize: the weights


@contextmanager
def _orthogonalized(model, direction: Tensor) -> Iterator:
    """``x - (x.d) d`` baked into every residual writer inside the ``with`` block. A tied
    output head (GPT-2, Qwen3, SmolLM2) gets its own copy of the embedding for the block, so
    the unembedding is unchanged; every weight and the tie are restored exactly on exit."""
    require_local_weights(model, "Orthogonalising weights")
    d = unit_direction(direction, dims(model)[1])
    writers = residual_writers(model)
    saved = [param.detach().clone() for param, _ in writers]
    head = tied_head(model)
    shared = head.weight if head is not None else None
    try:
        if head is not None:
            head.weight = nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad)
        with torch.no_grad():
            for param, axis in writers:
                param.copy_(project_out(param.detach(), d, axis))
        yield model
    finally:
        with torch.no_grad():
            for (param, _), original in zip(writers, saved):
                param.copy_(original)
        if head is not None:
            head.weight = shared
