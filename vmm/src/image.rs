//! Guest images: checking an ELF before it goes anywhere near guest memory,
//! then loading it with `linux-loader`.
//!
//! Owns the rules an image must satisfy: 64-bit little-endian x86-64 `EXEC`,
//! every loadable segment inside `[IMAGE_BASE, ram_size)`, the entry point
//! inside an executable segment. `linux-loader` checks the header's shape but
//! not where segments land; this module must never hand it an image whose
//! segments it has not checked, so a bad image gets a precise error instead of
//! a write into the system area or a vague "could not read kernel image".

use std::io::Cursor;
use std::mem::size_of;

use linux_loader::elf::{
    EI_CLASS, EI_DATA, ELFCLASS64, ELFDATA2LSB, ELFMAG0, ELFMAG1, ELFMAG2, ELFMAG3, EM_X86_64, ET_EXEC, Elf64_Ehdr,
    Elf64_Phdr, PF_X, PT_LOAD,
};
use linux_loader::loader::{KernelLoader, elf::Elf};
use mqvisor_boot_abi::layout;
use vm_memory::{ByteValued, GuestMemoryMmap};

/// Why an image cannot be run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    /// Too short to hold an ELF header, or the magic is wrong.
    #[error("not an ELF file")]
    NotElf,
    /// 32-bit, big-endian, or another machine.
    #[error("not an x86-64 little-endian 64-bit ELF (class {class}, data {data}, machine {machine})")]
    WrongArchitecture { class: u8, data: u8, machine: u16 },
    /// A shared object or relocatable: the guest must be a static executable.
    #[error("ELF type {0} is not a static executable (ET_EXEC); link with -static -no-pie")]
    NotExecutable(u16),
    /// The program header table lies outside the file or has the wrong entry size.
    #[error("ELF program header table is malformed")]
    BadProgramHeaders,
    /// A segment's file bytes lie outside the file.
    #[error("segment {index} claims file bytes {offset:#x}+{size:#x} beyond the end of the file")]
    SegmentOutsideFile { index: usize, offset: u64, size: u64 },
    /// A segment would load below the image base or beyond guest RAM.
    #[error(
        "segment {index} loads at {start:#x}..{end:#x}, outside guest RAM available to images \
         ({base:#x}..{ram_end:#x})"
    )]
    SegmentOutsideRam { index: usize, start: u64, end: u64, base: u64, ram_end: u64 },
    /// No loadable segment at all.
    #[error("ELF has no loadable segments")]
    NoSegments,
    /// The entry point is not inside an executable loaded segment.
    #[error("entry point {0:#x} is not inside an executable segment")]
    BadEntry(u64),
    /// `linux-loader` refused the image after our checks passed.
    #[error("loading the image failed: {0}")]
    Load(String),
}

/// Where a checked image sits in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLayout {
    /// Entry point (guest-physical == guest-virtual).
    pub entry: u64,
    /// One past the highest byte any segment occupies (including `.bss`).
    pub end: u64,
}

fn read_struct<T: ByteValued + Default>(bytes: &[u8], offset: u64) -> Option<T> {
    let start = usize::try_from(offset).ok()?;
    let src = bytes.get(start..start.checked_add(size_of::<T>())?)?;
    let mut value = T::default();
    value.as_mut_slice().copy_from_slice(src);
    Some(value)
}

