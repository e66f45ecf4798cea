"""Stage 1b (srpo_nb.sft) on the tiny Qwen2.5-VL: exactly which tokens are trained, the frozen vision tower,
overfitting eight rows, checkpoints that resume to the same weights (full and LoRA), the merged export, the
run folder the CLI leaves behind, and the row loader's errors."""
import json
import re

import pytest
import torch
from transformers import TrainerCallback

from srpo_nb.core import mark_checkpoint_complete
from srpo_nb.format import make_messages
from srpo_nb.models import HFGenerator, build_tiny_qwen25vl, load_policy, state_dict_equal
from srpo_nb.sft import (SFTConfig, build_sft_trainer, check_sft_rows, demo_sft_rows, export_merged,
                         latest_checkpoint, load_sft_rows, resolve_checkpoint, run_sft, sft_batch, sft_loss,
                         train_sft)

TAG = re.compile(r"</?(?:think|answer|reflection)>")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_qwen25vl(tmp_path_factory.mktemp("sft") / "tiny")


@pytest.fixture(scope="module")
def rows():
    return demo_sft_rows(8)


def config(tiny, out, **kw):
    return SFTConfig.from_dict(preset="tiny", model=str(tiny), output_dir=str(out), **kw)


class StopAfter(TrainerCallback):
    "Ends training after `step` optimizer steps, as a killed job would (the checkpoint of that step is written first)."
    def __init__(self, step): self.step = step
    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= self.step: control.should_training_stop = True


def greedy_tags(model, processor, rows, max_new_tokens=48):
    prompts = [{"messages": r["messages"][:-1], "images": r["images"]} for r in rows]
    outs = HFGenerator(model, processor).generate(prompts, max_new_tokens=max_new_tokens, temperature=0)
    return sum(len(TAG.findall(o[0])) for o in outs)


# ---------------------------------------------------------------------------------------------- the loss mask

def test_collated_labels_train_exactly_the_assistant_turn(tiny, rows, tmp_path):
    trainer = build_sft_trainer(config(tiny, tmp_path), rows)
    proc, tok = trainer.processing_class, trainer.processing_class.tokenizer
    lengths = [len(r["messages"][-1]["content"][0]["text"]) for r in rows]
    i_long, i_short = lengths.index(max(lengths)), lengths.index(min(lengths))
    batch = sft_batch(trainer, [i_long, i_short])
    pad_id = tok.convert_tokens_to_ids("<|image_pad|>")
    special = {tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|im_start|>")}
    for b, r in enumerate([rows[i_long], rows[i_short]]):
        ids, labels, attn = batch["input_ids"][b], batch["labels"][b], batch["attention_mask"][b]
        n_pads = int(batch["image_grid_thw"][b].prod()) // 4  # one pad per 2x2 merged patch group
        expand = lambda s: s.replace("<|image_pad|>", "<|image_pad|>" * n_pads)
        full = tok.encode(expand(proc.apply_chat_template(r["messages"], tokenize=False)))
        prompt = tok.encode(expand(proc.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True)))
        target = r["messages"][-1]["content"][0]["text"]
        # what the model sees: the chat template, image pads expanded, then padding
        assert ids[:len(full)].tolist() == full and full[:len(prompt)] == prompt
        assert attn[:len(full)].all() and not attn[len(full):].any()
        # what it learns: exactly the assistant text, its <|im_end|> and the newline after it
        trained = (labels != -100).nonzero().flatten().tolist()
        assert trained == list(range(len(prompt), len(full)))
        assert tok.decode(ids[trained]) == target + "<|im_end|>\n"
        assert ids[trained].tolist() == tok.encode(target + "<|im_end|>\n")
        assert torch.equal(labels[trained], ids[trained])
        # masked: system, user, the assistant header, every image pad and vision marker, padding
        assert tok.decode(ids[:len(prompt)]).endswith("<|im_start|>assistant\n")
        assert int((ids == pad_id).sum()) == n_pads > 0
        assert (labels[ids == pad_id] == -100).all()
        assert all(labels[k] == -100 for k in range(len(ids)) if int(ids[k]) in special)
        assert (labels[attn == 0] == -100).all()
    assert not batch["attention_mask"][1].all()  # the shorter row really is padded
    # the loss TRL computes on this batch is Eq. 1 on those tokens
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(sft_loss(trainer.model, batch), trainer.compute_loss(trainer.model, dict(batch)),
                                   rtol=1e-5, atol=1e-5)


