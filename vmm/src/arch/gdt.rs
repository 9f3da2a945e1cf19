//! The guest's global descriptor table and the segment state that goes with it.
//!
//! Owns the descriptors for 64-bit user code and data (DPL 3, what the guest
//! runs on), the kernel pair the architecture expects to exist, and a TSS so
//! that TR is valid. The same table is written to guest memory and converted
//! to `kvm_segment`s for KVM_SET_SREGS, so the two views cannot disagree.

use kvm_bindings::kvm_segment;
use mqvisor_boot_abi::layout;

/// Descriptor attribute bits (SDM Vol. 3, 3.4.5), in the layout of bits 40..56.
const ACCESSED_CODE_RX: u16 = 0xb; // type: execute/read, accessed
const ACCESSED_DATA_RW: u16 = 0x3; // type: read/write, accessed
const BUSY_TSS64: u16 = 0xb;
const S: u16 = 1 << 4; // code or data (not system)
const DPL3: u16 = 3 << 5;
const P: u16 = 1 << 7;
const L: u16 = 1 << 13; // 64-bit code
const DB: u16 = 1 << 14;
const G: u16 = 1 << 15; // limit in 4 KiB units

/// Indices into the table.
pub const KERNEL_CODE: u16 = 1;
pub const KERNEL_DATA: u16 = 2;
pub const USER_DATA: u16 = 3;
pub const USER_CODE: u16 = 4;
/// A 64-bit TSS descriptor takes two slots.
pub const TSS: u16 = 5;
/// Number of 8-byte slots.
pub const ENTRIES: usize = 7;
/// The GDTR limit: the table's size in bytes minus one.
#[allow(clippy::cast_possible_truncation)] // 55
pub const LIMIT: u16 = (8 * ENTRIES - 1) as u16;

/// Where the TSS lives, relative to the GDT base.
pub const TSS_OFFSET: u64 = 0x100;
/// A 64-bit TSS is 104 bytes; the I/O permission bitmap follows it.
const TSS_HEADER_LEN: usize = 104;
/// Offset of the 16-bit I/O map base field in the TSS.
const TSS_IO_MAP_BASE: usize = 102;
/// Ports the bitmap covers: every paravirt port is below this.
const IO_BITMAP_PORTS: usize = 0x600;
/// Header, one bit per port, and the terminating all-ones byte the
/// architecture requires after the bitmap.
const TSS_LEN: usize = TSS_HEADER_LEN + IO_BITMAP_PORTS / 8 + 1;
/// The TSS limit (inclusive), so that the bitmap is inside the segment.
#[allow(clippy::cast_possible_truncation)] // TSS_LEN is 297.
pub const TSS_LIMIT: u32 = TSS_LEN as u32 - 1;

/// One segment descriptor, before encoding.
#[derive(Clone, Copy, Debug)]
pub struct Descriptor {
    pub flags: u16,
    pub base: u32,
    pub limit: u32,
}

impl Descriptor {
    /// The 8-byte encoding.
    pub fn encode(self) -> u64 {
        let (base, limit, flags) = (u64::from(self.base), u64::from(self.limit), u64::from(self.flags));
        ((base & 0xff00_0000) << 32)
            | ((base & 0x00ff_ffff) << 16)
            | (limit & 0xffff)
            | ((limit & 0xf_0000) << 32)
            | ((flags & 0xf0ff) << 40)
    }

    /// The KVM view of the descriptor loaded with `selector`.
    pub fn to_kvm_segment(self, selector: u16) -> kvm_segment {
        let bit = |mask: u16| u8::from(self.flags & mask != 0);
        let limit = if self.flags & G != 0 { (self.limit << 12) | 0xfff } else { self.limit };
        kvm_segment {
            base: u64::from(self.base),
            limit,
            selector,
            // Masked to 4 bits, so the narrowing is exact.
            type_: (self.flags & 0xf) as u8,
            present: bit(P),
            dpl: ((self.flags >> 5) & 3) as u8,
            db: bit(DB),
            s: bit(S),
            l: bit(L),
            g: bit(G),
            avl: 0,
            unusable: u8::from(self.flags & P == 0),
            padding: 0,
        }
    }
}

/// Where the TSS lives: right after the GDT, in the first MiB.
const TSS_BASE: u32 = {
    let base = layout::GDT + TSS_OFFSET;
    assert!(base + TSS_LIMIT as u64 <= layout::BOOT_INFO);
    #[allow(clippy::cast_possible_truncation)] // Asserted below the boot-info page.
    let base = base as u32;
    base
};

