"""Collective and HBM traffic of a compiled XLA program, read from its optimized HLO text (``compiled.as_text()``).

``collective_traffic(hlo_text)`` counts, per device and per execution of the program, how many times each
collective runs and how many bytes it moves over the interconnect:

=====================  =============================================================================
kind                   bytes moved per device (n = replica group size, B = bytes of the result buffer)
=====================  =============================================================================
all-gather             B * (n-1)/n  (each device receives the n-1 shards it lacks)
reduce-scatter         operand bytes * (n-1)/n = B * (n-1)  (the operand is n result shards)
all-reduce             2 * B * (n-1)/n  (ring: a reduce-scatter, then an all-gather)
all-to-all             B * (n-1)/n  (each device keeps 1/n of its data)
ragged-all-to-all      data dependent. ``bytes``: the expected value, the smaller of the input and output
                       buffers * (n-1)/n (a device sends what it holds and receives as much, routed uniformly
                       over the group: a dispatch whose receive buffer is sized for the worst case, and its
                       inverse, which sends from that buffer, both count the rows actually routed);
                       ``bytes_upper_bound``: output buffer bytes * (n-1)/n (the receive buffer filled)
collective-permute     B (each device sends its buffer to one peer)
=====================  =============================================================================

Tuple-shaped (variadic) collectives add up their buffers. Asynchronous pairs count once, at their ``-start``
(``all-gather-start``, ``all-reduce-start``, ``collective-permute-start``, ``async-start`` wrapping a collective);
``-update`` / ``-done`` are not counted.

Loops: the computations form a call graph (while body and condition, call, conditional branches, fusions,
async wrappers, reducers). A while body runs its trip count times: the ``known_trip_count`` XLA records in the
while's ``backend_config`` when it has one, else inferred from the condition (``i < N`` on a tuple element whose
start value is a constant; step 1, as ``jax.lax.scan`` and ``fori_loop`` lower), else counted once and named
in ``CollectiveTraffic.uncounted_loops``. Of a conditional's branches the one moving the most bytes counts (one
branch runs per execution). Replica groups are read in all three HLO forms: ``{{0,1},{2,3}}``, the iota form
``[2,2]<=[4]`` (groups x group size) and the mesh-axes form ``mesh['x'=2,'y'=4] {'y'}`` (the product of the
named axes' sizes; a sub-axis ``'y':(1)2`` counts its own size). An empty group list means all the program's
devices (``num_partitions`` x ``replica_count`` of the module header).

``hbm_traffic(hlo_text)`` estimates the bytes one execution reads from and writes to HBM per device, walking the
same call graph with the same trip counts (a while body times its trip count, nested loops multiply, an unknown
count once and named in ``HbmTraffic.uncounted_loops``; the costliest branch of a conditional; a ``call`` and an
``async-start``'s wrapped computation once). The model:

- Every instruction of a non-fused computation (entry, while bodies and conditions, called computations, branches)
  reads each operand from HBM and writes its result there: bytes = operand bytes + result bytes. The insides of a
  fusion stay on chip; a fusion counts at its boundary. Reducers (``to_apply``) are not walked.
- No bytes: ``parameter``, ``constant``, ``tuple``, ``get-tuple-element``, ``bitcast`` (aliases or bookkeeping; a
  constant or parameter counts where an instruction reads it), ``after-all``, ``partition-id``, ``replica-id``,
  ``opt-barrier`` and the like; ``while`` / ``call`` / ``conditional`` / ``async-start`` (their computations count
  instead); ``*-done`` and ``*-update`` (the ``*-start`` counted the transfer).
- Partial reads and in-place writes: ``dynamic-slice`` / ``slice`` / ``gather`` read only the elements they return
  (result bytes, plus any index operands); ``dynamic-update-slice`` writes only its update into a buffer it does
  not read (update bytes read and written, plus indices); ``scatter`` reads and writes only the rows it updates
  (updates bytes read twice, once as the target rows, and written once, plus indices). Fusions follow the same
  rules: a fusion operand that the fused computation only slices (through bitcasts and nested fusions) reads the
  slices, and a fusion whose root (or multi-output root element) is a dynamic-update-slice or scatter writes only
  the update: a scanned layer reading its weights ``w[i]`` or saving its input into a stacked buffer moves one
  layer's bytes, not the stack's.
- Collectives read their operands and write their result buffer like any instruction (``all-gather-start``: its
  result element; the interconnect bytes are ``collective_traffic``'s); ``copy-start`` reads its source and writes
  its destination (tuple element 0).
- Memory spaces: only arrays in memory space 0 (no ``S(n)`` in the layout) are HBM. On TPU the compiler places some
  buffers in VMEM (``S(1)``; a prefetch is a ``copy-start`` that reads HBM and writes VMEM), offloaded ones in host
  memory (``S(5)``) and scalars and sync flags in other spaces; their accesses move no HBM bytes.
- Bytes are logical (elements x element size): tile padding is ignored; tiled matmuls re-reading operand tiles,
  custom calls (Pallas kernels) reading an operand several times or updating an aliased operand in place are
  counted once / in full.

On a loop-free CPU program this equals ``compiled.cost_analysis()["bytes accessed"]`` (matmuls, elementwise ops,
slices, in-place updates), except that XLA counts the whole operand of a fused gather or scatter (an embedding
lookup reads its rows here, the whole table there); with loops XLA counts each while body once. XLA's TPU cost
model counts more: operand re-reads of tiled matmuls and reads of VMEM-resident buffers
(docs/benchmarks.md#hbm-traffic-against-xlas-tpu-cost-model).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "ragged-all-to-all", "collective-permute")

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\](\{[^}]*\})?")
_CALLEES = re.compile(r"\b(calls|to_apply|body|condition|branch_computations|true_computation|false_computation|"
                      r"called_computations)=(\{[^}]*\}|%?[\w.\-]+)")
_DTYPE_BITS = {"pred": 8, "token": 0, "bf16": 16, "c64": 64, "c128": 128}


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One HLO instruction: ``name = shape opcode(operands), attributes``."""

    name: str
    shape: str  # the result shape text, e.g. f32[8,16]{1,0} or (f32[2], s32[])
    opcode: str
    operands: tuple[str, ...]  # operand names, without %
    attrs: str  # everything after the operand list


