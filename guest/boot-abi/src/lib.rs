//! The boot ABI between the mqvisor VMM and its unikernel guest.
//!
//! This crate owns the contract both sides compile against: the guest-physical
//! memory layout at entry, the boot-info page, the paravirtual I/O ports and
//! the shared page they exchange data through, and the codec of the tenant's
//! broker settings ([`config_blob`]) and the framing of client streams over
//! the virtual link ([`streams`]). Both sides run the same code for
//! everything they exchange: nothing here may be interpreted differently by
//! the VMM and the guest.
//!
//! # Entry state
//!
//! The vCPU starts in 64-bit mode at CPL 3 with RFLAGS.IOPL = 3 (so `in`/`out`
//! work) and interrupts disabled. Guest RAM starts at guest-physical 0 and is
//! identity mapped; the pages below [`layout::STACK_BOTTOM`] other than the
//! system area are left unmapped so that null dereferences and stack overflows
//! fault. RIP is the ELF entry, RSP is [`layout::STACK_TOP`] minus 8 (as if a
//! `call` had pushed a return address) and RDI holds [`layout::BOOT_INFO`].
//!
//! # Ports
//!
//! Every `out` costs a VM exit (~30 µs on nested hypervisors), so data travels
//! through [`ParavirtPage`] and the port write only says "look now".

// Non-test code never unwraps, expects or panics: every failure is a value
// the caller reports (tests may: see clippy.toml).
#![warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![no_std]
#![deny(missing_docs)]

extern crate alloc;

/// `BootInfo::magic`: "MQVBOOT1" in little-endian byte order.
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"MQVBOOT1");
/// `BootInfo::version`; bumped on any layout change.
pub const BOOT_INFO_VERSION: u32 = 7;

/// Guest-physical memory layout at entry.
pub mod layout {
    /// Size of a small page.
    pub const PAGE_SIZE: u64 = 0x1000;
    /// Size of a large page, the unit of the identity map above 2 MiB.
    pub const LARGE_PAGE_SIZE: u64 = 0x20_0000;
    /// Page-map level 4 table.
    pub const PML4: u64 = 0x1000;
    /// The single page-directory-pointer table (covers 512 GiB).
    pub const PDPT: u64 = 0x2000;
    /// First of [`PD_COUNT`] consecutive page directories (1 GiB each).
    pub const PD_BASE: u64 = 0x3000;
    /// Number of page directories: the identity map covers 4 GiB.
    pub const PD_COUNT: u64 = 4;
    /// Page table for the first 2 MiB, mapped with small pages so that the
    /// null page and the stack guard can stay unmapped.
    pub const PT_LOW: u64 = 0x7000;
    /// Global descriptor table (and the TSS right after it).
    pub const GDT: u64 = 0x8000;
    /// The boot-info page(s): a [`crate::BootInfo`].
    pub const BOOT_INFO: u64 = 0x9000;
    /// The shared page behind the paravirtual ports: a [`crate::ParavirtPage`].
    pub const PARAVIRT: u64 = 0xB000;
    /// End of the system area; `[SYSTEM_END, STACK_BOTTOM)` is the guard gap.
    pub const SYSTEM_END: u64 = 0xC000;
    /// Lowest stack address; the pages just below it are unmapped.
    pub const STACK_BOTTOM: u64 = 0x1_0000;
    /// Initial stack top (exclusive).
    pub const STACK_TOP: u64 = 0x20_0000;
    /// Lowest address an image may load at.
    pub const IMAGE_BASE: u64 = 0x20_0000;
    /// Guest RAM must end at or below this address (start of the device hole).
    pub const RAM_LIMIT: u64 = 0xC000_0000;
    /// The 2 MiB window holding the virtio-mmio devices, one page each.
    pub const DEVICE_WINDOW: u64 = 0xD000_0000;
    /// Size of one device's MMIO region.
    pub const DEVICE_SIZE: u64 = 0x1000;
}

/// What the guest runs, chosen by the VMM.
pub mod service {
    /// Print the banner, prove the timer, exit (no network).
    pub const DEMO: u32 = 0;
    /// Echo every client stream on the link back to its sender.
    pub const ECHO: u32 = 1;
    /// Serve MQTT to every client stream on the link.
    pub const MQTT: u32 = 2;
}

/// Paravirtual I/O ports. A 32-bit `out` to one of them exits to the VMM.
///
/// Ports are 4 apart because a 32-bit access to port `p` uses ports `p..p+4`
/// as far as the I/O permission bitmap is concerned.
pub mod ports {
    /// Width in bytes of every paravirtual port access.
    pub const WIDTH: u16 = 4;
    /// Write `ParavirtPage::len` bytes of `ParavirtPage::data` to the console.
    pub const CONSOLE: u16 = 0x510;
    /// End the VM. The value is the exit code; `ParavirtPage::data[..len]` is
    /// an optional UTF-8 message (a panic message, for example).
    pub const EXIT: u16 = 0x514;
    /// Park the vCPU for at most `ParavirtPage::wait_ns` nanoseconds, or until
    /// the VMM has work for the guest. The value written is ignored.
    pub const WAIT: u16 = 0x518;
    /// All of them, for the VMM's I/O permission bitmap.
    pub const ALL: [u16; 3] = [CONSOLE, EXIT, WAIT];
}

