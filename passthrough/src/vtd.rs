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
//! global), enough for tables that never change after enabling. Faults are
//! polled from the fault recording registers (interrupts stay masked).
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
}

/// GCMD/GSTS bits.
pub mod gcmd {
    /// Translation enable / status.
    pub const TE: u32 = 1 << 31;
    /// Set root table pointer / status.
    pub const SRTP: u32 = 1 << 30;
    /// Write buffer flush / status.
    pub const WBF: u32 = 1 << 27;
    /// The one-shot bits, which must not be echoed back into GCMD.
    pub const ONE_SHOT: u32 = 0x96ff_ffff;
}

/// CCMD: invalidate, global.
const CCMD_ICC_GLOBAL: u64 = (1 << 63) | (1 << 61);
/// IOTLB: invalidate, global, drain reads and writes.
const IOTLB_IVT_GLOBAL: u64 = (1 << 63) | (1 << 60) | (1 << 49) | (1 << 48);
/// FSTS: primary fault overflow, primary pending fault.
const FSTS_PFO: u32 = 1 << 0;
const FSTS_PPF: u32 = 1 << 1;
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
}

impl VtdError {
    /// What went wrong, for the log.
    pub const fn describe(self) -> &'static str {
        match self {
            Self::NoUsableAddressWidth => "no 3- or 4-level second-level page tables (CAP.SAGAW)",
            Self::Timeout(what) => what,
            Self::AlreadyEnabled => "translation already enabled by the firmware",
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

/// Points the unit at `root_table`, invalidates, and turns translation on.
/// The tables must be complete (and flushed from caches on non-coherent
/// units) before this is called.
pub fn enable(m: &mut impl Mmio, root_table: u64) -> Result<Caps, VtdError> {
    let c = caps(m);
    c.address_width().ok_or(VtdError::NoUsableAddressWidth)?;
    if m.read32(reg::GSTS) & gcmd::TE != 0 {
        return Err(VtdError::AlreadyEnabled);
    }
    // Fault interrupts stay masked: faults are polled.
    m.write32(reg::FECTL, FECTL_IM);
    m.write64(reg::RTADDR, root_table & !0xfff);
    gcmd_set(m, gcmd::SRTP, "set root table pointer")?;
    invalidate_all(m, &c)?;
    gcmd_set(m, gcmd::TE, "translation enable")?;
    Ok(c)
}

/// Turns translation off (roll-back before the OS starts).
pub fn disable(m: &mut impl Mmio) -> Result<(), VtdError> {
    let status = m.read32(reg::GSTS) & gcmd::ONE_SHOT & !gcmd::TE;
    m.write32(reg::GCMD, status);
    for _ in 0..POLLS {
        if m.read32(reg::GSTS) & gcmd::TE == 0 {
            return Ok(());
        }
    }
    Err(VtdError::Timeout("translation disable"))
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
        out.push(Fault {
            source: (hi & 0xffff) as u16,
            reason: ((hi >> 32) & 0xff) as u8,
            address: lo & !0xfff,
            // T bit (62): 1 = read, 0 = write (VT-d §11.4.14).
            write: hi & (1 << 62) == 0,
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
    use std::collections::BTreeMap;

    /// A register model of one unit: commands take effect in GSTS,
    /// invalidations complete at once, faults can be injected.
    struct FakeUnit {
        regs: BTreeMap<u64, u64>,
        cap: u64,
        ecap: u64,
        log: Vec<&'static str>,
        stuck: bool,
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
            }
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
                    assert_eq!(
                        value & !gcmd::ONE_SHOT & !(gcmd::TE | gcmd::SRTP | gcmd::WBF),
                        0
                    );
                    let mut s = self.gsts();
                    if value & gcmd::SRTP != 0 {
                        self.log.push("srtp");
                        s |= gcmd::SRTP;
                    }
                    if value & gcmd::WBF != 0 {
                        self.log.push("wbf");
                    }
                    if value & gcmd::TE != 0 && !self.stuck {
                        self.log.push("te");
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
                reg::CCMD => self.log.push("ccmd"),
                0x208 => self.log.push("iotlb"),
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
                write: true
            }]
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
