#!/usr/bin/env bash
# Tests the wheel as a user without Rust gets it: installed into a fresh venv, with a PATH that
# holds no cargo or rustc, it must put `axsave` on the venv's PATH, run through `python -m axsave`
# (same arguments, exit code and signals), import without torch, agree on the version with
# Cargo.toml, and save a torch-written fixture byte-identical to its reference (through the CLI,
# and through `axsave.save` where the package has it). An aarch64 wheel is run under qemu-user:
# `--version` and the same save.
#
# Usage:
#   scripts/test-wheel.sh            builds a wheel for this machine with maturin (dev profile, in
#                                    target/ beside cargo's own debug build, which scripts/test.sh
#                                    has just made, so little is compiled) and tests it, checks
#                                    that `pip install .` installs from the source tree; then the
#                                    aarch64 wheel of this version in target/wheels/ (made by
#                                    scripts/wheel.sh) under qemu, or says why it skips
#   scripts/test-wheel.sh WHEEL...   tests these wheels (scripts/wheel.sh's release wheels)
#
# AXSAVE_TEST_AARCH64=1 (without WHEEL arguments) cross-builds a debug aarch64 wheel with zig
# instead of looking in target/wheels/ (a second build of every dependency: minutes).
#
# Ends with "wheel: N passed, N failed, N skipped"; exits 1 if anything failed.
set -euo pipefail
given=()
for w in "$@"; do given+=("$(realpath "$w")"); done
cd "$(dirname "$0")/.."

version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
fixture=tests/fixtures/dcp/fsdp_w2
host_arch=$(uname -m)

passed=0 failed=0 skipped=0
pass() { echo "PASS $*"; passed=$((passed + 1)); }
fail() { echo "FAIL $*"; failed=$((failed + 1)); }
skip() { echo "SKIP $*"; skipped=$((skipped + 1)); }
# check NAME CMD...: runs CMD, PASS/FAIL by its exit status (its output shown on failure).
check() {
  local name=$1 out
  shift
  if out=$("$@" 2>&1); then pass "$name"; else fail "$name"; sed 's/^/    /' <<<"$out" | tail -20; fi
}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/axsave-wheel.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

