"""Generate text from a checkpoint, streaming tokens as they are decoded.

    mistral-jax-generate --checkpoint PATH --prompt "..." [--max_new_tokens N] [--temperature T]
        [--top_k K] [--top_p P] [--seed S] [--instruct] [--stop STR ...] [--chunk_size C] [--tokenizer PATH]
        [--dtype float32|bfloat16] [--verbose]

``--checkpoint`` is anything ``mistral_jax.load_pretrained`` reads, local or ``gs://`` / ``s3://`` (HF dir, Mistral
consolidated dir, mistral_jax export dir, training workdir). The tokenizer is ``tokenizer.model`` in that directory
unless ``--tokenizer`` is given. ``--instruct`` wraps the prompt in Mistral's instruction template
``<s>[INST] {prompt} [/INST]``.

Every flag value is checked first, then the paths (a bucket's endpoint, existence and credentials first), then the
tokenizer and the model load: a bad value is one line on stderr naming the flag, the value and the fix, exit status 2
(``--verbose`` or ``MISTRAL_JAX_DEBUG=1`` also shows the traceback).

Also ``python -m mistral_jax.cli.generate``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from mistral_jax.cli import (
    CHECKPOINT_REMOTE_OK,
    Parser,
    UsageError,
    add_checkpoint_flags,
    check_checkpoint_flags,
    check_checkpoint_paths,
    keep_host_memory,
    load_checkpoint,
    number,
    quiet_libraries,
)
from mistral_jax.cli import run as cli_run
from mistral_jax.data.chat import render_prompt
from mistral_jax.inference.detokenize import TextStream
from mistral_jax.inference.generate import generate as _generate


def instruct_prompt_ids(prompt: str, tokenizer: Any) -> list[int]:
    """Ids of the single-turn instruction prompt in the tokenizer's Mistral chat format (``data.chat``)."""
    return render_prompt([{"role": "user", "content": prompt}], tokenizer)


def run(model: Any, tokenizer: Any, prompt: str, *, max_new_tokens: int = 128, temperature: float = 0.0,
        top_k: int | None = None, top_p: float | None = None, seed: int = 0, instruct: bool = False,
        stop: Sequence[str] = (), chunk_size: int | None = None, out: TextIO | None | str = "stdout") -> str:
    """Generate a continuation of ``prompt``, writing it to ``out`` token by token; returns the full text.

    ``out``: a text stream, ``"stdout"`` (the current ``sys.stdout``) or None (print nothing).

    The text is cut before the first stop string. Generation stops at the tokenizer's EOS.
    """
    out = sys.stdout if out == "stdout" else out
    ids = instruct_prompt_ids(prompt, tokenizer) if instruct else tokenizer.encode(prompt, bos=True)
    text = TextStream(tokenizer, stop, decode=tokenizer.decode)

    def write(delta: str) -> None:
        if out is not None and delta:
            out.write(delta)
            out.flush()

    def on_block(rows: list[list[int]]) -> None:
        for t in rows[0]:
            write(text.push(t))

    _generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
              seed=seed, eos_id=tokenizer.eos_id, chunk_size=chunk_size, stop=tuple(stop),
              tokenizer=tokenizer if stop else None, stream=on_block)
    write(text.finish())
    if out is not None:
        out.write("\n")
        out.flush()
    return text.text


# ------------------------------------------------------------------------------------------------------ CLI
PROG = "generate"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check every flag value (no file is opened); raises ``UsageError`` naming a bad flag."""
    ap = Parser(prog="mistral-jax-generate", description=__doc__.split("\n\n")[0], remote_ok=CHECKPOINT_REMOTE_OK)
    add_checkpoint_flags(ap)
    ap.add_argument("--prompt", help="the prompt text (required)")
    ap.add_argument("--max_new_tokens", default="128", help="at most this many new tokens (>= 1)")
    ap.add_argument("--temperature", default="0.0", help="0 = greedy; > 0 samples")
    ap.add_argument("--top_k", default=None, help="sample among the k most likely tokens (>= 1)")
    ap.add_argument("--top_p", default=None, help="nucleus sampling mass in (0, 1]")
    ap.add_argument("--seed", default="0", help="sampling seed (an integer >= 0)")
    ap.add_argument("--instruct", action="store_true", help="wrap the prompt in <s>[INST] ... [/INST]")
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--chunk_size", default=None, help="prefill chunk (>= 1; default: the sliding window)")
    args = ap.parse_args(argv)
    check_checkpoint_flags(args)
    if args.prompt is None:
        raise UsageError("--prompt", None, "is required", 'pass --prompt "TEXT" (the text to continue)')
    args.max_new_tokens = number("--max_new_tokens", args.max_new_tokens, int, lambda v: v >= 1,
                                 "must be at least 1", "pass a positive count, e.g. --max_new_tokens 128")
    args.temperature = number("--temperature", args.temperature, float, lambda v: v >= 0, "must be >= 0",
                              "pass 0 for greedy decoding or a positive value such as --temperature 0.7")
    args.top_k = number("--top_k", args.top_k, int, lambda v: v >= 1, "must be at least 1",
                        "pass a positive count such as --top_k 50, or omit it to sample from every token")
    args.top_p = number("--top_p", args.top_p, float, lambda v: 0 < v <= 1, "must be in (0, 1]",
                        "pass a probability mass such as --top_p 0.9, or omit it (= 1: no nucleus cut)")
    args.seed = number("--seed", args.seed, int, lambda v: 0 <= v < 2**32, "must be in [0, 2**32)",
                       "pass a non-negative integer such as --seed 0")
    args.chunk_size = number("--chunk_size", args.chunk_size, int, lambda v: v >= 1, "must be at least 1",
                             "pass a positive prefill chunk such as --chunk_size 512, or omit it (the window)")
    for s in args.stop:
        if not s:
            raise UsageError("--stop", s, "is empty (it would cut every output to nothing)",
                             'pass a non-empty stop string such as --stop "\\n\\n", or drop the flag')
    return args


def main(argv: Sequence[str] | None = None) -> str:
    """CLI entry point; returns the generated text.

    Order: every flag value is checked, then the paths (checkpoint directory, tokenizer file), then the tokenizer
    and the model are loaded; a bad value stops the run with a ``UsageError`` before anything loads.
    """
    quiet_libraries()
    keep_host_memory(PROG)
    args = parse_args(argv)
    tokenizer_file = check_checkpoint_paths(args)
    from mistral_jax import distributed

    distributed.initialize()  # several processes (TPU slice, SLURM, MISTRAL_JAX_*): before any device is used
    tokenizer, model = load_checkpoint(args, tokenizer_file)
    start = time.perf_counter()
    text = run(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
               top_k=args.top_k, top_p=args.top_p, seed=args.seed, instruct=args.instruct, stop=args.stop,
               chunk_size=args.chunk_size, out="stdout" if distributed.is_main_process() else None)
    if distributed.is_main_process():  # every process of a multi-host launch generates the same text
        print(f"[{time.perf_counter() - start:.1f}s including compilation]", file=sys.stderr)
    return text


def entry() -> None:
    """The console script: ``main`` with one-line errors and exit statuses (``cli.run``)."""
    cli_run(main, PROG)


if __name__ == "__main__":
    entry()