/// Exit codes with a meaning of their own.
pub mod exit_codes {
    /// The guest panicked (the same code a Rust process uses).
    pub const PANIC: u32 = 101;
}

/// How the broker keeps its state ([`BootInfo::persistence`]).
pub mod persistence {
    /// In RAM only: lost when the VM ends.
    pub const OFF: u32 = 0;
    /// Every acknowledgement waits until its records are flushed.
    pub const SYNC: u32 = 1;
    /// Records are flushed every `persistence_batch_ms`; acknowledgements
    /// do not wait, so that long a window can be lost.
    pub const BATCH: u32 = 2;
}

/// Kinds of device in [`BootInfo::devices`] (virtio device IDs).
pub mod device_kind {
    /// virtio-net (virtio 1.2, section 5.1).
    pub const VIRTIO_NET: u32 = 1;
    /// virtio-blk (virtio 1.2, section 5.2): the tenant's state file.
    pub const VIRTIO_BLK: u32 = 2;
}

/// Maximum number of devices in [`BootInfo::devices`].
pub const MAX_DEVICES: usize = 8;
/// Capacity of [`BootInfo::cmdline`] in bytes.
pub const CMDLINE_CAPACITY: usize = 1024;

/// One memory-mapped device the guest may drive.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceDescriptor {
    /// Guest-physical base address of the MMIO window.
    pub base: u64,
    /// Size of the MMIO window in bytes.
    pub size: u64,
    /// One of [`device_kind`].
    pub kind: u32,
    /// Zero.
    pub reserved: u32,
}

/// The guest's side of the virtual link (valid when a virtio-net device is
/// present): the two ends' MAC addresses and the link's MTU. Client streams
/// cross the link as records in Ethernet frames ([`streams`]); no IP packet
/// does, so the link has no addresses or ports of its own.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetConfig {
    /// The guest's MAC address (also in the device's config space).
    pub guest_mac: [u8; 6],
    /// The VMM's MAC address on the link.
    pub host_mac: [u8; 6],
    /// MTU of the link: the largest frame payload (the frame less its
    /// Ethernet header) either side may send.
    pub mtu: u16,
    /// Zero.
    pub reserved: [u8; 2],
}

/// What the VMM tells the guest at boot. Lives at [`layout::BOOT_INFO`].
///
/// All fields are little-endian integers; there is no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// [`BOOT_INFO_VERSION`].
    pub version: u32,
    /// Number of valid entries in `devices`.
    pub device_count: u32,
    /// Size of guest RAM in bytes, starting at guest-physical 0.
    pub ram_size: u64,
    /// First byte of the heap (page aligned, above the image).
    pub heap_start: u64,
    /// One past the last byte of the heap.
    pub heap_end: u64,
    /// TSC frequency in kHz, as the VMM measured it.
    pub tsc_khz: u64,
    /// Unix time in nanoseconds when the VMM created the VM.
    pub boot_wall_clock_ns: u64,
    /// Host nanoseconds from VM creation to the first entry into the guest.
    pub setup_ns: u64,
    /// The guest's TSC just before the first entry, or 0 when the VMM could
    /// not read it. Lets the guest compute its own start-up latency.
    pub entry_tsc: u64,
    /// Devices, `device_count` of them valid.
    pub devices: [DeviceDescriptor; MAX_DEVICES],
    /// Number of valid bytes in `cmdline`.
    pub cmdline_len: u32,
    /// With [`persistence::BATCH`]: flush the state log at least this often.
    pub persistence_batch_ms: u32,
    /// Guest command line: space-separated UTF-8 words.
    pub cmdline: [u8; CMDLINE_CAPACITY],
    /// One of [`service`].
    pub service: u32,
    /// One of [`persistence`]: how the broker keeps its state on the
    /// virtio-blk device in `devices` (none without one).
    pub persistence: u32,
    /// The virtual link, when `devices` holds a virtio-net device.
    pub net: NetConfig,
    /// Guest-physical address of the service configuration blob (see
    /// [`config_blob`]), between the image and the heap; 0 if none.
    pub config_addr: u64,
    /// Its length in bytes (at most [`config_blob::MAX_LEN`]).
    pub config_len: u64,
    /// Fresh random bytes from the host's kernel: the guest has no source of
    /// its own (the state log's file key and log ids come from them).
    pub entropy: [u8; ENTROPY_LEN],
}

/// Size of [`BootInfo::entropy`].
pub const ENTROPY_LEN: usize = 32;

pub mod capacity;
pub mod config_blob;
pub mod streams;
pub mod wait;

impl Default for BootInfo {
    fn default() -> Self {
        BootInfo {
            magic: BOOT_INFO_MAGIC,
            version: BOOT_INFO_VERSION,
            device_count: 0,
            ram_size: 0,
            heap_start: 0,
            heap_end: 0,
            tsc_khz: 0,
            boot_wall_clock_ns: 0,
            setup_ns: 0,
            entry_tsc: 0,
            devices: [DeviceDescriptor::default(); MAX_DEVICES],
            cmdline_len: 0,
            persistence_batch_ms: 0,
            cmdline: [0; CMDLINE_CAPACITY],
            service: service::DEMO,
            persistence: persistence::OFF,
            net: NetConfig::default(),
            config_addr: 0,
            config_len: 0,
            entropy: [0; ENTROPY_LEN],
        }
    }
}

