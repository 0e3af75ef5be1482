//! The progress thread: the one thread that calls MPI (see the [module documentation](super)).

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use mpi::Threading;

use super::error::MpiError;
use super::safe::{Mpi, Pending};
use super::shared::{
    Collective, CollectiveOp, Command, Delivery, Info, ReceiveSlots, SendCompletions,
};
use super::wire::{self, MAX_BROADCAST_BYTES, REFUSED};

/// Shortest and longest nap of an idle progress loop. Incoming messages cannot wake the
/// thread (MPI has no notification), so the longest nap bounds the latency of the first
/// message after a quiet spell; commands wake it at once.
const MIN_NAP: Duration = Duration::from_micros(20);
const MAX_NAP: Duration = Duration::from_millis(1);

/// A send in flight.
struct SendInFlight {
    pending: Pending,
    stream: u64,
    book: Arc<dyn SendCompletions>,
}

/// A receive in flight, kept in probe order.
struct RecvInFlight {
    pending: Pending,
    from: usize,
    tag: i32,
    len: usize,
    done: bool,
}

/// The receiver being served.
struct Serving {
    shared: Arc<dyn ReceiveSlots>,
    deliveries: mpsc::Sender<Delivery>,
    pending: VecDeque<RecvInFlight>,
}

/// The collective in progress.
struct Active {
    req: Pending,
    stage: Stage,
    what: &'static str,
    timeout: Duration,
    deadline: Instant,
    reply: mpsc::Sender<Result<Vec<u8>, MpiError>>,
}

enum Stage {
    Barrier,
    /// The length word is being broadcast; the root keeps its value for the next stage.
    Length {
        root: usize,
        value: Option<Vec<u8>>,
    },
    Data,
}

struct Progress {
    sends: Vec<SendInFlight>,
    serving: Option<Serving>,
    /// Receives of a receiver that stopped: completed, then dropped.
    draining: Vec<Pending>,
    queued: VecDeque<Collective>,
    active: Option<Active>,
    /// Collectives that timed out or failed and may still be pending in MPI.
    abandoned: Vec<Pending>,
    /// Why collectives are refused, once one failed.
    broken: Option<String>,
    shutdown: Option<Instant>,
    // Last, so that every request above is gone before MPI is finalized.
    mpi: Mpi,
}

