//! The OS's own VT-d unit, emulated (issue 14, `docs/os-iommu.md`): the
//! register model ([`thinhv_passthrough::vvtd::Unit`]) behind the real
//! unit's register page, and what the OS's programming changes in the real
//! unit: the context entry of each of the OS's requesters and the shadows
//! ([`crate::vvtd_shadow`]) those entries name.
//!
//! * Translation off, or a pass-through context entry: thinhv's domain for
//!   the OS ([`RealContext::Os`]), everything but thinhv's and the
//!   appliances' memory, as without the emulation.
//! * A context entry with second-level tables: the shadow of that domain
//!   of the OS's, synced at the OS's IOTLB invalidations (the unit offers
//!   caching mode, so the OS invalidates after every change, a new mapping
//!   included) and at its context-cache invalidations.
//! * A requester of the OS's without a present context entry while the
//!   OS translates, whether the OS took its entry away or never gave it
//!   one: blocked, every DMA faults, as on a real unit
//!   ([`RealUnit::set_unnamed`]). Past [`MAX_REQUESTERS`] requesters, those
//!   the OS never named keep thinhv's domain for the OS instead.
//! * Requesters that are not the OS's (an appliance's, hidden functions)
//!   are never touched.
//!
//! Everything is applied before the OS's register write completes: the
//! real unit's caches are invalidated before the write that asked for it
//! returns to the OS, as a real unit completes an invalidation.
use crate::vvtd_shadow::{DmaReach, Format, FreeFrames, OsTables, Shadow, ShadowError, Vtd};
use alloc::collections::BTreeMap;
use thinhv_paging::PhysMem;
use thinhv_paging::iommu::ADDR_MASK;
use thinhv_passthrough::irq_remap::{Cores, Policy};
use thinhv_passthrough::vvtd::{
    Context, Effects, Flushes, Offer, OsMemory, OsPageTables, Scope, Sources, Unit,
    sync_entries_within,
};

/// The OS's requesters, for its remapping entries' source validation:
/// `buses[b]` where every requester on bus `b` is the OS's.
struct OwnedSources<'a> {
    owned: &'a dyn Fn(u16) -> bool,
    buses: &'a [bool; 256],
}

impl Sources for OwnedSources<'_> {
    fn is_os(&self, sid: u16) -> bool {
        (self.owned)(sid)
    }
    fn buses_are_os(&self, first: u8, last: u8) -> bool {
        (first..=last).all(|b| self.buses[usize::from(b)])
    }
}

/// The OS's remapping entries in the real table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EntryCounts {
    /// Entries refused (written not present) so far.
    pub refused: u64,
    /// Refusals logged.
    logged: u8,
    /// Which real entries hold one of the OS's (one bit each, as far as
    /// [`ENTRIES_TRACKED`]).
    present: alloc::vec::Vec<u64>,
}

/// Real remapping entries whose use `thinhv status` counts.
const ENTRIES_TRACKED: u32 = 1 << 13;

impl EntryCounts {
    fn set(&mut self, index: u32, present: bool) {
        if index >= ENTRIES_TRACKED {
            return;
        }
        if self.present.is_empty() {
            self.present = alloc::vec![0; (ENTRIES_TRACKED / 64) as usize];
        }
        let (w, b) = ((index / 64) as usize, index % 64);
        if present {
            self.present[w] |= 1 << b;
        } else {
            self.present[w] &= !(1 << b);
        }
    }

    /// The indices of the entries in use.
    fn present_indices(&self) -> impl Iterator<Item = u32> + '_ {
        (0..ENTRIES_TRACKED).filter(|&i| {
            self.present
                .get((i / 64) as usize)
                .is_some_and(|w| w & (1 << (i % 64)) != 0)
        })
    }

    /// Entries in use.
    pub fn in_use(&self) -> u32 {
        self.present.iter().map(|w| w.count_ones()).sum()
    }
}

/// What the real unit's context entry for one of the OS's requesters
/// names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RealContext {
    /// thinhv's domain for the OS.
    Os,
    /// Not present: every DMA of the requester faults.
    Blocked,
    /// A shadow (4-level, its top table) under a real domain ID, with the
    /// requester's own rights on top of the shadow's (AMD-Vi's device
    /// table entry IR and IW; always both on VT-d).
    Shadow {
        /// The shadow's top table.
        root: u64,
        /// Real domain ID ([`real_domain`], [`amdvi_real_domain`]).
        domain: u16,
        /// Reads allowed.
        read: bool,
        /// Writes allowed.
        write: bool,
    },
}

/// The real IOMMU as the emulation changes it.
pub trait RealUnit {
    /// Points requester `rid`'s context entry at `c` (taking effect at the
    /// next [`RealUnit::flush`]); false where it could not (the entry is
    /// left as it was).
    fn set_context(&mut self, rid: u16, c: RealContext) -> bool;
    /// Invalidates the real units' context caches and IOTLBs (`None`), or
    /// the IOTLBs of the real domains `Some(ids)` alone (their leaves
    /// changed, nothing else); false where an invalidation did not
    /// complete.
    fn flush(&mut self, domains: Option<&[u16]>) -> bool;
    /// Writes entry `index` of the real remapping table's OS part (an
    /// index past it is dropped; the OS's messages naming it fault).
    fn write_irte(&mut self, index: u32, entry: [u64; 2]);
    /// Invalidates the real units' interrupt entry caches.
    fn irte_flush(&mut self);
    /// Turns the real units' interrupt remapping on through the OS's part
    /// (32-bit destinations where `x2apic`; compatibility-format messages
    /// passing where `compat`), or off.
    fn set_remapping(&mut self, on: bool, x2apic: bool, compat: bool);
    /// Every requester whose real entry thinhv's own tables give its
    /// domain for the OS, but those `named` (the emulation sets theirs
    /// with [`RealUnit::set_context`]): blocked (the OS translates and
    /// gave them no entry), or back on thinhv's domain for the OS. Takes
    /// effect at the next [`RealUnit::flush`]; false where it could not.
    fn set_unnamed(&mut self, blocked: bool, named: &dyn Fn(u16) -> bool) -> bool;
}

/// The real domain ID of the OS's domain `domain` (the OS's unit offers
/// 256; thinhv's own are below this base).
pub const fn real_domain(domain: u16) -> u16 {
    0x100 + (domain & 0xff)
}

/// The real domain ID of the OS's AMD-Vi domain `domain`: 0x1000 above
/// its own (16-bit IDs; thinhv's own are below 0x100); `None` for the IDs
/// that do not fit (those domains keep thinhv's domain for the OS). The
/// offset keeps DomainID bit 8 as the OS has it: QEMU 10.0's AMD-Vi
/// refuses a device table entry with that bit set (it takes it for a
/// reserved bit; `docs/emulator-faults.md`), and Linux's IDs start at 1,
/// so in QEMU its first 255 domains work. Hardware takes any ID.
pub const fn amdvi_real_domain(domain: u16) -> Option<u16> {
    domain.checked_add(0x1000)
}

