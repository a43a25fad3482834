"""Command-line tools check their arguments before loading anything: a bad value is one line naming the flag, the
value and the fix, exit status 2, no traceback (unless MISTRAL_JAX_DEBUG=1 / --verbose).

Order in every tool: flag values first, then paths (checkpoint directory, tokenizer, config file, task YAMLs),
then lm-eval task names, then the model. Most cases run the tools' entry functions in-process with the model
loader replaced by a tripwire (``ModelLoaded``): reaching it fails the test, so each case proves the error came
before any load. A few subprocess runs check the real ``python -m`` / ``python eval.py`` paths end to end.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

from mistral_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ModelLoaded(Exception):
    """Raised by the tripwire that replaces ``load_pretrained``: the tool got as far as loading the model."""


@pytest.fixture
def no_model_load(monkeypatch):
    import mistral_jax.loading

    def tripwire(*args, **kwargs):
        raise ModelLoaded(f"load_pretrained{args} was called")

    monkeypatch.setattr(mistral_jax.loading, "load_pretrained", tripwire)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)


@pytest.fixture
def fake_ckpt(tmp_path):
    """A directory that looks like an HF checkpoint by its file names but holds garbage: loading it would fail
    with some other error, so a flag error reported for it proves nothing was loaded."""
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"not safetensors")
    (d / "tokenizer.model").write_bytes(b"not sentencepiece")
    return str(d)


def _one_line(err: str, prog: str, *expected: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    (line,) = lines
    assert line.startswith(f"{prog}: ") and "Fix: " in line and "Traceback" not in err, line
    for text in expected:
        assert text in line, (text, line)
    return line


# ----------------------------------------------------------------------------------------------------- generate
def _generate(argv, monkeypatch, capsys) -> str:
    """``python -m mistral_jax.generate ARGV`` in-process (the module's ``__main__`` line); returns stderr."""
    import mistral_jax.cli.generate as gen

    monkeypatch.setattr(sys, "argv", ["generate", *argv])
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: gen.main(argv), gen.PROG)
    assert e.value.code == 2
    return capsys.readouterr().err


GENERATE_FLAG_CASES = [  # (extra argv, expected text: the flag and the value)
    (["--temperature", "-1"], "--temperature=-1.0"),
    (["--temperature", "nan"], "--temperature=nan"),
    (["--top_p", "1.5"], "--top_p=1.5"),
    (["--top_p", "0"], "--top_p=0.0"),
    (["--max_new_tokens", "0"], "--max_new_tokens=0"),
    (["--max_new_tokens", "ten"], "--max_new_tokens='ten'"),
    (["--top_k", "0"], "--top_k=0"),
    (["--chunk_size", "0"], "--chunk_size=0"),
    (["--chunk_size", "-4"], "--chunk_size=-4"),
    (["--seed", "1.5"], "--seed='1.5'"),
    (["--seed", "-1"], "--seed=-1"),
    (["--dtype", "fp8"], "--dtype='fp8'"),
    (["--kv_cache_dtype", "int4"], "--kv_cache_dtype='int4'"),
    (["--quantize", "nf4"], "--quantize='nf4'"),
    (["--stop", ""], "--stop=''"),
]


@pytest.mark.parametrize("extra,expected", GENERATE_FLAG_CASES, ids=[" ".join(c[0]) for c in GENERATE_FLAG_CASES])
def test_generate_bad_flag_value(extra, expected, fake_ckpt, no_model_load, monkeypatch, capsys):
    err = _generate(["--checkpoint", fake_ckpt, "--prompt", "hi", *extra], monkeypatch, capsys)
    _one_line(err, "generate", expected)


def test_generate_flags_are_checked_before_paths(no_model_load, monkeypatch, capsys):
    err = _generate(["--checkpoint", "/nope/ckpt", "--prompt", "hi", "--top_p", "1.5"], monkeypatch, capsys)
    _one_line(err, "generate", "--top_p=1.5")


def test_generate_missing_checkpoint_says_so(no_model_load, monkeypatch, capsys):
    line = _one_line(_generate(["--checkpoint", "/nope/ckpt", "--prompt", "hi"], monkeypatch, capsys), "generate",
                     "--checkpoint='/nope/ckpt'", "does not exist", "config.json", "params.json", "model_config.json")
    assert "--tokenizer" not in line  # the old message blamed the tokenizer


