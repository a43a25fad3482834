"""The run report (``python -m mistral_jax.report``): report.json holds what metrics.jsonl says (later records of a
step win), the PNGs are real images embedded in a page with no external reference, absent data are a sentence, bad
input is one line with exit status 2; bucket workdirs; a real tiny run."""

import base64
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from mistral_jax import storage
from mistral_jax.cli import report as report_cli
from mistral_jax.report import build_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T0 = 1_765_000_000.0
LAYERS, EXPERTS = 4, 8
FIGURES = ("loss", "throughput", "optimizer", "goodput", "expert_load", "timeline", "memory")


def _train_record(step: int, run: int, t: float, goodput: bool) -> dict:
    """A training step's record as the loop writes it; ``run`` 1 or 2 (the resumed run logs other values)."""
    load = np.random.default_rng(step * 10 + run).dirichlet(np.ones(EXPERTS), LAYERS)
    r = {"step": step, "loss": 6.0 - 0.02 * step - 0.1 * run, "grad_norm": 1.5 / run, "learning_rate": 3e-4 * run,
         "tokens_per_sec": 9000.0 + 100 * run + step, "step_time": 0.45, "mfu": 0.30 + 0.01 * run, "epoch": 0,
         "time": t, "memory/device_bytes_in_use": 3.0e9 + run * 1e7, "memory/device_peak_bytes": 5.5e9,
         "memory/host_rss_bytes": 2.1e9 + step * 1e6}
    r |= {f"expert_load/l{layer}/e{e}": float(load[layer, e]) for layer in range(LAYERS) for e in range(EXPERTS)}
    r |= {f"expert_load/e{e}": float(load[:, e].mean()) for e in range(EXPERTS)}
    if goodput:
        wall = t - T0
        r |= {"goodput/productive_s": 0.8 * wall, "goodput/compile_s": 12.0, "goodput/data_s": 3.0,
              "goodput/checkpoint_s": 4.0, "goodput/eval_s": 2.5, "goodput/lost_s": 9.0 if run == 2 else 0.0,
              "goodput/idle_s": 1.0, "goodput/wall_s": wall, "goodput/percent": 80.0}
    return r


def write_resumed_run(workdir: str) -> list[dict]:
    """A MoE run: steps 10..60 (checkpoint at 40, eval at 40), preempted; resumed from 40, it logs 50..80 again
    (other values) with an eval at 80. Returns the records in file order."""
    records, events = [], [{"time": T0, "event": "start", "step": 0}, {"time": T0 + 30, "event": "compiled", "step": 0}]
    for step in range(10, 70, 10):
        t = T0 + 30 + 5 * step
        records.append(_train_record(step, 1, t, goodput=True))
        if step == 40:
            records.append({"step": 40, "eval/loss": 5.5, "eval/perplexity": float(np.exp(5.5)), "time": t + 2})
            events += [{"time": t + 1, "event": "checkpoint", "step": 40}, {"time": t + 2, "event": "eval", "step": 40}]
    events.append({"time": T0 + 400, "event": "preempted", "step": 60})
    events += [{"time": T0 + 500, "event": "start", "step": 0}, {"time": T0 + 505, "event": "resume", "step": 40,
                                                                   "from_step": 40}]
    for step in range(50, 90, 10):
        t = T0 + 520 + 5 * step
        records.append(_train_record(step, 2, t, goodput=True))
    records.append({"step": 80, "eval/loss": 5.0, "eval/perplexity": float(np.exp(5.0)), "time": T0 + 930})
    events += [{"time": T0 + 931, "event": "checkpoint", "step": 80}, {"time": T0 + 932, "event": "end", "step": 80}]
    config = {"num_steps": 80, "batch_size": 8, "model": {"name": "tiny_moe", "num_experts": EXPERTS},
              "optimizer": {"learning_rate": 3e-4, "warmup_steps": 5}, "data": {"train": "corpus", "seq_len": 128}}
    storage.write_bytes(storage.join(workdir, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in records).encode())
    storage.write_bytes(storage.join(workdir, "events.jsonl"), "".join(json.dumps(e) + "\n" for e in events).encode())
    storage.write_bytes(storage.join(workdir, "run_config.json"), json.dumps(config).encode())
    return records


