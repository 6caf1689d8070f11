"""The training loop: one of three objectives, AdamW (or Muon), warmup + cosine or WSD schedule,
gradient accumulation, clipping, bf16 autocast and fused AdamW on CUDA, optional torch.compile,
a NaN/loss-spike guard, validation, sample generations, checkpoints for bit-exact resume,
and torchrun DDP.

Reports through ``callback(kind, step, metrics)`` with kind in {"init", "resume", "train", "eval",
"sample", "skip", "checkpoint"}; it knows nothing of Prefect or MLflow. A run finds the latest
checkpoint in its folder and resumes from it, so a retried training continues where it stopped.
With ``init_from`` a new run starts from another run's weights (continued pretraining, or a
contrastive run on a pretrained encoder, as SimCSE does) instead of random ones.

Under torchrun (``WORLD_SIZE`` set) each rank trains on its part of every global batch; only
rank 0 reports and writes checkpoints.  Run ``python -m ssl_model.trainer --help`` for the CLI.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import resource
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.distributed as dist

from ssl_model.checkpoint import (init_checkpoint, latest_checkpoint, load_checkpoint, rng_state, save_checkpoint,
                                  set_rng_state)
from ssl_model.config import ModelConfig
from ssl_model.data import Batches, TokenShards
from ssl_model.model import GPT
from ssl_model.objectives import make_objective

Callback = Callable[[str, int, dict], None]


SPIKE_FLOOR = 0.5   # nats: the least recent average a spike is measured against


@dataclass
class TrainSettings:
    objective: Literal["causal", "mlm", "contrastive"] = "causal"
    mask_prob: float = 0.15          # mlm
    temperature: float = 0.05        # contrastive
    batch_size: int = 16             # sequences per micro-batch, per rank
    grad_accum: int = 1
    max_steps: int = 1000
    optimizer: Literal["adamw", "muon"] = "adamw"
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    schedule: Literal["cosine", "wsd"] = "cosine"
    decay_fraction: float = 0.2      # wsd: the last fraction of steps decays linearly to min_lr
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    spike_factor: float = 4.0        # skip a step whose loss exceeds this times the recent average (0: off)
    max_bad_steps: int = 5           # stop after this many skipped steps in a row
    eval_interval: int = 100
    eval_batches: int = 10
    sample_tokens: int = 48          # causal: tokens generated at each evaluation (0: none)
    checkpoint_interval: int = 250
    seed: int = 1337
    device: str = "auto"
    threads: int | None = None
    compile: bool = False
    bf16: bool = True                # autocast to bf16 on CUDA
    init_from: str | None = None     # a checkpoint file or folder (its latest): start from its weights

    @classmethod
    def from_dict(cls, d: dict) -> "TrainSettings":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# dense bf16 peak FLOP/s by device name (first match wins); MFU is reported only for these
PEAK_BF16 = [("GH200", 989e12), ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("B200", 2250e12),
             ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12)]


def peak_flops(device: torch.device, bf16: bool) -> float | None:
    if device.type != "cuda" or not bf16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def autocast_for(device: torch.device, bf16: bool) -> Callable[[], contextlib.AbstractContextManager]:
    """The context a forward pass runs in: bf16 autocast on CUDA when ``bf16``, else none."""
    if bf16 and device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def flops_per_token(model: GPT) -> float:
    """Training FLOPs per token as MFU counts them: 6 x the non-embedding parameters, plus
    attention's 12 x layers x width x context."""
    c = model.cfg
    return 6 * model.num_params(non_embedding=True) + 12 * c.n_layer * c.n_embd * c.block_size


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device is {name!r} but CUDA is not available on this machine "
                           "(use 'auto' or 'cpu')")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise RuntimeError(f"train.device is {name!r} but this machine has {torch.cuda.device_count()} GPU(s)")
    if dev.type == "cuda" and dev.index is None:  # plain "cuda": this rank's GPU (set_device needs an index)
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def lr_factor(step: int, s: TrainSettings) -> float:
    """Multiplier of ``lr`` at ``step``: linear warmup, then cosine decay to ``min_lr`` at
    ``max_steps``, or (wsd) stable at ``lr`` and a linear decay over the last ``decay_fraction``."""
    if step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    floor = s.min_lr / s.lr
    if s.schedule == "wsd":
        decay_start = s.max_steps - int(s.decay_fraction * s.max_steps)
        if step < decay_start:
            return 1.0
        return 1.0 - (1.0 - floor) * min(1.0, (step - decay_start) / max(1, s.max_steps - decay_start))
    progress = min(1.0, (step - s.warmup_steps) / max(1, s.max_steps - s.warmup_steps))
    return floor + 0.5 * (1 + math.cos(math.pi * progress)) * (1.0 - floor)


