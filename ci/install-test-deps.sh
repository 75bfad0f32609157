#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine (run as root):
# the servers the tests start themselves, and fastmesh with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

# clang, libbpf-dev and bpftool: `fastmesh capture --ebpf` (its programs are compiled when fastmesh is installed).
# liburing-dev: tests/test_bench_uring.py builds bench/uring/, the io_uring relay prototype, with gcc.
# linux-perf: tests/test_bench_syscalls.py counts system calls with perf stat (bench/syscalls.py).
DEBIAN_PACKAGES=(iperf3 redis-server redis-tools prometheus mariadb-server iptables iproute2 openssl curl
                 clang libbpf-dev bpftool liburing-dev gcc make linux-perf)

missing=()
for package in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # Debian starts these as services on install; the tests start their own.
    for service in redis-server prometheus mariadb; do
        systemctl disable --now "$service" >/dev/null 2>&1 || service "$service" stop >/dev/null 2>&1 || true
    done
fi

# tests/test_bench_syscalls.py: perf reads the syscall tracepoints from tracefs, which a fresh machine
# may not have mounted.
if [[ ! -d /sys/kernel/tracing/events/syscalls ]]; then
    mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || true
fi

# bench: matplotlib, for the soak chart that tests/test_soak.py checks.
python -m pip install --quiet --disable-pip-version-check -e ".[test,bench]"
