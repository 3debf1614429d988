//! An SR-IOV PF the OS owns while an appliance owns one of its VFs
//! (`docs/appliances.md`, "VFs"): what the OS sees of the SR-IOV
//! capability, and what thinhv writes to the device.
//!
//! VF Enable and NumVFs are one switch and one count for all of a PF's
//! VFs, so the OS cannot be given them: clearing VF Enable (Linux does
//! at enumeration, on `sriov_numvfs` 0 and when its PF driver unloads)
//! or writing NumVFs below the appliance's VF index would take the
//! appliance's VF away; moving the VF BARs or the System Page Size would
//! move its registers. The device keeps what the loader set up
//! ([`Setup`]): VF Enable and VF MSE on, NumVFs up to the highest VF an
//! appliance has, the firmware's VF BARs. The OS reads and writes a
//! [`View`] of those registers, as its own device would behave within its
//! budget (VFs `1..=os_vfs`): VF BAR sizing works, NumVFs above the
//! budget is refused whole. Every other register passes through.
//!
//! What this cannot keep from the OS is a reset of the PF: a Function
//! Level Reset (or a Secondary Bus Reset above it) clears VF Enable in the
//! device, which takes every VF, the appliance's too (PCIe Base 6.0
//! §9.2.2.3: a PF's FLR resets its VFs). thinhv sees the PF's
//! capability come back without VF Enable ([`Setup::lost`]), writes the
//! setup again ([`Setup::provision`]) and restarts the appliance, whose
//! VF lost its state.
// Offsets are below 4096; register fields are masked to their width
// before narrowing.
#![allow(clippy::cast_possible_truncation)]
use crate::bars::BarKind;
use crate::mediate::{Refusal, all_ones};
use crate::pci::{Bdf, CAP_ID_PCIE, ConfigSpace, Function, extended_caps, legacy_caps};
use alloc::vec::Vec;
use thinhv_sriov::{CONTROL_VF_ENABLE, SriovCap, reg as sreg};

/// SR-IOV Control: VF Memory Space Enable.
pub const CONTROL_VF_MSE: u16 = 1 << 3;
/// SR-IOV Control: ARI Capable Hierarchy.
pub const CONTROL_ARI: u16 = 1 << 4;

/// What the device holds, as the loader set it up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Setup {
    /// Offset of the SR-IOV capability.
    pub cap: u16,
    /// The OS's budget: VFs `1..=os_vfs` are its.
    pub os_vfs: u16,
    /// InitialVFs as the device reports it.
    pub initial_vfs: u16,
    /// NumVFs in the device: at least the highest VF an appliance has.
    pub num_vfs: u16,
    /// SR-IOV Control in the device (VF Enable, VF MSE, ARI as found).
    pub control: u16,
    /// System Page Size in the device.
    pub page_size: u32,
    /// VF BAR registers in the device.
    pub vf_bars: [u32; 6],
    /// Per VF BAR register, the bits a write sets (the address bits the
    /// per-VF size leaves; 0 for a register not implemented).
    pub vf_bar_masks: [u32; 6],
}

/// The OS's SR-IOV registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct View {
    /// SR-IOV Control.
    pub control: u16,
    /// NumVFs.
    pub num_vfs: u16,
    /// System Page Size.
    pub page_size: u32,
    /// VF BARs.
    pub vf_bars: [u32; 6],
}

/// A write the OS made, judged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The value to write to the device (same offset and size), if any
    /// byte of it is not the view's: the view's bytes replaced by what the
    /// device holds.
    pub forward: Option<u32>,
    /// Why the write was dropped.
    pub refused: Option<Refusal>,
    /// The OS's VF Enable changed to this.
    pub vf_enable: Option<bool>,
}

/// One register write of [`Setup::provision`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegWrite {
    /// Offset in the PF's configuration space.
    pub offset: u16,
    /// 2 or 4 bytes.
    pub size: u8,
    /// Value.
    pub value: u32,
}

