//! The command line, as clap derives it.

use std::path::PathBuf;

use axsave_core::axolotl::resolve::Flags;
use clap::{Args, Parser, Subcommand};

/// Save the model at the end of distributed training: turn PyTorch DCP / FSDP shards, DCP's
/// Hugging Face shards or a safetensors model into Hugging Face safetensors, in one streaming
/// pass with bounded memory.
///
/// The output is `model.safetensors`, or `model-0000i-of-0000N.safetensors` shards plus
/// `model.safetensors.index.json` when it exceeds --max-shard-size. Files are written under
/// temporary names and renamed into place only when everything succeeded.
#[derive(Parser, Debug)]
#[command(
    name = "axsave",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = "Examples:\n  \
        axsave --source out/checkpoint-500/pytorch_model_fsdp_0 --output out/final\n  \
        axsave --source ckpt --output final --dtype bf16 --max-shard-size 2GB\n  \
        mpirun -n 8 axsave --config cfg.yml\n  \
        torchrun --nproc-per-node 8 --no-python axsave --source ckpt --output final\n  \
        srun axsave --source /scratch/{node_rank}/ckpt --output /shared/final --mode sharded\n  \
        axsave launch -n 4 -- --source ckpt --output final\n  \
        axsave inspect out/checkpoint-500/pytorch_model_fsdp_0\n  \
        axsave verify --source ckpt --output final\n\n\
        Exit codes: 0 success, 1 failure, 2 bad usage, 128+N cancelled by signal N (SIGTERM, \
        SIGINT, SIGHUP: the temporaries are removed). One save at a time writes into an output \
        directory (a lock, .axsave.lock). Logs go to stderr; RUST_LOG=debug shows more."
)]
pub struct Cli {
    /// What to do; without a subcommand, axsave saves.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Save options (the default command).
    #[command(flatten)]
    pub save: SaveArgs,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Describe a checkpoint: format, writer ranks, every tensor with its pieces.
    ///
    /// Example: axsave inspect out/checkpoint-500/pytorch_model_fsdp_0 --json
    Inspect(InspectArgs),
    /// Re-read a checkpoint and a saved output and compare every tensor's bytes.
    ///
    /// Each output tensor is rebuilt from the source (converted to the output's dtype where
    /// the output has another one) and compared byte for byte; the index is checked too. Exits
    /// 1 naming the first mismatch.
    ///
    /// Example: axsave verify --source ckpt --output final
    Verify(VerifyArgs),
    /// Merge a PEFT LoRA adapter into its safetensors base model, as PEFT's
    /// `merge_and_unload()` computes it, in one streaming pass with bounded memory.
    ///
    /// The output has the base's tensor names, dtypes and shapes (`model.safetensors`,
    /// or shards + index past --max-shard-size), the base's config.json and
    /// generation_config.json, and the tokenizer (from the adapter directory, else the
    /// base). Supported: LoRA on linear layers and embeddings, rsLoRA, rank_pattern and
    /// alpha_pattern, fan_in_fan_out, DoRA, lora_bias, modules_to_save. Anything else
    /// (another PEFT type, an unknown setting) is refused by name before anything is
    /// written. Under a launcher the ranks share the tensors (the output directory must
    /// be shared).
    ///
    /// Examples:
    ///   axsave merge-lora --base models/llama --adapter out/adapter --output out/merged
    ///   axsave merge-lora --config cfg.yml   # -> output_dir/merged
    ///   axsave launch -n 4 -- merge-lora --config cfg.yml
    #[command(verbatim_doc_comment)]
    MergeLora(MergeLoraArgs),
    // No `///` here: a doc comment on the variant would replace the long help and examples
    // that `LaunchArgs` carries.
    Launch(axsave_launch::LaunchArgs),
    /// Measure host-to-device, device-to-host and conversion bandwidth on this GPU (used by
    /// scripts/gpu-check.sh).
    #[command(hide = true)]
    GpuBench(GpuBenchArgs),
}

/// `axsave merge-lora`.
#[derive(Args, Debug, Clone)]
pub struct MergeLoraArgs {
    /// The Axolotl config of the LoRA run: `base_model` (a local directory or the local Hugging
    /// Face cache; never downloaded), the adapter in `lora_model_dir` or else `output_dir`, the
    /// result in `output_dir/merged`, as `axolotl merge-lora` does.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["base", "adapter"])]
    pub config: Option<PathBuf>,
    /// The base model: a directory with model.safetensors or shards + index.
    #[arg(long, value_name = "DIR", required_unless_present = "config")]
    pub base: Option<PathBuf>,
    /// The adapter directory: adapter_config.json + adapter_model.safetensors.
    #[arg(long, value_name = "DIR", required_unless_present = "config")]
    pub adapter: Option<PathBuf>,
    /// Directory to write the merged model into (default with --config: output_dir/merged).
    #[arg(long, value_name = "DIR", required_unless_present = "config")]
    pub output: Option<PathBuf>,
    /// Largest output file before the model is split into shards plus an index (default 5GB).
    #[arg(long, value_name = "SIZE", default_value = "5GB")]
    pub max_shard_size: String,
    /// Memory the row blocks and copy buffers may use.
    #[arg(long, value_name = "SIZE", default_value = "256MiB")]
    pub memory_budget: String,
    /// Replace a model already in the output directory.
    #[arg(long)]
    pub force: bool,
    /// Threads (default: the number of CPUs, at most 8).
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// With several ranks: seconds a rank may go unheard before the others give up.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub timeout: u64,
    /// With several ranks: seconds to wait for every rank to join at the start.
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub rendezvous_timeout: u64,
    /// Print a JSON summary on stdout when done.
    #[arg(long)]
    pub json: bool,
}

/// `axsave gpu-bench` (hidden).
#[derive(Args, Debug)]
pub struct GpuBenchArgs {
    /// Bytes per measurement.
    #[arg(long, value_name = "SIZE", default_value = "2GiB")]
    pub bytes: String,
    /// The GPU to measure (default 0).
    #[arg(long, value_name = "N")]
    pub device: Option<usize>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Options of a save.
#[derive(Args, Debug, Clone)]
pub struct SaveArgs {
    /// What to save, where and how: the flags an Axolotl config's settings give way to.
    #[command(flatten)]
    pub flags: Flags,

    /// Seconds to wait for every rank to join at the start.
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub rendezvous_timeout: u64,

    /// Worker threads for the copy (default: the number of CPUs, at most 8).
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,

    /// No progress display; only warnings and errors.
    #[arg(long, short)]
    pub quiet: bool,

    /// Print a JSON summary on stdout when done (files with sizes and SHA-256, tensors, dtypes,
    /// seconds, bytes that crossed the network, transport, world size, launcher).
    #[arg(long)]
    pub json: bool,
}

/// `axsave inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The checkpoint directory (or safetensors file / index).
    #[arg(value_name = "DIR")]
    pub source: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `axsave verify`.
#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The checkpoint the output was made from.
    #[arg(long, value_name = "DIR")]
    pub source: PathBuf,
    /// The directory holding the saved model.
    #[arg(long, value_name = "DIR")]
    pub output: PathBuf,
    /// Memory the comparison buffers may use.
    #[arg(long, value_name = "SIZE", default_value = "256MiB")]
    pub memory_budget: String,
}
