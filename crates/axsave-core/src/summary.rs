//! What the commands print: `inspect`'s table and JSON, `--dry-run`'s plan, and the JSON
//! summaries of a save and a merge (`--json`). Built here, printed by the binary.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use axsave_formats::{Catalog, DType};
use serde_json::{Value, json};

use crate::axolotl::CleanupPlan;
use crate::axolotl::resolve::Resolved;
use crate::error::Result;
use crate::size::human;

/// Appends a formatted line to a `String` (writing to a `String` cannot fail).
macro_rules! outln {
    ($o:expr) => {
        $o.push('\n')
    };
    ($o:expr, $($arg:tt)*) => {{
        let _ = writeln!($o, $($arg)*);
    }};
}

/// `"s"` unless `n` is 1.
fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// `axsave inspect --json`: format, writer ranks, files and every tensor with its pieces.
pub fn inspect_json(c: &Catalog) -> Value {
    let tensors: Vec<_> = c
        .tensors
        .iter()
        .map(|t| {
            json!({
                "name": t.name,
                "dtype": t.dtype,
                "shape": t.shape,
                "bytes": t.nbytes(),
                "pieces": t.pieces.iter().map(|p| json!({
                    "region": p.region,
                    "file": c.files[p.file].path,
                    "offset": p.offset,
                    "strides": p.strides,
                    "stored_dtype": p.stored_dtype,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "format": c.format,
        "format_name": c.format.to_string(),
        "writer_ranks": c.writer_ranks,
        "files": c.files,
        "total_bytes": c.total_bytes(),
        "tensors": tensors,
        "skipped": c.skipped,
        "notes": c.notes,
    })
}

/// `axsave inspect`: a summary, then one line per tensor.
pub fn inspect_text(c: &Catalog) -> String {
    let mut o = String::new();
    outln!(o, "format:       {}", c.format);
    if let Some(r) = c.writer_ranks {
        outln!(o, "written by:   {r} rank{}", plural(r));
    }
    outln!(o, "files:        {}", c.files.len());
    outln!(o, "tensors:      {}", c.tensors.len());
    let total = c.total_bytes();
    outln!(o, "total:        {} ({total} bytes)", human(total));
    if !c.skipped.is_empty() {
        let (n, names) = (c.skipped.len(), c.skipped.join(", "));
        outln!(o, "non-tensors:  {n} skipped ({names})");
    }
    for n in &c.notes {
        outln!(o, "note:         {n}");
    }
    outln!(o);
    let width = c.tensors.iter().map(|t| t.name.len()).max().unwrap_or(4);
    let width = width.max(4);
    let row = |o: &mut String, name: &str, dtype: &str, shape: &str, pieces: &str, bytes: &str| {
        outln!(
            o,
            "{name:<width$}  {dtype:<7}  {shape:<20}  {pieces:>6}  {bytes:>12}"
        );
    };
    row(&mut o, "name", "dtype", "shape", "pieces", "bytes");
    for t in &c.tensors {
        let shape = format!("{:?}", t.shape);
        let (pieces, bytes) = (t.pieces.len().to_string(), t.nbytes().to_string());
        row(
            &mut o,
            &t.name,
            &t.dtype.to_string(),
            &shape,
            &pieces,
            &bytes,
        );
    }
    o
}

/// `--dry-run`: what a save would read and write (and what `--cleanup` would remove).
pub fn dry_run_text(r: &Resolved, cleanup: Option<&CleanupPlan>) -> Result<String> {
    let source = PathBuf::from(&r.source);
    let catalog = axsave_formats::detect::open(&source)?;
    let layout = crate::layout::plan_layout(&catalog, &r.layout)?;
    let mut o = String::new();
    outln!(o, "dry run: nothing is written");
    let (n, size) = (catalog.tensors.len(), human(catalog.total_bytes()));
    let (src, format) = (source.display(), &catalog.format);
    outln!(o, "source:  {src} ({format}, {n} tensors, {size})");
    let (n, size) = (layout.tensors.len(), human(layout.total_size));
    let (out, dtype) = (r.output.display(), r.layout.dtype.as_str());
    outln!(o, "output:  {out} ({n} tensors, {size}, dtype {dtype})");
    outln!(o, "mode:    {}", r.mode.as_str());
    for f in &layout.files {
        let (name, size, n) = (&f.name, f.size, f.tensors.len());
        outln!(o, "  would write {name} ({size} bytes, {n} tensors)");
    }
    if let Some(name) = layout.index_name() {
        outln!(o, "  would write {name}");
    }
    for (name, from) in r.extras.sources() {
        outln!(o, "  would write {name} (from {from})");
    }
    let existing = crate::output::existing_model_files(&r.output, &r.layout.stem)?;
    if !existing.is_empty() {
        let names = existing.join(", ");
        outln!(
            o,
            "  {out} already holds {names} (a save would need --force)"
        );
    }
    for p in cleanup.iter().flat_map(|c| &c.remove) {
        outln!(o, "cleanup: would remove {} after success", p.display());
    }
    Ok(o)
}

/// What a save reads: "DIR: FORMAT (N tensors, SIZE, written by R ranks)".
pub fn source_line(source: &Path, c: &Catalog) -> String {
    let ranks = c
        .writer_ranks
        .map(|r| format!(", written by {r} rank{}", plural(r)));
    let (n, size) = (c.tensors.len(), human(c.total_bytes()));
    let (src, format, ranks) = (source.display(), &c.format, ranks.unwrap_or_default());
    format!("{src}: {format} ({n} tensors, {size}{ranks})")
}

/// How many tensors of each dtype, in order of first appearance.
pub fn dtype_counts(dtypes: impl IntoIterator<Item = DType>) -> Vec<(DType, usize)> {
    let mut counts: Vec<(DType, usize)> = Vec::new();
    for d in dtypes {
        match counts.iter_mut().find(|(c, _)| *c == d) {
            Some((_, n)) => *n += 1,
            None => counts.push((d, 1)),
        }
    }
    counts
}

/// `{"BF16": 20, "I64": 1}`: how many tensors of each output dtype.
pub fn dtype_json(d: &[(DType, usize)]) -> Value {
    Value::Object(
        d.iter()
            .map(|(t, n)| (t.to_string(), Value::from(*n)))
            .collect(),
    )
}

/// The written files with their sizes and SHA-256.
pub fn files_json(files: &[(PathBuf, u64)]) -> Result<Vec<Value>> {
    files
        .iter()
        .map(|(p, size)| {
            let sha = crate::distributed::sha256_file(p)?;
            Ok(json!({"path": p, "size": size, "sha256": sha}))
        })
        .collect()
}

/// `merge-lora --json`.
pub fn merge_json(output: &Path, report: &crate::merge_lora::MergeReport) -> Result<Value> {
    Ok(json!({
        "output": output,
        "files": files_json(&report.files)?,
        "tensors": report.tensors,
        "merged": report.merged,
        "replaced": report.replaced,
        "bytes": report.bytes,
        "seconds": report.seconds,
    }))
}

/// What `--json` prints after a save: one shape whether one process or several ranks made it
/// ([`SaveJson::of_ranks`], [`SaveJson::of_process`]).
#[derive(Debug, serde::Serialize)]
pub struct SaveJson {
    /// The output directory.
    pub output: PathBuf,
    /// Each file written: path, size, SHA-256.
    pub files: Value,
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
    /// Tensors per output dtype.
    pub dtype: Value,
    /// The checkpoint's format.
    pub format: String,
    /// Seconds the save took.
    pub seconds: f64,
    /// Bytes that crossed between ranks.
    pub network_bytes: u64,
    /// The transport between ranks (`none` for one process).
    pub transport: String,
    /// Which path each class of bytes took and why.
    pub route: Value,
    /// The GPU that converted, when one process used one.
    pub gpu: Option<String>,
    /// `gather` or `sharded`.
    pub mode: String,
    /// Ranks that took part.
    pub world_size: usize,
    /// The launcher that started the ranks.
    pub launcher: String,
}

impl SaveJson {
    /// A save by several ranks (on rank 0).
    pub fn of_ranks(
        output: &Path,
        report: &crate::distributed::DistReport,
        launcher: axsave_dist::Launcher,
    ) -> Result<SaveJson> {
        Ok(SaveJson {
            output: output.to_path_buf(),
            files: serde_json::to_value(&report.files)
                .map_err(|e| crate::error::CoreError::Internal(e.to_string()))?,
            tensors: report.tensors,
            bytes: report.bytes,
            dtype: dtype_json(&report.dtypes),
            format: report.format.clone(),
            seconds: report.seconds,
            network_bytes: report.network_bytes,
            transport: report.transport.as_str().to_string(),
            route: serde_json::to_value(&report.route)
                .map_err(|e| crate::error::CoreError::Internal(e.to_string()))?,
            gpu: None,
            mode: report.mode.as_str().to_string(),
            world_size: report.world_size,
            launcher: launcher.to_string(),
        })
    }

    /// A save by one process (`gpu`: the GPU that converted, if one did; `seconds`: the whole
    /// command's).
    pub fn of_process(
        output: &Path,
        report: &crate::save::SaveReport,
        layout: &crate::layout::Layout,
        format: &axsave_formats::Format,
        seconds: f64,
        gpu: Option<String>,
        launcher: axsave_dist::Launcher,
    ) -> Result<SaveJson> {
        let dtypes = dtype_counts(layout.tensors.iter().map(|t| t.dtype));
        Ok(SaveJson {
            output: output.to_path_buf(),
            files: Value::Array(files_json(&report.files)?),
            tensors: report.tensors,
            bytes: report.bytes,
            dtype: dtype_json(&dtypes),
            format: format.to_string(),
            seconds,
            network_bytes: 0,
            transport: "none".into(),
            route: json!([{
                "class": "local",
                "bytes": report.bytes,
                "path": if gpu.is_some() { "gpu" } else { "cpu" },
                "why": if gpu.is_some() { "--transport nccl" } else { "read and written by one process" },
            }]),
            gpu,
            mode: "gather".into(),
            world_size: 1,
            launcher: launcher.to_string(),
        })
    }
}

/// `axsave verify`'s line: "ok: N tensors in F files match the source (SIZE)".
pub fn verified_line(r: &crate::verify::VerifyReport) -> String {
    let converted = match r.converted {
        0 => String::new(),
        n => format!(", {n} converted before comparing"),
    };
    let (t, f, size) = (r.tensors, r.files, human(r.bytes));
    format!(
        "ok: {t} tensors in {f} file{} match the source ({size}{converted})",
        plural(f)
    )
}

/// The log line that ends a save: "wrote N tensors, SIZE in F files to DIR in Ss (RATE/s)".
pub fn wrote_line(tensors: usize, bytes: u64, files: usize, output: &Path, seconds: f64) -> String {
    format!(
        "wrote {tensors} tensors, {} in {files} file{} to {} in {seconds:.2}s ({}/s)",
        human(bytes),
        plural(files),
        output.display(),
        human((bytes as f64 / seconds.max(1e-9)) as u64),
    )
}

/// `axsave gpu-bench`: one row per measurement (a row of no bytes is a heading).
#[cfg(feature = "cuda")]
pub fn bench_text(device: &str, bytes: u64, rows: &[crate::gpu::bench::Row]) -> String {
    let mut o = String::new();
    let size = human(bytes);
    outln!(o, "GPU {device}, {size} per measurement (best of several)");
    outln!(o, "{:<58} {:>10} {:>10}", "", "GB/s", "ms");
    for r in rows {
        if r.bytes == 0 {
            outln!(o, "{}", r.what);
        } else {
            let (what, rate, ms) = (&r.what, r.gb_per_s, r.seconds * 1e3);
            outln!(o, "{what:<58} {rate:>10.1} {ms:>10.2}");
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtypes_are_counted_in_order_of_appearance() {
        let c = dtype_counts([DType::BF16, DType::I64, DType::BF16]);
        assert_eq!(c, vec![(DType::BF16, 2), (DType::I64, 1)]);
        assert_eq!(dtype_json(&c).to_string(), r#"{"BF16":2,"I64":1}"#);
    }

    #[test]
    fn the_last_line_of_a_save() {
        let line = wrote_line(3, 3_000_000, 1, Path::new("out"), 1.5);
        assert_eq!(
            line,
            "wrote 3 tensors, 3.00 MB in 1 file to out in 1.50s (2.00 MB/s)"
        );
    }
}
