"""Checkpoint conversion: HF transformers / Mistral consolidated / mistral_jax, both directions.

The oracle is HF transformers: inputs are written by transformers' own ``save_pretrained`` (so the on-disk
names are transformers', not ours), exports are read back by ``AutoModelForCausalLM.from_pretrained`` and
by ``safetensors.torch`` (an independent safetensors reader).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

import mistral_jax as mj
from mistral_jax import sharding
from mistral_jax.convert import keys as keys_lib
from mistral_jax.model.transformer import params_dict
from tests.helpers import oracle_module, random_tokens

pytestmark = pytest.mark.oracle  # transformers writes the inputs and reads the exports back
torch = oracle_module("torch")
transformers = oracle_module("transformers")

ATOL = 1e-4
VOCAB = 256

HF_CONFIGS = {  # transformers config class, its arguments
    # window 8 < the sequences below; GQA 4 heads / 2 kv heads
    "mistral": ("MistralConfig", dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=8, rope_theta=1e4, max_position_embeddings=256,
        initializer_range=0.1)),
    "mixtral": ("MixtralConfig", dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, rope_theta=1e6,
        max_position_embeddings=256, router_aux_loss_coef=0.02, initializer_range=0.1)),
}


def _hf_config(arch: str):
    cls, kwargs = HF_CONFIGS[arch]
    return getattr(transformers, cls)(**kwargs)


def _hf_logits(hf, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.from_numpy(tokens).long()).logits.float().numpy()


def _torch_tensors(directory: str) -> dict[str, torch.Tensor]:
    """All tensors of a directory's safetensors files, read by safetensors' own torch loader."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


def _assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        # compare the raw bits (NaN-safe, -0.0 != 0.0)
        assert torch.equal(a[name].contiguous().view(torch.uint8), b[name].contiguous().view(torch.uint8)), name


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """transformers-written checkpoints: {(arch, dtype): dir} plus the float32 torch models."""
    root = tmp_path_factory.mktemp("hf")
    dirs, models = {}, {}
    for arch in HF_CONFIGS:
        hc = _hf_config(arch)
        cls = transformers.MixtralForCausalLM if arch == "mixtral" else transformers.MistralForCausalLM
        torch.manual_seed(0)
        model = cls(hc).float().eval()
        models[arch] = model
        for dtype in ("float32", "bfloat16"):
            d = str(root / f"{arch}_{dtype}")
            copy.deepcopy(model).to(getattr(torch, dtype)).save_pretrained(d)
            dirs[arch, dtype] = d
    return dirs, models


@pytest.fixture(scope="module")
def loaded(hf_dirs):
    """load_pretrained of each float32 HF dir (compiled once per arch)."""
    dirs, _ = hf_dirs
    return {arch: mj.load_pretrained(dirs[arch, "float32"]) for arch in HF_CONFIGS}


# ----------------------------------------------------------------------------- key table
def test_key_table_covers_every_parameter_once():
    for cfg in (mj.ModelConfig.tiny(), mj.ModelConfig.tiny_mixtral(), mj.ModelConfig.tiny(tie_embeddings=True)):
        entries = keys_lib.entries(cfg)
        for fmt in ("hf", "mistral"):
            names = [e.name(fmt) for e in entries]
            assert len(names) == len(set(names))
        covered = {e.key.path for e in entries}
        assert covered == set(keys_lib.param_shapes(cfg))
        n_expected = 2 + (not cfg.tie_embeddings) + cfg.n_layers * (6 + (1 + 3 * cfg.num_experts if cfg.is_moe else 3))
        assert len(entries) == n_expected


