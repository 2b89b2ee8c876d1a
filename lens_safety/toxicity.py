"""Pluggable toxicity scorers: ``scorer(texts) -> [score in [0, 1] per text]``.

    score = get_scorer("profanity")        # offline (alt-profanity-check), the default
    score = get_scorer("detoxify")         # Detoxify "original" (pip install detoxify)
    score = get_scorer(my_function)        # any Callable[[list[str]], list[float]]
    score(["you are lovely", "..."])       # -> [0.02, ...]

A scorer is any callable taking a list of texts and returning one probability-like toxicity per
text. ``alt-profanity-check`` ships its scikit-learn model (no download; it scores profanity and
insults, not subtler toxicity); Detoxify is the usual neural choice but downloads its checkpoint
at first use.
"""

from __future__ import annotations

from typing import Callable, Sequence

from pruning_bridge.common import UsageError

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
