//! `axsave launch`: a small local launcher, like `torchrun --standalone --nproc-per-node N
//! --no-python`, for one machine.
//!
//! It starts N copies of this executable (or of `--exe`, a hidden option for tests) with the
//! given arguments, each with the variables torchrun sets (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `LOCAL_WORLD_SIZE`, `GROUP_RANK`, `MASTER_ADDR`, `MASTER_PORT`, …) plus `AXSAVE_RUN_ID` and a
//! random `AXSAVE_JOB_TOKEN` (the secret the ranks' data connections present), so
//! every child detects the `env` launcher (see `axsave_dist::world`).
//!
//! # Output
//!
//! Each child's stdout and stderr are pipes read by one thread each; every line is written to
//! the launcher's stdout / stderr with a `[rank r] ` prefix, as one write under the stream's
//! lock, so lines of different ranks never mix. Bytes are passed through as they are (non-UTF-8
//! included); a last line without a newline gets one; a line longer than [`MAX_LINE`] is cut
//! into several prefixed lines rather than buffered without bound.
//!
//! # Stopping
//!
//! When a rank exits non-zero or is killed by a signal, the others are sent SIGTERM, and SIGKILL
//! after the grace period; the launcher then exits with the failed rank's exit code when it is
//! in 1..=125 (1 otherwise: codes above 125 are the shell's "cannot run" and "killed by signal"
//! codes and would be misread if passed on). SIGINT, SIGTERM and SIGHUP received by the launcher
//! are forwarded to the ranks, with the same grace period; a second one kills them at once; the
//! launcher then exits 128 + the signal number, as a shell reports an interrupted command.
//!
//! Each rank runs in its own process group and is signalled as a group, so whatever a rank
//! started (a shell script's children) is stopped with it. A consequence is that Ctrl-C in a
//! terminal reaches only the launcher, which forwards it: every rank gets it exactly once (Ctrl-Z,
//! which is not forwarded, suspends the launcher but not the ranks). On
//! Linux each rank also gets SIGTERM if the launcher dies without cleaning up (SIGKILL, the OOM
//! killer), so no rank keeps running unattended.

use std::ffi::{OsStr, OsString};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, TcpListener};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::Args;

/// Start N local ranks of axsave, each with the variables torchrun would give it.
///
/// Like `torchrun --standalone --nproc-per-node N --no-python axsave ARGS…` on one machine: every
/// rank gets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT
/// (a free port unless --master-port), a shared AXSAVE_RUN_ID and a random AXSAVE_JOB_TOKEN
/// that every data connection between the ranks must present. Variables of other launchers
/// (TORCHELASTIC_*, SLURM_*, OMPI_COMM_WORLD_*, PMI_*, PMIX_*, MV2_*, MPI_LOCALRANKID,
/// MPI_LOCALNRANKS, NODE_RANK) are removed from the ranks' environment, so that `axsave launch`
/// run inside an sbatch script or an MPI job does not make the ranks believe they belong to it.
///
/// Each line a rank prints is shown with a `[rank r] ` prefix, stdout on stdout and stderr on
/// stderr. When a rank fails, the others get SIGTERM, then SIGKILL after --grace-period, and the
/// launcher exits with the failed rank's exit code (1 if it was killed or its code is above 125).
/// Ctrl-C (SIGINT), SIGTERM and SIGHUP are passed on to the ranks; a second one kills them at
/// once; the launcher then exits 128 + the signal number.
#[derive(Args, Debug, Clone)]
#[command(after_help = "Examples:\n  \
        axsave launch -n 4 -- --source ckpt --output out\n  \
        axsave launch -n 8 --master-port 29600 -- --source ckpt --output out --dtype bf16\n\n\
        Exit codes: 0 every rank succeeded; the failed rank's code (1 when it was killed by a \
        signal or its code is above 125); 128 + N when the launcher got signal N; 2 bad usage.")]
