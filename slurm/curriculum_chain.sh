#!/bin/bash
# Submits the three curriculum stages as a chain of jobs, each starting when the previous one
# ended successfully (--dependency=afterok), so no job holds GPUs while waiting.
#   slurm/curriculum_chain.sh configs/pku_llama3_8b_curriculum.toml
set -euo pipefail
CONFIG=${1:?usage: curriculum_chain.sh CONFIG}
cd "$(dirname "$0")/.."
previous=""
for stage in 1 2 3; do
  dependency=()
  [ -n "$previous" ] && dependency=(--dependency=afterok:"$previous")
  previous=$(sbatch --parsable "${dependency[@]}" --job-name="modpo-stage$stage" \
    --export=ALL,CONFIG="$CONFIG",STAGE="$stage" slurm/stage.sbatch)
  echo "stage $stage: job $previous"
done
