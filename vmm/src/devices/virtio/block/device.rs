//! The virtio-blk device model: one request queue, each request a chain of
//! a 16-byte header (device-readable), data (readable for writes, writable
//! for reads) and a status byte (device-writable), as in virtio 1.2 5.2.6.
//!
//! Owns the checks and the file I/O they guard: every device-readable
//! descriptor must come before every device-writable one, the chain must
//! end (no loop), transfers are whole sectors of at most
//! [`MAX_TRANSFER`](super::MAX_TRANSFER) inside the file, and FLUSH is
//! `fdatasync`. Over a write-through file (opened `O_DSYNC`) the device
//! offers no FLUSH: each write is durable when it completes (virtio 1.2
//! 5.2.5.1, write-through without VIRTIO_BLK_F_FLUSH), so a durable commit
//! is one request and one notification, not two, and the worker makes the
//! blocks past each write ready for the next ones ([`super::ahead`]). With a standby
//! ([`Standby`]), every write is also shipped to it (`crate::replica`) and
//! completes only once the standby has it durable too; a standby that is
//! lost fails every later write when it is required, and is said once and
//! done without when it is only preferred. A request that breaks a rule gets status IOERR (or, with no
//! room for a status, a used length of 0) and is counted; an avail ring
//! that runs past the queue is a [`RingFault`] and the device needs a reset.
//! It never panics and never touches guest memory outside guest RAM.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::ahead::Ahead;
use super::{BlockMetrics, DEVICE_ID, MAX_TRANSFER, QUEUE_SIZE, SECTOR_SIZE, VIRTIO_BLK_F_FLUSH};
use crate::devices::virtio::{ActivateError, RingFault, VIRTIO_F_VERSION_1, VirtioDevice, read_config_bytes};
use crate::replica::Mirror;

/// Request types (5.2.6).
mod request {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
}

/// Status values (5.2.6).
mod status {
    pub const OK: u8 = 0;
    pub const IOERR: u8 = 1;
    pub const UNSUPP: u8 = 2;
}

const HEADER_LEN: usize = 16;
const ID_LEN: usize = 20;

struct Active {
    queue: Queue,
    mem: GuestMemoryMmap,
}

/// A virtio-blk device backed by `file`.
pub struct BlockDevice {
    file: File,
    sectors: u64,
    id: [u8; ID_LEN],
    active: Option<Active>,
    metrics: BlockMetrics,
    /// One line on the first host I/O error; later ones are counted.
    io_error_reported: bool,
    /// `file` was opened `O_DSYNC`: no FLUSH offered, every write durable.
    write_through: bool,
    /// The standby node that must have every write too, if any.
    standby: Option<Standby>,
    /// A connection to a new standby, offered while the VM runs (see
    /// [`BlockDevice::offer_standby`]), not yet taken.
    offered: Option<File>,
    /// The blocks made ready past the last write (write-through only).
    ahead: Ahead,
}

/// A state disk's standby: the mirror to it while it lasts, and whether
/// writes may complete without it.
pub struct Standby {
    pub mirror: Option<Mirror>,
    /// Without the mirror, writes fail (the guest refuses what it cannot
    /// make durable); otherwise they complete on the local disk alone.
    pub required: bool,
}

/// How a request broke the rules.
#[derive(Debug, PartialEq, Eq)]
enum Malformed {
    /// A device-readable descriptor after a device-writable one.
    Order,
    Loop,
    NoStatus,
    ShortHeader,
    /// Not whole sectors, too long, or past the end of the file.
    Range,
    Memory,
}

impl BlockDevice {
    /// A device over `file`, whose size (rounded down to sectors) is the
    /// disk's capacity.
    /// A device over `file`; `write_through` when it was opened `O_DSYNC`.
    pub fn new(file: File, id: &str, write_through: bool) -> std::io::Result<Self> {
        let sectors = file.metadata()?.len() / SECTOR_SIZE;
        let mut serial = [0u8; ID_LEN];
        let take = id.len().min(ID_LEN);
        serial[..take].copy_from_slice(&id.as_bytes()[..take]);
        Ok(BlockDevice {
            file,
            sectors,
            id: serial,
            active: None,
            metrics: BlockMetrics::default(),
            io_error_reported: false,
            write_through,
            standby: None,
            offered: None,
            ahead: Ahead::default(),
        })
    }

