#!/usr/bin/env bash
# Runs axsave under a real Slurm: a one-node cluster on localhost (munged, slurmctld, slurmd,
# all as root, with their configuration, state, sockets and logs in a temporary directory), then
# tests/slurm.rs against it (srun -n N gather/sharded, --gpus-per-task, --mpi=pmi2|pmix,
# node-local sources, failing and killed ranks, a batch script without srun, mpirun in a batch
# script and inside a step, and the example jobs in scripts/slurm/), then stops the daemons and
# prints a PASS/FAIL line with counts and times. About 30 s once built.
#
#   scripts/test-slurm.sh            # installs slurmctld, slurmd, slurm-client and munge if missing
#                                    # (Debian/Ubuntu; as root, which slurmd needs anyway)
#   scripts/test-slurm.sh --keep     # leaves the directory (configuration, logs) behind
#
# The mpirun tests need Open MPI (scripts/test.sh installs it) and skip without it; the torchrun
# job needs a torchrun (below) and skips without one.
#
# The node declares 8 CPUs (whatever the machine has; slurmd is told to trust the config) and
# 8 placeholder GPUs (symlinks to /dev/null), so that `srun -n 8` and `--gpus-per-task=1` run on
# a 2-core machine without GPUs. Nothing outside the temporary directory is configured or
# started; /etc/slurm and /etc/munge are left alone.
#
# Environment:
#   AXSAVE_SLURM_PORT     slurmctld's port (default 16817; slurmd gets the next one)
#   AXSAVE_TEST_TORCHRUN  a torchrun for the torchrun example job (else AXSAVE_TEST_PYTHON's,
#                         else one on PATH, else that test is skipped)
#   CARGO_TEST_ARGS       extra arguments for `cargo test`: features (`--features mpi`, as
#                         scripts/test.sh builds), `--release`, a test name filter
set -euo pipefail
cd "$(dirname "$0")/.."

keep=0
[ "${1:-}" = --keep ] && keep=1
t0=$(date +%s.%N)
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

# --- packages -------------------------------------------------------------------------------
need_pkgs=()
for p in slurmctld:slurmctld slurmd:slurmd srun:slurm-client munged:munge; do
  command -v "${p%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${p%%:*}" ] || need_pkgs+=("${p#*:}")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing packages: ${need_pkgs[*]} (run as root, or install them)" >&2
    exit 1
  fi
  echo "==> installing ${need_pkgs[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi
if [ "$(id -u)" != 0 ]; then
  echo "scripts/test-slurm.sh starts slurmd, which must run as root" >&2
  exit 1
fi
export PATH="$PATH:/usr/sbin:/sbin"
t_pkgs=$(elapsed "$t0")

# --- build the tests first (the cluster does not wait for the compiler) ----------------------
echo "==> cargo test --test slurm --no-run"
# shellcheck disable=SC2086
cargo test --test slurm ${CARGO_TEST_ARGS:-} --no-run --quiet
t1=$(date +%s.%N)

# --- configure --------------------------------------------------------------------------------
dir=$(mktemp -d /tmp/axsave-slurm.XXXXXX)
chmod 755 "$dir"
mkdir -p "$dir"/{etc,munge,run,state,spool,log,dev}
chmod 700 "$dir/munge"
# slurmctld's and slurmd's ports: the first free pair from 16817 on (several runs may share a
# machine), or AXSAVE_SLURM_PORT.
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
port=${AXSAVE_SLURM_PORT:-16817}
if [ -z "${AXSAVE_SLURM_PORT:-}" ]; then
  for _ in $(seq 40); do
    port_busy "$port" || port_busy $((port + 1)) || break
    port=$((port + 2))
  done
fi
conf="$dir/etc/slurm.conf"

mungekey --create --keyfile="$dir/munge/munge.key" 2>/dev/null ||
  dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
chmod 600 "$dir/munge/munge.key"

# Placeholder GPUs: slurmd only checks that each File is a device; task/none binds nothing.
for i in 0 1 2 3 4 5 6 7; do ln -s /dev/null "$dir/dev/gpu$i"; done
echo "NodeName=localhost Name=gpu File=$dir/dev/gpu[0-7]" >"$dir/etc/gres.conf"

