//! From the ACPI IOMMU tables to the core's hand-off: which units, which
//! memory must stay mapped for devices, and what to tell the admin.
use alloc::format;
use alloc::string::String;
use thinhv_abi::PhysRange;
use thinhv_abi::handoff::{
    IOMMU_KIND_AMDVI, IOMMU_KIND_VTD, IOMMU_MODE_PROTECT, IommuHandoff, IommuUnit,
    MAX_IOMMU_RESERVED, MAX_IOMMUS,
};
use thinhv_passthrough::dmar::Dmar;
use thinhv_passthrough::ivrs::Ivrs;

/// Bytes of an AMD-Vi register window thinhv hides from the guest (the
/// registers it uses end below 0x2028).
pub const AMDVI_WINDOW: u64 = 0x4000;

/// Requester IDs an AMD-Vi device table covers when the highest bus found
/// is `max_bus`: every bus up to it, at least 16 (room for buses that
/// appear later), at most 256.
pub fn amdvi_device_ids(max_bus: u8) -> u32 {
    (u32::from(max_bus) + 1).clamp(16, 256) * 256
}

/// The hand-off for an AMD-Vi platform in protect mode.
pub fn amdvi(r: &Ivrs, max_bus: u8) -> Result<IommuHandoff, String> {
    let units = r.units();
    if units.is_empty() {
        return Err("the IVRS lists no IOMMU".into());
    }
    if units.len() > MAX_IOMMUS {
        return Err(format!(
            "the IVRS lists {} IOMMUs; thinhv handles {MAX_IOMMUS}",
            units.len()
        ));
    }
    if let Some(u) = units.iter().find(|u| u.segment != 0) {
        return Err(format!(
            "an IOMMU ({:#x}) serves PCI segment {}; thinhv handles segment 0 only",
            u.base, u.segment
        ));
    }
    // Unity and exclusion ranges alike stay mapped 1:1 for devices (an
    // exclusion range is never programmed as one: see `ivrs::Ivmd`).
    let unity: alloc::vec::Vec<_> = r
        .ivmds
        .iter()
        .filter(|m| m.needs_identity() && m.length > 0)
        .collect();
    if unity.len() > MAX_IOMMU_RESERVED {
        return Err(format!(
            "the IVRS lists {} unity-mapped or exclusion ranges; thinhv handles {MAX_IOMMU_RESERVED}",
            unity.len()
        ));
    }
    let mut h = IommuHandoff {
        mode: IOMMU_MODE_PROTECT,
        kind: IOMMU_KIND_AMDVI,
        device_ids: amdvi_device_ids(max_bus),
        ..IommuHandoff::default()
    };
    for (slot, u) in h.units.iter_mut().zip(&units) {
        *slot = IommuUnit {
            base: u.base,
            size: AMDVI_WINDOW,
            segment: u.segment,
            reserved: [0; 3],
        };
    }
    h.count = u32::try_from(units.len()).unwrap_or(0);
    for (slot, m) in h.reserved_ranges.iter_mut().zip(&unity) {
        *slot = PhysRange::new(m.start, m.length);
    }
    h.reserved_count = u32::try_from(unity.len()).unwrap_or(0);
    Ok(h)
}

/// Whether thinhv takes the IOMMU under `mode`, and what to tell the admin
/// when `auto` leaves it to the OS: processors with APIC IDs above 254
/// need the OS's interrupt remapping, which needs the IOMMU.
pub fn take(
    mode: thinhv_config::IommuMode,
    max_apic_id: u32,
    iommu_present: bool,
) -> (bool, Option<&'static str>) {
    use thinhv_config::IommuMode;
    match mode {
        IommuMode::Off => (false, None),
        IommuMode::Auto if max_apic_id > 254 && iommu_present => (
            false,
            Some(
                "processors with APIC IDs above 254 need the OS's interrupt remapping; leaving the IOMMU to the OS ([iommu] mode = \"protect\" takes it anyway)",
            ),
        ),
        IommuMode::Protect | IommuMode::Auto => (true, None),
    }
}

