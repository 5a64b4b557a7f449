"""Left-to-right sampling of an autoregressive (``training.objective = "ar"``) model, SMDM's ARM baseline.

Each step draws the next token of every sample from the model's distribution at the last position: greedy
(temperature 0: argmax), or softmax(logits / temperature) restricted to the ``top_k`` most likely tokens (0 = all),
renormalised, in float64. Each sample draws from a generator of its own (keyed by its seed), so its tokens do not
depend on the batch it is in.

With ``kv_cache`` (the default) the keys and values of every layer are kept, so a step runs the model on one new
token instead of the whole prefix: the prompt is processed once, then each step costs O(prefix) attention
instead of a full forward. Its outputs equal the uncached path's (the test checks greedy decoding token for token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from dlm_kernels.rope import apply_rope

from dlm_titan.errors import UserError
from dlm_titan.sampling import group_by_length, row_generators, truncate_at_eos


@dataclass
class ARSamplerConfig:
    """How to generate from an AR model.

    Attributes:
        max_new_tokens: tokens generated after the prompt.
        temperature: softmax temperature; 0 = greedy (argmax).
        top_k: sample among the k most likely tokens; 0 = the whole vocabulary.
        kv_cache: keep keys/values between steps (same outputs, far fewer FLOPs).
        stop_at_eos: stop once every sample has produced ``eos_id``, and pad after EOS with EOS.
        seed: sample i draws from a generator keyed by seed + i.
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    kv_cache: bool = True
    stop_at_eos: bool = True
    seed: int = 0

    def check(self, vocab_size: int) -> None:
        """UserError naming the option when it is out of range."""
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature < math.inf:  # also NaN: it would turn masked-out logits into NaN picks
            raise UserError(f"temperature must be finite and >= 0 (0 = greedy), got {self.temperature}")
        if not 0 <= self.top_k <= vocab_size:
            raise UserError(f"top_k must be in 0..{vocab_size} (0 = whole vocabulary), got {self.top_k}")


def next_token_probs(logits: torch.Tensor, temperature: float, top_k: int = 0) -> torch.Tensor:
    """float64 ``[B, V]`` distribution of the next token: softmax(logits / temperature) over the ``top_k``
    largest logits (0 = all), zero elsewhere. ``temperature`` must be > 0 (0 is greedy: see sample_next)."""
    logits = logits.double()
    # Shift the row's largest logit to 0 before dividing: a tiny temperature then sends the others to -inf (the
    # argmax, as the limit should), where the unshifted quotient overflows to inf and the softmax gives NaN.
    scaled = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if 0 < top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return scaled.softmax(dim=-1)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of ``logits [B, V]``: argmax when temperature is 0, else a draw from
    :func:`next_token_probs` with row b's generator."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = next_token_probs(logits, temperature, top_k)
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])


class KVCache:
    """Keys and values of every layer, ``[B, max_len, kv_heads, head_dim]`` each, filled up to ``length``."""

    def __init__(self, model: torch.nn.Module, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        attn = next(iter(model.layers.values())).attention
        kv_heads = getattr(attn, "n_kv_heads", attn.n_heads)
        shape = (batch, max_len, kv_heads, attn.head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in model.layers]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in model.layers]
        self.length = 0


