//! A tenant's quotas, enforced by backpressure: token buckets for the
//! PUBLISH packets, bytes and new connections coming into a tenant and the
//! bytes going out of it, and one PUBLISH bucket per client.
//!
//! Owns the buckets, the minimal MQTT framer that finds each PUBLISH in a
//! client's inbound bytes (fixed header only, through
//! `mqvisor_broker::packet::announced_len`), and the arithmetic of how
//! much a client may move now and when it may move again. The stream
//! logic (`net::streams`) asks, and stops reading (or writing) a client
//! whose bucket is empty until the time given here; the client's bytes
//! wait in its own TCP connection (or, for at most one read, in the VMM).
//!
//! Never drops, refuses or reorders a byte, never does I/O and never reads
//! a clock (the time is given, [`Limiter::tick`]). With no quota set there
//! is no [`Limiter`] at all, and the proxy's path is the one it always was.
//!
//! # Fairness
//!
//! Each bucket holds [`BURST`] worth of tokens. A read turn (the proxy
//! gives them round-robin) may take at most a quarter of a tenant bucket
//! (its quantum), so a noisy client takes no more per round than any other
//! client wanting to send. A client whose bucket (its own or the tenant's)
//! is empty waits until that bucket holds a quantum again, and waiting
//! clients resume in the order they began to wait: a timer, never a spin.

use std::time::{Duration, Instant};

use mqvisor_broker::packet::announced_len;
use serde::{Deserialize, Serialize};

/// How long a full bucket lasts at its rate: the largest burst allowed.
pub const BURST: Duration = Duration::from_millis(100);

/// Most bytes one read takes from a client while a PUBLISH rate applies:
/// what follows a PUBLISH without a token waits in the VMM, so this bounds
/// what a throttled client holds here.
pub const HELD_MAX: usize = 16 * 1024;

/// Type nibble of an MQTT PUBLISH packet's first byte.
const PUBLISH: u8 = 3;

/// The fewest bytes the framer counts as a PUBLISH: a fixed header whose
/// remaining length is 0.
const SMALLEST_PUBLISH: usize = 2;

/// A tenant's quotas, per second; 0 is no limit.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Quotas {
    /// PUBLISH packets per second into the tenant, all clients together.
    pub max_publish_rate: u64,
    /// PUBLISH packets per second from any one client.
    pub max_client_publish_rate: u64,
    /// Bytes per second read from the tenant's clients, together.
    pub max_ingress_bytes_rate: u64,
    /// Bytes per second written to the tenant's clients, together.
    pub max_egress_bytes_rate: u64,
    /// New client connections per second.
    pub max_connection_rate: u64,
}

impl Quotas {
    /// True when no quota is set.
    pub fn is_unlimited(&self) -> bool {
        *self == Quotas::default()
    }
}

/// A token bucket: `rate` tokens a second, at most [`BURST`] worth.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket, or `None` for rate 0 (no limit).
    pub fn new(rate: u64, now: Instant) -> Option<Bucket> {
        if rate == 0 {
            return None;
        }
        let rate = rate as f64;
        let burst = (rate * BURST.as_secs_f64()).max(1.0);
        Some(Bucket { rate, burst, tokens: burst, at: now })
    }

    /// Adds the tokens earned since the last refill.
    pub fn refill(&mut self, now: Instant) {
        let earned = now.saturating_duration_since(self.at).as_secs_f64() * self.rate;
        if earned > 0.0 {
            self.tokens = (self.tokens + earned).min(self.burst);
            self.at = now;
        }
    }

    /// Whole tokens there now.
    pub fn available(&self) -> u64 {
        whole(self.tokens)
    }

    /// Takes `n` tokens (callers take no more than are there).
    pub fn take(&mut self, n: u64) {
        self.tokens -= n as f64;
    }

    /// The most one read or write turn may take: a quarter of the burst.
    pub fn quantum(&self) -> u64 {
        whole(self.burst / 4.0).max(1)
    }

    /// When the bucket holds its quantum again (`now` if it does).
    pub fn ready_at(&self, now: Instant) -> Instant {
        let want = (self.quantum() as f64).min(self.burst);
        let missing = want - self.tokens;
        if missing <= 0.0 {
            return now;
        }
        self.at + Duration::from_secs_f64(missing / self.rate)
    }
}

