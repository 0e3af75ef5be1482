//! `axsave verify`: rebuild every output tensor from the source and compare bytes.
//!
//! The output is read as it is (its headers, its index), a [`Layout`] is made that mirrors it,
//! and the executor runs over the source with a sink that compares instead of writing. So the
//! check uses no state from the save that made the output.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};

use axsave_formats::{Catalog, st_reader};

use crate::error::{CoreError, Result};
use crate::execute::{self, CopyJob, ExecOptions, Sink};
use crate::layout::{Layout, OutFile, OutTensor};
use crate::naming::output_names;
use crate::save::all_tasks;
use crate::sources::SourceFiles;

/// What a successful verify checked.
#[derive(Clone, Debug, serde::Serialize)]
pub struct VerifyReport {
    /// Output files compared.
    pub files: usize,
    /// Tensors compared.
    pub tensors: usize,
    /// Bytes compared.
    pub bytes: u64,
    /// Tensors whose dtype differs from the source's (converted before comparing).
    pub converted: usize,
}

/// Compares the model in `output` with what `source` holds.
pub fn verify(
    source: &Catalog,
    output: &Path,
    budget: u64,
    workers: usize,
) -> Result<VerifyReport> {
    let out = st_reader::read_model(output)?;
    check_index(output, &out)?;
    let mismatch = |m: String| Err(CoreError::Mismatch(m));

    let names = output_names(source);
    let mut by_name: HashMap<&str, usize> = HashMap::new();
    for (i, n) in names.iter().enumerate() {
        if let Some(n) = n {
            by_name.insert(n.as_str(), i);
        }
    }
    let mut files: Vec<OutFile> = out
        .files
        .iter()
        .map(|f| OutFile {
            name: f.path.to_string_lossy().into_owned(),
            header: Vec::new(),
            size: f.size,
            tensors: Vec::new(),
        })
        .collect();
    let mut tensors = Vec::new();
    let mut converted = 0;
    for t in &out.tensors {
        let Some(&si) = by_name.get(t.name.as_str()) else {
            return mismatch(format!("output tensor {} is not in the source", t.name));
        };
        let s = &source.tensors[si];
        if s.shape != t.shape {
            return mismatch(format!(
                "tensor {}: shape {:?} in the output, {:?} in the source",
                t.name, t.shape, s.shape
            ));
        }
        if s.dtype != t.dtype {
            if !(s.dtype.is_convertible_float() && t.dtype.is_convertible_float()) {
                return mismatch(format!(
                    "tensor {}: dtype {} in the output, {} in the source",
                    t.name, t.dtype, s.dtype
                ));
            }
            converted += 1;
        }
        let (file, offset) = match t.pieces.first() {
            Some(p) => (p.file, p.offset),
            None => (0, 0),
        };
        files[file].tensors.push(tensors.len());
        tensors.push(OutTensor {
            name: t.name.clone(),
            source: si,
            dtype: t.dtype,
            shape: t.shape.clone(),
            file,
            offset,
            nbytes: t.nbytes(),
        });
    }
    let present: std::collections::HashSet<&str> =
        out.tensors.iter().map(|t| t.name.as_str()).collect();
    if let Some(missing) = names
        .iter()
        .flatten()
        .find(|n| !present.contains(n.as_str()))
    {
        return mismatch(format!(
            "source tensor {missing} is missing from the output"
        ));
    }
    let total_size = tensors.iter().map(|t| t.nbytes).sum();
    let layout = Layout {
        files,
        tensors,
        total_size,
        left_out: Vec::new(),
    };
    let opened: Vec<(PathBuf, File)> = out
        .files
        .iter()
        .map(|f| {
            let p = out.root.join(&f.path);
            File::open(&p)
                .map(|h| (p.clone(), h))
                .map_err(|e| CoreError::io(&p, e))
        })
        .collect::<Result<_>>()?;
    let sources = SourceFiles::new(source, &source.root);
    let tasks = all_tasks(source, &layout);
    let compared = AtomicU64::new(0);
    let job = CopyJob {
        catalog: source,
        layout: &layout,
        sources: &sources,
        tasks: &tasks,
        opts: ExecOptions::for_budget(budget, workers),
    };
    execute::run(
        job,
        &|_| 0,
        &|_| {
            Ok(CompareSink {
                files: &opened,
                layout: &layout,
                buf: Vec::new(),
            })
        },
        &compared,
        &AtomicBool::new(false),
    )?;
    Ok(VerifyReport {
        files: layout.files.len(),
        tensors: layout.tensors.len(),
        bytes: compared.into_inner(),
        converted,
    })
}

