"""The shipped accelerate configs (configs/accelerate/{ddp,fsdp,zero2,zero3}.yaml) and what the
launcher makes of them; DeepSpeed ZeRO on a machine without deepspeed and without GPUs.

What runs here: each config read, validated and turned into an `accelerate launch` command that
accelerate's own argument handling reads back (launcher, distributed type, the environment the
workers get); the refusals; precision following our dtype; and the ZeRO-3 save/fuse path of a
real Trainer with stand-ins for what DeepSpeed returns (the gathered 16-bit state dict, its
engine's save_checkpoint). What does not run here: a DeepSpeed training run (no deepspeed package,
no GPU) - `test_deepspeed_zero3_run` runs it where both exist.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dllm_trainer.config import TrainConfig
from dllm_trainer.errors import ConfigError
from dllm_trainer.training import distributed, launcher
from dllm_trainer.training.distributed import read_layout

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "accelerate"
CHAT = REPO / "src" / "dllm_trainer" / "assets" / "chat_small.jsonl"


def cfg_for(name: str | None, **kw) -> TrainConfig:
    raw = dict(model_name="m", dataset_name="d", train_device="cuda")
    if name:
        raw["accelerate_config_file"] = str(CONFIGS / f"{name}.yaml")
    raw.update(kw)
    return TrainConfig.from_dict(raw)


def accelerate_reads(plan) -> tuple[object, dict]:
    """What `accelerate launch` makes of our argument list: its parsed args and the workers' environment."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = plan.argv[plan.argv.index(launcher.LAUNCH_MODULE) + 1:]
    parsed, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(args))
    if parsed.use_deepspeed:
        parsed.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
        _, env = prepare_deepspeed_cmd_env(parsed)
    else:
        env = prepare_multi_gpu_env(parsed)
    return parsed, env


@pytest.fixture
def deepspeed_present(monkeypatch):
    monkeypatch.setattr(distributed, "deepspeed_installed", lambda: True)


def test_shipped_configs_read_as_intended():
    fsdp, zero2, zero3, ddp = (read_layout(str(CONFIGS / f"{n}.yaml")) for n in ("fsdp", "zero2", "zero3", "ddp"))
    assert (fsdp.kind, fsdp.fsdp_version, fsdp.sharding, fsdp.state_dict_type) == ("fsdp", 2, "full", "SHARDED_STATE_DICT")
    assert (zero2.kind, zero2.zero_stage, zero2.sharding) == ("deepspeed", 2, "grads")
    assert (zero3.kind, zero3.zero_stage, zero3.sharding, zero3.zero3_save_16bit_model) == ("deepspeed", 3, "full", True)
    assert ddp.kind == "ddp" and all(x.num_processes == 8 for x in (fsdp, zero2, zero3, ddp))


