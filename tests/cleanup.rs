//! `--cleanup` and `--dry-run` agree: one plan, made before anything is
//! written, says what goes; `--dry-run` prints exactly what the run then removes, and conflicts
//! fail before the output directory is touched.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// The paths `--dry-run --cleanup` says it would remove.
fn dry_run_removals(source: &Path, out: &Path) -> Vec<PathBuf> {
    let o = axsave(&[
        "--source",
        s(source),
        "--output",
        s(out),
        "--cleanup",
        "--dry-run",
    ]);
    assert_ok(&o);
    assert!(!out.exists(), "the dry run wrote something");
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("cleanup: would remove "))
        .map(|l| PathBuf::from(l.trim_end_matches(" after success")))
        .collect()
}

/// Runs the save with `--cleanup`; returns what its log says it removed.
fn run_removals(source: &Path, out: &Path) -> Vec<PathBuf> {
    let o = axsave(&["--source", s(source), "--output", s(out), "--cleanup"]);
    assert_ok(&o);
    stderr(&o)
        .lines()
        .filter_map(|l| {
            l.split_once("cleanup: removed ")
                .map(|(_, p)| PathBuf::from(p))
        })
        .collect()
}

/// The same list from the dry run and the run, and the run removed exactly those.
fn agree(source: &Path, out: &Path, expected: &[PathBuf]) {
    let planned = dry_run_removals(source, out);
    assert_eq!(planned, expected);
    let removed = run_removals(source, out);
    assert_eq!(removed, planned, "the run removed something else");
    for p in expected {
        assert!(
            std::fs::symlink_metadata(p).is_err(),
            "{} is still there",
            p.display()
        );
    }
    assert!(!tensors(out).is_empty());
}

/// A symlinked --source: the directory it points to (what was read) and then the link.
#[test]
fn a_symlinked_source_removes_its_target_and_the_link() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().canonicalize().unwrap();
    let real = root.join("real-ckpt");
    copy_dir(&fixture("dcp/fsdp_w2/checkpoint"), &real);
    let link = root.join("ckpt");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    agree(&link, &root.join("out"), &[real, link.clone()]);
}

/// DeepSpeed: the tag directory `latest` names and `latest`; the other tags and files stay.
#[test]
fn deepspeed_removes_the_tag_and_latest_in_both() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().canonicalize().unwrap();
    let ckpt = root.join("ds");
    copy_dir(&fixture("deepspeed/zero2_w2/checkpoint"), &ckpt);
    std::fs::create_dir_all(ckpt.join("global_step1")).unwrap();
    std::fs::write(ckpt.join("zero_to_fp32.py"), b"#").unwrap();
    let tag = std::fs::read_to_string(ckpt.join("latest")).unwrap();
    agree(
        &ckpt,
        &root.join("out"),
        &[ckpt.join(tag.trim()), ckpt.join("latest")],
    );
    assert_eq!(listing(&ckpt), ["global_step1", "zero_to_fp32.py"]);
}

/// Conflicts fail at once (exit 1, one line), in the dry run as in the run, before anything is
/// written: the source and the output directory stay as they were.
#[test]
fn conflicts_are_refused_before_writing() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().canonicalize().unwrap();
    let ckpt = root.join("ckpt");
    copy_dir(&fixture("dcp/fsdp_w2/checkpoint"), &ckpt);
    let file = fixture("safetensors/single/model.safetensors");
    let cases: [(&Path, PathBuf, &str); 3] = [
        (&ckpt, ckpt.join("final"), "which holds the output"),
        (&ckpt, root.join("x/../ckpt"), "which holds the output"),
        (&file, root.join("out"), "is a file"),
    ];
    for (source, out, why) in &cases {
        for dry in [false, true] {
            let mut args = vec!["--source", s(source), "--output", s(out), "--cleanup"];
            if dry {
                args.push("--dry-run");
            }
            let o = axsave(&args);
            assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
            assert!(stderr(&o).contains(why), "{}", stderr(&o));
            assert_eq!(listing(&ckpt).len(), 3, "the checkpoint was touched");
            assert!(!ckpt.join("final").exists() && !root.join("out").exists());
        }
    }
    assert!(file.exists());
}