def _expected(records: list[dict], key: str) -> dict:
    """``{"step", "value"}`` of ``key`` as this test reads metrics.jsonl: the last record of each step."""
    by_step = {r["step"]: r[key] for r in records if key in r}
    return {"step": sorted(by_step), "value": [by_step[s] for s in sorted(by_step)]}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("resumed"))
    records = write_resumed_run(workdir)
    index = build_report(workdir)
    out = os.path.dirname(index)
    with open(os.path.join(out, "report.json")) as f:
        data = json.load(f)
    return workdir, records, out, data


def test_report_json_holds_what_metrics_jsonl_says_later_records_win(resumed):
    workdir, records, out, data = resumed
    assert out == os.path.join(workdir, "report")
    for key in ("loss", "eval/loss", "tokens_per_sec", "mfu", "learning_rate", "grad_norm",
                "memory/device_bytes_in_use", "memory/device_peak_bytes", "memory/host_rss_bytes"):
        assert data["series"][key] == _expected(records, key), key
    loss = dict(zip(data["series"]["loss"]["step"], data["series"]["loss"]["value"], strict=True))
    assert list(loss) == [10, 20, 30, 40, 50, 60, 70, 80]
    assert loss[40] == pytest.approx(6.0 - 0.8 - 0.1) and loss[50] == pytest.approx(6.0 - 1.0 - 0.2)  # run 2 won
    assert data["series"]["eval/loss"] == {"step": [40, 80], "value": [5.5, 5.0]}
    last = records[-2]  # the last training record (step 80, run 2)
    assert data["goodput"] == {"step": 80, "percent": 80.0, "wall_s": last["goodput/wall_s"],
                               "seconds": {p: last[f"goodput/{p}_s"] for p in
                                           ("productive", "compile", "data", "checkpoint", "eval", "lost", "idle")}}
    load = data["expert_load"]
    assert load["step"] == 80 and load["per_layer"]
    assert np.allclose(load["load"], [[last[f"expert_load/l{i}/e{e}"] for e in range(EXPERTS)] for i in range(LAYERS)])
    timeline = data["timeline"]
    train = [r for r in records if "loss" in r]
    assert timeline["step"] == [r["step"] for r in train] and timeline["time"] == [r["time"] for r in train]
    assert [e["event"] for e in timeline["events"]] == ["start", "compiled", "checkpoint", "eval", "preempted",
                                                        "start", "resume", "checkpoint", "end"]
    assert data["absent"] == {}
    assert data["figures"] == {k: f"{k}.png" for k in FIGURES}


def test_pngs_are_images_embedded_in_a_page_without_external_references(resumed):
    import matplotlib.image

    _, _, out, data = resumed
    page = open(os.path.join(out, "index.html"), encoding="utf-8").read()
    embedded = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(embedded) == len(FIGURES)
    for name in data["figures"].values():
        png = open(os.path.join(out, name), "rb").read()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(io.BytesIO(png), format="png")
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 300 and image.std() > 0.01, name
        assert base64.b64encode(png).decode() in embedded, name
    attributes = re.findall(r"\b(?:src|href|action|data)\s*=\s*['\"]([^'\"]*)", page)
    assert attributes and all(a.startswith("data:image/png;base64,") for a in attributes)
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    for external in ("http:", "https:", "<link", "<script", "<iframe", "url(", "@import", "//"):
        assert external not in text, external
    assert "80.0%" in page and "batch_size" in page and "optimizer.warmup_steps" in page and "tiny_moe" in page


