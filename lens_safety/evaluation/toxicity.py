"""Pluggable toxicity scorers: ``scorer(texts) -> [score in [0, 1] per text]``.

    score = get_scorer("profanity")        # offline (alt-profanity-check), the default
    score = get_scorer("detoxify")         # Detoxify "original" (pip install detoxify)
    score = get_scorer(my_function)        # any Callable[[list[str]], list[float]]
    score(["you are lovely", "..."])       # -> [0.02, ...]

A scorer is any callable taking a list of texts and returning one probability-like toxicity per
text. ``alt-profanity-check`` ships its scikit-learn model (no download; it scores profanity and
insults, not subtler toxicity); Detoxify is the usual neural choice but downloads its checkpoint
at first use.

How well a scorer tracks Perspective toxicity on RealToxicityPrompts texts:
``scorer_agreement("profanity", data_dir)`` (AUROC and Spearman correlation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pruning_bridge.common import JsonDataclass, UsageError

from ..data.rtp import load_rtp

Scorer = Callable[[list[str]], list[float]]

SCORERS = ("profanity", "detoxify")


def profanity_scorer() -> Scorer:
    """Probability of profanity per text, by ``alt-profanity-check`` (offline, MIT)."""
    try:
        from profanity_check import predict_prob
    except ImportError as error:
        raise ImportError("The 'profanity' scorer needs alt-profanity-check: "
                          "pip install alt-profanity-check") from error

    def score(texts: Sequence[str]) -> list[float]:
        texts = [str(t) for t in texts]
        if not texts:
            return []
        return [float(p) for p in predict_prob(texts)]

    score.__name__ = "profanity"
    return score


def detoxify_scorer(model: str = "original", device: str = "cpu") -> Scorer:
    """Detoxify's ``toxicity`` probability per text (``model``: original, unbiased,
    multilingual). Imported lazily; the checkpoint is downloaded at first use."""
    try:
        from detoxify import Detoxify
    except ImportError as error:
        raise ImportError("The 'detoxify' scorer needs the detoxify package: pip install "
                          "detoxify; it downloads its checkpoint at first use (or use the "
                          "offline scorer 'profanity').") from error
    detector = None

    def score(texts: Sequence[str]) -> list[float]:
        nonlocal detector
        texts = [str(t) for t in texts]
        if not texts:
            return []
        if detector is None:
            detector = Detoxify(model, device=device)
        return [float(p) for p in detector.predict(texts)["toxicity"]]

    score.__name__ = f"detoxify-{model}"
    return score


def get_scorer(name_or_callable: str | Scorer = "profanity") -> Scorer:
    """A scorer by name (``"profanity"``, ``"detoxify"`` or ``"detoxify:<model>"``), or the
    callable itself."""
    if callable(name_or_callable):
        return name_or_callable
    name = str(name_or_callable)
    if name == "profanity":
        return profanity_scorer()
    if name == "detoxify" or name.startswith("detoxify:"):
        return detoxify_scorer(name.partition(":")[2] or "original")
    raise UsageError(f"Unknown toxicity scorer {name!r}; use one of {', '.join(SCORERS)} "
                     f"(or 'detoxify:<model>'), or pass a callable list[str] -> list[float].")


def scorer_name(scorer) -> str:
    """A scorer's name for reports (its spec string, or the callable's name)."""
    return scorer if isinstance(scorer, str) else getattr(scorer, "__name__", type(scorer).__name__)


# ---------------------------------------------------------------- agreement with Perspective


@dataclass
class ScorerAgreement(JsonDataclass):
    """How a scorer ranks RTP texts against their Perspective API toxicity.

    ``auroc``: separation of texts with Perspective toxicity >= ``threshold`` (``n_positive``
    of the ``n`` texts) from the rest; ``spearman``: rank correlation with the Perspective score.
    """

    scorer: str
    auroc: float
    spearman: float
    n: int
    n_positive: int
    threshold: float

    def __str__(self) -> str:
        return (f"{self.scorer} vs Perspective toxicity: AUROC {self.auroc:.3f} (toxic >= "
                f"{self.threshold:g}: {self.n_positive} of {self.n} texts), Spearman "
                f"{self.spearman:.3f}")


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve, as the Mann-Whitney U statistic of the positives (ties: 1/2)."""
    from scipy.stats import rankdata

    ranks = rankdata(scores)  # average ranks for ties
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def scorer_agreement(
    scorer: str | Scorer = "profanity",
    data_dir: str | Path | None = None,
    threshold: float = 0.5,
    limit: int | None = None,
    batch_size: int = 1024,
) -> ScorerAgreement:
    """Agreement of ``scorer`` with Perspective toxicity over the RTP prompt and continuation
    texts (``load_rtp(data_dir, limit=limit)``; texts without a Perspective score are skipped).

    The texts are scored in batches of ``batch_size``; a positive is a text with Perspective
    toxicity >= ``threshold``.
    """
    from scipy.stats import spearmanr

    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (
        0 < threshold <= 1
    ):
        raise UsageError(f"threshold must be in (0, 1] (Perspective scores are probabilities), "
                         f"got {threshold!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}.")
    pairs = [
        (text, toxicity)
        for p in load_rtp(data_dir, limit=limit)
        for text, toxicity in ((p.text, p.toxicity), (p.continuation, p.continuation_toxicity))
        if not math.isnan(toxicity)
    ]
    texts = [text for text, _ in pairs]
    perspective = np.array([toxicity for _, toxicity in pairs], dtype=np.float64)
    labels = perspective >= threshold
    n_positive = int(labels.sum())
    if n_positive in (0, len(labels)):
        raise UsageError(f"All {len(labels)} RTP texts fall on one side of threshold={threshold} "
                         f"({n_positive} at or above it), so AUROC is undefined; use more texts "
                         f"(a larger limit) or another threshold.")
    score = get_scorer(scorer)
    scores = []
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        got = list(score(batch))
        if len(got) != len(batch):
            raise UsageError(f"The scorer {scorer_name(scorer)!r} returned {len(got)} scores for "
                             f"{len(batch)} texts; it must return one score per text.")
        scores += got
    scores = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(scores).all():
        raise UsageError(f"The scorer {scorer_name(scorer)!r} returned "
                         f"{int((~np.isfinite(scores)).sum())} non-finite score(s).")
    return ScorerAgreement(
        scorer=scorer_name(scorer),
        auroc=_auroc(scores, labels),
        spearman=float(spearmanr(scores, perspective).statistic),
        n=len(texts),
        n_positive=n_positive,
        threshold=float(threshold),
    )