/// What the firmware's DMAR (preferred) or IVRS describes: the hand-off
/// (mode `protect`; the caller lowers it) or why it cannot be used, and
/// notes on structures the parsers skipped. `None` when neither table is
/// there.
pub fn from_tables(
    dmar: Option<&[u8]>,
    ivrs: Option<&[u8]>,
    max_bus: u8,
) -> Option<(Result<IommuHandoff, String>, alloc::vec::Vec<String>)> {
    let mut notes = alloc::vec::Vec::new();
    let plan = if let Some(bytes) = dmar {
        thinhv_passthrough::dmar::parse(bytes)
            .map_err(|e| format!("the DMAR table is malformed ({e})"))
            .and_then(|d| {
                for s in &d.skipped {
                    notes.push(format!(
                        "DMAR structure type {} at offset {:#x} skipped",
                        s.kind, s.offset
                    ));
                }
                vtd(&d)
            })
    } else {
        thinhv_passthrough::ivrs::parse(ivrs?)
            .map_err(|e| format!("the IVRS table is malformed ({e})"))
            .and_then(|r| {
                for s in &r.skipped {
                    notes.push(format!(
                        "IVRS block type {:#x} at offset {:#x} skipped",
                        s.kind, s.offset
                    ));
                }
                amdvi(&r, max_bus)
            })
    };
    Some((plan, notes))
}

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

/// Interrupt sources the DMAR names outside PCI: each I/O APIC's source
/// ID by its I/O APIC ID, and how many MSI-capable HPETs there are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IrqSources {
    /// (I/O APIC ID, source ID), from the I/O APIC device scopes whose
    /// path is one hop (an I/O APIC behind a bridge is left out).
    pub ioapics: alloc::vec::Vec<(u8, u16)>,
    /// HPET device scopes: HPETs that can send MSIs.
    pub hpets: usize,
}

impl IrqSources {
    /// The source ID of the I/O APIC with ID `id`.
    pub fn ioapic(&self, id: u8) -> Option<u16> {
        self.ioapics
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, sid)| *sid)
    }
}

/// The DMAR's I/O APIC and HPET device scopes, over every unit.
pub fn irq_sources(d: &Dmar) -> IrqSources {
    use thinhv_passthrough::dmar::{SCOPE_HPET, SCOPE_IOAPIC};
    let mut out = IrqSources::default();
    for s in d.drhds.iter().flat_map(|u| u.scopes.iter()) {
        match (s.kind, s.path.as_slice()) {
            (SCOPE_IOAPIC, &[(dev, func)]) => out.ioapics.push((
                s.enumeration_id,
                u16::from(s.start_bus) << 8 | u16::from(dev & 0x1f) << 3 | u16::from(func & 7),
            )),
            (SCOPE_HPET, _) => out.hpets += 1,
            _ => {}
        }
    }
    out
}

/// Interrupt sources the IVRS names outside PCI: each I/O APIC's device
/// ID by its I/O APIC ID (special device entries, variety 1), and how
/// many HPETs (variety 2), over every unit.
pub fn irq_sources_ivrs(r: &Ivrs) -> IrqSources {
    use thinhv_passthrough::ivrs::DeviceEntry;
    let mut out = IrqSources::default();
    for e in r.units().iter().flat_map(|u| u.entries.iter()) {
        if let DeviceEntry::Special {
            handle,
            source,
            variety,
            ..
        } = *e
        {
            match variety {
                1 if out.ioapic(handle).is_none() => out.ioapics.push((handle, source)),
                2 => out.hpets += 1,
                _ => {}
            }
        }
    }
    out
}

