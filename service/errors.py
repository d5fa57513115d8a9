"""Every error leaves as application/problem+json (RFC 9457), from this one module."""

from __future__ import annotations

import json
import logging
import re
import types
from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import Any, Union, get_args, get_origin

import orjson
from flask import Flask, Response, current_app, g, request
from pydantic import BaseModel, RootModel, ValidationError
from typing_extensions import TypeAliasType
from werkzeug.exceptions import HTTPException

from gradiag.engine import EngineError, LimitError
from gradiag.schemas.common import ID_MESSAGE, ID_PATTERN
from gradiag.schemas.graph import (
    ALL_OPS,
    BODY_TAGS,
    ColumnsRequest,
    ExpressionRequest,
    GraphRequest,
)
from gradiag.schemas.network import LAYER_TYPES, NetworkRequest
from gradiag.service.text import clip, clip_loc

log = logging.getLogger("gradiag")

PROBLEM_TYPES = {
    400: "urn:gradiag:problem:malformed-json",
    401: "urn:gradiag:problem:unauthorized",
    408: "urn:gradiag:problem:request-timeout",
    413: "urn:gradiag:problem:too-large",
    415: "urn:gradiag:problem:unsupported-media-type",
    422: "urn:gradiag:problem:invalid-body",
    500: "urn:gradiag:problem:internal",
    503: "urn:gradiag:problem:busy",
}


class ProblemError(Exception):
    """Raised by views for an answer that is not 2xx."""

    def __init__(self, status: int, title: str, detail: str, **fields: Any):
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.fields = fields


def problem_response(
    status: int,
    title: str,
    detail: str,
    headers: Iterable[tuple[str, str]] = (),
    **fields: Any,
) -> Response:
    body = {
        "type": PROBLEM_TYPES.get(status, "about:blank"),
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.path,
        **{k: v for k, v in fields.items() if v is not None},
    }
    response = Response(orjson.dumps(body), status=status, mimetype="application/problem+json")
    for name, value in headers:
        if name.lower() not in ("content-type", "content-length"):
            response.headers[name] = value
    return response


MAX_ERRORS = 100  # listed in an answer; `error_count` says how many there were
MAX_MESSAGE = 300  # characters of one message (Pydantic's may quote a client's value)


