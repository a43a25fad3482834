"""Meshes and the logical-axis rules table: the only file that names mesh axes.

Model code speaks logical axes. Parameters: ``layers, vocab, embed, heads, kv_heads, head_dim, mlp,
experts``; activations: ``batch, seq, act_embed, act_heads, act_kv_heads, act_mlp, act_vocab``. A rules
table maps each logical axis to a mesh axis (or a tuple of them, or None = replicated). ``spec()`` raises
when one mesh axis would shard two dimensions of the same array.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections.abc import Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert")

MeshAxes = str | tuple[str, ...] | None

# Rule presets. FSDP shards parameters' embed dimension over `fsdp` and the batch over data x fsdp;
# TP shards heads / mlp / vocab over `tensor`; EP shards experts over `expert` (which is otherwise
# one more batch axis).
_BASE: dict[str, MeshAxes] = {
    # parameters
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "experts": "expert",
    # activations
    "batch": ("data", "fsdp", "expert"),
    "seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}

RULE_PRESETS: dict[str, dict[str, MeshAxes]] = {
    "fsdp": _BASE,
    "fsdp_tp": _BASE,
    "fsdp_tp_ep": _BASE,
}


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis -> mesh axes. Unknown logical axes are an error (a typo would silently replicate)."""

    rules: Mapping[str, MeshAxes]

    def mesh_axes(self, logical: str | None) -> MeshAxes:
        if logical is None:
            return None
        if logical not in self.rules:
            raise ValueError(f"logical axis {logical!r} has no sharding rule. Known: {sorted(self.rules)}. "
                             "Fix: add it to the rules table in mistral_jax/sharding.py.")
        return self.rules[logical]

    def spec(self, logical_axes: Sequence[str | None], mesh: Mesh | None = None) -> PartitionSpec:
        """PartitionSpec for an array whose dimensions carry ``logical_axes``.

        Mesh axes of size 1 (or absent from ``mesh``) are dropped. Raises if a mesh axis is used twice.
        """
        used: dict[str, str] = {}
        out = []
        for logical in logical_axes:
            axes = self.mesh_axes(logical)
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            if mesh is not None:
                axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
            for a in axes:
                if a in used:
                    raise ValueError(f"mesh axis {a!r} shards both {used[a]!r} and {logical!r} in {tuple(logical_axes)}"
                                     ". Fix: map one of them to another mesh axis (or None) in the rules table.")
                used[a] = logical
            out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return PartitionSpec(*out)


DEFAULT_RULES = ShardingRules(_BASE)

_state = threading.local()


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, expert: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor, expert) mesh with Auto axis types; one axis may be -1 (= fill the devices)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor, "expert": expert}
    fill = [k for k, v in sizes.items() if v == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh sizes {sizes}: only one axis may be -1 (fill). Fix: give the others explicitly.")
    for k, v in sizes.items():
        if v != -1 and (not isinstance(v, int) or v < 1):
            raise ValueError(f"mesh.{k}={v!r} must be a positive integer or -1. Fix: set mesh.{k}.")
    known = math.prod(v for v in sizes.values() if v != -1)
    if fill:
        if len(devices) % known:
            raise ValueError(f"mesh sizes {sizes}: {len(devices)} devices are not divisible by {known}. "
                             "Fix: choose sizes whose product divides the device count.")
        sizes[fill[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"mesh sizes {sizes} multiply to {math.prod(sizes.values())} but there are {len(devices)} "
                         "devices. Fix: make the product equal the device count, or set one axis to -1.")
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        dev_array = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # noqa: BLE001 - CPU / odd topologies: plain reshape is fine
        dev_array = np.asarray(devices).reshape(shape)
    return Mesh(dev_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> Iterator[Mesh]:
    """Make ``constrain`` active for code traced inside the block."""
    prev = getattr(_state, "ctx", None)
    _state.ctx = (mesh, rules)
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _state.ctx = prev


def current() -> tuple[Mesh, ShardingRules] | None:
    return getattr(_state, "ctx", None)


def spec(logical_axes: Sequence[str | None], rules: ShardingRules | None = None, mesh: Mesh | None = None
         ) -> PartitionSpec:
    ctx = current()
    rules = rules or (ctx[1] if ctx else DEFAULT_RULES)
    mesh = mesh or (ctx[0] if ctx else None)
    return rules.spec(logical_axes, mesh)


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None], rules: ShardingRules = DEFAULT_RULES
                   ) -> NamedSharding:
    return NamedSharding(mesh, rules.spec(logical_axes, mesh))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical axes when a mesh is active (``use_mesh``); else identity."""
    ctx = current()
    if ctx is None:
        return x
    mesh, rules = ctx
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, rules.spec(logical_axes, mesh)))


def _is_var(x) -> bool:
    from flax import nnx

    return isinstance(x, nnx.Variable)


def logical_axes_of(var) -> tuple[str | None, ...]:
    """The ``logical_axes`` metadata of an NNX variable (replicated if it has none)."""
    axes = var.get_metadata().get("logical_axes")
    return tuple(axes) if axes is not None else (None,) * len(var.shape)


def state_shardings(state, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES):
    """NamedShardings for every variable of an (abstract) NNX state, from its logical axes."""
    return jax.tree.map(lambda v: NamedSharding(mesh, rules.spec(logical_axes_of(v), mesh)), state, is_leaf=_is_var)


def create_sharded(make_module, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES):
    """Build ``make_module()`` with every parameter created directly in its shard (never whole on one host).

    ``make_module`` is a zero-argument constructor (e.g. ``lambda: Transformer(cfg, rngs=nnx.Rngs(0))``).
    """
    from flax import nnx

    abstract = nnx.eval_shape(make_module)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)

    @jax.jit
    def init():
        return nnx.state(make_module())

    with use_mesh(mesh, rules):
        state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)
