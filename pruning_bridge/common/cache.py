"""Where the toolkit caches what it builds once: converted checkpoints and tokenizer files."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where converted checkpoints live: ``$LAYERS_TO_LATENTS_CACHE``, else
    ``~/.cache/layers-to-latents``."""
    env = os.environ.get("LAYERS_TO_LATENTS_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "layers-to-latents"
