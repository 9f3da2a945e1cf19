//! The `mqvisor` command: parses arguments ([`cli`]) and hands each
//! command to the module that runs it: `run` ([`run`]), `broker`
//! ([`broker_runner`]), `serve` and its `tenant` client ([`serve`]),
//! `state-check` ([`state_check`]) and `bench` ([`bench`]). Each maps its
//! result to a one-line message and an exit code. No VM logic lives here.

// Non-test code never unwraps, expects or panics: every failure is a value
// the caller reports (tests may: see clippy.toml).
#![warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::ExitCode;

mod bench;
mod broker_runner;
mod cli;
mod edge;
mod fd_limit;
mod procfs;
mod quotas;
mod run;
mod serve;
mod settings;
mod state_check;

use clap::Parser;
use cli::{Cli, Commands};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Commands::Run(args) => run::run(*args),
        Commands::Tenant(args) => {
            die_on_closed_stdout();
            serve::client::tenant_command(args)
        }
        Commands::Node(args) => {
            die_on_closed_stdout();
            serve::client::node_command(args)
        }
        Commands::StateCheck { path } => {
            die_on_closed_stdout();
            state_check::state_check(&path)
        }
        Commands::Serve(args) => {
            tracing_subscriber::fmt().with_writer(std::io::stderr).with_target(false).init();
            let exe = match std::env::current_exe() {
                Ok(exe) => exe,
                Err(e) => {
                    eprintln!("mqvisor: cannot find the mqvisor executable: {e}");
                    return ExitCode::from(run::EXIT_SETUP_FAILED);
                }
            };
            match serve::serve(&args.config, &exe) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("mqvisor: serve: {e}");
                    ExitCode::from(run::EXIT_SETUP_FAILED)
                }
            }
        }
        Commands::Broker(args) => {
            let settings = match args.broker.resolve() {
                Ok(settings) => settings,
                Err(e) => {
                    eprintln!("mqvisor: {e}");
                    return ExitCode::from(run::EXIT_SETUP_FAILED);
                }
            };
            fd_limit::raise_for(settings.config.max_connections);
            match broker_runner::run(args.listen, settings.config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("mqvisor: broker on {}: {e}", args.listen);
                    ExitCode::from(run::EXIT_SETUP_FAILED)
                }
            }
        }
        Commands::Bench(command) => bench::run(command),
    }
}

/// For commands that only print: a reader that stops early (`| head`)
/// ends the process quietly, as it ends `ls`, instead of a panic on the
/// broken pipe (Rust ignores SIGPIPE, so `println!` would fail). Never for
/// `run` or `serve`, whose sockets must see EPIPE as an error.
fn die_on_closed_stdout() {
    // SAFETY: signal(2) with a valid signal and the default disposition,
    // before any other thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}
