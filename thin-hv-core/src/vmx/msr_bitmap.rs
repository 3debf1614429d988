//! The VMX MSR bitmap (SDM Vol. 3C §25.6.9): 4 KiB in four 1 KiB parts —
//! reads of MSRs 0–1FFFh, reads of C000_0000h–C000_1FFFh, then the same
//! two for writes. One bit per MSR; other MSRs always exit.

/// Size of the bitmap.
pub const SIZE: usize = 4096;

fn position(msr: u32, write: bool) -> Option<(usize, u8)> {
    let (half, index) = match msr {
        0..=0x1fff => (0, msr),
        0xc000_0000..=0xc000_1fff => (1, msr - 0xc000_0000),
        _ => return None,
    };
    let base = if write { 0x800 } else { 0 } + half * 0x400;
    Some((base + index as usize / 8, (index % 8) as u8))
}

/// Sets the read and/or write exit for `msr`; false if the bitmap does
/// not cover it (it always exits).
pub fn intercept(map: &mut [u8; SIZE], msr: u32, read: bool, write: bool) -> bool {
    for (want, w) in [(read, false), (write, true)] {
        if want {
            match position(msr, w) {
                Some((byte, bit)) => map[byte] |= 1 << bit,
                None => return false,
            }
        }
    }
    true
}

/// Whether an access exits.
pub fn intercepted(map: &[u8; SIZE], msr: u32, write: bool) -> bool {
    position(msr, write).is_none_or(|(byte, bit)| map[byte] & (1 << bit) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_follows_the_sdm() {
        let mut m = [0u8; SIZE];
        assert!(intercept(&mut m, 0x3a, true, true));
        assert_eq!(m[0x3a / 8], 1 << (0x3a % 8));
        assert_eq!(m[0x800 + 0x3a / 8], 1 << (0x3a % 8));
        assert!(intercept(&mut m, 0xc000_0080, true, false));
        assert_eq!(m[0x400 + 0x80 / 8], 1);
        assert!(intercepted(&m, 0xc000_0080, false));
        assert!(!intercepted(&m, 0xc000_0080, true));
        assert!(!intercepted(&m, 0x10, false));
        assert!(
            !intercept(&mut m, 0xc001_0000, true, true),
            "outside the bitmap"
        );
        assert!(intercepted(&m, 0xc001_0000, false));
    }
}