/// Shadow leaves looked at per sync call; a sync goes on until done.
const SYNC_BUDGET: u64 = 512;

/// The I/O address space a 4-level shadow covers.
const SPACE: u64 = 1 << 48;

/// Counts for `thinhv status` and the log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Pages mapped into shadows.
    pub mapped: u64,
    /// Pages taken out of shadows.
    pub unmapped: u64,
    /// Pages the OS mapped that thinhv refused (its or an appliance's).
    pub refused: u64,
    /// Shadow entries left out for want of frames.
    pub short: u64,
    /// Real flushes.
    pub flushes: u64,
    /// Times a domain fell back to thinhv's domain for the OS.
    pub degraded: u64,
}

/// A DMA fault the real unit reported for a requester of the OS's under
/// an emulated unit: whose it is, the OS's tables or thinhv's protection,
/// is for [`OsVtd::fault`] to tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RealFault {
    /// The emulated unit (the real unit's index).
    pub unit: usize,
    /// Requester.
    pub sid: u16,
    /// Page.
    pub addr: u64,
    /// A write.
    pub write: bool,
}

/// The OS's unit as `thinhv status` shows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OsUnitStatus {
    /// `thinhv_abi::status::OS_UNIT_*`.
    pub state: u8,
    /// Interrupt remapping on.
    pub remapping: bool,
    /// Domains shadowed.
    pub domains: u16,
    /// Pages in the shadows.
    pub pages: u64,
    /// Pages refused.
    pub refused: u64,
    /// Faults recorded for the OS.
    pub faults: u64,
    /// Real invalidations.
    pub flushes: u64,
    /// Remapping entries of the OS's in the real table.
    pub entries: u32,
}

/// What an OS unit's table entry names for one requester of the OS's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Named {
    /// thinhv's domain for the OS (translation off, pass-through).
    Os,
    /// No DMA (an entry the OS made so, or one the unit refuses).
    Blocked,
    /// The OS's tables of its domain `domain`.
    Tables {
        /// The OS's domain ID.
        domain: u16,
        /// Real domain ID.
        real: u16,
        /// Its tables.
        tables: OsTables,
        /// The requester's own rights on top of its tables'.
        read: bool,
        /// Writes.
        write: bool,
    },
}

/// The DMA side of an OS unit, whatever its kind: the shadows of the
/// OS's domains in the real unit's format `F`, the real entries of the
/// OS's requesters, and the real invalidations. The unit's model says
/// what the OS's tables name ([`Named`]) and when they changed.
#[derive(Debug)]
pub struct Dma<F: Format> {
    base: u64,
    fmt: F,
    shadows: BTreeMap<u16, (Shadow<F>, OsTables, u16)>,
    /// Requesters whose real entry is not [`RealContext::Os`], or was
    /// made so by the OS.
    real: BTreeMap<u16, RealContext>,
    /// What the emulation did.
    pub counts: Counts,
    /// Domains that fall back to thinhv's domain for the OS, with the
    /// tables their shadow could not follow.
    degraded: BTreeMap<u16, OsTables>,
    /// More requesters than [`MAX_REQUESTERS`] are named.
    too_many: bool,
    /// That was logged.
    too_many_logged: bool,
    /// Retired shadows whose frames wait for a real invalidation that
    /// completed.
    parked: alloc::vec::Vec<Shadow<F>>,
    /// Requesters the OS never named are blocked in the real unit.
    unnamed_blocked: bool,
    /// A real invalidation did not complete: the next one is global,
    /// whatever it is for.
    flush_owed: bool,
}

/// One emulated VT-d unit at `base`.
#[derive(Debug)]
pub struct OsVtd {
    /// The register page (the real unit's).
    pub base: u64,
    /// The register model.
    pub unit: Unit,
    /// Its DMA translation.
    pub dma: Dma<Vtd>,
    /// Buses all of whose requesters are the OS's (for its remapping
    /// entries' bus-range validation), worked out once.
    buses_os: Option<alloc::boxed::Box<[bool; 256]>>,
    /// The OS's remapping entries.
    pub entries: EntryCounts,
}

/// What the emulation reaches of the machine: the OS's memory (through
/// [`OsMemory`]), which requesters are the OS's, which pages a shadow may
/// map, thinhv's table memory and frames, and the real unit.
pub struct Machine<'a, M, R, P, F, U, C> {
    /// The OS's processors (for its interrupt remapping entries).
    pub cores: &'a C,
    /// The OS's memory.
    pub os: &'a mut M,
    /// Which pages the OS's devices may reach.
    pub reach: &'a R,
    /// Whether a requester is the OS's.
    pub owned: &'a dyn Fn(u16) -> bool,
    /// thinhv's memory for shadow tables.
    pub pt: &'a mut P,
    /// Frames for shadow tables.
    pub frames: &'a mut F,
    /// The real unit.
    pub real: &'a mut U,
}

impl OsVtd {
    /// A unit out of reset at `base`, offering `offer`.
    pub const fn new(base: u64, offer: Offer) -> Self {
        Self {
            base,
            unit: Unit::new(offer),
            dma: Dma::new(base, Vtd),
            buses_os: None,
            entries: EntryCounts {
                refused: 0,
                logged: 0,
                present: alloc::vec::Vec::new(),
            },
        }
    }

    /// What the unit offers, set before the OS first touches it (the
    /// core learns what the real units can do after the hand-off).
    pub fn set_offer(&mut self, offer: Offer) {
        self.unit = Unit::new(offer);
    }

    /// Domains shadowed.
    pub fn domains(&self) -> usize {
        self.dma.shadows.len()
    }

    /// A real DMA fault of one of the OS's requesters: where the OS's own
    /// tables refused the request, it is recorded in the OS's fault
    /// registers (the fault event the OS then gets is in the effects);
    /// where they allowed it, thinhv's protection refused it, and the OS
    /// is not told (thinhv counts it as any fault of its own).
    pub fn fault(&mut self, f: RealFault, os: &impl OsMemory) -> Option<Effects> {
        let mut fx = Effects::default();
        match self.unit.classify(os, f.sid, f.addr, f.write) {
            Ok(Some(of)) => {
                self.unit.record(of, &mut fx);
                Some(fx)
            }
            Ok(None) | Err(_) => None,
        }
    }

    /// What `thinhv status` shows of the unit (the `os_*` fields of
    /// [`thinhv_abi::status::IommuRecord`]).
    pub fn status(&self) -> OsUnitStatus {
        OsUnitStatus {
            state: if self.unit.translating() {
                thinhv_abi::status::OS_UNIT_TRANSLATING
            } else {
                thinhv_abi::status::OS_UNIT_OFF
            },
            remapping: self.unit.irt().is_some(),
            faults: self.unit.faults_recorded,
            entries: self.entries.in_use(),
            ..self.dma.status()
        }
    }

