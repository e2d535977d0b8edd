"""Audit an ONNX graph against the operator table of a pinned TensorRT version.

The table (``trt_ops.json``, beside this file) names its source and TensorRT version. It lists
the supported operator types, the attribute values TensorRT accepts where it restricts them
(e.g. ``Resize`` modes), and this project's own stricter rules (no STFT/DFT/Loop/If/Resize in
the explainer graph; ``Pad`` only in constant mode, never reflect).
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


def audit(model: Any, forbidden: tuple[str, ...] = ()) -> list[str]:
    """Problems of an ``onnx.ModelProto`` (or a path) against the table; [] when it passes.

    Checks: opset within the table's range, only default-domain ops, each op type supported,
    restricted attributes within the allowed values (TensorRT's and ``lmaczs_rules``), and no
    op type in ``forbidden``.
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
    return problems
