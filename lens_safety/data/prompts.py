"""The prompt data set: neutral, biased and toxic statements from two public sources.

- **ToxiGen** prompt files (Hartvigsen et al. 2022),
  ``toxigen/prompts/{hate,neutral}_<group>_1k.txt``: each line is a prompt of several "- "
  bulleted statements; ``hate_*`` statements are *toxic*, ``neutral_*`` statements are
  *neutral*; the group is the file's target group (e.g. ``women``).
- **CrowS-Pairs** (Nangia et al. 2020), ``crows_pairs/crows_pairs_anonymized.csv``: the
  ``sent_more`` sentence of every ``stereo`` pair is *biased*; the group is its ``bias_type``.

Statements are split out of the multi-statement ToxiGen lines, whitespace-normalised and
de-duplicated (see :func:`deduplicate`), then :meth:`PromptSet.load` draws balanced classes,
stratified by group, deterministically from a seed. Data come from a local directory laid out
like the originals (``data_dir=...``, e.g. ``../shared/data``) or, with ``data_dir=None``, from
the Hugging Face hub (best effort: ``toxigen/toxigen-data`` and ``nyu-mll/crows_pairs``).
"""

from __future__ import annotations

import csv
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pandas as pd

from pruning_bridge.common import UsageError
from pruning_bridge.evals.data import DataNotFoundError, load_hub_dataset

LABELS = ("neutral", "biased", "toxic")
HARMFUL_LABELS = ("biased", "toxic")

_HINT = (
    "Pass data_dir=... pointing at a local directory laid out like the original releases: "
    "<root>/toxigen/prompts/{hate,neutral}_<group>_1k.txt (microsoft/TOXIGEN prompts/) and "
    "<root>/crows_pairs/crows_pairs_anonymized.csv (nyu-mll/crows-pairs data/)."
)
# Statement separators: the literal two characters backslash + "n" (some lines have extra
# backslashes, e.g. "\\\n" or "\\n\n") and, for hub copies, real line breaks.
_SEPARATOR = re.compile(r"(?:\\+n|\r?\n)+")
# A bare "-" bullet glued after a sentence end ("guys!- Oh", "threesome. - Monogamy", "right?-").
# A dash after a word ("enemies - all while", "18- to 28-year-old") is part of the statement.
_MERGED_BULLET = re.compile(r"(?<=[.?!])\s*-(?=\s|$)")
_LEADING_BULLET = re.compile(r"^-(?:\s+|$)")
_TOXIGEN_FILE = re.compile(r"^(hate|neutral)_(.+)_1k$")


@dataclass(frozen=True)
class Prompt:
    """One statement with its class, source data set and target group."""

    text: str
    label: str  # "neutral" | "biased" | "toxic"
    source: str  # "toxigen" | "crows_pairs"
    group: str  # ToxiGen file group (e.g. "women") or CrowS-Pairs bias_type


# ---------------------------------------------------------------- parsing


def normalize_text(text: str) -> str:
    """Collapse every run of whitespace to one space and strip the ends."""
    return " ".join(text.split())


def split_toxigen_line(line: str) -> list[str]:
    """Split one ToxiGen prompt line into its clean statements (bullets and empties dropped)."""
    statements = []
    for chunk in _SEPARATOR.split(line):
        for piece in _MERGED_BULLET.split(chunk):
            text = normalize_text(_LEADING_BULLET.sub("", piece.strip()))
            if text:
                statements.append(text)
    return statements


def _toxigen_records(kind: str, group: str, lines: Iterable[str]) -> list[Prompt]:
    label = "toxic" if kind == "hate" else "neutral"
    parsed: dict[str, list[Prompt]] = {}  # repeated lines are common: parse each once
    records = []
    for line in lines:
        if line not in parsed:
            parsed[line] = [Prompt(t, label, "toxigen", group) for t in split_toxigen_line(line)]
        records += parsed[line]
    return records


def _toxigen_dir(root: Path) -> Path:
    candidates = [root / "toxigen" / "prompts", root / "prompts", root]
    for cand in candidates:
        if cand.is_dir() and any(cand.glob("*_1k.txt")):
            return cand
    tried = "\n  ".join(str(c / "{hate,neutral}_<group>_1k.txt") for c in candidates)
    raise DataNotFoundError(f"ToxiGen prompt files not found under data_dir={str(root)!r}. "
                            f"Tried:\n  {tried}\n{_HINT}")


