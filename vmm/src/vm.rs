//! One tenant VM from start to finish: open KVM, lay out guest memory, load
//! the image, fill boot-info, configure the vCPU, run it, report the outcome.
//!
//! Owns the order of those steps and the errors of each one, worded for the
//! operator (what went wrong and what to do). It must never panic on bad
//! input: every failure becomes a [`VmmError`] or an [`Outcome`].

use std::ffi::CString;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use kvm_bindings::{Msrs, kvm_msr_entry, kvm_userspace_memory_region};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use mqvisor_boot_abi::{
    BootInfo, CMDLINE_CAPACITY, DeviceDescriptor, capacity, config_blob, device_kind, layout, service,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::arch::{self, ArchError};
use crate::devices::virtio::block::{BlockDevice, BlockMetrics, BlockThread, Standby};
use crate::devices::virtio::mmio::{self, MmioTransport};
use crate::devices::virtio::net as net_device;
use crate::devices::virtio::net::{NetDevice, RingFault};
use crate::devices::{GiveUp, MmioBus};
use crate::image::{self, ImageError};
use crate::net::{
    self,
    ingress::{HandoffEdge, Ingress, ListenOn},
    metrics::Counters,
    proxy::{self, NetThread, ProxyConfig},
    quota::Quotas,
    tls::ServerTls,
};
use crate::privileges;
use crate::state::Persistence;
use crate::vcpu::{self, ExitStats, Outcome, VcpuContext};

/// Smallest heap an image gets; less memory than image + this is refused.
pub const MIN_HEAP_BYTES: u64 = 1 << 20;
/// Largest `--memory`: RAM must end below the device hole.
#[allow(clippy::cast_possible_truncation)] // 3072
pub const MAX_MEMORY_MIB: u32 = (layout::RAM_LIMIT >> 20) as u32;
/// The guest's TSC, MSR 0x10 (SDM Vol. 4, table 2-2).
const MSR_IA32_TSC: u32 = 0x10;

/// Everything needed to run one VM.
pub struct VmConfig {
    /// The guest ELF image.
    pub image: Vec<u8>,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// Command line handed to the guest through boot-info.
    pub cmdline: String,
    /// Stop the guest after this long.
    pub timeout: Option<Duration>,
    /// The KVM device node.
    pub kvm_device: PathBuf,
    /// Where guest console output goes.
    pub console: Box<dyn Write + Send>,
    /// What the guest runs.
    pub service: Service,
    /// Service configuration for the guest (see `mqvisor_boot_abi::config_blob`).
    pub config_blob: Vec<u8>,
    /// When set, clients arrive on this socket from `mqvisor serve` instead
    /// of on the service's listen address (see `net::ingress`).
    pub handoff: Option<UnixDatagram>,
    /// When set, become this user once `/dev/kvm` is open and the listener
    /// bound (see `privileges`).
    pub run_as: Option<privileges::RunAs>,
    /// The tenant's state file, served to the guest as a virtio-blk disk.
    pub state: Option<StateDisk>,
    /// Listeners beside the service's plain one (TLS), or instead of it.
    pub edge: Edge,
    /// The tenant's rate quotas, enforced by the proxy (`net::quota`).
    pub quotas: Quotas,
}

/// Listeners of a VM beyond the service's plain `listen` address (not used
/// with a handoff socket), and how handed-over clients beyond plain MQTT
/// are served (used only with one).
#[derive(Clone, Debug, Default)]
pub struct Edge {
    /// No plain listener: clients come only through `more`.
    pub no_plain: bool,
    /// More listeners (MQTT over TLS, over WebSockets, over both).
    pub more: Vec<ListenOn>,
    /// The tenant's TLS and WebSocket settings for handed-over clients.
    pub handoff: HandoffEdge,
}

/// The tenant's state file and how the guest keeps its log on it.
pub struct StateDisk {
    /// Opened for reading and writing; its size is the disk's capacity.
    pub file: std::fs::File,
    /// How the guest keeps its log on it (`sync` or `batch`).
    pub persistence: Persistence,
    /// For batch persistence: the flush interval.
    pub batch_ms: u32,
    /// The standby node that gets every write too (see `replica`), if any.
    pub standby: Option<Standby>,
}

/// What the guest runs, and what the host provides for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// Banner, timer proof, exit; no network.
    Demo,
    /// Echo of every client connection to `listen` on the host.
    Echo { listen: SocketAddr },
    /// The MQTT broker, reached through `listen`, with the two settings that
    /// decide how much guest memory it needs.
    Mqtt { listen: SocketAddr, max_connections: usize, max_packet_size: usize },
}

