"""Regenerate the README's AOT table: run ``python -m mistral_jax.aot ... --json`` for each row, print Markdown.

    python scripts/aot_table.py [--rows mixtral_8x7b,mistral_7b_v5p8] [--python .venv312/bin/python]

Each row is one command (shown in the table); MaxText's figure for the same model, topology, global batch,
sequence and remat, where one was measured, sits beside ours. Needs the ``tpu`` extra (libtpu). Rows run one at
a time (each compile uses every core); progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

GiB = 1024**3

# (name, config, topology, overrides, MaxText 0.2.5 GiB per chip for the same case or None)
ROWS = [
    ("mixtral_8x7b", "configs/mixtral_8x7b.py", "v5p-128", [], 26.69),
    ("mixtral_8x7b_offload", "configs/mixtral_8x7b.py", "v5p-128", ["--config.model.remat=offload"], None),
    ("mixtral_8x7b_no_accum", "configs/mixtral_8x7b.py", "v5p-128", ["--config.grad_accum_steps=1"], 95.44),
    ("mixtral_8x7b_v6e", "configs/mixtral_8x7b.py", "v6e-256", ["--config.grad_accum_steps=1"], None),
    ("mixtral_8x7b_v6e_chunk1024", "configs/mixtral_8x7b.py", "v6e-256",
     ["--config.grad_accum_steps=1", "--config.model.moe_chunk_tokens=1024"], None),
    ("mistral_7b_v5p8", "configs/mistral_7b.py", "v5p-8",
     ["--config.batch_size=32", "--config.grad_accum_steps=4"], 44.28),
    ("mistral_7b_v5p8_offload", "configs/mistral_7b.py", "v5p-8",
     ["--config.batch_size=32", "--config.grad_accum_steps=4", "--config.model.remat=offload"], 44.28),
    ("mistral_7b_no_accum", "configs/mistral_7b.py", "v5p-128", ["--config.grad_accum_steps=1"], None),
    ("mistral_7b_v03", "configs/mistral_7b_v03.py", "v5p-128", [], None),
    ("mistral_nemo_12b", "configs/mistral_nemo_12b.py", "v5p-256", [], None),
    ("mixtral_8x22b", "configs/mixtral_8x22b.py", "v5p-512", [], None),
    ("mixtral_8x7b_2slices", "configs/mixtral_8x7b.py", "v5p-128", ["--num_slices=2", "--config.grad_accum_steps=4"],
     None),
    ("mistral_7b_dpo", "configs/mistral_7b_dpo.py", "v5p-8", [], None),
    ("mistral_7b_dpo_lora", "configs/mistral_7b_dpo.py", "v5p-8", ["--config.lora.rank=16"], None),
]


def run(python: str, config: str, topology: str, overrides: list[str]) -> tuple[dict, str]:
    cmd = [python, "-m", "mistral_jax.aot", "--config", config, "--topology", topology, *overrides, "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-2000:]}")
    shown = " ".join(["python -m mistral_jax.aot --config", config, "--topology", topology, *overrides])
    return json.loads(lines[-1]), shown


def row(name: str, r: dict, shown: str, maxtext: float | None) -> str:
    gib = lambda b: f"{b / GiB:.2f}"
    mesh = "/".join(str(r["mesh"][a]) for a in ("data", "fsdp", "tensor", "expert"))
    coll = sum(v["bytes"] for v in (r.get("collectives") or {}).values())
    roof = r.get("roofline") or {}
    step = f"{roof['step_s']:.2f} s ({roof['bound']})" if roof else "–"
    host = f" + {gib(r['host_temps'])} host" if r.get("host_temps") else ""
    hbm = f"{r['hbm_bytes'] / GiB:.0f} GiB" if r.get("hbm_bytes") is not None else "–"
    return (f"| {name} | {r['topology']} ({r['devices']}) | {mesh} | {r['batch_size']} × {r['seq_len']} "
            f"({r['grad_accum_steps']}) | {r['remat']} | {gib(r['arguments'])} | {gib(r['temps'])} | "
            f"**{gib(r['total'])}** / {gib(r['hbm'])}{host} | {'yes' if r['fits'] else '**no**'} | "
            f"{'–' if maxtext is None else f'{maxtext:.2f}'} | {coll / GiB:.0f} GiB | {hbm} | {step} | `{shown}` |")


def parse_args(description: str, names: list[str]) -> tuple[list[str], str]:
    """``--rows`` (checked against ``names``; empty: all) and ``--python``: ``(wanted rows, interpreter)``."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--rows", default="", help="comma-separated row names (default: all)")
    ap.add_argument("--python", default=sys.executable, help="the interpreter whose jax / libtpu compile")
    args = ap.parse_args()
    wanted = [n for n in args.rows.split(",") if n]
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        sys.exit(f"--rows: unknown row(s) {unknown}. Fix: choose from {names}.")
    return wanted, args.python


def print_header(python: str, columns: list[str]) -> None:
    """The versions that compile (this interpreter's jax / libtpu, else the interpreter's path) and a Markdown table
    header of ``columns``."""
    import importlib.metadata

    print(f"jax {importlib.metadata.version('jax')} / libtpu {importlib.metadata.version('libtpu')}"
          if python == sys.executable else f"interpreter {python}")
    print_columns(columns)


def print_columns(columns: list[str]) -> None:
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))


def print_rows(rows: list[tuple], wanted: list[str], python: str, fmt) -> None:
    """Compile each ``(name, config, topology, overrides)`` row named in ``wanted`` (empty: all) and print
    ``fmt(name, report, shown)`` (the report gets its ``topology``); progress on stderr."""
    for name, config, topology, overrides in rows:
        if wanted and name not in wanted:
            continue
        t0 = time.time()
        print(f"{name}: compiling ...", file=sys.stderr, flush=True)
        report, shown = run(python, config, topology, overrides)
        report["topology"] = topology
        print(fmt(name, report, shown), flush=True)
        print(f"{name}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)


def main() -> None:
    wanted, python = parse_args(__doc__.splitlines()[0], [r[0] for r in ROWS])
    print("| Row | Topology (chips) | Mesh d/f/t/e | Batch × seq (accum) | Remat | Args GiB | Temps GiB | "
          "Total / HBM GiB | Fits | MaxText GiB | Collectives / step | HBM traffic / step | Roofline step | Command |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, config, topology, overrides, maxtext in ROWS:
        if wanted and name not in wanted:
            continue
        t0 = time.perf_counter()
        try:
            r, shown = run(python, config, topology, overrides)
        except RuntimeError as e:  # a compiler error is a finding for its row, not the end of the table
            error = next((line for line in str(e).splitlines() if "Error" in line), str(e).splitlines()[0])
            print(f"{name}: failed: {error}", file=sys.stderr)
            cells = f"| {name} | {topology} | | | | | | compile failed: {error[:160]} | | | | | |"
            print(f"{cells} `{' '.join(overrides)}` |", flush=True)
            continue
        print(f"{name}: {r['total'] / GiB:.2f} GiB in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        print(row(name, r, shown, maxtext), flush=True)


if __name__ == "__main__":
    main()
