//! From the command line and (with `--config`) an Axolotl config to what the save will do.
//! Command-line flags override the config's `axsave:` section, which overrides what the
//! Axolotl keys imply, which overrides the defaults.

use std::path::{Path, PathBuf};

use crate::axolotl::config::{AxolotlConfig, resolve};
use crate::axolotl::extras::{self, Extra};
use crate::axolotl::{CleanupPlan, Extras, peft, select};
use crate::error::CoreError;
use crate::layout::{DtypeChoice, LayoutOptions};
use crate::plan::Mode;
use crate::size::parse_size;
use crate::transport::TransportRequest;

/// What the command line asked for (`None`: not given), before the config is consulted. With
/// the `clap` feature these are the save's flags themselves (`#[command(flatten)]`); `force`,
/// `dry_run` and `device` are not the config's to set, and are here for `--help`'s order.
#[derive(Debug, Clone, Default)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct Flags {
    /// The Axolotl config the training ran with (`cfg.yml`). axsave then finds the checkpoint in
    /// `output_dir` (the final FSDP save, else the newest complete `checkpoint-N`, or DeepSpeed's
    /// `latest`), writes into `output_dir`, picks the dtype from `bf16`/`fp16`, writes only the
    /// adapter for `adapter: lora|qlora`, and copies the tokenizer and config files. Its
    /// `axsave:` section may set source, output, mode, dtype, max_shard_size, transport,
    /// memory_budget, timeout, cleanup, include and exclude; flags given here override it.
    #[cfg_attr(feature = "clap", arg(long, value_name = "FILE"))]
    pub config: Option<PathBuf>,

    /// Checkpoint directory: DCP (`.metadata` + `*.distcp`, e.g. `pytorch_model_fsdp_0`), DCP
    /// Hugging Face shards (`shard-*-model-*.safetensors`), or a safetensors model (a
    /// directory, a `.safetensors` file or an index). `{rank}`, `{local_rank}` and
    /// `{node_rank}` are replaced per rank, for node-local disks.
    #[cfg_attr(
        feature = "clap",
        arg(long, value_name = "DIR", required_unless_present = "config")
    )]
    pub source: Option<PathBuf>,

    /// Directory to write the model into (created if missing).
    #[cfg_attr(
        feature = "clap",
        arg(long, value_name = "DIR", required_unless_present = "config")
    )]
    pub output: Option<PathBuf>,

    /// Dtype of floating tensors in the output (default: keep, or what the config implies);
    /// integer and bool tensors always keep theirs. `bf16`/`fp16` round to nearest even exactly
    /// as torch's `.to()` does. Quantized weights are never converted: float8 and packed fp4
    /// (`float4_e2m1fn_x2`, written as safetensors `F4`) tensors keep their dtype, and so do
    /// their scales: a tensor named `<module>.weight_scale_inv`, `.weight_scale`,
    /// `.weight_scale_2` or `.input_scale` whose `<module>.weight` is float8 or fp4.
    #[cfg_attr(feature = "clap", arg(long, value_enum))]
    pub dtype: Option<DtypeChoice>,

    /// Write only tensors whose output name matches one of these globs (`*`, `?`, `[..]`;
    /// repeatable), e.g. `--include 'model.layers.*'`. Applied after axsave's own choice of
    /// what is the model: under a top-level `model` entry (Accelerate, Lightning) only that;
    /// else everything except torchtitan's, Lightning's and the usual optimizer, lr_scheduler,
    /// dataloader and train_state entries.
    #[cfg_attr(feature = "clap", arg(long, value_name = "GLOB"))]
    pub include: Option<Vec<String>>,

    /// Leave out tensors whose output name matches one of these globs (repeatable), e.g.
    /// `--exclude 'ema.*' --exclude '*.rotary_emb.inv_freq'`.
    #[cfg_attr(feature = "clap", arg(long, value_name = "GLOB"))]
    pub exclude: Option<Vec<String>>,

    /// Largest output file before the model is split into shards plus an index (default 5GB).
    /// Decimal units as transformers reads them (KB, MB, GB = powers of 1000; KiB, MiB, GiB =
    /// powers of 1024).
    #[cfg_attr(feature = "clap", arg(long, value_name = "SIZE"))]
    pub max_shard_size: Option<String>,

    /// Memory the copy, network and output-writer buffers may use (default 256MiB); peak memory
    /// stays near this whatever the model size.
    #[cfg_attr(feature = "clap", arg(long, value_name = "SIZE"))]
    pub memory_budget: Option<String>,

    /// Replace a model already in the output directory (files of an older save that the new
    /// one does not have are removed once the new one is in place).
    #[cfg_attr(feature = "clap", arg(long))]
    pub force: bool,

    /// After a successful save, remove the checkpoint directory it read (for DeepSpeed, the
    /// tag directory and `latest`; for a symbolic link, what it points to and then the link),
    /// and nothing else. Decided before anything is written: an output inside that directory,
    /// or a file as --source, is refused at once; --dry-run prints the same list.
    #[cfg_attr(feature = "clap", arg(long))]
    pub cleanup: bool,

    /// Print what would be read and written (and what --cleanup would remove), and write
    /// nothing.
    #[cfg_attr(feature = "clap", arg(long))]
    pub dry_run: bool,

    /// How the ranks share the work when several processes run (torchrun, srun, mpirun,
    /// `axsave launch`): `gather` (default) has rank 0 write every file, receiving over the
    /// network only the pieces it cannot read itself; `sharded` splits the output into at least
    /// one file per rank, each written by one rank in parallel into a directory every rank
    /// shares.
    #[cfg_attr(feature = "clap", arg(long, value_enum))]
    pub mode: Option<Mode>,

    /// How pieces travel (default auto). `auto`: by where the bytes go: a rank's own pieces on
    /// the CPU, pieces between ranks of one node by the host (mpi when available, else tcp),
    /// pieces between nodes over NCCL when every rank has a GPU and NCCL, else by the host; a
    /// save in which nothing crosses nodes (and any save by one process) uses no GPU. `nccl`:
    /// everything through the GPUs, with dtype conversions there (each rank binds its local
    /// rank's GPU, or --device); `mpi`: MPI messages (builds with MPI, under mpirun); `tcp`:
    /// direct connections, no GPU used. The log and --json say which way each class of bytes
    /// went and why. The rendezvous goes through PyTorch's TCPStore protocol at
    /// MASTER_ADDR:MASTER_PORT in every case.
    #[cfg_attr(feature = "clap", arg(long, value_enum))]
    pub transport: Option<TransportRequest>,

    /// The GPU this rank binds, as an index among the visible devices (default: the local rank
    /// modulo the number of visible GPUs, so rank i of a node takes GPU i).
    #[cfg_attr(feature = "clap", arg(long, value_name = "N"))]
    pub device: Option<usize>,

    /// Seconds a rank may go unheard before the others give up (default 60): a killed or hung
    /// rank makes every rank exit non-zero within about this long.
    #[cfg_attr(feature = "clap", arg(long, value_name = "SECONDS"))]
    pub timeout: Option<u64>,
}

