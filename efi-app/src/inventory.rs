//! The device inventory and PCI ownership: functions found through ECAM,
//! the `[[device]]`/`[[sriov]]` policy applied to them, as records for the
//! status page, the hand-off for the core (mediated functions, blocked
//! requesters) and the boot report. Pure: the loader does the I/O.
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;
use thinhv_abi::handoff::{
    MAX_PCI_BLOCKED, MAX_PCI_MEDIATED, PCI_ACTION_HIDE, PCI_ACTION_VF_BUDGET, PciHandoff,
    PciMediation, RidRange,
};
use thinhv_abi::status::{
    BarRecord, DEV_FLAG_PCIE, DEV_FLAG_SRIOV, DEV_FLAG_VFS_ENABLED, DeviceRecord,
    IOMMU_DOMAIN_BLOCKED, IOMMU_DOMAIN_OS, MAX_DEVICES, OWNER_HIDDEN, OWNER_OS, VF_SPACE_FITS,
    VF_SPACE_NO_ROOM, VF_SPACE_NONE, VF_SPACE_ROOT_BUS, VF_SPACE_UNASSIGNED, class_name,
};
use thinhv_passthrough::bars::{VfSpace, check_vf_space, parent_of, vf_bar_space};
use thinhv_passthrough::pci::{EcamRegion, Function, Kind};
use thinhv_passthrough::policy::{self, Decision, DeviceRule, Owner, Plan, Reach, SriovRule};

/// The `[[device]]` and `[[sriov]]` tables of `config` as the policy takes
/// them (the loader applies them; `thinhv check` checks their syntax).
pub fn rules(config: &thinhv_config::Config) -> (Vec<DeviceRule>, Vec<SriovRule>) {
    let devices = config
        .device
        .iter()
        .map(|r| DeviceRule {
            matcher: r.matcher.clone(),
            owner: r.owner.clone(),
            line: r.line,
            bridge_ok: false,
        })
        .collect();
    let sriov = config
        .sriov
        .iter()
        .map(|r| SriovRule {
            device: r.device.clone(),
            os_vfs: r.os_vfs,
            line: r.line,
        })
        .collect();
    (devices, sriov)
}

/// The functions with the policy's decisions.
#[derive(Clone, Debug, Default)]
pub struct Inventory {
    /// Every function found.
    pub functions: Vec<Function>,
    /// One decision per function, and the rules' problems.
    pub plan: Plan,
    /// Whether the IOMMU will protect (hidden functions get no DMA).
    pub iommu: bool,
    /// How many of the rules came from `[[device]]` tables; the loader's
    /// own, for the appliances' functions and the bridges above them,
    /// follow (`None`: all are the configuration's).
    pub config_rules: Option<usize>,
}

/// What the core can mediate on this machine: the ECAM region of segment
/// 0 (the one [`Inventory::handoff`] is given), the core's map for a
/// memory map ending at `phys_top`, and the hand-off's capacity.
pub fn reach(segment0: Option<&EcamRegion>, phys_top: u64) -> Reach {
    Reach {
        region: segment0.copied(),
        map_top: thinhv_abi::handoff::identity_map_top(phys_top),
        max_mediated: MAX_PCI_MEDIATED,
        max_blocked: MAX_PCI_BLOCKED,
    }
}

impl Inventory {
    /// Applies the rules to the functions; what the core could not enforce
    /// (`reach`) stays with the OS and is reported as a rule problem.
    pub fn assess(
        functions: Vec<Function>,
        devices: &[DeviceRule],
        sriov: &[SriovRule],
        boot_device: Option<thinhv_passthrough::pci::Bdf>,
        iommu: bool,
        reach: &Reach,
    ) -> Self {
        let plan = policy::resolve(&functions, devices, sriov, boot_device, reach);
        Self {
            functions,
            plan,
            iommu,
            config_rules: None,
        }
    }

    fn decision(&self, i: usize) -> Decision {
        self.plan.decisions.get(i).copied().unwrap_or_default()
    }

