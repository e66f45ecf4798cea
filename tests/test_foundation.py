"""Foundation checks that span files: the README's commands are what CI runs, the console script works,
and the tiny model with the real Qwen2 vocabulary goes through the same load/generate path."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
    return [b.strip() for b in blocks[:2]]


def test_readme_commands_are_what_ci_runs():
    setup, tests = _readme_commands()
    assert "srpo demo" in setup and "nbdev_test" in tests and "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert setup in ci and tests in ci
    assert ci.index(setup) < ci.index(tests)
    index = (ROOT / "nbs" / "index.ipynb").read_text()
    assert setup.replace('"', '\\"') in index and tests in index


def test_srpo_console_script(tmp_path):
    env = dict(os.environ, SRPO_NB_HOME=str(tmp_path))
    exe = Path(sys.executable).with_name("srpo")
    run = tmp_path / "demo"
    out = subprocess.run([str(exe), "demo", "--max-new-tokens", "8", "--sft-steps", "2", "--grpo-steps", "1",
                          "--out-dir", str(run)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "question" in out.stdout and "format ok" in out.stdout and "Stage 2: GRPO" in out.stdout
    rec = json.loads((run / "demo.json").read_text())
    assert rec["sft"]["steps"] == 2 and rec["grpo"]["steps"] == 1 and rec["reflection_data"]["rows"] > 0
    assert (tmp_path / "models" / "tiny-qwen25vl-small-seed0" / "config.json").exists()
    bad = subprocess.run([str(exe), "nonsense"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown subcommand" in bad.stderr


def test_tiny_model_with_real_qwen_vocab(tmp_path):
    pytest.importorskip("dashscope")
    pytest.importorskip("tiktoken")
    from PIL import Image

    from srpo_nb.format import make_messages
    from srpo_nb.models import HFGenerator, build_tiny_qwen25vl, load_policy

    path = build_tiny_qwen25vl(tmp_path / "tiny-qwen", vocab="qwen")
    model, processor = load_policy(path, device="cpu")
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>"]) == [151644, 151645, 151652, 151655]
    assert model.config.image_token_id == 151655 and model.config.text_config.vocab_size == len(tok) == 151665
    prompt = {"messages": make_messages("What colour is the square?", 1), "images": [Image.new("RGB", (64, 64), "red")]}
    out = HFGenerator(model, processor).generate([prompt], n=1, max_new_tokens=5, temperature=0)
    assert len(out) == 1 and isinstance(out[0][0], str)
