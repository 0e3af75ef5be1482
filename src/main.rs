//! The `axsave` binary: command line, logging, progress display and exit codes over the
//! library crates.

mod cli;
mod commands;
mod progress;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let quiet = cli.command.is_none() && cli.save.quiet;
    init_logging(quiet);
    // Started by a parent that asked (the Python API): stop, cleanly, when it dies.
    if let Err(e) = axsave_core::parent::follow_parent() {
        tracing::error!("{e}");
        return ExitCode::from(1);
    }
    let result = match cli.command {
        Some(cli::Command::Inspect(a)) => commands::inspect(&a),
        Some(cli::Command::Verify(a)) => commands::verify(&a),
        Some(cli::Command::GpuBench(a)) => commands::gpu_bench(&a),
        Some(cli::Command::MergeLora(a)) => commands::merge_lora(&a),
        // The launcher's exit code is its ranks' (or 128 + a signal), not just 0 or 1.
        Some(cli::Command::Launch(a)) => match axsave_launch::run(&a) {
            Ok(code) => return code,
            Err(e) => Err(e.into()),
        },
        None => commands::save(&cli.save),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let usage = e.downcast_ref::<commands::UsageError>().is_some()
                || matches!(
                    e.downcast_ref::<axsave_core::axolotl::resolve::ResolveError>(),
                    Some(axsave_core::axolotl::resolve::ResolveError::Usage(_))
                )
                || matches!(
                    e.downcast_ref::<axsave_core::bootstrap::BootstrapError>(),
                    Some(axsave_core::bootstrap::BootstrapError::BadJobToken)
                );
            tracing::error!("{}", error_text(&e));
            // A save cancelled by SIGTERM/SIGINT/SIGHUP (its temporaries removed): 128 + N, as
            // a shell reports a command the signal stopped.
            if let Some(sig) = axsave_core::interrupt::received() {
                return ExitCode::from(128u8.saturating_add(u8::try_from(sig).unwrap_or(0)));
            }
            if usage {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

/// The error and its causes, each cause shown only when the message does not already say it
/// (library errors often include their source in their own message).
fn error_text(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
    }
    text
}

/// Logs go to stderr; `RUST_LOG` overrides the default level (info, or warn with --quiet).
fn init_logging(quiet: bool) {
    let default = if quiet { "warn" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
}
