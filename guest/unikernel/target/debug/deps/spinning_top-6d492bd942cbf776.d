/work/main/guest/unikernel/target/debug/deps/spinning_top-6d492bd942cbf776.d: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/spinning_top-0.2.5/src/lib.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/spinning_top-0.2.5/src/spinlock.rs

/work/main/guest/unikernel/target/debug/deps/libspinning_top-6d492bd942cbf776.rmeta: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/spinning_top-0.2.5/src/lib.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/spinning_top-0.2.5/src/spinlock.rs

/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/spinning_top-0.2.5/src/lib.rs:
/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/spinning_top-0.2.5/src/spinlock.rs:
