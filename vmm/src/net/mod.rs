//! The VMM's end of the virtual link: the proxy that carries every client
//! connection into the guest as a stream of records
//! (`mqvisor_boot_abi::streams`) in Ethernet frames through the virtio-net
//! device.
//!
//! - [`ingress`]: where clients come from (a listener, or `mqvisor serve`'s
//!   handoff socket) and the load report back to the daemon;
//! - [`fence`]: the deadline past which a tenant's process in a fleet serves
//!   no client (its node may have lost the tenant);
//! - [`transport`]: the seam through which the proxy reads and writes a
//!   client (plain TCP today);
//! - [`streams`]: every decision about a stream (windows, credit, linger,
//!   shedding, the connection limit), without I/O;
//! - [`proxy`]: the net thread, doing the I/O those decisions ask for;
//! - [`quota`]: the tenant's rate quotas (token buckets, the PUBLISH framer);
//! - [`link`]: the frame queues between the proxy and the virtio-net device;
//! - [`metrics`]: the VM's counters, from the proxy to `--stats` and the daemon;
//! - [`paced`]: paced reads and socket settings for the host-native broker.
//!
//! No tap device, no root, no host routes: the link exists only between this
//! process and its guest, and carries records in Ethernet frames, never an
//! IP packet. Its two MAC addresses are fixed (each VM has its own link).

pub mod fence;
pub mod ingress;
pub mod link;
pub mod metrics;
pub mod paced;
pub mod proxy;
pub mod quota;
pub mod streams;
pub mod tls;
pub mod transport;
pub mod websocket;

use mqvisor_boot_abi::NetConfig;

/// The guest's MAC: locally administered, unicast.
pub const GUEST_MAC: [u8; 6] = [0x02, 0x6d, 0x71, 0x76, 0x00, 0x02];
/// The VMM's MAC on the link.
pub const HOST_MAC: [u8; 6] = [0x02, 0x6d, 0x71, 0x76, 0x00, 0x01];
/// MTU of the link. Large frames amortise the per-frame costs (queue
/// work, and on nested hypervisors the rare VM exits) over more bytes.
pub const LINK_MTU: u16 = 65000;
/// Largest Ethernet frame on the link (MTU plus the Ethernet header).
pub const MAX_FRAME: usize = LINK_MTU as usize + 14;

/// The link as the guest sees it, for boot-info.
pub fn guest_net_config() -> NetConfig {
    NetConfig { guest_mac: GUEST_MAC, host_mac: HOST_MAC, mtu: LINK_MTU, reserved: [0; 2] }
}
