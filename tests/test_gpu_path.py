"""The GPU path, checked on a CPU: the device each process trains on, the precision that keeps small updates, LoRA
built by the trainers from `peft_config`, unsloth asked for what we mean, and the arguments vLLM gets. CUDA queries,
`unsloth` and `vllm` are stand-ins that record what srpo_nb passes; the arguments were checked against the real
libraries' sources (unsloth 2026.10.9 `FastModel.from_pretrained(full_finetuning=…)` / `get_peft_model(random_state=…)`,
vllm `LLM(max_model_len=…, mm_processor_kwargs=…, limit_mm_per_prompt=…)`, TRL 1.15 `GRPOConfig.vllm_*`)."""
import importlib.machinery
import os
import subprocess
import sys
import textwrap
import types
from contextlib import contextmanager
from unittest import mock

import pytest
import torch

from srpo_nb import grpo as grpo_mod
from srpo_nb import models
from srpo_nb import sft as sft_mod
from srpo_nb.grpo import GRPOTrainConfig, train_grpo, trl_args as grpo_args, vllm_args
from srpo_nb.models import VLLMGenerator, build_tiny_qwen25vl, load_policy, precision_plan, process_device
from srpo_nb.sft import SFTConfig, build_sft_trainer
from grpo_helpers import share_of_e


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_qwen25vl(tmp_path_factory.mktemp("gpu_path") / "tiny")


@contextmanager
def fake_gpu(name="NVIDIA H100 80GB HBM3", bf16=True):
    with mock.patch("torch.cuda.is_available", return_value=True), \
         mock.patch("torch.cuda.is_bf16_supported", return_value=bf16), \
         mock.patch("torch.cuda.get_device_name", return_value=name):
        yield


class Stop(Exception):
    "Raised by a recording stand-in to end a run once the call under test was made."


# ---- 2. one device per process --------------------------------------------------------------------------------------

def test_each_process_gets_its_own_gpu():
    with fake_gpu(), mock.patch.dict(os.environ, {"LOCAL_RANK": "1"}):
        assert process_device() == torch.device("cuda", 1)
        assert process_device("auto") == torch.device("cuda", 1)
    assert process_device() == torch.device("cpu")


@pytest.mark.parametrize("stage", ["grpo", "sft"])
def test_training_arguments_exist_before_the_policy_loads(tiny, tmp_path, monkeypatch, stage):
    "Under torchrun with CUDA, rank 1 loads onto its own device, after the TrainingArguments exist."
    calls = []
    mod = grpo_mod if stage == "grpo" else sft_mod
    real_args = mod.trl_args
    monkeypatch.setattr(mod, "trl_args", lambda *a, **k: calls.append("args") or real_args(*a, **k))

    def fake_load(*a, **k):
        calls.append(("load", k.get("device")))
        with fake_gpu(), mock.patch.dict(os.environ, {"LOCAL_RANK": "1"}):
            calls.append(("device", models.process_device(k.get("device"))))
        raise Stop
    monkeypatch.setattr(mod, "load_policy", fake_load)
    with pytest.raises(Stop):
        if stage == "grpo":
            train_grpo(GRPOTrainConfig.from_dict(preset="tiny", model=str(tiny), output_dir=str(tmp_path / "g")))
        else:
            build_sft_trainer(SFTConfig.from_dict(preset="tiny", model=str(tiny), output_dir=str(tmp_path / "s")))
    assert calls[0] == "args", calls
    assert calls[1] == ("load", "auto"), calls
    assert calls[2] == ("device", torch.device("cuda", 1)), calls


# ---- 3. precision that learns ---------------------------------------------------------------------------------------

def test_full_finetuning_keeps_fp32_master_weights_on_a_bf16_gpu():
    with fake_gpu():
        p = precision_plan()
        assert (p.compute, p.weights, p.bf16) == ("bfloat16", "float32", True)
        assert precision_plan(pure_bf16=True).weights == "bfloat16"  # only when asked for
        assert precision_plan(lora=True).weights == "bfloat16"        # a frozen base in half precision


def _changed_share(before, after, had_grad):
    changed = total = 0
    for n, g in had_grad.items():
        m = g != 0
        changed += int(((after[n] != before[n]) & m).sum()); total += int(m.sum())
    return changed / total, total


class GradRecorder:
    "A TrainerCallback recording which trained weights received a non-zero gradient before the optimizer step."
    def __new__(cls, model_getter, out):
        from transformers import TrainerCallback
        class _R(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, **kw):
                out.update({n: p.grad.detach().clone() for n, p in model_getter().named_parameters()
                            if p.requires_grad and p.grad is not None})
        return _R()