    /// A register write, and what it changes in the real unit. Returns
    /// what the model asked beyond it (events for the caller to deliver).
    pub fn write<M, R, P, F, U, C>(
        &mut self,
        offset: u64,
        size: u8,
        value: u64,
        m: &mut Machine<'_, M, R, P, F, U, C>,
    ) -> Effects
    where
        M: OsMemory,
        R: DmaReach,
        P: PhysMem,
        F: FreeFrames,
        U: RealUnit,
        C: Cores,
    {
        let mut fx = Effects::default();
        self.unit.write(offset, size, value, m.os, &mut fx);
        let mut w = Work::new();
        let mut changed = false;
        if fx.root || fx.translation.is_some() || !fx.context.is_empty() {
            changed |= self.contexts(m, &mut w);
        }
        let syncs = self.dma.syncs(&fx.iotlb);
        let (leaves, redo) = self.dma.invalidate(&self.unit, syncs, m, &mut w);
        if redo {
            self.contexts(m, &mut w);
            changed = true;
        }
        self.dma.finish(changed, &leaves, w, m);
        if self.unit.offer().remapping {
            self.remapping(&fx, m);
        }
        fx
    }

    /// Reads the OS's context entries and points the real ones to match;
    /// whether any changed.
    fn contexts<M, R, P, F, U, C>(
        &mut self,
        m: &mut Machine<'_, M, R, P, F, U, C>,
        w: &mut Work<Vtd>,
    ) -> bool
    where
        M: OsMemory,
        R: DmaReach,
        P: PhysMem,
        F: FreeFrames,
        U: RealUnit,
        C: Cores,
    {
        let mut want: BTreeMap<u16, Named> = BTreeMap::new();
        let mut too_many = false;
        if let Some(root) = self.unit.root() {
            let mut re = [0u8; 16];
            let mut table = [0u8; 4096];
            'buses: for bus in 0..=255u16 {
                if m.os.read(root + u64::from(bus) * 16, &mut re).is_err() || re[0] & 1 == 0 {
                    continue;
                }
                let ctp = u64::from_le_bytes(re[..8].try_into().unwrap_or([0; 8])) & !0xfff;
                if m.os.read(ctp, &mut table).is_err() {
                    continue;
                }
                for df in 0..256u16 {
                    if table[usize::from(df) * 16] & 1 == 0 {
                        continue;
                    }
                    let sid = (bus << 8) | df;
                    if !(m.owned)(sid) {
                        continue;
                    }
                    if want.len() == MAX_REQUESTERS {
                        too_many = true;
                        break 'buses;
                    }
                    let c = match self.unit.context(&*m.os, sid) {
                        Ok(Context::Off | Context::PassThrough { .. }) => Named::Os,
                        Ok(Context::Tables {
                            domain,
                            root,
                            levels,
                        }) => Named::Tables {
                            domain,
                            real: real_domain(domain),
                            tables: OsTables { root, levels },
                            read: true,
                            write: true,
                        },
                        Err(_) => Named::Blocked,
                    };
                    want.insert(sid, c);
                }
            }
        }
        let translating = self.unit.translating();
        self.dma
            .contexts(&self.unit, translating, &want, too_many, m, w)
    }

    /// The OS's interrupt remapping: its entries composed into the real
    /// table's OS part at its interrupt-entry-cache invalidations (all of
    /// them when it latches a table or turns remapping on), and the real
    /// units' remapping turned on and off with its own, after the entries
    /// and before them respectively.
    fn remapping<M, R, P, F, U, C>(&mut self, fx: &Effects, m: &mut Machine<'_, M, R, P, F, U, C>)
    where
        M: OsMemory,
        R: DmaReach,
        P: PhysMem,
        F: FreeFrames,
        U: RealUnit,
        C: Cores,
    {
        if fx.remapping == Some(false) {
            // Off: the real units' too, first; then the OS's entries go,
            // so that nothing turns them back on with them in place.
            m.real.set_remapping(false, false, false);
            self.clear_entries(m.real);
            return;
        }
        if !self.unit.remapping_on() {
            return;
        }
        let Some(t) = self.unit.irt() else {
            // On without a table latched: nothing is delivered; the real
            // units remap through an empty OS part, compatibility format
            // blocked.
            if fx.remapping == Some(true) || fx.irt {
                self.clear_entries(m.real);
                m.real.set_remapping(true, false, false);
            }
            return;
        };
        let whole = fx.irt || fx.remapping == Some(true) || fx.entries.all;
        if whole || !fx.entries.is_empty() {
            let owned = m.owned;
            let buses = self.buses_os.get_or_insert_with(|| {
                alloc::boxed::Box::new(core::array::from_fn(|b| {
                    let bus = u16::try_from(b).unwrap_or(u16::MAX);
                    (0..=255u16).all(|df| owned((bus << 8) | df))
                }))
            });
            let sources = OwnedSources { owned, buses };
            let policy = Policy {
                nmi: false,
                extint: false,
            };
            let scopes: alloc::vec::Vec<Option<Scope>> = if whole {
                alloc::vec![None]
            } else {
                fx.entries.scopes().iter().map(|s| Some(*s)).collect()
            };
            for scope in scopes {
                let entries = &mut self.entries;
                let real = &mut *m.real;
                let r = sync_entries_within(
                    &self.unit,
                    &*m.os,
                    scope,
                    &sources,
                    m.cores,
                    policy,
                    t.x2apic,
                    ENTRIES_TRACKED,
                    &mut |i, e| {
                        entries.set(i, e[0] & 1 != 0);
                        real.write_irte(i, e);
                    },
                );
                self.entries.refused += u64::from(r.refused);
                if let Some((index, why)) = r.first_refusal
                    && self.entries.logged < 8
                {
                    self.entries.logged += 1;
                    log::warn!(
                        "the OS's IOMMU {:#x}: its remapping entry {index} refused: {}",
                        self.base,
                        why.describe()
                    );
                }
            }
            m.real.irte_flush();
        }
        // The real units follow the OS's table, its destination format and
        // its compatibility setting, after the entries are in place.
        if fx.remapping == Some(true) || fx.irt || fx.compat.is_some() {
            m.real
                .set_remapping(true, t.x2apic, self.unit.compat_passes());
        }
    }

    /// Every real entry of the OS's written not present, and invalidated.
    fn clear_entries(&mut self, real: &mut impl RealUnit) {
        let present: alloc::vec::Vec<u32> = self.entries.present_indices().collect();
        if present.is_empty() {
            return;
        }
        for i in present {
            self.entries.set(i, false);
            real.write_irte(i, [0, 0]);
        }
        real.irte_flush();
    }
}

impl<F: Format + Copy> Dma<F> {
    /// No domain shadowed, no real entry changed; `base` names the unit
    /// in the log.
    pub const fn new(base: u64, fmt: F) -> Self {
        Self {
            base,
            fmt,
            shadows: BTreeMap::new(),
            real: BTreeMap::new(),
            counts: Counts {
                mapped: 0,
                unmapped: 0,
                refused: 0,
                short: 0,
                flushes: 0,
                degraded: 0,
            },
            degraded: BTreeMap::new(),
            too_many: false,
            too_many_logged: false,
            parked: alloc::vec::Vec::new(),
            unnamed_blocked: false,
            flush_owed: false,
        }
    }

