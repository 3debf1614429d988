//! The ACPI IOMMU table the OS sees when thinhv emulates its IOMMU (issue
//! 14): built from the platform's own, parsed ([`crate::dmar`],
//! [`crate::ivrs`]), so the OS finds a unit of the platform's kind where
//! thinhv emulates one ([`os_dmar`], [`os_ivrs`]).
//!
//! The OS's DMAR has one remapping unit per real one, at the same register
//! base (thinhv keeps the real registers out of the OS's reach and answers
//! there with [`crate::vvtd`]), one page of registers each, with the real
//! unit's INCLUDE_PCI_ALL flag and only the device scopes the OS owns
//! (`keep`); reserved memory regions keep the OS's scopes and go where none
//! is left. Interrupt remapping is announced where offered, and x2APIC is
//! never opted out of. What thinhv does not offer is left out: ATS
//! (ATSR) and the SoC-integrated address translation cache (SATC), as is
//! every structure the parser skipped.
use crate::dmar::{DeviceScope, Dmar};
use alloc::vec::Vec;

/// DMAR flags: interrupt remapping supported.
pub const DMAR_INTR_REMAP: u8 = 1;
/// DMAR flags: the platform asks the OS not to use x2APIC.
pub const DMAR_X2APIC_OPT_OUT: u8 = 2;
/// DMAR flags: DMA control opt-in.
pub const DMAR_DMA_CTRL_OPT_IN: u8 = 4;

fn header(sig: [u8; 4], revision: u8) -> Vec<u8> {
    let mut t = Vec::with_capacity(256);
    t.extend_from_slice(&sig);
    t.extend_from_slice(&[0; 4]); // length, set last
    t.push(revision);
    t.push(0); // checksum, set last
    t.extend_from_slice(b"THINHV");
    t.extend_from_slice(b"THINHV  ");
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(b"THHV");
    t.extend_from_slice(&1u32.to_le_bytes());
    t
}

fn finish(mut t: Vec<u8>) -> Option<Vec<u8>> {
    let len = u32::try_from(t.len()).ok()?;
    t[4..8].copy_from_slice(&len.to_le_bytes());
    crate::acpi::set_checksum(&mut t);
    Some(t)
}

fn scope_bytes(s: &DeviceScope, out: &mut Vec<u8>) -> Option<()> {
    let len = u8::try_from(6 + 2 * s.path.len()).ok()?;
    out.extend_from_slice(&[s.kind, len, 0, 0, s.enumeration_id, s.start_bus]);
    for &(dev, func) in &s.path {
        out.extend_from_slice(&[dev, func]);
    }
    Some(())
}

/// A structure of `kind` whose fixed part is `fixed` (after type and
/// length), followed by `scopes`.
fn structure(kind: u16, fixed: &[u8], scopes: &[&DeviceScope], out: &mut Vec<u8>) -> Option<()> {
    let start = out.len();
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(fixed);
    for s in scopes {
        scope_bytes(s, out)?;
    }
    let len = u16::try_from(out.len() - start).ok()?;
    out[start + 2..start + 4].copy_from_slice(&len.to_le_bytes());
    Some(())
}

