//! What every ACPI table parser here checks first: the standard header
//! (ACPI 6.5 §5.2.6), its signature, its length against the bytes at hand,
//! and its checksum. The table bodies are firmware data: nothing in them is
//! trusted before these checks, and every later offset is bounds-checked.
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, KnownLayout, Unaligned};

/// The standard description header.
#[derive(Clone, Copy, Debug, FromBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct SdtHeader {
    /// Signature.
    pub signature: [u8; 4],
    /// Length of the whole table.
    pub length: U32,
    /// Revision.
    pub revision: u8,
    /// Checksum (the whole table sums to 0).
    pub checksum: u8,
    /// OEM ID.
    pub oem_id: [u8; 6],
    /// OEM table ID.
    pub oem_table_id: [u8; 8],
    /// OEM revision.
    pub oem_revision: U32,
    /// Creator ID.
    pub creator_id: U32,
    /// Creator revision.
    pub creator_revision: U32,
}

/// Size of [`SdtHeader`].
pub const SDT_HEADER_LEN: usize = 36;
const _: () = assert!(core::mem::size_of::<SdtHeader>() == SDT_HEADER_LEN);

/// Why a table is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableError {
    /// Fewer bytes than a header (or the fixed part of the table).
    TooShort,
    /// Not the expected signature.
    BadSignature,
    /// The header's length disagrees with the bytes given.
    BadLength {
        /// Length in the header.
        declared: u32,
        /// Bytes available.
        available: usize,
    },
    /// The bytes do not sum to zero.
    BadChecksum,
    /// A structure inside the table has an impossible length.
    BadStructure {
        /// Offset of the structure in the table.
        offset: usize,
        /// Its type.
        kind: u16,
        /// Its length field.
        length: usize,
    },
    /// A device scope or entry inside a structure is malformed.
    BadEntry {
        /// Offset of the entry in the table.
        offset: usize,
    },
}

impl core::fmt::Display for TableError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::TooShort => write!(f, "table too short"),
            Self::BadSignature => write!(f, "wrong signature"),
            Self::BadLength {
                declared,
                available,
            } => write!(f, "header says {declared} bytes, {available} available"),
            Self::BadChecksum => write!(f, "bad checksum"),
            Self::BadStructure {
                offset,
                kind,
                length,
            } => write!(
                f,
                "structure type {kind:#x} at offset {offset:#x} has impossible length {length}"
            ),
            Self::BadEntry { offset } => write!(f, "malformed entry at offset {offset:#x}"),
        }
    }
}

/// Sum of all bytes, modulo 256.
pub fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

/// Sets the checksum byte (offset 9) so that the table's bytes — as many as
/// its length field declares, at most the slice — sum to zero. Slices too
/// short for a length field are left alone.
pub fn set_checksum(table: &mut [u8]) {
    if table.len() < 10 {
        return;
    }
    let declared = u32::from_le_bytes([table[4], table[5], table[6], table[7]]);
    let len = usize::try_from(declared)
        .unwrap_or(usize::MAX)
        .min(table.len());
    table[9] = 0;
    table[9] = 0u8.wrapping_sub(checksum(&table[..len.max(10)]));
}

/// Checks header, signature, length and checksum; returns the header and
/// the table's bytes (exactly `length` of them; trailing bytes beyond the
/// declared length are ignored).
pub fn checked<'a>(
    bytes: &'a [u8],
    signature: &[u8; 4],
) -> Result<(SdtHeader, &'a [u8]), TableError> {
    let (h, _) = SdtHeader::read_from_prefix(bytes).map_err(|_| TableError::TooShort)?;
    if &h.signature != signature {
        return Err(TableError::BadSignature);
    }
    let declared = h.length.get();
    let len = usize::try_from(declared).unwrap_or(usize::MAX);
    if len < SDT_HEADER_LEN || len > bytes.len() {
        return Err(TableError::BadLength {
            declared,
            available: bytes.len(),
        });
    }
    let table = &bytes[..len];
    if checksum(table) != 0 {
        return Err(TableError::BadChecksum);
    }
    Ok((h, table))
}

