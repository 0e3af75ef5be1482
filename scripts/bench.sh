#!/usr/bin/env bash
# Benchmarks axsave against the floor (copying the same bytes with cat) and the peers (torch's
# own consolidation) in one run, on the same data.
#
#   PYTHON=/path/to/venv/bin/python scripts/bench.sh [single|multi|merge|all]
#
# single: one process: axsave vs `cat` vs torch's DCP merge + save_file (what
#         `accelerate merge-weights` does).
# multi:  4 ranks, gather mode, node-local sources (each rank sees only its own .distcp, so
#         bytes cross TCP) vs the classic gather: torchrun with 4 gloo ranks loading their
#         DTensor shards with DCP, full_tensor() on each, rank 0 save_file (FSDP's
#         FULL_STATE_DICT path on CPU); plus the same gather over MPI (when Open MPI is
#         installed; axsave is then built with --features mpi) and axsave's sharded mode.
# merge:  merge-lora of a generated bf16 Llama base (MERGE_LAYERS, default 22 layers of hidden
#         2048: 2.6 GB) and a rank-16 adapter on every projection: axsave merge-lora vs PEFT's
#         from_pretrained + merge_and_unload() + save_pretrained (needs peft and transformers),
#         and the outputs compared element by element.
# Needs a python with torch and safetensors. Environment: BENCH_DIR (default ./bench-out,
# git-ignored), RUNS (default 3; the median is reported), LAYERS (8), HIDDEN (2048).
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
PYTHON=${PYTHON:-python3}
BENCH_DIR=${BENCH_DIR:-bench-out}
RUNS=${RUNS:-3}
LAYERS=${LAYERS:-8}
HIDDEN=${HIDDEN:-2048}
if ! "$PYTHON" -c "import torch, safetensors" 2>/dev/null; then
  echo "bench.sh needs a python with torch and safetensors: PYTHON=/path/to/python $0" >&2
  exit 2
fi
# With Open MPI installed, build with MPI so the 4-rank rows can compare it with TCP.
if command -v mpirun >/dev/null && pkg-config --exists ompi 2>/dev/null; then
  features=(--features mpi)
else
  features=()
