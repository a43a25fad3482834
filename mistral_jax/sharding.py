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
from jax.experimental import mesh_utils  # a submodule: `import jax` alone does not load it
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "context", "tensor", "expert")

MeshAxes = str | tuple[str, ...] | None

# Rule presets. FSDP shards parameters' embed dimension over every axis that also shards the tokens (`fsdp`;
# `context`, which shards the sequence; `expert`, which is one more batch axis for everything but the experts)
# and the batch over data x fsdp x expert, the sequence over `context` (context parallelism: attention then runs
# the ring or halo backend of model/context.py); TP shards heads / mlp / vocab over `tensor`; EP shards experts
# over `expert` and their embed dimension (`expert_embed`) over `fsdp` x `context`. So no weight is replicated
# over the expert groups: the non-expert weights' gradients are reduce-scattered over fsdp x context x expert, not
# all-reduced over the expert axis.
_BASE: dict[str, MeshAxes] = {
    # parameters
    "layers": None,
    "vocab": "tensor",
    "embed": ("fsdp", "context", "expert"),
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "experts": "expert",
    "expert_embed": ("fsdp", "context"),  # the embed dimension of expert weights [experts, expert_embed, mlp]
    # activations
    "batch": ("data", "fsdp", "expert"),
    "seq": "context",  # context parallelism: the sequence of activations split over `context` (model/context.py)
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}

# Presets. Mesh axes of size 1 are dropped from every spec, so one table serves every mesh shape; the presets
# say what the `tensor` axis means, and experts always follow the `expert` axis (an expert axis > 1 *is* expert
# parallelism; a run config that sets mesh.expert=8 gets EP whatever preset it names, never 8 replicas).
#   fsdp:        parameters sharded on `embed` over fsdp; no tensor parallelism: a `tensor` axis > 1 is one
#                more batch axis.
#   fsdp_tp:     + heads / kv_heads / mlp / vocab over `tensor` (Megatron column/row split).
#   fsdp_tp_ep:  the same table, named for Mixtral runs with mesh.expert > 1 (MoE blocks then run the
#                expert-parallel path of model/moe.py).
_FSDP: dict[str, MeshAxes] = {**_BASE, "vocab": None, "heads": None, "kv_heads": None, "mlp": None,
                              "embed": ("fsdp", "context", "tensor", "expert"),
                              "expert_embed": ("fsdp", "context", "tensor"),
                              "act_heads": None, "act_kv_heads": None, "act_mlp": None, "act_vocab": None,
                              "batch": ("data", "fsdp", "tensor", "expert")}