/// A copy of a root table (RSDT: `entry_size` 4, XSDT: 8) without the
/// entries `drop` selects (by the table address), with length and checksum
/// fixed. `None` if `root` is not a well-formed root table.
pub fn root_without(
    root: &[u8],
    entry_size: usize,
    drop: impl Fn(u64) -> bool,
) -> Option<alloc::vec::Vec<u8>> {
    root_mapped(root, entry_size, |pa| (!drop(pa)).then_some(pa))
}

/// A copy of a root table with each entry replaced by `map(address)`:
/// `None` drops the entry, `Some(new)` keeps it pointing at `new` (an
/// RSDT entry that `new` does not fit in 32 bits is kept as it was).
/// Length and checksum fixed; `None` if `root` is not a well-formed root
/// table.
pub fn root_mapped(
    root: &[u8],
    entry_size: usize,
    map: impl Fn(u64) -> Option<u64>,
) -> Option<alloc::vec::Vec<u8>> {
    let sig: &[u8; 4] = if entry_size == 8 { b"XSDT" } else { b"RSDT" };
    let (_, t) = checked(root, sig).ok()?;
    let body = &t[SDT_HEADER_LEN..];
    if body.len() % entry_size != 0 || !(entry_size == 4 || entry_size == 8) {
        return None;
    }
    let mut out = t[..SDT_HEADER_LEN].to_vec();
    for e in body.chunks_exact(entry_size) {
        let mut b = [0u8; 8];
        b[..entry_size].copy_from_slice(e);
        let old = u64::from_le_bytes(b);
        match map(old) {
            None => {}
            Some(new) if entry_size == 4 && u32::try_from(new).is_err() => {
                out.extend_from_slice(e);
            }
            Some(new) => out.extend_from_slice(&new.to_le_bytes()[..entry_size]),
        }
    }
    let len = u32::try_from(out.len()).ok()?;
    out[4..8].copy_from_slice(&len.to_le_bytes());
    set_checksum(&mut out);
    Some(out)
}

/// Points an RSDP (ACPI 2.0+, 36 bytes) at new root tables and fixes both
/// checksums.
pub fn patch_rsdp(rsdp: &mut [u8], rsdt: Option<u32>, xsdt: Option<u64>) -> bool {
    if rsdp.len() < 36 || &rsdp[..8] != b"RSD PTR " {
        return false;
    }
    if let Some(r) = rsdt {
        rsdp[16..20].copy_from_slice(&r.to_le_bytes());
    }
    if let Some(x) = xsdt {
        rsdp[24..32].copy_from_slice(&x.to_le_bytes());
    }
    rsdp[8] = 0;
    rsdp[8] = 0u8.wrapping_sub(checksum(&rsdp[..20]));
    rsdp[32] = 0;
    rsdp[32] = 0u8.wrapping_sub(checksum(&rsdp[..36]));
    true
}

/// Little-endian readers that return `None` past the end.
pub(crate) fn u8_at(b: &[u8], off: usize) -> Option<u8> {
    b.get(off).copied()
}

pub(crate) fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    U16::read_from_prefix(b.get(off..)?)
        .ok()
        .map(|(v, _)| v.get())
}

pub(crate) fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    U32::read_from_prefix(b.get(off..)?)
        .ok()
        .map(|(v, _)| v.get())
}

