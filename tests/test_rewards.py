"""srpo_nb.rewards (and the checker in srpo_nb.answers) tested to destruction: the paper's and the code's case totals, both variants' rules, the answer checker, reward
hacking probes, bounded time, threads, TRL compatibility, and hypothesis fuzzing (CI-sized; the 100k run is slow)."""
import math
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from srpo_nb import answers as ANS  # the checker lives there; rewards re-exports its names
from srpo_nb import rewards as R
from srpo_nb.rewards import (RewardConfig, check_answer, code_format_ok, f_len, grade_answer, make_reward_funcs,
                             reward_bounds, reward_weights, srpo_reward, transition_counts)

ZERO = lambda s: 0   # f_len = 0: totals are exactly the case totals before the 0.1·f_len term


def five(a1, a2, think="Count: 2 + 3.", refl="Check the sum.", think2=None, sep="\n"):
    return sep.join([f"<think>{think}</think>", f"<answer>$\\boxed{{{a1}}}$</answer>", f"<reflection>{refl}</reflection>",
                     f"<think>{think2 if think2 is not None else think}</think>", f"<answer>$\\boxed{{{a2}}}$</answer>"])


CASES = {"R->R": five(5, 5), "W->R": five(6, 5), "R->W": five(5, 6), "W->W": five(6, 7)}
PAPER = {"R->R": 1.5, "W->R": 1.25, "R->W": 1.0, "W->W": 0.75}   # Eqs. 4-7 of the paper (nbs/00b_method.ipynb)
CODE = {"W->R": 1.5, "R->R": 1.25, "R->W": 0.75, "W->W": 0.5}    # the released code's reward (nbs/00b_method.ipynb)


# ---------------------------------------------------------------- the method's tables
@pytest.mark.parametrize("variant,table", [("paper", PAPER), ("code", CODE)])
@pytest.mark.parametrize("case", list(CASES))
def test_case_totals_before_length(variant, table, case):
    bd = srpo_reward(CASES[case], "5", variant=variant, count_tokens=ZERO)
    assert bd.transition == case and bd.length == 0.0
    assert bd.total == pytest.approx(table[case], abs=1e-12)


def sized(ratio: float, variant="paper"):
    "A five-block completion whose L is exactly ratio * B under count_tokens=len (characters)."
    think, ans = "t" * 201, "$\\boxed{5}$"   # B = 212: every ratio below gives a whole L
    B = len(think) + len(ans)
    base = five(5, 5, think=think, refl="r", think2="u")
    pad = round(ratio * B) - len(base)
    assert pad >= 0, ratio
    text = five(5, 5, think=think, refl="r" + "r" * pad, think2="u")
    assert len(text) == round(ratio * B)
    return text, B


@pytest.mark.parametrize("ratio,want", [(2.0, 1.0), (2.5, math.exp(-1)), (3.0, math.exp(-4)), (2.25, math.exp(-0.25))])
@pytest.mark.parametrize("variant,table", [("paper", PAPER), ("code", CODE)])
def test_case_totals_with_length(ratio, want, variant, table):
    text, B = sized(ratio)
    bd = srpo_reward(text, "5", variant=variant, count_tokens=len)
    assert (bd.B, bd.L) == (B, round(ratio * B))
    assert bd.length == pytest.approx(want, rel=1e-12)
    assert bd.total == pytest.approx(table["R->R"] + 0.1 * want, abs=1e-12)


def test_f_len_examples_from_srpo_md():
    assert f_len(100, 100) == pytest.approx(math.exp(-4)) == pytest.approx(0.0183, abs=1e-4)
    assert f_len(200, 100) == 1.0
    assert f_len(250, 100) == pytest.approx(math.exp(-1)) == pytest.approx(0.368, abs=1e-3)
    assert f_len(300, 100) == pytest.approx(0.0183, abs=1e-4)
    assert f_len(0, 0) == f_len(5, -1) == 0.0 and f_len(1e300, 1) == 0.0


def test_variants_order_wr_and_rr_oppositely():
    p = {c: srpo_reward(t, "5", count_tokens=ZERO).total for c, t in CASES.items()}
    c = {c: srpo_reward(t, "5", variant="code", count_tokens=ZERO).total for c, t in CASES.items()}
    assert p["R->R"] > p["W->R"] > p["R->W"] > p["W->W"]
    assert c["W->R"] > c["R->R"] > c["R->W"] > c["W->W"]


def test_parameters_are_parameters():
    cfg = RewardConfig(alpha=0.3, target_ratio=3.0, max_ratio=4.0, effectiveness={"R->R": 1, "W->R": 2, "W->W": 0, "R->W": -1})
    text, B = sized(3.0)
    bd = srpo_reward(text, "5", count_tokens=len, config=cfg)
    assert bd.length == 1.0 and bd.effectiveness == 1 and bd.total == pytest.approx(0.5 + 0.5 + 1 + 0.25 + 0.3)
    assert srpo_reward(CASES["W->R"], "5", count_tokens=ZERO, config=cfg).effectiveness == 2
    with pytest.raises(ValueError, match="variant='x' is not one of"): srpo_reward("", "5", variant="x")
    with pytest.raises(ValueError, match="not both"): srpo_reward("", "5", count_tokens=len, tokenizer=object())


