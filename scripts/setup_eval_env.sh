#!/usr/bin/env bash
# lmms-eval (standard VLM benchmarks) in its own virtualenv, .venv-eval, with our model `minimind_v`
# registered in it (lmms/). Training's .venv is not touched: lmms-eval pins packages training must
# not follow (wandb==0.25.0, av<16, torchvision). Usage: bash scripts/setup_eval_env.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-eval}"
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q -r requirements-eval.txt -e ./lmms
# PyPI's torchvision does not load beside the CPU build of torch 2.13 (its operators fail to
# register), and transformers then fails to import its vision models. Neither our model (its image
# processors are the PIL ones, model/images.py) nor lmms-eval's core uses torchvision: only other
# models' wrappers do.
"$venv/bin/pip" uninstall -q -y torchvision
# `lmms_eval models` lists only its built-in models; the registry resolves entry points too.
"$venv/bin/python" -c "from lmms_eval.models import get_model; get_model('minimind_v')"
echo "lmms-eval ready in $venv: $venv/bin/python -m lmms_eval --model minimind_v ..."
