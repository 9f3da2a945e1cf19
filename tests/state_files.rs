//! What `--state PATH`, `mqvisor state-check PATH` and
//! `--discard-corrupt-state` accept as a state file: the regular file at
//! PATH itself, empty or a state file. A symbolic link is not followed (a
//! dangling one would have root make a 1 GiB file at its target), a FIFO,
//! device or directory is refused at once (a FIFO blocked before), and a
//! file whose superblocks are zero but which holds data elsewhere (an ISO
//! image) is not taken for new state and written over. Each is one line and
//! leaves the file as it was. A discarded state file is kept as
//! PATH.corrupt, then PATH.corrupt.1, ..., never over an earlier one.

mod common;

use std::ffi::OsStr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

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

#[test]
fn a_discarded_state_file_is_kept_as_path_corrupt_and_never_overwritten() {
    if !kvm_available("a_discarded_state_file_is_kept_as_path_corrupt_and_never_overwritten") {
        return;
    }
    let dir = dir("discard");
    let state = dir.join("tenant.state");
    // Not a superblock at the start: the guest would refuse it (exit 5).
    let junk =
        |mark: u8| -> Vec<u8> { (0..4u32 << 20).map(|i| u8::try_from(i % 251).unwrap() | 1).chain([mark]).collect() };
    for (round, aside) in
        ["tenant.state.corrupt", "tenant.state.corrupt.1", "tenant.state.corrupt.2"].iter().enumerate()
    {
        std::fs::write(&state, junk(u8::try_from(round).unwrap() + 1)).unwrap();
        let vm = RunningVm::start(&["--state", state.to_str().unwrap(), "--discard-corrupt-state"]);
        vm.stop();
        assert_eq!(std::fs::read(dir.join(aside)).unwrap(), junk(u8::try_from(round).unwrap() + 1), "{aside}");
    }
    // Every discarded file is still there, each with its own bytes.
    assert_eq!(std::fs::read(dir.join("tenant.state.corrupt")).unwrap(), junk(1));
    assert_eq!(
        names(&dir),
        ["tenant.state", "tenant.state.corrupt", "tenant.state.corrupt.1", "tenant.state.corrupt.2"]
    );
    let _ = std::fs::remove_dir_all(&dir);
}