pub struct LaunchArgs {
    /// Number of ranks (processes) to start on this machine.
    #[arg(
        short = 'n',
        long = "nproc-per-node",
        visible_alias = "nproc",
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub nproc: u32,

    /// Rendezvous port given to the ranks as MASTER_PORT (default: a free port).
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub master_port: Option<u16>,

    /// Rendezvous address given to the ranks as MASTER_ADDR.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1")]
    pub master_addr: String,

    /// Seconds the other ranks get to exit after SIGTERM before they are sent SIGKILL.
    #[arg(long, value_name = "SECONDS", default_value = "5", value_parser = parse_seconds)]
    pub grace_period: Duration,

    /// Program to start instead of this axsave (for tests and debugging: any program can be
    /// launched with the ranks' environment, e.g. `--exe /bin/sh -- -c 'echo $RANK'`).
    #[arg(long, value_name = "PATH", hide = true)]
    pub exe: Option<PathBuf>,

    /// The arguments every rank runs axsave with, after `--`.
    #[arg(last = true, required = true, value_name = "ARGS")]
    pub args: Vec<OsString>,
}

/// `--grace-period`: a non-negative number of seconds, fractions allowed.
fn parse_seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("not a number of seconds: {s:?}"))?;
    Duration::try_from_secs_f64(secs).map_err(|_| format!("not a usable number of seconds: {s:?}"))
}

/// Longest line forwarded in one piece; a longer one (a progress bar redrawn with `\r`, binary
/// output) is cut into several prefixed lines so a reader thread's memory stays bounded.
const MAX_LINE: usize = 64 * 1024;

/// How often the launcher looks at its children and at the signals it received. Polling keeps
/// the loop simple (std's `Child` can only be waited on one at a time) and 10 ms is well below
/// anything a person or a rendezvous timeout would notice.
const POLL: Duration = Duration::from_millis(10);

/// How long, once every rank has exited, the launcher waits for the rest of their output. The
/// pipes normally close when the ranks exit; a process a rank left running in the background
/// keeps them open, and the launcher should not wait for it.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Prefixes of variables other launchers set, removed from the ranks' environment. Launchers
/// nest, and `axsave_dist::world` gives these precedence over the plain `RANK`/`WORLD_SIZE` that
/// `axsave launch` sets: `axsave launch` run in an sbatch script under `srun`, in an `mpirun`
/// job or in a torchrun worker would otherwise make every rank believe it is rank 0 (or rank k)
/// of the outer job.
const FOREIGN_PREFIXES: &[&str] = &[
    "TORCHELASTIC_",
    "SLURM_",
    "OMPI_COMM_WORLD_",
    "PMI_",
    "PMIX_",
    "MV2_",
];

/// Whole names of other launchers' variables removed from the ranks' environment (see
/// [`FOREIGN_PREFIXES`]). `NODE_RANK` (Lightning, accelerate) is the node index those tools
/// read; a stale one would contradict the `GROUP_RANK=0` set here.
const FOREIGN_NAMES: &[&str] = &["MPI_LOCALRANKID", "MPI_LOCALNRANKS", "NODE_RANK"];

/// Whether `name` is another launcher's variable that must not reach the ranks.
fn is_foreign_launcher_var(name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    FOREIGN_PREFIXES.iter().any(|p| name.starts_with(p)) || FOREIGN_NAMES.contains(&name)
}

/// What every rank of one launch shares.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Job {
    world_size: u32,
    master_addr: String,
    master_port: u16,
    run_id: String,
    /// The secret every rank's data connections present (`AXSAVE_JOB_TOKEN`, hex): only the
    /// ranks get it, through their environment.
    job_token: String,
}

