//! The MQTT broker service: the broker core (`mqvisor-broker`) over the
//! link's client streams.
//!
//! Owns the mapping between streams and broker connections, and moving bytes
//! between them: stream bytes into the core, the core's output into `Data`
//! records within each stream's window (what does not fit stays in the core,
//! which then queues or drops per its limits), the core's close requests
//! into `Close` records, and time into `tick`. The configuration comes from
//! the blob the VMM writes; a live change of the password and ACL tables
//! comes as an `Auth` record, checked as that blob is
//! (`config_blob::read_auth`) and swapped into the broker whole, or
//! refused whole (said on the console, never a stop).

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::format;
use alloc::string::String;

use mqvisor_boot_abi::streams::{Record, ServiceStats, StreamId, Window};
use mqvisor_boot_abi::{BootInfo, capacity, config_blob};
use mqvisor_broker::broker::{Broker, Config, Transmit};

use super::Link;
use crate::clock;
use crate::store::Store;

/// The broker configuration the VMM wrote into the configuration blob,
/// decoded and checked (`mqvisor_boot_abi::config_blob`).
pub fn read_config(info: &BootInfo) -> Result<Config, String> {
    if info.config_len > config_blob::MAX_LEN
        || info.config_addr < mqvisor_boot_abi::layout::IMAGE_BASE
        || info.config_addr.saturating_add(info.config_len) > info.heap_start
    {
        return Err("configuration blob outside its region".into());
    }
    let len = usize::try_from(info.config_len).map_err(|_| "configuration blob too large")?;
    // SAFETY: the range was checked above to lie between the image base and
    // the heap, inside mapped RAM, where the VMM wrote the blob before entry;
    // nothing in the guest writes it.
    let blob = unsafe { core::slice::from_raw_parts(info.config_addr as *const u8, len) };
    config_blob::read(blob).map_err(|e| format!("{e}"))
}

/// How often, at most, the broker's counters go to the VMM (for the
/// operator's metrics and usage for billing), and only when they changed:
/// what a tenant stopped cleanly did in its last moments is counted to
/// within this.
const STATS_EVERY_MS: u64 = 100;

/// The broker's clock: Unix time in milliseconds (the VMM's wall clock at
/// boot plus the TSC since), so times kept in the state log (message
/// expiry) mean the same after a restart.
fn now_ms(boot_ms: u64) -> u64 {
    boot_ms + clock::now().as_micros() / 1000
}

fn service_stats(broker: &Broker) -> ServiceStats {
    let stats = broker.stats();
    ServiceStats {
        messages_in: stats.messages_received,
        messages_out: stats.messages_sent,
        messages_dropped: stats.messages_dropped,
        messages_refused: stats.quota_refusals,
    }
}

