//! `axsave merge-lora` against merges made by PEFT 0.21 itself (tests/fixtures/lora, made by
//! scripts/fixtures/lora.py): every variant's merged tensors compared bit by bit, untouched
//! tensors byte for byte, the files beside the weights, sharded bases and outputs, the Axolotl
//! config, a launcher, and the errors that must leave nothing behind.

#[path = "../common/mod.rs"]
mod common;
mod safety;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{assert_no_output, assert_ok, axsave, copy_dir, fixture, s, stderr, tensors};

type Tensors = BTreeMap<String, (String, Vec<usize>, Vec<u8>)>;

/// (variant, base) as scripts/fixtures/lora.py made them.
const VARIANTS: [(&str, &str); 10] = [
    ("lora_bf16", "base_bf16"),
    ("lora_f32", "base_f32"),
    ("rslora_bf16", "base_bf16"),
    ("dora_bf16", "base_bf16"),
    ("dora_f32", "base_f32"),
    ("embed_bf16", "base_bf16"),
    ("bias_bf16", "base_bf16"),
    ("gpt2_fifo_bf16", "base_gpt2_bf16"),
    ("dora_embed_bf16", "base_bf16"),
    ("gpt2_dora_bf16", "base_gpt2_bf16"),
];

fn lora(rel: &str) -> PathBuf {
    fixture(&format!("lora/{rel}"))
}

fn merge(base: &Path, adapter: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "merge-lora",
        "--base",
        s(base),
        "--adapter",
        s(adapter),
        "--output",
        s(out),
    ];
    args.extend_from_slice(extra);
    axsave(&args)
}

/// Elements whose bits differ, and the largest difference in units in the last place.
fn ulp_diff(dtype: &str, a: &[u8], b: &[u8]) -> (usize, usize, u64) {
    let width = if dtype == "F32" { 4 } else { 2 };
    let (mut n, mut differ, mut max) = (0, 0, 0u64);
    for (x, y) in a.chunks_exact(width).zip(b.chunks_exact(width)) {
        let (x, y) = if width == 4 {
            (
                i32::from_le_bytes(x.try_into().unwrap()) as i64,
                i32::from_le_bytes(y.try_into().unwrap()) as i64,
            )
        } else {
            (
                i16::from_le_bytes(x.try_into().unwrap()) as i64,
                i16::from_le_bytes(y.try_into().unwrap()) as i64,
            )
        };
        n += 1;
        if x != y {
            differ += 1;
            max = max.max(x.abs_diff(y));
        }
    }
    (n, differ, max)
}

/// Compares a merge with PEFT's: same names, dtypes and shapes; tensors PEFT did not change
/// byte-identical; changed ones bit-identical in ≥ 99.9% of elements and within 1 ulp.
/// Returns (percent identical, max ulp) over the changed tensors.
fn compare(variant: &str, base: &Tensors, got: &Tensors, want: &Tensors) -> (f64, u64) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{variant}: names"
    );
    let (mut n, mut differ, mut max) = (0usize, 0usize, 0u64);
    let mut changed = 0;
    for (name, (dt, shape, bytes)) in want {
        let (gdt, gshape, gbytes) = &got[name];
        assert_eq!((gdt, gshape), (dt, shape), "{variant}: {name}");
        if base.get(name).map(|b| &b.2) == Some(bytes) {
            assert_eq!(gbytes, bytes, "{variant}: {name} is untouched but differs");
            continue;
        }
        changed += 1;
        let (tn, td, tm) = ulp_diff(dt, gbytes, bytes);
        n += tn;
        differ += td;
        max = max.max(tm);
    }
    assert!(changed > 0, "{variant}: PEFT changed nothing?");
    let pct = 100.0 * (n - differ) as f64 / n as f64;
    println!(
        "{variant}: {changed} merged tensors, {n} elements, {pct:.4}% bit-identical to PEFT, max {max} ulp"
    );
    assert!(
        pct >= 99.9 && max <= 1,
        "{variant}: {pct}% identical, max {max} ulp"
    );
    (pct, max)
}

