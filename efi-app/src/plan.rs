//! The reservation: how big, and where each part goes.
//!
//! ```text
//! base ─┬─ hand-off (HANDOFF_AREA bytes)
//!       ├─ core image (ELF span)
//!       ├─ pool (heap, permission maps, per-CPU blocks, page tables)
//!       ├─ ─ ─ end of the protected region ─ ─ ─
//!       └─ status page (read-only for the guest)
//! ```
use thinhv_abi::PhysRange;
use thinhv_abi::layout::pool_size;
use thinhv_abi::status::status_area_layout;

/// Offsets and sizes inside the reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Bytes to reserve.
    pub total: u64,
    /// Offset of the core image.
    pub image_offset: u64,
    /// Size of the image.
    pub image_size: u64,
    /// Offset of the pool.
    pub pool_offset: u64,
    /// Size of the pool.
    pub pool_size: u64,
    /// Size of the protected region (from offset 0).
    pub protected_size: u64,
    /// Size of the status page (right after the protected region).
    pub status_size: u64,
}

const PAGE: u64 = 4096;

/// Plans a reservation for an image of `image_span` bytes.
pub fn plan(image_span: u64, cpus: u64, phys_top: u64, page_1g: bool, iommu_pages: u64) -> Plan {
    let image_offset = thinhv_abi::handoff::HANDOFF_AREA;
    let image_size = image_span.div_ceil(PAGE) * PAGE;
    let pool_offset = image_offset + image_size;
    let pool = pool_size(cpus, phys_top, page_1g, iommu_pages);
    let protected_size = pool_offset + pool;
    let (status, _) = status_area_layout(usize::try_from(cpus).unwrap_or(usize::MAX));
    let status_size = status as u64;
    Plan {
        total: protected_size + status_size,
        image_offset,
        image_size,
        pool_offset,
        pool_size: pool,
        protected_size,
        status_size,
    }
}

impl Plan {
    /// The ranges for a reservation at `base`: (protected, status, image, pool).
    pub fn ranges(&self, base: u64) -> (PhysRange, PhysRange, PhysRange, PhysRange) {
        (
            PhysRange::new(base, self.protected_size),
            PhysRange::new(base + self.protected_size, self.status_size),
            PhysRange::new(base + self.image_offset, self.image_size),
            PhysRange::new(base + self.pool_offset, self.pool_size),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use thinhv_abi::handoff::Handoff;

    #[test]
    fn plan_is_consistent_with_the_handoff_rules() {
        for cpus in [1, 2, 4, 64] {
            let p = plan(0x5_0123, cpus, 2 << 30, true, 0);
            assert_eq!(p.total % PAGE, 0);
            let (prot, status, image, pool) = p.ranges(0x7e00_0000);
            let mut h = Handoff::new();
            h.protected = prot;
            h.status = status;
            h.region = PhysRange::new(0x7e00_0000, p.total);
            h.image = image;
            h.pool = pool;
            h.cpu_count = u32::try_from(cpus).unwrap();
            assert_eq!(h.validate(), Ok(()), "{cpus} cpus");
            assert_eq!(status.end(), 0x7e00_0000 + p.total);
            assert!(
                image.base - 0x7e00_0000 >= core::mem::size_of::<Handoff>() as u64,
                "hand-off overlaps the image"
            );
        }
    }

    #[test]
    fn footprint_for_a_small_server() {
        // 4 CPUs, 4 GiB, a 400 KiB core: well under 2 MiB in total.
        let p = plan(400 << 10, 4, 4 << 30, true, 0);
        assert!(p.total < 2 << 20, "{}", p.total);
    }
}
