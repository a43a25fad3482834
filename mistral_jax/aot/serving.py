"""Ahead-of-time proof of fit for serving: compile the server's programs for a TPU topology from any host.

    python -m mistral_jax.aot --config configs/mistral_7b.py --topology v5e-8 --serve --mesh tensor=8 \\
        --max_batch 64 --max_len 32768 --prefix_cache_mb 1024

The programs are the decoding core's jitted steps that ``serve.Engine`` runs, lowered on abstract (sharded)
arguments laid out as the engine lays them out on a mesh, so nothing is read or allocated:

- decode: ``decode.decode_rows_loop`` over all B decode slots (the engine's largest bucket; ``decode.DECODE_BLOCK``
  steps per call, each one token per row, as ``decode.decode_rows`` computes it) over the rolling-buffer cache
  ``[L, B, S, K, H]`` (``decode.new_cache``: S = the sliding window W, else ``max_len``), per-row sampling arrays;
- prefill: ``decode.prefill_rows_batch`` at the engine's largest prefill bucket, one chunk ``[k, C]`` of k prompts
  at once into their rows of that cache (C = the engine's chunk: W, else ``decode.DEFAULT_CHUNK``, capped at S;
  k = ``decode.prefill_batch_limit``: ``decode.PREFILL_TOKENS // C`` at most B).

The weights are sharded by their logical axes (``sharding.state_shardings`` with the mesh's rules), the cache's rows
over the batch axes and its kv heads over ``tensor`` (``KVCache.shardings``), as ``Engine.__init__`` places them.
The prefix cache holds snapshots of single rows (``decode.cache_row``: ``[L, 1, S, K, H]`` k and v and the slots'
positions; a budget holds ``budget // snapshot`` of them, as the engine counts them); one row cannot split over the
batch axes, so a snapshot is split over the kv-head (tensor) ways only and every batch shard holds a copy.

The report gives, per chip: the weights, the KV cache (k and v; the slots' positions apart), the prefix cache, each
program's arguments / outputs / temporaries from ``memory_analysis()``, and the total (the larger program plus the
prefix cache) against the chip's HBM. A mesh that does not divide the model or the decode slots, or weights, cache
and prefix cache beyond HBM before any temporary, is a ``ServingConfigError`` (one line, the values and the fix),
raised before anything compiles. Not compiled: the variants the first request asking for ``logprobs`` compiles
(``prefill_rows_scored``: the chunk's float32 logits ``[1, C, V]``; the decode loop's top-20 alternatives).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from mistral_jax import quant, sharding
from mistral_jax.config import ModelConfig

GiB, MiB = 1024**3, 1024**2

__all__ = ["ServingConfigError", "ServingPlan", "compile_serving", "format_serving_report", "plan_serving"]


class ServingConfigError(ValueError):
    """A serving configuration that cannot work on the topology: a mesh that does not divide the model or the decode
    slots, or weights, cache and prefix-cache budget beyond the chip's HBM (one line with the values and the fix)."""


@dataclasses.dataclass(frozen=True)
class ServingPlan:
    """What ``compile_serving`` compiles, checked without devices (``plan_serving``)."""

    model_cfg: ModelConfig  # for the target platform, at the serving dtype, max_seq_len = max_len
    mesh_sizes: dict[str, int]  # every mesh axis, -1 filled
    rules: sharding.ShardingRules
    rules_name: str
    max_batch: int  # B, decode slots
    cache_slots: int  # S: the window W, else max_len
    chunk: int  # C, the prefill chunk
    prefix_cache_bytes: int  # the budget as the engine counts it (snapshots' global bytes)
    batch_ways: int  # how many ways the cache's rows are split
    kv_ways: int  # how many ways its kv heads are split

    @property
    def row_kv_bytes(self) -> int:
        """Bytes of one rolling-buffer row's k and v (every layer): ``L * S * K * H * 2 * bytes``; an int8 cache
        (``kv_cache_dtype``) adds its float32 per-head scales, ``L * S * K * 2 * 4``."""
        c = self.model_cfg
        if c.kv_cache_dtype == "int8":
            return c.n_layers * self.cache_slots * c.n_kv_heads * 2 * (c.head_dim + 4)
        return c.n_layers * self.cache_slots * c.n_kv_heads * c.head_dim * 2 * jnp.dtype(c.jnp_dtype).itemsize

    @property
    def snapshot_bytes(self) -> int:
        """Bytes of one prefix-cache snapshot as the engine charges it to the budget: the row's k, v and its slots'
        int32 positions."""
        return self.row_kv_bytes + self.cache_slots * 4

    @property
    def snapshot_bytes_per_chip(self) -> int:
        """Bytes of one snapshot on each chip: k and v split over the kv-head ways, positions replicated."""
        return self.row_kv_bytes // self.kv_ways + self.cache_slots * 4

    @property
    def prefix_rows(self) -> int:
        """Snapshots the prefix-cache budget holds."""
        return self.prefix_cache_bytes // self.snapshot_bytes


