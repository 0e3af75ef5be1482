//! A test hook for the fault tests: stop a chosen rank at a chosen point so a test can kill it
//! there, or change something under it. With `AXSAVE_FAULT=<point>@<rank>` that rank creates the
//! file named by `AXSAVE_FAULT_FILE` (if set; it holds the point and the process id) when it
//! reaches `<point>`, then waits until the
//! file named by `AXSAVE_FAULT_RELEASE` exists (if set; else it sleeps for an hour), or until
//! the process gets SIGTERM, SIGINT or SIGHUP. Without the
//! variable this does nothing.
//!
//! The hook exists only with the `fault-injection` feature, which the tests turn on (the root
//! package's dev-dependency on this crate); in any other build `point` is empty and the
//! variables are never read, so a stray `AXSAVE_FAULT` cannot stall a real save.
//!
//! Points: `joined` (after the rendezvous), `copying` (at its first piece), `synced` (its
//! files are on disk, success not yet reported), `committing` (rank 0, every rank reported,
//! about to rename the files into place), `merging` (merge-lora, alone or across ranks: the
//! output files exist, this rank has written nothing yet). A rank that dies after reporting success
//! does not stop the commit: its part of the model is complete and durable by then.

#[cfg(feature = "fault-injection")]
use std::sync::OnceLock;

#[cfg(feature = "fault-injection")]
fn target() -> Option<&'static (String, usize)> {
    static T: OnceLock<Option<(String, usize)>> = OnceLock::new();
    T.get_or_init(|| {
        let v = std::env::var("AXSAVE_FAULT").ok()?;
        let (point, rank) = v.split_once('@')?;
        Some((point.to_string(), rank.parse().ok()?))
    })
    .as_ref()
}

/// Stops here if the hook names this point and rank (once per process).
#[cfg(feature = "fault-injection")]
pub fn point(name: &str, rank: usize) {
    static FIRED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if let Some((p, r)) = target()
        && p == name
        && *r == rank
        && !FIRED.swap(true, std::sync::atomic::Ordering::SeqCst)
    {
        if let Ok(f) = std::env::var("AXSAVE_FAULT_FILE") {
            // The process id, so that a test can kill this rank even when a launcher started it.
            let _ = std::fs::write(f, format!("{name} {}", std::process::id()));
        }
        eprintln!("fault hook: rank {rank} stalls at {name}");
        // Released by the file, or by a signal (the save then cancels as it would anywhere).
        let release = std::env::var("AXSAVE_FAULT_RELEASE").ok();
        let until = std::time::Instant::now() + std::time::Duration::from_secs(3600);
        while !release
            .as_ref()
            .is_some_and(|r| std::path::Path::new(r).exists())
            && crate::interrupt::received().is_none()
            && std::time::Instant::now() < until
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// Does nothing: this build has no fault hook (the `fault-injection` feature is off).
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn point(_name: &str, _rank: usize) {}

/// Whether ranks read only the files of their own view (`AXSAVE_TEST_OWN_FILES_ONLY=1`), as if
/// no rank of the same node could open another's paths: the tests that need bytes to cross
/// between ranks of one machine set it. Always `false` without the `fault-injection` feature.
#[cfg(feature = "fault-injection")]
pub fn own_files_only() -> bool {
    std::env::var_os("AXSAVE_TEST_OWN_FILES_ONLY").is_some_and(|v| v == "1")
}

/// Always `false`: this build has no test hooks.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn own_files_only() -> bool {
    false
}
