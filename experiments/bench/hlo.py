"""What a compiled program does, counted from its optimised HLO: counts beside the clocks.

A timed ratio on a shared machine has an interval; what XLA compiled does
not depend on the machine's load. ``program_counts`` reads the optimised
HLO module of a compiled step (``compiled.as_text()``) and follows the path
that a step takes when every conditional takes its first branch: for
``lax.cond`` that is the false branch, the local step of a gated program.
Along it, each instruction outside a fused kernel is counted as

    bytes = bytes of its result + bytes of each operand

(what it reads and writes; parameters, constants, tuples, bitcasts and
tuple elements move nothing; a slice, or an update in place, moves only the
slice), a ``while`` body (``lax.map`` over workers)
times its known trip count. ``copies`` are its ``copy`` instructions (and
``copy-start``), ``copy_bytes`` what they write, ``collectives`` its
all-reduces, all-gathers and the like. XLA's own cost analysis
(``compiled.cost_analysis()``) sums every branch of a conditional, so its
"bytes accessed" and flops are reported beside these (``xla_*``) but do not
isolate the local step; the path count does.
"""

from __future__ import annotations

import json
import re
from typing import Optional

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s4": 0.5, "u4": 0.5, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
                "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all", "opt-barrier", "partition-id",
         "replica-id", "conditional", "while", "call", "add-dependency"}
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+) .*\{\s*$")


def shape_bytes(text: str) -> float:
    """Bytes of every array shape in an HLO type, e.g. ``(f32[8,128]{1,0}, s32[])`` -> 4100."""
    total = 0.0
    for dtype, dims in re.findall(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]", text):
        size = _DTYPE_BYTES.get(dtype, 0)
        for d in dims.split(","):
            if d:
                size *= int(d)
        total += size
    return total


def _split_call(rest: str) -> tuple[str, str]:
    """(operands, attributes) of the text after an opcode's opening parenthesis."""
    depth = 1
    for i, ch in enumerate(rest):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return rest[:i], rest[i + 1:]
    return rest, ""


def parse(text: str) -> tuple[dict, Optional[str]]:
    """{computation: [instruction dict]} of an HLO module's text, and the entry computation's name.

    An instruction: name, type (its result's HLO type), op, operands (names), attrs (the text after them).
    """
    computations: dict[str, list] = {}
    entry, current = None, None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            current = header.group(1)
            computations[current] = []
            entry = current if line.startswith("ENTRY") else entry
            continue
        m = _INSTRUCTION.match(line)
        if m and current is not None:
            name, type_, op, rest = m.groups()
            operands, attrs = _split_call(rest)
            computations[current].append({"name": name, "type": type_, "op": op, "args": operands,
                                          "operands": re.findall(r"%([\w.\-]+)", operands), "attrs": attrs})
    return computations, entry


def _called(attrs: str, key: str) -> list[str]:
    m = re.search(key + r"=\{([^}]*)\}", attrs) or re.search(key + r"=(%[\w.\-]+)", attrs)
    return re.findall(r"%([\w.\-]+)", m.group(1)) if m else []


def _trip_count(attrs: str) -> Optional[int]:
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', attrs)
    return int(m.group(1)) if m else None


_SLICING = ("dynamic-slice", "slice")


def _moved(inst: dict, sizes: dict, computations: dict) -> float:
    """Bytes an instruction reads and writes. A slice reads what it returns; a dynamic-update-slice
    (in place) reads and writes its update; a fusion, the same for its parameters that are only
    sliced or updated in place and for a root that updates in place (as XLA's cost analysis does)."""
    op, operands = inst["op"], inst["operands"]
    if op in _SLICING:
        return 2 * sizes[inst["name"]]
    if op == "dynamic-update-slice":
        return 2 * sizes.get(operands[1], 0.0)
    written = sizes[inst["name"]]
    read = [sizes.get(o, 0.0) for o in operands]
    if op == "fusion":
        body = computations.get((_called(inst["attrs"], "calls") or [""])[0], [])
        by_name = {i["name"]: i for i in body}
        params = {i["name"]: int(i["args"]) for i in body if i["op"] == "parameter"}
        users: dict[str, list] = {}
        for i in body:
            for o in i["operands"]:
                users.setdefault(o, []).append(i)
        root = body[-1] if body else None
        while root is not None and root["op"] == "bitcast" and root["operands"][0] in by_name:
            root = by_name[root["operands"][0]]
        if root is not None and root["op"] == "dynamic-update-slice":
            written = sizes.get(root["operands"][1], 0.0)
        for name, index in params.items():
            uses = users.get(name, [])
            if uses and index < len(read) and all(
                    u["op"] in _SLICING or (u["op"] == "dynamic-update-slice" and u["operands"][0] == name)
                    for u in uses):
                read[index] = sum(sizes[u["name"]] for u in uses if u["op"] in _SLICING)
    return written + sum(read)


def local_path(text: str, branch: int = 0) -> dict:
    """Counts along the path a step takes with every conditional on its first branch (module docstring),
    or on its last with ``branch=-1`` (a gated step that syncs): {"bytes", "copies", "copy_bytes",
    "collectives", "unknown_trip_counts"}."""
    computations, entry = parse(text)
    sizes = {i["name"]: shape_bytes(i["type"]) for body in computations.values() for i in body}
    out = {"bytes": 0.0, "copies": 0, "copy_bytes": 0.0, "collectives": 0, "unknown_trip_counts": 0}

    def walk(name: str, times: int) -> None:
        for inst in computations.get(name, []):
            op, attrs = inst["op"], inst["attrs"]
            if op == "conditional":
                branches = _called(attrs, "branch_computations") or (
                    _called(attrs, "false_computation") + _called(attrs, "true_computation"))
                if branches:
                    walk(branches[branch], times)
            elif op == "while":
                trips = _trip_count(attrs)
                out["unknown_trip_counts"] += trips is None
                for key in ("condition", "body"):
                    for sub in _called(attrs, key):
                        walk(sub, times * (trips or 1))
            elif op == "call":
                for sub in _called(attrs, "to_apply"):
                    walk(sub, times)
            if op in _FREE or op.endswith("-done"):
                continue
            out["bytes"] += times * _moved(inst, sizes, computations)
            if op in ("copy", "copy-start"):
                out["copies"] += times
                out["copy_bytes"] += times * sizes[inst["name"]]
            if op.removesuffix("-start") in _COLLECTIVES:
                out["collectives"] += times

    walk(entry, 1)
    return out


def xla_costs(compiled) -> dict:
    """XLA's own cost analysis of the whole program (every branch of a conditional included)."""
    try:
        costs = compiled.cost_analysis()
    except Exception as err:  # a backend without cost analysis
        return {"error": f"{type(err).__name__}: {err}"[:200]}
    costs = costs[0] if isinstance(costs, (list, tuple)) else costs
    return {"xla_flops": float(costs.get("flops", 0.0)), "xla_bytes_accessed": float(costs.get("bytes accessed", 0.0))}


def program_counts(compiled, branch: int = 0) -> dict:
    """``local_path`` of a compiled program's optimised HLO (conditionals on ``branch``), with ``xla_costs``
    and the program's convolutions that XLA grouped (``grouped_convolutions``: feature or batch group count > 1)."""
    text = compiled.as_text()
    out = local_path(text, branch)
    out.update(xla_costs(compiled))
    out["grouped_convolutions"] = len(re.findall(r"(?:feature|batch)_group_count=(?!1\b)\d+", text))
    return out


def count_ratio(numerator: dict, denominator: dict, param_bytes: float) -> dict:
    """A program's counts over its reference's: the bytes on the path (ratio), the extra bytes copied in
    parameter copies (``param_bytes`` each), and the verdict: ``met`` when the ratio is <= 1.01 and the
    extra copies are under 0.01 of a parameter copy (a step's scalar counters, no parameter), else ``missed``."""
    ratio = numerator["bytes"] / denominator["bytes"] if denominator["bytes"] else float("nan")
    extra = (numerator["copy_bytes"] - denominator["copy_bytes"]) / param_bytes
    return {"bytes_ratio": ratio, "extra_copies_in_param_copies": extra,
            "copies": [numerator["copies"], denominator["copies"]],
            "verdict": "met" if ratio <= 1.01 and extra < 0.01 else "missed"}


def dumps(counts: dict) -> str:  # for a failing test's message
    return json.dumps(counts, indent=1, default=str)
