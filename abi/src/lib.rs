//! Interfaces shared between thinhv's loader (`efi-app`), its core
//! (`thin-hv`) and the guest-side tools.
//!
//! Everything here is plain data: `#[repr(C)]` structures whose layout is
//! checked at compile time, and constants. Nothing here touches hardware.
//!
//! * [`hypercall`] — the `VMMCALL`/`VMCALL` interface (CPL 0 only).
//! * [`cpuid`] — the hypervisor CPUID leaves (`0x4000_0000..`), the
//!   unprivileged channel a root process in the guest can use.
//! * [`status`] — the read-only status page (counters and log ring) the core
//!   publishes to the guest.
//! * [`handoff`] — what the loader hands the core.
//! * [`exit`] — exit reasons counted by the core, shared by both vendors.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

pub mod cpuid;
pub mod exit;
pub mod handoff;
pub mod hypercall;
pub mod layout;
pub mod status;

/// thinhv's version, packed as `major << 16 | minor << 8 | patch`.
pub const VERSION: u32 = pack_version(0, 1, 0);

/// Version of the interfaces in this crate. Bumped on any incompatible change
/// of a structure layout or a hypercall's meaning.
pub const ABI_VERSION: u32 = 13;

/// Packs a version triple the way [`VERSION`] is packed.
pub const fn pack_version(major: u8, minor: u8, patch: u8) -> u32 {
    ((major as u32) << 16) | ((minor as u32) << 8) | patch as u32
}

/// Unpacks a version packed by [`pack_version`].
pub const fn unpack_version(v: u32) -> (u8, u8, u8) {
    (
        ((v >> 16) & 0xff) as u8,
        ((v >> 8) & 0xff) as u8,
        (v & 0xff) as u8,
    )
}

/// A half-open physical address range `[base, base + size)`.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    zerocopy::FromBytes,
    zerocopy::IntoBytes,
    zerocopy::Immutable,
    zerocopy::KnownLayout,
)]
#[repr(C)]
pub struct PhysRange {
    /// First byte.
    pub base: u64,
    /// Length in bytes.
    pub size: u64,
}

const _: () = assert!(core::mem::size_of::<PhysRange>() == 16);

impl PhysRange {
    /// Creates a range.
    pub const fn new(base: u64, size: u64) -> Self {
        Self { base, size }
    }

    /// One past the last byte, saturating at `u64::MAX`.
    pub const fn end(&self) -> u64 {
        self.base.saturating_add(self.size)
    }

    /// Whether the range is empty.
    pub const fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// Whether `addr` lies inside.
    pub const fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr < self.end()
    }

    /// Whether `[base, base + len)` overlaps this range. An empty query
    /// overlaps nothing; a query whose end overflows overlaps everything
    /// above `base`.
    pub const fn overlaps(&self, base: u64, len: u64) -> bool {
        if len == 0 || self.size == 0 {
            return false;
        }
        let end = base.saturating_add(len);
        base < self.end() && self.base < end
    }

    /// Whether `[base, base + len)` lies wholly inside this range (and does
    /// not overflow).
    pub const fn encloses(&self, base: u64, len: u64) -> bool {
        match base.checked_add(len) {
            Some(end) => base >= self.base && end <= self.end(),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_round_trip() {
        assert_eq!(unpack_version(pack_version(1, 2, 3)), (1, 2, 3));
        assert_eq!(unpack_version(VERSION), (0, 1, 0));
    }

    #[test]
    fn range_overlap_rules() {
        let r = PhysRange::new(0x1000, 0x2000);
        assert!(r.overlaps(0x0, 0x1001));
        assert!(!r.overlaps(0x0, 0x1000));
        assert!(r.overlaps(0x2fff, 1));
        assert!(!r.overlaps(0x3000, 1));
        assert!(!r.overlaps(0x1800, 0));
        assert!(r.overlaps(0x0, u64::MAX));
        assert!(!r.overlaps(u64::MAX - 1, 2));
        assert!(r.encloses(0x1000, 0x2000));
        assert!(!r.encloses(0x1000, 0x2001));
        assert!(!r.encloses(0x2000, u64::MAX));
    }
}
