//! What a current checkpoint may hold beside plain weights: packed fp4 and fp8
//! weights with their scales, and torchtitan's optimizer, scheduler, dataloader and train state
//! next to the model's keys. Fixtures from `scripts/fixtures/inputs.py` (torch 2.14).

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

fn save(source: &Path, extra: &[&str]) -> (tempfile::TempDir, String) {
    let out = tempfile::tempdir().unwrap();
    let mut args = vec!["--source", s(source), "--output", s(out.path())];
    args.extend_from_slice(extra);
    let o = axsave(&args);
    assert_ok(&o);
    (out, stderr(&o))
}

fn same_bytes(got: &Path, want: &Path) {
    let (g, w) = (std::fs::read(got).unwrap(), std::fs::read(want).unwrap());
    assert!(
        g == w,
        "{} differs from {} ({} vs {} bytes)",
        got.display(),
        want.display(),
        g.len(),
        w.len()
    );
}

/// A float8 weight with its F32 `weight_scale_inv`, a packed fp4 (`float4_e2m1fn_x2`) weight
/// with F32 `weight_scale` and `input_scale`: written exactly as `safetensors.torch.save_file`
/// writes them (fp4 as `F4`, last dimension in single values), and read back from such a file.
#[test]
fn fp8_and_packed_fp4_are_written_as_safetensors_does() {
    let src = fixture("inputs/quant/checkpoint");
    let want = fixture("inputs/quant/expected_keep.safetensors");
    let (out, _) = save(&src, &["-q"]);
    same_bytes(&out.path().join("model.safetensors"), &want);
    let t = tensors(&out.path().join("model.safetensors"));
    assert_eq!(t["layers.0.mlp.up_proj.weight"].0, "F4");
    assert_eq!(t["layers.0.mlp.up_proj.weight"].1, [8, 16]);
    // The F4 file as a source (resharding a finished model) gives the same bytes.
    let (again, _) = save(&want, &["-q"]);
    same_bytes(&again.path().join("model.safetensors"), &want);
    let o = axsave(&["verify", "--source", s(&src), "--output", s(out.path())]);
    assert_ok(&o);
}

/// `--dtype bf16` converts ordinary floating tensors but leaves the scales of fp8/fp4 weights in
/// F32 (a scale next to a bf16 weight is converted), byte-identical to save_file of the same rule.
#[test]
fn dtype_bf16_keeps_the_scales_of_quantized_weights() {
    let src = fixture("inputs/quant/checkpoint");
    let (out, _) = save(&src, &["-q", "--dtype", "bf16"]);
    let got = out.path().join("model.safetensors");
    same_bytes(&got, &fixture("inputs/quant/expected_bf16.safetensors"));
    let t = tensors(&got);
    for kept in [
        "layers.0.mlp.down_proj.weight_scale_inv",
        "layers.0.mlp.up_proj.weight_scale",
        "layers.0.mlp.up_proj.input_scale",
    ] {
        assert_eq!(t[kept].0, "F32", "{kept}");
    }
    assert_eq!(t["layers.0.mlp.gate_proj.weight_scale"].0, "BF16");
    assert_eq!(t["norm.weight"].0, "BF16");
    assert_eq!(t["layers.0.mlp.down_proj.weight"].0, "F8_E4M3");
}

const TITAN_MODEL: [&str; 9] = [
    "layers.0.norm.bias",
    "layers.0.norm.weight",
    "layers.0.w1.bias",
    "layers.0.w1.weight",
    "layers.0.wq.weight",
    "norm.bias",
    "norm.weight",
    "output.weight",
    "tok_embeddings.weight",
];

/// torchtitan's checkpoint: the model's keys at the top level next to `optimizer` (AdamW state
/// after one step), `lr_scheduler`, `dataloader`, `train_state`. Only the model is written,
/// byte-identical to save_file of its state dict, and the log says what was left out.
#[test]
fn torchtitan_checkpoint_gives_the_model_only() {
    let src = fixture("inputs/torchtitan_w2/checkpoint");
    let want = fixture("inputs/torchtitan_w2/reference.safetensors");
    let (out, log) = save(&src, &[]);
    same_bytes(&out.path().join("model.safetensors"), &want);
    let t = tensors(&out.path().join("model.safetensors"));
    assert_eq!(
        t.keys().collect::<Vec<_>>(),
        TITAN_MODEL.iter().collect::<Vec<_>>()
    );
    assert!(
        log.contains("left out 28 tensors") && log.contains("optimizer (27), train_state (1)"),
        "{log}"
    );

    // The same with 2 ranks, each reading only its own data file.
    let ranks = tempfile::tempdir().unwrap();
    for r in 0..2 {
        let d = ranks.path().join(format!("rank{r}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(src.join(".metadata"), d.join(".metadata")).unwrap();
        let f = format!("__{r}_0.distcp");
        std::fs::copy(src.join(&f), d.join(&f)).unwrap();
    }
    let out2 = tempfile::tempdir().unwrap();
    let pattern = format!("{}/rank{{rank}}", s(ranks.path()));
    let res = wait_ranks(
        spawn_ranks(
            2,
            &["--source", &pattern, "--output", s(out2.path()), "-q"],
            &|_| Vec::new(),
        ),
        Duration::from_secs(120),
    );
    for (r, (code, text, _)) in res.iter().enumerate() {
        assert_eq!(*code, Some(0), "rank {r}: {text}");
    }
    same_bytes(&out2.path().join("model.safetensors"), &want);
}

/// `--include` / `--exclude` globs over output names, also from the config's `axsave:` section.
#[test]
fn include_and_exclude_choose_tensors() {
    let src = fixture("inputs/torchtitan_w2/checkpoint");
    let (out, log) = save(
        &src,
        &[
            "--include",
            "layers.*",
            "--include",
            "norm.*",
            "--exclude",
            "*.bias",
        ],
    );
    let t = tensors(&out.path().join("model.safetensors"));
    assert_eq!(
        t.keys().collect::<Vec<_>>(),
        [
            "layers.0.norm.weight",
            "layers.0.w1.weight",
            "layers.0.wq.weight",
            "norm.weight"
        ]
    );
    let reference = tensors(&fixture("inputs/torchtitan_w2/reference.safetensors"));
    for (k, v) in &t {
        assert_eq!(v, &reference[k], "{k}");
    }
    assert!(log.contains("left out 33 tensors"), "{log}");

    // A tensor named `__metadata__` can be left out, and the rest saved.
    let (out, _) = save(
        &fixture("inputs/reserved_name/checkpoint"),
        &["-q", "--exclude", "__metadata__"],
    );
    let t = tensors(&out.path().join("model.safetensors"));
    assert_eq!(t.keys().collect::<Vec<_>>(), ["lm.weight"]);

    // From the config.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg.yml");
    let out = dir.path().join("out");
    std::fs::write(
        &cfg,
        format!(
            "output_dir: {}\naxsave:\n  source: {}\n  exclude: ['*.bias', 'output.*']\n",
            s(&out),
            s(&src)
        ),
    )
    .unwrap();
    assert_ok(&axsave(&["--config", s(&cfg), "-q"]));
    let t = tensors(&out.join("model.safetensors"));
    assert_eq!(t.len(), 5, "{:?}", t.keys().collect::<Vec<_>>());
    assert!(!t.contains_key("output.weight"));

    // A malformed glob is a usage error.
    let o = axsave(&["--source", s(&src), "--output", "x", "--include", "[a"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--include"), "{}", stderr(&o));
}
