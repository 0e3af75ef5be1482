//! A test hook for the fault tests: stop a chosen rank at a chosen point so a test can kill it
//! there, or change something under it. With `AXSAVE_FAULT=<point>@<rank>` that rank creates the
//! file named by `AXSAVE_FAULT_FILE` (if set; it holds the point and the process id) when it
//! reaches `<point>`, then waits until the
//! file named by `AXSAVE_FAULT_RELEASE` exists (if set; else it sleeps for an hour), or until
//! the process gets SIGTERM, SIGINT or SIGHUP. Without the
//! variable (always, outside tests) this does nothing.
//!
//! Points: `joined` (after the rendezvous), `copying` (at its first piece), `synced` (its
//! files are on disk, success not yet reported), `committing` (rank 0, every rank reported,
//! about to rename the files into place), `merging` (merge-lora, alone or across ranks: the
//! output files exist, this rank has written nothing yet). A rank that dies after reporting success
//! does not stop the commit: its part of the model is complete and durable by then.

use std::sync::OnceLock;

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
