#!/usr/bin/env bash
# Runs every test of axsave: formatting, lints, unit tests and the end-to-end tests that run the
# built binary as several processes. Installs what the tests need when it is missing.
#
# Environment:
#   AXSAVE_TEST_PYTHON  a python with torch; enables the torch interop tests (skipped otherwise)
#   AXSAVE_TEST_MULTINODE  0 skips scripts/test-multinode.sh (network namespaces; root)
#   AXSAVE_TEST_SLURM   0 skips the Slurm tests (scripts/test-slurm.sh: a one-node Slurm on
#                       localhost, which installs slurm-wlm and munge and must run as root)
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
# Open MPI (the mpirun tests and the `mpi` feature) and what rsmpi's build needs (bindgen).
command -v mpirun >/dev/null || need_pkgs+=(openmpi-bin)
pkg-config --exists ompi 2>/dev/null || need_pkgs+=(libopenmpi-dev)
command -v pkg-config >/dev/null || need_pkgs+=(pkgconf)
# libclang itself: libclang.so* or libclang-N.so* (not libclang-cpp, which some images carry alone).
has_libclang() {
  local f
  for f in /usr/lib/llvm-*/lib/libclang.so* /usr/lib/*/libclang-[0-9]*.so*; do
    [ -e "$f" ] && return 0
  done
  return 1
}
has_libclang || need_pkgs+=(libclang-dev)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "==> installing ${need_pkgs[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
  else
    echo "missing packages: ${need_pkgs[*]} (run as root, or install them)" >&2
    exit 1
  fi
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy (default features, and with MPI)"
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo clippy --workspace --all-targets --quiet --features mpi -- -D warnings

echo "==> cargo doc (no broken or private links in the crates' docs)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet

# The mpirun tests run as root here: Open MPI refuses that unless told it is wanted.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

echo "==> cargo test (with MPI; then the mpirun tests once more without it: TCP through environment detection)"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
# (The MPI build of the binary is kept for scripts/test-multinode.sh.)
{ cargo test --workspace --features mpi 2>&1 && cp target/debug/axsave target/debug/axsave-mpi &&
  cargo test --test mpirun 2>&1; } | tee "$log" | grep --line-buffered -E "^test result|^     Running|skipping"
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" != 0 ]; then
  echo "==> tests FAILED" >&2
  grep -A30 -E "^failures:|panicked|^error" "$log" | head -150 >&2 || true
  exit 1
fi
passed=$(grep -Eo "[0-9]+ passed" "$log" | awk '{s+=$1} END {print s+0}')
echo "==> cargo tests passed ($passed tests)"

# The pip wheel, installed into a fresh venv without Rust (maturin builds it from the debug build
# just made: before the Slurm tests, which rebuild with MPI).
echo "==> the wheel: scripts/test-wheel.sh"
scripts/test-wheel.sh

# The Python API (python/tests) in a venv with pytest only; with AXSAVE_TEST_PYTHON (a python with
# torch, transformers, Axolotl) the torchrun/Trainer/plugin tests run too, else they say why they skip.
echo "==> the Python API: pytest python/tests"
if [ ! -x target/pytest-venv/bin/pytest ]; then
  python3 -m venv target/pytest-venv
  target/pytest-venv/bin/pip install -q pytest pyyaml
fi
AXSAVE_BIN=$PWD/target/debug/axsave target/pytest-venv/bin/pytest -q -rs python/tests

if [ "${AXSAVE_TEST_SLURM:-1}" = 0 ]; then
  echo "==> skipping the Slurm tests (AXSAVE_TEST_SLURM=0)"
elif [ "$(id -u)" = 0 ]; then
  echo "==> Slurm: scripts/test-slurm.sh"
  CARGO_TEST_ARGS="--features mpi" scripts/test-slurm.sh
else
  echo "==> skipping the Slurm tests: scripts/test-slurm.sh must run as root (it starts slurmd)"
fi
if [ "${AXSAVE_TEST_MULTINODE:-1}" = 0 ]; then
  echo "==> skipping the multi-node tests (AXSAVE_TEST_MULTINODE=0)"
else
  # The default build, and the MPI build kept above (skips saying why when not root or without
  # network namespaces).
  echo "==> multi-node: scripts/test-multinode.sh"
  # One row (mpirun, sharded, MASTER_ADDR as a host name) failed once in five full runs with rank 3
  # exiting 1; most likely the TCP receiver's acknowledgement race since fixed (seen the same way in
  # tests/mpirun.rs). Until that is confirmed, a failed matrix is run once more and a pass then is
  # reported as FLAKY, loudly, not hidden (failing rows print each rank's ERROR lines).
  if ! AXSAVE_MPI_BIN=target/debug/axsave-mpi scripts/test-multinode.sh; then
    echo "==> multi-node matrix failed: running it once more to tell a flaky row from a failure"
    AXSAVE_MPI_BIN=target/debug/axsave-mpi scripts/test-multinode.sh
    echo "==> WARNING: FLAKY multi-node row(s): failed once, passed on the rerun (see the first run above)"
  fi
fi
echo "==> all tests passed"
