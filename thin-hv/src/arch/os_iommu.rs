//! The host side of the OS's emulated VT-d units
//! (`thin_hv_core::os_iommu`): thinhv's table memory and frames for the
//! shadows, the OS's memory, and the real unit.
use super::core_state::Core;
use super::phys::IdentityMem;
use thin_hv_core::os_iommu::{OsIommuHw, PhysBytes, RealContext, RealUnit};
use thin_hv_core::vvtd_shadow::FreeFrames;
use thinhv_paging::FrameAlloc;

/// Frames for shadow and context tables: the OS's units' own part of the
/// pool (`Core::os_iommu_free`, `layout::OS_IOMMU_PAGES` frames set
/// aside at the core's start), locked for each frame only.
pub struct Frames {
    core: &'static Core,
}

impl FrameAlloc for Frames {
    fn alloc_frame(&mut self) -> Option<u64> {
        self.core.os_iommu_free.lock().pop()
    }
}

impl FreeFrames for Frames {
    fn free_frame(&mut self, frame: u64) {
        self.core.os_iommu_free.lock().push(frame);
    }
}

/// The OS's memory, bytewise (the core checks each access is the OS's
/// RAM first: `thin_hv_core::os_iommu::OsRam`).
pub struct Ram {
    top: u64,
}

impl PhysBytes for Ram {
    fn read(&self, pa: u64, out: &mut [u8]) {
        if pa
            .checked_add(out.len() as u64)
            .is_none_or(|end| end > self.top)
        {
            out.fill(0);
            return;
        }
        // SAFETY: the range is inside the core's identity map (checked
        // above) and the OS's RAM (`OsRam` checked it is neither the
        // core's memory nor an appliance's), so the copy neither faults
        // nor aliases anything the core holds.
        unsafe { core::ptr::copy_nonoverlapping(pa as *const u8, out.as_mut_ptr(), out.len()) };
    }
    fn write(&mut self, pa: u64, data: &[u8]) {
        if pa
            .checked_add(data.len() as u64)
            .is_none_or(|end| end > self.top)
        {
            return;
        }
        // SAFETY: as for `read`: identity-mapped RAM of the OS's, no
        // reference of the core's points there.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), pa as *mut u8, data.len()) };
    }
}

/// The real units.
pub struct Real {
    core: &'static Core,
}

/// A zeroed frame of the OS's units' part of the pool for a real context
/// table.
fn table_frame(core: &Core) -> Option<u64> {
    let f = core.os_iommu_free.lock().pop()?;
    // SAFETY: a frame of the OS's units' part of the pool, taken just now,
    // identity-mapped, referenced by no one.
    unsafe { core::ptr::write_bytes(f as *mut u8, 0, 4096) };
    Some(f)
}

impl RealUnit for Real {
    fn set_context(&mut self, rid: u16, c: RealContext) -> bool {
        let core = self.core;
        self.core.iommu.os_set_context(rid, c, || table_frame(core))
    }
    fn flush(&mut self, domains: Option<&[u16]>) -> bool {
        self.core.iommu.os_flush(domains)
    }
    fn set_unnamed(&mut self, blocked: bool, named: &dyn Fn(u16) -> bool) -> bool {
        let core = self.core;
        self.core
            .iommu
            .os_set_unnamed(blocked, named, || table_frame(core))
    }
    fn write_irte(&mut self, index: u32, entry: [u64; 2]) {
        self.core.iommu.os_write_irte(index, entry);
    }
    fn irte_flush(&mut self) {
        self.core.iommu.os_irte_flush();
    }
    fn set_remapping(&mut self, on: bool, x2apic: bool, compat: bool) {
        self.core.iommu.os_set_remapping(on, x2apic, compat);
    }
}

/// What one register write of the OS's borrows.
pub struct Host {
    tables: IdentityMem,
    frames: Frames,
    ram: Ram,
    real: Real,
}

impl Host {
    /// The host side, where the real tables allow the emulation.
    pub fn new(core: &'static Core) -> Option<Self> {
        if !core.iommu.os_emulated() {
            return None;
        }
        Some(Self {
            // SAFETY: the shadows' tables are frames from the core's pool
            // (`Frames`), identity-mapped, used by the shadows alone.
            tables: unsafe { IdentityMem::new() },
            frames: Frames { core },
            ram: Ram { top: core.host_top },
            real: Real { core },
        })
    }
}

impl OsIommuHw for Host {
    type Tables = IdentityMem;
    type Frames = Frames;
    type Ram = Ram;
    type Real = Real;
    fn parts(&mut self) -> (&mut IdentityMem, &mut Frames, &mut Ram, &mut Real) {
        (
            &mut self.tables,
            &mut self.frames,
            &mut self.ram,
            &mut self.real,
        )
    }
}