    /// A connection to a new standby (made by `Mirror::prepare`, its PROXY
    /// header sent), replacing the one there was: taken before the next
    /// request is served (the state disk's thread is woken for it), when
    /// the file's data is sent whole first. Until then writes go on as
    /// before.
    pub fn offer_standby(&mut self, socket: File) {
        self.offered = Some(socket);
    }

    /// Starts mirroring to the standby offered, if one was.
    fn take_offered_standby(&mut self) {
        let Some(socket) = self.offered.take() else { return };
        let started = std::time::Instant::now();
        match Mirror::start(socket, &self.file, self.sectors * SECTOR_SIZE) {
            Ok(mirror) => {
                let standby = self.standby.get_or_insert(Standby { mirror: None, required: false });
                standby.mirror = Some(mirror);
                BlockMetrics::set(&self.metrics.standby_whole, 1);
                eprintln!(
                    "mqvisor: state mirrored to a new standby (copy made in {} ms)",
                    started.elapsed().as_millis()
                );
            }
            Err(e) => eprintln!("mqvisor: state disk: the new standby is lost ({e})"),
        }
    }

    /// Every write from now on is mirrored to `standby` as well.
    pub fn with_standby(mut self, standby: Standby) -> Self {
        BlockMetrics::set(&self.metrics.standby_whole, u64::from(standby.mirror.is_some()));
        self.standby = Some(standby);
        self
    }

    /// Ships a write to the standby before it is made here.
    fn ship(&mut self, offset: u64, data: &[u8]) {
        let Some(standby) = self.standby.as_mut() else { return };
        if let Some(mirror) = standby.mirror.as_mut()
            && let Err(e) = mirror.ship(offset, data)
        {
            self.lose_standby(&e);
        }
    }

    /// The status of a write made here, once the standby has it (or has
    /// been lost).
    fn mirrored(&mut self, offset: u64, data: &[u8]) -> u8 {
        let Some(standby) = self.standby.as_mut() else { return status::OK };
        match standby.mirror.as_mut().map(|mirror| mirror.wait_durable(offset, data)) {
            Some(Ok(())) => {
                BlockMetrics::bump(&self.metrics.standby_writes, 1);
                return status::OK;
            }
            Some(Err(e)) => self.lose_standby(&e),
            None => {}
        }
        if self.standby.as_ref().is_some_and(|s| s.required) {
            BlockMetrics::bump(&self.metrics.io_errors, 1);
            status::IOERR
        } else {
            status::OK
        }
    }

    /// The mirror failed: said once, never used again.
    fn lose_standby(&mut self, error: &std::io::Error) {
        let Some(standby) = self.standby.as_mut() else { return };
        if standby.mirror.take().is_some() {
            BlockMetrics::set(&self.metrics.standby_whole, 0);
            BlockMetrics::bump(&self.metrics.standby_losses, 1);
            let then = if standby.required { "every write fails from now on" } else { "going on without it" };
            eprintln!("mqvisor: state disk: the standby is lost ({error}): {then}");
        }
    }

    /// Makes the next chunk past the last write ready (see [`Ahead`]);
    /// true if there was one, so the worker asks again while the guest
    /// waits for nothing.
    pub fn prepare_ahead(&mut self) -> bool {
        self.write_through && self.ahead.prepare_next(&self.file, self.sectors * SECTOR_SIZE)
    }

    pub fn metrics(&self) -> &BlockMetrics {
        &self.metrics
    }

    /// Capacity in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// Serves every request the guest has made available; returns how many.
    pub fn process_queue(&mut self) -> Result<usize, RingFault> {
        self.take_offered_standby();
        let Some(mut active) = self.active.take() else { return Ok(0) };
        let result = self.serve(&mut active);
        self.active = Some(active);
        if result.is_err() {
            BlockMetrics::bump(&self.metrics.ring_faults, 1);
        }
        result
    }

