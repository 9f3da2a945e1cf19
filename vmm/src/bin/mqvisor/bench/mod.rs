//! `mqvisor bench ...`: measurements of mqvisor itself, each printed beside
//! its anchor from the same run. Benchmarks print figures; they never judge.

pub mod boot;
pub mod conns;
pub mod echo;
pub mod edge;
pub mod fleet;
pub mod hostile;
pub mod mosquitto_clients;
pub mod mqtt;
pub mod serve;
pub mod state;

use std::path::PathBuf;
use std::process::ExitCode;

pub use crate::fd_limit::raise as raise_fd_limit;

use crate::cli::BenchCommand;

/// `mqvisor bench ...`: runs one benchmark; a failure is one line and exit
/// status 1.
pub fn run(bench: BenchCommand) -> ExitCode {
    let result =
        std::env::current_exe().map_err(|e| format!("cannot find the mqvisor executable: {e}")).and_then(|exe| {
            match bench {
                BenchCommand::Boot { runs, memory } => boot::boot(&exe, runs as usize, memory),
                BenchCommand::Echo { connections, seconds, memory } => {
                    echo::echo(&exe, connections as usize, seconds, memory)
                }
                BenchCommand::Mqtt { scale, no_vm, memory, clients, shapes } => {
                    if !(scale > 0.0 && scale <= 100.0) {
                        return Err("--scale must be in (0, 100]".to_string());
                    }
                    let options = mqtt::Options { scale, include_vm: !no_vm, memory_mib: memory, clients, shapes };
                    mqtt::mqtt(&exe, &options)
                }
                BenchCommand::Hostile { image, rounds, samples } => {
                    let image = image.unwrap_or_else(|| PathBuf::from(env!("MQVISOR_HOSTILE_IMAGE")));
                    hostile::hostile(&exe, &image, rounds as usize, samples as usize)
                }
                BenchCommand::Fleet { tenants, messages, samples, kills } => {
                    let options = fleet::Options {
                        tenants: tenants as usize,
                        messages: messages as usize,
                        samples: samples as usize,
                        kills: kills as usize,
                    };
                    fleet::fleet(&exe, &options)
                }
                BenchCommand::Serve { tenants, messages } => serve::serve(&exe, tenants as usize, messages as usize),
                BenchCommand::State { scale, retained, memory } => {
                    if !(scale > 0.0 && scale <= 100.0) {
                        return Err("--scale must be in (0, 100]".to_string());
                    }
                    state::state(&exe, scale, retained as usize, memory)
                }
                BenchCommand::Edge { scale, idle, handshakers, seconds, rsa, memory } => {
                    if !(scale > 0.0 && scale <= 100.0) {
                        return Err("--scale must be in (0, 100]".to_string());
                    }
                    let options = edge::Options {
                        scale,
                        idle: idle as usize,
                        handshakers: handshakers as usize,
                        seconds,
                        rsa,
                        memory_mib: memory,
                    };
                    edge::edge(&exe, &options)
                }
                BenchCommand::Conns { idle, churn, large_mib, no_vm } => {
                    conns::conns(&exe, idle as usize, churn as usize, large_mib as usize, !no_vm)
                }
            }
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mqvisor: bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The value at `fraction` (0..=1) of sorted `values`, nearest rank.
pub fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // A float-to-int `as` saturates; the clamp below bounds the rank.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let rank = (fraction * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 10.0);
        assert_eq!(percentile(&v, 0.9), 18.0);
        assert_eq!(percentile(&v, 1.0), 20.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