/// The DMAR the OS sees, from the platform's `real`: `remapping` where
/// thinhv offers interrupt remapping, `keep(segment, scope)` true for the
/// scopes the OS owns. `None` only where a structure would not fit its
/// length field.
pub fn os_dmar(
    real: &Dmar,
    remapping: bool,
    keep: impl Fn(u16, &DeviceScope) -> bool,
) -> Option<Vec<u8>> {
    let mut t = header(*b"DMAR", 1);
    t.push(real.host_address_width);
    // The platform's x2APIC opt-out is kept (its firmware may not cope
    // with x2APIC); it means nothing without remapping.
    let flags = (real.flags & DMAR_DMA_CTRL_OPT_IN)
        | if remapping {
            DMAR_INTR_REMAP | (real.flags & DMAR_X2APIC_OPT_OUT)
        } else {
            0
        };
    t.push(flags);
    t.extend_from_slice(&[0; 10]);
    for d in &real.drhds {
        let scopes: Vec<&DeviceScope> = d.scopes.iter().filter(|s| keep(d.segment, s)).collect();
        let mut fixed = Vec::new();
        // Flags (INCLUDE_PCI_ALL), size 0 (one page), segment, base.
        fixed.extend_from_slice(&[d.flags & 1, 0]);
        fixed.extend_from_slice(&d.segment.to_le_bytes());
        fixed.extend_from_slice(&d.base.to_le_bytes());
        structure(0, &fixed, &scopes, &mut t)?;
    }
    for r in &real.rmrrs {
        let scopes: Vec<&DeviceScope> = r.scopes.iter().filter(|s| keep(r.segment, s)).collect();
        if scopes.is_empty() {
            continue;
        }
        let mut fixed = Vec::new();
        fixed.extend_from_slice(&[0, 0]);
        fixed.extend_from_slice(&r.segment.to_le_bytes());
        fixed.extend_from_slice(&r.base.to_le_bytes());
        fixed.extend_from_slice(&r.limit.to_le_bytes());
        structure(1, &fixed, &scopes, &mut t)?;
    }
    for h in &real.rhsas {
        let mut fixed = Vec::new();
        fixed.extend_from_slice(&[0; 4]);
        fixed.extend_from_slice(&h.base.to_le_bytes());
        fixed.extend_from_slice(&h.proximity_domain.to_le_bytes());
        structure(3, &fixed, &[], &mut t)?;
    }
    finish(t)
}

/// IVinfo: EFR images present (EFRSup, bit 0).
const IVINFO_EFR_SUP: u32 = 1;
/// IVHD flags kept: Coherent (bit 5). Not offered: HtTunEn, PassPW,
/// ResPassPW, Isoc, IotlbSup, PreFSup, PPRSup.
const IVHD_KEPT_FLAGS: u8 = 1 << 5;

fn entry4(kind: u8, id: u16, dte: u8, out: &mut Vec<u8>) {
    out.push(kind);
    out.extend_from_slice(&id.to_le_bytes());
    out.push(dte);
}

/// The runs of consecutive IDs in `start..=end` that `keep` admits.
fn runs(start: u16, end: u16, keep: &impl Fn(u16) -> bool) -> Vec<(u16, u16)> {
    let mut out: Vec<(u16, u16)> = Vec::new();
    for id in start..=end {
        if !keep(id) {
            continue;
        }
        match out.last_mut() {
            Some(r) if r.1.checked_add(1) == Some(id) => r.1 = id,
            _ => out.push((id, id)),
        }
    }
    out
}

