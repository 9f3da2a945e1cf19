//! The `mqvisor` command: parses arguments, runs a VM or a benchmark, and maps
//! the result to a one-line message and an exit code. No VM logic lives here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

mod bench;
mod broker_runner;
mod fd_limit;
mod procfs;
mod serve;
mod settings;

use clap::{Parser, Subcommand};
use mqvisor::state::Persistence;
use mqvisor::vcpu::Outcome;
use mqvisor::vm::{self, RunReport, Service, VmConfig};
use settings::{BrokerFlags, TenantRun};

/// Exit code when the VM could not be started (bad input, no KVM, ...).
const EXIT_SETUP_FAILED: u8 = 125;
/// Guest RAM of a tenant VM unless told otherwise, MiB.
const DEFAULT_MEMORY_MIB: u32 = 64;
/// Exit code when the guest crashed (fault, triple fault, unexpected exit).
const EXIT_GUEST_CRASHED: u8 = 126;
/// Exit code when `--timeout` passed before the guest exited.
const EXIT_TIMED_OUT: u8 = 124;
/// Exit code when the state file cannot be used (the guest's own for it).
const EXIT_BAD_STATE: u8 = 5;
/// Size of a new state file unless `--state-size` (or a discarded file) gives one, MiB.
const DEFAULT_STATE_MIB: u64 = 1024;

#[derive(Parser)]
#[command(
    name = "mqvisor",
    version,
    about = "Per-tenant MQTT brokers, each in its own KVM microVM",
    long_about = "Per-tenant MQTT brokers, each in its own KVM microVM.\n\n\
                  `mqvisor run` boots one tenant VM in the foreground from the image built into \
                  this binary (or --image) and serves MQTT on --listen (default 127.0.0.1:1883). \
                  Needs read/write access to /dev/kvm."
)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Boot one tenant VM in the foreground and wait for it to exit.
    #[command(after_help = "Exit status: the guest's exit code (0-255; larger codes become 255), \
                            124 if --timeout passed, 125 if the VM could not be started, \
                            126 if the guest crashed, 128+N when stopped by signal N (Ctrl-C: 130).")]
    Run(Box<RunArgs>),
    /// Run the broker core natively on the host (development, tests and
    /// side-by-side benchmarks; tenants run in VMs with `mqvisor run`).
    Broker(BrokerArgs),
    /// Serve many tenants, each a VM in its own process booted on its first
    /// client, behind one port (CONNECT user name TENANT:USER) and optional
    /// per-tenant ports. Stops every tenant on SIGTERM or Ctrl-C.
    #[command(after_help = "The configuration file (TOML):\n\n\
        listen = \"127.0.0.1:1883\"      # the shared port\n\
        state_dir = \"/var/lib/mqvisor\"  # tenants' files; control.sock for `mqvisor tenant`\n\
        metrics_listen = \"127.0.0.1:9183\"  # optional: GET /metrics (Prometheus)\n\n\
        [defaults]                      # memory and any broker setting of `mqvisor run`\n\
        memory = 64\n\n\
        [tenants.acme]                  # clients connect as acme:USER\n\
        password_file = \"acme.passwd\"   # optional; without it, anonymous clients are allowed\n\
        listen = \"127.0.0.1:1884\"       # optional port of its own, no prefix needed\n\
        idle_stop_after = 600           # optional: stop its VM after 10 idle minutes\n\
        persistence = \"sync\"            # the default: state in STATE_DIR/tenants/acme.state (\"batch\", \"off\")\n\
        user = \"mqvisor-acme\"           # optional, daemon started as root: its process's user\n\
        cpus = 0.5                      # optional limits of its process (cgroups): CPUs,\n\
        memory_limit = 128              #   MiB with guest RAM,\n\
        pids_limit = 16                 #   tasks (as `mqvisor run --cpus ...`)\n\n\
        A tenant whose settings cannot be used is listed as failed, with the reason, and not served; the \
        others are.\n\n\
        Exit status: 0 after SIGTERM or Ctrl-C, 125 if the daemon's own settings (the file, listen, \
        state_dir, control_socket, metrics_listen, [defaults]) are unusable.")]
    Serve(ServeArgs),
    /// Look at and change the tenants of a running `mqvisor serve`.
    Tenant(TenantArgs),
    /// Check a state file (`run --state`) without booting: what a VM would
    /// recover from it, or where it is damaged.
    #[command(after_help = "Exit status: 0 when the state can be recovered (a torn last batch, which was never \
                            acknowledged, is dropped as at boot) or the file has no state yet (empty, or all \
                            zeros), 1 when it is damaged in the middle, not a state file (or not a regular \
                            file: symbolic links are not followed), too small (under 4 MiB) or unreadable. \
                            It takes no lock: a file a running VM holds is read as it is at that moment, and \
                            the output says so.")]
    StateCheck {
        /// The state file
        #[arg(value_name = "PATH")]
        path: PathBuf,
    },
    /// Measure mqvisor itself.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(clap::Args)]
