"""GPU check for srpo_nb.launch: a few GRPO steps of a launch preset (3b-lora-1gpu, 7b-lora-1gpu) on a random-init
model of the preset's real size, with the preset's own GRPO settings, and the planner's per-GPU peak beside the
measured one (goal: within 10%). JSON out and a ready BENCHMARKS.md row.

    python bench/launch_gpu_check.py --preset 3b-lora-1gpu --out /tmp/launch_check          # on one CUDA GPU
    python bench/launch_gpu_check.py --preset 7b-lora-1gpu --out /tmp/launch_check
    python bench/launch_gpu_check.py --preset tiny-cpu --steps 1 --out /tmp/x                 # CPU smoke test of this script

Nothing is downloaded: the model is built from the shapes the planner uses (srpo_nb.launch.MODEL_SHAPES) with random
weights and srpo_nb's small tokenizer (the embedding keeps the real vocabulary's rows, so memory and FLOPs are the real
model's) and saved to --out/model, which both the trainer and (with use_vllm) vLLM load. A random model rarely stops,
so every completion runs to max_completion_length: the measured peak is that of full-length rollouts, which is what the
planner assumes. --prompts-per-rollout / --max-completion-length shrink a step to fit a short GPU session; the planner is
then evaluated on the same shrunken preset. Peak memory: torch's max_memory_allocated/reserved of this process and the
device's used memory sampled with nvidia-smi every 0.5 s (vLLM's pool is not in torch's counters).
"""
import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")   # nothing from the hub: the model is built here


def build_model_folder(preset, out: Path, device: str) -> Path:
    "Save a random-init Qwen2.5-VL of the preset model's shapes (tiny: the tiny model itself) with a working processor."
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from srpo_nb.launch import MODEL_SHAPES
    from srpo_nb.models import QWEN_ADDED_TOKENS, build_qwen_tokenizer, build_tiny_processor, resolve_model
    if preset.model not in MODEL_SHAPES: return Path(resolve_model(preset.model))
    folder = out / "model"
    if (folder / "config.json").exists(): return folder
    tok = build_qwen_tokenizer("small")
    ids = {t: tok.convert_tokens_to_ids(t) for t, _ in QWEN_ADDED_TOKENS}
    shapes = json.loads(json.dumps(MODEL_SHAPES[preset.model]))
    special = dict(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    shapes["text_config"].update(special)
    cfg = Qwen2_5_VLConfig(**shapes, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                           vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], **special)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(folder)
    build_tiny_processor(tok, min_pixels=56 * 56, max_pixels=640 * 28 * 28).save_pretrained(folder)
    del model
    if device == "cuda": torch.cuda.empty_cache()
    return folder


class GpuSampler(threading.Thread):
    "The device's used memory (nvidia-smi, MiB) sampled every `every` seconds; `.peak` in bytes."
    def __init__(self, every: float = 0.5):
        super().__init__(daemon=True); self.every, self.peak, self.stop = every, 0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                     capture_output=True, text=True, timeout=10).stdout.strip()
                self.peak = max(self.peak, int(out.splitlines()[0]) * 2**20)
            except Exception:
                pass
            self.stop.wait(self.every)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="3b-lora-1gpu")
    ap.add_argument("--steps", type=int, default=3, help="GRPO optimizer steps")
    ap.add_argument("--prompts-per-rollout", type=int, default=None, help="override the preset's (and train_batch_size with it)")
    ap.add_argument("--max-completion-length", type=int, default=None)
    ap.add_argument("--no-vllm", action="store_true", help="generate with transformers instead of the preset's vLLM")
    ap.add_argument("--use-unsloth", choices=["auto", "true", "false"], default=None, help="override the preset's use_unsloth")
    ap.add_argument("--out", default="/tmp/launch_gpu_check")
    a = ap.parse_args()

    import torch
    from srpo_nb.grpo import GRPOTrainConfig, train_grpo
    from srpo_nb.launch import GiB, check_stage_configs, load_preset, plan
    cuda = torch.cuda.is_available()
    preset = load_preset(a.preset)
    over = {}
    if a.prompts_per_rollout:   # one optimizer step per rollout
        G = check_stage_configs(preset)["grpo"].num_generations
        over.update(prompts_per_rollout=a.prompts_per_rollout, train_batch_size=a.prompts_per_rollout * G)
    if a.max_completion_length: over["max_completion_length"] = a.max_completion_length
    if a.no_vllm: over["use_vllm"] = False
    if a.use_unsloth: over["use_unsloth"] = {"auto": "auto", "true": True, "false": False}[a.use_unsloth]
    preset = dataclasses.replace(preset, grpo={**preset.grpo, **over})
    out = Path(a.out) / preset.name; out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    folder = build_model_folder(preset, out, "cuda" if cuda else "cpu")
    build_s = time.perf_counter() - t0

    cfg = check_stage_configs(preset)["grpo"]
    shutil.rmtree(out / "run", ignore_errors=True)   # a fresh run each time (the model folder is kept)
    cfg = GRPOTrainConfig.from_dict({**cfg.to_dict(), "model": str(folder), "data": "generated",
                                     "max_problems": max(64, 2 * cfg.prompts_per_rollout), "max_steps": a.steps,
                                     "output_dir": str(out / "run"), "resume_from_checkpoint": None,
                                     "save_steps": 10 ** 6, "tensorboard": False})
    sampler = GpuSampler() if cuda else None
    if sampler: sampler.start()
    if cuda: torch.cuda.reset_peak_memory_stats()
    t1 = time.perf_counter()
    res = train_grpo(cfg)
    train_s = time.perf_counter() - t1
    if sampler: sampler.stop.set(); sampler.join()
    measured = dict(torch_allocated=torch.cuda.max_memory_allocated() if cuda else None,
                    torch_reserved=torch.cuda.max_memory_reserved() if cuda else None,
                    device_used=sampler.peak if sampler else None)
    planned = plan(preset, "grpo")
    ref = measured["device_used"] if cfg.use_vllm else measured["torch_allocated"]
    ratio = planned["peak"] / ref if ref else None
    report = dict(preset=preset.name, gpu=torch.cuda.get_device_name(0) if cuda else "cpu", steps=res.global_step,
                  overrides=over, build_s=round(build_s, 1), train_s=round(train_s, 1),
                  s_per_step=round(train_s / max(res.global_step, 1), 1), measured=measured,
                  planned={k: planned[k] for k in ("weights", "gradients", "optimizer", "master", "activations",
                                                   "activations_ckpt", "logits", "vllm_weights", "vllm_kv", "peak")},
                  plan_over_measured=round(ratio, 3) if ratio else None,
                  planned_s_per_step=(planned["s_rollout"] or 0) + (planned["s_update"] or 0) if planned["s_update"] else None)
    (out / "launch_gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    g = lambda x: f"{x / GiB:.1f}" if x else "–"  # noqa: E731
    print(json.dumps(report, indent=1, default=str))
    print(f"| {preset.name} GRPO, {report['gpu']}, {res.global_step} steps {over or ''} | planned peak {g(planned['peak'])} GiB | "
          f"measured {g(ref)} GiB ({'device used' if cfg.use_vllm else 'torch allocated'}) | plan/measured "
          f"{report['plan_over_measured']} | {report['s_per_step']} s/step (planned {report['planned_s_per_step']}) |")


if __name__ == "__main__":
    main()
