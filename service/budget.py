"""Answers and memory, bounded before any compute (docs/hardening.md, "Answers and memory").

A compiled program knows every node's shape and dtype before a single value is computed, so
the size of the answer (`nodes` with every value and gradient, or their summaries) and the
request's peak memory (parsed body, values, gradients and the ops' temporaries, the report's
Python objects and the encoded answer) are estimated from the shapes alone and checked
against GRADIAG_MAX_RESPONSE_BYTES and GRADIAG_MAX_REQUEST_MEMORY_BYTES. Over either: a 422
naming the limit and the cheaper request that fits (`"tensors": "summary"`, dropping
`include`), before the forward pass.

The estimates are upper bounds for what they count, calibrated against measurements
(tests/test_budget.py compares them with tracemalloc's peak and the answer's length): the
longest float64 text, every temporary of the widest op. Findings and `nonfinite_nodes` depend
on the values; `check_answer` measures the encoded answer once more before it is sent.

Under the gevent worker several requests share a worker's memory (one computes while others
send their answers), so each request also takes its peak from the worker's `LEDGER` for as
long as it holds it: the estimate while it runs, the encoded answer's length while it is
sent. A request that does not fit beside the others gets a 503 with Retry-After.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Protocol

import numpy as np
from flask import Flask, Response, current_app, g, request

from gradiag.engine import OPS, Program
from gradiag.service.config import MIB, Settings
from gradiag.service.errors import ProblemError

# --- answer bytes ------------------------------------------------------------------------

NUMBER_BYTES = 25  # the longest float64 text ("-2.2250738585072014e-308") and a comma
LIST_BYTES = 3  # "[", "]" and a comma, per nested list of a tensor
SUMMARY_BYTES = 50 + 4 * NUMBER_BYTES  # {"shape":[...],"min":,"max":,"mean":,"norm":}
DIM_BYTES = 11  # one dimension of `shape`: up to 10 digits and a comma
# one entry of `nodes` without its id, shape and numbers: "":{"op":"","shape":[],"value":,"grad":},
NODE_BYTES = 48
EXPLAIN_NODE_BYTES = 40  # and with `explain`: ,"role":"","inputs":[],"local_grad":{}
REFERENCE_BYTES = 6 + NUMBER_BYTES  # an operand: "id", in `inputs`; "id":x, in `local_grad`
COLUMN_ROW_BYTES = 8  # a row of `columns` without its id and numbers: commas, a shape's []
ANSWER_FRAME_BYTES = 16 * 1024  # output, parameters, diagnostics, health without findings
ID_ESCAPES = 2  # a `"` or `\` in an id is written as two bytes

# --- peak memory -------------------------------------------------------------------------

# The parsed body's Python objects: at most ~12 bytes per byte of JSON (small node objects);
# ~2 per byte for numbers and long ids, plus what each node's model and dicts take.
PARSED_BODY_FACTOR = 12
PARSED_TEXT_FACTOR = 2
PARSED_NODE_BYTES = 700
OPS_TEMPORARIES = 3  # arrays an op's backward holds at once, as widths of its widest node
PROGRAM_NODE_BYTES = 600  # the compiled program and the run's plan, per node
NUMBER_OBJECT_BYTES = 32  # a float in a report list: the object and its slot
NODE_OBJECT_BYTES = 1200  # a report entry's dicts, lists and strings
COLUMN_OBJECT_BYTES = 150  # a row of `columns`: its id's string, its shape's list
ENCODER_FACTOR = 2  # orjson grows its buffer, then copies it into the answer's bytes
ALLOCATOR_FACTOR = 1.2  # what the process holds beyond what is allocated (fragmentation)


@dataclass(frozen=True)
class Estimate:
    """What a request will cost, from its shapes: the answer's bytes and the peak memory."""

    answer_bytes: int
    peak_bytes: int
    summary_answer_bytes: int  # the same request with `"tensors": "summary"`
    summary_peak_bytes: int


@dataclass(frozen=True)
class AnswerPlan:
    """What the answer will hold, as the request asked."""

    tensors: str  # "full", "summary" or "picture" (the SVG endpoints)
    nodes: bool = True  # the answer has `nodes` (or `columns`)
    columns: bool = False  # as `columns` (`report: "columns"`)
    gradcheck: bool = False
    explain: bool = False  # each node also has `role`, `inputs` and `local_grad`
    body_bytes: int = 0


