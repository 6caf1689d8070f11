"""Memory-mapped token shards (as the tokenize stage writes them) and batches over them."""

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

    def random_batch(self, batch_size: int, T: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` windows at random offsets (shards weighted by size): inputs and next-token targets."""
        self._check(T)
        weights = torch.tensor([max(len(s) - T, 0) for s in self.shards], dtype=torch.float64)
        which = torch.multinomial(weights, batch_size, replacement=True, generator=gen).tolist()
        rows = []
        for k in which:
            start = int(torch.randint(0, len(self.shards[k]) - T, (1,), generator=gen))
            rows.append(torch.from_numpy(self.shards[k][start:start + T + 1].astype(np.int64)))
        xy = torch.stack(rows)
        return xy[:, :-1], xy[:, 1:]

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
