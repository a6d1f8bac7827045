#!/usr/bin/python3
"""PyTorch reference for `make bench`: the same GPT-2 (or Llama) lrllm trains, timed the same way.

GPT-2 as lrllm builds it: learned token and position embeddings, pre-LayerNorm blocks (attention, then a tanh-GELU
MLP with d_ff = 4 d), a final LayerNorm and an lm_head tied to the token embedding. A low-rank site is two factors,
A [r, in] without bias and B [out, r] with the site's bias. float32, AdamW (betas .9/.95, weight decay .1 on 2-D
tensors only), gradient clipping at 1.0. Plain nn.Module code in eager mode: no torch.compile.

Llama (--arch llama) as lrllm builds it: token embedding, pre-RMSNorm blocks (attention with rotary q and k and
grouped-query heads, then a SwiGLU MLP over one fused gate|up projection), no biases, a final RMSNorm and an
untied lm_head.

Prints one JSON object on stdout: tokens/s (median step time after the warm-up steps), parameter count, peak RSS.
"""

import argparse
import json
import math
import resource
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HAVE_SDPA = hasattr(F, "scaled_dot_product_attention")


class SiteLinear(nn.Module):
    """y = x W^T + b, or y = (x A^T) B^T + b when rank > 0; without b when bias is False (Llama)."""

    def __init__(self, d_in, d_out, rank, bias=True):
        super().__init__()
        self.rank = rank
        if rank > 0:
            self.A = nn.Parameter(torch.empty(rank, d_in))
            self.B = nn.Parameter(torch.empty(d_out, rank))
        else:
            self.W = nn.Parameter(torch.empty(d_out, d_in))
        self.b = nn.Parameter(torch.zeros(d_out)) if bias else None

    def init(self, std):
        if self.rank > 0:
            # A product of two rank-r factors has variance r * sa^2 * sb^2; match the dense layer's.
            s = math.sqrt(std / math.sqrt(self.rank))
            nn.init.normal_(self.A, std=s)
            nn.init.normal_(self.B, std=s)
        else:
            nn.init.normal_(self.W, std=std)

    def weight_count(self):
        return self.A.numel() + self.B.numel() if self.rank > 0 else self.W.numel()

    def forward(self, x):
        if self.rank > 0:
            return F.linear(F.linear(x, self.A), self.B, self.b)
        return F.linear(x, self.W, self.b)


