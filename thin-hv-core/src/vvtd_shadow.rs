//! The OS's DMA translation composed with thinhv's protection (issue 14):
//! for each domain of the OS's emulated VT-d or AMD-Vi unit
//! ([`thinhv_passthrough::vvtd`], [`thinhv_passthrough::vamdvi`]) a
//! shadow tree in thinhv's memory, in the real unit's format ([`Format`]:
//! VT-d second-level or AMD-Vi I/O page-table entries), which the real
//! unit's context or device table entries name for the OS's functions in
//! that domain.
//!
//! A shadow entry maps an I/O address to the page the OS's tables map it
//! to, with the OS's rights (read, write, or both: Linux maps a buffer a
//! device only writes as write-only), and only where [`DmaReach`] says the
//! OS may reach that page: thinhv's memory, an appliance's, and anything
//! else that is not the OS's is never in a shadow, whatever the OS's
//! tables say. The OS is identity-mapped, so its physical address is the
//! host's.
//!
//! The OS's unit offers caching mode, so the OS invalidates after every
//! change, a new mapping included; a shadow changes only at an
//! invalidation ([`Shadow::sync`]), as a real IOTLB would, and a device
//! sees the OS's change from then on. Pages the OS's tables refuse are not
//! in the shadow, so the real unit faults there, and
//! [`thinhv_passthrough::vvtd::Unit::classify`] tells whose fault it is.
//! The same shadow serves both vendors' units
//! ([`thinhv_passthrough::vvtd::OsPageTables`]); an AMD-Vi large page is
//! shadowed as its 4 KiB pages.
// Table indexes are 9 bits.
#![allow(clippy::cast_possible_truncation)]

use thinhv_paging::{FrameAlloc, PhysMem};
use thinhv_passthrough::vvtd::{OsMemory, OsPageTables, Page};

/// Which OS-physical pages a DMA of the OS's devices may reach.
pub trait DmaReach {
    /// Whether the 4 KiB page at `gpa` is the OS's to reach by DMA (its
    /// RAM or one of its own functions' registers).
    fn os_may_dma(&self, gpa: u64) -> bool;
}

/// Frames given back when a shadow shrinks or goes.
pub trait FreeFrames: FrameAlloc {
    /// Returns a frame [`FrameAlloc::alloc_frame`] gave.
    fn free_frame(&mut self, frame: u64);
}

const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// The real unit's entry format: a 4-level tree of 4 KiB leaves.
pub trait Format {
    /// An entry at `level` (3 to 1) pointing to the table at `table`.
    fn table(&self, table: u64, level: u32) -> u64;
    /// A leaf mapping `page` with these rights (at least one).
    fn leaf(&self, page: u64, read: bool, write: bool) -> u64;
    /// Whether an entry is present.
    fn present(&self, e: u64) -> bool;
}

/// VT-d second-level entries (VT-d 4.x §9.8): R 0, W 1 at every level.
#[derive(Clone, Copy, Debug)]
pub struct Vtd;

impl Format for Vtd {
    fn table(&self, table: u64, _: u32) -> u64 {
        table | 3
    }
    fn leaf(&self, page: u64, read: bool, write: bool) -> u64 {
        (page & ADDR) | u64::from(read) | (u64::from(write) << 1)
    }
    fn present(&self, e: u64) -> bool {
        e & 3 != 0
    }
}

/// AMD-Vi I/O page-table entries (AMD 48882 §2.2.3): PR 0, NextLevel 11:9
/// (the 1-based level of the table pointed to, 0 in a leaf), IR 61, IW
/// 62; directories allow both.
#[derive(Clone, Copy, Debug)]
pub struct AmdVi;

impl Format for AmdVi {
    fn table(&self, table: u64, level: u32) -> u64 {
        // An entry of the table at 0-based `level` points to the table of
        // 0-based level `level - 1`, which AMD-Vi numbers `level`.
        table | 1 | (u64::from(level) << 9) | (3 << 61)
    }
    fn leaf(&self, page: u64, read: bool, write: bool) -> u64 {
        (page & ADDR) | 1 | (u64::from(read) << 61) | (u64::from(write) << 62)
    }
    fn present(&self, e: u64) -> bool {
        e & 1 != 0
    }
}

