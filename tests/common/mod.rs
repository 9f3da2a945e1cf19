//! Shared helpers for the end-to-end tests: running the real `mqvisor` binary
//! and deciding what to do when this machine has no KVM.
#![allow(dead_code)] // each test file uses its own subset

use std::path::Path;
use std::process::{Command, Output};

/// The `mqvisor` binary cargo built for these tests.
pub fn mqvisor() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mqvisor"))
}

/// True when VM tests can run. Without `/dev/kvm` they cannot: that is said
/// loudly, and under `CI=true` it is a failure, never a silent pass.
pub fn kvm_available(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(!ci, "{test}: /dev/kvm is missing and CI=true: VM tests cannot run on this machine");
    eprintln!("\n*** {test}: SKIPPED: /dev/kvm is missing, this VM test did not run ***\n");
    false
}

/// Runs `mqvisor run` with `args` and returns its output.
pub fn run_vm(args: &[&str]) -> Output {
    mqvisor().arg("run").args(args).output().expect("spawning mqvisor")
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts the exit code and that stderr is exactly one line containing `needle`.
pub fn assert_fails_with(out: &Output, code: i32, needle: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert!(err.contains(needle), "expected {needle:?} in stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "error should be one line: {err}");
}
