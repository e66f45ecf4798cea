"""GPU check for srpo_nb.grpo: a few GRPO steps of a random-init, real-size Qwen2.5-VL-3B with LoRA, through
`train_grpo` (SRPO's paper reward, online filter, generated problems with images). Reports s/step, tokens/s and
peak GPU memory, as JSON and as a BENCHMARKS.md row.

    python bench/grpo_gpu_check.py --out /tmp/grpo_bench            # on a CUDA machine (the real check)
    python bench/grpo_gpu_check.py --size tiny --steps 2 --out /tmp/x  # CPU smoke test of this script

Nothing is downloaded: the 3B model is built from its published configuration with random weights (bf16, on the
GPU), and the tokenizer is srpo_nb's small BPE while the embedding and LM head keep Qwen's 151,936 rows, so the
model's size, memory and per-token cost are the real 3B's (only prompt token counts differ from the real tokenizer).
A random model rarely ends a response, so every completion runs to `--max-completion-length`: the timing is that of
full-length rollouts.

On the project's device machine (Python 3.12, torch and accelerate present, transformers 5.17 too old, no trl,
datasets or peft 0.21), carry these as wheels (see the device README): from the repo root, here,
    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        transformers==5.24.0 trl==1.16.0 peft==0.21.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
        pyarrow==26.0.1
and run there (carry [".whl"]):
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site:$PWD && PYTHONUNBUFFERED=1 python3 bench/grpo_gpu_check.py --out $OUT
`--preflight` only prints the versions it finds. Record the printed row in BENCHMARKS.md.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Qwen2.5-VL-3B-Instruct's published architecture (config.json of the hub checkpoint)
QWEN25VL_3B_TEXT = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                        num_key_value_heads=2, max_position_embeddings=128000, rms_norm_eps=1e-6, vocab_size=151936,
                        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
QWEN25VL_3B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                          patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                          fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu", in_chans=3, tokens_per_second=2)


def versions() -> dict:
    import importlib.metadata as md
    out = {}
    for p in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "pyarrow", "tokenizers", "huggingface-hub"):
        try: out[p] = md.version(p)
        except md.PackageNotFoundError: out[p] = None
    return out


def build_policy(size: str, device: str, max_pixels: int):
    "A random-init Qwen2.5-VL (3B or tiny dims) with srpo_nb's tokenizer and processor, on `device`."
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from srpo_nb.models import QWEN_ADDED_TOKENS, TINY_TEXT_CONFIG, TINY_VISION_CONFIG, build_qwen_tokenizer, build_tiny_processor
    tok = build_qwen_tokenizer("small")
    ids = {t: tok.convert_tokens_to_ids(t) for t, _ in QWEN_ADDED_TOKENS}
    text = dict(QWEN25VL_3B_TEXT) if size == "3b" else dict(TINY_TEXT_CONFIG, vocab_size=151936)
    vision = dict(QWEN25VL_3B_VISION) if size == "3b" else dict(TINY_VISION_CONFIG)
    special = dict(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    cfg = Qwen2_5_VLConfig(text_config=dict(text, tie_word_embeddings=True, **special), vision_config=vision,
                           image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                           vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                           tie_word_embeddings=True, **special)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=dtype)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    processor = build_tiny_processor(tok, min_pixels=56 * 56, max_pixels=max_pixels)
    return model, processor


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["3b", "tiny"], default="3b")
    ap.add_argument("--steps", type=int, default=5, help="GRPO optimizer steps (the first one is warm-up)")
    ap.add_argument("--num-generations", type=int, default=8)
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--per-device-batch-size", type=int, default=16)
    ap.add_argument("--max-completion-length", type=int, default=512)
    ap.add_argument("--max-pixels", type=int, default=448 * 448)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--out", default="/tmp/grpo_gpu_check")
    ap.add_argument("--preflight", action="store_true", help="print package versions and CUDA, then exit")
    a = ap.parse_args()
    import torch
    v = versions()
    print("versions:", json.dumps(v), "| cuda:", torch.cuda.is_available(),
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-", flush=True)
    if a.preflight: return
    missing = [p for p in ("trl", "peft", "datasets") if v[p] is None]
    if missing: sys.exit(f"missing packages {missing}: carry them as wheels (see this file's docstring)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.size == "3b" and device != "cuda": sys.exit("--size 3b needs a CUDA GPU (use --size tiny for a CPU smoke test)")

    from srpo_nb.grpo import GRPOTrainConfig, train_grpo
    from srpo_nb.models import freeze_vision_tower, lora_config

    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, processor = build_policy(a.size, device, a.max_pixels)
    import peft
    model = peft.get_peft_model(model, lora_config({"r": a.lora_r, "lora_alpha": 2 * a.lora_r, "lora_dropout": 0.0}))
    freeze_vision_tower(model)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"built {a.size} model: {n_params / 1e9:.3f}B parameters, {n_train / 1e6:.1f}M trainable (LoRA r={a.lora_r}) "
          f"in {build_s:.1f}s", flush=True)

    G, P = a.num_generations, a.prompts_per_step
    cfg = GRPOTrainConfig(
        model=f"random-init Qwen2.5-VL-{a.size}", lora=True, data="generated", max_problems=max(64, P * a.steps),
        max_prompt_length=None, reward="paper", reward_config={"use_math_verify": False},
        num_generations=G, prompts_per_rollout=P, train_batch_size=P * G, per_device_batch_size=a.per_device_batch_size,
        learning_rate=1e-5, lr_scheduler="constant", warmup_ratio=0.0, max_completion_length=a.max_completion_length,
        max_steps=a.steps, save_steps=10 ** 6, output_dir=str(out / "run"), log_completions=False, tensorboard=False,
        gradient_checkpointing=device == "cuda", num_threads=None if device == "cuda" else 1, verbose=True, seed=0)
    if device == "cuda": torch.cuda.reset_peak_memory_stats()
    t1 = time.perf_counter()
    res = train_grpo(cfg, policy=(model, processor))
    train_s = time.perf_counter() - t1
    steps = [m for m in res.metrics if "step_time" in m]
    times = [m["step_time"] for m in steps]
    tokens = [m["num_tokens"] for m in steps]                       # cumulative prompt + completion tokens
    per_step_tokens = [b - a_ for a_, b in zip([0.0] + tokens[:-1], tokens)]
    comp = [m["completions/mean_length"] * P * G for m in steps]    # completion tokens per step
    warm = slice(1, None) if len(times) > 1 else slice(None)
    s_step = statistics.median(times[warm])
    tok_s = sum(per_step_tokens[warm]) / sum(times[warm])
    comp_s = sum(comp[warm]) / sum(times[warm])
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None
    report = {"size": a.size, "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "versions": v,
              "params_B": round(n_params / 1e9, 3), "trainable_M": round(n_train / 1e6, 2), "lora_r": a.lora_r,
              "G": G, "prompts_per_step": P, "responses_per_step": P * G, "per_device_batch_size": a.per_device_batch_size,
              "max_completion_length": a.max_completion_length, "max_pixels": a.max_pixels, "steps": res.global_step,
              "step_times_s": [round(t, 3) for t in times], "s_per_step_median_after_first": round(s_step, 3),
              "tokens_per_s": round(tok_s, 1), "completion_tokens_per_s": round(comp_s, 1),
              "mean_completion_length": round(statistics.mean(m["completions/mean_length"] for m in steps), 1),
              "peak_gpu_mem_GiB": round(peak, 2) if peak is not None else None, "build_s": round(build_s, 1),
              "train_s": round(train_s, 1), "filter_totals": res.filter_totals}
    (out / "grpo_gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    setup = "bf16, grad ckpt" if device == "cuda" else "fp32, CPU smoke run"
    mem = f"{report['peak_gpu_mem_GiB']} GiB peak" if peak is not None else "no GPU memory figure"
    print(f"\nBENCHMARKS.md row:\n| GRPO step, Qwen2.5-VL-{a.size} random init, LoRA r={a.lora_r} | {report['device']} | "
          f"G={G}, {P * G} responses/step, ≤{a.max_completion_length} new tokens, {setup}, HF generate | "
          f"{s_step:.2f} s/step | {tok_s:.0f} tok/s ({comp_s:.0f} completion tok/s) | {mem} |")

if __name__ == "__main__":
    main()
