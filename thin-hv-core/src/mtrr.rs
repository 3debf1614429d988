//! Memory types from the MTRRs (Intel SDM Vol. 3A §12.11, "Memory Type
//! Range Registers"), for the EPT identity map: with EPT the processor takes
//! the memory type of guest accesses from the EPT entries (combined with the
//! guest's PAT), not from the MTRRs, so the EPT must carry what the MTRRs
//! say (§29.3.7).
use alloc::vec::Vec;
use thinhv_paging::MemType;

/// IA32_MTRRCAP.
pub const MSR_MTRRCAP: u32 = 0xfe;
/// IA32_MTRR_DEF_TYPE.
pub const MSR_DEF_TYPE: u32 = 0x2ff;
/// IA32_MTRR_PHYSBASE0 (PHYSMASK0 is +1, pairs follow).
pub const MSR_PHYSBASE0: u32 = 0x200;
/// The eleven fixed-range MTRRs, in address order.
pub const FIXED_MSRS: [u32; 11] = [
    0x250, 0x258, 0x259, 0x268, 0x269, 0x26a, 0x26b, 0x26c, 0x26d, 0x26e, 0x26f,
];

/// One variable-range MTRR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variable {
    /// IA32_MTRR_PHYSBASEn.
    pub base: u64,
    /// IA32_MTRR_PHYSMASKn.
    pub mask: u64,
}

/// The MTRR state of a processor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mtrrs {
    /// IA32_MTRR_DEF_TYPE.
    pub def_type: u64,
    /// Fixed-range MTRRs are implemented (MTRRCAP bit 8).
    pub fixed_supported: bool,
    /// The fixed-range MSRs.
    pub fixed: [u64; 11],
    /// The variable ranges (MTRRCAP bits 7:0 of them).
    pub variable: Vec<Variable>,
    /// Physical address width.
    pub phys_bits: u32,
}

const DEF_E: u64 = 1 << 11;
const DEF_FE: u64 = 1 << 10;
const MASK_V: u64 = 1 << 11;

/// (first address, size of each range) of the fixed MSRs, in order.
const FIXED_LAYOUT: [(u64, u64); 11] = [
    (0x0_0000, 0x1_0000),
    (0x8_0000, 0x4000),
    (0xa_0000, 0x4000),
    (0xc_0000, 0x1000),
    (0xc_8000, 0x1000),
    (0xd_0000, 0x1000),
    (0xd_8000, 0x1000),
    (0xe_0000, 0x1000),
    (0xe_8000, 0x1000),
    (0xf_0000, 0x1000),
    (0xf_8000, 0x1000),
];

impl Mtrrs {
    fn enabled(&self) -> bool {
        self.def_type & DEF_E != 0
    }

    fn fixed_enabled(&self) -> bool {
        self.enabled() && self.fixed_supported && self.def_type & DEF_FE != 0
    }

    fn addr_mask(&self) -> u64 {
        ((1u64 << self.phys_bits.clamp(36, 52)) - 1) & !0xfff
    }

    /// `[start, end)` of a variable range (contiguous masks; a mask with
    /// holes is treated as covering from its lowest set bit).
    fn var_range(&self, v: &Variable) -> Option<(u64, u64)> {
        if v.mask & MASK_V == 0 {
            return None;
        }
        let m = v.mask & self.addr_mask();
        if m == 0 {
            return None;
        }
        let size = 1u64 << m.trailing_zeros();
        let base = v.base & m;
        Some((base, base.saturating_add(size)))
    }

    /// The memory type at `addr` (§12.11.4.1 precedence).
    pub fn type_at(&self, addr: u64) -> MemType {
        if !self.enabled() {
            return MemType::UC;
        }
        if addr < 0x10_0000 && self.fixed_enabled() {
            for (i, &(start, step)) in FIXED_LAYOUT.iter().enumerate() {
                let end = start + 8 * step;
                if (start..end).contains(&addr) {
                    let byte = (addr - start) / step;
                    return MemType(((self.fixed[i] >> (8 * byte)) & 0xff) as u8);
                }
            }
        }
        let mut found: Option<MemType> = None;
        for v in &self.variable {
            let Some((s, e)) = self.var_range(v) else {
                continue;
            };
            if !(s..e).contains(&addr) {
                continue;
            }
            let t = MemType((v.base & 0xff) as u8);
            found = Some(match found {
                None => t,
                Some(p) if p == t => t,
                Some(p) if p == MemType::UC || t == MemType::UC => MemType::UC,
                Some(p)
                    if (p == MemType::WT && t == MemType::WB)
                        || (p == MemType::WB && t == MemType::WT) =>
                {
                    MemType::WT
                }
                // Other overlaps are undefined; uncached is the safe choice.
                Some(_) => MemType::UC,
            });
        }
        found.unwrap_or(MemType((self.def_type & 0xff) as u8))
    }

