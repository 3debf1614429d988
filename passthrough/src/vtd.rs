//! Intel VT-d remapping units, driven through their registers (VT-d
//! specification chapter 11, "Register Descriptions"), behind [`Mmio`] so
//! the sequences run against a register model in tests.
//!
//! thinhv uses one domain for every requester: the root table's 256 entries
//! all point to one context table whose 256 entries all point to the same
//! second-level table (identity, minus the hypervisor). So every routing ID
//! — present devices, devices behind bridges, and SR-IOV virtual functions
//! the OS creates later — is translated from the start, with no table to
//! update when a function appears.
//!
//! Invalidation is register-based (context command and IOTLB registers,
//! global), enough for tables that never change after enabling, unless
//! thinhv remaps interrupts on the unit: the interrupt entry cache can be
//! invalidated only through the invalidation queue (VT-d §6.5.2), and once
//! the queue is on the registers must not be used, so every invalidation
//! then goes through it ([`enable_queued`], [`Queue`]). Interrupt
//! remapping ([`enable_remapping`]) starts once the firmware is done,
//! with compatibility-format messages blocked where every source thinhv
//! knows of sends remappable ones. Faults are polled from the fault
//! recording registers (interrupts stay masked).
#![allow(clippy::cast_possible_truncation)]
use alloc::vec::Vec;

/// Register access to one unit.
pub trait Mmio {
    /// 32-bit read at `offset`.
    fn read32(&self, offset: u64) -> u32;
    /// 64-bit read at `offset`.
    fn read64(&self, offset: u64) -> u64;
    /// 32-bit write.
    fn write32(&mut self, offset: u64, value: u32);
    /// 64-bit write.
    fn write64(&mut self, offset: u64, value: u64);
}

/// Register offsets.
pub mod reg {
    /// Version.
    pub const VER: u64 = 0x00;
    /// Capability.
    pub const CAP: u64 = 0x08;
    /// Extended capability.
    pub const ECAP: u64 = 0x10;
    /// Global command.
    pub const GCMD: u64 = 0x18;
    /// Global status.
    pub const GSTS: u64 = 0x1c;
    /// Root table address.
    pub const RTADDR: u64 = 0x20;
    /// Context command.
    pub const CCMD: u64 = 0x28;
    /// Fault status.
    pub const FSTS: u64 = 0x34;
    /// Fault event control.
    pub const FECTL: u64 = 0x38;
    /// Invalidation queue head.
    pub const IQH: u64 = 0x80;
    /// Invalidation queue tail.
    pub const IQT: u64 = 0x88;
    /// Invalidation queue address.
    pub const IQA: u64 = 0x90;
    /// Interrupt remapping table address.
    pub const IRTA: u64 = 0xb8;
}

/// GCMD/GSTS bits.
pub mod gcmd {
    /// Translation enable / status.
    pub const TE: u32 = 1 << 31;
    /// Set root table pointer / status.
    pub const SRTP: u32 = 1 << 30;
    /// Write buffer flush / status.
    pub const WBF: u32 = 1 << 27;
    /// Queued invalidation enable / status.
    pub const QIE: u32 = 1 << 26;
    /// Interrupt remapping enable / status.
    pub const IRE: u32 = 1 << 25;
    /// Set interrupt remapping table pointer / status.
    pub const SIRTP: u32 = 1 << 24;
    /// Compatibility format interrupts pass / status.
    pub const CFI: u32 = 1 << 23;
    /// The one-shot bits, which must not be echoed back into GCMD.
    pub const ONE_SHOT: u32 = 0x96ff_ffff;
}

/// CCMD: invalidate, global.
const CCMD_ICC_GLOBAL: u64 = (1 << 63) | (1 << 61);
/// IOTLB: invalidate, global, drain reads and writes.
const IOTLB_IVT_GLOBAL: u64 = (1 << 63) | (1 << 60) | (1 << 49) | (1 << 48);
/// IOTLB: invalidate, domain-selective (the domain in 47:32), drain reads
/// and writes.
const IOTLB_IVT_DOMAIN: u64 = (1 << 63) | (2 << 60) | (1 << 49) | (1 << 48);
/// FSTS: primary fault overflow, primary pending fault.
const FSTS_PFO: u32 = 1 << 0;
const FSTS_PPF: u32 = 1 << 1;
/// FSTS: invalidation queue error, invalidation time-out error.
const FSTS_IQE: u32 = 1 << 4;
const FSTS_ITE: u32 = 1 << 6;
/// FECTL: interrupt mask.
const FECTL_IM: u32 = 1 << 31;

/// Decoded capability registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    /// CAP.
    pub cap: u64,
    /// ECAP.
    pub ecap: u64,
}

impl Caps {
    /// Supported adjusted guest address widths (bit 1: 39-bit 3-level,
    /// bit 2: 48-bit 4-level).
    pub fn sagaw(&self) -> u8 {
        ((self.cap >> 8) & 0x1f) as u8
    }
    /// Write-buffer flushing required.
    pub fn rwbf(&self) -> bool {
        self.cap & (1 << 4) != 0
    }
    /// Caching mode (a virtual IOMMU caches not-present entries).
    pub fn caching_mode(&self) -> bool {
        self.cap & (1 << 7) != 0
    }
    /// Offset of the fault recording registers.
    pub fn fault_offset(&self) -> u64 {
        ((self.cap >> 24) & 0x3ff) * 16
    }
    /// Number of fault recording registers.
    pub fn fault_count(&self) -> u64 {
        ((self.cap >> 40) & 0xff) + 1
    }
    /// Second-level large pages: (2 MiB, 1 GiB).
    pub fn large_pages(&self) -> (bool, bool) {
        (self.cap & (1 << 34) != 0, self.cap & (1 << 35) != 0)
    }
    /// Offset of the IOTLB registers (IVA; the IOTLB register is at +8).
    pub fn iotlb_offset(&self) -> u64 {
        ((self.ecap >> 8) & 0x3ff) * 16
    }
    /// Page-walk coherency (else table writes must be flushed from caches).
    pub fn coherent(&self) -> bool {
        self.ecap & 1 != 0
    }
    /// Queued invalidation.
    pub fn queued_invalidation(&self) -> bool {
        self.ecap & (1 << 1) != 0
    }
    /// Interrupt remapping.
    pub fn interrupt_remapping(&self) -> bool {
        self.ecap & (1 << 3) != 0
    }
    /// Extended interrupt mode (32-bit x2APIC destinations in entries).
    pub fn extended_interrupt_mode(&self) -> bool {
        self.ecap & (1 << 4) != 0
    }
    /// The address width (context-entry AW) thinhv uses: 2 (48-bit,
    /// 4-level) if supported, else 1 (39-bit, 3-level), else none.
    pub fn address_width(&self) -> Option<u8> {
        if self.sagaw() & 0b100 != 0 {
            Some(2)
        } else if self.sagaw() & 0b010 != 0 {
            Some(1)
        } else {
            None
        }
    }
}

/// Reads the capabilities.
pub fn caps(m: &impl Mmio) -> Caps {
    Caps {
        cap: m.read64(reg::CAP),
        ecap: m.read64(reg::ECAP),
    }
}

/// Why a unit could not be set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VtdError {
    /// Neither 3- nor 4-level second-level tables.
    NoUsableAddressWidth,
    /// A command was not acknowledged in time.
    Timeout(&'static str),
    /// Translation was already on (the firmware or an earlier loader left
    /// it enabled).
    AlreadyEnabled,
    /// The unit stopped the invalidation queue on a descriptor it refused
    /// (FSTS.IQE) or on a device's time-out (FSTS.ITE).
    QueueError,
    /// Compatibility format asked to pass with 32-bit destinations, where
    /// the unit blocks it whatever GCMD.CFI says (VT-d §9.10).
    CompatWithX2apic,
}

impl VtdError {
    /// What went wrong, for the log.
    pub const fn describe(self) -> &'static str {
        match self {
            Self::NoUsableAddressWidth => "no 3- or 4-level second-level page tables (CAP.SAGAW)",
            Self::Timeout(what) => what,
            Self::AlreadyEnabled => "translation already enabled by the firmware",
            Self::QueueError => "the invalidation queue stopped on an error (FSTS.IQE/ITE)",
            Self::CompatWithX2apic => {
                "compatibility format cannot pass with 32-bit destinations (IRTA.EIME)"
            }
        }
    }
}

impl core::fmt::Display for VtdError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Timeout(what) => write!(f, "{what} not acknowledged"),
            _ => f.write_str(self.describe()),
        }
    }
}

/// How many polls a command may take before it counts as failed.
const POLLS: u32 = 1_000_000;

fn gcmd_set(m: &mut impl Mmio, bit: u32, what: &'static str) -> Result<(), VtdError> {
    let status = m.read32(reg::GSTS) & gcmd::ONE_SHOT;
    m.write32(reg::GCMD, status | bit);
    for _ in 0..POLLS {
        if m.read32(reg::GSTS) & bit != 0 {
            return Ok(());
        }
    }
    Err(VtdError::Timeout(what))
}

fn wait64(m: &impl Mmio, offset: u64, bit: u64, what: &'static str) -> Result<(), VtdError> {
    for _ in 0..POLLS {
        if m.read64(offset) & bit == 0 {
            return Ok(());
        }
    }
    Err(VtdError::Timeout(what))
}