    fn serve(&mut self, active: &mut Active) -> Result<usize, RingFault> {
        let mut served = 0;
        loop {
            let chain = match active.queue.iter(&active.mem) {
                Ok(mut iter) => iter.next(),
                Err(error) => return Err(RingFault { queue: 0, error }),
            };
            let Some(chain) = chain else { return Ok(served) };
            let head = chain.head_index();
            let used = self.execute(chain, &active.mem);
            active.queue.add_used(&active.mem, head, used).map_err(|error| RingFault { queue: 0, error })?;
            served += 1;
        }
    }

    /// Re-arms notifications; true if requests arrived meanwhile.
    pub fn enable_notification(&mut self) -> Result<bool, RingFault> {
        let Some(active) = self.active.as_mut() else { return Ok(false) };
        active.queue.enable_notification(&active.mem).map_err(|error| RingFault { queue: 0, error })
    }

    /// Runs one request; returns the used length (bytes the device wrote).
    fn execute(&mut self, chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> u32 {
        match self.try_execute(&chain, mem) {
            Ok(used) => used,
            Err(why) => {
                BlockMetrics::bump(&self.metrics.malformed, 1);
                // Tell the driver if there is a status byte to tell it in.
                if why != Malformed::NoStatus && why != Malformed::Loop && why != Malformed::Order {
                    return finish(&chain, mem, status::IOERR).unwrap_or(0);
                }
                0
            }
        }
    }

    fn try_execute(
        &mut self,
        chain: &DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> Result<u32, Malformed> {
        let (readable, writable) = check_chain(chain)?;
        if writable == 0 {
            return Err(Malformed::NoStatus);
        }
        if readable < HEADER_LEN {
            return Err(Malformed::ShortHeader);
        }
        let mut reader = chain.clone().reader(mem).map_err(|_| Malformed::Memory)?;
        let mut header = [0u8; HEADER_LEN];
        reader.read_exact(&mut header).map_err(|_| Malformed::Memory)?;
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));
        match kind {
            request::IN => {
                let len = writable - 1;
                let offset = self.range(sector, len)?;
                let mut data = vec![0u8; len];
                let code = match self.file.read_exact_at(&mut data, offset) {
                    Ok(()) => {
                        BlockMetrics::bump(&self.metrics.reads, 1);
                        BlockMetrics::bump(&self.metrics.bytes_read, len as u64);
                        status::OK
                    }
                    Err(e) => self.io_failed("read", &e),
                };
                finish_with(chain, mem, &data, code)
            }
            request::OUT => {
                let len = readable - HEADER_LEN;
                let offset = self.range(sector, len)?;
                let mut data = vec![0u8; len];
                reader.read_exact(&mut data).map_err(|_| Malformed::Memory)?;
                // Shipped first: the standby writes while this disk does.
                self.ship(offset, &data);
                let code = match self.file.write_all_at(&data, offset) {
                    Ok(()) => {
                        BlockMetrics::bump(&self.metrics.writes, 1);
                        BlockMetrics::bump(&self.metrics.bytes_written, len as u64);
                        if self.write_through {
                            // Durable on return: as many flushes as a FLUSH would have made.
                            BlockMetrics::bump(&self.metrics.flushes, 1);
                            self.ahead.wrote(offset, offset + len as u64);
                        }
                        status::OK
                    }
                    Err(e) => self.io_failed("write", &e),
                };
                // Always waited for: the standby answers every shipment.
                let mirrored = self.mirrored(offset, &data);
                let code = if code == status::OK { mirrored } else { code };
                finish(chain, mem, code)
            }
            request::FLUSH => {
                let code = match self.file.sync_data() {
                    Ok(()) => {
                        BlockMetrics::bump(&self.metrics.flushes, 1);
                        status::OK
                    }
                    Err(e) => self.io_failed("flush", &e),
                };
                finish(chain, mem, code)
            }
            request::GET_ID if writable > ID_LEN => finish_with(chain, mem, &self.id, status::OK),
            _ => finish(chain, mem, status::UNSUPP),
        }
    }

    /// The file offset of `len` bytes at `sector`, if they are whole
    /// sectors inside the disk and within the transfer limit.
    fn range(&self, sector: u64, len: usize) -> Result<u64, Malformed> {
        if len == 0 || len > MAX_TRANSFER || !(len as u64).is_multiple_of(SECTOR_SIZE) {
            return Err(Malformed::Range);
        }
        let end = sector.checked_add(len as u64 / SECTOR_SIZE).ok_or(Malformed::Range)?;
        if end > self.sectors {
            return Err(Malformed::Range);
        }
        Ok(sector * SECTOR_SIZE)
    }

