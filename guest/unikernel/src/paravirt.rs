//! The guest side of the paravirtual ports: console, exit and wait.
//!
//! Owns the shared [`ParavirtPage`] and the only `out` instructions in the
//! guest. Everything else talks to the VMM through the functions here; this
//! module must never be called re-entrantly (the guest is single-threaded and
//! takes no interrupts, so the only re-entry is a panic while printing, which
//! the panic handler avoids by writing the page afresh).

use core::arch::asm;
use core::ptr::addr_of_mut;

use mqvisor_boot_abi::{PARAVIRT_DATA_CAPACITY, ParavirtPage, layout, ports};

fn page() -> *mut ParavirtPage {
    layout::PARAVIRT as *mut ParavirtPage
}

fn out32(port: u16, value: u32) {
    // SAFETY: the VMM enters the guest with RFLAGS.IOPL = 3, so `out` at CPL 3
    // is allowed; it only causes a VM exit and touches no guest memory.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags)) };
}

/// Copies `bytes` (truncated to the page's capacity) into the shared page and
/// returns how many were taken.
fn fill(bytes: &[u8]) -> usize {
    let len = bytes.len().min(PARAVIRT_DATA_CAPACITY);
    let page = page();
    // SAFETY: the paravirt page is mapped, page sized and owned by this module;
    // `len` is within `data`'s capacity; the source is a live slice.
    unsafe {
        core::ptr::copy_nonoverlapping(bytes.as_ptr(), addr_of_mut!((*page).data).cast::<u8>(), len);
        addr_of_mut!((*page).len).write_volatile(u32::try_from(len).unwrap_or(0));
    }
    len
}

/// Writes bytes to the VMM console, one exit per page-sized chunk.
pub fn console_write(mut bytes: &[u8]) {
    while !bytes.is_empty() {
        let taken = fill(bytes);
        out32(ports::CONSOLE, 0);
        bytes = &bytes[taken..];
    }
}

/// Ends the VM with `code`; `message` (truncated to a page) is shown by the VMM.
pub fn exit(code: u32, message: &[u8]) -> ! {
    fill(message);
    out32(ports::EXIT, code);
    // The VMM never resumes a guest after EXIT; if it somehow did, keep the
    // vCPU parked rather than running off the end of the program.
    loop {
        wait_ns(u64::MAX);
    }
}

/// Parks the vCPU for at most `ns` nanoseconds (less if the VMM has work).
pub fn wait_ns(ns: u64) {
    // SAFETY: see `fill`; a plain aligned store into the shared page.
    unsafe { addr_of_mut!((*page()).wait_ns).write_volatile(ns) };
    out32(ports::WAIT, 0);
}
