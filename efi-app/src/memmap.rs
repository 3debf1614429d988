//! The firmware memory map, reduced to what the core needs: the RAM the
//! guest owns (hypercall buffers must lie inside it) and the top of the
//! described address space.
use alloc::vec::Vec;
use thinhv_abi::PhysRange;

/// UEFI memory types (UEFI 2.10 §7.2, Table 7-5). A newtype: firmware
/// may report OEM or OS values above the defined ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemType(pub u32);

#[allow(missing_docs)]
impl MemType {
    pub const RESERVED: Self = Self(0);
    pub const LOADER_CODE: Self = Self(1);
    pub const LOADER_DATA: Self = Self(2);
    pub const BOOT_SERVICES_CODE: Self = Self(3);
    pub const BOOT_SERVICES_DATA: Self = Self(4);
    pub const RUNTIME_SERVICES_CODE: Self = Self(5);
    pub const RUNTIME_SERVICES_DATA: Self = Self(6);
    pub const CONVENTIONAL: Self = Self(7);
    pub const UNUSABLE: Self = Self(8);
    pub const ACPI_RECLAIM: Self = Self(9);
    pub const ACPI_NVS: Self = Self(10);
    pub const MMIO: Self = Self(11);
    pub const MMIO_PORT_SPACE: Self = Self(12);
    pub const PAL_CODE: Self = Self(13);
    pub const PERSISTENT: Self = Self(14);

    /// Memory the OS will own as RAM after `ExitBootServices`.
    pub const fn is_os_ram(self) -> bool {
        matches!(self.0, 1 | 2 | 3 | 4 | 7 | 9 | 14)
    }
}

/// One descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Type.
    pub ty: MemType,
    /// Start.
    pub phys_start: u64,
    /// Length in 4 KiB pages.
    pub pages: u64,
}

/// The reduced map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// OS RAM, sorted and merged.
    pub ram: Vec<PhysRange>,
    /// End of the highest descriptor.
    pub top: u64,
    /// Bytes of OS RAM.
    pub ram_bytes: u64,
}

/// Reduces a memory map.
pub fn summarize(descs: &[Descriptor]) -> Summary {
    let mut ram: Vec<PhysRange> = descs
        .iter()
        .filter(|d| d.ty.is_os_ram() && d.pages > 0)
        .map(|d| PhysRange::new(d.phys_start, d.pages.saturating_mul(4096)))
        .collect();
    ram.sort_by_key(|r| r.base);
    let mut merged: Vec<PhysRange> = Vec::new();
    for r in ram {
        match merged.last_mut() {
            Some(last) if r.base <= last.end() => {
                let end = last.end().max(r.end());
                last.size = end - last.base;
            }
            _ => merged.push(r),
        }
    }
    let top = descs
        .iter()
        .map(|d| d.phys_start.saturating_add(d.pages.saturating_mul(4096)))
        .max()
        .unwrap_or(0);
    let ram_bytes = merged.iter().map(|r| r.size).sum();
    Summary {
        ram: merged,
        top,
        ram_bytes,
    }
}

/// The RAM ranges the core gets, and what did not fit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fitted {
    /// Ranges kept, each exactly as in the input, sorted by address.
    pub kept: Vec<PhysRange>,
    /// Ranges dropped.
    pub dropped: usize,
    /// Bytes of RAM in the dropped ranges: the core refuses hypercall
    /// buffers there.
    pub dropped_bytes: u64,
}

