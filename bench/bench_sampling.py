"""Sampling throughput: vanilla low-confidence decoding vs Fast-dLLM (threshold + KV cache).

    python bench/bench_sampling.py --threads 1 --out bench_sampling.json    # fits the default model, then 8 prompts (~17 min on 2 CPU cores)
    python bench/bench_sampling.py --model DIR [--fit-steps N]               # a saved/real LLaDA or Dream model

Measures generated tokens per second at gen_length 256, block_length 32, steps 256 (one token per
step in the vanilla sampler), batch 1, greedy, all in the same invocation on the same ``--prompts``
(default 8) prompts, each generated separately:

    vanilla            low_confidence, no cache (the baseline)
    prefix             vanilla schedule + prefix KV cache
    dual               vanilla schedule + dual KV cache
    threshold          Fast-dLLM parallel decoding (threshold 0.9), no cache
    threshold_prefix   threshold 0.9 + prefix cache
    threshold_dual     threshold 0.9 + dual cache (the Fast-dLLM headline setting)

For each: seconds (summed over prompts), tokens/s, speedup over vanilla, number of forwards (nfe,
summed), tokens fed through the model, ``agreement`` (fraction of all generated tokens, pooled over
the prompts, equal to the vanilla output; the per-prompt values and their minimum go to the JSON)
and
``validity`` (fraction of generated adjacent token pairs the synthetic language allows: output
quality). All samplers, the baseline included, compute the output head only at the current
block's masked columns, so the speedups come from fewer forwards (threshold) and shorter
forwards (cache), not from the head trick.

Model. ``--model PATH`` (any LLaDA/Dream folder or Hub id our Auto registration loads), or by
default a LLaDA-shaped model built from config: d_model 256, 4 layers, 4 heads, MLP 1024, vocab
32000, about 20.6M parameters, float32. A random model is near-uniform everywhere, so a
confidence threshold would never fire and cache agreement would be meaningless. The default
model is therefore first fitted (``--fit-steps``, default 1200 Adam steps, lr 3e-3 with warm-up,
cosine decay and clipping; batch 2) with the masked-diffusion loss on a synthetic language at
the benchmark's full length (prompt + generation = 320 tokens; shorter training windows left
the model unable to handle the long masked suffix of semi-autoregressive decoding):
``WordCorpus`` = a lexicon of ``--n-words`` (4) words of ``--word-len`` (8) distinct token ids;
the next word is the current word's successor with probability ``--p-next`` (0.75), else
uniform. Inside a word every token is determined (parallel-decodable once the word is known);
word boundaries carry real uncertainty (confidence at most about 0.8 < the 0.9 threshold), so
threshold decoding must fall back to one token per step there, as with real text. With 400
steps the fitted model was still poor (vanilla validity about 0.3), hence 1200. A fully
deterministic variant (``--n-words 1 --word-len 16 --p-next 1.0``: a 16-token cycle, 400
steps suffice) is the best case for threshold decoding (whole blocks in one or two forwards,
about 23x on this CPU): an upper bound, not a typical figure. The prompt is 64 tokens of
the same language. ``--save-model DIR`` keeps the fitted model (reuse it with ``--model DIR``
and the same corpus flags).

Why several prompts: agreement on one prompt is one draw of a very noisy quantity. A single
disagreement at a word boundary sends the rest of that word (and possibly the chain after it)
down another path, so one prompt swings agreement by several points (on the default model,
single prompts ranged from 0.92 to 1.00 at threshold 0.9).

Threads: on a 2-core box shared with other jobs, torch's 2 OpenMP threads stalled badly (20x
slower forwards); ``--threads 1`` gives stable timings.

The last line printed is exactly ``sample_speedup=<x> agreement=<a>``: x = tokens/s of
threshold_dual over vanilla, a = agreement of threshold_dual with vanilla. ``--out`` gets a JSON
with every figure and all settings.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import dllm_trainer  # noqa: E402,F401  (registers LLaDA/Dream)
from dllm_trainer.families import get_family  # noqa: E402
from dllm_trainer.sampling import generate  # noqa: E402

CONFIGS = {
    "vanilla": {},
    "prefix": {"cache": "prefix"},
    "dual": {"cache": "dual"},
    "threshold": {"threshold": None},
    "threshold_prefix": {"threshold": None, "cache": "prefix"},
    "threshold_dual": {"threshold": None, "cache": "dual"},
}


def build_default_model(args):
    from dllm_trainer.models import LLaDAConfig, LLaDAModelLM

    cfg = LLaDAConfig(
        d_model=args.d_model, n_heads=args.n_heads, n_kv_heads=args.n_heads, n_layers=args.n_layers,
        mlp_hidden_size=4 * args.d_model, vocab_size=args.vocab, embedding_size=args.vocab,
        max_sequence_length=4096, mask_token_id=args.vocab - 1, eos_token_id=1, pad_token_id=1,
        init_device="cpu",
    )
    torch.manual_seed(args.seed)
    return LLaDAModelLM(cfg)


def distinct_ids(vocab: int, count: int, seed: int, avoid: tuple = ()) -> torch.Tensor:
    """``count`` distinct ids drawn from [5, vocab), avoiding the special ids in ``avoid``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(vocab - 5, generator=g) + 5
    keep = ~torch.isin(ids, torch.tensor([int(a) for a in avoid if a is not None], dtype=torch.long))
    return ids[keep][:count]


