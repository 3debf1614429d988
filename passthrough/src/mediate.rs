//! What the OS sees of a mediated function's configuration space.
//!
//! The core traps every access to the 4 KiB ECAM page of a mediated
//! function, and every I/O access that touches the legacy configuration
//! ports 0xCF8..=0xCFF (split by [`split_port_access`], the data bytes
//! decoded by [`cf8_target`] against the CPU's own address latch), and asks
//! this module what the access returns or what reaches the device:
//!
//! * A **hidden** function reads as all ones (no device) and drops writes.
//! * A PF with a **VF budget** reads as the device, except InitialVFs and
//!   TotalVFs, which read as the budget (never above what the device
//!   reports). A write that would set NumVFs above the budget is refused
//!   whole; a write that sets VF Enable while NumVFs is above the budget
//!   reaches the device with VF Enable cleared. Every other register,
//!   including the rest of the SR-IOV capability (VF BARs, System Page
//!   Size, VF MSE, ARI), passes through unchanged, so the PF's own driver
//!   works as on bare metal within the budget.
//!
//! * A **guarded bridge** (the one above an NVMe PF thinhv keeps, whose
//!   reset would take every secondary controller offline) reads as the
//!   device; a write that sets Secondary Bus Reset in Bridge Control or
//!   Link Disable in Link Control reaches the device with that bit
//!   cleared. Everything else (windows, bus numbers, the rest of both
//!   registers) is the OS's, which keeps the bridge.
//!
//! Accesses are 1, 2 or 4 bytes at any offset; registers are compared byte
//! by byte, so a dword write that covers NumVFs is judged by its NumVFs
//! bytes.
// Offsets are below 4096 and register fields are masked to their width
// before narrowing.
#![allow(clippy::cast_possible_truncation)]
use thinhv_sriov::reg as sreg;

/// How a function is mediated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Absent for the OS.
    Hidden,
    /// The OS may create at most `os_vfs` VFs.
    VfBudget {
        /// Offset of the SR-IOV capability.
        cap: u16,
        /// TotalVFs as the OS sees it.
        os_vfs: u16,
        /// InitialVFs as the device reports it.
        initial_vfs: u16,
    },
    /// A bridge the OS keeps but may not reset or take the link of.
    BridgeGuard {
        /// Offset of its PCI Express capability (0: none).
        pcie_cap: u16,
    },
}

/// Bridge Control (type 1 header).
pub const BRIDGE_CONTROL: u16 = 0x3e;
/// Bridge Control: Secondary Bus Reset.
pub const SECONDARY_BUS_RESET: u16 = 1 << 6;
/// Link Control, from the PCI Express capability.
pub const LINK_CONTROL: u16 = 0x10;
/// Link Control: Link Disable.
pub const LINK_DISABLE: u16 = 1 << 4;

/// A write thinhv did not let through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// NumVFs above the budget: the whole write was dropped.
    NumVfsAboveBudget {
        /// NumVFs the write asked for.
        asked: u16,
        /// The budget.
        budget: u16,
    },
    /// VF Enable while NumVFs is above the budget: VF Enable was cleared.
    VfEnableAboveBudget {
        /// NumVFs in the device.
        num_vfs: u16,
        /// The budget.
        budget: u16,
    },
    /// Secondary Bus Reset on a guarded bridge: the bit was cleared.
    BridgeReset,
    /// Link Disable on a guarded bridge: the bit was cleared.
    LinkDisable,
}

/// What happens to a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteOutcome {
    /// The value to write to the device (same offset and size), if any.
    pub forward: Option<u32>,
    /// Why the write was changed or dropped, when it was refused.
    pub refused: Option<Refusal>,
}

fn bytes_of(value: u32, size: u8) -> [Option<u8>; 4] {
    let b = value.to_le_bytes();
    core::array::from_fn(|i| (i < usize::from(size)).then_some(b[i]))
}