def test_fsdp_config_launches_accelerates_fsdp_with_the_models_wrap_policy():
    plan = launcher.build_launch(cfg_for("fsdp"), "/tmp/job.json", gpu_count=8, base_env={})
    assert "--multi_gpu" not in plan.argv and plan.world_size == 8 and "FSDP2 (full-shard)" in plan.description
    parsed, env = accelerate_reads(plan)
    assert parsed.use_fsdp and not parsed.use_deepspeed and parsed.num_processes == 8
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP" and "FSDP_TRANSFORMER_CLS_TO_WRAP" not in env
    assert env["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT"


def test_wrap_policy_comes_from_the_models_no_split_modules(llada_tiny, dream_tiny):
    """accelerate wraps the classes a model names in _no_split_modules: ours name their blocks."""
    import dllm_trainer.models  # noqa: F401
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import AutoModel

    for path, block in ((llada_tiny, "LLaDALlamaBlock"), (dream_tiny, "DreamDecoderLayer")):
        model = AutoModel.from_pretrained(str(path))
        assert list(model._no_split_modules) == [block]
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
        plugin.set_auto_wrap_policy(model)
        assert plugin.transformer_cls_names_to_wrap == [block]
        wrapped = [m for m in model.modules() if plugin.auto_wrap_policy(module=m, recurse=False, nonwrapped_numel=0)]
        assert len(wrapped) == model.config.num_hidden_layers and all(type(m).__name__ == block for m in wrapped)


def test_fsdp_config_on_cpu_keeps_its_settings():
    cfg = cfg_for("fsdp", train_device="cpu", num_processes=2, main_process_port=29511)
    plan = launcher.build_launch(cfg, "/tmp/job.json", base_env={})
    assert plan.env["CUDA_VISIBLE_DEVICES"] == "" and plan.env["ACCELERATE_USE_CPU"] == "true"
    assert "--multi_gpu" not in plan.argv and "--cpu" not in plan.argv  # either would drop the FSDP settings
    parsed, env = accelerate_reads(plan)
    assert parsed.use_fsdp and parsed.num_processes == 2 and env["ACCELERATE_USE_FSDP"] == "true"


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_configs_produce_a_deepspeed_launch(deepspeed_present, stage):
    plan = launcher.build_launch(cfg_for(f"zero{stage}"), "/tmp/job.json", gpu_count=8, base_env={})
    assert f"DeepSpeed ZeRO-{stage}" in plan.description and plan.world_size == 8
    parsed, env = accelerate_reads(plan)
    assert parsed.use_deepspeed and env["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == str(stage)
    if stage == 3:
        assert env["ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"] == "true"


def test_zero3_without_16bit_saving_in_the_file_still_gathers(deepspeed_present, tmp_path):
    text = (CONFIGS / "zero3.yaml").read_text().replace("zero3_save_16bit_model: true", "zero3_save_16bit_model: false")
    (tmp_path / "z3.yaml").write_text(text)
    plan = launcher.build_launch(cfg_for(None, accelerate_config_file=str(tmp_path / "z3.yaml")), "/tmp/job.json",
                                 gpu_count=8, base_env={})
    _, env = accelerate_reads(plan)
    assert env["ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"] == "true"


@pytest.mark.parametrize("changes,needle", [
    (dict(accelerate_config_file="zero3"), "the 'deepspeed' package is not installed"),
    (dict(accelerate_config_file="zero2", train_device="cpu", num_processes=2), "needs train_device 'cuda'"),
    (dict(accelerate_config_file="fsdp", load_in_4bit=True), "load_in_4bit cannot be combined with"),
    (dict(accelerate_config_file="fsdp_ac", gradient_checkpointing=True), "recomputed twice"),
    (dict(accelerate_config_file="fsdp", gpu_ids="auto"), "starts 8 processes per machine"),
], ids=["no-deepspeed", "zero-on-cpu", "4bit-sharded", "double-checkpointing", "more-processes-than-gpus"])
def test_impossible_layouts_are_refused_before_launch(tmp_path, monkeypatch, changes, needle):
    monkeypatch.setattr(distributed, "deepspeed_installed", lambda: False)
    (tmp_path / "fsdp_ac.yaml").write_text((CONFIGS / "fsdp.yaml").read_text().replace(
        "fsdp_activation_checkpointing: false", "fsdp_activation_checkpointing: true"))
    name = changes.pop("accelerate_config_file")
    path = tmp_path / "fsdp_ac.yaml" if name == "fsdp_ac" else CONFIGS / f"{name}.yaml"
    cfg = cfg_for(None, accelerate_config_file=str(path), lora=True, **changes)
    with pytest.raises(ConfigError) as err:
        launcher.build_launch(cfg, "/tmp/job.json", gpu_count=4 if "gpu_ids" in changes else 8, base_env={})
    assert needle in str(err.value)
    if name == "zero3":
        assert "pip install" in str(err.value)


def test_a_zero_config_without_deepspeed_fails_as_one_clear_line(tmp_path, monkeypatch, no_workers, capsys):
    from dllm_trainer.app import run_job
    from dllm_trainer.hosts.standalone import StandaloneReporter

    monkeypatch.setattr(distributed, "deepspeed_installed", lambda: False)
    cfg = TrainConfig.from_dict(dict(model_name="some/hub-model", dataset_name=str(CHAT), output_dir=str(tmp_path / "o"),
                                     training_method="llada", accelerate_config_file=str(CONFIGS / "zero3.yaml")))
    assert run_job(cfg, StandaloneReporter(), gpu_count=8) != 0
    err = capsys.readouterr().err
    assert err.count("[dllm-error]") == 1 and "deepspeed" in err and "Traceback" not in err


@pytest.mark.parametrize("dtype,env_value,expected", [("float32", "bf16", "no"), ("bfloat16", "no", "bf16")])
def test_mixed_precision_follows_our_dtype_not_the_accelerate_config(monkeypatch, tmp_path, dtype, env_value, expected):
    from dllm_trainer.training.train import build_training_args

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", env_value)  # what accelerate launch exports from the config
    cfg = TrainConfig.from_dict(dict(model_name="m", dataset_name="d", output_dir=str(tmp_path), train_device="cpu", dtype=dtype))
    args = build_training_args(cfg, getattr(torch, dtype), has_eval=False)
    assert args.mixed_precision == expected and os.environ["ACCELERATE_MIXED_PRECISION"] == expected


# ---------------------------------------------------------------------------------------------
# ZeRO-3: the final save gathers the 16-bit weights (stand-ins for DeepSpeed)
# ---------------------------------------------------------------------------------------------


class _Engine:
    """Stands in for DeepSpeed's engine under ZeRO-3: its config and save_checkpoint, and the
    consolidated 16-bit state dict of the trainable parameters (what ZeRO-3 gathers for PEFT)."""

    config = {"zero_optimization": {"stage": 3}}

    def __init__(self, trainable: dict):
        self.trainable = trainable

    def save_checkpoint(self, output_dir, exclude_frozen_parameters=False):
        os.makedirs(os.path.join(output_dir, "global_step1"), exist_ok=True)

    def _zero3_consolidated_16bit_state_dict(self, exclude_frozen_parameters=False):
        return self.trainable


def _trainer(tmp_path, lora: bool):
    sys.path.insert(0, str(Path(__file__).parent))
    from rel_helpers import llada_job, make_llada_dir

    from dllm_trainer.training.loading import load_for_training
    from dllm_trainer.training.train import build_training_args
    from dllm_trainer.training.trainer import DiffusionSettings, MDLMTrainer

    model_dir = make_llada_dir(tmp_path / "llada")
    cfg = TrainConfig.from_dict(llada_job(model_dir, tmp_path / "out", lora=lora, lora_r=4, lora_alpha=8))
    loaded = load_for_training(cfg, log=lambda *_: None)
    trainer = MDLMTrainer(model=loaded.model, args=build_training_args(cfg, torch.float32, has_eval=False),
                          processing_class=loaded.tokenizer,
                          diffusion=DiffusionSettings(family=loaded.family, mask_token_id=loaded.mask_token_id))
    return trainer, model_dir


def _as_zero3(trainer, monkeypatch, gathered: dict, trainable: dict | None = None, gather_enabled: bool = True):
    engine = _Engine(trainable or {})

    def get_state_dict(model, unwrap=True):
        if not gather_enabled:  # accelerate's own message when stage3_gather_16bit_weights_on_model_save is off
            raise ValueError("Cannot get 16bit model weights because `stage3_gather_16bit_weights_on_model_save` "
                             "in DeepSpeed config is False.")
        return gathered

    trainer.is_deepspeed_enabled = True
    trainer.deepspeed = trainer.model_wrapped = engine
    monkeypatch.setattr(trainer.accelerator, "get_state_dict", get_state_dict)


def test_zero3_full_finetune_saves_the_gathered_16bit_weights_as_one_checkpoint(tmp_path, monkeypatch, one_thread):
    import dllm_trainer.models  # noqa: F401
    from safetensors.torch import load_file
    from transformers import AutoModel

    from dllm_trainer.training.distributed import save_full_model

    trainer, _ = _trainer(tmp_path, lora=False)
    # the gathered state: every parameter in 16 bits, values the local model does not have
    gathered = {k: (v.detach() + 0.25).to(torch.bfloat16) for k, v in trainer.model.state_dict().items()}
    _as_zero3(trainer, monkeypatch, gathered)
    out = tmp_path / "final"
    save_full_model(trainer, str(out))
    saved = load_file(str(out / "model.safetensors"))
    assert set(saved) == set(gathered) and all(torch.equal(saved[k], gathered[k]) for k in saved)
    reloaded = AutoModel.from_pretrained(str(out))  # one process, one full checkpoint
    q = "model.transformer.blocks.0.q_proj.weight"
    assert torch.equal(reloaded.state_dict()[q].to(torch.bfloat16), gathered[q])


def test_zero3_lora_adaptor_from_the_gathered_weights_fuses(tmp_path, monkeypatch, one_thread):
    from safetensors.torch import load_file

    from dllm_trainer.training import export
    from dllm_trainer.training.distributed import save_full_model

    trainer, model_dir = _trainer(tmp_path, lora=True)
    trainable = {k: (torch.randn_like(v) * 0.1).to(torch.bfloat16)
                 for k, v in trainer.model.named_parameters() if v.requires_grad}
    _as_zero3(trainer, monkeypatch, gathered={}, trainable=trainable)
    adaptor = tmp_path / "adaptor"
    save_full_model(trainer, str(adaptor))
    assert len(load_file(str(adaptor / "adapter_model.safetensors"))) == len(trainable)
    fused = export.fuse_adaptor(str(model_dir), str(adaptor), str(tmp_path / "fused"), family_name="llada",
                                log=lambda *_: None)
    base = load_file(str(model_dir / "model.safetensors"))
    got = load_file(str(Path(fused) / "model.safetensors"))
    pre = "base_model.model.model.transformer.blocks.0.q_proj"
    a, b = trainable[f"{pre}.lora_A.default.weight"].float(), trainable[f"{pre}.lora_B.default.weight"].float()
    want = base["model.transformer.blocks.0.q_proj.weight"] + (b @ a) * (8 / 4)
    assert torch.allclose(got["model.transformer.blocks.0.q_proj.weight"], want, atol=1e-5)


def test_zero3_without_gathering_is_a_clear_error(tmp_path, monkeypatch, one_thread):
    from dllm_trainer.training.distributed import WeightsNotGathered, save_full_model

    trainer, _ = _trainer(tmp_path, lora=False)
    _as_zero3(trainer, monkeypatch, gathered={}, gather_enabled=False)
    with pytest.raises(WeightsNotGathered) as err:
        save_full_model(trainer, str(tmp_path / "final"))
    assert "zero3_save_16bit_model: true" in str(err.value)


@pytest.mark.slow
@pytest.mark.skipif(not (torch.cuda.device_count() >= 2 and distributed.deepspeed_installed()),
                    reason="DeepSpeed ZeRO needs the deepspeed package (an optional extra, not installed here) and "
                           "CUDA GPUs (2 for a sharded run); on CPU only the launch, the refusals and the save/fuse "
                           "path with stand-ins run (above)")
def test_deepspeed_zero3_run(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from lifecycle_tl import clean_env
    from rel_helpers import make_llada_dir

    model = make_llada_dir(tmp_path / "llada")
    cfg = dict(model_name=str(model), dataset_name=str(CHAT), output_dir=str(tmp_path / "out"), training_method="llada",
               train_device="cuda", gpu_ids="0,1", accelerate_config_file=str(CONFIGS / "zero3.yaml"), lora=True,
               lora_r=4, lora_alpha=8, batch_size=2, num_train_epochs=0, train_steps=4, save_steps=2, max_length=64,
               eval_strategy="no", adaptor_name="z3")
    job = tmp_path / "job.json"
    job.write_text(json.dumps(cfg))
    proc = subprocess.run([sys.executable, str(REPO / "main.py"), "--config", str(job)], env=clean_env(tmp_path),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert (tmp_path / "out" / "models" / "z3" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# Several machines
# ---------------------------------------------------------------------------------------------


def test_machine_rank_1_of_2_with_fsdp_joins_rank_0():
    cfg = cfg_for("fsdp", gpu_ids="0,1,2,3", num_machines=2, machine_rank=1, main_process_ip="10.0.0.1",
                  main_process_port=23456)
    plan = launcher.build_launch(cfg, "/tmp/job.json", gpu_count=4, base_env={})
    parsed, env = accelerate_reads(plan)
    assert (parsed.num_processes, parsed.num_machines, parsed.machine_rank) == (8, 2, 1)
    assert (parsed.main_process_ip, parsed.main_process_port) == ("10.0.0.1", 23456)
    assert parsed.use_fsdp and env["ACCELERATE_USE_FSDP"] == "true" and plan.world_size == 8


def test_slurm_script_starts_one_trainer_per_node_with_its_rank(tmp_path):
    """configs/slurm/train.slurm with stand-ins for srun, scontrol, nvidia-smi and dllm-trainer."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {
        "scontrol": 'printf "node-a\\nnode-b\\n"',
        "nvidia-smi": 'printf "GPU 0\\nGPU 1\\nGPU 2\\nGPU 3\\n"',
        # srun: run the task once per node, as Slurm would, with that node's id
        "srun": 'shift; for id in 0 1; do SLURM_NODEID=$id "$@"; done',
        "dllm-trainer": 'echo "node $SLURM_NODEID: $*" >> "$CALLS"',
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node-[a-b]", SLURM_JOB_ID="4242",
               SLURM_NNODES="2", CALLS=str(tmp_path / "calls.txt"))
    proc = subprocess.run(["bash", str(REPO / "configs" / "slurm" / "train.slurm"), "job.json"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert len(calls) == 2
    for rank, call in enumerate(calls):
        assert call.startswith(f"node {rank}: train --config job.json")
        for setting in ("accelerate_config_file=configs/accelerate/fsdp.yaml", "gpu_ids=0,1,2,3", "num_machines=2",
                        f"machine_rank={rank}", "main_process_ip=node-a", "main_process_port=24242"):
            assert f"--set {setting}" in call


def test_a_sharded_checkpoint_resumes_only_under_the_same_kind_of_config(tmp_path):
    ckpt = tmp_path / "checkpoint-2"
    (ckpt / "pytorch_model_fsdp_0").mkdir(parents=True)
    with pytest.raises(ConfigError, match="holds an FSDP run's sharded training state"):
        launcher.build_launch(cfg_for(None, train_device="cpu", resume_from_checkpoint=str(ckpt)), "/tmp/j.json", base_env={})
    plan = launcher.build_launch(cfg_for("fsdp", train_device="cpu", num_processes=2, resume_from_checkpoint=str(ckpt)),
                                 "/tmp/j.json", base_env={})
    assert plan.layout.kind == "fsdp"
