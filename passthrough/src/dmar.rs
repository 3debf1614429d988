//! The DMA Remapping Reporting table (Intel VT-d specification, chapter 8
//! "BIOS Considerations"): remapping hardware units (DRHD) with their device
//! scopes, reserved memory regions (RMRR), ATS reporting (ATSR), proximity
//! (RHSA) and SoC-integrated address translation caches (SATC).
//!
//! Every length is checked against the bytes present; a structure or device
//! scope that does not fit makes the whole table unusable (an IOMMU set up
//! from half a table would leave devices unprotected or broken). Structure
//! types this parser does not know are skipped and reported in
//! [`Dmar::skipped`], never interpreted.
use crate::acpi::{self, TableError, u8_at, u16_at, u32_at, u64_at};
use crate::pci::{Bdf, ConfigSpace};
use alloc::vec::Vec;

/// Offset of the first remapping structure.
const FIRST_STRUCTURE: usize = 48;

/// A device scope (VT-d §8.3.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceScope {
    /// Scope type: [`SCOPE_ENDPOINT`], [`SCOPE_BRIDGE`], [`SCOPE_IOAPIC`],
    /// [`SCOPE_HPET`], [`SCOPE_ACPI_NAMESPACE`].
    pub kind: u8,
    /// Enumeration ID (I/O APIC ID, HPET number, ACPI device number).
    pub enumeration_id: u8,
    /// Bus of the first path element.
    pub start_bus: u8,
    /// (device, function) hops from `start_bus` through bridges.
    pub path: Vec<(u8, u8)>,
}

/// [`DeviceScope::kind`]: a PCI endpoint.
pub const SCOPE_ENDPOINT: u8 = 1;
/// [`DeviceScope::kind`]: a PCI bridge and everything below it.
pub const SCOPE_BRIDGE: u8 = 2;
/// [`DeviceScope::kind`]: an I/O APIC.
pub const SCOPE_IOAPIC: u8 = 3;
/// [`DeviceScope::kind`]: an HPET (MSI-capable).
pub const SCOPE_HPET: u8 = 4;
/// [`DeviceScope::kind`]: an ACPI namespace device.
pub const SCOPE_ACPI_NAMESPACE: u8 = 5;

impl DeviceScope {
    /// The function the path leads to on `segment`, reading each bridge's
    /// secondary bus number; `None` if a hop is absent or not a bridge.
    pub fn resolve(&self, segment: u16, cfg: &impl ConfigSpace) -> Option<Bdf> {
        let mut bus = self.start_bus;
        let mut bdf = None;
        for (i, &(dev, func)) in self.path.iter().enumerate() {
            let here = Bdf::new(segment, bus, dev, func);
            if i + 1 < self.path.len() {
                let hdr = (cfg.read32(here, 0x0c) >> 16) & 0x7f;
                if hdr != 1 {
                    return None;
                }
                bus = ((cfg.read32(here, 0x18) >> 8) & 0xff) as u8;
            }
            bdf = Some(here);
        }
        bdf
    }
}

/// A DMA remapping hardware unit (VT-d §8.3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drhd {
    /// Bit 0 (INCLUDE_PCI_ALL): the unit covers every device of the segment
    /// not claimed by another unit.
    pub flags: u8,
    /// Register set size: 2^size 4 KiB pages.
    pub size: u8,
    /// PCI segment.
    pub segment: u16,
    /// Register base address.
    pub base: u64,
    /// Devices (and I/O APICs, HPETs) under this unit.
    pub scopes: Vec<DeviceScope>,
}

impl Drhd {
    /// INCLUDE_PCI_ALL.
    pub fn include_pci_all(&self) -> bool {
        self.flags & 1 != 0
    }

    /// Bytes of register space.
    pub fn register_bytes(&self) -> u64 {
        4096u64 << self.size.min(20)
    }
}

/// A reserved memory region a device uses for DMA before and after the OS
/// takes over (VT-d §8.4): it must stay mapped 1:1 for those devices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rmrr {
    /// Segment.
    pub segment: u16,
    /// First byte.
    pub base: u64,
    /// Last byte (inclusive).
    pub limit: u64,
    /// The devices.
    pub scopes: Vec<DeviceScope>,
}

