"""Memory-mapped token shards (as the tokenize stage writes them) and batches over them.

Training batches come from ``Batches``: the split is cut into windows of T+1 tokens (stride T),
visited in a seeded random order without replacement, a new order every epoch. A global batch
of ``world * batch_size`` windows is cut into contiguous per-rank parts, so N ranks see exactly
the windows one process would see with an N-times larger batch. Its position is a small state
dict saved in checkpoints: a reloaded loader yields the same next batches.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


class TokenShards:
    """The token files of one split, memory-mapped; ``meta.json`` gives dtype and shard list."""

    def __init__(self, folder: str | Path, split: str):
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"no token shards at {self.folder} (meta.json missing)")
        self.meta = json.loads(meta_path.read_text())
        if split not in self.meta["splits"]:
            raise KeyError(f"split {split!r} not in {meta_path}")
        dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self.shards = [np.memmap(self.folder / s["path"], dtype=dtype, mode="r")
                       for s in self.meta["splits"][split]["shards"] if s["tokens"] > 0]
        self.split = split
        self.tokens = sum(len(s) for s in self.shards)

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    def _check(self, T: int) -> None:
        if not self.shards or max(len(s) for s in self.shards) < T + 1:
            raise ValueError(f"{self.split} split has {self.tokens} tokens: too few for windows of "
                             f"{T} (+1) tokens; lower train.block_size or add data")

    def fixed_batches(self, batch_size: int, T: int, max_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive non-overlapping windows from the start of the split: the same set at every evaluation.

        If the split is shorter than one window, the window is shortened to fit.
        """
        T = min(T, max(len(s) for s in self.shards) - 1) if self.shards else T
        self._check(T)
        windows = [torch.from_numpy(s[i:i + T + 1].astype(np.int64))
                   for s in self.shards for i in range(0, len(s) - T, T)]
        windows = windows[:batch_size * max_batches]
        batches = []
        for i in range(0, len(windows), batch_size):
            xy = torch.stack(windows[i:i + batch_size])
            batches.append((xy[:, :-1], xy[:, 1:]))
        return batches


class Batches:
    """Deterministic training batches over ``shards``: see the module docstring."""

    def __init__(self, shards: TokenShards, T: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        shards._check(T)
        self.shards, self.T, self.batch_size, self.seed, self.rank, self.world = shards, T, batch_size, seed, rank, world
        counts = np.array([(len(s) - 1) // T for s in shards.shards], dtype=np.int64)
        self.starts = np.concatenate(([0], np.cumsum(counts)))   # first global window of each shard
        self.windows = int(self.starts[-1])
        if self.windows < world * batch_size:
            raise ValueError(f"{shards.split} split has {self.windows} windows of {T} tokens, fewer than one "
                             f"global batch ({world} x {batch_size}); lower the batch size or add data")
        self.epoch, self.pos = 0, 0
        self._order()

    def _order(self) -> None:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.order = torch.randperm(self.windows, generator=gen).numpy()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "windows": self.windows}

    def load_state_dict(self, state: dict) -> None:
        if (state["seed"], state["windows"]) != (self.seed, self.windows):
            raise ValueError(f"loader state is for seed {state['seed']} over {state['windows']} windows, "
                             f"not seed {self.seed} over {self.windows}: the token shards or seed changed")
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order()

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of the next global batch: inputs and next-token targets (B, T)."""
        step = self.world * self.batch_size
        if self.pos + step > self.windows:   # the epoch's remainder is dropped
            self.epoch, self.pos = self.epoch + 1, 0
            self._order()
        mine = self.order[self.pos + self.rank * self.batch_size:self.pos + (self.rank + 1) * self.batch_size]
        self.pos += step
        rows = []
        for w in mine.tolist():
            k = int(np.searchsorted(self.starts, w, side="right")) - 1
            start = (w - int(self.starts[k])) * self.T
            rows.append(torch.from_numpy(self.shards.shards[k][start:start + self.T + 1].astype(np.int64)))
        xy = torch.stack(rows)
        return xy[:, :-1], xy[:, 1:]
