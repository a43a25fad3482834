"""The run report: one self-contained HTML page about a training run's workdir (local, ``gs://`` or ``s3://``).

    python -m mistral_jax.report WORKDIR [--out DIR]      # or mistral-jax-report; default DIR: WORKDIR/report/

``build_report(workdir, out)`` reads ``metrics.jsonl``, ``events.jsonl``, ``run_config.json`` and
``model_config.json`` (each may be absent but the first) through ``mistral_jax.storage`` and writes into ``out``:

* ``index.html``: the figures (PNGs embedded as base64 ``data:`` URIs: no external reference), a summary, and the
  run and model configs as tables. A figure whose data are absent is left out with one sentence saying why.
* one ``.png`` per figure, beside it (the same bytes as the embedded ones).
* ``report.json``: the exact data plotted, so the figures can be checked against ``metrics.jsonl``:
  ``series`` (``{metric: {"step": [...], "value": [...]}}``, steps ascending), ``goodput``, ``expert_load``,
  ``timeline``, ``figures`` (figure -> PNG file name) and ``absent`` (figure -> why it is left out).

A resumed run appends to ``metrics.jsonl``, so a step may be logged more than once: the later record of a step wins
(per metric; training and eval records are kept apart). Figures are drawn with matplotlib's Agg canvas (no display,
no pyplot state).
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import logging
import math
import os
import re
from typing import Any

from mistral_jax import storage

METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"
RUN_CONFIG = "run_config.json"
MODEL_CONFIG = "model_config.json"
REPORT_DIR = "report"

GOODPUT_PARTS = ("productive", "compile", "data", "rollout", "checkpoint", "eval", "lost", "idle")
MEMORY_KEYS = ("memory/device_bytes_in_use", "memory/device_peak_bytes", "memory/host_rss_bytes")
_LAYER_LOAD = re.compile(r"^expert_load/l(\d+)/e(\d+)$")
_MEAN_LOAD = re.compile(r"^expert_load/e(\d+)$")
# events drawn on the time axis: name -> (colour, line style)
_EVENT_STYLE = {"start": ("black", "-"), "resume": ("tab:purple", "-"), "compiled": ("tab:gray", ":"),
                "checkpoint": ("tab:green", "--"), "eval": ("tab:blue", ":"), "preempted": ("tab:red", "-"),
                "hang": ("tab:red", "--"), "end": ("black", "--")}


class ReportError(ValueError):
    """A workdir the report cannot be made of (no ``metrics.jsonl``): one line, with the fix."""


# ------------------------------------------------------------------------------------------ reading
def _read_text(path: str) -> str | None:
    try:
        return storage.read_bytes(path).decode("utf-8", errors="replace")
    except (FileNotFoundError, IsADirectoryError):
        return None


def _jsonl(text: str | None) -> tuple[list[dict[str, Any]], int]:
    """The JSON objects of a JSONL text and the count of lines that are not one (e.g. a line being appended)."""
    out, bad = [], 0
    for line in (text or "").splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(obj, dict):
            out.append(obj)
        else:
            bad += 1
    return out, bad


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def is_eval(record: dict[str, Any]) -> bool:
    """An eval record (its metrics are logged under ``eval/``), as opposed to a training step's record."""
    return any(k.startswith("eval/") for k in record)


def series_of(records: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """``{metric: {step: value}}`` of ``records`` in file order: the later record of a step wins."""
    out: dict[str, dict[int, float]] = {}
    for r in records:
        step = r.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            continue
        for k, v in r.items():
            x = _number(v)
            if k != "step" and x is not None:
                out.setdefault(k, {})[step] = x
    return out


def _last_with(records: list[dict[str, Any]], pred) -> dict[str, Any] | None:
    """The last of ``records`` with a number under a key that ``pred`` accepts."""
    for r in reversed(records):
        if any(pred(k) and _number(v) is not None for k, v in r.items()):
            return r
    return None


def _flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(d, dict) and d:
        out = []
        for k, v in d.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return [(prefix, d)]


# ------------------------------------------------------------------------------------------ figures
def _canvas(rows: int = 1, cols: int = 1, size: tuple[float, float] = (8.0, 4.0), **kw):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False, **kw)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _xy(s: dict[int, float]) -> dict[str, list]:
    steps = sorted(s)
    return {"step": steps, "value": [s[k] for k in steps]}


