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

/// Fits `ram` into at most `max` ranges by merging across the smallest
/// gaps (the check for hypercall buffers becomes slightly more permissive,
/// never less; the hypervisor's own ranges are checked separately).
pub fn fit(mut ram: Vec<PhysRange>, max: usize) -> Vec<PhysRange> {
    while ram.len() > max && ram.len() > 1 {
        let (i, _) = ram
            .windows(2)
            .enumerate()
            .min_by_key(|(_, w)| w[1].base - w[0].end())
            .unwrap_or((0, &ram[..2]));
        let end = ram[i + 1].end();
        ram[i].size = end - ram[i].base;
        ram.remove(i + 1);
    }
    ram
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
    fn fitting_merges_smallest_gaps() {
        let ram = vec![
            PhysRange::new(0, 0x1000),
            PhysRange::new(0x2000, 0x1000),
            PhysRange::new(0x10_0000, 0x1000),
            PhysRange::new(0x10_2000, 0x1000),
        ];
        let f = fit(ram.clone(), 2);
        assert_eq!(
            f,
            vec![PhysRange::new(0, 0x3000), PhysRange::new(0x10_0000, 0x3000)]
        );
        assert_eq!(fit(ram.clone(), 10), ram);
        assert_eq!(fit(ram, 1), vec![PhysRange::new(0, 0x10_3000)]);
    }
}
