"Fidelity to the paper and its released code: one test (or more) per behaviour, each failing on the earlier defaults."
import re

import pytest

from srpo_nb import format as F   # names are looked up inside each test, so each fails on its own where it is missing


# ---------------------------------------------------------------- prompts (App. B.4 and the released scripts)
@pytest.mark.parametrize("kind", ["rl", "sft", "cot", "teacher"])
def test_prompts_carry_every_instruction(kind):
    from srpo_nb.reflection_data import REFLECTION_PROMPT
    text = REFLECTION_PROMPT if kind == "teacher" else F.PROMPTS[kind]
    assert F.missing_instructions(text, kind) == []


def test_rl_prompt_latex_and_worked_example():
    assert re.search(r"LaTeX between \$ and \$", F.RL_SYSTEM_PROMPT)
    ex = F.parse_completion(F.RL_EXAMPLE)
    assert ex.ok and F.RL_SYSTEM_PROMPT.endswith(F.RL_EXAMPLE)
    assert len(ex.think2.split()) > 2 * len(ex.think1.split())           # the second pass is the more detailed one
    assert "should" in ex.reflection and "no change" not in ex.reflection   # the reflection finds something to improve
    assert F.extract_boxed(ex.answer1) == F.extract_boxed(ex.answer2) == "12"
    assert ex.answer1.startswith("$") and ex.answer1.endswith("$")


def test_cot_prompt_asks_for_bare_letter_or_number():
    from srpo_nb.reflection_data import policy_prompt
    from srpo_nb.data import shipped_problems
    system = policy_prompt(shipped_problems("train")[0])["messages"][0]["content"][0]["text"]
    assert "\\boxed" not in system and "option letter" in system and "a number" in system
    assert F.missing_instructions(system, "cot") == []


def test_missing_instructions_names_what_is_missing():
    assert "answers in LaTeX between $...$" in F.missing_instructions("Write mathematics in LaTeX. <think>", "rl")


def test_read_prompt(tmp_path):
    f = tmp_path / "p.txt"; f.write_text("My own words.\n")
    assert F.read_prompt(str(f)) == "My own words." and F.read_prompt(None, "x") == "x" and F.read_prompt("none", "x") is None
    with pytest.raises(FileNotFoundError, match="prompt file not found"): F.read_prompt(str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match="neither one of"): F.read_prompt("rlx")


# ---------------------------------------------------------------- the SFT target's final answer
def test_sft_target_final_answer_is_the_gold_as_given():
    t = F.render_sft_target("3 + 4 = 8", "8", "3 + 4 is 7.", "7")
    assert t.endswith("<answer>7</answer>") and F.parse_completion(t, "sft").ok
    assert F.render_sft_target("c", "a", "r", "7", box_gold=True).endswith("<answer>$\\boxed{7}$</answer>")
    assert "\\boxed" not in F.SFT_SYSTEM_PROMPT and "\\boxed" not in F.COT_PROMPT


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
    from srpo_nb.grpo import reflection_sft_status
    if path.stem == "no_reflection_sft": assert reflection_sft_status(cfg)["ablation"] == "w/o reflection SFT"


# ---------------------------------------------------------------- stage 1a: the answerable filter
class _FixedPolicy:
    "A generation backend that answers every prompt with the same think/answer text (no model)."
    def generate(self, prompts, n=1, **kw): return [["<think>I read the figure.</think><answer>3</answer>"] for _ in prompts]


def test_stage_1a_applies_the_answerable_filter_and_counts_it(tmp_path):
    from srpo_nb.data import generate_problems
    from srpo_nb.reflection_data import ReflectionDataConfig, build_reflection_data, format_summary
    problems = generate_problems(12, seed=0)
    free_text = [p.id for p in problems if p.answer == "9\\pi"]
    assert len(free_text) == 1
    cfg = ReflectionDataConfig.from_dict(preset="tiny", out_dir=str(tmp_path / "on"), total=11, progress=False)
    ds, summary = build_reflection_data(cfg, problems=problems, generator=_FixedPolicy())
    assert summary["answerable"]["kept"] == 11 and summary["answerable"]["dropped"] == {"answer is expression": 1}
    assert summary["problems"] == 11 and free_text[0] not in ds["id"]
    assert "answerable filter: kept 11 of 12; dropped 1 (answer is expression)" in format_summary(summary)
    off = cfg.replace(out_dir=str(tmp_path / "off"), filter_answerable=False, total=12)
    ds_off, s_off = build_reflection_data(off, problems=problems, generator=_FixedPolicy())
    assert s_off["answerable"] is None and free_text[0] in ds_off["id"] and "answerable filter: off" in format_summary(s_off)


