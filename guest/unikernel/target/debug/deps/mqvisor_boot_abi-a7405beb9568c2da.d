/work/main/guest/unikernel/target/debug/deps/mqvisor_boot_abi-a7405beb9568c2da.d: /work/main/guest/boot-abi/src/lib.rs

/work/main/guest/unikernel/target/debug/deps/libmqvisor_boot_abi-a7405beb9568c2da.rmeta: /work/main/guest/boot-abi/src/lib.rs

/work/main/guest/boot-abi/src/lib.rs:
