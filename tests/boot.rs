//! End-to-end tests of `mqvisor run`: real VMs on /dev/kvm booting the
//! built-in guest image, and every refusal of bad input.

mod common;

use std::io::Write;

use common::{assert_fails_with, kvm_available, mqvisor, run_vm, stderr, stdout};

#[test]
fn default_image_prints_banner_sleeps_and_exits_zero() {
    if !kvm_available("default_image_prints_banner_sleeps_and_exits_zero") {
        return;
    }
    let out = run_vm(&["--timeout", "30"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let banner = text.lines().next().expect("a banner line");
    assert!(banner.starts_with("mqvisor-guest "), "{banner}");
    assert!(banner.contains("boot-to-start ") && banner.contains("start-to-ready "), "{banner}");
    assert!(banner.contains("ram 64 MiB"), "{banner}");
    // Three 10 ms sleeps, each measured by the guest's TSC clock: WAIT parked
    // the vCPU at least as long as asked (never shorter).
    let timer = text.lines().find(|l| l.starts_with("timer: ")).expect("a timer line");
    assert!(timer.starts_with("timer: 3 sleeps of 10 ms took ["), "{timer}");
    let list = timer.split('[').nth(1).and_then(|r| r.split(']').next()).unwrap();
    let slept: Vec<u64> = list.split(", ").map(|n| n.parse().unwrap()).collect();
    assert_eq!(slept.len(), 3, "{timer}");
    assert!(slept.iter().all(|&us| us >= 10_000), "a sleep ended early: {timer}");
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
}

#[test]
fn memory_size_reaches_the_guest() {
    if !kvm_available("memory_size_reaches_the_guest") {
        return;
    }
    let out = run_vm(&["--memory", "64", "--cmdline", "sleeps=0", "--timeout", "30"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert!(stdout(&out).contains("ram 64 MiB"), "{}", stdout(&out));
}

#[test]
fn guest_exit_code_is_the_exit_status() {
    if !kvm_available("guest_exit_code_is_the_exit_status") {
        return;
    }
    for (code, expected) in [("0", 0), ("7", 7), ("255", 255), ("300", 255)] {
        let cmdline = format!("sleeps=0 exit={code}");
        let out = run_vm(&["--cmdline", &cmdline, "--timeout", "30"]);
        assert_eq!(out.status.code(), Some(expected), "exit={code}: {}", stderr(&out));
    }
}

#[test]
fn guest_panic_shows_its_message() {
    if !kvm_available("guest_panic_shows_its_message") {
        return;
    }
    let out = run_vm(&["--cmdline", "selftest=panic", "--timeout", "30"]);
    assert_fails_with(&out, 101, "guest exited with code 101: panicked at ");
    assert!(stderr(&out).contains("selftest panic requested"), "{}", stderr(&out));
}

#[test]
fn guest_fault_is_reported_with_rip() {
    if !kvm_available("guest_fault_is_reported_with_rip") {
        return;
    }
    let out = run_vm(&["--cmdline", "selftest=fault", "--timeout", "30"]);
    assert_fails_with(&out, 126, "guest crashed: guest triple-faulted (KVM_EXIT_SHUTDOWN)");
    // The faulting instruction is in the image, which loads at 2 MiB.
    let err = stderr(&out);
    let rip = err.split("RIP 0x").nth(1).expect("a RIP");
    let rip = u64::from_str_radix(rip.trim(), 16).expect("hex RIP");
    assert!((0x20_0000..0x40_0000).contains(&rip), "RIP {rip:#x} outside the image");
}

#[test]
fn a_guest_that_never_exits_is_stopped_by_timeout() {
    if !kvm_available("a_guest_that_never_exits_is_stopped_by_timeout") {
        return;
    }
    let out = run_vm(&["--cmdline", "selftest=hang", "--timeout", "0.5"]);
    assert_fails_with(&out, 124, "guest did not exit within --timeout");
    assert!(stderr(&out).contains("RIP 0x"), "{}", stderr(&out));
}

#[test]
fn a_guest_that_sleeps_forever_is_stopped_by_timeout() {
    if !kvm_available("a_guest_that_sleeps_forever_is_stopped_by_timeout") {
        return;
    }
    // Parked in WAIT rather than spinning: the watchdog must wake it too.
    let out = run_vm(&["--cmdline", "sleeps=1 sleep_ms=600000", "--timeout", "0.5"]);
    assert_fails_with(&out, 124, "guest did not exit within --timeout");
}

#[test]
fn bad_guest_command_line_is_refused_by_the_guest() {
    if !kvm_available("bad_guest_command_line_is_refused_by_the_guest") {
        return;
    }
    let out = run_vm(&["--cmdline", "sleeps=lots", "--timeout", "30"]);
    assert_fails_with(&out, 2, "unknown or malformed command-line word \"sleeps=lots\"");
}

#[test]
fn missing_kvm_device_is_a_clear_error() {
    let out = run_vm(&["--kvm-device", "/nonexistent/kvm"]);
    assert_fails_with(&out, 125, "/nonexistent/kvm does not exist: this machine does not expose KVM");
}

#[test]
fn kvm_device_without_permission_is_a_clear_error() {
    let dir = tempdir();
    let device = dir.join("kvm");
    std::fs::write(&device, b"").unwrap();
    set_mode(&device, 0o000);
    // Root ignores file modes, so the attempt is made as an ordinary user,
    // who must be able to reach the device's directory.
    set_mode(&dir, 0o755);
    let out = common::mqvisor_unprivileged(&["run".as_ref(), "--kvm-device".as_ref(), device.as_os_str()]);
    assert_fails_with(&out, 125, "permission denied opening");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_image_is_a_clear_error() {
    let out = run_vm(&["--image", "/nonexistent/image.elf"]);
    assert_fails_with(&out, 125, "cannot read image /nonexistent/image.elf");
}

#[test]
fn non_elf_image_is_refused() {
    let dir = tempdir();
    let path = dir.join("script.sh");
    std::fs::write(&path, b"#!/bin/sh\necho not an image\n").unwrap();
    let out = run_vm(&["--image", path.to_str().unwrap()]);
    assert_fails_with(&out, 125, "bad image: not an ELF file");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn non_x86_64_image_is_refused() {
    let mut image = mqvisor::DEFAULT_IMAGE.to_vec();
    image[18..20].copy_from_slice(&183u16.to_le_bytes()); // e_machine = EM_AARCH64
    let out = run_image(&image, &[]);
    assert_fails_with(&out, 125, "not an x86-64 little-endian 64-bit ELF");
}

#[test]
fn image_with_a_segment_outside_guest_ram_is_refused() {
    let mut image = mqvisor::DEFAULT_IMAGE.to_vec();
    // Move the first program header's physical address into the device hole.
    let phoff = usize::try_from(u64::from_le_bytes(image[32..40].try_into().unwrap())).unwrap();
    let phentsize = u16::from_le_bytes(image[54..56].try_into().unwrap()) as usize;
    let phnum = u16::from_le_bytes(image[56..58].try_into().unwrap()) as usize;
    let load = (0..phnum)
        .map(|i| phoff + i * phentsize)
        .find(|&ph| u32::from_le_bytes(image[ph..ph + 4].try_into().unwrap()) == 1)
        .expect("a PT_LOAD segment");
    image[load + 24..load + 32].copy_from_slice(&0xd000_0000u64.to_le_bytes()); // p_paddr
    let out = run_image(&image, &[]);
    assert_fails_with(&out, 125, "outside guest RAM available to images");
}

#[test]
fn memory_too_small_for_the_image_is_refused() {
    let out = run_vm(&["--memory", "2"]);
    assert_fails_with(&out, 125, "--memory 2 MiB is too small for this image: it needs at least");
}

#[test]
fn out_of_range_arguments_are_refused_by_the_parser() {
    for args in [&["--memory", "0"][..], &["--memory", "999999"], &["--timeout", "0"], &["--timeout", "soon"]] {
        let out = run_vm(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("invalid value"), "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn help_explains_the_commands_and_exit_codes() {
    let out = mqvisor().args(["run", "--help"]).output().unwrap();
    let help = stdout(&out);
    for needle in ["--image", "--memory", "--timeout", "--cmdline", "--kvm-device", "124", "125", "126"] {
        assert!(help.contains(needle), "{needle} missing from help:\n{help}");
    }
}

fn run_image(image: &[u8], args: &[&str]) -> std::process::Output {
    let dir = tempdir();
    let path = dir.join("image.elf");
    std::fs::File::create(&path).unwrap().write_all(image).unwrap();
    let out = mqvisor().args(["run", "--image"]).arg(&path).args(args).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    out
}

fn tempdir() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir =
        std::env::temp_dir().join(format!("mqvisor-test-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn set_mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn a_handoff_descriptor_that_is_no_datagram_socket_is_refused() {
    // Not open, and a standard stream.
    let out = common::run_vm(&["--service", "mqtt", "--handoff-fd", "97"]);
    common::assert_fails_with(&out, 125, "descriptor 97 is not open");
    let out = common::run_vm(&["--service", "mqtt", "--handoff-fd", "1"]);
    common::assert_fails_with(&out, 125, "1 is a standard stream");
}
