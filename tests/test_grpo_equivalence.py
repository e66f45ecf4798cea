"""srpo_nb.grpo_core against TRL 1.15's GRPOTrainer: on the same rollout batch (tiny Qwen2.5-VL with images,
completions of different lengths, the policy moved after sampling so that clipping is active), our loss and its
gradients equal `compute_loss`'s for every loss type we support, with and without the KL term; plus properties of
the pieces that hold for any input."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from srpo_nb.format import make_messages
from srpo_nb.grpo_core import (LOSS_TYPES, TRL_STD_EPS, aggregate_loss, clipped_surrogate, group_advantages,
                               grpo_loss, rollout_logprobs)
from srpo_nb.models import build_tiny_qwen25vl, load_policy, vision_token_ids
from grpo_helpers import image as _image, share_of_e

MAX_LEN, G = 16, 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_qwen25vl(tmp_path_factory.mktemp("grpo_eq") / "tiny")


def short_and_done(completions, **kwargs):
    return [1.0 / (1 + len(c[0]["content"])) for c in completions]


def make_trainer(path, out_dir, **overrides):
    "A GRPOTrainer on four image prompts, CPU, float32; the EOS token is favoured while sampling (varied lengths)."
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    policy, processor = load_policy(path, freeze_vision=False, device="cpu")
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    rows = [{"prompt": make_messages(q, 1), "image": _image(i)}
            for i, q in enumerate(["How tall is the bar?", "What colour is the bar?", "Is the bar wide?", "Where is it?"])]
    args = dict(output_dir=str(out_dir), use_cpu=True, bf16=False, report_to="none", num_generations=G,
                per_device_train_batch_size=8, max_completion_length=MAX_LEN, num_iterations=2, beta=0.0, seed=0,
                loss_type="grpo", save_strategy="no", generation_kwargs={"sequence_bias": {(eos,): 4.0},
                                                              "suppress_tokens": vision_token_ids(processor)})
    args.update(overrides)
    trainer = GRPOTrainer(model=policy, args=GRPOConfig(**args), reward_funcs=[share_of_e, short_and_done],
                          train_dataset=Dataset.from_list(rows), processing_class=processor)
    trainer.model.train()
    return trainer


def rollout(trainer):
    "One generation batch, scored by the trainer; it stores the old log-probs because num_iterations > 1."
    inputs = trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader())))
    assert "old_per_token_logps" in inputs
    return inputs


def perturb(model, scale=0.02, seed=0):
    "Move every weight a little, standing in for the optimiser steps between sampling and this update."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in model.parameters(): w.add_(scale * torch.randn(w.shape, generator=g))


def grads(model):
    out = {n: w.grad.detach().clone() for n, w in model.named_parameters() if w.grad is not None}
    model.zero_grad()
    return out


def trl_loss(trainer, inputs):
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), grads(trainer.model)


def our_loss(trainer, inputs, loss_type, **kw):
    a = trainer.args
    kw = {**dict(eps_low=a.epsilon, eps_high=a.epsilon_high, beta=a.beta, ref_logp=inputs.get("ref_per_token_logps"),
                 bias_correction_kl=a.use_bias_correction_kl, max_completion_length=a.max_completion_length,
                 num_items=inputs["num_items_in_batch"]), **kw}
    out = grpo_loss(rollout_logprobs(trainer.model, inputs, temperature=a.temperature), inputs["old_per_token_logps"],
                    inputs["advantages"], inputs["completion_mask"], loss_type, **kw)
    out.loss.backward()
    return out, grads(trainer.model)


def assert_grads_close(ours, theirs, rel=1e-5):
    assert ours.keys() == theirs.keys() and theirs
    scale = max(g.abs().max() for g in theirs.values())
    assert scale > 0, "TRL's gradient is zero: the test would prove nothing"
    worst = max((ours[n] - theirs[n]).abs().max() for n in theirs)
    assert worst <= rel * scale, f"max gradient difference {worst:.3g} > {rel} x {scale:.3g}"
    assert any(".visual." in n for n in theirs)  # the gradient reached the vision tower through pixel_values


def check_batch(inputs, out, eps_low=0.2, eps_high=0.2):
    "The batch exercises what matters: varied lengths, EOS before the budget, non-zero advantages, active clipping."
    lengths = inputs["completion_mask"].sum(1)
    assert len(set(lengths.tolist())) >= 3 and int(lengths.min()) < MAX_LEN, lengths
    assert inputs["advantages"].abs().max() > 0.1
    real = inputs["completion_mask"].bool()
    r = out.ratio.detach()[real]
    assert ((r < 1 - eps_low) | (r > 1 + eps_high)).any(), "no ratio left the clip range"
    assert out.clipped.any() and not out.clipped[real].all()


@pytest.fixture(scope="module", params=[0.0, 0.04], ids=["beta0", "beta0.04"])
def moved(request, tiny, tmp_path_factory):
    """A trainer, its rollout batch, and the policy moved after sampling. The batch is shared by the loss types:
    TRL 1.15's GRPOTrainer only stores `loss_type` at construction for these four, and reads it in compute_loss."""
    trainer = make_trainer(tiny, tmp_path_factory.mktemp("trl"), beta=request.param)
    inputs = rollout(trainer)
    with torch.no_grad():  # before the policy moves, our log-probs are TRL's old log-probs (images included)
        lp = rollout_logprobs(trainer.model, inputs)
    m = inputs["completion_mask"].bool()
    torch.testing.assert_close(lp[m], inputs["old_per_token_logps"][m], rtol=0, atol=1e-5)
    if request.param:
        torch.testing.assert_close(inputs["ref_per_token_logps"][m], inputs["old_per_token_logps"][m], rtol=0, atol=1e-5)
    perturb(trainer.model)
    trainer.current_gradient_accumulation_steps = 1
    return trainer, inputs


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_and_gradients_equal_trl(moved, loss_type):
    trainer, inputs = moved
    trainer.loss_type = loss_type
    theirs, their_grads = trl_loss(trainer, inputs)
    ours, our_grads = our_loss(trainer, inputs, loss_type)
    check_batch(inputs, ours)
    if trainer.beta: assert ours.kl is not None and ours.kl.detach()[inputs["completion_mask"].bool()].max() > 1e-4
    assert abs(ours.loss.item() - theirs.item()) <= 1e-6, (ours.loss.item(), theirs.item())
    assert_grads_close(our_grads, their_grads)


