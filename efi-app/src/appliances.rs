//! Which `[[appliance]]` tables this machine can honour, and with which
//! processors: decided before anything is reserved, so that a table that
//! cannot be honoured is reported and left out while the OS boots with
//! everything else (`docs/appliances.md`).
//!
//! Processors: explicit APIC ID lists are served first (in file order),
//! then counts, each from the highest APIC IDs still free. The boot
//! processor is never given away — the firmware and the OS start on it —
//! so the OS always keeps at least one CPU. Memory: the OS keeps at least
//! [`MIN_OS_MEMORY_MIB`] of the RAM the firmware reports.
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use thinhv_config::{Appliance, CpuSpec};

/// Least RAM the OS keeps, in MiB, whatever the appliances ask for.
pub const MIN_OS_MEMORY_MIB: u64 = 256;

/// A processor the firmware reported enabled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cpu {
    /// Local APIC ID.
    pub apic_id: u32,
    /// The boot processor.
    pub bsp: bool,
}

/// The decision for one table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Honoured with these processors (ascending APIC IDs).
    Accepted {
        /// Its processors.
        apic_ids: Vec<u32>,
    },
    /// Left out, and why.
    Refused(String),
}

/// Decides every table; `ram_bytes` is the RAM the firmware reports.
pub fn decide(appliances: &[Appliance], cpus: &[Cpu], ram_bytes: u64) -> Vec<Decision> {
    // Memory first, in file order: the OS keeps its minimum. A table
    // refused here never takes processors.
    let mut out: Vec<Option<Decision>> = alloc::vec![None; appliances.len()];
    let mut left = ram_bytes;
    let floor = MIN_OS_MEMORY_MIB << 20;
    for (a, d) in appliances.iter().zip(out.iter_mut()) {
        let want = a.memory_bytes();
        if left.saturating_sub(want) < floor {
            *d = Some(Decision::Refused(format!(
                "memory = {} MiB would leave the OS {} MiB of {} MiB; the OS keeps at least \
                 {MIN_OS_MEMORY_MIB} MiB",
                a.memory,
                left.saturating_sub(want) >> 20,
                ram_bytes >> 20
            )));
        } else {
            left -= want;
        }
    }
    let mut taken: Vec<u32> = Vec::new();
    let bsp = cpus.iter().find(|c| c.bsp).map(|c| c.apic_id);
    // Explicit lists next, so that a count never takes a named core.
    for (i, a) in appliances.iter().enumerate() {
        let CpuSpec::ApicIds(ids) = &a.cpus else {
            continue;
        };
        if out[i].is_some() {
            continue;
        }
        let problem = ids.iter().find_map(|&id| {
            if Some(id) == bsp {
                Some(format!(
                    "APIC ID {id} is the boot processor, which stays the OS's"
                ))
            } else if !cpus.iter().any(|c| c.apic_id == id) {
                Some(format!(
                    "APIC ID {id} is not an enabled processor of this machine"
                ))
            } else {
                None
            }
        });
        out[i] = Some(if let Some(p) = problem {
            Decision::Refused(p)
        } else {
            taken.extend(ids);
            let mut ids = ids.clone();
            ids.sort_unstable();
            Decision::Accepted { apic_ids: ids }
        });
    }
    for (i, a) in appliances.iter().enumerate() {
        let CpuSpec::Count(n) = a.cpus else {
            continue;
        };
        if out[i].is_some() {
            continue;
        }
        let mut free: Vec<u32> = cpus
            .iter()
            .filter(|c| !c.bsp && !taken.contains(&c.apic_id))
            .map(|c| c.apic_id)
            .collect();
        free.sort_unstable();
        out[i] = Some(if free.len() < n as usize {
            Decision::Refused(format!(
                "cpus = {n}, but {} processor(s) are free (the machine has {}; the boot \
                 processor stays the OS's{})",
                free.len(),
                cpus.len(),
                if taken.is_empty() {
                    ""
                } else {
                    "; other appliances have the rest"
                }
            ))
        } else {
            let ids = free.split_off(free.len() - n as usize);
            taken.extend(&ids);
            Decision::Accepted { apic_ids: ids }
        });
    }
    out.into_iter().map(Option::unwrap_or_default).collect()
}

impl Default for Decision {
    fn default() -> Self {
        Self::Refused(String::from("not decided"))
    }
}

