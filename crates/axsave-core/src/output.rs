//! Output files: written under temporary names, preallocated, fsynced, renamed into place only
//! at the very end, removed on any failure.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub use crate::direct::WriteOptions;
use crate::direct::{Target, Writers};
use crate::error::{CoreError, Result};
use crate::execute::Fill;
use crate::layout::Layout;

/// The temporary name a final file is written under: hidden, and never a name a loader would
/// pick up (`.model.safetensors.axsave-1a2b3c.tmp`).
pub fn temp_name(final_name: &str, tag: &str) -> String {
    format!(".{final_name}.axsave-{tag}.tmp")
}

/// The marker rank 0 of a sharded multi-rank save leaves in the output directory, so that the
/// other writers can check they share it (`.axsave-1a2b3c.shared`).
pub fn marker_name(tag: &str) -> String {
    format!(".axsave-{tag}.shared")
}

/// Files in `dir` that make it look like it already holds a model with this stem:
/// `{stem}.safetensors`, `{stem}-NNNNN-of-NNNNN.safetensors`, `{stem}.safetensors.index.json`.
pub fn existing_model_files(dir: &Path, stem: &str) -> Result<Vec<String>> {
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(CoreError::io(dir, e)),
    };
    for e in entries {
        let e = e.map_err(|e| CoreError::io(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if is_model_file(&name, stem) {
            found.push(name);
        }
    }
    found.sort();
    Ok(found)
}

fn is_model_file(name: &str, stem: &str) -> bool {
    let Some(rest) = name.strip_prefix(stem) else {
        return false;
    };
    if rest == ".safetensors" || rest == ".safetensors.index.json" {
        return true;
    }
    // -00001-of-00002.safetensors
    let b = rest.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|s| s.iter().all(u8::is_ascii_digit));
    rest.len() == "-00001-of-00002.safetensors".len()
        && rest.starts_with('-')
        && digits(1..6)
        && &rest[6..10] == "-of-"
        && digits(10..15)
        && rest.ends_with(".safetensors")
}

/// The output files one rank writes, open under their temporary names. Their aligned spans
/// are written with `O_DIRECT` by a few writer threads where the filesystem takes it (see
/// [`crate::direct`]); [`OutputFiles::sync`] waits for them before the fsync.
pub struct OutputFiles {
    writers: Writers,
}

impl OutputFiles {
    /// Creates the temporary files of the layout files `mine` selects, reserves their full
    /// size on disk up front (so a full disk fails now, not midway) and writes their headers;
    /// the writers are sized for `budget` bytes of memory ([`WriteOptions::for_budget`], with
    /// the environment's overrides).
    pub fn create(
        dir: &Path,
        layout: &Layout,
        tag: &str,
        budget: u64,
        mine: impl Fn(usize) -> bool,
    ) -> Result<Self> {
        let opts = WriteOptions::for_budget(budget).with_env();
        Self::create_with(dir, layout, tag, mine, opts)
    }

    /// [`OutputFiles::create`] with the writers tuned by `opts`.
    pub fn create_with(
        dir: &Path,
        layout: &Layout,
        tag: &str,
        mine: impl Fn(usize) -> bool,
        opts: WriteOptions,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| CoreError::io(dir, e))?;
        let mut targets = Vec::with_capacity(layout.files.len());
        for (i, f) in layout.files.iter().enumerate() {
            if !mine(i) {
                targets.push(None);
                continue;
            }
            let path = dir.join(temp_name(&f.name, tag));
            let file = create_exclusive(&path, true)?;
            preallocate(&file, f.size).map_err(|e| CoreError::io(&path, e))?;
            file.write_all_at(&f.header, 0)
                .map_err(|e| CoreError::io(&path, e))?;
            targets.push(Some(Target::new(path, file, opts.writers > 0)));
        }
        Ok(OutputFiles {
            writers: Writers::new(targets, opts),
        })
    }

    /// Writes `data` at `offset` of layout file `file` (`data` may be reused on return).
    pub fn write_at(&self, file: usize, offset: u64, data: &[u8]) -> Result<()> {
        self.writers.write_at(file, offset, data)
    }

    /// Waits for every write and flushes every file to disk.
    pub fn sync(&self) -> Result<()> {
        self.writers.drain()?;
        tracing::debug!(
            "{:.1} MiB written with O_DIRECT, the rest through the page cache; syncing",
            self.direct_bytes() as f64 / (1 << 20) as f64
        );
        for t in self.writers.targets().iter().flatten() {
            t.file.sync_all().map_err(|e| CoreError::io(&t.path, e))?;
        }
        Ok(())
    }

    /// Bytes written with `O_DIRECT` so far (0 where the filesystem refuses it).
    pub fn direct_bytes(&self) -> u64 {
        self.writers.direct_bytes()
    }

    /// Removes every temporary file (after a failure), once the writers have stopped.
    pub fn discard(self) {
        let paths = self.temp_paths();
        drop(self.writers);
        for path in paths {
            let _ = std::fs::remove_file(&path);
        }
    }

    /// The temporary paths, for cleanup by others.
    pub fn temp_paths(&self) -> Vec<PathBuf> {
        self.writers
            .targets()
            .iter()
            .flatten()
            .map(|t| t.path.clone())
            .collect()
    }
}