    /// Domains shadowed.
    pub fn domains(&self) -> usize {
        self.shadows.len()
    }

    /// The shadow of the OS's domain `domain` (its top table).
    pub fn shadow_root(&self, domain: u16) -> Option<u64> {
        self.shadows.get(&domain).map(|(s, _, _)| s.root())
    }

    /// The DMA part of `thinhv status`.
    pub(crate) fn status(&self) -> OsUnitStatus {
        OsUnitStatus {
            domains: u16::try_from(self.shadows.len()).unwrap_or(u16::MAX),
            pages: self.shadows.values().map(|(s, _, _)| s.pages).sum(),
            refused: self.counts.refused,
            flushes: self.counts.flushes,
            ..OsUnitStatus::default()
        }
    }

    /// The shadow syncs an IOTLB invalidation asks for: (OS domain, from,
    /// to).
    pub(crate) fn syncs(&self, pages: &Flushes) -> alloc::vec::Vec<(u16, u64, u64)> {
        let mut syncs = alloc::vec::Vec::new();
        if pages.all {
            syncs.extend(
                self.shadows
                    .keys()
                    .chain(self.degraded.keys())
                    .map(|&d| (d, 0, SPACE)),
            );
        } else {
            for s in pages.scopes() {
                match *s {
                    Scope::Domain(d) => syncs.push((d, 0, SPACE)),
                    Scope::Pages {
                        domain,
                        addr,
                        order,
                    } => {
                        let len = 0x1000u64 << order.min(36);
                        syncs.push((domain, addr, addr.saturating_add(len)));
                    }
                    _ => {}
                }
            }
        }
        syncs
    }

    /// Brings the shadows up to date over `syncs`. Returns the real
    /// domains whose leaves alone changed, and whether the requesters'
    /// real entries must be worked out again (a domain fell back, or one
    /// that had is tried again).
    pub(crate) fn invalidate<O, M, R, P, Fr, U, C>(
        &mut self,
        model: &O,
        syncs: alloc::vec::Vec<(u16, u64, u64)>,
        m: &mut Machine<'_, M, R, P, Fr, U, C>,
        w: &mut Work<F>,
    ) -> (alloc::vec::Vec<u16>, bool)
    where
        O: OsPageTables,
        M: OsMemory,
        R: DmaReach,
        P: PhysMem,
        Fr: FreeFrames,
        U: RealUnit,
        C: Cores,
    {
        let syncs_whole: alloc::vec::Vec<u16> = syncs
            .iter()
            .filter(|&&(_, from, to)| from == 0 && to == SPACE)
            .map(|&(d, _, _)| d)
            .collect();
        let mut degraded = false;
        let mut leaves: alloc::vec::Vec<u16> = alloc::vec::Vec::new();
        for (d, from, to) in syncs {
            match self.sync(model, d, from, to, m, &mut w.left) {
                Ok(Some(real)) => {
                    if !leaves.contains(&real) {
                        leaves.push(real);
                    }
                }
                Ok(None) => {}
                Err(why) => {
                    self.degrade(d, why, w);
                    degraded = true;
                }
            }
        }
        // A domain that fell back before is tried again at the OS's
        // invalidation of all of it, after the others' syncs (its
        // rebuild, in `contexts`, syncs it whole once).
        let retry: alloc::vec::Vec<u16> = self
            .degraded
            .keys()
            .copied()
            .filter(|d| syncs_whole.contains(d))
            .collect();
        for d in &retry {
            self.degraded.remove(d);
        }
        (leaves, degraded || !retry.is_empty())
    }

    /// The real unit forgets what it cached (everything where entries
    /// changed or tables were retired, else the IOTLBs of the domains in
    /// `leaves`) before a freed table can be reused; where its
    /// invalidation failed, retired shadows wait for one that succeeds.
    pub(crate) fn finish<M, R, P, Fr, U, C>(
        &mut self,
        changed: bool,
        leaves: &[u16],
        mut w: Work<F>,
        m: &mut Machine<'_, M, R, P, Fr, U, C>,
    ) where
        M: OsMemory,
        R: DmaReach,
        P: PhysMem,
        Fr: FreeFrames,
        U: RealUnit,
        C: Cores,
    {
        self.parked.append(&mut w.dead);
        if !changed && leaves.is_empty() && self.parked.is_empty() {
            return;
        }
        self.counts.flushes += 1;
        let scope = (!changed
            && !self.flush_owed
            && self.parked.is_empty()
            && leaves.len() <= MAX_DOMAIN_FLUSHES)
            .then_some(leaves);
        self.flush_owed = !m.real.flush(scope);
        if self.flush_owed {
            return;
        }
        // A shadow a real entry still names (a change the real unit
        // refused) stays parked.
        let named: alloc::vec::Vec<u64> = self
            .real
            .values()
            .filter_map(|c| match c {
                RealContext::Shadow { root, .. } => Some(*root),
                _ => None,
            })
            .collect();
        let (keep, free): (alloc::vec::Vec<_>, alloc::vec::Vec<_>) =
            core::mem::take(&mut self.parked)
                .into_iter()
                .partition(|s| named.contains(&s.root()));
        self.parked = keep;
        for s in free {
            s.free(m.pt, m.frames);
        }
    }

    /// Syncs `domain`'s shadow over `[from, to)`; its real domain where
    /// anything changed.
    fn sync<O, M, R, P, Fr, U, C>(
        &mut self,
        model: &O,
        domain: u16,
        from: u64,
        to: u64,
        m: &mut Machine<'_, M, R, P, Fr, U, C>,
        left: &mut u64,
    ) -> Result<Option<u16>, Degraded>
    where
        O: OsPageTables,
        M: OsMemory,
        R: DmaReach,
        P: PhysMem,
        Fr: FreeFrames,
        U: RealUnit,
        C: Cores,
    {
        let Some((shadow, tables, real)) = self.shadows.get_mut(&domain) else {
            return Ok(None);
        };
        let mut at = from;
        let mut changed = false;
        loop {
            // A step reads at most its budget in each of the two passes.
            let Some(l) = left.checked_sub(2 * SYNC_BUDGET) else {
                return Err(Degraded::Work);
            };
            *left = l;
            match shadow.sync(
                model,
                &*m.os,
                *tables,
                m.reach,
                m.pt,
                m.frames,
                at,
                to,
                SYNC_BUDGET,
            ) {
                Ok(s) => {
                    self.counts.mapped += s.mapped;
                    self.counts.unmapped += s.unmapped;
                    self.counts.refused += s.refused;
                    changed |= s.mapped + s.unmapped > 0;
                    match s.resume {
                        Some(r) if r > at && r < to => at = r,
                        _ => return Ok(changed.then_some(*real)),
                    }
                }
                Err(ShadowError::OutOfFrames) => {
                    self.counts.short += 1;
                    return Err(Degraded::Frames);
                }
            }
        }
    }

