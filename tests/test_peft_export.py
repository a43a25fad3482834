"""LoRA export in PEFT's format (``mistral-jax-lora --to peft``, ``export.save_peft``, ``convert/peft.py``): the oracle
is ``peft.PeftModel.from_pretrained`` over the HF export of the base, whose logits must equal the project's LoRA
model (merged and unmerged) to 1e-4."""

import json
import os
import shutil

import numpy as np
import pytest

import mistral_jax as mj
from tests.helpers import random_tokens

# two sequences, each longer than the tiny model's window of 16
TOKENS = random_tokens(7, 512, 2, 40, low=3)
LONG = random_tokens(8, 512, 1, 70, low=3)


@pytest.fixture(scope="module")
def lora_workdir(tmp_path_factory, tiny_trained_run, tokenizer_path):
    """A real LoRA run through train.py's trainer: 6 steps of rank-4 adapters on every target over the shared
    ``tiny_trained_run``, at a learning rate high enough that B moves well off zero."""
    from configs import tiny
    from mistral_jax.training import trainer

    c = tiny.get_config()
    c.init_from = tiny_trained_run
    c.update_from_flattened_dict({"num_steps": 6, "log_every": 3, "eval_every": 0, "checkpoint.every_steps": 6,
                                  "data.tokenizer": tokenizer_path, "data.validation": "", "progress_bar": False,
                                  "checkpoint.async_save": False, "lora.rank": 4, "lora.alpha": 8.0,
                                  "lora.targets": "all", "optimizer.learning_rate": 3e-2,
                                  "optimizer.warmup_steps": 0})
    workdir = str(tmp_path_factory.mktemp("peft_lora") / "run")
    assert trainer.train(c, workdir)["step"] == 6
    return workdir


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory, tiny_trained_run):
    """The LoRA run's base (its init_from) exported to HF, as PEFT's base model."""
    out = str(tmp_path_factory.mktemp("peft_base") / "hf")
    mj.save_hf(mj.load_pretrained(tiny_trained_run), out)
    return out


def _peft_logits(hf_dir, peft_dir, tokens):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        plain = [base(torch.tensor(np.asarray(t), dtype=torch.long)).logits.numpy() for t in tokens]
    model = PeftModel.from_pretrained(base, peft_dir).eval()
    with torch.no_grad():
        adapted = [model(torch.tensor(np.asarray(t), dtype=torch.long)).logits.numpy() for t in tokens]
    return adapted, plain


@pytest.mark.oracle
@pytest.mark.heavy
def test_peft_model_over_the_hf_base_equals_the_lora_run(lora_workdir, hf_base, tiny_trained_run, tmp_path):
    import torch
    from peft import LoraConfig
    from safetensors import safe_open

    from mistral_jax.cli import lora as lora_cli
    from mistral_jax.loading import load_lora_adapters

    out = str(tmp_path / "peft")
    assert lora_cli.main(["--workdir", lora_workdir, "--output", out, "--to", "peft"]) == 0
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = LoraConfig.from_pretrained(out)  # PEFT's own reading of adapter_config.json
    assert (config.peft_type.value, config.task_type, config.r, config.lora_alpha) == ("LORA", "CAUSAL_LM", 4, 8)
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"}
    assert config.base_model_name_or_path == tiny_trained_run  # the run's init_from, as given
    assert not config.use_rslora and not config.fan_in_fan_out and config.lora_dropout == 0 and config.bias == "none"

    adapted, plain = _peft_logits(hf_base, out, [TOKENS, LONG])
    merged = mj.load_pretrained(lora_workdir)  # base + adapters merged
    unmerged = load_lora_adapters(lora_workdir)  # LoRAWeight: W + scale * A @ B formed in the forward
    worst = 0.0
    for tokens, peft_logits, base_logits in zip([TOKENS, LONG], adapted, plain, strict=True):
        for ours in (merged, unmerged):
            logits = np.asarray(ours(tokens))
            worst = max(worst, float(np.abs(logits - peft_logits).max()))
            np.testing.assert_allclose(peft_logits, logits, atol=1e-4, rtol=0)
        assert np.abs(peft_logits - base_logits).max() > 1e-3  # the adapter is not a no-op
    print(f"max |PEFT - mistral_jax| logits: {worst:.2e}")

    # --dtype: the same adapters rounded to bfloat16, over the previous export (--overwrite)
    weights = os.path.join(out, "adapter_model.safetensors")
    with safe_open(weights, "pt") as f:
        f32 = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    assert lora_cli.main(["--workdir", lora_workdir, "--output", out, "--to", "peft", "--dtype", "bfloat16"]) == 2
    assert lora_cli.main(["--workdir", lora_workdir, "--output", out, "--to", "peft", "--dtype", "bfloat16",
                          "--overwrite"]) == 0
    with safe_open(weights, "pt") as f:
        assert sorted(f.keys()) == sorted(f32)
        for k, v in f32.items():
            assert f.get_tensor(k).dtype == torch.bfloat16 and torch.equal(f.get_tensor(k), v.to(torch.bfloat16))