# ----------------------------------------------------------------------------- loading HF
@pytest.mark.parametrize("arch", sorted(HF_CONFIGS))
@pytest.mark.slow
def test_load_hf_matches_torch(hf_dirs, loaded, arch):
    _, models = hf_dirs
    model = loaded[arch]
    assert model.cfg.is_moe == (arch == "mixtral")
    assert model.cfg.sliding_window == _hf_config(arch).sliding_window
    assert model.cfg.rope_theta == _hf_config(arch).rope_parameters["rope_theta"]
    tokens = random_tokens(1, VOCAB, 2, 24, low=3)
    np.testing.assert_allclose(np.asarray(model(tokens)), _hf_logits(models[arch], tokens), atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", sorted(HF_CONFIGS))
def test_hf_jax_hf_round_trip_is_bit_identical(hf_dirs, tmp_path, arch, dtype):
    dirs, _ = hf_dirs
    src = dirs[arch, dtype]
    mj.convert("hf", "jax", src, tmp_path / "jax")
    model = mj.load_pretrained(tmp_path / "jax")
    assert model.cfg.param_dtype == dtype
    limit = 40_000 if dtype == "float32" else 20_000
    mj.save_hf(model, tmp_path / "hf", max_shard_size=f"{limit // 1000}KB")  # several shards
    out = str(tmp_path / "hf")
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for s in shards:  # each shard holds at most `limit` bytes of tensors, or one bigger tensor
        with safe_open(os.path.join(out, s), "pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
        nbytes = sum(int(np.prod(shape)) for shape in sizes) * (4 if dtype == "float32" else 2)
        assert nbytes <= limit or len(sizes) == 1
    _assert_bit_identical(_torch_tensors(src), _torch_tensors(out))
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == dtype


def _sendfile_spy(monkeypatch) -> list[int]:
    """The byte counts of every ``os.sendfile`` call from now on (the kernel copy of unchanged tensors)."""
    sent, real = [], os.sendfile

    def spy(out_fd, in_fd, offset, count):
        n = real(out_fd, in_fd, offset, count)
        sent.append(n)
        return n

    monkeypatch.setattr(os, "sendfile", spy)
    return sent


def _safetensors_files(directory) -> dict[str, bytes]:
    return {f: open(os.path.join(directory, f), "rb").read() for f in sorted(os.listdir(directory))
            if f.endswith(".safetensors") or f.endswith(".index.json")}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="os.sendfile to a file is Linux's")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", sorted(HF_CONFIGS))
def test_hf_to_hf_copies_unchanged_tensors_in_the_kernel(hf_dirs, tmp_path, monkeypatch, arch, dtype):
    """HF -> HF in the stored dtype copies every tensor's bytes file to file (``os.sendfile``; transformers' files
    store them in another order than the export, so one copy per run of neighbours) and writes, byte for byte, the
    shards that exporting the loaded parameters writes through numpy; so does the copy's fallback (16 MB reads);
    a dtype change copies nothing."""
    from mistral_jax.convert import safetensors_io

    dirs, _ = hf_dirs
    src = dirs[arch, dtype]
    stored = sum(t.numel() * t.element_size() for t in _torch_tensors(src).values())
    sent = _sendfile_spy(monkeypatch)
    mj.convert("hf", "hf", src, tmp_path / "copied", max_shard_size=20_000)
    assert sum(sent) == stored and len(sent) > 1
    model = mj.load_pretrained(src)
    mj.save_hf(model, tmp_path / "written", max_shard_size=20_000)  # every tensor through numpy (a params source)
    copied = _safetensors_files(tmp_path / "copied")
    assert len(copied) > 2 and copied == _safetensors_files(tmp_path / "written")
    monkeypatch.setattr(safetensors_io, "_KERNEL_COPY", False)
    sent.clear()
    mj.convert("hf", "hf", src, tmp_path / "fallback", max_shard_size=20_000)
    assert sent == [] and _safetensors_files(tmp_path / "fallback") == copied
    other = "bfloat16" if dtype == "float32" else "float32"
    mj.convert("hf", "hf", src, tmp_path / "cast", dtype=other)
    assert sent == []
    _assert_bit_identical({k: v.to(getattr(torch, other)) for k, v in _torch_tensors(src).items()},
                          _torch_tensors(str(tmp_path / "cast")))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", sorted(HF_CONFIGS))
def test_mistral_jax_mistral_round_trip_is_bit_identical(hf_dirs, tmp_path, arch, dtype):
    dirs, _ = hf_dirs
    mj.convert("hf", "mistral", dirs[arch, dtype], tmp_path / "m1")
    mj.convert("mistral", "jax", tmp_path / "m1", tmp_path / "jax")
    mj.convert("jax", "mistral", tmp_path / "jax", tmp_path / "m2")
    a, b = _torch_tensors(str(tmp_path / "m1")), _torch_tensors(str(tmp_path / "m2"))
    _assert_bit_identical(a, b)
    assert sorted(os.listdir(tmp_path / "m2")) == ["consolidated.safetensors", "params.json"]
    params = json.load(open(tmp_path / "m2" / "params.json"))
    names = set(a)
    if arch == "mixtral":  # mistral-inference's MoeLayer names
        assert params["moe"] == {"num_experts": 4, "num_experts_per_tok": 2}
        assert {"layers.1.feed_forward.gate.weight", "layers.1.feed_forward.experts.3.w2.weight"} <= names
        assert a["layers.0.feed_forward.experts.1.w1.weight"].shape == (48, 32)
    else:
        assert params["sliding_window"] == 8
        assert "layers.1.feed_forward.w3.weight" in names
    assert {"tok_embeddings.weight", "norm.weight", "output.weight", "layers.0.attention.wq.weight"} <= names
    # and back to HF: the original transformers files, bit for bit
    mj.convert("mistral", "hf", tmp_path / "m2", tmp_path / "hf")
    _assert_bit_identical(_torch_tensors(dirs[arch, dtype]), _torch_tensors(str(tmp_path / "hf")))


def _mistral_inference_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """mistral-inference's RoPE: complex rotation of interleaved pairs (x[2i], x[2i+1]). x: [T, heads, H]."""
    t, _, h = x.shape
    freqs = 1.0 / (theta ** (torch.arange(0, h, 2, dtype=torch.float64)[: h // 2] / h))
    freqs_cis = torch.polar(torch.ones(t, h // 2, dtype=torch.float64),
                            torch.outer(torch.arange(t, dtype=torch.float64), freqs))
    xc = torch.view_as_complex(x.double().reshape(t, -1, h // 2, 2))
    return torch.view_as_real(xc * freqs_cis[:, None, :]).flatten(2)


def test_mistral_layout_is_interleaved_rope(hf_dirs, tmp_path):
    """Consolidated wq/wk under mistral-inference's interleaved RoPE give HF's (half-split) attention scores."""
    from transformers.models.mistral.modeling_mistral import apply_rotary_pos_emb

    dirs, models = hf_dirs
    mj.convert("hf", "mistral", dirs["mistral", "float32"], tmp_path / "m")
    cons = _torch_tensors(str(tmp_path / "m"))
    attn = models["mistral"].model.layers[1].self_attn
    hc, t, n, k, h = _hf_config("mistral"), 12, 4, 2, 8
    x = torch.randn(t, hc.hidden_size, dtype=torch.float64)
    # HF: q_proj + rotate_half RoPE with cos/sin of the concatenated frequencies
    inv = 1.0 / (1e4 ** (torch.arange(0, h, 2, dtype=torch.float64) / h))
    emb = torch.cat([torch.outer(torch.arange(t, dtype=torch.float64), inv)] * 2, dim=-1)
    q = (x @ attn.q_proj.weight.double().T).reshape(1, t, n, h).transpose(1, 2)
    kk = (x @ attn.k_proj.weight.double().T).reshape(1, t, k, h).transpose(1, 2)
    q, kk = apply_rotary_pos_emb(q, kk, emb.cos()[None], emb.sin()[None])
    hf_scores = torch.einsum("ntd,nsd->nts", q[0], kk[0].repeat_interleave(n // k, dim=0))
    # Mistral: wq/wk from the consolidated file + complex RoPE
    qm = _mistral_inference_rope((x @ cons["layers.1.attention.wq.weight"].double().T).reshape(t, n, h), 1e4)
    km = _mistral_inference_rope((x @ cons["layers.1.attention.wk.weight"].double().T).reshape(t, k, h), 1e4)
    m_scores = torch.einsum("tnd,snd->nts", qm, km.repeat_interleave(n // k, dim=1))
    torch.testing.assert_close(m_scores, hf_scores, atol=1e-9, rtol=1e-9)
    assert not torch.allclose(cons["layers.1.attention.wq.weight"].double(), attn.q_proj.weight.double())


# ----------------------------------------------------------------------------- exports from JAX models
EXPORT_CONFIGS = {
    "mistral_window": mj.ModelConfig.tiny(vocab_size=VOCAB, dim=32, hidden_dim=64, head_dim=8, sliding_window=8,
                                          rope_theta=1e6, initializer_range=0.1),
    "mixtral": mj.ModelConfig.tiny_mixtral(vocab_size=VOCAB, dim=32, hidden_dim=48, head_dim=8,
                                           initializer_range=0.1),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """JAX-initialised models exported with save_hf and loaded back by AutoModelForCausalLM."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for name, cfg in EXPORT_CONFIGS.items():
        model = mj.Transformer(cfg, rngs=nnx.Rngs(3))
        d = mj.save_hf(model, root / name)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
        out[name] = (model, hf, d)
    return out


@pytest.mark.parametrize("name", sorted(EXPORT_CONFIGS))
@pytest.mark.slow
def test_exported_hf_logits_match(exported, name):
    model, hf, d = exported[name]
    cfg = EXPORT_CONFIGS[name]
    expected_cls = "MixtralForCausalLM" if cfg.is_moe else "MistralForCausalLM"
    assert type(hf).__name__ == expected_cls
    hc = json.load(open(os.path.join(d, "config.json")))
    assert hc["architectures"] == [expected_cls] and hc["sliding_window"] == cfg.sliding_window
    assert hf.config.rope_parameters["rope_theta"] == cfg.rope_theta
    assert hf.config.sliding_window == cfg.sliding_window
    if cfg.is_moe:
        assert hf.config.router_aux_loss_coef == cfg.router_aux_loss_coef
        assert hf.config.num_local_experts == cfg.num_experts
    tokens = random_tokens(5, VOCAB, 2, 30, low=3)  # > 3 windows
    np.testing.assert_allclose(np.asarray(model(tokens)), _hf_logits(hf, tokens), atol=ATOL, rtol=0)


def _jax_greedy(model, prompt: list[int], n: int) -> list[int]:
    if hasattr(mj, "generate"):
        return list(mj.generate(model, prompt, max_new_tokens=n, temperature=0.0, eos_id=None))
    ids = list(prompt)  # fallback: full forward per token
    for _ in range(n):
        ids.append(int(np.argmax(np.asarray(model(np.asarray([ids], np.int32)))[0, -1])))
    return ids[len(prompt):]


@pytest.mark.parametrize("name", sorted(EXPORT_CONFIGS))
@pytest.mark.slow
def test_exported_greedy_generation_matches(exported, name):
    model, hf, _ = exported[name]
    prompt = [1, *(random_tokens(9, VOCAB, 1, 11, low=3)[0].tolist())]
    ours = _jax_greedy(model, prompt, 32)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, min_new_tokens=32)
    theirs = out[0, len(prompt):].tolist()
    assert len(theirs) == 32
    assert ours == theirs


def test_export_tokenizer_loads_in_transformers(tmp_path, corpus_tokenizer):
    tok = corpus_tokenizer
    model = mj.Transformer(mj.ModelConfig.tiny(), rngs=nnx.Rngs(0))  # vocab 512 = the tokenizer's
    mj.save_hf(model, tmp_path / "hf", tokenizer=tok, dtype="bfloat16")
    files = set(os.listdir(tmp_path / "hf"))
    assert {"tokenizer.model", "tokenizer_config.json", "config.json", "model.safetensors"} <= files
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "the lazy fox 42 jumps"
    assert hf_tok(text)["input_ids"] == tok.encode(text)
    # the tokenizer travels with load_pretrained -> save_mistral
    reloaded = mj.load_pretrained(tmp_path / "hf")
    mj.save_mistral(reloaded, tmp_path / "m")
    assert open(tmp_path / "m" / "tokenizer.model", "rb").read() == open(tok.path, "rb").read()


# ----------------------------------------------------------------------------- dtype, mesh, CLI
def test_dtype_cast_matches_torch(hf_dirs, tmp_path):
    dirs, _ = hf_dirs
    model = mj.load_pretrained(dirs["mixtral", "float32"], dtype="bfloat16")
    assert model.cfg.param_dtype == "bfloat16"
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(params_dict(model)))
    mj.save_hf(model, tmp_path / "bf16")
    # the float32 -> bfloat16 rounding equals torch's, i.e. transformers' own bfloat16 checkpoint
    _assert_bit_identical(_torch_tensors(dirs["mixtral", "bfloat16"]), _torch_tensors(str(tmp_path / "bf16")))


def test_load_with_mesh_places_params_sharded(hf_dirs, loaded, tmp_path):
    dirs, _ = hf_dirs
    mesh = sharding.make_mesh(fsdp=2, tensor=2, expert=2)
    model = mj.load_pretrained(dirs["mixtral", "float32"], mesh=mesh)
    p = params_dict(model)
    w1 = p["layers"]["feed_forward"]["w1"]  # [L, E, D, F] -> (layers, experts, embed, mlp)
    assert w1.sharding.spec == jax.sharding.PartitionSpec(None, "expert", "fsdp", "tensor")
    assert len(w1.addressable_shards) == 8 and w1.addressable_shards[0].data.shape == (2, 2, 16, 24)
    ref = params_dict(loaded["mixtral"])
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    mj.save_hf(model, tmp_path / "from_sharded")  # export reads the sharded arrays slice by slice
    _assert_bit_identical(_torch_tensors(dirs["mixtral", "float32"]), _torch_tensors(str(tmp_path / "from_sharded")))


def test_tied_embeddings(tmp_path):
    cfg = EXPORT_CONFIGS["mistral_window"].replace(tie_embeddings=True)
    model = mj.Transformer(cfg, rngs=nnx.Rngs(1))
    mj.save_hf(model, tmp_path / "hf")
    assert "lm_head.weight" not in _torch_tensors(str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert hf.config.tie_word_embeddings
    np.testing.assert_array_equal(hf.lm_head.weight.detach().numpy(), np.asarray(params_dict(model)["embed"]))
    mj.save_mistral(model, tmp_path / "m")
    assert json.load(open(tmp_path / "m" / "params.json"))["tied_embeddings"] is True
    for d in ("hf", "m"):
        back = mj.load_pretrained(tmp_path / d)
        assert back.cfg.tie_embeddings
        for a, b in zip(jax.tree.leaves(params_dict(back)), jax.tree.leaves(params_dict(model)), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_cli_hf_to_mistral_to_hf(hf_dirs, tmp_path, capsys):
    from mistral_jax.cli.convert import main

    dirs, _ = hf_dirs
    src = dirs["mistral", "bfloat16"]
    r = subprocess.run([sys.executable, "-m", "mistral_jax.convert", "--from", "hf", "--to", "mistral", "--input", src,
                        "--output", str(tmp_path / "m"), "--dtype", "float32"],
                       capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr
    assert main(["--from", "mistral", "--to", "hf", "--input", str(tmp_path / "m"), "--output", str(tmp_path / "h"),
                 "--dtype", "bfloat16"]) == 0
    _assert_bit_identical(_torch_tensors(src), _torch_tensors(str(tmp_path / "h")))  # bf16 -> f32 -> bf16 exact
    capsys.readouterr()
    assert main(["--from", "mistral", "--to", "hf", "--input", src, "--output", str(tmp_path / "x")]) == 1
    assert "--from hf" in capsys.readouterr().err and not os.path.exists(tmp_path / "x")


# ----------------------------------------------------------------------------- training workdirs
def test_training_workdir_newest_intact_step(loaded, tmp_path):
    import orbax.checkpoint as ocp

    model = loaded["mistral"]
    params = params_dict(model)
    newer = jax.tree.map(lambda a: a + 1.0, params)
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "model_config.json").write_text(json.dumps(model.cfg.to_dict()))
    mgr = ocp.CheckpointManager(str(wd / "checkpoints"), item_names=("params", "meta"))
    for step, p in ((10, params), (20, newer)):
        mgr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(p), meta=ocp.args.JsonSave({"s": step})))
    mgr.wait_until_finished()
    mgr.close()
    got = mj.load_pretrained(wd)
    np.testing.assert_array_equal(np.asarray(params_dict(got)["embed"]), np.asarray(newer["embed"]))
    step10 = mj.load_pretrained(wd / "checkpoints" / "10")
    np.testing.assert_array_equal(np.asarray(params_dict(step10)["embed"]), np.asarray(params["embed"]))
    # corrupt the newest step: every data file of its params item truncated to nothing
    for dirpath, _, files in os.walk(wd / "checkpoints" / "20" / "params"):
        for f in files:
            if f != "_METADATA":
                open(os.path.join(dirpath, f), "wb").close()
    with pytest.warns(UserWarning, match="falling back"):
        got = mj.load_pretrained(wd)
    np.testing.assert_array_equal(np.asarray(params_dict(got)["embed"]), np.asarray(params["embed"]))


# ----------------------------------------------------------------------------- bad input
def _copy(src: str, dst) -> str:
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def test_missing_file(hf_dirs, tmp_path):
    dirs, _ = hf_dirs
    mj.convert("hf", "hf", dirs["mistral", "float32"], tmp_path / "sharded", max_shard_size=10_000)
    index = json.load(open(tmp_path / "sharded" / "model.safetensors.index.json"))
    shard = sorted(set(index["weight_map"].values()))[1]
    os.remove(tmp_path / "sharded" / shard)
    with pytest.raises(mj.ConversionError, match=shard) as e:
        mj.load_pretrained(tmp_path / "sharded")
    assert any("missing tensor 'model.layers" in p for p in e.value.problems)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(open(os.path.join(dirs["mistral", "float32"], "config.json")).read())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        mj.load_pretrained(empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mj.load_pretrained(tmp_path / "nowhere")


def test_wrong_model_type(hf_dirs, tmp_path):
    dirs, _ = hf_dirs
    d = _copy(dirs["mistral", "float32"], tmp_path / "llama")
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["model_type"] = "llama"
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(ValueError, match=r"config.json.*model_type='llama'"):
        mj.load_pretrained(d)


def test_wrong_shapes_listed_all_at_once(hf_dirs, tmp_path):
    dirs, _ = hf_dirs
    d = _copy(dirs["mixtral", "float32"], tmp_path / "bad")
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["intermediate_size"] = 40  # every expert matrix now mismatches
    cfg["num_hidden_layers"] = 3  # and layer 2 is missing
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(mj.ConversionError) as e:
        mj.load_pretrained(d)
    problems = e.value.problems
    shape_problems = [p for p in problems if "has shape" in p and "experts" in p]
    assert len(shape_problems) == 2 * 4 * 3  # 2 present layers x 4 experts x (w1, w2, w3)
    assert any("(40, 32)" in p and "(48, 32)" in p for p in shape_problems)
    assert sum("missing tensor 'model.layers.2." in p for p in problems) == 6 + 1 + 4 * 3
    assert str(len(problems)) in str(e.value)


def test_unexpected_tensor_reported(hf_dirs, tmp_path):
    dirs, _ = hf_dirs
    d = _copy(dirs["mixtral", "float32"], tmp_path / "extra")
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["num_hidden_layers"] = 1
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(mj.ConversionError, match="unexpected tensor 'model.layers.1.self_attn.q_proj.weight'"):
        mj.load_pretrained(d)


def test_truncated_safetensors_and_no_partial_output(hf_dirs, tmp_path):
    dirs, _ = hf_dirs
    d = _copy(dirs["mistral", "float32"], tmp_path / "trunc")
    f = os.path.join(d, "model.safetensors")
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size - 1000)
    with pytest.raises(mj.ConversionError, match=r"model\.safetensors: truncated: tensor 'model\.") as e:
        mj.load_pretrained(d)
    assert "Fix:" in str(e.value)
    for dst in ("hf", "mistral", "jax"):
        with pytest.raises(mj.ConversionError, match="truncated"):
            mj.convert("hf", dst, d, tmp_path / f"out_{dst}")
    assert sorted(os.listdir(tmp_path)) == ["trunc"]  # no output dir, no temporary sibling
    with open(f, "r+b") as fh:  # header cut: the file is named too
        fh.truncate(20)
    with pytest.raises(mj.ConversionError, match=r"model\.safetensors.*truncated or not a safetensors file"):
        mj.load_pretrained(d)


def test_a_file_cut_after_its_header_was_read_is_an_error_not_a_crash(hf_dirs, tmp_path):
    """Converted tensors are read as views of the file's pages (``SafetensorsFile.view``): a file cut after the
    checks (another process truncating it) is a one-line error naming the tensor, never a SIGBUS."""
    from mistral_jax.convert import hf as hf_export

    dirs, _ = hf_dirs
    d = _copy(dirs["mistral", "float32"], tmp_path / "cut")
    source = hf_export.open_source(d)
    last = max(keys_lib.entries(source.cfg), key=lambda e: source.span(e).offset)
    np.testing.assert_array_equal(source.transient(last), source.read(last))
    f = os.path.join(d, "model.safetensors")
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) - 16)
    with pytest.raises(ValueError, match=r"truncated while reading tensor .* Fix: re-download"):
        source.transient(last)


def test_failure_mid_write_leaves_no_output(hf_dirs, tmp_path, monkeypatch):
    """A failure while shards are being written removes the partial output and keeps an old one intact."""
    from mistral_jax.convert import safetensors_io

    dirs, _ = hf_dirs
    real = safetensors_io.write_file
    calls = []

    def failing(path, *a, **kw):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return real(path, *a, **kw)

    monkeypatch.setattr(safetensors_io, "write_file", failing)
    with pytest.raises(OSError, match="disk full"):
        mj.convert("hf", "hf", dirs["mixtral", "float32"], tmp_path / "out", max_shard_size=10_000)
    assert len(calls) == 3 and os.listdir(tmp_path) == []
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text("previous export")  # --overwrite replaces only an export
    with pytest.raises(FileExistsError, match="not empty"):
        mj.convert("hf", "hf", dirs["mixtral", "float32"], tmp_path / "old")
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        mj.convert("hf", "hf", dirs["mixtral", "float32"], tmp_path / "old", max_shard_size=10_000, overwrite=True)
    assert os.listdir(tmp_path) == ["old"] and os.listdir(tmp_path / "old") == ["config.json"]
