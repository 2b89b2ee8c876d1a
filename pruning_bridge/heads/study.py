"""The routed-heads study end to end (the report's Figure 3), resumable in one output folder.

1. train a router per active-head fraction on WikiText-2 validation paragraphs
   (``router_k{k}/``: weights, loss curve, checkpoints; reused only for the same model, data
   and training settings, retrained otherwise with a warning naming what changed);
2. head importance on held-out paragraphs: the mean gates of the most selective router (the
   report's Figure 3) and head-mask gradients (``importance.json``);
3. evaluate routed and removed heads at each fraction (``head_sweep.jsonl``).
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, tensor

from ..bridge import HookBridge, model_dims
from ..common.atomic import write_json_atomic
from ..common.errors import UsageError
from ..common.identity import model_identity
from ..evals.tasks import EvalSettings
from ..pruning.weight_sweep import calibration_texts
from .importance import gradient_head_importance, mean_gate_importance
from .routing import RoutedHeads, top_k_for
from .sweep import REPORT_FRACTIONS, fingerprint, head_sweep
from .training import RouterTrainingLog, train_router, training_windows


@dataclass
class HeadStudy:
    """What the study produced. ``router``/``log``: the Figure 3 router and its training log;
    ``routers``: the router of each active fraction."""

    router: RoutedHeads
    log: RouterTrainingLog
    routers: dict[float, RoutedHeads]
    mean_gates: Tensor
    gradient_importance: Tensor
    rows: list[dict]
    seconds: float

    def layer_ranking(self) -> list[tuple[int, float]]:
        """Routed layers by the spread of their routed gates (max - min mean gate), largest first.

        A large spread means the router keeps some heads of that layer and drops others; a flat
        layer is one where it has no preference.
        """
        n_shared = self.router.n_shared
        spread = [(layer, float(self.mean_gates[layer, n_shared:].max()
                                - self.mean_gates[layer, n_shared:].min()))
                  for layer in self.router.layers]
        return sorted(spread, key=lambda item: -item[1])


def _split_texts(data_dir, n_train: int, n_eval: int, seed: int) -> tuple[list[str], list[str]]:
    texts = calibration_texts(data_dir, n=n_train + n_eval, seed=seed)
    return texts[:n_train], texts[n_train:]


def _importance(bridge: HookBridge, tokenizer, router: RoutedHeads, eval_ids: Tensor,
                path: Path, progress: bool) -> tuple[Tensor, Tensor]:
    """Mean gates and gradient importance, reused from ``path`` when it was computed for this
    router, model and evaluation text (a damaged file is said once and recomputed)."""
    model = model_identity(bridge)
    identity = {"router": fingerprint(router),
                "model": {k: v for k, v in model.items() if k != "name"},
                "data": hashlib.sha256(eval_ids.to(torch.int64).numpy().tobytes()).hexdigest()[:16]}
    try:
        saved = json.loads(path.read_text()) if path.exists() else {}
        if saved.get("identity") == identity:
            return tensor(saved["mean_gates"]), tensor(saved["gradient"])
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        warnings.warn(f"{path} is damaged ({type(error).__name__}); recomputing it.", stacklevel=3)
    gates = mean_gate_importance(router, bridge, eval_ids, progress=progress)
    gradients = gradient_head_importance(bridge, tokenizer, eval_ids, progress=progress)
    write_json_atomic(path, {"identity": identity, "model_name": model["name"],
                             "mean_gates": gates.tolist(), "gradient": gradients.tolist(),
                             "windows": len(eval_ids), "seq_len": eval_ids.shape[1]})
    return gates, gradients


def run_head_study(model, tokenizer, out: str | Path, settings: EvalSettings, *,
                   n_shared: int = 1, top_k: int | None = None,
                   layers: Sequence[int] | None = None, steps: int = 100, batch_size: int = 4,
                   seq_len: int = 256, lr: float = 1e-2, beta: float = 0.01,
                   importance_windows: int = 16,
                   fractions: Sequence[float] = REPORT_FRACTIONS) -> HeadStudy:
    """Train, rank and evaluate; every stage reuses what ``out`` already holds.

    ``settings`` defines the evaluation (tasks, limits, window, data, seed); its ``data_dir``
    and ``seed`` also give the training and importance text (WikiText-2 validation), and its
    ``progress`` the progress bars. ``batch_size`` and ``seq_len`` are the router training's.
    ``top_k`` picks the router whose mean gates rank the heads (default: the smallest of the
    fractions' top-k, the most selective); each fraction is evaluated with its own router.
    """
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        raise UsageError(f"Active head fractions must be in (0, 1], got {bad}.")
    start = time.perf_counter()
    out = Path(out)
    bridge = HookBridge(model, tokenizer)
    n_train = max(64, steps * batch_size * seq_len // 120)  # ~120 tokens per paragraph
    data_dir, seed, progress = settings.data_dir, settings.seed, settings.progress
    train_texts, eval_texts = _split_texts(data_dir, n_train, 4 * importance_windows, seed)
    train_ids = training_windows(tokenizer, train_texts, seq_len)
    eval_ids = training_windows(tokenizer, eval_texts, seq_len)[:importance_windows]

    n_heads = model_dims(bridge.config).n_heads
    ks = {fraction: top_k_for(fraction, n_heads, n_shared) for fraction in fractions}
    figure_k = top_k if top_k is not None else min(ks.values())
    routers, logs = {}, {}
    for k in sorted({*ks.values(), figure_k}):  # each resumes, or reloads, its own folder
        routers[k], logs[k] = train_router(
            bridge, tokenizer, train_ids, n_shared=n_shared, top_k=k, layers=layers,
            steps=steps, batch_size=batch_size, lr=lr, beta=beta, seed=seed,
            out=out / f"router_k{k}", progress=progress)
    router = routers[figure_k]
    gates, gradients = _importance(bridge, tokenizer, router, eval_ids, out / "importance.json",
                                   progress)

    by_fraction = {f: routers[k] for f, k in ks.items()}
    rows = head_sweep(model, tokenizer, by_fraction, gates, settings,
                      out=out / "head_sweep.jsonl")
    return HeadStudy(router, logs[figure_k], by_fraction, gates, gradients, rows,
                     time.perf_counter() - start)
