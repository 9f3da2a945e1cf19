//! The guest heap: `linked_list_allocator` over the range boot-info gives.
//!
//! Owns the global allocator. Must be initialised exactly once, before the
//! first allocation; an allocation failure ends the VM with a message.

use linked_list_allocator::LockedHeap;
use mqvisor_boot_abi::{BootInfo, layout};

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

/// Why the heap range from boot-info cannot be used.
#[derive(Debug)]
pub enum HeapError {
    /// The range is empty, inverted, or outside RAM / below the image base.
    BadRange { start: u64, end: u64 },
}

impl core::fmt::Display for HeapError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            HeapError::BadRange { start, end } => {
                write!(f, "heap range {start:#x}..{end:#x} is not usable RAM")
            }
        }
    }
}

/// Hands the boot-info heap range to the allocator; returns its size.
pub fn init(info: &BootInfo) -> Result<usize, HeapError> {
    let (start, end) = (info.heap_start, info.heap_end);
    if start < layout::IMAGE_BASE || end <= start || end > info.ram_size {
        return Err(HeapError::BadRange { start, end });
    }
    let size = usize::try_from(end - start).map_err(|_| HeapError::BadRange { start, end })?;
    // SAFETY: the VMM reserves [heap_start, heap_end) for the heap: it lies in
    // mapped RAM above the loaded image (checked above against RAM and the
    // image base) and nothing else uses it. `init` is called once, at boot.
    unsafe { HEAP.lock().init(start as *mut u8, size) };
    Ok(size)
}

/// Bytes currently free in the heap.
pub fn free_bytes() -> usize {
    HEAP.lock().free()
}
