//! Builds the default guest image and hands its path to the `mqvisor` crate,
//! which embeds it: a fresh clone needs one command to run a tenant VM.
//!
//! The recipe is `images/default.md`: the `guest/unikernel` workspace, release
//! profile, host target. The guest is built by a nested `cargo` into its own
//! target directory so that it never shares flags or a lock with this build.

// A build script reports failure by panicking: cargo shows the message.
#![allow(clippy::expect_used)]

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const GUEST_PACKAGE: &str = "mqvisor-guest";
/// The crates the image is built from (the unikernel and its path dependencies).
const GUEST_CRATES: [&str; 3] = ["guest/unikernel", "guest/boot-abi", "guest/broker"];

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let workspace = manifest_dir.parent().expect("vmm/ lives in the workspace root");
    let target_root = env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace.join("target"), PathBuf::from);
    let guest_target = target_root.join("guest-image");

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .current_dir(workspace)
        .args(["build", "--release", "--manifest-path"])
        .arg(workspace.join("guest/unikernel/Cargo.toml"))
        .arg("--target-dir")
        .arg(&guest_target);
    // The guest is freestanding: flags meant for the host build (sanitizers,
    // coverage, clippy as the compiler) must not leak into it.
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
    ] {
        build.env_remove(var);
    }
    let status = build.status().expect("running cargo to build the guest image");
    assert!(status.success(), "building the default guest image ({GUEST_PACKAGE}) failed");

    let image = guest_target.join("release").join(GUEST_PACKAGE);
    assert!(image.is_file(), "guest image missing at {}", image.display());
    println!("cargo:rustc-env=MQVISOR_DEFAULT_IMAGE={}", image.display());
    // The same build makes the tests' hostile guest (never embedded).
    let hostile = guest_target.join("release").join("mqvisor-hostile");
    assert!(hostile.is_file(), "hostile test image missing at {}", hostile.display());
    println!("cargo:rustc-env=MQVISOR_HOSTILE_IMAGE={}", hostile.display());
    // Only the guest's sources, manifests and lock files: a folder would be
    // scanned whole, build output and fuzz corpora included.
    for crate_dir in GUEST_CRATES {
        let dir = workspace.join(crate_dir);
        for file in ["Cargo.toml", "Cargo.lock", "build.rs", "src"] {
            let path = dir.join(file);
            if path.exists() {
                rerun_if_changed(&path);
            }
        }
    }
}

fn rerun_if_changed(path: &Path) {
    println!("cargo:rerun-if-changed={}", path.display());
}
