#!/usr/bin/env bash
# Run the test suite: everything but the slow and GPU groups (the browser test of the Space included).
#   bash scripts/test.sh                 the default suite (minutes on 2 CPU cores)
#   bash scripts/test.sh -m slow         long CPU runs
#   bash scripts/test.sh -m gpu          GPU checks (needs CUDA)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$#" -eq 0 ]; then
    set -- -m "not slow and not gpu"
fi
exec .venv/bin/python -m pytest "$@"