    /// VFs the OS may create on function `i` (TotalVFs without a budget).
    /// None for a hidden function.
    pub fn os_vfs(&self, i: usize) -> u16 {
        let d = self.decision(i);
        match self.functions[i].sriov {
            Some(s) if d.owner == Owner::Os => d.os_vfs.unwrap_or(s.total_vfs),
            _ => 0,
        }
    }

    /// The VF BAR space check for the VFs the OS may create.
    pub fn vf_space(&self, i: usize) -> VfSpace {
        let f = &self.functions[i];
        check_vf_space(f, parent_of(&self.functions, f.bdf), self.os_vfs(i))
    }

    /// The status-page record of function `i`.
    pub fn record(&self, i: usize) -> DeviceRecord {
        let f = &self.functions[i];
        let d = self.decision(i);
        let mut flags = 0;
        if f.is_pcie() {
            flags |= DEV_FLAG_PCIE;
        }
        let (total, vf_dev, num) = match &f.sriov {
            Some(s) => {
                flags |= DEV_FLAG_SRIOV;
                if s.vfs_enabled() {
                    flags |= DEV_FLAG_VFS_ENABLED;
                }
                (s.total_vfs, s.vf_device_id, s.num_vfs)
            }
            None => (0, 0, 0),
        };
        let mut bars = [BarRecord::default(); 6];
        for b in &f.bars {
            if let Some(r) = bars.get_mut(usize::from(b.index)) {
                *r = BarRecord {
                    base: b.base | b.flag_bits(),
                    size: b.size,
                };
            }
        }
        let hidden = d.owner == Owner::Hidden;
        DeviceRecord {
            segment: f.bdf.segment,
            bus: f.bdf.bus,
            devfn: f.bdf.devfn(),
            vendor: f.vendor,
            device: f.device,
            class_rev: f.class_rev,
            subsys_vendor: f.subsystem.0,
            subsys_device: f.subsystem.1,
            header_type: f.header_type,
            owner: if hidden { OWNER_HIDDEN } else { OWNER_OS },
            flags,
            secondary_bus: f.bridge_buses.map_or(0, |b| b.0),
            sriov_total_vfs: total,
            sriov_os_vfs: self.os_vfs(i),
            sriov_vf_device: vf_dev,
            sriov_num_vfs: num,
            rule: d.rule.map_or(0, |r| u8::try_from(r + 1).unwrap_or(u8::MAX)),
            sriov_rule: d
                .sriov_rule
                .map_or(0, |r| u8::try_from(r + 1).unwrap_or(u8::MAX)),
            vf_space: match self.vf_space(i) {
                VfSpace::None => VF_SPACE_NONE,
                VfSpace::Fits => VF_SPACE_FITS,
                VfSpace::Unassigned { .. } => VF_SPACE_UNASSIGNED,
                VfSpace::NoRoom { .. } => VF_SPACE_NO_ROOM,
                VfSpace::RootBus => VF_SPACE_ROOT_BUS,
            },
            iommu_domain: if hidden {
                IOMMU_DOMAIN_BLOCKED
            } else {
                IOMMU_DOMAIN_OS
            },
            bars,
            vf_bar_space: f.sriov.map_or(0, |s| vf_bar_space(f, s.total_vfs)),
            vf_bar_space_os: vf_bar_space(f, self.os_vfs(i)),
        }
    }

    /// Records for at most [`MAX_DEVICES`] functions, and how many did not
    /// fit.
    pub fn records(&self) -> (Vec<DeviceRecord>, u32) {
        let n = self.functions.len().min(MAX_DEVICES);
        let kept: Vec<DeviceRecord> = (0..n).map(|i| self.record(i)).collect();
        let dropped = u32::try_from(self.functions.len() - n).unwrap_or(u32::MAX);
        (kept, dropped)
    }

