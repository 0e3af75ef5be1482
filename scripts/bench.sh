#!/usr/bin/env bash
# Benchmarks axsave against the floor (copying the same bytes with cat) and the peer (torch's
# own consolidation, what `accelerate merge-weights` does) in one run, on the same data.
#
# Needs a python with torch and safetensors for the checkpoint and the peer:
#   PYTHON=/path/to/venv/bin/python scripts/bench.sh
# Environment: BENCH_DIR (default ./bench-out, git-ignored), RUNS (default 3; the median is
# reported), LAYERS (8), HIDDEN (2048).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BENCH_DIR=${BENCH_DIR:-bench-out}
RUNS=${RUNS:-3}
LAYERS=${LAYERS:-8}
HIDDEN=${HIDDEN:-2048}
if ! "$PYTHON" -c "import torch, safetensors" 2>/dev/null; then
  echo "bench.sh needs a python with torch and safetensors: PYTHON=/path/to/python $0" >&2
  exit 2
fi
cargo build --release --quiet
bin=$PWD/target/release/axsave
mkdir -p "$BENCH_DIR"
ckpt=$BENCH_DIR/ckpt-l${LAYERS}-h${HIDDEN}
if [ ! -f "$ckpt/.metadata" ]; then
  echo "==> writing the benchmark checkpoint with torch ($LAYERS layers, hidden $HIDDEN, 4 ranks)"
  rm -rf "$ckpt"
  "$PYTHON" scripts/bench/make_checkpoint.py "$ckpt" --layers "$LAYERS" --hidden "$HIDDEN"
fi
bytes=$(du -cb "$ckpt"/*.distcp | tail -1 | cut -f1)
results=$BENCH_DIR/results.jsonl
: > "$results"
# Each contender starts with nothing dirty in the page cache, so none pays for another's writeback.
measure() { sync; "$PYTHON" scripts/bench/measure.py "$@" | tee -a "$results"; }

# Warm the page cache so every contender reads from memory, as on a node that just wrote it.
cat "$ckpt"/*.distcp > /dev/null

for i in $(seq "$RUNS"); do
  echo "==> run $i of $RUNS"
  rm -rf "$BENCH_DIR/out-cat" "$BENCH_DIR/out-axsave" "$BENCH_DIR/out-torch"
  mkdir -p "$BENCH_DIR/out-cat" "$BENCH_DIR/out-torch"
  measure "floor: cat" -- sh -c "cat $ckpt/*.distcp > $BENCH_DIR/out-cat/all.bin"
  rm -f "$BENCH_DIR/out-cat/all.bin"
  measure "floor: cat + fsync" -- sh -c "cat $ckpt/*.distcp > $BENCH_DIR/out-cat/all.bin && sync $BENCH_DIR/out-cat/all.bin"
  rm -f "$BENCH_DIR/out-cat/all.bin"
  measure "axsave" -- "$bin" --source "$ckpt" --output "$BENCH_DIR/out-axsave" --quiet
  measure "torch DCP merge + save_file" -- "$PYTHON" scripts/bench/torch_merge.py "$ckpt" "$BENCH_DIR/out-torch/model.safetensors"
done

if cmp -s "$BENCH_DIR/out-axsave/model.safetensors" "$BENCH_DIR/out-torch/model.safetensors"; then
  same="byte-identical"
else
  same="DIFFERENT"
fi
"$PYTHON" - "$results" "$bytes" "$same" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
size = int(sys.argv[2])
labels = list(dict.fromkeys(r["label"] for r in rows))
med = {l: statistics.median(r["seconds"] for r in rows if r["label"] == l) for l in labels}
rss = {l: max(r["peak_rss_mib"] for r in rows if r["label"] == l) for l in labels}
bad = [r for r in rows if r["exit"] != 0]
print(f"\ncheckpoint: {size/1e9:.2f} GB of .distcp; median of {len(rows)//len(labels)} runs; page cache warm")
print(f"axsave output vs torch output: {sys.argv[3]}\n")
print("| contender | seconds | GB/s | peak RSS | vs floor (cat) | vs floor (cat + fsync) |")
print("|---|---:|---:|---:|---:|---:|")
for l in labels:
    print(f"| {l} | {med[l]:.2f} | {size/1e9/med[l]:.2f} | {rss[l]:.0f} MiB | {med[l]/med['floor: cat']:.2f}x | {med[l]/med['floor: cat + fsync']:.2f}x |")
t = med["torch DCP merge + save_file"] / med["axsave"]
print(f"\naxsave is {t:.1f}x faster than the torch merge")
if bad:
    print(f"FAILED runs: {bad}")
    sys.exit(1)
PY
