//! The vCPU thread: KVM_RUN in a loop, every exit reason accounted for.
//!
//! Owns the run loop, parking the vCPU on WAIT, and stopping it from outside
//! (the `--timeout` watchdog). Every exit the guest can cause ends in an
//! [`Outcome`]: an unexpected exit stops the run with the exit reason and the
//! guest RIP. Must never hang on a guest that stops cooperating: a guest that
//! spins without exiting is interrupted by a signal to this thread.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::paravirt::{self, PortRequest};

/// How a VM run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The guest wrote EXIT.
    Exited { code: u32, message: String },
    /// The guest did something it cannot come back from.
    Crashed { reason: String, rip: Option<u64> },
    /// `--timeout` passed first.
    TimedOut { after: Duration, rip: Option<u64> },
}

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

struct VcpuLoop {
    vcpu: VcpuFd,
    mem: GuestMemoryMmap,
    console: Box<dyn Write + Send>,
    /// Written to wake the vCPU from WAIT early.
    wake: Arc<EventFd>,
    stop: Arc<AtomicBool>,
}

enum Step {
    Continue,
    Wait(Option<Duration>),
    End(Outcome),
    Crash(String),
}

impl VcpuLoop {
    fn rip(&self) -> Option<u64> {
        self.vcpu.get_regs().ok().map(|regs| regs.rip)
    }

    fn run(mut self, started: Instant) -> Outcome {
        loop {
            if self.stop.load(Ordering::Acquire) {
                return Outcome::TimedOut {
                    after: started.elapsed(),
                    rip: self.rip(),
                };
            }
            let step = match self.vcpu.run() {
                Ok(exit) => Self::on_exit(exit, &self.mem, &mut self.console),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Step::Continue,
                Err(e) => Step::Crash(format!("KVM_RUN failed: {e}")),
            };
            match step {
                Step::Continue => {}
                Step::Wait(timeout) => self.park(timeout),
                Step::End(outcome) => return outcome,
                Step::Crash(reason) => {
                    return Outcome::Crashed {
                        reason,
                        rip: self.rip(),
                    };
                }
            }
        }
    }

    fn on_exit(exit: VcpuExit, mem: &GuestMemoryMmap, console: &mut Box<dyn Write + Send>) -> Step {
        match exit {
            VcpuExit::IoOut(port, data) => {
                match paravirt::decode_out(port, paravirt::out_value(data), mem) {
                    Ok(PortRequest::Console(text)) => {
                        // A closed stdout must not kill the guest; output is best effort.
                        let _ = console
                            .write_all(text.as_bytes())
                            .and_then(|()| console.flush());
                        Step::Continue
                    }
                    Ok(PortRequest::Exit { code, message }) => {
                        Step::End(Outcome::Exited { code, message })
                    }
                    Ok(PortRequest::Wait(timeout)) => Step::Wait(timeout),
                    Ok(PortRequest::Unknown { port }) => {
                        Step::Crash(format!("guest wrote to unknown I/O port {port:#x}"))
                    }
                    Err(e) => Step::Crash(format!("guest paravirt page unreadable: {e}")),
                }
            }
            VcpuExit::IoIn(port, _) => {
                Step::Crash(format!("guest read from unknown I/O port {port:#x}"))
            }
            VcpuExit::MmioRead(addr, _) => Step::Crash(format!(
                "guest read unmapped guest-physical address {addr:#x}"
            )),
            VcpuExit::MmioWrite(addr, _) => Step::Crash(format!(
                "guest wrote unmapped guest-physical address {addr:#x}"
            )),
            VcpuExit::Shutdown => Step::Crash(
                "guest triple-faulted (KVM_EXIT_SHUTDOWN): an exception it could not handle".into(),
            ),
            VcpuExit::Hlt => Step::Crash("guest executed HLT (KVM_EXIT_HLT)".into()),
            VcpuExit::Intr => Step::Continue,
            VcpuExit::FailEntry(reason, cpu) => Step::Crash(format!(
                "KVM could not enter the guest (KVM_EXIT_FAIL_ENTRY, reason {reason:#x}, cpu {cpu})"
            )),
            VcpuExit::InternalError => {
                Step::Crash("KVM internal error (KVM_EXIT_INTERNAL_ERROR)".into())
            }
            VcpuExit::SystemEvent(kind, _) => {
                Step::Crash(format!("guest system event {kind} (KVM_EXIT_SYSTEM_EVENT)"))
            }
            other => Step::Crash(format!("unexpected VM exit {other:?}")),
        }
    }

    /// Blocks until `timeout` passes or someone writes `wake`.
    fn park(&self, timeout: Option<Duration>) {
        let ts = timeout.map(|t| libc::timespec {
            tv_sec: libc::time_t::try_from(t.as_secs()).unwrap_or(libc::time_t::MAX),
            // Below 1e9, fits any c_long.
            tv_nsec: libc::c_long::from(t.subsec_nanos() as i32),
        });
        let mut pollfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&*self.wake),
            events: libc::POLLIN,
            revents: 0,
        };
        let ts_ptr = ts
            .as_ref()
            .map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // SAFETY: one valid pollfd for the duration of the call; `ts_ptr` is
        // null or points at a live timespec; a null sigmask leaves it as is.
        // EINTR (a kick) simply returns early, which is what we want.
        let ready = unsafe { libc::ppoll(&mut pollfd, 1, ts_ptr, std::ptr::null()) };
        if ready > 0 {
            // Drain the counter; the eventfd is non-blocking, so this cannot hang.
            let _ = self.wake.read();
        }
    }
}

/// Runs `vcpu` on its own thread until the guest exits, crashes, or
/// `timeout` passes.
pub fn run(
    vcpu: VcpuFd,
    mem: GuestMemoryMmap,
    console: Box<dyn Write + Send>,
    timeout: Option<Duration>,
) -> std::io::Result<Outcome> {
    register_signal_handler(kick_signal(), on_kick)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let vcpu_loop = VcpuLoop {
        vcpu,
        mem,
        console,
        wake: wake.clone(),
        stop: stop.clone(),
    };
    let (done_tx, done_rx) = mpsc::channel();
    let handle = thread::Builder::new().name("vcpu0".into()).spawn(move || {
        // The receiver lives until this thread is joined below.
        let _ = done_tx.send(vcpu_loop.run(started));
    })?;

    let wait_for = |limit: Option<Duration>| match limit {
        Some(limit) => done_rx.recv_timeout(limit).ok(),
        None => done_rx.recv().ok(),
    };
    let outcome = match wait_for(timeout) {
        Some(outcome) => outcome,
        None => {
            stop.store(true, Ordering::Release);
            let _ = wake.write(1);
            loop {
                // ESRCH means the thread is already gone; recv will say so.
                let _ = handle.kill(kick_signal());
                match done_rx.recv_timeout(KICK_INTERVAL) {
                    Ok(outcome) => break outcome,
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        break Outcome::Crashed {
                            reason: "vCPU thread ended without an outcome".into(),
                            rip: None,
                        };
                    }
                }
            }
        }
    };
    if handle.join().is_err() {
        return Ok(Outcome::Crashed {
            reason: "vCPU thread panicked".into(),
            rip: None,
        });
    }
    Ok(outcome)
}
