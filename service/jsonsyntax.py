"""JSON that the wire contract calls malformed although common parsers take it: a key twice in
one object, and the bare literals `NaN`, `Infinity`, `-Infinity` (RFC 8259 has no such
tokens; the contract writes non-finite numbers as strings). Pydantic's parser keeps the last
of two equal keys and reads the literals as floats, so `check_json_syntax` looks at the raw
bytes first, with the standard library's parser: its `object_pairs_hook` sees every key of
every object and its `parse_constant` every bare literal.

The same pass refuses an object of more than MAX_MEMBERS members (but where the caller
allows a wider one, such as an expression's `values`): every object of the API has a dozen
fields at most, and Pydantic would answer a million unknown fields with a million errors
(seconds, and gigabytes), where this answers one.

An array with no string, no object and no `N` or `I` in it (numbers, true, false, null: a
tensor, nearly all of a big body's bytes) can hold neither, nor can an empty object; each
run of such siblings is first folded into one `0` by a regular expression (~2 ms per MB,
linear: no nested quantifier), innermost first; the standard parser then walks only what is
left (objects, strings), ~30 ms per MB of nodes. The folded text only answers "is there
one?"; where it is comes from the raw text.
A fold inside a string can make two different keys look equal (`"a[1]"`, `"a[2]"`), never
two equal keys different, so a duplicate found in the folded text is confirmed on the raw
text before it is reported. Anything else malformed is left to Pydantic's parser, whose
message the answer gives."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

from gradiag.service.text import clip

# an array without strings, objects, arrays or the letters that start NaN and Infinity, or
# an empty object; a run of them, comma-separated. No quote: never across a string's edge.
# Possessive (Python 3.11): nothing to backtrack into, so no state kept per repetition (a
# plain `*` took 3.4 s over 5.5M empty objects, this 0.2 s).
_ITEM = rb"(?:\[[^\"{}\[\]NI]*+\]|\{\s*+\})"
_FOLDABLE = re.compile(_ITEM + rb"(?:\s*+,\s*+" + _ITEM + rb")*+")
MAX_FOLDS = 8  # one pass per tensor rank; deeper nesting is left to the parsers
_NUMBER_ARRAY = re.compile(rb"\[\s*+[-0-9\[]")  # where an array of numbers (or arrays) starts
LITERALS = ("NaN", "Infinity", "-Infinity")
MAX_MEMBERS = 64  # members of one object, unless the caller allows more at its path

Loc = list[str | int]


class JsonSyntaxError(ValueError):
    """A duplicate key or a bare non-finite literal (`status` 400: not JSON as the contract
    has it), or an object too wide (422: JSON, but no valid request), at `loc`."""

    def __init__(self, message: str, loc: Loc, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.loc = loc
        self.status = status


class _Found(Exception):
    """Stops the quick pass at the first duplicate key, bare literal or wide object."""


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> None:
    if len(dict(pairs)) != len(pairs) or len(pairs) > MAX_MEMBERS:
        raise _Found
    return None  # the quick pass builds nothing


def _refuse_literal(name: str) -> None:
    raise _Found


_QUICK = json.JSONDecoder(object_pairs_hook=_refuse_duplicates, parse_constant=_refuse_literal)


def fold_number_arrays(body: bytes) -> bytes:
    """Every run of foldable siblings as one `0`, innermost first, up to MAX_FOLDS levels.
    A body without an array of numbers (a packed columns body: mostly base64 text; a nodes
    body of scalars: arrays of ids) is left as it is: there the parser walks the text faster
    than the expression scans it."""
    if _NUMBER_ARRAY.search(body) is None:
        return body
    for _ in range(MAX_FOLDS):
        body, folds = _FOLDABLE.subn(b"0", body)
        if not folds:
            break
    return body


Wide = Mapping[tuple[str | int, ...], int]


def check_json_syntax(body: bytes, wide: Wide | None = None) -> None:
    """Raise JsonSyntaxError for the first duplicate key, bare literal or object of more
    than MAX_MEMBERS members (`wide`: paths where more are allowed, and how many). Anything
    else malformed (or too deep for the standard parser) passes: Pydantic's parser answers
    it."""
    try:
        _QUICK.decode(fold_number_arrays(body).decode("utf-8"))
    except _Found:
        pass
    except (ValueError, RecursionError):  # malformed or deep: Pydantic says where
        return
    else:
        return
    found = _locate(body, wide or {})
    if found is not None:
        raise found


# --- the error path: parse again, keeping markers, and find the first one ---------------


class _DuplicateKey(dict[str, Any]):
    def __init__(self, pairs: list[tuple[str, Any]], key: str) -> None:
        super().__init__(pairs)
        self.key = key


class _WideObject(dict[str, Any]):
    pass


class _Literal:
    def __init__(self, name: str) -> None:
        self.name = name


_LITERAL_MARKERS = {name: _Literal(name) for name in LITERALS}


def _mark_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            return _DuplicateKey(pairs, key)
        seen.add(key)
    return _WideObject(pairs) if len(pairs) > MAX_MEMBERS else dict(pairs)


_MARKING = json.JSONDecoder(
    object_pairs_hook=_mark_duplicates, parse_constant=_LITERAL_MARKERS.__getitem__
)


def _locate(body: bytes, wide: Wide) -> JsonSyntaxError | None:
    """The raw body parsed with markers; the first marker in document order, as an error.
    None when the quick pass's finding was an artefact of folding, or a wide object where
    `wide` allows it."""
    try:
        document = _MARKING.decode(body.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    for loc, item in _walk(document):
        if isinstance(item, _Literal):
            return JsonSyntaxError(
                f"bare {item.name} is not JSON; write it as the string {item.name!r}", loc
            )
        if isinstance(item, _DuplicateKey):
            key = clip(item.key)
            return JsonSyntaxError(f"the key {key!r} appears twice in this object", [*loc, key])
        if isinstance(item, _WideObject):
            allowed = wide.get(tuple(loc))
            if allowed is not None and len(item) <= allowed:
                continue
            most = MAX_MEMBERS if allowed is None else allowed
            return JsonSyntaxError(
                f"the object has {len(item):,} members; at most {most:,} are allowed here"
                + (" (the others would be unknown fields)" if allowed is None else ""),
                loc,
                status=422,
            )
    return None


def _walk(document: Any) -> Iterator[tuple[list[str | int], Any]]:
    """Every value with its path, in document order, depth first; lazy, so that the first
    marker of a long list is found without visiting the rest."""
    yield [], document
    stack: list[tuple[list[str | int], Iterator[tuple[str | int, Any]]]] = []
    if isinstance(document, dict | list):
        stack.append(([], _children(document)))
    while stack:
        path, children = stack[-1]
        step = next(children, None)
        if step is None:
            stack.pop()
            continue
        key, child = step
        child_path = [*path, key]
        yield child_path, child
        if isinstance(child, dict | list):
            stack.append((child_path, _children(child)))


def _children(container: dict[str, Any] | list[Any]) -> Iterator[tuple[str | int, Any]]:
    if isinstance(container, dict):
        return iter(container.items())
    return enumerate(container)
