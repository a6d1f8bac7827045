"""Parallel layouts of lrllm under mpirun: every layout of 1, 2 and 4 ranks gives the loss curve of one rank,
checkpoints resume across layouts, low-rank layers cut tensor-parallel traffic to r/d, bad layouts stop
cleanly, and a killed rank ends the job.

Run as: /usr/bin/python3 tests/integration/test_parallel.py BUILD_DIR
"""
import os
import signal
import subprocess
import time

import numpy as np

import test_cli as cli
from test_cli import ENV, LRLLM, TRAIN, VAL, bad_input, metric, model_tensors, rel, run, tmpdir

# Four blocks and four heads, so that pp and tp reach 4; d_ff divisible by 4.
MODEL = ["--model.vocab_size", "512", "--model.n_layer", "4", "--model.n_head", "4", "--model.d_model", "32",
         "--model.d_ff", "128", "--model.seq_len", "16", "--device", "cpu"]
GLOBAL_BATCH = 8
KINDS = [("dense", []), ("lowrank", ["--lowrank.rank", "8"])]
# (ranks, tp, pp, micro_batches, zero); data parallel = ranks / (tp * pp).
LAYOUTS = [
    (2, 1, 1, 1, 0), (2, 1, 1, 1, 1), (2, 2, 1, 1, 0), (2, 1, 2, 4, 0), (2, 1, 2, 2, 1),
    (4, 1, 1, 1, 0), (4, 1, 1, 1, 1), (4, 4, 1, 1, 0), (4, 1, 4, 2, 0), (4, 2, 2, 2, 0), (4, 2, 2, 2, 1),
    (4, 2, 1, 1, 0), (4, 2, 1, 1, 1), (4, 1, 2, 2, 0), (4, 1, 2, 2, 1),
]


