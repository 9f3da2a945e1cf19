//! The block worker thread: sleeps until the guest notifies the request
//! queue (KVM signals the queue's eventfd directly), has the event handler
//! serve every request ([`super::event_handler`]), stops a guest that
//! notifies in a loop, and wakes a parked guest.
//!
//! Owns the thread and its stop signal. The file I/O (including
//! `fdatasync`, the slow part) happens here, never on the vCPU thread; the
//! lock held meanwhile is one the vCPU takes only for this device's
//! registers, which a running driver does not touch.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{BlockDevice, BlockEventHandler};
use crate::devices::GiveUp;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::storm::NotifyStorm;

/// A running block worker; dropping it stops the thread.
pub struct BlockThread {
    stop: EventFd,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl BlockThread {
    /// Starts the worker for `transport`; `wake_guest` ends a guest's WAIT;
    /// `give_up` is where it says why the VM must stop.
    pub fn spawn(
        transport: Arc<Mutex<MmioTransport<BlockDevice>>>,
        wake_guest: Arc<EventFd>,
        give_up: GiveUp,
    ) -> std::io::Result<Self> {
        let handler = BlockEventHandler::new(transport);
        let notified = handler.queue_event()?;
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let stopped = stop.try_clone()?;
        let handle = std::thread::Builder::new().name("block".into()).spawn(move || {
            if let Err(e) = crate::seccomp::install(crate::seccomp::Thread::Block) {
                eprintln!("mqvisor: state disk disabled: {e}");
                return;
            }
            run(&handler, &notified, &stopped, &wake_guest, &give_up);
        })?;
        Ok(BlockThread { stop, handle: Some(handle) })
    }

    /// Ends the thread once the request it is serving is done.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let _ = self.stop.write(1);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

impl Drop for BlockThread {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn run(handler: &BlockEventHandler, notified: &EventFd, stop: &EventFd, wake_guest: &EventFd, give_up: &GiveUp) {
    let mut storm = NotifyStorm::new("block", "requests");
    let mut served_total = 0u64;
    let mut fds = [
        libc::pollfd { fd: notified.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
    ];
    loop {
        // SAFETY: `fds` is a live array of two initialised pollfds whose
        // descriptors outlive this call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if ready < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        let count = notified.read().unwrap_or(0);
        let Some(served) = handler.visit(count) else { return };
        served_total += served as u64;
        if storm.notified(count, served_total, give_up) {
            return;
        }
        if served > 0 {
            let _ = wake_guest.write(1);
        }
        // While the guest works on, the blocks its next writes land on are
        // made ready, a chunk at a time, until it asks for something.
        while !requested(notified) && handler.prepare_ahead() == Some(true) {}
    }
}

/// True if the guest has notified the queue since it was last read.
fn requested(notified: &EventFd) -> bool {
    let mut fd = libc::pollfd { fd: notified.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one live, initialised pollfd whose descriptor outlives the call.
    unsafe { libc::poll(&mut fd, 1, 0) != 0 }
}
