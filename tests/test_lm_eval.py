"""`dllm-trainer eval` / the lm-eval model class (dllm_trainer.evaluation.lm_eval_model).

No data set can be downloaded here, so each test writes its own lm-eval tasks (YAML + JSONL): one
multiple-choice task (scored by loglikelihood) and one generation task (generate_until with two
stop strings, one of which is chosen to occur in the model's output so the cut is exercised). The
numbers lm-eval records are checked against a direct computation: masked_diffusion_elbo for every
(context, continuation) and generate() + decode + cut for every prompt, then the task metrics
(acc, exact_match) from those direct values. Run on the fixtures (LLaDA with Fast-dLLM threshold +
dual cache, Dream with entropy + prefix cache, BERT) and on a LLaDA model trained in the test, evaluated
through the real command in a subprocess with the chat template.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import dllm_trainer  # noqa: F401
from core_helpers import copy_with_tokenizer
from tiny_tokenizer import make_tiny_tokenizer
from dllm_trainer.evaluation import lm_eval_model as lem
from dllm_trainer.evaluation.elbo import encode_pair, masked_diffusion_elbo
from dllm_trainer.sampling import chat, generate

pytestmark = pytest.mark.usefixtures("single_thread_module")
MC_NUM, MC_BATCH = 6, 3

MC_ROWS = [
    {"question": "4567 next:", "choices": ["8", "2", "x"], "answer": 0},
    {"question": "89ab next:", "choices": ["4", "z"], "answer": 1},
]
GEN_PROMPTS = [("456789ab4567", "89ab"), ("ab45", "6789")]


def _write_tasks(folder: Path, tag: str, mc_rows, gen_rows, until, max_gen_toks: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc_rows))
    (folder / "gen.jsonl").write_text("".join(json.dumps({"prompt": p, "target": t}) + "\n" for p, t in gen_rows))
    (folder / "mc.yaml").write_text(f"""task: {tag}_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    (folder / "gen.yaml").write_text(f"""task: {tag}_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'gen.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: {json.dumps(until)}
  max_gen_toks: {max_gen_toks}
metric_list:
  - metric: exact_match
""")
    return [f"{tag}_mc", f"{tag}_gen"]


def _encode(sess, context: str) -> list[int]:
    """The prompt ids a context should become: the tokenizer's BOS (CLS for BERT) unless the text starts with it."""
    tok = sess.tokenizer
    ids = tok(context, add_special_tokens=False)["input_ids"]
    first = tok.cls_token_id if sess.family.name == "bert" else tok.bos_token_id
    return ids if first is None or ids[:1] == [first] else [first] + ids


def _direct_generation(sess, context: str, gen: dict) -> str:
    ids = _encode(sess, context)
    out = generate(sess.model, torch.tensor([ids]), mask_token_id=sess.mask_id, eos_token_id=sess.eos_ids,
                   stop_at_eos=True, seed=0, **gen)[0].tolist()
    return chat.decode(sess, out[len(ids):])


def _cut(text: str, stops: list[str]) -> str:
    hits = [text.find(s) for s in stops if s in text]
    return text[: min(hits)] if hits else text


def _read_samples(out: Path, task: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"samples_{task}.jsonl").read_text().splitlines()]