/// Finds the PUBLISH packets in one client's inbound bytes, across reads:
/// the fixed header's type and remaining length, nothing more.
#[derive(Debug, Default, Clone, Copy)]
pub struct PublishFramer {
    /// The fixed header so far (a type byte, up to 4 length bytes).
    header: [u8; 5],
    header_len: u8,
    /// Bytes of the current packet's body still to pass.
    skip: usize,
    /// Not MQTT (a remaining length over 4 bytes): nothing more is counted;
    /// the broker closes such a client.
    broken: bool,
}

impl PublishFramer {
    /// Passes over `bytes`, asking `publish` at the first byte of each
    /// PUBLISH whether it may go; stops before the first one that may not.
    /// Returns how many bytes were passed (all, or that PUBLISH's offset).
    pub fn scan(&mut self, bytes: &[u8], mut publish: impl FnMut() -> bool) -> usize {
        let mut at = 0;
        while at < bytes.len() {
            if self.broken {
                return bytes.len();
            }
            if self.skip > 0 {
                let n = self.skip.min(bytes.len() - at);
                self.skip -= n;
                at += n;
                continue;
            }
            let byte = bytes[at];
            if self.header_len == 0 && byte >> 4 == PUBLISH && !publish() {
                return at;
            }
            self.header[usize::from(self.header_len)] = byte;
            self.header_len += 1;
            at += 1;
            let header = &self.header[..usize::from(self.header_len)];
            if header.len() >= 2 {
                match announced_len(header) {
                    Some(total) => {
                        self.skip = total.saturating_sub(header.len());
                        self.header_len = 0;
                    }
                    None if header.len() == self.header.len() => self.broken = true,
                    None => {}
                }
            }
        }
        at
    }

    /// True between packets (no header or body begun).
    pub fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.skip == 0
    }
}

/// One client's part of the quotas.
#[derive(Debug, Clone, Copy)]
pub struct ClientQuota {
    framer: PublishFramer,
    publish: Option<Bucket>,
    /// The client moved nothing since it last waited: the next bytes moved
    /// count as throttled.
    resumed_read: bool,
    resumed_write: bool,
    /// The PUBLISH at the cut was counted as throttled already.
    held_counted: bool,
}

/// What [`Limiter::consume`] and [`Limiter::wrote`] counted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Throttled {
    pub bytes: u64,
    pub publishes: u64,
}

/// A tenant's buckets (see the module doc).
#[derive(Debug)]
pub struct Limiter {
    quotas: Quotas,
    publish: Option<Bucket>,
    ingress: Option<Bucket>,
    egress: Option<Bucket>,
    connections: Option<Bucket>,
    now: Instant,
}

impl Limiter {
    /// The tenant's buckets, full; `None` when no quota is set.
    pub fn new(quotas: Quotas, now: Instant) -> Option<Limiter> {
        if quotas.is_unlimited() {
            return None;
        }
        Some(Limiter {
            quotas,
            publish: Bucket::new(quotas.max_publish_rate, now),
            ingress: Bucket::new(quotas.max_ingress_bytes_rate, now),
            egress: Bucket::new(quotas.max_egress_bytes_rate, now),
            connections: Bucket::new(quotas.max_connection_rate, now),
            now,
        })
    }

    /// Time passed: the tenant's buckets earn their tokens.
    pub fn tick(&mut self, now: Instant) {
        self.now = now;
        for bucket in
            [&mut self.publish, &mut self.ingress, &mut self.egress, &mut self.connections].into_iter().flatten()
        {
            bucket.refill(now);
        }
    }

    /// The time of the last [`Limiter::tick`].
    pub fn now(&self) -> Instant {
        self.now
    }

    /// A new client's part: its own PUBLISH bucket, full.
    pub fn client(&self) -> ClientQuota {
        ClientQuota {
            framer: PublishFramer::default(),
            publish: Bucket::new(self.quotas.max_client_publish_rate, self.now),
            resumed_read: false,
            resumed_write: false,
            held_counted: false,
        }
    }

    fn counts_publishes(&self) -> bool {
        self.quotas.max_publish_rate > 0 || self.quotas.max_client_publish_rate > 0
    }

