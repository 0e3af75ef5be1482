//! Phase 2, the catalog: every rank lists what it sees of the source. When all see the same
//! files (a shared filesystem) rank 0 reads the catalog alone; otherwise every rank reads the
//! part it sees (DCP metadata travels from the rank that holds it) and rank 0 merges the parts.
//! Rank 0 then makes the layout and the plan, checks the output directory, and broadcasts it
//! all (the [`Bundle`]).

use std::path::{Path, PathBuf};

use axsave_dist::store::rendezvous::broadcast_bytes;
use axsave_formats::Catalog;
use axsave_formats::detect::{self, Detected};

use super::borrow;
use super::inventory::{self, Inventory};
use super::{Rank, identity, json, unjson};
use crate::error::{CoreError, Result};
use crate::host::hostname;
use crate::layout::{Layout, plan_layout};
use crate::output::{self, marker_name};
use crate::plan::{Mode, Plan, make_plan};
use crate::save::check_output;

/// Everything rank 0 decides and every rank needs.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct Bundle {
    pub(super) catalog: Catalog,
    pub(super) readers: Vec<Vec<usize>>,
    pub(super) layout: Layout,
    pub(super) plan: Plan,
    pub(super) shared_source: bool,
    /// Each rank's node (from the inventories every rank has), to class the bytes.
    #[serde(skip)]
    pub(super) nodes: Vec<String>,
    /// The files this rank reads through another rank's path on this node ([`borrow`]):
    /// (name in the catalog, path).
    #[serde(skip)]
    pub(super) borrowed: Vec<(String, PathBuf)>,
}

/// Whether every rank sees the same files of a checkpoint rank 0 recognizes (a shared
/// filesystem): then rank 0 reads the whole catalog itself.
pub(super) fn is_shared_source(invs: &[Inventory]) -> bool {
    match invs.first() {
        Some(first) => invs.iter().all(|i| i.files == first.files) && first.detected.is_some(),
        None => false,
    }
}

/// Where the catalog's files are read from: the source directory, or the directory of a single
/// source file.
pub(super) fn root_of(source: &Path) -> PathBuf {
    if source.is_file() {
        source.parent().unwrap_or(Path::new(".")).to_path_buf()
    } else {
        source.to_path_buf()
    }
}

