//! PCI capability walkers over an arbitrary 4 KiB configuration space: they
//! must end, within their limits, whatever the pointers say.
#![no_main]
use libfuzzer_sys::fuzz_target;
use thinhv_passthrough::pci::{Bdf, ConfigSpace, extended_caps, legacy_caps, probe};

struct Bytes<'a>(&'a [u8]);

impl ConfigSpace for Bytes<'_> {
    fn read32(&self, _bdf: Bdf, offset: u16) -> u32 {
        let o = usize::from(offset);
        self.0
            .get(o..o + 4)
            .map_or(u32::MAX, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

fuzz_target!(|data: &[u8]| {
    let c = Bytes(data);
    let bdf = Bdf::new(0, 0, 0, 0);
    assert!(legacy_caps(&c, bdf).len() <= 48);
    assert!(extended_caps(&c, bdf).len() <= (4096 - 256) / 4);
    let _ = probe(&c, bdf);
});