/// Why a save could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// A mistake in how axsave was called (a missing flag, a bad value in the command line or
    /// in the config's `axsave:` section): exit code 2.
    #[error("{0}")]
    Usage(String),
    /// The current directory, against which the config's paths are resolved, is unknown.
    #[error("the current directory: {0}")]
    CurrentDir(#[source] std::io::Error),
    /// Reading the config, the checkpoint it points to or the files beside the weights failed.
    #[error(transparent)]
    Core(#[from] CoreError),
}

type Result<T, E = ResolveError> = std::result::Result<T, E>;

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

impl Resolved {
    /// What `--cleanup` will remove of this rank's view of the source (`None` without
    /// `--cleanup`): decided before anything is written, so that a conflict (the output inside
    /// the checkpoint, a file as source) fails at once.
    pub fn cleanup_plan(
        &self,
        rank: usize,
        local_rank: usize,
        node_rank: Option<usize>,
    ) -> Result<Option<CleanupPlan>> {
        if !self.cleanup {
            return Ok(None);
        }
        let src = crate::distributed::inventory::expand_source(
            &self.source,
            rank,
            local_rank,
            node_rank,
        )?;
        Ok(Some(CleanupPlan::new(Path::new(&src), &self.output)?))
    }

    /// A digest of what every rank must agree on: what and where to save, and how (`force`:
    /// `--force`).
    pub fn fingerprint(&self, force: bool) -> String {
        let key = format!(
            "{}|{}|{:?}|{:?}|{}|{}|{:?}",
            self.source,
            self.output.display(),
            self.layout,
            self.mode,
            force,
            self.cleanup,
            self.transport
        );
        let mut h = crc32fast::Hasher::new();
        h.update(key.as_bytes());
        format!("{:08x}", h.finalize())
    }
}

fn size(flag: &str, v: &str) -> Result<u64> {
    parse_size(v).map_err(|e| ResolveError::Usage(format!("{flag}: {e}")))
}

/// `--transport`, else the config's `axsave.transport`, else `auto`.
fn transport_of(a: &Flags, config: Option<&str>) -> Result<TransportRequest> {
    if let Some(t) = a.transport {
        return Ok(t);
    }
    match config {
        None => Ok(TransportRequest::Auto),
        Some(s) => TransportRequest::parse(s).ok_or_else(|| {
            ResolveError::Usage(format!(
                "axsave.transport: {s:?} is not one of auto, nccl, mpi, tcp"
            ))
        }),
    }
}

fn dtype_of(s: &str) -> Result<DtypeChoice> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "keep" => DtypeChoice::Keep,
        "bf16" | "bfloat16" => DtypeChoice::Bf16,
        "fp16" | "float16" => DtypeChoice::Fp16,
        "fp32" | "float32" => DtypeChoice::Fp32,
        _ => {
            return Err(ResolveError::Usage(format!(
                "axsave.dtype: {s:?} is not one of keep, bf16, fp16, fp32"
            )));
        }
    })
}

