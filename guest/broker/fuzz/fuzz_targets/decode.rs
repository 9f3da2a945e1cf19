//! The codec on arbitrary bytes: framing and decoding never panic, in any
//! protocol version, in either direction; what decodes re-encodes and
//! decodes to the same packet.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mqvisor_broker::packet::{self, Packet, Version};

fuzz_target!(|data: &[u8]| {
    for version in [Version::V3_1, Version::V3_1_1, Version::V5] {
        let Ok(Some(frame)) = packet::frame(data, 1 << 20) else { continue };
        if let Ok(decoded) = packet::decode(frame, data, version) {
            // Client packets encode (CONNECT carries its own version).
            let encode_version = match &decoded {
                Packet::Connect(c) => c.version,
                _ => version,
            };
            let mut again = Vec::new();
            packet::encode(&decoded, encode_version, &mut again);
            let frame2 = packet::frame(&again, usize::MAX).unwrap().unwrap();
            let round = packet::decode(frame2, &again, encode_version).unwrap();
            assert_eq!(round, decoded);
        }
        let _ = packet::decode_from_server(frame, data, version);
    }
});
