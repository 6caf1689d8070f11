"""Export a trained GPT as a Hugging Face checkpoint folder (config.json + model.safetensors).

``arch="gpt2"`` becomes ``GPT2LMHeadModel``, ``arch="llama"`` becomes ``LlamaForCausalLM``, and
``arch="llama"`` with ``qk_norm`` becomes ``Qwen3ForCausalLM``; ``AutoModelForCausalLM.from_pretrained``
then computes the same logits as our model. The config files are written as plain JSON, so this
module does not need transformers. The folder appears all at once: it is built beside ``out_dir``
and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file

from ssl_model.config import EOT, MASK, ModelConfig
from ssl_model.model import GPT


def _gpt2(sd: dict[str, torch.Tensor], c: ModelConfig) -> tuple[dict, dict]:
    """GPT-2's Conv1D layers store (in, out): their weights are our Linear weights transposed."""
    t = {"transformer.wte.weight": sd.pop("wte.weight"), "transformer.wpe.weight": sd.pop("wpe.weight")}
    ours_hf = {"ln1": "ln_1", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "ln2": "ln_2",
               "mlp.up": "mlp.c_fc", "mlp.down": "mlp.c_proj"}
    for i in range(c.n_layer):
        for ours, hf in ours_hf.items():
            w = sd.pop(f"blocks.{i}.{ours}.weight")
            t[f"transformer.h.{i}.{hf}.weight"] = w if ours.startswith("ln") else w.t()
            t[f"transformer.h.{i}.{hf}.bias"] = sd.pop(f"blocks.{i}.{ours}.bias")
    t["transformer.ln_f.weight"], t["transformer.ln_f.bias"] = sd.pop("ln_f.weight"), sd.pop("ln_f.bias")
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
              "n_positions": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head,
              "n_inner": c.hidden, "activation_function": "gelu_new", "layer_norm_epsilon": c.norm_eps,
              "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
              "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
              "reorder_and_upcast_attn": False, "add_cross_attention": False}
    return t, config


def _llama(sd: dict[str, torch.Tensor], c: ModelConfig) -> tuple[dict, dict]:
    """Llama (Qwen3 with qk_norm): the fused qkv and gate+up matrices are split row-wise."""
    t = {"model.embed_tokens.weight": sd.pop("wte.weight")}
    q, kv = c.n_head * c.head_dim, c.kv_heads * c.head_dim
    for i in range(c.n_layer):
        p, h = f"blocks.{i}.", f"model.layers.{i}."
        t[h + "input_layernorm.weight"] = sd.pop(p + "ln1.weight")
        t[h + "post_attention_layernorm.weight"] = sd.pop(p + "ln2.weight")
        for name, w in zip("qkv", sd.pop(p + "attn.qkv.weight").split([q, kv, kv])):
            t[h + f"self_attn.{name}_proj.weight"] = w
        t[h + "self_attn.o_proj.weight"] = sd.pop(p + "attn.proj.weight")
        if c.qk_norm:
            t[h + "self_attn.q_norm.weight"] = sd.pop(p + "attn.q_norm.weight")
            t[h + "self_attn.k_norm.weight"] = sd.pop(p + "attn.k_norm.weight")
        t[h + "mlp.gate_proj.weight"], t[h + "mlp.up_proj.weight"] = sd.pop(p + "mlp.up.weight").split(c.hidden)
        t[h + "mlp.down_proj.weight"] = sd.pop(p + "mlp.down.weight")
    t["model.norm.weight"] = sd.pop("ln_f.weight")
    config = {"architectures": ["Qwen3ForCausalLM" if c.qk_norm else "LlamaForCausalLM"],
              "model_type": "qwen3" if c.qk_norm else "llama", "vocab_size": c.vocab_size,
              "hidden_size": c.n_embd, "intermediate_size": c.hidden, "num_hidden_layers": c.n_layer,
              "num_attention_heads": c.n_head, "num_key_value_heads": c.kv_heads, "head_dim": c.head_dim,
              "hidden_act": "silu", "max_position_embeddings": c.block_size, "rms_norm_eps": c.norm_eps,
              "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
              "rope_theta": c.rope_theta,  # read by transformers 4.x and other tools
              "attention_bias": False, "attention_dropout": c.dropout}
    if c.qk_norm:   # Qwen3 would otherwise derive sliding-window layers from its defaults
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.n_layer,
                      layer_types=["full_attention"] * c.n_layer)
    else:
        config.update(mlp_bias=False, pretraining_tp=1)
    return t, config


def export_hf(model: GPT, out_dir: str | Path, tokenizer_json: str | Path | None = None) -> Path:
    """Write ``model`` (and the tokenizer, if given) as a Hugging Face folder at ``out_dir``, which
    must not exist yet. Raises ValueError for a model the Hugging Face class cannot reproduce exactly."""
    out_dir, c = Path(out_dir), model.cfg
    if out_dir.exists():
        raise FileExistsError(f"export folder {out_dir} already exists; choose a new path")
    tied = model.lm_head.weight is model.wte.weight
    if tied != c.tie_embeddings:
        raise ValueError(f"config says tie_embeddings={c.tie_embeddings} but lm_head and wte are "
                         f"{'' if tied else 'not '}the same tensor")
    sd = dict(model.state_dict())
    lm_head = sd.pop("lm_head.weight")
    tensors, config = (_gpt2 if c.arch == "gpt2" else _llama)(sd, c)
    if sd:
        raise ValueError(f"weights with no Hugging Face counterpart: {sorted(sd)}")
    if not tied:
        tensors["lm_head.weight"] = lm_head
    dtypes = {w.dtype for w in tensors.values()}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise ValueError(f"weights must share one floating dtype, found {sorted(map(str, dtypes))}")
    # save_file refuses views of one storage (the split qkv) and non-contiguous (transposed) tensors
    tensors = {k: w.detach().to("cpu", copy=True).contiguous() for k, w in tensors.items()}
    config.update(tie_word_embeddings=tied, initializer_range=0.02, use_cache=True,
                  dtype=str(next(iter(dtypes))).removeprefix("torch."))

    eot, special = None, {}
    if tokenizer_json is not None:
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(tokenizer_json))
        if tok.get_vocab_size() > c.vocab_size:
            raise ValueError(f"tokenizer has {tok.get_vocab_size()} tokens, the model only {c.vocab_size}")
        eot = tok.token_to_id(EOT)
        special = {k: t for k, t in (("bos_token", EOT), ("eos_token", EOT), ("mask_token", MASK))
                   if tok.token_to_id(t) is not None}
    config.update(bos_token_id=eot, eos_token_id=eot, pad_token_id=None)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        _write_json(tmp / "config.json", config)
        if tokenizer_json is not None:
            shutil.copyfile(tokenizer_json, tmp / "tokenizer.json")
            _write_json(tmp / "tokenizer_config.json", {
                "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": c.block_size, **special,
                "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False})
            if eot is not None:
                _write_json(tmp / "generation_config.json", {"bos_token_id": eot, "eos_token_id": eot})
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.rename(tmp, out_dir)   # fails rather than replace a non-empty folder that appeared meanwhile
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def export_checkpoint(checkpoint_path: str | Path, out_dir: str | Path,
                      tokenizer_json: str | Path | None = None) -> Path:
    """Export the model stored in one of our training checkpoints (see :func:`export_hf`)."""
    from ssl_model.checkpoint import load_model
    return export_hf(load_model(checkpoint_path), out_dir, tokenizer_json)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
