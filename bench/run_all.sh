#!/usr/bin/env bash
# `make bench`: every benchmark, one after the other (each prints its figures beside the raw
# limit it measured in the same run). Runs with the venv's python on PATH (see Makefile).
set -euo pipefail
cd "$(dirname "$0")/.."
for bench in bench_fleet_create bench_stub bench_device bench_mqtt bench_fleet bench_dask; do
    printf '\n===== %s\n' "$bench"
    python "bench/$bench.py"
done
