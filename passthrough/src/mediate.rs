//! What the OS sees of a mediated function's configuration space.
//!
//! The core traps every access to the 4 KiB ECAM page of a mediated
//! function (and every 0xCFC access that addresses it) and asks this module
//! what the access returns or what reaches the device:
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
}

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
    let Policy::VfBudget { cap, os_vfs, .. } = *policy else {
        return WriteOutcome {
            forward: None,
            refused: None,
        };
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

    #[test]
    fn legacy_address_decoding() {
        assert_eq!(cf8_target(0x8001_0010, 0), Some((1, 0, 0x10)));
        assert_eq!(cf8_target(0x8002_0b04, 2), Some((2, 0x0b, 0x06)));
        assert_eq!(cf8_target(0x0001_0010, 0), None);
        // AMD extended: offset bits 11:8 in bits 27:24.
        assert_eq!(cf8_target(0x8101_0060, 3), Some((1, 0, 0x163)));
    }
}
