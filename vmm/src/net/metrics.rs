//! A VM's counters, as one struct from where they are counted to where
//! they are shown: the proxy counts its streams (bytes, clients shed or
//! dropped, what the guest broke), the devices count frames, refused
//! chains and ring faults, the guest's broker reports its messages; the
//! proxy gathers them into [`Counters`], which `mqvisor run --stats`
//! prints, and which the load report carries to `mqvisor serve`
//! (`net::ingress`), whose control API and `/metrics` show it.
//!
//! Owns the list of counters, written once ([`Counters::TABLE`]): each
//! one's name, help text and place in the load report. A counter added
//! here reaches the report, the control API's JSON and `/metrics` without
//! another line.

use mqvisor_boot_abi::streams::ServiceStats;

use crate::devices::virtio::block::BlockMetrics;
use crate::devices::virtio::net::NetMetrics;

/// How a counter is shown in `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A level that goes up and down.
    Gauge,
    /// A count that only grows while the VM runs.
    Counter,
}

/// One counter of [`Counters`].
#[derive(Clone, Copy)]
pub struct Counter {
    /// Its name in `/metrics`, without prefix.
    pub name: &'static str,
    /// What it counts.
    pub help: &'static str,
    pub kind: Kind,
    /// Reads it.
    pub get: fn(&Counters) -> u64,
    /// Sets it (decoding a report).
    pub set: fn(&mut Counters, u64),
}

/// Defines [`Counters`] and its table from one list: field, kind, name in
/// `/metrics`, help text (also the field's doc).
macro_rules! counters {
    ($($field:ident: $kind:ident $name:literal $help:literal;)*) => {
        /// A VM's counters (see the module doc). Its JSON form names the
        /// fields as they are here.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        #[serde(default)]
        pub struct Counters {
            $(#[doc = $help] pub $field: u64,)*
        }

        impl Counters {
            /// Every counter, in the load report's order.
            pub const TABLE: &'static [Counter] = &[$(Counter {
                name: $name,
                help: $help,
                kind: Kind::$kind,
                get: |c| c.$field,
                set: |c, v| c.$field = v,
            },)*];
        }
    };
}

counters! {
    connections: Gauge "connections" "Client connections carried into the VM";
    peak_connections: Gauge "peak_connections" "Most client connections carried into the VM at once since it started";
    connection_ms: Counter "connection_milliseconds"
        "Milliseconds clients were connected, summed over clients (connection-seconds for billing)";
    bytes_in: Counter "client_bytes_in" "Bytes read from clients";
    bytes_out: Counter "client_bytes_out" "Bytes written to clients";
    messages_in: Counter "messages_in" "PUBLISH packets from clients";
    messages_out: Counter "messages_out" "PUBLISH packets to clients";
    messages_dropped: Counter "messages_dropped" "Messages not delivered: a queue or window was full";
    messages_refused: Counter "messages_refused"
        "Messages refused: the tenant's memory ran low or its state disk failed";
    vm_exits: Counter "vm_exits" "Exits of the tenant's vCPU to its VMM";
    tx_frames: Counter "guest_tx_frames" "Frames the guest sent on its link";
    tx_bytes: Counter "guest_tx_bytes" "Bytes of the frames the guest sent on its link";
    rx_frames: Counter "guest_rx_frames" "Frames the guest received on its link";
    rx_bytes: Counter "guest_rx_bytes" "Bytes of the frames the guest received on its link";
    refused_chains: Counter "refused_chains"
        "Descriptor chains of the guest's network driver refused (direction, length, address, buffer too small)";
    ring_faults: Counter "ring_faults" "Times the guest's network driver broke a ring";
    bad_frames: Counter "bad_frames" "Frames of the guest that were not stream frames or held a malformed record";
    bad_records: Counter "bad_records" "Stream records the guest may not send, or Data past a stream's window";
    shed_clients: Counter "shed_clients"
        "Slow clients reset because the guest's bytes waiting for them passed the VMM's budget";
    silent_clients_dropped: Counter "silent_clients_dropped"
        "Clients not answered yet (no CONNACK), reset at the connection limit to make room for a new one";
    disk_refused_requests: Counter "disk_refused_requests"
        "Requests of the guest's block driver refused for breaking the protocol";
    disk_io_errors: Counter "disk_io_errors" "Requests of the state disk that the host file failed";
    disk_ring_faults: Counter "disk_ring_faults" "Times the guest's block driver broke a ring";
    standby_mirrored: Gauge "standby_mirrored"
        "1 while every write of the state disk also reaches a standby node whose copy is whole (in a fleet), else 0";
    standby_writes: Counter "standby_writes" "Writes of the state disk made durable on the standby node too";
    standby_losses: Counter "standby_losses" "Times the connection to the standby node failed";
    refused_handshakes: Counter "refused_handshakes"
        "TLS clients refused at once because too many TLS handshakes were in flight in the tenant's process";
    throttled_read_us: Counter "throttled_read_us"
        "Microseconds clients were not read because a quota's tokens ran out, summed over clients";
    throttled_write_us: Counter "throttled_write_us"
        "Microseconds clients were not written to because the egress quota's tokens ran out, summed over clients";
    throttled_bytes_in: Counter "throttled_bytes_in" "Bytes from clients that went to the guest only after waiting for a quota";
    throttled_bytes_out: Counter "throttled_bytes_out"
        "Bytes to clients written only after waiting for the egress quota";
    throttled_publishes: Counter "throttled_publishes"
        "PUBLISH packets held back in the VMM for a publish-rate token or their turn";
    throttled_connections: Counter "throttled_connections"
        "New client connections that waited for the connection-rate quota";
}

