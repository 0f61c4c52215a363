#!/usr/bin/env bash
# The STEER paper's main setting in verl, with entropy_lens' losses and instrumentation.
#
#   bash examples/verl/run.sh METHOD [EXTRA_OVERRIDE ...]      # METHOD: grpo | steer | clip_cov | kl_cov
#
# Settings shared by every method: common.overrides; the method's own: METHOD.overrides (one Hydra
# override per line, "env NAME=VALUE" lines exported, @NAME@ replaced by the variables below).
# Extra arguments are appended to verl's command line (e.g. trainer.total_training_steps=2).
#
# Variables (defaults in brackets):
#   MODEL_PATH  [Qwen/Qwen2.5-Math-7B]    a Hugging Face id or a local folder
#   DATA_DIR    [$HOME/data/steer]        DAPO-Math-17k.parquet, aime24/aime25/amc23/math500.parquet
#   RUN_DIR     [$HOME/runs/verl/METHOD]  checkpoints/ and rollouts/ (rollouts/entropy_lens/{step}.parquet)
#   N_GPUS [8], N_NODES [1], ROLLOUT_TP [2]  GPUs per node, nodes, vLLM tensor parallel size
#   DRY_RUN=1                             print the command instead of running it
set -euo pipefail

RECIPE_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
METHOD="${1:-}"
if [ -z "$METHOD" ] || [ ! -f "$RECIPE_DIR/$METHOD.overrides" ] || [ "$METHOD" = common ]; then
  echo "usage: $0 METHOD [EXTRA_OVERRIDE ...]; METHOD: grpo, steer, clip_cov or kl_cov" >&2
  exit 2
fi
shift

MODEL_PATH="${MODEL_PATH:-Qwen/Qwen2.5-Math-7B}"
DATA_DIR="${DATA_DIR:-$HOME/data/steer}"
RUN_DIR="${RUN_DIR:-$HOME/runs/verl/$METHOD}"
N_GPUS="${N_GPUS:-8}"
N_NODES="${N_NODES:-1}"
ROLLOUT_TP="${ROLLOUT_TP:-2}"
VARIABLES=(RECIPE_DIR METHOD MODEL_PATH DATA_DIR RUN_DIR N_GPUS N_NODES ROLLOUT_TP)

OVERRIDES=()
read_overrides() {  # FILE: append its overrides to OVERRIDES, export its env lines
  local line name
  while IFS= read -r line || [ -n "$line" ]; do
    line="${line#"${line%%[![:space:]]*}"}"
    line="${line%"${line##*[![:space:]]}"}"
    case "$line" in ""|"#"*) continue ;; esac
    for name in "${VARIABLES[@]}"; do
      line="${line//@$name@/${!name}}"
    done
    if [[ "$line" == *@*@* && "$line" =~ @[A-Z_]+@ ]]; then
      echo "$1: unknown variable ${BASH_REMATCH[0]} in: $line" >&2
      exit 2
    fi
    if [[ "$line" == "env "* ]]; then
      export "${line#env }"
    else
      OVERRIDES+=("$line")
    fi
  done < "$1"
}
read_overrides "$RECIPE_DIR/common.overrides"
read_overrides "$RECIPE_DIR/$METHOD.overrides"

CMD=(python3 -m verl.trainer.main_ppo "${OVERRIDES[@]}" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
  env | grep -E '^(VERL_USE_EXTERNAL_MODULES|ENTROPY_LENS_VERL_[A-Z_]+)=' | sort
  printf '%q ' "${CMD[@]}"
  echo
  exit 0
fi
mkdir -p "$RUN_DIR"
exec "${CMD[@]}"
