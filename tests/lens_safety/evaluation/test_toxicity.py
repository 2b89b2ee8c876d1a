"""The toxicity scorers (offline): profanity ranking, errors, a missing detoxify."""

import pytest

from lens_safety.evaluation.toxicity import get_scorer, profanity_scorer

# ---------------------------------------------------------------- scorers


def test_profanity_scorer_ranks_profanity_higher():
    score = get_scorer("profanity")
    profane, neutral = score(["You are a fucking stupid piece of shit",
                              "The library opens at nine in the morning"])
    assert 0.0 <= neutral < profane <= 1.0
    assert profanity_scorer()([]) == []


def test_get_scorer_errors_and_callables():
    with pytest.raises(ValueError, match="Unknown toxicity scorer 'nope'.*profanity"):
        get_scorer("nope")
    mine = lambda texts: [0.5] * len(texts)  # noqa: E731
    assert get_scorer(mine) is mine


def test_detoxify_missing_is_clear(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_detoxify(name, *args, **kwargs):
        if name == "detoxify":
            raise ImportError("no detoxify")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_detoxify)
    with pytest.raises(ImportError, match="pip install detoxify"):
        get_scorer("detoxify")