/// Global context-cache and IOTLB invalidation (and a write-buffer flush
/// where required).
pub fn invalidate_all(m: &mut impl Mmio, c: &Caps) -> Result<(), VtdError> {
    if c.rwbf() {
        gcmd_set_oneshot(m, gcmd::WBF)?;
    }
    m.write64(reg::CCMD, CCMD_ICC_GLOBAL);
    wait64(m, reg::CCMD, 1 << 63, "context-cache invalidation")?;
    let iotlb = c.iotlb_offset() + 8;
    m.write64(iotlb, IOTLB_IVT_GLOBAL);
    wait64(m, iotlb, 1 << 63, "IOTLB invalidation")
}

/// Domain-selective IOTLB invalidation of each of `domains` (a
/// write-buffer flush first where required): the IOTLB and paging-structure
/// cache entries of those domains go, the context cache and every other
/// domain's entries stay.
pub fn invalidate_domains(m: &mut impl Mmio, c: &Caps, domains: &[u16]) -> Result<(), VtdError> {
    if c.rwbf() {
        gcmd_set_oneshot(m, gcmd::WBF)?;
    }
    let iotlb = c.iotlb_offset() + 8;
    for &d in domains {
        m.write64(iotlb, IOTLB_IVT_DOMAIN | (u64::from(d) << 32));
        wait64(m, iotlb, 1 << 63, "IOTLB invalidation")?;
    }
    Ok(())
}

/// Write-buffer flush: the status bit clears when done.
fn gcmd_set_oneshot(m: &mut impl Mmio, bit: u32) -> Result<(), VtdError> {
    let status = m.read32(reg::GSTS) & gcmd::ONE_SHOT;
    m.write32(reg::GCMD, status | bit);
    for _ in 0..POLLS {
        if m.read32(reg::GSTS) & bit == 0 {
            return Ok(());
        }
    }
    Err(VtdError::Timeout("write-buffer flush"))
}

/// Checks the unit is usable and not yet translating, masks fault
/// interrupts (faults are polled) and points it at `root_table`: what
/// [`enable`] and [`enable_queued`] both start with.
fn set_root(m: &mut impl Mmio, root_table: u64) -> Result<Caps, VtdError> {
    let c = caps(m);
    c.address_width().ok_or(VtdError::NoUsableAddressWidth)?;
    if m.read32(reg::GSTS) & gcmd::TE != 0 {
        return Err(VtdError::AlreadyEnabled);
    }
    m.write32(reg::FECTL, FECTL_IM);
    m.write64(reg::RTADDR, root_table & !0xfff);
    gcmd_set(m, gcmd::SRTP, "set root table pointer")?;
    Ok(c)
}

/// Points the unit at `root_table`, invalidates, and turns translation on.
/// The tables must be complete (and flushed from caches on non-coherent
/// units) before this is called.
pub fn enable(m: &mut impl Mmio, root_table: u64) -> Result<Caps, VtdError> {
    let c = set_root(m, root_table)?;
    invalidate_all(m, &c)?;
    gcmd_set(m, gcmd::TE, "translation enable")?;
    Ok(c)
}

/// Turns translation off (roll-back before the OS starts), then interrupt
/// remapping and the invalidation queue where they are on.
pub fn disable(m: &mut impl Mmio) -> Result<(), VtdError> {
    gcmd_clear(m, gcmd::TE, "translation disable")?;
    for (bit, what) in [
        (gcmd::IRE, "interrupt remapping disable"),
        (gcmd::QIE, "queued invalidation disable"),
    ] {
        if m.read32(reg::GSTS) & bit != 0 {
            gcmd_clear(m, bit, what)?;
        }
    }
    Ok(())
}

/// The invalidation queue's memory: one page of 256 descriptors, and the
/// dword the unit's wait descriptors store their token to.
pub trait QueueMemory {
    /// Writes descriptor `i` (taken modulo 256).
    fn write(&mut self, i: usize, d: [u64; 2]);
    /// The page's physical address.
    fn base(&self) -> u64;
    /// The status dword's physical address.
    fn status_address(&self) -> u64;
    /// The status dword (the last token the unit stored).
    fn status(&self) -> u32;
    /// A token this queue has not waited for before (never 0), so that a
    /// wait that completes late cannot satisfy a later one.
    fn next_token(&mut self) -> u32;
}

/// Descriptors in the queue this driver submits (128-bit, VT-d §6.5.2).
pub mod desc {
    /// Context-cache invalidation, global.
    pub const CONTEXT_GLOBAL: [u64; 2] = [0x1 | (1 << 4), 0];
    /// IOTLB invalidation, global, draining reads and writes.
    pub const IOTLB_GLOBAL: [u64; 2] = [0x2 | (1 << 4) | (1 << 6) | (1 << 7), 0];
    /// IOTLB invalidation of domain `did` alone (its paging-structure
    /// cache entries included), draining reads and writes.
    pub const fn iotlb_domain(did: u16) -> [u64; 2] {
        [
            0x2 | (2 << 4) | (1 << 6) | (1 << 7) | ((did as u64) << 16),
            0,
        ]
    }
    /// Interrupt entry cache invalidation, every entry.
    pub const IEC_GLOBAL: [u64; 2] = [0x4, 0];
    /// Interrupt entry cache invalidation of entry `index` alone.
    pub const fn iec_index(index: u16) -> [u64; 2] {
        [0x4 | (1 << 4) | ((index as u64) << 32), 0]
    }
    /// Invalidation wait: store `token` at `status` once every descriptor
    /// before it completed.
    pub const fn wait(status: u64, token: u32) -> [u64; 2] {
        [0x5 | (1 << 5) | ((token as u64) << 32), status & !3]
    }
}