def test_sft_step_at_paper_lr_changes_the_weights(tiny, tmp_path):
    "SFT at the paper's lr 1e-5 with bf16 compute: one AdamW step changes >= 99% of the weights that got a gradient."
    cfg = SFTConfig.from_dict(preset="tiny", model=str(tiny), output_dir=str(tmp_path / "sft"), dtype="bfloat16",
                              learning_rate=1e-5, warmup_ratio=0.0, lr_scheduler_type="constant", max_steps=1,
                              gradient_accumulation_steps=1, save_steps=100)
    grads = {}
    trainer = build_sft_trainer(cfg)
    trainer.add_callback(GradRecorder(lambda: trainer.model, grads))
    assert next(trainer.model.parameters()).dtype == torch.float32   # fp32 master weights
    assert trainer.args.bf16                                         # bf16 compute (CPU autocast here)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    share, n = _changed_share(before, after, grads)
    assert n > 100_000 and share >= 0.99, (share, n)


def test_grpo_step_at_paper_lr_changes_the_weights(tiny, tmp_path):
    "GRPO at the paper's lr 1e-6 with bf16 compute: one AdamW step changes >= 99% of the weights that got a gradient."
    cfg = GRPOTrainConfig.from_dict(preset="tiny", model=str(tiny), output_dir=str(tmp_path / "grpo"), dtype="bfloat16",
                                    learning_rate=1e-6, warmup_ratio=0.0, max_steps=1, online_filter=False,
                                    save_steps=100, log_completions=False, verbose=False, max_completion_length=16)
    grads, state = {}, {}
    # the trainer is built inside train_grpo: a callback records the weights when training begins
    from transformers import TrainerCallback
    class Snap(TrainerCallback):
        def on_train_begin(self, args, st, control, model=None, **kw):
            state["model"] = model
            state["before"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            state["dtype"] = next(model.parameters()).dtype
    res = train_grpo(cfg, reward_funcs=[share_of_e], keep_trainer=True,
                     callbacks=[Snap(), GradRecorder(lambda: state["model"], grads)])
    assert state["dtype"] == torch.float32 and res.trainer.args.bf16
    after = {n: p.detach().clone() for n, p in state["model"].named_parameters() if p.requires_grad}
    share, n = _changed_share(state["before"], after, grads)
    assert n > 100_000 and share >= 0.99, (share, n)


# ---- 4. LoRA built by the trainers ----------------------------------------------------------------------------------

def test_grpo_lora_is_built_by_trl_from_peft_config(tiny, tmp_path, monkeypatch):
    seen = {}
    real = grpo_mod.srpo_trainer_class()

    class Recording(real):
        def __init__(self, *a, **k):
            seen["peft_config"], seen["model_is_peft"] = k.get("peft_config"), hasattr(k["model"], "peft_config")
            super().__init__(*a, **k)
    monkeypatch.setattr(grpo_mod, "srpo_trainer_class", lambda: Recording)
    cfg = GRPOTrainConfig.from_dict(preset="tiny", model=str(tiny), output_dir=str(tmp_path / "g"), lora=True,
                                    max_steps=1, online_filter=False, log_completions=False, verbose=False)
    res = train_grpo(cfg, reward_funcs=[share_of_e], keep_trainer=True)
    import peft
    assert isinstance(seen["peft_config"], peft.LoraConfig) and not seen["model_is_peft"]
    names = [n for n, p in res.trainer.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names) and not any("visual" in n for n in names)


def test_sft_lora_is_built_by_trl_from_peft_config(tiny, tmp_path, monkeypatch):
    seen = {}
    real = sft_mod._trainer_class()

    class Recording(real):
        def __init__(self, *a, **k):
            seen["peft_config"], seen["model_is_peft"] = k.get("peft_config"), hasattr(k["model"], "peft_config")
            super().__init__(*a, **k)
    monkeypatch.setattr(sft_mod, "_trainer_class", lambda: Recording)
    trainer = build_sft_trainer(SFTConfig.from_dict(preset="tiny", model=str(tiny), output_dir=str(tmp_path / "s"),
                                                    finetune="lora"))
    import peft
    assert isinstance(seen["peft_config"], peft.LoraConfig) and not seen["model_is_peft"]
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names) and not any("visual" in n for n in names)


# ---- 5. unsloth -----------------------------------------------------------------------------------------------------