/// Replaces the bytes of `value` (an access of `size` at `offset`) that
/// fall in the 16-bit register at `reg` with the bytes of `reg_value`.
fn overlay(value: u32, offset: u16, size: u8, reg: u16, reg_value: u16) -> u32 {
    let mut b = value.to_le_bytes();
    for (i, byte) in b.iter_mut().enumerate().take(usize::from(size)) {
        let at = offset + i as u16;
        if (reg..reg + 2).contains(&at) {
            *byte = reg_value.to_le_bytes()[usize::from(at - reg)];
        }
    }
    u32::from_le_bytes(b)
}

/// The all-ones value of an access of `size` bytes.
pub const fn all_ones(size: u8) -> u32 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        _ => u32::MAX,
    }
}

/// The value a read of `size` bytes at `offset` returns to the OS; `real`
/// performs the same read on the device.
pub fn read(policy: &Policy, offset: u16, size: u8, real: impl FnOnce() -> u32) -> u32 {
    match *policy {
        Policy::Hidden => all_ones(size),
        Policy::BridgeGuard { .. } => real(),
        Policy::VfBudget {
            cap,
            os_vfs,
            initial_vfs,
        } => {
            let v = real();
            let v = overlay(
                v,
                offset,
                size,
                cap + sreg::INITIAL_VFS as u16,
                initial_vfs.min(os_vfs),
            );
            overlay(v, offset, size, cap + sreg::TOTAL_VFS as u16, os_vfs)
        }
    }
}

/// Judges a write of `size` bytes of `value` at `offset`. `read16` reads a
/// 16-bit register of the device (for NumVFs).
pub fn write(
    policy: &Policy,
    offset: u16,
    size: u8,
    value: u32,
    read16: impl Fn(u16) -> u16,
) -> WriteOutcome {
    let (cap, os_vfs) = match *policy {
        Policy::VfBudget { cap, os_vfs, .. } => (cap, os_vfs),
        Policy::BridgeGuard { pcie_cap } => return guard_write(pcie_cap, offset, size, value),
        Policy::Hidden => {
            return WriteOutcome {
                forward: None,
                refused: None,
            };
        }
    };
    let bytes = bytes_of(value, size);
    let byte_at = |reg: u16| -> Option<u8> {
        reg.checked_sub(offset)
            .and_then(|i| bytes.get(usize::from(i)).copied().flatten())
    };
    let num_reg = cap + sreg::NUM_VFS as u16;
    let (lo, hi) = (byte_at(num_reg), byte_at(num_reg + 1));
    let current = || read16(num_reg);
    if lo.is_some() || hi.is_some() {
        let cur = current().to_le_bytes();
        let asked = u16::from_le_bytes([lo.unwrap_or(cur[0]), hi.unwrap_or(cur[1])]);
        if asked > os_vfs {
            return WriteOutcome {
                forward: None,
                refused: Some(Refusal::NumVfsAboveBudget {
                    asked,
                    budget: os_vfs,
                }),
            };
        }
    }
    let ctl = cap + sreg::CONTROL as u16;
    if let Some(b) = byte_at(ctl)
        && b & 1 != 0
    {
        let num_vfs = current();
        if num_vfs > os_vfs {
            let bit = 1u32 << ((ctl - offset) * 8);
            return WriteOutcome {
                forward: Some(value & !bit),
                refused: Some(Refusal::VfEnableAboveBudget {
                    num_vfs,
                    budget: os_vfs,
                }),
            };
        }
    }
    WriteOutcome {
        forward: Some(value),
        refused: None,
    }
}

/// A guarded bridge's write: Secondary Bus Reset and Link Disable
/// cleared from whatever bytes of theirs it covers.
fn guard_write(pcie_cap: u16, offset: u16, size: u8, value: u32) -> WriteOutcome {
    let mut forward = value;
    let mut refused = None;
    let mut clear = |reg: u16, bit: u16, why: Refusal| {
        for k in 0..2u16 {
            let at = reg + k;
            let b = (bit >> (8 * k)) as u8;
            if b != 0 && at >= offset && at < offset + u16::from(size) {
                let shift = 8 * u32::from(at - offset);
                if forward & (u32::from(b) << shift) != 0 {
                    forward &= !(u32::from(b) << shift);
                    refused = Some(why);
                }
            }
        }
    };
    clear(BRIDGE_CONTROL, SECONDARY_BUS_RESET, Refusal::BridgeReset);
    if pcie_cap != 0 {
        clear(pcie_cap + LINK_CONTROL, LINK_DISABLE, Refusal::LinkDisable);
    }
    WriteOutcome {
        forward: Some(forward),
        refused,
    }
}

