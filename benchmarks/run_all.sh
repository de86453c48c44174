#!/usr/bin/env bash
# Every benchmark in one go (docs/benchmarks.md): writes benchmarks/results/*.json and table.md.
# Arguments go to benchmarks/run_all.py (e.g. --sizes 10000 --steps query,table for a quick look).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" benchmarks/run_all.py "$@"
