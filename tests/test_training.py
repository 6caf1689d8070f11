"""The training engine on real token shards (the test site's pages): objectives, loader state,
bit-exact resume after SIGKILL, DDP on gloo against one process, the loss-spike guard."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from dataclasses import asdict

import pytest
import torch

from ssl_model.checkpoint import latest_checkpoint, load_checkpoint, model_from
from ssl_model.config import preset
from ssl_model.data import Batches, TokenShards
from ssl_model.model import GPT
from ssl_model.objectives import Contrastive, MaskedLM
from ssl_model.trainer import TrainSettings, lr_factor, train
from tests.conftest import BIN, ROOT

SMALL = dict(batch_size=8, lr=3e-3, warmup_steps=5, eval_batches=4, threads=2, sample_tokens=0)


def run_events(cfg, s, shards, out):
    events = []
    result = train(cfg, s, shards, out, lambda *e: events.append(e))
    return result, events


def test_loader_visits_every_window_once_per_epoch_and_a_reloaded_loader_continues_alike(stages):
    shards = TokenShards(stages["tokenize"]["dir"], "train")
    loader = Batches(shards, 64, 8, seed=3)
    per_epoch = loader.windows // 8
    seen = [tuple(map(tuple, loader.next()[0].tolist())) for _ in range(per_epoch)]
    every = [tuple(s[i * 64:(i + 1) * 64].tolist()) for s in shards.shards for i in range((len(s) - 1) // 64)]
    visited = Counter(w for batch in seen for w in batch)
    # no window twice (real text repeats itself, so multisets); only the last partial batch left out
    assert visited <= Counter(every) and visited.total() == per_epoch * 8 > len(every) - 8
    for _ in range(3):
        loader.next()
    state = loader.state_dict()
    assert state["epoch"] == 1
    expected = [loader.next() for _ in range(per_epoch)]        # crosses into the next epoch
    again = Batches(shards, 64, 8, seed=3)
    again.load_state_dict(json.loads(json.dumps(state)))
    for (x1, y1), (x2, y2) in zip(expected, (again.next() for _ in range(per_epoch))):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # two ranks with half the batch see exactly the one-process batches, in two contiguous parts
    one = Batches(shards, 64, 8, seed=5)
    ranks = [Batches(shards, 64, 4, seed=5, rank=r, world=2) for r in (0, 1)]
    for _ in range(per_epoch + 2):
        assert torch.equal(one.next()[0], torch.cat([r.next()[0] for r in ranks]))
    with pytest.raises(ValueError, match="token shards or seed changed"):
        Batches(shards, 64, 8, seed=4).load_state_dict(state)


def test_masking_follows_bert_and_never_masks_special_tokens(stages):
    shards = TokenShards(stages["tokenize"]["dir"], "train")
    special = shards.meta["special_tokens"]
    mlm = MaskedLM(GPT(preset("test", shards.vocab_size)), special["<|mask|>"], list(special.values()))
    x, y = Batches(shards, 64, 64, seed=0).next()
    batch, n = mlm.prepare(x, y, torch.Generator().manual_seed(0))
    chosen = batch["y"] != -100
    assert n == int(chosen.sum()) and abs(n / x.numel() - 0.15) < 0.02
    assert not torch.isin(x[chosen], torch.tensor(list(special.values()))).any()
    masked = (batch["x"] == special["<|mask|>"]) & chosen
    kept = (batch["x"] == x) & chosen
    assert abs(masked.sum() / n - 0.8) < 0.05 and 0.07 < kept.sum() / n < 0.16   # 10 % kept + random hits
    assert torch.equal(batch["x"][~chosen], x[~chosen]) and torch.equal(batch["y"][chosen], x[chosen])


@pytest.mark.parametrize("arch,objective,extra", [
    ("gpt2", "causal", {}),
    ("llama", "causal", {"qk_norm": True, "tie_embeddings": False, "n_kv_head": 1}),
    ("llama", "mlm", {}),
])
def test_objectives_learn_on_real_text(tmp_path, stages, arch, objective, extra):
    vocab = stages["tokenize"]["vocab_size"]
    cfg = preset("test", vocab, arch=arch, **extra)
    s = TrainSettings(**{**SMALL, "objective": objective, "max_steps": 40, "eval_interval": 40,
                         "optimizer": "muon" if arch == "llama" else "adamw", "schedule": "wsd"})
    result, events = run_events(cfg, s, stages["tokenize"]["dir"], tmp_path)
    evals = [m for kind, _, m in events if kind == "eval"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
    if objective == "mlm":
        assert evals[-1]["val_accuracy"] > evals[0]["val_accuracy"] + 0.05
    else:
        assert result["val_loss"] < math.log(vocab) - 1 and "val_perplexity" in result


def test_contrastive_objective_trains_and_reports_retrieval(tmp_path, stages):
    cfg = preset("test", stages["tokenize"]["vocab_size"], dropout=0.1)
    s = TrainSettings(**{**SMALL, "objective": "contrastive", "max_steps": 20, "eval_interval": 20, "lr": 1e-3})
    result, events = run_events(cfg, s, stages["tokenize"]["dir"], tmp_path)
    # learning: the training objective on the same windows with the same dropout masks, at the
    # initial weights and at the trained ones (the per-step losses are near 0 from the first
    # steps on and too noisy to compare)
    x = torch.cat([x for x, _ in TokenShards(stages["tokenize"]["dir"], "train").fixed_batches(8, cfg.block_size, 2)])

    def objective(model: GPT) -> float:
        torch.manual_seed(0)
        with torch.no_grad():
            return Contrastive(model.train(), s.temperature)(x).item()
    torch.manual_seed(s.seed)   # as the trainer makes the initial weights
    initial = GPT(cfg)
    trained = model_from(load_checkpoint(result["checkpoint"]))
    assert objective(trained) < objective(initial)
    # chance: 1 in its batch's size for each validation window, averaged over the windows (the last
    # batch may be short): one per batch, over the number of windows
    val = TokenShards(stages["tokenize"]["dir"], "val").fixed_batches(s.batch_size, cfg.block_size, s.eval_batches)
    chance = len(val) / sum(len(x) for x, _ in val)
    assert 0 <= result["val_retrieval_accuracy"] <= 1 and result["val_retrieval_chance"] == pytest.approx(chance)
    with pytest.raises(ValueError, match="dropout > 0"):
        train(preset("test", 1024), s, stages["tokenize"]["dir"], tmp_path / "x")


def test_a_run_started_from_another_runs_checkpoint_has_its_weights(tmp_path, stages):
    """init_from: step 0 of the new run scores what the source's last step scored; a new
    objective and dropout may differ, the shape and the tokenizer may not."""
    shards, vocab = stages["tokenize"]["dir"], stages["tokenize"]["vocab_size"]
    cfg = preset("test", vocab)
    source, trained = run_events(cfg, TrainSettings(**{**SMALL, "max_steps": 20, "eval_interval": 20}), shards,
                                 tmp_path / "source")
    assert load_checkpoint(source["checkpoint"])["tokenizer_sha256"]       # what its token ids mean
    s = TrainSettings(**{**SMALL, "max_steps": 2, "eval_interval": 2, "init_from": str(tmp_path / "source")})
    _, events = run_events(cfg, s, shards, tmp_path / "continued")
    assert events[0] == ("init", 0, {"checkpoint": source["checkpoint"]})   # a folder: its latest checkpoint
    first = next(m for kind, _, m in events if kind == "eval")
    assert first["val_loss"] == source["val_loss"]
    assert next(m for kind, _, m in trained if kind == "eval")["val_loss"] > source["val_loss"] + 1   # random

    # SimCSE's way: contrastive, with dropout, on the causal model's weights
    con = TrainSettings(**{**SMALL, "objective": "contrastive", "max_steps": 2, "eval_interval": 2,
                           "init_from": source["checkpoint"]})
    result, events = run_events(preset("test", vocab, dropout=0.1), con, shards, tmp_path / "contrastive")
    assert events[0][0] == "init" and result["steps"] == 2
    # its retry resumes its own checkpoint, not the source's weights again
    _, again = run_events(preset("test", vocab, dropout=0.1), con, shards, tmp_path / "contrastive")
    assert [kind for kind, *_ in again][:1] == ["resume"]

    with pytest.raises(ValueError, match=r"n_embd=64; this run's has n_embd=128"):
        train(preset("test", vocab, n_embd=128), s, shards, tmp_path / "wider")
    other = tmp_path / "other-tokenizer"                    # the same ids, another tokenizer.json
    shutil.copytree(shards, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["model"]["vocab"] = dict(reversed(list(tok["model"]["vocab"].items())))
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="another tokenizer"):
        train(cfg, s, other, tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="no checkpoint there"):
        train(cfg, TrainSettings(**{**SMALL, "init_from": str(tmp_path / "missing")}), shards, tmp_path / "m")


def test_schedules_warm_up_then_decay_to_min_lr():
    cos = TrainSettings(max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    wsd = TrainSettings(max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1, schedule="wsd", decay_fraction=0.2)
    assert lr_factor(0, cos) == pytest.approx(0.1) and lr_factor(9, cos) == 1.0
    assert lr_factor(55, cos) == pytest.approx(0.55) and lr_factor(100, cos) == pytest.approx(0.1)
    assert lr_factor(50, wsd) == lr_factor(80, wsd) == 1.0
    assert lr_factor(90, wsd) == pytest.approx(0.55) and lr_factor(100, wsd) == pytest.approx(0.1)


KILLED_RUN = textwrap.dedent("""
    import json, os, signal, sys
    from ssl_model.config import ModelConfig
    from ssl_model.trainer import TrainSettings, train
    cfg, s, shards, out, log, kill_at = json.loads(sys.argv[1])
    def callback(kind, step, metrics):
        if kind == "train":
            with open(log, "a") as f:
                f.write(json.dumps([step, metrics["loss"]]) + "\\n")
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
    train(ModelConfig(**cfg), TrainSettings(**s), shards, out, callback)
