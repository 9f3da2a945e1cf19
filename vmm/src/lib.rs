//! mqvisor's host side: a small VMM that runs one MQTT broker unikernel per
//! tenant in its own KVM microVM.
//!
//! Layers, bottom up: [`image`] checks and loads guest ELFs; [`arch`] builds
//! the x86-64 CPL 3 entry state; [`paravirt`] decodes the guest's port writes;
//! [`vcpu`] runs the vCPU and turns every exit into an outcome; [`vm`] puts a
//! VM together; [`bench`] measures it; [`broker_runner`] runs the broker core
//! natively (`mqvisor broker`). The boot ABI shared with the guest is
//! the `mqvisor-boot-abi` crate.

pub mod arch;
pub mod bench;
pub mod broker_runner;
pub mod devices;
pub mod image;
pub mod net;
pub mod paravirt;
pub mod runtime;
pub mod settings;
pub mod vcpu;
pub mod vm;

/// The guest image built from `guest/unikernel` with this binary.
pub static DEFAULT_IMAGE: &[u8] = include_bytes!(env!("MQVISOR_DEFAULT_IMAGE"));
