//! Console output: `print!`/`println!` over the CONSOLE port.
//!
//! Owns line buffering. Each `println!` costs one VM exit, never one per byte;
//! must never allocate, so that the panic handler can print.

use core::fmt;

use crate::paravirt;

const LINE_CAPACITY: usize = 512;

/// A stack buffer that flushes to the console when full and when dropped.
pub struct Console {
    buf: [u8; LINE_CAPACITY],
    len: usize,
}

impl Console {
    /// An empty buffer.
    pub const fn new() -> Self {
        Console { buf: [0; LINE_CAPACITY], len: 0 }
    }

    /// Sends what is buffered.
    pub fn flush(&mut self) {
        paravirt::console_write(&self.buf[..self.len]);
        self.len = 0;
    }
}

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut bytes = s.as_bytes();
        while !bytes.is_empty() {
            if self.len == LINE_CAPACITY {
                self.flush();
            }
            let take = bytes.len().min(LINE_CAPACITY - self.len);
            self.buf[self.len..self.len + take].copy_from_slice(&bytes[..take]);
            self.len += take;
            bytes = &bytes[take..];
        }
        Ok(())
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Prints to the VMM console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        let mut console = $crate::console::Console::new();
        // Console::write_str never fails.
        let _ = core::fmt::Write::write_fmt(&mut console, format_args!($($arg)*));
    }};
}

/// Prints a line to the VMM console.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => { $crate::print!("{}\n", format_args!($($arg)*)) };
}