    /// `domain` falls back to thinhv's domain for the OS (its shadow could
    /// not follow the OS's tables): its shadow goes (freed once the real
    /// unit no longer uses it), and until the OS points the domain at
    /// other tables, its requesters keep thinhv's domain for the OS.
    /// thinhv's and the appliances' memory stay out of reach; the OS loses
    /// its own isolation of that domain, and thinhv says so.
    fn degrade(&mut self, domain: u16, why: Degraded, w: &mut Work<F>) {
        if let Some((s, t, _)) = self.shadows.remove(&domain) {
            w.dead.push(s);
            self.degraded.insert(domain, t);
            self.counts.degraded += 1;
            if self.counts.degraded > 8 {
                return;
            }
            log::error!(
                "the OS's IOMMU {:#x}: its domain {domain} falls back to thinhv's domain for the OS ({}): the OS's devices in it reach all of the OS's memory",
                self.base,
                match why {
                    Degraded::Frames => "no frame left for its shadow",
                    Degraded::Work => "its tables take more than a register write's work to follow",
                }
            );
        }
    }

    /// Points the real entries of the OS's requesters at what its unit
    /// names for them (`want`, complete; `too_many`: it named more than
    /// [`MAX_REQUESTERS`], those past them left out): shadows built for
    /// new domains, retired for those gone; whether any real entry
    /// changed.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn contexts<O, M, R, P, Fr, U, C>(
        &mut self,
        model: &O,
        translating: bool,
        named: &BTreeMap<u16, Named>,
        too_many: bool,
        m: &mut Machine<'_, M, R, P, Fr, U, C>,
        w: &mut Work<F>,
    ) -> bool
    where
        O: OsPageTables,
        M: OsMemory,
        R: DmaReach,
        P: PhysMem,
        Fr: FreeFrames,
        U: RealUnit,
        C: Cores,
    {
        if too_many && !self.too_many_logged {
            self.too_many_logged = true;
            log::warn!(
                "the OS's IOMMU {:#x}: more than {MAX_REQUESTERS} requesters in its tables; those past them keep thinhv's domain for the OS",
                self.base
            );
        }
        // Worked out again from every complete reading of its tables.
        self.too_many = too_many;
        let mut used: BTreeMap<u16, (OsTables, u16)> = BTreeMap::new();
        for n in named.values() {
            if let Named::Tables {
                domain,
                real,
                tables,
                ..
            } = *n
            {
                used.insert(domain, (tables, real));
            }
        }
        // A degraded domain is tried again once the OS points it at other
        // tables.
        self.degraded
            .retain(|d, t| used.get(d).map(|u| u.0) == Some(*t));
        // Shadows: those of domains no longer used, or whose tables moved,
        // go (freed after the real unit's flush); new ones are built.
        let gone: alloc::vec::Vec<u16> = self
            .shadows
            .iter()
            .filter(|(d, (_, t, r))| used.get(d) != Some(&(*t, *r)))
            .map(|(d, _)| *d)
            .collect();
        let mut changed = !gone.is_empty();
        for d in gone {
            if let Some((s, _, _)) = self.shadows.remove(&d) {
                w.dead.push(s);
            }
        }
        let mut fresh = alloc::vec::Vec::new();
        for (&d, &(t, r)) in &used {
            if self.shadows.contains_key(&d) || self.degraded.contains_key(&d) {
                continue;
            }
            match Shadow::new(self.fmt, d, m.pt, m.frames) {
                Ok(s) => {
                    self.shadows.insert(d, (s, t, r));
                    fresh.push(d);
                }
                Err(ShadowError::OutOfFrames) => {
                    self.counts.short += 1;
                    self.degraded.insert(d, t);
                    self.counts.degraded += 1;
                    if self.counts.degraded > 8 {
                        continue;
                    }
                    log::error!(
                        "the OS's IOMMU {:#x}: no frame left for its domain {d}'s shadow: it falls back to thinhv's domain for the OS",
                        self.base
                    );
                }
            }
        }
        for d in fresh {
            changed = true;
            if let Err(why) = self.sync(model, d, 0, SPACE, m, &mut w.left) {
                self.degrade(d, why, w);
            }
        }
        // Requesters: the shadow's root filled in, or thinhv's domain for
        // the OS where the domain has none (degraded); one the OS had and
        // no longer has: blocked.
        let mut want: BTreeMap<u16, RealContext> = named
            .iter()
            .map(|(&sid, n)| {
                let c = match *n {
                    Named::Os => RealContext::Os,
                    Named::Blocked => RealContext::Blocked,
                    Named::Tables {
                        domain,
                        real,
                        read,
                        write,
                        ..
                    } => self
                        .shadows
                        .get(&domain)
                        .map_or(RealContext::Os, |(s, _, _)| RealContext::Shadow {
                            root: s.root(),
                            domain: real,
                            read,
                            write,
                        }),
                };
                (sid, c)
            })
            .collect();
        if translating {
            for &sid in self.real.keys() {
                if want.len() < MAX_REQUESTERS {
                    want.entry(sid).or_insert(RealContext::Blocked);
                } else if !want.contains_key(&sid) {
                    // Past the limit: the requesters the OS does not name
                    // go back to thinhv's domain for the OS, below.
                    self.too_many = true;
                }
            }
        }
        let mut kept = alloc::vec::Vec::new();
        for (&sid, &c) in &want {
            // A requester not named before is blocked or on thinhv's
            // domain for the OS with the rest.
            let unnamed = if self.unnamed_blocked {
                RealContext::Blocked
            } else {
                RealContext::Os
            };
            let old = self.real.get(&sid).copied().unwrap_or(unnamed);
            if old != c {
                if m.real.set_context(sid, c) {
                    changed = true;
                } else {
                    // Not applied: the real entry is what it was, and is
                    // tried again at the next change.
                    kept.push((sid, old));
                    log::error!(
                        "the OS's IOMMU {:#x}: {:02x}:{:02x}.{}'s real entry could not be changed",
                        self.base,
                        sid >> 8,
                        (sid >> 3) & 0x1f,
                        sid & 7
                    );
                }
            }
        }
        // Translation off: every requester back on thinhv's domain.
        for (&sid, &old) in &self.real {
            if !want.contains_key(&sid) && old != RealContext::Os {
                if m.real.set_context(sid, RealContext::Os) {
                    changed = true;
                } else {
                    kept.push((sid, old));
                }
            }
        }
        want.extend(kept);
        // The requesters the OS never named: blocked while it translates,
        // as a real unit blocks those without a present entry (thinhv's
        // domain for the OS where it named more than this unit follows:
        // those past the limit are among them).
        let block = translating && !self.too_many;
        if block != self.unnamed_blocked {
            if m.real.set_unnamed(block, &|sid| want.contains_key(&sid)) {
                self.unnamed_blocked = block;
                changed = true;
            } else {
                log::error!(
                    "the OS's IOMMU {:#x}: the requesters it gave no entry could not be {}",
                    self.base,
                    if block {
                        "blocked"
                    } else {
                        "let through again"
                    }
                );
            }
        }
        self.real = want;
        changed
    }
}
/// thinhv's real VT-d tables as the OS's unit changes them: every bus's
/// root entry present, the buses whose requesters all have thinhv's
/// domain for the OS sharing one context table, the others (an
/// appliance's or a blocked requester among them, or one the OS's unit
/// changed) a table of their own.
pub struct RealTables<'a> {
    /// The root table.
    pub root: u64,
    /// The context table those buses share.
    pub shared_ctx: u64,
    /// The context entry of thinhv's domain for the OS.
    pub os_entry: [u64; 2],
    /// The requesters thinhv's own tables give its domain for the OS, one
    /// bit each (worked out once, before the OS runs).
    pub defaults: &'a [u64; 1024],
}

