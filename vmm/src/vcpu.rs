//! The vCPU thread: KVM_RUN in a loop, every exit reason accounted for.
//!
//! Owns the run loop, parking the vCPU on WAIT, routing MMIO exits to the
//! device bus, and stopping the vCPU from outside (the `--timeout` watchdog).
//! Every exit the guest can cause ends in an [`Outcome`]: an unexpected exit
//! stops the run with the exit reason and the guest RIP. Must never hang on a
//! guest that stops cooperating: a guest that spins without exiting is
//! interrupted by a signal to this thread.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, OnceLock, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{Killable, SIGRTMIN, SignalHandler, register_signal_handler};

use crate::devices::{BusError, GiveUp, MmioBus, StopReason};
use crate::paravirt::{self, PortRequest};
use crate::seccomp::SeccompError;

/// How a VM run ended.
#[derive(Debug)]
pub enum Outcome {
    /// The guest wrote EXIT.
    Exited { code: u32, message: String },
    /// The guest did something it cannot come back from.
    Crashed { reason: CrashReason, rip: Option<u64> },
    /// `--timeout` passed first.
    TimedOut { after: Duration, rip: Option<u64> },
    /// The operator asked mqvisor to stop (SIGINT or SIGTERM).
    Stopped { signal: i32 },
    /// The host could not go on running the guest: a KVM call kept failing
    /// for a reason of the host's, not the guest's.
    HostFailed { reason: HostFailure },
}

/// Why the guest was stopped as crashed: an exit it cannot come back from,
/// a device that gave up on it, or the vCPU thread's own end.
#[derive(Debug, thiserror::Error)]
pub enum CrashReason {
    #[error("the guest accessed device registers {MAX_MMIO_PER_SECOND} times in under a second; stopping it")]
    RegisterStorm,
    #[error("KVM_RUN failed: {0}")]
    KvmRun(kvm_ioctls::Error),
    #[error("guest wrote to unknown I/O port {0:#x}")]
    UnknownPortWrite(u16),
    #[error("guest read from unknown I/O port {0:#x}")]
    UnknownPortRead(u16),
    #[error("guest paravirt page unreadable: {0}")]
    ParavirtPage(vm_memory::GuestMemoryError),
    #[error("guest read unmapped guest-physical address {0:#x}")]
    UnmappedRead(u64),
    /// A device write the bus refused (unmapped, or its device gave up).
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("guest triple-faulted (KVM_EXIT_SHUTDOWN): an exception it could not handle")]
    TripleFault,
    #[error("guest executed HLT (KVM_EXIT_HLT)")]
    Halt,
    #[error("KVM could not enter the guest (KVM_EXIT_FAIL_ENTRY, reason {reason:#x}, cpu {cpu})")]
    FailEntry { reason: u64, cpu: u32 },
    #[error("KVM internal error (KVM_EXIT_INTERNAL_ERROR)")]
    KvmInternal,
    #[error("guest system event {0} (KVM_EXIT_SYSTEM_EVENT)")]
    SystemEvent(u32),
    /// Any other exit, as KVM's bindings print it (the exit borrows the
    /// vCPU's run area, so its text is kept).
    #[error("unexpected VM exit {0}")]
    UnexpectedExit(String),
    /// A device thread gave up on the guest (see [`GiveUp`]).
    #[error(transparent)]
    Device(StopReason),
    #[error("vCPU thread: {0}")]
    Seccomp(SeccompError),
    #[error("vCPU thread ended without an outcome")]
    NoOutcome,
    #[error("vCPU thread panicked")]
    Panicked,
}

/// Why the host could not go on running the guest.
#[derive(Debug, thiserror::Error)]
pub enum HostFailure {
    /// See [`EAGAIN_FOR`].
    #[error(
        "KVM_RUN failed with EAGAIN for {} s on end (the usual cause: a task limit too low for KVM's worker thread)",
        EAGAIN_FOR.as_secs()
    )]
    KvmRunAgain,
}

/// Exits the vCPU made to this process (each costs ~30 µs on nested KVM).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ExitStats {
    pub port_io: u64,
    pub mmio: u64,
    pub other: u64,
}

impl ExitStats {
    pub fn total(&self) -> u64 {
        self.port_io + self.mmio + self.other
    }
}

/// What the vCPU thread needs besides the vCPU.
pub struct VcpuContext {
    pub mem: GuestMemoryMmap,
    pub bus: MmioBus,
    pub console: Box<dyn Write + Send>,
    /// Written by devices to end a WAIT early (must be EFD_NONBLOCK).
    pub wake: Arc<EventFd>,
    /// Every exit, counted as it happens (for live reports; `ExitStats`
    /// comes only at the end).
    pub exit_count: Arc<std::sync::atomic::AtomicU64>,
    /// Where a device thread that gave up on the guest says why: the VM
    /// is stopped with that reason.
    pub give_up: GiveUp,
}

