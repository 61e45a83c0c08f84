#!/usr/bin/env bash
# The whole job on embedded defaults, from a clean clone: set up, build the toy zoo (cached), run a
# short CMA-ES search on a local Ray with a local MLflow store, print the front (re-scored on held-out
# items), export the search's pick (CMA-ES's best by its weakest skill), materialize it, score it, run
# the gradient baseline over the same space (AdaMerging-style, seconds) and end on the held-out
# comparison: each specialist, the hand-set merges and both exported picks, with the gain each keeps of
# every skill.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
evomerge=.venv/bin/evomerge
out=${EVOMERGE_DEMO_DIR:-out/demo}
budget=${EVOMERGE_DEMO_BUDGET:-200}
rm -rf "$out/run" "$out/front" "$out/gradient"   # the demo's own previous run; real runs resume with --resume
mkdir -p "$out"

echo "== 1/7 toy zoo (built once, then cached)"
zoo_json=$("$evomerge" zoo build)
zoo=$(dirname "$zoo_json")
export EVOMERGE_ZOO_DIR="$zoo"
tasks=$(.venv/bin/python -c "import json,sys; print(','.join(json.load(open(sys.argv[1]))['tasks'].values()))" "$zoo_json")

echo "== 2/7 CMA-ES search (weakest skill first) over per-layer task-arithmetic weights ($budget candidates, local Ray, MLflow in $out/run/mlflow.db)"
"$evomerge" search configs/zoo-ps-cma.yaml --run-dir "$out/run" --budget "$budget"

echo "== 3/7 the front, re-scored on the held-out test items"
"$evomerge" front "$out/run" --rescore test

echo "== 4/7 export the search's pick (best by its weakest skill; mergekit-compatible) and materialize it"
"$evomerge" export "$out/run" --pick auto -o "$out/pick.yaml" --front-dir "$out/front"
"$evomerge" merge "$out/pick.yaml" "$out/merged" --overwrite
cat "$out/pick.yaml"

echo "== 5/7 the merged checkpoint on the held-out test items"
"$evomerge" eval "$out/merged" --tasks "$tasks" --include-path "$zoo/tasks" --split test

echo "== 6/7 the gradient baseline: task-arithmetic weights per layer and projection fitted by Adam on the search items, 11 points scored (in this process)"
"$evomerge" search configs/zoo-ps-gradient.yaml --run-dir "$out/gradient" --workers 0
"$evomerge" export "$out/gradient" --pick auto -o "$out/gradient.yaml"

echo "== 7/7 held out: specialists, hand-set merges and the exported picks (pick: CMA-ES; gradient) side by side"
"$evomerge" zoo compare "$out/pick.yaml" "$out/gradient.yaml" --zoo "$zoo"

cat <<MSG

Done. Look around:
  evomerge ui --run-dir $out/run          # MLflow UI: parent run, one child per candidate, front plots
  evomerge front $out/run                 # the Pareto front again
  mergekit-yaml $out/pick.yaml OUT_DIR    # mergekit runs the exported recipe unmodified
MSG
