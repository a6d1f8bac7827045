#!/usr/bin/env bash
# make run: pretrains the tiny GPT-2 dense and low-rank on 2 MPI ranks and evaluates both checkpoints on the
# held-out split; then finetunes the dense one with LoRA over its NF4-quantized, frozen base (with
# recomputation, ln_f and the tied embedding trained beside the adapters) on the demo tasks and
# evaluates base and finetuned model on the tasks' test splits, by label scoring and by greedy generation
# (FinGPT's protocol): accuracy, macro and weighted F1. Ends with
# tools/report.py on the three runs: parameters, compression, tokens/s, losses and task scores side by side,
# and plots, in runs/demo/report/.
# usage: tools/demo.sh [BUILD_DIR]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
build=${1:-build}
ranks=${LRLLM_DEMO_RANKS:-2}
# Pretraining steps of each tiny model: tiny.cfg's 300 (614 K tokens). A 150-step base leaves finsent at
# chance after finetuning; at 300 it gains about 20 points (docs/findings.md, "Finetuning in the demo").
pretrain_steps=${LRLLM_DEMO_PRETRAIN_STEPS:-300}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# One thread per rank: the ranks already fill the cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
out=runs/demo
rm -rf "$out"
mkdir -p "$out"

for kind in tiny tiny-lowrank; do
  echo "== pretraining $kind on $ranks ranks (input/configs/$kind.cfg)"
  mpirun --quiet -np "$ranks" --oversubscribe "$build/lrllm" --mode pretrain --config "input/configs/$kind.cfg" \
    --train.steps "$pretrain_steps" --run.dir "$out/$kind" | tee "$out/$kind.log"
  ckpt=$(ls "$out/$kind"/ckpt_*.h5 | sort | tail -1)
  echo "== evaluating $ckpt"
  mpirun --quiet -np "$ranks" --oversubscribe "$build/lrllm" --mode eval --model.init "$ckpt" \
    --data.val input/data/pretrain_val.bin | tee "$out/$kind/eval.txt"
done

tasks=input/data/tasks
cat "$tasks"/{finsent,brown-genre,spam}_train.jsonl | awk 'NR % 20 != 0' >"$out/tasks_train.jsonl"
cat "$tasks"/{finsent,brown-genre,spam}_train.jsonl | awk 'NR % 20 == 0' >"$out/tasks_val.jsonl"
base=$(ls "$out/tiny"/ckpt_*.h5 | sort | tail -1)
echo "== finetuning $base: LoRA over an NF4 base, recompute (input/configs/tiny-finetune.cfg)"
mpirun --quiet -np "$ranks" --oversubscribe "$build/lrllm" --mode finetune --config input/configs/tiny-finetune.cfg \
  --model.init "$base" --run.dir "$out/tiny-finetune" | tee "$out/tiny-finetune.log"
tuned=$(ls "$out/tiny-finetune"/ckpt_*.h5 | sort | tail -1)
test_sets="$tasks/finsent_test.jsonl,$tasks/brown-genre_test.jsonl,$tasks/spam_test.jsonl"
for model in "$base" "$tuned"; do
  echo "== evaluating $model on the demo tasks (label scoring)"
  mpirun --quiet -np "$ranks" --oversubscribe "$build/lrllm" --mode eval --model.init "$model" \
    --eval.tasks "$test_sets" --eval.method score --run.dir "$(dirname "$model")"
  echo "== evaluating $model on the demo tasks (greedy generation)"
  mpirun --quiet -np "$ranks" --oversubscribe "$build/lrllm" --mode eval --model.init "$model" \
    --eval.tasks "$test_sets" --eval.method generate --run.dir "$(dirname "$model")/eval-generate"
done
echo "== report on the demo runs"
/usr/bin/python3 tools/report.py --compare "$out/tiny" "$out/tiny-lowrank" "$out/tiny-finetune" --out "$out/report"
echo "== report written to $out/report/report.md, plots beside it (loss, lr, tokens_per_s, memory .png)"
