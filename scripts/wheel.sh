#!/usr/bin/env bash
# Builds the release wheels into target/wheels/: manylinux_2_28 for x86_64 and aarch64 (GH200 /
# GB200 nodes), each binary asking for no glibc newer than 2.28. maturin cross-compiles with zig
# (`--zig`: zig is both linker and C compiler, against glibc 2.28's symbols), so no aarch64 gcc
# or sysroot is needed. Then prints each wheel's tags, size, the glibc symbol versions its binary
# asks for and `auditwheel show`.
#
# Usage: scripts/wheel.sh [TARGET...]   (default: x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu)
#
# Needs Rust (rustup, to add the targets) and Python 3 with venv; maturin, ziglang and auditwheel
# come from PyPI into a tools venv under target/ (not committed). Test the wheels with
# scripts/test-wheel.sh target/wheels/axsave-*.whl (the aarch64 one runs under qemu-user).
set -euo pipefail
cd "$(dirname "$0")/.."

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu)
glibc=2.28
out=target/wheels

tools=$(scripts/wheel-tools.sh maturin ziglang auditwheel)
export PATH="$tools/bin:$PATH" # maturin runs zig as `python -m ziglang` from this venv

version=$(maturin --version | awk '{print $2}')
echo "==> maturin $version, zig $(python -m ziglang version)"

if ! command -v rustup >/dev/null; then
  echo "rustup not found: it adds the Rust standard library of each target" >&2
  exit 1
fi
installed=$(rustup target list --installed)
for t in "${targets[@]}"; do
  if ! grep -qx "$t" <<<"$installed"; then
    echo "==> rustup target add $t"
    rustup target add "$t"
  fi
done

mkdir -p "$out"
wheels=()
for t in "${targets[@]}"; do
  echo "==> maturin build --release --zig --compatibility manylinux_${glibc//./_} --target $t"
  log=$(mktemp)
  start=$SECONDS
  # The default features (`cuda` and `pmix`, both opened at run time); no `mpi`.
  if ! maturin build --release --zig --compatibility "manylinux_${glibc//./_}" --target "$t" \
    --out "$out" >"$log" 2>&1; then
    tail -40 "$log" >&2
    rm -f "$log"
    echo "==> wheel build FAILED for $t" >&2
    exit 1
  fi
  whl=$(sed -n 's/.*Built wheel to //p' "$log" | tail -1)
  rm -f "$log"
  echo "    $whl ($((SECONDS - start)) s)"
  wheels+=("$whl")
done

echo "==> the wheels"
for whl in "${wheels[@]}"; do
  python - "$whl" "$glibc" <<'EOF'
import io, sys, zipfile
from elftools.elf.elffile import ELFFile
from elftools.elf.gnuversions import GNUVerNeedSection

path, limit = sys.argv[1], tuple(int(x) for x in sys.argv[2].split("."))
with zipfile.ZipFile(path) as z:
    tags = [l.split(": ", 1)[1] for l in z.read(next(n for n in z.namelist() if n.endswith(".dist-info/WHEEL"))).decode().splitlines() if l.startswith("Tag: ")]
    exe = next(n for n in z.namelist() if n.endswith(".data/scripts/axsave"))
    elf = ELFFile(io.BytesIO(z.read(exe)))
    size = sum(i.file_size for i in z.infolist())
needed = [t.needed for t in elf.get_section_by_name(".dynamic").iter_tags() if t.entry.d_tag == "DT_NEEDED"]
versions = set()
for sec in elf.iter_sections():
    if isinstance(sec, GNUVerNeedSection):
        for _, auxs in sec.iter_versions():
            versions.update(a.name for a in auxs if a.name.startswith("GLIBC_"))
newest = max(versions, key=lambda v: tuple(int(x) for x in v[6:].split(".")))
ok = tuple(int(x) for x in newest[6:].split(".")) <= limit
import os
print(f"{os.path.basename(path)}: {os.path.getsize(path) / 2**20:.1f} MiB ({size / 2**20:.1f} MiB unpacked), tags {', '.join(tags)}")
print(f"  binary {exe}: {elf['e_machine']}, needs {', '.join(needed)}")
print(f"  newest glibc symbol version asked for: {newest} ({'ok' if ok else 'NEWER THAN'} <= GLIBC_{sys.argv[2]})")
sys.exit(0 if ok else 1)
EOF
  auditwheel show "$whl" | sed 's/^/  /'
done
echo "==> wheels in $out/; test with: scripts/test-wheel.sh ${wheels[*]}"
