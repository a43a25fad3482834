"""Run by tests/test_gpu_aot.py with a Python that has JAX's CUDA plugin (``MISTRAL_JAX_CUDA_PYTHON``): compiles the
GPU backends for one compile-only H100 (no GPU) and prints one JSON line about the optimized programs.

* cuDNN attention with a sliding window (``kernels.cudnn_attention``), forward and backward: the cuDNN fused
  attention custom calls and the window they carry;
* the GPU expert MLP (``ragged_dot`` grouped matmuls, ``backends.EXPERT_MLP`` for platform gpu), forward and
  backward: what the ragged dots became.
"""

import json
import re

import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

from mistral_jax.aot import gpu
from mistral_jax.model import backends, kernels


def main() -> None:
    dev = gpu.devices(gpu.parse("h100-8"))[0]
    sh = SingleDeviceSharding(dev)
    s = lambda shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt, sharding=sh)

    def attn_loss(q, k, v):
        return jnp.sum(kernels.cudnn_attention(q, k, v, None, None, window=4096).astype(jnp.float32))

    text = jax.jit(jax.grad(attn_loss, argnums=(0, 1, 2))).lower(
        s((1, 8192, 32, 128)), s((1, 8192, 8, 128)), s((1, 8192, 8, 128))).compile().as_text()
    mlp_name = next(n for n, b in backends.EXPERT_MLP.items() if "gpu" in b.platforms)
    mlp = backends.EXPERT_MLP[mlp_name].fn

    def moe_loss(x, w1, w3, w2, sizes):
        return jnp.sum(mlp(x, w1, w3, w2, sizes).astype(jnp.float32) ** 2)

    moe_text = jax.jit(jax.grad(moe_loss, argnums=(0, 1, 2, 3))).lower(
        s((4096, 1024)), s((8, 1024, 2048)), s((8, 1024, 2048)), s((8, 2048, 1024)),
        s((8,), jnp.int32)).compile().as_text()
    dots = [line for line in moe_text.splitlines() if " dot(" in line]
    print(json.dumps({
        "device": dev.device_kind, "platform": dev.platform,
        "cudnn_fmha_calls": text.count("__cudnn$fmha"),
        "cudnn_windows": sorted({int(w) for w in re.findall(r'sliding_window_length"?\s*:\s*(\d+)', text)}),
        "expert_mlp": mlp_name,
        # the ragged dots as XLA:GPU compiled them: dots of the group's rows, none over all 8 experts' [8, 4096] rows
        "moe_ragged_dots": len([line for line in dots if "ragged_dot" in line]),
        "moe_dots_over_all_experts": len([line for line in dots if re.search(r"= \w+\[8,4096,", line)]),
    }))


if __name__ == "__main__":
    main()
