"""Adding an op is one row of the op table: a toy op registered before the service is built
is picked up by the wire schemas (and the OpenAPI document), GET /v1/ops, expressions,
gradcheck and the executor, with nothing else written for it.

The row goes into `OPS` before anything builds on the table (the schemas read it once, when
they are imported), so the service runs in a fresh interpreter that imports the row first,
as the row in engine/ops.py would be there first."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

TOY_ROW = '''
import numpy as np
from gradiag.engine.ops import OPS, Attr, Op, same_shape


def cube_forward(x, scale=1.0):
    """x: any shape -> scale * x ** 3."""
    return scale * x * x * x, (x, scale)


def cube_backward(dout, cache):
    x, scale = cache
    return (dout * (3.0 * scale * x * x),)


OPS["cube"] = Op(
    "cube", 1, "scale * x ** 3", cube_forward, cube_backward, same_shape,
    attrs={"scale": Attr(float, "the factor")}, role="scales the gradient by 3 scale x^2",
    batches=True, scales=True,
)
'''

PROBE = """
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import toy_row  # the row, first
from gradiag.engine import compile_graph, run, NodeSpec
from gradiag.service import create_app

client = create_app().test_client()
out = {}
ops = {op["name"]: op for op in client.get("/v1/ops").get_json()["ops"]}
out["ops"] = ops["cube"]
schemas = client.get("/openapi.json").get_json()["components"]["schemas"]
out["schema"] = sorted(name for name in schemas if name.startswith("Cube"))
body = {
    "nodes": [
        {"id": "x", "op": "input", "value": 2.0},
        {"id": "c", "op": "cube", "inputs": ["x"], "attrs": {"scale": 0.5}},
    ],
    "output": "c",
    "gradcheck": True,
    "explain": True,
}
answer = client.post("/v1/graph", json=body).get_json()
out["graph"] = {k: answer[k] for k in ("nodes", "gradcheck")}
expression = {"expression": "cube(x) + x", "values": {"x": [1.0, -2.0]}, "gradcheck": True}
answer = client.post("/v1/graph", json=expression).get_json()
out["expression"] = {"grad": answer["nodes"]["x"]["grad"], "passed": answer["gradcheck"]["passed"]}
bad = client.post("/v1/graph", json={**body, "nodes": [body["nodes"][0], {
    "id": "c", "op": "cube", "inputs": ["x"], "attrs": {"power": 2}}]})
out["bad_attr"] = [bad.status_code, bad.get_json()["errors"][0]["loc"]]
# 300 scalar cube nodes: the executor batches them (one call per level)
specs = [NodeSpec("x0", "input", value=np.asarray(0.5))]
specs += [NodeSpec(f"x{k}", "cube", (f"x{k - 1}",), {"scale": 1.1}) for k in range(1, 300)]
program = compile_graph(specs, "x299")
groups = [g for level in program.plan.levels for g in level.groups]
out["batched"] = all(g.batched and g.op.name == "cube" for g in groups)
result = run(program)
x, g = 0.5, 1.0
chain = [x]
for _ in range(299):
    chain.append(1.1 * chain[-1] ** 3)
for k in range(299, 0, -1):
    g *= 3 * 1.1 * chain[k - 1] ** 2
out["chain"] = [float(result.grad(0)), g]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Register the toy row in a fresh interpreter and ask every reader of the table."""
    folder: Path = tmp_path_factory.mktemp("toy_op")
    (folder / "toy_row.py").write_text(TOY_ROW)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(folder)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return answer


def test_the_ops_catalogue_lists_the_new_row(probe: dict[str, Any]) -> None:
    assert probe["ops"] == {
        "name": "cube",
        "arity": 1,
        "attrs": {"scale": "number; the factor (default 1.0)"},
        "meaning": "scale * x ** 3",
        "role": "scales the gradient by 3 scale x^2",
    }


def test_the_schemas_take_the_new_tag_and_its_attrs(probe: dict[str, Any]) -> None:
    assert probe["schema"] == ["CubeAttrs", "CubeNode"]
    assert probe["bad_attr"] == [422, ["nodes", 1, "attrs", "power"]]


def test_graphs_and_expressions_run_it_and_gradcheck_checks_it(probe: dict[str, Any]) -> None:
    nodes = probe["graph"]["nodes"]
    assert nodes["c"]["value"] == 0.5 * 8.0
    assert nodes["x"]["grad"] == 3 * 0.5 * 4.0  # d/dx 0.5 x^3 at 2
    assert nodes["c"]["local_grad"] == {"x": 6.0}
    assert probe["graph"]["gradcheck"]["passed"] is True
    assert probe["expression"] == {"grad": [4.0, 13.0], "passed": True}  # 3x^2 + 1


def test_the_executor_batches_it(probe: dict[str, Any]) -> None:
    assert probe["batched"] is True
    got, want = probe["chain"]
    assert got == pytest.approx(want, rel=1e-12)
