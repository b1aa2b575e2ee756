"""`dllm-trainer playground --model DIR`: a local web page to talk to a diffusion LM and watch it denoise.

Two modes: ``chat`` (the tokenizer's chat template, the conversation is kept) and
``raw / infill`` (plain text is continued; text containing the tokenizer's mask token is an
infilling request: the masks are filled, the rest kept). The sampler settings are those of
``dllm-trainer generate`` (steps, gen length, block length, strategy, threshold, cache,
temperature, cfg scale, seed). While a request runs, the canvas (the generated tokens, masks
greyed) is redrawn after every denoising step with the newly revealed tokens highlighted; a
slider replays the steps afterwards. Tokens/s = decoded tokens / wall time of the sampler.

Sampling is ``sampling.generate`` itself (its ``callback=`` hook gives the steps), so the final
text is exactly what ``dllm-trainer generate`` produces with the same settings.

The page listens on 127.0.0.1 only; ``--host 0.0.0.0`` (all interfaces) or ``--share`` (a
public gradio.live link) must be asked for. Gradio is an optional extra
(``pip install 'dllm-trainer[playground]'``) imported only when the command runs.
"""
from __future__ import annotations

import argparse
import html
import importlib.util
import queue
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

from ..errors import UserError
from . import chat
from .core import STRATEGIES

MODES = ("chat", "raw / infill")
CACHE_CHOICES = ("none", "prefix", "dual")
MASK_GLYPH = "\u2591"  # ░ : a masked position on the canvas
UI_REFRESH_S = 0.05  # at most ~20 redraws per second; the last step is always drawn


class PlaygroundError(UserError):
    """A bad setting or request in the playground (shown on the page, never a traceback)."""


def require_gradio() -> None:
    if importlib.util.find_spec("gradio") is None:
        raise PlaygroundError(
            "the playground needs gradio, which is not installed: pip install 'dllm-trainer[playground]' "
            "(bash setup.sh --dev installs it too)"
        )


# ---------------------------------------------------------------------------------------------
# settings and requests (no gradio here: tested directly)
# ---------------------------------------------------------------------------------------------
@dataclass
class Settings:
    gen_length: int = 64
    steps: int = 64
    block_length: int = 32
    strategy: str | None = None  # None: the family's default
    threshold: float = 0.0  # 0: off (the step schedule is used)
    cache: str = "none"
    temperature: float = 0.0
    cfg_scale: float = 0.0
    seed: int = 0

    @classmethod
    def from_ui(cls, gen_length, steps, block_length, strategy, threshold, cache, temperature, cfg_scale, seed):
        def as_int(name, v, low):
            try:
                iv = int(v)
            except (TypeError, ValueError):
                raise PlaygroundError(f"{name} must be a whole number (got {v!r})") from None
            if iv != v:
                raise PlaygroundError(f"{name} must be a whole number (got {v!r})")
            if iv < low:
                raise PlaygroundError(f"{name} must be >= {low} (got {iv})")
            return iv

        def as_float(name, v, low, strict=False):
            try:
                fv = float(0 if v is None else v)
            except (TypeError, ValueError):
                raise PlaygroundError(f"{name} must be a number (got {v!r})") from None
            if fv != fv or fv < low or (strict and fv == low):
                raise PlaygroundError(f"{name} must be {'>' if strict else '>='} {low} (got {v})")
            return fv

        cache = (cache or "none").lower()
        if cache not in CACHE_CHOICES:
            raise PlaygroundError(f"cache must be one of {', '.join(CACHE_CHOICES)} (got {cache!r})")
        return cls(
            gen_length=as_int("gen length", gen_length, 1),
            steps=as_int("steps", steps, 1),
            block_length=as_int("block length", block_length, 1),
            strategy=strategy or None,
            threshold=as_float("threshold", threshold, 0.0),
            cache=cache,
            temperature=as_float("temperature", temperature, 0.0),
            cfg_scale=as_float("cfg scale", cfg_scale, 0.0),
            seed=as_int("seed", seed, 0),
        )


@dataclass
class Request:
    prompt_ids: list[int]
    gen_length: int
    steps: int
    view_start: int  # first canvas column shown (the generation; the whole text when infilling)
    infill: bool
    messages: list[dict] = field(default_factory=list)  # chat: the conversation including this turn


@dataclass
class Result:
    output_ids: list[int]
    text: str
    frames: list[tuple[list[int], list[int]]]  # per step: (shown ids, indices revealed by that step)
    seconds: float
    tokens: int  # positions decoded
    nfe: int  # model forwards

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


