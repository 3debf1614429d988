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

#[cfg(test)]
mod tests {
    use super::*;
    use thinhv_config::Config;

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
}
