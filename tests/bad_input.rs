//! Damaged or hostile inputs: a clear error naming the file, exit code 1, nothing written.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// A writable copy of a fixture checkpoint.
fn copy_of(name: &str) -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let dst = t.path().join("ckpt");
    copy_dir(&fixture(&format!("dcp/{name}/checkpoint")), &dst);
    (t, dst)
}

/// Runs a save that must fail; returns stderr after checking exit code 1 and an empty output.
fn must_fail(source: &Path) -> String {
    let out = tempfile::tempdir().unwrap();
    let o = axsave(&["--source", s(source), "--output", s(out.path()), "-q"]);
    let err = stderr(&o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "expected failure, got {:?}: {err}",
        o.status
    );
    assert!(!err.contains("panicked"), "panic: {err}");
    assert_no_output(out.path());
    err
}

fn first_distcp(dir: &Path) -> PathBuf {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "distcp"))
        .collect();
    v.sort();
    v.remove(0)
}

#[test]
fn truncated_distcp() {
    let (_t, ckpt) = copy_of("fsdp_w2");
    let f = first_distcp(&ckpt);
    cut_in_half(&f);
    let err = must_fail(&ckpt);
    assert!(err.contains("__0_0.distcp"), "{err}");
    assert!(err.contains("past the end of the file"), "{err}");
}

#[test]
fn damaged_central_directory() {
    let (_t, ckpt) = copy_of("fsdp_w2");
    let f = first_distcp(&ckpt);
    let mut data = std::fs::read(&f).unwrap();
    // Every central directory record signature of every item.
    let mut n = 0;
    for i in 0..data.len() - 4 {
        if data[i..i + 4] == [0x50, 0x4b, 0x01, 0x02] {
            data[i + 3] = 0x09;
            n += 1;
        }
    }
    assert!(n > 0);
    std::fs::write(&f, &data).unwrap();
    let err = must_fail(&ckpt);
    assert!(
        err.contains("__0_0.distcp") && err.contains("damaged zip archive at byte"),
        "{err}"
    );
}

#[test]
fn missing_data_file() {
    let (_t, ckpt) = copy_of("fsdp_w2");
    std::fs::remove_file(ckpt.join("__1_0.distcp")).unwrap();
    let err = must_fail(&ckpt);
    assert!(err.contains("__1_0.distcp"), "{err}");
}

#[test]
fn unknown_opcode_in_metadata() {
    let (_t, ckpt) = copy_of("fsdp_w2");
    let meta = ckpt.join(".metadata");
    let mut data = std::fs::read(&meta).unwrap();
    // PROTO 4 (2 bytes) + FRAME (9 bytes): byte 11 is the first real opcode.
    assert_eq!(&data[..3], &[0x80, 0x04, 0x95]);
    data[11] = 0xff;
    std::fs::write(&meta, &data).unwrap();
    let err = must_fail(&ckpt);
    assert!(
        err.contains(".metadata") && err.contains("byte 11") && err.contains("unknown opcode 0xff"),
        "{err}"
    );
}

#[test]
fn metadata_that_is_not_dcp_metadata() {
    let (_t, ckpt) = copy_of("fsdp_w2");
    // A pickle that would run os.system("...") if anything executed it.
    std::fs::write(
        ckpt.join(".metadata"),
        b"\x80\x02cos\nsystem\nq\x00X\x0c\x00\x00\x00touch /tmp/xq\x01\x85q\x02Rq\x03.",
    )
    .unwrap();
    let err = must_fail(&ckpt);
    assert!(
        err.contains(
            "expected a torch.distributed.checkpoint Metadata object, found os.system(...)"
        ),
        "{err}"
    );
}

#[test]
fn damaged_tensor_bytes_are_detected_by_the_zip_crc() {
    let (_t, ckpt) = copy_of("demo_w4");
    let f = first_distcp(&ckpt);
    let mut data = std::fs::read(&f).unwrap();
    // Flip a bit in the middle of the largest tensor data (not the structure).
    let mid = data.len() / 3;
    data[mid] ^= 0x10;
    std::fs::write(&f, &data).unwrap();
    let err = must_fail(&ckpt);
    assert!(
        err.contains("__0_0.distcp") && err.contains("damaged (crc32"),
        "{err}"
    );
}