def test_absent_data_are_one_sentence_each_not_a_crash(tmp_path):
    """A run from before time / events / goodput / memory were logged, dense, no configs, its last line cut."""
    records = [{"step": s, "loss": 7.0 - s / 100, "grad_norm": 2.0, "learning_rate": 1e-3, "tokens_per_sec": 500.0,
                "step_time": 1.0, "epoch": 0} for s in (5, 10, 15)]
    text = "".join(json.dumps(r) + "\n" for r in records) + '{"step": 20, "loss": 6.'  # a line being appended
    (tmp_path / "metrics.jsonl").write_text(text)
    data = json.load(open(os.path.dirname(build_report(str(tmp_path), str(tmp_path / "out"))) + "/report.json"))
    assert set(data["figures"]) == {"loss", "throughput", "optimizer"}
    assert set(data["absent"]) == {"goodput", "expert_load", "timeline", "memory"}
    assert data["series"]["loss"] == _expected(records, "loss") and "mfu" not in data["series"]
    page = (tmp_path / "out" / "index.html").read_text()
    for why in data["absent"].values():
        assert why.endswith(".") and why.count(". ") == 0 and why in page.replace("&#x27;", "'")
    assert "There is no readable run_config.json" in page and "1 in metrics.jsonl" in page
    assert sorted(os.listdir(tmp_path / "out")) == ["index.html", "loss.png", "optimizer.png", "report.json",
                                                    "throughput.png"]


def test_mean_expert_load_when_no_per_layer_keys(tmp_path):
    records = [{"step": s, "loss": 3.0, **{f"expert_load/e{e}": (e + s) / 100 for e in range(4)}} for s in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "events.jsonl").write_text(json.dumps({"time": T0, "event": "start", "step": 0}) + "\n")
    build_report(str(tmp_path))
    data = json.load(open(tmp_path / "report" / "report.json"))
    assert data["expert_load"] == {"step": 2, "per_layer": False, "load": [[0.02, 0.03, 0.04, 0.05]]}
    assert data["timeline"] == {"time": [], "step": [], "events": [{"time": T0, "event": "start", "step": 0}]}


@pytest.mark.parametrize("argv, expected", [
    (["{tmp}"], "holds no metrics.jsonl"),
    (["{tmp}/missing"], "does not exist"),
    (["{tmp}/file.txt"], "is not a directory"),
    (["http://host/run"], "http:// URL"),
    (["{tmp}", "--out", "hdfs://x/y"], "hdfs:// URL"),
    (["{tmp}", "--colour", "red"], "unrecognized arguments"),
    ([], "required"),
])
def test_cli_bad_input_is_one_line_exit_2(argv, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MISTRAL_JAX_DEBUG", raising=False)
    (tmp_path / "file.txt").write_text("x")
    assert report_cli.main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and expected in captured.err, captured.err
    assert captured.err.startswith("report: ") and "Fix:" in captured.err
    assert not os.path.exists(tmp_path / "report")


def test_without_matplotlib_one_line_exit_2(tmp_path, capsys, monkeypatch):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 6.2}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as where it is not installed: import fails
    monkeypatch.delenv("MISTRAL_JAX_DEBUG", raising=False)
    assert report_cli.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "matplotlib, which is not installed. Fix: pip install matplotlib" in err, err


def test_cli_writes_the_report(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 6.2}\n{"step": 2, "loss": 6.1}\n')
    assert report_cli.main([str(tmp_path / "run"), "--out", str(tmp_path / "r")]) == 0
    assert capsys.readouterr().out == f"report: {tmp_path / 'r' / 'index.html'}\n"
    assert sorted(os.listdir(tmp_path / "r")) == ["index.html", "loss.png", "report.json"]