/// The OS's view of a real AMD-Vi unit's own PCI function while the OS
/// drives an emulated unit in its place (`PCI_ACTION_AMDVI_UNIT`):
///
/// * reads are the device's, except that the IOMMU capability header
///   sets NpCache (bit 26): Linux invalidates after creating mappings only
///   where it is set, and the emulated unit's shadows follow the OS's
///   tables at its invalidations;
/// * the MSI capability's Message Control (enable bit), Address, Upper
///   Address and Data are the OS's own copy ([`Msi`]), never the
///   device's: the emulated unit's event interrupt is sent as the OS
///   programmed it there, and the real unit's interrupts stay thinhv's;
/// * every other write is dropped: the OS may not move the real unit's
///   register window (the capability's base address), turn its function
///   off, or reprogram it otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnitFunction {
    /// Offset of the IOMMU capability.
    pub cap: u16,
    /// Offset of the MSI capability (0: none).
    pub msi: u16,
}

/// An MSI capability's registers as the OS programmed them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Msi {
    /// Message Control: the OS's enable bit (0) alone.
    pub control: u16,
    /// Message Address.
    pub addr: u32,
    /// Message Upper Address (64-bit capabilities).
    pub upper: u32,
    /// Message Data.
    pub data: u16,
}

impl Msi {
    /// (address, upper address, data), where the OS enabled it.
    pub const fn message(&self) -> Option<(u32, u32, u32)> {
        if self.control & 1 == 0 {
            return None;
        }
        Some((self.addr, self.upper, self.data as u32))
    }
}

/// The IOMMU capability header's NpCache bit.
const NP_CACHE: u32 = 1 << 26;

impl UnitFunction {
    /// The MSI registers the OS's copy holds: (offset, bytes, which) for
    /// a capability whose real Message Control is `control` (64-bit
    /// address in bit 7).
    fn msi_regs(self, control: u16) -> [(u16, u16, u8); 4] {
        let m = self.msi;
        let data = if control & (1 << 7) != 0 { 12 } else { 8 };
        [
            (m + 2, 2, 0),
            (m + 4, 4, 1),
            (m + 8, if data == 12 { 4 } else { 0 }, 2),
            (m + data, 2, 3),
        ]
    }

    /// Where byte `at` falls in the OS's copy: (register, byte in it).
    fn msi_byte(self, at: u16, control: u16) -> Option<(u8, u16)> {
        if self.msi == 0 {
            return None;
        }
        self.msi_regs(control)
            .iter()
            .find(|&&(o, len, _)| at >= o && at < o + len)
            .map(|&(o, _, which)| (which, at - o))
    }

    /// A read of `size` bytes at `offset`: `real` the device's value,
    /// `control` its MSI Message Control, `msi` the OS's copy.
    pub fn read(self, offset: u16, size: u8, real: u32, control: u16, msi: &Msi) -> u32 {
        let mut b = real.to_le_bytes();
        let np = NP_CACHE.to_le_bytes();
        for (i, byte) in b.iter_mut().enumerate().take(usize::from(size)) {
            let at = offset + i as u16;
            if let Some(k) = at.checked_sub(self.cap).filter(|&k| k < 4) {
                *byte |= np[usize::from(k)];
            }
            if let Some((which, k)) = self.msi_byte(at, control) {
                let k = usize::from(k);
                *byte = match which {
                    // The enable bit is the OS's; the rest, the device's
                    // (what it can do), with one message enabled and no
                    // per-vector masking (its registers are not the OS's).
                    0 if k == 0 => (*byte & !0x71) | (msi.control as u8 & 1),
                    0 => *byte & !0x01,
                    1 => msi.addr.to_le_bytes()[k],
                    2 => msi.upper.to_le_bytes()[k],
                    _ => msi.data.to_le_bytes()[k],
                };
            }
        }
        u32::from_le_bytes(b)
    }

