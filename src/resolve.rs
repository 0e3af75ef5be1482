//! From the command line and (with `--config`) an Axolotl config to what the save will do.
//! Command-line flags override the config's `axsave:` section, which overrides what the
//! Axolotl keys imply, which overrides the defaults.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use axsave_core::axolotl::config::{AxolotlConfig, resolve};
use axsave_core::axolotl::extras::{self, Extra};
use axsave_core::axolotl::{Extras, peft, select};
use axsave_core::layout::{DtypeChoice, LayoutOptions};
use axsave_core::plan::Mode;
use axsave_core::size::parse_size;
use axsave_core::transport::TransportRequest;

use crate::cli::{ModeArg, SaveArgs};
use crate::commands::UsageError;

/// Everything a save needs, resolved.
#[derive(Debug)]
pub struct Resolved {
    /// `--source`, placeholders not expanded.
    pub source: String,
    /// The output directory.
    pub output: PathBuf,
    /// Output shape.
    pub layout: LayoutOptions,
    /// Buffers.
    pub memory_budget: u64,
    /// Gather or sharded.
    pub mode: Mode,
    /// Seconds a silent rank is tolerated.
    pub timeout: u64,
    /// How bytes travel between ranks (and whether the GPU is used).
    pub transport: TransportRequest,
    /// Remove the consumed checkpoint after success.
    pub cleanup: bool,
    /// Tokenizer, config and adapter config to write beside the weights (rank 0 only).
    pub extras: Extras,
    /// What was chosen and why, for the log.
    pub notes: Vec<String>,
    /// Things the user should look at.
    pub warnings: Vec<String>,
}

fn size(flag: &str, v: &str) -> Result<u64> {
    parse_size(v).map_err(|e| UsageError(format!("{flag}: {e}")).into())
}

/// `--transport`, else the config's `axsave.transport`, else `auto`.
fn transport_of(a: &SaveArgs, config: Option<&str>) -> Result<TransportRequest> {
    if let Some(t) = a.transport {
        return Ok(t.into());
    }
    match config {
        None => Ok(TransportRequest::Auto),
        Some(s) => TransportRequest::parse(s).ok_or_else(|| {
            UsageError(format!(
                "axsave.transport: {s:?} is not one of auto, nccl, mpi, tcp"
            ))
            .into()
        }),
    }
}

fn dtype_of(s: &str) -> Result<DtypeChoice> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "keep" => DtypeChoice::Keep,
        "bf16" | "bfloat16" => DtypeChoice::Bf16,
        "fp16" | "float16" => DtypeChoice::Fp16,
        "fp32" | "float32" => DtypeChoice::Fp32,
        _ => anyhow::bail!(UsageError(format!(
            "axsave.dtype: {s:?} is not one of keep, bf16, fp16, fp32"
        ))),
    })
}

fn mode_of(s: &str) -> Result<Mode> {
    Ok(match s {
        "gather" => Mode::Gather,
        "sharded" => Mode::Sharded,
        _ => anyhow::bail!(UsageError(format!(
            "axsave.mode: {s:?} is not gather or sharded"
        ))),
    })
}

/// Resolves the save. `rank0` says whether this process gathers the extra files.
pub fn resolve_save(a: &SaveArgs, rank0: bool) -> Result<Resolved> {
    let cfg = match &a.config {
        Some(p) => Some(AxolotlConfig::load(p)?),
        None => None,
    };
    let sec = cfg
        .as_ref()
        .and_then(|c| c.axsave.clone())
        .unwrap_or_default();
    let cwd = std::env::current_dir().context("the current directory")?;
    let output_dir = cfg
        .as_ref()
        .and_then(|c| c.output_dir.as_deref())
        .map(|p| resolve(&cwd, p));
    let mut notes = Vec::new();
    let mut warnings = Vec::new();

    let output: PathBuf = match (&a.output, &sec.output, &output_dir) {
        (Some(o), _, _) => o.clone(),
        (None, Some(o), _) => resolve(&cwd, o),
        (None, None, Some(o)) => o.clone(),
        _ => anyhow::bail!(UsageError(
            "--output is required (or --config with output_dir)".into()
        )),
    };

    let adapter = cfg.as_ref().is_some_and(AxolotlConfig::is_adapter);
    let mut checkpoint_dir = None;
    let source: String = match (&a.source, &sec.source) {
        (Some(s), _) => s.to_string_lossy().into_owned(),
        (None, Some(s)) => resolve(&cwd, s).to_string_lossy().into_owned(),
        (None, None) => {
            let (Some(c), Some(out_dir)) = (&cfg, &output_dir) else {
                anyhow::bail!(UsageError(
                    "--source is required (or --config with output_dir, to find the newest checkpoint)"
                        .into()
                ));
            };
            let deepspeed = c.zero_stage(&cwd)?.is_some();
            let chosen = select::choose(out_dir, deepspeed)?;
            notes.push(format!("reading {}", chosen.why));
            warnings.extend(chosen.warnings);
            checkpoint_dir = chosen.checkpoint_dir;
            chosen.source.to_string_lossy().into_owned()
        }
    };

    let dtype = match (a.dtype, &sec.dtype) {
        (Some(d), _) => d.into(),
        (None, Some(d)) => dtype_of(d)?,
        // Adapters keep the dtype they were trained in (what PEFT's save_pretrained writes);
        // full weights follow bf16/fp16 as Axolotl's own merge does.
        (None, None) if !adapter => match cfg.as_ref().and_then(|c| c.full_weight_dtype()) {
            Some("bf16") => DtypeChoice::Bf16,
            Some("fp16") => DtypeChoice::Fp16,
            _ => DtypeChoice::Keep,
        },
        (None, None) => DtypeChoice::Keep,
    };
    let mode = match (a.mode, &sec.mode) {
        (Some(ModeArg::Gather), _) => Mode::Gather,
        (Some(ModeArg::Sharded), _) => Mode::Sharded,
        (None, Some(m)) => mode_of(m)?,
        (None, None) => Mode::Gather,
    };
    let max_shard = a
        .max_shard_size
        .clone()
        .or(sec.max_shard_size.clone())
        .unwrap_or_else(|| "5GB".into());
    let budget = a
        .memory_budget
        .clone()
        .or(sec.memory_budget.clone())
        .unwrap_or_else(|| "256MiB".into());
    let layout = LayoutOptions {
        dtype,
        max_shard_size: size("--max-shard-size", &max_shard)?,
        min_files: 1,
        stem: if adapter { "adapter_model" } else { "model" }.into(),
        adapter,
        include: a
            .include
            .clone()
            .or_else(|| sec.include.clone())
            .unwrap_or_default(),
        exclude: a
            .exclude
            .clone()
            .or_else(|| sec.exclude.clone())
            .unwrap_or_default(),
    };
    // A malformed glob is a usage error, found before any rank starts reading.
    axsave_core::naming::NameFilter::new(&layout.include, &layout.exclude)
        .map_err(|e| UsageError(e.to_string()))?;

    let extras = match (&cfg, rank0) {
        (Some(c), true) => gather_extras(
            c,
            &cwd,
            output_dir.as_deref(),
            checkpoint_dir.as_deref(),
            adapter,
            &mut notes,
        )?,
        _ => Extras::default(),
    };
    Ok(Resolved {
        source,
        output,
        layout,
        memory_budget: size("--memory-budget", &budget)?,
        mode,
        timeout: a.timeout.or(sec.timeout).unwrap_or(60),
        transport: transport_of(a, sec.transport.as_deref())?,
        cleanup: a.cleanup || sec.cleanup.unwrap_or(false),
        extras,
        notes,
        warnings,
    })
}

