"""Checkpoints: model, optimizer, step and configs in one file, written atomically, loaded with weights_only."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def save_checkpoint(path: str | Path, *, model, optimizer, step: int, model_config: dict,
                    train_config: dict, rng_state: torch.Tensor | None = None, metrics: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict() if optimizer else None,
             "step": step, "model_config": model_config, "train_config": train_config,
             "rng_state": rng_state, "metrics": metrics or {}}
    try:
        torch.save(state, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    return torch.load(path, map_location=map_location, weights_only=True)


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint with the highest step in ``folder`` (files named ``step-NNNNNNN.pt``)."""
    found = sorted(Path(folder).glob("step-*.pt")) if Path(folder).is_dir() else []
    return found[-1] if found else None


def load_model(path: str | Path, map_location: str | torch.device = "cpu"):
    """The GPT stored in a checkpoint, in eval mode."""
    from ssl_model.model import GPT, GPTConfig
    ckpt = load_checkpoint(path, map_location)
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.eval()
