"""The prepared GPU check for srpo_nb: three short GRPO runs on one GPU, timed phase by phase, nothing from the hub.

    python bench/gpu_check.py --preflight                      # GPU, package versions, free memory and disk, offline
    python bench/gpu_check.py --out gpu_check.json             # the check itself (one GPU; 5-10 minutes, estimated)
    python bench/gpu_check.py --size tiny --device cpu --out /tmp/smoke.json   # CPU smoke run of this script (~1 min)
    python bench/gpu_check.py --runs srpo_full                 # one run only (srpo_lora, bare_lora, srpo_full)

It needs the GPU stack (`pip install -c constraints-gpu.txt -e ".[gpu]"`; on a machine without network, carry wheels
of the pinned trl, peft, datasets and transformers) and nothing else: no checkpoint, no dataset download.

The runs (all GRPO with SRPO's paper reward on srpo_nb's generated chart problems, the same batch in each):
  srpo_lora  a random-init model of Qwen2.5-VL-7B-Instruct's shapes, LoRA r=16 (TRL builds the adapters from
             peft_config), bf16 weights, through srpo_nb's `train_grpo` (online filter, transition counts, callbacks);
  bare_lora  the same model (rebuilt with the same seed), data, batch, reward and TRL arguments under TRL's own
             `GRPOTrainer`: no srpo_nb subclass, filter or callbacks. srpo_lora / bare_lora = srpo_nb's overhead;
  srpo_full  a random-init model of Qwen2.5-VL-3B-Instruct's shapes, full fine-tuning (vision tower frozen) with fp32
             master weights and bf16 autocast, as `srpo_nb.models.precision_plan` decides, through `train_grpo`.
`--size tiny` swaps only the sizes (the tiny Qwen2.5-VL shapes, a small BPE vocabulary, short completions); every
other line of code is the one the real check runs.

Nothing is downloaded: each model is built from its published configuration (srpo_nb.sft.QWEN25VL_7B_CONFIG,
srpo_nb.launch.MODEL_SHAPES) with random weights; the tokenizer is Qwen's real BPE when the `dashscope` package (which
ships qwen.tiktoken) is installed, else srpo_nb's small BPE (the embedding keeps the real vocabulary's rows either way,
so memory and FLOPs are the real model's); the processor is the real Qwen2.5-VL one with the paper's pixel budget
(images at most 512x512). HF_HUB_OFFLINE=1 is set before any Hugging Face import. Gradient checkpointing is on.

A random model earns no reward and rarely stops, so completions run to --max-completion-length. The paper's online
filter (keep a group when 0.1 <= mean accuracy <= 0.9) would drop every all-wrong group, and dropping zeroes the
group's completion mask, which changes the work of the forward pass; the check therefore sets filter_low=0.0: the
filter still runs and counts, and srpo_nb and bare TRL train on identical tensors. Every reward is 0, so the
advantages are 0 and the weights barely move, but every phase does the work of a real step (the loss and all its
gradients are computed).

What is measured (per optimizer step; the first step is warm-up and left out of the summary):
  generation        TRL's `_generate`: tokenising the prompts, sampling the completions (HF generate), decoding;
  scoring           the rest of `_prepare_inputs`/`_generate_and_score_completions`: rewards, the online filter,
                    advantages, any extra log-prob pass;
  forward_backward  `training_step` without the time of `_prepare_inputs`: the policy's forward and backward passes;
  optimizer         gradient clipping + `optimizer.step()`;
  other             the step's wall time minus the four above: data loading, scheduler, zero_grad, logging, callbacks.
Every region starts and ends with torch.cuda.synchronize(), so GPU work is charged to the phase that queued it; a
region's time excludes the regions nested in it. A step's wall time runs from the end of the previous step
(on_step_end; the first from on_train_begin) to its own on_step_end, so the phases always sum to at most the wall.

  tokens/s = (prompt + completion tokens of the responses) / wall time
  MFU      = (2·N·T  +  6·N·T) / (wall time × peak)
             T: prompt + completion tokens per step (each is generated, then trained on once: num_iterations = 1);
             2·N·T for generation (forward only), 6·N·T for training (forward + backward);
             N: the language model's matrix-multiply parameters (its linear layers, lm_head included; the vision tower,
             embedding lookup and attention's score/value products are not counted); peak: the GPU's dense bf16 TFLOP/s
             (H100 SXM / H200: 989). This is model FLOPs utilisation: the recomputation of gradient checkpointing, the
             padding, and for LoRA the weight gradients the frozen base never computes (about 4·N·T of work instead of
             6·N·T) are not credited.
  mfu_generation = 2·N·T / (generation time × peak); mfu_forward_backward = 6·N·T / (forward_backward time × peak).
  memory: torch.cuda.max_memory_allocated / max_memory_reserved over the run (model build included), reset per run.

Output: a JSON file (--out) with every figure per step and per run, and a BENCHMARKS.md table (printed).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import importlib.metadata as md
import importlib.util
import json
import os
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["HF_HUB_OFFLINE"] = "1"          # before any Hugging Face import: nothing may be fetched
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GiB = 2 ** 30
PHASES = ("generation", "scoring", "forward_backward", "optimizer", "other")
# dense bf16 (fp16 on T4/V100) tensor-core TFLOP/s per GPU, most specific name first; others need --peak-tflops
PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L4", 121.0),
               ("T4", 65.0), ("V100", 125.0))
HF_STACK = ("transformers", "trl", "peft", "datasets", "accelerate")  # must match the constraints file exactly
TORCH_STACK = ("torch", "torchvision")                                # a mismatch is reported, not fatal
OPTIONAL = ("vllm", "unsloth", "deepspeed", "bitsandbytes", "math-verify")  # in the [gpu] extra, not used by this check

SIZES = {  # per size: the defaults of the run settings (all can be overridden on the command line)
    "real": dict(steps=4, prompts_per_step=2, num_generations=8, per_device_batch_size=8, max_completion_length=512,
                 min_pixels=56 * 56, max_pixels=512 * 512, lora_r=16),
    "tiny": dict(steps=2, prompts_per_step=2, num_generations=4, per_device_batch_size=4, max_completion_length=16,
                 min_pixels=56 * 56, max_pixels=56 * 56 * 4, lora_r=8),
}
RUNS = ("srpo_lora", "bare_lora", "srpo_full")


# ---------------------------------------------------------------------------------------------------------- models
def model_shapes(size: str, which: str, vocab_len: int) -> tuple[str, dict]:
    "(label, Qwen2_5_VLConfig kwargs) of the policy for `which` ('lora': the 7B, 'full': the 3B) at `size`."
    if size == "tiny":
        from srpo_nb.models import TINY_TEXT_CONFIG, TINY_VISION_CONFIG
        return "tiny Qwen2.5-VL", dict(text_config=dict(TINY_TEXT_CONFIG, vocab_size=vocab_len, tie_word_embeddings=True),
                                       vision_config=dict(TINY_VISION_CONFIG), tie_word_embeddings=True)
    from srpo_nb.launch import MODEL_SHAPES
    name = "Qwen/Qwen2.5-VL-7B-Instruct" if which == "lora" else "Qwen/Qwen2.5-VL-3B-Instruct"
    return name.split("/")[1].replace("-Instruct", "") + " shapes", copy.deepcopy(MODEL_SHAPES[name])


def build_tokenizer(vocab: str):
    "Qwen2.5-VL's tokenizer (real BPE from dashscope's qwen.tiktoken, or srpo_nb's small BPE), built locally."
    from srpo_nb.models import build_qwen_tokenizer
    return build_qwen_tokenizer(vocab)


def build_policy(shapes: dict, tokenizer, dtype, device: str, seed: int = 0):
    "A random-init Qwen2.5-VL with `shapes`, special token ids from `tokenizer`, weights in `dtype` on `device`."
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from srpo_nb.models import QWEN_ADDED_TOKENS
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t, _ in QWEN_ADDED_TOKENS}
    special = dict(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    shapes = copy.deepcopy(shapes)
    shapes["text_config"].update(special)
    if shapes["text_config"]["vocab_size"] < len(tokenizer):
        raise ValueError(f"vocab_size {shapes['text_config']['vocab_size']} < the tokenizer's {len(tokenizer)} tokens")
    cfg = Qwen2_5_VLConfig(**shapes, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                           vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                           **special)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=dtype)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model


def lm_matmul_params(model) -> int:
    "N of the MFU formula: weights of the language model's linear layers (lm_head included, vision tower excluded)."
    import torch
    return sum(m.weight.numel() for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and "visual" not in n.split("."))


def peak_tflops(device_name: str, override: float | None) -> float | None:
    "The GPU's dense bf16 TFLOP/s: `override` if given, else from PEAK_TFLOPS by name (None when unknown)."
    if override: return float(override)
    for key, v in PEAK_TFLOPS:
        if key in device_name: return v
    return None


# ---------------------------------------------------------------------------------------------------------- timers
class PhaseClock:
    """Synchronised wall-clock timers per optimizer step.

    `instrument(cls)` wraps a trainer class's methods so their time goes to a phase; `callback()` is the
    TrainerCallback that marks the step boundaries and times `optimizer.step()`. A region's time excludes the time of
    the regions nested in it (e.g. `training_step` contains `_prepare_inputs`, which contains `_generate`)."""

    METHODS = {"_generate": "generation", "_generate_and_score_completions": "scoring", "_prepare_inputs": "scoring",
               "training_step": "forward_backward", "_clip_grad_norm": "optimizer"}

    def __init__(self, cuda: bool):
        import torch
        self.sync = torch.cuda.synchronize if cuda else (lambda: None)
        self.steps: list[dict] = []
        self.train_info: dict = {}
        self._stack: list[list] = []   # [phase, start, time of nested regions]
        self._reset()

    def _reset(self):
        self._phase = defaultdict(float)
        self._tokens = {"prompt_tokens": 0, "completion_tokens": 0, "responses": 0}

    def start(self, phase: str):
        self.sync()
        self._stack.append([phase, time.perf_counter(), 0.0])

    def stop(self, phase: str):
        self.sync()
        name, t0, nested = self._stack.pop()
        if name != phase: raise RuntimeError(f"timer regions interleave: stopping {phase!r} inside {name!r}")
        dt = time.perf_counter() - t0
        self._phase[name] += dt - nested
        if self._stack: self._stack[-1][2] += dt

    def mark(self):
        "Start a step's wall clock (on_train_begin)."
        self.sync()
        self._t = time.perf_counter()
        self._reset()

    def end_step(self):
        "Close a step (on_step_end): its wall time, phase times and tokens."
        self.sync()
        now = time.perf_counter()
        rec = {"wall_s": now - self._t, **{p: self._phase.get(p, 0.0) for p in PHASES[:-1]}, **self._tokens}
        rec["other"] = rec["wall_s"] - sum(rec[p] for p in PHASES[:-1])
        self.steps.append(rec)
        self._t = now
        self._reset()

    def count_tokens(self, out):
        "Tokens of one `_generate` result: (prompt_ids, completion_ids, ...) lists of token ids per response."
        prompt_ids, completion_ids = out[0], out[1]
        self._tokens["prompt_tokens"] += sum(len(p) for p in prompt_ids)
        self._tokens["completion_tokens"] += sum(len(c) for c in completion_ids)
        self._tokens["responses"] += len(completion_ids)

    @contextlib.contextmanager
    def instrument(self, cls):
        "Wrap `cls`'s METHODS with timers for the duration of the block (the class is restored afterwards)."
        own = {name: cls.__dict__[name] for name in self.METHODS if name in cls.__dict__}
        for name, phase in self.METHODS.items():
            fn = getattr(cls, name)

            def timed(*args, _fn=fn, _name=name, _phase=phase, **kwargs):
                self.start(_phase)
                try:
                    out = _fn(*args, **kwargs)
                finally:
                    self.stop(_phase)
                if _name == "_generate": self.count_tokens(out)
                return out
            setattr(cls, name, functools.wraps(fn)(timed))
        try:
            yield self
        finally:
            for name in self.METHODS:
                if name in own: setattr(cls, name, own[name])
                else: delattr(cls, name)

    def callback(self):
        "The TrainerCallback: step boundaries, optimizer.step(), and what the trainer was set up with."
        from transformers import TrainerCallback
        clock = self

        class PhaseClockCallback(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kw):
                params = list(model.parameters())
                clock.train_info = dict(
                    optim=str(args.optim), bf16=bool(args.bf16), fp16=bool(args.fp16),
                    gradient_checkpointing=bool(args.gradient_checkpointing),
                    per_device_train_batch_size=args.per_device_train_batch_size,
                    gradient_accumulation_steps=args.gradient_accumulation_steps,
                    steps_per_generation=args.steps_per_generation, num_generations=args.num_generations,
                    trainable_params=sum(p.numel() for p in params if p.requires_grad),
                    trainable_dtypes=sorted({str(p.dtype).replace("torch.", "") for p in params if p.requires_grad}),
                    frozen_dtypes=sorted({str(p.dtype).replace("torch.", "") for p in params if not p.requires_grad}))
                clock.mark()

            def on_pre_optimizer_step(self, args, state, control, **kw): clock.start("optimizer")
            def on_optimizer_step(self, args, state, control, **kw): clock.stop("optimizer")
            def on_step_end(self, args, state, control, **kw): clock.end_step()

        return PhaseClockCallback()


# ---------------------------------------------------------------------------------------------------------- runs
def grpo_config(a, which: str, out_dir: Path):
    "The GRPOTrainConfig every run shares (paper reward and GRPO settings, this check's small batch)."
    from srpo_nb.grpo import GRPOTrainConfig
    P, G = a.prompts_per_step, a.num_generations
    return GRPOTrainConfig(
        model=f"random-init ({which})", lora={"r": a.lora_r, "lora_alpha": 2 * a.lora_r} if which == "lora" else None,
        dtype="auto", data="generated", max_problems=P * (a.steps + 1), max_prompt_length=1024,
        max_pixels=a.max_pixels, reward="paper", reward_config={"use_math_verify": False}, filter_low=0.0,
        num_generations=G, prompts_per_rollout=P, train_batch_size=P * G, per_device_batch_size=a.per_device_batch_size,
        learning_rate=1e-5 if which == "lora" else 1e-6, max_completion_length=a.max_completion_length,
        max_steps=a.steps, save_steps=10 ** 6, output_dir=str(out_dir), log_completions=False, tensorboard=False,
        gradient_checkpointing=True, verbose=True, seed=a.seed)


def run_srpo(cfg, model, processor, clock: PhaseClock):
    "srpo_nb's path: `train_grpo` with the policy in memory (SRPOGRPOTrainer, online filter, srpo_nb callbacks)."
    from srpo_nb.grpo import srpo_trainer_class, train_grpo
    with clock.instrument(srpo_trainer_class()):
        res = train_grpo(cfg, callbacks=[clock.callback()], policy=(model, processor))
    return {"global_step": res.global_step, "filter_totals": res.filter_totals}


def run_bare_trl(cfg, model, processor, clock: PhaseClock):
    "TRL's GRPOTrainer as is, with the same TRL arguments, data, reward functions and LoRA config as `run_srpo`."
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOTrainer
    from srpo_nb.core import seed_everything
    from srpo_nb.grpo import build_reward_funcs, grpo_dataset, load_grpo_problems, trl_args
    from srpo_nb.models import lora_config, vision_token_ids

    class BareGRPOTrainer(GRPOTrainer):
        "TRL's GRPOTrainer unchanged: a subclass only so that the timers wrap this run's class and no other."

    seed_everything(cfg.seed)
    funcs, weights = build_reward_funcs(cfg, processor.tokenizer)
    args = trl_args(cfg, reward_weights=weights)
    args.generation_kwargs = {**(args.generation_kwargs or {}), "suppress_tokens": vision_token_ids(processor)}
    data, _ = grpo_dataset(load_grpo_problems(cfg), cfg.prompt_text(), processor, cfg.max_prompt_length)
    with clock.instrument(BareGRPOTrainer):
        trainer = BareGRPOTrainer(model=model, processing_class=processor, reward_funcs=funcs, args=args,
                                  train_dataset=data, peft_config=lora_config(cfg.lora) if cfg.lora else None,
                                  callbacks=[clock.callback()])
        trainer.remove_callback(PrinterCallback)  # TRL's console dump of every log, removed as train_grpo does
        trainer.train()
    step = trainer.state.global_step
    del trainer
    return {"global_step": step, "filter_totals": None}


def summarise(clock: PhaseClock, n_matmul: int, peak: float | None) -> dict:
    "Totals over the measured steps (all but the first, when there are two or more)."
    steps = clock.steps[1:] if len(clock.steps) > 1 else clock.steps
    wall = sum(s["wall_s"] for s in steps)
    phases = {p: sum(s[p] for s in steps) for p in PHASES}
    T = sum(s["prompt_tokens"] + s["completion_tokens"] for s in steps)
    comp = sum(s["completion_tokens"] for s in steps)
    flops = 8 * n_matmul * T          # 2·N·T generation + 6·N·T forward/backward
    pk = peak * 1e12 if peak else None
    rnd = lambda x, k=4: round(x, k) if x is not None else None  # noqa: E731
    return dict(
        steps=len(steps), first_step_excluded=len(clock.steps) > 1, wall_s=rnd(wall), s_per_step=rnd(wall / len(steps)),
        s_per_step_median=rnd(statistics.median(s["wall_s"] for s in steps)),
        phases_s={p: rnd(v) for p, v in phases.items()},
        phases_per_step_s={p: rnd(v / len(steps)) for p, v in phases.items()},
        phase_share={p: rnd(v / wall, 3) for p, v in phases.items()},
        tokens=T, completion_tokens=comp, tokens_per_s=rnd(T / wall, 1),
        generated_tokens_per_s=rnd(comp / phases["generation"], 1) if phases["generation"] else None,
        model_tflops_per_step=rnd(flops / len(steps) / 1e12, 3),
        mfu=rnd(flops / (wall * pk), 6) if pk else None,
        mfu_generation=rnd(2 * n_matmul * T / (phases["generation"] * pk), 6) if pk and phases["generation"] else None,
        mfu_forward_backward=(rnd(6 * n_matmul * T / (phases["forward_backward"] * pk), 6)
                              if pk and phases["forward_backward"] else None))


def one_run(name: str, a, tok, processor, work: Path, cuda: bool, peak: float | None) -> dict:
    "Build the run's policy, train it for a few GRPO steps under the phase timers, and report."
    import torch
    from srpo_nb.models import freeze_vision_tower, precision_plan
    which = "full" if name == "srpo_full" else "lora"
    label, shapes = model_shapes(a.size, which, len(tok))
    plan = precision_plan("auto", lora=which == "lora", device="cuda" if cuda else "cpu")
    out_dir = work / name
    if cuda:
        gc.collect(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    at_start = torch.cuda.memory_allocated() / GiB if cuda else None
    print(f"\n== {name}: {label}, {'LoRA r=%d' % a.lora_r if which == 'lora' else 'full fine-tuning'}, "
          f"weights {plan.weights}, compute {plan.compute}", flush=True)
    t0 = time.perf_counter()
    model = build_policy(shapes, tok, plan.torch_weights, "cuda" if cuda else "cpu", seed=a.seed)
    if which == "full": freeze_vision_tower(model)  # as load_policy does (train_grpo takes a given policy as is)
    build_s = time.perf_counter() - t0
    n_params, n_matmul = sum(p.numel() for p in model.parameters()), lm_matmul_params(model)
    print(f"built in {build_s:.1f}s: {n_params / 1e6:,.1f}M parameters, N = {n_matmul / 1e6:,.1f}M LM matmul parameters",
          flush=True)
    cfg = grpo_config(a, which, out_dir)
    clock = PhaseClock(cuda)
    t1 = time.perf_counter()
    res = (run_bare_trl if name == "bare_lora" else run_srpo)(cfg, model, processor, clock)
    run_s = time.perf_counter() - t1
    mem = dict(peak_allocated_GiB=round(torch.cuda.max_memory_allocated() / GiB, 2) if cuda else None,
               peak_reserved_GiB=round(torch.cuda.max_memory_reserved() / GiB, 2) if cuda else None,
               allocated_at_start_GiB=round(at_start, 2) if cuda else None,
               process_peak_rss_GiB=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB, 2))
    del model
    gc.collect()
    if cuda: torch.cuda.empty_cache()
    if not a.keep_runs: shutil.rmtree(out_dir, ignore_errors=True)  # a full model's final save is ~15 GB
    return dict(name=name, trainer="trl.GRPOTrainer" if name == "bare_lora" else "srpo_nb.grpo.train_grpo",
                model=f"random-init {label}", finetune=f"LoRA r={a.lora_r}" if which == "lora" else "full (vision frozen)",
                precision=dict(weights=plan.weights, compute=plan.compute), params=n_params,
                lm_matmul_params=n_matmul, trainer_setup=clock.train_info,
                global_step=res["global_step"], filter_totals=res["filter_totals"], build_s=round(build_s, 2),
                run_s=round(run_s, 2), per_step=[{k: round(v, 4) if isinstance(v, float) else v for k, v in s.items()}
                                                for s in clock.steps],
                summary=summarise(clock, n_matmul, peak), memory=mem)


# ---------------------------------------------------------------------------------------------------------- report
def benchmark_rows(report: dict) -> str:
    "The BENCHMARKS.md table for this report: one row per run, then srpo_nb's overhead over bare TRL."
    s = report["settings"]
    head = ("| run | device | model, fine-tuning, precision | batch | s/step | generation / scoring / fwd+bwd / "
            "optimizer / other, s per step | tokens/s (generated/s) | MFU (gen / fwd+bwd) | peak GiB alloc / reserved |\n"
            "|---|---|---|---|---|---|---|---|---|")
    rows = [head]
    for r in report["runs"].values():
        m, mem, ph = r["summary"], r["memory"], r["summary"]["phases_per_step_s"]
        f = lambda x, k=2: "–" if x is None else f"{x:.{k}f}"  # noqa: E731
        pct = lambda x: "–" if x is None else f"{100 * x:.1f}%"  # noqa: E731
        rows.append(
            f"| {r['name']} ({r['trainer']}) | {report['device']} | {r['model']}, {r['finetune']}, "
            f"{r['precision']['weights']} weights / {r['precision']['compute']} compute | "
            f"{s['prompts_per_step']}×{s['num_generations']} responses, ≤{s['max_completion_length']} new tokens, "
            f"micro-batch {s['per_device_batch_size']} | {f(m['s_per_step'])} | "
            f"{' / '.join(f(ph[p]) for p in PHASES)} | {f(m['tokens_per_s'], 0)} ({f(m['generated_tokens_per_s'], 0)}) | "
            f"{pct(m['mfu'])} ({pct(m['mfu_generation'])} / {pct(m['mfu_forward_backward'])}) | "
            f"{f(mem['peak_allocated_GiB'], 1)} / {f(mem['peak_reserved_GiB'], 1)} |")
    o = report.get("overhead")
    if o: rows.append(f"\nsrpo_nb over bare TRL (srpo_lora ÷ bare_lora): {o['ratio_s_per_step']:.3f}× s/step, "
                      f"{o['ratio_s_per_token']:.3f}× s/token ({report['n_measured_steps']} measured steps each, "
                      f"{report['device']}).")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------------------- preflight
def read_pins(path: Path) -> dict:
    "{package: version} of a constraints file's `name==version` lines."
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s#;]+)", line)
        if m: pins[m.group(1).lower()] = m.group(2)
    return pins


def installed(name: str) -> str | None:
    try: return md.version(name)
    except md.PackageNotFoundError: return None


def versions() -> dict:
    return {p: installed(p) for p in (*TORCH_STACK, *HF_STACK, *OPTIONAL, "dashscope", "tokenizers", "huggingface-hub")}


def static_memory_gib(a, vocab_len: int) -> dict:
    "Weights + gradients + AdamW state of each run (GiB), from models on the meta device; activations not included."
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from srpo_nb.models import freeze_vision_tower
    from srpo_nb.sft import lora_parameter_count
    out = {}
    for which in ("lora", "full"):
        _, shapes = model_shapes(a.size, which, vocab_len)
        shapes["text_config"].update(bos_token_id=None, eos_token_id=None, pad_token_id=None)  # only sizes count here
        with torch.device("meta"):
            m = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**shapes))
        total = sum(p.numel() for p in m.parameters())
        if which == "lora":  # bf16 base + fp32 adapters, their gradients and AdamW moments
            out["lora"] = (2 * total + 16 * lora_parameter_count(m, a.lora_r)) / GiB
        else:  # fp32 master weights everywhere (frozen vision tower too), fp32 gradients + AdamW moments on the trained
            freeze_vision_tower(m)
            trained = sum(p.numel() for p in m.parameters() if p.requires_grad)
            out["full"] = (4 * total + 12 * trained) / GiB
            out["full_final_save"] = 4 * total / GiB
    return out


def preflight(a, cuda: bool) -> int:
    "Check the device, the package stack, free GPU memory and disk, and that the hub is off; 0 when the check can run."
    checks = []  # (ok: True/False/None for information, what, detail)
    add = lambda ok, what, detail: checks.append((ok, what, detail))  # noqa: E731
    import torch
    # 1. nothing from the hub
    import huggingface_hub
    from huggingface_hub.constants import is_offline_mode
    offline = is_offline_mode()
    add(offline, "hub offline", f"HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE')} (huggingface_hub "
        f"{huggingface_hub.__version__} offline: {offline}); the models, tokenizer, processor and problems are built locally")
    # 2. the package stack
    pins_file = ROOT / ("constraints.txt" if a.device == "cpu" else "constraints-gpu.txt")
    pins = read_pins(pins_file)
    for p in (*TORCH_STACK, *HF_STACK):
        have, want = installed(p), pins.get(p)
        if p in HF_STACK: add(have is not None and (want is None or have == want), p, f"{have} (pinned {want})")
        else: add(None if have is not None and have != want else have is not None, p,
                  f"{have} (pinned {want}{'; differs, the check still runs: its JSON records the versions' if have != want else ''})")
    for p in OPTIONAL: add(None, p, f"{installed(p) or 'not installed'} (not needed by this check)")
    vocab = resolve_vocab(a)
    why = ("--vocab" if a.vocab != "auto" else "dashscope installed" if vocab == "qwen" else
           "--size tiny" if a.size == "tiny" else "dashscope not installed")
    add(None, "tokenizer", f"{vocab!r} BPE ({why})")
    # 3. the device, its peak and free memory
    mem = static_memory_gib(a, 151665 if vocab == "qwen" else 1046)
    add(None, "memory estimate", f"weights + gradients + AdamW state: srpo_lora/bare_lora {mem['lora']:.1f} GiB, "
                                 f"srpo_full {mem['full']:.1f} GiB (activations and logits come on top)")
    if a.device != "cpu" and not cuda:
        add(False, "GPU", "no CUDA GPU visible (torch.cuda.is_available() is False)")
    elif cuda:
        name = torch.cuda.get_device_name(0)
        free, total = torch.cuda.mem_get_info(0)
        add(True, "GPU", f"{name}, compute capability {'.'.join(map(str, torch.cuda.get_device_capability(0)))}, "
                         f"torch CUDA {torch.version.cuda}, {torch.cuda.device_count()} visible (the check uses cuda:0)")
        add(bool(torch.cuda.is_bf16_supported()), "bf16", "supported" if torch.cuda.is_bf16_supported() else "not supported")
        pk = peak_tflops(name, a.peak_tflops)
        add(pk is not None, "peak TFLOP/s", f"{pk}" if pk else "unknown GPU: pass --peak-tflops for the MFU")
        need = max(mem["lora"], mem["full"])
        add(free / GiB >= need, "free GPU memory",
            f"{free / GiB:.1f} of {total / GiB:.1f} GiB free; static need {need:.1f} GiB (LoRA 7B {mem['lora']:.1f}, "
            f"full 3B {mem['full']:.1f}) + activations and logits")
    else:
        add(None, "GPU", "skipped (--device cpu)")
    # 4. disk for the runs' saves (train_grpo always saves the final model: the full run's is fp32)
    work = Path(a.work or tempfile.gettempdir()); work.mkdir(parents=True, exist_ok=True)
    disk = shutil.disk_usage(work).free / GiB
    add(disk >= 1.2 * mem["full_final_save"], "disk", f"{disk:.1f} GiB free under {work}; the full run saves "
                                                      f"{mem['full_final_save']:.1f} GiB (deleted after the run)")
    # 5. the data and the processor build offline
    from srpo_nb.data import load_problem_source
    ps = load_problem_source("generated", limit=2, seed=a.seed)
    add(len(ps) == 2, "data", f"generated problems, e.g. {ps[0].id} ({ps[0].images[0].size[0]} px image)")
    for ok, what, detail in checks:
        print(f"[{'ok' if ok else 'FAIL' if ok is False else 'info'}] {what}: {detail}")
    bad = [w for ok, w, _ in checks if ok is False]
    print("preflight: " + ("ready" if not bad else f"NOT ready ({', '.join(bad)})"), flush=True)
    return 1 if bad else 0


def resolve_vocab(a) -> str:
    "'qwen' (the real BPE) when asked, or for the real sizes when dashscope is installed; 'small' otherwise."
    if a.vocab != "auto": return a.vocab
    return "qwen" if a.size == "real" and importlib.util.find_spec("dashscope") is not None else "small"


# ---------------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="real", help="real: 7B LoRA + 3B full; tiny: the smoke run")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {','.join(RUNS)}")
    ap.add_argument("--steps", type=int, help="GRPO optimizer steps per run (the first is warm-up)")
    ap.add_argument("--prompts-per-step", type=int)
    ap.add_argument("--num-generations", type=int, help="G, responses per prompt")
    ap.add_argument("--per-device-batch-size", type=int, help="responses per forward/backward pass")
    ap.add_argument("--max-completion-length", type=int)
    ap.add_argument("--max-pixels", type=int)
    ap.add_argument("--min-pixels", type=int)
    ap.add_argument("--lora-r", type=int)
    ap.add_argument("--vocab", choices=["auto", "qwen", "small"], default="auto",
                    help="tokenizer BPE: auto = qwen for --size real when dashscope is installed, else small")
    ap.add_argument("--peak-tflops", type=float, help="the device's dense bf16 TFLOP/s (default: from the GPU's name)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="gpu_check.json", help="the JSON report")
    ap.add_argument("--work", help="folder for the runs' outputs (default: a temporary folder)")
    ap.add_argument("--keep-runs", action="store_true", help="keep the runs' folders (the full run's model is ~15 GB)")
    ap.add_argument("--preflight", action="store_true", help="check the machine and exit (0 = ready)")
    a = ap.parse_args(argv)
    for k, v in SIZES[a.size].items():
        if getattr(a, k) is None: setattr(a, k, v)
    a.runs = [r.strip() for r in a.runs.split(",") if r.strip()]
    bad = [r for r in a.runs if r not in RUNS]
    if bad or not a.runs: ap.error(f"--runs: unknown {bad or a.runs}; choose from {', '.join(RUNS)}")
    for k in ("steps", "prompts_per_step", "num_generations", "per_device_batch_size", "max_completion_length"):
        if getattr(a, k) < 1: ap.error(f"--{k.replace('_', '-')} must be >= 1, got {getattr(a, k)}")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.device == "cpu": os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch: the trainer must not find a GPU
    import torch
    cuda = torch.cuda.is_available()
    if a.preflight: return preflight(a, cuda)
    if a.device == "cuda" and not cuda: sys.exit("--device cuda: no CUDA GPU is visible (torch.cuda.is_available() is False)")
    if a.size == "real" and not cuda: sys.exit("--size real needs a CUDA GPU; use --size tiny --device cpu for the smoke run")

    from srpo_nb.models import build_tiny_processor
    device_name = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = peak_tflops(device_name, a.peak_tflops)
    vocab = resolve_vocab(a)
    t0 = time.perf_counter()
    tok = build_tokenizer(vocab)
    processor = build_tiny_processor(tok, min_pixels=a.min_pixels, max_pixels=a.max_pixels)
    print(f"device {device_name} (peak {peak} TFLOP/s); tokenizer: {vocab} BPE, {len(tok)} tokens, "
          f"built in {time.perf_counter() - t0:.1f}s", flush=True)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="srpo_gpu_check_"))
    settings = {k: getattr(a, k) for k in ("size", "steps", "prompts_per_step", "num_generations", "per_device_batch_size",
                                          "max_completion_length", "min_pixels", "max_pixels", "lora_r", "seed")}
    settings.update(reward="paper (math-verify off)", filter_low=0.0, gradient_checkpointing=True, data="generated")
    report = dict(device=device_name, peak_tflops=peak, cuda=cuda, vocab=vocab, versions=versions(), settings=settings,
                  hub_offline=os.environ.get("HF_HUB_OFFLINE") == "1", n_measured_steps=max(a.steps - 1, 1),
                  mfu_formula="(2*N*T + 6*N*T) / (wall_s * peak_tflops * 1e12); N = lm_matmul_params, "
                              "T = prompt + completion tokens", runs={})
    t_all = time.perf_counter()
    for name in a.runs:
        report["runs"][name] = one_run(name, a, tok, processor, work, cuda, peak)
    report["total_s"] = round(time.perf_counter() - t_all, 1)
    runs = report["runs"]
    if "srpo_lora" in runs and "bare_lora" in runs:
        s, b = runs["srpo_lora"]["summary"], runs["bare_lora"]["summary"]
        report["overhead"] = dict(ratio_s_per_step=round(s["s_per_step"] / b["s_per_step"], 4),
                                  ratio_s_per_token=round((s["wall_s"] / s["tokens"]) / (b["wall_s"] / b["tokens"]), 4),
                                  tokens_srpo=s["tokens"], tokens_bare=b["tokens"])
    report["benchmarks_md"] = benchmark_rows(report)
    out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    if not a.work and not a.keep_runs: shutil.rmtree(work, ignore_errors=True)
    print(f"\nreport: {out}\n\nBENCHMARKS.md rows{' (CPU smoke run: not GPU figures)' if not cuda else ''}:\n"
          + report["benchmarks_md"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
