//! Usage for billing: per tenant, what its clients used since counting
//! began (messages and bytes in and out, connection-seconds, peak
//! connections, its state file's bytes), kept across tenant and daemon
//! restarts in `STATE_DIR/usage/`.
//!
//! Owns each tenant's [`Ledger`] and its file. A tenant's process reports
//! its [`Counters`] once a second, from 0 at its start; the ledger adds
//! what grew since the same process's previous report (its [`Baseline`],
//! one per process, so a new process starts a new one). It never
//! subtracts across processes and never goes backwards: a counter lower
//! than the same process's last figure (which no process sends) is taken
//! as its new baseline and adds nothing, so a bill never counts what
//! cannot be trusted. Never reads a client's bytes, and never blocks the
//! daemon's loop on the disk: a [`Writer`] thread writes the files, in the
//! order they are given.
//!
//! Files: `STATE_DIR/usage/NAME.json` (mode 0600, its folder 0700), written
//! whole to a temporary file, synced and renamed over the old one (a round
//! of saves with one sync of the file system and one of the folder), every
//! [`SAVE_EVERY`] (when only time accrued, connection-seconds or state
//! byte-seconds, every [`SAVE_IDLE_EVERY`]) and at a clean stop, so a
//! crash never leaves a torn file and a daemon crash loses at most that
//! interval. A file that cannot be
//! used (damaged, of another format, another tenant's) is logged once, set
//! aside as `NAME.json.damaged` for the operator, and its tenant counts
//! from 0 with a new `since`. A removed tenant's last record is kept as
//! `STATE_DIR/usage/removed/NAME-UNIXTIME.json` for the provider's last
//! bill (the operator deletes it after billing); a tenant added later under
//! the same name counts from 0.

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime};

use mqvisor::net::metrics::Counters;
use serde::{Deserialize, Serialize};

/// How often every tenant's ledger is written (and its state file's size sampled).
pub const SAVE_EVERY: Duration = Duration::from_secs(10);
/// How often a ledger is written when only time accrued in it (its
/// connection-seconds, its state file's byte-seconds): every connected
/// tenant accrues some each round, and a file written per tenant every
/// 10 s cost a host of 1,000 connected tenants half a core (creating a
/// file is about 0.5 ms of kernel time here).
pub const SAVE_IDLE_EVERY: Duration = Duration::from_secs(60);

/// Set when the daemon stops cleanly: from then on every ledger with
/// anything new is written, time accrued too.
static STOPPING: AtomicBool = AtomicBool::new(false);

/// The daemon stops cleanly: the next saves write every ledger that has
/// anything new (see [`Ledger::changes`]).
pub fn stopping() {
    STOPPING.store(true, Ordering::Relaxed);
}
/// The file's format number.
const FORMAT: u32 = 1;

/// What a tenant used since `since`: the answer of
/// `GET /tenants/NAME/usage`, and what its file keeps.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Usage {
    pub tenant: String,
    /// PUBLISH packets from its clients.
    pub messages_in: u64,
    /// PUBLISH packets to its clients.
    pub messages_out: u64,
    /// Bytes read from its clients.
    pub bytes_in: u64,
    /// Bytes written to its clients.
    pub bytes_out: u64,
    /// Its clients' connections times the seconds they were open.
    pub connection_seconds: f64,
    /// The most clients it had connected at once.
    pub peak_connections: u64,
    /// Disk blocks its state file uses now, bytes.
    pub state_bytes: u64,
    /// Its state file's bytes times the seconds they were kept (sampled
    /// every [`SAVE_EVERY`] while the daemon runs).
    pub state_byte_seconds: f64,
    /// When counting began, in seconds since the Unix epoch (UTC).
    pub since: u64,
}

/// A usage file: its format and the figures.
#[derive(Serialize, Deserialize)]
struct Record {
    format: u32,
    usage: Usage,
}

/// One process's last report, against which its next one is counted (a
/// new process's counters begin at 0: `Baseline::default()`).
#[derive(Default)]
pub struct Baseline {
    last: Counters,
}

/// A tenant's usage as counted so far (see the module doc).
pub struct Ledger {
    usage: Usage,
    /// When the state file's size was last sampled.
    state_sampled: Option<Instant>,
    /// Counted figures (messages, bytes, peak, state bytes) changed since
    /// its file was last written.
    changed: bool,
    /// Only time accrued since its file was last written.
    accrued: bool,
    /// When its file was last written (`None`: not by this daemon).
    saved_at: Option<Instant>,
}

