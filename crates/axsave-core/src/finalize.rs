//! The last step of a save: putting the finished files in place under their final names, in
//! an order a reader never sees as a whole-looking mix of an old and a new model.

use std::path::{Path, PathBuf};

use crate::error::{CoreError, Result};
use crate::layout::Layout;
use crate::output;

/// Puts a finished output in place, in an order that never shows a whole-looking mix of old
/// and new: the small files (the index, `extras` such as the tokenizer) are written under
/// temporary names first; then the old index goes, the new data files are renamed in, old data
/// files the new model does not have are removed, the extras are renamed in, and the new index
/// comes last.
pub fn finalize(
    dir: &Path,
    layout: &Layout,
    tag: &str,
    extras: &[(String, Vec<u8>)],
    existing: &[String],
) -> Result<Vec<String>> {
    let mut small: Vec<(PathBuf, String)> = Vec::new();
    let written = (|| -> Result<()> {
        for (name, bytes) in extras {
            small.push((output::write_small(dir, name, tag, bytes)?, name.clone()));
        }
        if let (Some(name), Some(json)) = (layout.index_name(), layout.index_json()) {
            small.push((output::write_small(dir, &name, tag, json.as_bytes())?, name));
        }
        Ok(())
    })();
    if let Err(e) = written {
        for (p, _) in &small {
            let _ = std::fs::remove_file(p);
        }
        output::remove_temps(dir, &layout.final_names(), tag);
        return Err(e);
    }
    let new_names = layout.final_names();
    let mut replaced = Vec::new();
    for old in existing.iter().filter(|n| n.ends_with(".index.json")) {
        std::fs::remove_file(dir.join(old)).map_err(|e| CoreError::io(dir.join(old), e))?;
        replaced.push(old.clone());
    }
    output::commit_files(dir, layout, tag)?;
    for old in existing
        .iter()
        .filter(|n| !n.ends_with(".index.json") && !new_names.contains(n))
    {
        std::fs::remove_file(dir.join(old)).map_err(|e| CoreError::io(dir.join(old), e))?;
        replaced.push(old.clone());
    }
    // The index was pushed last, so it is renamed last.
    for (temp, name) in &small {
        output::commit_small(dir, temp, name)?;
    }
    output::sync_dir(dir)?;
    Ok(replaced)
}