    fn io_failed(&mut self, what: &str, error: &std::io::Error) -> u8 {
        BlockMetrics::bump(&self.metrics.io_errors, 1);
        if !self.io_error_reported {
            self.io_error_reported = true;
            eprintln!("mqvisor: virtio-blk: {what} of the state file failed: {error}; the guest is told (IOERR)");
        }
        status::IOERR
    }
}

/// Totals of the device-readable and device-writable parts of a chain,
/// checking that readable descriptors come first and that the chain ends.
fn check_chain(chain: &DescriptorChain<&GuestMemoryMmap>) -> Result<(usize, usize), Malformed> {
    let (mut readable, mut writable) = (0usize, 0usize);
    let mut still_linked = false;
    // The iterator stops after `queue size` hops, so a loop ends on a
    // descriptor that still points onwards.
    for desc in chain.clone() {
        let len = desc.len() as usize;
        if desc.is_write_only() {
            writable = writable.checked_add(len).ok_or(Malformed::Range)?;
        } else if writable > 0 {
            return Err(Malformed::Order);
        } else {
            readable = readable.checked_add(len).ok_or(Malformed::Range)?;
        }
        if readable > MAX_TRANSFER + HEADER_LEN || writable > MAX_TRANSFER + 1 {
            return Err(Malformed::Range);
        }
        still_linked = desc.has_next();
    }
    if still_linked {
        return Err(Malformed::Loop);
    }
    Ok((readable, writable))
}

/// Writes `data` then the status byte into the chain's writable part;
/// returns the used length.
fn finish_with(
    chain: &DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    data: &[u8],
    code: u8,
) -> Result<u32, Malformed> {
    let mut writer = chain.clone().writer(mem).map_err(|_| Malformed::Memory)?;
    // The status is the last byte of the writable part (5.2.6).
    let pad = writer.available_bytes().checked_sub(1).ok_or(Malformed::NoStatus)?;
    let data = &data[..data.len().min(pad)];
    writer.write_all(data).map_err(|_| Malformed::Memory)?;
    let skip = pad - data.len();
    if skip > 0 {
        writer.write_all(&vec![0u8; skip]).map_err(|_| Malformed::Memory)?;
    }
    writer.write_all(&[code]).map_err(|_| Malformed::Memory)?;
    u32::try_from(pad + 1).map_err(|_| Malformed::Range)
}

fn finish(chain: &DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap, code: u8) -> Result<u32, Malformed> {
    finish_with(chain, mem, &[], code)
}

impl VirtioDevice for BlockDevice {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn offered_features(&self) -> u64 {
        if self.write_through { VIRTIO_F_VERSION_1 } else { VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH }
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // Config layout (5.2.4): capacity (le64), then fields not offered.
        read_config_bytes(&self.sectors.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, queues: Vec<Queue>, _features: u64, mem: GuestMemoryMmap) -> Result<(), ActivateError> {
        let got = queues.len();
        let Ok([queue]) = <[Queue; 1]>::try_from(queues) else {
            return Err(ActivateError::QueueCount { got, want: 1 });
        };
        self.active = Some(Active { queue, mem });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }
}

#[cfg(test)]
mod tests {
    //! Hand-built requests, from a driver that may be lying.

    use super::*;
    use crate::devices::virtio::test_descriptors::{NEXT, WRITE, desc};
    use std::os::fd::FromRawFd;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const RAM: usize = 1 << 20;
    const HEADER: u64 = 0x8_0000;
    const DATA: u64 = 0x9_0000;
    const STATUS: u64 = 0xA_0000;
    /// The disk: 16 sectors.
    const DISK: u64 = 16 * SECTOR_SIZE;

