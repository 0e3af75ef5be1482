#!/usr/bin/env bash
# Checks axsave's GPU path on a Linux machine with an NVIDIA GPU, using binaries built
# beforehand elsewhere (the GPU machine needs no Rust and no network):
#
#   # on the build machine (x86-64, same repository checkout, default features):
#   cargo build --release && cargo test --workspace --no-run
#   # (--workspace: the GPU unit tests live in the axsave-core and axsave-dist test binaries,
#   # which a plain `cargo test --no-run` at the root does not build)
#   # copy the checkout with target/ to the GPU machine, then there:
#   scripts/gpu-check.sh
#
# What it does, each step under a time limit, then a PASS/FAIL table (exit 1 on any FAIL):
#   1. finds the prebuilt binaries: target/release/axsave and the test binaries of
#      `cargo test --no-run` (debug or release, the newest that has the GPU tests);
#   2. runs the GPU unit tests (kernels on torch's fixtures, pinned memory, the engine, NCCL,
#      the watchdog) and the GPU end-to-end tests, with AXSAVE_REQUIRE_GPU=1 so that a test
#      that cannot find the GPU fails instead of skipping;
#   3. saves the fixtures with `--transport nccl` on one rank and compares every byte with
#      the references (conversions: torch's `.to()` output);
#   4. prints host-to-device, device-to-host and conversion bandwidth on about 2 GB
#      (`axsave gpu-bench`);
#   5. side by side on a generated checkpoint: auto, tcp and nccl, one process and launch -n 8,
#      wall and peak RSS, `auto / best`, and whether auto stayed off the GPU;
#   6. the GPU path's fixed costs (CUDA context, kernels compiled vs cached, self-test, buffers)
#      and its peak RSS beside the CPU path's at a 256 MiB budget.
#
# Environment: CHECKS (which steps, default tests,fixtures,bench,side,costs), AXSAVE_BIN (default target/release/axsave), CARGO_TARGET_DIR (default
# ./target), AXSAVE_FIXTURES (default tests/fixtures), BENCH_BYTES (default 2GiB; 0 skips
# the bandwidth table), NCCL_DEBUG and friends pass through to NCCL.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
target=${CARGO_TARGET_DIR:-$root/target}
bin=${AXSAVE_BIN:-$target/release/axsave}
fixtures=${AXSAVE_FIXTURES:-$root/tests/fixtures}
bench_bytes=${BENCH_BYTES:-2GiB}
work=$(mktemp -d)
checks=",${CHECKS:-tests,fixtures,bench,side,costs},"
want() { [[ $checks == *",$1,"* ]]; }
trap 'rm -rf "$work"' EXIT

names=()
verdicts=()
details=()
record() { # name verdict detail
  names+=("$1")
  verdicts+=("$2")
  details+=("$3")
  printf '==> %-44s %s %s\n' "$1" "$2" "$3"
}

# run NAME LIMIT_SECONDS COMMAND...: runs under `timeout`, log in $work/NAME.log, shown on
# failure; records PASS, FAIL or TIMEOUT with the time taken.
run() {
  local name=$1 limit=$2
  shift 2
  local log="$work/${name//[^A-Za-z0-9_.-]/_}.log"
  local start=$SECONDS rc=0
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1 || rc=$?
  local took=$((SECONDS - start))
  if [ "$rc" = 0 ]; then
    record "$name" PASS "(${took}s)"
  else
    local why="exit $rc"
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then why="TIMEOUT after ${limit}s"; fi
    record "$name" FAIL "($why, ${took}s)"
    echo "---- last lines of $name ----"
    tail -n 40 "$log"
    echo "-----------------------------"
  fi
  return 0
}

echo "axsave GPU check in $root"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi -L || true
  nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1 | sed 's/^/driver /' || true
else
  echo "nvidia-smi not found (the checks below find the driver themselves)"
fi

# 1. The binaries.
if [ ! -x "$bin" ]; then
  record "binary $bin" FAIL "(missing: run \`cargo build --release\` on the build machine)"
  bin=""
