//! Stores of the OS's to the HPET's register page, passed on without FSB
//! delivery (`thinhv_passthrough::hpet`).
//!
//! Where appliances run and thinhv judges interrupts, the loader names
//! the HPET (`Handoff::hpet`) and its page is read-only in the OS's
//! second-level tables: reads are the hardware's, every store exits here
//! and reaches the HPET as written but for Tn_FSB_EN_CNF (and, in a store
//! that asked for it, the timer's Tn_INT_ENB_CNF), so no timer sends a
//! message of the OS's composing (an NMI at an appliance's processor
//! among them). A timer the OS programs without FSB interrupts through
//! its I/O APIC route, whose entries thinhv judges (`handlers::ioapic`).
//! A store that would cross into the next page is skipped.
// A quadword store is passed on as its two dwords: the casts split it.
#![allow(clippy::cast_possible_truncation)]
use super::Outcome;
use crate::env::Env;
use crate::guest::{GuestCpu, vector};
use crate::insn::StoreSource;
use core::sync::atomic::Ordering;
use thinhv_passthrough::hpet::without_fsb;

/// Refusals logged one by one; after that every 1024th.
const LOG_FIRST: u64 = 8;

/// A store of the OS's at `gpa`, in the HPET's page (`None`: not that
/// page).
pub(super) fn write(cpu: &mut impl GuestCpu, env: &mut impl Env, gpa: u64) -> Option<Outcome> {
    let page = gpa & !0xfff;
    if env.hv().hpet == 0 || page != env.hv().hpet {
        return None;
    }
    let me = env.cpu_index();
    let Some(d) = super::decode_current(cpu, env) else {
        log::error!(
            "cpu {me}: cannot decode the HPET store at rip {:#x}; #GP",
            cpu.rip()
        );
        cpu.inject_exception(vector::GP, Some(0));
        return Some(Outcome::Resume);
    };
    let next = super::wrap_ip(cpu.mode(), cpu.rip().wrapping_add(d.len() as u64));
    cpu.set_rip(next);
    let off = gpa & 0xfff;
    let Some(store) = d
        .store()
        .filter(|s| !s.exchange && s.size <= 8 && off + u64::from(s.size) <= 0x1000)
    else {
        log::error!(
            "cpu {me}: unsupported HPET access {:?} at {gpa:#x} (rip {:#x}); skipped",
            d.mnemonic(),
            cpu.rip()
        );
        return Some(Outcome::Resume);
    };
    let value = match store.source {
        StoreSource::Immediate(v) => v,
        StoreSource::Register(r) => cpu.gpr(r),
    };
    let (value, refused) = without_fsb(off, store.size, value);
    if let Some(timer) = refused {
        let n = env.hv().refused_fsb.fetch_add(1, Ordering::Relaxed) + 1;
        if n <= LOG_FIRST || n.is_multiple_of(1024) {
            log::warn!(
                "the OS: HPET timer {timer}: FSB delivery refused (its messages would not go through thinhv's entries), and with it the timer's interrupt ({n} so far)"
            );
        }
    }
    // A quadword as two dwords, low first, as a 32-bit OS writes one (a
    // periodic timer's Tn_VAL_SET_CNF then applies to the low half only:
    // `docs/appliances.md`).
    if store.size == 8 {
        env.mmio_write(gpa, 4, value as u32);
        env.mmio_write(gpa + 4, 4, (value >> 32) as u32);
    } else {
        env.mmio_write(gpa, store.size, value as u32);
    }
    Some(Outcome::Resume)
}