/// Body of the progress thread: initializes MPI, reports to `init`, serves `commands` until
/// shut down, finalizes MPI when nothing is pending (else leaves it be).
pub(crate) fn thread_main(
    requested: Threading,
    init: mpsc::Sender<Result<Info, MpiError>>,
    commands: mpsc::Receiver<Command>,
    gone: Arc<AtomicBool>,
) {
    // Set however this thread ends, so no one waits on it for ever.
    struct Gone(Arc<AtomicBool>);
    impl Drop for Gone {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let _gone = Gone(gone);

    let mpi = match Mpi::init(requested) {
        Ok(m) => m,
        Err(e) => {
            let _ = init.send(Err(e));
            return;
        }
    };
    let info = Info {
        rank: mpi.rank(),
        size: mpi.size(),
        processor_name: mpi.processor_name(),
        threading: mpi.threading(),
    };
    if init.send(Ok(info)).is_err() {
        // The caller of init is gone (it panicked): nothing will use MPI.
        return;
    }
    let mut p = Progress {
        sends: Vec::new(),
        serving: None,
        draining: Vec::new(),
        queued: VecDeque::new(),
        active: None,
        abandoned: Vec::new(),
        broken: None,
        shutdown: None,
        mpi,
    };
    let clean = match catch_unwind(AssertUnwindSafe(|| p.run(&commands))) {
        Ok(clean) => clean,
        Err(_) => {
            tracing::error!("the MPI progress thread panicked; MPI is left unfinalized");
            false
        }
    };
    if clean {
        // Dropping `p` frees the communicator and calls MPI_Finalize.
        drop(p);
    } else {
        if p.pending_count() > 0 {
            tracing::warn!(
                pending = p.pending_count(),
                "MPI requests still pending at shutdown; not finalizing MPI"
            );
        }
        // Finalizing with requests pending is erroneous and can hang; leaving MPI
        // unfinalized makes the launcher report this process, which is the truth. The
        // requests' buffers leak (their Drop sees them pending); everything else goes.
        let Progress {
            sends,
            serving,
            draining,
            queued,
            active,
            abandoned,
            mpi,
            ..
        } = p;
        std::mem::forget(mpi);
        drop((sends, serving, draining, queued, active, abandoned));
    }
}

impl Progress {
    /// The loop. Returns whether it ended with nothing pending (MPI may be finalized).
    fn run(&mut self, commands: &mpsc::Receiver<Command>) -> bool {
        let mut nap = MIN_NAP;
        loop {
            let mut busy = false;
            loop {
                match commands.try_recv() {
                    Ok(c) => {
                        busy = true;
                        self.command(c);
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        // Every handle is gone without a shutdown (cannot happen through
                        // MpiContext's Drop, which sends one): shut down anyway.
                        if self.shutdown.is_none() {
                            self.begin_shutdown(Duration::from_secs(10));
                        }
                        break;
                    }
                }
            }
            busy |= self.advance_sends();
            busy |= self.advance_receives();
            busy |= self.advance_collectives();
            if let Some(deadline) = self.shutdown {
                if self.pending_count() == 0 {
                    return true;
                }
                if Instant::now() >= deadline {
                    return false;
                }
            }
            if busy {
                nap = MIN_NAP;
                continue;
            }
            match commands.recv_timeout(nap) {
                Ok(c) => {
                    self.command(c);
                    nap = MIN_NAP;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => nap = (nap * 2).min(MAX_NAP),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    if self.shutdown.is_none() {
                        self.begin_shutdown(Duration::from_secs(10));
                    }
                    // recv_timeout no longer waits: nap here instead of spinning.
                    std::thread::sleep(nap);
                    nap = (nap * 2).min(MAX_NAP);
                }
            }
        }
    }

    /// Requests MPI still owns.
    fn pending_count(&self) -> usize {
        self.sends.len()
            + self.draining.len()
            + self.abandoned.len()
            + usize::from(self.active.is_some())
            + self.serving.as_ref().map_or(0, |s| s.pending.len())
    }

    fn command(&mut self, c: Command) {
        match c {
            Command::Send(o) => match self.mpi.isend(o.dest, o.tag, o.buf) {
                Ok(pending) => self.sends.push(SendInFlight {
                    pending,
                    stream: o.stream,
                    book: o.book,
                }),
                Err(e) => o.book.completed(o.stream, Err(e)),
            },
            Command::Collective(c) => {
                if self.shutdown.is_some() {
                    let _ = c.reply.send(Err(MpiError::Gone));
                } else {
                    self.queued.push_back(c);
                }
            }
            Command::StartReceiving(r) => {
                if self.shutdown.is_some() {
                    // Dropping `r` closes its delivery channel: its sink thread ends.
                    r.shared.fail(MpiError::Gone);
                    return;
                }
                self.stop_receiving();
                self.serving = Some(Serving {
                    shared: r.shared,
                    deliveries: r.deliveries,
                    pending: VecDeque::new(),
                });
            }
            Command::StopReceiving(ack) => {
                self.stop_receiving();
                let _ = ack.send(());
            }
            Command::Abort(code) => {
                let rc = self.mpi.abort(code);
                // MPI_Abort does not return when it works.
                tracing::error!(rc, "MPI_Abort returned; exiting");
                std::process::exit(if code == 0 { 1 } else { code });
            }
            Command::Shutdown(grace) => self.begin_shutdown(grace),
        }
    }

    fn begin_shutdown(&mut self, grace: Duration) {
        self.shutdown = Some(Instant::now() + grace);
        self.stop_receiving();
        for c in self.queued.drain(..) {
            let _ = c.reply.send(Err(MpiError::Gone));
        }
    }

    /// Stops probing for the current receiver; its receives in flight finish in
    /// `draining` (MPI must be done with their buffers) and are discarded. Dropping the
    /// delivery channel ends its sink thread once that has handled what it already got.
    fn stop_receiving(&mut self) {
        if let Some(s) = self.serving.take() {
            self.draining
                .extend(s.pending.into_iter().filter(|r| !r.done).map(|r| r.pending));
        }
    }

    /// Tests every send in flight; tells the owners of completed ones.
    fn advance_sends(&mut self) -> bool {
        let mut any = false;
        let mut i = 0;
        while i < self.sends.len() {
            match self.sends[i].pending.test(&self.mpi) {
                Ok(false) => i += 1,
                Ok(true) => {
                    let s = self.sends.swap_remove(i);
                    let buf = s.pending.into_buf();
                    s.book.completed(s.stream, Ok(buf));
                    any = true;
                }
                Err(e) => {
                    // Its buffer leaks with it: MPI's use of it is unknown.
                    let s = self.sends.swap_remove(i);
                    s.book.completed(s.stream, Err(e));
                    any = true;
                }
            }
        }
        any
    }

    /// Finishes receives in flight (delivering them in probe order), then probes for more
    /// while the receiver has room.
    fn advance_receives(&mut self) -> bool {
        let mut any = false;
        let mpi = &self.mpi;
        self.draining
            .retain_mut(|p| !matches!(p.test(mpi), Ok(true) | Err(_)));
        let Some(s) = self.serving.as_mut() else {
            return any;
        };
        let mut i = 0;
        while i < s.pending.len() {
            let r = &mut s.pending[i];
            if !r.done {
                match r.pending.test(mpi) {
                    Ok(done) => r.done = done,
                    Err(e) => {
                        s.shared.fail(e);
                        // Dropped (its buffer leaks): MPI's use of it is unknown.
                        s.pending.remove(i);
                        s.shared.release();
                        any = true;
                        continue;
                    }
                }
            }
            i += 1;
        }
        while s.pending.front().is_some_and(|r| r.done) {
            let Some(r) = s.pending.pop_front() else {
                break;
            };
            any = true;
            let Some(buf) = r.pending.into_buf() else {
                s.shared.release();
                continue;
            };
            let d = Delivery {
                from: r.from,
                tag: r.tag,
                buf,
                len: r.len,
            };
            if s.deliveries.send(d).is_err() {
                // The sink thread is gone: it only leaves early when it failed.
                s.shared.fail(MpiError::Gone);
                s.shared.release();
            }
        }
        while s.shared.has_room() {
            match mpi.improbe() {
                Ok(None) => break,
                Ok(Some(m)) => {
                    any = true;
                    s.shared.touch();
                    if let Err(detail) = wire::check_probed(m.tag, m.len, s.shared.frame_bytes()) {
                        // Left unreceived: its length is not to be trusted with an
                        // allocation. The receiver has failed; its sender finds out through
                        // the run's failure handling.
                        s.shared.fail(MpiError::Malformed {
                            rank: m.source,
                            detail,
                        });
                        continue;
                    }
                    let (from, tag, len) = (m.source, m.tag, m.len);
                    let buf = s.shared.take_buf();
                    s.shared.claim_slot();
                    match mpi.imrecv(m, buf) {
                        Ok(pending) => s.pending.push_back(RecvInFlight {
                            pending,
                            from,
                            tag,
                            len,
                            done: false,
                        }),
                        Err(e) => {
                            s.shared.fail(e);
                            s.shared.release();
                        }
                    }
                }
                Err(e) => {
                    s.shared.fail(e);
                    break;
                }
            }
        }
        any
    }

    /// Advances the collective in progress, starts the next, retires abandoned ones.
    fn advance_collectives(&mut self) -> bool {
        let mpi = &self.mpi;
        self.abandoned
            .retain_mut(|p| !matches!(p.test(mpi), Ok(true) | Err(_)));
        let Some(mut a) = self.active.take() else {
            let Some(c) = self.queued.pop_front() else {
                return false;
            };
            self.start(c);
            return true;
        };
        match a.req.test(&self.mpi) {
            Ok(false) => {
                if Instant::now() >= a.deadline {
                    let e = MpiError::CollectiveTimeout {
                        what: a.what,
                        timeout: a.timeout,
                    };
                    self.broken = Some(e.to_string());
                    let _ = a.reply.send(Err(e));
                    self.abandoned.push(a.req);
                    return true;
                }
                self.active = Some(a);
                false
            }
            Ok(true) => {
                self.next_stage(a);
                true
            }
            Err(e) => {
                self.broken = Some(e.to_string());
                let _ = a.reply.send(Err(e));
                self.abandoned.push(a.req);
                true
            }
        }
    }

    fn start(&mut self, c: Collective) {
        if let Some(detail) = &self.broken {
            let _ = c.reply.send(Err(MpiError::Broken {
                detail: detail.clone(),
            }));
            return;
        }
        let deadline = Instant::now() + c.timeout;
        let (started, stage, what) = match c.op {
            CollectiveOp::Barrier => (self.mpi.ibarrier(), Stage::Barrier, "barrier"),
            CollectiveOp::Broadcast { root, value } => {
                // The root announces the length first, or REFUSED so that no rank waits for
                // data that will not come.
                let word = if root == self.mpi.rank() {
                    match &value {
                        Some(v) if v.len() <= MAX_BROADCAST_BYTES => v.len() as u64,
                        _ => REFUSED,
                    }
                } else {
                    0
                };
                (
                    self.mpi.ibcast(root, word.to_le_bytes().to_vec()),
                    Stage::Length { root, value },
                    "broadcast",
                )
            }
        };
        match started {
            Ok(req) => {
                self.active = Some(Active {
                    req,
                    stage,
                    what,
                    timeout: c.timeout,
                    deadline,
                    reply: c.reply,
                });
            }
            Err(e) => {
                // Other ranks may have started theirs: collectives are out of step now.
                self.broken = Some(e.to_string());
                let _ = c.reply.send(Err(e));
            }
        }
    }

    fn next_stage(&mut self, a: Active) {
        let Active {
            req,
            stage,
            what,
            timeout,
            deadline,
            reply,
        } = a;
        let buf = req.into_buf().unwrap_or_default();
        match stage {
            Stage::Barrier | Stage::Data => {
                let _ = reply.send(Ok(buf));
            }
            Stage::Length { root, value } => {
                let len = if buf.len() == 8 {
                    wire::u64_at(&buf, 0)
                } else {
                    REFUSED
                };
                let me = self.mpi.rank();
                if len == REFUSED {
                    let e = if root == me {
                        match value {
                            None => MpiError::InvalidArgument {
                                detail: "the broadcast root must give a value".to_owned(),
                            },
                            Some(v) => MpiError::TooLarge {
                                what: "a broadcast",
                                len: v.len() as u64,
                                max: MAX_BROADCAST_BYTES as u64,
                            },
                        }
                    } else {
                        MpiError::Broadcast {
                            root,
                            detail: "it had no value, or one too large".to_owned(),
                        }
                    };
                    let _ = reply.send(Err(e));
                    return;
                }
                if len == 0 {
                    let _ = reply.send(Ok(Vec::new()));
                    return;
                }
                let data = if root == me {
                    value.unwrap_or_default()
                } else if len <= MAX_BROADCAST_BYTES as u64 {
                    vec![0u8; len as usize]
                } else {
                    // Only a root of another build could send this.
                    let e = MpiError::Broadcast {
                        root,
                        detail: format!("it announced {len} bytes"),
                    };
                    self.broken = Some(e.to_string());
                    let _ = reply.send(Err(e));
                    return;
                };
                match self.mpi.ibcast(root, data) {
                    Ok(req) => {
                        self.active = Some(Active {
                            req,
                            stage: Stage::Data,
                            what,
                            timeout,
                            deadline,
                            reply,
                        });
                    }
                    Err(e) => {
                        self.broken = Some(e.to_string());
                        let _ = reply.send(Err(e));
                    }
                }
            }
        }
    }
}