    /// PUBLISH tokens `client` may use in one read turn now.
    fn publish_tokens(&self, client: &ClientQuota) -> u64 {
        let tenant = self.publish.map_or(u64::MAX, |b| b.available().min(b.quantum()));
        tenant.min(client.publish.map_or(u64::MAX, |b| b.available()))
    }

    /// Most bytes a read turn may take from the client now, at most `room`;
    /// 0: it waits.
    pub fn read_max(&self, client: &ClientQuota, room: usize) -> usize {
        let mut max = room;
        if let Some(ingress) = &self.ingress {
            max = max.min(to_usize(ingress.available().min(ingress.quantum())));
        }
        // What follows a PUBLISH without a token waits in the VMM, so a
        // read takes at most HELD_MAX bytes, unless the tokens there cover
        // every PUBLISH that many bytes could hold: then nothing can wait,
        // and the read is as large as one without quotas (smaller reads
        // made three times the frames to the guest).
        if self.counts_publishes()
            && self.publish_tokens(client) < u64::try_from(max / SMALLEST_PUBLISH).unwrap_or(u64::MAX)
        {
            max = max.min(HELD_MAX);
        }
        max
    }

    /// How many of `bytes` (the client's next ones) may go to the guest
    /// now: up to the first PUBLISH without a token, within this turn's
    /// quantum and the bytes' bucket. Takes nothing.
    pub fn allowance(&self, client: &mut ClientQuota, bytes: &[u8]) -> usize {
        if let Some(bucket) = &mut client.publish {
            bucket.refill(self.now);
        }
        let mut len = self.read_max(client, bytes.len());
        if self.counts_publishes() {
            let mut left = self.publish_tokens(client);
            let mut framer = client.framer;
            len = framer.scan(&bytes[..len], || {
                let ok = left > 0;
                left = left.saturating_sub(1);
                ok
            });
        }
        len
    }

    /// `bytes` go to the guest (no more than [`Limiter::allowance`] gave):
    /// their tokens are taken. `held` bytes after them wait, cut before a
    /// PUBLISH without a token when not 0. Says what moved after a wait.
    pub fn consume(&mut self, client: &mut ClientQuota, bytes: &[u8], held: usize) -> Throttled {
        let mut publishes = 0u64;
        if self.counts_publishes() {
            client.framer.scan(bytes, || {
                publishes += 1;
                true
            });
        }
        if let Some(bucket) = &mut self.publish {
            bucket.take(publishes);
        }
        if let Some(bucket) = &mut client.publish {
            bucket.take(publishes);
        }
        if let Some(bucket) = &mut self.ingress {
            bucket.take(bytes.len() as u64);
        }
        let mut throttled = Throttled::default();
        if publishes > 0 {
            client.held_counted = false;
        }
        if held > 0 && client.framer.at_boundary() && !client.held_counted {
            // A PUBLISH waits for a token (counted once however long).
            client.held_counted = true;
            throttled.publishes = 1;
        }
        if client.resumed_read && !bytes.is_empty() {
            client.resumed_read = false;
            throttled.bytes = bytes.len() as u64;
        }
        throttled
    }

    /// When a client that may move nothing now may try again: when every
    /// bucket it lacks tokens in holds a quantum.
    pub fn read_ready_at(&self, client: &mut ClientQuota) -> Instant {
        client.resumed_read = true;
        let mut at = self.now;
        if let Some(b) = &self.ingress
            && b.available() == 0
        {
            at = at.max(b.ready_at(self.now));
        }
        if let Some(b) = &self.publish
            && b.available() == 0
        {
            at = at.max(b.ready_at(self.now));
        }
        if let Some(b) = &client.publish
            && b.available() == 0
        {
            at = at.max(b.ready_at(self.now));
        }
        at.max(self.now + Duration::from_millis(1))
    }

    /// Most bytes a write to a client may take now; 0: it waits.
    pub fn write_max(&self) -> usize {
        self.egress.map_or(usize::MAX, |b| to_usize(b.available().min(b.quantum())))
    }

