//! The OS's I/O APIC redirection entries, judged like its MSIs.
//!
//! An I/O APIC sends each of its inputs as a message to the processors its
//! redirection entry names: any APIC ID, any delivery mode (NMI, INIT, SMI
//! included), or a logical destination that also names an appliance's
//! processors (an xAPIC 0xFF reaches x2APIC processors as a broadcast).
//! Where appliances run, thinhv keeps each I/O APIC's register page out of
//! the OS's second-level tables (the loader lists them from the MADT,
//! `Handoff::ioapics`) and emulates IOREGSEL and IOWIN:
//!
//! * a redirection entry reads back as the OS wrote it (delivery status and
//!   remote IRR are the hardware's);
//! * the hardware holds, for an unmasked entry, what
//!   [`irq_remap::judge`] makes of it for the OS's processors (fixed,
//!   lowest priority, NMI or ExtINT, to one of its processors, in physical
//!   mode), and for a refused one a masked entry naming no one, counted
//!   ([`Hv::refused_rtes`](crate::hv::Hv)) and logged once per distinct
//!   entry;
//! * the ID register and the EOI register are the hardware's; a store
//!   anywhere else (a read-only register, an index past the entries,
//!   another offset of the page) is not passed on.
//!
//! Every entry is judged at the claim (`load_all`), the firmware's
//! included.
//!
//! A select and its window access reach the hardware together under
//! [`Hv::ioapic_hw`](crate::hv::Hv), so that two processors of the OS
//! cannot interleave them (Linux serializes its own under a lock; thinhv's
//! lock keeps the hardware's IOREGSEL its own between the two).
// Registers are dwords of 64-bit entries: the casts split them.
#![allow(clippy::cast_possible_truncation)]
use super::Outcome;
use super::msi_remap::PartitionCores;
use crate::env::Env;
use crate::guest::GuestCpu;
use crate::hv::{hold, release};
use crate::partition::PartitionId;
use alloc::vec::Vec;
use core::sync::atomic::Ordering;
use thinhv_passthrough::irq_remap::{self, Policy, ioapic};

/// IOREGSEL, IOWIN and the EOI register (I/O APIC version 0x20 and later).
const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const EOI: u64 = 0x40;
/// The ID register.
const REG_ID: u32 = 0x00;
/// The version register: maximum redirection entry in bits 23:16.
const REG_VERSION: u32 = 0x01;
/// The first redirection entry's low dword; entry `n` at `0x10 + 2n`.
const FIRST_RTE: u32 = 0x10;
/// Most redirection entries an I/O APIC can have (index up to 0xFF).
const MAX_PINS: u32 = 120;
/// Refused entries logged one by one; after that every 1024th.
const LOG_FIRST: u64 = 8;

/// The OS's may send NMIs and ExtINT to its own processors, as on its own
/// machine (Linux's timer check can route the 8259 through pin 0).
const OS_POLICY: Policy = Policy {
    nmi: true,
    extint: true,
};

/// One I/O APIC thinhv judges.
#[derive(Clone, Debug, Default)]
pub struct IoApicGuard {
    /// Its register page.
    pub base: u64,
    /// The source ID its messages carry, where known (VT-d: from the
    /// DMAR): its entries then go through the IOMMU's remapping table
    /// where the IOMMU remaps it.
    pub source: Option<u16>,
    /// IOREGSEL as the OS wrote it.
    select: u32,
    /// The entries as the OS wrote them (empty until the claim or the
    /// first access, which reads them from the hardware).
    shadow: Vec<u64>,
    /// Per entry, the last refused value (logged once).
    refused: Vec<Option<u64>>,
}

impl IoApicGuard {
    /// The I/O APIC whose registers are at `base`, sending as `source`.
    pub fn new(base: u64, source: Option<u16>) -> Self {
        Self {
            base,
            source,
            ..Self::default()
        }
    }
}

/// A load or store of the OS's at `gpa`, in the register page of an I/O
/// APIC thinhv judges (`None`: not such a page, or not the OS's access).
pub(super) fn access(cpu: &mut impl GuestCpu, env: &mut impl Env, gpa: u64) -> Option<Outcome> {
    let page = gpa & !0xfff;
    let at = env
        .hv()
        .ioapics
        .lock()
        .iter()
        .position(|a| a.base == page)?;
    if !env.hv().space_of(env.cpu_index()).is_os() {
        return None;
    }
    let Some(d) = super::decode_current(cpu, env) else {
        log::error!(
            "cpu {}: cannot decode the I/O APIC access at rip {:#x}; #GP",
            env.cpu_index(),
            cpu.rip()
        );
        cpu.inject_exception(crate::guest::vector::GP, Some(0));
        return Some(Outcome::Resume);
    };
    let next = super::wrap_ip(cpu.mode(), cpu.rip().wrapping_add(d.len() as u64));
    let off = gpa & 0xfff;
    // Registers are dwords; a narrower access is one to part of its dword.
    let shift = 8 * (off & 3);
    if let Some(load) = d.load().filter(|l| l.size <= 4) {
        let v = u64::from(read(env, at, off & !3) >> shift);
        let old = cpu.gpr(load.dest);
        cpu.set_gpr(load.dest, load.merge(old, v));
    } else if let Some(store) = d
        .store()
        .filter(|s| s.size <= 4 && !s.exchange && shift == 0)
    {
        let value = match store.source {
            crate::insn::StoreSource::Immediate(v) => v,
            crate::insn::StoreSource::Register(r) => cpu.gpr(r),
        };
        write(env, at, off, value as u32);
    } else {
        log::error!(
            "cpu {}: unsupported I/O APIC access {:?} at {gpa:#x} (rip {:#x}); skipped",
            env.cpu_index(),
            d.mnemonic(),
            cpu.rip()
        );
    }
    cpu.set_rip(next);
    Some(Outcome::Resume)
}

