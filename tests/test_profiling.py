"""Profiler traces of chosen steps (``config.profile``), read back with XProf; the step's named scopes; memory per
step in the metrics."""

import glob
import json
import os

import jax
import optax
import pytest

from mistral_jax.config import ConfigError
from mistral_jax.training import profiling, trainer
from mistral_jax.training import step as step_lib
from mistral_jax.training.metrics import read_events, read_metrics
from tests.test_train import one_device_state  # noqa: F401, F811 - the fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(tokenizer, **overrides):
    cfg = trainer.load_config_file(os.path.join(ROOT, "configs/tiny.py"))
    cfg.update_from_flattened_dict({"num_steps": 6, "batch_size": 8, "log_every": 1, "progress_bar": False,
                                    "data.seq_len": 32, "data.tokenizer": tokenizer, "data.validation": "",
                                    "checkpoint.every_steps": 100, "optimizer.warmup_steps": 1, **overrides})
    return cfg


@pytest.mark.parametrize("spec, want", [("", None), ("3:5", (3, 5)), ("7", (7, 8)), (" 2:3 ", (2, 3))])
def test_steps_spec(spec, want):
    assert profiling.parse_steps(spec) == want


@pytest.mark.parametrize("change, match", [({"profile.steps": "5:3"}, r"need 1 <= start < stop"),
                                           ({"profile.steps": "a:b"}, r"is not 'start:stop'"),
                                           ({"profile.steps": "0:2"}, r"need 1 <= start"),
                                           ({"profile.processes": "1"}, r"'0' \(process 0\) or 'all'")])
def test_bad_profile_config_is_one_line(change, match, tokenizer_path):
    from mistral_jax.training.run import validate_config

    with pytest.raises(ConfigError, match=match) as e:
        validate_config(_cfg(tokenizer_path, **change), n_devices=8)
    assert "\n" not in str(e.value) and "Fix:" in str(e.value)


def _trace_steps(profile_dir):
    """The step numbers of the ``train`` step annotations in the trace, as XProf's trace viewer reads it."""
    from xprof.convert import raw_to_tool_data

    spaces = glob.glob(os.path.join(profile_dir, "plugins", "profile", "*", "*.xplane.pb"))
    assert len(spaces) == 1, spaces
    assert any(t.startswith("trace_viewer") for t in raw_to_tool_data.xspace_to_tool_names(spaces))
    data, _ = raw_to_tool_data.xspace_to_tool_data(spaces, "trace_viewer", {})
    events = json.loads(data)["traceEvents"]
    names = {e.get("name") for e in events}
    return sorted(int(n.split()[1]) for n in names if n and n.startswith("train ")), names


@pytest.mark.heavy
def test_profile_of_steps_3_to_5_loads_in_xprof(tokenizer_path, tmp_path):
    workdir = str(tmp_path / "run")
    trainer.train(_cfg(tokenizer_path, **{"profile.steps": "3:5"}), workdir)
    steps, names = _trace_steps(os.path.join(workdir, "profile"))
    assert steps == [3, 4]  # the steps that make 3 and 4; nothing outside the range
    assert "data" in names  # the host annotations
    assert glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*", "*.trace.json.gz"))  # Perfetto
    recs = [r for r in read_metrics(workdir) if "loss" in r]
    assert len(recs) == 6 and all(r["memory/host_rss_bytes"] > 50e6 for r in recs)
    assert [e["event"] for e in read_events(workdir)] == ["start", "compiled", "checkpoint", "end"]


@pytest.mark.heavy
def test_profile_into_a_bucket_workdir(tokenizer_path, tmp_path, gcs_bucket):
    from mistral_jax import storage

    url = f"{gcs_bucket}/prof"
    trainer.train(_cfg(tokenizer_path, **{"profile.steps": "2:3", "num_steps": 3}), url)
    local = tmp_path / "copy"
    fs, key = storage.fs_and_key(storage.join(url, "profile"))
    for obj in fs.find(key):
        rel = obj.split("/profile/", 1)[1]
        os.makedirs(local / os.path.dirname(rel), exist_ok=True)
        (local / rel).write_bytes(fs.cat_file(obj))
    assert _trace_steps(str(local))[0] == [2]


@pytest.mark.heavy
def test_train_step_carries_named_scopes(one_device_state):  # noqa: F811
    _, graphdef, state, _, schedule, batch = one_device_state
    sgd = optax.sgd(1.0)
    state = dict(state, opt_state=sgd.init(state["params"]))
    hlo = jax.jit(lambda s, b: step_lib.train_step(graphdef, sgd, s, b, schedule=schedule)).lower(
        state, batch).as_text(debug_info=True)
    # the forward pass under differentiation is jvp(forward); its transpose sits in backward; then the optimizer
    for scope in ("/jvp(forward)/", "/backward/transpose(jvp(forward))/", "/optimizer/"):
        assert scope in hlo, scope