def _crows_csv(root: Path) -> Path:
    name = "crows_pairs_anonymized.csv"
    candidates = [root / "crows_pairs" / name, root / "data" / name, root / name]
    for cand in candidates:
        if cand.is_file():
            return cand
    tried = "\n  ".join(str(c) for c in candidates)
    raise DataNotFoundError(f"CrowS-Pairs not found under data_dir={str(root)!r}. "
                            f"Tried:\n  {tried}\n{_HINT}")


def _load_hub(what: str, *args: str, **kwargs: str):
    """``datasets.load_dataset`` imported lazily; any failure becomes a DataNotFoundError."""
    return load_hub_dataset(what, *args, hint=_HINT, **kwargs)


def load_toxigen(data_dir: str | Path | None = None) -> list[Prompt]:
    """Every ToxiGen statement occurrence (duplicates kept), files in sorted name order.

    Locally: one record per statement of each line of ``{hate,neutral}_<group>_1k.txt``.
    From the hub: the ``prompts`` config of ``toxigen/toxigen-data`` (one split per file), or
    else the unique (prompt, group, prompt_label) rows of its ``train`` config.
    """
    if data_dir is not None:
        folder = _toxigen_dir(Path(data_dir))
        records = []
        for path in sorted(folder.glob("*_1k.txt")):
            match = _TOXIGEN_FILE.match(path.stem)
            if match:  # lines are LF-separated; "\\n" inside a line separates statements
                lines = path.read_bytes().decode("utf-8").split("\n")
                records += _toxigen_records(match[1], match[2], lines)
        return records

    try:
        splits = _load_hub("ToxiGen prompts", "toxigen/toxigen-data", "prompts")
        records = []
        for name in sorted(splits):
            match = _TOXIGEN_FILE.match(name)
            if match:
                records += _toxigen_records(match[1], match[2], splits[name]["prompt"])
        if records:
            return records
    except DataNotFoundError:
        pass
    rows = _load_hub("ToxiGen (train config)", "toxigen/toxigen-data", "train", split="train")
    frame = rows.select_columns(["prompt", "group", "prompt_label"]).to_pandas()
    frame = frame.drop_duplicates().sort_values(["prompt_label", "group"], kind="stable")
    records = []
    for prompt, group, prompt_label in frame.itertuples(index=False):
        kind = "hate" if int(prompt_label) == 1 else "neutral"
        records += _toxigen_records(kind, str(group), [prompt])
    return records


def load_crows_pairs(data_dir: str | Path | None = None) -> list[Prompt]:
    """The ``sent_more`` sentence of every ``stereo`` CrowS-Pairs pair, in file order (biased)."""
    if data_dir is not None:
        # A real CSV reader: one field holds an embedded newline.
        with _crows_csv(Path(data_dir)).open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        data = _load_hub("CrowS-Pairs", "nyu-mll/crows_pairs", split="test")
        names = {
            key: data.features[key].int2str if hasattr(data.features[key], "int2str") else str
            for key in ("stereo_antistereo", "bias_type")
        }
        rows = [
            {**row, **{key: _as_name(row[key], to_name) for key, to_name in names.items()}}
            for row in data
        ]
    return [
        Prompt(normalize_text(row["sent_more"]), "biased", "crows_pairs", row["bias_type"])
        for row in rows
        if row["stereo_antistereo"] == "stereo" and normalize_text(row["sent_more"])
    ]


def _as_name(value, to_name) -> str:
    return to_name(value) if isinstance(value, (int, np.integer)) else str(value)


