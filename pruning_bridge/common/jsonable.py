"""Dataclasses that save to and load from JSON (results, reports, training logs), and
:func:`read_json`, which turns a damaged JSON file into one clear ``UsageError``."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .atomic import write_json_atomic
from .errors import UsageError


def read_json(path: str | Path, fix: str = "") -> Any:
    """The JSON value in ``path``. A missing, unreadable, non-UTF-8 or truncated file is a
    ``UsageError`` naming the file and what is wrong, followed by ``fix`` (what to do)."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        problem = "not found"
    except OSError as error:
        problem = f"unreadable ({error.strerror or error})"
    except UnicodeDecodeError as error:
        problem = f"not a JSON text file (invalid UTF-8 at byte {error.start})"
    except json.JSONDecodeError as error:
        problem = f"not valid JSON, truncated or damaged ({error.msg} at line {error.lineno})"
    raise UsageError(f"{path} is {problem}." + (f" {fix}" if fix else ""))


class JsonDataclass:
    """``to_dict`` / ``to_json`` / ``from_json`` for a dataclass of JSON-friendly fields."""

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return asdict(self)

    def to_json(self, path: str | Path) -> Path:
        """Write as JSON (atomically: a crash never leaves half a file)."""
        return write_json_atomic(path, self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, path: str | Path):
        """Read an instance written by ``to_json``; a damaged or foreign file is a
        ``UsageError`` naming it."""
        fix = f"Delete it (or write it again with {cls.__name__}.to_json)."
        data = read_json(path, fix)
        try:
            return cls(**data)
        except TypeError as error:  # not an object, or other fields
            raise UsageError(f"{path} does not hold a {cls.__name__} ({error}). {fix}") from None