/// Checks `bytes` as an image for a guest with `ram_size` bytes of RAM.
pub fn check(bytes: &[u8], ram_size: u64) -> Result<ImageLayout, ImageError> {
    let ehdr: Elf64_Ehdr = read_struct(bytes, 0).ok_or(ImageError::NotElf)?;
    let ident = ehdr.e_ident;
    if [ident[0], ident[1], ident[2], ident[3]] != [ELFMAG0, ELFMAG1, ELFMAG2, ELFMAG3] {
        return Err(ImageError::NotElf);
    }
    if ident[EI_CLASS] != ELFCLASS64 || ident[EI_DATA] != ELFDATA2LSB || ehdr.e_machine != EM_X86_64 {
        return Err(ImageError::WrongArchitecture {
            class: ident[EI_CLASS],
            data: ident[EI_DATA],
            machine: ehdr.e_machine,
        });
    }
    if ehdr.e_type != ET_EXEC {
        return Err(ImageError::NotExecutable(ehdr.e_type));
    }
    if usize::from(ehdr.e_phentsize) != size_of::<Elf64_Phdr>() {
        return Err(ImageError::BadProgramHeaders);
    }

    let mut end = 0u64;
    let mut loads = 0usize;
    let mut entry_ok = false;
    for index in 0..usize::from(ehdr.e_phnum) {
        let offset = (index as u64)
            .checked_mul(size_of::<Elf64_Phdr>() as u64)
            .and_then(|o| o.checked_add(ehdr.e_phoff))
            .ok_or(ImageError::BadProgramHeaders)?;
        let phdr: Elf64_Phdr = read_struct(bytes, offset).ok_or(ImageError::BadProgramHeaders)?;
        if phdr.p_type != PT_LOAD {
            continue;
        }
        loads += 1;
        let file_end = phdr.p_offset.checked_add(phdr.p_filesz);
        if file_end.is_none_or(|e| e > bytes.len() as u64) || phdr.p_filesz > phdr.p_memsz {
            return Err(ImageError::SegmentOutsideFile { index, offset: phdr.p_offset, size: phdr.p_filesz });
        }
        let start = phdr.p_paddr;
        let seg_end = start.checked_add(phdr.p_memsz);
        let Some(seg_end) = seg_end.filter(|&e| start >= layout::IMAGE_BASE && e <= ram_size) else {
            return Err(ImageError::SegmentOutsideRam {
                index,
                start,
                end: start.saturating_add(phdr.p_memsz),
                base: layout::IMAGE_BASE,
                ram_end: ram_size,
            });
        };
        end = end.max(seg_end);
        if phdr.p_flags & PF_X != 0 && (start..seg_end).contains(&ehdr.e_entry) {
            entry_ok = true;
        }
    }
    if loads == 0 {
        return Err(ImageError::NoSegments);
    }
    if !entry_ok {
        return Err(ImageError::BadEntry(ehdr.e_entry));
    }
    Ok(ImageLayout { entry: ehdr.e_entry, end })
}

