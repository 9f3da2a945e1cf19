//! The mqvisor MQTT broker core: MQTT 3.1, 3.1.1 and 5.0 as a `no_std`,
//! sans-I/O library.
//!
//! Bytes in per connection, bytes out per connection, time passed in: the
//! core owns no sockets, threads or clocks, so the same code runs inside the
//! unikernel and in the host-native runner. Layers, bottom up:
//! - [`wire`]: MQTT data representations, bounds-checked;
//! - [`properties`]: MQTT 5 properties with their per-packet rules;
//! - [`packet`]: framing, decoding and encoding of control packets;
//! - [`topic`]: topic names, filters and matching;
//! - [`subscriptions`]: the subscription index;
//! - [`auth`]: password files and ACLs (Mosquitto formats);
//! - [`broker`]: sessions, delivery, retained messages, wills, limits.
//!
//! Hostile input is normal input: every decode error ends in the
//! protocol-correct refusal, never a panic, and every buffer is bounded.

// Non-test code never unwraps, expects or panics: every failure is a value
// the caller reports (tests may: see clippy.toml).
#![warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod auth;
pub mod broker;
pub mod packet;
pub mod properties;
pub mod store;
pub mod subscriptions;
pub mod topic;
pub mod wire;
