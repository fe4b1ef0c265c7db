#!/usr/bin/env bash
# The lent GPU machines have grpcio and protobuf but not grpcio's health and reflection packages, and
# no package registry. Download their wheels here (matching the machine's grpcio 1.84) into
# .device_wheels/, then name .device_wheels in the device call's `carry`; gpu_check.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip download --quiet --no-deps -d .device_wheels grpcio-health-checking==1.84.0 grpcio-reflection==1.84.0
ls .device_wheels
