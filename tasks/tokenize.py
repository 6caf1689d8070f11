"""Stage 6, tokenize: train a byte-level BPE tokenizer locally and write flat token shards.

Its input is the decontaminate stage's output: the documents for evaluation are already set
aside there. The rest are split into train and validation by a hash of their doc_id (stable
across runs; validation from the bottom of the range, as decontaminate holds out from the top).
The tokenizer is trained on the train split only (or given: ``tokenizer``, as an ablation's
variants share one). Both splits are written as flat little-endian token files (uint16 when the
vocabulary fits, else uint32) with an end-of-text token after every document, plus a document
index (doc_id -> shard, token range). The evaluation documents decontaminate set aside are
tokenized too, as a ``heldout`` split the model never trains on: the trainer scores them at each
evaluation (their bits per byte over training).
"""

from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm

from ssl_model.config import EOT, MASK
from tasks import tracking
from tasks.config import TokenizeConfig
from tasks.decontaminate import split_hash
from tasks.shards import (
    SortedRows,
    file_entry,
    fresh_tmp_dir,
    iter_rows,
    make_manifest,
    publish_dir,
    sha256_file,
    write_json,
)
from tasks.stage import stage_dir, stage_task

SPECIAL = [EOT, MASK]
SHARD_TOKENS = 100_000_000  # tokens per shard file


def split_of(doc_id: str, val_fraction: float, seed: int) -> str:
    """Validation from the bottom of the hash range (decontaminate holds out from its top)."""
    return "val" if split_hash(doc_id, seed) < val_fraction else "train"


def train_tokenizer(texts, vocab_size: int, min_frequency: int, length: int | None = None) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True)
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


class ShardWriter:
    """Append token arrays to ``<split>-NNNNN.bin`` files, rolling over at ``SHARD_TOKENS``."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype):
        self.folder, self.split, self.dtype = folder, split, dtype
        self.shards: list[dict] = []
        self.index: list[dict] = []
        self.f = None

    def add(self, doc_id: str, tokens: np.ndarray) -> None:
        if self.f is None or self.shards[-1]["tokens"] >= SHARD_TOKENS:
            self._open()
        shard = self.shards[-1]
        self.index.append({"doc_id": doc_id, "shard": shard["path"], "start": shard["tokens"],
                           "end": shard["tokens"] + len(tokens)})
        self.f.write(tokens.astype(self.dtype).astype(self.dtype.newbyteorder("<")).tobytes())
        shard["tokens"] += len(tokens)

    def _open(self) -> None:
        self.close()
        path = f"{self.split}-{len(self.shards):05d}.bin"
        self.f = open(self.folder / path, "wb")
        self.shards.append({"path": path, "tokens": 0})

    def close(self) -> None:
        if self.f is not None:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            self.f = None

    def finish(self) -> dict:
        self.close()
        if not self.shards:
            self._open()
            self.close()
        for s in self.shards:
            s.update(file_entry(self.folder, s["path"], 0), tokens=s["tokens"])
            del s["rows"]
        index = f"{self.split}.idx.parquet"
        pq.write_table(pa.Table.from_pylist(self.index, schema=pa.schema(
            [("doc_id", pa.string()), ("shard", pa.string()), ("start", pa.int64()), ("end", pa.int64())])),
            self.folder / index)
        return {"shards": self.shards, "index": index, "docs": len(self.index),
                "tokens": sum(s["tokens"] for s in self.shards)}


def load_tokenizer(path: str) -> Tokenizer:
    """A tokenize stage's tokenizer.json, checked to have the special tokens training needs."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"tokenize.tokenizer: no file {path}")
    tok = Tokenizer.from_file(path)
    missing = [t for t in SPECIAL if tok.token_to_id(t) is None]
    if missing:
        raise ValueError(f"tokenize.tokenizer {path} lacks the special token(s) {missing}: use one a tokenize "
                         "stage wrote")
    return tok


def tokenizer_fingerprint(ctx: dict, section: dict) -> str | None:
    """For the cache key: the given tokenizer by its content."""
    return sha256_file(section["tokenizer"]) if section.get("tokenizer") and Path(section["tokenizer"]).is_file() \
        else section.get("tokenizer")