def estimate(
    program: Program, plan: AnswerPlan, added: Callable[[int], int] | None = None
) -> Estimate:
    """The answer's bytes and the peak memory of running `program` and answering `plan`;
    `added`: what the answer holds beside one report, given that report's bytes (a network's
    histograms, a training's runs: service/training.py)."""
    sizes = _Sizes.of(program)
    full, summary = _answer_bytes(sizes, plan, "full"), _answer_bytes(sizes, plan, "summary")
    if added is not None:
        full, summary = full + added(full), summary + added(summary)
    answer = full if plan.tensors == "full" else summary
    return Estimate(
        answer_bytes=answer,
        peak_bytes=_peak_bytes(sizes, plan, plan.tensors, answer),
        summary_answer_bytes=summary,
        summary_peak_bytes=_peak_bytes(sizes, plan, "summary", summary),
    )


@dataclass(frozen=True)
class _Sizes:
    """Per-program totals read off the shapes, ids and operands (NumPy over the rows)."""

    nodes: int
    elements: int  # all values
    grad_elements: int  # all gradients (no const, no `no_grad` leaf)
    widest: int  # the elements of the largest tensor
    scratch: int  # the most temporary elements one op allocates (conv2d's im2col)
    lists: int  # nested lists of all values, for brackets
    grad_lists: int
    dims: int  # dimensions in all shapes
    id_bytes: int
    reference_bytes: int  # every operand reference's id, once
    references: int
    role_bytes: int
    itemsize: int

    @classmethod
    def of(cls, program: Program) -> _Sizes:
        if len(program) <= SMALL_PROGRAM:
            return cls.of_small(program)
        shapes, n = program.shapes, len(program)
        has_grad = program.codes != _code(program, "const")
        if program.no_grad:
            has_grad[list(program.no_grad)] = False
        if program.ranks.any():
            elements = np.fromiter(map(math.prod, shapes), np.int64, n)
            lists = np.fromiter(map(_nested_lists, shapes), np.int64, n)
        else:  # every node a scalar: one element, no list
            elements, lists = np.ones(n, np.int64), np.zeros(n, np.int64)
        id_lengths = _id_lengths(program)
        operands = program.operands[program.operands >= 0]
        roles = _role_bytes()
        role_bytes = np.array([roles[name] for name in program.names], np.int64)
        return cls(
            nodes=n,
            elements=int(elements.sum()),
            grad_elements=int(elements[has_grad].sum()),
            widest=int(elements.max(initial=0)),
            scratch=program.scratch,
            lists=int(lists.sum()),
            grad_lists=int(lists[has_grad].sum()),
            dims=int(program.ranks.sum()),
            id_bytes=int(id_lengths.sum()),
            reference_bytes=int(id_lengths[operands].sum()),
            references=int(operands.size),
            role_bytes=int(role_bytes[program.codes].sum()),
            itemsize=program.dtype.itemsize,
        )

    @classmethod
    def of_small(cls, program: Program) -> _Sizes:
        """The same totals in plain Python: for a few nodes a dozen NumPy calls cost more
        (~50 us) than the request's own work."""
        shapes, ops = program.shapes, program.ops()
        elements = list(map(math.prod, shapes))
        lists = list(map(_nested_lists, shapes))
        no_grad = program.no_grad
        graded = [i for i, op in enumerate(ops) if op != "const" and i not in no_grad]
        id_lengths = list(map(_id_bytes, program.node_ids()))
        references = [j for j in program.operands.ravel().tolist() if j >= 0]
        roles = _role_bytes()
        return cls(
            nodes=len(shapes),
            elements=sum(elements),
            grad_elements=sum(elements[i] for i in graded),
            widest=max(elements, default=0),
            scratch=program.scratch,
            lists=sum(lists),
            grad_lists=sum(lists[i] for i in graded),
            dims=sum(map(len, shapes)),
            id_bytes=sum(id_lengths),
            reference_bytes=sum(id_lengths[j] for j in references),
            references=len(references),
            role_bytes=sum(map(roles.__getitem__, ops)),
            itemsize=program.dtype.itemsize,
        )


SMALL_PROGRAM = 200  # nodes; above, the totals are NumPy calls over the rows


def _nested_lists(shape: tuple[int, ...]) -> int:
    """The lists a tensor of `shape` is written as: 1 + d0 + d0*d1 + ... (none for a scalar)."""
    count, lists = 1, 0
    for dim in shape:
        lists += count
        count *= dim
    return lists


def _id_bytes(node_id: str) -> int:
    """An id's bytes in the answer: UTF-8, a quote or backslash escaped, the quotes."""
    escaped = node_id.count('"') + node_id.count("\\")
    return len(node_id.encode()) + (ID_ESCAPES - 1) * escaped + 2