impl Rank<'_> {
    /// Phase 2: the inventories, the catalog (read or merged), rank 0's plan; returns the
    /// bundle every rank works from, its catalog rooted at this rank's view of the source.
    pub(super) fn catalog(&mut self, tag: &str) -> Result<Bundle> {
        let (me, n) = (self.world.rank, self.world.world_size);
        let opts = self.opts;
        let source = PathBuf::from(inventory::expand_source(
            &opts.source,
            me,
            self.world.local_rank,
            self.world.node_rank,
        )?);
        let inv = inventory::take(&source)?;
        broadcast_bytes(self.client, &format!("inv/{me}"), &json(&inv)?)?;
        let mut invs: Vec<Inventory> = Vec::with_capacity(n);
        for r in 0..n {
            let d = self.deadline();
            let b = self.receive(&format!("inv/{r}"), d)?;
            invs.push(unjson(&b, "inventory")?);
        }
        // Every rank must read the same checkpoint; each rank checks all, so all fail alike.
        let ids: Vec<identity::Identity> = invs.iter().map(|i| i.identity.clone()).collect();
        identity::check_same(&ids)?;

        let mut borrowed = Vec::new();
        let mut bundle: Bundle = if is_shared_source(&invs) {
            if me == 0 {
                let catalog = detect::open(&source)?;
                let readers = vec![(0..n).collect::<Vec<_>>(); catalog.files.len()];
                self.plan_and_send(catalog, readers, true, tag)?
            } else {
                let d = self.far();
                unjson(&self.receive("bundle", d)?, "plan")?
            }
        } else {
            let format = invs.iter().find_map(|i| i.detected).ok_or_else(|| {
                CoreError::Remote(format!(
                    "no rank finds a checkpoint at --source {} (rank {me} looked in {})",
                    opts.source,
                    source.display()
                ))
            })?;
            let metadata = if format == Detected::Dcp {
                let holder = invs
                    .iter()
                    .position(|i| !i.metadata.is_empty())
                    .ok_or_else(|| {
                        CoreError::Remote("no rank sees the DCP .metadata file".into())
                    })?;
                if holder == me {
                    let m = axsave_formats::dcp::load_metadata(&source)?;
                    broadcast_bytes(self.client, "meta", &json(&m)?)?;
                    m
                } else {
                    let d = self.deadline();
                    unjson(&self.receive("meta", d)?, "metadata")?
                }
            } else {
                Vec::new()
            };
            let part = detect::open_partial(&source, format, &metadata)?;
            broadcast_bytes(self.client, &format!("part/{me}"), &json(&part)?)?;
            // What this rank can read by another rank's path on this node; rank 0 adds it to
            // the readers, so the plan lets the writer read such a piece itself.
            borrowed = if crate::fault::own_files_only() {
                Vec::new()
            } else {
                borrow::borrowable(me, &invs, &borrow::stat)
            };
            let names: Vec<&String> = borrowed.iter().map(|(n, _)| n).collect();
            broadcast_bytes(self.client, &format!("borrow/{me}"), &json(&names)?)?;
            if !borrowed.is_empty() {
                tracing::debug!(
                    rank = me,
                    "reads {} file(s) other ranks of this node listed, through their paths (same device and inode)",
                    borrowed.len()
                );
            }
            if me == 0 {
                let mut parts = Vec::with_capacity(n);
                for r in 0..n {
                    let d = self.deadline();
                    parts.push((
                        r,
                        unjson::<Catalog>(&self.receive(&format!("part/{r}"), d)?, "catalog part")?,
                    ));
                }
                let mut merged = Catalog::merge(parts).map_err(|e| {
                    CoreError::Format(axsave_formats::FormatError::invalid(&opts.source, e))
                })?;
                let mut taken = Vec::with_capacity(n);
                for r in 0..n {
                    let d = self.deadline();
                    let b = self.receive(&format!("borrow/{r}"), d)?;
                    taken.push(unjson::<Vec<String>>(&b, "borrowed files")?);
                }
                let names: Vec<String> = merged
                    .catalog
                    .files
                    .iter()
                    .map(|f| f.path.to_string_lossy().into_owned())
                    .collect();
                borrow::add_readers(&mut merged.readers, &names, &taken);
                let k: usize = taken.iter().map(Vec::len).sum();
                if k > 0 {
                    tracing::info!(
                        "{k} file(s) read by ranks of the same node through another rank's path (same device and inode): their pieces need not be sent"
                    );
                }
                self.plan_and_send(merged.catalog, merged.readers, false, tag)?
            } else {
                let d = self.far();
                unjson(&self.receive("bundle", d)?, "plan")?
            }
        };
        bundle.catalog.root = root_of(&source);
        bundle.nodes = invs.into_iter().map(|i| i.node).collect();
        bundle.borrowed = borrowed;
        Ok(bundle)
    }

    /// Rank 0: layout, plan, the output checks, and the broadcast of it all.
    fn plan_and_send(
        &mut self,
        catalog: Catalog,
        readers: Vec<Vec<usize>>,
        shared_source: bool,
        tag: &str,
    ) -> Result<Bundle> {
        let n = self.world.world_size;
        let mut lopts = self.opts.layout.clone();
        if self.opts.mode == Mode::Sharded {
            lopts.min_files = lopts.min_files.max(n);
        }
        let layout = plan_layout(&catalog, &lopts)?;
        let plan = make_plan(&catalog, &layout, &readers, n, self.opts.mode)?;
        // Held to the end of the commit: a second save into this directory fails at once.
        self.lock = Some(crate::lock::OutputLock::acquire(&self.opts.output, tag)?);
        check_output(&self.opts.output, &self.opts.layout.stem, self.opts.force)?;
        for m in output::sweep_stale_temps(&self.opts.output, tag).messages(&self.opts.output) {
            tracing::warn!("{m}");
        }
        if self.opts.mode == Mode::Sharded {
            let marker = self.opts.output.join(marker_name(tag));
            // Created exclusively, never through a link planted at its name.
            std::io::Write::write_all(
                &mut output::create_exclusive(&marker, false)?,
                hostname().as_bytes(),
            )
            .map_err(|e| CoreError::io(&marker, e))?;
        }
        let bundle = Bundle {
            catalog,
            readers,
            layout,
            plan,
            shared_source,
            nodes: Vec::new(),
            borrowed: Vec::new(),
        };
        broadcast_bytes(self.client, "bundle", &json(&bundle)?)?;
        Ok(bundle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use inventory::FileId;

    fn inv(files: &[(&str, u64)], detected: Option<Detected>) -> Inventory {
        Inventory {
            files: files
                .iter()
                .map(|&(name, size)| FileId {
                    name: name.into(),
                    size,
                    mtime_ns: 1,
                })
                .collect(),
            detected,
            ids: Vec::new(),
            metadata: Vec::new(),
            identity: Default::default(),
            node: String::new(),
            root: String::new(),
        }
    }

    #[test]
    fn the_same_files_everywhere_is_a_shared_source() {
        let a = inv(&[("x.safetensors", 8)], Some(Detected::Safetensors));
        assert!(is_shared_source(&[a.clone(), a.clone(), a]));
    }

    #[test]
    fn different_views_or_an_unknown_format_are_not_shared() {
        let a = inv(&[("__0_0.distcp", 8)], Some(Detected::Dcp));
        let b = inv(&[("__1_0.distcp", 8)], Some(Detected::Dcp));
        assert!(!is_shared_source(&[a.clone(), b]));
        // The same size but another file is another view.
        let c = inv(&[("__0_0.distcp", 9)], Some(Detected::Dcp));
        assert!(!is_shared_source(&[a, c]));
        // Everyone sees the same files, but rank 0 recognizes no checkpoint there.
        let d = inv(&[("notes.txt", 3)], None);
        assert!(!is_shared_source(&[d.clone(), d]));
        assert!(!is_shared_source(&[]));
    }

    #[test]
    fn the_root_is_the_directory_of_a_single_file_source() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("model.safetensors");
        std::fs::write(&file, b"x").unwrap();
        assert_eq!(root_of(&file), dir.path());
        assert_eq!(root_of(dir.path()), dir.path());
        // A source this rank does not see stays as it is.
        assert_eq!(root_of(&dir.path().join("gone")), dir.path().join("gone"));
    }

    fn fixture(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures")
            .join(rel)
    }

    /// What a rank's bundle says: tensor names, readers of each file, shared source, root.
    type Seen = (Vec<String>, Vec<Vec<usize>>, bool, PathBuf);

    /// Join and catalog on two ranks; each returns what its bundle says.
    fn catalog_two(source: &str) -> Vec<Result<Seen>> {
        let out = tempfile::tempdir().unwrap();
        let out_path = out.path().to_path_buf();
        let r = super::super::tests::two_ranks(["fp", "fp"], source, &out_path, |rank| {
            let joined = rank.join()?;
            let bundle = rank.catalog(&joined.tag)?;
            joined.watchdog.stop();
            rank.cleanup();
            let names = bundle
                .layout
                .tensors
                .iter()
                .map(|t| t.name.clone())
                .collect();
            Ok((
                names,
                bundle.readers,
                bundle.shared_source,
                bundle.catalog.root,
            ))
        });
        drop(out);
        r
    }

    #[test]
    fn a_shared_source_is_read_by_rank_0_and_sent_to_the_others() {
        let src = fixture("dcp/fsdp_w2/checkpoint");
        let r = catalog_two(src.to_str().unwrap());
        let (names0, readers0, shared0, root0) = r[0].as_ref().unwrap();
        let (names1, readers1, shared1, root1) = r[1].as_ref().unwrap();
        assert!(*shared0 && *shared1);
        assert!(!names0.is_empty());
        assert_eq!(names0, names1);
        // Every rank can read every file.
        assert!(readers0.iter().all(|r| r == &vec![0, 1]));
        assert_eq!(readers0, readers1);
        assert_eq!((root0, root1), (&src, &src));
    }

    #[test]
    fn split_views_are_merged_by_rank_0() {
        // Node-local disks: rank 0 holds the metadata and its shard, rank 1 only its shard.
        let src = fixture("dcp/fsdp_w2/checkpoint");
        let views = tempfile::tempdir().unwrap();
        for (rank, files) in [
            (0, &[".metadata", "__0_0.distcp"][..]),
            (1, &["__1_0.distcp"][..]),
        ] {
            let d = views.path().join(format!("r{rank}"));
            std::fs::create_dir(&d).unwrap();
            for f in files {
                std::fs::copy(src.join(f), d.join(f)).unwrap();
            }
        }
        let template = format!("{}/r{{rank}}", views.path().display());
        let r = catalog_two(&template);
        let (names0, readers0, shared0, root0) = r[0].as_ref().unwrap();
        let (names1, readers1, _, root1) = r[1].as_ref().unwrap();
        assert!(!shared0);
        assert_eq!(names0, names1);
        // Both ranks run on this node and each can open the other's file by the path it
        // listed (the same device and inode): rank 0's merged catalog names both as readers of
        // every file (borrow.rs; the pure rule is tested there).
        assert!(readers0.iter().all(|r| r == &vec![0, 1]), "{readers0:?}");
        assert_eq!(readers0, readers1);
        // Each rank reads from its own view.
        assert_eq!(root0, &views.path().join("r0"));
        assert_eq!(root1, &views.path().join("r1"));
        // The full model is there: the same tensors as from the whole directory.
        let whole = catalog_two(src.to_str().unwrap());
        assert_eq!(&whole[0].as_ref().unwrap().0, names0);
    }

    #[test]
    fn no_checkpoint_anywhere_is_one_clear_error_on_every_rank() {
        let empty = tempfile::tempdir().unwrap();
        let r = catalog_two(empty.path().to_str().unwrap());
        for res in &r {
            let e = res.as_ref().unwrap_err().to_string();
            assert!(
                e.starts_with("no rank finds a checkpoint at --source"),
                "{e}"
            );
        }
    }

    #[test]
    fn the_marker_is_a_hidden_name_with_the_tag() {
        assert_eq!(marker_name("abc"), ".axsave-abc.shared");
    }
}
