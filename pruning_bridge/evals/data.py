"""Data loaders for MMLU, GSM8K and WikiText-2, as plain Python records.

Each loader reads either a local directory laid out like the original releases
(``data_dir=...``, e.g. ``../shared/data``) or, with ``data_dir=None``, the Hugging Face hub
(``cais/mmlu``, ``openai/gsm8k``, ``wikitext``). Both sources give the same records, so
evaluations are reproducible offline. Subsets are drawn deterministically from a seed.
"""

from __future__ import annotations

import csv
import difflib
import json
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, TypeVar

from ..common.errors import DataFormatError, DataNotFoundError, UsageError

T = TypeVar("T")

_HUB_HINT = (
    "Pass data_dir=... pointing at a local directory laid out like the original releases "
    "(e.g. <root>/mmlu/data/test/<subject>_test.csv, <root>/gsm8k/test.jsonl, "
    "<root>/wikitext2/wiki.test.raw), or data_dir=None to download from the Hugging Face hub."
)
_MMLU_FOLDERS = {"test": "test", "dev": "dev", "validation": "val"}  # original release names
_GSM8K_SPLITS = ("test", "train")
_WIKITEXT_FILES = {"test": "test", "validation": "valid", "valid": "valid", "train": "train"}
_ANSWER_LETTERS = "ABCD"


@dataclass(frozen=True)
class MMLUQuestion:
    """One MMLU multiple-choice question; ``id`` is ``"<subject>/<row index>"``."""

    id: str
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # 0..3 for A..D


@dataclass(frozen=True)
class GSM8KProblem:
    """One GSM8K problem; ``target`` is the gold number after ``#### `` in ``solution``."""

    id: str
    question: str
    solution: str
    target: float
# ---------------------------------------------------------------- helpers


def _missing(what: str, expected: Sequence[Path], data_dir: Path) -> DataNotFoundError:
    """Build an actionable error listing every location that was tried."""
    tried = "\n  ".join(str(p) for p in expected)
    return DataNotFoundError(
        f"{what} not found under data_dir={str(data_dir)!r}. Expected one of:\n  {tried}\n"
        f"{_HUB_HINT}"
    )


def _first_existing(candidates: Sequence[Path]) -> Path | None:
    return next((p for p in candidates if p.exists()), None)


def load_hub_dataset(what: str, *args: str, hint: str = _HUB_HINT, **kwargs: str):
    """Call ``datasets.load_dataset`` lazily; any failure becomes a DataNotFoundError."""
    try:
        from datasets import load_dataset

        return load_dataset(*args, **kwargs)
    except Exception as exc:  # network, missing package, bad cache: all mean "use data_dir"
        raise DataNotFoundError(
            f"Could not load {what} from the Hugging Face hub ({type(exc).__name__}: {exc}); "
            f"the hub may be unreachable. {hint}"
        ) from exc


def _check_split(split: str, allowed: Sequence[str], dataset: str) -> None:
    if split not in allowed:
        raise UsageError(f"Unknown {dataset} split {split!r}; choose one of {list(allowed)}.")


# ---------------------------------------------------------------- GSM8K target

_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")


def gsm8k_target(solution: str) -> float:
    """Parse the gold number after the last ``#### `` of a GSM8K answer (``"1,000"`` -> 1000.0)."""
    marks = re.findall(r"####[ \t]*([^\n]*)", solution)
    if not marks:
        raise UsageError(f"No '#### <number>' found in GSM8K answer: {solution[-80:]!r}")
    text = marks[-1].strip().replace(",", "").replace("$", "")
    if not _NUMBER.fullmatch(text):
        raise UsageError(f"Could not parse a number after '####' in {marks[-1]!r}")
    return float(text)


# ---------------------------------------------------------------- MMLU


def _mmlu_files(split: str, data_dir: Path) -> dict[str, Path]:
    """Map subject -> CSV path for a local MMLU split, trying the usual folder layouts."""
    folder = _MMLU_FOLDERS[split]
    suffix = f"_{folder}.csv"
    candidates = [
        data_dir / "mmlu" / "data" / folder,
        data_dir / "data" / folder,
        data_dir / folder,
        data_dir,
    ]
    for cand in candidates:
        files = sorted(cand.glob(f"*{suffix}")) if cand.is_dir() else []
        if files:
            return {f.name[: -len(suffix)]: f for f in files}
    expected = [c / f"<subject>{suffix}" for c in candidates]
    raise _missing(f"MMLU {split} split", expected, data_dir)


