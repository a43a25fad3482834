"""Nothing lost by conversion and export: outputs never overwrite inputs, ``--overwrite`` never replaces a run,
killed conversions' temporary dirs are cleaned, tokenizers and index entries are checked, a LoRA workdir loads
merged, and the CLIs report bad arguments as one line (exit status 2) before loading anything.

Every refusal asserts that each file of the pre-existing directories is byte-identical afterwards (``_tree``).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import mistral_jax as mj
from mistral_jax import cli, lora
from mistral_jax.cli import lora as lora_cli
from mistral_jax.cli.convert import main as convert_main
from mistral_jax.convert import paths
from mistral_jax.model.transformer import params_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = mj.ModelConfig.tiny(dim=32, hidden_dim=64, head_dim=8)  # vocab 512: the shared tokenizer_path's
TOKENS = np.random.default_rng(0).integers(3, 320, (2, 20)).astype(np.int32)
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
ENV.pop("MISTRAL_JAX_DEBUG", None)


def _tree(root) -> dict[str, str]:
    """Every entry under ``root``: file -> sha256 of its bytes, dir -> 'dir', symlink -> its target."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = "link:" + os.readlink(p)
            elif os.path.isdir(p):
                out[rel] = "dir"
            else:
                with open(p, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def _logits(model) -> np.ndarray:
    return np.asarray(model(TOKENS))


def _save_ckpt(workdir, step: int, params) -> None:
    from mistral_jax.training.checkpoint import ITEMS

    mgr = ocp.CheckpointManager(str(workdir / "checkpoints"), item_names=ITEMS)
    mgr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                           meta=ocp.args.JsonSave({"step": step})))
    mgr.wait_until_finished()
    mgr.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer_path):
    """runs/{base_hf, run, sibling, lora}: an HF base model with a tokenizer, a training workdir (as train.py lays it
    out), a sibling run, and a LoRA run on the base (run_config.json + adapter-only checkpoint)."""
    from configs import tiny_sft

    root = tmp_path_factory.mktemp("world")
    runs = root / "runs"
    tok = tokenizer_path  # shared, read-only: the runs below get copies
    base = mj.Transformer(CFG, rngs=nnx.Rngs(0))
    mj.save_hf(base, runs / "base_hf", tokenizer=tok)

    for name in ("run", "sibling"):  # a training workdir: configs, tokenizer, checkpoints, metrics, TensorBoard
        wd = runs / name
        wd.mkdir(parents=True)
        (wd / "model_config.json").write_text(json.dumps(CFG.to_dict()))
        (wd / "run_config.json").write_text(json.dumps({"seed": 0, "lora": {"rank": 0}}))
        (wd / "tokenizer.model").write_bytes(open(tok, "rb").read())
        (wd / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
        (wd / "tb").mkdir()
        (wd / "tb" / "events.out.tfevents.1").write_bytes(b"\x00tb")
        _save_ckpt(wd, 5, params_dict(base))

    # a LoRA run as train.py writes it (configs/tiny_sft.py with lora.rank > 0): checkpoints hold only adapters
    c = tiny_sft.get_config()
    c.init_from = str(runs / "base_hf")
    c.lora.rank, c.lora.alpha, c.lora.targets = 2, 4.0, "wq,wv,w2"
    wd = runs / "lora"
    wd.mkdir()
    (wd / "run_config.json").write_text(c.to_json_best_effort(indent=2))
    (wd / "model_config.json").write_text(json.dumps(CFG.replace(param_dtype="float32").to_dict()))
    (wd / "tokenizer.model").write_bytes(open(tok, "rb").read())
    like = lora.apply_lora(mj.load_pretrained(runs / "base_hf"), 2, 4.0, "wq,wv,w2", seed=int(c.seed))
    state = lora.adapter_state(like)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(1)
    nnx.update(like, jax.tree.unflatten(treedef, [rng.normal(0, 0.2, x.shape).astype(np.float32) for x in leaves]))
    _save_ckpt(wd, 3, jax.tree.map(np.asarray, nnx.to_pure_dict(lora.adapter_state(like))))
    return {"root": root, "runs": runs, "tok": tok, "lora_logits": _logits(like)}


def _refused(capsys, argv, *needles, code=2, main=convert_main):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == code, err
    assert err.count("\n") == 0 and "Traceback" not in err, err  # one line
    assert "Fix:" in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


# ----------------------------------------------------------------------------- output vs input
@pytest.mark.parametrize("where", ["same", "inside", "parent", "symlink"])
@pytest.mark.slow
def test_cli_output_never_input_inside_or_parent(world, capsys, tmp_path, where):
    runs = world["runs"]
    link = tmp_path / "link"
    link.symlink_to(runs / "run")
    out = {"same": runs / "run", "inside": runs / "run" / "export", "parent": runs, "symlink": link}[where]
    before = _tree(world["root"])
    cause = {"same": "is the input directory", "inside": "lies inside the input directory",
             "parent": "contains the input directory", "symlink": "is the input directory"}[where]
    _refused(capsys, ["--from", "jax", "--to", "hf", "--input", str(runs / "run"), "--output", str(out),
                      "--overwrite"], "--output=", cause)
    assert _tree(world["root"]) == before


@pytest.mark.slow
def test_cli_overwrite_never_replaces_a_run_or_another_kind(world, capsys, tmp_path):
    runs = world["runs"]
    before = _tree(world["root"])
    # a sibling training run (not the input) is never replaced, with or without --overwrite
    _refused(capsys, ["--from", "jax", "--to", "jax", "--input", str(runs / "run"), "--output",
                      str(runs / "sibling"), "--overwrite"], "--output=", "holds a training run", "new output path")
    # an HF checkpoint is not a previous mistral export
    _refused(capsys, ["--from", "jax", "--to", "mistral", "--input", str(runs / "run"), "--output",
                      str(runs / "base_hf"), "--overwrite"], "not a previous mistral export")
    assert _tree(world["root"]) == before
    # a directory of other things (e.g. sibling runs' exports) is not replaced either
    other = tmp_path / "exports"
    (other / "v1").mkdir(parents=True)
    (other / "config.json").write_text("{}")
    _refused(capsys, ["--from", "hf", "--to", "hf", "--input", str(runs / "base_hf"), "--output", str(other),
                      "--overwrite"], "not a previous hf export", "v1")
    assert (other / "v1").is_dir()
    # a previous export of the same kind: refused without --overwrite, replaced with it
    assert convert_main(["--from", "hf", "--to", "hf", "--input", str(runs / "base_hf"), "--output",
                         str(tmp_path / "exp"), "--max_shard_size", "20000"]) == 0
    _refused(capsys, ["--from", "hf", "--to", "hf", "--input", str(runs / "base_hf"), "--output",
                      str(tmp_path / "exp")], "--output=", "pass --overwrite")
    assert convert_main(["--from", "hf", "--to", "hf", "--input", str(runs / "base_hf"), "--output",
                         str(tmp_path / "exp"), "--overwrite"]) == 0
    assert sorted(os.listdir(tmp_path / "exp")) == sorted(os.listdir(runs / "base_hf"))  # one file again, no shards
    assert _tree(world["root"]) == before


@pytest.mark.slow
def test_api_refuses_output_over_input(world, tmp_path):
    runs = world["runs"]
    before = _tree(world["root"])
    with pytest.raises(paths.OutputPathError, match="is the input directory.*Fix:"):
        mj.convert("jax", "jax", runs / "run", runs / "run", overwrite=True)
    with pytest.raises(paths.OutputPathError, match="contains the input directory"):
        mj.convert("hf", "hf", runs / "base_hf", runs, overwrite=True)
    model = mj.load_pretrained(runs / "run")
    for save in (mj.save_hf, mj.save_mistral, mj.save_jax):
        with pytest.raises(paths.OutputPathError, match="the input directory"):
            save(model, runs / "run", overwrite=True)
        with pytest.raises(paths.OutputPathError, match="contains the input directory"):
            save(model, runs, overwrite=True)
    with pytest.raises(FileExistsError, match="holds a training run"):
        mj.save_jax(model, runs / "sibling", overwrite=True)
    with pytest.raises(paths.OutputPathError, match="contains .*tokenizer.model"):  # the tokenizer is read too
        mj.save_hf(mj.Transformer(CFG, rngs=nnx.Rngs(0)), runs / "run", tokenizer=runs / "run" / "tokenizer.model",
                   overwrite=True)
    assert _tree(world["root"]) == before


# ----------------------------------------------------------------------------- argument checks (CLI)
@pytest.mark.slow
def test_cli_bad_arguments_one_line_exit_2(world, capsys, tmp_path):
    runs = world["runs"]
    base = ["--from", "hf", "--to", "mistral", "--input", str(runs / "base_hf"), "--output", str(tmp_path / "o")]
    _refused(capsys, ["--from", "hf", "--to", "mistral", "--input", str(tmp_path / "nowhere"), "--output",
                      str(tmp_path / "o")], "--input=", "does not exist")
    _refused(capsys, [*base, "--dtype", "fp8"], "--dtype='fp8'", "bfloat16")
    _refused(capsys, [*base, "--max_shard_size", "5 lightyears"], "--max_shard_size='5 lightyears'", "5GB")
    _refused(capsys, [*base, "--max_shard_size", "0"], "--max_shard_size='0'")
    _refused(capsys, ["--from", "safetensors", *base[2:]], "--from", "invalid choice")
    _refused(capsys, base[:4], "--output", "required")
    assert not (tmp_path / "o").exists()
    with pytest.raises(cli.UsageError, match="--dtype"):
        convert_main([*base, "--dtype", "fp8", "--verbose"])  # --verbose: the exception, with its traceback


@pytest.mark.slow
def test_cli_subprocess_exit_status_and_no_noise(world, tmp_path):
    runs = world["runs"]
    before = _tree(world["root"])
    r = subprocess.run([sys.executable, "-m", "mistral_jax.convert", "--from", "jax", "--to", "jax", "--input",
                        str(runs / "run"), "--output", str(runs / "run"), "--overwrite"],
                       capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--output=" in lines[0] and "Fix:" in lines[0], r.stderr
    # the normal path (Orbax restore + save) prints no INFO chatter or metadata warnings
    r = subprocess.run([sys.executable, "-m", "mistral_jax.convert", "--from", "jax", "--to", "jax", "--input",
                        str(runs / "run"), "--output", str(tmp_path / "exp")],
                       capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr
    assert r.stdout.startswith("wrote jax checkpoint"), r.stdout
    assert _tree(world["root"]) == before
    np.testing.assert_array_equal(_logits(mj.load_pretrained(tmp_path / "exp")),
                                  _logits(mj.load_pretrained(runs / "run")))


# ----------------------------------------------------------------------------- killed conversions
KILLED = textwrap.dedent("""
    import os, signal, sys
    from mistral_jax.convert import paths
    with paths.atomic_dir(sys.argv[1], kind="hf") as tmp:
        open(os.path.join(tmp, "model.safetensors"), "wb").write(b"partial")
        os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.slow
def test_stale_temp_dir_of_dead_process_cleaned_live_one_kept(world, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", KILLED, str(out)], env=ENV, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr
    stale = [n for n in os.listdir(tmp_path) if n.startswith(".out.tmp-")]
    assert len(stale) == 1 and not out.exists()  # what a killed conversion leaves
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        mine = os.path.basename(paths.temp_name(str(out)))
        live_tmp = tmp_path / mine.replace(f"-{os.getpid()}-", f"-{live.pid}-")
        live_tmp.mkdir()
        (live_tmp / "model.safetensors").write_bytes(b"being written")
        foreign = tmp_path / ".out.tmp-notours"
        foreign.mkdir()
        mj.convert("hf", "hf", world["runs"] / "base_hf", out)
        left = sorted(n for n in os.listdir(tmp_path) if n != "out")
        assert left == sorted([live_tmp.name, foreign.name])  # the dead one is gone, the others untouched
        assert (live_tmp / "model.safetensors").read_bytes() == b"being written"
        assert "model.safetensors" in os.listdir(out)
    finally:
        live.kill()
        live.wait()
    # the live process is dead now: the next conversion into the same place removes its leftovers too
    mj.convert("hf", "hf", world["runs"] / "base_hf", out, overwrite=True)
    assert sorted(n for n in os.listdir(tmp_path) if n != "out") == [foreign.name]


def test_parked_export_of_killed_conversion_is_restored(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    out = tmp_path / "exp"
    parked = tmp_path / os.path.basename(paths.temp_name(str(out), "old")).replace(f"-{os.getpid()}-", f"-{pid}-")
    parked.mkdir()
    (parked / "config.json").write_text("{}")
    assert paths.clean_stale(out) == [str(parked)]
    assert (out / "config.json").read_text() == "{}" and not parked.exists()


# ----------------------------------------------------------------------------- symlinks and index entries
@pytest.mark.slow
def test_symlinked_tokenizer_must_be_a_tokenizer(world, tmp_path, capsys):
    src = tmp_path / "hf"
    src.mkdir()
    for n in os.listdir(world["runs"] / "base_hf"):
        if n != "tokenizer.model":
            (src / n).write_bytes((world["runs"] / "base_hf" / n).read_bytes())
    secret = tmp_path / "secret.txt"
    secret.write_text("password=hunter2\n")
    (src / "tokenizer.model").symlink_to(secret)
    before = _tree(tmp_path)
    err = _refused(capsys, ["--from", "hf", "--to", "mistral", "--input", str(src), "--output", str(tmp_path / "m")],
                   "not a sentencepiece model", "secret.txt", code=1)
    assert "hunter2" not in err
    assert not (tmp_path / "m").exists() and _tree(tmp_path) == before
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        mj.save_hf(mj.Transformer(CFG, rngs=nnx.Rngs(0)), tmp_path / "x", tokenizer=secret)
    assert not (tmp_path / "x").exists()
    # a symlink to a real sentencepiece model (as in the HF hub cache) is fine, and so is a tekken.json
    (src / "tokenizer.model").unlink()
    (src / "tokenizer.model").symlink_to(world["tok"])
    mj.convert("hf", "mistral", src, tmp_path / "m")
    assert (tmp_path / "m" / "tokenizer.model").read_bytes() == open(world["tok"], "rb").read()
    tekken = tmp_path / "tk" / "tekken.json"
    tekken.parent.mkdir()
    tekken.write_text(json.dumps({"config": {}, "vocab": [{"rank": 0, "token_bytes": "YQ=="}]}))
    mj.save_mistral(mj.Transformer(CFG, rngs=nnx.Rngs(0)), tmp_path / "t", tokenizer=tekken)
    assert "tekken.json" in os.listdir(tmp_path / "t")
    tekken.write_text(json.dumps({"vocab": []}))
    with pytest.raises(ValueError, match="not a tekken tokenizer"):
        mj.save_mistral(mj.Transformer(CFG, rngs=nnx.Rngs(0)), tmp_path / "t2", tokenizer=tekken)


@pytest.mark.slow
def test_index_entries_must_name_files_inside_the_input(world, tmp_path):
    src = tmp_path / "in" / "hf"
    mj.convert("hf", "hf", world["runs"] / "base_hf", src, max_shard_size=20000)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.replace(src / shard, elsewhere / "x.safetensors")  # a complete, valid shard, outside the input directory
    index["weight_map"] = {k: ("../../elsewhere/x.safetensors" if v == shard else v)
                           for k, v in index["weight_map"].items()}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(mj.ConversionError, match=r"\.\./\.\./elsewhere/x\.safetensors.*not a file of the checkpoint"):
        mj.load_pretrained(src)
    index["weight_map"] = {k: str(elsewhere / "x.safetensors") if "elsewhere" in v else v
                           for k, v in index["weight_map"].items()}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(mj.ConversionError, match="Fix: an index may only name shard files inside"):
        mj.convert("hf", "mistral", src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- LoRA workdirs
@pytest.mark.slow
def test_lora_workdir_loads_merged(world, tmp_path):
    wd = world["runs"] / "lora"
    before = _tree(world["root"])
    got = mj.load_pretrained(wd)
    assert not lora.is_lora(got)
    np.testing.assert_allclose(_logits(got), world["lora_logits"], atol=1e-5, rtol=0)  # = base + adapters
    np.testing.assert_array_equal(_logits(mj.load_pretrained(wd / "checkpoints" / "3")), _logits(got))
    # = what lora's own export writes (merged on the 8-device mesh: sums in another order), read back from HF files
    assert lora_cli.main(["--workdir", str(wd), "--output", str(tmp_path / "exp"), "--to", "hf"]) == 0
    np.testing.assert_allclose(_logits(mj.load_pretrained(tmp_path / "exp")), _logits(got), atol=1e-6, rtol=0)
    assert (tmp_path / "exp" / "tokenizer.model").read_bytes() == (wd / "tokenizer.model").read_bytes()
    # convert --from jax accepts it too
    assert convert_main(["--from", "jax", "--to", "mistral", "--input", str(wd), "--output", str(tmp_path / "m")]) == 0
    np.testing.assert_allclose(_logits(mj.load_pretrained(tmp_path / "m")), _logits(got), atol=1e-6, rtol=0)
    # and so does generate (through load_pretrained), with the workdir's tokenizer
    generate_cli = importlib.import_module("mistral_jax.cli.generate")
    tok = mj.Tokenizer(wd / "tokenizer.model")
    text = generate_cli.main(["--checkpoint", str(wd), "--prompt", "the quick", "--max_new_tokens", "4"])
    assert text == tok.decode(mj.generate(got, tok.encode("the quick"), max_new_tokens=4))
    assert _tree(world["root"]) == before


@pytest.mark.slow
def test_lora_workdir_without_base_or_run_config_says_so(world, tmp_path):
    import shutil

    wd = tmp_path / "lora"
    shutil.copytree(world["runs"] / "lora", wd)
    run = json.loads((wd / "run_config.json").read_text())
    run["init_from"] = str(tmp_path / "gone")
    (wd / "run_config.json").write_text(json.dumps(run))
    with pytest.raises(FileNotFoundError, match=r"is a LoRA training workdir.*init_from=.*gone.*mistral-jax-lora"):
        mj.load_pretrained(wd)
    (wd / "run_config.json").unlink()  # without its run config, the adapters alone cannot be a model
    with pytest.raises(ValueError, match=r"holds only LoRA adapters.*LoRA training workdir.*mistral-jax-lora "
                                         r"--workdir") as e:
        mj.load_pretrained(wd)
    assert "missing parameter" not in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_lora_cli_checks_arguments(world, capsys, tmp_path):
    runs = world["runs"]
    before = _tree(world["root"])
    wd = str(runs / "lora")
    _refused(capsys, ["--workdir", str(runs / "run"), "--output", str(tmp_path / "o")],
             "--workdir=", "not a LoRA training run", "mistral_jax.convert", main=lora_cli.main)
    _refused(capsys, ["--workdir", wd, "--output", str(tmp_path / "o"), "--step", "7"], "--step=7", "[3]",
             main=lora_cli.main)
    _refused(capsys, ["--workdir", wd, "--output", str(runs / "lora" / "export")], "--output=", "inside",
             main=lora_cli.main)
    _refused(capsys, ["--workdir", wd, "--output", str(runs / "base_hf"), "--overwrite"], "--output=",
             "the input directory", main=lora_cli.main)  # the base model is read too
    _refused(capsys, ["--workdir", wd, "--output", str(tmp_path / "o"), "--dtype", "int4"], "--dtype=",
             main=lora_cli.main)
    _refused(capsys, ["--workdir", str(tmp_path / "nope"), "--output", str(tmp_path / "o")], "does not exist",
             main=lora_cli.main)
    assert not (tmp_path / "o").exists() and _tree(world["root"]) == before
