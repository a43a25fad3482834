"""Instruction fine-tuning: LoRA wrap / train / merge, and tiny SFT runs from a pretrained checkpoint."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mistral_jax as mj
from mistral_jax import lora
from mistral_jax.training.metrics import read_metrics

TOKENS = np.random.default_rng(0).integers(3, 512, (2, 24)).astype(np.int32)


CFGS = {"mistral": mj.ModelConfig.tiny(), "mixtral": mj.ModelConfig.tiny_mixtral()}


@pytest.fixture(scope="module")
def base_models():
    """One base model per config (init is the slow part on CPU); tests work on clones."""
    return {name: mj.Transformer(cfg, rngs=nnx.Rngs(1)) for name, cfg in CFGS.items()}


def _lora_model(base_models, name="mistral", targets="all", rank=4, alpha=8.0):
    model = nnx.clone(base_models[name])
    base = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    lora.apply_lora(model, rank, alpha, targets, seed=2)
    return model, base


def _randomise_adapters(model, seed=3):
    state = lora.adapter_state(model)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    nnx.update(model, jax.tree.unflatten(treedef, [(0.05 * rng.standard_normal(x.shape)).astype(np.float32)
                                                   for x in leaves]))


@pytest.mark.parametrize("name", sorted(CFGS))
def test_lora_starts_at_base_and_exposes_only_adapters(base_models, name):
    cfg = CFGS[name]
    model, base = _lora_model(base_models, name)
    wrapped = [node for _, node in nnx.iter_graph(model) if isinstance(node, lora.LoRAWeight)]
    assert len(wrapped) == 7
    effective = nnx.jit(lambda m: [w[...] for _, w in nnx.iter_graph(m) if isinstance(w, lora.LoRAWeight)])(model)
    for w, eff in zip(wrapped, effective, strict=True):  # B = 0: each effective weight is exactly the base weight
        np.testing.assert_array_equal(np.asarray(eff), np.asarray(w.base[...]))
    flat = {"/".join(map(str, k)): v.shape for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    lead = (2, 4) if cfg.is_moe else (2,)  # [L] or [L, E]
    assert flat == {
        "layers/attention/wq/a": (2, 64, 4), "layers/attention/wq/b": (2, 4, 4, 16),
        "layers/attention/wk/a": (2, 64, 4), "layers/attention/wk/b": (2, 4, 2, 16),
        "layers/attention/wv/a": (2, 64, 4), "layers/attention/wv/b": (2, 4, 2, 16),
        "layers/attention/wo/a": (2, 4, 16, 4), "layers/attention/wo/b": (2, 4, 64),
        "layers/feed_forward/w1/a": (*lead, 64, 4), "layers/feed_forward/w1/b": (*lead, 4, 128),
        "layers/feed_forward/w3/a": (*lead, 64, 4), "layers/feed_forward/w3/b": (*lead, 4, 128),
        "layers/feed_forward/w2/a": (*lead, 128, 4), "layers/feed_forward/w2/b": (*lead, 4, 64),
    }
    assert lora.count_adapter_params(model) == sum(np.prod(s) for s in flat.values())


def test_lora_targets_and_errors(base_models):
    model, _ = _lora_model(base_models, targets="q_proj,v_proj", rank=2)
    flat = [k for k, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    assert sorted("/".join(k) for k in flat) == ["layers/attention/wq/a", "layers/attention/wq/b",
                                                  "layers/attention/wv/a", "layers/attention/wv/b"]
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        lora.apply_lora(model, 2, 4.0, "wq")
    fresh = nnx.clone(base_models["mistral"])
    with pytest.raises(ValueError, match="unknown LoRA target 'qproj'"):
        lora.apply_lora(fresh, 2, 4.0, "qproj")
    with pytest.raises(ValueError, match="rank=0 must be a positive integer"):
        lora.apply_lora(fresh, 0, 4.0)


@pytest.mark.parametrize("name", sorted(CFGS))
@pytest.mark.slow
def test_merge_equals_base_plus_scaled_update(base_models, name):
    cfg = CFGS[name]
    model, base = _lora_model(base_models, name, rank=4, alpha=8.0)
    _randomise_adapters(model)
    ad = jax.tree.map(np.asarray, nnx.to_pure_dict(lora.adapter_state(model)))["layers"]
    lora_logits = np.asarray(model(TOKENS))  # Mistral's unmerged projections, Mixtral's merged experts
    lora.merge_lora(model)
    assert not lora.is_lora(model)
    merged = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    scale = 8.0 / 4
    att, ff = ad["attention"], ad["feed_forward"]
    expect = {
        ("attention", "wq"): np.einsum("LDr,LrNH->LDNH", att["wq"]["a"], att["wq"]["b"]),
        ("attention", "wo"): np.einsum("LNHr,LrD->LNHD", att["wo"]["a"], att["wo"]["b"]),
    }
    if cfg.is_moe:
        expect[("feed_forward", "w2")] = np.einsum("LEFr,LErD->LEFD", ff["w2"]["a"], ff["w2"]["b"])
    else:
        expect[("feed_forward", "w2")] = np.einsum("LFr,LrD->LFD", ff["w2"]["a"], ff["w2"]["b"])
    for (blk, wname), delta in expect.items():
        np.testing.assert_allclose(merged["layers"][blk][wname], base["layers"][blk][wname] + scale * delta,
                                   atol=1e-6, rtol=1e-6)
    # untargeted weights come back unchanged
    np.testing.assert_array_equal(merged["embed"], base["embed"])
    norm = ("layers", "attention_norm", "weight")
    np.testing.assert_array_equal(merged[norm[0]][norm[1]][norm[2]], base[norm[0]][norm[1]][norm[2]])
    # the merged plain model computes what the LoRA model computed
    np.testing.assert_allclose(np.asarray(model(TOKENS)), lora_logits, atol=1e-5, rtol=0)


def test_lora_projections_are_unmerged_so_the_base_gets_no_weight_gradient(base_models):
    """Attention and the dense MLP compute PEFT's ``x W + scale (x A) B``: the gradient program of the adapters has
    no matmul that produces a weight-shaped [in, out] array (a merged ``W + A B`` and its gradient ``x^T dy``)."""
    cfg = CFGS["mistral"]
    model, _ = _lora_model(base_models, "mistral")
    _randomise_adapters(model)
    graphdef, adapters, rest = nnx.split(model, lora.LoRAParam, ...)
    loss = lambda ad: nnx.merge(graphdef, ad, rest)(TOKENS).astype(jnp.float32).var()
    shapes = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                shapes.append(tuple(eqn.outvars[0].aval.shape))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(jax.grad(loss))(adapters).jaxpr)
    d, qh, kh, f = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.hidden_dim
    weight_shapes = {(d, qh), (d, kh), (qh, d), (d, f), (f, d)}
    assert TOKENS.size not in (d, qh, kh, f)  # token-side matmuls cannot look like weights
    assert shapes and not weight_shapes & set(shapes), sorted(set(shapes))
    assert (TOKENS.size, 4) in shapes  # the rank-4 projections x A


# ------------------------------------------------------------------------------------------ runs through train.py
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tiny_trained_run, corpus_tokenizer):
    """A pretrained tiny checkpoint in HF format (config.json + model.safetensors + tokenizer.model): the shared
    ``tiny_trained_run`` (30 steps of train.py's trainer on the bundled corpus with ``tokenizer_path``), exported as
    a user's released base model would be."""
    from mistral_jax.export import save_hf

    losses = [r["loss"] for r in read_metrics(tiny_trained_run) if "loss" in r]
    assert losses[-1] < losses[0] - 0.5, losses  # really pretrained, not a random init
    hf_dir = tmp_path_factory.mktemp("pretrained") / "hf"
    save_hf(mj.load_pretrained(tiny_trained_run), hf_dir, tokenizer=corpus_tokenizer)  # reads the run, writes hf_dir
    return hf_dir, corpus_tokenizer


def _sft_config(init_from, **kw):
    from configs import tiny_sft

    c = tiny_sft.get_config()
    c.init_from = str(init_from)
    c.num_steps, c.log_every, c.eval_every = 30, 5, 0
    c.data.validation = ""
    c.progress_bar = False
    c.checkpoint.async_save = False
    c.update_from_flattened_dict(kw)  # dotted keys: {"lora.rank": 4}
    return c


@pytest.mark.slow
def test_chat_batches_weight_only_answers(pretrained):
    """The batches the trainer sees: every weighted target is an answer token or its </s>, every prompt token 0."""
    from mistral_jax.data import chat
    from mistral_jax.training import recipe

    _, tok = pretrained
    cfg = _sft_config("unused")
    chosen = recipe.choose(cfg)
    batch = next(chosen.batches(chosen.open_data("train"), tok, 8, train=True, bsharding=None))
    by_answers = {}
    for c in chat.load_conversations("bundled"):
        by_answers.setdefault(tuple(m["content"] for m in c if m["role"] == "assistant"), []).append(c)
    n_docs = 0
    for row in range(8):
        seg = batch["segment_ids"][row]
        for s_id in set(seg[seg > 0].tolist()):
            at = seg == s_id
            ids = np.concatenate([batch["tokens"][row][at][:1], batch["targets"][row][at]])  # the rendered ids
            w = np.concatenate([[0.0], batch["weights"][row][at]]) > 0
            assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
            answer_ids = ids[w]
            ends = np.flatnonzero(answer_ids == tok.eos_id)  # each answer ends with </s>
            answers, start = [], 0
            for e in ends:
                answers.append(tok.decode(answer_ids[start:e]))
                start = e + 1
            assert start == len(answer_ids)
            convs = by_answers[tuple(answers)]  # the weighted tokens are exactly some conversation's answers
            users = [m["content"] for m in convs[0] if m["role"] == "user"]
            system = [m["content"] for m in convs[0] if m["role"] == "system"]
            first = (system[0] + "\n\n" + users[0]) if system else users[0]
            prompt = " ".join(f"[INST] {u} [/INST]" for u in [first, *users[1:]])
            assert tok.decode(ids[~w]) == prompt  # and the unweighted ones are exactly its prompts (+ <s>)
            n_docs += 1
    assert n_docs > 8  # rows are packed with several conversations


@pytest.mark.parametrize("rank", [0, 4], ids=["full", "lora"])
@pytest.mark.slow
def test_init_from_state_is_loaded_sharded_on_the_training_mesh(pretrained, rank):
    from jax.sharding import PartitionSpec as P

    from mistral_jax.loading import load_pretrained
    from mistral_jax.training import run as run_lib
    from mistral_jax.training import step as step_lib
    from mistral_jax.training.optimizer import make_optimizer

    hf_dir, _ = pretrained
    cfg = _sft_config(hf_dir, **{"lora.rank": rank})
    run = run_lib.resolve(cfg)
    assert run.model_cfg.to_hf() == mj.ModelConfig.tiny().to_hf()  # the network is the checkpoint's
    assert run.model_cfg.platform == "cpu" and dict(run.mesh.shape)["fsdp"] == 8
    recipe = run.recipe
    tx, _ = make_optimizer(cfg.optimizer, cfg.num_steps)
    _, abstract, shardings = step_lib.state_layout(recipe.abstract_model(run.model_cfg), tx, run.mesh, run.rules,
                                                   recipe.trainable)
    state = step_lib.init_state(recipe.init_model(run.model_cfg, run.mesh, run.rules), tx, shardings, run.mesh,
                                run.rules, recipe.trainable)
    assert set(state) == {"params", "frozen", "opt_state", "step"}
    weights = state["frozen"] if rank else state["params"]
    embed = weights["embed"]
    assert embed.sharding.spec == P(None, "fsdp") and len(embed.addressable_shards) == 8
    assert embed.addressable_shards[0].data.shape == (512, 64 // 8)  # each device holds 1/8 of the table
    np.testing.assert_array_equal(np.asarray(embed), np.asarray(load_pretrained(hf_dir).embed[...]))
    if rank:  # LoRA: the optimizer sees only the adapters
        n_opt = sum(x.size for x in jax.tree.leaves(state["opt_state"]))
        n_adapters = sum(x.size for x in jax.tree.leaves(state["params"]))
        assert 2 * n_adapters <= n_opt < 2 * n_adapters + 8  # Adam mu and nu (+ scalar step counters)
    else:  # full fine-tuning: every weight trains, nothing is frozen
        assert state["frozen"] == {}
    assert jax.tree.map(lambda x: x.shape, abstract["params"]) == jax.tree.map(lambda x: x.shape, state["params"])


@pytest.mark.slow
def test_full_sft_from_checkpoint_answer_loss_falls(pretrained, tmp_path):
    from mistral_jax.loading import load_pretrained
    from mistral_jax.training import trainer

    hf_dir, _ = pretrained
    result = trainer.train(_sft_config(hf_dir), str(tmp_path))
    assert result["status"] == "done" and result["step"] == 30
    ce = [m["ce_loss"] for m in read_metrics(str(tmp_path)) if "ce_loss" in m]
    # answer-token loss falls by more than a nat in 30 steps (it starts near ln 512 = 6.2: a random-init checkpoint)
    assert len(ce) == 6 and ce[-1] < ce[0] - 1.0, ce
    tuned = load_pretrained(tmp_path)  # the workdir is a full checkpoint again
    base = load_pretrained(hf_dir)
    diff = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                        nnx.to_pure_dict(nnx.state(tuned, nnx.Param)), nnx.to_pure_dict(nnx.state(base, nnx.Param)))
    assert min(jax.tree.leaves(diff)) > 0  # full fine-tuning moves every weight


@pytest.mark.slow
def test_lora_sft_trains_only_adapters_and_merges(pretrained, tmp_path):
    from mistral_jax.loading import load_pretrained
    from mistral_jax.training import trainer
    from mistral_jax.training.checkpoint import restore_checkpoint_params

    hf_dir, _ = pretrained
    cfg = _sft_config(hf_dir, num_steps=20, **{"lora.rank": 4, "lora.alpha": 8.0, "lora.targets": "wq,wv,w2",
                                               "optimizer.learning_rate": 1e-2, "data.validation": "bundled"})
    result = trainer.train(cfg, str(tmp_path))
    # the end-of-run eval runs on (adapters, frozen base): it must beat the same eval of the base model, which a
    # run with learning rate 0 gives (B starts at zero, so its adapters add nothing)
    still = _sft_config(hf_dir, num_steps=1, **{"lora.rank": 4, "lora.alpha": 8.0, "lora.targets": "wq,wv,w2",
                                                "optimizer.learning_rate": 0.0, "data.validation": "bundled"})
    base_eval = trainer.train(still, str(tmp_path / "lr0"))["eval"]["eval/loss"]
    assert result["eval"]["eval/loss"] < base_eval - 0.05, (result["eval"], base_eval)
    ce = [m["ce_loss"] for m in read_metrics(str(tmp_path)) if "ce_loss" in m]
    assert ce[-1] < ce[0] - 0.1, ce  # adapters alone learn too (slowly: rank 4 on a random-init model)

    # the checkpoint holds only the adapters
    base = load_pretrained(hf_dir)
    like = lora.apply_lora(nnx.clone(base), 4, 8.0, "wq,wv,w2")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            nnx.to_pure_dict(lora.adapter_state(like)))
    adapters, step = restore_checkpoint_params(str(tmp_path / "checkpoints"), abstract)
    assert step == 20 and sorted(adapters["layers"]["attention"]) == ["wq", "wv"]
    assert float(np.abs(adapters["layers"]["attention"]["wq"]["b"]).max()) > 0  # B moved off zero

    # the LoRA model (base + trained adapters) and its merge
    state = lora.adapter_state(like)
    nnx.replace_by_pure_dict(state, adapters)
    nnx.update(like, state)
    lora_logits = np.asarray(like(TOKENS))
    # export CLI (mistral_jax.cli.lora: load_pretrained of the workdir + save_hf), loaded back from HF files
    from mistral_jax.cli import lora as lora_cli

    export = tmp_path.parent / f"{tmp_path.name}_export"  # beside the run: convert refuses a path inside it
    assert lora_cli.main(["--workdir", str(tmp_path), "--output", str(export), "--to", "hf"]) == 0
    merged = load_pretrained(export)
    np.testing.assert_allclose(np.asarray(merged(TOKENS)), lora_logits, atol=1e-5, rtol=0)
    b = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(base, nnx.Param)))
    m = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(merged, nnx.Param)))
    a = jax.tree.map(np.asarray, adapters)
    att, ff = a["layers"]["attention"], a["layers"]["feed_forward"]
    scale = 8.0 / 4
    np.testing.assert_allclose(m["layers"]["attention"]["wq"], b["layers"]["attention"]["wq"]
                               + scale * np.einsum("LDr,LrNH->LDNH", att["wq"]["a"], att["wq"]["b"]), atol=1e-6)
    np.testing.assert_allclose(m["layers"]["feed_forward"]["w2"], b["layers"]["feed_forward"]["w2"]
                               + scale * np.einsum("LFr,LrD->LFD", ff["w2"]["a"], ff["w2"]["b"]), atol=1e-6)
    # served unmerged beside the base (multi-LoRA): the workdir's adapters over the base give the merged model's
    # greedy tokens, and the base's own under the base's id
    import requests

    from mistral_jax.loading import load_lora_adapters
    from mistral_jax.serve.app import Server, create_app
    from mistral_jax.serve.engine import Engine

    class IdsTok:  # the answer's text is its ids
        eos_id, bos_id = 2, 1

        def decode(self, ids):
            return "".join(f" {i}" for i in ids)

    served = lora.stack_adapters(load_pretrained(hf_dir), [load_lora_adapters(tmp_path)])
    engine = Engine(served, IdsTok(), max_batch=4, chunk_size=8).start()
    server = Server(create_app(engine, "base", ["sft"])).start()
    try:
        listed = requests.get(server.url + "/v1/models", timeout=60).json()["data"]
        assert [m["id"] for m in listed] == ["base", "sft"] and listed[1]["parent"] == "base"
        ids = [int(x) for x in np.asarray(TOKENS)[0, :12]]
        answers = {}
        for name, model in (("sft", merged), ("base", base)):
            r = requests.post(server.url + "/v1/completions", json={"model": name, "prompt": ids, "max_tokens": 8,
                              "temperature": 0, "ignore_eos": True}, timeout=60).json()
            answers[name] = [int(x) for x in r["choices"][0]["text"].split()]
            assert r["model"] == name
            assert answers[name] == list(mj.generate(model, ids, max_new_tokens=8, eos_id=None))
        bad = requests.post(server.url + "/v1/completions", json={"model": "other", "prompt": ids}, timeout=60)
        assert bad.status_code == 400 and "other" in bad.json()["error"]["message"]
    finally:
        server.stop()
        engine.stop()
    # everything that is not adapted is bit-identical to the base checkpoint
    for path in (("embed",), ("lm_head",), ("layers", "attention", "wk"), ("layers", "attention", "wo"),
                 ("layers", "feed_forward", "w1"), ("layers", "attention_norm", "weight")):
        x, y = m, b
        for p in path:
            x, y = x[p], y[p]
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
@pytest.mark.oracle  # transformers reads the export
def test_qlora_over_an_int8_or_int4_base_trains_like_lora_and_exports_full_precision(pretrained, tmp_path):
    """QLoRA (``lora.quantize_base = "int8"`` / ``"int4"``): the frozen base is int8 (under a third of the float base's
    bytes here) or group-wise int4 in the train state; 30 steps reach a held-out loss within 3 % of float LoRA's on
    the same data and seed; the export merges the adapters into the dequantized base in float32, and HF transformers'
    logits of it equal the project's merged model to 1e-4 (int4: the restored run, from its checkpoint)."""
    import torch
    import transformers

    from mistral_jax import quant
    from mistral_jax.cli import lora as lora_cli
    from mistral_jax.loading import load_pretrained
    from mistral_jax.training import recipe as recipe_lib
    from mistral_jax.training import trainer

    hf_dir, _ = pretrained
    kw = {"lora.rank": 4, "lora.alpha": 8.0, "optimizer.learning_rate": 1e-2, "data.validation": "bundled"}
    evals = {}
    runs = (("lora", {}), ("qlora", {"lora.quantize_base": "int8"}), ("qlora4", {"lora.quantize_base": "int4"}))
    for name, extra in runs:
        cfg = _sft_config(hf_dir, num_steps=30, **kw, **extra)
        evals[name] = trainer.train(cfg, str(tmp_path / name))["eval"]["eval/loss"]
    print(f"held-out loss: LoRA {evals['lora']:.4f}, QLoRA {evals['qlora']:.4f}, int4 {evals['qlora4']:.4f}")
    assert abs(evals["qlora"] / evals["lora"] - 1) <= 0.03, evals
    assert abs(evals["qlora4"] / evals["lora"] - 1) <= 0.03, evals
    assert evals["qlora4"] != evals["qlora"]  # a different base

    # the train state's frozen base: int8 values and scales where float LoRA keeps float32 weights
    frozen = {}
    for name, extra in runs:
        adapters = recipe_lib.choose(_sft_config(hf_dir, **kw, **extra)).adapters
        model = adapters.wrap(load_pretrained(hf_dir))
        frozen[name] = model
        assert quant.is_quantized(model) == (name != "lora")
    nbytes = lambda m: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(m, nnx.Not(lora.LoRAParam))))
    int8 = [x for x in jax.tree.leaves(nnx.state(frozen["qlora"], quant.QuantizedValue)) if x.dtype == np.int8]
    assert int8 and nbytes(frozen["qlora"]) < nbytes(frozen["lora"]) / 2
    int4 = [x for x in jax.tree.leaves(nnx.state(frozen["qlora4"], quant.QuantizedValue)) if x.dtype == np.uint8]
    assert len(int4) == len(int8) and sum(x.size for x in int4) * 2 == sum(x.size for x in int8)  # two to a byte

    export = tmp_path / "qlora_export"
    assert lora_cli.main(["--workdir", str(tmp_path / "qlora"), "--output", str(export), "--to", "hf"]) == 0
    merged = load_pretrained(tmp_path / "qlora")  # the project's merged model of the run: float32 Params only
    assert not quant.is_quantized(merged) and merged.layers.attention.wq[...].dtype == np.float32
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(export), attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = hf(torch.from_numpy(TOKENS.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(theirs, np.asarray(merged(TOKENS)), atol=1e-4, rtol=0)

    # int4: the merged model of the run is its base as trained on, dequantized from int4 (the LM head is quantized
    # and not adapted, so it is exactly the dequantized head), plus the adapters
    merged4 = load_pretrained(tmp_path / "qlora4")
    assert not quant.is_quantized(merged4) and merged4.layers.attention.wq[...].dtype == np.float32
    head = load_pretrained(hf_dir).lm_head[...]
    q, scale, axis = quant.quantize_array_int4(head, (0,))
    expected = quant.Int8Weight(quant.QuantizedValue(q), quant.QuantizedValue(scale), axis)[...]
    np.testing.assert_array_equal(np.asarray(merged4.lm_head[...]), np.asarray(expected))
    assert 0 < float(jnp.abs(expected - head).max()) <= float(jnp.abs(head).max()) / 14 + 1e-6  # half a step


def test_an_unknown_base_quantization_is_one_line_with_the_fix(tmp_path):
    from mistral_jax.training import recipe as recipe_lib

    with pytest.raises(recipe_lib.ConfigError) as e:
        recipe_lib.choose(_sft_config(tmp_path, **{"lora.rank": 4, "lora.quantize_base": "int2"}))
    text = str(e.value)
    assert "\n" not in text and "config.lora.quantize_base='int2'" in text and "Fix: use 'int8' or 'int4'" in text
