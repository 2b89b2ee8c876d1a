"""LEACE: least-squares concept erasure (Belrose et al. 2023, arXiv:2306.03819).

    eraser = LeaceEraser().fit(x, labels)      # x: [n, d_model]; labels: [n] classes or [n, k]
    clean = eraser(resid)                      # any leading dims: [batch, pos, d_model]
    eraser = fit_leace(acts, prompts.labels, layer=6)   # acts: [n_layers, n, d_model]
    eraser.save("leace.safetensors"); eraser = LeaceEraser.load("leace.safetensors")

The eraser is the affine map ``x -> x - P (x - mean)`` of least mean squared change after which
no linear classifier can predict the concept ``z`` better than a constant: the erased data has
zero cross-covariance with ``z`` (equivalently, equal class-conditional means). With
``Sigma_xx`` the covariance of x and ``Sigma_xz`` its cross-covariance with z, all in float64:

- whitening ``W = Sigma_xx^{-1/2}`` (a pseudo-inverse square root: eigen-directions with
  variance below ``rtol`` times the largest are dropped, so rank-deficient x is fine),
- ``P_W``, the orthogonal projection onto the column space of ``W Sigma_xz``,
- ``P = W^+ P_W W``, an oblique projection of rank r <= k - 1 (k classes) or <= k (k concept
  columns), stored as ``proj_left_ @ proj_right_`` (``[d, r] @ [r, d]``).

Class labels become one-hot columns for all classes but the first: after centring, the k
one-hot columns sum to zero, so k - 1 of them span the same space (and keep ``Sigma_xz`` full
rank). The eraser is applied in float32 on the input's device and returns the input's dtype.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from pruning_bridge.common import OutOfRangeError, UsageError

from ..data.prompts import LABELS
from ..probing.caching import read_tensors, save_tensors
from ..probing.probes import as_array, binary_labels, check_data
from .trace_math import leace_erase

STATE_KEYS = ("mean", "proj_left", "proj_right")
TASKS = ("multiclass", "binary")


def _as_float64(data) -> Tensor:
    """``data`` (tensor or array) as a CPU float64 tensor."""
    if isinstance(data, Tensor):
        return data.detach().to("cpu", torch.float64)
    return torch.from_numpy(np.asarray(data, dtype=np.float64))


def _concept_matrix(z, n: int) -> tuple[Tensor, np.ndarray | None]:
    """``(Z [n, k] float64, classes or None)``: class labels one-hot (k - 1 columns), or the
    float concept as given (a 1-D float concept is one column)."""
    raw = z.detach().cpu().numpy() if isinstance(z, Tensor) else np.asarray(z)
    if raw.ndim not in (1, 2):
        raise UsageError(f"Concept labels must be [n] class labels or an [n, k] float matrix; "
                         f"got shape {raw.shape}.")
    if len(raw) != n:
        raise UsageError(f"{len(raw)} labels for {n} examples: they must match one to one.")
    if raw.ndim == 1 and raw.dtype.kind in "biuUSO":
        classes, index = np.unique(raw, return_inverse=True)
        if len(classes) < 2:
            raise UsageError(f"Only one class ({classes[0]!r}) in the labels: there is no "
                             f"concept to erase. Fit on examples of at least two classes.")
        onehot = np.eye(len(classes), dtype=np.float64)[index.reshape(-1)][:, 1:]
        return torch.from_numpy(onehot), classes
    if raw.dtype.kind not in "fiub":
        raise UsageError(f"A concept matrix must be numeric; got dtype {raw.dtype}.")
    Z = _as_float64(raw.reshape(n, -1))
    if not torch.isfinite(Z).all():
        raise UsageError("The concept values contain NaN or infinity.")
    if (Z.std(dim=0) == 0).all():
        raise UsageError("The concept is constant over the examples: there is nothing to "
                         "erase. Fit on examples where it varies.")
    return Z, None


def _whitening(sigma_xx: Tensor, rtol: float | None) -> tuple[Tensor, Tensor]:
    """``(Sigma^{-1/2}, Sigma^{1/2})`` as pseudo-inverse square roots: eigen-directions with
    variance up to ``rtol`` times the largest (default ``d * eps``, as ``torch.linalg.pinv``)
    count as absent."""
    variances, basis = torch.linalg.eigh(sigma_xx)
    rtol = len(variances) * torch.finfo(torch.float64).eps if rtol is None else rtol
    if variances.max() <= 0:
        raise UsageError("The activations are constant over the examples: nothing to fit.")
    keep = variances > rtol * variances.max()
    safe = torch.where(keep, variances, torch.ones_like(variances))
    whiten = (basis * torch.where(keep, safe.rsqrt(), 0.0)) @ basis.T
    unwhiten = (basis * torch.where(keep, safe.sqrt(), 0.0)) @ basis.T
    return whiten, unwhiten


class LeaceEraser:
    """Least-squares concept eraser ``x -> x - P (x - mean_)`` (scikit-learn style).

    ``rtol`` drops eigen-directions of the covariance of x with variance below ``rtol`` times
    the largest (default ``d * eps``); ``svd_tol`` drops directions of the whitened
    cross-covariance whose singular value is below ``svd_tol`` times the concept's standard
    deviation (rounding noise: if x carries no linear information on z, ``rank_`` is 0)."""

    def __init__(self, rtol: float | None = None, svd_tol: float = 1e-9):
        self.rtol, self.svd_tol = rtol, svd_tol

    def fit(self, x, z) -> "LeaceEraser":
        """Fit on activations ``x`` ``[n, d]`` (tensor or array) and concept ``z``: ``[n]``
        class labels (ints, strings, bools) or a float matrix ``[n, k]``."""
        X = _as_float64(x)
        if X.ndim != 2:
            raise UsageError(f"Activations must be [n_examples, d_model]; got shape "
                             f"{tuple(X.shape)}. Flatten leading dims or pick one layer.")
        n, d = X.shape
        if n < 2 or d == 0:
            raise UsageError(f"Need at least 2 examples of width >= 1; got shape {(n, d)}.")
        Z, classes = _concept_matrix(z, n)
        if not torch.isfinite(X).all():
            raise UsageError("The activations contain NaN or infinity.")
        mean = X.mean(dim=0)
        Xc, Zc = X - mean, Z - Z.mean(dim=0)
        sigma_xx = Xc.T @ Xc / (n - 1)
        sigma_xx = (sigma_xx + sigma_xx.T) / 2
        sigma_xz = Xc.T @ Zc / (n - 1)

        whiten, unwhiten = _whitening(sigma_xx, self.rtol)
        # Singular values of the whitened cross-covariance are at most the concept's largest
        # standard deviation; those below svd_tol times it are rounding noise (or no signal).
        z_scale = torch.linalg.matrix_norm(Zc, ord=2) / (n - 1) ** 0.5
        u, s, _ = torch.linalg.svd(whiten @ sigma_xz, full_matrices=False)
        u = u[:, s > self.svd_tol * z_scale]
        self._set_fitted(mean, unwhiten @ u, u.T @ whiten)
        self.classes_ = classes
        return self

    def _set_fitted(self, mean: Tensor, left: Tensor, right: Tensor) -> None:
        self.mean_ = mean.to(torch.float64).contiguous()
        self.proj_left_ = left.to(torch.float64).contiguous()
        self.proj_right_ = right.to(torch.float64).contiguous()
        self.rank_ = int(left.shape[1])
        self._float32 = {}

    def _check_fitted(self) -> None:
        if not hasattr(self, "mean_"):
            raise UsageError("This LeaceEraser is not fitted: call fit(x, z) or load one first.")

    @property
    def d_model(self) -> int:
        """The width of the activations the eraser was fitted on."""
        self._check_fitted()
        return int(self.mean_.shape[0])

    @property
    def P(self) -> Tensor:
        """The oblique projection ``P`` ``[d, d]`` (float64) that the eraser subtracts."""
        self._check_fitted()
        return self.proj_left_ @ self.proj_right_

    def _applied(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Float32 copies of (mean, proj_left, proj_right) on ``device``, made once."""
        if device not in self._float32:
            self._float32[device] = tuple(
                t.to(device=device, dtype=torch.float32)
                for t in (self.mean_, self.proj_left_, self.proj_right_))
        return self._float32[device]

    def __call__(self, x: Tensor) -> Tensor:
        """Erase the concept from ``x`` ``[..., d_model]``: float32 math, ``x``'s dtype out."""
        self._check_fitted()
        x = torch.as_tensor(x)
        if x.ndim == 0 or x.shape[-1] != self.d_model:
            raise UsageError(f"This eraser was fitted on width d_model={self.d_model}; got a "
                             f"tensor of shape {tuple(x.shape)}. Apply it to [..., "
                             f"{self.d_model}] activations of the same model and hook.")
        return leace_erase(x, *self._applied(x.device))

    def state_dict(self) -> dict[str, Tensor]:
        """The fitted eraser as float64 CPU tensors (``mean``, ``proj_left``, ``proj_right``)."""
        self._check_fitted()
        return {"mean": self.mean_.clone(), "proj_left": self.proj_left_.clone(),
                "proj_right": self.proj_right_.clone()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> "LeaceEraser":
        """An eraser from :meth:`state_dict` (``classes_`` is not part of it: None)."""
        missing = [key for key in STATE_KEYS if key not in state]
        if missing:
            raise UsageError(f"Not a LeaceEraser state: missing {missing}; expected keys "
                             f"{list(STATE_KEYS)}.")
        mean, left, right = (torch.as_tensor(state[key]).detach().cpu() for key in STATE_KEYS)
        d = mean.shape[0] if mean.ndim == 1 else -1
        if mean.ndim != 1 or left.ndim != 2 or right.ndim != 2 or left.shape[0] != d \
                or right.shape != (left.shape[1], d):
            raise UsageError(f"Inconsistent LeaceEraser state: mean {tuple(mean.shape)}, "
                             f"proj_left {tuple(left.shape)}, proj_right {tuple(right.shape)}; "
                             f"expected [d], [d, r], [r, d].")
        eraser = cls()
        eraser._set_fitted(mean, left, right)
        eraser.classes_ = None
        return eraser

    def save(self, path: str | Path, **metadata) -> None:
        """Save as safetensors (atomically), with the classes and any ``metadata``
        JSON-encoded."""
        classes = None if self.classes_ is None else self.classes_.tolist()
        meta = {"classes": classes, **metadata}
        save_tensors(path, self.state_dict(),
                     metadata={key: json.dumps(value) for key, value in meta.items()})

    @classmethod
    def load(cls, path: str | Path) -> "LeaceEraser":
        """An eraser saved by :meth:`save` (its other metadata is in ``metadata_``); a file
        that is missing, damaged or not a saved eraser is a ``UsageError`` naming it."""
        fix = "Save the eraser again with LeaceEraser.save (or rerun what wrote it)."
        state, raw = read_tensors(path, fix)
        try:
            meta = {key: json.loads(value) for key, value in raw.items()}
            eraser = cls.from_state_dict(state)
        except (json.JSONDecodeError, UsageError) as error:
            problem = ("damaged metadata" if isinstance(error, json.JSONDecodeError)
                       else str(error).rstrip("."))
            raise UsageError(f"{path} is not a usable saved eraser ({problem}). {fix}") from None
        classes = meta.pop("classes", None)
        eraser.classes_ = None if classes is None else np.asarray(classes)
        eraser.metadata_ = meta
        return eraser

    def __repr__(self) -> str:
        if not hasattr(self, "mean_"):
            return "LeaceEraser(unfitted)"
        return f"LeaceEraser(d_model={self.d_model}, rank={self.rank_})"


def fit_leace(acts, labels: Sequence, layer: int, task: str = "multiclass",
              **kwargs) -> LeaceEraser:
    """A :class:`LeaceEraser` fitted at ``layer`` of cached activations ``[n_layers, n, d]``
    (tensor or array). ``labels`` are "neutral"/"biased"/"toxic" or their ids; ``multiclass``
    erases every distinction between them, ``binary`` only harmful vs neutral (rank 1)."""
    if task not in TASKS:
        raise UsageError(f"Unknown task {task!r}; use one of {', '.join(TASKS)}.")
    X = as_array(acts)
    y = binary_labels(labels) if task == "binary" else np.asarray(labels)
    if y.dtype.kind in "USO":
        unknown = sorted(set(y.tolist()) - set(LABELS))
        if unknown:
            raise UsageError(f"Unknown label(s) {unknown[:5]}; expected {', '.join(LABELS)}.")
    check_data(X, y)
    if not 0 <= layer < len(X):
        raise OutOfRangeError(f"Layer {layer} out of range: the activations have {len(X)} "
                              f"layers (valid 0..{len(X) - 1}).")
    return LeaceEraser(**kwargs).fit(X[layer], y)
