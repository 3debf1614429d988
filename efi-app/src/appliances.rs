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
pub fn assign_devices(
    devices: &[String],
    functions: &[thinhv_passthrough::pci::Function],
    taken: &[thinhv_passthrough::pci::Bdf],
    boot: Option<thinhv_passthrough::pci::Bdf>,
    addr_limit: u64,
) -> Result<Vec<AssignedDevice>, String> {
    use thinhv_abi::handoff::{
        BAR_REG_64, BAR_REG_PREFETCH, MAX_DEVICE_BARS, MAX_PARTITION_DEVICES,
    };
    use thinhv_passthrough::bars::BarKind;
    use thinhv_passthrough::policy::Matcher;
    let mut out: Vec<AssignedDevice> = Vec::new();
    for d in devices {
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
            if out.len() == MAX_PARTITION_DEVICES {
                return Err(format!(
                    "devices name more than {MAX_PARTITION_DEVICES} PCI functions"
                ));
            }
            let bars: Vec<_> = f
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
            let Some(upstream) = bridges_above(f, functions) else {
                return Err(format!(
                    "device \"{d}\": {} is behind no bridge the loader found",
                    f.bdf
                ));
            };
            out.push(AssignedDevice {
                bdf: f.bdf,
                vdevfn: u8::try_from((out.len() + 1) << 3).unwrap_or(0xf8),
                bars,
                upstream,
            });
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
        let d = assign_devices(&[String::from("8086:10d3")], &f, &[], None, TOP).unwrap();
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
            assign_devices(&[String::from(d)], &f, taken, boot, TOP).unwrap_err()
        };
        assert!(one("1234:5678", &[], None).contains("matches no PCI function"));
        assert!(one("01:00.0", &[Bdf::new(0, 1, 0, 0)], None).contains("another appliance"));
        assert!(one("01:00.0", &[], Some(Bdf::new(0, 1, 0, 0))).contains("boots from"));
        assert!(one("02:00.0", &[], None).contains("not whole pages"));
        assert!(one("nonsense", &[], None).contains("neither"));
        let mut bridge = f.clone();
        bridge[0].header_type = 1;
        let e = assign_devices(&[String::from("01:00.0")], &bridge, &[], None, TOP).unwrap_err();
        assert!(e.contains("bridge"), "{e}");
        let e = assign_devices(&[String::from("01:00.0")], &f, &[], None, 0xc001_0000).unwrap_err();
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
        let d = assign_devices(&[String::from("03:00.0")], &f, &[], None, TOP).unwrap();
        assert_eq!(
            d[0].upstream,
            [
                Bdf::new(0, 2, 1, 0),
                Bdf::new(0, 1, 0, 0),
                Bdf::new(0, 0, 7, 0)
            ]
        );
        // On the root bus: no bridge above.
        let d = assign_devices(&[String::from("00:05.0")], &f, &[], None, TOP).unwrap();
        assert!(d[0].upstream.is_empty());
        // A second function behind the same switch, the OS's: refused.
        let mut shared = f.clone();
        let mut other = nic(3, &[(0, BarKind::Mem32, 0xc100_0000, 0x2_0000)]);
        other.bdf = Bdf::new(0, 3, 0, 1);
        shared.push(other);
        let e = assign_devices(&[String::from("03:00.0")], &shared, &[], None, TOP).unwrap_err();
        assert!(
            e.contains("behind bridge 0000:02:01.0, which also leads to 0000:03:00.1"),
            "{e}"
        );
        // A root port at function 0 of a multi-function device whose
        // function 1 (another root port, say) is the OS's: refused.
        let mut multi = f.clone();
        multi.push(bridge(Bdf::new(0, 0, 7, 1), 9, 9));
        let e = assign_devices(&[String::from("03:00.0")], &multi, &[], None, TOP).unwrap_err();
        assert!(
            e.contains("0000:00:07.0 would be hidden") && e.contains("0000:00:07.1"),
            "{e}"
        );
        // A bridge not given buses yet (secondary 0) leads nowhere.
        let mut empty = f.clone();
        empty.push(bridge(Bdf::new(0, 0, 8, 0), 0, 0));
        let d = assign_devices(&[String::from("00:05.0")], &empty, &[], None, TOP).unwrap();
        assert!(d[0].upstream.is_empty());
        // Both functions the appliance's: accepted.
        let d = assign_devices(
            &[String::from("03:00.0"), String::from("03:00.1")],
            &shared,
            &[],
            None,
            TOP,
        )
        .unwrap();
        assert_eq!(d.len(), 2);
    }
}
