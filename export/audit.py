"""Audit an ONNX graph against the operator table of a pinned TensorRT version.

The table (``trt_ops.json``, beside this file) names its source and TensorRT version. It lists
the supported operator types, the attribute values TensorRT accepts where it restricts them
(e.g. ``Resize`` modes), the element types TensorRT tensors can have (no double; int64 only
where TensorRT takes it: not into a math layer such as MatMul, Conv or Softmax), and this
project's own stricter rules (no STFT/DFT/Loop/If/Resize in the explainer graphs; ``Pad`` only
in constant mode, never reflect). `lmaczs export` fails on any problem, naming the node, and
builds no engine.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

TABLE_PATH = Path(__file__).with_name("trt_ops.json")
# Never in the fused explainer graph: its STFT, iSTFT and stretches are MatMuls and slices, with
# no loops or branches, so every backend runs the same plain operators.
EXPLAINER_FORBIDDEN = ("STFT", "DFT", "Loop", "If", "Resize", "Scan")

# ONNX attribute defaults, for attributes the rules check (an absent attribute takes its default)
_DEFAULTS = {
    ("Pad", "mode"): "constant",
    ("Resize", "mode"): "nearest",
    ("Resize", "coordinate_transformation_mode"): "half_pixel",
    ("Resize", "nearest_mode"): "round_prefer_floor",
    ("Resize", "keep_aspect_ratio_policy"): "stretch",
    ("Resize", "antialias"): 0,
    ("TopK", "sorted"): 1,
}


@lru_cache(maxsize=None)
def trt_table() -> dict[str, Any]:
    """The pinned operator table (source URL, TensorRT version, supported ops, attribute rules)."""
    return json.loads(TABLE_PATH.read_text())


def _attribute(node: Any, name: str) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            v = onnx.helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return _DEFAULTS.get((node.op_type, name))


def _node_problems(node: Any, rules: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    for attr, allowed in rules.get(node.op_type, {}).items():
        if attr == "max_outputs":
            used = sum(1 for o in node.output if o)
            if used > allowed:
                out.append(f"{node.op_type} {node.name!r}: {used} outputs, TensorRT supports {allowed}")
            continue
        value = _attribute(node, attr)
        if value not in allowed:
            out.append(f"{node.op_type} {node.name!r}: {attr}={value!r} not in {allowed}")
    return out


def _type_name(elem_type: int) -> str:
    import onnx

    return onnx.helper.tensor_dtype_to_string(elem_type).removeprefix("TensorProto.").lower()


def type_problems(model: Any) -> list[str]:
    """Element types TensorRT cannot take: any tensor of a type it lacks (double, ...), and an
    integer tensor fed to a math layer that runs on floating types only. Types of intermediate
    tensors come from ONNX shape inference."""
    import onnx

    rules = trt_table()["types"]
    supported, float_only = set(rules["supported"]), set(rules["float_only"])
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]
             if v.type.HasField("tensor_type")}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    problems = [f"graph {kind} {v.name!r}: {_type_name(types[v.name])}, a type TensorRT lacks; "
                "export it as float32 (or int32 / int64 for indices)"
                for kind, vs in (("input", model.graph.input), ("output", model.graph.output))
                for v in vs if v.name in types and _type_name(types[v.name]) not in supported]
    seen = {v.name for v in [*model.graph.input, *model.graph.output]}
    for node in model.graph.node:
        if node.op_type == "Cast":
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            if to is not None and _type_name(to) not in supported:
                problems.append(f"Cast {node.name!r}: to {_type_name(to)}, a type TensorRT lacks; cast to float32")
                seen.update(node.output)
        for name in [*node.input, *node.output]:
            if name and name not in seen and name in types and _type_name(types[name]) not in supported:
                seen.add(name)
                problems.append(f"{node.op_type} {node.name!r}: tensor {name!r} is {_type_name(types[name])}, "
                                "a type TensorRT lacks; compute it in float32")
        if node.op_type in float_only and node.input and node.input[0] in types:
            kind = _type_name(types[node.input[0]])
            if kind.startswith(("int", "uint", "bool")):
                problems.append(f"{node.op_type} {node.name!r}: input {node.input[0]!r} is {kind}; TensorRT runs "
                                f"{node.op_type} on floating types only: cast the input to float32 in the model")
    return problems


def audit(model: Any, forbidden: tuple[str, ...] = ()) -> list[str]:
    """Problems of an ``onnx.ModelProto`` (or a path) against the table; [] when it passes.

    Checks: opset within the table's range, only default-domain ops, each op type supported,
    restricted attributes within the allowed values (TensorRT's and ``lmaczs_rules``), no op
    type in ``forbidden``, and element types TensorRT takes (`type_problems`). Each problem
    names the op type and the node.
    """
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    table = trt_table()
    rules = {**table["attribute_rules"]}
    for op, r in table["lmaczs_rules"].items():
        if isinstance(r, dict):
            rules[op] = {**rules.get(op, {}), **r}
    supported = set(table["supported"])
    lo, hi = table["opset_range"]
    problems = [f"opset {o.version} outside TensorRT {table['tensorrt_version']}'s {lo}..{hi}"
                for o in model.opset_import if o.domain in ("", "ai.onnx") and not lo <= o.version <= hi]
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{node.op_type} {node.name!r}: custom domain {node.domain!r}")
        elif node.op_type not in supported:
            problems.append(f"{node.op_type} {node.name!r}: not supported by TensorRT {table['tensorrt_version']}")
        if node.op_type in forbidden:
            problems.append(f"{node.op_type} {node.name!r}: not allowed in this graph")
        problems += _node_problems(node, rules)
    return problems + type_problems(model)
