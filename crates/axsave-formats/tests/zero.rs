//! The ZeRO reader on checkpoints written by DeepSpeed 0.19.8 itself (tests/fixtures/deepspeed,
//! made by scripts/fixtures/zero.py): every tensor is assembled here straight from the pieces
//! (reading the rank files, converting the stored dtype) and compared byte for byte with what
//! DeepSpeed's own zero_to_fp32 wrote (`reference_fp32.safetensors`), in zero_to_fp32's order.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use axsave_formats::catalog::Merged;
use axsave_formats::convert::convert;
use axsave_formats::detect::{self, Detected};
use axsave_formats::zero;
use axsave_formats::{Catalog, DType, Format, FormatError, Region, TensorEntry};
use serde_json::Value as Json;

const FIXTURES: [&str; 6] = [
    "zero2_w2",
    "zero3_w2",
    "zero3_w3",
    "zero1_w2",
    "zero2_align_w2",
    "zero3_lora_w2",
];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/deepspeed")
        .join(name)
}

fn expected(name: &str) -> Json {
    let text = std::fs::read_to_string(fixture(name).join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The tensors of a safetensors file: name → (dtype, shape, bytes).
fn load_safetensors(path: &Path) -> Vec<(String, DType, Vec<u64>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                DType::from_safetensors(v.dtype()).unwrap(),
                v.shape().iter().map(|&d| d as u64).collect(),
                v.data().to_vec(),
            )
        })
        .collect()
}

fn reference(name: &str) -> Vec<(String, DType, Vec<u64>, Vec<u8>)> {
    load_safetensors(&fixture(name).join("reference_fp32.safetensors"))
}

/// The tensor's bytes in its own dtype, row-major, assembled from its pieces by reading the
/// files the catalog names.
fn assemble(cat: &Catalog, t: &TensorEntry) -> Vec<u8> {
    let es = t.dtype.size();
    let numel = t.numel() as usize;
    let mut out = vec![0u8; numel * es];
    let mut filled = vec![false; numel];
    let dims = t.shape.clone();
    let tensor_strides: Vec<u64> = (0..dims.len())
        .map(|d| dims[d + 1..].iter().product())
        .collect();
    for p in &t.pieces {
        let data = std::fs::read(cat.root.join(&cat.files[p.file].path)).unwrap();
        let ses = p.stored_dtype.size();
        // (source element index in the file, destination element index in the tensor)
        let mut pairs: Vec<(u64, u64)> = Vec::new();
        match &p.region {
            Region::Flat { start, len } => {
                assert_eq!(p.strides, vec![1]);
                for k in 0..*len {
                    pairs.push((k, start + k));
                }
            }
            Region::Box { offsets, sizes } => {
                let n: u64 = sizes.iter().product();
                let mut idx = vec![0u64; sizes.len()];
                for _ in 0..n {
                    let src: u64 = idx.iter().zip(&p.strides).map(|(i, s)| i * *s as u64).sum();
                    let dst: u64 = idx
                        .iter()
                        .zip(offsets)
                        .zip(&tensor_strides)
                        .map(|((i, o), s)| (i + o) * s)
                        .sum();
                    pairs.push((src, dst));
                    for d in (0..idx.len()).rev() {
                        idx[d] += 1;
                        if idx[d] < sizes[d] {
                            break;
                        }
                        idx[d] = 0;
                    }
                }
            }
        }
        for (src, dst) in pairs {
            let at = p.offset as usize + src as usize * ses;
            let from = &data[at..at + ses];
            let dst = dst as usize;
            assert!(!filled[dst], "{}: element {dst} twice", t.name);
            filled[dst] = true;
            convert(
                p.stored_dtype,
                t.dtype,
                from,
                &mut out[dst * es..(dst + 1) * es],
            )
            .unwrap();
        }
    }
    assert!(filled.iter().all(|&f| f), "{}: elements missing", t.name);
    out
}

