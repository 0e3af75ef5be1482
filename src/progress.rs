//! Progress display: a bar on a terminal, periodic log lines otherwise, nothing with --quiet.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use axsave_core::size::human;

/// A running progress display over a byte counter.
pub struct Progress {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Progress {
    /// Starts showing `counter` against `total` bytes.
    pub fn start(counter: Arc<AtomicU64>, total: u64, quiet: bool) -> Progress {
        Self::spawn(quiet, move |stop| show(&counter, total, stop))
    }

    /// Shows a multi-rank run's progress: the total is known once the plan is.
    pub fn start_dist(p: Arc<axsave_core::distributed::Progress>, quiet: bool) -> Progress {
        Self::spawn(quiet, move |stop| {
            // Wait for the plan.
            while p.total.load(Ordering::Relaxed) == 0 {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            show(&p.done, p.total.load(Ordering::Relaxed), stop)
        })
    }

    /// Runs `display` on a thread until [`Progress::finish`] (nothing with `quiet`).
    fn spawn(quiet: bool, display: impl FnOnce(&AtomicBool) + Send + 'static) -> Progress {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = (!quiet).then(|| std::thread::spawn(move || display(&s)));
        Progress { stop, thread }
    }

    /// Stops the display (as dropping it does).
    pub fn finish(self) {}
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A bar on a terminal, log lines otherwise.
fn show(counter: &AtomicU64, total: u64, stop: &AtomicBool) {
    if std::io::stderr().is_terminal() {
        bar(counter, total, stop)
    } else {
        lines(counter, total, stop)
    }
}

fn bar(counter: &AtomicU64, total: u64, stop: &AtomicBool) {
    let pb = indicatif::ProgressBar::new(total);
    let style = indicatif::ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    pb.set_style(style);
    while !stop.load(Ordering::Relaxed) {
        pb.set_position(counter.load(Ordering::Relaxed));
        std::thread::sleep(Duration::from_millis(100));
    }
    pb.set_position(counter.load(Ordering::Relaxed));
    pb.finish_and_clear();
}

fn lines(counter: &AtomicU64, total: u64, stop: &AtomicBool) {
    let start = Instant::now();
    let mut last = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        if last.elapsed() >= Duration::from_secs(10) {
            last = Instant::now();
            let done = counter.load(Ordering::Relaxed);
            let secs = start.elapsed().as_secs_f64().max(1e-9);
            tracing::info!(
                "{} of {} written ({:.0}%), {}/s",
                human(done),
                human(total),
                done as f64 * 100.0 / total.max(1) as f64,
                human((done as f64 / secs) as u64)
            );
        }
    }
}