impl Setup {
    /// The registers the view covers, relative to the capability, with
    /// their widths.
    const FIELDS: [(usize, u8); 9] = [
        (sreg::CONTROL, 2),
        (sreg::NUM_VFS, 2),
        (sreg::SYSTEM_PAGE_SIZE, 4),
        (sreg::VF_BAR0, 4),
        (sreg::VF_BAR0 + 4, 4),
        (sreg::VF_BAR0 + 8, 4),
        (sreg::VF_BAR0 + 12, 4),
        (sreg::VF_BAR0 + 16, 4),
        (sreg::VF_BAR0 + 20, 4),
    ];

    /// What the OS sees when it starts: the device as the firmware left
    /// it (VFs off, ARI as found), the BARs and page size the device holds.
    pub fn initial_view(&self) -> View {
        View {
            control: self.control & CONTROL_ARI,
            num_vfs: 0,
            page_size: self.page_size,
            vf_bars: self.vf_bars,
        }
    }

    /// What the OS sees after it reset the PF: the capability's reset
    /// values (System Page Size 4 KiB, the VF BARs' address bits 0).
    pub fn view_after_reset(&self) -> View {
        View {
            control: 0,
            num_vfs: 0,
            page_size: 1,
            vf_bars: core::array::from_fn(|i| self.vf_bars[i] & !self.vf_bar_masks[i]),
        }
    }

    /// Whether a device whose SR-IOV Control reads `control` lost the
    /// setup (a reset cleared VF Enable). All ones is a function that does
    /// not answer (yet), not a lost setup.
    pub fn lost(&self, control: u16) -> bool {
        control != 0xffff && control & CONTROL_VF_ENABLE == 0
    }

    /// The writes that put the setup into the device, in order: Control
    /// without VF Enable first (ARI decides the VFs' routing IDs), then
    /// NumVFs, System Page Size and the VF BARs, then Control as set up.
    /// The VFs answer 100 ms after the last (PCIe Base 6.0 §9.3.3.3.1).
    pub fn provision(&self) -> [RegWrite; 10] {
        let at = |r: usize| self.cap + r as u16;
        let mut out = [RegWrite {
            offset: at(sreg::CONTROL),
            size: 2,
            value: u32::from(self.control & !(CONTROL_VF_ENABLE | CONTROL_VF_MSE)),
        }; 10];
        out[1] = RegWrite {
            offset: at(sreg::NUM_VFS),
            size: 2,
            value: u32::from(self.num_vfs),
        };
        out[2] = RegWrite {
            offset: at(sreg::SYSTEM_PAGE_SIZE),
            size: 4,
            value: self.page_size,
        };
        for i in 0..6 {
            out[3 + i] = RegWrite {
                offset: at(sreg::VF_BAR0 + 4 * i),
                size: 4,
                value: self.vf_bars[i],
            };
        }
        out[9] = RegWrite {
            offset: at(sreg::CONTROL),
            size: 2,
            value: u32::from(self.control),
        };
        out
    }

    /// The view's or the device's byte at capability offset `rel` (from
    /// `v`), if the view covers it.
    fn byte(v: &View, rel: usize) -> Option<u8> {
        let (field, _) = Self::FIELDS
            .iter()
            .copied()
            .find(|&(f, w)| (f..f + usize::from(w)).contains(&rel))?;
        let value = match field {
            sreg::CONTROL => u32::from(v.control),
            sreg::NUM_VFS => u32::from(v.num_vfs),
            sreg::SYSTEM_PAGE_SIZE => v.page_size,
            bar => v.vf_bars[(bar - sreg::VF_BAR0) / 4],
        };
        Some(value.to_le_bytes()[rel - field])
    }

    /// The device's registers as a view (what forwarded writes carry in
    /// the view's bytes).
    fn device(&self) -> View {
        View {
            control: self.control,
            num_vfs: self.num_vfs,
            page_size: self.page_size,
            vf_bars: self.vf_bars,
        }
    }

    /// Capability offset of configuration offset `at`, if inside it.
    fn rel(&self, at: u16) -> Option<usize> {
        at.checked_sub(self.cap)
            .map(usize::from)
            .filter(|&r| r < thinhv_sriov::CAP_SIZE)
    }