/// Descriptors the queue holds.
const QUEUE_ENTRIES: u64 = 256;

/// Submits `descs` and a wait behind them, and waits until the unit stored
/// the wait's token: every one of them has then completed.
pub fn queue_run(
    m: &mut impl Mmio,
    q: &mut impl QueueMemory,
    descs: &[[u64; 2]],
) -> Result<(), VtdError> {
    let token = q.next_token();
    let mut tail = (m.read64(reg::IQT) >> 4) % QUEUE_ENTRIES;
    for d in descs
        .iter()
        .copied()
        .chain(core::iter::once(desc::wait(q.status_address(), token)))
    {
        q.write(tail as usize, d);
        tail = (tail + 1) % QUEUE_ENTRIES;
    }
    m.write64(reg::IQT, tail << 4);
    for _ in 0..POLLS {
        if q.status() == token {
            return Ok(());
        }
        if m.read32(reg::FSTS) & (FSTS_IQE | FSTS_ITE) != 0 {
            return Err(VtdError::QueueError);
        }
        core::hint::spin_loop();
    }
    Err(VtdError::Timeout("invalidation wait"))
}

/// Like [`enable`], with invalidation through the queue `q` (turned on
/// here; from now on the invalidation registers are not used).
pub fn enable_queued(
    m: &mut impl Mmio,
    root_table: u64,
    q: &mut impl QueueMemory,
) -> Result<Caps, VtdError> {
    let c = set_root(m, root_table)?;
    if c.rwbf() {
        gcmd_set_oneshot(m, gcmd::WBF)?;
    }
    // The queue starts empty: tail 0, one page of 128-bit descriptors.
    m.write64(reg::IQT, 0);
    m.write64(reg::IQA, q.base() & !0xfff);
    gcmd_set(m, gcmd::QIE, "queued invalidation enable")?;
    queue_run(m, q, &[desc::CONTEXT_GLOBAL, desc::IOTLB_GLOBAL])?;
    gcmd_set(m, gcmd::TE, "translation enable")?;
    Ok(c)
}

/// Turns interrupt remapping on through `table` (2^`entries_log2`
/// entries; 32-bit destinations where `x2apic`). Where `compat`,
/// compatibility-format messages keep passing (GCMD.CFI, acknowledged
/// before remapping starts); else only a message that names a present
/// entry, from the source the entry names, is delivered. With `x2apic`
/// (IRTA.EIME) the unit blocks compatibility format whatever CFI says, so
/// the two are refused together. The queue must be on
/// ([`enable_queued`]). On an error remapping is left off.
pub fn enable_remapping(
    m: &mut impl Mmio,
    q: &mut impl QueueMemory,
    table: u64,
    entries_log2: u8,
    x2apic: bool,
    compat: bool,
) -> Result<(), VtdError> {
    if x2apic && compat {
        return Err(VtdError::CompatWithX2apic);
    }
    m.write64(
        reg::IRTA,
        crate::irq_remap::vtd::irta(table, entries_log2, x2apic),
    );
    gcmd_set(m, gcmd::SIRTP, "set interrupt remapping table pointer")?;
    queue_run(m, q, &[desc::IEC_GLOBAL])?;
    if compat {
        gcmd_set(m, gcmd::CFI, "compatibility format interrupts")?;
    } else if m.read32(reg::GSTS) & gcmd::CFI != 0 {
        gcmd_clear(m, gcmd::CFI, "compatibility format interrupts blocked")?;
    }
    gcmd_set(m, gcmd::IRE, "interrupt remapping enable")
}

/// Turns interrupt remapping off (a unit whose peers could not turn it
/// on: every unit judges the same way).
pub fn disable_remapping(m: &mut impl Mmio) -> Result<(), VtdError> {
    gcmd_clear(m, gcmd::IRE, "interrupt remapping disable")
}

/// Writes GCMD without `bit` and waits for its status to clear.
fn gcmd_clear(m: &mut impl Mmio, bit: u32, what: &'static str) -> Result<(), VtdError> {
    let status = m.read32(reg::GSTS) & gcmd::ONE_SHOT & !bit;
    m.write32(reg::GCMD, status);
    for _ in 0..POLLS {
        if m.read32(reg::GSTS) & bit == 0 {
            return Ok(());
        }
    }
    Err(VtdError::Timeout(what))
}

