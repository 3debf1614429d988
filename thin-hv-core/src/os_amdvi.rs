//! The OS's own AMD-Vi unit, emulated (issue 14, `docs/os-iommu.md`): the
//! register model ([`thinhv_passthrough::vamdvi::Unit`]) behind the real
//! unit's register window, and what the OS's programming changes in the
//! real unit: the DMA half of each of its devices' device table entries
//! and the shadows ([`crate::vvtd_shadow`]) they name
//! ([`crate::os_iommu::Dma`], shared with VT-d).
//!
//! * Unit off, or an entry with V clear (DMA untranslated): thinhv's
//!   domain for the OS ([`RealContext::Os`]), as without the emulation.
//! * Mode 0 with IR and IW: the same; with neither, or V with TV clear:
//!   blocked. Mode 0 with one of them is blocked too (stricter than asked;
//!   logged). Blocked devices are not followed one by one: while the OS
//!   translates, every device of its it does not name otherwise is
//!   blocked at once ([`RealUnit::set_unnamed`]), IDs past its device
//!   table included, as the real unit refuses those.
//! * Page tables (modes 1 to 4): the shadow of that domain, the entry's IR
//!   and IW on top of it, synced at the OS's INVALIDATE_IOMMU_PAGES (its
//!   unit sets NpCache in its capability header, so Linux invalidates
//!   after creating mappings too).
//! * An entry the unit refuses (reserved bits, GV, a table it cannot
//!   read): blocked.
//! * Past [`MAX_REQUESTERS`] devices named (an OS that leaves V clear in
//!   most of its table), nothing is blocked for want of a name.
//! * Device entries are read again at INVALIDATE_DEVTAB_ENTRY (that device
//!   alone), INVALIDATE_IOMMU_ALL, a new device table base and the unit
//!   turned on or off (all of the OS's devices).
//!
//! The exclusion range is not followed: DMA there is translated like any
//! other (stricter than asked). The OS's interrupt fields are not read:
//! the unit offers no interrupt remapping, so the OS's messages stay
//! compatibility-format, which thinhv remaps as without the emulation.
use crate::os_iommu::{
    Dma, MAX_REQUESTERS, Machine, Named, OsUnitStatus, RealFault, RealUnit, Work, amdvi_real_domain,
};
use crate::vvtd_shadow::{AmdVi, DmaReach, FreeFrames, OsTables};
use alloc::collections::BTreeMap;
use thinhv_paging::PhysMem;
use thinhv_passthrough::irq_remap::Cores;
use thinhv_passthrough::vamdvi::{self, Effects, Offer, OsFault, Unit, event};
use thinhv_passthrough::vvtd::{OsMemory, Scope};

/// One emulated AMD-Vi unit at `base`.
#[derive(Debug)]
pub struct OsAmdVi {
    /// The register window (the real unit's).
    pub base: u64,
    /// The register model.
    pub unit: Unit,
    /// Its DMA translation.
    pub dma: Dma<AmdVi>,
    /// What the OS's device table names for the devices it translates or
    /// blocks (the others pass untranslated: thinhv's domain for the OS).
    named: BTreeMap<u16, Named>,
    /// It named more than [`MAX_REQUESTERS`].
    too_many: bool,
    /// Mode-0 entries with one right alone, logged.
    partial_logged: bool,
    /// A domain ID too high for a real one, logged.
    high_logged: bool,
    /// The unit's PCI function's MSI as the OS programmed it.
    pub msi: thinhv_passthrough::mediate::Msi,
}

impl OsAmdVi {
    /// A unit out of reset at `base`, offering `offer`.
    pub const fn new(base: u64, offer: Offer) -> Self {
        Self {
            base,
            unit: Unit::new(offer),
            dma: Dma::new(base, AmdVi),
            named: BTreeMap::new(),
            too_many: false,
            partial_logged: false,
            high_logged: false,
            msi: thinhv_passthrough::mediate::Msi {
                control: 0,
                addr: 0,
                upper: 0,
                data: 0,
            },
        }
    }

    /// The event interrupt, where the unit raises it: the message the OS
    /// programmed in its function's MSI capability, or why none is sent.
    pub fn event(
        &mut self,
        raised: bool,
    ) -> (
        Option<(thinhv_passthrough::vvtd::Event, bool)>,
        Option<&'static str>,
    ) {
        if !raised {
            return (None, None);
        }
        match self.msi.message() {
            Some((addr, upper, data)) => (
                Some((thinhv_passthrough::vvtd::Event { addr, upper, data }, false)),
                None,
            ),
            None => (
                None,
                Some("an event interrupt with its function's MSI disabled"),
            ),
        }
    }

    /// What `thinhv status` shows of the unit.
    pub fn status(&self) -> OsUnitStatus {
        OsUnitStatus {
            state: if self.unit.enabled() {
                thinhv_abi::status::OS_UNIT_TRANSLATING
            } else {
                thinhv_abi::status::OS_UNIT_OFF
            },
            faults: self.unit.events_logged,
            ..self.dma.status()
        }
    }