/// A strided piece (fsdp_w2's `proj_t.weight` is stored transposed, strides [1, 4]) is copied
/// out of order, so its CRC cannot be assembled from the copy's reads: the whole record is read
/// again and checked. (Found by the fault matrix: a flipped byte there gave a wrong model.)
#[test]
fn damaged_bytes_of_a_transposed_tensor_are_detected() {
    let (_t, ckpt) = copy_of("fsdp_w2");
    let o = axsave(&["inspect", s(&ckpt), "--json"]);
    assert_ok(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let piece = v["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["name"].as_str().unwrap().ends_with("proj_t.weight"))
        .flat_map(|t| t["pieces"].as_array().unwrap().clone())
        .find(|p| p["file"] == "__1_0.distcp")
        .expect("a piece of proj_t.weight in __1_0.distcp");
    assert_eq!(piece["strides"], serde_json::json!([1, 4]), "{piece}");
    let at = piece["offset"].as_u64().unwrap() as usize + 8;
    let f = ckpt.join("__1_0.distcp");
    let mut data = std::fs::read(&f).unwrap();
    data[at] ^= 0xdf;
    std::fs::write(&f, &data).unwrap();
    let err = must_fail(&ckpt);
    assert!(
        err.contains("__1_0.distcp") && err.contains("damaged (crc32"),
        "{err}"
    );
}

/// A safetensors file with a hand-written header (the damage is the point).
fn write_safetensors(path: &Path, header: &str, data_len: usize) {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.resize(b.len() + data_len, 0);
    std::fs::write(path, b).unwrap();
}

#[test]
fn safetensors_headers_that_lie() {
    let cases = [
        // Overlapping offsets.
        (
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            12,
            "invalid offset",
        ),
        // Past the end of the file.
        (
            r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
            8,
            "do not match the file's length",
        ),
        // A shape whose byte size overflows.
        (
            r#"{"a":{"dtype":"F32","shape":[4611686018427387904,8],"data_offsets":[0,8]}}"#,
            8,
            "header",
        ),
        // Not JSON.
        ("{not json", 0, "header"),
    ];
    for (header, data_len, want) in cases {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("model.safetensors");
        write_safetensors(&f, header, data_len);
        let err = must_fail(&f);
        assert!(err.contains("model.safetensors"), "{err}");
        assert!(err.to_lowercase().contains(want), "{header}: {err}");
    }
    // A header length larger than the file.
    let t = tempfile::tempdir().unwrap();
    let f = t.path().join("model.safetensors");
    std::fs::write(&f, u64::MAX.to_le_bytes()).unwrap();
    let err = must_fail(&f);
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn not_a_checkpoint_points_to_subdirectories() {
    let t = tempfile::tempdir().unwrap();
    copy_dir(
        &fixture("dcp/fsdp_w2/checkpoint"),
        &t.path().join("pytorch_model_fsdp_0"),
    );
    let err = must_fail(t.path());
    assert!(err.contains("pytorch_model_fsdp_0"), "{err}");
}

#[test]
fn existing_model_is_refused_without_force() {
    let out = tempfile::tempdir().unwrap();
    let src = fixture("dcp/fsdp_w2/checkpoint");
    std::fs::write(out.path().join("model.safetensors"), b"old").unwrap();
    let o = axsave(&["--source", s(&src), "--output", s(out.path()), "-q"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(out.path().join("model.safetensors")).unwrap(),
        b"old"
    );
    assert_eq!(listing(out.path()), ["model.safetensors"]);

    // --force replaces it, and removes the shards of an older sharded save.
    std::fs::write(out.path().join("model-00001-of-00002.safetensors"), b"old").unwrap();
    std::fs::write(out.path().join("model.safetensors.index.json"), b"{}").unwrap();
    std::fs::write(out.path().join("notes.txt"), b"mine").unwrap();
    assert_ok(&axsave(&[
        "--source",
        s(&src),
        "--output",
        s(out.path()),
        "-q",
        "--force",
    ]));
    assert_eq!(listing(out.path()), ["model.safetensors", "notes.txt"]);
    assert_eq!(
        std::fs::read(out.path().join("model.safetensors")).unwrap(),
        std::fs::read(fixture("dcp/fsdp_w2/reference.safetensors")).unwrap()
    );
}

#[test]
fn bad_usage_exits_2() {
    let o = axsave(&["--source", "x"]);
    assert_eq!(o.status.code(), Some(2));
    let o = axsave(&["--source", "x", "--output", "y", "--max-shard-size", "5XB"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--max-shard-size"), "{}", stderr(&o));
    let o = axsave(&["--source", "x", "--output", "y", "--dtype", "int4"]);
    assert_eq!(o.status.code(), Some(2));
}

/// A shard rewritten while the save reads it: the identity check refuses the result.
#[test]
fn source_rewritten_during_the_save_is_refused() {
    let (_t, ckpt) = copy_of("fsdp_w2");
    let out = tempfile::tempdir().unwrap();
    let flags = tempfile::tempdir().unwrap();
    let reached = flags.path().join("reached");
    let release = flags.path().join("release");
    let mut c = std::process::Command::new(bin());
    clean_env(&mut c);
    let child = c
        .args([
            "--source",
            s(&ckpt),
            "--output",
            s(out.path()),
            "-q",
            "--workers",
            "1",
        ])
        .env("AXSAVE_FAULT", "copying@0")
        .env("AXSAVE_FAULT_FILE", &reached)
        .env("AXSAVE_FAULT_RELEASE", &release)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !reached.exists() {
        assert!(start.elapsed().as_secs() < 60, "never reached the copy");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // Rewrite one shard in place, same bytes: only its identity (mtime) changes.
    let shard = ckpt.join("__1_0.distcp");
    let bytes = std::fs::read(&shard).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&shard, &bytes).unwrap();
    std::fs::write(&release, b"go").unwrap();
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("__1_0.distcp") && err.contains("changed while it was being read"),
        "{err}"
    );
    assert_no_output(out.path());
}

/// One flipped byte in a `planner_data` key of a 4-rank FSDP checkpoint's `.metadata`: the
/// tensor's nested path was lost and it was left out as "not under `model`" (21 tensors
/// instead of 22, exit 0). The three parts of the metadata must agree.
#[test]
fn damaged_planner_data_key_is_refused() {
    let (_t, ckpt) = copy_of("fsdp_w4");
    let meta = ckpt.join(".metadata");
    let mut data = std::fs::read(&meta).unwrap();
    let key = b"model._orig_mod.layers.0._fsdp_wrapped_module.self_attn.q_proj.weight";
    let planner = find(&data, b"planner_data").expect("planner_data in .metadata");
    let at = planner + find(&data[planner..], key).expect("a planner_data key");
    // The last letter of the key: `weight` becomes `weighu`.
    data[at + key.len() - 1] ^= 0x01;
    std::fs::write(&meta, &data).unwrap();
    let err = must_fail(&ckpt);
    assert!(
        err.contains(".metadata")
            && err.contains("planner_data")
            && err.contains("self_attn.q_proj.weighu")
            && err.contains("damaged"),
        "{err}"
    );
}

/// A flipped byte in a `storage_data` key's name: storage for a tensor nobody declared.
#[test]
fn damaged_storage_data_key_is_refused() {
    let (_t, ckpt) = copy_of("fsdp_w4");
    let meta = ckpt.join(".metadata");
    let mut data = std::fs::read(&meta).unwrap();
    let key = b"model._orig_mod.norm.weight";
    let storage = find(&data, b"storage_data").expect("storage_data in .metadata");
    let at = storage + find(&data[storage..], key).expect("a storage_data key");
    data[at + key.len() - 1] ^= 0x01;
    std::fs::write(&meta, &data).unwrap();
    let err = must_fail(&ckpt);
    assert!(
        err.contains(".metadata") && err.contains("damaged"),
        "{err}"
    );
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// torch saves a tensor named `__metadata__` happily; a safetensors file holding it is read
/// by no reader (the key is the file's own metadata). Refused before anything is written.
#[test]
fn tensor_named_metadata_is_refused() {
    let err = must_fail(&fixture("inputs/reserved_name/checkpoint"));
    assert!(
        err.contains("tensor __metadata__") && err.contains("reserves"),
        "{err}"
    );
}

/// A zstd item (torch ≥ 2.7 `_extensions`) that inflates far past what its chunk can hold: a
/// frame of run-length blocks, 4 bytes each inflating to 128 KiB, in place of the first item
/// (a skippable frame fills the rest of its length). It is refused once it passes the chunk's
/// size, not inflated to whatever it claims (a 2 MB item could claim 64 GB).
#[test]
fn zstd_item_inflating_past_its_chunk_is_refused() {
    let (_t, ckpt) = copy_of("zstd_w2");
    let f = ckpt.join("__0_0.distcp");
    let mut data = std::fs::read(&f).unwrap();
    let magic = [0x28, 0xb5, 0x2f, 0xfd];
    let starts: Vec<usize> = (0..data.len() - 4)
        .filter(|&i| data[i..i + 4] == magic)
        .take(2)
        .collect();
    let (start, end) = (starts[0], *starts.get(1).unwrap_or(&data.len()));
    let len = end - start;
    // Frame header: magic, descriptor 0 (no content size, not single-segment), window 128 KiB.
    let mut bomb = magic.to_vec();
    bomb.extend_from_slice(&[0x00, 0x38]);
    let blocks = (len - bomb.len() - 8) / 4;
    assert!(blocks >= 40, "item of {len} bytes too short");
    for b in 0..blocks {
        let last = u32::from(b + 1 == blocks);
        let header = last | (1 << 1) | ((128 * 1024) << 3);
        bomb.extend_from_slice(&header.to_le_bytes()[..3]);
        bomb.push(0);
    }
    // A skippable frame: magic 0x184D2A50, its length, then anything.
    bomb.extend_from_slice(&0x184d_2a50u32.to_le_bytes());
    let pad = len - bomb.len() - 4;
    bomb.extend_from_slice(&(pad as u32).to_le_bytes());
    bomb.resize(len, 0);
    data[start..end].copy_from_slice(&bomb);
    std::fs::write(&f, &data).unwrap();
    let err = must_fail(&ckpt);
    assert!(
        err.contains("__0_0.distcp")
            && err.contains("zstd stream")
            && err.contains("inflates past"),
        "{err}"
    );
}