/// What a sync changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Synced {
    /// Entries written (new, or with other rights or another page).
    pub mapped: u64,
    /// Entries removed.
    pub unmapped: u64,
    /// Pages the OS mapped that thinhv refused (not the OS's to reach).
    pub refused: u64,
    /// The walk stopped at its budget; the rest of the range was not
    /// looked at (the caller syncs it again from `resume`).
    pub resume: Option<u64>,
}

/// Why a shadow could not be changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShadowError {
    /// No frame for a new table: the entry is left out (the device's DMA
    /// there faults, as thinhv's).
    OutOfFrames,
}

/// One OS domain's shadow: a 4-level tree of 4 KiB leaves in format `F`.
#[derive(Debug)]
pub struct Shadow<F: Format> {
    fmt: F,
    /// The OS's domain ID.
    pub domain: u16,
    root: u64,
    /// Leaves present.
    pub pages: u64,
    /// Tables (the root included).
    pub tables: u64,
}

/// The OS's translation of one domain: its top table and levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OsTables {
    /// OS-physical top table.
    pub root: u64,
    /// 3 or 4.
    pub levels: u8,
}

fn index(iova: u64, level: u32) -> usize {
    ((iova >> (12 + 9 * level)) & 0x1ff) as usize
}

impl<F: Format> Shadow<F> {
    /// An empty shadow for `domain`.
    pub fn new(
        fmt: F,
        domain: u16,
        pt: &mut impl PhysMem,
        frames: &mut impl FrameAlloc,
    ) -> Result<Self, ShadowError> {
        let root = frames.alloc_frame().ok_or(ShadowError::OutOfFrames)?;
        pt.zero_frame(root);
        Ok(Self {
            fmt,
            domain,
            root,
            pages: 0,
            tables: 1,
        })
    }

    /// The top table, for the real unit's context entries (4-level).
    pub const fn root(&self) -> u64 {
        self.root
    }

    /// The shadow's leaf for `iova`.
    pub fn entry(&self, pt: &impl PhysMem, iova: u64) -> u64 {
        let mut table = self.root;
        for level in (1..4).rev() {
            let e = pt.read_entry(table, index(iova, level));
            if !self.fmt.present(e) {
                return 0;
            }
            table = e & ADDR;
        }
        pt.read_entry(table, index(iova, 0))
    }

    fn set(
        &mut self,
        pt: &mut impl PhysMem,
        frames: &mut impl FrameAlloc,
        iova: u64,
        leaf: u64,
    ) -> Result<(), ShadowError> {
        let mut table = self.root;
        for level in (1..4).rev() {
            let i = index(iova, level);
            let e = pt.read_entry(table, i);
            table = if self.fmt.present(e) {
                e & ADDR
            } else if leaf == 0 {
                return Ok(());
            } else {
                let t = frames.alloc_frame().ok_or(ShadowError::OutOfFrames)?;
                pt.zero_frame(t);
                pt.write_entry(table, i, self.fmt.table(t, level));
                self.tables += 1;
                t
            };
        }
        let i = index(iova, 0);
        let old = pt.read_entry(table, i);
        if old != leaf {
            pt.write_entry(table, i, leaf);
            match (self.fmt.present(old), self.fmt.present(leaf)) {
                (false, true) => self.pages += 1,
                (true, false) => self.pages -= 1,
                _ => {}
            }
        }
        Ok(())
    }

    /// Present leaves in `[from, to)`, in order, at most `budget`.
    fn leaves(
        &self,
        pt: &impl PhysMem,
        from: u64,
        to: u64,
        budget: u64,
    ) -> (alloc::vec::Vec<u64>, Option<u64>) {
        let mut out = alloc::vec::Vec::new();
        let resume = self.leaves_in(pt, self.root, 3, 0, from, to, budget, &mut out);
        (out, resume)
    }

