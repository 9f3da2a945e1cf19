//! What `--state PATH`, `mqvisor state-check PATH` and
//! `--discard-corrupt-state` accept as a state file: the regular file at
//! PATH itself, empty or a state file. A symbolic link is not followed (a
//! dangling one would have root make a 1 GiB file at its target), a FIFO,
//! device or directory is refused at once (a FIFO blocked before), and a
//! file whose superblocks are zero but which holds data elsewhere (an ISO
//! image) is not taken for new state and written over. Each is one line and
//! leaves the file as it was. A discarded state file is kept as
//! PATH.corrupt, then PATH.corrupt.1, ..., never over an earlier one, and
//! only a damaged log is discarded. One VM at a time holds a state file
//! (its lock); a new file is laid out whole or not at all (a file-size
//! limit, a full file system), mode 0600, at a size whose regions hold
//! the largest packet; state-check and run agree on empty and small files.

mod common;

use std::ffi::OsStr;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::wire::{self, read_packet, try_read_packet};
use common::{RunningVm, kvm_available};

fn dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mqvisor-state-files-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `mqvisor ARGS` and gives it `within` to end: one still running
/// then (blocked) is killed, and the test fails.
fn mqvisor_within(args: &[&OsStr], within: Duration) -> Output {
    let child = common::mqvisor().args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let (done, ended) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    match ended.recv_timeout(within) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            // SAFETY: kill(2) on our own child with a valid signal.
            unsafe { libc::kill(libc::pid_t::try_from(pid).unwrap(), libc::SIGKILL) };
            panic!("mqvisor {args:?} was still running after {within:?}: it blocked");
        }
    }
}

/// `mqvisor state-check PATH`.
fn state_check(path: &Path) -> Output {
    mqvisor_within(&[OsStr::new("state-check"), path.as_os_str()], Duration::from_secs(20))
}

/// `mqvisor run --state PATH` (a broker, stopped after 10 s should it boot).
fn run(path: &Path, discard: bool) -> Output {
    let mut args = ["run", "--listen", "127.0.0.1:0", "--timeout", "10", "--state"].map(OsStr::new).to_vec();
    args.push(path.as_os_str());
    if discard {
        args.push(OsStr::new("--discard-corrupt-state"));
    }
    mqvisor_within(&args, Duration::from_secs(30))
}

/// Every way of opening `path` refuses it with one line holding `needle`:
/// state-check with 1 (its "not a state file or unreadable"), run with
/// 125, with and without --discard-corrupt-state.
fn refused_everywhere(path: &Path, needle: &str) {
    common::assert_fails_with(&state_check(path), 1, needle);
    common::assert_fails_with(&run(path, false), 125, needle);
    common::assert_fails_with(&run(path, true), 125, needle);
}