class Playground:
    """The model session plus everything the page does with it, independent of gradio."""

    def __init__(self, sess: chat.Session, name: str = ""):
        self.sess = sess
        self.name = name
        self.family = sess.family.name
        self.strategies = STRATEGIES[self.family]
        self.caches = CACHE_CHOICES if sess.family.native_masked_head else ("none",)
        self.mask_token = getattr(sess.tokenizer, "mask_token", None) or ""
        self.use_template = chat.has_chat_template(sess)
        self._pieces: dict[int, str] = {}

    # -- requests ---------------------------------------------------------------------------
    def prepare(self, mode: str, text: str, history: list[dict], settings: Settings) -> Request:
        if mode not in MODES:
            raise PlaygroundError(f"mode must be one of {', '.join(MODES)} (got {mode!r})")
        if not text or not text.strip():
            raise PlaygroundError("type a prompt first")
        if settings.strategy is not None and settings.strategy not in self.strategies:
            raise PlaygroundError(
                f"strategy '{settings.strategy}' does not apply to the {self.family} family "
                f"(allowed: {', '.join(self.strategies)})"
            )
        if settings.cache not in self.caches:
            raise PlaygroundError(f"cache '{settings.cache}' needs a LLaDA or Dream model (model family: {self.family})")
        sess = self.sess
        if mode == "raw / infill" and chat.is_infill(sess, text):
            ids = chat.encode_raw(sess, text)
            n_masks = sum(1 for i in ids if i == sess.mask_id)
            start = 1 if ids and ids[0] in _prefix_ids(sess) else 0
            return Request(ids, 0, max(1, min(settings.steps, n_masks)), start, True)
        if mode == "chat":
            messages = [dict(m) for m in history] + [{"role": "user", "content": text}]
            if self.use_template:
                ids = chat.encode_chat(sess, messages)
            else:  # no template: the turns one per line, as `dllm-trainer chat` does
                ids = chat.encode_raw(sess, "\n".join(m["content"] for m in messages) + "\n")
        else:
            messages, ids = [], chat.encode_raw(sess, text)
        return Request(ids, settings.gen_length, settings.steps, len(ids), False, messages)

    def generate_kwargs(self, req: Request, settings: Settings) -> dict:
        return dict(
            gen_length=req.gen_length,
            steps=req.steps,
            block_length=settings.block_length if req.gen_length > 0 else None,
            temperature=settings.temperature,
            strategy=settings.strategy,
            threshold=settings.threshold or None,
            cache=None if settings.cache == "none" else settings.cache,
            cfg_scale=settings.cfg_scale,
            stop_at_eos=True,
            mask_token_id=self.sess.mask_id,
            eos_token_id=self.sess.eos_ids or None,
            seed=settings.seed,
        )

    def run(self, req: Request, settings: Settings, on_frame=None) -> Result:
        """Runs the sampler; ``on_frame(ids, revealed)`` after every step (from this thread)."""
        from . import generate

        frames: list[tuple[list[int], list[int]]] = []
        start = req.view_start

        def record(ids: list[int], revealed: list[int]) -> None:
            frames.append((ids, revealed))
            if on_frame is not None:
                on_frame(ids, revealed)

        record((req.prompt_ids + [self.sess.mask_id] * req.gen_length)[start:], [])

        def callback(ev) -> None:
            row = ev.x[0, start:].tolist()
            record(row, torch.nonzero(ev.revealed[0, start:]).flatten().tolist())

        stats: dict = {}
        prompt = torch.tensor([req.prompt_ids], dtype=torch.long, device=self.sess.device)
        t0 = time.perf_counter()
        try:
            out = generate(self.sess.model, prompt, callback=callback, stats=stats,
                           **self.generate_kwargs(req, settings))
        except ValueError as e:  # invalid combination (steps vs blocks, ...)
            raise PlaygroundError(str(e)) from None
        seconds = time.perf_counter() - t0
        out_ids = out[0].tolist()
        if out_ids[start:] != frames[-1][0]:  # the EOS fill after the last step
            record(out_ids[start:], [])
        masks_before = sum(1 for i in frames[0][0] if i == self.sess.mask_id)
        return Result(out_ids, self.text_of(req, out_ids), frames, seconds, masks_before, int(stats.get("nfe", 0)))

    def text_of(self, req: Request, out_ids: list[int]) -> str:
        sess = self.sess
        if req.infill:
            return sess.tokenizer.decode(out_ids[req.view_start: len(req.prompt_ids)], skip_special_tokens=True)
        return chat.decode(sess, out_ids[len(req.prompt_ids):])

    # -- rendering --------------------------------------------------------------------------
    def piece(self, tid: int) -> str | None:
        """Text of one token as shown on the canvas (None for the mask)."""
        if tid == self.sess.mask_id:
            return None
        if tid not in self._pieces:
            tok = self.sess.tokenizer
            text = tok.decode([tid], skip_special_tokens=False)
            if text == "" or text == "\ufffd":  # partial bytes of a multi-byte character
                text = tok.convert_ids_to_tokens(tid) or ""
            self._pieces[tid] = text
        return self._pieces[tid]

    def live_text(self, ids: list[int]) -> str:
        """The canvas as plain text (masks as ░, stopping at the first EOS): the chat bubble while it denoises."""
        out = []
        for i in ids:
            if i in self.sess.eos_ids:
                break
            p = self.piece(i)
            out.append(MASK_GLYPH if p is None else p)
        return "".join(out)

    def render(self, frame: tuple[list[int], list[int]], step: int, total: int) -> str:
        ids, revealed = frame
        new = set(revealed)
        masked = sum(1 for i in ids if i == self.sess.mask_id)
        special = set(self.sess.eos_ids)
        cells = []
        for n, tid in enumerate(ids):
            p = self.piece(tid)
            if p is None:
                cells.append(f'<span class="dl-tok dl-mask" style="{_STYLE_MASK}">{MASK_GLYPH}</span>')
                continue
            shown = html.escape(p).replace("\n", "\u21b5")
            cls, style = "dl-tok", _STYLE_TOK
            if tid in special:
                cls, style = "dl-tok dl-eos", _STYLE_EOS
            if n in new:
                cls, style = cls + " dl-new", style + _STYLE_NEW
            cells.append(f'<span class="{cls}" style="{style}">{shown}</span>' + ("<br>" if "\n" in p else ""))
        head = (f'<div class="dl-canvas-head" style="font-size:0.85em;opacity:0.75;margin-bottom:4px">'
                f'step {step} / {total} &middot; {len(new)} revealed &middot; {masked} masked</div>')
        return (f'{head}<div class="dl-canvas" data-step="{step}" data-masked="{masked}" data-new="{len(new)}" '
                f'style="{_STYLE_CANVAS}">{"".join(cells)}</div>')

    def stats_line(self, tokens: int, seconds: float, steps: int, nfe: int | None, done: bool) -> str:
        tps = tokens / seconds if seconds > 0 else 0.0
        text = f"{tokens} tokens in {seconds:.2f} s · {tps:.1f} tokens/s · {steps} steps"
        if nfe is not None:
            text += f" · {nfe} model calls"
        return text if done else text + " · denoising…"