def deduplicate(prompts: Iterable[Prompt]) -> list[Prompt]:
    """One record per text (exact match after whitespace normalisation), in input order.

    Rules: a text found under two or more *labels* is removed altogether (it cannot be both
    harmful and neutral, and would leak across a train/test split). A text repeated under one
    label is kept once, under the *smallest* of its groups (fewest distinct texts in that
    source and label; ties: first occurrence), so the more specific group wins: every ToxiGen
    ``hate_trans`` statement is also in ``hate_lgbtq`` and stays ``trans``. The kept record sits
    at the position of its group's first occurrence.
    """
    unique = dict.fromkeys(prompts)  # identical records first: cheap, order-preserving
    records = [p if p.text == normalize_text(p.text) else
               Prompt(normalize_text(p.text), p.label, p.source, p.group) for p in unique]
    labels_of: dict[str, set[str]] = defaultdict(set)
    texts_in: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for p in records:
        labels_of[p.text].add(p.label)
        texts_in[p.source, p.label, p.group].add(p.text)
    best: dict[str, int] = {}  # text -> index of the record to keep
    for i, p in enumerate(records):
        if not p.text or len(labels_of[p.text]) > 1:
            continue
        j = best.get(p.text)
        if j is None or len(texts_in[p.source, p.label, p.group]) < len(
            texts_in[records[j].source, records[j].label, records[j].group]
        ):
            best[p.text] = i
    return [records[i] for i in sorted(best.values())]


# ---------------------------------------------------------------- sampling


def _even_allocation(sizes: dict[str, int], n: int, rng: random.Random) -> dict[str, int]:
    """Split ``n`` across groups as evenly as their sizes allow (water-filling).

    Every group gets the same share; a group too small for its share gives all it has and the
    rest is shared among the others; the last few units go to randomly chosen groups.
    """
    alloc = dict.fromkeys(sizes, 0)
    remaining = n
    while remaining > 0:
        open_groups = [g for g in sorted(sizes) if alloc[g] < sizes[g]]
        share = remaining // len(open_groups)
        if share == 0:
            for g in rng.sample(open_groups, remaining):
                alloc[g] += 1
            break
        for g in open_groups:
            take = min(share, sizes[g] - alloc[g])
            alloc[g] += take
            remaining -= take
    return alloc


def _sample_class(prompts: Sequence[Prompt], n: int, seed: int, label: str) -> list[int]:
    """Indices of ``n`` prompts of one class, stratified evenly over groups, in input order."""
    by_group: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        by_group[p.group].append(i)
    alloc = _even_allocation({g: len(ix) for g, ix in by_group.items()}, n,
                             random.Random(f"{seed}/{label}"))
    picked = []
    for group in sorted(by_group):
        picked += random.Random(f"{seed}/{label}/{group}").sample(by_group[group], alloc[group])
    return sorted(picked)


# ---------------------------------------------------------------- the set


