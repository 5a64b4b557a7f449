"""lm-eval's three request types answered by a dlm_titan model, batched, without importing lm-eval.

- ``loglikelihood`` as SMDM's ``evaluate_diff.py``: ``nll_type="mc"`` = minus the MC ELBO of the continuation
  given the clean context (a lower bound on its log-likelihood), or ``"left_to_right"`` (SMDM's ``chain_rule``)
  = the log-likelihood of revealing the continuation left to right, one token per step (one unmasking order, not
  the model's likelihood: see :mod:`dlm_titan.likelihood`); unsupervised CFG; ``is_greedy`` (``greedy=True``)
  by confidence decoding one token per step, as SMDM.
- ``loglikelihood_rolling`` (perplexity tasks): minus the ELBO of the document, window after window, each window
  conditioned on the tokens before it.
- ``generate_until``: the confidence sampler, cut at EOS and at the task's stop strings.

This is the masked diffusion model's scorer; a checkpoint of the autoregressive baseline is scored exactly by
:mod:`dlm_titan.lm_eval.ar_scorer` (``make_scorer`` picks by the model's ``causal`` flag).

Every request's sequences (MC draws, left-to-right copies, generation canvases) are packed with those of other
requests of the same length into forwards of ``batch_size`` rows; noise is keyed by the request's tokens, so
answers do not depend on batching, request order or the data-parallel rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dlm_titan.errors import UserError
from dlm_titan.likelihood import elbo_batch, left_to_right_logprob_batch, text_key
from dlm_titan.sampling import SamplerConfig, sample, truncate_at_eos

# nll_type values; "chain_rule" is SMDM's name for "left_to_right".
NLL_TYPES = {"mc": "mc", "left_to_right": "left_to_right", "chain_rule": "left_to_right"}

Progress = Callable[[int], None] | None

# generate_until's names of the number of new tokens, in lm-eval's order of priority
MAX_TOKEN_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")


@dataclass
class ScorerConfig:
    """Scoring options (lm-eval ``--model_args`` of model ``dlm_titan``; ``batch_size`` is lm-eval's).

    Attributes:
        nll_type: "mc" (minus the MC ELBO) or "left_to_right" (one unmasking order; alias "chain_rule").
        mc_samples: MC samples per request (SMDM: 1024 for lm-eval, 128 for validation).
        batch_size: sequences per forward pass (MC draws of several requests share one).
        cfg_scale: unsupervised classifier-free guidance for loglikelihood and generation (0 = off).
        greedy: compute ``is_greedy`` (costs one forward per continuation token); False otherwise.
        eps: ELBO's p = (1 - eps) t + eps.
        seed: MC and sampling noise seed (a request's noise is keyed by its tokens, not its position in the run).
        max_length: longest sequence scored (0 = the model's max_seq_len, which is also the most); longer contexts
            lose tokens on the left.
        rolling_context: clean tokens of context before each rolling window (>= 1; the first window's
            context is the EOS that starts a document).
        gen_steps: sampler steps for generate_until (0 = one step per generated token).
    """

    nll_type: str = "mc"
    mc_samples: int = 128
    batch_size: int = 32
    cfg_scale: float = 0.0
    greedy: bool = False
    eps: float = 1e-3
    seed: int = 1234
    max_length: int = 0
    rolling_context: int = 1
    gen_steps: int = 0

    def check(self) -> None:
        """UserError naming the bad option, its value and the values it takes; "chain_rule" becomes
        "left_to_right"."""
        if self.nll_type not in NLL_TYPES:
            raise UserError(f"nll_type {self.nll_type!r} is not one of {', '.join(NLL_TYPES)}")
        self.nll_type = NLL_TYPES[self.nll_type]
        rules = (("mc_samples", self.mc_samples >= 1, "at least 1"),
                 ("rolling_context", self.rolling_context >= 1, "at least 1"),
                 ("eps", 0.0 <= self.eps < 1.0, "in [0, 1)"),
                 ("cfg_scale", 0.0 <= self.cfg_scale < math.inf, "a finite number >= 0 (0 = off)"),
                 ("max_length", self.max_length >= 0, ">= 0 (0 = the model's max_seq_len)"),
                 ("gen_steps", self.gen_steps >= 0, ">= 0 (0 = one step per generated token)"),
                 ("seed", self.seed >= 0, ">= 0"))
        for name, ok, rule in rules:
            if not ok:
                raise UserError(f"model_args {name}={getattr(self, name)} must be {rule}")
        if self.batch_size < 1:  # lm-eval's own flag, not a model_args entry
            raise UserError(f"--batch_size {self.batch_size} must be at least 1")


def checked_max_length(cfg: ScorerConfig, model: torch.nn.Module) -> int:
    """The longest sequence scored: ``cfg.max_length``, 0 = the model's ``max_seq_len``; UserError beyond it (the
    position table ends there), and for a ``rolling_context`` that leaves a rolling window no token to score (found
    here, not when the first perplexity request comes, maybe hours into a run)."""
    if cfg.max_length > model.max_seq_len:
        raise UserError(f"model_args max_length={cfg.max_length} exceeds the model's max_seq_len {model.max_seq_len}; "
                        f"pass max_length={model.max_seq_len} or less (0 = the model's)")
    if cfg.max_length == 1:  # generation would have no room for its prompt, rolling windows none for a context
        raise UserError("model_args max_length=1 leaves no room for a context token beside a scored or generated "
                        "one; pass max_length=2 or more (0 = the model's)")
    max_length = cfg.max_length or model.max_seq_len
    # a causal window's input is max_length tokens predicting max_length + 1 - context; a diffusion window's
    # context and target share max_length
    most = max_length if getattr(model, "causal", False) else max_length - 1
    if cfg.rolling_context > most:
        raise UserError(f"model_args rolling_context={cfg.rolling_context} leaves no token to score in a rolling "
                        f"window of max_length {max_length}; pass rolling_context={most} or less")
    return max_length


def split_context(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's convention: trailing whitespace of the context belongs to the continuation."""
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + continuation


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation): the whole string is encoded once and split at the context's
    length, so the continuation's first token is the one the tokenizer really produces after the context. An
    empty context becomes EOS (the start of a document)."""
    context, continuation = split_context(context, continuation)
    whole = tokenizer.encode(context + continuation, bos=False, eos=False)
    ctx = tokenizer.encode(context, bos=False, eos=False) if context else []
    cont = whole[len(ctx):]
    return (ctx or [tokenizer.eos_id]), cont


def rolling_windows(tokens: list[int], max_length: int, context_length: int,
                    prefix_token: int) -> list[tuple[list[int], list[int]]]:
    """(context, target) pairs that score every token once, in order.

    Targets are consecutive chunks of ``max_length - context_length`` tokens; each is conditioned on the (up to)
    ``context_length`` tokens before it in ``[prefix_token] + tokens``, so every pair fits ``max_length``.
    """
    if not 1 <= context_length < max_length:
        raise UserError(f"rolling context {context_length} must be in 1..{max_length - 1} (max_length - 1)")
    stream = [prefix_token] + list(tokens)
    chunk = max_length - context_length
    out = []
    for start in range(0, len(tokens), chunk):
        end = start + 1  # position of tokens[start] in stream
        out.append((stream[max(0, end - context_length) : end], stream[end : end + chunk]))
    return out


WindowsFn = Callable[[list[int], int, int, int], list[tuple[list[int], list[int]]]]


def all_windows(tokenizer, texts: list[str], windows_of: WindowsFn, max_length: int,
                context_length: int) -> tuple[list[tuple[list[int], list[int]]], list[int]]:
    """The rolling windows of every text (``windows_of``: :func:`rolling_windows` or the AR one), to be scored
    together, and the index of the text each window belongs to."""
    windows, owner = [], []
    for i, text in enumerate(texts):
        tokens = tokenizer.encode(text, bos=False, eos=False)
        for pair in windows_of(tokens, max_length, context_length, tokenizer.eos_id):
            windows.append(pair)
            owner.append(i)
    return windows, owner


def sum_by_text(values: list[float], owner: list[int], num_texts: int) -> list[float]:
    """Per-window values summed per text (``owner[j]``: the text of window j)."""
    totals = [0.0] * num_texts
    for i, value in zip(owner, values, strict=True):
        totals[i] += value
    return totals


def truncate_pair(ctx: list[int], cont: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Drops context tokens from the left (then continuation tokens, keeping the last ones) to fit max_length."""
    cont = cont[-max_length:]
    keep = max_length - len(cont)
    # max(0, ...): a negative start would count from the end and drop context tokens that fit
    return (ctx[max(0, len(ctx) - keep) :] if keep > 0 else []), cont


def continuation_text(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """Text of ``new_ids`` as it reads after the prompt (SentencePiece drops a leading space when a piece list
    is decoded on its own, so decode prompt + new and strip the prompt's decoding)."""
    head, full = tokenizer.decode(prompt_ids), tokenizer.decode(prompt_ids + new_ids)
    return full[len(head):] if full.startswith(head) else tokenizer.decode(new_ids)


def _chunks(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


@dataclass(frozen=True)
class GenOptions:
    """One generate_until request's sampling options (requests with equal options and prompt lengths batch)."""

    prompt_len: int
    length: int
    temperature: float
    top_k: int


def gen_options(tokenizer, context: str, kwargs: dict, max_length: int) -> tuple[list[int], list[str], GenOptions]:
    """(prompt ids, stop strings, options) of a generate_until request: ``max_gen_toks`` (default 256; or lm-eval's
    aliases ``max_new_tokens``, ``max_tokens``, ``max_completion_tokens``) new tokens
    within ``max_length``, the prompt cut on the left to fit; the task's ``temperature`` (0 = greedy) unless
    ``do_sample`` is false, so a temperature without ``do_sample`` samples as lm-eval's Hugging Face model does
    (lm-eval >= 0.4.10), and 1 when ``do_sample`` is true without one (Hugging Face's default), else greedy;
    ``top_k`` (0 = all; used by AR sampling). An empty prompt becomes EOS."""
    until = kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    # lm-eval's aliases of max_gen_toks, first given wins (lm_eval.models.utils.normalize_gen_kwargs)
    given = [kwargs[k] for k in MAX_TOKEN_KEYS if kwargs.get(k) is not None]
    length = max(1, min(int(given[0]) if given else 256, max_length - 1))
    do_sample, given_temperature = kwargs.get("do_sample"), kwargs.get("temperature")
    if do_sample is False:
        temperature = 0.0
    elif given_temperature is not None:
        temperature = float(given_temperature)
    else:  # do_sample alone samples at transformers' default 1, where lm-eval's HF model stops with its error
        temperature = 1.0 if do_sample else 0.0
    ctx = tokenizer.encode(context, bos=False, eos=False) or [tokenizer.eos_id]
    ctx = ctx[max(0, len(ctx) + length - max_length):]
    return ctx, until, GenOptions(len(ctx), length, temperature, int(kwargs.get("top_k") or 0))


def generate_grouped(tokenizer, requests: list[tuple[str, dict]], max_length: int, cfg: ScorerConfig,
                     run: Callable[[list[list[int]], list[int], GenOptions], list[str]], progress: Progress,
                     doc_ids: list[int] | None = None) -> list[str]:
    """generate_until by a sampler ``run(prompts, row seeds, options) -> continuation texts``: requests with equal
    options and prompt lengths run together, ``cfg.batch_size`` at a time, and each text is cut at the first stop
    string. A row's noise seed is keyed by (seed, its document id, its tokens, how many equal requests of that
    document came before it), so copies of a request (lm-eval's ``repeats``) differ at temperature > 0, and
    nothing depends on batching or on how lm-eval spread the documents over ranks (a document's requests stay
    together on one rank; ``doc_ids`` default to 0)."""
    prompts, groups, seen = [], {}, {}
    for i, (context, kwargs) in enumerate(requests):
        ctx, until, opts = gen_options(tokenizer, context, kwargs, max_length)
        doc = 0 if doc_ids is None else int(doc_ids[i])
        copy = seen[(doc, tuple(ctx), opts)] = seen.get((doc, tuple(ctx), opts), -1) + 1
        prompts.append((ctx, until, text_key([cfg.seed, doc, copy, *ctx])))
        groups.setdefault(opts, []).append(i)
    out = [""] * len(requests)
    for opts, members in groups.items():
        for chunk in _chunks(members, cfg.batch_size):
            texts = run([prompts[i][0] for i in chunk], [prompts[i][2] for i in chunk], opts)
            for i, text in zip(chunk, texts, strict=True):
                cuts = [text.index(s) for s in prompts[i][1] if s and s in text]
                out[i] = text[: min(cuts)] if cuts else text
            if progress is not None:
                progress(len(chunk))
    return out


class Scorer:
    """loglikelihood / loglikelihood_rolling / generate_until of a model and tokenizer, batched."""

    def __init__(self, model: torch.nn.Module, tokenizer, cfg: ScorerConfig):
        cfg.check()
        self.model, self.tok, self.cfg = model, tokenizer, cfg
        self.mask_id = model.args.mask_id
        self.max_length = checked_max_length(cfg, model)
        self.device = next(model.parameters()).device

    def loglikelihood(self, requests: list[tuple[str, str]], progress: Progress = None) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is_greedy) per request, by the configured estimator."""
        pairs = [truncate_pair(*encode_pair(self.tok, ctx, cont), self.max_length) for ctx, cont in requests]
        c = self.cfg
        if c.greedy and progress is not None:  # two passes (scoring, then decoding), each half a request
            report = progress

            def progress(n: int) -> None:
                report(n / 2)

        if c.nll_type == "left_to_right":
            per_token = left_to_right_logprob_batch(self.model, pairs, mask_id=self.mask_id, batch_size=c.batch_size,
                                                    cfg_scale=c.cfg_scale, progress=progress)
            logps = [t.sum().item() for t in per_token]
        else:
            estimates = elbo_batch(self.model, pairs, mask_id=self.mask_id, mc_samples=c.mc_samples,
                                   batch_size=c.batch_size, eps=c.eps, seed=c.seed, cfg_scale=c.cfg_scale,
                                   progress=progress)
            logps = [-e.nll for e in estimates]
        greedy = self.is_greedy(pairs, progress) if c.greedy else [False] * len(pairs)
        return list(zip(logps, greedy, strict=True))

    def is_greedy(self, pairs: list[tuple[list[int], list[int]]], progress: Progress = None) -> list[bool]:
        """Whether confidence decoding, one argmax token per step (SMDM), reproduces each continuation; pairs of
        equal context and continuation lengths decode together. ``progress(n)`` as n more pairs are done."""
        out = [False] * len(pairs)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (ctx, cont) in enumerate(pairs):
            if ctx and cont:
                groups.setdefault((len(ctx), len(cont)), []).append(i)
        undecoded = len(pairs) - sum(map(len, groups.values()))  # nothing to decode: done already
        if progress is not None and undecoded:
            progress(undecoded)
        for (_, n), members in groups.items():
            cfg = SamplerConfig(length=n, steps=n, algorithm="confidence", temperature=0.0,
                                cfg_scale=self.cfg.cfg_scale, stop_at_eos=False)
            for chunk in _chunks(members, self.cfg.batch_size):
                prompt = torch.tensor([pairs[i][0] for i in chunk], device=self.device)
                x = sample(self.model, prompt, cfg, mask_id=self.mask_id, vocab_limit=self.tok.vocab_size)
                for i, row in zip(chunk, x[:, prompt.shape[1]:].tolist(), strict=True):
                    out[i] = row == pairs[i][1]
                if progress is not None:
                    progress(len(chunk))
        return out

    def loglikelihood_rolling(self, texts: list[str], progress: Progress = None) -> list[float]:
        """Minus the ELBO of each whole text (a lower bound on its log-likelihood), summed over its windows; the
        windows of all texts are scored together."""
        c = self.cfg
        windows, owner = all_windows(self.tok, texts, rolling_windows, self.max_length, c.rolling_context)
        estimates = elbo_batch(self.model, windows, mask_id=self.mask_id, mc_samples=c.mc_samples,
                               batch_size=c.batch_size, eps=c.eps, seed=c.seed, progress=progress)
        return sum_by_text([-est.nll for est in estimates], owner, len(texts))

    def generate_until(self, requests: list[tuple[str, dict]], progress: Progress = None,
                       doc_ids: list[int] | None = None) -> list[str]:
        """Confidence sampling of ``max_gen_toks`` tokens, cut at EOS and at the first stop string (see
        :func:`generate_grouped`)."""

        def run(prompts: list[list[int]], seeds: list[int], opts: GenOptions) -> list[str]:
            cfg = SamplerConfig(length=opts.length, steps=min(opts.length, self.cfg.gen_steps or opts.length),
                                temperature=opts.temperature, cfg_scale=self.cfg.cfg_scale)
            return self._generate(prompts, seeds, cfg)

        return generate_grouped(self.tok, requests, self.max_length, self.cfg, run, progress, doc_ids)

    def _generate(self, prompts: list[list[int]], seeds: list[int], cfg: SamplerConfig) -> list[str]:
        """Continuation texts of equal-length prompts, row i sampled with noise seed ``seeds[i]``."""
        x = sample(self.model, torch.tensor(prompts, device=self.device), cfg, mask_id=self.mask_id,
                   eos_id=self.tok.eos_id, vocab_limit=self.tok.vocab_size, row_seeds=seeds)
        plen = len(prompts[0])
        return [continuation_text(self.tok, p, truncate_at_eos(row, self.tok.eos_id))
                for p, row in zip(prompts, x[:, plen:].tolist(), strict=True)]