def tokenize(cfg, docs: dict, stage_dir: str | Path) -> dict:
    """Run the tokenize stage over the decontaminate manifest ``docs``; returns its manifest."""
    t0 = time.time()
    final = Path(stage_dir)
    tmp = fresh_tmp_dir(final)
    try:
        ids = [r["doc_id"] for r in iter_rows(docs, columns=["doc_id"])]
        split = {d: split_of(d, cfg.val_fraction, cfg.seed) for d in ids}
        if len(ids) >= 2 and "val" not in split.values():   # tiny corpora: validate on one document
            split[min(ids)] = "val"
        if len(ids) >= 2 and "train" not in split.values():
            split[min(ids)] = "train"
        n_train = sum(s == "train" for s in split.values())
        # documents in doc_id order: the same documents make the same shards, however collect's
        # concurrent fetches ordered them
        rows = SortedRows(docs, "doc_id", ["text", "url", "source"], tmp / ".by-doc-id")
        train_texts = (r["text"] for r in rows if split[r["doc_id"]] == "train")
        tok = (load_tokenizer(cfg.tokenizer) if cfg.tokenizer else
               train_tokenizer(train_texts, cfg.vocab_size, cfg.min_frequency, length=n_train))
        tok.save(str(tmp / "tokenizer.json"))
        vocab = tok.get_vocab_size()
        eot = tok.token_to_id(EOT)
        dtype = np.dtype(np.uint16 if vocab <= 2 ** 16 else np.uint32)
        writers = {s: ShardWriter(tmp, s, dtype) for s in ("train", "val")}
        batch: list[dict] = []

        def flush() -> None:
            for row, enc in zip(batch, tok.encode_batch([r["text"] for r in batch])):
                writers[split[row["doc_id"]]].add(row["doc_id"], np.asarray(enc.ids + [eot], dtype=np.int64))
            batch.clear()

        for row in tqdm(rows, total=docs["rows"], desc="tokenize", unit="doc"):
            batch.append(row)
            if len(batch) >= 256:
                flush()
        flush()
        splits = {s: w.finish() for s, w in writers.items()}
        if docs.get("heldout"):   # the evaluation documents, tokenized: the trainer's curve on them
            held = pq.read_table(Path(docs["dir"]) / docs["heldout"], columns=["doc_id", "text"]).to_pylist()
            if held:
                w = ShardWriter(tmp, "heldout", dtype)
                for row, enc in zip(held, tok.encode_batch([r["text"] for r in held])):
                    w.add(row["doc_id"], np.asarray(enc.ids + [eot], dtype=np.int64))
                splits["heldout"] = {**w.finish(), "bytes": sum(len(r["text"].encode()) for r in held)}
        shutil.rmtree(tmp / ".by-doc-id")
        meta = {"dtype": dtype.name, "byteorder": "little", "vocab_size": vocab, "eot_id": eot,
                "special_tokens": {t: tok.token_to_id(t) for t in SPECIAL}, "tokenizer": "tokenizer.json",
                "splits": splits}
        write_json(tmp / "meta.json", meta)
        files = [file_entry(tmp, p, splits[s]["docs"] if p.endswith(".parquet") else 0)
                 for s in splits for p in [x["path"] for x in splits[s]["shards"]] + [splits[s]["index"]]]
        files += [file_entry(tmp, "tokenizer.json", 0)]
        manifest = make_manifest("tokenize", final, {"kept": files, "dropped": []}, Counter(), {
            "seconds": round(time.time() - t0, 3), "input_rows": docs["rows"], "vocab_size": vocab,
            "dtype": dtype.name, "train_tokens": splits["train"]["tokens"], "val_tokens": splits["val"]["tokens"],
            "train_docs": splits["train"]["docs"], "val_docs": splits["val"]["docs"],
            "heldout_tokens": splits.get("heldout", {}).get("tokens", 0), "tokenizer_given": bool(cfg.tokenizer)})
        manifest["rows"] = len(ids)
        write_json(tmp / "_manifest.json", manifest)
        publish_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


@stage_task("tokenize", sources=tokenizer_fingerprint)
def tokenize_task(ctx: dict, section: dict, inputs: list[dict], run_id: str) -> tuple[dict, dict]:
    manifest = tokenize(TokenizeConfig.model_validate(section), inputs[0], stage_dir(ctx, "tokenize"))
    tracking.log_artifact(run_id, Path(manifest["dir"]) / "tokenizer.json")
    return manifest, {k: float(manifest[k]) for k in ("train_tokens", "val_tokens", "train_docs", "val_docs",
                                                      "vocab_size")}
