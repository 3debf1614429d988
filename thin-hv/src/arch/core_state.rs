//! The core's global state: what `CORE_OP_INIT` (`super::core_init`)
//! builds once, on the bootstrap processor before any CPU is virtualized,
//! and everything reads afterwards.
use super::percpu::PerCpu;
use super::status_page::StatusPage;
use crate::hv::Hv;
use crate::mtrr::Mtrrs;
use crate::vmx::caps::VmxCaps;
use spin::{Mutex, Once};
use thinhv_abi::PhysRange;
use thinhv_abi::handoff::Handoff;
use thinhv_paging::ept::EptFormat;
use thinhv_paging::x86::X86Format;
use thinhv_paging::{Attrs, BumpFrames, FrameAlloc, MapError, Mapper, PhysMem};

/// The guest's second-level tables: AMD NPT or Intel EPT.
#[derive(Clone, Copy, Debug)]
pub enum Slat {
    /// Nested page tables.
    Npt(X86Format),
    /// Extended page tables, with the MTRRs for memory types.
    Ept(EptFormat),
}

/// VMX-wide state.
pub struct VmxGlobal {
    /// Capability MSRs.
    pub caps: VmxCaps,
    /// EPT pointer.
    pub eptp: u64,
    /// MTRRs at start (memory types of first touches above the initial map).
    pub mtrrs: Mtrrs,
    /// AP start-up through ICR interception instead of the wait-for-SIPI
    /// activity state.
    pub intercept_sipi: bool,
}

/// Everything the core knows after initialization.
pub struct Core {
    /// Shared state for the handlers.
    pub hv: Hv,
    /// The loader's hand-off (copied).
    pub handoff: Handoff,
    /// Root of the second-level tables.
    pub slat_root: u64,
    /// Their format.
    pub slat: Slat,
    /// Intel only.
    pub vmx: Option<VmxGlobal>,
    /// Frames for nested tables added later (first touches).
    pub frames: Mutex<BumpFrames>,
    /// The platform IOMMU.
    pub iommu: super::iommu::Iommu,
    /// The core's own CR3.
    pub host_cr3: u64,
    /// Host identity map covers `[0, host_top)`.
    pub host_top: u64,
    /// MSR permission map (SVM, 8 KiB) or MSR bitmap (VMX, 4 KiB).
    pub msr_map_pa: u64,
    /// I/O permission map (all zero: no port exits; SVM).
    pub iopm_pa: u64,
    /// The blank frame the guest sees in place of the protected region.
    pub blank_pa: u64,
    /// Second-level roots of the appliance partitions (partition `n` at
    /// `n - 1`; 0 where none was built).
    pub appliance_slat: [u64; thinhv_abi::handoff::MAX_APPLIANCES],
    /// I/O permission map of appliance processors: every port exits.
    pub appliance_iopm_pa: u64,
    /// The canary page.
    pub canary_pa: u64,
    /// First `PerCpu`.
    pub percpu_base: u64,
    /// Status page writer.
    pub status: StatusPage,
    /// Device pages beyond `host_top` the core mapped (uncached) into its
    /// own tables to emulate accesses there: MSI-X tables the firmware put
    /// beyond it, the OS's when it enables MSI-X (`Env::apic_page_trap`),
    /// appliances' at `CORE_OP_INIT` (`iommu::appliance_table_pages`).
    pub high_mmio: Mutex<alloc::vec::Vec<u64>>,
    /// Frames the OS's emulated IOMMU's shadows gave back
    /// (`arch::os_iommu::Frames`).
    pub os_iommu_free: Mutex<alloc::vec::Vec<u64>>,
}

static CORE: Once<Core> = Once::new();

/// The core state, once initialized.
pub fn get() -> Option<&'static Core> {
    CORE.get()
}

/// Makes `core` the core state (`core_init::init`, once).
pub(super) fn install(core: Core) {
    CORE.call_once(|| core);
}

/// Byte `i` of the canary page.
pub fn canary_byte(i: usize) -> u8 {
    (i as u8).wrapping_mul(0x9d) ^ 0x5a
}

/// The index of the CPU running this code, from its APIC ID.
pub fn current_cpu() -> Option<usize> {
    let core = CORE.get()?;
    core.hv.cpu_by_apic_id(super::vcpu::apic_id())
}

/// The `PerCpu` of CPU `i`.
///
/// # Safety
/// Only CPU `i` itself may use the result mutably, and never two live
/// `&mut` at once.
pub unsafe fn percpu(core: &Core, i: usize) -> *mut PerCpu {
    (core.percpu_base + i as u64 * core::mem::size_of::<PerCpu>() as u64) as *mut PerCpu
}

/// The integrity ranges as slices.
pub fn ro_ranges(core: &Core) -> &[PhysRange] {
    core.handoff.ro_ranges()
}

/// Maps `[start, end)` identity in the EPT with the MTRR memory types.
pub fn ept_map_typed(
    fmt: &EptFormat,
    mem: &mut impl PhysMem,
    frames: &mut impl FrameAlloc,
    root: u64,
    mtrrs: &Mtrrs,
    start: u64,
    end: u64,
) -> Result<(), MapError> {
    let mut m = Mapper::open(fmt, mem, root);
    for (s, e, t) in mtrrs.segments(start, end) {
        m.map(
            s,
            s,
            e - s,
            Attrs {
                write: true,
                exec: true,
                mem_type: t,
            },
            frames,
        )?;
    }
    Ok(())
}
