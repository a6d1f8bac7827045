#!/bin/bash
# Runs one rank with only the GPU of its local rank visible (LRLLM_GPU_BIND=rank in jobs/lib.sh):
#   bind-gpu.sh COMMAND [ARGS...]
# The local rank comes from the launcher: mpirun sets OMPI_COMM_WORLD_LOCAL_RANK, srun SLURM_LOCALID (read
# second, since a batch job's own SLURM_LOCALID=0 reaches every rank that mpirun starts). The GPU is picked
# from the list Slurm gave the job (CUDA_VISIBLE_DEVICES), round robin when ranks outnumber GPUs.
set -euo pipefail
local_rank=${OMPI_COMM_WORLD_LOCAL_RANK:-${SLURM_LOCALID:-0}}
IFS=, read -r -a gpus <<<"${CUDA_VISIBLE_DEVICES:-}"
if ((${#gpus[@]} > 0)); then
  export CUDA_VISIBLE_DEVICES=${gpus[local_rank % ${#gpus[@]}]}
else
  export CUDA_VISIBLE_DEVICES=$local_rank
fi
exec "$@"
