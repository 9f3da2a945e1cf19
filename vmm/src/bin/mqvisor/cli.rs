//! The `mqvisor` command line as clap types: every subcommand and flag, its
//! defaults, ranges and help text. Parses only; nothing here runs a command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use mqvisor::state::Persistence;
use mqvisor::vm;

use crate::edge::{EdgeFlags, Listen};
use crate::quotas::QuotaFlags;
use crate::settings::BrokerFlags;

/// Guest RAM of a tenant VM unless told otherwise, MiB.
pub const DEFAULT_MEMORY_MIB: u32 = 64;

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
pub struct Cli {
    #[command(subcommand)]
    pub command: Commands,
}

#[derive(Subcommand)]
pub enum Commands {
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
    /// The nodes of a fleet (`mqvisor serve` with `[cluster]`): list them,
    /// drain one (its tenants move to the others) or take it back.
    Node(NodeArgs),
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

/// How `mqvisor tenant` and `mqvisor node` reach a daemon and answer.
#[derive(clap::Args)]
pub struct ControlArgs {
    /// The daemon's control socket (its `control_socket`, by default
    /// STATE_DIR/control.sock; in a fleet, any node's)
    #[arg(
        long,
        value_name = "PATH",
        env = "MQVISOR_SOCKET",
        default_value = "/var/lib/mqvisor/control.sock",
        global = true
    )]
    pub socket: PathBuf,
    /// Print the daemon's JSON answer instead of a table
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct TenantArgs {
    #[command(flatten)]
    pub control: ControlArgs,
    #[command(subcommand)]
    pub action: TenantAction,
}

#[derive(clap::Args)]
pub struct NodeArgs {
    #[command(flatten)]
    pub control: ControlArgs,
    #[command(subcommand)]
    pub action: NodeAction,
}

#[derive(Subcommand)]
pub enum NodeAction {
    /// Every live node: its relay address, capacity, tenants owned, whether it is drained
    List,
    /// Move a node's tenants to the others and place none there (for
    /// maintenance); kept in etcd until `undrain`
    Drain { node: String },
    /// Place tenants on a drained node again
    Undrain { node: String },
}

#[derive(Subcommand)]
pub enum TenantAction {
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
    /// What a tenant used, for billing: messages and bytes in and out,
    /// connection-seconds, peak connections, state file bytes (kept across
    /// its restarts and the daemon's)
    Usage { name: String },
    /// A tenant's users: list, add (or change a password), remove. A
    /// change applies to its running VM at once: a removed user's
    /// connections end, nobody else's. Kept in STATE_DIR/tenants/NAME.passwd
    /// (mosquitto_passwd's format); refused for a tenant with a password_file
    /// of its own
    #[command(subcommand)]
    User(UserAction),
    /// A tenant's ACL (Mosquitto's ACL text): show, set from a file or
    /// stdin, remove. A change applies to its running VM at once, from the
    /// next PUBLISH, SUBSCRIBE and delivery on. Kept in
    /// STATE_DIR/tenants/NAME.acl; refused for a tenant with an acl_file of
    /// its own
    #[command(subcommand)]
    Acl(AclAction),
}

#[derive(Subcommand)]
pub enum UserAction {
    /// The tenant's user names (never their password hashes)
    List { name: String },
    /// Add USER to tenant NAME, or give USER a new password. The password
    /// is asked for on the terminal (not echoed, twice), or read from the
    /// first line of stdin with --password-stdin; never an argument, which
    /// other users of the host could read
    Add {
        name: String,
        /// 1 to 64 of A-Z, a-z, 0-9, '.', '_', '-' and '@'; clients connect
        /// as NAME:USER on the shared port
        user: String,
        /// Read the password from the first line of stdin (for scripts)
        #[arg(long)]
        password_stdin: bool,
    },
    /// Remove USER from tenant NAME: their open connections end (MQTT 5:
    /// DISCONNECT 0x98 Administrative action)
    Remove { name: String, user: String },
}