#[test]
fn every_variant_matches_peft() {
    for (variant, base) in VARIANTS {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("merged");
        let o = merge(&lora(base), &lora(&format!("{variant}/adapter")), &out, &[]);
        assert_ok(&o);
        compare(
            variant,
            &tensors(&lora(base)),
            &tensors(&out),
            &tensors(&lora(&format!("{variant}/merged"))),
        );
    }
}

/// The files beside the weights: the base's config.json and generation_config.json as they
/// are, the tokenizer; and nothing else.
#[test]
fn config_and_tokenizer_are_copied() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("merged");
    assert_ok(&merge(
        &lora("base_bf16"),
        &lora("embed_bf16/adapter"),
        &out,
        &[],
    ));
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(lora("base_bf16").join(f)).unwrap(),
            "{f}"
        );
    }
    assert_eq!(
        common::listing(&out),
        [
            "chat_template.jinja",
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
}

/// Writes `tensors` as safetensors (names sorted) to `path`.
fn write_st(path: &Path, tensors: &Tensors) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, (dt, shape, data))| {
            let dtype = match dt.as_str() {
                "BF16" => safetensors::Dtype::BF16,
                "F32" => safetensors::Dtype::F32,
                other => panic!("{other}"),
            };
            (
                n.clone(),
                safetensors::tensor::TensorView::new(dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// A sharded base (index + 2 files) gives the same merge; a small --max-shard-size gives
/// shards + index with the same tensors.
#[test]
fn sharded_base_and_sharded_output() {
    let t = tempfile::tempdir().unwrap();
    let want = tensors(&lora("lora_bf16/merged"));
    // base_bf16 in two shards and an index, as transformers names them.
    let base = t.path().join("base");
    std::fs::create_dir_all(&base).unwrap();
    std::fs::copy(lora("base_bf16/config.json"), base.join("config.json")).unwrap();
    let all = tensors(&lora("base_bf16"));
    let half = all.len() / 2;
    let (first, second): (Tensors, Tensors) = (
        all.iter()
            .take(half)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        all.iter()
            .skip(half)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    );
    let names = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    write_st(&base.join(names[0]), &first);
    write_st(&base.join(names[1]), &second);
    let weight_map: serde_json::Map<String, serde_json::Value> = first
        .keys()
        .map(|k| (k.clone(), names[0].into()))
        .chain(second.keys().map(|k| (k.clone(), names[1].into())))
        .collect();
    std::fs::write(
        base.join("model.safetensors.index.json"),
        serde_json::to_vec(&serde_json::json!({"metadata": {}, "weight_map": weight_map})).unwrap(),
    )
    .unwrap();
    let out = t.path().join("a");
    assert_ok(&merge(&base, &lora("lora_bf16/adapter"), &out, &[]));
    assert_eq!(tensors(&out), want);
    let out = t.path().join("b");
    assert_ok(&merge(
        &lora("base_bf16"),
        &lora("lora_bf16/adapter"),
        &out,
        &["--max-shard-size", "20KB", "--memory-budget", "64KiB"],
    ));
    let names = common::listing(&out);
    assert!(
        names.contains(&"model.safetensors.index.json".to_string())
            && names.contains(&"model-00001-of-00003.safetensors".to_string()),
        "{names:?}"
    );
    assert_eq!(tensors(&out), want);
}

/// `--config`: base_model a local path or in the local hub cache, the adapter in output_dir,
/// the result in output_dir/merged.
#[test]
fn axolotl_config() {
    let t = tempfile::tempdir().unwrap();
    let out_dir = t.path().join("out");
    copy_dir(&lora("embed_bf16/adapter"), &out_dir);
    let cfg = t.path().join("cfg.yml");
    std::fs::write(
        &cfg,
        format!(
            "base_model: {}\nadapter: lora\noutput_dir: {}\nbf16: true\n",
            s(&lora("base_bf16")),
            s(&out_dir)
        ),
    )
    .unwrap();
    assert_ok(&axsave(&["merge-lora", "--config", s(&cfg)]));
    let want = tensors(&lora("embed_bf16/merged"));
    assert_eq!(tensors(&out_dir.join("merged")), want);

    // A hub id found in the local cache (HF_HUB_CACHE), never downloaded.
    let cache = t.path().join("hub");
    let snap = cache.join("models--tiny-org--base/snapshots/0123abc");
    copy_dir(&lora("base_bf16"), &snap);
    std::fs::create_dir_all(cache.join("models--tiny-org--base/refs")).unwrap();
    std::fs::write(cache.join("models--tiny-org--base/refs/main"), "0123abc").unwrap();
    let lora_dir = t.path().join("lora_dir");
    copy_dir(&lora("embed_bf16/adapter"), &lora_dir);
    let out2 = t.path().join("out2");
    std::fs::write(
        &cfg,
        format!(
            "base_model: tiny-org/base\nlora_model_dir: {}\noutput_dir: {}\n",
            s(&lora_dir),
            s(&out2)
        ),
    )
    .unwrap();
    let o = std::process::Command::new(common::bin())
        .args(["merge-lora", "--config", s(&cfg)])
        .env("HF_HUB_CACHE", &cache)
        .output()
        .unwrap();
    assert_ok(&o);
    assert_eq!(tensors(&out2.join("merged")), want);

    // Not there: an error naming it, nothing written.
    std::fs::write(
        &cfg,
        format!("base_model: tiny-org/absent\noutput_dir: {}\n", s(&out2)),
    )
    .unwrap();
    let o = std::process::Command::new(common::bin())
        .args(["merge-lora", "--config", s(&cfg)])
        .env("HF_HUB_CACHE", &cache)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("tiny-org/absent"), "{}", stderr(&o));
}

/// Runs a merge expected to fail: exit 1, the message contains `needle`, nothing written.
fn fails(base: &Path, adapter: &Path, needle: &str) {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let o = merge(base, adapter, &out, &[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains(needle), "wanted {needle:?} in: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert_no_output(&out);
    assert!(!out.exists(), "{} was created", out.display());
}

/// An adapter directory with its config edited by `f`.
fn edited_adapter(t: &Path, variant: &str, f: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let dir = t.join(format!("{variant}-edited"));
    copy_dir(&lora(&format!("{variant}/adapter")), &dir);
    let p = dir.join("adapter_config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
    dir
}

#[test]
fn unsupported_settings_are_refused_before_writing() {
    let t = tempfile::tempdir().unwrap();
    let base = lora("base_bf16");
    let a = edited_adapter(t.path(), "lora_bf16", |v| v["peft_type"] = "LOHA".into());
    fails(&base, &a, "peft_type LOHA");
    let a = edited_adapter(t.path(), "rslora_bf16", |v| {
        v["layer_replication"] = serde_json::json!([[0, 2]])
    });
    fails(&base, &a, "layer_replication");
    let a = edited_adapter(t.path(), "bias_bf16", |v| {
        v["some_new_option"] = serde_json::json!(true)
    });
    fails(&base, &a, "some_new_option");
    // A rank_pattern that disagrees with the tensors would scale wrongly.
    let a = edited_adapter(t.path(), "lora_bf16", |v| {
        v["rank_pattern"] = serde_json::json!({"q_proj": 2})
    });
    fails(&base, &a, "q_proj.lora_A.weight has rank 4");
}

#[test]
fn mismatched_adapters_name_the_tensor() {
    let t = tempfile::tempdir().unwrap();
    // Shapes: the axolotl fixture's base has hidden size 16, the adapter was made for 32.
    fails(
        &fixture("axolotl/base"),
        &lora("lora_bf16/adapter"),
        "down_proj.lora_B.weight [32, 8] do not fit model.layers.0.mlp.down_proj.weight [16, 32]",
    );
    // A target module the base lacks.
    let base = t.path().join("base");
    copy_dir(&lora("base_bf16"), &base);
    let mut kept = tensors(&lora("base_bf16"));
    kept.remove("model.layers.1.self_attn.o_proj.weight");
    write_st(&base.join("model.safetensors"), &kept);
    fails(
        &base,
        &lora("lora_bf16/adapter"),
        "needs model.layers.1.self_attn.o_proj.weight, which the base model does not have",
    );
    // A missing base, a missing adapter.
    fails(
        &t.path().join("nowhere"),
        &lora("lora_bf16/adapter"),
        "does not exist",
    );
    fails(&lora("base_bf16"), t.path(), "no adapter_config.json");
}

/// A `modules_to_save` copy saved in fp32 is rounded to the base's bf16 as PEFT's load does
/// (here: bf16 values widened exactly, so the result must be PEFT's own).
#[test]
fn modules_to_save_copy_in_another_dtype() {
    let t = tempfile::tempdir().unwrap();
    let adapter = t.path().join("adapter");
    copy_dir(&lora("embed_bf16/adapter"), &adapter);
    let file = adapter.join("adapter_model.safetensors");
    let mut all = tensors(&file);
    let (dt, shape, data) = all.remove("base_model.model.lm_head.weight").unwrap();
    assert_eq!(dt, "BF16");
    let widened: Vec<u8> = data
        .chunks_exact(2)
        .flat_map(|c| [0, 0, c[0], c[1]])
        .collect();
    all.insert(
        "base_model.model.lm_head.weight".into(),
        ("F32".into(), shape, widened),
    );
    write_st(&file, &all);
    let out = t.path().join("out");
    assert_ok(&merge(
        &lora("base_bf16"),
        &adapter,
        &out,
        &["--memory-budget", "1KiB"],
    ));
    assert_eq!(tensors(&out), tensors(&lora("embed_bf16/merged")));
}

/// A wrong call is a usage error (exit 2); --help explains.
#[test]
fn usage() {
    let o = axsave(&["merge-lora", "--base", "x"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = axsave(&["merge-lora", "--config", "c.yml", "--base", "x"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = axsave(&["merge-lora", "--help"]);
    assert!(o.status.success());
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(
        help.contains("merge_and_unload") && help.contains("--max-shard-size"),
        "{help}"
    );
}

/// An output that already holds a model is refused without --force, and replaced with it.
#[test]
fn existing_output_needs_force() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    assert_ok(&merge(
        &lora("base_f32"),
        &lora("lora_f32/adapter"),
        &out,
        &[],
    ));
    let o = merge(&lora("base_bf16"), &lora("lora_bf16/adapter"), &out, &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));
    assert_eq!(tensors(&out), tensors(&lora("lora_f32/merged")));
    assert_ok(&merge(
        &lora("base_bf16"),
        &lora("lora_bf16/adapter"),
        &out,
        &["--force"],
    ));
    assert_eq!(tensors(&out), tensors(&lora("lora_bf16/merged")));
}

fn launch_merge(n: &str, base: &Path, adapter: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = ["launch", "-n", n, "--", "merge-lora", "--base"]
        .iter()
        .map(|x| x.to_string())
        .collect();
    v.extend([
        s(base).to_string(),
        "--adapter".into(),
        s(adapter).to_string(),
        "--output".into(),
        s(out).to_string(),
    ]);
    v.extend(extra.iter().map(|x| x.to_string()));
    v
}

/// Under `axsave launch -n 3` every rank merges a share of the tensors into the shared output
/// files (sharded at 20 KB) and rank 0 commits: every variant as PEFT merges it.
#[test]
fn three_ranks_share_the_merge() {
    let t = tempfile::tempdir().unwrap();
    for (variant, base) in VARIANTS {
        let out = t.path().join(variant);
        let args = launch_merge(
            "3",
            &lora(base),
            &lora(&format!("{variant}/adapter")),
            &out,
            &["--max-shard-size", "20KB"],
        );
        let o = axsave(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert_ok(&o);
        let err = stderr(&o);
        for r in 0..3 {
            let line = err
                .lines()
                .find(|l| l.contains(&format!("rank {r}: writing ")))
                .unwrap_or_else(|| panic!("rank {r} wrote nothing: {err}"));
            assert!(!line.contains("writing 0 of"), "{line}");
        }
        compare(
            &format!("{variant}, 3 ranks"),
            &tensors(&lora(base)),
            &tensors(&out),
            &tensors(&lora(&format!("{variant}/merged"))),
        );
        assert!(
            common::listing(&out)
                .iter()
                .all(|n| !n.contains(".axsave-")),
            "temporaries left: {:?}",
            common::listing(&out)
        );
    }
}

/// Failures across ranks: every rank exits non-zero and nothing is left behind, whether the
/// inputs are wrong (every rank fails), the output exists (rank 0 refuses, the others learn
/// it), or a rank dies in the middle (the others give up after --timeout).
#[test]
fn failures_across_ranks_leave_nothing() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("a");
    let args = launch_merge(
        "3",
        &t.path().join("nowhere"),
        &lora("dora_bf16/adapter"),
        &out,
        &[],
    );
    let o = axsave(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("does not exist"), "{}", stderr(&o));
    assert_no_output(&out);

    // An existing model without --force: untouched.
    let out = t.path().join("b");
    assert_ok(&merge(
        &lora("base_f32"),
        &lora("lora_f32/adapter"),
        &out,
        &[],
    ));
    let before = tensors(&out);
    let args = launch_merge(
        "3",
        &lora("base_bf16"),
        &lora("lora_bf16/adapter"),
        &out,
        &[],
    );
    let o = axsave(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));
    assert_eq!(tensors(&out), before);
    assert_eq!(
        common::listing(&out).len(),
        3,
        "{:?}",
        common::listing(&out)
    );

    // Rank 1 killed after the files exist (ranks as torchrun or srun start them, so that no
    // launcher stops the survivors): rank 0 and 2 give up after --timeout and remove the
    // temporaries.
    let out = t.path().join("c");
    let fault = t.path().join("fault");
    let fault_s = s(&fault).to_string();
    let children = common::spawn_ranks(
        3,
        &[
            "merge-lora",
            "--base",
            s(&lora("base_bf16")),
            "--adapter",
            s(&lora("lora_bf16/adapter")),
            "--output",
            s(&out),
            "--timeout",
            "3",
        ],
        &|_| {
            vec![
                ("AXSAVE_FAULT".into(), "merging@1".into()),
                ("AXSAVE_FAULT_FILE".into(), fault_s.clone()),
            ]
        },
    );
    let started = std::time::Instant::now();
    while !fault.exists() {
        assert!(
            started.elapsed().as_secs() < 60,
            "rank 1 never reached the fault point"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(
        common::listing(&out).iter().any(|n| n.contains(".axsave-")),
        "rank 0 made no temporaries: {:?}",
        common::listing(&out)
    );
    let text = std::fs::read_to_string(&fault).unwrap();
    let pid = text.split_whitespace().nth(1).unwrap();
    let k = std::process::Command::new("kill")
        .args(["-9", pid])
        .status()
        .unwrap();
    assert!(k.success());
    let results = common::wait_ranks(children, std::time::Duration::from_secs(60));
    for (r, (code, text, took)) in results.iter().enumerate() {
        if r != 1 {
            assert_eq!(*code, Some(1), "rank {r}: {text}");
            assert!(took.as_secs() < 30, "rank {r} took {took:?}");
        }
    }
    assert!(
        results[0].1.contains("rank 1 has not been heard from"),
        "{}",
        results[0].1
    );
    assert_no_output(&out);
}
