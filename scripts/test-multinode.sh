#!/usr/bin/env bash
# Runs axsave across "nodes" on one machine: two network namespaces joined by veth links to a
# bridge in a third namespace (the switch), each node with its own address (10.77.0.1 and
# 10.77.0.2), host name (axmn-node0, axmn-node1: a UTS namespace), /etc/hosts (a mount
# namespace) and node-local checkpoint directory. Nothing is configured outside the namespaces
# this script creates, and no packet leaves them: the nodes have no route anywhere else.
#
# Each node's /etc/hosts maps its own name to 127.0.1.1, as Debian's installer writes it, and
# each node has a `docker0` with Docker's 172.17.0.1/16: an address rank 0 must not publish.
#
# The checkpoint is tests/fixtures/dcp/fsdp_w4 (4 ranks) split over 2 nodes x 2 ranks: on every
# node `$RUN/scratch/rank{local_rank}` holds only the shards that rank wrote (and rank 0 the
# metadata), the same path with different contents per node, as node-local disks are. The
# output directory is on the shared root filesystem.
#
# Runs: environment ranks (RANK/WORLD_SIZE/MASTER_ADDR/... per process, as `axsave launch` or a
# hand-written job sets them) with MASTER_ADDR as a host name and as an address, gather and
# sharded; mpirun across the nodes (Open MPI's rsh agent is a script that enters the node),
# with MASTER_ADDR and without it (PMIx tells the ranks where rank 0 is); torchrun --nnodes 2
# with a c10d rendezvous on node 0's address (needs AXSAVE_TEST_PYTHON, a python with torch);
# and faults: node 1's link goes down while it copies, under environment ranks, mpirun and srun
# (every rank must fail within --timeout and the time to notice, nothing final-named left); and,
# where Slurm is installed, `srun -N 2` on a two-node Slurm
# (slurmctld on node 0, a slurmd in each node; munged outside). Prints a PASS/FAIL matrix and
# `N passed, N failed`.
#
#   scripts/test-multinode.sh          # as root; skips (exit 0) saying why where it cannot run
#   scripts/test-multinode.sh --keep   # leaves $RUN (logs, outputs) behind
#
# Environment:
#   AXSAVE_BIN          the axsave binary, built without the `mpi` feature (an MPI build would
#                       bootstrap through MPI, not PMIx) with the `fault-injection` feature; default:
#                       `cargo build --features fault-injection`, target/debug/axsave
#   AXSAVE_MPI_BIN      an axsave built with `--features mpi`, for mpirun runs over MPI (skipped
#                       without it)
#   AXSAVE_TEST_PYTHON  a python with torch, for the torchrun runs (skipped without it)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
repo=$(pwd)

keep=0
[ "${1:-}" = --keep ] && keep=1

skip() {
  echo "==> skipping the multi-node tests: $*"
  exit 0
}
[ "$(id -u)" = 0 ] || skip "scripts/test-multinode.sh must run as root (it creates network namespaces)"
command -v ip >/dev/null || skip "no \`ip\` command (iproute2)"
command -v unshare >/dev/null || skip "no \`unshare\` command (util-linux)"
pfx="axmn$$"
ip netns add "$pfx-probe" 2>/dev/null || skip "\`ip netns add\` fails here (no CAP_SYS_ADMIN or no network namespaces)"
ip netns del "$pfx-probe"

if [ -z "${AXSAVE_BIN:-}" ]; then
  # The link-down rows stall a rank at a fault hook (AXSAVE_FAULT), which exists only in builds
  # with the `fault-injection` feature (cargo test turns it on; a plain or release build has none).
  echo "==> cargo build --features fault-injection"
  cargo build --quiet --features fault-injection || exit 1
  AXSAVE_BIN=$repo/target/debug/axsave
fi
AXSAVE_BIN=$(realpath "$AXSAVE_BIN")
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

RUN=$(mktemp -d /tmp/axsave-multinode.XXXXXX)
nodes=2
sw="$pfx-sw"
cleanup() {
  declare -F slurm_stop >/dev/null && slurm_stop
  for i in $(seq 0 $((nodes - 1))); do ip netns del "$pfx-n$i" 2>/dev/null; done
  ip netns del "$sw" 2>/dev/null
  if [ "$keep" = 1 ]; then echo "kept $RUN"; else rm -rf "$RUN"; fi
}
trap cleanup EXIT

