#!/usr/bin/env bash
# Train every recipe in configs/ (TopK, BatchTopK, OrtSAE, subspace init) on the offline
# defaults, one run folder each under runs/. Safe to re-run after a kill: finished runs are
# skipped, a run with a checkpoint but no eval.json is resumed. Recipes that share
# hookpoints share one activation cache, so the model runs once per hookpoint set.
#
#   bash training/recipes.sh [--KEY VALUE ...]     # overrides go to every run, e.g. --epochs 1
set -euo pipefail
cd "$(dirname "$0")/.."
for cfg in configs/default.yaml configs/batchtopk.yaml configs/ortsae.yaml configs/subspace.yaml; do
  out="runs/$(basename "$cfg" .yaml)"
  if [ -f "$out/eval.json" ]; then
    echo "$out: done"
  elif [ -f "$out/state.safetensors" ]; then
    saekit train "$cfg" --out "$out" --resume "$@"
  else
    rm -rf "$out"  # a run killed before its first checkpoint holds nothing to keep
    saekit train "$cfg" --out "$out" "$@"
  fi
done