def test_tokenizer_counts_b_and_l():
    class CharTok:
        def encode(self, s, add_special_tokens=True):
            assert add_special_tokens is False
            return list(s)
    text = five(5, 5, think="abc")
    bd = srpo_reward(text, "5", tokenizer=CharTok())
    assert bd.B == len("abc") + len("$\\boxed{5}$") and bd.L == len(text)
    bd = srpo_reward("  " + text + "\n", "5")   # default counter; L is over the stripped completion
    assert bd.L == R.count_tokens_regex(text) and bd.B == R.count_tokens_regex("abc") + R.count_tokens_regex("$\\boxed{5}$")


@pytest.mark.parametrize("variant", R.VARIANTS)
@pytest.mark.parametrize("text", list(CASES.values()) + ["", "x", "<think>a</think><answer>5</answer>", five(5, 5) * 3])
def test_total_is_sum_of_terms(variant, text):
    bd = srpo_reward(text, "5", variant=variant)
    assert bd.total == pytest.approx(bd.format + bd.accuracy + bd.effectiveness + bd.reflection + bd.alpha * bd.length, abs=1e-12)
    lo, hi = reward_bounds(variant)
    assert lo <= bd.total <= hi


def test_bounds():
    assert reward_bounds("paper") == (0.0, 1.6)
    assert reward_bounds("code") == (0.0, 1.6)
    assert reward_bounds("grpo") == (0.0, 1.5)


# ---------------------------------------------------------------- the paper variant's definitions
T, A, RF, T2, A2 = "<think>t</think>", "<answer>\\boxed{5}</answer>", "<reflection>r</reflection>", "<think>u</think>", "<answer>\\boxed{5}</answer>"


# each row: the terms under the default readings (format_rule="think", effectiveness_rule="answers") and under the
# strict preset (format_rule="five_blocks", effectiveness_rule="reflection"): (format, accuracy, I_eff, I_ref)
@pytest.mark.parametrize("text,default,strict,first,final", [
    (T + A + RF + T2 + A2,                               (0.5, 0.5, 0.25, 0.25), (0.5, 0.5, 0.25, 0.25), True, True),
    ("<think>t</think><answer>\\boxed{6}</answer>" + RF + T2 + A2, (0.5, 0.0, 0.5, 0.25), (0.5, 0.0, 0.5, 0.25), False, True),
    (T + A + T2 + A2,                                    (0.5, 0.5, 0.25, 0.0), (0.0, 0.5, 0.0, 0.0), True, True),    # no reflection
    (T + A + RF + RF + T2 + A2,                          (0.5, 0.5, 0.25, 0.0), (0.0, 0.5, 0.0, 0.0), True, True),    # two reflections: not well formed
    (T + A + "<reflection><answer>5</answer></reflection>" + T2 + A2, (0.0, 0.5, 0.25, 0.0), (0.0, 0.5, 0.0, 0.0), True, True),  # tag inside
    (T + RF + A + T2 + A2,                               (0.5, 0.5, 0.25, 0.0), (0.0, 0.5, 0.0, 0.0), True, True),    # reflection before answer 1
    (T + A + "<reflection> </reflection>" + T2 + A2,     (0.5, 0.5, 0.25, 0.0), (0.0, 0.5, 0.0, 0.0), True, True),    # empty reflection
    (T + A,                                              (0.5, 0.5, 0.0, 0.0), (0.0, 0.5, 0.0, 0.0), True, None),    # think/answer only
    (T + A + RF,                                         (0.5, 0.5, 0.0, 0.25), (0.0, 0.5, 0.0, 0.25), True, None),   # stopped after reflecting
    (T + A + RF + T2 + "<answer>\\boxed{5}",             (0.0, 0.5, 0.0, 0.25), (0.0, 0.5, 0.0, 0.25), True, None),   # truncated final answer
    ("Sure. " + T + A + RF + T2 + A2,                    (0.0, 0.5, 0.25, 0.25), (0.0, 0.5, 0.25, 0.25), True, True),  # text outside: no format
    (T + A + RF + T2 + A2 + " Done.",                    (0.0, 0.5, 0.25, 0.25), (0.0, 0.5, 0.25, 0.25), True, True),
    (A + T + RF + T2 + A2,                               (0.0, 0.5, 0.25, 0.25), (0.0, 0.5, 0.25, 0.25), True, True),  # answer first: reasoning does not open
    ("<think> </think>" + A + RF + T2 + A2,              (0.0, 0.5, 0.25, 0.25), (0.0, 0.5, 0.25, 0.25), True, True),  # empty first think
    ("< think >t</ think >" + A + RF + T2 + A2,          (0.5, 0.5, 0.25, 0.25), (0.5, 0.5, 0.25, 0.25), True, True),  # the parser allows spaces
])
def test_paper_terms(text, default, strict, first, final):
    for want, cfg in ((default, RewardConfig()), (strict, RewardConfig.from_dict(preset="strict"))):
        bd = srpo_reward(text, "5", count_tokens=ZERO, config=cfg)
        assert (bd.format, bd.accuracy, bd.effectiveness, bd.reflection) == want, cfg.format_rule
        assert (bd.first_correct, bd.final_correct) == (first, final)


