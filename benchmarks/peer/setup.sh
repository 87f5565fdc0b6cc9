#!/usr/bin/env bash
# Make the peer benchmark's side environment: benchmarks/peer/.venv with TRL 0.23.1 (DDPOTrainer)
# on torch 2.13.0 (CPU build where pip finds it: set TORCH_INDEX=https://download.pytorch.org/whl/cpu
# on a machine whose default index serves CUDA builds) and the main venv's diffusers/peft versions.
# Never installed into the main venv; tdpo is not installed here either (the TRL worker reads
# tdpo's reward and prompts from src/ on sys.path).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
if [ ! -x "$here/.venv/bin/python" ]; then
    "$python" -m venv "$here/.venv"
fi
pip=("$here/.venv/bin/python" -m pip install -q)
"${pip[@]}" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} torch==2.13.0
"${pip[@]}" -r "$here/requirements.txt"
"$here/.venv/bin/python" -c "import trl, torch, diffusers, peft; from trl import DDPOTrainer; print('peer env ready: trl', trl.__version__, 'torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__)"
