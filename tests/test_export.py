"""Hugging Face export: transformers loads each layout as its own class and computes our logits,
and AutoTokenizer encodes real text as our tokenizer does."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

from ssl_model.config import EOT, MASK, preset
from ssl_model.export import export_hf
from ssl_model.model import GPT
from tasks.shards import iter_rows
from tests.conftest import BIN


@pytest.fixture(scope="module")
def tokenizer_json(stages) -> Path:
    return Path(stages["tokenize"]["dir"]) / "tokenizer.json"


@pytest.fixture(scope="module")
def text(stages) -> str:
    """A real document from the pipeline, with the special tokens inside."""
    doc = next(r["text"] for r in iter_rows(stages["dedup"], columns=["text"]) if len(r["text"]) > 3000)
    return doc[:1000] + EOT + doc[1000:2000] + MASK + doc[2000:3000]


def noisy_model(vocab_size: int, **overrides) -> GPT:
    """A test-size model with every weight, bias and norm gain away from its initial value, so a
    mis-mapped or dropped tensor changes the logits well beyond the tolerance."""
    torch.manual_seed(0)
    model = GPT(preset("test", vocab_size, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.2 if p.dim() == 1 else 0.1))
    return model.eval()


@pytest.mark.parametrize("overrides, hf_class", [
    (dict(arch="gpt2"), "GPT2LMHeadModel"),
    (dict(arch="llama", n_head=4, n_kv_head=2), "LlamaForCausalLM"),
    (dict(arch="llama", qk_norm=True, tie_embeddings=False), "Qwen3ForCausalLM"),
], ids=["gpt2-tied", "llama-gqa-tied", "qwen3-qknorm-untied"])
def test_transformers_computes_our_logits(tmp_path, tokenizer_json, text, overrides, hf_class):
    tok = Tokenizer.from_file(str(tokenizer_json))
    model = noisy_model(tok.get_vocab_size(), **overrides)
    T = model.cfg.block_size
    ids = torch.tensor(tok.encode(text).ids[:2 * T]).view(2, T)

    out = export_hf(model, tmp_path / "hf", tokenizer_json)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                                 output_loading_info=True)
    hf.eval()
    assert type(hf).__name__ == hf_class
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert hf.config.tie_word_embeddings == model.cfg.tie_embeddings
    assert (hf.get_output_embeddings().weight is hf.get_input_embeddings().weight) == model.cfg.tie_embeddings

    with torch.no_grad():
        ours, theirs = model(ids)[0], hf(ids).logits
    assert ours.std() > 0.5   # logits large enough that a wrong mapping could not hide under atol
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    print(f"{hf_class}: max abs logit difference {(theirs - ours).abs().max().item():.2e}")


def test_auto_tokenizer_matches_ours(tmp_path, tokenizer_json, text):
    tok = Tokenizer.from_file(str(tokenizer_json))
    model = noisy_model(tok.get_vocab_size())
    out = export_hf(model, tmp_path / "hf", tokenizer_json)

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok.encode(text).ids
    assert hf_tok(text)["input_ids"] == ids
    assert hf_tok.decode(ids) == text
    assert hf_tok.eos_token == hf_tok.bos_token == EOT
    assert hf_tok.eos_token_id == tok.token_to_id(EOT) in ids
    if tok.token_to_id(MASK) is not None:   # the masked-LM objective's token
        assert hf_tok.mask_token == MASK and hf_tok.mask_token_id == tok.token_to_id(MASK) in ids
    assert hf_tok.model_max_length == model.cfg.block_size
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert gen.eos_token_id == tok.token_to_id(EOT)


def test_export_refuses_existing_folder_and_leaves_it_alone(tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="already exists"):
        export_hf(noisy_model(64), out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]   # no temporary folder left behind


def test_export_refuses_a_model_it_cannot_represent(tmp_path):
    model = noisy_model(64)   # config says tied, but the head was replaced by its own matrix
    model.lm_head.weight = torch.nn.Parameter(model.wte.weight.detach().clone())
    with pytest.raises(ValueError, match="tie_embeddings"):
        export_hf(model, tmp_path / "hf")
    assert not any(tmp_path.iterdir())


def test_cli_exports_a_training_checkpoint(tmp_path, stages):
    from ssl_model.checkpoint import load_model
    from ssl_model.trainer import TrainSettings, train
    shards = stages["tokenize"]["dir"]
    result = train(preset("test", stages["tokenize"]["vocab_size"], arch="llama"),
                   TrainSettings(batch_size=4, max_steps=2, warmup_steps=1, eval_batches=1, sample_tokens=0, threads=2),
                   shards, tmp_path / "ckpt")
    env = {k: v for k, v in os.environ.items()}
    done = subprocess.run([str(BIN / "ssl-pipeline"), "export", result["checkpoint"], str(tmp_path / "hf"),
                           "--tokenizer", str(Path(shards) / "tokenizer.json")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ours = load_model(result["checkpoint"])
    x = torch.randint(0, ours.cfg.vocab_size, (1, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x)[0], atol=1e-4, rtol=1e-4)
    again = subprocess.run([str(BIN / "ssl-pipeline"), "export", str(tmp_path / "missing.pt"), str(tmp_path / "x")],
                           env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "missing.pt" in again.stderr and "Traceback" not in again.stderr
