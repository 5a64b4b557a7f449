"""The 30 SMDM model sizes (``Diff_LLaMA_*`` in SMDM's lit_gpt/config.py) and their parameter counts."""

from __future__ import annotations

from dataclasses import dataclass

from dlm_titan.errors import UserError


@dataclass(frozen=True)
class ModelArgs:
    """Shape of a TransEncoder. head_dim = dim // n_heads; the embedding has vocab_size + 1 rows (mask).

    ``n_kv_heads`` < ``n_heads`` gives grouped-query attention (Llama-family checkpoints): query head h reads
    key/value head ``h // (n_heads // n_kv_heads)``; 0 (SMDM's flavors) means one key/value head per query head.
    """

    n_layers: int
    n_heads: int
    dim: int
    ffn_dim: int
    vocab_size: int = 32000
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    n_kv_heads: int = 0

    def __post_init__(self) -> None:
        kv = self.kv_heads
        # n_heads and dim come from checkpoints' and config.json files too: 0 or less is refused here, before it
        # divides anything.
        if min(self.n_layers, self.n_heads, self.dim, self.ffn_dim, self.vocab_size) < 1:
            raise UserError(f"model shape: n_layers {self.n_layers}, n_heads {self.n_heads}, dim {self.dim}, "
                            f"ffn_dim {self.ffn_dim} and vocab_size {self.vocab_size} must all be >= 1")
        if self.dim % self.n_heads or kv < 1 or self.n_heads % kv or self.head_dim % 2:
            raise UserError(f"model shape: dim {self.dim}, {self.n_heads} heads and {kv} key/value heads need "
                            "dim divisible by n_heads into an even head size, and n_heads divisible by n_kv_heads")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``n_kv_heads``, or ``n_heads`` when that is 0 (multi-head attention)."""
        return self.n_kv_heads or self.n_heads

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    def non_embedding_params(self) -> int:
        """N of SMDM's FLOPs rule: attention, SwiGLU and the two RMSNorms per block, plus the final norm.
        Attention is 4 d^2 with one key/value head per query head, d (2 d + 2 kv_dim) under grouped queries."""
        d, kv_dim = self.dim, self.kv_heads * self.head_dim
        return self.n_layers * (2 * d * d + 2 * d * kv_dim + 3 * d * self.ffn_dim + 2 * d) + d

    def embedding_params(self, mask_row: bool = True) -> int:
        """Input embedding (vocab + 1 rows, the extra one is the mask token; vocab rows without ``mask_row``, as the
        autoregressive baseline has) and the untied output head."""
        return (self.vocab_size + int(mask_row)) * self.dim + self.vocab_size * self.dim

    def total_params(self, mask_row: bool = True) -> int:
        """Every parameter; ``mask_row=False`` for the autoregressive baseline (no mask-token embedding row)."""
        return self.non_embedding_params() + self.embedding_params(mask_row)


# name: (n_layers, n_heads, dim, ffn_dim), exactly SMDM's table.
_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "6M": (6, 4, 256, 1024),
    "19M": (8, 6, 384, 1536),
    "34M": (8, 8, 512, 2048),
    "48M": (9, 9, 576, 2304),
    "66M": (10, 10, 640, 2560),
    "85M": (13, 10, 640, 2560),
    "75M": (16, 8, 640, 1600),
    "113M": (12, 12, 768, 3072),
    "142M": (15, 12, 768, 3072),
    "170M": (18, 12, 768, 3072),
    "180M": (14, 14, 896, 3584),
    "206M": (16, 14, 896, 3584),
    "231M": (18, 14, 896, 3584),
    "268M": (16, 16, 1024, 4096),
    "302M": (18, 16, 1024, 4096),
    "336M": (20, 16, 1024, 4096),
    "472M": (18, 10, 1280, 5120),
    "551M": (21, 10, 1280, 5120),
    "571M": (18, 11, 1408, 5632),
    "629M": (24, 10, 1280, 5120),
    "666M": (21, 11, 1408, 5632),
    "717M": (19, 12, 1536, 6144),
    "761M": (24, 11, 1408, 5632),
    "831M": (22, 12, 1536, 6144),
    "944M": (25, 12, 1536, 6144),
    "1028M": (20, 14, 1792, 7168),
    "1233M": (24, 14, 1792, 7168),
    "1476M": (22, 16, 2048, 8192),
    "1678M": (25, 16, 2048, 8192),
    "2121M": (28, 17, 2176, 8704),
}
ALIASES = {"1B": "1028M"}
FLAVORS = tuple(_SHAPES)


def get_model_args(flavor: str, vocab_size: int = 32000) -> ModelArgs:
    """Returns the shape of an SMDM flavor ("6M" ... "2121M", or the alias "1B")."""
    name = ALIASES.get(flavor, flavor)
    if name not in _SHAPES:
        raise UserError(f"unknown model flavor {flavor!r}; choose one of {', '.join(FLAVORS)} (or 1B)")
    n_layers, n_heads, dim, ffn_dim = _SHAPES[name]
    return ModelArgs(n_layers, n_heads, dim, ffn_dim, vocab_size=vocab_size)
