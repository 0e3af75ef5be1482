//! The compiled conversion kernels kept between runs, so that only the first save on a machine
//! pays for NVRTC: one PTX file per kernel source, compiler options, NVRTC and driver version
//! and GPU architecture, under `$AXSAVE_CACHE_DIR`, else `$XDG_CACHE_HOME/axsave`, else
//! `~/.cache/axsave`.
//!
//! The cache is only ever a shortcut: a file that cannot be read, written or loaded by the
//! driver means a compile, as without a cache, and the kernels loaded from it pass the same
//! self-test against the CPU as freshly compiled ones. Files are written under a temporary name
//! and renamed, so ranks that compile at once never read a half-written one.

use std::path::{Path, PathBuf};

/// What makes two compiled kernel sets interchangeable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelKey<'a> {
    /// The CUDA C++ source.
    pub source: &'a str,
    /// NVRTC's options.
    pub options: &'a [&'a str],
    /// NVRTC's version (major, minor).
    pub nvrtc: (i32, i32),
    /// The driver's version (`cuDriverGetVersion`, 12080 for 12.8).
    pub driver: i32,
    /// The GPU's compute capability.
    pub cc: (i32, i32),
}

impl KernelKey<'_> {
    /// The cache file's name: `kernels-sm90-<16 hex digits of a SHA-256 of everything>.ptx`.
    pub fn file_name(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(self.source.as_bytes());
        for o in self.options {
            h.update([0u8]);
            h.update(o.as_bytes());
        }
        h.update(
            format!(
                "\0nvrtc {}.{} driver {} sm {}.{}",
                self.nvrtc.0, self.nvrtc.1, self.driver, self.cc.0, self.cc.1
            )
            .as_bytes(),
        );
        let digest = h.finalize();
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        format!("kernels-sm{}{}-{hex}.ptx", self.cc.0, self.cc.1)
    }
}

/// The cache directory from the environment (`env` looks a variable up), or `None` when no
/// variable names one. An empty `AXSAVE_CACHE_DIR` turns the cache off.
pub fn cache_dir(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let set = |k: &str| env(k).filter(|v| !v.is_empty());
    if let Some(v) = env("AXSAVE_CACHE_DIR") {
        return (!v.is_empty()).then(|| PathBuf::from(v));
    }
    if let Some(x) = set("XDG_CACHE_HOME") {
        return Some(Path::new(&x).join("axsave"));
    }
    set("HOME").map(|h| Path::new(&h).join(".cache").join("axsave"))
}

/// The cached PTX of `key` in `dir`, if there is one that reads as text.
pub fn load(dir: &Path, key: &KernelKey<'_>) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(key.file_name())).ok()?;
    // A PTX module names its version first; anything else is not ours to hand the driver.
    text.contains(".version").then_some(text)
}

/// Keeps `ptx` for `key` in `dir` (created when missing): written under a temporary name of
/// this process, then renamed over any earlier one.
pub fn store(dir: &Path, key: &KernelKey<'_>, ptx: &str) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(key.file_name());
    let tmp = dir.join(format!(".{}.{}.tmp", key.file_name(), std::process::id()));
    std::fs::write(&tmp, ptx)?;
    std::fs::rename(&tmp, &path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(cc: (i32, i32)) -> KernelKey<'static> {
        KernelKey {
            source: "extern \"C\" __global__ void k() {}",
            options: &["--std=c++17"],
            nvrtc: (12, 8),
            driver: 13000,
            cc,
        }
    }

    #[test]
    fn the_name_changes_with_anything_that_changes_the_code() {
        let a = key((9, 0));
        assert!(a.file_name().starts_with("kernels-sm90-"));
        assert!(a.file_name().ends_with(".ptx"));
        assert_eq!(a.file_name(), key((9, 0)).file_name());
        let others = [
            KernelKey {
                cc: (8, 0),
                ..a.clone()
            },
            KernelKey {
                driver: 12080,
                ..a.clone()
            },
            KernelKey {
                nvrtc: (13, 0),
                ..a.clone()
            },
            KernelKey {
                options: &["--std=c++17", "-G"],
                ..a.clone()
            },
            KernelKey {
                source: "other",
                ..a.clone()
            },
        ];
        for o in &others {
            assert_ne!(o.file_name(), a.file_name(), "{o:?}");
        }
    }

    #[test]
    fn the_directory_follows_the_environment() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(
            cache_dir(&env(&[("AXSAVE_CACHE_DIR", "/c"), ("HOME", "/h")])),
            Some(PathBuf::from("/c"))
        );
        assert_eq!(
            cache_dir(&env(&[("AXSAVE_CACHE_DIR", ""), ("HOME", "/h")])),
            None
        );
        assert_eq!(
            cache_dir(&env(&[("XDG_CACHE_HOME", "/x"), ("HOME", "/h")])),
            Some(PathBuf::from("/x/axsave"))
        );
        assert_eq!(
            cache_dir(&env(&[("HOME", "/h")])),
            Some(PathBuf::from("/h/.cache/axsave"))
        );
        assert_eq!(cache_dir(&env(&[])), None);
    }

    #[test]
    fn what_is_stored_loads_back_and_junk_does_not() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("new").join("axsave");
        let k = key((9, 0));
        assert_eq!(load(&dir, &k), None);
        let ptx = "//\n.version 8.7\n.target sm_90\n";
        let path = store(&dir, &k, ptx).unwrap();
        assert_eq!(path, dir.join(k.file_name()));
        assert_eq!(load(&dir, &k).as_deref(), Some(ptx));
        // Nothing else is left in the directory.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        // Another GPU does not see it.
        assert_eq!(load(&dir, &key((8, 0))), None);
        // A file that is not PTX is not handed to the driver.
        std::fs::write(&path, "garbage").unwrap();
        assert_eq!(load(&dir, &k), None);
    }
}
