#!/usr/bin/env bash
# The README's main command (`make demo`): train the tiny Mistral on the bundled CPython-docs corpus (offline,
# ~1-3 minutes on 2 CPU cores), evaluate its held-out perplexity with lm-eval through eval.py, and export it to
# HF format with `python -m mistral_jax.convert`. The run lands in $WORKDIR (default runs/demo), the export in
# $EXPORT (default runs/demo-hf).
#
#   bash scripts/demo.sh [extra train.py flags, e.g. --config.num_steps=100]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WORKDIR=${WORKDIR:-runs/demo}
EXPORT=${EXPORT:-$WORKDIR-hf}
export HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false

echo "== 1/3 train: tiny Mistral on mistral_jax/data/corpus (tokenizer trained into $WORKDIR/tokenizer.model)"
# A rerun resumes from $WORKDIR/checkpoints (and stops at once if the run is complete).
"$PYTHON" train.py --config configs/tiny.py --workdir "$WORKDIR" "$@"
"$PYTHON" - "$WORKDIR" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl")]
train = [r for r in rows if "loss" in r]
ev = [r for r in rows if "eval/loss" in r]
print(f"train loss {train[0]['loss']:.3f} (step {train[0]['step']}) -> {train[-1]['loss']:.3f} (step {train[-1]['step']})"
      + (f"; held-out loss {ev[-1]['eval/loss']:.3f}" if ev else ""))
PY

echo "== 2/3 eval: held-out perplexity of the bundled validation split (lm-eval loglikelihood_rolling, offline)"
TASKS="$WORKDIR/eval_tasks"
mkdir -p "$TASKS"
VALIDATION=$("$PYTHON" -c "from mistral_jax.data.corpus import VALIDATION; print(VALIDATION)")
cat > "$TASKS/pydoc_ppl.yaml" <<YAML
task: pydoc_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: $VALIDATION
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
YAML
"$PYTHON" eval.py --checkpoint "$WORKDIR" --tasks pydoc_ppl --include_path "$TASKS" --limit 8 \
  --output_path "$WORKDIR/eval"

echo "== 3/3 export: HF safetensors + config.json in $EXPORT"
# The export goes beside the run, never inside it (convert refuses an output inside its input); a rerun
# replaces the previous export (--overwrite replaces only an earlier export, never a training run).
"$PYTHON" -m mistral_jax.convert --from jax --to hf --input "$WORKDIR" --output "$EXPORT" --overwrite
ls -l "$EXPORT"
echo "demo done: run in $WORKDIR, HF export in $EXPORT"