def _select_subjects(available: Sequence[str], subjects: Sequence[str] | None) -> list[str]:
    """Validate ``subjects`` against ``available``; unknown names get close-match suggestions."""
    if subjects is None:
        return sorted(available)
    if isinstance(subjects, str):
        subjects = [subjects]
    unknown = [s for s in subjects if s not in available]
    if unknown:
        hints = {s: difflib.get_close_matches(s, available, n=3, cutoff=0.5) for s in unknown}
        detail = "; ".join(f"{s!r} (did you mean {h}?)" if h else repr(s) for s, h in hints.items())
        raise UsageError(f"Unknown MMLU subject(s): {detail}. Valid subjects: {sorted(available)}")
    return sorted(set(subjects))


def _read_mmlu_csv(subject: str, path: Path) -> list[MMLUQuestion]:
    """Parse one headerless 6-column MMLU CSV (fields may hold commas and newlines)."""
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    questions = []
    for i, row in enumerate(rows):
        if len(row) != 6 or row[5].strip() not in _ANSWER_LETTERS:
            raise DataFormatError(f"{path}, row {i}: not question,A,B,C,D,answer-letter "
                                  f"({str(row)[:80]}); fix or remove that row.")
        questions.append(
            MMLUQuestion(
                id=f"{subject}/{i}",
                subject=subject,
                question=row[0],
                choices=(row[1], row[2], row[3], row[4]),
                answer=_ANSWER_LETTERS.index(row[5].strip()),
            )
        )
    return questions


def load_mmlu(
    split: str = "test",
    data_dir: str | Path | None = None,
    subjects: Sequence[str] | None = None,
) -> list[MMLUQuestion]:
    """Load MMLU questions sorted by subject, then row index; ``subjects`` restricts the set."""
    _check_split(split, list(_MMLU_FOLDERS), "MMLU")
    if data_dir is not None:
        files = _mmlu_files(split, Path(data_dir))
        chosen = _select_subjects(list(files), subjects)
        return [q for s in chosen for q in _read_mmlu_csv(s, files[s])]

    rows = load_hub_dataset("MMLU (cais/mmlu)", "cais/mmlu", "all", split=split)
    by_subject: dict[str, list[MMLUQuestion]] = defaultdict(list)
    for row in rows:
        subject = row["subject"]
        index = len(by_subject[subject])
        by_subject[subject].append(
            MMLUQuestion(
                id=f"{subject}/{index}",
                subject=subject,
                question=row["question"],
                choices=tuple(row["choices"]),
                answer=int(row["answer"]),
            )
        )
    chosen = _select_subjects(list(by_subject), subjects)
    return [q for s in chosen for q in by_subject[s]]


# ---------------------------------------------------------------- GSM8K


def _gsm8k_rows(path: Path) -> list[dict]:
    """The records of a GSM8K JSON-lines file; a bad line is a ``UsageError`` naming it."""
    rows = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
            problem = None if isinstance(row, dict) and {"question", "answer"} <= set(row) else \
                "not an object with question and answer"
        except UnicodeDecodeError as error:
            problem = f"not UTF-8 text (byte {error.start} of the line)"
        except json.JSONDecodeError as error:
            problem = f"not valid JSON ({error.msg} at column {error.colno})"
        if problem is not None:
            raise DataFormatError(f"{path}, line {number}: {problem}; fix or remove that line (the "
                             f"original GSM8K files have one JSON object per line).")
        rows.append(row)
    return rows


def load_gsm8k(split: str = "test", data_dir: str | Path | None = None) -> list[GSM8KProblem]:
    """Load GSM8K problems in file order; ``id`` is the 0-based row index."""
    _check_split(split, _GSM8K_SPLITS, "GSM8K")
    if data_dir is not None:
        root = Path(data_dir)
        candidates = [root / "gsm8k" / f"{split}.jsonl", root / f"{split}.jsonl"]
        path = _first_existing(candidates)
        if path is None:
            raise _missing(f"GSM8K {split} split", candidates, root)
        rows = _gsm8k_rows(path)
    else:
        rows = load_hub_dataset("GSM8K (openai/gsm8k)", "openai/gsm8k", "main", split=split)
    return [
        GSM8KProblem(
            id=str(i),
            question=row["question"],
            solution=row["answer"],
            target=gsm8k_target(row["answer"]),
        )
        for i, row in enumerate(rows)
    ]