wheels=(${given[@]+"${given[@]}"})
if [ ${#wheels[@]} -eq 0 ]; then
  tools=$(scripts/wheel-tools.sh maturin)
  echo "==> maturin build --profile dev (this machine, $host_arch)"
  start=$SECONDS
  if ! "$tools/bin/maturin" build --profile dev --out "$tmp/dist" >"$tmp/build.log" 2>&1; then
    tail -40 "$tmp/build.log"
    fail "build the wheel with maturin"
    echo "wheel: $passed passed, $failed failed, $skipped skipped"
    exit 1
  fi
  wheels=("$tmp"/dist/axsave-*.whl)
  echo "    ${wheels[0]##*/} ($((SECONDS - start)) s)"
  if [ "${AXSAVE_TEST_AARCH64:-0}" = 1 ] && [ "$host_arch" != aarch64 ] &&
    { command -v qemu-aarch64 || command -v qemu-aarch64-static; } >/dev/null; then
    # A debug aarch64 wheel cross-built with zig, as scripts/wheel.sh builds the release one.
    tools=$(scripts/wheel-tools.sh maturin ziglang)
    rustup target list --installed | grep -qx aarch64-unknown-linux-gnu ||
      rustup target add aarch64-unknown-linux-gnu
    echo "==> maturin build --profile dev --zig --target aarch64-unknown-linux-gnu"
    start=$SECONDS
    if ! PATH="$tools/bin:$PATH" maturin build --profile dev --zig --compatibility manylinux_2_28 \
      --target aarch64-unknown-linux-gnu --out "$tmp/dist-aarch64" >"$tmp/build.log" 2>&1; then
      tail -40 "$tmp/build.log"
      fail "cross-build the aarch64 wheel with maturin --zig"
    else
      wheels+=("$tmp"/dist-aarch64/axsave-*.whl)
      echo "    ${wheels[-1]##*/} ($((SECONDS - start)) s)"
    fi
  else
    # scripts/wheel.sh's aarch64 wheel of this version, if there is one.
    for w in target/wheels/axsave-"$version"-*aarch64.whl; do
      [ -e "$w" ] && wheels+=("$w")
    done
  fi
fi

# The python that makes the fresh venvs: the real interpreter, not a shim that needs its own PATH.
py=$(python3 -c 'import sys; print(sys.executable)')
# A user's shell on a machine without Rust: nothing but the venv and the system directories.
clean_path=/usr/local/bin:/usr/bin:/bin

# save_and_compare OUT CMD...: runs `CMD --source $fixture/checkpoint --output OUT --quiet`, then
# checks that OUT holds only model.safetensors, byte-identical to the reference.
save_and_compare() {
  local out=$1
  shift
  "$@" --source "$fixture/checkpoint" --output "$out" --quiet &&
    [ "$(ls "$out")" = model.safetensors ] &&
    cmp "$out/model.safetensors" "$fixture/reference.safetensors"
}

# The tag and the binary of a wheel: prints "TAGS<TAB>MEMBER".
wheel_info() {
  "$py" - "$1" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    names = z.namelist()
    wheel = z.read(next(n for n in names if n.endswith(".dist-info/WHEEL"))).decode()
    tags = ",".join(l.split(": ", 1)[1] for l in wheel.splitlines() if l.startswith("Tag: "))
    print(tags + "\t" + next(n for n in names if n.endswith(".data/scripts/axsave")))
EOF
}

# Tests a wheel for this machine's architecture, installed into a fresh venv.
test_native() {
  local whl=$1 venv=$tmp/venv-$2 out
  local -a run=(env -i "HOME=$tmp/home" "TMPDIR=$tmp" "PATH=$venv/bin:$clean_path")
  mkdir -p "$tmp/home"
  "$py" -m venv "$venv"

  check "no Rust on the test PATH" "${run[@]}" sh -c '! command -v cargo && ! command -v rustc'
  check "pip install ${whl##*/} (no index, no compiler needed)" \
    "${run[@]}" python -m pip install -q --no-index --disable-pip-version-check "$whl"
  check "axsave is on the venv's PATH" "${run[@]}" sh -c "[ \"\$(command -v axsave)\" = '$venv/bin/axsave' ]"
  check "axsave --version prints axsave $version" \
    "${run[@]}" sh -c "[ \"\$(axsave --version)\" = 'axsave $version' ]"
  check "python -m axsave --version prints axsave $version" \
    "${run[@]}" sh -c "[ \"\$(python -m axsave --version)\" = 'axsave $version' ]"
  check "the wheel's version, axsave.__version__ and Cargo.toml agree ($version)" "${run[@]}" python -c "
import sys, axsave
from importlib.metadata import version
assert version('axsave') == axsave.__version__ == '$version', (version('axsave'), axsave.__version__)
assert axsave.binary_path() == '$venv/bin/axsave', axsave.binary_path()
assert 'torch' not in sys.modules, 'import axsave imported torch'
"
  check "python -m axsave saves $fixture byte-identical to the reference" \
    save_and_compare "$tmp/out-cli-$2" "${run[@]}" python -m axsave

  # Exit codes pass through: usage error 2, bad input 1.
  set +e
  "${run[@]}" python -m axsave --no-such-option >/dev/null 2>&1
  local rc_usage=$?
  "${run[@]}" python -m axsave --source "$tmp/missing" --output "$tmp/never" --quiet >/dev/null 2>&1
  local rc_bad=$?
  out=$("${run[@]}" AXSAVE_BIN="$tmp/missing-bin" python -m axsave --version 2>&1)
  local rc_nobin=$?
  set -e
  if [ "$rc_usage" = 2 ] && [ "$rc_bad" = 1 ]; then
    pass "python -m axsave passes exit codes through (usage error 2, bad input 1)"
  else
    fail "python -m axsave passes exit codes through: got $rc_usage for a usage error, $rc_bad for bad input"
  fi
  if [ "$rc_nobin" = 1 ] && grep -q "AXSAVE_BIN" <<<"$out"; then
    pass "python -m axsave with AXSAVE_BIN naming no file: exit 1, says so"
  else
    fail "python -m axsave with AXSAVE_BIN naming no file: exit $rc_nobin, said: $out"
  fi

  # Signals: `python -m axsave` becomes the binary (exec), so a SIGTERM reaches axsave itself and
  # ends the command exactly as it ends `axsave`. Rank 0 of 2 waits for a rank 1 that never comes.
  local port kind exe rc_py rc_bin
  port=$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  for kind in python binary; do
    local -a cmd=(axsave)
    [ $kind = python ] && cmd=(python -m axsave)
    # Its own process group (setsid execs in place: same pid), emptied afterwards whatever
    # happened, so that a wrapper that forked could leave no axsave behind.
    setsid "${run[@]}" RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT="$port" \
      "${cmd[@]}" --source "$fixture/checkpoint" --output "$tmp/out-sig-$kind" --quiet >/dev/null 2>&1 &
    local pid=$! i
    # Until the process is axsave (python has exec'd it), at most 20 s; then a second more, so
    # that both are waiting for the peer when the signal comes.
    for ((i = 0; i < 200; i++)); do
      exe=$(readlink "/proc/$pid/exe" || true)
      [ "$exe" = "$venv/bin/axsave" ] && break
      sleep 0.1
    done
    sleep 1
    kill -TERM "$pid" 2>/dev/null || true
    set +e
    wait "$pid"
    local rc=$?
    set -e
    kill -KILL -- "-$pid" 2>/dev/null || true
    if [ $kind = python ]; then rc_py=$rc; exe_py=$exe; else rc_bin=$rc; fi
  done
  if [ "$exe_py" = "$venv/bin/axsave" ] && [ "$rc_py" = "$rc_bin" ] && [ "$rc_py" != 0 ]; then
    pass "python -m axsave is the binary itself (exec); SIGTERM ends it as it ends axsave (exit $rc_py)"
  else
    fail "python -m axsave and signals: process image $exe_py, exit $rc_py after SIGTERM (axsave alone: $rc_bin)"
  fi

  # The Python API, where the package has it.
  if "${run[@]}" python -c 'import axsave, sys; sys.exit(0 if callable(getattr(axsave, "save", None)) else 1)'; then
    check "axsave.save in one process saves $fixture byte-identical to the reference" \
      save_and_compare "$tmp/out-api-$2" "${run[@]}" python -c "
import sys, axsave
summary = axsave.save(sys.argv[2], sys.argv[4])
assert isinstance(summary, dict), summary"
  else
    skip "axsave.save: this package has no axsave.save (the Python API is not in this tree)"
  fi

  # Last: without the binary, python -m axsave says so in one line.
  rm "$venv/bin/axsave"
  set +e
  out=$("${run[@]}" python -m axsave --version 2>&1)
  local rc=$?
  set -e
  if [ "$rc" = 1 ] && grep -q "axsave binary was not found" <<<"$out" && [ "$(wc -l <<<"$out")" = 1 ]; then
    pass "python -m axsave without the binary: exit 1, one line saying it was not found"
  else
    fail "python -m axsave without the binary: exit $rc, said: $out"
  fi
}

# Runs the binary of a wheel for another architecture under qemu-user.
test_qemu() {
  local whl=$1 arch=$2 member=$3 qemu sysroot
  qemu=$(command -v "qemu-$arch" || command -v "qemu-$arch-static" || true)
  sysroot=/usr/$arch-linux-gnu
  if [ -z "$qemu" ]; then
    skip "$arch under qemu: no qemu-$arch (Debian: apt-get install qemu-user)"
    return
  fi
  if [ ! -e "$sysroot/lib/ld-linux-$arch.so.1" ]; then
    skip "$arch under qemu: no $arch glibc in $sysroot (Debian: apt-get install libc6-${arch/aarch64/arm64}-cross)"
    return
  fi
  local bin=$tmp/$arch-axsave
  "$py" -c "import sys, zipfile; open(sys.argv[3], 'wb').write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]))" \
    "$whl" "$member" "$bin"
  chmod +x "$bin"
  local -a run=(env -i "PATH=$clean_path" "QEMU_LD_PREFIX=$sysroot" "$qemu" "$bin")
  check "$arch under qemu: axsave --version prints axsave $version" \
    sh -c "[ \"\$(${run[*]@Q} --version)\" = 'axsave $version' ]"
  check "$arch under qemu: saves $fixture byte-identical to the reference" \
    save_and_compare "$tmp/out-$arch" "${run[@]}"
}

# `pip install .` from this source tree (maturin as the PEP 517 backend; dev profile, as above).
if [ $# -eq 0 ]; then
  "$py" -m venv "$tmp/venv-source"
  if MATURIN_PEP517_ARGS="--profile dev" "$tmp/venv-source/bin/python" -m pip install -q \
    --disable-pip-version-check . >"$tmp/pip-source.log" 2>&1 &&
    [ "$("$tmp/venv-source/bin/axsave" --version)" = "axsave $version" ] &&
    [ "$("$tmp/venv-source/bin/python" -m axsave --version)" = "axsave $version" ]; then
    pass "pip install . (the source tree, PEP 517 via maturin) installs axsave $version"
  else
    fail "pip install . (the source tree)"
    tail -20 "$tmp/pip-source.log" | sed 's/^/    /'
  fi
fi

n=0
for whl in "${wheels[@]}"; do
  n=$((n + 1))
  info=$(wheel_info "$whl")
  tags=${info%%$'\t'*} member=${info#*$'\t'}
  echo "==> ${whl##*/}: $tags, $(du -h "$whl" | cut -f1)"
  case "${whl##*/}" in
    axsave-"$version"-*) pass "the wheel's file name carries version $version" ;;
    *) fail "the wheel's file name does not carry version $version" ;;
  esac
  case "$tags" in
    py3-none-manylinux*"_$host_arch"*) test_native "$whl" "$n" ;;
    py3-none-manylinux*_aarch64*) test_qemu "$whl" aarch64 "$member" ;;
    *) fail "unexpected wheel tags $tags (want py3-none-manylinux_*)" ;;
  esac
done
if [ "$host_arch" != aarch64 ] && ! printf '%s\n' "${wheels[@]}" | grep -q aarch64; then
  skip "aarch64 under qemu: no target/wheels/axsave-$version-*aarch64.whl (scripts/wheel.sh builds it; AXSAVE_TEST_AARCH64=1 cross-builds one here)"
fi

echo "wheel: $passed passed, $failed failed, $skipped skipped"
[ "$failed" = 0 ]