/// Device register accesses (MMIO exits to this process) a guest may make
/// in a second. A driver makes a few dozen while it sets a device up and then
/// notifies through ioeventfds, which never come here; a guest touching
/// registers in a loop costs the host an exit each, which its neighbours
/// feel, and is stopped.
const MAX_MMIO_PER_SECOND: u64 = 20_000;

/// How long KVM_RUN may keep failing with EAGAIN before the VM is given up.
/// EAGAIN is the kernel's "try again", but one cause never passes: KVM
/// cannot start its worker thread (`kvm-nx-lpage-recovery`) in a group at
/// its task limit, and every KVM_RUN then fails at once, so retrying
/// without end spins a CPU and serves nothing.
pub const EAGAIN_FOR: Duration = Duration::from_secs(1);
/// The pause between two KVM_RUNs that failed with EAGAIN.
const EAGAIN_PAUSE: Duration = Duration::from_millis(1);

/// How often the watchdog re-signals a vCPU that has not stopped yet: a signal
/// that lands just before KVM_RUN is entered is otherwise lost.
const KICK_INTERVAL: Duration = Duration::from_millis(10);

/// The signal that kicks the vCPU thread out of KVM_RUN.
fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: the point is that KVM_RUN returns EINTR.
}

/// The last SIGINT/SIGTERM received, or 0.
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_stop(signal: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Async-signal-safe: an atomic store and a write(2).
    STOP_SIGNAL.store(signal, Ordering::Release);
    ring_supervisor();
}

/// Set by SIGHUP (when [`install_reload_handler`] ran), taken by the supervisor.
static RELOAD: AtomicBool = AtomicBool::new(false);

extern "C" fn on_reload(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Async-signal-safe: an atomic store and a write(2).
    RELOAD.store(true, Ordering::Release);
    ring_supervisor();
}

/// The supervisor's doorbell, an eventfd: rung by the stop and reload
/// signal handlers, by the vCPU thread as it ends and by a device that
/// gives up, so the supervisor sleeps until one of them has something for
/// it. (It used to look every 50 ms: twenty wake-ups a second per tenant,
/// 0.44 ms of CPU a second each under the nested hypervisor, which made
/// 1,000 idle tenants cost most of a core.) Made once per process and never
/// closed, so a handler never writes to a descriptor that was reused.
static SUPERVISOR_BELL: OnceLock<EventFd> = OnceLock::new();
/// The bell's descriptor for the signal handlers (-1 until it exists):
/// reading a `OnceLock` is not async-signal-safe, an atomic load is.
static SUPERVISOR_BELL_FD: AtomicI32 = AtomicI32::new(-1);

/// The supervisor's doorbell, made on first use.
fn supervisor_bell() -> std::io::Result<&'static EventFd> {
    if let Some(bell) = SUPERVISOR_BELL.get() {
        return Ok(bell);
    }
    let bell = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
    let bell = SUPERVISOR_BELL.get_or_init(|| bell);
    SUPERVISOR_BELL_FD.store(std::os::fd::AsRawFd::as_raw_fd(bell), Ordering::Release);
    Ok(bell)
}

/// Wakes the supervisor (nothing before it has a doorbell). Async-signal-safe.
pub(crate) fn ring_supervisor() {
    let fd = SUPERVISOR_BELL_FD.load(Ordering::Acquire);
    if fd >= 0 {
        let one = 1u64.to_ne_bytes();
        // SAFETY: `fd` is the bell's eventfd, which is never closed; the
        // buffer is 8 live bytes, as an eventfd write takes. A full counter
        // (EAGAIN) already wakes the reader.
        let _ = unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
    }
}

