//! A client controls every byte of the record bodies the log holds, and
//! every byte of the space the log does not use (stale regions are full of
//! old client bytes): recovery must give back exactly the records that
//! were committed, in order, and nothing else.
//!
//! Input: chunks of (u8 op; u16 LE length; bytes). Op % 4: 0 push the
//! bytes as a record, 1 commit, 2 compact (the snapshot is every record
//! committed so far), 3 write the bytes into the region the log is not
//! using, or past the log's end, at an offset the next two bytes give.
//!
//! Must never panic or hang, and never recover a record it did not commit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mqvisor_broker::store::log::{DATA_START, Log};

#[path = "shared/mem_disk.rs"]
mod mem_disk;
use mem_disk::MemDisk;

const DISK: usize = 4 << 20;
const ENTROPY: [u8; 32] = [0x42; 32];

fuzz_target!(|data: &[u8]| {
    let mut disk = MemDisk(vec![0; DISK]);
    let region = (DISK - DATA_START as usize) / 2 / 512 * 512;
    let mut committed: Vec<Vec<u8>> = Vec::new();
    let mut pending: Vec<Vec<u8>> = Vec::new();
    // Stale bytes to lay down once the log is closed: (offset, bytes).
    let mut stale: Vec<(usize, Vec<u8>)> = Vec::new();
    let mut rest = data;
    {
        let Ok((mut log, _)) = Log::open(&mut disk, &ENTROPY, |_| true) else { return };
        while let Some((&op, tail)) = rest.split_first() {
            let Some((len, tail)) = tail.split_at_checked(2) else { break };
            let len = usize::from(u16::from_le_bytes([len[0], len[1]]));
            let Some((bytes, tail)) = tail.split_at_checked(len.min(tail.len())) else { break };
            rest = tail;
            let ok = match op % 4 {
                0 => log.push(bytes).map(|()| pending.push(bytes.to_vec())).is_ok(),
                1 => log.commit().map(|()| committed.append(&mut pending)).is_ok(),
                2 => {
                    let live = committed.clone();
                    let ok = log.compact(|push| live.iter().try_for_each(|r| push(r))).is_ok();
                    if ok {
                        pending.clear();
                    }
                    ok
                }
                _ => {
                    if bytes.len() >= 2 {
                        stale.push((usize::from(u16::from_le_bytes([bytes[0], bytes[1]])), bytes[2..].to_vec()));
                    }
                    true
                }
            };
            if !ok {
                break;
            }
        }
    }
    // Where the live log is, as the log says.
    let (active, end) = {
        let Ok((log, _)) = Log::open(&mut disk, &ENTROPY, |_| true) else { panic!("a log it wrote must open") };
        let active = log.active_region();
        (usize::try_from(active.start).unwrap(), usize::try_from(log.len()).unwrap())
    };
    let active_start = active;
    let other_start = if active == DATA_START as usize { active + region } else { DATA_START as usize };
    for (i, (offset, bytes)) in stale.iter().enumerate() {
        // Alternately into the unused region, and past the live log's end.
        let (start, room) = if i % 2 == 0 { (other_start, region) } else { (active_start + end, region - end) };
        if room == 0 {
            continue;
        }
        let at = start + (offset * 512) % room;
        let n = bytes.len().min(start + room - at);
        disk.0[at..at + n].copy_from_slice(&bytes[..n]);
    }
    let mut seen = Vec::new();
    let opened = Log::open(&mut disk, &ENTROPY, |body| {
        seen.push(body.to_vec());
        true
    });
    assert!(opened.is_ok(), "stale bytes stopped the start: {:?}", opened.err());
    // Every committed record, in order; after them at most the first few
    // records pushed since the last commit (a full batch is written as it
    // fills); nothing else.
    assert!(seen.len() >= committed.len(), "recovered {} records, committed {}", seen.len(), committed.len());
    assert!(seen[..committed.len()] == committed[..], "committed records changed");
    let extra = &seen[committed.len()..];
    assert!(extra.len() <= pending.len() && extra == &pending[..extra.len()], "a record nobody pushed came back");
});