class WordCorpus:
    """A tiny synthetic language: a lexicon of ``n_words`` words of ``word_len`` distinct tokens.

    A text is a word sequence from a Markov chain: the next word is the current word's fixed
    successor with probability ``p_next``, else uniform. Inside a word every token is fully
    determined by any other (confident, parallel-decodable); word boundaries carry the
    uncertainty (at most ``p_next`` confidence). The generation window starts at a random phase.
    """

    def __init__(self, vocab: int, seed: int, avoid: tuple = (), n_words: int = 4, word_len: int = 8,
                 p_next: float = 0.75):
        self.word_len, self.n_words, self.p_next = word_len, n_words, p_next
        self.words = distinct_ids(vocab, n_words * word_len, seed, avoid).view(n_words, word_len)
        self.succ = torch.randperm(n_words, generator=torch.Generator().manual_seed(seed + 7))
        nxt = {}
        for w in range(n_words):
            for j in range(word_len - 1):
                nxt[int(self.words[w, j])] = int(self.words[w, j + 1])
        self.next_in_word = nxt
        self.first_tokens = {int(t) for t in self.words[:, 0]}
        self.last_tokens = {int(t) for t in self.words[:, -1]}

    def sample(self, n: int, length: int, g: torch.Generator) -> torch.Tensor:
        n_w = length // self.word_len + 2
        w = torch.empty(n, n_w, dtype=torch.long)
        w[:, 0] = torch.randint(0, self.n_words, (n,), generator=g)
        for j in range(1, n_w):
            follow = torch.rand(n, generator=g) < self.p_next
            w[:, j] = torch.where(follow, self.succ[w[:, j - 1]], torch.randint(0, self.n_words, (n,), generator=g))
        toks = self.words[w].reshape(n, -1)
        phase = torch.randint(0, self.word_len, (n, 1), generator=g)
        return torch.gather(toks, 1, phase + torch.arange(length))

    def validity(self, seqs: torch.Tensor) -> float:
        """Fraction of adjacent token pairs the language allows (output quality)."""
        ok = total = 0
        for row in seqs.cpu().tolist():
            for a, b in zip(row[:-1], row[1:]):
                total += 1
                if a in self.next_in_word:
                    ok += self.next_in_word[a] == b
                else:
                    ok += a in self.last_tokens and b in self.first_tokens
        return ok / max(1, total)


def model_corpus(model, args) -> WordCorpus:
    cfg = model.config
    avoid = (cfg.mask_token_id, getattr(cfg, "eos_token_id", None), getattr(cfg, "pad_token_id", None))
    return WordCorpus(cfg.vocab_size, args.seed, avoid, n_words=args.n_words, word_len=args.word_len,
                      p_next=args.p_next)