# --- the nodes ------------------------------------------------------------------------------
ip netns add "$sw"
ip -n "$sw" link set lo up
ip -n "$sw" link add br0 type bridge
ip -n "$sw" link set br0 up
mkdir -p "$RUN/scratch"
{
  echo "127.0.0.1 localhost"
  echo "::1 localhost ip6-localhost ip6-loopback"
} >"$RUN/hosts.common"
for i in $(seq 0 $((nodes - 1))); do
  ns="$pfx-n$i"
  ip netns add "$ns"
  ip -n "$sw" link add "p$i" type veth peer name eth0 netns "$ns"
  ip -n "$sw" link set "p$i" master br0 up
  ip -n "$ns" link set lo up
  ip -n "$ns" addr add "10.77.0.$((i + 1))/24" dev eth0
  ip -n "$ns" link set eth0 up
  # A decoy: Docker's bridge address, the same on every node.
  ip -n "$ns" link add docker0 type bridge
  ip -n "$ns" addr add 172.17.0.1/16 dev docker0
  ip -n "$ns" link set docker0 up
  {
    cat "$RUN/hosts.common"
    echo "127.0.1.1 axmn-node$i"
    for j in $(seq 0 $((nodes - 1))); do
      [ "$j" = "$i" ] || echo "10.77.0.$((j + 1)) axmn-node$j"
    done
  } >"$RUN/hosts$i"
  mkdir -p "$RUN/node$i"
done

# `node I CMD...` runs CMD on node I: its network, its host name, its /etc/hosts, its scratch.
# (nsenter rather than `ip netns exec`, which remounts /sys and so hides /sys/fs/cgroup from
# slurmd.)
cat >"$RUN/node" <<EOF
#!/bin/sh
i=\$1; shift
exec nsenter --net="/run/netns/$pfx-n\$i" unshare --uts --mount sh -c '
  hostname "axmn-node\$0" && mount --bind "$RUN/hosts\$0" /etc/hosts &&
  mount --bind "$RUN/node\$0" "$RUN/scratch" && exec "\$@"' "\$i" "\$@"
EOF
chmod +x "$RUN/node"
node() { "$RUN/node" "$@"; }

# Open MPI's rsh agent: `rsh [options] HOST COMMAND...` runs COMMAND (a shell command line) on
# the node named HOST.
cat >"$RUN/rsh" <<EOF
#!/bin/sh
while [ \$# -gt 0 ]; do case "\$1" in -*) shift ;; *) break ;; esac; done
host=\$1; shift
case "\$host" in
  axmn-node*) i=\${host#axmn-node} ;;
  10.77.0.*) i=\$((\${host#10.77.0.} - 1)) ;;
  *) echo "rsh agent: unknown node \$host" >&2; exit 255 ;;
esac
exec "$RUN/node" "\$i" sh -c "\$*"
EOF
chmod +x "$RUN/rsh"
printf 'axmn-node0 slots=2\naxmn-node1 slots=2\n' >"$RUN/hostfile"

# Reachability without ping: a connection to a closed port of node 0 is refused at once (a reset
# came back) when the bridge works, and fails otherwise.
linked() {
  local said
  said=$(node 1 timeout 5 bash -c 'exec 3<>/dev/tcp/10.77.0.1/9' 2>&1)
  [[ "$said" == *"Connection refused"* ]]
}
wait_linked() { for _ in $(seq 20); do linked && return 0; sleep 0.5; done; return 1; }
if ! wait_linked; then
  echo "FAIL: node 1 cannot reach node 0 over the bridge" >&2
  exit 1
fi
for i in $(seq 0 $((nodes - 1))); do
  got=$(node "$i" hostname)
  [ "$got" = "axmn-node$i" ] || { echo "FAIL: node $i is named $got" >&2; exit 1; }
done

# The checkpoint, split by writer over 2 nodes x 2 ranks: global rank r = 2 * node + local.
fixture=$repo/tests/fixtures/dcp/fsdp_w4
for r in 0 1 2 3; do
  d="$RUN/node$((r / 2))/rank$((r % 2))"
  mkdir -p "$d"
  cp "$fixture/checkpoint/__${r}_0.distcp" "$d/"
done
cp "$fixture/checkpoint/.metadata" "$RUN/node0/rank0/"
source_arg="$RUN/scratch/rank{local_rank}"

# --- checks ----------------------------------------------------------------------------------
declare -a matrix=()
passed=0
failed=0
record() { # record LAUNCHER MODE FAULT OK DETAIL
  local verdict=PASS
  if [ "$4" = 1 ]; then passed=$((passed + 1)); else verdict=FAIL; failed=$((failed + 1)); fi
  matrix+=("$(printf '%-4s  %-24s %-8s %-22s %s' "$verdict" "$1" "$2" "$3" "$5")")
  echo "--- $verdict: $1 / $2 / $3${5:+: $5}"
}

why=""
# The output of a successful save holds exactly the reference's tensors (gather: the very bytes).
check_output() { # check_output OUT MODE [RANKS]
  local out=$1 mode=$2 ranks=${3:-4}
  if [ "$mode" = gather ]; then
    cmp -s "$out/model.safetensors" "$fixture/reference.safetensors" ||
      { why="model.safetensors differs from the reference"; return 1; }
  else
    local shards
    shards=$(find "$out" -maxdepth 1 -name 'model-*.safetensors' | wc -l)
    [ "$shards" -ge "$ranks" ] || { why="$shards shards, expected at least $ranks"; return 1; }
    [ -f "$out/model.safetensors.index.json" ] || { why="no index"; return 1; }
    "$AXSAVE_BIN" verify --source "$fixture/checkpoint" --output "$out" >"$out.verify" 2>&1 ||
      { why="verify: $(tail -1 "$out.verify")"; return 1; }
  fi
  if find "$out" -name '*axsave*' | grep -q .; then
    why="temporaries left: $(find "$out" -name '*axsave*' | head -3 | xargs)"
    return 1
  fi
  return 0
}

# What every rank published (RUST_LOG=info,axsave_core=debug): only node addresses, never a loopback
# address or the decoy.
check_published() { # check_published LOGS...
  local a
  a=$(grep -ho 'peers reach this rank at [][0-9a-f.:]*' "$@" | awk '{print $NF}' | sort -u | xargs)
  [ -n "$a" ] || { why="no rank said where peers reach it"; return 1; }
  for x in $a; do
    case "$x" in
      10.77.0.*) ;;
      *) why="published $x"; return 1 ;;
    esac
  done
  return 0
}

