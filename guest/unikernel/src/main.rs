//! The mqvisor unikernel: a freestanding program that is its own OS.
//!
//! The VMM enters `_start` in 64-bit mode at CPL 3 with RDI pointing at the
//! boot-info page (see `mqvisor-boot-abi`). There are no interrupts and no
//! CPL 0 code: the guest polls, reads time from the TSC, and parks in the VMM
//! when idle. A panic or an unusable boot-info ends the VM through the EXIT
//! port with a message; nothing here may loop forever without parking.
//!
//! It prints a banner with its start-up latency, then runs the service the
//! VMM chose in boot-info: the MQTT broker (`net::mqtt`, configured from the
//! boot-info configuration blob), an echo of every client stream
//! (`net::echo`, to test the link), or the boot demo (timer sleeps, then
//! exit). The command line (`--cmdline` on the host)
//! selects diagnostics; see [`Command`].

// Non-test code never unwraps, expects or panics: every failure is a value
// the caller reports (tests may: see clippy.toml).
#![warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![no_std]
#![no_main]

extern crate alloc;

mod clock;
mod console;
mod heap;
mod mem;
mod net;
mod paravirt;
mod store;

use alloc::vec::Vec;
use core::fmt::Write;
use core::panic::PanicInfo;

use mqvisor_boot_abi::{BootInfo, exit_codes, layout, service};

/// Exit code for a boot-info or command line the guest cannot use.
const EXIT_BAD_BOOT: u32 = 2;
/// Exit code when the heap is exhausted.
pub const EXIT_NO_MEMORY: u32 = 4;

/// What the command line asks for; words are `key=value` or bare names.
#[derive(Debug)]
struct Command {
    /// `sleeps=N`: how many timer sleeps to prove WAIT and the clock.
    sleeps: u32,
    /// `sleep_ms=N`: length of each sleep.
    sleep_ms: u64,
    /// `exit=N`: exit code to end with.
    exit_code: u32,
    /// `selftest=panic|fault|hang`: misbehave on purpose (for the VMM's tests).
    selftest: Option<SelfTest>,
}

#[derive(Debug, Clone, Copy)]
enum SelfTest {
    Panic,
    Fault,
    Hang,
}

impl Command {
    fn parse(cmdline: &str) -> Result<Command, &str> {
        let mut command = Command { sleeps: 3, sleep_ms: 10, exit_code: 0, selftest: None };
        for word in cmdline.split_ascii_whitespace() {
            let (key, value) = word.split_once('=').unwrap_or((word, ""));
            match key {
                "sleeps" => command.sleeps = value.parse().map_err(|_| word)?,
                "sleep_ms" => command.sleep_ms = value.parse().map_err(|_| word)?,
                "exit" => command.exit_code = value.parse().map_err(|_| word)?,
                "selftest" => {
                    command.selftest = Some(match value {
                        "panic" => SelfTest::Panic,
                        "fault" => SelfTest::Fault,
                        "hang" => SelfTest::Hang,
                        _ => return Err(word),
                    })
                }
                _ => return Err(word),
            }
        }
        Ok(command)
    }
}

/// Formats into a fixed buffer (no heap), for messages sent through EXIT.
struct MessageBuf {
    bytes: [u8; 256],
    len: usize,
}