def _cached_attention(attn: torch.nn.Module, x: torch.Tensor, rope: torch.Tensor, cache: KVCache, layer: int) -> torch.Tensor:
    """The layer's attention for new tokens ``x [B, n, dim]`` at positions ``cache.length ..``, reading the cached
    keys/values of earlier positions and appending its own."""
    batch, n, dim = x.shape
    start = cache.length
    kv_heads = getattr(attn, "n_kv_heads", attn.n_heads)
    q, k, v = attn.wqkv(x).view(batch, n, -1, attn.head_dim).split([attn.n_heads, kv_heads, kv_heads], dim=2)
    positions = rope[:, start : start + n]
    q, k = apply_rope(q, positions), apply_rope(k, positions)
    cache.keys[layer][:, start : start + n] = k
    cache.values[layer][:, start : start + n] = v
    keys, values = cache.keys[layer][:, : start + n], cache.values[layer][:, : start + n]
    if kv_heads != attn.n_heads:
        keys, values = (t.repeat_interleave(attn.n_heads // kv_heads, dim=2) for t in (keys, values))
    # new token i (position start + i) sees positions 0 .. start + i
    visible = torch.ones(n, start + n, dtype=torch.bool, device=x.device).tril(diagonal=start)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=visible)
    return attn.wo(out.transpose(1, 2).reshape(batch, n, dim))


def cached_last_logits(model: torch.nn.Module, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Logits ``[B, V]`` at the last of ``tokens [B, n]``, the tokens that follow the ``cache.length`` cached ones;
    the cache then holds them too. Mirrors TransformerBlock.forward with the attention reading the cache."""
    h = model.tok_embeddings(tokens)
    delta = torch.zeros_like(h)
    for i, layer in enumerate(model.layers.values()):
        h, y = layer.attention_norm(h, delta)
        h, y = layer.ffn_norm(h, _cached_attention(layer.attention, y, model.rope, cache, i))
        delta = layer.feed_forward(y)
    cache.length += tokens.shape[1]
    return model.output(model.norm(h[:, -1:], delta[:, -1:])[1][:, 0])


@torch.no_grad()
def generate(model: torch.nn.Module, prompt: torch.Tensor, cfg: ARSamplerConfig, eos_id: int | None = None, *,
             row_seeds: list[int] | None = None, vocab_limit: int | None = None) -> torch.Tensor:
    """Continues each prompt ``[B, P]`` (equal lengths) by ``cfg.max_new_tokens`` tokens: ``[B, P + new]``.

    Args:
        model: a causal TransEncoder.
        prompt: int64 ``[B, P]`` token ids.
        cfg: the sampler options.
        eos_id: end-of-text id (stops and pads when ``cfg.stop_at_eos``).
        row_seeds: row b draws from a generator keyed by ``row_seeds[b]`` (default ``cfg.seed + b``).
        vocab_limit: only ids below it are drawn (a tokenizer smaller than the model's vocabulary).

    Raises:
        UserError: a bad option, or prompt + new tokens longer than the model's RoPE table (max_seq_len).
    """
    cfg.check(model.args.vocab_size)
    if not getattr(model, "causal", False):
        raise UserError("AR sampling needs a causal model (training.objective = \"ar\"); use scripts.generate for MDM")
    total = prompt.shape[1] + cfg.max_new_tokens
    if prompt.shape[1] < 1 or total > model.max_seq_len:
        raise UserError(f"prompt ({prompt.shape[1]}) + max_new_tokens ({cfg.max_new_tokens}) must be 1..{model.max_seq_len} "
                        f"tokens (the model's max_seq_len)")
    generators = row_generators(row_seeds or [cfg.seed + i for i in range(prompt.shape[0])], prompt.device)
    cache = KVCache(model, prompt.shape[0], total, model.output.weight.dtype, prompt.device) if cfg.kv_cache else None
    tokens, new = prompt, prompt
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for _ in range(cfg.max_new_tokens):
        logits = cached_last_logits(model, new, cache) if cache is not None else model(tokens)[:, -1]
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            logits[:, vocab_limit:] = float("-inf")
        new = sample_next(logits, cfg.temperature, cfg.top_k, generators)[:, None]
        if eos_id is not None and cfg.stop_at_eos:
            new = torch.where(done[:, None], torch.full_like(new, eos_id), new)
            done |= new[:, 0] == eos_id
        tokens = torch.cat([tokens, new], dim=1)
        if eos_id is not None and cfg.stop_at_eos and bool(done.all()):
            break
    if tokens.shape[1] < total:  # stopped early: every sample ended, pad with EOS
        tokens = F.pad(tokens, (0, total - tokens.shape[1]), value=eos_id)
    return tokens


def generate_batch(model: torch.nn.Module, prompts: list[list[int]], cfg: ARSamplerConfig, *, eos_id: int | None = None,
                   vocab_limit: int | None = None, device: torch.device | str = "cpu") -> list[list[int]]:
    """Continuations of prompts of any lengths (cut before EOS when ``cfg.stop_at_eos``), the AR twin of
    :func:`dlm_titan.sampling.generate`: prompts of one length run as one batch, prompt i samples with seed
    ``cfg.seed + i``, so its continuation does not depend on the other prompts."""
    out: list[list[int]] = [[] for _ in prompts]
    for plen, rows in group_by_length(prompts).items():
        prompt = torch.tensor([prompts[i] for i in rows], dtype=torch.long, device=device)
        x = generate(model, prompt, cfg, eos_id, row_seeds=[cfg.seed + i for i in rows], vocab_limit=vocab_limit)
        for i, seq in zip(rows, x[:, plen:].tolist(), strict=True):
            out[i] = truncate_at_eos(seq, eos_id) if cfg.stop_at_eos else seq
    return out