@pytest.mark.parametrize("kind", ["not_a_checkpoint", "a_file", "no_weights", "workdir_without_steps"])
def test_generate_checkpoint_that_is_not_one(kind, tmp_path, no_model_load, monkeypatch, capsys):
    d = tmp_path / "d"
    d.mkdir()
    (d / "notes.txt").write_text("x")
    path, problem = str(d), "is not a checkpoint directory"
    if kind == "a_file":
        path, problem = str(d / "notes.txt"), "is a file"
    elif kind == "no_weights":
        (d / "config.json").write_text("{}")
        problem = "has config.json but no weights"
    elif kind == "workdir_without_steps":
        (d / "model_config.json").write_text("{}")
        problem = "has model_config.json but neither params/"
    err = _generate(["--checkpoint", path, "--prompt", "hi"], monkeypatch, capsys)
    _one_line(err, "generate", f"--checkpoint={path!r}", problem)


def test_generate_tokenizer_paths(fake_ckpt, tmp_path, no_model_load, monkeypatch, capsys):
    err = _generate(["--checkpoint", fake_ckpt, "--prompt", "hi", "--tokenizer", "/nope/tok.model"],
                    monkeypatch, capsys)
    _one_line(err, "generate", "--tokenizer='/nope/tok.model'", "does not exist")
    os.remove(os.path.join(fake_ckpt, "tokenizer.model"))
    err = _generate(["--checkpoint", fake_ckpt, "--prompt", "hi"], monkeypatch, capsys)
    _one_line(err, "generate", "--tokenizer=(not given)", "holds no tokenizer.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not sentencepiece")  # loaded (cheaply) before the model, and refused
    err = _generate(["--checkpoint", fake_ckpt, "--prompt", "hi", "--tokenizer", str(bad)], monkeypatch, capsys)
    _one_line(err, "generate", f"--tokenizer={str(bad)!r}", "not a valid sentencepiece model")


@pytest.mark.parametrize("argv,expected", [
    (["--prompt", "hi"], "--checkpoint=(not given) is required"),
    (["--checkpoint", "/nope"], "--prompt=(not given) is required"),
    (["--checkpoint", "/nope", "--prompt", "hi", "--top-p", "0.9"], "unrecognized arguments: --top-p 0.9"),
])
def test_generate_missing_or_unknown_flags(argv, expected, no_model_load, monkeypatch, capsys):
    _one_line(_generate(argv, monkeypatch, capsys), "generate", expected)


# --------------------------------------------------------------------------------------------------------- eval
class _StubTaskManager:
    """lm-eval's TaskManager without the 7-15 s index build (the real one is exercised by a subprocess test)."""

    all_tasks = ["hellaswag", "arc_easy", "arc_challenge", "mmlu"]

    def __init__(self, include_path=None, **kw):
        pass


@pytest.fixture
def eval_cli(no_model_load, monkeypatch, capsys):
    """``python eval.py ARGV`` in-process (absl flag parsing, then ``main``); returns stderr."""
    import lm_eval.tasks

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", _StubTaskManager)
    monkeypatch.syspath_prepend(ROOT)
    ev = importlib.import_module("eval")

    def run(argv):
        monkeypatch.setattr(sys, "argv", ["eval.py", *argv])
        ev.FLAGS.unparse_flags()
        try:
            with pytest.raises(SystemExit) as e:
                ev.main(ev.parse_flags(["eval.py", *argv]))
        finally:
            ev.FLAGS.unparse_flags()
        assert e.value.code == 2
        return capsys.readouterr().err

    return run


