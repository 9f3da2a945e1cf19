/work/main/guest/unikernel/target/debug/deps/safe_mmio-5d0e985b90c90a69.d: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/safe-mmio-0.3.2/src/lib.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/safe-mmio-0.3.2/src/backend.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/safe-mmio-0.3.2/src/backend/mmio_ops.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/safe-mmio-0.3.2/src/backend/volatile.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/safe-mmio-0.3.2/src/fields.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/safe-mmio-0.3.2/src/physical.rs

/work/main/guest/unikernel/target/debug/deps/libsafe_mmio-5d0e985b90c90a69.rmeta: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/safe-mmio-0.3.2/src/lib.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/safe-mmio-0.3.2/src/backend.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/safe-mmio-0.3.2/src/backend/mmio_ops.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/safe-mmio-0.3.2/src/backend/volatile.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/safe-mmio-0.3.2/src/fields.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/safe-mmio-0.3.2/src/physical.rs

/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/safe-mmio-0.3.2/src/lib.rs:
/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/safe-mmio-0.3.2/src/backend.rs:
/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/safe-mmio-0.3.2/src/backend/mmio_ops.rs:
/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/safe-mmio-0.3.2/src/backend/volatile.rs:
/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/safe-mmio-0.3.2/src/fields.rs:
/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/safe-mmio-0.3.2/src/physical.rs:
