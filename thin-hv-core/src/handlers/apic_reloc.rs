//! The local APIC's xAPIC page moved with IA32_APIC_BASE, emulated (Intel
//! SDM Vol. 3A §12.4.4 "Local APIC Status and Location" and §12.4.5
//! "Relocating the Local APIC Registers"; AMD APM Vol. 2 §16.3.1 "Local
//! APIC Enable": each processor's APIC page is where its own
//! IA32_APIC_BASE says).
//!
//! The hardware's base never moves: the host keeps using every APIC at the
//! real base ([`Hv::apic_base`](crate::hv::Hv)), where thinhv's ICR trap
//! is, and no new base is ever written to the processor. Each CPU has the
//! base its guest set instead ([`CpuSlot::apic_vbase`](crate::hv::CpuSlot),
//! which a read of IA32_APIC_BASE returns). When a CPU moves to page X:
//!
//! * X leaves the second-level tables, which all CPUs share
//!   ([`Env::apic_page_trap`]), so every access to it, from any CPU, exits
//!   here;
//! * an access from a CPU in xAPIC mode whose base is X is an access to
//!   its own APIC register at that offset: reads through
//!   [`Env::lapic_read`], writes through the path of every other APIC
//!   write ([`super::npf::apic_write`]), so the ICR stays filtered (INIT
//!   and SIPI virtualized, [`super::ipi`]);
//! * an access from any other CPU is an ordinary access to physical X,
//!   made with the guest's own width (as the ECAM mediation does);
//! * while any CPU is away from the real base, the real page leaves the
//!   tables too, reads included. A CPU still at the real base reaches its
//!   APIC there as before (emulated now). A CPU in xAPIC mode that moved
//!   away reaches nothing: on bare metal its APIC no longer decodes that
//!   page, and the host cannot make the access for it (the access would
//!   reach the very APIC the guest moved), so reads return all ones, as an
//!   address nothing claims does, and writes are dropped. A CPU in x2APIC
//!   mode, or with its APIC disabled, has no xAPIC page anywhere (SDM Vol.
//!   3A §12.12.1): its accesses to either page are ordinary ones, which the
//!   host makes with the APIC in that same mode.
//!
//! Moving back (or every CPU leaving X) maps the pages back as they were.
//!
//! TLB consistency. Only the CPU that moved must stop using translations it
//! may have cached (of X, of the real page): it flushes its own guest TLB
//! before it resumes ([`Outcome::ResumeFlushTlb`]). Another CPU may keep a
//! cached translation of X (identity, as before) or of the real page
//! (read-only, as before) until its TLB drops it; for that CPU X is
//! ordinary memory and the real page its own APIC, which is exactly what
//! those translations reach, so no CPU's view is wrong while it holds one
//! and no shootdown is needed. (A CPU that moves later flushes itself
//! then.) Splitting a large page to take X out leaves every other 4 KiB
//! translation and its attributes as they were, so old and new entries
//! that coexist for a while (SDM Vol. 3A §4.10.2.3) map the same. The ICR
//! filter does not depend on TLBs at all: the hardware APIC is only at the
//! real base, which the guest never has a writable translation of (SVM,
//! and VMX with INIT/SIPI intercepted; with the wait-for-SIPI activity
//! state INIT always exits on VMX).
//!
//! A page stays in [`Relocations`] for as long as it is out of the tables
//! (listed before it is unmapped, dropped after it is mapped back), so a
//! fault on a page thinhv took out is never mistaken for a first touch of
//! unmapped address space.
use super::{Outcome, decode_current, npf, wrap_ip};
use crate::apic::{APIC_BASE_EN, APIC_BASE_EXTD, IA32_APIC_BASE};
use crate::env::Env;
use crate::guest::{GuestCpu, vector};
use crate::insn::{Load, StoreSource};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use thinhv_abi::handoff::MAX_CPUS;
use thinhv_passthrough::mediate::all_ones;

const PAGE: u64 = 4096;
/// An empty slot of [`Relocations::pages`] (never a page address).
const EMPTY: u64 = u64::MAX;
/// IA32_APIC_BASE's base field (SDM Vol. 3A Figure 12-5).
const BASE: u64 = super::msr_policy::apic_base::BASE;

/// The pages taken out of the second-level tables for relocated APICs
/// (each CPU's base away from the real one, and the real page while any
/// is away), and the lock under which a CPU moves.
#[derive(Debug)]
pub struct Relocations {
    /// Held while one CPU changes its base and the tables.
    lock: AtomicBool,
    /// Pages listed in `pages`.
    count: AtomicU32,
    /// The pages, [`EMPTY`] where free: one per CPU at most, and the real
    /// base.
    pages: [AtomicU64; MAX_CPUS + 1],
}

impl Default for Relocations {
    fn default() -> Self {
        Self {
            lock: AtomicBool::new(false),
            count: AtomicU32::new(0),
            pages: core::array::from_fn(|_| AtomicU64::new(EMPTY)),
        }
    }
}

impl Relocations {
    /// Whether `page` is out of the tables, its accesses emulated here.
    pub fn is_trapped(&self, page: u64) -> bool {
        self.count.load(Ordering::SeqCst) != 0
            && self.pages.iter().any(|p| p.load(Ordering::SeqCst) == page)
    }

    /// How many pages are out of the tables.
    pub fn trapped(&self) -> u32 {
        self.count.load(Ordering::SeqCst)
    }

    /// Lists `page` (under the lock, before it leaves the tables).
    fn insert(&self, page: u64) {
        if let Some(slot) = self
            .pages
            .iter()
            .find(|p| p.load(Ordering::SeqCst) == EMPTY)
        {
            self.count.fetch_add(1, Ordering::SeqCst);
            slot.store(page, Ordering::SeqCst);
        }
    }

    /// Drops `page` (under the lock, after it is back in the tables).
    fn remove(&self, page: u64) {
        for p in &self.pages {
            if p.load(Ordering::SeqCst) == page {
                p.store(EMPTY, Ordering::SeqCst);
                self.count.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

/// Takes the lock. A spin flag rather than a guard: the guard would
/// borrow `env`, which the table changes need mutably.
fn lock(env: &impl Env) {
    crate::hv::hold(&env.hv().apic_reloc.lock);
}

fn unlock(env: &impl Env) {
    crate::hv::release(&env.hv().apic_reloc.lock);
}

/// This CPU's xAPIC base as its guest set it.
pub(super) fn guest_base(env: &impl Env) -> u64 {
    env.hv().cpus()[env.cpu_index()]
        .apic_vbase
        .load(Ordering::SeqCst)
}

/// IA32_APIC_BASE as this CPU's guest reads it: the processor's flags
/// (BSP, EXTD, EN) with the guest's own base.
pub(super) fn msr_value(env: &impl Env) -> u64 {
    (env.read_msr(IA32_APIC_BASE) & !BASE) | guest_base(env)
}

/// Moves this CPU's xAPIC page to `new` (a page-aligned base the MSR
/// policy accepted). Err says why the page cannot be emulated there; then
/// nothing changed.
pub(super) fn move_to(env: &mut impl Env, new: u64) -> Result<(), &'static str> {
    let hv = env.hv();
    if new != hv.apic_base {
        if hv.touches_hypervisor(new, PAGE) {
            return Err("the page belongs to the hypervisor");
        }
        if hv.ram().iter().any(|r| r.overlaps(new, PAGE)) {
            // Other CPUs' accesses to it would all have to be emulated,
            // instruction fetches and string moves included.
            return Err("the page is RAM the OS owns");
        }
        if hv.pci.mediated_at(new).is_some() {
            return Err("the page is a mediated PCI configuration page");
        }
        if hv.is_ioapic_page(new) {
            // Moving back would map it to the OS (`handlers::ioapic`).
            return Err("the page holds an I/O APIC's registers");
        }
        if hv.is_hpet_page(new) {
            // Its stores would reach the HPET unfiltered, and moving back
            // would map it writable (`handlers::hpet`).
            return Err("the page holds the HPET's registers");
        }
    }
    lock(env);
    let r = relocate(env, new);
    unlock(env);
    if r.is_ok() {
        log::debug!(
            "cpu {}: xAPIC page moved to {new:#x} (emulated; {} pages trapped)",
            env.cpu_index(),
            env.hv().apic_reloc.trapped()
        );
    }
    r
}

/// [`move_to`] under the lock.
fn relocate(env: &mut impl Env, new: u64) -> Result<(), &'static str> {
    let me = env.cpu_index();
    let real = env.hv().apic_base;
    let old = guest_base(env);
    env.hv().cpus()[me].apic_vbase.store(new, Ordering::SeqCst);
    // The new page first: only it can need new table frames, and nothing
    // else has changed yet if it fails.
    if !sync(env, new) {
        env.hv().cpus()[me].apic_vbase.store(old, Ordering::SeqCst);
        return Err("the core cannot trap that page");
    }
    if !sync(env, real) {
        env.hv().cpus()[me].apic_vbase.store(old, Ordering::SeqCst);
        sync(env, new);
        return Err("the core cannot trap the xAPIC page");
    }
    sync(env, old);
    Ok(())
}

/// Makes the tables agree with the CPUs' bases for `page`: out while a
/// CPU's base is there (the real page: while any CPU's base is elsewhere),
/// back in otherwise. False only when taking it out failed (nothing
/// changed then); a page that cannot be mapped back stays out, and its
/// accesses stay emulated.
fn sync(env: &mut impl Env, page: u64) -> bool {
    let hv = env.hv();
    let real = hv.apic_base;
    let bases = || {
        hv.cpus()
            .iter()
            .map(|c| c.apic_vbase.load(Ordering::SeqCst))
    };
    let wanted = if page == real {
        bases().any(|b| b != real)
    } else {
        bases().any(|b| b == page)
    };
    let out = hv.apic_reloc.is_trapped(page);
    if wanted && !out {
        hv.apic_reloc.insert(page);
        if !env.apic_page_trap(page, true) {
            env.hv().apic_reloc.remove(page);
            return false;
        }
    } else if !wanted && out {
        if env.apic_page_trap(page, false) {
            env.hv().apic_reloc.remove(page);
        } else {
            log::error!(
                "cpu {}: cannot map {page:#x} back; its accesses stay emulated",
                env.cpu_index()
            );
        }
    }
    true
}

/// What an access to a trapped page reaches, for the CPU making it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// Its own APIC's registers.
    Register,
    /// Nothing: the page its APIC left.
    Nothing,
    /// Physical memory (or a device) at that address.
    Plain,
}

/// An access at `gpa` that faulted: emulated here when its page is one the
/// relocation took out of the tables, else None (not ours).
pub(super) fn access(
    cpu: &mut impl GuestCpu,
    env: &mut impl Env,
    gpa: u64,
    fetch: bool,
) -> Option<Outcome> {
    let hv = env.hv();
    let page = gpa & !(PAGE - 1);
    if !hv.apic_reloc.is_trapped(page) {
        return None;
    }
    let me = env.cpu_index();
    let real = hv.apic_base;
    let base = guest_base(env);
    let hw = env.read_msr(IA32_APIC_BASE);
    let xapic = hw & APIC_BASE_EN != 0 && hw & APIC_BASE_EXTD == 0;
    let target = if xapic && page == base {
        Target::Register
    } else if xapic && page == real {
        Target::Nothing
    } else {
        Target::Plain
    };
    if fetch {
        // Nothing the core can execute for the guest.
        log::warn!(
            "cpu {me}: instruction fetch from the trapped page {page:#x} (rip {:#x}); #UD",
            cpu.rip()
        );
        cpu.inject_exception(vector::UD, None);
        return Some(Outcome::Resume);
    }
    Some(emulate(cpu, env, gpa, target))
}

fn emulate(cpu: &mut impl GuestCpu, env: &mut impl Env, gpa: u64, target: Target) -> Outcome {
    let me = env.cpu_index();
    let Some(d) = decode_current(cpu, env) else {
        log::error!(
            "cpu {me}: cannot decode the access to {gpa:#x} at rip {:#x}; #GP",
            cpu.rip()
        );
        cpu.inject_exception(vector::GP, Some(0));
        return Outcome::Resume;
    };
    let offset = gpa & (PAGE - 1);
    let fits = |size: u8| matches!(size, 1 | 2 | 4) && offset + u64::from(size) <= PAGE;
    let load = d.load().filter(|l| fits(l.size));
    if target == Target::Register && load.is_none() {
        // Stores, XCHG and the unsupported rest: as at the real base.
        return npf::apic_write(cpu, env, gpa);
    }
    let next = wrap_ip(cpu.mode(), cpu.rip().wrapping_add(d.len() as u64));
    if let Some(load) = load {
        let v = match target {
            Target::Register => register_read(env, offset, load.size),
            Target::Nothing => all_ones(load.size),
            Target::Plain => env.mmio_read(gpa, load.size),
        };
        set_loaded(cpu, load, v);
    } else if let Some(store) = d.store().filter(|s| fits(s.size) && !s.exchange) {
        let value = match store.source {
            StoreSource::Immediate(v) => v,
            StoreSource::Register(r) => cpu.gpr(r),
        };
        let value = ((value & 0xffff_ffff) as u32) & all_ones(store.size);
        if target == Target::Plain {
            env.mmio_write(gpa, store.size, value);
        }
    } else {
        log::error!(
            "cpu {me}: unsupported access {:?} to {gpa:#x} (rip {:#x}); skipped",
            d.mnemonic(),
            cpu.rip()
        );
    }
    cpu.set_rip(next);
    Outcome::Resume
}

/// `size` bytes at `offset` of this CPU's xAPIC page: each register is the
/// first dword of its 16-byte slot (SDM Vol. 3A Table 12-1), the rest of
/// the slot reads as zero.
fn register_read(env: &impl Env, offset: u64, size: u8) -> u32 {
    // Below 4 KiB.
    let offset = (offset & (PAGE - 1)) as u32;
    let dword = if offset & 0xc == 0 {
        env.lapic_read(offset & 0xff0)
    } else {
        0
    };
    (dword >> (8 * (offset & 3))) & all_ones(size)
}

fn set_loaded(cpu: &mut impl GuestCpu, load: Load, value: u32) {
    let old = cpu.gpr(load.dest);
    cpu.set_gpr(load.dest, load.merge(old, u64::from(value)));
}