/// The catalog matches expected.json and reference_fp32.safetensors exactly.
fn check_against_reference(name: &str, cat: &Catalog) {
    let exp = expected(name);
    let want: Vec<&Json> = exp["tensors"].as_array().unwrap().iter().collect();
    let names: Vec<&str> = cat.tensors.iter().map(|t| t.name.as_str()).collect();
    let want_names: Vec<&str> = want.iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, want_names, "{name}: names or order");
    let refs = reference(name);
    assert_eq!(refs.len(), cat.tensors.len());
    for (t, w) in cat.tensors.iter().zip(&want) {
        assert_eq!(
            t.dtype.safetensors_name(),
            w["dtype"].as_str().unwrap(),
            "{name} {}",
            t.name
        );
        let shape: Vec<u64> = w["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .collect();
        assert_eq!(t.shape, shape, "{name} {}", t.name);
        t.check_coverage().unwrap();
        let (_, rdtype, rshape, rbytes) = refs.iter().find(|r| r.0 == t.name).unwrap();
        assert_eq!((*rdtype, rshape), (t.dtype, &t.shape));
        assert!(
            assemble(cat, t) == *rbytes,
            "{name}: bytes of {} differ",
            t.name
        );
    }
}

#[test]
fn every_fixture_equals_zero_to_fp32() {
    for name in FIXTURES {
        let dir = fixture(name).join("checkpoint");
        let cat = zero::read(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        let exp = expected(name);
        assert_eq!(
            cat.format,
            Format::DeepSpeed {
                stage: exp["stage"].as_u64().unwrap() as u8
            }
        );
        assert_eq!(
            cat.writer_ranks,
            Some(exp["world_size"].as_u64().unwrap() as usize)
        );
        assert_eq!(cat.root, dir);
        check_against_reference(name, &cat);
        // The same through format detection.
        assert_eq!(detect::detect(&dir).unwrap(), Detected::DeepSpeed, "{name}");
        let again = detect::open(&dir).unwrap();
        assert_eq!(again.tensors, cat.tensors);
    }
}

#[test]
fn a_tag_directory_can_be_given_directly() {
    for name in ["zero2_w2", "zero3_w3"] {
        let ckpt = fixture(name).join("checkpoint");
        let tag = expected(name)["latest"].as_str().unwrap().to_string();
        let direct = zero::read(&ckpt.join(&tag)).unwrap();
        let via_latest = zero::read(&ckpt).unwrap();
        let by_tag = zero::read_tag(&ckpt, &tag).unwrap();
        assert_eq!(direct.tensors.len(), via_latest.tensors.len());
        // Paths are relative to the directory given.
        assert!(
            direct
                .files
                .iter()
                .all(|f| f.path.parent() == Some(Path::new("")))
        );
        assert!(via_latest.files.iter().all(|f| f.path.starts_with(&tag)));
        assert_eq!(by_tag.files, via_latest.files);
        check_against_reference(name, &direct);
        assert_eq!(
            detect::detect(&ckpt.join(&tag)).unwrap(),
            Detected::DeepSpeed
        );
    }
}

#[test]
fn tied_alias_is_dropped_and_said() {
    for name in FIXTURES {
        let cat = zero::read(&fixture(name).join("checkpoint")).unwrap();
        let exp = expected(name);
        let aliases = exp["dropped_aliases"].as_object().unwrap();
        assert_eq!(aliases.len(), 1, "{name}");
        for (alias, source) in aliases {
            let source = source.as_str().unwrap();
            assert!(
                cat.tensors.iter().all(|t| &t.name != alias),
                "{name}: {alias} kept"
            );
            assert!(cat.tensors.iter().any(|t| t.name == source));
            let note = format!("dropped {alias}: it is tied to {source}");
            assert!(
                cat.notes.iter().any(|n| n.starts_with(&note)),
                "{name}: {:?}",
                cat.notes
            );
            // zero_to_fp32 lists the alias last, after everything else.
            let order = exp["zero_to_fp32_order"].as_array().unwrap();
            assert_eq!(order.last().unwrap().as_str(), Some(alias.as_str()));
        }
    }
}

#[test]
fn pieces_point_into_the_rank_files() {
    for name in FIXTURES {
        let cat = zero::read(&fixture(name).join("checkpoint")).unwrap();
        let exp = expected(name);
        let tag = exp["latest"].as_str().unwrap();
        let mut names: Vec<String> = Vec::new();
        for k in ["model_files", "optim_files"] {
            names.extend(
                exp[k]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| f.as_str().unwrap().to_string()),
            );
        }
        let listed: HashSet<PathBuf> = names.iter().map(|n| Path::new(tag).join(n)).collect();
        let have: HashSet<PathBuf> = cat.files.iter().map(|f| f.path.clone()).collect();
        assert_eq!(have, listed, "{name}");
        for f in &cat.files {
            let len = std::fs::metadata(cat.root.join(&f.path)).unwrap().len();
            assert_eq!(f.size, len);
        }
        let world = exp["world_size"].as_u64().unwrap() as usize;
        for t in &cat.tensors {
            let kind = exp["tensors"]
                .as_array()
                .unwrap()
                .iter()
                .find(|w| w["name"] == t.name.as_str())
                .unwrap()["kind"]
                .as_str()
                .unwrap()
                .to_string();
            for p in &t.pieces {
                let file = cat.files[p.file].path.to_string_lossy().into_owned();
                match kind.as_str() {
                    "trainable" => {
                        assert!(file.ends_with("_optim_states.pt"), "{name} {}", t.name);
                        assert_eq!(p.stored_dtype, DType::F32);
                        assert!(matches!(p.region, Region::Flat { .. }));
                    }
                    _ => assert!(file.ends_with("_model_states.pt"), "{name} {}", t.name),
                }
            }
            // Stage 3 spreads every parameter with at least `world` elements over every rank.
            let stage = exp["stage"].as_u64().unwrap();
            if stage == 3 && kind != "buffer" && t.numel() >= world as u64 {
                let files: HashSet<usize> = t.pieces.iter().map(|p| p.file).collect();
                assert_eq!(files.len(), world, "{name} {}", t.name);
            }
        }
    }
}