impl Job {
    /// The variables rank `rank` is started with: torchrun's set for a single node, and the run
    /// id `axsave_dist::world` reads for the `env` launcher.
    fn rank_env(&self, rank: u32) -> Vec<(&'static str, String)> {
        let n = self.world_size.to_string();
        vec![
            ("RANK", rank.to_string()),
            ("WORLD_SIZE", n.clone()),
            ("LOCAL_RANK", rank.to_string()),
            ("LOCAL_WORLD_SIZE", n.clone()),
            ("GROUP_RANK", "0".into()),
            ("GROUP_WORLD_SIZE", "1".into()),
            ("ROLE_RANK", rank.to_string()),
            ("ROLE_WORLD_SIZE", n),
            ("MASTER_ADDR", self.master_addr.clone()),
            ("MASTER_PORT", self.master_port.to_string()),
            ("AXSAVE_RUN_ID", self.run_id.clone()),
            ("AXSAVE_JOB_TOKEN", self.job_token.clone()),
        ]
    }
}

/// A port nothing listens on now. The rendezvous store binds the wildcard address (IPv6
/// dual-stack, else IPv4), so the port is asked for the same way: free there means free on every
/// local address. Another program may still take it before rank 0 binds it; `--master-port`
/// is the way out when that matters.
fn free_port() -> io::Result<u16> {
    let listener = TcpListener::bind((Ipv6Addr::UNSPECIFIED, 0))
        .or_else(|_| TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)))?;
    Ok(listener.local_addr()?.port())
}

/// An id for one launch, unique enough to tell runs apart in logs and store namespaces: the
/// launcher's pid and the time in nanoseconds, in hex.
fn new_run_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:x}-{nanos:x}", std::process::id())
}

/// Runs `axsave launch`: starts the ranks, forwards their output and signals, and returns the
/// exit code the launcher should end with. An `Err` means the launch itself failed (a rank could
/// not be started); the ranks already started are stopped first.
pub fn run(args: &LaunchArgs) -> Result<ExitCode> {
    let exe = match &args.exe {
        Some(exe) => exe.clone(),
        None => std::env::current_exe().context("cannot find the axsave executable")?,
    };
    let master_port = match args.master_port {
        Some(p) => p,
        None => free_port().context("cannot find a free port for MASTER_PORT")?,
    };
    let job = Job {
        world_size: args.nproc,
        master_addr: args.master_addr.clone(),
        master_port,
        run_id: new_run_id(),
        job_token: axsave_core::distributed::hex(&axsave_core::distributed::random_token()),
    };
    // Before any child exists: a signal arriving between a spawn and the handler would
    // otherwise kill the launcher and leave the ranks without anyone to stop them.
    signals::install().context("cannot install the signal handlers")?;

    tracing::info!(
        "starting {} rank(s) of {} (MASTER_ADDR={} MASTER_PORT={} AXSAVE_RUN_ID={})",
        job.world_size,
        exe.display(),
        job.master_addr,
        job.master_port,
        job.run_id
    );

    let (done_tx, done_rx) = mpsc::channel::<()>();
    let mut ranks: Vec<Rank> = Vec::with_capacity(job.world_size as usize);
    for rank in 0..job.world_size {
        match spawn_rank(&exe, &args.args, &job, rank, &done_tx) {
            Ok(r) => ranks.push(r),
            Err(e) => {
                let mut sup = Supervisor::new(ranks, args.grace_period);
                sup.stop(Cause::StartFailed, libc::SIGTERM);
                sup.wait_all();
                return Err(e)
                    .with_context(|| format!("cannot start rank {rank} ({})", exe.display()));
            }
        }
    }
    // The reader threads hold the other senders; the channel disconnects when the last ends.
    drop(done_tx);

    let mut sup = Supervisor::new(ranks, args.grace_period);
    sup.wait_all();
    drain_output(&done_rx, DRAIN_TIMEOUT);

    Ok(match sup.cause {
        None => ExitCode::SUCCESS,
        Some(Cause::Signal(sig)) => {
            tracing::error!("interrupted by {}", signal_name(sig));
            ExitCode::from(128u8.saturating_add(u8::try_from(sig).unwrap_or(0)))
        }
        Some(Cause::Failed { rank, status }) => {
            tracing::error!("rank {rank} failed: it {}", describe(status));
            ExitCode::from(exit_code_for(status))
        }
        // Only set on the spawn error path above, which has returned.
        Some(Cause::StartFailed) => ExitCode::FAILURE,
    })
}

