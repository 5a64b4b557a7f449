"""A dlm_titan masked diffusion language model (SMDM's TransEncoder) for Hugging Face transformers.

Standalone: needs only torch and transformers (and numpy, which transformers requires). Written into every exported
model folder by dlm_titan, with configuration_dlm_titan.py and diffusion_rule.py (the sampler's reveal rule, the very
module dlm_titan.sampling uses); the maths is dlm_titan's (dlm_titan/models), written out plainly:

    embedding (vocab_size rows, the last one the mask token)
    -> num_hidden_layers x [h = x + attention(rmsnorm(x)); out = h + swiglu(rmsnorm(h))]
    -> rmsnorm -> head (vocab_size - 1 outputs, untied: the mask token is never predicted)

Attention is bidirectional (no causal mask: a diffusion model sees the whole sequence), through
``torch.nn.functional.scaled_dot_product_attention``, with rotary embeddings (GPT-NeoX half rotation over the whole
head) on queries and keys. RMSNorm and the rotary tables are computed in float32 and rounded to the weights' dtype.

Generation: :meth:`DlmTitanForMaskedLM.generate_diffusion` runs the reverse process (SMDM's samplers, the rule of
dlm_titan.sampling); ``generate()`` (autoregressive decoding) does not apply to a diffusion model.

The autoregressive baseline (``config.causal``: trained with ``training.objective = "ar"``, no mask row) applies the
causal mask in every attention layer and loads as ``AutoModelForCausalLM`` (:class:`DlmTitanForCausalLM`): next-token
logits and transformers' ``generate()`` (without a key/value cache: each step recomputes the prefix).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput, MaskedLMOutput

from .configuration_dlm_titan import DlmTitanConfig
from .diffusion_rule import reveal_step, row_generators, transfer_counts


class DlmTitanRMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32, returned in x's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if x.dtype != torch.float64 else x
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(xf.dtype)
        return y.to(x.dtype)


def rotary_tables(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [seq_len, head_dim] (float32) of GPT-NeoX rotary embeddings: angle p / theta^(2i / head_dim)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, L, heads, D] rotated by position: x cos + rotate_half(x) sin, rotate_half(x) = [-x2, x1]."""
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class DlmTitanAttention(nn.Module):
    """Self-attention, bidirectional unless ``config.causal``; grouped queries when there are fewer key/value heads
    (query head h reads key/value head h // (heads / kv_heads))."""

    def __init__(self, config: DlmTitanConfig):
        super().__init__()
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // self.heads
        self.causal = config.causal
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        q = apply_rotary(self.q_proj(x).view(batch, seq_len, self.heads, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).view(batch, seq_len, self.kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(batch, seq_len, self.kv_heads, self.head_dim)
        if self.kv_heads != self.heads:
            k, v = (t.repeat_interleave(self.heads // self.kv_heads, dim=2) for t in (k, v))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=self.causal)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq_len, -1))


class DlmTitanMLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x)."""

    def __init__(self, config: DlmTitanConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DlmTitanBlock(nn.Module):
    """Pre-norm block: h = x + attention(norm(x)); out = h + mlp(norm(h))."""

    def __init__(self, config: DlmTitanConfig):
        super().__init__()
        self.input_layernorm = DlmTitanRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DlmTitanAttention(config)
        self.post_attention_layernorm = DlmTitanRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = DlmTitanMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class DlmTitanPreTrainedModel(PreTrainedModel):
    config_class = DlmTitanConfig
    base_model_prefix = "model"
    _no_split_modules = ["DlmTitanBlock"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        """Weights a checkpoint lacks (none in an export): N(0, sqrt(2 / (5 d))) as SMDM initialises most weights."""
        std = (2 / (5 * self.config.hidden_size)) ** 0.5
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, std)
        elif isinstance(module, DlmTitanRMSNorm):
            nn.init.ones_(module.weight)


class DlmTitanModel(DlmTitanPreTrainedModel):
    """The encoder: token ids -> final-norm hidden states [B, L, hidden_size]."""

    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]  # AutoModel on a folder of the masked-LM model

    def __init__(self, config: DlmTitanConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)  # the last row: the mask token
        self.layers = nn.ModuleList(DlmTitanBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = DlmTitanRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                return_dict: bool | None = None, **kwargs) -> BaseModelOutput:
        """``attention_mask`` must be None or all ones: the model was trained on packed sequences without
        padding, so a padded batch would change what every token sees; batch prompts of equal length."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("dlm_titan models take no padding (attention_mask must be all ones); "
                             "batch sequences of equal length")
        x = self.embed_tokens(input_ids)
        cos, sin = rotary_tables(input_ids.shape[1], self.config.hidden_size // self.config.num_attention_heads,
                                 self.config.rope_theta, input_ids.device)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return BaseModelOutput(last_hidden_state=self.norm(x))


class DlmTitanForMaskedLM(DlmTitanPreTrainedModel):
    """The encoder and its head: logits [B, L, output_vocab_size] for every position (the mask id is never
    predicted).

    ``labels`` (optional, -100 = ignored) gives the mean cross-entropy over the labelled positions; the diffusion
    training loss additionally weights each masked token by 1 / p(t), see dlm_titan.
    """

    def __init__(self, config: DlmTitanConfig):
        super().__init__(config)
        # A causal model here would give next-token logits under a masked-LM head whose labels are not shifted:
        # a loss that means nothing, without a word.
        if config.causal:
            raise ValueError("this is an autoregressive model (causal = true): load it with AutoModelForCausalLM")
        self.model = DlmTitanModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.output_vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, return_dict: bool | None = None, **kwargs) -> MaskedLMOutput:
        logits = self.lm_head(self.model(input_ids, attention_mask=attention_mask).last_hidden_state)
        loss = None if labels is None else F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                                                           ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def generate_diffusion(
        self,
        input_ids: torch.Tensor,
        length: int = 128,
        steps: int = 64,
        block_length: int = 0,
        algorithm: str = "confidence",
        temperature: float = 0.0,
        cfg_scale: float = 0.0,
        eos_token_id: int | None = None,
        stop_at_eos: bool = True,
        seed: int = 0,
        row_seeds: list[int] | None = None,
        vocab_limit: int | None = None,
    ) -> torch.Tensor:
        """The reverse process: ``length`` tokens generated after each row of ``input_ids`` [B, P] (one length).

        The canvas ``[prompt, mask x length]`` is filled block by block (``block_length``; 0 = one block), with
        ``steps`` forward passes per block. Each pass draws a token for every masked position of the block
        (Gumbel-max in float64; temperature 0 = argmax) and reveals some: ``"confidence"`` the most probable,
        floor(n (i + 1) / steps) - floor(n i / steps) of them at step i; ``"stochastic"`` each with probability
        1 - s/t from t to s on linspace(1, 0, steps + 1). ``cfg_scale`` > 0 = unsupervised classifier-free
        guidance (the unconditional pass sees the prompt masked). With ``stop_at_eos`` and an ``eos_token_id``,
        blocks after the one where every row produced EOS are skipped and everything after EOS becomes EOS.
        Row r draws its noise from ``row_seeds[r]`` (default ``seed + r``), independently of the batch.

        Returns:
            [B, P + length] token ids: the prompt, then the generated tokens.
        """
        _check_sampler_options(self.config.causal, length, steps, block_length, algorithm)
        block = block_length or length
        mask_id = self.config.mask_token_id
        batch, plen = input_ids.shape
        x = torch.cat([input_ids, input_ids.new_full((batch, length), mask_id)], dim=1)
        prompt = torch.zeros_like(x, dtype=torch.bool)
        prompt[:, :plen] = True
        gens = row_generators(row_seeds or [seed + r for r in range(batch)], x.device)
        times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
        counts = transfer_counts(block, steps)
        stop = stop_at_eos and eos_token_id is not None
        for b in range(length // block):
            span = slice(plen + b * block, plen + (b + 1) * block)
            for i in range(steps):
                logits = self._guided_logits(x, prompt, cfg_scale)[:, span]
                if vocab_limit is not None and vocab_limit < logits.shape[-1]:
                    logits[..., vocab_limit:] = float("-inf")
                x[:, span] = reveal_step(x[:, span], logits, mask_id, algorithm, temperature, times[i], times[i + 1],
                                         counts[i], gens)
            if stop and bool((x[:, plen:] == eos_token_id).any(dim=1).all()):
                break
        if stop:  # everything after a row's first EOS becomes EOS
            x[:, plen:] = torch.where(x[:, plen:].eq(eos_token_id).cumsum(dim=1) > 0, eos_token_id, x[:, plen:])
        return x

    def _guided_logits(self, x: torch.Tensor, prompt: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """float32 logits of the canvas; with guidance, uncond + (cfg + 1)(cond - uncond) in one batched pass."""
        if cfg_scale <= 0:
            return self(x).logits.float()
        uncond = torch.where(prompt, torch.full_like(x, self.config.mask_token_id), x)
        cond_logits, uncond_logits = self(torch.cat([x, uncond])).logits.float().chunk(2)
        return uncond_logits + (cfg_scale + 1.0) * (cond_logits - uncond_logits)


class DlmTitanForCausalLM(DlmTitanPreTrainedModel, GenerationMixin):
    """The autoregressive baseline (``config.causal``): causal encoder and head, logits [B, L, vocab_size] of the
    next token at every position; ``generate()`` works (no key/value cache).

    ``labels`` (optional, -100 = ignored) gives the mean next-token cross-entropy, labels shifted inside as in
    transformers' causal language models (position i predicts labels[i + 1]).
    """

    def __init__(self, config: DlmTitanConfig):
        super().__init__(config)
        if not config.causal:
            raise ValueError("this is a masked diffusion model (causal = false): load it with AutoModelForMaskedLM")
        self.model = DlmTitanModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.output_vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() recomputes the prefix: the layers keep no cache

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                                      **kwargs) -> dict:
        return {"input_ids": input_ids, "attention_mask": attention_mask}  # the whole prefix, every step

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, return_dict: bool | None = None, **kwargs) -> CausalLMOutput:
        logits = self.lm_head(self.model(input_ids, attention_mask=attention_mask).last_hidden_state)
        loss = None if labels is None else F.cross_entropy(logits[:, :-1].float().flatten(0, 1),
                                                           labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)


def _check_sampler_options(causal: bool, length: int, steps: int, block_length: int, algorithm: str) -> None:
    """ValueError naming what does not fit (the same rules as dlm_titan.sampling.SamplerConfig)."""
    if causal:
        raise ValueError("this is an autoregressive model (causal = true): use generate()")
    if algorithm not in ("confidence", "stochastic"):
        raise ValueError(f"algorithm must be 'confidence' or 'stochastic', not {algorithm!r}")
    block = block_length or length
    if length < 1 or steps < 1 or length % block or (algorithm == "confidence" and steps > block):
        raise ValueError(f"need length ({length}) a multiple of block_length ({block}), steps >= 1, and for "
                         f"confidence sampling steps ({steps}) <= block_length")
