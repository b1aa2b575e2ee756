"""`dllm-trainer generate` / `chat` logic (dllm_trainer.sampling.chat) on a tiny model folder."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mdlm_fit import fit_mdlm
import dllm_trainer  # noqa: F401
from dllm_trainer.sampling import chat
from dllm_trainer.families import get_family

sys.path.insert(0, str(Path(__file__).parent))
from tiny_tokenizer import make_tiny_tokenizer  # noqa: E402

MASK = 500
CHAIN = "456789ab"  # ids 10..17 of the tiny tokenizer; the model learns "next char of CHAIN"


def chain_steps(text: str) -> int:
    """How many adjacent character pairs of ``text`` follow the cycle CHAIN."""
    return sum(
        a in CHAIN and b == CHAIN[(CHAIN.index(a) + 1) % len(CHAIN)] for a, b in zip(text, text[1:])
    )


pytestmark = pytest.mark.usefixtures("single_thread_module")


def _fit_chain(model, steps=600, lr=1e-3, n=8, length=32):
    def batch(g):
        start = torch.randint(0, 8, (n, 1), generator=g)
        return 10 + (start + torch.arange(length)) % 8

    # then steps at a tenth of the rate, so the fit settles instead of depending on where the last
    # step left it: the tests below threshold what the sampler gets right, and at 3e-3 without this
    # a change of rounding (not of the gradients: equal to 2e-7) moved them across the threshold
    fit_mdlm(model, batch, steps=steps, lr=lr, seed=0, mask_id=MASK)
    return fit_mdlm(model, batch, steps=steps // 2, lr=lr / 10, seed=1, mask_id=MASK)


@pytest.fixture(scope="module")
def model_dir(llada_tiny, tmp_path_factory):
    """The LLaDA fixture fitted to the character chain, saved with the tiny tokenizer."""
    from transformers import AutoModel

    out = tmp_path_factory.mktemp("tiny-llada-chat")
    model = _fit_chain(AutoModel.from_pretrained(llada_tiny))
    model.save_pretrained(out)
    tok = make_tiny_tokenizer(vocab_size=512, mask_id=500, eos_id=2, pad_id=2)
    tok.save_pretrained(out)
    assert tok(CHAIN, add_special_tokens=False)["input_ids"] == list(range(10, 18))
    return out


def _args(kind, *argv):
    parser = chat.build_parser()
    return parser.parse_args([kind, *argv])


def _run_generate(*argv):
    out, err = io.StringIO(), io.StringIO()
    rc = chat.run_generate(_args("generate", *argv), stdout=out, stderr=err)
    return rc, out.getvalue(), err.getvalue()


def _run_chat(script, *argv):
    out, err = io.StringIO(), io.StringIO()
    rc = chat.run_chat(_args("chat", *argv), stdin=io.StringIO(script), stdout=out, stderr=err)
    return rc, out.getvalue(), err.getvalue()


def test_generate_raw_continues_the_chain(model_dir):
    rc, out, err = _run_generate("--model", str(model_dir), "--prompt", CHAIN * 2, "--raw",
                                 "--gen-length", "8", "--steps", "8", "--no-stop-at-eos")
    assert rc == 0, err
    assert err == ""
    text = out.rstrip("\n")
    # the fitted model continues the cycle; allow a slip, but most characters must follow it
    assert len(text) == 8
    assert chain_steps(CHAIN[-1] + text) >= 6, text


def test_generate_with_template_threshold_and_cache(model_dir):
    base = ["--model", str(model_dir), "--prompt", "hello", "--gen-length", "16", "--block-length", "8"]
    rc, out, err = _run_generate(*base, "--steps", "16")
    assert rc == 0 and err == "" and out.endswith("\n")
    rc2, out2, err2 = _run_generate(*base, "--steps", "16", "--threshold", "0.9", "--cache", "dual")
    assert rc2 == 0 and err2 == ""


def test_generate_infill_keeps_text_and_fills(model_dir):
    prompt = "4567<|mdm_mask|>9ab456<|mdm_mask|>89"
    rc, out, err = _run_generate("--model", str(model_dir), "--prompt", prompt)
    assert rc == 0, err
    assert out.rstrip("\n") == "456789ab456789"  # the unmasked characters are kept, the holes filled


@pytest.mark.parametrize("argv,needle", [
    (["--model", "/nonexistent/model", "--prompt", "x"], "does not exist"),
    (["--prompt", "x", "--strategy", "bogus"], "unknown --strategy 'bogus'"),
    (["--prompt", "x", "--strategy", "maskgit_plus"], "does not apply to the llada family"),
    (["--prompt", "x", "--cache", "full"], "unknown --cache"),
    (["--prompt", "x", "--gen-length", "16", "--block-length", "5"], "multiple of block_length"),
    (["--prompt", "x", "--gen-length", "16", "--block-length", "4", "--steps", "6"], "divisible"),
    (["--prompt", "x", "--temperature", "-1"], "--temperature"),
    (["--prompt", "x", "--threshold", "1.5"], "--threshold must be in (0, 1]"),
    (["--prompt", "x", "--threshold", "0"], "--threshold must be in (0, 1]"),
    (["--prompt", "x", "--device", "meta"], "unsupported --device 'meta' (allowed: auto, cpu, cuda, cuda:N, mps)"),
    (["--prompt", "x", "--device", "gpu0"], "unknown --device 'gpu0'"),
    (["--prompt", "x", "--device", "mps"], "--device mps: Apple's MPS is not available"),
    (["--prompt", "x", "--raw", "--gen-length", "99999"], "exceeds the model's 256 positions; generate at most 254 tokens"),
])
def test_generate_bad_inputs_give_one_clear_error(model_dir, argv, needle):
    if "--model" not in argv:
        argv = ["--model", str(model_dir), *argv]
    rc, out, err = _run_generate(*argv)
    assert rc != 0
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err


def test_chat_complete_beyond_the_positions_is_an_error_and_the_chat_goes_on(model_dir):
    import time

    t0 = time.monotonic()
    rc, out, err = _run_chat(":complete 99999\n:complete 4\n", "--model", str(model_dir), "--raw", "--no-stop-at-eos")
    assert rc == 0 and time.monotonic() - t0 < 60  # never hangs
    assert err.startswith("error: ") and "exceeds the model's 256 positions" in err and len(err.splitlines()) == 1
    assert len(out.splitlines()[-1]) == 4  # the next command works


def test_ctrl_c_during_a_reply_cancels_it_and_keeps_the_conversation(model_dir, monkeypatch):
    real = chat.run_sampler
    calls = []

    def interrupted_once(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(chat, "run_sampler", interrupted_once)
    args = ["--model", str(model_dir), "--gen-length", "8", "--seed", "3"]
    rc, out, err = _run_chat("first\nsecond\n", *args)
    assert rc == 0 and "(interrupted" in err and "Traceback" not in err
    monkeypatch.setattr(chat, "run_sampler", real)
    rc2, out2, _ = _run_chat("second\n", *args)
    assert out == out2  # the cancelled turn left no trace in the conversation


def test_python_generate_takes_what_apply_chat_template_returns(model_dir):
    from transformers import AutoModel, AutoTokenizer

    from dllm_trainer.sampling import generate

    model, tok = AutoModel.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": "hi"}]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = enc["input_ids"] if hasattr(enc, "keys") else enc
    kw = dict(gen_length=8, steps=8, mask_token_id=MASK)
    assert torch.equal(generate(model, enc, **kw), generate(model, ids, **kw))
    assert torch.equal(generate(model, {"input_ids": ids}, **kw), generate(model, ids, **kw))
    with pytest.raises(ValueError, match="not text: tokenize first"):
        generate(model, "hi", **kw)
    with pytest.raises(ValueError, match="a dict without 'input_ids'"):
        generate(model, {"ids": ids}, **kw)


def test_sampling_from_a_lora_adaptor_or_checkpoint_folder(model_dir, tmp_path):
    import shutil

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    adaptor = tmp_path / "adaptor"
    peft_model.save_pretrained(adaptor)  # adapter_config.json names model_dir as the base
    fused = tmp_path / "fused"
    peft_model.merge_and_unload().save_pretrained(fused)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / f, fused / f)
    argv = ["--prompt", CHAIN, "--raw", "--gen-length", "8", "--no-stop-at-eos"]
    rc, from_fused, err = _run_generate("--model", str(fused), *argv)
    assert rc == 0, err
    rc, from_adaptor, err = _run_generate("--model", str(adaptor), *argv)  # base + adaptor, merged in memory
    assert rc == 0 and err == "" and from_adaptor == from_fused
    # the session's model is base + adaptor: the fused model's logits, not the base's
    ids = torch.tensor([list(range(10, 26))])
    with torch.no_grad():
        got = chat.load_session(str(adaptor), "cpu").model(ids).logits
        want = AutoModel.from_pretrained(fused)(ids).logits
        base = AutoModel.from_pretrained(model_dir)(ids).logits
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, base, atol=1e-3)

    cfg = json.loads((adaptor / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "moved-base")
    (adaptor / "adapter_config.json").write_text(json.dumps(cfg))
    rc, _, err = _run_generate("--model", str(adaptor), *argv)
    assert rc == 2 and "is a LoRA adaptor (or a LoRA checkpoint) of the base model" in err
    assert "sample from the fused model instead" in err and len(err.splitlines()) == 1


def test_bad_model_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    rc, _, err = _run_generate("--model", str(tmp_path / "empty"), "--prompt", "x")
    assert rc != 0 and "no config.json" in err and "Traceback" not in err


def test_no_traceback_from_the_command_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dllm_trainer.sampling.chat", "generate", "--model", str(tmp_path / "missing"), "--prompt", "hi"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: ") and "does not exist" in proc.stderr


def test_scripted_chat_session(model_dir):
    script = "\n".join([
        "hi there",
        ":complete 8",
        ":mask 0.5 456789ab456789ab",
        ":bogus",
        ":complete x",
        "again",
        ":quit",
        "never read",
    ]) + "\n"
    argv = ["--model", str(model_dir), "--gen-length", "8", "--steps", "8", "--seed", "3"]
    rc, out, err = _run_chat(script, *argv)
    assert rc == 0
    # two bad commands -> two one-line errors, the session goes on
    err_lines = err.strip().splitlines()
    assert len(err_lines) == 2 and all(line.startswith("error: ") for line in err_lines), err
    assert "unknown command ':bogus'" in err_lines[0] and ":complete needs a number" in err_lines[1]
    masked = [line for line in out.splitlines() if line.startswith("masked: ")]
    filled = [line for line in out.splitlines() if line.startswith("filled: ")]
    assert len(masked) == 1 and len(filled) == 1
    assert masked[0].count("<|mdm_mask|>") == 8
    filled_text = filled[0][len("filled: "):]
    assert sum(a == b for a, b in zip(filled_text, "456789ab456789ab")) >= 14, filled_text
    # the same script with the same seed prints the same thing
    assert _run_chat(script, *argv) == (rc, out, err)


def test_chat_raw_mode_and_eof(model_dir):
    rc, out, err = _run_chat(CHAIN + "\n:complete 4\n", "--model", str(model_dir), "--raw",
                             "--gen-length", "8", "--no-stop-at-eos")
    assert rc == 0 and err == ""  # EOF ends the session normally
    lines = out.splitlines()
    assert len(lines) == 2
    reply, more = lines
    assert chain_steps(CHAIN[-1] + reply) >= 6, reply  # the chain continues
    assert len(more) == 4


def test_chat_bad_model_is_one_error(tmp_path):
    rc, out, err = _run_chat("hi\n", "--model", str(tmp_path / "nope"))
    assert rc == 2 and out == "" and err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_add_args_functions_wire_into_any_parser():
    import argparse

    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd")
    chat.add_generate_args(sub.add_parser("generate"))
    chat.add_chat_args(sub.add_parser("chat"))
    a = p.parse_args(["generate", "--model", "m", "--prompt", "t", "--threshold", "0.9", "--cache", "dual"])
    assert a.threshold == 0.9 and a.cache == "dual" and a.stop_at_eos is True
    b = p.parse_args(["chat", "--model", "m", "--steps", "4", "--device", "cpu", "--seed", "1"])
    assert b.steps == 4 and b.device == "cpu" and b.seed == 1


def test_bad_command_line_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        chat.main(["generate", "--model", "m", "--prompt", "x", "--steps", "abc"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--steps" in err[0]