impl RealTables<'_> {
    /// Bus `bus`'s own context table: where it shares the common one, a
    /// copy of it in a frame from `frame`, and the root entry pointed at
    /// the copy (`None` without a frame: nothing changed).
    pub fn own_table(
        &self,
        pt: &mut impl PhysMem,
        bus: u16,
        frame: &mut dyn FnMut() -> Option<u64>,
    ) -> Option<u64> {
        let b = usize::from(bus & 0xff);
        let table = pt.read_entry(self.root, 2 * b) & ADDR_MASK;
        if table != self.shared_ctx {
            return Some(table);
        }
        let t = frame()?;
        for i in 0..512 {
            let e = pt.read_entry(self.shared_ctx, i);
            pt.write_entry(t, i, e);
        }
        let r = thinhv_passthrough::vtd::root_entry(t);
        pt.write_entry(self.root, 2 * b + 1, r[1]);
        pt.write_entry(self.root, 2 * b, r[0]);
        Some(t)
    }

    /// Writes requester `rid`'s context entry in `table` (not present
    /// while its upper half changes).
    pub fn write_context(pt: &mut impl PhysMem, table: u64, rid: u16, e: [u64; 2]) {
        let df = usize::from(rid & 0xff);
        pt.write_entry(table, 2 * df, 0);
        pt.write_entry(table, 2 * df + 1, e[1]);
        pt.write_entry(table, 2 * df, e[0]);
    }

    /// Whether thinhv's own tables give `rid` its domain for the OS.
    fn default(&self, rid: u16) -> bool {
        self.defaults[usize::from(rid / 64)] & (1 << (rid % 64)) != 0
    }

    /// [`RealUnit::set_unnamed`] on these tables: every requester with a
    /// [`Self::defaults`] bit that `named` leaves out, blocked or back on
    /// thinhv's domain for the OS. A bus sharing the common table with a
    /// named requester on it gets a table of its own first (a named
    /// requester keeps its entry); without a frame for it nothing is
    /// blocked (false).
    pub fn set_unnamed(
        &self,
        pt: &mut impl PhysMem,
        blocked: bool,
        named: &dyn Fn(u16) -> bool,
        frame: &mut dyn FnMut() -> Option<u64>,
    ) -> bool {
        if blocked {
            for bus in 0..=255u16 {
                let shared =
                    pt.read_entry(self.root, 2 * usize::from(bus)) & ADDR_MASK == self.shared_ctx;
                if shared
                    && (0..=255u16).any(|df| named(bus << 8 | df))
                    && self.own_table(pt, bus, frame).is_none()
                {
                    return false;
                }
            }
        }
        let e = if blocked { [0, 0] } else { self.os_entry };
        for df in 0..=255u16 {
            Self::write_context(pt, self.shared_ctx, df, e);
        }
        for bus in 0..=255u16 {
            let r = pt.read_entry(self.root, 2 * usize::from(bus));
            let table = r & ADDR_MASK;
            if r & 1 == 0 || table == self.shared_ctx {
                continue;
            }
            for df in 0..=255u16 {
                let rid = bus << 8 | df;
                if self.default(rid) && !named(rid) {
                    Self::write_context(pt, table, rid, e);
                }
            }
        }
        true
    }
}

/// thinhv's real AMD-Vi device table, quadword by quadword.
pub trait DeviceTable {
    /// Device IDs the table holds.
    fn ids(&self) -> u32;
    /// Quadword `q` (0 to 3) of `id`'s entry.
    fn read(&self, id: u16, q: usize) -> u64;
    /// Writes quadword `q` of `id`'s entry; the unit may read it at once.
    fn write(&mut self, id: u16, q: usize, value: u64);
}

/// The DMA half of thinhv's real AMD-Vi device table entries as the OS's
/// emulated unit changes them (quadword 0 and the domain ID in quadword
/// 1; the interrupt half stays thinhv's). `open_q0` and `open_domain`
/// are thinhv's entry for the OS. An entry the OS's unit blocks keeps
/// that domain ID with neither right (`BLOCKED_Q0`), which tells it from
/// thinhv's closed entries (hidden functions: domain 2) and an
/// appliance's (its own tables).
#[derive(Clone, Copy, Debug)]
pub struct RealDevTable {
    /// Quadword 0 of thinhv's entry for the OS.
    pub open_q0: u64,
    /// Its domain ID.
    pub open_domain: u16,
}

impl RealDevTable {
    /// V and TV, mode 0, neither IR nor IW: no DMA.
    pub const BLOCKED_Q0: u64 = 0b11;

    /// Points `id`'s entry where `c` says: through a blocked entry first,
    /// so that the unit never sees the new domain with the old tables or
    /// the reverse.
    pub fn set(&self, t: &mut impl DeviceTable, id: u16, c: RealContext) -> bool {
        if u32::from(id) >= t.ids() {
            return false;
        }
        let (q0, domain) = match c {
            RealContext::Os => (self.open_q0, self.open_domain),
            RealContext::Blocked => (Self::BLOCKED_Q0, self.open_domain),
            RealContext::Shadow {
                root,
                domain,
                read,
                write,
            } => (
                (root & ADDR_MASK)
                    | Self::BLOCKED_Q0
                    | (4 << 9)
                    | (u64::from(read) << 61)
                    | (u64::from(write) << 62),
                domain,
            ),
        };
        t.write(id, 0, Self::BLOCKED_Q0);
        let q1 = t.read(id, 1);
        t.write(id, 1, (q1 & !0xffff) | u64::from(domain));
        t.write(id, 0, q0);
        true
    }

    /// Every entry that gives thinhv's domain for the OS, but those
    /// `named`, made to block DMA (`blocked`), or those so blocked given
    /// that domain again.
    pub fn set_unnamed(
        &self,
        t: &mut impl DeviceTable,
        blocked: bool,
        named: &dyn Fn(u16) -> bool,
    ) {
        let (from, to) = if blocked {
            (self.open_q0, Self::BLOCKED_Q0)
        } else {
            (Self::BLOCKED_Q0, self.open_q0)
        };
        for id in 0..t.ids().min(0x1_0000) {
            let Ok(id) = u16::try_from(id) else {
                break;
            };
            if t.read(id, 0) == from
                && t.read(id, 1) & 0xffff == u64::from(self.open_domain)
                && !named(id)
            {
                t.write(id, 0, to);
            }
        }
    }
}