class Block(nn.Module):
    def __init__(self, d, n_head, d_ff, rank):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(d)
        self.qkv = SiteLinear(d, 3 * d, rank)
        self.proj = SiteLinear(d, d, rank)
        self.ln_2 = nn.LayerNorm(d)
        self.fc = SiteLinear(d, d_ff, rank)
        self.mlp_proj = SiteLinear(d_ff, d, rank)

    def attention(self, x):
        Bsz, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        hs = C // self.n_head
        q, k, v = (t.view(Bsz, T, self.n_head, hs).transpose(1, 2) for t in (q, k, v))
        if HAVE_SDPA:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # PyTorch before 2.0 has no fused attention: the textbook masked softmax.
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            att = att.masked_fill(mask, float("-inf")).softmax(dim=-1)
            y = att @ v
        return self.proj(y.transpose(1, 2).reshape(Bsz, T, C))

    def forward(self, x):
        x = x + self.attention(self.ln_1(x))
        return x + self.mlp_proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, n_layer, n_head, d, seq_len, vocab, rank):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(seq_len, d)
        self.h = nn.ModuleList(Block(d, n_head, 4 * d, rank) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.wpe.weight, std=0.02)
        resid_std = 0.02 / math.sqrt(2 * n_layer)
        for blk in self.h:
            blk.qkv.init(0.02)
            blk.proj.init(resid_std)
            blk.fc.init(0.02)
            blk.mlp_proj.init(resid_std)

    def forward(self, idx, targets):
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for blk in self.h:
            x = blk(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied lm_head
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.w = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.w


def rotate(x, cos, sin):
    """Hugging Face's rotate_half pairing: dimension i turns with i + head_size / 2."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class LlamaBlock(nn.Module):
    def __init__(self, d, n_head, n_kv_head, d_ff, rank):
        super().__init__()
        self.n_head, self.n_kv_head, self.d_ff = n_head, n_kv_head, d_ff
        hs = d // n_head
        self.ln_1 = RMSNorm(d)
        self.qkv = SiteLinear(d, d + 2 * n_kv_head * hs, rank, bias=False)
        self.proj = SiteLinear(d, d, rank, bias=False)
        self.ln_2 = RMSNorm(d)
        self.fc = SiteLinear(d, 2 * d_ff, rank, bias=False)
        self.mlp_proj = SiteLinear(d_ff, d, rank, bias=False)

    def attention(self, x, cos, sin):
        Bsz, T, C = x.shape
        hs = C // self.n_head
        q, k, v = self.qkv(x).split([C, self.n_kv_head * hs, self.n_kv_head * hs], dim=2)
        q = q.view(Bsz, T, self.n_head, hs).transpose(1, 2)
        k, v = (t.view(Bsz, T, self.n_kv_head, hs).transpose(1, 2) for t in (k, v))
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        groups = self.n_head // self.n_kv_head
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if HAVE_SDPA:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            y = att.masked_fill(mask, float("-inf")).softmax(dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(Bsz, T, C))

    def forward(self, x, cos, sin):
        x = x + self.attention(self.ln_1(x), cos, sin)
        gate, up = self.fc(self.ln_2(x)).split(self.d_ff, dim=-1)
        return x + self.mlp_proj(F.silu(gate) * up)


class Llama(nn.Module):
    def __init__(self, n_layer, n_head, n_kv_head, d, d_ff, seq_len, vocab, rank, theta=10000.0):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.h = nn.ModuleList(LlamaBlock(d, n_head, n_kv_head, d_ff, rank) for _ in range(n_layer))
        self.ln_f = RMSNorm(d)
        self.lm_head = nn.Parameter(torch.empty(vocab, d))
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.lm_head, std=0.02)
        resid_std = 0.02 / math.sqrt(2 * n_layer)
        for blk in self.h:
            blk.qkv.init(0.02)
            blk.proj.init(resid_std)
            blk.fc.init(0.02)
            blk.mlp_proj.init(resid_std)
        hs = d // n_head
        inv_freq = 1.0 / theta ** (torch.arange(0, hs, 2, dtype=torch.float32) / hs)
        angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, idx, targets):
        T = idx.shape[1]
        x = self.wte(idx)
        cos, sin = self.cos[:T], self.sin[:T]
        for blk in self.h:
            x = blk(x, cos, sin)
        logits = F.linear(self.ln_f(x), self.lm_head)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def read_tokens(path):
    """An llm.c token file: 256 int32 header (magic 20240520, version 1, count), then uint16 tokens."""
    header = np.fromfile(path, dtype=np.int32, count=256)
    if header[0] != 20240520:
        sys.exit(f"bench_torch: {path} is not an llm.c token file")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=256 * 4, shape=(int(header[2]),))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n_layer", type=int, required=True)
    ap.add_argument("--n_head", type=int, required=True)
    ap.add_argument("--d_model", type=int, required=True)
    ap.add_argument("--seq_len", type=int, required=True)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--rank", type=int, default=0, help="low-rank rank on all four sites; 0 is dense")
    ap.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    ap.add_argument("--n_kv_head", type=int, default=0, help="llama: key/value heads (0: n_head)")
    ap.add_argument("--d_ff", type=int, default=0, help="llama: the SwiGLU width (0: 4 d_model)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", required=True, help="llm.c token file")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(1337)
    if args.arch == "llama":
        model = Llama(args.n_layer, args.n_head, args.n_kv_head or args.n_head, args.d_model,
                      args.d_ff or 4 * args.d_model, args.seq_len, args.vocab, args.rank)
    else:
        model = GPT(args.n_layer, args.n_head, args.d_model, args.seq_len, args.vocab, args.rank)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=6e-4, betas=(0.9, 0.95), eps=1e-8)

    tokens = read_tokens(args.data)
    B, T = args.batch, args.seq_len
    need = B * T + 1
    if len(tokens) < need:
        sys.exit(f"bench_torch: {args.data} has {len(tokens)} tokens, fewer than one batch ({need})")

    times, losses = [], []
    for step in range(args.steps):
        start = (step * B * T) % (len(tokens) - need + 1)
        chunk = torch.from_numpy(np.asarray(tokens[start:start + need], dtype=np.int64))
        x, y = chunk[:-1].view(B, T), chunk[1:].view(B, T)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())

    linear = sum(m.weight_count() for m in model.modules() if isinstance(m, SiteLinear))
    timed = times[args.warmup:] or times
    step_s = statistics.median(timed)
    print(json.dumps({
        "torch_version": torch.__version__,
        "attention": "sdpa" if HAVE_SDPA else "masked-softmax (no F.scaled_dot_product_attention before torch 2.0)",
        "compile": False,
        "threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in model.parameters()),
        "linear_weights": linear,
        "step_s": step_s,
        "tokens_per_s": B * T / step_s,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))


if __name__ == "__main__":
    main()