def fake_unsloth(tiny, calls):
    "A stand-in `unsloth` module: FastVisionModel records its calls and returns the real tiny model."
    from transformers import AutoModelForImageTextToText, AutoProcessor
    mod = types.ModuleType("unsloth")
    mod.__spec__ = importlib.machinery.ModuleSpec("unsloth", None)

    class FastVisionModel:
        @staticmethod
        def from_pretrained(name, **kw):
            calls.append(("from_pretrained", name, kw))
            return AutoModelForImageTextToText.from_pretrained(tiny), AutoProcessor.from_pretrained(tiny)

        @staticmethod
        def get_peft_model(model, **kw):
            calls.append(("get_peft_model", kw))
            import peft
            return peft.get_peft_model(model, peft.LoraConfig(r=kw["r"], lora_alpha=kw["lora_alpha"],
                                                              target_modules=kw["target_modules"]))

        @staticmethod
        def for_training(model):
            calls.append(("for_training",))
    mod.FastVisionModel = FastVisionModel
    return mod


def test_unsloth_is_asked_for_full_finetuning(tiny, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "unsloth", fake_unsloth(tiny, calls))
    monkeypatch.setattr(models, "has_cuda", lambda: True)
    load_policy(tiny, lora=None, use_unsloth=True, device="cpu")
    _, name, kw = calls[0]
    assert kw["full_finetuning"] is True and kw["load_in_4bit"] is False, kw


def test_unsloth_lora_keeps_the_fast_path_and_the_seed(tiny, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "unsloth", fake_unsloth(tiny, calls))
    monkeypatch.setattr(models, "has_cuda", lambda: True)
    model, _ = load_policy(tiny, lora=True, use_unsloth=True, device="cpu", seed=7)
    assert calls[0][2]["full_finetuning"] is False
    kw = calls[1][1]
    assert (kw["lora_dropout"], kw["random_state"], kw["finetune_vision_layers"]) == (0.0, 7, False), kw
    assert kw["r"] == 16 and kw["use_gradient_checkpointing"] == "unsloth"
    # an explicit dropout is the user's choice
    calls.clear()
    load_policy(tiny, lora={"lora_dropout": 0.1}, use_unsloth=True, device="cpu")
    assert calls[1][1]["lora_dropout"] == 0.1