def test_reading_switches_change_the_reward():
    "Each switch, alone, changes the reward of one response (and the defaults are the paper's readings)."
    assert (RewardConfig().format_rule, RewardConfig().effectiveness_rule) == ("think", "answers")
    single, twice = T + A, T + A + T2 + A2
    fmt = {r: srpo_reward(single, "5", count_tokens=ZERO, config=RewardConfig(format_rule=r)).format for r in R.FORMAT_RULES}
    eff = {r: srpo_reward(twice, "5", count_tokens=ZERO, config=RewardConfig(effectiveness_rule=r)).effectiveness
           for r in R.EFFECTIVENESS_RULES}
    assert fmt == {"think": 0.5, "five_blocks": 0.0} and eff == {"answers": 0.25, "reflection": 0.0}
    for cfg in (RewardConfig(), RewardConfig.from_dict(preset="strict")):   # the table's totals hold under both readings
        assert {t: srpo_reward(c, "5", count_tokens=ZERO, config=cfg).total for t, c in CASES.items()} == PAPER


# ---------------------------------------------------------------- the code variant's rules
@pytest.mark.parametrize("text,ok", [
    (five(5, 5), True),
    ("Sure! " + five(5, 5), True),                     # text before the first <think> is allowed
    (five(5, 5) + " Done.", False),                   # nothing may follow the last </answer>
    (five(5, 5) + "\n\n", True),
    (five(5, 5, sep=""), True),
    (five(5, 5, refl=" "), True),                      # a space is content to the released regex
    (five(5, 5, refl=""), False),
    ("< think >t</ think >" + A + RF + T2 + A2, False),  # literal tags only
    (five(5, 5) + "<answer>1</answer>", False),
    (T + A + RF + A2 + T2, False),                     # order
    (T + A + RF + T2 + "x" + A2, False),               # text between blocks
    ("<think>a<think>b</think>" + A + RF + T2 + A2, False),
])
def test_code_format(text, ok):
    assert code_format_ok(text) is ok
    assert (srpo_reward(text, "5", variant="code", count_tokens=ZERO).format == 0.5) is ok


_RELEASED_STYLE = re.compile(   # the released code's test, restated in its own style (lookaheads) for comparison
    r"^(?=(?:.*<think>){2})(?=(?:.*</think>){2})(?=(?:.*<answer>){2})(?=(?:.*</answer>){2})"
    r"(?=(?:.*<reflection>){1})(?=(?:.*</reflection>){1})"
    r"(?!(?:.*<think>){3})(?!(?:.*</think>){3})(?!(?:.*<answer>){3})(?!(?:.*</answer>){3})"
    r"(?!(?:.*<reflection>){2})(?!(?:.*</reflection>){2})"
    r".*<think>(.+?)</think>\s*<answer>(.+?)</answer>\s*<reflection>(.+?)</reflection>\s*"
    r"<think>(.+?)</think>\s*<answer>(.+?)</answer>\s*$", re.DOTALL)

_SOUP = st.lists(st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "<reflection>", "</reflection>",
                                  "a", " ", "\n", "x y", "<", ">", "/"]), max_size=16).map("".join)


@settings(max_examples=1500, deadline=None, database=None)
@given(_SOUP)
def test_code_format_matches_released_regex(text):
    assert code_format_ok(text) == bool(_RELEASED_STYLE.search(text.strip()))


@settings(max_examples=1500, deadline=None, database=None)
@given(_SOUP)
def test_literal_blocks_match_findall(text):
    for tag in ("think", "answer", "reflection"):
        assert R.literal_blocks(text, tag) == re.findall(rf"<{tag}>(.*?)</{tag}>", text, re.DOTALL)


@pytest.mark.parametrize("variant", R.VARIANTS)
@pytest.mark.parametrize("text", ["<think>abc" * 50_000, "<answer>\\boxed{" * 50_000, "<" * 500_000, "< " * 400_000,
                                  "\\boxed{" * 100_000, "<think>" + "\\frac{" * 100_000, "}" * 900_000])
def test_adversarial_strings_are_linear(variant, text):
    t0 = time.perf_counter()
    bd = srpo_reward(text, "5", variant=variant)
    assert time.perf_counter() - t0 < 2.0 and bd.total <= 0.5


