//! A guest that attacks its VMM on purpose, for the tests: built like the
//! default image, it boots, reads `attack=NAME` from its command line, and
//! misbehaves against the virtio-net device and the VMM's ports until it is
//! stopped. It never serves anything.
//!
//! The attacks (`tests/hostile.rs` runs each beside a healthy tenant):
//! - `rings-outside-ram`: queues placed past the end of guest RAM;
//! - `descriptor-loop`: a TX chain whose descriptors point at each other;
//! - `huge-lengths`: descriptors of nearly 4 GiB;
//! - `avail-overrun`: an avail index far past the ring (a broken ring);
//! - `notify-storm`: queue notifications in a loop, never parking;
//! - `disk-notify-storm`: the same at the virtio-blk device (with `--state`);
//! - `unmapped-mmio`: a write where no device is;
//! - `busy-loop`: spinning forever without WAIT;
//! - `garbage-config`: config-space reads at every offset and width;
//! - `fill-memory`: touching every page of guest RAM, then parking.
//!
//! Must stay small and obvious: it is test equipment, not product.

// Non-test code never unwraps, expects or panics: every failure is a value
// the caller reports (tests may: see clippy.toml).
#![warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![no_std]
#![no_main]

#[path = "clock.rs"]
#[allow(dead_code)]
mod clock;
#[path = "console.rs"]
#[allow(unused_macros, dead_code)]
mod console;
#[path = "mem.rs"]
mod mem;
#[path = "paravirt.rs"]
#[allow(dead_code)]
mod paravirt;

use core::panic::PanicInfo;
use core::ptr::{read_volatile, write_volatile};

use mqvisor_boot_abi::{BootInfo, device_kind, exit_codes, layout};

/// virtio-mmio registers (virtio 1.2, 4.2.2) and status bits.
mod reg {
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG: u64 = 0x100;
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
}

const QUEUE_NUM: u32 = 16;
const QUEUE_SLOTS: u16 = 16;
const TX: u32 = 1;
/// Descriptor flag: the chain goes on.
const NEXT: u16 = 1;

fn mmio_write(base: u64, offset: u64, value: u32) {
    // SAFETY: `base` is a device window from boot-info (or, for the
    // unmapped-mmio attack, an address in the device hole that the VMM
    // traps); a volatile store there only causes an MMIO exit.
    unsafe { write_volatile((base + offset) as *mut u32, value) };
}

fn mmio_read(base: u64, offset: u64) -> u32 {
    // SAFETY: as for `mmio_write`; a volatile load causes an MMIO exit.
    unsafe { read_volatile((base + offset) as *const u32) }
}

/// Writes `value` at guest-physical `addr` (identity mapped).
fn poke<T>(addr: u64, value: T) {
    // SAFETY: callers pass addresses inside the heap range boot-info gives,
    // which this image owns and otherwise never uses.
    unsafe { write_volatile(addr as *mut T, value) };
}

