//! The I/O Virtualization Reporting Structure (AMD I/O Virtualization
//! Technology (IOMMU) Specification, §5.2 "IVRS"): I/O virtualization
//! hardware definitions (IVHD types 10h, 11h, 40h) with their device
//! entries, and memory definitions (IVMD types 20h–22h).
//!
//! As with the DMAR, every length is checked; an IVHD whose device entries
//! do not fit, or that uses a variable-length entry type this parser
//! cannot measure, makes the table unusable. Unknown top-level block types
//! are skipped and reported in [`Ivrs::skipped`].
use crate::acpi::{self, TableError, u8_at, u16_at, u32_at, u64_at};
use alloc::vec::Vec;

/// Offset of the first definition block.
const FIRST_BLOCK: usize = 48;

/// One IVHD device entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceEntry {
    /// Type 0: padding.
    Pad,
    /// Type 1: every device ID the unit sees.
    All {
        /// DTE setting.
        dte: u8,
    },
    /// Type 2: one device.
    Select {
        /// Device ID (bus << 8 | devfn).
        id: u16,
        /// DTE setting.
        dte: u8,
    },
    /// Types 3 + 4: a range of device IDs (inclusive).
    Range {
        /// First.
        start: u16,
        /// Last.
        end: u16,
        /// DTE setting.
        dte: u8,
    },
    /// Type 42h: a device whose requests carry another ID.
    Alias {
        /// The device.
        id: u16,
        /// The ID its requests carry.
        source: u16,
        /// DTE setting.
        dte: u8,
    },
    /// Types 43h + 4: a range aliased to one ID.
    AliasRange {
        /// First.
        start: u16,
        /// Last.
        end: u16,
        /// The ID their requests carry.
        source: u16,
        /// DTE setting.
        dte: u8,
    },
    /// Type 46h: one device with extended DTE settings.
    ExtSelect {
        /// Device ID.
        id: u16,
        /// DTE setting.
        dte: u8,
        /// Extended DTE setting.
        ext: u32,
    },
    /// Types 47h + 4: a range with extended DTE settings.
    ExtRange {
        /// First.
        start: u16,
        /// Last.
        end: u16,
        /// DTE setting.
        dte: u8,
        /// Extended DTE setting.
        ext: u32,
    },
    /// Type 48h: an I/O APIC (variety 1) or HPET (variety 2).
    Special {
        /// I/O APIC ID or HPET number.
        handle: u8,
        /// Device ID its interrupts carry.
        source: u16,
        /// 1 I/O APIC, 2 HPET.
        variety: u8,
        /// DTE setting.
        dte: u8,
    },
    /// Type F0h: an ACPI namespace device.
    AcpiHid {
        /// Device ID.
        id: u16,
        /// DTE setting.
        dte: u8,
        /// Hardware ID.
        hid: [u8; 8],
        /// Compatible ID.
        cid: [u8; 8],
        /// Unique ID bytes.
        uid: Vec<u8>,
    },
}

/// An I/O virtualization hardware definition: one IOMMU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ivhd {
    /// 0x10, 0x11 or 0x40.
    pub kind: u8,
    /// Flags (coherency, IOTLB, isochronous, ...).
    pub flags: u8,
    /// The IOMMU's own device ID.
    pub device_id: u16,
    /// Offset of its capability block in its configuration space.
    pub capability_offset: u16,
    /// MMIO register base.
    pub base: u64,
    /// PCI segment.
    pub segment: u16,
    /// IOMMU info (MSI number, unit ID).
    pub info: u16,
    /// Type 10h: IOMMU feature reporting; 11h/40h: IOMMU attributes.
    pub features: u32,
    /// Types 11h/40h: image of the Extended Feature Register.
    pub efr: Option<u64>,
    /// Device entries.
    pub entries: Vec<DeviceEntry>,
}

