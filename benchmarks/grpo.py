"""GRPO on the bundled arithmetic task: does it learn, and in how much wall time against TRL's GRPOTrainer.

    python benchmarks/grpo.py [--workdir runs/bench_grpo] [--seeds 0,1,2] [--trl_seeds 0] [--steps 300] [--sft DIR]

1. The starting model: without ``--sft``, the commands of ``configs/tiny_grpo.py``'s docstring as subprocesses
   (``configs/tiny.py`` into ``W/demo``, then the 600-step arithmetic SFT into ``W/arith_sft``), each reused when its
   last checkpoint exists. It is exported to HF (``python -m mistral_jax.convert --from jax --to hf``) as
   ``W/<sft>-hf``.
2. Before: the held-out exact-answer reward of the starting model, ``training.rl.greedy_rewards`` (greedy answers to
   the 200 held-out problems, at most ``grpo.max_completion_length`` = 24 new tokens, scored by
   ``training.rewards``): the measure a GRPO run logs as ``eval/rewards/exact_answer/mean``. The HF export is scored
   too (``before_hf_export``): it must give the same number, since TRL starts from it. For scale,
   ``mode_answer_baseline`` is the reward of a policy that ignores the operands: every held-out problem answered
   with its operation's most frequent train answer (0 for a subtraction, 10 for an addition).
3. Ours, per seed: ``python train.py --config configs/tiny_grpo.py --workdir W/ours_s{seed}
   --config.init_from=<sft> --config.seed={seed} --config.num_steps={steps}`` in a fresh workdir. Wall time: the
   whole command, start to exit (imports, compiles, the held-out evals every 50 steps and the checkpoints every 100
   steps included). After: the run's last ``eval/rewards/exact_answer/mean``; its final checkpoint is also rescored
   here through ``mj.load_pretrained`` (``after_rescored``), the path TRL's result takes.
4. TRL, per ``--trl_seeds`` seed, in a process of its own (this script with ``--trl_side``): ``trl.GRPOTrainer`` on
   the HF export (float32, ``use_cpu``), the hyperparameters of ``configs/tiny_grpo.py``: G = 8, 128 completions per
   optimizer step (16 prompts x 8, ``per_device_train_batch_size`` 128, ``steps_per_generation`` 1,
   ``num_iterations`` 1, no accumulation), ``max_steps`` = steps, lr 3e-4 with 2 warmup steps then constant, AdamW
   (0.9, 0.95, 1e-8, no decay), gradient clipping 1.0, temperature 1, top-p 1, 24 new tokens, beta 0, loss
   ``grpo``, ``scale_rewards`` ``group``; the same two reward functions (``training.rewards.exact_answer`` /
   ``format_reward`` in TRL's signature); the bundled train split as conversational prompts (a user turn) with the
   ``answer`` column, shuffled with the seed. TRL's default gradient checkpointing is off (ours does not remat the
   tiny model) and so is bf16; the HF model runs eager attention (``--trl_attn``; with sdpa, HF ``generate`` of this
   window-16 model with left padding took 2-5 s a call here instead of 0.1 s). No saving or evaluation during
   training, ``report_to`` none. The prompt ids TRL renders (``GRPOTrainer._tokenize_prompts``, its chat template)
   are compared with ours (``rl.render_prompt``) for every train prompt (``prompt_ids_mismatch``, 0 expected).
   Timed: ``trainer.train()`` (``train_s``) and the whole side from its launch to the end of ``train()``
   (``whole_s``: interpreter start, imports, model load, trainer set-up; not the final save). Inside ``train()``:
   the seconds in ``transformers.generate`` (``_generate_single_turn``) and in the reward functions. The trained
   model is saved (``trainer.save_model``) and scored by this process with the
   same ``greedy_rewards`` after ``mj.load_pretrained``: both sides are scored by the same code.

One JSON line per figure: ``heldout_exact_answer_before`` (and ``before_hf_export``, ``mode_answer_baseline``),
``prompt_ids_mismatch`` per TRL seed, ``heldout_exact_answer`` per side and seed (before, after), ``wall_s`` per side
and seed (with ``step_s``: the median and range of the seconds per step of each logged 10-step window, and
``load_avg``: the 1-minute load average at the command's start and end; on a shared machine a busy neighbour
slows either side several-fold), then the summaries: ``heldout_exact_answer_after`` per side (median and range over
seeds), ``wall_s_summary`` per side, ``wall_ratio`` (our median wall over TRL's median wall in the same run, with
the median and range of the ratios of every (ours, TRL) pair), with the goal: the same reward (our median after >=
TRL's median after minus one binomial standard error of the 200-problem measure) in <= 0.5x TRL's wall time; and
``step_ratio``, the same ratio of the median window step times (less sensitive to a neighbour's bursts). Logs of
every command are in ``W/logs``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GOAL_WALL_RATIO = 0.5
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _line(**kw) -> None:
    print(json.dumps(kw), flush=True)


def _summary(values: list[float], nd: int = 4) -> dict:
    return {"median": round(statistics.median(values), nd), "range": [round(min(values), nd), round(max(values), nd)],
            "n": len(values)}


def _grpo_config():
    from configs import tiny_grpo

    return tiny_grpo.get_config()


def _env() -> dict[str, str]:
    env = dict(os.environ, **ENV)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


LOAD: dict[str, list[float]] = {}  # log -> the 1-minute load average at the command's start and end


def _run(cmd: list[str], log: str) -> float:
    """Run ``cmd`` from the repository root (output to ``log``); its wall seconds, start to exit."""
    LOAD[log] = [round(os.getloadavg()[0], 2)]
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "w") as f:
        t = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT, check=False).returncode
        dt = time.perf_counter() - t
    LOAD[log].append(round(os.getloadavg()[0], 2))
    if rc:
        with open(log) as f:
            tail = f.read()[-3000:]
        sys.exit(f"{' '.join(cmd)} exited {rc} (log {log}):\n{tail}")
    return dt


def _complete(workdir: str, steps: int) -> bool:
    return os.path.isdir(os.path.join(workdir, "checkpoints", str(steps)))


def _train(args: list[str]) -> list[str]:
    return [sys.executable, "train.py", *args, "--config.progress_bar=False"]


def build_sft(w: str, logs: str) -> str:
    """``W/demo`` then ``W/arith_sft`` (configs/tiny_grpo.py's docstring), each reused when complete."""
    demo, sft = os.path.join(w, "demo"), os.path.join(w, "arith_sft")
    from configs import tiny

    if not _complete(demo, tiny.get_config().num_steps):
        _run(_train(["--config", "configs/tiny.py", "--workdir", demo]), os.path.join(logs, "demo.log"))
    if not _complete(sft, 600):
        _run(_train(["--config", "configs/tiny_sft.py", "--workdir", sft, f"--config.init_from={demo}",
                     "--config.data.train=bundled:arithmetic", "--config.data.validation=bundled:arithmetic",
                     "--config.num_steps=600"]), os.path.join(logs, "arith_sft.log"))
    return sft


def export_hf(sft: str, w: str, logs: str) -> str:
    out = os.path.join(w, os.path.basename(os.path.normpath(sft)) + "-hf")
    if not os.path.exists(os.path.join(out, "model.safetensors")):
        _run([sys.executable, "-m", "mistral_jax.convert", "--from", "jax", "--to", "hf", "--input", sft, "--output",
              out], os.path.join(logs, "export.log"))
    return out


class Scorer:
    """``training.rl.greedy_rewards`` of any checkpoint on the held-out prompts, as a GRPO run's eval computes it."""

    def __init__(self, tokenizer_dir: str):
        import mistral_jax as mj
        from mistral_jax.training import rewards as rewards_lib
        from mistral_jax.training import rl

        self.cfg = _grpo_config()
        self.tok = mj.Tokenizer.find(tokenizer_dir)
        self.pset = rl.prompt_set(self.cfg, self.tok, "validation")
        self.rewards = rewards_lib.resolve(self.cfg.grpo.rewards)
        self.weights = rl.reward_weights(self.cfg.grpo, len(self.rewards))

    def __call__(self, path: str) -> dict[str, float]:
        import mistral_jax as mj
        from mistral_jax.training import rl

        model = mj.load_pretrained(path)
        return rl.greedy_rewards(model, self.tok, self.pset, self.rewards, self.weights,
                                 n=int(self.cfg.grpo.eval_prompts),
                                 max_new_tokens=int(self.cfg.grpo.max_completion_length))


def mode_answer_baseline(score: Scorer) -> float:
    """The held-out exact-answer reward of answering each problem with its operation's most frequent train answer."""
    import collections

    from mistral_jax.data import arithmetic

    def op(r) -> str:
        return "+" if " + " in r["answer"] else "-"

    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in arithmetic.bundled_records("train"):
        counts[op(r)][arithmetic.example_answer(r)] += 1
    modes = {k: c.most_common(1)[0][0] for k, c in counts.items()}
    held = score.pset.records[:int(score.cfg.grpo.eval_prompts)]
    return sum(arithmetic.example_answer(r) == modes.get(op(r)) for r in held) / len(held)


def _last_eval(workdir: str) -> tuple[dict, dict, list[float]]:
    """The last ``eval/*`` figures, the last goodput figures and the ``step_time`` of every logged window (seconds
    per step, averaged over ``log_every`` steps) of a run's metrics.jsonl."""
    ev, gp, steps = {}, {}, []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "eval/rewards/exact_answer/mean" in r:
                ev = r
            if "goodput/wall_s" in r:
                gp = r
            if "step_time" in r:
                steps.append(float(r["step_time"]))
    return ev, gp, steps


# ------------------------------------------------------------------------------------------------ the TRL side
def trl_side(spec_path: str) -> None:
    """One TRL GRPOTrainer run (a process of its own); writes its result JSON next to ``spec_path``."""
    t_import = time.time()
    with open(spec_path) as f:
        spec = json.load(f)
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    import datasets
    import torch
    import transformers
    from trl import GRPOConfig, GRPOTrainer

    from mistral_jax.data import arithmetic
    from mistral_jax.training import rewards as rewards_lib

    for name in ("trl", "transformers", "datasets", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    t_imported = time.time()
    c, seed, out = spec["config"], spec["seed"], spec["out"]

    def exact_answer(prompts, completions, answer, question, **kw) -> list[float]:
        return [rewards_lib.exact_answer(q, x[0]["content"], {"question": q, "answer": a})
                for x, a, q in zip(completions, answer, question, strict=True)]

    def format_reward(prompts, completions, answer, question, **kw) -> list[float]:
        return [rewards_lib.format_reward(q, x[0]["content"], {"question": q, "answer": a})
                for x, a, q in zip(completions, answer, question, strict=True)]

    timers = {"generate_s": 0.0, "rewards_s": 0.0}

    def timed(fn, key):
        def wrapped(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                timers[key] += time.perf_counter() - t
        wrapped.__name__ = fn.__name__
        return wrapped

    class TimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer, its generation timed (nothing else changes)."""

        def _generate_single_turn(self, *a, **kw):
            t = time.perf_counter()
            try:
                return super()._generate_single_turn(*a, **kw)
            finally:
                timers["generate_s"] += time.perf_counter() - t

    records = arithmetic.bundled_records("train")
    train = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}],
                                         "question": r["question"], "answer": r["answer"]} for r in records])
    model = transformers.AutoModelForCausalLM.from_pretrained(spec["hf"], dtype=torch.float32,
                                                              attn_implementation=spec["attn"])
    tok = transformers.AutoTokenizer.from_pretrained(spec["hf"])
    args = GRPOConfig(
        output_dir=out, report_to="none", use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        seed=seed, data_seed=seed, shuffle_dataset=True, max_steps=spec["steps"],
        per_device_train_batch_size=c["batch_size"], gradient_accumulation_steps=1, steps_per_generation=1,
        num_iterations=1, num_generations=c["num_generations"], max_completion_length=c["max_completion_length"],
        temperature=c["temperature"], top_p=c["top_p"], beta=c["beta"], loss_type=c["loss_type"],
        scale_rewards=c["scale_rewards"], epsilon=c["epsilon_low"], epsilon_high=c["epsilon_high"],
        learning_rate=c["learning_rate"], lr_scheduler_type="constant_with_warmup", warmup_steps=c["warmup_steps"],
        adam_beta1=c["b1"], adam_beta2=c["b2"], adam_epsilon=c["eps"], weight_decay=c["weight_decay"],
        max_grad_norm=c["grad_clip_norm"], logging_steps=c["log_every"], save_strategy="no", eval_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0)
    trainer = TimedGRPOTrainer(model=model, reward_funcs=[timed(exact_answer, "rewards_s"),
                                                          timed(format_reward, "rewards_s")],
                               args=args, train_dataset=train, processing_class=tok)
    t_ready = time.time()
    t = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t
    t_end = time.time()
    # TRL's prompt ids (its own chat-template call) against ours, every train prompt
    theirs, _, _ = trainer._tokenize_prompts([[{"role": "user", "content": r["question"]}] for r in records])
    ours = spec["our_prompt_ids"]
    mismatch = sum(list(a) != list(b) for a, b in zip(theirs, ours, strict=True))
    trainer.save_model(os.path.join(out, "final"))
    history = trainer.state.log_history
    with open(os.path.join(out, "log_history.json"), "w") as f:
        json.dump(history, f)
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump({"train_s": train_s, "t_end": t_end, "t_import": t_import, "imports_s": t_imported - t_import,
                   "setup_s": t_ready - t_imported, "prompt_ids_mismatch": mismatch, "prompts_checked": len(ours),
                   "torch_threads": torch.get_num_threads(), **timers,
                   "train_rewards_last": {k: v for k, v in history[-2].items() if k.startswith("reward")}
                   if len(history) > 1 else {}}, f)


def _trl_spec(cfg, sft_hf: str, seed: int, steps: int, out: str, prompt_ids: list[list[int]], attn: str) -> dict:
    g, o = cfg.grpo, cfg.optimizer
    assert o.schedule == "constant" and not cfg.lora.rank, "the TRL side mirrors configs/tiny_grpo.py as shipped"
    return {"hf": sft_hf, "attn": attn, "seed": seed, "steps": steps, "out": out, "our_prompt_ids": prompt_ids,
            "config": {
        "batch_size": int(cfg.batch_size), "num_generations": int(g.num_generations),
        "max_completion_length": int(g.max_completion_length), "temperature": float(g.temperature),
        "top_p": float(g.top_p), "beta": float(g.beta), "loss_type": str(g.loss_type),
        "scale_rewards": str(g.scale_rewards), "epsilon_low": float(g.epsilon_low),
        "epsilon_high": float(g.epsilon_high), "learning_rate": float(o.learning_rate),
        "warmup_steps": int(o.warmup_steps), "b1": float(o.b1), "b2": float(o.b2), "eps": float(o.eps),
        "weight_decay": float(o.weight_decay), "grad_clip_norm": float(o.grad_clip_norm),
        "log_every": int(cfg.log_every)}}


# ------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="runs/bench_grpo", help="where the runs, exports and logs go")
    p.add_argument("--seeds", default="0,1,2", help="our GRPO seeds, comma-separated")
    p.add_argument("--trl_seeds", default="0", help="TRL GRPOTrainer seeds, comma-separated ('' = none)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: configs/tiny_grpo.py's)")
    p.add_argument("--sft", default="", help="the starting model (a workdir); default: built into W/arith_sft")
    p.add_argument("--trl_attn", default="eager", choices=("eager", "sdpa"),
                   help="the HF model's attention (eager: sdpa's masks make HF generate 25-50x slower here)")
    p.add_argument("--trl_side", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.trl_side:
        return trl_side(args.trl_side)
    cfg = _grpo_config()
    steps = args.steps or int(cfg.num_steps)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    trl_seeds = [int(s) for s in args.trl_seeds.split(",") if s.strip()]
    w = os.path.abspath(args.workdir)
    logs = os.path.join(w, "logs")
    os.makedirs(logs, exist_ok=True)

    sft = os.path.abspath(args.sft) if args.sft else build_sft(w, logs)
    sft_hf = export_hf(sft, w, logs)
    score = Scorer(sft)
    before = score(sft)
    b = before["rewards/exact_answer/mean"]
    _line(figure="heldout_exact_answer_before", model=sft, value=b,
          format_reward=before["rewards/format_reward/mean"], prompts=int(before["prompts"]))
    _line(figure="mode_answer_baseline", value=mode_answer_baseline(score))
    before_hf = score(sft_hf)
    _line(figure="before_hf_export", model=sft_hf, value=before_hf["rewards/exact_answer/mean"],
          equal=before_hf["rewards/exact_answer/mean"] == b)

    ours_after, ours_wall, ours_step, trl_after, trl_wall, trl_step = [], [], [], [], [], []
    for seed in seeds:
        wd = os.path.join(w, f"ours_s{seed}")
        shutil.rmtree(wd, ignore_errors=True)
        log = os.path.join(logs, f"ours_s{seed}.log")
        wall = _run(_train(["--config", "configs/tiny_grpo.py", "--workdir", wd, f"--config.init_from={sft}",
                            f"--config.seed={seed}", f"--config.num_steps={steps}"]), log)
        ev, gp, windows = _last_eval(wd)
        after = ev["eval/rewards/exact_answer/mean"]
        rescored = score(wd)["rewards/exact_answer/mean"]
        ours_after.append(after)
        ours_wall.append(wall)
        ours_step.append(statistics.median(windows))
        _line(figure="heldout_exact_answer", side="ours", seed=seed, before=b, after=after, after_rescored=rescored,
              format_after=ev["eval/rewards/format_reward/mean"], step=ev["step"])
        _line(figure="wall_s", side="ours", seed=seed, whole_s=round(wall, 2), steps=steps, load_avg=LOAD[log],
              step_s=_summary(windows),
              goodput={k.split("/")[1]: round(v, 2) for k, v in gp.items() if k.startswith("goodput/")})

    for seed in trl_seeds:
        out = os.path.join(w, f"trl_s{seed}")
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        spec = os.path.join(out, "spec.json")
        with open(spec, "w") as f:
            json.dump(_trl_spec(cfg, sft_hf, seed, steps, out, score_prompts_train(score), args.trl_attn), f)
        t_launch = time.time()
        log = os.path.join(logs, f"trl_s{seed}.log")
        _run([sys.executable, os.path.abspath(__file__), "--trl_side", spec], log)
        with open(os.path.join(out, "result.json")) as f:
            r = json.load(f)
        with open(os.path.join(out, "log_history.json")) as f:
            r["log_history"] = json.load(f)
        whole = r["t_end"] - t_launch
        after = score(os.path.join(out, "final"))
        trl_after.append(after["rewards/exact_answer/mean"])
        trl_wall.append(whole)
        windows = [float(h["step_time"]) for h in r["log_history"] if "step_time" in h and "loss" in h]
        windows = windows or [r["train_s"] / steps]  # fewer steps than one logging window
        trl_step.append(statistics.median(windows))
        _line(figure="prompt_ids_mismatch", side="trl", seed=seed, mismatched=r["prompt_ids_mismatch"],
              checked=r["prompts_checked"])
        _line(figure="heldout_exact_answer", side="trl", seed=seed, before=b, after=after["rewards/exact_answer/mean"],
              format_after=after["rewards/format_reward/mean"], step=steps)
        _line(figure="wall_s", side="trl", seed=seed, whole_s=round(whole, 2), train_s=round(r["train_s"], 2),
              steps=steps, load_avg=LOAD[log], step_s=_summary(windows), imports_s=round(r["imports_s"], 2),
              setup_s=round(r["setup_s"], 2), generate_s=round(r["generate_s"], 2), rewards_s=round(r["rewards_s"], 2),
              torch_threads=r["torch_threads"], attn=args.trl_attn)

    for side, after_, wall_ in (("ours", ours_after, ours_wall), ("trl", trl_after, trl_wall)):
        if after_:
            _line(figure="heldout_exact_answer_after", side=side, before=b, **_summary(after_))
            _line(figure="wall_s_summary", side=side, **_summary(wall_, 2))
    if trl_after and ours_after:
        ratio = statistics.median(ours_wall) / statistics.median(trl_wall)
        pairs = [o / t for o in ours_wall for t in trl_wall]
        ref = statistics.median(trl_after)
        se = math.sqrt(max(ref * (1 - ref), 1e-12) / int(before["prompts"]))
        same = statistics.median(ours_after) >= ref - se
        _line(figure="wall_ratio", ours_over_trl=round(ratio, 4), median=round(statistics.median(pairs), 4),
              range=[round(min(pairs), 4), round(max(pairs), 4)], goal=f"<= {GOAL_WALL_RATIO}",
              reward_ours=statistics.median(ours_after), reward_trl=ref, reward_tolerance=round(se, 4),
              same_reward=same, met=bool(same and ratio <= GOAL_WALL_RATIO))
        pairs = [o / t for o in ours_step for t in trl_step]
        _line(figure="step_ratio", ours_over_trl=round(statistics.median(ours_step) / statistics.median(trl_step), 4),
              median=round(statistics.median(pairs), 4), range=[round(min(pairs), 4), round(max(pairs), 4)],
              ours_step_s=_summary(ours_step), trl_step_s=_summary(trl_step))


def score_prompts_train(score: Scorer) -> list[list[int]]:
    """Our rendered prompt ids of every train prompt (what TRL's are checked against)."""
    from mistral_jax.training import rl

    return [list(x) for x in rl.prompt_set(score.cfg, score.tok, "train").prompts]


if __name__ == "__main__":
    main()