def make_optimizers(model: GPT, s: TrainSettings, device: torch.device) -> list[torch.optim.Optimizer]:
    """AdamW with decay on 2-D weights only; with ``muon``, Muon takes the blocks' 2-D weights
    (its update scaled to match AdamW's RMS, so ``lr`` means the same) and AdamW the rest."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon = [p for n, p in params if s.optimizer == "muon" and p.dim() == 2 and n.startswith("blocks.")]
    taken = {id(p) for p in muon}
    decay = [p for _, p in params if p.dim() >= 2 and id(p) not in taken]
    no_decay = [p for _, p in params if p.dim() < 2]
    fused = device.type in ("cuda", "cpu")
    opts: list[torch.optim.Optimizer] = [torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=s.lr, betas=(0.9, 0.95), fused=fused)]
    if muon:
        opts.append(torch.optim.Muon(muon, lr=s.lr, weight_decay=s.weight_decay, adjust_lr_fn="match_rms_adamw"))
    return opts


def tokenizer_digest(shards_dir: str | Path) -> str | None:
    """sha256 of the shards' tokenizer.json (what their token ids mean), if they have one."""
    path = Path(shards_dir) / "tokenizer.json"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def init_weights(model: GPT, source: str | Path, tokenizer_sha256: str | None) -> Path:
    """Load the weights of the checkpoint ``source`` (a file, or a folder: its latest) into ``model``,
    which must have the same shape (dropout aside) and, where both checkpoints record it, have been
    trained on token ids of the same tokenizer. Returns the checkpoint file."""
    path = init_checkpoint(source)
    ckpt = load_checkpoint(path)
    theirs, ours = ckpt["model_config"], model.cfg.to_dict()
    differ = [k for k in ours if k != "dropout" and theirs.get(k) != ours[k]]
    if differ:
        raise ValueError(f"train.init_from {path}: its model has " + ", ".join(f"{k}={theirs.get(k)}" for k in differ)
                         + "; this run's has " + ", ".join(f"{k}={ours[k]}" for k in differ)
                         + ": give train the same shape (vocab_size is the tokenizer's)")
    if ckpt.get("tokenizer_sha256") and tokenizer_sha256 and ckpt["tokenizer_sha256"] != tokenizer_sha256:
        raise ValueError(f"train.init_from {path}: it was trained on another tokenizer (tokenizer.json sha256 "
                         f"{ckpt['tokenizer_sha256'][:12]}, these token shards' {tokenizer_sha256[:12]}), so its "
                         "token ids mean other things here: tokenize with the same data and tokenize settings")
    model.load_state_dict(ckpt["model"])
    return path


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS of the process


def distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); starts the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def train(model_cfg: ModelConfig, s: TrainSettings, shards_dir: str | Path, out_dir: str | Path,
          callback: Callback | None = None) -> dict:
    """Train (or resume) on the token shards; returns final metrics and the last checkpoint path."""
    rank, world, local_rank = distributed()
    report = (callback or (lambda kind, step, metrics: None)) if rank == 0 else (lambda *a: None)
    out_dir = Path(out_dir)
    device = resolve_device(s.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if s.threads:
        torch.set_num_threads(s.threads)
    train_data, val_data = TokenShards(shards_dir, "train"), TokenShards(shards_dir, "val")
    if model_cfg.vocab_size < train_data.vocab_size:
        raise ValueError(f"model vocab_size {model_cfg.vocab_size} < tokenizer's {train_data.vocab_size}")
    T = model_cfg.block_size
    val_batches = val_data.fixed_batches(s.batch_size, T, s.eval_batches)
    # the evaluation documents, tokenized (the tokenize stage writes them when it has them): their
    # loss at every evaluation, and bits per byte, is the curve that compares trainings on other data
    heldout = train_data.meta["splits"].get("heldout", {})
    heldout_batches = (TokenShards(shards_dir, "heldout").fixed_batches(s.batch_size, T, s.eval_batches)
                       if heldout.get("tokens", 0) > T and heldout.get("bytes") and s.objective == "causal" else None)
    loader = Batches(train_data, T, s.batch_size, s.seed, rank, world)

    torch.manual_seed(s.seed)  # the same initial weights on every rank
    model = GPT(model_cfg).to(device)
    tokenizer_sha256 = tokenizer_digest(shards_dir)
    resume = latest_checkpoint(out_dir)
    if s.init_from and resume is None:
        report("init", 0, {"checkpoint": str(init_weights(model, s.init_from, tokenizer_sha256))})
    objective = make_objective(s.objective, model, train_data.meta, s.mask_prob, s.temperature).to(device)
    opts = make_optimizers(model, s, device)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: lr_factor(step, s)) for o in opts]
    gen = torch.Generator().manual_seed(s.seed + rank)   # masks (mlm); dropout uses torch's global RNG
    torch.manual_seed(s.seed + rank)
    step, bad_in_row, skipped, avg_loss = 0, 0, 0, None
    if resume is not None:
        ckpt = load_checkpoint(resume, map_location=device)
        model.load_state_dict(ckpt["model"])
        for o, st in zip(opts, ckpt["optimizers"]):
            o.load_state_dict(st)
        for sc, st in zip(scheds, ckpt["schedulers"]):
            sc.load_state_dict(st)
        loader.load_state_dict(ckpt["loader"])
        if len(ckpt["rng"]) != world:
            raise ValueError(f"{resume} was written by {len(ckpt['rng'])} rank(s); resume it with as many "
                             f"(this run has {world}) for an exact continuation")
        set_rng_state(ckpt["rng"][rank], gen)
        step, skipped, avg_loss = ckpt["step"], ckpt["skipped"], ckpt["avg_loss"]
        report("resume", step, {"checkpoint": str(resume)})

    fwd = objective
    if world > 1:
        fwd = torch.nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=s.objective == "contrastive")  # an untied head is unused there
    if s.compile:
        fwd = torch.compile(fwd)
    autocast = autocast_for(device, s.bf16)
    peak = peak_flops(device, s.bf16)
    passes = 2 if s.objective == "contrastive" else 1     # contrastive runs each passage twice
    flops = flops_per_token(model)
    tokenizer = _tokenizer(shards_dir) if s.objective == "causal" and s.sample_tokens else None

    def evaluate() -> dict:
        objective.eval()
        metrics = objective.evaluate(val_batches, device, autocast)
        if heldout_batches:
            loss = objective.evaluate(heldout_batches, device, autocast)["val_loss"]
            metrics.update(heldout_loss=loss, heldout_bpb=loss * heldout["tokens"] / heldout["bytes"] / math.log(2))
        if tokenizer is not None and rank == 0:
            prompt = val_batches[0][0][:1, :8].to(device)
            with autocast():
                out = model.generate(prompt, s.sample_tokens, temperature=0.8,
                                     generator=torch.Generator().manual_seed(s.seed))
            report("sample", step, {"text": tokenizer.decode(out[0].tolist())})
        objective.train()
        return metrics

    def checkpoint(metrics: dict) -> Path | None:
        rngs = [rng_state(gen)]
        if world > 1:
            rngs = [None] * world
            dist.all_gather_object(rngs, rng_state(gen))
        path = None
        if rank == 0:
            path = save_checkpoint(out_dir / f"step-{step:07d}.pt", {
                "model": model.state_dict(), "optimizers": [o.state_dict() for o in opts],
                "schedulers": [sc.state_dict() for sc in scheds], "loader": loader.state_dict(), "rng": rngs,
                "step": step, "skipped": skipped, "avg_loss": avg_loss, "model_config": model_cfg.to_dict(),
                "train_config": asdict(s), "metrics": metrics, "tokenizer_sha256": tokenizer_sha256})
            report("checkpoint", step, {"path": str(path)})
        if world > 1:
            dist.barrier()
        return path

    metrics = evaluate() if step == 0 else {}
    if metrics:
        report("eval", 0, metrics)
    last_ckpt = resume
    objective.train()
    t_last, tokens_since = time.perf_counter(), 0
    while step < s.max_steps:
        lr = scheds[0].get_last_lr()[0]
        micro = [objective.prepare(*loader.next(), gen) for _ in range(s.grad_accum)]
        count = float(sum(n for _, n in micro))
        if world > 1:   # the valid tokens of the global batch
            count_t = torch.tensor(count, device=device)
            dist.all_reduce(count_t)
            count = count_t.item()
        scale = world / max(count, 1.0)
        loss_sum = torch.zeros((), device=device)
        for i, (batch, _) in enumerate(micro):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            sync = world == 1 or i == len(micro) - 1
            with contextlib.nullcontext() if sync else fwd.no_sync():
                with autocast():
                    loss = fwd(**batch) * scale
                loss.backward()
            loss_sum += loss.detach()
            tokens_since += batch["x"].numel() * passes * world
        if world > 1:
            dist.all_reduce(loss_sum)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip if s.grad_clip > 0 else float("inf"))
        loss_value, grad_norm = torch.stack([loss_sum.float(), norm.float()]).tolist()  # one wait for the GPU
        loss_value /= world
        # a loss near 0 (contrastive, a late MLM) jumps several-fold on noise alone: the recent
        # average counts as at least SPIKE_FLOOR nats
        spike = s.spike_factor > 0 and avg_loss is not None and loss_value > s.spike_factor * max(avg_loss, SPIKE_FLOOR)
        if math.isfinite(loss_value) and math.isfinite(grad_norm) and not spike:
            for o in opts:
                o.step()
            bad_in_row = 0
            avg_loss = loss_value if avg_loss is None else 0.9 * avg_loss + 0.1 * loss_value
        else:
            skipped, bad_in_row = skipped + 1, bad_in_row + 1
            report("skip", step + 1, {"skipped_loss": loss_value, "skipped_grad_norm": grad_norm,
                                      "skipped_steps": skipped})
            if bad_in_row >= s.max_bad_steps:
                raise RuntimeError(
                    f"training stopped at step {step + 1}: {bad_in_row} steps in a row had a non-finite or spiking "
                    f"loss (last {loss_value:.4g}, recent average {avg_loss}, grad norm {grad_norm:.4g}); "
                    "lower train.lr, raise train.warmup_steps, or check the token shards")
        for o in opts:
            o.zero_grad(set_to_none=True)
        for sc in scheds:
            sc.step()
        step += 1
        now = time.perf_counter()
        tps = tokens_since / max(now - t_last, 1e-9)
        stats = {"loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps,
                 "peak_memory_mb": peak_memory_mb(device), "skipped_steps": skipped}
        if peak:
            stats["mfu"] = tps * flops / (peak * world)
        report("train", step, stats)
        t_last, tokens_since = now, 0
        if step % s.eval_interval == 0 or step == s.max_steps:
            metrics = evaluate()
            report("eval", step, metrics)
            t_last = time.perf_counter()
        if step % s.checkpoint_interval == 0 or step == s.max_steps:
            last_ckpt = checkpoint({**metrics, "train_loss": loss_value}) or last_ckpt
            t_last = time.perf_counter()
    if not metrics:  # resumed from the final checkpoint: nothing left to train
        metrics = evaluate()
    return {**metrics, "steps": step, "checkpoint": str(last_ckpt), "params": model.num_params(),
            "device": str(device), "world_size": world, "skipped_steps": skipped,
            "val_tokens": sum(y.numel() for _, y in val_batches)}


