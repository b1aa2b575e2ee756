"""The web playground (`dllm-trainer playground`) and the sampler's per-step callback it is built on.

- generate(callback=...) reports every step without changing the output (all families);
- Playground.run (the page's sampler plumbing, no browser) gives generate's output for chat, raw
  and infill requests on LLaDA, LLaDA-MoE, Dream, a2d and BERT, with a consistent step trace;
- the page itself, served by the real command and driven in headless Chromium (Playwright with
  the system's chromium): a prompt is sent, the denoising steps render live and replay with the
  slider, and the final text equals generate's (and `dllm-trainer generate`'s) output. A
  screenshot is saved in the test's tmp_path and, when DLLM_TEST_SCREENSHOTS names a folder,
  there too.

The browser test needs gradio, playwright and chromium, which `bash setup.sh --dev` installs; a
missing one FAILS the test (naming what to install) unless DLLM_SKIP_BROWSER_TESTS=1 is set.
"""
from __future__ import annotations

import importlib.util
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

import dllm_trainer  # noqa: F401  (registers the model classes)
from core_helpers import copy_with_tokenizer
from tiny_tokenizer import make_tiny_tokenizer
from dllm_trainer.sampling import chat, generate
from dllm_trainer.sampling import playground as pgmod
from dllm_trainer.sampling.playground import Playground, PlaygroundError, Settings

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread_module")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, llada_tiny, llada_moe_tiny, dream_tiny, minilm):
    from transformers import AutoModelForCausalLM, Qwen2Config

    from dllm_trainer.models.a2d import make_diffusion_lm

    root = tmp_path_factory.mktemp("playground-models")
    dirs = {"bert": minilm}
    for name, src in (("llada", llada_tiny), ("llada-moe", llada_moe_tiny), ("dream", dream_tiny)):
        dirs[name] = copy_with_tokenizer(src, root / name, make_tiny_tokenizer())
    # an a2d model: a tiny random Qwen2 switched to bidirectional attention, as an a2d run saves it
    torch.manual_seed(0)
    qwen = AutoModelForCausalLM.from_config(Qwen2Config(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=2))
    make_diffusion_lm(qwen, 500, shift_logits=True)
    qwen.save_pretrained(root / "a2d")
    make_tiny_tokenizer().save_pretrained(root / "a2d")
    dirs["a2d"] = root / "a2d"
    return dirs


@pytest.fixture(scope="module")
def sessions(model_dirs):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = chat.load_session(str(model_dirs[name]), "cpu")
        return cache[name]

    return get


# ---------------------------------------------------------------------------------------------
# generate(callback=...)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kw", [
    ("llada", dict(gen_length=12, steps=6, block_length=4)),
    ("dream", dict(gen_length=8, steps=8, strategy="entropy")),
    ("dream", dict(gen_length=8, steps=8, strategy="origin", seed=3)),
    ("llada", dict(gen_length=8, steps=8, threshold=0.01, cache="dual", block_length=4)),
])
def test_generate_callback_reports_each_step_without_changing_the_output(sessions, name, kw):
    sess = sessions(name)
    prompt = torch.tensor([[1, 40, 41, 42, 43, 44]])
    plain = generate(sess.model, prompt, **kw)
    events = []
    traced = generate(sess.model, prompt, callback=lambda ev: events.append(
        (ev.step, ev.block, ev.x.clone(), ev.revealed.clone(), ev.prompt_len)), **kw)
    assert torch.equal(plain, traced)
    assert events, "no step was reported"
    prev = torch.cat([prompt, torch.full((1, kw["gen_length"]), sess.mask_id)], dim=1)
    total_revealed = 0
    for n, (step, block, x, revealed, prompt_len) in enumerate(events):
        assert step == n and prompt_len == prompt.shape[1]
        changed = x != prev
        assert torch.equal(changed, revealed), "revealed must be exactly the positions this step decoded"
        assert bool((prev[revealed] == sess.mask_id).all()) and not bool((x[revealed] == sess.mask_id).any())
        assert 0 <= block < kw["gen_length"] // kw.get("block_length", kw["gen_length"])
        total_revealed += int(revealed.sum())
        prev = x
    assert total_revealed == kw["gen_length"]
    assert torch.equal(prev, traced)  # stop_at_eos off: the last canvas is the output
    if "threshold" not in kw and kw.get("strategy") != "origin":
        assert len(events) <= kw["steps"]
    if "block_length" in kw:  # blocks are reported in order
        blocks = [e[1] for e in events]
        assert blocks == sorted(blocks) and blocks[-1] == kw["gen_length"] // kw["block_length"] - 1


