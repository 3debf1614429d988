//! The entry point the loader calls, the panic handler and the heap.
use thinhv_abi::handoff::{CORE_OP_INIT, CORE_OP_RELEASE, CORE_OP_VIRTUALIZE, CoreError};

#[global_allocator]
static HEAP: linked_list_allocator::LockedHeap = linked_list_allocator::LockedHeap::empty();

/// Gives the heap its memory (once, from `CORE_OP_INIT`).
pub fn init_heap(base: u64, size: u64) {
    // SAFETY: `[base, base + size)` was carved from the reserved pool for
    // the heap alone and is never used otherwise.
    unsafe { HEAP.lock().init(base as *mut u8, size as usize) };
}

/// The core's entry point (see `thinhv_abi::handoff` for the contract).
///
/// # Safety
/// Called by the loader only, at CPL 0 with the firmware's identity map, per
/// the documented operations: `CORE_OP_INIT` once on the bootstrap processor
/// with a valid hand-off, then `CORE_OP_VIRTUALIZE` once per CPU on that CPU;
/// `CORE_OP_RELEASE` natively once every CPU has left guest mode.
#[unsafe(no_mangle)]
pub unsafe extern "sysv64" fn thinhv_core_entry(op: u64, a0: u64, a1: u64, a2: u64) -> u64 {
    let r = match op {
        // The IOMMU translates from the end of the set-up on (see
        // `iommu::start`).
        CORE_OP_INIT => super::core_init::init(a0).map(|()| super::iommu::start()),
        // SAFETY: forwarded contract: called on the CPU being virtualized.
        CORE_OP_VIRTUALIZE => unsafe {
            if super::core_state::get().is_some_and(|c| c.vmx.is_some()) {
                super::vmx::launch::virtualize(a0, a1, a2)
            } else {
                super::svm::launch::virtualize(a0, a1, a2)
            }
        },
        CORE_OP_RELEASE => super::iommu::release(),
        _ => Err(CoreError::BAD_OP),
    };
    match r {
        Ok(()) => 0,
        Err(e) => {
            log::error!("core operation {op} failed: {}", e.describe());
            e.0
        }
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    super::idt::fatal(format_args!("panic: {info}"))
}