def test_loss_types_differ_on_one_batch(moved):
    "On one batch with varied lengths the aggregations give different numbers."
    trainer, inputs = moved
    values = {lt: our_loss(trainer, inputs, lt)[0].loss.item() for lt in LOSS_TYPES}
    # the whole generation batch is one micro-batch here, so dapo and bnpo coincide; the others differ
    assert abs(values["dapo"] - values["bnpo"]) <= 1e-7
    assert len({round(values[k], 5) for k in ("grpo", "dapo", "dr_grpo")}) == 3, values


def test_trainer_built_with_each_loss_type_agrees(tiny, tmp_path):
    "The shortcut above (one trainer, loss_type switched) gives what a trainer built with that loss_type gives."
    built = {}
    for lt in ("dr_grpo", "bnpo"):
        trainer = make_trainer(tiny, tmp_path / lt, loss_type=lt)
        inputs = rollout(trainer)
        perturb(trainer.model)
        trainer.current_gradient_accumulation_steps = 1
        theirs, _ = trl_loss(trainer, inputs)
        trainer.loss_type = "grpo" if lt != "grpo" else "dapo"
        other, _ = trl_loss(trainer, inputs)
        ours, _ = our_loss(trainer, inputs, lt)
        assert abs(ours.loss.item() - theirs.item()) <= 1e-6 and abs(other.item() - theirs.item()) > 1e-6
        built[lt] = inputs["completion_ids"]
    assert torch.equal(built["dr_grpo"], built["bnpo"])  # same seed, same samples: only the loss type differs


