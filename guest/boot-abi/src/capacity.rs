//! What a service's guest memory holds: the one formula the VMM uses to
//! refuse at start a setting the guest could not honour, and the guest uses
//! to size its budget. Both sides compute it from the same heap size.
//!
//! Owns the per-connection and fixed allowances. The figures are measured
//! (see `docs/architecture.md`, "Memory") with headroom, not guessed.

use crate::streams;

/// Heap the link keeps whatever the load: RX buffers posted to the device
/// and TX buffers in flight (64 frames of up to 64 KiB each way), with the
/// allocator's slack.
pub const LINK_FIXED: u64 = 9 << 20;
/// Heap an idle MQTT connection costs with its session, its entries in the
/// broker's maps and the guest's stream table (about 1 KiB measured), with
/// headroom for a client id and a few subscriptions.
pub const MQTT_CONNECTION: u64 = 2 << 10;
/// Heap an echo stream may hold: one window of bytes not yet echoed.
pub const ECHO_CONNECTION: u64 = streams::WINDOW as u64 + 512;
/// Copies of a packet the broker holds while it assembles and delivers it:
/// the buffer a PUBLISH arrives in becomes the message that every queue
/// shares, so one.
pub const PACKET_COPIES: u64 = 1;

/// Connections a heap of `heap` bytes holds at `per_connection` each,
/// next to the link and `reserved` bytes for other things.
pub fn connections(heap: u64, per_connection: u64, reserved: u64) -> u64 {
    heap.saturating_sub(LINK_FIXED).saturating_sub(reserved) / per_connection.max(1)
}

/// Bytes of heap left for messages (retained, queued, in flight, partial
/// packets) once the link and idle connections are provided for.
pub fn mqtt_message_budget(heap: u64, max_connections: u64) -> u64 {
    heap.saturating_sub(LINK_FIXED).saturating_sub(max_connections.saturating_mul(MQTT_CONNECTION))
}

/// Heap an MQTT guest keeps free before it refuses what would hold more
/// (`Broker::set_memory_low`): TX frames not yet allocated and one pass of
/// input (the link's allowance), room for a packet being assembled, 1 MiB of
/// allocator slack, and a place for every connection still to come.
pub fn mqtt_low_water(max_packet_size: u64, connections_to_come: u64) -> u64 {
    LINK_FIXED
        .saturating_add(max_packet_size.saturating_mul(PACKET_COPIES))
        .saturating_add(1 << 20)
        .saturating_add(connections_to_come.saturating_mul(MQTT_CONNECTION))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_memory_holds_the_default_connections() {
        let heap = 63 << 20;
        assert!(connections(heap, MQTT_CONNECTION, 2 << 20) >= 10_000);
        assert!(mqtt_message_budget(heap, 10_000) >= 32 << 20);
        assert_eq!(connections(LINK_FIXED, MQTT_CONNECTION, 0), 0);
        assert_eq!(connections(0, 0, u64::MAX), 0);
    }
}
