"""Real models exported by torch.onnx.export (float64), and PyTorch's answers keyed by ONNX
initializer name, for POST /v1/onnx (contract revision 2).

Each export `<model>.<exporter>.onnx` (exporter `legacy` = dynamo=False, opset 17; `dynamo`
= the torch.export-based exporter, opset 18, when onnxscript imports) is answered by a
"mirror": a torch module computing exactly the exported graph, its parameters set to the
initializers' own values. Each float initializer is matched to one mirror parameter by name
and value (or by value alone: the legacy exporter renames folded tensors `onnx::Conv_28`);
the gradient is stored in the initializer's layout.

- No BatchNorm: the mirror is the exported module itself.
- BatchNorm folded (eval export; the dynamo exporter folds too, and keeps the name
  `0.weight` for the folded conv weight): the mirror is the module with each conv+batchnorm
  replaced by one conv of W * s, (b - mean) * s + beta, s = gamma / sqrt(var + eps): the
  gradient is the folded model's, with respect to the folded tensors.
- BatchNorm kept, eval (legacy, TrainingMode.PRESERVE on an eval module,
  do_constant_folding=False: BatchNormalization with training_mode=0): the mirror's
  batchnorm is written out with the running stats as parameters, so that they get the
  gradient gradiag gives every float initializer.
- BatchNorm kept, train (legacy, TrainingMode.TRAINING, do_constant_folding=False:
  training_mode=1, batch statistics): the mirror is the module in train mode; the running
  stats (initializers the output does not depend on) get a zero gradient.

`<model>.npz`: the gradients (float64, each initializer's shape) under the key the json's
initializer table gives: `grad.<initializer name>`, stored once when two exports of the model
share the name and the gradient, else `grad.<exporter>.<initializer name>` (the two exporters
fold BatchNorm to different last bits); and per exporter `forward.<exporter>`
(onnx.reference.ReferenceEvaluator's output on the batch) and `scores.<exporter>` (the
mirror's output). `<model>.json`: the loss,
the initializer table, dead units per Relu node, parameter counts, checksums.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator
from torch import nn

from bench.oracle import _common as c

LEGACY_OPSET = 17
DYNAMO_OPSET = 18
# The contract's list of ONNX ops gradiag supports at least; the LSTM fixture names the rest.
SUPPORTED = frozenset(
    {
        *("Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Relu", "LeakyRelu", "Sigmoid", "Tanh"),
        *("Softmax", "LogSoftmax", "Conv", "MaxPool", "AveragePool", "GlobalAveragePool"),
        *("BatchNormalization", "Flatten", "Reshape", "Transpose", "Identity", "Dropout"),
        *("Constant", "ReduceMean", "ReduceSum"),
    }
)


@dataclass(frozen=True)
class Export:
    """One export: the model (tests/oracle_models.py ONNX_MODELS), the exporter, how its
    BatchNorm comes out ("none", "folded", "eval", "train") and the exporter's options."""

    model: str
    exporter: str
    batchnorm: str = "none"
    options: dict[str, Any] = field(default_factory=dict)
    flatten: str = "flatten"


def exports() -> list[Export]:
    keep = {"do_constant_folding": False}
    todo = [
        Export("mlp", "legacy"),
        Export("lenet", "legacy"),
        Export("cifar_folded", "legacy", "folded"),
        Export(
            "cifar_kept_eval",
            "legacy",
            "eval",
            {"training": torch.onnx.TrainingMode.PRESERVE, **keep},
        ),
        Export(
            "cifar_kept_train",
            "legacy",
            "train",
            {"training": torch.onnx.TrainingMode.TRAINING, **keep},
        ),
        Export("reshape", "legacy", flatten="reshape"),
    ]
    if has_onnxscript():
        # No dynamo MLP: 1.9 MB more for a graph that differs from the legacy one only in
        # node and input names (the same Gemm transB=1 and initializers 0.weight ...);
        # LeNet's and the reshape net's dynamo exports hold the same Gemms.
        todo += [
            Export("lenet", "dynamo"),
            Export("cifar_folded", "dynamo", "folded"),
            Export("reshape", "dynamo", flatten="reshape"),
        ]
    return todo


