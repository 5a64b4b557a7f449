"""Configuration of a dlm_titan masked diffusion language model (SMDM's TransEncoder) for Hugging Face transformers.

Standalone: needs only torch and transformers. Written into every exported model folder by dlm_titan.
"""

from transformers import PretrainedConfig


class DlmTitanConfig(PretrainedConfig):
    """Shape of a bidirectional LLaMA encoder trained as a masked diffusion language model.

    ``vocab_size`` counts the ids the input may hold, as in transformers: the tokenizer's vocabulary plus, for a
    diffusion model, the mask token at ``mask_token_id = vocab_size - 1``, which the head never predicts. The head
    has ``output_vocab_size`` outputs (vocab_size - 1 for a diffusion model, vocab_size for a causal one).

    Args:
        vocab_size: input vocabulary (embedding rows), the mask token included.
        hidden_size: model width d.
        intermediate_size: SwiGLU hidden width.
        num_hidden_layers: transformer blocks.
        num_attention_heads: query heads (head size = hidden_size // num_attention_heads).
        num_key_value_heads: key/value heads (grouped-query attention); None = one per query head.
        rms_norm_eps: RMSNorm epsilon.
        rope_theta: RoPE base (GPT-NeoX half rotation over the whole head).
        max_position_embeddings: training sequence length (RoPE itself has no limit).
        causal: False for diffusion models (every token sees the whole sequence); True for the autoregressive
            baseline, which has no mask row.
        mask_token_id: id of the mask token (vocab_size - 1 for diffusion models).
    """

    model_type = "dlm_titan"

    def __init__(
        self,
        vocab_size: int = 32001,
        hidden_size: int = 768,
        intermediate_size: int = 3072,
        num_hidden_layers: int = 18,
        num_attention_heads: int = 12,
        num_key_value_heads: int | None = None,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 2048,
        causal: bool = False,
        mask_token_id: int | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.causal = causal
        self.mask_token_id = None if causal else (vocab_size - 1 if mask_token_id is None else mask_token_id)
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    @property
    def output_vocab_size(self) -> int:
        """Outputs of the head: every input id but the mask token."""
        return self.vocab_size - (0 if self.causal else 1)
