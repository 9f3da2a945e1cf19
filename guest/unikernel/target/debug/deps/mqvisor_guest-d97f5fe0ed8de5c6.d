/work/main/guest/unikernel/target/debug/deps/mqvisor_guest-d97f5fe0ed8de5c6.d: src/main.rs src/clock.rs src/console.rs src/heap.rs src/mem.rs src/net/mod.rs src/net/device.rs src/net/hal.rs src/paravirt.rs Cargo.toml

/work/main/guest/unikernel/target/debug/deps/libmqvisor_guest-d97f5fe0ed8de5c6.rmeta: src/main.rs src/clock.rs src/console.rs src/heap.rs src/mem.rs src/net/mod.rs src/net/device.rs src/net/hal.rs src/paravirt.rs Cargo.toml

src/main.rs:
src/clock.rs:
src/console.rs:
src/heap.rs:
src/mem.rs:
src/net/mod.rs:
src/net/device.rs:
src/net/hal.rs:
src/paravirt.rs:
Cargo.toml:

# env-dep:CARGO_PKG_VERSION=0.1.0
# env-dep:CLIPPY_ARGS=
# env-dep:CLIPPY_CONF_DIR