/// The hardware's register `index` of the I/O APIC at `base`.
fn hw_read(env: &mut impl Env, base: u64, index: u32) -> u32 {
    env.mmio_write(base + IOREGSEL, 4, index);
    env.mmio_read(base + IOWIN, 4)
}

fn hw_write(env: &mut impl Env, base: u64, index: u32, value: u32) {
    env.mmio_write(base + IOREGSEL, 4, index);
    env.mmio_write(base + IOWIN, 4, value);
}

/// The entries of I/O APIC `at`, read from the hardware at its first
/// access; an entry live there that the OS may not have is masked now.
/// Returns its base, select, and entry count. The caller holds the lock.
fn loaded(env: &mut impl Env, at: usize) -> (u64, u32, u32) {
    let (base, select, pins) = {
        let list = env.hv().ioapics.lock();
        let a = &list[at];
        (a.base, a.select, a.shadow.len() as u32)
    };
    if pins > 0 {
        return (base, select, pins);
    }
    let pins = ((hw_read(env, base, REG_VERSION) >> 16) & 0xff) + 1;
    let pins = pins.min(MAX_PINS);
    let mut shadow = Vec::with_capacity(pins as usize);
    for pin in 0..pins {
        let lo = hw_read(env, base, FIRST_RTE + 2 * pin);
        let hi = hw_read(env, base, FIRST_RTE + 2 * pin + 1);
        shadow.push(u64::from(hi) << 32 | u64::from(lo & !(ioapic::READ_ONLY as u32)));
    }
    {
        let mut list = env.hv().ioapics.lock();
        let a = &mut list[at];
        a.shadow = shadow;
        a.refused = alloc::vec![None; pins as usize];
    }
    for pin in 0..pins {
        program(env, at, base, pin, true);
    }
    (base, select, pins)
}

/// The dword at `off` of I/O APIC `at` as the OS sees it.
fn read(env: &mut impl Env, at: usize, off: u64) -> u32 {
    hold(&env.hv().ioapic_hw);
    let (base, select, pins) = loaded(env, at);
    let v = match off {
        IOREGSEL => select,
        IOWIN => match rte_of(select, pins) {
            Some((pin, high)) => {
                let v = env.hv().ioapics.lock()[at].shadow[pin as usize];
                if high {
                    (v >> 32) as u32
                } else {
                    let live = hw_read(env, base, select) & ioapic::READ_ONLY as u32;
                    (v as u32 & !(ioapic::READ_ONLY as u32)) | live
                }
            }
            None => hw_read(env, base, select),
        },
        _ => env.mmio_read(base + off, 4),
    };
    release(&env.hv().ioapic_hw);
    v
}

/// A store of the OS's of `value` at `off` of I/O APIC `at`.
fn write(env: &mut impl Env, at: usize, off: u64, value: u32) {
    hold(&env.hv().ioapic_hw);
    let (base, select, pins) = loaded(env, at);
    match off {
        IOREGSEL => env.hv().ioapics.lock()[at].select = value & 0xff,
        IOWIN => match rte_of(select, pins) {
            Some((pin, high)) => {
                {
                    let mut list = env.hv().ioapics.lock();
                    let e = &mut list[at].shadow[pin as usize];
                    *e = if high {
                        (*e & 0xffff_ffff) | u64::from(value) << 32
                    } else {
                        (*e & !0xffff_ffff) | u64::from(value & !(ioapic::READ_ONLY as u32))
                    };
                }
                // Linux writes the high dword first: the low one completes
                // the entry, and only a refusal then is counted.
                program(env, at, base, pin, !high);
            }
            // Its ID (version and arbitration are read-only); nothing
            // else, so that no alias of an entry is reached.
            None if select == REG_ID => hw_write(env, base, select, value),
            None => ignored(env, base, off, value),
        },
        EOI => env.mmio_write(base + EOI, 4, value),
        _ => ignored(env, base, off, value),
    }
    release(&env.hv().ioapic_hw);
}

