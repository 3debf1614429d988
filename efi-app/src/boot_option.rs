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

    /// The variable's bytes (inverse of [`Self::parse`]); `None` if the
    /// description is not UCS-2 or the path list is too long.
    pub fn to_bytes(&self) -> Option<Vec<u8>> {
        let mut b = self.attributes.to_le_bytes().to_vec();
        b.extend_from_slice(&u16::try_from(self.device_path.len()).ok()?.to_le_bytes());
        for u in crate::text::to_ucs2(&self.description).ok()? {
            b.extend_from_slice(&u.to_le_bytes());
        }
        b.extend_from_slice(&self.device_path);
        b.extend_from_slice(&self.optional_data);
        Some(b)
    }

    /// The file path of the first media file-path node, if any.
    pub fn file_path(&self) -> Option<String> {
        device_path_nodes(&self.device_path)
            .find(|n| n.0 == 4 && n.1 == 4)
            .map(|n| {
                let units: Vec<u16> =
                    n.2.chunks_exact(2)
                        .map(|c| u16::from_le_bytes([c[0], c[1]]))
                        .collect();
                crate::text::from_ucs2(&units)
            })
    }

    /// Whether the firmware would boot it.
    pub fn bootable(&self) -> bool {
        self.attributes & LOAD_OPTION_ACTIVE != 0
            && self.attributes & LOAD_OPTION_CATEGORY_MASK == 0
    }
}

/// The nodes of a device path: (type, subtype, data), up to the end node
/// or the first malformed node.
pub fn device_path_nodes(dp: &[u8]) -> impl Iterator<Item = (u8, u8, &[u8])> {
    let mut rest = dp;
    core::iter::from_fn(move || {
        let (&t, &s) = (rest.first()?, rest.get(1)?);
        let len = usize::from(u16::from_le_bytes([*rest.get(2)?, *rest.get(3)?]));
        if t == 0x7f || len < 4 || len > rest.len() {
            return None;
        }
        let node = (t, s, &rest[4..len]);
        rest = &rest[len..];
        Some(node)
    })
}

/// How a partition is identified in a hard-drive device-path node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartitionId {
    /// GPT: the partition's unique GUID, in on-disk byte order.
    Gpt([u8; 16]),
    /// MBR: the disk signature.
    Mbr(u32),
}

/// A partition on a disk, in 512-byte-sector LBAs as the firmware sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Partition {
    /// 1-based partition number.
    pub number: u32,
    /// First LBA.
    pub start: u64,
    /// Size in LBAs.
    pub size: u64,
    /// Identity.
    pub id: PartitionId,
}

/// `HD(number, GPT|MBR, signature, start, size)/\path` + end node (UEFI
/// 2.10 §10.3.5.1 "Hard Drive Media Device Path", §10.3.5.4 "File Path").
pub fn hd_file_path(p: &Partition, path: &str) -> Option<Vec<u8>> {
    let mut dp = Vec::new();
    dp.extend_from_slice(&[4, 1, 42, 0]);
    dp.extend_from_slice(&p.number.to_le_bytes());
    dp.extend_from_slice(&p.start.to_le_bytes());
    dp.extend_from_slice(&p.size.to_le_bytes());
    let (sig, format, kind) = match p.id {
        PartitionId::Gpt(g) => (g, 2u8, 2u8),
        PartitionId::Mbr(s) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&s.to_le_bytes());
            (b, 1, 1)
        }
    };
    dp.extend_from_slice(&sig);
    dp.push(format);
    dp.push(kind);
    let units = crate::text::to_ucs2(path).ok()?;
    let len = u16::try_from(4 + units.len() * 2).ok()?;
    dp.extend_from_slice(&[4, 4]);
    dp.extend_from_slice(&len.to_le_bytes());
    for u in units {
        dp.extend_from_slice(&u.to_le_bytes());
    }
    dp.extend_from_slice(&[0x7f, 0xff, 4, 0]);
    Some(dp)
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

    #[test]
    fn hd_file_path_round_trips_through_a_load_option() {
        let part = Partition {
            number: 1,
            start: 2048,
            size: 1_048_576,
            id: PartitionId::Gpt([0xaa; 16]),
        };
        let dp = hd_file_path(&part, "\\EFI\\thinhv\\thinhv.efi").unwrap();
        // HD node (42 bytes) + file node (4 + 2 * (22 characters + NUL)) + end.
        assert_eq!(dp.len(), 42 + 4 + 2 * 23 + 4);
        assert_eq!(&dp[..4], &[4, 1, 42, 0]);
        assert_eq!(dp[40..42], [2, 2], "GPT, GUID signature");
        let o = LoadOption {
            attributes: LOAD_OPTION_ACTIVE,
            description: "thinhv".into(),
            device_path: dp,
            optional_data: Vec::new(),
        };
        let bytes = o.to_bytes().unwrap();
        let back = LoadOption::parse(&bytes).unwrap();
        assert_eq!(back, o);
        assert_eq!(
            back.file_path().as_deref(),
            Some("\\EFI\\thinhv\\thinhv.efi")
        );
        let nodes: Vec<_> = device_path_nodes(&back.device_path)
            .map(|n| (n.0, n.1))
            .collect();
        assert_eq!(nodes, [(4, 1), (4, 4)]);
        let mbr = Partition {
            id: PartitionId::Mbr(0x1234_5678),
            ..part
        };
        let dp = hd_file_path(&mbr, "\\a.efi").unwrap();
        assert_eq!(dp[24..28], 0x1234_5678u32.to_le_bytes());
        assert_eq!(dp[40..42], [1, 1]);
        // Truncated or zero-length nodes end the walk instead of looping.
        assert_eq!(device_path_nodes(&[4, 4, 0, 0, 1, 2]).count(), 0);
        assert_eq!(device_path_nodes(&[4, 4, 9, 0]).count(), 0);
    }
}