    /// A write of `size` bytes of `value` at `offset`: its bytes in the
    /// MSI registers go to the OS's copy; nothing reaches the device.
    pub fn write(self, offset: u16, size: u8, value: u32, control: u16, msi: &mut Msi) {
        for (i, v) in value
            .to_le_bytes()
            .iter()
            .enumerate()
            .take(usize::from(size))
        {
            let at = offset + i as u16;
            let Some((which, k)) = self.msi_byte(at, control) else {
                continue;
            };
            let set32 = |r: &mut u32| {
                let mut b = r.to_le_bytes();
                b[usize::from(k)] = *v;
                *r = u32::from_le_bytes(b);
            };
            match which {
                0 if k == 0 => msi.control = u16::from(*v & 1),
                0 => {}
                1 => set32(&mut msi.addr),
                2 => set32(&mut msi.upper),
                _ => {
                    let mut b = msi.data.to_le_bytes();
                    b[usize::from(k)] = *v;
                    msi.data = u16::from_le_bytes(b);
                }
            }
        }
    }
}

/// CONFIG_ADDRESS of configuration mechanism #1 (PCI Local Bus
/// Specification 3.0 §3.2.2.3.2): the address latch.
pub const CONFIG_ADDRESS: u16 = 0xcf8;
/// CONFIG_DATA: the data window, 0xCFC..=0xCFF.
pub const CONFIG_DATA: u16 = 0xcfc;
/// The ports the core intercepts while any function is mediated.
pub const CONFIG_PORTS: core::ops::Range<u16> = CONFIG_ADDRESS..CONFIG_DATA + 4;

/// What a piece of an I/O access to the configuration ports is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortRole {
    /// A dword at CONFIG_ADDRESS: the CPU's address latch.
    Address,
    /// Bytes of CONFIG_DATA: a configuration access at the latch's address.
    Data,
    /// Ordinary I/O, performed on the hardware unchanged.
    Plain,
}

/// One piece of an I/O access: `size` bytes at `port`, which are bytes
/// `shift..shift + size` of the value the instruction moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortPiece {
    /// What the bytes are.
    pub role: PortRole,
    /// First port.
    pub port: u16,
    /// 1, 2 or 4.
    pub size: u8,
    /// Byte position in the instruction's value.
    pub shift: u8,
}

/// The pieces of one access, in port order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortPieces {
    pieces: [PortPiece; 4],
    len: usize,
}

impl PortPieces {
    /// The pieces.
    pub fn as_slice(&self) -> &[PortPiece] {
        &self.pieces[..self.len]
    }

    fn push(&mut self, role: PortRole, port: u16, size: u8, shift: u8) {
        if let Some(p) = self.pieces.get_mut(self.len) {
            *p = PortPiece {
                role,
                port,
                size,
                shift,
            };
            self.len += 1;
        }
    }
}