struct TenantArgs {
    /// The daemon's control socket (its `control_socket`, by default STATE_DIR/control.sock)
    #[arg(
        long,
        value_name = "PATH",
        env = "MQVISOR_SOCKET",
        default_value = "/var/lib/mqvisor/control.sock",
        global = true
    )]
    socket: PathBuf,
    /// Print the daemon's JSON answer instead of a table
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    action: TenantAction,
}

#[derive(Subcommand)]
enum TenantAction {
    /// Every tenant: state, process, connections, memory
    List,
    /// One tenant
    Show { name: String },
    /// Add a tenant while serving (kept across daemon restarts)
    Add {
        name: String,
        /// TOML file with the tenant's settings, as in a [tenants.NAME] table
        #[arg(long, value_name = "PATH")]
        settings: Option<PathBuf>,
    },
    /// Remove a tenant: its clients are disconnected and its VM stopped
    Remove { name: String },
    /// Restart a tenant's VM now
    Restart { name: String },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// The daemon's configuration file (see below)
    #[arg(long, value_name = "PATH")]
    config: PathBuf,
}

#[derive(clap::Args)]
struct BrokerArgs {
    /// Address to serve MQTT on
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:1883")]
    listen: SocketAddr,
    #[command(flatten)]
    broker: BrokerFlags,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Guest image (static x86-64 ELF following the mqvisor boot ABI) [default: built-in image]
    #[arg(long, value_name = "PATH")]
    image: Option<PathBuf>,
    /// Guest RAM in MiB (pages are only allocated when the guest touches them;
    /// the default holds 10,000 idle MQTT connections and 20 MiB of messages)
    #[arg(long, value_name = "MIB", default_value_t = DEFAULT_MEMORY_MIB,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(vm::MAX_MEMORY_MIB)))]
    memory: u32,
    /// Stop the guest after this many seconds (fractions allowed) [default: no limit]
    #[arg(long, value_name = "SECS", value_parser = parse_timeout)]
    timeout: Option<Duration>,
    /// Command line passed to the guest (see images/default.md for the built-in image's words)
    #[arg(long, value_name = "STRING", default_value = "")]
    cmdline: String,
    /// KVM device node
    #[arg(long, value_name = "PATH", default_value = "/dev/kvm", env = "MQVISOR_KVM_DEVICE")]
    kvm_device: PathBuf,
    /// What the guest runs: an MQTT broker, TCP echo (to test the network
    /// path), or the boot demo (banner, timer, exit; no network)
    #[arg(long, value_enum, default_value = "mqtt")]
    service: ServiceKind,
    /// Host address tenant clients connect to; every connection is carried into the guest
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:1883")]
    listen: SocketAddr,
    /// Print VM exit and network counters to stderr when the VM ends
    #[arg(long)]
    stats: bool,
    /// Started as root: become this user (and its group) once /dev/kvm is
    /// open and the listener bound, with no capabilities left
    #[arg(long, value_name = "NAME")]
    user: Option<String>,
    /// Take clients from `mqvisor serve` on this inherited unix datagram
    /// socket instead of listening (internal)
    #[arg(long, value_name = "FD", hide = true)]
    handoff_fd: Option<i32>,
    /// Keep the broker's state (retained messages, sessions, subscriptions,
    /// queued messages) in this file, created if missing, and restore it at
    /// start (see docs/state-format.md)
    #[arg(long, value_name = "PATH")]
    state: Option<PathBuf>,
    /// Size of a new state file in MiB (sparse: blocks are used as the log
    /// grows; the log and its compacted copy share it); an existing file
    /// keeps its size. Each half of what follows the first MiB must hold
    /// --max-packet-size and 1 MiB more [default: 1024, or a discarded
    /// file's own size]
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(4..=1 << 20))]
    state_size: Option<u64>,
    /// When acknowledgements wait for the disk: `sync` answers PUBACK,
    /// PUBREC, SUBACK and a resumed session's CONNACK only once their
    /// records are flushed (nothing acknowledged is lost); `batch` flushes
    /// every --persistence-interval and may lose that long a window;
    /// `off` keeps state in RAM only [default: sync with --state]
    #[arg(long, value_enum, value_name = "MODE")]
    persistence: Option<Persistence>,
    /// Flush interval of `--persistence batch`, in milliseconds
    #[arg(long, value_name = "MS", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=60_000))]
    persistence_interval: u32,
    /// With --state: start with an empty state when the log is damaged,
    /// instead of refusing to start (the damaged file is kept as
    /// PATH.corrupt, or PATH.corrupt.N when that is taken, and a new file of
    /// its size made). Only damage: a resized file, not a state file or
    /// another format is refused all the same (exit 5)
    #[arg(long, requires = "state")]
    discard_corrupt_state: bool,
    /// Hold the VM to this many CPUs' time (0.5: half of one CPU), through a
    /// control group; a guest that spins is throttled, not stopped [default: no limit]
    #[arg(long, value_name = "N", help_heading = "Resource limits (root, or a delegated cgroup)")]
    cpus: Option<f64>,
    /// Hold the whole VMM process, guest RAM as the guest touches it
    /// included, to this many MiB; past it the kernel kills the VMM [default: no limit]
    #[arg(long, value_name = "MIB", help_heading = "Resource limits (root, or a delegated cgroup)")]
    memory_limit: Option<u64>,
    /// Hold the VMM to this many tasks, at least 5 (its 4 threads and KVM's
    /// worker thread) [default: no limit]
    #[arg(long, value_name = "N", help_heading = "Resource limits (root, or a delegated cgroup)")]
    pids_limit: Option<u32>,
    /// Join this control group directory, made by `mqvisor serve` with the
    /// tenant's limits (internal)
    #[arg(long, value_name = "DIR", hide = true, conflicts_with_all = ["cpus", "memory_limit", "pids_limit"])]
    cgroup: Vec<PathBuf>,
    /// Run as `mqvisor serve`'s tenant: memory, user, persistence, state
    /// file, control group and broker settings from this file (internal)
    #[arg(long, value_name = "PATH", hide = true,
          conflicts_with_all = ["memory", "user", "persistence", "state", "cgroup", "config", "cpus", "memory_limit", "pids_limit"])]
    tenant_settings: Option<PathBuf>,
    #[command(flatten)]
    broker: BrokerFlags,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ServiceKind {
    Mqtt,
    Echo,
    Demo,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Cold starts of `mqvisor run`: exec->banner, KVM_CREATE_VM->first guest
    /// instruction, peak RSS; compared with Firecracker's published figure.
    Boot {
        /// Number of cold starts
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        runs: u32,
        /// Guest RAM in MiB
        #[arg(long, default_value_t = DEFAULT_MEMORY_MIB)]
        memory: u32,
    },
    /// TCP echo through a tenant VM beside the same echo over host loopback:
    /// throughput, round-trip p50/p99, and VM exits per MB moved.
    Echo {
        /// Concurrent connections in the throughput test
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1000))]
        connections: u32,
        /// Seconds of bulk transfer per target
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=600))]
        seconds: u64,
        /// Guest RAM in MiB
        #[arg(long, default_value_t = 64)]
        memory: u32,
    },
    /// A host of tenants behind `mqvisor serve`: PSS per idle tenant, first
    /// CONNACK for a stopped and a running tenant, and QoS 1 throughput
    /// through the shared port beside `mqvisor run` and Mosquitto.
    Serve {
        /// Tenants, each booted by one client that stays connected
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=5000))]
        tenants: u32,
        /// QoS 1 messages in the throughput comparison
        #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(100..=10_000_000))]
        messages: u32,
    },
    /// What durable state costs: QoS 1 1->1 and 10->1 to durable subscribers
    /// with --persistence sync, batch and off beside Mosquitto with and
    /// without persistence, flushes per message, then the restart time and
    /// state file size with N retained messages beside Mosquitto's.
    State {
        /// Multiplies the message counts (1.0: 20k QoS 1 messages per topology)
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// Retained messages for the recovery measurement (0: skip it)
        #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u32).range(0..=5_000_000))]
        retained: u32,
        /// Guest RAM in MiB for the recovery measurement
        #[arg(long, default_value_t = 2048)]
        memory: u32,
    },
    /// What connections cost: PSS per idle connection, new connections per
    /// second, PSS after churn, and a large message's QoS 1 round trip, for
    /// Mosquitto, the host-native runner and a tenant VM side by side.
    Conns {
        /// Idle CONNECTed connections held at once
        #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        idle: u32,
        /// Sequential connect/CONNACK/DISCONNECT cycles
        #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        churn: u32,
        /// Payload of the round-trip message, MiB
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=255))]
        large_mib: u32,
        /// Leave out the tenant VM
        #[arg(long)]
        no_vm: bool,
    },
    /// What a hostile tenant costs its neighbour: a healthy tenant VM's QoS 1
    /// round trips just before and during each attack of the hostile test
    /// image (and under --cpus / --memory-limit), beside a healthy second VM
    /// as the control, over several rounds.
    Hostile {
        /// The hostile image [default: the one built beside this binary]
        #[arg(long, value_name = "PATH")]
        image: Option<PathBuf>,
        /// Rounds per attack (each: before, then during)
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
        rounds: u32,
        /// Round trips per phase
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(100..=1_000_000))]
        samples: u32,
    },
    /// MQTT throughput and p50/p99 latency for QoS 0/1/2 in 1->1, 10->1 and
    /// 1->100 topologies with 100-byte payloads: Mosquitto (the anchor), the
    /// host-native runner and a tenant VM, side by side in one run.
    Mqtt {
        /// Multiplies the message counts (1.0: 100k QoS 0, 20k QoS 1, 10k QoS 2 per topology)
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// Leave out the tenant VM (compare the host-native runner only)
        #[arg(long)]
        no_vm: bool,
        /// Guest RAM in MiB for the VM target (101 connections need room)
        #[arg(long, default_value_t = 128)]
        memory: u32,
    },
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    let secs: f64 = text.parse().map_err(|_| format!("`{text}` is not a number of seconds"))?;
    if secs.is_nan() || secs <= 0.0 {
        return Err("the timeout must be greater than zero".into());
    }
    Duration::try_from_secs_f64(secs).map_err(|_| format!("`{text}` seconds is too long"))
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

