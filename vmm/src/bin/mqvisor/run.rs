//! `mqvisor run`: one tenant VM in the foreground. Everything it needs is
//! set up first ([`prepare`]: image, settings, handoff socket, user,
//! control group, state file), and a refusal at any step is one line and
//! its exit code; then the VM runs, and how it ended becomes the exit
//! status. The VM itself is the library's (`mqvisor::vm`).

use std::process::ExitCode;

use mqvisor::cgroup::Departure;
use mqvisor::state::Persistence;
use mqvisor::vcpu::Outcome;
use mqvisor::vm::{self, RunReport, Service, VmConfig};

use crate::cli::{RunArgs, ServiceKind};
use crate::edge::{self, Listen};
use crate::fd_limit;
use crate::quotas::{self, QuotaFlags};
use crate::settings::TenantRun;
use mqvisor::devices::virtio::block::Standby;
use mqvisor::replica::Mirror;

/// Exit code when the VM could not be started (bad input, no KVM, ...).
pub const EXIT_SETUP_FAILED: u8 = 125;
/// Exit code when the guest crashed (fault, triple fault, unexpected exit).
const EXIT_GUEST_CRASHED: u8 = 126;
/// Exit code when `--timeout` passed before the guest exited.
const EXIT_TIMED_OUT: u8 = 124;
/// Exit code when the state file cannot be used (the guest's own for it).
const EXIT_BAD_STATE: u8 = 5;
/// Size of a new state file unless `--state-size` (or a discarded file) gives one, MiB.
const DEFAULT_STATE_MIB: u64 = 1024;

/// Why `run` stopped before its VM ran: its exit code and its one line.
#[derive(Debug)]
struct Refusal {
    code: u8,
    message: String,
}

impl Refusal {
    /// The VM could not be started (exit 125).
    fn setup(message: impl std::fmt::Display) -> Refusal {
        Refusal { code: EXIT_SETUP_FAILED, message: message.to_string() }
    }
}

/// What `run` set up before the VM runs.
struct Prepared {
    config: VmConfig,
    /// The way out of a control group made here, for the end of the run.
    departure: Option<Departure>,
}

/// `mqvisor run`: sets the VM up, runs it and maps how it ended to the
/// exit status, each failure one line on stderr.
pub fn run(args: RunArgs) -> ExitCode {
    let stats = args.stats;
    let ran = prepare(args).and_then(|Prepared { config, departure }| {
        let report = vm::run(config).map_err(Refusal::setup)?;
        Ok((report, departure))
    });
    let (report, departure) = match ran {
        Ok(ran) => ran,
        Err(Refusal { code, message }) => {
            eprintln!("mqvisor: {message}");
            return ExitCode::from(code);
        }
    };
    // The VM and its descriptors are gone, and KVM's worker thread with
    // them: the group can go too (else the next VMM's sweep removes it).
    if let Some(departure) = departure {
        departure.leave();
    }
    if stats {
        print_stats(&report);
    }
    exit_status(report.outcome)
}

