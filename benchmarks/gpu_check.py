"""The GPU check's pieces (``scripts/gpu_check.sh`` runs them): one JSON line per figure, each with a ``figure`` key
and a pass field ``ok``.

    python benchmarks/gpu_check.py --piece parity|attention|moe|train|decode [--dry]
    python benchmarks/gpu_check.py --probe            # exit 2 with one line when JAX sees no CUDA GPU
    python benchmarks/gpu_check.py --summarize FILE [--expect PIECES]   # the summary line of a file of JSON lines

Pieces (on the first GPU; ``--dry``: tiny shapes on the CPU, so CI keeps every piece running):
  * ``parity``: logits of the tiny random Mistral and Mixtral on the device in float32 (matmul precision
    ``highest``) and bfloat16 compute, with the backends the registry picks for the device, vs the CPU float32
    oracle in the same process (``jax.devices("cpu")``; reference attention, dense MoE).
  * ``attention``: the attention backend the registry picks for the GPU (cuDNN's fused sliding-window attention;
    ``--dry``: the CPU's, blocked) vs the XLA reference, bfloat16, forward and gradients against a float32
    reference, and times of both. Mistral 7B's heads (32 / 8 of 128), T = 8192, W = 4096.
  * ``moe``: the dropless MoE (``ragged``; the GPU's expert MLP is ``ragged_dot``, the CPU's ``looped``) vs the
    dense oracle, bfloat16, forward and gradients against the float32 dense oracle, and times of both. One Mixtral
    8x7B layer's experts on 4096 tokens.
  * ``train``: the train step of ``benchmarks/train_throughput.py`` on 2 layers of Mistral 7B's width (bfloat16
    compute, float32 weights and AdamW), batch 4 x 2048: tokens/s and MFU (``flops.flops_per_token`` over the
    ``flops.CHIPS`` datasheet peak of the device). ``--dry``: the tiny model in float32, MFU against the measured
    float32 matmul peak of the CPU (``peak_source`` says which peak).
  * ``decode``: ``benchmarks/decode.py``'s comparison with HF transformers' ``generate`` on the same GPU
    (torch ``cuda``), bfloat16 weights, batch 1 and 8. ``--dry``: float32 on the CPU, where every greedy token
    must agree with HF's.

Errors are relative: max |error| / max |reference| (``rel_err``; gradients: the worst weight or input). A logits
figure passes at ``tol``: 1e-4 for float32, ``BF16_TOL`` for bfloat16 (8-bit mantissa). The kernels (attention, MoE)
are compared in bfloat16 with a float32 oracle, beside their XLA peer in bfloat16: they pass within ``bound`` =
max(``BF16_TOL``, twice the peer's own error), i.e. no worse than XLA's bfloat16 by more than 2x. A time figure
passes when every time is finite and positive (speedups are data, not pass marks).
Exit status: 0, 1 when a figure failed (its line says why), 2 without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _timing, decode, train_throughput
sys.path.insert(0, ROOT)

PIECES = ("parity", "attention", "moe", "train", "decode")
F32_TOL = 1e-4  # the project's float32 parity bound (logits vs HF transformers, docs)
BF16_TOL = 3e-2  # bfloat16 has 8 mantissa bits (relative spacing 2^-8 = 0.004); errors add up over layers


def emit(figure: str, **fields) -> dict:
    """Print one JSON line ``{"figure": figure, **fields}`` (floats rounded to 6 significant digits)."""
    line = {"figure": figure, **{k: _plain(v) for k, v in fields.items()}}
    print(json.dumps(line), flush=True)
    return line


def _plain(v):
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:  # numpy / jax scalars
        v = v.item()
    if isinstance(v, float):
        return float(f"{v:.6g}") if math.isfinite(v) else v
    return v


def _error(e: BaseException) -> str:
    """One line: the exception's type and the first line of its message (the type alone when it has none)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}"[:400] if lines else type(e).__name__