# ---------------------------------------------------------------------------------------------
# the playground's sampler plumbing, every family
# ---------------------------------------------------------------------------------------------
CASES = [
    ("llada", "chat", "hello there", dict(gen_length=12, steps=6, block_length=4)),
    ("llada-moe", "raw / infill", "4567", dict(gen_length=8, steps=8, block_length=8)),
    ("dream", "chat", "hi", dict(gen_length=8, steps=8, block_length=8, strategy="entropy", threshold=0.01,
                                 cache="prefix")),
    ("dream", "raw / infill", "ab<|mdm_mask|>cd<|mdm_mask|><|mdm_mask|>", dict(steps=8)),
    ("a2d", "chat", "hi", dict(gen_length=8, steps=4, block_length=4)),
    ("bert", "raw / infill", "the capital of france is", dict(gen_length=6, steps=6, block_length=3)),
    ("bert", "raw / infill", "the [MASK] of france is [MASK].", dict(steps=2)),
]


@pytest.mark.parametrize("name,mode,text,settings", CASES, ids=[f"{c[0]}-{c[1][:3]}-{i}" for i, c in enumerate(CASES)])
def test_playground_run_is_generate_with_a_step_trace(sessions, name, mode, text, settings):
    sess = sessions(name)
    pg = Playground(sess, name)
    st = Settings(**settings)
    req = pg.prepare(mode, text, [], st)
    res = pg.run(req, st)

    infill = sess.tokenizer.mask_token in text
    assert req.infill == infill
    # the prompt is what `dllm-trainer generate` would encode
    if mode == "chat" and chat.has_chat_template(sess):
        assert req.prompt_ids == chat.encode_chat(sess, [{"role": "user", "content": text}])
    else:
        assert req.prompt_ids == chat.encode_raw(sess, text)
    gen_length = 0 if infill else st.gen_length
    n_masks = sum(1 for i in req.prompt_ids if i == sess.mask_id)
    direct = generate(
        sess.model, torch.tensor([req.prompt_ids]), gen_length=gen_length,
        steps=min(st.steps, n_masks) if infill else st.steps,
        block_length=None if infill else st.block_length, strategy=st.strategy,
        threshold=st.threshold or None, cache=None if st.cache == "none" else st.cache,
        stop_at_eos=True, mask_token_id=sess.mask_id, eos_token_id=sess.eos_ids or None, seed=0,
    )[0].tolist()
    assert res.output_ids == direct
    if infill:
        start = 1 if direct[0] in (sess.tokenizer.cls_token_id, sess.tokenizer.bos_token_id) else 0
        assert res.text == sess.tokenizer.decode(direct[start: len(req.prompt_ids)], skip_special_tokens=True)
        assert sess.tokenizer.mask_token not in res.text
    else:
        assert res.text == chat.decode(sess, direct[len(req.prompt_ids):])

    # the trace: frame 0 = the initial canvas; each later frame changes exactly its revealed cells
    frames = res.frames
    masks0 = sum(1 for i in frames[0][0] if i == sess.mask_id)
    assert masks0 == (n_masks if infill else gen_length) == res.tokens
    assert frames[0][1] == []
    for (prev, _), (ids, revealed) in zip(frames, frames[1:]):
        changed = [k for k, (a, b) in enumerate(zip(prev, ids)) if a != b]
        if revealed:
            assert changed == revealed and all(prev[k] == sess.mask_id for k in revealed)
        else:  # only the final EOS fill may change cells without revealing masks
            assert (ids, revealed) == frames[-1] and all(ids[k] in sess.eos_ids for k in changed)
    assert sum(len(r) for _, r in frames) == masks0
    assert frames[-1][0] == direct[req.view_start:]
    assert res.nfe >= 1 and res.seconds > 0 and res.tokens_per_s > 0

    html = pg.render(frames[1], 1, len(frames) - 1)
    assert html.count('class="dl-tok dl-mask"') == masks0 - len(frames[1][1])
    assert html.count(" dl-new") == len(frames[1][1])


def test_chat_mode_keeps_the_conversation(sessions):
    sess = sessions("llada")
    pg = Playground(sess, "llada")
    st = Settings(gen_length=4, steps=4, block_length=4)
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    req = pg.prepare("chat", "again", history, st)
    assert req.messages == history + [{"role": "user", "content": "again"}]
    assert req.prompt_ids == chat.encode_chat(sess, req.messages)