EVAL_FLAG_CASES = [  # (argv after --checkpoint CKPT, expected text)
    (["--tasks", "hellaswag", "--limit", "0"], "--limit=0.0"),
    (["--tasks", "hellaswag", "--limit", "-3"], "--limit=-3.0"),
    (["--tasks", "hellaswag", "--limit", "2.5"], "--limit=2.5"),
    (["--tasks", "hellaswag", "--batch_size", "0"], "--batch_size=0"),
    (["--tasks", "hellaswag", "--batch_size", "eight"], "--batch_size=eight"),
    (["--tasks", "hellaswag", "--num_fewshot", "-1"], "--num_fewshot=-1"),
    (["--tasks", "hellaswag", "--max_length", "0"], "--max_length=0"),
    (["--tasks", "hellaswag", "--dtype", "fp16"], "--dtype='fp16'"),
    (["--tasks", "hellaswag", "--quantize", "nf4"], "--quantize='nf4'"),
    (["--tasks", "hellaswag", "--kv_cache_dtype", "fp8"], "--kv_cache_dtype='fp8'"),
    (["--tasks", "hellaswag", "--seed", "1,2"], "--seed='1,2'"),
    (["--tasks", "hellaswag", "--seed", "abc"], "--seed='abc'"),
    (["--tasks", "hellaswag", "--gen_kwargs", "temperature"], "--gen_kwargs='temperature'"),
    (["--tasks", "hellaswag", "--log_samples"], "--output_path=(not given) is needed by --log_samples"),
    ([], "--tasks='' names no task"),
    (["--tasks", " , "], "--tasks=' , ' names no task"),
    (["--suite", "mistral_paperz"], "--suite='mistral_paperz'"),
    (["--tasks", "hellaswag", "extra"], "positional arguments='extra'"),
    (["--tasks", "hellaswag", "--tsks", "x"], "Unknown command line flag 'tsks'"),
    (["--tasks", "hellaswg,arc_easy"], "--tasks='hellaswg,arc_easy' names unknown lm-eval task(s): 'hellaswg' "
                                       "(close matches: hellaswag"),
]


@pytest.mark.parametrize("extra,expected", EVAL_FLAG_CASES, ids=[" ".join(c[0]) or "none" for c in EVAL_FLAG_CASES])
@pytest.mark.oracle
def test_eval_bad_flag_value(extra, expected, fake_ckpt, eval_cli):
    _one_line(eval_cli(["--checkpoint", fake_ckpt, *extra]), "eval.py", expected)


@pytest.mark.oracle
def test_eval_flags_are_checked_before_paths(eval_cli):
    _one_line(eval_cli(["--checkpoint", "/nope/ckpt", "--tasks", "hellaswag", "--batch_size", "0"]), "eval.py",
              "--batch_size=0")
    _one_line(eval_cli(["--checkpoint", "/nope/ckpt", "--tasks", "hellaswg"]), "eval.py",
              "--checkpoint='/nope/ckpt' does not exist")  # paths before task names (their index takes seconds)


@pytest.mark.parametrize("argv,expected", [
    (["--tasks", "hellaswag"], "--checkpoint=(not given) is required"),
    (["--checkpoint", "/nope/ckpt", "--tasks", "hellaswag"], "--checkpoint='/nope/ckpt' does not exist"),
    (["--checkpoint", "{tmp}", "--tasks", "hellaswag"], "is not a checkpoint directory"),
    (["--checkpoint", "{ckpt}", "--tasks", "hellaswag", "--tokenizer", "/nope/t.model"],
     "--tokenizer='/nope/t.model' does not exist"),
    (["--checkpoint", "{ckpt}", "--tasks", "hellaswag", "--include_path", "/nope/tasks"],
     "--include_path='/nope/tasks' does not exist"),
    (["--checkpoint", "{ckpt}", "--tasks", "hellaswag", "--output_path", "{ckpt}/config.json"], "is a file"),
])
@pytest.mark.oracle
def test_eval_bad_paths(argv, expected, fake_ckpt, tmp_path, eval_cli):
    argv = [a.format(tmp=tmp_path, ckpt=fake_ckpt) for a in argv]
    _one_line(eval_cli(argv), "eval.py", expected)


@pytest.mark.oracle
def test_eval_checkpoint_without_tokenizer(fake_ckpt, eval_cli):
    os.remove(os.path.join(fake_ckpt, "tokenizer.model"))
    _one_line(eval_cli(["--checkpoint", fake_ckpt, "--tasks", "hellaswag"]), "eval.py", "--tokenizer=(not given)",
              "holds no tokenizer.model")


@pytest.mark.oracle
def test_evaluate_checks_task_names_before_loading(fake_ckpt, no_model_load):
    from mistral_jax.evals.run import evaluate

    with pytest.raises(ValueError, match=r"unknown lm-eval task\(s\): 'arc_esay' \(close matches: arc_easy"):
        evaluate(checkpoint=fake_ckpt, tasks="arc_esay", task_manager=_StubTaskManager(), verbose=False)


