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

#[test]
fn torch_2_7() {
    save_matches_reference("torch27_w2", &[]);
}

/// `--dtype` output is byte-identical to torch's own `.to()` of the floating tensors, saved by
/// safetensors.
#[test]
fn dtype_conversions_match_torch() {
    for dtype in ["bf16", "fp16", "fp32"] {
        let out = tempfile::tempdir().unwrap();
        let ckpt = fixture("dcp/fsdp_w2/checkpoint");
        assert_ok(&axsave(&[
            "--source",
            s(&ckpt),
            "--output",
            s(out.path()),
            "-q",
            "--dtype",
            dtype,
        ]));
        let got = out.path().join("model.safetensors");
        let want = fixture(&format!("dcp/fsdp_w2/reference_{dtype}.safetensors"));
        let (g, w) = (tensors(&got), tensors(&want));
        for (k, v) in &w {
            assert_eq!(&g[k], v, "--dtype {dtype}: tensor {k}");
        }
        assert!(
            std::fs::read(&got).unwrap() == std::fs::read(&want).unwrap(),
            "--dtype {dtype}: files differ"
        );
        // verify converts the source the same way before comparing.
        assert_ok(&axsave(&[
            "verify",
            "--source",
            s(&ckpt),
            "--output",
            s(out.path()),
        ]));
    }
}

/// `--max-shard-size` splits as huggingface_hub's `save_torch_state_dict` does (the splitter
/// transformers uses): the same shards byte for byte, and the same index content.
#[test]
fn sharding_matches_huggingface_hub() {
    let out = tempfile::tempdir().unwrap();
    let ckpt = fixture("dcp/fsdp_w2/checkpoint");
    let want = fixture("dcp/fsdp_w2/sharded_1KB");
    assert_ok(&axsave(&[
        "--source",
        s(&ckpt),
        "--output",
        s(out.path()),
        "-q",
        "--max-shard-size",
        "1KB",
    ]));
    assert_eq!(listing(out.path()), listing(&want));
    for name in listing(&want) {
        let (g, w) = (out.path().join(&name), want.join(&name));
        if name.ends_with(".json") {
            let gj: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&g).unwrap()).unwrap();
            let wj: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&w).unwrap()).unwrap();
            assert_eq!(gj, wj, "index");
            // transformers' formatting: indent 2, sorted keys, trailing newline.
            let text = std::fs::read_to_string(&g).unwrap();
            assert!(
                text.ends_with("}\n") && text.contains("\n  \"metadata\": {\n    \"total_size\""),
                "{text}"
            );
        } else {
            assert!(
                std::fs::read(&g).unwrap() == std::fs::read(&w).unwrap(),
                "{name} differs"
            );
        }
    }
    assert_ok(&axsave(&[
        "verify",
        "--source",
        s(&ckpt),
        "--output",
        s(out.path()),
    ]));
    // A damaged shard is caught by verify, naming the tensor.
    let shard = out.path().join("model-00002-of-00002.safetensors");
    let mut b = std::fs::read(&shard).unwrap();
    let n = b.len();
    b[n - 3] ^= 1;
    std::fs::write(&shard, b).unwrap();
    let o = axsave(&["verify", "--source", s(&ckpt), "--output", s(out.path())]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("differs from the source at element"),
        "{}",
        stderr(&o)
    );
}

/// `inspect --json` describes the checkpoint as torch wrote it.
#[test]
fn inspect_reports_the_checkpoint() {
    let ckpt = fixture("dcp/fsdp_w4/checkpoint");
    let o = axsave(&["inspect", s(&ckpt), "--json"]);
    assert_ok(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("dcp/fsdp_w4/expected.json")).unwrap())
            .unwrap();
    assert_eq!(v["format"], "dcp");
    assert_eq!(v["writer_ranks"], expected["writer_ranks"]);
    assert_eq!(v["skipped"], expected["skipped"]);
    let n = expected["tensors"].as_object().unwrap().len();
    assert_eq!(v["tensors"].as_array().unwrap().len(), n);
    for t in v["tensors"].as_array().unwrap() {
        let name = t["name"].as_str().unwrap();
        let clean = name.strip_prefix("model.").unwrap();
        let clean: String = clean
            .split('.')
            .filter(|s| !s.starts_with('_'))
            .collect::<Vec<_>>()
            .join(".");
        let e = &expected["tensors"][&clean];
        assert_eq!(t["dtype"], e["dtype"], "{name}");
        assert_eq!(t["shape"], e["shape"], "{name}");
    }
    let text = axsave(&["inspect", s(&ckpt)]);
    assert_ok(&text);
    assert!(String::from_utf8_lossy(&text.stdout).contains("written by:   4 ranks"));
}
