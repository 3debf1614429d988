//! Loads and stores of the OS's to the register window of its emulated
//! VT-d or AMD-Vi unit (`[iommu] os = "emulated"`, [`crate::os_iommu`]):
//! the real unit's window, out of the OS's second-level tables where the
//! OS has a unit of its own, so that every access exits here and the model
//! answers it. A store is applied in full (contexts, shadows, the real unit's
//! invalidation) before the instruction completes.
use super::Outcome;
use crate::env::Env;
use crate::guest::{GuestCpu, vector};
use crate::insn::StoreSource;
use crate::os_iommu::{Machine, OsIommuHw, OsRam, OsReach};
use core::sync::atomic::Ordering;

/// Events the OS programmed that thinhv does not deliver yet, logged
/// this many times.
const LOG_FIRST: u64 = 4;

/// TSC cycles between two polls of the real units' faults at the OS's
/// exits (about a millisecond at 2 GHz).
const POLL_EVERY: u64 = 2_000_000;

/// An access of the OS's at `gpa` (`None`: not a page of its units).
pub(super) fn access(cpu: &mut impl GuestCpu, env: &mut impl Env, gpa: u64) -> Option<Outcome> {
    if env.hv().os_unit_count.load(Ordering::Relaxed) == 0
        || !env.hv().space_of(env.cpu_index()).is_os()
    {
        return None;
    }
    let (at, base) = env
        .hv()
        .os_units
        .lock()
        .iter()
        .enumerate()
        .find(|(_, u)| u.covers(gpa))
        .map(|(i, u)| (i, u.base()))?;
    // What the real unit refused so far is in the OS's registers before
    // the OS reads them.
    env.iommu_poll();
    deliver_faults(env);
    let Some(d) = super::decode_current(cpu, env) else {
        log::error!(
            "cpu {}: cannot decode the IOMMU register access at rip {:#x}; #GP",
            env.cpu_index(),
            cpu.rip()
        );
        cpu.inject_exception(vector::GP, Some(0));
        return Some(Outcome::Resume);
    };
    let next = super::wrap_ip(cpu.mode(), cpu.rip().wrapping_add(d.len() as u64));
    let off = gpa - base;
    if let Some(load) = d.load().filter(|l| l.size <= 8) {
        let v = env.hv().os_units.lock()[at].read(off, load.size);
        let old = cpu.gpr(load.dest);
        cpu.set_gpr(load.dest, load.merge(old, v));
    } else if let Some(store) = d.store().filter(|s| s.size <= 8 && !s.exchange) {
        let value = match store.source {
            StoreSource::Immediate(v) => v,
            StoreSource::Register(r) => cpu.gpr(r),
        };
        write(env, at, off, store.size, value);
    } else if let Some(mv) = d.string_move() {
        // `memcpy_toio` (Linux writes the AMD-Vi base registers so): one
        // element per exit; a `rep` stays on the instruction until RCX is
        // spent, so the next element exits again.
        return Some(string_store(cpu, env, at, base, gpa, mv, next));
    } else {
        log::error!(
            "cpu {}: unsupported IOMMU register access {:?} at {gpa:#x} (rip {:#x}); skipped",
            env.cpu_index(),
            d.mnemonic(),
            cpu.rip()
        );
    }
    cpu.set_rip(next);
    Some(Outcome::Resume)
}

