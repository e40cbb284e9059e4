#!/usr/bin/env bash
# The offline demo (README, first command): data, tower, pretrain, SFT, scoring with and without
# images. Everything goes to dataset/demo/ and out/demo/. Flags pass through to demo/demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TRANSFORMERS_VERBOSITY=error
exec python demo/demo.py "$@"
