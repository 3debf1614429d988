//! The core's global state, built once by `CORE_OP_INIT` on the bootstrap
//! processor before any CPU is virtualized.
use super::instr::{cpuid, rdmsr};
use super::percpu::PerCpu;
use super::phys::IdentityMem;
use super::status_page::StatusPage;
use crate::handlers::msr_policy;
use crate::hv::Hv;
use crate::mtrr::{FIXED_MSRS, MSR_DEF_TYPE, MSR_MTRRCAP, MSR_PHYSBASE0, Mtrrs, Variable};
use crate::npt;
use crate::svm::msrpm::{self, MSRPM_SIZE};
use crate::vmx::caps::VmxCaps;
use crate::vmx::msr_bitmap;
use alloc::vec::Vec;
use spin::{Mutex, Once};
use thinhv_abi::PhysRange;
use thinhv_abi::handoff::{CoreError, Handoff, features};
use thinhv_abi::hypercall::VENDOR_INTEL_VMX;
use thinhv_abi::layout::{HEAP_SIZE, PAGE};
use thinhv_abi::status::DeviceRecord;
use thinhv_abi::status::StatusPageHeader;
use thinhv_paging::ept::EptFormat;
use thinhv_paging::x86::{Flavor, X86Format};
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
    /// The canary page.
    pub canary_pa: u64,
    /// First `PerCpu`.
    pub percpu_base: u64,
    /// Status page writer.
    pub status: StatusPage,
}

static CORE: Once<Core> = Once::new();

/// The core state, once initialized.
pub fn get() -> Option<&'static Core> {
    CORE.get()
}

/// Byte `i` of the canary page.
pub fn canary_byte(i: usize) -> u8 {
    (i as u8).wrapping_mul(0x9d) ^ 0x5a
}

/// The index of the CPU running this code, from its APIC ID.
pub fn current_cpu() -> Option<usize> {
    let core = CORE.get()?;
    let apic_id = if cpuid(0, 0)[0] >= 0xb && cpuid(0xb, 0)[1] != 0 {
        cpuid(0xb, 0)[3]
    } else {
        cpuid(1, 0)[1] >> 24
    };
    core.hv.cpu_by_apic_id(apic_id)
}

/// The `PerCpu` of CPU `i`.
///
/// # Safety
/// Only CPU `i` itself may use the result mutably, and never two live
/// `&mut` at once.
pub unsafe fn percpu(core: &Core, i: usize) -> *mut PerCpu {
    (core.percpu_base + i as u64 * core::mem::size_of::<PerCpu>() as u64) as *mut PerCpu
}

/// A bump allocator over the pool.
struct Carver {
    next: u64,
    end: u64,
}

impl Carver {
    fn take(&mut self, size: u64, align: u64) -> Result<u64, CoreError> {
        let start = self.next.div_ceil(align) * align;
        let end = start.checked_add(size).ok_or(CoreError::OUT_OF_MEMORY)?;
        if end > self.end {
            return Err(CoreError::OUT_OF_MEMORY);
        }
        self.next = end;
        Ok(start)
    }
}

