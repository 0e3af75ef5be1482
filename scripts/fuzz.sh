#!/usr/bin/env bash
# Fuzzes the untrusted-input parsers of axsave-formats with cargo-fuzz (libFuzzer). Not run in CI.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# SECONDS (default 60) is the time per target; TARGET is any of
#   pickle torchsave dcp_metadata safetensors_header zero     (default: all of them)
# Each run seeds fuzz/corpus/<target>/ from tests/fixtures (the corpus also keeps what earlier
# runs found), fuzzes for SECONDS under `nice -n 10`, and prints per target the executions, the
# coverage (libFuzzer's `cov`/`ft` counters) and the crashes. Crashing inputs (crash-*, timeout-*,
# oom-*) land in fuzz/artifacts/<target>/; reproduce one with
#   cargo fuzz run -s none <target> fuzz/artifacts/<target>/crash-...
# libFuzzer runs with -use_value_profile=1 and a dictionary (fuzz/pickle.dict for the pickle-based
# targets, fuzz/safetensors.dict); the targets' own mutator also rewrites pickle integers to
# extreme values (fuzz/src/lib.rs, `mutate`), and the torchsave target has a generator mode
# (inputs starting with a 0 byte, fuzz/src/lib.rs `tensor_pickle`).
# Every run is appended to fuzz/artifacts/history.tsv (date, target, seconds, executions, cov,
# ft, crashes). fuzz/target, fuzz/corpus and fuzz/artifacts are git-ignored. Exits 1 if any target
# crashed, timed out (one input running longer than FUZZ_TIMEOUT s) or ran out of memory.
#
# Stable toolchain: cargo-fuzz needs no nightly flags when built without a sanitizer. The
# libFuzzer instrumentation it asks rustc for (-Cpasses=sancov-module, -Cllvm-args=-sanitizer-
# coverage-*, --cfg fuzzing, debug assertions and overflow checks) is all stable; only the
# sanitizers (-Zsanitizer=...) and --build-std are nightly-only. So this script uses `-s none` by
# default and works on stable 1.95 with cargo-fuzz 0.13.2 as is. Safe Rust gains little from
# AddressSanitizer; its other use, libFuzzer's -malloc_limit_mb, is replaced by the targets' own
# allocator (fuzz/src/lib.rs, LimitAlloc: any single allocation over 256 MiB aborts).
# FUZZ_SANITIZER=address turns ASan back on; on a stable toolchain this script then sets
# RUSTC_BOOTSTRAP=1 so that rustc accepts -Zsanitizer (the ASan runtime ships with the x86_64
# Linux std).
#
# Other knobs (environment): FUZZ_SANITIZER (none), FUZZ_TIMEOUT (per-input seconds, 10),
# FUZZ_RSS_MB (2048), FUZZ_NICE (10), FUZZ_TARGET_DIR (fuzz/target), FUZZ_ARGS (extra libFuzzer
# flags, e.g. "-max_len=65536").
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
ALL_TARGETS=(pickle torchsave dcp_metadata safetensors_header zero)

DURATION=${1:-60}
shift || true
if [[ ! $DURATION =~ ^[0-9]+$ ]]; then
    echo "usage: $0 [SECONDS] [TARGET...]   (targets: ${ALL_TARGETS[*]})" >&2
    exit 2