/// A store the I/O APIC has no register for (or a read-only one): not
/// passed on.
fn ignored(env: &impl Env, base: u64, off: u64, value: u32) {
    log::debug!(
        "cpu {}: I/O APIC {base:#x}: store of {value:#x} at +{off:#x} ignored",
        env.cpu_index()
    );
}

/// Judges every entry of every I/O APIC now, the firmware's included (at
/// the claim, before any appliance runs), rather than at the OS's first
/// access: an OS that never touches its I/O APIC keeps no entry aimed
/// elsewhere either.
pub fn load_all(env: &mut impl Env) {
    let n = env.hv().ioapics.lock().len();
    for at in 0..n {
        hold(&env.hv().ioapic_hw);
        let _ = loaded(env, at);
        release(&env.hv().ioapic_hw);
    }
}

/// The entry and half an IOREGSEL value selects, if it selects one.
fn rte_of(select: u32, pins: u32) -> Option<(u32, bool)> {
    let i = select.checked_sub(FIRST_RTE)?;
    (i / 2 < pins).then_some((i / 2, i % 2 == 1))
}

/// Writes the hardware's entry `pin` from the OS's: judged if unmasked,
/// else masked (a refusal noted where `note`). The high dword goes first
/// with the low one masked, so the entry is never live with half of
/// another.
fn program(env: &mut impl Env, at: usize, base: u64, pin: u32, note: bool) {
    let (rte, source) = {
        let list = env.hv().ioapics.lock();
        (list[at].shadow[pin as usize], list[at].source)
    };
    // Where the IOMMU remaps this I/O APIC's messages, an entry of its
    // table holds the judged target and the I/O APIC names the entry.
    let remapped = source.filter(|&s| env.remaps_interrupts(s));
    let hw = if rte & ioapic::MASK != 0 {
        ioapic::refused(rte)
    } else {
        let cores = PartitionCores {
            hv: env.hv(),
            id: PartitionId::OS,
        };
        let judged = irq_remap::decode_ioapic(rte)
            .and_then(|r| irq_remap::judge(&r, &cores, OS_POLICY))
            .and_then(|t| match remapped {
                Some(sid) => remapped_rte(env, sid, pin, rte, t),
                None => ioapic::physical(rte, &t).ok_or(irq_remap::Refusal::Foreign),
            });
        match judged {
            Ok(v) => {
                env.hv().ioapics.lock()[at].refused[pin as usize] = None;
                v
            }
            Err(why) => {
                if note {
                    note_refusal(env, at, pin, rte, why.describe());
                }
                if let Some(sid) = remapped {
                    // Its entry, if it had one, is no longer present.
                    let _ = env.remap_interrupt(sid, pin as u16, None);
                }
                ioapic::refused(rte)
            }
        }
    };
    let index = FIRST_RTE + 2 * pin;
    if hw_read(env, base, index + 1) == (hw >> 32) as u32 {
        // The same destination: the low dword alone (masking around it
        // could lose an edge).
        hw_write(env, base, index, hw as u32);
        return;
    }
    hw_write(env, base, index, (hw as u32) | ioapic::MASK as u32);
    hw_write(env, base, index + 1, (hw >> 32) as u32);
    hw_write(env, base, index, hw as u32);
}

/// The hardware's entry for `pin` of the I/O APIC sending as `sid`,
/// whose entry in the IOMMU's table now delivers `t`: in remappable
/// format (VT-d) naming that entry, or as judged where the IOMMU gave a
/// message in compatibility format.
fn remapped_rte(
    env: &mut impl Env,
    sid: u16,
    pin: u32,
    rte: u64,
    t: irq_remap::Target,
) -> Result<u64, irq_remap::Refusal> {
    let (addr, data) = env.remap_interrupt(sid, pin as u16, Some(t))?;
    match irq_remap::vtd::handle_of(addr, data) {
        Some(handle) => Ok(irq_remap::vtd::ioapic_rte(
            handle,
            &t,
            rte & ioapic::ACTIVE_LOW != 0,
            false,
        )),
        None => ioapic::physical(rte, &t).ok_or(irq_remap::Refusal::Foreign),
    }
}

/// Counts and logs (rate-limited) a refused entry, once however often the
/// OS writes it again.
fn note_refusal(env: &impl Env, at: usize, pin: u32, rte: u64, why: &str) {
    let (id, first) = {
        let mut list = env.hv().ioapics.lock();
        let a = &mut list[at];
        let last = &mut a.refused[pin as usize];
        let first = *last != Some(rte);
        *last = Some(rte);
        (a.base, first)
    };
    if !first {
        return;
    }
    let n = env.hv().refused_rtes.fetch_add(1, Ordering::Relaxed) + 1;
    if n <= LOG_FIRST || n.is_multiple_of(1024) {
        log::warn!(
            "cpu {}: I/O APIC entry {pin} ({id:#x}) {rte:#018x} refused: {why}; masked ({n} refused so far)",
            env.cpu_index()
        );
    }
}
