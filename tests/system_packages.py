"""Debian packages some tests need (chromium, graphviz). The tests never install them:
`.ci/run` does, before `make test`, and sets GRADIAG_CI=1, under which a missing one is a
failure. Elsewhere a test that needs one skips with a one-line reason."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest


def require(package: str, find: Callable[[], str | None]) -> str:
    """What `find` locates (a path); skip when it finds nothing, or fail under CI."""
    found = find()
    if found:
        return found
    reason = f"the Debian package {package} is not installed"
    if os.environ.get("GRADIAG_CI"):
        pytest.fail(f"{reason}; .ci/run installs it")
    pytest.skip(reason)
