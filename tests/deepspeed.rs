//! DeepSpeed ZeRO checkpoints written by DeepSpeed 0.19.8 (tests/fixtures/deepspeed), saved by
//! the built binary and compared with what DeepSpeed's own zero_to_fp32 produces.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const FIXTURES: [&str; 6] = [
    "zero1_w2",
    "zero2_w2",
    "zero2_align_w2",
    "zero3_w2",
    "zero3_w3",
    "zero3_lora_w2",
];

fn same(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

#[test]
fn every_stage_matches_zero_to_fp32() {
    for name in FIXTURES {
        let out = tempfile::tempdir().unwrap();
        let ckpt = fixture(&format!("deepspeed/{name}/checkpoint"));
        let o = axsave(&["--source", s(&ckpt), "--output", s(out.path())]);
        assert_ok(&o);
        let reference = fixture(&format!("deepspeed/{name}/reference_fp32.safetensors"));
        assert_eq!(
            tensors(&out.path().join("model.safetensors"))
                .keys()
                .collect::<Vec<_>>(),
            tensors(&reference).keys().collect::<Vec<_>>(),
            "{name}"
        );
        assert!(
            same(&out.path().join("model.safetensors"), &reference),
            "{name}: bytes differ"
        );
        assert_ok(&axsave(&[
            "verify",
            "--source",
            s(&ckpt),
            "--output",
            s(out.path()),
        ]));
        // The tied alias is dropped, and the log says which.
        if name.starts_with("zero3_lora") || name.starts_with("zero2") || name.starts_with("zero3")
        {
            assert!(stderr(&o).contains("tied"), "{name}: {}", stderr(&o));
        }
    }
}

#[test]
fn a_tag_directory_and_bf16_output() {
    let out = tempfile::tempdir().unwrap();
    let tag = fixture("deepspeed/zero2_w2/checkpoint/global_step2");
    assert_ok(&axsave(&[
        "--source",
        s(&tag),
        "--output",
        s(out.path()),
        "-q",
        "--dtype",
        "bf16",
    ]));
    let got = tensors(&out.path().join("model.safetensors"));
    let want = tensors(&fixture("deepspeed/zero2_w2/reference_fp32.safetensors"));
    for (k, (d, shape, _)) in &want {
        let (gd, gs, _) = &got[k];
        assert_eq!(gs, shape, "{k}");
        assert_eq!(gd, if d == "F32" { "BF16" } else { d.as_str() }, "{k}");
    }
}

/// Each rank sees only its own rank's files (plus, for stage 1/2, the model states that rank 0
/// wrote), as on node-local disks: pieces cross TCP to rank 0.
#[test]
fn node_local_ranks_each_read_their_partitions() {
    for (name, n) in [("zero3_w3", 3), ("zero2_w2", 2)] {
        let t = tempfile::tempdir().unwrap();
        let src = fixture(&format!("deepspeed/{name}/checkpoint"));
        let tag = std::fs::read_to_string(src.join("latest")).unwrap();
        let tag = tag.trim();
        for r in 0..n {
            let d = t.path().join(format!("rank{r}")).join(tag);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::copy(src.join("latest"), t.path().join(format!("rank{r}/latest"))).unwrap();
        }
        for e in std::fs::read_dir(src.join(tag)).unwrap().flatten() {
            let f = e.file_name().to_string_lossy().into_owned();
            let owner = zero_rank(&f);
            // Stage 1/2 keeps one `mp_rank_00_model_states.pt` (its param_shapes place every
            // parameter in the partitions): every rank needs to see it.
            let owners: Vec<usize> = match owner {
                Some(r) => vec![r],
                None => (0..n).collect(),
            };
            for r in owners {
                std::fs::copy(
                    e.path(),
                    t.path().join(format!("rank{r}")).join(tag).join(&f),
                )
                .unwrap();
            }
        }
        let out = tempfile::tempdir().unwrap();
        let template = format!("{}/rank{{rank}}", t.path().display());
        let res = wait_ranks(
            spawn_ranks(
                n,
                &["--source", &template, "--output", s(out.path()), "-q"],
                &|_| Vec::new(),
            ),
            Duration::from_secs(120),
        );
        for (r, (code, text, _)) in res.iter().enumerate() {
            assert_eq!(*code, Some(0), "{name} rank {r}: {text}");
        }
        assert!(
            same(
                &out.path().join("model.safetensors"),
                &fixture(&format!("deepspeed/{name}/reference_fp32.safetensors"))
            ),
            "{name}"
        );
    }
}

/// `adapter: lora` with `deepspeed:` in the config: the LoRA adapter of a ZeRO-3 run, as PEFT's
/// save_pretrained wrote it at the end of that run.
#[test]
fn axolotl_lora_with_zero3() {
    let t = tempfile::tempdir().unwrap();
    let run = t.path().join("lora-out");
    copy_dir(&fixture("deepspeed/zero3_lora_w2/checkpoint"), &run);
    copy_dir(
        &fixture("axolotl-examples/deepspeed_configs"),
        &t.path().join("deepspeed_configs"),
    );
    std::fs::write(
        t.path().join("cfg.yml"),
        "base_model: tiny/llama\noutput_dir: ./lora-out\nadapter: lora\nlora_r: 4\nlora_alpha: 8\nlora_target_modules: [q_proj, v_proj]\nbf16: true\ndeepspeed: deepspeed_configs/zero3.json\n",
    )
    .unwrap();
    let mut c = std::process::Command::new(bin());
    clean_env(&mut c);
    let o = c
        .current_dir(t.path())
        .args(["--config", "cfg.yml"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("DeepSpeed tag global_step2"),
        "{}",
        stderr(&o)
    );
    let want = fixture("deepspeed/zero3_lora_w2/adapter/adapter_model.safetensors");
    let (g, w) = (
        tensors(&run.join("adapter_model.safetensors")),
        tensors(&want),
    );
    assert_eq!(g.keys().collect::<Vec<_>>(), w.keys().collect::<Vec<_>>());
    for (k, v) in &w {
        assert_eq!(&g[k], v, "{k}");
    }
    assert!(same(&run.join("adapter_model.safetensors"), &want));
    assert!(!run.join("model.safetensors").exists());
}

/// A bit flipped inside a ZeRO flat partition (bytes many parameters share, so no single piece
/// covers the zip record) is found by the whole-record check before anything is committed.
#[test]
fn damaged_partition_bytes_are_detected() {
    let t = tempfile::tempdir().unwrap();
    let ckpt = t.path().join("ckpt");
    copy_dir(&fixture("deepspeed/zero3_w2/checkpoint"), &ckpt);
    let f = ckpt.join("global_step2/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt");
    let mut data = std::fs::read(&f).unwrap();
    // The fp32 flat group is the largest record: flip a bit in the middle of the file's data.
    let zip = axsave_formats::zip::ZipIndex::parse(&data[..]).unwrap();
    let group = zip
        .entries()
        .iter()
        .filter(|e| e.name.contains("/data/"))
        .max_by_key(|e| e.size)
        .unwrap()
        .clone();
    data[(group.data_offset + group.size / 2) as usize] ^= 0x01;
    std::fs::write(&f, &data).unwrap();
    let out = tempfile::tempdir().unwrap();
    let o = axsave(&["--source", s(&ckpt), "--output", s(out.path()), "-q"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("damaged (crc32"), "{}", stderr(&o));
    assert_no_output(out.path());
}
