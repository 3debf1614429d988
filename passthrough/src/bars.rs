//! BAR sizing, bridge windows and the VF BAR space an SR-IOV PF needs.
//!
//! Sizing writes all ones to a BAR and reads back which address bits the
//! device implements, so decoding is switched off around it (the Command
//! register's I/O and Memory Space bits for a function's BARs, VF MSE for
//! VF BARs) and every register is restored. Pure logic over
//! [`ConfigWrite`]; the loader runs it on real ECAM with interrupts masked.
// Register fields are shifted and masked to their width before narrowing.
#![allow(clippy::cast_possible_truncation)]
use crate::pci::{Bdf, ConfigSpace, Function};
use alloc::vec::Vec;
use thinhv_sriov::reg as sreg;

/// Configuration space that can also be written.
pub trait ConfigWrite: ConfigSpace {
    /// Writes a naturally aligned dword at `offset` (< 4096).
    fn write32(&mut self, bdf: Bdf, offset: u16, value: u32);
}

/// What a BAR decodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BarKind {
    /// 32-bit memory.
    #[default]
    Mem32,
    /// 64-bit memory (uses two registers).
    Mem64,
    /// I/O space.
    Io,
}

/// One implemented BAR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bar {
    /// Register index (0..6); a 64-bit BAR also uses `index + 1`.
    pub index: u8,
    /// Space and width.
    pub kind: BarKind,
    /// Prefetchable memory.
    pub prefetchable: bool,
    /// Address the firmware assigned (0: none).
    pub base: u64,
    /// Size in bytes (a power of two).
    pub size: u64,
}

impl Bar {
    /// The register's low flag bits (as [`thinhv_abi::status::BarRecord`]
    /// keeps them): bit 0 I/O, bits 2:1 = 2 for 64-bit, bit 3 prefetchable.
    pub fn flag_bits(&self) -> u64 {
        match self.kind {
            BarKind::Io => 1,
            BarKind::Mem64 => 4 | if self.prefetchable { 8 } else { 0 },
            BarKind::Mem32 => {
                if self.prefetchable {
                    8
                } else {
                    0
                }
            }
        }
    }
}

/// Command register: I/O Space and Memory Space enables.
const CMD_DECODE: u32 = 0b11;

/// Sizes `count` BAR registers starting at `first`, restoring each one.
fn size_array(cfg: &mut impl ConfigWrite, bdf: Bdf, first: u16, count: u8) -> Vec<Bar> {
    let mut out = Vec::new();
    let mut i = 0u8;
    while i < count {
        let reg = first + 4 * u16::from(i);
        let orig = cfg.read32(bdf, reg);
        if orig & 1 == 1 {
            cfg.write32(bdf, reg, u32::MAX);
            let v = cfg.read32(bdf, reg);
            cfg.write32(bdf, reg, orig);
            let mask = v & !0x3;
            // I/O BARs may implement only 16 address bits.
            let mask = if mask & 0xffff_0000 == 0 {
                mask | 0xffff_0000
            } else {
                mask
            };
            if v & !0x3 != 0 {
                out.push(Bar {
                    index: i,
                    kind: BarKind::Io,
                    prefetchable: false,
                    base: u64::from(orig & !0x3),
                    size: u64::from((!mask).wrapping_add(1)),
                });
            }
            i += 1;
            continue;
        }
        let wide = (orig >> 1) & 3 == 2 && i + 1 < count;
        let prefetchable = orig & 8 != 0;
        let (mask, base) = if wide {
            let hi_reg = reg + 4;
            let orig_hi = cfg.read32(bdf, hi_reg);
            cfg.write32(bdf, reg, u32::MAX);
            cfg.write32(bdf, hi_reg, u32::MAX);
            let lo = cfg.read32(bdf, reg);
            let hi = cfg.read32(bdf, hi_reg);
            cfg.write32(bdf, reg, orig);
            cfg.write32(bdf, hi_reg, orig_hi);
            (
                (u64::from(hi) << 32) | u64::from(lo & !0xf),
                (u64::from(orig_hi) << 32) | u64::from(orig & !0xf),
            )
        } else {
            cfg.write32(bdf, reg, u32::MAX);
            let lo = cfg.read32(bdf, reg);
            cfg.write32(bdf, reg, orig);
            (
                u64::from(lo & !0xf) | 0xffff_ffff_0000_0000,
                u64::from(orig & !0xf),
            )
        };
        let size = (!mask).wrapping_add(1);
        if mask != 0xffff_ffff_0000_0000 && mask != 0 && size != 0 {
            out.push(Bar {
                index: i,
                kind: if wide { BarKind::Mem64 } else { BarKind::Mem32 },
                prefetchable,
                base,
                size,
            });
        }
        i += if wide { 2 } else { 1 };
    }
    out
}

