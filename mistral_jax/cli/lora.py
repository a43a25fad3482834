"""Export a LoRA training run (``train.py`` with ``config.lora.rank > 0``): its base model (``init_from``) with the
adapters of its newest (or ``--step``) checkpoint merged in, as an HF, Mistral consolidated or mistral_jax dir; or,
with ``--to peft``, those adapters alone as a PEFT adapter dir (``adapter_config.json`` +
``adapter_model.safetensors``, ``convert/peft.py``) that ``peft.PeftModel.from_pretrained`` loads over the HF export
of the base (the base itself is not read).

    python -m mistral_jax.cli.lora --workdir runs/tiny_lora --output exports/tiny_lora_hf [--to hf|mistral|jax|peft]

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
from mistral_jax.convert import files, native
from mistral_jax.convert import peft as peft_format
from mistral_jax.export import save_hf, save_jax, save_mistral, save_peft
from mistral_jax.loading import input_dirs, load_pretrained, lora_run
from mistral_jax.lora import resolve_targets

PROG = "mistral-jax-lora"


def _parser() -> cli.Parser:
    ap = cli.Parser(prog=PROG, remote_ok=("workdir", "output"),
                    description="Merge the adapters of a LoRA run (train.py with config.lora.rank > 0) into its "
                                "init_from base model and export the result, or (--to peft) export the adapters "
                                "alone in PEFT's format.")
    ap.add_argument("--workdir", required=True, help="the LoRA run's --workdir (local, gs:// or s3://)")
    ap.add_argument("--output", required=True, help="directory to write (local, gs:// or s3://; absent or empty; "
                                                     "never inside the workdir)")
    ap.add_argument("--to", choices=("hf", "mistral", "jax", "peft"), default="hf",
                    help="export format (peft: the adapters alone, for peft.PeftModel over the base's HF export)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest that restores)")
    ap.add_argument("--dtype", default=None, help="hf / mistral / peft output dtype (float32, bfloat16, float16; "
                                                   "peft: float32 by default)")
    ap.add_argument("--base_model", default=None, help="--to peft: base_model_name_or_path in adapter_config.json "
                                                        "(default: the run's init_from as given)")
    ap.add_argument("--overwrite", action="store_true", help="replace a previous export of the same kind at --output")
    ap.add_argument("--verbose", action="store_true", help="show tracebacks")
    return ap


def _validate(args) -> str:
    """Check every argument before anything is loaded; returns the directory to load (workdir or step dir)."""
    args_lib.check_input_dir("--workdir", args.workdir, "the --workdir of a train.py run with config.lora.rank > 0")
    if lora_run(args.workdir) is None:
        other = ("it has no adapters to export; export the whole model with python -m mistral_jax.convert --from jax "
                 f"--to hf --input {args.workdir} --output DIR" if args.to == "peft" else
                 f"export any other checkpoint with python -m mistral_jax.convert --from jax --to {args.to} "
                 f"--input {args.workdir} --output DIR")
        raise cli.UsageError("--workdir", args.workdir, "is not a LoRA training run (no run_config.json with "
                             "lora.rank > 0)", f"pass the --workdir of a LoRA run; {other}")
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
        raise cli.UsageError("--dtype", args.dtype, "only applies to --to hf, mistral or peft (a jax export keeps "
                             "the run's dtype)", "leave --dtype out, or export with --to hf / mistral / peft")
    if args.to == "peft":
        _validate_peft(args)
    elif args.base_model is not None:
        raise cli.UsageError("--base_model", args.base_model, f"only applies to --to peft, not --to {args.to} (a "
                             "merged export holds its base)", "leave --base_model out, or export with --to peft")
    args_lib.check_output("--output", args.output, args.to, args.overwrite, input_dirs(args.workdir, "jax"))
    return path


def _validate_peft(args) -> None:
    """``--to peft``: the run has a base model PEFT can load and adapters PEFT can hold."""
    root, run, _ = lora_run(args.workdir)
    if not run.get("init_from"):
        raise cli.UsageError("--workdir", args.workdir, "is a LoRA run on a fresh seeded init (no init_from), so no "
                             "HF checkpoint holds the base its adapters need", "export it merged with --to hf")
    try:
        peft_format.check_targets(native.read_config(root), resolve_targets(run["lora"].get("targets", "all")))
    except (ValueError, OSError) as e:
        raise cli.UsageError("--to", "peft", f"cannot hold the adapters of {args.workdir!r}: {e}".split(" Fix: ")[0],
                             str(e).split(" Fix: ")[-1].rstrip(".")) from None


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: merge a LoRA training run into its base model and export it (``--to peft``: its adapters alone);
    returns the exit status (0 done, 1 an error reading or writing a checkpoint, 2 a bad argument: one line naming
    the flag, the value and the fix)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cli.quiet_libraries()
    cli.keep_host_memory(PROG)

    def body() -> None:
        args = _parser().parse_args(argv)
        path = _validate(args)
        if args.to == "peft":  # the adapters alone: the base is not loaded
            print(save_peft(path, args.output, base_model=args.base_model, dtype=args.dtype,
                            overwrite=args.overwrite))
            return
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
