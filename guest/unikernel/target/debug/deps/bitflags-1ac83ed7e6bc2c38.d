/work/main/guest/unikernel/target/debug/deps/bitflags-1ac83ed7e6bc2c38.d: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/bitflags-1.3.2/src/lib.rs

/work/main/guest/unikernel/target/debug/deps/libbitflags-1ac83ed7e6bc2c38.rmeta: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/bitflags-1.3.2/src/lib.rs

/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/bitflags-1.3.2/src/lib.rs:
