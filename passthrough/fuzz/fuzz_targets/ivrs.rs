//! IVRS parser: any bytes, with the checksum repaired so the structure walk
//! is reached. Must not panic; an accepted table's structures lie inside it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use thinhv_passthrough::{acpi, ivrs};

fuzz_target!(|data: &[u8]| {
    let mut t = data.to_vec();
    acpi::set_checksum(&mut t);
    if let Ok(r) = ivrs::parse(&t) {
        for s in &r.skipped {
            assert!(s.offset + s.length <= t.len());
        }
    }
});