def fit(model, corpus, args, log):
    """Masked-diffusion loss (CE at masked positions / t), head only at masked positions.

    Adam with linear warm-up, cosine decay and gradient clipping (constant lr was unstable)."""
    fam = get_family(model)
    mask_id = model.config.mask_token_id
    g = torch.Generator().manual_seed(args.seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=args.fit_lr)
    warmup = max(1, args.fit_steps // 15)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / args.fit_steps))
    )
    total_len = args.prompt_length + args.gen_length
    model.train()
    t0 = time.perf_counter()
    for step in range(args.fit_steps):
        x = corpus.sample(args.fit_batch, args.fit_length, g)
        t = 0.05 + 0.95 * torch.rand(args.fit_batch, 1, generator=g)
        masked = torch.rand(x.shape, generator=g) < t
        offset = torch.randint(0, max(1, total_len - args.fit_length + 1), (args.fit_batch, 1), generator=g)
        pos = offset + torch.arange(args.fit_length)
        flat = torch.nonzero(masked.flatten()).flatten()
        out_pos = fam.output_positions(flat, args.fit_length)
        logits = model(input_ids=x.masked_fill(masked, mask_id), position_ids=pos, output_positions=out_pos).logits
        ce = F.cross_entropy(logits.float(), x.flatten()[flat], reduction="none")
        weight = (1 / t).expand_as(x).flatten()[flat]
        loss = (ce * weight).sum() / x.numel()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % max(1, args.fit_steps // 10) == 0 or step == args.fit_steps - 1:
            acc = (logits.argmax(-1) == x.flatten()[flat]).float().mean().item()
            log(f"[fit] step {step:4d} loss {loss.item():.3f} masked-token acc {acc:.3f} "
                f"({time.perf_counter() - t0:.0f}s)")
    model.eval()
    return time.perf_counter() - t0


def load_model(path):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path)
    return model.eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="LLaDA/Dream folder or Hub id (default: fitted random LLaDA)")
    ap.add_argument("--out", default="bench_sampling.json")
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--prompt-length", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1, help="rows per generate call")
    ap.add_argument("--prompts", type=int, default=8,
                    help="prompts generated one after another; agreement is pooled over all of them")
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per config (the fastest is kept)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma list of: " + ", ".join(CONFIGS))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    # default model + fitting
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--n-words", type=int, default=4, help="synthetic language: lexicon size")
    ap.add_argument("--word-len", type=int, default=8, help="synthetic language: tokens per word")
    ap.add_argument("--p-next", type=float, default=0.75, help="synthetic language: P(next word = successor)")
    ap.add_argument("--fit-steps", type=int, default=None,
                    help="Adam steps on the synthetic corpus (default 1200; 0 with --model, where it continues training)")
    ap.add_argument("--fit-batch", type=int, default=2)
    ap.add_argument("--fit-length", type=int, default=None, help="training sequence length (default: prompt + gen)")
    ap.add_argument("--fit-lr", type=float, default=3e-3)
    ap.add_argument("--save-model", default=None, help="save the fitted default model here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        print(f"error: unknown config(s) {unknown} (allowed: {', '.join(CONFIGS)})", file=sys.stderr)
        return 2
    if args.prompts < 1 or args.batch < 1:
        print("error: --prompts and --batch must be at least 1", file=sys.stderr)
        return 2
    if "vanilla" not in configs:
        configs.insert(0, "vanilla")

    fit_seconds = 0.0
    if args.fit_steps is None:
        args.fit_steps = 0 if args.model else 1200
    if args.fit_length is None:
        args.fit_length = args.prompt_length + args.gen_length
    if args.model:
        model = load_model(args.model)
        corpus = model_corpus(model, args)
        model_desc = args.model
        if args.fit_steps:
            log(f"[model] {args.model}: fitting {args.fit_steps} more steps on the synthetic corpus")
            fit_seconds = fit(model, corpus, args, log)
            model_desc += f", fitted {args.fit_steps} more steps"
            if args.save_model:
                model.save_pretrained(args.save_model)
    else:
        model = build_default_model(args)
        corpus = model_corpus(model, args)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"[model] random LLaDA d_model {args.d_model}, {args.n_layers} layers, {args.n_heads} heads, "
            f"vocab {args.vocab}: {n_params / 1e6:.1f}M parameters; fitting {args.fit_steps} steps")
        fit_seconds = fit(model, corpus, args, log)
        model_desc = f"random LLaDA d{args.d_model} L{args.n_layers} H{args.n_heads} V{args.vocab}, fitted {args.fit_steps} steps"
        if args.save_model:
            model.save_pretrained(args.save_model)
    model.to(args.device).eval()
    fam = get_family(model)

    g = torch.Generator().manual_seed(args.seed + 2)
    prompts = corpus.sample(args.prompts * args.batch, args.prompt_length, g).to(args.device).split(args.batch)
    base = dict(gen_length=args.gen_length, steps=args.steps, block_length=args.block_length, temperature=0.0)
    strategy = fam.default_sampler

    # warm-up (allocator, kernels) on a short run
    generate(model, prompts[0], gen_length=args.block_length, steps=args.block_length, block_length=args.block_length)

    results = {}
    outputs = {}
    for name in configs:
        opts = dict(CONFIGS[name])
        if "threshold" in opts:
            opts["threshold"] = args.threshold
        seconds, nfe, forward_tokens, outs = 0.0, 0, 0, []
        for prompt in prompts:
            best, stats, out = None, None, None
            for _ in range(max(1, args.repeats)):
                st = {}
                t0 = time.perf_counter()
                out = generate(model, prompt, stats=st, **base, **opts)
                dt = time.perf_counter() - t0
                if best is None or dt < best:
                    best, stats = dt, st
            seconds += best
            nfe += stats["nfe"]
            forward_tokens += stats["forward_tokens"]
            outs.append(out)
        outputs[name] = torch.cat(outs)
        tokens = args.prompts * args.batch * args.gen_length
        results[name] = {
            "seconds": seconds,
            "tokens_per_s": tokens / seconds,
            "nfe": nfe,
            "forward_tokens": forward_tokens,
            **{k: v for k, v in opts.items()},
        }
        log(f"[{name:17s}] {seconds:7.2f}s  {tokens / seconds:8.1f} tok/s  nfe {nfe:5d}  "
            f"forward tokens {forward_tokens}")

    van = outputs["vanilla"][:, args.prompt_length:]
    for name in configs:
        gen = outputs[name][:, args.prompt_length:]
        equal = (gen == van).float()
        per_prompt = [chunk.mean().item() for chunk in equal.split(args.batch)]
        results[name]["agreement"] = equal.mean().item()
        results[name]["agreement_per_prompt"] = per_prompt
        results[name]["agreement_min"] = min(per_prompt)
        results[name]["speedup"] = results[name]["tokens_per_s"] / results["vanilla"]["tokens_per_s"]
        results[name]["validity"] = corpus.validity(outputs[name][:, args.prompt_length - 1:])

    log("")
    log(f"{'config':17s} {'tok/s':>9s} {'speedup':>8s} {'agreement':>10s} {'min/prompt':>10s} {'nfe':>6s} "
        f"{'validity':>9s}")
    for name in configs:
        r = results[name]
        log(f"{name:17s} {r['tokens_per_s']:9.1f} {r['speedup']:7.2f}x {r['agreement']:10.3f} "
            f"{r['agreement_min']:10.3f} {r['nfe']:6d} {r['validity']:9.3f}")

    headline = "threshold_dual" if "threshold_dual" in results else configs[-1]
    report = {
        "settings": {
            **{k: v for k, v in vars(args).items()},
            "strategy": strategy,
            "model": model_desc,
            "family": fam.name,
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "fit_seconds": fit_seconds,
            "headline": headline,
        },
        "results": results,
        "sample_speedup": results[headline]["speedup"],
        "agreement": results[headline]["agreement"],
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    log(f"wrote {args.out}")
    print(f"sample_speedup={results[headline]['speedup']:.2f} agreement={results[headline]['agreement']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
