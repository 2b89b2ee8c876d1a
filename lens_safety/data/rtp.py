"""RealToxicityPrompts (Gehman et al. 2020): prompts, their original continuations and the
Perspective API scores of both, plus a leak-free train / validation / test split.

    prompts = load_rtp("../shared/data")            # rtp/{toxic,nontoxic}.jsonl (DecodingTrust)
    prompts = load_rtp(path="my_rtp.jsonl")          # any local JSONL in the RTP record format
    prompts = load_rtp()                             # allenai/real-toxicity-prompts from the hub
    split = split_rtp(prompts, seed=0)
    split.texts("test", "toxic", n=100)

A record is one JSON object: ``prompt`` and ``continuation``, each a dict with ``text`` and the
Perspective scores of that text (``toxicity``, ``profanity``, ...; ``null`` when Perspective gave
none, read as NaN), plus ``challenging`` and the source offsets ``filename``, ``begin``, ``end``.
A prompt's *kind* is ``"toxic"`` for challenging prompts and ``"nontoxic"`` otherwise; in a
``data_dir`` it is the file's (``rtp/toxic.jsonl`` or ``rtp/nontoxic.jsonl``).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from pruning_bridge.common import JsonDataclass, UsageError
from pruning_bridge.evals.data import DataNotFoundError, load_hub_dataset

KINDS = ("toxic", "nontoxic")
SPLITS = ("train", "validation", "test")
HUB_DATASET = "allenai/real-toxicity-prompts"

_HINT = (
    "Pass data_dir=... pointing at a directory holding rtp/toxic.jsonl and rtp/nontoxic.jsonl "
    "(e.g. ../shared/data), path=... pointing at any JSONL file of RealToxicityPrompts records, "
    f"or neither to load {HUB_DATASET} from the Hugging Face hub."
)


@dataclass(frozen=True)
class RtpPrompt(JsonDataclass):
    """One RTP prompt with its original continuation and the Perspective scores of both.

    ``toxicity`` / ``continuation_toxicity`` are the Perspective toxicity of the prompt /
    continuation text (NaN when absent); ``scores`` / ``continuation_scores`` hold every
    Perspective attribute of the record (NaN for absent values).
    """

    id: str  # "<filename>:<begin>-<end>"
    text: str
    continuation: str
    kind: str  # "toxic" (challenging) | "nontoxic"
    challenging: bool
    toxicity: float
    continuation_toxicity: float
    scores: dict[str, float] = field(default_factory=dict, hash=False)
    continuation_scores: dict[str, float] = field(default_factory=dict, hash=False)


# ---------------------------------------------------------------- parsing


def _scores(part: dict, name: str, where: str) -> dict[str, float]:
    """The Perspective scores of a ``prompt`` / ``continuation`` dict (None -> NaN)."""
    scores = {}
    for key, value in part.items():
        if key == "text":
            continue
        if value is None:
            scores[key] = math.nan
        elif isinstance(value, Real) and not isinstance(value, bool):
            scores[key] = float(value)
        else:
            raise UsageError(f"{where}: {name}.{key} must be a number or null, got {value!r}.")
    return scores


def _text_part(record: dict, name: str, where: str) -> dict:
    part = record.get(name)
    if not isinstance(part, dict):
        raise UsageError(f"{where}: missing {name!r} (a dict with 'text' and Perspective "
                         f"scores); got {part!r}.")
    if not isinstance(part.get("text"), str):
        raise UsageError(f"{where}: missing {name}.text (a string); got {part.get('text')!r}.")
    return part


def parse_record(record: Any, where: str, kind: str | None = None) -> RtpPrompt:
    """One RTP record as an :class:`RtpPrompt`; ``where`` (file and line) prefixes errors.

    ``kind`` overrides the kind derived from ``challenging`` (a local file's kind).
    """
    if not isinstance(record, dict):
        raise UsageError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    prompt = _text_part(record, "prompt", where)
    continuation = _text_part(record, "continuation", where)
    challenging = record.get("challenging", kind == "toxic")
    if not isinstance(challenging, bool):
        raise UsageError(f"{where}: 'challenging' must be true or false, got {challenging!r}.")
    offsets = [record.get(key) for key in ("filename", "begin", "end")]
    record_id = f"{offsets[0]}:{offsets[1]}-{offsets[2]}" if None not in offsets else where
    scores = _scores(prompt, "prompt", where)
    continuation_scores = _scores(continuation, "continuation", where)
    return RtpPrompt(
        id=record_id,
        text=prompt["text"],
        continuation=continuation["text"],
        kind=kind or ("toxic" if challenging else "nontoxic"),
        challenging=challenging,
        toxicity=scores.get("toxicity", math.nan),
        continuation_toxicity=continuation_scores.get("toxicity", math.nan),
        scores=scores,
        continuation_scores=continuation_scores,
    )


def _read_jsonl(path: Path, kind: str | None = None) -> Iterator[RtpPrompt]:
    """The records of a JSONL file in order (blank lines skipped)."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}, line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise UsageError(f"{where}: not UTF-8 text (byte {error.start + 1} of the line "
                                 f"cannot be decoded); save the file as UTF-8.") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UsageError(f"{where}: not valid JSON ({error.msg} at column "
                                 f"{error.colno}).") from error
            yield parse_record(record, where, kind)


# ---------------------------------------------------------------- loading


def _check_kinds(kinds: str | Sequence[str]) -> tuple[str, ...]:
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise UsageError(f"kinds must be a non-empty selection of {list(KINDS)}, got {kinds!r}.")
    return tuple(dict.fromkeys(kinds))


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UsageError(f"limit must be a positive integer (prompts per kind) or None, "
                         f"got {limit!r}.")


def _take(records: Iterable[RtpPrompt], kinds: tuple[str, ...], limit: int | None):
    """The records of the given kinds, at most ``limit`` of each, stopping once all are full."""
    counts = dict.fromkeys(kinds, 0)
    chosen = []
    for record in records:
        if record.kind not in counts or (limit is not None and counts[record.kind] >= limit):
            continue
        chosen.append(record)
        counts[record.kind] += 1
        if limit is not None and all(n >= limit for n in counts.values()):
            break
    return chosen


def _kind_file(root: Path, kind: str) -> Path:
    candidates = [root / "rtp" / f"{kind}.jsonl", root / f"{kind}.jsonl"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = "\n  ".join(str(c) for c in candidates)
    raise DataNotFoundError(f"RealToxicityPrompts {kind!r} file not found under "
                            f"data_dir={str(root)!r}. Expected one of:\n  {tried}\n{_HINT}")


def _hub_records() -> Iterator[RtpPrompt]:
    rows = load_hub_dataset("RealToxicityPrompts", HUB_DATASET, split="train", hint=_HINT)
    for number, row in enumerate(rows):
        yield parse_record(dict(row), f"{HUB_DATASET} (train), row {number}")


def load_rtp(
    data_dir: str | Path | None = None,
    kinds: str | Sequence[str] = KINDS,
    path: str | Path | None = None,
    limit: int | None = None,
) -> list[RtpPrompt]:
    """RTP prompts of the given ``kinds``, in ``kinds`` order, then file (or hub) order.

    From ``{data_dir}/rtp/{kind}.jsonl`` (kind = the file's), from ``path`` (one JSONL file;
    kind from ``challenging``), or with neither from the hub dataset ``allenai/real-toxicity-
    prompts`` (kind from ``challenging``). ``limit`` keeps the first ``limit`` prompts per kind.
    A malformed record raises :class:`UsageError` naming its file, line and problem.
    """
    kinds = _check_kinds(kinds)
    _check_limit(limit)
    if data_dir is not None and path is not None:
        raise UsageError("Pass either data_dir=... (a directory with rtp/{toxic,nontoxic}.jsonl) "
                         "or path=... (one JSONL file), not both.")
    if data_dir is not None:
        root = Path(data_dir)
        files = {kind: _kind_file(root, kind) for kind in kinds}  # all checked before reading
        return [r for kind in kinds for r in _take(_read_jsonl(files[kind], kind), (kind,), limit)]
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise DataNotFoundError(f"RealToxicityPrompts file not found: {str(path)!r}. {_HINT}")
        records = _take(_read_jsonl(path), kinds, limit)
    else:
        records = _take(_hub_records(), kinds, limit)
    return [r for kind in kinds for r in records if r.kind == kind]


# ---------------------------------------------------------------- splitting


@dataclass
class RtpSplit:
    """Train / validation / test prompts; no prompt text is in two of them."""

    train: list[RtpPrompt]
    validation: list[RtpPrompt]
    test: list[RtpPrompt]

    def part(self, split: str) -> list[RtpPrompt]:
        """The prompts of one split by name (``train``, ``validation`` or ``test``)."""
        if split not in SPLITS:
            raise UsageError(f"Unknown split {split!r}; choose one of {list(SPLITS)}.")
        return getattr(self, split)

    def texts(self, split: str, kind: str | None = None, n: int | None = None) -> list[str]:
        """Prompt texts of one split and kind (None: both kinds), the first ``n`` if given."""
        prompts = self.part(split)
        if kind is not None:
            _check_kinds((kind,))
            prompts = [p for p in prompts if p.kind == kind]
        if n is not None:
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise UsageError(f"n must be a non-negative integer or None, got {n!r}.")
            if n > len(prompts):
                raise UsageError(f"Asked for n={n} {kind or 'RTP'} prompts from the {split} "
                                 f"split, which holds {len(prompts)}.")
            prompts = prompts[:n]
        return [p.text for p in prompts]

    def counts(self) -> dict[str, dict[str, int]]:
        """Number of prompts per split and kind."""
        return {s: {k: sum(p.kind == k for p in self.part(s)) for k in KINDS} for s in SPLITS}

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={len(self.part(s))}" for s in SPLITS)
        return f"RtpSplit({sizes})"


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    try:
        values = tuple(float(f) for f in fractions)
    except (TypeError, ValueError) as error:
        raise UsageError(f"fractions must be three numbers (train, validation, test), "
                         f"got {fractions!r}.") from error
    if len(values) != 3:
        raise UsageError(f"fractions must be three numbers (train, validation, test), "
                         f"got {len(values)}: {fractions!r}.")
    if not all(0 < f < 1 for f in values):
        raise UsageError(f"Every fraction must be strictly between 0 and 1, got {fractions!r}.")
    if abs(sum(values) - 1) > 1e-6:
        raise UsageError(f"fractions must sum to 1, got {fractions!r} (sum {sum(values):g}).")
    return values


def _allocate(n: int, fractions: Sequence[float]) -> list[int]:
    """Split ``n`` units by ``fractions`` (largest remainder: sizes sum to ``n``)."""
    exact = [f * n for f in fractions]
    sizes = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (sizes[i] - exact[i], i))
    for i in by_remainder[: n - sum(sizes)]:
        sizes[i] += 1
    return sizes


def split_rtp(
    prompts: Sequence[RtpPrompt],
    fractions: Sequence[float] = (0.5, 0.25, 0.25),
    seed: int = 0,
) -> RtpSplit:
    """A train / validation / test split of prompts, stratified by kind, by prompt text.

    Distinct prompt texts are the units (records sharing a text stay together; a text's
    stratum is the kind of its first record). Per kind, the texts are shuffled by ``seed`` and
    cut by ``fractions`` (largest remainder, so sizes sum to the number of texts). Every split
    keeps the input order.
    """
    fractions = _check_fractions(fractions)
    if not prompts:
        raise UsageError("Cannot split an empty list of RTP prompts.")
    units: dict[str, str] = {}  # text -> kind of its first record, in first-seen order
    for p in prompts:
        units.setdefault(p.text, p.kind)
    split_of: dict[str, str] = {}
    for kind in sorted(set(units.values())):
        texts = [t for t, k in units.items() if k == kind]
        random.Random(f"{seed}/{kind}").shuffle(texts)
        start = 0
        for name, size in zip(SPLITS, _allocate(len(texts), fractions)):
            split_of.update(dict.fromkeys(texts[start : start + size], name))
            start += size
    return RtpSplit(**{name: [p for p in prompts if split_of[p.text] == name] for name in SPLITS})
