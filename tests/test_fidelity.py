"Fidelity to the paper and its released code: one test (or more) per behaviour, each failing on the earlier defaults."
import re

import pytest

from srpo_nb import format as F
from srpo_nb.format import (COT_PROMPT, PROMPT_INSTRUCTIONS, PROMPTS, RL_EXAMPLE, RL_SYSTEM_PROMPT, SFT_SYSTEM_PROMPT,
                            extract_boxed, missing_instructions, parse_completion, read_prompt, render_sft_target)


# ---------------------------------------------------------------- prompts (App. B.4 and the released scripts)
@pytest.mark.parametrize("kind", list(PROMPT_INSTRUCTIONS))
def test_prompts_carry_every_instruction(kind):
    assert missing_instructions(PROMPTS[kind], kind) == []


def test_rl_prompt_latex_and_worked_example():
    assert re.search(r"LaTeX between \$ and \$", RL_SYSTEM_PROMPT)
    ex = parse_completion(RL_EXAMPLE)
    assert ex.ok and RL_SYSTEM_PROMPT.endswith(RL_EXAMPLE)
    assert len(ex.think2.split()) > 2 * len(ex.think1.split())           # the second pass is the more detailed one
    assert "should" in ex.reflection and "no change" not in ex.reflection   # the reflection finds something to improve
    assert extract_boxed(ex.answer1) == extract_boxed(ex.answer2) == "12"
    assert ex.answer1.startswith("$") and ex.answer1.endswith("$")


def test_cot_prompt_asks_for_bare_letter_or_number():
    from srpo_nb.reflection_data import policy_prompt
    from srpo_nb.data import shipped_problems
    system = policy_prompt(shipped_problems("train")[0])["messages"][0]["content"][0]["text"]
    assert "\\boxed" not in system and "option letter" in system and "a number" in system
    assert missing_instructions(system, "cot") == []


def test_missing_instructions_names_what_is_missing():
    assert "answers in LaTeX between $...$" in missing_instructions("Write mathematics in LaTeX. <think>", "rl")


def test_read_prompt(tmp_path):
    f = tmp_path / "p.txt"; f.write_text("My own words.\n")
    assert read_prompt(str(f)) == "My own words." and read_prompt(None, "x") == "x" and read_prompt("none", "x") is None
    with pytest.raises(FileNotFoundError, match="prompt file not found"): read_prompt(str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match="neither one of"): read_prompt("rlx")


# ---------------------------------------------------------------- the SFT target's final answer
def test_sft_target_final_answer_is_the_gold_as_given():
    t = render_sft_target("3 + 4 = 8", "8", "3 + 4 is 7.", "7")
    assert t.endswith("<answer>7</answer>") and parse_completion(t, "sft").ok
    assert render_sft_target("c", "a", "r", "7", box_gold=True).endswith("<answer>$\\boxed{7}$</answer>")
    assert "\\boxed" not in SFT_SYSTEM_PROMPT and "\\boxed" not in COT_PROMPT


# ---------------------------------------------------------------- the paper's 7B ablations as config files
ABLATIONS = sorted((__import__("pathlib").Path(F.__file__).parent / "configs" / "ablations").glob("*.yaml"))
ROWS = {"srpo_full": "53.5", "grpo_baseline": "49.8", "reflection_sft": "46.6", "no_reflection_sft": "51.2",
        "no_f_len": "53.1", "no_i_eff": "52.0", "alpha_0.05": "52.9", "alpha_0.3": "52.2", "reflection_data": "n/a"}


def _header(path) -> dict:
    return dict(re.match(r"# (row|paper average|stage|run): (.*)", l).groups() for l in path.read_text().splitlines()[:4])


def test_every_ablation_row_has_a_config():
    assert {p.stem for p in ABLATIONS} == set(ROWS)


@pytest.mark.parametrize("path", ABLATIONS, ids=lambda p: p.stem)
def test_ablation_config_loads_as_the_cli_loads_it(path):
    "Each file names its row and stage, and loads with that stage's `--config` (Config.from_file: unknown fields fail)."
    from srpo_nb.grpo import GRPOTrainConfig
    from srpo_nb.reflection_data import ReflectionDataConfig
    from srpo_nb.rewards import RewardConfig, srpo_reward
    from srpo_nb.sft import SFTConfig
    h = _header(path)
    assert h["paper average"] == ROWS[path.stem] and h["row"]
    cls = {"grpo": GRPOTrainConfig, "sft": SFTConfig, "reflect": ReflectionDataConfig}[h["stage"]]
    assert h["run"] == f"srpo {'data reflect' if h['stage'] == 'reflect' else h['stage']} --config srpo_nb/configs/ablations/{path.name}"
    cfg = cls.from_file(path)
    out = getattr(cfg, "output_dir", None) or getattr(cfg, "out_dir")
    assert out == f"runs/ablations/{path.stem}"
    if h["stage"] != "grpo": return
    rc = RewardConfig.from_dict({"variant": cfg.reward, **cfg.reward_config})
    five = ("<think>2 + 3</think><answer>$\\boxed{5}$</answer><reflection>check</reflection>"
            "<think>2 + 3 = 5</think><answer>$\\boxed{5}$</answer>")
    bd = srpo_reward(five, "5", config=rc, count_tokens=lambda s: 0)
    want = {"no_f_len": ("alpha", 0.0), "alpha_0.05": ("alpha", 0.05), "alpha_0.3": ("alpha", 0.3), "srpo_full": ("alpha", 0.1)}
    if path.stem in want: assert rc.alpha == want[path.stem][1]
    if path.stem == "no_i_eff": assert bd.effectiveness == 0.0 and rc.alpha == 0.1
    else: assert bd.effectiveness == (0.25 if cfg.reward == "paper" else 0.0)
    from_sft = cfg.model == "runs/ablations/reflection_sft/final"
    assert from_sft == (path.stem not in ("grpo_baseline", "no_reflection_sft"))
    assert (cfg.reward, cfg.system_prompt) == (("grpo", "think_answer") if path.stem == "grpo_baseline" else ("paper", "auto"))
