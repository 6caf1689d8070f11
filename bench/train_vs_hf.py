"""Benchmark: tokens/s and validation loss of our trainer against transformers' GPT2LMHeadModel.

    python bench/train_vs_hf.py [--out bench/results/train_vs_hf.json] [--steps 200] [--shards DIR]
                                [--threads 2] [--round-steps 10] [--init ours|hf] [--compile]
                                [--device cuda --preset gpt2-124m --model-vocab 50304 --batch-size 16]
    python bench/train_vs_hf.py --save-shards DIR     (build the token shards only, e.g. to carry them)

Without ``--shards`` it builds its own token shards from the repo's real corpus: the pydoc site is
rendered, collected from its local folder, extracted and tokenized (BPE, vocab 8192) in a temp dir.
The build is not reproducible to the document (the rendered pages and their paths differ between
runs, and the train/validation split hashes document ids), so losses compare within a run only.

Three models of the same size (by default preset "tiny": 4 layers x 256 wide, 4 heads, T=256, vocab
from the shards, fp32, dropout 0; ``--preset gpt2-124m --model-vocab 50304`` is GPT-2 small at
T=1024, with its embedding padded as nanoGPT pads it, whatever the shards' vocabulary) train for
the same number of steps on the same batches (batch 16):
  ours       ``ssl_model.trainer.train`` as it is, default settings (fused AdamW on CPU)
  hf         ``GPT2LMHeadModel`` (attention "sdpa", the default; activation "gelu_new", the
             default) in a plain PyTorch loop: the same ``Batches`` (same seed), loss = cross-entropy
             of ``model(input_ids=x).logits`` against our next-token targets ``y`` (computed here:
             HF's ``labels=`` would shift them once more and drop the last position), AdamW with
             the same groups (decay on 2-D weights only), betas (0.9, 0.95), lr schedule
             (``lr_factor`` via LambdaLR), clipping at 1.0; ``torch.optim.AdamW`` defaults
  hf_fused   the same with ``AdamW(fused=True)``, the implementation our trainer uses on CPU
The three run interleaved step by step in one process: after each of our steps (from the
trainer's callback) one step of each reference runs, in an order rotated every step. This
machine's speed drifts by +-20-60 % within minutes, so steps compared with each other are
seconds apart. A step's time runs from the end of the previous step (or evaluation) to the end
of its optimizer step and includes fetching the batch, for ours and the references alike; ours
is timed from the callback of the previous step to the callback of this one, so the
references' steps in between are not counted. Steps 1..--warmup and the step right after each
evaluation are left out. Rounds are consecutive blocks of --round-steps measured steps; a
round's ratio is the references' total time over ours; the ratios reported are medians over rounds.
Validation loss: every model on the same fixed validation windows
(``TokenShards(..., "val").fixed_batches``) at the trainer's evaluation steps (equal tokens). The
references start from the weights our trainer starts from (``--init ours``, the default: moved
over by our Hugging Face export and checked to give the same logits), so the losses differ only
by the training; ``--init hf`` keeps GPT2LMHeadModel's own initialisation (same scheme, other draws).
With ``--compile`` ours runs with ``TrainSettings.compile=True``; the first steps' extra time
is reported as compile time. On CUDA (``--device cuda``) all three train under bf16 autocast
(``TrainSettings.bf16``, ``--no-bf16`` for fp32), the references with ``AdamW`` as PyTorch
picks it there (foreach) and fused; every step's time ends at a ``torch.cuda.synchronize()``, and
tokens/s is also given as MFU against the device's bf16 peak (``ssl_model.trainer.PEAK_BF16``).
Prints JSON and writes it to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from ssl_model.config import ModelConfig, preset  # noqa: E402
from ssl_model.data import Batches, TokenShards  # noqa: E402
from ssl_model.export import export_hf  # noqa: E402
from ssl_model.model import GPT  # noqa: E402
from ssl_model.trainer import TrainSettings, autocast_for, flops_per_token, lr_factor, peak_flops, train  # noqa: E402

transformers.logging.set_verbosity_error()


def build_shards(work: Path, vocab_size: int) -> Path:
    """Token shards of the rendered pydoc site: render, collect the folder, extract, tokenize."""
    from tasks import pydoc_site
    from tasks.collect import collect
    from tasks.config import CollectConfig, ExtractConfig, TokenizeConfig
    from tasks.extract import extract
    from tasks.tokenize import tokenize
    pydoc_site.render_site(work / "site", pydoc_site.DEFAULT_MODULES)
    pages = collect(CollectConfig(paths=[str(work / "site")], max_pages=10_000), work / "collect")
    docs = extract(ExtractConfig(), pages, work / "extract")
    tokenize(TokenizeConfig(vocab_size=vocab_size), docs, work / "tokens")
    return work / "tokens"


def hf_model(cfg: ModelConfig) -> GPT2LMHeadModel:
    """GPT2LMHeadModel of our shape, without dropout (as ours), in its own initialisation."""
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=cfg.norm_eps,
        bos_token_id=None, eos_token_id=None))


def initial_weights_hf(cfg: ModelConfig, seed: int) -> dict:
    """The weights our trainer starts from (seeded as it seeds them), in Hugging Face's layout
    (through our export), checked to give the same logits in GPT2LMHeadModel."""
    from safetensors.torch import load_file
    torch.manual_seed(seed)
    ours = GPT(cfg)
    with tempfile.TemporaryDirectory() as d:
        sd = load_file(export_hf(ours, Path(d) / "hf") / "model.safetensors")
    hf = hf_model(cfg)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # the head is tied
    x = torch.randint(0, cfg.vocab_size, (2, cfg.block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(input_ids=x).logits, ours(x)[0], rtol=1e-4, atol=1e-4)
    return sd


class Reference:
    """GPT2LMHeadModel of our shape trained by a plain loop, one step per call."""

    def __init__(self, cfg: ModelConfig, s: TrainSettings, train_data: TokenShards, fused: bool,
                 init: dict | None, device: torch.device):
        torch.manual_seed(s.seed)
        self.model = hf_model(cfg)
        assert self.model.config._attn_implementation == "sdpa", self.model.config._attn_implementation
        if init is not None:
            self.model.load_state_dict(init, strict=False)
        self.model.to(device)
        self.device = device
        self.autocast = autocast_for(device, s.bf16)   # as our trainer autocasts
        params = list(self.model.parameters())  # the tied head and embedding once
        self.opt = torch.optim.AdamW(
            [{"params": [p for p in params if p.dim() >= 2], "weight_decay": s.weight_decay},
             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
            lr=s.lr, betas=(0.9, 0.95), fused=fused)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda step: lr_factor(step, s))
        self.loader = Batches(train_data, cfg.block_size, s.batch_size, s.seed)
        self.s = s
        self.model.train()

    def loss(self, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        with self.autocast():
            logits = self.model(input_ids=x).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction=reduction)

    def step(self) -> float:
        x, y = self.loader.next()
        loss = self.loss(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.s.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        value = loss.item()
        synchronize(self.device)
        return value

    @torch.no_grad()
    def evaluate(self, val_batches) -> float:
        self.model.eval()
        total = sum(self.loss(x, y, "sum").item() for x, y in val_batches)
        self.model.train()
        return total / sum(y.numel() for _, y in val_batches)


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so that a step's time is all of it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(shards: Path, args) -> dict:
    train_data, val_data = TokenShards(shards, "train"), TokenShards(shards, "val")
    vocab = train_data.vocab_size
    if args.model_vocab is not None and args.model_vocab < vocab:
        raise SystemExit(f"--model-vocab {args.model_vocab} is smaller than the shards' vocabulary ({vocab})")
    cfg = preset(args.preset, args.model_vocab or vocab)
    device = torch.device(args.device)
    s = TrainSettings(max_steps=args.steps, threads=args.threads, sample_tokens=0, device=args.device,
                      checkpoint_interval=10 ** 9, compile=args.compile, batch_size=args.batch_size,
                      bf16=args.bf16)
    torch.set_num_threads(args.threads)
    val_batches = val_data.fixed_batches(s.batch_size, cfg.block_size, s.eval_batches)
    init = initial_weights_hf(cfg, s.seed) if args.init == "ours" else None
    refs = {name: Reference(cfg, s, train_data, fused, init, device)
            for name, fused in (("hf", False), ("hf_fused", True))}
    names = ["ours", *refs]
    secs: dict[str, dict[int, float]] = {n: {} for n in names}
    train_loss: dict[str, dict[int, float]] = {n: {} for n in names}
    val_loss: dict[str, dict[int, float]] = {n: {} for n in names}
    after_eval: set[int] = set()
    mark = {"t": time.perf_counter()}

    def callback(kind: str, step: int, m: dict) -> None:
        synchronize(device)   # our optimizer step may still be running on the GPU
        t_in = time.perf_counter()
        if kind == "train":
            secs["ours"][step] = t_in - mark["t"]
            train_loss["ours"][step] = m["loss"]
            order = list(refs)[step % len(refs):] + list(refs)[:step % len(refs)]
            for name in order:
                t0 = time.perf_counter()
                train_loss[name][step] = refs[name].step()
                secs[name][step] = time.perf_counter() - t0
        elif kind == "eval":
            val_loss["ours"][step] = m["val_loss"]
            for name, ref in refs.items():
                val_loss[name][step] = ref.evaluate(val_batches)
            after_eval.add(step + 1)
        mark["t"] = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="train-vs-hf-") as out:
        t0 = time.perf_counter()
        train(cfg, s, shards, out, callback)
        wall = time.perf_counter() - t0

    tokens = s.batch_size * cfg.block_size
    measured = [i for i in range(args.warmup + 1, args.steps + 1) if i not in after_eval]
    rounds = [measured[i:i + args.round_steps] for i in range(0, len(measured), args.round_steps)]
    rounds = [r for r in rounds if len(r) == args.round_steps] or rounds
    res: dict = {"shards": {"train_tokens": train_data.tokens, "val_tokens": sum(y.numel() for _, y in val_batches),
                            "vocab_size": vocab},
                 "settings": {"model": cfg.to_dict(), "batch_size": s.batch_size, "steps": args.steps,
                              "tokens_per_step": tokens, "threads": args.threads, "device": str(device),
                              "dtype": "bf16 autocast" if s.bf16 and device.type == "cuda" else "float32",
                              "lr": s.lr, "warmup_steps": s.warmup_steps, "weight_decay": s.weight_decay,
                              "grad_clip": s.grad_clip, "eval_interval": s.eval_interval, "compile": args.compile,
                              "hf_init": args.init,
                              "measured_steps": len(measured), "round_steps": args.round_steps,
                              "hf_loss": "F.cross_entropy(model(input_ids=x).logits, y): our targets, "
                                         "no internal shift"},
                 "wall_s": round(wall, 1)}
    peak = peak_flops(device, s.bf16)
    with torch.device("meta"):   # the trainer's count, without the memory
        flops = flops_per_token(GPT(cfg))
    for n in names:
        res[f"{n}_tokens_per_s"] = round(tokens / statistics.median(secs[n][i] for i in measured), 1)
        if peak:
            res[f"{n}_mfu"] = round(res[f"{n}_tokens_per_s"] * flops / peak, 4)
    per_round = {}
    for ref in refs:
        per_round[ref] = [round(sum(secs[ref][i] for i in r) / sum(secs["ours"][i] for i in r), 4) for r in rounds]
        res[f"ratio_vs_{ref}"] = round(statistics.median(per_round[ref]), 4)
        res[f"ratio_vs_{ref}_per_step_median"] = round(statistics.median(secs[ref][i] / secs["ours"][i]
                                                                         for i in measured), 4)
    strongest = max(refs, key=lambda r: res[f"{r}_tokens_per_s"])
    res["stronger_reference"] = strongest
    res["ratio"] = res[f"ratio_vs_{strongest}"]
    res["ratio_per_round"] = per_round
    if args.compile:  # extra time of the first steps over the steady state
        res["ours_compile_s"] = round(sum(secs["ours"][i] for i in range(1, args.warmup + 1))
                                      - args.warmup * statistics.median(secs["ours"][i] for i in measured), 1)
    res["val_loss"] = {n: {str(k): round(v, 4) for k, v in sorted(val_loss[n].items())} for n in names}
    last = max(val_loss["ours"])
    res["final_val_loss"] = {n: round(val_loss[n][last], 4) for n in names}
    res["final_val_loss_diff_vs_stronger"] = round(val_loss["ours"][last] - val_loss[strongest][last], 4)
    last10 = range(max(1, args.steps - 9), args.steps + 1)
    res["train_loss_last10"] = {n: round(statistics.mean(train_loss[n][i] for i in last10), 4) for n in names}
    res["step_seconds"] = {n: [round(secs[n][i], 3) for i in range(1, args.steps + 1)] for n in names}
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/train_vs_hf.json")
    ap.add_argument("--shards", type=Path, default=None, help="token shards (default: build from the pydoc site)")
    ap.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary when building the shards")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10, help="first steps left out of the timing")
    ap.add_argument("--round-steps", type=int, default=10, help="measured steps per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--preset", default="tiny", help="model preset (ssl_model.config.PRESETS)")
    ap.add_argument("--model-vocab", type=int, default=None,
                    help="the models' vocabulary, at least the shards' (default: the shards'); 50304 for GPT-2's shape")
    ap.add_argument("--batch-size", type=int, default=TrainSettings.batch_size)
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA")
    ap.add_argument("--save-shards", type=Path, default=None, help="build the token shards into DIR and stop")
    ap.add_argument("--compile", action="store_true", help="ours with TrainSettings.compile=True")
    ap.add_argument("--init", choices=["ours", "hf"], default="ours",
                    help="references start from our initial weights (default) or from GPT2LMHeadModel's own init")
    args = ap.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else ""
    if args.save_shards:
        with tempfile.TemporaryDirectory(prefix="bench-tokens-") as work:
            shutil.copytree(build_shards(Path(work), args.vocab), args.save_shards)
        print(args.save_shards)
        return
    res: dict = {"machine": {"cpus": os.cpu_count(), "cpu": cpu,
                             "gpu": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None,
                             "python": platform.python_version(), "torch": torch.__version__,
                             "transformers": transformers.__version__}}
    with tempfile.TemporaryDirectory(prefix="bench-tokens-") as work:
        t0 = time.perf_counter()
        shards = args.shards or build_shards(Path(work), args.vocab)
        res["shards_built_s"] = None if args.shards else round(time.perf_counter() - t0, 1)
        res.update(run(shards, args))
    res["rounds"] = len(res["ratio_per_round"]["hf"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "step_seconds"}, indent=2))


if __name__ == "__main__":
    main()
