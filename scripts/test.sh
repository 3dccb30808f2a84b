#!/usr/bin/env bash
# Runs every check and test of the project: formatting, lints, the workspace's tests, the
# shipped policies' own checks and tests, the harness scenarios against real wsgate
# processes (the cluster ones with a redis-server and the proxy ones behind an haproxy, both
# installed here when missing), the idle-connection memory budget, the live-reload latency,
# a rolling restart between two instances, and each fuzz target briefly.
# Usage: scripts/test.sh            (FUZZ_SECONDS=N to fuzz longer, FUZZ_SECONDS=0 to skip)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

# The harness starts (and kills) its own redis-server for the cluster scenarios, fanout-latency
# and its own tests, and its own haproxy for the proxy scenarios; only the binaries are needed.
# When one is missing, install its Debian package with no service start allowed meanwhile (a
# policy-rc.d answering 101, unless one exists), so no daemon outlives this script.
ensure_debian_program() {
  local program="$1" package="$2"
  command -v "$program" >/dev/null 2>&1 && return 0
  # Debian puts daemons in sbin, which a non-root PATH may lack; the harness looks there too.
  [ -x "/usr/sbin/$program" ] && return 0
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "$program is missing; install it (apt-get install $package) or run this as root or with sudo" >&2
      return 1
    fi
    sudo="sudo"
  fi
  local policy=/usr/sbin/policy-rc.d created="" status=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# scripts/test.sh: no service starts while it installs %s\nexit 101\n' "$package" \
      | $sudo tee "$policy" >/dev/null
    $sudo chmod 755 "$policy"
    created=1
  fi
  $sudo apt-get update || status=$?
  if [ "$status" = 0 ]; then
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$package" || status=$?
  fi
  if [ -n "$created" ]; then
    $sudo rm -f "$policy"
  fi
  return "$status"
}

# The policy checks load keys exactly as the server does; this throwaway secret exists only
# for the tests (the default policy needs 32 bytes or more).
export WSGATE_JWT_SECRET="${WSGATE_JWT_SECRET:-wsgate-test-only-secret-0123456789abcdef}"

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "redis-server and haproxy (for the cluster and proxy scenarios and the harness's tests)"
ensure_debian_program redis-server redis-server
redis-server --version
ensure_debian_program haproxy haproxy
"$(command -v haproxy || echo /usr/sbin/haproxy)" -v | sed -n 1p

step "cargo test"
cargo test --workspace

step "policy check + test: policies and policies/examples/*"
cargo build --quiet -p wsgate -p wsgate-harness
for dir in policies policies/examples/*/; do
  ./target/debug/wsgate policy check "$dir"
  ./target/debug/wsgate policy test "$dir"
done

step "scenarios against real wsgate processes (harness/scenarios)"
./target/debug/wsgate-harness run harness/scenarios --junit target/scenarios.xml

step "memory: RSS per idle authenticated connection at 2,000 connections (budget 8 KiB)"
./target/debug/wsgate-harness idle-memory --connections 2000 --bin target/debug/wsgate --max-kib 8

step "live reload: 50 saves, each timed until a live connection is decided under it"
# The release build meets 100 ms at p99 (README, "Live policy reload"); this debug build's budget
# is looser so a busy CI machine does not fail it, while a regression to seconds still does.
./target/debug/wsgate-harness reload-latency --saves 50 --bin target/debug/wsgate --max-p99 250ms

step "fan-out at scale: 400 clients on 2 instances over Redis, every message once, one id"
# A correctness guard (fanout-latency fails on a missing, duplicated or re-numbered delivery);
# latency figures come from release builds (README, "Running several instances").
./target/debug/wsgate-harness fanout-latency --bin target/debug/wsgate --clients 400 --instances 2 --messages 20 --interval 50ms

step "rolling restart: 400 clients move from a stopping instance to another over Redis, none lost"
# A correctness guard (it fails when a client never makes it to the other instance); the
# figures for 2,000 clients are in the README, "Rolling restarts".
./target/debug/wsgate-harness rolling-restart --bin target/debug/wsgate --clients 400 --drain-timeout 2s

fuzz_seconds="${FUZZ_SECONDS:-10}"
if [ "$fuzz_seconds" != 0 ]; then
  step "fuzz each target for ${fuzz_seconds}s"
  if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "no nightly toolchain: fuzzing skipped" >&2
  else
    command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked --quiet
    bash fuzz/run-briefly.sh "$fuzz_seconds"
  fi
fi
step "all checks passed"