impl Ivhd {
    /// Whether device ID `id` is covered by this unit's entries.
    pub fn covers(&self, id: u16) -> bool {
        self.entries.iter().any(|e| match *e {
            DeviceEntry::All { .. } => true,
            DeviceEntry::Select { id: x, .. }
            | DeviceEntry::Alias { id: x, .. }
            | DeviceEntry::ExtSelect { id: x, .. }
            | DeviceEntry::AcpiHid { id: x, .. } => x == id,
            DeviceEntry::Range { start, end, .. }
            | DeviceEntry::AliasRange { start, end, .. }
            | DeviceEntry::ExtRange { start, end, .. } => (start..=end).contains(&id),
            DeviceEntry::Special { .. } | DeviceEntry::Pad => false,
        })
    }
}

/// An I/O virtualization memory definition: memory some devices need
/// mapped 1:1 (unity) or excluded from translation (IVMD flags: bit 0
/// Unity, bit 1 IR, bit 2 IW, bit 3 ExclusionRange).
///
/// What thinhv does with them (`efi-app`'s `iommu_plan`): a unity range
/// and an exclusion range alike stay identity-mapped, read and write, in
/// its one I/O page table, for every device (its table maps all memory but
/// its own region 1:1 anyway; listing them keeps ranges above the memory
/// map's top mapped, and one that overlaps thinhv's region is logged and
/// left unmapped). An exclusion range is never programmed into the
/// IOMMU's exclusion registers: those pass DMA through untranslated, and
/// thinhv clears whatever the firmware left there
/// (`amdvi::clear_exclusion`). The IR/IW restrictions and the device
/// selection (21h, 22h) are not applied: the devices get the range with
/// read and write, as everything else outside thinhv.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ivmd {
    /// 0x20 all devices, 0x21 one device, 0x22 a range of devices.
    pub kind: u8,
    /// Bit 0 unity mapping, bit 1 read, bit 2 write, bit 3 exclusion range.
    pub flags: u8,
    /// Device ID (21h) or first device ID (22h).
    pub device_id: u16,
    /// Last device ID (22h).
    pub aux: u16,
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
}

impl Ivmd {
    /// Unity-mapped (identity) for its devices.
    pub fn unity(&self) -> bool {
        self.flags & 1 != 0
    }

    /// An exclusion range: firmware expects its devices' DMA into it to
    /// bypass translation.
    pub fn exclusion(&self) -> bool {
        self.flags & (1 << 3) != 0
    }

    /// Devices need the range reachable 1:1 (unity or exclusion).
    pub fn needs_identity(&self) -> bool {
        self.unity() || self.exclusion()
    }
}

/// A block that was skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// Type.
    pub kind: u8,
    /// Offset in the table.
    pub offset: usize,
    /// Length.
    pub length: usize,
}

/// The parsed table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ivrs {
    /// IVinfo (virtual/physical address sizes, EFR support).
    pub iv_info: u32,
    /// Every IVHD, in table order (one IOMMU may appear as 10h and 11h).
    pub ivhds: Vec<Ivhd>,
    /// Memory definitions.
    pub ivmds: Vec<Ivmd>,
    /// Blocks not interpreted.
    pub skipped: Vec<Skipped>,
}

impl Ivrs {
    /// One IVHD per IOMMU: of the blocks describing the same unit
    /// (segment and device ID), the richest type (40h over 11h over 10h),
    /// as an OS that understands all three picks.
    pub fn units(&self) -> Vec<&Ivhd> {
        let rank = |k: u8| match k {
            0x40 => 3,
            0x11 => 2,
            _ => 1,
        };
        let mut out: Vec<&Ivhd> = Vec::new();
        for h in &self.ivhds {
            match out
                .iter_mut()
                .find(|o| o.segment == h.segment && o.device_id == h.device_id)
            {
                Some(o) if rank(h.kind) > rank(o.kind) => *o = h,
                Some(_) => {}
                None => out.push(h),
            }
        }
        out
    }
}

