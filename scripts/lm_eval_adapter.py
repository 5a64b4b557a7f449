"""lm-evaluation-harness adapter for dlm_titan models (the optional ``eval`` extra: ``pip install -e .[eval]``).

Usage::

    python -m scripts.lm_eval_adapter --checkpoint outputs/170m --tasks lambada_standard \\
        --nll_type chain_rule --greedy --cfg_scale 1.1
    python -m scripts.lm_eval_adapter --checkpoint outputs/170m --tasks hellaswag --nll_type mc --mc_samples 1024
    python -m scripts.lm_eval_adapter --checkpoint outputs/170m --tasks wikitext     # loglikelihood_rolling

- ``loglikelihood`` as SMDM's ``evaluate_diff.py``: ``mc`` = minus the MC ELBO of the continuation given the
  clean context (stratified t), or ``chain_rule`` = the exact left-to-right likelihood; unsupervised CFG; the
  ``is_greedy`` flag (``--greedy``) by confidence decoding one token per step, as SMDM.
- ``loglikelihood_rolling`` (perplexity tasks): minus the ELBO of the document, window after window, each window
  conditioned on the tokens before it. No other public MDM adapter implements it.
- ``generate_until``: the confidence sampler, cut at the task's stop strings.

The scoring logic lives in :class:`Scorer` and plain functions so it runs (and is tested) without lm_eval;
lm_eval is imported only when the harness class is built.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from dataclasses import dataclass

import torch

from dlm_titan.errors import UserError, report
from dlm_titan.likelihood import chain_rule_logprob, elbo
from dlm_titan.sampling import SamplerConfig, generate


@dataclass
class ScorerConfig:
    """Adapter options (SMDM's ``mdlm`` model arguments, plus the rolling window context).

    Attributes:
        nll_type: "mc" (ELBO) or "chain_rule" (exact) for ``loglikelihood``.
        mc_samples: MC samples per request (SMDM: 1024 for lm-eval, 128 for validation).
        batch_size: sequences per forward pass.
        cfg_scale: unsupervised classifier-free guidance for loglikelihood and generation.
        greedy: compute ``is_greedy`` (costs one forward per continuation token); False otherwise.
        eps: ELBO's p = (1 - eps) t + eps.
        seed: MC noise seed (the noise of a request is keyed by its tokens, not its position in the run).
        max_length: longest sequence scored (0 = the model's max_seq_len).
        rolling_context: clean tokens of context before each rolling window (>= 1; the first window's
            context is the EOS that starts a document).
        gen_steps: sampler steps per generated token count (0 = one step per token).
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
        if self.nll_type not in ("mc", "chain_rule"):
            raise UserError(f"nll_type {self.nll_type!r} is not 'mc' or 'chain_rule'")
        if self.mc_samples < 1 or self.batch_size < 1 or self.rolling_context < 1:
            raise UserError("mc_samples, batch_size and rolling_context must be at least 1")


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


def truncate_pair(ctx: list[int], cont: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Drops context tokens from the left (then continuation tokens, keeping the last ones) to fit max_length."""
    cont = cont[-max_length:]
    keep = max_length - len(cont)
    return (ctx[len(ctx) - keep :] if keep > 0 else []), cont


class Scorer:
    """loglikelihood / loglikelihood_rolling / generate_until of a model and tokenizer, without lm_eval."""

    def __init__(self, model: torch.nn.Module, tokenizer, cfg: ScorerConfig):
        cfg.check()
        self.model, self.tok, self.cfg = model, tokenizer, cfg
        self.mask_id = model.args.mask_id
        self.max_length = cfg.max_length or model.max_seq_len
        self.device = next(model.parameters()).device

    def score(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
        """(log p(cont | ctx), is_greedy) by the configured estimator."""
        ctx, cont = truncate_pair(ctx, cont, self.max_length)
        c = self.cfg
        if c.nll_type == "chain_rule":
            logp = chain_rule_logprob(self.model, cont, mask_id=self.mask_id, context=ctx, batch_size=c.batch_size,
                                      cfg_scale=c.cfg_scale).sum().item()
        else:
            logp = -elbo(self.model, cont, mask_id=self.mask_id, context=ctx, mc_samples=c.mc_samples,
                         batch_size=c.batch_size, eps=c.eps, seed=c.seed, cfg_scale=c.cfg_scale).nll
        return logp, (self.is_greedy(ctx, cont) if c.greedy else False)

    def is_greedy(self, ctx: list[int], cont: list[int]) -> bool:
        """Whether confidence decoding, one argmax token per step (SMDM), reproduces ``cont``."""
        if not ctx:
            return False
        cfg = SamplerConfig(length=len(cont), steps=len(cont), algorithm="confidence", temperature=0.0,
                            cfg_scale=self.cfg.cfg_scale, stop_at_eos=False)
        out = generate(self.model, [ctx], cfg, mask_id=self.mask_id, vocab_limit=self.tok.vocab_size,
                       device=self.device)
        return out[0] == cont

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        return [self.score(*encode_pair(self.tok, ctx, cont)) for ctx, cont in requests]

    def loglikelihood_rolling(self, texts: list[str]) -> list[float]:
        """Minus the ELBO of each whole text (a lower bound on its log-likelihood), summed over windows."""
        out = []
        for text in texts:
            tokens = self.tok.encode(text, bos=False, eos=False)
            total = 0.0
            for ctx, target in rolling_windows(tokens, self.max_length, self.cfg.rolling_context, self.tok.eos_id):
                total -= elbo(self.model, target, mask_id=self.mask_id, context=ctx, mc_samples=self.cfg.mc_samples,
                              batch_size=self.cfg.batch_size, eps=self.cfg.eps, seed=self.cfg.seed).nll
            out.append(total)
        return out

    def generate_until(self, requests: list[tuple[str, dict]]) -> list[str]:
        """Confidence sampling of ``max_gen_toks`` tokens, cut at EOS and at the first stop string."""
        out = []
        for context, kwargs in requests:
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            length = min(int(kwargs.get("max_gen_toks", 256)), self.max_length - 1)
            ctx = self.tok.encode(context, bos=False, eos=False) or [self.tok.eos_id]
            ctx = ctx[len(ctx) - (self.max_length - length):] if len(ctx) + length > self.max_length else ctx
            cfg = SamplerConfig(length=length, steps=min(length, self.cfg.gen_steps or length),
                                temperature=float(kwargs.get("temperature", 0.0)), cfg_scale=self.cfg.cfg_scale)
            new = generate(self.model, [ctx], cfg, mask_id=self.mask_id, eos_id=self.tok.eos_id,
                           vocab_limit=self.tok.vocab_size, device=self.device)[0]
            from scripts.generate import continuation_text

            text = continuation_text(self.tok, ctx, new)
            cuts = [text.index(s) for s in until if s and s in text]
            out.append(text[: min(cuts)] if cuts else text)
        return out


@functools.cache
def build_lm_class():
    """The lm_eval ``LM`` subclass, registered as ``dlm_titan`` (imports lm_eval; registers once)."""
    try:
        from lm_eval.api.model import LM
        from lm_eval.api.registry import register_model
    except ImportError:
        raise UserError("lm-eval is not installed; pip install -e '.[eval]' (or pip install lm-eval)") from None

    @register_model("dlm_titan")
    class DLMTitanLM(LM):
        """lm-eval model ``dlm_titan``: model_args checkpoint=PATH plus :class:`ScorerConfig` fields."""

        def __init__(self, checkpoint: str, tokenizer_path: str = "", device: str = "auto", dtype: str = "auto",
                     **kwargs):
            super().__init__()
            from scripts.generate import load_for_inference, load_tokenizer_for

            fields = ScorerConfig.__dataclass_fields__
            options = {k: _coerce(fields[k].default, v) for k, v in kwargs.items()
                       if k in fields and v is not None and v != "auto"}
            model = load_for_inference(checkpoint, str(device or "auto"), dtype)
            self.scorer = Scorer(model, load_tokenizer_for(model, tokenizer_path), ScorerConfig(**options))

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self.scorer.loglikelihood([tuple(r.args[:2]) for r in requests])

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self.scorer.loglikelihood_rolling([r.args[0] for r in requests])

        def generate_until(self, requests, disable_tqdm: bool = False):
            return self.scorer.generate_until([(r.args[0], r.args[1]) for r in requests])

    return DLMTitanLM


def _coerce(default, value):
    """lm-eval passes model_args as strings: convert to the type of the field's default."""
    if isinstance(default, bool):
        return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
    return type(default)(value)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from scripts.generate import add_model_args

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    for name, field in ScorerConfig.__dataclass_fields__.items():
        if isinstance(field.default, bool):
            parser.add_argument(f"--{name}", action="store_true")
        else:
            parser.add_argument(f"--{name}", type=type(field.default), default=field.default)
    parser.add_argument("--num_fewshot", type=int, default=None)
    parser.add_argument("--limit", type=float, default=None, help="examples per task (lm-eval --limit)")
    parser.add_argument("--include_path", default="", help="folder of extra lm-eval task YAML files")
    parser.add_argument("--output_path", default="", help="write the results JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        lm_class = build_lm_class()
        import lm_eval

        options = {k: getattr(args, k) for k in ScorerConfig.__dataclass_fields__}
        lm = lm_class(args.checkpoint, tokenizer_path=args.tokenizer_path, device=args.device, dtype=args.dtype,
                      **options)
        from lm_eval.tasks import TaskManager

        tasks = TaskManager(include_path=args.include_path or None)
        results = lm_eval.simple_evaluate(model=lm, tasks=args.tasks.split(","), num_fewshot=args.num_fewshot,
                                          limit=args.limit, task_manager=tasks)
    except UserError as e:
        return report(e)
    if results is not None:
        print(json.dumps(results["results"], indent=2, default=str))
        if args.output_path:
            with open(args.output_path, "w") as f:
                json.dump(results, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