# Where rank 0's store listens (RUST_LOG=...axsave_core=debug): on MASTER_ADDR itself when it is
# an address; on every interface for a name that means loopback here but not elsewhere.
check_store() { # check_store RANK0_LOG MASTER
  local want
  case "$2" in
    axmn-*) want="[::]:" ;;
    *) want="$2:" ;;
  esac
  grep -qF "store listens addrs=[$want" "$1" && return 0
  why="store: $(grep -ho 'store listens addrs=.*' "$1" | head -1), expected $want"
  return 1
}

# How rank 0 says the bytes went: the two nodes' ranks send across nodes by $2 (tcp or mpi;
# no GPU here), and the log names the class, the way and why.
check_route() { # check_route RANK0_LOG PATH
  grep -qE "cross_node [0-9.]+ [KMGT]?B by $2 \(" "$1" && return 0
  why="rank 0 does not say cross-node bytes went by $2: $(grep -ho '[a-z_]*_node .* by .*' "$1" | head -2 | xargs)"
  return 1
}

port=29600
next_port() { port=$((port + 1)); }

# How long after a link goes down every rank must have failed, with --timeout 5: a rank cut off
# from the store notices within 5 s (a blocked heartbeat), then waits up to 5 s for the failure's
# reason and up to 5 s more for its last connection (measured: at most 16 s); 25 s leaves room for
# a loaded machine.
limit=25

# env_run NAME MODE MASTER [ENV...]: 4 environment ranks, 2 per node; waits for all; sets
# rcs (exit codes) and secs (seconds until the last exited).
env_run() {
  local name=$1 mode=$2 master=$3
  shift 3
  local out="$RUN/out-$name"
  mkdir -p "$out"
  next_port
  local t0 pids=()
  t0=$(date +%s.%N)
  for r in 0 1 2 3; do
    (
      node $((r / 2)) env RANK=$r WORLD_SIZE=4 LOCAL_RANK=$((r % 2)) LOCAL_WORLD_SIZE=2 \
        MASTER_ADDR="$master" MASTER_PORT=$port RUST_LOG=info,axsave_core=debug "$@" \
        timeout -k 5 120 "$AXSAVE_BIN" --source "$source_arg" --output "$out" --mode "$mode" \
        --transport tcp --timeout 5 --rendezvous-timeout 30 >"$RUN/$name.$r.log" 2>&1
      echo $? >"$RUN/$name.$r.rc"
    ) &
    pids+=($!)
  done
  wait "${pids[@]}"
  secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  rcs=$(for r in 0 1 2 3; do cat "$RUN/$name.$r.rc"; done | xargs)
}

all_zero() { [ "$rcs" = "0 0 0 0" ]; }
show_logs() { # show_logs NAME: the last lines of each rank's log, for a failure
  for f in "$RUN/$1".*.log; do
    [ -f "$f" ] || continue
    echo "    $(basename "$f"):"
    { grep -E "ERROR|WARN|panicked" "$f" | head -8; tail -4 "$f"; } | sed 's/^/      /'
  done
}

