#!/usr/bin/env bash
# make unsloth-test: build .venv-unsloth (CPU torch + the project + unsloth) and run the unsloth backend's tests.
#
#   bash scripts/unsloth_env.sh            # build if needed, then `pytest -m unsloth`
#   UNSLOTH_VENV=/tmp/u bash scripts/unsloth_env.sh
#
# Why its own environment: `pip install unsloth` on a CPU machine replaces CPU torch with a multi-GB CUDA build
# (and torchvision/xformers that do not load beside CPU torch), after which `import unsloth` fails. unsloth
# 2026.10.9 has a real CPU backend, so we install it with --no-deps and then install its and unsloth_zoo's own
# runtime requirements, read from their metadata, minus torch, torchvision and xformers, with torch pinned to the
# CPU wheel by a constraints file. certifi>=2026.10.19 is relaxed: the index has no such release (see FINDINGS).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
VENV=${UNSLOTH_VENV:-.venv-unsloth}
UNSLOTH_VERSION=2026.10.9
TORCH_VERSION=2.13.0
BIN="$VENV/bin"
MARKER="$VENV/.installed-$UNSLOTH_VERSION"

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1
export TOKENIZERS_PARALLELISM=false

if [[ ! -f "$MARKER" || pyproject.toml -nt "$MARKER" ]]; then
  start=$(date +%s)
  [[ -x "$BIN/python" ]] || "$PYTHON" -m venv "$VENV"
  "$BIN/pip" install --quiet --upgrade pip
  constraints="$VENV/constraints.txt"
  echo "torch==$TORCH_VERSION" >"$constraints"
  # The CPU wheel first, so nothing below can swap in a CUDA build.
  "$BIN/pip" install --quiet "torch==$TORCH_VERSION"
  "$BIN/pip" install --quiet -c "$constraints" -e '.[dev]'
  "$BIN/pip" install --quiet --no-deps "unsloth==$UNSLOTH_VERSION" "unsloth_zoo==$UNSLOTH_VERSION"
  # unsloth's and unsloth_zoo's runtime requirements (no extras), as their metadata states them, minus the ones
  # that pull CUDA builds or do not load beside CPU torch.
  "$BIN/python" - >"$VENV/unsloth-requirements.txt" <<'EOF'
from importlib.metadata import requires

from packaging.requirements import Requirement

SKIP = {"torch", "torchvision", "xformers", "unsloth-zoo", "unsloth_zoo", "triton-windows"}
seen = set()
for dist in ("unsloth", "unsloth_zoo"):
    for line in requires(dist) or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = req.name.lower().replace("_", "-")
        if name in SKIP or name in seen:
            continue
        seen.add(name)
        # certifi>=2026.10.19 does not exist on the index; any certifi works.
        spec = "" if name == "certifi" else str(req.specifier)
        print(f"{req.name}{spec}")
EOF
  "$BIN/pip" install --quiet -c "$constraints" -r "$VENV/unsloth-requirements.txt"
  "$BIN/python" -c "import torch; assert torch.__version__.endswith('+cpu'), torch.__version__"
  touch "$MARKER"
  echo "unsloth env built in $(( $(date +%s) - start )) s ($(du -sh "$VENV" | cut -f1))"
fi

"$BIN/python" -c "import unsloth, torch; print('unsloth', unsloth.__version__, 'torch', torch.__version__)"
# pytest exits 5 when no test was selected: a failure here too, the target exists to run them.
OMP_NUM_THREADS=1 exec "$BIN/pytest" -q -m unsloth -p no:cacheprovider tests