#[test]
fn stage2_parameter_straddles_two_ranks() {
    // 399 trainable elements: group 0 of zero2_w2 holds embed (222), lin1.weight (42) and
    // conv.weight (108) = 372, split 186 + 186, so lin1.weight [222, 264) lies on rank 1 and
    // embed.weight [0, 222) straddles ranks 0 and 1.
    let cat = zero::read(&fixture("zero2_w2").join("checkpoint")).unwrap();
    let embed = cat
        .tensors
        .iter()
        .find(|t| t.name == "embed.weight")
        .unwrap();
    assert_eq!(embed.pieces.len(), 2);
    assert_eq!(embed.pieces[0].region, Region::Flat { start: 0, len: 186 });
    assert_eq!(
        embed.pieces[1].region,
        Region::Flat {
            start: 186,
            len: 36
        }
    );
    assert_ne!(embed.pieces[0].file, embed.pieces[1].file);
}

#[test]
fn buffers_are_reported_as_fp32_and_converted() {
    let cat = zero::read(&fixture("zero2_w2").join("checkpoint")).unwrap();
    let ema = cat.tensors.iter().find(|t| t.name == "ema").unwrap();
    assert_eq!(ema.dtype, DType::F32);
    assert_eq!(ema.pieces[0].stored_dtype, DType::BF16);
    let counter = cat.tensors.iter().find(|t| t.name == "counter").unwrap();
    assert_eq!((counter.dtype, counter.shape.clone()), (DType::I64, vec![]));
    // Frozen parameters are stored in bf16 and written as fp32 by zero_to_fp32.py.
    let frozen = cat
        .tensors
        .iter()
        .find(|t| t.name == "frozen.weight")
        .unwrap();
    assert_eq!(frozen.dtype, DType::F32);
    assert_eq!(frozen.pieces[0].stored_dtype, DType::BF16);
}