/// Splits an IN or OUT of `size` (1, 2 or 4) bytes at `port` the way a PC
/// chipset sees it (PCI Local Bus Specification 3.0 §3.2.2.3.2):
///
/// * Only a dword access at 0xCF8 is CONFIG_ADDRESS. Any other access to
///   0xCF8..=0xCFB "has no impact on CONFIG_ADDRESS" and is ordinary I/O
///   (0xCF9 is the reset control register on PC chipsets): [`PortRole::Plain`].
/// * Bytes in 0xCFC..=0xCFF are CONFIG_DATA: [`PortRole::Data`], whatever
///   the access started at. An access that straddles the window (a dword
///   at 0xCFA, a word at 0xCFB or 0xCFF) reaches the bus as separate cycles
///   — the processor splits an I/O access that is not aligned to its size
///   (Intel SDM Vol. 1 §19.3) — so the bytes inside the window are a
///   configuration access of their own and the bytes outside are ordinary
///   I/O.
///
/// A run of one role is one piece when it is 1, 2 or 4 bytes long and a
/// byte plus a word (each naturally aligned) when it is 3.
pub fn split_port_access(port: u16, size: u8) -> PortPieces {
    let mut out = PortPieces {
        pieces: [PortPiece {
            role: PortRole::Plain,
            port,
            size,
            shift: 0,
        }; 4],
        len: 0,
    };
    if port == CONFIG_ADDRESS && size == 4 {
        out.push(PortRole::Address, port, size, 0);
        return out;
    }
    let role_at = |i: u8| {
        let p = u32::from(port) + u32::from(i);
        if (u32::from(CONFIG_DATA)..u32::from(CONFIG_DATA) + 4).contains(&p) {
            PortRole::Data
        } else {
            PortRole::Plain
        }
    };
    let mut start = 0u8;
    while start < size {
        let role = role_at(start);
        let mut end = start + 1;
        while end < size && role_at(end) == role {
            end += 1;
        }
        let first = port.wrapping_add(u16::from(start));
        match end - start {
            3 if first % 2 == 0 => {
                out.push(role, first, 2, start);
                out.push(role, first.wrapping_add(2), 1, start + 2);
            }
            3 => {
                out.push(role, first, 1, start);
                out.push(role, first.wrapping_add(1), 2, start + 1);
            }
            n => out.push(role, first, n, start),
        }
        start = end;
    }
    out
}