fn mode_of(s: &str) -> Result<Mode> {
    Ok(match s {
        "gather" => Mode::Gather,
        "sharded" => Mode::Sharded,
        _ => {
            return Err(ResolveError::Usage(format!(
                "axsave.mode: {s:?} is not gather or sharded"
            )));
        }
    })
}

/// Resolves the save. `rank0` says whether this process gathers the extra files.
pub fn resolve_save(a: &Flags, rank0: bool) -> Result<Resolved> {
    let cwd = std::env::current_dir().map_err(ResolveError::CurrentDir)?;
    resolve_in(a, rank0, &cwd, &|k| std::env::var(k).ok())
}

/// [`resolve_save`] with the config's paths relative to `cwd` and the environment (the Hugging
/// Face cache's location) read through `env`.
pub fn resolve_in(
    a: &Flags,
    rank0: bool,
    cwd: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Resolved> {
    let cfg = match &a.config {
        Some(p) => Some(AxolotlConfig::load(p)?),
        None => None,
    };
    let sec = cfg
        .as_ref()
        .and_then(|c| c.axsave.clone())
        .unwrap_or_default();
    let output_dir = cfg
        .as_ref()
        .and_then(|c| c.output_dir.as_deref())
        .map(|p| resolve(cwd, p));
    let mut notes = Vec::new();
    let mut warnings = Vec::new();

    let output: PathBuf = match (&a.output, &sec.output, &output_dir) {
        (Some(o), _, _) => o.clone(),
        (None, Some(o), _) => resolve(cwd, o),
        (None, None, Some(o)) => o.clone(),
        _ => {
            return Err(ResolveError::Usage(
                "--output is required (or --config with output_dir)".into(),
            ));
        }
    };

    let adapter = cfg.as_ref().is_some_and(AxolotlConfig::is_adapter);
    let mut checkpoint_dir = None;
    let source: String = match (&a.source, &sec.source) {
        (Some(s), _) => s.to_string_lossy().into_owned(),
        (None, Some(s)) => resolve(cwd, s).to_string_lossy().into_owned(),
        (None, None) => {
            let (Some(c), Some(out_dir)) = (&cfg, &output_dir) else {
                return Err(ResolveError::Usage(
                    "--source is required (or --config with output_dir, to find the newest checkpoint)"
                        .into(),
                ));
            };
            let deepspeed = c.zero_stage(cwd)?.is_some();
            let chosen = select::choose(out_dir, deepspeed)?;
            notes.push(format!("reading {}", chosen.why));
            warnings.extend(chosen.warnings);
            checkpoint_dir = chosen.checkpoint_dir;
            chosen.source.to_string_lossy().into_owned()
        }
    };

    let dtype = match (a.dtype, &sec.dtype) {
        (Some(d), _) => d,
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
        (Some(m), _) => m,
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
    crate::naming::NameFilter::new(&layout.include, &layout.exclude)
        .map_err(|e| ResolveError::Usage(e.to_string()))?;

    let extras = match (&cfg, rank0) {
        (Some(c), true) => gather_extras(
            c,
            cwd,
            env,
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
fn local_dir(cwd: &Path, env: &dyn Fn(&str) -> Option<String>, p: &str) -> Option<PathBuf> {
    let path = resolve(cwd, p);
    if path.is_dir() {
        return Some(path);
    }
    extras::hub_snapshot(p, env)
}

/// Finds the tokenizer, config and adapter config, in Axolotl's order of places.
fn gather_extras(
    c: &AxolotlConfig,
    cwd: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    output_dir: Option<&Path>,
    checkpoint_dir: Option<&Path>,
    adapter: bool,
    notes: &mut Vec<String>,
) -> Result<Extras> {
    let base = c.base_model.as_deref().and_then(|b| local_dir(cwd, env, b));
    let mut run_dirs: Vec<PathBuf> = Vec::new();
    run_dirs.extend(output_dir.map(Path::to_path_buf));
    run_dirs.extend(checkpoint_dir.map(Path::to_path_buf));
    let mut tok_search = run_dirs.clone();
    tok_search.extend(
        c.tokenizer_config
            .as_deref()
            .and_then(|t| local_dir(cwd, env, t)),
    );
    tok_search.extend(base.clone());
    let mut cfg_search = run_dirs.clone();
    cfg_search.extend(
        c.base_model_config
            .as_deref()
            .and_then(|t| local_dir(cwd, env, t)),
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
                let raw = std::fs::read(&p).map_err(|source| CoreError::Io {
                    path: p.clone(),
                    source,
                })?;
                let bytes = peft::saved_adapter_config(&raw)
                    .ok_or_else(|| {
                        CoreError::Config(format!("{}: not a JSON object", p.display()))
                    })?
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

#[cfg(test)]
mod tests {
    use super::*;

    const NO_ENV: &dyn Fn(&str) -> Option<String> = &|_| None;

    /// A config file in a fresh directory; returns (directory, flags pointing at the config).
    fn with_config(yaml: &str) -> (tempfile::TempDir, Flags) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cfg.yml");
        std::fs::write(&path, yaml).unwrap();
        let flags = Flags {
            config: Some(path),
            source: Some("ckpt".into()),
            ..Flags::default()
        };
        (dir, flags)
    }

    fn usage(r: Result<Resolved>) -> String {
        match r {
            Err(ResolveError::Usage(m)) => m,
            other => panic!("expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_without_a_config() {
        let flags = Flags {
            source: Some("ckpt/{rank}".into()),
            output: Some("out".into()),
            ..Flags::default()
        };
        let r = resolve_in(&flags, true, Path::new("/work"), NO_ENV).unwrap();
        assert_eq!(r.source, "ckpt/{rank}");
        assert_eq!(r.output, PathBuf::from("out"));
        assert_eq!(r.layout.dtype, DtypeChoice::Keep);
        assert_eq!(r.layout.max_shard_size, 5_000_000_000);
        assert_eq!(r.layout.stem, "model");
        assert_eq!(r.memory_budget, 256 << 20);
        assert_eq!(r.mode, Mode::Gather);
        assert_eq!(r.timeout, 60);
        assert_eq!(r.transport, TransportRequest::Auto);
        assert!(!r.cleanup);
        assert!(r.extras.files.is_empty());
    }

    /// Flags over the `axsave:` section over what Axolotl's keys imply.
    #[test]
    fn flags_override_the_section_which_overrides_axolotl_keys() {
        let yaml = "output_dir: ./run\nbf16: true\naxsave:\n  output: ./final\n  dtype: float16\n  mode: sharded\n  transport: TCP\n  timeout: 9\n  max_shard_size: 1MB\n  cleanup: true\n";
        let (dir, mut flags) = with_config(yaml);
        let cwd = dir.path();
        let r = resolve_in(&flags, false, cwd, NO_ENV).unwrap();
        assert_eq!(r.output, cwd.join("final"));
        assert_eq!(r.layout.dtype, DtypeChoice::Fp16);
        assert_eq!(r.mode, Mode::Sharded);
        assert_eq!(r.transport, TransportRequest::Tcp);
        assert_eq!(r.timeout, 9);
        assert_eq!(r.layout.max_shard_size, 1_000_000);
        assert!(r.cleanup);

        flags.output = Some("/elsewhere".into());
        flags.dtype = Some(DtypeChoice::Fp32);
        flags.mode = Some(Mode::Gather);
        flags.transport = Some(TransportRequest::Nccl);
        flags.timeout = Some(3);
        flags.max_shard_size = Some("2GiB".into());
        let r = resolve_in(&flags, false, cwd, NO_ENV).unwrap();
        assert_eq!(r.output, PathBuf::from("/elsewhere"));
        assert_eq!(r.layout.dtype, DtypeChoice::Fp32);
        assert_eq!(r.mode, Mode::Gather);
        assert_eq!(r.transport, TransportRequest::Nccl);
        assert_eq!(r.timeout, 3);
        assert_eq!(r.layout.max_shard_size, 2 << 30);
    }

    /// Without `--output` or `axsave.output`, Axolotl's `output_dir`; full weights follow
    /// `bf16`/`fp16`, adapters keep their dtype and are named `adapter_model`.
    #[test]
    fn axolotl_keys_decide_output_dtype_and_stem() {
        let (dir, flags) = with_config("output_dir: ./run\nbf16: auto\n");
        let r = resolve_in(&flags, false, dir.path(), NO_ENV).unwrap();
        assert_eq!(r.output, dir.path().join("run"));
        assert_eq!(r.layout.dtype, DtypeChoice::Bf16);
        assert_eq!(r.layout.stem, "model");
        assert!(!r.layout.adapter);

        let (dir, flags) = with_config("output_dir: ./run\nfp16: true\n");
        let r = resolve_in(&flags, false, dir.path(), NO_ENV).unwrap();
        assert_eq!(r.layout.dtype, DtypeChoice::Fp16);

        let (dir, flags) = with_config("output_dir: ./run\nbf16: true\nadapter: lora\n");
        let r = resolve_in(&flags, false, dir.path(), NO_ENV).unwrap();
        assert_eq!(r.layout.dtype, DtypeChoice::Keep);
        assert_eq!(r.layout.stem, "adapter_model");
        assert!(r.layout.adapter);
    }

    /// Rank 0 gathers the files beside the weights; for an adapter without a saved
    /// adapter_config.json, one is built from the config.
    #[test]
    fn only_rank_0_gathers_extras() {
        let (dir, flags) = with_config("output_dir: ./run\nadapter: lora\nlora_r: 8\n");
        let r = resolve_in(&flags, false, dir.path(), NO_ENV).unwrap();
        assert!(r.extras.files.is_empty());
        let r = resolve_in(&flags, true, dir.path(), NO_ENV).unwrap();
        let names: Vec<&str> = r.extras.files.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["adapter_config.json"]);
        assert!(!r.extras.set_dtype);
        assert!(r.notes.iter().any(|n| n.contains("built from the config")));
    }

    #[test]
    fn bad_values_are_usage_errors_naming_the_setting() {
        let (dir, flags) = with_config("output_dir: ./run\naxsave:\n  transport: ib\n");
        let m = usage(resolve_in(&flags, false, dir.path(), NO_ENV));
        assert_eq!(
            m,
            "axsave.transport: \"ib\" is not one of auto, nccl, mpi, tcp"
        );
        let (dir, flags) = with_config("output_dir: ./run\naxsave:\n  dtype: int8\n");
        let m = usage(resolve_in(&flags, false, dir.path(), NO_ENV));
        assert_eq!(
            m,
            "axsave.dtype: \"int8\" is not one of keep, bf16, fp16, fp32"
        );
        let (dir, flags) = with_config("output_dir: ./run\naxsave:\n  mode: scatter\n");
        let m = usage(resolve_in(&flags, false, dir.path(), NO_ENV));
        assert_eq!(m, "axsave.mode: \"scatter\" is not gather or sharded");
        let (dir, flags) = with_config("output_dir: ./run\naxsave:\n  memory_budget: lots\n");
        let m = usage(resolve_in(&flags, false, dir.path(), NO_ENV));
        assert!(m.starts_with("--memory-budget: "), "{m}");
        let (dir, mut flags) = with_config("output_dir: ./run\n");
        flags.include = Some(vec!["model.[".into()]);
        usage(resolve_in(&flags, false, dir.path(), NO_ENV));
    }

    #[test]
    fn missing_source_or_output_is_a_usage_error() {
        let cwd = Path::new("/work");
        let m = usage(resolve_in(&Flags::default(), false, cwd, NO_ENV));
        assert_eq!(m, "--output is required (or --config with output_dir)");
        let flags = Flags {
            output: Some("out".into()),
            ..Flags::default()
        };
        let m = usage(resolve_in(&flags, false, cwd, NO_ENV));
        assert!(m.starts_with("--source is required"), "{m}");
    }
}