#[test]
fn checksums_match_the_bytes() {
    let mut checked = 0;
    for name in FIXTURES {
        let cat = zero::read(&fixture(name).join("checkpoint")).unwrap();
        for t in &cat.tensors {
            for p in &t.pieces {
                let Some(c) = p.checksum else { continue };
                assert_eq!((c.offset, c.len), p.byte_span(), "{name} {}", t.name);
                let data = std::fs::read(cat.root.join(&cat.files[p.file].path)).unwrap();
                let bytes = &data[c.offset as usize..(c.offset + c.len) as usize];
                assert_eq!(crc32fast::hash(bytes), c.crc32, "{name} {}", t.name);
                checked += 1;
            }
        }
    }
    // Buffers and stage 2 frozen parameters are whole records.
    assert!(checked >= 10, "only {checked} checksums");
}

#[test]
fn zero1_leaves_frozen_parameters_out_as_zero_to_fp32_does() {
    let cat = zero::read(&fixture("zero1_w2").join("checkpoint")).unwrap();
    let exp = expected("zero1_w2");
    let left: Vec<&str> = exp["module_keys_not_in_output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(left, ["frozen.weight", "frozen.bias"]);
    assert!(
        cat.notes
            .iter()
            .any(|n| n.starts_with("left out frozen.weight, frozen.bias:")),
        "{:?}",
        cat.notes
    );
}

#[test]
fn alignment_paddings_are_skipped() {
    let exp = expected("zero2_align_w2");
    let pads: Vec<u64> = exp["param_alignment_paddings"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert!(
        pads.iter().any(|&p| p > 0),
        "the fixture must have inner paddings"
    );
    let cat = zero::read(&fixture("zero2_align_w2").join("checkpoint")).unwrap();
    // Parameters follow each other with the recorded gaps in the concatenated group.
    let trainable: Vec<&TensorEntry> = cat
        .tensors
        .iter()
        .filter(|t| {
            t.pieces
                .iter()
                .all(|p| matches!(p.region, Region::Flat { .. }))
        })
        .filter(|t| {
            cat.files[t.pieces[0].file]
                .path
                .to_string_lossy()
                .ends_with("_optim_states.pt")
        })
        .collect();
    assert_eq!(trainable.len(), pads.len());
    check_against_reference("zero2_align_w2", &cat);
}

#[test]
fn lora_adapter_weights_match_peft_save() {
    let cat = zero::read(&fixture("zero3_lora_w2").join("checkpoint")).unwrap();
    let adapter =
        load_safetensors(&fixture("zero3_lora_w2").join("adapter/adapter_model.safetensors"));
    assert_eq!(adapter.len(), 4);
    for (name, dtype, shape, bytes) in adapter {
        // PEFT strips the adapter name on save: `...q_proj.lora_A.weight` ← `...q_proj.lora_A.default.weight`.
        let source = name
            .replace(".lora_A.weight", ".lora_A.default.weight")
            .replace(".lora_B.weight", ".lora_B.default.weight");
        let t = cat
            .tensors
            .iter()
            .find(|t| t.name == source)
            .unwrap_or_else(|| panic!("{source}"));
        assert_eq!((t.dtype, &t.shape), (dtype, &shape));
        assert!(assemble(&cat, t) == bytes, "{name}");
    }
    // The frozen base weights come from every rank's fragments.
    let q = cat
        .tensors
        .iter()
        .find(|t| t.name == "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight")
        .unwrap();
    assert_eq!(q.pieces.len(), 2);
    assert!(q.pieces.iter().all(|p| p.stored_dtype == DType::BF16));
}

// ---------------------------------------------------------------------------------------------
// Damaged and partial checkpoints, in temporary copies.

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

fn temp_copy(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("checkpoint");
    copy_dir(&fixture(name).join("checkpoint"), &dir);
    (tmp, dir)
}

#[test]
fn a_missing_optimizer_file_is_named() {
    for name in ["zero2_w2", "zero3_w2"] {
        let (_tmp, dir) = temp_copy(name);
        let tag_dir = dir.join("global_step2");
        std::fs::remove_file(tag_dir.join("bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"))
            .unwrap();
        let err = zero::read(&dir).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, FormatError::Invalid { ref path, .. } if *path == tag_dir),
            "{msg}"
        );
        assert!(msg.contains("expected 2 *_optim_states.pt files"), "{msg}");
        assert!(
            msg.contains("bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"),
            "{msg}"
        );
        assert!(msg.contains("found 1"), "{msg}");
    }
}

