//! Physical memory as the host sees it: identity-mapped, first by the
//! firmware's tables and then by the core's own.
use thinhv_paging::PhysMem;

/// Page-table memory accessed through the identity map.
pub struct IdentityMem;

impl PhysMem for IdentityMem {
    fn read_entry(&self, table: u64, index: usize) -> u64 {
        // SAFETY: tables are frames handed out by the core's frame
        // allocator from the reserved pool, identity-mapped and 8-byte
        // aligned; index < 512 keeps the access inside the frame.
        unsafe { core::ptr::read_volatile((table as *const u64).add(index)) }
    }

    fn write_entry(&mut self, table: u64, index: usize, value: u64) {
        // SAFETY: as in `read_entry`; the pool is the core's alone.
        unsafe { core::ptr::write_volatile((table as *mut u64).add(index), value) }
    }

    fn zero_frame(&mut self, frame: u64) {
        // SAFETY: `frame` is a 4 KiB frame of the pool (see `read_entry`).
        unsafe { core::ptr::write_bytes(frame as *mut u8, 0, 4096) }
    }
}