/// Serves MQTT forever.
pub fn run(info: &BootInfo, mut config: Config) -> ! {
    let mut link = Link::bring_up(info);
    // Retained messages may take at most half of what is left for messages,
    // so a retained flood never starves the queues of live traffic.
    let heap = info.heap_end.saturating_sub(info.heap_start);
    let budget = capacity::mqtt_message_budget(heap, config.max_connections as u64);
    config.max_retained_bytes = config.max_retained_bytes.min(usize::try_from(budget / 2).unwrap_or(usize::MAX));
    let max_connections = config.max_connections;
    let max_packet_size = config.max_packet_size as u64;
    let mut broker = Broker::new(config);
    let boot_ms = info.boot_wall_clock_ns / 1_000_000;
    // Restored before any client is served: none sees a half-restored broker.
    let mut store = Store::open(info, &mut broker, now_ms(boot_ms));
    // Streams the broker knows, by id (the broker's connection id is the stream id).
    let mut windows: BTreeMap<StreamId, Window> = BTreeMap::new();
    // Streams whose clients sent all they will (`Close` from the VMM), kept
    // until their answers are out. They do not count against the limit:
    // the VMM no longer does either for a client it dropped to make room.
    let mut ending: BTreeSet<StreamId> = BTreeSet::new();
    crate::println!("mqtt: serving MQTT, up to {max_connections} connections");
    // The counters go to the VMM only when they changed (an idle tenant
    // never wakes up for them): in any frame that leaves anyway, and in one
    // of their own at most every STATS_EVERY_MS.
    let mut reported = ServiceStats::default();
    let mut next_report = 0;
    loop {
        let now = now_ms(boot_ms);
        // Refuse what would hold more before the heap runs out, never after.
        let to_come = max_connections.saturating_sub(windows.len()) as u64;
        // The state log's buffers (a batch, a recovery read) come from the
        // same heap: with a store, the broker refuses that much sooner.
        let store_reserve = if store.is_some() { Store::HEAP_RESERVE } else { 0 };
        let low_water = capacity::mqtt_low_water(max_packet_size, to_come) + store_reserve;
        broker.set_memory_low((crate::heap::free_bytes() as u64) < low_water);
        // Streams to close: refused, or unknown to the broker.
        let mut closing = alloc::vec::Vec::new();
        let mut credits = alloc::vec::Vec::new();
        let mut moved = link.receive(|record| match record {
            Record::Open(id) => {
                // The VMM keeps to the limit; a second check costs nothing.
                if windows.len() - ending.len() < max_connections && !windows.contains_key(&id) {
                    windows.insert(id, Window::default());
                    broker.open(id, now);
                } else {
                    closing.push(id);
                }
            }
            Record::Data(id, bytes) => {
                if let Some(window) = windows.get_mut(&id) {
                    // The VMM keeps to the window; bytes past it are dropped.
                    let bytes = &bytes[..window.received(bytes.len())];
                    broker.receive(id, bytes, now);
                    if let Some(credit) = window.consumed(bytes.len()) {
                        credits.push((id, credit));
                    }
                }
            }
            Record::Close(id) => {
                // The client sends nothing more (FIN, or it has gone): what
                // it sent is answered, and the broker asks for the close
                // once its output is out (`Transmit::Close` below).
                if windows.contains_key(&id) {
                    if broker.input_ended(id, now) {
                        ending.insert(id);
                    } else {
                        windows.remove(&id);
                        closing.push(id);
                    }
                }
            }
            Record::Credit(id, n) => {
                if let Some(window) = windows.get_mut(&id) {
                    window.credited(n);
                }
            }
            Record::Auth(bytes) => match config_blob::read_auth(bytes) {
                Ok(update) => {
                    let ended = broker.update_auth(update, now);
                    crate::println!("mqtt: users and ACL changed; {ended} connections of removed users ended");
                }
                Err(e) => crate::println!("mqtt: refused a users and ACL change from the VMM: {e}"),
            },
            // The VMM never sends these.
            Record::Stats(_) => {}
        });
        for id in closing {
            link.send_close(id);
        }
        for (id, credit) in credits {
            // The broker may have closed the stream meanwhile: no credit then.
            if windows.contains_key(&id) {
                link.send_credit(id, credit);
            }
        }

        if broker.next_deadline().is_some_and(|t| now >= t) {
            broker.tick(now);
            moved = true;
        }
        // With sync persistence, everything the broker will send now (its
        // acknowledgements above all) waits for its records to be on disk:
        // one flush for every record since the last (group commit).
        if let Some(store) = &mut store {
            moved |= store.commit(&mut broker, now);
        }
        // What does not fit in a stream's window or the TX queue stays in
        // the core, which offers it again on the next pass.
        moved |= broker.poll_transmit(now, |id, transmit| match transmit {
            Transmit::Bytes(bytes) => {
                let Some(window) = windows.get_mut(&id) else { return 0 };
                let room = bytes.len().min(window.send_room());
                let sent = link.send_data(id, &bytes[..room]);
                window.sent(sent);
                sent
            }
            Transmit::Close => {
                windows.remove(&id);
                ending.remove(&id);
                link.send_close(id);
                0
            }
        });
        let stats = service_stats(&broker);
        if stats != reported && (link.frame_pending() || now >= next_report) {
            link.send_stats(stats);
            reported = stats;
            next_report = now + STATS_EVERY_MS;
        }
        link.flush();
        if !moved {
            let report = (service_stats(&broker) != reported).then_some(next_report);
            let commit = store.as_ref().and_then(|s| s.next_deadline(&broker));
            let deadline = [broker.next_deadline(), report, commit].into_iter().flatten().min();
            // The link counts in microseconds since boot.
            link.idle(deadline.map(|ms| ms.saturating_sub(boot_ms).saturating_mul(1000)));
        }
    }
}