# ------------------------------------------------------------------------------------------------- subprocesses
def _subprocess(argv: list[str], debug: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    env.pop(cli.DEBUG_ENV, None)
    if debug:
        env[cli.DEBUG_ENV] = "1"
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("argv,prog,expected", [
    (["-m", "mistral_jax.cli.generate", "--checkpoint", "{ckpt}", "--prompt", "hi", "--temperature", "-1"], "generate",
     "--temperature=-1.0"),
    (["-m", "mistral_jax.cli.generate", "--checkpoint", "/nope/ckpt", "--prompt", "hi"], "generate",
     "--checkpoint='/nope/ckpt' does not exist"),
    pytest.param(["eval.py", "--checkpoint", "{ckpt}", "--tasks", "hellaswag", "--batch_size", "0"], "eval.py",
                 "--batch_size=0", marks=pytest.mark.oracle),  # checked after eval.py imports lm-eval
    (["eval.py", "--checkpoint", "{ckpt}", "--tasks", "hellaswag", "--batch_size", "x"], "eval.py", "--batch_size=x"),
    (["-m", "mistral_jax.aot", "--config", "configs/tiny.py", "--topology", "a100-8"], "aot", "--topology='a100-8'"),
    (["-m", "mistral_jax.aot", "--config", "configs/tiny.py", "--topology", "v5p-abc"], "aot", "--topology='v5p-abc'"),
    (["-m", "mistral_jax.aot", "--config", "/nope/x.py", "--topology", "v5p-8"], "aot",
     "--config='/nope/x.py' does not exist"),
    (["-m", "mistral_jax.aot", "--config", "/nope/x.py", "--config.batch_size=4"], "aot",
     "--config='/nope/x.py' does not exist"),
    (["-m", "mistral_jax.aot", "--topology", "v5p-8"], "aot", "--config=None"),
    (["-m", "mistral_jax.aot", "--config", "configs/tiny.py", "--config.nope=3"], "aot", "--config.nope"),
])
@pytest.mark.heavy
def test_command_line_argument_errors(argv, prog, expected, fake_ckpt):
    """The real entry points. The checkpoint is garbage behind valid file names: had the tool read it, the error
    would be about its contents, not the flag."""
    res = _subprocess([a.format(ckpt=fake_ckpt) for a in argv])
    assert res.returncode == 2, res.stderr
    _one_line(res.stderr, prog, expected)


@pytest.mark.slow
def test_unknown_lm_eval_task_is_reported_before_the_model_loads(fake_ckpt):
    """The real lm-eval task index; the checkpoint is garbage, so reaching the model load would fail otherwise."""
    res = _subprocess(["eval.py", "--checkpoint", fake_ckpt, "--tasks", "arc_easy,hellaswg"])
    assert res.returncode == 2, res.stderr
    _one_line(res.stderr, "eval.py", "--tasks='arc_easy,hellaswg'", "'hellaswg' (close matches: hellaswag")


@pytest.mark.parametrize("argv", [
    ["-m", "mistral_jax.cli.generate", "--checkpoint", "/nope", "--prompt", "hi", "--top_p", "1.5"],
    ["eval.py", "--checkpoint", "/nope", "--tasks", "hellaswag", "--limit", "0"],
    ["-m", "mistral_jax.aot", "--config", "configs/tiny.py", "--topology", "a100-8"],
])
@pytest.mark.slow
def test_debug_shows_the_traceback(argv):
    res = _subprocess(argv, debug=True)
    assert res.returncode != 0
    assert "Traceback" in res.stderr and "UsageError" in res.stderr, res.stderr
    res = _subprocess(argv + ["--verbose"])
    assert res.returncode != 0
    assert "Traceback" in res.stderr and "UsageError" in res.stderr, res.stderr


# -------------------------------------------------------------------------------------------- an unreachable hub
def _closed_port() -> int:
    """A 127.0.0.1 port nothing listens on (bound, then released: connecting to it is refused)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.oracle  # imports mistral_jax.evals, hence lm-eval (not in the light extra)
def test_hub_probe_tells_refused_from_answering(monkeypatch):
    import http.server
    import threading
    import time

    from mistral_jax.evals import run

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    t0 = time.perf_counter()
    reason = run.hub_unreachable()
    assert reason is not None and "refused" in reason.lower(), reason
    assert time.perf_counter() - t0 < 2
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # answers 501
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        assert run.hub_unreachable() is None  # an error status is an answer: the hub is reachable
    finally:
        server.shutdown()


@pytest.mark.oracle  # imports mistral_jax.evals, hence lm-eval (not in the light extra)
def test_unreachable_hub_switches_datasets_offline(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    from mistral_jax.evals import run

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)  # restored after the test
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(run, "_hub_unreachable_reason", None)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    assert "refused" in run.go_offline_if_hub_unreachable().lower()
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert huggingface_hub.constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
    assert run.go_offline_if_hub_unreachable() is None  # offline already: no second probe


@pytest.mark.slow
def test_eval_notices_an_unreachable_hub_at_once(fake_ckpt):
    """Without offline mode set and with the hub refusing connections, eval.py fails as fast as with offline mode
    set (lm-eval's task index takes ~10 s of both): no retry back-off (1+2+4+8+8 s), no retry warnings, one line."""
    import time

    endpoint = f"http://127.0.0.1:{_closed_port()}"
    argv = [sys.executable, "eval.py", "--checkpoint", fake_ckpt, "--tasks", "hellaswag"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_ENDPOINT": endpoint}
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", cli.DEBUG_ENV):
        env.pop(name, None)
    times = {}
    for mode, extra in (("offline", {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}), ("probe", {})):
        t0 = time.perf_counter()
        res = subprocess.run(argv, cwd=ROOT, env={**env, **extra}, capture_output=True, text=True, timeout=300)
        times[mode] = time.perf_counter() - t0
        assert res.returncode == 2, res.stderr
        assert "retry" not in res.stderr.lower(), res.stderr
        line = _one_line(res.stderr, "eval.py", "task 'hellaswag'", "Rowan/hellaswag", "pre-download")
    assert f"HF hub {endpoint} is unreachable" in line and "Connection refused" in line, line
    assert times["probe"] < times["offline"] + 5, times


MC_YAML = """task: local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory, syllable_tokenizer_path):
    """A tiny mistral_jax export (Orbax params: the format whose loader logs the most) with a tokenizer."""
    import json

    from flax import nnx

    import mistral_jax as mj
    from tests.helpers import syllable_corpus

    root = tmp_path_factory.mktemp("tiny")
    words, _ = syllable_corpus()
    cfg = mj.ModelConfig.tiny()
    tok = syllable_tokenizer_path  # vocab_size == cfg.vocab_size: every id the model emits decodes
    mj.save_jax(mj.Transformer(cfg, rngs=nnx.Rngs(0)), str(root / "export"), tokenizer=tok)
    (root / "tasks").mkdir()
    with open(root / "mc.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"question": " ".join(words[i:i + 5]), "choices": words[:3], "label": i % 3}) + "\n")
    (root / "tasks" / "local_mc.yaml").write_text(MC_YAML.format(data=root / "mc.jsonl"))
    return root


def _chatter(stderr: str) -> list[str]:
    """Library log lines: absl INFO lines (``I1129 23:04:09.742455 ...``), Orbax messages, metadata warnings."""
    import re

    return [line for line in stderr.splitlines() if re.match(r"\s*I\d{4} ", line) or "orbax" in line.lower()
            or "etadata file does not exist" in line]


@pytest.mark.slow
def test_normal_path_prints_no_library_chatter(tiny_export):
    res = _subprocess(["-m", "mistral_jax.cli.generate", "--checkpoint", str(tiny_export / "export"), "--prompt",
                          "ka ri", "--max_new_tokens", "4"])
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and "including compilation" in res.stderr
    res = _subprocess(["eval.py", "--checkpoint", str(tiny_export / "export"), "--tasks", "local_mc",
                          "--include_path", str(tiny_export / "tasks"), "--limit", "2", "--batch_size", "2"])
    assert res.returncode == 0, res.stderr
    assert "local_mc" in res.stdout and not _chatter(res.stderr), _chatter(res.stderr)


# ------------------------------------------------------------------------------------------------------- train
def _train(workdir: str, *overrides: str, wrap: list[str] = ()) -> subprocess.CompletedProcess:
    """``python train.py --config configs/tiny.py --workdir WORKDIR OVERRIDES`` (``wrap``: a command in front)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop(cli.DEBUG_ENV, None)
    return subprocess.run([*wrap, sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", workdir,
                           *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _read_only_dir(path) -> list[str]:
    """Make ``path`` (a new directory) read-only for the train.py run; returns the command to put in front of it.

    Not root: the permission bits. Root ignores them: a read-only tmpfs mounted over ``path`` in a private mount
    namespace of the child (``unshare -m``), seen by that command only."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        return []
    wrap = ["unshare", "-m", "sh", "-c", f'mount -t tmpfs -o ro,size=1m none "{path}" && exec "$@"', "sh"]
    probe = subprocess.run([*wrap, "touch", str(path / "x")], capture_output=True, text=True)
    assert probe.returncode != 0 and "Read-only" in probe.stderr, ("cannot make a read-only directory as root here "
                                                                   f"(unshare/mount): {probe.stderr}")
    return wrap


def _one_line_naming(res: subprocess.CompletedProcess, *expected: str, only: bool = True) -> str:
    """The error is one line ``train: ... Fix: ...`` (the last; with ``only``, the only line on stderr)."""
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert (len(lines) == 1 or not only) and "Traceback" not in res.stderr, res.stderr
    lines = lines[-1:]
    assert lines[0].startswith("train: ") and "Fix: " in lines[0], lines[0]
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


@pytest.mark.slow
def test_train_missing_tokenizer_is_one_line_before_the_workdir_is_made(tmp_path):
    workdir = tmp_path / "run"
    res = _train(str(workdir), "--config.data.tokenizer=/nope/tok.model")
    _one_line_naming(res, "config.data.tokenizer='/nope/tok.model' does not exist")
    assert not workdir.exists()  # no empty checkpoints/ (nor the workdir) left behind
    workdir.mkdir()  # an existing workdir gets nothing new either
    res = _train(str(workdir), f"--config.data.tokenizer={tmp_path}")
    _one_line_naming(res, f"config.data.tokenizer={str(tmp_path)!r} is a directory without tokenizer.model")
    assert os.listdir(workdir) == []


@pytest.mark.slow
def test_train_read_only_workdir_is_one_line(tmp_path):
    ro = tmp_path / "ro"
    wrap = _read_only_dir(ro)
    for workdir in (ro / "run", ro):  # a new workdir inside a read-only directory, and a read-only workdir
        res = _train(str(workdir), "--config.data.tokenizer=", wrap=wrap)
        _one_line_naming(res, f"--workdir={workdir} cannot be written", "Fix: ")
    assert os.listdir(ro) == []  # nothing left behind (as root: the directory under the mount, empty either way)


@pytest.mark.slow
def test_train_on_random_bytes_is_refused_leaving_no_checkpoints(tmp_path):
    """A .txt of random bytes holds no UTF-8 text: refused in one line (not trained on with a warning), and the
    checkpoint directory, made at the first save, is not left behind empty."""
    import numpy as np

    noise = tmp_path / "noise.txt"
    noise.write_bytes(np.random.default_rng(0).bytes(50_000))
    workdir = tmp_path / "run"
    res = _train(str(workdir), f"--config.data.train={noise}", "--config.data.validation=", "--config.num_steps=2",
                 "--config.optimizer.warmup_steps=0")  # before the fix: it trained
    _one_line_naming(res, f"DataError: {noise}: ", "are not valid UTF-8", "re-encode the file as UTF-8",
                     only=False)  # the run's INFO line (recipe, mesh) comes first
    assert not (workdir / "checkpoints").exists(), os.listdir(workdir)


# ---------------------------------------------------------------------------------------------- train_tokenizer
def test_train_tokenizer_never_replaces_a_file_by_accident(tmp_path, capsys):
    """An existing --output is refused (byte-identical afterwards) unless --overwrite; bad values are one line."""
    # Trains its own tokenizer: the train-tokenizer command's output handling is what this test is about.
    from mistral_jax.cli import train_tokenizer as tt

    text = tmp_path / "text.txt"
    text.write_text("".join(f"the quick brown fox {i} jumps over the lazy dog\n" for i in range(200)))
    out = tmp_path / "tok.model"
    out.write_bytes(b"precious")
    for argv, flag in ((["--input", str(text), "--output", str(out)], "--output"),
                       (["--input", str(tmp_path / "nope.txt"), "--output", str(tmp_path / "x.model")], "--input"),
                       (["--input", str(text), "--output", str(out), "--vocab_size", "0"], "--vocab_size"),
                       (["--input", str(text), "--output", str(tmp_path)], "--output")):
        with pytest.raises(SystemExit) as e:
            cli.run(lambda argv=argv: tt.main(argv), tt.PROG)
        assert e.value.code == 2
        _one_line(capsys.readouterr().err, tt.PROG, flag)
        assert out.read_bytes() == b"precious"
    assert tt.main(["--input", str(text), "--output", str(out), "--overwrite", "--vocab_size", "300"]) == str(out)
    from mistral_jax.data.tokenizer import Tokenizer

    assert Tokenizer(str(out)).vocab_size == 300