# --- environment ranks ------------------------------------------------------------------------
for master in axmn-node0 10.77.0.1; do
  for mode in gather sharded; do
    name="env-$mode-${master//./_}"
    env_run "$name" "$mode" "$master"
    ok=0
    why="exit codes $rcs"
    if all_zero && check_output "$RUN/out-$name" "$mode" && check_published "$RUN/$name".*.log &&
      check_store "$RUN/$name.0.log" "$master" && check_route "$RUN/$name.0.log" tcp; then ok=1; why=""; fi
    record "env (MASTER_ADDR=$master)" "$mode" none "$ok" "${why:-${secs}s}"
    [ "$ok" = 1 ] || show_logs "$name"
  done
done

# MASTER_ADDR=127.0.0.1, two ranks on node 0 that each see half the shards: the store and the
# data listener stay on loopback. Ranks of one node would open each other's directories and send
# nothing; the test hook AXSAVE_TEST_OWN_FILES_ONLY (this fault-injection build) keeps each to its
# own, so pieces cross.
name=env-loopback
mkdir -p "$RUN/out-$name" "$RUN/loop/rank0" "$RUN/loop/rank1"
cp "$fixture/checkpoint/.metadata" "$fixture/checkpoint/__0_0.distcp" "$fixture/checkpoint/__2_0.distcp" "$RUN/loop/rank0/"
cp "$fixture/checkpoint/__1_0.distcp" "$fixture/checkpoint/__3_0.distcp" "$RUN/loop/rank1/"
next_port
pids=()
for r in 0 1; do
  (
    node 0 env RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r LOCAL_WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 \
      AXSAVE_TEST_OWN_FILES_ONLY=1 MASTER_PORT=$port RUST_LOG=info,axsave_core=debug timeout -k 5 120 "$AXSAVE_BIN" \
      --source "$RUN/loop/rank{rank}" --output "$RUN/out-$name" --mode gather --transport tcp \
      --timeout 5 >"$RUN/$name.$r.log" 2>&1
    echo $? >"$RUN/$name.$r.rc"
  ) &
  pids+=($!)
done
wait "${pids[@]}"
rcs=$(cat "$RUN/$name.0.rc" "$RUN/$name.1.rc" | xargs)
ok=0
why="exit codes $rcs"
if [ "$rcs" = "0 0" ] && check_output "$RUN/out-$name" gather && check_store "$RUN/$name.0.log" 127.0.0.1; then
  bound=$(grep -ho 'peers reach this rank at [][0-9a-f.:]*' "$RUN/$name".*.log | awk '{print $NF}' | sed 's/:[0-9]*$//' | sort -u | xargs)
  if [ "$bound" = 127.0.0.1 ]; then ok=1; why=""; else why="data listeners on $bound"; fi
fi
record "env (MASTER_ADDR=127.0.0.1, 1 node)" gather "loopback only" "$ok" "${why:-store and listeners on 127.0.0.1}"
[ "$ok" = 1 ] || show_logs "$name"