/// The launcher's exit code for the first failed rank: its own code when that is in 1..=125,
/// else 1. 126..=255 are what shells use for "cannot execute", "not found" and "killed by
/// signal N" (128 + N); passing them on would make the launcher look like it was killed.
fn exit_code_for(status: ExitStatus) -> u8 {
    match status.code() {
        Some(c @ 1..=125) => c as u8,
        _ => 1,
    }
}

/// How a process ended, for messages: "exited with code 3", "was killed by SIGKILL (signal 9)".
fn describe(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        format!("exited with code {code}")
    } else if let Some(sig) = status.signal() {
        let core = if status.core_dumped() {
            ", core dumped"
        } else {
            ""
        };
        format!("was killed by {} (signal {sig}{core})", signal_name(sig))
    } else {
        format!("ended with {status}")
    }
}

/// The usual name of a signal number, or "signal N".
fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGSYS => "SIGSYS",
        _ => return format!("signal {sig}"),
    };
    name.to_owned()
}

/// A started rank.
struct Rank {
    rank: u32,
    child: Child,
    /// Set once the child has been reaped.
    status: Option<ExitStatus>,
}

/// Starts rank `rank` and the two threads that forward its output.
fn spawn_rank(
    exe: &std::path::Path,
    args: &[OsString],
    job: &Job,
    rank: u32,
    done: &mpsc::Sender<()>,
) -> io::Result<Rank> {
    let mut cmd = Command::new(exe);
    cmd.args(args)
        // Ranks do not read stdin; N processes sharing a terminal's input would steal each
        // other's keystrokes.
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group, so that stopping a rank stops whatever it started (see module doc).
        .process_group(0);
    for (name, _) in std::env::vars_os() {
        if is_foreign_launcher_var(&name) {
            cmd.env_remove(name);
        }
    }
    cmd.envs(job.rank_env(rank));
    set_parent_death_signal(&mut cmd);

    let mut child = cmd.spawn()?;
    let prefix = format!("[rank {rank}] ").into_bytes();
    let streams = [
        (
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            Sink::Stdout,
        ),
        (
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            Sink::Stderr,
        ),
    ];
    for (stream, sink) in streams {
        let Some(stream) = stream else { continue };
        let prefix = prefix.clone();
        let done = done.clone();
        let spawned = thread::Builder::new()
            .name(format!("rank{rank}-{}", sink.name()))
            .spawn(move || {
                forward(stream, &prefix, sink);
                drop(done);
            });
        if let Err(e) = spawned {
            // The child cannot be left running with nobody reading its output.
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    }
    Ok(Rank {
        rank,
        child,
        status: None,
    })
}

/// Linux: the rank gets SIGTERM when the launcher dies, even by SIGKILL, instead of running on
/// with nobody reading its output (and soon failing on a closed pipe). SIGTERM rather than
/// SIGKILL lets a rank remove its temporary files.
#[cfg(target_os = "linux")]
fn set_parent_death_signal(cmd: &mut Command) {
    let launcher = libc::pid_t::try_from(std::process::id()).unwrap_or(0);
    // SAFETY: `pre_exec` closures run in the forked child before exec, where only
    // async-signal-safe work is sound (another thread of the launcher may have held a lock at
    // the fork). This one makes two system calls (prctl, getppid) and builds `io::Error`s from
    // raw OS codes, which neither allocates nor locks. The death signal is tied to the thread
    // that forked; `run` spawns and waits on the same thread, which lives until the end.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The launcher died between fork and prctl: the signal will never come.
            if libc::getppid() != launcher {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn set_parent_death_signal(_cmd: &mut Command) {}

/// Which of the launcher's streams a child's stream goes to.
#[derive(Debug, Clone, Copy)]
enum Sink {
    Stdout,
    Stderr,
}

impl Sink {
    fn name(self) -> &'static str {
        match self {
            Sink::Stdout => "stdout",
            Sink::Stderr => "stderr",
        }
    }

    /// Writes one whole line (already prefixed, newline included) while holding the stream's
    /// lock, so lines from other threads cannot land inside it.
    fn write_line(self, line: &[u8]) -> io::Result<()> {
        match self {
            Sink::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(line)?;
                // Shown now, not when a buffer fills: the point is to watch the ranks.
                out.flush()
            }
            Sink::Stderr => io::stderr().lock().write_all(line),
        }
    }
}

/// Forwards `src` to `sink` line by line with `prefix`, until `src` ends. If the launcher's
/// stream is closed (`axsave launch … | head`), the rest is read and dropped, so that a rank
/// does not fail on a full pipe over something that only concerns what is displayed.
fn forward(src: impl Read, prefix: &[u8], sink: Sink) {
    let mut line_buf = Vec::with_capacity(256);
    let mut writable = true;
    // A read error on a pipe from a child is not expected; ending the forwarding is all
    // there is to do about it.
    let _ = for_each_line(src, |line| {
        if !writable {
            return;
        }
        line_buf.clear();
        line_buf.extend_from_slice(prefix);
        line_buf.extend_from_slice(line);
        line_buf.push(b'\n');
        writable = sink.write_line(&line_buf).is_ok();
    });
}

/// Reads `src` to its end and calls `f` with each line, without its `\n` (a `\r` before it is
/// kept). A last line without a newline counts as a line; lines longer than [`MAX_LINE`] are
/// given in pieces of `MAX_LINE` bytes.
fn for_each_line(src: impl Read, mut f: impl FnMut(&[u8])) -> io::Result<()> {
    let mut src = BufReader::with_capacity(MAX_LINE, src);
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let buf = match src.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                if !pending.is_empty() {
                    f(&pending);
                }
                return Err(e);
            }
        };
        if buf.is_empty() {
            break;
        }
        let room = MAX_LINE - pending.len();
        let window = &buf[..buf.len().min(room)];
        let used = match window.iter().position(|&b| b == b'\n') {
            Some(i) if pending.is_empty() => {
                f(&window[..i]);
                i + 1
            }
            Some(i) => {
                pending.extend_from_slice(&window[..i]);
                f(&pending);
                pending.clear();
                i + 1
            }
            None => {
                pending.extend_from_slice(window);
                if pending.len() == MAX_LINE {
                    f(&pending);
                    pending.clear();
                }
                window.len()
            }
        };
        src.consume(used);
    }
    if !pending.is_empty() {
        f(&pending);
    }
    Ok(())
}

