//! The VT-d unit thinhv shows the OS (issue 14), as pure logic: its
//! registers, what a register write does, the invalidation queue, fault
//! recording, and the reads of the OS's own tables (root, context and
//! second-level, interrupt remapping) that thinhv composes into the real
//! unit's.
//!
//! Everything the OS programs is untrusted. The unit reads and writes OS
//! memory only through [`OsMemory`], which refuses what the OS does not own
//! (thinhv's memory, an appliance's, MMIO); a refusal becomes the fault the
//! real hardware would report for an unreadable table (reasons 0x7 to 0x9,
//! 0x23) or an invalidation queue error (FSTS.IQE), never a panic. A
//! register write does a bounded amount of work: at most one pass over the
//! queue (at most 32768 descriptors, its largest size).
//!
//! What a write means for the real unit is returned as [`Effects`] (which
//! caches the OS flushed, whether it turned translation or remapping on or
//! off, which interrupts the OS asked for): the caller composes and
//! invalidates the real tables, and judges and delivers the interrupts.
//!
//! Offered: version 1.0 registers, legacy-mode root and context tables,
//! 3- and 4-level second-level tables of 4 KiB pages (no large pages),
//! pass-through context entries, caching mode (CM: the OS invalidates
//! after making an entry present, so a shadow never misses a mapping),
//! page-selective invalidation, queued invalidation, interrupt remapping
//! with x2APIC destinations (EIM), coherent table walks. Not offered, and
//! clear in CAP/ECAP: device TLBs, scalable mode, first-level tables,
//! posted interrupts, nested translation, PASIDs, the protected memory
//! regions, the advanced fault log, write-buffer flushing.
// Register fields are extracted by mask and shift.
#![allow(clippy::cast_possible_truncation)]

use crate::irq_remap::{self, Cores, Delivery, Dest, Policy, Refusal, Request, Target};

/// Register offsets of the emulated unit (VT-d 4.x §11.4).
pub mod reg {
    pub use crate::vtd::reg::*;
    /// Root table address.
    pub const RTADDR_HI: u64 = 0x24;
    /// Context command, its upper dword (ICC).
    pub const CCMD_HI: u64 = 0x2c;
    /// Fault event data.
    pub const FEDATA: u64 = 0x3c;
    /// Fault event address.
    pub const FEADDR: u64 = 0x40;
    /// Fault event upper address (x2APIC destination bits 31:8).
    pub const FEUADDR: u64 = 0x44;
    /// Invalidation completion status.
    pub const ICS: u64 = 0x9c;
    /// Invalidation event control.
    pub const IECTL: u64 = 0xa0;
    /// Invalidation event data.
    pub const IEDATA: u64 = 0xa4;
    /// Invalidation event address.
    pub const IEADDR: u64 = 0xa8;
    /// Invalidation event upper address.
    pub const IEUADDR: u64 = 0xac;
    /// Invalidate address (the IOTLB registers, at ECAP.IRO).
    pub const IVA: u64 = 0x100;
    /// IOTLB invalidate.
    pub const IOTLB: u64 = 0x108;
    /// The first fault recording register (at CAP.FRO).
    pub const FRCD: u64 = 0x200;
}

/// Global status bits (GSTS); GCMD's commands sit at the same positions.
pub mod gsts {
    /// Translation enabled.
    pub const TES: u32 = 1 << 31;
    /// Root table pointer latched.
    pub const RTPS: u32 = 1 << 30;
    /// Queued invalidation enabled.
    pub const QIES: u32 = 1 << 26;
    /// Interrupt remapping enabled.
    pub const IRES: u32 = 1 << 25;
    /// Interrupt remapping table pointer latched.
    pub const IRTPS: u32 = 1 << 24;
    /// Compatibility-format interrupts pass.
    pub const CFIS: u32 = 1 << 23;
}

/// Fault status bits (FSTS).
pub mod fsts {
    /// Primary fault overflow (write 1 to clear).
    pub const PFO: u32 = 1;
    /// Primary fault pending (some record's F set; read-only).
    pub const PPF: u32 = 1 << 1;
    /// Invalidation queue error (write 1 to clear).
    pub const IQE: u32 = 1 << 4;
    /// The write-1-to-clear bits.
    pub const W1C: u32 = PFO | IQE;
}

/// Interrupt mask and pending bits of FECTL and IECTL.
const IM: u32 = 1 << 31;
const IP: u32 = 1 << 30;

/// Fault recording registers offered.
pub const FAULT_RECORDS: usize = 8;
/// The emulated register window's size.
pub const WINDOW: u64 = 0x1000;
/// The largest invalidation queue (QS 7: 128 pages of 256 descriptors).
pub const QUEUE_MAX: u64 = 128 * 256;
/// The largest page-selective invalidation (MAMV: 2^9 pages).
pub const MAMV: u8 = 9;
/// log2 of the OS entries thinhv composes: the real table's lower half.
/// Its upper half holds thinhv's and the appliances' entries, so an OS
/// entry at 2^15 or above faults (reason 0x21) whatever size the OS
/// programmed (Linux programs 65536 and allocates from 0).
pub const IRT_MAX_LOG2: u8 = 15;

/// Fault reasons (VT-d 4.x Appendix A).
pub mod reason {
    /// Root entry not present.
    pub const ROOT_NOT_PRESENT: u8 = 0x1;
    /// Context entry not present.
    pub const CONTEXT_NOT_PRESENT: u8 = 0x2;
    /// Context entry invalid (an unsupported translation type or width).
    pub const CONTEXT_INVALID: u8 = 0x3;
    /// Address beyond the guest address width.
    pub const BEYOND_AW: u8 = 0x4;
    /// Write not allowed by the second-level entry.
    pub const WRITE: u8 = 0x5;
    /// Read not allowed (entry not present).
    pub const READ: u8 = 0x6;
    /// A second-level table could not be read.
    pub const SL_ACCESS: u8 = 0x7;
    /// The root table could not be read.
    pub const ROOT_ACCESS: u8 = 0x8;
    /// The context table could not be read.
    pub const CONTEXT_ACCESS: u8 = 0x9;
    /// Root entry reserved bits set.
    pub const ROOT_RESERVED: u8 = 0xa;
    /// Context entry reserved bits set.
    pub const CONTEXT_RESERVED: u8 = 0xb;
    /// Second-level entry reserved bits set.
    pub const SL_RESERVED: u8 = 0xc;
    /// Interrupt index beyond the table.
    pub const IRT_INDEX: u8 = 0x21;
    /// Interrupt remapping entry not present.
    pub const IRTE_NOT_PRESENT: u8 = 0x22;
    /// The interrupt remapping table could not be read.
    pub const IRT_ACCESS: u8 = 0x23;
    /// Interrupt remapping entry reserved bits set.
    pub const IRTE_RESERVED: u8 = 0x24;
    /// The requester failed the entry's source validation.
    pub const SID: u8 = 0x26;
}

/// OS memory as the emulated unit may touch it: the OS's own RAM only.
pub trait OsMemory {
    /// Reads `out.len()` bytes at OS-physical `gpa`; refused (and nothing
    /// read) where any byte is not the OS's RAM.
    fn read(&self, gpa: u64, out: &mut [u8]) -> Result<(), Denied>;
    /// Writes `data` at OS-physical `gpa`; refused (and nothing written)
    /// where any byte is not the OS's RAM.
    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), Denied>;
}

/// OS memory refused the access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Denied;

pub(crate) fn read_u64s<const N: usize>(mem: &impl OsMemory, gpa: u64) -> Result<[u64; N], Denied> {
    let mut b = [0u8; 32];
    let b = &mut b[..N * 8];
    mem.read(gpa, b)?;
    let mut out = [0u64; N];
    for (i, c) in b.chunks_exact(8).enumerate() {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        out[i] = u64::from_le_bytes(w);
    }
    Ok(out)
}

/// The OS's I/O page tables as an emulated unit reads them, whatever the
/// vendor's format: what a shadow ([`thin-hv-core`'s `vvtd_shadow`]) is
/// built from.
pub trait OsPageTables {
    /// The 4 KiB page `iova` translates to, or `None` (not mapped, or the
    /// walk faults).
    fn page(&self, mem: &impl OsMemory, root: u64, levels: u8, iova: u64) -> Option<Page>;
    /// Every mapped 4 KiB page in `range`, in order, at most `budget`;
    /// the IOVA to resume from if the budget ran out. A large page is
    /// reported as its 4 KiB pages.
    fn pages(
        &self,
        mem: &impl OsMemory,
        root: u64,
        levels: u8,
        range: core::ops::Range<u64>,
        budget: u64,
        f: &mut impl FnMut(u64, Page),
    ) -> Option<u64>;
}