RULE_PRESETS: dict[str, dict[str, MeshAxes]] = {
    "fsdp": _FSDP,
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

    def spec(self, logical_axes: Sequence[str | None], mesh: Mesh | None = None, *,
             yield_to: Sequence[str] = ()) -> PartitionSpec:
        """PartitionSpec for an array whose dimensions carry ``logical_axes``.

        Mesh axes of size 1 (or absent from ``mesh``) are dropped. Raises if a mesh axis is used twice.
        ``yield_to``: logical axes whose mesh axes every other dimension gives up (e.g. ``("batch", None,
        "embed")`` with ``yield_to=("embed",)`` shards the batch only over the batch axes that ``embed`` does
        not use; with no dimension named ``embed``, the batch still leaves those axes free).
        """
        reserved = {a for logical in yield_to for a in self._axes(logical)}
        used: dict[str, str] = {}
        out = []
        for logical in logical_axes:
            axes = self._axes(logical)
            if logical not in yield_to:
                axes = tuple(a for a in axes if a not in reserved)
            if mesh is not None:
                axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
            for a in axes:
                if a in used:
                    raise ValueError(f"mesh axis {a!r} shards both {used[a]!r} and {logical!r} in {tuple(logical_axes)}"
                                     ". Fix: map one of them to another mesh axis (or None) in the rules table.")
                used[a] = logical
            out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return PartitionSpec(*out)

    def _axes(self, logical: str | None) -> tuple[str, ...]:
        axes = self.mesh_axes(logical)
        return (axes,) if isinstance(axes, str) else tuple(axes or ())


DEFAULT_RULES = ShardingRules(_BASE)

_state = threading.local()


DCN_AXES = ("data", "fsdp")  # the mesh axes that may span TPU slices (over the data-center network)


def slice_groups(devices: Sequence) -> dict[int, list] | None:
    """Devices grouped by ``slice_index`` (sorted by slice), or None when the devices carry none (CPU, GPU)."""
    devices = list(devices)
    if not devices or not all(hasattr(d, "slice_index") for d in devices):
        return None
    groups: dict[int, list] = {}
    for d in devices:
        groups.setdefault(int(d.slice_index), []).append(d)
    return dict(sorted(groups.items()))


def num_slices(devices: Sequence | None = None) -> int:
    """How many TPU slices ``devices`` (default: all global devices) span; 1 for devices without a slice_index."""
    groups = slice_groups(jax.devices() if devices is None else devices)
    return 1 if groups is None else len(groups)


def _fill_sizes(sizes: dict[str, int], n_devices: int, where: str) -> dict[str, int]:
    """Check the (data, fsdp, context, tensor, expert) sizes and resolve the one -1 against ``n_devices``."""
    sizes = dict(sizes)
    shown = ", ".join(f"mesh.{k}={v}" for k, v in sizes.items())
    for k, v in sizes.items():
        if v != -1 and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"mesh.{k}={v!r} must be a positive integer or -1 (fill). Fix: set mesh.{k}.")
    fill = [k for k, v in sizes.items() if v == -1]
    if len(fill) > 1:
        raise ValueError(f"{shown}: only one axis may be -1 (fill). Fix: give all but one size explicitly.")
    known = math.prod(v for v in sizes.values() if v != -1)
    if fill:
        if n_devices % known:
            raise ValueError(f"{shown}: {n_devices} devices{where} are not divisible by {known}. "
                             f"Fix: choose sizes whose product divides {n_devices}.")
        sizes[fill[0]] = n_devices // known
    if math.prod(sizes.values()) != n_devices:
        raise ValueError(f"{shown} multiply to {math.prod(sizes.values())} but there are {n_devices} devices{where}. "
                         "Fix: make the product equal the device count, or set one axis to -1.")
    return sizes


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, expert: int = 1, devices=None, *,
              dcn_data: int = 1, dcn_fsdp: int = 1, context: int = 1) -> Mesh:
    """A (data, fsdp, context, tensor, expert) mesh with Auto axis types; one axis may be -1 (= fill the devices).

    Multi-slice (``dcn_data * dcn_fsdp > 1``): ``data, fsdp, context, tensor, expert`` lay out the devices of one slice
    (ICI; -1 fills a slice) and ``dcn_data, dcn_fsdp`` the slices (DCN), grouped by the devices' ``slice_index``
    (``mesh_utils.create_hybrid_device_mesh``). The mesh keeps the same five axes: ``data`` has
    ``dcn_data * data`` entries and ``fsdp`` ``dcn_fsdp * fsdp``, slice-major, so only the data / FSDP
    collectives cross slices while context, tensor and expert parallelism stay inside one.

    Raises:
      ValueError: sizes that do not lay out the devices, or DCN axes that do not match the devices' slices.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "context": context, "tensor": tensor, "expert": expert}
    dcn = {"dcn_data": dcn_data, "dcn_fsdp": dcn_fsdp}
    for k, v in dcn.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"mesh.{k}={v!r} must be a positive integer (the number of slices along it). "
                             f"Fix: set mesh.{k}=1 on one slice.")
    n_slices = dcn_data * dcn_fsdp
    if n_slices == 1:  # one slice (or no slices at all: CPU, GPU): a plain ICI mesh
        sizes = _fill_sizes(sizes, len(devices), "")
        shape = tuple(sizes[a] for a in MESH_AXES)
        try:
            dev_array = mesh_utils.create_device_mesh(shape, devices=devices)
        except Exception:  # noqa: BLE001 - CPU / odd topologies: plain reshape is fine
            dev_array = np.asarray(devices).reshape(shape)
        return Mesh(dev_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))

    groups = slice_groups(devices)
    shown = f"mesh.dcn_data={dcn_data}, mesh.dcn_fsdp={dcn_fsdp}"
    if groups is None or len(groups) == 1:
        why = (f"have no slice_index ({devices[0].platform} devices are one slice)" if groups is None
               else "are all on one slice")
        raise ValueError(f"{shown} spread the mesh over {n_slices} TPU slices, but the {len(devices)} devices {why}. "
                         "Fix: set mesh.dcn_data=1 and mesh.dcn_fsdp=1 on one slice, or run on "
                         f"{n_slices} slices (a multi-slice TPU job).")
    if len(groups) != n_slices:
        raise ValueError(f"{shown} multiply to {n_slices} slices, but the devices span {len(groups)} slices. "
                         f"Fix: make mesh.dcn_data x mesh.dcn_fsdp equal {len(groups)} (e.g. "
                         f"mesh.dcn_data={len(groups)}, mesh.dcn_fsdp=1).")
    per_slice = {len(g) for g in groups.values()}
    if len(per_slice) != 1:
        raise ValueError(f"the slices hold different numbers of devices "
                         f"{ {k: len(g) for k, g in groups.items()} }. Fix: run on identical slices.")
    sizes = _fill_sizes(sizes, per_slice.pop(), " per slice")
    ici_shape = tuple(sizes[a] for a in MESH_AXES)
    dcn_shape = tuple({"data": dcn_data, "fsdp": dcn_fsdp}.get(a, 1) for a in MESH_AXES)
    try:
        dev_array = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices=devices)
    except Exception:  # noqa: BLE001 - shapes the physical layout cannot take: reshape each slice, same blocks
        blocks = np.empty(dcn_shape, dtype=object)
        for i, g in enumerate(groups.values()):
            blocks[np.unravel_index(i, dcn_shape)] = np.asarray(g).reshape(ici_shape)
        dev_array = np.block(blocks.tolist())
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


def constrain(x: jax.Array, logical_axes: Sequence[str | None], *, yield_to: Sequence[str] = ()) -> jax.Array:
    """``with_sharding_constraint`` by logical axes when a mesh is active (``use_mesh``); else identity.

    ``yield_to``: see ``ShardingRules.spec``.
    """
    ctx = current()
    if ctx is None:
        return x
    mesh, rules = ctx
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, rules.spec(logical_axes, mesh, yield_to=yield_to)))


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
    check_divisible(abstract_state, shardings)

    @jax.jit
    def init():
        return nnx.state(make_module())

    with use_mesh(mesh, rules):
        state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------------------------- from run config
def rules_preset(name: str) -> ShardingRules:
    """The ``ShardingRules`` of a preset: ``fsdp``, ``fsdp_tp`` or ``fsdp_tp_ep``."""
    if name not in RULE_PRESETS:
        raise ValueError(f"unknown sharding preset {name!r}. Fix: use one of {sorted(RULE_PRESETS)}.")
    return ShardingRules(RULE_PRESETS[name])


def _get(cfg, key: str, default):
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default) if not hasattr(cfg, "get") else cfg.get(key, default)


def mesh_from_config(mesh_cfg, devices=None) -> Mesh:
    """The mesh of a run config's ``config.mesh``.

    Fields ``data, fsdp, context, tensor, expert`` (one slice's layout; -1 = fill) and ``dcn_data, dcn_fsdp`` (how
    the data and fsdp axes repeat over TPU slices; see ``make_mesh``).

    Args:
      mesh_cfg: a ConfigDict or mapping; missing fields default to ``data=1, fsdp=-1, context=1, tensor=1, expert=1,
        dcn_data=1, dcn_fsdp=1``.
      devices: the devices to lay out (default: all global devices, every process's).

    Returns:
      A ``Mesh`` with Auto axis types over ``MESH_AXES``.

    Raises:
      ValueError: as ``make_mesh``; also when the devices span several slices but the DCN axes are 1 (FSDP over
        the data-center network is never what a run wants).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {a: int(_get(mesh_cfg, a, -1 if a == "fsdp" else 1)) for a in MESH_AXES}
    dcn = {f"dcn_{a}": int(_get(mesh_cfg, f"dcn_{a}", 1)) for a in DCN_AXES}
    n = num_slices(devices)
    if n > 1 and all(v == 1 for v in dcn.values()):
        raise ValueError(f"the {len(devices)} devices span {n} TPU slices but mesh.dcn_data=1 and mesh.dcn_fsdp=1 "
                         f"(one slice). Fix: set --config.mesh.dcn_data={n} (data parallelism across slices).")
    return make_mesh(**sizes, **dcn, devices=devices)


def mesh_shape(mesh_cfg, n_devices: int, n_slices: int = 1) -> dict[str, int]:
    """The axis sizes ``mesh_from_config(mesh_cfg)`` gives on ``n_devices`` devices in ``n_slices`` TPU slices,
    computed without devices (to check a run config before anything is built).

    Raises:
      ValueError: as ``mesh_from_config`` (one line naming the field, the value and the fix).
    """
    sizes = {a: int(_get(mesh_cfg, a, -1 if a == "fsdp" else 1)) for a in MESH_AXES}
    dcn = {a: int(_get(mesh_cfg, f"dcn_{a}", 1)) for a in DCN_AXES}
    for a, v in dcn.items():
        if v < 1:
            raise ValueError(f"mesh.dcn_{a}={v!r} must be a positive integer (the number of slices along it). "
                             f"Fix: set mesh.dcn_{a}=1 on one slice.")
    n_dcn = math.prod(dcn.values())
    shown = f"mesh.dcn_data={dcn['data']}, mesh.dcn_fsdp={dcn['fsdp']}"
    if n_dcn == 1 and n_slices > 1:
        raise ValueError(f"the {n_devices} devices span {n_slices} TPU slices but mesh.dcn_data=1 and mesh.dcn_fsdp=1 "
                         f"(one slice). Fix: set --config.mesh.dcn_data={n_slices} (data parallelism across slices).")
    if n_dcn > 1 and n_slices == 1:
        raise ValueError(f"{shown} spread the mesh over {n_dcn} TPU slices, but the {n_devices} devices are one slice. "
                         f"Fix: set mesh.dcn_data=1 and mesh.dcn_fsdp=1 on one slice, or run on {n_dcn} slices "
                         "(a multi-slice TPU job).")
    if n_dcn != n_slices:
        raise ValueError(f"{shown} multiply to {n_dcn} slices, but the devices span {n_slices} slices. "
                         f"Fix: make mesh.dcn_data x mesh.dcn_fsdp equal {n_slices} (e.g. "
                         f"mesh.dcn_data={n_slices}, mesh.dcn_fsdp=1).")
    if n_devices % n_slices:
        raise ValueError(f"{n_devices} devices do not split into {n_slices} equal slices. Fix: use identical slices.")
    sizes = _fill_sizes(sizes, n_devices // n_slices, " per slice" if n_slices > 1 else "")
    return {a: v * dcn.get(a, 1) for a, v in sizes.items()}


def rules_from_config(mesh_cfg, mesh: Mesh | Mapping[str, int] | None = None) -> ShardingRules:
    """The rules of ``config.mesh.rules`` (a preset name; default ``auto``: the preset matching the mesh shape).

    ``mesh``: the mesh, or its axis sizes (``mesh_shape``) when the rules are checked before any device is used.

    ``auto`` picks ``fsdp_tp_ep`` when the mesh has an expert axis > 1, else ``fsdp_tp`` when tensor > 1, else
    ``fsdp``.
    """
    name = _get(mesh_cfg, "rules", "auto") or "auto"
    if name != "auto":
        return rules_preset(name)
    shape = (dict(mesh.shape) if isinstance(mesh, Mesh) else dict(mesh) if mesh is not None
             else {a: int(_get(mesh_cfg, a, 1)) for a in MESH_AXES})
    if shape.get("expert", 1) > 1:
        return rules_preset("fsdp_tp_ep")
    if shape.get("tensor", 1) > 1:
        return rules_preset("fsdp_tp")
    return rules_preset("fsdp")


# ---------------------------------------------------------------------------------------------- state shardings
def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def check_divisible(state, shardings) -> None:
    """Raise (listing every offender) if a sharded dimension is not divisible by its mesh axes' total size."""
    problems = []
    flat_s = jax.tree_util.tree_flatten_with_path(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))[0]
    flat_x = jax.tree.leaves(state, is_leaf=_is_var)
    for (path, sh), x in zip(flat_s, flat_x, strict=True):
        shape = tuple(x.shape)
        for dim, axes in zip(shape, tuple(sh.spec) + (None,) * (len(shape) - len(sh.spec)), strict=False):
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            n = math.prod(sh.mesh.shape[a] for a in axes)
            if dim % n:
                problems.append(f"{jax.tree_util.keystr(path)} shape {shape} spec {sh.spec}: {dim} % {n} != 0")
    if problems:
        raise ValueError("parameters cannot be sharded evenly on mesh " + str(dict(next(iter(
            flat_s))[1].mesh.shape)) + ":\n  " + "\n  ".join(problems) +
            "\nFix: choose mesh sizes that divide these dimensions (or map the logical axis to None in the rules).")


def opt_state_shardings(tx, abstract_params, param_shardings, mesh: Mesh):
    """Shardings for ``tx.init(params)``: each params-shaped part gets the parameters' shardings, the rest
    (step counts, schedule state) is replicated.

    Args:
      tx: the optax ``GradientTransformation``.
      abstract_params: the parameters (arrays or ``ShapeDtypeStruct``s; a pytree or ``nnx.State``).
      param_shardings: the same structure of ``NamedSharding``s (``state_shardings``).
      mesh: the mesh (for the replicated leaves).
    """
    import optax

    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    return optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                                 transform_non_params=lambda _: replicated(mesh),
                                 is_leaf=lambda x: isinstance(x, NamedSharding))


