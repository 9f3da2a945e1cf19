//! `mqvisor state-check PATH`: what a VM would recover from a state file,
//! or where it is damaged, read on the host without booting (the reading
//! itself is the library's, `mqvisor::state`).

use std::process::ExitCode;

/// `mqvisor state-check PATH`: the host's reading of a state file.
pub fn state_check(path: &std::path::Path) -> ExitCode {
    let file = match mqvisor::state::open(path, mqvisor::state::Access::Read) {
        Ok(file) => file,
        Err(e) => {
            eprintln!("mqvisor: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The same rule as `run`: an empty file is laid out, a small one refused.
    let len = file.metadata().map_or(0, |m| m.len());
    if let Err(e) = mqvisor::state::refuse_size(path, len) {
        eprintln!("mqvisor: {e}");
        return ExitCode::FAILURE;
    }
    // No lock is taken (a VM starting meanwhile must not find the file in
    // use): a file a running VM holds is read as it is at this moment.
    if mqvisor::state::in_use(&file) {
        println!(
            "{}: in use by a running mqvisor; read as it is now, while the VM writes it (a last batch being \
             written reads as torn)",
            path.display()
        );
    }
    match mqvisor::state::check(&file) {
        Ok(found) if found.fresh && len == 0 => {
            println!("{}: no state yet (an empty file: mqvisor run lays it out at --state-size)", path.display());
            ExitCode::SUCCESS
        }
        Ok(found) if found.fresh => {
            println!("{}: no state yet (a new state file)", path.display());
            ExitCode::SUCCESS
        }
        Ok(found) => {
            println!(
                "{}: {} records in {} KiB recover cleanly{}",
                path.display(),
                found.records,
                found.bytes >> 10,
                if found.torn_tail { "; a torn last batch (never acknowledged) would be dropped" } else { "" }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mqvisor: {}: {e}", path.display());
            ExitCode::FAILURE
        }
    }
}