/// One recorded fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Requester (bus << 8 | devfn).
    pub source: u16,
    /// Fault reason (VT-d Appendix A).
    pub reason: u8,
    /// The page address of the request.
    pub address: u64,
    /// A write (else a read).
    pub write: bool,
    /// An interrupt message refused by remapping (reasons 0x20 to 0x27):
    /// the entry it named (`address` is then 0).
    pub interrupt_index: Option<u16>,
}

/// Collects and clears every recorded fault; the second value says
/// whether faults were lost to overflow.
pub fn take_faults(m: &mut impl Mmio, c: &Caps) -> (Vec<Fault>, bool) {
    let mut out = Vec::new();
    let fsts = m.read32(reg::FSTS);
    if fsts & (FSTS_PPF | FSTS_PFO) == 0 {
        return (out, false);
    }
    for i in 0..c.fault_count().min(256) {
        let off = c.fault_offset() + i * 16;
        let hi = m.read64(off + 8);
        if hi & (1 << 63) == 0 {
            continue;
        }
        let lo = m.read64(off);
        let reason = ((hi >> 32) & 0xff) as u8;
        // An interrupt request's record holds the entry it named in bits
        // 63:48 where a DMA's holds the page (VT-d §11.4.14).
        let interrupt = (0x20..=0x27).contains(&reason);
        out.push(Fault {
            source: (hi & 0xffff) as u16,
            reason,
            address: if interrupt { 0 } else { lo & !0xfff },
            // T bit (62): 1 = read, 0 = write (VT-d §11.4.14).
            write: hi & (1 << 62) == 0,
            interrupt_index: interrupt.then_some((lo >> 48) as u16),
        });
        // F is write-1-to-clear, in the top dword.
        m.write32(off + 12, 1 << 31);
    }
    let overflow = fsts & FSTS_PFO != 0;
    m.write32(reg::FSTS, FSTS_PFO);
    (out, overflow)
}

/// A root-table entry pointing to `context_table` (present).
pub const fn root_entry(context_table: u64) -> [u64; 2] {
    [(context_table & !0xfff) | 1, 0]
}

