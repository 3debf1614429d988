//! Quiescing and resetting a PCI function that changes hands: a function
//! given to an appliance, at the hand-over (whatever the firmware's driver
//! left running) and before the appliance boots again (whatever its last
//! run left running). Pure logic over [`FunctionConfig`]; the loader runs
//! it through ECAM, the core through the configuration ports.
//!
//! The sequence (`docs/appliances.md`, "Devices"):
//!
//! 1. **Quiesce**: Bus Master Enable off and INTx Disable on in the
//!    command register, MSI Enable off, MSI-X Enable off with its Function
//!    Mask set. From here the function neither writes memory nor signals
//!    an interrupt.
//! 2. **Reset**, the first the function offers:
//!    - Function Level Reset (PCI Express Base 4.0 §6.6.2) when Device
//!      Capabilities says FLR: wait (at most 100 ms) for Transactions
//!      Pending to clear, Initiate FLR, wait 100 ms, then (at most 1 s)
//!      for the function to answer configuration reads again;
//!    - else D3hot and back to D0 (PCI Bus Power Management 1.2 §5.6.1)
//!      when its power management capability has No_Soft_Reset clear:
//!      that transition resets the function's internal state;
//!    - else none: the function stays quiesced but not reset, and the
//!      report says so.
//! 3. **Restore** what the reset cleared and the next owner relies on: the
//!    memory BARs the firmware assigned (the appliance's second-level
//!    tables and IOMMU domain map those addresses) and Memory Space Enable
//!    (only once every BAR reads back its address).
//!    Bus mastering stays off until the next owner's driver turns it on;
//!    INTx stays disabled (an appliance has no I/O APIC, and the platform's
//!    is the OS's).
//!
//! The writes are 16-bit where a dword would also write a status register
//! (command/status, device control/status, PMCSR): status bits are
//! write-one-to-clear, and the driver of the next owner may want them.

/// Configuration-space access to one function.
pub trait FunctionConfig {
    /// The dword at `reg` (aligned, below 0x100).
    fn read32(&mut self, reg: u16) -> u32;
    /// Writes the dword at `reg` (aligned).
    fn write32(&mut self, reg: u16, value: u32);
    /// Writes the word at `reg` (2-byte aligned).
    fn write16(&mut self, reg: u16, value: u16);
    /// Waits `us` microseconds.
    fn wait_us(&mut self, us: u32);
}

/// Capability IDs: power management, MSI, PCI Express, MSI-X.
pub const CAP_PM: u8 = 0x01;
/// MSI.
pub const CAP_MSI: u8 = 0x05;
/// PCI Express.
pub const CAP_PCIE: u8 = 0x10;
/// MSI-X.
pub const CAP_MSIX: u8 = 0x11;

const COMMAND: u16 = 0x04;
const CMD_MEMORY: u16 = 1 << 1;
const CMD_BUS_MASTER: u16 = 1 << 2;
const CMD_INTX_DISABLE: u16 = 1 << 10;

/// Device Capabilities: Function Level Reset Capability.
const DEVCAP_FLR: u32 = 1 << 28;
/// Device Control: Initiate Function Level Reset.
const DEVCTL_FLR: u16 = 1 << 15;
/// Device Status: Transactions Pending.
const DEVSTA_PENDING: u32 = 1 << 5;
/// PMCSR: No_Soft_Reset.
const PMCSR_NO_SOFT_RESET: u32 = 1 << 3;
/// PMCSR: PME_Status (write one to clear).
const PMCSR_PME_STATUS: u16 = 1 << 15;

/// At most this many capabilities are walked (a looping list ends there).
const MAX_CAPS: usize = 48;

/// The offset of capability `id` in the legacy list.
pub fn find_capability(cfg: &mut impl FunctionConfig, id: u8) -> Option<u16> {
    if (cfg.read32(COMMAND) >> 16) & (1 << 4) == 0 {
        return None;
    }
    let mut ptr = (cfg.read32(0x34) & 0xfc) as u16;
    for _ in 0..MAX_CAPS {
        if ptr < 0x40 {
            return None;
        }
        let v = cfg.read32(ptr);
        if (v & 0xff) as u8 == id {
            return Some(ptr);
        }
        ptr = ((v >> 8) & 0xfc) as u16;
    }
    None
}