/// A sink that writes into local output files.
pub struct LocalSink<'a>(pub &'a OutputFiles);

/// Its `write_from` has the bytes produced straight into the direct-I/O writers' staging
/// buffers.
impl crate::execute::Sink for LocalSink<'_> {
    fn write(&mut self, file: usize, offset: u64, data: &[u8]) -> Result<()> {
        self.0.write_at(file, offset, data)
    }
    fn write_from(
        &mut self,
        file: usize,
        offset: u64,
        len: usize,
        scratch: &mut Vec<u8>,
        fill: &mut Fill<'_>,
    ) -> Result<()> {
        self.0.writers.write_from(file, offset, len, scratch, fill)
    }
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Creates a new file at `path`, failing if anything is there already, a symbolic link
/// included (`O_CREAT | O_EXCL | O_NOFOLLOW`): a temporary name is never an existing file or a
/// link someone planted to make axsave write elsewhere.
pub fn create_exclusive(path: &Path, read: bool) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .read(read)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .mode(0o644)
        .open(path)
        .map_err(|e| CoreError::io(path, e))
}

/// Renames the temporaries of every data file of `layout` (written by this rank or, in a
/// shared directory, by others) to their final names.
pub fn commit_files(dir: &Path, layout: &Layout, tag: &str) -> Result<()> {
    for f in &layout.files {
        let temp = dir.join(temp_name(&f.name, tag));
        std::fs::rename(&temp, dir.join(&f.name)).map_err(|e| CoreError::io(&temp, e))?;
    }
    Ok(())
}

/// Writes a small file (the index, a config) under a temporary name and fsyncs it; returns the
/// temporary path, to be renamed by [`commit_small`].
pub fn write_small(dir: &Path, final_name: &str, tag: &str, bytes: &[u8]) -> Result<PathBuf> {
    let path = dir.join(temp_name(final_name, tag));
    let f = create_exclusive(&path, false)?;
    f.write_all_at(bytes, 0)
        .map_err(|e| CoreError::io(&path, e))?;
    f.sync_all().map_err(|e| CoreError::io(&path, e))?;
    Ok(path)
}

/// Renames a temporary written by [`write_small`] into place.
pub fn commit_small(dir: &Path, temp: &Path, final_name: &str) -> Result<PathBuf> {
    let final_path = dir.join(final_name);
    std::fs::rename(temp, &final_path).map_err(|e| CoreError::io(temp, e))?;
    Ok(final_path)
}

/// Fsyncs a directory so renames in it survive a crash.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let d = File::open(dir).map_err(|e| CoreError::io(dir, e))?;
    d.sync_all().map_err(|e| CoreError::io(dir, e))
}

/// Removes the temporaries of run `tag` in `dir` for the given final names (any rank can do
/// this for another that died, when they share the directory).
pub fn remove_temps(dir: &Path, final_names: &[String], tag: &str) {
    for n in final_names {
        let _ = std::fs::remove_file(dir.join(temp_name(n, tag)));
    }
}