/// Checks `bytes` against `mem`'s size and copies its segments into `mem`.
/// Memory is fresh and zeroed, so `.bss` needs no clearing.
pub fn load(bytes: &[u8], mem: &GuestMemoryMmap, ram_size: u64) -> Result<ImageLayout, ImageError> {
    let image = check(bytes, ram_size)?;
    Elf::load(mem, None, &mut Cursor::new(bytes), Some(vm_memory::GuestAddress(layout::IMAGE_BASE)))
        .map_err(|e| ImageError::Load(e.to_string()))?;
    Ok(image)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const RAM: u64 = 32 << 20;

    /// A minimal valid image: one executable segment at the image base.
    pub(crate) fn tiny_elf() -> Vec<u8> {
        let code = [0xf4u8; 16];
        let phoff = size_of::<Elf64_Ehdr>() as u64;
        let data_off = phoff + size_of::<Elf64_Phdr>() as u64;
        let mut ehdr = Elf64_Ehdr::default();
        ehdr.e_ident[..4].copy_from_slice(&[ELFMAG0, ELFMAG1, ELFMAG2, ELFMAG3]);
        ehdr.e_ident[EI_CLASS] = ELFCLASS64;
        ehdr.e_ident[EI_DATA] = ELFDATA2LSB;
        ehdr.e_ident[6] = 1;
        ehdr.e_type = ET_EXEC;
        ehdr.e_machine = EM_X86_64;
        ehdr.e_version = 1;
        ehdr.e_entry = layout::IMAGE_BASE;
        ehdr.e_phoff = phoff;
        ehdr.e_ehsize = u16::try_from(size_of::<Elf64_Ehdr>()).unwrap();
        ehdr.e_phentsize = u16::try_from(size_of::<Elf64_Phdr>()).unwrap();
        ehdr.e_phnum = 1;
        let phdr = Elf64_Phdr {
            p_type: PT_LOAD,
            p_flags: PF_X | 4,
            p_offset: data_off,
            p_vaddr: layout::IMAGE_BASE,
            p_paddr: layout::IMAGE_BASE,
            p_filesz: code.len() as u64,
            p_memsz: 0x1000,
            p_align: 0x1000,
        };
        let mut bytes = ehdr.as_slice().to_vec();
        bytes.extend_from_slice(phdr.as_slice());
        bytes.extend_from_slice(&code);
        bytes
    }

    fn with_phdr(f: impl FnOnce(&mut Elf64_Phdr)) -> Vec<u8> {
        let mut bytes = tiny_elf();
        let off = size_of::<Elf64_Ehdr>();
        let mut phdr: Elf64_Phdr = read_struct(&bytes, off as u64).unwrap();
        f(&mut phdr);
        bytes[off..off + size_of::<Elf64_Phdr>()].copy_from_slice(phdr.as_slice());
        bytes
    }

    #[test]
    fn accepts_a_minimal_executable() {
        let layout = check(&tiny_elf(), RAM).unwrap();
        assert_eq!(layout, ImageLayout { entry: layout::IMAGE_BASE, end: layout::IMAGE_BASE + 0x1000 });
    }

    #[test]
    fn refuses_non_elf_and_truncated_files() {
        assert_eq!(check(b"#!/bin/sh\necho hi\n", RAM), Err(ImageError::NotElf));
        assert_eq!(check(&[], RAM), Err(ImageError::NotElf));
        assert_eq!(check(&tiny_elf()[..40], RAM), Err(ImageError::NotElf));
    }

    #[test]
    fn refuses_other_architectures() {
        let mut arm = tiny_elf();
        arm[18] = 183; // EM_AARCH64
        assert!(matches!(check(&arm, RAM), Err(ImageError::WrongArchitecture { machine: 183, .. })));
        let mut elf32 = tiny_elf();
        elf32[EI_CLASS] = 1;
        assert!(matches!(check(&elf32, RAM), Err(ImageError::WrongArchitecture { class: 1, .. })));
    }

    #[test]
    fn refuses_shared_objects() {
        let mut dynamic = tiny_elf();
        dynamic[16] = 3; // ET_DYN
        assert_eq!(check(&dynamic, RAM), Err(ImageError::NotExecutable(3)));
    }

    #[test]
    fn refuses_segments_outside_ram_or_in_the_system_area() {
        let high = with_phdr(|p| p.p_paddr = RAM - 0x100);
        assert!(matches!(check(&high, RAM), Err(ImageError::SegmentOutsideRam { .. })));
        let low = with_phdr(|p| p.p_paddr = layout::BOOT_INFO);
        assert!(matches!(check(&low, RAM), Err(ImageError::SegmentOutsideRam { .. })));
        let wrapping = with_phdr(|p| p.p_memsz = u64::MAX);
        assert!(matches!(check(&wrapping, RAM), Err(ImageError::SegmentOutsideRam { .. })));
    }

    #[test]
    fn refuses_segments_beyond_the_file() {
        let long = with_phdr(|p| p.p_filesz = 0x10_0000);
        assert!(matches!(check(&long, RAM), Err(ImageError::SegmentOutsideFile { .. })));
        let wrapping = with_phdr(|p| p.p_offset = u64::MAX);
        assert!(matches!(check(&wrapping, RAM), Err(ImageError::SegmentOutsideFile { .. })));
    }

    #[test]
    fn refuses_an_entry_outside_code() {
        let no_exec = with_phdr(|p| p.p_flags = 4);
        assert_eq!(check(&no_exec, RAM), Err(ImageError::BadEntry(layout::IMAGE_BASE)));
    }

    #[test]
    fn refuses_a_program_header_table_past_the_end() {
        let mut bytes = tiny_elf();
        bytes[32..40].copy_from_slice(&u64::MAX.to_le_bytes()); // e_phoff
        assert_eq!(check(&bytes, RAM), Err(ImageError::BadProgramHeaders));
    }
}
