//! End-to-end saves of torch-written fixtures with the built binary, compared byte for byte
//! with references written by the safetensors library from the unsharded state dict.

mod common;

use common::*;

/// Saves a fixture's checkpoint and checks the single output file is byte-identical to the
/// reference, then that `axsave verify` agrees.
fn save_matches_reference(name: &str, extra: &[&str]) {
    let out = tempfile::tempdir().unwrap();
    let ckpt = fixture(&format!("dcp/{name}/checkpoint"));
    let mut args = vec!["--source", s(&ckpt), "--output", s(out.path()), "--quiet"];
    args.extend_from_slice(extra);
    let o = axsave(&args);
    assert_ok(&o);
    assert_eq!(listing(out.path()), ["model.safetensors"], "{name}");
    let got = std::fs::read(out.path().join("model.safetensors")).unwrap();
    let want = std::fs::read(fixture(&format!("dcp/{name}/reference.safetensors"))).unwrap();
    if got != want {
        // Say which tensor differs before failing on the bytes.
        let (g, w) = (
            tensors(&out.path().join("model.safetensors")),
            tensors(&fixture(&format!("dcp/{name}/reference.safetensors"))),
        );
        assert_eq!(
            g.keys().collect::<Vec<_>>(),
            w.keys().collect::<Vec<_>>(),
            "{name}: names"
        );
        for (k, v) in &w {
            assert_eq!(&g[k], v, "{name}: tensor {k}");
        }
        panic!("{name}: same tensors but the files differ (header or order)");
    }
    let v = axsave(&["verify", "--source", s(&ckpt), "--output", s(out.path())]);
    assert_ok(&v);
}

#[test]
fn fsdp_1_rank() {
    save_matches_reference("fsdp_w1", &[]);
}
#[test]
fn fsdp_2_ranks() {
    save_matches_reference("fsdp_w2", &[]);
}
#[test]
fn fsdp_3_ranks() {
    save_matches_reference("fsdp_w3", &[]);
}
#[test]
fn fsdp_4_ranks() {
    save_matches_reference("fsdp_w4", &[]);
}
#[test]
fn fsdp_8_ranks() {
    save_matches_reference("fsdp_w8", &[]);
}
#[test]
fn dcp_hugging_face_mode() {
    save_matches_reference("hf_w2", &[]);
}
#[test]
fn dcp_zstd_items() {
    save_matches_reference("zstd_w2", &[]);
}
#[test]
fn dcp_per_rank_metadata() {
    save_matches_reference("per_rank_meta_w2", &[]);
}
#[test]
fn torch_2_4() {
    save_matches_reference("torch24_w2", &[]);
}
#[test]
fn torch_2_15() {
    save_matches_reference("torch215_w2", &[]);
}
#[test]
fn demo_checkpoint() {
    save_matches_reference("demo_w4", &[]);
}

#[test]
fn tiny_memory_budget_splits_pieces_and_gives_the_same_bytes() {
    // A 64 KiB budget makes chunks of a few KiB, so every large piece (and the transposed one)
    // is processed in several sub-boxes.
    for name in ["fsdp_w8", "demo_w4"] {
        save_matches_reference(name, &["--memory-budget", "64KiB", "--workers", "3"]);
    }
}

#[test]
fn safetensors_inputs_reshard() {
    for name in ["single", "sharded"] {
        let out = tempfile::tempdir().unwrap();
        let src = fixture(&format!("safetensors/{name}"));
        assert_ok(&axsave(&[
            "--source",
            s(&src),
            "--output",
            s(out.path()),
            "-q",
        ]));
        let got = std::fs::read(out.path().join("model.safetensors")).unwrap();
        let want = std::fs::read(src.join("reference.safetensors")).unwrap();
        assert!(got == want, "{name}: output differs from the reference");
    }
}
