//! The virtio-mmio transport and the virtio-net device against a guest that
//! lies: the fuzzer writes guest memory (descriptor tables, rings, indices,
//! buffers) and MMIO registers as it likes, and the device model is driven
//! the way the net thread drives it; every frame the device takes from the
//! guest then goes through the stream decoder the proxy uses.
//!
//! Input: a sequence of operations, each a tag byte and its arguments.
//! - 0: MMIO write (offset u16, value u32 LE)
//! - 1: MMIO read (offset u16)
//! - 2: memory write (address u32 LE within guest RAM, length u8, bytes)
//! - 3: a visit of the event handler (TX frames out, queued frames in)
//! - 4: queue a frame for the guest (length u8, bytes)
//!
//! Must never panic, hang or touch memory outside the guest's.
#![no_main]

#[path = "input.rs"]
mod input;

use std::sync::{Arc, Mutex};

use input::Input;
use libfuzzer_sys::fuzz_target;
use mqvisor::devices::virtio::mmio::MmioTransport;
use mqvisor::devices::virtio::net::{NetDevice, NetEventHandler};
use mqvisor::net::link::FrameLink;
use mqvisor_boot_abi::streams;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Guest RAM: room for rings and buffers, small enough to stay fast.
const RAM: usize = 256 * 1024;
/// Operations per input, at most (so one input cannot run for long).
const MAX_OPS: usize = 512;


fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM)]).unwrap();
    let device = NetDevice::new([2, 0, 0, 0, 0, 1], 2048);
    let transport = Arc::new(Mutex::new(MmioTransport::new(device, mem.clone()).unwrap()));
    let mut handler = NetEventHandler::new(transport.clone(), Arc::new(EventFd::new(0).unwrap()));
    let mut link = FrameLink::default();
    let mut input = Input(data);
    for _ in 0..MAX_OPS {
        let Some(op) = input.u8() else { break };
        match op % 5 {
            0 => {
                let (Some(offset), Some(value)) = (input.u16(), input.u32()) else { break };
                transport.lock().unwrap().write(u64::from(offset & 0xfff), &value.to_le_bytes());
            }
            1 => {
                let Some(offset) = input.u16() else { break };
                let mut value = [0u8; 4];
                transport.lock().unwrap().read(u64::from(offset & 0xfff), &mut value);
            }
            2 => {
                let (Some(addr), Some(len)) = (input.u32(), input.u8()) else { break };
                let Some(bytes) = input.take(usize::from(len)) else { break };
                let _ = mem.write_slice(bytes, GuestAddress(u64::from(addr) % RAM as u64));
            }
            3 => {
                handler.process(&mut link);
                for frame in link.from_guest.drain(..) {
                    if let Ok(records) = streams::records(&frame) {
                        records.for_each(drop);
                    }
                }
            }
            _ => {
                let Some(len) = input.u8() else { break };
                let Some(bytes) = input.take(usize::from(len)) else { break };
                if link.has_room_for_guest() {
                    link.to_guest.push_back(bytes.to_vec());
                }
            }
        }
    }
});