# Job ids start at a number of this run's own: axsave's default MASTER_PORT is 15000 + the
# last four digits of the job id, so two runs (or a run right after another) do not share ports.
# A run takes about 20 ids; the ports stay within 17000-24020, clear of the daemons' above.
first_job=$((2000 + ($$ % 700) * 10))

cat >"$conf" <<EOF
ClusterName=axsavetest
SlurmctldHost=localhost
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/run/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
MailProg=/bin/true
FirstJobId=$first_job
# No cgroups, no accounting, no database: nothing to set up beyond this file.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
# Whatever the machine has, the node offers 8 CPUs (config_overrides: slurmd does not drain a
# node whose hardware has fewer) and tasks may share them (OverSubscribe=FORCE).
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
GresTypes=gpu
MinJobAge=300
NodeName=localhost NodeAddr=127.0.0.1 CPUs=8 Gres=gpu:8 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=30 State=UP OverSubscribe=FORCE
EOF

# --- start --------------------------------------------------------------------------------
# No launcher variables from an outer job (srun would look for that job on this cluster).
while IFS='=' read -r k _; do
  case $k in SLURM_* | PMI* | OMPI_* | TORCHELASTIC*) unset "$k" ;; esac
done < <(env)
export SLURM_CONF="$conf"

stop() {
  set +e
  if [ -e "$dir/run/slurmctld.pid" ] || [ -e "$dir/run/slurmd.pid" ]; then
    scontrol shutdown >/dev/null 2>&1 # slurmctld and every slurmd
  fi
  munged --stop --socket="$dir/run/munge.socket" >/dev/null 2>&1
  for f in "$dir"/run/*.pid; do
    [ -e "$f" ] || continue
    pid=$(cat "$f")
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    rm -f "$f"
  done
}
show_logs() {
  for f in "$dir"/log/*.log; do
    echo "--- $f (last lines)" >&2
    tail -n 15 "$f" >&2
  done
}
finish() {
  rc=$?
  stop
  if [ $rc != 0 ] || [ $keep = 1 ]; then
    echo "==> logs, configuration and state kept in $dir" >&2
  else
    rm -rf "$dir"
  fi
  exit $rc
}
trap finish EXIT

echo "==> starting munged, slurmctld (port $port) and slurmd (port $((port + 1))) in $dir"
munged --force --socket="$dir/run/munge.socket" --key-file="$dir/munge/munge.key" \
  --pid-file="$dir/run/munged.pid" --seed-file="$dir/munge/munged.seed" \
  --log-file="$dir/log/munged.log"
slurmctld -f "$conf"
slurmd -f "$conf" -N localhost
state=
for _ in $(seq 300); do
  state=$(sinfo -h -n localhost -o %T 2>/dev/null || true)
  [ "$state" = idle ] && break
  sleep 0.1
done
if [ "$state" != idle ]; then
  echo "==> the node never became idle (state: ${state:-no answer})" >&2
  show_logs
  exit 1
fi
t_start=$(elapsed "$t1")
echo "==> node localhost idle after ${t_start}s"

# --- test ---------------------------------------------------------------------------------
log="$dir/cargo-test.log"
set +e
# shellcheck disable=SC2086
AXSAVE_TEST_SLURM_CONF="$conf" cargo test --test slurm ${CARGO_TEST_ARGS:-} -- --test-threads=1 --nocapture \
  >"$log" 2>&1
rc=$?
set -e
grep -E "^test |^test result|skipping" "$log" || true
passed=$(grep -Eo "[0-9]+ passed" "$log" | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo "[0-9]+ failed" "$log" | awk '{s+=$1} END {print s+0}')
skipped=$(grep -c "skipping:" "$log" || true)
t_total=$(elapsed "$t0")
if [ $rc != 0 ] || [ "$passed" = 0 ]; then
  grep -A40 -E "^failures:|panicked|^error" "$log" | head -200 >&2 || true
  show_logs
  echo "==> slurm: FAIL ($failed failed, $passed passed of which $skipped skipped; ${t_total}s)" >&2
  exit 1
fi
echo "==> slurm: PASS ($((passed - skipped)) passed, $skipped skipped, 0 failed; ${t_total}s in all:" \
  "packages ${t_pkgs}s, build $(awk -v a="$t0" -v b="$t1" -v p="$t_pkgs" 'BEGIN { printf "%.1f", b - a - p }')s," \
  "daemons ${t_start}s)"