/// Why a VM could not be started.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(
        "{0} does not exist: this machine does not expose KVM (enable hardware or nested \
         virtualization, or load the kvm module)"
    )]
    KvmMissing(PathBuf),
    #[error("permission denied opening {0}: run as a user in the group that owns it (usually `kvm`)")]
    KvmPermission(PathBuf),
    #[error("cannot open {path}: {source}")]
    KvmOpen { path: PathBuf, source: kvm_ioctls::Error },
    #[error("{what} failed: {source}")]
    Kvm { what: &'static str, source: kvm_ioctls::Error },
    #[error("bad image: {0}")]
    Image(#[from] ImageError),
    #[error(
        "--memory {given_mib} MiB is too small for this image: it needs at least {needed_mib} MiB \
         (image ends at {image_end:#x}, plus 1 MiB of heap)"
    )]
    MemoryTooSmall { given_mib: u32, needed_mib: u64, image_end: u64 },
    #[error(
        "--max-connections {connections} does not fit in --memory {memory_mib} MiB, which holds at most \
         {capacity} connections: raise --memory or lower --max-connections"
    )]
    ConnectionsDoNotFit { connections: usize, memory_mib: u32, capacity: u64 },
    #[error(
        "--max-packet-size {packet_size} does not fit in --memory {memory_mib} MiB next to the link's \
         buffers: raise --memory or lower --max-packet-size"
    )]
    PacketDoesNotFit { packet_size: usize, memory_mib: u32 },
    #[error("--memory {0} MiB is out of range (1..={MAX_MEMORY_MIB})")]
    MemoryOutOfRange(u32),
    #[error("allocating {mib} MiB of guest memory: {reason}")]
    GuestMemory { mib: u32, reason: String },
    #[error("the service configuration is {0} bytes; at most {max} fit", max = config_blob::MAX_LEN)]
    ConfigTooLarge(u64),
    #[error("the guest command line is {0} bytes; at most {CMDLINE_CAPACITY} fit")]
    CmdlineTooLong(usize),
    #[error("setting up the vCPU: {0}")]
    Arch(#[from] ArchError),
    #[error("writing boot-info: {0}")]
    BootInfo(vm_memory::GuestMemoryError),
    #[error("reading random bytes for the guest (getrandom): {0}")]
    Entropy(std::io::Error),
    #[error("starting a VMM thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("{0}")]
    Privileges(#[from] privileges::PrivilegeError),
    #[error("the state file: {0}")]
    StateFile(std::io::Error),
    #[error("the network device has no queue notification eventfd")]
    NoQueueEvent,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

/// Opens the KVM device, turning the common failures into advice.
pub fn open_kvm(path: &std::path::Path) -> Result<Kvm, VmmError> {
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|_| VmmError::KvmMissing(path.to_path_buf()))?;
    Kvm::new_with_path(&c_path).map_err(|source| match source.errno() {
        libc::ENOENT => VmmError::KvmMissing(path.to_path_buf()),
        libc::EACCES | libc::EPERM => VmmError::KvmPermission(path.to_path_buf()),
        _ => VmmError::KvmOpen { path: path.to_path_buf(), source },
    })
}

/// Fills boot-info for a guest with `ram_size` bytes whose image ends at `image_end`.
pub fn boot_info(ram_size: u64, image_end: u64, cmdline: &str) -> Result<BootInfo, VmmError> {
    let mut info = BootInfo { ram_size, ..BootInfo::default() };
    info.heap_start = image_end.next_multiple_of(layout::PAGE_SIZE);
    info.heap_end = ram_size;
    let bytes = cmdline.as_bytes();
    if bytes.len() > CMDLINE_CAPACITY {
        return Err(VmmError::CmdlineTooLong(bytes.len()));
    }
    info.cmdline[..bytes.len()].copy_from_slice(bytes);
    info.cmdline_len = u32::try_from(bytes.len()).map_err(|_| VmmError::CmdlineTooLong(bytes.len()))?;
    Ok(info)
}

/// Guest RAM, registered with KVM as slot 0 at guest-physical 0.
fn create_memory(vm: &VmFd, memory_mib: u32) -> Result<GuestMemoryMmap, VmmError> {
    let size = usize::try_from(memory_mib).unwrap_or(usize::MAX) << 20;
    // Anonymous, lazily touched mappings: an idle 32 MiB guest costs the host
    // only the pages it writes.
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)])
        .map_err(|e| VmmError::GuestMemory { mib: memory_mib, reason: e.to_string() })?;
    for (slot, region) in (0u32..).zip(mem.iter()) {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| VmmError::GuestMemory { mib: memory_mib, reason: e.to_string() })?;
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the host range is a live mapping owned by `mem`, which the
        // caller keeps alive for as long as the VM (`Vm` holds both and drops
        // the VM fd first); the slot is new and does not overlap another.
        unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        advise_huge_pages(host, region.memory_size);
    }
    Ok(mem)
}