/// Names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn a_symbolic_link_as_the_state_path_is_refused_and_nothing_is_made_at_its_target() {
    let dir = dir("symlink");
    // Dangling: root would make a 1 GiB file wherever it points.
    let target = dir.join("elsewhere.state");
    let link = dir.join("tenant.state");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    refused_everywhere(&link, "is a symbolic link, which is not followed");
    assert!(!target.exists(), "a file was made at the link's target");
    // Pointing at a regular file: refused all the same, the file untouched.
    std::fs::write(&target, vec![0u8; 4 << 20]).unwrap();
    refused_everywhere(&link, "is a symbolic link");
    assert_eq!(std::fs::read(&target).unwrap(), vec![0u8; 4 << 20]);
    assert_eq!(names(&dir), ["elsewhere.state", "tenant.state"], "nothing moved aside or made");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_fifo_a_device_or_a_directory_as_the_state_file_is_refused_at_once() {
    let dir = dir("special");
    let fifo = dir.join("tenant.state");
    let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    // state-check and --discard-corrupt-state blocked in open(2) before.
    refused_everywhere(&fifo, "is a FIFO, not a regular file");
    refused_everywhere(Path::new("/dev/null"), "is a character device, not a regular file");
    refused_everywhere(&dir, "is a directory, not a regular file");
    assert_eq!(names(&dir), ["tenant.state"], "nothing moved aside or made");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_file_with_empty_superblocks_but_data_elsewhere_is_not_taken_for_new_state() {
    let dir = dir("foreign");
    // An ISO 9660 image: its first 32 KiB (the system area) are zero.
    let iso = dir.join("image.iso");
    let mut bytes = vec![0u8; 4 << 20];
    for (i, b) in bytes.iter_mut().enumerate().skip(32 << 10) {
        *b = u8::try_from(i % 251).unwrap() | 1;
    }
    std::fs::write(&iso, &bytes).unwrap();
    refused_everywhere(&iso, "is not a state file: its first KiB (the superblocks) is zero but byte 32768 is not");
    assert_eq!(std::fs::read(&iso).unwrap(), bytes, "the image is not touched");

    // A sparse 1 GiB file with one byte at its very end: found past the holes, fast.
    let sparse = dir.join("sparse.state");
    let file = std::fs::File::create(&sparse).unwrap();
    file.set_len(1 << 30).unwrap();
    file.write_all_at(&[7], (1 << 30) - 1).unwrap();
    drop(file);
    let started = Instant::now();
    common::assert_fails_with(&state_check(&sparse), 1, &format!("byte {} is not", (1u64 << 30) - 1));
    assert!(started.elapsed() < Duration::from_secs(5), "the holes were read: {:?}", started.elapsed());
    common::assert_fails_with(&run(&sparse, false), 125, "is not a state file");
    common::assert_fails_with(&run(&sparse, true), 125, "is not a state file");
    let mut last = [0u8];
    std::fs::File::open(&sparse).unwrap().read_exact_at(&mut last, (1 << 30) - 1).unwrap();
    assert_eq!(last, [7]);
    assert_eq!(std::fs::File::open(&sparse).unwrap().metadata().unwrap().len(), 1 << 30);

    // A sparse file of zeros only is a new state file, as before.
    let fresh = dir.join("fresh.state");
    std::fs::File::create(&fresh).unwrap().set_len(1 << 30).unwrap();
    let out = state_check(&fresh);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert!(common::stdout(&out).contains("no state yet"), "{}", common::stdout(&out));
    assert_eq!(names(&dir), ["fresh.state", "image.iso", "sparse.state"], "nothing moved aside or made");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `mqvisor run --timeout 1 ARGS`: started, it ends with 124 after a second.
fn run_briefly(args: &[&OsStr]) -> Output {
    let mut all = ["run", "--listen", "127.0.0.1:0", "--timeout", "1"].map(OsStr::new).to_vec();
    all.extend_from_slice(args);
    mqvisor_within(&all, Duration::from_secs(30))
}

/// Publishes retained QoS 1 messages `r/0`, `r/1`, ... (3.1.1), each
/// waiting for its PUBACK: one log batch each.
fn publish_retained(addr: SocketAddr, count: usize) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&wire::connect_as(4, "writer", true, None, None)).unwrap();
    assert_eq!(read_packet(&mut s).0, 0x20, "CONNACK");
    for i in 0..count {
        let id = u16::try_from(i + 1).unwrap();
        s.write_all(&wire::publish(&format!("r/{i}"), b"kept", 1, id, true)).unwrap();
        assert_eq!(read_packet(&mut s).0, 0x40, "PUBACK");
    }
}

/// Topics of the retained messages on `r/#` a fresh subscriber gets.
fn retained(addr: SocketAddr) -> Vec<String> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&wire::connect_as(4, "reader", true, None, None)).unwrap();
    assert_eq!(read_packet(&mut s).0, 0x20, "CONNACK");
    s.write_all(&wire::subscribe("r/#", 0, 1)).unwrap();
    assert_eq!(read_packet(&mut s).0, 0x90, "SUBACK");
    s.set_read_timeout(Some(Duration::from_millis(700))).unwrap();
    let mut topics = Vec::new();
    while let Ok((_, body)) = try_read_packet(&mut s) {
        let len = usize::from(u16::from_be_bytes([body[0], body[1]]));
        topics.push(String::from_utf8(body[2..2 + len].to_vec()).unwrap());
    }
    topics.sort();
    topics
}

