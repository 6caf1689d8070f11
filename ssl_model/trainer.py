"""The training loop: AdamW, warmup + cosine LR, gradient clipping, periodic validation and checkpoints.

Reports through ``callback(kind, step, metrics)`` with kind in {"train", "eval", "checkpoint"};
it knows nothing of Prefect or MLflow. A run finds the latest checkpoint in its folder and
resumes from it, so a retried training continues instead of starting over.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from ssl_model.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ssl_model.data import TokenShards
from ssl_model.model import GPT, GPTConfig

Callback = Callable[[str, int, dict], None]


@dataclass
class TrainSettings:
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_batches: int = 10
    checkpoint_interval: int = 250
    seed: int = 1337
    device: str = "auto"
    threads: int | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device is {name!r} but CUDA is not available on this machine "
                           "(use 'auto' or 'cpu')")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise RuntimeError(f"train.device is {name!r} but this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``min_lr`` at ``max_steps``."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = min(1.0, (step - s.warmup_steps) / max(1, s.max_steps - s.warmup_steps))
    return s.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (s.lr - s.min_lr)


def make_optimizer(model: torch.nn.Module, s: TrainSettings, device: torch.device) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


@torch.no_grad()
def evaluate(model: GPT, batches, device: torch.device, autocast) -> float:
    """Mean next-token loss over the fixed validation batches, weighted by tokens."""
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        with autocast():
            _, loss = model(x.to(device), y.to(device))
        total += loss.item() * y.numel()
        count += y.numel()
    model.train()
    return total / count


def train(model_cfg: GPTConfig, s: TrainSettings, shards_dir: str | Path, out_dir: str | Path,
          callback: Callback | None = None) -> dict:
    """Train (or resume) a GPT on the token shards; returns final metrics and the last checkpoint path."""
    callback = callback or (lambda kind, step, metrics: None)
    out_dir = Path(out_dir)
    device = resolve_device(s.device)
    if s.threads:
        torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    train_data, val_data = TokenShards(shards_dir, "train"), TokenShards(shards_dir, "val")
    if model_cfg.vocab_size < train_data.vocab_size:
        raise ValueError(f"model vocab_size {model_cfg.vocab_size} < tokenizer's {train_data.vocab_size}")
    T = model_cfg.block_size
    val_batches = val_data.fixed_batches(s.batch_size, T, s.eval_batches)

    model = GPT(model_cfg).to(device)
    opt = make_optimizer(model, s, device)
    gen = torch.Generator().manual_seed(s.seed)
    step = 0
    resume = latest_checkpoint(out_dir)
    if resume is not None:
        ckpt = load_checkpoint(resume, map_location=device)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["rng_state"])
        step = ckpt["step"]
        callback("resume", step, {"checkpoint": str(resume)})
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" \
        else contextlib.nullcontext

    def checkpoint(metrics: dict) -> Path:
        path = save_checkpoint(out_dir / f"step-{step:07d}.pt", model=model, optimizer=opt, step=step,
                               model_config=model_cfg.to_dict(), train_config=asdict(s),
                               rng_state=gen.get_state(), metrics=metrics)
        callback("checkpoint", step, {"path": str(path)})
        return path

    val_loss = evaluate(model, val_batches, device, autocast) if step == 0 else None
    if val_loss is not None:
        callback("eval", 0, {"val_loss": val_loss})
    last_ckpt = resume
    model.train()
    t_last, tokens_since = time.perf_counter(), 0
    while step < s.max_steps:
        lr = lr_at(step, s)
        for group in opt.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for _ in range(s.grad_accum):
            x, y = train_data.random_batch(s.batch_size, T, gen)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast():
                _, loss = model(x, y)
            (loss / s.grad_accum).backward()
            loss_sum += loss.item() / s.grad_accum
            tokens_since += y.numel()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip) if s.grad_clip > 0 \
            else torch.tensor(float("nan"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        now = time.perf_counter()
        callback("train", step, {"loss": loss_sum, "lr": lr, "grad_norm": float(grad_norm),
                                 "tokens_per_s": tokens_since / max(now - t_last, 1e-9)})
        t_last, tokens_since = now, 0
        if step % s.eval_interval == 0 or step == s.max_steps:
            val_loss = evaluate(model, val_batches, device, autocast)
            callback("eval", step, {"val_loss": val_loss})
            t_last = time.perf_counter()
        if step % s.checkpoint_interval == 0 or step == s.max_steps:
            last_ckpt = checkpoint({"val_loss": val_loss, "train_loss": loss_sum})
            t_last = time.perf_counter()
    if val_loss is None:  # resumed from the final checkpoint: nothing left to train
        val_loss = evaluate(model, val_batches, device, autocast)
    return {"val_loss": val_loss, "steps": step, "checkpoint": str(last_ckpt), "params": model.num_params(),
            "device": str(device), "val_tokens": sum(y.numel() for _, y in val_batches)}
