//! The virtio-mmio transport and the virtio-blk device against a guest that
//! lies: the fuzzer writes guest memory (descriptor tables, rings, request
//! headers) and MMIO registers as it likes, and the device is driven the
//! way the block thread drives it, over a small in-memory file.
//!
//! Input: a sequence of operations, each a tag byte and its arguments.
//! - 0: MMIO write (offset u16, value u32 LE)
//! - 1: MMIO read (offset u16)
//! - 2: memory write (address u32 LE within guest RAM, length u8, bytes)
//! - 3: a visit of the worker (serve every request, re-arm notifications)
//!
//! Must never panic, hang, touch memory outside the guest's or the file
//! outside its size.
#![no_main]

#[path = "input.rs"]
mod input;

use std::fs::File;
use std::os::fd::FromRawFd;

use input::Input;
use libfuzzer_sys::fuzz_target;
use mqvisor::devices::virtio::block::BlockDevice;
use mqvisor::devices::virtio::mmio::MmioTransport;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest RAM: room for rings and buffers, small enough to stay fast.
const RAM: usize = 256 * 1024;
/// The disk: 128 sectors.
const DISK: u64 = 64 * 1024;
const MAX_OPS: usize = 512;


/// An in-memory file (FLUSH on it costs nothing).
fn disk() -> File {
    // SAFETY: memfd_create with a NUL-terminated name; the returned
    // descriptor is owned by the File from here on.
    let fd = unsafe { libc::memfd_create(c"fuzz-disk".as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(DISK).unwrap();
    file
}

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM)]).unwrap();
    let file = disk();
    let device = BlockDevice::new(file.try_clone().unwrap(), "fuzz").unwrap();
    let mut transport = MmioTransport::new(device, mem.clone()).unwrap();
    let mut input = Input(data);
    for _ in 0..MAX_OPS {
        let Some(op) = input.u8() else { break };
        match op % 4 {
            0 => {
                let (Some(offset), Some(value)) = (input.u16(), input.u32()) else { break };
                transport.write(u64::from(offset & 0xfff), &value.to_le_bytes());
            }
            1 => {
                let Some(offset) = input.u16() else { break };
                let mut value = [0u8; 4];
                transport.read(u64::from(offset & 0xfff), &mut value);
            }
            2 => {
                let (Some(addr), Some(len)) = (input.u32(), input.u8()) else { break };
                let Some(bytes) = input.take(usize::from(len)) else { break };
                let _ = mem.write_slice(bytes, GuestAddress(u64::from(addr) % RAM as u64));
            }
            _ => {
                let device = transport.device_mut();
                match device.process_queue() {
                    Ok(_) => {
                        let _ = device.enable_notification();
                    }
                    Err(_) => transport.set_needs_reset(),
                }
            }
        }
    }
    // Whatever the guest asked, the file never grew.
    assert_eq!(file.metadata().unwrap().len(), DISK);
});