/// Byte offsets of the first batches of region 0 (a log that never
/// compacted), read from their headers.
fn batch_offsets(state: &Path) -> Vec<u64> {
    use mqvisor_broker::store::log::{DATA_START, SECTOR};
    let file = std::fs::File::open(state).unwrap();
    let mut at = DATA_START;
    let mut offsets = Vec::new();
    let mut header = [0u8; 64];
    while file.read_exact_at(&mut header, at).is_ok() && header[..4] == 0x4d51_5642u32.to_le_bytes() {
        offsets.push(at);
        let len = u64::from(u32::from_le_bytes(header[32..36].try_into().unwrap()));
        at += (64 + len).next_multiple_of(SECTOR);
    }
    offsets
}

fn flip_byte(state: &Path, at: u64) {
    let file = std::fs::OpenOptions::new().read(true).write(true).open(state).unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at).unwrap();
    file.write_all_at(&[byte[0] ^ 0x5a], at).unwrap();
}

/// A state file of 64 MiB at `state` holding four retained messages,
/// damaged in its second batch (of four): a damaged log, which the start
/// refuses with exit 5 and --discard-corrupt-state moves aside.
fn damaged_state(state: &Path) {
    let vm = RunningVm::start(&["--state", state.to_str().unwrap(), "--state-size", "64"]);
    publish_retained(vm.addr, 4);
    vm.stop();
    let batches = batch_offsets(state);
    assert!(batches.len() >= 4, "one batch per acknowledged publish: {batches:?}");
    flip_byte(state, batches[1] + 40);
}

