//! Fuzzes the journal's segment/record decoder: `cargo +nightly fuzz run decode`
//! from `crates/journal`. It must never panic, whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sanare_journal::decode_segment_file(data);
    // Also as a segment body behind a valid header.
    let mut seg = b"SANAREJW\x01\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00".to_vec();
    seg.extend_from_slice(data);
    let _ = sanare_journal::decode_segment_file(&seg);
});
