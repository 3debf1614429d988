//! AMD-Vi IOMMUs (AMD I/O Virtualization Technology (IOMMU) Specification,
//! chapter 3 "Registers", §2.2 "Data Structures", §2.4 "Commands", §2.5
//! "Event Logging"), driven through [`Mmio`] and a [`Ring`] for the
//! command buffer and event log, so the sequences run against models in
//! tests.
//!
//! As with VT-d, thinhv uses one domain for every requester: each device
//! table entry points to the same I/O page table (identity, minus the
//! hypervisor). Device IDs beyond the table are refused by the IOMMU
//! (target abort), which is safe; the table covers the buses present at
//! boot with room to spare.
//!
//! The exclusion range (chapter 3, "IOMMU Exclusion Base Register" at
//! MMIO offset 0020h and "IOMMU Exclusion Range Limit Register" at 0028h)
//! is a hole in translation: with ExEn set, DMA into `[base, limit]` is passed
//! through untranslated for every device when Allow is set, else for the
//! devices whose device-table entry has EX. Firmware may leave one set; an
//! exclusion range over thinhv's memory would let any device write it.
//! [`enable`] clears both registers before translation goes on and returns
//! what they held, so the caller can log it. thinhv never sets EX in its
//! entries ([`dte`]) and never programs an exclusion range.
#![allow(clippy::cast_possible_truncation)]
use crate::vtd::Mmio;
use alloc::vec::Vec;

/// Register offsets.
pub mod reg {
    /// Device table base (bits 51:12) and size (pages - 1, bits 8:0).
    pub const DEV_TABLE: u64 = 0x0000;
    /// Command buffer base and length (bits 59:56, log2 entries).
    pub const CMD_BUF: u64 = 0x0008;
    /// Event log base and length.
    pub const EVENT_LOG: u64 = 0x0010;
    /// Control.
    pub const CONTROL: u64 = 0x0018;
    /// Exclusion base: address (bits 51:12), Allow (bit 1), ExEn (bit 0).
    pub const EXCL_BASE: u64 = 0x0020;
    /// Exclusion range limit: last page of the range (bits 51:12).
    pub const EXCL_LIMIT: u64 = 0x0028;
    /// Extended feature register.
    pub const EFR: u64 = 0x0030;
    /// Command buffer head.
    pub const CMD_HEAD: u64 = 0x2000;
    /// Command buffer tail.
    pub const CMD_TAIL: u64 = 0x2008;
    /// Event log head.
    pub const EVT_HEAD: u64 = 0x2010;
    /// Event log tail.
    pub const EVT_TAIL: u64 = 0x2018;
    /// Status.
    pub const STATUS: u64 = 0x2020;
}

/// Control register bits.
pub mod ctrl {
    /// IOMMU enable.
    pub const IOMMU_EN: u64 = 1 << 0;
    /// Event log enable.
    pub const EVENT_LOG_EN: u64 = 1 << 2;
    /// Command buffer enable.
    pub const CMD_BUF_EN: u64 = 1 << 12;
}

/// Status: event log overflow.
const STATUS_EVENT_OVERFLOW: u64 = 1 << 0;
/// Status: the event log is running ("IOMMU Status Register", MMIO offset
/// 2020h, EventLogRun).
const STATUS_EVENT_LOG_RUN: u64 = 1 << 3;
/// Status: the command buffer is running (CmdBufRun).
const STATUS_CMD_BUF_RUN: u64 = 1 << 4;

/// Exclusion base register bits.
pub mod excl {
    /// ExEn: the exclusion range is active.
    pub const EN: u64 = 1 << 0;
    /// Allow: it applies to every device (else only to entries with EX).
    pub const ALLOW: u64 = 1 << 1;
    /// The address bits of both registers.
    pub const ADDR: u64 = 0x000f_ffff_ffff_f000;
}

/// The exclusion range registers as found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Exclusion {
    /// Exclusion base register.
    pub base: u64,
    /// Exclusion range limit register.
    pub limit: u64,
}

impl Exclusion {
    /// ExEn was set: DMA into the range bypassed translation.
    pub const fn enabled(&self) -> bool {
        self.base & excl::EN != 0
    }

    /// Allow was set: for every device.
    pub const fn all_devices(&self) -> bool {
        self.base & excl::ALLOW != 0
    }

    /// First byte of the range.
    pub const fn start(&self) -> u64 {
        self.base & excl::ADDR
    }

