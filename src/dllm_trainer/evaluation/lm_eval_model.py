"""lm-evaluation-harness for diffusion LMs: the ``dllm`` model class and ``dllm-trainer eval``.

``DiffusionLM`` (registered with lm_eval as ``dllm``) answers lm-eval's three request kinds:

- ``loglikelihood(context, continuation)``: the Monte-Carlo ELBO bound of ``evaluation.elbo``
  (LLaDA's estimator: ``mc_num`` samples, ``mc_batch_size`` per forward, stratified masked
  counts, fixed ``seed`` so a text always gets the same noise; optional ``cfg_scale``);
  ``is_greedy`` is computed only with ``check_greedy=True`` (LLaDA's recommendation: off).
- ``generate_until(context, {until, max_gen_toks})``: ``sampling.generate`` with any strategy,
  threshold (Fast-dLLM parallel decoding) and cache; the text stops at the first EOS and is cut
  at the first occurrence of any ``until`` string. ``gen_length`` defaults to the task's
  ``max_gen_toks``; ``steps`` and ``block_length`` to ``gen_length``; the sampler settings are
  ours (a task's ``temperature`` / ``do_sample`` are not used, as in LLaDA's and Dream's
  harness models). ``batch_size > 1``
  decodes left-padded batches (positions renumbered, so rows match their unpadded runs up to
  float rounding).
- ``loglikelihood_rolling(text)``: the sum of ELBO bounds over lm-eval's rolling windows of
  ``max_length`` tokens (each window conditioned on the token before it), i.e. a bound on
  log p(text) as lm-eval's perplexity tasks expect.

``dllm-trainer eval --model DIR --tasks gsm8k,hellaswag [...]`` builds it and runs
``lm_eval.simple_evaluate``; ``--include-path`` adds local task YAMLs (tasks found there are
loaded without indexing lm-eval's ~15k bundled ones). lm_eval is an optional extra:
``pip install 'dllm-trainer[eval]'``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

from ..errors import UserError

try:  # optional extra: the class below needs lm_eval's base class; every entry point checks first
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model

    _LM_EVAL_MISSING = None
except ImportError as _e:  # pragma: no cover - exercised in a venv without lm_eval
    LM = object
    _LM_EVAL_MISSING = _e

    def register_model(*names):
        return lambda cls: cls


class EvalError(UserError):
    """A bad eval option, task or model (one message, no traceback)."""


def require_lm_eval() -> None:
    if _LM_EVAL_MISSING is not None:
        raise EvalError(
            "evaluation needs lm-evaluation-harness (lm_eval), which is not installed: "
            "pip install 'dllm-trainer[eval]' (bash setup.sh --dev installs it too)"
        )


CACHE_CHOICES = ("none", "prefix", "dual")


@register_model("dllm", "dllm_trainer")
class DiffusionLM(LM):
    """lm-eval model for our LLaDA / LLaDA-MoE / Dream / BERT masked diffusion LMs."""

    def __init__(
        self,
        pretrained: str | None = None,
        *,
        model=None,
        tokenizer=None,
        device: str = "auto",
        dtype: str = "auto",
        mc_num: int = 128,
        mc_batch_size: int = 32,
        cfg_scale: float = 0.0,
        check_greedy: bool = False,
        seed: int = 0,
        gen_length: int | None = None,
        steps: int | None = None,
        block_length: int | None = None,
        strategy: str | None = None,
        threshold: float | None = None,
        cache: str | None = None,
        temperature: float = 0.0,
        top_p: float | None = None,
        top_k: int | None = None,
        max_length: int | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        **unknown,
    ):
        require_lm_eval()
        super().__init__()
        if unknown:
            raise EvalError(
                f"unknown model argument(s) for dllm: {', '.join(sorted(unknown))} (allowed: pretrained, device, "
                "dtype, mc_num, mc_batch_size, cfg_scale, check_greedy, seed, gen_length, steps, block_length, "
                "strategy, threshold, cache, temperature, top_p, top_k, max_length, batch_size)"
            )
        from ..sampling import chat

        if model is None:
            if not pretrained:
                raise EvalError("no model given (pretrained=PATH)")
            self.sess = chat.load_session(str(pretrained), device or "auto", dtype or "auto")
        else:  # an in-memory model (library use)
            if tokenizer is None:
                raise EvalError("model= needs tokenizer= too")
            self.sess = _session_for(model, tokenizer)
        self.name = str(pretrained or type(model).__name__)
        self.model = self.sess.model
        self.tokenizer = self.sess.tokenizer
        self._device = self.sess.device

        def positive_int(name, v, allow_none=True, low=1):
            if v is None and allow_none:
                return None
            try:
                iv = int(v)
            except (TypeError, ValueError):
                raise EvalError(f"{name} must be an integer (got {v!r})") from None
            if iv != float(v) or iv < low:
                raise EvalError(f"{name} must be an integer >= {low} (got {v!r})")
            return iv

        self.mc_num = positive_int("mc_num", mc_num, False)
        self.mc_batch_size = positive_int("mc_batch_size", mc_batch_size, False)
        self.seed = positive_int("seed", seed, False, low=0)
        self.gen_length = positive_int("gen_length", gen_length)
        self.steps = positive_int("steps", steps)
        self.block_length = positive_int("block_length", block_length)
        self.top_k = positive_int("top_k", top_k)
        self.batch_size = positive_int("batch_size", 1 if batch_size in (None, "auto") else batch_size, False)
        self.cfg_scale = float(cfg_scale or 0.0)
        self.temperature = float(temperature or 0.0)
        self.threshold = None if threshold in (None, 0, "none") else float(threshold)
        self.top_p = None if top_p is None else float(top_p)
        self.check_greedy = _as_bool("check_greedy", check_greedy)
        cache = "none" if cache in (None, "") else str(cache).lower()
        if cache not in CACHE_CHOICES:
            raise EvalError(f"cache must be one of {', '.join(CACHE_CHOICES)} (got {cache!r})")
        self.cache = None if cache == "none" else cache
        self.strategy = strategy or None
        from ..sampling import STRATEGIES

        family = self.sess.family
        if self.strategy is not None and self.strategy not in STRATEGIES[family.name]:
            raise EvalError(
                f"strategy '{self.strategy}' does not apply to the {family.name} family "
                f"(allowed: {', '.join(STRATEGIES[family.name])})"
            )
        if family.name != "dream" and (self.top_p is not None or self.top_k is not None):
            raise EvalError(f"top_p / top_k apply to the dream family only (model family: {family.name})")
        if self.cache is not None and not family.native_masked_head:
            raise EvalError(f"cache '{self.cache}' needs a LLaDA or Dream model (model family: {family.name})")
        for name in ("cfg_scale", "temperature"):
            if getattr(self, name) < 0 or math.isnan(getattr(self, name)):
                raise EvalError(f"{name} must be >= 0 (got {getattr(self, name)})")
        if self.threshold is not None and not self.threshold > 0:
            raise EvalError(f"threshold must be > 0 (got {self.threshold})")
        if max_length is None:
            cfg = self.model.config
            max_length = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "max_sequence_length", None)
        self.max_length = positive_int("max_length", max_length, True, low=2) or 4096

    # -- lm-eval plumbing --------------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", self.name).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise EvalError(f"model '{self.name}' has no chat template: drop --apply-chat-template")
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def _fit(self, ids: list[int], room: int) -> list[int]:
        """Keep the last tokens of ``ids`` so that len(ids) + room <= max_length (lm-eval truncates left)."""
        keep = self.max_length - room
        if keep < 1:
            raise EvalError(f"the continuation ({room} tokens) does not fit max_length {self.max_length}")
        return ids if len(ids) <= keep else ids[-keep:]

    # -- likelihood ---------------------------------------------------------------------------
    def _elbo(self, ctx: list[int], cont: list[int]) -> float:
        from .elbo import masked_diffusion_elbo

        return masked_diffusion_elbo(
            self.model, ctx, cont, mc_num=self.mc_num, batch_size=self.mc_batch_size, seed=self.seed,
            cfg_scale=self.cfg_scale, mask_token_id=self.sess.mask_id,
        ).log_likelihood

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        from .elbo import encode_pair, suffix_is_greedy

        out = []
        for req in _progress(requests, "loglikelihood (ELBO)", disable_tqdm):
            context, continuation = req.args[0], req.args[1]
            ctx, cont = encode_pair(self.tokenizer, context, continuation)
            if not cont:
                raise EvalError(f"empty continuation for context {context[-40:]!r}: nothing to score")
            ctx = self._fit(ctx, len(cont))
            ll = self._elbo(ctx, cont)
            greedy = suffix_is_greedy(self.model, ctx, cont, mask_token_id=self.sess.mask_id) if self.check_greedy else False
            out.append((ll, greedy))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        from .elbo import _prefix_ids

        prefix = _prefix_ids(self.tokenizer) or self.sess.eos_ids[:1]
        if not prefix:
            raise EvalError("loglikelihood_rolling needs a BOS, CLS or EOS token to start the first window")
        out = []
        for req in _progress(requests, "loglikelihood_rolling (ELBO)", disable_tqdm):
            tokens = list(self.tokenizer(req.args[0], add_special_tokens=False)["input_ids"])
            windows = get_rolling_token_windows(tokens, prefix[0], self.max_length - 1, 1)
            out.append(sum(self._elbo(ctx, cont) for ctx, cont in map(make_disjoint_window, windows)))
        return out

    # -- generation ---------------------------------------------------------------------------
    def _settings(self, max_gen_toks) -> dict:
        gen_length = self.gen_length or int(max_gen_toks or 256)
        return dict(
            gen_length=gen_length,
            steps=self.steps or gen_length,
            block_length=self.block_length or gen_length,
            temperature=self.temperature,
            strategy=self.strategy,
            threshold=self.threshold,
            cache=self.cache,
            cfg_scale=self.cfg_scale,
            **({"top_p": self.top_p} if self.top_p is not None else {}),
            **({"top_k": self.top_k} if self.top_k is not None else {}),
        )

    def encode_context(self, context: str) -> list[int]:
        from ..sampling import chat

        return chat.encode_raw(self.sess, context)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from ..sampling import chat, generate

        jobs = []
        for n, req in enumerate(requests):
            context, gen_kwargs = req.args[0], (req.args[1] if len(req.args) > 1 else {}) or {}
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else [s for s in until if s]
            kw = self._settings(gen_kwargs.get("max_gen_toks"))
            ids = self._fit(self.encode_context(context), kw["gen_length"])
            jobs.append((n, ids, until, kw))
        results: list[str | None] = [None] * len(jobs)
        pad = getattr(self.tokenizer, "pad_token_id", None)
        pad = (self.sess.eos_ids[0] if self.sess.eos_ids else 0) if pad is None else int(pad)
        # same settings batch together (lm-eval tasks give one setting, so this is just chunking)
        groups: dict[str, list] = {}
        for job in jobs:
            groups.setdefault(json.dumps(job[3], sort_keys=True), []).append(job)
        bar = _progress(range(len(jobs)), "generate_until", disable_tqdm, iterate=False)
        for batch_jobs in (g[i: i + self.batch_size] for g in groups.values() for i in range(0, len(g), self.batch_size)):
            kw = batch_jobs[0][3]
            width = max(len(j[1]) for j in batch_jobs)
            prompt = torch.full((len(batch_jobs), width), pad, dtype=torch.long)
            attn = torch.zeros((len(batch_jobs), width), dtype=torch.long)
            for r, (_, ids, _, _) in enumerate(batch_jobs):
                prompt[r, width - len(ids):] = torch.tensor(ids)
                attn[r, width - len(ids):] = 1
            try:
                out = generate(
                    self.model, prompt.to(self.sess.device), attention_mask=attn.to(self.sess.device),
                    mask_token_id=self.sess.mask_id, eos_token_id=self.sess.eos_ids or None, stop_at_eos=True,
                    seed=self.seed, **kw,
                )
            except ValueError as e:  # e.g. steps not divisible by the number of blocks
                raise EvalError(f"generation settings: {e}") from None
            for r, (n, ids, until, _) in enumerate(batch_jobs):
                text = chat.decode(self.sess, out[r, width:].tolist())
                results[n] = cut_at_stop(text, until)
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        return results


def cut_at_stop(text: str, until: list[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string."""
    cut = len(text)
    for s in until:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def _as_bool(name: str, v) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false", "1", "0", "yes", "no"):
        return v.lower() in ("true", "1", "yes")
    if v in (0, 1):
        return bool(v)
    raise EvalError(f"{name} must be true or false (got {v!r})")


