"""Parallel training on the CPU (part of `make bench`): GPT-2 L4 d256 T128, global batch 8 sequences.

Every run shares the same cores (ranks x threads = BENCH_THREADS, default 2). Three tables:
  1. data parallelism: tokens/s of lrllm at 1 and 2 MPI ranks, and of PyTorch (tools/bench_torch.py's GPT-2, AdamW)
     in 1 process and in 2 under DistributedDataParallel over gloo;
  2. pipeline bubble: lrllm with 2 stages at 1, 4 and 8 micro-batches: the 1F1B schedule's bubble (P-1)/(M+P-1)
     as lrllm prints it, the measured share of the step spent waiting in pipeline receives, and tokens/s;
  3. tensor-parallel traffic: bytes the tp=2 group sums per step, dense against low-rank r64 (expected r/d = 0.25).
Timings average steps 2..S (the first is warm-up). Prints the tables and writes bench-out/parallel.md.

usage: bench_parallel.py [BUILD_DIR]   (default build; BENCH_STEPS, BENCH_TIMEOUT, BENCH_THREADS and
                                        BENCH_CORETYPE as in tools/bench.sh)
"""
import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from bench_report import NOISY_CORES, cpu_name, synth
from bench_torch import GPT, read_tokens

L, H, D, T, V = 4, 4, 256, 128, 50257
BATCH = 8  # global: sequences per step over all data-parallel ranks
PP = 2  # pipeline stages
LOWRANK = 64
STEPS = int(os.environ.get("BENCH_STEPS", 10))
TIMEOUT = int(os.environ.get("BENCH_TIMEOUT", 300))
CORES = int(os.environ.get("BENCH_THREADS", 2))
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")


def stage_imbalance():
    """(first stage's blocks, last stage's work over the first's) for PP = 2 under lrllm's split, which
    balances FLOPs a token: 6 (12 D^2 + T D) a block, 6 V D for the lm_head on the last stage."""
    block, head = 6 * (12 * D * D + T * D), 6 * V * D
    first = min(range(1, L), key=lambda k: (max(k * block, (L - k) * block + head), -k))
    return first, ((L - first) * block + head) / (first * block)


def busy_s():
    """CPU seconds the whole machine has spent busy (user, nice, system, irq, softirq, steal), as tools/bench.sh."""
    with open("/proc/stat") as f:
        v = f.readline().split()
    return sum(int(v[i]) for i in (1, 2, 3, 6, 7, 8)) / os.sysconf("SC_CLK_TCK")


