#!/usr/bin/env bash
# The randomized fault matrix: builds axsave in release (with the fault hook), then runs the
# `stress_matrix` test of tests/faults/:
#
#   1. RUNS (default 24) SIGKILLs of one rank: random victims (every third run rank 0), random
#      moments (a random delay within the save's measured duration, or the fault-hook points
#      joined / copying / synced), world sizes 2-4, --mode gather and sharded, DCP and DeepSpeed
#      fixtures, node-local (`{rank}`) and shared sources. Each run checks that every surviving
#      rank exits non-zero within --timeout + slack, that the output directory holds no
#      final-named file and no temporary or marker once the processes have exited (or, when the
#      kill came after the victim had reported its part written, that the committed model is
#      the reference).
#   2. POSITIONS (default 50) single-byte flips, spread evenly, over a whole .distcp and two
#      whole ZeRO optimizer files (stage 2 and 3): a clear error naming the file and nothing
#      written, or an output byte-identical to the reference where the byte is not tensor data
#      (each harmless position is listed with what the byte is).
#
# It prints a table (case, runs, passed) and exits non-zero on any failure.
#
# Usage: scripts/stress.sh [RUNS]
# Environment: AXSAVE_STRESS_POSITIONS (flips per file), AXSAVE_STRESS_SEED (repeat a run;
# the seed is printed), CARGO_TARGET_DIR as usual.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${1:-24}
case $runs in
  ''|*[!0-9]*) echo "usage: $0 [RUNS]" >&2; exit 2 ;;
esac

# `cargo test` builds the binary the suite runs with the fault hook (feature `fault-injection`,
# through the root dev-dependency); a plain `cargo build --release` has none.
echo "==> cargo test --release --no-run (axsave with the fault hook, and the fault suite)"
cargo test --release --quiet --test faults --no-run 2>&1 | grep -v "^ *Executable" || true

echo "==> stress: $runs kill runs, ${AXSAVE_STRESS_POSITIONS:-50} flipped positions per file"
start=$(date +%s)
set +e
AXSAVE_STRESS_RUNS=$runs cargo test --release --quiet --test faults stress_matrix \
  -- --exact --nocapture --test-threads=1 2>&1
rc=$?
set -e
echo "==> stress took $(( $(date +%s) - start ))s"
if [ "$rc" != 0 ]; then
  echo "==> stress FAILED (see the table and the FAILED lines above)" >&2
  exit 1
fi
echo "==> stress passed"
