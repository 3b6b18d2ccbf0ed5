"""What a test needs from outside the package (an optional module, a program), and what happens when it
is missing: a skip that says how to get it on a developer's machine, a *failure* under `CI=true`.

CI installs everything the suite uses (`.ci/run`: the dev extra and Debian's chromium + chromedriver),
so a missing piece there is a broken install, and a broken install must not pass as ~30 quiet skips.
"""

from __future__ import annotations

import importlib
import os
import shutil
from types import ModuleType

import pytest


def in_ci() -> bool:
    """True when the suite runs in CI (`CI=true`, as .ci/run and most CI services set it)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _missing(what: str, why: str, install: str) -> None:
    message = f"{what} is missing ({why}); {install}"
    if in_ci():
        pytest.fail(f"CI=true: {message}. CI must run every test: fix the install", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def module(name: str, install: str) -> ModuleType:
    """Import `name`, or skip (outside CI) / fail (CI) with `install` as the way to get it."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        _missing(f"Python module {name!r}", str(err), install)
        raise AssertionError("unreachable") from err


def program(*names: str, install: str) -> str:
    """The path of the first of `names` on PATH, or skip (outside CI) / fail (CI)."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    _missing(f"program {' or '.join(names)}", "not on PATH", install)
    raise AssertionError("unreachable")
