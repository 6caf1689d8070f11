"""The trained model as MLflow serves it, logged as a models-from-code pyfunc model.

A DataFrame with a ``text`` column goes in. A causal model gives per-text mean next-token loss
(nats) and the number of scored tokens; a masked-LM or contrastive model gives the text's
embedding (mean-pooled final hidden states, bidirectional attention). MLflow loads this file to
rebuild the model (no pickled objects).
"""

from __future__ import annotations

import mlflow
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from ssl_model.checkpoint import load_checkpoint, model_from

SIGNATURE = ModelSignature(inputs=Schema([ColSpec("string", "text")]),
                           outputs=Schema([ColSpec("double", "loss"), ColSpec("long", "tokens")]))
EMBED_SIGNATURE = ModelSignature(inputs=Schema([ColSpec("string", "text")]),
                                 outputs=Schema([ColSpec("double", "embedding_norm"), ColSpec("long", "tokens")]))


def signature(objective: str) -> ModelSignature:
    return SIGNATURE if objective == "causal" else EMBED_SIGNATURE


class Scorer(mlflow.pyfunc.PythonModel):

    def load_context(self, context) -> None:
        from tokenizers import Tokenizer
        ckpt = load_checkpoint(context.artifacts["checkpoint"])
        self.model, self.objective = model_from(ckpt), ckpt["train_config"].get("objective", "causal")
        self.tokenizer = Tokenizer.from_file(context.artifacts["tokenizer"])

    @torch.no_grad()
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        T = self.model.cfg.block_size
        out = []
        for text in model_input["text"]:
            ids = torch.tensor(self.tokenizer.encode(text).ids, dtype=torch.long)
            if self.objective != "causal":
                h = self.model.hidden(ids[None, :T], causal=False) if len(ids) else torch.zeros(1, 1, 1)
                emb = h.mean(dim=1)[0]
                out.append({"embedding": emb.tolist(), "embedding_norm": float(emb.norm()), "tokens": min(len(ids), T)})
                continue
            total, count = 0.0, 0
            for i in range(0, max(len(ids) - 1, 0), T):
                chunk = ids[i:i + T + 1]
                if len(chunk) < 2:
                    break
                _, loss = self.model(chunk[None, :-1], chunk[None, 1:])
                total, count = total + loss.item() * (len(chunk) - 1), count + len(chunk) - 1
            out.append({"loss": total / count if count else float("nan"), "tokens": count})
        return pd.DataFrame(out)


mlflow.models.set_model(Scorer())