impl MessageBuf {
    fn new() -> Self {
        MessageBuf { bytes: [0; 256], len: 0 }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl Write for MessageBuf {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        // Truncate rather than fail: a cut message beats no message.
        let take = s.len().min(self.bytes.len() - self.len);
        self.bytes[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        Ok(())
    }
}

fn exit_with(code: u32, args: core::fmt::Arguments) -> ! {
    let mut message = MessageBuf::new();
    let _ = message.write_fmt(args);
    paravirt::exit(code, message.as_bytes())
}

#[unsafe(no_mangle)]
extern "C" fn _start(boot_info: *const BootInfo) -> ! {
    let start_tsc = clock::rdtsc();
    if boot_info as u64 != layout::BOOT_INFO {
        exit_with(EXIT_BAD_BOOT, format_args!("boot-info pointer {boot_info:p} is not where the ABI puts it"));
    }
    // SAFETY: the pointer is the ABI's boot-info address (checked above), which
    // the VMM maps and fills before entry; nothing writes it afterwards.
    let info = unsafe { &*boot_info };
    if !info.is_valid() {
        exit_with(EXIT_BAD_BOOT, format_args!("boot-info magic/version mismatch"));
    }
    if info.tsc_khz == 0 {
        exit_with(EXIT_BAD_BOOT, format_args!("boot-info has no TSC frequency"));
    }
    clock::init(info.tsc_khz, start_tsc);
    let heap_size = match heap::init(info) {
        Ok(size) => size,
        Err(e) => exit_with(EXIT_BAD_BOOT, format_args!("unusable heap: {e}")),
    };
    let Some(cmdline) = info.cmdline() else {
        exit_with(EXIT_BAD_BOOT, format_args!("command line is not UTF-8"));
    };
    let command = match Command::parse(cmdline) {
        Ok(command) => command,
        Err(word) => exit_with(EXIT_BAD_BOOT, format_args!("unknown or malformed command-line word {word:?}")),
    };
    let ready = clock::now();

    // Boot -> _start: the VMM's set-up time, plus the guest TSC ticks between
    // the VMM's last look at the TSC and our first instruction.
    let boot_to_start_ns = if info.entry_tsc != 0 {
        info.setup_ns + clock::ticks_to_ns(start_tsc.wrapping_sub(info.entry_tsc))
    } else {
        info.setup_ns
    };
    println!(
        "mqvisor-guest {} ready: boot-to-start {} us, start-to-ready {} us, ram {} MiB, heap {} KiB, tsc {} kHz",
        env!("CARGO_PKG_VERSION"),
        boot_to_start_ns / 1000,
        ready.ns_since(clock::Instant::START) / 1000,
        info.ram_size >> 20,
        heap_size >> 10,
        info.tsc_khz,
    );

    match info.service {
        service::DEMO => {
            run(&command);
            exit_with(command.exit_code, format_args!(""))
        }
        service::ECHO => net::echo::run(info),
        service::MQTT => match net::mqtt::read_config(info) {
            Ok(config) => net::mqtt::run(info, config),
            Err(why) => exit_with(EXIT_BAD_BOOT, format_args!("broker configuration: {why}")),
        },
        other => exit_with(EXIT_BAD_BOOT, format_args!("unknown service {other} in boot-info")),
    }
}

fn run(command: &Command) {
    match command.selftest {
        // The self-test of the panic path itself.
        #[allow(clippy::panic)]
        Some(SelfTest::Panic) => panic!("selftest panic requested on the command line"),
        Some(SelfTest::Fault) => {
            // The guard gap below the stack is unmapped: this load faults, and
            // with no IDT the fault escalates to a triple fault in the VMM.
            let unmapped = layout::SYSTEM_END as *const u64;
            // SAFETY: deliberately not safe; this is the fault path under test.
            // The address is non-null and aligned, so Rust's own checks pass.
            let value = unsafe { unmapped.read_volatile() };
            println!("unreachable: read {value} from an unmapped page");
        }
        Some(SelfTest::Hang) => loop {
            core::hint::spin_loop();
        },
        None => {}
    }

    // Prove the heap and the clock: allocate, then sleep and measure.
    let mut slept_us: Vec<u64> = Vec::with_capacity(command.sleeps as usize);
    for _ in 0..command.sleeps {
        let before = clock::now();
        clock::wait_until(before.plus_ns(command.sleep_ms * 1_000_000));
        slept_us.push(clock::now().ns_since(before) / 1000);
    }
    if !slept_us.is_empty() {
        println!(
            "timer: {} sleeps of {} ms took {:?} us (heap free {} KiB)",
            command.sleeps,
            command.sleep_ms,
            slept_us,
            heap::free_bytes() >> 10
        );
    }
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    // One line, so the VMM can report it as one.
    match info.location() {
        Some(at) => exit_with(exit_codes::PANIC, format_args!("panicked at {at}: {}", info.message())),
        None => exit_with(exit_codes::PANIC, format_args!("panicked: {}", info.message())),
    }
}

/// The prebuilt `alloc` for the host target names this symbol even with
/// `panic = "abort"`; nothing ever calls it.
#[unsafe(no_mangle)]
extern "C" fn rust_eh_personality() {}

/// Likewise referenced by the prebuilt `alloc` (its unwinding landing pads);
/// with `panic = "abort"` no unwinding ever starts, so this cannot be reached.
#[unsafe(no_mangle)]
extern "C" fn _Unwind_Resume() -> ! {
    paravirt::exit(exit_codes::PANIC, b"unwinding is not supported")
}
