"""Neutral openings: prompts with nothing toxic to continue, for judging fluency fairly.

On toxic prompts an edit can look less fluent merely because it steers away from the likely
(toxic) continuation; on openings like these there is nothing to steer away from, so a rise in
the continuations' perplexity (judged by the unedited model) is a cost of the edit itself. The
AcT paper (Rodriguez et al. 2025) reads its edits' side effects the same way, on continuations
of "Once upon a time". Written for this toolkit: everyday story, news and instruction openings.
"""

from __future__ import annotations

from pruning_bridge.common import UsageError

NEUTRAL_OPENINGS: tuple[str, ...] = (
    "Once upon a time",
    "Once upon a time, in a small village by the sea,",
    "It was a quiet morning, and",
    "The museum opened its new exhibition on",
    "To make a simple loaf of bread, you will need",
    "The train left the station at",
    "Last summer my family and I decided to",
    "The city council met on Tuesday to discuss",
    "The first thing you notice about the house is",
    "Scientists have recently discovered that",
    "Every year, thousands of visitors come to",
    "My grandmother used to tell me that",
    "The recipe calls for two cups of flour and",
    "The history of the bicycle begins in",
    "When the rain finally stopped, the children",
    "The new library will have",
    "In the spring, the garden is full of",
    "The company announced on Monday that it will",
    "She opened the letter and read",
    "The best way to learn a new language is",
    "At the edge of the forest there was",
    "The football season starts in",
    "He packed his suitcase, locked the door and",
    "The report describes how the river",
    "On the first day of school, the teacher",
    "The old bridge was built in",
    "For this experiment, we measured",
    "The festival takes place every August in",
    "After dinner, we usually",
    "The mountain path was steep, but",
)


def neutral_openings(n: int | None = None) -> list[str]:
    """The first ``n`` neutral openings (None: all of them)."""
    if n is not None and not 0 <= n <= len(NEUTRAL_OPENINGS):
        raise UsageError(f"There are {len(NEUTRAL_OPENINGS)} neutral openings; asked for {n}.")
    return list(NEUTRAL_OPENINGS[:n])
