//! Phase 4, the commit: each rank makes its files durable and reports its part written (with
//! the SHA-256 of its files when asked); once every rank has, rank 0 renames every file into
//! place (its own and, in sharded mode, the others') and says so; only then do the other ranks
//! return. After a failure instead, [`Rank::cleanup`] removes what this rank can see of the run.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::catalog::Bundle;
use super::join::Joined;
use super::{DistReport, Progress, Rank, json, unjson};
use crate::error::Result;
use crate::output::{self, OutputFiles, marker_name};
use crate::plan::Mode;
use crate::report::{dtype_counts, output_files, sha256_file};
use crate::save::{check_output, finalize};

/// What a rank reports once its files are durable: for each file it wrote, its index and
/// (with `--checksums`) its SHA-256.
#[derive(Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub(super) struct Done {
    pub(super) files: Vec<(usize, Option<String>)>,
}

/// The SHA-256 of every data file, from every rank's [`Done`] (indices past the layout's files
/// are ignored).
pub(super) fn collect_shas(
    nfiles: usize,
    dones: impl IntoIterator<Item = Done>,
) -> Vec<Option<String>> {
    let mut shas: Vec<Option<String>> = vec![None; nfiles];
    for d in dones {
        for (i, s) in d.files {
            if let Some(slot) = shas.get_mut(i) {
                *slot = s;
            }
        }
    }
    shas
}

/// What the commit needs besides the bundle: when the run started and how it moves data.
pub(super) struct CommitInfo {
    pub(super) start: Instant,
    pub(super) route: crate::route::Route,
}