/// Guest-physical memory below this stays in 4 KiB pages: the image, the
/// rings, the stacks and the start of the heap, which is all an idle
/// tenant touches, cost the host only the pages written. The heap is
/// handed out front to back, so only a tenant whose heap grew past this
/// (many clients, a large recovered state) reaches the rest.
const HUGE_PAGES_FROM: u64 = 16 << 20;

/// Asks the kernel to back guest RAM above [`HUGE_PAGES_FROM`] with
/// transparent huge pages. Under a nested hypervisor every first touch of a
/// 4 KiB page is an exit; a 2 MiB page is one for 512 of them (recovering
/// 1,000,000 retained messages took 1.8 s in 4 KiB pages, 0.5 s so). KVM
/// maps 2 MiB pages only where host and guest addresses agree modulo 2 MiB,
/// which the kernel's alignment of large anonymous mappings gives for an
/// even number of MiB. Best effort: without THP the guest is only slower.
fn advise_huge_pages(host: *mut u8, size: u64) {
    let (Ok(from), Ok(size)) = (usize::try_from(HUGE_PAGES_FROM), usize::try_from(size)) else { return };
    if size <= from {
        return;
    }
    // SAFETY: [host + from, host + size) lies inside the live mapping of
    // guest RAM (`size` is its length) and starts on a page boundary (16 MiB
    // past a page-aligned mapping); MADV_HUGEPAGE changes only how the
    // kernel backs the range, never its contents or protection.
    let done = unsafe { libc::madvise(host.add(from).cast(), size - from, libc::MADV_HUGEPAGE) };
    if done != 0 {
        tracing::debug!("madvise(MADV_HUGEPAGE) on guest RAM: {}", std::io::Error::last_os_error());
    }
}

/// Reads the guest TSC (0 if KVM will not say): lets the guest time its start.
fn guest_tsc(vcpu: &VcpuFd) -> u64 {
    let Ok(mut msrs) = Msrs::from_entries(&[kvm_msr_entry { index: MSR_IA32_TSC, ..Default::default() }]) else {
        return 0;
    };
    match vcpu.get_msrs(&mut msrs) {
        Ok(1) => msrs.as_slice()[0].data,
        _ => 0,
    }
}

/// How a run ended, with what it cost.
#[derive(Debug)]
pub struct RunReport {
    pub outcome: Outcome,
    pub exits: ExitStats,
    /// Queue notifications the guest made (in-kernel exits via ioeventfd).
    pub notifications: u64,
    /// The network's counters (`net::metrics`), when there was one.
    pub net: Option<Counters>,
    /// The last time the guest's network driver broke a ring, if it did.
    pub last_ring_fault: Option<RingFault>,
    /// Requests the virtio-blk device served, when there was one.
    pub disk: Option<DiskCounters>,
}

/// The network half of a VM: the device, its worker thread, and KVM's
/// notification shortcuts.
struct Network {
    transport: Arc<Mutex<MmioTransport<NetDevice>>>,
    thread: NetThread,
    /// The state disk, once there is one (the load report counts its failures).
    disk: Arc<OnceLock<Arc<Mutex<MmioTransport<BlockDevice>>>>>,
}