@pytest.mark.heavy
def test_python_m_report_is_quiet_with_a_fresh_font_cache(tmp_path):
    """The module entry point, with an empty matplotlib config dir (font cache built on the way): nothing on
    stderr, one line on stdout; a workdir without metrics.jsonl: one line, exit status 2."""
    write_resumed_run(str(tmp_path / "run"))
    env = {**os.environ, "MPLCONFIGDIR": str(tmp_path / "mpl"), "PYTHONPATH": ROOT}
    env.pop("MISTRAL_JAX_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "mistral_jax.report", str(tmp_path / "run")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout == f"report: {tmp_path / 'run' / 'report' / 'index.html'}\n"
    bad = subprocess.run([sys.executable, "-m", "mistral_jax.report", str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "holds no metrics.jsonl" in bad.stderr, bad.stderr


@pytest.mark.heavy
def test_bucket_workdir_and_bucket_output(gcs_bucket, tmp_path):
    workdir = storage.join(gcs_bucket, "runs", "moe")
    records = write_resumed_run(workdir)
    index = build_report(workdir)
    assert index == storage.join(workdir, "report", "index.html")
    data = json.loads(storage.read_bytes(storage.join(workdir, "report", "report.json")))
    assert data["series"]["loss"] == _expected(records, "loss") and data["absent"] == {}
    for name in data["figures"].values():
        assert storage.read_bytes(storage.join(workdir, "report", name))[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "data:image/png;base64," in storage.read_bytes(index).decode()
    local = build_report(workdir, str(tmp_path / "local"))  # a bucket run, a local report
    assert json.load(open(os.path.join(os.path.dirname(local), "report.json")))["series"] == data["series"]
    assert report_cli.main([storage.join(gcs_bucket, "empty")]) == 2  # no metrics.jsonl in the bucket


@pytest.mark.heavy
def test_report_of_a_real_tiny_run(tiny_trained_run, tmp_path):
    """The shared tiny run (30 steps, logged every 10, one checkpoint): its report, written beside it (the run is
    read-only), plots exactly its metrics.jsonl."""
    from mistral_jax.training.metrics import read_metrics

    records = read_metrics(tiny_trained_run)
    index = build_report(tiny_trained_run, str(tmp_path / "report"))
    data = json.load(open(os.path.join(os.path.dirname(index), "report.json")))
    for key in ("loss", "tokens_per_sec", "learning_rate", "grad_norm"):
        assert data["series"][key] == _expected(records, key), key
    assert data["series"]["loss"]["step"] == [10, 20, 30]
    assert {"loss", "throughput", "optimizer"} <= set(data["figures"])
    assert set(data["figures"]) | set(data["absent"]) == set(FIGURES)

    def logged(prefix):  # a figure is drawn exactly when the run logged its data
        return any(k.startswith(prefix) for r in records for k in r)

    assert ("goodput" in data["figures"]) == logged("goodput/")
    assert ("memory" in data["figures"]) == logged("memory/")
    assert ("expert_load" in data["figures"]) == logged("expert_load/")  # tiny is dense: absent
    assert ("timeline" in data["figures"]) == (logged("time") or storage.path(storage.join(tiny_trained_run,
                                                                                          "events.jsonl")).exists())
    for key in ("memory/device_bytes_in_use", "memory/host_rss_bytes", "mfu"):
        if logged(key):
            assert data["series"][key] == _expected([r for r in records if "loss" in r], key), key
    page = open(index, encoding="utf-8").read()
    assert page.count("src='data:image/png;base64,") == len(data["figures"])
    assert "data.tokenizer" in page and "num_steps" in page  # the run config as a table


def test_an_rl_run_gets_a_reward_figure(tmp_path):
    """Records with ``reward`` (GRPO's rollouts), ``eval/reward`` and ``completions/mean_length``: a Reward figure
    with their series; the runs of the other tests have none and no absence note (asserted there)."""
    records = [{"step": s, "loss": 0.01 * s, "reward": 0.5 + 0.01 * s, "completions/mean_length": 20.0 - s / 10}
               for s in (10, 20, 30)]
    records += [{"step": s, "eval/reward": 0.4 + 0.02 * s} for s in (20, 30)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    data = json.load(open(os.path.dirname(build_report(str(tmp_path), str(tmp_path / "out"))) + "/report.json"))
    assert "rewards" in data["figures"] and "rewards" not in data["absent"]
    assert data["series"]["reward"] == _expected(records, "reward")
    assert data["series"]["eval/reward"] == _expected(records, "eval/reward")
    page = (tmp_path / "out" / "index.html").read_text()
    assert "<h2 id='rewards'>Reward</h2>" in page and page.index("id='loss'") < page.index("id='rewards'")