#[derive(Subcommand)]
pub enum AclAction {
    /// Print the tenant's ACL
    Show { name: String },
    /// Replace the tenant's ACL with FILE's text (stdin without FILE);
    /// a malformed ACL is refused, naming its line
    Set {
        name: String,
        /// A Mosquitto ACL file (`user`, `topic [read|write|readwrite|deny]`, `pattern` lines)
        file: Option<PathBuf>,
    },
    /// Remove the tenant's ACL: every client may use every topic again
    Remove { name: String },
}

#[derive(clap::Args)]
pub struct ServeArgs {
    /// The daemon's configuration file (see below)
    #[arg(long, value_name = "PATH")]
    pub config: PathBuf,
}

#[derive(clap::Args)]
pub struct BrokerArgs {
    /// Address to serve MQTT on
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:1883")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub broker: BrokerFlags,
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// Guest image (static x86-64 ELF following the mqvisor boot ABI) [default: built-in image]
    #[arg(long, value_name = "PATH")]
    pub image: Option<PathBuf>,
    /// Guest RAM in MiB (pages are only allocated when the guest touches them;
    /// the default holds 10,000 idle MQTT connections and 20 MiB of messages)
    #[arg(long, value_name = "MIB", default_value_t = DEFAULT_MEMORY_MIB,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(vm::MAX_MEMORY_MIB)))]
    pub memory: u32,
    /// Stop the guest after this many seconds (fractions allowed) [default: no limit]
    #[arg(long, value_name = "SECS", value_parser = parse_timeout)]
    pub timeout: Option<Duration>,
    /// Command line passed to the guest (see images/default.md for the built-in image's words)
    #[arg(long, value_name = "STRING", default_value = "")]
    pub cmdline: String,
    /// KVM device node
    #[arg(long, value_name = "PATH", default_value = "/dev/kvm", env = "MQVISOR_KVM_DEVICE")]
    pub kvm_device: PathBuf,
    /// What the guest runs: an MQTT broker, TCP echo (to test the network
    /// path), or the boot demo (banner, timer, exit; no network)
    #[arg(long, value_enum, default_value = "mqtt")]
    pub service: ServiceKind,
    /// Host address tenant clients connect to (plain MQTT); every connection
    /// is carried into the guest. `none`: no plain listener (only --listen-tls, --listen-ws or --listen-wss)
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:1883")]
    pub listen: Listen,
    #[command(flatten)]
    pub edge: EdgeFlags,
    #[command(flatten)]
    pub quotas: QuotaFlags,
    /// A fleet's standby for the state, and whether writes wait for one
    /// (from `--tenant-settings` only: `mqvisor serve` sets them).
    #[arg(skip)]
    pub standby: Option<crate::settings::StandbyTarget>,
    #[arg(skip)]
    pub standby_required: bool,
    /// Print VM exit and network counters to stderr when the VM ends
    #[arg(long)]
    pub stats: bool,
    /// Started as root: become this user (and its group) once /dev/kvm is
    /// open and the listener bound, with no capabilities left
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,
    /// Take clients from `mqvisor serve` on this inherited unix datagram
    /// socket instead of listening (internal)
    #[arg(long, value_name = "FD", hide = true)]
    pub handoff_fd: Option<i32>,
    /// Keep the broker's state (retained messages, sessions, subscriptions,
    /// queued messages) in this file, created if missing, and restore it at
    /// start (see docs/state-format.md)
    #[arg(long, value_name = "PATH")]
    pub state: Option<PathBuf>,
    /// Size of a new state file in MiB (sparse: blocks are used as the log
    /// grows; the log and its compacted copy share it); an existing file
    /// keeps its size. Each half of what follows the first MiB must hold
    /// --max-packet-size and 1 MiB more [default: 1024, or a discarded
    /// file's own size]
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(4..=1 << 20))]
    pub state_size: Option<u64>,
    /// When acknowledgements wait for the disk: `sync` answers PUBACK,
    /// PUBREC, SUBACK and a resumed session's CONNACK only once their
    /// records are flushed (nothing acknowledged is lost); `batch` flushes
    /// every --persistence-interval and may lose that long a window;
    /// `off` keeps state in RAM only [default: sync with --state]
    #[arg(long, value_enum, value_name = "MODE")]
    pub persistence: Option<Persistence>,
    /// Flush interval of `--persistence batch`, in milliseconds
    #[arg(long, value_name = "MS", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=60_000))]
    pub persistence_interval: u32,
    /// With --state: start with an empty state when the log is damaged,
    /// instead of refusing to start (the damaged file is kept as
    /// PATH.corrupt, or PATH.corrupt.N when that is taken, and a new file of
    /// its size made). Only damage: a resized file, not a state file or
    /// another format is refused all the same (exit 5)
    #[arg(long, requires = "state")]
    pub discard_corrupt_state: bool,
    /// Hold the VM to this many CPUs' time (0.5: half of one CPU), through a
    /// control group; a guest that spins is throttled, not stopped [default: no limit]
    #[arg(long, value_name = "N", help_heading = "Resource limits (root, or a delegated cgroup)")]
    pub cpus: Option<f64>,
    /// Hold the whole VMM process, guest RAM as the guest touches it
    /// included, to this many MiB; past it the kernel kills the VMM [default: no limit]
    #[arg(long, value_name = "MIB", help_heading = "Resource limits (root, or a delegated cgroup)")]
    pub memory_limit: Option<u64>,
    /// Hold the VMM to this many tasks, at least 5 (its 4 threads and KVM's
    /// worker thread) [default: no limit]
    #[arg(long, value_name = "N", help_heading = "Resource limits (root, or a delegated cgroup)")]
    pub pids_limit: Option<u32>,
    /// Join this control group directory, made by `mqvisor serve` with the
    /// tenant's limits (internal)
    #[arg(long, value_name = "DIR", hide = true, conflicts_with_all = ["cpus", "memory_limit", "pids_limit"])]
    pub cgroup: Vec<PathBuf>,
    /// Run as `mqvisor serve`'s tenant: memory, user, persistence, state
    /// file, control group and broker settings from this file (internal)
    #[arg(long, value_name = "PATH", hide = true,
          conflicts_with_all = ["memory", "user", "persistence", "state", "cgroup", "config", "cpus", "memory_limit", "pids_limit"])]
    pub tenant_settings: Option<PathBuf>,
    /// Start, then wait on the handoff socket for the path of the settings
    /// file of the tenant to run: `mqvisor serve`'s spare process (internal)
    #[arg(long, hide = true, requires = "handoff_fd", conflicts_with = "tenant_settings")]
    pub tenant_settings_from_handoff: bool,
    #[command(flatten)]
    pub broker: BrokerFlags,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceKind {
    Mqtt,
    Echo,
    Demo,
}

