"""``python -m mistral_jax.convert --from {hf,mistral,jax} --to {hf,mistral,jax} --input DIR --output DIR``."""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mistral_jax.convert", description=__doc__)
    ap.add_argument("--from", dest="src", required=True, choices=("hf", "mistral", "jax"), help="input format")
    ap.add_argument("--to", dest="dst", required=True, choices=("hf", "mistral", "jax"), help="output format")
    ap.add_argument("--input", required=True, help="checkpoint directory to read")
    ap.add_argument("--output", required=True, help="directory to create (written atomically)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default=None,
                    help="output dtype (default: keep the stored dtype)")
    ap.add_argument("--max_shard_size", default="5GB", help="HF shard size, e.g. 5GB, 500MiB or bytes")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    args = ap.parse_args(argv)

    from mistral_jax.convert import convert

    t0 = time.time()
    try:
        out = convert(args.src, args.dst, args.input, args.output, dtype=args.dtype,
                      max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst} checkpoint to {out} in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
