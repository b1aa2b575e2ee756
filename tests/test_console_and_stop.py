"""What a person sees and can do while a run trains in-process (the demo, a notebook): one line per
logging step, each evaluation once, Ctrl-C that stops like the STOP file, and a resume that checks
the checkpoint fits the run."""
from __future__ import annotations

import json
import os
import signal

import pytest
from transformers import TrainerCallback

from core_helpers import copy_with_tokenizer
from tiny_tokenizer import make_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(llada_tiny, tmp_path_factory):
    return copy_with_tokenizer(llada_tiny, tmp_path_factory.mktemp("m") / "model", make_tiny_tokenizer())


def job(model_dir, out, **kw):
    from dllm_trainer.config import TrainConfig
    from dllm_trainer.data import asset_path

    cfg = dict(model_name=str(model_dir), dataset_name=str(asset_path("chat_small.jsonl")), output_dir=str(out),
               training_method="llada", train_device="cpu", lora=False, num_train_epochs=0, train_steps=4,
               batch_size=8, max_length=64, logging_steps=1, eval_steps=2, save_steps=2, learning_rate=1e-3)
    cfg.update(kw)
    return TrainConfig.from_dict(cfg)


class CountEvals(TrainerCallback):
    def __init__(self):
        self.at = []

    def on_evaluate(self, args, state, control, **kw):
        self.at.append(state.global_step)


def test_one_line_per_logging_step_and_each_evaluation_once(tmp_path, model_dir, capfd):
    from dllm_trainer.training.train import run_training

    evals = CountEvals()
    result = run_training(job(model_dir, tmp_path / "out"), log=print, extra_callbacks=[evals])
    console = capfd.readouterr()
    text = console.out + console.err
    lines = text.splitlines()
    assert evals.at == [2, 4]  # HF evaluates at the last step: the end of training does not again
    assert result.metrics["eval_loss"] > 0
    for step in range(1, 5):
        mine = [ln for ln in lines if ln.startswith(f"[dllm] step {step}/4: loss ")]
        assert len(mine) == 1, lines
    assert len([ln for ln in lines if ln.startswith("[dllm] eval at step 2/4: eval loss ")]) == 1
    assert len([ln for ln in lines if ln.startswith("[dllm] eval at step 4/4: eval loss ")]) == 1
    assert "[dllm-event]" not in text  # machine events only when a launcher reads them
    assert "{'loss'" not in text and "'eval_loss'" not in text  # no HF log dicts beside our lines
    assert "FutureWarning" not in text