impl OsPageTables for Unit {
    fn page(&self, mem: &impl OsMemory, root: u64, levels: u8, iova: u64) -> Option<Page> {
        self.walk(mem, root, levels, iova).ok().flatten()
    }
    fn pages(
        &self,
        mem: &impl OsMemory,
        root: u64,
        levels: u8,
        range: core::ops::Range<u64>,
        budget: u64,
        f: &mut impl FnMut(u64, Page),
    ) -> Option<u64> {
        self.leaves(mem, root, levels, range, budget, f)
    }
}

/// What thinhv offers the OS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offer {
    /// The OS's physical address width (CAP.MGAW + 1 bounds what a
    /// second-level entry may name; at most 52).
    pub host_width: u8,
    /// Interrupt remapping (ECAP.IR).
    pub remapping: bool,
    /// x2APIC destinations in remapping entries (ECAP.EIM).
    pub x2apic: bool,
}

impl Offer {
    /// CAP: 256 domains (ND 2), caching mode, 3- and 4-level tables
    /// (SAGAW 00110b), MGAW 47 (48-bit), the fault records at
    /// [`reg::FRCD`], page-selective invalidation up to 2^MAMV pages.
    pub const fn cap(&self) -> u64 {
        2 // ND: 256 domains
            | (1 << 7) // CM
            | (0b00110 << 8) // SAGAW: 39-bit (3-level), 48-bit (4-level)
            | (47 << 16) // MGAW
            | ((reg::FRCD / 16) << 24) // FRO
            | (1 << 39) // PSI
            | (((FAULT_RECORDS - 1) as u64) << 40) // NFR
            | ((MAMV as u64) << 48)
    }

    /// ECAP: coherent, queued invalidation, pass-through, the IOTLB
    /// registers at [`reg::IVA`], interrupt remapping and EIM as offered,
    /// and the whole handle mask range for IEC invalidations (MHMV 15).
    pub const fn ecap(&self) -> u64 {
        1 // C
            | (1 << 1) // QI
            | ((self.remapping as u64) << 3) // IR
            | (((self.remapping && self.x2apic) as u64) << 4) // EIM
            | (1 << 6) // PT
            | ((reg::IVA / 16) << 8) // IRO
            | (0xf << 20) // MHMV
    }

    /// The highest OS-physical address bit a table entry may set, plus one.
    const fn width(self) -> u8 {
        if self.host_width > 52 {
            52
        } else if self.host_width < 32 {
            32
        } else {
            self.host_width
        }
    }
}

/// A set of flushes the OS asked for, coalesced: past [`Flushes::MAX`]
/// distinct ones it becomes "everything".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flushes {
    /// Everything of this kind.
    pub all: bool,
    len: u8,
    items: [Scope; Flushes::MAX],
}

/// One flush.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Scope {
    /// Nothing (an unused slot).
    #[default]
    None,
    /// Every entry of a domain.
    Domain(u16),
    /// One requester's context entry (context cache, device-selective),
    /// or on AMD-Vi one device's table entry or interrupt table.
    Device {
        /// Requester ID.
        sid: u16,
        /// The function mask FM (VT-d §6.5.2.1, as SQ in a remapping
        /// entry): 0 none, 1 ignores function bit 2, 2 bits 2:1, 3 bits
        /// 2:0 (0 on AMD-Vi).
        mask: u8,
    },
    /// 2^order pages of a domain from `addr` (aligned to the size).
    Pages {
        /// Domain.
        domain: u16,
        /// I/O virtual address.
        addr: u64,
        /// log2 of the pages.
        order: u8,
    },
    /// 2^order remapping entries from `index`.
    Entries {
        /// First entry.
        index: u16,
        /// log2 of the entries.
        order: u8,
    },
}

impl Flushes {
    /// Distinct flushes kept before they become "everything".
    pub const MAX: usize = 8;

    pub(crate) fn add(&mut self, s: Scope) {
        if self.all || self.items[..usize::from(self.len)].contains(&s) {
            return;
        }
        if usize::from(self.len) == Self::MAX {
            self.all = true;
            self.len = 0;
            return;
        }
        self.items[usize::from(self.len)] = s;
        self.len += 1;
    }

    pub(crate) fn everything(&mut self) {
        self.all = true;
        self.len = 0;
    }

    /// The flushes (empty when [`Self::all`]).
    pub fn scopes(&self) -> &[Scope] {
        &self.items[..usize::from(self.len)]
    }

    /// Nothing to flush.
    pub const fn is_empty(&self) -> bool {
        !self.all && self.len == 0
    }
}

/// An interrupt the OS programmed into the unit's event registers, as it
/// wrote them: the caller decodes and judges it (it is a compatibility-
/// format message the OS aims where it likes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// FEADDR / IEADDR.
    pub addr: u32,
    /// FEUADDR / IEUADDR (x2APIC destination bits 31:8).
    pub upper: u32,
    /// FEDATA / IEDATA.
    pub data: u32,
}

/// What one register write means beyond the unit's own registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// A root table was latched (SRTP): every shadow is stale.
    pub root: bool,
    /// Translation was turned on (true) or off.
    pub translation: Option<bool>,
    /// Context-cache invalidations.
    pub context: Flushes,
    /// IOTLB invalidations.
    pub iotlb: Flushes,
    /// Interrupt entry cache invalidations.
    pub entries: Flushes,
    /// An interrupt remapping table was latched (SIRTP).
    pub irt: bool,
    /// Interrupt remapping was turned on (true) or off.
    pub remapping: Option<bool>,
    /// Compatibility-format interrupts were allowed (true) or blocked.
    pub compat: Option<bool>,
    /// The fault event to deliver.
    pub fault_event: Option<Event>,
    /// The invalidation completion event to deliver.
    pub completion_event: Option<Event>,
    /// The queue stopped at a descriptor it refused.
    pub queue_error: Option<QueueError>,
}

/// Why the queue stopped (FSTS.IQE set, IQH left at the descriptor).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueError {
    /// The tail is beyond the queue.
    Tail,
    /// A descriptor could not be read (not the OS's RAM).
    Fetch,
    /// An unknown or unoffered descriptor type (device-TLB, PASID, ...).
    Type(u8),
    /// Reserved bits set, or a page-selective mask beyond MAMV.
    Reserved,
    /// A wait descriptor's status address is not the OS's RAM.
    Status,
    /// Queued invalidation is off, or the queue was never set up.
    Disabled,
}

impl QueueError {
    /// For the log.
    pub const fn describe(self) -> &'static str {
        match self {
            Self::Tail => "the tail is beyond the queue",
            Self::Fetch => "a descriptor is not in the OS's memory",
            Self::Type(_) => "a descriptor type thinhv does not offer",
            Self::Reserved => "a descriptor sets reserved bits",
            Self::Status => "a wait's status address is not in the OS's memory",
            Self::Disabled => "queued invalidation is off",
        }
    }
}

/// A fault of the OS's own making (its tables refused the request), to be
/// recorded in the OS's fault registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OsFault {
    /// Requester.
    pub sid: u16,
    /// Reason ([`reason`]).
    pub reason: u8,
    /// The page (DMA) or the entry index in bits 63:48 (interrupts).
    pub info: u64,
    /// A write request (else a read).
    pub write: bool,
}

/// A fault the OS's tables would not have caused: thinhv's protection
/// refused the request (thinhv counts it; the OS is not told).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThinhvFault;

/// The latched interrupt remapping table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Irt {
    /// OS-physical base.
    pub base: u64,
    /// Entries (2^(S+1)).
    pub entries: u32,
    /// x2APIC destinations (EIME).
    pub x2apic: bool,
}

/// The emulated unit's state.
#[derive(Clone, Debug)]
pub struct Unit {
    offer: Offer,
    gsts: u32,
    rtaddr: u64,
    root: Option<u64>,
    ccmd: u64,
    fsts: u32,
    fectl: u32,
    fe: Event,
    records: [[u64; 2]; FAULT_RECORDS],
    /// The record the next fault goes to.
    next_record: usize,
    iqa: u64,
    iqh: u64,
    iqt: u64,
    ics: u32,
    iectl: u32,
    ie: Event,
    irta: u64,
    irt: Option<Irt>,
    iva: u64,
    iotlb: u64,
    /// Faults recorded since the unit was created (for `thinhv status`).
    pub faults_recorded: u64,
    /// Faults lost to a full set of records.
    pub faults_lost: u64,
}

