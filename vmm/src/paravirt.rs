//! The host side of the paravirtual ports (see `mqvisor_boot_abi::ports`).
//!
//! Owns decoding a port write into what the vCPU loop should do next. The
//! shared page is guest memory, so every length in it is hostile: it is
//! clamped to the page before use, and console bytes are escaped before they
//! reach the operator's terminal (a guest must not be able to send terminal
//! control sequences). Never blocks: waiting is the vCPU loop's job.

use std::mem::offset_of;
use std::time::Duration;

use mqvisor_boot_abi::{PARAVIRT_DATA_CAPACITY, ParavirtPage, layout, ports};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

/// What the guest asked for with a port write.
#[derive(Debug, PartialEq, Eq)]
pub enum PortRequest {
    /// Print these (already escaped) characters.
    Console(String),
    /// End the VM with this code and message.
    Exit { code: u32, message: String },
    /// Park for at most this long; `None` means until woken.
    Wait(Option<Duration>),
    /// A port no device answers.
    Unknown { port: u16 },
}

fn field(offset: usize) -> GuestAddress {
    GuestAddress(layout::PARAVIRT + offset as u64)
}

/// Reads the message the guest left in the shared page, escaped for
/// display; `lines` keeps its newlines (console output), else it stays on
/// one line (an exit message, which ends up in the VMM's log).
fn read_message(mem: &GuestMemoryMmap, lines: bool) -> Result<String, GuestMemoryError> {
    let len: u32 = mem.read_obj(field(offset_of!(ParavirtPage, len)))?;
    let len = usize::try_from(len).unwrap_or(usize::MAX).min(PARAVIRT_DATA_CAPACITY);
    let mut bytes = vec![0u8; len];
    mem.read_slice(&mut bytes, field(offset_of!(ParavirtPage, data)))?;
    Ok(escape_for_terminal(&String::from_utf8_lossy(&bytes), lines))
}

/// Replaces control characters with escapes, but for tabs and, with
/// `lines`, newlines: a guest must not write terminal controls, nor (in a
/// log line) a line that looks like the VMM's or another tenant's.
pub fn escape_for_terminal(text: &str, lines: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() && !(c == '\n' && lines) && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Decodes an `out` of `value` to `port`.
pub fn decode_out(port: u16, value: u32, mem: &GuestMemoryMmap) -> Result<PortRequest, GuestMemoryError> {
    Ok(match port {
        ports::CONSOLE => PortRequest::Console(read_message(mem, true)?),
        ports::EXIT => PortRequest::Exit { code: value, message: read_message(mem, false)? },
        ports::WAIT => {
            let ns: u64 = mem.read_obj(field(offset_of!(ParavirtPage, wait_ns)))?;
            PortRequest::Wait((ns != u64::MAX).then(|| Duration::from_nanos(ns)))
        }
        port => PortRequest::Unknown { port },
    })
}

/// The value of an `out` of 1, 2 or 4 bytes, zero-extended.
pub fn out_value(data: &[u8]) -> u32 {
    let mut bytes = [0u8; 4];
    let n = data.len().min(4);
    bytes[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn put_message(mem: &GuestMemoryMmap, len: u32, data: &[u8]) {
        mem.write_obj(len, field(offset_of!(ParavirtPage, len))).unwrap();
        mem.write_slice(data, field(offset_of!(ParavirtPage, data))).unwrap();
    }

    #[test]
    fn console_reads_exactly_len_bytes() {
        let mem = memory();
        put_message(&mem, 5, b"hello world");
        assert_eq!(decode_out(ports::CONSOLE, 0, &mem).unwrap(), PortRequest::Console("hello".into()));
    }

    #[test]
    fn a_hostile_length_is_clamped_to_the_page() {
        let mem = memory();
        put_message(&mem, u32::MAX, b"x");
        let PortRequest::Console(text) = decode_out(ports::CONSOLE, 0, &mem).unwrap() else { panic!() };
        // 'x' then the rest of the page (zeroes, shown escaped), and no more.
        assert!(text.starts_with('x'));
        assert_eq!(text.matches("\\u{0}").count(), PARAVIRT_DATA_CAPACITY - 1);
    }

    #[test]
    fn terminal_escapes_are_neutralised() {
        assert_eq!(escape_for_terminal("a\x1b[2Jb\n\tc\u{7}", true), "a\\u{1b}[2Jb\n\tc\\u{7}");
        assert_eq!(escape_for_terminal("ok\nINFO booted tenant=x", false), "ok\\nINFO booted tenant=x");
        let mem = memory();
        put_message(&mem, 3, b"\xff\x1bz");
        assert_eq!(decode_out(ports::CONSOLE, 0, &mem).unwrap(), PortRequest::Console("\u{fffd}\\u{1b}z".into()));
    }

    #[test]
    fn exit_carries_code_and_message() {
        let mem = memory();
        put_message(&mem, 4, b"boom");
        assert_eq!(
            decode_out(ports::EXIT, 101, &mem).unwrap(),
            PortRequest::Exit { code: 101, message: "boom".into() }
        );
        // An exit message stays on its line of the log.
        put_message(&mem, 8, b"a\nforged");
        assert_eq!(
            decode_out(ports::EXIT, 1, &mem).unwrap(),
            PortRequest::Exit { code: 1, message: "a\\nforged".into() }
        );
    }

    #[test]
    fn wait_reads_the_deadline() {
        let mem = memory();
        mem.write_obj(1_500u64, field(offset_of!(ParavirtPage, wait_ns))).unwrap();
        assert_eq!(decode_out(ports::WAIT, 0, &mem).unwrap(), PortRequest::Wait(Some(Duration::from_nanos(1_500))));
        mem.write_obj(u64::MAX, field(offset_of!(ParavirtPage, wait_ns))).unwrap();
        assert_eq!(decode_out(ports::WAIT, 0, &mem).unwrap(), PortRequest::Wait(None));
    }

    #[test]
    fn unknown_ports_are_reported() {
        assert_eq!(decode_out(0x80, 0, &memory()).unwrap(), PortRequest::Unknown { port: 0x80 });
        assert_eq!(out_value(&[0x34, 0x12]), 0x1234);
        assert_eq!(out_value(&[1, 2, 3, 4, 5]), 0x0403_0201);
    }
}