    /// Last byte of the range (the limit names its last page).
    pub const fn last(&self) -> u64 {
        (self.limit & excl::ADDR) | 0xfff
    }

    /// Anything was set at all.
    pub const fn is_set(&self) -> bool {
        self.base != 0 || self.limit & excl::ADDR != 0
    }
}

/// Clears the exclusion range (base, with ExEn and Allow, and limit) and
/// returns what the registers held.
pub fn clear_exclusion(m: &mut impl Mmio) -> Exclusion {
    let found = Exclusion {
        base: m.read64(reg::EXCL_BASE),
        limit: m.read64(reg::EXCL_LIMIT),
    };
    m.write64(reg::EXCL_BASE, 0);
    m.write64(reg::EXCL_LIMIT, 0);
    found
}

/// Entries of the command buffer and event log (one 4 KiB page each).
pub const RING_ENTRIES: usize = 256;
/// log2 of [`RING_ENTRIES`], the length field's value.
const RING_LEN_LOG2: u64 = 8;

/// A 256-entry ring of 16-byte entries in memory the IOMMU reads or writes.
pub trait Ring {
    /// Entry `i`.
    fn read(&self, i: usize) -> [u32; 4];
    /// Writes entry `i`.
    fn write(&mut self, i: usize, e: [u32; 4]);
}

/// Why a unit could not be set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AmdViError {
    /// The command buffer did not drain.
    Timeout,
    /// The unit was already enabled (by the firmware).
    AlreadyEnabled,
}

impl AmdViError {
    /// What went wrong, for the log.
    pub const fn describe(self) -> &'static str {
        match self {
            Self::Timeout => "commands not completed in time",
            Self::AlreadyEnabled => "the IOMMU was already enabled by the firmware",
        }
    }
}

impl core::fmt::Display for AmdViError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.describe())
    }
}

/// A device table entry (256 bits): valid, translation valid, 4-level
/// paging from `pt_root`, read and write allowed, in `domain`. Interrupt
/// remapping stays off (IV = 0): interrupts pass as the OS sends them.
pub const fn dte(pt_root: u64, domain: u16) -> [u64; 4] {
    let q0 = 1 // V
        | (1 << 1) // TV
        | (4 << 9) // Mode: 4-level
        | (pt_root & 0x000f_ffff_ffff_f000)
        | (1 << 61) // IR
        | (1 << 62); // IW
    [q0, domain as u64, 0, 0]
}

/// A device table entry that refuses every DMA of the device: valid,
/// translation valid, paging mode 0 (translation disabled, access decided
/// by IR and IW) with read and write permission clear.
pub const fn dte_blocked(domain: u16) -> [u64; 4] {
    [1 | (1 << 1), domain as u64, 0, 0]
}

/// COMPLETION_WAIT storing `data` at `store_pa` when every earlier command
/// has completed.
pub const fn cmd_completion_wait(store_pa: u64, data: u64) -> [u32; 4] {
    [
        (store_pa as u32 & !7) | 1, // S
        ((store_pa >> 32) as u32 & 0x000f_ffff) | (1 << 28),
        data as u32,
        (data >> 32) as u32,
    ]
}

/// INVALIDATE_DEVTAB_ENTRY for `id`.
pub const fn cmd_invalidate_devtab(id: u16) -> [u32; 4] {
    [id as u32, 2 << 28, 0, 0]
}

/// INVALIDATE_IOMMU_ALL (EFR.IASup): every cached device table entry,
/// translation and interrupt remapping entry.
pub const fn cmd_invalidate_all() -> [u32; 4] {
    [0, 8 << 28, 0, 0]
}

/// INVALIDATE_INTERRUPT_TABLE for `id`: the unit reads the device's
/// interrupt remapping entries again.
pub const fn cmd_invalidate_interrupt_table(id: u16) -> [u32; 4] {
    [id as u32, 5 << 28, 0, 0]
}

/// INVALIDATE_IOMMU_PAGES: every page of `domain` (S = 1, PDE = 1, the
/// all-pages address).
pub const fn cmd_invalidate_domain(domain: u16) -> [u32; 4] {
    [
        0,
        (domain as u32) | (3 << 28),
        0xffff_f000 | 0b11,
        0x7fff_ffff,
    ]
}