/// Turns SIGHUP into a request to re-read settings, which the supervisor
/// hands to its `on_reload` (see [`run`]) instead of ending the process.
pub fn install_reload_handler() -> std::io::Result<()> {
    register_signal_handler(libc::SIGHUP, on_reload).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

struct VcpuLoop {
    vcpu: VcpuFd,
    context: VcpuContext,
    stats: ExitStats,
    stop: Arc<AtomicBool>,
}

enum Step {
    Continue,
    Wait(Option<Duration>),
    End(Outcome),
    Crash(CrashReason),
    /// KVM_RUN failed with EAGAIN: try again, for a while.
    Again,
}

impl VcpuLoop {
    fn rip(&self) -> Option<u64> {
        self.vcpu.get_regs().ok().map(|regs| regs.rip)
    }

    fn run(mut self, started: Instant) -> (Outcome, ExitStats) {
        let outcome = self.run_until_end(started);
        (outcome, self.stats)
    }

    fn run_until_end(&mut self, started: Instant) -> Outcome {
        // When the last MAX_MMIO_PER_SECOND register accesses began.
        let mut mmio_mark = (Instant::now(), 0u64);
        // Since when KVM_RUN has failed with EAGAIN and nothing else.
        let mut failing_since: Option<Instant> = None;
        loop {
            if self.stats.mmio - mmio_mark.1 >= MAX_MMIO_PER_SECOND {
                if mmio_mark.0.elapsed() < Duration::from_secs(1) {
                    return Outcome::Crashed { reason: CrashReason::RegisterStorm, rip: self.rip() };
                }
                mmio_mark = (Instant::now(), self.stats.mmio);
            }
            if self.stop.load(Ordering::Acquire) {
                return Outcome::TimedOut { after: started.elapsed(), rip: self.rip() };
            }
            let step = match self.vcpu.run() {
                Ok(exit) => {
                    failing_since = None;
                    on_exit(exit, &mut self.context, &mut self.stats)
                }
                Err(e) if e.errno() == libc::EINTR => Step::Continue,
                Err(e) if e.errno() == libc::EAGAIN => Step::Again,
                Err(e) => Step::Crash(CrashReason::KvmRun(e)),
            };
            match step {
                Step::Again => {
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= EAGAIN_FOR {
                        return Outcome::HostFailed { reason: HostFailure::KvmRunAgain };
                    }
                    thread::sleep(EAGAIN_PAUSE);
                }
                Step::Continue => {}
                Step::Wait(timeout) => park(&self.context.wake, timeout),
                Step::End(outcome) => return outcome,
                Step::Crash(reason) => return Outcome::Crashed { reason, rip: self.rip() },
            }
        }
    }
}

fn on_exit(exit: VcpuExit, context: &mut VcpuContext, stats: &mut ExitStats) -> Step {
    context.exit_count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    match &exit {
        VcpuExit::IoIn(..) | VcpuExit::IoOut(..) => stats.port_io += 1,
        VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..) => stats.mmio += 1,
        _ => stats.other += 1,
    }
    match exit {
        VcpuExit::IoOut(port, data) => match paravirt::decode_out(port, paravirt::out_value(data), &context.mem) {
            Ok(PortRequest::Console(text)) => {
                // A closed stdout must not kill the guest; output is best effort.
                let _ = context.console.write_all(text.as_bytes()).and_then(|()| context.console.flush());
                Step::Continue
            }
            Ok(PortRequest::Exit { code, message }) => Step::End(Outcome::Exited { code, message }),
            Ok(PortRequest::Wait(timeout)) => Step::Wait(timeout),
            Ok(PortRequest::Unknown { port }) => Step::Crash(CrashReason::UnknownPortWrite(port)),
            Err(e) => Step::Crash(CrashReason::ParavirtPage(e)),
        },
        VcpuExit::IoIn(port, _) => Step::Crash(CrashReason::UnknownPortRead(port)),
        VcpuExit::MmioRead(addr, data) => {
            if context.bus.read(addr, data) {
                Step::Continue
            } else {
                Step::Crash(CrashReason::UnmappedRead(addr))
            }
        }
        VcpuExit::MmioWrite(addr, data) => match context.bus.write(addr, data) {
            Ok(()) => Step::Continue,
            Err(refused) => Step::Crash(CrashReason::Bus(refused)),
        },
        VcpuExit::Shutdown => Step::Crash(CrashReason::TripleFault),
        VcpuExit::Hlt => Step::Crash(CrashReason::Halt),
        VcpuExit::Intr => Step::Continue,
        VcpuExit::FailEntry(reason, cpu) => Step::Crash(CrashReason::FailEntry { reason, cpu }),
        VcpuExit::InternalError => Step::Crash(CrashReason::KvmInternal),
        VcpuExit::SystemEvent(kind, _) => Step::Crash(CrashReason::SystemEvent(kind)),
        other => Step::Crash(CrashReason::UnexpectedExit(format!("{other:?}"))),
    }
}

