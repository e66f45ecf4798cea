"""Launched by tests/test_grpo.py as `torchrun --standalone --nproc_per_node 2 grpo_ddp_script.py MODEL OUT`:
two GRPO steps of the tiny preset (SRPO reward, online filter, shipped problems with images) on 2 CPU processes."""
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from srpo_nb.grpo import GRPOTrainConfig, train_grpo

model, out = sys.argv[1], Path(sys.argv[2])
cfg = GRPOTrainConfig.from_dict(preset="tiny", model=model, output_dir=str(out), max_problems=8, max_steps=2,
                                per_device_batch_size=4, save_steps=2, verbose=False, tensorboard=False)
res = train_grpo(cfg, keep_trainer=True)
rank = int(os.environ["RANK"])
(out / f"rank{rank}.json").write_text(json.dumps({
    "rank": rank, "world_size": res.trainer.accelerator.num_processes, "global_step": res.global_step,
    "filter_totals": res.filter_totals, "transition_totals": res.transition_totals}))
if dist.is_initialized():   # leave together, with the process group shut down cleanly
    dist.barrier()
    dist.destroy_process_group()