def layout_args(ranks, tp, pp, micro, zero):
    dp = ranks // (tp * pp)
    return ["--parallel.tp", str(tp), "--parallel.pp", str(pp), "--parallel.micro_batches", str(micro),
            "--parallel.zero", str(zero), "--train.batch_size", str(GLOBAL_BATCH // dp)]


def train(run_dir, ranks, extra=(), steps=5, check=True):
    args = ["--mode", "pretrain", *MODEL, "--data.train", TRAIN, "--data.val", VAL, "--run.dir", run_dir,
            "--train.steps", str(steps), "--train.warmup", "2", "--train.lr", "3e-3", "--train.eval_every", "0",
            "--train.eval_batches", "1", *extra]
    return run(args, np_=ranks, check=check)


def name_of(layout):
    ranks, tp, pp, micro, zero = layout
    return f"np{ranks}-tp{tp}-pp{pp}-mb{micro}" + ("-zero" if zero else "")


def test_every_layout_gives_the_single_rank_loss_curve():
    for kind, extra in KINDS:
        base = tmpdir(f"layout-{kind}-np1")
        train(base, 1, [*extra, *layout_args(1, 1, 1, 1, 0)])
        want, want_val = metric(base, "loss"), metric(base, "val_loss")[-1]
        for layout in LAYOUTS:
            d = tmpdir(f"layout-{kind}-{name_of(layout)}")
            p = train(d, layout[0], [*extra, *layout_args(*layout)])
            got = metric(d, "loss")
            assert len(got) == 5 and rel(got, want) < 1e-5, f"{kind} {name_of(layout)}: {got} vs {want}"
            assert rel(metric(d, "val_loss")[-1], want_val) < 1e-5, f"{kind} {name_of(layout)}: val loss"
            assert rel(metric(d, "grad_norm"), metric(base, "grad_norm")) < 1e-4, f"{kind} {name_of(layout)}"
            assert f"layout: {layout[0]} ranks" in p.stdout, p.stdout


def test_lowrank_silu_and_refactoring_give_the_single_rank_loss_curve():
    """silu under tensor parallelism (its derivative after the column-parallel sum), ZeRO and pipelines;
    refactoring (every 2 steps) under ZeRO-1's sharded moments and pipeline stages, each refactoring its own."""
    cases = [("silu", ["--lowrank.rank", "8", "--lowrank.activation", "silu"],
              [(2, 2, 1, 1, 0), (4, 2, 2, 2, 1), (2, 1, 2, 2, 1)]),
             ("refactor", ["--lowrank.rank", "8", "--lowrank.refactor_every", "2", "--lowrank.lr_mult", "2"],
              [(2, 1, 1, 1, 1), (2, 1, 2, 2, 0), (4, 1, 2, 2, 1)])]
    for kind, extra, layouts in cases:
        base = tmpdir(f"layout-{kind}-np1")
        train(base, 1, [*extra, *layout_args(1, 1, 1, 1, 0)])
        want = metric(base, "loss")
        for layout in layouts:
            d = tmpdir(f"layout-{kind}-{name_of(layout)}")
            train(d, layout[0], [*extra, *layout_args(*layout)])
            got = metric(d, "loss")
            assert len(got) == 5 and rel(got, want) < 1e-5, f"{kind} {name_of(layout)}: {got} vs {want}"


# Llama (4 query heads sharing 2 key/value heads, an untied lm_head): its tensor-parallel slices hold the
# query heads of their key/value heads, and its pipeline's last stage holds the lm_head, not a copy of wte.
LLAMA = ["--model.arch", "llama", "--model.n_kv_head", "2"]
LLAMA_LAYOUTS = [(2, 1, 1, 1, 0), (2, 1, 1, 1, 1), (2, 2, 1, 1, 0), (2, 1, 2, 4, 0), (4, 1, 4, 2, 0),
                 (4, 2, 2, 2, 0), (4, 2, 1, 1, 1), (4, 1, 2, 2, 1)]


def test_llama_layouts_give_the_single_rank_loss_curve():
    for kind, extra in KINDS:
        base = tmpdir(f"llama-{kind}-np1")
        train(base, 1, [*LLAMA, *extra, *layout_args(1, 1, 1, 1, 0)])
        want, want_val = metric(base, "loss"), metric(base, "val_loss")[-1]
        for layout in LLAMA_LAYOUTS:
            d = tmpdir(f"llama-{kind}-{name_of(layout)}")
            train(d, layout[0], [*LLAMA, *extra, *layout_args(*layout), "--checkpoint.every", "5"])
            got = metric(d, "loss")
            assert len(got) == 5 and rel(got, want) < 1e-5, f"llama {kind} {name_of(layout)}: {got} vs {want}"
            assert rel(metric(d, "val_loss")[-1], want_val) < 1e-5, f"llama {kind} {name_of(layout)}: val loss"
        # The last layout's checkpoint is the whole model, the one rank's to within the layouts' rounding.
        a = model_tensors(os.path.join(base, "ckpt_000005.h5"))
        b = model_tensors(os.path.join(d, "ckpt_000005.h5"))
        assert a.keys() == b.keys() and "lm_head" in a and "wpe" not in a, sorted(a)
        for k in a:
            assert np.linalg.norm(a[k] - b[k]) <= 1e-3 * np.linalg.norm(a[k]) + 1e-6, f"llama {kind}: {k} differs"
    bad_input(["--mode", "pretrain", *MODEL, *LLAMA, "--data.train", TRAIN, "--run.dir", tmpdir("llama-tp"),
               "--parallel.tp", "4"], "--parallel.tp 4 does not divide the model's 2 key/value heads", np_=4)


def resume_across(first, second, name, extra=()):
    """Trains 6 steps under layout `first`; resumes its step-3 checkpoint under `second`."""
    full, part = tmpdir(f"xresume-{name}-full"), tmpdir(f"xresume-{name}-part")
    train(full, first[0], [*extra, *layout_args(*first), "--checkpoint.every", "3"], steps=6)
    train(part, first[0], [*extra, *layout_args(*first), "--checkpoint.every", "3"], steps=3)
    p = train(part, second[0], [*extra, *layout_args(*second), "--checkpoint.every", "3", "--checkpoint.resume",
                                "latest"], steps=6)
    assert "resuming" in p.stdout, p.stdout
    assert list(metric(part, "step")) == [1, 2, 3, 4, 5, 6]
    assert rel(metric(part, "loss"), metric(full, "loss")) < 1e-5, (metric(part, "loss"), metric(full, "loss"))
    a, b = model_tensors(os.path.join(full, "ckpt_000006.h5")), model_tensors(os.path.join(part, "ckpt_000006.h5"))
    assert a.keys() == b.keys()
    # Per tensor, not per element: Adam turns a gradient that is only rounding noise (a bias entry near zero)
    # into a full-size step of either sign, so single elements may differ by about lr between layouts.
    for k in a:
        assert np.linalg.norm(a[k] - b[k]) <= 1e-3 * np.linalg.norm(a[k]) + 1e-6, f"{name}: {k} differs"


def test_resume_from_tp2_pp2_at_one_rank():
    resume_across((4, 2, 2, 2, 0), (1, 1, 1, 1, 0), "tp2pp2-to-1")


def test_llama_resumes_across_layouts():
    resume_across((4, 2, 2, 2, 0), (1, 1, 1, 1, 0), "llama-tp2pp2-to-1", LLAMA)
    resume_across((1, 1, 1, 1, 0), (4, 2, 1, 1, 1), "llama-1-to-dp2tp2zero", [*LLAMA, "--lowrank.rank", "8"])


def test_resume_from_one_rank_under_zero_and_tp():
    resume_across((1, 1, 1, 1, 0), (4, 2, 1, 1, 1), "1-to-dp2tp2zero")


def test_checkpoint_from_a_sharded_layout_is_the_full_model():
    d1, d4 = tmpdir("full-np1"), tmpdir("full-tp2pp2zero")
    train(d1, 1, layout_args(1, 1, 1, 1, 0), steps=2)
    train(d4, 4, layout_args(4, 2, 1, 1, 1) + ["--lowrank.rank", "8", "--lowrank.targets", "qkv,proj"], steps=2)
    dense, sharded = model_tensors(os.path.join(d1, "ckpt_000002.h5")), model_tensors(os.path.join(d4, "ckpt_000002.h5"))
    assert dense["h.3/attn/qkv/W"].shape == (96, 32) and sharded["h.3/attn/qkv/B"].shape == (96, 8)
    assert sharded["h.3/attn/proj/A"].shape == (8, 32) and sharded["wte"].shape == (512, 32)


def test_finetune_under_pipeline_parallelism():
    """NF4 + LoRA with recomputation over 2 pipeline stages, alone and with 2 data-parallel ranks, gives one
    rank's losses; its checkpoints hold the whole model (every stage's frozen base and codes, byte for byte
    what one rank writes) and resume at one rank with the same losses."""
    import h5py
    base = cli.base_checkpoint()
    common = ["--quant.bits", "4", "--train.recompute", "block", "--checkpoint.every", "2"]
    one = tmpdir("ft-pp-np1")
    cli.finetune(one, base, common, steps=4)
    want = metric(one, "loss")
    for ranks, dp in [(2, 1), (4, 2)]:
        d = tmpdir(f"ft-pp-np{ranks}")
        cli.finetune(d, base, [*common, "--parallel.pp", "2", "--parallel.micro_batches", "2"], np_=ranks, steps=4,
                     batch_size=4 // dp)
        assert rel(metric(d, "loss"), want) < 1e-5, f"np{ranks} pp2: {metric(d, 'loss')} vs {want}"
        with h5py.File(os.path.join(one, "ckpt_000002.h5"), "r") as a, \
                h5py.File(os.path.join(d, "ckpt_000002.h5"), "r") as b:
            names = []
            a["model"].visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
            got = []
            b["model"].visititems(lambda n, o: got.append(n) if isinstance(o, h5py.Dataset) else None)
            assert sorted(got) == sorted(names), set(got) ^ set(names)
            for n in names:
                if "lora_" not in n:
                    assert np.array_equal(a["model"][n][()], b["model"][n][()]), f"np{ranks}: {n} differs"
    # The pipeline's step-2 checkpoint (of the same 4-step schedule) continues at one rank as one rank did.
    part = os.path.join(cli.TMP, "ft-pp-np2")
    os.remove(os.path.join(part, "ckpt_000004.h5"))
    p = cli.finetune(part, base, [*common, "--checkpoint.resume", "latest"], steps=4)
    assert "resuming" in p.stdout and list(metric(part, "step")) == [1, 2, 3, 4], p.stdout
    assert rel(metric(part, "loss"), want) < 1e-5, (metric(part, "loss"), want)


def tp_bytes(extra):
    d = tmpdir("tpbytes")
    train(d, 2, [*extra, *layout_args(2, 2, 1, 1, 0)], steps=2)
    return metric(d, "comm_bytes_tp")[0]


def test_lowrank_cuts_tensor_parallel_bytes_to_r_over_d():
    dense, lowrank = tp_bytes([]), tp_bytes(["--lowrank.rank", "8"])
    # Per block and micro-step, two d-wide sums in forward (row-parallel outputs) and two in backward
    # (column-parallel input gradients), from each of the 2 ranks: N = 8 sequences x 16 tokens.
    assert dense == 2 * 4 * 4 * (8 * 16) * 32 * 4, dense
    assert lowrank * 32 == dense * 8, (lowrank, dense)


def test_pipeline_reports_bubble_and_traffic():
    d = tmpdir("bubble")
    p = train(d, 2, layout_args(2, 1, 2, 4, 0), steps=2)
    assert "1F1B schedule, bubble 20.0% of a step" in p.stdout, p.stdout
    # Each step: 4 micro-batches of 2 x 16 x 32 floats forward, as many gradients back, and the tied
    # embedding's gradient summed between the two end stages.
    assert metric(d, "comm_bytes_pp")[0] == (2 * 4 * 2 * 16 * 32 + 2 * 512 * 32) * 4, metric(d, "comm_bytes_pp")
    assert metric(d, "comm_bytes_dp")[0] == 0 and metric(d, "comm_bytes_tp")[0] == 0


def test_bad_layouts_stop_before_work():
    base = ["--mode", "pretrain", *MODEL, "--data.train", TRAIN, "--run.dir", tmpdir("badlayout")]
    bad_input([*base, "--parallel.tp", "2"], "multiple of parallel.tp * parallel.pp = 2", np_=3)
    bad_input([*base, "--parallel.pp", "8"], "above the model's 4 layers", np_=8)
    bad_input([*base, "--parallel.tp", "3"], "does not divide the model's 4 attention heads", np_=3)
    odd_ff = [a if a != "128" else "130" for a in base]
    bad_input([*odd_ff, "--parallel.tp", "4"], "does not divide d_ff 130", np_=4)
    bad_input([*base, "--parallel.tp", "2", "--parallel.tp", "4"], "more than once", np_=2)
    bad_input([*base, "--parallel.pp", "2", "--parallel.micro_batches", "3", "--train.batch_size", "4"],
              "micro_batches 3 does not divide train.batch_size 4", np_=2)
    bad_input([*base, "--parallel.zero", "2"], "parallel.zero must be 0 or 1", np_=2)


def test_killed_rank_ends_the_job():
    d = tmpdir("killed")
    args = ["--mode", "pretrain", *MODEL, "--data.train", TRAIN, "--run.dir", d, "--train.steps", "100000",
            "--train.eval_every", "0", *layout_args(2, 1, 2, 2, 0)]
    job = subprocess.Popen(["mpirun", "--quiet", "-np", "2", "--oversubscribe", LRLLM, *args], env=ENV,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 60
        ranks = []
        while time.time() < deadline and len(ranks) < 2:
            time.sleep(0.5)
            out = subprocess.run(["pgrep", "-f", "-s", str(job.pid), LRLLM], capture_output=True, text=True)
            ranks = [int(x) for x in out.stdout.split() if int(x) != job.pid]
        assert len(ranks) == 2, f"ranks not found: {ranks}"
        time.sleep(2)  # well into training
        os.kill(max(ranks), signal.SIGKILL)
        killed = time.time()
        rc = job.wait(timeout=60)
        assert rc != 0, "the job exited 0 after a rank was killed"
        assert time.time() - killed < 60
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()


def test_stop_signal_checkpoints_and_resumes_exactly():
    # A run told to stop (SIGUSR1, which mpirun forwards to every rank; srun sends SIGTERM) finishes its step,
    # writes a checkpoint and exits 75; resuming from latest ends where an uninterrupted run ends.
    steps, layout = 600, layout_args(2, 1, 2, 2, 0)
    whole, stopped = tmpdir("signal-whole"), tmpdir("signal-stopped")
    train(whole, 2, layout, steps=steps)
    args = ["--mode", "pretrain", *MODEL, "--data.train", TRAIN, "--data.val", VAL, "--run.dir", stopped,
            "--train.steps", str(steps), "--train.warmup", "2", "--train.lr", "3e-3", "--train.eval_every", "0",
            "--train.eval_batches", "1", *layout]
    job = subprocess.Popen(["mpirun", "--quiet", "-np", "2", "--oversubscribe", LRLLM, *args], env=ENV,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for line in job.stdout:
            if line.startswith("step "):
                job.send_signal(signal.SIGUSR1)
                break
        out = line + job.stdout.read()
        rc = job.wait(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert rc == 75, (rc, out[-500:], job.stderr.read())
    assert "stopped by a signal after step" in out, out[-500:]
    stop_step = len(metric(stopped, "loss"))
    assert 0 < stop_step < steps, stop_step
    assert os.path.exists(os.path.join(stopped, f"ckpt_{stop_step:06d}.h5"))
    train(stopped, 2, [*layout, "--checkpoint.resume", "latest"], steps=steps)
    assert np.array_equal(metric(stopped, "loss"), metric(whole, "loss"))


if __name__ == "__main__":
    cli.main(globals())