    /// `n` bytes were written to a client. Says what moved after a wait.
    pub fn wrote(&mut self, client: &mut ClientQuota, n: usize) -> Throttled {
        if let Some(bucket) = &mut self.egress {
            bucket.take(n as u64);
        }
        if client.resumed_write && n > 0 {
            client.resumed_write = false;
            return Throttled { bytes: n as u64, publishes: 0 };
        }
        Throttled::default()
    }

    /// When a client that may be written nothing now may be again.
    pub fn write_ready_at(&self, client: &mut ClientQuota) -> Instant {
        client.resumed_write = true;
        let at = self.egress.map_or(self.now, |b| b.ready_at(self.now));
        at.max(self.now + Duration::from_millis(1))
    }

    /// A new connection may be taken now (its token is taken), or from the
    /// time given.
    pub fn take_connection(&mut self) -> Result<(), Instant> {
        match &mut self.connections {
            None => Ok(()),
            Some(b) if b.available() > 0 => {
                b.take(1);
                Ok(())
            }
            Some(b) => {
                // One token is enough: a connection waits no longer than it must.
                let missing = 1.0 - b.tokens;
                Err(b.at + Duration::from_secs_f64(missing.max(0.0) / b.rate).max(Duration::from_millis(1)))
            }
        }
    }
}

