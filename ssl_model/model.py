"""A decoder-style transformer in two layouts (GPT-2 and Llama), read top to bottom.

The same weights run causally (next-token prediction) or bidirectionally (masked-LM,
contrastive): attention is PyTorch's ``scaled_dot_product_attention`` with ``is_causal`` set
per call.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_model.config import ModelConfig

GPTConfig = ModelConfig  # the name earlier checkpoints and callers use


def rope_tables(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, head_dim) in the rotate-half layout that Hugging Face's Llama uses."""
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device=device)
                                         / cfg.head_dim)
    freqs = torch.outer(torch.arange(cfg.block_size, dtype=torch.float32, device=device), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat((-x2, x1), dim=-1) * sin.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg, bias = cfg, cfg.arch == "gpt2"
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim, bias=bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=bias)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, causal: bool, rope) -> torch.Tensor:
        B, T, C = x.shape
        c = self.cfg
        q, k, v = self.qkv(x).split([c.n_head * c.head_dim, c.kv_heads * c.head_dim, c.kv_heads * c.head_dim], -1)
        q = q.view(B, T, c.n_head, c.head_dim)
        k, v = k.view(B, T, c.kv_heads, c.head_dim), v.view(B, T, c.kv_heads, c.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=c.dropout if self.training else 0.0,
                                           enable_gqa=c.kv_heads != c.n_head)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    """GELU (tanh) MLP for gpt2; SwiGLU for llama, gate and up projections in one matrix."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.arch == "llama"
        self.up = nn.Linear(cfg.n_embd, (2 if self.swiglu else 1) * cfg.hidden, bias=not self.swiglu)
        self.down = nn.Linear(cfg.hidden, cfg.n_embd, bias=not self.swiglu)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = self.up(x).chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(self.up(x), approximate="tanh")
        return self.drop(self.down(h))


def norm(cfg: ModelConfig) -> nn.Module:
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps) if cfg.arch == "gpt2" else nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = norm(cfg), Attention(cfg), norm(cfg), MLP(cfg)

    def forward(self, x: torch.Tensor, causal: bool, rope) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), causal, rope)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.arch == "gpt2" else None
        if cfg.arch == "llama":
            cos, sin = rope_tables(cfg)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def num_params(self, non_embedding: bool = False) -> int:
        """All parameters (tied ones once); ``non_embedding`` leaves out position embeddings,
        as the 6N FLOPs-per-token estimate counts them."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding and self.wpe is not None else n

    def hidden(self, idx: torch.Tensor, causal: bool = True) -> torch.Tensor:
        """Final-normalised hidden states (B, T, n_embd)."""
        T = idx.size(1)
        if T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.cfg.block_size}")
        x = self.wte(idx)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device))
        else:
            rope = (self.rope_cos[:T], self.rope_sin[:T])
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, causal, rope)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, causal: bool = True):
        """Logits (B, T, vocab) and, given targets, the mean cross-entropy over targets != -100."""
        logits = self.lm_head(self.hidden(idx, causal))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, new_tokens: int, temperature: float = 1.0, top_k: int | None = 50,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample ``new_tokens`` after ``idx`` (B, T); greedy when temperature is 0."""
        for _ in range(new_tokens):
            logits = self(idx[:, -self.cfg.block_size:])[0][:, -1, :].float()
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, -1).cpu(), 1, generator=generator).to(idx.device)
            idx = torch.cat((idx, nxt), dim=1)
        return idx
