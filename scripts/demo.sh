#!/usr/bin/env bash
# Set up (if needed) and run the main job: the report reproduction on the embedded SmolLM2-135M,
# offline, with the data in ../shared/data (or DATA_DIR). Extra arguments go to the report script.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python examples/reproduce_report.py --data-dir "${DATA_DIR:-../shared/data}" "$@"