impl Network {
    /// Creates the virtio-net device, binds the tenant listener, registers the
    /// queue notifications with KVM and starts the net thread, which carries
    /// at most the given connections within the tenant's quotas.
    fn start(
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        ingress: Ingress,
        (max_connections, quotas): (usize, Quotas),
        wake: Arc<EventFd>,
        vm_exits: Arc<AtomicU64>,
        give_up: GiveUp,
    ) -> Result<(Self, MmioBus), VmmError> {
        let device = NetDevice::new(net::GUEST_MAC, net::MAX_FRAME);
        let transport = MmioTransport::new(device, mem.clone()).map_err(VmmError::Thread)?;
        // Queue notifications go straight to the net thread's eventfds, so
        // the vCPU never returns to this process for them.
        for (queue, index) in [(net_device::RX_QUEUE, 0u32), (net_device::TX_QUEUE, 1u32)] {
            let event = transport.queue_event(queue).ok_or(VmmError::NoQueueEvent)?;
            let addr = IoEventAddress::Mmio(layout::DEVICE_WINDOW + mmio::QUEUE_NOTIFY_OFFSET);
            // The driver writes the queue index; each queue has its own eventfd.
            vm.register_ioevent(event, &addr, index).map_err(kvm_err("KVM_IOEVENTFD"))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        let disk = Arc::new(OnceLock::new());
        let thread = proxy::spawn(ProxyConfig {
            transport: transport.clone(),
            wake_guest: wake,
            ingress,
            max_connections,
            vm_exits,
            stop_reason: give_up,
            disk: disk.clone(),
            quotas,
        })
        .map_err(VmmError::Thread)?;
        let mut bus = MmioBus::default();
        bus.insert(layout::DEVICE_WINDOW, layout::DEVICE_SIZE, transport.clone());
        Ok((Network { transport, thread, disk }, bus))
    }

    /// Closes every client connection and returns the VM's counters, the
    /// last ring fault and the queue notifications.
    fn stop(self) -> (Counters, Option<RingFault>, u64) {
        let counters = self.thread.stop();
        let Ok(mut transport) = self.transport.lock() else { return (counters, None, 0) };
        (counters, transport.device_mut().take_last_fault(), transport.notifications())
    }
}

/// Where a VM's parts go in its guest memory, and how many clients its
/// service may carry: what [`run`] works out before it opens KVM.
pub struct Plan {
    info: BootInfo,
    blob_at: u64,
    max_connections: usize,
}

/// Checks that `image` with `config_blob` and `service` fits in
/// `memory_mib` of guest RAM (the memory formula of
/// `mqvisor_boot_abi::capacity`), without opening KVM: the checks
/// [`run`] makes at start, for those (`mqvisor serve`) that must know
/// before they start a VM that it can boot.
pub fn plan(
    image: &[u8],
    memory_mib: u32,
    config_blob: &[u8],
    cmdline: &str,
    service: Service,
) -> Result<Plan, VmmError> {
    if memory_mib == 0 || memory_mib > MAX_MEMORY_MIB {
        return Err(VmmError::MemoryOutOfRange(memory_mib));
    }
    let ram_size = u64::from(memory_mib) << 20;
    // Check the image on its own first, so a good image in too little memory
    // is reported as "too little memory", not as a bad image.
    let image_layout = image::check(image, layout::RAM_LIMIT)?;
    let blob_len = config_blob.len() as u64;
    if blob_len > config_blob::MAX_LEN {
        return Err(VmmError::ConfigTooLarge(blob_len));
    }
    // The blob sits between the image and the heap.
    let blob_at = image_layout.end.next_multiple_of(layout::PAGE_SIZE);
    let needed = (blob_at + blob_len).next_multiple_of(layout::PAGE_SIZE) + MIN_HEAP_BYTES;
    if needed > ram_size {
        return Err(VmmError::MemoryTooSmall {
            given_mib: memory_mib,
            needed_mib: needed.div_ceil(1 << 20),
            image_end: image_layout.end,
        });
    }
    let info = boot_info(ram_size, blob_at + blob_len, cmdline)?;
    let max_connections = connection_limit(service, info.heap_end - info.heap_start, memory_mib)?;
    Ok(Plan { info, blob_at, max_connections })
}

/// Boots the VM described by `config` and runs it to the end.
pub fn run(config: VmConfig) -> Result<RunReport, VmmError> {
    let Plan { mut info, blob_at, max_connections } =
        plan(&config.image, config.memory_mib, &config.config_blob, &config.cmdline, config.service)?;
    let ram_size = u64::from(config.memory_mib) << 20;
    let blob_len = config.config_blob.len() as u64;
    if blob_len > 0 {
        info.config_addr = blob_at;
        info.config_len = blob_len;
    }

    vcpu::install_signal_handlers().map_err(VmmError::Thread)?;
    let kvm = open_kvm(&config.kvm_device)?;
    let created = Instant::now();
    info.boot_wall_clock_ns = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    let mem = create_memory(&vm, config.memory_mib)?;
    let loaded = image::load(&config.image, &mem, ram_size)?;
    mem.write_slice(&config.config_blob, GuestAddress(blob_at)).map_err(VmmError::BootInfo)?;
    let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
    arch::configure_vcpu(&kvm, &vcpu, &mem, ram_size, loaded.entry)?;

    let wake = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(VmmError::Thread)?);
    let exit_count = Arc::new(AtomicU64::new(0));
    let give_up = GiveUp::default();
    // TLS settings that SIGHUP re-reads: this process's listeners', or
    // the handed-over clients'.
    let reloadable: Vec<Arc<ServerTls>> = match (&config.handoff, config.service) {
        (_, Service::Demo) => Vec::new(),
        (None, _) => config.edge.more.iter().filter_map(|on| on.tls.clone()).collect(),
        (Some(_), _) => config.edge.handoff.tls_settings().collect(),
    };
    // What needs privileges is held now: /dev/kvm and the listener.
    let ingress = match config.service {
        Service::Demo => None,
        Service::Echo { listen } | Service::Mqtt { listen, .. } => {
            let ingress = match config.handoff {
                Some(socket) => Ingress::Handoff(socket, config.edge.handoff),
                None => {
                    let plain = ListenOn { addr: listen, tls: None, ws: None, identity_max: None };
                    let all: Vec<ListenOn> =
                        (!config.edge.no_plain).then_some(plain).into_iter().chain(config.edge.more).collect();
                    Ingress::listen(&all).map_err(|(addr, source)| VmmError::Listen { addr, source })?
                }
            };
            Some(ingress)
        }
    };
    if let Some(run_as) = &config.run_as {
        privileges::drop_to(run_as)?;
    }
    let (network, mut bus) = match (config.service, ingress) {
        (Service::Demo, _) | (_, None) => (None, MmioBus::default()),
        (_, Some(ingress)) => {
            let (network, bus) = Network::start(
                &vm,
                &mem,
                ingress,
                (max_connections, config.quotas),
                wake.clone(),
                exit_count.clone(),
                give_up.clone(),
            )?;
            info.service = if matches!(config.service, Service::Echo { .. }) { service::ECHO } else { service::MQTT };
            info.net = net::guest_net_config();
            info.devices[0] = DeviceDescriptor {
                base: layout::DEVICE_WINDOW,
                size: layout::DEVICE_SIZE,
                kind: device_kind::VIRTIO_NET,
                reserved: 0,
            };
            info.device_count = 1;
            (Some(network), bus)
        }
    };

