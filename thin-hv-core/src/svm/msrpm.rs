//! The MSR permission map (AMD APM Vol. 2 §15.11, Table 15-5 "MSRPM Byte
//! Areas"): 8 KiB, two bits per MSR (read intercept, then write intercept)
//! for three ranges of 8K MSRs. MSRs outside the ranges always exit.

/// Size of the map.
pub const MSRPM_SIZE: usize = 8192;

/// The three covered ranges and their byte offsets in the map.
const RANGES: [(u32, usize); 3] = [
    (0x0000_0000, 0x000),
    (0xc000_0000, 0x800),
    (0xc001_0000, 0x1000),
];
const RANGE_LEN: u32 = 0x2000;

/// Byte index and bit of the read intercept of `msr`, if the map covers it.
fn position(msr: u32) -> Option<(usize, u8)> {
    RANGES.iter().find_map(|&(base, off)| {
        let rel = msr.checked_sub(base).filter(|&r| r < RANGE_LEN)?;
        let bit = rel as usize * 2;
        Some((off + bit / 8, u8::try_from(bit % 8).unwrap_or(0)))
    })
}

/// Sets the read and/or write intercept for `msr`. Returns false when the
/// map does not cover it (it then always exits).
pub fn intercept(map: &mut [u8; MSRPM_SIZE], msr: u32, read: bool, write: bool) -> bool {
    let Some((byte, bit)) = position(msr) else {
        return false;
    };
    if read {
        map[byte] |= 1 << bit;
    }
    if write {
        map[byte] |= 1 << (bit + 1);
    }
    true
}

/// Whether an access to `msr` exits.
pub fn intercepted(map: &[u8; MSRPM_SIZE], msr: u32, write: bool) -> bool {
    match position(msr) {
        Some((byte, bit)) => map[byte] & (1 << (bit + u8::from(write))) != 0,
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_follow_the_apm_table() {
        // EFER (C000_0080): range 2, MSR index 0x80 → bits 0x100/0x101 →
        // byte 0x800 + 0x20.
        let mut m = [0u8; MSRPM_SIZE];
        assert!(intercept(&mut m, 0xc000_0080, true, true));
        assert_eq!(m[0x820], 0b11);
        // VM_HSAVE_PA (C001_0117): byte 0x1000 + 0x117*2/8 = 0x1045, bit 6.
        assert!(intercept(&mut m, 0xc001_0117, false, true));
        assert_eq!(m[0x1045], 1 << 7);
        // x2APIC ICR (0x830): byte 0x20c, bits 0/1.
        assert!(intercept(&mut m, 0x830, false, true));
        assert_eq!(m[0x20c], 0b10);
        assert!(intercepted(&m, 0x830, true));
        assert!(!intercepted(&m, 0x830, false));
        assert!(!intercepted(&m, 0x10, false));
        // Outside the map: always intercepted, cannot be cleared.
        assert!(!intercept(&mut m, 0x4000_0000, true, true));
        assert!(intercepted(&m, 0x4000_0000, false));
        assert_eq!(m.iter().map(|b| b.count_ones()).sum::<u32>(), 4);
    }
}
