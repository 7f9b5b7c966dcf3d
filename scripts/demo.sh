#!/usr/bin/env bash
# The main job on the embedded default: build the tiny LLaVA zoo (cached), run one ProjLens attack and
# its benign control, and evaluate both (clean accuracy, ASR, false activation).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
out=${1:-runs/demo}
mkdir -p "$out"
P=.venv/bin/projlens-defense
$P zoo build
$P attack --variant malicious-injection --poison-rate 0.1 --seed 0 --out "$out/malicious-injection" --force
$P attack --variant none --eval-variant malicious-injection --seed 0 --out "$out/benign" --force
$P evaluate "$out/malicious-injection" --format json
