"""srpo_nb's GRPO step against a bare TRL `GRPOTrainer` step: same tiny model, data and numeric settings.

    python bench/bench_overhead.py                      # 3 rounds × (srpo, bare), 14 steps each, interleaved
    python bench/bench_overhead.py --rounds 5 --steps 20 --json out.json

Each run is its own process (a fresh interpreter, the same thread count), and the two kinds alternate within and
across rounds (srpo, bare, bare, srpo, …) so that a machine shared with other jobs slows both alike.

  srpo  `srpo_nb.grpo.train_grpo` with the demo's GRPO settings: SRPOGRPOTrainer, the paper reward's total plus its
        logged components, the online filter (filter_low = 0 so that no group leaves the batch: both kinds then train
        on the same number of responses), transition counts, metrics.jsonl, the console line, run-folder marker and
        checkpoints (every `--save-steps`).
  bare  TRL's `GRPOTrainer` as is, with the same `GRPOConfig` (built by `srpo_nb.grpo.trl_args`), the same rows,
        the same model loading and the paper reward's total as its one reward function. Its console dump is removed.

Per step: wall time between consecutive `on_step_end`s (the first `--warmup` steps dropped). The srpo run also
times what srpo_nb adds inside a step: the reward components beyond the total, the filter, the logging callbacks
and checkpoint saves. Prints a table and the BENCHMARKS.md row; `--json` writes every number.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path


def grpo_config(a, out_dir: Path, data: str, model: str):
    "The demo's GRPO settings (srpo_nb.demo.DemoConfig), shortened to `a.steps`."
    from srpo_nb.demo import DemoConfig
    from srpo_nb.grpo import GRPOTrainConfig
    d = DemoConfig()
    P, G = d.prompts_per_step, d.num_generations
    return GRPOTrainConfig.from_dict(
        preset="tiny", model=model, data=data, max_problems=None, max_pixels=None, system_prompt="sft", filter_on="final_correct",
        filter_low=0.0, num_generations=G, prompts_per_rollout=P, train_batch_size=P * G, per_device_batch_size=P * G,
        learning_rate=d.grpo_lr, max_completion_length=d.max_new_tokens, temperature=d.temperature, top_k=d.top_k,
        max_steps=a.steps, save_steps=a.save_steps, tensorboard=False, log_completions=False, verbose=True,
        output_dir=str(out_dir), seed=a.seed)


class Timers:
    "Seconds spent in wrapped functions, by name."
    def __init__(self): self.s = defaultdict(float); self.n = defaultdict(int)

    def wrap(self, owner, attr: str, name: str):
        fn = getattr(owner, attr)
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try: return fn(*args, **kwargs)
            finally: self.s[name] += time.perf_counter() - t; self.n[name] += 1
        setattr(owner, attr, timed)


def step_clock(times: list):
    from transformers import TrainerCallback
    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw): times.append(time.perf_counter())
        def on_step_end(self, args, state, control, **kw): times.append(time.perf_counter())
    return Clock()


def child(a) -> dict:
    "One run of one kind, in this process; returns its step times and timers."
    import torch
    import srpo_nb.grpo as G
    from srpo_nb.rewards import SRPORewardFunc
    torch.set_num_threads(1)
    work = Path(a.work); out = work / f"{a.child}-{os.getpid()}"
    cfg = grpo_config(a, out, str(work / "train.parquet"), a.model)
    timers, times = Timers(), []
    timers.wrap(G.SRPOGRPOTrainer if hasattr(G, "SRPOGRPOTrainer") else G.srpo_trainer_class(), "_save_checkpoint", "checkpoints")
    if a.child == "srpo":
        orig_call = SRPORewardFunc.__call__
        def call(self, completions, **kw):
            t = time.perf_counter()
            try: return orig_call(self, completions, **kw)
            finally: timers.s["reward: total" if self.component == "total" else "reward: logged components"] += time.perf_counter() - t
        SRPORewardFunc.__call__ = call
        timers.wrap(G, "online_filter", "filter")
        for make, name in ((G.metrics_callback, "logging: metrics.jsonl"), (G.progress_callback, "logging: console line")):
            def made(*args, _make=make, _name=name, **kw):
                cb = _make(*args, **kw); timers.wrap(cb, "on_log", _name); return cb
            setattr(G, make.__name__, made)
        t0 = time.perf_counter()
        res = G.train_grpo(cfg, callbacks=[step_clock(times)])
        total = time.perf_counter() - t0
        steps = res.global_step
    else:
        from transformers.trainer_callback import PrinterCallback
        from trl import GRPOTrainer
        from srpo_nb.core import seed_everything
        from srpo_nb.models import load_policy, resolve_model, use_torch_logprobs, vision_token_ids
        use_torch_logprobs()
        seed_everything(cfg.seed)
        out.mkdir(parents=True, exist_ok=True)
        timers.wrap(GRPOTrainer, "_save_checkpoint", "checkpoints")
        orig_call = SRPORewardFunc.__call__
        def call(self, completions, **kw):
            t = time.perf_counter()
            try: return orig_call(self, completions, **kw)
            finally: timers.s["reward: total"] += time.perf_counter() - t
        SRPORewardFunc.__call__ = call
        t0 = time.perf_counter()
        args = G.trl_args(cfg, reward_weights=[1.0])
        model, processor = load_policy(resolve_model(cfg.model), lora=None, freeze_vision=cfg.freeze_vision,
                                       dtype=cfg.dtype, device="auto", use_unsloth=False, seed=cfg.seed, wrap_lora=False,
                                       **({"max_pixels": cfg.max_pixels} if cfg.max_pixels else {}))
        funcs, _ = G.build_reward_funcs(cfg, processor.tokenizer)
        total_fn = next(f for f in funcs if f.component == "total")
        args.generation_kwargs = {**(args.generation_kwargs or {}), "suppress_tokens": vision_token_ids(processor)}
        data, _ = G.grpo_dataset(G.load_grpo_problems(cfg), cfg.prompt_text(), processor, cfg.max_prompt_length)
        trainer = GRPOTrainer(model=model, processing_class=processor, reward_funcs=[total_fn], args=args,
                              train_dataset=data, callbacks=[step_clock(times)])
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        total = time.perf_counter() - t0
        steps = trainer.state.global_step
    steps_s = [b - a_ for a_, b in zip(times, times[1:])]
    return {"kind": a.child, "steps": steps, "step_s": steps_s, "total_s": total,
            "timers_s": dict(timers.s), "timer_calls": dict(timers.n)}


def summarise(runs: list, warmup: int) -> dict:
    by = defaultdict(list)
    for r in runs: by[r["kind"]].append(r)
    out = {}
    for kind, rs in by.items():
        steps = [s for r in rs for s in r["step_s"][warmup:]]
        per_run = [statistics.median(r["step_s"][warmup:]) for r in rs]
        timers = defaultdict(float)
        for r in rs:
            for k, v in r["timers_s"].items(): timers[k] += v / r["steps"] / len(rs)
        out[kind] = {"runs": len(rs), "median_s_per_step": statistics.median(steps), "mean_s_per_step": statistics.fmean(steps),
                     "run_medians": per_run, "per_step_timers_s": dict(timers)}
    if {"srpo", "bare"} <= set(out):
        out["ratio_median"] = out["srpo"]["median_s_per_step"] / out["bare"]["median_s_per_step"]
        out["ratio_mean"] = out["srpo"]["mean_s_per_step"] / out["bare"]["mean_s_per_step"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds of (srpo, bare); the order alternates")
    p.add_argument("--steps", type=int, default=14, help="GRPO steps per run")
    p.add_argument("--warmup", type=int, default=2, help="first steps of each run left out")
    p.add_argument("--save-steps", type=int, default=7, help="checkpoint every N steps (both kinds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="starting policy (default: the tiny model for --seed)")
    p.add_argument("--json", default=None, help="write every number here")
    p.add_argument("--child", choices=["srpo", "bare"], help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print("BENCH " + json.dumps(child(a)), flush=True); return 0
    from srpo_nb.data import save_problems
    from srpo_nb.demo import DemoConfig, demo_problems
    from srpo_nb.models import tiny_model_path
    a.model = a.model or str(tiny_model_path(a.seed))
    work = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    d = DemoConfig()
    save_problems(demo_problems(d.n_train, a.seed, "train", d.family_list(), d.options), work / "train.parquet")
    runs, env = [], dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    order = [k for r in range(a.rounds) for k in (("srpo", "bare") if r % 2 == 0 else ("bare", "srpo"))]
    load = os.getloadavg()[0]
    for i, kind in enumerate(order):
        cmd = [sys.executable, __file__, "--child", kind, "--work", str(work), "--steps", str(a.steps),
               "--save-steps", str(a.save_steps), "--seed", str(a.seed), "--model", a.model]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((l for l in res.stdout.splitlines() if l.startswith("BENCH ")), None)
        if res.returncode or line is None: sys.exit(f"{kind} run failed:\n{res.stderr[-3000:]}")
        r = json.loads(line[6:]); runs.append(r)
        med = statistics.median(r["step_s"][a.warmup:])
        print(f"run {i + 1}/{len(order)} {kind:<4}: {r['steps']} steps, median {med:.3f} s/step", flush=True)
    s = summarise(runs, a.warmup)
    s.update(load_before=round(load, 2), load_after=round(os.getloadavg()[0], 2), cpus=os.cpu_count(), steps=a.steps,
             warmup=a.warmup, rounds=a.rounds, settings="demo GRPO: G=8, 2 prompts/step, 96 tokens, top-50, lr 3e-4, "
             f"filter_low=0, checkpoint every {a.save_steps} steps, 1 thread")
    print(f"\nsrpo_nb {s['srpo']['median_s_per_step']:.3f} s/step, bare TRL {s['bare']['median_s_per_step']:.3f} s/step: "
          f"ratio {s['ratio_median']:.3f} (median), {s['ratio_mean']:.3f} (mean)")
    print("per step, srpo run: " + ", ".join(f"{k} {1000 * v:.1f} ms" for k, v in sorted(s["srpo"]["per_step_timers_s"].items())))
    print("per step, bare run: " + ", ".join(f"{k} {1000 * v:.1f} ms" for k, v in sorted(s["bare"]["per_step_timers_s"].items())))
    if a.json: Path(a.json).write_text(json.dumps({"summary": s, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