/// Sizes the function's BARs (6 for a type-0 header, 2 for a bridge) and,
/// for an SR-IOV PF, its VF BARs (size per VF). Decoding is off while a
/// BAR holds all ones; every register is restored.
pub fn size_function(cfg: &mut impl ConfigWrite, f: &mut Function) {
    let count = match f.header_type {
        0 => 6,
        1 => 2,
        _ => 0,
    };
    if count > 0 {
        let cmd = cfg.read32(f.bdf, 0x04);
        if cmd & CMD_DECODE != 0 {
            // Only the Command half: writing back the Status half's
            // write-one-to-clear bits would clear them.
            cfg.write32(f.bdf, 0x04, cmd & 0xffff & !CMD_DECODE);
        }
        f.bars = size_array(cfg, f.bdf, 0x10, count);
        if cmd & CMD_DECODE != 0 {
            cfg.write32(f.bdf, 0x04, cmd & 0xffff);
        }
    }
    if let Some(cap) = f.sriov {
        let ctl_reg = cap.offset + sreg::CONTROL as u16;
        let ctl = cfg.read32(f.bdf, ctl_reg);
        let vf_mse = 1u32 << 3;
        if ctl & vf_mse != 0 {
            cfg.write32(f.bdf, ctl_reg, ctl & 0xffff & !vf_mse);
        }
        f.vf_bars = size_array(cfg, f.bdf, cap.offset + sreg::VF_BAR0 as u16, 6);
        if ctl & vf_mse != 0 {
            cfg.write32(f.bdf, ctl_reg, ctl & 0xffff);
        }
    }
}

/// A bridge's forwarding windows (inclusive ranges), as programmed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Windows {
    /// Non-prefetchable memory window.
    pub mem: Option<(u64, u64)>,
    /// Prefetchable memory window.
    pub pref: Option<(u64, u64)>,
}

/// Reads a type-1 header's memory windows.
pub fn bridge_windows(cfg: &impl ConfigSpace, bdf: Bdf) -> Windows {
    let m = cfg.read32(bdf, 0x20);
    let mem_base = u64::from(m & 0xfff0) << 16;
    let mem_limit = (u64::from((m >> 16) & 0xfff0) << 16) | 0xf_ffff;
    let p = cfg.read32(bdf, 0x24);
    let wide = p & 0xf == 1;
    let (hi_base, hi_limit) = if wide {
        (
            u64::from(cfg.read32(bdf, 0x28)),
            u64::from(cfg.read32(bdf, 0x2c)),
        )
    } else {
        (0, 0)
    };
    let pref_base = (hi_base << 32) | (u64::from(p & 0xfff0) << 16);
    let pref_limit = (hi_limit << 32) | (u64::from((p >> 16) & 0xfff0) << 16) | 0xf_ffff;
    Windows {
        mem: (mem_base <= mem_limit).then_some((mem_base, mem_limit)),
        pref: (pref_base <= pref_limit).then_some((pref_base, pref_limit)),
    }
}

/// Whether the VF BARs of a PF fit where the firmware put them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VfSpace {
    /// Not a PF, or no VF BARs.
    None,
    /// Every VF BAR, times the VF count, lies inside the parent bridge's
    /// window.
    Fits,
    /// The firmware assigned VF BAR `bar` no address.
    Unassigned {
        /// VF BAR index.
        bar: u8,
    },
    /// VF BAR `bar` needs `needed` bytes from `base`, beyond the window.
    NoRoom {
        /// VF BAR index.
        bar: u8,
        /// Bytes for all the VFs.
        needed: u64,
        /// Where the firmware put VF BAR `bar`.
        base: u64,
        /// The window it should lie in (inclusive), if the bridge has one.
        window: Option<(u64, u64)>,
    },
    /// The PF sits on a root bus: the host bridge's window (ACPI `_CRS`)
    /// is not checked.
    RootBus,
}

