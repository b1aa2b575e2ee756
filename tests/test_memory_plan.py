"""The memory plan (training/memory_plan.py): its parts checked against what torch really keeps,
the whole estimate against the measured peak of real CPU training runs, the refusal before launch,
and the README's LLaDA-8B / Dream-7B table against the command that prints it."""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dllm_trainer.config import TrainConfig
from dllm_trainer.training import memory_plan as mp
from dllm_trainer.training.memory_plan import GIB, ModelShape, RunSpec, estimate, model_shape

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"


def load(path):
    import dllm_trainer.models  # noqa: F401
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(path))


# ---------------------------------------------------------------------------------------------
# The parts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_meta_device_shape_counts_what_the_real_model_has(request, family, one_thread):
    from peft import LoraConfig, get_peft_model

    model = load(request.getfixturevalue(f"{family}_tiny"))
    shape = model_shape(model.config, family=family, lora_r=4)
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.head_params == model.get_output_embeddings().weight.numel()
    block = [m for m in model.modules() if type(m).__name__ in model._no_split_modules]
    assert shape.layers == len(block) and shape.block_params == sum(p.numel() for p in block[0].parameters())
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert shape.lora_params == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def _saved_bytes_per_token(block, x, cos, sin, autocast: bool) -> float:
    """Bytes of the tensors autograd keeps for one block's backward (parameters and the shared
    rotary tables excluded), per token."""
    skip = {p.untyped_storage().data_ptr() for p in block.parameters()}
    skip |= {cos.untyped_storage().data_ptr(), sin.untyped_storage().data_ptr()}
    kept: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            block(x, cos, sin)
    return sum(kept.values()) / (x.shape[0] * x.shape[1])


