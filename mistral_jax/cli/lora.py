"""Export a LoRA training run (``train.py`` with ``config.lora.rank > 0``): its base model (``init_from``) with the
adapters of its newest (or ``--step``) checkpoint merged in, as an HF, Mistral consolidated or mistral_jax dir.

    python -m mistral_jax.cli.lora --workdir runs/tiny_lora --output exports/tiny_lora_hf [--to hf|mistral|jax]

``--workdir`` and ``--output`` may be ``gs://`` / ``s3://`` paths.

Arguments are checked before anything is read: a bad value is one line naming the flag, the value and the fix,
exit status 2; an error reading or writing a checkpoint exits with status 1.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import jax

from mistral_jax import cli, sharding, storage
from mistral_jax.cli import export_args as args_lib
from mistral_jax.convert import files
from mistral_jax.export import save_hf, save_jax, save_mistral
from mistral_jax.loading import input_dirs, load_pretrained, lora_run

PROG = "mistral-jax-lora"


def _parser() -> cli.Parser:
    ap = cli.Parser(prog=PROG, remote_ok=("workdir", "output"),
                    description="Merge the adapters of a LoRA run (train.py with config.lora.rank > 0) into its "
                                "init_from base model and export the result.")
    ap.add_argument("--workdir", required=True, help="the LoRA run's --workdir (local, gs:// or s3://)")
    ap.add_argument("--output", required=True, help="directory to write (local, gs:// or s3://; absent or empty; "
                                                     "never inside the workdir)")
    ap.add_argument("--to", choices=("hf", "mistral", "jax"), default="hf", help="export format")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest that restores)")
    ap.add_argument("--dtype", default=None, help="hf / mistral output dtype (float32, bfloat16, float16)")
    ap.add_argument("--overwrite", action="store_true", help="replace a previous export of the same kind at --output")
    ap.add_argument("--verbose", action="store_true", help="show tracebacks")
    return ap


def _validate(args) -> str:
    """Check every argument before anything is loaded; returns the directory to load (workdir or step dir)."""
    args_lib.check_input_dir("--workdir", args.workdir, "the --workdir of a train.py run with config.lora.rank > 0")
    if lora_run(args.workdir) is None:
        raise cli.UsageError("--workdir", args.workdir, "is not a LoRA training run (no run_config.json with "
                             "lora.rank > 0)", "pass the --workdir of a LoRA run; export any other checkpoint with "
                             f"python -m mistral_jax.convert --from jax --to {args.to} --input {args.workdir} "
                             "--output DIR")
    path = args.workdir
    if args.step is not None:
        root = storage.join(args.workdir, "checkpoints")
        have = sorted(int(n) for n in files.listdir(root) if n.isdigit())
        if args.step not in have:
            raise cli.UsageError("--step", args.step, f"is not a checkpoint of {args.workdir!r} (steps: {have})",
                                 "pass one of those steps, or leave --step out for the newest")
        path = storage.join(root, str(args.step))
    args_lib.check_dtype("--dtype", args.dtype)
    if args.dtype is not None and args.to == "jax":
        raise cli.UsageError("--dtype", args.dtype, "only applies to --to hf or mistral (a jax export keeps the "
                             "run's dtype)", "leave --dtype out, or export with --to hf / --to mistral")
    args_lib.check_output("--output", args.output, args.to, args.overwrite, input_dirs(args.workdir, "jax"))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: merge a LoRA training run into its base model and export it; returns the exit status (0 done, 1 an
    error reading or writing a checkpoint, 2 a bad argument: one line naming the flag, the value and the fix)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cli.quiet_libraries()
    cli.keep_host_memory(PROG)

    def body() -> None:
        args = _parser().parse_args(argv)
        path = _validate(args)
        mesh = sharding.make_mesh() if jax.device_count() > 1 else None  # fsdp over the local devices
        model = load_pretrained(path, fmt="jax", mesh=mesh)  # a LoRA run loads as its base + merged adapters
        if args.to == "jax":
            out = save_jax(model, args.output, overwrite=args.overwrite)
        else:
            save = save_hf if args.to == "hf" else save_mistral
            out = save(model, args.output, dtype=args.dtype, overwrite=args.overwrite)
        print(out)

    return args_lib.run(PROG, argv, body)


def entry() -> None:
    """The console script: exit status 0 done, 1 checkpoint error, 2 bad argument."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