def _check_against_direct(sess, out: Path, tasks: list[str], gen: dict, until: list[str]) -> dict:
    """Every recorded number equals the direct computation; returns the direct values."""
    results = json.loads((out / "results.json").read_text())["results"]
    mc, gen_task = tasks

    correct = []
    for row in _read_samples(out, mc):
        direct = []
        for (context, continuation), resp in zip(row["arguments"], row["resps"]):
            ctx, cont = encode_pair(sess.tokenizer, context, continuation)
            ll = masked_diffusion_elbo(sess.model, ctx, cont, mc_num=MC_NUM, batch_size=MC_BATCH, seed=0,
                                       mask_token_id=sess.mask_id).log_likelihood
            assert resp[0][0] == pytest.approx(ll, rel=1e-5, abs=1e-5), (context, continuation)
            assert resp[0][1] is False  # is_greedy is only computed with --check-greedy
            direct.append(ll)
        correct.append(max(range(len(direct)), key=direct.__getitem__) == row["target"])
    assert results[mc]["acc,none"] == pytest.approx(sum(correct) / len(correct))

    matches, raw = [], []
    for row in _read_samples(out, gen_task):
        (context, gen_kwargs), = row["arguments"]
        assert gen_kwargs["until"] == until
        full = _direct_generation(sess, context, gen)
        expected = _cut(full, until)
        assert row["resps"][0][0] == expected, (context, full)
        raw.append(full)
        matches.append(expected == row["target"])
    assert results[gen_task]["exact_match,none"] == pytest.approx(sum(matches) / len(matches))
    return {"raw": raw}


