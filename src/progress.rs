//! Progress display: a bar on a terminal, periodic log lines otherwise, nothing with --quiet.
//!
//! Count and total are the same quantity, output bytes (see `axsave_core::progress`); once the
//! copy is done the display says so and shows the fsync and the commit instead of a bar that
//! sits at the end.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use axsave_core::progress::{Phase, Progress as Counts};
use axsave_core::size::human;

/// How often the log lines come when stderr is not a terminal. `AXSAVE_PROGRESS_INTERVAL_MS`
/// (hidden, for tests) changes it.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// A running progress display.
pub struct Progress {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Progress {
    /// Shows a save's progress: output bytes written against the output bytes to write, both
    /// known once the layout is (with several ranks, on rank 0, the whole job's).
    pub fn start(p: Arc<Counts>, quiet: bool) -> Progress {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = (!quiet).then(|| {
            std::thread::spawn(move || {
                // Wait for the layout.
                while p.total.load(Ordering::Relaxed) == 0 {
                    if s.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                if std::io::stderr().is_terminal() {
                    bar(&p, &s)
                } else {
                    lines(&p, &s, log_interval())
                }
            })
        });
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

fn log_interval() -> Duration {
    std::env::var("AXSAVE_PROGRESS_INTERVAL_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(LOG_INTERVAL)
}

/// What the phase after the copy is called on the bar and in the log; `None` while copying.
fn phase_message(phase: Phase) -> Option<String> {
    match phase {
        Phase::Copying => None,
        Phase::Syncing { files } => Some(format!(
            "syncing {files} file{} to disk",
            if files == 1 { "" } else { "s" }
        )),
        Phase::Committing => Some("committing".into()),
    }
}

/// One log line: `done` of `total` output bytes after `secs`, and the phase past the copy.
fn log_line(done: u64, total: u64, secs: f64, phase: Phase) -> String {
    let mut line = format!(
        "{} of {} written ({:.0}%), {}/s",
        human(done),
        human(total),
        done as f64 * 100.0 / total.max(1) as f64,
        human((done as f64 / secs.max(1e-9)) as u64)
    );
    if let Some(m) = phase_message(phase) {
        line.push_str("; ");
        line.push_str(&m);
    }
    line
}

fn bar(p: &Counts, stop: &AtomicBool) {
    let pb = indicatif::ProgressBar::new(p.total.load(Ordering::Relaxed));
    let copying =
        "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}";
    let after = "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {msg}";
    let style = |t: &str| {
        indicatif::ProgressStyle::with_template(t)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    };
    pb.set_style(style(copying));
    let mut shown = Phase::Copying;
    while !stop.load(Ordering::Relaxed) {
        pb.set_position(p.done.load(Ordering::Relaxed));
        let phase = p.phase();
        if phase != shown {
            shown = phase;
            pb.set_style(style(after));
            pb.set_message(phase_message(phase).unwrap_or_default());
        }
        // The spinner keeps turning while the position stands still (fsync).
        pb.tick();
        std::thread::sleep(Duration::from_millis(100));
    }
    pb.set_position(p.done.load(Ordering::Relaxed));
    pb.finish_and_clear();
}

fn lines(p: &Counts, stop: &AtomicBool, every: Duration) {
    let start = Instant::now();
    let mut last = Instant::now();
    let mut shown = Phase::Copying;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(every.min(Duration::from_millis(100)));
        let phase = p.phase();
        // A line when the copy ends (the fsync may take a while), and every `every`.
        if last.elapsed() >= every || phase != shown {
            last = Instant::now();
            shown = phase;
            let (done, total) = (
                p.done.load(Ordering::Relaxed),
                p.total.load(Ordering::Relaxed),
            );
            let secs = start.elapsed().as_secs_f64();
            tracing::info!("{}", log_line(done, total, secs, phase));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_name_the_phase_after_the_copy() {
        assert_eq!(
            log_line(512, 1024, 1.0, Phase::Copying),
            "512 B of 1.02 KB written (50%), 512 B/s"
        );
        assert!(
            log_line(1024, 1024, 1.0, Phase::Syncing { files: 2 })
                .ends_with("(100%), 1.02 KB/s; syncing 2 files to disk")
        );
        assert!(
            log_line(1, 1, 1.0, Phase::Syncing { files: 1 }).ends_with("syncing 1 file to disk")
        );
    }
}