@pytest.mark.oracle
@pytest.mark.heavy
@pytest.mark.parametrize("targets", ["all", "wq,w2"])
def test_mixtral_expert_adapters_load_into_peft(tmp_path, targets):
    """Mixtral's expert adapters (one pair per expert) written with HF's per-expert names, which PEFT fuses into
    transformers' stacked experts as it loads them."""
    import jax
    from flax import nnx

    from mistral_jax import lora
    from mistral_jax.export import save_peft

    cfg = mj.ModelConfig.tiny_mixtral()
    base = mj.Transformer(cfg, rngs=nnx.Rngs(0))
    hf_dir = str(tmp_path / "hf")
    mj.save_hf(base, hf_dir)
    model = lora.apply_lora(nnx.clone(base), 4, 8.0, targets, seed=1)
    rng = np.random.default_rng(0)  # B is zero at init: random adapters make every pair count
    state = jax.tree.map(lambda x: rng.normal(0, 0.1, x.shape).astype(np.float32), lora.adapter_state(model))
    nnx.update(model, state)
    out = save_peft(model, str(tmp_path / "peft"), base_model=hf_dir)
    assert json.load(open(os.path.join(out, "adapter_config.json")))["base_model_name_or_path"] == hf_dir
    (adapted,), (plain,) = _peft_logits(hf_dir, out, [TOKENS])
    np.testing.assert_allclose(adapted, np.asarray(model(TOKENS)), atol=1e-4, rtol=0)
    assert np.abs(adapted - plain).max() > 1e-3


def test_adapters_peft_cannot_load_are_refused_before_writing(tmp_path):
    from flax import nnx

    from mistral_jax import lora
    from mistral_jax.export import save_peft

    cfg = mj.ModelConfig.tiny_mixtral(n_layers=1)
    for targets in ("w1", "w1,w3"):  # PEFT refuses w1 alone, and drops w1 + w3 without w2 silently
        model = nnx.eval_shape(lambda t=targets: lora.apply_lora(mj.Transformer(cfg, rngs=nnx.Rngs(0)), 2, 4.0, t))
        with pytest.raises(ValueError, match=r"Mixtral experts' w1.*\. Fix: export the run merged"):
            save_peft(model, str(tmp_path / "out"))
        assert not (tmp_path / "out").exists()
    plain = nnx.eval_shape(lambda: mj.Transformer(mj.ModelConfig.tiny(n_layers=1), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"no LoRA adapters \(a plain or merged model\)\. Fix"):
        save_peft(plain, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def _one_line_error(capsys, prog="mistral-jax-lora"):
    err = capsys.readouterr().err.strip()
    assert err.startswith(prog + ": ") and "\n" not in err and ". Fix: " in err, err
    return err


@pytest.mark.heavy
def test_peft_misuse_is_one_line_and_writes_nothing(tiny_trained_run, lora_workdir, tmp_path, capsys):
    from mistral_jax.cli import lora as lora_cli

    out = tmp_path / "peft"
    # a run without adapters (full training): nothing to export
    assert lora_cli.main(["--workdir", tiny_trained_run, "--output", str(out), "--to", "peft"]) == 2
    err = _one_line_error(capsys)
    assert "is not a LoRA training run" in err and "--to hf" in err
    # a LoRA run on a fresh seeded init: no HF checkpoint holds its base
    fresh = tmp_path / "fresh"
    shutil.copytree(lora_workdir, fresh)
    run = json.loads((fresh / "run_config.json").read_text())
    run["init_from"] = ""
    (fresh / "run_config.json").write_text(json.dumps(run))
    assert lora_cli.main(["--workdir", str(fresh), "--output", str(out), "--to", "peft"]) == 2
    assert "no init_from" in _one_line_error(capsys)
    # --base_model belongs to --to peft
    assert lora_cli.main(["--workdir", lora_workdir, "--output", str(out), "--base_model", "x"]) == 2
    assert "only applies to --to peft" in _one_line_error(capsys)
    # the output may not be inside the run
    inside = os.path.join(lora_workdir, "peft")
    assert lora_cli.main(["--workdir", lora_workdir, "--output", inside, "--to", "peft"]) == 2
    _one_line_error(capsys)
    assert not out.exists() and not os.path.exists(inside)


@pytest.mark.heavy  # seconds (a fake-gcs-server): the fast tier, as the other bucket exports
def test_peft_export_on_a_bucket_is_the_local_export(gcs_bucket, tmp_path):
    """On a bucket the export is written in place between its markers (``convert.paths``) and holds the local
    export's bytes; ``overwrite`` replaces only a previous PEFT export."""
    import jax
    from flax import nnx

    from mistral_jax import lora, storage
    from mistral_jax.convert import files, paths
    from mistral_jax.export import save_peft

    model = lora.apply_lora(mj.Transformer(mj.ModelConfig.tiny(n_layers=1), rngs=nnx.Rngs(0)), 2, 4.0, "wq,w2")
    rng = np.random.default_rng(0)
    nnx.update(model, jax.tree.map(lambda x: rng.normal(0, 0.1, x.shape).astype(np.float32),
                                   lora.adapter_state(model)))
    local = save_peft(model, str(tmp_path / "peft"), base_model="base")
    url = save_peft(model, storage.join(gcs_bucket, "peft"), base_model="base")
    names = ("adapter_config.json", "adapter_model.safetensors")
    assert sorted(files.listdir(url)) == sorted([*names, paths.MARKER])
    for name in names:
        assert storage.read_bytes(storage.join(url, name)) == (tmp_path / "peft" / name).read_bytes()
    with pytest.raises(FileExistsError, match="a previous peft export"):
        save_peft(model, url)
    save_peft(model, url, overwrite=True, dtype="float16")
    hf = mj.save_hf(mj.Transformer(mj.ModelConfig.tiny(n_layers=1), rngs=nnx.Rngs(0)), str(tmp_path / "hf"))
    with pytest.raises(FileExistsError, match="not a previous peft export"):
        save_peft(model, hf, overwrite=True)  # overwrite never replaces another kind of directory
    assert sorted(os.listdir(local)) == sorted(names)
