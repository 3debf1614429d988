//! DMAR parser: any bytes, with the checksum repaired so the structure walk
//! is reached. Must not panic; an accepted table's structures lie inside it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use thinhv_passthrough::{acpi, dmar};

fuzz_target!(|data: &[u8]| {
    let mut t = data.to_vec();
    acpi::set_checksum(&mut t);
    if let Ok(d) = dmar::parse(&t) {
        for s in &d.skipped {
            assert!(s.offset + s.length <= t.len());
        }
    }
});
