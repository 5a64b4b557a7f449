"""lm-eval's three request types answered exactly by an autoregressive (``training.objective = "ar"``) model.

- ``loglikelihood``: log p(continuation | context) by one forward pass (:mod:`dlm_titan.ar_likelihood`), and
  ``is_greedy`` (every continuation token is the argmax) from the same logits;
- ``loglikelihood_rolling``: the document's exact log-likelihood, window after window of ``max_length`` predicted
  tokens (with ``rolling_context`` 1), each conditioned on the tokens before it that fit (the first on the EOS that
  starts a document), as lm-eval's Hugging Face model does;
- ``generate_until``: left-to-right sampling (:mod:`dlm_titan.ar_sampling`, KV cache; greedy at temperature 0,
  else temperature and ``top_k`` from the task's generation kwargs), cut at EOS and the stop strings.

The masked-diffusion options (nll_type, mc_samples, eps, gen_steps) do not apply; ``cfg_scale`` > 0 is refused.
:func:`make_scorer` is where a checkpoint's ``causal`` flag picks this scorer or the MDM one.
"""

from __future__ import annotations

import torch

from dlm_titan.ar_likelihood import next_token_logprob_batch
from dlm_titan.ar_sampling import ARSamplerConfig, generate
from dlm_titan.errors import UserError
from dlm_titan.lm_eval.scorer import (
    GenOptions,
    Progress,
    Scorer,
    ScorerConfig,
    all_windows,
    checked_max_length,
    continuation_text,
    encode_pair,
    generate_grouped,
    sum_by_text,
    truncate_pair,
)
from dlm_titan.sampling import truncate_at_eos


def make_scorer(model: torch.nn.Module, tokenizer, cfg: ScorerConfig) -> Scorer | ARScorer:
    """The scorer of a model: exact (:class:`ARScorer`) for a causal model, the MDM :class:`Scorer` otherwise."""
    return ARScorer(model, tokenizer, cfg) if getattr(model, "causal", False) else Scorer(model, tokenizer, cfg)


def ar_rolling_windows(tokens: list[int], max_length: int, context_length: int,
                       prefix_token: int) -> list[tuple[list[int], list[int]]]:
    """(context, target) pairs that score every token once, as lm-eval's rolling windows for causal models
    (``get_rolling_token_windows`` + ``make_disjoint_window``): the first target is the first ``max_length``
    tokens (after ``prefix_token``), the next ones consecutive chunks of ``max_length + 1 - context_length``
    tokens, each conditioned on as many tokens before it in ``[prefix_token] + tokens`` as fit an input of
    ``max_length`` tokens (so a short last chunk sees more)."""
    if not 1 <= context_length <= max_length:
        raise UserError(f"rolling context {context_length} must be in 1..{max_length} (max_length)")
    stream = [prefix_token] + list(tokens)
    chunk = max_length + 1 - context_length
    out = []
    # lm-eval's first window predicts max_length tokens whatever the context length; later ones predict chunks
    starts = [0, *range(max_length, len(tokens), chunk)] if tokens else []
    for start in starts:
        target = stream[start + 1 : start + 1 + (max_length if start == 0 else chunk)]
        out.append((stream[max(0, start + 1 - (max_length + 1 - len(target))) : start + 1], target))
    return out


class ARScorer:
    """loglikelihood / loglikelihood_rolling / generate_until of a causal model and tokenizer, exact, batched."""

    def __init__(self, model: torch.nn.Module, tokenizer, cfg: ScorerConfig):
        cfg.check()
        if cfg.cfg_scale > 0:
            raise UserError("cfg_scale (classifier-free guidance by masking the prompt) needs a masked diffusion "
                            "model; this checkpoint is autoregressive (causal): drop cfg_scale")
        self.model, self.tok, self.cfg = model, tokenizer, cfg
        self.max_length = checked_max_length(cfg, model)  # input tokens per forward
        self.device = next(model.parameters()).device

    def loglikelihood(self, requests: list[tuple[str, str]], progress: Progress = None) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is_greedy) per request; a context longer than ``max_length`` loses
        tokens on the left."""
        pairs = []
        for context, continuation in requests:
            ctx, cont = encode_pair(self.tok, context, continuation)
            pairs.append(truncate_pair(ctx, cont[-self.max_length:], self.max_length + 1))
        scored = next_token_logprob_batch(self.model, pairs, batch_size=self.cfg.batch_size, progress=progress)
        return [(logp.sum().item(), bool(greedy.all())) for logp, greedy in scored]

    def loglikelihood_rolling(self, texts: list[str], progress: Progress = None) -> list[float]:
        """The exact log-likelihood of each whole text, summed over its windows; all windows scored together."""
        windows, owner = all_windows(self.tok, texts, ar_rolling_windows, self.max_length, self.cfg.rolling_context)
        scored = next_token_logprob_batch(self.model, windows, batch_size=self.cfg.batch_size, progress=progress)
        return sum_by_text([logp.sum().item() for logp, _ in scored], owner, len(texts))

    def generate_until(self, requests: list[tuple[str, dict]], progress: Progress = None,
                       doc_ids: list[int] | None = None) -> list[str]:
        """``max_gen_toks`` tokens sampled left to right, cut at EOS and the first stop string."""
        return generate_grouped(self.tok, requests, self.max_length, self.cfg, self._generate, progress, doc_ids)

    def _generate(self, prompts: list[list[int]], seeds: list[int], opts: GenOptions) -> list[str]:
        """Continuation texts of equal-length prompts, row i drawing from a generator keyed by ``seeds[i]``."""
        cfg = ARSamplerConfig(max_new_tokens=opts.length, temperature=opts.temperature, top_k=opts.top_k)
        x = generate(self.model, torch.tensor(prompts, device=self.device), cfg, eos_id=self.tok.eos_id,
                     row_seeds=seeds, vocab_limit=self.tok.vocab_size)
        return [continuation_text(self.tok, p, truncate_at_eos(row, self.tok.eos_id))
                for p, row in zip(prompts, x[:, opts.prompt_len:].tolist(), strict=True)]