/// Whether an access of `size` bytes at `offset` is one a register window
/// of `window` bytes answers: 4 or 8 bytes, naturally aligned, inside it
/// (anything else reads 0 and writes nothing, as a reserved register).
pub(crate) fn sized(offset: u64, size: u8, window: u64) -> bool {
    matches!(size, 4 | 8) && offset.is_multiple_of(u64::from(size)) && offset < window
}

/// What a read of `size` bytes at `offset` returns of the quadword
/// register `q` holding it: the whole of it, or the dword `offset` names.
pub(crate) const fn part(q: u64, offset: u64, size: u8) -> u64 {
    match (size, offset & 4) {
        (8, _) => q,
        (_, 0) => q & 0xffff_ffff,
        _ => q >> 32,
    }
}

/// A register's new value after a write of `size` bytes at `offset`: the
/// whole quadword, or the dword `offset` names within it.
pub(crate) fn merge(old: u64, offset: u64, size: u8, value: u64) -> u64 {
    match (size, offset & 4) {
        (8, _) => value,
        (_, 0) => (old & !0xffff_ffff) | (value & 0xffff_ffff),
        _ => (old & 0xffff_ffff) | (value << 32),
    }
}

impl Unit {
    /// A unit as hardware comes out of reset: everything off, both event
    /// interrupts masked.
    pub const fn new(offer: Offer) -> Self {
        let none = Event {
            addr: 0,
            upper: 0,
            data: 0,
        };
        Self {
            offer,
            gsts: 0,
            rtaddr: 0,
            root: None,
            ccmd: 0,
            fsts: 0,
            fectl: IM,
            fe: none,
            records: [[0; 2]; FAULT_RECORDS],
            next_record: 0,
            iqa: 0,
            iqh: 0,
            iqt: 0,
            ics: 0,
            iectl: IM,
            ie: none,
            irta: 0,
            irt: None,
            iva: 0,
            iotlb: 0,
            faults_recorded: 0,
            faults_lost: 0,
        }
    }

    /// What the unit offers.
    pub const fn offer(&self) -> Offer {
        self.offer
    }

    /// Global status.
    pub const fn status(&self) -> u32 {
        self.gsts
    }

    /// Translation is on.
    pub const fn translating(&self) -> bool {
        self.gsts & gsts::TES != 0
    }

    /// The latched root table, if translation is on.
    pub const fn root(&self) -> Option<u64> {
        if self.translating() { self.root } else { None }
    }

    /// Interrupt remapping is on (GSTS.IRES), with or without a table
    /// latched.
    pub const fn remapping_on(&self) -> bool {
        self.gsts & gsts::IRES != 0
    }

    /// The latched remapping table, if remapping is on.
    pub const fn irt(&self) -> Option<Irt> {
        if self.gsts & gsts::IRES != 0 {
            self.irt
        } else {
            None
        }
    }

    /// Compatibility-format interrupts pass (remapping off, or CFIS set;
    /// x2APIC-mode tables block them whatever CFIS says).
    pub const fn compat_passes(&self) -> bool {
        match self.irt() {
            None => true,
            Some(t) => !t.x2apic && self.gsts & gsts::CFIS != 0,
        }
    }

    fn ppf(&self) -> bool {
        self.records.iter().any(|r| r[1] >> 63 != 0)
    }

    fn fsts_value(&self) -> u32 {
        let fri = (self.fsts >> 8) & 0xff;
        (self.fsts & fsts::W1C) | (u32::from(self.ppf()) << 1) | (fri << 8)
    }

    /// Reads `size` (4 or 8) bytes at `offset`; anything else reads 0, as
    /// a reserved register does.
    pub fn read(&self, offset: u64, size: u8) -> u64 {
        if !sized(offset, size, WINDOW) {
            return 0;
        }
        let base = offset & !7;
        part(self.read_qword(base), offset, size)
    }

    fn read_qword(&self, base: u64) -> u64 {
        let pair = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
        match base {
            reg::VER => 0x10,
            reg::CAP => self.offer.cap(),
            reg::ECAP => self.offer.ecap(),
            // GCMD reads 0; GSTS in the upper dword.
            reg::GCMD => u64::from(self.gsts) << 32,
            reg::RTADDR => self.rtaddr,
            reg::CCMD => self.ccmd,
            // 0x30 reserved, FSTS at 0x34.
            0x30 => u64::from(self.fsts_value()) << 32,
            0x38 => pair(self.fectl, self.fe.data),
            0x40 => pair(self.fe.addr, self.fe.upper),
            reg::IQH => self.iqh,
            reg::IQT => self.iqt,
            reg::IQA => self.iqa,
            // 0x98 reserved, ICS at 0x9c.
            0x98 => u64::from(self.ics) << 32,
            0xa0 => pair(self.iectl, self.ie.data),
            0xa8 => pair(self.ie.addr, self.ie.upper),
            reg::IRTA => self.irta,
            reg::IVA => self.iva,
            reg::IOTLB => self.iotlb,
            o if (reg::FRCD..reg::FRCD + 16 * FAULT_RECORDS as u64).contains(&o) => {
                let r = self.records[((o - reg::FRCD) / 16) as usize];
                r[((o / 8) & 1) as usize]
            }
            _ => 0,
        }
    }

    /// Writes `size` (4 or 8) bytes at `offset`: what hardware does with
    /// the write, with OS memory through `mem`; what it means beyond the
    /// unit is added to `fx`. Writes to read-only and reserved registers,
    /// of other sizes, or unaligned, do nothing.
    pub fn write(
        &mut self,
        offset: u64,
        size: u8,
        value: u64,
        mem: &mut impl OsMemory,
        fx: &mut Effects,
    ) {
        if !sized(offset, size, WINDOW) {
            return;
        }
        let value = if size == 4 {
            value & 0xffff_ffff
        } else {
            value
        };
        // A quadword write is its two dwords, low first (as the registers
        // that act on a write act on the dword holding their command).
        let dwords = if size == 8 {
            [(offset, value & 0xffff_ffff), (offset + 4, value >> 32)]
        } else {
            [(offset, value), (u64::MAX, 0)]
        };
        for (at, v) in dwords {
            if at != u64::MAX {
                self.write_dword(at, v as u32, mem, fx);
            }
        }
    }

    fn write_dword(&mut self, at: u64, v: u32, mem: &mut impl OsMemory, fx: &mut Effects) {
        let v64 = u64::from(v);
        match at {
            reg::GCMD => self.command(v, mem, fx),
            // RTADDR: legacy mode only (bit 11 TTM, scalable, reads 0).
            0x20 | 0x24 => self.rtaddr = merge(self.rtaddr, at, 4, v64) & !0xfff & self.pa_mask(),
            0x28 => self.ccmd = merge(self.ccmd, at, 4, v64),
            0x2c => {
                self.ccmd = merge(self.ccmd, at, 4, v64);
                self.context_command(fx);
            }
            0x34 => {
                let iqe = self.fsts & fsts::IQE;
                self.fsts &= !(v & fsts::W1C);
                self.settle_fault_event();
                // Fetching resumes at IQH once the OS clears IQE (Linux
                // replaces the refused descriptor first).
                if iqe != 0 && self.fsts & fsts::IQE == 0 {
                    self.run_queue(mem, fx);
                }
            }
            0x38 => {
                self.fectl = (self.fectl & IP) | (v & IM);
                self.unmask(false, fx);
            }
            0x3c => self.fe.data = v,
            0x40 => self.fe.addr = v & !3,
            0x44 => self.fe.upper = v,
            // IQH is read-only; IQT's upper dword is reserved.
            0x88 => {
                self.iqt = v64 & 0x7fff0;
                self.run_queue(mem, fx);
            }
            // IQA: base, QS; DW (bit 11, 256-bit descriptors) is not
            // offered and reads 0. Ignored while the queue is on.
            0x90 | 0x94 if self.gsts & gsts::QIES == 0 => {
                self.iqa = merge(self.iqa, at, 4, v64) & ((!0xfff & self.pa_mask()) | 7);
            }
            // IWC is write-1-to-clear; the event's pending bit goes with
            // it.
            0x9c if v & 1 != 0 => {
                self.ics = 0;
                self.iectl &= !IP;
            }
            0xa0 => {
                self.iectl = (self.iectl & IP) | (v & IM);
                self.unmask(true, fx);
            }
            0xa4 => self.ie.data = v,
            0xa8 => self.ie.addr = v & !3,
            0xac => self.ie.upper = v,
            // IRTA: base, EIME (only where EIM is offered), S (at most
            // IRT_MAX_LOG2 - 1).
            0xb8 | 0xbc => {
                let eime = if self.offer.x2apic { 1 << 11 } else { 0 };
                self.irta = merge(self.irta, at, 4, v64) & ((!0xfff & self.pa_mask()) | eime | 0xf);
            }
            0x100 | 0x104 => self.iva = merge(self.iva, at, 4, v64) & (!0xfff | 0x7f),
            0x108 => self.iotlb = merge(self.iotlb, at, 4, v64),
            0x10c => {
                self.iotlb = merge(self.iotlb, at, 4, v64);
                self.iotlb_command(fx);
            }
            // F (bit 127) is write-1-to-clear.
            o if (reg::FRCD..reg::FRCD + 16 * FAULT_RECORDS as u64).contains(&o)
                && o % 16 == 12
                && v & (1 << 31) != 0 =>
            {
                let i = ((o - reg::FRCD) / 16) as usize;
                self.records[i][1] &= !(1 << 63);
                self.settle_fault_event();
            }
            _ => {}
        }
    }