/// Why a domain falls back to thinhv's domain for the OS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Degraded {
    /// No frame for its shadow.
    Frames,
    /// Following its tables took more than a register write's work.
    Work,
}

/// What one register write may still do, and the shadows it retired.
pub(crate) struct Work<F: Format> {
    /// Entries it may still read.
    left: u64,
    /// Shadows to free once the real unit is flushed.
    dead: alloc::vec::Vec<Shadow<F>>,
}

impl<F: Format> Work<F> {
    pub(crate) const fn new() -> Self {
        Self {
            left: WORK_PER_WRITE,
            dead: alloc::vec::Vec::new(),
        }
    }
}

/// Entries of the OS's tables one register write may read: bounded work
/// per exit whatever the OS's tables are (a domain of 512 MiB mapped in
/// 4 KiB pages takes about an eighth of it to sync whole).
const WORK_PER_WRITE: u64 = 1 << 21;

/// Real domains one flush invalidates one by one; past them, everything.
const MAX_DOMAIN_FLUSHES: usize = 16;

/// Requesters of the OS's one unit follows.
pub const MAX_REQUESTERS: usize = 1024;

/// One of the OS's units, of the platform's kind.
#[derive(Debug)]
pub enum OsUnit {
    /// VT-d.
    Vtd(OsVtd),
    /// AMD-Vi.
    AmdVi(crate::os_amdvi::OsAmdVi),
}

impl OsUnit {
    /// The register window's base (the real unit's).
    pub const fn base(&self) -> u64 {
        match self {
            Self::Vtd(u) => u.base,
            Self::AmdVi(u) => u.base,
        }
    }

    /// Whether `gpa` is in the unit's register window.
    pub const fn covers(&self, gpa: u64) -> bool {
        let len = match self {
            Self::Vtd(_) => 0x1000,
            Self::AmdVi(_) => thinhv_passthrough::vamdvi::WINDOW,
        };
        gpa >= self.base() && gpa - self.base() < len
    }

    /// A load of `size` bytes at `offset` in the window.
    pub fn read(&self, offset: u64, size: u8) -> u64 {
        match self {
            Self::Vtd(u) => u.unit.read(offset, size),
            Self::AmdVi(u) => u.unit.read(offset, size),
        }
    }

    /// The OS translates.
    pub const fn translating(&self) -> bool {
        match self {
            Self::Vtd(u) => u.unit.translating(),
            Self::AmdVi(u) => u.unit.enabled(),
        }
    }

    /// Domains shadowed.
    pub fn domains(&self) -> usize {
        match self {
            Self::Vtd(u) => u.dma.domains(),
            Self::AmdVi(u) => u.dma.domains(),
        }
    }

    /// What the emulation did.
    pub const fn counts(&self) -> Counts {
        match self {
            Self::Vtd(u) => u.dma.counts,
            Self::AmdVi(u) => u.dma.counts,
        }
    }

    /// What `thinhv status` shows of it.
    pub fn status(&self) -> OsUnitStatus {
        match self {
            Self::Vtd(u) => u.status(),
            Self::AmdVi(u) => u.status(),
        }
    }
}

/// What a register write of the OS's leaves for the caller to do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Written {
    /// Translation turned on (true) or off.
    pub translation: Option<bool>,
    /// An interrupt the unit sends, as the OS programmed it (and whether
    /// its destination is x2APIC's).
    pub event: Option<(thinhv_passthrough::vvtd::Event, bool)>,
    /// An interrupt the OS asked for that is not delivered.
    pub dropped: Option<&'static str>,
    /// The unit stopped its queue or command buffer (why).
    pub stopped: Option<&'static str>,
}

impl OsUnit {
    /// A store of `size` bytes of `value` at `offset` in the window, and
    /// what it changes in the real unit.
    pub fn write<M, R, P, F, U, C>(
        &mut self,
        offset: u64,
        size: u8,
        value: u64,
        m: &mut Machine<'_, M, R, P, F, U, C>,
    ) -> Written
    where
        M: OsMemory,
        R: DmaReach,
        P: PhysMem,
        F: FreeFrames,
        U: RealUnit,
        C: Cores,
    {
        match self {
            Self::Vtd(u) => {
                let fx = u.write(offset, size, value, m);
                let x2apic = u.unit.offer().x2apic;
                Written {
                    translation: fx.translation,
                    // A fault pending when the OS unmasked its event.
                    event: fx.fault_event.map(|e| (e, x2apic)),
                    dropped: fx
                        .completion_event
                        .map(|_| "an invalidation completion interrupt (not built yet)"),
                    stopped: fx
                        .queue_error
                        .map(thinhv_passthrough::vvtd::QueueError::describe),
                }
            }
            Self::AmdVi(u) => {
                let fx = u.write(offset, size, value, m);
                let (event, dropped) = u.event(fx.event_interrupt);
                Written {
                    translation: fx.translation,
                    event,
                    dropped,
                    stopped: fx
                        .stopped
                        .map(|_| "at a command it refused (logged in its event log)"),
                }
            }
        }
    }

    /// A real DMA fault of one of the OS's requesters: `None` where it is
    /// thinhv's (the OS's tables allow the request); else the interrupt
    /// the OS's unit sends for it, if any.
    pub fn fault(
        &mut self,
        f: RealFault,
        os: &mut impl OsMemory,
    ) -> Option<Option<(thinhv_passthrough::vvtd::Event, bool)>> {
        match self {
            Self::Vtd(u) => {
                let fx = u.fault(f, &*os)?;
                let x2apic = u.unit.offer().x2apic;
                Some(fx.fault_event.map(|e| (e, x2apic)))
            }
            Self::AmdVi(u) => {
                let fx = u.fault(f, os)?;
                Some(u.event(fx.event_interrupt).0)
            }
        }
    }
}

