//! SR-IOV: the capability model and VF numbering (PCIe Base Specification,
//! "Single Root I/O Virtualization and Sharing", SR-IOV Extended
//! Capability, ID 0x0010).
//!
//! Pure: the caller reads the capability's bytes (through ECAM) and this
//! crate interprets them. VF BAR sizing and the bridge-window check are in
//! `thinhv_passthrough::bars`, the mediation of the capability for VF
//! budgets in `thinhv_passthrough::mediate`.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

/// Extended capability ID of SR-IOV.
pub const EXT_CAP_ID_SRIOV: u16 = 0x0010;

/// Size of the SR-IOV capability structure in bytes.
pub const CAP_SIZE: usize = 0x40;

/// Register offsets inside the capability.
pub mod reg {
    /// SR-IOV Capabilities (32-bit).
    pub const CAPABILITIES: usize = 0x04;
    /// SR-IOV Control (16-bit): bit 0 VF Enable, bit 3 VF MSE, bit 4 ARI.
    pub const CONTROL: usize = 0x08;
    /// InitialVFs (16-bit).
    pub const INITIAL_VFS: usize = 0x0c;
    /// TotalVFs (16-bit).
    pub const TOTAL_VFS: usize = 0x0e;
    /// NumVFs (16-bit).
    pub const NUM_VFS: usize = 0x10;
    /// First VF Offset (16-bit).
    pub const FIRST_VF_OFFSET: usize = 0x14;
    /// VF Stride (16-bit).
    pub const VF_STRIDE: usize = 0x16;
    /// VF Device ID (16-bit).
    pub const VF_DEVICE_ID: usize = 0x1a;
    /// Supported Page Sizes (32-bit).
    pub const SUPPORTED_PAGE_SIZES: usize = 0x1c;
    /// System Page Size (32-bit).
    pub const SYSTEM_PAGE_SIZE: usize = 0x20;
    /// VF BAR0..BAR5 (32-bit each).
    pub const VF_BAR0: usize = 0x24;
}

/// SR-IOV Control: VF Enable.
pub const CONTROL_VF_ENABLE: u16 = 1 << 0;

/// The SR-IOV capability of a physical function.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SriovCap {
    /// Offset of the capability in the PF's configuration space.
    pub offset: u16,
    /// SR-IOV Control.
    pub control: u16,
    /// InitialVFs.
    pub initial_vfs: u16,
    /// TotalVFs.
    pub total_vfs: u16,
    /// NumVFs.
    pub num_vfs: u16,
    /// First VF Offset (routing-ID distance from the PF to VF 1).
    pub first_vf_offset: u16,
    /// VF Stride.
    pub vf_stride: u16,
    /// Device ID of the VFs (the vendor is the PF's).
    pub vf_device_id: u16,
    /// Supported Page Sizes.
    pub supported_page_sizes: u32,
    /// System Page Size.
    pub system_page_size: u32,
    /// VF BAR registers as read (not sized).
    pub vf_bars: [u32; 6],
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// Why a capability was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CapError {
    /// Fewer than [`CAP_SIZE`] bytes.
    Truncated,
    /// The header is not SR-IOV's.
    NotSriov,
}

impl SriovCap {
    /// Interprets the capability's bytes (`bytes[0]` is the extended
    /// capability header at `offset`).
    pub fn parse(offset: u16, bytes: &[u8]) -> Result<Self, CapError> {
        if bytes.len() < CAP_SIZE {
            return Err(CapError::Truncated);
        }
        if u16_at(bytes, 0) != EXT_CAP_ID_SRIOV {
            return Err(CapError::NotSriov);
        }
        Ok(Self {
            offset,
            control: u16_at(bytes, reg::CONTROL),
            initial_vfs: u16_at(bytes, reg::INITIAL_VFS),
            total_vfs: u16_at(bytes, reg::TOTAL_VFS),
            num_vfs: u16_at(bytes, reg::NUM_VFS),
            first_vf_offset: u16_at(bytes, reg::FIRST_VF_OFFSET),
            vf_stride: u16_at(bytes, reg::VF_STRIDE),
            vf_device_id: u16_at(bytes, reg::VF_DEVICE_ID),
            supported_page_sizes: u32_at(bytes, reg::SUPPORTED_PAGE_SIZES),
            system_page_size: u32_at(bytes, reg::SYSTEM_PAGE_SIZE),
            vf_bars: core::array::from_fn(|i| u32_at(bytes, reg::VF_BAR0 + 4 * i)),
        })
    }

