# Shared logic of the Slurm jobs in jobs/*.sbatch (sourced, not run). A job script calls
#   lrllm_job MODE DEFAULT_CONFIG [CONFIG] [--section.option VALUE ...]
# after lrllm_default_arg calls for options it wants unless the user gave them.
#
# Environment (all optional):
#   LRLLM_CONFIG        config file, when not given as the first argument
#   LRLLM_RUN_DIR       run directory; else --run.dir among the arguments, else the config's [run] dir,
#                       else runs/<job name>_<job id>
#   LRLLM_BIN           the lrllm binary (default: $LRLLM_HOME/build/lrllm)
#   LRLLM_LAUNCHER      srun (default inside a Slurm job) or mpirun (default outside one)
#   LRLLM_SRUN_MPI      srun's --mpi plugin (default pmix: what Open MPI 4 and 5 speak to Slurm)
#   LRLLM_LAUNCHER_ARGS more launcher options, split on spaces
#   LRLLM_GPU_BIND      none (default: every rank sees the node's GPUs and lrllm picks one by local rank)
#                       or rank (each rank sees only the GPU of its local rank: jobs/bind-gpu.sh)
#   LRLLM_REQUEUE       1 (default): requeue the job when lrllm stopped on a signal (exit 75); 0: do not
# shellcheck shell=bash

# Exit status of lrllm when a stop signal made it write a checkpoint and end (EX_TEMPFAIL).
readonly LRLLM_EXIT_STOPPED=75

lrllm_log() { echo "lrllm-job: $*"; }
# One line on stderr and exit 2 (lrllm's status for bad input), before anything is launched.
lrllm_die() {
  echo "lrllm-job: error: $*" >&2
  exit 2
}

# Options the job script adds unless the user's arguments already name them (lrllm refuses an option
# given twice).
LRLLM_DEFAULTS=()
lrllm_default_arg() { LRLLM_DEFAULTS+=("$@"); }

# Whether option $1 (e.g. --run.dir) is among the remaining arguments; prints its value.
_lrllm_find_arg() {
  local name=$1
  shift
  while (($#)); do
    case $1 in
      "$name")
        echo "${2-}"
        return 0
        ;;
      "$name"=*)
        echo "${1#*=}"
        return 0
        ;;
    esac
    shift
  done
  return 1
}