pub(crate) fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    U64::read_from_prefix(b.get(off..)?)
        .ok()
        .map(|(v, _)| v.get())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    use super::set_checksum as fix_checksum;

    #[test]
    fn root_tables_lose_only_the_dropped_entries() {
        let mut x = vec![0u8; SDT_HEADER_LEN];
        x[..4].copy_from_slice(b"XSDT");
        for a in [0x1f77_8000u64, 0x1f77_4000, 0x1f77_3000] {
            x.extend_from_slice(&a.to_le_bytes());
        }
        let n = u32::try_from(x.len()).unwrap();
        x[4..8].copy_from_slice(&n.to_le_bytes());
        fix_checksum(&mut x);
        let y = root_without(&x, 8, |a| a == 0x1f77_4000).unwrap();
        assert_eq!(y.len(), SDT_HEADER_LEN + 16);
        assert_eq!(checksum(&y), 0);
        assert_eq!(u32::from_le_bytes([y[4], y[5], y[6], y[7]]), 52);
        assert_eq!(&y[36..44], &0x1f77_8000u64.to_le_bytes());
        assert_eq!(&y[44..52], &0x1f77_3000u64.to_le_bytes());
        // An RSDT, and refusals.
        let mut r = vec![0u8; SDT_HEADER_LEN];
        r[..4].copy_from_slice(b"RSDT");
        r.extend_from_slice(&0x1f77_4000u32.to_le_bytes());
        r[4..8].copy_from_slice(&40u32.to_le_bytes());
        fix_checksum(&mut r);
        assert_eq!(root_without(&r, 4, |a| a == 0x1f77_4000).unwrap().len(), 36);
        assert!(root_without(&r, 8, |_| false).is_none(), "not an XSDT");
        let mut bad = x.clone();
        bad[40] ^= 1;
        assert!(root_without(&bad, 8, |_| false).is_none());
    }

    #[test]
    fn root_tables_with_one_entry_replaced() {
        let mut xsdt = vec![0u8; SDT_HEADER_LEN];
        xsdt[..4].copy_from_slice(b"XSDT");
        for a in [0x1f77_8000u64, 0x1f77_4000] {
            xsdt.extend_from_slice(&a.to_le_bytes());
        }
        xsdt[4..8].copy_from_slice(&52u32.to_le_bytes());
        fix_checksum(&mut xsdt);
        let new = root_mapped(&xsdt, 8, |a| {
            Some(if a == 0x1f77_4000 { 0x7000 } else { a })
        })
        .unwrap();
        assert_eq!(new.len(), xsdt.len());
        assert_eq!(checksum(&new), 0);
        assert_eq!(&new[44..52], &0x7000u64.to_le_bytes());
        assert_eq!(&new[36..44], &xsdt[36..44]);
        let mut rsdt = vec![0u8; SDT_HEADER_LEN];
        rsdt[..4].copy_from_slice(b"RSDT");
        rsdt.extend_from_slice(&0x1f77_4000u32.to_le_bytes());
        rsdt[4..8].copy_from_slice(&40u32.to_le_bytes());
        fix_checksum(&mut rsdt);
        let same = root_mapped(&rsdt, 4, |_| Some(0x1_0000_0000)).unwrap();
        assert_eq!(&same[36..40], &rsdt[36..40], "an RSDT entry cannot hold it");
    }

    #[test]
    fn rsdp_checksums_after_patching() {
        let mut p = vec![0u8; 36];
        p[..8].copy_from_slice(b"RSD PTR ");
        p[15] = 2;
        assert!(patch_rsdp(&mut p, Some(0x1234_0000), Some(0x5678_0000)));
        assert_eq!(checksum(&p[..20]), 0);
        assert_eq!(checksum(&p), 0);
        assert_eq!(&p[24..32], &0x5678_0000u64.to_le_bytes());
        assert!(!patch_rsdp(&mut [0u8; 36], None, None));
    }

    #[test]
    fn header_checks() {
        let mut t = vec![0u8; 40];
        t[..4].copy_from_slice(b"DMAR");
        t[4..8].copy_from_slice(&40u32.to_le_bytes());
        fix_checksum(&mut t);
        assert!(checked(&t, b"DMAR").is_ok());
        assert_eq!(checked(&t, b"IVRS").unwrap_err(), TableError::BadSignature);
        assert_eq!(
            checked(&t[..20], b"DMAR").unwrap_err(),
            TableError::TooShort
        );
        assert!(matches!(
            checked(&t[..39], b"DMAR"),
            Err(TableError::BadLength {
                declared: 40,
                available: 39
            })
        ));
        let mut bad = t.clone();
        bad[39] = 1;
        assert_eq!(checked(&bad, b"DMAR").unwrap_err(), TableError::BadChecksum);
        let mut short = t.clone();
        short[4..8].copy_from_slice(&8u32.to_le_bytes());
        assert!(matches!(
            checked(&short, b"DMAR"),
            Err(TableError::BadLength { .. })
        ));
    }
}