def _ways(sizes: dict[str, int], axes: Any) -> int:
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(sizes.get(a, 1) for a in axes)


def _rules_name(mesh_cfg: dict[str, Any], sizes: dict[str, int]) -> str:
    """The preset name ``sharding.rules_from_config`` picks (``auto``: by the mesh shape, as it does)."""
    name = mesh_cfg.get("rules", "auto") or "auto"
    if name != "auto":
        return name
    return "fsdp_tp_ep" if sizes["expert"] > 1 else "fsdp_tp" if sizes["tensor"] > 1 else "fsdp"


def plan_serving(model_cfg: ModelConfig, mesh_cfg: dict[str, Any], n_chips: int, *, max_batch: int,
                 max_len: int | None = None, dtype: str = "bfloat16", prefix_cache_mb: float = 1024,
                 chunk_size: int | None = None, platform: str = "tpu") -> ServingPlan:
    """Check a serving configuration against a mesh of ``n_chips`` chips, without devices.

    Args:
      model_cfg: the model (e.g. ``training.run.model_config_of(run_config)``).
      mesh_cfg: mesh axis sizes ``{data, fsdp, tensor, expert}`` (one may be -1 = the rest; missing: 1, ``fsdp``
        -1 as in ``config.mesh``) and optionally ``rules`` (a preset name or ``auto``).
      n_chips: the chips of the topology (one slice).
      max_batch: decode slots B. max_len: positions a request may reach (default the model's ``max_seq_len``);
        the cache holds ``S = W`` slots per row with a sliding window, else ``max_len``.
      dtype: weights and compute (and so the cache) dtype. prefix_cache_mb: the prefix cache's budget in MiB
        (``Engine``'s ``prefix_cache_mb``; 0: off).
      chunk_size: the prefill chunk (default the engine's: W, else ``decode.DEFAULT_CHUNK``; capped at S).
      platform: the target platform of the model's backends.

    Raises:
      ServingConfigError: a bad value, a mesh that does not lay out ``n_chips`` or does not divide the model's
        heads / kv heads / dimensions or the decode slots.
    """
    from mistral_jax.inference.decode import DEFAULT_CHUNK

    if max_batch < 1:
        raise ServingConfigError(f"max_batch={max_batch} must be >= 1. Fix: pass the decode slots, e.g. 64.")
    if max_len is not None and max_len < 1:
        raise ServingConfigError(f"max_len={max_len} must be >= 1. Fix: pass the longest prompt + new tokens a "
                                 "request may reach, e.g. 32768, or omit it (the model's max_seq_len).")
    if prefix_cache_mb < 0:
        raise ServingConfigError(f"prefix_cache_mb={prefix_cache_mb} must be >= 0. Fix: pass 0 for no prefix cache.")
    try:
        cfg = model_cfg.replace(dtype=dtype, param_dtype=dtype, platform=ModelConfig.resolve_platform(platform),
                                **({"max_seq_len": max_len} if max_len else {}))
    except (ValueError, TypeError) as e:
        raise ServingConfigError(f"the model cannot be served as asked: {e}") from None
    mesh_cfg = dict(mesh_cfg)
    try:
        sizes = sharding.mesh_shape(mesh_cfg, n_chips)
    except ValueError as e:
        raise ServingConfigError(str(e)) from None
    rules = sharding.rules_from_config(mesh_cfg, sizes)
    shown = {a: v for a, v in sizes.items() if v > 1} or {"data": 1}
    slots = cfg.sliding_window if cfg.sliding_window is not None else cfg.max_seq_len
    chunk = min(chunk_size or cfg.sliding_window or DEFAULT_CHUNK, slots)
    if chunk < 1:
        raise ServingConfigError(f"chunk_size={chunk_size} must be >= 1. Fix: omit it (the window).")
    batch_ways = _ways(sizes, rules.mesh_axes("batch"))
    kv_ways = _ways(sizes, rules.mesh_axes("act_kv_heads"))
    if max_batch % batch_ways:
        fit = max(batch_ways, max_batch // batch_ways * batch_ways)
        raise ServingConfigError(
            f"max_batch={max_batch} decode slots do not split over the {batch_ways} ways the mesh {shown} shards them "
            f"(the batch axes {rules.mesh_axes('batch')} under rules {_rules_name(mesh_cfg, sizes)}). Fix: pass "
            f"max_batch {fit} (a multiple of {batch_ways}) or a mesh with fewer data / fsdp / expert ways.")
    if cfg.n_kv_heads % kv_ways:
        fit = math.gcd(cfg.n_kv_heads, kv_ways)
        raise ServingConfigError(
            f"the model's {cfg.n_kv_heads} kv heads do not split over the mesh's tensor axis ({kv_ways} ways, mesh "
            f"{shown}): the KV cache shards its kv heads over tensor. Fix: use a tensor size that divides "
            f"{cfg.n_kv_heads} (e.g. tensor={fit}) and put the other chips on data / fsdp.")
    bad = _undivided_weights(cfg, sizes, rules)
    if bad:
        raise ServingConfigError(
            f"the mesh {shown} does not divide the weights (rules {_rules_name(mesh_cfg, sizes)}): "
            f"{'; '.join(bad[:3])}{f' (and {len(bad) - 3} more)' if len(bad) > 3 else ''}. Fix: choose mesh sizes "
            "that divide these dimensions.")
    return ServingPlan(model_cfg=cfg, mesh_sizes=sizes, rules=rules, rules_name=_rules_name(mesh_cfg, sizes),
                       max_batch=max_batch, cache_slots=slots, chunk=chunk,
                       prefix_cache_bytes=int(prefix_cache_mb * MiB), batch_ways=batch_ways, kv_ways=kv_ways)


def _undivided_weights(cfg: ModelConfig, sizes: dict[str, int], rules: sharding.ShardingRules) -> list[str]:
    """The weights whose dimensions the mesh axes of their logical axes do not divide, one phrase each (deduplicated:
    the stacked layers' weights count once)."""
    from flax import nnx

    from mistral_jax.model.transformer import Transformer

    state = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    out: list[str] = []
    for path, var in jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
        for dim, logical in zip(var.shape, sharding.logical_axes_of(var), strict=True):
            ways = _ways(sizes, rules.mesh_axes(logical))
            if dim % ways:
                phrase = f"{logical} {dim} over {ways} ways ({'.'.join(str(getattr(k, 'key', k)) for k in path)})"
                if not any(p.startswith(f"{logical} {dim} ") for p in out):
                    out.append(phrase)
    return out


def _per_chip(x: jax.ShapeDtypeStruct) -> int:
    """Bytes one chip holds of an abstract array carrying its sharding."""
    return math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize


def _abstract(tree: Any, shardings: Any) -> Any:
    """``ShapeDtypeStruct``s of ``tree``'s arrays (an ``nnx.State``'s variables, or a pytree of arrays) carrying
    ``shardings`` (the same structure, a ``NamedSharding`` for each array)."""
    from flax import nnx

    def put(x: Any, s: NamedSharding) -> Any:
        if isinstance(x, nnx.Variable):
            return x.replace(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s))
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    return jax.tree.map(put, tree, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))