fn entries(t: &[u8], start: usize, end: usize) -> Result<Vec<DeviceEntry>, TableError> {
    let mut out = Vec::new();
    let mut off = start;
    // A start-of-range entry waiting for its end: (kind, start, source, dte, ext).
    let mut open: Option<(u8, u16, u16, u8, u32)> = None;
    while off < end {
        let bad = TableError::BadEntry { offset: off };
        let kind = u8_at(t, off).ok_or(bad)?;
        let len = match kind {
            0..=0x3f => 4,
            0x40..=0x7f => 8,
            0xf0 => 22 + usize::from(u8_at(t, off + 21).ok_or(bad)?),
            _ => return Err(bad),
        };
        if off + len > end {
            return Err(bad);
        }
        let id = u16_at(t, off + 1).ok_or(bad)?;
        let dte = t[off + 3];
        if open.is_some() && kind != 4 && kind != 0 {
            // A range must be closed by the next entry.
            return Err(bad);
        }
        match kind {
            0 => out.push(DeviceEntry::Pad),
            1 => out.push(DeviceEntry::All { dte }),
            2 => out.push(DeviceEntry::Select { id, dte }),
            3 => open = Some((3, id, 0, dte, 0)),
            4 => {
                let (k, s, source, dte, ext) = open.take().ok_or(bad)?;
                if id < s {
                    return Err(bad);
                }
                out.push(match k {
                    0x43 => DeviceEntry::AliasRange {
                        start: s,
                        end: id,
                        source,
                        dte,
                    },
                    0x47 => DeviceEntry::ExtRange {
                        start: s,
                        end: id,
                        dte,
                        ext,
                    },
                    _ => DeviceEntry::Range {
                        start: s,
                        end: id,
                        dte,
                    },
                });
            }
            0x42 => out.push(DeviceEntry::Alias {
                id,
                source: u16_at(t, off + 5).ok_or(bad)?,
                dte,
            }),
            0x43 => open = Some((0x43, id, u16_at(t, off + 5).ok_or(bad)?, dte, 0)),
            0x46 => out.push(DeviceEntry::ExtSelect {
                id,
                dte,
                ext: u32_at(t, off + 4).ok_or(bad)?,
            }),
            0x47 => open = Some((0x47, id, 0, dte, u32_at(t, off + 4).ok_or(bad)?)),
            0x48 => out.push(DeviceEntry::Special {
                handle: t[off + 4],
                source: u16_at(t, off + 5).ok_or(bad)?,
                variety: t[off + 7],
                dte,
            }),
            0xf0 => {
                let mut hid = [0u8; 8];
                let mut cid = [0u8; 8];
                hid.copy_from_slice(&t[off + 4..off + 12]);
                cid.copy_from_slice(&t[off + 12..off + 20]);
                out.push(DeviceEntry::AcpiHid {
                    id,
                    dte,
                    hid,
                    cid,
                    uid: t[off + 22..off + len].to_vec(),
                });
            }
            // Reserved 4- and 8-byte types: their size is known, their
            // meaning is not; skipping them is safe.
            _ => {}
        }
        off += len;
    }
    if open.is_some() {
        return Err(TableError::BadEntry { offset: end });
    }
    Ok(out)
}