@pytest.mark.parametrize("text,quirk_total,intended", [
    (T + A, 0.0, 0.5),                            # lone correct answer: 0.5 in the code's table, 0 by its bug
    (A + A2, 0.0, 0.75),                          # two answers, no think
    (T + A + RF + A2, 0.0, 0.75),                 # the SFT shape: one think
    (T + A + RF + T2, 0.0, 0.5),
    ("", 0.0, 0.0),
])
def test_code_quirk(text, quirk_total, intended):
    bd = srpo_reward(text, "5", variant="code", count_tokens=ZERO)
    assert bd.total == quirk_total and "released code" in bd.note and bd.format == bd.accuracy == 0
    fixed = srpo_reward(text, "5", variant="code", count_tokens=ZERO, config=RewardConfig(code_quirk=False))
    assert fixed.total == intended


def test_code_uses_first_and_last_answer():
    text = T + "<answer>\\boxed{6}</answer>" + RF + T2 + "<answer>\\boxed{7}</answer><answer>\\boxed{5}</answer>"
    bd = srpo_reward(text, "5", variant="code", count_tokens=ZERO)
    assert (bd.transition, bd.accuracy, bd.format) == ("W->R", 1.0, 0.0)


# ---------------------------------------------------------------- the GRPO baseline
@pytest.mark.parametrize("text,total", [
    ("<think>2+3</think>\n<answer>\\boxed{5}</answer>", 1.5),
    ("Sure. <think>2+3</think><answer>\\boxed{5}</answer> Done.", 1.5),   # the released regex allows both
    ("<think>2+3</think><answer>\\boxed{6}</answer>", 0.5),
    ("<think></think><answer>\\boxed{5}</answer>", 1.0),
    ("<answer>\\boxed{5}</answer>", 1.0),
    (five(5, 5), 1.0),
    ("The answer is \\boxed{5}", 0.0),
])
def test_grpo_baseline(text, total):
    assert srpo_reward(text, "5", variant="grpo").total == total


# ---------------------------------------------------------------- the answer checker
@pytest.mark.parametrize("pred,gold,choices,kw,want", [
    ("\\boxed{16\\pi}", "16\\pi", None, {}, True),
    ("\\boxed{16 \\pi}", "16\\pi", None, {}, True),
    ("\\boxed{\\pi \\cdot 16}", "16\\pi", None, {}, True),
    ("\\boxed{50.27}", "16\\pi", None, {}, True),
    ("\\boxed{50.3}", "16\\pi", None, {}, True),
    ("\\boxed{50.2}", "16\\pi", None, {}, False),
    ("\\boxed{50}", "16\\pi", None, {}, False),
    ("\\boxed{50.27}", "16\\pi", None, {"approx_decimals": False}, False),
    ("\\boxed{1.414}", "\\sqrt{2}", None, {}, True),
    ("\\boxed{1.41}", "\\sqrt{2}", None, {}, True),
    ("\\boxed{1.4}", "\\sqrt{2}", None, {}, False),
    ("\\boxed{2\\sqrt{13}}", "\\sqrt{52}", None, {}, True),
    ("\\boxed{\\frac{1}{2}}", "0.5", None, {}, True),
    ("\\boxed{\\dfrac12}", "0.5", None, {}, True),
    ("\\boxed{1/2}", "\\frac{2}{4}", None, {}, True),
    ("\\boxed{0.333}", "\\frac{1}{3}", None, {}, True),
    ("\\boxed{0.3}", "\\frac{1}{3}", None, {}, False),
    ("\\boxed{25\\%}", "0.25", None, {}, True),
    ("\\boxed{25\\%}", "25", None, {}, True),
    ("\\boxed{0.25}", "25\\%", None, {}, True),
    ("\\boxed{25}", "0.25", None, {}, False),
    ("\\boxed{5 \\text{ cm}}", "5", None, {}, True),
    ("\\boxed{5\\,\\mathrm{cm}^2}", "5", None, {}, True),
    ("\\boxed{5 cm}", "5", None, {"use_math_verify": False}, True),
    ("\\boxed{5x}", "5", None, {}, False),
    ("\\boxed{42^\\circ}", "42", None, {}, True),
    ("\\boxed{42°}", "42", None, {}, True),
    ("\\boxed{\\$12}", "12", None, {}, True),
    ("\\boxed{12,000}", "12000", None, {}, True),
    ("\\boxed{-3}", "-3", None, {}, True),
    ("\\boxed{3}", "-3", None, {}, False),
    ("\\boxed{1.2}", "1.2", None, {"precision": 1}, True),
    ("\\boxed{1.24}", "1.2", None, {"precision": 1}, True),
    ("\\boxed{1.25}", "1.3", None, {"precision": 1}, False),   # Python rounds half to even: 1.2
    ("\\boxed{1.2}", "1.20", None, {"precision": 2.0}, True),
    ("\\boxed{1.2}", "1.2", None, {"precision": float("nan")}, True),
    ("\\boxed{100.4}", "100", None, {"abs_tol": 0.5}, True),
    ("\\boxed{101}", "100", None, {"rel_tol": 0.02}, True),
    ("\\boxed{x + 1}", "1 + x", None, {}, True),
    ("\\boxed{x = 3}", "3", None, {}, True),
    ("\\boxed{(1, 2)}", "(1,2)", None, {}, True),
    ("\\boxed{\\{2, 1\\}}", "\\{1,2\\}", None, {}, True),
    ("\\boxed{3 \\text{ or } 4}", "3", None, {}, False),
    ("\\boxed{3, 4}", "3", None, {}, False),
    ("\\boxed{\\text{square}}", "square", None, {}, True),
    ("\\boxed{Square}", "square", None, {}, True),
    # multiple choice: letter <-> option text, both directions
    ("\\boxed{B}", "square", ["triangle", "square", "circle"], {}, True),
    ("\\boxed{A}", "square", ["triangle", "square", "circle"], {}, False),
    ("\\boxed{square}", "B", ["triangle", "square", "circle"], {}, True),
    ("\\boxed{circle}", "B", ["triangle", "square", "circle"], {}, False),
    ("The answer is (B).", "B", None, {}, True),
    ("\\boxed{b}", "B", None, {}, True),
    ("\\boxed{\\text{(B)}}", "B", None, {}, True),
    ("\\boxed{B. square}", "B", ["triangle", "square"], {}, True),
    ("\\boxed{B. triangle}", "B", ["triangle", "square"], {}, False),
    ("\\boxed{A, B}", "B", None, {}, False),
    ("\\boxed{B or C}", "B", None, {}, False),
    ("\\boxed{ABCD}", "B", None, {}, False),
    ("\\boxed{0.5}", "C", ["1/4", "1/3", "1/2"], {}, True),     # option value
    ("\\boxed{C}", "1/2", ["1/4", "1/3", "1/2"], {}, True),
    ("\\boxed{2/4}", "C", ["1/4", "1/3", "1/2"], {}, True),
    ("\\boxed{E}", "B", ["1", "2"], {}, False),                    # a letter past the options
    ("\\boxed{6:35}", "B", ["6:00", "6:35", "6:30"], {}, True),
    ("\\boxed{B}", "B", "['x', 'y']", {}, True),                   # MMMU-Pro's options string
    # fallbacks and refusals
    ("so x is 5", "5", None, {}, False),                          # no box, no "answer is": the line is taken whole
    ("so the answer is 5", "5", None, {}, True),
    ("Answer: 5", "5", None, {}, True),
    ("", "5", None, {}, False),
    ("\\boxed{}", "5", None, {}, False),
    ("\\boxed{5", "5", None, {}, False),                          # unbalanced box: the short line is "\boxed{5"
    ("５", "5", None, {}, False),                                  # ASCII digits only
])
def test_check_answer(pred, gold, choices, kw, want):
    assert check_answer(pred, gold, choices, **kw) is want, grade_answer(pred, gold, choices, **kw)


