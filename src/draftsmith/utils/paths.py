"""Where draftsmith keeps things that outlive a clone (built engines, materialized targets)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$DRAFTSMITH_CACHE`, else `~/.cache/draftsmith` — never inside the repository."""
    root = os.environ.get("DRAFTSMITH_CACHE") or os.path.join(Path.home(), ".cache", "draftsmith")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
