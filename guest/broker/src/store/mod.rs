//! Durable broker state: the records of every change ([`record`]) and the
//! crash-safe log they are kept in on a block device ([`log`]). The broker
//! emits records as its state changes and rebuilds itself from them
//! (`broker::journal`); the runner decides when a group of records is
//! committed and holds the broker's output until then.

pub mod log;
pub mod record;