    /// Whether VF Enable is set.
    pub fn vfs_enabled(&self) -> bool {
        self.control & CONTROL_VF_ENABLE != 0
    }

    /// Routing ID (bus << 8 | devfn) of VF `n` (1-based) of the PF at
    /// `pf_rid`, with the current First VF Offset and VF Stride; `None` if
    /// it falls outside the 16-bit routing-ID space or `n` is 0.
    ///
    /// Offset and stride may change with NumVFs and ARI, so a caller that
    /// needs every *potential* VF must evaluate this for each NumVFs value.
    pub fn vf_rid(&self, pf_rid: u16, n: u16) -> Option<u16> {
        if n == 0 {
            return None;
        }
        let rid = u32::from(pf_rid)
            + u32::from(self.first_vf_offset)
            + u32::from(n - 1) * u32::from(self.vf_stride);
        u16::try_from(rid).ok()
    }
}

impl SriovCap {
    /// Every routing ID a VF of the PF at `pf_rid` can have with the
    /// current First VF Offset and VF Stride, for VFs 1..=TotalVFs, as an
    /// inclusive range (the IDs in it that are not VFs are other functions
    /// of the same device or unused). `None` without VFs or when the range
    /// leaves the 16-bit routing-ID space.
    pub fn potential_vf_rids(&self, pf_rid: u16) -> Option<(u16, u16)> {
        if self.total_vfs == 0 {
            return None;
        }
        Some((
            self.vf_rid(pf_rid, 1)?,
            self.vf_rid(pf_rid, self.total_vfs)?,
        ))
    }
}