# --- a link goes down mid-save ---------------------------------------------------------------
# Rank 2 (node 1) stalls at its first piece; node 1's link goes down (the switch's port: no
# error on node 1, its packets are lost); rank 2 is released. Every
# rank must exit non-zero within --timeout (5 s) plus the time to notice, with nothing
# final-named in the output directory and no temporaries of rank 0's.
link_down() { # link_down MODE
  local mode=$1
  local name="env-$mode-linkdown"
  local stalled="$RUN/$name.stalled"
  local release="$RUN/$name.release"
  (
    while [ ! -f "$stalled" ]; do sleep 0.05; done
    ip -n "$sw" link set p1 down
    date +%s.%N >"$RUN/$name.down"
    touch "$release"
  ) &
  local watcher=$!
  env_run "$name" "$mode" axmn-node0 AXSAVE_FAULT=copying@2 AXSAVE_FAULT_FILE="$stalled" \
    AXSAVE_FAULT_RELEASE="$release"
  kill "$watcher" 2>/dev/null
  wait "$watcher" 2>/dev/null
  ip -n "$sw" link set p1 up
  wait_linked
  local ok=1 after=""
  why=""
  if [ ! -f "$RUN/$name.down" ]; then
    ok=0
    why="rank 2 never reached its first piece (exit codes $rcs)"
  else
    after=$(awk -v a="$(cat "$RUN/$name.down")" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    for rc in $rcs; do [ "$rc" != 0 ] || { ok=0; why="a rank exited 0 (exit codes $rcs)"; }; done
    for rc in $rcs; do
      if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then ok=0; why="a rank hung until killed (exit codes $rcs)"; fi
    done
    awk -v s="$after" -v l="$limit" 'BEGIN { exit !(s <= l) }' || { ok=0; why="ranks took ${after}s after the link went down"; }
    local final
    final=$(find "$RUN/out-$name" -maxdepth 1 \( -name 'model*.safetensors' -o -name 'model.safetensors.index.json' \) -printf '%f ')
    [ -z "$final" ] || { ok=0; why="final-named files left: $final"; }
    # No temporaries either: the output directory is shared, so whichever rank made them, the
    # ranks that can still see it remove them.
    local tmp
    tmp=$(find "$RUN/out-$name" -name '*axsave*' -printf '%f ')
    [ -z "$tmp" ] || { ok=0; why="temporaries left: $tmp"; }
  fi
  record "env (MASTER_ADDR=axmn-node0)" "$mode" "link down on node 1" "$ok" \
    "${why:-exit codes $rcs, all within ${after}s}"
  [ "$ok" = 1 ] || show_logs "$name"
}
link_down gather
link_down sharded

# --- a link goes down under a launcher ---------------------------------------------------------
# The ranks run through `own-stderr`, which records each rank's process id and sends its stderr
# to a file of its own (the launcher, cut off from node 1, may not forward it).
cat >"$RUN/own-stderr" <<'EOW'
#!/bin/sh
r=${OMPI_COMM_WORLD_RANK:-${SLURM_PROCID:-x}}
echo $$ >"$AXSAVE_STDERR_PREFIX.$r.pid"
exec "$@" 2>"$AXSAVE_STDERR_PREFIX.$r.err"
EOW
chmod +x "$RUN/own-stderr"

# watch_link_down NAME: in the background, once rank 2 stalls at its first piece, takes node 1's
# link down, releases rank 2 and notes when each rank's process ends.
watch_link_down() {
  local name=$1
  (
    while [ ! -f "$RUN/$name.stalled" ]; do sleep 0.05; done
    ip -n "$sw" link set p1 down
    date +%s.%N >"$RUN/$name.down"
    touch "$RUN/$name.release"
    for r in 0 1 2 3; do
      (
        pid=$(cat "$RUN/$name.rank.$r.pid")
        # The ranks are this script's own, started through the launcher.
        while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
        date +%s >"$RUN/$name.rank.$r.gone"
      ) &
    done
    wait
  ) &
  watcher=$!
}

# judge_link_down NAME LAUNCHER LABEL: within $limit s of the link going down every rank must have
# ended, node 1's having printed their error; node 0's may instead have been ended by the
# launcher, which aborts the job when the first rank exits non-zero (rank 0 lingers up to 5 s for
# its peers to leave the store before it prints its error). Nothing final-named may be left.
judge_link_down() {
  local name=$1 launcher=$2 label=$3
  kill "$watcher" 2>/dev/null
  wait "$watcher" 2>/dev/null
  ip -n "$sw" link set p1 up
  wait_linked
  local ok=1 late="" said="" r t f final down
  why=""
  if [ ! -f "$RUN/$name.down" ]; then
    ok=0
    why="rank 2 never reached its first piece (exit code $rc)"
  else
    down=$(cut -d. -f1 "$RUN/$name.down")
    for r in 0 1 2 3; do
      f="$RUN/$name.rank.$r.err"
      if [ ! -f "$RUN/$name.rank.$r.gone" ]; then ok=0; why="rank $r still ran when $launcher ended"; continue; fi
      t=$(($(cat "$RUN/$name.rank.$r.gone") - down))
      if grep -q ERROR "$f" 2>/dev/null; then
        late="$late $t"
      elif [ "$r" -lt 2 ]; then
        late="$late ${t}(ended by $launcher)"
      else
        ok=0
        why="rank $r printed no error"
      fi
      [ "$t" -le "$limit" ] || { ok=0; why="rank $r ended ${t}s after the link went down"; }
    done
    [ "$rc" != 0 ] || { ok=0; why="$launcher exited 0"; }
    said="exit $rc after ${secs}s"
    [ "$rc" != 124 ] && [ "$rc" != 137 ] || said="hung, killed after ${secs}s"
    ! grep -q 'Segmentation fault' "$RUN/$name.0.log" || said="SIGSEGV in PMIx_Finalize, $said"
    final=$(find "$RUN/out-$name" -maxdepth 1 \( -name 'model*.safetensors' -o -name 'model.safetensors.index.json' -o -name '*axsave*' \) -printf '%f ')
    [ -z "$final" ] || { ok=0; why="files left: $final"; }
  fi
  record "$label" gather "link down on node 1" "$ok" "${why:-ranks ended after${late} s; $launcher itself: $said}"
  [ "$ok" = 1 ] || show_logs "$name"
}

# --- mpirun across the nodes ------------------------------------------------------------------
# mpirun runs on node 0 (as a user logged in there would); Open MPI starts its daemon on node 1
# through the rsh agent. `mpi_run NAME MODE [mpirun args...]`
mpi_run() {
  local name=$1 mode=$2
  shift 2
  local out="$RUN/out-$name"
  mkdir -p "$out"
  next_port
  local t0 bin=${MPI_RUN_BIN:-$AXSAVE_BIN} transport=${MPI_RUN_TRANSPORT:-tcp} pre=()
  [ -z "${MPI_RUN_WRAP:-}" ] || pre=("$MPI_RUN_WRAP")
  t0=$(date +%s.%N)
  node 0 timeout -k 5 "${MPI_RUN_LIMIT:-120}" mpirun --hostfile "$RUN/hostfile" -n 4 \
    --mca plm_rsh_agent "$RUN/rsh" --mca oob_tcp_if_include 10.77.0.0/24 \
    --mca btl_tcp_if_include 10.77.0.0/24 -x RUST_LOG=info,axsave=debug,axsave_core=debug "$@" \
    "${pre[@]}" "$bin" --source "$source_arg" --output "$out" --mode "$mode" --transport "$transport" \
    --timeout 5 --rendezvous-timeout 30 >"$RUN/$name.0.log" 2>&1
  rc=$?
  secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
}
if command -v mpirun >/dev/null; then
  for mode in gather sharded; do
    for how in master pmix; do
      name="mpirun-$mode-$how"
      if [ "$how" = master ]; then
        mpi_run "$name" "$mode" -x MASTER_ADDR=axmn-node0 -x MASTER_PORT=$((port + 1))
        label="mpirun (MASTER_ADDR=axmn-node0)"
      else
        mpi_run "$name" "$mode"
        label="mpirun (no MASTER_ADDR: PMIx)"
      fi
      ok=0
      why="exit code $rc"
      if [ "$rc" = 0 ] && check_output "$RUN/out-$name" "$mode" && check_published "$RUN/$name.0.log"; then ok=1; why=""; fi
      # Without MASTER_ADDR every rank learnt rank 0's store from PMIx.
      via=$(grep -c "(from PMIx)" "$RUN/$name.0.log")
      if [ "$how" = pmix ] && [ "$ok" = 1 ] && [ "$via" != 4 ]; then ok=0; why="$via of 4 ranks got the store's address from PMIx"; fi
      record "$label" "$mode" none "$ok" "${why:-${secs}s}"
      [ "$ok" = 1 ] || show_logs "$name"
    done
  done
  # No libpmix and no MASTER_ADDR across nodes: every rank fails at once, saying what to set.
  name=mpirun-nopmix
  mpi_run "$name" gather -x AXSAVE_PMIX_LIBRARY=/nonexistent/libpmix.so.2
  ok=0
  why="exit code $rc"
  if [ "$rc" != 0 ] && grep -q "set MASTER_ADDR" "$RUN/$name.0.log" && grep -q "PMIx" "$RUN/$name.0.log"; then
    ok=1
    why="exit $rc in ${secs}s: $(grep -o 'rank 0.s address cannot come through PMIx[^;]*' "$RUN/$name.0.log" | head -1 | cut -c1-60)..."
  fi
  [ -z "$(find "$RUN/out-$name" -name 'model*')" ] || { ok=0; why="files left"; }
  record "mpirun (no MASTER_ADDR, no libpmix)" gather "clear error" "$ok" "$why"
  [ "$ok" = 1 ] || show_logs "$name"
  # Node 1's link goes down while rank 2 copies (PMIx bootstrap, gather): within $limit s every
  # rank must have failed: printed its error into its own stderr (each rank writes it itself,
  # into the shared directory, since mpirun has lost node 1's daemon), or, on node 0, been ended
  # by mpirun, which aborts the job when the first rank exits non-zero (rank 0 lingers up to
  # 5 s for its peers to leave the store before it prints its error).
  name=mpirun-linkdown
  watch_link_down "$name"
  MPI_RUN_LIMIT=40 MPI_RUN_WRAP="$RUN/own-stderr" mpi_run "$name" gather -x AXSAVE_FAULT=copying@2 \
    -x AXSAVE_FAULT_FILE="$RUN/$name.stalled" -x AXSAVE_FAULT_RELEASE="$RUN/$name.release" \
    -x AXSAVE_STDERR_PREFIX="$RUN/$name.rank"
  judge_link_down "$name" mpirun "mpirun (no MASTER_ADDR: PMIx)"
  # A build with MPI: MPI's broadcast tells the ranks where rank 0's store is (its host name),
  # and MPI carries the pieces between the nodes.
  if [ -n "${AXSAVE_MPI_BIN:-}" ]; then
    for mode in gather sharded; do
      name="mpirun-mpibuild-$mode"
      MPI_RUN_BIN=$(realpath "$AXSAVE_MPI_BIN") MPI_RUN_TRANSPORT=auto mpi_run "$name" "$mode" --mca pml ob1 --mca btl tcp,self
      ok=0
      why="exit code $rc"
      if [ "$rc" = 0 ] && check_output "$RUN/out-$name" "$mode"; then
        if check_route "$RUN/$name.0.log" mpi; then ok=1; why=""; fi
      fi
      record "mpirun, MPI build (no MASTER_ADDR)" "$mode" none "$ok" "${why:-${secs}s}"
      [ "$ok" = 1 ] || show_logs "$name"
    done
  else
    matrix+=("SKIP  mpirun with an MPI build: AXSAVE_MPI_BIN is not set (cargo build --features mpi)")
  fi
else
  matrix+=("SKIP  mpirun: no mpirun on PATH (apt install openmpi-bin)")
fi

# --- torchrun --nnodes 2 ---------------------------------------------------------------------
torchrun_run() { # torchrun_run NAME MODE
  local name=$1 mode=$2
  local out="$RUN/out-$name"
  mkdir -p "$out"
  next_port
  local t0 pids=()
  t0=$(date +%s.%N)
  for i in 0 1; do
    # torch finds out that it hosts the store by matching the endpoint against the addresses its
    # host name resolves to, which is 127.0.1.1 here: say it.
    local host=false
    [ "$i" = 0 ] && host=true
    (
      node "$i" env RUST_LOG=info,axsave_core=debug OMP_NUM_THREADS=1 timeout -k 5 180 \
        "$AXSAVE_TEST_PYTHON" -m torch.distributed.run --nnodes 2 --nproc-per-node 2 \
        --rdzv-backend c10d --rdzv-endpoint "10.77.0.1:$port" --rdzv-id "$name" --rdzv-conf "is_host=$host" \
        --no-python "$AXSAVE_BIN" --source "$source_arg" --output "$out" --mode "$mode" \
        --transport tcp --timeout 5 --rendezvous-timeout 60 >"$RUN/$name.$i.log" 2>&1
      echo $? >"$RUN/$name.$i.rc"
    ) &
    pids+=($!)
  done
  wait "${pids[@]}"
  secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  rcs=$(cat "$RUN/$name.0.rc" "$RUN/$name.1.rc" | xargs)
}
if [ -n "${AXSAVE_TEST_PYTHON:-}" ] && "$AXSAVE_TEST_PYTHON" -c 'import torch' 2>/dev/null; then
  for mode in gather sharded; do
    name="torchrun-$mode"
    torchrun_run "$name" "$mode"
    ok=0
    why="exit codes $rcs"
    if [ "$rcs" = "0 0" ] && check_output "$RUN/out-$name" "$mode" && check_published "$RUN/$name".*.log; then ok=1; why=""; fi
    record "torchrun --nnodes 2 (c10d)" "$mode" none "$ok" "${why:-${secs}s}"
    [ "$ok" = 1 ] || show_logs "$name"
  done
else
  matrix+=("SKIP  torchrun --nnodes 2: AXSAVE_TEST_PYTHON is not set to a python with torch")
fi

# --- Slurm across the nodes -------------------------------------------------------------------
# slurmctld on node 0, a slurmd on each node (each in its node's namespaces, so the tasks it
# starts see that node's scratch), munged outside (its socket is a file, which every namespace
# sees); srun on node 0. MASTER_ADDR is not set: axsave takes the first host of the step's nodes.
slurm_stop() {
  local f pid
  for f in "$RUN"/slurm/run/*.pid; do
    [ -e "$f" ] || continue
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
    rm -f "$f"
  done
}
slurm_section() {
  local b
  export PATH="$PATH:/usr/sbin:/sbin"
  for b in slurmctld slurmd srun sinfo munged; do
    command -v "$b" >/dev/null || {
      matrix+=("SKIP  Slurm across the nodes: $b is not installed (apt install slurmctld slurmd slurm-client munge)")
      return
    }
  done
  local d="$RUN/slurm"
  mkdir -p "$d"/{etc,munge,run,state,log} "$d/spool-axmn-node0" "$d/spool-axmn-node1"
  chmod 700 "$d/munge"
  mungekey --create --keyfile="$d/munge/munge.key" 2>/dev/null ||
    dd if=/dev/urandom of="$d/munge/munge.key" bs=1024 count=1 status=none
  chmod 600 "$d/munge/munge.key"
  conf="$d/etc/slurm.conf"
  cat >"$conf" <<EOC
ClusterName=axsavemn
SlurmctldHost=axmn-node0(10.77.0.1)
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$d/run/munge.socket
StateSaveLocation=$d/state
SlurmdSpoolDir=$d/spool-%n
SlurmctldPidFile=$d/run/slurmctld.pid
SlurmdPidFile=$d/run/slurmd-%n.pid
SlurmctldLogFile=$d/log/slurmctld.log
SlurmdLogFile=$d/log/slurmd-%n.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=300
NodeName=axmn-node0 NodeAddr=10.77.0.1 CPUs=2 State=UNKNOWN
NodeName=axmn-node1 NodeAddr=10.77.0.2 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=axmn-node[0-1] Default=YES MaxTime=30 State=UP OverSubscribe=FORCE
EOC
  munged --force --socket="$d/run/munge.socket" --key-file="$d/munge/munge.key" \
    --pid-file="$d/run/munged.pid" --seed-file="$d/munge/munged.seed" \
    --log-file="$d/log/munged.log" || { matrix+=("SKIP  Slurm across the nodes: munged does not start"); return; }
  node 0 env SLURM_CONF="$conf" slurmctld -f "$conf"
  node 0 env SLURM_CONF="$conf" slurmd -f "$conf" -N axmn-node0
  node 1 env SLURM_CONF="$conf" slurmd -f "$conf" -N axmn-node1
  local state=""
  for _ in $(seq 300); do
    state=$(node 0 env SLURM_CONF="$conf" sinfo -h -o %T 2>/dev/null | sort -u | xargs)
    [ "$state" = idle ] && break
    sleep 0.1
  done
  if [ "$state" != idle ]; then
    record "Slurm (srun -N 2)" - "cluster start" 0 "nodes are '${state:-no answer}' (logs in $d/log)"
    for f in "$d"/log/*.log; do echo "    $f:"; tail -5 "$f" | sed 's/^/      /'; done
    return
  fi
  local mode
  for mode in gather sharded; do
    local name="srun-$mode" out="$RUN/out-srun-$mode"
    mkdir -p "$out"
    local t0
    t0=$(date +%s.%N)
    node 0 env SLURM_CONF="$conf" RUST_LOG=info,axsave_core=debug timeout -k 5 120 \
      srun -N 2 -n 4 --ntasks-per-node 2 "$AXSAVE_BIN" --source "$source_arg" --output "$out" \
      --mode "$mode" --transport tcp --timeout 5 --rendezvous-timeout 30 >"$RUN/$name.0.log" 2>&1
    rc=$?
    secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    ok=0
    why="exit code $rc"
    if [ "$rc" = 0 ] && check_output "$out" "$mode" && check_published "$RUN/$name.0.log" &&
      check_store "$RUN/$name.0.log" axmn-node0; then ok=1; why=""; fi
    record "Slurm (srun -N 2, no MASTER_ADDR)" "$mode" none "$ok" "${why:-${secs}s}"
    [ "$ok" = 1 ] || show_logs "$name"
  done
  local name=srun-linkdown
  mkdir -p "$RUN/out-$name"
  watch_link_down "$name"
  local t0
  t0=$(date +%s.%N)
  node 0 env SLURM_CONF="$conf" RUST_LOG=info,axsave_core=debug AXSAVE_FAULT=copying@2 \
    AXSAVE_FAULT_FILE="$RUN/$name.stalled" AXSAVE_FAULT_RELEASE="$RUN/$name.release" \
    AXSAVE_STDERR_PREFIX="$RUN/$name.rank" timeout -k 5 40 \
    srun -N 2 -n 4 --ntasks-per-node 2 "$RUN/own-stderr" "$AXSAVE_BIN" --source "$source_arg" \
    --output "$RUN/out-$name" --transport tcp --timeout 5 --rendezvous-timeout 30 \
    >"$RUN/$name.0.log" 2>&1
  rc=$?
  secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  judge_link_down "$name" srun "Slurm (srun -N 2, no MASTER_ADDR)"
}
slurm_section
slurm_stop

echo
echo "==> multi-node matrix (launcher x mode x fault), 2 nodes x 2 ranks"
printf '%s\n' "${matrix[@]}"
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