/// Where an OS function's messages come from, as the IOMMU sees them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsiSource {
    /// Its own requester ID (no conventional bridge above it).
    Own,
    /// A requester ID on the buses `first..=last` below `bridge`, the
    /// topmost PCI Express to PCI/PCI-X bridge above it: its secondary
    /// bus with device and function 0, or from PCI-X the function's own.
    Buses {
        /// The bridge.
        bridge: thinhv_passthrough::pci::Bdf,
        /// Its secondary bus.
        first: u8,
        /// Its subordinate bus.
        last: u8,
    },
    /// AMD-Vi: an ID of the topmost conventional bridge above it, or one
    /// on its buses `first..=last` (an alias), every function there the
    /// OS's: remapped through one table those IDs share
    /// ([`shared_ids`], [`add_shared`]).
    Shared {
        /// The bridge.
        bridge: thinhv_passthrough::pci::Bdf,
        /// Its secondary bus.
        first: u8,
        /// Its subordinate bus.
        last: u8,
    },
}

/// Where `f`'s messages come from, or why its remapping entries could
/// not check it (`Err`). `conventional(b)`: `Some(true)` for a PCI Express
/// to PCI/PCI-X bridge, `Some(false)` for another PCI Express function,
/// `None` for one without a PCI Express capability. `not_os(g)`: `g` is
/// not the OS's (an appliance's or hidden). Only VT-d (`vtd`) entries can
/// check a range of buses (SVT 10b); a bridge without PCI Express puts
/// its own ID on the bus above, shared with everything there. On AMD-Vi
/// such a function is [`MsiSource::Shared`] where everything below the
/// bridge is the OS's.
pub fn msi_source(
    f: &thinhv_passthrough::pci::Function,
    functions: &[thinhv_passthrough::pci::Function],
    conventional: impl Fn(&thinhv_passthrough::pci::Function) -> Option<bool>,
    not_os: impl Fn(&thinhv_passthrough::pci::Function) -> bool,
    vtd: bool,
) -> Result<MsiSource, String> {
    let above = |b: &&thinhv_passthrough::pci::Function| {
        b.bdf.segment == f.bdf.segment
            && b.bridge_buses
                .is_some_and(|(sec, sub)| (sec..=sub).contains(&f.bdf.bus))
    };
    // The topmost bridge with a conventional secondary side: the one
    // whose buses include the others'.
    let Some(b) = functions
        .iter()
        .filter(above)
        .filter(|b| conventional(b) != Some(false))
        .min_by_key(|b| b.bridge_buses.map_or(0, |(sec, _)| sec))
    else {
        return Ok(MsiSource::Own);
    };
    if !vtd {
        let Some((first, last)) = b.bridge_buses else {
            return Err(format!("behind the bridge {} without buses", b.bdf));
        };
        if let Some(other) = functions.iter().find(|g| {
            g.bdf.segment == f.bdf.segment && (first..=last).contains(&g.bdf.bus) && not_os(g)
        }) {
            return Err(format!(
                "behind the conventional PCI bridge {} with {}, which is not the OS's (their messages carry the same IDs)",
                b.bdf, other.bdf
            ));
        }
        return Ok(MsiSource::Shared {
            bridge: b.bdf,
            first,
            last,
        });
    }
    if conventional(b).is_none() {
        return Err(format!(
            "behind the PCI bridge {} without PCI Express (its messages carry that bridge's own ID)",
            b.bdf
        ));
    }
    let Some((first, last)) = b.bridge_buses else {
        return Err(format!("behind the bridge {} without buses", b.bdf));
    };
    if let Some(other) = functions.iter().find(|g| {
        g.bdf.segment == f.bdf.segment && (first..=last).contains(&g.bdf.bus) && not_os(g)
    }) {
        return Err(format!(
            "behind the PCI Express to PCI bridge {} with {}, which is not the OS's (their messages carry the same IDs)",
            b.bdf, other.bdf
        ));
    }
    Ok(MsiSource::Buses {
        bridge: b.bdf,
        first,
        last,
    })
}

