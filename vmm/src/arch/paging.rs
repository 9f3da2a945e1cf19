//! The guest's identity-mapped page tables.
//!
//! Owns the 4-level tables the vCPU starts with: guest-physical equals
//! guest-virtual, every mapping user-accessible (the guest runs at CPL 3). The
//! first 2 MiB use small pages so that the null page and the gap between the
//! system area and the stack stay unmapped and fault; RAM above uses 2 MiB
//! pages. Pure data: building the tables never touches guest memory.

use mqvisor_boot_abi::layout::{
    DEVICE_WINDOW, LARGE_PAGE_SIZE, PAGE_SIZE, PD_BASE, PD_COUNT, PDPT, PML4, PT_LOW, STACK_BOTTOM, SYSTEM_END,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const LARGE: u64 = 1 << 7;
const TABLE: u64 = PRESENT | WRITABLE | USER;

const ENTRIES: usize = 512;
#[allow(clippy::cast_possible_truncation)] // 4
const PD_COUNT_USIZE: usize = PD_COUNT as usize;

/// The full set of tables, ready to be written at their ABI addresses.
pub struct PageTables {
    pml4: [u64; ENTRIES],
    pdpt: [u64; ENTRIES],
    pds: [[u64; ENTRIES]; PD_COUNT_USIZE],
    pt_low: [u64; ENTRIES],
}

impl PageTables {
    /// Identity-maps `[0, ram_size)` (rounded up to 2 MiB), minus the holes.
    /// `ram_size` must not exceed the 4 GiB the page directories cover.
    pub fn identity(ram_size: u64) -> PageTables {
        let mut tables = PageTables {
            pml4: [0; ENTRIES],
            pdpt: [0; ENTRIES],
            pds: [[0; ENTRIES]; PD_COUNT_USIZE],
            pt_low: [0; ENTRIES],
        };
        tables.pml4[0] = PDPT | TABLE;
        for (i, entry) in tables.pdpt.iter_mut().take(PD_COUNT_USIZE).enumerate() {
            *entry = (PD_BASE + i as u64 * PAGE_SIZE) | TABLE;
        }
        tables.pds[0][0] = PT_LOW | TABLE;
        for (i, entry) in tables.pt_low.iter_mut().enumerate() {
            let addr = i as u64 * PAGE_SIZE;
            let mapped = (PAGE_SIZE..SYSTEM_END).contains(&addr) || addr >= STACK_BOTTOM;
            if mapped {
                *entry = addr | PRESENT | WRITABLE | USER;
            }
        }
        let large_pages = ram_size.div_ceil(LARGE_PAGE_SIZE).min(PD_COUNT * ENTRIES as u64);
        for page in 1..large_pages {
            // page < PD_COUNT * 512 = 2048: the casts are exact and both
            // indices are in range.
            #[allow(clippy::cast_possible_truncation)]
            let (pd, index) = (page as usize / ENTRIES, page as usize % ENTRIES);
            tables.pds[pd][index] = (page * LARGE_PAGE_SIZE) | PRESENT | WRITABLE | USER | LARGE;
        }
        // The device window: one 2 MiB page, not backed by RAM, so every
        // access is an MMIO exit to the device model.
        let page = DEVICE_WINDOW / LARGE_PAGE_SIZE;
        #[allow(clippy::cast_possible_truncation)] // DEVICE_WINDOW < 4 GiB: page < 2048.
        let (pd, index) = (page as usize / ENTRIES, page as usize % ENTRIES);
        tables.pds[pd][index] = DEVICE_WINDOW | PRESENT | WRITABLE | USER | LARGE;
        tables
    }

    /// Writes the tables at their ABI addresses.
    pub fn write_to(&self, mem: &GuestMemoryMmap) -> Result<(), GuestMemoryError> {
        let as_bytes = |table: &[u64; ENTRIES]| -> Vec<u8> { table.iter().flat_map(|e| e.to_le_bytes()).collect() };
        mem.write_slice(&as_bytes(&self.pml4), GuestAddress(PML4))?;
        mem.write_slice(&as_bytes(&self.pdpt), GuestAddress(PDPT))?;
        for (i, pd) in self.pds.iter().enumerate() {
            mem.write_slice(&as_bytes(pd), GuestAddress(PD_BASE + i as u64 * PAGE_SIZE))?;
        }
        mem.write_slice(&as_bytes(&self.pt_low), GuestAddress(PT_LOW))
    }

    /// Walks the tables like the MMU: the physical address `virt` maps to and
    /// whether CPL 3 may use it, or `None` if unmapped.
    #[cfg(test)]
    fn translate(&self, virt: u64) -> Option<(u64, bool)> {
        let index = |shift: u32| ((virt >> shift) & 0x1ff) as usize;
        let table_at = |entry: u64| entry & !0xfff;
        let pml4e = self.pml4[index(39)];
        if pml4e & PRESENT == 0 || table_at(pml4e) != PDPT {
            return None;
        }
        let pdpte = self.pdpt[index(30)];
        if pdpte & PRESENT == 0 {
            return None;
        }
        let pd = &self.pds[((table_at(pdpte) - PD_BASE) / PAGE_SIZE) as usize];
        let pde = pd[index(21)];
        if pde & PRESENT == 0 {
            return None;
        }
        let mut user = pml4e & pdpte & pde & USER != 0;
        if pde & LARGE != 0 {
            return Some(((pde & !0x1f_ffff & !LARGE) + (virt & 0x1f_ffff), user));
        }
        assert_eq!(table_at(pde), PT_LOW);
        let pte = self.pt_low[index(12)];
        if pte & PRESENT == 0 {
            return None;
        }
        user &= pte & USER != 0;
        Some(((pte & !0xfff) + (virt & 0xfff), user))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqvisor_boot_abi::layout::{BOOT_INFO, IMAGE_BASE, PARAVIRT, STACK_TOP};

    #[test]
    fn ram_is_identity_mapped_for_user_mode() {
        let ram = 32 << 20;
        let tables = PageTables::identity(ram);
        for addr in [PML4, BOOT_INFO, PARAVIRT + 8, STACK_BOTTOM, STACK_TOP - 8, IMAGE_BASE, ram - 8] {
            assert_eq!(tables.translate(addr), Some((addr, true)), "{addr:#x}");
        }
    }

    #[test]
    fn null_page_stack_guard_and_beyond_ram_are_unmapped() {
        let ram = 32 << 20;
        let tables = PageTables::identity(ram);
        for addr in [0, 8, SYSTEM_END, STACK_BOTTOM - 8, ram, ram + LARGE_PAGE_SIZE, 1 << 40] {
            assert_eq!(tables.translate(addr), None, "{addr:#x}");
        }
    }

    #[test]
    fn the_device_window_is_mapped() {
        let tables = PageTables::identity(32 << 20);
        assert_eq!(tables.translate(DEVICE_WINDOW + 0x50), Some((DEVICE_WINDOW + 0x50, true)));
        assert_eq!(tables.translate(DEVICE_WINDOW - 8), None);
    }

    #[test]
    fn large_ram_spans_several_page_directories() {
        let ram = 3 << 30;
        let tables = PageTables::identity(ram);
        assert_eq!(tables.translate((2 << 30) + 0x1234), Some(((2 << 30) + 0x1234, true)));
        assert_eq!(tables.translate(ram - 1), Some((ram - 1, true)));
        assert_eq!(tables.translate(ram), None);
    }

    #[test]
    fn ram_not_a_multiple_of_2_mib_rounds_up() {
        let tables = PageTables::identity((4 << 20) + 4096);
        assert!(tables.translate((4 << 20) + 8).is_some());
        assert_eq!(tables.translate(6 << 20), None);
    }
}
