"""Debian packages some tests need (chromium, graphviz): installed when absent, as root."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable

import pytest


def ensure_installed(package: str, find: Callable[[], str | None]) -> str:
    """What `find` locates, after `apt-get install package` if needed; skip when impossible."""
    found = find()
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"{package} is absent and cannot be installed (not root or no apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=300)
        subprocess.run(
            ["apt-get", "install", "-y", package], env=env, capture_output=True, timeout=600
        )
    except subprocess.TimeoutExpired:
        pytest.skip(f"installing {package} with apt-get timed out")
    found = find()
    if not found:
        pytest.skip(f"apt-get could not install {package}")
    return found
