#!/usr/bin/python3
"""Reference checks: lrllm against an independent float64 PyTorch GPT-2 (gpt2_torch.py).

Prints one line per check, `PASS name` or `FAIL name: reason`; exits 0 only if all pass.

Checks
  reference_selftest       the PyTorch reference itself: its LayerNorm / GELU / attention /
                           cross-entropy against torch.nn's, and a low-rank layer against the
                           dense layer W = B@A.
  grad_{dense,lowrank,mixed}_loss   build/tests/grad_dump's loss vs float64 torch (rel <= 1e-5)
  grad_{dense,lowrank,mixed}_grads  every gradient tensor: |g - g_ref| / |g_ref| <= 1e-4
  grad_lowrank_silu{,_mixed}_{loss,grads}  the same with lowrank.activation silu (B silu(A x) + b)
                           on every site and on qkv and fc
  grad_packed_{loss,grads} the same for rows that pack three examples each (grad_dump
                           --segments): positions restart, attention masked to each example
  train_{dense,lowrank}_{loss,lr,grad_norm}   10 AdamW steps of `lrllm --mode pretrain`
                           (metrics.h5) vs the float64 torch loop, per step
  train_{dense,lowrank}_weights   final weights of the step-10 checkpoint (rel <= 1e-4 per tensor;
                           the k rows of qkv/b, whose gradient is exactly 0, only by |moved| <= sum(lr))
  train_{dense,lowrank}_moments   its AdamW m and v (rel <= 1e-4 per tensor) and step attr
  lora_{none,int8,nf4,lowrank}_{loss,grads,base}   finetuning: `lrllm --mode finetune` (2 steps of
                           LoRA over a frozen GPT-2-vocabulary base stored as float32, int8 (block
                           100: short last blocks), double-quantized NF4, or a low-rank qkv/fc
                           base stored NF4 (A, B and dense W alike) with adapters on qkv,mlp_proj
                           only; a quantized base stores the tied wte quantized too), then
                           grad_dump on its checkpoint vs the torch model built from the numpy
                           dequantization of the stored base plus the adapters:
                             loss   rel <= 1e-5 (and the trained adapters must move the loss)
                             grads  exactly the lora_A/lora_B gradients (no base tensor's), each
                                    rel <= 1e-4
                             base   every float tensor bit-identical to the base file; a
                                    quantized W, A, B or wte: codes/scales equal to the numpy
                                    quantization of the base tensor, dequantization within the
                                    error bound
  generate_{dense,lowrank}  `lrllm --mode generate` greedy (45 tokens from a prompt of the GPT-2
                           tokenizer, so the window of seq_len 32 slides) vs the float64 torch
                           model's argmax continuation over the same HDF5 weights, token for token
                           (decoded with OpenAI's byte-level table); each step's top-2 logit gap is
                           checked to be far above float32 rounding, so the comparison is decisive

  llama_reference_selftest  llama_torch.py itself: RMSNorm against its formula, silu and the
                           cross-entropy over targets >= 0 against torch's, rope at position 0 the
                           identity and rotate_half's pairing on basis vectors, attention with
                           NKV = NH against gpt2_torch's over pre-rotated q, k (causal and packed),
                           GQA == MHA with repeated kv heads, low-rank == dense(B@A), LoRA == merged
                           W, the file layout, and autograd against central differences
  llama_{dense,lowrank,mixed,gqa_kv2,gqa_kv1,packed}_{loss,grads}   grad_dump on arch = llama
                           checkpoints vs llama_torch.py (rel <= 1e-5 / 1e-4): dense with NKV = NH,
                           NKV 2 of NH 4 (lowrank, mixed, packed), 2 of 8 and 1 of 4 (gqa_*), packed
                           rows via --segments, rope_theta and norm_eps off Llama-2's in some
  llama_lora_{float,int8,nf4,nf4_mixed}_{loss,grads}   adapters on every site over a float32, int8
                           (block 100) or double-quantized NF4 base (nf4_mixed: low-rank qkv and fc,
                           A and B stored NF4), the checkpoint written here: the loss, and
                           exactly the adapters' gradients, vs torch over the numpy dequantization
  llama_finetune_{nf4,int8_mixed}_{loss,grads,base}   as lora_*, for `lrllm --mode finetune` of a
                           Llama base (Llama-2 tokenizer, V 32000): NF4 with adapters on every site,
                           int8 (block 100) of a mixed base with adapters on qkv,mlp_proj; wte and
                           the untied lm_head are stored quantized as well
  llama_train_{dense,mixed}_{loss,lr,grad_norm,weights,moments}   as train_*, for GQA Llama models
                           (weight decay on wte, lm_head, W, A, B; not on the RMSNorm weights)
  llama_generate_{gqa_kv2,lowrank}   greedy `lrllm --mode generate` of a Llama over the Llama-2
                           tokenizer vs llama_torch's argmax, token for token (the prompt after <s>;
                           the continuation decoded from tokenizer.json's pieces), as generate_*

The torch side runs in float64 throughout (model, gradients and the AdamW loop).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

import h5py
import numpy as np
import torch
import torch.nn.functional as Fn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpt2_torch as ref  # noqa: E402
import llama_torch as llama  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4
TRAIN_LOSS_RTOL = 1e-4
LR_RTOL = 1e-12
GNORM_RTOL = 1e-4
WEIGHT_RTOL = 1e-4

SMALL = dict(vocab_size=512, seq_len=32, n_layer=2, n_head=4, d_model=64, d_ff=256)
VARIANTS = {
    "dense": ref.Config(**SMALL),
    "lowrank": ref.Config(**SMALL, lowrank_rank=8, lowrank_targets=tuple(ref.LINEAR_SITES)),
    "mixed": ref.Config(**SMALL, lowrank_rank=8, lowrank_targets=("qkv", "fc")),
    # lowrank.activation silu (CoLA's B silu(A x) + b), on every site and on a mixed model.
    "lowrank_silu": ref.Config(**SMALL, lowrank_rank=8, lowrank_targets=tuple(ref.LINEAR_SITES),
                               lowrank_activation="silu"),
    "lowrank_silu_mixed": ref.Config(**SMALL, lowrank_rank=8, lowrank_targets=("qkv", "fc"),
                                     lowrank_activation="silu"),
}
BATCH = 4


class CheckFailed(Exception):
    pass


RESULTS: list[tuple[str, bool, str]] = []


def record(name: str, fn, *args):
    """Run one check; any exception is a FAIL with a one-line reason (no traceback spew)."""
    try:
        fn(*args)
        RESULTS.append((name, True, ""))
        print(f"PASS {name}", flush=True)
    except CheckFailed as e:
        RESULTS.append((name, False, str(e)))
        print(f"FAIL {name}: {e}", flush=True)
    except Exception as e:  # a bug or a broken file: still one informative line
        tb = traceback.extract_tb(e.__traceback__)[-1]
        msg = f"{type(e).__name__}: {e} (at {os.path.basename(tb.filename)}:{tb.lineno})"
        RESULTS.append((name, False, msg))
        print(f"FAIL {name}: {msg}", flush=True)


def rel_err(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    nb = np.linalg.norm(b)
    d = np.linalg.norm(a - b)
    return d / nb if nb > 0 else d


def compare_tensors(got: dict, want: dict, rtol: float, what: str):
    """Fail on missing tensors, shape mismatches, non-finite values or rel error > rtol."""
    missing = [k for k in want if k not in got]
    if missing:
        more = f" (+{len(missing) - 4} more)" if len(missing) > 4 else ""
        raise CheckFailed(f"{len(missing)} {what} missing: {', '.join(missing[:4])}{more}")
    errs = []
    for k, w in want.items():
        g = got[k]
        if tuple(g.shape) != tuple(w.shape):
            raise CheckFailed(f"{what} {k} has shape {tuple(g.shape)}, expected {tuple(w.shape)}")
        if not np.all(np.isfinite(g)):
            raise CheckFailed(f"{what} {k} has non-finite values")
        errs.append((rel_err(g, w), k))
    errs.sort(reverse=True)
    worst, name = errs[0]
    if worst > rtol:
        bad = [f"{k} {e:.2e}" for e, k in errs if e > rtol]
        more = f" (+{len(bad) - 4} more)" if len(bad) > 4 else ""
        raise CheckFailed(f"{len(bad)}/{len(errs)} {what} over {rtol:g}; worst: "
                          f"{'; '.join(bad[:4])}{more}")


def run_cmd(cmd: list[str], timeout: int = 300):
    exe = cmd[0]
    if not os.path.isfile(exe) or not os.access(exe, os.X_OK):
        shown = os.path.relpath(exe, REPO) if exe.startswith(REPO + os.sep) else exe
        raise CheckFailed(f"{shown} not found or not executable "
                          f"(build it with `make -C {REPO} all`)")
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"{os.path.basename(exe)} timed out after {timeout}s")
    if p.returncode != 0:
        tail = (p.stderr.strip() or p.stdout.strip()).splitlines()[-3:]
        raise CheckFailed(f"{os.path.basename(exe)} exited {p.returncode}: {' | '.join(tail)}")
    return p, time.time() - t0


# ----------------------------------------------------------------------------------------------
# 0. The reference itself


def check_selftest():
    torch.manual_seed(0)
    d = torch.float64
    x = torch.randn(3, 7, 16, dtype=d)
    w, b = 1 + 0.1 * torch.randn(16, dtype=d), 0.1 * torch.randn(16, dtype=d)
    e = (ref.layer_norm(x, w, b) - Fn.layer_norm(x, (16,), w, b, eps=1e-5)).abs().max().item()
    if e > 1e-12:
        raise CheckFailed(f"layer_norm differs from F.layer_norm by {e:.2e}")
    e = (ref.gelu_tanh(x) - Fn.gelu(x, approximate="tanh")).abs().max().item()
    if e > 1e-12:
        raise CheckFailed(f"gelu_tanh differs from F.gelu(approximate='tanh') by {e:.2e}")
    # Attention against nn.MultiheadAttention (fused in_proj = q,k,v rows; contiguous heads).
    C, H, T = 16, 4, 7
    mha = torch.nn.MultiheadAttention(C, H, batch_first=True, dtype=d)
    qkv = x @ mha.in_proj_weight.T + mha.in_proj_bias
    mine = ref.attention(qkv, H) @ mha.out_proj.weight.T + mha.out_proj.bias
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)  # True = masked
    theirs, _ = mha(x, x, x, attn_mask=causal, need_weights=False)
    e = (mine - theirs).abs().max().item()
    if e > 1e-12:
        raise CheckFailed(f"attention differs from nn.MultiheadAttention by {e:.2e}")
    logits, tgt = torch.randn(5, 11, dtype=d), torch.randint(0, 11, (5,))
    z = logits - logits.amax(-1, keepdim=True)
    mine = (-(z - z.exp().sum(-1, keepdim=True).log()).gather(-1, tgt[:, None])).mean()
    e = abs(mine.item() - Fn.cross_entropy(logits, tgt).item())
    if e > 1e-12:
        raise CheckFailed(f"cross-entropy differs from F.cross_entropy by {e:.2e}")
    # Low-rank model == dense model with W = B@A; and the tied head.
    cfg = VARIANTS["lowrank"]
    p = ref.init_params(cfg, seed=7)
    dense = {}
    for k, v in p.items():
        if k.endswith("/A"):
            continue
        if k.endswith("/B"):
            dense[k[:-2] + "/W"] = p[k].astype(np.float64) @ p[k[:-2] + "/A"].astype(np.float64)
        else:
            dense[k] = v
    rng = np.random.default_rng(1)
    toks = rng.integers(0, cfg.vocab_size, size=BATCH * cfg.seq_len + 1)
    xb, yb = ref.batch(toks, cfg.seq_len, range(BATCH))
    l1, _ = ref.loss_and_grads(p, cfg, xb, yb)
    l2, _ = ref.loss_and_grads(dense, ref.Config(**SMALL), xb, yb)
    if abs(l1 - l2) > 1e-12 * abs(l2):
        raise CheckFailed(f"low-rank loss {l1!r} != dense(B@A) loss {l2!r}")
    if not (5.0 < l1 < 7.5):
        raise CheckFailed(f"initial loss {l1} is not near ln(V) = {math.log(cfg.vocab_size):.3f}")
    selftest_lora_quant()


def selftest_lora_quant():
    """LoRA == dense with W + (alpha/r) lora_B@lora_A; int8/NF4 on hand-worked values."""
    base = ref.Config(**SMALL)
    cfg = ref.Config(**SMALL, lora_rank=4, lora_alpha=6.0, lora_targets=("qkv", "mlp_proj"))
    p = ref.init_params(base, seed=8)
    rng = np.random.default_rng(9)
    merged = dict(p)
    for i in range(cfg.n_layer):
        for site in cfg.lora_targets:
            out, inp = ref.site_shape(cfg, site)
            sp = ref.site_path(i, site)
            p[sp + "/lora_A"] = (0.3 * rng.standard_normal((4, inp))).astype(np.float32)
            p[sp + "/lora_B"] = (0.3 * rng.standard_normal((out, 4))).astype(np.float32)
            merged[sp + "/W"] = p[sp + "/W"].astype(np.float64) + 1.5 * (
                p[sp + "/lora_B"].astype(np.float64) @ p[sp + "/lora_A"].astype(np.float64))
    toks = rng.integers(0, cfg.vocab_size, size=2 * cfg.seq_len + 1)
    xb, yb = ref.batch(toks, cfg.seq_len, range(2))
    l1, g1 = ref.loss_and_grads(p, cfg, xb, yb, trainable=ref.is_lora)
    l2, _ = ref.loss_and_grads(merged, base, xb, yb)
    l0, _ = ref.loss_and_grads({k: v for k, v in p.items() if not ref.is_lora(k)}, base, xb, yb)
    if abs(l1 - l2) > 1e-12 * abs(l2) or abs(l1 - l0) < 1e-3:
        raise CheckFailed(f"LoRA loss {l1!r} != merged-W loss {l2!r} (no-adapter loss {l0!r})")
    if sorted(g1) != sorted(k for k in p if ref.is_lora(k)):
        raise CheckFailed(f"trainable=is_lora gave gradients for {sorted(g1)}")
    # int8, block 4: codes round(127 x / absmax), half away from zero; value code*(absmax/127).
    q = ref.quantize(np.array([2, -1, 0.5, 0, 0.75], np.float32), "int8", block=4)
    if q["codes"].tolist() != [127, -64, 32, 0, 127] or q["absmax"].tolist() != [2, 0.75]:
        raise CheckFailed(f"int8 codes {q['codes'].tolist()} absmax {q['absmax'].tolist()}")
    d = ref.dequantize(q)
    want = np.array([127, -64, 32, 0], np.float32) * np.float32(2 / 127)
    if not np.array_equal(d[:4], want) or d[4] != np.float32(0.75):
        raise CheckFailed(f"int8 dequantization {d.tolist()}")
    # NF4, block 4, no double quant: 1 -> 15, -1 -> 0, 0 -> 7, 0.5 -> 12 (0.4407 < 0.5 < mid
    # 0.5016), the exact 0/0.0796 midpoint -> 7 (the lower code), last nibble of an odd count 0.
    mid = np.float32((0.0 + 0.07958029955625534) / 2)
    q = ref.quantize(np.array([1, -1, 0, 0.5, 2 * mid, -2, 2], np.float32), "nf4", block=4,
                     double_quant=False)
    if q["codes"].tolist() != [0xF0, 0x7C, 0x70, 0xF0]:
        raise CheckFailed(f"nf4 packed codes {[hex(c) for c in q['codes']]}")
    d = ref.dequantize(q)
    if d.tolist() != [1, -1, 0, np.float32(0.44070982933044434), 0, -2, 2]:
        raise CheckFailed(f"nf4 dequantization {d.tolist()}")
    # Double quantization of random blocks: error within 0.1519 absmax + the absmax's own error.
    x = rng.standard_normal((37, 29)).astype(np.float32) * np.linspace(0.1, 3, 29, dtype=np.float32)
    q = ref.quantize(x, "nf4", block=8)
    err, bound = nf4_error_and_bound(x, q)
    if not np.all(err <= bound) or q["absmax_q"].dtype != np.int8:
        raise CheckFailed(f"double-quantized NF4 error {err.max():.3g} beyond its bound")


def nf4_error_and_bound(x, q):
    """Per value |x - dequant| and its bound: 0.15191 * exact block absmax (the largest half gap
    between NF4 levels is 0.1519036) + |dequantized absmax - exact absmax| + float rounding."""
    n = x.size
    exact = ref._block_absmax(x.reshape(-1), q["block"])
    used = ref.block_absmax(q)
    a = ref._per_value(exact, n, q["block"]).astype(np.float64)
    da = ref._per_value(np.abs(used.astype(np.float64) - exact), n, q["block"])
    err = np.abs(ref.dequantize(q).reshape(-1).astype(np.float64) - x.reshape(-1))
    return err, 0.15191 * a + da + 1e-6 * (a + da)


# ----------------------------------------------------------------------------------------------
# 1. Loss and gradients of one batch


def packed_positions(segments: list[int], T: int, rows: int) -> torch.Tensor:
    """grad_dump --segments: examples of these lengths in every row, then one of the rest."""
    row = [p for n in segments for p in range(n)]
    row += list(range(T - len(row)))
    return torch.tensor([row] * rows, dtype=torch.long)


def prepare_grad_case(work, name, cfg, seed, segments=None, model=ref):
    """Checkpoint and token file of check `name`, and the torch loss and gradients of their first
    BATCH sequences; model: the reference module (gpt2_torch or llama_torch)."""
    params = model.init_params(cfg, seed=seed)
    ckpt = os.path.join(work, f"{name}.h5")
    model.save_checkpoint(ckpt, cfg, params)
    rng = np.random.default_rng(seed + 1000)
    toks = rng.integers(0, cfg.vocab_size, size=(BATCH + 2) * cfg.seq_len + 3)
    data = os.path.join(work, f"{name}.bin")
    ref.write_tokens(data, toks)
    x, y = ref.batch(toks, cfg.seq_len, range(BATCH))
    positions = packed_positions(segments, cfg.seq_len, BATCH) if segments else None
    loss, grads = model.loss_and_grads(params, cfg, x, y, positions=positions)
    return ckpt, data, loss, grads


def grad_dump(build, ckpt, data, out, segments=None):
    """build/tests/grad_dump on the first BATCH sequences of `data`: (loss, gradients by name)."""
    exe = os.path.join(build, "tests", "grad_dump")
    packing = ["--segments", ",".join(map(str, segments))] if segments else []
    run_cmd([exe, "--init", ckpt, "--data", data, "--batch", str(BATCH), "--out", out] + packing)
    if not os.path.exists(out):
        raise CheckFailed(f"grad_dump exited 0 but wrote no {os.path.basename(out)}")
    with h5py.File(out, "r") as f:
        if "loss" not in f.attrs:
            raise CheckFailed("grad_dump output has no root attr 'loss'")
        return float(f.attrs["loss"]), ref.read_group_tensors(f, "grads")


def once(fn):
    """fn runs on the first call only; later calls return its result, or raise its error, again."""
    memo = {}

    def wrapper():
        if "err" in memo:
            raise memo["err"]
        if "out" not in memo:
            try:
                memo["out"] = fn()
            except Exception as e:  # noqa: BLE001 - remembered for every check that shares the run
                memo["err"] = e
                raise
        return memo["out"]

    return wrapper


def run_grad_case(build, work, name, cfg, seed, segments=None, model=ref):
    """Returns a pair of check functions (loss, grads) sharing one grad_dump run; with segments,
    every row packs examples of those lengths (and one of the rest)."""
    @once
    def run():
        ckpt, data, loss, grads = prepare_grad_case(work, name, cfg, seed, segments, model)
        got_loss, got = grad_dump(build, ckpt, data, os.path.join(work, f"{name}_out.h5"), segments)
        return (got_loss, loss, got, grads)

    def check_loss():
        got_loss, loss, _, _ = run()
        e = abs(got_loss - loss) / abs(loss)
        if not (e <= LOSS_RTOL):
            raise CheckFailed(f"loss lrllm {got_loss:.9f} vs torch {loss:.9f} (rel {e:.2e} > "
                              f"{LOSS_RTOL:g})")

    def check_grads():
        _, _, got, grads = run()
        compare_tensors(got, grads, GRAD_RTOL, "gradients")

    return check_loss, check_grads


# ----------------------------------------------------------------------------------------------
# 2. Ten AdamW steps of lrllm --mode pretrain


def find_final_checkpoint(run_dir, steps):
    cand = [os.path.join(run_dir, f"ckpt_{steps:06d}.h5"), os.path.join(run_dir, "latest.h5")]
    for c in cand:
        if os.path.exists(c):
            return c
    have = sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []
    raise CheckFailed(f"no ckpt_{steps:06d}.h5 or latest.h5 in the run dir (has: "
                      f"{', '.join(have) or 'nothing'})")


def run_train_case(build, work, name, cfg, seed, n_seq, model=ref):
    """Checks of `lrllm --mode pretrain` from a checkpoint of model (gpt2_torch or llama_torch)."""
    tc = ref.TrainConfig(steps=10, batch_size=BATCH)
    @once
    def run():
        params = model.init_params(cfg, seed=seed)
        ckpt = os.path.join(work, f"{name}.h5")
        model.save_checkpoint(ckpt, cfg, params)
        rng = np.random.default_rng(seed + 1000)
        toks = rng.integers(0, cfg.vocab_size, size=n_seq * cfg.seq_len + 1 + 5)
        data = os.path.join(work, f"{name}.bin")
        ref.write_tokens(data, toks)
        run_dir = os.path.join(work, f"run_{name}")
        exe = os.path.join(build, "lrllm")
        cmd = [exe, "--mode", "pretrain", "--model.init", ckpt, "--data.train", data,
               "--data.val", data, "--data.shuffle", "false",
               "--train.steps", str(tc.steps), "--train.batch_size", str(tc.batch_size),
               "--train.grad_accum", "1", "--train.lr", repr(tc.lr),
               "--train.min_lr", repr(tc.min_lr), "--train.warmup", str(tc.warmup),
               "--train.weight_decay", repr(tc.weight_decay),
               "--train.grad_clip", repr(tc.grad_clip), "--train.eval_every", "0",
               "--run.dir", run_dir, "--device", "cpu"]
        run_cmd(cmd)
        hist, final, opt = model.train(params, cfg, toks, tc)
        return (run_dir, hist, final, opt, tc)

    def metrics(run_dir):
        path = os.path.join(run_dir, "metrics.h5")
        if not os.path.exists(path):
            raise CheckFailed("no metrics.h5 in the run dir")
        with h5py.File(path, "r") as f:
            out = {}
            for k in ("step", "loss", "lr", "grad_norm"):
                if f"metrics/{k}" not in f:
                    raise CheckFailed(f"metrics.h5 has no /metrics/{k}")
                out[k] = np.asarray(f[f"metrics/{k}"][()], dtype=np.float64)
        steps = out["step"]
        if len(steps) != tc.steps or not np.array_equal(steps, np.arange(1, tc.steps + 1)):
            raise CheckFailed(f"/metrics/step is {steps.tolist()}, expected 1..{tc.steps}")
        return out

    def per_step(key, rtol, fmt):
        def check():
            run_dir, hist, _, _, _ = run()
            got = metrics(run_dir)[key]
            want = np.array(hist[key])
            e = np.abs(got - want) / np.abs(want)
            bad = np.nonzero(~(e <= rtol))[0]
            if len(bad):
                k = int(bad[0])
                raise CheckFailed(
                    f"{len(bad)}/{tc.steps} steps over {rtol:g}; first at step {k + 1}: lrllm "
                    f"{got[k]:{fmt}} vs torch {want[k]:{fmt}} (rel {e[k]:.2e}); max rel "
                    f"{np.nanmax(e):.2e} at step {int(np.nanargmax(e)) + 1}")
        return check

    def check_weights():
        run_dir, hist, final, _, _ = run()
        with h5py.File(find_final_checkpoint(run_dir, tc.steps), "r") as f:
            got = ref.read_group_tensors(f, "model")
        # The key part of the qkv bias has an exactly-zero gradient (adding q.b_k to every score
        # of a row does not change the softmax), so in float32 Adam turns round-off into moves
        # of up to ~lr a step there (lrllm: ~4e-4 in all), while float64 torch leaves it in place.
        # Those rows only get a sanity bound, sum(lr), the most Adam can move a parameter in
        # these steps; the q and v rows are compared relatively like every other tensor. (Llama
        # has no biases: nothing to set apart there.)
        C = cfg.d_model
        got, want = dict(got), dict(final)
        kbound = sum(hist["lr"])
        for i in range(cfg.n_layer):
            name = f"h.{i}/attn/qkv/b"
            if name not in got or name not in want or got[name].shape != want[name].shape:
                continue  # compare_tensors reports it
            dk = np.abs(got[name][C:2 * C] - want[name][C:2 * C]).max()
            if not dk <= kbound:
                raise CheckFailed(f"{name}[k rows] moved {dk:.2e}, more than Adam can in "
                                  f"{tc.steps} steps ({kbound:.1e}); their gradient is exactly 0")
            for key in (got, want):
                key[name] = np.concatenate([key[name][:C], key[name][2 * C:]])
        compare_tensors(got, want, WEIGHT_RTOL, "weights")

    def check_moments():
        run_dir, _, _, opt, _ = run()
        with h5py.File(find_final_checkpoint(run_dir, tc.steps), "r") as f:
            if "optimizer" not in f:
                raise CheckFailed("checkpoint has no /optimizer group")
            step = f["optimizer"].attrs.get("step")
            if step is None or int(step) != tc.steps:
                raise CheckFailed(f"/optimizer attr step is {step}, expected {tc.steps}")
            got_m = ref.read_group_tensors(f, "optimizer/m")
            got_v = ref.read_group_tensors(f, "optimizer/v")
        compare_tensors(got_m, opt["m"], WEIGHT_RTOL, "first moments (m)")
        compare_tensors(got_v, opt["v"], WEIGHT_RTOL, "second moments (v)")

    return [("loss", per_step("loss", TRAIN_LOSS_RTOL, ".9f")),
            ("lr", per_step("lr", LR_RTOL, ".17g")),
            ("grad_norm", per_step("grad_norm", GNORM_RTOL, ".9g")),
            ("weights", check_weights), ("moments", check_moments)]


# ----------------------------------------------------------------------------------------------
# 3. Finetuning: LoRA over a frozen (quantized) base, `lrllm --mode finetune` then grad_dump

LORA_SMALL = dict(vocab_size=50257, seq_len=32, n_layer=2, n_head=2, d_model=32, d_ff=64)
# name: (base config, quant.bits, quant.block, lora.targets, lora.modules_to_save[, trainable tokens])
LORA_CASES = {
    "none": (ref.Config(**LORA_SMALL), 0, 64, "all", ""),
    "int8": (ref.Config(**LORA_SMALL), 8, 100, "all", ""),
    "nf4": (ref.Config(**LORA_SMALL), 4, 64, "all", ""),
    "lowrank": (ref.Config(**LORA_SMALL, lowrank_rank=4, lowrank_targets=("qkv", "fc")), 4, 64,
                "qkv,mlp_proj", ""),
    # LayerNorms, biases and a float32 embedding trained in full beside adapters over an NF4 base.
    "nf4_saved": (ref.Config(**LORA_SMALL), 4, 64, "all", "ln_f,h.*/ln_2,h.1/attn/qkv/b,wpe"),
    "none_saved_wte": (ref.Config(**LORA_SMALL), 0, 64, "qkv", "wte,h.0/ln_1/w"),
    # Trainable tokens over an NF4 embedding and a float32 one: ids that the batch's inputs hold (both sides of
    # the tied wte then have a gradient) and the end-of-text, which they do not (the lm_head side only).
    "nf4_tokens": (ref.Config(**LORA_SMALL), 4, 64, "all", "ln_f", "batch"),
    "none_tokens": (ref.Config(**LORA_SMALL), 0, 64, "fc", "", "batch"),
}


def saved_module(patterns: str):
    """lora.modules_to_save as a predicate on tensor names, from its documented rule (include/lrllm/model/model.h):
    a pattern names a tensor or a module above it, '*' matching within one path component."""
    import fnmatch
    pats = [p for p in patterns.split(",") if p]

    def match(pattern, text):  # fnmatch's '*' crosses '/', the rule's does not
        return len(pattern.split("/")) == len(text.split("/")) and all(
            fnmatch.fnmatchcase(t, p) for p, t in zip(pattern.split("/"), text.split("/")))

    def saved(name):
        parts = name.split("/")
        return any(match(p, "/".join(parts[:n])) for p in pats for n in range(1, len(parts) + 1))
    return saved
LORA_RANK, LORA_ALPHA = 4, 8.0
TOKENIZER_DIR = {ref: "tokenizer", llama: "tokenizer-llama"}  # under input/data
INSTRUCTIONS = [
    {"instruction": "Classify the sentiment of this headline.",
     "input": "Quarterly profits rose sharply on strong demand.", "output": "positive"},
    {"instruction": "Classify the sentiment of this headline.",
     "input": "The company missed its revenue targets again.", "output": "negative"},
    {"instruction": "Answer yes or no.", "input": "Is the sun a star?", "output": "yes"},
    {"instruction": "Name the colour of a clear daytime sky.", "input": "", "output": "blue"},
    {"instruction": "Summarise in one word.", "input": "Shares were flat all week.",
     "output": "neutral"},
]


def bits_equal(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def adapter_checks(run):
    """The (loss, grads) checks of a LoRA model, over run() -> dict of got_loss, got (grad_dump's),
    loss, grads (torch's, of the adapters only) and loss_no_lora (torch's without the adapters)."""
    def check_loss():
        r = run()
        got_loss, loss = r["got_loss"], r["loss"]
        e = abs(got_loss - loss) / abs(loss)
        if not (e <= LOSS_RTOL):
            raise CheckFailed(f"loss lrllm {got_loss:.9f} vs torch {loss:.9f} (rel {e:.2e} > "
                              f"{LOSS_RTOL:g})")
        moved = abs(r["loss_no_lora"] - loss) / abs(loss)
        if not moved > 10 * LOSS_RTOL:
            raise CheckFailed(f"the trained adapters change the loss by only {moved:.1e} "
                              f"(rel): the check cannot see them")

    def check_grads():
        r = run()
        got, grads = r["got"], r["grads"]
        extra = sorted(k for k in got if k not in grads)
        if extra:
            more = f" (+{len(extra) - 4} more)" if len(extra) > 4 else ""
            raise CheckFailed(f"{len(extra)} gradients of frozen tensors in grad_dump's output: "
                              f"{', '.join(extra[:4])}{more}")
        missing = sorted(k for k in grads if k not in got)
        if missing:
            raise CheckFailed(f"grad_dump has no gradient of trainable {', '.join(missing[:4])}")
        for k, g in grads.items():
            if not np.linalg.norm(g) > 0:
                raise CheckFailed(f"reference gradient of {k} is zero")
        compare_tensors(got, grads, GRAD_RTOL, "adapter gradients")

    return [("loss", check_loss), ("grads", check_grads)]


def run_lora_case(build, work, name, case, seed, model=ref):
    """Checks of `lrllm --mode finetune` over a base of model (gpt2_torch or llama_torch); case: an
    entry of LORA_CASES or LLAMA_FINETUNE_CASES."""
    base_cfg, bits, qblock, targets, modules = case[:5]
    tokens_case = len(case) > 5
    saved = saved_module(modules)
    trainable = lambda k: ref.is_lora(k) or saved(k) or k == "trainable_tokens/delta"  # noqa: E731
    @once
    def run():
        base_params = model.init_params(base_cfg, seed=seed)
        base = os.path.join(work, f"lora_{name}_base.h5")
        model.save_checkpoint(base, base_cfg, base_params)
        jsonl = os.path.join(work, f"lora_{name}.jsonl")
        with open(jsonl, "w") as f:
            for ex in INSTRUCTIONS:
                f.write(json.dumps(ex) + "\n")
        run_dir = os.path.join(work, f"run_lora_{name}")
        steps = 2
        rng = np.random.default_rng(seed + 1000)
        toks = rng.integers(0, base_cfg.vocab_size, size=(BATCH + 1) * base_cfg.seq_len + 3)
        token_ids = sorted({int(t) for t in toks[:3]} | {base_cfg.vocab_size - 1}) if tokens_case else []
        run_cmd([os.path.join(build, "lrllm"), "--mode", "finetune", "--model.init", base,
                 "--data.train", jsonl, "--data.val", jsonl,
                 "--data.tokenizer_dir", os.path.join(REPO, "input", "data", TOKENIZER_DIR[model]),
                 "--lora.rank", str(LORA_RANK), "--lora.alpha", repr(LORA_ALPHA),
                 "--lora.targets", targets, "--quant.bits", str(bits),
                 "--quant.block", str(qblock), "--train.steps", str(steps),
                 *(["--quant.embedding", "false"] if "wte" in modules else []),
                 *(["--lora.modules_to_save", modules] if modules else []),
                 *(["--lora.trainable_tokens", ",".join(map(str, token_ids))] if token_ids else []),
                 "--train.batch_size", "2", "--train.lr", "1e-2", "--train.warmup", "0",
                 "--train.eval_batches", "1", "--run.dir", run_dir, "--device", "cpu"])
        ckpt = find_final_checkpoint(run_dir, steps)
        data = os.path.join(work, f"lora_{name}.bin")
        ref.write_tokens(data, toks)
        got_loss, got = grad_dump(build, ckpt, data, os.path.join(work, f"lora_{name}_out.h5"))
        cfg, params = model.load_model(ckpt)
        want_sites = [ref.site_path(i, s) for i in range(cfg.n_layer) for s in
                      (ref.LINEAR_SITES if targets == "all" else targets.split(","))]
        if (cfg.lora_rank, cfg.lora_alpha) != (LORA_RANK, LORA_ALPHA):
            raise CheckFailed(f"checkpoint /config lora_rank {cfg.lora_rank}, lora_alpha "
                              f"{cfg.lora_alpha}; expected {LORA_RANK}, {LORA_ALPHA}")
        have = sorted(k for k in params if ref.is_lora(k))
        expect = sorted(f"{sp}/{t}" for sp in want_sites for t in ("lora_A", "lora_B"))
        if have != expect:
            raise CheckFailed(f"checkpoint adapters {have} != expected {expect}")
        x, y = ref.batch(toks, cfg.seq_len, range(BATCH))
        if list(cfg.trainable_tokens) != token_ids:
            raise CheckFailed(f"/config trainable_tokens {cfg.trainable_tokens}, expected {token_ids}")
        if token_ids and params["trainable_tokens/delta"].shape != (len(token_ids), cfg.d_model):
            raise CheckFailed(f"trainable_tokens/delta has shape {params['trainable_tokens/delta'].shape}")
        if modules and not any(saved(k) for k in params):
            raise CheckFailed(f"no tensor of the checkpoint matches lora.modules_to_save {modules!r}")
        loss, grads = model.loss_and_grads(params, cfg, x, y, trainable=trainable)
        frozen = ref.to_torch(params, requires_grad=False)
        with torch.no_grad():
            _, l0 = model.forward({k: v for k, v in frozen.items() if not ref.is_lora(k)},
                                  cfg, x, y)
        return dict(ckpt=ckpt, base=base, cfg=cfg, got_loss=got_loss, loss=loss,
                    loss_no_lora=l0.item(), got=got, grads=grads, bits=bits)

    def check_base():
        r = run()
        _, base_p, _ = ref.load_checkpoint(r["base"])
        _, stored, _ = ref.load_checkpoint(r["ckpt"])
        kind = {0: None, 8: "int8", 4: "nf4"}[r["bits"]]
        with h5py.File(r["ckpt"], "r") as f:
            qattr = ref._attr_str(f["config"].attrs.get("quant", ""))
            if qattr != (kind or "none"):
                raise CheckFailed(f"/config quant is {qattr!r}, expected {kind or 'none'!r}")
            for k, v in base_p.items():
                if k.rsplit("/", 1)[-1] in ("W", "A", "B", "wte", "lm_head") and kind is not None:
                    if k in stored:
                        raise CheckFailed(f"{k} stored as float under quant {kind}")
                    if k + "_q" not in stored:
                        raise CheckFailed(f"no {k}_q in the checkpoint")
                    q = ref.read_quantized(f["model"], k)
                    check_quantized(k, v, q, kind, qblock)
                    continue
                if k not in stored:
                    raise CheckFailed(f"base tensor {k} missing from the checkpoint")
                if saved(k):
                    if bits_equal(stored[k], v):
                        raise CheckFailed(f"{k} is saved beside the adapters but did not train")
                    continue
                if not bits_equal(stored[k], v):
                    d = np.abs(stored[k].astype(np.float64) - v).max() \
                        if stored[k].shape == v.shape else float("nan")
                    raise CheckFailed(f"{k} ({stored[k].dtype}{list(stored[k].shape)}) is not "
                                      f"bitwise the base's (max |diff| {d:.2e})")
            for k, v in stored.items():
                if ref.is_lora(k) and k.endswith("lora_B") and not np.any(v != 0):
                    raise CheckFailed(f"{k} is all zero after 2 finetuning steps")

    return adapter_checks(run) + [("base", check_base)]


def check_quantized(site, w, q, kind, block):
    """lrllm's stored quantization of a base tensor against numpy's, and the dequantization bound."""
    if q["kind"] != kind or q["block"] != block or q["shape"] != tuple(w.shape):
        raise CheckFailed(f"{site}_q attrs quant {q['kind']}, block_size {q['block']}, shape "
                          f"{q['shape']}; expected {kind}, {block}, {tuple(w.shape)}")
    if kind == "nf4" and not q["double_quant"]:
        raise CheckFailed(f"{site}: NF4 base not double-quantized (the default)")
    mine = ref.quantize(w, kind, block)
    keys = ["codes"] + (["absmax_q", "absmax_scale"] if q["double_quant"] else ["absmax"])
    for key in keys:
        if not bits_equal(q[key], mine[key]):
            a, b = np.asarray(q[key]), np.asarray(mine[key])
            if a.shape != b.shape or a.dtype != b.dtype:
                why = f"{a.dtype}{list(a.shape)} vs numpy's {b.dtype}{list(b.shape)}"
            else:
                i = int(np.flatnonzero(a != b)[0])
                why = f"{int((a != b).sum())}/{a.size} differ; first [{i}]: {a[i]} vs {b[i]}"
            raise CheckFailed(f"{site} {key}: {why}")
    if q["double_quant"] and np.float32(q["absmax_mean"]) != np.float32(mine["absmax_mean"]):
        raise CheckFailed(f"{site} absmax_mean {q['absmax_mean']!r} vs numpy "
                          f"{mine['absmax_mean']!r}")
    deq = ref.dequantize(q).astype(np.float64).reshape(-1)
    x = w.reshape(-1).astype(np.float64)
    if kind == "int8":
        a = ref._per_value(ref._block_absmax(w.reshape(-1), block), x.size, block)
        err, bound = np.abs(deq - x), a.astype(np.float64) * (1 / 254 + 1e-6)
    else:
        err, bound = nf4_error_and_bound(w, q)
    if not np.all(err <= bound):
        i = int(np.argmax(err - bound))
        raise CheckFailed(f"{site} dequantized W off by {err[i]:.3g} at [{i}] (bound "
                          f"{bound[i]:.3g})")


# ----------------------------------------------------------------------------------------------
# 4. Llama (arch = llama) against llama_torch.py

LLAMA_SMALL = dict(vocab_size=512, seq_len=32, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=160)
# Some variants move rope_theta and norm_eps off Llama-2's 10000 and 1e-5, so that a model that does not
# take them from the file fails there.
LLAMA_VARIANTS = {
    "dense": llama.Config(**{**LLAMA_SMALL, "n_kv_head": 4}),  # NKV = NH: the multi-head path
    "lowrank": llama.Config(**LLAMA_SMALL, lowrank_rank=8, lowrank_targets=tuple(ref.LINEAR_SITES)),
    "mixed": llama.Config(**LLAMA_SMALL, lowrank_rank=8, lowrank_targets=("qkv", "fc"),
                          rope_theta=500000.0, norm_eps=1e-6),
    "gqa_kv2": llama.Config(**{**LLAMA_SMALL, "n_head": 8}, rope_theta=100.0),  # 4 query heads a kv head
    "gqa_kv1": llama.Config(**{**LLAMA_SMALL, "n_kv_head": 1}, norm_eps=1e-4),  # one kv head for all
    "packed": llama.Config(**LLAMA_SMALL),
}
# name: (quant, quant_block, low-rank sites) of a frozen base under adapters on every site, written directly
# (not by `lrllm --mode finetune`, whose instruction data needs the GPT-2 tokenizer's vocabulary); int8 with
# blocks of 100 (short last blocks), NF4 double-quantized (nf4_mixed: its A and B too).
LLAMA_LORA_CASES = {"float": ("none", 64, ()), "int8": ("int8", 100, ()), "nf4": ("nf4", 64, ()),
                    "nf4_mixed": ("nf4", 64, ("qkv", "fc"))}
# As LORA_CASES, for `lrllm --mode finetune` of a Llama base over the Llama-2 tokenizer's vocabulary: NF4
# (wte and lm_head quantized too) with adapters on every site, and int8 of a mixed base with adapters on two.
LLAMA_FINETUNE = dict(vocab_size=32000, seq_len=32, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=80)
LLAMA_FINETUNE_CASES = {
    "nf4": (llama.Config(**LLAMA_FINETUNE), 4, 64, "all", ""),
    "int8_mixed": (llama.Config(**LLAMA_FINETUNE, lowrank_rank=4, lowrank_targets=("qkv", "fc")), 8, 100,
                   "qkv,mlp_proj", ""),
}


def check_llama_selftest():
    """llama_torch's pieces against direct formulas and torch's, and its gradients against finite
    differences."""
    torch.manual_seed(0)
    d = torch.float64
    x = torch.randn(3, 7, 16, dtype=d)
    w = 1 + 0.1 * torch.randn(16, dtype=d)
    xn, wn = x.numpy(), w.numpy()
    direct = np.empty_like(xn)
    for idx in np.ndindex(*xn.shape[:-1]):
        row = xn[idx]
        direct[idx] = row / math.sqrt(sum(float(v) ** 2 for v in row) / row.size + 1e-5) * wn
    e = np.abs(llama.rms_norm(x, w, 1e-5).numpy() - direct).max()
    if e > 1e-12:
        raise CheckFailed(f"rms_norm differs from x / sqrt(mean(x^2) + eps) * w by {e:.2e}")
    e = (llama.silu(x) - Fn.silu(x)).abs().max().item()
    if e > 1e-12:
        raise CheckFailed(f"silu differs from F.silu by {e:.2e}")
    logits, tgt = torch.randn(2, 5, 11, dtype=d), torch.randint(0, 11, (2, 5))
    tgt[0, 1] = tgt[1, 3] = -1
    e = abs(llama.cross_entropy(logits, tgt).item() -
            Fn.cross_entropy(logits.reshape(-1, 11), tgt.reshape(-1), ignore_index=-1).item())
    if e > 1e-12:
        raise CheckFailed(f"cross-entropy over targets >= 0 differs from F.cross_entropy by {e:.2e}")
    selftest_llama_rope()
    selftest_llama_attention()
    selftest_llama_model()
    selftest_llama_finite_differences()


def selftest_llama_rope():
    """Position 0 is the identity; the basis vector e_i (i < hd/2) at position p turns into
    cos(p f_i) e_i + sin(p f_i) e_(i+hd/2), f_i = theta^(-2i/hd) (rotate_half's pairing); q.k after
    rotation depends on the positions' difference only."""
    d, hd, theta = torch.float64, 8, 10000.0
    x = torch.randn(2, 3, 5, hd, dtype=d)
    cos, sin = llama.rope_cos_sin(torch.zeros(2, 5, dtype=torch.long), hd, theta, d)
    if not torch.equal(llama.apply_rope(x, cos, sin), x):
        raise CheckFailed("rope at position 0 is not the identity")
    p = 7
    cos, sin = llama.rope_cos_sin(torch.full((1, 1), p), hd, theta, d)
    for i in range(hd // 2):
        e = torch.zeros(1, 1, 1, hd, dtype=d)
        e[..., i] = 1
        want = torch.zeros(hd, dtype=d)
        want[i], want[i + hd // 2] = math.cos(p * theta ** (-2 * i / hd)), math.sin(p * theta ** (-2 * i / hd))
        err = (llama.apply_rope(e, cos, sin).reshape(-1) - want).abs().max().item()
        if err > 1e-15:
            raise CheckFailed(f"rope of e_{i} at position {p} is off the rotate_half rotation by {err:.2e}")
    q, k = torch.randn(1, 1, 1, hd, dtype=d), torch.randn(1, 1, 1, hd, dtype=d)

    def score(m, n):
        cq, sq = llama.rope_cos_sin(torch.full((1, 1), m), hd, theta, d)
        ck, sk = llama.rope_cos_sin(torch.full((1, 1), n), hd, theta, d)
        return (llama.apply_rope(q, cq, sq) * llama.apply_rope(k, ck, sk)).sum().item()

    if abs(score(9, 4) - score(25, 20)) > 1e-12 or abs(score(9, 4) - score(4, 9)) < 1e-6:
        raise CheckFailed("rotated q.k does not depend on the position difference alone")


def selftest_llama_attention():
    """With NKV = NH, attention equals gpt2_torch's (checked against nn.MultiheadAttention) of q and k
    rotated beforehand, causal and packed alike."""
    cfg = llama.Config(**{**LLAMA_SMALL, "n_kv_head": 4, "d_model": 32})
    C, T = cfg.d_model, 9
    qkv = torch.randn(2, T, 3 * C, dtype=torch.float64)
    for positions in (None, packed_positions([4, 2], T, 2)):
        pos = torch.arange(T).expand(2, T) if positions is None else positions
        cos, sin = llama.rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, qkv.dtype)

        def rotated(t):
            h = t.reshape(2, T, cfg.n_head, cfg.head_dim).transpose(1, 2)
            return llama.apply_rope(h, cos, sin).transpose(1, 2).reshape(2, T, C)

        q, k, v = qkv.split(C, dim=-1)
        want = ref.attention(torch.cat([rotated(q), rotated(k), v], dim=-1), cfg.n_head, positions)
        e = (llama.attention(qkv, cfg, positions) - want).abs().max().item()
        if e > 1e-12:
            raise CheckFailed(f"attention (positions {'packed' if positions is not None else 'None'}) "
                              f"differs from gpt2_torch's over pre-rotated q, k by {e:.2e}")


def selftest_llama_model():
    """GQA == MHA with each kv head's rows repeated for its query heads; low-rank == dense with
    W = B@A; LoRA == dense with W + (alpha/r) lora_B@lora_A; the first loss near ln V; the checkpoint
    written as the layout says, its NF4 weights dequantizing to as_stored's."""
    rng = np.random.default_rng(3)
    gqa = LLAMA_VARIANTS["gqa_kv2"]
    p = llama.init_params(gqa, seed=4)
    mha = llama.Config(**{**LLAMA_SMALL, "n_head": 8, "n_kv_head": 8}, rope_theta=gqa.rope_theta)
    hd, NH, NKV = gqa.head_dim, gqa.n_head, gqa.n_kv_head
    rep = dict(p)
    for i in range(gqa.n_layer):
        W = p[f"h.{i}/attn/qkv/W"]
        q, k, v = W[:NH * hd], W[NH * hd:(NH + NKV) * hd], W[(NH + NKV) * hd:]
        heads = [h // (NH // NKV) for h in range(NH)]
        rep[f"h.{i}/attn/qkv/W"] = np.concatenate(
            [q] + [k[j * hd:(j + 1) * hd] for j in heads] + [v[j * hd:(j + 1) * hd] for j in heads])
    toks = rng.integers(0, gqa.vocab_size, size=2 * gqa.seq_len + 1)
    xb, yb = ref.batch(toks, gqa.seq_len, range(2))
    l1, _ = llama.loss_and_grads(p, gqa, xb, yb)
    l2, _ = llama.loss_and_grads(rep, mha, xb, yb)
    if abs(l1 - l2) > 1e-12 * abs(l2):
        raise CheckFailed(f"GQA loss {l1!r} != MHA loss with repeated kv heads {l2!r}")
    lr_cfg = LLAMA_VARIANTS["lowrank"]
    p = llama.init_params(lr_cfg, seed=5)
    dense = {}
    for k, v in p.items():
        if k.endswith("/B"):
            dense[k[:-2] + "/W"] = v.astype(np.float64) @ p[k[:-2] + "/A"].astype(np.float64)
        elif not k.endswith("/A"):
            dense[k] = v
    l1, _ = llama.loss_and_grads(p, lr_cfg, xb, yb)
    l2, _ = llama.loss_and_grads(dense, llama.Config(**LLAMA_SMALL), xb, yb)
    if abs(l1 - l2) > 1e-12 * abs(l2):
        raise CheckFailed(f"low-rank loss {l1!r} != dense(B@A) loss {l2!r}")
    if not (5.5 < l1 < 7.5):
        raise CheckFailed(f"initial loss {l1} is not near ln(V) = {math.log(lr_cfg.vocab_size):.3f}")
    base = llama.Config(**LLAMA_SMALL)
    cfg = llama.Config(**LLAMA_SMALL, lora_rank=4, lora_alpha=6.0, lora_targets=("qkv", "fc"))
    p = llama.add_adapters(llama.init_params(base, seed=6), cfg, seed=7)
    merged = {k: v for k, v in p.items() if not ref.is_lora(k)}
    for i in range(cfg.n_layer):
        for site in cfg.lora_targets:
            sp = ref.site_path(i, site)
            merged[sp + "/W"] = p[sp + "/W"].astype(np.float64) + cfg.lora_scale * (
                p[sp + "/lora_B"].astype(np.float64) @ p[sp + "/lora_A"].astype(np.float64))
    l1, g1 = llama.loss_and_grads(p, cfg, xb, yb, trainable=ref.is_lora)
    l2, _ = llama.loss_and_grads(merged, base, xb, yb)
    if abs(l1 - l2) > 1e-12 * abs(l2):
        raise CheckFailed(f"LoRA loss {l1!r} != merged-W loss {l2!r}")
    if sorted(g1) != sorted(k for k in p if ref.is_lora(k)):
        raise CheckFailed(f"trainable=is_lora gave gradients for {sorted(g1)}")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "llama.h5")
        qcfg = dataclasses.replace(cfg, quant="nf4")
        llama.save_checkpoint(path, qcfg, p, mode="finetune")
        stored = llama.as_stored(p, qcfg)
        with h5py.File(path, "r") as f:
            c = f["config"].attrs
            got = (ref._attr_str(c["arch"]), int(f.attrs["format_version"]), int(c["n_kv_head"]),
                   int(c["tied_embeddings"]), ref._attr_str(c["quant"]))
            if got != ("llama", 4, cfg.n_kv_head, 0, "nf4"):
                raise CheckFailed(f"checkpoint (arch, format_version, n_kv_head, tied, quant) = {got}")
            for k, v in p.items():
                if llama.is_quantizable(k):
                    if k in f["model"] or not np.array_equal(
                            ref.dequantize(ref.read_quantized(f["model"], k)), stored[k]):
                        raise CheckFailed(f"{k}: not stored as the NF4 codes of as_stored's")
                elif not bits_equal(f["model"][k][()], v):
                    raise CheckFailed(f"{k} not stored as given")
    if np.array_equal(stored["h.0/attn/qkv/W"], p["h.0/attn/qkv/W"]):
        raise CheckFailed("as_stored left an NF4 weight unquantized")


def selftest_llama_finite_differences():
    """Autograd gradients of a tiny float64 model (GQA, packed rows, a low-rank site, an adapter)
    against central differences, three entries of every tensor."""
    cfg = llama.Config(vocab_size=13, seq_len=6, n_layer=2, n_head=4, n_kv_head=2, d_model=16, d_ff=12,
                       lowrank_rank=3, lowrank_targets=("qkv",), lora_rank=2, lora_alpha=3.0,
                       lora_targets=("fc",), rope_theta=50.0)
    params = llama.add_adapters(llama.init_params(cfg, seed=8), cfg, seed=9)
    rng = np.random.default_rng(10)
    toks = rng.integers(0, cfg.vocab_size, size=2 * cfg.seq_len + 1)
    xb, yb = ref.batch(toks, cfg.seq_len, range(2))
    pos = packed_positions([2], cfg.seq_len, 2)
    _, grads = llama.loss_and_grads(params, cfg, xb, yb, positions=pos)
    P = ref.to_torch(params, requires_grad=False)
    h = 1e-5

    def loss():
        return llama.forward(P, cfg, xb, yb, pos)[1].item()

    worst = (0.0, "")
    for name, g in grads.items():
        flat, gflat = P[name].view(-1), g.reshape(-1)
        for j in rng.choice(flat.numel(), size=min(3, flat.numel()), replace=False):
            orig = flat[j].item()
            flat[j] = orig + h
            lp = loss()
            flat[j] = orig - h
            lm = loss()
            flat[j] = orig
            fd = (lp - lm) / (2 * h)
            err = abs(fd - gflat[j]) / (1e-6 + abs(fd))
            worst = max(worst, (err, f"{name}[{j}]: autograd {gflat[j]:.10g}, differences {fd:.10g}"))
    if worst[0] > 1e-5:
        raise CheckFailed(f"gradient off the central differences by rel {worst[0]:.1e} at {worst[1]}")


def run_llama_lora_case(build, work, name, seed):
    """grad_dump over a LoRA checkpoint written here (adapters on every site over a float, int8 or NF4
    base, dense or mixed) vs the torch model of the dequantized base plus the adapters."""
    quant, block, lowrank = LLAMA_LORA_CASES[name]
    cfg = llama.Config(**LLAMA_SMALL, lowrank_rank=8 if lowrank else 0, lowrank_targets=lowrank, lora_rank=4,
                       lora_alpha=8.0, lora_targets=tuple(ref.LINEAR_SITES), quant=quant, quant_block=block)
    @once
    def run():
        params = llama.add_adapters(llama.init_params(cfg, seed=seed), cfg, seed=seed + 1)
        ckpt = os.path.join(work, f"llama_lora_{name}.h5")
        llama.save_checkpoint(ckpt, cfg, params, mode="finetune")
        rng = np.random.default_rng(seed + 1000)
        toks = rng.integers(0, cfg.vocab_size, size=(BATCH + 1) * cfg.seq_len + 3)
        data = os.path.join(work, f"llama_lora_{name}.bin")
        ref.write_tokens(data, toks)
        got_loss, got = grad_dump(build, ckpt, data, os.path.join(work, f"llama_lora_{name}_out.h5"))
        stored = llama.as_stored(params, cfg)
        x, y = ref.batch(toks, cfg.seq_len, range(BATCH))
        loss, grads = llama.loss_and_grads(stored, cfg, x, y, trainable=ref.is_lora)
        frozen = ref.to_torch({k: v for k, v in stored.items() if not ref.is_lora(k)}, requires_grad=False)
        with torch.no_grad():
            _, l0 = llama.forward(frozen, cfg, x, y)
        return dict(got_loss=got_loss, got=got, loss=loss, grads=grads, loss_no_lora=l0.item())

    return adapter_checks(run)


# ----------------------------------------------------------------------------------------------


GENERATE_PROMPT = "Quarterly revenue rose 12% as the bank"
GENERATE_TOKENS = 45
# Logits far apart (the final LayerNorm's gain scaled up), so float32 rounding cannot swap the argmax.
GENERATE_LOGIT_SCALE = 8.0


def gpt2_byte_decoder() -> dict[str, int]:
    """OpenAI's table from the printable characters encoder.json uses back to bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + \
        list(range(ord("\u00ae"), ord("\u00ff") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def gpt2_token_bytes(tokenizer):
    """GPT-2's tokens as bytes: encoder.json's printable characters through OpenAI's byte table."""
    with open(os.path.join(tokenizer, "encoder.json")) as f:
        token_text = {i: t for t, i in json.load(f).items()}
    byte_of = gpt2_byte_decoder()
    return lambda ids: bytes(byte_of[c] for t in ids for c in token_text[t])


def llama_piece_bytes(piece: str) -> bytes:
    """A SentencePiece piece as bytes: <0xXX> is its byte, "▁" a space (tokenizer.json's convention)."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode()


def llama_token_bytes(tokenizer):
    with open(os.path.join(tokenizer, "tokenizer.json")) as f:
        piece_of = {i: t for t, i in json.load(f)["model"]["vocab"].items()}
    return lambda ids: b"".join(llama_piece_bytes(piece_of[t]) for t in ids)


def run_generate_case(build, work, name, model, cfg, tokenizer, eot, token_bytes, seed):
    """Greedy `lrllm --mode generate` against the torch model's argmax (model: gpt2_torch or llama_torch),
    token for token. The context is the prompt as lrllm's tokenize encodes a document, without GPT-2's leading
    <|endoftext|> (generate starts a prompt after it only when the prompt is empty) and with Llama's <s>;
    token_bytes(ids) decodes the continuation the reference way."""

    def check():
        params = model.init_params(cfg, seed=seed)
        params["ln_f/w"] = params["ln_f/w"] * GENERATE_LOGIT_SCALE
        path = os.path.join(work, f"{name}.h5")
        model.save_checkpoint(path, cfg, params)
        prompt_file = os.path.join(work, f"{name}_prompt.txt")
        with open(prompt_file, "w") as f:
            f.write(GENERATE_PROMPT)
        prompt_bin = os.path.join(work, f"{name}_prompt.bin")
        run_cmd([os.path.join(build, "lrllm"), "--mode", "tokenize", "--data.input", prompt_file,
                 "--data.output", prompt_bin, "--data.tokenizer_dir", tokenizer])
        context = [int(t) for t in ref.read_tokens(prompt_bin) if t != eot]
        # Bytes, not text: a continuation may stop inside a UTF-8 character.
        cmd = [os.path.join(build, "lrllm"), "--mode", "generate", "--model.init", path, "--generate.prompt",
               GENERATE_PROMPT, "--generate.max_new_tokens", str(GENERATE_TOKENS), "--data.tokenizer_dir",
               tokenizer, "--device", "cpu"]
        p = subprocess.run(cmd, capture_output=True, timeout=300, cwd=REPO)
        if p.returncode != 0:
            raise CheckFailed(f"lrllm --mode generate exited {p.returncode}: {p.stderr.decode(errors='replace')}")
        P = ref.to_torch(params, requires_grad=False)
        want = []
        with torch.no_grad():
            for _ in range(GENERATE_TOKENS):
                logits, _ = model.forward(P, cfg, torch.tensor([context[-cfg.seq_len:]]))
                top2 = torch.topk(logits[0, -1], 2)
                gap = float(top2.values[0] - top2.values[1])
                if gap < 1e-3:
                    raise CheckFailed(f"test setup: a near tie (gap {gap:.1e}) after {len(want)} tokens")
                nxt = int(top2.indices[0])
                if nxt == eot:
                    break
                want.append(nxt)
                context.append(nxt)
        want_bytes = token_bytes(want)
        prompt = GENERATE_PROMPT.encode()
        got = p.stdout
        if not got.startswith(prompt) or not got.endswith(b"\n"):
            raise CheckFailed(f"output is not prompt + continuation + newline: {got[:100]!r}")
        got = got[len(prompt):-1]
        if got != want_bytes:
            raise CheckFailed(f"lrllm continued {got[:80]!r}, torch {want_bytes[:80]!r}")
        if len(want) < GENERATE_TOKENS // 2:
            raise CheckFailed(f"only {len(want)} tokens before the end of text: too short to compare")

    return check


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", default=os.path.join(REPO, "build"),
                    help="lrllm build directory (default: build/)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--only", default="", help="run only checks whose name contains this")
    args = ap.parse_args()
    build = os.path.abspath(args.build)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    work = tempfile.mkdtemp(prefix="lrllm_ref_")
    t0 = time.time()

    checks = [("reference_selftest", check_selftest)]
    for i, v in enumerate(("dense", "lowrank", "mixed", "lowrank_silu", "lowrank_silu_mixed")):
        cl, cg = run_grad_case(build, work, f"grad_{v}", VARIANTS[v], seed=10 + i if i < 3 else 50 + i)
        checks += [(f"grad_{v}_loss", cl), (f"grad_{v}_grads", cg)]
    # Packed rows (data.packing): positions restart per example and attention stays inside each.
    cl, cg = run_grad_case(build, work, "grad_packed", VARIANTS["mixed"], seed=13, segments=[5, 3])
    checks += [("grad_packed_loss", cl), ("grad_packed_grads", cg)]
    # dense: 40 sequences, no wrap-around; lowrank: 26 sequences, so step 7 wraps to 0.
    for v, seed, n_seq in (("dense", 20, 40), ("lowrank", 21, 26)):
        for suffix, fn in run_train_case(build, work, f"train_{v}", VARIANTS[v], seed, n_seq):
            checks.append((f"train_{v}_{suffix}", fn))
    for i, (name, case) in enumerate(LORA_CASES.items()):
        for suffix, fn in run_lora_case(build, work, name, case, seed=30 + i):
            checks.append((f"lora_{name}_{suffix}", fn))

    for i, v in enumerate(("dense", "lowrank")):
        base = VARIANTS[v]
        cfg = ref.Config(**{**SMALL, "vocab_size": 50257},
                         lowrank_rank=base.lowrank_rank, lowrank_targets=base.lowrank_targets)
        tokenizer = os.path.join(REPO, "input", "data", "tokenizer")
        checks.append((f"generate_{v}", run_generate_case(build, work, f"generate_{v}", ref, cfg, tokenizer, 50256,
                                                          gpt2_token_bytes(tokenizer), seed=43 + i)))

    checks.append(("llama_reference_selftest", check_llama_selftest))
    for i, v in enumerate(("gqa_kv2", "lowrank")):
        tokenizer = os.path.join(REPO, "input", "data", "tokenizer-llama")
        cfg = dataclasses.replace(LLAMA_VARIANTS[v], vocab_size=32000)
        checks.append((f"llama_generate_{v}", run_generate_case(build, work, f"llama_generate_{v}", llama, cfg,
                                                                tokenizer, 2, llama_token_bytes(tokenizer),
                                                                seed=70 + i)))
    for i, v in enumerate(("dense", "lowrank", "mixed", "gqa_kv2", "gqa_kv1")):
        cl, cg = run_grad_case(build, work, f"llama_{v}", LLAMA_VARIANTS[v], seed=50 + i, model=llama)
        checks += [(f"llama_{v}_loss", cl), (f"llama_{v}_grads", cg)]
    cl, cg = run_grad_case(build, work, "llama_packed", LLAMA_VARIANTS["packed"], seed=55, segments=[5, 3],
                           model=llama)
    checks += [("llama_packed_loss", cl), ("llama_packed_grads", cg)]
    for i, name in enumerate(LLAMA_LORA_CASES):
        for suffix, fn in run_llama_lora_case(build, work, name, seed=60 + i):
            checks.append((f"llama_lora_{name}_{suffix}", fn))
    for i, (name, case) in enumerate(LLAMA_FINETUNE_CASES.items()):
        for suffix, fn in run_lora_case(build, work, f"llama_{name}", case, seed=65 + i, model=llama):
            checks.append((f"llama_finetune_{name}_{suffix}", fn))
    # GQA dense: 40 sequences, no wrap-around; mixed: 26 sequences, so step 7 wraps to 0.
    for v, cfg, seed, n_seq in (("dense", LLAMA_VARIANTS["packed"], 70, 40),
                                ("mixed", LLAMA_VARIANTS["mixed"], 71, 26)):
        for suffix, fn in run_train_case(build, work, f"llama_train_{v}", cfg, seed, n_seq, model=llama):
            checks.append((f"llama_train_{v}_{suffix}", fn))

    for name, fn in checks:
        if args.only and args.only not in name:
            continue
        record(name, fn)

    n_fail = sum(1 for _, ok, _ in RESULTS if not ok)
    print(f"reference: {len(RESULTS) - n_fail} passed, {n_fail} failed "
          f"({time.time() - t0:.1f}s)", flush=True)
    if args.keep:
        print(f"reference: work files kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