/// Bytes the VF BARs need for `vfs` VFs.
pub fn vf_bar_space(pf: &Function, vfs: u16) -> u64 {
    thinhv_sriov::vf_bar_space(pf.vf_bars.iter().map(|b| b.size), vfs)
}

/// Checks the VF BAR space of `pf` for `vfs` VFs against the window of the
/// bridge above it (`parent`; `None` for a root-bus function).
pub fn check_vf_space(pf: &Function, parent: Option<&Function>, vfs: u16) -> VfSpace {
    if pf.sriov.is_none() || pf.vf_bars.is_empty() || vfs == 0 {
        return VfSpace::None;
    }
    if let Some(b) = pf.vf_bars.iter().find(|b| b.base == 0) {
        return VfSpace::Unassigned { bar: b.index };
    }
    let Some(parent) = parent else {
        return VfSpace::RootBus;
    };
    let w = parent.windows.unwrap_or_default();
    for b in &pf.vf_bars {
        let needed = b.size.saturating_mul(u64::from(vfs));
        let last = b.base.saturating_add(needed - 1);
        let inside = |win: Option<(u64, u64)>| win.is_some_and(|(s, e)| b.base >= s && last <= e);
        let ok = inside(w.mem) || (b.prefetchable && inside(w.pref));
        if !ok {
            let window = if b.prefetchable && w.pref.is_some() {
                w.pref
            } else {
                w.mem
            };
            return VfSpace::NoRoom {
                bar: b.index,
                needed,
                base: b.base,
                window,
            };
        }
    }
    VfSpace::Fits
}