/// Fits `ram` (sorted, merged: [`summarize`]) into at most `max` ranges by
/// dropping the smallest (the lower address kept among equals). Ranges are
/// never merged across a gap: the core accepts hypercall buffers only
/// inside these ranges, and a gap may hold device registers (an IOMMU
/// window, an ECAM page). Dropping costs only RAM the guest may not use for
/// hypercall buffers.
pub fn fit(ram: &[PhysRange], max: usize) -> Fitted {
    if ram.len() <= max {
        return Fitted {
            kept: ram.to_vec(),
            ..Fitted::default()
        };
    }
    let mut order: Vec<usize> = (0..ram.len()).collect();
    // Largest first; among equals the lower address first.
    order.sort_by(|&a, &b| {
        ram[b]
            .size
            .cmp(&ram[a].size)
            .then(ram[a].base.cmp(&ram[b].base))
    });
    let (keep, drop) = order.split_at(max);
    let mut kept: Vec<PhysRange> = keep.iter().map(|&i| ram[i]).collect();
    kept.sort_by_key(|r| r.base);
    Fitted {
        kept,
        dropped: drop.len(),
        dropped_bytes: drop.iter().map(|&i| ram[i].size).sum(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(ty: MemType, start: u64, pages: u64) -> Descriptor {
        Descriptor {
            ty,
            phys_start: start,
            pages,
        }
    }

    #[test]
    fn ovmf_like_map() {
        let map = [
            d(MemType::BOOT_SERVICES_CODE, 0, 1),
            d(MemType::CONVENTIONAL, 0x1000, 0x9f),
            d(MemType::CONVENTIONAL, 0x10_0000, 0x700),
            d(MemType::ACPI_NVS, 0x80_0000, 0x8),
            d(MemType::CONVENTIONAL, 0x80_8000, 0x3),
            d(MemType::LOADER_DATA, 0x80_b000, 0x10),
            d(MemType::RESERVED, 0x7e00_0000, 0x300),
            d(MemType::RUNTIME_SERVICES_DATA, 0x7f00_0000, 0x10),
            d(MemType::MMIO, 0xffc0_0000, 0x400),
        ];
        let s = summarize(&map);
        assert_eq!(
            s.ram,
            vec![
                PhysRange::new(0, 0xa0_000),
                PhysRange::new(0x10_0000, 0x70_0000),
                PhysRange::new(0x80_8000, 0x13_000),
            ]
        );
        assert_eq!(s.top, 0x1_0000_0000);
        assert!(!MemType(0x8000_0001).is_os_ram());
    }

    #[test]
    fn fitting_drops_the_smallest_and_never_merges_across_a_gap() {
        let ram = vec![
            PhysRange::new(0, 0xa_0000),
            // The legacy VGA window 0xa_0000..0x10_0000 lies in this gap.
            PhysRange::new(0x10_0000, 0x1000),
            PhysRange::new(0x10_2000, 0x3000),
            PhysRange::new(0x20_0000, 0x1000),
            PhysRange::new(0x1_0000_0000, 0x4000_0000),
        ];
        let f = fit(&ram, 3);
        assert_eq!(
            f.kept,
            vec![
                PhysRange::new(0, 0xa_0000),
                PhysRange::new(0x10_2000, 0x3000),
                PhysRange::new(0x1_0000_0000, 0x4000_0000),
            ]
        );
        assert_eq!((f.dropped, f.dropped_bytes), (2, 0x2000));
        // Every kept range is one of the firmware's, unchanged: no byte of
        // a gap is ever covered.
        for max in 1..=ram.len() {
            let f = fit(&ram, max);
            assert_eq!(f.kept.len(), max);
            assert!(f.kept.iter().all(|k| ram.contains(k)), "{max}: {f:?}");
            assert!(f.kept.windows(2).all(|w| w[0].end() <= w[1].base));
            let kept_bytes: u64 = f.kept.iter().map(|r| r.size).sum();
            let all: u64 = ram.iter().map(|r| r.size).sum();
            assert_eq!(kept_bytes + f.dropped_bytes, all);
            assert!(!f.kept.iter().any(|r| r.overlaps(0xa_0000, 0x6_0000)));
        }
        // Enough room: unchanged.
        let f = fit(&ram, 128);
        assert_eq!(
            f,
            Fitted {
                kept: ram.clone(),
                dropped: 0,
                dropped_bytes: 0
            }
        );
        // Among equals the lower address stays.
        let same = [
            PhysRange::new(0x3000, 0x1000),
            PhysRange::new(0x1000, 0x1000),
        ];
        assert_eq!(fit(&same, 1).kept, vec![PhysRange::new(0x1000, 0x1000)]);
        assert_eq!(fit(&[], 4), Fitted::default());
    }

    #[test]
    fn a_fragmented_map_keeps_its_holes() {
        // More RAM ranges than the core takes: 200 RAM ranges of 512 KiB,
        // each followed by a 512 KiB reserved one, above the usual low
        // memory with its VGA hole. Merging across the smallest gaps (what
        // the loader once did) covered the VGA window; dropping keeps it
        // out.
        let mut map = vec![
            d(MemType::CONVENTIONAL, 0, 0xa0),
            d(MemType::CONVENTIONAL, 0x10_0000, 0x700),
        ];
        for i in 0..200u64 {
            let base = 0x100_0000 + i * 0x10_0000;
            map.push(d(MemType::CONVENTIONAL, base, 0x80));
            map.push(d(MemType::RESERVED, base + 0x8_0000, 0x80));
        }
        let s = summarize(&map);
        assert_eq!(s.ram.len(), 202);
        let f = fit(&s.ram, 128);
        assert_eq!(f.kept.len(), 128);
        assert_eq!(f.dropped, 74);
        assert_eq!(f.dropped_bytes, 74 * 0x8_0000);
        assert!(f.kept.iter().all(|k| s.ram.contains(k)));
        for hole in [0xa_0000u64, 0x188_0000, 0xfee0_0000] {
            assert!(!f.kept.iter().any(|r| r.contains(hole)), "{hole:#x}");
        }
        // The highest small ranges are the ones dropped.
        assert!(
            !f.kept
                .iter()
                .any(|r| r.contains(0x100_0000 + 199 * 0x10_0000))
        );
        assert!(f.kept.iter().any(|r| r.contains(0x100_0000)));
    }
}