    fn file() -> File {
        // SAFETY: memfd_create with a NUL-terminated name; the descriptor is
        // owned by the File from here on.
        let fd = unsafe { libc::memfd_create(c"block-test".as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(DISK).unwrap();
        file
    }

    /// Serves `chains` (each a list of descriptors) on a fresh device;
    /// returns the device, the used lengths and the status bytes.
    fn serve(mem: &GuestMemoryMmap, file: &File, chains: &[RawDescriptor]) -> (BlockDevice, Vec<u32>, u8) {
        let queue = MockSplitQueue::create(mem, GuestAddress(0), 16);
        queue.add_desc_chains(chains, 0).unwrap();
        let mut device = BlockDevice::new(file.try_clone().unwrap(), "test-disk", false).unwrap();
        device.activate(vec![queue.create_queue::<Queue>().unwrap()], VIRTIO_F_VERSION_1, mem.clone()).unwrap();
        let served = device.process_queue().unwrap();
        let used = (0..served).map(|i| queue.used().ring().ref_at(i).unwrap().load().len()).collect();
        let status = mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap();
        (device, used, status)
    }

    /// A mirror of `file` to a standby that takes the snapshot, then goes.
    fn vanishing_standby(file: &File) -> Mirror {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let owner = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut standby, _) = listener.accept().unwrap();
        let gone = std::thread::spawn(move || {
            let mut len = [0u8; 8];
            standby.read_exact(&mut len).unwrap();
            loop {
                let mut head = [0u8; crate::replica::HEAD_LEN];
                standby.read_exact(&mut head).unwrap();
                let head = crate::replica::ShipmentHead::decode(&head);
                let mut data = vec![0u8; head.len as usize];
                standby.read_exact(&mut data).unwrap();
                standby.write_all(&[crate::replica::ACK_DURABLE]).unwrap();
                if head.flags & crate::replica::WHOLE != 0 {
                    return; // and the standby is gone
                }
            }
        });
        let mirror = Mirror::start(Mirror::prepare(owner).unwrap(), file, DISK).unwrap();
        gone.join().unwrap();
        mirror
    }

    #[test]
    fn a_lost_standby_fails_writes_only_when_it_is_required() {
        let mem = memory();
        let file = file();
        header(&mem, request::OUT, 0);
        let write = [desc(HEADER, 16, NEXT, 1), desc(DATA, 512, NEXT, 2), desc(STATUS, 1, WRITE, 0)];
        for required in [true, false] {
            let queue = MockSplitQueue::create(&mem, GuestAddress(0), 16);
            queue.add_desc_chains(&write, 0).unwrap();
            let mirror = Some(vanishing_standby(&file));
            let mut device = BlockDevice::new(file.try_clone().unwrap(), "test-disk", false)
                .unwrap()
                .with_standby(Standby { mirror, required });
            device.activate(vec![queue.create_queue::<Queue>().unwrap()], VIRTIO_F_VERSION_1, mem.clone()).unwrap();
            assert_eq!(device.process_queue().unwrap(), 1);
            let status = mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap();
            let want = if required { status::IOERR } else { status::OK };
            assert_eq!(status, want, "required: {required}");
            assert!(device.standby.as_ref().unwrap().mirror.is_none(), "the lost mirror is dropped");
            let m = device.metrics();
            assert_eq!(
                [BlockMetrics::get(&m.standby_whole), BlockMetrics::get(&m.standby_losses)],
                [0, 1],
                "counted as lost"
            );
        }
    }

    fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HEADER)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).unwrap()
    }

    #[test]
    fn a_write_then_a_read_then_a_flush_and_the_id() {
        let mem = memory();
        let file = file();
        let data: Vec<u8> = (0..1024).map(|i| u8::try_from(i % 251).unwrap()).collect();
        mem.write_slice(&data, GuestAddress(DATA)).unwrap();
        header(&mem, request::OUT, 3);
        let write = [desc(HEADER, 16, NEXT, 1), desc(DATA, 1024, NEXT, 2), desc(STATUS, 1, WRITE, 0)];
        let (device, used, status) = serve(&mem, &file, &write);
        assert_eq!((used, status), (vec![1], status::OK));
        assert_eq!(BlockMetrics::get(&device.metrics().bytes_written), 1024);
        let mut on_disk = vec![0u8; 1024];
        file.read_exact_at(&mut on_disk, 3 * SECTOR_SIZE).unwrap();
        assert_eq!(on_disk, data);

        mem.write_slice(&[0u8; 1024], GuestAddress(DATA)).unwrap();
        header(&mem, request::IN, 3);
        let read = [desc(HEADER, 16, NEXT, 1), desc(DATA, 1024, NEXT | WRITE, 2), desc(STATUS, 1, WRITE, 0)];
        let (_, used, status) = serve(&mem, &file, &read);
        assert_eq!((used, status), (vec![1025], status::OK));
        let mut back = vec![0u8; 1024];
        mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(back, data);

        header(&mem, request::FLUSH, 0);
        let (device, _, status) = serve(&mem, &file, &[desc(HEADER, 16, NEXT, 1), desc(STATUS, 1, WRITE, 0)]);
        assert_eq!((status, BlockMetrics::get(&device.metrics().flushes)), (status::OK, 1));

        header(&mem, request::GET_ID, 0);
        let id = [desc(HEADER, 16, NEXT, 1), desc(DATA, 20, NEXT | WRITE, 2), desc(STATUS, 1, WRITE, 0)];
        let (_, _, status) = serve(&mem, &file, &id);
        let mut serial = [0u8; 9];
        mem.read_slice(&mut serial, GuestAddress(DATA)).unwrap();
        assert_eq!((status, &serial), (status::OK, b"test-disk"));
    }

    #[test]
    fn requests_outside_the_disk_or_not_in_sectors_are_refused_with_ioerr() {
        let mem = memory();
        let file = file();
        for (sector, len) in [(15, 1024), (16, 512), (u64::MAX, 512), (0, 100), (0, 0)] {
            header(&mem, request::OUT, sector);
            let chain = [desc(HEADER, 16, NEXT, 1), desc(DATA, len, NEXT, 2), desc(STATUS, 1, WRITE, 0)];
            let chain = if len == 0 { &[chain[0], desc(STATUS, 1, WRITE, 0)][..] } else { &chain[..] };
            let (device, _, status) = serve(&mem, &file, chain);
            assert_eq!(status, status::IOERR, "sector {sector}, {len} bytes");
            assert_eq!(BlockMetrics::get(&device.metrics().malformed), 1);
            assert_eq!(BlockMetrics::get(&device.metrics().writes), 0);
        }
        assert_eq!(file.metadata().unwrap().len(), DISK, "the file never grows");
    }

    #[test]
    fn misordered_looping_or_statusless_chains_get_no_status_and_are_counted() {
        let mem = memory();
        let file = file();
        header(&mem, request::OUT, 0);
        let chains: [&[RawDescriptor]; 3] = [
            // A readable descriptor after a writable one.
            &[desc(HEADER, 16, NEXT, 1), desc(STATUS, 1, NEXT | WRITE, 2), desc(DATA, 512, 0, 0)],
            // Two descriptors pointing at each other.
            &[desc(HEADER, 16, NEXT, 1), desc(DATA, 512, NEXT, 0)],
            // Nothing the device may write.
            &[desc(HEADER, 16, NEXT, 1), desc(DATA, 512, 0, 0)],
        ];
        for chain in chains {
            let (device, used, status) = serve(&mem, &file, chain);
            assert_eq!(used.first(), Some(&0), "{chain:?}");
            assert_eq!(status, 0xff, "no status written: {chain:?}");
            assert_eq!(BlockMetrics::get(&device.metrics().malformed), 1);
        }
    }

    #[test]
    fn unknown_request_types_are_unsupported_and_an_avail_index_past_the_ring_faults() {
        let mem = memory();
        let file = file();
        header(&mem, 77, 0);
        let (_, _, status) = serve(&mem, &file, &[desc(HEADER, 16, NEXT, 1), desc(STATUS, 1, WRITE, 0)]);
        assert_eq!(status, status::UNSUPP);

        let queue = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let mut device = BlockDevice::new(file.try_clone().unwrap(), "x", false).unwrap();
        device.activate(vec![queue.create_queue::<Queue>().unwrap()], VIRTIO_F_VERSION_1, mem.clone()).unwrap();
        queue.avail().idx().store(100);
        assert!(device.process_queue().is_err());
        assert_eq!(BlockMetrics::get(&device.metrics().ring_faults), 1);
    }
}
