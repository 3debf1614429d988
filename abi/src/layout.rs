//! How big the core's pool is: the loader sizes the reservation with these
//! functions and the core carves its structures out of the pool in the same
//! terms, so both sides agree without sharing code that runs.

/// Page size.
pub const PAGE: u64 = 4096;
/// Core heap. Most of it holds the instruction decoder's tables (about
/// 330 KiB, built on first use).
pub const HEAP_SIZE: u64 = 512 * 1024;
/// Host stack per CPU.
pub const STACK_SIZE: u64 = 32 * 1024;
/// Each interrupt stack (NMI, #DF, #MC) per CPU.
pub const IST_SIZE: u64 = 8 * 1024;
/// Interrupt stacks per CPU.
pub const IST_COUNT: u64 = 3;
/// Pages per CPU besides stacks: guest control block, host save area, host
/// state block (VMSAVE), GDT + TSS.
pub const PER_CPU_PAGES: u64 = 4;
/// Shared pages: MSR permission map (2), I/O permission map (3), blank page,
/// canary page, spare for VMX (MSR bitmap) and alignment.
pub const SHARED_PAGES: u64 = 10;
/// Page-table frames always kept for splits and first touches.
pub const TABLE_SLACK_PAGES: u64 = 64;

/// Bytes per CPU.
pub const fn per_cpu_bytes() -> u64 {
    PER_CPU_PAGES * PAGE + STACK_SIZE + IST_COUNT * IST_SIZE
}

/// Page-table frames for one identity map of `[0, top)`.
pub const fn table_pages(top: u64, page_1g: bool) -> u64 {
    const GIB: u64 = 1 << 30;
    let gibs = top.div_ceil(GIB);
    let pdpts = gibs.div_ceil(512);
    // Without 1 GiB pages each GiB needs a page directory.
    1 + pdpts + if page_1g { 0 } else { gibs }
}

/// Entries of thinhv's VT-d interrupt remapping table (log2): 8192, for
/// every unit, shared out among the partitions and I/O APICs.
pub const VTD_IRT_ENTRIES_LOG2: u8 = 13;
/// Pages the VT-d interrupt remapping table occupies (16 bytes an entry).
pub const VTD_IRT_PAGES: u64 = (16u64 << VTD_IRT_ENTRIES_LOG2) / PAGE;

/// Pages the IOMMU structures need besides their identity table: VT-d root
/// and context table, and where interrupts are remapped (`remap`) the
/// remapping table, an invalidation queue per unit and the page their
/// waits store to; AMD-Vi device table for `device_ids` requesters,
/// command buffer, event log and completion-wait page.
pub const fn iommu_pages(kind: u8, device_ids: u64, remap: bool) -> u64 {
    match kind {
        crate::handoff::IOMMU_KIND_VTD if remap => {
            2 + VTD_IRT_PAGES + crate::handoff::MAX_IOMMUS as u64 + 1
        }
        crate::handoff::IOMMU_KIND_VTD => 2,
        crate::handoff::IOMMU_KIND_AMDVI => (device_ids * 32).div_ceil(PAGE) + 3,
        _ => 0,
    }
}

/// Pages the OS's emulated VT-d units take from the pool where
/// `[iommu] os = "emulated"`: the shadows of its domains (4 MiB; a shadow
/// entry that finds no frame is left out, and the OS's device faults
/// there) and the context tables of the buses whose requesters it
/// changes.
pub const OS_IOMMU_PAGES: u64 = 1024 + 16;

/// Size of the pool for `cpus` processors and a memory map ending at
/// `phys_top` (the core maps at least 4 GiB), plus `extra_pages` (the
/// IOMMU's structures, with their own identity table).
pub const fn pool_size(cpus: u64, phys_top: u64, page_1g: bool, extra_pages: u64) -> u64 {
    let top = if phys_top < (4 << 30) {
        4 << 30
    } else {
        phys_top
    };
    // Host tables and second-level tables, plus slack for splits.
    let iommu = if extra_pages > 0 {
        extra_pages + table_pages(top, false)
    } else {
        0
    };
    let tables = 2 * table_pages(top, page_1g) + TABLE_SLACK_PAGES + iommu;
    HEAP_SIZE + (SHARED_PAGES + tables) * PAGE + cpus * per_cpu_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_sane() {
        assert_eq!(per_cpu_bytes(), 4 * 4096 + 32768 + 3 * 8192);
        assert_eq!(table_pages(4 << 30, true), 2);
        assert_eq!(table_pages(4 << 30, false), 6);
        assert_eq!(table_pages(1 << 40, true), 1 + 2);
        // A 4-CPU machine with 2 GiB: well under 2 MiB of pool.
        assert!(pool_size(4, 2 << 30, true, 0) < 2 << 20);
        assert_eq!(pool_size(1, 0, true, 0) % 4096, 0);
        // AMD-Vi for 16 buses: a 128 KiB device table and three pages.
        assert_eq!(
            iommu_pages(crate::handoff::IOMMU_KIND_AMDVI, 16 * 256, true),
            32 + 3
        );
        // VT-d: root and context table; with interrupt remapping a 128
        // KiB table, a queue for each of up to 8 units and the wait page.
        assert_eq!(iommu_pages(crate::handoff::IOMMU_KIND_VTD, 0, false), 2);
        assert_eq!(
            iommu_pages(crate::handoff::IOMMU_KIND_VTD, 0, true),
            2 + 32 + 8 + 1
        );
        assert_eq!(
            pool_size(1, 0, true, 35) - pool_size(1, 0, true, 0),
            (35 + table_pages(4 << 30, false)) * PAGE
        );
    }
}