/// Everything before the VM boots, in order: inherited descriptors closed,
/// the handoff socket checked, a `serve` tenant's settings taken (a spare
/// waits for them first), the image read, the broker settings
/// resolved, the user checked, the control group
/// entered, the state file opened and locked.
fn prepare(mut args: RunArgs) -> Result<Prepared, Refusal> {
    close_inherited(args.handoff_fd);
    let handoff =
        args.handoff_fd.map(handoff_socket).transpose().map_err(|e| Refusal::setup(format!("--handoff-fd: {e}")))?;
    if let (true, Some(socket)) = (args.tenant_settings_from_handoff, &handoff) {
        args.tenant_settings = Some(crate::serve::spare::await_assignment(socket).map_err(Refusal::setup)?);
    }
    if let Some(path) = &args.tenant_settings {
        args.take_tenant(TenantRun::read(path).map_err(Refusal::setup)?);
    }
    let image = match &args.image {
        None => mqvisor::DEFAULT_IMAGE.to_vec(),
        Some(path) => {
            std::fs::read(path).map_err(|e| Refusal::setup(format!("cannot read image {}: {e}", path.display())))?
        }
    };
    let not_broker: Vec<&str> = edge::CONFIG_KEYS.iter().chain(quotas::CONFIG_KEYS).copied().collect();
    let (settings, mut edge_keys) = args.broker.resolve_taking(&not_broker).map_err(Refusal::setup)?;
    let mut quota_keys = toml::Table::new();
    for key in quotas::CONFIG_KEYS {
        if let Some(value) = edge_keys.remove(*key) {
            quota_keys.insert((*key).to_string(), value);
        }
    }
    let quotas = args.quotas.resolve(quota_keys).map_err(Refusal::setup)?;
    let base = args.broker.config.as_deref().and_then(std::path::Path::parent).unwrap_or(std::path::Path::new(""));
    let max_packet = settings.config.max_packet_size;
    let edge = if args.handoff_fd.is_some() {
        // The daemon listens: the TLS files serve the clients it hands over.
        args.edge.resolve_handoff(max_packet).map_err(Refusal::setup)?
    } else {
        args.edge.resolve(edge_keys, base, args.listen, max_packet).map_err(Refusal::setup)?
    };
    let listen = match args.listen {
        Listen::At(addr) => addr,
        // No plain listener is bound: the address is not used.
        Listen::None => std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    let run_as = args.user.as_deref().map(mqvisor::privileges::RunAs::lookup).transpose().map_err(Refusal::setup)?;
    let departure = enter_cgroup(&args).map_err(Refusal::setup)?;
    let state = open_state(&args, settings.config.max_packet_size as u64)?;
    if let ServiceKind::Mqtt | ServiceKind::Echo = args.service {
        fd_limit::raise_for(settings.config.max_connections);
    }
    let config = VmConfig {
        state,
        run_as,
        handoff,
        edge,
        quotas,
        config_blob: if args.service == ServiceKind::Mqtt { settings.config_blob() } else { Vec::new() },
        image,
        memory_mib: args.memory,
        cmdline: args.cmdline,
        timeout: args.timeout,
        kvm_device: args.kvm_device,
        console: Box::new(std::io::stdout()),
        service: match args.service {
            ServiceKind::Mqtt => Service::Mqtt {
                listen,
                max_connections: settings.config.max_connections,
                max_packet_size: settings.config.max_packet_size,
            },
            ServiceKind::Echo => Service::Echo { listen },
            ServiceKind::Demo => Service::Demo,
        },
    };
    Ok(Prepared { config, departure })
}

/// How the VM ended, as one line (when there is something to say) and the
/// exit status.
fn exit_status(outcome: Outcome) -> ExitCode {
    let rip = |rip: Option<u64>| rip.map_or_else(|| "unknown".to_string(), |r| format!("{r:#x}"));
    match outcome {
        Outcome::Exited { code, message } => {
            if !message.is_empty() {
                eprintln!("mqvisor: guest exited with code {code}: {message}");
            }
            ExitCode::from(u8::try_from(code).unwrap_or(u8::MAX))
        }
        Outcome::Crashed { reason, rip: at } => {
            eprintln!("mqvisor: guest crashed: {reason} at RIP {}", rip(at));
            ExitCode::from(EXIT_GUEST_CRASHED)
        }
        Outcome::HostFailed { reason } => {
            eprintln!("mqvisor: {reason}");
            ExitCode::from(EXIT_SETUP_FAILED)
        }
        Outcome::Stopped { signal } => {
            eprintln!("mqvisor: stopped by signal {signal}; clients were disconnected cleanly");
            ExitCode::from(u8::try_from(128 + signal).unwrap_or(u8::MAX))
        }
        Outcome::TimedOut { after, rip: at } => {
            eprintln!(
                "mqvisor: guest did not exit within --timeout ({:.1} s); stopped at RIP {}",
                after.as_secs_f64(),
                rip(at)
            );
            ExitCode::from(EXIT_TIMED_OUT)
        }
    }
}

/// Closes every descriptor this process inherited beyond the standard
/// streams, except `keep`: a VMM holds only what it opened itself.
fn close_inherited(keep: Option<i32>) {
    let keep = keep.and_then(|fd| u32::try_from(fd).ok()).filter(|&fd| fd >= 3);
    let ranges = match keep {
        // An empty first range (3..=2, when keeping 3) is refused: harmless.
        Some(fd) => vec![(3, fd - 1), (fd + 1, u32::MAX)],
        None => vec![(3, u32::MAX)],
    };
    for (first, last) in ranges {
        // SAFETY: close_range(2) only closes descriptors in the range; no
        // object of this process owns one yet (nothing has been opened).
        unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
    }
}

impl RunArgs {
    /// Runs with a `serve` tenant's settings (`--tenant-settings`).
    fn take_tenant(&mut self, tenant: TenantRun) {
        self.memory = tenant.memory;
        self.user = tenant.user;
        self.persistence = Some(tenant.persistence);
        self.state = tenant.state;
        self.cgroup = tenant.cgroup;
        self.broker = tenant.broker;
        self.edge.tls_cert = tenant.tls_cert;
        self.edge.tls_key = tenant.tls_key;
        self.edge.tls_client_ca = tenant.tls_client_ca;
        self.edge.tls_identity_as_user = tenant.tls_identity_as_user;
        self.quotas = QuotaFlags::of(tenant.quotas);
        self.standby = tenant.standby;
        self.standby_required = tenant.standby_required;
        self.edge.tls_named =
            tenant.tls_own.map(|own| mqvisor::net::tls::NamedCert { names: own.names, cert: own.cert, key: own.key });
    }
}

/// Moves this process into its control group, made here from the limit
/// flags or by `mqvisor serve` (`--cgroup`), before any guest memory is
/// touched or thread started: both are charged where they begin. Returns
/// the way out of a group made here, for the end of the run (serve's
/// groups outlive the process: serve removes them).
fn enter_cgroup(args: &RunArgs) -> Result<Option<mqvisor::cgroup::Departure>, String> {
    use mqvisor::cgroup::{Group, Limits};
    let limits = Limits { cpus: args.cpus, memory_mib: args.memory_limit, pids: args.pids_limit };
    if !args.cgroup.is_empty() {
        Group { dirs: args.cgroup.clone() }.join().map_err(|e| e.to_string())?;
        return Ok(None);
    }
    let group = if limits.is_empty() {
        return Ok(None);
    } else {
        let group = Group::create(&format!("run-{}", std::process::id()), &limits).map_err(|e| e.to_string())?;
        if let Some(limit) = args.memory_limit.filter(|&limit| limit <= u64::from(args.memory)) {
            eprintln!(
                "mqvisor: note: --memory-limit {limit} MiB is not above guest RAM ({} MiB): the kernel kills \
                 the VMM if the guest touches that much",
                args.memory
            );
        }
        group
    };
    group.join().map_err(|e| e.to_string())?;
    Ok(Some(group.departure()))
}

/// Opens (or creates, sparse, at `--state-size`) the state file, when
/// `--state` is given and persistence is not `off`, and holds its lock for
/// the VM's life (the descriptor is the state disk's). A refusal is its
/// exit code and one line.
fn open_state(args: &RunArgs, max_packet_size: u64) -> Result<Option<vm::StateDisk>, Refusal> {
    use mqvisor::state;
    let setup = Refusal::setup;
    let mode = args.persistence.unwrap_or(if args.state.is_some() { Persistence::Sync } else { Persistence::Off });
    let path = match (&args.state, mode) {
        (_, Persistence::Off) => return Ok(None),
        (None, _) => return Err(setup("--persistence sync or batch needs --state PATH".into())),
        (Some(path), _) => path,
    };
    if args.service != ServiceKind::Mqtt {
        return Err(setup("--state is only for --service mqtt".into()));
    }
    // A file-size limit must fail a write (EFBIG: sizing a new file here,
    // or a guest write, reported to it as an I/O error), not kill the VMM
    // with SIGXFSZ.
    // SAFETY: SIG_IGN for SIGXFSZ installs no handler code.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    // Locked before anything reads or moves it: a file another VM holds is refused.
    let mut held = state::open_exclusive(path).map_err(|e| setup(e.to_string()))?;
    let len = held.file.metadata().map_err(|e| setup(format!("{}: {e}", path.display())))?.len();
    state::refuse_size(path, len).map_err(setup)?;
    let mut new_len = (len == 0).then(|| args.state_size.unwrap_or(DEFAULT_STATE_MIB) << 20);
    if args.discard_corrupt_state && len > 0 {
        match state::check(&held.file) {
            Ok(_) => {}
            Err(e) if state::is_damage(&e) => {
                // A new file of the discarded one's size, unless told otherwise.
                let size = args.state_size.map_or(len, |mib| mib << 20);
                state::fits(path, size, max_packet_size, true).map_err(setup)?;
                let aside =
                    state::move_aside(path).map_err(|e| setup(format!("cannot move {} aside: {e}", path.display())))?;
                // The moved file stays locked until the new one is.
                held = state::open_exclusive(path).map_err(|e| setup(e.to_string()))?;
                if !held.created {
                    return Err(setup(format!("{} was made again while it was moved aside", path.display())));
                }
                eprintln!(
                    "mqvisor: the state in {} is corrupt ({e}); kept as {}, starting empty",
                    path.display(),
                    aside.display()
                );
                new_len = Some(size);
            }
            Err(e) => {
                let message = format!(
                    "{}: {e}; not moved aside: --discard-corrupt-state discards only a damaged log",
                    path.display()
                );
                return Err(Refusal { code: EXIT_BAD_STATE, message });
            }
        }
    }
    match new_len {
        Some(size) => {
            let laid_out =
                state::fits(path, size, max_packet_size, true).and_then(|()| state::lay_out(&held.file, path, size));
            if let Err(e) = laid_out {
                held.remove_new(path);
                return Err(setup(e));
            }
        }
        None => {
            // The regions are placed by the size the log was laid out for;
            // a file that is not (or no longer) one is the guest's to refuse.
            if let Some(laid_out) = state::laid_out_len(&held.file, len) {
                state::fits(path, laid_out, max_packet_size, false).map_err(setup)?;
            }
            if let Some(mib) = args.state_size.filter(|&mib| mib << 20 != len) {
                eprintln!(
                    "mqvisor: note: --state-size is for new files; {} keeps its {} (not {mib} MiB)",
                    path.display(),
                    state::size_text(len)
                );
            }
        }
    }
    let standby = match (&args.standby, args.standby_required) {
        (Some(target), required) => Some(mirror_to(target, required, &held.file)),
        // Every write fails until `mqvisor serve` offers a standby.
        (None, true) => Some(Standby { mirror: None, required: true }),
        (None, false) => None,
    };
    Ok(Some(vm::StateDisk { file: held.file, persistence: mode, batch_ms: args.persistence_interval, standby }))
}

/// Starts mirroring the state `file` to the fleet's standby `target`
/// (`mqvisor::replica`) before the guest boots: its present contents
/// first, then every write. A standby out of reach is said; the disk then
/// fails every write when the standby is `required`, and does without it
/// otherwise.
fn mirror_to(target: &crate::settings::StandbyTarget, required: bool, file: &std::fs::File) -> Standby {
    let started = std::time::Instant::now();
    let mirror = (|| -> Result<Mirror, String> {
        let socket = crate::serve::relay::connect_replica(target)?;
        let len = file.metadata().map_err(|e| e.to_string())?.len();
        Mirror::start(Mirror::prepare(socket).map_err(|e| e.to_string())?, file, len).map_err(|e| e.to_string())
    })();
    match &mirror {
        Ok(_) => eprintln!(
            "mqvisor: state mirrored to the standby at {} (copy made in {} ms)",
            target.address,
            started.elapsed().as_millis()
        ),
        Err(e) => {
            let then = if required { "every write to the state fails" } else { "going on without one" };
            eprintln!("mqvisor: no standby at {}: {e}; {then}", target.address);
        }
    }
    Standby { mirror: mirror.ok(), required }
}

/// The unix datagram socket `mqvisor serve` left open as descriptor `fd`.
fn handoff_socket(fd: i32) -> Result<std::os::unix::net::UnixDatagram, String> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    if fd < 3 {
        return Err(format!("{fd} is a standard stream, not a socket"));
    }
    // F_GETFD succeeds only on an open descriptor.
    // SAFETY: fcntl with F_GETFD reads the flags of any descriptor number.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!("descriptor {fd} is not open"));
    }
    // SAFETY: `fd` is open (checked above) and was passed to this process for
    // it to own; nothing else in the process uses it.
    let socket = std::os::unix::net::UnixDatagram::from(unsafe { OwnedFd::from_raw_fd(fd) });
    // A datagram socket answers SO_TYPE with SOCK_DGRAM; anything else is refused.
    let mut kind: libc::c_int = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4);
    // SAFETY: getsockopt on an open descriptor with a pointer to a live c_int
    // and its length.
    let ok = unsafe {
        libc::getsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, libc::SO_TYPE, (&raw mut kind).cast(), &mut len)
    };
    if ok != 0 || kind != libc::SOCK_DGRAM {
        return Err(format!("descriptor {fd} is not a datagram socket"));
    }
    Ok(socket)
}