fn ivhd_entries(
    entries: &[crate::ivrs::DeviceEntry],
    keep: &impl Fn(u16) -> bool,
    remapping: bool,
    out: &mut Vec<u8>,
) {
    use crate::ivrs::DeviceEntry as E;
    for e in entries {
        match e {
            E::All { dte } => {
                for (a, b) in runs(0, u16::MAX, keep) {
                    entry4(3, a, *dte, out);
                    entry4(4, b, 0, out);
                }
            }
            E::Select { id, dte } if keep(*id) => entry4(2, *id, *dte, out),
            E::Range { start, end, dte } => {
                for (a, b) in runs(*start, *end, keep) {
                    entry4(3, a, *dte, out);
                    entry4(4, b, 0, out);
                }
            }
            E::Alias { id, source, dte } if keep(*id) => {
                entry4(0x42, *id, *dte, out);
                out.push(0);
                out.extend_from_slice(&source.to_le_bytes());
                out.push(0);
            }
            E::AliasRange {
                start,
                end,
                source,
                dte,
            } => {
                for (a, b) in runs(*start, *end, keep) {
                    entry4(0x43, a, *dte, out);
                    out.push(0);
                    out.extend_from_slice(&source.to_le_bytes());
                    out.push(0);
                    entry4(4, b, 0, out);
                }
            }
            E::ExtSelect { id, dte, ext } if keep(*id) => {
                entry4(0x46, *id, *dte, out);
                out.extend_from_slice(&ext.to_le_bytes());
            }
            E::ExtRange {
                start,
                end,
                dte,
                ext,
            } => {
                for (a, b) in runs(*start, *end, keep) {
                    entry4(0x47, a, *dte, out);
                    out.extend_from_slice(&ext.to_le_bytes());
                    entry4(4, b, 0, out);
                }
            }
            // The I/O APICs and the HPET are the OS's, named where its
            // unit remaps interrupts (without them Linux leaves
            // remapping off).
            E::Special {
                handle,
                source,
                variety,
                dte,
            } if remapping => {
                entry4(0x48, 0, *dte, out);
                out.push(*handle);
                out.extend_from_slice(&source.to_le_bytes());
                out.push(*variety);
            }
            E::AcpiHid {
                id,
                dte,
                hid,
                cid,
                uid,
            } if keep(*id) => {
                let Ok(len) = u8::try_from(uid.len()) else {
                    continue;
                };
                entry4(0xf0, *id, *dte, out);
                out.extend_from_slice(hid);
                out.extend_from_slice(cid);
                // UID format: none, an integer (8 bytes) or a string (the
                // parser keeps the bytes, not the format).
                out.push(match uid.len() {
                    0 => 0,
                    8 => 1,
                    _ => 2,
                });
                out.push(len);
                out.extend_from_slice(uid);
            }
            // Padding, and what the OS does not own.
            _ => {}
        }
    }
}

