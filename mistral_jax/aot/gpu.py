"""Deviceless AOT for NVIDIA GPU nodes: compile-only CUDA devices from a device description, no GPU or driver.

``jax.experimental.topologies.get_topology_desc(platform="cuda", topology="S x H x D", target_config=TEXT)`` gives
compile-only devices of S slices of H hosts with D GPUs each when the CUDA plugin is installed (``pip install
"jax[cuda12]"``; it needs no driver to compile). ``TEXT`` is a ``GpuTargetConfig`` text proto: the device
properties the compiler plans with (compute capability, SM count, memory, shared memory and register limits). We
write it from ``GPUS``, a table of each model's published properties (the numbers ``nvidia-smi`` / CUDA's
``cudaGetDeviceProperties`` report), so the project needs no file of the compiler's own.

Topologies (``parse``): ``h100-8`` (one node of 8 NVLink GPUs), ``h200-8``, ``2xh100-8`` (two nodes). Memory per
GPU is checked against the model's memory (``device_memory_size``).
"""

from __future__ import annotations

import dataclasses
import re

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Gpu:
    """Published properties of one GPU model (per device)."""

    name: str  # the device name the driver reports
    compute_capability: tuple[int, int]
    sm_count: int
    memory_bytes: int
    memory_bandwidth: int  # bytes / s
    l2_cache_bytes: int
    clock_ghz: float
    shared_memory_per_sm: int = 233472  # 228 KiB (Hopper)
    shared_memory_per_block_optin: int = 232448  # 227 KiB
    registers_per_sm: int = 65536
    threads_per_sm: int = 2048
    fp32_per_sm: int = 128


GPUS: dict[str, Gpu] = {
    "h100": Gpu(name="NVIDIA H100 80GB HBM3", compute_capability=(9, 0), sm_count=132, memory_bytes=84942979072,
                memory_bandwidth=3352320000000, l2_cache_bytes=52428800, clock_ghz=1.98),
    "h200": Gpu(name="NVIDIA H200", compute_capability=(9, 0), sm_count=132, memory_bytes=150754820096,
                memory_bandwidth=4800000000000, l2_cache_bytes=52428800, clock_ghz=1.98),
}


@dataclasses.dataclass(frozen=True)
class GpuTopology:
    """``nodes`` nodes of ``gpus_per_node`` GPUs of model ``gpu`` (a ``GPUS`` key)."""

    name: str
    gpu: str
    nodes: int
    gpus_per_node: int

    @property
    def chips(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def hbm_bytes(self) -> int:
        return GPUS[self.gpu].memory_bytes

    @property
    def topology(self) -> str:
        """JAX's CUDA topology string: slices x hosts x devices per host."""
        return f"1x{self.nodes}x{self.gpus_per_node}"


_FORM = re.compile(r"^(?:(\d+)\s*x\s*)?([a-z0-9]+)-(\d+)$")


def is_gpu_topology(name: str) -> bool:
    m = _FORM.match(name.strip().lower())
    return bool(m) and m.group(2) in GPUS


def parse(name: str) -> GpuTopology:
    """``h100-8`` / ``h200-8`` / ``2xh100-8`` -> ``GpuTopology``; raises naming the accepted forms."""
    m = _FORM.match(name.strip().lower())
    if not m or m.group(2) not in GPUS:
        raise ValueError(f"unknown GPU topology {name!r}. Fix: use GPU-N for one node of N GPUs ({sorted(GPUS)}, "
                         "e.g. h100-8) or MxGPU-N for M nodes (e.g. 2xh100-8).")
    nodes, gpu, per_node = int(m.group(1) or 1), m.group(2), int(m.group(3))
    if nodes < 1 or per_node < 1:
        raise ValueError(f"GPU topology {name!r} has no GPUs. Fix: e.g. h100-8.")
    return GpuTopology(name=name, gpu=gpu, nodes=nodes, gpus_per_node=per_node)


def target_config(gpu: Gpu) -> str:
    """The ``GpuTargetConfig`` text proto of ``gpu``: what XLA's GPU compiler reads instead of a live device."""
    major, minor = gpu.compute_capability
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {gpu.shared_memory_per_sm}
  threads_per_core_limit: {gpu.threads_per_sm}
  core_count: {gpu.sm_count}
  fpus_per_core: {gpu.fp32_per_sm}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {gpu.memory_bandwidth}
  l2_cache_size: {gpu.l2_cache_bytes}
  clock_rate_ghz: {gpu.clock_ghz}
  device_memory_size: {gpu.memory_bytes}
  shared_memory_per_block_optin: {gpu.shared_memory_per_block_optin}
  cuda_compute_capability {{
    major: {major}
    minor: {minor}
  }}
  registers_per_core_limit: {gpu.registers_per_sm}
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{
  major: 9
  minor: 8
}}
device_description_str: "{gpu.name}"
"""


def cuda_plugin_available() -> bool:
    """True if JAX's CUDA plugin is installed (it compiles for GPUs without a GPU)."""
    import importlib.util

    return any(importlib.util.find_spec(m) is not None for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))


def devices(topology: GpuTopology) -> list:
    """Compile-only CUDA devices of ``topology`` (needs the CUDA plugin; no GPU)."""
    import os

    from jax.experimental import topologies

    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # no driver / CUDA libraries to check
    if not cuda_plugin_available():
        raise RuntimeError(f"cannot compile for {topology.name!r}: JAX's CUDA plugin is not installed. Fix: pip "
                           "install 'jax[cuda12]' of the same jax version (no GPU or driver needed to compile).")
    try:
        desc = topologies.get_topology_desc(platform="cuda", topology=topology.topology,
                                            target_config=target_config(GPUS[topology.gpu]))
    except Exception as e:  # noqa: BLE001 - plugin / version problems surface as various errors
        raise RuntimeError(f"cannot describe GPU topology {topology.name!r} ({topology.topology}): "
                           f"{type(e).__name__}: {e}. Fix: install 'jax[cuda12]' of the same jax version.") from e
    return list(desc.devices)