fn run(mut args: RunArgs) -> ExitCode {
    close_inherited(args.handoff_fd);
    if let Some(path) = &args.tenant_settings {
        match TenantRun::read(path) {
            Ok(tenant) => args.take_tenant(tenant),
            Err(e) => {
                eprintln!("mqvisor: {e}");
                return ExitCode::from(EXIT_SETUP_FAILED);
            }
        }
    }
    let image = match &args.image {
        None => mqvisor::DEFAULT_IMAGE.to_vec(),
        Some(path) => match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) => {
                eprintln!("mqvisor: cannot read image {}: {e}", path.display());
                return ExitCode::from(EXIT_SETUP_FAILED);
            }
        },
    };
    let settings = match args.broker.resolve() {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("mqvisor: {e}");
            return ExitCode::from(EXIT_SETUP_FAILED);
        }
    };
    let handoff = match args.handoff_fd.map(handoff_socket).transpose() {
        Ok(handoff) => handoff,
        Err(e) => {
            eprintln!("mqvisor: --handoff-fd: {e}");
            return ExitCode::from(EXIT_SETUP_FAILED);
        }
    };
    let run_as = match args.user.as_deref().map(mqvisor::privileges::RunAs::lookup).transpose() {
        Ok(run_as) => run_as,
        Err(e) => {
            eprintln!("mqvisor: {e}");
            return ExitCode::from(EXIT_SETUP_FAILED);
        }
    };
    let departure = match enter_cgroup(&args) {
        Ok(departure) => departure,
        Err(e) => {
            eprintln!("mqvisor: {e}");
            return ExitCode::from(EXIT_SETUP_FAILED);
        }
    };
    let state = match open_state(&args, settings.config.max_packet_size as u64) {
        Ok(state) => state,
        Err((code, e)) => {
            eprintln!("mqvisor: {e}");
            return ExitCode::from(code);
        }
    };
    if let ServiceKind::Mqtt | ServiceKind::Echo = args.service {
        fd_limit::raise_for(settings.config.max_connections);
    }
    let config = VmConfig {
        state,
        run_as,
        handoff,
        config_blob: if args.service == ServiceKind::Mqtt { settings.config_blob() } else { Vec::new() },
        image,
        memory_mib: args.memory,
        cmdline: args.cmdline,
        timeout: args.timeout,
        kvm_device: args.kvm_device,
        console: Box::new(std::io::stdout()),
        service: match args.service {
            ServiceKind::Mqtt => Service::Mqtt {
                listen: args.listen,
                max_connections: settings.config.max_connections,
                max_packet_size: settings.config.max_packet_size,
            },
            ServiceKind::Echo => Service::Echo { listen: args.listen },
            ServiceKind::Demo => Service::Demo,
        },
    };
    let rip = |rip: Option<u64>| rip.map_or_else(|| "unknown".to_string(), |r| format!("{r:#x}"));
    let report = match vm::run(config) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("mqvisor: {e}");
            return ExitCode::from(EXIT_SETUP_FAILED);
        }
    };
    // The VM and its descriptors are gone, and KVM's worker thread with
    // them: the group can go too (else the next VMM's sweep removes it).
    if let Some(departure) = departure {
        departure.leave();
    }
    if args.stats {
        print_stats(&report);
    }
    match report.outcome {
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

impl RunArgs {
    /// Runs with a `serve` tenant's settings (`--tenant-settings`).
    fn take_tenant(&mut self, tenant: TenantRun) {
        self.memory = tenant.memory;
        self.user = tenant.user;
        self.persistence = Some(tenant.persistence);
        self.state = tenant.state;
        self.cgroup = tenant.cgroup;
        self.broker = tenant.broker;
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
fn open_state(args: &RunArgs, max_packet_size: u64) -> Result<Option<vm::StateDisk>, (u8, String)> {
    use mqvisor::state;
    let setup = |e: String| (EXIT_SETUP_FAILED, e);
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
                return Err((
                    EXIT_BAD_STATE,
                    format!(
                        "{}: {e}; not moved aside: --discard-corrupt-state discards only a damaged log",
                        path.display()
                    ),
                ));
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
    Ok(Some(vm::StateDisk { file: held.file, persistence: mode, batch_ms: args.persistence_interval }))
}

/// `mqvisor state-check PATH`: the host's reading of a state file.
fn state_check(path: &std::path::Path) -> ExitCode {
    let file = match mqvisor::state::open(path, mqvisor::state::Access::Read) {
        Ok(file) => file,
        Err(e) => {
            eprintln!("mqvisor: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The same rule as `run`: an empty file is laid out, a small one refused.
    let len = file.metadata().map_or(0, |m| m.len());
    if let Err(e) = mqvisor::state::refuse_size(path, len) {
        eprintln!("mqvisor: {e}");
        return ExitCode::FAILURE;
    }
    // No lock is taken (a VM starting meanwhile must not find the file in
    // use): a file a running VM holds is read as it is at this moment.
    if mqvisor::state::in_use(&file) {
        println!(
            "{}: in use by a running mqvisor; read as it is now, while the VM writes it (a last batch being \
             written reads as torn)",
            path.display()
        );
    }
    match mqvisor::state::check(&file) {
        Ok(found) if found.fresh && len == 0 => {
            println!("{}: no state yet (an empty file: mqvisor run lays it out at --state-size)", path.display());
            ExitCode::SUCCESS
        }
        Ok(found) if found.fresh => {
            println!("{}: no state yet (a new state file)", path.display());
            ExitCode::SUCCESS
        }
        Ok(found) => {
            println!(
                "{}: {} records in {} KiB recover cleanly{}",
                path.display(),
                found.records,
                found.bytes >> 10,
                if found.torn_tail { "; a torn last batch (never acknowledged) would be dropped" } else { "" }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mqvisor: {}: {e}", path.display());
            ExitCode::FAILURE
        }
    }
}

/// `mqvisor tenant ...`: one request to the daemon's control socket.
fn tenant_command(args: TenantArgs) -> ExitCode {
    use hyper::{Method, StatusCode};
    // The server's rule: any other name would be read as a path of its own
    // (`victim?keep` as `victim`, `anon/` as `anon`).
    if let TenantAction::Show { name }
    | TenantAction::Add { name, .. }
    | TenantAction::Remove { name }
    | TenantAction::Restart { name } = &args.action
        && !serve::config::valid_tenant_name(name)
    {
        eprintln!("mqvisor: {}", serve::config::ServeConfigError::TenantName(name.clone()));
        return ExitCode::FAILURE;
    }
    let (method, path, body) = match &args.action {
        TenantAction::List => (Method::GET, "/tenants".to_string(), String::new()),
        TenantAction::Show { name } => (Method::GET, format!("/tenants/{name}"), String::new()),
        TenantAction::Add { name, settings } => {
            let body = match settings.as_deref().map(serve::config::settings_file_body).transpose() {
                Ok(body) => body.unwrap_or_default(),
                Err(e) => {
                    eprintln!("mqvisor: tenant add: the settings file {e}");
                    return ExitCode::FAILURE;
                }
            };
            (Method::PUT, format!("/tenants/{name}"), body)
        }
        TenantAction::Remove { name } => (Method::DELETE, format!("/tenants/{name}"), String::new()),
        TenantAction::Restart { name } => (Method::POST, format!("/tenants/{name}/restart"), String::new()),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("mqvisor: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (status, text) = match runtime.block_on(serve::control::request(&args.socket, method, &path, body)) {
        Ok(answer) => answer,
        Err(e) => {
            eprintln!("mqvisor: {e}");
            return ExitCode::FAILURE;
        }
    };
    if !status.is_success() {
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or(text);
        eprintln!("mqvisor: {message}");
        return ExitCode::FAILURE;
    }
    let views: Option<Vec<serve::control::TenantView>> = match &args.action {
        TenantAction::List => serde_json::from_str(&text).ok(),
        TenantAction::Show { .. } => serde_json::from_str(&text).ok().map(|t| vec![t]),
        _ => None,
    };
    match views {
        Some(_) if args.json => print!("{text}"),
        Some(views) => {
            println!(
                "{:<24} {:<8} {:>8} {:>11} {:>8} {:>10} {:>6}",
                "TENANT", "STATE", "PID", "CONNECTIONS", "MEMORY", "PSS", "BOOTS"
            );
            for t in &views {
                let pid = t.pid.map_or_else(|| "-".to_string(), |p| p.to_string());
                let pss = format!("{:.1} MiB", t.pss_bytes as f64 / f64::from(1 << 20));
                let memory = if t.memory_mib > 0 { format!("{} MiB", t.memory_mib) } else { "-".into() };
                println!(
                    "{:<24} {:<8} {:>8} {:>11} {:>8} {:>10} {:>6}",
                    t.name, t.state, pid, t.connections, memory, pss, t.boots
                );
            }
            // Why a failed tenant is not served.
            for t in &views {
                if let Some(error) = &t.error {
                    println!("{}: {error}", t.name);
                }
            }
        }
        None if status == StatusCode::CREATED => println!("added"),
        None => println!("done"),
    }
    ExitCode::SUCCESS
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
             bad frames {}, bad records {}, slow clients shed {}, silent clients dropped {}",
            net.tx_frames,
            net.tx_bytes,
            net.rx_frames,
            net.rx_bytes,
            net.refused_chains,
            net.ring_faults,
            net.bad_frames,
            net.bad_records,
            net.shed_clients,
            net.silent_clients_dropped
        );
        if let Some(fault) = &net.last_ring_fault {
            eprint!(" (last: {fault})");
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Commands::Run(args) => run(*args),
        Commands::Tenant(args) => tenant_command(args),
        Commands::StateCheck { path } => state_check(&path),
        Commands::Serve(args) => {
            tracing_subscriber::fmt().with_writer(std::io::stderr).with_target(false).init();
            let exe = match std::env::current_exe() {
                Ok(exe) => exe,
                Err(e) => {
                    eprintln!("mqvisor: cannot find the mqvisor executable: {e}");
                    return ExitCode::from(EXIT_SETUP_FAILED);
                }
            };
            match serve::serve(&args.config, &exe) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("mqvisor: serve: {e}");
                    ExitCode::from(EXIT_SETUP_FAILED)
                }
            }
        }
        Commands::Broker(args) => {
            let settings = match args.broker.resolve() {
                Ok(settings) => settings,
                Err(e) => {
                    eprintln!("mqvisor: {e}");
                    return ExitCode::from(EXIT_SETUP_FAILED);
                }
            };
            fd_limit::raise_for(settings.config.max_connections);
            match broker_runner::run(args.listen, settings.config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("mqvisor: broker on {}: {e}", args.listen);
                    ExitCode::from(EXIT_SETUP_FAILED)
                }
            }
        }
        Commands::Bench(bench) => {
            let result = std::env::current_exe()
                .map_err(|e| format!("cannot find the mqvisor executable: {e}"))
                .and_then(|exe| match bench {
                    BenchCommand::Boot { runs, memory } => bench::boot::boot(&exe, runs as usize, memory),
                    BenchCommand::Echo { connections, seconds, memory } => {
                        bench::echo::echo(&exe, connections as usize, seconds, memory)
                    }
                    BenchCommand::Mqtt { scale, no_vm, memory } => {
                        if !(scale > 0.0 && scale <= 100.0) {
                            return Err("--scale must be in (0, 100]".to_string());
                        }
                        bench::mqtt::mqtt(&exe, scale, !no_vm, memory)
                    }
                    BenchCommand::Hostile { image, rounds, samples } => {
                        let image = image.unwrap_or_else(|| PathBuf::from(env!("MQVISOR_HOSTILE_IMAGE")));
                        bench::hostile::hostile(&exe, &image, rounds as usize, samples as usize)
                    }
                    BenchCommand::Serve { tenants, messages } => {
                        bench::serve::serve(&exe, tenants as usize, messages as usize)
                    }
                    BenchCommand::State { scale, retained, memory } => {
                        if !(scale > 0.0 && scale <= 100.0) {
                            return Err("--scale must be in (0, 100]".to_string());
                        }
                        bench::state::state(&exe, scale, retained as usize, memory)
                    }
                    BenchCommand::Conns { idle, churn, large_mib, no_vm } => {
                        bench::conns::conns(&exe, idle as usize, churn as usize, large_mib as usize, !no_vm)
                    }
                });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("mqvisor: bench: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
