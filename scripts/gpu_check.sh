#!/usr/bin/env bash
# Everything GPU-related in one command, as soon as a GPU is there (issue 37; a few minutes on one H100 / H200):
# logits parity of the tiny Mistral / Mixtral vs the CPU, cuDNN sliding-window attention and the ragged_dot MoE
# vs their XLA peers (outputs, gradients, times), the train step of 2 Mistral 7B-width layers (tokens/s, MFU) and
# decoding vs HF transformers on the same GPU. The pieces are benchmarks/gpu_check.py's; each runs in its own
# process with a time limit and prints one JSON line per figure on stdout; a summary line comes last.
#
#   bash scripts/gpu_check.sh [--dry] [--out FILE] [--pieces parity,attention,moe,train,decode]
#
# --dry         tiny shapes on the CPU (no GPU needed): what CI runs so the pieces keep working (under a minute)
# --out FILE    also write the JSON lines to FILE (and the pieces' logs to FILE.log)
# --pieces LIST run only these pieces (comma-separated; default all five)
# GPU_CHECK_TIMEOUT=SECONDS replaces every piece's time limit (90 s; train and decode 150 s)
# Exit status: 0 every figure passed, 1 some figure failed or is missing (its line says why), 2 no GPU visible
# to JAX or a bad argument (one line on stderr, with the fix), before anything but jax is imported.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
CHECK=benchmarks/gpu_check.py

ALL="parity,attention,moe,train,decode"
DRY="" OUT="" PIECES=$ALL
usage() {  # one line on stderr, exit 2
  echo "gpu_check: $1. Fix: $2 (bash scripts/gpu_check.sh [--dry] [--out FILE] [--pieces $ALL]; see --help)" >&2
  exit 2
}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry) DRY="--dry" ;;
    --out) [ $# -ge 2 ] && [ -n "$2" ] && [ "${2#--}" = "$2" ] || usage "--out needs a file" "pass --out FILE"
           OUT=$2; shift ;;
    --pieces) [ $# -ge 2 ] && [ -n "$2" ] && [ "${2#--}" = "$2" ] || usage "--pieces needs a list" \
                "pass --pieces LIST"
              PIECES=$2; shift ;;
    --out=*) OUT=${1#--out=}; [ -n "$OUT" ] || usage "--out= needs a file" "pass --out FILE" ;;
    --pieces=*) PIECES=${1#--pieces=} ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) usage "unknown argument '$1'" "use --dry, --out FILE or --pieces LIST" ;;
  esac
  shift
done
[ -n "${PIECES//,/}" ] || usage "--pieces is empty" "name some of $ALL"
case "${GPU_CHECK_TIMEOUT:-1}" in
  ''|*[!0-9]*|0) usage "GPU_CHECK_TIMEOUT='$GPU_CHECK_TIMEOUT' is not a positive number of seconds" \
                       "unset it or set a whole number, e.g. GPU_CHECK_TIMEOUT=300" ;;
esac

# Seconds each piece may take on the GPU (compiles included); together under 10 minutes.
limit() {
  case "$1" in
    parity|attention|moe) echo "${GPU_CHECK_TIMEOUT:-90}" ;;
    train|decode) echo "${GPU_CHECK_TIMEOUT:-150}" ;;
    *) usage "unknown piece '$1' in --pieces" "pick from $ALL" ;;
  esac
}
for piece in ${PIECES//,/ }; do limit "$piece" >/dev/null; done

if [ -z "$DRY" ]; then
  # Before anything slow loads: does JAX see a CUDA GPU? (only jax is imported; its warnings are dropped)
  if ! probe=$("$PYTHON" "$CHECK" --probe 2>/dev/null); then
    [ -n "$probe" ] || probe="gpu_check: $PYTHON cannot run $CHECK --probe (jax not importable?). Fix: activate the project's virtualenv"
    echo "$probe" >&2
    exit 2
  fi
else
  probe="cpu (--dry: tiny shapes)"
  export JAX_PLATFORMS=cpu
fi

if [ -n "$OUT" ]; then
  mkdir -p "$(dirname "$OUT")"
  LINES=$OUT LOG=$OUT.log
else
  dir=$(mktemp -d -t gpu_check.XXXXXX)
  LINES=$dir/gpu_check.jsonl LOG=$dir/gpu_check.log
fi
: >"$LINES"
: >"$LOG"
echo "gpu_check: $probe; pieces $PIECES; JSON lines on stdout${OUT:+ and in $OUT}, logs in $LOG" >&2

failed=0
for piece in ${PIECES//,/ }; do
  seconds=$(limit "$piece")
  start=$SECONDS
  rc=0
  timeout --kill-after=10 "$seconds" "$PYTHON" "$CHECK" --piece "$piece" $DRY >"$LINES.part" 2>"$LINES.err" || rc=$?
  cat "$LINES.err" >>"$LOG"
  { grep '^{' "$LINES.part" || true; } | tee -a "$LINES"
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 1 ]; then  # 1: the piece reported its failure itself; else a timeout, a crash
    "$PYTHON" "$CHECK" --failure "$piece" "$rc" "$seconds" "$LINES.err" "$LOG" $DRY | tee -a "$LINES" || true
  fi
  [ "$rc" -eq 0 ] || failed=1
  echo "gpu_check: $piece: exit $rc in $((SECONDS - start)) s" >&2
done
rm -f "$LINES.part" "$LINES.err"

echo "gpu_check: summary" >&2
"$PYTHON" "$CHECK" --summarize "$LINES" --expect "$PIECES" | tee -a "$LINES" || failed=1
if [ -n "$OUT" ]; then
  echo "gpu_check: the JSON lines are in $OUT: attach them to the issue or the results table (docs/benchmarks.md)" >&2
else
  echo "gpu_check: to keep the JSON lines, rerun with --out FILE (or redirect stdout); this run's are in $LINES" >&2
fi
exit "$failed"
