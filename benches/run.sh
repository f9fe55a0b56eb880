#!/usr/bin/env bash
# Runs the plughost load benchmark (benches/src/bin/bench.rs) and writes benches/RESULTS.md.
# Usage: bash benches/run.sh [--duration SECS] [--rounds N] [--quick] [--no-build] [--no-strace]
#        bash benches/run.sh prometheus [--duration SECS] [--rounds N] [--no-build]
#          (hello with and without the Prometheus middleware; benches/PROMETHEUS_RESULTS.md)
#        bash benches/run.sh static [--duration SECS] [--rounds N] [--no-build]
#          (a 1 KiB and a 1 MiB file, plughost's static section against nginx;
#          benches/STATIC_RESULTS.md)
set -euo pipefail
cd "$(dirname "$0")/.."

install() {
    if ! command -v "$1" >/dev/null 2>&1; then
        echo "[bench] installing $1" >&2
        apt-get update -qq >/dev/null 2>&1 || true
        apt-get install -y -qq "$1" >/dev/null || true
    fi
}
install wrk
install strace   # optional: syscalls per request

export PLUGHOST_BENCH_CMD="bash benches/run.sh${*:+ $*}"
if [ "${1:-}" = prometheus ]; then
    shift
    exec python3 benches/prometheus.py "$@"
fi
if [ "${1:-}" = static ]; then
    shift
    if [ ! -x /usr/sbin/nginx ]; then
        echo "[bench] installing nginx-light" >&2
        apt-get update -qq >/dev/null 2>&1 || true
        apt-get install -y -qq nginx-light >/dev/null || true
    fi
    exec python3 benches/static.py "$@"
fi
exec cargo run --release -p plughost-benches --bin bench -- "$@"