def _pick_stop(text: str) -> str:
    """A stop string that occurs in ``text`` (not at its start), so the cut is visible."""
    for start in range(len(text) // 2, 0, -1):
        s = text[start: start + 2]
        if len(s) == 2 and text.find(s) > 0:
            return s
    pytest.fail(f"no usable stop string in {text!r}")


FAMILY_CASES = {
    # family: (model fixture, generation settings given on the command line, settings as generate() sees them)
    "llada": (["--gen-length", "8", "--steps", "8", "--block-length", "4", "--threshold", "0.05",
               "--cache", "dual"], dict(gen_length=8, steps=8, block_length=4, threshold=0.05, cache="dual")),
    "dream": (["--strategy", "entropy", "--cache", "prefix"],  # gen length from the task's max_gen_toks
              dict(gen_length=6, steps=6, block_length=6, strategy="entropy", cache="prefix")),
    "bert": (["--gen-length", "6", "--steps", "3"], dict(gen_length=6, steps=3, block_length=6)),
}


@pytest.fixture(scope="module")
def family_models(tmp_path_factory, llada_tiny, dream_tiny, minilm):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    root = tmp_path_factory.mktemp("lm-eval-models")
    # MiniLM ships without an MLM head, which each load would initialise anew: save one copy with a fixed head
    torch.manual_seed(0)
    AutoModelForMaskedLM.from_pretrained(minilm).save_pretrained(root / "bert")
    AutoTokenizer.from_pretrained(minilm).save_pretrained(root / "bert")
    return {
        "llada": copy_with_tokenizer(llada_tiny, root / "llada", make_tiny_tokenizer()),
        "dream": copy_with_tokenizer(dream_tiny, root / "dream", make_tiny_tokenizer()),
        "bert": root / "bert",
    }


@pytest.mark.parametrize("family", list(FAMILY_CASES))
def test_eval_numbers_equal_the_direct_elbo_and_generate(family, family_models, tmp_path, capsys):
    model_dir = family_models[family]
    cli_gen, gen = FAMILY_CASES[family]
    sess = chat.load_session(str(model_dir), "cpu")
    gen_rows = GEN_PROMPTS if family != "bert" else [("the capital of france is", "paris"), ("one two", "three")]
    mc_rows = MC_ROWS if family != "bert" else [{"question": "the sky is", "choices": ["blue", "loud"], "answer": 0}]
    # choose the stop strings from what the model will write for the first prompt
    first = _direct_generation(sess, gen_rows[0][0], gen)
    until = ["\n\n\n", _pick_stop(first)]
    tasks = _write_tasks(tmp_path / "tasks", f"toy_{family}", mc_rows, gen_rows, until, max_gen_toks=6)

    out = tmp_path / "out"
    rc = lem.main(["--model", str(model_dir), "--tasks", ",".join(tasks), "--include-path", str(tmp_path / "tasks"),
                   "--mc-num", str(MC_NUM), "--mc-batch-size", str(MC_BATCH), "--device", "cpu",
                   "--output", str(out), "--log-samples", "--bootstrap-iters", "0", *cli_gen])
    printed = capsys.readouterr()
    assert rc == 0, printed.err[-3000:]
    assert f"toy_{family}_mc" in printed.out and "exact_match" in printed.out  # the results table
    direct = _check_against_direct(sess, out, tasks, gen, until)
    assert direct["raw"][0] == first and len(_cut(first, until)) < len(first)  # the stop string did cut


def test_loglikelihood_rolling_is_the_windowed_elbo(family_models):
    lm = lem.DiffusionLM(str(family_models["llada"]), device="cpu", mc_num=MC_NUM, mc_batch_size=MC_BATCH,
                         max_length=8)
    sess = lm.sess
    text = "456789ab4567"  # 12 tokens, windows of max_length - 1 = 7 predicted tokens
    tok = sess.tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = sess.tokenizer.bos_token_id

    def elbo(ctx, cont):
        return masked_diffusion_elbo(sess.model, ctx, cont, mc_num=MC_NUM, batch_size=MC_BATCH, seed=0).log_likelihood

    # first window: BOS -> tokens 0..6; second: tokens 4..6 as context -> tokens 7..11 (8 positions each)
    expected = elbo([bos], tok[:7]) + elbo(tok[4:7], tok[7:])
    got, = lm.loglikelihood_rolling([SimpleNamespace(args=(text,))])
    assert got == pytest.approx(expected, rel=1e-6)
    short, = lm.loglikelihood_rolling([SimpleNamespace(args=("4567",))])
    assert short == pytest.approx(elbo([bos], tok[:4]), rel=1e-6)


def test_registered_with_lm_eval_and_built_from_an_arg_string(family_models):
    from lm_eval.api.registry import get_model

    assert get_model("dllm") is lem.DiffusionLM
    lm = lem.DiffusionLM.create_from_arg_string(
        f"pretrained={family_models['dream']},mc_num=4,strategy=topk_margin,cache=dual,threshold=0.9,top_p=0.95",
        {"batch_size": 2, "device": "cpu"})
    assert (lm.mc_num, lm.strategy, lm.cache, lm.threshold, lm.top_p, lm.batch_size) == (4, "topk_margin", "dual", 0.9, 0.95, 2)
    # batched generation (left padding) gives each prompt's own output here, and stops are honoured
    reqs = [SimpleNamespace(args=(p, {"until": ["zzz"], "max_gen_toks": 4})) for p in ("4567", "ab456789ab")]
    batched = lm.generate_until(reqs)
    single = [_cut(_direct_generation(lm.sess, p, dict(gen_length=4, steps=4, block_length=4, strategy="topk_margin",
                                                       cache="dual", threshold=0.9, top_p=0.95)), ["zzz"])
              for p in ("4567", "ab456789ab")]
    assert batched == single


def test_cut_at_stop_uses_the_earliest_stop():
    assert lem.cut_at_stop("abc. def\nghi", ["\n", "."]) == "abc"
    assert lem.cut_at_stop("abc", ["x"]) == "abc"
    assert lem.cut_at_stop("abc", []) == "abc"


@pytest.mark.parametrize("argv,message", [
    pytest.param(["--tasks", "no_such_task_xyz", "--include-path", "{tasks}"], "unknown task(s): no_such_task_xyz",
                 marks=pytest.mark.slow),  # indexes lm-eval's ~15k bundled tasks (~30 s)
    (["--tasks", "toy_mc", "--include-path", "/nonexistent/tasks"], "--include-path '/nonexistent/tasks' is not a folder"),
    (["--tasks", "toy_mc", "--include-path", "{tasks}", "--cache", "disk"], "cache must be one of none, prefix, dual"),
    (["--tasks", "toy_mc", "--include-path", "{tasks}", "--strategy", "entropy"],
     "strategy 'entropy' does not apply to the llada family"),
    (["--tasks", "toy_mc", "--include-path", "{tasks}", "--top-p", "0.9"], "top_p / top_k apply to the dream family only"),
    (["--tasks", "toy_mc", "--include-path", "{tasks}", "--mc-num", "0"], "mc_num must be an integer >= 1"),
    (["--tasks", "toy_mc", "--include-path", "{tasks}", "--limit", "0"], "--limit must be > 0"),
    (["--tasks", " , ", "--include-path", "{tasks}"], "--tasks is empty"),
])
def test_bad_eval_options_are_one_clear_message(argv, message, family_models, tmp_path, capsys):
    _write_tasks(tmp_path / "tasks", "toy", MC_ROWS, GEN_PROMPTS, ["\n"], 4)
    argv = [a.replace("{tasks}", str(tmp_path / "tasks")) for a in argv]
    assert lem.main(["--model", str(family_models["llada"]), "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_unknown_flag_and_unknown_model_argument(family_models, capsys):
    with pytest.raises(SystemExit) as e:
        lem.main(["--model", "x", "--tasks", "t", "--bogus"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(lem.EvalError, match="unknown model argument.*: temprature"):
        lem.DiffusionLM(str(family_models["llada"]), device="cpu", temprature=0.5)


def test_without_lm_eval_the_error_names_the_extra(monkeypatch, capsys):
    monkeypatch.setattr(lem, "_LM_EVAL_MISSING", ImportError("No module named 'lm_eval'"))
    assert lem.main(["--model", "x", "--tasks", "gsm8k"]) == 2
    err = capsys.readouterr().err
    assert "lm-evaluation-harness" in err and "dllm-trainer[eval]" in err


@pytest.mark.slow
def test_eval_command_on_a_model_trained_in_the_test(tmp_path, llada_tiny, monkeypatch):
    """Train a few steps, then `dllm-trainer eval --apply-chat-template` in a subprocess; numbers = direct."""
    from dllm_trainer.config import TrainConfig
    from dllm_trainer.data import asset_path
    from dllm_trainer.training.train import run_training

    monkeypatch.setenv("DLLM_CPU_THREADS", "1")
    base = copy_with_tokenizer(llada_tiny, tmp_path / "base", make_tiny_tokenizer())
    cfg = TrainConfig.from_dict(dict(
        model_name=str(base), dataset_name=str(asset_path("chat_small.jsonl")), output_dir=str(tmp_path / "run"),
        training_method="llada", train_device="cpu", lora=False, num_train_epochs=0, train_steps=12, batch_size=8,
        learning_rate=3e-3, max_length=64, logging_steps=6, save_steps=12,
    ))
    result = run_training(cfg, log=lambda *a: None)
    model_dir = Path(result.final_model_dir)
    sess = chat.load_session(str(model_dir), "cpu")

    mc_rows = [{"question": "What comes after 8?", "choices": ["9", "3", "7"], "answer": 0},
               {"question": "What is 4 plus 7?", "choices": ["11", "2"], "answer": 0}]
    gen_rows = [("What is 9 plus 4?", "13"), ("What comes after 2?", "3")]
    gen = dict(gen_length=8, steps=4, block_length=4)
    context0 = sess.tokenizer.apply_chat_template([{"role": "user", "content": gen_rows[0][0]}], tokenize=False,
                                                  add_generation_prompt=True)
    first = _direct_generation(sess, context0, gen)
    until = ["\n\n\n", _pick_stop(first)] if len(first) > 1 else ["\n\n\n"]
    tasks = _write_tasks(tmp_path / "tasks", "trained", mc_rows, gen_rows, until, max_gen_toks=32)

    out = tmp_path / "eval"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "dllm_trainer.cli", "eval", "--model", str(model_dir), "--tasks", ",".join(tasks),
         "--include-path", str(tmp_path / "tasks"), "--apply-chat-template", "--mc-num", str(MC_NUM),
         "--mc-batch-size", str(MC_BATCH), "--gen-length", "8", "--steps", "4", "--block-length", "4",
         "--device", "cpu", "--output", str(out), "--log-samples"],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained_mc" in proc.stdout and "results written to" in proc.stdout
    samples = _read_samples(out, "trained_gen")
    assert samples[0]["arguments"][0][0] == context0  # the chat template was applied
    _check_against_direct(sess, out, tasks, gen, until)