    let disk = match (config.state, network.is_some()) {
        (Some(state), true) => {
            let sync = state.persistence == Persistence::Sync;
            let (disk, window) =
                Disk::start(&vm, &mem, (state.file, state.standby), sync, (wake.clone(), give_up.clone()))?;
            bus.insert(window.base, window.size, disk.transport.clone());
            if let Some(network) = &network {
                let _ = network.disk.set(disk.transport.clone());
            }
            info.devices[info.device_count as usize] = window;
            info.device_count += 1;
            info.persistence = state.persistence.boot_abi();
            info.persistence_batch_ms = state.batch_ms;
            Some(disk)
        }
        _ => None,
    };

    info.tsc_khz = vcpu.get_tsc_khz().map_err(kvm_err("KVM_GET_TSC_KHZ"))?.into();
    fill_random(&mut info.entropy).map_err(VmmError::Entropy)?;
    info.entry_tsc = guest_tsc(&vcpu);
    info.setup_ns = u64::try_from(created.elapsed().as_nanos()).unwrap_or(u64::MAX);
    mem.write_slice(info.as_bytes(), GuestAddress(layout::BOOT_INFO)).map_err(VmmError::BootInfo)?;

    let context = VcpuContext { mem: mem.clone(), bus, console: config.console, wake, exit_count, give_up };
    let on_reload: Option<Box<dyn FnMut()>> = if reloadable.is_empty() {
        None
    } else {
        vcpu::install_reload_handler().map_err(VmmError::Thread)?;
        Some(Box::new(move || reload_tls(&reloadable)))
    };
    let (outcome, exits) = vcpu::run(vcpu, context, config.timeout, on_reload).map_err(VmmError::Thread)?;
    let disk = disk.map(Disk::stop);
    let (net, last_ring_fault, notifications) = match network.map(Network::stop) {
        Some((counters, fault, notifications)) => (Some(counters), fault, notifications),
        None => (None, None, 0),
    };
    // The vCPU and net threads have returned; KVM lets go of guest memory
    // when the VM fd closes, so the mapping must outlive it.
    drop(vm);
    drop(mem);
    Ok(RunReport { outcome, exits, notifications, net, last_ring_fault, disk })
}

