"""Data pipeline: sources, formats, templates (sandboxed), tokenisation, truncation, eval split."""
from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from dllm_trainer import data as D
from dllm_trainer.errors import ConfigError, DataError, UserError
from tiny_tokenizer import make_tiny_tokenizer

IGN = -100


# ------------------------------------------------------------------------------------ helpers


@pytest.fixture(autouse=True, scope="module")
def _datasets_cache(tmp_path_factory):
    """Keep the datasets cache of these tests out of ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_datasets_cache"))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def tiny_plain():
    return make_tiny_tokenizer(with_chat_template=False)


@pytest.fixture(scope="module")
def bert(minilm):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm))
    assert not getattr(tok, "chat_template", None)
    return tok


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def qa(n: int, start: int = 0):
    return [{"prompt": f"What is {i} plus 1?", "completion": str(i + 1)} for i in range(start, start + n)]


def chat(q: str, a: str, system: str | None = None):
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def col(ds, name):
    return list(ds[name])


def ids(tok, text, special=False):
    return tok(text, add_special_tokens=special)["input_ids"]


def build(src, tok, **kw):
    kw.setdefault("max_length", 128)
    kw.setdefault("log", None)
    return D.build_datasets(str(src), tok, **kw)


def tok_row(row, tok, fmt=None, **kw):
    kw.setdefault("max_length", 128)
    return D.tokenize_example(row, tok, fmt=fmt or D.detect_format(list(row)), **kw)


# ------------------------------------------------------------------------------------ tiny tokenizer + asset


def test_tiny_tokenizer_matches_fixture_ids(tiny, fixtures_dir):
    cfg = json.loads((fixtures_dir / "llada-tiny" / "config.json").read_text())
    assert tiny.mask_token_id == cfg["mask_token_id"] == 500
    assert tiny.eos_token_id == cfg["eos_token_id"] == 2
    assert tiny.pad_token_id == cfg["pad_token_id"] == 2
    assert len(tiny) == cfg["vocab_size"] == 512
    assert max(tiny.get_vocab().values()) < 512
    text = "Hello, World! 123\n\tok"
    assert tiny.decode(ids(tiny, text)) == text
    full = tiny.apply_chat_template(chat("Q?", "A", system="S"), tokenize=False)
    assert full == "<|startoftext|><|system|>\nS\n<|user|>\nQ?\n<|assistant|>\nA<|endoftext|>"
    assert make_tiny_tokenizer(with_chat_template=False).chat_template is None


def test_bundled_chat_small(tiny):
    path = D.asset_path("chat_small.jsonl")
    raw = path.read_bytes()
    assert raw.isascii()
    rows = [json.loads(line) for line in raw.decode().splitlines()]
    assert len(rows) == 64
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in rows)
    p = build(path, tiny, max_length=64)
    assert p.stats.format == "messages" and p.stats.dropped == {}
    assert p.train.num_rows + p.eval.num_rows == 64
    assert max(max(r) for r in col(p.train, "input_ids")) < 512


# ------------------------------------------------------------------------------------ sources


def test_load_save_to_disk_dataset_and_dict(tmp_path):
    ds = datasets.Dataset.from_list(qa(3))
    ds.save_to_disk(str(tmp_path / "ds"))
    dd = D.load_raw_dataset(str(tmp_path / "ds"))
    assert list(dd) == ["train"] and dd["train"].num_rows == 3

    datasets.DatasetDict(
        {"train": ds, "test": datasets.Dataset.from_list(qa(2)), "other": ds}
    ).save_to_disk(str(tmp_path / "dd"))
    dd = D.load_raw_dataset(str(tmp_path / "dd"))
    assert sorted(dd) == ["test", "train"]  # unrelated splits dropped
    assert dd["test"].num_rows == 2


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet"])
def test_load_single_file(tmp_path, kind):
    rows = qa(4)
    path = tmp_path / f"data.{kind}"
    if kind == "jsonl":
        write_jsonl(path, rows)
    elif kind == "json":
        path.write_text(json.dumps(rows))  # a JSON array
    elif kind == "csv":
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    else:
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    dd = D.load_raw_dataset(str(path))
    assert dd["train"].num_rows == 4
    assert {k: str(v) for k, v in dd["train"][1].items()} == rows[1]  # csv reads "2" as 2


def test_load_folder_ignores_index_json(tmp_path, tiny):
    folder = tmp_path / "upload"
    folder.mkdir()
    (folder / "index.json").write_text(json.dumps({"name": "upload", "files": ["mydata.jsonl"]}))
    write_jsonl(folder / "mydata.jsonl", qa(5))
    dd = D.load_raw_dataset(str(folder))
    assert list(dd) == ["train"] and dd["train"].column_names == ["prompt", "completion"]
    assert build(folder, tiny).train.num_rows == 5


def test_load_folder_split_files_and_split_argument(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", qa(6))
    write_jsonl(tmp_path / "test.jsonl", qa(2))
    write_jsonl(tmp_path / "validation.jsonl", qa(3))
    dd = D.load_raw_dataset(str(tmp_path))
    assert {k: v.num_rows for k, v in dd.items()} == {"train": 6, "test": 2, "validation": 3}
    dd = D.load_raw_dataset(str(tmp_path), split="validation")
    assert {k: v.num_rows for k, v in dd.items()} == {"train": 3, "test": 2}
    with pytest.raises(DataError, match=r"no split 'nope'.*\['train', 'test', 'validation'\]|no split 'nope'"):
        D.load_raw_dataset(str(tmp_path), split="nope")


def test_load_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"not found; expected a folder written by datasets.save_to_disk"):
        D.load_raw_dataset(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match=r"'\./nope/data' not found"):
        D.load_raw_dataset("./nope/data")
    with pytest.raises(DataError, match=r"no dataset given"):
        D.load_raw_dataset("  ")

    txt = tmp_path / "data.txt"
    txt.write_text("hello")
    with pytest.raises(DataError, match=r"data\.txt.*unsupported type '\.txt'; allowed: \.json, \.jsonl, \.csv, \.parquet"):
        D.load_raw_dataset(str(txt))

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"'bad\.jsonl' line 2: not valid JSON \(Expecting value at column 10\)$"):
        D.load_raw_dataset(str(bad))
    badpq = tmp_path / "bad.parquet"
    badpq.write_bytes(b"not a parquet file at all")
    with pytest.raises(DataError, match=r"could not read dataset file .*bad\.parquet"):
        D.load_raw_dataset(str(badpq))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl"):
        D.load_raw_dataset(str(empty))

    only_index = tmp_path / "only_index"
    only_index.mkdir()
    (only_index / "index.json").write_text("{}")
    with pytest.raises(DataError, match=r"holds no \.json/\.jsonl/\.csv/\.parquet data file \(index\.json is ignored\)"):
        D.load_raw_dataset(str(only_index))

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_jsonl(mixed / "a.jsonl", qa(2))
    datasets.Dataset.from_list(qa(2)).to_csv(str(mixed / "b.csv"), index=False)
    with pytest.raises(DataError, match=r"mixes file types \(a\.jsonl, b\.csv\)"):
        D.load_raw_dataset(str(mixed))

    datasets.Dataset.from_dict({"text": []}).save_to_disk(str(tmp_path / "zero"))
    with pytest.raises(DataError, match=r"zero' is empty \(0 rows"):
        D.load_raw_dataset(str(tmp_path / "zero"))

    broken_saved = tmp_path / "broken_saved"
    broken_saved.mkdir()
    (broken_saved / "dataset_dict.json").write_text("{not json")
    with pytest.raises(DataError, match=r"could not load the saved dataset folder .*broken_saved"):
        D.load_raw_dataset(str(broken_saved))

    nosplit = tmp_path / "nosplit"
    datasets.DatasetDict(
        {"a": datasets.Dataset.from_list(qa(2)), "b": datasets.Dataset.from_list(qa(2))}
    ).save_to_disk(str(nosplit))
    with pytest.raises(DataError, match=r"no 'train' split and several others \['a', 'b'\]"):
        D.load_raw_dataset(str(nosplit))

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"'someone/no-such-dataset' is not a local file or folder, and loading it from the Hugging Face Hub failed"):
        D.load_raw_dataset("someone/no-such-dataset")


def test_errors_are_user_errors():
    assert issubclass(DataError, UserError) and issubclass(ConfigError, UserError)


# ------------------------------------------------------------------------------------ formats


@pytest.mark.parametrize(
    "cols, fmt",
    [
        (["messages", "id"], "messages"),
        (["prompt", "completion"], "prompt_completion"),
        (["prompt", "response", "text"], "prompt_completion"),
        (["instruction", "input", "output"], "alpaca"),
        (["instruction", "output"], "alpaca"),
        (["text", "meta"], "text"),
    ],
)
def test_detect_format(cols, fmt):
    assert D.detect_format(cols) == fmt


def test_detect_format_error_names_columns_and_allowed():
    with pytest.raises(DataError) as err:
        D.detect_format(["question", "answer"])
    msg = str(err.value)
    assert "['answer', 'question']" in msg
    for word in ("'messages'", "'prompt' + 'completion' (or 'response')", "'instruction' + 'output'", "'text'", "input_template"):
        assert word in msg


def test_each_row_format_with_chat_template(tiny):
    expect = tiny.apply_chat_template(chat("Add 2 and 3.\n\nquickly", "5"), tokenize=False)
    rows = [
        {"messages": chat("Add 2 and 3.\n\nquickly", "5")},
        {"prompt": "Add 2 and 3.\n\nquickly", "completion": "5"},
        {"prompt": "Add 2 and 3.\n\nquickly", "response": "5"},
        {"instruction": "Add 2 and 3.", "input": "quickly", "output": "5"},
        {"prompt": [{"role": "user", "content": "Add 2 and 3.\n\nquickly"}], "completion": [{"role": "assistant", "content": "5"}]},
    ]
    for row in rows:
        out = tok_row(row, tiny)
        assert tiny.decode(out["input_ids"]) == expect, row
        assert out["drop_reason"] == "" and not out["template_fallback"]
    alpaca_no_input = tok_row({"instruction": "Hi", "input": "", "output": "x"}, tiny)
    assert tiny.decode(alpaca_no_input["input_ids"]) == tiny.apply_chat_template(chat("Hi", "x"), tokenize=False)
    text = tok_row({"text": "abc"}, tiny)
    assert text["input_ids"] == ids(tiny, "abc") + [2] and text["prompt_len"] == 0
    assert text["labels"] == text["input_ids"]


def test_chat_template_path_prompt_len_and_labels(tiny):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "ignored trailing turn"},
    ]
    out = tok_row({"messages": msgs}, tiny)
    full = tiny.apply_chat_template(msgs[:5], return_dict=False)
    prompt = tiny.apply_chat_template(msgs[:4], add_generation_prompt=True, return_dict=False)
    assert out["input_ids"] == full and out["prompt_len"] == len(prompt)
    assert out["labels"] == [IGN] * len(prompt) + ids(tiny, "4") + [2]  # only the LAST answer trains
    off = tok_row({"messages": msgs}, tiny, mask_prompt_loss=False)
    assert off["labels"] == off["input_ids"] == full and off["prompt_len"] == len(prompt)


def test_chat_template_prefix_fallback(tiny):
    from tiny_tokenizer import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    # generation prompt ends with "\n" but the rendered assistant turn has none: not a prefix
    tok.chat_template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}"
        "{% if m['role'] != 'assistant' %}{{ '\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    )
    out = tok_row({"prompt": "Q", "completion": "A"}, tok)
    prompt = tok.apply_chat_template(chat("Q", "A")[:1], add_generation_prompt=True, return_dict=False)
    assert out["template_fallback"]
    assert out["input_ids"] == prompt + ids(tok, "A") + [2]
    assert out["prompt_len"] == len(prompt)


def test_chat_template_that_raises_is_a_data_error(tmp_path):
    tok = make_tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    src = write_jsonl(tmp_path / "d.jsonl", [{"messages": chat("q", "a", system="s")}])
    with pytest.raises(DataError, match=r"^'d\.jsonl' line 1: the tokenizer's chat template failed.*System role not supported"):
        build(src, tok)


def test_plain_template_bert(bert):
    out = tok_row({"prompt": "what is two plus two?", "completion": "four"}, bert)
    p = bert("what is two plus two?")["input_ids"]
    assert p[0] == bert.cls_token_id and p[-1] == bert.sep_token_id
    assert out["input_ids"] == p + ids(bert, "four") + [bert.sep_token_id]
    assert out["prompt_len"] == len(p)
    assert out["labels"] == [IGN] * len(p) + ids(bert, "four") + [bert.sep_token_id]

    msgs = chat("hi", "hello", system="be nice") + [
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "see you"},
    ]
    out = tok_row({"messages": msgs}, bert)
    p = bert("system: be nice\nuser: hi\nassistant: hello\nuser: bye\nassistant:")["input_ids"]
    assert out["input_ids"][: len(p)] == p and out["prompt_len"] == len(p)
    assert out["input_ids"][len(p):] == ids(bert, "see you") + [bert.sep_token_id]

    text = tok_row({"text": "plain text row"}, bert)
    assert text["input_ids"] == bert("plain text row")["input_ids"]  # [CLS] ... [SEP], no extra end
    assert text["prompt_len"] == 1 and text["labels"][0] == IGN and text["labels"][1:] == text["input_ids"][1:]


def test_plain_template_tiny_without_chat_template(tiny_plain):
    out = tok_row({"prompt": "Q?", "completion": "A"}, tiny_plain)
    assert out["input_ids"] == ids(tiny_plain, "Q?") + ids(tiny_plain, "A") + [2]
    assert out["prompt_len"] == 2
    out = tok_row({"prompt": "Q?", "completion": "A"}, tiny_plain, system_prompt="Sys")
    assert tiny_plain.decode(out["input_ids"][: out["prompt_len"]]) == "system: Sys\nuser: Q?\nassistant:"


# ------------------------------------------------------------------------------------ templates


def test_templates_override_detection(tmp_path, tiny):
    rows = [{"question": f"q{i}", "answer": f"a{i}", "extra": None} for i in range(3)]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    p = build(
        src,
        tiny,
        input_template="Q: {{ question }}{{ extra }}",
        output_template="{{ answer | upper }}",
        instruction_template="Answer well.",
    )
    assert p.stats.format == "template"
    expect = tiny.apply_chat_template(chat("Q: q1", "A1", system="Answer well."), tokenize=False)
    assert tiny.decode(p.train[1]["input_ids"]) == expect
    # templates win even over detectable columns; an output_template alone makes text rows
    src2 = write_jsonl(tmp_path / "t.jsonl", [{"text": "ignored", "body": "hello"}])
    p = build(src2, tiny, output_template="<<{{ body }}>>")
    assert p.train[0]["input_ids"] == ids(tiny, "<<hello>>") + [2] and p.train[0]["prompt_len"] == 0


def test_system_prompt_system_message(tiny):
    out = tok_row({"messages": chat("q", "a")}, tiny, system_prompt="SYS")
    assert "<|system|>\nSYS\n<|user|>" in tiny.decode(out["input_ids"])
    out = tok_row({"messages": chat("q", "a", system="own")}, tiny, system_prompt="SYS")
    decoded = tiny.decode(out["input_ids"])
    assert "own" in decoded and "SYS" not in decoded  # an existing system message is kept
    out = tok_row({"text": "abc"}, tiny, system_prompt="SYS")
    assert out["input_ids"] == ids(tiny, "abc") + [2]  # ignored for text rows


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ question.__class__.__base__.__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ self._TemplateReference__context }}",
    ],
)
def test_template_sandbox_refuses_unsafe_access(tmp_path, tiny, template):
    src = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"^'d\.jsonl' line 1: input_template: refused by the template sandbox"):
        build(src, tiny, input_template=template, output_template="{{ answer }}")


def test_template_errors(tmp_path, tiny):
    src = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"^output_template: template syntax error on line 1"):
        build(src, tiny, input_template="{{ question }}", output_template="{{ answer ")
    # a column the dataset does not have, next to one it has: named before any row is tokenised
    with pytest.raises(DataError, match=r"^the Data Template does not fit dataset '.*d\.jsonl': input_template reads "
                                        r"questoin, not among its columns \(answer, question\)"):
        build(src, tiny, input_template="{{ questoin }}", output_template="{{ answer }}")
    with pytest.raises(ConfigError, match=r"input_template needs an output_template"):
        build(src, tiny, input_template="{{ question }}")
    with pytest.raises(ConfigError, match=r"instruction_template needs an output_template"):
        build(src, tiny, instruction_template="Be brief")
    # a later row failing inside the map names the file and line
    src2 = write_jsonl(tmp_path / "e.jsonl", [{"a": "x"}, {"a": None}])
    with pytest.raises(DataError, match=r"^'e\.jsonl' line 2: output_template: rendering failed"):
        build(src2, tiny, output_template="{{ a.upper() }}")


# ------------------------------------------------------------------------------------ truncation, drops


def test_truncation_right_vs_filter(tmp_path, tiny):
    rows = [{"prompt": "Q", "completion": "x" * 40}, {"prompt": "Q", "completion": "y"}]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    short_len = len(tok_row(rows[1], tiny)["input_ids"])
    right = build(src, tiny, max_length=20)
    assert right.train.num_rows == 2 and len(right.train[0]["input_ids"]) == 20
    assert right.train[0]["labels"][-1] == ids(tiny, "x")[0]  # cut: no eos at the end
    assert right.stats.truncated == 1 and right.stats.dropped == {}
    filt = build(src, tiny, max_length=20, truncation="filter")
    assert filt.train.num_rows == 1 and len(filt.train[0]["input_ids"]) == short_len
    assert filt.stats.dropped == {"too_long": 1} and col(filt.train, "sample_index") == [0]
    with pytest.raises(ConfigError, match="truncation must be one of"):
        build(src, tiny, truncation="left")


def test_dropped_rows_counted_and_logged(tmp_path, tiny):
    long_prompt = "p" * 50
    rows = [
        {"messages": chat("ok", "fine")},
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"messages": chat(long_prompt, "a")},
        {"messages": "not json at all"},
        {"messages": json.dumps(chat("as json string", "yes"))},
    ]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    logs = []
    p = build(src, tiny, max_length=40, log=logs.append)
    assert p.stats.dropped == {"no_assistant_turn": 1, "no_trainable_tokens": 1, "malformed": 1}
    assert p.stats.rows_in == 5 and p.stats.rows_out == 2 and p.stats.dropped_total == 3
    assert col(p.train, "sample_index") == [0, 1]
    assert len(logs) == 1
    assert ("5 rows -> train 2, eval 0 (none); dropped 3 (malformed 1: 'd.jsonl' line 4; no_assistant_turn 1: "
            "'d.jsonl' line 2; no_trainable_tokens 1: 'd.jsonl' line 3)") in logs[0]
    # without prompt masking the long-prompt row still has trainable tokens
    p = build(src, tiny, max_length=40, mask_prompt_loss=False)
    assert p.stats.dropped == {"no_assistant_turn": 1, "malformed": 1}


def test_empty_text_rows_dropped(tmp_path, tiny):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": "abc"}, {"text": "   "}, {"text": None}, {"text": "de"}])
    p = build(src, tiny)
    assert p.stats.dropped == {"empty": 2} and p.train.num_rows == 2


def test_all_rows_dropped_is_a_data_error(tmp_path, tiny):
    src = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a long prompt", "completion": "x"}] * 3)
    with pytest.raises(DataError, match=r"all 3 training rows of '.*d\.jsonl' were dropped \(no_trainable_tokens 3: 'd\.jsonl' line 1, 'd\.jsonl' line 2, 'd\.jsonl' line 3\).*max_length=5"):
        build(src, tiny, max_length=5)


def test_mask_prompt_loss_on_off(tiny):
    row = {"prompt": "Q", "completion": "A"}
    on, off = tok_row(row, tiny), tok_row(row, tiny, mask_prompt_loss=False)
    assert on["input_ids"] == off["input_ids"] and on["prompt_len"] == off["prompt_len"] > 0
    assert on["labels"] == [IGN] * on["prompt_len"] + on["input_ids"][on["prompt_len"]:]
    assert off["labels"] == off["input_ids"]


# ------------------------------------------------------------------------------------ eval split, sample_index


def test_own_test_split_is_eval(tmp_path, tiny):
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(qa(30)), "validation": datasets.Dataset.from_list(qa(4, 100))}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    p = build(tmp_path / "dd", tiny)
    assert p.train.num_rows == 30 and p.eval.num_rows == 4
    assert p.stats.eval_from == "validation split"
    assert col(p.eval, "sample_index") == [0, 1, 2, 3]
    assert tiny.decode(p.eval[0]["input_ids"]).count("What is 100 plus 1?") == 1
    assert sorted(p.train.column_names) == sorted(D.OUTPUT_COLUMNS)
    assert sorted(p.eval.column_names) == sorted(D.OUTPUT_COLUMNS)


def test_holdout_rules(tmp_path, tiny):
    src = write_jsonl(tmp_path / "d.jsonl", qa(20))
    a, b = build(src, tiny, seed=1), build(src, tiny, seed=1)
    assert (a.train.num_rows, a.eval.num_rows) == (18, 2)
    assert col(a.eval, "input_ids") == col(b.eval, "input_ids") and col(a.train, "input_ids") == col(b.train, "input_ids")
    assert col(a.train, "sample_index") == list(range(18)) and col(a.eval, "sample_index") == [0, 1]
    assert a.stats.eval_from == "10% holdout, seed 1"
    others = [col(build(src, tiny, seed=s).eval, "input_ids") for s in (2, 3, 4)]
    assert any(o != col(a.eval, "input_ids") for o in others)  # the seed chooses the held-out rows
    # no row is lost or duplicated
    all_rows = sorted(map(tuple, col(a.train, "input_ids") + col(a.eval, "input_ids")))
    assert all_rows == sorted(map(tuple, build(src, tiny, eval_fraction=0).train["input_ids"]))

    ten = build(write_jsonl(tmp_path / "ten.jsonl", qa(10)), tiny)
    assert (ten.train.num_rows, ten.eval.num_rows) == (9, 1)
    nine = build(write_jsonl(tmp_path / "nine.jsonl", qa(9)), tiny)
    assert nine.eval is None and nine.train.num_rows == 9 and nine.stats.eval_from == "none"


def test_num_proc(tmp_path, tiny, monkeypatch):
    src = write_jsonl(tmp_path / "d.jsonl", qa(12))
    two = build(src, tiny, seed=3, num_proc=2)  # fresh data: really runs in 2 worker processes

    def no_pool(*a, **k):
        raise AssertionError("num_proc=1 must not start processes")

    monkeypatch.setattr(datasets.arrow_dataset.mp, "Pool", no_pool)
    one = build(src, tiny, seed=3, num_proc=1)
    assert two.train[:] == one.train[:] and two.eval[:] == one.eval[:]
    assert two.stats == one.stats


def test_read_only_dataset_folder_caches_elsewhere(tmp_path, tiny, monkeypatch):
    datasets.Dataset.from_list(qa(3)).save_to_disk(str(tmp_path / "ro"))
    monkeypatch.setattr(D, "_writable", lambda folder: False)
    p = build(tmp_path / "ro", tiny)
    assert p.train.num_rows == 3
    assert not any(f.name.startswith("cache-") for f in (tmp_path / "ro").iterdir())


# ------------------------------------------------------------------------------------ Transformer Lab's data


APP_TEMPLATE = {"instruction_template": "Instruction: {{instruction}}", "input_template": "{{input}}",
                "output_template": "{{output}}"}  # what the app's Data Template tab sends for a new template


@pytest.mark.parametrize("name, split", [
    ("tiny_chat_train.jsonl", "train"), ("tiny_chat_eval.jsonl", "validation"), ("tiny_chat_test.jsonl", "test"),
    ("tiny_chat_validation.jsonl", "validation"), ("my-data.dev.jsonl", "validation"), ("train.jsonl", "train"),
    ("test_questions.jsonl", "test"), ("latest_questions_train.csv", "train"), ("contest2024.jsonl", "train"),
    ("tiny_chat.jsonl", "train"), ("evaluation_set_training.jsonl", "train"),
])
def test_split_of_a_workspace_file(name, split):
    assert D._split_of_file(Path(name)) == split


def test_workspace_split_files_are_splits_and_nothing_is_held_out(tmp_path, tiny):
    ds = tmp_path / "tiny_chat"
    ds.mkdir()
    (ds / "index.json").write_text(json.dumps({"dataset_id": "tiny_chat", "location": "local"}))
    write_jsonl(ds / "tiny_chat_train.jsonl", qa(30))
    write_jsonl(ds / "tiny_chat_eval.jsonl", qa(5, 100))
    p = build(ds, tiny)
    assert (p.train.num_rows, p.eval.num_rows, p.stats.eval_from) == (30, 5, "validation split")
    questions = lambda d: sorted(tiny.decode(r).split("<|user|>\n")[1].split("?")[0] for r in col(d, "input_ids"))  # noqa: E731
    assert questions(p.eval) == sorted(f"What is {i} plus 1" for i in range(100, 105))
    assert questions(p.train) == sorted(f"What is {i} plus 1" for i in range(30))
    # eval_strategy "no": no eval rows at all, neither the split nor a holdout
    off = build(ds, tiny, evaluation=False)
    assert (off.train.num_rows, off.eval, off.stats.eval_from) == (30, None, "none (evaluation off)")
    single = write_jsonl(tmp_path / "d.jsonl", qa(20))
    off = build(single, tiny, evaluation=False)
    assert (off.train.num_rows, off.eval) == (20, None)


def test_broken_rows_are_named_by_file_and_line(tmp_path):
    pretty = tmp_path / "pretty.json"
    pretty.write_text('[\n  {"prompt": "a",\n   "completion": "b"},\n  {"prompt": "c", "completion": }\n]\n')
    with pytest.raises(DataError, match=r"'pretty\.json' line 4: not valid JSON \(Expecting value at column 33\)"):
        D.load_raw_dataset(str(pretty))
    lines = tmp_path / "list.jsonl"
    lines.write_text('{"prompt": "a", "completion": "b"}\n["not", "an", "object"]\n')
    with pytest.raises(DataError, match=r"'list\.jsonl' line 2: a JSON list, expected one object of columns per line"):
        D.load_raw_dataset(str(lines))
    header = tmp_path / "header.csv"
    header.write_text("prompt,completion\n\n")
    with pytest.raises(DataError, match=r"'header\.csv' has only a header line \(prompt, completion\) and no data rows"):
        D.load_raw_dataset(str(header))
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "x_train.jsonl", qa(2))
    (folder / "x_eval.jsonl").write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a" "completion": "b"}\n')
    with pytest.raises(DataError, match=r"'x_eval\.jsonl' line 3: not valid JSON"):
        D.load_raw_dataset(str(folder))


def test_row_origins_name_file_and_line(tmp_path):
    jl = tmp_path / "a.jsonl"
    jl.write_text('{"text": "a"}\n\n   \n{"text": "b"}\n{"text": "c"}\n')
    arr = tmp_path / "b.json"
    arr.write_text('[\n {"text": "d"},\n\n {"text":\n  "e"}\n]')
    csvf = tmp_path / "c.csv"
    csvf.write_text('text,n\n"multi\nline",1\n\nplain,2\n')
    origins = D.RowOrigins("train", (str(jl), str(arr), str(csvf)))
    assert [origins.where(i) for i in range(7)] == [
        "'a.jsonl' line 1", "'a.jsonl' line 4", "'a.jsonl' line 5", "'b.json' line 2", "'b.json' line 4",
        "'c.csv' line 2", "'c.csv' line 5"]
    assert origins.select([6, 0]).where(0) == "'c.csv' line 5"
    assert D.RowOrigins("eval").select([3]).where(0) == "eval row 3"
    # what datasets itself reads agrees with the counts
    assert D.load_raw_dataset(str(jl))["train"].num_rows == 3 and D.load_raw_dataset(str(csvf))["train"].num_rows == 2


def test_mixed_formats_in_one_file_are_named(tmp_path, tiny):
    src = tmp_path / "mixed.jsonl"
    src.write_text(json.dumps({"messages": chat("q", "a")}) + "\n"
                   + json.dumps({"messages": chat("q2", "a2")}) + "\n"
                   + json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    with pytest.raises(DataError, match=r"'mixed\.jsonl' line 3 is a 'prompt_completion' row \(prompt \+ completion/response\) "
                                        r"but 'mixed\.jsonl' line 1 is a 'messages' row .*one row format per dataset"):
        build(src, tiny)
    # a column that is null in some rows is not a second format: those rows are dropped as empty
    src2 = write_jsonl(tmp_path / "holes.jsonl", [{"text": "a"}, {"text": None, "note": "x"}, {"text": "b"}])
    p = build(src2, tiny)
    assert p.stats.dropped == {"empty": 1} and p.stats.dropped_at == {"empty": ["'holes.jsonl' line 2"]}


def test_sharegpt_rows(tmp_path, tiny):
    share = [{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q?"},
                                {"from": "gpt", "value": "A"}]}]
    openai = [{"messages": chat("Q?", "A", system="S")}]
    a = build(write_jsonl(tmp_path / "share.jsonl", share), tiny)
    b = build(write_jsonl(tmp_path / "openai.jsonl", openai), tiny)
    assert a.stats.format == "messages" and a.train[:] == b.train[:]
    # human/gpt roles inside a messages column (role/content keys) are mapped too
    c = build(write_jsonl(tmp_path / "roles.jsonl", [{"messages": [{"role": "human", "content": "Q?"},
                                                                     {"role": "gpt", "content": "A"}]}]), tiny)
    assert tiny.decode(c.train[0]["input_ids"]) == tiny.apply_chat_template(chat("Q?", "A"), tokenize=False)


def test_openai_content_parts(tmp_path, tiny):
    parts = [
        {"messages": [{"role": "system", "content": "S"},  # a string beside part lists in one file
                      {"role": "user", "content": [{"type": "text", "text": "Q"}, {"type": "text", "text": "?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "A"}]}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                                                   {"type": "text", "text": "what is this?"}]},
                      {"role": "assistant", "content": "a cat"}]},
    ]
    p = build(write_jsonl(tmp_path / "parts.jsonl", parts), tiny)
    assert p.train.num_rows == 1
    assert tiny.decode(p.train[0]["input_ids"]) == tiny.apply_chat_template(chat("Q?", "A", system="S"), tokenize=False)
    assert p.stats.dropped == {"non_text_content": 1} and p.stats.dropped_at["non_text_content"] == ["'parts.jsonl' line 2"]


def test_empty_completions_are_dropped_counted_and_named(tmp_path, tiny):
    rows = [
        {"prompt": "ok", "completion": "fine"},
        {"prompt": "q", "completion": ""},
        {"prompt": "q", "completion": "   "},
        {"prompt": "q", "completion": None},
        {"prompt": "ok2", "completion": "fine2"},
    ]
    logs = []
    p = build(write_jsonl(tmp_path / "pc.jsonl", rows), tiny, log=logs.append)
    assert p.train.num_rows == 2 and p.stats.dropped == {"empty_completion": 3}
    assert "dropped 3 (empty_completion 3: 'pc.jsonl' line 2, 'pc.jsonl' line 3, 'pc.jsonl' line 4)" in logs[-1]
    msgs = [{"messages": chat("q", "")}, {"messages": chat("q", "a")}]
    assert build(write_jsonl(tmp_path / "m.jsonl", msgs), tiny).stats.dropped == {"empty_completion": 1}
    alpaca = [{"instruction": "i", "input": "", "output": ""}, {"instruction": "i", "input": "", "output": "o"}]
    assert build(write_jsonl(tmp_path / "al.jsonl", alpaca), tiny).stats.dropped == {"empty_completion": 1}
    # more than three: the first three are named, then "..."
    many = write_jsonl(tmp_path / "many.jsonl", [{"prompt": "q", "completion": ""}] * 4 + [{"prompt": "q", "completion": "a"}])
    assert "empty_completion 4: 'many.jsonl' line 1, 'many.jsonl' line 2, 'many.jsonl' line 3, ..." in build(many, tiny).stats.summary()


def test_app_data_template_on_an_alpaca_dataset(tmp_path, tiny):
    rows = [{"instruction": "Summarize.", "input": "A long text.", "output": "Short."},
            {"instruction": "Greet.", "input": "", "output": "Hi"}]
    src = write_jsonl(tmp_path / "al.jsonl", rows)
    p = build(src, tiny, **APP_TEMPLATE)
    assert p.stats.format == "template"
    # the rendered instruction is the system message, the rendered input the user message
    want = [chat("A long text.", "Short.", system="Instruction: Summarize."), chat("", "Hi", system="Instruction: Greet.")]
    assert [tiny.decode(r) for r in col(p.train, "input_ids")] == [tiny.apply_chat_template(m, tokenize=False) for m in want]
    # our own system_prompt goes first
    p = build(src, tiny, system_prompt="Be brief.", **APP_TEMPLATE)
    assert tiny.decode(p.train[0]["input_ids"]).startswith("<|startoftext|><|system|>\nBe brief.\n\nInstruction: Summarize.\n<|user|>")


def test_app_data_template_that_reads_no_column_of_the_dataset_is_not_used(tmp_path, tiny):
    rows = [{"messages": chat(f"q{i}", f"a{i}")} for i in range(3)]
    src = write_jsonl(tmp_path / "chat.jsonl", rows)
    logs = []
    p = build(src, tiny, log=logs.append, **APP_TEMPLATE)
    assert p.stats.format == "messages" and p.train[:] == build(src, tiny).train[:]
    assert logs[0] == (f"[dllm] the Data Template reads columns input, instruction, output, which dataset '{src}' does not "
                       "have (its columns: messages); training on its rows as they are")
    # a template that fits the columns is used
    qa_src = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Q?", "answer": "A"}])
    p = build(qa_src, tiny, instruction_template="", input_template="{{question}}", output_template="{{answer}}")
    assert tiny.decode(p.train[0]["input_ids"]) == tiny.apply_chat_template(chat("Q?", "A"), tokenize=False)
    # no known format and no column the template reads: one message with both
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"foo": "x"}])
    with pytest.raises(DataError, match=r"cannot tell the dataset format from its columns \['foo'\].*the Data Template reads "
                                        r"columns input, instruction, output, which it does not have"):
        build(odd, tiny, **APP_TEMPLATE)
