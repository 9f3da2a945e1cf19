//! A hostile guest (`guest/unikernel/src/hostile.rs`, built beside the
//! default image) attacks its VMM while a healthy tenant VM serves next to
//! it: rings outside RAM, descriptor loops, lengths near 4 GiB, a broken
//! avail ring, a notification storm, a write where no device is, a busy
//! loop that never parks, garbage config reads, all of RAM touched; as
//! root, the busy loop again under `--cpus` and the RAM filler under
//! `--memory-limit`. For each, the hostile VMM must stay up (until its
//! `--timeout`) or stop that VM with one line (or, past its memory limit,
//! be killed by the kernel), never panic, log a bounded number of lines and
//! stay within its memory.
//! The neighbour's QoS 1 round-trip p99 before and during the attack is
//! printed (`--nocapture`), not asserted: timing belongs to measurements.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use common::wire::{self, read_packet};
use common::{RunningVm, kvm_available};

const HOSTILE: &str = env!("MQVISOR_HOSTILE_IMAGE");
const SAMPLES: usize = 1000;

/// Each attack, with the limits its VMM runs under.
const ATTACKS: [(&str, &[&str]); 12] = [
    ("rings-outside-ram", &[]),
    ("descriptor-loop", &[]),
    ("huge-lengths", &[]),
    ("avail-overrun", &[]),
    ("notify-storm", &[]),
    ("disk-notify-storm", &[]),
    ("unmapped-mmio", &[]),
    ("busy-loop", &[]),
    ("garbage-config", &[]),
    ("fill-memory", &[]),
    ("busy-loop", &["--cpus", "0.25"]),
    ("fill-memory", &["--memory-limit", "32"]),
];

/// A client publishing QoS 1 to its own subscription, one message at a time.
struct Prober(TcpStream);

impl Prober {
    fn connect(vm: &RunningVm) -> Prober {
        let mut s = TcpStream::connect(vm.addr).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&wire::connect_packet("prober")).unwrap();
        assert_eq!(read_packet(&mut s).0, 0x20);
        s.write_all(&wire::subscribe("rtt", 1, 1)).unwrap();
        assert_eq!(read_packet(&mut s).0, 0x90);
        Prober(s)
    }

    /// p50 and p99 of `SAMPLES` round trips, in microseconds.
    fn percentiles_us(&mut self) -> (f64, f64) {
        let mut samples = Vec::with_capacity(SAMPLES);
        for i in 0..SAMPLES {
            let id = u16::try_from(i % 60_000 + 1).unwrap();
            let sent = Instant::now();
            self.0.write_all(&wire::publish("rtt", b"ping", 1, id, false)).unwrap();
            loop {
                let (header, body) = read_packet(&mut self.0);
                if header >> 4 == 3 {
                    let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
                    let their_id = [body[2 + topic_len], body[3 + topic_len]];
                    self.0.write_all(&[0x40, 2, their_id[0], their_id[1]]).unwrap();
                    break;
                }
            }
            samples.push(sent.elapsed().as_secs_f64() * 1e6);
        }
        samples.sort_by(f64::total_cmp);
        (samples[SAMPLES / 2], samples[SAMPLES * 99 / 100])
    }
}

#[test]
fn every_attack_of_a_hostile_guest_leaves_the_vmm_and_its_neighbour_standing() {
    if !kvm_available("every_attack_of_a_hostile_guest_leaves_the_vmm_and_its_neighbour_standing") {
        return;
    }
    let neighbour = RunningVm::start(&[]);
    let mut prober = Prober::connect(&neighbour);
    let mut table = Vec::new();
    // SAFETY: geteuid has no preconditions.
    let can_limit = unsafe { libc::geteuid() } == 0;
    for (attack, limits) in ATTACKS {
        if !limits.is_empty() && !can_limit {
            eprintln!("*** {attack} {limits:?}: not run: resource limits need root ***");
            continue;
        }
        let memory_limited = limits.first() == Some(&"--memory-limit");
        let before = prober.percentiles_us();
        let cmdline = format!("attack={attack}");
        // Every hostile VM has a state disk too, so the block device is attacked as well.
        let state = std::env::temp_dir().join(format!("mqvisor-hostile-{}-{attack}.state", std::process::id()));
        let state_arg = state.to_str().unwrap().to_string();
        let mut args = vec![
            "--image",
            HOSTILE,
            "--cmdline",
            &cmdline,
            "--timeout",
            "3",
            "--stats",
            "--state",
            &state_arg,
            "--state-size",
            "4",
            // The largest packet a 4 MiB state file's regions hold.
            "--max-packet-size",
            "524288",
        ];
        args.extend_from_slice(limits);
        let hostile = RunningVm::start(&args);
        std::thread::sleep(Duration::from_millis(200));
        let during = prober.percentiles_us();
        let rss_kib = std::fs::read_to_string(format!("/proc/{}/status", hostile.child.id()))
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_string))
            .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse::<u64>().ok()));
        let (status, stderr) = hostile.wait_end();
        let _ = std::fs::remove_file(&state);
        let code = status.code();
        let killed_at_limit = memory_limited && status.signal() == Some(libc::SIGKILL);
        assert!(
            code == Some(124) || code == Some(126) || killed_at_limit,
            "{attack} {limits:?}: the VMM must stay up until --timeout (124), stop the VM with one line (126) or, \
             past its memory limit, be killed by the kernel; got {status:?}: {stderr}"
        );
        assert!(!memory_limited || killed_at_limit, "{attack}: the VMM outlived its memory limit: {status:?}");
        assert!(!stderr.contains("panicked"), "{attack}: {stderr}");
        assert!(stderr.lines().count() <= 4, "{attack}: the VMM must not flood its log: {stderr}");
        if let Some(rss) = rss_kib {
            assert!(rss < 128 << 10, "{attack}: the VMM grew to {rss} KiB");
        }
        let outcome = match code {
            _ if killed_at_limit => "killed at its memory limit".to_string(),
            Some(124) => "stayed up (--timeout)".to_string(),
            _ => {
                let line = stderr.lines().find(|l| l.contains("crashed")).unwrap_or("stopped");
                eprintln!("{attack}: {line}");
                "VM stopped, one line (126)".to_string()
            }
        };
        let counters = stderr.lines().find(|l| l.contains("stats:")).unwrap_or("").to_string();
        let counted = |name: &str| {
            counters
                .split(name)
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .unwrap_or("?")
                .trim_end_matches(',')
                .to_string()
        };
        table.push(format!(
            "{:<30} | {outcome:<26} | refused chains {:>5}, ring faults {:>5}, notifications {:>7} | peak RSS {:>6} KiB | \
             neighbour p50 {:>5.0} -> {:>5.0} us ({:.2}x), p99 {:>5.0} -> {:>5.0} us ({:.2}x)",
            format!("{attack} {}", limits.join(" ")),
            counted("refused chains "),
            counted("ring faults "),
            counted("queue notifications "),
            rss_kib.unwrap_or(0),
            before.0,
            during.0,
            during.0 / before.0,
            before.1,
            during.1,
            during.1 / before.1
        ));
    }
    // The neighbour served throughout.
    assert!(prober.percentiles_us().0 > 0.0);
    eprintln!("\nhostile guest vs a neighbour tenant ({SAMPLES} QoS 1 round trips each):");
    for row in table {
        eprintln!("{row}");
    }
}