# ------------------------------------------------------------------------------------------------- the probe
def probe() -> int:
    """Print ``gpu <device kind> x <count>`` and return 0 if JAX sees a CUDA GPU; else print the one-line reason
    and the fix, and return 2. Imports jax only."""
    try:
        import jax

        devices = jax.devices()
    except Exception as e:  # e.g. JAX_PLATFORMS=cuda without a GPU
        devices, why = [], f"jax.devices() raised {_error(e)}"
    else:
        why = ""
    gpus = [d for d in devices if d.platform == "gpu"]
    if gpus:
        print(f"gpu {gpus[0].device_kind} x {len(gpus)}")
        return 0
    shown = ", ".join(map(repr, devices[:2])) + (f", ... ({len(devices)} devices)" if len(devices) > 2 else "")
    plugin = next((n for n in ("jax_cuda13_plugin", "jax_cuda12_plugin") if importlib.util.find_spec(n)), None)
    version = jax.__version__ if "jax" in sys.modules else "<your jax>"
    fixes = []
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms and not {"cuda", "gpu"} & set(platforms.split(",")):
        fixes.append(f"unset JAX_PLATFORMS (it is {platforms!r}, which hides GPUs)")
    if plugin:
        fixes.append(f"JAX's CUDA plugin ({plugin}) is installed: run on a machine with an NVIDIA GPU and check its "
                     "driver (nvidia-smi)")
    else:
        fixes.append("run on a machine with an NVIDIA GPU and install JAX's CUDA plugin: "
                     f"pip install \"jax[cuda12]=={version}\" (pyproject.toml has no cuda extra)")
    fix = "; ".join(fixes)
    print(f"gpu_check: no CUDA GPU visible to JAX ({why or f'jax.devices() = [{shown}]'}). "
          f"Fix: {fix}; `bash scripts/gpu_check.sh --dry` runs the pieces on the CPU.")
    return 2


# ------------------------------------------------------------------------------------------------- shared
def _device(dry: bool):
    """(the device the pieces measure, its ``ModelConfig.platform``)."""
    import jax

    if dry:
        return jax.devices("cpu")[0], "cpu"
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if not gpus:
        raise RuntimeError("no GPU: run `python benchmarks/gpu_check.py --probe` for the fix, or pass --dry")
    return gpus[0], "gpu"


def _rel_err(a, b) -> tuple[float, float]:
    """(max |a - b|, that / max |b|) in float64."""
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = float(np.max(np.abs(a - b))) if a.size else 0.0
    return err, err / max(float(np.max(np.abs(b))) if b.size else 0.0, 1e-30)