/// One memory BAR to put back: register index (0..=5), whether it is 64
/// bits wide (the next register holds the high half), and the address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    /// Register index: the BAR is at configuration offset `0x10 + 4 * index`.
    pub index: u8,
    /// A 64-bit BAR.
    pub wide: bool,
    /// The address the firmware assigned.
    pub base: u64,
}

/// How the function was reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Function Level Reset.
    Flr,
    /// D3hot and back to D0 (No_Soft_Reset clear).
    PowerState,
    /// It offers neither: quiesced only.
    None,
}

impl Method {
    /// For logs: "FLR", "D3hot→D0", "none".
    pub const fn name(self) -> &'static str {
        match self {
            Self::Flr => "FLR",
            Self::PowerState => "D3hot->D0",
            Self::None => "none",
        }
    }
}

/// What quiescing found on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Quiesced {
    /// The command register before.
    pub command: u16,
    /// MSI was enabled.
    pub msi: bool,
    /// MSI-X was enabled.
    pub msix: bool,
}

/// What [`reset`] did and saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Report {
    /// What quiescing found on.
    pub quiesced: Quiesced,
    /// The reset used.
    pub method: Method,
    /// The command register right after the reset, before the restore
    /// (a reset function reads 0 there).
    pub command_after_reset: u16,
    /// Whether the reset showed: the function decoded memory or I/O before
    /// it and no longer after (a reset clears the command register);
    /// `None` when it decoded neither before, or no reset was tried.
    pub reset_seen: Option<bool>,
    /// Transactions Pending was still set after 100 ms (FLR went ahead).
    pub pending_timeout: bool,
    /// The function did not answer within 1 s of its reset.
    pub not_back: bool,
    /// Every BAR reads back the address it was given.
    pub bars_restored: bool,
    /// There were none to give back (a VF's BARs are its PF's).
    pub no_bars: bool,
}

impl core::fmt::Display for Quiesced {
    /// What was on before: "quiesced (command 0x0406, msi off, msi-x on)".
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "quiesced (command {:#06x}, msi {}, msi-x {})",
            self.command,
            if self.msi { "on" } else { "off" },
            if self.msix { "on" } else { "off" },
        )
    }
}

impl core::fmt::Display for Report {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}, reset {}", self.quiesced, self.method.name())?;
        if self.method != Method::None {
            write!(f, " (command after {:#06x}", self.command_after_reset)?;
            f.write_str(match self.reset_seen {
                Some(false) => ": NO reset seen, its state may survive)",
                _ => ")",
            })?;
        }
        if self.pending_timeout {
            f.write_str(", transactions still pending after 100 ms")?;
        }
        if self.not_back {
            f.write_str(", NOT answering 1 s after its reset")?;
        }
        f.write_str(if self.no_bars {
            ", no BARs to restore"
        } else if self.bars_restored {
            ", BARs restored"
        } else {
            ", BARs NOT restored"
        })
    }
}

impl Report {
    /// The function is back as its next owner expects it.
    pub const fn ok(&self) -> bool {
        self.bars_restored && !self.not_back
    }
}

/// Whether a function answers configuration reads (`r` reads a dword):
/// its vendor ID, or for a VF (whose vendor and device ID read all ones,
/// PCIe Base 6.0 §9.3.4.1.1) its class code register. A function still
/// initialising answers all ones (or completes with Configuration Request
/// Retry Status, 0x0001 in the vendor ID where the root complex shows it).
fn answers(r: &mut dyn FnMut(u16) -> u32) -> bool {
    let class = r(0x08);
    match r(0) & 0xffff {
        0x0001 => false,
        0xffff => class != u32::MAX,
        _ => true,
    }
}