def _progress(items, desc: str, disable: bool, iterate: bool = True):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return items if iterate else None
    if iterate:
        return tqdm(items, desc=desc, disable=disable or len(items) < 2)
    return tqdm(total=len(items), desc=desc, disable=disable or len(items) < 2)


def _session_for(model, tokenizer):
    from ..families import get_family
    from ..sampling import chat

    family = get_family(model)
    mask_id = getattr(model.config, "mask_token_id", None)
    if mask_id is None:
        mask_id = getattr(tokenizer, "mask_token_id", None)
    if mask_id is None:
        raise EvalError("the model has no mask token (config.mask_token_id or tokenizer.mask_token)")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None and family.name == "bert":
        eos = getattr(tokenizer, "sep_token_id", None)
    eos_ids = [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    device = next(model.parameters()).device
    return chat.Session(model, tokenizer, family, int(mask_id), eos_ids, device)


# ---------------------------------------------------------------------------------------------
# dllm-trainer eval
# ---------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2
        self.exit(2, f"error: {message} (see dllm-trainer eval --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dllm-trainer eval", description="evaluate a diffusion LM with lm-evaluation-harness")
    p.add_argument("--model", required=True, help="local model folder or Hugging Face Hub id")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task/group names (or task YAML paths)")
    p.add_argument("--include-path", action="append", default=[], help="folder of extra task YAMLs (repeatable)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    p.add_argument("--limit", type=float, default=None, help="only the first N documents per task (N < 1: a fraction)")
    p.add_argument("--output", default=None, help="folder for results.json and (with --log-samples) samples_TASK.jsonl")
    p.add_argument("--log-samples", action="store_true", help="also write every request and response")
    p.add_argument("--apply-chat-template", action="store_true", help="format prompts with the model's chat template")
    p.add_argument("--bootstrap-iters", type=int, default=100000, help="bootstrap iterations for stderr (0: none)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--max-length", type=int, default=None, help="longest sequence; contexts are cut on the left")
    p.add_argument("--seed", type=int, default=0, help="seed of the ELBO noise and of sampled generation")
    g = p.add_argument_group("likelihood (multiple-choice tasks): Monte-Carlo ELBO")
    g.add_argument("--mc-num", type=int, default=128, help="Monte-Carlo samples per (context, continuation)")
    g.add_argument("--mc-batch-size", type=int, default=32, help="samples per forward pass")
    g.add_argument("--cfg-scale", type=float, default=0.0, help="classifier-free guidance (likelihood and generation)")
    g.add_argument("--check-greedy", action="store_true", help="compute is_greedy (one greedy decode per request)")
    g = p.add_argument_group("generation tasks: the diffusion sampler")
    g.add_argument("--gen-length", type=int, default=None, help="tokens to generate (default: the task's max_gen_toks)")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: gen-length)")
    g.add_argument("--block-length", type=int, default=None, help="semi-autoregressive block (default: gen-length)")
    g.add_argument("--strategy", default=None, help="remasking strategy (default: the family's)")
    g.add_argument("--threshold", type=float, default=None, help="Fast-dLLM parallel decoding threshold")
    g.add_argument("--cache", default="none", help="Fast-dLLM KV cache: none | prefix | dual")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=None, help="Dream only: nucleus sampling")
    g.add_argument("--top-k", type=int, default=None, help="Dream only: top-k sampling")
    g.add_argument("--batch-size", type=int, default=1, help="prompts decoded together (left-padded)")
    return p


