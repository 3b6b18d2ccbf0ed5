"""Search over a user's own videos: the index (faiss + SQLite), text queries, and the web page."""

from __future__ import annotations

import importlib
from types import ModuleType

from evl.errors import ConfigError


def optional(module: str) -> ModuleType:
    """Import faiss / fastapi / uvicorn, or say how to install them (they are the `serve` extra)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"{module} is not installed; evl's search and web page need the serve extra: "
                          f"pip install 'evl[serve]' (or pip install faiss-cpu fastapi uvicorn)") from e