def _span(times: list[float]) -> tuple[float, str, float]:
    """The origin, unit name and divisor for a time axis over ``times`` (seconds, minutes or hours)."""
    t0, width = min(times), max(times) - min(times)
    return (t0, "h", 3600.0) if width > 3 * 3600 else (t0, "min", 60.0) if width > 180 else (t0, "s", 1.0)


def _utc(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, tz=datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class _Report:
    def __init__(self, workdir: str):
        self.workdir = workdir
        text = _read_text(storage.join(workdir, METRICS_FILE))
        if text is None:
            raise ReportError(f"{workdir!r} holds no {METRICS_FILE} (not a training workdir, or no step logged "
                              "yet). Fix: pass the workdir a run was trained into (it holds metrics.jsonl, "
                              "run_config.json, checkpoints/)")
        self.records, self.bad_lines = _jsonl(text)
        self.events, self.bad_events = _jsonl(_read_text(storage.join(workdir, EVENTS_FILE)))
        self.events = [e for e in self.events if _number(e.get("time")) is not None and isinstance(e.get("event"), str)]
        self.events.sort(key=lambda e: e["time"])
        self.train = series_of([r for r in self.records if not is_eval(r)])
        self.eval = series_of([r for r in self.records if is_eval(r)])
        self.run_config = self._config(RUN_CONFIG)
        self.model_config = self._config(MODEL_CONFIG)
        self.data: dict[str, Any] = {"workdir": workdir, "series": {}, "figures": {}, "absent": {}}
        self.pngs: dict[str, bytes] = {}
        self.titles: dict[str, str] = {}

    def _config(self, name: str) -> dict | None:
        text = _read_text(storage.join(self.workdir, name))
        try:
            cfg = json.loads(text) if text is not None else None
        except json.JSONDecodeError:
            return None
        return cfg if isinstance(cfg, dict) else None

    def _series(self, name: str, source: dict[str, dict[int, float]]) -> dict[str, list] | None:
        if name not in source:
            return None
        xy = self.data["series"][name] = _xy(source[name])
        return xy

    def _add(self, key: str, title: str, fig) -> None:
        self.pngs[key] = _png(fig)
        self.titles[key] = title
        self.data["figures"][key] = f"{key}.png"

    def _absent(self, key: str, title: str, why: str) -> None:
        self.titles[key] = title
        self.data["absent"][key] = why

    # each figure: drawn, or a sentence saying why not
    def loss(self) -> None:
        train, ev = self._series("loss", self.train), self._series("eval/loss", self.eval)
        if not train and not ev:
            return self._absent("loss", "Loss", f"No record in {METRICS_FILE} has a loss or an eval/loss.")
        fig, ax = _canvas()
        ax = ax[0, 0]
        if train:
            ax.plot(train["step"], train["value"], color="tab:blue", lw=1.2, label="train loss")
        if ev:
            ax.plot(ev["step"], ev["value"], "o-", color="tab:orange", ms=5, lw=1, label="eval loss")
        ax.set(xlabel="step", ylabel="loss", title="Loss")
        ax.grid(alpha=0.3)
        ax.legend()
        self._add("loss", "Loss", fig)

    def rewards(self) -> None:
        """RL runs only (a ``reward`` metric): the mean reward of the rollouts and of the held-out answers, and the
        completions' mean length. Runs without rewards get no figure (and no absence note)."""
        train, ev = self._series("reward", self.train), self._series("eval/reward", self.eval)
        if not train and not ev:
            return
        length = self._series("completions/mean_length", self.train)
        fig, axes = _canvas(2 if length else 1, 1, size=(8.0, 5.8 if length else 3.2), sharex=True)
        ax = axes[0, 0]
        if train:
            ax.plot(train["step"], train["value"], color="tab:blue", lw=1.2, label="rollouts (sampled)")
        if ev:
            ax.plot(ev["step"], ev["value"], "o-", color="tab:orange", ms=5, lw=1, label="held-out (greedy)")
        ax.set(ylabel="reward", title="Reward")
        ax.grid(alpha=0.3)
        ax.legend()
        if length:
            axes[1, 0].plot(length["step"], length["value"], color="tab:green", lw=1.2)
            axes[1, 0].set_ylabel("completion tokens")
            axes[1, 0].grid(alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        self._add("rewards", "Reward", fig)

    def optimizer(self) -> None:
        lr, gn = self._series("learning_rate", self.train), self._series("grad_norm", self.train)
        if not lr and not gn:
            return self._absent("optimizer", "Learning rate and gradient norm",
                                f"No record in {METRICS_FILE} has a learning_rate or a grad_norm.")
        self._two("optimizer", "Learning rate and gradient norm", (lr, "learning rate", "tab:green"),
                  (gn, "gradient norm (before clipping)", "tab:red"))

    def throughput(self) -> None:
        tps, mfu = self._series("tokens_per_sec", self.train), self._series("mfu", self.train)
        if not tps and not mfu:
            return self._absent("throughput", "Throughput",
                                f"No record in {METRICS_FILE} has tokens_per_sec or mfu.")
        self._two("throughput", "Throughput", (tps, "tokens / s", "tab:blue"), (mfu, "MFU", "tab:purple"))

    def _two(self, key: str, title: str, *panels) -> None:
        panels = [p for p in panels if p[0]]
        fig, axes = _canvas(len(panels), 1, size=(8.0, 2.6 * len(panels) + 0.6), sharex=True)
        for ax, (xy, label, colour) in zip(axes[:, 0], panels, strict=True):
            ax.plot(xy["step"], xy["value"], color=colour, lw=1.2, marker="." if len(xy["step"]) < 50 else None)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        axes[0, 0].set_title(title)
        self._add(key, title, fig)

    def goodput(self) -> None:
        title = "Goodput"
        last = _last_with(self.records, lambda k: k.startswith("goodput/"))
        final = [e for e in self.events if e["event"] in ("end", "preempted") and _number(e.get("wall_s"))]
        if final and (last is None or final[-1]["wall_s"] > (_number(last.get("goodput/wall_s")) or 0)):
            # a run's end event holds its final totals (after its last metrics record)
            last = {"step": final[-1].get("step"), **{f"goodput/{k}": v for k, v in final[-1].items()
                                                      if k.endswith("_s") or k == "percent"}}
        if last is None:
            return self._absent("goodput", title, f"No record in {METRICS_FILE} has goodput/* keys (runs before "
                                "goodput accounting was added do not log them).")
        seconds = {p: _number(last.get(f"goodput/{p}_s")) for p in GOODPUT_PARTS}
        seconds = {p: v for p, v in seconds.items() if v is not None}
        wall, percent = _number(last.get("goodput/wall_s")), _number(last.get("goodput/percent"))
        if percent is None and wall and "productive" in seconds:
            percent = 100.0 * seconds["productive"] / wall
        self.data["goodput"] = {"step": last.get("step"), "seconds": seconds, "wall_s": wall, "percent": percent}
        if not seconds:
            return self._absent("goodput", title, "The last goodput record has no goodput/*_s parts.")
        fig, ax = _canvas(size=(8.0, 0.45 * len(seconds) + 1.4))
        ax = ax[0, 0]
        names = list(seconds)[::-1]
        colours = {"productive": "tab:green", "lost": "tab:red", "idle": "tab:gray"}
        ax.barh(names, [seconds[n] for n in names], color=[colours.get(n, "tab:blue") for n in names])
        total = wall or sum(seconds.values()) or 1.0
        for i, n in enumerate(names):
            ax.text(seconds[n], i, f" {seconds[n]:.1f} s ({100 * seconds[n] / total:.1f}%)", va="center", fontsize=8)
        ax.set_xlim(0, max(seconds.values()) * 1.35 or 1.0)
        head = f"Goodput {percent:.1f}%" if percent is not None else "Goodput"
        ax.set(xlabel="seconds (cumulative over the job)",
               title=f"{head} of {wall:.0f} s wall (step {last.get('step')})" if wall else head)
        ax.grid(axis="x", alpha=0.3)
        self._add("goodput", title, fig)

    def expert_load(self) -> None:
        title = "MoE expert load"
        last = _last_with(self.records, lambda k: bool(_LAYER_LOAD.match(k)))
        if last is not None:
            cells = {tuple(map(int, m.groups())): float(v) for k, v in last.items()
                     if (m := _LAYER_LOAD.match(k)) and _number(v) is not None}
            layers = 1 + max(c[0] for c in cells)
            experts = 1 + max(c[1] for c in cells)
            grid = [[cells.get((layer, e), math.nan) for e in range(experts)] for layer in range(layers)]
            rows = [f"layer {i}" for i in range(layers)]
        else:
            last = _last_with(self.records, lambda k: bool(_MEAN_LOAD.match(k)))
            if last is None:
                return self._absent("expert_load", title, f"No record in {METRICS_FILE} has expert_load keys "
                                    "(a dense model, or a run before they were logged).")
            cells = {int(m.group(1)): float(v) for k, v in last.items()
                     if (m := _MEAN_LOAD.match(k)) and _number(v) is not None}
            grid = [[cells.get(e, math.nan) for e in range(1 + max(cells))]]
            rows = ["mean over layers"]
        self.data["expert_load"] = {"step": last.get("step"), "per_layer": rows[0] != "mean over layers",
                                    "load": grid}
        layers, experts = len(grid), len(grid[0])
        fig, ax = _canvas(size=(min(2.0 + 0.7 * experts, 12.0), min(1.6 + 0.35 * layers, 10.0)))
        ax = ax[0, 0]
        im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        fig.colorbar(im, ax=ax, label="fraction of routed tokens")
        ax.set_xticks(range(experts))
        ax.set_xlabel("expert")
        ax.set_yticks(range(layers), rows if layers <= 40 else None)
        if layers > 40:
            ax.set_ylabel("layer")
        if layers * experts <= 256:
            for i in range(layers):
                for j in range(experts):
                    if not math.isnan(grid[i][j]):
                        ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=7, color="white")
        ax.set_title(f"Expert load at step {last.get('step')} (uniform = {1 / experts:.2f})")
        self._add("expert_load", title, fig)

    def timeline(self) -> None:
        title = "Timeline: checkpoints, evals and restarts"
        timed = [(r["time"], r["step"]) for r in self.records
                 if not is_eval(r) and _number(r.get("time")) is not None and isinstance(r.get("step"), int)]
        if not self.events and not timed:
            return self._absent("timeline", title, f"There is no {EVENTS_FILE} and no record in {METRICS_FILE} "
                                "has a time (runs before they were logged).")
        self.data["timeline"] = {"time": [t for t, _ in timed], "step": [s for _, s in timed],
                                 "events": [{k: e.get(k) for k in ("time", "event", "step")} for e in self.events]}
        t0, unit, div = _span([t for t, _ in timed] + [e["time"] for e in self.events])
        fig, ax = _canvas(size=(9.0, 4.2))
        ax = ax[0, 0]
        segments: list[list[tuple[float, int]]] = []  # in file order, a new segment where the step goes back
        for t, s in timed:
            if not segments or s <= segments[-1][-1][1]:
                segments.append([])
            segments[-1].append((t, s))
        for i, seg in enumerate(segments):
            ax.plot([(t - t0) / div for t, _ in seg], [s for _, s in seg], ".-", color="tab:blue", ms=3, lw=1,
                    label="logged step" if i == 0 else None)
        seen = set()
        for e in self.events:
            colour, style = _EVENT_STYLE.get(e["event"], ("tab:olive", ":"))
            label = None if e["event"] in seen else e["event"]
            seen.add(e["event"])
            ax.axvline((e["time"] - t0) / div, color=colour, ls=style, lw=1.2, alpha=0.8, label=label)
        ax.set(xlabel=f"{unit} since {_utc(t0)}", ylabel="step", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        self._add("timeline", title, fig)

    def memory(self) -> None:
        title = "Memory"
        found = {k: self._series(k, self.train) for k in MEMORY_KEYS}
        found = {k: v for k, v in found.items() if v}
        if not found:
            return self._absent("memory", title, f"No record in {METRICS_FILE} has memory/* keys (runs before "
                                "they were logged).")
        fig, ax = _canvas()
        ax = ax[0, 0]
        for k, xy in found.items():
            ax.plot(xy["step"], [v / 2**30 for v in xy["value"]], lw=1.2, label=k.split("/", 1)[1],
                    marker="." if len(xy["step"]) < 50 else None)
        ax.set(xlabel="step", ylabel="GiB", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
        self._add("memory", title, fig)

    # ------------------------------------------------------------------------------------------ the page
    def summary(self) -> list[tuple[str, str]]:
        rows = [("workdir", self.workdir)]
        loss = self.train.get("loss")
        if loss:
            first, last = min(loss), max(loss)
            rows += [("steps logged", f"{len(loss)} (step {first} to {last})"),
                     ("train loss", f"{loss[first]:.4f} at step {first}, {loss[last]:.4f} at step {last}")]
        ev = self.eval.get("eval/loss")
        if ev:
            rows.append(("eval loss", f"{ev[max(ev)]:.4f} at step {max(ev)}"))
        for key, label in (("tokens_per_sec", "tokens / s (median)"), ("mfu", "MFU (median)")):
            vals = sorted(self.train.get(key, {}).values())
            if vals:
                rows.append((label, f"{vals[len(vals) // 2]:.4g}"))
        if "goodput" in self.data and self.data["goodput"]["percent"] is not None:
            rows.append(("goodput", f"{self.data['goodput']['percent']:.1f}%"))
        counts: dict[str, int] = {}
        for e in self.events:
            counts[e["event"]] = counts.get(e["event"], 0) + 1
        if counts:
            rows.append(("events", ", ".join(f"{n} x {k}" for k, n in counts.items())))
            rows.append(("time span", f"{_utc(self.events[0]['time'])} to {_utc(self.events[-1]['time'])}"))
        repeated = sum(1 for r in self.records if not is_eval(r) and "step" in r) - len(
            {r["step"] for r in self.records if not is_eval(r) and "step" in r})
        if repeated:
            rows.append(("repeated steps", f"{repeated} records re-log a step (a resumed run); the later one is "
                         "plotted"))
        if self.bad_lines or self.bad_events:
            rows.append(("unreadable lines", f"{self.bad_lines} in {METRICS_FILE}, {self.bad_events} in "
                         f"{EVENTS_FILE} (skipped)"))
        return rows

    def html(self) -> str:
        e = html.escape
        parts = [f"<h1>Training run report</h1><p class='meta'>{e(self.workdir)}, made {e(_utc(_now()))}</p>",
                 "<h2>Summary</h2>", _table(self.summary())]
        for key in ("loss", "rewards", "throughput", "optimizer", "goodput", "expert_load", "timeline", "memory"):
            if key not in self.titles:  # an optional figure (rewards: RL runs only)
                continue
            parts.append(f"<h2 id='{key}'>{e(self.titles[key])}</h2>")
            if key in self.pngs:
                data = base64.b64encode(self.pngs[key]).decode("ascii")
                parts.append(f"<img alt='{e(self.titles[key])}' src='data:image/png;base64,{data}'>")
            else:
                parts.append(f"<p class='absent'>{e(self.data['absent'][key])}</p>")
        for name, cfg in (("Run config", self.run_config), ("Model config", self.model_config)):
            parts.append(f"<h2>{name}</h2>")
            file = RUN_CONFIG if cfg is self.run_config else MODEL_CONFIG
            parts.append(_table([(k, json.dumps(v)) for k, v in _flatten(cfg)]) if cfg else
                         f"<p class='absent'>There is no readable {file} in the workdir.</p>")
        return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>Run report: "
                f"{e(self.workdir)}</title><style>{_CSS}</style></head><body>\n" + "\n".join(parts)
                + "\n</body></html>\n")


_CSS = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}"
        "h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}img{max-width:100%}"
        "table{border-collapse:collapse;font-size:.9em}td{border:1px solid #ddd;padding:.2em .6em;"
        "vertical-align:top}td:first-child{font-family:monospace;white-space:nowrap}.meta{color:#666}"
        ".absent{color:#666;font-style:italic}")


