//! Seccomp filters for the VMM's threads: each thread allows only the
//! system calls it makes once the guest runs (rust-vmm's `seccompiler`),
//! with `ioctl` narrowed to the requests that thread needs.
//!
//! Owns the allow-lists and what a denied call does: SIGSYS, one line on
//! stderr naming the thread and the call, exit 126. Lists were taken from
//! the threads' own traces (`strace -f` of `mqvisor run` under load, stopped
//! by signal and by timeout, handing clients over, crashing guests) plus
//! what the allocator and the Rust runtime may need at any time.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};

/// Exit status after a denied system call.
pub const EXIT_DENIED: i32 = 126;

/// The threads of a VMM process, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Thread {
    /// Starts the others, supervises the vCPU, reports at the end.
    Main,
    /// The main thread when it also re-reads TLS files on SIGHUP: it may
    /// open files for reading only, and look at them (`fstat`, `statx`,
    /// `lseek`).
    MainReading,
    /// Runs the guest (KVM_RUN) and serves its exits.
    Vcpu,
    /// The network proxy (tokio, current thread).
    Net,
    /// The virtio-blk worker: reads, writes and flushes the state file.
    Block,
}

/// Why a filter could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the seccomp filter: {0}")]
    Build(#[from] seccompiler::BackendError),
    #[error("installing the seccomp filter: {0}")]
    Install(#[from] seccompiler::Error),
}

/// Calls every thread makes: memory, locks, signals, time, its own end.
const COMMON: &[libc::c_long] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_getrandom,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_restart_syscall,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_fcntl,
    libc::SYS_poll,
    libc::SYS_ppoll,
];

/// Calls of the block worker beyond the common ones: file I/O at offsets,
/// `fdatasync` for FLUSH, waiting on its eventfds, and `lseek` to find the
/// state file's data when it sends it whole to a new standby (its socket is
/// read and written with `read`/`write`).
const BLOCK: &[libc::c_long] =
    &[libc::SYS_pread64, libc::SYS_pwrite64, libc::SYS_fdatasync, libc::SYS_poll, libc::SYS_ppoll, libc::SYS_lseek];

/// Calls of the network proxy's thread beyond the common ones.
const NET: &[libc::c_long] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_shutdown,
];

/// `_IOR(type, nr, size)` / `_IO(type, nr)` request numbers (asm-generic ioctl.h).
const fn ioctl_nr(dir: u64, kind: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (kind << 8) | nr
}
const KVMIO: u64 = 0xAE;
const KVM_RUN: u64 = ioctl_nr(0, KVMIO, 0x80, 0);
const KVM_GET_REGS: u64 = ioctl_nr(2, KVMIO, 0x81, std::mem::size_of::<kvm_bindings::kvm_regs>() as u64);
/// `FIONBIO`: tokio makes handed-over client sockets non-blocking with it.
const FIONBIO: u64 = 0x5421;

fn ioctl_rule(request: u64) -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, request)?])
}

/// The filter of `thread`.
pub fn program(thread: Thread) -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &call in COMMON.iter().chain(&[libc::SYS_open, libc::SYS_openat, libc::SYS_openat2]) {
        rules.insert(call, Vec::new());
    }
    match thread {
        // Removing its own control group once the VM is gone (`cgroup::Departure`).
        Thread::Main => {
            rules.insert(libc::SYS_rmdir, Vec::new());
        }
        Thread::MainReading => {
            for &call in &[libc::SYS_rmdir, libc::SYS_fstat, libc::SYS_newfstatat, libc::SYS_statx, libc::SYS_lseek] {
                rules.insert(call, Vec::new());
            }
        }
        Thread::Vcpu => {
            rules.insert(libc::SYS_ioctl, vec![ioctl_rule(KVM_RUN)?, ioctl_rule(KVM_GET_REGS)?]);
        }
        Thread::Block => {
            for &call in BLOCK {
                rules.insert(call, Vec::new());
            }
        }
        Thread::Net => {
            for &call in NET {
                rules.insert(call, Vec::new());
            }
            rules.insert(libc::SYS_ioctl, vec![ioctl_rule(FIONBIO)?]);
        }
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        std::env::consts::ARCH.try_into().map_err(SeccompError::Build)?,
    )?;
    Ok(filter.try_into()?)
}

