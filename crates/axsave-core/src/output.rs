//! Output files: written under temporary names, preallocated, fsynced, renamed into place only
//! at the very end, removed on any failure.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{CoreError, Result};
use crate::layout::Layout;

/// The temporary name a final file is written under: hidden, and never a name a loader would
/// pick up (`.model.safetensors.axsave-1a2b3c.tmp`).
pub fn temp_name(final_name: &str, tag: &str) -> String {
    format!(".{final_name}.axsave-{tag}.tmp")
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

/// The output files one rank writes, open under their temporary names.
pub struct OutputFiles {
    /// For each layout file: its temporary path and handle, when this rank writes it.
    files: Vec<Option<(PathBuf, File)>>,
}

impl OutputFiles {
    /// Creates (or truncates) the temporary files of the layout files `mine` selects,
    /// reserves their full size on disk up front (so a full disk fails now, not midway) and
    /// writes their headers.
    pub fn create(
        dir: &Path,
        layout: &Layout,
        tag: &str,
        mine: impl Fn(usize) -> bool,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| CoreError::io(dir, e))?;
        let mut out = OutputFiles {
            files: Vec::with_capacity(layout.files.len()),
        };
        for (i, f) in layout.files.iter().enumerate() {
            if !mine(i) {
                out.files.push(None);
                continue;
            }
            let path = dir.join(temp_name(&f.name, tag));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .map_err(|e| CoreError::io(&path, e))?;
            // Record the path before anything else can fail, so cleanup finds it.
            out.files.push(Some((path.clone(), file)));
            let Some((_, file)) = out.files.last().and_then(|f| f.as_ref()) else {
                continue;
            };
            preallocate(file, f.size).map_err(|e| CoreError::io(&path, e))?;
            file.write_all_at(&f.header, 0)
                .map_err(|e| CoreError::io(&path, e))?;
        }
        Ok(out)
    }

    /// Writes `data` at `offset` of layout file `file`.
    pub fn write_at(&self, file: usize, offset: u64, data: &[u8]) -> Result<()> {
        let Some(Some((path, f))) = self.files.get(file) else {
            return Err(CoreError::Remote(format!(
                "asked to write file {file}, which this rank does not write"
            )));
        };
        f.write_all_at(data, offset)
            .map_err(|e| CoreError::io(path, e))?;
        Ok(())
    }

    /// Flushes every file to disk.
    pub fn sync(&self) -> Result<()> {
        for (path, f) in self.files.iter().flatten() {
            f.sync_all().map_err(|e| CoreError::io(path, e))?;
        }
        Ok(())
    }

    /// Removes every temporary file (after a failure).
    pub fn discard(self) {
        for (path, _) in self.files.into_iter().flatten() {
            let _ = std::fs::remove_file(&path);
        }
    }

    /// The temporary paths, for cleanup by others.
    pub fn temp_paths(&self) -> Vec<PathBuf> {
        self.files
            .iter()
            .flatten()
            .map(|(p, _)| p.clone())
            .collect()
    }
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
    let f = File::create(&path).map_err(|e| CoreError::io(&path, e))?;
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