def has_onnxscript() -> bool:
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def record(out: Path) -> None:
    om = c.builders()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with c.torch_float64():
        by_model: dict[str, list[Export]] = {}
        for e in exports():
            by_model.setdefault(e.model, []).append(e)
        for name, todo in by_model.items():
            arrays, summary = answer_model(name, todo, om, out)
            c.save_npz(out / f"{name}.npz", arrays)
            c.save_json(out / f"{name}.json", summary)
        c.save_json(out / "lstm.json", record_lstm(out, om))
    c.report_size(out)


# --- exporting ---------------------------------------------------------------------------


def export(module: nn.Module, x: torch.Tensor, e: Export) -> bytes:
    """The ONNX bytes of `module` on the example batch `x` (the shapes are static)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if e.exporter == "legacy":
            buffer = io.BytesIO()
            torch.onnx.export(
                module, (x,), buffer, dynamo=False, opset_version=LEGACY_OPSET, **e.options
            )
            return buffer.getvalue()
        program = torch.onnx.export(module, (x,), dynamo=True, opset_version=DYNAMO_OPSET)
        assert program is not None
        return portable(program.model_proto)


def portable(proto: onnx.ModelProto) -> bytes:
    """The dynamo export without its `pkg.torch.onnx.stack_trace` metadata: source paths and
    line numbers of this checkout (and of its venv), which would make the bytes depend on
    where and from which revision the fixture was recorded. The other metadata stays."""
    for entry in (*proto.graph.node, *proto.graph.value_info):
        kept = [p for p in entry.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del entry.metadata_props[:]
        entry.metadata_props.extend(kept)
    data = proto.SerializeToString()
    assert str(c.REPO).encode() not in data and b"site-packages" not in data
    return data


# --- mirrors -----------------------------------------------------------------------------


def mirror(built: c.Built, batchnorm: str) -> nn.Sequential:
    """A copy of the module that computes what the export computes (module docstring)."""
    module = copy.deepcopy(built.module)
    for k, sub in enumerate(module):
        if not isinstance(sub, nn.BatchNorm2d):
            continue
        if batchnorm == "folded":
            module[k - 1] = fold(module[k - 1], sub)
            module[k] = nn.Identity()
        elif batchnorm == "eval":
            module[k] = c.ExplicitBatchNorm(sub)
        elif batchnorm == "train":
            sub.train()
    return module


def fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """conv followed by eval-mode batchnorm, as one conv."""
    assert bn.running_mean is not None and bn.running_var is not None and conv.bias is not None
    folded = copy.deepcopy(conv)
    with torch.no_grad():
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        folded.weight.copy_(conv.weight * s.reshape(-1, 1, 1, 1))
        folded.bias.copy_((conv.bias - bn.running_mean) * s + bn.bias)
    return folded


@dataclass
class Match:
    """An initializer's counterpart in the mirror: a parameter, or a buffer (zero grad)."""

    torch_name: str
    tensor: torch.Tensor
    transposed: bool
    buffer: bool
    by: str  # "name" or "value"


def match_initializers(inits: dict[str, np.ndarray], module: nn.Module) -> dict[str, Match]:
    """Pair each float initializer with a mirror parameter (or, for a train-mode batchnorm,
    a running-stat buffer): the one of the same name and value if there is one, else the
    one of the same value (within 1e-12 of its scale), directly or transposed."""
    candidates = {n: (t, False) for n, t in module.named_parameters()}
    candidates |= {n: (t, True) for n, t in module.named_buffers() if "running" in n}
    matches: dict[str, Match] = {}
    for name, value in inits.items():
        found = _find(name, value, candidates)
        assert found is not None, f"initializer {name} {value.shape} matches no torch tensor"
        matches[name] = found
    used = [m.torch_name for m in matches.values()]
    assert len(used) == len(set(used)), f"two initializers matched one tensor: {used}"
    return matches


