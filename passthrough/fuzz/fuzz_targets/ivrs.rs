//! IVRS parser: any bytes, with the checksum repaired so the structure walk
//! is reached. Must not panic; an accepted table's structures lie inside it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use thinhv_passthrough::{acpi, ivrs};

fuzz_target!(|data: &[u8]| {
    let mut t = data.to_vec();
    if t.len() >= 10 {
        t[9] = 0;
        let len = u32::from_le_bytes([t[4], t[5], t[6], t[7]]) as usize;
        let len = len.min(t.len());
        t[9] = 0u8.wrapping_sub(acpi::checksum(&t[..len]));
    }
    if let Ok(r) = ivrs::parse(&t) {
        for s in &r.skipped {
            assert!(s.offset + s.length <= t.len());
        }
    }
});
