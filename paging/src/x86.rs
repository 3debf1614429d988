//! x86-64 long-mode entries (AMD APM Vol. 2 §5.3, Intel SDM Vol. 3A §4.5),
//! used for the core's own page tables and, with the U/S bit set at every
//! level, for AMD nested page tables (APM Vol. 2 §15.25.5: "nested page
//! table accesses are treated as user accesses").

use crate::{Attrs, EntryFormat, MemType};

/// Present.
pub const P: u64 = 1 << 0;
/// Writable.
pub const RW: u64 = 1 << 1;
/// User/supervisor.
pub const US: u64 = 1 << 2;
/// Page-level write-through.
pub const PWT: u64 = 1 << 3;
/// Page-level cache disable.
pub const PCD: u64 = 1 << 4;
/// Accessed.
pub const A: u64 = 1 << 5;
/// Dirty.
pub const D: u64 = 1 << 6;
/// Page size (at levels 1 and 2).
pub const PS: u64 = 1 << 7;
/// No-execute (needs EFER.NXE).
pub const NX: u64 = 1 << 63;
/// Address bits 12..51.
pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Which table an [`X86Format`] builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// The hypervisor's own page tables (supervisor only).
    Host,
    /// AMD nested page tables (U/S set everywhere).
    Nested,
}

/// The x86-64 entry format.
#[derive(Clone, Copy, Debug)]
pub struct X86Format {
    /// Host or nested.
    pub flavor: Flavor,
    /// 1 GiB pages available (CPUID 0x8000_0001 EDX[26]).
    pub page_1g: bool,
    /// NX available and EFER.NXE set where the tables are used.
    pub nx: bool,
}

impl X86Format {
    fn common(self) -> u64 {
        match self.flavor {
            Flavor::Host => P,
            Flavor::Nested => P | US,
        }
    }
}

impl EntryFormat for X86Format {
    fn max_leaf_level(&self) -> usize {
        if self.page_1g { 2 } else { 1 }
    }

    fn is_present(&self, entry: u64) -> bool {
        entry & P != 0
    }

    fn is_leaf(&self, entry: u64, level: usize) -> bool {
        level == 0 || (level <= 2 && entry & PS != 0)
    }

    fn address(&self, entry: u64, level: usize) -> u64 {
        if level > 0 && entry & PS != 0 {
            // Bit 12 is the PAT bit in large-page entries.
            entry & ADDR_MASK & !((1u64 << (12 + 9 * level)) - 1)
        } else {
            entry & ADDR_MASK
        }
    }

    fn table(&self, table: u64, _level: usize) -> u64 {
        // Tables are writable and executable; leaves decide.
        (table & ADDR_MASK) | self.common() | RW | A
    }

    fn leaf(&self, phys: u64, level: usize, attrs: Attrs) -> u64 {
        let mut e = (phys & ADDR_MASK) | self.common() | A | D;
        if attrs.write {
            e |= RW;
        }
        if !attrs.exec && self.nx {
            e |= NX;
        }
        // PAT index 0 (WB) or 3 (UC) with the power-on PAT; MTRRs still
        // apply, and for nested tables the guest's own type combines with it.
        if attrs.mem_type != MemType::WB {
            e |= PCD | PWT;
        }
        if level > 0 {
            e |= PS;
        }
        e
    }