/// A PCI function an appliance gets whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AssignedDevice {
    /// Its address (segment 0).
    pub bdf: thinhv_passthrough::pci::Bdf,
    /// Its device and function on the appliance's bus 0: device `i + 1`
    /// for the appliance's `i`-th function, function 0 (the appliance has
    /// no host bridge; Linux finds its configuration space through the
    /// generated SMBIOS date and ACPI root bridge, `appliance_image`).
    pub vdevfn: u8,
    /// Its memory BARs: (register index, flags for
    /// `thinhv_abi::handoff::PartitionDevice::bar_regs`, base, size).
    pub bars: Vec<(u8, u8, u64, u64)>,
    /// The bridges between the root bus and it, nearest first: the
    /// appliance's too (hidden from the OS, which could otherwise reset the
    /// function through them, disable their link or turn their forwarding
    /// off), so everything behind them must be this appliance's.
    pub upstream: Vec<thinhv_passthrough::pci::Bdf>,
    /// A VF: its PF's routing ID and its IDs (vendor | device << 16).
    pub vf: Option<(u16, u32)>,
}

/// A VF an appliance's `devices` names (`vf:<PF>#<n>`), enabled by the
/// loader before the appliance's functions are assigned.
#[derive(Clone, Debug)]
pub struct EnabledVf {
    /// The `devices` entry.
    pub entry: String,
    /// The VF as a function ([`thinhv_passthrough::shared_pf::vf_function`]).
    pub function: thinhv_passthrough::pci::Function,
    /// Its PF.
    pub pf: thinhv_passthrough::pci::Bdf,
}

/// The PF of VF entry `pf`/`index` (`thinhv_config::appliance::vf_entry`)
/// out of `functions`, with the OS's budget of its VFs (the last
/// `[[sriov]]` rule of `budgets` that matches it): exactly one SR-IOV
/// function must match, not `taken` by an appliance; the VF must exist
/// (`index` up to TotalVFs), lie beyond the OS's budget (VFs `1..=os_vfs`
/// are the OS's) and have VF BARs the firmware assigned, in the window
/// of the bridge above.
pub fn vf_pf<'a>(
    pf: &str,
    index: u16,
    functions: &'a [thinhv_passthrough::pci::Function],
    budgets: &[thinhv_passthrough::policy::SriovRule],
    taken: &[thinhv_passthrough::pci::Bdf],
) -> Result<(&'a thinhv_passthrough::pci::Function, u16), String> {
    use thinhv_passthrough::bars::{VfSpace, check_vf_space, parent_of};
    use thinhv_passthrough::policy::Matcher;
    let m = Matcher::parse(pf)?;
    let found: Vec<_> = functions
        .iter()
        .filter(|f| m.matches(f) && f.sriov.is_some())
        .collect();
    let f = match found.as_slice() {
        [f] => *f,
        [] => return Err(format!("\"{pf}\" matches no SR-IOV PF of this machine")),
        [a, b, ..] => {
            return Err(format!(
                "\"{pf}\" matches more than one SR-IOV PF ({} and {}): name it by address",
                a.bdf, b.bdf
            ));
        }
    };
    let Some(cap) = f.sriov else {
        return Err(format!("{} has no SR-IOV capability", f.bdf));
    };
    if taken.contains(&f.bdf) {
        return Err(format!("{} is given to an appliance whole", f.bdf));
    }
    if index > cap.total_vfs {
        return Err(format!(
            "{} has {} VFs; there is no VF {index}",
            f.bdf, cap.total_vfs
        ));
    }
    let os_vfs = budgets
        .iter()
        .rev()
        .find(|r| Matcher::parse(&r.device).is_ok_and(|m| m.matches(f)))
        .and_then(|r| u16::try_from(r.os_vfs).ok())
        .filter(|&n| n < cap.total_vfs)
        .unwrap_or(cap.total_vfs);
    if index <= os_vfs {
        return Err(format!(
            "VF {index} of {} is within the OS's {os_vfs} VFs: a [[sriov]] rule with os_vfs below {index} keeps it for appliances",
            f.bdf
        ));
    }
    // An NVMe PF is thinhv's: the OS gets VF 1 in its place, no more.
    if f.is_nvme() && os_vfs > 1 {
        return Err(format!(
            "{} is an NVMe PF: the OS gets one of its controllers (VF 1, in the PF's place), not {os_vfs}: a [[sriov]] rule with os_vfs = 1 or 0",
            f.bdf
        ));
    }
    // A NIC's PF driver numbers its own queue pool after its VFs (igb's
    // and ixgbe's default pool is their VF count): with all its VFs on,
    // the OS's PF would program the queues of VF os_vfs + 1.
    if f.base_class() == 0x02 && index == os_vfs + 1 {
        return Err(format!(
            "VF {index} of {} shares its queues with the PF's own pool once the OS uses its {os_vfs} VFs (a NIC's PF driver numbers its pool after its VFs): VFs from {} can be an appliance's",
            f.bdf,
            os_vfs + 2
        ));
    }
    match check_vf_space(f, parent_of(functions, f.bdf), index) {
        VfSpace::Fits | VfSpace::RootBus => Ok((f, os_vfs)),
        VfSpace::Unassigned { bar } => Err(format!(
            "{}: the firmware assigned no address to VF BAR {bar}",
            f.bdf
        )),
        VfSpace::NoRoom { bar, needed, .. } => Err(format!(
            "{}: VF BAR {bar} for {index} VFs ({needed:#x} bytes) does not fit the bridge window",
            f.bdf
        )),
        VfSpace::None => Err(format!("{} has no VF BARs", f.bdf)),
    }
}