/// Parses an IVRS table.
pub fn parse(bytes: &[u8]) -> Result<Ivrs, TableError> {
    let (_, t) = acpi::checked(bytes, b"IVRS")?;
    if t.len() < FIRST_BLOCK {
        return Err(TableError::TooShort);
    }
    let mut r = Ivrs {
        iv_info: u32_at(t, 36).ok_or(TableError::TooShort)?,
        ..Ivrs::default()
    };
    let mut off = FIRST_BLOCK;
    while off < t.len() {
        let kind = u8_at(t, off).ok_or(TableError::TooShort)?;
        let len = usize::from(u16_at(t, off + 2).ok_or(TableError::TooShort)?);
        let min = match kind {
            0x10 => 24,
            0x11 | 0x40 => 40,
            0x20..=0x22 => 32,
            _ => 4,
        };
        if len < min || off + len > t.len() {
            return Err(TableError::BadStructure {
                offset: off,
                kind: u16::from(kind),
                length: len,
            });
        }
        let end = off + len;
        let short = TableError::BadStructure {
            offset: off,
            kind: u16::from(kind),
            length: len,
        };
        match kind {
            0x10 | 0x11 | 0x40 => r.ivhds.push(Ivhd {
                kind,
                flags: t[off + 1],
                device_id: u16_at(t, off + 4).ok_or(short)?,
                capability_offset: u16_at(t, off + 6).ok_or(short)?,
                base: u64_at(t, off + 8).ok_or(short)?,
                segment: u16_at(t, off + 16).ok_or(short)?,
                info: u16_at(t, off + 18).ok_or(short)?,
                features: u32_at(t, off + 20).ok_or(short)?,
                efr: if kind == 0x10 {
                    None
                } else {
                    Some(u64_at(t, off + 24).ok_or(short)?)
                },
                entries: entries(t, off + min, end)?,
            }),
            0x20..=0x22 => r.ivmds.push(Ivmd {
                kind,
                flags: t[off + 1],
                device_id: u16_at(t, off + 4).ok_or(short)?,
                aux: u16_at(t, off + 6).ok_or(short)?,
                start: u64_at(t, off + 16).ok_or(short)?,
                length: u64_at(t, off + 24).ok_or(short)?,
            }),
            _ => r.skipped.push(Skipped {
                kind,
                offset: off,
                length: len,
            }),
        }
        off = end;
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acpi::set_checksum as fix_checksum;

    const QEMU: &[u8] = include_bytes!("../tests/data/qemu-q35-amd-iommu.ivrs");
    const QEMU_RP: &[u8] = include_bytes!("../tests/data/qemu-q35-amd-iommu-rootport.ivrs");

    #[test]
    fn qemu_amd_iommu_table() {
        let r = parse(QEMU).unwrap();
        assert_eq!(r.ivhds.len(), 2, "10h and 11h for the same unit");
        let (a, b) = (&r.ivhds[0], &r.ivhds[1]);
        assert_eq!((a.kind, b.kind), (0x10, 0x11));
        for h in [a, b] {
            assert_eq!(h.device_id, 0x0010, "the IOMMU at 00:02.0");
            assert_eq!(h.base, 0xfed8_0000);
            assert_eq!(h.capability_offset, 0x40);
        }
        assert_eq!(a.efr, None);
        assert!(b.efr.is_some());
        let units = r.units();
        assert_eq!(units.len(), 1);
        assert_eq!(units[0].kind, 0x11);
        let ids: Vec<u16> = a
            .entries
            .iter()
            .filter_map(|e| match e {
                DeviceEntry::Select { id, .. } => Some(*id),
                _ => None,
            })
            .collect();
        assert_eq!(ids, [0x0000, 0x0008, 0x0010, 0x00f8, 0x00fa, 0x00fb]);
        assert!(a.entries.contains(&DeviceEntry::Special {
            handle: 0,
            source: 0x00a0,
            variety: 1,
            dte: 0
        }));
        assert!(a.covers(0x00fa) && !a.covers(0x0100));
        assert!(r.ivmds.is_empty() && r.skipped.is_empty());
    }

    #[test]
    fn qemu_table_with_a_root_port_has_a_bus_range() {
        let r = parse(QEMU_RP).unwrap();
        let h = r.units()[0];
        assert!(h.entries.contains(&DeviceEntry::Range {
            start: 0x0100,
            end: 0x01ff,
            dte: 0
        }));
        assert!(h.covers(0x0100) && h.covers(0x01ff) && !h.covers(0x0200));
    }

    fn table(blocks: &[&[u8]]) -> Vec<u8> {
        let mut t = alloc::vec![0u8; 48];
        t[..4].copy_from_slice(b"IVRS");
        for b in blocks {
            t.extend_from_slice(b);
        }
        let n = u32::try_from(t.len()).unwrap();
        t[4..8].copy_from_slice(&n.to_le_bytes());
        fix_checksum(&mut t);
        t
    }

    fn ivhd40(entries: &[u8]) -> Vec<u8> {
        let mut b = alloc::vec![0x40, 0, 0, 0, 0x02, 0, 0x40, 0];
        b.extend_from_slice(&0xfeb8_0000u64.to_le_bytes());
        b.extend_from_slice(&[0u8; 24]);
        b.extend_from_slice(entries);
        let n = u16::try_from(b.len()).unwrap();
        b[2..4].copy_from_slice(&n.to_le_bytes());
        b
    }

    #[test]
    fn every_entry_kind_and_ivmd() {
        let mut e = Vec::new();
        e.extend_from_slice(&[1, 0, 0, 0]);
        e.extend_from_slice(&[0x42, 0x00, 0x05, 0, 0, 0x00, 0x10, 0]);
        e.extend_from_slice(&[0x43, 0x00, 0x06, 0, 0, 0x00, 0x20, 0]);
        e.extend_from_slice(&[4, 0xff, 0x06, 0]);
        e.extend_from_slice(&[0x46, 0x00, 0x07, 0, 1, 0, 0, 0x80]);
        e.extend_from_slice(&[0x47, 0x00, 0x08, 0, 0, 0, 0, 0x80]);
        e.extend_from_slice(&[4, 0x0f, 0x08, 0]);
        e.extend_from_slice(&[0x48, 0, 0, 0xd7, 0x21, 0xa0, 0x00, 1]);
        e.extend_from_slice(&[0xf0, 0x08, 0x00, 0]);
        e.extend_from_slice(b"AMDI0020");
        e.extend_from_slice(b"\0\0\0\0\0\0\0\0");
        e.extend_from_slice(&[1, 3, b'I', b'D', b'0']);
        e.extend_from_slice(&[0x7e, 0, 0, 0, 0, 0, 0, 0]); // reserved 8-byte type
        let mut ivmd = alloc::vec![0x21, 0x07, 32, 0, 0x00, 0x05, 0, 0];
        ivmd.extend_from_slice(&[0u8; 8]);
        ivmd.extend_from_slice(&0xdc00_0000u64.to_le_bytes());
        ivmd.extend_from_slice(&0x80_0000u64.to_le_bytes());
        let unknown = [0x55u8, 0, 8, 0, 0, 0, 0, 0];
        let t = table(&[&ivhd40(&e), &ivmd, &unknown]);
        let r = parse(&t).unwrap();
        let h = &r.ivhds[0];
        assert_eq!(h.kind, 0x40);
        assert_eq!(h.base, 0xfeb8_0000);
        assert_eq!(
            h.entries[1],
            DeviceEntry::Alias {
                id: 0x0500,
                source: 0x1000,
                dte: 0
            }
        );
        assert_eq!(
            h.entries[2],
            DeviceEntry::AliasRange {
                start: 0x0600,
                end: 0x06ff,
                source: 0x2000,
                dte: 0
            }
        );
        assert_eq!(
            h.entries[3],
            DeviceEntry::ExtSelect {
                id: 0x0700,
                dte: 0,
                ext: 0x8000_0001
            }
        );
        assert_eq!(
            h.entries[4],
            DeviceEntry::ExtRange {
                start: 0x0800,
                end: 0x080f,
                dte: 0,
                ext: 0x8000_0000
            }
        );
        assert_eq!(
            h.entries[5],
            DeviceEntry::Special {
                handle: 0x21,
                source: 0x00a0,
                variety: 1,
                dte: 0xd7
            }
        );
        match &h.entries[6] {
            DeviceEntry::AcpiHid { id, hid, uid, .. } => {
                assert_eq!(
                    (*id, hid, uid.as_slice()),
                    (0x0008, b"AMDI0020", &b"ID0"[..])
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(h.entries.len(), 7, "the reserved type is skipped");
        assert_eq!(r.ivmds[0].start, 0xdc00_0000);
        assert!(r.ivmds[0].unity());
        assert_eq!(
            r.skipped,
            [Skipped {
                kind: 0x55,
                offset: 48 + h_len(&e) + 32,
                length: 8
            }]
        );
    }

    fn h_len(e: &[u8]) -> usize {
        40 + e.len()
    }

    fn ivmd(kind: u8, flags: u8, start: u64, length: u64) -> Vec<u8> {
        let mut b = alloc::vec![kind, flags, 32, 0, 0, 0, 0, 0];
        b.extend_from_slice(&[0u8; 8]);
        b.extend_from_slice(&start.to_le_bytes());
        b.extend_from_slice(&length.to_le_bytes());
        b
    }

    #[test]
    fn exclusion_ranges_are_told_apart_from_unity_ranges() {
        let t = table(&[
            &ivhd40(&[1, 0, 0, 0]),
            &ivmd(0x20, 0b0111, 0xdc00_0000, 0x1000), // unity, r/w
            &ivmd(0x20, 0b1000, 0xdd00_0000, 0x2000), // exclusion
            &ivmd(0x22, 0b1110, 0xde00_0000, 0x3000), // exclusion (IR/IW ignored)
            &ivmd(0x21, 0b0110, 0xdf00_0000, 0x4000), // neither: IR/IW only
        ]);
        let r = parse(&t).unwrap();
        let flags: Vec<(bool, bool, bool)> = r
            .ivmds
            .iter()
            .map(|m| (m.unity(), m.exclusion(), m.needs_identity()))
            .collect();
        assert_eq!(
            flags,
            [
                (true, false, true),
                (false, true, true),
                (false, true, true),
                (false, false, false)
            ]
        );
        assert_eq!((r.ivmds[1].start, r.ivmds[1].length), (0xdd00_0000, 0x2000));
    }

    #[test]
    fn malformed_tables_are_refused() {
        // Start of range without an end.
        let t = table(&[&ivhd40(&[3, 0, 1, 0])]);
        assert!(matches!(parse(&t), Err(TableError::BadEntry { .. })));
        // End before start.
        let t = table(&[&ivhd40(&[3, 0, 2, 0, 4, 0, 1, 0])]);
        assert!(matches!(parse(&t), Err(TableError::BadEntry { .. })));
        // An entry running past its block.
        let t = table(&[&ivhd40(&[0x42, 0, 1, 0])]);
        assert!(matches!(parse(&t), Err(TableError::BadEntry { .. })));
        // An ACPI HID entry whose UID runs past the block.
        let mut e = alloc::vec![0xf0, 0, 1, 0];
        e.extend_from_slice(&[0u8; 16]);
        e.extend_from_slice(&[1, 40]);
        let t = table(&[&ivhd40(&e)]);
        assert!(matches!(parse(&t), Err(TableError::BadEntry { .. })));
        // A variable-length type that cannot be measured.
        let t = table(&[&ivhd40(&[0x90, 0, 0, 0])]);
        assert!(matches!(parse(&t), Err(TableError::BadEntry { .. })));
        // A block shorter than its type's fixed part, and a zero length.
        let mut short = ivhd40(&[]);
        short[2] = 24;
        short.truncate(24);
        assert!(matches!(
            parse(&table(&[&short])),
            Err(TableError::BadStructure { .. })
        ));
        let t = table(&[&[0x55, 0, 0, 0]]);
        assert!(matches!(parse(&t), Err(TableError::BadStructure { .. })));
        // Bad checksum.
        let mut t = table(&[&ivhd40(&[1, 0, 0, 0])]);
        t[60] ^= 0x80;
        assert_eq!(parse(&t), Err(TableError::BadChecksum));
    }
}