/// Waits until every output thread has finished (the channel disconnects) or `timeout` passed.
fn drain_output(done: &mpsc::Receiver<()>, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match done.recv_timeout(left) {
            Ok(()) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                tracing::debug!("output still open after the ranks exited; not waiting for it");
                return;
            }
        }
    }
}

/// Why the ranks are being stopped.
#[derive(Debug, Clone, Copy)]
enum Cause {
    /// This rank failed first.
    Failed { rank: u32, status: ExitStatus },
    /// The launcher received this signal.
    Signal(i32),
    /// A rank could not be started.
    StartFailed,
}

/// Watches the ranks until all have exited, stopping them when one fails or a signal comes.
struct Supervisor {
    ranks: Vec<Rank>,
    grace: Duration,
    /// Set once the ranks are being stopped, by the first reason to.
    cause: Option<Cause>,
    /// When the ranks still running get SIGKILL; `None` before a stop or once sent.
    kill_at: Option<Instant>,
    /// Signals the supervisor has acted on so far (compared with [`signals::received`]).
    signals_seen: u32,
}

impl Supervisor {
    fn new(ranks: Vec<Rank>, grace: Duration) -> Self {
        Supervisor {
            ranks,
            grace,
            cause: None,
            kill_at: None,
            // Counted from 0, not from now: a signal that came while the ranks were being
            // started (the handlers were already installed) must still be passed on.
            signals_seen: 0,
        }
    }

