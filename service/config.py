"""Settings from the environment, validated once at start-up.

Every setting is `GRADIAG_<NAME>`; docs/configuration.md has the table.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields


class ConfigError(ValueError):
    """A setting in the environment that cannot be used; the message names it."""


@dataclass(frozen=True)
class Settings:
    max_body_bytes: int = 16 * 1024 * 1024
    max_nodes: int = 250_000
    max_tensor_elements: int = 4_000_000
    max_total_elements: int = 16_000_000
    max_flops: int = 20_000_000_000

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        values: dict[str, int] = {}
        for f in fields(cls):
            name = f"GRADIAG_{f.name.upper()}"
            raw = environ.get(name)
            if raw is None or raw == "":
                continue
            try:
                value = int(raw.replace("_", ""))
            except ValueError:
                raise ConfigError(f"{name}={raw!r} is not a whole number") from None
            if value <= 0:
                raise ConfigError(f"{name}={raw!r} must be positive")
            values[f.name] = value
        return cls(**values)