impl BootInfo {
    /// True when magic and version match what this crate describes.
    pub fn is_valid(&self) -> bool {
        self.magic == BOOT_INFO_MAGIC && self.version == BOOT_INFO_VERSION
    }

    /// The command line, clamped to the buffer; `None` if it is not UTF-8.
    pub fn cmdline(&self) -> Option<&str> {
        let len = (self.cmdline_len as usize).min(CMDLINE_CAPACITY);
        core::str::from_utf8(&self.cmdline[..len]).ok()
    }

    /// The structure's bytes, as the VMM writes them into guest memory.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: BootInfo is repr(C), made only of integers and integer
        // arrays, with no padding (its size is asserted below to be the sum of
        // its fields), so all of its bytes are initialised; the slice borrows
        // `self` for its whole lifetime.
        unsafe { core::slice::from_raw_parts((self as *const BootInfo).cast::<u8>(), core::mem::size_of::<BootInfo>()) }
    }

    /// The valid device entries, clamped to the array.
    pub fn devices(&self) -> &[DeviceDescriptor] {
        let count = (self.device_count as usize).min(MAX_DEVICES);
        &self.devices[..count]
    }
}

/// Capacity of [`ParavirtPage::data`] in bytes.
pub const PARAVIRT_DATA_CAPACITY: usize = 4096 - 16;

/// The page the paravirtual ports read their arguments from. Lives at
/// [`layout::PARAVIRT`]. The guest writes it, then writes the port.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ParavirtPage {
    /// For [`ports::WAIT`]: longest time to park, in nanoseconds. Relative,
    /// because the guest's TSC and the host's clock share no origin.
    pub wait_ns: u64,
    /// For [`ports::CONSOLE`] and [`ports::EXIT`]: valid bytes in `data`.
    pub len: u32,
    /// Zero.
    pub reserved: u32,
    /// Console bytes or the exit message.
    pub data: [u8; PARAVIRT_DATA_CAPACITY],
}

// The VMM reads and writes these structures as raw bytes, so their sizes are
// part of the ABI: a field added without updating the layout fails here.
const _: () = assert!(core::mem::size_of::<DeviceDescriptor>() == 24);
const _: () = assert!(core::mem::size_of::<NetConfig>() == 16);
const _: () = assert!(
    core::mem::size_of::<BootInfo>() == 72 + 24 * MAX_DEVICES + 8 + CMDLINE_CAPACITY + 8 + 16 + 16 + ENTROPY_LEN
);
const _: () = assert!(core::mem::size_of::<BootInfo>() as u64 <= layout::PARAVIRT - layout::BOOT_INFO);
const _: () = assert!(core::mem::size_of::<ParavirtPage>() as u64 == layout::PAGE_SIZE);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_spells_its_name() {
        assert_eq!(&BOOT_INFO_MAGIC.to_le_bytes(), b"MQVBOOT1");
    }

    #[test]
    fn system_area_is_ordered_and_page_aligned() {
        use layout::*;
        let areas = [PML4, PDPT, PD_BASE, PT_LOW, GDT, BOOT_INFO, PARAVIRT, SYSTEM_END];
        assert!(areas.windows(2).all(|w| w[0] < w[1]));
        assert!(areas.iter().all(|a| a % PAGE_SIZE == 0));
        assert_eq!(PD_BASE + PD_COUNT * PAGE_SIZE, PT_LOW);
        const { assert!(SYSTEM_END < STACK_BOTTOM && STACK_TOP <= IMAGE_BASE) };
        const { assert!(RAM_LIMIT <= PD_COUNT << 30) };
    }

    #[test]
    fn hostile_lengths_are_clamped() {
        let mut info = BootInfo { cmdline_len: u32::MAX, device_count: u32::MAX, ..BootInfo::default() };
        info.cmdline[0] = b'x';
        assert_eq!(info.cmdline().map(str::len), Some(CMDLINE_CAPACITY));
        assert_eq!(info.devices().len(), MAX_DEVICES);
        info.cmdline[1] = 0xff;
        assert_eq!(info.cmdline(), None);
    }

    #[test]
    fn bytes_are_the_little_endian_fields() {
        let info = BootInfo { ram_size: 0x0102_0304, ..BootInfo::default() };
        let bytes = info.as_bytes();
        assert_eq!(bytes.len(), core::mem::size_of::<BootInfo>());
        assert_eq!(&bytes[..8], b"MQVBOOT1");
        assert_eq!(&bytes[16..24], &0x0102_0304u64.to_le_bytes());
    }

    #[test]
    fn default_is_valid() {
        assert!(BootInfo::default().is_valid());
        let bad = BootInfo { version: BOOT_INFO_VERSION + 1, ..BootInfo::default() };
        assert!(!bad.is_valid());
    }
}