/// A ledger shared by its tenant and its processes' links.
pub type Shared = Arc<Mutex<Ledger>>;

impl Ledger {
    /// Nothing counted yet for `tenant`, counting from `since` (Unix seconds).
    pub fn new(tenant: &str, since: u64) -> Ledger {
        let usage = Usage { tenant: tenant.to_string(), since, ..Usage::default() };
        Ledger { usage, state_sampled: None, changed: true, accrued: false, saved_at: None }
    }

    /// `tenant`'s ledger from its file in `state_dir`, or a new one (none
    /// yet, or one that cannot be used: logged and set aside).
    pub fn load(state_dir: &Path, tenant: &str) -> Ledger {
        let path = file(state_dir, tenant);
        let why = match read_file(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ledger::new(tenant, unix_now()),
            Err(e) => e.to_string(),
            Ok(bytes) => match parse(&bytes, tenant) {
                Ok(usage) => {
                    return Ledger { usage, state_sampled: None, changed: false, accrued: false, saved_at: None };
                }
                Err(why) => why,
            },
        };
        // Set aside, so that the next save does not write over what the
        // operator may want to look at.
        let aside = unused(path.with_extension("json.damaged"));
        let kept = match std::fs::rename(&path, &aside) {
            Ok(()) => format!("set aside as {}", aside.display()),
            Err(e) => format!("not set aside ({e})"),
        };
        tracing::error!(tenant = %tenant, file = %path.display(), "usage file cannot be used: {why}; {kept}; counting again from 0");
        Ledger::new(tenant, unix_now())
    }

    /// Counts a report `now` of the process whose baseline is `process`:
    /// what grew since its previous report (connected time included), and
    /// its peak.
    pub fn report(&mut self, process: &mut Baseline, now: &Counters) {
        let last = process.last;
        let usage = &mut self.usage;
        for (total, now, last) in [
            (&mut usage.messages_in, now.messages_in, last.messages_in),
            (&mut usage.messages_out, now.messages_out, last.messages_out),
            (&mut usage.bytes_in, now.bytes_in, last.bytes_in),
            (&mut usage.bytes_out, now.bytes_out, last.bytes_out),
        ] {
            // Lower than before: a new baseline, nothing added.
            let grown = now.saturating_sub(last);
            *total = total.saturating_add(grown);
            self.changed |= grown > 0;
        }
        // Connected time as the process summed it, exactly (a count
        // sampled at each report charged a quiet gap at the newest count).
        let accrued = now.connection_ms.saturating_sub(last.connection_ms) as f64 / 1000.0;
        usage.connection_seconds += accrued;
        self.accrued |= accrued > 0.0;
        let peak = now.peak_connections.max(now.connections);
        self.changed |= peak > usage.peak_connections;
        usage.peak_connections = usage.peak_connections.max(peak);
        *process = Baseline { last: *now };
    }

    /// Samples its state file's size, `bytes` at `at`, counting the bytes
    /// sampled before for the time since then.
    pub fn state(&mut self, bytes: u64, at: Instant) {
        let seconds = self.state_sampled.map_or(0.0, |then| at.saturating_duration_since(then).as_secs_f64());
        let usage = &mut self.usage;
        let added = usage.state_bytes as f64 * seconds;
        self.changed |= usage.state_bytes != bytes;
        self.accrued |= added > 0.0;
        usage.state_byte_seconds += added;
        usage.state_bytes = bytes;
        self.state_sampled = Some(at);
    }

    pub fn usage(&self) -> &Usage {
        &self.usage
    }

    /// Its file's text, to be written now: when a counted figure changed
    /// since it was last given, or time accrued and the last was given
    /// [`SAVE_IDLE_EVERY`] ago (or never by this daemon).
    pub fn changes(&mut self) -> Option<Vec<u8>> {
        let now = Instant::now();
        let idle_due = STOPPING.load(Ordering::Relaxed)
            || self.saved_at.is_none_or(|at| now.saturating_duration_since(at) >= SAVE_IDLE_EVERY);
        if !(self.changed || (self.accrued && idle_due)) {
            return None;
        }
        (self.changed, self.accrued, self.saved_at) = (false, false, Some(now));
        Some(self.record())
    }