/// Blocks until `timeout` passes or someone writes `wake`.
fn park(wake: &EventFd, timeout: Option<Duration>) {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: libc::time_t::try_from(t.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(t.subsec_nanos().min(999_999_999) as i32),
    });
    let mut pollfd = libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(wake), events: libc::POLLIN, revents: 0 };
    let ts_ptr = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: one valid pollfd for the duration of the call; `ts_ptr` is null
    // or points at a live timespec; a null sigmask leaves the mask alone.
    // EINTR (a kick) simply returns early, which is what we want.
    let ready = unsafe { libc::ppoll(&mut pollfd, 1, ts_ptr, std::ptr::null()) };
    if ready > 0 {
        // Drain the counter; the eventfd is non-blocking, so this cannot hang.
        let _ = wake.read();
    }
}

/// Installs the vCPU kick handler and turns SIGINT/SIGTERM into a clean stop.
/// Call before anything the operator may want to interrupt cleanly starts.
pub fn install_signal_handlers() -> std::io::Result<()> {
    for (signal, handler) in
        [(kick_signal(), on_kick as SignalHandler), (libc::SIGINT, on_stop), (libc::SIGTERM, on_stop)]
    {
        register_signal_handler(signal, handler).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    }
    crate::seccomp::install_sigsys_handler()
}

/// Runs `vcpu` on its own thread until the guest exits, crashes, or
/// `timeout` passes. [`install_signal_handlers`] must have run. With
/// `on_reload`, the supervising thread calls it after each SIGHUP
/// ([`install_reload_handler`]), and may open files for reading to do so.
pub fn run(
    vcpu: VcpuFd,
    context: VcpuContext,
    timeout: Option<Duration>,
    mut on_reload: Option<Box<dyn FnMut() + '_>>,
) -> std::io::Result<(Outcome, ExitStats)> {
    let bell = supervisor_bell()?;
    let wake = context.wake.clone();
    let give_up = context.give_up.clone();
    let given_up = move || give_up.reason();
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let vcpu_loop = VcpuLoop { vcpu, context, stats: ExitStats::default(), stop: stop.clone() };
    let (done_tx, done_rx) = mpsc::channel();
    let handle = thread::Builder::new().name("vcpu0".into()).spawn(move || {
        // Filtered before the guest's first instruction.
        let selftest = crate::seccomp::selftest_requested();
        let result = match crate::seccomp::install(crate::seccomp::Thread::Vcpu) {
            Ok(()) => {
                if selftest {
                    crate::seccomp::make_a_denied_call();
                }
                vcpu_loop.run(started)
            }
            Err(e) => (Outcome::Crashed { reason: CrashReason::Seccomp(e), rip: None }, ExitStats::default()),
        };
        // The receiver lives until this thread is joined below.
        let _ = done_tx.send(result);
        ring_supervisor();
    })?;
    // Every thread now exists: the supervising one is filtered too.
    let main = if on_reload.is_some() { crate::seccomp::Thread::MainReading } else { crate::seccomp::Thread::Main };
    crate::seccomp::install(main).map_err(std::io::Error::other)?;

    let deadline = timeout.map(|t| started + t);
    let first = loop {
        // The bell was read before these looks: whatever rings after them
        // wakes the park below at once.
        match done_rx.try_recv() {
            Ok(result) => break Some(result),
            Err(mpsc::TryRecvError::Disconnected) => break None,
            Err(mpsc::TryRecvError::Empty) => {}
        }
        if let Some(reload) = on_reload.as_mut()
            && RELOAD.swap(false, Ordering::AcqRel)
        {
            reload();
        }
        if STOP_SIGNAL.load(Ordering::Acquire) != 0
            || deadline.is_some_and(|d| Instant::now() >= d)
            || given_up().is_some()
        {
            break None;
        }
        park(bell, deadline.map(|d| d.saturating_duration_since(Instant::now())));
    };
    let result = match first {
        Some(result) => result,
        None => {
            stop.store(true, Ordering::Release);
            let _ = wake.write(1);
            loop {
                // ESRCH means the thread is already gone; recv will say so.
                let _ = handle.kill(kick_signal());
                match done_rx.recv_timeout(KICK_INTERVAL) {
                    Ok(result) => break result,
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        break (Outcome::Crashed { reason: CrashReason::NoOutcome, rip: None }, ExitStats::default());
                    }
                }
            }
        }
    };
    let signal = STOP_SIGNAL.load(Ordering::Acquire);
    let result = match (result, given_up()) {
        ((Outcome::TimedOut { rip, .. }, stats), Some(reason)) => {
            (Outcome::Crashed { reason: CrashReason::Device(reason), rip }, stats)
        }
        ((Outcome::TimedOut { .. }, stats), None) if signal != 0 => (Outcome::Stopped { signal }, stats),
        (other, _) => other,
    };
    if handle.join().is_err() {
        return Ok((Outcome::Crashed { reason: CrashReason::Panicked, rip: None }, ExitStats::default()));
    }
    Ok(result)
}
