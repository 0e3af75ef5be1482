//! Inputs that made a reader panic under fuzzing (fuzz/, scripts/fuzz.sh), or that the fuzz
//! harness confirmed after a review found them, each kept as the file the reader saw, with what
//! the reader must say now instead. Regressions small enough to write as literals live in the
//! unit tests of the reader (`torchsave::tests`, `dcp::tests`).
//!
//! The `.pt` files here are the ZeRO fixtures' rank files (tests/fixtures/deepspeed) with one
//! value of their `data.pkl` changed, named after the value; the change is in each test's doc.
//! Their zip CRCs match the changed bytes (as a producer writing such values would make them),
//! so that the reader's CRC check of `data.pkl` lets them through to the code they once broke.

use std::path::{Path, PathBuf};

use axsave_formats::{Catalog, FormatError, zero};

fn regression(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/regressions")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A copy of `tests/fixtures/deepspeed/<fixture>/checkpoint` (a save dir with `latest` and the
/// tag dir `global_step2`) in which the tag dir's files named in `replace` get new bytes and
/// those named in `remove` are left out.
fn zero_copy(fixture: &str, replace: &[(&str, Vec<u8>)], remove: &[&str]) -> tempfile::TempDir {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/deepspeed")
        .join(fixture)
        .join("checkpoint");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("latest"), dir.path().join("latest")).unwrap();
    let tag: PathBuf = dir.path().join("global_step2");
    std::fs::create_dir(&tag).unwrap();
    for e in std::fs::read_dir(src.join("global_step2")).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if !remove.contains(&name.as_str()) {
            std::fs::copy(e.path(), tag.join(&name)).unwrap();
        }
    }
    for (name, bytes) in replace {
        std::fs::write(tag.join(name), bytes).unwrap();
    }
    dir
}

fn err_text(r: Result<Catalog, FormatError>) -> String {
    match r {
        Ok(c) => panic!("expected an error, read {} tensors", c.tensors.len()),
        Err(e) => e.to_string(),
    }
}

/// zero target, crash-c40a7ace: `param_shapes[0]["norm.bias"]` of zero1_w2's model states set to
/// `(2^63 - 1,)`. A partial read (no element-count checks) put it in the catalog as an F32
/// tensor, whose `nbytes()` overflowed.
#[test]
fn zero_param_shape_whose_fp32_bytes_overflow() {
    let dir = zero_copy(
        "zero1_w2",
        &[(
            "mp_rank_00_model_states.pt",
            regression("zero1_model_states_param_shape_i64_max.pt"),
        )],
        &[],
    );
    let partial = err_text(zero::read_partial(dir.path()));
    assert!(partial.contains("overflows 64 bits"), "{partial}");
    let full = err_text(zero::read(dir.path()));
    assert!(full.contains("needs elements"), "{full}");
}

/// zero target (review, confirmed by the harness): `param_alignment_paddings[0][1]` and `[0][2]`
/// of zero2_align_w2's rank 0 optimizer states set to `2^63 - 1`. The running element offset
/// of a partial read overflowed.
#[test]
fn zero_alignment_paddings_overflowing_offsets() {
    let dir = zero_copy(
        "zero2_align_w2",
        &[(
            "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
            regression("zero2_align_optim_rank0_alignment_paddings_i64_max.pt"),
        )],
        &[],
    );
    let partial = err_text(zero::read_partial(dir.path()));
    assert!(partial.contains("element offsets overflow"), "{partial}");
    let full = err_text(zero::read(dir.path()));
    assert!(full.contains("needs elements"), "{full}");
}

/// Review: a one-rank ZeRO-3 save (zero3_w2's rank 0 files, `partition_count` = 1), whose
/// `param_shapes` give `embed.weight` shape `(2,)` and `conv.weight` `(2^63 - 1, 2)`. With one
/// rank a parameter's share is all of it, and `offset + share` overflowed.
#[test]
fn zero3_one_rank_parameter_near_u64_max() {
    let dir = zero_copy(
        "zero3_w2",
        &[
            (
                "zero_pp_rank_0_mp_rank_00_model_states.pt",
                regression("zero3_w1_model_states_shape_near_u64_max.pt"),
            ),
            (
                "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                regression("zero3_w1_optim_states_partition_count_1.pt"),
            ),
        ],
        &[
            "zero_pp_rank_1_mp_rank_00_model_states.pt",
            "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        ],
    );
    let partial = err_text(zero::read_partial(dir.path()));
    assert!(
        partial.contains("needs elements 2..18446744073709551615"),
        "{partial}"
    );
    // A full read stops earlier: the frozen parameters' fragments of rank 1 are missing.
    err_text(zero::read(dir.path()));
}

/// Review: a stage 3 model-state file whose name gives rank 2^64 - 1. A partial read places
/// frozen fragments at `rank × share`, which overflowed; such a fragment lies past its
/// parameter and gives no piece.
#[test]
fn zero3_rank_in_file_name_past_u64() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(
        "../../tests/fixtures/deepspeed/zero3_lora_w2/checkpoint/global_step2/zero_pp_rank_1_mp_rank_00_model_states.pt",
    );
    let renamed = "zero_pp_rank_18446744073709551615_mp_rank_00_model_states.pt";
    let dir = zero_copy(
        "zero3_lora_w2",
        &[(renamed, std::fs::read(src).unwrap())],
        &["zero_pp_rank_1_mp_rank_00_model_states.pt"],
    );
    let cat = zero::read_partial(dir.path()).unwrap();
    let file = cat
        .files
        .iter()
        .position(|f| f.path.ends_with(renamed))
        .unwrap();
    let frozen = cat
        .tensors
        .iter()
        .find(|t| t.name == "base_model.model.model.embed_tokens.weight")
        .unwrap();
    assert!(!frozen.pieces.is_empty());
    assert!(frozen.pieces.iter().all(|p| p.file != file));
}