/// The whole part of a count of tokens, 0 for none or less.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn whole(tokens: f64) -> u64 {
    // `as` saturates (and takes NaN to 0): never more than the bucket holds.
    tokens.max(0.0) as u64
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A QoS 0 PUBLISH of `payload` bytes on topic "t".
    fn publish(payload: usize) -> Vec<u8> {
        let remaining = 2 + 1 + payload;
        let mut packet = vec![0x30];
        let mut r = remaining;
        loop {
            let mut byte = u8::try_from(r % 128).unwrap();
            r /= 128;
            if r > 0 {
                byte |= 0x80;
            }
            packet.push(byte);
            if r == 0 {
                break;
            }
        }
        packet.extend_from_slice(&[0, 1, b't']);
        packet.extend(std::iter::repeat_n(b'x', payload));
        packet
    }

    #[test]
    fn a_bucket_refills_at_its_rate_up_to_its_burst() {
        let t0 = Instant::now();
        let mut b = Bucket::new(2000, t0).unwrap();
        assert_eq!(b.available(), 200, "100 ms worth");
        assert_eq!(b.quantum(), 50);
        b.take(200);
        assert_eq!(b.available(), 0);
        assert_eq!(b.ready_at(t0), t0 + Duration::from_millis(25));
        b.refill(t0 + Duration::from_millis(10));
        assert_eq!(b.available(), 20);
        b.refill(t0 + Duration::from_secs(10));
        assert_eq!(b.available(), 200, "never more than the burst");
        assert!(Bucket::new(0, t0).is_none());
        assert_eq!(Bucket::new(3, t0).unwrap().available(), 1, "at least one token");
    }

    #[test]
    fn the_framer_counts_publishes_split_anywhere() {
        let connect = [0x10, 0x03, 0, 0, 0];
        let mut stream = connect.to_vec();
        for size in [0, 5, 200, 20_000] {
            stream.extend(publish(size));
            stream.extend_from_slice(&[0xc0, 0x00]); // PINGREQ
        }
        // Every split of the stream into two reads, and byte by byte.
        for cut in 0..stream.len().min(400) {
            let mut f = PublishFramer::default();
            let mut n = 0;
            assert_eq!(
                f.scan(&stream[..cut], || {
                    n += 1;
                    true
                }),
                cut
            );
            assert_eq!(
                f.scan(&stream[cut..], || {
                    n += 1;
                    true
                }),
                stream.len() - cut
            );
            assert_eq!(n, 4, "cut at {cut}");
            assert!(f.at_boundary());
        }
        let mut f = PublishFramer::default();
        let mut n = 0;
        for byte in stream.chunks(1) {
            f.scan(byte, || {
                n += 1;
                true
            });
        }
        assert_eq!(n, 4);
    }

    #[test]
    fn the_framer_stops_before_a_publish_without_a_token() {
        let mut stream = publish(10);
        let second = stream.len();
        stream.extend(publish(10));
        let mut f = PublishFramer::default();
        let mut tokens = 1;
        let passed = f.scan(&stream, || {
            let ok = tokens > 0;
            tokens -= 1;
            ok
        });
        assert_eq!(passed, second);
        assert!(f.at_boundary());
        // Not MQTT: a remaining length of 5 bytes; nothing more is counted.
        let mut f = PublishFramer::default();
        assert_eq!(f.scan(&[0x10, 0xff, 0xff, 0xff, 0xff, 0x30, 0x30], || false), 7);
    }

    #[test]
    fn the_limiter_holds_back_what_has_no_token_and_says_when_to_come_back() {
        let t0 = Instant::now();
        let quotas = Quotas { max_publish_rate: 40, max_client_publish_rate: 8, ..Quotas::default() };
        let mut limiter = Limiter::new(quotas, t0).unwrap();
        let mut client = limiter.client();
        let stream: Vec<u8> = (0..5).flat_map(|_| publish(3)).collect();
        let one = publish(3).len();
        // The tenant's quantum is 1 (burst 4): one PUBLISH per turn.
        let allowed = limiter.allowance(&mut client, &stream);
        assert_eq!(allowed, one);
        assert_eq!(limiter.consume(&mut client, &stream[..allowed], stream.len() - allowed).publishes, 1);
        let rest = &stream[allowed..];
        // The client's own bucket (burst 1) is now empty.
        assert_eq!(limiter.allowance(&mut client, rest), 0);
        let at = limiter.read_ready_at(&mut client);
        assert_eq!(at, t0 + Duration::from_millis(125));
        limiter.tick(at);
        let allowed = limiter.allowance(&mut client, rest);
        assert_eq!(allowed, one);
        let moved = limiter.consume(&mut client, &rest[..allowed], rest.len() - allowed);
        assert_eq!(moved, Throttled { bytes: one as u64, publishes: 1 });
        assert!(Limiter::new(Quotas::default(), t0).is_none());
    }

    #[test]
    fn a_read_holds_back_at_most_held_max_unless_every_publish_it_could_hold_has_a_token() {
        let t0 = Instant::now();
        let room = 256 * 1024;
        // 10,000,000 a second: a quarter of the burst covers a whole read.
        let plenty = Quotas { max_publish_rate: 10_000_000, max_client_publish_rate: 10_000_000, ..Quotas::default() };
        let limiter = Limiter::new(plenty, t0).unwrap();
        assert_eq!(limiter.read_max(&limiter.client(), room), room);
        // 2,000 a second: 50 tokens a turn, fewer than 256 KiB could hold.
        for few in [
            Quotas { max_publish_rate: 2000, ..Quotas::default() },
            Quotas { max_client_publish_rate: 2000, ..Quotas::default() },
        ] {
            let limiter = Limiter::new(few, t0).unwrap();
            assert_eq!(limiter.read_max(&limiter.client(), room), HELD_MAX, "{few:?}");
            assert_eq!(limiter.read_max(&limiter.client(), 100), 100, "{few:?}");
        }
    }

    #[test]
    fn bytes_and_connections_wait_for_their_tokens() {
        let t0 = Instant::now();
        let quotas = Quotas {
            max_ingress_bytes_rate: 10_000,
            max_egress_bytes_rate: 1000,
            max_connection_rate: 10,
            ..Quotas::default()
        };
        let mut limiter = Limiter::new(quotas, t0).unwrap();
        let mut client = limiter.client();
        assert_eq!(limiter.read_max(&client, 1000), 250, "a quarter of the 1000 bytes' burst");
        assert_eq!(limiter.allowance(&mut client, &[0u8; 400]), 250);
        limiter.consume(&mut client, &[0u8; 1000], 0);
        assert_eq!(limiter.read_max(&client, 1000), 0);
        assert_eq!(limiter.read_ready_at(&mut client), t0 + Duration::from_millis(25));
        assert_eq!(limiter.write_max(), 25);
        limiter.wrote(&mut client, 100);
        assert_eq!(limiter.write_max(), 0);
        assert_eq!(limiter.write_ready_at(&mut client), t0 + Duration::from_millis(25));
        assert_eq!(limiter.take_connection(), Ok(()));
        assert!(limiter.take_connection().is_err());
        limiter.tick(t0 + Duration::from_millis(100));
        assert_eq!(limiter.take_connection(), Ok(()));
    }
}
