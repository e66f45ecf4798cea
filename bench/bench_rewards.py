"""Throughput of srpo_nb.rewards on the shipped problems (data/problems), and the 100k fuzz run.

    python bench/bench_rewards.py                 # speed table (completions/s), both variants, with/without math-verify
    python bench/bench_rewards.py --fuzz 100000   # throw 100,000 random completions at every variant

Completions are built from each shipped problem's gold: a GRPO-sized group of 8 per problem mixing right and wrong
first/final answers, answer styles (boxed number, option letter, option text, LaTeX, units), missing reflections and
truncations. "cold" clears the answer-check cache and restarts the math-verify worker first (every (answer, gold)
pair is new to the checker); "warm" scores the same batch again (3 passes). The math-verify worker is a second process: the parent waits while it works, so the
"with math-verify" figures use one core at a time.
"""
import argparse, math, os, platform, random, sys, time

from srpo_nb import rewards as R
from srpo_nb.data import shipped_problems

def wrong(g: str, rng) -> str:
    "A wrong answer near the gold g."
    d = rng.choice([-2, -1, 1, 3])
    try: return str(int(g) + d)
    except ValueError: pass
    try: return f"{float(g) + d / 4:g}"
    except ValueError: return g.replace("\\pi", "").replace("\\sqrt", "") + "+1"

def answer_styles(p, rng, right: bool) -> str:
    "An answer block for problem p, right or wrong, in a randomly chosen style."
    if p.answer_type == "choice":
        i = "ABCDEFGHIJ".index(p.answer) if right else rng.choice([j for j in range(len(p.choices)) if "ABCDEFGHIJ"[j] != p.answer])
        return rng.choice([f"$\\boxed{{{'ABCDEFGHIJ'[i]}}}$", f"The answer is ({'ABCDEFGHIJ'[i]}).", f"\\boxed{{{p.choices[i]}}}"])
    g = p.answer if right else wrong(p.answer, rng)
    if p.answer_type == "expression" and right:
        g = rng.choice([g, g.replace("\\pi", " \\pi"), g.replace("\\sqrt", "\\sqrt ")])
    return rng.choice([f"$\\boxed{{{g}}}$", f"So the answer is \\boxed{{{g}}}.", f"\\boxed{{{g}}}" + (" units" if rng.random() < .2 else "")])

def group(p, rng) -> list:
    "8 completions for problem p: the four transitions, no reflection, truncated, and two more random ones."
    think = "Reading the figure: " + " ".join(rng.choice(["the", "value", "is", "then", "so", "we", "add", "x", "=", "2"]) for _ in range(rng.randint(30, 120)))
    out = []
    kinds = ["RR", "WR", "RW", "WW", "noref", "trunc", rng.choice(["RR", "WR"]), rng.choice(["RR", "WW"])]
    for k in kinds:
        a1 = answer_styles(p, rng, k[0] == "R" if k[0] in "RW" else True)
        a2 = answer_styles(p, rng, k[1] == "R" if len(k) == 2 else True)
        text = (f"<think>{think}</think>\n<answer>{a1}</answer>\n<reflection>Check the reading once more; "
                f"{'it holds' if k in ('RR', 'WW') else 'the first answer misread the figure'}.</reflection>\n"
                f"<think>{think[: len(think) // 2]} corrected.</think>\n<answer>{a2}</answer>")
        if k == "noref": text = f"<think>{think}</think>\n<answer>{a1}</answer>"
        if k == "trunc": text = text[: int(len(text) * 0.7)]
        out.append(text)
    return out

def batch(problems, seed=0):
    rng = random.Random(seed)
    rows = []
    for p in problems:
        for c in group(p, rng): rows.append((c, p.answer, p.choices))
    return rows

def _worker_cpu() -> float:
    "CPU seconds used so far by the math-verify worker process (Linux /proc; 0 elsewhere)."
    pid = R.math_verify_worker().pid
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, TypeError, IndexError, ValueError):
        return 0.0

def run(rows, variant, use_mv, reps=1):
    "(completions/s by wall clock, completions/s by CPU time of this process plus the worker)."
    cfg = R.RewardConfig(variant=variant, use_math_verify=use_mv)
    t0, c0, w0 = time.perf_counter(), time.process_time(), _worker_cpu()
    for _ in range(reps):
        for c, g, ch in rows: R.srpo_reward(c, g, choices=ch, config=cfg)
    n = len(rows) * reps
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0 + _worker_cpu() - w0)