/// A context entry: second-level translation through `sl_root` with
/// address width `aw` (1: 3-level, 2: 4-level) in domain `domain`.
pub const fn context_entry(sl_root: u64, aw: u8, domain: u16) -> [u64; 2] {
    // Lower: present, translation type 00 (untranslated requests through
    // the second-level tables), fault processing enabled.
    [
        (sl_root & !0xfff) | 1,
        ((domain as u64) << 8) | (aw as u64 & 7),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::cell::RefCell;
    use std::collections::BTreeMap;
    use std::rc::Rc;

    /// A register model of one unit: commands take effect in GSTS,
    /// invalidations complete at once, faults can be injected.
    struct FakeUnit {
        regs: BTreeMap<u64, u64>,
        cap: u64,
        ecap: u64,
        log: Vec<&'static str>,
        stuck: bool,
        /// The invalidation queue's memory, shared with the test's
        /// [`FakeQueue`]; a tail write runs what lies between head and
        /// tail.
        queue: Option<Rc<RefCell<FakeQueue>>>,
        /// Descriptors of a type this unit refuses (FSTS.IQE).
        refuse: Option<u64>,
        /// GCMD.CFI is not implemented (QEMU's intel-iommu).
        ignore_cfi: bool,
    }

    /// Queue memory: 256 descriptors and the status dword.
    struct FakeQueue {
        descs: Vec<[u64; 2]>,
        status: u32,
        tokens: u32,
    }

    #[derive(Clone)]
    struct SharedQueue(Rc<RefCell<FakeQueue>>);

    impl QueueMemory for SharedQueue {
        fn write(&mut self, i: usize, d: [u64; 2]) {
            self.0.borrow_mut().descs[i % 256] = d;
        }
        fn base(&self) -> u64 {
            0x7000
        }
        fn status_address(&self) -> u64 {
            0x8000
        }
        fn status(&self) -> u32 {
            self.0.borrow().status
        }
        fn next_token(&mut self) -> u32 {
            let mut q = self.0.borrow_mut();
            q.tokens += 1;
            q.tokens
        }
    }

    fn queue() -> SharedQueue {
        SharedQueue(Rc::new(RefCell::new(FakeQueue {
            descs: alloc::vec![[0; 2]; 256],
            status: 0,
            tokens: 0,
        })))
    }

    impl FakeUnit {
        fn new() -> Self {
            // SAGAW 39+48 bit, FRO 0x22 (offset 0x220), NFR 3 (4 records),
            // 2M/1G pages, RWBF; ECAP IRO 0x20 (IOTLB at 0x208).
            let cap = (0b110 << 8) | (0x22 << 24) | (3 << 40) | (0b11 << 34) | (1 << 4);
            let ecap = 0x20 << 8;
            Self {
                regs: BTreeMap::new(),
                cap,
                ecap,
                log: Vec::new(),
                stuck: false,
                queue: None,
                refuse: None,
                ignore_cfi: false,
            }
        }
        /// With queued invalidation and interrupt remapping, its queue
        /// memory `q`.
        fn with_queue(q: &SharedQueue) -> Self {
            let mut u = Self::new();
            u.ecap |= (1 << 1) | (1 << 3);
            u.queue = Some(q.0.clone());
            u
        }
        /// Runs the descriptors from head to `tail`.
        fn run_queue(&mut self, tail: u64) {
            let Some(q) = self.queue.clone() else {
                return;
            };
            if self.gsts() & gcmd::QIE == 0 {
                assert_eq!(tail, 0, "descriptors queued with the queue off");
                return;
            }
            let mut head = self.regs.get(&reg::IQH).copied().unwrap_or(0) >> 4;
            while head != tail >> 4 {
                let d = q.borrow().descs[head as usize];
                if Some(d[0] & 0xf) == self.refuse {
                    let f = self.regs.get(&reg::FSTS).copied().unwrap_or(0);
                    self.regs.insert(reg::FSTS, f | u64::from(FSTS_IQE));
                    break;
                }
                self.log.push(match d[0] & 0xf {
                    1 => "q:context",
                    2 => "q:iotlb",
                    4 if d[0] & (1 << 4) == 0 => "q:iec",
                    4 => "q:iec-index",
                    5 => {
                        assert_eq!(d[1], 0x8000, "status address");
                        q.borrow_mut().status = (d[0] >> 32) as u32;
                        "q:wait"
                    }
                    _ => "q:?",
                });
                head = (head + 1) % 256;
            }
            self.regs.insert(reg::IQH, head << 4);
        }
        fn gsts(&self) -> u32 {
            self.regs.get(&reg::GSTS).copied().unwrap_or(0) as u32
        }
        fn fault(&mut self, i: u64, source: u16, addr: u64, write: bool) {
            let off = 0x220 + i * 16;
            self.regs.insert(off, addr);
            let t = if write { 0 } else { 1 << 62 };
            self.regs
                .insert(off + 8, (1 << 63) | t | (6 << 32) | u64::from(source));
            self.regs.insert(reg::FSTS, u64::from(FSTS_PPF));
        }
    }

    impl Mmio for FakeUnit {
        fn read32(&self, offset: u64) -> u32 {
            match offset {
                reg::GSTS => self.gsts(),
                _ => self.regs.get(&offset).copied().unwrap_or(0) as u32,
            }
        }
        fn read64(&self, offset: u64) -> u64 {
            match offset {
                reg::CAP => self.cap,
                reg::ECAP => self.ecap,
                _ => self.regs.get(&offset).copied().unwrap_or(0),
            }
        }
        fn write32(&mut self, offset: u64, value: u32) {
            match offset {
                reg::GCMD => {
                    let one_shot = gcmd::SRTP | gcmd::WBF | gcmd::SIRTP;
                    assert_eq!(value & !gcmd::ONE_SHOT & !one_shot, 0);
                    assert!(
                        (value & one_shot).count_ones() <= 1,
                        "one command at a time"
                    );
                    let mut s = self.gsts();
                    let toggles = (value ^ s) & (gcmd::QIE | gcmd::IRE | gcmd::CFI | gcmd::TE);
                    assert!(toggles.count_ones() <= 1, "one command at a time");
                    if value & gcmd::SRTP != 0 {
                        self.log.push("srtp");
                        s |= gcmd::SRTP;
                    }
                    if value & gcmd::SIRTP != 0 {
                        self.log.push("sirtp");
                        s |= gcmd::SIRTP;
                    }
                    let cfi = if self.ignore_cfi { 0 } else { gcmd::CFI };
                    for (bit, on, off) in [
                        (gcmd::QIE, "qie", "qie-off"),
                        (gcmd::IRE, "ire", "ire-off"),
                        (cfi, "cfi", "cfi-off"),
                    ] {
                        if bit == 0 {
                            continue;
                        }
                        if value & bit != 0 && s & bit == 0 {
                            self.log.push(on);
                            s |= bit;
                            if bit == gcmd::QIE {
                                self.regs.insert(reg::IQH, 0);
                            }
                        } else if value & bit == 0 && s & bit != 0 {
                            self.log.push(off);
                            s &= !bit;
                        }
                    }
                    if value & gcmd::WBF != 0 {
                        self.log.push("wbf");
                    }
                    if value & gcmd::TE != 0 && !self.stuck {
                        if s & gcmd::TE == 0 {
                            self.log.push("te");
                        }
                        s |= gcmd::TE;
                    } else if value & gcmd::TE == 0 {
                        s &= !gcmd::TE;
                    }
                    self.regs.insert(reg::GSTS, u64::from(s));
                }
                reg::FSTS => {
                    let v = self.regs.get(&reg::FSTS).copied().unwrap_or(0) as u32;
                    self.regs
                        .insert(reg::FSTS, u64::from(v & !value & !FSTS_PPF));
                }
                o if o >= 0x220 && (o - 0x220) % 16 == 12 => {
                    let hi = o - 4;
                    let v = self.regs.get(&hi).copied().unwrap_or(0);
                    if value & (1 << 31) != 0 {
                        self.regs.insert(hi, v & !(1 << 63));
                    }
                }
                _ => {
                    self.regs.insert(offset, u64::from(value));
                }
            }
        }
        fn write64(&mut self, offset: u64, value: u64) {
            match offset {
                reg::CCMD => {
                    assert_eq!(
                        self.gsts() & gcmd::QIE,
                        0,
                        "register invalidation with the queue on"
                    );
                    self.log.push("ccmd");
                }
                0x208 => {
                    assert_eq!(
                        self.gsts() & gcmd::QIE,
                        0,
                        "register invalidation with the queue on"
                    );
                    self.log.push("iotlb");
                }
                reg::IQT => {
                    self.regs.insert(offset, value);
                    self.run_queue(value);
                }
                _ => {
                    self.regs.insert(offset, value);
                }
            }
        }
    }

    #[test]
    fn capabilities_decode() {
        let c = caps(&FakeUnit::new());
        assert_eq!(c.address_width(), Some(2));
        assert_eq!((c.fault_offset(), c.fault_count()), (0x220, 4));
        assert_eq!(c.iotlb_offset(), 0x200);
        assert_eq!(c.large_pages(), (true, true));
        let three = Caps {
            cap: 0b010 << 8,
            ecap: 0,
        };
        assert_eq!(three.address_width(), Some(1));
        assert_eq!(Caps { cap: 0, ecap: 0 }.address_width(), None);
    }

    #[test]
    fn enable_sets_the_root_invalidates_then_translates() {
        let mut u = FakeUnit::new();
        let c = enable(&mut u, 0x1234_5000).unwrap();
        assert_eq!(u.regs[&reg::RTADDR], 0x1234_5000);
        assert_eq!(u.log, ["srtp", "wbf", "ccmd", "iotlb", "te"]);
        assert_eq!(u.gsts() & gcmd::TE, gcmd::TE);
        assert_eq!(
            u.regs[&reg::FECTL] as u32,
            FECTL_IM,
            "fault interrupts masked"
        );
        assert!(c.rwbf());
        // Enabling twice is refused; disabling turns it off.
        assert_eq!(enable(&mut u, 0x1000), Err(VtdError::AlreadyEnabled));
        disable(&mut u).unwrap();
        assert_eq!(u.gsts() & gcmd::TE, 0);
    }

    #[test]
    fn with_the_queue_every_invalidation_goes_through_it() {
        let mut q = queue();
        let mut u = FakeUnit::with_queue(&q);
        let c = enable_queued(&mut u, 0x1234_5000, &mut q).unwrap();
        assert!(c.queued_invalidation() && c.interrupt_remapping());
        assert_eq!(u.regs[&reg::IQA], 0x7000, "one page, 128-bit descriptors");
        assert_eq!(
            u.log,
            ["srtp", "wbf", "qie", "q:context", "q:iotlb", "q:wait", "te"],
            "no register invalidation once the queue is on"
        );
        assert_eq!(q.status(), 1);
        // Each run waits for a token of its own.
        queue_run(&mut u, &mut q, &[desc::iec_index(7)]).unwrap();
        assert_eq!(q.status(), 2);
        assert_eq!(u.log[7..], ["q:iec-index", "q:wait"]);
        assert_eq!(q.0.borrow().descs[3], [0x4 | 1 << 4 | 7 << 32, 0]);
        // 32-bit destinations, compatibility format blocked.
        enable_remapping(&mut u, &mut q, 0x20_0000, 12, true, false).unwrap();
        assert_eq!(u.regs[&reg::IRTA], 0x20_0000 | 1 << 11 | 0xb, "EIME");
    }

    #[test]
    fn remapping_blocks_compatibility_format_unless_told_to_let_it_pass() {
        let mut q = queue();
        let mut u = FakeUnit::with_queue(&q);
        enable_queued(&mut u, 0x1000, &mut q).unwrap();
        u.log.clear();
        enable_remapping(&mut u, &mut q, 0x20_0000, 12, false, false).unwrap();
        assert_eq!(u.regs[&reg::IRTA], 0x20_0000 | 0xb, "4096 entries, xAPIC");
        assert_eq!(u.log, ["sirtp", "q:iec", "q:wait", "ire"]);
        let on = gcmd::TE | gcmd::QIE | gcmd::IRE;
        assert_eq!(
            u.gsts() & (on | gcmd::CFI),
            on,
            "compatibility format blocked"
        );
        // Off again, and on with compatibility format passing: CFI is
        // acknowledged before remapping starts. Not with 32-bit
        // destinations, where the unit would block it anyway.
        disable_remapping(&mut u).unwrap();
        u.log.clear();
        assert_eq!(
            enable_remapping(&mut u, &mut q, 0x20_0000, 12, true, true),
            Err(VtdError::CompatWithX2apic)
        );
        assert!(u.log.is_empty(), "nothing written");
        enable_remapping(&mut u, &mut q, 0x20_0000, 12, false, true).unwrap();
        assert_eq!(u.regs[&reg::IRTA], 0x20_0000 | 0xb);
        assert_eq!(u.log, ["sirtp", "q:iec", "q:wait", "cfi", "ire"]);
        assert_eq!(u.gsts() & (on | gcmd::CFI), on | gcmd::CFI);
        // A unit that never acknowledges CFI: remapping stays off.
        disable_remapping(&mut u).unwrap();
        enable_remapping(&mut u, &mut q, 0x20_0000, 12, false, false).unwrap();
        assert_eq!(u.gsts() & gcmd::CFI, 0, "blocked again");
        disable_remapping(&mut u).unwrap();
        u.ignore_cfi = true;
        assert_eq!(
            enable_remapping(&mut u, &mut q, 0x20_0000, 12, false, true),
            Err(VtdError::Timeout("compatibility format interrupts"))
        );
        assert_eq!(u.gsts() & gcmd::IRE, 0);
        // The roll-back turns everything off, translation first.
        enable_remapping(&mut u, &mut q, 0x20_0000, 12, false, false).unwrap();
        u.log.clear();
        disable(&mut u).unwrap();
        assert_eq!(u.log, ["ire-off", "qie-off"]);
        assert_eq!(u.gsts() & on, 0);
    }

    #[test]
    fn a_descriptor_the_unit_refuses_is_an_error_not_a_hang() {
        let mut q = queue();
        let mut u = FakeUnit::with_queue(&q);
        u.refuse = Some(2);
        assert_eq!(
            enable_queued(&mut u, 0x1000, &mut q),
            Err(VtdError::QueueError)
        );
        assert_eq!(u.gsts() & gcmd::TE, 0, "translation never turned on");
        // A unit that never stores the token times out; its late store
        // cannot satisfy the next wait, which has a token of its own.
        let mut q = queue();
        let mut u = FakeUnit::with_queue(&q);
        enable_queued(&mut u, 0x1000, &mut q).unwrap();
        u.queue = None;
        assert_eq!(
            queue_run(&mut u, &mut q, &[desc::IEC_GLOBAL]),
            Err(VtdError::Timeout("invalidation wait"))
        );
        q.0.borrow_mut().status = 2;
        assert_eq!(
            queue_run(&mut u, &mut q, &[desc::IEC_GLOBAL]),
            Err(VtdError::Timeout("invalidation wait")),
            "the late token 2 does not complete wait 3"
        );
    }

    #[test]
    fn a_unit_that_does_not_acknowledge_times_out() {
        let mut u = FakeUnit::new();
        u.stuck = true;
        assert_eq!(
            enable(&mut u, 0x1000),
            Err(VtdError::Timeout("translation enable"))
        );
    }

    #[test]
    fn faults_are_read_and_cleared() {
        let mut u = FakeUnit::new();
        let c = caps(&u);
        assert_eq!(take_faults(&mut u, &c), (Vec::new(), false));
        u.fault(1, 0x0100, 0x3dbf_8000, true);
        let (f, overflow) = take_faults(&mut u, &c);
        assert!(!overflow);
        assert_eq!(
            f,
            [Fault {
                source: 0x0100,
                reason: 6,
                address: 0x3dbf_8000,
                write: true,
                interrupt_index: None,
            }]
        );
        // A refused interrupt message: the entry it named, not a page.
        u.fault(0, 0x0008, 0x0025 << 48, true);
        let r = u.regs[&0x228];
        u.regs.insert(0x228, (r & !(0xff << 32)) | (0x22 << 32));
        let (f, _) = take_faults(&mut u, &c);
        assert_eq!(
            (f[0].reason, f[0].address, f[0].interrupt_index),
            (0x22, 0, Some(0x25))
        );
        // Cleared: nothing the second time.
        assert_eq!(take_faults(&mut u, &c).0.len(), 0);
    }

    #[test]
    fn entries() {
        assert_eq!(root_entry(0x5000), [0x5001, 0]);
        let c = context_entry(0x6000, 2, 1);
        assert_eq!(c[0], 0x6001, "present, second-level only");
        assert_eq!(c[1], 0x102, "domain 1, 48-bit");
    }
}