/// Re-reads every TLS listener's files (SIGHUP): new handshakes use them,
/// connections made go on. A file that fails is one line, and the
/// settings in force stay.
fn reload_tls(listeners: &[Arc<ServerTls>]) {
    // Listeners that differ only in ALPN read the same files: one line for them.
    let mut said = std::collections::BTreeSet::new();
    for tls in listeners {
        let files = tls.files();
        let line = match tls.reload() {
            Ok(()) => format!(
                "mqvisor: SIGHUP: TLS certificate {} and key {} read again; new connections use them",
                files.cert.display(),
                files.key.display()
            ),
            Err(e) => format!("mqvisor: SIGHUP: {e}; the TLS settings in force are kept"),
        };
        if said.insert(line.clone()) {
            eprintln!("{line}");
        }
    }
}

/// `file` opened again, for reading and writing with `O_DSYNC`: the same
/// file (through its descriptor, so a rename meanwhile changes nothing),
/// each write durable when it returns.
fn reopen_write_through(file: &std::fs::File) -> std::io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DSYNC)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// The state half of a VM: the virtio-blk device over the state file and
/// its worker thread.
struct Disk {
    transport: Arc<Mutex<MmioTransport<BlockDevice>>>,
    thread: BlockThread,
    /// The file as opened and locked (one VM per file), kept open for the
    /// VM's life when the device works on a write-through reopening of it.
    _locked: Option<std::fs::File>,
}

impl Disk {
    /// Creates the device in the second device page, registers its queue
    /// notification with KVM and starts its worker. With `sync`
    /// persistence the device writes through (see `BlockDevice`): every
    /// commit waits for its flush anyway, and one request costs one VM
    /// exit where a write and a FLUSH cost two.
    fn start(
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        (file, standby): (std::fs::File, Option<Standby>),
        sync: bool,
        (wake, give_up): (Arc<EventFd>, GiveUp),
    ) -> Result<(Self, DeviceDescriptor), VmmError> {
        let base = layout::DEVICE_WINDOW + layout::DEVICE_SIZE;
        let (device, locked) = match sync.then(|| reopen_write_through(&file)) {
            Some(Ok(through)) => (BlockDevice::new(through, "mqvisor-state", true), Some(file)),
            // No /proc to reopen through, say: FLUSH requests, as in `batch`.
            _ => (BlockDevice::new(file, "mqvisor-state", false), None),
        };
        let mut device = device.map_err(VmmError::StateFile)?;
        if let Some(standby) = standby {
            device = device.with_standby(standby);
        }
        let transport = MmioTransport::new(device, mem.clone()).map_err(VmmError::Thread)?;
        let event = transport.queue_event(0).ok_or(VmmError::NoQueueEvent)?;
        let addr = IoEventAddress::Mmio(base + mmio::QUEUE_NOTIFY_OFFSET);
        vm.register_ioevent(event, &addr, 0u32).map_err(kvm_err("KVM_IOEVENTFD"))?;
        let transport = Arc::new(Mutex::new(transport));
        let thread = BlockThread::spawn(transport.clone(), wake, give_up).map_err(VmmError::Thread)?;
        let window = DeviceDescriptor { base, size: layout::DEVICE_SIZE, kind: device_kind::VIRTIO_BLK, reserved: 0 };
        Ok((Disk { transport, thread, _locked: locked }, window))
    }

