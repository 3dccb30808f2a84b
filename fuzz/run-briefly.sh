#!/usr/bin/env bash
# Runs every fuzz target for a short while: first it replays the inputs saved under
# regressions/<target>/ (each must pass), then it fuzzes for SECONDS seconds per target,
# starting from corpus/<target>/ (kept between runs, git-ignored) and seeds/<target>/.
# Exits non-zero when any input panics, crashes, hangs (10 s) or runs out of memory; the
# input is left under artifacts/<target>/.
#
# Usage: fuzz/run-briefly.sh [SECONDS] [TARGET...]      (default: 20 seconds, every target)
# Environment:
#   FUZZ_SANITIZER=address|none   default address (cargo-fuzz's default); `none` runs several
#                                 times more inputs per second (the engine has no unsafe code)
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz --locked`).
set -euo pipefail

cd "$(dirname "$0")"
seconds="${1:-20}"
[ "$#" -gt 0 ] && shift
if ! [[ "$seconds" =~ ^[0-9]+$ ]]; then
  echo "usage: $0 [SECONDS] [TARGET...]" >&2
  exit 2
fi
sanitizer="${FUZZ_SANITIZER:-address}"
if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo +nightly fuzz list)
fi

cargo +nightly fuzz build -s "$sanitizer"

failed=()
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target" "artifacts/$target"

  replay=()
  for input in regressions/"$target"/*; do
    [ -f "$input" ] || continue
    replay+=("$input")
  done
  if [ "${#replay[@]}" -gt 0 ]; then
    echo "== $target: replaying ${#replay[@]} regression input(s)"
    if ! cargo +nightly fuzz run -s "$sanitizer" "$target" "${replay[@]}" -- -timeout=10; then
      failed+=("$target (regression)")
      continue
    fi
  fi

  echo "== $target: fuzzing for ${seconds}s"
  dirs=("corpus/$target")
  [ -d "seeds/$target" ] && dirs+=("seeds/$target")
  flags=(-max_total_time="$seconds" -timeout=10 -print_final_stats=1)
  [ -f "dicts/$target.dict" ] && flags+=(-dict="dicts/$target.dict")
  if ! cargo +nightly fuzz run -s "$sanitizer" "$target" "${dirs[@]}" -- "${flags[@]}"; then
    failed+=("$target")
  fi
done

if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzzing found problems in: ${failed[*]} (inputs under fuzz/artifacts/)" >&2
  exit 1
fi
echo "fuzzing: no problem found in ${targets[*]} (${seconds}s each, sanitizer $sanitizer)"
