"""Checkpoints: everything a bit-exact resume needs, in one file written atomically and loaded
with ``weights_only=True`` (tensors and plain Python values only, nothing unpickled).

Holds the uncompiled model's state, optimizer and scheduler states, step, the data loader's
position, every RNG state (torch CPU and CUDA, numpy, Python's ``random``, the trainer's own
generator; one set per rank under torchrun), and the model and training configs.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch


def save_checkpoint(path: str | Path, state: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
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


def init_checkpoint(source: str | Path) -> Path:
    """The checkpoint file ``init_from`` names: ``source`` itself, or the latest one in a folder."""
    path = Path(source)
    path = latest_checkpoint(path) if path.is_dir() else path
    if path is None or not path.is_file():
        raise FileNotFoundError(f"train.init_from {str(source)!r}: no checkpoint there (a step-NNNNNNN.pt file, "
                                "or a folder of them)")
    return path


def rng_state(gen: torch.Generator) -> dict:
    """This process's RNG states, as plain tensors and lists (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "generator": gen.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": [version, list(py_state), py_gauss]}


def set_rng_state(state: dict, gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["generator"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = state["python"]
    random.setstate((version, tuple(py_state), py_gauss))


def load_model(path: str | Path, map_location: str | torch.device = "cpu"):
    """The model stored in a checkpoint file, in eval mode."""
    return model_from(load_checkpoint(path, map_location))


def model_from(ckpt: dict):
    """The model of a loaded checkpoint, in eval mode."""
    from ssl_model.config import ModelConfig
    from ssl_model.model import GPT
    model = GPT(ModelConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.eval()