def test_kl_without_bias_correction(tiny, tmp_path):
    "TRL's use_bias_correction_kl=False is the paper's plain β·k3 term."
    trainer = make_trainer(tiny, tmp_path, beta=0.1, use_bias_correction_kl=False, loss_type="dr_grpo")
    inputs = rollout(trainer)
    perturb(trainer.model)
    trainer.current_gradient_accumulation_steps = 1
    theirs, their_grads = trl_loss(trainer, inputs)
    ours, our_grads = our_loss(trainer, inputs, "dr_grpo")
    assert abs(ours.loss.item() - theirs.item()) <= 1e-6
    assert_grads_close(our_grads, their_grads)
    corrected, _ = our_loss(trainer, inputs, "dr_grpo", bias_correction_kl=True)  # the switch matters off-policy
    assert abs(corrected.loss.item() - theirs.item()) > 1e-5


def test_temperature_and_clip_higher(tiny, tmp_path):
    "Sampling temperature divides the logits in the loss too; DAPO's clip-higher ε_high is honoured."
    trainer = make_trainer(tiny, tmp_path, temperature=0.7, epsilon_high=0.28, loss_type="dapo")
    inputs = rollout(trainer)
    m = inputs["completion_mask"].bool()
    with torch.no_grad():
        at_t = rollout_logprobs(trainer.model, inputs, temperature=0.7)
        at_1 = rollout_logprobs(trainer.model, inputs)
    torch.testing.assert_close(at_t[m], inputs["old_per_token_logps"][m], rtol=0, atol=1e-5)
    assert (at_1 - at_t)[m].abs().max() > 1e-3  # the temperature matters
    perturb(trainer.model)
    trainer.current_gradient_accumulation_steps = 1
    theirs, their_grads = trl_loss(trainer, inputs)
    ours, our_grads = our_loss(trainer, inputs, "dapo")
    check_batch(inputs, ours, eps_high=0.28)
    assert abs(ours.loss.item() - theirs.item()) <= 1e-6
    assert_grads_close(our_grads, their_grads)


def test_micro_batches_as_trl_splits_them(tiny, tmp_path):
    """A generation batch of 8 split into 2 micro-batches of 4, as TRL trains with gradient accumulation 2: dapo
    divides each micro-batch by the token count of the whole generation batch, so the micro-batch losses add up to
    the generation-batch token mean; the per-micro-batch types (grpo, bnpo, dr_grpo) are TRL's divided by the
    accumulation steps, which is the trainer's business, not the loss's."""
    from trl.trainer.utils import split_pixel_values_by_grid, split_tensor_dict, unsplit_pixel_values_by_grid
    trainer = make_trainer(tiny, tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                           steps_per_generation=2, loss_type="dapo")
    inputs = rollout(trainer)
    assert inputs["completion_ids"].shape[0] == 8
    micro = [unsplit_pixel_values_by_grid(b) for b in split_tensor_dict(split_pixel_values_by_grid(inputs), 2)]
    perturb(trainer.model)
    trainer.current_gradient_accumulation_steps = 2
    n_micro = [int(b["completion_mask"].sum()) for b in micro]
    assert n_micro[0] != n_micro[1] and int(inputs["num_items_in_batch"]) == sum(n_micro)
    for lt in LOSS_TYPES:
        trainer.loss_type = lt
        total = 0.0
        for b in micro:
            theirs, their_grads = trl_loss(trainer, b)
            ours, our_grads = our_loss(trainer, b, lt)
            scale = 1 if lt == "dapo" else 2  # TRL divides the other types by the accumulation steps
            assert abs(ours.loss.item() - scale * theirs.item()) <= 1e-6, (lt, ours.loss.item(), theirs.item())
            assert_grads_close({n: g / scale for n, g in our_grads.items()}, their_grads)
            total += ours.loss.item()
        if lt == "dapo":  # the micro-batches add up to the token mean over the whole generation batch
            whole, _ = our_loss(trainer, inputs, "dapo")
            assert abs(total - whole.loss.item()) <= 1e-6


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_equal_trl(tiny, tmp_path, scale):
    "group_advantages with TRL's ε = 1e-4 reproduces the advantages TRL computed from the summed rewards."
    trainer = make_trainer(tiny, tmp_path, scale_rewards=scale, max_completion_length=8)
    inputs = rollout(trainer)
    logged = trainer._logs["rewards"]
    rewards = torch.tensor(logged["share_of_e"]) + torch.tensor(logged["short_and_done"])
    assert rewards.numel() == 8 and rewards.std() > 0
    ours = group_advantages(rewards, G, eps=TRL_STD_EPS, scale=scale)
    torch.testing.assert_close(ours, inputs["advantages"], rtol=0, atol=1e-6)
    if scale != "group":  # a different scaling gives other advantages on the same rewards
        assert (ours - group_advantages(rewards, G, eps=TRL_STD_EPS)).abs().max() > 1e-3