def test_gold_forms():
    assert check_answer("\\boxed{5}", 5) and check_answer("\\boxed{2.5}", 2.5) and check_answer("\\boxed{5}", "$\\boxed{5}$")
    with pytest.raises(TypeError, match="gold must be a str or a number"): check_answer("5", None)
    with pytest.raises(TypeError, match="gold must be a str or a number"): check_answer("5", True)
    with pytest.raises(ValueError, match="gold is empty"): check_answer("5", "  ")
    with pytest.raises(ValueError, match="not a list literal"): check_answer("5", "5", choices="a, b")


def test_without_math_verify_never_starts_sympy():
    assert grade_answer("\\boxed{x+1}", "1+x", use_math_verify=False).how == "mismatch"
    assert grade_answer("\\boxed{7}", "7.0", use_math_verify=False).how == "numeric"


@pytest.mark.parametrize("bad", ["9^{9^{9^{9}}}", "10^{10^{10}}", "(x+1)^{3000}-(x-1)^{3000}", "\\frac{1}{" * 50 + "2" + "}" * 50,
                                 "2^{2^{2^{2^{2^{2}}}}}", "((((((((((x))))))))))^{99999999}"])
def test_pathological_answers_are_wrong_within_the_bound(bad):
    t0 = time.perf_counter()
    v = grade_answer("\\boxed{" + bad + "}", "5", timeout=1.0)
    assert not v.correct
    # the limit, plus a replacement worker's start (about a second; more on a loaded machine)
    assert time.perf_counter() - t0 < 1.0 + 10.0, v


def test_power_towers_are_refused_before_sympy():
    for bad in ["9^{9^{9}}", "2^2^2^2", "10^{10^{10}}+1", "x + 3^{4^{5}}"]:
        assert grade_answer("\\boxed{" + bad + "}", "5").how == "explosive", bad
    assert grade_answer("\\boxed{e^{x^2}}", "e^{x^{2}}").correct             # not a tower of numbers
    assert grade_answer("\\boxed{2^{2^{3}}}", "2^{2^3}").correct              # a tower in the gold is compared