# ---------------------------------------------------------------- WikiText-2


def _join_lines(lines: Sequence[str]) -> str:
    """Drop blank lines, strip each line's newline only, and join with the usual ``"\\n\\n"``."""
    stripped = (line.removesuffix("\n").removesuffix("\r") for line in lines)
    return "\n\n".join(line for line in stripped if line.strip())


def load_wikitext2(split: str = "test", data_dir: str | Path | None = None) -> str:
    """Return WikiText-2 (raw) as one string: non-blank lines joined with ``"\\n\\n"``."""
    _check_split(split, list(_WIKITEXT_FILES), "WikiText-2")
    if data_dir is not None:
        root = Path(data_dir)
        name = f"wiki.{_WIKITEXT_FILES[split]}.raw"
        candidates = [
            root / "wikitext2" / name,
            root / "wikitext-2-raw" / name,
            root / name,
        ]
        path = _first_existing(candidates)
        if path is None:
            raise _missing(f"WikiText-2 {split} split", candidates, root)
        # Split on "\n" only: str.splitlines would also break on \x1c, \u2028 and friends.
        return _join_lines(path.read_bytes().decode("utf-8").split("\n"))

    hub_split = "validation" if split == "valid" else split
    rows = load_hub_dataset("WikiText-2 (wikitext)", "wikitext", "wikitext-2-raw-v1",
                            split=hub_split)
    return _join_lines(rows["text"])


# ---------------------------------------------------------------- subsets


def sample(items: Sequence[T], n: int | None, seed: int = 0) -> list[T]:
    """Deterministic random subset of ``n`` items, kept in their original order."""
    if n is None or n >= len(items):
        return list(items)
    if n < 0:
        raise UsageError(f"n must be >= 0 or None, got {n}")
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


def _allocate(sizes: dict[str, int], n: int) -> dict[str, int]:
    """Split ``n`` across groups by size: largest remainder, at least 1 each when n allows."""
    total = sum(sizes.values())
    quotas = {s: n * size / total for s, size in sizes.items()}
    alloc = {s: int(q) for s, q in quotas.items()}
    by_remainder = sorted(sizes, key=lambda s: (-(quotas[s] - alloc[s]), s))
    for s in by_remainder[: n - sum(alloc.values())]:
        alloc[s] += 1
    if n >= len(sizes):  # every group gets one, taken from the most over-allocated groups
        for s in sorted(s for s in sizes if alloc[s] == 0):
            donor = max((d for d in sizes if alloc[d] > 1), key=lambda d: (alloc[d] - quotas[d], d))
            alloc[donor] -= 1
            alloc[s] = 1
    return alloc


def _row_index(q: MMLUQuestion) -> int:
    return int(q.id.rpartition("/")[2])


def mmlu_subset(
    questions: Sequence[MMLUQuestion], n: int | None = 451, seed: int = 0
) -> list[MMLUQuestion]:
    """Deterministic subset stratified by subject (the report's 451-question MMLU subset).

    ``n`` is split across subjects proportionally to their size; each subject is sampled
    with its own ``random.Random(f"{seed}/{subject}")`` so the draw does not depend on which
    other subjects are present. Returned sorted by (subject, row index).
    """
    ordered = sorted(questions, key=lambda q: (q.subject, _row_index(q)))
    if n is None or n >= len(ordered):
        return ordered
    if n < 1:
        raise UsageError(f"n must be >= 1 or None, got {n}")
    groups: dict[str, list[MMLUQuestion]] = defaultdict(list)
    for q in ordered:
        groups[q.subject].append(q)
    alloc = _allocate({s: len(g) for s, g in groups.items()}, n)
    picked = []
    for subject in sorted(groups):
        rng = random.Random(f"{seed}/{subject}")
        picked += rng.sample(groups[subject], alloc[subject])
    return sorted(picked, key=lambda q: (q.subject, _row_index(q)))
