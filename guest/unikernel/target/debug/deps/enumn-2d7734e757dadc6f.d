/work/main/guest/unikernel/target/debug/deps/enumn-2d7734e757dadc6f.d: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/enumn-0.1.14/src/lib.rs

/work/main/guest/unikernel/target/debug/deps/libenumn-2d7734e757dadc6f.so: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/enumn-0.1.14/src/lib.rs

/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/enumn-0.1.14/src/lib.rs:
