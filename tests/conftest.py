"""Test setup: 8 fake CPU devices and float32 matmuls, set before JAX initialises; the tiers' markers; the
session fixtures (tokenizers, a trained run) the test files share.

Tiers (Makefile): ``make test-light`` runs ``-m "not slow and not heavy and not oracle"`` with
``MISTRAL_JAX_TEST_TIER=light``, which makes the oracles (torch, transformers, trl, lm-eval, the openai client)
unimportable here, as in the light extra's venv (``pip install -e ".[light]"``, no torch): a light test that
imports one fails at once, on any machine.
``make test-fast`` runs ``-m "not slow"``, ``make test`` everything.
"""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "float32")

if os.environ.get("MISTRAL_JAX_TEST_TIER") == "light":
    from tests.helpers import ORACLES

    for _name in ORACLES:  # None in sys.modules: `import torch` raises ImportError, find_spec("torch") is None
        if _name in sys.modules and sys.modules[_name] is not None:
            raise RuntimeError(f"MISTRAL_JAX_TEST_TIER=light, but {_name} was imported before the tests started. "
                               "Fix: run the light tier in a fresh process (make test-light).")
        sys.modules[_name] = None
    # Files that import an oracle at their top through the package (mistral_jax.evals is lm-eval's backend); every
    # test in them is marked oracle.
    collect_ignore = ["test_eval.py"]


# ------------------------------------------------------------------------------------------- shared fixtures
# Session-scoped and read-only: a test that changes one of these copies it first (tmp_path, shutil.copytree).
import hashlib  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """After each test module, drop JAX's caches of compiled programs: every XLA:CPU executable keeps memory
    mappings of its JIT code, and one process running the whole suite otherwise reaches the kernel's
    vm.max_map_count (65530) and a later compile dies with a segmentation fault (CI, inside test_sharding)."""
    yield
    import gc

    jax.clear_caches()
    gc.collect()


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="session")
def make_tokenizer(tmp_path_factory):
    """``make_tokenizer(corpus="bundled", vocab_size=512, extra_symbols=())`` -> the path of a sentencepiece BPE
    model (``mistral_jax.data.train_tokenizer``: byte fallback, Mistral's special ids) trained on
    ``helpers.tokenizer_corpus(corpus)``; each parameter set is trained once per session and shared. The one place
    the tests train a tokenizer for their own use: a test that needs other properties adds a parameter here, and
    only tests of tokenizer training itself call ``train_tokenizer``."""
    from mistral_jax.data.train_tokenizer import train_tokenizer
    from tests.helpers import tokenizer_corpus

    made: dict[tuple, tuple[str, str]] = {}  # (corpus, vocab_size, extra_symbols) -> (path, sha256)

    def make(corpus: str = "bundled", vocab_size: int = 512, extra_symbols: tuple[str, ...] = ()) -> str:
        key = (corpus, vocab_size, tuple(extra_symbols))
        if key not in made:
            out = tmp_path_factory.mktemp(f"tok_{corpus}_{vocab_size}") / "tokenizer.model"
            path = train_tokenizer(tokenizer_corpus(corpus), str(out), vocab_size, tuple(extra_symbols))
            made[key] = path, _sha256(path)
        return made[key][0]

    yield make
    for path, digest in made.values():
        assert _sha256(path) == digest, f"a test changed the shared tokenizer {path}: copy it before changing it"


@pytest.fixture(scope="session")
def tokenizer_path(make_tokenizer):
    """The tokenizer most tests share: sentencepiece BPE, 512 pieces, trained on the bundled corpus's TRAIN split
    (the vocabulary of ``ModelConfig.tiny()``)."""
    return make_tokenizer("bundled")


@pytest.fixture(scope="session")
def syllable_tokenizer_path(make_tokenizer):
    """sentencepiece BPE, 512 pieces (the vocabulary of ``ModelConfig.tiny()``), trained on
    ``helpers.syllable_corpus()``: made-up words of short syllables, so every id a random tiny model emits decodes
    to readable text."""
    return make_tokenizer("syllable")


@pytest.fixture(scope="session")
def corpus_tokenizer(tokenizer_path):
    """``tokenizer_path`` loaded as a ``mistral_jax.data.tokenizer.Tokenizer``."""
    from mistral_jax.data.tokenizer import Tokenizer

    return Tokenizer(tokenizer_path)


def _tree_digest(root: str) -> str:
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            h.update(os.path.relpath(path, root).encode())
            h.update(_sha256(path).encode())
    return h.hexdigest()


@pytest.fixture(scope="session")
def tiny_trained_run(tmp_path_factory, tokenizer_path):
    """A tiny trained run shared by the tests that start from one (``init_from``): 30 steps of ``configs/tiny.py``
    on the bundled corpus with ``tokenizer_path``, one checkpoint (step 30), its ``tokenizer.model``. Read-only:
    a test that resumes or changes it copies it first."""
    from configs import tiny
    from mistral_jax.training import trainer

    c = tiny.get_config()
    c.update_from_flattened_dict({"num_steps": 30, "log_every": 10, "eval_every": 0, "checkpoint.every_steps": 30,
                                  "data.tokenizer": tokenizer_path, "data.validation": "", "progress_bar": False,
                                  "checkpoint.async_save": False})
    workdir = str(tmp_path_factory.mktemp("tiny_trained") / "run")
    trainer.train(c, workdir)
    digest = _tree_digest(workdir)
    yield workdir
    assert _tree_digest(workdir) == digest, f"a test changed the shared run {workdir}: copy it before changing it"


# ------------------------------------------------------------------------------------------- object storage
# Emulators started by the tests on 127.0.0.1 (tests/emulators.py): a session server each, a new bucket per test.
def _serving(server):
    """Yield ``server`` with its variables in ``os.environ`` (subprocesses inherit them); stop and restore after."""
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield server
    server.stop()
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    from tests.emulators import FakeGCS

    yield from _serving(FakeGCS(str(tmp_path_factory.mktemp("fake-gcs"))))


@pytest.fixture(scope="session")
def s3():
    from tests.emulators import Moto

    yield from _serving(Moto())


@pytest.fixture
def gcs_bucket(gcs):
    """``gs://<fresh bucket>`` on the session's fake-gcs-server."""
    return gcs.bucket()


@pytest.fixture
def s3_bucket(s3):
    """``s3://<fresh bucket>`` on the session's moto server."""
    return s3.bucket()