    fn pa_mask(&self) -> u64 {
        (1u64 << self.offer.width()) - 1
    }

    /// GCMD: a persistent bit that differs from its status bit is a
    /// command, as is a set one-shot bit (SRTP, SIRTP). Hardware performs
    /// one per write; software writes one at a time, and this performs
    /// each in turn.
    fn command(&mut self, v: u32, mem: &mut impl OsMemory, fx: &mut Effects) {
        if v & gsts::RTPS != 0 {
            self.root = Some(self.rtaddr);
            self.gsts |= gsts::RTPS;
            fx.root = true;
        }
        if v & gsts::IRTPS != 0 && self.offer.remapping {
            self.irt = Some(Irt {
                base: self.irta & !0xfff,
                entries: 2 << (self.irta & 0xf),
                x2apic: self.irta & (1 << 11) != 0,
            });
            self.gsts |= gsts::IRTPS;
            fx.irt = true;
        }
        let flip = |gsts: &mut u32, bit: u32| -> Option<bool> {
            let want = v & bit != 0;
            if want == (*gsts & bit != 0) {
                return None;
            }
            *gsts ^= bit;
            Some(want)
        };
        if let Some(on) = flip(&mut self.gsts, gsts::TES) {
            fx.translation = Some(on);
        }
        if flip(&mut self.gsts, gsts::QIES).is_some() {
            // The head is 0 whenever the queue is off (VT-d §11.4.8.1);
            // the tail is software's.
            self.iqh = 0;
        }
        if self.offer.remapping {
            if let Some(on) = flip(&mut self.gsts, gsts::IRES) {
                fx.remapping = Some(on);
            }
            if let Some(on) = flip(&mut self.gsts, gsts::CFIS) {
                fx.compat = Some(on);
            }
        }
        // A queue armed before QIE went on runs now.
        if self.gsts & gsts::QIES != 0 && self.iqh != self.iqt {
            self.run_queue(mem, fx);
        }
    }

    /// CCMD: register-based context-cache invalidation (ICC set).
    fn context_command(&mut self, fx: &mut Effects) {
        if self.ccmd >> 63 == 0 {
            return;
        }
        let g = (self.ccmd >> 61) & 3;
        match g {
            1 => fx.context.everything(),
            2 => fx.context.add(Scope::Domain(self.ccmd as u16)),
            3 => fx.context.add(Scope::Device {
                sid: (self.ccmd >> 16) as u16,
                mask: ((self.ccmd >> 32) & 3) as u8,
            }),
            _ => {}
        }
        // Done at once: ICC clear, CAIG (60:59) the granularity performed.
        self.ccmd = (self.ccmd & !(1 << 63) & !(3 << 59)) | (g << 59);
    }

    /// The IOTLB register: register-based IOTLB invalidation (IVT set).
    fn iotlb_command(&mut self, fx: &mut Effects) {
        if self.iotlb >> 63 == 0 {
            return;
        }
        let g = (self.iotlb >> 60) & 3;
        let did = (self.iotlb >> 32) as u16;
        let done = match g {
            1 => {
                fx.iotlb.everything();
                1
            }
            2 => {
                fx.iotlb.add(Scope::Domain(did));
                2
            }
            3 => {
                let order = (self.iva & 0x3f) as u8;
                if order > MAMV {
                    // Beyond MAMV: done as a domain flush, and said so.
                    fx.iotlb.add(Scope::Domain(did));
                    2
                } else {
                    let size = 1u64 << (12 + u32::from(order));
                    fx.iotlb.add(Scope::Pages {
                        domain: did,
                        addr: self.iva & !0xfff & !(size - 1),
                        order,
                    });
                    3
                }
            }
            _ => 0,
        };
        // IVT clear, IAIG (58:57) the granularity performed.
        self.iotlb = (self.iotlb & !(1 << 63) & !(3 << 57)) | (done << 57);
    }

    fn queue_entries(&self) -> u64 {
        256 << (self.iqa & 7)
    }

    /// Processes descriptors from IQH to IQT, wrapping at the queue's end.
    /// Stops at the first it refuses, with FSTS.IQE set and IQH on it.
    fn run_queue(&mut self, mem: &mut impl OsMemory, fx: &mut Effects) {
        if self.gsts & gsts::QIES == 0 || self.fsts & fsts::IQE != 0 {
            return;
        }
        let entries = self.queue_entries();
        let tail = self.iqt >> 4;
        if tail >= entries {
            self.queue_error(QueueError::Tail, fx);
            return;
        }
        let base = self.iqa & !0xfff;
        let mut head = (self.iqh >> 4) % entries;
        // At most one pass: the tail is reached within `entries` steps.
        while head != tail {
            let Ok(d) = read_u64s::<2>(mem, base + head * 16) else {
                self.iqh = head << 4;
                self.queue_error(QueueError::Fetch, fx);
                return;
            };
            if let Err(e) = self.descriptor(d, mem, fx) {
                self.iqh = head << 4;
                self.queue_error(e, fx);
                return;
            }
            head = (head + 1) % entries;
        }
        self.iqh = head << 4;
    }

    fn queue_error(&mut self, e: QueueError, fx: &mut Effects) {
        // Run only with IQE clear: always a new condition.
        self.fsts |= fsts::IQE;
        fx.queue_error = Some(e);
        self.raise_fault_event(fx);
    }

    /// One 128-bit descriptor (VT-d 4.x §6.5.2).
    fn descriptor(
        &mut self,
        [lo, hi]: [u64; 2],
        mem: &mut impl OsMemory,
        fx: &mut Effects,
    ) -> Result<(), QueueError> {
        // Type: bits 3:0 and 11:9 (the upper bits are 0 for every type
        // offered here).
        let ty = (lo & 0xf) | ((lo >> 5) & 0x70);
        match ty {
            // Context-cache: G 5:4, DID 31:16, SID 47:32, FM 49:48.
            1 => {
                if lo & !0x0003_ffff_ffff_003f != 0 || hi != 0 {
                    return Err(QueueError::Reserved);
                }
                match (lo >> 4) & 3 {
                    1 => fx.context.everything(),
                    2 => fx.context.add(Scope::Domain((lo >> 16) as u16)),
                    3 => fx.context.add(Scope::Device {
                        sid: (lo >> 32) as u16,
                        mask: ((lo >> 48) & 3) as u8,
                    }),
                    _ => return Err(QueueError::Reserved),
                }
            }
            // IOTLB: G 5:4, DW 6, DR 7 (drain hints; none offered, so
            // ignored), DID 31:16; ADDR 63:12, IH 6, AM 5:0.
            2 => {
                if lo & !0xffff_00ff != 0 || hi & 0xf80 != 0 {
                    return Err(QueueError::Reserved);
                }
                let did = (lo >> 16) as u16;
                match (lo >> 4) & 3 {
                    1 => fx.iotlb.everything(),
                    2 => fx.iotlb.add(Scope::Domain(did)),
                    3 => {
                        let order = (hi & 0x3f) as u8;
                        if order > MAMV {
                            return Err(QueueError::Reserved);
                        }
                        let size = 1u64 << (12 + u32::from(order));
                        if hi & !0xfff & (size - 1) != 0 {
                            return Err(QueueError::Reserved);
                        }
                        fx.iotlb.add(Scope::Pages {
                            domain: did,
                            addr: hi & !0xfff,
                            order,
                        });
                    }
                    _ => return Err(QueueError::Reserved),
                }
            }
            // Interrupt entry cache: G 4 (index-selective), IM 31:27,
            // IIDX 47:32.
            4 => {
                if !self.offer.remapping {
                    return Err(QueueError::Type(4));
                }
                if lo & !0x0000_ffff_f800_001f != 0 || hi != 0 {
                    return Err(QueueError::Reserved);
                }
                if lo & (1 << 4) == 0 {
                    fx.entries.everything();
                } else {
                    let order = ((lo >> 27) & 0x1f) as u8;
                    if order > 15 {
                        return Err(QueueError::Reserved);
                    }
                    let index = (lo >> 32) as u16 & !((1u32 << order) - 1) as u16;
                    fx.entries.add(Scope::Entries { index, order });
                }
            }
            // Wait: IF 4, SW 5, FN 6, status data 63:32; status address
            // 63:2. Page-request drain (bit 7) is not offered.
            5 => {
                if lo & 0xffff_f180 != 0 || hi & 3 != 0 {
                    return Err(QueueError::Reserved);
                }
                if lo & (1 << 5) != 0 {
                    let data = ((lo >> 32) as u32).to_le_bytes();
                    mem.write(hi & !3, &data)
                        .map_err(|Denied| QueueError::Status)?;
                }
                if lo & (1 << 4) != 0 {
                    self.ics = 1;
                    if self.iectl & IM == 0 {
                        fx.completion_event = Some(self.ie);
                    } else {
                        self.iectl |= IP;
                    }
                }
            }
            t => return Err(QueueError::Type(t as u8)),
        }
        Ok(())
    }