    /// The value a read of `size` bytes at `offset` returns to the OS,
    /// `real` being the same read of the device.
    pub fn read(&self, view: &View, offset: u16, size: u8, real: impl FnOnce() -> u32) -> u32 {
        let mut b = real().to_le_bytes();
        for (i, byte) in b.iter_mut().enumerate().take(usize::from(size)) {
            let Some(rel) = self.rel(offset + i as u16) else {
                continue;
            };
            let budget = |reg: u16| reg.to_le_bytes()[rel & 1];
            if let Some(v) = Self::byte(view, rel) {
                *byte = v;
            } else if (sreg::INITIAL_VFS..sreg::INITIAL_VFS + 2).contains(&rel) {
                *byte = budget(self.initial_vfs.min(self.os_vfs));
            } else if (sreg::TOTAL_VFS..sreg::TOTAL_VFS + 2).contains(&rel) {
                *byte = budget(self.os_vfs);
            }
        }
        u32::from_le_bytes(b) & all_ones(size)
    }

    /// Judges the OS's write of `size` bytes of `value` at `offset`,
    /// updating `view`.
    pub fn write(&self, view: &mut View, offset: u16, size: u8, value: u32) -> Outcome {
        let bytes = value.to_le_bytes();
        let mut next = *view;
        let mut raw = [0u8; 0x40];
        let mut touched = [false; 0x40];
        let mut outside = false;
        for (i, &byte) in bytes.iter().enumerate().take(usize::from(size)) {
            match self.rel(offset + i as u16) {
                Some(rel) if Self::byte(view, rel).is_some() => {
                    raw[rel] = byte;
                    touched[rel] = true;
                }
                _ => outside = true,
            }
        }
        // Each register the write touched, its other bytes as they were.
        for &(field, width) in &Self::FIELDS {
            let span = field..field + usize::from(width);
            if !span.clone().any(|r| touched[r]) {
                continue;
            }
            let mut reg = [0u8; 4];
            for (k, r) in span.enumerate() {
                reg[k] = if touched[r] {
                    raw[r]
                } else {
                    Self::byte(view, r).unwrap_or(0)
                };
            }
            let v = u32::from_le_bytes(reg);
            match field {
                sreg::CONTROL => next.control = v as u16,
                sreg::NUM_VFS => next.num_vfs = v as u16,
                sreg::SYSTEM_PAGE_SIZE => next.page_size = v,
                bar => {
                    let i = (bar - sreg::VF_BAR0) / 4;
                    let mask = self.vf_bar_masks[i];
                    next.vf_bars[i] = (v & mask) | (self.vf_bars[i] & !mask);
                }
            }
        }
        if next.num_vfs > self.os_vfs {
            return Outcome {
                refused: Some(Refusal::NumVfsAboveBudget {
                    asked: next.num_vfs,
                    budget: self.os_vfs,
                }),
                ..Outcome::default()
            };
        }
        let was = view.control & CONTROL_VF_ENABLE != 0;
        let now = next.control & CONTROL_VF_ENABLE != 0;
        *view = next;
        let device = self.device();
        let forward = outside.then(|| {
            let mut b = bytes;
            for (i, byte) in b.iter_mut().enumerate().take(usize::from(size)) {
                if let Some(rel) = self.rel(offset + i as u16)
                    && let Some(d) = Self::byte(&device, rel)
                {
                    *byte = d;
                }
            }
            u32::from_le_bytes(b) & all_ones(size)
        });
        Outcome {
            forward,
            refused: None,
            vf_enable: (was != now).then_some(now),
        }
    }
}

/// The setup of `pf` (its SR-IOV capability as enumerated, its VF BARs
/// sized) for `num_vfs` VFs with VF Enable and VF MSE on, the OS's budget
/// `os_vfs`; `None` without SR-IOV.
pub fn setup_for(pf: &Function, os_vfs: u16, num_vfs: u16) -> Option<Setup> {
    let cap = pf.sriov?;
    let mut masks = [0u32; 6];
    for b in &pf.vf_bars {
        let i = usize::from(b.index);
        let mask = !(b.size.max(1) - 1);
        if i < 6 {
            masks[i] = (mask as u32) & !0xf;
        }
        if b.kind == BarKind::Mem64 && i + 1 < 6 {
            masks[i + 1] = (mask >> 32) as u32;
        }
    }
    Some(Setup {
        cap: cap.offset,
        os_vfs,
        initial_vfs: cap.initial_vfs,
        num_vfs,
        control: cap.control | CONTROL_VF_ENABLE | CONTROL_VF_MSE,
        page_size: cap.system_page_size,
        vf_bars: cap.vf_bars,
        vf_bar_masks: masks,
    })
}

