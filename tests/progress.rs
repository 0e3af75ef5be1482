//! The progress display with the built binary: count and total are the same quantity (output
//! bytes), so `--dtype fp32` of a bf16 checkpoint never shows more written than the total, and
//! the log names the fsync once the copy is done. Log lines come every
//! `AXSAVE_PROGRESS_INTERVAL_MS` (hidden; 10 s by default) when stderr is not a terminal.

mod common;

use std::path::Path;
use std::process::Command;

use common::{bin, clean_env, s};

/// A bf16 safetensors model of `tensors` tensors of `numel` elements each; returns its data bytes.
fn bf16_model(path: &Path, tensors: usize, numel: usize) -> u64 {
    let mut header = serde_json::Map::new();
    for i in 0..tensors {
        let (a, b) = (i * numel * 2, (i + 1) * numel * 2);
        header.insert(
            format!("layers.{i}.weight"),
            serde_json::json!({"dtype": "BF16", "shape": [numel], "data_offsets": [a, b]}),
        );
    }
    let mut h = serde_json::to_vec(&header).unwrap();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let data_len = tensors * numel * 2;
    let mut f = Vec::with_capacity(8 + h.len() + data_len);
    f.extend_from_slice(&(h.len() as u64).to_le_bytes());
    f.extend_from_slice(&h);
    // bf16 values 1.0 and -2.0, alternating.
    f.extend((0..tensors * numel).flat_map(|i| {
        if i % 2 == 0 {
            [0x80, 0x3f]
        } else {
            [0x00, 0xc0]
        }
    }));
    std::fs::write(path, f).unwrap();
    data_len as u64
}

/// The progress lines of `stderr` (`… of … written (N%) …`): (total as shown, percent, line).
fn progress_lines(stderr: &str) -> Vec<(String, f64, String)> {
    stderr
        .lines()
        .filter(|l| l.contains(" written (") && l.contains(" of "))
        .map(|l| {
            let after_of = l.split(" of ").nth(1).unwrap();
            let total = after_of.split(" written").next().unwrap().to_owned();
            let pct = l
                .split(" written (")
                .nth(1)
                .unwrap()
                .split('%')
                .next()
                .unwrap();
            (total, pct.parse().unwrap(), l.to_owned())
        })
        .collect()
}

fn save_fp32(ranks: usize) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("model.safetensors");
    let in_bytes = bf16_model(&src, 8, 3 << 20);
    let out = dir.path().join("out");
    let mut c = Command::new(bin());
    clean_env(&mut c);
    if ranks > 1 {
        c.args(["launch", "-n", &ranks.to_string(), "--"]);
    }
    c.args(["--source", s(&src), "--output", s(&out), "--dtype", "fp32"])
        .args(["--transport", "tcp"])
        .env("AXSAVE_PROGRESS_INTERVAL_MS", "5");
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{err}");
    let out_bytes = 2 * in_bytes;
    let file = std::fs::metadata(out.join("model.safetensors"))
        .unwrap()
        .len();
    assert!(file > out_bytes, "{file}");
    let lines = progress_lines(&err);
    assert!(!lines.is_empty(), "no progress line: {err}");
    let want = axsave_core::size::human(out_bytes);
    for (total, pct, line) in &lines {
        assert_eq!(total, &want, "the total is the output's bytes: {line}");
        assert!(*pct <= 100.0, "more written than the total: {line}");
        if line.contains("syncing") {
            assert_eq!(*pct, 100.0, "the copy is done when the sync starts: {line}");
        }
    }
    let syncing = lines
        .iter()
        .any(|(_, _, l)| l.contains("syncing 1 file to disk"));
    println!(
        "{ranks} rank(s): {} progress lines, fsync shown: {syncing}",
        lines.len()
    );
}

#[test]
fn fp32_of_bf16_counts_output_bytes_alone() {
    save_fp32(1);
}

#[test]
fn fp32_of_bf16_counts_output_bytes_with_two_ranks() {
    save_fp32(2);
}