# (lora, lora_dropout, weights dtype, autocast): full fine-tunes keep float32 masters under autocast
ACTIVATION_CASES = [
    pytest.param(False, 0.0, torch.float32, False, id="full-fp32"),
    pytest.param(False, 0.0, torch.float32, True, id="full-autocast-bf16"),
    pytest.param(True, 0.05, torch.float32, False, id="lora-dropout-fp32"),
    pytest.param(True, 0.05, torch.bfloat16, True, id="lora-dropout-bf16"),
    pytest.param(True, 0.0, torch.bfloat16, True, id="lora-bf16"),
]


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("lora,dropout,dtype,autocast", ACTIVATION_CASES)
def test_block_activations_are_what_autograd_keeps(request, family, lora, dropout, dtype, autocast, one_thread):
    """The per-token, per-block activation bytes of the estimate equal the tensors saved for
    backward (+ the autocast copies of the block's weights, a separate row of the plan)."""
    import dllm_trainer.models  # noqa: F401
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(request.getfixturevalue(f"{family}_tiny")), dtype=dtype)
    shape = model_shape(model.config, family=family, lora_r=4 if lora else 0)
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"))
    model.train()
    core = model.get_base_model() if lora else model
    block = core.model.transformer.blocks[0] if family == "llada" else core.model.layers[0]
    B, L, d = 2, 32, shape.hidden
    x = torch.randn(B, L, d, dtype=dtype, requires_grad=True)
    pos = torch.arange(L)[None].expand(B, L)
    if family == "llada":
        from dllm_trainer.models.llada import rotary_cos_sin

        cos, sin = rotary_cos_sin(pos, block.head_dim, model.config.rope_theta)
    else:
        from dllm_trainer.models.dream import rotary_cos_sin

        cos, sin = rotary_cos_sin(pos, d // model.config.num_attention_heads, model.config.rope_theta, dtype)
    got = _saved_bytes_per_token(block, x, cos, sin, autocast)

    s = 2 if autocast else 4
    spec = RunSpec(lora=lora, lora_r=4, lora_dropout=dropout, dtype="bfloat16" if autocast else "float32", device="cpu")
    sx = 4 if dtype == torch.float32 else 2
    want = mp._block_activations(shape, spec, s, sx)
    trained = [p for n, p in block.named_parameters() if (not lora or "lora_" in n) and p.dim() == 2
               and not (n.endswith(("ff_out.weight", "down_proj.weight")) and not lora)]  # swiglu.py keeps no copy
    if autocast:  # bf16 copies of the float32 weights the block multiplies with
        want += sum(p.numel() for p in trained if p.dtype == torch.float32) * 2 / (B * L)
    small = 2 * 4 + 4 * 8  # the RMSNorms' 1/rms and SDPA's log-sum-exp (per head), not modelled
    assert want <= got <= want + small, (got, want)


def test_sharding_divides_weights_gradients_and_optimizer():
    shape = ModelShape(params=8_000_000_000, linear_weights=7_500_000_000, head_params=500_000_000, vocab=126464,
                       hidden=4096, intermediate=12288, layers=32, block_params=218_000_000)
    rows = lambda spec: dict(estimate(shape, spec).rows)  # noqa: E731
    one = rows(RunSpec(lora=False, devices=1))
    fsdp = rows(RunSpec(lora=False, devices=8, kind="fsdp", sharding="full"))
    zero2 = rows(RunSpec(lora=False, devices=8, kind="deepspeed", sharding="grads"))
    ddp = rows(RunSpec(lora=False, devices=8, kind="ddp"))
    assert one["weights"] == 4 * 8e9 and one["optimizer states (AdamW)"] == 8 * 8e9 and one["gradients"] == 4 * 8e9
    assert fsdp["weights"] == one["weights"] / 8 and fsdp["gradients"] == one["gradients"] / 8
    assert fsdp["optimizer states (AdamW)"] == one["optimizer states (AdamW)"] / 8
    assert fsdp["gathered FSDP/ZeRO units"] > 0
    assert zero2["weights"] == 2 * 8e9  # 16-bit module weights on every GPU; masters with the optimizer
    assert ddp["DDP gradient buckets"] == one["gradients"] and ddp["weights"] == one["weights"]
    gc = estimate(shape, RunSpec(lora=False, batch_size=8, gradient_checkpointing=True)).peak
    assert gc < estimate(shape, RunSpec(lora=False, batch_size=8)).peak


# ---------------------------------------------------------------------------------------------
# The whole estimate against measured CPU peaks
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scaled_llada(tmp_path_factory) -> Path:
    """A random LLaDA-shaped model large enough that it dominates the process's own noise (22M
    parameters: 352 MB of weights, gradients and AdamW states), a vocabulary of 8192 and long rows."""
    sys.path.insert(0, str(Path(__file__).parent))
    import dllm_trainer.models  # noqa: F401
    from dllm_trainer.models.llada import LLaDAConfig, LLaDAModelLM
    from tiny_tokenizer import make_tiny_tokenizer

    out = tmp_path_factory.mktemp("scaled_llada")
    torch.manual_seed(0)
    conf = LLaDAConfig(d_model=512, n_heads=8, n_kv_heads=8, n_layers=4, mlp_hidden_size=1536, vocab_size=8192,
                       embedding_size=8192, max_sequence_length=1024, mask_token_id=8000, eos_token_id=2, pad_token_id=2)
    LLaDAModelLM(conf).save_pretrained(out / "model")
    make_tiny_tokenizer(vocab_size=8192, mask_id=8000).save_pretrained(str(out / "model"))
    rng = random.Random(0)
    with open(out / "text.jsonl", "w") as fh:
        for _ in range(64):
            fh.write(json.dumps({"text": "".join(rng.choice("abcdefghij klmnop") for _ in range(400))}) + "\n")
    return out


MEASURED = [
    pytest.param(dict(lora=False), id="full"),
    pytest.param(dict(lora=False, gradient_checkpointing=True), id="full-gradient-checkpointing"),
    pytest.param(dict(lora=True, lora_r=16, lora_alpha=32), id="lora"),
]


@pytest.mark.slow
@pytest.mark.parametrize("settings", MEASURED)
def test_estimate_is_within_25_percent_of_the_measured_cpu_peak(scaled_llada, tmp_path, settings):
    cfg = dict(model_name=str(scaled_llada / "model"), dataset_name=str(scaled_llada / "text.jsonl"),
               output_dir=str(tmp_path / "out"), training_method="llada", train_device="cpu", batch_size=4,
               max_length=128, num_train_epochs=0, train_steps=2, save_steps=1000, eval_strategy="no",
               logging_steps=1, min_mask_ratio=0.9, max_mask_ratio=1.0, group_by_length=False, seed=1, **settings)
    job = tmp_path / "job.json"
    job.write_text(json.dumps(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WANDB_"))}
    env.update(PYTHONPATH=str(SRC), OMP_NUM_THREADS="1", DLLM_CPU_THREADS="1", HF_HUB_OFFLINE="1",
               DISABLE_TQDM="1", MALLOC_MMAP_THRESHOLD_="65536", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "memory_probe.py"), str(job)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    measured = seen["peak"] - seen["baseline"]

    conf = TrainConfig.from_dict(cfg)
    from dllm_trainer.training.loading import load_model_config

    shape = model_shape(load_model_config(conf.model_name), family="llada", lora_r=conf.lora_r if conf.lora else 0)
    plan = estimate(shape, mp.spec_for(conf, dtype="float32", device="cpu"))
    print(f"{settings}: measured {measured / 2**20:.0f} MiB, estimated {plan.peak / 2**20:.0f} MiB, "
          f"ratio {plan.peak / measured:.3f}")
    assert 0.75 <= plan.peak / measured <= 1.25, (measured, plan.peak, plan.rows)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.max_memory_allocated)")
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_estimate_matches_the_gpu_peak_of_a_1b_llada(tmp_path, lora):
    """A ~1B LLaDA-shaped random model in bf16 on one GPU: the estimate (without its fixed CUDA
    context row) against torch's peak allocated memory over two training steps."""
    import dllm_trainer.models  # noqa: F401
    from dllm_trainer.models.llada import LLaDAConfig, LLaDAModelLM
    from dllm_trainer.training.train import run_training
    from tiny_tokenizer import make_tiny_tokenizer

    conf = LLaDAConfig(d_model=2048, n_heads=16, n_kv_heads=16, n_layers=16, mlp_hidden_size=5632, vocab_size=32768,
                       embedding_size=32768, mask_token_id=32000, eos_token_id=2, pad_token_id=2)
    LLaDAModelLM(conf).save_pretrained(tmp_path / "model")
    make_tiny_tokenizer(vocab_size=32768, mask_id=32000).save_pretrained(str(tmp_path / "model"))
    rng = random.Random(0)
    with open(tmp_path / "text.jsonl", "w") as fh:
        for _ in range(32):
            fh.write(json.dumps({"text": "".join(rng.choice("abcdefghij klmnop") for _ in range(1200))}) + "\n")
    cfg = TrainConfig.from_dict(dict(
        model_name=str(tmp_path / "model"), dataset_name=str(tmp_path / "text.jsonl"), output_dir=str(tmp_path / "out"),
        training_method="llada", train_device="cuda", dtype="bfloat16", lora=lora, batch_size=2, max_length=1024,
        num_train_epochs=0, train_steps=2, save_steps=1000, eval_strategy="no", min_mask_ratio=0.9, group_by_length=False))
    torch.cuda.reset_peak_memory_stats()
    run_training(cfg, log=lambda *_: None)
    measured = torch.cuda.max_memory_allocated()
    shape = model_shape(conf, family="llada", lora_r=cfg.lora_r if lora else 0)
    plan = estimate(shape, mp.spec_for(cfg, dtype="bfloat16"))
    assert 0.75 <= (plan.peak - mp.CUDA_OVERHEAD) / measured <= 1.25, (measured, plan.rows)


# ---------------------------------------------------------------------------------------------
# Before launch
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llada8b_shape() -> dict:
    return model_shape(mp._published_config("llada-8b"), family="llada", lora_r=32).to_json()


def _job(tmp_path, llada_tiny, **kw) -> TrainConfig:
    raw = dict(model_name=str(llada_tiny), dataset_name=str(SRC / "dllm_trainer" / "assets" / "chat_small.jsonl"),
               output_dir=str(tmp_path / "out"), training_method="llada", train_device="cuda", batch_size=4,
               max_length=256)
    raw.update(kw)
    return TrainConfig.from_dict(raw)


def _fake_probe(shape: dict, gib: float, n: int = 1):
    gpus = [{"index": i, "name": "Test GPU", "total": int(gib * GIB)} for i in range(n)]
    return lambda path: {"shape": shape, "gpus": gpus, "dtype": "bfloat16"}


def test_a_run_that_cannot_fit_is_refused_with_settings_that_would(tmp_path, llada_tiny, llada8b_shape):
    from types import SimpleNamespace

    cfg = _job(tmp_path, llada_tiny, lora=False)
    plan = SimpleNamespace(world_size=1, layout=None)
    lines: list[str] = []
    with pytest.raises(mp.MemoryPlanError) as err:
        mp.check_job(cfg, plan, "unused.json", log=lines.append, probe=_fake_probe(llada8b_shape, 80))
    msg = str(err.value)
    assert re.search(r"needs about \d+\.\d GiB per GPU but GPU 0 \(Test GPU\) has 80\.0 GiB", msg)
    assert "lora: true" in msg and "memory_check: warn" in msg
    assert "estimated peak" in "\n".join(lines)  # the table is printed before the refusal
    # the suggestions really fit, by the same estimate
    fixes = mp.alternatives(ModelShape(**llada8b_shape), mp.spec_for(cfg, dtype="bfloat16"), 80 * GIB, visible=1)
    assert fixes and all(float(re.search(r"est\. ([\d.]+) GiB", f).group(1)) <= 80 for f in fixes)

    warned: list[str] = []
    relaxed = _job(tmp_path, llada_tiny, lora=False, memory_check="warn")
    assert mp.check_job(relaxed, plan, "unused.json", log=warned.append, probe=_fake_probe(llada8b_shape, 80))
    assert any("warning: the run needs about" in w for w in warned)

    fits: list[str] = []
    lora = _job(tmp_path, llada_tiny, lora=True, batch_size=1)
    plan8 = SimpleNamespace(world_size=8, layout=None)
    assert mp.check_job(lora, plan8, "unused.json", log=fits.append, probe=_fake_probe(llada8b_shape, 80, 8)).peak < 80 * GIB
    assert "DDP x8" in fits[0]
    assert mp.check_job(_job(tmp_path, llada_tiny, train_device="cpu"), plan, "x", probe=None) is None  # GPU jobs only


def test_the_app_refuses_before_any_worker_starts(tmp_path, llada_tiny, llada8b_shape, monkeypatch, no_workers, capsys):
    from dllm_trainer.app import run_job
    from dllm_trainer.hosts.standalone import StandaloneReporter

    sys.path.insert(0, str(Path(__file__).parent))
    from rel_helpers import make_llada_dir

    model = make_llada_dir(tmp_path / "llada")
    monkeypatch.setattr(mp, "probe_job", _fake_probe(llada8b_shape, 24))
    cfg = _job(tmp_path, model, lora=False)
    rc = run_job(cfg, StandaloneReporter(), gpu_count=1)
    err = capsys.readouterr()
    assert rc != 0
    assert "[dllm-error]" in err.err and "has 24.0 GiB" in err.err and "Traceback" not in err.err + err.out


def test_the_probe_subprocess_reads_the_model(tmp_path, llada_tiny):
    cfg = _job(tmp_path, llada_tiny, lora=True, lora_r=4)
    path = tmp_path / "job.json"
    path.write_text(json.dumps(cfg.to_dict()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(PYTHONPATH=str(SRC), CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    info = mp.probe_job(str(path), env=env)
    real = model_shape(load(llada_tiny).config, family="llada", lora_r=4)
    assert ModelShape(**info["shape"]) == real
    assert info["gpus"] == [] and info["dtype"] == "float32"


def test_readme_table_is_the_commands_output(capsys):
    """README's LLaDA-8B / Dream-7B table is what `dllm-trainer memory-plan --readme` prints."""
    assert mp.main(["--readme"]) == 0
    printed = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("|")]
    readme = (REPO / "README.md").read_text()
    assert len(printed) == 8 and all(line in readme for line in printed)