def validation_problem(err: ValidationError, body: bytes) -> ProblemError:
    """Pydantic's errors with clean paths, each naming the node at fault where there is one.

    Errors of one field from the branches of a union are said once; an error whose path is
    a strict prefix of another's (a tensor that is not a number because an element deep in
    it is not one) gives way to the deeper one. Linear in the errors (the wire models stop
    each list at its first bad item, so there are few); at most MAX_ERRORS are listed."""
    raw = err.errors(include_url=False, include_context=True, include_input=False)
    if any(e["type"] == "json_invalid" for e in raw):
        return ProblemError(400, "Malformed JSON", clip(raw[0]["msg"], MAX_MESSAGE))
    items: dict[tuple[Any, ...], dict[str, Any]] = {}
    for e in raw:
        loc = clean_loc(e["loc"], tag_field=_tag_field(e))
        message = _message(e)
        item = items.get(loc)
        if item is None:
            items[loc] = {"loc": clip_loc(list(loc)), "msg": message}
        elif message not in item["msg"]:  # one field failed each branch of its union
            item["msg"] = message if message == TENSOR_MESSAGE else f"{item['msg']}; or: {message}"
    prefixes = {loc[:k] for loc in items for k in range(len(loc))}
    deepest = [item for loc, item in items.items() if loc not in prefixes]
    listed = deepest[:MAX_ERRORS]
    _name_nodes(listed, body)
    first = listed[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    node = f" (node {first['node']!r})" if first.get("node") else ""
    return ProblemError(
        422,
        "Invalid request body",
        f"{where}{node}: {first['msg']}",
        errors=listed,
        error_count=len(deepest) if len(deepest) > len(listed) else None,
    )


def _name_nodes(items: list[dict[str, Any]], body: bytes) -> None:
    """`node`: the id of the node an error is in (clipped), for errors under `nodes`."""
    if not any(_node_index(item) is not None for item in items):
        return
    nodes = _node_ids(body, {i for i in map(_node_index, items) if i is not None})
    for item in items:
        index = _node_index(item)
        if index is not None and index in nodes:
            item["node"] = clip(nodes[index])


def _node_index(item: dict[str, Any]) -> int | None:
    loc = item["loc"]
    if len(loc) >= 2 and loc[0] == "nodes" and isinstance(loc[1], int):
        return int(loc[1])
    return None


def _message(error: Mapping[str, Any]) -> str:
    """What to say about one of Pydantic's errors: its own message, clipped, except for a
    tensor element and an id's characters, which have plainer words."""
    if _is_tensor(error["loc"]):
        return TENSOR_MESSAGE
    if error["type"] == "string_pattern_mismatch" and error["ctx"]["pattern"] == ID_PATTERN:
        return ID_MESSAGE
    return clip(error["msg"], MAX_MESSAGE)


TENSOR_MESSAGE = 'must be a number, "NaN", "Infinity", "-Infinity" or a nested list of them'


def _is_tensor(loc: Iterable[Any]) -> bool:
    """Pydantic names the Number branch `union[float,literal['NaN',...]]` in a tensor's path."""
    return any(isinstance(part, str) and "literal['NaN'" in part for part in loc)


def _tag_field(error: Mapping[str, Any]) -> str | None:
    """The field a tagged union reads its tag from (`op`), for an unknown or missing tag;
    None for a callable discriminator (GraphBody's)."""
    if error["type"] not in ("union_tag_invalid", "union_tag_not_found"):
        return None
    name = str(error.get("ctx", {}).get("discriminator", "")).strip("'")
    return name if name.isidentifier() else None


def _union_branches(*roots: type[BaseModel]) -> frozenset[tuple[str, str]]:
    """(field, branch) pairs: the class names Pydantic puts in a path after a union field
    (`("axis", "int")`, `("gradcheck", "GradcheckOptions")`). Generic branches
    (`list[int]`, `union[...]`, `literal[...]`) have brackets and are dropped by shape."""
    pairs: set[tuple[str, str]] = set()
    seen: set[type[BaseModel]] = set()
    todo = list(roots)
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, info in model.model_fields.items():
            stack: list[Any] = [info.annotation]
            branches: list[type] = []
            while stack:
                tp = stack.pop()
                if isinstance(tp, TypeAliasType):
                    continue  # Tensor: recursive, and its branches all have brackets
                if isinstance(tp, type) and issubclass(tp, BaseModel):
                    todo.append(tp)
                origin = get_origin(tp)
                if origin in (Union, types.UnionType):
                    branches += [a for a in get_args(tp) if isinstance(a, type)]
                if origin is not None:
                    stack.extend(get_args(tp))
            for tp in branches:
                if tp is type(None) or issubclass(tp, RootModel):
                    continue
                pairs.add((name, tp.__name__))
    return frozenset(pairs)


# Pydantic's names for the scalar branches of a union (`Number`, `int | NodeId`)
SCALAR_BRANCHES = frozenset(("float", "int", "str", "constrained-int", "constrained-str"))
SCALARS = frozenset(("output", "output_grad"))  # fields that are such a union
UNION_BRANCHES = _union_branches(GraphRequest, ExpressionRequest, ColumnsRequest, NetworkRequest)


def clean_loc(loc: Iterable[Any], *, tag_field: str | None = None) -> tuple[Any, ...]:
    """Drop Pydantic's union branch names (`union[...]`, `list[int]`, `float`, `int` after
    `axis`, `GradcheckOptions` after `gradcheck`) and discriminator tags (the node tags, and
    the graph/expression tag GraphBody puts first). `tag_field`: the tag itself was at fault
    (an unknown op), so the path ends in that field."""
    out: list[Any] = []
    skip_next = False
    for k, part in enumerate(loc):
        if skip_next:
            skip_next = False
            continue
        if k == 0 and part in BODY_TAGS:
            continue
        if isinstance(part, str) and "[" in part:
            skip_next = part.startswith("union[")  # followed by the branch name
            continue
        if (_union_field(out), part) in UNION_BRANCHES:
            continue
        if part in SCALAR_BRANCHES and out and (isinstance(out[-1], int) or out[-1] in SCALARS):
            continue  # a union of scalars in a list (columns.value) or in a field
        is_tag = len(out) >= 2 and isinstance(out[-1], int) and (out[-2], part) in TAGGED_LISTS
        if not is_tag:
            out.append(part)
    if tag_field is not None:
        out.append(tag_field)
    return tuple(out)


# (a list field, a tag of its items' union): the tag Pydantic puts in an item's error loc
TAGGED_LISTS = {("nodes", op) for op in ALL_OPS} | {("layers", kind) for kind in LAYER_TYPES}


def _union_field(path: list[Any]) -> str | None:
    """The field a union branch name would follow: the last part of the path, or the list
    field before an index (`inputs`, 1, `PackedRows`: a union in each list item)."""
    if path and isinstance(path[-1], int):
        path = path[:-1]
    return path[-1] if path and isinstance(path[-1], str) else None


def _node_ids(body: bytes, wanted: Collection[int]) -> Mapping[int, str]:
    """The ids of the nodes at the `wanted` positions, read only on the error path and only
    as far as needed: the body is walked member by member and `nodes` item by item up to
    the last wanted one (lists stop at their first bad item, so it is usually near the
    front), and a node's members only up to its `id` (its tensor is not decoded)."""
    last = max(wanted)
    ids: dict[int, str] = {}
    try:
        text = body.decode()
        nodes = next(i for key, i in _members(text, 0) if key == "nodes")
        for k, start in enumerate(_items(text, nodes)):
            if k in wanted and text[start] == "{":
                at = next((i for key, i in _members(text, start) if key == "id"), None)
                node_id = None if at is None else _DECODER.raw_decode(text, at)[0]
                if isinstance(node_id, str):
                    ids[k] = node_id
            if k >= last:
                break
    except (ValueError, IndexError, StopIteration, RecursionError):  # not the shape looked for
        pass
    return ids


_DECODER = json.JSONDecoder()
_BLANK = re.compile(r"[ \t\n\r]*")


def _members(text: str, i: int) -> Iterator[tuple[str, int]]:
    """(key, where its value starts) for each member of the object at `i`; a value is
    decoded (to be skipped) only when the caller asks for the next member."""
    i = _skip(text, i, "{")
    while text[i] != "}":
        key, i = _DECODER.raw_decode(text, i)
        i = _skip(text, i, ":")
        yield key, i
        i = _skip(text, _DECODER.raw_decode(text, i)[1], ",")


def _items(text: str, i: int) -> Iterator[int]:
    """Where each item of the array at `i` starts, skipped the same way."""
    i = _skip(text, i, "[")
    while text[i] != "]":
        yield i
        i = _skip(text, _DECODER.raw_decode(text, i)[1], ",")


def _skip(text: str, i: int, token: str) -> int:
    """Past blanks, then past `token` and blanks when it is next."""
    i = _BLANK.match(text, i).end()  # type: ignore[union-attr]
    if text.startswith(token, i):
        i = _BLANK.match(text, i + len(token)).end()  # type: ignore[union-attr]
    return i


def engine_problem(err: EngineError) -> ProblemError:
    item: dict[str, Any] = {"loc": list(err.loc), "msg": err.message}
    if err.node is not None:
        item["node"] = err.node
    if isinstance(err, LimitError):
        value = err.value
        if err.limit == "time_budget_seconds":  # the engine sees a deadline, not the budget
            value = current_app.config["GRADIAG"].time_budget_seconds
            item["msg"] = f"the request ran over its time budget of {value} s"
            item["msg"] += " (GRADIAG_TIME_BUDGET_SECONDS)"
        return ProblemError(
            422, "Over a limit", item["msg"], errors=[item], limit=err.limit, limit_value=value
        )
    title = ENGINE_TITLES.get(err.loc[0] if err.loc else None, "Invalid graph")
    return ProblemError(422, title, err.message, errors=[item])


# an EngineError's title by the first field of its loc (default: the graph); service.packed
# raises the `encoding` one
ENGINE_TITLES: dict[str | int | None, str] = {
    "expression": "Invalid expression",
    "encoding": "Invalid request body",
}


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ProblemError)
    def _problem(err: ProblemError) -> Response:
        return problem_response(err.status, err.title, err.detail, **err.fields)

    @app.errorhandler(HTTPException)
    def _http(err: HTTPException) -> Response:
        status = err.code or 500
        headers = err.get_response().headers.items() if status == 405 else ()
        return problem_response(status, err.name, err.description or err.name, headers=headers)

    @app.errorhandler(Exception)
    def _unexpected(err: Exception) -> Response:
        rid = g.get("request_id")
        log.exception(
            "unhandled error on %s %s (request id %s)",
            request.method,
            request.path,
            rid,
            extra={"request_id": rid},
        )
        return problem_response(
            500,
            "Internal Server Error",
            "The service failed on this request; it is logged under its request id.",
            request_id=rid,
        )
