#!/usr/bin/env bash
# The main job on the embedded default: build the tiny LLaVA zoo (cached), run one ProjLens attack and
# its benign control, and evaluate both (clean accuracy, ASR, false activation); then scan both
# checkpoints, sanitize the backdoored one (data-free) and evaluate the repaired projector.
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
ref=$($P zoo path | tail -n 1)
rc=0; $P scan "$out/malicious-injection" "$out/benign" --reference "$ref" || rc=$?
[ "$rc" -le 1 ] || exit "$rc"   # exit 1 = something suspicious, which is the point here
$P sanitize "$out/malicious-injection" --out "$out/sanitized" --force
$P evaluate "$out/sanitized" --variant malicious-injection --format json