class PromptSet:
    """An ordered collection of :class:`Prompt` records with arrays for probes and splits."""

    def __init__(self, prompts: Iterable[Prompt]):
        self.prompts: list[Prompt] = list(prompts)
        bad = sorted({p.label for p in self.prompts} - set(LABELS))
        if bad:
            raise UsageError(f"Unknown label(s) {bad}; valid labels are {list(LABELS)}.")

    # ------------------------------------------------------------ loading

    @classmethod
    def pool(cls, data_dir: str | Path | None = None) -> PromptSet:
        """Every de-duplicated prompt from both sources (unbalanced): ToxiGen, then CrowS-Pairs."""
        pool = cls(deduplicate(load_toxigen(data_dir) + load_crows_pairs(data_dir)))
        missing = [label for label, n in pool.counts().items() if n == 0]
        if missing:
            raise DataNotFoundError(f"The prompt data hold no {missing} prompts. {_HINT}")
        return pool

    @classmethod
    def load(
        cls, data_dir: str | Path | None = None, n_per_class: int | None = None, seed: int = 0
    ) -> PromptSet:
        """A balanced set: ``n_per_class`` prompts of each label (None: the smallest class size).

        Within a class the draw is stratified by group: every group gets the same number of
        prompts, except groups with fewer prompts than that, which give all they have (the
        remainder is spread over the others; leftover single prompts go to groups chosen by the
        seed). The result is deterministic for a seed and ordered by label, then pool order.
        """
        if n_per_class is not None and (
            isinstance(n_per_class, bool)
            or not isinstance(n_per_class, (int, np.integer))
            or n_per_class < 1
        ):
            raise UsageError(
                f"n_per_class must be a positive integer or None, got {n_per_class!r}."
            )
        pool = cls.pool(data_dir)
        counts = pool.counts()
        smallest = min(counts, key=counts.get)
        if n_per_class is None:
            n_per_class = counts[smallest]
        if n_per_class > counts[smallest]:
            raise UsageError(
                f"n_per_class={n_per_class} is larger than the smallest class ({smallest!r} has "
                f"{counts[smallest]} unique prompts; available: {counts}); the maximum is "
                f"{counts[smallest]}."
            )
        chosen: list[Prompt] = []
        for label in LABELS:
            members = [p for p in pool if p.label == label]
            chosen += [members[i] for i in _sample_class(members, int(n_per_class), seed, label)]
        return cls(chosen)

    # ------------------------------------------------------------ views

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.prompts]

    @property
    def labels(self) -> list[str]:
        return [p.label for p in self.prompts]

    @property
    def groups(self) -> list[str]:
        return [p.group for p in self.prompts]

    @property
    def sources(self) -> list[str]:
        return [p.source for p in self.prompts]

    @property
    def binary_labels(self) -> np.ndarray:
        """1 for harmful (biased or toxic), 0 for neutral."""
        return np.array([int(p.label in HARMFUL_LABELS) for p in self.prompts], dtype=np.int64)

    @property
    def label_ids(self) -> np.ndarray:
        """Class index per prompt: neutral=0, biased=1, toxic=2 (the order of ``LABELS``)."""
        return np.array([LABELS.index(p.label) for p in self.prompts], dtype=np.int64)

    def counts(self) -> dict[str, int]:
        """Number of prompts per label, for every label in ``LABELS`` order."""
        labels = self.labels
        return {label: labels.count(label) for label in LABELS}

    def to_pandas(self):
        """A DataFrame with columns text, label, source, group."""
        return pd.DataFrame(
            {"text": self.texts, "label": self.labels, "source": self.sources, "group": self.groups}
        )

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[Prompt]:
        return iter(self.prompts)

    def __getitem__(self, index):
        """An int gives a Prompt; a slice, index list or boolean mask gives a PromptSet."""
        if isinstance(index, (int, np.integer)):
            return self.prompts[index]
        if isinstance(index, slice):
            return PromptSet(self.prompts[index])
        index = np.asarray(index)
        if index.dtype == bool:
            if len(index) != len(self):
                raise IndexError(f"Boolean mask of length {len(index)} for {len(self)} prompts.")
            index = np.flatnonzero(index)
        return PromptSet(self.prompts[int(i)] for i in index)

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.counts().items())
        return f"PromptSet(n={len(self)}, {counts})"

    # ------------------------------------------------------------ split

    def split(self, test_size: float = 0.25, seed: int = 0) -> tuple[PromptSet, PromptSet]:
        """Stratified (by label) train/test split; records sharing a text stay on one side.

        Distinct texts are the units: per label, round(test_size * n_texts) of them (at least
        one, at most all but one) go to test, chosen by ``seed``; a text's stratum is the label
        of its first record. Both sides keep the set's order.
        """
        if isinstance(test_size, bool) or not isinstance(test_size, (int, float)) or not (
            0 < test_size < 1
        ):
            raise UsageError(f"test_size must be a fraction strictly between 0 and 1, "
                             f"got {test_size!r}.")
        if not self.prompts:
            raise UsageError("Cannot split an empty PromptSet.")
        units: dict[str, str] = {}  # text -> label of its first record, in first-seen order
        for p in self.prompts:
            units.setdefault(p.text, p.label)
        test_texts: set[str] = set()
        for label in LABELS:
            texts = [t for t, lab in units.items() if lab == label]
            if not texts:
                continue
            if len(texts) < 2:
                raise UsageError(f"Label {label!r} has {len(texts)} distinct text; a stratified "
                                 f"split needs at least 2 per label.")
            n_test = min(max(round(test_size * len(texts)), 1), len(texts) - 1)
            test_texts.update(random.Random(f"{seed}/{label}").sample(texts, n_test))
        train = PromptSet(p for p in self.prompts if p.text not in test_texts)
        test = PromptSet(p for p in self.prompts if p.text in test_texts)
        return train, test
