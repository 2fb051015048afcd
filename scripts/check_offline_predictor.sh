#!/usr/bin/env bash
# The exported predictor as an offline notebook runs it: from a fresh clone, in a clean virtual environment holding
# only its five libraries (torch, transformers, peft, bitsandbytes, pandas, and what pip brings for them), with the
# run, the clone and the project's caches out of reach. A check run by hand (it installs from the package registry,
# about 2 minutes, and trains the smoke run on Ray), not in CI's test suite; CI runs the same predictor in a
# subprocess where importing ray, orchestrator or trainer_core fails (tests/orchestrator/test_export.py). The last
# result is recorded in README.md, "Submitting from an offline notebook".
#
#   bash scripts/check_offline_predictor.sh [WORK]
#
# WORK: a new folder for everything (default: a temporary one, kept for inspection). Environment:
#   PROJECT_PYTHON  a Python with the project's dependencies installed (default: python); it runs the clone's code
#   BASE_PYTHON     the interpreter the clean environment is made from (default: python3)
#   TORCH_PIP_ARGS  how torch comes into the clean environment (default: --no-deps torch==2.13.0, the CPU build where
#                   pip's configuration serves it, as .ci/run; elsewhere add PyTorch's CPU index as .ci/run does)
#
# Steps: (1) clone this repository's HEAD (committed work only) into WORK/clone; (2) there, with PROJECT_PYTHON: train
# configs/smoke.yaml's five folds on 60 rows (orchestrator.cv), score 20 rows it never saw with orchestrator.predict
# --tta, export the run twice (--folds each; --folds average --merge --quantize none); (3) make WORK/venv, install
# torch, then DIR/requirements.txt, and check that ray, orchestrator and trainer_core cannot be imported there;
# (4) copy each export elsewhere (the upload), hide the clone, the run and the random-weights cache, and run
# DIR/predict.py --verify from an empty folder with an empty environment (HF_HUB_OFFLINE=1); (5) compare: `each`
# must give orchestrator.predict's probabilities to 1e-5 in the same row order, `average` finite rows summing to 1.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-$(mktemp -d -t offline-predictor.XXXXXX)}"
PROJECT_PYTHON="${PROJECT_PYTHON:-python}"
BASE_PYTHON="${BASE_PYTHON:-python3}"
read -r -a TORCH_ARGS <<< "${TORCH_PIP_ARGS:---no-deps torch==2.13.0}"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
if [ -n "$(ls -A "$WORK")" ]; then echo "error: $WORK is not empty" >&2; exit 2; fi
mkdir "$WORK/logs" "$WORK/notebook" "$WORK/upload"
T0=$SECONDS
step() { echo "[$((SECONDS - T0))s] $*"; }
quiet() {  # run "$@" with its output in logs/$1.log, shown (the end) only if it fails
  local name=$1; shift
  if ! "$@" > "$WORK/logs/$name.log" 2>&1; then tail -40 "$WORK/logs/$name.log" >&2; echo "error: $name failed" \
    "(log: $WORK/logs/$name.log)" >&2; exit 1; fi
}

step "clone $(git -C "$REPO" rev-parse --short HEAD) into $WORK/clone"
quiet clone git clone --quiet "$REPO" "$WORK/clone"
cd "$WORK/clone"
export PYTHONPATH="$WORK/clone" TRAINER_CORE_CACHE="$WORK/cache"  # the clone's code; a cold random-weights cache
step "train the smoke run (orchestrator.cv, five folds, 60 rows)"
quiet cv "$PROJECT_PYTHON" -m orchestrator.cv --config configs/smoke.yaml --folds 0-4 --out "$WORK/run" \
  data.max_rows=60 data.max_length=64 train.eval_tta=true
"$PROJECT_PYTHON" - "$WORK/test.csv" <<'EOF'
import json, sys
import pandas as pd
df = pd.read_csv("data/arena_sample.csv").iloc[60:80].drop(columns=["winner_model_a", "winner_model_b", "winner_tie"])
df.iloc[2, df.columns.get_loc("response_a")] = json.dumps([None, "second turn"])  # a null turn, as arena data has
df.to_csv(sys.argv[1], index=False)
EOF
step "reference: orchestrator.predict --tta on 20 unseen rows"
quiet predict "$PROJECT_PYTHON" -m orchestrator.predict --run "$WORK/run" --data "$WORK/test.csv" \
  --out "$WORK/reference.csv" --tta