# ---- properties of the pieces, for any input ----

_floats = st.floats(-5, 5, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(2, 6), st.data())
def test_advantages_are_centred_scaled_and_affine_invariant(n_groups, group_size, data):
    values = data.draw(st.lists(_floats, min_size=n_groups * group_size, max_size=n_groups * group_size))
    r = torch.tensor(values, dtype=torch.float64)  # float64 stays float64: no round-off in the checks below
    a = group_advantages(r, group_size, eps=0.0).view(n_groups, group_size)
    spread = r.view(n_groups, group_size).std(1) > 1e-3
    constant = r.view(n_groups, group_size).std(1) == 0
    assert a.dtype == torch.float64 and (a[constant] == 0).all()  # a constant group carries no signal
    torch.testing.assert_close(a.sum(1), torch.zeros(n_groups, dtype=torch.float64), rtol=0, atol=1e-9)
    if spread.any():
        torch.testing.assert_close(a[spread].std(1), torch.ones(int(spread.sum()), dtype=torch.float64), rtol=0, atol=1e-9)
    b = group_advantages(3 * r + 7, group_size, eps=0.0).view(n_groups, group_size)
    torch.testing.assert_close(b[spread], a[spread], rtol=0, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 7), st.integers(0, 4), st.data())
def test_aggregation_ignores_padding(B, T, extra, data):
    "Padding columns, whatever their values, change no loss type (Dr. GRPO's L_max is fixed, not the width)."
    vals = torch.tensor(data.draw(st.lists(_floats, min_size=B * T, max_size=B * T))).view(B, T)
    lengths = data.draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    junk = torch.randn(B, extra) * 100
    padded_vals, padded_mask = torch.cat([vals, junk], 1), torch.cat([mask, torch.zeros(B, extra, dtype=torch.long)], 1)
    for lt in LOSS_TYPES:
        a = aggregate_loss(vals, mask, lt, max_completion_length=T + 4)
        b = aggregate_loss(padded_vals, padded_mask, lt, max_completion_length=T + 4)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    if len(set(lengths)) == 1:  # equal lengths: every aggregation is the plain mean
        ref = vals[:, :lengths[0]].mean()
        for lt in LOSS_TYPES:
            torch.testing.assert_close(aggregate_loss(vals, mask, lt, max_completion_length=lengths[0]), ref,
                                       rtol=1e-5, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(-3, 3, width=32), st.floats(-3, 3, width=32), st.floats(-2, 2, width=32)),
                min_size=1, max_size=20))
def test_clipped_surrogate_is_pessimistic_and_clipped_tokens_have_no_gradient(rows):
    logp = torch.tensor([[x[0] for x in rows]], requires_grad=True)
    old = torch.tensor([[x[1] for x in rows]])
    A = torch.tensor([[x[2] for x in rows]])
    s = clipped_surrogate(logp, old, A)
    r = torch.exp(logp - old).detach()
    assert (s.detach() <= r * A + 1e-5).all()  # never above the unclipped surrogate
    s.sum().backward()
    clipped = ((r < 0.8) & (A < 0)) | ((r > 1.2) & (A > 0))
    assert (logp.grad[clipped] == 0).all()
    free = ~clipped & (A != 0) & ((r - 1).abs() < 0.19)  # inside the range: the gradient is r·Â
    torch.testing.assert_close(logp.grad[free], (r * A)[free], rtol=1e-5, atol=1e-6)