def test_assistant_only_loss_off_trains_every_real_token(tiny, rows, tmp_path):
    trainer = build_sft_trainer(config(tiny, tmp_path, assistant_only_loss=False), rows)
    batch = sft_batch(trainer, [0, 1])
    assert torch.equal(batch["labels"] != -100, batch["attention_mask"].bool())


# ------------------------------------------------------------------------- overfit, frozen parts, run folder

def test_full_sft_overfits_keeps_vision_frozen_and_saves_the_run(tiny, rows, tmp_path):
    before, processor = load_policy(tiny, device="cpu", use_unsloth=False)
    tags_before = greedy_tags(before, processor, rows)
    cfg = config(tiny, tmp_path / "run")  # the tiny preset: 40 steps of 4 rows x 2 accumulation, lr 1e-2 cosine
    res = train_sft(cfg, rows)
    assert res.global_step == 40
    losses = [l for _, l in res.losses]
    assert len(losses) == 40 and losses[-1] <= losses[0] / 2, losses
    res.model.eval()
    tags_after = greedy_tags(res.model, processor, rows)
    assert tags_after > tags_before, (tags_before, tags_after)

    start, end = before.state_dict(), res.model.state_dict()
    vision = [k for k in start if "visual" in k]
    assert vision and any("merger" in k for k in vision)
    assert all(torch.equal(start[k], end[k]) for k in vision)  # vision tower and projector: bit-identical
    trained = [n for n, p in res.model.named_parameters() if p.requires_grad]
    assert trained and sorted(trained) == sorted(n for n, _ in before.named_parameters() if "visual" not in n)
    assert all(not torch.equal(start[n], end[n]) for n in trained)  # everything else moved

    # the run folder: full model + processor the standard way, config, metrics, plot, checkpoints
    out = res.output_dir
    reloaded, _ = load_policy(res.final_model_dir, device="cpu", use_unsloth=False)
    assert state_dict_equal(reloaded, res.model)
    assert SFTConfig.from_file(out / "sft_config.yaml") == cfg
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 40 and "train_loss" in metrics["final"]
    assert [h["loss"] for h in metrics["log_history"] if "loss" in h] == losses
    assert len([l for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]) == 40
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-10", "checkpoint-20", "checkpoint-30", "checkpoint-40"]


# ------------------------------------------------------------------------------------------- checkpoints

def interrupted_and_uninterrupted(tiny, rows, tmp_path, **kw):
    "Run 6 steps straight; run the same config stopped after step 3, then resume it from its last checkpoint."
    # 4 rows per step over 8 rows: the step-3 checkpoint sits mid-epoch, so resuming must also skip data
    kw = dict(max_steps=6, per_device_train_batch_size=2, gradient_accumulation_steps=2, save_steps=3, **kw)
    whole = train_sft(config(tiny, tmp_path / "whole", **kw), rows)
    cut = train_sft(config(tiny, tmp_path / "cut", **kw), rows, callbacks=[StopAfter(3)])
    assert (cut.global_step, [p.name for p in cut.output_dir.glob("checkpoint-*")]) == (3, ["checkpoint-3"])
    resumed = train_sft(config(tiny, tmp_path / "cut", resume_from_checkpoint="latest", **kw), rows)
    return whole, cut, resumed