/// Opening files fails with EACCES instead of ending the VM: glibc's
/// allocator reads `/proc/sys/vm/overcommit_memory` the first time it
/// gives memory back, and copes when it cannot. Stacked under the
/// allow-list (the kernel applies the stricter verdict of the two).
fn no_files(thread: Thread) -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        [libc::SYS_open, libc::SYS_openat, libc::SYS_openat2].into_iter().map(|call| (call, Vec::new())).collect();
    if thread == Thread::MainReading {
        // Reading only: `open` and `openat` fail with EACCES when their
        // flags ask for any way of writing or creating; `openat2`, whose
        // flags the filter cannot see, always does.
        let write_flags = [libc::O_WRONLY, libc::O_RDWR, libc::O_CREAT, libc::O_TRUNC, libc::O_APPEND, libc::O_TMPFILE];
        for (call, flags_arg) in [(libc::SYS_open, 1), (libc::SYS_openat, 2)] {
            let mut any_write = Vec::new();
            for flag in write_flags {
                let flag = u64::try_from(flag).unwrap_or(u64::MAX);
                let condition =
                    SeccompCondition::new(flags_arg, SeccompCmpArgLen::Dword, SeccompCmpOp::MaskedEq(flag), flag)?;
                any_write.push(SeccompRule::new(vec![condition])?);
            }
            rules.insert(call, any_write);
        }
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        std::env::consts::ARCH.try_into().map_err(SeccompError::Build)?,
    )?;
    Ok(filter.try_into()?)
}

thread_local! {
    /// The filtered thread's name, for the line a denied call prints.
    static FILTERED: std::cell::Cell<&'static str> = const { std::cell::Cell::new("unnamed") };
}

/// Installs `thread`'s filter on the calling thread (and sets
/// `no_new_privs`, which seccomp needs without CAP_SYS_ADMIN).
pub fn install(thread: Thread) -> Result<(), SeccompError> {
    FILTERED.with(|name| {
        name.set(match thread {
            Thread::Main | Thread::MainReading => "main",
            Thread::Vcpu => "vcpu",
            Thread::Net => "net",
            Thread::Block => "block",
        })
    });
    let allowed = program(thread)?;
    seccompiler::apply_filter(&no_files(thread)?)?;
    // The allow-list lets file opening through to the filter above.
    seccompiler::apply_filter(&allowed)?;
    Ok(())
}

/// True when the environment asks for the denial path to be shown
/// (`MQVISOR_SECCOMP_SELFTEST=1`, for the tests): the vCPU thread then
/// makes a call its filter denies.
pub fn selftest_requested() -> bool {
    std::env::var_os("MQVISOR_SECCOMP_SELFTEST").is_some_and(|v| v == "1")
}

/// Makes a system call no filter allows (getppid).
pub fn make_a_denied_call() {
    // SAFETY: getppid has no arguments and no effect; the filter traps it.
    unsafe { libc::syscall(libc::SYS_getppid) };
}

/// Makes a denied call end the process with one line naming the thread and
/// the call. Must run before the first filter is installed.
pub fn install_sigsys_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction with a valid handler and SA_SIGINFO; the
    // handler only calls async-signal-safe functions.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Appends `n` in decimal to `out` at `len`; returns the new length.
fn put_number(out: &mut [u8], mut len: usize, n: u64) -> usize {
    let mut digits = [0u8; 20];
    let mut count = 0;
    let mut n = n;
    loop {
        digits[count] = b'0' + (n % 10) as u8;
        count += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    while count > 0 && len < out.len() {
        count -= 1;
        out[len] = digits[count];
        len += 1;
    }
    len
}

fn put(out: &mut [u8], len: usize, bytes: &[u8]) -> usize {
    let take = bytes.len().min(out.len() - len);
    out[len..len + take].copy_from_slice(&bytes[..take]);
    len + take
}

extern "C" fn on_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, _context: *mut libc::c_void) {
    // The SIGSYS fields of siginfo_t: the call's address (8 bytes at 16),
    // then its number (an int at 24).
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers,
    // and for SIGSYS these bytes hold `_sigsys`.
    let call = unsafe { info.cast::<u8>().add(24).cast::<libc::c_int>().read_unaligned() };
    // A thread-local read: no system call, no allocation.
    let name = FILTERED.try_with(std::cell::Cell::get).unwrap_or("unknown");
    let mut line = [0u8; 160];
    let mut len = put(&mut line, 0, b"mqvisor: seccomp: thread ");
    len = put(&mut line, len, name.as_bytes());
    len = put(&mut line, len, b" made system call ");
    len = put_number(&mut line, len, u64::try_from(call).unwrap_or(0));
    len = put(&mut line, len, b", which its filter denies; stopping the VM\n");
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is live.
    unsafe {
        libc::write(2, line.as_ptr().cast(), len);
        libc::_exit(EXIT_DENIED);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_has_a_filter_and_ioctls_are_narrowed() {
        for thread in [Thread::Main, Thread::MainReading, Thread::Vcpu, Thread::Net, Thread::Block] {
            let program = program(thread).unwrap();
            assert!(!program.is_empty());
        }
        assert_eq!(KVM_RUN, 0xAE80);
        assert_eq!(KVM_GET_REGS, 0x8090_AE81);
    }

    #[test]
    fn numbers_are_written_in_decimal() {
        let mut out = [0u8; 8];
        let len = put_number(&mut out, 0, 1234);
        assert_eq!(&out[..len], b"1234");
        assert_eq!(put_number(&mut out, 0, 0), 1);
    }
}