/// The OS's units, where the hand-off asks for them: VT-d or AMD-Vi that
/// thinhv protects with, `[iommu] os = "emulated"`, one per real unit.
pub fn for_handoff(h: &thinhv_abi::handoff::Handoff) -> alloc::vec::Vec<OsUnit> {
    use thinhv_abi::handoff::{
        IOMMU_KIND_AMDVI, IOMMU_KIND_VTD, IOMMU_MODE_PROTECT, IOMMU_OS_EMULATED,
    };
    let i = &h.iommu;
    if i.mode != IOMMU_MODE_PROTECT
        || (i.kind != IOMMU_KIND_VTD && i.kind != IOMMU_KIND_AMDVI)
        || i.os != IOMMU_OS_EMULATED
    {
        return alloc::vec::Vec::new();
    }
    // One unit: with several, each would have to keep to the requesters
    // of its own scope. An NVMe VF shown in its PF's place would get the
    // translation the OS programs for the PF's ID, which is not the VF's.
    if i.units().len() != 1 {
        log::error!(
            "IOMMU: {} units: the OS's own unit is built for one; the OS gets none",
            i.units().len()
        );
        return alloc::vec::Vec::new();
    }
    if h.pci
        .mediated()
        .iter()
        .any(|m| m.action == thinhv_abi::handoff::PCI_ACTION_PRESENT_VF)
    {
        log::error!(
            "IOMMU: a VF shown to the OS in its PF's place: the OS's own unit cannot follow it; the OS gets none"
        );
        return alloc::vec::Vec::new();
    }
    // AMD-Vi: the OS drives its unit through the real one's function,
    // which must be a view (`PCI_ACTION_AMDVI_UNIT`), or its writes
    // there would reach the real unit.
    if i.kind == IOMMU_KIND_AMDVI
        && !h
            .pci
            .mediated()
            .iter()
            .any(|m| m.action == thinhv_abi::handoff::PCI_ACTION_AMDVI_UNIT)
    {
        log::error!(
            "IOMMU: the AMD-Vi unit's function is not mediated: the OS gets no unit of its own"
        );
        return alloc::vec::Vec::new();
    }
    let host_width = u8::try_from(h.phys_addr_bits).unwrap_or(52);
    i.units()
        .iter()
        .map(|u| {
            if i.kind == IOMMU_KIND_VTD {
                OsUnit::Vtd(OsVtd::new(
                    u.base & !0xfff,
                    Offer {
                        host_width,
                        remapping: i.flags & thinhv_abi::handoff::IOMMU_FLAG_OS_REMAP != 0,
                        x2apic: false,
                    },
                ))
            } else {
                OsUnit::AmdVi(crate::os_amdvi::OsAmdVi::new(
                    u.base & !0x3fff,
                    thinhv_passthrough::vamdvi::Offer {
                        host_width,
                        x2apic: false,
                    },
                ))
            }
        })
        .collect()
}

/// Raw physical memory, read and written bytewise (the OS's, through
/// [`OsRam`]'s check).
pub trait PhysBytes {
    /// Reads `out.len()` bytes at `pa`.
    fn read(&self, pa: u64, out: &mut [u8]);
    /// Writes `data` at `pa`.
    fn write(&mut self, pa: u64, data: &[u8]);
}

/// What the host side lends the emulation for one register write: its
/// table memory, frames, raw memory and the real unit.
pub trait OsIommuHw {
    /// thinhv's memory for shadow tables.
    type Tables: PhysMem;
    /// Frames for shadow tables.
    type Frames: FreeFrames;
    /// Raw physical memory.
    type Ram: PhysBytes;
    /// The real unit.
    type Real: RealUnit;
    /// The four, borrowed at once.
    fn parts(
        &mut self,
    ) -> (
        &mut Self::Tables,
        &mut Self::Frames,
        &mut Self::Ram,
        &mut Self::Real,
    );
}

/// No host side: for an [`crate::env::Env`] without an emulated IOMMU.
#[derive(Debug)]
pub enum NoHost {}

impl PhysMem for NoHost {
    fn read_entry(&self, _: u64, _: usize) -> u64 {
        match *self {}
    }
    fn write_entry(&mut self, _: u64, _: usize, _: u64) {
        match *self {}
    }
    fn zero_frame(&mut self, _: u64) {
        match *self {}
    }
}

impl thinhv_paging::FrameAlloc for NoHost {
    fn alloc_frame(&mut self) -> Option<u64> {
        match *self {}
    }
}

impl FreeFrames for NoHost {
    fn free_frame(&mut self, _: u64) {
        match *self {}
    }
}

impl PhysBytes for NoHost {
    fn read(&self, _: u64, _: &mut [u8]) {
        match *self {}
    }
    fn write(&mut self, _: u64, _: &[u8]) {
        match *self {}
    }
}

impl RealUnit for NoHost {
    fn set_context(&mut self, _: u16, _: RealContext) -> bool {
        match *self {}
    }
    fn set_unnamed(&mut self, _: bool, _: &dyn Fn(u16) -> bool) -> bool {
        match *self {}
    }
    fn flush(&mut self, _: Option<&[u16]>) -> bool {
        match *self {}
    }
    fn write_irte(&mut self, _: u32, _: [u64; 2]) {
        match *self {}
    }
    fn irte_flush(&mut self) {
        match *self {}
    }
    fn set_remapping(&mut self, _: bool, _: bool, _: bool) {
        match *self {}
    }
}

impl OsIommuHw for NoHost {
    type Tables = Self;
    type Frames = Self;
    type Ram = Self;
    type Real = Self;
    fn parts(&mut self) -> (&mut Self, &mut Self, &mut Self, &mut Self) {
        match *self {}
    }
}

/// The OS's memory as its emulated unit may touch it: its RAM only, not
/// thinhv's, not an appliance's, not a device's registers.
pub struct OsRam<'a, B> {
    /// The state (the RAM map and what is not the OS's).
    pub hv: &'a crate::hv::Hv,
    /// Raw memory.
    pub ram: &'a mut B,
}

impl<B> OsRam<'_, B> {
    fn allowed(&self, gpa: u64, len: usize) -> bool {
        let len = len as u64;
        crate::guest_mem::ram_covers(self.hv.ram(), gpa, len)
            && !self.hv.touches_hypervisor(gpa, len)
            && !self
                .hv
                .foreign_ram(crate::partition::PartitionId::OS, gpa, len)
    }
}

impl<B: PhysBytes> OsMemory for OsRam<'_, B> {
    fn read(&self, gpa: u64, out: &mut [u8]) -> Result<(), thinhv_passthrough::vvtd::Denied> {
        if !self.allowed(gpa, out.len()) {
            return Err(thinhv_passthrough::vvtd::Denied);
        }
        self.ram.read(gpa, out);
        Ok(())
    }
    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), thinhv_passthrough::vvtd::Denied> {
        if !self.allowed(gpa, data.len()) {
            return Err(thinhv_passthrough::vvtd::Denied);
        }
        self.ram.write(gpa, data);
        Ok(())
    }
}

/// Which pages the OS's devices may reach by DMA: anything but thinhv's
/// memory, an appliance's (RAM, image copy, its functions' registers), a
/// BAR thinhv keeps, and the units' register pages.
pub struct OsReach<'a> {
    /// The state.
    pub hv: &'a crate::hv::Hv,
}

impl DmaReach for OsReach<'_> {
    fn os_may_dma(&self, gpa: u64) -> bool {
        let page = gpa & !0xfff;
        !self.hv.touches_hypervisor(page, 0x1000)
            && !self
                .hv
                .foreign_ram(crate::partition::PartitionId::OS, page, 0x1000)
            && !self
                .hv
                .iommu_windows
                .iter()
                .any(|w| w.overlaps(page, 0x1000))
    }
}

#[cfg(test)]
#[path = "os_iommu_tests.rs"]
mod tests;