    /// What the core mediates and the IOMMU refuses, for the functions of
    /// `region` (segment 0), with a message for what did not fit.
    pub fn handoff(&self, region: Option<&EcamRegion>) -> (PciHandoff, Vec<String>) {
        let mut h = PciHandoff::default();
        let mut warnings = Vec::new();
        let Some(r) = region else {
            if self
                .plan
                .decisions
                .iter()
                .any(|d| d.owner == Owner::Hidden || d.os_vfs.is_some())
            {
                warnings.push(String::from(
                    "PCI: no ECAM region for segment 0: ownership rules cannot be enforced",
                ));
            }
            return (h, warnings);
        };
        h.ecam_base = r.base;
        h.bus_start = r.bus_start;
        h.bus_end = r.bus_end;
        let mut mediated = Vec::new();
        let mut blocked = Vec::new();
        for (i, f) in self.functions.iter().enumerate() {
            if f.bdf.segment != 0 {
                continue;
            }
            let d = self.decision(i);
            let base = PciMediation {
                bus: f.bdf.bus,
                devfn: f.bdf.devfn(),
                ..PciMediation::default()
            };
            if d.owner == Owner::Hidden {
                mediated.push((
                    f.bdf,
                    PciMediation {
                        action: PCI_ACTION_HIDE,
                        ..base
                    },
                ));
                blocked.extend(policy::blocked_rids(f));
            } else if let (Some(n), Some(cap)) = (d.os_vfs, f.sriov) {
                mediated.push((
                    f.bdf,
                    PciMediation {
                        action: PCI_ACTION_VF_BUDGET,
                        sriov_cap: cap.offset,
                        os_vfs: n,
                        initial_vfs: cap.initial_vfs,
                        total_vfs: cap.total_vfs,
                        ..base
                    },
                ));
            }
        }
        for (bdf, m) in &mediated {
            if (h.count as usize) < MAX_PCI_MEDIATED {
                h.mediated[h.count as usize] = *m;
                h.count += 1;
            } else {
                warnings.push(format!(
                    "PCI: more than {MAX_PCI_MEDIATED} mediated functions: {bdf} left to the OS"
                ));
            }
        }
        for (first, last) in blocked {
            if (h.blocked_count as usize) < MAX_PCI_BLOCKED {
                h.blocked[h.blocked_count as usize] = RidRange { first, last };
                h.blocked_count += 1;
            } else {
                warnings.push(format!(
                    "PCI: more than {MAX_PCI_BLOCKED} blocked requester ranges: \
                     {first:#06x}-{last:#06x} not blocked"
                ));
            }
        }
        (h, warnings)
    }

    /// One console line for function `i`.
    pub fn line(&self, index: usize) -> String {
        let func = &self.functions[index];
        let dec = self.decision(index);
        let mut s = format!(
            "{} {:04x}:{:04x} {} owner={}",
            func.bdf,
            func.vendor,
            func.device,
            class_name(func.base_class(), func.subclass()),
            dec.owner.name()
        );
        match dec.rule {
            Some(r) if self.config_rules.is_some_and(|n| r >= n) => s.push_str(" (appliance)"),
            Some(r) => {
                let _ = write!(s, " ([[device]] #{})", r + 1);
            }
            None => s.push_str(" (default)"),
        }
        let dma = match (dec.owner, self.iommu) {
            (Owner::Hidden, true) => "no DMA",
            (Owner::Hidden, false) => "DMA NOT blocked (no IOMMU)",
            (Owner::Os, true) => "OS memory",
            (Owner::Os, false) => "no IOMMU",
        };
        let _ = write!(s, " iommu: {dma}");
        if let Some(v) = &func.sriov {
            let os = self.os_vfs(index);
            let _ = write!(
                s,
                " sr-iov: TotalVFs {} NumVFs {} VF {:04x}:{:04x}, OS sees {os}",
                v.total_vfs, v.num_vfs, func.vendor, v.vf_device_id
            );
            if let Some(r) = dec.sriov_rule {
                let _ = write!(s, " ([[sriov]] #{})", r + 1);
            }
            if dec.owner != Owner::Hidden {
                let _ = write!(s, "; {}", space_text(self, index));
            }
        }
        s
    }

