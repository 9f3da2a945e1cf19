//! One tenant's VM process: started on its first client, handed every
//! client after that, restarted with backoff after a crash. Each tenant is
//! its own `mqvisor run` process, so a crash (or `kill -9`) stays inside it.
//!
//! Owns the process, the handoff socket to it (`mqvisor run --handoff-fd`)
//! and the tenant's life-cycle state. Never reads a client's bytes: clients
//! arrive routed, with what the front already read.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mqvisor::cgroup::Group;
use mqvisor::net::fence;
use mqvisor::net::ingress::Handed;
use mqvisor::net::metrics::Counters;
use mqvisor::state::Persistence;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::config::TenantConfig;
use super::control::TenantView;
use super::front::FirstBytes;
use super::usage::{self, Baseline, Ledger};

/// Clients waiting to be handed to one tenant, at most; more are closed.
const HANDOFF_QUEUE: usize = 4096;
/// First wait before restarting a crashed tenant; doubles up to the maximum.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Boot durations kept per tenant for the metrics.
const MAX_BOOT_SAMPLES: usize = 10_000;
/// A tenant that ran this long before crashing starts its backoff afresh.
const STABLE_AFTER: Duration = Duration::from_secs(60);

/// Where a tenant is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// No process: never started (boots on its first client).
    Stopped,
    /// Its process runs.
    Running,
    /// Its process ended unexpectedly; restarts at `restart_at`.
    Crashed,
}

/// A tenant's process ended.
pub struct Exited {
    pub tenant: String,
    pub pid: u32,
    pub status: std::io::Result<std::process::ExitStatus>,
}

struct Process {
    pid: u32,
    started: Instant,
    /// Clients for the handoff task.
    clients: mpsc::Sender<(TcpStream, FirstBytes)>,
    /// Users and ACL changes for its VM, and connections to a new standby
    /// for its state (`control_link`).
    control: Control,
    /// When its reaper kills it if it has not booted, or ended after a
    /// stop, by then.
    kill_at: Arc<watch::Sender<Option<KillAt>>>,
}

/// A process's boot, for its link: when it started, where its boot time
/// goes, and the deadline its first report clears.
struct Booting {
    pid: u32,
    started: Instant,
    boot_seconds: Arc<Mutex<Vec<f64>>>,
    kill_at: Arc<watch::Sender<Option<KillAt>>>,
}

/// Why and when a tenant's process is killed if it is still there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KillAt {
    /// Its guest's link is not up by then (a hung start: a stopped spare,
    /// say); cleared by its first report.
    Boot(Instant),
    /// It was stopped (SIGTERM) and has not ended by then.
    Stop(Instant),
}

impl KillAt {
    fn at(self) -> Instant {
        match self {
            KillAt::Boot(at) | KillAt::Stop(at) => at,
        }
    }
}

/// One tenant.
pub struct Tenant {
    pub name: String,
    config: TenantConfig,
    settings_file: PathBuf,
    /// Its durable state (`mqvisor run --state`), unless persistence is off.
    state_file: PathBuf,
    /// The control group its processes run in, with its limits (if it has any).
    group: Option<Group>,
    /// Processes of it the kernel killed at its memory limit, counted so far.
    oom_kills: u64,
    process: Option<Process>,
    /// A process asked to stop that has not exited yet. It still holds the
    /// tenant's state file (locked: one VM per file), so no new process
    /// boots before it has gone.
    stopping: Option<u32>,
    /// Boot once the stopping process has gone (`tenant restart`).
    boot_when_stopped: bool,
    pub state: State,
    pub boots: u64,
    pub crashes: u64,
    pub restarts: u64,
    backoff: Duration,
    pub restart_at: Option<Instant>,
    /// Clients that arrived while the tenant waits to restart.
    waiting: Vec<(TcpStream, FirstBytes)>,
    /// Clients a process's link could not hand over because the process
    /// had gone: the next process gets them.
    returned: Returned,
    /// What its process last reported.
    load: Arc<Mutex<Counters>>,
    /// Seconds from spawning each VM to its guest's link being up.
    boot_seconds: Arc<Mutex<Vec<f64>>>,
    /// Since when its VM has had no clients (for `idle_stop_after`).
    idle_since: Option<Instant>,
    /// What it used, for billing (`usage`), counted from its processes' reports.
    usage: usage::Shared,
}