    /// Its file's text.
    pub fn record(&self) -> Vec<u8> {
        let record = Record { format: FORMAT, usage: self.usage.clone() };
        let mut text = serde_json::to_vec_pretty(&record).unwrap_or_default();
        text.push(b'\n');
        text
    }
}

/// The figures of a usage file of `tenant`, if they can be trusted.
fn parse(bytes: &[u8], tenant: &str) -> Result<Usage, String> {
    let record: Record = serde_json::from_slice(bytes).map_err(|e| format!("not a usage record: {e}"))?;
    let usage = record.usage;
    if record.format != FORMAT {
        return Err(format!("format {} (this daemon reads {FORMAT})", record.format));
    }
    if usage.tenant != tenant {
        return Err(format!("the record of tenant {:?}", usage.tenant));
    }
    if ![usage.connection_seconds, usage.state_byte_seconds].iter().all(|v| v.is_finite() && *v >= 0.0) {
        return Err("a figure that is negative or not a number".into());
    }
    Ok(usage)
}

/// What `tenant`'s file holds, without touching it (a tenant that is not
/// served, whose file is kept as it is): zeros when there is none or it
/// cannot be used.
pub fn peek(state_dir: &Path, tenant: &str) -> Usage {
    read_file(&file(state_dir, tenant))
        .ok()
        .and_then(|bytes| parse(&bytes, tenant).ok())
        .unwrap_or_else(|| Usage { tenant: tenant.to_string(), ..Usage::default() })
}

/// Most bytes a usage file may hold (one is a few hundred).
const MAX_FILE: u64 = 64 * 1024;

/// A usage file's bytes: a regular file, not followed through a symbolic
/// link, opened without blocking (a FIFO put there would hang the daemon's
/// start), at most [`MAX_FILE`] bytes.
fn read_file(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(std::io::Error::other(format!("larger than {MAX_FILE} bytes")));
    }
    Ok(bytes)
}

/// `path`, or `path.1`, `path.2`, … : the first that does not exist, so a
/// file set aside or kept never replaces one kept before.
fn unused(path: PathBuf) -> PathBuf {
    if std::fs::symlink_metadata(&path).is_err() {
        return path;
    }
    (1u32..)
        .map(|n| PathBuf::from(format!("{}.{n}", path.display())))
        .find(|p| std::fs::symlink_metadata(p).is_err())
        .unwrap_or(path)
}