# one inline-block per token: a token never breaks across lines, and its cell shows where it starts and ends
_STYLE_CANVAS = "font-family:ui-monospace,SFMono-Regular,Menlo,monospace;line-height:1.9"
_STYLE_TOK = "display:inline-block;white-space:pre;padding:0 1px;margin:1px 0;border-radius:3px;"
_STYLE_MASK = _STYLE_TOK + "background:#e5e7eb;color:#9ca3af;"
_STYLE_EOS = _STYLE_TOK + "color:#9ca3af;font-size:0.8em;"
_STYLE_NEW = "background:#fde047;color:#111827;outline:1px solid #eab308;"


def _prefix_ids(sess: chat.Session) -> set[int]:
    tok = sess.tokenizer
    return {int(t) for t in (getattr(tok, "bos_token_id", None), getattr(tok, "cls_token_id", None)) if t is not None}


# ---------------------------------------------------------------------------------------------
# the page
# ---------------------------------------------------------------------------------------------
def build_app(pg: Playground, defaults: Settings | None = None):
    import gradio as gr

    d = defaults or Settings()
    family_default = pg.sess.family.default_sampler

    def stream(mode, text, history, trace, gen_length, steps, block_length, strategy, threshold, cache,
               temperature, cfg_scale, seed):
        """Generator: one page update per drawn step, then the final one."""
        history = list(history or [])
        shown_chat = list(history)
        try:
            settings = Settings.from_ui(gen_length, steps, block_length, strategy, threshold, cache,
                                        temperature, cfg_scale, seed)
            req = pg.prepare(mode, text, history, settings)
        except UserError as e:
            yield _error_update(gr, e, history, trace)
            return
        if mode == "chat":
            shown_chat = history + [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]

        frames: queue.Queue = queue.Queue()
        outcome: dict = {}

        def work():
            try:
                outcome["result"] = pg.run(req, settings, on_frame=lambda ids, rev: frames.put((ids, rev)))
            except Exception as e:  # noqa: BLE001 - shown on the page; the server keeps running
                outcome["error"] = e
            finally:
                frames.put(None)

        t0 = time.perf_counter()
        worker = threading.Thread(target=work, name="dllm-playground-generate", daemon=True)
        worker.start()
        seen: list = []
        last_draw = 0.0
        done = False
        while not done:
            item = frames.get()
            if item is None:
                done = True
            else:
                seen.append(item)
                if not frames.empty() and time.perf_counter() - last_draw < UI_REFRESH_S:
                    continue  # more steps are waiting: draw the newest one
            if done or not seen:
                break
            last_draw = time.perf_counter()
            ids, _ = seen[-1]
            decoded = sum(1 for i in seen[0][0] if i == pg.sess.mask_id) - sum(1 for i in ids if i == pg.sess.mask_id)
            if mode == "chat":
                shown_chat[-1] = {"role": "assistant", "content": pg.live_text(ids) or MASK_GLYPH}
            yield (
                gr.update(value=shown_chat) if mode == "chat" else gr.update(),
                pg.render(seen[-1], len(seen) - 1, len(seen) - 1),
                gr.update(minimum=0, maximum=max(1, len(seen) - 1), value=len(seen) - 1),
                pg.stats_line(decoded, time.perf_counter() - t0, len(seen) - 1, None, False),
                gr.update(),
                gr.update(),
                history,
                trace,
                gr.update(),
            )
        worker.join()
        if "error" in outcome:
            yield _error_update(gr, outcome["error"], history, trace)
            return
        res: Result = outcome["result"]
        n = len(res.frames) - 1
        new_history = history
        if mode == "chat":
            new_history = req.messages + [{"role": "assistant", "content": res.text}]
        yield (
            gr.update(value=new_history) if mode == "chat" else gr.update(),
            pg.render(res.frames[-1], n, n),
            gr.update(minimum=0, maximum=max(1, n), value=n),
            pg.stats_line(res.tokens, res.seconds, n, res.nfe, True),
            res.text,
            "",  # clear the input box
            new_history,
            {"frames": res.frames},
            gr.update(value=f"done: {res.tokens} tokens, {n} steps"),
        )

    def replay(step, trace):
        frames = (trace or {}).get("frames") or []
        if not frames:
            return gr.update()
        k = int(max(0, min(len(frames) - 1, round(float(step or 0)))))
        return pg.render(tuple(frames[k]), k, len(frames) - 1)

    def clear():
        return [], "", gr.update(minimum=0, maximum=1, value=0), "", "", [], {}, gr.update(value="")

    def insert_mask(text):
        return (text or "") + pg.mask_token

    def switch_mode(mode):
        return gr.update(visible=mode == "chat")

    theme = gr.themes.Base(font=["ui-sans-serif", "system-ui", "sans-serif"],
                           font_mono=["ui-monospace", "monospace"])  # local fonts: no request leaves the machine
    with gr.Blocks(title=f"dllm playground · {pg.name}", analytics_enabled=False) as app:
        gr.Markdown(f"### Diffusion LM playground · `{html.escape(pg.name)}` ({pg.family})")
        history = gr.State([])
        trace = gr.State({})
        with gr.Row():
            with gr.Column(scale=3):
                mode = gr.Radio(list(MODES), value="chat" if pg.use_template else "raw / infill", label="mode",
                                elem_id="dl-mode")
                chatbot = gr.Chatbot(label="conversation", elem_id="dl-chat", height=260,
                                     visible=pg.use_template)
                prompt = gr.Textbox(label="prompt", lines=3, elem_id="dl-input",
                                    placeholder="chat: your message · raw: text to continue · "
                                                f"infill: text with {pg.mask_token or 'mask'} tokens to fill")
                with gr.Row():
                    send = gr.Button("Generate", variant="primary", elem_id="dl-send")
                    mask_btn = gr.Button(f"insert {pg.mask_token or 'mask'}", elem_id="dl-insert-mask",
                                         interactive=bool(pg.mask_token))
                    clear_btn = gr.Button("Clear", elem_id="dl-clear")
                output = gr.Textbox(label="output (final text)", lines=3, interactive=False, elem_id="dl-output")
                status = gr.Markdown("", elem_id="dl-status")
            with gr.Column(scale=2):
                with gr.Accordion("sampler settings", open=True):
                    with gr.Row():
                        gen_length = gr.Number(d.gen_length, label="gen length", precision=0, elem_id="dl-gen-length")
                        steps = gr.Number(d.steps, label="steps", precision=0, elem_id="dl-steps")
                        block_length = gr.Number(d.block_length, label="block length", precision=0,
                                                 elem_id="dl-block-length")
                    with gr.Row():
                        strategy = gr.Dropdown(list(pg.strategies), value=d.strategy or family_default,
                                               label="strategy", elem_id="dl-strategy")
                        cache = gr.Dropdown(list(pg.caches), value=d.cache, label="cache (Fast-dLLM)",
                                            elem_id="dl-cache", interactive=len(pg.caches) > 1)
                    with gr.Row():
                        threshold = gr.Number(d.threshold, label="threshold (0 = off)", elem_id="dl-threshold")
                        temperature = gr.Number(d.temperature, label="temperature", elem_id="dl-temperature")
                        cfg_scale = gr.Number(d.cfg_scale, label="cfg scale", elem_id="dl-cfg")
                        seed = gr.Number(d.seed, label="seed", precision=0, elem_id="dl-seed")
        gr.Markdown("#### denoising (newly revealed tokens highlighted, masks ░)")
        canvas = gr.HTML("", elem_id="dl-canvas")
        step_slider = gr.Slider(0, 1, value=0, step=1, label="replay step", elem_id="dl-step-slider")
        stats = gr.Markdown("", elem_id="dl-stats")

        inputs = [mode, prompt, history, trace, gen_length, steps, block_length, strategy, threshold, cache,
                  temperature, cfg_scale, seed]
        outputs = [chatbot, canvas, step_slider, stats, output, prompt, history, trace, status]
        send.click(stream, inputs, outputs, concurrency_limit=1)
        prompt.submit(stream, inputs, outputs, concurrency_limit=1)
        step_slider.input(replay, [step_slider, trace], canvas, queue=False)
        step_slider.release(replay, [step_slider, trace], canvas, queue=False)
        clear_btn.click(clear, None, [chatbot, canvas, step_slider, stats, output, history, trace, status])
        mask_btn.click(insert_mask, prompt, prompt, queue=False)
        mode.change(switch_mode, mode, chatbot, queue=False)
    app.dl_theme = theme
    return app