def test_full_resume_matches_uninterrupted_run(tiny, rows, tmp_path):
    whole, cut, resumed = interrupted_and_uninterrupted(tiny, rows, tmp_path)
    assert latest_checkpoint(cut.output_dir).name == "checkpoint-6"
    assert not state_dict_equal(cut.model, whole.model)
    assert resumed.global_step == whole.global_step == 6
    assert state_dict_equal(resumed.model, whole.model)  # the weights, not only the step count (the resume trap, notebook 06)
    assert resumed.losses == whole.losses  # the log history, restored and continued, matches step for step
    assert state_dict_equal(load_policy(resumed.final_model_dir, device="cpu", use_unsloth=False)[0], whole.model)


@pytest.fixture(scope="module")
def lora_runs(tiny, rows, tmp_path_factory):
    return interrupted_and_uninterrupted(tiny, rows, tmp_path_factory.mktemp("lora"), finetune="lora")


def _base_name(peft_name):
    return peft_name.replace("base_model.model.", "", 1).replace(".base_layer", "")


def test_lora_resume_matches_uninterrupted_run(lora_runs):
    whole, cut, resumed = lora_runs
    assert (cut.global_step, resumed.global_step, whole.global_step) == (3, 6, 6)
    assert not state_dict_equal(cut.model, whole.model)
    assert state_dict_equal(resumed.model, whole.model)
    final = resumed.final_model_dir
    assert (final / "adapter_model.safetensors").exists() and not (final / "model.safetensors").exists()


def test_lora_trains_only_the_adapters(lora_runs, tiny, rows, tmp_path):
    whole = lora_runs[0]
    base = load_policy(tiny, device="cpu", use_unsloth=False)[0].state_dict()
    init = build_sft_trainer(config(tiny, tmp_path, finetune="lora"), rows).model.state_dict()  # same seed, same init
    end = whole.model.state_dict()
    adapters = [k for k in end if "lora_" in k]
    assert adapters and not any("visual" in k for k in adapters)
    assert all(not torch.equal(init[k], end[k]) for k in adapters)
    others = [k for k in end if "lora_" not in k]
    assert len(others) == len(base) and all(torch.equal(end[k], base[_base_name(k)]) for k in others)


def test_export_merged_gives_the_lora_model_as_a_plain_checkpoint(lora_runs, tmp_path):
    whole = lora_runs[0]
    merged_dir = export_merged(whole.output_dir, tmp_path / "merged")
    assert (merged_dir / "model.safetensors").exists() and not (merged_dir / "adapter_config.json").exists()
    merged, processor = load_policy(merged_dir, device="cpu", use_unsloth=False)
    rows = demo_sft_rows(2, seed=5)
    text = processor.apply_chat_template(rows[0]["messages"], tokenize=False)
    inputs = processor(text=[text], images=rows[0]["images"], return_tensors="pt")
    whole.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, whole.model(**inputs).logits, rtol=1e-4, atol=1e-4)
    # a checkpoint folder works too; a full-model run is refused by name
    assert (export_merged(whole.output_dir / "checkpoint-3", tmp_path / "m3") / "model.safetensors").exists()
    with pytest.raises(ValueError, match="holds no LoRA adapter"):
        export_merged(tmp_path / "m3", tmp_path / "m4")


# --------------------------------------------------------------------------------------------- CLI, rows

def test_run_sft_from_a_config_file(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SRPO_NB_HOME", str(tmp_path / "home"))
    (tmp_path / "sft.yaml").write_text(f"preset: tiny\nmodel: {tiny}\nmax_steps: 2\nsave_steps: 2\n")
    res = run_sft(str(tmp_path / "sft.yaml"), output_dir=str(tmp_path / "cli"))
    assert res.global_step == 2 and "SFT done: 2 steps" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "cli").iterdir()} >= {"sft_config.yaml", "metrics.json", "metrics.jsonl",
                                                             "loss.png", "final", "checkpoint-2"}
    saved = SFTConfig.from_file(tmp_path / "cli" / "sft_config.yaml")
    assert (saved.max_steps, saved.dataset, saved.output_dir) == (2, "demo", str(tmp_path / "cli"))
    with pytest.raises(ValueError, match="needs --config FILE"):
        run_sft()
    with pytest.raises(ValueError, match="unknown SFTConfig field"):
        run_sft(preset="tiny", learning_rat=1.0)