impl Counters {
    /// Bytes of the load report: every counter as a u64 LE.
    pub const REPORT_LEN: usize = Self::TABLE.len() * 8;

    /// What the guest's network path did wrong: refused descriptor chains,
    /// ring faults, bad stream frames and records.
    pub fn guest_faults(&self) -> u64 {
        self.refused_chains + self.ring_faults + self.bad_frames + self.bad_records
    }

    /// Takes the counters the guest's service reported.
    pub fn set_service(&mut self, stats: ServiceStats) {
        self.messages_in = stats.messages_in;
        self.messages_out = stats.messages_out;
        self.messages_dropped = stats.messages_dropped;
        self.messages_refused = stats.messages_refused;
    }

    /// Takes the virtio-net device's counters.
    pub fn set_net_device(&mut self, m: &NetMetrics) {
        let get = NetMetrics::get;
        self.tx_frames = get(&m.tx_frames);
        self.tx_bytes = get(&m.tx_bytes);
        self.rx_frames = get(&m.rx_frames);
        self.rx_bytes = get(&m.rx_bytes);
        self.refused_chains = get(&m.tx_malformed) + get(&m.rx_malformed) + get(&m.rx_too_big);
        self.ring_faults = get(&m.ring_faults);
    }

    /// Takes the virtio-blk device's counters of what failed.
    pub fn set_block_device(&mut self, m: &BlockMetrics) {
        let get = BlockMetrics::get;
        self.disk_refused_requests = get(&m.malformed);
        self.disk_io_errors = get(&m.io_errors);
        self.disk_ring_faults = get(&m.ring_faults);
        self.standby_mirrored = get(&m.standby_whole);
        self.standby_writes = get(&m.standby_writes);
        self.standby_losses = get(&m.standby_losses);
    }

    /// Takes the block device's counters from `other`.
    pub fn set_block_from(&mut self, other: &Counters) {
        self.disk_refused_requests = other.disk_refused_requests;
        self.disk_io_errors = other.disk_io_errors;
        self.disk_ring_faults = other.disk_ring_faults;
        self.standby_mirrored = other.standby_mirrored;
        self.standby_writes = other.standby_writes;
        self.standby_losses = other.standby_losses;
    }

    /// The load report: every counter in [`Counters::TABLE`]'s order.
    pub fn to_report(&self) -> [u8; Self::REPORT_LEN] {
        let mut out = [0u8; Self::REPORT_LEN];
        for (counter, word) in Self::TABLE.iter().zip(out.chunks_exact_mut(8)) {
            word.copy_from_slice(&(counter.get)(self).to_le_bytes());
        }
        out
    }

    /// `None` unless `bytes` is exactly one load report.
    pub fn from_report(bytes: &[u8]) -> Option<Counters> {
        if bytes.len() != Self::REPORT_LEN {
            return None;
        }
        let mut counters = Counters::default();
        for (counter, word) in Self::TABLE.iter().zip(bytes.chunks_exact(8)) {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            (counter.set)(&mut counters, u64::from_le_bytes(w));
        }
        Some(counters)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_carries_every_counter_and_nothing_else() {
        let mut counters = Counters::default();
        for (i, counter) in Counters::TABLE.iter().enumerate() {
            (counter.set)(&mut counters, 1000 + i as u64);
        }
        let report = counters.to_report();
        assert_eq!(Counters::from_report(&report), Some(counters));
        let shed = Counters::TABLE.iter().position(|c| c.name == "shed_clients").unwrap();
        assert_eq!(counters.shed_clients, 1000 + shed as u64);
        assert_eq!(Counters::from_report(&report[1..]), None);
        assert_eq!(Counters::from_report(&[report.as_slice(), &[0]].concat()), None);
    }

    #[test]
    fn names_are_unique_and_json_names_the_fields() {
        let mut names: Vec<&str> = Counters::TABLE.iter().map(|c| c.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Counters::TABLE.len());
        let counters = Counters { connections: 3, shed_clients: 2, ..Counters::default() };
        let json = serde_json::to_value(counters).unwrap_or_default();
        assert_eq!(json["connections"], 3);
        assert_eq!(json["shed_clients"], 2);
        // Older reports without a counter read it as 0.
        let old: Counters = serde_json::from_str(r#"{"connections": 1}"#).unwrap_or_default();
        assert_eq!(old, Counters { connections: 1, ..Counters::default() });
    }
}
