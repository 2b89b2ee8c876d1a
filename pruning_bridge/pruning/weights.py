"""Weight pruning of the Linear layers in the decoder blocks: magnitude, Wanda and N:M masks.

A *mask* is a bool tensor shaped like a layer's weight, True where the weight is zeroed (as in
Wanda's ``lib/prune.py``). The ``*_masks`` functions compute masks without touching the model;
``apply_masks`` (and its shortcuts ``magnitude_prune``, ``wanda_prune``, ``nm_prune``) zeroes them
inside a ``with`` block and restores every weight bit for bit on exit, also on an exception;
``prune_permanently`` zeroes them for good. Both report the achieved sparsity per matrix.

"Per output row" means per output feature: row ``i`` of an ``nn.Linear`` weight ``[out, in]``,
but column ``i`` of a GPT-2 ``Conv1D`` weight, which is stored ``[in, out]``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from numbers import Real
from typing import Iterator, Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..bridge import architecture_of
from ..common.errors import UsageError, require_local_weights
from ..evals.lm import forward_logits

Patterns = str | Sequence[str] | None
SCOPES = ("per_matrix", "global")
_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
         torch.bfloat16: torch.int16}


# ---------------------------------------------------------------- which matrices


def _as_list(patterns: Patterns) -> list[str]:
    return [patterns] if isinstance(patterns, str) else list(patterns or [])


def prunable_linears(model: nn.Module, include: Patterns = None,
                     exclude: Patterns = None) -> dict[str, nn.Module]:
    """The Linear (and GPT-2 ``Conv1D``) layers inside the decoder blocks, by qualified name.

    Embeddings, norms and the LM head live outside the blocks or are not linear, so they are
    never selected. ``include`` and ``exclude`` are regular expressions searched anywhere in the
    qualified name (``re.search``; a plain substring such as ``"mlp"`` is one): a layer is kept
    when it matches some ``include`` pattern (all layers if None) and no ``exclude`` pattern.
    """
    require_local_weights(model, "Weight pruning")
    blocks = architecture_of(model).blocks + "."
    candidates = {name: module for name, module in model.named_modules()
                  if name.startswith(blocks) and isinstance(module, (nn.Linear, Conv1D))}
    include, exclude = _as_list(include), _as_list(exclude)
    selected = {name: module for name, module in candidates.items()
                if (not include or any(re.search(p, name) for p in include))
                and not any(re.search(p, name) for p in exclude)}
    if not selected:
        examples = ", ".join(list(candidates)[:6])
        raise UsageError(f"No prunable layer matches include={include} exclude={exclude}. The "
                         f"patterns are regular expressions searched in names such as: "
                         f"{examples} ({len(candidates)} in all).")
    return selected


def _rows(module: nn.Module) -> Tensor:
    """The weight as ``[out, in]`` (a view: GPT-2's ``Conv1D`` stores it ``[in, out]``)."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def _from_rows(module: nn.Module, mask: Tensor) -> Tensor:
    """A ``[out, in]`` mask in the layout of the module's weight."""
    return mask.T.contiguous() if isinstance(module, Conv1D) else mask


def check_sparsity(sparsity: float) -> None:
    """A ValueError unless ``sparsity`` is a fraction in [0, 1)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, Real) or not 0 <= sparsity < 1:
        percent = isinstance(sparsity, Real) and 1 <= sparsity < 100
        hint = f" (did you mean {sparsity / 100:g}?)" if percent else ""
        raise UsageError(f"sparsity must be a fraction in [0, 1), e.g. 0.5 to zero half of the "
                         f"weights; got {sparsity!r}{hint}.")


# ---------------------------------------------------------------- masks


def _smallest(score: Tensor, k: int) -> Tensor:
    """True at the ``k`` smallest entries of each row of the 2-D ``score``.

    Exactly ``k`` per row: among entries equal to the row's k-th smallest value, the ones with
    the lowest column index are taken first (a deterministic tie-break).
    """
    if k == 0:
        return torch.zeros_like(score, dtype=torch.bool)
    threshold = score.kthvalue(k, dim=1, keepdim=True).values
    mask = score < threshold
    ties = score == threshold
    missing = k - mask.sum(dim=1, keepdim=True)
    return mask | (ties & (ties.cumsum(dim=1) <= missing))


def _kth_smallest_abs(weights: Sequence[Tensor], k: int) -> Tensor:
    """The ``k``-th smallest ``|w|`` (1-based) over all ``weights``, exact, without copying them.

    Non-negative floats are ordered like their bit patterns read as integers, so a bisection
    over those integers finds the value in at most 31 counting passes (15 for 16-bit floats);
    each pass only counts ``|w| <= t`` matrix by matrix.
    """
    dtypes = {w.dtype for w in weights}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _BITS:
        raise UsageError(f"Global magnitude pruning needs one floating dtype in all selected "
                         f"matrices; found {sorted(map(str, dtypes))}.")
    dtype = dtypes.pop()
    bits = _BITS[dtype]

    def as_float(pattern: int) -> Tensor:
        return torch.tensor(pattern, dtype=bits).view(dtype)

    lo = 0
    hi = int(max(w.abs().max() for w in weights).view(bits))  # the k-th is at most the largest
    while lo < hi:
        mid = (lo + hi) // 2
        t = as_float(mid)
        if sum(int((w.abs() <= t.to(w.device)).sum()) for w in weights) >= k:
            hi = mid
        else:
            lo = mid + 1
    return as_float(lo)


def _global_masks(weights: Mapping[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """One threshold for all matrices: exactly ``round(sparsity * total)`` weights masked.

    Weights equal to the threshold (ties) are masked in the order of ``weights`` (the model's
    module order), then of the flat index within a matrix, until the count is reached.
    """
    k = round(sparsity * sum(w.numel() for w in weights.values()))
    if k == 0:
        return {name: torch.zeros_like(w, dtype=torch.bool) for name, w in weights.items()}
    threshold = _kth_smallest_abs(list(weights.values()), k)
    masks = {name: w.abs() < threshold.to(w.device) for name, w in weights.items()}
    missing = k - sum(int(mask.sum()) for mask in masks.values())
    for name, w in weights.items():
        if missing == 0:
            break
        ties = (w.abs() == threshold.to(w.device)).flatten()
        take = ties & (ties.cumsum(0) <= missing)
        masks[name] |= take.view_as(w)
        missing -= int(take.sum())
    return masks


@torch.no_grad()
def magnitude_masks(model: nn.Module, sparsity: float, scope: str = "per_matrix",
                    include: Patterns = None, exclude: Patterns = None) -> dict[str, Tensor]:
    """Masks of the ``sparsity`` fraction of smallest-``|w|`` weights.

    ``scope="per_matrix"`` (the Wanda paper's magnitude baseline): exactly
    ``round(sparsity * numel)`` per matrix, ties broken by the lowest flat index.
    ``scope="global"``: one threshold over all selected matrices, exactly
    ``round(sparsity * total)`` masked (ties: see ``_global_masks``); the threshold is found by
    counting, never by concatenating the weights into one copy.
    """
    check_sparsity(sparsity)
    if scope not in SCOPES:
        raise UsageError(f"scope must be one of {SCOPES}; got {scope!r}.")
    weights = {name: m.weight for name, m in prunable_linears(model, include, exclude).items()}
    if scope == "global":
        return _global_masks(weights, sparsity)
    return {name: _smallest(w.abs().reshape(1, -1), round(sparsity * w.numel())).view_as(w)
            for name, w in weights.items()}


@torch.no_grad()
def input_norms(model: nn.Module, tokenizer, texts: Sequence[str], include: Patterns = None,
                exclude: Patterns = None, max_length: int = 512,
                batch_size: int = 8) -> dict[str, Tensor]:
    """``||X_j||_2`` for each input feature ``j`` of each selected layer: Wanda's calibration.

    The norms run over every real token of ``texts`` (padding is masked out), read by forward
    pre-hooks on the layers' inputs during one pass of the unpruned model; squares are summed in
    float64. (Wanda's reference code instead feeds block ``i`` the outputs of the already pruned
    blocks ``0..i-1``.)
    """
    require_local_weights(model, "Wanda's input norms (calibration)")
    if isinstance(texts, str) or not texts:
        raise UsageError("texts must be a non-empty list of calibration strings.")
    linears = prunable_linears(model, include, exclude)
    sums = {name: torch.zeros(_rows(m).shape[1], dtype=torch.float64, device=m.weight.device)
            for name, m in linears.items()}
    real: dict[str, Tensor] = {}  # the current batch's attention mask, as bool

    def record(name: str):
        def hook(module, args):
            x = args[0][real["mask"].to(args[0].device)]  # [real tokens, in]
            sums[name] += x.double().pow(2).sum(0)
        return hook

    handles = [m.register_forward_pre_hook(record(name)) for name, m in linears.items()]
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(list(texts[start:start + batch_size]), return_tensors="pt",
                              padding=True, truncation=True, max_length=max_length)
            real["mask"] = batch["attention_mask"].bool()
            forward_logits(model, batch["input_ids"], batch["attention_mask"], last_only=True)
    finally:
        for handle in handles:
            handle.remove()
    return {name: s.sqrt() for name, s in sums.items()}


def _scores(model: nn.Module, norms: Mapping[str, Tensor] | None, include: Patterns,
            exclude: Patterns) -> Iterator[tuple[str, nn.Module, Tensor]]:
    """``(name, module, score [out, in])``: ``|W|``, times ``||X_j||`` when ``norms`` are given."""
    for name, module in prunable_linears(model, include, exclude).items():
        score = _rows(module).abs()
        if norms is not None:
            if name not in norms:
                raise UsageError(f"No input norms for {name}: compute input_norms with the same "
                                 f"include/exclude as the masks.")
            dtype = torch.promote_types(score.dtype, torch.float32)  # as Wanda: fp16 W, fp32 X
            score = score.to(dtype) * norms[name].to(score.device, dtype)
        yield name, module, score


@torch.no_grad()
def wanda_masks(model: nn.Module, norms: Mapping[str, Tensor], sparsity: float,
                include: Patterns = None, exclude: Patterns = None) -> dict[str, Tensor]:
    """Wanda: mask the smallest ``|W_ij| * ||X_j||_2`` in each output row.

    ``norms`` come from ``input_norms`` (calibrate once, then mask at any sparsity). Each row
    loses exactly ``round(sparsity * in_features)`` weights (Wanda's code uses ``int()``),
    ties broken by the lowest input index.
    """
    check_sparsity(sparsity)
    return {name: _from_rows(module, _smallest(score, round(sparsity * score.shape[1])))
            for name, module, score in _scores(model, norms, include, exclude)}


@torch.no_grad()
def nm_masks(model: nn.Module, n: int = 2, m: int = 4, norms: Mapping[str, Tensor] | None = None,
             include: Patterns = None, exclude: Patterns = None) -> dict[str, Tensor]:
    """N:M sparsity: in each group of ``m`` consecutive input weights of an output row, keep the
    ``n`` largest by ``|W|`` (or by Wanda's score when ``norms`` from ``input_norms`` are given).
    """
    if not (isinstance(n, int) and isinstance(m, int) and 1 <= n < m):
        raise UsageError(f"An N:M pattern keeps n of every m weights, 1 <= n < m; got {n}:{m}.")
    masks = {}
    for name, module, score in _scores(model, norms, include, exclude):
        out_features, in_features = score.shape
        if in_features % m:
            raise UsageError(f"{n}:{m} sparsity needs the input width to be a multiple of {m}, "
                             f"but {name} has {in_features} input features (weight shape "
                             f"{tuple(module.weight.shape)}). Exclude it or pick another m.")
        groups = _smallest(score.reshape(-1, m), m - n)
        masks[name] = _from_rows(module, groups.reshape(out_features, in_features))
    return masks


# ---------------------------------------------------------------- report


@dataclass(frozen=True)
class MatrixSparsity:
    """Zeros in one weight matrix."""

    name: str
    shape: tuple[int, ...]
    zeros: int
    total: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.total


@dataclass(frozen=True)
class SparsityReport:
    """Achieved sparsity (weights equal to zero) per matrix and overall."""

    matrices: tuple[MatrixSparsity, ...]

    @property
    def zeros(self) -> int:
        return sum(m.zeros for m in self.matrices)

    @property
    def total(self) -> int:
        return sum(m.total for m in self.matrices)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        """``{"zeros", "total", "sparsity", "matrices": [one dict per matrix]}``."""
        rows = [{**asdict(m), "shape": list(m.shape), "sparsity": m.sparsity}
                for m in self.matrices]
        return {"zeros": self.zeros, "total": self.total, "sparsity": self.sparsity,
                "matrices": rows}

    def to_pandas(self):
        """One row per matrix: name, shape, zeros, total, sparsity (overall: ``.sparsity``)."""
        return pd.DataFrame(self.to_dict()["matrices"])


def _report(modules: Mapping[str, nn.Module]) -> SparsityReport:
    return SparsityReport(tuple(
        MatrixSparsity(name, tuple(m.weight.shape), int((m.weight == 0).sum()), m.weight.numel())
        for name, m in modules.items()))


@torch.no_grad()
def sparsity_report(model: nn.Module, include: Patterns = None,
                    exclude: Patterns = None) -> SparsityReport:
    """The zeros now in the selected layers' weights (by default every prunable layer)."""
    return _report(prunable_linears(model, include, exclude))


# ---------------------------------------------------------------- applying masks


def _masked_modules(model: nn.Module, masks: Mapping[str, Tensor]) -> dict[str, nn.Module]:
    """The modules named in ``masks``, after checking every mask fits its weight."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        if name not in modules or not isinstance(getattr(modules[name], "weight", None), Tensor):
            raise UsageError(f"The mask {name!r} names no module with a weight in this model.")
        weight = modules[name].weight
        if mask.dtype != torch.bool or mask.shape != weight.shape:
            raise UsageError(f"The mask of {name} must be a bool tensor of shape "
                             f"{tuple(weight.shape)}; got {mask.dtype} {tuple(mask.shape)}.")
    return {name: modules[name] for name in masks}


def _zero(weight: Tensor, mask: Tensor) -> Tensor:
    """Zero ``weight[mask]``; return the original values at every position now zero."""
    mask = mask.to(weight.device)
    saved = weight.masked_select(mask | (weight == 0))
    weight.masked_fill_(mask, 0)
    return saved


def _restore(weight: Tensor, saved: Tensor, name: str) -> None:
    """Put back the values ``_zero`` saved, at the positions that are zero now."""
    zeros = weight == 0
    if int(zeros.sum()) != saved.numel():
        raise RuntimeError(f"Cannot restore {name}: its weights were changed inside the pruning "
                           f"context (it has {int(zeros.sum())} zeros, {saved.numel()} expected).")
    weight.masked_scatter_(zeros, saved)  # fills the zeros in order, as masked_select read them


class _Pruning:
    """The context manager ``apply_masks`` returns (single use)."""

    def __init__(self, model: nn.Module, masks: Mapping[str, Tensor]):
        self.modules = _masked_modules(model, masks)
        self.masks: Mapping[str, Tensor] | None = masks
        self.saved: dict[str, Tensor] = {}

    def __enter__(self) -> SparsityReport:
        if self.masks is None:
            raise RuntimeError("A pruning context can be entered only once; make a new one.")
        # Restoring needs only self.saved: each mask is dropped once applied (and freed when the
        # caller holds no other reference, as in magnitude_prune), so they never add up.
        masks, self.masks = dict(self.masks), None
        try:
            with torch.no_grad():
                for name, module in self.modules.items():
                    self.saved[name] = _zero(module.weight, masks.pop(name))
            return _report(self.modules)
        except BaseException:
            self._restore()
            raise

    def __exit__(self, *exc_info) -> None:
        self._restore()

    def _restore(self) -> None:
        with torch.no_grad():
            for name in reversed(list(self.saved)):  # reverse order: right even for shared weights
                _restore(self.modules[name].weight, self.saved.pop(name), name)


def apply_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> _Pruning:
    """``with apply_masks(model, masks) as report:`` zeroes ``weight[mask]`` of each named layer
    inside the block and restores every weight bit for bit on exit, also when the block raises.

    Memory: only the original values at the positions that are zero while pruned are kept
    (``sparsity`` x the weights' bytes, plus any weight that was zero already), neither a full
    copy nor the masks (dropped as they are applied): on exit those positions are found again as
    the zeros of each weight, so the block must not write to the weights.
    """
    return _Pruning(model, masks)


@torch.no_grad()
def prune_permanently(model: nn.Module, masks: Mapping[str, Tensor]) -> SparsityReport:
    """Zero ``weight[mask]`` of each named layer for good; return the achieved sparsity."""
    modules = _masked_modules(model, masks)
    for name, module in modules.items():
        module.weight.masked_fill_(masks[name].to(module.weight.device), 0)
    return _report(modules)


def magnitude_prune(model: nn.Module, sparsity: float, scope: str = "per_matrix",
                    include: Patterns = None, exclude: Patterns = None) -> _Pruning:
    """``with magnitude_prune(model, 0.5) as report:``: ``magnitude_masks``, applied reversibly."""
    return apply_masks(model, magnitude_masks(model, sparsity, scope, include, exclude))


def wanda_prune(model: nn.Module, norms: Mapping[str, Tensor], sparsity: float,
                include: Patterns = None, exclude: Patterns = None) -> _Pruning:
    """``with wanda_prune(model, input_norms(model, tok, texts), 0.5) as report:`` (reversible)."""
    return apply_masks(model, wanda_masks(model, norms, sparsity, include, exclude))


def nm_prune(model: nn.Module, n: int = 2, m: int = 4, norms: Mapping[str, Tensor] | None = None,
             include: Patterns = None, exclude: Patterns = None) -> _Pruning:
    """``with nm_prune(model, 2, 4) as report:``: ``nm_masks``, applied reversibly."""
    return apply_masks(model, nm_masks(model, n, m, norms, include, exclude))