/// Removes every temporary of run `tag` in `dir` ([`temp_name`] of any final name), whoever
/// made it: a rank cleaning up after a failure may not know the file names yet.
pub fn remove_run_temps(dir: &Path, tag: &str) {
    let suffix = format!(".axsave-{tag}.tmp");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.ends_with(&suffix) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The run tag in a temporary's name (`.NAME.axsave-TAG.tmp`) or in a sharded-mode marker
/// (`.axsave-TAG.shared`); `None` for other names.
pub fn tag_of_temp(name: &str) -> Option<&str> {
    if !name.starts_with('.') {
        return None;
    }
    if let Some(rest) = name.strip_suffix(".tmp") {
        return rest
            .rfind(".axsave-")
            .map(|i| &rest[i + ".axsave-".len()..]);
    }
    name.strip_prefix(".axsave-")
        .and_then(|r| r.strip_suffix(".shared"))
}

/// What [`sweep_stale_temps`] did.
#[derive(Clone, Debug, Default)]
pub struct StaleSweep {
    /// Temporaries (and markers) of dead runs that were removed, and their total size.
    pub removed: Vec<String>,
    /// Bytes they held.
    pub removed_bytes: u64,
    /// Temporaries left in place, each with the reason.
    pub kept: Vec<(String, String)>,
}

impl StaleSweep {
    /// One line per finding, for the log (empty when there was nothing).
    pub fn messages(&self, dir: &Path) -> Vec<String> {
        let mut m = Vec::new();
        if !self.removed.is_empty() {
            m.push(format!(
                "removed {} stale temporar{} ({} bytes) of an interrupted earlier save from {}: {}",
                self.removed.len(),
                if self.removed.len() == 1 { "y" } else { "ies" },
                self.removed_bytes,
                dir.display(),
                self.removed.join(", ")
            ));
        }
        for (name, why) in &self.kept {
            m.push(format!("left {name} in {}: {why}", dir.display()));
        }
        m
    }
}

/// Removes the temporaries and markers of earlier runs in `dir` whose owner is provably dead
/// ([`RunTag::liveness`](crate::runtag::RunTag::liveness)): a save killed by SIGKILL or on a
/// node that crashed. Those of runs that may still be going (alive on this host, or made on
/// another host, or by an older axsave whose tags say nothing) are left and reported. The
/// caller holds the output lock; `own_tag` is this run's.
pub fn sweep_stale_temps(dir: &Path, own_tag: &str) -> StaleSweep {
    use crate::runtag::{Liveness, RunTag};
    let mut sweep = StaleSweep::default();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return sweep;
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in names {
        let Some(tag) = tag_of_temp(&name) else {
            continue;
        };
        if tag == own_tag {
            continue;
        }
        let path = dir.join(&name);
        let why = match RunTag::parse(tag).map(|t| (t, t.liveness())) {
            Some((_, Liveness::Dead)) => {
                let size = std::fs::symlink_metadata(&path)
                    .map(|m| m.len())
                    .unwrap_or(0);
                match std::fs::remove_file(&path) {
                    Ok(()) => {
                        sweep.removed.push(name);
                        sweep.removed_bytes += size;
                    }
                    Err(e) => sweep.kept.push((
                        name,
                        format!("a stale temporary that cannot be removed: {e}"),
                    )),
                }
                continue;
            }
            Some((t, Liveness::Alive)) => {
                format!("its save (process {}) is still running on this host", t.pid)
            }
            Some((_, Liveness::Unknown)) => "made by a save on another host, which may still be \
                running (remove it by hand once no save writes here)"
                .to_string(),
            None => "made by an older axsave or something else; remove it by hand once no save \
                writes here"
                .to_string(),
        };
        sweep.kept.push((name, why));
    }
    sweep
}

/// Reserves `len` bytes for `file` so that a full disk is found before any data is written.
fn preallocate(file: &File, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let Ok(off_len) = libc::off_t::try_from(len) else {
        return Err(std::io::Error::other("file too large"));
    };
    if len == 0 {
        return Ok(());
    }
    // SAFETY: fallocate only reads its integer arguments; the descriptor is owned by `file`,
    // which outlives the call.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, off_len) };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        // Filesystems without fallocate (some network ones): a sparse file will do.
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => file.set_len(len),
        _ => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every temporary of the run goes, whatever its final name; nothing else does.
    #[test]
    fn run_temps_are_found_by_tag() {
        let d = tempfile::tempdir().unwrap();
        let names = [
            temp_name("model-00001-of-00002.safetensors", "t1"),
            temp_name("model.safetensors.index.json", "t1"),
            temp_name("model.safetensors", "t2"),
            "model.safetensors".to_string(),
            "axsave-t1.tmp".to_string(),
        ];
        for n in &names {
            std::fs::write(d.path().join(n), b"x").unwrap();
        }
        remove_run_temps(d.path(), "t1");
        let mut left: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                ".model.safetensors.axsave-t2.tmp",
                "axsave-t1.tmp",
                "model.safetensors"
            ]
        );
        // A directory that does not exist is nothing to clean.
        remove_run_temps(&d.path().join("missing"), "t1");
    }

    /// A link (or any file) planted at a temporary's name is never followed or reused: the
    /// save fails on it and the link's target is untouched.
    #[test]
    fn temporaries_are_created_exclusively_without_following_links() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let tag = crate::runtag::RunTag::new().to_string();
        let planted = d.path().join(temp_name("model.safetensors", &tag));
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        let err = write_small(d.path(), "model.safetensors", &tag, b"new").unwrap_err();
        assert!(err.to_string().contains("exists"), "{err}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        // A dangling link is not followed either (O_CREAT alone would create its target).
        std::fs::remove_file(&victim).unwrap();
        assert!(create_exclusive(&planted, true).is_err());
        assert!(!victim.exists());
        // Names from two tags made at once differ.
        assert_ne!(
            crate::runtag::RunTag::new().to_string(),
            crate::runtag::RunTag::new().to_string()
        );
    }

    #[test]
    fn temp_tags_are_found_in_names() {
        assert_eq!(
            tag_of_temp(".model.safetensors.axsave-ab-1.tmp"),
            Some("ab-1")
        );
        assert_eq!(tag_of_temp(".axsave-ab-1.shared"), Some("ab-1"));
        assert_eq!(tag_of_temp(".axsave.lock"), None);
        assert_eq!(tag_of_temp("model.safetensors"), None);
        assert_eq!(tag_of_temp(".x.tmp"), None);
    }

    #[test]
    fn model_file_names() {
        assert!(is_model_file("model.safetensors", "model"));
        assert!(is_model_file("model.safetensors.index.json", "model"));
        assert!(is_model_file("model-00001-of-00003.safetensors", "model"));
        assert!(!is_model_file("model-1-of-3.safetensors", "model"));
        assert!(!is_model_file(".model.safetensors.axsave-x.tmp", "model"));
        assert!(!is_model_file("adapter_model.safetensors", "model"));
        assert!(is_model_file("adapter_model.safetensors", "adapter_model"));
    }
}
