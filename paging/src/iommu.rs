//! The IOMMUs' translation-table entries, for the same engine:
//!
//! * Intel VT-d second-level entries (VT-d specification §9.8, "Second-Level
//!   Paging Entries"): bit 0 read, bit 1 write, bit 7 page size (levels 1
//!   and 2), bits 12+ the address. Present when read or write is set. No
//!   execute, no memory type: DMA has neither (snoop control, bit 11, is
//!   left clear).
//! * AMD-Vi I/O page-table entries (AMD IOMMU specification §2.2.3, "I/O
//!   Page Tables for Host Translations"): bit 0 present, bits 9–11 Next
//!   Level (the level of the table pointed to, 1-based; 0 in an entry that
//!   maps a page, at any level), bits 12+ the address, bit 61 read (IR),
//!   bit 62 write (IW).
use crate::{Attrs, EntryFormat, MemType};

/// Address bits of both formats.
pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// VT-d: read.
pub const VTD_R: u64 = 1 << 0;
/// VT-d: write.
pub const VTD_W: u64 = 1 << 1;
/// VT-d: page size (a leaf above level 0).
pub const VTD_PS: u64 = 1 << 7;

/// The VT-d second-level entry format (4-level, 48-bit AGAW).
#[derive(Clone, Copy, Debug)]
pub struct VtdFormat {
    /// 1 GiB pages allowed (CAP.SLLPS bit 1).
    pub page_1g: bool,
    /// 2 MiB pages allowed (CAP.SLLPS bit 0).
    pub page_2m: bool,
}

impl EntryFormat for VtdFormat {
    fn max_leaf_level(&self) -> usize {
        match (self.page_1g, self.page_2m) {
            (true, true) => 2,
            (_, true) => 1,
            _ => 0,
        }
    }

    fn is_present(&self, entry: u64) -> bool {
        entry & (VTD_R | VTD_W) != 0
    }

    fn is_leaf(&self, entry: u64, level: usize) -> bool {
        level == 0 || (level <= 2 && entry & VTD_PS != 0)
    }

    fn address(&self, entry: u64, level: usize) -> u64 {
        if level > 0 && entry & VTD_PS != 0 {
            entry & ADDR_MASK & !((1u64 << (12 + 9 * level)) - 1)
        } else {
            entry & ADDR_MASK
        }
    }

    fn table(&self, table: u64, _level: usize) -> u64 {
        (table & ADDR_MASK) | VTD_R | VTD_W
    }

    fn leaf(&self, phys: u64, level: usize, attrs: Attrs) -> u64 {
        let mut e = (phys & ADDR_MASK) | VTD_R;
        if attrs.write {
            e |= VTD_W;
        }
        if level > 0 {
            e |= VTD_PS;
        }
        e
    }

    fn leaf_attrs(&self, entry: u64, _level: usize) -> Attrs {
        Attrs {
            write: entry & VTD_W != 0,
            exec: false,
            mem_type: MemType::WB,
        }
    }
}

/// AMD-Vi: present.
pub const AMDVI_PR: u64 = 1 << 0;
/// AMD-Vi: Next Level field shift (bits 9–11).
pub const AMDVI_NEXT_SHIFT: u64 = 9;
/// AMD-Vi: read permission.
pub const AMDVI_IR: u64 = 1 << 61;
/// AMD-Vi: write permission.
pub const AMDVI_IW: u64 = 1 << 62;

/// The AMD-Vi I/O page-table entry format (4 levels: device-table Mode 4).
#[derive(Clone, Copy, Debug, Default)]
pub struct AmdViFormat;

impl AmdViFormat {
    /// Next Level of an entry.
    pub const fn next_level(entry: u64) -> u64 {
        (entry >> AMDVI_NEXT_SHIFT) & 7
    }
}

impl EntryFormat for AmdViFormat {
    fn max_leaf_level(&self) -> usize {
        // Next Level 0 maps a page at any level; 2 MiB and 1 GiB pages are
        // part of the base architecture.
        2
    }

    fn is_present(&self, entry: u64) -> bool {
        entry & AMDVI_PR != 0
    }

    fn is_leaf(&self, entry: u64, level: usize) -> bool {
        level == 0 || Self::next_level(entry) == 0
    }

    fn address(&self, entry: u64, level: usize) -> u64 {
        if level > 0 && Self::next_level(entry) == 0 {
            entry & ADDR_MASK & !((1u64 << (12 + 9 * level)) - 1)
        } else {
            entry & ADDR_MASK
        }
    }

