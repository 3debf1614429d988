//! Physical memory as the host sees it: identity-mapped, first by the
//! firmware's tables and then by the core's own.
use thinhv_paging::PhysMem;

/// Page-table memory accessed through the identity map.
///
/// The `PhysMem` methods write whatever physical address they are given,
/// so the contract sits on the constructor.
pub struct IdentityMem {
    _contract: (),
}

impl IdentityMem {
    /// Access to page tables through the identity map.
    ///
    /// # Safety
    /// Every table and frame address the caller (or the paging engine on
    /// its behalf) passes to the returned value is a 4 KiB-aligned frame
    /// that belongs to the core's page-table pool or was handed to the
    /// caller for its exclusive use (a root it allocated, a frame from the
    /// core's allocator), and is identity-mapped; no Rust reference points
    /// into those frames while it is in use.
    pub unsafe fn new() -> Self {
        Self { _contract: () }
    }
}

impl PhysMem for IdentityMem {
    fn read_entry(&self, table: u64, index: usize) -> u64 {
        // SAFETY: `new`'s contract: `table` is an identity-mapped pool frame,
        // 8-byte aligned; index < 512 keeps the access inside the frame.
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