def test_huge_inputs_do_not_reach_sympy():
    t0 = time.perf_counter()
    assert grade_answer("\\boxed{" + "9" * 10**6 + "}", "5").how == "too_long"
    assert grade_answer("1" * 600, "5").how == "no_answer"        # a one-line answer over 512 characters
    assert grade_answer("\\boxed{" + "1+" * 300 + "1}", "5").how == "no_answer"
    assert time.perf_counter() - t0 < 1.0


def test_worker_survives_being_killed():
    w = R.MathVerifyWorker(timeout=2.0).start()
    try:
        assert w.check("2", "2")[0]
        w._cur[0].kill(); w._cur[0].wait()
        assert w.check("2", "2")[0]               # a dead worker is replaced before the next check
        assert w.check("5", "10^{10^{10}}", timeout=0.5)[1] == "timeout"
        assert w.check("x+1", "1+x")[0] and w.stats["restarts"] == 1
    finally:
        w.close()


def test_worker_reports_a_missing_math_verify(monkeypatch):
    monkeypatch.setattr(ANS, "_WORKER_SRC", "import sys; sys.stdout.write('error ModuleNotFoundError\\n'); sys.stdout.flush()")
    w = R.MathVerifyWorker()
    with pytest.raises(RuntimeError, match="math-verify worker did not start.*pip install math-verify"):
        w.check("1", "1")


def test_checks_from_threads():
    "No signal-based timeouts: checking from worker threads works and agrees with the main thread."
    pairs = [(f"\\boxed{{{i}+x}}", f"x+{i}") for i in range(40)] + [(f"\\boxed{{{i}}}", str(i + i % 2)) for i in range(40)]
    want = [True] * 40 + [i % 2 == 0 for i in range(40)]
    R._grade.cache_clear()
    with ThreadPoolExecutor(8) as ex:
        got = list(ex.map(lambda p: check_answer(*p), pairs))
    assert got == want


