//! The whole broker core driven by arbitrary byte streams on several
//! connections, with time moving: it never panics, and its buffers stay
//! within the configured bounds.
//!
//! Input format, repeated: one control byte (connection index in the low
//! 2 bits; bits 2-3: 0 = bytes follow, 1 = close (with bit 4 set: the
//! client's input ends, FIN, and its output still goes), 2 = advance time,
//! 3 = take that connection's output; the others have no room), one length byte, then that many bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mqvisor_broker::broker::{Broker, Config, Transmit};

const CONNECT_V5: &[u8] = &[0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 5, 0, 0, 0];
const CONNECT_V3: &[u8] = &[0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x00, 0, 5, 0, 2, b'f', b'z'];

fuzz_target!(|data: &[u8]| {
    let config = Config { max_packet_size: 4096, max_queued_messages: 64, sys_interval_ms: 500, ..Config::default() };
    let mut broker = Broker::new(config);
    let mut now = 0u64;
    let mut open = [false; 4];
    // Valid openings let the fuzzer reach connected states quickly.
    for (conn, connect) in [(0u64, CONNECT_V5), (1, CONNECT_V3)] {
        broker.open(conn, now);
        broker.receive(conn, connect, now);
        open[conn as usize] = true;
    }
    let mut rest = data;
    while let [control, len, tail @ ..] = rest {
        let conn = u64::from(control & 3);
        let n = usize::from(*len).min(tail.len());
        let (bytes, next) = tail.split_at(n);
        rest = next;
        let mut drain = None;
        match (control >> 2) & 3 {
            0 => {
                if !open[conn as usize] {
                    broker.open(conn, now);
                    open[conn as usize] = true;
                }
                broker.receive(conn, bytes, now);
            }
            1 if control & 0x10 != 0 => {
                // Open until the broker asks for the close.
                open[conn as usize] &= broker.input_ended(conn, now);
            }
            1 => {
                broker.closed(conn, now);
                open[conn as usize] = false;
            }
            2 => {
                now += u64::from(*len) * 100;
                broker.tick(now);
            }
            _ => drain = Some(conn),
        }
        broker.poll_transmit(now, |c, transmit| match transmit {
            Transmit::Bytes(bytes) if drain == Some(c) => bytes.len(),
            Transmit::Bytes(_) => 0,
            Transmit::Close => {
                open[c as usize] = false;
                0
            }
        });
        assert!(broker.connection_count() <= 4);
    }
});