def _find(
    name: str, value: np.ndarray, candidates: dict[str, tuple[torch.Tensor, bool]]
) -> Match | None:
    def close(t: np.ndarray) -> bool:
        scale = max(float(np.max(np.abs(t))), 1e-300)
        return t.shape == value.shape and float(np.max(np.abs(t - value))) <= 1e-12 * scale

    if name in candidates and close(candidates[name][0].detach().numpy()):
        return Match(name, candidates[name][0], False, candidates[name][1], "name")
    for torch_name, (t, buffer) in candidates.items():
        array = t.detach().numpy()
        for transposed, view in ((False, array), (True, array.T)):
            if close(view):
                return Match(torch_name, t, transposed, buffer, "value")
    return None


def set_to_initializers(matches: dict[str, Match], inits: dict[str, np.ndarray]) -> None:
    """The mirror then holds the export's exact values (a folded tensor differs from our own
    folding in its last bits)."""
    with torch.no_grad():
        for name, m in matches.items():
            value = inits[name].T if m.transposed else inits[name]
            m.tensor.copy_(torch.tensor(np.ascontiguousarray(value)))


# --- answering ---------------------------------------------------------------------------


def answer_model(
    name: str, todo: list[Export], om: Any, out: Path
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Every export of one model. A gradient two exports share (same initializer name, same
    values) is stored once; a name whose gradient differs gets the exporter in its key."""
    model = om.ONNX_MODELS[name]()
    arrays: dict[str, np.ndarray] = {}
    summary: dict[str, Any] = {
        "model": name,
        "builder": model.name,
        "builder_seed": model.seed,
        "loss_name": "softmax_cross_entropy",
        "batch_size": len(model.x),
        "checksums": om.checksums(model),
        "exports": {},
    }
    for e in todo:
        built = c.build_module(model, flatten=e.flatten)
        data = export(built.module, torch.tensor(model.x), e)
        path = out / f"{name}.{e.exporter}.onnx"
        path.write_bytes(data)
        report, grads, extra = answer_export(onnx.load_from_string(data), built, model, e)
        report["file"] = path.name
        summary["exports"][e.exporter] = report
        summary["parameters_torch"] = c.parameter_count(built.module)
        for init, grad in grads.items():
            key = f"grad.{init}"
            if key in arrays and not np.array_equal(arrays[key], grad):
                key = f"grad.{e.exporter}.{init}"  # e.g. folded twice, to other last bits
            report["initializers"][init]["npz"] = key
            arrays[key] = grad
        arrays |= extra
        diff = report["forward_max_abs_diff"]
        print(f"  {path.name}: loss {report['loss']!r}, forward within {diff:.1e}")
    return arrays, summary


def answer_export(
    proto: onnx.ModelProto, built: c.Built, model: Any, e: Export
) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Loss, gradients by initializer, dead units by Relu node, and the reference forward."""
    check_batchnorm(proto, e.batchnorm)
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    floats = {k: v for k, v in inits.items() if v.dtype.kind == "f"}
    module = mirror(built, e.batchnorm)
    matches = match_initializers(floats, module)
    set_to_initializers(matches, floats)
    scores, ins, outs = c.run(module, model.x)
    loss = c.cross_entropy(scores, model.y)
    loss.backward()
    grads = {n: _grad(m) for n, m in matches.items()}
    (graph_input,) = [i.name for i in proto.graph.input if i.name not in inits]
    forward = ReferenceEvaluator(proto).run(None, {graph_input: model.x})[0]
    torch_scores = scores.detach().numpy()
    report = {
        "loss": loss.item(),
        "opset": max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        "input": graph_input,
        "output": proto.graph.output[0].name,
        "nodes": [[n.name, n.op_type] for n in proto.graph.node],
        "initializers": {
            n: {
                "shape": list(v.shape),
                "torch": matches[n].torch_name,
                "transposed": matches[n].transposed,
                "matched_by": matches[n].by,
                "zero_grad_buffer": matches[n].buffer,
            }
            for n, v in floats.items()
        },
        "integer_initializers": {n: v.tolist() for n, v in inits.items() if n not in floats},
        "float_initializer_elements": sum(v.size for v in floats.values()),
        "parameters_mirror": c.parameter_count(module),
        "relu_nodes": relu_reports(proto, module, ins, outs),
        "forward_max_abs_diff": float(np.max(np.abs(forward - torch_scores))),
    }
    extra = {f"forward.{e.exporter}": forward, f"scores.{e.exporter}": torch_scores}
    return report, grads, extra


def _grad(m: Match) -> np.ndarray:
    if m.buffer:
        return np.zeros(tuple(reversed(m.tensor.shape)) if m.transposed else tuple(m.tensor.shape))
    assert m.tensor.grad is not None, m.torch_name
    return (m.tensor.grad.T if m.transposed else m.tensor.grad).contiguous().numpy()


def check_batchnorm(proto: onnx.ModelProto, expected: str) -> None:
    """The export holds BatchNormalization nodes exactly when expected, in the right mode."""
    modes = [
        next((a.i for a in n.attribute if a.name == "training_mode"), 0)
        for n in proto.graph.node
        if n.op_type == "BatchNormalization"
    ]
    want = {"none": [], "folded": [], "eval": [0, 0], "train": [1, 1]}[expected]
    assert modes == want, f"BatchNormalization training modes {modes}, expected {want}"


def relu_reports(
    proto: onnx.ModelProto, module: nn.Module, ins: list[torch.Tensor], outs: list[torch.Tensor]
) -> dict[str, Any]:
    """Per ONNX Relu node (paired in order with the mirror's ReLU modules; graph.node is in
    topological order): torch's dead units (filters for a 4D input) and, for 4D, the per-channel
    active fraction."""
    relu_nodes = [n.name for n in proto.graph.node if n.op_type == "Relu"]
    relus = [k for k, sub in enumerate(module) if isinstance(sub, nn.ReLU)]
    assert len(relu_nodes) == len(relus), (relu_nodes, relus)
    reports = {}
    for node, k in zip(relu_nodes, relus, strict=True):
        report: dict[str, Any] = {
            "torch_module": str(k),
            "units": int(ins[k].shape[1]),
            "dead_units": c.dead_units(ins[k]),
        }
        if ins[k].dim() == 4:
            report["channel_active_fraction"] = c.active_fraction(outs[k])
        reports[node] = report
    return reports


# --- LSTM: a model gradiag must refuse ---------------------------------------------------


class LSTMNet(nn.Module):
    """LSTM(8 -> 16) over 5 steps, then Linear(16 -> 10) on the last step's output."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 16, batch_first=True)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.fc(out[:, -1])


def record_lstm(out: Path, om: Any) -> dict[str, Any]:
    """Export the LSTM net with each exporter; list, per export, the op types the contract
    does not promise (with the nodes using them): gradiag must refuse it, naming LSTM."""
    torch.manual_seed(0)
    module = LSTMNet().double()
    x = torch.tensor(om.lstm_batch())
    summary: dict[str, Any] = {"batch_checksum": om.checksum(x.numpy()), "exports": {}}
    for exporter in ("legacy", "dynamo") if has_onnxscript() else ("legacy",):
        data = export(module, x, Export("lstm", exporter))
        path = out / f"lstm.{exporter}.onnx"
        path.write_bytes(data)
        proto = onnx.load_from_string(data)
        unsupported: dict[str, list[str]] = {}
        for n in proto.graph.node:
            if n.op_type not in SUPPORTED:
                unsupported.setdefault(n.op_type, []).append(n.name)
        assert "LSTM" in unsupported
        summary["exports"][exporter] = {
            "file": path.name,
            "nodes": [[n.name, n.op_type] for n in proto.graph.node],
            "unsupported": unsupported,
        }
    return summary