def _tree_rel_err(a, b) -> float:
    """The worst ``_rel_err`` over the leaves of two pytrees of the same structure."""
    import jax

    return max(_rel_err(x, y)[1] for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _tol(dtype: str) -> float:
    return F32_TOL if dtype == "float32" else BF16_TOL


def _bound(candidate: tuple[float, float], peer: tuple[float, float]) -> tuple[tuple[float, float], bool]:
    """((output, gradient) error bounds of a bfloat16 kernel whose XLA peer has errors ``peer``, whether the
    kernel's errors ``candidate`` are within them)."""
    bound = max(BF16_TOL, 2 * peer[0]), max(BF16_TOL, 2 * peer[1])
    return bound, candidate[0] <= bound[0] and candidate[1] <= bound[1]


def _precision(dtype: str):
    """float32 runs at matmul precision ``highest`` (on GPUs the default is TF32's 10-bit mantissa)."""
    import jax

    return jax.default_matmul_precision("highest") if dtype == "float32" else contextlib.nullcontext()


def _time_pair(fwd, fwd_bwd, args, repeats: int) -> dict:
    from _timing import median_seconds

    return {"fwd_s": median_seconds(fwd, *args, repeats=repeats),
            "fwd_bwd_s": median_seconds(fwd_bwd, *args, repeats=repeats)}


def _times_ok(times: dict) -> bool:
    """Every median time measured: finite and positive (a time figure passes on that alone; speedups are data)."""
    return all(math.isfinite(t) and t > 0 for pair in times.values() for t in pair.values())


# ------------------------------------------------------------------------------------------------- a. parity
def parity(dry: bool) -> bool:
    """Logits of the tiny random Mistral / Mixtral on the device (float32, bfloat16; the backends the registry picks
    for it) vs the CPU float32 oracle (reference attention, dense MoE): on ``--dry`` the blocked attention and the
    CPU's dropless MoE against those oracles in the whole model."""
    import jax
    import numpy as np
    from flax import nnx

    import mistral_jax as mj
    from mistral_jax.model import backends
    from mistral_jax.model.attention import self_attention_backend

    dev, platform = _device(dry)
    cpu = jax.devices("cpu")[0]
    seq = 64 if dry else 256
    ok = True
    for name, base in (("mistral", mj.ModelConfig.tiny()), ("mixtral", mj.ModelConfig.tiny_mixtral())):
        tokens = np.random.default_rng(0).integers(3, base.vocab_size, (2, seq)).astype(np.int32)
        oracle = base.replace(platform="cpu", attention_impl="reference", moe_impl="dense")
        ref_model = mj.Transformer(oracle, rngs=nnx.Rngs(0))
        _, state = nnx.split(ref_model)
        state_cpu = jax.device_put(state, cpu)

        def logits(graphdef, state, tokens):
            return nnx.merge(graphdef, state)(tokens)

        fwd = jax.jit(logits, static_argnums=0)
        with _precision("float32"):
            ref = np.asarray(fwd(nnx.graphdef(ref_model), state_cpu, jax.device_put(tokens, cpu)))
        for dtype in ("float32", "bfloat16"):
            cfg = base.replace(dtype=dtype, platform=platform)
            bk = backends.resolve(cfg)
            info = dict(model=name, dtype=dtype, dry=dry, device=dev.device_kind,
                        reference="cpu float32, reference attention" + (", dense MoE" if cfg.is_moe else ""),
                        batch=2, seq=seq, attention=self_attention_backend(cfg, bk, seq, False),
                        moe=f"{bk.moe} ({bk.expert_mlp})" if cfg.is_moe else None, tol=_tol(dtype))
            try:
                graphdef = nnx.graphdef(nnx.eval_shape(lambda cfg=cfg: mj.Transformer(cfg, rngs=nnx.Rngs(0))))
                with _precision(dtype):
                    out = np.asarray(fwd(graphdef, jax.device_put(state, dev), jax.device_put(tokens, dev)))
                max_abs, rel = _rel_err(out, ref)
                agree = float(np.mean(out.argmax(-1) == ref.argmax(-1)))
                line_ok = bool(np.all(np.isfinite(out)) and rel <= info["tol"])
                emit("parity", **info, max_abs_err=max_abs, rel_err=rel, argmax_agree=agree, ok=line_ok)
            except Exception as e:  # one dtype's failure (e.g. a kernel refusing float32) keeps the other's line
                line_ok = False
                emit("parity", **info, ok=False, error=_error(e))
            ok &= line_ok
    return ok


# ------------------------------------------------------------------------------------------------- b. attention
def attention(dry: bool) -> bool:
    """The registry's attention backend for the device vs the reference: outputs, gradients, times."""
    import jax
    import jax.numpy as jnp

    import mistral_jax as mj
    from mistral_jax.model import attention as attn
    from mistral_jax.model.backends import ATTENTION, choose_attention

    dev, platform = _device(dry)
    if dry:
        cfg, batch, seq, repeats = mj.ModelConfig.tiny(), 1, 64, 2
    else:
        cfg, batch, seq, repeats = mj.ModelConfig.mistral_7b_v01(), 1, 8192, 5
    window, block = cfg.sliding_window, attn.band_block(cfg)
    name = choose_attention("auto", platform=platform, self_attention=True, seq_len=seq, window=window, block=block,
                            has_segments=False)
    label = f"{name} (dry: cudnn needs a GPU)" if dry else name
    keys = jax.random.split(jax.random.key(0), 4)
    with jax.default_device(dev):
        q = jax.random.normal(keys[0], (batch, seq, cfg.n_heads, cfg.head_dim), jnp.float32)
        k, v = (jax.random.normal(kk, (batch, seq, cfg.n_kv_heads, cfg.head_dim), jnp.float32) for kk in keys[1:3])
        ct = jax.random.normal(keys[3], q.shape, jnp.float32)  # the cotangent of the output
        pos = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))

    def run(backend):
        def fwd(q, k, v):
            return ATTENTION[backend].fn(q, k, v, pos, None, window=window, block=block, backends=None)

        def loss(q, k, v):
            return jnp.sum(fwd(q, k, v).astype(jnp.float32) * ct)

        return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    bf16 = tuple(x.astype(jnp.bfloat16) for x in (q, k, v))
    ref_fwd, ref_grad = run("reference")
    with _precision("float32"):
        oracle = (ref_fwd(q, k, v), ref_grad(q, k, v))
    errs = {}
    for backend in dict.fromkeys([name, "reference"]):
        fwd, grad = run(backend)
        out, grads = fwd(*bf16), grad(*bf16)
        errs[backend] = (_rel_err(out, oracle[0])[1], _tree_rel_err(grads, oracle[1]))
    bound, ok = _bound(errs[name], errs["reference"])
    ok = ok and (dry or name == "cudnn")
    shapes = dict(batch=batch, seq=seq, heads=cfg.n_heads, kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                  window=window, dtype="bfloat16")
    emit("attention_parity", backend=label, peer="reference", dry=dry, device=dev.device_kind, **shapes,
         oracle="reference float32", out_rel_err=errs[name][0], grad_rel_err=errs[name][1],
         reference_out_rel_err=errs["reference"][0], reference_grad_rel_err=errs["reference"][1],
         out_bound=bound[0], grad_bound=bound[1], ok=ok,
         **({} if dry or name == "cudnn" else {"error": f"the registry picked {name!r} for the GPU, not cudnn"}))

    times = {b: _time_pair(*run(b), bf16, repeats) for b in dict.fromkeys([name, "blocked", "reference"])}
    emit("attention_time", backend=label, peer="reference", dry=dry, device=dev.device_kind, **shapes,
         repeats=repeats, times=times,
         speedup_fwd=times["reference"]["fwd_s"] / times[name]["fwd_s"],
         speedup_fwd_bwd=times["reference"]["fwd_bwd_s"] / times[name]["fwd_bwd_s"], ok=_times_ok(times))
    return ok and _times_ok(times)