@pytest.mark.parametrize("fields,message", [
    (dict(gen_length=0), "gen length must be >= 1"),
    (dict(steps="x"), "steps must be a whole number"),
    (dict(block_length=2.5), "block length must be a whole number"),
    (dict(threshold=-1), "threshold must be >= 0"),
    (dict(cache="disk"), "cache must be one of none, prefix, dual"),
    (dict(temperature=-0.5), "temperature must be >= 0"),
])
def test_bad_settings_are_one_clear_message(fields, message):
    ui = dict(gen_length=8, steps=8, block_length=8, strategy=None, threshold=0, cache="none", temperature=0,
              cfg_scale=0, seed=0)
    ui.update(fields)
    with pytest.raises(PlaygroundError, match=message):
        Settings.from_ui(**ui)


def test_bad_requests_are_one_clear_message(sessions):
    bert = Playground(sessions("bert"), "bert")
    with pytest.raises(PlaygroundError, match="cache 'dual' needs a LLaDA or Dream model"):
        bert.prepare("raw / infill", "x", [], Settings(cache="dual"))
    with pytest.raises(PlaygroundError, match="strategy 'entropy' does not apply to the bert family"):
        bert.prepare("raw / infill", "x", [], Settings(strategy="entropy"))
    with pytest.raises(PlaygroundError, match="type a prompt"):
        bert.prepare("chat", "  ", [], Settings())
    llada = Playground(sessions("llada"), "llada")
    st = Settings(gen_length=8, steps=3, block_length=4)
    with pytest.raises(PlaygroundError, match=r"steps \(3\) must be divisible by the number of blocks"):
        llada.run(llada.prepare("chat", "hi", [], st), st)