#[derive(Subcommand)]
pub enum BenchCommand {
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
    /// A fleet of three `mqvisor serve` nodes on one etcd, all on this host
    /// (127.0.0.2, .3, .4, one port): QoS 1 1->1 throughput and round trips to
    /// a tenant through its owning node and relayed through another; durable
    /// QoS 1 with and without a standby; failovers in a row from the
    /// standby's copy; then kill -9 of one node and the time until each of
    /// its tenants answers a CONNECT through a survivor.
    #[command(after_help = "Needs etcd at /usr/bin/etcd (Debian's etcd-server) and KVM. Prints figures and \
                            ratios relayed/direct; never judges them.")]
    Fleet {
        /// Tenants spread over the three nodes for the node-loss measurement, each booted by one client
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(3..=3000))]
        tenants: u32,
        /// QoS 1 messages per throughput run
        #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(100..=10_000_000))]
        messages: u32,
        /// QoS 1 round trips per path
        #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(10..=1_000_000))]
        samples: u32,
        /// Failovers in a row (kill -9 of the owner, the standby takes over), 0 for none
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(0..=1000))]
        kills: u32,
    },
    /// What durable state costs: QoS 1 1->1 and 10->1 to durable subscribers
    /// with --persistence sync, batch and off beside Mosquitto with and
    /// without persistence, flushes per message, unpaced and again at 80% of
    /// Mosquitto's rate (where latencies compare), then the restart time and
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
    /// The TLS and WebSocket listeners of a tenant VM beside Mosquitto's,
    /// one throwaway certificate for both (made with `openssl`): QoS 1
    /// throughput over TLS 1->1 and 1->20 driven by mosquitto_pub and
    /// mosquitto_sub, full TLS handshakes per second to CONNACK, QoS 1 1->1
    /// over WebSockets, and PSS per idle TLS and plain connection.
    #[command(after_help = "Needs /usr/sbin/mosquitto (2.0, package mosquitto), mosquitto_pub and mosquitto_sub \
                            (mosquitto-clients) and openssl. Prints figures and ratios to Mosquitto; never judges them.")]
    Edge {
        /// Multiplies the message counts (1.0: 20k messages 1->1, 2k to each of 20 subscribers 1->20, 20k over WebSockets)
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// Idle connections held for the memory figures, each kind on a fresh server (0: skip them)
        #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(0..=100_000))]
        idle: u32,
        /// Concurrent client loops in the handshake measurement (connect, full handshake, CONNECT, CONNACK, close)
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
        handshakers: u32,
        /// Seconds of handshakes per target
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=600))]
        seconds: u64,
        /// RSA 2048 keys instead of ECDSA P-256
        #[arg(long)]
        rsa: bool,
        /// Guest RAM in MiB for the VM
        #[arg(long, default_value_t = 256)]
        memory: u32,
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
    /// MQTT throughput with two load generators, mqvisor's own client and
    /// libmosquitto's (`mosquitto_pub -l`, `mosquitto_sub -C`): QoS 0/1/2
    /// 1->1 and QoS 0/1 1->20, 100-byte payloads, best of two; Mosquitto (the
    /// anchor), rumqttd when installed, the host-native runner and a tenant
    /// VM side by side in one run, with the VM's exits per message.
    Mqtt {
        /// Multiplies the message counts (1.0: 1->1 50k QoS 0, 10k QoS 1, 5k QoS 2; 1->20 5k QoS 0, 1k QoS 1;
        /// topologies: 100k QoS 0, 20k QoS 1, 10k QoS 2 per topology; quotas: 2M QoS 0 1->1, about a second each)
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// Leave out the tenant VM
        #[arg(long)]
        no_vm: bool,
        /// Guest RAM in MiB for the VM target (101 connections need room)
        #[arg(long, default_value_t = 128)]
        memory: u32,
        /// The load generator: mqvisor's own client, libmosquitto's, or both, one table each
        #[arg(long, value_enum, default_value = "both")]
        clients: MqttClients,
        /// `five`: the five shapes above; `topologies`: 1->1, 10->1 and 1->100 at QoS 0/1/2 with p50/p99
        /// latency, own client only, against Mosquitto, the runner and a VM; `quotas`: QoS 0 1->1
        /// through a VM without quotas and one with quotas far above the load
        #[arg(long, value_enum, default_value = "five")]
        shapes: MqttShapes,
    },
}

/// `mqvisor bench mqtt --clients`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MqttClients {
    Own,
    Mosquitto,
    Both,
}

/// `mqvisor bench mqtt --shapes`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MqttShapes {
    Five,
    Topologies,
    /// QoS 0 1->1 through a VM with no quota set beside one with quotas
    /// set far above the load: what the rate limiter costs
    Quotas,
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    let secs: f64 = text.parse().map_err(|_| format!("`{text}` is not a number of seconds"))?;
    if secs.is_nan() || secs <= 0.0 {
        return Err("the timeout must be greater than zero".into());
    }
    Duration::try_from_secs_f64(secs).map_err(|_| format!("`{text}` seconds is too long"))
}