    /// A mask bit cleared with the event pending delivers it.
    fn unmask(&mut self, completion: bool, fx: &mut Effects) {
        let (ctl, ev) = if completion {
            (&mut self.iectl, self.ie)
        } else {
            (&mut self.fectl, self.fe)
        };
        if *ctl & IM == 0 && *ctl & IP != 0 {
            *ctl &= !IP;
            if completion {
                fx.completion_event = Some(ev);
            } else {
                fx.fault_event = Some(ev);
            }
        }
    }

    /// After software cleared status: with no fault condition left, the
    /// pending bit goes too.
    fn settle_fault_event(&mut self) {
        if !self.ppf() && self.fsts & fsts::W1C == 0 {
            self.fectl &= !IP;
        }
    }

    /// A new fault condition: the event, or its pending bit if masked.
    fn raise_fault_event(&mut self, fx: &mut Effects) {
        if self.fectl & IM == 0 {
            fx.fault_event = Some(self.fe);
        } else {
            self.fectl |= IP;
        }
    }

    /// Records a fault the OS's own tables caused, as hardware does: into
    /// the next record in turn if it is free, else overflow (PFO) and the
    /// fault is lost. FSTS.FRI names the first pending record: it is set
    /// when a fault is recorded while none is pending (VT-d 4.x §10.4.9),
    /// and the OS's handler reads the records from there. A new fault
    /// condition raises the fault event.
    pub fn record(&mut self, f: OsFault, fx: &mut Effects) {
        if self.fsts & fsts::PFO != 0 {
            self.faults_lost += 1;
            return;
        }
        let had = self.ppf();
        let fri = self.next_record % FAULT_RECORDS;
        if self.records[fri][1] >> 63 != 0 {
            self.fsts |= fsts::PFO;
            self.faults_lost += 1;
            if !had {
                self.raise_fault_event(fx);
            }
            return;
        }
        // FI 63:12 (page) or the index in 63:48; SID 79:64, FR 103:96,
        // T 126 (1: read), F 127.
        let hi = u64::from(f.sid)
            | (u64::from(f.reason) << 32)
            | (u64::from(!f.write) << 62)
            | (1 << 63);
        self.records[fri] = [f.info & !0xfff, hi];
        if !had {
            self.fsts = (self.fsts & !0xff00) | ((fri as u32) << 8);
        }
        self.next_record = (fri + 1) % FAULT_RECORDS;
        self.faults_recorded += 1;
        if !had {
            self.raise_fault_event(fx);
        }
    }
}

/// How the OS's tables translate one requester.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Context {
    /// Translation off: requests pass untranslated (thinhv's protection
    /// still applies).
    Off,
    /// A pass-through context entry (TT 10b).
    PassThrough {
        /// Domain.
        domain: u16,
    },
    /// Second-level translation.
    Tables {
        /// Domain.
        domain: u16,
        /// The top table (OS-physical).
        root: u64,
        /// 3 or 4.
        levels: u8,
    },
}

/// One translated page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Page {
    /// OS-physical page.
    pub gpa: u64,
    /// Readable.
    pub read: bool,
    /// Writable.
    pub write: bool,
}

impl Unit {
    /// The OS's context for requester `sid`: root entry (P 0, CTP 63:12),
    /// context entry (P 0, FPD 1, TT 3:2, SLPTPTR 63:12; AW 66:64, DID
    /// 87:72). Err is the fault reason and whether the context asked for
    /// faults not to be recorded (FPD).
    pub fn context(&self, mem: &impl OsMemory, sid: u16) -> Result<Context, (u8, bool)> {
        if !self.translating() {
            return Ok(Context::Off);
        }
        let Some(root) = self.root else {
            return Err((reason::ROOT_ACCESS, false));
        };
        let [re, re_hi] = read_u64s::<2>(mem, root + u64::from(sid >> 8) * 16)
            .map_err(|Denied| (reason::ROOT_ACCESS, false))?;
        if re & 1 == 0 {
            return Err((reason::ROOT_NOT_PRESENT, false));
        }
        if re & 0xffe != 0 || re & !self.pa_mask() != 0 || re_hi != 0 {
            return Err((reason::ROOT_RESERVED, false));
        }
        let [lo, hi] = read_u64s::<2>(mem, (re & !0xfff) + u64::from(sid & 0xff) * 16)
            .map_err(|Denied| (reason::CONTEXT_ACCESS, false))?;
        let fpd = lo & 2 != 0;
        if lo & 1 == 0 {
            return Err((reason::CONTEXT_NOT_PRESENT, fpd));
        }
        if lo & 0xff0 != 0 || lo & !self.pa_mask() & !0xfff != 0 || hi & !0x00ff_ff7f != 0 {
            return Err((reason::CONTEXT_RESERVED, fpd));
        }
        let domain = ((hi >> 8) & 0xffff) as u16;
        if domain > 255 {
            // ND offers 256 domains.
            return Err((reason::CONTEXT_RESERVED, fpd));
        }
        match (lo >> 2) & 3 {
            0 => {}
            2 => return Ok(Context::PassThrough { domain }),
            _ => return Err((reason::CONTEXT_INVALID, fpd)),
        }
        let levels = match hi & 7 {
            1 => 3,
            2 => 4,
            _ => return Err((reason::CONTEXT_INVALID, fpd)),
        };
        Ok(Context::Tables {
            domain,
            root: lo & !0xfff,
            levels,
        })
    }

    /// Translates `iova` through second-level tables: `Ok(None)` where no
    /// entry maps it (a request there faults with [`reason::READ`] or
    /// [`reason::WRITE`]). Entries: R 0, W 1, PS 7 above the last level (no
    /// large pages are offered: reserved; ignored in a 4 KiB leaf), SNP 11
    /// (ignored), address 51:12; bits 62:52 are not looked at.
    pub fn walk(
        &self,
        mem: &impl OsMemory,
        root: u64,
        levels: u8,
        iova: u64,
    ) -> Result<Option<Page>, u8> {
        let width = 12 + 9 * u32::from(levels);
        if iova >> width != 0 {
            return Err(reason::BEYOND_AW);
        }
        let mut table = root;
        let mut read = true;
        let mut write = true;
        for level in (0..u32::from(levels)).rev() {
            let i = (iova >> (12 + 9 * level)) & 0x1ff;
            let [e] = read_u64s::<1>(mem, table + i * 8).map_err(|Denied| reason::SL_ACCESS)?;
            if e & 3 == 0 {
                return Ok(None);
            }
            // Bits 6:2 (ignored by hardware at non-leaf levels; EMT and
            // IPAT at leaves, which thinhv sets itself) are ignored here;
            // PS above the last level and address bits above the width
            // are reserved.
            if (level > 0 && e & (1 << 7) != 0) || e & !self.pa_mask() & 0x000f_ffff_ffff_f000 != 0
            {
                return Err(reason::SL_RESERVED);
            }
            read &= e & 1 != 0;
            write &= e & 2 != 0;
            table = e & 0x000f_ffff_ffff_f000;
        }
        Ok(Some(Page {
            gpa: table,
            read,
            write,
        }))
    }