step "export: --folds each; --folds average --merge --quantize none"
quiet export-each "$PROJECT_PYTHON" -m orchestrator.export "$WORK/run" --out "$WORK/export/each"
quiet export-average "$PROJECT_PYTHON" -m orchestrator.export "$WORK/run" --out "$WORK/export/average" \
  --folds average --merge --quantize none
unset PYTHONPATH TRAINER_CORE_CACHE
cd "$WORK/notebook"

step "clean environment: $BASE_PYTHON -m venv; pip install ${TORCH_ARGS[*]}; pip install -r requirements.txt"
quiet venv "$BASE_PYTHON" -m venv "$WORK/venv"
quiet pip-torch "$WORK/venv/bin/python" -m pip install --disable-pip-version-check "${TORCH_ARGS[@]}"
quiet pip-requirements "$WORK/venv/bin/python" -m pip install --disable-pip-version-check \
  -r "$WORK/export/each/requirements.txt"
quiet pip-check "$WORK/venv/bin/python" -m pip check
"$WORK/venv/bin/python" -m pip freeze > "$WORK/logs/freeze.txt"
for name in each average; do cp -r "$WORK/export/$name" "$WORK/upload/$name"; done
mv "$WORK/clone" "$WORK/clone.hidden"; mv "$WORK/run" "$WORK/run.hidden"; mv "$WORK/cache" "$WORK/cache.hidden"
trap 'mv "$WORK/clone.hidden" "$WORK/clone"; mv "$WORK/run.hidden" "$WORK/run"; mv "$WORK/cache.hidden" "$WORK/cache"' \
  EXIT
NOTEBOOK=(env -i PATH=/usr/bin:/bin HOME="$WORK/notebook" HF_HUB_OFFLINE=1 "$WORK/venv/bin/python")
found=$("${NOTEBOOK[@]}" -c "import importlib.util as u
print(' '.join(m for m in ('ray', 'orchestrator', 'trainer_core') if u.find_spec(m)))")
if [ -n "$found" ]; then echo "error: the clean environment can import $found" >&2; exit 1; fi
for name in each average; do
  step "offline notebook: predict.py --verify ($name export)"
  quiet "predict-$name" "${NOTEBOOK[@]}" "$WORK/upload/$name/predict.py" --data "$WORK/test.csv" \
    --out "$WORK/notebook/$name.csv" --verify
  grep -E "rows/s|TTA" "$WORK/logs/predict-$name.log" | tail -2
done

"$PROJECT_PYTHON" - "$WORK" <<'EOF' | tee "$WORK/result.txt"
import sys
from pathlib import Path
import numpy as np
import pandas as pd
work, cols = Path(sys.argv[1]), ["winner_model_a", "winner_model_b", "winner_tie"]
ref, each, avg = (pd.read_csv(work / f) for f in ("reference.csv", "notebook/each.csv", "notebook/average.csv"))
assert each["id"].tolist() == ref["id"].tolist() == avg["id"].tolist(), "ids differ from the test file's order"
diff = float(np.abs(each[cols].to_numpy() - ref[cols].to_numpy()).max())
p = avg[cols].to_numpy()
freeze = dict(line.split("==", 1) for line in (work / "logs/freeze.txt").read_text().split() if "==" in line)
print(f"rows: {len(ref)}; each vs orchestrator.predict: max |diff| {diff:.2e}; average: finite "
      f"{bool(np.isfinite(p).all())}, max |sum - 1| {float(np.abs(p.sum(1) - 1).max()):.1e}")
print("clean environment: " + ", ".join(f"{k} {freeze.get(k)}" for k in
                                        ("torch", "transformers", "peft", "bitsandbytes", "pandas", "numpy")) +
      f"; {len(freeze)} packages in all (logs/freeze.txt)")
ok = diff < 1e-5 and np.isfinite(p).all() and np.allclose(p.sum(1), 1.0)
print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
EOF
step "done: $WORK"