def test_fork_gets_its_own_worker():
    if not hasattr(os, "fork"): pytest.skip("no fork")
    R.math_verify_worker().start()
    r, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:   # child: must not write into the parent's worker pipe
        try:
            ok = R.math_verify_worker().check("x+1", "1+x")[0]
            os.write(wfd, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(wfd)
    got = os.read(r, 1); os.waitpid(pid, 0)
    assert got == b"1"
    assert R.math_verify_worker().check("x+2", "2+x")[0]   # the parent's worker is untouched


# ---------------------------------------------------------------- reward hacking probes
HONEST = {"paper": five(5, 5), "code": five(6, 5), "grpo": "<think>2 + 3 = 5</think><answer>\\boxed{5}</answer>"}
PROBES = {   # name: (completion, exact totals paper, code, grpo with count_tokens = 0)
    "empty answers": (five("", ""), (0.75, 0.5, 0.0)),
    "no answer blocks": ("<think>2 + 3 = 5</think> So 5.", (0.0, 0.0, 0.0)),
    "answer outside tags": ("The answer is \\boxed{5}.", (0.0, 0.0, 0.0)),
    "answer after the blocks": (five(6, 6) + " Actually \\boxed{5}", (0.25, 0.0, 0.0)),
    "answer inside think": ("<think>x <answer>\\boxed{5}</answer></think><reflection>r</reflection><think>y</think>", (0.0, 0.0, 1.0)),
    "answer inside reflection": (T + "<answer>\\boxed{6}</answer><reflection><answer>\\boxed{5}</answer></reflection>" + T2 + "<answer>\\boxed{6}</answer>", (0.0, 0.0, 0.0)),
    "nested think": ("<think>a <think>b</think>" + A + RF + T2 + A2, (1.0, 0.75, 1.0)),   # format lost, nothing else
    "empty skeleton": ("<think></think><answer></answer><reflection></reflection><think></think><answer></answer>", (0.0, 0.0, 0.0)),
    "space skeleton": ("<think> </think><answer> </answer><reflection> </reflection><think> </think><answer> </answer>", (0.0, 0.5, 0.0)),
    "pasted twice": ("<answer>\\boxed{5}</answer><answer>\\boxed{5}</answer>", (0.75, 0.0, 1.0)),   # paper: R_accuracy + I_eff
    "five blocks pasted twice": (five(5, 5) + five(5, 5), (1.25, 0.75, 1.0)),   # paper: two reflections, no I_ref
    "every number": (five("1, 2, 3, 4, 5", "1, 2, 3, 4, 5"), (0.75, 0.5, 0.0)),
    "every option": (five("A, B, C, D", "A B C D"), (0.75, 0.5, 0.0)),
    "many boxes": (five(5, "5} \\boxed{6} \\boxed{7"), (1.0, 0.75, 1.0)),   # the last box counts: R->W
    "huge output": (five(5, 5, think="blah " * 200_001), (0.0, 0.0, 0.0)),
    "huge answer": (five(5, "5" + " " * 9000 + "5"), (1.0, 0.75, 1.0)),   # an over-long block is a wrong answer: R->W
    "unicode noise": (five("５", "5", refl="∑ 𝑥² — 😀 \ud800 \u202e"), (1.25, 1.5, 0.0)),
    "nul bytes": (five("\x005", "5\x00"), (1.25, 1.5, 0.0)),
}


@pytest.mark.parametrize("name", list(PROBES))
def test_reward_hacking_probes(name):
    text, want = PROBES[name]
    t0 = time.perf_counter()
    got = tuple(srpo_reward(text, "5", variant=v, count_tokens=ZERO).total for v in R.VARIANTS)
    assert got == pytest.approx(want, abs=1e-12), got
    for v in R.VARIANTS:   # with f_len on, still no more than an honest, well-formed response of the variant
        honest = srpo_reward(HONEST[v], "5", variant=v, count_tokens=len).total
        assert srpo_reward(text, "5", variant=v, count_tokens=len).total <= honest + 0.1 + 1e-9
    assert time.perf_counter() - t0 < 5


def test_choices_probe():
    ch = ["triangle", "square", "circle", "hexagon"]
    assert srpo_reward(five("B", "B"), "square", choices=ch, count_tokens=ZERO).total == 1.5
    assert srpo_reward(five("A, B, C, D", "A, B, C, D"), "square", choices=ch, count_tokens=ZERO).total == 0.75
    assert srpo_reward(five("triangle or square", "square or circle"), "B", choices=ch, count_tokens=ZERO).total == 0.75


# ---------------------------------------------------------------- TRL reward functions
def test_reward_funcs_shape_and_names():
    funcs = make_reward_funcs("code", components=R.COMPONENTS)
    names = [f.__name__ for f in funcs]
    assert len(set(names)) == len(names) and all(n.startswith("srpo_code_") for n in names)
    assert reward_weights(funcs) == [1.0] + [0.0] * (len(funcs) - 1)
    comps = [[{"role": "assistant", "content": t}] for t in CASES.values()] + ["plain string " + CASES["R->R"], [{"role": "assistant", "content": [{"type": "text", "text": CASES["W->R"]}]}]]
    kw = dict(answer=["5"] * 6, prompts=[[{"role": "user", "content": "q"}]] * 6, completion_ids=[[1]] * 6, trainer_state=None)
    out = {f.component: f(completions=comps, **kw) for f in funcs}
    assert all(len(v) == 6 and all(isinstance(x, float) for x in v) for v in out.values())
    bds = funcs[0].last_breakdowns
    assert out["total"] == [b.total for b in bds]
    assert out["w2r"] == [0.0, 1.0, 0.0, 0.0, 0.0, 1.0] and out["first_correct"] == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert transition_counts(bds) == {"W->R": 2, "R->R": 2, "R->W": 1, "W->W": 1, "none": 0}
    assert out["format"] == [0.5, 0.5, 0.5, 0.5, 0.5, 0.5]   # the code's format allows text before the first <think>


def test_reward_funcs_columns():
    f = make_reward_funcs(components=("accuracy",), answer_column="solution")[0]
    assert f(["<think>t</think><answer>\\boxed{1.24}</answer>"], solution=["1.2"], precision=[1]) == [0.5]
    assert f(["<think>t</think><answer>\\boxed{B}</answer>"], solution=["square"], choices=[["triangle", "square"]]) == [0.5]
    with pytest.raises(KeyError, match="needs the gold answer in a dataset column 'solution'; columns passed: \\['answer'\\]"):
        f(["x"], answer=["1"])
    with pytest.raises(ValueError, match="components repeat"): make_reward_funcs(components=("total", "total"))


def test_reward_funcs_with_grpo_trainer(tmp_path):
    "One GRPO step on the tiny Qwen2.5-VL: TRL accepts the functions, logs each by name, and receives log_metric."
    pytest.importorskip("trl")
    from datasets import Dataset
    from PIL import Image
    from trl import GRPOConfig, GRPOTrainer
    from srpo_nb.models import build_tiny_qwen25vl, load_policy
    path = build_tiny_qwen25vl(tmp_path / "tiny")
    model, processor = load_policy(path, device="cpu", freeze_vision=True)
    img = Image.new("RGB", (56, 56), "red")
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "2+3?"}]}],
                             "image": img, "answer": "5"}] * 4)
    funcs = make_reward_funcs(components=("total", "format", "accuracy", "length", "w2r"))
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4, max_steps=1,
                      max_completion_length=8, logging_steps=1, report_to="none", bf16=False, use_cpu=True,
                      reward_weights=reward_weights(funcs), save_strategy="no")
    tr = GRPOTrainer(model=model, processing_class=processor, reward_funcs=funcs, args=args, train_dataset=ds)
    tr.train()
    logs = {k for h in tr.state.log_history for k in h}
    for f in funcs: assert f"rewards/{f.__name__}/mean" in logs, sorted(logs)
    assert any("srpo/W->R" in k for k in logs), sorted(logs)
    assert len(funcs[0].last_breakdowns) == 4