fi
cargo build --release --quiet "${features[@]}"
bin=$PWD/target/release/axsave
mkdir -p "$BENCH_DIR"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
ckpt=$BENCH_DIR/ckpt-l${LAYERS}-h${HIDDEN}
if [ "$what" != merge ]; then
  if [ ! -f "$ckpt/.metadata" ]; then
    echo "==> writing the benchmark checkpoint with torch ($LAYERS layers, hidden $HIDDEN, 4 ranks)"
    rm -rf "$ckpt"
    "$PYTHON" scripts/bench/make_checkpoint.py "$ckpt" --layers "$LAYERS" --hidden "$HIDDEN"
  fi
  bytes=$(du -cb "$ckpt"/*.distcp | tail -1 | cut -f1)
fi

# Each contender starts with nothing dirty in the page cache, so none pays for another's
# writeback; the source is warm, as on a node that just wrote it.
measure() { sync; "$PYTHON" scripts/bench/measure.py "$@" | tee -a "$results"; }
fresh() { rm -rf "$@"; mkdir -p "$@"; }
[ "$what" = merge ] || cat "$ckpt"/*.distcp > /dev/null

report() {  # report RESULTS TITLE
  "$PYTHON" - "$1" "$bytes" "$2" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
size = int(sys.argv[2])
labels = list(dict.fromkeys(r["label"] for r in rows))
med = {l: statistics.median(r["seconds"] for r in rows if r["label"] == l) for l in labels}
rss = {l: max(r["peak_rss_mib"] for r in rows if r["label"] == l) for l in labels}
print(f"\n{sys.argv[3]}: {size/1e9:.2f} GB of input, median of {len(rows)//len(labels)} runs\n")
print("| contender | seconds | GB/s | peak RSS (per process) | vs `cat` | vs `cat` + fsync |")
print("|---|---:|---:|---:|---:|---:|")
for l in labels:
    print(f"| {l} | {med[l]:.2f} | {size/1e9/med[l]:.2f} | {rss[l]:.0f} MiB | {med[l]/med['floor: cat']:.2f}x | {med[l]/med['floor: cat + fsync']:.2f}x |")
bad = [r for r in rows if r["exit"] != 0]
if bad:
    print(f"FAILED runs: {bad}")
    sys.exit(1)
PY
}

floors() {
  fresh "$BENCH_DIR/out-cat"
  measure "floor: cat" -- sh -c "cat $ckpt/*.distcp > $BENCH_DIR/out-cat/all.bin"
  fresh "$BENCH_DIR/out-cat"
  measure "floor: cat + fsync" -- sh -c "cat $ckpt/*.distcp > $BENCH_DIR/out-cat/all.bin && sync $BENCH_DIR/out-cat/all.bin"
  rm -rf "$BENCH_DIR/out-cat"
}

same() { if cmp -s "$1" "$2"; then echo "byte-identical"; else echo "DIFFERENT"; fi; }

if [ "$what" = single ] || [ "$what" = all ]; then
  results=$BENCH_DIR/single.jsonl; : > "$results"
  for i in $(seq "$RUNS"); do
    echo "==> single process, run $i of $RUNS"
    floors
    rm -rf "$BENCH_DIR/out-axsave"
    measure "axsave (1 process)" -- "$bin" --source "$ckpt" --output "$BENCH_DIR/out-axsave" --quiet
    fresh "$BENCH_DIR/out-torch"
    measure "torch DCP merge + save_file" -- "$PYTHON" scripts/bench/torch_merge.py "$ckpt" "$BENCH_DIR/out-torch/model.safetensors"
  done
  report "$results" "one process"
  echo "axsave vs torch output: $(same "$BENCH_DIR/out-axsave/model.safetensors" "$BENCH_DIR/out-torch/model.safetensors")"
fi

if [ "$what" = multi ] || [ "$what" = all ]; then
  # Node-local view: rank r's directory holds only __r_*.distcp (hard links), rank 0's the metadata.
  nl=$BENCH_DIR/node-local
  if [ ! -d "$nl/rank3" ]; then
    for r in 0 1 2 3; do mkdir -p "$nl/rank$r"; ln -f "$ckpt"/__${r}_*.distcp "$nl/rank$r/"; done
    ln -f "$ckpt/.metadata" "$nl/rank0/"
  fi
  results=$BENCH_DIR/multi.jsonl; : > "$results"
  for i in $(seq "$RUNS"); do
    echo "==> 4 ranks, run $i of $RUNS"
    floors
    rm -rf "$BENCH_DIR/out-gather"
    measure "axsave, 4 ranks, gather, node-local sources (TCP)" -- "$bin" launch -n 4 -- --source "$nl/rank{rank}" --output "$BENCH_DIR/out-gather" --quiet
    if [ ${#features[@]} -gt 0 ]; then
      rm -rf "$BENCH_DIR/out-gather-mpi"
      measure "axsave, 4 ranks, gather, node-local sources (MPI)" -- env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun --oversubscribe -n 4 "$bin" --source "$nl/rank{rank}" --output "$BENCH_DIR/out-gather-mpi" --quiet
    fi
    rm -rf "$BENCH_DIR/out-sharded"
    measure "axsave, 4 ranks, sharded, shared source" -- "$bin" launch -n 4 -- --source "$ckpt" --output "$BENCH_DIR/out-sharded" --mode sharded --quiet
    fresh "$BENCH_DIR/out-classic"
    measure "classic gather: torchrun 4 gloo ranks, full_tensor(), rank 0 save_file" -- "$PYTHON" -m torch.distributed.run --nproc-per-node 4 --master-port 29571 scripts/bench/classic_gather.py "$ckpt" "$BENCH_DIR/out-classic/model.safetensors"
  done
  report "$results" "4 ranks"
  echo "axsave gather vs classic gather output: $(same "$BENCH_DIR/out-gather/model.safetensors" "$BENCH_DIR/out-classic/model.safetensors")"
fi

if [ "$what" = merge ] || [ "$what" = all ]; then
  MERGE_LAYERS=${MERGE_LAYERS:-22}
  lm=$BENCH_DIR/lora-l${MERGE_LAYERS}
  if [ ! -f "$lm/adapter/adapter_model.safetensors" ]; then
    echo "==> writing the merge benchmark's base and adapter ($MERGE_LAYERS layers, hidden 2048)"
    rm -rf "$lm"
    "$PYTHON" scripts/bench/make_lora.py "$lm" --layers "$MERGE_LAYERS"
  fi
  bytes=$(stat -c %s "$lm/base/model.safetensors")
  cat "$lm/base/model.safetensors" > /dev/null
  results=$BENCH_DIR/merge.jsonl; : > "$results"
  for i in $(seq "$RUNS"); do
    echo "==> merge-lora, run $i of $RUNS"
    fresh "$BENCH_DIR/out-cat"
    measure "floor: cat" -- sh -c "cat $lm/base/model.safetensors > $BENCH_DIR/out-cat/all.bin"
    fresh "$BENCH_DIR/out-cat"
    measure "floor: cat + fsync" -- sh -c "cat $lm/base/model.safetensors > $BENCH_DIR/out-cat/all.bin && sync $BENCH_DIR/out-cat/all.bin"
    rm -rf "$BENCH_DIR/out-cat" "$BENCH_DIR/out-merge-axsave"
    measure "axsave merge-lora" -- "$bin" merge-lora --base "$lm/base" --adapter "$lm/adapter" --output "$BENCH_DIR/out-merge-axsave"
    fresh "$BENCH_DIR/out-merge-peft"
    measure "PEFT merge_and_unload + save_pretrained" -- "$PYTHON" scripts/bench/peft_merge.py "$lm/base" "$lm/adapter" "$BENCH_DIR/out-merge-peft"
  done
  report "$results" "merge-lora"
  echo "axsave vs PEFT: $("$PYTHON" scripts/bench/compare_merged.py "$BENCH_DIR/out-merge-axsave" "$BENCH_DIR/out-merge-peft")"
fi