/// A local directory for a config path or hub id: the path itself when it exists, else the
/// model's snapshot in the local Hugging Face cache. Never the network.
fn local_dir(cwd: &Path, p: &str) -> Option<PathBuf> {
    let path = resolve(cwd, p);
    if path.is_dir() {
        return Some(path);
    }
    extras::hub_snapshot(p, &|k| std::env::var(k).ok())
}

/// Finds the tokenizer, config and adapter config, in Axolotl's order of places.
fn gather_extras(
    c: &AxolotlConfig,
    cwd: &Path,
    output_dir: Option<&Path>,
    checkpoint_dir: Option<&Path>,
    adapter: bool,
    notes: &mut Vec<String>,
) -> Result<Extras> {
    let base = c.base_model.as_deref().and_then(|b| local_dir(cwd, b));
    let mut run_dirs: Vec<PathBuf> = Vec::new();
    run_dirs.extend(output_dir.map(Path::to_path_buf));
    run_dirs.extend(checkpoint_dir.map(Path::to_path_buf));
    let mut tok_search = run_dirs.clone();
    tok_search.extend(
        c.tokenizer_config
            .as_deref()
            .and_then(|t| local_dir(cwd, t)),
    );
    tok_search.extend(base.clone());
    let mut cfg_search = run_dirs.clone();
    cfg_search.extend(
        c.base_model_config
            .as_deref()
            .and_then(|t| local_dir(cwd, t)),
    );
    cfg_search.extend(base.clone());

    let mut files: Vec<Extra> = extras::find_tokenizer(&tok_search)?;
    let mut tokenizer_vocab = None;
    if let Some(t) = files.iter().find(|e| e.name == "tokenizer.json") {
        tokenizer_vocab = Some(extras::tokenizer_vocab(t)?);
    }
    match files.first() {
        Some(f) => notes.push(format!(
            "tokenizer from {}",
            f.from.parent().unwrap_or(Path::new(".")).display()
        )),
        None => notes.push(format!(
            "no tokenizer found (looked in {})",
            tok_search
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
    let mut model_config = None;
    for e in extras::find_model_config(&cfg_search)? {
        if e.name == "config.json" {
            model_config = Some(e);
        } else {
            files.push(e);
        }
    }
    if adapter {
        let mut adapter_search = run_dirs;
        adapter_search.extend(c.lora_model_dir.as_deref().map(|d| resolve(cwd, d)));
        match adapter_search
            .iter()
            .map(|d| d.join("adapter_config.json"))
            .find(|p| p.is_file())
        {
            Some(p) => {
                let raw = std::fs::read(&p).with_context(|| p.display().to_string())?;
                let bytes = peft::saved_adapter_config(&raw)
                    .ok_or_else(|| anyhow::anyhow!("{}: not a JSON object", p.display()))?
                    .into_bytes();
                notes.push(format!("adapter_config.json from {}", p.display()));
                files.push(Extra {
                    name: "adapter_config.json".into(),
                    bytes,
                    from: p,
                });
            }
            None => {
                notes.push("adapter_config.json built from the config".into());
                files.push(Extra {
                    name: "adapter_config.json".into(),
                    bytes: peft::build_adapter_config(c).into_bytes(),
                    from: PathBuf::from("(the Axolotl config)"),
                });
            }
        }
    }
    Ok(Extras {
        files,
        model_config,
        set_dtype: !adapter,
        tokenizer_vocab,
    })
}
