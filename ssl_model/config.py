"""Model shapes: one dataclass for both layouts, and named presets from a CPU-test size to GPT-2 124M."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Literal

EOT, MASK = "<|endoftext|>", "<|mask|>"  # the tokenizer's special tokens (end of document, mask for mlm)


@dataclass
class ModelConfig:
    """``arch="gpt2"``: learned positions, LayerNorm, GELU MLP, biases (GPT-2's layout).
    ``arch="llama"``: RoPE, RMSNorm, SwiGLU MLP, no biases, optional QK-norm and grouped KV heads."""
    vocab_size: int
    arch: Literal["gpt2", "llama"] = "gpt2"
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    n_kv_head: int | None = None        # llama: key/value heads (None: n_head)
    mlp_hidden: int | None = None       # None: 4*n_embd (gpt2), 8/3*n_embd rounded up to 64 (llama)
    dropout: float = 0.0
    tie_embeddings: bool = True
    qk_norm: bool = False               # llama: RMSNorm of queries and keys per head (as Qwen3)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.arch not in ("gpt2", "llama"):
            raise ValueError(f"model arch must be 'gpt2' or 'llama', not {self.arch!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} must be divisible by n_head {self.n_head}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head {self.n_head} must be divisible by n_kv_head {self.kv_heads}")
        if self.arch == "gpt2" and (self.qk_norm or self.kv_heads != self.n_head):
            raise ValueError("qk_norm and n_kv_head apply to arch 'llama' only")
        if self.arch == "llama" and (self.n_embd // self.n_head) % 2:
            raise ValueError("RoPE needs an even head size (n_embd / n_head)")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        return 4 * self.n_embd if self.arch == "gpt2" else -(-8 * self.n_embd // 3 // 64) * 64

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model settings: {sorted(unknown)}")
        return cls(**d)


# name -> shape; vocab_size comes from the tokenizer. "gpt2-124m" is GPT-2 small (with vocab 50257).
PRESETS: dict[str, dict] = {
    "test": dict(n_layer=2, n_head=2, n_embd=64, block_size=64),
    "tiny": dict(n_layer=4, n_head=4, n_embd=256, block_size=256),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=512),
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
}


def preset(name: str, vocab_size: int, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(ModelConfig(vocab_size=vocab_size, **PRESETS[name]), **overrides)
