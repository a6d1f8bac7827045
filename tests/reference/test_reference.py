#!/usr/bin/python3
"""Reference checks: lrllm against an independent float64 PyTorch GPT-2 (gpt2_torch.py).

Prints one line per check, `PASS name` or `FAIL name: reason`; exits 0 only if all pass.

Checks
  reference_selftest       the PyTorch reference itself: its LayerNorm / GELU / attention /
                           cross-entropy against torch.nn's, and a low-rank layer against the
                           dense layer W = B@A.
  grad_{dense,lowrank,mixed}_loss   build/tests/grad_dump's loss vs float64 torch (rel <= 1e-5)
  grad_{dense,lowrank,mixed}_grads  every gradient tensor: |g - g_ref| / |g_ref| <= 1e-4
  train_{dense,lowrank}_{loss,lr,grad_norm}   10 AdamW steps of `lrllm --mode pretrain`
                           (metrics.h5) vs the float64 torch loop, per step
  train_{dense,lowrank}_weights   final weights of the step-10 checkpoint (rel <= 1e-4 per tensor;
                           the k rows of qkv/b, whose gradient is exactly 0, only by |moved| <= sum(lr))
  train_{dense,lowrank}_moments   its AdamW m and v (rel <= 1e-4 per tensor) and step attr

The torch side runs in float64 throughout (model, gradients and the AdamW loop).
"""

from __future__ import annotations

import argparse
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


# ----------------------------------------------------------------------------------------------
# 1. Loss and gradients of one batch


def prepare_grad_case(work, variant, seed):
    cfg = VARIANTS[variant]
    params = ref.init_params(cfg, seed=seed)
    ckpt = os.path.join(work, f"grad_{variant}.h5")
    ref.save_checkpoint(ckpt, cfg, params)
    rng = np.random.default_rng(seed + 1000)
    toks = rng.integers(0, cfg.vocab_size, size=(BATCH + 2) * cfg.seq_len + 3)
    data = os.path.join(work, f"grad_{variant}.bin")
    ref.write_tokens(data, toks)
    x, y = ref.batch(toks, cfg.seq_len, range(BATCH))
    loss, grads = ref.loss_and_grads(params, cfg, x, y)
    return ckpt, data, loss, grads


def run_grad_case(build, work, variant, seed):
    """Returns a pair of check functions (loss, grads) sharing one grad_dump run."""
    state = {}

    def run():
        if "err" in state:
            raise state["err"]
        if "out" in state:
            return state["out"]
        try:
            ckpt, data, loss, grads = prepare_grad_case(work, variant, seed)
            out = os.path.join(work, f"grad_{variant}_out.h5")
            exe = os.path.join(build, "tests", "grad_dump")
            run_cmd([exe, "--init", ckpt, "--data", data, "--batch", str(BATCH), "--out", out])
            if not os.path.exists(out):
                raise CheckFailed(f"grad_dump exited 0 but wrote no {os.path.basename(out)}")
            with h5py.File(out, "r") as f:
                if "loss" not in f.attrs:
                    raise CheckFailed("grad_dump output has no root attr 'loss'")
                got_loss = float(f.attrs["loss"])
                got = ref.read_group_tensors(f, "grads")
            state["out"] = (got_loss, loss, got, grads)
            return state["out"]
        except Exception as e:
            state["err"] = e
            raise

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


def run_train_case(build, work, variant, seed, n_seq):
    cfg = VARIANTS[variant]
    tc = ref.TrainConfig(steps=10, batch_size=BATCH)
    state = {}

    def run():
        if "err" in state:
            raise state["err"]
        if "out" in state:
            return state["out"]
        try:
            params = ref.init_params(cfg, seed=seed)
            ckpt = os.path.join(work, f"train_{variant}.h5")
            ref.save_checkpoint(ckpt, cfg, params)
            rng = np.random.default_rng(seed + 1000)
            toks = rng.integers(0, cfg.vocab_size, size=n_seq * cfg.seq_len + 1 + 5)
            data = os.path.join(work, f"train_{variant}.bin")
            ref.write_tokens(data, toks)
            run_dir = os.path.join(work, f"run_{variant}")
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
            hist, final, opt = ref.train(params, cfg, toks, tc)
            state["out"] = (run_dir, hist, final, opt, tc)
            return state["out"]
        except Exception as e:
            state["err"] = e
            raise

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
        # these steps; the q and v rows are compared relatively like every other tensor.
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
    for i, v in enumerate(("dense", "lowrank", "mixed")):
        cl, cg = run_grad_case(build, work, v, seed=10 + i)
        checks += [(f"grad_{v}_loss", cl), (f"grad_{v}_grads", cg)]
    # dense: 40 sequences, no wrap-around; lowrank: 26 sequences, so step 7 wraps to 0.
    for v, seed, n_seq in (("dense", 20, 40), ("lowrank", 21, 26)):
        for suffix, fn in run_train_case(build, work, v, seed, n_seq):
            checks.append((f"train_{v}_{suffix}", fn))

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