/// Decodes the legacy configuration address (port 0xCF8) for an access to
/// data port `0xCFC + byte`: (bus, devfn, offset), or `None` when the
/// enable bit is clear. Bits 27:24 carry offset bits 11:8 (AMD's extended
/// configuration access); elsewhere they are zero.
pub const fn cf8_target(cf8: u32, byte: u8) -> Option<(u8, u8, u16)> {
    if cf8 & (1 << 31) == 0 {
        return None;
    }
    let offset = (cf8 & 0xfc) as u16 | (((cf8 >> 16) & 0xf00) as u16) | (byte & 3) as u16;
    Some(((cf8 >> 16) as u8, (cf8 >> 8) as u8, offset))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn a_guarded_bridge_is_never_reset_nor_its_link_disabled() {
        let guard = Policy::BridgeGuard { pcie_cap: 0x40 };
        let w = |offset, size, value| write(&guard, offset, size, value, |_| 0);
        // Bridge Control as a word, as the high half of the dword at 0x3c
        // (interrupt line and pin below it) and as its low byte: SBR
        // cleared, the rest as written.
        assert_eq!(
            w(0x3e, 2, 0x0043),
            WriteOutcome {
                forward: Some(0x0003),
                refused: Some(Refusal::BridgeReset)
            }
        );
        assert_eq!(w(0x3c, 4, 0x0052_010b).forward, Some(0x0012_010b));
        assert_eq!(w(0x3e, 1, 0x40).forward, Some(0));
        assert_eq!(w(0x3f, 1, 0x40).forward, Some(0x40), "bit 14: not SBR");
        // Link Disable in Link Control (0x40 + 0x10), alone and in the
        // dword with Link Status; Retrain Link passes.
        assert_eq!(
            w(0x50, 4, 0x0000_0030),
            WriteOutcome {
                forward: Some(0x0000_0020),
                refused: Some(Refusal::LinkDisable)
            }
        );
        assert_eq!(w(0x50, 2, 0x0020).refused, None);
        // The rest of the bridge is the OS's; reads are the device's.
        assert_eq!(
            w(0x18, 4, 0x0002_0100),
            WriteOutcome {
                forward: Some(0x0002_0100),
                refused: None
            }
        );
        assert_eq!(read(&guard, 0x3e, 2, || 0x43), 0x43);
        // Without a PCI Express capability only Bridge Control is judged.
        let plain = Policy::BridgeGuard { pcie_cap: 0 };
        assert_eq!(write(&plain, 0x10, 2, 0x10, |_| 0).forward, Some(0x10));
    }

    const CAP: u16 = 0x160;
    const BUDGET: Policy = Policy::VfBudget {
        cap: CAP,
        os_vfs: 2,
        initial_vfs: 8,
    };

    /// The SR-IOV capability bytes of an igb PF with 8 VFs.
    fn device_read(offset: u16, size: u8) -> u32 {
        let mut space = [0u8; 4096];
        space[0x160..0x164].copy_from_slice(&0x0001_0010u32.to_le_bytes());
        space[0x16c..0x170].copy_from_slice(&0x0008_0008u32.to_le_bytes());
        space[0x170..0x174].copy_from_slice(&0x0000_0000u32.to_le_bytes());
        space[0x174..0x178].copy_from_slice(&0x0002_0080u32.to_le_bytes());
        let o = usize::from(offset);
        let mut b = [0u8; 4];
        b[..usize::from(size)].copy_from_slice(&space[o..o + usize::from(size)]);
        u32::from_le_bytes(b)
    }

    /// QEMU's AMD-Vi function: the IOMMU capability at 0x40 (header
    /// 0x0f, CapType 3, IOTLB and EFRSup, NpCache clear as on hardware),
    /// a 64-bit MSI capability at 0x54.
    const UNIT: UnitFunction = UnitFunction {
        cap: 0x40,
        msi: 0x54,
    };
    const MSI64: u16 = 1 << 7;

    #[test]
    fn an_amdvi_units_function_shows_npcache_and_keeps_the_oss_msi_to_itself() {
        let mut msi = Msi::default();
        // NpCache in the header, whatever the width of the read.
        let header = 0x0903_000f_u32;
        assert_eq!(UNIT.read(0x40, 4, header, MSI64, &msi), header | (1 << 26));
        assert_eq!(UNIT.read(0x43, 1, header >> 24, MSI64, &msi), 0x0d);
        assert_eq!(UNIT.read(0x40, 2, header & 0xffff, MSI64, &msi), 0x000f);
        // Linux's pci_enable_msi: address, upper, data, then enable; the
        // capability reads back what it wrote, the device never sees it.
        UNIT.write(0x58, 4, 0xfee0_1000, MSI64, &mut msi);
        UNIT.write(0x5c, 4, 0, MSI64, &mut msi);
        UNIT.write(0x60, 2, 0x4041, MSI64, &mut msi);
        assert_eq!(msi.message(), None, "not enabled yet");
        UNIT.write(0x56, 2, 0x0081, MSI64, &mut msi);
        assert_eq!(msi.message(), Some((0xfee0_1000, 0, 0x4041)));
        // Reads: the OS's copy over the device's (which holds thinhv's or
        // nothing); Message Control's capability bits stay the device's.
        let real = 0x0080_7005; // control 0x0080 (64-bit), next 0x70, id 5
        assert_eq!(UNIT.read(0x54, 4, real, MSI64, &msi), 0x0081_7005);
        assert_eq!(UNIT.read(0x58, 4, 0xdead_beef, MSI64, &msi), 0xfee0_1000);
        assert_eq!(UNIT.read(0x60, 2, 0xffff, MSI64, &msi), 0x4041);
        assert_eq!(UNIT.read(0x61, 1, 0xff, MSI64, &msi), 0x40);
        // Multiple Message Enable is not the OS's: one message, whatever
        // the device can do (Multiple Message Capable 3: eight), and no
        // per-vector masking shown (bit 8).
        UNIT.write(0x56, 1, 0x71, MSI64, &mut msi);
        assert_eq!(msi.control, 1);
        assert_eq!(UNIT.read(0x56, 2, 0x01f7, MSI64, &msi), 0x0087);
        // A 32-bit capability: data right after the address.
        let mut m32 = Msi::default();
        UNIT.write(0x5c, 2, 0x22, 0, &mut m32);
        assert_eq!((m32.data, m32.upper), (0x22, 0));
        // Everything else: no change to the copy (the caller forwards
        // nothing), e.g. the capability's base address or Command.
        let before = msi;
        UNIT.write(0x44, 4, 0xfed0_0001, MSI64, &mut msi);
        UNIT.write(0x04, 2, 0, MSI64, &mut msi);
        assert_eq!(msi, before);
        // Control off again.
        UNIT.write(0x56, 1, 0, MSI64, &mut msi);
        assert_eq!(msi.message(), None);
    }

    #[test]
    fn hidden_reads_all_ones_and_drops_writes() {
        let called = Cell::new(false);
        for size in [1, 2, 4] {
            let v = read(&Policy::Hidden, 0, size, || {
                called.set(true);
                0
            });
            assert_eq!(v, all_ones(size));
        }
        assert!(!called.get(), "the device is never read");
        let w = write(&Policy::Hidden, 4, 2, 0x6, |_| unreachable!());
        assert_eq!(
            w,
            WriteOutcome {
                forward: None,
                refused: None
            }
        );
    }

    #[test]
    fn budget_reads_every_width_and_alignment() {
        let r = |o: u16, s: u8| read(&BUDGET, o, s, || device_read(o, s));
        // InitialVFs and TotalVFs read as the budget, as a dword…
        assert_eq!(r(0x16c, 4), 0x0002_0002);
        // …as words and bytes…
        assert_eq!(r(0x16c, 2), 2);
        assert_eq!(r(0x16e, 2), 2);
        assert_eq!(r(0x16e, 1), 2);
        assert_eq!(r(0x16f, 1), 0);
        // …and unaligned across the two.
        assert_eq!(r(0x16d, 2), 0x0200);
        // Everything else is the device's.
        assert_eq!(r(0x160, 4), 0x0001_0010);
        assert_eq!(r(0x174, 4), 0x0002_0080);
        assert_eq!(r(0x0, 4), 0);
        // A device that reports fewer InitialVFs than the budget keeps them.
        let p = Policy::VfBudget {
            cap: CAP,
            os_vfs: 4,
            initial_vfs: 1,
        };
        assert_eq!(read(&p, 0x16c, 4, || device_read(0x16c, 4)), 0x0004_0001);
    }

    #[test]
    fn budget_writes() {
        let num = Cell::new(0u16);
        let read16 = |_| num.get();
        // NumVFs within the budget passes, as a word or as a dword that
        // also covers the read-only Function Dependency Link.
        assert_eq!(write(&BUDGET, 0x170, 2, 2, read16).forward, Some(2));
        assert_eq!(write(&BUDGET, 0x170, 4, 1, read16).forward, Some(1));
        // Above it: refused whole.
        let w = write(&BUDGET, 0x170, 2, 3, read16);
        assert_eq!(w.forward, None);
        assert_eq!(
            w.refused,
            Some(Refusal::NumVfsAboveBudget {
                asked: 3,
                budget: 2
            })
        );
        // The high byte alone can push it above.
        num.set(1);
        assert!(write(&BUDGET, 0x171, 1, 1, read16).refused.is_some());
        // VF Enable with NumVFs within the budget passes…
        num.set(2);
        assert_eq!(write(&BUDGET, 0x168, 2, 0x19, read16).forward, Some(0x19));
        // …above it (set before thinhv, or by a broken device) it is
        // cleared, the rest of the write kept.
        num.set(7);
        let w = write(&BUDGET, 0x168, 2, 0x19, read16);
        assert_eq!(w.forward, Some(0x18));
        assert_eq!(
            w.refused,
            Some(Refusal::VfEnableAboveBudget {
                num_vfs: 7,
                budget: 2
            })
        );
        // The same through a dword write at the capability's Control.
        assert_eq!(
            write(&BUDGET, 0x168, 4, 0x0000_0019, read16).forward,
            Some(0x18)
        );
        // Clearing VF Enable is always allowed.
        assert_eq!(write(&BUDGET, 0x168, 2, 0x18, read16).refused, None);
        // Writes elsewhere pass untouched.
        assert_eq!(
            write(&BUDGET, 0x184, 4, u32::MAX, read16).forward,
            Some(u32::MAX)
        );
    }

    fn pieces(port: u16, size: u8) -> Vec<(PortRole, u16, u8, u8)> {
        split_port_access(port, size)
            .as_slice()
            .iter()
            .map(|p| (p.role, p.port, p.size, p.shift))
            .collect()
    }

    #[test]
    fn port_accesses_split_where_a_chipset_splits_them() {
        use PortRole::{Address, Data, Plain};
        // The latch is a dword at 0xCF8, nothing else.
        assert_eq!(pieces(0xcf8, 4), [(Address, 0xcf8, 4, 0)]);
        for (port, size) in [(0xcf8, 1), (0xcf9, 1), (0xcf8, 2), (0xcfa, 2), (0xcfb, 1)] {
            assert_eq!(
                pieces(port, size),
                [(Plain, port, size, 0)],
                "{port:#x}/{size}"
            );
        }
        // Inside the data window: one configuration access as issued.
        for (port, size) in [(0xcfc, 4), (0xcfd, 1), (0xcfd, 2), (0xcfe, 2), (0xcff, 1)] {
            assert_eq!(
                pieces(port, size),
                [(Data, port, size, 0)],
                "{port:#x}/{size}"
            );
        }
        // Straddling the window's start…
        assert_eq!(
            pieces(0xcfa, 4),
            [(Plain, 0xcfa, 2, 0), (Data, 0xcfc, 2, 2)]
        );
        assert_eq!(
            pieces(0xcfb, 2),
            [(Plain, 0xcfb, 1, 0), (Data, 0xcfc, 1, 1)]
        );
        assert_eq!(
            pieces(0xcf9, 4),
            [
                (Plain, 0xcf9, 1, 0),
                (Plain, 0xcfa, 2, 1),
                (Data, 0xcfc, 1, 3)
            ]
        );
        assert_eq!(
            pieces(0xcfb, 4),
            [
                (Plain, 0xcfb, 1, 0),
                (Data, 0xcfc, 2, 1),
                (Data, 0xcfe, 1, 3)
            ]
        );
        // …and its end.
        assert_eq!(
            pieces(0xcfd, 4),
            [
                (Data, 0xcfd, 1, 0),
                (Data, 0xcfe, 2, 1),
                (Plain, 0xd00, 1, 3)
            ]
        );
        assert_eq!(
            pieces(0xcff, 2),
            [(Data, 0xcff, 1, 0), (Plain, 0xd00, 1, 1)]
        );
        assert_eq!(
            pieces(0xcfe, 4),
            [(Data, 0xcfe, 2, 0), (Plain, 0xd00, 2, 2)]
        );
        // Accesses that only touch the latch's bytes stay whole.
        assert_eq!(pieces(0xcf6, 4), [(Plain, 0xcf6, 4, 0)]);
        assert_eq!(pieces(0xcf7, 2), [(Plain, 0xcf7, 2, 0)]);
        // Every byte lands in exactly one piece, in order.
        for port in 0xcf5..0xd00u16 {
            for size in [1u8, 2, 4] {
                let mut next = 0;
                for p in split_port_access(port, size).as_slice() {
                    assert_eq!(p.shift, next, "{port:#x}/{size}");
                    assert_eq!(p.port, port + u16::from(p.shift));
                    assert!(matches!(p.size, 1 | 2 | 4));
                    next += p.size;
                }
                assert_eq!(next, size, "{port:#x}/{size}");
            }
        }
        assert!(CONFIG_PORTS.contains(&0xcf9) && !CONFIG_PORTS.contains(&0xd00));
    }

    #[test]
    fn legacy_address_decoding() {
        assert_eq!(cf8_target(0x8001_0010, 0), Some((1, 0, 0x10)));
        assert_eq!(cf8_target(0x8002_0b04, 2), Some((2, 0x0b, 0x06)));
        assert_eq!(cf8_target(0x0001_0010, 0), None);
        // AMD extended: offset bits 11:8 in bits 27:24.
        assert_eq!(cf8_target(0x8101_0060, 3), Some((1, 0, 0x163)));
    }
}
