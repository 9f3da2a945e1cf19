//! Echo of every client stream: the network path's test service
//! (`mqvisor run --service echo`).
//!
//! Owns the bytes received but not yet echoed, at most one window per
//! stream: credit goes back to the VMM only for echoed bytes, so a client
//! that never reads stops its own sender.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use mqvisor_boot_abi::BootInfo;
use mqvisor_boot_abi::streams::{Record, StreamId, Window};

use super::Link;

#[derive(Default)]
struct Echo {
    window: Window,
    pending: Vec<u8>,
    /// The client has gone: close once everything is echoed.
    closing: bool,
}

/// Echoes what each stream sends, and closes after the client closed and
/// everything was echoed.
pub fn run(info: &BootInfo) -> ! {
    let mut link = Link::bring_up(info);
    let mut echoes: BTreeMap<StreamId, Echo> = BTreeMap::new();
    crate::println!("echo: serving");
    loop {
        let mut moved = link.receive(|record| match record {
            Record::Open(id) => {
                echoes.insert(id, Echo::default());
            }
            Record::Data(id, bytes) => {
                if let Some(echo) = echoes.get_mut(&id) {
                    let allowed = echo.window.received(bytes.len());
                    echo.pending.extend_from_slice(&bytes[..allowed]);
                }
            }
            Record::Close(id) => {
                if let Some(echo) = echoes.get_mut(&id) {
                    echo.closing = true;
                }
            }
            Record::Credit(id, n) => {
                if let Some(echo) = echoes.get_mut(&id) {
                    echo.window.credited(n);
                }
            }
            // The VMM never sends Stats; Auth is not echo's (it has no users).
            Record::Stats(_) | Record::Auth(_) => {}
        });
        let mut done = Vec::new();
        for (&id, echo) in echoes.iter_mut() {
            let room = echo.pending.len().min(echo.window.send_room());
            let sent = link.send_data(id, &echo.pending[..room]);
            if sent > 0 {
                echo.pending.drain(..sent);
                echo.window.sent(sent);
                moved = true;
                if let Some(credit) = echo.window.consumed(sent) {
                    link.send_credit(id, credit);
                }
            }
            if echo.closing && echo.pending.is_empty() {
                done.push(id);
            }
        }
        for id in done {
            echoes.remove(&id);
            link.send_close(id);
            moved = true;
        }
        if !moved {
            link.idle(None);
        }
    }
}
