"""Checks on the HDF5 outputs of the Slurm jobs (tests/slurm/run.sh). Prints one reason and exits 1 on a
failed check, prints a short summary and exits 0 otherwise.

  metrics.py check RUN_DIR STEPS      metrics.h5 has steps 1..STEPS once each, finite losses, ckpt_STEPS.h5
  metrics.py same RUN_DIR REF_DIR TOL  both runs have the same steps and losses within relative TOL
"""
import math
import os
import sys

import h5py
import numpy as np


def read(run_dir):
    path = os.path.join(run_dir, "metrics.h5")
    if not os.path.exists(path):
        sys.exit(f"{path}: missing")
    with h5py.File(path, "r") as f:
        if "metrics/step" not in f or "metrics/loss" not in f:
            sys.exit(f"{path}: no /metrics/step or /metrics/loss")
        return np.asarray(f["metrics/step"][:]), np.asarray(f["metrics/loss"][:])


def check(run_dir, steps):
    step, loss = read(run_dir)
    if not np.array_equal(step, np.arange(1, steps + 1)):
        sys.exit(f"metrics.h5 steps are {step.tolist()}, expected 1..{steps} once each")
    if not np.all(np.isfinite(loss)):
        sys.exit(f"metrics.h5 has non-finite losses: {loss.tolist()}")
    ckpt = os.path.join(run_dir, f"ckpt_{steps:06d}.h5")
    if not os.path.exists(ckpt):
        sys.exit(f"{ckpt}: missing")
    print(f"{steps} steps, final loss {loss[-1]:.6f}")


def same(run_dir, ref_dir, tol):
    step, loss = read(run_dir)
    ref_step, ref_loss = read(ref_dir)
    if not np.array_equal(step, ref_step):
        sys.exit(f"steps differ: {step.tolist()} against {ref_step.tolist()}")
    rel = np.abs(loss - ref_loss) / np.maximum(np.abs(ref_loss), 1e-30)
    worst = float(rel.max()) if rel.size else math.nan
    if not worst <= tol:
        i = int(np.argmax(rel))
        sys.exit(f"loss at step {int(step[i])} is {loss[i]!r} against {ref_loss[i]!r} (relative {worst:.2e})")
    print(f"final loss {loss[-1]:.6f} against {ref_loss[-1]:.6f}, largest relative difference {worst:.1e}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "check":
        check(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) == 5 and sys.argv[1] == "same":
        same(sys.argv[2], sys.argv[3], float(sys.argv[4]))
    else:
        sys.exit(__doc__)
