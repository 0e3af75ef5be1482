#!/usr/bin/env bash
# Benchmarks axsave against the floor (copying the same bytes with cat) and the peers (torch's
# own consolidation) in one run, on the same data.
#
#   PYTHON=/path/to/venv/bin/python scripts/bench.sh [single|multi|merge|disk|all]
#
# single: one process: axsave vs `cat` vs torch's DCP merge + save_file (what
#         `accelerate merge-weights` does).
# multi:  4 ranks, gather mode, node-local sources (each rank's directory names only its own
#         .distcp) vs the classic gather: torchrun with 4 gloo ranks loading their DTensor
#         shards with DCP, full_tensor() on each, rank 0 save_file (FSDP's FULL_STATE_DICT path
#         on CPU). On one machine rank 0 can open the others' files and reads them itself; the
#         transport rows use a second build with the test hook AXSAVE_TEST_OWN_FILES_ONLY=1 so
#         three quarters of the bytes cross TCP (and MPI, when Open MPI is installed; axsave is
#         then built with --features mpi), as between nodes. Plus axsave's sharded mode.
# merge:  merge-lora of a generated bf16 Llama base (MERGE_LAYERS, default 22 layers of hidden
#         2048: 2.6 GB) and a rank-16 adapter on every projection: axsave merge-lora vs PEFT's
#         from_pretrained + merge_and_unload() + save_pretrained (needs peft and transformers),
#         and the outputs compared element by element.
# disk:   the CPU path at the disk's limit: one axsave process (gather mode) saving a generated
#         fp32 checkpoint (DISK_LAYERS, default 10 layers of DISK_HIDDEN 2048: 3.2 GB, 4 ranks)
#         as it is and with --dtype bf16, beside dd writing the same bytes on the output's
#         filesystem: one stream and eight parallel streams, each with oflag=direct and
#         buffered + conv=fsync, and dd copying the checkpoint's own .distcp files (two
#         streams each, oflag=direct: the bytes a keep save reads and writes, without its
#         work); every row's GB/s and the save's output GB/s as a fraction of the best
#         parallel-writer figure and of that copy; axsave both with its direct-I/O writers (the
#         default) and with AXSAVE_WRITERS=0 (everything through the page cache). BEFORE_BIN=
#         /path/to/older/axsave adds its rows, so a change is measured before and after in the
#         same run.
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
if [ "$what" != merge ] && [ "$what" != disk ]; then
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
[ "$what" = merge ] || [ "$what" = disk ] || cat "$ckpt"/*.distcp > /dev/null

report() {  # report RESULTS TITLE
  "$PYTHON" scripts/bench/report.py floors "$1" "$bytes" "$2"
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
  # On one machine a rank can open the paths the others name, so rank 0 reads every file itself
  # and nothing crosses the transport (as on a real node). To time the transport as between
  # nodes, a second build with the test hook AXSAVE_TEST_OWN_FILES_ONLY=1 keeps each rank to its
  # own files.
  echo "==> building the transport rows' binary (test hooks on)"
  cargo build --release --quiet "${features[@]}" --features fault-injection --target-dir target/bench-hooks
  hooks=$PWD/target/bench-hooks/release/axsave
  results=$BENCH_DIR/multi.jsonl; : > "$results"
  for i in $(seq "$RUNS"); do
    echo "==> 4 ranks, run $i of $RUNS"
    floors
    rm -rf "$BENCH_DIR/out-gather"
    measure "axsave, 4 ranks, gather, node-local sources (one node: rank 0 reads them)" -- "$bin" launch -n 4 -- --source "$nl/rank{rank}" --output "$BENCH_DIR/out-gather" --quiet
    rm -rf "$BENCH_DIR/out-gather-tcp"
    measure "axsave, 4 ranks, gather, node-local sources, 3/4 over TCP" -- env AXSAVE_TEST_OWN_FILES_ONLY=1 "$hooks" launch -n 4 -- --source "$nl/rank{rank}" --output "$BENCH_DIR/out-gather-tcp" --quiet
    if [ ${#features[@]} -gt 0 ]; then
      rm -rf "$BENCH_DIR/out-gather-mpi"
      measure "axsave, 4 ranks, gather, node-local sources, 3/4 over MPI" -- env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun --oversubscribe -x AXSAVE_TEST_OWN_FILES_ONLY=1 -n 4 "$hooks" --source "$nl/rank{rank}" --output "$BENCH_DIR/out-gather-mpi" --quiet
    fi
    rm -rf "$BENCH_DIR/out-sharded"
    measure "axsave, 4 ranks, sharded, shared source" -- "$bin" launch -n 4 -- --source "$ckpt" --output "$BENCH_DIR/out-sharded" --mode sharded --quiet
    fresh "$BENCH_DIR/out-classic"
    measure "classic gather: torchrun 4 gloo ranks, full_tensor(), rank 0 save_file" -- "$PYTHON" -m torch.distributed.run --nproc-per-node 4 --master-port 29571 scripts/bench/classic_gather.py "$ckpt" "$BENCH_DIR/out-classic/model.safetensors"
  done
  report "$results" "4 ranks"
  echo "axsave gather vs classic gather output: $(same "$BENCH_DIR/out-gather/model.safetensors" "$BENCH_DIR/out-classic/model.safetensors")"
  echo "axsave gather over TCP vs classic gather output: $(same "$BENCH_DIR/out-gather-tcp/model.safetensors" "$BENCH_DIR/out-classic/model.safetensors")"
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

if [ "$what" = disk ] || [ "$what" = all ]; then
  DISK_LAYERS=${DISK_LAYERS:-10}
  DISK_HIDDEN=${DISK_HIDDEN:-2048}
  dk=$BENCH_DIR/ckpt-fp32-l${DISK_LAYERS}-h${DISK_HIDDEN}
  if [ ! -f "$dk/.metadata" ]; then
    echo "==> writing the disk benchmark's fp32 checkpoint ($DISK_LAYERS layers, hidden $DISK_HIDDEN, 4 ranks)"
    rm -rf "$dk"
    "$PYTHON" scripts/bench/make_large_checkpoint.py "$dk" --layers "$DISK_LAYERS" --hidden "$DISK_HIDDEN" --ranks 4 --dtype fp32
  fi
  cat "$dk"/*.distcp > /dev/null
  echo "==> output filesystem: $(df -T "$BENCH_DIR" | awk 'NR==2 {print $2 " on " $1}')"
  # AXSAVE_WRITERS=0 writes everything through the page cache, as axsave did before its
  # direct-I/O writers: the same binary, before and after.
  bins=("axsave, page cache only (AXSAVE_WRITERS=0)|env AXSAVE_WRITERS=0 $bin" "axsave|$bin")
  [ -n "${BEFORE_BIN:-}" ] && bins=("axsave before|$BEFORE_BIN" "${bins[@]}")
  # How many bytes each save writes (its .safetensors files): a first, untimed save of each.
  sizes=$BENCH_DIR/disk-bytes.tsv; : > "$sizes"
  for dt in keep bf16; do
    rm -rf "$BENCH_DIR/out-disk"
    if [ $dt = keep ]; then "$bin" --source "$dk" --output "$BENCH_DIR/out-disk" --mode gather --quiet
    else "$bin" --source "$dk" --output "$BENCH_DIR/out-disk" --mode gather --dtype bf16 --quiet; fi
    echo "$dt $(du -cb "$BENCH_DIR/out-disk"/*.safetensors | tail -1 | cut -f1)" >> "$sizes"
  done
  echo "source $(du -cb "$dk"/*.distcp | tail -1 | cut -f1)" >> "$sizes"
  keep_bytes=$(awk '$1 == "keep" {print $2}' "$sizes")
  mib8=$((8 << 20))
  n1=$(( (keep_bytes + mib8 / 2) / mib8 ))         # one stream: 8 MiB blocks
  n8=$(( (keep_bytes + mib8 * 4) / (mib8 * 8) ))   # each of eight streams
  # The dd commands (for sh -c): one stream, and eight streams of an eighth each.
  dd1() { echo "dd if=/dev/zero of=$BENCH_DIR/out-dd/s0 bs=8M count=$n1 $1 status=none"; }
  dd8() { echo "p=; for i in 0 1 2 3 4 5 6 7; do dd if=/dev/zero of=$BENCH_DIR/out-dd/s\$i bs=8M count=$n8 $1 status=none & p=\"\$p \$!\"; done; for i in \$p; do wait \$i || exit 1; done"; }
  # The same with the checkpoint's own bytes: each .distcp copied in two halves, all at once
  # (8 streams for the 4-rank checkpoint): what a keep save reads and writes, without its work.
  ddsrc() {
    local f half p=""
    for f in "$dk"/*.distcp; do
      half=$(( $(stat -c %s "$f") / 2 / mib8 + 1 ))
      p="$p dd if=$f of=$BENCH_DIR/out-dd/$(basename "$f").0 bs=8M count=$half $1 status=none & p=\"\$p \$!\";"
      p="$p dd if=$f of=$BENCH_DIR/out-dd/$(basename "$f").1 bs=8M skip=$half $1 status=none & p=\"\$p \$!\";"
    done
    echo "p=; $p for i in \$p; do wait \$i || exit 1; done"
  }
  results=$BENCH_DIR/disk.jsonl; : > "$results"
  for i in $(seq "$RUNS"); do
    echo "==> disk, run $i of $RUNS"
    for row in "1 stream, oflag=direct|dd1 oflag=direct" "1 stream, buffered + conv=fsync|dd1 conv=fsync" \
               "8 streams, oflag=direct|dd8 oflag=direct" "8 streams, buffered + conv=fsync|dd8 conv=fsync" \
               "the checkpoint's files, 2 streams each, oflag=direct|ddsrc oflag=direct"; do
      fresh "$BENCH_DIR/out-dd"
      measure "dd, ${row%%|*}" -- sh -c "$(${row#*|})"
    done
    rm -rf "$BENCH_DIR/out-dd"
    for dt in keep bf16; do
      for b in "${bins[@]}"; do
        rm -rf "$BENCH_DIR/out-disk"
        extra=(); [ $dt = bf16 ] && extra=(--dtype bf16)
        # shellcheck disable=SC2086 # the command is words (env VAR=0 binary)
        measure "${b%%|*}, 1 process, $dt" -- ${b#*|} --source "$dk" --output "$BENCH_DIR/out-disk" --mode gather --quiet "${extra[@]}"
      done
    done
  done
  rm -rf "$BENCH_DIR/out-disk"
  "$PYTHON" scripts/bench/report.py disk "$results" "$sizes" "$((n1 * mib8))" "$((8 * n8 * mib8))"
fi
