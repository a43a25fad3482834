"""Building a model's parameters from a source: device arrays in the ``params_dict`` layout, created sharded on a
mesh and filled slice by slice (the host never holds more than one layer / expert slice)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax import sharding
from mistral_jax.config import ModelConfig
from mistral_jax.convert import keys as keys_lib
from mistral_jax.convert.dtypes import dtype_name, np_dtype
from mistral_jax.convert.sources import Source


def _zeros(shape, dtype, sh):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sh)()


_SETTERS: dict[Any, Any] = {}


def _setter(sh):
    if sh not in _SETTERS:
        def set_slice(a, x, idx):
            lead = (1,) * len(idx)
            return jax.lax.dynamic_update_slice(a, x.reshape(lead + x.shape), (*idx, *([0] * x.ndim)))

        _SETTERS[sh] = jax.jit(set_slice, donate_argnums=0, out_shardings=sh)
    return _SETTERS[sh]


def build_params(cfg: ModelConfig, source: Source, dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
                 rules: sharding.ShardingRules | None = None) -> tuple[ModelConfig, dict[str, Any]]:
    """Read every tensor from ``source`` into device arrays laid out as ``params_dict``, slice by slice.

    With a ``mesh`` each parameter is created sharded (logical-axis rules) and each layer / expert slice is
    transferred as its shards only: the host never holds more than one slice. Returns the config with
    ``param_dtype`` set to the dtype of the arrays, and the nested params dict.
    """
    from flax import nnx

    from mistral_jax.model.transformer import abstract_model

    es = keys_lib.entries(cfg)
    if dtype is None:
        dtype = dtype_name(source.dtype(es[0]))
    out_dt = np_dtype(dtype)
    cfg = cfg.replace(param_dtype=dtype)
    if mesh is not None:
        state = nnx.state(abstract_model(cfg), nnx.Param)
        flat_sh = {tuple(map(str, k)): v for k, v in nnx.to_flat_state(
            sharding.state_shardings(state, mesh, rules or sharding.DEFAULT_RULES))}
    by_path: dict[tuple[str, ...], list[keys_lib.Entry]] = {}
    for e in es:
        by_path.setdefault(e.key.path, []).append(e)
    params: dict[str, Any] = {}
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    for path, group in by_path.items():
        sh = flat_sh[path] if mesh is not None else default
        sh = getattr(sh, "value", sh)
        if group[0].index == ():
            arr = jax.device_put(np.asarray(source.read(group[0]), out_dt), sh)
        else:
            arr = _zeros(group[0].param_shape, out_dt, sh)
            n = len(group[0].index)
            slice_sh = (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*tuple(sh.spec)[n:]))
                        if mesh is not None else default)
            set_slice = _setter(sh)
            for e in group:
                x = jax.device_put(np.asarray(source.read(e), out_dt), slice_sh)
                arr = set_slice(arr, x, tuple(np.int32(i) for i in e.index))
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = arr
    return cfg, params