def batch_sharding(mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> NamedSharding:
    """The sharding of a ``[B, T]`` batch array (tokens, targets, weights, ...): ``("batch", "seq")``, so rows over
    the rules' batch axes and the sequence over ``seq``'s (None, replicated, in every preset)."""
    return NamedSharding(mesh, rules.spec(("batch", "seq"), mesh))


# ---------------------------------------------------------------------------------------------- expert parallel
@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    """Where the MoE block runs expert-parallel: resolved from a mesh and rules (``expert_parallel(mesh, rules)``)."""

    mesh: Mesh
    expert_axis: str  # mesh axis that shards the experts dimension
    tensor_axis: str | None  # mesh axis that shards the expert hidden (mlp) dimension, if any
    batch_axes: tuple[str, ...]  # mesh axes that shard the token dimension (batch x sequence, flattened)

    @property
    def tokens_split_over_experts(self) -> bool:
        return self.expert_axis in self.batch_axes


def expert_parallel(mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> ExpertParallel | None:
    """The expert-parallel layout on ``mesh`` if ``rules`` shard ``experts`` over an axis of size > 1 (passed in
    explicitly: the model's backends are chosen from it once, never from the active mesh)."""
    (e_axes,) = rules.spec(("experts",), mesh)
    if e_axes is None:
        return None
    if not isinstance(e_axes, str):
        raise ValueError(f"experts are sharded over several mesh axes {e_axes}; expert parallelism needs one. "
                         "Fix: map `experts` to a single mesh axis in the rules table.")
    (t_axes,) = rules.spec(("mlp",), mesh)
    if t_axes is not None and not isinstance(t_axes, str):
        raise ValueError(f"`mlp` is sharded over several mesh axes {t_axes}; the expert-parallel MoE supports one. "
                         "Fix: map `mlp` to a single mesh axis (or None).")
    # the tokens [M = B*T, D]: rows over the batch axes, then the sequence's (context parallelism)
    b_axes = tuple(a for axes in rules.spec(("batch", "seq"), mesh) if axes is not None
                   for a in ((axes,) if isinstance(axes, str) else axes))
    if t_axes is not None and t_axes in b_axes:
        raise ValueError(f"mesh axis {t_axes!r} shards both the batch and `mlp`; the expert-parallel MoE needs "
                         "them disjoint. Fix: change the rules table.")
    return ExpertParallel(mesh=mesh, expert_axis=e_axes, tensor_axis=t_axes, batch_axes=b_axes)
