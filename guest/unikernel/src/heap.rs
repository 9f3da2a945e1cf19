//! The guest heap: `dlmalloc` over the range boot-info gives, handed to it
//! front to back as it asks (so pages are touched, and cost the host, only
//! once used).
//!
//! Owns the global allocator and its accounting (bytes in use, for the
//! broker's memory budget). Must be initialised exactly once, before the
//! first allocation. Why dlmalloc: its binned free lists keep allocation
//! time flat however many connections are held; a first-fit list walked
//! every hole left by thousands of connections on every allocation.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use dlmalloc::Dlmalloc;
use mqvisor_boot_abi::{BootInfo, layout};

/// dlmalloc's own bookkeeping per allocation, for the free-bytes estimate.
const CHUNK_OVERHEAD: usize = 16;

/// The heap range, handed out front to back.
struct Region {
    next: AtomicUsize,
    end: AtomicUsize,
}

// SAFETY: `alloc` hands out each byte of [start, end) at most once, never
// outside the range `init` set (which the VMM reserves for the heap), and
// reports every region as contiguous with the last, as it is. Nothing is
// ever given back to it (`free` and `free_part` answer false), so no region
// is handed out twice.
unsafe impl dlmalloc::Allocator for Region {
    fn alloc(&self, size: usize) -> (*mut u8, usize, u32) {
        let start = self.next.load(Ordering::Relaxed);
        match start.checked_add(size) {
            Some(end) if start != 0 && end <= self.end.load(Ordering::Relaxed) => {
                self.next.store(end, Ordering::Relaxed);
                (start as *mut u8, size, 0)
            }
            _ => (core::ptr::null_mut(), 0, 0),
        }
    }

    fn remap(&self, _ptr: *mut u8, _oldsize: usize, _newsize: usize, _can_move: bool) -> *mut u8 {
        core::ptr::null_mut()
    }

    fn free_part(&self, _ptr: *mut u8, _oldsize: usize, _newsize: usize) -> bool {
        false
    }

    fn free(&self, _ptr: *mut u8, _size: usize) -> bool {
        false
    }

    fn can_release_part(&self, _flags: u32) -> bool {
        false
    }

    fn allocates_zeros(&self) -> bool {
        // Guest RAM starts zeroed and the range is handed out once.
        true
    }

    fn page_size(&self) -> usize {
        virtio_drivers::PAGE_SIZE
    }
}

struct GuestHeap {
    dlmalloc: UnsafeCell<Dlmalloc<Region>>,
    /// Set while an allocator call runs: a second one at the same time
    /// would be a bug (the guest has one thread and no interrupts).
    busy: AtomicBool,
    size: AtomicUsize,
    in_use: AtomicUsize,
    live: AtomicUsize,
}

// SAFETY: the guest runs one vCPU with interrupts off and no threads, so
// allocator calls never overlap; `busy` turns a violation of that (say, an
// allocation from inside dlmalloc) into an exit instead of corruption.
unsafe impl Sync for GuestHeap {}

#[global_allocator]
static HEAP: GuestHeap = GuestHeap {
    dlmalloc: UnsafeCell::new(Dlmalloc::new_with_allocator(Region {
        next: AtomicUsize::new(0),
        end: AtomicUsize::new(0),
    })),
    busy: AtomicBool::new(false),
    size: AtomicUsize::new(0),
    in_use: AtomicUsize::new(0),
    live: AtomicUsize::new(0),
};

impl GuestHeap {
    /// Runs `f` on the allocator, alone.
    fn with<R>(&self, f: impl FnOnce(&mut Dlmalloc<Region>) -> R) -> R {
        if self.busy.swap(true, Ordering::Acquire) {
            crate::paravirt::exit(crate::EXIT_NO_MEMORY, b"the allocator was entered twice");
        }
        // SAFETY: `busy` was false and is now true, so no other reference to
        // the allocator exists until it is cleared below.
        let result = f(unsafe { &mut *self.dlmalloc.get() });
        self.busy.store(false, Ordering::Release);
        result
    }

    fn account(&self, ptr: *mut u8, size: usize) {
        if !ptr.is_null() {
            self.in_use.fetch_add(size, Ordering::Relaxed);
            self.live.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn unaccount(&self, size: usize) {
        self.in_use.fetch_sub(size, Ordering::Relaxed);
        self.live.fetch_sub(1, Ordering::Relaxed);
    }
}

// SAFETY: every method forwards to dlmalloc with the caller's layout, which
// is what dlmalloc's functions require (size and alignment of the original
// allocation on free and realloc); null is returned on exhaustion.
unsafe impl GlobalAlloc for GuestHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as documented above.
        let ptr = self.with(|d| unsafe { d.malloc(layout.size(), layout.align()) });
        self.account(ptr, layout.size());
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as documented above.
        let ptr = self.with(|d| unsafe { d.calloc(layout.size(), layout.align()) });
        self.account(ptr, layout.size());
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as documented above.
        self.with(|d| unsafe { d.free(ptr, layout.size(), layout.align()) });
        self.unaccount(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as documented above.
        let new = self.with(|d| unsafe { d.realloc(ptr, layout.size(), layout.align(), new_size) });
        if !new.is_null() {
            self.unaccount(layout.size());
            self.account(new, new_size);
        }
        new
    }
}

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
    let bad = || HeapError::BadRange { start, end };
    let (start, end) = (usize::try_from(start).map_err(|_| bad())?, usize::try_from(end).map_err(|_| bad())?);
    HEAP.with(|d| {
        let region = d.allocator();
        region.end.store(end, Ordering::Relaxed);
        region.next.store(start, Ordering::Relaxed);
    });
    HEAP.size.store(end - start, Ordering::Relaxed);
    Ok(end - start)
}

/// `len` bytes, at the start of whole pages that nothing in the guest has
/// touched, for a buffer kept for the VM's whole life (the network's RX
/// buffers and its frame being built). They are zero as the VMM mapped them, so no byte is
/// written here: a page costs the host, and the guest an exit, only when
/// something first lands on it (a calloc'd buffer is cleared at once, every
/// page of it). `None` when the heap cannot spare them.
pub fn untouched_zeroed(len: usize) -> Option<&'static mut [u8]> {
    let page = virtio_drivers::PAGE_SIZE;
    let pages = len.checked_next_multiple_of(page)?;
    let start = HEAP.with(|d| {
        // Taken from where dlmalloc would ask next: its next segment then
        // starts past these pages, which it handles as a new segment.
        let region = d.allocator();
        let start = region.next.load(Ordering::Relaxed).checked_next_multiple_of(page)?;
        let end = start.checked_add(pages).filter(|&end| start != 0 && end <= region.end.load(Ordering::Relaxed))?;
        region.next.store(end, Ordering::Relaxed);
        Some(start)
    })?;
    HEAP.in_use.fetch_add(pages, Ordering::Relaxed);
    // SAFETY: [start, start + pages) lies in the heap range `init` took from
    // boot-info (RAM the VMM reserves for the heap and never writes), was
    // never handed out before (the region only moves forward) and never will
    // be again, so this is the only reference to it, for ever. Guest RAM
    // starts zeroed, and nothing wrote these bytes, so they are initialised.
    Some(unsafe { core::slice::from_raw_parts_mut(start as *mut u8, len) })
}

/// Bytes of the heap not in use, allocator overhead counted.
pub fn free_bytes() -> usize {
    let used = HEAP.in_use.load(Ordering::Relaxed) + HEAP.live.load(Ordering::Relaxed) * CHUNK_OVERHEAD;
    HEAP.size.load(Ordering::Relaxed).saturating_sub(used)
}
