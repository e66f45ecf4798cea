"""The online filter's dropped groups leave the batch: on a rollout where the filter drops a group, the SRPO trainer's
loss and gradients (summed over the micro-batches of an optimizer step) equal TRL's loss on the same rollout without
that group, taken as one batch — for every loss type, with one or several micro-batches (even or not), with micro-batches
left without a kept row, and on two processes (tests/grpo_drop_ddp_script.py)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from srpo_nb.format import make_messages
from srpo_nb.grpo import LOSS_TYPES, srpo_trainer_class, take_rows
from srpo_nb.models import build_tiny_qwen25vl, load_policy, vision_token_ids
from grpo_helpers import image, share_of_e  # noqa: F401 (grpo_drop_ddp_script imports them from here)

HERE = Path(__file__).parent
G, QS = 4, ["How tall is the bar?", "What colour is the bar?", "Is the bar wide?"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_qwen25vl(tmp_path_factory.mktemp("grpo_drop") / "tiny")


def make_trainer(path, out, steps, easy, world=1, **overrides):
    "The SRPO trainer on three image prompts; the filter averages `acc`, which is 1 for the `easy` questions' groups."
    from datasets import Dataset
    from trl import GRPOConfig
    def acc(completions, prompts, **kwargs):
        return [1.0 if any(q in str(p) for q in easy) else float(i % 2) for i, p in enumerate(prompts)]
    policy, processor = load_policy(path, freeze_vision=False, device="cpu")
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    rows = [{"prompt": make_messages(q, 1), "image": image(i)} for i, q in enumerate(QS)]
    args = GRPOConfig(output_dir=str(out), use_cpu=True, bf16=False, report_to="none", num_generations=G,
                      per_device_train_batch_size=12 // (steps * world), gradient_accumulation_steps=steps,
                      steps_per_generation=steps, max_completion_length=16, num_iterations=2, beta=0.0, seed=0,
                      save_strategy="no", reward_weights=[1.0, 0.0], **overrides,
                      generation_kwargs={"sequence_bias": {(eos,): 4.0}, "suppress_tokens": vision_token_ids(processor)})

    class Spy(srpo_trainer_class()):
        def _calculate_rewards(self, *a):
            r = super()._calculate_rewards(*a)
            self.seen_keep = self._keep.clone() if self._keep is not None else None
            return r

    t = Spy(model=policy, args=args, reward_funcs=[share_of_e, acc], train_dataset=Dataset.from_list(rows),
            processing_class=processor, filter_reward="acc")
    t.model.train()
    return t


def rollout(t, steps):
    "The micro-batches of one rollout, as training reads them, and the full scored rollout before any row left it."
    from trl import GRPOTrainer
    full, orig = {}, GRPOTrainer._generate_and_score_completions
    def spy(self, inputs):
        out = orig(self, inputs); full.update(out); return out
    batch = next(iter(t.get_train_dataloader()))
    GRPOTrainer._generate_and_score_completions = spy
    try:
        chunks = []
        for k in range(steps):
            t._step = k; chunks.append(t._prepare_inputs(batch))
    finally:
        GRPOTrainer._generate_and_score_completions = orig
    return chunks, full


def without_dropped(full, keep):
    "The rollout with the dropped groups' rows taken out: what TRL would see had they never been sampled."
    from trl.trainer.utils import split_pixel_values_by_grid, unsplit_pixel_values_by_grid
    ref = unsplit_pixel_values_by_grid(take_rows(split_pixel_values_by_grid(dict(full)), [i for i, k in enumerate(keep) if k]))
    ref["num_items_in_batch"] = ref["completion_mask"].sum()
    return ref


def perturb(model, scale=0.02, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in model.parameters(): w.add_(scale * torch.randn(w.shape, generator=g))


def assert_grads_close(ours, theirs, what, rel=1e-5):
    "Every gradient entry within rel × the largest entry (float32 sums in another order differ in the last bits)."
    assert ours.keys() == theirs.keys() and theirs
    scale = max(float(g.abs().max()) for g in theirs.values())
    assert scale > 0, "the reference gradient is zero: the test would prove nothing"
    worst = max(float((ours[n] - theirs[n]).abs().max()) for n in theirs)
    assert worst <= rel * scale, f"{what}: max gradient difference {worst:.3g} > {rel} x {scale:.3g}"


def grads(model):
    out = {n: w.grad.detach().clone() for n, w in model.named_parameters() if w.grad is not None}
    model.zero_grad()
    return out


@pytest.mark.parametrize("steps,easy", [(1, QS[:1]), (3, QS[:1]), (6, QS[:2])], ids=["one-batch", "uneven", "empty-micro-batches"])
def test_dropped_group_leaves_the_batch(tiny, tmp_path, steps, easy):
    from trl import GRPOTrainer
    t = make_trainer(tiny, tmp_path, steps, easy)
    chunks, full = rollout(t, steps)
    keep = t.seen_keep.tolist()
    assert sum(keep) == 12 - G * len(easy)
    assert sum(int(c["completion_mask"].any(dim=1).sum()) for c in chunks) <= sum(keep)   # dropped rows carry no weight
    ref = without_dropped(full, keep)
    perturb(t.model)
    for loss_type in LOSS_TYPES:
        t.loss_type = loss_type
        t.current_gradient_accumulation_steps = t.args.steps_per_generation = steps
        ours = 0
        for c in chunks:
            loss = t.compute_loss(t.model, c); loss.backward(); ours = ours + loss.detach()
        g_ours = grads(t.model)
        t.current_gradient_accumulation_steps = t.args.steps_per_generation = 1
        theirs = GRPOTrainer.compute_loss(t, t.model, ref); theirs.backward()
        g_theirs = grads(t.model)
        assert torch.allclose(ours, theirs.detach(), rtol=1e-5, atol=1e-7), (loss_type, ours, theirs)
        assert_grads_close(g_ours, g_theirs, loss_type)


def test_nothing_dropped_is_trl_unchanged(tiny, tmp_path):
    "With every group kept, the micro-batches are TRL's own (same rows, no rescaling)."
    t = make_trainer(tiny, tmp_path, 2, [])
    chunks, full = rollout(t, 2)
    assert t.seen_keep.all() and all("window_sequences" not in c for c in chunks)
    assert sum(len(c["completion_ids"]) for c in chunks) == 12


def test_two_processes(tiny, tmp_path):
    "Two processes, one holding 2 kept rows and the other 6: the DDP-averaged gradient is that of the 8 kept rows."
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(HERE / "grpo_drop_ddp_script.py"),
                          str(tiny), str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-4000:]
    ranks = [json.loads((tmp_path / "run" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(r["kept"] for r in ranks) == [2, 6] and {r["rows"] for r in ranks} == {6}
    for r in ranks: assert r["ok"] == {lt: True for lt in LOSS_TYPES}, r