    fn leaf_attrs(&self, entry: u64, _level: usize) -> Attrs {
        Attrs {
            write: entry & RW != 0,
            exec: entry & NX == 0,
            mem_type: if entry & (PCD | PWT) == (PCD | PWT) {
                MemType::UC
            } else {
                MemType::WB
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeMem;
    use crate::{BumpFrames, Leaf, Mapper, PAGE_SIZE, level_size};
    use proptest::prelude::*;

    const GIB: u64 = 1 << 30;
    const MIB2: u64 = 2 << 20;

    fn npt() -> X86Format {
        X86Format {
            flavor: Flavor::Nested,
            page_1g: true,
            nx: true,
        }
    }

    fn leaves<F: EntryFormat>(m: &Mapper<'_, F, FakeMem>) -> Vec<Leaf> {
        let mut v = Vec::new();
        m.for_each_leaf(&mut |l| v.push(l));
        v
    }

    #[test]
    fn identity_map_uses_1g_pages() {
        let fmt = npt();
        let mut mem = FakeMem::default();
        let mut frames = BumpFrames::new(0x1000_0000_0000, 64 * PAGE_SIZE);
        let mut m = Mapper::create(&fmt, &mut mem, &mut frames).unwrap();
        m.map(0, 0, 8 * GIB, Attrs::RWX, &mut frames).unwrap();
        let l = leaves(&m);
        assert_eq!(l.len(), 8);
        assert!(l.iter().all(|l| l.level == 2 && l.virt == l.phys));
        // Root + one PDPT.
        assert_eq!(frames.used(), 2);
    }

    #[test]
    fn without_1g_pages_uses_2m() {
        let fmt = X86Format {
            page_1g: false,
            ..npt()
        };
        let mut mem = FakeMem::default();
        let mut frames = BumpFrames::new(0x1000_0000_0000, 64 * PAGE_SIZE);
        let mut m = Mapper::create(&fmt, &mut mem, &mut frames).unwrap();
        m.map(0, 0, 2 * GIB, Attrs::RWX, &mut frames).unwrap();
        let l = leaves(&m);
        assert_eq!(l.len(), 1024);
        assert!(l.iter().all(|l| l.level == 1));
    }

    #[test]
    fn unaligned_start_uses_smaller_pages_then_grows() {
        let fmt = npt();
        let mut mem = FakeMem::default();
        let mut frames = BumpFrames::new(0x1000_0000_0000, 64 * PAGE_SIZE);
        let mut m = Mapper::create(&fmt, &mut mem, &mut frames).unwrap();
        let start = GIB - MIB2 - PAGE_SIZE;
        m.map(start, start, 2 * GIB - start, Attrs::RWX, &mut frames)
            .unwrap();
        let l = leaves(&m);
        assert_eq!(l.iter().filter(|l| l.level == 0).count(), 1);
        assert_eq!(l.iter().filter(|l| l.level == 1).count(), 1);
        assert_eq!(l.iter().filter(|l| l.level == 2).count(), 1);
    }

    #[test]
    fn splitting_preserves_the_rest_of_a_large_page() {
        let fmt = npt();
        let mut mem = FakeMem::default();
        let mut frames = BumpFrames::new(0x1000_0000_0000, 64 * PAGE_SIZE);
        let mut m = Mapper::create(&fmt, &mut mem, &mut frames).unwrap();
        m.map(0, 0, 4 * GIB, Attrs::RWX, &mut frames).unwrap();
        let hole = 0x7ff_d000;
        let blank = 0x7ff0_0000;
        m.map_all_to_frame(hole, 3 * PAGE_SIZE, blank, Attrs::RO, &mut frames)
            .unwrap();
        for a in [0u64, 0x7ff_c000, 0x800_0000, GIB - 1, GIB, 3 * GIB + 5] {
            let l = m.translate(a).unwrap();
            assert_eq!(l.phys + (a - l.virt), a, "identity broken at {a:#x}");
            assert_eq!(l.attrs, Attrs::RWX);
        }
        for a in [hole, hole + PAGE_SIZE + 7, hole + 2 * PAGE_SIZE + 0xfff] {
            let l = m.translate(a).unwrap();
            assert_eq!(l.level, 0);
            assert_eq!(l.phys, blank);
            assert_eq!(l.attrs, Attrs::RO);
        }
        // The 1 GiB page was split to 2 MiB, one 2 MiB page to 4 KiB.
        let l = leaves(&m);
        assert_eq!(l.iter().filter(|l| l.level == 2).count(), 3);
        assert_eq!(l.iter().filter(|l| l.level == 1).count(), 511);
        assert_eq!(l.iter().filter(|l| l.level == 0).count(), 512);
    }

    #[test]
    fn unmapping_one_page_splits_and_keeps_the_rest() {
        let fmt = npt();
        let mut mem = FakeMem::default();
        let mut frames = BumpFrames::new(0x1000_0000_0000, 64 * PAGE_SIZE);
        let mut m = Mapper::create(&fmt, &mut mem, &mut frames).unwrap();
        m.map(0, 0, 4 * GIB, Attrs::RWX, &mut frames).unwrap();
        let ecam_page = 0xb010_8000;
        m.unmap_page(ecam_page, &mut frames).unwrap();
        assert!(m.translate(ecam_page).is_none());
        assert!(m.translate(ecam_page + 0xfff).is_none());
        for a in [0u64, ecam_page - 1, ecam_page + PAGE_SIZE, 3 * GIB + 5] {
            let l = m.translate(a).unwrap();
            assert_eq!(l.phys + (a - l.virt), a, "identity broken at {a:#x}");
            assert_eq!(l.attrs, Attrs::RWX);
        }
        // Again, and a page that was never mapped: no change, no error.
        m.unmap_page(ecam_page, &mut frames).unwrap();
        m.unmap_page(8 * GIB, &mut frames).unwrap();
        assert!(m.translate(8 * GIB).is_none());
        assert_eq!(
            m.unmap_page(ecam_page + 1, &mut frames),
            Err(MapError::Unaligned)
        );
        let l = leaves(&m);
        assert_eq!(l.iter().filter(|l| l.level == 0).count(), 511);
    }

    #[test]
    fn mapping_over_a_finer_subtree_keeps_it_consistent() {
        let fmt = npt();
        let mut mem = FakeMem::default();
        let mut frames = BumpFrames::new(0x1000_0000_0000, 64 * PAGE_SIZE);
        let mut m = Mapper::create(&fmt, &mut mem, &mut frames).unwrap();
        m.map(0x20_0000, 0x20_0000, PAGE_SIZE, Attrs::RO, &mut frames)
            .unwrap();
        m.map(0, 0, GIB, Attrs::RWX, &mut frames).unwrap();
        let l = m.translate(0x20_0000).unwrap();
        assert_eq!(l.attrs, Attrs::RWX);
        assert_eq!(l.phys, 0x20_0000);
    }

    #[test]
    fn rejects_bad_ranges_and_reports_exhaustion() {
        let fmt = npt();
        let mut mem = FakeMem::default();
        let mut frames = BumpFrames::new(0x1000_0000_0000, 2 * PAGE_SIZE);
        let mut m = Mapper::create(&fmt, &mut mem, &mut frames).unwrap();
        assert_eq!(
            m.map(1, 0, PAGE_SIZE, Attrs::RWX, &mut frames),
            Err(MapError::Unaligned)
        );
        assert_eq!(
            m.map(1 << 48, 0, PAGE_SIZE, Attrs::RWX, &mut frames),
            Err(MapError::OutOfRange)
        );
        assert_eq!(
            m.map(!0xfff, 0, 2 * PAGE_SIZE, Attrs::RWX, &mut frames),
            Err(MapError::OutOfRange)
        );
        m.map(0, 0, PAGE_SIZE, Attrs::RWX, &mut frames).unwrap_err();
    }

    use crate::MapError;

    #[test]
    fn entry_bits_follow_the_format() {
        let host = X86Format {
            flavor: Flavor::Host,
            page_1g: true,
            nx: true,
        };
        let e = host.leaf(0x4000_0000, 2, Attrs::RWX);
        assert_eq!(e & (P | RW | PS | US | NX), P | RW | PS);
        let n = npt().leaf(0x1000, 0, Attrs::RO);
        assert_eq!(n & (P | RW | US | NX | PS), P | US | NX);
        let uc = npt().leaf(0xfee0_0000, 0, Attrs::MMIO_RO);
        assert_eq!(npt().leaf_attrs(uc, 0), Attrs::MMIO_RO);
        // Large-page address masks the PAT bit region.
        assert_eq!(
            host.address(0x4000_0000 | PS | P | (1 << 12), 2),
            0x4000_0000
        );
        assert_eq!(npt().table(0x5000, 1) & (P | US | RW), P | US | RW);
    }

    proptest! {
        /// Whatever holes are punched into an identity map, every page
        /// outside them still maps to itself with its original rights, and
        /// every page inside maps to the blank frame read-only.
        #[test]
        fn identity_with_holes(holes in proptest::collection::vec((0u64..(4 * GIB / PAGE_SIZE), 1u64..600), 1..4),
                               probes in proptest::collection::vec(0u64..(4 * GIB), 64)) {
            let fmt = npt();
            let mut mem = FakeMem::default();
            let mut frames = BumpFrames::new(0x1000_0000_0000, 4096 * PAGE_SIZE);
            let mut m = Mapper::create(&fmt, &mut mem, &mut frames).unwrap();
            m.map(0, 0, 4 * GIB, Attrs::RWX, &mut frames).unwrap();
            let blank = 0xdead_0000;
            let mut ranges = Vec::new();
            for (page, n) in holes {
                let base = page * PAGE_SIZE;
                let len = (n * PAGE_SIZE).min(4 * GIB - base);
                if len == 0 { continue; }
                m.map_all_to_frame(base, len, blank, Attrs::RO, &mut frames).unwrap();
                ranges.push((base, base + len));
            }
            for a in probes {
                let l = m.translate(a).unwrap();
                let in_hole = ranges.iter().any(|&(s, e)| a >= s && a < e);
                if in_hole {
                    prop_assert_eq!(l.phys, blank);
                    prop_assert_eq!(l.level, 0);
                    prop_assert!(!l.attrs.write);
                } else {
                    prop_assert_eq!(l.phys + (a - l.virt), a);
                    prop_assert!(l.attrs.write);
                }
            }
            // No leaf straddles a hole boundary.
            let mut bad = false;
            m.for_each_leaf(&mut |l: Leaf| {
                if l.phys != blank {
                    for &(s, e) in &ranges {
                        if l.virt < e && s < l.virt + level_size(l.level) { bad = true; }
                    }
                }
            });
            prop_assert!(!bad);
        }
    }
}