/// Root ports that support ATS (VT-d §8.5).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Atsr {
    /// Bit 0 (ALL_PORTS).
    pub flags: u8,
    /// Segment.
    pub segment: u16,
    /// Root ports (when not ALL_PORTS).
    pub scopes: Vec<DeviceScope>,
}

/// Proximity domain of a unit (VT-d §8.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rhsa {
    /// The unit's register base.
    pub base: u64,
    /// Proximity domain.
    pub proximity_domain: u32,
}

/// SoC-integrated address translation cache (VT-d §8.8).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Satc {
    /// Bit 0 (ATC_REQUIRED).
    pub flags: u8,
    /// Segment.
    pub segment: u16,
    /// Devices.
    pub scopes: Vec<DeviceScope>,
}

/// A structure that was skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// Type.
    pub kind: u16,
    /// Offset in the table.
    pub offset: usize,
    /// Length.
    pub length: usize,
}

/// The parsed table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dmar {
    /// Host address width (DMA physical address bits).
    pub host_address_width: u8,
    /// Bit 0 INTR_REMAP, bit 1 X2APIC_OPT_OUT, bit 2 DMA_CTRL_PLATFORM_OPT_IN.
    pub flags: u8,
    /// Remapping units.
    pub drhds: Vec<Drhd>,
    /// Reserved memory regions.
    pub rmrrs: Vec<Rmrr>,
    /// ATS reporting.
    pub atsrs: Vec<Atsr>,
    /// Proximity.
    pub rhsas: Vec<Rhsa>,
    /// SoC-integrated caches.
    pub satcs: Vec<Satc>,
    /// Structures not interpreted (ANDD, newer types).
    pub skipped: Vec<Skipped>,
}

/// Parses the device scopes in `b[start..end]` (`b` is the whole table).
fn scopes(b: &[u8], start: usize, end: usize) -> Result<Vec<DeviceScope>, TableError> {
    let mut out = Vec::new();
    let mut off = start;
    while off < end {
        let bad = TableError::BadEntry { offset: off };
        let kind = u8_at(b, off).ok_or(bad)?;
        let len = usize::from(u8_at(b, off + 1).ok_or(bad)?);
        if len < 6 || (len - 6) % 2 != 0 || off + len > end {
            return Err(bad);
        }
        let path = (0..(len - 6) / 2)
            .map(|i| (b[off + 6 + 2 * i], b[off + 7 + 2 * i]))
            .collect();
        out.push(DeviceScope {
            kind,
            enumeration_id: b[off + 4],
            start_bus: b[off + 5],
            path,
        });
        off += len;
    }
    Ok(out)
}