fi
TARGETS=("$@")
[[ ${#TARGETS[@]} -eq 0 ]] && TARGETS=("${ALL_TARGETS[@]}")
for t in "${TARGETS[@]}"; do
    [[ " ${ALL_TARGETS[*]} " == *" $t "* ]] || { echo "unknown target $t (${ALL_TARGETS[*]})" >&2; exit 2; }
done

SAN=${FUZZ_SANITIZER:-none}
NICE=${FUZZ_NICE:-10}
TIMEOUT=${FUZZ_TIMEOUT:-10}
RSS_MB=${FUZZ_RSS_MB:-2048}
TARGET_DIR=${FUZZ_TARGET_DIR:-$ROOT/fuzz/target}
FIX=$ROOT/tests/fixtures

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    nice -n "$NICE" cargo install cargo-fuzz --locked
fi
if [[ $SAN != none ]] && ! rustc --version | grep -q nightly; then
    # -Zsanitizer is nightly-only; stable rustc accepts it with RUSTC_BOOTSTRAP.
    export RUSTC_BOOTSTRAP=1
fi

# ---------------------------------------------------------------------------------------------
# Seeds.

# The data.pkl record of a torch.save archive (nothing for a file that is no zip).
data_pkl() {
    [[ $(head -c 4 "$1" | od -An -tx1 | tr -d ' ') == 504b0304 ]] || return 0
    if command -v unzip >/dev/null 2>&1; then
        unzip -p "$1" '*/data.pkl' </dev/null 2>/dev/null && return 0
    fi
    # data.pkl is torch.save's first record: skip its local header (30 bytes + name + extra).
    # The rest of the archive follows the pickle's STOP, which the reader ignores.
    local n e
    read -r n e < <(od -An -tu2 -j26 -N4 "$1")
    tail -c +$((30 + n + e + 1)) "$1"
}

# One byte, given as a number.
byte() { printf "\\x$(printf %02x "$1")"; }

seed() { # seed TARGET NAME  (content on stdin; an empty one is dropped)
    local f=$ROOT/fuzz/corpus/$1/seed-$2
    cat >"$f"
    [[ -s $f ]] || rm -f "$f"
}

# Files under a directory, by path relative to it in byte order (as fuzz/src/lib.rs sorts them).
sorted_files() { # sorted_files DIR PATTERN
    (cd "$1" && find . -type f -name "$2" | sed 's|^\./||' | LC_ALL=C sort)
}

make_seeds() {
    local t=$1 f i d name
    mkdir -p "$ROOT/fuzz/corpus/$t"
    rm -f "$ROOT/fuzz/corpus/$t"/seed-*
    case $t in
    pickle)
        for f in "$FIX"/pickle/*.pkl; do seed pickle "$(basename "$f")" <"$f"; done
        i=0
        while read -r f; do
            data_pkl "$FIX/$f" | seed pickle "pt-$((i++))"
        done < <(sorted_files "$FIX" '*.pt' | grep -v legacy_tar)
        i=0
        while read -r f; do seed pickle "meta-$((i++))" <"$FIX/$f"; done < <(sorted_files "$FIX" '*.metadata')
        ;;
    torchsave)
        i=0
        while read -r f; do
            seed torchsave "pt-$i" <"$FIX/$f"
            data_pkl "$FIX/$f" | seed torchsave "pkl-$((i++))"
        done < <(sorted_files "$FIX" '*.pt')
        # Generator mode (first byte 0, see fuzz_targets/torchsave.rs): a 3x4 view at offset 12
        # of v2, v3, parameter and from_type_v2 tensors.
        for i in 0 1 2 3; do
            printf "\\x00\\x0$i\\x05\\x02\\x20\\x26\\x17\\x18\\x1b\\x15" | seed torchsave "gen-$i"
        done
        ;;
    dcp_metadata)
        # Last byte: 0 = empty directory, k = the k-th tests/fixtures/dcp/*/checkpoint (byte
        # order), as fuzz_targets/dcp_metadata.rs numbers them.
        i=0
        while read -r d; do
            i=$((i + 1))
            for f in "$FIX/dcp/$d"/checkpoint/*.metadata "$FIX/dcp/$d"/checkpoint/.metadata; do
                [[ -f $f ]] || continue
                name="$d-$(basename "$f" | tr -d .)"
                { cat "$f"; byte 0; } | seed dcp_metadata "$name-empty"
                { cat "$f"; byte "$i"; } | seed dcp_metadata "$name"
            done
        done < <(cd "$FIX/dcp" && for x in *; do [[ -d $x/checkpoint ]] && echo "$x"; done | LC_ALL=C sort)
        i=0
        while read -r f; do
            { cat "$FIX/axolotl/$f"; byte 0; } | seed dcp_metadata "axolotl-$((i++))"
        done < <(sorted_files "$FIX/axolotl" '.metadata')
        ;;
    safetensors_header)
        i=0
        while read -r f; do
            # Large files only slow the mutations down; the header is what is fuzzed.
            [[ $(stat -c %s "$FIX/$f") -le 65536 ]] || continue
            seed safetensors_header "st-$((i++))" <"$FIX/$f"
        done < <(sorted_files "$FIX" '*.safetensors')
        ;;
    zero)
        # First byte: the slot, i.e. the index of the replaced file among
        # deepspeed/*/checkpoint/*/*.pt in byte order (fuzz_targets/zero.rs). Payload: the whole
        # file, or only its data.pkl (put back into the original archive by the target).
        i=0
        while read -r f; do
            { byte "$i"; cat "$FIX/deepspeed/$f"; } | seed zero "slot$i-zip"
            { byte "$i"; data_pkl "$FIX/deepspeed/$f"; } | seed zero "slot$i-pkl"
            i=$((i + 1))
        done < <(sorted_files "$FIX/deepspeed" '*.pt' | grep -E '^[^/]+/checkpoint/[^/]+/[^/]+$')
        ;;
    esac
}

# Scratch directories of fuzzing processes that are gone (fuzz/src/lib.rs, scratch_dir).
clean_scratch() {
    local d pid
    for d in /dev/shm/axsave-fuzz-* "${TMPDIR:-/tmp}"/axsave-fuzz-*; do
        [[ -d $d ]] || continue
        pid=${d##*-}
        [[ $pid =~ ^[0-9]+$ ]] && ! kill -0 "$pid" 2>/dev/null && rm -rf "$d"
    done
    return 0
}

# ---------------------------------------------------------------------------------------------
# Build and run.

echo "== building fuzz targets (sanitizer: $SAN, $(rustc --version))"
for t in "${TARGETS[@]}"; do
    nice -n "$NICE" cargo fuzz build -s "$SAN" --target-dir "$TARGET_DIR" "$t"
done

mkdir -p "$ROOT/fuzz/artifacts"
HISTORY=$ROOT/fuzz/artifacts/history.tsv
[[ -f $HISTORY ]] || printf 'date\ttarget\tseconds\texecutions\tcov\tft\tcrashes\tsanitizer\n' >"$HISTORY"

failed=0
summary=()
for t in "${TARGETS[@]}"; do
    make_seeds "$t"
    art=$ROOT/fuzz/artifacts/$t
    mkdir -p "$art"
    before=$(find "$art" -maxdepth 1 -type f \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' -o -name 'leak-*' \) | wc -l)
    log=$art/run-$(date +%Y%m%d-%H%M%S).log
    dict=$ROOT/fuzz/pickle.dict
    [[ $t == safetensors_header ]] && dict=$ROOT/fuzz/safetensors.dict
    echo "== $t: ${DURATION}s, corpus $(find "$ROOT/fuzz/corpus/$t" -type f | wc -l) inputs, log $log"
    set +e
    # shellcheck disable=SC2086
    timeout --signal=INT --kill-after=30 $((DURATION + 300)) \
        nice -n "$NICE" cargo fuzz run -s "$SAN" --target-dir "$TARGET_DIR" "$t" "$ROOT/fuzz/corpus/$t" -- \
        -max_total_time="$DURATION" -timeout="$TIMEOUT" -rss_limit_mb="$RSS_MB" \
        -print_final_stats=1 -use_value_profile=1 -dict="$dict" \
        -artifact_prefix="$art/" ${FUZZ_ARGS:-} >"$log" 2>&1
    rc=$?
    set -e
    clean_scratch
    execs=$(grep -ho 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | awk '{s += $1} END {print s + 0}')
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || true)
    ft=$(grep -o 'ft: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || true)
    after=$(find "$art" -maxdepth 1 -type f \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' -o -name 'leak-*' \) | wc -l)
    crashes=$((after - before))
    if [[ $rc -ne 0 && $crashes -eq 0 ]]; then
        crashes=1 # died without leaving an input (e.g. a build failure); see the log
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(date -Is)" "$t" "$DURATION" "$execs" "${cov:-?}" "${ft:-?}" "$crashes" "$SAN" >>"$HISTORY"
    line=$(printf '%-20s %8s execs  cov %-6s ft %-6s crashes %s' "$t" "$execs" "${cov:-?}" "${ft:-?}" "$crashes")
    summary+=("$line")
    echo "   $line"
    if [[ $crashes -gt 0 ]]; then
        failed=1
        grep -E '^(==[0-9]+== ?ERROR|thread .* panicked|axsave-fuzz: allocation|SUMMARY|ERROR: libFuzzer)' "$log" | head -5 | sed 's/^/   | /' || true
        ls -t "$art" | grep -E '^(crash|timeout|oom|leak)-' | head -"$crashes" | sed "s#^#   | input: $art/#"
    fi
done

echo "== summary (${DURATION}s per target; history in fuzz/artifacts/history.tsv)"
printf '   %s\n' "${summary[@]}"
exit "$failed"
