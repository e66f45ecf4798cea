"""Launched by tests/test_grpo_drop.py as `torchrun --standalone --nproc_per_node 2 grpo_drop_ddp_script.py MODEL OUT`.
The filter drops the first group (rank 0's first four rows), so rank 0 keeps 2 rows and rank 1 keeps 6. Each process
writes whether the DDP mean of its gradients equals the gradient of TRL's loss on the 8 kept rows, per loss type: each
process's TRL loss on its own kept rows, weighted by its share of the kept sequences (grpo, dr_grpo) or tokens (bnpo,
dapo) and summed over processes, is that loss."""
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from test_grpo_drop import G, QS, image, perturb, rollout, share_of_e, without_dropped  # noqa: E402

from srpo_nb.format import make_messages  # noqa: E402
from srpo_nb.grpo import LOSS_TYPES, srpo_trainer_class  # noqa: E402
from srpo_nb.models import load_policy, vision_token_ids  # noqa: E402


def acc(completions, prompts, **kwargs):
    first = os.environ.get("RANK", "0") == "0"
    return [1.0 if first and i < G else float(i % 2) for i in range(len(prompts))]


def main(model, out):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    policy, processor = load_policy(model, freeze_vision=False, device="cpu")
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    rows = [{"prompt": make_messages(q, 1), "image": image(i)} for i, q in enumerate(QS)]
    args = GRPOConfig(output_dir=str(out), use_cpu=True, bf16=False, report_to="none", num_generations=G, ddp_backend="gloo",
                      per_device_train_batch_size=6, max_completion_length=16, num_iterations=2, beta=0.0, seed=0,
                      save_strategy="no", reward_weights=[1.0, 0.0],
                      generation_kwargs={"sequence_bias": {(eos,): 4.0}, "suppress_tokens": vision_token_ids(processor)})

    class Spy(srpo_trainer_class()):
        def _calculate_rewards(self, *a):
            r = super()._calculate_rewards(*a)
            self.seen_keep = self._keep.clone()
            return r

    t = Spy(model=policy, args=args, reward_funcs=[share_of_e, acc], train_dataset=Dataset.from_list(rows),
            processing_class=processor, filter_reward="acc")
    t.model.train()
    t.current_gradient_accumulation_steps = 1
    rank, W = t.accelerator.process_index, t.accelerator.num_processes
    (chunk,), full = rollout(t, 1)
    n = len(full["completion_ids"])
    keep = t.seen_keep[rank * n:(rank + 1) * n].tolist()
    ref = without_dropped(full, keep)
    n_r, T_r = torch.tensor(float(sum(keep))), ref["completion_mask"].sum().float()
    ref["num_items_in_batch"] = T_r * W   # TRL's dapo divides the (global) count by the number of processes
    N, T = n_r.clone(), T_r.clone()
    dist.all_reduce(N); dist.all_reduce(T)
    torch.manual_seed(0); perturb(t.model)
    params = [p for p in t.model.parameters() if p.requires_grad]
    def take():
        g = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        for p in params: p.grad = None
        return g
    result = {"rank": rank, "kept": int(sum(keep)), "rows": len(chunk["completion_ids"]), "ok": {}}
    for lt in LOSS_TYPES:
        t.loss_type = lt
        loss = t.compute_loss(t.model, chunk); loss.backward()
        ours = take()
        for g in ours: dist.all_reduce(g); g /= W            # what DDP does with the gradients: their mean
        gather, t.accelerator.gather = t.accelerator.gather, (lambda x: x)   # the reference is this process's rows alone
        ref_loss = GRPOTrainer.compute_loss(t, t.model, ref); ref_loss.backward()
        t.accelerator.gather = gather
        w = n_r / N if lt in ("grpo", "dr_grpo") else T_r / T
        theirs = [g * w for g in take()]
        for g in theirs: dist.all_reduce(g)
        lo, lr = loss.detach() / W, ref_loss.detach() * w
        dist.all_reduce(lo); dist.all_reduce(lr)
        scale = max(float(g.abs().max()) for g in theirs)
        worst = max(float((a - b).abs().max()) for a, b in zip(ours, theirs))
        result["ok"][lt] = bool(torch.allclose(lo, lr, rtol=1e-5, atol=1e-7)) and scale > 0 and worst <= 1e-5 * scale
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