    /// Splits `[start, end)` into maximal runs of one memory type.
    pub fn segments(&self, start: u64, end: u64) -> Vec<(u64, u64, MemType)> {
        let mut cuts: Vec<u64> = alloc::vec![start, end];
        if self.fixed_enabled() {
            for &(s, step) in &FIXED_LAYOUT {
                for k in 0..=8 {
                    cuts.push(s + k * step);
                }
            }
        }
        if self.enabled() {
            for v in &self.variable {
                if let Some((s, e)) = self.var_range(v) {
                    cuts.push(s);
                    cuts.push(e);
                }
            }
        }
        cuts.retain(|&c| c >= start && c <= end);
        cuts.sort_unstable();
        cuts.dedup();
        let mut out: Vec<(u64, u64, MemType)> = Vec::new();
        for w in cuts.windows(2) {
            let t = self.type_at(w[0]);
            match out.last_mut() {
                Some(last) if last.1 == w[0] && last.2 == t => last.1 = w[1],
                _ => out.push((w[0], w[1], t)),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What OVMF programs on a q35/i440fx machine with 2 GiB: WB default,
    /// fixed ranges WB below 640 KiB and UC for the legacy VGA hole, one
    /// variable range making 2–4 GiB (the PCI hole) uncached.
    fn ovmf_like() -> Mtrrs {
        let wb8 = 0x0606_0606_0606_0606u64;
        let uc8 = 0u64;
        let mut fixed = [wb8; 11];
        fixed[2] = uc8; // A0000-BFFFF: VGA
        Mtrrs {
            def_type: DEF_E | DEF_FE | 6,
            fixed_supported: true,
            fixed,
            variable: alloc::vec![Variable {
                base: 0x8000_0000,
                mask: 0xff_8000_0000 | MASK_V
            }],
            phys_bits: 40,
        }
    }

    #[test]
    fn fixed_variable_and_default_types() {
        let m = ovmf_like();
        assert_eq!(m.type_at(0), MemType::WB);
        assert_eq!(m.type_at(0x9_ffff), MemType::WB);
        assert_eq!(m.type_at(0xa_0000), MemType::UC);
        assert_eq!(m.type_at(0xb_ffff), MemType::UC);
        assert_eq!(m.type_at(0xc_0000), MemType::WB);
        assert_eq!(m.type_at(0x7fff_ffff), MemType::WB);
        assert_eq!(m.type_at(0x8000_0000), MemType::UC);
        assert_eq!(m.type_at(0xfee0_0000), MemType::UC);
        assert_eq!(m.type_at(0x1_0000_0000), MemType::WB);
    }

    #[test]
    fn segments_are_maximal_and_cover_everything() {
        let m = ovmf_like();
        let s = m.segments(0, 8 << 30);
        assert_eq!(
            s,
            alloc::vec![
                (0, 0xa_0000, MemType::WB),
                (0xa_0000, 0xc_0000, MemType::UC),
                (0xc_0000, 0x8000_0000, MemType::WB),
                (0x8000_0000, 0x1_0000_0000, MemType::UC),
                (0x1_0000_0000, 8 << 30, MemType::WB),
            ]
        );
    }

    #[test]
    fn overlap_rules() {
        let mut m = ovmf_like();
        // WB over 0-1 GiB and WT over 0-256 MiB: WT wins where both match.
        m.variable = alloc::vec![
            Variable {
                base: 6,
                mask: 0xff_c000_0000 | MASK_V
            },
            Variable {
                base: 4,
                mask: 0xff_f000_0000 | MASK_V
            },
            Variable {
                base: 0x2000_0000 | 5,
                mask: 0xff_f000_0000 | MASK_V
            },
            Variable {
                base: 0x2000_0000,
                mask: 0xff_f000_0000 | MASK_V
            },
        ];
        m.def_type = DEF_E; // default UC (type 0), fixed off
        assert_eq!(m.type_at(0x100_0000), MemType::WT);
        assert_eq!(m.type_at(0x1000_0000), MemType::WB);
        assert_eq!(m.type_at(0x2000_0000), MemType::UC, "WP and UC overlap: UC");
        assert_eq!(m.type_at(0x4000_0000), MemType::UC, "default");
        // Disabled MTRRs: everything UC.
        m.def_type = 6;
        assert_eq!(m.type_at(0x100_0000), MemType::UC);
        // An invalid (V=0) range is ignored.
        let mut m = ovmf_like();
        m.variable[0].mask &= !MASK_V;
        assert_eq!(m.type_at(0x8000_0000), MemType::WB);
    }
}
