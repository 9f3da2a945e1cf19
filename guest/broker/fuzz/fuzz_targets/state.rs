//! Recovery of a state log the fuzzer wrote and then damaged: record bodies
//! of its choosing are committed in batches of its choosing (so checksums
//! hold and recovery goes deep), bytes are flipped where it says, and the
//! log is read back into a broker, as the guest does at boot and the host
//! does with `--discard-corrupt-state`. Then the broker's snapshot must
//! encode and decode to the same records.
//!
//! Input: u8 flip count, that many (u32 LE offset, u8 xor), then chunks of
//! (u8 flags: bit 0 commit after it, bit 1 compact after it; u16 LE length;
//! body).
//!
//! Must never panic or hang, whatever the disk holds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mqvisor_broker::broker::{Broker, Config};
use mqvisor_broker::store::log::Log;

#[path = "shared/mem_disk.rs"]
mod mem_disk;
use mem_disk::MemDisk;
use mqvisor_broker::store::record::Record;

const DISK: usize = 4 << 20;

fuzz_target!(|data: &[u8]| {
    let mut disk = MemDisk(vec![0; DISK]);
    let (flips, mut rest) = match data.split_first() {
        Some((&n, rest)) => (usize::from(n % 8), rest),
        None => return,
    };
    let mut damage = Vec::new();
    for _ in 0..flips {
        let Some((flip, tail)) = rest.split_at_checked(5) else { return };
        let at = u32::from_le_bytes([flip[0], flip[1], flip[2], flip[3]]) as usize % DISK;
        damage.push((at, flip[4]));
        rest = tail;
    }
    {
        let Ok((mut log, _)) = Log::open(&mut disk, &[7; 32], |_| true) else { return };
        while let Some((&flags, tail)) = rest.split_first() {
            let Some((len, tail)) = tail.split_at_checked(2) else { break };
            let len = usize::from(u16::from_le_bytes([len[0], len[1]]));
            let Some((body, tail)) = tail.split_at_checked(len) else { break };
            rest = tail;
            if log.push(body).is_err() {
                break;
            }
            if flags & 1 != 0 && log.commit().is_err() {
                break;
            }
            if flags & 2 != 0 {
                let _ = log.compact(|push| push(body));
            }
        }
        let _ = log.commit();
    }
    for (at, xor) in damage {
        disk.0[at] ^= xor;
    }
    let mut broker = Broker::new(Config::default());
    if Log::open(&mut disk, &[7; 32], |body| broker.restore(body, 1_000)).is_ok() {
        broker.finish_restore(1_000);
        let _ = broker.snapshot(&mut |record: &Record| {
            let mut body = Vec::new();
            record.encode(&mut body);
            assert_eq!(Record::decode(&body).as_ref(), Ok(record), "a snapshot record must read back as itself");
            Ok::<(), ()>(())
        });
    }
});
