//! What a finished save reports, built the same way for the single-process and the multi-rank
//! save: the files in place (data files, then the index, then the extras), their sizes and
//! (when asked for) SHA-256, and how many tensors each output dtype has.

use std::path::{Path, PathBuf};

use axsave_formats::DType;

use crate::error::{CoreError, Result};
use crate::layout::Layout;

/// One output file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OutputFileReport {
    /// Full path.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 in hex, when computed.
    pub sha256: Option<String>,
}

/// The files a committed save put in `dir`: the layout's data files (their planned sizes, and
/// `data_shas[i]` for file `i` where known), then the index and the `extras` (their sizes on
/// disk, and their SHA-256 when `checksums`).
pub fn output_files(
    dir: &Path,
    layout: &Layout,
    extras: &[(String, Vec<u8>)],
    data_shas: Vec<Option<String>>,
    checksums: bool,
) -> Result<Vec<OutputFileReport>> {
    let mut shas = data_shas.into_iter();
    let mut files: Vec<OutputFileReport> = layout
        .files
        .iter()
        .map(|f| OutputFileReport {
            path: dir.join(&f.name),
            size: f.size,
            sha256: shas.next().flatten(),
        })
        .collect();
    for name in layout
        .index_name()
        .into_iter()
        .chain(extras.iter().map(|(n, _)| n.clone()))
    {
        let p = dir.join(&name);
        files.push(OutputFileReport {
            size: std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0),
            sha256: if checksums {
                Some(sha256_file(&p)?)
            } else {
                None
            },
            path: p,
        });
    }
    Ok(files)
}

/// The output dtypes, in order of first appearance, and how many tensors each.
pub fn dtype_counts(layout: &Layout) -> Vec<(DType, usize)> {
    let mut dtypes: Vec<(DType, usize)> = Vec::new();
    for t in &layout.tensors {
        match dtypes.iter_mut().find(|(d, _)| *d == t.dtype) {
            Some((_, c)) => *c += 1,
            None => dtypes.push((t.dtype, 1)),
        }
    }
    dtypes
}

/// SHA-256 of a file, in hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| CoreError::io(path, e))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| CoreError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{OutFile, OutTensor};

    fn tensor(name: &str, dtype: DType, file: usize) -> OutTensor {
        OutTensor {
            name: name.into(),
            source: 0,
            dtype,
            shape: vec![2],
            file,
            offset: 0,
            nbytes: 4,
        }
    }

    fn file(name: &str, size: u64) -> OutFile {
        OutFile {
            name: name.into(),
            header: Vec::new(),
            size,
            tensors: Vec::new(),
        }
    }

    #[test]
    fn dtypes_are_counted_in_order_of_first_appearance() {
        let layout = Layout {
            files: vec![file("model.safetensors", 8)],
            tensors: vec![
                tensor("a", DType::BF16, 0),
                tensor("b", DType::F32, 0),
                tensor("c", DType::BF16, 0),
            ],
            total_size: 12,
            left_out: Vec::new(),
        };
        assert_eq!(
            dtype_counts(&layout),
            vec![(DType::BF16, 2), (DType::F32, 1)]
        );
    }

    #[test]
    fn the_files_are_data_then_index_then_extras() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout {
            files: vec![
                file("model-00001-of-00002.safetensors", 100),
                file("model-00002-of-00002.safetensors", 50),
            ],
            tensors: vec![tensor("a", DType::F32, 0), tensor("b", DType::F32, 1)],
            total_size: 8,
            left_out: Vec::new(),
        };
        let index = layout.index_name().unwrap();
        std::fs::write(dir.path().join(&index), b"{}\n").unwrap();
        std::fs::write(dir.path().join("config.json"), b"abc").unwrap();
        let extras = vec![("config.json".to_string(), b"abc".to_vec())];
        let files = output_files(
            dir.path(),
            &layout,
            &extras,
            vec![Some("aa".into()), None],
            true,
        )
        .unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|f| f.path.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "model.safetensors.index.json",
                "config.json"
            ]
        );
        // Data files report their planned size and the digest their writer sent.
        assert_eq!(
            (files[0].size, files[0].sha256.as_deref()),
            (100, Some("aa"))
        );
        assert_eq!((files[1].size, files[1].sha256.as_deref()), (50, None));
        // The small files are measured and hashed where they lie.
        assert_eq!(files[2].size, 3);
        assert_eq!(
            files[3].sha256.as_deref(),
            Some("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        );
        // Without checksums nothing is read.
        let plain = output_files(dir.path(), &layout, &extras, Vec::new(), false).unwrap();
        assert!(plain.iter().all(|f| f.sha256.is_none()));
        assert_eq!(plain[3].size, 3);
    }

    #[test]
    fn a_missing_file_to_hash_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let e = sha256_file(&dir.path().join("gone"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("gone"), "{e}");
    }
}
