//! Loads and stores of the OS's to the register page of its emulated
//! VT-d unit (`[iommu] os = "emulated"`, [`crate::os_iommu`]): the real
//! unit's page, out of the OS's second-level tables where the OS has a
//! unit of its own, so that every access exits here and the model answers
//! it. A store is applied in full (contexts, shadows, the real unit's
//! invalidation) before the instruction completes.
use super::Outcome;
use crate::env::Env;
use crate::guest::{GuestCpu, vector};
use crate::insn::StoreSource;
use crate::os_iommu::{Machine, OsIommuHw, OsRam, OsReach};

/// Events the OS programmed that thinhv does not deliver yet, logged
/// this many times.
const LOG_FIRST: u64 = 4;

/// An access of the OS's at `gpa` (`None`: not a page of its units).
pub(super) fn access(cpu: &mut impl GuestCpu, env: &mut impl Env, gpa: u64) -> Option<Outcome> {
    let page = gpa & !0xfff;
    let at = env.hv().os_vtd.lock().iter().position(|u| u.base == page)?;
    if !env.hv().space_of(env.cpu_index()).is_os() {
        return None;
    }
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
    let off = gpa & 0xfff;
    if let Some(load) = d.load().filter(|l| l.size <= 8) {
        let v = env.hv().os_vtd.lock()[at].unit.read(off, load.size);
        let old = cpu.gpr(load.dest);
        cpu.set_gpr(load.dest, load.merge(old, v));
    } else if let Some(store) = d.store().filter(|s| s.size <= 8 && !s.exchange) {
        let value = match store.source {
            StoreSource::Immediate(v) => v,
            StoreSource::Register(r) => cpu.gpr(r),
        };
        write(env, at, off, store.size, value);
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

fn write(env: &mut impl Env, at: usize, off: u64, size: u8, value: u64) {
    let Some(mut host) = env.os_iommu() else {
        log::error!("the OS's IOMMU: no host side; register write at {off:#x} dropped");
        return;
    };
    let hv = env.hv();
    let (pt, frames, ram, real) = host.parts();
    let mut os = OsRam { hv, ram };
    let reach = OsReach { hv };
    let owned = |rid: u16| {
        !hv.pci.is_blocked(rid)
            && !hv
                .appliances()
                .any(|(_, p)| p.info.devices().iter().any(|d| d.rid == rid))
    };
    let mut units = hv.os_vtd.lock();
    let unit = &mut units[at];
    let before = unit.unit.translating();
    let fx = unit.write(
        off,
        size,
        value,
        &mut Machine {
            os: &mut os,
            reach: &reach,
            owned: &owned,
            pt,
            frames,
            real,
        },
    );
    if let Some(on) = fx.translation
        && on != before
    {
        log::info!(
            "the OS's IOMMU {:#x}: translation {} ({} domain(s) shadowed)",
            unit.base,
            if on { "on" } else { "off" },
            unit.domains()
        );
    }
    let status = unit.status();
    drop(units);
    env.publish_os_iommu(at, status);
    let mut units = env.hv().os_vtd.lock();
    let unit = &mut units[at];
    if let Some(e) = fx.queue_error {
        log::warn!(
            "the OS's IOMMU {:#x}: invalidation queue stopped: {}",
            unit.base,
            e.describe()
        );
    }
    if fx.fault_event.is_some() || fx.completion_event.is_some() {
        unit.events_dropped += 1;
        if unit.events_dropped <= LOG_FIRST {
            log::warn!(
                "the OS's IOMMU {:#x}: an event interrupt the OS asked for is not delivered (not built yet)",
                unit.base
            );
        }
    }
}