def _task_manager(tasks: list[str], include_paths: list[str]):
    from lm_eval.tasks import TaskManager

    for path in include_paths:
        if not os.path.isdir(path):
            raise EvalError(f"--include-path '{path}' is not a folder")
    named = [t for t in tasks if not os.path.isfile(t)]
    if include_paths:
        local = TaskManager(include_path=include_paths, include_defaults=False)
        if all(local.match_tasks([t]) for t in named):
            return local  # everything is local: skip indexing lm-eval's bundled tasks (~30 s)
    tm = TaskManager(include_path=include_paths or None)
    unknown = [t for t in named if not tm.match_tasks([t])]
    if unknown:
        raise EvalError(
            f"unknown task(s): {', '.join(unknown)} (lm-eval task or group names, e.g. gsm8k, mmlu, hellaswag; "
            f"local YAML tasks need --include-path)"
        )
    return tm


def run_eval(args) -> dict:
    require_lm_eval()
    import lm_eval
    from lm_eval.utils import handle_non_serializable, make_table

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise EvalError("--tasks is empty")
    for name in ("num_fewshot", "bootstrap_iters"):
        v = getattr(args, name)
        if v is not None and v < 0:
            raise EvalError(f"--{name.replace('_', '-')} must be >= 0 (got {v})")
    limit = args.limit
    if limit is not None:
        if not limit > 0:
            raise EvalError(f"--limit must be > 0 (got {limit})")
        limit = int(limit) if limit >= 1 else limit
    if args.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise EvalError(f"unknown --dtype '{args.dtype}' (allowed: auto, float32, bfloat16, float16)")
    tm = _task_manager(tasks, args.include_path)
    lm = DiffusionLM(
        args.model, device=args.device, dtype=args.dtype, mc_num=args.mc_num, mc_batch_size=args.mc_batch_size,
        cfg_scale=args.cfg_scale, check_greedy=args.check_greedy, seed=args.seed, gen_length=args.gen_length,
        steps=args.steps, block_length=args.block_length, strategy=args.strategy, threshold=args.threshold,
        cache=args.cache, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        max_length=args.max_length, batch_size=args.batch_size,
    )
    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=limit, task_manager=tm,
            log_samples=args.log_samples, apply_chat_template=args.apply_chat_template,
            bootstrap_iters=args.bootstrap_iters, random_seed=args.seed, numpy_random_seed=args.seed,
            torch_random_seed=args.seed, fewshot_random_seed=args.seed,
        )
    except (OSError, ConnectionError) as e:  # e.g. a Hub dataset without network
        raise EvalError(f"cannot load the task data: {str(e).strip().splitlines()[0] if str(e).strip() else e}") from None
    if results is None:  # not rank 0
        return {}
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        samples = results.pop("samples", None) or {}
        (out / "results.json").write_text(
            json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False), encoding="utf-8")
        for task, rows in samples.items():
            with open(out / f"samples_{task}.jsonl", "w", encoding="utf-8") as fh:
                for row in rows:
                    fh.write(json.dumps(row, default=handle_non_serializable, ensure_ascii=False) + "\n")
        results["samples"] = samples
        print(f"results written to {out / 'results.json'}")
    return results


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_eval(args)
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
