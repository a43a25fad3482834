"""Weights & Biases beside ``metrics.jsonl`` and TensorBoard (``config.wandb``; the ``wandb`` extra).

``--config.wandb.project=NAME`` makes process 0 open a W&B run (``wandb.init``) with the run config, log every
metrics record (train and eval scalars, goodput, memory; the x axis is the training step, logged as ``step``),
and at the end of the run log the run report's figures (``mistral_jax.report``: loss, throughput, goodput,
expert load, timeline, memory) as images. The W&B run id comes from the workdir, so a resumed or requeued run
continues the same W&B run. ``WANDB_MODE=offline`` keeps it on disk (``{workdir}/wandb/``, ``wandb sync`` uploads
it later); a bucket workdir keeps W&B's files in the machine's staging copy of the workdir.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

log = logging.getLogger(__name__)


class WandbError(ValueError):
    """``config.wandb`` that cannot work (one line: the value and the fix)."""


def run_id(workdir: str) -> str:
    """The W&B run id of a workdir: the same for every run (resume, requeue) of it."""
    return "mj-" + hashlib.sha256(workdir.encode()).hexdigest()[:16]


def check(cfg: Any) -> None:
    """``WandbError`` when ``config.wandb.project`` is set but the ``wandb`` package is missing (before any device)."""
    w = cfg.get("wandb")
    if w is None or not w.get("project", ""):
        return
    try:
        import wandb  # noqa: F401
    except ImportError as e:
        raise WandbError(f"config.wandb.project={w.project!r} needs the wandb package ({e}). Fix: pip install "
                         "'mistral_jax[wandb]', or leave config.wandb.project empty.") from None
    mode = os.environ.get("WANDB_MODE", "")
    if mode not in ("offline", "disabled", "dryrun") and not _api_key():
        raise WandbError(f"config.wandb.project={w.project!r}: no W&B API key (WANDB_API_KEY unset, no api.wandb.ai "
                         "entry in ~/.netrc). Fix: `wandb login` or WANDB_API_KEY=..., or WANDB_MODE=offline to keep "
                         "the run on disk for a later `wandb sync`.")


def _api_key() -> str | None:
    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"]
    import netrc

    try:
        auth = netrc.netrc(os.environ.get("NETRC") or None).authenticators(
            os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/"))
    except (OSError, netrc.NetrcParseError):
        return None
    return auth[2] if auth else None


class WandbWriter:
    """One W&B run per workdir, written by process 0 (inactive elsewhere and when ``config.wandb.project`` is
    empty)."""

    def __init__(self, cfg: Any, workdir: str, local_dir: str, process_index: int):
        w = cfg.get("wandb")
        self.run = None
        if w is None or not w.get("project", "") or process_index != 0:
            return
        check(cfg)
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")  # the normal path is quiet
        try:
            config = cfg.to_dict()
        except Exception:  # noqa: BLE001 - a field W&B cannot take: the JSON form
            import json

            config = json.loads(cfg.to_json_best_effort())
        self.figures = bool(w.get("figures", True))
        self.run = self._init(wandb,
            project=w.project, entity=w.get("entity", "") or None,
            name=w.get("name", "") or os.path.basename(os.path.normpath(workdir)), id=run_id(workdir),
            resume="allow", config=config, dir=local_dir,
            settings=wandb.Settings(quiet=True, console="off", disable_git=True, save_code=False))
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")  # steps may repeat after a resume: no monotonic _step

    @staticmethod
    def _init(wandb: Any, **kwargs: Any) -> Any:
        try:
            return wandb.init(**kwargs)
        except Exception as e:  # noqa: BLE001 - W&B unreachable, bad entity / project: one line
            said = " ".join(str(e).split())[:300]
            raise WandbError(f"config.wandb.project={kwargs['project']!r}: W&B could not start the run "
                             f"({type(e).__name__}: {said}). Fix: check the project / entity and the network, or "
                             "WANDB_MODE=offline.") from None

    def __bool__(self) -> bool:
        return self.run is not None

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if self.run is not None:
            self.run.log({**scalars, "step": int(step)})

    def finish(self, workdir: str) -> None:
        """The report's figures as images (``report/<figure>``), then the run's end."""
        if self.run is None:
            return
        try:
            if self.figures:
                self._log_figures(workdir)
        finally:
            self.run.finish()
            self.run = None

    def _log_figures(self, workdir: str) -> None:
        import tempfile

        import wandb

        from mistral_jax import report

        with tempfile.TemporaryDirectory() as out:
            try:
                report.build_report(workdir, out)
            except Exception as e:  # noqa: BLE001 - the figures are extra: the metrics are logged already
                log.warning("W&B: the run report's figures could not be drawn (%s: %s); metrics are logged.",
                            type(e).__name__, str(e)[:200])
                return
            images = {f"report/{name[:-4]}": wandb.Image(os.path.join(out, name))
                      for name in sorted(os.listdir(out)) if name.endswith(".png")}
            if images:
                self.run.log(images)
