//! Starting the ranks and watching them: when one fails or the launcher gets a signal, the
//! others are stopped (SIGTERM, then SIGKILL after the grace period), each as a process group.

use std::ffi::OsString;
use std::io::{self, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::output::{Stream, forward};
use crate::{Job, is_foreign_launcher_var, signals};

/// How often the launcher looks at its children and at the signals it received. Polling keeps
/// the loop simple (std's `Child` can only be waited on one at a time) and 10 ms is well below
/// anything a person or a rendezvous timeout would notice.
const POLL: Duration = Duration::from_millis(10);

/// The launcher's exit code for the first failed rank: its own code when that is in 1..=125,
/// else 1. 126..=255 are what shells use for "cannot execute", "not found" and "killed by
/// signal N" (128 + N); passing them on would make the launcher look like it was killed.
pub(crate) fn exit_code_for(status: ExitStatus) -> u8 {
    match status.code() {
        Some(c @ 1..=125) => c as u8,
        _ => 1,
    }
}

/// How a process ended, for messages: "exited with code 3", "was killed by SIGKILL (signal 9)".
pub(crate) fn describe(status: ExitStatus) -> String {
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
pub(crate) fn signal_name(sig: i32) -> String {
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
pub(crate) struct Rank {
    pub(crate) rank: u32,
    pub(crate) child: Child,
    /// Set once the child has been reaped.
    status: Option<ExitStatus>,
}

/// Starts rank `rank` and the two threads that forward its output: stderr lines with the
/// `[rank r] ` prefix, stdout lines with it only when `tag_stdout`.
pub(crate) fn spawn_rank(
    exe: &std::path::Path,
    args: &[OsString],
    job: &Job,
    rank: u32,
    tag_stdout: bool,
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
    // The ranks follow this launcher (below), not whoever started it.
    cmd.env_remove(axsave_core::parent::PARENT_PID_VAR);
    set_parent_death_signal(&mut cmd);

    let mut child = cmd.spawn()?;
    let prefix = format!("[rank {rank}] ").into_bytes();
    let streams = [
        (
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            Stream::Stdout,
        ),
        (
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            Stream::Stderr,
        ),
    ];
    for (stream, sink) in streams {
        let Some(stream) = stream else { continue };
        let prefix = match sink {
            Stream::Stdout if !tag_stdout => Vec::new(),
            _ => prefix.clone(),
        };
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

/// Why the ranks are being stopped.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Cause {
    /// This rank failed first.
    Failed { rank: u32, status: ExitStatus },
    /// The launcher received this signal.
    Signal(i32),
    /// A rank could not be started.
    StartFailed,
}

/// Watches the ranks until all have exited, stopping them when one fails or a signal comes.
pub(crate) struct Supervisor {
    ranks: Vec<Rank>,
    grace: Duration,
    /// Set once the ranks are being stopped, by the first reason to.
    pub(crate) cause: Option<Cause>,
    /// When the ranks still running get SIGKILL; `None` before a stop or once sent.
    kill_at: Option<Instant>,
    /// Signals the supervisor has acted on so far (compared with [`signals::received`]).
    signals_seen: u32,
}

impl Supervisor {
    pub(crate) fn new(ranks: Vec<Rank>, grace: Duration) -> Self {
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
    pub(crate) fn wait_all(&mut self) {
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
    pub(crate) fn stop(&mut self, cause: Cause, sig: i32) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
