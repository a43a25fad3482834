"""Where arrays live (README, Scaling / Evaluation): parameters are created directly in their shards, and eval
batches are sharded over the mesh with the parameters FSDP-sharded (8 fake CPU devices, tests/conftest.py)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

import mistral_jax as mj
from mistral_jax import sharding


def _bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


@pytest.mark.slow
def test_parameters_are_created_in_their_shards():
    """The init program's outputs are the shards: per device it outputs about 1/8 of the model and never holds a
    whole parameter as a temporary (a replicated init would output every byte on every device)."""
    cfg = mj.ModelConfig.tiny_mixtral(dim=128, hidden_dim=256, vocab_size=1024)
    mesh = sharding.make_mesh(fsdp=-1)
    rules = sharding.rules_preset("fsdp")
    make = lambda: mj.Transformer(cfg, rngs=nnx.Rngs(0))
    model = sharding.create_sharded(make, mesh, rules)
    state = nnx.state(model)
    total = _bytes(state)
    per_device = sum(s.data.size * s.data.dtype.itemsize for x in jax.tree.leaves(state)
                     for s in x.addressable_shards if s.device == jax.devices()[0])
    assert per_device < total / 6, (per_device, total)  # ~1/8 (norm scales and other small vectors replicated)

    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    shardings = sharding.state_shardings(abstract, mesh, rules)
    with sharding.use_mesh(mesh, rules):
        compiled = jax.jit(lambda: nnx.state(make()), out_shardings=shardings).lower().compile()
    mem = compiled.memory_analysis()
    largest = max(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    assert mem.output_size_in_bytes < total / 6, (mem.output_size_in_bytes, total)
    assert mem.temp_size_in_bytes < largest, (mem.temp_size_in_bytes, largest)  # no whole tensor materialised


@pytest.mark.oracle  # mistral_jax.evals imports lm-eval
def test_eval_batches_are_sharded_over_the_mesh():
    """Every array of a scoring batch is split by rows over the 8 devices, and the weights are sharded."""
    from mistral_jax.evals.lm import MistralJaxLM

    cfg = mj.ModelConfig.tiny(max_seq_len=64, vocab_size=32000)
    model = mj.Transformer(cfg, rngs=nnx.Rngs(0))
    tok_ids = list(range(3, 40))
    lm = MistralJaxLM(model=model, tokenizer="mistral:v1", batch_size=8)  # scores ids; the tokenizer is unused
    assert lm.mesh is not None and lm.mesh.size == jax.device_count() == 8
    seen = []
    real = lm._score

    def spy(graphdef, state, *arrays):
        seen.append([a.sharding for a in arrays])
        params = [x for x in jax.tree.leaves(state) if x.ndim == 2]
        seen.append([x.sharding for x in params])
        return real(graphdef, state, *arrays)

    lm._score = spy
    out = lm._loglikelihood_tokens([(None, tok_ids[:10], tok_ids[10:14]), (None, tok_ids[:5], tok_ids[5:9])])
    assert len(out) == 2 and all(np.isfinite(r[0]) for r in out)
    batch, params = seen
    for s in batch:  # tokens, targets, weights, valid: rows split over all 8 devices
        assert s.mesh.size == 8 and s.spec[0] is not None
        assert len({d for d in s.device_set}) == 8 and not s.is_fully_replicated
    assert any(not s.is_fully_replicated for s in params)  # the weights are sharded too (FSDP)


def test_init_from_streams_one_slice_at_a_time(tmp_path, monkeypatch):
    """``load_pretrained(..., mesh=...)`` (what ``init_from`` uses) reads one tensor (one layer's / one expert's
    slice) at a time from the files and puts it straight into its shards: no read ever returns a stacked
    parameter, and the result is sharded over the 8 devices."""
    from mistral_jax.convert import keys, sources

    cfg = mj.ModelConfig.tiny_mixtral()
    mj.save_hf(mj.Transformer(cfg, rngs=nnx.Rngs(0)), str(tmp_path / "hf"))
    reads = []
    real = sources.FileSource.read
    monkeypatch.setattr(sources.FileSource, "read", lambda self, e: reads.append(real(self, e)) or reads[-1])
    mesh = sharding.make_mesh(fsdp=-1)
    model = mj.load_pretrained(str(tmp_path / "hf"), mesh=mesh, rules=sharding.rules_preset("fsdp"))
    assert len(reads) == len(keys.entries(cfg))  # every file tensor read once
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    stacked = [v[...] for k, v in params if k[0] == "layers"]
    biggest_slice = max([x.size // cfg.n_layers // (cfg.num_experts if x.ndim == 4 else 1) for x in stacked] +
                        [v[...].size for k, v in params if k[0] != "layers"])
    assert max(r.size for r in reads) <= biggest_slice  # never a whole [L, ...] stack
    embed = next(v[...] for k, v in params if k == ("embed",))
    assert not embed.sharding.is_fully_replicated and len(embed.sharding.device_set) == 8
