//! Intel EPT entries (Intel SDM Vol. 3C §29.3.2, Tables 29-1 to 29-6):
//! bits 0–2 read/write/execute, bits 3–5 the memory type of a leaf, bit 6
//! "ignore PAT", bit 7 large page, bits 12+ the address. An entry is present
//! when any of bits 0–2 is set.

use crate::{Attrs, EntryFormat, MemType};

/// Read.
pub const R: u64 = 1 << 0;
/// Write.
pub const W: u64 = 1 << 1;
/// Execute.
pub const X: u64 = 1 << 2;
/// Large page (levels 1 and 2).
pub const LARGE: u64 = 1 << 7;
/// Memory type field shift.
pub const MT_SHIFT: u64 = 3;
/// Address bits.
pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// The EPT entry format.
#[derive(Clone, Copy, Debug)]
pub struct EptFormat {
    /// 1 GiB pages allowed (IA32_VMX_EPT_VPID_CAP bit 17).
    pub page_1g: bool,
    /// 2 MiB pages allowed (bit 16).
    pub page_2m: bool,
}

impl EntryFormat for EptFormat {
    fn max_leaf_level(&self) -> usize {
        match (self.page_1g, self.page_2m) {
            (true, _) => 2,
            (false, true) => 1,
            (false, false) => 0,
        }
    }

    fn is_present(&self, entry: u64) -> bool {
        entry & (R | W | X) != 0
    }

    fn is_leaf(&self, entry: u64, level: usize) -> bool {
        level == 0 || (level <= 2 && entry & LARGE != 0)
    }

    fn address(&self, entry: u64, level: usize) -> u64 {
        if level > 0 && entry & LARGE != 0 {
            entry & ADDR_MASK & !((1u64 << (12 + 9 * level)) - 1)
        } else {
            entry & ADDR_MASK
        }
    }

    fn table(&self, table: u64, _level: usize) -> u64 {
        (table & ADDR_MASK) | R | W | X
    }

    fn leaf(&self, phys: u64, level: usize, attrs: Attrs) -> u64 {
        // Read is always granted (write-only or execute-only-without-read
        // are not used; write without read is a misconfiguration).
        let mut e = (phys & ADDR_MASK) | R | (u64::from(attrs.mem_type.0 & 7) << MT_SHIFT);
        if attrs.write {
            e |= W;
        }
        if attrs.exec {
            e |= X;
        }
        if level > 0 {
            e |= LARGE;
        }
        e
    }

    fn leaf_attrs(&self, entry: u64, _level: usize) -> Attrs {
        Attrs {
            write: entry & W != 0,
            exec: entry & X != 0,
            mem_type: MemType(((entry >> MT_SHIFT) & 7) as u8),
        }
    }
}

/// The EPT pointer (SDM §25.6.11): memory type WB, 4-level walk.
pub const fn eptp(root: u64) -> u64 {
    (root & ADDR_MASK) | (3 << 3) | MemType::WB.0 as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeMem;
    use crate::{BumpFrames, Mapper, PAGE_SIZE};

    const FMT: EptFormat = EptFormat {
        page_1g: true,
        page_2m: true,
    };

    #[test]
    fn leaves_carry_rights_and_memory_type() {
        let e = FMT.leaf(0x4000_0000, 2, Attrs::RWX);
        assert_eq!(e, 0x4000_0000 | R | W | X | LARGE | (6 << 3));
        let ro = FMT.leaf(0x1000, 0, Attrs::RO);
        assert_eq!(ro & 7, R, "read-only, no execute");
        let uc = FMT.leaf(0xfee0_0000, 0, Attrs::MMIO_RW);
        assert_eq!(FMT.leaf_attrs(uc, 0), Attrs::MMIO_RW);
        assert_eq!((uc >> 3) & 7, 0, "UC");
        assert_eq!(FMT.table(0x5000, 3), 0x5007);
        assert_eq!(eptp(0x12_3000), 0x12_301e);
    }

    #[test]
    fn the_engine_builds_ept_tables() {
        let mut mem = FakeMem::default();
        let mut frames = BumpFrames::new(0x1000_0000_0000, 64 * PAGE_SIZE);
        let mut m = Mapper::create(&FMT, &mut mem, &mut frames).unwrap();
        m.map(0, 0, 4 << 30, Attrs::RWX, &mut frames).unwrap();
        m.map(0xa_0000, 0xa_0000, 0x2_0000, Attrs::MMIO_RW, &mut frames)
            .unwrap();
        let l = m.translate(0xa_8000).unwrap();
        assert_eq!((l.level, l.attrs.mem_type), (0, MemType::UC));
        let l = m.translate(0x1_0000_0000 - 1).unwrap();
        assert_eq!((l.level, l.attrs.mem_type), (2, MemType::WB));
        let small = EptFormat {
            page_1g: false,
            page_2m: false,
        };
        let mut mem = FakeMem::default();
        let mut frames = BumpFrames::new(0x1000_0000_0000, 64 * PAGE_SIZE);
        let mut m = Mapper::create(&small, &mut mem, &mut frames).unwrap();
        m.map(0, 0, 4 << 20, Attrs::RWX, &mut frames).unwrap();
        assert_eq!(m.translate(0x20_0000).unwrap().level, 0);
    }
}