# ------------------------------------------------------------------------------------------------- c. MoE
def moe(dry: bool) -> bool:
    """The dropless MoE with the device's expert MLP vs the dense oracle: outputs, gradients, times."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import mistral_jax as mj
    from mistral_jax.model import backends
    from mistral_jax.model.moe import MoE

    dev, platform = _device(dry)
    if dry:
        base, tokens, repeats = mj.ModelConfig.tiny_mixtral(), 64, 2
    else:
        base, tokens, repeats = mj.ModelConfig.mixtral_8x7b(), 4096, 5
    base = base.replace(platform=platform)
    with jax.default_device(dev):
        x = jax.random.normal(jax.random.key(1), (1, tokens, base.dim), jnp.float32)
        ct = jax.random.normal(jax.random.key(2), x.shape, jnp.float32)
        _, state = nnx.split(MoE(base.replace(moe_impl="dense"), rngs=nnx.Rngs(0)))

    def run(cfg):
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: MoE(cfg, rngs=nnx.Rngs(0))))

        def fwd(state, x):
            return nnx.merge(graphdef, state)(x.astype(cfg.jnp_dtype))[0]

        def loss(state, x):
            return jnp.sum(fwd(state, x).astype(jnp.float32) * ct)

        return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1)))

    candidate = base.replace(dtype="bfloat16", moe_impl="ragged")
    bk = backends.resolve(candidate)
    label = f"{bk.moe} ({bk.expert_mlp})" + (" (dry: ragged_dot runs on the GPU)" if dry else "")
    fwd, grad = run(base.replace(dtype="float32", moe_impl="dense"))
    with _precision("float32"):
        oracle = (fwd(state, x), grad(state, x))
    errs, fns = {}, {}
    for key, cfg in (("candidate", candidate), ("dense", candidate.replace(moe_impl="dense"))):
        fns[key] = run(cfg)
        errs[key] = (_rel_err(fns[key][0](state, x), oracle[0])[1], _tree_rel_err(fns[key][1](state, x), oracle[1]))
    bound, ok = _bound(errs["candidate"], errs["dense"])
    ok = ok and (dry or bk.expert_mlp == "ragged_dot")
    shapes = dict(tokens=tokens, dim=base.dim, hidden=base.hidden_dim, experts=base.num_experts,
                  top_k=base.num_experts_per_tok, dtype="bfloat16")
    emit("moe_parity", backend=label, peer="dense", dry=dry, device=dev.device_kind, **shapes,
         oracle="dense float32", out_rel_err=errs["candidate"][0], grad_rel_err=errs["candidate"][1],
         dense_out_rel_err=errs["dense"][0], dense_grad_rel_err=errs["dense"][1], out_bound=bound[0],
         grad_bound=bound[1], ok=ok)
    times = {key: _time_pair(*fns[key], (state, x), repeats) for key in fns}
    emit("moe_time", backend=label, peer="dense", dry=dry, device=dev.device_kind, **shapes, repeats=repeats,
         times={"ragged": times["candidate"], "dense": times["dense"]},
         speedup_fwd=times["dense"]["fwd_s"] / times["candidate"]["fwd_s"],
         speedup_fwd_bwd=times["dense"]["fwd_bwd_s"] / times["candidate"]["fwd_bwd_s"], ok=_times_ok(times))
    return ok and _times_ok(times)


# ------------------------------------------------------------------------------------------------- d. train step
def train(dry: bool) -> bool:
    """Tokens/s and MFU of the train step on 2 layers of Mistral 7B's width (dry: the tiny model).

    MFU = tokens/s x ``flops.flops_per_token`` / ``flops.peak_flops`` of the device: on a GPU the dense bfloat16
    datasheet peak of ``flops.CHIPS`` (compute in bfloat16 against it); on ``--dry`` the CPU has no datasheet
    row, so the step computes in float32 and its MFU is against the measured float32 matmul peak of this CPU
    (``flops.measured_matmul_peak``, what training's MFU uses on a CPU), which ``peak_source`` says. The batch has
    segment ids, as every training batch does: ``attention`` is the backend the step runs with them.
    """
    import statistics

    import numpy as np
    import train_throughput

    import mistral_jax as mj
    from mistral_jax import flops
    from mistral_jax.model import backends
    from mistral_jax.model.attention import self_attention_backend

    dev, platform = _device(dry)
    if dry:
        cfg, batch, seq, steps, warmup = mj.ModelConfig.tiny(dtype="float32"), 2, 64, 3, 1
    else:
        cfg = mj.ModelConfig.mistral_7b_v01(n_layers=2, dtype="bfloat16", max_seq_len=2048)
        batch, seq, steps, warmup = 4, 2048, 8, 2
    peak, how = flops.peak_flops(devices=[dev])
    if dry:
        how += " (dry: no datasheet peak for a CPU; the step computes in float32 to match it)"
    attention = self_attention_backend(cfg, backends.resolve(cfg.replace(platform=platform)), seq, True)
    times, loss = train_throughput.jax_step_times(cfg, train_throughput.batch_arrays(batch, seq, cfg.vocab_size),
                                                  steps, warmup, devices=[dev])
    step_s = statistics.median(times)
    tps = batch * seq / step_s
    fpt = flops.flops_per_token(cfg, seq)
    mfu = tps * fpt / peak if peak > 0 else None
    uniform = math.log(cfg.vocab_size)  # the loss of a uniform guess: a random model starts near it
    checks = {"loss is finite and below 2 x ln(vocab)": bool(np.isfinite(loss)) and loss < 2 * uniform,
              "tokens/s is positive": math.isfinite(tps) and tps > 0,
              "MFU is in (0, 1] (a known peak)": mfu is not None and 0 < mfu <= 1}
    failed = [k for k, v in checks.items() if not v]
    emit("train_step", dry=dry, device=dev.device_kind, model="tiny" if dry else "mistral_7b_v01 width, 2 layers",
         n_layers=cfg.n_layers, dim=cfg.dim, params=mj.count_params(cfg), batch=batch, seq=seq, dtype=cfg.dtype,
         param_dtype=cfg.param_dtype, attention=attention, steps=steps, warmup=warmup, step_s=step_s,
         tokens_per_s=tps, flops_per_token=fpt, peak_flops=peak, peak_source=how, mfu=mfu, loss=loss,
         loss_uniform=uniform, ok=not failed, **({"error": "failed: " + "; ".join(failed)} if failed else {}))
    return not failed


# ------------------------------------------------------------------------------------------------- e. decode
def decode(dry: bool) -> bool:
    """benchmarks/decode.py's comparison with HF transformers on the same device.

    A figure passes when every tokens/s is positive and, in float32 (``--dry``), every greedy token agrees with
    HF's. In bfloat16 (the GPU) the agreement is reported only: the two sides round differently, and a random
    model's top two logits are close enough that greedy paths part after the first flipped token; the logits'
    bfloat16 parity is the ``parity`` piece's.
    """
    import decode as bench
    import jax
    import torch
    from flax import nnx

    import mistral_jax as mj

    dev, _ = _device(dry)
    if dry:  # 32 new tokens: HF's decode time is a difference of two generate calls, which must not drown in noise
        cfg, torch_device, sizes, prompt_len, new_tokens, repeats = mj.ModelConfig.tiny(), "cpu", [1], 32, 32, 3
    else:
        if not torch.cuda.is_available():
            raise RuntimeError(f"torch {torch.__version__} sees no CUDA device. Fix: install a CUDA build of torch "
                               "(pip install torch from the CUDA wheel index) for HF transformers on the GPU")
        cfg = bench.CONFIG.replace(dtype="bfloat16", param_dtype="bfloat16")
        torch_device, sizes, prompt_len, new_tokens, repeats = "cuda", [1, 8], 384, 128, 3
    agree_needed = 1.0 if cfg.dtype == "float32" else None
    with jax.default_device(dev):
        model = mj.Transformer(cfg, rngs=nnx.Rngs(0))
        hf = bench.load_hf(model, torch_device)
        rows = bench.compare(model, hf, sizes, prompt_len, new_tokens, repeats)
    ok = True
    for row in rows:
        rates = [v for k, v in row.items() if k.endswith("_tok_s")]
        failed = [] if all(math.isfinite(r) and r > 0 for r in rates) else ["a tokens/s is not positive"]
        if agree_needed is not None and row["greedy_tokens_agree"] < agree_needed:
            failed.append(f"greedy tokens agree {row['greedy_tokens_agree']:.3g} < {agree_needed}")
        emit("decode", dry=dry, device=dev.device_kind, torch_device=torch_device, torch=torch.__version__,
             params=mj.count_params(cfg), dtype=cfg.dtype, prompt_len=prompt_len, new_tokens=new_tokens,
             repeats=repeats, **row, agree_needed=agree_needed, ok=not failed,
             **({"error": "; ".join(failed)} if failed else {}))
        ok &= not failed
    return ok


# ------------------------------------------------------------------------------------------------- summary
# The figures each piece prints (at least one line of each): a piece that printed fewer has failed.
FIGURES = {"parity": ("parity",), "attention": ("attention_parity", "attention_time"),
           "moe": ("moe_parity", "moe_time"), "train": ("train_step",), "decode": ("decode",)}


def summarize(path: str, expect: str = "") -> int:
    """Print the summary JSON line of the JSON lines in ``path`` and a readable table on stderr; 0 if every
    figure passed (``ok`` true) and every figure of the pieces in ``expect`` (comma-separated) is there, else 1."""
    lines = []
    with open(path) as f:
        for raw in f:
            if raw.startswith("{"):
                lines.append(json.loads(raw))
    failed = [_label(x) for x in lines if x.get("ok") is not True]
    pieces = [p for p in expect.split(",") if p]
    seen = {x.get("figure") for x in lines}
    missing = [fig for p in pieces for fig in FIGURES[p] if fig not in seen]
    for x in lines:
        print(f"  {'ok  ' if x.get('ok') is True else 'FAIL'} {_label(x)}: {_headline(x)}", file=sys.stderr)
    for fig in missing:
        print(f"  FAIL {fig}: missing (its piece printed no such line)", file=sys.stderr)
    ok = bool(lines) and not failed and not missing
    emit("summary", figures=len(lines), failed=failed, missing=missing, pieces=pieces,
         dry=any(x.get("dry") for x in lines), device=next((x["device"] for x in lines if "device" in x), None), ok=ok)
    return 0 if ok else 1


def _label(x: dict) -> str:
    extra = [str(x[k]) for k in ("model", "dtype", "batch") if k in x and x.get("figure") in ("parity", "decode")]
    return " ".join([str(x.get("figure")), *extra])


def _headline(x: dict) -> str:
    """One readable line of a figure; a field it lacks reads ``None`` (a malformed line must not stop the summary)."""
    def g(k):
        v = x.get(k)
        return f"{v:.3g}" if isinstance(v, int | float) and not isinstance(v, bool) else str(v)

    if "error" in x:
        return str(x["error"])
    fig, peer = str(x.get("figure")), str(x.get("peer"))
    if fig == "parity":
        return f"rel err {g('rel_err')} (tol {g('tol')}), argmax agree {g('argmax_agree')}"
    if fig.endswith("_parity"):
        return (f"{g('backend')} vs {g('oracle')}: out {g('out_rel_err')} (bound {g('out_bound')}), grad "
                f"{g('grad_rel_err')} (bound {g('grad_bound')}); {peer} bfloat16: {g(peer + '_out_rel_err')}"
                f" / {g(peer + '_grad_rel_err')}")
    if fig.endswith("_time"):
        return f"{g('backend')} is {g('speedup_fwd')}x / {g('speedup_fwd_bwd')}x {peer} (fwd / fwd+bwd)"
    if fig == "train_step":
        return f"{g('tokens_per_s')} tokens/s, MFU {g('mfu')} ({g('peak_source')}), attention {g('attention')}"
    if fig == "decode":
        return (f"decode {g('ours_decode_tok_s')} vs HF {g('hf_decode_tok_s')} tokens/s ({g('decode_ratio')}x), "
                f"prefill {g('prefill_ratio')}x, greedy tokens agree {g('greedy_tokens_agree')}")
    return ""


def failure(piece: str, rc: int, limit: int, stderr: str, log: str, dry: bool) -> None:
    """The JSON line of a piece that died without reporting (a timeout, a crash): its exit status and the last
    line it wrote on stderr (file ``stderr``; all of it is in ``log``)."""
    why = f"timed out after {limit} s" if rc in (124, 137) else f"exit status {rc}"
    tail = ""
    with contextlib.suppress(OSError):
        with open(stderr, errors="replace") as f:
            rows = [r.strip() for r in f if r.strip()]
        tail = rows[-1][:300] if rows else ""
    emit(piece, dry=dry, ok=False, error=f"{piece} {why}" + (f": {tail}" if tail else "") + f" (log: {log})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--piece", choices=PIECES)
    ap.add_argument("--dry", action="store_true", help="tiny shapes on the CPU")
    ap.add_argument("--probe", action="store_true", help="exit 2 with one line when JAX sees no CUDA GPU")
    ap.add_argument("--summarize", metavar="FILE", help="print the summary line of a file of JSON lines")
    ap.add_argument("--expect", default="", metavar="PIECES",
                    help="with --summarize: the pieces that ran (comma-separated); a figure of theirs missing fails")
    ap.add_argument("--failure", nargs=5, metavar=("PIECE", "RC", "LIMIT", "STDERR", "LOG"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe:
        return probe()
    if args.summarize:
        bad = [p for p in args.expect.split(",") if p and p not in FIGURES]
        if bad:
            ap.error(f"--expect: unknown pieces {bad}; pick from {','.join(PIECES)}")
        return summarize(args.summarize, args.expect)
    if args.failure:
        piece, rc, limit, stderr, log = args.failure
        failure(piece, int(rc), int(limit), stderr, log, args.dry)
        return 1
    if not args.piece:
        ap.error("pass --piece, --probe or --summarize")
    if args.dry:
        os.environ["JAX_PLATFORMS"] = "cpu"
    elif args.piece == "decode":  # JAX would otherwise take 75% of the GPU's memory before torch gets any
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    start = time.perf_counter()
    try:
        ok = globals()[args.piece](args.dry)
    except Exception as e:
        emit(args.piece, ok=False, error=_error(e))
        raise
    finally:
        print(f"gpu_check: {args.piece} took {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
