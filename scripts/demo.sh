#!/usr/bin/env bash
# The main job on embedded defaults: set up, build the toy zoo (cached), merge two of its specialists
# with TIES, and show how the merge scores next to the specialists.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
evomerge=.venv/bin/evomerge
out=${EVOMERGE_DEMO_DIR:-out/demo}
mkdir -p "$out"

zoo_json=$("$evomerge" zoo build)          # prints the path of zoo.json
zoo=$(dirname "$zoo_json")
echo "== zoo: $zoo"

.venv/bin/python - "$zoo" "$out/ties.yaml" <<'PY'
import json, sys
from pathlib import Path
from evomerge.recipe import Recipe
zoo = Path(sys.argv[1]); manifest = json.loads((zoo / "zoo.json").read_text())
skills = list(manifest["models"])[:2]
recipe = Recipe.from_dict({
    "merge_method": "ties",
    "base_model": str(zoo / manifest["base"]),
    "models": [{"model": str(zoo / manifest["models"][s]), "parameters": {"weight": 1.0, "density": 0.7}} for s in skills],
    "parameters": {"normalize": False},
    "dtype": "float32",
})
recipe.save(sys.argv[2])
print(f"== recipe ({' + '.join(skills)}): {sys.argv[2]}")
print(recipe.to_yaml())
PY

"$evomerge" merge "$out/ties.yaml" "$out/merged" --overwrite
echo "== merged checkpoint: $out/merged"
.venv/bin/python -m evomerge.zoo.quality "$zoo" "$out/merged"
