//! x86-64 entry state: the vCPU starts in 64-bit mode at CPL 3.
//!
//! Owns everything KVM needs before the first KVM_RUN: page tables and GDT in
//! guest memory, CPUID, special registers, general registers and the FPU. The
//! state is the boot ABI's "entry state" (see `mqvisor-boot-abi`); this module
//! must never leave the guest able to run CPL 0 code: no IDT is installed, so
//! any exception escalates to a triple fault that the VMM reports.

mod gdt;
mod paging;

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_fpu, kvm_regs};
use kvm_ioctls::{Kvm, VcpuFd};
use mqvisor_boot_abi::{layout, ports};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

pub use paging::PageTables;

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Bit 1 of RFLAGS is reserved and reads as one.
const RFLAGS_RESERVED: u64 = 1 << 1;
/// I/O privilege level 3: `in`/`out` are allowed at CPL 3.
const RFLAGS_IOPL3: u64 = 3 << 12;
/// x87 control word and MXCSR after FNINIT / reset: all exceptions masked.
const FCW_DEFAULT: u16 = 0x37f;
const MXCSR_DEFAULT: u32 = 0x1f80;

/// A step of vCPU set-up that failed.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    /// Writing page tables or the GDT into guest memory.
    #[error("writing {what} into guest memory: {source}")]
    Memory { what: &'static str, source: GuestMemoryError },
    /// A KVM ioctl.
    #[error("{what}: {source}")]
    Kvm { what: &'static str, source: kvm_ioctls::Error },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> ArchError {
    move |source| ArchError::Kvm { what, source }
}

fn memory(what: &'static str) -> impl FnOnce(GuestMemoryError) -> ArchError {
    move |source| ArchError::Memory { what, source }
}

/// Writes the system tables into `mem` and puts `vcpu` at `entry`, in 64-bit
/// CPL 3 with RDI = boot-info and the stack at the ABI's stack top.
pub fn configure_vcpu(
    kvm_handle: &Kvm,
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    ram_size: u64,
    entry: u64,
) -> Result<(), ArchError> {
    PageTables::identity(ram_size).write_to(mem).map_err(memory("page tables"))?;
    let table = gdt::table();
    let encoded: Vec<u8> = table.iter().flat_map(|d| d.encode().to_le_bytes()).collect();
    mem.write_slice(&encoded, GuestAddress(layout::GDT)).map_err(memory("GDT"))?;
    let tss = gdt::tss(&ports::ALL, ports::WIDTH);
    mem.write_slice(&tss, GuestAddress(layout::GDT + gdt::TSS_OFFSET)).map_err(memory("TSS"))?;

    let cpuid = kvm_handle.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm("KVM_GET_SUPPORTED_CPUID"))?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;

    let mut sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let user_code = gdt::selector(gdt::USER_CODE, 3);
    let user_data = gdt::selector(gdt::USER_DATA, 3);
    sregs.cs = table[usize::from(gdt::USER_CODE)].to_kvm_segment(user_code);
    let data = table[usize::from(gdt::USER_DATA)].to_kvm_segment(user_data);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = table[usize::from(gdt::TSS)].to_kvm_segment(gdt::selector(gdt::TSS, 0));
    sregs.gdt.base = layout::GDT;
    sregs.gdt.limit = gdt::LIMIT;
    // No IDT: an exception cannot be delivered and becomes a triple fault.
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = layout::PML4;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;

    let fpu = kvm_fpu { fcw: FCW_DEFAULT, mxcsr: MXCSR_DEFAULT, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;

    let regs = kvm_regs {
        rip: entry,
        // As if a `call` had pushed a return address: RSP + 8 is 16-aligned.
        rsp: layout::STACK_TOP - 8,
        rdi: layout::BOOT_INFO,
        rflags: RFLAGS_RESERVED | RFLAGS_IOPL3,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))
}
