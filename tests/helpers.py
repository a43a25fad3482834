"""What several test files share: random token batches, a run's losses, the small tokenizer corpora, and lazy
handles on the oracles.

Session-scoped tiny models, tokenizers and runs are pytest fixtures in ``tests/conftest.py`` (``make_tokenizer``,
``tokenizer_path``, ``corpus_tokenizer``, ``syllable_tokenizer_path``, ``tiny_trained_run``); this module holds the
plain functions.

Oracles (torch, transformers, trl, lm-eval, ...) are never imported at a test module's top level: the light tier
(``make test-light``) collects every test file where torch is not installed. A file that needs an oracle in many
places names it with ``oracle_module`` (imported on first use); the tests that use one carry
``@pytest.mark.oracle``.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from types import ModuleType

import numpy as np

# Top-level packages of the oracles (and of lm-eval's and transformers' helpers): not in the light extra, and
# blocked under `make test-light` (conftest.py).
ORACLES = ("torch", "transformers", "trl", "lm_eval", "peft", "accelerate", "openai", "llama_cpp")


def oracle_module(name: str) -> ModuleType:
    """``name`` (e.g. ``"torch"``), imported on its first attribute access rather than here: a test module can
    name an oracle at its top level and still be collected without it. Not put in ``sys.modules`` (a library
    that checks ``"torch" in sys.modules`` must not see it before a test imports it)."""

    class _Lazy(ModuleType):
        def __getattr__(self, attr):
            return getattr(importlib.import_module(name), attr)

    return _Lazy(name)


def random_tokens(seed: int, vocab_size: int, batch: int, length: int, low: int = 0) -> np.ndarray:
    """``[batch, length]`` int32 token ids drawn uniformly from ``[low, vocab_size)`` with ``default_rng(seed)``."""
    return np.random.default_rng(seed).integers(low, vocab_size, (batch, length)).astype(np.int32)


def run_losses(workdir: str) -> dict[int, float]:
    """``{step: training loss}`` of a run's ``metrics.jsonl``; later records of a step win (a resumed run
    appends)."""
    from mistral_jax.training.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def syllable_corpus(seed: int = 0) -> tuple[list[str], list[str]]:
    """``(words, texts)``: 400 made-up words of 1-3 syllables and 2000 twelve-word sentences of them, then "the cat
    sat on the mat" 20 times. A tokenizer of 512 pieces trained on it decodes every id a tiny model emits."""
    rng = np.random.default_rng(seed)
    syllables = "ka ri to mo na se lu pi da ve go ha ne ti ro su ma ky be zo".split()
    words = ["".join(rng.choice(syllables, rng.integers(1, 4))) for _ in range(400)]
    texts = [" ".join(rng.choice(words, 12)) for _ in range(2000)] + ["the cat sat on the mat"] * 20
    return words, texts


# A small English vocabulary (test_eval's documents): a tokenizer trained on word_corpus() has one piece per word.
WORDS = ("the cat dog bird fish red blue green small big old new runs eats sees likes a one two three what which "
         "color is are on in under tree house water food day night yes no").split()


