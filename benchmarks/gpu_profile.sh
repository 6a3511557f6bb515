#!/usr/bin/env bash
# The device-machine run of benchmarks/gpu_profile.py: a bare GPU machine with PyTorch; open_clip and floss's other
# dependencies travel as wheels in .whl/ (see the README's Performance section for the download command).
#   bash benchmarks/gpu_profile.sh [gpu_profile.py options]      # writes $OUT/gpu_profile.json (or /tmp)
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
out="${OUT:-/tmp}/gpu_profile.json"
PYTHONUNBUFFERED=1 timeout "${PROFILE_TIMEOUT:-480}" python3 benchmarks/gpu_profile.py --out "$out" "$@"