    /// Calls `f(iova, page)` for every page the second-level tables at
    /// `root` map in `range`, in order, skipping what is not present.
    /// A table that cannot be read, or an entry with reserved bits, maps
    /// nothing below it (a request there faults; [`Unit::walk`] gives the
    /// reason). At most `budget` entries are read (tables an OS points at
    /// many times over are read as often, so the entries read, not the
    /// pages found, bound the work); the return is the IOVA to resume
    /// from if the budget ran out, always beyond `range.start` (a budget
    /// below `2 * levels` counts as that).
    pub fn leaves(
        &self,
        mem: &impl OsMemory,
        root: u64,
        levels: u8,
        range: core::ops::Range<u64>,
        budget: u64,
        f: &mut impl FnMut(u64, Page),
    ) -> Option<u64> {
        let top = 12 + 9 * u32::from(levels);
        let (from, to) = (range.start, range.end.min(1 << top));
        let mut left = budget.max(2 * u64::from(levels));
        self.leaves_in(
            mem,
            root,
            levels,
            0,
            from & !0xfff,
            to,
            true,
            true,
            &mut left,
            f,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn leaves_in(
        &self,
        mem: &impl OsMemory,
        table: u64,
        level: u8,
        base: u64,
        from: u64,
        to: u64,
        read: bool,
        write: bool,
        left: &mut u64,
        f: &mut impl FnMut(u64, Page),
    ) -> Option<u64> {
        let shift = 12 + 9 * (u32::from(level) - 1);
        let span = 1u64 << shift;
        let first = from.saturating_sub(base) >> shift;
        for i in first.min(512)..512 {
            let at = base + i * span;
            if at >= to {
                break;
            }
            if *left == 0 {
                return Some(at.max(from));
            }
            *left -= 1;
            let Ok([e]) = read_u64s::<1>(mem, table + i * 8) else {
                return None;
            };
            if e & 3 == 0
                || (level > 1 && e & (1 << 7) != 0)
                || e & !self.pa_mask() & 0x000f_ffff_ffff_f000 != 0
            {
                continue;
            }
            let (r, w) = (read && e & 1 != 0, write && e & 2 != 0);
            let next = e & 0x000f_ffff_ffff_f000;
            if level == 1 {
                f(
                    at,
                    Page {
                        gpa: next,
                        read: r,
                        write: w,
                    },
                );
            } else if let Some(resume) =
                self.leaves_in(mem, next, level - 1, at, from.max(at), to, r, w, left, f)
            {
                return Some(resume);
            }
        }
        None
    }

    /// Whose a fault the real unit reported for an OS requester is: the
    /// OS's own tables refuse the request (the fault, to record in the
    /// OS's registers; `None` where the OS's context asked for no fault
    /// records, FPD), or they allow it and thinhv's protection refused it
    /// (`Err`).
    pub fn classify(
        &self,
        mem: &impl OsMemory,
        sid: u16,
        addr: u64,
        write: bool,
    ) -> Result<Option<OsFault>, ThinhvFault> {
        let fault = |reason| OsFault {
            sid,
            reason,
            info: addr & !0xfff,
            write,
        };
        let (root, levels) = match self.context(mem, sid) {
            Ok(Context::Off | Context::PassThrough { .. }) => return Err(ThinhvFault),
            Ok(Context::Tables { root, levels, .. }) => (root, levels),
            Err((_, true)) => return Ok(None),
            Err((r, false)) => return Ok(Some(fault(r))),
        };
        match self.walk(mem, root, levels, addr) {
            Err(r) => Ok(Some(fault(r))),
            Ok(None) => Ok(Some(fault(if write {
                reason::WRITE
            } else {
                reason::READ
            }))),
            Ok(Some(p)) if write && !p.write => Ok(Some(fault(reason::WRITE))),
            Ok(Some(p)) if !write && !p.read => Ok(Some(fault(reason::READ))),
            Ok(Some(_)) => Err(ThinhvFault),
        }
    }

    /// The OS's remapping entry `index`, decoded; Err is the fault reason
    /// and FPD.
    pub fn os_irte(&self, mem: &impl OsMemory, index: u32) -> Result<OsIrte, (u8, bool)> {
        let Some(t) = self.irt() else {
            return Err((reason::IRT_INDEX, false));
        };
        if index >= t.entries.min(1 << IRT_MAX_LOG2) {
            return Err((reason::IRT_INDEX, false));
        }
        let e = read_u64s::<2>(mem, t.base + u64::from(index) * 16)
            .map_err(|Denied| (reason::IRT_ACCESS, false))?;
        OsIrte::decode(e, t.x2apic)
    }
}

/// An OS remapping entry (VT-d 4.x §9.10, remapped format).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OsIrte {
    /// Destination mode logical.
    pub logical: bool,
    /// Level-triggered.
    pub level: bool,
    /// Delivery mode.
    pub delivery: Delivery,
    /// Vector.
    pub vector: u8,
    /// Destination (x2APIC ID, or the 8-bit xAPIC one).
    pub dest: u32,
    /// Source ID.
    pub sid: u16,
    /// Source-ID qualifier.
    pub sq: u8,
    /// Source validation type.
    pub svt: u8,
    /// Decoded from an x2APIC-mode table (32-bit destinations).
    pub x2apic: bool,
}

impl OsIrte {
    /// Decodes a present entry: P 0, FPD 1, DM 2, RH 3, TM 4, DLM 7:5,
    /// AVAIL 11:8, IM 15 (posted: not offered, reserved), V 23:16, DST
    /// 63:32 (xAPIC: 47:40, the rest reserved); SID 79:64, SQ 81:80, SVT
    /// 83:82.
    pub fn decode([lo, hi]: [u64; 2], x2apic: bool) -> Result<Self, (u8, bool)> {
        let fpd = lo & 2 != 0;
        if lo & 1 == 0 {
            return Err((reason::IRTE_NOT_PRESENT, fpd));
        }
        let dst_reserved = if x2apic { 0 } else { 0xffff_00ff_0000_0000 };
        if lo & (0xff00_f000 | dst_reserved) != 0 || hi & !0xf_ffff != 0 {
            return Err((reason::IRTE_RESERVED, fpd));
        }
        let dst = (lo >> 32) as u32;
        Ok(Self {
            logical: lo & 4 != 0,
            level: lo & (1 << 4) != 0,
            delivery: Delivery::from_bits(((lo >> 5) & 7) as u8),
            vector: (lo >> 16) as u8,
            dest: if x2apic { dst } else { (dst >> 8) & 0xff },
            sid: hi as u16,
            sq: ((hi >> 16) & 3) as u8,
            svt: ((hi >> 18) & 3) as u8,
            x2apic,
        })
    }
}

/// Which requesters are the OS's, for an OS entry's source validation.
pub trait Sources {
    /// Whether requester `sid` (a function, an I/O APIC or HPET source ID)
    /// is the OS's.
    fn is_os(&self, sid: u16) -> bool;
    /// Whether every requester on buses `first..=last` is the OS's.
    fn buses_are_os(&self, first: u8, last: u8) -> bool;
}

/// Why an OS entry is not composed into the real table (its messages then
/// find the real entry not present and fault; thinhv counts them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrteRefusal {
    /// No source validation (SVT 00b) or a reserved type: any requester,
    /// an appliance's included, could use the entry.
    Unvalidated,
    /// The entry validates a requester that is not the OS's.
    ForeignSource,
    /// What [`irq_remap::judge`] refuses: a processor that is not the
    /// OS's, a delivery mode the OS may not use, a reserved vector.
    Target(Refusal),
}

impl IrteRefusal {
    /// For the log.
    pub const fn describe(self) -> &'static str {
        match self {
            Self::Unvalidated => "it does not validate its source",
            Self::ForeignSource => "it validates a source that is not the OS's",
            Self::Target(r) => r.describe(),
        }
    }
}

/// The real entry for the OS's entry `e`: the processor judged against the
/// OS's `cores` and `policy`, and the OS's own source validation kept once
/// every requester it admits is the OS's. The real table is in x2APIC
/// mode (`x2apic`) or not, whatever the OS's is.
pub fn compose(
    e: &OsIrte,
    sources: &impl Sources,
    cores: &impl Cores,
    policy: Policy,
    x2apic: bool,
) -> Result<[u64; 2], IrteRefusal> {
    match e.svt {
        1 => {
            // SQ: 01b ignores SID bit 2, 10b bits 2:1, 11b bits 2:0.
            let ignore = [0u16, 0b100, 0b110, 0b111][usize::from(e.sq & 3)];
            let base = e.sid & !ignore;
            let every = (0..=ignore).filter(|x| x & !ignore == 0);
            if every.clone().any(|x| !sources.is_os(base | x)) {
                return Err(IrteRefusal::ForeignSource);
            }
        }
        2 => {
            let (first, last) = ((e.sid >> 8) as u8, e.sid as u8);
            if first > last || !sources.buses_are_os(first, last) {
                return Err(IrteRefusal::ForeignSource);
            }
        }
        _ => return Err(IrteRefusal::Unvalidated),
    }
    let target = judge_target(e, cores, policy).map_err(IrteRefusal::Target)?;
    irq_remap::vtd::irte_validated(&target, e.sid, e.sq, e.svt, x2apic).map_err(IrteRefusal::Target)
}

