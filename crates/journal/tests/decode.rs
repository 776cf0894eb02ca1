//! The public segment decoder never panics and isolates damage.

use proptest::prelude::*;

const HEADER: &[u8] = b"SANAREJW\x01\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00";

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = sanare_journal::decode_segment_file(&bytes);
        let mut seg = HEADER.to_vec();
        seg.extend_from_slice(&bytes);
        let (entries, _) = sanare_journal::decode_segment_file(&seg).unwrap();
        prop_assert!(entries.iter().all(|e| e.payload_hash.len() == 32));
    }

    #[test]
    fn frames_with_random_damage_never_panic(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6)) {
        let golden = include_str!("golden/entry_frame.hex");
        let frame: Vec<u8> = (0..golden.len() / 2)
            .map(|i| u8::from_str_radix(&golden[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let mut seg = HEADER.to_vec();
        for _ in 0..3 {
            seg.extend_from_slice(&frame);
        }
        for (at, x) in &flips {
            let i = HEADER.len() + at.index(seg.len() - HEADER.len());
            seg[i] ^= x;
        }
        let (entries, damage) = sanare_journal::decode_segment_file(&seg).unwrap();
        prop_assert!(entries.len() <= 3);
        if flips.iter().all(|(_, x)| *x == 0) {
            prop_assert_eq!(entries.len(), 3);
            prop_assert!(damage.is_empty());
        }
    }
}

#[test]
fn a_non_segment_is_corrupt() {
    assert!(matches!(
        sanare_journal::decode_segment_file(b"not a segment"),
        Err(sanare_core::Error::Corrupt { .. })
    ));
}