/// One element of a string move into unit `at`'s window (at `base`),
/// the destination `gpa`: read from the OS's memory at its source, written
/// to the unit, RSI and RDI stepped, RCX counted down under `rep` (the
/// instruction re-executes until it is spent; `next` once it is).
fn string_store(
    cpu: &mut impl GuestCpu,
    env: &mut impl Env,
    at: usize,
    base: u64,
    gpa: u64,
    mv: crate::insn::StringMove,
    next: u64,
) -> Outcome {
    use crate::guest::Gpr;
    let mask = if mv.wide { u64::MAX } else { 0xffff_ffff };
    let size = u64::from(mv.size);
    let seg = match mv.seg {
        s @ (crate::guest::SegReg::Fs | crate::guest::SegReg::Gs) => cpu.segment_base(s),
        s if cpu.mode() != crate::guest::CpuMode::Bits64 => cpu.segment_base(s),
        _ => 0,
    };
    let src = seg.wrapping_add(cpu.gpr(Gpr::Rsi) & mask);
    let regs = cpu.paging();
    // Only into the window: a move out of it (`memcpy_fromio`) is not
    // emulated.
    let es = if cpu.mode() == crate::guest::CpuMode::Bits64 {
        0
    } else {
        cpu.segment_base(crate::guest::SegReg::Es)
    };
    let dst = es.wrapping_add(cpu.gpr(Gpr::Rdi) & mask);
    if crate::guest_mem::translate(env, &regs, dst) != Some(gpa) {
        log::error!(
            "cpu {}: unsupported IOMMU register string move at {gpa:#x} (rip {:#x}); skipped",
            env.cpu_index(),
            cpu.rip()
        );
        cpu.set_rip(next);
        return Outcome::Resume;
    }
    let mut bytes = [0u8; 8];
    let buf = &mut bytes[..usize::from(mv.size)];
    // Byte by byte: an element may straddle a page. Only the OS's RAM is
    // a source: not a register page it cannot read itself (the real
    // unit's window, a hidden function's), not thinhv's memory nor an
    // appliance's.
    for (i, b) in buf.iter_mut().enumerate() {
        let hv = env.hv();
        let ok = crate::guest_mem::translate(env, &regs, src.wrapping_add(i as u64))
            .filter(|&pa| {
                crate::guest_mem::ram_covers(hv.ram(), pa, 1)
                    && !hv.touches_hypervisor(pa, 1)
                    && !hv.foreign_ram(crate::partition::PartitionId::OS, pa, 1)
            })
            .is_some_and(|pa| crate::guest_mem::read_guest_phys(env, pa, core::slice::from_mut(b)));
        if !ok {
            log::error!(
                "cpu {}: IOMMU register string move from {src:#x}: source not mapped or not the OS's RAM (rip {:#x}); #GP",
                env.cpu_index(),
                cpu.rip()
            );
            cpu.inject_exception(vector::GP, Some(0));
            return Outcome::Resume;
        }
    }
    let value = u64::from_le_bytes(bytes);
    write(env, at, gpa - base, mv.size, value);
    let step = if cpu.rflags() & (1 << 10) != 0 {
        size.wrapping_neg()
    } else {
        size
    };
    for r in [Gpr::Rsi, Gpr::Rdi] {
        let v = cpu.gpr(r);
        cpu.set_gpr(r, (v & !mask) | (v.wrapping_add(step) & mask));
    }
    let more = if mv.rep {
        let c = cpu.gpr(Gpr::Rcx);
        let left = (c & mask).wrapping_sub(1) & mask;
        cpu.set_gpr(Gpr::Rcx, (c & !mask) | left);
        left != 0
    } else {
        false
    };
    if !more {
        cpu.set_rip(next);
    }
    Outcome::Resume
}

/// At the OS's exits: now and then (every [`POLL_EVERY`] TSC cycles at
/// most), the real units' faults are collected and the OS's own reported
/// to it.
pub(super) fn tick(env: &mut impl Env) {
    let hv = env.hv();
    if hv.os_unit_count.load(Ordering::Relaxed) == 0 || !hv.space_of(env.cpu_index()).is_os() {
        return;
    }
    let now = env.tsc();
    let last = hv.os_iommu_polled.load(Ordering::Relaxed);
    if now.wrapping_sub(last) < POLL_EVERY
        || hv
            .os_iommu_polled
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
    {
        return;
    }
    env.iommu_poll();
    deliver_faults(env);
}

/// The real units' faults of the OS's requesters: those of the OS's own
/// making recorded in its units, and their fault events sent.
pub(super) fn deliver_faults(env: &mut impl Env) {
    if env.hv().os_unit_count.load(Ordering::Relaxed) == 0
        || !env.hv().space_of(env.cpu_index()).is_os()
    {
        return;
    }
    let faults = env.take_os_iommu_faults();
    if faults.is_empty() {
        return;
    }
    let Some(mut host) = env.os_iommu() else {
        return;
    };
    let mut events = alloc::vec::Vec::new();
    let mut statuses = alloc::vec::Vec::new();
    {
        let hv = env.hv();
        let (_, _, ram, _) = host.parts();
        let mut os = OsRam { hv, ram };
        let mut units = hv.os_units.lock();
        for f in faults {
            // Only the OS's own requesters' faults are the OS's to hear of
            // (an appliance's DMA is not its business).
            if !owns(hv, f.sid) {
                continue;
            }
            let Some(unit) = units.get_mut(f.unit) else {
                continue;
            };
            if let Some(event) = unit.fault(f, &mut os) {
                statuses.push((f.unit, unit.status()));
                if let Some((ev, x2apic)) = event {
                    events.push((unit.base(), x2apic, ev));
                }
            }
        }
    }
    drop(host);
    for (at, status) in statuses {
        env.publish_os_iommu(at, status);
    }
    for (base, x2apic, ev) in events {
        raise(env, base, x2apic, ev);
    }
}

