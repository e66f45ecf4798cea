"""bench/gpu_check.py: its CPU smoke mode (the real check's code path with tiny sizes) writes a complete, consistent
report; the phase timers account for nested regions; the preflight reports what it checked."""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastcore.test import test_close as close_, test_eq as eq_, test_fail as fail_

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_script(*args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    "One CPU smoke run of all three runs, 2 steps each, with a stand-in peak of 1 TFLOP/s so the MFU is computed."
    d = tmp_path_factory.mktemp("gpu_check")
    t0 = time.perf_counter()
    p = run_script("--size", "tiny", "--device", "cpu", "--steps", "2", "--peak-tflops", "1",
                   "--out", str(d / "report.json"), "--work", str(d / "work"))
    wall = time.perf_counter() - t0
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads((d / "report.json").read_text()), p.stdout, wall, d


def test_smoke_report_fields(smoke):
    r, out, wall, d = smoke
    eq_(r["device"], "cpu"); eq_(r["cuda"], False); eq_(r["hub_offline"], True)
    eq_(r["peak_tflops"], 1.0)
    for p in ("torch", "transformers", "trl", "peft", "datasets", "accelerate"): assert r["versions"][p], p
    eq_(sorted(r["runs"]), ["bare_lora", "srpo_full", "srpo_lora"])
    s = r["settings"]
    responses = s["prompts_per_step"] * s["num_generations"]
    for name, run in r["runs"].items():
        eq_(run["global_step"], 2)
        eq_(len(run["per_step"]), 2)
        for st in run["per_step"]:
            phases = [st[p] for p in ("generation", "scoring", "forward_backward", "optimizer")]
            assert all(v > 0 for v in phases[:3]) and phases[3] >= 0, (name, st)
            assert sum(phases) <= st["wall_s"] + 1e-6 and st["other"] >= -1e-6, (name, st)
            close_(sum(phases) + st["other"], st["wall_s"], eps=1e-3)
            eq_(st["responses"], responses)
            assert st["prompt_tokens"] > 0 and 0 < st["completion_tokens"] <= responses * s["max_completion_length"]
        m = run["summary"]
        eq_(m["steps"], 1); eq_(m["first_step_excluded"], True)  # the warm-up step is left out
        st = run["per_step"][1]
        close_(m["wall_s"], st["wall_s"], eps=1e-3)
        eq_(m["tokens"], st["prompt_tokens"] + st["completion_tokens"])
        # wall_s is stored rounded to 0.1 ms: on a fast step the ratio carries a relative error up to 5e-5 / wall_s
        close_(m["tokens_per_s"], m["tokens"] / m["wall_s"], eps=0.5 + 1e-3 * m["tokens_per_s"])
        assert 0 < m["mfu"] < 1 and 0 < m["mfu_generation"] < 1 and 0 < m["mfu_forward_backward"] < 1, m
        N = run["lm_matmul_params"]  # the MFU formula, recomputed from the report's own fields
        close_(m["mfu"], 8 * N * m["tokens"] / (m["wall_s"] * 1e12), eps=0.02 * m["mfu"])
        close_(sum(m["phases_s"].values()), m["wall_s"], eps=1e-3)
        mem = run["memory"]
        assert mem["peak_allocated_GiB"] is None and mem["peak_reserved_GiB"] is None  # no GPU in a CPU run
        assert mem["process_peak_rss_GiB"] > 0
        assert 0 < run["lm_matmul_params"] < run["params"]
    lora, full = r["runs"]["srpo_lora"]["trainer_setup"], r["runs"]["srpo_full"]["trainer_setup"]
    eq_(full["trainable_dtypes"], ["float32"])                     # fp32 master weights for full fine-tuning
    eq_(r["runs"]["srpo_full"]["precision"]["weights"], "float32")
    assert 0 < lora["trainable_params"] < full["trainable_params"]   # LoRA trains adapters only
    eq_(r["runs"]["bare_lora"]["trainer"], "trl.GRPOTrainer")
    # the same data and batch under both trainers: identical prompt tokens at every step
    eq_([st["prompt_tokens"] for st in r["runs"]["srpo_lora"]["per_step"]],
            [st["prompt_tokens"] for st in r["runs"]["bare_lora"]["per_step"]])
    o = r["overhead"]
    assert o["ratio_s_per_step"] > 0 and o["ratio_s_per_token"] > 0
    close_(o["ratio_s_per_step"], r["runs"]["srpo_lora"]["summary"]["s_per_step"]
               / r["runs"]["bare_lora"]["summary"]["s_per_step"], eps=1e-3)
    assert r["mfu_formula"].startswith("(2*N*T + 6*N*T) / (wall_s * peak_tflops * 1e12)")


def test_smoke_prints_benchmarks_rows(smoke):
    r, out, wall, d = smoke
    assert "BENCHMARKS.md rows (CPU smoke run: not GPU figures)" in out
    rows = [l for l in r["benchmarks_md"].splitlines() if l.startswith("| srpo_") or l.startswith("| bare_")]
    eq_(len(rows), 3)
    for l in rows: eq_(l.count("|"), 10)
    assert r["benchmarks_md"] in out
    assert not (d / "work" / "srpo_full").exists()  # the runs' folders (a full model's save) are removed
    assert wall < 300, f"the smoke run took {wall:.0f}s"


def test_phase_clock_nested_regions():
    gc = load_script()
    clock = gc.PhaseClock(cuda=False)
    clock.mark()
    clock.start("forward_backward"); time.sleep(0.02)
    clock.start("generation"); time.sleep(0.05); clock.stop("generation")
    clock.stop("forward_backward")
    clock.end_step()
    st = clock.steps[0]
    assert st["generation"] >= 0.05 and st["forward_backward"] >= 0.02
    assert st["forward_backward"] < 0.02 + (st["wall_s"] - 0.05)  # the nested generation time is not counted twice
    close_(st["generation"] + st["forward_backward"] + st["scoring"] + st["optimizer"] + st["other"], st["wall_s"],
               eps=1e-9)
    clock.start("scoring")
    fail_(lambda: clock.stop("optimizer"), contains="interleave")


def test_instrument_restores_the_class():
    gc = load_script()

    class T:
        def _generate(self, prompts): return [[1, 2]] * len(prompts), [[3, 4, 5]] * len(prompts)
        def training_step(self, x): return self._prepare_inputs(x)
        def _prepare_inputs(self, x): return self._generate_and_score_completions(x)
        def _generate_and_score_completions(self, x): return self._generate(x)
        def _clip_grad_norm(self, model): return 0.0
    own = dict(T.__dict__)
    clock = gc.PhaseClock(cuda=False)
    clock.mark()
    with clock.instrument(T):
        T().training_step(["a", "b"])
    clock.end_step()
    st = clock.steps[0]
    eq_((st["prompt_tokens"], st["completion_tokens"], st["responses"]), (4, 6, 2))
    for k in ("generation", "scoring", "forward_backward"): assert st[k] > 0, k
    eq_({k: T.__dict__[k] for k in own if not k.startswith("__")}, {k: v for k, v in own.items() if not k.startswith("__")})


def test_peak_and_pins():
    gc = load_script()
    eq_(gc.peak_tflops("NVIDIA H200", None), 989.0)
    eq_(gc.peak_tflops("NVIDIA H100 PCIe", None), 756.0)
    eq_(gc.peak_tflops("NVIDIA H100 80GB HBM3", None), 989.0)
    eq_(gc.peak_tflops("Some GPU", None), None)
    eq_(gc.peak_tflops("Some GPU", 100), 100.0)
    pins = gc.read_pins(ROOT / "constraints-gpu.txt")
    for p in ("torch", "transformers", "trl", "peft", "datasets", "accelerate"): assert p in pins, p


def test_bad_arguments_are_named():
    p = run_script("--runs", "srpo_lora,nope", "--size", "tiny", "--device", "cpu", timeout=120)
    assert p.returncode == 2 and "nope" in p.stderr
    p = run_script("--steps", "0", "--size", "tiny", "--device", "cpu", timeout=120)
    assert p.returncode == 2 and "--steps" in p.stderr


def test_preflight_on_cpu():
    p = run_script("--preflight", "--size", "tiny", "--device", "cpu", timeout=300)
    lines = p.stdout.splitlines()
    assert any(l.startswith("[ok] hub offline") for l in lines), p.stdout
    assert any(l.startswith("[info] GPU: skipped") for l in lines), p.stdout
    for pkg in ("transformers", "trl", "peft", "datasets", "accelerate"):
        assert any(l.split(":")[0].endswith(f"] {pkg}") for l in lines), pkg
    failed = [l for l in lines if l.startswith("[FAIL]")]
    eq_(p.returncode, 1 if failed else 0)
    eq_(lines[-1].startswith("preflight: NOT ready") if failed else lines[-1] == "preflight: ready", True)