/// Bytes the VF BARs need for `vfs` VFs, given each VF BAR's size per VF:
/// each VF BAR is an array of `vfs` equal, contiguous slots.
pub fn vf_bar_space(per_vf_sizes: impl IntoIterator<Item = u64>, vfs: u16) -> u64 {
    per_vf_sizes
        .into_iter()
        .map(|s| s.saturating_mul(u64::from(vfs)))
        .fold(0, u64::saturating_add)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An SR-IOV capability as an 82576-class NIC presents it: 8 VFs,
    /// First VF Offset 0x80, stride 2, VF device 0x10ca.
    fn igb_like() -> [u8; CAP_SIZE] {
        let mut b = [0u8; CAP_SIZE];
        b[0..4].copy_from_slice(&(0x0001_0010u32 | (0x1d0 << 20)).to_le_bytes());
        b[reg::INITIAL_VFS..reg::INITIAL_VFS + 2].copy_from_slice(&8u16.to_le_bytes());
        b[reg::TOTAL_VFS..reg::TOTAL_VFS + 2].copy_from_slice(&8u16.to_le_bytes());
        b[reg::FIRST_VF_OFFSET..reg::FIRST_VF_OFFSET + 2].copy_from_slice(&0x80u16.to_le_bytes());
        b[reg::VF_STRIDE..reg::VF_STRIDE + 2].copy_from_slice(&2u16.to_le_bytes());
        b[reg::VF_DEVICE_ID..reg::VF_DEVICE_ID + 2].copy_from_slice(&0x10cau16.to_le_bytes());
        b[reg::SUPPORTED_PAGE_SIZES..reg::SUPPORTED_PAGE_SIZES + 4]
            .copy_from_slice(&0x553u32.to_le_bytes());
        b[reg::SYSTEM_PAGE_SIZE..reg::SYSTEM_PAGE_SIZE + 4].copy_from_slice(&1u32.to_le_bytes());
        b
    }

    #[test]
    fn parses_the_fields() {
        let c = SriovCap::parse(0x160, &igb_like()).unwrap();
        assert_eq!(
            (
                c.total_vfs,
                c.initial_vfs,
                c.num_vfs,
                c.first_vf_offset,
                c.vf_stride
            ),
            (8, 8, 0, 0x80, 2)
        );
        assert_eq!(c.vf_device_id, 0x10ca);
        assert_eq!(c.supported_page_sizes, 0x553);
        assert!(!c.vfs_enabled());
    }

    #[test]
    fn vf_routing_ids() {
        let c = SriovCap::parse(0x160, &igb_like()).unwrap();
        // PF 02:00.0 → VFs at 02:10.0, 02:10.2, ...
        let pf = 0x0200;
        assert_eq!(c.vf_rid(pf, 1), Some(0x0280));
        assert_eq!(c.vf_rid(pf, 2), Some(0x0282));
        assert_eq!(c.vf_rid(pf, 8), Some(0x028e));
        assert_eq!(c.vf_rid(pf, 0), None);
        // Near the top of the routing-ID space.
        assert_eq!(c.vf_rid(0xff80, 1), None);
    }

    #[test]
    fn rejects_short_or_foreign_capabilities() {
        assert_eq!(SriovCap::parse(0x100, &[0; 8]), Err(CapError::Truncated));
        let mut b = igb_like();
        b[0] = 0x0e;
        assert_eq!(SriovCap::parse(0x100, &b), Err(CapError::NotSriov));
    }

    #[test]
    fn potential_vf_rids_and_bar_space() {
        let c = SriovCap::parse(0x160, &igb_like()).unwrap();
        // PF 01:00.0: VFs at 01:10.0, 01:10.2, ... 01:11.6.
        assert_eq!(c.potential_vf_rids(0x100), Some((0x180, 0x18e)));
        let none = SriovCap { total_vfs: 0, ..c };
        assert_eq!(none.potential_vf_rids(0x100), None);
        // Beyond the routing-ID space.
        assert_eq!(c.potential_vf_rids(0xff80), None);
        assert_eq!(vf_bar_space([16 << 10, 16 << 10], 8), 256 << 10);
        assert_eq!(vf_bar_space([16 << 10], 0), 0);
        assert_eq!(vf_bar_space([u64::MAX], 2), u64::MAX);
    }

    /// SR-IOV capabilities as QEMU 10.0.2's devices present them, dumped
    /// from Linux's sysfs `config` after enumeration (`od -An -tx1`):
    /// igb (8086:10c9) at 0x160 and NVMe (1b36:0010, `sriov_max_vfs=2`) at
    /// 0x120.
    const QEMU_IGB: &str = "10 00 01 00 00 00 00 00 10 00 00 00 08 00 08 00
        00 00 00 00 80 00 02 00 00 00 ca 10 53 05 00 00
        01 00 00 00 0c 00 20 fe 00 00 00 00 00 00 00 00
        0c 00 22 fe 00 00 00 00 00 00 00 00 00 00 00 00";
    const QEMU_NVME: &str = "10 00 01 00 00 00 00 00 10 00 00 00 02 00 02 00
        00 00 00 00 01 00 01 00 00 00 10 00 53 05 00 00
        01 00 00 00 04 40 60 fe 00 00 00 00 00 00 00 00
        00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00";

    fn bytes(hex: &str) -> Vec<u8> {
        hex.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect()
    }

    #[test]
    fn real_capabilities_from_qemu() {
        let igb = SriovCap::parse(0x160, &bytes(QEMU_IGB)).unwrap();
        assert_eq!((igb.initial_vfs, igb.total_vfs, igb.num_vfs), (8, 8, 0));
        assert_eq!((igb.first_vf_offset, igb.vf_stride), (0x80, 2));
        assert_eq!(igb.vf_device_id, 0x10ca);
        assert_eq!(igb.supported_page_sizes, 0x553);
        assert_eq!(igb.system_page_size, 1);
        assert_eq!(igb.control, 0x10, "ARI Capable Hierarchy, VFs off");
        assert!(!igb.vfs_enabled());
        // VF BAR0 and VF BAR3: 64-bit, prefetchable.
        assert_eq!(igb.vf_bars[0], 0xfe20_000c);
        assert_eq!(igb.vf_bars[3], 0xfe22_000c);
        assert_eq!(igb.potential_vf_rids(0x100), Some((0x180, 0x18e)));
        let nvme = SriovCap::parse(0x120, &bytes(QEMU_NVME)).unwrap();
        assert_eq!((nvme.initial_vfs, nvme.total_vfs), (2, 2));
        assert_eq!((nvme.first_vf_offset, nvme.vf_stride), (1, 1));
        assert_eq!(nvme.vf_device_id, 0x0010);
        assert_eq!(nvme.vf_bars[0], 0xfe60_4004, "64-bit, not prefetchable");
        // PF 02:00.0: VFs 02:00.1 and 02:00.2.
        assert_eq!(nvme.potential_vf_rids(0x200), Some((0x201, 0x202)));
        assert_eq!(
            SriovCap::parse(0x120, &bytes(QEMU_NVME)[..0x3c]),
            Err(CapError::Truncated)
        );
    }
}
