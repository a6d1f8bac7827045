#!/usr/bin/env bash
# The Slurm jobs (jobs/*.sbatch) under a real Slurm on this machine: starts munged, slurmctld and slurmd as
# root, with a one-node configuration, state and logs in a temporary directory and ports of their own; submits
# pretraining, finetuning, evaluation and a multi-node layout on one node; stops a training job twice with a
# signal and checks that it requeues itself, resumes from its checkpoint and ends with the losses of an
# uninterrupted job. Also checks, without Slurm, that a job given a missing config fails at once.
#
#   tests/slurm/run.sh [BUILD_DIR]      (default build; LRLLM_BIN=PATH overrides BUILD_DIR/lrllm;
#                                        LRLLM_SLURM_TEST_LOGS=DIR keeps the jobs' output and daemon logs)
#
# One "PASS name" or "FAIL name: reason" line per check, exit status 1 if any failed. Every process it
# started, and every process of its jobs, is ended on exit (also on Ctrl-C or a failure), and every wait has
# a time limit.
set -uo pipefail
build=${1:-build}
cd "$(dirname "$0")/../.." || exit 1
repo=$PWD
bin=${LRLLM_BIN:-$build/lrllm}
[[ $bin == /* ]] || bin=$repo/$bin
python=/usr/bin/python3
export PATH=$PATH:/usr/sbin:/sbin
started=$SECONDS

failed=0
pass() { echo "PASS $1"; }
fail() {
  echo "FAIL $1: ${2//$'\n'/ }"
  failed=$((failed + 1))
}
# Shows the end of a file under a FAIL line, indented so that the suite runner does not count it.
show() { [[ -f $1 ]] && tail -n "${2:-15}" "$1" | sed 's/^/  | /'; }

# Variables of an outer Slurm job would point the clients and the job scripts elsewhere.
while read -r v; do unset "$v"; done < <(compgen -e | grep '^SLURM_')
if [[ $(id -u) -eq 0 ]]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
export LRLLM_BIN=$bin

tmp=$(mktemp -d /tmp/lrllm-slurm.XXXXXX)
# munged wants to see its socket's directory searchable.
chmod 711 "$tmp"
# Everything our slurmd starts (step daemons, job shells, launchers, ranks) inherits this variable, so what
# survives the daemons can be found by it, and only that.
tag=LRLLM_SLURM_TEST_JOB=$tmp
munged_pid='' ctld_pid='' slurmd_pid=''

stop_pid() {
  local pid=$1 i
  [[ -n $pid ]] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 50; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  kill -KILL "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
}

cleanup() {
  trap - EXIT INT TERM
  local i d
  if [[ -n $ctld_pid ]] && kill -0 "$ctld_pid" 2>/dev/null; then
    timeout 10 scancel --quiet --user="$(id -un)" 2>/dev/null
    for ((i = 0; i < 30; i++)); do
      [[ -z $(timeout 10 squeue -h -o %i 2>/dev/null) ]] && break
      sleep 0.5
    done
  fi
  stop_pid "$slurmd_pid"
  stop_pid "$ctld_pid"
  stop_pid "$munged_pid"
  for d in /proc/[0-9]*; do
    grep -qzx -- "$tag" "$d/environ" 2>/dev/null && kill -KILL "${d#/proc/}" 2>/dev/null
  done
  if [[ -n ${LRLLM_SLURM_TEST_LOGS:-} ]]; then
    mkdir -p "$LRLLM_SLURM_TEST_LOGS" && cp "$tmp"/*.out "$tmp"/*.log "$tmp/slurm.conf" "$LRLLM_SLURM_TEST_LOGS/" 2>/dev/null
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- Without Slurm: a missing config stops every job script at once, with one line on stderr. ---------
check_missing_config() {
  local script reason=
  for script in pretrain finetune eval multinode; do
    local err rc=0
    err=$(timeout 20 bash "jobs/$script.sbatch" "$tmp/missing.cfg" --train.steps 1 2>&1 >"$tmp/stdout") || rc=$?
    if [[ $rc -ne 2 ]]; then
      reason="jobs/$script.sbatch exited $rc, expected 2"
    elif [[ $(wc -l <<<"$err") -ne 1 || $err != *"config file not found: $tmp/missing.cfg"* ]]; then
      reason="jobs/$script.sbatch printed on stderr: $err"
    elif [[ -s $tmp/stdout ]]; then
      reason="jobs/$script.sbatch printed on stdout (started something?): $(head -1 "$tmp/stdout")"
    fi
    [[ -n $reason ]] && break
  done
  if [[ -z $reason ]]; then
    rc=0
    err=$(LRLLM_CONFIG=$tmp/missing.cfg timeout 20 bash jobs/pretrain.sbatch 2>&1 >/dev/null) || rc=$?
    [[ $rc -eq 2 && $err == *"config file not found"* ]] || reason="LRLLM_CONFIG=missing: exit $rc, stderr: $err"
  fi
  if [[ -z $reason ]]; then pass "job scripts: a missing config fails at once with one line"; else
    fail "job scripts: a missing config fails at once with one line" "$reason"
  fi
}

check_bind_gpu() {
  local a b
  a=$(OMPI_COMM_WORLD_LOCAL_RANK=1 SLURM_LOCALID=0 CUDA_VISIBLE_DEVICES=4,6 bash jobs/bind-gpu.sh printenv CUDA_VISIBLE_DEVICES)
  b=$(env -u OMPI_COMM_WORLD_LOCAL_RANK SLURM_LOCALID=3 CUDA_VISIBLE_DEVICES=0,1 bash jobs/bind-gpu.sh printenv CUDA_VISIBLE_DEVICES)
  if [[ $a == 6 && $b == 1 ]]; then pass "jobs/bind-gpu.sh: one GPU per local rank"; else
    fail "jobs/bind-gpu.sh: one GPU per local rank" "got '$a' (expected 6) and '$b' (expected 1)"
  fi
}

check_missing_config
check_bind_gpu
if [[ ! -x $bin ]]; then
  fail "slurm" "no lrllm binary at $bin (build it first)"
  exit 1
fi

# --- A one-node Slurm --------------------------------------------------------------------------------
port_free() { ! grep -qi "$(printf ':%04X ' "$1")" /proc/net/tcp /proc/net/tcp6 2>/dev/null; }

# Starts the daemons and waits for the node; on failure sets why and returns 1.
why=
start_slurm() {
  local cmd
  if [[ $(id -u) -ne 0 ]]; then
    why="not root: slurmd must run as root to start jobs"
    return 1
  fi
  for cmd in munged mungekey slurmctld slurmd sbatch scontrol squeue scancel sinfo; do
    if ! command -v "$cmd" >/dev/null; then
      bash tools/install-deps.sh >"$tmp/install.log" 2>&1
      break
    fi
  done
  for cmd in munged mungekey slurmctld slurmd sbatch scontrol squeue scancel sinfo; do
    command -v "$cmd" >/dev/null || {
      why="$cmd not found; tools/install-deps.sh said: $(tail -1 "$tmp/install.log" 2>/dev/null)"
      return 1
    }
  done

  mungekey --create --keyfile="$tmp/munge.key" >/dev/null 2>&1 || {
    why="mungekey could not create a key"
    return 1
  }
  munged --foreground --force --socket="$tmp/munge.sock" --key-file="$tmp/munge.key" \
    --pid-file="$tmp/munged.pid" --seed-file="$tmp/munged.seed" --log-file="$tmp/munged.log" \
    >"$tmp/munged.out" 2>&1 &
  munged_pid=$!
  local i
  for ((i = 0; i < 50; i++)); do
    [[ -S $tmp/munge.sock ]] && break
    kill -0 "$munged_pid" 2>/dev/null || break
    sleep 0.2
  done
  [[ -S $tmp/munge.sock ]] || {
    why="munged did not start: $(tail -1 "$tmp/munged.out")"
    return 1
  }

  local port=$((20000 + RANDOM % 20000))
  while ! port_free "$port" || ! port_free $((port + 1)); do port=$((port + 2)); done
  local node
  node=$(hostname -s 2>/dev/null)
  node=${node:-localhost}
  mkdir -p "$tmp/state" "$tmp/spool" "$tmp/runs"
  : >"$tmp/plugstack.conf"
  # At least 4 CPUs, so that the multi-node script can run 4 ranks on one node (config_overrides: slurmd
  # takes the configured CPUs as they are; on fewer cores, ranks share them).
  local cpus
  cpus=$(nproc)
  ((cpus >= 4)) || cpus=4
  # proctrack/linuxproc and task/none: no cgroups, which containers often lack. cred_expire also sets how
  # long a requeued job waits before it may start again (Slurm's default: 120 s); sched_interval=1 has the
  # scheduler look at it soon after.
  cat >"$tmp/slurm.conf" <<EOF
ClusterName=lrllmtest
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$tmp/munge.sock,cred_expire=5
StateSaveLocation=$tmp/state
SlurmdSpoolDir=$tmp/spool
SlurmctldPidFile=$tmp/slurmctld.pid
SlurmdPidFile=$tmp/slurmd.pid
SlurmctldLogFile=$tmp/slurmctld.log
SlurmdLogFile=$tmp/slurmd.log
PlugStackConfig=$tmp/plugstack.conf
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
JobRequeue=1
ReturnToService=2
SlurmdParameters=config_overrides
SlurmdTimeout=30
KillWait=10
MinJobAge=600
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
  export SLURM_CONF=$tmp/slurm.conf
  env "$tag" slurmctld -D -f "$SLURM_CONF" >"$tmp/slurmctld.out" 2>&1 &
  ctld_pid=$!
  env "$tag" slurmd -D -f "$SLURM_CONF" -N "$node" >"$tmp/slurmd.out" 2>&1 &
  slurmd_pid=$!
  local state=
  for ((i = 0; i < 60; i++)); do
    state=$(timeout 10 sinfo -h -n "$node" -o %T 2>/dev/null)
    [[ $state == idle ]] && return 0
    kill -0 "$ctld_pid" 2>/dev/null || {
      why="slurmctld exited: $(tail -1 "$tmp/slurmctld.out")"
      return 1
    }
    kill -0 "$slurmd_pid" 2>/dev/null || {
      why="slurmd exited: $(tail -1 "$tmp/slurmd.out")"
      return 1
    }
    sleep 0.5
  done
  why="node $node is '${state:-unknown}', not idle, after 30 s: $(tail -1 "$tmp/slurmd.log" 2>/dev/null)"
  return 1
}

if ! start_slurm; then
  fail "slurm" "cannot start a one-node Slurm ($why)"
  show "$tmp/slurmctld.log" 5
  exit 1
fi
pass "slurm: munged, slurmctld and slurmd started, node idle"

# --- Jobs ----------------------------------------------------------------------------------------------
# Two tasks of one CPU each, output in the temporary directory; the test options on the command line win
# over the scripts' #SBATCH lines. Prints the job id.
submit() {
  local out
  out=$(timeout 30 sbatch --parsable --chdir="$repo" --output="$tmp/%x_%j.out" --ntasks-per-node=2 \
    --cpus-per-task=1 --time=10 "$@" 2>&1) || {
    echo "sbatch failed: $out" >&2
    return 1
  }
  echo "${out%%;*}"
}
job_field() { timeout 20 scontrol show job -o "$1" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p" | head -1; }
# Waits for job $1 to end, at most $2 seconds; prints its final state. (A requeued job is PENDING again,
# which is not an end.)
wait_job() {
  local state='' start=$SECONDS
  while ((SECONDS - start < $2)); do
    state=$(job_field "$1" JobState)
    case $state in
      COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | PREEMPTED | OUT_OF_MEMORY | BOOT_FAIL | DEADLINE)
        echo "$state"
        return 0
        ;;
    esac
    sleep 0.5
  done
  echo "still ${state:-unknown} after $2 s"
  return 1
}
# Waits, at most $1 seconds, until the command "${@:2}" succeeds.
wait_until() {
  local limit=$1 start=$SECONDS
  shift
  while ((SECONDS - start < limit)); do
    "$@" && return 0
    sleep 0.5
  done
  return 1
}
# Check name, job id, run dir, steps: the job completed with exit 0 and left metrics and a final checkpoint.
check_training_job() {
  local name=$1 id=$2 dir=$3 steps=$4 state exitcode out
  state=$(wait_job "$id" 150)
  exitcode=$(job_field "$id" ExitCode)
  if [[ $state != COMPLETED || $exitcode != 0:0 ]]; then
    fail "$name" "job $id ended $state with exit code $exitcode (reason $(job_field "$id" Reason))"
    show "$(job_field "$id" StdOut)"
    return 1
  fi
  if out=$("$python" tests/slurm/metrics.py check "$dir" "$steps" 2>&1); then
    pass "$name ($out)"
  else
    fail "$name" "$out"
    show "$(job_field "$id" StdOut)"
    return 1
  fi
}

short=(--train.batch_size 4 --run.log_every 5)

# Pretraining through srun (the default launcher in a job), 2 ranks.
pre_dir=$tmp/runs/pretrain
if id=$(submit --job-name=pretrain --export="ALL,$tag,LRLLM_RUN_DIR=$pre_dir" jobs/pretrain.sbatch \
  input/configs/tiny.cfg --train.steps 12 --train.eval_every 6 --checkpoint.every 6 "${short[@]}"); then
  check_training_job "slurm: pretrain job (srun, 2 ranks)" "$id" "$pre_dir" 12
else
  fail "slurm: pretrain job (srun, 2 ranks)" "could not submit"
fi

# Finetuning from that checkpoint through mpirun, 2 threads a rank, the run dir given as an option; at the
# same time evaluation through jobs/bind-gpu.sh (LRLLM_GPU_BIND=rank; without a GPU only the wrapper runs).
ft_dir=$tmp/runs/finetune
ckpt=$pre_dir/ckpt_000012.h5
if [[ -f $ckpt ]]; then
  ft=$(submit --job-name=finetune --cpus-per-task=2 --export="ALL,$tag,LRLLM_LAUNCHER=mpirun" jobs/finetune.sbatch \
    --model.init "$ckpt" --data.train input/data/tasks/finsent_train.jsonl \
    --data.val input/data/tasks/finsent_test.jsonl --train.steps 6 --train.eval_every 3 --checkpoint.every 3 \
    --run.dir "$ft_dir" "${short[@]}")
  ev=$(submit --job-name=eval --ntasks-per-node=1 --export="ALL,$tag,LRLLM_GPU_BIND=rank" jobs/eval.sbatch \
    --model.init "$ckpt" --data.val input/data/pretrain_val.bin --train.eval_batches 2)
  if [[ -n $ft ]]; then
    check_training_job "slurm: finetune job from the pretrained checkpoint (mpirun, 2 ranks x 2 threads)" "$ft" "$ft_dir" 6
  else
    fail "slurm: finetune job from the pretrained checkpoint (mpirun, 2 ranks x 2 threads)" "could not submit"
  fi
  if [[ -z $ev ]]; then
    fail "slurm: eval job" "could not submit"
  else
    state=$(wait_job "$ev" 60)
    out=$(job_field "$ev" StdOut)
    if [[ $state == COMPLETED ]] && grep -qE '^eval .*loss [0-9.]+, ppl [0-9.]+' "$out"; then
      pass "slurm: eval job ($(grep -oE 'loss [0-9.]+, ppl [0-9.]+' "$out"))"
    else
      fail "slurm: eval job" "job $ev ended $state, exit code $(job_field "$ev" ExitCode), no loss line"
      show "$out"
    fi
  fi
else
  fail "slurm: finetune job from the pretrained checkpoint (mpirun, 2 ranks x 2 threads)" "no pretrained checkpoint"
  fail "slurm: eval job" "no pretrained checkpoint"
fi

# The multi-node script on one node: 4 ranks as tp 2 x pp 2, no GPUs; extra srun options (--label).
mn_dir=$tmp/runs/multinode
if id=$(submit --job-name=multinode --nodes=1 --ntasks-per-node=4 --gpus-per-node=0 \
  --export="ALL,$tag,LRLLM_RUN_DIR=$mn_dir,LRLLM_LAUNCHER_ARGS=--label" jobs/multinode.sbatch input/configs/tiny.cfg \
  --train.steps 3 --train.eval_every 3 "${short[@]}"); then
  check_training_job "slurm: multinode job on one node (tp 2 x pp 2)" "$id" "$mn_dir" 3
else
  fail "slurm: multinode job on one node (tp 2 x pp 2)" "could not submit"
fi

# Preemption: a training job is stopped by USR1 (what --signal=B:USR1@120 sends before the time limit) and,
# after its requeue, by TERM (what scancel and preemption send), each at the batch shell; it must checkpoint,
# exit 75, requeue itself, resume from latest and end with every loss of an uninterrupted job of the same
# config (run at the same time, through mpirun).
# Run dir $1 has steps 1..$2 and the losses of the uninterrupted run dir $3; sets check to the summary, or to
# the reason it does not.
matches_reference() {
  check=$("$python" tests/slurm/metrics.py check "$1" "$2" 2>&1) &&
    check=$("$python" tests/slurm/metrics.py same "$1" "$3" 1e-6 2>&1)
}
# Check $1 passed when the reason $2 is empty (with check's summary); else it failed, and job $3's output shows.
report_stop_check() {
  if [[ -z $2 ]]; then pass "$1 ($check)"; else
    fail "$1" "$2"
    [[ -n $3 ]] && show "$(job_field "$3" StdOut)" 30
  fi
}

name="slurm: stopped twice by a signal, the job requeues, resumes and matches an uninterrupted run"
p_dir=$tmp/runs/preempt
r_dir=$tmp/runs/reference
args=(input/configs/tiny.cfg --train.steps 40 --train.eval_every 10 --checkpoint.every 8 "${short[@]}")
pjob=$(submit --job-name=preempt --export="ALL,$tag,LRLLM_RUN_DIR=$p_dir" jobs/pretrain.sbatch "${args[@]}")
rid=$(submit --job-name=reference --export="ALL,$tag,LRLLM_RUN_DIR=$r_dir,LRLLM_LAUNCHER=mpirun" \
  jobs/pretrain.sbatch "${args[@]}")
# The step of the newest checkpoint in directory $1 (0 when there is none).
newest_ckpt() {
  local f newest=0
  for f in "$1"/ckpt_*.h5; do
    [[ -f $f ]] || continue
    f=${f##*/ckpt_}
    f=$((10#${f%.h5}))
    ((f > newest)) && newest=$f
  done
  echo "$newest"
}
# The second start runs and has written a checkpoint past the first stop.
second_start_running() {
  [[ $(job_field "$pjob" Restarts) == 1 && $(job_field "$pjob" JobState) == RUNNING ]] &&
    (($(newest_ckpt "$p_dir") > first_stop))
}
reason=
first_stop=0
if [[ -z $pjob || -z $rid ]]; then
  reason="could not submit"
elif ! wait_until 120 test -f "$p_dir/ckpt_000008.h5"; then
  reason="no first checkpoint after 120 s"
elif ! timeout 20 scancel --signal=USR1 --batch "$pjob"; then
  reason="scancel --signal=USR1 --batch failed"
elif ! wait_until 60 grep -q '^stopped by a signal after step' "$(job_field "$pjob" StdOut)"; then
  reason="lrllm did not stop within 60 s of USR1"
elif ! first_stop=$(sed -n 's/^stopped by a signal after step \([0-9]*\).*/\1/p' "$(job_field "$pjob" StdOut)" | head -1) ||
  ! wait_until 120 second_start_running; then
  reason="no second start with a checkpoint past step $first_stop after 120 s (state $(job_field "$pjob" JobState), restarts $(job_field "$pjob" Restarts))"
elif ! timeout 20 scancel --signal=TERM --batch "$pjob"; then
  reason="scancel --signal=TERM --batch failed"
else
  state=$(wait_job "$pjob" 300)
  rstate=$(wait_job "$rid" 300)
  out=$(job_field "$pjob" StdOut)
  restarts=$(job_field "$pjob" Restarts)
  if [[ $state != COMPLETED || $(job_field "$pjob" ExitCode) != 0:0 ]]; then
    reason="job $pjob ended $state, exit code $(job_field "$pjob" ExitCode)"
  elif [[ $restarts != 2 ]]; then
    reason="job $pjob was started $((restarts + 1)) times, expected 3"
  elif [[ $(grep -c 'exit 75' "$out") -ne 2 || $(grep -c 'requeued' "$out") -ne 2 ]]; then
    reason="expected two stops with exit 75 and two requeues in $out"
  elif ! grep -q 'got SIGUSR1' "$out" || ! grep -q 'got SIGTERM' "$out"; then
    reason="the batch shell did not report both signals"
  elif [[ $(grep -c '^lrllm pretrain .*resuming .*ckpt_' "$out") -ne 2 ]]; then
    reason="lrllm did not resume twice from a checkpoint"
  elif [[ $rstate != COMPLETED ]]; then
    reason="the uninterrupted job $rid ended $rstate"
  elif ! matches_reference "$p_dir" 40 "$r_dir"; then
    reason=$check
  fi
fi
report_stop_check "$name" "$reason" "$pjob"

# Every shipped kind of training requeues with its own command line: the job script adds only
# --checkpoint.resume latest, so the config's low-rank, LoRA and quantization options meet a checkpoint made
# with them. One stop by USR1 each, against an uninterrupted job of the same command (run at the same time).
# preempt_once NAME SCRIPT STEPS [ARGS...]
preempt_once() {
  local name=$1 script=$2 steps=$3
  shift 3
  local dir=$tmp/runs/preempt-$script-$RANDOM ref=$tmp/runs/reference-$script-$RANDOM job ref_job reason= check=
  job=$(submit --job-name="preempt-$script" --export="ALL,$tag,LRLLM_RUN_DIR=$dir" "jobs/$script.sbatch" "$@")
  ref_job=$(submit --job-name="reference-$script" --export="ALL,$tag,LRLLM_RUN_DIR=$ref,LRLLM_LAUNCHER=mpirun" \
    "jobs/$script.sbatch" "$@")
  if [[ -z $job || -z $ref_job ]]; then
    reason="could not submit"
  elif ! wait_until 120 test -f "$dir/ckpt_000004.h5"; then
    reason="no first checkpoint after 120 s"
  elif ! timeout 20 scancel --signal=USR1 --batch "$job"; then
    reason="scancel --signal=USR1 --batch failed"
  else
    local state rstate out
    state=$(wait_job "$job" 300)
    rstate=$(wait_job "$ref_job" 300)
    out=$(job_field "$job" StdOut)
    if [[ $state != COMPLETED || $(job_field "$job" ExitCode) != 0:0 ]]; then
      reason="job $job ended $state, exit code $(job_field "$job" ExitCode)"
    elif [[ $(job_field "$job" Restarts) != 1 ]]; then
      reason="job $job was started $(($(job_field "$job" Restarts) + 1)) times, expected 2"
    elif [[ $(grep -c "^lrllm $script .*resuming .*ckpt_" "$out") -ne 1 ]]; then
      reason="lrllm did not resume from a checkpoint: $(grep -m1 'error' "$out")"
    elif [[ $rstate != COMPLETED ]]; then
      reason="the uninterrupted job $ref_job ended $rstate"
    elif ! matches_reference "$dir" "$steps" "$ref"; then
      reason=$check
    fi
  fi
  report_stop_check "$name" "$reason" "$job"
}
preempt_once "slurm: a low-rank pretraining job (tiny-lowrank.cfg) stopped by a signal requeues and resumes" \
  pretrain 16 input/configs/tiny-lowrank.cfg --train.steps 16 --train.eval_every 8 --checkpoint.every 4 "${short[@]}"
if [[ -f $ckpt ]]; then
  preempt_once "slurm: a finetuning job (tiny-finetune.cfg, NF4 + LoRA) stopped by a signal requeues and resumes" \
    finetune 16 input/configs/tiny-finetune.cfg --model.init "$ckpt" --data.train input/data/tasks/finsent_train.jsonl \
    --data.val input/data/tasks/finsent_test.jsonl --train.steps 16 --train.eval_every 8 --checkpoint.every 4 \
    "${short[@]}"
else
  fail "slurm: a finetuning job (tiny-finetune.cfg, NF4 + LoRA) stopped by a signal requeues and resumes" \
    "no pretrained checkpoint"
fi

# scancel sends TERM to every process of the job: lrllm still checkpoints (srun passes TERM on), but a cancel
# must stay a cancel: the job script must not requeue it.
name="slurm: scancel stops training with a checkpoint and the job stays cancelled"
c_dir=$tmp/runs/cancel
cid=$(submit --job-name=cancel --export="ALL,$tag,LRLLM_RUN_DIR=$c_dir" jobs/pretrain.sbatch \
  input/configs/tiny.cfg --train.steps 300 --train.eval_every 100 --checkpoint.every 4 "${short[@]}")
ended() { grep -qE '^lrllm-job: lrllm (stopped|failed)' "$out" 2>/dev/null; }
reason=
if [[ -z $cid ]]; then
  reason="could not submit"
elif ! wait_until 120 test -f "$c_dir/ckpt_000004.h5"; then
  reason="no first checkpoint after 120 s"
elif ! timeout 20 scancel "$cid"; then
  reason="scancel failed"
else
  out=$(job_field "$cid" StdOut)
  if ! wait_until 60 ended; then
    reason="the job script did not report the end of lrllm within 60 s"
  else
    sleep 2
    state=$(wait_job "$cid" 30)
    if ! grep -q '^stopped by a signal after step' "$out"; then
      reason="lrllm did not stop with a checkpoint"
    elif ! grep -q 'not requeued' "$out" || [[ $(job_field "$cid" Restarts) != 0 || $state != CANCELLED ]]; then
      reason="job $cid is $state after $(job_field "$cid" Restarts) requeues"
    fi
  fi
fi
if [[ -z $reason ]]; then pass "$name"; else
  fail "$name" "$reason"
  [[ -n $cid ]] && show "$(job_field "$cid" StdOut)" 20
fi

echo "slurm tests took $((SECONDS - started)) s"
((failed == 0))
