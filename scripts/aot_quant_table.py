"""Regenerate the quantization AOT tables (docs/benchmarks.md#quantization): bfloat16 against int8 / fp8 training
(``--config.model.matmul_quant``), LoRA against QLoRA (``--config.lora.quantize_base=int8`` / ``int4``), and bfloat16
against int8 serving at 32k context (``--serve --quantize int8 --config.model.kv_cache_dtype=int8``), per chip.

    python scripts/aot_quant_table.py [--rows mistral_7b_int8,...] [--python .venv312/bin/python]

Each row runs ``python -m mistral_jax.aot ... --json`` (``scripts/aot_table.py``'s runner) and prints a Markdown
row: the train state per chip, temporaries, total and fit, and the compiled program's matmuls by operand types
(``aot.hlo.dot_operand_types``: the quantized ones take ``s8`` / ``f8e4m3fn`` operands, each counted once).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("aot_table", os.path.join(HERE, "aot_table.py"))
aot_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(aot_table)
GiB = aot_table.GiB

_7B = ["--config.batch_size=32", "--config.grad_accum_steps=4"]
_LORA_ANY = ["--config.lora.rank=16", "--config.init_from=", "--config.grad_accum_steps=1",
             "--config.data.seq_len=4096", "--config.model.param_dtype=bfloat16"]
_LORA = [*_LORA_ANY, "--config.batch_size=8", "--config.mesh.expert=1"]
# (name, config, topology, overrides)
ROWS = [
    *[(f"mistral_7b_{m}", "configs/mistral_7b.py", "v5p-8", [*_7B, f"--config.model.matmul_quant={q}"])
      for m, q in (("bf16", "none"), ("int8", "int8"), ("fp8", "fp8"))],
    *[(f"mixtral_8x7b_{m}", "configs/mixtral_8x7b.py", "v5p-128", [f"--config.model.matmul_quant={q}"])
      for m, q in (("bf16", "none"), ("int8", "int8"))],
    # LoRA against QLoRA (int8 / int4 base) on one v5p-8: FSDP over 4 chips, the experts over 4 chips, and the
    # experts over 4 chips at one 4096-token row per chip with 512-token MoE dispatch and loss chunks ("lean"),
    # also with the layer inputs offloaded to host memory ("offload")
    *[(f"mixtral_8x7b_{base}_r16{mesh}", "configs/mixtral_8x7b_instruct.py", "v5p-8",
       [*(_LORA if not flags else [*_LORA_ANY, "--config.batch_size=8"] if len(flags) == 1 else _LORA_ANY), *flags,
        *more])
      for mesh, flags in (("", []), ("_ep4", ["--config.mesh.expert=4"]),
                          ("_ep4_lean", ["--config.batch_size=4", "--config.mesh.expert=4",
                                         "--config.model.moe_chunk_tokens=512", "--config.model.loss_chunk_size=512"]),
                          # the lean shape with each layer's input kept in host memory (remat "offload")
                          ("_ep4_offload", ["--config.batch_size=4", "--config.mesh.expert=4",
                                            "--config.model.moe_chunk_tokens=512",
                                            "--config.model.loss_chunk_size=512", "--config.model.remat=offload"]))
      for base, more in (("lora", []), ("qlora8", ["--config.lora.quantize_base=int8"]),
                         ("qlora4", ["--config.lora.quantize_base=int4"]))],
    # the smallest v5e slice each fits (16 GiB per chip): bfloat16 LoRA needs v5e-16, int8 v5e-8, int4 v5e-4
    *[(f"mixtral_8x7b_{base}_r16_{topo.replace('-', '')}", "configs/mixtral_8x7b_instruct.py", topo,
       [*_LORA_ANY, f"--config.batch_size={chips}", f"--config.mesh.expert={min(chips, 8)}", *more])
      for base, topo, chips, more in (("lora", "v5e-8", 8, []), ("lora", "v5e-16", 16, []),
                                      ("qlora8", "v5e-8", 8, ["--config.lora.quantize_base=int8"]),
                                      ("qlora4", "v5e-4", 4, ["--config.lora.quantize_base=int4"]))],
]
_INT8_SERVE = ["--quantize", "int8", "--config.model.kv_cache_dtype=int8"]
# serving at 32k context: Mistral 7B (window 4096: the cache holds W) and Mixtral 8x7B (no window: all 32k)
SERVE_ROWS = [
    *[(f"serve_mistral_7b_{m}", "configs/mistral_7b.py", "v5e-8",
       ["--serve", "--mesh", "tensor=8", "--max_batch", "64", "--max_len", "32768", "--prefix_cache_mb", "0", *q])
      for m, q in (("bf16", []), ("int8", _INT8_SERVE))],
    *[(f"serve_mixtral_8x7b_{m}", "configs/mixtral_8x7b.py", "v5p-8",
       ["--serve", "--mesh", "tensor=4", "--max_batch", "16", "--max_len", "32768", "--prefix_cache_mb", "0", *q])
      for m, q in (("bf16", []), ("int8", _INT8_SERVE))],
]


def row(name: str, r: dict, shown: str) -> str:
    gib = lambda b: f"{b / GiB:.2f}"
    mesh = "/".join(str(r["mesh"][a]) for a in ("data", "fsdp", "context", "tensor", "expert"))
    s = r["state"]
    dots = ", ".join(f"{n} {k}" for k, n in (r.get("dot_types") or {}).items()) or "–"
    return (f"| {name} | {r['topology']} ({r['devices']}) | {mesh} | {r['batch_size']} × {r['seq_len']} "
            f"({r['grad_accum_steps']}) | {r.get('matmul_quant', 'none')} | {gib(s['params'])} / {gib(s['frozen'])} / "
            f"{gib(s['opt_state'])} | {gib(r['temps'])} | **{gib(r['total'])}** / {gib(r['hbm'])} | "
            f"{'yes' if r['fits'] else '**no**'} | {dots} | `{shown}` |")


def serve_row(name: str, r: dict, shown: str) -> str:
    gib = lambda b: f"{b / GiB:.2f}"
    quant = f"{r.get('quantize') or 'bf16'} / {'int8' if r.get('kv_cache_dtype') == 'int8' else 'bf16'}"
    return (f"| {name} | {r['topology']} ({r['devices']}) | {r['max_batch']} × {r['cache_slots']} | {quant} | "
            f"{gib(r['weights'])} | {gib(r['kv_cache'])} | {gib(max(r['decode']['temps'], r['prefill']['temps']))} "
            f"| **{gib(r['total'])}** / {gib(r['hbm'])} | {'yes' if r['fits'] else '**no**'} | `{shown}` |")


def main() -> None:
    wanted, python = aot_table.parse_args(__doc__.splitlines()[0], [r[0] for r in ROWS + SERVE_ROWS])
    aot_table.print_header(python, ["Row", "Topology (chips)", "Mesh d/f/c/t/e", "Batch × seq (accum)",
                                     "matmul_quant", "Params / frozen / optimizer GiB", "Temps GiB", "Total / HBM GiB",
                                     "Fits", "Matmuls by operand types", "Command"])
    aot_table.print_rows(ROWS, wanted, python, row)
    print()
    aot_table.print_columns(["Row", "Topology (chips)", "Rows × cache slots", "Weights / KV", "Weights GiB",
                             "KV cache GiB", "Temps GiB", "Total / HBM GiB", "Fits", "Command"])
    aot_table.print_rows(SERVE_ROWS, wanted, python, serve_row)


if __name__ == "__main__":
    main()