/// `CORE_OP_INIT`.
pub fn init(handoff_pa: u64) -> Result<(), CoreError> {
    if CORE.get().is_some() {
        return Err(CoreError::BAD_OP);
    }
    if handoff_pa == 0 || !handoff_pa.is_multiple_of(8) {
        return Err(CoreError::BAD_HANDOFF);
    }
    // SAFETY: the loader passes the physical (identity-mapped) address of a
    // `Handoff` it wrote inside the protected region; it is copied out at once.
    let h: Handoff = unsafe { core::ptr::read_volatile(handoff_pa as *const Handoff) };
    h.validate().map_err(|_| CoreError::BAD_HANDOFF)?;
    // The status page first, so that the log ring holds every line.
    let status = StatusPage::new(h.status.base, h.status.size, h.cpu_count as usize)
        .ok_or(CoreError::BAD_HANDOFF)?;
    let header = StatusPageHeader {
        abi_version: thinhv_abi::ABI_VERSION,
        header_size: core::mem::size_of::<StatusPageHeader>() as u32,
        version: thinhv_abi::VERSION,
        vendor: h.vendor,
        cpus_expected: h.cpu_count,
        bytes_reserved: h.region.size,
        protected_base: h.protected.base,
        protected_size: h.protected.size,
        flags: if h.config.hide_hypervisor != 0 {
            thinhv_abi::status::FLAG_HIDDEN
        } else {
            0
        },
        ..Default::default()
    };
    let ids: [u32; thinhv_abi::handoff::MAX_CPUS] = core::array::from_fn(|i| h.cpus[i].apic_id);
    status.init(&header, &ids[..h.cpu_count as usize]);
    let dev_bytes = u64::from(h.device_count) * core::mem::size_of::<DeviceRecord>() as u64;
    if h.device_count != 0 && !h.region.overlaps(h.devices_pa, dev_bytes) {
        // SAFETY: `validate` bounded the count; the loader passes the
        // identity-mapped address of that many records in its own
        // (boot-services) memory, outside the hypervisor's region (checked
        // above). They are copied before the loader can free them.
        let recs = unsafe {
            core::slice::from_raw_parts(
                h.devices_pa as *const DeviceRecord,
                h.device_count as usize,
            )
        };
        status.publish_devices(recs, h.devices_dropped);
    }
    super::logger::LOGGER.attach_ring(status);
    super::logger::LOGGER.init(h.config.serial_port, h.config.log_level);
    log::info!(
        "thinhv core {}.{}.{} starting: {} CPUs, protected {:#x}+{:#x}, status page {:#x}+{:#x}",
        thinhv_abi::unpack_version(thinhv_abi::VERSION).0,
        thinhv_abi::unpack_version(thinhv_abi::VERSION).1,
        thinhv_abi::unpack_version(thinhv_abi::VERSION).2,
        h.cpu_count,
        h.protected.base,
        h.protected.size,
        h.status.base,
        h.status.size
    );

    let mut carve = Carver {
        next: h.pool.base,
        end: h.pool.end(),
    };
    let heap = carve.take(HEAP_SIZE, PAGE)?;
    let msrpm_pa = carve.take(MSRPM_SIZE as u64, PAGE)?;
    let iopm_pa = carve.take(3 * PAGE, PAGE)?;
    let blank_pa = carve.take(PAGE, PAGE)?;
    let canary_pa = carve.take(PAGE, PAGE)?;
    let per_cpu_size = core::mem::size_of::<PerCpu>() as u64;
    let percpu_base = carve.take(per_cpu_size * u64::from(h.cpu_count), PAGE)?;
    let tables = carve.take(0, PAGE)?;
    let mut frames = BumpFrames::new(tables, h.pool.end() - tables);

    // SAFETY: all these ranges were just carved from the pool, which the
    // loader reserved for the core alone; zeroing them creates no aliasing.
    unsafe {
        core::ptr::write_bytes(heap as *mut u8, 0, (tables - heap) as usize);
    }
    super::entry::init_heap(heap, HEAP_SIZE);
    // SAFETY: the canary page was carved above and belongs to the core.
    let canary = unsafe { core::slice::from_raw_parts_mut(canary_pa as *mut u8, PAGE as usize) };
    for (i, b) in canary.iter_mut().enumerate() {
        *b = canary_byte(i);
    }

    // SAFETY: the IA32_APIC_BASE MSR exists on every x86-64 processor.
    let apic_msr = unsafe { rdmsr(crate::apic::IA32_APIC_BASE) };
    let apic_base = apic_msr & crate::apic::APIC_BASE_ADDR_MASK;
    let page_1g = h.features & features::PAGE_1G != 0;
    let nx = h.features & features::NX != 0;

    // The core's own identity map (supervisor, no NX, APIC uncached).
    let host_top = thinhv_abi::handoff::identity_map_top(h.phys_top);
    let host_fmt = X86Format {
        flavor: Flavor::Host,
        page_1g,
        nx: false,
    };
    let mut mem = IdentityMem;
    let host_cr3 = {
        let mut m = Mapper::create(&host_fmt, &mut mem, &mut frames)
            .map_err(|_| CoreError::OUT_OF_MEMORY)?;
        m.map(0, 0, host_top, Attrs::RWX, &mut frames)
            .map_err(|_| CoreError::OUT_OF_MEMORY)?;
        m.map(apic_base, apic_base, PAGE, Attrs::MMIO_RW, &mut frames)
            .map_err(|_| CoreError::OUT_OF_MEMORY)?;
        m.root()
    };

    // The guest's second-level map, and the MSR map.
    let plan = npt::Plan {
        top: host_top,
        protected: h.protected,
        blank: blank_pa,
        status: h.status,
        apic_page: Some(apic_base),
    };
    let (slat, slat_root, vmx) = if h.vendor == VENDOR_INTEL_VMX {
        let (fmt, root, g) = init_vmx(&h, &plan, &mut frames, msrpm_pa)?;
        (Slat::Ept(fmt), root, Some(g))
    } else {
        let fmt = X86Format {
            flavor: Flavor::Nested,
            page_1g,
            nx,
        };
        let root =
            npt::build(&fmt, &mut mem, &mut frames, &plan).map_err(|_| CoreError::OUT_OF_MEMORY)?;
        // SAFETY: carved above, 8 KiB, zeroed.
        let map = unsafe { &mut *(msrpm_pa as *mut [u8; MSRPM_SIZE]) };
        // The MSR policy decides; MSRs outside the map's ranges exit anyway.
        for (m, read, write) in msr_policy::intercepts(h.vendor, has_mtrr()) {
            msrpm::intercept(map, m, read, write);
        }
        (Slat::Npt(fmt), root, None)
    };
    log::debug!(
        "host tables {host_cr3:#x}, second-level tables {slat_root:#x}, {} frames left",
        frames.remaining()
    );

    // The IOMMU's tables, and its register windows hidden from the guest
    // (reads as zeros, writes discarded) so the OS cannot switch it off.
    let iommu =
        super::iommu::Iommu::init(&h.iommu, &h.pci, h.region, host_top, &mut frames, status)?;
    if h.iommu.mode == thinhv_abi::handoff::IOMMU_MODE_PROTECT {
        for u in h.iommu.units() {
            let size = u.size.max(PAGE).div_ceil(PAGE) * PAGE;
            let base = u.base & !(PAGE - 1);
            let r = match slat {
                Slat::Npt(fmt) => Mapper::open(&fmt, &mut mem, slat_root).map_all_to_frame(
                    base,
                    size,
                    blank_pa,
                    Attrs::RO,
                    &mut frames,
                ),
                Slat::Ept(fmt) => Mapper::open(&fmt, &mut mem, slat_root).map_all_to_frame(
                    base,
                    size,
                    blank_pa,
                    Attrs::RO,
                    &mut frames,
                ),
            };
            r.map_err(|_| CoreError::OUT_OF_MEMORY)?;
        }
    }

    // Mediated PCI functions: their ECAM pages fault (every access is
    // emulated), and the configuration ports exit (the map serves as SVM's
    // I/O permission map and VMX's I/O bitmaps A and B alike).
    for m in h.pci.mediated() {
        let page = h.pci.page_of(m);
        if page.saturating_add(PAGE) > host_top {
            // `Handoff::validate` refused this already (the loader leaves
            // such a function with the OS and says so): never run with a
            // function reported hidden that the OS can still reach.
            log::error!("PCI: ECAM page {page:#x} lies outside the core's map; refusing to start");
            return Err(CoreError::BAD_HANDOFF);
        }
        let r = match slat {
            Slat::Npt(fmt) => Mapper::open(&fmt, &mut mem, slat_root).unmap_page(page, &mut frames),
            Slat::Ept(fmt) => Mapper::open(&fmt, &mut mem, slat_root).unmap_page(page, &mut frames),
        };
        r.map_err(|_| CoreError::OUT_OF_MEMORY)?;
    }
    if h.pci.count > 0 {
        // SAFETY: carved from the pool above (12 KiB, zeroed), used by no
        // one else yet.
        let map = unsafe { &mut *(iopm_pa as *mut [u8; 3 * PAGE as usize]) };
        // CONFIG_ADDRESS as well as CONFIG_DATA: each CPU keeps its own
        // latch (`handlers::pcicfg`).
        crate::handlers::trap_config_ports(map);
        log::info!(
            "PCI: {} functions mediated (ECAM pages and ports 0xcf8-0xcff trapped)",
            h.pci.count
        );
    }

    let hv = Hv::from_handoff(&h, apic_base);
    CORE.call_once(|| Core {
        hv,
        handoff: h,
        slat_root,
        slat,
        vmx,
        iommu,
        frames: Mutex::new(frames),
        host_cr3,
        host_top,
        msr_map_pa: msrpm_pa,
        iopm_pa,
        blank_pa,
        canary_pa,
        percpu_base,
        status,
    });
    log::info!(
        "core ready: {} KiB reserved, {} with {} pages",
        h.region.size / 1024,
        if h.vendor == VENDOR_INTEL_VMX {
            "VMX, EPT"
        } else {
            "SVM, nested paging"
        },
        if page_1g { "1 GiB" } else { "2 MiB" }
    );
    Ok(())
}