def test_stage_1a_prompt_files(tmp_path):
    from srpo_nb.data import generate_problems
    from srpo_nb.reflection_data import ReflectionDataConfig, build_reflection_data
    (tmp_path / "cot.txt").write_text("Answer briefly, in <think> and <answer>.")
    (tmp_path / "sft.txt").write_text("Two rounds, please.")
    seen = []
    class Spy(_FixedPolicy):
        def generate(self, prompts, n=1, **kw):
            seen.extend(p["messages"][0]["content"][0]["text"] for p in prompts); return super().generate(prompts, n, **kw)
    cfg = ReflectionDataConfig.from_dict(preset="tiny", out_dir=str(tmp_path / "run"), total=2, progress=False,
                                         policy_prompt=str(tmp_path / "cot.txt"), sft_prompt=str(tmp_path / "sft.txt"))
    ds, _ = build_reflection_data(cfg, problems=generate_problems(3, seed=0), generator=Spy())
    assert set(seen) == {"Answer briefly, in <think> and <answer>."}
    assert {m[0]["content"][0]["text"] for m in ds["messages"]} == {"Two rounds, please."}
    assert all(m[2]["content"][0]["text"].endswith(f"<answer>{g}</answer>") for m, g in zip(ds["messages"], ds["gold"]))


# ---------------------------------------------------------------- GRPO: the filter's signal
def _five(a1, a2):
    return (f"<think>Read the bars.</think><answer>$\\boxed{{{a1}}}$</answer><reflection>Check the reading.</reflection>"
            f"<think>Read the bars again, one by one.</think><answer>$\\boxed{{{a2}}}$</answer>")


def test_filter_averages_the_variants_accuracy_by_default():
    "A group of 4 R->R and 4 W->R: the code variant's accuracy (0.75/1) keeps it; final-answer correctness drops it."
    import torch
    from srpo_nb.grpo import GRPOTrainConfig, build_reward_funcs, filter_function, online_filter
    assert GRPOTrainConfig().filter_on == "accuracy"
    group = [[{"role": "assistant", "content": _five(9, 9)}]] * 4 + [[{"role": "assistant", "content": _five(8, 9)}]] * 4
    def mean_and_kept(cfg):
        f = filter_function(cfg, build_reward_funcs(cfg)[0])
        v = f(completions=group, answer=["9"] * 8)
        return sum(v) / 8, bool(online_filter(torch.tensor(v), 8)[0].all())
    assert mean_and_kept(GRPOTrainConfig(reward="code")) == (0.875, True)
    assert mean_and_kept(GRPOTrainConfig(reward="code", filter_on="final_correct")) == (1.0, False)
    assert mean_and_kept(GRPOTrainConfig(reward="paper")) == (0.5, True)   # R_accuracy of the first answer, over 0.5