/// Sends the event interrupt the OS programmed. Where appliances run it
/// is judged as any message of the OS's (to one of its processors, in
/// physical mode); without them every processor is the OS's, and a
/// fixed or lowest-priority message is sent as the OS composed it (Linux
/// aims its fault event at a logical destination in flat mode).
fn raise(env: &mut impl Env, base: u64, x2apic: bool, ev: thinhv_passthrough::vvtd::Event) {
    use thinhv_passthrough::irq_remap::{Delivery, Dest};
    let refused = |why: &str| {
        log::warn!(
            "the OS's IOMMU {base:#x}: its fault event ({:#x}/{:#x}) refused: {why}",
            ev.addr,
            ev.data
        );
    };
    let (dest, logical, vector) = if env.hv().has_appliances() {
        let cores = super::msi_remap::PartitionCores {
            hv: env.hv(),
            id: crate::partition::PartitionId::OS,
        };
        let policy = thinhv_passthrough::irq_remap::Policy {
            nmi: false,
            extint: false,
        };
        match thinhv_passthrough::vvtd::event_target(ev, x2apic, &cores, policy) {
            Ok(t) => (t.apic_id, false, t.vector),
            Err(why) => return refused(why.describe()),
        }
    } else {
        // In x2APIC mode the upper address holds destination bits 31:8.
        let high = if x2apic { ev.upper & !0xff } else { 0 };
        match thinhv_passthrough::irq_remap::decode_msi(u64::from(ev.addr), ev.data) {
            Ok(r) if matches!(r.delivery, Delivery::Fixed | Delivery::Lowest) && r.vector >= 16 => {
                match r.dest {
                    Dest::Physical(d) => (high | u32::from(d), false, r.vector),
                    Dest::Logical(d) => (high | u32::from(d), true, r.vector),
                }
            }
            Ok(_) => return refused("not a fixed interrupt with a vector of 16 or more"),
            Err(why) => return refused(why.describe()),
        }
    };
    // Fixed, edge; logical destination mode where the OS asked for it.
    let low = u32::from(vector) | (u32::from(logical) << 11);
    let x2apic_mode = env.read_msr(crate::apic::IA32_APIC_BASE) & crate::apic::APIC_BASE_EXTD != 0;
    if x2apic_mode && logical && !x2apic {
        // An 8-bit flat destination means nothing to x2APIC's cluster IDs.
        return refused("an 8-bit logical destination with the local APIC in x2APIC mode");
    }
    if x2apic_mode {
        env.x2apic_icr_write((u64::from(dest) << 32) | u64::from(low));
    } else {
        // The OS may be between its own ICR writes: its high half back.
        let high = env.lapic_read(crate::apic::reg::ICR_HIGH);
        env.lapic_write(crate::apic::reg::ICR_HIGH, dest << 24);
        env.lapic_write(crate::apic::reg::ICR_LOW, low);
        env.lapic_write(crate::apic::reg::ICR_HIGH, high);
    }
}

/// Whether requester `rid` is the OS's: neither hidden nor an appliance's.
fn owns(hv: &crate::hv::Hv, rid: u16) -> bool {
    !hv.pci.is_blocked(rid)
        && !hv
            .appliances()
            .any(|(_, p)| p.info.devices().iter().any(|d| d.rid == rid))
}

fn write(env: &mut impl Env, at: usize, off: u64, size: u8, value: u64) {
    let Some(mut host) = env.os_iommu() else {
        log::error!("the OS's IOMMU: no host side; register write at {off:#x} dropped");
        return;
    };
    let hv = env.hv();
    let (pt, frames, ram, real) = host.parts();
    let mut os = OsRam { hv, ram };
    let reach = OsReach { hv };
    let owned = |rid: u16| owns(hv, rid);
    let cores = super::msi_remap::PartitionCores {
        hv,
        id: crate::partition::PartitionId::OS,
    };
    let mut units = hv.os_units.lock();
    let unit = &mut units[at];
    let before = unit.translating();
    let short_before = unit.counts().short;
    let done = unit.write(
        off,
        size,
        value,
        &mut Machine {
            cores: &cores,
            os: &mut os,
            reach: &reach,
            owned: &owned,
            pt,
            frames,
            real,
        },
    );
    let base = unit.base();
    if let Some(on) = done.translation
        && on != before
    {
        log::info!(
            "the OS's IOMMU {base:#x}: translation {} ({} domain(s) shadowed)",
            if on { "on" } else { "off" },
            unit.domains()
        );
    }
    let status = unit.status();
    let short = unit.counts().short;
    drop(units);
    drop(host);
    env.publish_os_iommu(at, status);
    if short > short_before && short_before == 0 {
        log::error!(
            "the OS's IOMMU {base:#x}: no frame left for its shadows ({} KiB kept): pages the OS maps from now on may be missing, and its devices' DMA there faults",
            thinhv_abi::layout::OS_IOMMU_PAGES * 4
        );
    }
    if let Some(why) = done.stopped {
        log::warn!("the OS's IOMMU {base:#x}: its invalidations stopped: {why}");
    }
    if let Some(what) = done.dropped {
        let n = env.hv().os_iommu_dropped.fetch_add(1, Ordering::Relaxed);
        if n < LOG_FIRST {
            log::warn!("the OS's IOMMU {base:#x}: {what} is not delivered");
        }
    }
    if let Some((ev, x2apic)) = done.event {
        raise(env, base, x2apic, ev);
    }
}