def compile_serving(plan: ServingPlan, devices: list[Any], hbm_bytes: int | None = None,
                    quantize: str | None = None) -> dict[str, Any]:
    """Lower and compile the server's decode loop and prefill chunk for ``plan`` on ``devices`` (compile-only TPU
    topology devices: ``aot.topology_devices``); nothing is allocated. ``quantize="int8"``: the weights as
    ``mistral-jax-serve --quantize int8`` holds them (``quant.quantize_weights``: int8 with per-channel scales).

    Checks the memory the weights, the cache and the prefix-cache budget take per chip against ``hbm_bytes`` first
    (a ``ServingConfigError`` when they alone exceed it), then compiles.

    Returns:
      bytes per chip: ``weights``, ``kv_cache`` (k and v), ``cache_positions``, ``prefix_cache``; the prefix cache's
      ``prefix_cache_budget``, ``prefix_cache_rows`` and ``snapshot_bytes`` (one row, all chips, as the engine
      counts it) and ``prefix_ways`` (the chips one snapshot is split over); ``decode`` and ``prefill``: each program's
      ``aot.memory_report`` (arguments, outputs, aliased, temps, code, total; a compiler out-of-memory error becomes
      a "does not fit" report) plus ``compile_s``; ``total`` (the larger program's total + the prefix cache),
      ``hbm`` and ``fits``; and the configuration (model shape, mesh, rules, B, S, C, dtype, backends, devices).
    """
    from flax import nnx

    from mistral_jax.aot import _oom_report, memory_report
    from mistral_jax.inference.decode import (
        DECODE_BLOCK,
        decode_rows_loop_jit,
        prefill_batch_limit,
        prefill_rows_batch_jit,
    )
    from mistral_jax.model.kv_cache import KVCache
    from mistral_jax.model.transformer import Transformer, count_params

    cfg, b, s, c = plan.model_cfg, plan.max_batch, plan.cache_slots, plan.chunk
    if len(devices) != math.prod(plan.mesh_sizes.values()):
        raise ServingConfigError(f"the plan's mesh {plan.mesh_sizes} needs {math.prod(plan.mesh_sizes.values())} "
                                 f"chips but {len(devices)} devices were given. Fix: plan for len(devices) chips.")
    mesh = sharding.make_mesh(**plan.mesh_sizes, devices=devices)
    rules = plan.rules
    def build():
        model = Transformer(cfg, rngs=nnx.Rngs(0), mesh=mesh, rules=rules)
        return quant.quantize_weights(model, quantize) if quantize else model

    graphdef, state = nnx.split(nnx.eval_shape(build))
    state = _abstract(state, sharding.state_shardings(state, mesh, rules))
    abstract_cache = jax.eval_shape(lambda: KVCache.init(cfg, b, s))
    cache = _abstract(abstract_cache, abstract_cache.shardings(mesh, rules))
    weights = sum(_per_chip(x) for x in jax.tree.leaves(state))
    kv = sum(_per_chip(x) for x in (cache.k, cache.v, cache.k_scale, cache.v_scale) if x is not None)  # int8: scales
    positions = _per_chip(cache.pos)
    prefix = plan.prefix_rows * plan.snapshot_bytes_per_chip
    report: dict[str, Any] = dict(
        weights=weights, kv_cache=kv, cache_positions=positions, prefix_cache=prefix,
        prefix_cache_budget=plan.prefix_cache_bytes, prefix_cache_rows=plan.prefix_rows,
        snapshot_bytes=plan.snapshot_bytes, prefix_ways=plan.kv_ways,
        params=count_params(cfg), n_layers=cfg.n_layers, n_kv_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, sliding_window=cfg.sliding_window, max_len=cfg.max_seq_len, max_batch=b,
        quantize=quantize, kv_cache_dtype=cfg.kv_cache_dtype,
        cache_slots=s, chunk=c, prefill_rows=prefill_batch_limit(b, c), dtype=cfg.dtype,
        attention_impl=cfg.attention_impl, moe_impl=cfg.moe_impl,
        platform=cfg.platform, mesh={k: int(v) for k, v in mesh.shape.items()}, rules=plan.rules_name,
        devices=mesh.size, hbm=hbm_bytes)
    static = weights + kv + positions + prefix
    if hbm_bytes is not None and static > hbm_bytes:
        row = plan.row_kv_bytes / (plan.batch_ways * plan.kv_ways)  # one decode slot's k and v per chip
        most = int((hbm_bytes - weights - prefix) // row) // plan.batch_ways * plan.batch_ways
        raise ServingConfigError(
            f"weights {weights / GiB:.2f} GiB + KV cache {kv / GiB:.2f} GiB ({b} rows x {s} slots) + prefix cache "
            f"{prefix / GiB:.2f} GiB = {static / GiB:.2f} GiB per chip before any temporary, over the "
            f"{hbm_bytes / GiB:.0f} GiB of HBM of each of the {mesh.size} chips (mesh {report['mesh']}). Fix: lower "
            f"max_batch (a row is {row / MiB:.1f} MiB per chip: "
            + (f"at most {most} fit before temporaries)" if most > 0 else "not even one fits)")
            + (", lower max_len" if cfg.sliding_window is None else "")
            + (", lower the prefix-cache budget" if prefix else "") + " or use more chips.")

    replicated = NamedSharding(mesh, PartitionSpec())

    def arg(shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:  # host inputs: numpy, replicated
        return jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)

    def settings(n: int) -> dict[str, Any]:  # Engine._sampling: per-row settings [n], traced
        return dict(temperature=arg((n,), jnp.float32), top_k=arg((n,), jnp.int32), top_p=arg((n,), jnp.float32))

    k = prefill_batch_limit(b, c)  # prompts per batched prefill call, as the engine's largest prefill bucket
    per_row = [arg((b,), jnp.int32) for _ in range(6)]  # last tokens, positions, seeds, steps, budgets, eos ids
    programs = {  # as Engine._decode_call and Engine._prefill call them (the largest buckets); layers: stacked
        "decode": lambda: decode_rows_loop_jit.lower(graphdef, state, cache, *per_row, arg((), jnp.int32), rows=b,
                                                     block=DECODE_BLOCK, layers=None, logprobs=False, **settings(b)),
        "prefill": lambda: prefill_rows_batch_jit.lower(
            graphdef, state, cache, arg((k, c), jnp.int32), arg((k, c), jnp.int32), arg((k,), jnp.int32),
            arg((k,), jnp.bool_), (arg((k,), jnp.int32), arg((k,), jnp.int32)), layers=None, **settings(k)),
    }
    with sharding.use_mesh(mesh, rules):
        for name, lower in programs.items():
            t0 = time.perf_counter()
            try:
                r = memory_report(lower().compile(), hbm_bytes)
            except Exception as e:  # noqa: BLE001 - the TPU compiler refuses programs that exceed HBM
                r = _oom_report(e)
            r["compile_s"] = round(time.perf_counter() - t0, 1)
            report[name] = r
    report["total"] = max(report["decode"]["total"], report["prefill"]["total"]) + prefix
    report["fits"] = None if hbm_bytes is None else (report["total"] <= hbm_bytes
                                                     and report["decode"]["fits"] is not False
                                                     and report["prefill"]["fits"] is not False)
    return report


def format_serving_report(r: dict[str, Any], title: str) -> str:
    """``compile_serving``'s report as text: one line per topic under ``title``."""
    from mistral_jax.aot.hlo import size

    def gib(x: float) -> str:
        return f"{x / GiB:8.2f} GiB"

    window = (f"S = window {r['sliding_window']}; max_len {r['max_len']}" if r["sliding_window"] is not None
              else f"no window: S = max_len {r['max_len']}")
    lines = [title,
             f"  mesh {r['mesh']} ({r['devices']} chips), rules {r['rules']}, dtype {r['dtype']}"
             + (f", weights {r['quantize']}" if r.get("quantize") else "")
             + (f", KV cache {r['kv_cache_dtype']}" if r.get("kv_cache_dtype", "auto") != "auto" else "")
             + ", attention "
             f"{r['attention_impl']}, moe {r['moe_impl']} (for {r['platform']}); {r['params']:,} parameters",
             f"  {r['max_batch']} decode slots x {r['cache_slots']} cache slots ({window}), "
             f"prefill chunk [{r['prefill_rows']}, {r['chunk']}]",
             f"  per chip: weights {gib(r['weights'])}  KV cache {gib(r['kv_cache'])}  (slot positions "
             f"{size(r['cache_positions'])})",
             f"  prefix cache: {size(r['prefix_cache_budget'])} holds {r['prefix_cache_rows']} row snapshot(s) of "
             f"{size(r['snapshot_bytes'])}, each split {r['prefix_ways']} ways (a copy per batch shard); per chip "
             f"{gib(r['prefix_cache'])}"]
    for name, what in (("decode", f"decode loop [{r['max_batch']}]"),
                       ("prefill", f"prefill chunk [{r['prefill_rows']}, {r['chunk']}]")):
        p = r[name]
        lines.append(f"  {what}: arguments {gib(p['arguments'])}  outputs {gib(p['outputs'])}  aliased "
                     f"{gib(p['aliased'])}  temps {gib(p['temps'])}  total {gib(p['total'])}  (compiled in "
                     f"{p['compile_s']} s)")
        if "compiler_error" in p:
            lines.append(f"    compiler: {p['compiler_error']} (temps alone; arguments not counted)")
    hbm = "" if r["hbm"] is None else f" of HBM {gib(r['hbm'])} -> " + ("FITS" if r["fits"] else "DOES NOT FIT")
    lines.append(f"  per chip: total {gib(r['total'])} (the larger program + prefix cache){hbm}")
    return "\n".join(lines)
