//! From the ACPI IOMMU tables to the core's hand-off: which units, which
//! memory must stay mapped for devices, and what to tell the admin.
use alloc::format;
use alloc::string::String;
use thinhv_abi::PhysRange;
use thinhv_abi::handoff::{
    IOMMU_KIND_VTD, IOMMU_MODE_PROTECT, IommuHandoff, IommuUnit, MAX_IOMMU_RESERVED, MAX_IOMMUS,
};
use thinhv_passthrough::dmar::Dmar;

/// The hand-off for a VT-d platform in protect mode.
pub fn vtd(d: &Dmar) -> Result<IommuHandoff, String> {
    if d.drhds.is_empty() {
        return Err("the DMAR lists no remapping unit".into());
    }
    if d.drhds.len() > MAX_IOMMUS {
        return Err(format!(
            "the DMAR lists {} remapping units; thinhv handles {MAX_IOMMUS}",
            d.drhds.len()
        ));
    }
    if d.rmrrs.len() > MAX_IOMMU_RESERVED {
        return Err(format!(
            "the DMAR lists {} reserved memory regions; thinhv handles {MAX_IOMMU_RESERVED}",
            d.rmrrs.len()
        ));
    }
    if let Some(u) = d.drhds.iter().find(|u| u.segment != 0) {
        return Err(format!(
            "a remapping unit ({:#x}) serves PCI segment {}; thinhv handles segment 0 only",
            u.base, u.segment
        ));
    }
    let mut h = IommuHandoff {
        mode: IOMMU_MODE_PROTECT,
        kind: IOMMU_KIND_VTD,
        ..IommuHandoff::default()
    };
    for (slot, u) in h.units.iter_mut().zip(&d.drhds) {
        *slot = IommuUnit {
            base: u.base,
            size: u.register_bytes(),
            segment: u.segment,
            reserved: [0; 3],
        };
    }
    h.count = u32::try_from(d.drhds.len()).unwrap_or(0);
    for (slot, r) in h.reserved_ranges.iter_mut().zip(&d.rmrrs) {
        *slot = PhysRange::new(r.base, r.limit - r.base + 1);
    }
    h.reserved_count = u32::try_from(d.rmrrs.len()).unwrap_or(0);
    Ok(h)
}

/// A line describing the units, for the boot console.
pub fn describe(h: &IommuHandoff) -> String {
    use core::fmt::Write;
    let mut s = format!("{} VT-d unit(s) at", h.count);
    for u in h.units() {
        let _ = write!(s, " {:#x}", u.base);
    }
    if h.reserved_count > 0 {
        let _ = write!(
            s,
            ", {} reserved memory region(s) kept mapped",
            h.reserved_count
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_dmar_becomes_one_unit() {
        let bytes = include_bytes!("../../passthrough/tests/data/qemu-q35-intel-iommu.dmar");
        let d = thinhv_passthrough::dmar::parse(bytes).unwrap();
        let h = vtd(&d).unwrap();
        assert_eq!(h.count, 1);
        assert_eq!(h.units[0].base, 0xfed9_0000);
        assert_eq!(h.units[0].size, 4096);
        assert_eq!(describe(&h), "1 VT-d unit(s) at 0xfed90000");
    }

    #[test]
    fn limits_are_reported() {
        let mut d = Dmar::default();
        assert!(vtd(&d).is_err());
        let u = thinhv_passthrough::dmar::Drhd {
            flags: 1,
            size: 0,
            segment: 0,
            base: 0xfed9_0000,
            scopes: alloc::vec![],
        };
        d.drhds = alloc::vec![u.clone(); MAX_IOMMUS + 1];
        assert!(vtd(&d).unwrap_err().contains("remapping units"));
        d.drhds = alloc::vec![thinhv_passthrough::dmar::Drhd { segment: 1, ..u }];
        assert!(vtd(&d).unwrap_err().contains("segment"));
    }
}
