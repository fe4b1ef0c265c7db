#!/usr/bin/env bash
# Install flashserve with its test extras and run the CPU test suite (what CI runs).
# TORCH_SPEC picks the torch to install (default: the CPU build CI uses).
set -uo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}" -e ".[test]" || exit 1
python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: treating that as a failure" >&2
    exit 1
fi
exit "$rc"
