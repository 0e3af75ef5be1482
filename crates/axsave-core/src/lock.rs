//! The output directory's lock: one save at a time writes into a directory.
//!
//! The writer (the single process, or rank 0 of a multi-rank save, which commits) holds an
//! exclusive `flock` on `.axsave.lock` in the output directory from before it checks the
//! directory until after the commit. The file records the holder (host, process id, run tag),
//! so that a second save fails at once naming it. The holder removes the file when it is done;
//! a holder killed by SIGKILL leaves it behind, unlocked (the kernel drops the lock with the
//! process), and the next save takes it over. It is hidden and never part of the model.
//!
//! On a filesystem that does not support `flock` (some network filesystems without their lock
//! service) the save goes on without the lock, with a warning.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{CoreError, Result};

/// Name of the lock file in the output directory.
pub const LOCK_NAME: &str = ".axsave.lock";

/// A held lock (or, where locking is not supported, the record that there is none). Dropping
/// it removes the lock file and releases the lock.
#[derive(Debug)]
pub struct OutputLock {
    /// The lock file and its handle; `None` when the filesystem cannot lock.
    held: Option<(PathBuf, File)>,
}

impl OutputLock {
    /// Takes the lock of `dir` (created if missing) for the run `tag`, or fails at once with
    /// [`CoreError::Locked`] naming the holder.
    pub fn acquire(dir: &Path, tag: &str) -> Result<OutputLock> {
        std::fs::create_dir_all(dir).map_err(|e| CoreError::io(dir, e))?;
        let path = dir.join(LOCK_NAME);
        // A holder may remove the file between our open and our lock: then we hold a lock on a
        // file nobody else can see, and must try again with the new one.
        for _ in 0..100 {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .mode(0o644)
                .open(&path)
                .map_err(|e| CoreError::io(&path, e))?;
            match try_lock(&file) {
                Ok(true) => {}
                Ok(false) => {
                    let mut holder = String::new();
                    let _ = file.read_to_string(&mut holder);
                    return Err(CoreError::Locked {
                        dir: dir.to_path_buf(),
                        holder: describe_holder(&holder),
                    });
                }
                Err(e) => {
                    tracing::warn!(
                        "cannot lock {} ({e}): this filesystem does not support flock; make sure no other save writes into {} at the same time",
                        path.display(),
                        dir.display()
                    );
                    return Ok(OutputLock { held: None });
                }
            }
            let same = match (file.metadata(), std::fs::symlink_metadata(&path)) {
                (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
                _ => false,
            };
            if !same {
                continue;
            }
            let record = format!(
                "host={} pid={} tag={tag}\n",
                crate::host::hostname(),
                std::process::id()
            );
            file.set_len(0)
                .and_then(|()| file.write_all(record.as_bytes()))
                .map_err(|e| CoreError::io(&path, e))?;
            return Ok(OutputLock {
                held: Some((path, file)),
            });
        }
        Err(CoreError::Locked {
            dir: dir.to_path_buf(),
            holder: "saves that keep replacing the lock file".into(),
        })
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Removed while still locked, so that no one takes a lock on a file about to vanish
        // without noticing (see the inode check in `acquire`).
        if let Some((path, file)) = self.held.take() {
            let _ = std::fs::remove_file(&path);
            drop(file);
        }
    }
}

/// `flock(LOCK_EX | LOCK_NB)`: `Ok(true)` when taken, `Ok(false)` when another open file
/// description holds it. (std's `File::try_lock` needs Rust 1.89; the workspace supports 1.85.)
fn try_lock(file: &File) -> std::io::Result<bool> {
    loop {
        // SAFETY: flock takes a descriptor and integer flags and touches no memory of ours; the
        // descriptor is owned by `file`, which outlives the call. The lock is released when the
        // descriptor is closed (when `file` is dropped).
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => return Err(e),
        }
    }
}

/// "process 1234 on host gpu7 (run TAG)" from the lock file's record.
fn describe_holder(record: &str) -> String {
    let field = |k: &str| {
        record
            .split_whitespace()
            .find_map(|f| f.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
    };
    match (field("pid"), field("host")) {
        (Some(pid), Some(host)) => format!(
            "process {pid} on host {host}{}",
            field("tag")
                .map(|t| format!(", run {t}"))
                .unwrap_or_default()
        ),
        _ => "a save that has not yet said who it is".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_fails_naming_the_holder_and_the_file_goes_at_the_end() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        let a = OutputLock::acquire(&out, "tagA").unwrap();
        let err = OutputLock::acquire(&out, "tagB").unwrap_err().to_string();
        let pid = std::process::id().to_string();
        assert!(err.contains(&format!("process {pid} on host")), "{err}");
        assert!(err.contains(", run tagA)"), "{err}");
        assert!(out.join(LOCK_NAME).exists());
        drop(a);
        assert!(!out.join(LOCK_NAME).exists());
        // Free again; a file left by a killed holder is taken over.
        std::fs::write(out.join(LOCK_NAME), "host=x pid=1 tag=old\n").unwrap();
        let b = OutputLock::acquire(&out, "tagB").unwrap();
        let record = std::fs::read_to_string(out.join(LOCK_NAME)).unwrap();
        assert!(
            record.contains("tag=tagB") && !record.contains("old"),
            "{record}"
        );
        drop(b);
        assert!(std::fs::read_dir(&out).unwrap().next().is_none());
    }

    #[test]
    fn a_symlink_at_the_lock_path_is_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        std::os::unix::fs::symlink(&victim, d.path().join(LOCK_NAME)).unwrap();
        assert!(OutputLock::acquire(d.path(), "t").is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
    }
}