impl Rank<'_> {
    /// Phase 4: durable, reported, and (rank 0) renamed into place. Returns the report on
    /// rank 0, `None` on the others.
    pub(super) fn commit(
        &mut self,
        bundle: Bundle,
        files: Option<Arc<OutputFiles>>,
        joined: Joined,
        info: CommitInfo,
        progress: &Progress,
    ) -> Result<Option<DistReport>> {
        let (me, n) = (self.world.rank, self.world.world_size);
        let opts = self.opts;
        let Joined { tag, watchdog, .. } = joined;
        let Bundle {
            catalog,
            layout,
            plan,
            shared_source,
            ..
        } = bundle;
        let total = layout.total_size;
        let mut done = Done::default();
        if plan.file_writers.iter().all(|&w| w == me) {
            // This rank writes every file and has received every piece (the data plane
            // waits for them): the whole job's bytes are written, whatever the watchdog's
            // count (up to a tick behind) says yet.
            progress.done.fetch_max(total, Ordering::Relaxed);
        }
        if let Some(f) = &files {
            progress.set_phase(crate::progress::Phase::Syncing {
                files: f.temp_paths().len() as u64,
            });
            f.sync()?;
            for (i, w) in plan.file_writers.iter().enumerate() {
                if *w == me {
                    let sha = if opts.checksums {
                        Some(sha256_file(
                            &opts
                                .output
                                .join(output::temp_name(&layout.files[i].name, &tag)),
                        )?)
                    } else {
                        None
                    };
                    done.files.push((i, sha));
                }
            }
        }
        crate::fault::point("synced", me);
        self.client.set(&format!("ok/{me}"), &json(&done)?)?;
        if me != 0 {
            // From now on rank 0 may be renaming this run's files: a failure here must not
            // remove them under it (see `cleanup`), nor may the signal backstop.
            self.reported = true;
            self.guard = None;
            let d = self.far();
            self.wait_keys(&["committed"], d)?;
            watchdog.stop();
            self.run_files = None;
            self.guard = None;
            return Ok(None);
        }
        let mut dones = Vec::with_capacity(n);
        for r in 0..n {
            let key = format!("ok/{r}");
            let d = self.far();
            self.wait_keys(&[&key], d)?;
            let b = self.client.get(&key, d)?;
            dones.push(unjson::<Done>(&b, "report")?);
        }
        // Every rank has written and synced its part: the whole job's bytes are on disk (the
        // watchdog's count lags by up to a tick; in sharded mode rank 0 may finish first).
        progress.done.store(total, Ordering::Relaxed);
        progress.set_phase(crate::progress::Phase::Committing);
        let shas = collect_shas(layout.files.len(), dones);
        self.check_cancel()?;
        let existing = check_output(&opts.output, &opts.layout.stem, opts.force)?;
        let extras = opts.extras.render(&layout)?;
        // Rank 0 renames every file, its own and (in sharded mode, in the shared directory) the
        // others', so the commit happens in one place.
        drop(files);
        crate::fault::point("committing", me);
        let replaced = match &self.guard {
            Some(g) => g.commit(|| finalize(&opts.output, &layout, &tag, &extras, &existing))?,
            None => finalize(&opts.output, &layout, &tag, &extras, &existing)?,
        };
        self.run_files = None;
        self.guard = None;
        self.client.set("committed", b"1")?;
        watchdog.stop();
        if opts.mode == Mode::Sharded {
            let _ = std::fs::remove_file(opts.output.join(marker_name(&tag)));
        }
        self.lock = None;
        Ok(Some(DistReport {
            files: output_files(&opts.output, &layout, &extras, shas, opts.checksums)?,
            tensors: layout.tensors.len(),
            bytes: layout.total_size,
            network_bytes: plan.network_bytes(),
            seconds: info.start.elapsed().as_secs_f64(),
            world_size: n,
            format: catalog.format.to_string(),
            mode: opts.mode,
            left_out: layout.left_out.clone(),
            replaced,
            dtypes: dtype_counts(&layout),
            notes: catalog.notes.clone(),
            shared_source,
            transport: info.route.transport(),
            route: info.route.legs.to_vec(),
        }))
    }

    /// After a failure: remove every temporary of this run that this rank can see (a dead
    /// writer's too, when the directory is shared), and rank 0's marker.
    pub(super) fn cleanup(&mut self) {
        if let Some((dir, tag)) = self.run_files.take() {
            // The other ranks look at rank 0's output lock. Free: rank 0 died (or finished), so
            // this rank removes what is left, the lock file included (taking the lock and
            // dropping it removes it). Held: rank 0 is alive; once this rank has reported its
            // part, rank 0 may be committing those files, or will remove them itself when it
            // fails, so they are left to it.
            let _free = match (self.world.rank, dir.is_dir()) {
                (0, _) | (_, false) => None,
                _ => match crate::lock::OutputLock::acquire(&dir, &tag) {
                    Ok(l) => Some(l),
                    Err(_) if self.reported => return,
                    Err(_) => None,
                },
            };
            output::remove_run_temps(&dir, &tag);
            let _ = std::fs::remove_file(dir.join(marker_name(&tag)));
        }
        self.guard = None;
        self.lock = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::Transport;
    use std::path::Path;

    #[test]
    fn every_writer_s_digests_land_in_their_file_s_slot() {
        let dones = vec![
            Done {
                files: vec![(0, Some("a".into())), (2, Some("c".into()))],
            },
            Done::default(),
            Done {
                files: vec![(1, None), (3, Some("d".into()))],
            },
        ];
        assert_eq!(
            collect_shas(4, dones),
            vec![Some("a".into()), None, Some("c".into()), Some("d".into())]
        );
    }

    #[test]
    fn a_file_index_past_the_layout_is_ignored() {
        let dones = vec![Done {
            files: vec![(7, Some("x".into())), (0, Some("a".into()))],
        }];
        assert_eq!(collect_shas(1, dones), vec![Some("a".into())]);
    }

    #[test]
    fn rank_0_commits_every_file_and_reports_them() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/dcp/fsdp_w2/checkpoint");
        let out = tempfile::tempdir().unwrap();
        let results = super::super::tests::two_ranks(
            ["fp", "fp"],
            src.to_str().unwrap(),
            out.path(),
            |rank| {
                let progress = Progress::default();
                rank.run(Instant::now(), &progress, &super::super::Net::Tcp)
            },
        );
        let report = results[0]
            .as_ref()
            .unwrap()
            .as_ref()
            .expect("rank 0 reports");
        assert!(results[1].as_ref().unwrap().is_none());
        assert_eq!(report.world_size, 2);
        assert_eq!(report.transport, Transport::Tcp);
        assert!(report.shared_source);
        // Both ranks are on this node; rank 0 writes everything in gather mode: what rank 1
        // reads crosses between ranks of one node, by TCP as asked.
        use crate::route::{Class, Path as Way};
        let classes: Vec<(Class, Way)> = report.route.iter().map(|l| (l.class, l.path)).collect();
        assert_eq!(
            classes,
            [
                (Class::Local, Way::Cpu),
                (Class::SameNode, Way::Tcp),
                (Class::CrossNode, Way::Tcp)
            ]
        );
        assert_eq!(report.route[2].bytes, 0);
        assert_eq!(report.route[0].bytes + report.route[1].bytes, report.bytes);
        assert_eq!(report.route[1].bytes, report.network_bytes);
        assert_eq!(
            report.dtypes.iter().map(|(_, n)| n).sum::<usize>(),
            report.tensors
        );
        // Every reported file is in place with its size, and nothing else is left behind.
        let mut on_disk: Vec<String> = std::fs::read_dir(out.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        on_disk.sort();
        let mut reported: Vec<String> = report
            .files
            .iter()
            .map(|f| {
                assert_eq!(std::fs::metadata(&f.path).unwrap().len(), f.size);
                f.path.file_name().unwrap().to_string_lossy().into_owned()
            })
            .collect();
        reported.sort();
        assert_eq!(on_disk, reported);
    }

    #[test]
    fn a_done_report_survives_the_store() {
        let d = Done {
            files: vec![(0, Some("ab".into())), (3, None)],
        };
        let back: Done = unjson(&json(&d).unwrap(), "report").unwrap();
        assert_eq!(back, d);
        assert!(
            unjson::<Done>(b"[]", "report")
                .unwrap_err()
                .to_string()
                .starts_with("malformed report from another rank")
        );
    }
}