# ---------------------------------------------------------------- fuzzing
_PIECES = ["<think>", "</think>", "<answer>", "</answer>", "<reflection>", "</reflection>", "< think >", "</ answer>",
           "\\boxed{", "\\fbox{", "}", "{", "\\}", "\\frac{1}{2}", "16\\pi", "5", "B", "(B)", "$", "\\", "^", "_",
           "9^{9^{9}}", "10^{10^{10}}", "\\sqrt{", "50\\%", "x", "1e999", "1,000", "answer is ", "Answer:", "\n", " ",
           "\u200b", "😀", "\ud800", "\x00", "\u202e", "５", "°", "∑"]
_completion = st.lists(st.one_of(st.sampled_from(_PIECES), st.text(max_size=8)), max_size=30).map("".join)
_content = st.lists(st.one_of(st.sampled_from(_PIECES[8:]), st.text(max_size=6)), max_size=8).map("".join)
_block = st.tuples(st.sampled_from(["think", "answer", "reflection"]), _content, st.sampled_from(["closed", "closed", "open", "spaced"]))
_SEPS = ["", "\n", " ", "x", "\n\n"]

def _render(blocks, seps):
    out = []
    for (tag, content, kind), sep in zip(blocks, seps):
        out.append({"closed": f"<{tag}>{content}</{tag}>", "open": f"<{tag}>{content}", "spaced": f"< {tag} >{content}</ {tag}>"}[kind] + sep)
    return "".join(out)

_structured = st.tuples(st.lists(_block, max_size=7), st.lists(st.sampled_from(_SEPS), min_size=7, max_size=7)).map(lambda t: _render(*t))
_completions = st.one_of(_structured, _structured, _completion, st.text(max_size=200),
                         st.tuples(st.one_of(_structured, _completion), st.integers(100, 3000)).map(lambda t: t[0] * t[1]))
_golds = st.sampled_from([("5", None), ("16\\pi", None), ("B", None), ("\\frac{1}{2}", None), ("square", ["triangle", "square"]),
                          ("C", ["1/4", "1/3", "1/2"]), ("12.5", None)])
_FUZZ_CFG = RewardConfig(verify_timeout=1.0)
_PER_CALL_BOUND = 2 * 1.0 + 8.0   # two checks at the limit, plus replacement workers starting on a loaded machine


def _fuzz_one(text, gold_choices, stats):
    gold, choices = gold_choices
    for v in R.VARIANTS:
        t0 = time.perf_counter()
        bd = srpo_reward(text, gold, variant=v, choices=choices, config=_FUZZ_CFG)
        dt = time.perf_counter() - t0
        stats["n"] += 1; stats["max"] = max(stats["max"], dt)
        lo, hi = reward_bounds(v)
        assert math.isfinite(bd.total) and lo - 1e-12 <= bd.total <= hi + 1e-12, (v, bd)
        assert bd.total == pytest.approx(bd.format + bd.accuracy + bd.effectiveness + bd.reflection + bd.alpha * bd.length)
        assert dt < _PER_CALL_BOUND, (v, dt, text[:80])


def test_fuzz_ci():
    stats = {"n": 0, "max": 0.0}

    @settings(max_examples=800, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(_completions, _golds)
    def run(text, gc): _fuzz_one(text, gc, stats)
    run()
    assert stats["n"] >= 2400


@pytest.mark.slow
def test_fuzz_100k():
    "The issue's 100,000 generated completions, through every variant (run with -m slow)."
    stats = {"n": 0, "max": 0.0}
    t0 = time.perf_counter()

    @settings(max_examples=100_000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(_completions, _golds)
    def run(text, gc): _fuzz_one(text, gc, stats)
    run()
    el = time.perf_counter() - t0
    print(f"\nfuzz: {stats['n'] // 3} completions x 3 variants = {stats['n']} calls in {el:.0f} s; "
          f"slowest call {stats['max'] * 1000:.0f} ms; worker {R.math_verify_worker().stats}")
    assert stats["n"] >= 300_000


def test_accuracy_norm_is_the_filter_signal():
    "accuracy_norm: the variant's accuracy term over its largest value (code: the transition table; paper: R_accuracy/0.5)."
    texts = [CASES["W->R"], CASES["R->R"], CASES["R->W"], CASES["W->W"], T + A, "no tags"]
    code = make_reward_funcs("code", components=("accuracy_norm",), config=RewardConfig(code_quirk=False))[0]
    assert code(texts, answer=["5"] * 6) == [1.0, 0.75, 0.25, 0.0, 0.5, 0.0]
    paper = make_reward_funcs("paper", components=("accuracy_norm",))[0]
    assert paper(texts, answer=["5"] * 6) == [0.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    doubled = make_reward_funcs("code", components=("accuracy_norm",), config=RewardConfig(code_accuracy={
        "W->R": 2.0, "R->R": 1.5, "R->W": 0.5, "W->W": 0.0, "single": 1.0}))[0]
    assert doubled(texts[:4], answer=["5"] * 4) == [1.0, 0.75, 0.25, 0.0]
    assert [R.accuracy_scale(v) for v in R.VARIANTS] == [0.5, 1.0, 1.0]