/// Sets the device up like a real driver, with the queues' rings at the
/// addresses `ring(queue)` gives (descriptors, driver area, device area).
fn set_up(base: u64, ring: impl Fn(u32) -> (u64, u64, u64)) {
    mmio_write(base, reg::STATUS, 0);
    mmio_write(base, reg::STATUS, reg::ACKNOWLEDGE | reg::DRIVER);
    mmio_write(base, reg::DRIVER_FEATURES_SEL, 1);
    mmio_write(base, reg::DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1
    mmio_write(base, reg::STATUS, reg::ACKNOWLEDGE | reg::DRIVER | reg::FEATURES_OK);
    for queue in 0..2 {
        let (desc, driver, device) = ring(queue);
        mmio_write(base, reg::QUEUE_SEL, queue);
        mmio_write(base, reg::QUEUE_NUM, QUEUE_NUM);
        for (low, high, addr) in [
            (reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH, desc),
            (reg::QUEUE_DRIVER_LOW, reg::QUEUE_DRIVER_HIGH, driver),
            (reg::QUEUE_DEVICE_LOW, reg::QUEUE_DEVICE_HIGH, device),
        ] {
            let [l0, l1, l2, l3, h0, h1, h2, h3] = addr.to_le_bytes();
            mmio_write(base, low, u32::from_le_bytes([l0, l1, l2, l3]));
            mmio_write(base, high, u32::from_le_bytes([h0, h1, h2, h3]));
        }
        mmio_write(base, reg::QUEUE_READY, 1);
    }
    mmio_write(base, reg::STATUS, reg::ACKNOWLEDGE | reg::DRIVER | reg::FEATURES_OK | reg::DRIVER_OK);
}

/// Rings in the heap: per queue, a page each for descriptors, driver and device areas.
fn rings_in(heap: u64) -> impl Fn(u32) -> (u64, u64, u64) {
    move |queue| {
        let at = heap + u64::from(queue) * 0x3000;
        (at, at + 0x1000, at + 0x2000)
    }
}

/// Publishes descriptor `head` in the TX avail ring as entry `n`, and says so.
fn offer_tx(base: u64, heap: u64, n: u16) {
    let (_, driver, _) = rings_in(heap)(TX);
    poke(driver + 4 + 2 * u64::from(n % QUEUE_SLOTS), 0u16);
    poke(driver + 2, n.wrapping_add(1));
    mmio_write(base, reg::QUEUE_NOTIFY, TX);
}

/// One split-queue descriptor: address, length, flags, next.
fn descriptor(at: u64, addr: u64, len: u32, flags: u16, next: u16) {
    poke(at, addr);
    poke(at + 8, len);
    poke(at + 12, flags);
    poke(at + 14, next);
}

fn park_ms(ms: u64) {
    paravirt::wait_ns(ms * 1_000_000);
}

fn attack(name: &str, base: u64, disk: Option<u64>, heap: u64, heap_end: u64, ram: u64) -> ! {
    let tx_desc = rings_in(heap)(TX).0;
    let buffer = heap + 0x8000;
    match name {
        "rings-outside-ram" => {
            set_up(base, |queue| {
                let at = ram + 0x1000_0000 + u64::from(queue) * 0x3000;
                (at, at + 0x1000, at + 0x2000)
            });
            loop {
                mmio_write(base, reg::QUEUE_NOTIFY, TX);
                park_ms(1);
            }
        }
        "descriptor-loop" | "huge-lengths" => {
            set_up(base, rings_in(heap));
            if name == "descriptor-loop" {
                descriptor(tx_desc, buffer, 64, NEXT, 1);
                descriptor(tx_desc + 16, buffer, 64, NEXT, 0);
            } else {
                descriptor(tx_desc, buffer, 0xffff_fff0, 0, 0);
            }
            let mut n = 0u16;
            loop {
                offer_tx(base, heap, n);
                n = n.wrapping_add(1);
                park_ms(1);
            }
        }
        "avail-overrun" => loop {
            set_up(base, rings_in(heap));
            let (_, driver, _) = rings_in(heap)(TX);
            poke(driver + 2, 1000u16);
            mmio_write(base, reg::QUEUE_NOTIFY, TX);
            park_ms(1);
        },
        "notify-storm" => {
            set_up(base, rings_in(heap));
            loop {
                mmio_write(base, reg::QUEUE_NOTIFY, TX);
            }
        }
        "disk-notify-storm" => {
            let Some(disk) = disk else { paravirt::exit(2, b"no virtio-blk device (run with --state)") };
            // Its one queue is set up; the second set_up writes go nowhere.
            set_up(disk, rings_in(heap + 0x10_0000));
            loop {
                mmio_write(disk, reg::QUEUE_NOTIFY, 0);
            }
        }
        "unmapped-mmio" => loop {
            // Inside the device hole, past every device's page.
            mmio_write(layout::DEVICE_WINDOW + 0x10_0000, 0, 0xdead_beef);
        },
        "busy-loop" => loop {
            core::hint::spin_loop();
        },
        "garbage-config" => loop {
            for offset in (reg::CONFIG..0x1000).step_by(4) {
                let _ = mmio_read(base, offset);
            }
            for offset in 0..0x100 {
                let _ = mmio_read(base, offset * 4 + 2);
            }
            park_ms(1);
        },
        "fill-memory" => {
            // Every page becomes host memory of the VMM; only a memory limit
            // (or --memory) bounds it.
            let mut page = heap;
            while page < heap_end {
                poke(page, 0xa5u8);
                page += layout::PAGE_SIZE;
            }
            paravirt::console_write(b"hostile guest: every page touched\n");
            loop {
                park_ms(1000);
            }
        }
        _ => paravirt::exit(2, b"unknown attack"),
    }
}

#[unsafe(no_mangle)]
extern "C" fn _start(boot_info: *const BootInfo) -> ! {
    if boot_info as u64 != layout::BOOT_INFO {
        paravirt::exit(2, b"boot-info is not where the ABI puts it");
    }
    // SAFETY: the ABI's boot-info address, mapped and filled before entry.
    let info = unsafe { &*boot_info };
    let Some(cmdline) = info.cmdline() else { paravirt::exit(2, b"command line is not UTF-8") };
    let Some(name) = cmdline.split_ascii_whitespace().find_map(|w| w.strip_prefix("attack=")) else {
        paravirt::exit(2, b"usage: --cmdline attack=NAME")
    };
    let Some(net) = info.devices().iter().find(|d| d.kind == device_kind::VIRTIO_NET) else {
        paravirt::exit(2, b"no virtio-net device (run with --service mqtt or echo)")
    };
    let disk = info.devices().iter().find(|d| d.kind == device_kind::VIRTIO_BLK).map(|d| d.base);
    paravirt::console_write(b"hostile guest: attacking\n");
    let heap = info.heap_start.next_multiple_of(layout::PAGE_SIZE);
    attack(name, net.base, disk, heap, info.heap_end, info.ram_size)
}

#[panic_handler]
fn panic(_: &PanicInfo) -> ! {
    paravirt::exit(exit_codes::PANIC, b"hostile guest panicked")
}

/// The boot ABI crate links `alloc`, so there must be an allocator; this
/// image never allocates, and one that always fails keeps it honest.
struct NoHeap;

// SAFETY: `alloc` always reports failure (null), which GlobalAlloc allows;
// `dealloc` is never reached because nothing is ever allocated.
unsafe impl core::alloc::GlobalAlloc for NoHeap {
    unsafe fn alloc(&self, _: core::alloc::Layout) -> *mut u8 {
        core::ptr::null_mut()
    }

    unsafe fn dealloc(&self, _: *mut u8, _: core::alloc::Layout) {}
}

#[global_allocator]
static HEAP: NoHeap = NoHeap;

/// Named by the prebuilt `core` for this target; never called (`panic = "abort"`).
#[unsafe(no_mangle)]
extern "C" fn rust_eh_personality() {}

/// Likewise referenced by the prebuilt `alloc`; no unwinding ever starts.
#[unsafe(no_mangle)]
extern "C" fn _Unwind_Resume() -> ! {
    paravirt::exit(exit_codes::PANIC, b"unwinding is not supported")
}