/// The IDs a function behind the conventional bridge `bridge` (its buses
/// `first..=last`) may send with ([`MsiSource::Shared`]), in this order:
/// the bridge's own, every ID on those buses (its secondary bus with
/// device and function 0 among them), then each ID the IVRS says any of
/// them sends with instead, and each range of IDs it says send with one
/// of them (`aliases`: its alias entries, device IDs `start..=end`
/// carrying `source`). Everything past the first two the caller checks
/// is the OS's.
pub fn shared_ids(
    bridge: u16,
    first: u8,
    last: u8,
    aliases: &[(u16, u16, u16)],
) -> alloc::vec::Vec<thinhv_abi::handoff::RidRange> {
    use thinhv_abi::handoff::RidRange;
    let below = RidRange {
        first: u16::from(first) << 8,
        last: u16::from(last) << 8 | 0xff,
    };
    let mut out = alloc::vec![
        RidRange {
            first: bridge,
            last: bridge
        },
        below
    ];
    let within = |out: &[RidRange], id: u16| out.iter().any(|r| (r.first..=r.last).contains(&id));
    // Until nothing changes: an ID added can bring in another's alias.
    loop {
        let n = out.len();
        for &(start, end, source) in aliases {
            let touches = out.iter().any(|r| start <= r.last && end >= r.first);
            if touches && !within(&out, source) {
                out.push(RidRange {
                    first: source,
                    last: source,
                });
            } else if within(&out, source) && !(start..=end).all(|id| within(&out, id)) {
                out.push(RidRange {
                    first: start,
                    last: end,
                });
            }
        }
        if out.len() == n {
            return out;
        }
    }
}

/// The IVRS's alias entries as (first device ID, last, the ID their
/// requests carry), over every unit.
pub fn ivrs_aliases(r: &Ivrs) -> alloc::vec::Vec<(u16, u16, u16)> {
    use thinhv_passthrough::ivrs::DeviceEntry;
    r.units()
        .iter()
        .flat_map(|u| u.entries.iter())
        .filter_map(|e| match *e {
            DeviceEntry::Alias { id, source, .. } => Some((id, id, source)),
            DeviceEntry::AliasRange {
                start, end, source, ..
            } => Some((start, end, source)),
            _ => None,
        })
        .collect()
}

/// The shared table of `h` whose IDs are `ids` ([`MsiSource::Shared`]):
/// the one that has exactly those (another function behind the same
/// bridge), else a new one. `None` where `ids` overlap another table's,
/// or where no table or range is left (then nothing is added).
pub fn add_shared(
    h: &mut thinhv_abi::handoff::IommuHandoff,
    ids: &[thinhv_abi::handoff::RidRange],
) -> Option<u8> {
    use thinhv_abi::handoff::{MAX_SHARED_IDS, MAX_SHARED_TABLES, SharedIds};
    let same = |t: u8| {
        let mine: alloc::vec::Vec<_> = h
            .shared()
            .iter()
            .filter(|r| r.table == t)
            .map(|r| (r.first, r.last))
            .collect();
        mine.len() == ids.len() && ids.iter().all(|r| mine.contains(&(r.first, r.last)))
    };
    if let Some(t) = h.shared().iter().map(|r| r.table).find(|&t| same(t)) {
        return Some(t);
    }
    let overlaps = h
        .shared()
        .iter()
        .any(|s| ids.iter().any(|r| r.first <= s.last && r.last >= s.first));
    let n = h.shared().len();
    let table = h.shared().iter().map(|r| r.table + 1).max().unwrap_or(0);
    if overlaps || usize::from(table) >= MAX_SHARED_TABLES || n + ids.len() > MAX_SHARED_IDS {
        return None;
    }
    for (k, r) in ids.iter().enumerate() {
        h.shared[n + k] = SharedIds {
            first: r.first,
            last: r.last,
            table,
            ..Default::default()
        };
    }
    // At most MAX_SHARED_IDS (checked above).
    h.shared_count = u32::try_from(n + ids.len()).unwrap_or(0);
    Some(table)
}