/// The OS entry's destination judged. From an xAPIC-mode table, an 8-bit
/// destination as a compatibility message's ([`irq_remap::judge`]). From
/// an x2APIC-mode table, physical (0xFFFF_FFFF the broadcast) or logical
/// as cluster (31:16) and a mask of its 16 processors (x2APIC ID =
/// cluster << 4 | bit), refused whole if it names any processor that is
/// not the OS's; the first it names is the target, as `judge` does.
pub(crate) fn judge_target(
    e: &OsIrte,
    cores: &impl Cores,
    policy: Policy,
) -> Result<Target, Refusal> {
    let req = |dest| Request {
        dest,
        vector: e.vector,
        delivery: e.delivery,
        level: e.level,
    };
    if !e.x2apic {
        let id = e.dest as u8;
        let dest = if e.logical {
            Dest::Logical(id)
        } else {
            Dest::Physical(id)
        };
        return irq_remap::judge(&req(dest), cores, policy);
    }
    // Delivery mode and vector as for any message.
    let t = irq_remap::judge(&req(Dest::Physical(0)), &Always, policy)?;
    let apic_id = if e.logical {
        let cluster = e.dest >> 16;
        let mut first = None;
        for bit in 0..16 {
            if e.dest & (1 << bit) != 0 {
                let id = (cluster << 4) | bit;
                if !cores.has(id) {
                    return Err(Refusal::Foreign);
                }
                first.get_or_insert(id);
            }
        }
        first.ok_or(Refusal::Foreign)?
    } else if e.dest == u32::MAX || !cores.has(e.dest) {
        return Err(Refusal::Foreign);
    } else {
        e.dest
    };
    Ok(Target { apic_id, ..t })
}

/// What a sync of remapping entries did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EntriesSynced {
    /// Real entries written with an OS entry composed.
    pub composed: u32,
    /// Real entries written not present: the OS's entry is not present,
    /// cannot be read, or is malformed.
    pub absent: u32,
    /// Real entries written not present because thinhv refused the OS's
    /// entry ([`IrteRefusal`]); the first refusal, for the log.
    pub refused: u32,
    /// The first refusal and the entry it was for.
    pub first_refusal: Option<(u32, IrteRefusal)>,
}

/// [`sync_entries`] over the real table's first `limit` entries (at most
/// 2^[`IRT_MAX_LOG2`]): an OS entry past them is not read, and its
/// messages find no real entry.
#[allow(clippy::too_many_arguments)]
pub fn sync_entries_within(
    unit: &Unit,
    mem: &impl OsMemory,
    scope: Option<Scope>,
    sources: &impl Sources,
    cores: &impl Cores,
    policy: Policy,
    real_x2apic: bool,
    limit: u32,
    write: &mut impl FnMut(u32, [u64; 2]),
) -> EntriesSynced {
    let limit = limit.min(1 << IRT_MAX_LOG2);
    let (first, count) = match scope {
        Some(Scope::Entries { index, order }) => (u32::from(index), 1u32 << order.min(15)),
        _ => (0, limit),
    };
    let mut out = EntriesSynced::default();
    for index in first..first.saturating_add(count).min(limit) {
        let entry = match unit.os_irte(mem, index) {
            Err(_) => None,
            Ok(e) => match compose(&e, sources, cores, policy, real_x2apic) {
                Ok(real) => Some(real),
                Err(r) => {
                    out.refused += 1;
                    out.first_refusal.get_or_insert((index, r));
                    write(index, [0, 0]);
                    continue;
                }
            },
        };
        if let Some(real) = entry {
            out.composed += 1;
            write(index, real);
        } else {
            out.absent += 1;
            write(index, [0, 0]);
        }
    }
    out
}

/// Brings the real table's OS half (entries `0..2^IRT_MAX_LOG2`, one to
/// one with the OS's) up to date over `scope` (`Scope::Entries`, or every
/// entry where `all`): each OS entry read, composed ([`compose`]) and
/// handed to `write(index, entry)`, or a not-present entry where there is
/// none or thinhv refuses it. With remapping off, every entry in scope is
/// written not present. Bounded by the table: at most 2^15 entries.
#[allow(clippy::too_many_arguments)]
pub fn sync_entries(
    unit: &Unit,
    mem: &impl OsMemory,
    scope: Option<Scope>,
    sources: &impl Sources,
    cores: &impl Cores,
    policy: Policy,
    real_x2apic: bool,
    write: &mut impl FnMut(u32, [u64; 2]),
) -> EntriesSynced {
    sync_entries_within(
        unit,
        mem,
        scope,
        sources,
        cores,
        policy,
        real_x2apic,
        1 << IRT_MAX_LOG2,
        write,
    )
}

/// Where an event interrupt the OS programmed ([`Event`]) goes: its
/// address and data read as a compatibility-format message (VT-d 4.x
/// §11.4.9: these messages are not remapped), the destination widened by
/// the upper address's bits 31:8 in x2APIC mode (`x2apic`), then judged
/// against the OS's processors as any of its messages. The OS may aim its
/// fault event anywhere; this is what keeps it on its own processors.
pub fn event_target(
    ev: Event,
    x2apic: bool,
    cores: &impl Cores,
    policy: Policy,
) -> Result<Target, Refusal> {
    let req = irq_remap::decode_msi(u64::from(ev.addr), ev.data)?;
    let e = OsIrte {
        logical: matches!(req.dest, Dest::Logical(_)),
        level: req.level,
        delivery: req.delivery,
        vector: req.vector,
        dest: match req.dest {
            Dest::Physical(d) | Dest::Logical(d) => {
                u32::from(d) | if x2apic { ev.upper & !0xff } else { 0 }
            }
        },
        sid: 0,
        sq: 0,
        svt: 1,
        x2apic,
    };
    judge_target(&e, cores, policy)
}

/// A stand-in that has every processor, to judge delivery and vector alone.
struct Always;

impl Cores for Always {
    fn has(&self, _: u32) -> bool {
        true
    }
    fn logical(&self, _: u8, out: &mut alloc::vec::Vec<u32>) -> bool {
        out.push(0);
        false
    }
}

/// Drives a unit with an arbitrary program and checks its invariants after
/// every step: the cargo-fuzz target `vvtd` and the stable test
/// `random_programming_never_breaks_the_units_invariants` share it.
pub mod fuzz {
    use super::{Denied, Effects, Offer, OsMemory, Unit, gsts, reg};
    use alloc::vec::Vec;

    /// 64 KiB of OS RAM at 0, a hole at 0x8000..0xA000 (thinhv's or an
    /// appliance's memory), nothing above (MMIO).
    pub struct Memory {
        bytes: Vec<u8>,
        /// Bytes written through the unit.
        pub written: usize,
        /// A write of other than 4 bytes (a wait's status) happened.
        pub odd_write: bool,
        /// The sizes of the unit's writes, as a mask of 1 << size.
        pub sizes: u64,
    }

    pub(crate) const SIZE: u64 = 0x1_0000;
    pub(crate) const HOLE: core::ops::Range<u64> = 0x8000..0xa000;

    impl Memory {
        /// Filled from `seed`, repeated.
        pub fn new(seed: &[u8]) -> Self {
            let bytes = (0..SIZE as usize)
                .map(|i| {
                    if seed.is_empty() {
                        0
                    } else {
                        seed[i % seed.len()]
                    }
                })
                .collect();
            Self {
                bytes,
                written: 0,
                odd_write: false,
                sizes: 0,
            }
        }

        /// The OS writes its own RAM (not through the unit).
        pub(crate) fn os_write(&mut self, gpa: u64, data: &[u8]) {
            if let Ok(r) = Self::range(gpa, data.len()) {
                self.bytes[r].copy_from_slice(data);
            }
        }

        fn range(gpa: u64, len: usize) -> Result<core::ops::Range<usize>, Denied> {
            let end = gpa.checked_add(len as u64).ok_or(Denied)?;
            if end > SIZE || (gpa < HOLE.end && end > HOLE.start) {
                return Err(Denied);
            }
            Ok(gpa as usize..end as usize)
        }
    }

