#!/usr/bin/env bash
# Builds axsave, saves the small 4-rank FSDP checkpoint that ships in tests/fixtures (written by
# torch: a tiny Llama-shaped model, bf16, sharded over 4 ranks) with 4 axsave ranks started by
# `axsave launch` (as torchrun would start them), checks the result byte for byte against the
# reference the safetensors library wrote, and prints a short summary.
# Needs only Rust; no torch.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> building axsave (release)"
cargo build --release --quiet
bin=target/release/axsave

src=tests/fixtures/dcp/demo_w4/checkpoint
ref=tests/fixtures/dcp/demo_w4/reference.safetensors
out=$(mktemp -d "${TMPDIR:-/tmp}/axsave-demo.XXXXXX")
trap 'rm -rf "$out"' EXIT

echo "==> the checkpoint"
"$bin" inspect "$src" | head -n 6

echo "==> saving with 4 ranks"
"$bin" launch -n 4 -- --source "$src" --output "$out"

echo "==> checking"
"$bin" verify --source "$src" --output "$out"
if cmp -s "$out/model.safetensors" "$ref"; then
  echo "model.safetensors is byte-identical to the reference written by safetensors from the unsharded state dict"
else
  echo "MISMATCH: $out/model.safetensors differs from $ref" >&2
  exit 1
fi

echo "==> summary"
ls -l "$out"
sha256sum "$out/model.safetensors"
echo "demo OK"
