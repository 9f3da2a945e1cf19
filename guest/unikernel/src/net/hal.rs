//! The `virtio-drivers` hardware abstraction for this guest.
//!
//! Owns how the driver gets DMA memory and device addresses. The guest runs
//! on an identity map (guest-virtual == guest-physical) with no IOMMU, so DMA
//! memory is ordinary heap memory and sharing a buffer is just naming its
//! address. Must never hand the device memory outside guest RAM.

use core::alloc::Layout;
use core::ptr::NonNull;

use virtio_drivers::{BufferDirection, Hal, PAGE_SIZE, PhysAddr};

/// The HAL; a type with no state.
pub struct GuestHal;

fn pages_layout(pages: usize) -> Layout {
    // PAGE_SIZE is a power of two; a size overflow is impossible for the
    // page counts a virtqueue asks for, and would be caught by from_size_align.
    Layout::from_size_align(pages.saturating_mul(PAGE_SIZE), PAGE_SIZE).unwrap_or(Layout::new::<u8>())
}

// SAFETY: `dma_alloc` returns zeroed, page-aligned, exclusively owned memory
// whose physical address equals its virtual one (identity map); `share`
// returns the buffer's own address for the same reason; nothing is cached or
// remapped, so `unshare` has nothing to copy back.
unsafe impl Hal for GuestHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        // SAFETY: the layout has a non-zero size (pages >= 1 for queues).
        let ptr = unsafe { alloc::alloc::alloc_zeroed(pages_layout(pages)) };
        let Some(ptr) = NonNull::new(ptr) else {
            crate::paravirt::exit(crate::EXIT_NO_MEMORY, b"out of memory allocating virtqueue memory");
        };
        (ptr.as_ptr() as PhysAddr, ptr)
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        // SAFETY: `vaddr` came from `dma_alloc` with the same page count.
        unsafe { alloc::alloc::dealloc(vaddr.as_ptr(), pages_layout(pages)) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).unwrap_or(NonNull::dangling())
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr().cast::<u8>() as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}