    fn table(&self, table: u64, level: usize) -> u64 {
        // An entry at 0-based `level` points to a table of 0-based level
        // `level - 1`, which AMD-Vi numbers `level` (1-based).
        (table & ADDR_MASK)
            | AMDVI_PR
            | AMDVI_IR
            | AMDVI_IW
            | ((level as u64 & 7) << AMDVI_NEXT_SHIFT)
    }

    fn leaf(&self, phys: u64, _level: usize, attrs: Attrs) -> u64 {
        let mut e = (phys & ADDR_MASK) | AMDVI_PR | AMDVI_IR;
        if attrs.write {
            e |= AMDVI_IW;
        }
        e
    }

    fn leaf_attrs(&self, entry: u64, _level: usize) -> Attrs {
        Attrs {
            write: entry & AMDVI_IW != 0,
            exec: false,
            mem_type: MemType::WB,
        }
    }
}

/// The AMD-Vi device-table entry's Mode for these tables (4 levels).
pub const AMDVI_MODE_4_LEVEL: u64 = 4;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeMem;
    use crate::{BumpFrames, Mapper, PAGE_SIZE};

    const VTD: VtdFormat = VtdFormat {
        page_1g: true,
        page_2m: true,
    };

    #[test]
    fn vtd_entries() {
        assert_eq!(
            VTD.leaf(0x4000_0000, 2, Attrs::RWX),
            0x4000_0000 | VTD_R | VTD_W | VTD_PS
        );
        assert_eq!(VTD.leaf(0x1000, 0, Attrs::RO), 0x1000 | VTD_R);
        assert_eq!(VTD.table(0x5000, 3), 0x5003);
        assert!(!VTD.is_present(0x5000));
        let small = VtdFormat {
            page_1g: false,
            page_2m: true,
        };
        assert_eq!(small.max_leaf_level(), 1);
    }

    #[test]
    fn amdvi_entries() {
        let f = AmdViFormat;
        // A level-4 (root) entry points to a level-3 table: Next Level 3.
        let t = f.table(0x5000, 3);
        assert_eq!(AmdViFormat::next_level(t), 3);
        assert_eq!(t & ADDR_MASK, 0x5000);
        assert!(f.is_present(t) && !f.is_leaf(t, 3));
        // A 2 MiB page: Next Level 0 at level 1.
        let l = f.leaf(0x20_0000, 1, Attrs::RWX);
        assert_eq!(AmdViFormat::next_level(l), 0);
        assert!(f.is_leaf(l, 1));
        assert_eq!(
            l & (AMDVI_IR | AMDVI_IW | AMDVI_PR),
            AMDVI_IR | AMDVI_IW | AMDVI_PR
        );
        assert!(!f.leaf_attrs(f.leaf(0, 0, Attrs::RO), 0).write);
    }

    /// Both formats through the engine: everything but a hole, with the
    /// hole split out of large pages.
    #[test]
    fn the_engine_builds_iommu_tables_with_a_hole() {
        let hole = (0x3d00_0000u64, 0x20_0000u64);
        for fmt in [&VTD as &dyn Probe, &AmdViFormat] {
            fmt.check(hole);
        }
    }

    trait Probe {
        fn check(&self, hole: (u64, u64));
    }

    impl<F: EntryFormat> Probe for F {
        fn check(&self, hole: (u64, u64)) {
            let mut mem = FakeMem::default();
            let mut frames = BumpFrames::new(0x1000_0000_0000, 64 * PAGE_SIZE);
            let mut m = Mapper::create(self, &mut mem, &mut frames).unwrap();
            m.map(0, 0, hole.0, Attrs::RWX, &mut frames).unwrap();
            let after = hole.0 + hole.1;
            m.map(after, after, (4 << 30) - after, Attrs::RWX, &mut frames)
                .unwrap();
            assert!(m.translate(hole.0).is_none(), "the hole is unmapped");
            assert!(m.translate(hole.0 + hole.1 - 1).is_none());
            let below = m.translate(hole.0 - 1).unwrap();
            assert_eq!(below.phys, below.virt, "identity");
            assert!(below.virt + below.size() == hole.0, "ends at the hole");
            let above = m.translate(after).unwrap();
            assert_eq!((above.virt, above.phys), (after, after));
            assert_eq!(
                m.translate((3 << 30) + 5).unwrap().level,
                2,
                "1 GiB pages elsewhere"
            );
        }
    }
}