    /// The boot report: a summary, the rules' problems, then each NIC and
    /// storage controller (the devices an admin checks are passed through)
    /// and every hidden function.
    pub fn report(&self) -> Vec<String> {
        let fs = &self.functions;
        let mut out = Vec::new();
        let nics = fs.iter().filter(|f| f.kind() == Kind::Nic).count();
        let storage = fs.iter().filter(|f| f.kind() == Kind::Storage).count();
        let hidden = self
            .plan
            .decisions
            .iter()
            .filter(|d| d.owner == Owner::Hidden)
            .count();
        out.push(format!(
            "PCI: {} functions ({} NICs, {} storage controllers): {} owned by the OS (pass-through), {} hidden",
            fs.len(),
            nics,
            storage,
            fs.len() - hidden,
            hidden
        ));
        for p in &self.plan.problems {
            out.push(format!("PCI rule problem: {}", p.message));
        }
        for (i, f) in fs.iter().enumerate() {
            if matches!(f.kind(), Kind::Nic | Kind::Storage)
                || self.decision(i).owner == Owner::Hidden
            {
                out.push(format!("  {}", self.line(i)));
            }
        }
        out
    }
}

fn kib(b: u64) -> String {
    if b >= 1 << 20 && b.is_multiple_of(1 << 20) {
        format!("{} MiB", b >> 20)
    } else {
        format!("{} KiB", b.div_ceil(1024))
    }
}

fn vf_count(n: u16) -> String {
    if n == 1 {
        String::from("1 VF")
    } else {
        format!("{n} VFs")
    }
}