    fn stop(self) -> DiskCounters {
        self.thread.stop();
        let Ok(transport) = self.transport.lock() else { return DiskCounters::default() };
        let m = transport.device().metrics();
        let get = BlockMetrics::get;
        DiskCounters {
            reads: get(&m.reads),
            writes: get(&m.writes),
            flushes: get(&m.flushes),
            bytes_written: get(&m.bytes_written),
            refused_requests: get(&m.malformed),
            io_errors: get(&m.io_errors),
            ring_faults: get(&m.ring_faults),
        }
    }
}

/// A snapshot of the block device's counters.
#[derive(Debug, Default, Clone, Copy)]
pub struct DiskCounters {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub bytes_written: u64,
    /// Requests refused for breaking the protocol.
    pub refused_requests: u64,
    /// Requests the host file failed.
    pub io_errors: u64,
    pub ring_faults: u64,
}

/// The most client connections the service may carry in a heap of `heap`
/// bytes, or why its settings do not fit (`mqvisor_boot_abi::capacity`).
fn connection_limit(service: Service, heap: u64, memory_mib: u32) -> Result<usize, VmmError> {
    match service {
        Service::Demo => Ok(0),
        Service::Echo { .. } => {
            let fit = capacity::connections(heap, capacity::ECHO_CONNECTION, 0);
            Ok(usize::try_from(fit).unwrap_or(usize::MAX))
        }
        Service::Mqtt { max_connections, max_packet_size, .. } => {
            let packet = (max_packet_size as u64).saturating_mul(capacity::PACKET_COPIES);
            if packet.saturating_add(capacity::LINK_FIXED) > heap {
                return Err(VmmError::PacketDoesNotFit { packet_size: max_packet_size, memory_mib });
            }
            let fit = capacity::connections(heap, capacity::MQTT_CONNECTION, packet);
            if max_connections as u64 > fit {
                return Err(VmmError::ConnectionsDoNotFit { connections: max_connections, memory_mib, capacity: fit });
            }
            Ok(max_connections)
        }
    }
}

/// Fills `buf` from the kernel's random number generator.
fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`,
        // which is valid, writable memory of that length.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(n) {
            Ok(n) => filled += n,
            Err(_) if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Err(std::io::Error::last_os_error()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_starts_on_the_page_after_the_image() {
        let info = boot_info(32 << 20, 0x20_a001, "").unwrap();
        assert_eq!((info.heap_start, info.heap_end), (0x20_b000, 32 << 20));
        assert!(info.is_valid());
    }

    #[test]
    fn cmdline_is_copied_and_bounded() {
        let info = boot_info(32 << 20, 0x20_0000, "exit=3 sleeps=0").unwrap();
        assert_eq!(info.cmdline(), Some("exit=3 sleeps=0"));
        let long = "x".repeat(CMDLINE_CAPACITY + 1);
        assert!(matches!(boot_info(32 << 20, 0x20_0000, &long), Err(VmmError::CmdlineTooLong(1025))));
    }

    fn config(memory_mib: u32, config_blob: Vec<u8>) -> VmConfig {
        VmConfig {
            image: crate::DEFAULT_IMAGE.to_vec(),
            memory_mib,
            cmdline: String::new(),
            timeout: None,
            // Never opened: the refusals under test come before KVM.
            kvm_device: PathBuf::from("/nonexistent/kvm"),
            console: Box::new(std::io::sink()),
            service: Service::Demo,
            config_blob,
            handoff: None,
            edge: Edge::default(),
            quotas: Quotas::default(),
            run_as: None,
            state: None,
        }
    }

    #[test]
    fn memory_out_of_range_is_refused_before_kvm() {
        for mib in [0, MAX_MEMORY_MIB + 1] {
            assert!(matches!(run(config(mib, Vec::new())), Err(VmmError::MemoryOutOfRange(m)) if m == mib));
        }
    }

    #[test]
    fn an_oversize_configuration_blob_is_refused_before_kvm() {
        let blob = vec![0u8; usize::try_from(config_blob::MAX_LEN).unwrap() + 1];
        assert!(matches!(run(config(32, blob)), Err(VmmError::ConfigTooLarge(_))));
    }

    #[test]
    fn missing_kvm_device_is_explained() {
        let err = open_kvm(std::path::Path::new("/nonexistent/kvm")).unwrap_err();
        assert!(matches!(err, VmmError::KvmMissing(_)), "{err}");
        assert!(err.to_string().contains("does not expose KVM"));
    }
}
