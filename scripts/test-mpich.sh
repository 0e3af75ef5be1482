#!/usr/bin/env bash
# Builds axsave with --features mpi against MPICH (Debian's libmpich-dev) instead of Open MPI and
# runs the mpirun end-to-end tests under MPICH's `mpiexec` (Hydra). Not part of scripts/test.sh:
# CI builds against Open MPI; run this by hand after touching the MPI code.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mpiexec.mpich >/dev/null || ! pkg-config --exists mpich 2>/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    echo "==> installing mpich libmpich-dev"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mpich libmpich-dev libclang-dev pkgconf >/dev/null
  else
    echo "needs the packages mpich and libmpich-dev (run as root, or install them)" >&2
    exit 1
  fi
fi

# MPICH's compiler wrapper tells rsmpi's build what to link; a separate target directory keeps
# this build apart from the Open MPI one.
export MPICC=mpicc.mpich
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/mpich}
export AXSAVE_MPIEXEC=mpiexec.mpich

echo "==> building against $(mpichversion 2>/dev/null | head -1 || echo MPICH)"
cargo build --features mpi --quiet
echo "==> ldd: $(ldd "$CARGO_TARGET_DIR/debug/axsave" | grep -Eo 'libmpi[^ ]*' | sort -u | tr '\n' ' ')"

echo "==> the mpirun tests under mpiexec.mpich"
cargo test --features mpi --test mpirun -- --test-threads 1 2>&1 | grep -E "^test |^test result|skipping"