    impl OsMemory for Memory {
        fn read(&self, gpa: u64, out: &mut [u8]) -> Result<(), Denied> {
            out.copy_from_slice(&self.bytes[Self::range(gpa, out.len())?]);
            Ok(())
        }
        fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), Denied> {
            let r = Self::range(gpa, data.len())?;
            self.bytes[r].copy_from_slice(data);
            self.written += data.len();
            self.odd_write |= data.len() != 4;
            self.sizes |= 1 << data.len().min(63);
            Ok(())
        }
    }

    /// Registers a program aims at (the others read as reserved).
    const OFFSETS: [u64; 24] = [
        reg::GCMD,
        reg::RTADDR,
        reg::RTADDR_HI,
        reg::CCMD,
        reg::CCMD_HI,
        reg::FSTS,
        reg::FECTL,
        reg::FEDATA,
        reg::FEADDR,
        reg::IQH,
        reg::IQT,
        reg::IQA,
        reg::ICS,
        reg::IECTL,
        reg::IRTA,
        reg::IVA,
        reg::IOTLB,
        reg::IOTLB + 4,
        reg::FRCD + 12,
        reg::FRCD + 0x1c,
        reg::VER,
        reg::CAP,
        reg::GSTS,
        0xffc,
    ];

    /// What a program reached, so that a test can show its programs
    /// exercise the queue and the faults, not only the registers.
    #[derive(Clone, Copy, Debug, Default)]
    pub struct Reach {
        /// Queue runs that ended at the tail.
        pub runs: u32,
        /// Of those, runs that wrapped past the queue's end.
        pub wraps: u32,
        /// Runs that stopped on a descriptor (IQE).
        pub errors: u32,
        /// Fault events raised.
        pub fault_events: u32,
        /// Completion events raised.
        pub completion_events: u32,
        /// Steps with translation on.
        pub translating: u32,
    }

    /// A valid descriptor from `v`: context-cache, IOTLB, interrupt entry
    /// cache (where remapping is offered) or wait (storing into the OS's
    /// RAM below the hole). The errors come from elsewhere: the tail moved
    /// over unwritten memory, a queue outside the OS's RAM.
    fn descriptor(v: u64, remapping: bool) -> [u64; 2] {
        let g = 1 + (v >> 8) % 3;
        match v % 64 {
            0..=19 => [1 | (g << 4) | ((v >> 16) & 0x3_ffff_ffff_0000), 0],
            20..=39 => {
                let am = (v >> 60) % 4;
                let addr = (v >> 20) & 0xffff_f000 & !((1 << (12 + am)) - 1);
                [2 | (g << 4) | (v & 0xffff_0000), addr | am]
            }
            40..=49 if remapping => [4 | ((v >> 3) & 0x10) | (v & 0x0000_ffff_7800_0000), 0],
            _ => [
                5 | (v & 0x70) | (v & 0xffff_ffff_0000_0000),
                ((v >> 7) % HOLE.start) & !3,
            ],
        }
    }

    /// Runs `data` as a program: byte 0 the offer; then steps of 10 bytes
    /// (what, where, 8 bytes of value), each a register write or the OS
    /// writing a descriptor at the queue's tail. Panics where an invariant
    /// breaks.
    pub fn run(data: &[u8]) -> Reach {
        let mut reach = Reach::default();
        let Some((&first, rest)) = data.split_first() else {
            return reach;
        };
        let offer = Offer {
            host_width: 36 + (first & 0x1f),
            remapping: first & 0x20 != 0,
            x2apic: first & 0x40 != 0,
        };
        let mut unit = Unit::new(offer);
        let mut mem = Memory::new(rest);
        let allowed = gsts::TES
            | gsts::RTPS
            | gsts::QIES
            | if offer.remapping {
                gsts::IRES | gsts::IRTPS | gsts::CFIS
            } else {
                0
            };
        for step in rest.chunks_exact(10) {
            let mut v = [0u8; 8];
            v.copy_from_slice(&step[2..]);
            let mut value = u64::from_le_bytes(v);
            let what = step[0];
            let tail = unit.read(reg::IQT, 8) >> 4;
            let entries = unit.queue_entries();
            if what % 8 == 3 {
                // The OS services its errors: every status bit cleared.
                let mut fx = Effects::default();
                unit.write(reg::FSTS, 4, u64::from(super::fsts::W1C), &mut mem, &mut fx);
                check(&unit, &fx, allowed, unit.read(reg::FECTL, 4) as u32);
                continue;
            }
            if what % 8 == 4 {
                // The OS sets a queue up (not always in its RAM) and
                // turns it on.
                let mut fx = Effects::default();
                unit.write(
                    reg::IQA,
                    8,
                    (value % (SIZE + 0x1000)) & !0xfff | (value >> 62),
                    &mut mem,
                    &mut fx,
                );
                unit.write(
                    reg::GCMD,
                    4,
                    u64::from(unit.status() | gsts::QIES),
                    &mut mem,
                    &mut fx,
                );
                check(&unit, &fx, allowed, unit.read(reg::FECTL, 4) as u32);
                continue;
            }
            if what % 8 < 3 {
                // The OS writes 1 to 32 descriptors from the tail on (where
                // that is its RAM), and half the time moves the tail past
                // them.
                let n = 1 + (value >> 59);
                for i in 0..n {
                    let at = (unit.read(reg::IQA, 8) & !0xfff) + ((tail + i) % entries) * 16;
                    let d = descriptor(value.rotate_left(i as u32 * 7) ^ i, offer.remapping);
                    let mut b = [0u8; 16];
                    b[..8].copy_from_slice(&d[0].to_le_bytes());
                    b[8..].copy_from_slice(&d[1].to_le_bytes());
                    mem.os_write(at, &b);
                }
                if what & 0x80 == 0 {
                    continue;
                }
                value = ((tail + n) % entries) << 4;
            } else if what & 0x10 != 0 {
                // Often an address within (or just past) the OS's RAM, so
                // that tables and queues exist.
                value %= SIZE + 0x2000;
            }
            let size = if what & 0x20 != 0 { 8 } else { 4 };
            let offset = if what % 8 < 3 {
                reg::IQT
            } else if what & 0x40 != 0 {
                u64::from(step[1]) * 4
            } else {
                OFFSETS[usize::from(step[1]) % OFFSETS.len()]
            };
            let fectl = unit.read(reg::FECTL, 4);
            let head = unit.read(reg::IQH, 8) >> 4;
            let mut fx = Effects::default();
            unit.write(offset, size, value, &mut mem, &mut fx);
            check(&unit, &fx, allowed, fectl as u32);
            let (new_head, new_tail) = (unit.read(reg::IQH, 8) >> 4, unit.read(reg::IQT, 8) >> 4);
            if fx.queue_error.is_some() {
                reach.errors += 1;
            } else if new_head != head && new_head == new_tail {
                reach.runs += 1;
                reach.wraps += u32::from(new_head < head);
            }
            reach.fault_events += u32::from(fx.fault_event.is_some());
            reach.completion_events += u32::from(fx.completion_event.is_some());
            reach.translating += u32::from(unit.translating());
            assert!(!mem.odd_write, "the unit wrote other than a status dword");
            // The OS's tables, read as the caller would: never a panic.
            let sid = (value >> 8) as u16;
            if let Ok(super::Context::Tables { root, levels, .. }) = unit.context(&mem, sid) {
                let _ = unit.walk(&mem, root, levels, value & 0xffff_ffff_ffff);
            }
            if let Ok(e) = unit.os_irte(&mem, u32::from(step[1]) << 4) {
                assert!(e.svt <= 3 && e.sq <= 3);
            }
        }
        reach
    }

    fn check(u: &Unit, fx: &Effects, allowed: u32, fectl_before: u32) {
        let g = u.status();
        assert_eq!(g & !allowed, 0, "GSTS {g:#x} shows what is not offered");
        assert_eq!(u.read(reg::GSTS, 4) as u32, g);
        if let Some(on) = fx.translation {
            assert_eq!(g & gsts::TES != 0, on);
        }
        if let Some(on) = fx.remapping {
            assert_eq!(g & gsts::IRES != 0, on);
        }
        let iqh = u.read(reg::IQH, 8);
        assert_eq!(iqh & 0xf, 0, "IQH {iqh:#x} not on a descriptor");
        assert!(
            iqh >> 4 < u.queue_entries(),
            "IQH {iqh:#x} beyond the queue"
        );
        let fsts = u.read(reg::FSTS, 4);
        assert!((fsts >> 8) & 0xff < super::FAULT_RECORDS as u64);
        assert_eq!(
            fsts & !0xff13,
            0,
            "FSTS {fsts:#x} shows what is not offered"
        );
        // An event is delivered only where its mask was clear at the time
        // (a write that clears the mask delivers the one pending).
        if fx.fault_event.is_some() {
            let now = u.read(reg::FECTL, 4) as u32;
            assert!(fectl_before & super::IM == 0 || now & super::IM == 0);
        }
        assert!(fx.context.scopes().len() <= super::Flushes::MAX);
    }
}

#[cfg(test)]
#[path = "vvtd_tests.rs"]
pub(crate) mod tests;