def _table(rows: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _now() -> float:
    import time

    return time.time()


def _quiet_matplotlib() -> None:
    """matplotlib is importable (else a one-line ``ReportError``); no font-cache or font-lookup chatter on the
    normal path (``MISTRAL_JAX_DEBUG=1`` shows it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ReportError("the run report draws its figures with matplotlib, which is not installed. Fix: pip "
                          "install matplotlib") from None
    if os.environ.get("MISTRAL_JAX_DEBUG", "") in ("", "0"):
        logging.getLogger("matplotlib").setLevel(logging.ERROR)


def build_report(workdir: str, out: str | None = None) -> str:
    """Write the report of the run in ``workdir`` into ``out`` (default ``{workdir}/report/``; local or a bucket):
    ``index.html``, one PNG per figure, ``report.json``. Returns the path of ``index.html``.

    Raises:
      ReportError: ``workdir`` holds no ``metrics.jsonl``, or matplotlib is not installed.
    """
    workdir = storage.absolute(workdir)
    out = storage.absolute(out) if out is not None else storage.join(workdir, REPORT_DIR)
    _quiet_matplotlib()
    r = _Report(workdir)
    for draw in (r.loss, r.rewards, r.throughput, r.optimizer, r.goodput, r.expert_load, r.timeline, r.memory):
        draw()
    for key, png in r.pngs.items():
        storage.write_bytes(storage.join(out, f"{key}.png"), png)
    storage.write_bytes(storage.join(out, "report.json"), (json.dumps(r.data) + "\n").encode("utf-8"))
    index = storage.join(out, "index.html")
    storage.write_bytes(index, r.html().encode("utf-8"))
    return index


if __name__ == "__main__":  # python -m mistral_jax.report: the command-line tool (cli/report.py)
    import runpy

    runpy.run_module("mistral_jax.cli.report", run_name="__main__", alter_sys=True)