/// The mode bits of `path`.
fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn a_discarded_state_file_is_kept_as_path_corrupt_and_never_overwritten() {
    if !kvm_available("a_discarded_state_file_is_kept_as_path_corrupt_and_never_overwritten") {
        return;
    }
    let dir = dir("discard");
    let state = dir.join("tenant.state");
    damaged_state(&state);
    let damaged = std::fs::read(&state).unwrap();
    // The same damaged log, marked in the zero bytes after the superblocks:
    // each round's file has bytes of its own.
    let marked = |mark: u8| -> Vec<u8> {
        let mut bytes = damaged.clone();
        bytes[4096] = mark;
        bytes
    };
    for (round, aside) in
        ["tenant.state.corrupt", "tenant.state.corrupt.1", "tenant.state.corrupt.2"].iter().enumerate()
    {
        let mark = u8::try_from(round).unwrap() + 1;
        std::fs::write(&state, marked(mark)).unwrap();
        let vm = RunningVm::start(&["--state", state.to_str().unwrap(), "--discard-corrupt-state"]);
        assert!(retained(vm.addr).is_empty(), "started empty");
        vm.stop();
        assert_eq!(std::fs::read(dir.join(aside)).unwrap(), marked(mark), "{aside}");
        // The new file has the discarded one's size (64 MiB), not 1 GiB.
        assert_eq!(std::fs::metadata(&state).unwrap().len(), 64 << 20, "round {round}");
    }
    // Every discarded file is still there, each with its own bytes.
    assert_eq!(std::fs::read(dir.join("tenant.state.corrupt")).unwrap(), marked(1));
    assert_eq!(
        names(&dir),
        ["tenant.state", "tenant.state.corrupt", "tenant.state.corrupt.1", "tenant.state.corrupt.2"]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_discarded_state_file_is_replaced_by_one_of_its_own_size_unless_state_size_is_given() {
    if !kvm_available("a_discarded_state_file_is_replaced_by_one_of_its_own_size_unless_state_size_is_given") {
        return;
    }
    let dir = dir("discard-size");
    let state = dir.join("tenant.state");
    damaged_state(&state);
    let damaged = std::fs::read(&state).unwrap();
    let vm = RunningVm::start(&["--state", state.to_str().unwrap(), "--discard-corrupt-state"]);
    vm.stop();
    assert_eq!(std::fs::metadata(&state).unwrap().len(), 64 << 20, "the discarded file's size, not 1 GiB");
    assert_eq!(std::fs::metadata(&state).unwrap().permissions().mode() & 0o777, 0o600);
    // Told a size, the new file has it.
    std::fs::write(&state, &damaged).unwrap();
    let vm = RunningVm::start(&["--state", state.to_str().unwrap(), "--discard-corrupt-state", "--state-size", "32"]);
    vm.stop();
    assert_eq!(std::fs::metadata(&state).unwrap().len(), 32 << 20);
    assert_eq!(names(&dir), ["tenant.state", "tenant.state.corrupt", "tenant.state.corrupt.1"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn discard_corrupt_state_refuses_what_is_not_damage_as_a_start_without_it_does() {
    if !kvm_available("discard_corrupt_state_refuses_what_is_not_damage_as_a_start_without_it_does") {
        return;
    }
    let dir = dir("not-damage");
    // A resized state file: the error says how to restore it; moving it
    // aside would throw away state that is intact.
    let resized = dir.join("resized.state");
    let vm = RunningVm::start(&["--state", resized.to_str().unwrap(), "--state-size", "64"]);
    publish_retained(vm.addr, 2);
    vm.stop();
    std::fs::OpenOptions::new().write(true).open(&resized).unwrap().set_len(32 << 20).unwrap();
    let before = std::fs::read(&resized).unwrap();
    let restore = format!("truncate -s {}", 64 << 20);
    let without = run(&resized, false);
    assert_eq!(without.status.code(), Some(5), "{}", common::stderr(&without));
    common::assert_fails_with(&run(&resized, true), 5, &restore);
    assert_eq!(std::fs::read(&resized).unwrap(), before, "left as it was");

    // 8 MiB of noise: not a state file at all.
    let noise = dir.join("noise.state");
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let bytes: Vec<u8> = (0..8 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect();
    std::fs::write(&noise, &bytes).unwrap();
    let without = run(&noise, false);
    assert_eq!(without.status.code(), Some(5), "{}", common::stderr(&without));
    common::assert_fails_with(&run(&noise, true), 5, "does not start with a state superblock");
    assert_eq!(std::fs::read(&noise).unwrap(), bytes, "left as it was");

    // A format 1 file (its superblock's CRC at 32): another format version.
    let old = dir.join("format1.state");
    let mut bytes = vec![0u8; 8 << 20];
    bytes[..8].copy_from_slice(b"MQVSTATE");
    bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
    let crc = mqvisor_broker::store::log::crc32c(&bytes[..32]);
    bytes[32..36].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&old, &bytes).unwrap();
    let without = run(&old, false);
    assert_eq!(without.status.code(), Some(5), "{}", common::stderr(&without));
    common::assert_fails_with(&run(&old, true), 5, "state format 1");
    assert_eq!(std::fs::read(&old).unwrap(), bytes, "left as it was");

    // Too small: refused by the host before the flag is looked at (125, as without it).
    let small = dir.join("small.state");
    std::fs::write(&small, vec![1u8; 1 << 20]).unwrap();
    common::assert_fails_with(&run(&small, false), 125, "a state file is at least 4 MiB");
    common::assert_fails_with(&run(&small, true), 125, "a state file is at least 4 MiB");
    assert_eq!(names(&dir), ["format1.state", "noise.state", "resized.state", "small.state"], "nothing moved aside");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_state_file_in_use_by_a_running_vm_is_refused_to_a_second_one() {
    if !kvm_available("a_state_file_in_use_by_a_running_vm_is_refused_to_a_second_one") {
        return;
    }
    let dir = dir("in-use");
    let state = dir.join("tenant.state");
    let vm = RunningVm::start(&["--state", state.to_str().unwrap(), "--state-size", "64"]);
    publish_retained(vm.addr, 4);
    let in_use = format!("the state file {} is in use by another mqvisor", state.display());
    common::assert_fails_with(&run(&state, false), 125, &in_use);

    // state-check reads it all the same, at once, and says it is in use.
    let checked = state_check(&state);
    assert!(checked.status.success(), "{}", common::stderr(&checked));
    assert!(common::stdout(&checked).contains("in use by a running mqvisor"), "{}", common::stdout(&checked));
    assert!(common::stdout(&checked).contains("4 records"), "{}", common::stdout(&checked));

    // Damaged under the running VM (which never reads it again): a second
    // mqvisor with --discard-corrupt-state must not move it from under
    // the first, nor start beside it.
    let batches = batch_offsets(&state);
    flip_byte(&state, batches[1] + 40);
    common::assert_fails_with(&run(&state, true), 125, &in_use);
    assert_eq!(names(&dir), ["tenant.state"], "nothing moved aside");
    assert_eq!(retained(vm.addr), ["r/0", "r/1", "r/2", "r/3"], "the first VM serves on");
    let (status, _) = vm.stop();
    assert_eq!(status.code(), Some(143), "SIGTERM: 128 + 15");

    // The lock went with the VM: the next start reads the file (and finds the damage).
    let out = run(&state, false);
    assert_eq!(out.status.code(), Some(5), "{}", common::stderr(&out));
    assert!(common::stderr(&out).contains(&format!("corrupt at byte {}", batches[1])), "{}", common::stderr(&out));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_file_size_limit_below_a_new_state_file_is_one_line_not_sigxfsz() {
    let dir = dir("fsize");
    let state = dir.join("new.state");
    let mut command = common::mqvisor();
    command.args(["run", "--listen", "127.0.0.1:0", "--timeout", "10", "--state-size", "64", "--state"]).arg(&state);
    // `ulimit -f 4096`: 4 MiB.
    common::limit_child(&mut command, libc::RLIMIT_FSIZE, 4 << 20, None);
    let out = command.output().unwrap();
    common::assert_fails_with(&out, 125, "cannot size the state file");
    assert!(common::stderr(&out).contains("File too large"), "{}", common::stderr(&out));
    assert_eq!(names(&dir), Vec::<String>::new(), "no empty file is left behind");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_full_file_system_refuses_a_new_state_file_at_once() {
    // A file system of its own, filled: a tmpfs in a mount namespace of
    // its own (root), so nothing is left mounted whatever happens.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        assert!(!ci, "a_full_file_system_refuses_a_new_state_file_at_once: needs root to mount, and CI=true");
        eprintln!("\n*** a_full_file_system_refuses_a_new_state_file_at_once: SKIPPED: mounting needs root ***\n");
        return;
    }
    if !common::tool_available(
        "a_full_file_system_refuses_a_new_state_file_at_once",
        "unshare (util-linux)",
        "unshare --version",
    ) {
        return;
    }
    let dir = dir("full");
    let script = r#"mount -t tmpfs -o size=64k tmpfs "$1" || exit 99
        dd if=/dev/zero of="$1/fill" bs=4k 2>/dev/null
        "$2" run --listen 127.0.0.1:0 --timeout 10 --state "$1/tenant.state" --state-size 64
        code=$?
        ls "$1" >&2
        exit $code"#;
    let out = std::process::Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", script, "sh"])
        .arg(&dir)
        .arg(env!("CARGO_BIN_EXE_mqvisor"))
        .output()
        .unwrap();
    let stderr = common::stderr(&out);
    assert_ne!(out.status.code(), Some(99), "mounting a tmpfs failed: {stderr}");
    let mut lines = stderr.lines();
    let line = lines.next().unwrap_or_default();
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(line.contains("No space left on device"), "{stderr}");
    assert!(line.contains("tenant.state"), "{stderr}");
    assert_eq!(lines.collect::<Vec<_>>(), ["fill"], "one line, and no state file left behind: {stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn state_check_and_run_agree_on_empty_and_small_files() {
    let dir = dir("small");
    // Empty: run lays it out at --state-size, so it holds no state yet.
    let empty = dir.join("empty.state");
    std::fs::write(&empty, b"").unwrap();
    let out = state_check(&empty);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert!(common::stdout(&out).contains("no state yet"), "{}", common::stdout(&out));
    // 1500 zero bytes: run refuses it (under 4 MiB), and so does state-check.
    let small = dir.join("small.state");
    std::fs::write(&small, vec![0u8; 1500]).unwrap();
    let needle = format!("the state file {} is 1500 bytes; a state file is at least 4 MiB", small.display());
    common::assert_fails_with(&state_check(&small), 1, &needle);
    common::assert_fails_with(&run(&small, false), 125, &needle);
    assert_eq!(std::fs::read(&small).unwrap(), vec![0u8; 1500]);
    assert_eq!(std::fs::metadata(&empty).unwrap().len(), 0, "state-check changes nothing");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_empty_file_laid_out_as_state_is_made_0600_and_state_size_is_noted_for_an_existing_one() {
    if !kvm_available("an_empty_file_laid_out_as_state_is_made_0600_and_state_size_is_noted_for_an_existing_one") {
        return;
    }
    let dir = dir("layout");
    let state = dir.join("tenant.state");
    std::fs::write(&state, b"").unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o644)).unwrap();
    let arg = |s: &'static str| OsStr::new(s);
    let out = run_briefly(&[arg("--state"), state.as_os_str(), arg("--state-size"), arg("64")]);
    assert_eq!(out.status.code(), Some(124), "{}", common::stderr(&out));
    assert_eq!(mode(&state), 0o600, "the tenant's state is readable by the VMM's user only");
    assert_eq!(std::fs::metadata(&state).unwrap().len(), 64 << 20);

    // --state-size given for a file of another size: one note, the size kept.
    let note = format!("mqvisor: note: --state-size is for new files; {} keeps its 64 MiB", state.display());
    let out = run_briefly(&[arg("--state"), state.as_os_str(), arg("--state-size"), arg("32")]);
    assert_eq!(out.status.code(), Some(124), "{}", common::stderr(&out));
    assert_eq!(common::stderr(&out).matches(&note).count(), 1, "{}", common::stderr(&out));
    assert_eq!(std::fs::metadata(&state).unwrap().len(), 64 << 20);
    // Not given, or the file's own size: no note.
    for extra in [&[][..], &[arg("--state-size"), arg("64")][..]] {
        let mut args = vec![arg("--state"), state.as_os_str()];
        args.extend_from_slice(extra);
        let out = run_briefly(&args);
        assert_eq!(out.status.code(), Some(124), "{}", common::stderr(&out));
        assert!(!common::stderr(&out).contains("note:"), "{}", common::stderr(&out));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_max_packet_size_the_state_file_cannot_hold_is_refused_at_start() {
    if !kvm_available("a_max_packet_size_the_state_file_cannot_hold_is_refused_at_start") {
        return;
    }
    let dir = dir("packet");
    let state = dir.join("tenant.state");
    let arg = |s: &'static str| OsStr::new(s);
    // 32 MiB: regions of 15.5 MiB; a 16 MiB packet does not fit.
    let out = run_briefly(&[
        arg("--state"),
        state.as_os_str(),
        arg("--state-size"),
        arg("32"),
        arg("--max-packet-size"),
        arg("16777216"),
    ]);
    common::assert_fails_with(&out, 125, "--max-packet-size 16777216 does not fit in the new state file");
    assert!(common::stderr(&out).contains("--state-size 35"), "{}", common::stderr(&out));
    assert_eq!(names(&dir), Vec::<String>::new(), "no file is left behind");

    // The smallest file (4 MiB): regions of 1.5 MiB hold a packet of 512 KiB, not a byte more.
    let with = |size: &'static str, packet: &'static str| {
        run_briefly(&[
            arg("--state"),
            state.as_os_str(),
            arg("--state-size"),
            arg(size),
            arg("--max-packet-size"),
            arg(packet),
        ])
    };
    common::assert_fails_with(&with("4", "524289"), 125, "its regions hold packets of at most 524288 bytes");
    let out = with("4", "524288");
    assert_eq!(out.status.code(), Some(124), "it starts: {}", common::stderr(&out));
    // An existing 4 MiB file and the default --max-packet-size (1 MiB).
    let out = run_briefly(&[arg("--state"), state.as_os_str()]);
    common::assert_fails_with(&out, 125, "--max-packet-size 1048576 does not fit in the state file");
    assert!(common::stderr(&out).contains("--max-packet-size 524288 or less"), "{}", common::stderr(&out));
    let _ = std::fs::remove_dir_all(&dir);
}