/// Why not every interrupt source of the OS's sends through an entry
/// thinhv writes, one reason per kind of source left out (empty where
/// every one does): `functions` of its MSI or MSI-X functions not
/// remapped, `vf_pfs` SR-IOV PFs on which it can create virtual functions,
/// `ioapics` I/O APICs not judged or without a known source ID, and HPETs
/// that can send MSIs: the table's (`sources`: `None` without a DMAR or
/// IVRS to name them) beyond the `hpets_guarded` whose FSB delivery thinhv
/// withholds, or the `hpets_left` the firmware's HPET tables give that it
/// does not, whichever is more.
pub fn unremapped_sources(
    functions: usize,
    vf_pfs: usize,
    ioapics: usize,
    hpets: (usize, usize),
    sources: Option<&IrqSources>,
) -> alloc::vec::Vec<String> {
    let (hpets_guarded, hpets_left) = hpets;
    let mut why = alloc::vec::Vec::new();
    if functions > 0 {
        why.push(format!("{functions} function(s) of the OS's not remapped"));
    }
    if vf_pfs > 0 {
        why.push(format!(
            "{vf_pfs} SR-IOV PF(s) on which the OS can create virtual functions"
        ));
    }
    if ioapics > 0 {
        why.push(format!(
            "{ioapics} I/O APIC(s) not judged or without a source ID in the DMAR or IVRS"
        ));
    }
    let table_hpets = sources.map_or(0, |s| s.hpets.saturating_sub(hpets_guarded));
    let hpets = table_hpets.max(hpets_left);
    if sources.is_none() {
        why.push(String::from(
            "no DMAR or IVRS to name the I/O APICs' source IDs",
        ));
    }
    if hpets > 0 {
        why.push(format!(
            "{hpets} HPET(s) that can send MSIs, whose FSB delivery thinhv does not withhold"
        ));
    }
    why
}