    /// Polls until every rank has been reaped.
    fn wait_all(&mut self) {
        loop {
            self.reap();
            if self.ranks.iter().all(|r| r.status.is_some()) {
                return;
            }
            self.check_signals();
            if self.kill_at.is_some_and(|t| Instant::now() >= t) {
                let left = self.running_list();
                tracing::warn!(
                    "rank(s) {left} still running {:.1}s after being asked to stop; sending SIGKILL",
                    self.grace.as_secs_f64()
                );
                self.signal_running(libc::SIGKILL);
                self.kill_at = None;
            }
            thread::sleep(POLL);
        }
    }

    /// Reaps the ranks that exited; the first failure starts the stop.
    fn reap(&mut self) {
        let mut failed = None;
        for r in self.ranks.iter_mut().filter(|r| r.status.is_none()) {
            let status = match r.child.try_wait() {
                Ok(Some(status)) => status,
                Ok(None) => continue,
                // Not expected for our own child; if it cannot be watched, kill it rather than
                // wait forever on something that cannot be observed.
                Err(e) => {
                    tracing::error!("cannot watch rank {}: {e}; killing it", r.rank);
                    let _ = r.child.kill();
                    match r.child.wait() {
                        Ok(status) => status,
                        Err(_) => ExitStatus::from_raw(libc::SIGKILL),
                    }
                }
            };
            r.status = Some(status);
            tracing::debug!("rank {} {}", r.rank, describe(status));
            if !status.success() && failed.is_none() {
                failed = Some((r.rank, status));
            }
        }
        if let Some((rank, status)) = failed {
            if self.cause.is_none() {
                let others = if self.running_list().is_empty() {
                    String::new()
                } else {
                    "; stopping the other ranks".to_owned()
                };
                tracing::error!("rank {rank} {}{others}", describe(status));
                self.stop(Cause::Failed { rank, status }, libc::SIGTERM);
            }
        }
    }

    /// Forwards signals the launcher received: the first starts the stop with the same signal,
    /// any later one (an impatient second Ctrl-C) kills the ranks at once.
    fn check_signals(&mut self) {
        let (count, last) = signals::received();
        if count == self.signals_seen {
            return;
        }
        self.signals_seen = count;
        if self.cause.is_none() {
            tracing::warn!(
                "received {}; passing it on to the ranks (again to kill them at once)",
                signal_name(last)
            );
            self.stop(Cause::Signal(last), last);
        } else if self.kill_at.is_some() {
            tracing::warn!("received {}; killing the ranks", signal_name(last));
            self.signal_running(libc::SIGKILL);
            self.kill_at = None;
        }
    }

    /// Starts stopping the ranks: sends `sig` now, SIGKILL after the grace period.
    fn stop(&mut self, cause: Cause, sig: i32) {
        self.cause = Some(cause);
        self.signal_running(sig);
        self.kill_at = Some(Instant::now() + self.grace);
    }

    /// Sends `sig` to the process group of every rank not reaped yet. Reaped ones are left
    /// alone: once reaped, their pid (= group id) may be reused by an unrelated process.
    fn signal_running(&self, sig: i32) {
        for r in self.ranks.iter().filter(|r| r.status.is_none()) {
            let Ok(pid) = libc::pid_t::try_from(r.child.id()) else {
                continue;
            };
            // SAFETY: kill(2) takes plain integers and touches no memory of ours. The rank is
            // not reaped, so its pid is still the id of its own process group (it was created
            // with process_group(0)); ESRCH for a group that just emptied is harmless.
            unsafe {
                libc::kill(-pid, sig);
            }
        }
    }