/// Writes `cmds` to the command buffer and advances the tail; the caller
/// then waits (see [`wait`]).
pub fn submit(m: &mut impl Mmio, ring: &mut impl Ring, cmds: &[[u32; 4]]) {
    let mut tail = ((m.read64(reg::CMD_TAIL) >> 4) as usize) % RING_ENTRIES;
    for c in cmds {
        ring.write(tail, *c);
        tail = (tail + 1) % RING_ENTRIES;
    }
    m.write64(reg::CMD_TAIL, (tail as u64) << 4);
}

/// Waits until `done()` (the completion-wait store landed).
pub fn wait(mut done: impl FnMut() -> bool) -> Result<(), AmdViError> {
    for _ in 0..10_000_000u32 {
        if done() {
            return Ok(());
        }
        core::hint::spin_loop();
    }
    Err(AmdViError::Timeout)
}

/// Programs the unit's tables and rings, clears the exclusion range, then
/// enables command processing, event logging and translation. Returns the
/// exclusion range the firmware had left (see the module documentation).
pub fn enable(
    m: &mut impl Mmio,
    dev_table: u64,
    dev_table_pages: u64,
    cmd_buf: u64,
    event_log: u64,
) -> Result<Exclusion, AmdViError> {
    if m.read64(reg::CONTROL) & ctrl::IOMMU_EN != 0 {
        return Err(AmdViError::AlreadyEnabled);
    }
    let left = clear_exclusion(m);
    let size = dev_table_pages.clamp(1, 512) - 1;
    m.write64(reg::DEV_TABLE, (dev_table & 0x000f_ffff_ffff_f000) | size);
    m.write64(
        reg::CMD_BUF,
        (cmd_buf & 0x000f_ffff_ffff_f000) | (RING_LEN_LOG2 << 56),
    );
    m.write64(
        reg::EVENT_LOG,
        (event_log & 0x000f_ffff_ffff_f000) | (RING_LEN_LOG2 << 56),
    );
    for r in [reg::CMD_HEAD, reg::CMD_TAIL, reg::EVT_HEAD, reg::EVT_TAIL] {
        m.write64(r, 0);
    }
    let c = m.read64(reg::CONTROL);
    m.write64(
        reg::CONTROL,
        c | ctrl::CMD_BUF_EN | ctrl::EVENT_LOG_EN | ctrl::IOMMU_EN,
    );
    Ok(left)
}

/// Turns translation, command processing and event logging off (a
/// roll-back before the OS starts, so that the unit no longer reads or
/// writes memory about to be freed), and waits until the command buffer
/// and event log have stopped (status register, MMIO offset 2020h:
/// CmdBufRun and EventLogRun follow their enables).
pub fn disable(m: &mut impl Mmio) -> Result<(), AmdViError> {
    let c = m.read64(reg::CONTROL);
    m.write64(
        reg::CONTROL,
        c & !(ctrl::IOMMU_EN | ctrl::CMD_BUF_EN | ctrl::EVENT_LOG_EN),
    );
    wait(|| m.read64(reg::STATUS) & (STATUS_CMD_BUF_RUN | STATUS_EVENT_LOG_RUN) == 0)
}

/// One logged event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// Event code (2: I/O page fault).
    pub code: u8,
    /// Requester.
    pub device_id: u16,
    /// Address.
    pub address: u64,
    /// A write (RW flag) — meaningful for page faults.
    pub write: bool,
}

/// Event code of an I/O page fault.
pub const EVENT_IO_PAGE_FAULT: u8 = 2;

/// Decodes an event log entry.
pub const fn decode_event(e: [u32; 4]) -> Event {
    Event {
        code: (e[1] >> 28) as u8,
        device_id: e[0] as u16,
        address: (e[2] as u64) | ((e[3] as u64) << 32),
        // IO_PAGE_FAULT flags (bits 27:16 of dword 1): RW is bit 5 of the
        // flags (bit 21).
        write: e[1] & (1 << 21) != 0,
    }
}

