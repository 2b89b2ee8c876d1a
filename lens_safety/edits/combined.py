"""Several edits applied together as one: our clamp with a published edit, say.

    both = CombinedEdit([clamp, aura])     # each an Edit or a fitted PeerEdit
    with both.apply(bridge): ...           # every part active; at a shared hook, in this order
    both.save(folder); Edit.load(folder)   # Edit.load reads a combined folder too

The comparison's search (:mod:`lens_safety.evaluation.compare`) sweeps combinations next to
the single edits, so ``select_edit`` can choose one when it beats every part alone.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from pruning_bridge.common import UsageError
from pruning_bridge.common.atomic import write_json_atomic
from pruning_bridge.common.jsonable import read_json

from .edit import Edit
from .peers import PeerEdit

COMBINED_FILE = "combined.json"


class CombinedEdit:
    """Two or more edits active at once (each part as it would act alone, applied in order)."""

    how = "combined"

    def __init__(self, parts: Sequence[Edit | PeerEdit]):
        parts = [p for part in parts
                 for p in (part.parts if isinstance(part, CombinedEdit) else [part])]
        if len(parts) < 2:
            raise UsageError(f"A combined edit needs at least two parts; got {len(parts)}.")
        for part in parts:
            if not isinstance(part, (Edit, PeerEdit)):
                raise UsageError(f"Combine Edit or PeerEdit objects; got {type(part).__name__}.")
        self.parts: list[Edit | PeerEdit] = parts

    @contextmanager
    def apply(self, model) -> Iterator:
        """Inside the block every part edits ``model``; on exit each is undone (in reverse)."""
        with ExitStack() as stack:
            for part in self.parts:
                stack.enter_context(part.apply(model))
            yield model

    @property
    def config(self) -> dict[str, Any]:
        """What identifies the combination in a sweep's rows: its parts' configs, in order."""
        return {"how": self.how, "parts": [part.config for part in self.parts]}

    def __str__(self) -> str:
        return " + ".join(str(part) for part in self.parts)

    def __repr__(self) -> str:
        return f"CombinedEdit({self})"

    def save(self, folder: str | Path) -> Path:
        """Each part in ``folder/part_<i>`` (as :meth:`Edit.save` writes it), then
        ``combined.json`` naming them."""
        folder = Path(folder)
        for i, part in enumerate(self.parts):
            as_edit(part).save(folder / f"part_{i}")
        write_json_atomic(folder / COMBINED_FILE, {"how": self.how, "parts": len(self.parts),
                                                   "summary": str(self)}, indent=1)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "CombinedEdit":
        """The combination saved in ``folder`` by :meth:`save` (a damaged part is a
        ``UsageError`` naming it)."""
        folder = Path(folder)
        config = read_json(folder / COMBINED_FILE, "Save the combined edit again.")
        try:
            n = int(config["parts"])
        except (KeyError, TypeError, ValueError):
            raise UsageError(f"{folder / COMBINED_FILE} does not say how many parts the edit "
                             f"has. Save the combined edit again.") from None
        return cls([Edit.load(folder / f"part_{i}") for i in range(n)])


def as_edit(part: Edit | PeerEdit) -> Edit:
    """A part as an ``Edit`` (what ``save`` writes): a ``PeerEdit`` through ``from_state``."""
    if isinstance(part, PeerEdit):
        return Edit.from_state(part.how, part.state, part.strength, **part.info)
    return part