def _id_lengths(program: Program) -> np.ndarray:
    """Every id's bytes in the answer (`_id_bytes`): the lengths by one C-level map when
    all ids are ASCII without a quote or backslash (nearly always), else id by id."""
    if program.ids is None:  # row i is called "i": its digits and the quotes
        rows = np.arange(len(program))
        return np.floor(np.log10(np.maximum(rows, 1))).astype(np.int64) + 3
    ids = program.ids
    joined = "".join(ids)
    if joined.isascii() and '"' not in joined and "\\" not in joined:
        return np.fromiter(map(len, ids), np.int64, len(ids)) + 2
    return np.fromiter(map(_id_bytes, ids), np.int64, len(ids))


def _code(program: Program, op: str) -> int:
    """The code of `op` in this program, or -1 when no row has it."""
    return program.names.index(op) if op in program.names else -1


@cache
def _role_bytes() -> dict[str, int]:
    roles = {name: len(op.role) for name, op in OPS.items()}
    return {**roles, "input": 4, "param": 4, "const": 4}  # "leaf"


def _answer_bytes(sizes: _Sizes, plan: AnswerPlan, tensors: str) -> int:
    if not plan.nodes:
        return ANSWER_FRAME_BYTES
    if plan.columns:
        rows = sizes.nodes * COLUMN_ROW_BYTES + sizes.id_bytes + sizes.dims * DIM_BYTES
    else:
        rows = (
            sizes.nodes * (NODE_BYTES + DIM_BYTES)  # an empty shape still has its brackets
            + sizes.id_bytes
            + sizes.dims * DIM_BYTES
        )
        if plan.explain:
            rows += (
                sizes.nodes * EXPLAIN_NODE_BYTES
                + sizes.role_bytes
                + sizes.references * REFERENCE_BYTES
                + 2 * sizes.reference_bytes
            )
    if tensors == "full":
        numbers = (sizes.elements + sizes.grad_elements) * NUMBER_BYTES
        numbers += (sizes.lists + sizes.grad_lists) * LIST_BYTES
    else:  # value and grad summaries (a picture's small ones are smaller still)
        numbers = 2 * sizes.nodes * SUMMARY_BYTES + sizes.dims * DIM_BYTES * 2
    gradcheck = sizes.nodes * 400 + sizes.id_bytes * 2 if plan.gradcheck else 0
    return ANSWER_FRAME_BYTES + rows + numbers + gradcheck


def _peak_bytes(sizes: _Sizes, plan: AnswerPlan, tensors: str, answer: int) -> int:
    """The largest of: computing (values, gradients, the widest op's temporaries), shaping
    the report (arrays and its Python objects), encoding it (objects and bytes); with the
    parsed body and the compiled program alive throughout."""
    parsed = min(
        plan.body_bytes * PARSED_BODY_FACTOR,
        plan.body_bytes * PARSED_TEXT_FACTOR + sizes.nodes * PARSED_NODE_BYTES,
    )
    arrays = (sizes.elements + sizes.grad_elements) * sizes.itemsize
    temporaries = max(OPS_TEMPORARIES * sizes.widest, sizes.scratch) * sizes.itemsize
    if plan.gradcheck:  # a perturbed forward pass holds a second set of values
        temporaries += sizes.elements * sizes.itemsize
    objects = 0
    if plan.nodes:
        objects = sizes.nodes * (COLUMN_OBJECT_BYTES if plan.columns else NODE_OBJECT_BYTES)
    if plan.nodes and tensors == "full":
        objects += (sizes.elements + sizes.grad_elements) * NUMBER_OBJECT_BYTES
    computing = arrays + temporaries
    shaping = arrays + objects
    encoding = objects + ENCODER_FACTOR * answer
    program = sizes.nodes * PROGRAM_NODE_BYTES
    return int(ALLOCATOR_FACTOR * (parsed + program + max(computing, shaping, encoding)))


# --- the checks --------------------------------------------------------------------------


def check(estimate: Estimate, settings: Settings, *, field: str) -> None:
    """A 422 naming the limit when the answer or the peak is over it; `field` is the part of
    the request a cheaper request changes (`tensors`, or `include` for a network)."""
    if estimate.answer_bytes > settings.max_response_bytes:
        raise _over(
            "max_response_bytes",
            settings.max_response_bytes,
            f"the answer would be about {_mib(estimate.answer_bytes)}",
            _cheaper(estimate, settings, field),
            field,
        )
    if estimate.peak_bytes > settings.max_request_memory_bytes:
        raise _over(
            "max_request_memory_bytes",
            settings.max_request_memory_bytes,
            f"the request would need about {_mib(estimate.peak_bytes)} of memory",
            _cheaper(estimate, settings, field),
            field,
        )


