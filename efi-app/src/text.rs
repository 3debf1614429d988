//! UCS-2 load options, as the Linux EFI stub and the UEFI shell read them.
use alloc::vec::Vec;

/// Encodes `s` as NUL-terminated UCS-2. Characters outside the Basic
/// Multilingual Plane cannot be represented and are refused.
pub fn to_ucs2(s: &str) -> Result<Vec<u16>, char> {
    let mut out = Vec::with_capacity(s.len() + 1);
    for c in s.chars() {
        match u16::try_from(u32::from(c)) {
            Ok(u) if u != 0 => out.push(u),
            _ => return Err(c),
        }
    }
    out.push(0);
    Ok(out)
}

/// Decodes UCS-2 (stopping at NUL), replacing what is not valid.
pub fn from_ucs2(units: &[u16]) -> alloc::string::String {
    units
        .iter()
        .take_while(|&&u| u != 0)
        .map(|&u| char::from_u32(u32::from(u)).unwrap_or('\u{fffd}'))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let v = to_ucs2("console=ttyS0 initrd=\\initrd.img").unwrap();
        assert_eq!(*v.last().unwrap(), 0);
        assert_eq!(from_ucs2(&v), "console=ttyS0 initrd=\\initrd.img");
        assert_eq!(to_ucs2("é"), Ok(vec![0xe9, 0]));
        assert_eq!(to_ucs2("🙂"), Err('🙂'));
        assert_eq!(to_ucs2("a\0b"), Err('\0'));
    }
}
