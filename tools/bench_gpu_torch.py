#!/usr/bin/env python3
"""PyTorch reference for tools/bench_gpu.sh: the GPT-2 that lrllm trains (tools/bench_torch.py's model), on a GPU.

  --mode pretrain  float32 weights, bf16 autocast, fused AdamW; dense, or low-rank with --rank
  --mode full      full finetuning in pure bf16: weights, gradients and AdamW state all bf16
  --mode lora      LoRA adapters (float32, as lrllm's: A uniform in +-1/sqrt(in), B zero) on the four linear
                   sites of every block over a frozen bf16 base, bf16 autocast
--compile wraps the model in torch.compile (torch >= 2.0). AdamW (betas .9/.95, weight decay .1 on 2-D
tensors) and gradient clipping at 1.0 as lrllm. Writes one JSON object to --out: tokens/s (median step time
after the warm-up steps), parameters, trainable parameters, and peak memory: torch.cuda.max_memory_allocated
and max_memory_reserved on a GPU, the peak RSS on the CPU.
--device cpu --tiny runs a tiny shape for a few steps: a check that the script works, not a benchmark.
"""

import argparse
import contextlib
import json
import math
import resource
import statistics
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench_torch import GPT, SiteLinear, read_tokens

TINY = {"n_layer": 2, "n_head": 2, "d_model": 64, "seq_len": 64, "vocab": 512, "batch": 2}


class LoRASite(nn.Module):
    """A frozen site plus the trainable update (alpha / r) B A."""

    def __init__(self, site, rank, alpha):
        super().__init__()
        self.site = site
        d_out, d_in = site.W.shape
        self.lora_A = nn.Parameter(torch.empty(rank, d_in, device=site.W.device))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank, device=site.W.device))
        bound = 1.0 / math.sqrt(d_in)
        nn.init.uniform_(self.lora_A, -bound, bound)
        self.scale = alpha / rank

    def forward(self, x):
        return self.site(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale


def build(args, dev):
    # On a GPU the parameters are made there (torch >= 2.0): initialising 1.5B of them on the CPU takes minutes.
    with dev if dev.type == "cuda" else contextlib.nullcontext():
        model = GPT(args.n_layer, args.n_head, args.d_model, args.seq_len, args.vocab, args.rank)
    if args.mode != "pretrain":
        model.to(torch.bfloat16)
    if args.mode == "lora":
        model.requires_grad_(False)
        for blk in model.h:
            for name in ("qkv", "proj", "fc", "mlp_proj"):
                setattr(blk, name, LoRASite(getattr(blk, name), args.lora_rank, args.lora_alpha))
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("pretrain", "full", "lora"), default="pretrain")
    ap.add_argument("--n_layer", type=int)
    ap.add_argument("--n_head", type=int)
    ap.add_argument("--d_model", type=int)
    ap.add_argument("--seq_len", type=int)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--rank", type=int, default=0, help="low-rank rank on all four sites (pretrain); 0 is dense")
    ap.add_argument("--lora_rank", type=int, default=16)
    ap.add_argument("--lora_alpha", type=float, default=16.0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of the median (compilation, allocator)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny shape (overrides the shape options)")
    ap.add_argument("--data", required=True, help="llm.c token file")
    ap.add_argument("--out", required=True, help="where the JSON result goes")
    args = ap.parse_args()
    if args.tiny:
        for k, v in TINY.items():
            setattr(args, k, v)
        args.steps = min(args.steps, 4)
        args.warmup = min(args.warmup, 1)
    missing = [k for k in ("n_layer", "n_head", "d_model", "seq_len", "batch") if getattr(args, k) is None]
    if missing:
        ap.error("give --tiny or the shape: missing " + ", ".join("--" + k for k in missing))
    if args.mode != "pretrain" and args.rank:
        ap.error("--rank is for --mode pretrain (finetuning here starts from a dense base)")

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    torch.manual_seed(1337)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 work outside autocast: as lrllm's tensor-core math
    model = build(args, dev)
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=6e-4, betas=(0.9, 0.95), eps=1e-8, **({"fused": True} if cuda else {}))
    step_fn = torch.compile(model) if args.compile else model
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.mode != "full")

    tokens = read_tokens(args.data)
    B, T = args.batch, args.seq_len
    need = B * T + 1
    if len(tokens) < need:
        raise SystemExit(f"bench_gpu_torch: {args.data} has {len(tokens)} tokens, fewer than one batch ({need})")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)

    times, losses = [], []
    for step in range(args.steps):
        start = (step * B * T) % (len(tokens) - need + 1)
        chunk = torch.from_numpy(np.asarray(tokens[start:start + need], dtype=np.int64) % args.vocab).to(dev)
        x, y = chunk[:-1].view(B, T), chunk[1:].view(B, T)
        if cuda:
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = step_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        if cuda:
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())

    step_s = statistics.median(times[args.warmup:] or times)
    result = {
        "torch_version": torch.__version__,
        "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "mode": args.mode,
        "compile": args.compile,
        "shape": {k: getattr(args, k) for k in ("n_layer", "n_head", "d_model", "seq_len", "vocab", "batch")},
        "rank": args.rank,
        "lora_rank": args.lora_rank if args.mode == "lora" else 0,
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in trainable),
        "linear_weights": sum(m.weight_count() for m in model.modules() if isinstance(m, SiteLinear)),
        "steps": args.steps,
        "step_s": step_s,
        "tokens_per_s": B * T / step_s,
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }
    if cuda:
        result["peak_alloc_bytes"] = torch.cuda.max_memory_allocated(dev)
        result["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(dev)
    else:
        result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(args.out, "w") as f:
        json.dump(result, f)
        f.write("\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