@dataclasses.dataclass(frozen=True)
class Computation:
    name: str
    instructions: dict[str, Instruction]
    root: str


@dataclasses.dataclass
class CollectiveTraffic:
    """Per-device collective traffic of one program execution (see the module docstring for the formulas).

    ``kinds``: ``{kind: {"count": executions, "bytes": bytes moved}}`` for every kind in ``KINDS``; the
    ragged-all-to-all entry also has ``bytes_upper_bound``. ``uncounted_loops``: while loops whose trip count is
    unknown, counted once (their collectives are undercounted), and callees the parser did not find (not counted).
    """

    kinds: dict[str, dict[str, float]]
    uncounted_loops: list[str]

    @property
    def bytes(self) -> float:
        """All kinds' bytes (ragged-all-to-all at its expected value)."""
        return sum(v["bytes"] for v in self.kinds.values())

    @property
    def bytes_upper_bound(self) -> float:
        """All kinds' bytes, ragged-all-to-all at its upper bound."""
        return sum(v.get("bytes_upper_bound", v["bytes"]) for v in self.kinds.values())


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group that opens at ``text[start]`` (``(``, ``[`` or ``{``)."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced brackets in HLO text: {text[start:start + 120]!r}")


def _split_top_level(text: str) -> list[str]:
    """``a, (b, c), d`` -> ``["a", "(b, c)", "d"]``: split at commas outside brackets."""
    parts, depth, begin = [], 0, 0
    for i, c in enumerate(text):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(text[begin:i].strip())
            begin = i + 1
    tail = text[begin:].strip()
    return [*parts, tail] if tail else parts


def _parse_instruction(line: str) -> Instruction | None:
    m = _INSTRUCTION.match(line)
    if m is None:
        return None
    name, rest = m.group(1), re.sub(r"/\*.*?\*/", "", m.group(2))
    if rest.startswith("("):  # tuple shape
        end = _balanced(rest, 0)
    else:
        end = rest.find(" ")
        end = len(rest) if end < 0 else end
    shape, rest = rest[:end], rest[end:].lstrip()
    op = re.match(r"([\w\-]+)\(", rest)
    if op is None:
        return None
    close = _balanced(rest, op.end() - 1)
    operands = tuple(re.sub(r"^.*?%?([\w.\-]+)$", r"\1", o.strip()) for o in
                     _split_top_level(rest[op.end():close - 1]))
    return Instruction(name, shape, op.group(1), operands, rest[close:])


def parse_module(hlo_text: str) -> tuple[dict[str, Computation], str, int]:
    """HLO module text -> (computations by name, entry computation name, devices of the program)."""
    computations: dict[str, Computation] = {}
    entry, current, instructions, root = None, None, {}, None
    for line in hlo_text.splitlines():
        if current is None:
            m = _COMPUTATION.match(line)
            if m:
                current, instructions, root = m.group(1), {}, None
                entry = current if line.startswith("ENTRY") else entry
            continue
        if line.strip() == "}":
            computations[current] = Computation(current, instructions, root or next(reversed(instructions), ""))
            current = None
            continue
        inst = _parse_instruction(line)
        if inst is not None:
            instructions[inst.name] = inst
            root = inst.name if line.lstrip().startswith("ROOT") else root
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text. Fix: pass the text of a whole compiled module "
                         "(compiled.as_text()), not one computation.")
    header = hlo_text.split("\n", 1)[0]
    partitions = re.search(r"num_partitions=(\d+)", header)
    replicas = re.search(r"replica_count=(\d+)", header)
    devices = int(partitions.group(1) if partitions else 1) * int(replicas.group(1) if replicas else 1)
    return computations, entry, devices


def _dtype_bits(dtype: str) -> int:
    if dtype in _DTYPE_BITS:
        return _DTYPE_BITS[dtype]
    m = re.fullmatch(r"[fsu](\d+)(?:e\d+m\d+\w*)?", dtype)
    if m is None:
        raise ValueError(f"unknown HLO element type {dtype!r}. Fix: add its bit width to mistral_jax/aot/hlo.py "
                         "_DTYPE_BITS.")
    return int(m.group(1))


def shape_bytes(shape: str, memory_space: int | None = None) -> int:
    """Bytes of every array in an HLO shape (a tuple adds its elements; layouts and tiling are ignored).

    ``memory_space``: count only the arrays whose layout places them there (``S(n)`` in the layout; none: 0, the
    device's main memory, HBM on a TPU; 1 is the TPU's on-chip VMEM, 5 host memory).
    """
    total_bits = 0
    for dtype, dims, layout in _ARRAY.findall(shape):
        if memory_space is not None:
            space = re.search(r"(?<![A-Za-z])S\((\d+)\)", layout)
            if (int(space.group(1)) if space else 0) != memory_space:
                continue
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total_bits += n * _dtype_bits(dtype)
    return total_bits // 8


def group_size(attrs: str, devices: int) -> int:
    """The replica group size of a collective from its attributes (see the module docstring for the forms)."""
    m = re.search(r"replica_groups=", attrs)
    if m is None:
        return devices
    text = attrs[m.end():]
    if text.startswith("mesh["):
        axes_end = _balanced(text, 4)
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", text[5:axes_end - 1]))
        rest = text[axes_end:]
        ids = re.match(r",\s*device_ids=", rest)  # the mesh's device order, e.g. device_ids=([2,2]T(1,0))
        rest = rest[_balanced(rest, ids.end()):] if ids else rest
        groups = re.match(r"\s*\{([^}]*)\}", rest)
        if groups is None:
            raise ValueError(f"cannot read the mesh-axes replica groups in {text[:200]!r}. Fix: extend "
                             "mistral_jax/aot/hlo.py group_size to this form.")
        n = 1
        for axis in filter(None, (a.strip() for a in groups.group(1).split(","))):
            sub = re.fullmatch(r"'([^']+)':\((\d+)\)(\d+)", axis)
            n *= int(sub.group(3)) if sub else int(sizes[axis.strip("'")])
        return n
    if text.startswith("["):  # iota form: [groups, group size]<=[...]
        dims = [int(d) for d in text[1:text.index("]")].split(",")]
        return dims[-1]
    first = re.match(r"\{\s*(\{[^}]*\})?", text)
    if first is None or first.group(1) is None:  # {} : one group of every device
        return devices
    return len(first.group(1).strip("{}").split(","))


def _result_shape(inst: Instruction) -> str:
    """The result buffer(s) of a collective; an async ``-start`` holds it as tuple element 1 (all-reduce-start: the
    whole shape)."""
    if inst.opcode.endswith("-start") and inst.opcode != "all-reduce-start" and inst.shape.startswith("("):
        return _split_top_level(inst.shape[1:-1])[1]
    return inst.shape


def _kind(inst: Instruction, comp: Computation,
          computations: dict[str, Computation]) -> tuple[str, Instruction, Computation] | None:
    """(kind, the instruction holding the collective's attributes, its computation) if ``inst`` starts a collective,
    else None."""
    op = inst.opcode.removesuffix("-start")
    if op in KINDS:
        return op, inst, comp
    if inst.opcode == "async-start":  # generic async wrapper: the collective is the wrapped computation's root
        callee = re.search(r"calls=%?([\w.\-]+)", inst.attrs)
        wrapped = computations.get(callee.group(1)) if callee else None
        root = wrapped.instructions.get(wrapped.root) if wrapped else None
        if root is not None and root.opcode in KINDS:
            return root.opcode, root, wrapped
    return None


def _bytes_moved(kind: str, inst: Instruction, result: str, comp: Computation, devices: int) -> tuple[float, float]:
    """(bytes, upper bound) one execution of a collective moves per device."""
    if kind == "collective-permute":
        b = float(shape_bytes(result))
        return b, b
    n = group_size(inst.attrs, devices)
    share = (n - 1) / n
    b = shape_bytes(result)
    if kind == "ragged-all-to-all":
        src = comp.instructions.get(inst.operands[0])
        expected = min(shape_bytes(src.shape), b) * share if src is not None else b * share
        return expected, b * share
    moved = {"all-gather": b * share, "reduce-scatter": b * (n - 1), "all-reduce": 2 * b * share,
             "all-to-all": b * share}[kind]
    return moved, moved


def _constant(comp: Computation, name: str) -> int | None:
    """The integer value of ``name`` if it is a constant (through copies / bitcasts / converts), else None."""
    inst = comp.instructions.get(name)
    while inst is not None and inst.opcode in ("copy", "bitcast", "convert") and inst.operands:
        inst = comp.instructions.get(inst.operands[0])
    if inst is None or inst.opcode != "constant":
        return None
    m = re.fullmatch(r"-?\d+", inst.operands[0]) if inst.operands else None
    return int(m.group(0)) if m else None


def _tuple_index(comp: Computation, name: str) -> int | None:
    """k if ``name`` is ``get-tuple-element(parameter, index=k)`` (the loop state's element k), else None."""
    inst = comp.instructions.get(name)
    if inst is None or inst.opcode != "get-tuple-element":
        return None
    m = re.search(r"index=(\d+)", inst.attrs)
    return int(m.group(1)) if m else None


def trip_count(while_inst: Instruction, comp: Computation, computations: dict[str, Computation]) -> int | None:
    """Iterations of a while loop: XLA's ``known_trip_count``, else inferred from its condition, else None."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', while_inst.attrs)
    if m:
        return int(m.group(1))
    cond_name = re.search(r"condition=%?([\w.\-]+)", while_inst.attrs)
    cond = computations.get(cond_name.group(1)) if cond_name else None
    if cond is None:
        return None
    root = cond.instructions[cond.root]
    if root.opcode == "fusion":  # compare(param_0, param_1) inside a fused computation: map params to operands
        callee = re.search(r"calls=%?([\w.\-]+)", root.attrs)
        fused = computations.get(callee.group(1)) if callee else None
        inner = fused.instructions.get(fused.root) if fused else None
        if inner is None or inner.opcode != "compare":
            return None
        params = {i.name: int(i.operands[0]) for i in fused.instructions.values() if i.opcode == "parameter"}
        if not all(o in params for o in inner.operands):
            return None
        lhs_rhs, direction_attrs = (root.operands[params[inner.operands[0]]],
                                    root.operands[params[inner.operands[1]]]), inner.attrs
    elif root.opcode == "compare":
        lhs_rhs, direction_attrs = (root.operands[0], root.operands[1]), root.attrs
    else:
        return None
    found = re.search(r"direction=(\w+)", direction_attrs)
    direction = found.group(1) if found else ""
    lhs, rhs = lhs_rhs
    if _tuple_index(cond, rhs) is not None and _constant(cond, lhs) is not None:  # N > i  ->  i < N
        lhs, rhs = rhs, lhs
        direction = {"GT": "LT", "GE": "LE", "LT": "GT", "LE": "GE"}.get(direction, direction)
    index, bound = _tuple_index(cond, lhs), _constant(cond, rhs)
    if index is None or bound is None or direction not in ("LT", "LE"):
        return None
    init_step = re.search(r'"known_init_step":\{"init":"(-?\d+)","step":"(\d+)"', while_inst.attrs)
    if init_step:
        init, step = int(init_step.group(1)), int(init_step.group(2))
    else:
        state = comp.instructions.get(while_inst.operands[0])
        if state is None or state.opcode != "tuple" or index >= len(state.operands):
            return None
        init, step = _constant(comp, state.operands[index]), 1
        if init is None:
            return None
    span = bound - init + (1 if direction == "LE" else 0)
    return max(0, -(-span // step))


# visit(instruction, its computation, its callees by role) -> (what it adds, computations it runs once)
_Visit = Callable[[Instruction, Computation, dict[str, list[str]]], tuple[dict[Any, float], list[str]]]


def _weighted_totals(computations: dict[str, Computation], entry: str, visit: _Visit,
                     branch_weight: Callable[[dict[Any, float]], float]) -> tuple[dict[Any, float], list[str]]:
    """Sum per-instruction figures over one execution of ``entry``, callees included, loops by their trip counts.

    ``visit(inst, comp, callees)`` -> (``{key: value}`` the instruction itself adds, names of computations it runs
    once), for every instruction but a while (its body counts its trip count times, its condition trip count + 1;
    unknown: once, and the while is named in the second result) and a conditional's branches (the branch of largest
    ``branch_weight`` counts once; ``visit`` still sees the conditional). ``callees``: the instruction's callee names
    by role (``calls``, ``to_apply``, ...), branches removed. Returns (totals, sorted names of uncounted loops).
    """
    uncounted: list[str] = []

    @functools.cache
    def totals(name: str) -> dict[Any, float]:
        if name not in computations:  # a callee whose text the parser did not recognise: not counted, and named
            uncounted.append(name)
            return {}
        comp = computations[name]
        acc: dict[Any, float] = {}

        def add(sub: dict[Any, float], times: float) -> None:
            for key, value in sub.items():
                acc[key] = acc.get(key, 0.0) + times * value

        for inst in comp.instructions.values():
            callees = {role: re.findall(r"%?([\w.\-]+)", value) for role, value in _CALLEES.findall(inst.attrs)}
            if inst.opcode == "while":
                trips = trip_count(inst, comp, computations)
                if trips is None:
                    uncounted.append(inst.name)
                    trips = 1
                for body in callees.get("body", []):
                    add(totals(body), trips)
                for cond in callees.get("condition", []):
                    add(totals(cond), trips + 1)
                continue
            branches = callees.pop("branch_computations", []) + callees.pop("true_computation", []) + callees.pop(
                "false_computation", [])
            if branches:
                add(max((totals(b) for b in branches), key=branch_weight), 1.0)
            own, runs = visit(inst, comp, callees)
            add(own, 1.0)
            for callee in runs:
                if callee in computations:
                    add(totals(callee), 1.0)
        return acc

    return dict(totals(entry)), sorted(set(uncounted))


def collective_traffic(hlo_text: str, scope: str | None = None) -> CollectiveTraffic:
    """Per-device collective bytes and counts of one execution of an optimized HLO module (module docstring).

    ``scope``: count only the collectives whose ``op_name`` metadata contains it (a ``jax.named_scope``, e.g.
    ``context.SCOPE`` for the context-parallel attention's exchanges)."""
    computations, entry, devices = parse_module(hlo_text)

    def visit(inst: Instruction, comp: Computation,
              callees: dict[str, list[str]]) -> tuple[dict[Any, float], list[str]]:
        own: dict[Any, float] = {}
        found = _kind(inst, comp, computations)
        if found is not None and scope is not None and scope not in _op_name(inst):
            found = None
        if found is not None:
            kind, holder, holder_comp = found
            moved, upper = _bytes_moved(kind, holder, _result_shape(inst), holder_comp, devices)
            own = {(kind, "count"): 1.0, (kind, "bytes"): moved, (kind, "upper"): upper}
            if inst.opcode == "async-start":
                return own, []  # the wrapped computation is the collective itself: do not count it again
        if inst.opcode in ("async-update", "async-done"):
            return own, []  # they name the wrapped computation too: counted at the start
        return own, [callee for names in callees.values() for callee in names]

    acc, uncounted = _weighted_totals(computations, entry, visit,
                                      lambda t: sum(v for k, v in t.items() if k[1] == "bytes"))
    result = {k: {"count": 0, "bytes": 0.0} for k in KINDS}
    result["ragged-all-to-all"]["bytes_upper_bound"] = 0.0
    for kind in KINDS:
        if acc.get((kind, "count")):
            result[kind].update(count=round(acc[(kind, "count")]), bytes=acc[(kind, "bytes")])
            if kind == "ragged-all-to-all":
                result[kind]["bytes_upper_bound"] = acc[(kind, "upper")]
    return CollectiveTraffic(kinds=result, uncounted_loops=uncounted)


@dataclasses.dataclass
class HbmTraffic:
    """Per-device HBM traffic of one program execution (``hbm_traffic``; see the module docstring for the model).

    ``bytes``: bytes read from and written to HBM; ``by_opcode``: the same split by the opcode of the instruction
    that moves them (``fusion``, ``copy``, ``custom-call``, ``all-gather-start``, ...); ``uncounted_loops``: while
    loops whose trip count is unknown, counted once (their traffic is undercounted).
    """

    bytes: float
    by_opcode: dict[str, float]
    uncounted_loops: list[str]


# Instructions that move no data themselves: bookkeeping, aliases of their operand, or callers whose callees are
# walked instead (while, call, conditional, async-start); ``*-done`` / ``*-update`` finish what their start began.
_NO_TRAFFIC = frozenset({"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while", "call",
                         "conditional", "async-start", "after-all", "partition-id", "replica-id", "opt-barrier",
                         "add-dependency", "domain", "get-dimension-size"})
_SLICING = frozenset({"dynamic-slice", "slice", "gather"})


def _op_name(inst: Instruction) -> str:
    m = re.search(r'op_name="([^"]*)"', inst.attrs)
    return m.group(1) if m else ""


def _callee(inst: Instruction) -> str | None:
    m = re.search(r"calls=%?([\w.\-]+)", inst.attrs)
    return m.group(1) if m else None


def _operand_use(user: Instruction, j: int, comp: Computation) -> int | None:
    """Bytes ``user`` reads of its operand ``j`` when that is only part of it, else None (all of it): a slicing op
    reads the slice; a dynamic-update-slice updates its operand 0 in place without reading it; a scatter reads the
    rows it updates (as many bytes as its updates)."""
    if j != 0:
        return None
    if user.opcode in _SLICING:
        return shape_bytes(user.shape)
    if user.opcode == "dynamic-update-slice":
        return 0
    if user.opcode == "scatter" and len(user.operands) == 3 and user.operands[2] in comp.instructions:
        return shape_bytes(comp.instructions[user.operands[2]].shape)
    return None


def hbm_traffic(hlo_text: str) -> HbmTraffic:
    """Per-device bytes one execution of an optimized HLO module reads from and writes to HBM (module docstring)."""
    computations, entry, _ = parse_module(hlo_text)
    users: dict[str, dict[str, list[Instruction]]] = {}

    def users_in(comp: Computation) -> dict[str, list[Instruction]]:
        if comp.name not in users:
            found: dict[str, list[Instruction]] = {}
            for inst in comp.instructions.values():
                for o in dict.fromkeys(inst.operands):
                    found.setdefault(o, []).append(inst)
            users[comp.name] = found
        return users[comp.name]

    def read(comp: Computation, name: str) -> int:
        """Bytes of value ``name`` of fused computation ``comp`` that the fusion reads (at most all of it)."""
        full = shape_bytes(comp.instructions[name].shape)
        if name == comp.root:
            return full
        total = 0
        for user in users_in(comp).get(name, []):
            for j, o in enumerate(user.operands):
                if o != name:
                    continue
                if user.opcode == "bitcast":
                    part = read(comp, user.name)
                elif user.opcode == "fusion" and _callee(user) in computations:
                    inner = computations[_callee(user)]
                    param = next((i.name for i in inner.instructions.values()
                                  if i.opcode == "parameter" and i.operands == (str(j),)), None)
                    part = full if param is None else read(inner, param)
                else:
                    use = _operand_use(user, j, comp)
                    part = full if use is None else use
                total += part
                if total >= full:
                    return full
        return total

    def written(comp: Computation, name: str) -> int:
        """Bytes written when value ``name`` of ``comp`` is a result: an in-place update writes only the update."""
        inst = comp.instructions[name]
        if inst.opcode == "bitcast" and inst.operands[0] in comp.instructions:
            return written(comp, inst.operands[0])
        if inst.opcode == "tuple":
            return sum(written(comp, o) for o in inst.operands if o in comp.instructions)
        if inst.opcode == "fusion" and _callee(inst) in computations:
            inner = computations[_callee(inst)]
            return written(inner, inner.root)
        if inst.opcode == "dynamic-update-slice" and inst.operands[1] in comp.instructions:
            return shape_bytes(comp.instructions[inst.operands[1]].shape)
        update = _operand_use(inst, 0, comp) if inst.opcode == "scatter" else None
        return shape_bytes(inst.shape) if update is None else update

    def hbm_fraction(shape: str) -> float:
        total = shape_bytes(shape)
        return shape_bytes(shape, memory_space=0) / total if total else 0.0

    def instruction_bytes(inst: Instruction, comp: Computation) -> float:
        """HBM bytes one execution of a top-level instruction reads (its operands) and writes (its result)."""
        fused = computations.get(_callee(inst)) if inst.opcode == "fusion" else None
        params = {int(i.operands[0]): i.name for i in fused.instructions.values()
                  if i.opcode == "parameter"} if fused else {}
        total = 0.0
        for j, o in enumerate(inst.operands):
            operand = comp.instructions.get(o)
            if operand is None:
                continue
            hbm = shape_bytes(operand.shape, memory_space=0)
            if not hbm:
                continue
            if fused is not None:
                part = read(fused, params[j]) if j in params else hbm
            else:
                use = _operand_use(inst, j, comp)
                part = hbm if use is None else use
            total += min(hbm, part)
        if inst.opcode == "copy-start":  # (destination, source, context): the copy writes element 0
            return total + shape_bytes(_split_top_level(inst.shape[1:-1])[0], memory_space=0)
        if inst.opcode.endswith("-start"):  # an async collective: its result buffer
            return total + shape_bytes(_result_shape(inst), memory_space=0)
        if fused is not None:
            root = fused.instructions[fused.root]
            elements = _split_top_level(inst.shape[1:-1]) if inst.shape.startswith("(") else []
            if root.opcode == "tuple" and len(elements) == len(root.operands):  # a multi-output fusion
                pairs = zip(root.operands, elements, strict=True)
                return total + sum(written(fused, r) * hbm_fraction(e) for r, e in pairs)
            return total + written(fused, fused.root) * hbm_fraction(inst.shape)
        if inst.opcode in ("dynamic-update-slice", "scatter"):
            return total + written(comp, inst.name) * hbm_fraction(inst.shape)
        return total + shape_bytes(inst.shape, memory_space=0)

    def visit(inst: Instruction, comp: Computation,
              callees: dict[str, list[str]]) -> tuple[dict[Any, float], list[str]]:
        if inst.opcode == "call":
            return {}, callees.get("to_apply", [])
        if inst.opcode == "async-start":
            return {}, callees.get("calls", [])
        if inst.opcode in _NO_TRAFFIC or inst.opcode.endswith(("-done", "-update")):
            return {}, []
        moved = instruction_bytes(inst, comp)
        return ({inst.opcode: moved} if moved else {}), []

    acc, uncounted = _weighted_totals(computations, entry, visit, lambda t: sum(t.values()))
    by_opcode = dict(sorted(acc.items(), key=lambda kv: -kv[1]))
    return HbmTraffic(bytes=sum(by_opcode.values()), by_opcode=by_opcode, uncounted_loops=uncounted)


def dot_operand_types(hlo_text: str) -> dict[str, int]:
    """How many matmuls (``dot`` and ``convolution`` instructions, fused ones included; each counted once, not per
    loop iteration) of a compiled program take operands of each element type: ``{"s8 x s8": 40, "bf16 x bf16": 12}``.
    Quantized training (``ModelConfig.matmul_quant``) shows as ``s8`` / ``f8e4m3fn`` / ``f8e5m2`` operands."""
    computations, _, _ = parse_module(hlo_text)
    counts: dict[str, int] = {}
    for comp in computations.values():
        for inst in comp.instructions.values():
            if inst.opcode not in ("dot", "convolution"):
                continue
            types = [comp.instructions[o].shape.split("[")[0] if o in comp.instructions else "?"
                     for o in inst.operands[:2]]
            key = " x ".join(types)
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def size(b: float) -> str:
    """Bytes in the largest binary unit that keeps a leading digit: ``3.40 MiB``."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if b >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{b:.0f} B"


def describe(traffic: CollectiveTraffic) -> str:
    """One line: ``all-gather 12x 3.4 MiB, ...`` for the kinds that run."""
    parts = [f"{k} {int(v['count'])}x {size(v['bytes'])}" + (
        f" (upper bound {size(v['bytes_upper_bound'])})" if v.get("bytes_upper_bound", v["bytes"]) != v["bytes"]
        else "") for k, v in traffic.kinds.items() if v["count"]]
    return ", ".join(parts) or "none"

