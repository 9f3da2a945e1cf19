//! mqvisor's VMM: runs one MQTT broker unikernel per tenant in its own KVM
//! microVM. Everything here exists to run a VM; the `mqvisor` command
//! (`src/bin/mqvisor/`: command line, settings, `serve`, benchmarks, the
//! host-native broker runner) is built on it.
//!
//! Layers, bottom up: [`image`] checks and loads guest ELFs; [`arch`] builds
//! the x86-64 CPL 3 entry state; [`paravirt`] decodes the guest's port writes;
//! [`devices`] emulates the virtio-mmio transport and the virtio-net and
//! virtio-blk devices (the link, and the tenant's state file as a disk);
//! [`net`] is the host end of the virtual link: the proxy that carries each
//! client into the guest as a stream of records in Ethernet frames (no
//! TCP/IP on the link); [`state`] reads and lays out state files on the
//! host; [`replica`] mirrors a state file to a standby node; [`vcpu`] runs the vCPU and turns every exit into an outcome; [`vm`]
//! puts a VM together. Around them: [`seccomp`] filters each thread,
//! [`privileges`] gives up root, [`cgroup`] holds a VMM process to its
//! resource limits. The boot ABI shared with the guest is the
//! `mqvisor-boot-abi` crate.

// Non-test code never unwraps, expects or panics: every failure is a value
// the caller reports (tests may: see clippy.toml).
#![warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod arch;
pub mod cgroup;
pub mod devices;
pub mod image;
pub mod net;
pub mod paravirt;
pub mod privileges;
pub mod replica;
pub mod seccomp;
pub mod state;
pub mod vcpu;
pub mod vm;

/// The guest image built from `guest/unikernel` with this binary.
pub static DEFAULT_IMAGE: &[u8] = include_bytes!(env!("MQVISOR_DEFAULT_IMAGE"));