/// Step 1 alone: no more DMA and no more interrupts from the function.
/// `None` when nothing answers there.
pub fn quiesce(cfg: &mut impl FunctionConfig) -> Option<Quiesced> {
    if !answers(&mut |r| cfg.read32(r)) {
        return None;
    }
    let command = (cfg.read32(COMMAND) & 0xffff) as u16;
    if command == 0xffff {
        // Gone between the two reads: writing its "value" back would turn
        // every decode on.
        return None;
    }
    cfg.write16(COMMAND, (command & !CMD_BUS_MASTER) | CMD_INTX_DISABLE);
    let mut q = Quiesced {
        command,
        ..Quiesced::default()
    };
    if let Some(msi) = find_capability(cfg, CAP_MSI) {
        let control = (cfg.read32(msi) >> 16) as u16;
        q.msi = control & 1 != 0;
        cfg.write16(msi + 2, control & !1);
    }
    if let Some(msix) = find_capability(cfg, CAP_MSIX) {
        let control = (cfg.read32(msix) >> 16) as u16;
        q.msix = control & (1 << 15) != 0;
        // Function Mask on, then Enable off.
        cfg.write16(msix + 2, control | (1 << 14));
        cfg.write16(msix + 2, (control | (1 << 14)) & !(1 << 15));
    }
    Some(q)
}

/// Waits (in 10 ms steps, at most `ms`) until `done`; false on timeout.
fn wait_until(
    cfg: &mut impl FunctionConfig,
    ms: u32,
    mut done: impl FnMut(&mut dyn FnMut(u16) -> u32) -> bool,
) -> bool {
    let mut waited = 0;
    loop {
        let ok = {
            let mut read = |reg| cfg.read32(reg);
            done(&mut read)
        };
        if ok {
            return true;
        }
        if waited >= ms {
            return false;
        }
        cfg.wait_us(10_000);
        waited += 10;
    }
}

/// The whole sequence (quiesce, reset, restore `bars`). `None` when
/// nothing answers there.
pub fn reset(cfg: &mut impl FunctionConfig, bars: &[Bar]) -> Option<Report> {
    let quiesced = quiesce(cfg)?;
    let mut report = Report {
        quiesced,
        method: Method::None,
        command_after_reset: quiesced.command,
        reset_seen: None,
        pending_timeout: false,
        not_back: false,
        bars_restored: false,
        no_bars: false,
    };
    let decoding = (cfg.read32(COMMAND) & 0xffff) as u16 & (CMD_MEMORY | 1);
    let pcie = find_capability(cfg, CAP_PCIE);
    let flr = pcie.filter(|&c| cfg.read32(c + 4) & DEVCAP_FLR != 0);
    let pm = find_capability(cfg, CAP_PM);
    // FLR is defined from D0 only: a function left in D3hot goes to D0
    // first (10 ms, PCI PM 1.2 Table 5-6).
    if let Some(cap) = pm {
        let pmcsr = (cfg.read32(cap + 4) & 0xffff) as u16;
        if pmcsr & 3 != 0 {
            cfg.write16(cap + 4, pmcsr & !(3 | PMCSR_PME_STATUS));
            cfg.wait_us(10_000);
        }
    }
    let mut devctl = None;
    if let Some(cap) = flr {
        report.pending_timeout =
            !wait_until(cfg, 100, |r| (r(cap + 8) >> 16) & DEVSTA_PENDING == 0);
        let saved = (cfg.read32(cap + 8) & 0xffff) as u16 & !DEVCTL_FLR;
        devctl = Some((cap, saved));
        cfg.write16(cap + 8, saved | DEVCTL_FLR);
        cfg.wait_us(100_000);
        report.method = Method::Flr;
    } else if let Some(cap) = pm.filter(|&c| cfg.read32(c + 4) & PMCSR_NO_SOFT_RESET == 0) {
        let pmcsr = (cfg.read32(cap + 4) & 0xffff) as u16 & !PMCSR_PME_STATUS;
        cfg.write16(cap + 4, (pmcsr & !3) | 3);
        cfg.wait_us(10_000);
        cfg.write16(cap + 4, pmcsr & !3);
        cfg.wait_us(10_000);
        report.method = Method::PowerState;
    }
    if report.method != Method::None {
        // A function still initialising answers all ones (or completes
        // with Configuration Request Retry Status, 0x0001 in the vendor ID
        // where the root complex shows it).
        report.not_back = !wait_until(cfg, 1000, |r| answers(r));
        report.command_after_reset = (cfg.read32(COMMAND) & 0xffff) as u16;
        if decoding != 0 && !report.not_back {
            report.reset_seen = Some(report.command_after_reset & (CMD_MEMORY | 1) == 0);
        }
    }
    if report.not_back {
        // Nothing to restore into: writes to a function that does not
        // answer would land whenever it does, as they were.
        return Some(report);
    }
    // The Device Control settings the FLR cleared (payload and read
    // request sizes, relaxed ordering, no-snoop, error reporting): the
    // platform's, not the next owner's.
    if let Some((cap, saved)) = devctl {
        cfg.write16(cap + 8, saved);
    }
    report.bars_restored = restore(cfg, bars);
    report.no_bars = bars.is_empty();
    Some(report)
}

