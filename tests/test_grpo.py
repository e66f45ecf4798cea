"""GRPO trainer (srpo_nb.grpo) on the tiny Qwen2.5-VL: it learns (against an lr=0 control), the online filter drops
the right groups, full and LoRA runs resume to the same weights and optimizer state, and two torchrun processes train
together."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from srpo_nb.format import make_messages
from srpo_nb.grpo import GRPOTrainConfig, online_filter, srpo_trainer_class, train_grpo, trl_args
from srpo_nb.models import build_tiny_qwen25vl, load_policy

HERE = Path(__file__).resolve().parent
WORDS = "cats dogs trees rain sun moon stars bars".split()


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return build_tiny_qwen25vl(tmp_path_factory.mktemp("grpo") / "tiny")


def short_prompts(n=8):
    from datasets import Dataset
    return Dataset.from_list([{"prompt": make_messages(f"Say something about {w}.", 0)} for w in WORDS[:n]])


def share_e(completions, **kwargs):
    "Share of the letter 'e' in the completion: a reward a random tiny model can learn (measured: 0.09 to 0.5-1.0 in about 60 steps at lr 1e-3, flat at lr 0)."
    return [c[0]["content"].count("e") / max(1, len(c[0]["content"])) for c in completions]


def config(tiny_path, out, **kw):
    base = dict(model=str(tiny_path), output_dir=str(out), online_filter=False, log_completions=False, verbose=False,
                tensorboard=False, max_completion_length=16, num_generations=8, prompts_per_rollout=1,
                train_batch_size=8, per_device_batch_size=8, learning_rate=2e-3, lr_scheduler="constant",
                warmup_ratio=0.0, save_steps=10_000, num_threads=1, seed=0)
    return GRPOTrainConfig.from_dict({**base, **kw})


def rewards(res):
    return [m["reward"] for m in res.metrics if "reward" in m]


# ---------------------------------------------------------------- it learns
def test_grpo_learns_vs_lr0_control(tiny_path, tmp_path):
    steps, n = 150, 20
    runs = {}
    for lr in (2e-3, 0.0):
        res = train_grpo(config(tiny_path, tmp_path / f"lr{lr}", learning_rate=lr, max_steps=steps),
                         reward_funcs=[share_e], train_dataset=short_prompts())
        r = rewards(res)
        assert len(r) == steps
        runs[lr] = (sum(r[:n]) / n, sum(r[-n:]) / n)
    (start, end), (c_start, c_end) = runs[2e-3], runs[0.0]
    print(f"\nGRPO learning test (share of 'e', {steps} steps, full fine-tune): mean reward first {n} steps "
          f"{start:.3f} -> last {n} steps {end:.3f}; lr=0 control {c_start:.3f} -> {c_end:.3f}")
    assert end > 3 * start, (start, end)
    assert end > c_end + 0.2, (end, c_end)
    assert abs(c_end - c_start) < 0.05, (c_start, c_end)   # the control does not move


# ---------------------------------------------------------------- the online filter
def test_online_filter_groups():
    acc = torch.tensor([1., 1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0])
    keep, counts = online_filter(acc, G=4)
    assert keep.tolist() == [False] * 4 + [True] * 4 + [False] * 4
    assert counts == {"groups": 3, "dropped": 2, "too_easy": 1, "too_hard": 1}
    keep, _ = online_filter(torch.tensor([0.] * 9 + [1.]), G=10)   # mean 0.1: on the bound, kept
    assert keep.all()
    keep, _ = online_filter(acc, G=4, low=0.0, high=1.0)            # a filter that keeps everything
    assert keep.all()


def test_online_filter_in_trainer_drops_all_correct_group(tiny_path, tmp_path):
    from datasets import Dataset
    ds = Dataset.from_list([{"prompt": make_messages(q, 0), "id": i} for q, i in (("Say yes.", "easy"), ("Say no.", "mixed"))])

    def final_correct(completions, id, **kw):      # all right for "easy"; half right for "mixed"
        return [1.0 if i == "easy" else float(k % 2) for k, i in enumerate(id)]

    def length(completions, **kw):
        return [len(c[0]["content"]) / 10 for c in completions]

    cfg = config(tiny_path, tmp_path, num_generations=4, prompts_per_rollout=2)
    model, processor = load_policy(tiny_path, device="cpu")
    trainer = srpo_trainer_class()(model=model, processing_class=processor, reward_funcs=[length, final_correct],
                                   args=trl_args(cfg), train_dataset=ds, filter_reward="final_correct")
    batch = sorted(next(iter(trainer.get_train_dataloader())), key=lambda b: b["id"])
    trainer.model.train()
    trainer._step = 0
    micro = trainer._prepare_inputs(batch)    # the micro-batch training reads: the easy group's rows have left it
    assert len(micro["completion_ids"]) == 4 and micro["completion_mask"].sum() > 0 and (micro["advantages"] != 0).any()
    assert micro["num_items_in_batch"].item() == micro["completion_mask"].sum().item()
    assert dict(trainer.filter_totals) == {"groups": 2, "dropped": 1, "too_easy": 1, "too_hard": 0}


# ---------------------------------------------------------------- checkpoint / resume
class StopAt:
    "A callback that stops training after step `k` (its checkpoint is written first), like a preempted job."
    def __new__(cls, k):
        from transformers import TrainerCallback

        class _Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step >= k: control.should_training_stop = True
                return control
        return _Stop()


def _tensors(path):
    from safetensors.torch import load_file
    files = sorted(Path(path).glob("*.safetensors"))
    assert files, f"no weights in {path}"
    out = {}
    for f in files: out.update(load_file(str(f)))
    return out


def _same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _optimizer_state(ckpt):
    return torch.load(Path(ckpt) / "optimizer.pt", map_location="cpu", weights_only=False)


def _same_optimizer(a, b):
    sa, sb = a["state"], b["state"]
    if sa.keys() != sb.keys(): return False
    for k in sa:
        if sa[k].keys() != sb[k].keys(): return False
        for name in sa[k]:
            x, y = sa[k][name], sb[k][name]
            if not (torch.equal(x, y) if torch.is_tensor(x) else x == y): return False
    return a["param_groups"] == b["param_groups"]


@pytest.mark.parametrize("lora", [None, {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}], ids=["full", "lora"])
def test_resume_restores_step_optimizer_and_weights(tiny_path, tmp_path, lora):
    K, k = 4, 2
    kw = dict(max_steps=K, save_steps=k, lora=lora, learning_rate=1e-2 if lora else 2e-3)
    straight = train_grpo(config(tiny_path, tmp_path / "straight", **kw), reward_funcs=[share_e],
                          train_dataset=short_prompts(), keep_trainer=True)
    stopped = train_grpo(config(tiny_path, tmp_path / "resumed", **kw), reward_funcs=[share_e],
                         train_dataset=short_prompts(), callbacks=[StopAt(k)])
    assert stopped.global_step == k and (tmp_path / "resumed" / f"checkpoint-{k}").is_dir()
    assert not (tmp_path / "resumed" / f"checkpoint-{K}").exists()
    resumed = train_grpo(config(tiny_path, tmp_path / "resumed", resume_from_checkpoint="latest", **kw),
                         reward_funcs=[share_e], train_dataset=short_prompts(), keep_trainer=True)
    assert resumed.global_step == straight.global_step == K
    a, b = tmp_path / "straight" / f"checkpoint-{K}", tmp_path / "resumed" / f"checkpoint-{K}"
    # the weights moved during training (so equality below is not trivially true) ...
    start = _tensors(tmp_path / "straight" / f"checkpoint-{k}")
    assert not _same_tensors(start, _tensors(a))
    # ... and the resumed run ends with the same weights and optimizer state as the uninterrupted one
    assert _same_tensors(_tensors(a), _tensors(b))
    assert _same_optimizer(_optimizer_state(a), _optimizer_state(b))
    sa = straight.trainer.model.state_dict(); sb = resumed.trainer.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[n], sb[n]) for n in sa)
    if lora:   # only adapter weights train
        assert all("lora_" in n for n in _tensors(a))
    else:      # full fine-tune: every language-model weight trains; the vision tower and projector are frozen (paper)
        params = dict(straight.trainer.model.named_parameters())
        vision = [n for n in params if ".visual." in n or n.startswith("visual.")]
        assert vision and any("merger" in n for n in vision)
        assert not any(params[n].requires_grad for n in vision)
        assert all(p.requires_grad for n, p in params.items() if n not in vision)
        init = load_policy(tiny_path, device="cpu")[0].state_dict()
        assert all(torch.equal(sa[n], init[n]) for n in vision)
        assert any(not torch.equal(sa[n], init[n]) for n in sa if n not in vision)
    # metrics.jsonl continues across the restart, and every step saw the same samples and rewards
    assert [m["step"] for m in resumed.metrics if "reward" in m] == list(range(1, K + 1))
    assert rewards(straight) == rewards(resumed)


# ---------------------------------------------------------------- two processes
def test_torchrun_two_processes(tiny_path, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun, "torchrun not found"
    env = dict(os.environ, OMP_NUM_THREADS="1", SRPO_NB_HOME=str(tmp_path / "home"))
    logs = tmp_path / "logs"
    out = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "--log-dir", str(logs), "--redirects", "3",
                          str(HERE / "grpo_ddp_script.py"), str(tiny_path), str(tmp_path / "run")],
                         env=env, capture_output=True, text=True, timeout=300)
    rank_logs = "".join(f"\n--- {p.relative_to(logs)}\n{p.read_text()[-4000:]}" for p in sorted(logs.rglob("*.log")))
    assert out.returncode == 0, out.stderr[-3000:] + rank_logs
    ranks = [json.loads((tmp_path / "run" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 and r["global_step"] == 2 for r in ranks)
    # the filter sees the batch gathered from both ranks: same counts on each, 2 groups per step
    assert ranks[0]["filter_totals"] == ranks[1]["filter_totals"] and ranks[0]["filter_totals"]["groups"] == 4
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 2
    assert len([json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"reward"' in l]) == 2