fi
# The newest test binary named NAME-<hash> (debug or release) whose test list has PATTERN.
find_test_bin() {
  local name=$1 pattern=$2 f
  while IFS= read -r f; do
    if "$f" --list 2>/dev/null | grep -q "$pattern"; then
      echo "$f"
      return 0
    fi
  done < <(find "$target/debug/deps" "$target/release/deps" -maxdepth 1 -type f -perm -u+x \
    -regex ".*/${name}-[0-9a-f]+" -printf '%T@ %p\n' 2>/dev/null | sort -rn | cut -d' ' -f2-)
  return 1
}
core_tests=$(find_test_bin axsave_core 'gpu::cuda::tests::kernels_match_torch_on_the_device') || core_tests=""
gpu_tests=$(find_test_bin gpu 'ranks_over_nccl_write_the_reference') || gpu_tests=""
dist_tests=$(find_test_bin axsave_dist 'data_plane::nccl::') || dist_tests=""
for pair in "axsave-core unit tests:$core_tests" "tests/gpu.rs:$gpu_tests" "axsave-dist unit tests:$dist_tests"; do
  if [ -z "${pair#*:}" ]; then
    record "find ${pair%%:*}" FAIL "(not in $target/{debug,release}/deps: run \`cargo test --workspace --no-run\` with default features)"
  else
    echo "using ${pair#*:}"
  fi
done

export AXSAVE_FIXTURES="$fixtures"
[ -n "$bin" ] && export AXSAVE_BIN="$bin"

# 2. The GPU tests (one thread: they share the GPU and print what they found).
if want tests && [ -n "$core_tests" ]; then
  run "unit: GPU kernels, engine, NCCL" 900 env AXSAVE_REQUIRE_GPU=1 "$core_tests" gpu:: --test-threads=1 --nocapture
fi
if want tests && [ -n "$dist_tests" ]; then
  run "unit: NCCL loader, communicator, device plane" 300 "$dist_tests" data_plane::nccl:: data_plane::device:: --test-threads=1 --nocapture
fi
if want tests && [ -n "$gpu_tests" ] && [ -n "$bin" ]; then
  run "end to end: tests/gpu.rs" 900 env AXSAVE_REQUIRE_GPU=1 "$gpu_tests" --test-threads=1 --nocapture
fi