#[test]
fn truncated_files_are_errors_not_panics() {
    for (name, file) in [
        ("zero2_w2", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"),
        ("zero3_w3", "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt"),
        ("zero3_w2", "zero_pp_rank_1_mp_rank_00_model_states.pt"),
        ("zero2_w2", "mp_rank_00_model_states.pt"),
    ] {
        let (_tmp, dir) = temp_copy(name);
        let path = dir.join("global_step2").join(file);
        let bytes = std::fs::read(&path).unwrap();
        for keep in [0, 100, bytes.len() / 2, bytes.len() - 30] {
            std::fs::write(&path, &bytes[..keep]).unwrap();
            let err = zero::read(&dir).unwrap_err();
            assert!(err.to_string().contains(file), "{name} {keep}: {err}");
        }
    }
}

#[test]
fn damaged_bytes_never_panic() {
    // Overwrite one byte at a time across a model and an optimizer file: every outcome must be
    // a catalog or an error, and a catalog must still tile every tensor.
    for (name, file) in [
        ("zero2_w2", "mp_rank_00_model_states.pt"),
        ("zero3_w2", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"),
    ] {
        let (_tmp, dir) = temp_copy(name);
        let path = dir.join("global_step2").join(file);
        let bytes = std::fs::read(&path).unwrap();
        for at in (0..bytes.len()).step_by(23) {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0xA5;
            std::fs::write(&path, &damaged).unwrap();
            if let Ok(cat) = zero::read(&dir) {
                for t in &cat.tensors {
                    t.check_coverage().unwrap();
                }
            }
        }
    }
}

#[test]
fn latest_naming_a_missing_tag_is_clear() {
    let (_tmp, dir) = temp_copy("zero2_w2");
    std::fs::write(dir.join("latest"), "global_step9").unwrap();
    let err = zero::read(&dir).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, FormatError::Invalid { ref path, .. } if *path == dir.join("latest")),
        "{msg}"
    );
    assert!(
        msg.contains("\"global_step9\"") && msg.contains("does not exist"),
        "{msg}"
    );

    // A tag outside the directory is refused, and detection (what the binary runs first)
    // says so rather than "it holds none itself, but these subdirectories do".
    for outside in ["../elsewhere", "/etc", "global_step2/../../x"] {
        std::fs::write(dir.join("latest"), outside).unwrap();
        for msg in [
            zero::read(&dir).unwrap_err().to_string(),
            axsave_formats::detect::detect(&dir)
                .unwrap_err()
                .to_string(),
        ] {
            assert!(
                msg.contains("latest") && msg.contains("points outside the checkpoint directory"),
                "{msg}"
            );
            assert!(!msg.contains("holds none itself"), "{msg}");
        }
    }

    // No `latest` at all: the tag directories present are named.
    std::fs::remove_file(dir.join("latest")).unwrap();
    let err = zero::read(&dir).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, FormatError::NotACheckpoint { .. }), "{msg}");
    assert!(msg.contains("tag directories here: global_step2"), "{msg}");
    assert!(!zero::is_zero(&dir));
}