    /// A register write, and what it changes in the real unit. Returns
    /// what the model asked beyond it (the event interrupt).
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
        let reread = if fx.translation.is_some() || fx.device_table || fx.devices.all {
            self.read_all(&*m.os, m.owned);
            true
        } else {
            let mut any = false;
            for s in fx.devices.scopes() {
                if let Scope::Device { sid, .. } = *s {
                    self.read_one(sid, &*m.os, m.owned);
                    any = true;
                }
            }
            any
        };
        if reread {
            changed |= self.contexts(m, &mut w);
        }
        let syncs = self.dma.syncs(&fx.pages);
        let (leaves, redo) = self.dma.invalidate(&self.unit, syncs, m, &mut w);
        if redo {
            self.contexts(m, &mut w);
            changed = true;
        }
        self.dma.finish(changed, &leaves, w, m);
        fx
    }

    fn contexts<M, R, P, F, U, C>(
        &mut self,
        m: &mut Machine<'_, M, R, P, F, U, C>,
        w: &mut Work<AmdVi>,
    ) -> bool
    where
        M: OsMemory,
        R: DmaReach,
        P: PhysMem,
        F: FreeFrames,
        U: RealUnit,
        C: Cores,
    {
        // Linux gives every ID of its device table an entry that blocks
        // DMA (V with TV clear, or mode 0 without rights) and a real entry
        // only to the devices it attaches: the blocked ones are left out
        // of `named` and blocked together, as the requesters a VT-d unit
        // has no context entry for.
        let on = self.unit.enabled();
        self.dma
            .contexts(&self.unit, on, &self.named, self.too_many, m, w)
    }

    /// Every device of the OS's read again.
    fn read_all(&mut self, os: &impl OsMemory, owned: &dyn Fn(u16) -> bool) {
        self.named.clear();
        self.too_many = false;
        if !self.unit.enabled() {
            return;
        }
        for sid in 0..=self.unit.last_device() {
            self.read_one(sid, os, owned);
            if self.too_many {
                return;
            }
        }
    }

    /// Device `sid` read again.
    fn read_one(&mut self, sid: u16, os: &impl OsMemory, owned: &dyn Fn(u16) -> bool) {
        if !owned(sid) {
            return;
        }
        match self.named_of(os, sid) {
            Some(n) if self.named.contains_key(&sid) || self.named.len() < MAX_REQUESTERS => {
                self.named.insert(sid, n);
            }
            Some(_) => self.too_many = true,
            None => {
                self.named.remove(&sid);
            }
        }
    }

    /// What the OS's entry names for `sid`; `None`: no DMA (V with TV
    /// clear, mode 0 without both rights, an entry the unit refuses, an
    /// ID past the device table), which the real unit blocks as one the
    /// OS never named.
    fn named_of(&mut self, os: &impl OsMemory, sid: u16) -> Option<Named> {
        if sid > self.unit.last_device() {
            return None;
        }
        let d = self.unit.device(os, sid).ok()?;
        match d.dma {
            vamdvi::Dma::Untranslated
            | vamdvi::Dma::Mode0 {
                read: true,
                write: true,
            } => Some(Named::Os),
            vamdvi::Dma::Mode0 { read, write } => {
                if (read || write) && !self.partial_logged {
                    self.partial_logged = true;
                    log::warn!(
                        "the OS's IOMMU {:#x}: {:02x}:{:02x}.{} untranslated with one right alone: blocked",
                        self.base,
                        sid >> 8,
                        (sid >> 3) & 0x1f,
                        sid & 7
                    );
                }
                None
            }
            vamdvi::Dma::Tables {
                root,
                levels,
                read,
                write,
            } => {
                let Some(real) = amdvi_real_domain(d.domain) else {
                    // Too high a domain ID for a real one of its own.
                    if !self.high_logged {
                        self.high_logged = true;
                        log::warn!(
                            "the OS's IOMMU {:#x}: its domain {:#x} is above 0xefff: its devices keep thinhv's domain for the OS",
                            self.base,
                            d.domain
                        );
                    }
                    return Some(Named::Os);
                };
                Some(Named::Tables {
                    domain: d.domain,
                    real,
                    tables: OsTables { root, levels },
                    read,
                    write,
                })
            }
        }
    }

    /// A real DMA fault of one of the OS's devices: where the OS's own
    /// entry or page tables refused the request, it is logged in the OS's
    /// event log (the event interrupt it then gets is in the effects);
    /// where they allowed it, thinhv's protection refused it, and the OS
    /// is not told.
    pub fn fault(&mut self, f: RealFault, os: &mut impl OsMemory) -> Option<Effects> {
        let of = self.classify(&*os, f)?;
        let mut fx = Effects::default();
        self.unit.record(os, of, &mut fx);
        Some(fx)
    }

    /// The OS's own fault behind a real one, if its tables refuse it.
    fn classify(&self, os: &impl OsMemory, f: RealFault) -> Option<OsFault> {
        let d = match self.unit.device(os, f.sid) {
            Ok(d) => d,
            Err(mut of) => {
                of.address = f.addr;
                of.write = f.write;
                return Some(of);
            }
        };
        if d.quiet {
            return None;
        }
        let page_fault = |present| OsFault {
            code: event::IO_PAGE_FAULT,
            device_id: f.sid,
            domain: d.domain,
            address: f.addr,
            write: f.write,
            interrupt: false,
            present,
            reserved: false,
        };
        let allowed = |read: bool, write: bool| if f.write { write } else { read };
        match d.dma {
            vamdvi::Dma::Untranslated => None,
            vamdvi::Dma::Mode0 { read, write } => (!allowed(read, write)).then(|| page_fault(true)),
            vamdvi::Dma::Tables {
                root,
                levels,
                read,
                write,
            } => match self.unit.walk(os, root, levels, f.addr) {
                Ok(None) => Some(page_fault(false)),
                Ok(Some(p)) => {
                    (!(allowed(read, write) && allowed(p.read, p.write))).then(|| page_fault(true))
                }
                Err(code) => Some(OsFault {
                    code,
                    reserved: code == event::IO_PAGE_FAULT,
                    ..page_fault(false)
                }),
            },
        }
    }
}