# 3. One rank, --transport nccl, every fixture with a reference; byte for byte.
save_and_compare() { # name source reference [extra args]
  local name=$1 src=$2 ref=$3
  shift 3
  local out="$work/out-$name"
  "$bin" --source "$src" --output "$out" --transport nccl "$@" 2>"$work/save-$name.err" || {
    cat "$work/save-$name.err"
    return 1
  }
  cat "$work/save-$name.err"
  if ! cmp "$out/model.safetensors" "$ref"; then
    echo "$name: model.safetensors differs from $ref"
    return 1
  fi
  # A conversion must have run on the GPU, not fallen back to the CPU.
  if [ $# -gt 0 ] && ! grep -q "conversions on the GPU" "$work/save-$name.err"; then
    echo "$name: the log does not say the conversions ran on the GPU"
    return 1
  fi
}
export bin work
export -f save_and_compare
if want fixtures && [ -n "$bin" ]; then
  for f in fsdp_w1 fsdp_w2 fsdp_w3 fsdp_w4 fsdp_w8 hf_w2 zstd_w2 per_rank_meta_w2 torch24_w2 torch27_w2 torch215_w2 demo_w4; do
    if [ -f "$fixtures/dcp/$f/reference.safetensors" ]; then
      run "save $f --transport nccl" 120 \
        bash -c 'save_and_compare "$@"' _ "$f" "$fixtures/dcp/$f/checkpoint" "$fixtures/dcp/$f/reference.safetensors"
    fi
  done
  for d in bf16 fp16 fp32; do
    run "save fsdp_w2 --dtype $d --transport nccl" 120 \
      bash -c 'save_and_compare "$@"' _ "fsdp_w2-$d" "$fixtures/dcp/fsdp_w2/checkpoint" \
      "$fixtures/dcp/fsdp_w2/reference_$d.safetensors" --dtype "$d"
  done
fi

# 4. Bandwidth.
if want bench && [ -n "$bin" ] && [ "$bench_bytes" != "0" ]; then
  run "gpu-bench on $bench_bytes" 600 "$bin" gpu-bench --bytes "$bench_bytes"
  if [ "${verdicts[${#verdicts[@]}-1]}" = PASS ]; then
    echo
    cat "$work/gpu-bench_on_${bench_bytes//[^A-Za-z0-9_.-]/_}.log"
  fi
fi

# 5. Side by side on a large generated checkpoint: which path is faster on this node? One
# process and `launch -n 8`, with --transport auto, tcp and nccl, wall seconds and peak RSS of
# the largest process (scripts/bench/measure.py), outputs compared byte for byte (untimed). Needs a
# python with torch (PYTHON, default python3) to write the checkpoint. SIDE_LAYERS (default 15:
# 8.6 GB of bf16 with SIDE_HIDDEN 4096; 0 skips), SIDE_DIR (default under /tmp).
side_layers=${SIDE_LAYERS:-15}
side_hidden=${SIDE_HIDDEN:-4096}
side_python=${PYTHON:-python3}
if want side && [ -n "$bin" ] && [ "$side_layers" != 0 ] && "$side_python" -c 'import torch' 2>/dev/null; then
  side=${SIDE_DIR:-$work/side}
  mkdir -p "$side"
  if [ ! -f "$side/ckpt/.metadata" ]; then # kept in SIDE_DIR for a rerun
    run "write a ${side_layers}-layer checkpoint (torch, 8 ranks)" 600 \
      "$side_python" "$root/scripts/bench/make_large_checkpoint.py" "$side/ckpt" --layers "$side_layers" --hidden "$side_hidden" --ranks 8
  fi
  if [ -f "$side/ckpt/.metadata" ]; then
    cat "$side/ckpt"/* >/dev/null # page cache warm for every row alike
    rows="$work/side-rows.jsonl"
    : >"$rows"
    side_row() { # label transport procs [extra args]
      local label=$1 transport=$2 procs=$3
      shift 3
      local out="$side/out" cmd group="$*"
      rm -rf "$out"
      if [ "$procs" = 1 ]; then
        cmd=("$bin" --source "$side/ckpt" --output "$out" --transport "$transport" "$@")
      else
        cmd=("$bin" launch -n "$procs" -- --source "$side/ckpt" --output "$out" --transport "$transport" "$@")
      fi
      # Timed without --json (its SHA-256 of every file would be timed too); the output is compared
      # with the group's first one afterwards, untimed.
      timeout --kill-after=10 300 "$side_python" "$root/scripts/bench/measure.py" "$label" -- "${cmd[@]}" \
        >"$work/side.json" 2>"$work/side.err" || true
      local path=cpu same=none ref="$side/ref-${group//[^A-Za-z0-9]/_}"
      # Rank 0 logs each class of bytes with its way ("cross_node 1.2 GB by nccl (...)"); one
      # process under --transport nccl says "conversions on the GPU".
      if grep -qE "conversions on the GPU| by (nccl|gpu) \(" "$work/side.err"; then path=gpu; fi
      # Every file of the output (a large model is written as shards + index).
      if [ -f "$out/model.safetensors" ] || [ -f "$out/model.safetensors.index.json" ]; then
        if [ ! -e "$ref" ]; then
          mv "$out" "$ref"
          same=first
        elif diff -rq "$out" "$ref" >/dev/null; then
          same=yes
        else
          same=DIFFERS
        fi
      fi
      "$side_python" -c 'import json,sys; r=json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]); r.update(same=sys.argv[2], took=sys.argv[3], group=sys.argv[4]); print(json.dumps(r))' \
        "$work/side.json" "$same" "$path" "$procs $group" >>"$rows" 2>/dev/null ||
        echo "{\"label\": \"$label\", \"exit\": -1, \"seconds\": 0, \"peak_rss_mib\": 0, \"same\": \"none\", \"took\": \"?\", \"group\": \"$procs $group\"}" >>"$rows"
      sed 's/^\[rank [0-9]*\] //' "$work/side.err" | grep -E "ERROR" | head -2 || true
      rm -rf "$out"
    }
    for procs in 1 8; do
      for t in auto tcp nccl; do side_row "$procs proc, $t, keep" "$t" "$procs"; done
    done
    for t in auto tcp nccl; do side_row "1 proc, $t, --dtype fp16" "$t" 1 --dtype fp16; done
    sync
    start=$(date +%s.%N)
    cat "$side/ckpt"/*.distcp >"$side/cat.out" && sync "$side/cat.out" 2>/dev/null || sync
    end=$(date +%s.%N)
    rm -f "$side/cat.out"
    echo
    echo "side by side on $(du -sh "$side/ckpt" | cut -f1) (cat + fsync of the shards: $("$side_python" -c "print(round($end - $start, 2))") s):"
    "$side_python" - "$rows" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"| {'run':<28} | {'path':<4} | {'exit':>4} | {'s':>7} | {'MiB':>6} | same bytes |")
groups = {}
for r in rows:
    print(f"| {r['label']:<28} | {r['took']:<4} | {r['exit']:>4} | {r['seconds']:7.2f} | {r['peak_rss_mib']:6.0f} | {r['same']:<10} |")
    groups.setdefault(r["group"], []).append(r)
# On one node nothing crosses nodes: auto must stay off the GPU (issue: the GPU path was slower).
bad = [r["label"] for r in rows if ", auto," in r["label"] and r["took"] != "cpu"]
open(sys.argv[1] + ".auto", "w").write("; ".join(bad))
for g, rs in groups.items():
    ok = [r for r in rs if r["exit"] == 0]
    same = all(r["same"] in ("first", "yes") for r in ok)
    auto = [r for r in ok if ", auto," in r["label"]]
    if ok and auto:
        best = min(r["seconds"] for r in ok)
        print(f"group '{g}': auto / best = {auto[0]['seconds'] / best:.2f}; outputs {'identical' if same else 'DIFFER'}")
PY
    if [ -s "$rows.auto" ]; then
      record "auto stays off the GPU on one node" FAIL "took the GPU: $(cat "$rows.auto")"
    elif [ -f "$rows.auto" ]; then
      record "auto stays off the GPU on one node" PASS "every auto row on the CPU/host path"
    fi
  fi
fi

# 6. The GPU path's fixed costs, cold and warm: the same small save under --transport nccl with
# an empty kernel cache (NVRTC compiles) and again (the cached PTX loads), each step's time from
# the debug log ("GPU fixed cost: ..."), and peak RSS beside the CPU path at a 256 MiB budget.
if want costs && [ -n "$bin" ] && [ -f "$fixtures/dcp/fsdp_w2/checkpoint/.metadata" ]; then
  cache="$work/kernel-cache"
  rm -rf "$cache"
  costs="$work/costs.txt"
  : >"$costs"
  for pass in cold warm; do
    rm -rf "$work/out-costs"
    run "fixed costs, $pass kernel cache" 120 env AXSAVE_CACHE_DIR="$cache" RUST_LOG=info,axsave_core=debug \
      python3 "$root/scripts/bench/measure.py" "peak RSS, $pass" -- "$bin" --source "$fixtures/dcp/fsdp_w2/checkpoint" \
      --output "$work/out-costs" --transport nccl --dtype fp32 --memory-budget 256MiB
    log="$work/fixed_costs__${pass}_kernel_cache.log"
    { echo "$pass:"; grep -E "GPU fixed cost|peak_rss_mib" "$log" | sed -E 's/^.*(GPU fixed cost|\{"label")/  \1/'; } >>"$costs" || true
  done
  rm -rf "$work/out-costs"
  run "fixed costs, CPU path" 120 python3 "$root/scripts/bench/measure.py" "peak RSS, cpu" -- "$bin" \
    --source "$fixtures/dcp/fsdp_w2/checkpoint" --output "$work/out-costs" --transport tcp --dtype fp32 \
    --memory-budget 256MiB --force
  { echo "cpu:"; grep -E "peak_rss_mib" "$work/fixed_costs__CPU_path.log" | sed 's/^/  /'; } >>"$costs" || true
  echo
  cat "$costs"
fi

echo
echo "==================== axsave GPU check ===================="
fails=0
for i in "${!names[@]}"; do
  printf '%-6s %-46s %s\n' "${verdicts[$i]}" "${names[$i]}" "${details[$i]}"
  if [ "${verdicts[$i]}" != PASS ]; then fails=$((fails + 1)); fi
done
echo "=========================================================="
if [ "$fails" -gt 0 ]; then
  echo "FAIL: $fails of ${#names[@]} checks failed"
  exit 1
fi
echo "PASS: all ${#names[@]} checks"