/// A line describing the units, for the boot console.
pub fn describe(h: &IommuHandoff) -> String {
    use core::fmt::Write;
    let kind = if h.kind == IOMMU_KIND_AMDVI {
        "AMD-Vi IOMMU(s)"
    } else {
        "VT-d unit(s)"
    };
    let mut s = format!("{} {kind} at", h.count);
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

    fn fun(bus: u8, dev: u8, buses: Option<(u8, u8)>) -> thinhv_passthrough::pci::Function {
        thinhv_passthrough::pci::Function {
            bdf: thinhv_passthrough::pci::Bdf {
                segment: 0,
                bus,
                device: dev,
                function: 0,
            },
            bridge_buses: buses,
            ..Default::default()
        }
    }

    #[test]
    fn a_function_behind_a_pcie_to_pci_bridge_is_checked_by_the_buses_below_the_topmost() {
        // Root port 00:1c.0 (buses 1-4) > PCI Express to PCI bridge 01:00.0
        // (buses 2-4) > conventional bridge 02:01.0 (buses 3-3) > the
        // function 03:02.0; and 00:05.0 on the root bus.
        let fs = [
            fun(0, 0x1c, Some((1, 4))),
            fun(1, 0, Some((2, 4))),
            fun(2, 1, Some((3, 3))),
            fun(3, 2, None),
            fun(0, 5, None),
        ];
        let kind = |g: &thinhv_passthrough::pci::Function| match (g.bdf.bus, g.bdf.device) {
            (1, 0) => Some(true),
            (2, 1) => None,
            _ => Some(false),
        };
        let os = |_: &thinhv_passthrough::pci::Function| false;
        assert_eq!(
            msi_source(&fs[3], &fs, kind, os, true),
            Ok(MsiSource::Buses {
                bridge: fs[1].bdf,
                first: 2,
                last: 4
            })
        );
        assert_eq!(msi_source(&fs[4], &fs, kind, os, true), Ok(MsiSource::Own));
        // A root port alone is no conventional bridge.
        assert_eq!(msi_source(&fs[1], &fs, kind, os, true), Ok(MsiSource::Own));
        // AMD-Vi: the IDs the bridge's side may send with share one table,
        // whatever the bridge's kind; not where another owner's function
        // sits below.
        let legacy_top = |g: &thinhv_passthrough::pci::Function| match (g.bdf.bus, g.bdf.device) {
            (1, 0) | (2, 1) => None,
            _ => Some(false),
        };
        for k in [
            &kind as &dyn Fn(&thinhv_passthrough::pci::Function) -> Option<bool>,
            &legacy_top,
        ] {
            assert_eq!(
                msi_source(&fs[3], &fs, k, os, false),
                Ok(MsiSource::Shared {
                    bridge: fs[1].bdf,
                    first: 2,
                    last: 4
                })
            );
        }
        assert_eq!(msi_source(&fs[4], &fs, kind, os, false), Ok(MsiSource::Own));
        let hidden_below =
            |g: &thinhv_passthrough::pci::Function| g.bdf.bus == 2 && g.bdf.device == 1;
        assert!(
            msi_source(&fs[3], &fs, kind, hidden_below, false)
                .unwrap_err()
                .contains(
                    "conventional PCI bridge 0000:01:00.0 with 0000:02:01.0, which is not the OS's"
                )
        );
        // Another owner's function below the bridge sends the same IDs.
        let hidden = |g: &thinhv_passthrough::pci::Function| g.bdf.bus == 2 && g.bdf.device == 1;
        assert!(
            msi_source(&fs[3], &fs, kind, hidden, true)
                .unwrap_err()
                .contains("with 0000:02:01.0, which is not the OS's")
        );
        // A topmost bridge without PCI Express: its own ID, on the bus
        // above, shared with everything there.
        let legacy = |g: &thinhv_passthrough::pci::Function| match (g.bdf.bus, g.bdf.device) {
            (1, 0) | (2, 1) => None,
            _ => Some(false),
        };
        assert!(
            msi_source(&fs[3], &fs, legacy, os, true)
                .unwrap_err()
                .contains("without PCI Express")
        );
    }

    #[test]
    fn a_conventional_bridges_ids_are_shared_with_the_aliases_the_ivrs_gives() {
        use thinhv_abi::handoff::RidRange;
        let r = |first, last| RidRange { first, last };
        // Bridge 00:0a.0 (0x0050), buses 1-2; the IVRS aliases 01:00.0-
        // 01:1f.7 to 00:0a.0 (already in), 02:03.0 to 03:00.0, 03:00.0's
        // neighbours 03:00.1-03:00.7 to 03:00.0 (which is in by then),
        // 05:00.0 (elsewhere) to 06:00.0, and 07:00.0-07:00.3 to 01:05.0.
        let aliases = [
            (0x0100, 0x01ff, 0x0050),
            (0x0301, 0x0307, 0x0300),
            (0x0218, 0x0218, 0x0300),
            (0x0500, 0x0500, 0x0600),
            (0x0700, 0x0703, 0x0128),
        ];
        assert_eq!(
            shared_ids(0x0050, 1, 2, &aliases),
            [
                r(0x0050, 0x0050),
                r(0x0100, 0x02ff),
                r(0x0300, 0x0300),
                r(0x0700, 0x0703),
                r(0x0301, 0x0307)
            ]
        );
        assert_eq!(
            shared_ids(0x0050, 1, 1, &[]),
            [r(0x0050, 0x0050), r(0x0100, 0x01ff)]
        );
    }

    #[test]
    fn qemus_ivrs_has_no_aliases() {
        let bytes = include_bytes!("../../passthrough/tests/data/qemu-q35-amd-iommu.ivrs");
        let r = thinhv_passthrough::ivrs::parse(bytes).unwrap();
        assert_eq!(ivrs_aliases(&r), []);
    }

    #[test]
    fn a_bridges_ids_get_one_table_once_and_tables_never_overlap() {
        use thinhv_abi::handoff::{IommuHandoff, MAX_SHARED_IDS, MAX_SHARED_TABLES, RidRange};
        let r = |first, last| RidRange { first, last };
        let mut h = IommuHandoff::default();
        let a = [r(0x0048, 0x0048), r(0x0100, 0x01ff)];
        assert_eq!(add_shared(&mut h, &a), Some(0));
        // A second function behind the same bridge adds nothing.
        assert_eq!(add_shared(&mut h, &a), Some(0));
        assert_eq!(h.shared().len(), 2);
        assert_eq!(h.shared_table_of(0x0048), Some(0));
        assert_eq!(h.shared_table_of(0x0180), Some(0));
        assert_eq!(h.shared_table_of(0x0200), None);
        // IDs that overlap another table's: none added.
        assert_eq!(
            add_shared(&mut h, &[r(0x0050, 0x0050), r(0x01f0, 0x02ff)]),
            None
        );
        assert_eq!(h.shared().len(), 2);
        for k in 1..u16::try_from(MAX_SHARED_TABLES).unwrap() {
            assert_eq!(
                add_shared(&mut h, &[r(k, k), r(k << 8 | 0x1000, k << 8 | 0x10ff)]),
                Some(u8::try_from(k).unwrap())
            );
        }
        assert_eq!(h.shared().len(), MAX_SHARED_IDS);
        // No table left.
        assert_eq!(add_shared(&mut h, &[r(0x50, 0x50)]), None);
        assert_eq!(h.shared().len(), MAX_SHARED_IDS, "none added");
        assert!(
            h.shared()
                .iter()
                .all(|s| usize::from(s.table) < MAX_SHARED_TABLES)
        );
    }

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
    fn the_dmar_names_the_io_apic_source_and_msi_capable_hpets() {
        use thinhv_passthrough::dmar::{DeviceScope, SCOPE_HPET, SCOPE_IOAPIC};
        let bytes = include_bytes!("../../passthrough/tests/data/qemu-q35-intel-iommu.dmar");
        let mut d = thinhv_passthrough::dmar::parse(bytes).unwrap();
        let s = irq_sources(&d);
        assert_eq!(s.ioapics, [(0, 0xff00)], "QEMU's I/O APIC: bus 0xff, 00.0");
        assert_eq!((s.ioapic(0), s.ioapic(1), s.hpets), (Some(0xff00), None, 0));
        let scope = |kind, id, bus, path: &[(u8, u8)]| DeviceScope {
            kind,
            enumeration_id: id,
            start_bus: bus,
            path: path.to_vec(),
        };
        d.drhds[0].scopes.extend([
            scope(SCOPE_IOAPIC, 8, 0xf0, &[(0x1f, 7)]),
            scope(SCOPE_IOAPIC, 9, 0, &[(1, 0), (0, 0)]),
            scope(SCOPE_HPET, 0, 0, &[(0x1f, 0)]),
        ]);
        let s = irq_sources(&d);
        assert_eq!(s.ioapic(8), Some(0xf0ff));
        assert_eq!(s.ioapic(9), None, "behind a bridge: not known");
        assert_eq!(s.hpets, 1);
    }

    #[test]
    fn the_ivrs_names_the_io_apic_device_id_and_the_hpets() {
        let bytes = include_bytes!("../../passthrough/tests/data/qemu-q35-amd-iommu.ivrs");
        let r = thinhv_passthrough::ivrs::parse(bytes).unwrap();
        let s = irq_sources_ivrs(&r);
        assert_eq!(s.ioapic(0), Some(0x00a0), "QEMU's I/O APIC: 00:14.0");
        assert_eq!(s.hpets, 0);
    }

    #[test]
    fn every_source_left_out_is_named() {
        let qemu = IrqSources {
            ioapics: alloc::vec![(0, 0xff00)],
            hpets: 0,
        };
        assert!(unremapped_sources(0, 0, 0, (0, 0), Some(&qemu)).is_empty());
        let hpet = IrqSources {
            hpets: 1,
            ..qemu.clone()
        };
        let why = unremapped_sources(2, 1, 1, (0, 0), Some(&hpet));
        assert_eq!(
            why,
            [
                "2 function(s) of the OS's not remapped",
                "1 SR-IOV PF(s) on which the OS can create virtual functions",
                "1 I/O APIC(s) not judged or without a source ID in the DMAR or IVRS",
                "1 HPET(s) that can send MSIs, whose FSB delivery thinhv does not withhold",
            ]
        );
        // The DMAR's HPET guarded: nothing left; a second one, or an HPET
        // table thinhv cannot guard, is.
        assert!(unremapped_sources(0, 0, 0, (1, 0), Some(&hpet)).is_empty());
        let two = IrqSources {
            hpets: 2,
            ..qemu.clone()
        };
        assert_eq!(
            unremapped_sources(0, 0, 0, (1, 0), Some(&two)),
            ["1 HPET(s) that can send MSIs, whose FSB delivery thinhv does not withhold"]
        );
        assert_eq!(
            unremapped_sources(0, 0, 0, (1, 1), Some(&qemu)),
            ["1 HPET(s) that can send MSIs, whose FSB delivery thinhv does not withhold"]
        );
        assert_eq!(
            unremapped_sources(0, 0, 0, (0, 0), None),
            ["no DMAR or IVRS to name the I/O APICs' source IDs"]
        );
    }

    #[test]
    fn either_table_gives_the_plan() {
        let dmar = include_bytes!("../../passthrough/tests/data/qemu-q35-intel-iommu.dmar");
        let ivrs = include_bytes!("../../passthrough/tests/data/qemu-q35-amd-iommu.ivrs");
        assert!(from_tables(None, None, 0).is_none());
        let (h, notes) = from_tables(Some(dmar), Some(ivrs), 0).unwrap();
        assert_eq!(h.unwrap().kind, IOMMU_KIND_VTD, "the DMAR first");
        assert!(notes.is_empty());
        let (h, _) = from_tables(None, Some(ivrs), 0).unwrap();
        assert_eq!(h.unwrap().kind, IOMMU_KIND_AMDVI);
        let mut bad = dmar.to_vec();
        bad[40] ^= 1;
        let (h, _) = from_tables(Some(&bad), None, 0).unwrap();
        assert!(h.unwrap_err().starts_with("the DMAR table is malformed"));
    }

    #[test]
    fn auto_takes_the_iommu_unless_x2apic_ids_need_it() {
        use thinhv_config::IommuMode;
        assert_eq!(take(IommuMode::Auto, 3, true), (true, None));
        let (t, why) = take(IommuMode::Auto, 300, true);
        assert!(!t && why.unwrap().contains("above 254"));
        assert_eq!(take(IommuMode::Protect, 300, true), (true, None));
        assert_eq!(take(IommuMode::Off, 0, true), (false, None));
    }

    #[test]
    fn qemu_ivrs_becomes_one_iommu() {
        let bytes = include_bytes!("../../passthrough/tests/data/qemu-q35-amd-iommu.ivrs");
        let r = thinhv_passthrough::ivrs::parse(bytes).unwrap();
        let h = amdvi(&r, 1).unwrap();
        assert_eq!((h.count, h.units[0].base), (1, 0xfed8_0000));
        assert_eq!(h.device_ids, 16 * 256);
        assert_eq!(describe(&h), "1 AMD-Vi IOMMU(s) at 0xfed80000");
        assert_eq!(amdvi_device_ids(255), 65536);
    }

    #[test]
    fn unity_and_exclusion_ranges_stay_mapped_for_devices() {
        use thinhv_passthrough::ivrs::{Ivhd, Ivmd, Ivrs};
        let ivmd = |flags, start| Ivmd {
            kind: 0x20,
            flags,
            device_id: 0,
            aux: 0,
            start,
            length: 0x1000,
        };
        let r = Ivrs {
            ivhds: alloc::vec![Ivhd {
                kind: 0x11,
                flags: 0,
                device_id: 0x10,
                capability_offset: 0x40,
                base: 0xfed8_0000,
                segment: 0,
                info: 0,
                features: 0,
                efr: Some(0),
                entries: alloc::vec![],
            }],
            ivmds: alloc::vec![
                ivmd(0b0111, 0xdc00_0000),
                ivmd(0b1000, 0xdd00_0000),
                ivmd(0b0110, 0xde00_0000)
            ],
            ..Ivrs::default()
        };
        let h = amdvi(&r, 0).unwrap();
        assert_eq!(
            h.reserved_ranges(),
            [
                PhysRange::new(0xdc00_0000, 0x1000),
                PhysRange::new(0xdd00_0000, 0x1000)
            ]
        );
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