/// The bridge whose secondary bus is `bus`, if any.
pub fn parent_of(functions: &[Function], bdf: Bdf) -> Option<&Function> {
    functions
        .iter()
        .find(|f| f.bdf.segment == bdf.segment && f.bridge_buses.is_some_and(|(s, _)| s == bdf.bus))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::tests_support::FakeConfig;
    use thinhv_sriov::SriovCap;

    const NIC: Bdf = Bdf::new(0, 1, 0, 0);

    /// An igb-like PF: BAR0 128 KiB, BAR2 32-byte I/O, BAR3 16 KiB; VF BAR0
    /// and VF BAR3 16 KiB each, 64-bit prefetchable.
    fn igb(c: &mut FakeConfig) {
        c.endpoint(NIC, 0x10c9_8086, 0x0200_0001, true);
        c.set(NIC, 0x04, (1 << 20) | 0x7);
        c.bar(NIC, 0x10, 0xfe80_0000, 128 << 10);
        c.bar(NIC, 0x18, 0xc001, 32);
        c.bar(NIC, 0x1c, 0xfe82_0000, 16 << 10);
        c.set(NIC, 0x160, 0x0001_0010);
        c.set(NIC, 0x160 + 0x0c, 8 << 16 | 8);
        c.set(NIC, 0x160 + 0x14, 0x0002_0080);
        c.bar(NIC, 0x160 + 0x24, 0x8_0000_000c, 16 << 10);
        c.bar(NIC, 0x160 + 0x30, 0x8_0002_000c, 16 << 10);
    }

    fn function(c: &mut FakeConfig) -> Function {
        let mut bytes = [0u8; thinhv_sriov::CAP_SIZE];
        for (i, ch) in bytes.chunks_mut(4).enumerate() {
            ch.copy_from_slice(&c.read32(NIC, 0x160 + 4 * i as u16).to_le_bytes());
        }
        let mut f = crate::pci::probe(&*c, NIC).unwrap();
        f.sriov = SriovCap::parse(0x160, &bytes).ok();
        size_function(c, &mut f);
        f
    }

    #[test]
    fn sizes_bars_and_vf_bars_and_restores_everything() {
        let mut c = FakeConfig::default();
        igb(&mut c);
        let before = c.dwords.clone();
        let f = function(&mut c);
        let nonzero = |m: &std::collections::BTreeMap<(Bdf, u16), u32>| {
            m.iter()
                .filter(|e| *e.1 != 0)
                .map(|(k, v)| (*k, *v))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            nonzero(&c.dwords),
            nonzero(&before),
            "every register restored"
        );
        assert_eq!(
            f.bars,
            [
                Bar {
                    index: 0,
                    kind: BarKind::Mem32,
                    prefetchable: false,
                    base: 0xfe80_0000,
                    size: 128 << 10
                },
                Bar {
                    index: 2,
                    kind: BarKind::Io,
                    prefetchable: false,
                    base: 0xc000,
                    size: 32
                },
                Bar {
                    index: 3,
                    kind: BarKind::Mem32,
                    prefetchable: false,
                    base: 0xfe82_0000,
                    size: 16 << 10
                },
            ]
        );
        assert_eq!(f.vf_bars.len(), 2);
        assert_eq!(f.vf_bars[0].kind, BarKind::Mem64);
        assert!(f.vf_bars[0].prefetchable);
        assert_eq!(f.vf_bars[0].base, 0x8_0000_0000);
        assert_eq!(f.vf_bars[1].index, 3);
        assert_eq!(vf_bar_space(&f, 8), 2 * 8 * (16 << 10));
        assert_eq!(vf_bar_space(&f, 2), 2 * 2 * (16 << 10));
        // Decoding was off while BARs held all ones.
        assert!(c.decode_was_off_while_sizing);
    }

    fn root_port(c: &mut FakeConfig, pref: (u64, u64)) -> Function {
        let rp = Bdf::new(0, 0, 1, 0);
        c.bridge(rp, 1, 1);
        c.set(rp, 0x20, 0xfe90_fe80);
        c.set(
            rp,
            0x24,
            (((pref.1 >> 16) as u32 & 0xfff0) << 16)
                | ((pref.0 >> 16) as u32 & 0xfff0)
                | 0x0001_0001,
        );
        c.set(rp, 0x28, (pref.0 >> 32) as u32);
        c.set(rp, 0x2c, (pref.1 >> 32) as u32);
        let mut f = crate::pci::probe(&*c, rp).unwrap();
        f.windows = Some(bridge_windows(&*c, rp));
        f
    }

    #[test]
    fn windows_and_vf_space() {
        let mut c = FakeConfig::default();
        igb(&mut c);
        let pf = function(&mut c);
        let rp = root_port(&mut c, (0x8_0000_0000, 0x8_000f_ffff));
        let w = rp.windows.unwrap();
        assert_eq!(w.mem, Some((0xfe80_0000, 0xfe9f_ffff)));
        assert_eq!(w.pref, Some((0x8_0000_0000, 0x8_000f_ffff)));
        assert_eq!(check_vf_space(&pf, Some(&rp), 8), VfSpace::Fits);
        assert_eq!(check_vf_space(&pf, None, 8), VfSpace::RootBus);
        assert_eq!(check_vf_space(&pf, Some(&rp), 0), VfSpace::None);
        // VF BAR3 placed 64 KiB below the end of a 1 MiB window: room for
        // 4 VFs of 16 KiB, not for 8.
        let mut c2 = FakeConfig::default();
        igb(&mut c2);
        c2.bar(NIC, 0x160 + 0x30, 0x8_000f_000c, 16 << 10);
        let pf2 = function(&mut c2);
        let small = root_port(&mut c2, (0x8_0000_0000, 0x8_000f_ffff));
        assert_eq!(
            check_vf_space(&pf2, Some(&small), 8),
            VfSpace::NoRoom {
                bar: 3,
                needed: 8 * (16 << 10),
                base: 0x8_000f_0000,
                window: Some((0x8_0000_0000, 0x8_000f_ffff)),
            }
        );
        // Two VFs fit the same window.
        assert_eq!(check_vf_space(&pf2, Some(&small), 2), VfSpace::Fits);
        // Firmware that assigned nothing.
        let mut pf3 = pf2.clone();
        pf3.vf_bars[0].base = 0;
        assert_eq!(
            check_vf_space(&pf3, Some(&small), 2),
            VfSpace::Unassigned { bar: 0 }
        );
        let all = [rp.clone(), pf.clone()];
        assert_eq!(parent_of(&all, pf.bdf).map(|f| f.bdf), Some(rp.bdf));
        assert!(parent_of(&all, rp.bdf).is_none());
    }
}