    /// The ranks not reaped yet, as "0, 2, 3".
    fn running_list(&self) -> String {
        self.ranks
            .iter()
            .filter(|r| r.status.is_none())
            .map(|r| r.rank.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// SIGINT, SIGTERM and SIGHUP handling: the handler only records the signal; the supervisor
/// loop picks it up on its next poll and forwards it.
mod signals {
    use std::io;
    use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};

    /// How many of the handled signals arrived.
    static COUNT: AtomicU32 = AtomicU32::new(0);
    /// The last one that arrived.
    static LAST: AtomicI32 = AtomicI32::new(0);

    extern "C" fn on_signal(sig: libc::c_int) {
        // Lock-free atomics are async-signal-safe; nothing else is done here.
        LAST.store(sig, Ordering::SeqCst);
        COUNT.fetch_add(1, Ordering::SeqCst);
    }

    /// Replaces the default action (die) of SIGINT, SIGTERM and SIGHUP with [`on_signal`].
    /// Caught signals are reset to their default in exec'd children, so the ranks are not
    /// affected.
    pub(super) fn install() -> io::Result<()> {
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: the `sigaction` struct is zero-initialised (a valid value for this plain C
            // struct) and then filled in; the handler is an `extern "C" fn(c_int)` that only
            // touches atomics, which is async-signal-safe. SA_RESTART makes system calls
            // interrupted by the signal (the output threads' reads) resume instead of failing.
            let rc = unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
                action.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut action.sa_mask);
                libc::sigaction(sig, &action, std::ptr::null_mut())
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// (signals received so far, the last of them).
    pub(super) fn received() -> (u32, i32) {
        let count = COUNT.load(Ordering::SeqCst);
        (count, LAST.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use axsave_dist::{Launcher, detect};

    use super::*;

    fn lines_of(input: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for_each_line(input, |l| out.push(l.to_vec())).unwrap();
        out
    }

    #[test]
    fn splits_lines_and_keeps_a_last_partial_line() {
        assert_eq!(
            lines_of(b"a\nbb\n\nccc"),
            vec![b"a".to_vec(), b"bb".to_vec(), vec![], b"ccc".to_vec()]
        );
        assert_eq!(lines_of(b"x\r\n"), vec![b"x\r".to_vec()]);
        assert!(lines_of(b"").is_empty());
    }

    #[test]
    fn passes_non_utf8_bytes_through() {
        assert_eq!(
            lines_of(b"\xff\xfe\n\x80"),
            vec![b"\xff\xfe".to_vec(), b"\x80".to_vec()]
        );
    }

    /// A reader that hands out one byte per read, as a slow pipe may.
    struct Trickle<'a>(&'a [u8]);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let Some((&b, rest)) = self.0.split_first() else {
                return Ok(0);
            };
            buf[0] = b;
            self.0 = rest;
            Ok(1)
        }
    }

    #[test]
    fn joins_lines_that_arrive_in_pieces() {
        let mut out = Vec::new();
        for_each_line(Trickle(b"hello\nwor\nld"), |l| out.push(l.to_vec())).unwrap();
        assert_eq!(
            out,
            vec![b"hello".to_vec(), b"wor".to_vec(), b"ld".to_vec()]
        );
    }

    #[test]
    fn cuts_overlong_lines() {
        let mut input = vec![b'x'; MAX_LINE * 2 + 10];
        input.extend_from_slice(b"\nend\n");
        let lines = lines_of(&input);
        let lens: Vec<usize> = lines.iter().map(Vec::len).collect();
        assert_eq!(lens, vec![MAX_LINE, MAX_LINE, 10, 3]);
    }

    #[test]
    fn exit_codes_of_failed_ranks() {
        let code = |c: i32| exit_code_for(ExitStatus::from_raw(c << 8));
        assert_eq!(code(1), 1);
        assert_eq!(code(7), 7);
        assert_eq!(code(125), 125);
        assert_eq!(code(126), 1);
        assert_eq!(code(200), 1);
        assert_eq!(exit_code_for(ExitStatus::from_raw(libc::SIGKILL)), 1);
        assert_eq!(describe(ExitStatus::from_raw(3 << 8)), "exited with code 3");
        assert_eq!(
            describe(ExitStatus::from_raw(libc::SIGKILL)),
            "was killed by SIGKILL (signal 9)"
        );
        assert_eq!(signal_name(64), "signal 64");
    }

    #[test]
    fn seconds() {
        assert_eq!(parse_seconds("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_seconds("0.25"), Ok(Duration::from_millis(250)));
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("soon").is_err());
        assert!(parse_seconds("inf").is_err());
    }

    /// The environment a rank sees when `axsave launch` runs where other launchers left their
    /// variables (a torchrun worker inside an `srun` step inside an MPI job, all at once), as
    /// `axsave_dist::world` reads it: the plain `env` launcher with this launch's values.
    #[test]
    fn ranks_detect_the_env_launcher_whatever_the_parent_had() {
        let parent: HashMap<&str, &str> = [
            ("TORCHELASTIC_RUN_ID", "outer"),
            ("TORCHELASTIC_RESTART_COUNT", "2"),
            ("SLURM_STEP_ID", "0"),
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NODEID", "3"),
            ("SLURM_JOB_NODELIST", "node[1-4]"),
            ("SLURM_STEP_TASKS_PER_NODE", "4(x4)"),
            ("OMPI_COMM_WORLD_RANK", "5"),
            ("OMPI_COMM_WORLD_SIZE", "16"),
            ("PMIX_RANK", "5"),
            ("PMI_RANK", "5"),
            ("PMI_SIZE", "16"),
            ("MV2_COMM_WORLD_RANK", "5"),
            ("MV2_COMM_WORLD_SIZE", "16"),
            ("MPI_LOCALRANKID", "1"),
            ("MPI_LOCALNRANKS", "4"),
            ("NODE_RANK", "3"),
            ("RANK", "5"),
            ("WORLD_SIZE", "16"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node1"),
            ("MASTER_PORT", "29500"),
            ("HOME", "/root"),
        ]
        .into_iter()
        .collect();
        let job = Job {
            world_size: 3,
            master_addr: "127.0.0.1".into(),
            master_port: 41000,
            run_id: "abc-123".into(),
            job_token: "00".repeat(32),
        };
        for rank in 0..3 {
            let mut env: HashMap<String, String> = parent
                .iter()
                .filter(|(k, _)| !is_foreign_launcher_var(OsStr::new(k)))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            env.extend(
                job.rank_env(rank)
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v)),
            );
            assert_eq!(env.get("HOME").map(String::as_str), Some("/root"));
            let world = detect(&|k| env.get(k).cloned()).unwrap();
            assert_eq!(world.launcher, Launcher::Env);
            assert_eq!(world.rank, rank as usize);
            assert_eq!(world.world_size, 3);
            assert_eq!(world.local_rank, rank as usize);
            assert_eq!(world.local_world_size, 3);
            assert_eq!(world.node_rank, Some(0));
            assert_eq!(world.master_addr.as_deref(), Some("127.0.0.1"));
            assert_eq!(world.master_port, 41000);
            assert_eq!(world.run_id.as_deref(), Some("abc-123"));
        }
    }

    #[test]
    fn free_ports_are_usable() {
        let port = free_port().unwrap();
        assert_ne!(port, 0);
        TcpListener::bind((Ipv4Addr::LOCALHOST, port)).unwrap();
    }
}
