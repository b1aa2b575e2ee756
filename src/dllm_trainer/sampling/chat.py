"""`dllm-trainer generate` and `dllm-trainer chat`: sampling from a trained (or public) model.

generate:  ``--model PATH --prompt TEXT``. The text goes through the tokenizer's chat template
           (as one user turn) unless ``--raw`` is given or the tokenizer has none; if the text
           contains the tokenizer's mask token it is an infilling request instead: the masks
           are filled and the rest kept (``--gen-length`` then defaults to 0). Prints the
           generated text (the whole filled text for infilling).
chat:      reads lines from stdin and prints one reply per line, keeping the conversation.
           Commands: ``:complete N`` generates N more tokens right after the current text
           (no new turn) and prints them; ``:mask R [TEXT]`` masks a fraction R of the tokens of
           TEXT (default: the last reply) at random, fills them and prints the masked and the
           filled text; ``:reset`` forgets the conversation; ``:help``; ``:quit`` (or EOF) ends.

Shared settings: --steps, --gen-length, --block-length, --temperature, --strategy,
--threshold, --cache, --cfg-scale, --seed, --device, --dtype, --no-stop-at-eos.

Loading: our LLaDA/Dream classes are registered with transformers' Auto classes, so local
folders (our fused outputs, full fine-tune checkpoints) and public checkpoints load without
trust_remote_code; each family's Auto class loads its checkpoints (BERT family: AutoModelForMaskedLM;
a2d: AutoModelForCausalLM, made bidirectional again from the config marker). A LoRA adaptor folder
or a LoRA training checkpoint loads its base model (adapter_config.json) with the adaptor merged
in memory; when the base cannot be loaded, the message points to the fused model.

Limits: prompt + generated tokens must fit the model's positions; --threshold is in (0, 1];
--device is auto, cpu, cuda, cuda:N or mps. Ctrl-C while a reply is generated cancels that reply
(the chat goes on); Ctrl-C at the prompt ends the session.

Bad input (missing model, unknown strategy, ...) prints one ``error: ...`` line to stderr and
returns exit code 2; no traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import torch

from ..errors import ModelError, UserError
from .core import STRATEGIES
from .fast_dllm import CACHE_MODES

ALL_STRATEGIES = tuple(dict.fromkeys(s for group in STRATEGIES.values() for s in group))
DEFAULT_GEN_LENGTH = 128


class CLIError(UserError):
    """A bad command-line value."""


# ---------------------------------------------------------------------------------------------
# argument parsing
# ---------------------------------------------------------------------------------------------
def _add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local model folder or Hugging Face Hub id")
    parser.add_argument("--gen-length", type=int, default=None,
                        help=f"tokens to generate (default {DEFAULT_GEN_LENGTH}; 0 when infilling)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: gen-length)")
    parser.add_argument("--block-length", type=int, default=None,
                        help="semi-autoregressive block length (default: gen-length)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--strategy", default=None,
                        help=f"remasking strategy (default: the family's); one of {', '.join(ALL_STRATEGIES)}")
    parser.add_argument("--threshold", type=float, default=None,
                        help="Fast-dLLM parallel decoding: reveal every token whose probability exceeds this")
    parser.add_argument("--cache", default="none", help="Fast-dLLM KV cache: none | prefix | dual")
    parser.add_argument("--cfg-scale", type=float, default=0.0, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    parser.add_argument("--raw", action="store_true", help="do not apply the chat template")
    parser.add_argument("--no-stop-at-eos", dest="stop_at_eos", action="store_false",
                        help="keep generating after the first EOS")


def add_generate_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    _add_common_args(parser)
    parser.add_argument("--prompt", required=True, help="prompt text (with mask tokens: infilling)")
    parser.set_defaults(stop_at_eos=True)
    return parser


def add_chat_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    _add_common_args(parser)
    parser.add_argument("--system", default=None, help="system message for the chat template")
    parser.set_defaults(stop_at_eos=True)
    return parser


def _validate(args) -> None:
    cache = (args.cache or "none").lower()
    if cache not in ("none", "prefix", "dual"):
        raise CLIError(f"unknown --cache '{args.cache}' (allowed: none, prefix, dual)")
    args.cache = None if cache == "none" else cache
    assert args.cache in CACHE_MODES
    if args.strategy is not None and args.strategy not in ALL_STRATEGIES:
        raise CLIError(f"unknown --strategy '{args.strategy}' (allowed: {', '.join(ALL_STRATEGIES)})")
    for name in ("gen_length", "steps", "block_length"):
        v = getattr(args, name)
        if v is not None and v < (0 if name == "gen_length" else 1):
            raise CLIError(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'gen_length' else '>= 1'} (got {v})")
    if args.temperature < 0:
        raise CLIError(f"--temperature must be >= 0 (got {args.temperature})")
    if args.threshold is not None and not (0 < args.threshold <= 1):
        raise CLIError(f"--threshold must be in (0, 1]: the probability a proposal must exceed (got {args.threshold})")
    if args.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise CLIError(f"unknown --dtype '{args.dtype}' (allowed: auto, float32, bfloat16, float16)")


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
@dataclass
class Session:
    model: torch.nn.Module
    tokenizer: object
    family: object
    mask_id: int
    eos_ids: list
    device: torch.device


DEVICES = "auto, cpu, cuda, cuda:N, mps"


def _resolve_device(name: str) -> torch.device:
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"unknown --device '{name}' (allowed: {DEVICES})") from None
    if dev.type not in ("cpu", "cuda", "mps") or (dev.type != "cuda" and dev.index not in (None, 0)):
        raise CLIError(f"unsupported --device '{name}' (allowed: {DEVICES})")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name}: no CUDA GPU is visible (use --device cpu)")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise CLIError(f"--device {name}: only {count} CUDA GPU{'s are' if count != 1 else ' is'} visible "
                           f"(cuda:0..cuda:{count - 1})")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CLIError(f"--device {name}: Apple's MPS is not available on this machine (use --device cpu)")
    return dev


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_session(path: str, device: str = "auto", dtype: str = "auto") -> Session:
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    from .. import models as _models  # noqa: F401  (registers LLaDA/Dream with the Auto classes)
    from ..families import family_of_model_type

    if not path:
        raise CLIError("--model is empty")
    looks_local = path.startswith(("/", ".", "~")) or path.count("/") > 1  # Hub ids: "name" or "org/name"
    adaptor = None
    if os.path.isdir(path):
        adaptor = _adaptor_base(path)
        if adaptor is None and not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelError(f"model folder '{path}' has no config.json (neither a model nor a LoRA adaptor)")
    elif os.path.exists(path):
        raise ModelError(f"model path '{path}' is a file; give the model folder")
    elif looks_local:
        raise ModelError(f"model '{path}' does not exist (give a local model folder or a Hugging Face Hub id)")
    dev = _resolve_device(device)
    torch_dtype = {
        "auto": torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32,
        "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    }[dtype]

    from transformers.utils import logging as hf_logging

    if not _isatty(sys.stderr):
        hf_logging.disable_progress_bar()  # loading bars for a person at a terminal, not in a script's output
    weights = adaptor or path  # a LoRA adaptor (or LoRA checkpoint): its base model, then the adaptor on top
    try:
        config = AutoConfig.from_pretrained(weights)
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one clear message
        if adaptor:
            raise ModelError(_adaptor_help(path, adaptor, _first_line(e))) from None
        raise ModelError(f"cannot load the config of model '{path}': {_first_line(e)}") from None
    family = family_of_model_type(getattr(config, "model_type", None))
    if family is None:
        raise ModelError(
            f"model '{path}' (model_type '{getattr(config, 'model_type', None)}') is not a supported "
            f"diffusion LM (LLaDA, Dream, a BERT-family masked LM or a causal LM converted by a2d)"
        )
    try:
        family = family.for_config(config)  # a2d: the logits shift from the config marker (none: not converted)
    except ModelError as e:
        if adaptor:  # an a2d run's adaptor: its base is the plain causal LM; the fused model is converted
            raise ModelError(_adaptor_help(path, adaptor, "the base alone is not a diffusion LM")) from None
        raise
    tok_path = path if (not adaptor or _has_tokenizer(path)) else adaptor  # training saves it beside the adaptor
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_path)
    except Exception as e:  # noqa: BLE001
        tok_file = os.path.join(tok_path, "tokenizer.json")
        if os.path.isfile(tok_file):  # e.g. a tokenizer_config.json pointing at custom code
            tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(tok_path)
        else:
            raise ModelError(f"cannot load a tokenizer for model '{path}': {_first_line(e)}") from None
    auto_cls = getattr(transformers, family.auto_class)
    from ..training.loading import quiet_load_report

    try:
        with quiet_load_report():  # the multi-line load report is replaced by one warning below
            model, info = auto_cls.from_pretrained(weights, config=config, dtype=torch_dtype, output_loading_info=True)
    except Exception as e:  # noqa: BLE001
        if adaptor:
            raise ModelError(_adaptor_help(path, adaptor, _first_line(e))) from None
        raise ModelError(f"cannot load the weights of model '{path}': {_first_line(e)}") from None
    missing = list(info.get("missing_keys", []) or [])
    if adaptor:
        model = _apply_adaptor(model, tokenizer, path, adaptor)
        missing = []  # the adaptor brings what the base lacks (e.g. a trained masked-LM head)
    if missing:
        print(
            f"warning: {len(missing)} weights of '{path}' are not in the checkpoint and were initialised at "
            f"random (e.g. {sorted(missing)[0]}): outputs are meaningless until the model is trained",
            file=sys.stderr,
        )
    model.to(dev).eval()

    mask_id = getattr(model.config, "mask_token_id", None)
    if mask_id is None:
        mask_id = getattr(tokenizer, "mask_token_id", None)
    if mask_id is None:
        raise ModelError(f"model '{path}' has no mask token (neither config.mask_token_id nor a tokenizer mask token)")
    if getattr(tokenizer, "mask_token_id", None) is None:
        # make the mask token recognisable in text (infilling) when only the config names it
        tok_str = tokenizer.convert_ids_to_tokens(int(mask_id))
        if tok_str is not None:
            tokenizer.mask_token = tok_str
    family.adapt(model, int(mask_id), log=lambda *a: None)  # a2d: re-applies bidirectional attention
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None and family.name == "bert":
        eos = getattr(tokenizer, "sep_token_id", None)
    eos_ids = [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    return Session(model, tokenizer, family, int(mask_id), eos_ids, dev)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"))


def _adaptor_base(path: str) -> str | None:
    """The base model of a LoRA adaptor folder (also a LoRA training checkpoint), else None."""
    cfg_file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(cfg_file) or os.path.isfile(os.path.join(path, "config.json")):
        return None
    import json

    try:
        with open(cfg_file, encoding="utf-8") as fh:
            base = json.load(fh).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        base = None
    if not base:
        raise ModelError(f"'{path}' is a LoRA adaptor whose adapter_config.json names no base model; "
                         "sample from the fused model instead (<output_dir>/models/<name>)")
    return str(base)


def _adaptor_help(path: str, base: str, why: str) -> str:
    return (f"'{path}' is a LoRA adaptor (or a LoRA checkpoint) of the base model '{base}', which cannot be loaded "
            f"({why}); sample from the fused model instead (<output_dir>/models/<name>, or the model in "
            "Transformer Lab's Foundation tab)")


def _apply_adaptor(model, tokenizer, path: str, base: str):
    """Base + adaptor, merged in memory (as the fused model is made: training/export.py)."""
    from peft import PeftModel

    from ..training.loading import resize_embeddings

    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        resize_embeddings(model, len(tokenizer))  # training added a mask token: the rows training had
    if getattr(tokenizer, "mask_token_id", None) is not None and getattr(model.config, "mask_token_id", None) is None:
        model.config.mask_token_id = tokenizer.mask_token_id
    try:
        return PeftModel.from_pretrained(model, path).merge_and_unload()
    except Exception as e:  # noqa: BLE001
        raise ModelError(_adaptor_help(path, base, _first_line(e))) from None


# ---------------------------------------------------------------------------------------------
# encoding / decoding
# ---------------------------------------------------------------------------------------------
def _prefix_ids(sess: Session) -> list[int]:
    tok = sess.tokenizer
    tid = getattr(tok, "cls_token_id", None) if sess.family.name == "bert" else getattr(tok, "bos_token_id", None)
    return [] if tid is None else [int(tid)]


def encode_raw(sess: Session, text: str) -> list[int]:
    """Plain text -> ids with a leading BOS (CLS for BERT) when the tokenizer has one, no EOS/SEP."""
    ids = sess.tokenizer(text, add_special_tokens=False)["input_ids"]
    prefix = _prefix_ids(sess)
    if prefix and ids[:1] == prefix:
        prefix = []
    return prefix + list(ids)


def has_chat_template(sess: Session) -> bool:
    return bool(getattr(sess.tokenizer, "chat_template", None))


def encode_chat(sess: Session, messages: list[dict]) -> list[int]:
    text = sess.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(sess.tokenizer(text, add_special_tokens=False)["input_ids"])


def is_infill(sess: Session, text: str) -> bool:
    mask = getattr(sess.tokenizer, "mask_token", None)
    return bool(mask) and mask in text


def decode(sess: Session, ids) -> str:
    ids = [int(i) for i in ids]
    if sess.eos_ids:
        for n, i in enumerate(ids):
            if i in sess.eos_ids:
                ids = ids[:n]
                break
    return sess.tokenizer.decode(ids, skip_special_tokens=True)


def sampling_kwargs(args, gen_length: int, n_masks_in_prompt: int = 0, *, adapt: bool = False) -> dict:
    """generate() settings from the CLI. ``adapt``: adjust block/steps to fit (chat commands)."""
    block = args.block_length
    steps = args.steps
    if gen_length > 0:
        if block is None or (adapt and gen_length % block):
            block = gen_length
        n_blocks = gen_length // block if gen_length % block == 0 else 1
        if steps is None:
            steps = gen_length
        if adapt:
            steps = max(n_blocks, -(-min(steps, gen_length) // n_blocks) * n_blocks)
    else:
        block = None
        steps = steps or max(1, n_masks_in_prompt)
        if adapt:
            steps = max(1, min(steps, n_masks_in_prompt))
    kw = dict(
        gen_length=gen_length, steps=steps, block_length=block, temperature=args.temperature,
        strategy=args.strategy, cfg_scale=args.cfg_scale, threshold=args.threshold, cache=args.cache,
        stop_at_eos=args.stop_at_eos,
    )
    return kw


def run_sampler(sess: Session, ids: list[int], args, gen_length: int, *, adapt: bool = False, seed=None) -> list[int]:
    from . import generate

    n_masks = sum(1 for i in ids if i == sess.mask_id)
    if gen_length == 0 and n_masks == 0:
        return list(ids)
    kw = sampling_kwargs(args, gen_length, n_masks, adapt=adapt)
    if args.strategy is not None and args.strategy not in STRATEGIES[sess.family.name]:
        raise CLIError(
            f"strategy '{args.strategy}' does not apply to the {sess.family.name} family "
            f"(allowed: {', '.join(STRATEGIES[sess.family.name])})"
        )
    prompt = torch.tensor([ids], dtype=torch.long, device=sess.device)
    try:
        out = generate(
            sess.model, prompt, mask_token_id=sess.mask_id,
            eos_token_id=sess.eos_ids or None, seed=args.seed if seed is None else seed, **kw,
        )
    except ValueError as e:  # invalid combination (steps vs blocks, ...) -> clear message
        raise CLIError(str(e)) from None
    return out[0].tolist()


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------
def _fail(err: BaseException, stderr) -> int:
    print(f"error: {err}", file=stderr)
    return 2


def _start_session(args) -> Session:
    """Checks the options, seeds sampling and loads the model: the start of generate and chat."""
    _validate(args)
    torch.manual_seed(args.seed)
    return load_session(args.model, args.device, args.dtype)


def run_generate(args, stdout=None, stderr=None) -> int:
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    try:
        sess = _start_session(args)
        text = args.prompt
        if is_infill(sess, text):
            ids = encode_raw(sess, text)
            gen_length = args.gen_length or 0
            out = run_sampler(sess, ids, args, gen_length)
            filled = out[: len(ids)] if gen_length == 0 else out
            print(sess.tokenizer.decode(_strip_prefix(sess, filled), skip_special_tokens=True), file=stdout)
            return 0
        if has_chat_template(sess) and not args.raw:
            messages = [{"role": "user", "content": text}]
            ids = encode_chat(sess, messages)
        else:
            ids = encode_raw(sess, text)
        gen_length = DEFAULT_GEN_LENGTH if args.gen_length is None else args.gen_length
        out = run_sampler(sess, ids, args, gen_length)
        print(decode(sess, out[len(ids):]), file=stdout)
        return 0
    except (UserError, OSError) as e:
        return _fail(e, stderr)
    except KeyboardInterrupt:
        print("interrupted", file=stderr, flush=True)
        return 130


def _strip_prefix(sess: Session, ids: list[int]) -> list[int]:
    prefix = _prefix_ids(sess)
    return ids[len(prefix):] if prefix and ids[: len(prefix)] == prefix else ids


# ---------------------------------------------------------------------------------------------
# chat
# ---------------------------------------------------------------------------------------------
HELP = (
    "commands: :complete N (generate N more tokens after the current text), "
    ":mask R [TEXT] (mask a fraction R of TEXT or of the last reply, then fill it), "
    ":reset, :help, :quit"
)


class ChatState:
    def __init__(self, sess: Session, args):
        self.sess = sess
        self.args = args
        self.use_template = has_chat_template(sess) and not args.raw
        self.turn = 0
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = []
        if self.args.system and self.use_template:
            self.messages.append({"role": "system", "content": self.args.system})
        self.ids: list[int] = encode_raw(self.sess, self.args.system + "\n") if (self.args.system and not self.use_template) else _prefix_ids(self.sess)
        self.last_reply = ""

    def _seed(self) -> int:
        self.turn += 1
        return self.args.seed + self.turn

    def _gen_length(self) -> int:
        return DEFAULT_GEN_LENGTH if not self.args.gen_length else self.args.gen_length

    def say(self, text: str) -> str:
        # the conversation changes only once the reply exists (an error or Ctrl-C leaves it as it was)
        messages = self.messages + [{"role": "user", "content": text}]
        if self.use_template:
            prompt = encode_chat(self.sess, messages)
        else:
            sep = "" if not self.last_reply and self.ids == _prefix_ids(self.sess) else "\n"
            prompt = self.ids + list(self.sess.tokenizer(sep + text, add_special_tokens=False)["input_ids"])
        out = run_sampler(self.sess, prompt, self.args, self._gen_length(), adapt=True, seed=self._seed())
        reply_ids = _until_eos(self.sess, out[len(prompt):])
        reply = self.sess.tokenizer.decode(reply_ids, skip_special_tokens=True)
        if self.use_template:
            self.messages = messages + [{"role": "assistant", "content": reply}]
        self.ids = prompt + reply_ids
        self.last_reply = reply
        return reply

    def complete(self, n: int) -> str:
        if n < 1:
            raise CLIError(":complete needs a positive number of tokens, e.g. :complete 16")
        out = run_sampler(self.sess, self.ids, self.args, n, adapt=True, seed=self._seed())
        new_ids = _until_eos(self.sess, out[len(self.ids):])
        piece = self.sess.tokenizer.decode(new_ids, skip_special_tokens=True)
        self.ids = self.ids + new_ids
        self.last_reply += piece
        if self.use_template and self.messages and self.messages[-1]["role"] == "assistant":
            self.messages[-1]["content"] += piece
        elif self.use_template:
            self.messages.append({"role": "assistant", "content": piece})
        return piece

    def mask_fill(self, ratio: float, text: str) -> tuple[str, str]:
        if not (0 < ratio <= 1):
            raise CLIError(f":mask needs a ratio in (0, 1], e.g. :mask 0.3 some text (got {ratio})")
        text = text if text else self.last_reply
        if not text:
            raise CLIError(":mask needs a text (none given and no reply yet)")
        body = list(self.sess.tokenizer(text, add_special_tokens=False)["input_ids"])
        if not body:
            raise CLIError(":mask: the text has no tokens")
        gen = torch.Generator().manual_seed(self._seed())
        n = max(1, round(ratio * len(body)))
        picked = torch.randperm(len(body), generator=gen)[:n].tolist()
        masked = list(body)
        for p in picked:
            masked[p] = self.sess.mask_id
        prefix = _prefix_ids(self.sess)
        out = run_sampler(self.sess, prefix + masked, self.args, 0, adapt=True, seed=self.turn + self.args.seed)
        tok = self.sess.tokenizer
        shown = tok.decode(masked, skip_special_tokens=False)
        filled = tok.decode(out[len(prefix):], skip_special_tokens=True)
        return shown, filled


def _until_eos(sess: Session, ids: list[int]) -> list[int]:
    for n, i in enumerate(ids):
        if i in sess.eos_ids:
            return ids[:n]
    return ids


def run_chat(args, stdin=None, stdout=None, stderr=None) -> int:
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    try:
        sess = _start_session(args)
    except (UserError, OSError) as e:
        return _fail(e, stderr)
    except KeyboardInterrupt:
        print("interrupted", file=stderr, flush=True)
        return 130
    state = ChatState(sess, args)
    interactive = hasattr(stdin, "isatty") and stdin.isatty()
    if interactive:
        print(f"chatting with {args.model} ({sess.family.name}); {HELP}", file=stdout, flush=True)
    while True:
        if interactive:
            print("> ", end="", file=stdout, flush=True)
        try:
            line = stdin.readline()
        except KeyboardInterrupt:  # Ctrl-C at the prompt ends the session, like :quit
            if interactive:
                print(file=stdout, flush=True)
            return 0
        if not line:
            return 0
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        try:
            if line.startswith(":"):
                cmd, _, rest = line[1:].partition(" ")
                cmd = cmd.strip().lower()
                if cmd in ("quit", "exit", "q"):
                    return 0
                if cmd == "help":
                    print(HELP, file=stdout, flush=True)
                elif cmd == "reset":
                    state.reset()
                    print("(conversation reset)", file=stdout, flush=True)
                elif cmd == "complete":
                    try:
                        n = int(rest.strip())
                    except ValueError:
                        raise CLIError(":complete needs a number of tokens, e.g. :complete 16") from None
                    print(state.complete(n), file=stdout, flush=True)
                elif cmd == "mask":
                    ratio_s, _, text = rest.strip().partition(" ")
                    try:
                        ratio = float(ratio_s)
                    except ValueError:
                        raise CLIError(":mask needs a ratio, e.g. :mask 0.3 some text") from None
                    shown, filled = state.mask_fill(ratio, text.strip())
                    print(f"masked: {shown}", file=stdout)
                    print(f"filled: {filled}", file=stdout, flush=True)
                else:
                    raise CLIError(f"unknown command ':{cmd}' ({HELP})")
            else:
                print(state.say(line), file=stdout, flush=True)
        except UserError as e:
            # a bad command does not end the session
            print(f"error: {e}", file=stderr, flush=True)
        except KeyboardInterrupt:
            # Ctrl-C while a reply is generated cancels that reply; the conversation stays as it was
            print("(interrupted; Ctrl-C at the prompt or :quit ends the session)", file=stderr, flush=True)


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad command line prints one ``error: ...`` line (exit code 2)."""

    def error(self, message):  # noqa: D401
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrorParser(prog="dllm-trainer", description="sample from a diffusion LM")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineErrorParser)
    add_generate_args(sub.add_parser("generate", help="generate from one prompt"))
    add_chat_args(sub.add_parser("chat", help="interactive chat on stdin/stdout"))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        return run_generate(args)
    return run_chat(args)


if __name__ == "__main__":  # python -m dllm_trainer.sampling.chat generate|chat ...
    sys.exit(main())