/// Step 3 alone: `bars` written back and read back (true when every one
/// holds its address), then Memory Space Enable (only then), I/O space and
/// bus mastering off, INTx Disable on.
pub fn restore(cfg: &mut impl FunctionConfig, bars: &[Bar]) -> bool {
    let restored = put_bars(cfg, bars);
    // Memory space on only where its BARs are where they were: a BAR the
    // reset cleared and that did not take its address back would decode
    // at 0.
    let command = (cfg.read32(COMMAND) & 0xffff) as u16 & !(CMD_BUS_MASTER | CMD_MEMORY | 1);
    let memory = if restored { CMD_MEMORY } else { 0 };
    cfg.write16(COMMAND, command | memory | CMD_INTX_DISABLE);
    restored
}

/// `bars` written back and read back, nothing else: true when every one
/// holds its address.
pub fn put_bars(cfg: &mut impl FunctionConfig, bars: &[Bar]) -> bool {
    for b in bars {
        let reg = 0x10 + 4 * u16::from(b.index);
        cfg.write32(reg, (b.base & 0xffff_ffff) as u32);
        if b.wide {
            cfg.write32(reg + 4, (b.base >> 32) as u32);
        }
    }
    bars.iter().all(|b| {
        let reg = 0x10 + 4 * u16::from(b.index);
        let low = u64::from(cfg.read32(reg) & !0xf);
        let high = if b.wide {
            u64::from(cfg.read32(reg + 4)) << 32
        } else {
            0
        };
        low | high == b.base
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A function's configuration space with what a reset does to it.
    #[derive(Default)]
    struct Fake {
        regs: BTreeMap<u16, u32>,
        /// Offsets of the PCIe, PM, MSI, MSI-X capabilities (0: absent).
        pcie: u16,
        pm: u16,
        /// BAR sizes by index (0: unimplemented).
        bar_size: [u32; 6],
        flrs: u32,
        d3: u32,
        waited_us: u64,
        /// Reads of the vendor ID that answer all ones after a reset.
        slow: u32,
        /// Transactions Pending stays set for this many reads.
        pending: u32,
        log: Vec<(u16, u32)>,
    }

    impl Fake {
        fn new(flr: bool, pm_soft_reset: Option<bool>) -> Self {
            let mut f = Fake::default();
            f.regs.insert(0, 0x10d3_8086);
            f.regs.insert(4, 0x0010_0006 | 1 << 10);
            f.regs.insert(0x34, 0x40);
            // MSI at 0x40 (enabled) -> MSI-X at 0x50 (enabled) -> PCIe at
            // 0x60 -> PM at 0x70.
            f.regs.insert(0x40, 0x0081_5005);
            f.regs.insert(0x50, 0x8003_6011);
            f.regs.insert(0x60, 0x0002_7010);
            f.regs.insert(0x64, if flr { DEVCAP_FLR } else { 0 });
            f.regs.insert(0x68, 0x0000_2810);
            f.pcie = 0x60;
            match pm_soft_reset {
                Some(soft) => {
                    f.regs.insert(0x70, 0x0003_0001);
                    f.regs
                        .insert(0x74, if soft { 0 } else { PMCSR_NO_SOFT_RESET });
                    f.pm = 0x70;
                }
                None => {
                    f.regs.insert(0x60, 0x0002_0010);
                }
            }
            f.bar_size = [0x2_0000, 0, 0x4000, 0, 0, 0];
            f.regs.insert(0x10, 0xc000_0000);
            f.regs.insert(0x18, 0xc002_0004);
            f.regs.insert(0x1c, 0x8);
            f
        }

        fn power_on_state(&mut self) {
            self.regs.insert(4, 0x0010_0000);
            self.regs.insert(0x10, 0);
            self.regs.insert(0x18, 0x4);
            self.regs.insert(0x1c, 0);
            let msi = self.regs[&0x40] & !(1 << 16);
            self.regs.insert(0x40, msi);
            let msix = self.regs[&0x50] & !(3 << 30);
            self.regs.insert(0x50, msix);
        }
    }

    impl FunctionConfig for Fake {
        fn read32(&mut self, reg: u16) -> u32 {
            if reg == 8 && self.slow > 0 {
                return u32::MAX;
            }
            if reg == 0 && self.slow > 0 {
                self.slow -= 1;
                return u32::MAX;
            }
            if self.pcie != 0 && reg == self.pcie + 8 {
                let pending = if self.pending > 0 {
                    self.pending -= 1;
                    DEVSTA_PENDING << 16
                } else {
                    0
                };
                return self.regs[&reg] | pending;
            }
            self.regs.get(&reg).copied().unwrap_or(0)
        }
        fn write32(&mut self, reg: u16, value: u32) {
            self.log.push((reg, value));
            let v = match reg {
                0x10..=0x27 => {
                    let i = usize::from((reg - 0x10) / 4);
                    let size = self.bar_size[i];
                    let flags = self.regs.get(&reg).copied().unwrap_or(0) & 0xf;
                    if size == 0 {
                        // The high half of a 64-bit BAR, or nothing.
                        if i > 0 && self.bar_size[i - 1] != 0 && self.regs[&(reg - 4)] & 4 != 0 {
                            value
                        } else {
                            0
                        }
                    } else {
                        (value & !(size - 1) & !0xf) | flags
                    }
                }
                _ => value,
            };
            self.regs.insert(reg, v);
        }
        fn write16(&mut self, reg: u16, value: u16) {
            self.log.push((reg, u32::from(value)));
            let dword = reg & !3;
            let shift = 8 * u32::from(reg & 2);
            let old = self.regs.get(&dword).copied().unwrap_or(0);
            let mut new = (old & !(0xffff << shift)) | (u32::from(value) << shift);
            if dword == 4 {
                // Status is write-one-to-clear: writing 0 keeps it.
                new = (new & 0xffff) | (old & 0xffff_0000);
            }
            if self.pcie != 0 && dword == self.pcie + 8 && value & DEVCTL_FLR != 0 {
                self.flrs += 1;
                self.power_on_state();
                self.slow = 3;
                return;
            }
            if self.pm != 0 && dword == self.pm + 4 {
                if value & 3 == 3 {
                    self.d3 += 1;
                } else if old & 3 == 3 && self.regs[&(self.pm + 4)] & PMCSR_NO_SOFT_RESET == 0 {
                    self.regs.insert(dword, new);
                    self.power_on_state();
                    return;
                }
            }
            self.regs.insert(dword, new);
        }
        fn wait_us(&mut self, us: u32) {
            self.waited_us += u64::from(us);
        }
    }

    const BARS: [Bar; 2] = [
        Bar {
            index: 0,
            wide: false,
            base: 0xc000_0000,
        },
        Bar {
            index: 2,
            wide: true,
            base: 0x8_c002_0000,
        },
    ];

    #[test]
    fn a_vf_whose_ids_read_all_ones_is_quiesced_and_reset_by_flr() {
        // A VF: vendor and device ID all ones, its class code readable;
        // its BARs are its PF's VF BARs (none to put back).
        let mut f = Fake::new(true, None);
        f.regs.insert(0, u32::MAX);
        f.regs.insert(8, 0x0200_0001);
        let r = reset(&mut f, &[]).unwrap();
        assert_eq!(f.flrs, 1);
        assert!(!r.not_back && r.ok(), "{r}");
        assert_eq!(r.method, Method::Flr);
        assert!(r.to_string().ends_with(", no BARs to restore"), "{r}");
        // Nothing answers at all: no function.
        let mut g = Fake::new(true, None);
        g.regs.insert(0, u32::MAX);
        g.regs.insert(8, u32::MAX);
        assert!(reset(&mut g, &[]).is_none());
    }

    #[test]
    fn flr_resets_then_the_bars_and_memory_space_come_back_without_bus_mastering() {
        let mut f = Fake::new(true, Some(true));
        f.regs.insert(0x1c, 0x8);
        let r = reset(&mut f, &BARS).unwrap();
        assert_eq!(f.flrs, 1);
        assert_eq!(f.d3, 0, "FLR is preferred");
        // Literal registers: Initiate FLR (bit 15) in Device Control at
        // PCIe capability + 8, then its settings back.
        let at =
            |reg: u16| -> Vec<u32> { f.log.iter().filter(|w| w.0 == reg).map(|w| w.1).collect() };
        assert_eq!(at(0x68), [0xa810, 0x2810]);
        assert_eq!(r.method, Method::Flr);
        assert_eq!(r.quiesced.command, 0x0406);
        assert!(r.quiesced.msi && r.quiesced.msix);
        // The device reset itself: its command register reads 0.
        assert_eq!(r.command_after_reset, 0);
        assert_eq!(r.reset_seen, Some(true));
        assert!(r.ok(), "{r}");
        assert_eq!(f.regs[&0x10], 0xc000_0000);
        assert_eq!((f.regs[&0x18], f.regs[&0x1c]), (0xc002_0004, 0x8));
        // Memory space on, bus mastering and I/O off, INTx disabled.
        assert_eq!(f.regs[&4] & 0xffff, 0x0402);
        // 100 ms after the FLR, and the 3 reads it took to answer again.
        assert_eq!(f.waited_us, 100_000 + 3 * 10_000);
        assert_eq!(
            r.to_string(),
            "quiesced (command 0x0406, msi on, msi-x on), reset FLR (command after 0x0000), BARs restored"
        );
    }

    #[test]
    fn quiescing_comes_first_and_masks_msix_before_disabling_it() {
        let mut f = Fake::new(false, None);
        let q = quiesce(&mut f).unwrap();
        assert!(q.msi && q.msix);
        assert_eq!(
            f.log,
            vec![
                (0x04, 0x0402),
                (0x42, 0x0080),
                (0x52, 0xc003),
                (0x52, 0x4003)
            ]
        );
        assert_eq!(f.regs[&0x40] >> 16 & 1, 0);
        assert_eq!(f.regs[&0x50] >> 30, 1, "masked, disabled");
    }

    #[test]
    fn without_flr_a_soft_reset_power_state_is_used() {
        let mut f = Fake::new(false, Some(true));
        let r = reset(&mut f, &BARS).unwrap();
        assert_eq!((f.flrs, f.d3), (0, 1));
        assert_eq!(r.method, Method::PowerState);
        // PMCSR at PM capability + 4: D3hot (3), then D0.
        let pm: Vec<u32> = f.log.iter().filter(|w| w.0 == 0x74).map(|w| w.1).collect();
        assert_eq!(pm, [3, 0]);
        assert_eq!(r.command_after_reset, 0);
        assert!(r.ok(), "{r}");
        assert_eq!(f.regs[&0x74] & 3, 0, "back in D0");
    }

    #[test]
    fn a_reset_that_does_not_show_is_said_so() {
        // D3hot and back with No_Soft_Reset clear, on a function that keeps
        // its configuration anyway (QEMU 10.0's e1000e).
        struct Keeps(Fake);
        impl FunctionConfig for Keeps {
            fn read32(&mut self, reg: u16) -> u32 {
                self.0.read32(reg)
            }
            fn write32(&mut self, reg: u16, value: u32) {
                self.0.write32(reg, value);
            }
            fn write16(&mut self, reg: u16, value: u16) {
                // PMCSR takes the power state, nothing else happens.
                if reg == self.0.pm + 4 {
                    let old = self.0.regs[&reg];
                    self.0.regs.insert(reg, (old & !3) | u32::from(value & 3));
                    return;
                }
                self.0.write16(reg, value);
            }
            fn wait_us(&mut self, us: u32) {
                self.0.wait_us(us);
            }
        }
        let mut k = Keeps(Fake::new(false, Some(true)));
        let r = reset(&mut k, &BARS).unwrap();
        assert_eq!(r.method, Method::PowerState);
        assert_eq!(r.reset_seen, Some(false));
        assert_eq!(r.command_after_reset, 0x0402);
        assert!(r.to_string().contains("reset D3hot->D0 (command after 0x0402: NO reset seen, its state may survive), BARs restored"), "{r}");
        // Its BARs kept their addresses: restored all the same.
        assert!(r.ok());
    }

    #[test]
    fn a_function_without_either_is_quiesced_and_says_it_was_not_reset() {
        // No_Soft_Reset set: D3hot would keep its state; no FLR.
        for pm in [Some(false), None] {
            let mut f = Fake::new(false, pm);
            let r = reset(&mut f, &BARS).unwrap();
            assert_eq!((f.flrs, f.d3), (0, 0));
            assert_eq!(r.method, Method::None);
            assert_eq!(f.waited_us, 0);
            assert!(r.ok());
            assert_eq!(f.regs[&4] & 0xffff, 0x0402);
            assert!(r.to_string().contains("reset none, BARs restored"), "{r}");
        }
    }

    #[test]
    fn pending_transactions_are_waited_for_at_most_100_ms() {
        let mut f = Fake::new(true, None);
        f.pending = 3;
        let r = reset(&mut f, &BARS).unwrap();
        assert!(!r.pending_timeout);
        assert_eq!(f.flrs, 1);
        let mut f = Fake::new(true, None);
        f.pending = 1000;
        let r = reset(&mut f, &BARS).unwrap();
        assert!(r.pending_timeout, "{r}");
        assert_eq!(f.flrs, 1, "the FLR goes ahead");
    }

    #[test]
    fn a_function_that_does_not_come_back_is_reported() {
        let f = Fake::new(true, None);
        // It answers all ones for longer than a second after the FLR.
        struct Dead(Fake);
        impl FunctionConfig for Dead {
            fn read32(&mut self, reg: u16) -> u32 {
                if self.0.flrs > 0 {
                    u32::MAX
                } else {
                    self.0.read32(reg)
                }
            }
            fn write32(&mut self, reg: u16, value: u32) {
                self.0.write32(reg, value);
            }
            fn write16(&mut self, reg: u16, value: u16) {
                self.0.write16(reg, value);
            }
            fn wait_us(&mut self, us: u32) {
                self.0.wait_us(us);
            }
        }
        let mut d = Dead(f);
        let r = reset(&mut d, &BARS).unwrap();
        assert!(r.not_back && !r.ok(), "{r}");
        assert!(d.0.waited_us <= 100_000 + 1_010_000);
    }

    #[test]
    fn nothing_there_is_not_touched() {
        struct Absent(u32);
        impl FunctionConfig for Absent {
            fn read32(&mut self, _: u16) -> u32 {
                u32::MAX
            }
            fn write32(&mut self, _: u16, _: u32) {
                self.0 += 1;
            }
            fn write16(&mut self, _: u16, _: u16) {
                self.0 += 1;
            }
            fn wait_us(&mut self, _: u32) {}
        }
        let mut a = Absent(0);
        assert!(reset(&mut a, &BARS).is_none());
        assert_eq!(a.0, 0);
    }

    #[test]
    fn a_looping_capability_list_ends() {
        let mut f = Fake::new(false, None);
        f.regs.insert(0x40, 0x0081_4005);
        assert_eq!(find_capability(&mut f, CAP_PCIE), None);
        assert_eq!(find_capability(&mut f, CAP_MSI), Some(0x40));
    }
}