def test_load_sft_rows_sources_and_errors(rows, tmp_path):
    from datasets import Dataset
    ds = load_sft_rows(rows)
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    ds.save_to_disk(str(tmp_path / "rows"))
    for src in (tmp_path / "rows.parquet", tmp_path / "rows", Dataset.from_list(rows)):
        got = load_sft_rows(src)
        assert got["messages"] == ds["messages"] and got[0]["images"][0].size == rows[0]["images"][0].size
    assert len(load_sft_rows("demo")) == 8 and len(load_sft_rows(rows, max_rows=2)) == 2
    assert check_sft_rows(ds) == {"rows": 8, "images": 8, "bad_format": 0}
    bad_target = [dict(rows[0], messages=rows[0]["messages"][:-1] + [{"role": "assistant", "content": [{"type": "text", "text": "just 5"}]}])]
    with pytest.warns(UserWarning, match="1 of 1 SFT targets do not parse"):
        load_sft_rows(bad_target)
    cases = [
        ([dict(rows[0], images=[])], "row 0 (id 'demo-0-0'): 1 image slot(s) in the messages but 0 image(s)"),
        ([dict(rows[0], messages=make_messages("q", 1))], "need a user turn and one assistant turn"),
        ([dict(rows[0], messages=rows[0]["messages"] + rows[0]["messages"][-1:])], "one assistant turn, last"),
        ([{"id": "x", "messages": rows[0]["messages"]}], "lack column(s) ['images']"),
        ([], "the list is empty"),
        (tmp_path / "rows.json", "SFT rows not found"),
        (None, "set SFTConfig.dataset"),
    ]
    for src, msg in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=re.escape(msg)):
            load_sft_rows(src)
    (tmp_path / "rows.csv").write_text("a\n")
    with pytest.raises(ValueError, match=r"\.parquet file or a save_to_disk folder"):
        load_sft_rows(tmp_path / "rows.csv")
    with pytest.raises(TypeError, match="got int"):
        load_sft_rows(3)


def test_resolve_checkpoint(tmp_path):
    assert resolve_checkpoint(SFTConfig(output_dir=str(tmp_path))) is None
    assert resolve_checkpoint(SFTConfig(output_dir=str(tmp_path), resume_from_checkpoint="latest")) is None  # fresh start
    for n in (5, 40, 100, 120):
        (tmp_path / f"checkpoint-{n}").mkdir()
        (tmp_path / f"checkpoint-{n}" / "trainer_state.json").write_text("{}")
        if n < 120: mark_checkpoint_complete(tmp_path / f"checkpoint-{n}")   # checkpoint-120: killed during its save
    assert resolve_checkpoint(SFTConfig(output_dir=str(tmp_path), resume_from_checkpoint="latest")).name == "checkpoint-100"
    assert resolve_checkpoint(SFTConfig(resume_from_checkpoint=str(tmp_path / "checkpoint-40"))).name == "checkpoint-40"
    with pytest.raises(FileNotFoundError, match="not a trainer checkpoint"):
        resolve_checkpoint(SFTConfig(resume_from_checkpoint=str(tmp_path)))


def test_resolve_model_builds_the_tiny_model_once(tmp_path, monkeypatch):
    from srpo_nb.models import resolve_model
    monkeypatch.setenv("SRPO_NB_HOME", str(tmp_path))
    assert resolve_model("Qwen/Qwen2.5-VL-7B-Instruct") == "Qwen/Qwen2.5-VL-7B-Instruct"
    path = resolve_model("tiny")
    assert path == str(tmp_path / "models" / "tiny-qwen25vl-small-seed0")
    stamp = (tmp_path / "models" / "tiny-qwen25vl-small-seed0" / "config.json").stat().st_mtime_ns
    assert resolve_model("tiny") == path and (tmp_path / "models" / "tiny-qwen25vl-small-seed0" / "config.json").stat().st_mtime_ns == stamp
    assert not list((tmp_path / "models").glob(".building-*"))