/// Adds `f` to `out` as the appliance's next function (device
/// `out.len() + 1` on its bus 0), with its memory BARs.
fn give(
    out: &mut Vec<AssignedDevice>,
    f: &thinhv_passthrough::pci::Function,
    upstream: Vec<thinhv_passthrough::pci::Bdf>,
    vf: Option<(u16, u32)>,
) -> Result<(), String> {
    use thinhv_abi::handoff::{
        BAR_REG_64, BAR_REG_PREFETCH, MAX_DEVICE_BARS, MAX_PARTITION_DEVICES,
    };
    use thinhv_passthrough::bars::BarKind;
    if out.len() == MAX_PARTITION_DEVICES {
        return Err(format!(
            "devices name more than {MAX_PARTITION_DEVICES} PCI functions"
        ));
    }
    let bars = f
        .bars
        .iter()
        .filter(|b| b.kind != BarKind::Io)
        .take(MAX_DEVICE_BARS)
        .map(|b| {
            let flags = if b.kind == BarKind::Mem64 {
                BAR_REG_64
            } else {
                0
            } | if b.prefetchable { BAR_REG_PREFETCH } else { 0 };
            (b.index, flags, b.base, b.size)
        })
        .collect();
    out.push(AssignedDevice {
        bdf: f.bdf,
        vdevfn: u8::try_from((out.len() + 1) << 3).unwrap_or(0xf8),
        bars,
        upstream,
        vf,
    });
    Ok(())
}

/// The bridges from `f`'s bus up to the root bus, nearest first; `None`
/// when a bus on the way has no bridge leading to it (the function is not
/// reachable from a root bus the loader enumerated).
fn bridges_above(
    f: &thinhv_passthrough::pci::Function,
    functions: &[thinhv_passthrough::pci::Function],
) -> Option<Vec<thinhv_passthrough::pci::Bdf>> {
    let mut out = Vec::new();
    let mut bus = f.bdf.bus;
    // The bridges of its segment that lead somewhere (a bridge not yet
    // given buses reads secondary 0, which is no bus below it).
    let bridges: Vec<&thinhv_passthrough::pci::Function> = functions
        .iter()
        .filter(|b| {
            b.bdf.segment == f.bdf.segment && b.bridge_buses.is_some_and(|(sec, _)| sec > b.bdf.bus)
        })
        .collect();
    let roots: Vec<u8> = functions
        .iter()
        .filter(|g| g.bdf.segment == f.bdf.segment)
        .filter(|g| {
            !bridges.iter().any(|b| {
                b.bridge_buses
                    .is_some_and(|(sec, sub)| (sec..=sub).contains(&g.bdf.bus))
            })
        })
        .map(|g| g.bdf.bus)
        .collect();
    while !roots.contains(&bus) {
        let b = bridges
            .iter()
            .find(|b| b.bridge_buses.is_some_and(|(sec, _)| sec == bus))?;
        if out.contains(&b.bdf) || out.len() > 32 {
            return None;
        }
        out.push(b.bdf);
        bus = b.bdf.bus;
    }
    Some(out)
}