/// The index, when there is one, must list exactly the tensors of the files, in the files they
/// are in, and the right total size.
fn check_index(dir: &Path, out: &Catalog) -> Result<()> {
    let index_path = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .flatten()
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().ends_with(".safetensors.index.json")),
        Err(e) => return Err(CoreError::io(dir, e)),
    };
    let Some(index_path) = index_path else {
        return Ok(());
    };
    let text = std::fs::read_to_string(&index_path).map_err(|e| CoreError::io(&index_path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| CoreError::Mismatch(format!("{}: not JSON: {e}", index_path.display())))?;
    let map: BTreeMap<String, String> = v
        .get("weight_map")
        .and_then(|m| serde_json::from_value(m.clone()).ok())
        .ok_or_else(|| CoreError::Mismatch(format!("{}: no weight_map", index_path.display())))?;
    let actual: BTreeMap<String, String> = out
        .tensors
        .iter()
        .map(|t| {
            let file = t.pieces.first().map_or(0, |p| p.file);
            (
                t.name.clone(),
                out.files[file].path.to_string_lossy().into_owned(),
            )
        })
        .collect();
    // Tensors without data (empty) have no piece to locate them; trust the index for those.
    for (name, file) in &map {
        match actual.get(name) {
            None => {
                return Err(CoreError::Mismatch(format!(
                    "the index names {name}, which no file holds"
                )));
            }
            Some(f)
                if f != file
                    && out
                        .tensors
                        .iter()
                        .any(|t| &t.name == name && !t.pieces.is_empty()) =>
            {
                return Err(CoreError::Mismatch(format!(
                    "the index puts {name} in {file} but it is in {f}"
                )));
            }
            _ => {}
        }
    }
    if let Some(name) = actual.keys().find(|n| !map.contains_key(*n)) {
        return Err(CoreError::Mismatch(format!(
            "the index does not list {name}"
        )));
    }
    let total: u64 = out.tensors.iter().map(|t| t.nbytes()).sum();
    let recorded = v
        .get("metadata")
        .and_then(|m| m.get("total_size"))
        .and_then(|t| t.as_u64());
    if recorded != Some(total) {
        return Err(CoreError::Mismatch(format!(
            "the index says total_size {recorded:?}, the files hold {total} bytes"
        )));
    }
    Ok(())
}

/// A sink that compares with the output file instead of writing.
struct CompareSink<'a> {
    files: &'a [(PathBuf, File)],
    layout: &'a Layout,
    buf: Vec<u8>,
}

impl Sink for CompareSink<'_> {
    fn write(&mut self, file: usize, offset: u64, data: &[u8]) -> Result<()> {
        let (path, f) = &self.files[file];
        self.buf.resize(data.len(), 0);
        f.read_exact_at(&mut self.buf, offset)
            .map_err(|e| CoreError::io(path, e))?;
        if self.buf[..] != data[..] {
            let at = data
                .iter()
                .zip(&self.buf)
                .position(|(a, b)| a != b)
                .unwrap_or(0) as u64
                + offset;
            let t = self
                .layout
                .tensors
                .iter()
                .find(|t| t.file == file && t.offset <= at && at < t.offset + t.nbytes);
            let what = match t {
                Some(t) => format!(
                    "tensor {} differs from the source at element {} (byte {at} of {})",
                    t.name,
                    (at - t.offset) / t.dtype.size() as u64,
                    path.display()
                ),
                None => format!("{} differs from the source at byte {at}", path.display()),
            };
            return Err(CoreError::Mismatch(what));
        }
        Ok(())
    }
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}