def threads(ranks):
    return max(1, CORES // ranks)


def run(cmd, n_threads, extra_env=None):
    """Runs cmd with n_threads BLAS/OpenMP threads per process; returns its stdout and how many cores other
    processes kept busy meanwhile (above NOISY_CORES its timing means little)."""
    env = dict(ENV, OMP_NUM_THREADS=str(n_threads), OPENBLAS_NUM_THREADS=str(n_threads), **(extra_env or {}))
    m0, c0, t0 = busy_s(), os.times(), time.monotonic()
    # Own session: on a timeout the whole tree goes (mpirun's ranks, the spawned PyTorch workers).
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        sys.exit(f"bench_parallel: {' '.join(cmd)} timed out after {TIMEOUT} s (BENCH_TIMEOUT):\n{out[-1500:]}\n"
                 f"{err[-1500:]}")
    if p.returncode != 0:
        sys.exit(f"bench_parallel: {' '.join(cmd)} failed ({p.returncode}):\n{out[-1500:]}\n{err[-1500:]}")
    c1 = os.times()
    own = c1.children_user + c1.children_system - c0.children_user - c0.children_system
    return out, max(0.0, (busy_s() - m0 - own) / (time.monotonic() - t0))


def lrllm(build, ranks, run_dir, data, *opts):
    """One lrllm pretraining run under mpirun; returns its stdout, metrics and the other processes' core use."""
    # Open MPI binds each rank to a core by default: one rank's two threads would share a single core.
    out, other = run(["mpirun", "--quiet", "--oversubscribe", "--bind-to", "none", "-np", str(ranks),
                      os.path.join(build, "lrllm"),
                      "--mode", "pretrain", "--device", "cpu", "--model.n_layer", str(L), "--model.n_head", str(H),
                      "--model.d_model", str(D), "--model.seq_len", str(T), "--model.vocab_size", str(V),
                      "--train.steps", str(STEPS), "--train.eval_every", "0", "--train.eval_batches", "1",
                      "--checkpoint.every", "0", "--run.dir", run_dir, "--data.train", data[0],
                      "--data.val", data[1], *opts], threads(ranks))
    with h5py.File(os.path.join(run_dir, "metrics.h5"), "r") as f:
        m = {k: f["metrics"][k][:] for k in f["metrics"]}
    subprocess.run(["rm", "-rf", run_dir])  # the final checkpoint is large and not needed
    return out, m, other


def tokens_per_s(step_s):
    return BATCH * T / float(np.mean(step_s[1:]))


def training_steps(series):
    """Steps 1..S-1: the last step's communication counters also carry the final validation pass."""
    return series[:-1]


def torch_worker(rank, world, port, data):
    """One PyTorch process: its share of the global batch, gradients averaged by DDP when world > 1."""
    torch.set_num_threads(threads(world))
    torch.manual_seed(1337)
    model = GPT(L, H, D, T, V, 0)
    # The optimizer as tools/bench_torch.py builds it.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=6e-4, betas=(0.9, 0.95), eps=1e-8)
    params = sum(p.numel() for p in model.parameters())
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
        model = DistributedDataParallel(model)
    tokens = read_tokens(data)
    B = BATCH // world
    times = []
    for step in range(STEPS):
        start = (step * BATCH * T) % (len(tokens) - BATCH * T) + rank * B * T
        chunk = torch.from_numpy(np.asarray(tokens[start:start + B * T + 1], dtype=np.int64))
        x, y = chunk[:-1].view(B, T), chunk[1:].view(B, T)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model(x, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        print(json.dumps({"torch_version": torch.__version__, "params": params, "tokens_per_s": tokens_per_s(times)}))
    if world > 1:
        dist.destroy_process_group()


def torch_main(world, data):
    with socket.socket() as s:  # a free port for the gloo rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(torch_worker, args=(world, port, data), nprocs=world)


def torch_coretype(build):
    """OpenBLAS kernels for PyTorch, chosen as tools/bench.sh does: lrllm's unless BENCH_CORETYPE or
    OPENBLAS_CORETYPE say otherwise (None: OpenBLAS's own choice)."""
    choice = os.environ.get("BENCH_CORETYPE", "auto")
    if "OPENBLAS_CORETYPE" in os.environ or choice == "none":
        return os.environ.get("OPENBLAS_CORETYPE")
    if choice != "auto":
        return choice
    out, _ = run([os.path.join(build, "tools", "bench_sgemm"), "--square", "0"], threads(1))
    return out.split()[1]  # "openblas NAME"


def table(header, rows):
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("build", nargs="?", default="build")
    ap.add_argument("--torch", type=int, metavar="WORLD",
                    help="used by this script: time PyTorch over WORLD processes on --data, print JSON")
    ap.add_argument("--data")
    a = ap.parse_args()
    if a.torch:
        torch_main(a.torch, a.data)
        return
    if STEPS < 3:
        sys.exit("bench_parallel: BENCH_STEPS must be at least 3 (warm-up, timed, final validation)")

    notes, noisy = [], []
    with tempfile.TemporaryDirectory(prefix="lrllm-parbench-") as tmp:
        data = ("input/data/pretrain_train.bin", "input/data/pretrain_val.bin")
        if not os.path.isfile(data[0]):
            print(f"bench_parallel: no {data[0]} (make data writes it); using synthetic tokens", flush=True)
            data = (os.path.join(tmp, "synthetic.bin"),) * 2
            synth(data[0], 2_000_000, V)
        elif not os.path.isfile(data[1]):
            data = (data[0], data[0])
        print(f"bench_parallel: L{L} d{D} T{T}, global batch {BATCH}, {CORES} cores, {STEPS} steps per run",
              flush=True)

        def timed(label, result):
            if result[-1] > NOISY_CORES:
                noisy.append(f"{label}: other processes kept {result[-1]:.2f} cores busy")
            return result

        # 1. Data parallelism.
        dp = {}
        for ranks in (1, 2):
            label = f"lrllm, {ranks} rank(s)"
            print(f"bench_parallel: {label}", flush=True)
            out, m, _ = timed(label, lrllm(a.build, ranks, os.path.join(tmp, f"dp{ranks}"), data,
                                           "--train.batch_size", str(BATCH // ranks)))
            params = re.search(r"parameters: total (\d+)", out)
            dp[ranks] = {"lrllm": tokens_per_s(m["step_ms"] / 1e3), "params": int(params.group(1))}
        if dist.is_available() and dist.is_gloo_available():
            coretype = torch_coretype(a.build)
            for world in (1, 2):
                label = f"PyTorch, {world} process(es)"
                print(f"bench_parallel: {label}", flush=True)
                out, _ = timed(label, run([sys.executable, __file__, "--torch", str(world), "--data", data[0]],
                                          threads(world), {"OPENBLAS_CORETYPE": coretype} if coretype else None))
                result = json.loads(out.splitlines()[-1])
                dp[world]["torch"] = result["tokens_per_s"]
                if result["params"] != dp[world]["params"]:
                    notes.append(f"parameter counts differ (lrllm {dp[world]['params']}, PyTorch {result['params']})")
            notes.append(f"PyTorch {result['torch_version']}, eager, 2 processes: DistributedDataParallel over gloo on "
                         f"127.0.0.1; OpenBLAS kernels {coretype or 'as installed'}.")
        else:
            notes.append("PyTorch left out: this torch build has no torch.distributed gloo backend.")
        rows = []
        for ranks in (1, 2):
            lr, pt = dp[ranks]["lrllm"], dp[ranks].get("torch")
            rows.append([f"{ranks} x {threads(ranks)} threads", f"{BATCH // ranks}", f"{lr:.0f}",
                         f"{pt:.0f}" if pt else "-", f"{lr / pt:.2f}x" if pt else "-"])
        lr_scale = dp[2]["lrllm"] / dp[1]["lrllm"]
        pt_scale = f"{dp[2]['torch'] / dp[1]['torch']:.2f}x" if "torch" in dp[2] else "-"
        rows.append(["2 ranks / 1 rank", "", f"{lr_scale:.2f}x", pt_scale, ""])
        dp_table = table(["processes x threads", "batch per process", "lrllm tok/s", "PyTorch tok/s",
                          "lrllm / PyTorch"], rows)

        # 2. Pipeline bubble.
        rows = []
        for micro in (1, 4, 8):
            label = f"lrllm pp {PP}, {micro} micro-batches"
            print(f"bench_parallel: {label}", flush=True)
            out, m, _ = timed(label, lrllm(a.build, PP, os.path.join(tmp, f"pp{micro}"), data, "--train.batch_size",
                                           str(BATCH), "--parallel.pp", str(PP), "--parallel.micro_batches",
                                           str(micro)))
            bubble = float(re.search(r"bubble ([\d.]+)% of a step", out).group(1))
            expected = 100 * (PP - 1) / (micro + PP - 1)
            if abs(bubble - expected) > 0.05:
                notes.append(f"{micro} micro-batches: lrllm prints a bubble of {bubble}%, (P-1)/(M+P-1) is "
                             f"{expected:.1f}%")
            wait = float(np.mean(training_steps(m["pp_wait_frac"])[1:]))
            rows.append([str(micro), str(BATCH // micro), f"{bubble:.1f}%", f"{100 * wait:.1f}%",
                         f"{tokens_per_s(m['step_ms'] / 1e3):.0f}"])
        pp_table = table(["micro-batches", "sequences each", "schedule bubble", "measured wait", "tok/s"], rows)

        # 3. Tensor-parallel traffic.
        tp = {}
        for rank in (0, LOWRANK):
            name = f"low-rank r{rank}" if rank else "dense"
            print(f"bench_parallel: lrllm tp 2, {name}", flush=True)
            opts = ["--lowrank.rank", str(rank), "--lowrank.targets", "all"] if rank else []
            _, m, _ = timed(f"lrllm tp 2, {name}", lrllm(a.build, 2, os.path.join(tmp, f"tp{rank}"), data,
                                                         "--train.batch_size", str(BATCH), "--parallel.tp", "2",
                                                         *opts))
            tp[name] = (float(np.median(training_steps(m["comm_bytes_tp"]))), tokens_per_s(m["step_ms"] / 1e3))
        dense = tp["dense"][0]
        tp_table = table(["model", "tp bytes per step", "vs dense", "tok/s"],
                         [[name, f"{b:,.0f}", f"{b / dense:.4f}", f"{s:.0f}"] for name, (b, s) in tp.items()])

    lines = [f"# Parallel training on {cpu_name()}: GPT-2 L{L} d{D} T{T} vocab {V}, global batch {BATCH} sequences",
             "",
             f"{STEPS} steps per run, {CORES} cores shared by every run (ranks x threads = {CORES}); tokens/s over "
             "the mean step time of steps 2..S.",
             *notes,
             "",
             "## Data parallelism",
             "",
             *dp_table,
             "",
             f"## Pipeline bubble, {PP} stages (1F1B), batch {BATCH}",
             "",
             "Schedule bubble: (P-1)/(M+P-1) as lrllm prints it; measured wait: pp_wait_frac, the ranks' average "
             "share of a step blocked in pipeline receives, over steps 2..S-1 (the last also carries validation). "
             f"lrllm balances stages by FLOPs, but the last also holds the tied lm_head: with {stage_imbalance()[0]} "
             f"of the {L} blocks on the first stage it still does about {stage_imbalance()[1]:.1f}x the first "
             "stage's work per token at this shape, so the measured wait also counts the first stage waiting for a "
             "slower second one, whatever the micro-batch count.",
             "",
             *pp_table,
             "",
             f"## Tensor-parallel traffic, tp 2, batch {BATCH}",
             "",
             f"comm_bytes_tp, summed over ranks, of a training step; a low-rank layer sums an r-wide tensor instead "
             f"of a d-wide one, so the ratio should be r/d = {LOWRANK / D:.4f}.",
             "",
             *tp_table]
    if noisy:
        lines += ["", *(f"WARNING: {n}; its timing is unreliable, rerun on a quiet machine" for n in noisy)]
    text = "\n".join(lines)
    print(text)
    os.makedirs("bench-out", exist_ok=True)
    with open("bench-out/parallel.md", "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
