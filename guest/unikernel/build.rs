//! Link the guest as a freestanding static executable loaded at 2 MiB.
//! Applies to the binary only, so `cargo test`/`clippy` on the workspace work.

fn main() {
    for arg in ["-nostartfiles", "-nostdlib", "-static", "-no-pie", "-Wl,--image-base=0x200000", "-Wl,--build-id=none"]
    {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