/// Parses a DMAR table (the bytes from the table's first byte; at least its
/// declared length).
pub fn parse(bytes: &[u8]) -> Result<Dmar, TableError> {
    let (_, t) = acpi::checked(bytes, b"DMAR")?;
    if t.len() < FIRST_STRUCTURE {
        return Err(TableError::TooShort);
    }
    let mut d = Dmar {
        host_address_width: t[36],
        flags: t[37],
        ..Dmar::default()
    };
    let mut off = FIRST_STRUCTURE;
    while off < t.len() {
        let kind = u16_at(t, off).ok_or(TableError::TooShort)?;
        let len = usize::from(u16_at(t, off + 2).ok_or(TableError::TooShort)?);
        let min = match kind {
            0 => 16,
            1 => 24,
            2 | 5 => 8,
            3 => 20,
            _ => 4,
        };
        if len < min || off + len > t.len() {
            return Err(TableError::BadStructure {
                offset: off,
                kind,
                length: len,
            });
        }
        let end = off + len;
        let r = |o: usize| TableError::BadStructure {
            offset: o,
            kind,
            length: len,
        };
        match kind {
            0 => d.drhds.push(Drhd {
                flags: t[off + 4],
                size: t[off + 5],
                segment: u16_at(t, off + 6).ok_or(r(off))?,
                base: u64_at(t, off + 8).ok_or(r(off))?,
                scopes: scopes(t, off + 16, end)?,
            }),
            1 => {
                let base = u64_at(t, off + 8).ok_or(r(off))?;
                let limit = u64_at(t, off + 16).ok_or(r(off))?;
                if limit < base {
                    return Err(TableError::BadEntry { offset: off });
                }
                d.rmrrs.push(Rmrr {
                    segment: u16_at(t, off + 6).ok_or(r(off))?,
                    base,
                    limit,
                    scopes: scopes(t, off + 24, end)?,
                });
            }
            2 => d.atsrs.push(Atsr {
                flags: t[off + 4],
                segment: u16_at(t, off + 6).ok_or(r(off))?,
                scopes: scopes(t, off + 8, end)?,
            }),
            3 => d.rhsas.push(Rhsa {
                base: u64_at(t, off + 8).ok_or(r(off))?,
                proximity_domain: u32_at(t, off + 16).ok_or(r(off))?,
            }),
            5 => d.satcs.push(Satc {
                flags: t[off + 4],
                segment: u16_at(t, off + 6).ok_or(r(off))?,
                scopes: scopes(t, off + 8, end)?,
            }),
            _ => d.skipped.push(Skipped {
                kind,
                offset: off,
                length: len,
            }),
        }
        off = end;
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acpi::set_checksum as fix_checksum;

    const QEMU: &[u8] = include_bytes!("../tests/data/qemu-q35-intel-iommu.dmar");
    const QEMU_RP: &[u8] =
        include_bytes!("../tests/data/qemu-q35-intel-iommu-intremap-rootport.dmar");

    fn ep(bus: u8, dev: u8, func: u8) -> DeviceScope {
        DeviceScope {
            kind: SCOPE_ENDPOINT,
            enumeration_id: 0,
            start_bus: bus,
            path: alloc::vec![(dev, func)],
        }
    }

    #[test]
    fn qemu_intel_iommu_table() {
        let d = parse(QEMU).unwrap();
        assert_eq!(d.host_address_width, 0x2f, "48-bit DMA addresses");
        assert_eq!(d.flags, 0x01, "INTR_REMAP");
        assert_eq!(d.drhds.len(), 1);
        let u = &d.drhds[0];
        assert_eq!(
            (u.segment, u.base, u.include_pci_all()),
            (0, 0xfed9_0000, false)
        );
        assert_eq!(u.register_bytes(), 4096);
        assert_eq!(
            u.scopes[0],
            DeviceScope {
                kind: SCOPE_IOAPIC,
                enumeration_id: 0,
                start_bus: 0xff,
                path: alloc::vec![(0, 0)],
            }
        );
        assert_eq!(
            u.scopes[1..],
            [
                ep(0, 0, 0),
                ep(0, 1, 0),
                ep(0, 0x1f, 0),
                ep(0, 0x1f, 2),
                ep(0, 0x1f, 3)
            ]
        );
        assert!(d.rmrrs.is_empty() && d.skipped.is_empty());
    }

    #[test]
    fn qemu_table_with_a_root_port_scopes_its_hierarchy() {
        let d = parse(QEMU_RP).unwrap();
        let s = &d.drhds[0].scopes;
        assert!(
            s.iter()
                .any(|x| x.kind == SCOPE_BRIDGE && x.path == [(2, 0)])
        );
    }

    /// A hand-made table with every structure type, a two-hop path and an
    /// unknown structure.
    fn synthetic() -> Vec<u8> {
        let mut t = alloc::vec![0u8; 48];
        t[..4].copy_from_slice(b"DMAR");
        t[36] = 38;
        // DRHD, INCLUDE_PCI_ALL, one bridge-path endpoint (00:1c.0 → 00.0).
        t.extend_from_slice(&[0, 0, 26, 0, 1, 0, 0, 0]);
        t.extend_from_slice(&0xfed9_1000u64.to_le_bytes());
        t.extend_from_slice(&[1, 10, 0, 0, 0, 0, 0x1c, 0, 0, 0]);
        // RMRR for 00:14.0, 0xdc000000..0xdc7fffff.
        t.extend_from_slice(&[1, 0, 32, 0, 0, 0, 0, 0]);
        t.extend_from_slice(&0xdc00_0000u64.to_le_bytes());
        t.extend_from_slice(&0xdc7f_ffffu64.to_le_bytes());
        t.extend_from_slice(&[1, 8, 0, 0, 0, 0, 0x14, 0]);
        // ATSR (ALL_PORTS), RHSA, ANDD (skipped), SATC.
        t.extend_from_slice(&[2, 0, 8, 0, 1, 0, 0, 0]);
        t.extend_from_slice(&[3, 0, 20, 0, 0, 0, 0, 0]);
        t.extend_from_slice(&0xfed9_1000u64.to_le_bytes());
        t.extend_from_slice(&1u32.to_le_bytes());
        t.extend_from_slice(&[4, 0, 12, 0, 0, 0, 0, 1, b'X', b'Y', b'Z', 0]);
        t.extend_from_slice(&[5, 0, 16, 0, 1, 0, 0, 0, 1, 8, 0, 0, 0, 0, 2, 0]);
        let n = u32::try_from(t.len()).unwrap();
        t[4..8].copy_from_slice(&n.to_le_bytes());
        fix_checksum(&mut t);
        t
    }

    #[test]
    fn every_structure_type() {
        let d = parse(&synthetic()).unwrap();
        assert!(d.drhds[0].include_pci_all());
        assert_eq!(d.drhds[0].scopes[0].path, [(0x1c, 0), (0, 0)]);
        assert_eq!(d.rmrrs[0].base, 0xdc00_0000);
        assert_eq!(d.rmrrs[0].limit, 0xdc7f_ffff);
        assert_eq!(d.rmrrs[0].scopes[0], ep(0, 0x14, 0));
        assert_eq!(d.atsrs[0].flags, 1);
        assert_eq!(d.rhsas[0].proximity_domain, 1);
        assert_eq!(d.satcs[0].scopes[0], ep(0, 2, 0));
        assert_eq!(
            d.skipped,
            [Skipped {
                kind: 4,
                offset: 48 + 26 + 32 + 8 + 20,
                length: 12
            }]
        );
    }

    #[test]
    fn malformed_tables_are_refused() {
        let good = synthetic();
        // A structure running past the end.
        let mut t = good.clone();
        t[50] = 0xff;
        fix_checksum(&mut t);
        assert!(matches!(
            parse(&t),
            Err(TableError::BadStructure { offset: 48, .. })
        ));
        // A zero-length structure (would loop forever if accepted).
        let mut t = good.clone();
        t[50] = 0;
        fix_checksum(&mut t);
        assert!(matches!(parse(&t), Err(TableError::BadStructure { .. })));
        // A device scope longer than its structure.
        let mut t = good.clone();
        t[48 + 16 + 1] = 12;
        fix_checksum(&mut t);
        assert!(matches!(parse(&t), Err(TableError::BadEntry { .. })));
        // An odd-length path.
        let mut t = good.clone();
        t[48 + 16 + 1] = 9;
        fix_checksum(&mut t);
        assert!(matches!(parse(&t), Err(TableError::BadEntry { .. })));
        // RMRR with limit below base.
        let mut t = good.clone();
        t[48 + 26 + 16..48 + 26 + 24].copy_from_slice(&1u64.to_le_bytes());
        fix_checksum(&mut t);
        assert!(matches!(parse(&t), Err(TableError::BadEntry { .. })));
        // Checksum.
        let mut t = good;
        t[40] ^= 1;
        assert_eq!(parse(&t), Err(TableError::BadChecksum));
    }

    #[test]
    fn scope_paths_resolve_through_bridges() {
        use crate::pci::tests_support::FakeConfig;
        let mut c = FakeConfig::default();
        c.bridge(Bdf::new(0, 0, 0x1c, 0), 3, 3);
        c.endpoint(Bdf::new(0, 3, 0, 0), 0x1234_8086, 0x0200_0000, true);
        let d = parse(&synthetic()).unwrap();
        assert_eq!(
            d.drhds[0].scopes[0].resolve(0, &c),
            Some(Bdf::new(0, 3, 0, 0))
        );
        // A hop that is not a bridge.
        let s = DeviceScope {
            kind: SCOPE_ENDPOINT,
            enumeration_id: 0,
            start_bus: 3,
            path: alloc::vec![(0, 0), (1, 0)],
        };
        assert_eq!(s.resolve(0, &c), None);
    }
}