/// The integrity ranges as slices.
pub fn ro_ranges(core: &Core) -> &[PhysRange] {
    core.handoff.ro_ranges()
}

/// The processor has MTRRs (CPUID.1:EDX.MTRR[bit 12]).
fn has_mtrr() -> bool {
    cpuid(1, 0)[3] & (1 << 12) != 0
}

/// Reads the MTRRs of this processor.
fn read_mtrrs(phys_bits: u32) -> Mtrrs {
    // SAFETY: the MTRR MSRs exist on every processor with VMX (CPUID.1:EDX
    // MTRR is architectural on those); only the implemented variable ranges
    // (MTRRCAP.VCNT) and, if MTRRCAP.FIX, the fixed ones are read.
    unsafe {
        let cap = rdmsr(MSR_MTRRCAP);
        let fixed_supported = cap & (1 << 8) != 0;
        let count = (cap & 0xff).min(32) as u32;
        let mut fixed = [0u64; 11];
        if fixed_supported {
            for (i, m) in FIXED_MSRS.iter().enumerate() {
                fixed[i] = rdmsr(*m);
            }
        }
        let variable: Vec<Variable> = (0..count)
            .map(|i| Variable {
                base: rdmsr(MSR_PHYSBASE0 + 2 * i),
                mask: rdmsr(MSR_PHYSBASE0 + 2 * i + 1),
            })
            .collect();
        Mtrrs {
            def_type: rdmsr(MSR_DEF_TYPE),
            fixed_supported,
            fixed,
            variable,
            phys_bits,
        }
    }
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

/// VMX: capabilities, EPT with MTRR types, and the MSR bitmap.
fn init_vmx(
    h: &Handoff,
    plan: &npt::Plan,
    frames: &mut BumpFrames,
    bitmap_pa: u64,
) -> Result<(EptFormat, u64, VmxGlobal), CoreError> {
    use crate::vmx::caps::{CAPABILITY_MSRS, MSR_FEATURE_CONTROL, ept_cap};
    // SAFETY: the loader checked CPUID for VMX; the capability MSRs exist,
    // and `from_msrs` reads the optional ones only when advertised.
    let caps = VmxCaps::from_msrs(&|m| unsafe { rdmsr(m) }, h.phys_addr_bits);
    log::debug!(
        "VMX caps: basic {:#x} pin {:#x} proc {:#x} proc2 {:#x} exit {:#x} entry {:#x} misc {:#x} cr0 {:#x}/{:#x} cr4 {:#x}/{:#x} ept {:#x}",
        caps.basic,
        caps.pin.0,
        caps.proc1.0,
        caps.proc2.0,
        caps.exit.0,
        caps.entry.0,
        caps.misc,
        caps.cr0_fixed0,
        caps.cr0_fixed1,
        caps.cr4_fixed0,
        caps.cr4_fixed1,
        caps.ept_vpid
    );
    if !caps.ept_has(ept_cap::WALK_4 | ept_cap::WB) {
        return Err(CoreError::UNSUPPORTED_CPU);
    }
    let fmt = EptFormat {
        page_1g: caps.ept_has(ept_cap::PAGE_1G),
        page_2m: caps.ept_has(ept_cap::PAGE_2M),
    };
    let mtrrs = read_mtrrs(h.phys_addr_bits);
    let mut mem = IdentityMem;
    let top = plan.top.max(4 << 30).div_ceil(1 << 30) << 30;
    let root = Mapper::create(&fmt, &mut mem, frames)
        .map_err(|_| CoreError::OUT_OF_MEMORY)?
        .root();
    ept_map_typed(&fmt, &mut mem, frames, root, &mtrrs, 0, top)
        .map_err(|_| CoreError::OUT_OF_MEMORY)?;
    {
        let mut m = Mapper::open(&fmt, &mut mem, root);
        let e = |_| CoreError::OUT_OF_MEMORY;
        m.map_all_to_frame(
            plan.protected.base,
            plan.protected.size,
            plan.blank,
            Attrs::RO,
            frames,
        )
        .map_err(e)?;
        m.map(
            plan.status.base,
            plan.status.base,
            plan.status.size,
            Attrs::RO,
            frames,
        )
        .map_err(e)?;
    }
    // SAFETY: carved from the pool (8 KiB, zeroed); the VMX bitmap uses 4.
    let map = unsafe { &mut *(bitmap_pa as *mut [u8; msr_bitmap::SIZE]) };
    // The MSR policy decides (IA32_FEATURE_CONTROL, the VMX capability
    // MSRs, the MTRRs, IA32_APIC_BASE); the x2APIC ICR is added below when
    // INIT/SIPI are intercepted. MSRs outside the bitmap exit anyway.
    for (m, read, write) in msr_policy::intercepts(h.vendor, has_mtrr()) {
        if m != crate::apic::X2APIC_ICR_MSR {
            msr_bitmap::intercept(map, m, read, write);
        }
    }
    debug_assert!(msr_bitmap::intercepted(map, MSR_FEATURE_CONTROL, true));
    debug_assert!(
        CAPABILITY_MSRS
            .clone()
            .all(|m| msr_bitmap::intercepted(map, m, false))
    );
    use thinhv_abi::handoff::INIT_SIPI_ACTIVITY;
    // Intercepting is the default (`auto`) and `intercept`: the same
    // mechanism as on SVM, and the one Bochs 2.7 can run (see
    // docs/security.md, known limits).
    let intercept_sipi = match h.config.init_sipi {
        INIT_SIPI_ACTIVITY if !caps.wait_for_sipi_supported() => {
            log::error!(
                "init_sipi = \"activity\" but the processor has no wait-for-SIPI activity state"
            );
            return Err(CoreError::UNSUPPORTED_CPU);
        }
        INIT_SIPI_ACTIVITY => false,
        _ => true,
    };
    if intercept_sipi {
        // Writes to the xAPIC page and the x2APIC ICR trap, as on SVM.
        if let Some(apic) = plan.apic_page {
            Mapper::open(&fmt, &mut mem, root)
                .map(apic, apic, PAGE, Attrs::MMIO_RO, frames)
                .map_err(|_| CoreError::OUT_OF_MEMORY)?;
        }
        msr_bitmap::intercept(map, crate::apic::X2APIC_ICR_MSR, false, true);
    }
    log::info!(
        "AP start-up: {}",
        if intercept_sipi {
            "INIT/SIPI intercepted at the APIC"
        } else {
            "wait-for-SIPI activity state"
        }
    );
    let eptp = thinhv_paging::ept::eptp(root);
    Ok((
        fmt,
        root,
        VmxGlobal {
            caps,
            eptp,
            mtrrs,
            intercept_sipi,
        },
    ))
}