""")


def run_training(cfg, s, shards, out, log, kill_at=-1) -> subprocess.CompletedProcess:
    args = json.dumps([asdict(cfg), asdict(s), shards, str(out), str(log), kill_at])
    return subprocess.run([sys.executable, "-c", KILLED_RUN, args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("objective", ["causal", "mlm"])
def test_a_run_killed_with_sigkill_resumes_bit_exactly(tmp_path, stages, objective):
    """Dropout and masking draw from the RNGs the checkpoint restores; the resumed run must
    give, step for step, the very losses and final weights of a run never interrupted."""
    shards = stages["tokenize"]["dir"]
    cfg = preset("test", stages["tokenize"]["vocab_size"], dropout=0.1)
    s = TrainSettings(**{**SMALL, "objective": objective, "max_steps": 12, "checkpoint_interval": 4,
                         "eval_interval": 6})
    whole = run_training(cfg, s, shards, tmp_path / "whole", tmp_path / "whole.jsonl")
    assert whole.returncode == 0, whole.stderr
    killed = run_training(cfg, s, shards, tmp_path / "killed", tmp_path / "killed.jsonl", kill_at=7)
    assert killed.returncode == -9
    assert load_checkpoint(latest_checkpoint(tmp_path / "killed"))["step"] == 4
    resumed = run_training(cfg, s, shards, tmp_path / "killed", tmp_path / "resumed.jsonl")
    assert resumed.returncode == 0, resumed.stderr

    def losses(name):
        return [tuple(json.loads(line)) for line in (tmp_path / name).read_text().splitlines()]
    assert losses("resumed.jsonl") == losses("whole.jsonl")[4:]      # steps 5..12, bit for bit
    assert [step for step, _ in losses("killed.jsonl")] == list(range(1, 8))
    a, b = (load_checkpoint(latest_checkpoint(tmp_path / d)) for d in ("whole", "killed"))
    assert a["step"] == b["step"] == 12
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_ddp_on_two_gloo_processes_matches_one_process_with_the_same_global_batch(tmp_path, stages):
    shards = stages["tokenize"]["dir"]
    common = ["--preset", "test", "--set", "max_steps=6", "--set", "grad_accum=2", "--set", "threads=1",
              "--set", "eval_interval=6", "--set", "sample_tokens=0", "--set", "lr=3e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2", "-m", "ssl_model.trainer",
                          shards, str(tmp_path / "ddp"), *common, "--set", "batch_size=4"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "ssl_model.trainer", shards, str(tmp_path / "one"), *common,
                             "--set", "batch_size=8"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    assert json.loads(ddp.stdout.splitlines()[-1])["world_size"] == 2
    a, b = (load_checkpoint(latest_checkpoint(tmp_path / d)) for d in ("ddp", "one"))
    assert len(a["rng"]) == 2 and len(b["rng"]) == 1
    torch.manual_seed(TrainSettings().seed)
    start = GPT(preset("test", stages["tokenize"]["vocab_size"])).state_dict()   # the weights both began from
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5)
    assert sum(not torch.allclose(a["model"][k], start[k]) for k in start) >= len(start) // 2


def test_loss_spikes_are_skipped_and_repeated_ones_stop_with_a_clear_message(tmp_path, stages):
    cfg = preset("test", stages["tokenize"]["vocab_size"])
    s = TrainSettings(**{**SMALL, "max_steps": 30, "lr": 50.0, "warmup_steps": 0, "grad_clip": 0.0})
    events = []
    with pytest.raises(RuntimeError, match="steps in a row had a non-finite or spiking loss"):
        train(cfg, s, stages["tokenize"]["dir"], tmp_path, lambda *e: events.append(e))
    skips = [m for kind, _, m in events if kind == "skip"]
    assert len(skips) == s.max_bad_steps and skips[-1]["skipped_steps"] == s.max_bad_steps


def test_noise_on_a_loss_near_zero_is_not_a_spike(tmp_path, stages):
    # contrastive losses sit near 0 and jump several-fold from batch to batch (0.2 -> 1.0): such
    # steps were skipped, and once 5 in a row stopped a run at step 6
    cfg = preset("test", stages["tokenize"]["vocab_size"], dropout=0.3)
    for seed in range(4):
        s = TrainSettings(**{**SMALL, "objective": "contrastive", "max_steps": 20, "eval_interval": 20, "lr": 1e-3,
                             "seed": seed})
        result, events = run_events(cfg, s, stages["tokenize"]["dir"], tmp_path / str(seed))
        assert result["steps"] == 20 and [e for e in events if e[0] == "skip"] == []


def test_compiled_training_matches_eager_and_checkpoints_the_uncompiled_model(tmp_path, stages):
    cfg = preset("test", stages["tokenize"]["vocab_size"])
    runs = {}
    for compiled in (False, True):
        s = TrainSettings(**{**SMALL, "max_steps": 3, "eval_interval": 3, "compile": compiled})
        _, events = run_events(cfg, s, stages["tokenize"]["dir"], tmp_path / str(compiled))
        runs[compiled] = [m["loss"] for kind, _, m in events if kind == "train"]
    assert runs[True] == pytest.approx(runs[False], rel=1e-4)
    state = load_checkpoint(latest_checkpoint(tmp_path / "True"))["model"]
    GPT(cfg).load_state_dict(state)   # plain keys, no torch.compile wrapper prefix