fn space_text(inv: &Inventory, i: usize) -> String {
    let f = &inv.functions[i];
    let vfs = inv.os_vfs(i);
    let need = vf_bar_space(f, vfs);
    match inv.vf_space(i) {
        VfSpace::None if f.vf_bars.is_empty() => String::from("no VF BARs"),
        VfSpace::None => String::from("no VFs for the OS"),
        VfSpace::Fits => format!(
            "VF BARs for {} ({}) fit the bridge window",
            vf_count(vfs),
            kib(need)
        ),
        VfSpace::RootBus => format!(
            "VF BARs for {} ({}) on the root bus (host bridge window not checked)",
            vf_count(vfs),
            kib(need)
        ),
        VfSpace::Unassigned { bar } => format!(
            "NO ROOM: the firmware assigned VF BAR{bar} no address; the OS cannot enable VFs \
             (enable SR-IOV support in the firmware setup)"
        ),
        VfSpace::NoRoom {
            bar,
            needed,
            base,
            window,
        } => {
            let w = window.map_or_else(
                || String::from("no window"),
                |(s, e)| format!("window {s:#x}-{e:#x}"),
            );
            format!(
                "NO ROOM: VF BAR{bar} needs {} for {} from {base:#x}, beyond the bridge's {w}; \
                 the OS cannot enable that many VFs",
                kib(needed),
                vf_count(vfs)
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use thinhv_passthrough::bars::{Bar, BarKind, Windows};
    use thinhv_passthrough::pci::Bdf;
    use thinhv_passthrough::sriov::{CAP_SIZE, SriovCap};

    fn nic_with_sriov() -> Function {
        let mut bytes = [0u8; CAP_SIZE];
        bytes[0] = 0x10;
        bytes[0x08] = 1;
        bytes[0x0c] = 8;
        bytes[0x0e] = 8;
        bytes[0x10] = 2;
        bytes[0x14] = 0x80;
        bytes[0x16] = 2;
        bytes[0x1a] = 0xca;
        bytes[0x1b] = 0x10;
        Function {
            bdf: Bdf::new(0, 2, 0, 0),
            vendor: 0x8086,
            device: 0x10c9,
            class_rev: 0x0200_0001,
            caps: alloc::vec![(0x10, 0x40)],
            sriov: SriovCap::parse(0x160, &bytes).ok(),
            bars: alloc::vec![Bar {
                index: 0,
                kind: BarKind::Mem32,
                prefetchable: false,
                base: 0xfe80_0000,
                size: 128 << 10,
            }],
            vf_bars: alloc::vec![Bar {
                index: 0,
                kind: BarKind::Mem64,
                prefetchable: true,
                base: 0x8_0000_0000,
                size: 16 << 10,
            }],
            ..Function::default()
        }
    }

    fn machine() -> Vec<Function> {
        alloc::vec![
            Function {
                bdf: Bdf::new(0, 0, 0, 0),
                class_rev: 0x0600_0000,
                vendor: 0x8086,
                device: 0x29c0,
                ..Function::default()
            },
            Function {
                bdf: Bdf::new(0, 0, 1, 0),
                class_rev: 0x0604_0000,
                vendor: 0x1b36,
                device: 0x000c,
                header_type: 1,
                bridge_buses: Some((2, 2)),
                windows: Some(Windows {
                    mem: Some((0xfe80_0000, 0xfe9f_ffff)),
                    pref: Some((0x8_0000_0000, 0x8_000f_ffff)),
                }),
                ..Function::default()
            },
            nic_with_sriov(),
            Function {
                bdf: Bdf::new(0, 0, 3, 0),
                class_rev: 0x0200_0000,
                vendor: 0x8086,
                device: 0x10d3,
                ..Function::default()
            },
            Function {
                bdf: Bdf::new(0, 0, 4, 0),
                class_rev: 0x0108_0202,
                vendor: 0x1b36,
                device: 0x0010,
                ..Function::default()
            },
        ]
    }

    /// QEMU q35's ECAM and 2 GiB of memory.
    fn q35() -> Reach {
        reach(
            Some(&EcamRegion {
                base: 0xb000_0000,
                segment: 0,
                bus_start: 0,
                bus_end: 0xff,
            }),
            2 << 30,
        )
    }

    fn rule(m: &str, owner: &str) -> DeviceRule {
        DeviceRule {
            matcher: m.into(),
            owner: owner.into(),
            line: None,
            bridge_ok: false,
        }
    }

    #[test]
    fn defaults_records_and_report() {
        let inv = Inventory::assess(machine(), &[], &[], None, true, &q35());
        let r = inv.record(2);
        assert_eq!((r.bus, r.devfn, r.vendor, r.device), (2, 0, 0x8086, 0x10c9));
        assert_eq!(
            r.flags,
            DEV_FLAG_PCIE | DEV_FLAG_SRIOV | DEV_FLAG_VFS_ENABLED
        );
        assert_eq!(
            (r.sriov_total_vfs, r.sriov_os_vfs, r.sriov_num_vfs),
            (8, 8, 2)
        );
        assert_eq!(
            (r.owner, r.rule, r.iommu_domain),
            (OWNER_OS, 0, IOMMU_DOMAIN_OS)
        );
        assert_eq!(r.bars[0].base, 0xfe80_0000);
        assert_eq!(r.bars[0].size, 128 << 10);
        assert_eq!(r.vf_bar_space, 8 * (16 << 10));
        assert_eq!(r.vf_space, VF_SPACE_FITS);
        assert_eq!(
            inv.line(2),
            "0000:02:00.0 8086:10c9 Ethernet controller owner=os (default) iommu: OS memory \
             sr-iov: TotalVFs 8 NumVFs 2 VF 8086:10ca, OS sees 8; VF BARs for 8 VFs (128 KiB) fit the bridge window"
        );
        let lines = inv.report();
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert!(lines[0].starts_with(
            "PCI: 5 functions (2 NICs, 1 storage controllers): 5 owned by the OS (pass-through), 0 hidden"
        ));
        let (h, w) = inv.handoff(Some(&EcamRegion {
            base: 0xb000_0000,
            segment: 0,
            bus_start: 0,
            bus_end: 0xff,
        }));
        assert!(w.is_empty());
        assert_eq!((h.count, h.blocked_count), (0, 0));
    }

    #[test]
    fn hidden_nic_and_vf_budget_reach_the_handoff_and_the_report() {
        let region = EcamRegion {
            base: 0xb000_0000,
            segment: 0,
            bus_start: 0,
            bus_end: 0xff,
        };
        let inv = Inventory::assess(
            machine(),
            &[rule("0000:00:03.0", "hidden"), rule("1234:5678", "hidden")],
            &[SriovRule {
                device: "8086:10c9".into(),
                os_vfs: 2,
                line: Some(9),
            }],
            None,
            true,
            &q35(),
        );
        let (h, w) = inv.handoff(Some(&region));
        assert!(w.is_empty());
        assert_eq!(h.count, 2);
        assert_eq!(h.mediated[0].action, PCI_ACTION_VF_BUDGET);
        assert_eq!(
            (
                h.mediated[0].bus,
                h.mediated[0].sriov_cap,
                h.mediated[0].os_vfs,
                h.mediated[0].total_vfs
            ),
            (2, 0x160, 2, 8)
        );
        assert_eq!(h.mediated[1].action, PCI_ACTION_HIDE);
        assert_eq!(h.mediated[1].devfn, 3 << 3);
        assert_eq!(
            h.blocked(),
            [RidRange {
                first: 0x18,
                last: 0x18
            }]
        );
        assert!(h.is_blocked(0x18) && !h.is_blocked(0x200));
        assert_eq!(h.page_of(&h.mediated[1]), 0xb000_0000 + (3 << 15));
        let hidden = inv.record(3);
        assert_eq!(
            (hidden.owner, hidden.rule, hidden.iommu_domain),
            (OWNER_HIDDEN, 1, IOMMU_DOMAIN_BLOCKED)
        );
        let pf = inv.record(2);
        assert_eq!((pf.sriov_os_vfs, pf.sriov_rule), (2, 1));
        assert_eq!(pf.vf_bar_space_os, 2 * (16 << 10));
        let lines = inv.report();
        assert!(
            lines[0].ends_with("4 owned by the OS (pass-through), 1 hidden"),
            "{lines:?}"
        );
        assert!(
            lines[1].starts_with(
                "PCI rule problem: [[device]] #2: match \"1234:5678\" matches no PCI function"
            ),
            "{lines:?}"
        );
        assert!(
            lines.iter().any(|l| {
                l.contains(
            "0000:00:03.0 8086:10d3 Ethernet controller owner=hidden ([[device]] #1) iommu: no DMA"
        )
            }),
            "{lines:?}"
        );
        // Had the rule been the loader's (an appliance's function), the
        // line says so rather than name a table the file does not have.
        let mut theirs = Inventory::assess(
            inv.functions.clone(),
            &[rule("0000:00:03.0", "hidden")],
            &[],
            None,
            true,
            &q35(),
        );
        theirs.config_rules = Some(0);
        assert!(
            theirs.report().iter().any(|l| l.contains(
                "0000:00:03.0 8086:10d3 Ethernet controller owner=hidden (appliance) iommu: no DMA"
            )),
            "{:?}",
            theirs.report()
        );
        assert!(
            lines.iter().any(|l| l.contains(
                "OS sees 2 ([[sriov]] #1); VF BARs for 2 VFs (32 KiB) fit the bridge window"
            )),
            "{lines:?}"
        );
        // Without an IOMMU the report says the hidden NIC's DMA is not
        // blocked.
        let inv = Inventory::assess(
            machine(),
            &[rule("0000:00:03.0", "hidden")],
            &[],
            None,
            false,
            &q35(),
        );
        assert!(
            inv.line(3).ends_with("iommu: DMA NOT blocked (no IOMMU)"),
            "{}",
            inv.line(3)
        );
        // No ECAM for segment 0: said, nothing mediated.
        let (h, w) = inv.handoff(None);
        assert_eq!(h.count, 0);
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn a_hidden_function_the_core_cannot_trap_is_reported_as_the_os() {
        // The ECAM region lies above the core's map (a 4 GiB machine with
        // its MCFG at 4 GiB): the rule fails at boot, the NIC stays the
        // OS's everywhere the loader says so.
        let high = EcamRegion {
            base: 0x1_0000_0000,
            segment: 0,
            bus_start: 0,
            bus_end: 0xff,
        };
        let inv = Inventory::assess(
            machine(),
            &[rule("0000:00:03.0", "hidden")],
            &[],
            None,
            true,
            &reach(Some(&high), 2 << 30),
        );
        let lines = inv.report();
        assert!(
            lines[0].ends_with("5 owned by the OS (pass-through), 0 hidden"),
            "{lines:?}"
        );
        assert_eq!(
            lines[1],
            "PCI rule problem: [[device]] #1: 0000:00:03.0 cannot be hidden: its ECAM page \
             0x100018000 lies beyond the memory thinhv maps (up to 0x100000000), where no access \
             to it could be trapped; it stays with the OS"
        );
        assert!(inv.line(3).contains("owner=os (default) iommu: OS memory"));
        let r = inv.record(3);
        assert_eq!((r.owner, r.iommu_domain), (OWNER_OS, IOMMU_DOMAIN_OS));
        let (h, w) = inv.handoff(Some(&high));
        assert!(w.is_empty());
        assert_eq!((h.count, h.blocked_count), (0, 0));
        // The same machine with memory up to 6 GiB: the core maps the
        // region, the rule holds, and the core accepts the hand-off.
        let inv = Inventory::assess(
            machine(),
            &[rule("0000:00:03.0", "hidden")],
            &[],
            None,
            true,
            &reach(Some(&high), 6 << 30),
        );
        assert_eq!(inv.record(3).owner, OWNER_HIDDEN);
        let (h, _) = inv.handoff(Some(&high));
        assert_eq!(h.count, 1);
        assert_eq!(
            h.check(thinhv_abi::handoff::identity_map_top(6 << 30)),
            Ok(())
        );
        // No ECAM region at all: nothing hidden, said as a rule problem.
        let inv = Inventory::assess(
            machine(),
            &[rule("0000:00:03.0", "hidden")],
            &[],
            None,
            true,
            &reach(None, 2 << 30),
        );
        assert_eq!(inv.record(3).owner, OWNER_OS);
        assert!(inv.report()[1].contains("no ECAM region for segment 0"));
        let (h, w) = inv.handoff(None);
        assert!(w.is_empty(), "nothing left to warn about: {w:?}");
        assert_eq!(h.count, 0);
    }

    #[test]
    fn a_segment_whose_buses_start_at_0x80() {
        // MCFG: Base Address 0xc000_0000 for buses 0x80..=0xff; the NIC at
        // 81:03.0 is hidden. Its page is counted from bus 0, as the core
        // traps it.
        let region = EcamRegion {
            base: 0xc000_0000,
            segment: 0,
            bus_start: 0x80,
            bus_end: 0xff,
        };
        let mut fs = machine();
        fs[3].bdf = Bdf::new(0, 0x81, 3, 0);
        let inv = Inventory::assess(
            fs,
            &[rule("0000:81:03.0", "hidden")],
            &[],
            None,
            true,
            &reach(Some(&region), 2 << 30),
        );
        assert!(inv.plan.problems.is_empty(), "{:?}", inv.plan.problems);
        let (h, w) = inv.handoff(Some(&region));
        assert!(w.is_empty());
        assert_eq!((h.ecam_base, h.bus_start, h.count), (0xc000_0000, 0x80, 1));
        let page = 0xc000_0000 + (0x81 << 20) + (3 << 15);
        assert_eq!(h.page_of(&h.mediated[0]), page);
        assert_eq!(region.address(Bdf::new(0, 0x81, 3, 0)), Some(page));
        assert_eq!(h.mediated_at(page + 4).map(|(m, _)| m.bus), Some(0x81));
    }

    #[test]
    fn no_room_is_reported_clearly() {
        let mut fs = machine();
        fs[2].vf_bars[0].base = 0x8_000f_0000;
        let inv = Inventory::assess(fs.clone(), &[], &[], None, true, &q35());
        let l = inv.line(2);
        assert!(l.contains("NO ROOM: VF BAR0 needs 128 KiB for 8 VFs from 0x8000f0000, beyond the bridge's window 0x800000000-0x8000fffff"), "{l}");
        assert_eq!(inv.record(2).vf_space, VF_SPACE_NO_ROOM);
        fs[2].vf_bars[0].base = 0;
        let inv = Inventory::assess(fs, &[], &[], None, true, &q35());
        assert!(
            inv.line(2)
                .contains("NO ROOM: the firmware assigned VF BAR0 no address")
        );
    }

    #[test]
    fn records_are_capped() {
        let many: Vec<Function> = (0..MAX_DEVICES + 3).map(|_| machine()[0].clone()).collect();
        let inv = Inventory::assess(many, &[], &[], None, true, &q35());
        let (r, dropped) = inv.records();
        assert_eq!((r.len(), dropped), (MAX_DEVICES, 3));
    }
}