# The value of `dir` in the [run] section of an INI config, without a trailing # comment.
_lrllm_config_run_dir() {
  awk '
    /^[[:space:]]*\[/ { section = $0; gsub(/[][[:space:]]/, "", section); next }
    section == "run" {
      line = $0; sub(/#.*/, "", line)
      eq = index(line, "="); if (eq == 0) next
      key = substr(line, 1, eq - 1); gsub(/[[:space:]]/, "", key)
      if (key != "dir") next
      value = substr(line, eq + 1); gsub(/^[[:space:]]+|[[:space:]]+$/, "", value)
      print value; exit
    }' "$1"
}

# Forwards a stop request to the launcher. Always as SIGUSR1: mpirun passes USR1 on to the ranks but
# answers TERM by killing them, and srun passes both on; lrllm treats USR1 and TERM alike.
_lrllm_on_signal() {
  _lrllm_signalled=1
  lrllm_log "got SIG$1: asking lrllm to checkpoint and stop"
  if [[ -n ${_lrllm_child:-} ]]; then kill -USR1 "$_lrllm_child" 2>/dev/null || true; fi
}

# Runs "$@" in the background so the shell can take signals while it runs (bash runs a trap only
# between commands), and returns its exit status.
_lrllm_launch() {
  _lrllm_signalled=0
  _lrllm_child=
  trap '_lrllm_on_signal USR1' USR1
  trap '_lrllm_on_signal TERM' TERM
  "$@" &
  _lrllm_child=$!
  # A signal that came before the launcher existed is forwarded now.
  if ((_lrllm_signalled)); then kill -USR1 "$_lrllm_child" 2>/dev/null || true; fi
  local rc
  while :; do
    _lrllm_signalled=0
    rc=0
    wait "$_lrllm_child" || rc=$?
    # A trap ends `wait` early with 128+signal while the launcher still runs: wait again (bash keeps the
    # launcher's status, so this also returns it when the launcher ended meanwhile).
    ((_lrllm_signalled)) || break
  done
  trap - USR1 TERM
  return "$rc"
}

# This job's state as slurmctld sees it (RUNNING, CANCELLED, ...), empty if it cannot tell.
_lrllm_job_state() {
  scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | head -1 | cut -d= -f2
}

lrllm_job() {
  local mode=$1 default_config=$2
  shift 2
  local config=${LRLLM_CONFIG:-$default_config}
  if (($#)) && [[ $1 != -* ]]; then
    config=$1
    shift
  fi
  local extra=("$@")

  # Everything is checked before anything is launched, so a mistake costs seconds, not a queue wait.
  if [[ -n $config && ! -f $config ]]; then
    lrllm_die "config file not found: $config (working directory $PWD; give a path or set LRLLM_CONFIG)"
  fi
  local bin=${LRLLM_BIN:-$LRLLM_HOME/build/lrllm}
  [[ -x $bin ]] || lrllm_die "lrllm binary not found or not executable: $bin (build it with make, or set LRLLM_BIN)"
  local launcher=${LRLLM_LAUNCHER:-}
  if [[ -z $launcher ]]; then
    if [[ -n ${SLURM_JOB_ID:-} ]]; then launcher=srun; else launcher=mpirun; fi
  fi
  [[ $launcher == srun || $launcher == mpirun ]] || lrllm_die "LRLLM_LAUNCHER must be srun or mpirun, not $launcher"
  command -v "$launcher" >/dev/null || lrllm_die "launcher not found: $launcher"
  local gpu_bind=${LRLLM_GPU_BIND:-none}
  [[ $gpu_bind == none || $gpu_bind == rank ]] || lrllm_die "LRLLM_GPU_BIND must be none or rank, not $gpu_bind"

  # One OpenMP thread per CPU Slurm gave each task (lrllm otherwise splits the node's cores by ranks).
  if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK; fi
  local threads=${OMP_NUM_THREADS:-1}

  lrllm_log "job ${SLURM_JOB_ID:-none} (start $((${SLURM_RESTART_COUNT:-0} + 1))) on ${SLURM_JOB_NODELIST:-$(hostname)}," \
    "${SLURM_NTASKS:-?} tasks x $threads threads"

  local args=(--mode "$mode")
  [[ -n $config ]] && args+=(--config "$config")

  # The run directory is named explicitly so that this script and lrllm agree on where checkpoints are.
  local run_dir=${LRLLM_RUN_DIR:-}
  local given_dir
  if given_dir=$(_lrllm_find_arg --run.dir "${extra[@]}"); then
    [[ -n $run_dir && $run_dir != "$given_dir" ]] && lrllm_die "LRLLM_RUN_DIR=$run_dir and --run.dir $given_dir disagree"
    run_dir=$given_dir
  else
    if [[ -z $run_dir && -n $config ]]; then run_dir=$(_lrllm_config_run_dir "$config"); fi
    if [[ -z $run_dir && $mode != eval ]]; then run_dir=runs/${SLURM_JOB_NAME:-lrllm}_${SLURM_JOB_ID:-$$}; fi
    [[ -n $run_dir ]] && args+=(--run.dir "$run_dir")
  fi

  # Training resumes from the newest checkpoint of its run directory when there is one: after a requeue
  # that is where the stopped run left off. lrllm refuses `latest` in a directory without checkpoints.
  if [[ $mode == pretrain || $mode == finetune ]] && ! _lrllm_find_arg --checkpoint.resume "${extra[@]}" >/dev/null; then
    if compgen -G "$run_dir/ckpt_*.h5" >/dev/null; then
      args+=(--checkpoint.resume latest)
      lrllm_log "resuming from the newest checkpoint in $run_dir"
    fi
  fi

  local i
  for ((i = 0; i < ${#LRLLM_DEFAULTS[@]}; i += 2)); do
    if ! _lrllm_find_arg "${LRLLM_DEFAULTS[i]}" "${extra[@]}" >/dev/null; then
      args+=("${LRLLM_DEFAULTS[i]}" "${LRLLM_DEFAULTS[i + 1]}")
    fi
  done
  args+=("${extra[@]}")

  local cmd
  case $launcher in
    srun)
      # Since Slurm 22.05 srun no longer reads SLURM_CPUS_PER_TASK, so the job's value is passed on.
      cmd=(srun --mpi="${LRLLM_SRUN_MPI:-pmix}" --kill-on-bad-exit=1)
      [[ -n ${SLURM_CPUS_PER_TASK:-} ]] && cmd+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
      ;;
    mpirun)
      # mpirun reads the allocation (nodes, tasks per node) from Slurm; outside Slurm: LRLLM_NTASKS ranks.
      cmd=(mpirun --quiet -np "${SLURM_NTASKS:-${LRLLM_NTASKS:-1}}")
      [[ -n ${OMP_NUM_THREADS:-} ]] && cmd+=(-x OMP_NUM_THREADS)
      # Open MPI pins each rank to one core by default; a multi-threaded rank needs its CPUs free.
      ((threads > 1)) && cmd+=(--bind-to none)
      ;;
  esac
  # shellcheck disable=SC2206 # word splitting of the user's launcher options is intended
  [[ -n ${LRLLM_LAUNCHER_ARGS:-} ]] && cmd+=($LRLLM_LAUNCHER_ARGS)
  [[ $gpu_bind == rank ]] && cmd+=(bash "$LRLLM_HOME/jobs/bind-gpu.sh")
  cmd+=("$bin" "${args[@]}")

  lrllm_log "running: ${cmd[*]}"
  local rc=0
  _lrllm_launch "${cmd[@]}" || rc=$?

  if ((rc == LRLLM_EXIT_STOPPED)); then
    # lrllm wrote a checkpoint and stopped on a signal. While the job still runs (the warning of
    # --signal=B:USR1@SECONDS before the time limit, or scancel --signal=USR1 --batch), queue it again: its
    # next start resumes from that checkpoint, and exit 0 keeps the requeued job from counting as failed.
    # A job that is already ending (scancel, preemption, past the limit) is not requeued from here: a
    # cancel stays a cancel, and Slurm requeues preempted jobs itself where the cluster asks for that.
    local state=
    [[ -n ${SLURM_JOB_ID:-} ]] && state=$(_lrllm_job_state)
    if [[ ${LRLLM_REQUEUE:-1} == 1 && $state == RUNNING ]] && scontrol requeue "$SLURM_JOB_ID"; then
      lrllm_log "lrllm stopped with a checkpoint in $run_dir; job $SLURM_JOB_ID requeued, it resumes from there"
      exit 0
    fi
    lrllm_log "lrllm stopped with a checkpoint in $run_dir (exit 75; job state ${state:-unknown}: not requeued);" \
      "submit the job again with the same run directory to resume"
  elif ((rc != 0)); then
    lrllm_log "lrllm failed with exit status $rc"
  else
    lrllm_log "done"
  fi
  exit "$rc"
}