/// The functions appliance table `devices` names, out of `functions`
/// (what the loader enumerated), none of `taken` (given to an earlier
/// appliance) and not `boot` (the device the OS boots from). Each entry
/// must match at least one function; every match must be an endpoint
/// whose memory BARs the firmware assigned in whole pages (the OS's
/// second-level tables can only take whole pages from it) below
/// `addr_limit` (the end of the processor's physical address space) on
/// segment 0. (A BAR above the core's identity map is blanked in a GiB
/// the core maps for the OS at its start, as a first touch there would.)
///
/// A VF entry (`vf:<PF>#<n>`) takes the VF the loader enabled for it
/// (`vfs`): behind the bridge above its PF, which stays the OS's.
pub fn assign_devices(
    devices: &[String],
    functions: &[thinhv_passthrough::pci::Function],
    vfs: &[EnabledVf],
    taken: &[thinhv_passthrough::pci::Bdf],
    boot: Option<thinhv_passthrough::pci::Bdf>,
    addr_limit: u64,
) -> Result<Vec<AssignedDevice>, String> {
    use thinhv_passthrough::bars::BarKind;
    use thinhv_passthrough::policy::Matcher;
    let mut out: Vec<AssignedDevice> = Vec::new();
    for d in devices {
        if d.starts_with("vf:") {
            let Some(v) = vfs.iter().find(|v| &v.entry == d) else {
                return Err(format!("device \"{d}\": the VF was not enabled"));
            };
            let f = &v.function;
            if taken.contains(&f.bdf) {
                return Err(format!(
                    "device \"{d}\": {} is given to another appliance",
                    f.bdf
                ));
            }
            let ids = u32::from(f.vendor) | u32::from(f.device) << 16;
            give(&mut out, f, Vec::new(), Some((v.pf.rid(), ids)))?;
            continue;
        }
        let m = Matcher::parse(d)?;
        let found: Vec<_> = functions.iter().filter(|f| m.matches(f)).collect();
        if found.is_empty() {
            return Err(format!(
                "device \"{d}\" matches no PCI function of this machine"
            ));
        }
        for f in found {
            if out.iter().any(|o| o.bdf == f.bdf) {
                continue;
            }
            let why = if taken.contains(&f.bdf) {
                Some(String::from("is given to another appliance"))
            } else if boot == Some(f.bdf) {
                Some(String::from("is the device the OS boots from"))
            } else if f.header_type & 0x7f != 0 {
                Some(String::from("is a bridge, not an endpoint"))
            } else if f.bdf.segment != 0 {
                Some(String::from("is not on PCI segment 0"))
            } else {
                f.bars
                    .iter()
                    .find(|b| {
                        b.kind != BarKind::Io
                            && (b.base == 0
                                || !b.base.is_multiple_of(4096)
                                || !b.size.is_multiple_of(4096)
                                || b.base.saturating_add(b.size) > addr_limit)
                    })
                    .map(|b| {
                        format!(
                            "has BAR {} of {:#x} bytes at {:#x}: not whole pages the firmware assigned below {addr_limit:#x}",
                            b.index, b.size, b.base
                        )
                    })
            };
            if let Some(why) = why {
                return Err(format!("device \"{d}\": {} {why}", f.bdf));
            }
            let Some(upstream) = bridges_above(f, functions) else {
                return Err(format!(
                    "device \"{d}\": {} is behind no bridge the loader found",
                    f.bdf
                ));
            };
            give(&mut out, f, upstream, None)?;
        }
    }
    // A bridge above one of its functions is the appliance's: everything
    // behind it must be too (the function itself, or another bridge on
    // the way to one).
    for a in &out {
        for &b in &a.upstream {
            let Some((sec, sub)) = functions
                .iter()
                .find(|g| g.bdf == b)
                .and_then(|g| g.bridge_buses)
            else {
                continue;
            };
            let other = functions.iter().find(|g| {
                g.bdf.segment == b.segment
                    && (sec..=sub).contains(&g.bdf.bus)
                    && !out
                        .iter()
                        .any(|o| o.bdf == g.bdf || o.upstream.contains(&g.bdf))
            });
            if let Some(g) = other {
                return Err(format!(
                    "{} sits behind bridge {b}, which also leads to {}, not this appliance's: the OS, keeping that bridge, could reset or cut off the function through it",
                    a.bdf, g.bdf
                ));
            }
        }
    }
    // Function 0 of a device hidden from the OS hides the device's other
    // functions from its enumeration too (Linux scans a slot from
    // function 0): those must be the appliance's as well.
    let theirs = |g: &thinhv_passthrough::pci::Bdf| {
        out.iter().any(|o| o.bdf == *g || o.upstream.contains(g))
    };
    for h in out
        .iter()
        .flat_map(|o| core::iter::once(o.bdf).chain(o.upstream.iter().copied()))
    {
        if h.function != 0 {
            continue;
        }
        if let Some(g) = functions.iter().find(|g| {
            g.bdf.segment == h.segment
                && g.bdf.bus == h.bus
                && g.bdf.device == h.device
                && g.bdf.function != 0
                && !theirs(&g.bdf)
        }) {
            return Err(format!(
                "{h} would be hidden from the OS with the appliance, and with it {} (another function of the same device, which the OS finds only through function 0)",
                g.bdf
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use thinhv_config::Config;
    use thinhv_passthrough::bars::{Bar, BarKind};
    use thinhv_passthrough::pci::{Bdf, Function};

    fn machine(n: u32) -> Vec<Cpu> {
        (0..n)
            .map(|i| Cpu {
                apic_id: i,
                bsp: i == 0,
            })
            .collect()
    }

    fn cfg(tables: &str) -> Vec<Appliance> {
        Config::parse(tables).unwrap().appliance
    }

    fn table(name: &str, cpus: &str, mib: u32) -> String {
        format!(
            "[[appliance]]\nname = \"{name}\"\ncpus = {cpus}\nmemory = {mib}\nkernel = '\\k'\n\n"
        )
    }

    const GIB: u64 = 1 << 30;

    #[test]
    fn counts_take_the_highest_free_ids_after_explicit_lists() {
        let a = cfg(&(table("a", "2", 256) + &table("b", "[3]", 64)));
        let d = decide(&a, &machine(4), GIB);
        assert_eq!(
            d,
            [
                Decision::Accepted {
                    apic_ids: vec![1, 2]
                },
                Decision::Accepted { apic_ids: vec![3] }
            ]
        );
    }

    #[test]
    fn the_boot_processor_and_unknown_ids_are_never_given() {
        let a = cfg(&(table("a", "[0]", 64) + &table("b", "[9]", 64) + &table("c", "4", 64)));
        let d = decide(&a, &machine(4), 4 * GIB);
        let Decision::Refused(m) = &d[0] else {
            panic!("{d:?}")
        };
        assert!(m.contains("boot processor"), "{m}");
        let Decision::Refused(m) = &d[1] else {
            panic!("{d:?}")
        };
        assert!(m.contains("not an enabled processor"), "{m}");
        let Decision::Refused(m) = &d[2] else {
            panic!("{d:?}")
        };
        assert!(m.contains("cpus = 4, but 3 processor(s) are free"), "{m}");
        // One CPU machine: nothing to give.
        let d = decide(&cfg(&table("a", "1", 64)), &machine(1), 4 * GIB);
        assert!(matches!(&d[0], Decision::Refused(m) if m.contains("0 processor(s) are free")));
    }

    #[test]
    fn a_table_refused_for_memory_leaves_its_cpus_to_the_next() {
        let a = cfg(&(table("a", "3", 900) + &table("b", "3", 128)));
        let d = decide(&a, &machine(4), GIB);
        let Decision::Refused(m) = &d[0] else {
            panic!("{d:?}")
        };
        assert!(m.contains("would leave the OS 124 MiB of 1024 MiB"), "{m}");
        assert_eq!(
            d[1],
            Decision::Accepted {
                apic_ids: vec![1, 2, 3]
            }
        );
    }

    #[test]
    fn memory_is_checked_in_file_order_against_the_os_floor() {
        let a = cfg(&(table("a", "1", 512) + &table("b", "1", 256) + &table("c", "1", 64)));
        let d = decide(&a, &machine(4), GIB);
        assert!(matches!(&d[0], Decision::Accepted { .. }), "{d:?}");
        assert!(
            matches!(&d[1], Decision::Accepted { .. }),
            "exactly the floor: {d:?}"
        );
        assert!(
            matches!(&d[2], Decision::Refused(m) if m.contains("leave the OS 192 MiB")),
            "{d:?}"
        );
    }

    const TOP: u64 = 1 << 40;

    fn nic(bus: u8, bars: &[(u8, BarKind, u64, u64)]) -> Function {
        Function {
            bdf: Bdf::new(0, bus, 0, 0),
            vendor: 0x8086,
            device: 0x10d3,
            class_rev: 0x0200_0000,
            header_type: 0,
            subsystem: (0, 0),
            bridge_buses: None,
            caps: Vec::new(),
            ext_caps: Vec::new(),
            sriov: None,
            bars: bars
                .iter()
                .map(|&(index, kind, base, size)| Bar {
                    index,
                    kind,
                    prefetchable: false,
                    base,
                    size,
                })
                .collect(),
            vf_bars: Vec::new(),
            windows: None,
        }
    }

    #[test]
    fn devices_are_matched_with_their_memory_bars_and_numbered_on_bus_0() {
        let f = vec![
            nic(
                1,
                &[
                    (0, BarKind::Mem32, 0xc000_0000, 0x2_0000),
                    (2, BarKind::Io, 0x6000, 0x20),
                    (3, BarKind::Mem64, 0x8_0000_0000, 0x4000),
                ],
            ),
            nic(2, &[(0, BarKind::Mem32, 0xc100_0000, 0x2_0000)]),
        ];
        let d = assign_devices(&[String::from("8086:10d3")], &f, &[], &[], None, TOP).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].bdf, Bdf::new(0, 1, 0, 0));
        assert_eq!((d[0].vdevfn, d[1].vdevfn), (0x08, 0x10));
        // The I/O BAR is not given.
        assert_eq!(
            d[0].bars,
            [
                (0, 0, 0xc000_0000, 0x2_0000),
                (3, thinhv_abi::handoff::BAR_REG_64, 0x8_0000_0000, 0x4000)
            ]
        );
        // One by address; the same function twice is given once.
        let d = assign_devices(
            &[String::from("0000:02:00.0"), String::from("02:00.0")],
            &f,
            &[],
            &[],
            None,
            TOP,
        )
        .unwrap();
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn devices_the_appliance_cannot_have_are_refused_with_the_reason() {
        let f = vec![
            nic(1, &[(0, BarKind::Mem32, 0xc000_0000, 0x2_0000)]),
            nic(2, &[(0, BarKind::Mem32, 0xc100_0800, 0x800)]),
        ];
        let one = |d: &str, taken: &[Bdf], boot| {
            assign_devices(&[String::from(d)], &f, &[], taken, boot, TOP).unwrap_err()
        };
        assert!(one("1234:5678", &[], None).contains("matches no PCI function"));
        assert!(one("01:00.0", &[Bdf::new(0, 1, 0, 0)], None).contains("another appliance"));
        assert!(one("01:00.0", &[], Some(Bdf::new(0, 1, 0, 0))).contains("boots from"));
        assert!(one("02:00.0", &[], None).contains("not whole pages"));
        assert!(one("nonsense", &[], None).contains("neither"));
        let mut bridge = f.clone();
        bridge[0].header_type = 1;
        let e =
            assign_devices(&[String::from("01:00.0")], &bridge, &[], &[], None, TOP).unwrap_err();
        assert!(e.contains("bridge"), "{e}");
        let e = assign_devices(&[String::from("01:00.0")], &f, &[], &[], None, 0xc001_0000)
            .unwrap_err();
        assert!(e.contains("below 0xc0010000"), "{e}");
    }

    /// A bridge at `bdf` to buses `sec..=sub`.
    fn bridge(bdf: Bdf, sec: u8, sub: u8) -> Function {
        let mut b = nic(0, &[]);
        b.bdf = bdf;
        b.header_type = 1;
        b.bridge_buses = Some((sec, sub));
        b
    }

    #[test]
    fn the_bridges_above_a_function_are_the_appliances_only_if_all_behind_them_is() {
        // Root bus 0: a root port 00:07.0 to bus 1 (a switch's upstream
        // port 01:00.0 to buses 2..=3, its downstream port 02:01.0 to bus
        // 3, a NIC there), and a NIC on bus 0 itself.
        let mut root_nic = nic(0, &[(0, BarKind::Mem32, 0xc200_0000, 0x2_0000)]);
        root_nic.bdf = Bdf::new(0, 0, 5, 0);
        let f = vec![
            root_nic,
            bridge(Bdf::new(0, 0, 7, 0), 1, 3),
            bridge(Bdf::new(0, 1, 0, 0), 2, 3),
            bridge(Bdf::new(0, 2, 1, 0), 3, 3),
            nic(3, &[(0, BarKind::Mem32, 0xc000_0000, 0x2_0000)]),
        ];
        let d = assign_devices(&[String::from("03:00.0")], &f, &[], &[], None, TOP).unwrap();
        assert_eq!(
            d[0].upstream,
            [
                Bdf::new(0, 2, 1, 0),
                Bdf::new(0, 1, 0, 0),
                Bdf::new(0, 0, 7, 0)
            ]
        );
        // On the root bus: no bridge above.
        let d = assign_devices(&[String::from("00:05.0")], &f, &[], &[], None, TOP).unwrap();
        assert!(d[0].upstream.is_empty());
        // A second function behind the same switch, the OS's: refused.
        let mut shared = f.clone();
        let mut other = nic(3, &[(0, BarKind::Mem32, 0xc100_0000, 0x2_0000)]);
        other.bdf = Bdf::new(0, 3, 0, 1);
        shared.push(other);
        let e =
            assign_devices(&[String::from("03:00.0")], &shared, &[], &[], None, TOP).unwrap_err();
        assert!(
            e.contains("behind bridge 0000:02:01.0, which also leads to 0000:03:00.1"),
            "{e}"
        );
        // A root port at function 0 of a multi-function device whose
        // function 1 (another root port, say) is the OS's: refused.
        let mut multi = f.clone();
        multi.push(bridge(Bdf::new(0, 0, 7, 1), 9, 9));
        let e =
            assign_devices(&[String::from("03:00.0")], &multi, &[], &[], None, TOP).unwrap_err();
        assert!(
            e.contains("0000:00:07.0 would be hidden") && e.contains("0000:00:07.1"),
            "{e}"
        );
        // A bridge not given buses yet (secondary 0) leads nowhere.
        let mut empty = f.clone();
        empty.push(bridge(Bdf::new(0, 0, 8, 0), 0, 0));
        let d = assign_devices(&[String::from("00:05.0")], &empty, &[], &[], None, TOP).unwrap();
        assert!(d[0].upstream.is_empty());
        // Both functions the appliance's: accepted.
        let d = assign_devices(
            &[String::from("03:00.0"), String::from("03:00.1")],
            &shared,
            &[],
            &[],
            None,
            TOP,
        )
        .unwrap();
        assert_eq!(d.len(), 2);
    }

    /// An igb-like PF at 01:00.0 (8 VFs, VF BAR0 16 KiB at 0xfe00_0000)
    /// behind root port 00:01.0 (window 0xfe00_0000..=0xfe0f_ffff).
    fn igb_machine() -> Vec<Function> {
        use thinhv_passthrough::bars::Windows;
        let mut pf = nic(1, &[(0, BarKind::Mem32, 0xc000_0000, 0x2_0000)]);
        pf.device = 0x10c9;
        pf.sriov = Some(thinhv_passthrough::sriov::SriovCap {
            offset: 0x160,
            total_vfs: 8,
            initial_vfs: 8,
            first_vf_offset: 0x80,
            vf_stride: 2,
            vf_device_id: 0x10ca,
            ..Default::default()
        });
        pf.vf_bars = vec![Bar {
            index: 0,
            kind: BarKind::Mem32,
            prefetchable: false,
            base: 0xfe00_0000,
            size: 0x4000,
        }];
        let mut rp = nic(0, &[]);
        rp.bdf = Bdf::new(0, 0, 1, 0);
        rp.header_type = 1;
        rp.bridge_buses = Some((1, 1));
        rp.windows = Some(Windows {
            mem: Some((0xfe00_0000, 0xfe0f_ffff)),
            ..Default::default()
        });
        vec![rp, pf]
    }

    fn rule(os_vfs: u32) -> Vec<thinhv_passthrough::policy::SriovRule> {
        vec![thinhv_passthrough::policy::SriovRule {
            device: String::from("8086:10c9"),
            os_vfs,
            line: None,
        }]
    }

    #[test]
    fn a_vf_beyond_the_oss_budget_of_one_pf_is_an_appliances() {
        let f = igb_machine();
        let (pf, os_vfs) = vf_pf("8086:10c9", 4, &f, &rule(2), &[]).unwrap();
        assert_eq!((pf.bdf, os_vfs), (Bdf::new(0, 1, 0, 0), 2));
        // A NIC's VF just beyond the budget: the PF's own queue pool.
        assert!(
            vf_pf("8086:10c9", 3, &f, &rule(2), &[])
                .unwrap_err()
                .contains("shares its queues with the PF's own pool")
        );
        assert_eq!(
            thinhv_config::appliance::vf_entry("vf:0000:01:00.0#3"),
            Some(("0000:01:00.0", 3))
        );
        assert_eq!(thinhv_config::appliance::vf_entry("vf:8086:10c9#0"), None);
        assert_eq!(thinhv_config::appliance::vf_entry("8086:10c9"), None);
        let e = |pf: &str, n: u16, rules: &[thinhv_passthrough::policy::SriovRule]| {
            vf_pf(pf, n, &f, rules, &[]).unwrap_err()
        };
        // Within the OS's VFs: without a rule all 8 are the OS's.
        assert!(e("8086:10c9", 3, &[]).contains("within the OS's 8 VFs"));
        assert!(e("8086:10c9", 2, &rule(2)).contains("within the OS's 2 VFs"));
        assert!(e("8086:10c9", 9, &rule(2)).contains("has 8 VFs; there is no VF 9"));
        assert!(e("8086:10d3", 3, &rule(2)).contains("matches no SR-IOV PF"));
        // Beyond the bridge window: 64 VFs' worth would not fit, but 8 do;
        // a VF BAR the firmware did not assign.
        let mut g = igb_machine();
        g[1].vf_bars[0].base = 0;
        assert!(
            vf_pf("8086:10c9", 4, &g, &rule(2), &[])
                .unwrap_err()
                .contains("assigned no address")
        );
        let mut g = igb_machine();
        g[1].vf_bars[0].base = 0xfe0f_8000;
        assert!(
            vf_pf("8086:10c9", 4, &g, &rule(2), &[])
                .unwrap_err()
                .contains("does not fit")
        );
        // A PF given whole to an appliance.
        assert!(
            vf_pf("8086:10c9", 4, &f, &rule(2), &[Bdf::new(0, 1, 0, 0)])
                .unwrap_err()
                .contains("given to an appliance whole")
        );
    }

    #[test]
    fn an_nvme_pf_gives_the_os_one_vf_at_most_and_any_vf_after_it_to_appliances() {
        // The same PF as an NVMe controller: VF 2 right after the OS's one
        // (no PF queue pool to keep clear), and no budget above 1.
        let mut f = igb_machine();
        f[1].class_rev = 0x0108_0200;
        let (pf, os_vfs) = vf_pf("8086:10c9", 2, &f, &rule(1), &[]).unwrap();
        assert!(pf.is_nvme());
        assert_eq!(os_vfs, 1);
        assert!(vf_pf("8086:10c9", 1, &f, &rule(0), &[]).is_ok());
        assert!(
            vf_pf("8086:10c9", 4, &f, &rule(2), &[])
                .unwrap_err()
                .contains("is an NVMe PF: the OS gets one of its controllers")
        );
        // The control: as a NIC, budget 2 is fine for VF 4.
        assert!(vf_pf("8086:10c9", 4, &igb_machine(), &rule(2), &[]).is_ok());
    }

    #[test]
    fn an_enabled_vf_is_assigned_with_its_slot_of_the_vf_bars_and_no_bridge() {
        let f = igb_machine();
        let mut vf = nic(1, &[(0, BarKind::Mem32, 0xfe00_8000, 0x4000)]);
        vf.bdf = Bdf::new(0, 1, 0x10, 4);
        vf.device = 0x10ca;
        let vfs = [EnabledVf {
            entry: String::from("vf:8086:10c9#3"),
            function: vf,
            pf: Bdf::new(0, 1, 0, 0),
        }];
        let d =
            assign_devices(&[String::from("vf:8086:10c9#3")], &f, &vfs, &[], None, TOP).unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!((d[0].bdf, d[0].vdevfn), (Bdf::new(0, 1, 0x10, 4), 0x08));
        assert_eq!(d[0].bars, [(0, 0, 0xfe00_8000, 0x4000)]);
        assert!(d[0].upstream.is_empty());
        assert_eq!(d[0].vf, Some((0x0100, 0x10ca_8086)));
        // Not enabled: refused.
        let e = assign_devices(&[String::from("vf:8086:10c9#4")], &f, &vfs, &[], None, TOP)
            .unwrap_err();
        assert!(e.contains("was not enabled"), "{e}");
    }
}