impl Tenant {
    /// A stopped tenant, with its control group made when it has limits
    /// and its process's settings written to `state_dir`.
    pub fn new(name: &str, mut config: TenantConfig, state_dir: &Path) -> Result<Tenant, String> {
        let dir = state_dir.join("tenants");
        let [settings_file, state_file] = files(state_dir, name);
        let group = (!config.limits.is_empty())
            .then(|| Group::create(&format!("serve-{}-{name}", std::process::id()), &config.limits))
            .transpose()
            .map_err(|e| format!("tenant {name}: resource limits: {e}"))?;
        config.run.state = (config.run.persistence != Persistence::Off).then(|| state_file.clone());
        config.run.cgroup = group.as_ref().map(|group| group.dirs.clone()).unwrap_or_default();
        // The users and ACL the control API keeps for it, if it has any.
        super::users::adopt(state_dir, name, &mut config.run.broker);
        // Tenants' settings and state (their messages) are the daemon's alone.
        let written = config.run.to_text().map_err(|e| format!("tenant {name}: {e}")).and_then(|text| {
            std::fs::create_dir_all(&dir)
                .and_then(|()| std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)))
                .and_then(|()| std::fs::write(&settings_file, text))
                .map_err(|e| format!("state directory {}: {e}", state_dir.display()))
        });
        if let Err(e) = written {
            // Not served: its group goes again.
            if let Some(group) = &group {
                group.remove();
            }
            return Err(e);
        }
        Ok(Tenant {
            name: name.to_string(),
            config,
            settings_file,
            state_file,
            group,
            oom_kills: 0,
            process: None,
            stopping: None,
            boot_when_stopped: false,
            state: State::Stopped,
            boots: 0,
            crashes: 0,
            restarts: 0,
            backoff: BACKOFF_FIRST,
            restart_at: None,
            waiting: Vec::new(),
            returned: Returned::default(),
            load: Arc::default(),
            boot_seconds: Arc::default(),
            idle_since: None,
            usage: Arc::new(Mutex::new(Ledger::load(state_dir, name))),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(|p| p.pid)
    }

    /// Boots its process now if it has none (in a fleet: so that its state
    /// reaches a new standby without waiting for a client).
    pub fn boot_now(&mut self, exe: &Path, exited: &mpsc::UnboundedSender<Exited>) {
        if self.process.is_none() && self.stopping.is_none() && self.restart_at.is_none() {
            self.boot(exe, exited);
        }
    }

    /// Whether its state is mirrored in a fleet (and so worth booting for).
    pub fn mirrored(&self) -> bool {
        self.config.mirrored && self.config.run.persistence != mqvisor::state::Persistence::Off
    }

    /// In a fleet: hands its running process `connection` to a new standby
    /// (its PROXY header sent), which its state disk mirrors to from then
    /// on; false when it has no process (its next one reads the settings).
    pub fn offer_standby(&self, connection: std::net::TcpStream) -> bool {
        match &self.process {
            Some(process) if self.config.mirrored => process.control.standby.send(connection).is_ok(),
            _ => false,
        }
    }

    /// In a fleet: its processes from the next one on mirror its state to
    /// `standby` (`mqvisor::replica`); its settings file is written again.
    pub fn set_standby(&mut self, standby: Option<crate::settings::StandbyTarget>) -> Result<(), String> {
        self.config.run.standby = standby.filter(|_| self.config.mirrored);
        let text = self.config.run.to_text().map_err(|e| format!("tenant {}: {e}", self.name))?;
        std::fs::write(&self.settings_file, text).map_err(|e| format!("{}: {e}", self.settings_file.display()))
    }

    /// What its process last reported (zeros when it has none).
    fn load(&self) -> Counters {
        match (&self.process, self.load.lock()) {
            (Some(_), Ok(load)) => *load,
            _ => Counters::default(),
        }
    }

    /// Disk blocks its state file uses, bytes (0 without one).
    fn state_bytes(&self) -> u64 {
        std::fs::metadata(&self.state_file).map_or(0, |m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
    }

    /// Its usage's file text if it changed since last asked, its state
    /// file's size sampled first (every `usage::SAVE_EVERY`).
    pub fn usage_changes(&self) -> Option<Vec<u8>> {
        let bytes = self.state_bytes();
        let mut ledger = self.usage.lock().ok()?;
        ledger.state(bytes, Instant::now());
        ledger.changes()
    }

    /// Its usage's file text (its last record, when it is removed).
    pub fn usage_record(&self) -> Option<Vec<u8>> {
        self.usage.lock().ok().map(|ledger| ledger.record())
    }

    /// How the control plane shows it.
    pub fn view(&self) -> TenantView {
        let load = self.load();
        let state_bytes = self.state_bytes();
        let usage = self.group.as_ref().map(Group::usage).unwrap_or_default();
        let state = match self.state {
            State::Stopped => "stopped",
            State::Running => "running",
            State::Crashed => "crashed",
        };
        TenantView {
            name: self.name.clone(),
            state: state.into(),
            error: None,
            pid: self.pid(),
            boots: self.boots,
            crashes: self.crashes,
            restarts: self.restarts,
            memory_mib: self.config.run.memory,
            counters: load,
            guest_faults: load.guest_faults(),
            boot_seconds: self.boot_seconds.lock().map(|b| b.clone()).unwrap_or_default(),
            pss_bytes: self.pid().and_then(crate::procfs::pss_kib).map_or(0, |kib| kib * 1024),
            cpu_throttled_periods: usage.throttled_periods,
            memory_limit_kills: usage.oom_kills,
            state_bytes,
            usage: self
                .usage
                .lock()
                .map(|ledger| usage::Usage { state_bytes, ..ledger.usage().clone() })
                .unwrap_or_default(),
            node: None,
        }
    }

    /// Stops its VM and boots a fresh one now (during a crash's backoff
    /// too: the clients waiting for it are handed to the new one).
    pub fn restart(&mut self, exe: &Path, exited: &mpsc::UnboundedSender<Exited>) -> std::io::Result<()> {
        self.stop();
        if self.stopping.is_some() {
            // Booted when the old process has gone (see `on_exit`).
            self.boot_when_stopped = true;
            self.restarts += 1;
            tracing::info!(tenant = %self.name, "restarting on request");
            return Ok(());
        }
        if let Err(e) = self.start(exe, exited) {
            self.retry_later();
            return Err(e);
        }
        self.restarts += 1;
        tracing::info!(tenant = %self.name, "restarted on request");
        Ok(())
    }

    /// Hands `client` (and the bytes read from it) to this tenant's VM,
    /// booting it first if it has none.
    pub fn hand(
        &mut self,
        client: TcpStream,
        first_bytes: FirstBytes,
        exe: &Path,
        exited: &mpsc::UnboundedSender<Exited>,
    ) {
        self.idle_since = None;
        if self.stopping.is_some() {
            // Booted with the clients that waited when the old process has gone.
            self.boot_when_stopped = true;
        } else if self.process.is_none() && self.restart_at.is_none_or(|t| Instant::now() >= t) {
            // No process and no backoff to wait out: boot one now (which
            // hands it the clients that waited, before this one).
            self.boot(exe, exited);
        }
        let client = match &self.process {
            Some(process) => match process.clients.try_send((client, first_bytes)) {
                Ok(()) => return,
                // A full queue means the tenant cannot keep up: this client is closed.
                Err(mpsc::error::TrySendError::Full(_)) => return,
                // Its link has ended: the process has gone, and the client
                // waits for the next one.
                Err(mpsc::error::TrySendError::Closed(client)) => client,
            },
            None => (client, first_bytes),
        };
        self.wait(client);
    }

    /// Keeps `client` for the next process (closed past [`HANDOFF_QUEUE`]).
    fn wait(&mut self, client: (TcpStream, FirstBytes)) {
        if self.waiting.len() < HANDOFF_QUEUE {
            self.waiting.push(client);
        }
    }

    /// Boots the tenant once its restart is due (after a crash's backoff,
    /// or a failed start), and hands it the clients that waited. Every call
    /// clears a due `restart_at`: the daemon's loop sleeps until the next
    /// one, so one left behind would wake it at once, for ever.
    pub fn restart_if_due(&mut self, exe: &Path, exited: &mpsc::UnboundedSender<Exited>) {
        if self.restart_at.is_none_or(|t| Instant::now() < t) {
            return;
        }
        self.restart_at = None;
        if self.stopping.is_some() {
            self.boot_when_stopped = true;
        } else if self.process.is_none() {
            self.boot(exe, exited);
        }
    }

    /// Starts a process for the tenant, which has none: a restart after a
    /// crash, or its first boot. One that cannot start is tried again
    /// after a backoff, its clients waiting meanwhile.
    fn boot(&mut self, exe: &Path, exited: &mpsc::UnboundedSender<Exited>) {
        let crashed = self.state == State::Crashed;
        match self.start(exe, exited) {
            Ok(()) if crashed => {
                self.restarts += 1;
                tracing::info!(tenant = %self.name, "restarted");
            }
            Ok(()) => {}
            Err(e) => {
                tracing::error!(tenant = %self.name, "cannot start: {e}");
                self.retry_later();
            }
        }
    }

    /// Schedules the next try to boot after the backoff (doubled each time).
    fn retry_later(&mut self) {
        self.restart_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    fn start(&mut self, exe: &Path, exited: &mpsc::UnboundedSender<Exited>) -> std::io::Result<()> {
        let super::spare::Started { child, socket: ours, .. } = super::spare::start_tenant(exe, &self.settings_file)?;
        let pid = child.id().unwrap_or(0);
        let control = control_link(ours.try_clone()?, super::cluster::fence_deadlines())?;
        let (clients, queue) = mpsc::channel(HANDOFF_QUEUE);
        // SAFETY: `UnixDatagram` owns its descriptor, keeps it open until
        // dropped and always returns the same one; the AsyncFd owns it.
        let ours = unsafe { AsyncFd::register_with_interest(ours, Interest::READABLE | Interest::WRITABLE) }
            .map_err(std::io::Error::from)?;
        *self.load.lock().map_err(|_| std::io::Error::other("load lock poisoned"))? = Counters::default();
        // A process with a standby sends its state whole to it
        // before its guest boots, which takes as long as the state is big.
        let boot_deadline = self.config.run.standby.is_none().then(|| KillAt::Boot(Instant::now() + BOOT_DEADLINE));
        let (kill_at, deadline) = watch::channel(boot_deadline);
        let kill_at = Arc::new(kill_at);
        let started = Instant::now();
        let booted = Booting { pid, started, boot_seconds: self.boot_seconds.clone(), kill_at: kill_at.clone() };
        let usage = (self.usage.clone(), Baseline::default());
        tokio::spawn(link(self.name.clone(), ours, queue, self.load.clone(), booted, self.returned.clone(), usage));
        let (tenant, exited) = (self.name.clone(), exited.clone());
        tokio::spawn(reap(child, deadline, tenant.clone(), move |status| {
            let _ = exited.send(Exited { tenant, pid, status });
        }));
        // The clients that waited for a process, in the order they came
        // (those an earlier process's link gave back first), go first.
        let mut earlier = self.returned.take();
        earlier.append(&mut self.waiting);
        for client in earlier {
            // As many as the queue holds: more could not have waited.
            let _ = clients.try_send(client);
        }
        self.process = Some(Process { pid, started, clients, control, kill_at });
        self.state = State::Running;
        self.restart_at = None;
        self.boots += 1;
        // "booted" comes with its guest's first report (see `link`).
        tracing::info!(tenant = %self.name, pid, memory_mib = self.config.run.memory, "process started");
        Ok(())
    }

    /// Its process `pid` ended: a crash unless it was asked to stop.
    pub fn on_exit(
        &mut self,
        pid: u32,
        status: &std::io::Result<std::process::ExitStatus>,
        exe: &Path,
        exited: &mpsc::UnboundedSender<Exited>,
    ) {
        if self.stopping == Some(pid) {
            self.stopping = None;
            if std::mem::take(&mut self.boot_when_stopped) && self.process.is_none() {
                self.boot(exe, exited);
            }
        }
        if self.pid() != Some(pid) {
            // An earlier process of this tenant. Clients its link gave back
            // go to the current one, or wait for the next.
            let returned = self.returned.take();
            if !returned.is_empty() {
                self.give_back(returned);
            }
            return;
        }
        let ran = self.process.take().map_or(Duration::ZERO, |p| p.started.elapsed());
        self.crashes += 1;
        if ran >= STABLE_AFTER {
            self.backoff = BACKOFF_FIRST;
        }
        let delay = self.backoff;
        self.state = State::Crashed;
        self.retry_later();
        let mut status = match status {
            Ok(status) => status.to_string(),
            Err(e) => e.to_string(),
        };
        let oom_kills = self.group.as_ref().map_or(0, |group| group.usage().oom_kills);
        if oom_kills > self.oom_kills {
            self.oom_kills = oom_kills;
            let limit = self.config.limits.memory_mib.unwrap_or(0);
            status = format!("{status}: killed by the kernel at its memory limit ({limit} MiB)");
        }
        tracing::warn!(tenant = %self.name, pid, %status, restart_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX), "crashed");
    }

    /// Hands clients an earlier process's link gave back to the process, or
    /// keeps them for the next one (booted after a backoff, if none is due).
    fn give_back(&mut self, clients: Vec<(TcpStream, FirstBytes)>) {
        for client in clients {
            match &self.process {
                Some(process) => drop(process.clients.try_send(client)),
                None => self.wait(client),
            }
        }
        if self.process.is_none() && !self.waiting.is_empty() && self.restart_at.is_none() {
            self.retry_later();
        }
    }

    /// Stops the VM once it has had no clients for its `idle_stop_after`.
    pub fn stop_if_idle(&mut self) {
        let Some(after) = self.config.idle_stop_after else { return };
        if self.process.is_none() {
            return;
        }
        if self.load().connections > 0 {
            self.idle_since = None;
            return;
        }
        let since = *self.idle_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= after {
            if self.config.run.persistence == Persistence::Off {
                tracing::info!(tenant = %self.name, idle_s = after.as_secs(), "idle: stopping (its state is lost)");
            } else {
                tracing::info!(tenant = %self.name, idle_s = after.as_secs(), "idle: stopping (its state is kept)");
            }
            self.stop();
            self.idle_since = None;
        }
    }

    /// Stops the tenant for good: its files go too, so a tenant added
    /// later under the same name starts empty.
    pub fn remove(mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.state_file);
        let _ = std::fs::remove_file(&self.settings_file);
        if let Some(state_dir) = self.settings_file.parent().and_then(Path::parent) {
            super::users::remove_files(state_dir, &self.name);
        }
        tokio::spawn(self.release_group());
    }

    /// Removes its control group once its last process has gone (a stopped
    /// process takes a moment to exit); one left behind is swept by the
    /// next mqvisor process that makes groups.
    pub fn release_group(mut self) -> impl std::future::Future<Output = ()> {
        let group = self.group.take();
        async move {
            let Some(group) = group else { return };
            for _ in 0..40 {
                if group.remove() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Its settings.
    pub fn config(&self) -> &TenantConfig {
        &self.config
    }

    /// Its users or ACL changed (`super::users`): its process's settings
    /// name the files the next boot reads, and a running VM is sent
    /// `change` (`config_blob::write_auth`) to apply at once, with no
    /// restart. A process that is still starting gets it too, after it
    /// read the files: applying it again changes nothing.
    pub fn auth_changed(
        &mut self,
        password_file: Option<PathBuf>,
        acl_file: Option<PathBuf>,
        change: Vec<u8>,
    ) -> Result<(), String> {
        self.config.run.broker.password_file = password_file;
        self.config.run.broker.acl_file = acl_file;
        let text = self.config.run.to_text().map_err(|e| format!("tenant {}: {e}", self.name))?;
        super::users::write_file(&self.settings_file, &text)
            .map_err(|e| format!("{}: {e}", self.settings_file.display()))?;
        if let Some(process) = &self.process {
            // Its link task ends with the process; the next one boots from the files.
            let _ = process.control.auth.send(change);
        }
        Ok(())
    }

    /// Has its process read its TLS files again (SIGHUP): new handshakes
    /// use them, no client is dropped. A process that has none ignores it.
    pub fn reload_tls(&self) {
        if self.config.run.tls_cert.is_some()
            && let Some(process) = &self.process
            && let Ok(pid) = libc::pid_t::try_from(process.pid)
        {
            // SAFETY: kill(2) on our own child with a valid signal, which
            // `mqvisor run` handles.
            unsafe { libc::kill(pid, libc::SIGHUP) };
        }
    }

    /// Kills its process at once (SIGKILL, no grace): a fleet node that
    /// may lose its lease must not run the tenant a moment longer
    /// (`super::cluster`'s fencing).
    pub fn kill(&mut self) {
        self.end_process(libc::SIGKILL);
    }

    /// Stops the process (SIGTERM: its clients see a clean close).
    pub fn stop(&mut self) {
        self.end_process(libc::SIGTERM);
    }

    fn end_process(&mut self, signal: libc::c_int) {
        if let Some(process) = self.process.take()
            && let Ok(pid) = libc::pid_t::try_from(process.pid)
        {
            // SAFETY: kill(2) on our own child with a valid signal.
            unsafe { libc::kill(pid, signal) };
            // One that does not end (stopped, or hung) is killed: the tenant
            // boots again only once it has gone.
            let _ = process.kill_at.send(Some(KillAt::Stop(Instant::now() + STOP_GRACE)));
            self.stopping = Some(process.pid);
            if signal == libc::SIGKILL {
                tracing::warn!(tenant = %self.name, pid = process.pid, "killed (fenced)");
            } else {
                tracing::info!(tenant = %self.name, pid = process.pid, "stopped");
            }
        }
        self.state = State::Stopped;
    }
}

/// How long a stopped process may take to end before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long a new process may take to bring its guest's link up before it
/// is killed, and the tenant restarted as after a crash. The guest brings
/// its link up before it reads its state back, so a large state does not
/// count; a process that first copies its state to a standby has no such
/// deadline.
const BOOT_DEADLINE: Duration = Duration::from_secs(30);

/// Waits for a tenant's process `child` to end and tells `ended` how;
/// kills it if it is still there at the deadline its tenant set
/// ([`KillAt`]).
async fn reap(
    mut child: tokio::process::Child,
    mut deadline: watch::Receiver<Option<KillAt>>,
    tenant: String,
    ended: impl FnOnce(std::io::Result<std::process::ExitStatus>),
) {
    let mut kill_at = *deadline.borrow_and_update();
    let mut watching = true;
    let status = loop {
        let left = kill_at.map(|k| k.at().saturating_duration_since(Instant::now()));
        tokio::select! {
            status = child.wait() => break status,
            changed = deadline.changed(), if watching => match changed {
                Ok(()) => kill_at = *deadline.borrow_and_update(),
                // The tenant let the process go: the last deadline stands.
                Err(_) => watching = false,
            },
            () = mqvisor::net::paced::sleep_or_forever(left), if kill_at.is_some() => {
                let pid = child.id().unwrap_or(0);
                match kill_at {
                    Some(KillAt::Boot(_)) => tracing::warn!(%tenant, pid, deadline_s = BOOT_DEADLINE.as_secs(), "its guest did not come up: killed"),
                    _ => tracing::warn!(%tenant, pid, grace_s = STOP_GRACE.as_secs(), "did not end after being stopped: killed"),
                }
                let _ = child.start_kill();
                kill_at = None;
            }
        }
    };
    ended(status);
}

/// Tenant `name`'s files in `state_dir`: its process's settings
/// ([`crate::settings::TenantRun`]) and its durable state.
pub fn files(state_dir: &Path, name: &str) -> [PathBuf; 2] {
    let dir = state_dir.join("tenants");
    [dir.join(format!("{name}.toml")), dir.join(format!("{name}.state"))]
}

/// Clients a link gave back, shared with its tenant.
#[derive(Clone, Default)]
struct Returned(Arc<Mutex<Vec<(TcpStream, FirstBytes)>>>);

impl Returned {
    fn take(&self) -> Vec<(TcpStream, FirstBytes)> {
        self.0.lock().map(|mut clients| std::mem::take(&mut *clients)).unwrap_or_default()
    }

    fn give(&self, client: (TcpStream, FirstBytes)) {
        if let Ok(mut clients) = self.0.lock()
            && clients.len() < HANDOFF_QUEUE
        {
            clients.push(client);
        }
    }
}

/// How long a stopped process's last load report is waited for.
const LAST_REPORT_WAIT: Duration = Duration::from_secs(1);

/// The link to a tenant's process: hands each queued client over (its
/// socket by SCM_RIGHTS and the bytes already read, as one datagram; waits
/// while the process's queue is full) and keeps the load it reports. Ends
/// when the process is gone, giving back the clients it could not hand
/// over (the one it was sending and the rest of its queue). Each report is
/// counted in the tenant's usage against this process's own baseline.
async fn link(
    tenant: String,
    socket: AsyncFd<UnixDatagram>,
    mut queue: mpsc::Receiver<(TcpStream, FirstBytes)>,
    load: Arc<Mutex<Counters>>,
    Booting { pid, started, boot_seconds, kill_at }: Booting,
    returned: Returned,
    (usage, mut baseline): (usage::Shared, Baseline),
) {
    let mut report = [0u8; Counters::REPORT_LEN + 1];
    let mut first = true;
    // Once the tenant drops the queue (it stops the process), the process's
    // last report is still read, for a while: it counts for billing.
    let mut last_report_until = None;
    loop {
        let linger = last_report_until.map(|until: Instant| until.saturating_duration_since(Instant::now()));
        tokio::select! {
            () = mqvisor::net::paced::sleep_or_forever(linger) => return,
            client = queue.recv(), if last_report_until.is_none() => {
                let Some((client, bytes)) = client else {
                    last_report_until = Some(Instant::now() + LAST_REPORT_WAIT);
                    continue;
                };
                if !send_client(&socket, &client, bytes.kind(), &bytes).await {
                    // The process has gone: no client more is taken here
                    // (the tenant keeps new ones for the next process).
                    queue.close();
                    returned.give((client, bytes));
                    while let Ok(client) = queue.try_recv() {
                        returned.give(client);
                    }
                    return;
                }
            }
            ready = socket.readable() => {
                let Ok(mut guard) = ready else { return };
                while let Ok(received) = guard.try_io(|inner| inner.get_ref().recv(&mut report)) {
                    match received {
                        Ok(len) => {
                            if let (Some(now), Ok(mut load)) = (Counters::from_report(&report[..len]), load.lock()) {
                                if now.standby_losses > load.standby_losses {
                                    // Its standby's copy is stale from here on.
                                    super::cluster::mirror_lost(&tenant);
                                }
                                *load = now;
                                if let Ok(mut usage) = usage.lock() {
                                    usage.report(&mut baseline, &now);
                                }
                                if std::mem::take(&mut first) {
                                    // The first report comes when the guest's link is up:
                                    // booted, so no longer killed for not booting.
                                    kill_at.send_if_modified(|at| {
                                        let booting = matches!(at, Some(KillAt::Boot(_)));
                                        if booting {
                                            *at = None;
                                        }
                                        booting
                                    });
                                    let boot = started.elapsed();
                                    tracing::info!(tenant = %tenant, pid, boot_ms = boot.as_millis(), "booted");
                                    if let Ok(mut boots) = boot_seconds.lock()
                                        && boots.len() < MAX_BOOT_SAMPLES
                                    {
                                        boots.push(boot.as_secs_f64());
                                    }
                                }
                            }
                        }
                        Err(_) => return,
                    }
                }
            }
        }
    }
}

/// Starts the task that sends a tenant's process what is not a client, on
/// `socket` (a second descriptor of its handoff socket), each one datagram
/// without a socket (the datagrams of `mqvisor::net::ingress`): its users
/// and ACL changes (`AUTH_CHANGE`), and in a fleet the node's fence
/// deadline (`FENCE`) each time it moves, the first one at once. Users and
/// ACL changes that queue up while the socket is full go as the latest
/// alone: each carries every table whole. Ends when the tenant dropped the
/// sender (its process has gone).
fn control_link(socket: UnixDatagram, mut fence: Option<watch::Receiver<Option<Instant>>>) -> std::io::Result<Control> {
    // SAFETY: as for the handoff socket in `start`: the AsyncFd owns it.
    let socket =
        unsafe { AsyncFd::register_with_interest(socket, Interest::WRITABLE) }.map_err(std::io::Error::from)?;
    let (changes, mut queue) = mpsc::unbounded_channel::<Vec<u8>>();
    let (standby, mut standbys) = mpsc::unbounded_channel::<std::net::TcpStream>();
    tokio::spawn(async move {
        if let Some(at) = fence.as_mut().and_then(|f| *f.borrow_and_update())
            && !send_datagram(&socket, &fence::datagram(at)).await
        {
            return;
        }
        loop {
            let fence_moved = async {
                match fence.as_mut() {
                    Some(f) => f.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            let datagram = tokio::select! {
                change = queue.recv() => {
                    let Some(mut change) = change else { return };
                    while let Ok(later) = queue.try_recv() {
                        change = later;
                    }
                    let mut datagram = Vec::with_capacity(1 + change.len());
                    datagram.push(mqvisor::net::ingress::AUTH_CHANGE);
                    datagram.extend_from_slice(&change);
                    datagram
                }
                Some(connection) = standbys.recv() => {
                    let offer = [mqvisor::net::ingress::STANDBY_OFFER];
                    if !send_datagram_with(&socket, &offer, Some(connection.as_raw_fd())).await {
                        tracing::warn!("a new standby not handed to the tenant's process");
                        return;
                    }
                    continue;
                }
                moved = fence_moved => {
                    let at = fence.as_mut().filter(|_| moved).and_then(|f| *f.borrow_and_update());
                    match at {
                        Some(at) => fence::datagram(at).to_vec(),
                        None => {
                            // The node's lease keeper has gone: the deadline stands.
                            fence = None;
                            continue;
                        }
                    }
                }
            };
            if !send_datagram(&socket, &datagram).await {
                // Gone, most likely: the next process boots from the files.
                tracing::warn!("a users and ACL change or a fence deadline not sent to the tenant's process");
                return;
            }
        }
    });
    Ok(Control { auth: changes, standby })
}

/// What [`control_link`] sends a tenant's process.
struct Control {
    /// Users and ACL changes (each carries every table whole).
    auth: mpsc::UnboundedSender<Vec<u8>>,
    /// Connections to a new standby, their PROXY header sent.
    standby: mpsc::UnboundedSender<std::net::TcpStream>,
}

/// Sends `datagram` without a socket; false once the process is gone.
async fn send_datagram(socket: &AsyncFd<UnixDatagram>, datagram: &[u8]) -> bool {
    send_datagram_with(socket, datagram, None).await
}

/// Sends `datagram` with the descriptor `fd`, if given; false once the
/// process is gone.
async fn send_datagram_with(socket: &AsyncFd<UnixDatagram>, datagram: &[u8], fd: Option<i32>) -> bool {
    loop {
        let Ok(mut guard) = socket.writable().await else { return false };
        let sent = guard.try_io(|inner| match fd {
            Some(fd) => {
                inner.get_ref().send_with_fd(datagram, fd).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
            }
            None => inner.get_ref().send(datagram),
        });
        match sent {
            Ok(Ok(_)) => return true,
            Ok(Err(_)) => return false,
            Err(_would_block) => continue,
        }
    }
}

/// Sends one client: its kind, then the bytes already read from it (the
/// datagram of `mqvisor::net::ingress`); false once the process is gone.
async fn send_client(socket: &AsyncFd<UnixDatagram>, client: &TcpStream, kind: Handed, bytes: &[u8]) -> bool {
    let mut datagram = Vec::with_capacity(1 + bytes.len());
    datagram.push(kind.to_byte());
    datagram.extend_from_slice(bytes);
    loop {
        let Ok(mut guard) = socket.writable().await else { return false };
        let sent = guard.try_io(|inner| {
            inner
                .get_ref()
                .send_with_fd(datagram.as_slice(), client.as_raw_fd())
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
        });
        match sent {
            // The process has its own copy of the socket now.
            Ok(Ok(_)) => return true,
            Ok(Err(_)) => return false,
            Err(_would_block) => continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sleeper() -> tokio::process::Child {
        tokio::process::Command::new("sleep").arg("30").kill_on_drop(true).spawn().unwrap()
    }

    #[tokio::test]
    async fn a_process_past_its_deadline_is_killed_and_one_that_booted_is_not() {
        use std::os::unix::process::ExitStatusExt;
        // Not booted by its deadline: killed.
        let (_kill_at, deadline) = watch::channel(Some(KillAt::Boot(Instant::now() + Duration::from_millis(50))));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let started = Instant::now();
        reap(sleeper(), deadline, "t".into(), move |status| drop(tx.send(status))).await;
        let status = rx.await.unwrap().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert!(started.elapsed() < Duration::from_secs(5));
        // Booted (the deadline cleared): it runs on, until a stop's deadline.
        let (kill_at, deadline) = watch::channel(Some(KillAt::Boot(Instant::now() + Duration::from_millis(50))));
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let reaper = tokio::spawn(reap(sleeper(), deadline, "t".into(), move |status| drop(tx.send(status))));
        kill_at.send_replace(None);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(rx.try_recv().is_err(), "a booted process was killed");
        kill_at.send_replace(Some(KillAt::Stop(Instant::now() + Duration::from_millis(50))));
        drop(kill_at);
        reaper.await.unwrap();
        assert_eq!(rx.await.unwrap().unwrap().signal(), Some(libc::SIGKILL));
    }
}