def test_unsloth_is_imported_before_transformers(tmp_path):
    "In a fresh process: srpo_nb's stage modules import no transformers/trl/peft, so import_unsloth comes first."
    pkg = tmp_path / "unsloth"; pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        import sys, json, os
        json.dump(sorted(m for m in ("transformers", "trl", "peft") if m in sys.modules), open(os.environ["SEEN"], "w"))
    """))
    seen = tmp_path / "seen.json"
    code = "import srpo_nb.sft, srpo_nb.grpo, srpo_nb.cli; from srpo_nb.models import import_unsloth; import_unsloth()"
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "SEEN": str(seen)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    assert seen.read_text() == "[]"
    late = subprocess.run([sys.executable, "-W", "always", "-c", "import transformers; from srpo_nb.models import "
                           "import_unsloth; import_unsloth()"], env=env, capture_output=True, text=True)
    assert "unsloth is imported after transformers" in late.stderr


@pytest.mark.parametrize("stage", ["grpo", "sft"])
def test_trainers_import_unsloth_first(tiny, tmp_path, monkeypatch, stage):
    order = []
    mod = grpo_mod if stage == "grpo" else sft_mod
    monkeypatch.setattr(mod, "use_unsloth_now", lambda u: True)
    monkeypatch.setattr(mod, "import_unsloth", lambda: order.append("unsloth"))
    monkeypatch.setattr(mod, "trl_args", lambda *a, **k: order.append("args") or (_ for _ in ()).throw(Stop()))
    with pytest.raises(Stop):
        if stage == "grpo":
            train_grpo(GRPOTrainConfig.from_dict(preset="tiny", model=str(tiny), output_dir=str(tmp_path / "g")))
        else:
            build_sft_trainer(SFTConfig.from_dict(preset="tiny", model=str(tiny), output_dir=str(tmp_path / "s")))
    assert order == ["unsloth", "args"]


# ---- 6. small GPUs --------------------------------------------------------------------------------------------------

def test_t4_gets_fp16_and_qlora():
    with fake_gpu("Tesla T4", bf16=False):
        p = precision_plan()
        assert (p.compute, p.fp16, p.bf16) == ("float16", True, False)
        q = precision_plan(lora=True, load_in_4bit=True)
        assert (q.load_in_4bit, q.weights, q.fp16) == (True, "float16", True)
        with pytest.raises(ValueError, match="has no bfloat16"):
            precision_plan("bfloat16")


def test_fp16_adapters_are_trained_in_fp32(tiny):
    "fp16 loss scaling cannot unscale fp16 gradients: the trainable adapters are cast to fp32, the base stays fp16."
    import peft
    model, _ = load_policy(tiny, dtype=torch.float16, device="cpu")
    model = peft.get_peft_model(model, models.lora_config(True), autocast_adapter_dtype=False)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float16}
    assert models.cast_trainable(model) > 0
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.float16}


def test_qlora_config_asks_bitsandbytes_for_nf4(monkeypatch):
    monkeypatch.setattr(models, "optional_import", lambda *a, **k: None)  # bitsandbytes itself is a GPU-only extra
    with fake_gpu("Tesla T4", bf16=False):
        q = models.bnb_config(precision_plan(lora=True, load_in_4bit=True))
    assert (q.load_in_4bit, q.bnb_4bit_quant_type, q.bnb_4bit_compute_dtype) == (True, "nf4", torch.float16)
    assert "visual" in q.llm_int8_skip_modules
    assert models.bnb_config(precision_plan()) is None
    with pytest.raises(ValueError, match="needs lora"):
        GRPOTrainConfig(load_in_4bit=True)
    with pytest.raises(ValueError, match="needs finetune='lora'"):
        SFTConfig(load_in_4bit=True)


# ---- 7. vLLM --------------------------------------------------------------------------------------------------------

def test_grpo_passes_the_vllm_settings_to_trl(tmp_path, monkeypatch):
    cfg = GRPOTrainConfig(output_dir=str(tmp_path), use_vllm=True, vllm_tensor_parallel_size=2,
                          vllm_enable_sleep_mode=True)
    v = vllm_args(cfg)
    assert v["vllm_max_model_length"] == 1024 + 2048  # prompt + completion, not the model's 128k context
    assert (v["vllm_tensor_parallel_size"], v["vllm_enable_sleep_mode"]) == (2, True)
    monkeypatch.setattr(grpo_mod, "has_cuda", lambda: True)
    monkeypatch.setattr(grpo_mod, "is_installed", lambda m: True)
    server = grpo_args(cfg.replace(vllm_mode="server", vllm_server_base_url="http://node0:8000"), n_processes=8)
    assert (server.use_vllm, server.vllm_mode, server.vllm_server_base_url) == (True, "server", "http://node0:8000")
    assert server.vllm_max_model_length == 3072 and server.vllm_tensor_parallel_size == 2
    assert grpo_args(cfg.replace(vllm_max_model_length=4096), n_processes=8).vllm_max_model_length == 4096


def fake_vllm(calls):
    mod = types.ModuleType("vllm")
    mod.__spec__ = importlib.machinery.ModuleSpec("vllm", None)

    class LLM:
        def __init__(self, **kw): calls.append(("LLM", kw))
        def generate(self, inputs, params, use_tqdm=False):
            calls.append(("generate", inputs, params))
            out = types.SimpleNamespace
            return [out(outputs=[out(text=f"answer {i}.{j}") for j in range(params["n"])]) for i in range(len(inputs))]
    mod.LLM = LLM
    mod.SamplingParams = lambda **kw: kw
    return mod


def test_vllm_generator_arguments(tiny, monkeypatch):
    from PIL import Image
    from srpo_nb.format import make_messages
    calls = []
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm(calls))
    gen = VLLMGenerator(str(tiny), max_model_len=3072, max_pixels=640 * 28 * 28, min_pixels=3136)
    im = Image.new("RGB", (64, 64), "white")
    prompts = [{"messages": make_messages("Compare the two charts.", 2), "images": [im, im]},
               {"messages": make_messages("How tall is the bar?", 1), "images": [im]},
               {"messages": make_messages("What is 1+1?", 0)}]
    out = gen.generate(prompts, n=2, max_new_tokens=64, temperature=1.0, seed=3)
    assert [len(o) for o in out] == [2, 2, 2]
    (_, kw), (_, inputs, params) = calls
    assert kw["max_model_len"] == 3072
    assert kw["mm_processor_kwargs"] == {"max_pixels": 640 * 28 * 28, "min_pixels": 3136}
    assert kw["limit_mm_per_prompt"] == {"image": 2}  # from the data: the most images any prompt has
    assert len(inputs) == 3 and len(inputs[0]["multi_modal_data"]["image"]) == 2 and "multi_modal_data" not in inputs[2]
    assert (params["n"], params["max_tokens"], params["seed"]) == (2, 64, 3)
    assert sum(c[0] == "generate" for c in calls) == 1  # the whole batch in one call
    with pytest.raises(ValueError, match="max_images_per_prompt=3"):
        gen.generate([{"messages": make_messages("Three charts.", 3), "images": [im, im, im]}])