/// The table, for a GDT at `layout::GDT`.
pub fn table() -> [Descriptor; ENTRIES] {
    let flat = |flags| Descriptor { flags, base: 0, limit: 0xf_ffff };
    let null = Descriptor { flags: 0, base: 0, limit: 0 };
    let mut table = [null; ENTRIES];
    table[usize::from(KERNEL_CODE)] = flat(P | S | ACCESSED_CODE_RX | L | G);
    table[usize::from(KERNEL_DATA)] = flat(P | S | ACCESSED_DATA_RW | DB | G);
    table[usize::from(USER_DATA)] = flat(P | S | DPL3 | ACCESSED_DATA_RW | DB | G);
    table[usize::from(USER_CODE)] = flat(P | S | DPL3 | ACCESSED_CODE_RX | L | G);
    // The slot after TSS holds base bits 32..64: zero, as `null` leaves it.
    table[usize::from(TSS)] = Descriptor { flags: P | BUSY_TSS64, base: TSS_BASE, limit: TSS_LIMIT };
    table
}

/// The TSS image: zero stacks, and an I/O permission bitmap that opens
/// `width` ports from each of `open_ports` and nothing else.
///
/// Why a bitmap when RFLAGS.IOPL = 3: a pagetable-based hypervisor (PVM) runs
/// the guest with the hardware IOPL forced to 0 and copies the hardware flags
/// back on every exit, so after the first exit `out` raises #GP and KVM's
/// emulator decides by this bitmap (SDM Vol. 1, 19.5.2). On VT-x/AMD-V hosts
/// IOPL = 3 alone suffices; the bitmap is then unused.
pub fn tss(open_ports: &[u16], width: u16) -> [u8; TSS_LEN] {
    let mut tss = [0u8; TSS_LEN];
    let io_map_base = u16::try_from(TSS_HEADER_LEN).unwrap_or(u16::MAX);
    tss[TSS_IO_MAP_BASE..TSS_IO_MAP_BASE + 2].copy_from_slice(&io_map_base.to_le_bytes());
    let bitmap = &mut tss[TSS_HEADER_LEN..];
    bitmap.fill(0xff);
    for &first in open_ports {
        for port in usize::from(first)..usize::from(first) + usize::from(width) {
            assert!(port < IO_BITMAP_PORTS, "paravirt port {port:#x} outside the I/O bitmap");
            bitmap[port / 8] &= !(1 << (port % 8));
        }
    }
    tss
}

/// The selector for table index `index` with requested privilege `rpl`.
pub fn selector(index: u16, rpl: u16) -> u16 {
    (index << 3) | rpl
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_the_well_known_flat_descriptors() {
        let t = table();
        // The canonical values every x86-64 kernel uses.
        assert_eq!(t[KERNEL_CODE as usize].encode(), 0x00af_9b00_0000_ffff);
        assert_eq!(t[KERNEL_DATA as usize].encode(), 0x00cf_9300_0000_ffff);
        assert_eq!(t[USER_CODE as usize].encode(), 0x00af_fb00_0000_ffff);
        assert_eq!(t[USER_DATA as usize].encode(), 0x00cf_f300_0000_ffff);
    }

    #[test]
    fn user_segments_are_dpl3_and_64_bit() {
        let t = table();
        let cs = t[USER_CODE as usize].to_kvm_segment(selector(USER_CODE, 3));
        assert_eq!((cs.dpl, cs.l, cs.db, cs.present, cs.s, cs.type_), (3, 1, 0, 1, 1, 0xb));
        assert_eq!(cs.selector, 0x23);
        assert_eq!(cs.limit, 0xffff_ffff);
        let ss = t[USER_DATA as usize].to_kvm_segment(selector(USER_DATA, 3));
        assert_eq!((ss.dpl, ss.db, ss.type_, ss.selector), (3, 1, 3, 0x1b));
    }

    #[test]
    fn tss_points_after_the_table() {
        let tr = table()[TSS as usize].to_kvm_segment(selector(TSS, 0));
        assert_eq!((tr.base, tr.limit, tr.type_, tr.s, tr.present), (0x8100, TSS_LIMIT, 0xb, 0, 1));
    }

    /// What the CPU (or KVM's emulator) checks for a `len`-byte `out` to
    /// `port`: two bytes read at `io_map_base + port / 8` inside the limit,
    /// the bits of ports `port..port + len` all clear.
    fn port_allowed(tss: &[u8], port: u16, len: u16) -> bool {
        let base = usize::from(u16::from_le_bytes([tss[TSS_IO_MAP_BASE], tss[TSS_IO_MAP_BASE + 1]]));
        let at = base + usize::from(port) / 8;
        if at + 1 > TSS_LIMIT as usize {
            return false;
        }
        let perm = u16::from_le_bytes([tss[at], tss[at + 1]]);
        perm >> (port % 8) & ((1 << len) - 1) == 0
    }

    #[test]
    fn io_bitmap_opens_exactly_the_given_ports() {
        let tss = tss(&[0x510, 0x518], 4);
        assert!(port_allowed(&tss, 0x510, 4));
        assert!(port_allowed(&tss, 0x518, 4));
        assert!(port_allowed(&tss, 0x513, 1));
        for denied in [0x0, 0x3f8, 0x50f, 0x511, 0x514, 0x5ff, 0x600, 0xffff] {
            assert!(!port_allowed(&tss, denied, 4), "{denied:#x}");
        }
        assert!(!port_allowed(&tss, 0x514, 1));
        assert_eq!(*tss.last().unwrap(), 0xff);
    }
}
