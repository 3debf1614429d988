//! The embedded core: a 32-byte header (magic, length, CRC-32) followed by
//! the core's ELF. The header is written at build time (`build.rs`); the
//! loader recomputes the CRC before it uses a byte, so a corrupted image is
//! refused rather than run.

/// Magic at the start of the blob.
pub const MAGIC: &[u8; 16] = b"THINHV-CORE-BLOB";
/// Header size.
pub const HEADER_LEN: usize = 32;

/// Why the embedded core cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobError {
    /// The header is missing or damaged.
    BadHeader,
    /// This loader was built without a core (`cargo build` instead of
    /// `cargo xtask build`).
    Empty,
    /// The length in the header does not match.
    Truncated,
    /// The CRC does not match: the image is corrupted.
    CrcMismatch {
        /// CRC recorded at build time.
        expected: u32,
        /// CRC of what is there now.
        actual: u32,
    },
}

impl core::fmt::Display for BlobError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::BadHeader => write!(f, "the embedded core's header is damaged"),
            Self::Empty => write!(
                f,
                "no core embedded (build thinhv.efi with `cargo xtask build`)"
            ),
            Self::Truncated => write!(f, "the embedded core is truncated"),
            Self::CrcMismatch { expected, actual } => write!(
                f,
                "the embedded core is corrupted (CRC-32 {actual:#010x}, expected {expected:#010x}); \
                 reinstall thinhv.efi"
            ),
        }
    }
}

/// Checks the blob and returns the ELF bytes.
pub fn verify(blob: &[u8]) -> Result<&[u8], BlobError> {
    if blob.len() < HEADER_LEN || &blob[..16] != MAGIC {
        return Err(BlobError::BadHeader);
    }
    let len = u64::from_le_bytes(blob[16..24].try_into().map_err(|_| BlobError::BadHeader)?);
    let expected = u32::from_le_bytes(blob[24..28].try_into().map_err(|_| BlobError::BadHeader)?);
    let body = &blob[HEADER_LEN..];
    if len == 0 {
        return Err(BlobError::Empty);
    }
    if body.len() as u64 != len {
        return Err(BlobError::Truncated);
    }
    let actual = crc32fast::hash(body);
    if actual != expected {
        return Err(BlobError::CrcMismatch { expected, actual });
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make(body: &[u8]) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&(body.len() as u64).to_le_bytes());
        b.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(body);
        b
    }

    #[test]
    fn good_blob_passes() {
        let b = make(b"\x7fELF payload");
        assert_eq!(verify(&b).unwrap(), b"\x7fELF payload");
    }

    #[test]
    fn every_corruption_is_caught() {
        let good = make(b"\x7fELF payload bytes");
        for i in HEADER_LEN..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x40;
            assert!(
                matches!(verify(&b), Err(BlobError::CrcMismatch { .. })),
                "byte {i}"
            );
        }
        let mut b = good.clone();
        b[3] = b'x';
        assert_eq!(verify(&b), Err(BlobError::BadHeader));
        assert_eq!(verify(&good[..good.len() - 1]), Err(BlobError::Truncated));
        assert_eq!(verify(&make(b"")), Err(BlobError::Empty));
        assert_eq!(verify(b"short"), Err(BlobError::BadHeader));
    }
}