def _cheaper(estimate: Estimate, settings: Settings, field: str) -> str:
    fits = (
        estimate.summary_answer_bytes <= settings.max_response_bytes
        and estimate.summary_peak_bytes <= settings.max_request_memory_bytes
    )
    summary = '"tensors": "summary" (each value and grad as shape, min, max, mean, norm)'
    if field == "include":
        drop = 'leave "gradients" out of "include" (no `nodes`)'
        return f"{drop}, or ask for {summary}" if fits else f"{drop}, or send a smaller network"
    if fits:
        return f"ask for {summary}"
    return "send a smaller graph: even its summary is over the limit"


def _over(limit: str, value: int, what: str, cheaper: str, field: str) -> ProblemError:
    name = f"GRADIAG_{limit.upper()}"
    message = f"{what}, over the limit of {_mib(value)} ({name}); {cheaper}"
    return ProblemError(
        422,
        "Over a limit",
        message,
        errors=[{"loc": [field], "msg": message}],
        limit=limit,
        limit_value=value,
    )


def _mib(n: int) -> str:
    return f"{n / MIB:,.1f} MiB" if n >= MIB else f"{n:,} bytes"


def check_answer(encoded: bytes, settings: Settings) -> None:
    """The encoded answer against the limit once more: findings and `nonfinite_nodes`
    depend on the values, which no estimate knows."""
    if len(encoded) > settings.max_response_bytes:
        raise _over(
            "max_response_bytes",
            settings.max_response_bytes,
            f"the answer is {_mib(len(encoded))} (its findings)",
            'ask for "tensors": "summary" or send a smaller graph',
            "tensors",
        )


class Budget(Protocol):
    """Checks a compiled program's answer and memory (and takes its peak from the ledger)."""

    def __call__(self, program: Program, added: Callable[[int], int] | None = None) -> None: ...


def budget_check(plan: AnswerPlan, *, field: str = "tensors") -> Budget:
    """What a view hands to the front end: check the compiled program's estimate, then take
    its peak from the worker's ledger (released when the answer is sent)."""
    settings: Settings = current_app.config["GRADIAG"]

    def check_program(program: Program, added: Callable[[int], int] | None = None) -> None:
        found = estimate(program, plan, added)
        check(found, settings, field=field)
        hold(found.peak_bytes)

    return check_program


# --- the worker's ledger -----------------------------------------------------------------


class Ledger:
    """Bytes the requests in progress in this worker hold (their estimated peaks, then their
    answers while these are sent). One request alone may always take up to the limit."""

    def __init__(self) -> None:
        self.held = 0
        self._lock = threading.Lock()  # a gevent lock under the gevent worker (patched)

    def take(self, amount: int, capacity: int | None = None) -> bool:
        """Hold `amount` unless others already hold some and it would pass `capacity`."""
        with self._lock:
            if capacity is not None and self.held and self.held + amount > capacity:
                return False
            self.held += amount
            return True

    def give_back(self, amount: int) -> None:
        with self._lock:
            self.held = max(0, self.held - amount)


LEDGER = Ledger()
RETRY_AFTER_SECONDS = 1


def hold(amount: int) -> None:
    """Take `amount` for this request, or a 503 when the worker's other requests hold too
    much; given back when the answer has been sent (or the request failed)."""
    settings: Settings = current_app.config["GRADIAG"]
    if not LEDGER.take(amount, settings.max_request_memory_bytes):
        raise ProblemError(
            503,
            "Service Unavailable",
            "this worker's memory is held by answers still being sent; retry shortly",
            headers=[("Retry-After", str(RETRY_AFTER_SECONDS))],
        )
    g.held_bytes = g.get("held_bytes", 0) + amount


def _hand_to_answer(response: Response) -> Response:
    """The estimate is given back; under a server that runs requests side by side in a
    worker (gevent: `wsgi.multithread`), the answer's own length is held until it is sent.
    Elsewhere (sync workers, tests) nothing else shares the worker, so nothing is held."""
    held = g.pop("held_bytes", 0)
    if held:
        LEDGER.give_back(held)
        if request.environ.get("wsgi.multithread") and not response.is_streamed:
            sending = response.calculate_content_length() or 0
            LEDGER.take(sending)
            response.call_on_close(lambda: LEDGER.give_back(sending))
    return response


def _release_on_failure(error: BaseException | None) -> None:
    """A request that ended without an answer (the worker is stopping) gives back all."""
    LEDGER.give_back(g.pop("held_bytes", 0))


def register_budget(app: Flask) -> None:
    app.after_request(_hand_to_answer)
    app.teardown_request(_release_on_failure)