def _tokenizer(shards_dir: str | Path):
    from tokenizers import Tokenizer
    path = Path(shards_dir) / "tokenizer.json"
    return Tokenizer.from_file(str(path)) if path.is_file() else None


def _value(text: str):
    import json
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> None:
    """``python -m ssl_model.trainer SHARDS OUT [--preset P] [--set key=value ...]``, alone or under
    torchrun; ``key`` is a model field (ModelConfig) or a training setting (TrainSettings)."""
    import argparse
    import json

    from tqdm.auto import tqdm

    from ssl_model.config import PRESETS, preset
    ap = argparse.ArgumentParser(prog="python -m ssl_model.trainer", description=main.__doc__)
    ap.add_argument("shards", help="token shard folder (the tokenize stage's output: meta.json, *.bin)")
    ap.add_argument("out", help="checkpoint folder; a run resumes from the latest checkpoint in it")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    model_keys = {f.name for f in fields(ModelConfig)}
    train_keys = {f.name for f in fields(TrainSettings)}
    model_over, train_over = {}, {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key not in model_keys | train_keys:
            ap.error(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(model_keys | train_keys)}")
        (model_over if key in model_keys else train_over)[key] = _value(value)
    vocab = TokenShards(args.shards, "train").vocab_size
    cfg = preset(args.preset, model_over.pop("vocab_size", vocab), **model_over)
    s = TrainSettings(**train_over)
    bar = tqdm(total=s.max_steps, desc="train", unit="step", disable=int(os.environ.get("RANK", "0")) != 0)

    def progress(kind: str, step: int, m: dict) -> None:
        if kind in ("resume", "train"):
            bar.n = step
            bar.set_postfix({k: f"{v:.4g}" for k, v in m.items() if k in ("loss", "tokens_per_s", "mfu")})
        elif kind in ("init", "eval", "skip", "sample"):
            bar.write(f"step {step} {kind}: " + json.dumps(m))

    result = train(cfg, s, args.shards, args.out, progress)
    bar.close()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))
    if dist.is_initialized():
        dist.barrier()  # no rank tears gloo down while another still talks to it (an abort at exit)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