/// Reads and consumes the logged events; the second value says whether the
/// log overflowed (events lost).
pub fn take_events(m: &mut impl Mmio, ring: &impl Ring) -> (Vec<Event>, bool) {
    let mut out = Vec::new();
    let mut head = ((m.read64(reg::EVT_HEAD) >> 4) as usize) % RING_ENTRIES;
    let tail = ((m.read64(reg::EVT_TAIL) >> 4) as usize) % RING_ENTRIES;
    while head != tail {
        out.push(decode_event(ring.read(head)));
        head = (head + 1) % RING_ENTRIES;
    }
    m.write64(reg::EVT_HEAD, (head as u64) << 4);
    let overflow = m.read64(reg::STATUS) & STATUS_EVENT_OVERFLOW != 0;
    if overflow {
        m.write64(reg::STATUS, STATUS_EVENT_OVERFLOW);
    }
    (out, overflow)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(Default)]
    struct Regs(BTreeMap<u64, u64>);

    impl Mmio for Regs {
        fn read32(&self, o: u64) -> u32 {
            self.read64(o) as u32
        }
        fn read64(&self, o: u64) -> u64 {
            self.0.get(&o).copied().unwrap_or(0)
        }
        fn write32(&mut self, o: u64, v: u32) {
            self.0.insert(o, u64::from(v));
        }
        fn write64(&mut self, o: u64, v: u64) {
            self.0.insert(o, v);
        }
    }

    struct Mem(Vec<[u32; 4]>);

    impl Ring for Mem {
        fn read(&self, i: usize) -> [u32; 4] {
            self.0[i]
        }
        fn write(&mut self, i: usize, e: [u32; 4]) {
            self.0[i] = e;
        }
    }

    #[test]
    fn device_table_entry() {
        let d = dte(0x1234_5000, 1);
        assert_eq!(d[0] & 0b11, 0b11, "valid, translation valid");
        assert_eq!((d[0] >> 9) & 7, 4, "4-level");
        assert_eq!(d[0] & 0x000f_ffff_ffff_f000, 0x1234_5000);
        assert_eq!(d[0] >> 61, 0b11, "read and write");
        assert_eq!(d[1], 1, "domain 1, no interrupt remapping");
        let b = dte_blocked(2);
        assert_eq!(b[0] & 0b11, 0b11, "valid, translation valid");
        assert_eq!((b[0] >> 9) & 7, 0, "mode 0: IR/IW decide");
        assert_eq!(b[0] >> 61, 0, "neither read nor write");
        assert_eq!(b[1], 2);
    }

    #[test]
    fn interrupt_table_invalidation_names_the_device() {
        assert_eq!(
            cmd_invalidate_interrupt_table(0x0108),
            [0x0108, 0x5000_0000, 0, 0]
        );
    }

    #[test]
    fn commands_encode() {
        let c = cmd_completion_wait(0x8000_1008, 0x5a5a);
        assert_eq!(c[0], 0x8000_1009);
        assert_eq!(c[1] >> 28, 1);
        assert_eq!(c[2], 0x5a5a);
        assert_eq!(cmd_invalidate_devtab(0x0100), [0x100, 0x2000_0000, 0, 0]);
        let p = cmd_invalidate_domain(1);
        assert_eq!(p[1], 0x3000_0001);
        assert_eq!(p[2] & 0b11, 0b11, "S and PDE");
    }

    #[test]
    fn enable_programs_bases_and_turns_on() {
        let mut r = Regs::default();
        assert_eq!(
            enable(&mut r, 0x10_0000, 32, 0x20_0000, 0x30_0000),
            Ok(Exclusion::default()),
            "no exclusion range left"
        );
        assert_eq!(r.read64(reg::DEV_TABLE), 0x10_0000 | 31);
        assert_eq!(r.read64(reg::CMD_BUF), 0x20_0000 | (8 << 56));
        assert_eq!(r.read64(reg::EVENT_LOG), 0x30_0000 | (8 << 56));
        let c = r.read64(reg::CONTROL);
        assert_eq!(
            c & (ctrl::IOMMU_EN | ctrl::CMD_BUF_EN | ctrl::EVENT_LOG_EN),
            ctrl::IOMMU_EN | ctrl::CMD_BUF_EN | ctrl::EVENT_LOG_EN
        );
        assert_eq!(enable(&mut r, 0, 1, 0, 0), Err(AmdViError::AlreadyEnabled));
    }

    /// Registers that record every write in order.
    #[derive(Default)]
    struct Recorder {
        regs: Regs,
        writes: Vec<(u64, u64)>,
    }

    impl Mmio for Recorder {
        fn read32(&self, o: u64) -> u32 {
            self.regs.read32(o)
        }
        fn read64(&self, o: u64) -> u64 {
            self.regs.read64(o)
        }
        fn write32(&mut self, o: u64, v: u32) {
            self.writes.push((o, u64::from(v)));
            self.regs.write32(o, v);
        }
        fn write64(&mut self, o: u64, v: u64) {
            self.writes.push((o, v));
            self.regs.write64(o, v);
        }
    }

    #[test]
    fn an_exclusion_range_left_by_the_firmware_is_cleared_before_translation() {
        let mut r = Recorder::default();
        // Firmware: DMA into 0x7e00_0000..=0x7fff_ffff bypasses
        // translation for every device (ExEn | Allow).
        r.regs
            .write64(reg::EXCL_BASE, 0x7e00_0000 | excl::ALLOW | excl::EN);
        r.regs.write64(reg::EXCL_LIMIT, 0x7fff_f000);
        let left = enable(&mut r, 0x10_0000, 32, 0x20_0000, 0x30_0000).unwrap();
        assert!(left.enabled() && left.all_devices() && left.is_set());
        assert_eq!((left.start(), left.last()), (0x7e00_0000, 0x7fff_ffff));
        assert_eq!(r.read64(reg::EXCL_BASE), 0);
        assert_eq!(r.read64(reg::EXCL_LIMIT), 0);
        // Both cleared before the write that turns translation on.
        let pos = |f: &dyn Fn(&(u64, u64)) -> bool| r.writes.iter().position(f).unwrap();
        let on = pos(&|w| w.0 == reg::CONTROL && w.1 & ctrl::IOMMU_EN != 0);
        assert!(pos(&|w| *w == (reg::EXCL_BASE, 0)) < on);
        assert!(pos(&|w| *w == (reg::EXCL_LIMIT, 0)) < on);
        // An enabled range for EX devices only, and a stale limit alone.
        let mut r = Regs::default();
        r.write64(reg::EXCL_BASE, 0x1000 | excl::EN);
        let e = clear_exclusion(&mut r);
        assert!(e.enabled() && !e.all_devices());
        r.write64(reg::EXCL_LIMIT, 0x5000);
        let e = clear_exclusion(&mut r);
        assert!(!e.enabled() && e.is_set());
        assert_eq!(clear_exclusion(&mut r), Exclusion::default());
        assert!(!Exclusion::default().is_set());
    }

    #[test]
    fn disable_turns_everything_off_and_waits_for_the_rings() {
        let mut r = Regs::default();
        enable(&mut r, 0x10_0000, 32, 0x20_0000, 0x30_0000).unwrap();
        r.write64(reg::CONTROL, r.read64(reg::CONTROL) | (1 << 1));
        assert_eq!(disable(&mut r), Ok(()));
        assert_eq!(r.read64(reg::CONTROL), 1 << 1, "other control bits kept");
        // A ring that never stops: reported, not waited for forever.
        r.write64(reg::STATUS, STATUS_CMD_BUF_RUN);
        assert_eq!(disable(&mut r), Err(AmdViError::Timeout));
    }

    #[test]
    fn commands_go_round_the_ring() {
        let mut r = Regs::default();
        let mut ring = Mem(vec![[0; 4]; RING_ENTRIES]);
        r.write64(reg::CMD_TAIL, 255 << 4);
        submit(
            &mut r,
            &mut ring,
            &[cmd_invalidate_devtab(1), cmd_invalidate_devtab(2)],
        );
        assert_eq!(ring.0[255][0], 1);
        assert_eq!(ring.0[0][0], 2);
        assert_eq!(r.read64(reg::CMD_TAIL), 1 << 4);
        let mut n = 0;
        assert!(
            wait(|| {
                n += 1;
                n > 3
            })
            .is_ok()
        );
    }

    #[test]
    fn events_are_read_and_consumed() {
        let mut r = Regs::default();
        let mut ring = Mem(vec![[0; 4]; RING_ENTRIES]);
        ring.0[0] = [0x0100, (2 << 28) | (1 << 21), 0x3db9_5000, 0];
        ring.0[1] = [0x0008, 2 << 28, 0x1000, 0];
        r.write64(reg::EVT_TAIL, 2 << 4);
        let (ev, overflow) = take_events(&mut r, &ring);
        assert!(!overflow);
        assert_eq!(
            ev[0],
            Event {
                code: EVENT_IO_PAGE_FAULT,
                device_id: 0x0100,
                address: 0x3db9_5000,
                write: true
            }
        );
        assert!(!ev[1].write);
        assert_eq!(r.read64(reg::EVT_HEAD), 2 << 4);
        assert!(take_events(&mut r, &ring).0.is_empty());
    }
}
