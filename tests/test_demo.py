"""A shortened `srpo demo` through the console script: every section of the report is filled from the run."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SECTIONS = ("## What a model this size can and cannot learn", "## Stages", "## Held-out evaluation", "## Reflection data",
            "## SFT loss", "## GRPO curves", "## Sample completions (held-out questions)", "## Checks")
PNGS = ("sft_loss.png", "grpo_reward_components.png", "grpo_response_length.png", "grpo_transitions.png", "question_1.png")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    env = dict(os.environ, SRPO_NB_HOME=str(tmp / "home"), OMP_NUM_THREADS="1")
    exe = Path(sys.executable).with_name("srpo")
    run = tmp / "demo"
    out = subprocess.run([str(exe), "demo", "--out-dir", str(run), "--sft-steps", "6", "--grpo-steps", "3",
                          "--max-new-tokens", "24", "--n-heldout", "4"], env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return run, out, json.loads((run / "demo.json").read_text())


def test_record_holds_every_stage(demo_run):
    run, out, rec = demo_run
    assert rec["sft"]["steps"] == 6 and rec["grpo"]["steps"] == 3 and rec["reflection_data"]["rows"] == 32
    for stage in ("problems", "reflection_data", "sft", "grpo", "eval", "report", "total"):
        assert isinstance(rec["seconds"][stage], float) and rec["seconds"][stage] >= 0, stage
    for stage in ("reflection_data", "sft", "grpo"): assert rec[stage]["seconds"] == rec["seconds"][stage]
    assert rec["seconds"]["total"] >= rec["seconds"]["grpo"] + rec["seconds"]["sft"]
    for policy in ("base", "sft", "srpo"):
        e = rec["eval"][policy]
        assert e["n"] == 4 and 0 <= e["format_ok_rate"] <= 1 and isinstance(e["mean_reward"], float)
    assert rec["grpo"]["steps_logged"] == 3 and rec["grpo"]["filter"]["groups"] == 3 * 2
    assert set(rec["checks"]) == {"sft_format_above_base", "grpo_keeps_groups", "grpo_reward_rises", "srpo_reward_above_sft"}
    assert len(rec["samples"]) == 3 and all(set(s["completions"]) == {"base", "sft", "srpo"} for s in rec["samples"])


def test_report_sections_are_filled_from_the_run(demo_run):
    run, out, rec = demo_run
    md = (run / "report" / "report.md").read_text()
    pos = [md.find(s) for s in SECTIONS]
    assert all(p >= 0 for p in pos) and pos == sorted(pos), [s for s, p in zip(SECTIONS, pos) if p < 0]
    body = lambda s: md[md.find(s) + len(s):][:md[md.find(s) + len(s):].find("\n## ")]
    for s in SECTIONS: assert len(body(s).strip()) > 20, s
    evaluation = body("## Held-out evaluation")
    for policy in ("base", "sft", "srpo"):
        e = rec["eval"][policy]
        assert re.search(rf"\| {policy} \| 4 \| {e['format_ok_rate']:.3f} \| {e['mean_reward']:.3f} \|", evaluation), policy
    assert f"loss {rec['sft']['first_loss']:.3f} → {rec['sft']['last_loss']:.3f}" in md
    assert rec["reflection_data"]["example_target"].split("</think>")[0][len("<think>"):][:20].replace("`", "'") in md
    assert "**reflection**" in body("## Reflection data") and "**think 2**" in body("## Reflection data")
    assert md.count("**srpo**") == 3 and "None" not in body("## Held-out evaluation")
    for png in PNGS:
        assert (run / "report" / png).stat().st_size > 1000 and f"{png}" in md, png
    page = (run / "report" / "report.html").read_text()
    assert page.count("<img") == 4 + 3 and "<b>reflection</b>" in page and f"{rec['eval']['srpo']['mean_reward']:.3f}" in page


def test_console_is_quiet_and_names_the_report(demo_run):
    run, out, rec = demo_run
    lines = out.stdout.splitlines()
    assert lines[-2] == f"report: {run / 'report' / 'report.html'}"
    assert sum(l.startswith("step ") and "reward" in l for l in lines) == 3      # GRPO: one line per step
    assert 1 <= sum(l.startswith("step ") and "loss" in l for l in lines) <= 6    # SFT: at most one per step
    noise = [l for l in (out.stdout + out.stderr).splitlines()
             if re.search(r"Loading weights|Writing model|Generating train split|Map:|Warning|warn|\[transformers\]|PAD/BOS/EOS", l, re.I)]
    assert not noise, noise[:5]
    assert len(lines) < 80, len(lines)


@pytest.mark.parametrize("url", [None, "http://127.0.0.1:8000/v1"])
def test_teacher_url_reaches_stage_1a(tmp_path, monkeypatch, url):
    import srpo_nb.demo as demo
    import srpo_nb.reflection_data as rd
    class Stop(Exception): pass
    seen = {}
    def capture(cfg, *a, **k): seen["cfg"] = cfg; raise Stop()
    monkeypatch.setenv("SRPO_NB_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(rd, "build_reflection_data", capture)
    monkeypatch.setattr(demo, "ask_policy", lambda *a, **k: {})
    with pytest.raises(Stop):
        demo.run_demo(out_dir=str(tmp_path / "demo"), n_train=4, n_heldout=1, reflection_rows=2, teacher_url=url,
                      teacher_model="qwen-teacher", api_key_env="MY_KEY", verbose=False)
    cfg = seen["cfg"]
    assert (cfg.second_think, cfg.total, cfg.num_problems, cfg.max_new_tokens) == (True, 2, 2, 8)
    if url is None: assert cfg.teacher == "template_short"
    else: assert (cfg.teacher, cfg.teacher_base_url, cfg.teacher_model, cfg.api_key_env) == ("openai", url, "qwen-teacher", "MY_KEY")