    #[allow(clippy::too_many_arguments)]
    fn leaves_in(
        &self,
        pt: &impl PhysMem,
        table: u64,
        level: u32,
        base: u64,
        from: u64,
        to: u64,
        budget: u64,
        out: &mut alloc::vec::Vec<u64>,
    ) -> Option<u64> {
        let span = 1u64 << (12 + 9 * level);
        let first = (from.saturating_sub(base) / span).min(512);
        for i in first..512 {
            let at = base + i * span;
            if at >= to {
                break;
            }
            let e = pt.read_entry(table, i as usize);
            if !self.fmt.present(e) {
                continue;
            }
            if level == 0 {
                if out.len() as u64 == budget {
                    return Some(at);
                }
                out.push(at);
            } else if let Some(r) =
                self.leaves_in(pt, e & ADDR, level - 1, at, from.max(at), to, budget, out)
            {
                return Some(r);
            }
        }
        None
    }

    /// The leaf for the OS's `page`, or 0 where thinhv refuses it or the
    /// OS gave it no rights.
    fn leaf(&self, page: Option<Page>, reach: &impl DmaReach, refused: &mut u64) -> u64 {
        let Some(p) = page else { return 0 };
        if !p.read && !p.write {
            return 0;
        }
        if !reach.os_may_dma(p.gpa) {
            *refused += 1;
            return 0;
        }
        self.fmt.leaf(p.gpa, p.read, p.write)
    }

    /// Brings `[from, to)` of the shadow to what the OS's tables map now:
    /// every shadow leaf there is checked against the OS's tables (changed
    /// or removed), then every page the OS maps there is added. At most
    /// `budget` leaves of each are looked at; past that, `resume` says
    /// where to go on. A page-selective invalidation syncs its 2^AM pages,
    /// a domain-selective or global one the whole space.
    #[allow(clippy::too_many_arguments)]
    pub fn sync(
        &mut self,
        unit: &impl OsPageTables,
        os: &impl OsMemory,
        tables: OsTables,
        reach: &impl DmaReach,
        pt: &mut impl PhysMem,
        frames: &mut impl FrameAlloc,
        from: u64,
        to: u64,
        budget: u64,
    ) -> Result<Synced, ShadowError> {
        let mut s = Synced::default();
        let (old, resume_old) = self.leaves(pt, from, to, budget);
        for iova in old {
            let page = unit.page(os, tables.root, tables.levels, iova);
            let leaf = self.leaf(page, reach, &mut s.refused);
            if leaf != self.entry(pt, iova) {
                self.set(pt, frames, iova, leaf)?;
                if leaf == 0 {
                    s.unmapped += 1;
                } else {
                    s.mapped += 1;
                }
            }
        }
        let mut new = alloc::vec::Vec::new();
        let resume_new = unit.pages(
            os,
            tables.root,
            tables.levels,
            from..to,
            budget,
            &mut |iova, p| {
                new.push((iova, p));
            },
        );
        let mut refused = 0;
        for (iova, p) in new {
            let leaf = self.leaf(Some(p), reach, &mut refused);
            if leaf != 0 && leaf != self.entry(pt, iova) {
                self.set(pt, frames, iova, leaf)?;
                s.mapped += 1;
            }
        }
        // A page refused in both passes counts once.
        s.refused = s.refused.max(refused);
        s.resume = match (resume_old, resume_new) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Ok(s)
    }

    /// Gives every frame of the shadow back.
    pub fn free(self, pt: &impl PhysMem, frames: &mut impl FreeFrames) {
        fn free_in<F: Format>(
            fmt: &F,
            pt: &impl PhysMem,
            frames: &mut impl FreeFrames,
            table: u64,
            level: u32,
        ) {
            if level > 0 {
                for i in 0..512 {
                    let e = pt.read_entry(table, i);
                    if fmt.present(e) {
                        free_in(fmt, pt, frames, e & ADDR, level - 1);
                    }
                }
            }
            frames.free_frame(table);
        }
        free_in(&self.fmt, pt, frames, self.root, 3);
    }
}

#[cfg(test)]
#[path = "vvtd_shadow_tests.rs"]
mod tests;