def test_ctrl_c_stops_at_the_end_of_the_step_with_a_checkpoint(tmp_path, model_dir, capfd):
    from dllm_trainer.training.checkpoints import checkpoint_problems
    from dllm_trainer.training.train import run_training

    class PressCtrlC(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 1:  # during step 2, as a terminal's Ctrl-C would
                os.kill(os.getpid(), signal.SIGINT)

    out = tmp_path / "out"
    result = run_training(job(model_dir, out, train_steps=50, save_steps=100), log=print, extra_callbacks=[PressCtrlC()])
    console = capfd.readouterr()
    assert result.stopped and result.global_step == 2
    assert checkpoint_problems(str(out / "checkpoint-2")) == []
    assert not (out / "final_model").exists() and not (out / "STOP").exists()
    assert "Ctrl-C: stopping after the step in progress and saving a checkpoint" in console.err
    assert "[dllm] step 3/" not in console.out and "Traceback" not in console.err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored after training


def test_resume_states_a_changed_length_and_refuses_another_setup(tmp_path, model_dir):
    from dllm_trainer.errors import ConfigError
    from dllm_trainer.training.train import run_training

    out = tmp_path / "out"
    run_training(job(model_dir, out, train_steps=2, eval_strategy="no"), log=lambda *_: None)
    manifest = json.loads((out / "checkpoint-2" / "dllm_checkpoint.json").read_text())
    assert manifest["run"]["training_method"] == "llada" and manifest["run"]["lora"] is False
    assert manifest["run"]["trainable_parameters"] > 0

    # a fresh run into the same folder would overwrite checkpoint-2: refused, nothing deleted
    with pytest.raises(ConfigError, match="already holds checkpoints of another run .*resume_from_checkpoint: latest"):
        run_training(job(model_dir, out, train_steps=3, eval_strategy="no"), log=lambda *_: None)
    # another setup (LoRA on) cannot resume it; said before training
    with pytest.raises(ConfigError, match="does not fit this run: LoRA: checkpoint off, this run on"):
        run_training(job(model_dir, out, train_steps=3, eval_strategy="no", resume_from_checkpoint="latest",
                         lora=True, lora_r=4, lora_alpha=8), log=lambda *_: None)
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-3").exists()

    logged = []
    again = run_training(job(model_dir, out, train_steps=3, eval_strategy="no", resume_from_checkpoint="latest"),
                         log=logged.append)
    assert again.global_step == 3
    notes = [m for m in logged if "resuming with train_steps 3 (the checkpoint's run had 2)" in m]
    assert len(notes) == 1 and "learning-rate schedule is recomputed" in notes[0]


def test_trainable_parameters_must_match(tmp_path):
    from dllm_trainer.config import TrainConfig
    from dllm_trainer.errors import ConfigError
    from dllm_trainer.training import checkpoints as ck

    cfg = TrainConfig.from_dict(dict(model_name="m", dataset_name="d", output_dir=str(tmp_path), lora_r=8))
    path = tmp_path / "checkpoint-3"
    path.mkdir()
    (path / "dllm_checkpoint.json").write_text(json.dumps({"run": ck.run_record(cfg, trainable_parameters=100)}))
    ck.check_checkpoint_fits(str(path), cfg, trainable_parameters=100)
    with pytest.raises(ConfigError, match="trainable parameters: checkpoint 100, this run 120"):
        ck.check_checkpoint_fits(str(path), cfg, trainable_parameters=120)
    with pytest.raises(ConfigError, match="LoRA rank: checkpoint 8, this run 16"):
        ck.check_checkpoint_fits(str(path), cfg.replace(lora_r=16))

    # a checkpoint written before run records: its adapter_config.json tells LoRA and the rank
    old = tmp_path / "old" / "checkpoint-5"
    old.mkdir(parents=True)
    (old / "adapter_config.json").write_text(json.dumps({"r": 16, "lora_alpha": 64, "base_model_name_or_path": "m"}))
    with pytest.raises(ConfigError, match="LoRA rank: checkpoint 16, this run 8"):
        ck.check_checkpoint_fits(str(old), cfg)


@pytest.mark.slow
def test_ctrl_c_at_the_terminal_stops_with_a_checkpoint_and_resume_latest_continues(tmp_path, minilm):
    """`python main.py --config job.json` as a person runs it; Ctrl-C (SIGINT to the app process,
    what the terminal sends) during training: the workers finish the step in progress, save a
    checkpoint and exit; no traceback, no process left, exit code 130; the run then continues."""
    import subprocess
    import sys
    import time

    from dllm_trainer.training.checkpoints import checkpoint_problems
    from rel_helpers import CHAT, REPO, subprocess_env

    out = tmp_path / "out"
    cfg = dict(model_name=str(minilm), dataset_name=str(CHAT), output_dir=str(out), training_method="bert",
               train_device="cpu", lora=True, lora_r=8, lora_alpha=16, max_length=64, batch_size=8,
               num_train_epochs=0, train_steps=400, logging_steps=1, eval_strategy="no", save_steps=1000,
               adaptor_name="ctrl-c")
    job = tmp_path / "job.json"
    job.write_text(json.dumps(cfg))
    proc = subprocess.Popen([sys.executable, str(REPO / "main.py"), "--config", str(job)], cwd=tmp_path,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # the test's own process must not get the SIGINT
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith("[dllm] step 2/400"):
            os.kill(proc.pid, signal.SIGINT)
            break
    lines += proc.stdout.read().splitlines()
    assert proc.wait(timeout=120) == 130, "\n".join(lines[-40:])
    text = "\n".join(lines)
    assert "Traceback" not in text and "[dllm-event]" not in text
    said = next(i for i, ln in enumerate(lines) if ln.startswith("[dllm] Ctrl-C: the workers stop after the step in progress"))
    steps_after = [int(ln.split()[2].split("/")[0]) for ln in lines[said:] if ln.startswith("[dllm] step ")]
    ckpts = sorted(out.glob("checkpoint-*"))
    assert len(ckpts) == 1 and checkpoint_problems(str(ckpts[0])) == []
    step = int(ckpts[0].name.split("-")[1])
    # The STOP file is written before the message; the workers end the step in progress and save it.
    # A step that had ended before may still be on its way through the log relay when the message is
    # printed, so at most two step lines follow it, and training stops at the last one.
    assert len(steps_after) <= 2 and all(n <= step for n in steps_after), lines[said:]
    assert not steps_after or steps_after[-1] == step, lines[said:]
    assert f"[dllm] stopped: stopped (Ctrl-C) at step {step}; checkpoint {ckpts[0]}" in text
    assert not (out / "models").exists() and not (out / "STOP").exists()

    # 'latest' continues from the checkpoint (a fresh start there is refused: test_bad_inputs)
    t0 = time.monotonic()
    resumed = subprocess.run([sys.executable, str(REPO / "main.py"), "--config", str(job), "--set",
                              "resume_from_checkpoint=latest", "--set", f"train_steps={step + 1}"],
                             cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming with train_steps {step + 1} (the checkpoint's run had 400)" in resumed.stdout
    assert f"[dllm] step {step + 1}/{step + 1}: loss " in resumed.stdout and time.monotonic() - t0 < 300
