"""The engine's one error hierarchy.

Every error carries `loc`, the path of the field at fault in the request (for example
`("nodes", 3, "inputs", 1)`), and `node`, the id of the node at fault when there is one.
The service turns these into problem+json 422 answers; the engine never knows about HTTP.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

Loc = tuple[str | int, ...]


class EngineError(Exception):
    """A request that is well-formed JSON but not a valid graph or network."""

    def __init__(self, message: str, *, loc: Sequence[str | int] = (), node: str | None = None):
        super().__init__(message)
        self.message = message
        self.loc: Loc = tuple(loc)
        self.node = node


class GraphError(EngineError):
    """Structure: unknown or duplicate id, wrong arity, cycle, unknown output."""


class ShapeError(EngineError):
    """Operand shapes an op cannot combine (broadcasting, matmul, axes)."""


class ValueDomainError(EngineError):
    """A value an op cannot take (class labels that are not integers in range)."""


class LimitError(EngineError):
    """A request over one of the configured limits; names the limit and its value."""

    def __init__(
        self,
        message: str,
        *,
        limit: str,
        value: int | float,
        loc: Sequence[str | int] = (),
        node: str | None = None,
    ):
        super().__init__(message, loc=loc, node=node)
        self.limit = limit
        self.value = value


def check_limits(
    checks: Iterable[tuple[str, int, int, str]],
    *,
    loc: Sequence[str | int] = (),
    node: str | None = None,
) -> None:
    """Refuse the first (limit name, limit, amount, what) whose amount is over its limit (a
    limit of 0 is none): "<what> <amount>; the limit <name> is <limit>", a `LimitError`."""
    for name, limit, amount, what in checks:
        if limit and amount > limit:
            raise LimitError(
                f"{what} {amount}; the limit {name} is {limit}",
                limit=name,
                value=limit,
                loc=loc,
                node=node,
            )