/// The IVRS the OS sees, from the platform's `real`: one IVHD of type 11h
/// per unit (the richest block describing it, as [`crate::ivrs::Ivrs::units`]
/// picks), at the same register base, carrying `efr` as its Extended
/// Feature Register image (what [`crate::vamdvi`] offers: Linux takes
/// x2APIC support from it), with the device entries the OS owns
/// (`keep(device ID)`; ranges split around the others) and, where the
/// unit offers interrupt remapping (`remapping`), the I/O APIC and HPET
/// entries (Linux turns remapping off where an I/O APIC has none); the
/// memory definitions of all devices, and of the OS's devices (a range of
/// devices split like the device entries). `None` only where a block
/// would not fit its length field.
pub fn os_ivrs(
    real: &crate::ivrs::Ivrs,
    efr: u64,
    remapping: bool,
    keep: impl Fn(u16) -> bool,
) -> Option<Vec<u8>> {
    let mut t = header(*b"IVRS", 2);
    t.extend_from_slice(&(real.iv_info | IVINFO_EFR_SUP).to_le_bytes());
    t.extend_from_slice(&[0; 8]);
    for h in real.units() {
        let start = t.len();
        t.extend_from_slice(&[0x11, h.flags & IVHD_KEPT_FLAGS, 0, 0]);
        t.extend_from_slice(&h.device_id.to_le_bytes());
        t.extend_from_slice(&h.capability_offset.to_le_bytes());
        t.extend_from_slice(&h.base.to_le_bytes());
        t.extend_from_slice(&h.segment.to_le_bytes());
        t.extend_from_slice(&h.info.to_le_bytes());
        t.extend_from_slice(&0u32.to_le_bytes()); // attributes
        t.extend_from_slice(&efr.to_le_bytes());
        t.extend_from_slice(&[0; 8]);
        ivhd_entries(&h.entries, &keep, remapping, &mut t);
        let len = u16::try_from(t.len() - start).ok()?;
        t[start + 2..start + 4].copy_from_slice(&len.to_le_bytes());
    }
    for m in &real.ivmds {
        // 20h: every device; 21h: one device, kept if it is the OS's; 22h:
        // a range of devices, split into the OS's runs of it.
        let ranges = match m.kind {
            0x21 if !keep(m.device_id) => Vec::new(),
            0x22 => runs(m.device_id, m.aux.max(m.device_id), &keep),
            _ => alloc::vec![(m.device_id, m.aux)],
        };
        for (first, last) in ranges {
            t.extend_from_slice(&[m.kind, m.flags, 32, 0]);
            t.extend_from_slice(&first.to_le_bytes());
            t.extend_from_slice(&last.to_le_bytes());
            t.extend_from_slice(&[0; 8]);
            t.extend_from_slice(&m.start.to_le_bytes());
            t.extend_from_slice(&m.length.to_le_bytes());
        }
    }
    finish(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dmar::{self, Drhd, Rhsa, Rmrr, SCOPE_ENDPOINT, SCOPE_HPET, SCOPE_IOAPIC};

    const QEMU: &[u8] = include_bytes!("../tests/data/qemu-q35-intel-iommu.dmar");
    const QEMU_IR: &[u8] =
        include_bytes!("../tests/data/qemu-q35-intel-iommu-intremap-rootport.dmar");

    fn ep(bus: u8, dev: u8) -> DeviceScope {
        DeviceScope {
            kind: SCOPE_ENDPOINT,
            enumeration_id: 0,
            start_bus: bus,
            path: alloc::vec![(dev, 0)],
        }
    }

    #[test]
    fn qemus_dmars_come_back_as_the_os_sees_them() {
        for raw in [QEMU, QEMU_IR] {
            let real = dmar::parse(raw).unwrap();
            let os = dmar::parse(&os_dmar(&real, true, |_, _| true).unwrap()).unwrap();
            assert_eq!(os.host_address_width, real.host_address_width);
            assert_eq!(os.flags & DMAR_INTR_REMAP, DMAR_INTR_REMAP);
            assert_eq!(os.flags & DMAR_X2APIC_OPT_OUT, 0);
            assert_eq!(os.drhds.len(), real.drhds.len());
            for (o, r) in os.drhds.iter().zip(&real.drhds) {
                assert_eq!(
                    (o.base, o.segment, o.flags & 1, o.size),
                    (r.base, r.segment, r.flags & 1, 0)
                );
                assert_eq!(o.scopes, r.scopes);
            }
            assert!(os.skipped.is_empty());
            // Without remapping offered, the flag is clear.
            let plain = dmar::parse(&os_dmar(&real, false, |_, _| true).unwrap()).unwrap();
            assert_eq!(plain.flags & DMAR_INTR_REMAP, 0);
        }
    }

    #[test]
    fn the_os_sees_only_its_own_scopes_and_nothing_thinhv_does_not_offer() {
        let real = Dmar {
            host_address_width: 46,
            flags: DMAR_INTR_REMAP | DMAR_X2APIC_OPT_OUT | DMAR_DMA_CTRL_OPT_IN,
            drhds: alloc::vec![
                Drhd {
                    flags: 0,
                    size: 2,
                    segment: 0,
                    base: 0xfed9_0000,
                    scopes: alloc::vec![ep(0, 2), ep(0, 3)],
                },
                Drhd {
                    flags: 1,
                    size: 0,
                    segment: 0,
                    base: 0xfed9_1000,
                    scopes: alloc::vec![
                        DeviceScope {
                            kind: SCOPE_IOAPIC,
                            enumeration_id: 8,
                            start_bus: 0xf0,
                            path: alloc::vec![(0x1f, 0)],
                        },
                        DeviceScope {
                            kind: SCOPE_HPET,
                            enumeration_id: 0,
                            start_bus: 0xf0,
                            path: alloc::vec![(0x0f, 0)],
                        }
                    ],
                },
            ],
            rmrrs: alloc::vec![
                Rmrr {
                    segment: 0,
                    base: 0x7c00_0000,
                    limit: 0x7fff_ffff,
                    scopes: alloc::vec![ep(0, 3)],
                },
                Rmrr {
                    segment: 0,
                    base: 0x1000,
                    limit: 0x1fff,
                    scopes: alloc::vec![ep(0, 2), ep(0, 3)],
                },
            ],
            atsrs: alloc::vec![dmar::Atsr {
                flags: 1,
                segment: 0,
                scopes: alloc::vec![],
            }],
            rhsas: alloc::vec![Rhsa {
                base: 0xfed9_0000,
                proximity_domain: 1,
            }],
            satcs: alloc::vec![],
            skipped: alloc::vec![],
        };
        // 00:03.0 is an appliance's.
        let keep =
            |_: u16, s: &DeviceScope| s.path != alloc::vec![(3, 0)] || s.kind != SCOPE_ENDPOINT;
        let os = dmar::parse(&os_dmar(&real, true, keep).unwrap()).unwrap();
        assert_eq!(
            os.flags,
            DMAR_INTR_REMAP | DMAR_X2APIC_OPT_OUT | DMAR_DMA_CTRL_OPT_IN,
            "the platform's x2APIC opt-out kept"
        );
        assert_eq!(os.drhds[0].scopes, alloc::vec![ep(0, 2)]);
        assert_eq!(os.drhds[0].size, 0, "one page of registers");
        assert_eq!(os.drhds[1].scopes, real.drhds[1].scopes);
        assert!(os.drhds[1].include_pci_all());
        // The appliance's reserved region is gone; the shared one keeps
        // the OS's device only.
        assert_eq!(os.rmrrs.len(), 1);
        assert_eq!(
            (os.rmrrs[0].base, os.rmrrs[0].scopes.clone()),
            (0x1000, alloc::vec![ep(0, 2)])
        );
        assert!(os.atsrs.is_empty() && os.satcs.is_empty());
        assert_eq!(os.rhsas, real.rhsas);
        let raw = os_dmar(&real, true, keep).unwrap();
        assert_eq!(&raw[10..16], b"THINHV");
        assert_eq!(crate::acpi::checksum(&raw), 0);
    }

    const QEMU_IVRS: &[u8] = include_bytes!("../tests/data/qemu-q35-amd-iommu.ivrs");
    const QEMU_IVRS_RP: &[u8] = include_bytes!("../tests/data/qemu-q35-amd-iommu-rootport.ivrs");

    #[test]
    fn qemus_ivrs_come_back_as_the_os_sees_them_with_thinhvs_efr() {
        use crate::ivrs::{self, DeviceEntry};
        let efr = crate::vamdvi::Offer {
            host_width: 46,
            x2apic: true,
        }
        .efr();
        for raw in [QEMU_IVRS, QEMU_IVRS_RP] {
            let real = ivrs::parse(raw).unwrap();
            let os = ivrs::parse(&os_ivrs(&real, efr, true, |_| true).unwrap()).unwrap();
            assert_eq!(os.iv_info & 1, 1);
            let (ru, ou) = (real.units(), os.units());
            assert_eq!(ou.len(), ru.len());
            for (o, r) in ou.iter().zip(&ru) {
                assert_eq!(o.kind, 0x11);
                assert_eq!(o.efr, Some(efr));
                assert_eq!(
                    (o.base, o.device_id, o.segment, o.capability_offset),
                    (r.base, r.device_id, r.segment, r.capability_offset)
                );
                // Every ID the real unit covers, the OS's covers (All
                // becomes one range).
                for id in [0u16, 0x08, 0x10, 0x100, 0xffff] {
                    assert_eq!(o.covers(id), r.covers(id), "{id:#x}");
                }
                let specials = |h: &ivrs::Ivhd| {
                    h.entries
                        .iter()
                        .filter(|e| matches!(e, DeviceEntry::Special { .. }))
                        .cloned()
                        .collect::<Vec<_>>()
                };
                assert_eq!(specials(o), specials(r));
            }
            assert_eq!(os.ivmds, real.ivmds);
        }
    }

    #[test]
    fn the_os_ivrs_leaves_out_every_id_it_does_not_own() {
        use crate::ivrs::{self, DeviceEntry, Ivhd, Ivmd, Ivrs};
        let real = Ivrs {
            iv_info: 0x0020_3040,
            ivhds: alloc::vec![Ivhd {
                kind: 0x10,
                flags: 0xff,
                device_id: 2,
                capability_offset: 0x40,
                base: 0xfd20_0000,
                segment: 0,
                info: 0,
                features: 0,
                efr: None,
                entries: alloc::vec![
                    DeviceEntry::Range {
                        start: 0x08,
                        end: 0x20,
                        dte: 0
                    },
                    DeviceEntry::Select { id: 0x100, dte: 0 },
                    DeviceEntry::AliasRange {
                        start: 0x200,
                        end: 0x2ff,
                        source: 0x18,
                        dte: 0
                    },
                    DeviceEntry::Special {
                        handle: 0x20,
                        source: 0xa0,
                        variety: 1,
                        dte: 0xd7
                    },
                ],
            }],
            ivmds: alloc::vec![
                Ivmd {
                    kind: 0x21,
                    flags: 7,
                    device_id: 0x100,
                    aux: 0,
                    start: 0x1000,
                    length: 0x1000
                },
                Ivmd {
                    kind: 0x21,
                    flags: 7,
                    device_id: 0x08,
                    aux: 0,
                    start: 0x3000,
                    length: 0x1000
                },
                Ivmd {
                    kind: 0x22,
                    flags: 7,
                    device_id: 0x08,
                    aux: 0x18,
                    start: 0x5000,
                    length: 0x1000
                },
            ],
            skipped: alloc::vec![],
        };
        // The appliance has 00:02.0 (0x10), 01:00.0 (0x100) and bus 2's
        // 02:05.x.
        let keep = |id: u16| id != 0x10 && id != 0x100 && !(0x228..0x230).contains(&id);
        let os = ivrs::parse(&os_ivrs(&real, 0x44, true, keep).unwrap()).unwrap();
        let h = &os.ivhds[0];
        // Without interrupt remapping on offer, the I/O APIC and HPET
        // entries go, and nothing else.
        let bare = ivrs::parse(&os_ivrs(&real, 0x44, false, keep).unwrap()).unwrap();
        let special = |e: &DeviceEntry| matches!(e, DeviceEntry::Special { .. });
        assert!(h.entries.iter().any(special));
        assert!(!bare.ivhds[0].entries.iter().any(special));
        assert_eq!(
            bare.ivhds[0].entries,
            h.entries
                .iter()
                .filter(|e| !special(e))
                .cloned()
                .collect::<Vec<_>>()
        );
        assert_eq!(h.flags, 1 << 5, "only Coherent");
        for id in 0..=u16::MAX {
            assert_eq!(
                h.covers(id),
                real.ivhds[0].covers(id) && keep(id),
                "{id:#x}"
            );
        }
        assert!(h.entries.contains(&DeviceEntry::Range {
            start: 0x08,
            end: 0x0f,
            dte: 0
        }));
        assert!(h.entries.contains(&DeviceEntry::Range {
            start: 0x11,
            end: 0x20,
            dte: 0
        }));
        assert!(h.entries.contains(&DeviceEntry::AliasRange {
            start: 0x230,
            end: 0x2ff,
            source: 0x18,
            dte: 0
        }));
        assert!(h.entries.contains(&real.ivhds[0].entries[3]));
        let range = |first, last| Ivmd {
            device_id: first,
            aux: last,
            ..real.ivmds[2]
        };
        assert_eq!(
            os.ivmds,
            alloc::vec![real.ivmds[1], range(0x08, 0x0f), range(0x11, 0x18)]
        );
    }
}