# ---------------------------------------------------------------- GRPO: the image budget and the dropped problems
def test_grpo_image_budget_and_dropped_problems_named(capsys):
    import dataclasses
    from srpo_nb.data import shipped_problems
    from srpo_nb.grpo import GRPOTrainConfig, grpo_dataset, grpo_row, image_tokens
    from srpo_nb.models import build_qwen_tokenizer, build_tiny_processor
    from srpo_nb.sft import SFTConfig
    assert GRPOTrainConfig().max_pixels == 640 * 28 * 28 and SFTConfig().max_pixels == 512 * 512
    proc = build_tiny_processor(build_qwen_tokenizer(), max_pixels=640 * 28 * 28)
    p = shipped_problems("train")[0]
    big = dataclasses.replace(p, images=[p.images[0].resize((1600, 1200))])
    img = grpo_row(big, F.RL_SYSTEM_PROMPT, proc)["images"][0]
    assert img.size == (812, 588) and image_tokens(img, proc) == 29 * 21 <= 640   # smart_resize: sides multiples of 28
    enc = proc(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[img], return_tensors="pt")
    assert int((enc["input_ids"] == proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum()) == 609  # the processor agrees
    wide = build_tiny_processor(build_qwen_tokenizer(), max_pixels=12_845_056)   # a backend left at the checkpoint's budget
    enc = wide(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[img], return_tensors="pt")
    assert int((enc["input_ids"] == wide.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum()) == 609   # resizes no further
    problems = shipped_problems("train")[:16]
    _, rep = grpo_dataset(problems, F.RL_SYSTEM_PROMPT, proc, max_prompt_length=1024)
    _, rep2 = grpo_dataset(problems, F.RL_SYSTEM_PROMPT, proc, max_prompt_length=rep["max_prompt_tokens"] - 1)
    out = capsys.readouterr().out
    assert rep2["dropped_too_long"] >= 1 and len(rep2["dropped_ids"]) == rep2["dropped_too_long"]
    assert f"GRPO data: dropped {rep2['dropped_too_long']} of 16 problems" in out and rep2["dropped_ids"][0] in out


# ---------------------------------------------------------------- each stage's config takes a prompt file
def test_grpo_and_sft_configs_take_a_prompt_file(tmp_path):
    from srpo_nb.grpo import GRPOTrainConfig
    from srpo_nb.sft import SFTConfig
    f = tmp_path / "mine.txt"; f.write_text("My own instructions.\n")
    assert GRPOTrainConfig(system_prompt=str(f)).prompt_text() == "My own instructions."
    assert SFTConfig(system_prompt=str(f)).system_prompt == str(f)
    with pytest.raises(FileNotFoundError, match="prompt file not found"): GRPOTrainConfig(system_prompt=str(tmp_path / "x.txt"))
    with pytest.raises(FileNotFoundError, match="prompt file not found"): SFTConfig(system_prompt=str(tmp_path / "x.txt"))


# ---------------------------------------------------------------- GRPO from a policy without reflection SFT
def test_grpo_without_reflection_sft_is_named_the_ablation(tmp_path):
    from srpo_nb.grpo import GRPOTrainConfig, reflection_sft_status, without_sft_message
    from srpo_nb.sft import read_stage_marker, write_stage_marker
    sft = tmp_path / "sft_final"
    write_stage_marker(sft, "reflection_sft", "Qwen/Qwen2.5-VL-7B-Instruct", dataset="rows.parquet")
    assert read_stage_marker(sft)["stages"] == ["reflection_sft"]
    assert reflection_sft_status(GRPOTrainConfig(model=str(sft)))["ablation"] is None
    assert reflection_sft_status(GRPOTrainConfig())["ablation"] == "w/o reflection SFT"            # the base model
    assert reflection_sft_status(GRPOTrainConfig(reward="grpo"))["ablation"] is None              # plain GRPO: by design
    assert reflection_sft_status(GRPOTrainConfig(from_reflection_sft=True))["ablation"] is None
    assert "w/o reflection SFT" in without_sft_message("Qwen/Qwen2.5-VL-7B-Instruct")
    write_stage_marker(tmp_path / "grpo_final", "grpo", str(sft))
    assert read_stage_marker(tmp_path / "grpo_final")["stages"] == ["reflection_sft", "grpo"]


def test_eval_config_takes_a_prompt_file(tmp_path):
    from srpo_nb.eval import EvalConfig, EvalItem, eval_prompt
    f = tmp_path / "mine.txt"; f.write_text("Answer with the option letter only.\n")
    assert EvalConfig(prompt=str(f)).prompt == str(f)
    msgs = eval_prompt(EvalItem("generated", "q0", "What is shown?", [], {}), str(f))["messages"]
    assert msgs[0]["content"][0]["text"] == "Answer with the option letter only."
    with pytest.raises(ValueError, match="is not one of .* nor an existing text file"): EvalConfig(prompt=str(tmp_path / "x.txt"))