fn print_stats(report: &RunReport) {
    let exits = &report.exits;
    eprint!(
        "mqvisor: stats: exits {} (port I/O {}, MMIO {}, other {}), queue notifications {}",
        exits.total(),
        exits.port_io,
        exits.mmio,
        exits.other,
        report.notifications
    );
    if let Some(net) = &report.net {
        eprint!(
            ", guest tx {} frames / {} bytes, guest rx {} frames / {} bytes, refused chains {}, ring faults {}, \
             bad frames {}, bad records {}, slow clients shed {}, silent clients dropped {}, TLS handshakes \
             refused {}",
            net.tx_frames,
            net.tx_bytes,
            net.rx_frames,
            net.rx_bytes,
            net.refused_chains,
            net.ring_faults,
            net.bad_frames,
            net.bad_records,
            net.shed_clients,
            net.silent_clients_dropped,
            net.refused_handshakes
        );
        if let Some(fault) = &report.last_ring_fault {
            eprint!(" (last: {fault})");
        }
        if net.throttled_read_us + net.throttled_write_us + net.throttled_connections > 0 {
            eprint!(
                ", throttled: reads {} us, writes {} us, bytes in {}, bytes out {}, publishes {}, connections {}",
                net.throttled_read_us,
                net.throttled_write_us,
                net.throttled_bytes_in,
                net.throttled_bytes_out,
                net.throttled_publishes,
                net.throttled_connections
            );
        }
    }
    if let Some(disk) = &report.disk {
        eprint!(
            ", disk reads {}, writes {} / {} bytes, flushes {}, refused requests {}, I/O errors {}, ring faults {}",
            disk.reads,
            disk.writes,
            disk.bytes_written,
            disk.flushes,
            disk.refused_requests,
            disk.io_errors,
            disk.ring_faults
        );
    }
    eprintln!();
}
