"""Regenerate the README's long-context AOT table: context parallelism (``mesh.context``) at 32k to 128k tokens.

    python scripts/aot_context_table.py [--rows mistral_7b_32k_cp8,...] [--python .venv312/bin/python]

Each row runs ``python -m mistral_jax.aot ... --json`` (``scripts/aot_table.py``'s runner) and prints a Markdown
row: per-chip temporaries (activations), total and fit, and the attention exchanges per step and chip (the
collectives under ``model.context.SCOPE`` in the compiled HLO); where the halo runs (a sliding window), the ring's
exchanges and memory for the same program sit beside it. The ``mistral_7b_32k_cp*`` rows keep one 32k sequence per
data-parallel rank over the same 8 chips, so the tokens per chip fall as 1 / context.
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


def _cp(context: int, chips: int, seq: int) -> list[str]:
    """One sequence per data-parallel rank: fsdp = chips / context, batch = fsdp rows of ``seq`` tokens."""
    fsdp = chips // context
    return [f"--config.mesh.context={context}", f"--config.mesh.fsdp={fsdp}", f"--config.batch_size={fsdp}",
            "--config.grad_accum_steps=1", f"--config.data.seq_len={seq}"]


# (name, config, topology, overrides)
ROWS = [
    *[(f"mistral_7b_32k_cp{c}", "configs/mistral_7b.py", "v5p-16", _cp(c, 8, 32768)) for c in (1, 2, 4, 8)],
    ("mistral_7b_v03_32k_cp8", "configs/mistral_7b_v03.py", "v5p-16", _cp(8, 8, 32768)),
    ("mixtral_8x7b_32k_cp8", "configs/mixtral_8x7b.py", "v5p-128",
     ["--config.mesh.context=8", "--config.mesh.fsdp=1", "--config.mesh.expert=8", "--config.batch_size=8",
      "--config.grad_accum_steps=1", "--config.data.seq_len=32768"]),
    ("mistral_nemo_12b_128k_cp16", "configs/mistral_nemo_12b.py", "v5p-64", _cp(16, 32, 131072)),
]


def row(name: str, r: dict, shown: str) -> str:
    gib = lambda b: f"{b / GiB:.2f}"
    mesh = "/".join(str(r["mesh"][a]) for a in ("data", "fsdp", "context", "tensor", "expert"))
    a = r.get("attention") or {}
    ring = a.get("ring")
    exchange = f"{a['backend']}: {a['bytes'] / GiB:.2f} GiB" if a else "–"
    ring_cols = f"{ring['bytes'] / GiB:.2f} GiB | {gib(ring['total'])}" if ring else "– | –"
    return (f"| {name} | {r['topology']} ({r['devices']}) | {mesh} | {r['batch_size']} × {r['seq_len']} | "
            f"{gib(r['temps'])} | **{gib(r['total'])}** / {gib(r['hbm'])} | {'yes' if r['fits'] else '**no**'} | "
            f"{exchange} | {ring_cols} | `{shown}` |")


def main() -> None:
    wanted, python = aot_table.parse_args(__doc__.splitlines()[0], [r[0] for r in ROWS])
    aot_table.print_header(python, ["Row", "Topology (chips)", "Mesh d/f/c/t/e", "Batch × seq", "Temps GiB",
                                     "Total / HBM GiB", "Fits", "Attention exchange / step", "Ring's exchange / step",
                                     "Ring's total GiB", "Command"])
    aot_table.print_rows(ROWS, wanted, python, row)


if __name__ == "__main__":
    main()
