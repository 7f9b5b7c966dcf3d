#!/usr/bin/env bash
# Lint, import contracts, then the fast test suite (slow tests: add `-m slow`), with line coverage of the package.
# Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check projlens_defense tests benchmarks
.venv/bin/lint-imports  # layers import only downward, no import cycles ([tool.importlinter] in pyproject.toml)
exec .venv/bin/python -m pytest -q --cov=projlens_defense --cov-report=term "$@"