def test_cli_without_gradio_names_the_extra(monkeypatch, capsys, model_dirs):
    real = importlib.util.find_spec
    monkeypatch.setattr(pgmod.importlib.util, "find_spec", lambda n, *a: None if n == "gradio" else real(n, *a))
    assert pgmod.main(["--model", str(model_dirs["llada"])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the playground needs gradio") and "dllm-trainer[playground]" in err


def test_cli_rejects_bad_flags(capsys, model_dirs):
    with pytest.raises(SystemExit) as e:
        pgmod.main(["--model", str(model_dirs["llada"]), "--bogus"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
    assert pgmod.main(["--model", str(model_dirs["llada"]), "--gen-length", "0"]) == 2
    assert "gen length must be >= 1" in capsys.readouterr().err
    assert pgmod.main(["--model", "/nonexistent/model"]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the page in a real browser
# ---------------------------------------------------------------------------------------------
def _browser_requirements() -> str:
    """The chromium executable, or FAIL naming what is missing (skip only when the user opted out)."""
    missing = [m for m in ("gradio", "playwright") if importlib.util.find_spec(m) is None]
    exe = os.environ.get("DLLM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        missing.append("chromium (apt-get install chromium)")
    if missing:
        if os.environ.get("DLLM_SKIP_BROWSER_TESTS") == "1":
            pytest.skip(f"browser test opted out (DLLM_SKIP_BROWSER_TESTS=1); missing: {', '.join(missing)}")
        pytest.fail(f"the browser test needs {', '.join(missing)}: run `bash setup.sh --dev` "
                    f"(as root it installs chromium), or set DLLM_SKIP_BROWSER_TESTS=1 to skip it")
    return exe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(proc, url, log_path, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the playground exited with {proc.returncode}:\n{Path(log_path).read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the playground did not answer within {timeout} s:\n{Path(log_path).read_text()[-3000:]}")


# Records every canvas the page draws (gradio may replace the element or patch it in place).
OBSERVER_JS = """
() => {
  window.__canvases = [];
  const seen = (el) => window.__canvases.push([Number(el.dataset.step), Number(el.dataset.masked),
                                               Number(el.dataset.new)]);
  new MutationObserver((muts) => {
    for (const m of muts) {
      if (m.type === 'attributes' && m.target.classList.contains('dl-canvas')) { seen(m.target); continue; }
      for (const n of m.addedNodes) {
        if (n.nodeType !== 1) continue;
        if (n.classList && n.classList.contains('dl-canvas')) seen(n);
        n.querySelectorAll && n.querySelectorAll('.dl-canvas').forEach(seen);
      }
    }
  }).observe(document.body, {childList: true, subtree: true, attributes: true, attributeFilter: ['data-step']});
}
"""


@pytest.mark.slow
def test_playground_page_in_headless_chromium(tmp_path, llada_tiny):
    chromium = _browser_requirements()
    from playwright.sync_api import sync_playwright

    model_dir = copy_with_tokenizer(llada_tiny, tmp_path / "llada-chat", make_tiny_tokenizer())
    prompt = "Say something nice"
    gen_length, steps, block = 24, 12, 8

    # what generate gives for these settings (the page must show exactly this)
    sess = chat.load_session(str(model_dir), "cpu")
    ids = chat.encode_chat(sess, [{"role": "user", "content": prompt}])
    trace = []
    out = generate(sess.model, torch.tensor([ids]), gen_length=gen_length, steps=steps, block_length=block,
                   stop_at_eos=True, seed=0, eos_token_id=sess.eos_ids,
                   callback=lambda ev: trace.append((int((ev.x[0, len(ids):] == sess.mask_id).sum()),
                                                     int(ev.revealed.sum()))))[0].tolist()
    expected_text = chat.decode(sess, out[len(ids):])
    expected = [(gen_length, 0)] + trace  # (masked, revealed) per frame
    # and what `dllm-trainer generate` prints for them
    args = chat.build_parser().parse_args(["generate", "--model", str(model_dir), "--prompt", prompt,
                                           "--gen-length", str(gen_length), "--steps", str(steps),
                                           "--block-length", str(block), "--device", "cpu"])
    buf, err = io.StringIO(), io.StringIO()
    assert chat.run_generate(args, stdout=buf, stderr=err) == 0, err.getvalue()
    assert buf.getvalue().rstrip("\n") == expected_text

    port = _free_port()
    log_path = tmp_path / "playground.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dllm_trainer.cli", "playground", "--model", str(model_dir), "--port", str(port),
             "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
        )
    shots = [tmp_path / "playground.png"]
    if os.environ.get("DLLM_TEST_SCREENSHOTS"):
        Path(os.environ["DLLM_TEST_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
        shots.append(Path(os.environ["DLLM_TEST_SCREENSHOTS"]) / "playground.png")
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_for_server(proc, url, log_path)
        assert "this machine only" in log_path.read_text()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-dev-shm-usage"])
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.goto(url, wait_until="domcontentloaded")
            page.wait_for_selector("#dl-input textarea", timeout=120_000)
            page.evaluate(OBSERVER_JS)
            for elem, value in (("dl-gen-length", gen_length), ("dl-steps", steps), ("dl-block-length", block)):
                page.fill(f"#{elem} input", str(value))
            page.fill("#dl-input textarea", prompt)
            page.click("#dl-send")
            page.wait_for_function("() => (document.querySelector('#dl-status')?.innerText || '').includes('done')",
                                   timeout=180_000)
            text = page.input_value("#dl-output textarea")
            stats = page.inner_text("#dl-stats")
            drawn = page.evaluate("() => window.__canvases")
            final = page.eval_on_selector("#dl-canvas .dl-canvas", "e => [Number(e.dataset.step), Number(e.dataset.masked)]")
            chat_text = page.inner_text("#dl-chat")
            for shot in shots:
                page.screenshot(path=str(shot), full_page=True)

            # replay: the slider redraws any step exactly as generate went through it (and a mid-way
            # step is the more telling picture: masks left, the step's tokens highlighted)
            slider = page.locator("#dl-step-slider input[type=range]")
            n_frames = int(slider.get_attribute("max")) + 1
            replayed = {}
            for k in (0, 1, len(trace) // 2, len(trace)):
                slider.fill(str(k))
                page.wait_for_function(
                    f"() => document.querySelector('#dl-canvas .dl-canvas')?.dataset.step === '{k}'", timeout=60_000)
                replayed[k] = page.eval_on_selector(
                    "#dl-canvas .dl-canvas", "e => [Number(e.dataset.masked), e.querySelectorAll('.dl-new').length]")
                if k == len(trace) // 2:
                    for shot in shots:
                        page.screenshot(path=str(shot.with_name("playground-replay-step.png")), full_page=True)
            browser.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()

    assert text == expected_text
    assert prompt in chat_text
    assert n_frames in (len(expected), len(expected) + 1)  # + the EOS fill frame when it changed the canvas
    assert final == [n_frames - 1, 0]
    for k, got in replayed.items():
        assert tuple(got) == expected[k], (k, got, expected[k])
    # the live view: canvases with masks left were drawn while it denoised, each a real step of the trace
    live = [d for d in drawn if d[1] > 0]
    assert live, f"no intermediate step was drawn: {drawn}"
    print(f"live view drew {len(drawn)} canvases, {len(live)} of them mid-way: {drawn}")
    for step, masked, new in live:
        assert (masked, new) == expected[step], (step, masked, new)
    assert f"{gen_length} tokens in" in stats and "tokens/s" in stats and f"{len(trace)} model calls" in stats
    for shot in shots:
        assert shot.stat().st_size > 10_000 and shot.with_name("playground-replay-step.png").stat().st_size > 10_000


def test_gradio_and_lm_eval_are_imported_only_when_used():
    code = ("import sys, dllm_trainer.cli, dllm_trainer.sampling.playground\n"
            "print('gradio' in sys.modules, 'lm_eval' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["False", "False"]