def speed():
    problems = shipped_problems("train") + shipped_problems("test")
    rows = batch(problems)
    R.math_verify_worker().start()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}; "
          f"load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "")
    print(f"{len(problems)} shipped problems x 8 completions = {len(rows)} completions; "
          f"mean {sum(len(c) for c, _, _ in rows) / len(rows):.0f} chars")
    print("completions/s: wall clock, and CPU (this process + the math-verify worker, i.e. one core)")
    print(f"{'variant':<8}{'math-verify':<13}{'cold wall':>11}{'cold CPU':>10}{'warm wall':>11}{'warm CPU':>10}")
    for variant in ("paper", "code", "grpo"):
        for use_mv in (False, True):
            R._grade.cache_clear()
            R.math_verify_worker().close(); R.math_verify_worker().start()   # a fresh worker: its caches are cold too
            cold = run(rows, variant, use_mv)
            warm = run(rows, variant, use_mv, reps=3)
            print(f"{variant:<8}{str(use_mv):<13}{cold[0]:>11.0f}{cold[1]:>10.0f}{warm[0]:>11.0f}{warm[1]:>10.0f}")
    for name, counter in (("regex (default)", None), ("len(s)//4", lambda s: len(s) // 4), ("zero", lambda s: 0)):
        cfg = R.RewardConfig(use_math_verify=False)
        c0 = time.process_time()
        for _ in range(3):
            for c, g, ch in rows: R.srpo_reward(c, g, choices=ch, config=cfg, count_tokens=counter)
        print(f"paper, no math-verify, warm, count_tokens={name}: {3 * len(rows) / (time.process_time() - c0):.0f}/s CPU")
    # math-verify alone: fresh (gold, pred) pairs straight to the worker
    w = R.math_verify_worker()
    golds = [p.answer for p in problems if p.answer_type == "expression"] or ["16\\pi"]
    pairs = [(g, f"{g}+{i}") for i, g in enumerate(golds * 20)]
    t0, c0, w0 = time.perf_counter(), time.process_time(), _worker_cpu()
    for g, pr in pairs: w.check(g, pr)
    print(f"math-verify worker, fresh expression pairs: {len(pairs) / (time.perf_counter() - t0):.0f} checks/s wall, "
          f"{len(pairs) / (time.process_time() - c0 + _worker_cpu() - w0):.0f} checks/s CPU")
    print("worker stats:", w.stats)

def fuzz(n, seed=0):
    "n random completions through every variant: no exception, finite totals within bounds, time per call."
    rng = random.Random(seed)
    pieces = ["<think>", "</think>", "<answer>", "</answer>", "<reflection>", "</reflection>", "< think >", "\\boxed{",
              "}", "{", "\\frac{1}{2}", "16\\pi", "5", "B", "$", "\\", "^", "9^{9^{9}}", "\u200b", "😀", "\ud800", "\n",
              " ", "answer is ", "\\sqrt{", "(A)", "50\\%", "x", "1e999", "\x00"]
    golds = ["5", "16\\pi", "B", "\\frac{1}{2}", "square"]
    choices = [None, None, ["1", "2"], None, ["triangle", "square"]]
    worst, t_all, calls = 0.0, time.perf_counter(), 0
    for i in range(n):
        k = rng.randint(0, 40)
        text = "".join(rng.choice(pieces) if rng.random() < .7 else chr(rng.randint(0, 0x2FFFF)) for _ in range(k))
        if rng.random() < 0.01: text = text * rng.randint(100, 5000)
        j = rng.randrange(len(golds))
        for v in R.VARIANTS:
            t0 = time.perf_counter()
            bd = R.srpo_reward(text, golds[j], variant=v, choices=choices[j], config=R.RewardConfig(verify_timeout=1.0))
            dt = time.perf_counter() - t0; worst = max(worst, dt); calls += 1
            lo, hi = R.reward_bounds(v)
            assert math.isfinite(bd.total) and lo - 1e-9 <= bd.total <= hi + 1e-9, (text, v, bd)
    el = time.perf_counter() - t_all
    print(f"fuzz: {n} completions x {len(R.VARIANTS)} variants = {calls} calls in {el:.1f} s "
          f"({calls / el:.0f}/s), slowest call {worst * 1000:.0f} ms; worker {R.math_verify_worker().stats}")

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fuzz", type=int, default=0, help="run the fuzz with this many completions instead")
    a = ap.parse_args()
    fuzz(a.fuzz) if a.fuzz else speed()