def word_corpus(seed: int = 0) -> list[str]:
    """3000 twelve-word sentences of ``WORDS``, each ending in ".", drawn with ``random.Random(seed)``."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(3000)]


def tokenizer_corpus(name: str) -> list[str]:
    """The texts a shared test tokenizer (conftest's ``make_tokenizer``) is trained on: ``"bundled"``, the bundled
    corpus's TRAIN split; ``"syllable"``, the sentences of ``syllable_corpus()``; ``"words"``, ``word_corpus()``."""
    if name == "bundled":
        import json

        from mistral_jax.data.corpus import TRAIN

        with open(TRAIN, encoding="utf-8") as f:
            return [json.loads(line)["text"] for line in f]
    if name == "syllable":
        return syllable_corpus()[1]
    if name == "words":
        return word_corpus()
    raise ValueError(f"tokenizer corpus {name!r} is not one of 'bundled', 'syllable', 'words'. Fix: pick one, or "
                     "add yours to tests/helpers.py tokenizer_corpus")


def mc_task_yaml(task: str, data: object, metrics: tuple[str, ...] = ("acc",)) -> str:
    """An lm-eval multiple-choice task over a local jsonl of ``{"question", "choices", "label"}`` rows."""
    return (f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
            "output_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
            "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\nmetric_list:\n"
            + "".join(f"  - metric: {m}\n" for m in metrics))


def ppl_task_yaml(task: str, data: object, metrics: tuple[str, ...] = ("word_perplexity",)) -> str:
    """An lm-eval rolling-perplexity task (``loglikelihood_rolling``) over a local jsonl of ``{"text"}`` rows."""
    return (f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
            "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\nmetric_list:\n"
            + "".join(f"  - metric: {m}\n" for m in metrics))


def write_prepared(dest: str, shards: list[list[str]], tokenizer_path: str, seq_len: int) -> str:
    """A prepared text dataset at ``dest`` written directly with ``data.prepared`` (one shard per list of texts,
    each packed with ``pipeline.pack_documents``), for loader tests that do not exercise ``data.prepare``."""
    from mistral_jax.data import prepared
    from mistral_jax.data.pipeline import pack_documents
    from mistral_jax.data.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_path)
    entries = []
    for i, texts in enumerate(shards):
        rows = list(pack_documents((tok.encode(t, bos=True, eos=True) for t in texts), seq_len))
        fields = prepared.storage_fields(rows[0], tok.vocab_size, seq_len)
        w = prepared.ShardWriter(dest, i, fields)
        for r in rows:
            w.write(r)
        entries.append({**w.close(), "documents": len(texts)})
    tok.save(dest)
    prepared.write_manifest(dest, {"kind": "text", "tokenizer": prepared.tokenizer_identity(tok), "seq_len": seq_len,
                                   "packed": True, "fields": fields, "shards": entries,
                                   "rows": sum(e["rows"] for e in entries), "tokens": sum(e["tokens"] for e in entries),
                                   "documents": sum(e["documents"] for e in entries)})
    return dest


def train_env() -> dict[str, str]:
    """The environment of a ``train.py`` subprocess in the tests: 8 CPU devices, float32 matmuls, the repo on the
    path (its configs and the reward functions tests name by import path)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               JAX_DEFAULT_MATMUL_PRECISION="float32", PYTHONPATH=root)
    return env


def signal_when(cmd: Sequence[str], ready: Callable[[], bool], sig: int = signal.SIGTERM, *, env: dict | None = None,
                timeout: float = 300.0) -> tuple[int, str]:
    """Start ``cmd``, send it ``sig`` once ``ready()`` (polled every 0.1 s) and return ``(returncode, output)``;
    fails the test if the process ends before it could be signalled."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(list(cmd), env=env or train_env(), cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ready():
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be interrupted:\n" + proc.stdout.read()[-3000:]
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


# ------------------------------------------------------------------------------------------- serving engine
class IdsTok:
    """Ids only: the engine decodes text for stop strings and deltas."""

    eos_id, bos_id = 2, 1

    def decode(self, ids):
        return " ".join(map(str, ids))


def submit_all(eng, prompts, max_tokens, timeout):
    """Submit every prompt at once (greedy) and wait for all; returns each one's generated ids, in prompt order."""
    from mistral_jax.serve.engine import SamplingParams

    out = {i: [] for i in range(len(prompts))}
    done = threading.Semaphore(0)

    def emit(i):
        def f(ev):
            out[i].extend(ev.token_ids)
            if ev.kind != "delta":
                done.release()
        return f

    for i, p in enumerate(prompts):
        eng.submit(p, SamplingParams(max_tokens=max_tokens), emit(i))
    for _ in prompts:
        assert done.acquire(timeout=timeout)
    return [out[i] for i in range(len(prompts))]