/// `tenant`'s usage file in `state_dir`.
pub fn file(state_dir: &Path, tenant: &str) -> PathBuf {
    state_dir.join("usage").join(format!("{tenant}.json"))
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `unix` seconds as RFC 3339 UTC (`2026-12-07T06:53:18Z`).
pub fn rfc3339(unix: u64) -> String {
    let (days, seconds) = (unix / 86_400, unix % 86_400);
    // Days to a civil date (H. Hinnant's algorithm), from 1970-01-01.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    let (h, m, s) = (seconds / 3600, seconds / 60 % 60, seconds % 60);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}Z")
}

/// What the writer thread is given.
enum Job {
    /// Write a tenant's file.
    Save { tenant: String, record: Vec<u8> },
    /// A removed tenant: its last record (or its file as it is) goes to
    /// `removed/`, and its file goes; then `done`.
    Retire { tenant: String, record: Option<Vec<u8>>, done: tokio::sync::oneshot::Sender<()> },
}

/// Writes usage files on a thread of its own, in the order given.
pub struct Writer {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    /// Makes `STATE_DIR/usage/` and `removed/` in it (the daemon's alone)
    /// and starts the thread.
    pub fn start(state_dir: &Path) -> std::io::Result<Writer> {
        let dir = state_dir.join("usage");
        for dir in [&dir, &dir.join("removed")] {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let (jobs, queue) = mpsc::channel();
        let thread = std::thread::Builder::new().name("usage".into()).spawn(move || write_all(&dir, &queue))?;
        Ok(Writer { jobs: Some(jobs), thread: Some(thread) })
    }

    /// Writes `tenant`'s `record` (from [`Ledger::changes`]).
    pub fn save(&self, tenant: &str, record: Vec<u8>) {
        self.send(Job::Save { tenant: tenant.to_string(), record });
    }

    /// Keeps removed `tenant`'s last `record` (or its file as it is, without
    /// one) under `removed/`, and removes its file, after what was given
    /// before. Answers when done (or the writer has gone), so that a tenant
    /// added again under the same name never reads the old file.
    pub fn retire(&self, tenant: &str, record: Option<Vec<u8>>) -> tokio::sync::oneshot::Receiver<()> {
        let (done, answer) = tokio::sync::oneshot::channel();
        self.send(Job::Retire { tenant: tenant.to_string(), record, done });
        answer
    }

    fn send(&self, job: Job) {
        if let Some(jobs) = &self.jobs {
            let _ = jobs.send(job);
        }
    }

    /// Writes what it was given, then ends (a clean stop).
    pub fn finish(mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The writer thread: each job in turn, the saves queued together written
/// as one batch. A file that cannot be written is logged once (until it
/// can again); its ledger is still counted in memory.
fn write_all(dir: &Path, queue: &mpsc::Receiver<Job>) {
    let mut failing = BTreeSet::new();
    let mut said = |tenant: String, written: std::io::Result<()>| match written {
        Ok(()) => {
            failing.remove(&tenant);
        }
        Err(e) => {
            if failing.insert(tenant.clone()) {
                tracing::error!(tenant = %tenant, dir = %dir.display(), "cannot write its usage: {e}");
            }
        }
    };
    while let Ok(first) = queue.recv() {
        let mut saves = Vec::new();
        for job in std::iter::once(first).chain(std::iter::from_fn(|| queue.try_recv().ok())) {
            match job {
                Job::Save { tenant, record } => saves.push((tenant, record)),
                Job::Retire { tenant, record, done } => {
                    // What was given before it is written first.
                    for (tenant, written) in save_all(dir, std::mem::take(&mut saves)) {
                        said(tenant, written);
                    }
                    let file = dir.join(format!("{tenant}.json"));
                    let kept = unused(dir.join("removed").join(format!("{tenant}-{}.json", unix_now())));
                    let written = match record {
                        Some(record) => write_atomically(&kept, &record).and_then(|()| remove_if_there(&file)),
                        None => match std::fs::rename(&file, &kept) {
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                            other => other,
                        },
                    };
                    let _ = done.send(());
                    said(tenant, written);
                }
            }
        }
        for (tenant, written) in save_all(dir, saves) {
            said(tenant, written);
        }
    }
}

/// Writes each tenant's record as [`write_atomically`] would, but with one
/// sync of the file system for all the temporary files and one of the
/// folder for all the renames: two waits for the disk per save round, where
/// a sync per file and per rename made a host of 1,000 connected tenants
/// spend a core's tenth on it.
fn save_all(dir: &Path, saves: Vec<(String, Vec<u8>)>) -> Vec<(String, std::io::Result<()>)> {
    if saves.is_empty() {
        return Vec::new();
    }
    let written: Vec<_> = saves
        .into_iter()
        .map(|(tenant, record)| {
            let path = dir.join(format!("{tenant}.json"));
            let written = write_temporary(&path, &record).map(|temporary| (temporary, path));
            (tenant, written)
        })
        .collect();
    let synced = sync_file_system(dir);
    let renamed: Vec<_> = written
        .into_iter()
        .map(|(tenant, written)| {
            let renamed = written.and_then(|(temporary, path)| match &synced {
                Ok(()) => std::fs::rename(&temporary, &path),
                Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
            });
            (tenant, renamed)
        })
        .collect();
    let folder = std::fs::File::open(dir).and_then(|folder| folder.sync_all());
    renamed
        .into_iter()
        .map(|(tenant, renamed)| {
            let done = renamed.and_then(|()| match &folder {
                Ok(()) => Ok(()),
                Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
            });
            (tenant, done)
        })
        .collect()
}

/// Syncs the file system `dir` is on (syncfs(2)): every temporary file of a
/// batch reaches the disk with one wait.
fn sync_file_system(dir: &Path) -> std::io::Result<()> {
    let folder = std::fs::File::open(dir)?;
    // SAFETY: syncfs on a descriptor this function owns for the call.
    if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&folder)) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn remove_if_there(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Writes `bytes` to a temporary file beside `path` (mode 0600), syncs it
/// and renames it over `path`: `path` is the old text or the new, never a
/// torn one.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let temporary = write_temporary(path, bytes)?;
    std::fs::File::open(&temporary)?.sync_all()?;
    std::fs::rename(&temporary, path)?;
    if let Some(dir) = path.parent() {
        // The rename itself, on disk.
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Writes `bytes` to the temporary file beside `path` (mode 0600), not
/// synced; returns its path.
fn write_temporary(path: &Path, bytes: &[u8]) -> std::io::Result<PathBuf> {
    let temporary = path.with_extension("json.tmp");
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&temporary)?;
    file.write_all(bytes)?;
    Ok(temporary)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report: `connected_s` is the connected time the process summed.
    fn counters(messages: u64, bytes: u64, connections: u64, connected_s: u64) -> Counters {
        Counters {
            messages_in: messages,
            messages_out: 2 * messages,
            bytes_in: bytes,
            bytes_out: 2 * bytes,
            connections,
            connection_ms: connected_s * 1000,
            ..Counters::default()
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mqvisor-usage-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_new_process_starts_a_new_baseline_and_nothing_goes_backwards() {
        let mut ledger = Ledger::new("acme", 1000);
        let mut first = Baseline::default();
        ledger.report(&mut first, &counters(10, 100, 2, 2));
        ledger.report(&mut first, &counters(15, 150, 4, 6));
        let u = ledger.usage().clone();
        assert_eq!((u.messages_in, u.messages_out, u.bytes_in, u.bytes_out), (15, 30, 150, 300));
        assert_eq!((u.connection_seconds, u.peak_connections), (6.0, 4));
        // The process is killed; the next one counts from 0 again.
        let mut second = Baseline::default();
        ledger.report(&mut second, &counters(3, 30, 1, 1));
        let u = ledger.usage().clone();
        assert_eq!((u.messages_in, u.messages_out, u.bytes_in, u.bytes_out), (18, 36, 180, 360));
        assert_eq!((u.connection_seconds, u.peak_connections), (7.0, 4));
        // A late report of the first process adds only what it grew by.
        ledger.report(&mut first, &counters(16, 160, 0, 6));
        assert_eq!(ledger.usage().messages_in, 19);
        // A figure lower than the same process's last one adds nothing,
        // and is the baseline of the next.
        ledger.report(&mut second, &counters(1, 10, 1, 1));
        assert_eq!((ledger.usage().messages_in, ledger.usage().bytes_in), (19, 190));
        ledger.report(&mut second, &counters(2, 20, 1, 2));
        assert_eq!((ledger.usage().messages_in, ledger.usage().bytes_in), (20, 200));
        assert_eq!(ledger.usage().peak_connections, 4, "the peak never comes down");
        assert_eq!(ledger.usage().since, 1000);
    }

    #[test]
    fn state_bytes_are_counted_for_the_time_they_are_kept() {
        let start = Instant::now();
        let mut ledger = Ledger::new("acme", 0);
        ledger.state(4096, start);
        ledger.state(8192, start + Duration::from_secs(10));
        ledger.state(8192, start + Duration::from_secs(15));
        let u = ledger.usage();
        assert_eq!((u.state_bytes, u.state_byte_seconds), (8192, 4096.0 * 10.0 + 8192.0 * 5.0));
    }

    #[test]
    fn a_ledger_is_kept_across_daemon_restarts_and_written_only_when_changed() {
        let dir = scratch("round-trip");
        let start = Instant::now();
        let mut ledger = Ledger::new("acme", 1234);
        ledger.report(&mut Baseline::default(), &Counters { connection_ms: 4500, ..counters(7, 70, 3, 0) });
        ledger.state(512, start);
        let writer = Writer::start(&dir).unwrap();
        writer.save("acme", ledger.changes().unwrap());
        assert!(ledger.changes().is_none(), "nothing changed since");
        writer.finish();
        let path = file(&dir, "acme");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let usage_dir = std::fs::metadata(dir.join("usage")).unwrap().permissions().mode() & 0o777;
        assert_eq!(usage_dir, 0o700);
        let loaded = Ledger::load(&dir, "acme");
        assert_eq!(loaded.usage(), ledger.usage());
        assert_eq!(loaded.usage().connection_seconds, 4.5);
        assert_eq!(peek(&dir, "acme"), *ledger.usage());
        // Another tenant's figures are never read as this one's.
        assert_eq!(peek(&dir, "globex"), Usage { tenant: "globex".into(), ..Usage::default() });
        std::fs::copy(&path, file(&dir, "globex")).unwrap();
        let globex = Ledger::load(&dir, "globex");
        assert_eq!(globex.usage().messages_in, 0);
        // Removed: its last record is kept for billing, its file goes.
        let writer = Writer::start(&dir).unwrap();
        assert_eq!(writer.retire("acme", Some(ledger.record())).blocking_recv(), Ok(()));
        assert!(!path.exists());
        let removed: Vec<_> = std::fs::read_dir(dir.join("usage/removed")).unwrap().flatten().collect();
        assert_eq!(removed.len(), 1);
        let kept = std::fs::read(removed[0].path()).unwrap();
        assert_eq!(parse(&kept, "acme").unwrap(), *ledger.usage());
        // Added again under the same name: counted from 0.
        assert_eq!(Ledger::load(&dir, "acme").usage().messages_in, 0);
        writer.finish();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn accrued_time_alone_is_written_once_a_minute_and_counted_figures_every_round() {
        let mut ledger = Ledger::new("acme", 1234);
        let mut process = Baseline::default();
        ledger.report(&mut process, &counters(1, 10, 1, 0));
        assert!(ledger.changes().is_some(), "new figures");
        // A connected client and nothing else: only connection-seconds grow.
        ledger.report(&mut process, &counters(1, 10, 1, 10));
        assert!(ledger.changes().is_none(), "written less than SAVE_IDLE_EVERY ago");
        assert_eq!(ledger.usage().connection_seconds, 10.0, "counted all the same");
        // A message: written at once, accrued time with it.
        ledger.report(&mut process, &counters(2, 20, 1, 11));
        let record = ledger.changes().expect("a counted figure changed");
        assert_eq!(parse(&record, "acme").unwrap().connection_seconds, 11.0);
        // Written a minute ago: accrued time alone is due.
        ledger.saved_at = Some(Instant::now() - SAVE_IDLE_EVERY);
        ledger.report(&mut process, &counters(2, 20, 1, 12));
        assert!(ledger.changes().is_some());
        assert!(ledger.changes().is_none(), "nothing new since");
    }

    #[test]
    fn a_damaged_file_is_set_aside_and_counting_starts_again() {
        let dir = scratch("damaged");
        let writer = Writer::start(&dir).unwrap();
        writer.finish();
        let path = file(&dir, "acme");
        for (n, damaged) in [
            &b"{\"format\": 1, \"usage\": {\"tenant\": \"acme\", \"messages_in\": 12"[..],
            b"{\"format\": 9, \"usage\": {\"tenant\": \"acme\"}}",
            b"{\"format\": 1, \"usage\": {\"tenant\": \"acme\", \"connection_seconds\": -1.0}}",
            b"\0\0\0\0",
        ]
        .into_iter()
        .enumerate()
        {
            std::fs::write(&path, damaged).unwrap();
            let ledger = Ledger::load(&dir, "acme");
            assert_eq!(ledger.usage().messages_in, 0);
            assert!(ledger.usage().since > 0);
            assert!(!path.exists(), "the damaged file is not written over");
            // Each set aside beside the ones before, none replaced.
            let aside = match n {
                0 => path.with_extension("json.damaged"),
                n => path.with_extension(format!("json.damaged.{n}")),
            };
            assert_eq!(std::fs::read(aside).unwrap(), damaged);
        }
        // A FIFO where the file should be: set aside too, never waited on.
        let fifo = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo with a NUL-terminated path this test owns.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        assert_eq!(Ledger::load(&dir, "acme").usage().messages_in, 0);
        assert!(!path.exists());
        // Two removals of a tenant in the same second keep two records.
        let writer = Writer::start(&dir).unwrap();
        for _ in 0..2 {
            assert_eq!(writer.retire("acme", Some(Ledger::new("acme", 1).record())).blocking_recv(), Ok(()));
        }
        writer.finish();
        assert_eq!(std::fs::read_dir(dir.join("usage/removed")).unwrap().count(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn since_reads_as_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_626_398), "2026-12-07T06:53:18Z");
    }
}
