//! `Boot####` load options and `BootOrder` (UEFI 2.10 §3.1.3 "Load
//! Options"): which entry to start when `[boot] next` is not set.
use alloc::string::String;
use alloc::vec::Vec;

/// `LOAD_OPTION_ACTIVE`.
pub const LOAD_OPTION_ACTIVE: u32 = 0x1;
/// `LOAD_OPTION_HIDDEN`.
pub const LOAD_OPTION_HIDDEN: u32 = 0x8;
/// `LOAD_OPTION_CATEGORY_APP` (bits 8..12 = 1): not a boot entry.
pub const LOAD_OPTION_CATEGORY_MASK: u32 = 0x1f00;

/// A parsed `EFI_LOAD_OPTION`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadOption {
    /// Attributes.
    pub attributes: u32,
    /// Description.
    pub description: String,
    /// The device path list (raw bytes).
    pub device_path: Vec<u8>,
    /// Optional data (passed to the image as load options).
    pub optional_data: Vec<u8>,
}

impl LoadOption {
    /// Parses the variable's bytes.
    pub fn parse(b: &[u8]) -> Option<Self> {
        let attributes = u32::from_le_bytes(b.get(0..4)?.try_into().ok()?);
        let fpl = usize::from(u16::from_le_bytes(b.get(4..6)?.try_into().ok()?));
        let mut i = 6;
        let mut desc = Vec::new();
        loop {
            let u = u16::from_le_bytes(b.get(i..i + 2)?.try_into().ok()?);
            i += 2;
            if u == 0 {
                break;
            }
            desc.push(u);
        }
        let device_path = b.get(i..i + fpl)?.to_vec();
        let optional_data = b.get(i + fpl..)?.to_vec();
        Some(Self {
            attributes,
            description: crate::text::from_ucs2(&desc),
            device_path,
            optional_data,
        })
    }

    /// Whether the firmware would boot it.
    pub fn bootable(&self) -> bool {
        self.attributes & LOAD_OPTION_ACTIVE != 0
            && self.attributes & LOAD_OPTION_CATEGORY_MASK == 0
    }
}

/// Parses `BootOrder` (an array of u16).
pub fn parse_order(b: &[u8]) -> Vec<u16> {
    b.chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect()
}

/// The entries to try after `current`, in order: those following it in
/// `order` (never `current` itself). When `current` is not in the order
/// (started from a one-time boot or removable media), all others in order.
pub fn after_current(order: &[u16], current: Option<u16>) -> Vec<u16> {
    match current.and_then(|c| order.iter().position(|&o| o == c)) {
        Some(pos) => order[pos + 1..]
            .iter()
            .copied()
            .filter(|&o| Some(o) != current)
            .collect(),
        None => order
            .iter()
            .copied()
            .filter(|&o| Some(o) != current)
            .collect(),
    }
}

/// `Boot####` variable name for an entry.
pub fn variable_name(n: u16) -> String {
    alloc::format!("Boot{n:04X}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn option(attr: u32, desc: &str, path: &[u8], data: &[u8]) -> Vec<u8> {
        let mut b = attr.to_le_bytes().to_vec();
        b.extend_from_slice(&u16::try_from(path.len()).unwrap().to_le_bytes());
        for u in crate::text::to_ucs2(desc).unwrap() {
            b.extend_from_slice(&u.to_le_bytes());
        }
        b.extend_from_slice(path);
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn parses_a_load_option() {
        let path = [
            0x04, 0x04, 0x08, 0x00, 0x41, 0x00, 0x00, 0x00, 0x7f, 0xff, 0x04, 0x00,
        ];
        let b = option(1, "UEFI Shell", &path, b"opt");
        let o = LoadOption::parse(&b).unwrap();
        assert_eq!(o.description, "UEFI Shell");
        assert_eq!(o.device_path, path);
        assert_eq!(o.optional_data, b"opt");
        assert!(o.bootable());
        assert!(
            !LoadOption::parse(&option(0, "x", &path, b""))
                .unwrap()
                .bootable()
        );
        assert!(
            !LoadOption::parse(&option(0x101, "app", &path, b""))
                .unwrap()
                .bootable()
        );
        assert!(LoadOption::parse(&b[..9]).is_none());
        assert!(LoadOption::parse(&b[..b.len() - 6]).is_none());
    }

    #[test]
    fn next_entries_after_our_own() {
        assert_eq!(after_current(&[3, 1, 0, 2], Some(1)), vec![0, 2]);
        assert_eq!(after_current(&[3, 1, 0, 2], Some(2)), Vec::<u16>::new());
        assert_eq!(after_current(&[3, 1, 0], Some(9)), vec![3, 1, 0]);
        assert_eq!(after_current(&[3, 1, 0], None), vec![3, 1, 0]);
        assert_eq!(parse_order(&[1, 0, 2, 0, 0x10, 0]), vec![1, 2, 0x10]);
        assert_eq!(variable_name(0x1a), "Boot001A");
    }
}
