"""The self-supervised objectives, each a module around the model (so DDP and torch.compile wrap
the whole loss computation).

Every objective works in two steps:
  ``prepare(x, y, gen)``  builds one micro-batch from token windows and says how many units the
                          loss is summed over (target tokens, masked tokens or pairs);
  ``forward(**batch)``    returns the loss *summed* over those units.
The trainer divides by the count over all micro-batches (and ranks) of a step, so the loss is
normalised by valid units across gradient accumulation, whatever each micro-batch holds.
``evaluate(batches)`` gives the validation metrics on fixed windows.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_model.config import MASK
from ssl_model.model import GPT

IGNORE = -100


class LinearCrossEntropy(torch.autograd.Function):
    """``F.cross_entropy(h @ w.T, y, reduction="sum")`` and its gradients, computed in the forward
    pass a block of rows at a time: the (tokens x vocab) logits, their log-softmax and gradient
    are never held whole. Without autocast only (the logits are in ``h``'s dtype)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        rows = max(64, (1 << 22) // w.size(0))       # 16 MB of fp32 logits per block
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h, grad_w = torch.empty_like(h), torch.zeros_like(w)
        for i in range(0, len(h), rows):
            hb, yb = h[i:i + rows], y[i:i + rows]
            logp = torch.log_softmax(hb @ w.T, dim=-1)
            loss -= logp.gather(1, yb[:, None]).sum()
            p = logp.exp_()                             # the gradient: softmax - one-hot
            p[torch.arange(len(yb), device=h.device), yb] -= 1
            torch.mm(p, w, out=grad_h[i:i + rows])
            grad_w.addmm_(p.T, hb)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad, grad_w * grad, None


class CausalLM(nn.Module):
    """Next-token prediction (the default). Training without autocast (fp32, as on CPU) takes
    the loss from ``LinearCrossEntropy``, never materialising the whole logits tensor."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def prepare(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[dict, int]:
        return {"x": x, "y": y}, y.numel()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type):
            h = self.model.hidden(x).flatten(0, 1)
            return LinearCrossEntropy.apply(h, self.model.lm_head.weight, y.flatten())
        logits, _ = self.model(x)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")

    @torch.no_grad()
    def evaluate(self, batches, device, autocast) -> dict:
        total, count = 0.0, 0
        for x, y in batches:
            with autocast():
                total += self(x.to(device), y.to(device)).item()
            count += y.numel()
        loss = total / count
        return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}


class MaskedLM(nn.Module):
    """BERT-style masked-LM: ``mask_prob`` of the tokens are chosen (special tokens never);
    of those 80 % become the mask token, 10 % a random token, 10 % stay; attention is
    bidirectional and the loss covers the chosen tokens only."""

    def __init__(self, model: GPT, mask_id: int, special_ids: list[int], mask_prob: float = 0.15):
        super().__init__()
        self.model, self.mask_id, self.mask_prob = model, mask_id, mask_prob
        self.register_buffer("special", torch.tensor(sorted(set(special_ids) | {mask_id})), persistent=False)

    def prepare(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[dict, int]:
        u = torch.rand(x.shape, generator=gen)
        chosen = (u < self.mask_prob) & ~torch.isin(x, self.special.cpu())
        labels = torch.where(chosen, x, IGNORE)
        r = torch.rand(x.shape, generator=gen)
        random_tokens = torch.randint(0, self.model.cfg.vocab_size, x.shape, generator=gen)
        inputs = torch.where(chosen & (r < 0.8), self.mask_id, x)
        inputs = torch.where(chosen & (r >= 0.8) & (r < 0.9), random_tokens, inputs)
        return {"x": inputs, "y": labels}, int(chosen.sum())

    def chosen_logits(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at the chosen positions (only those go through the head) and their targets."""
        chosen = y != IGNORE
        return self.model.lm_head(self.model.hidden(x, causal=False)[chosen]).float(), y[chosen]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(*self.chosen_logits(x, y), reduction="sum")

    @torch.no_grad()
    def evaluate(self, batches, device, autocast, seed: int = 0) -> dict:
        gen = torch.Generator().manual_seed(seed)  # the same masks at every evaluation
        total, correct, count = 0.0, 0, 0
        for x, y in batches:
            batch, n = self.prepare(x, y, gen)
            with autocast():
                logits, labels = self.chosen_logits(batch["x"].to(device), batch["y"].to(device))
            total += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += int((logits.argmax(-1) == labels).sum())
            count += n
        return {"val_loss": total / max(count, 1), "val_accuracy": correct / max(count, 1)}


class Contrastive(nn.Module):
    """SimCSE-style: each passage passes the (bidirectional) model twice, dropout making two
    views; mean-pooled embeddings; InfoNCE over in-batch negatives (both directions) at
    ``temperature``. In-batch negatives are those of each rank's own micro-batch."""

    def __init__(self, model: GPT, temperature: float = 0.05):
        super().__init__()
        if model.cfg.dropout <= 0:
            raise ValueError("the contrastive objective makes its two views with dropout: set model dropout > 0 "
                             "(SimCSE uses 0.1)")
        self.model, self.temperature = model, temperature

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.hidden(x, causal=False).float().mean(dim=1), dim=-1)

    def info_nce(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sim = a @ b.T / self.temperature
        labels = torch.arange(len(a), device=a.device)
        loss = (F.cross_entropy(sim, labels, reduction="sum") + F.cross_entropy(sim.T, labels, reduction="sum")) / 2
        return loss, sim

    def prepare(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[dict, int]:
        if len(x) < 2:
            raise ValueError("the contrastive objective needs batch_size >= 2 (in-batch negatives)")
        return {"x": x}, len(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.info_nce(self.embed(x), self.embed(x))[0]

    @torch.no_grad()
    def evaluate(self, batches, device, autocast) -> dict:
        """Retrieval of a window's second half from its first half among the batch's halves."""
        total, correct, count = 0.0, 0, 0
        for x, _ in batches:
            x = x.to(device)
            half = x.size(1) // 2
            with autocast():
                a, b = self.embed(x[:, :half]), self.embed(x[:, half:])
            loss, sim = self.info_nce(a, b)
            total += loss.item()
            correct += int((sim.argmax(-1) == torch.arange(len(x), device=device)).sum())
            count += len(x)
        return {"val_loss": total / count, "val_retrieval_accuracy": correct / count,
                "val_retrieval_chance": len(batches) / count}


def make_objective(name: str, model: GPT, meta: dict, mask_prob: float, temperature: float) -> nn.Module:
    if name == "causal":
        return CausalLM(model)
    if name == "mlm":
        special = meta.get("special_tokens", {})
        if MASK not in special:
            raise ValueError("the mlm objective needs a <|mask|> token in the tokenizer: these token shards "
                             "predate it; re-run the tokenize stage")
        return MaskedLM(model, special[MASK], list(special.values()), mask_prob)
    if name == "contrastive":
        return Contrastive(model, temperature)
    raise ValueError(f"unknown objective {name!r}: choose causal, mlm or contrastive")