def _error_update(gr, err: BaseException, history, trace):
    msg = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
    return (gr.update(), gr.update(), gr.update(), gr.update(), gr.update(), gr.update(), history, trace,
            gr.update(value=f"**error:** {html.escape(msg)}"))


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2 (no usage dump)
        self.exit(2, f"error: {message} (see dllm-trainer playground --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dllm-trainer playground", description="web playground for a diffusion LM (local by default)")
    p.add_argument("--model", required=True, help="local model folder or Hugging Face Hub id")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: all interfaces)")
    p.add_argument("--port", type=int, default=None, help="port (default: the first free one from 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--gen-length", type=int, default=Settings.gen_length, help="initial gen length on the page")
    p.add_argument("--steps", type=int, default=Settings.steps, help="initial steps on the page")
    p.add_argument("--block-length", type=int, default=Settings.block_length, help="initial block length on the page")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        require_gradio()
        if args.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise PlaygroundError(f"unknown --dtype '{args.dtype}' (allowed: auto, float32, bfloat16, float16)")
        if args.port is not None and not (0 < args.port < 65536):
            raise PlaygroundError(f"--port must be in 1..65535 (got {args.port})")
        defaults = Settings.from_ui(args.gen_length, args.steps, args.block_length, None, 0, "none", 0, 0, 0)
        sess = chat.load_session(args.model, args.device, args.dtype)
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    app = build_app(Playground(sess, args.model), defaults)
    where = "this machine only" if args.host in ("127.0.0.1", "localhost", "::1") else f"listening on {args.host}"
    print(f"playground for {args.model} ({sess.family.name}), {where}; Ctrl-C stops it", flush=True)
    try:
        app.queue(default_concurrency_limit=1).launch(
            server_name=args.host, server_port=args.port, share=args.share, inbrowser=False,
            ssr_mode=False, mcp_server=False, footer_links=[], theme=app.dl_theme, quiet=False,
        )
    except OSError as e:  # e.g. the port is taken
        print(f"error: cannot start the web server: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