/// VF `index` (1-based) of `pf` as a function of its own, read once the
/// setup is in the device (`now`: the capability as it reads then, whose
/// First VF Offset and VF Stride may depend on NumVFs): its vendor the
/// PF's and its device ID the capability's (a VF's own ID registers read
/// all ones), its BARs its slots of the PF's VF BARs (a VF's own BAR
/// registers read 0). `None` when it is beyond the routing-ID space or
/// does not answer.
pub fn vf_function(
    cfg: &impl ConfigSpace,
    pf: &Function,
    now: &SriovCap,
    index: u16,
) -> Option<Function> {
    let rid = now.vf_rid(pf.bdf.rid(), index)?;
    let bdf = Bdf::from_rid(pf.bdf.segment, rid);
    let class_rev = cfg.read32(bdf, 0x08);
    if class_rev == u32::MAX {
        return None;
    }
    let caps = legacy_caps(cfg, bdf);
    let ext_caps = if caps.iter().any(|c| c.0 == CAP_ID_PCIE) {
        extended_caps(cfg, bdf)
    } else {
        Vec::new()
    };
    let s = cfg.read32(bdf, 0x2c);
    let slot = u64::from(index - 1);
    Some(Function {
        bdf,
        vendor: pf.vendor,
        device: now.vf_device_id,
        class_rev,
        header_type: 0,
        subsystem: ((s & 0xffff) as u16, (s >> 16) as u16),
        bridge_buses: None,
        caps,
        ext_caps,
        sriov: None,
        bars: pf
            .vf_bars
            .iter()
            .map(|b| crate::bars::Bar {
                base: b.base + slot * b.size,
                ..*b
            })
            .collect(),
        vf_bars: Vec::new(),
        windows: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// QEMU's igb: SR-IOV at 0x160, 8 VFs, VF BAR0 and VF BAR3 16 KiB
    /// each, 64-bit prefetchable; the OS's budget 2, an appliance's VF 3.
    fn igb() -> Setup {
        Setup {
            cap: 0x160,
            os_vfs: 2,
            initial_vfs: 8,
            num_vfs: 3,
            control: CONTROL_VF_ENABLE | CONTROL_VF_MSE | CONTROL_ARI,
            page_size: 1,
            vf_bars: [0xfe00_000c, 0, 0, 0xfe01_000c, 0, 0],
            vf_bar_masks: [0xffff_c000, !0, 0, 0xffff_c000, !0, 0],
        }
    }

    const CTRL: u16 = 0x160 + 8;
    const NUM: u16 = 0x160 + 0x10;
    const BAR0: u16 = 0x160 + 0x24;

    /// The device's registers: as set up.
    fn device(s: &Setup, offset: u16, size: u8) -> u32 {
        let mut cfg = [0u8; 0x1000];
        let put = |cfg: &mut [u8; 0x1000], at: u16, v: &[u8]| {
            cfg[usize::from(at)..usize::from(at) + v.len()].copy_from_slice(v);
        };
        put(&mut cfg, s.cap, &0x0001_0010u32.to_le_bytes());
        put(&mut cfg, CTRL, &s.control.to_le_bytes());
        put(&mut cfg, s.cap + 0x0c, &[8, 0, 8, 0]);
        put(&mut cfg, NUM, &s.num_vfs.to_le_bytes());
        put(&mut cfg, s.cap + 0x14, &[0x80, 0, 2, 0]);
        put(&mut cfg, s.cap + 0x1a, &0x10cau16.to_le_bytes());
        put(&mut cfg, s.cap + 0x20, &s.page_size.to_le_bytes());
        for i in 0..6 {
            put(&mut cfg, BAR0 + 4 * i as u16, &s.vf_bars[i].to_le_bytes());
        }
        let o = usize::from(offset);
        let mut b = [0u8; 4];
        b[..usize::from(size)].copy_from_slice(&cfg[o..o + usize::from(size)]);
        u32::from_le_bytes(b)
    }

    fn read(s: &Setup, v: &View, offset: u16, size: u8) -> u32 {
        s.read(v, offset, size, || device(s, offset, size))
    }

    #[test]
    fn the_os_sees_its_budget_and_vfs_off_while_the_device_keeps_them_on() {
        let s = igb();
        let v = s.initial_view();
        assert_eq!(read(&s, &v, CTRL, 2), u32::from(CONTROL_ARI));
        assert_eq!(read(&s, &v, NUM, 2), 0);
        // TotalVFs and InitialVFs: the budget (a dword read at 0x0c).
        assert_eq!(read(&s, &v, s.cap + 0x0c, 4), 2 << 16 | 2);
        // First VF Offset, VF Stride, VF Device ID: the device's.
        assert_eq!(read(&s, &v, s.cap + 0x14, 4), 0x0002_0080);
        assert_eq!(read(&s, &v, s.cap + 0x1a, 2), 0x10ca);
        // The dword of Control and Status: Status is the device's.
        assert_eq!(read(&s, &v, CTRL, 4), u32::from(CONTROL_ARI));
        assert_eq!(read(&s, &v, BAR0, 4), 0xfe00_000c);
    }

    #[test]
    fn linux_enumeration_sizing_and_enable_reach_only_the_view() {
        let s = igb();
        let mut v = s.initial_view();
        // VF BAR0 sized (all ones, read, the address back).
        let o = s.write(&mut v, BAR0, 4, !0);
        assert_eq!((o.forward, o.refused), (None, None));
        assert_eq!(read(&s, &v, BAR0, 4), 0xffff_c00c);
        s.write(&mut v, BAR0 + 4, 4, !0);
        assert_eq!(read(&s, &v, BAR0 + 4, 4), !0);
        s.write(&mut v, BAR0, 4, 0xfe00_0000);
        s.write(&mut v, BAR0 + 4, 4, 0);
        assert_eq!(v.vf_bars, s.vf_bars);
        // An unimplemented VF BAR stays 0.
        s.write(&mut v, BAR0 + 8, 4, !0);
        assert_eq!(read(&s, &v, BAR0 + 8, 4), 0);
        // NumVFs 2 with VF Enable and MSE: the view's; nothing forwarded.
        let o = s.write(&mut v, NUM, 2, 2);
        assert_eq!(o, Outcome::default());
        let o = s.write(&mut v, CTRL, 2, 0x19);
        assert_eq!((o.forward, o.vf_enable), (None, Some(true)));
        assert_eq!(read(&s, &v, CTRL, 2), 0x19);
        // Off again, NumVFs 0: the view's.
        let o = s.write(&mut v, CTRL, 2, u32::from(CONTROL_ARI));
        assert_eq!(o.vf_enable, Some(false));
        s.write(&mut v, NUM, 2, 0);
        assert_eq!((v.control, v.num_vfs), (CONTROL_ARI, 0));
    }

    #[test]
    fn numvfs_above_the_budget_is_refused_whole() {
        let s = igb();
        let mut v = s.initial_view();
        let o = s.write(&mut v, NUM, 2, 3);
        assert_eq!(
            o.refused,
            Some(Refusal::NumVfsAboveBudget {
                asked: 3,
                budget: 2
            })
        );
        assert_eq!(v, s.initial_view());
        // By its high byte alone.
        let o = s.write(&mut v, NUM + 1, 1, 1);
        assert!(o.refused.is_some());
        // A dword at 0x10 (NumVFs and the function dependency link).
        let o = s.write(&mut v, NUM, 4, 0x0000_0002);
        assert!(o.refused.is_none());
        assert_eq!(v.num_vfs, 2);
    }

    #[test]
    fn a_write_beyond_the_view_reaches_the_device_with_the_setup_in_the_view_bytes() {
        let s = igb();
        let mut v = s.initial_view();
        // Control and Status as a dword: Status (RW1C bits) reaches the
        // device; its Control bytes carry the setup, not the OS's 0.
        let o = s.write(&mut v, CTRL, 4, 0x0001_0000);
        assert_eq!(o.forward, Some(0x0001_0000 | u32::from(s.control)));
        assert_eq!(v.control, 0);
        assert_eq!(o.vf_enable, None);
        // Outside the capability: as written.
        let o = s.write(&mut v, 0x04, 2, 0x0406);
        assert_eq!(o.forward, Some(0x0406));
        // TotalVFs (read-only) as written: nothing of the view in it.
        let o = s.write(&mut v, s.cap + 0x0e, 2, 5);
        assert_eq!(o.forward, Some(5));
    }

    #[test]
    fn a_reset_is_seen_and_the_setup_written_again_in_order() {
        let s = igb();
        assert!(!s.lost(s.control));
        assert!(s.lost(CONTROL_ARI));
        assert!(s.lost(0));
        assert!(!s.lost(0xffff));
        let w = s.provision();
        assert_eq!((w[0].offset, w[0].value), (CTRL, u32::from(CONTROL_ARI)));
        assert_eq!((w[1].offset, w[1].size, w[1].value), (NUM, 2, 3));
        assert_eq!(w[3].value, 0xfe00_000c);
        assert_eq!((w[9].offset, w[9].value), (CTRL, u32::from(s.control)));
        let v = s.view_after_reset();
        assert_eq!((v.control, v.num_vfs, v.page_size), (0, 0, 1));
        assert_eq!(v.vf_bars, [0xc, 0, 0, 0xc, 0, 0]);
    }

    #[test]
    fn the_setup_and_an_appliances_vf_come_from_the_enumerated_pf() {
        use crate::bars::size_function;
        use crate::pci::tests_support::FakeConfig;
        let pf_bdf = Bdf::new(0, 1, 0, 0);
        let mut c = FakeConfig::default();
        c.endpoint(pf_bdf, 0x10c9_8086, 0x0200_0001, true);
        c.set(pf_bdf, 0x160, 0x0001_0010);
        c.set(pf_bdf, 0x168, u32::from(CONTROL_ARI));
        c.set(pf_bdf, 0x16c, 8 << 16 | 8);
        c.set(pf_bdf, 0x174, 0x0002_0080);
        c.set(pf_bdf, 0x178, 0x10ca << 16);
        c.set(pf_bdf, 0x180, 1);
        c.bar(pf_bdf, 0x184, 0xfe00_000c, 16 << 10);
        c.bar(pf_bdf, 0x190, 0xfe02_000c, 16 << 10);
        let mut f = crate::pci::probe(&c, pf_bdf).unwrap();
        let mut bytes = [0u8; thinhv_sriov::CAP_SIZE];
        for (i, ch) in bytes.chunks_mut(4).enumerate() {
            ch.copy_from_slice(&c.read32(pf_bdf, 0x160 + 4 * i as u16).to_le_bytes());
        }
        f.sriov = SriovCap::parse(0x160, &bytes).ok();
        size_function(&mut c, &mut f);
        let s = setup_for(&f, 2, 3).unwrap();
        assert_eq!(s.control, CONTROL_ARI | CONTROL_VF_ENABLE | CONTROL_VF_MSE);
        assert_eq!((s.cap, s.os_vfs, s.num_vfs, s.page_size), (0x160, 2, 3, 1));
        assert_eq!(s.vf_bar_masks, [0xffff_c000, !0, 0, 0xffff_c000, !0, 0]);
        assert_eq!(s.vf_bars[3], 0xfe02_000c);
        // VF 3 at 01:00.0 + 0x80 + 2 * 2 = 01:10.4, its own header but
        // the IDs and BARs of the PF's capability.
        let vf = Bdf::new(0, 1, 0x10, 4);
        c.set(vf, 0, u32::MAX);
        c.set(vf, 0x08, 0x0200_0001);
        let now = f.sriov.unwrap();
        let v = vf_function(&c, &f, &now, 3).unwrap();
        assert_eq!((v.bdf, v.vendor, v.device), (vf, 0x8086, 0x10ca));
        let bars: Vec<(u8, u64, u64)> = v.bars.iter().map(|b| (b.index, b.base, b.size)).collect();
        assert_eq!(bars, [(0, 0xfe00_8000, 0x4000), (3, 0xfe02_8000, 0x4000)]);
        // A VF that does not answer.
        assert!(vf_function(&c, &f, &now, 4).is_none());
    }
}