#[test]
fn files_of_another_save_are_refused() {
    let name = "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt";
    for (target, donor, words) in [
        // A ZeRO-2 file among ZeRO-1 ones.
        ("zero1_w2", "zero2_align_w2", "says stage 1 over 2 ranks"),
        // Two param groups among files with one.
        ("zero2_align_w2", "zero2_w2", "holds 2 fp32 partitions"),
        // A file of a 3-rank save among 2-rank ones.
        ("zero3_w2", "zero3_w3", "partition_count Some(3)"),
    ] {
        let (_tmp, dir) = temp_copy(target);
        let other = fixture(donor).join("checkpoint/global_step2");
        std::fs::copy(other.join(name), dir.join("global_step2").join(name)).unwrap();
        let err = zero::read(&dir).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, FormatError::Invalid { .. }), "{msg}");
        assert!(msg.contains(name) && msg.contains(words), "{target}: {msg}");
    }
}

/// Splits a checkpoint as node-local storage would: each "node" directory holds the files of
/// some ranks (plus `extra`), then reads each part and merges.
fn split_and_merge(name: &str, nodes: &[(&[usize], &[&str])]) -> Merged {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture(name).join("checkpoint/global_step2");
    let mut parts = Vec::new();
    for (i, (ranks, extra)) in nodes.iter().enumerate() {
        let dir = tmp.path().join(format!("node{i}"));
        let tag = dir.join("global_step2");
        std::fs::create_dir_all(&tag).unwrap();
        for e in std::fs::read_dir(&src).unwrap() {
            let file = e.unwrap().file_name().to_string_lossy().into_owned();
            let mine = ranks
                .iter()
                .any(|r| file.contains(&format!("zero_pp_rank_{r}_")))
                || extra.contains(&file.as_str());
            if mine {
                std::fs::copy(src.join(&file), tag.join(&file)).unwrap();
            }
        }
        if i == 0 {
            std::fs::copy(fixture(name).join("checkpoint/latest"), dir.join("latest")).unwrap();
        }
        let part = detect::open_partial(&dir, Detected::DeepSpeed, &[]).unwrap();
        parts.push((i, part));
    }
    let merged = Catalog::merge(parts).unwrap();
    // Point the merged catalog at a full copy so that the pieces can be read back.
    let mut merged = merged;
    merged.catalog.root = fixture(name).join("checkpoint");
    merged
}

#[test]
fn partial_views_merge_into_the_whole() {
    // Stage 3: every rank has its own model-state file.
    let m = split_and_merge("zero3_w3", &[(&[0], &[]), (&[1, 2], &[])]);
    assert_eq!(m.catalog.format, Format::DeepSpeed { stage: 3 });
    check_against_reference("zero3_w3", &m.catalog);
    assert_eq!(m.readers.iter().filter(|r| **r == [1]).count(), 4);

    // Stage 2: mp_rank_00_model_states.pt (param_shapes) must be visible next to each
    // optimizer file.
    let model = "mp_rank_00_model_states.pt";
    let m = split_and_merge("zero2_w2", &[(&[0], &[model]), (&[1], &[model])]);
    check_against_reference("zero2_w2", &m.catalog);
    let m = split_and_merge("zero2_align_w2", &[(&[1], &[model]), (&[0], &[model])]);
    check_against_reference("zero2_align_w2", &m.catalog);
}

#[test]
fn partial_view_without_param_shapes_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let tag = tmp.path().join("global_step2");
    std::fs::create_dir_all(&tag).unwrap();
    let name = "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt";
    std::fs::copy(
        fixture("zero2_w2")
            .join("checkpoint/global_step2")
            .join(name),
        tag.join(name),
    )
    .unwrap();
    let err = zero::read_partial(tmp.path()).unwrap_err().to_string();
    assert!(err.contains("mp_rank_00_model_states.pt"), "{err}");
    // Nothing visible at all.
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        zero::read_partial(empty.path()),
        Err(FormatError::NotACheckpoint { .. })
    ));
}
