//! `CORE_OP_INIT`: the sequence that builds the core's state
//! ([`super::core_state::Core`]) once, on the bootstrap processor, before
//! any CPU is virtualized — hand-off, status page and log, the pool, the
//! host map, the second-level tables and MSR map, the IOMMU, mediated
//! functions — one function per step.
use super::core_state::{self, Core, Slat, VmxGlobal, canary_byte, ept_map_typed};
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
use spin::Mutex;
use thinhv_abi::PhysRange;
use thinhv_abi::handoff::{CoreError, Handoff, features};
use thinhv_abi::hypercall::VENDOR_INTEL_VMX;
use thinhv_abi::layout::{HEAP_SIZE, PAGE};
use thinhv_abi::status::{DeviceRecord, StatusPageHeader};
use thinhv_paging::ept::EptFormat;
use thinhv_paging::x86::{Flavor, X86Format};
use thinhv_paging::{Attrs, BumpFrames, FrameAlloc, Mapper};

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

/// `CORE_OP_INIT`: the whole sequence, each step below.
pub fn init(handoff_pa: u64) -> Result<(), CoreError> {
    if core_state::get().is_some() {
        return Err(CoreError::BAD_OP);
    }
    let h = read_handoff(handoff_pa)?;
    // The status page first, so that the log ring holds every line.
    let status = start_status_page(&h)?;
    let pool = carve_pool(&h)?;
    let mut frames = pool.frames;
    // SAFETY: the IA32_APIC_BASE MSR exists on every x86-64 processor.
    let apic_msr = unsafe { rdmsr(crate::apic::IA32_APIC_BASE) };
    let apic_base = apic_msr & crate::apic::APIC_BASE_ADDR_MASK;
    let page_1g = h.features & features::PAGE_1G != 0;
    let (host_top, host_cr3, reach) = build_host_map(&h, apic_base, &mut frames)?;

    // The guest's second-level map, and the MSR map.
    let plan = npt::Plan {
        top: host_top,
        protected: h.protected,
        blank: pool.blank_pa,
        status: h.status,
        apic_page: Some(apic_base),
    };
    let (slat, slat_root, vmx) = build_slat(&h, &plan, &mut frames, pool.msr_map_pa)?;
    log::debug!(
        "host tables {host_cr3:#x}, second-level tables {slat_root:#x}, {} frames left",
        frames.remaining()
    );

    let iommu = super::iommu::Iommu::init(
        &h.iommu,
        &h.pci,
        h.partitions(),
        h.ioapics(),
        &super::iommu::Holes::new(h.region, h.partitions(), h.pci.held()),
        host_top,
        &reach,
        &mut frames,
        status,
    )?;
    hide_iommu_windows(
        &h,
        slat,
        slat_root,
        pool.blank_pa,
        &mut frames,
        iommu.os_emulated(),
    )?;
    hide_appliance_ram(&h, slat, slat_root, pool.blank_pa, &mut frames)?;
    // An appliance's MSI-X tables (where thinhv remaps its functions'
    // messages): out of its second-level tables, emulated
    // (`handlers::msi_remap`).
    let msix = if iommu.remaps_appliances() {
        appliance_msix_tables(&h, &reach)
    } else {
        alloc::vec::Vec::new()
    };
    let (appliance_slat, appliance_iopm_pa) =
        build_appliance_maps(&h, slat, apic_base, &msix, &mut frames)?;
    trap_mediated_functions(&h, slat, slat_root, host_top, pool.iopm_pa, &mut frames)?;
    trap_io_apics(&h, slat, slat_root, host_top, &mut frames)?;
    guard_hpet(&h, slat, slat_root, host_top, &mut frames)?;

    let hv = Hv::from_handoff(&h, apic_base);
    // The OS's units' own part of the pool: a unit of the OS's can run
    // out of frames, never take the core's.
    let mut os_frames = alloc::vec::Vec::new();
    if iommu.os_emulated() {
        // What the core keeps for itself at run time (first touches of
        // high memory, traps) stays: the OS's unit takes what is left
        // above it, at most its own pages.
        let want = thinhv_abi::layout::OS_IOMMU_PAGES.min(
            frames
                .remaining()
                .saturating_sub(thinhv_abi::layout::TABLE_SLACK_PAGES),
        );
        for _ in 0..want {
            match frames.alloc_frame() {
                Some(f) => os_frames.push(f),
                None => break,
            }
        }
        log::info!(
            "IOMMU: {} KiB set aside for the OS's unit's shadow and context tables",
            os_frames.len() * 4
        );
    }
    if iommu.os_emulated() {
        let (remap, eim) = (iommu.os_remapping(), iommu.os_eim());
        for (i, u) in hv.os_units.lock().iter_mut().enumerate() {
            let thin_hv_core::os_iommu::OsUnit::Vtd(u) = u else {
                // AMD-Vi: no interrupt remapping on offer (the OS's
                // messages stay compatibility-format, remapped by
                // thinhv as without its unit).
                iommu.publish_os(i, u.status());
                continue;
            };
            let mut offer = u.unit.offer();
            if offer.remapping && !remap {
                log::warn!(
                    "IOMMU: the units cannot remap the OS's interrupts (ECAP.IR or QI clear): its unit offers no interrupt remapping"
                );
            }
            offer.remapping &= remap;
            offer.x2apic = offer.remapping && eim;
            u.set_offer(offer);
            iommu.publish_os(i, u.status());
        }
    } else {
        // No real tables for it (`Iommu::os_emulated`): the OS's accesses
        // to the register page read the blank page, as without it, and
        // the loader hides the DMAR (the seal says there is no unit).
        hv.os_units.lock().clear();
    }
    let os_units = hv.os_units.lock().len();
    hv.os_unit_count
        .store(os_units, core::sync::atomic::Ordering::SeqCst);
    for &(part, rid, base, entries) in &msix {
        hv.msix.lock().insert(
            rid,
            thin_hv_core::partition::MsixTable {
                owner: part,
                base,
                entries,
                shadow: alloc::vec![thin_hv_core::partition::MsixEntry::default(); usize::from(entries)],
            },
        );
        log::info!(
            "appliance {}: MSI-X table of {:02x}:{:02x}.{} ({entries} entries at {base:#x}) emulated, its messages remapped",
            part.0,
            rid >> 8,
            (rid >> 3) & 0x1f,
            rid & 7
        );
    }
    core_state::install(Core {
        hv,
        handoff: h,
        slat_root,
        slat,
        vmx,
        iommu,
        frames: Mutex::new(frames),
        host_cr3,
        host_top,
        msr_map_pa: pool.msr_map_pa,
        iopm_pa: pool.iopm_pa,
        blank_pa: pool.blank_pa,
        appliance_slat,
        appliance_iopm_pa,
        canary_pa: pool.canary_pa,
        percpu_base: pool.percpu_base,
        status,
        high_mmio: Mutex::new(reach.high),
        os_iommu_free: Mutex::new(os_frames),
    });
    if let Some(core) = core_state::get() {
        super::vcpu::publish_appliances(core);
    }
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

/// Copies the loader's hand-off out of its region and validates it.
fn read_handoff(handoff_pa: u64) -> Result<Handoff, CoreError> {
    if handoff_pa == 0 || !handoff_pa.is_multiple_of(8) {
        return Err(CoreError::BAD_HANDOFF);
    }
    // SAFETY: the loader passes the physical (identity-mapped) address of a
    // `Handoff` it wrote inside the protected region; it is copied out at once.
    let h: Handoff = unsafe { core::ptr::read_volatile(handoff_pa as *const Handoff) };
    h.validate().map_err(|_| CoreError::BAD_HANDOFF)?;
    Ok(h)
}

/// The status page: header, CPU list, device report; then the logger,
/// which writes into its ring from now on.
fn start_status_page(h: &Handoff) -> Result<StatusPage, CoreError> {
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
    let (major, minor, patch) = thinhv_abi::unpack_version(thinhv_abi::VERSION);
    log::info!(
        "thinhv core {major}.{minor}.{patch} starting: {} CPUs, protected {:#x}+{:#x}, status page {:#x}+{:#x}",
        h.cpu_count,
        h.protected.base,
        h.protected.size,
        h.status.base,
        h.status.size
    );
    Ok(status)
}

/// What the pool is cut into at start; the rest feeds page tables.
struct Pool {
    msr_map_pa: u64,
    iopm_pa: u64,
    blank_pa: u64,
    canary_pa: u64,
    percpu_base: u64,
    frames: BumpFrames,
}

/// Cuts the pool the loader reserved: heap (handed to the allocator), MSR
/// and I/O permission maps, the blank and canary pages, one `PerCpu` per
/// CPU, and frames for tables; all zeroed, the canary filled.
fn carve_pool(h: &Handoff) -> Result<Pool, CoreError> {
    let mut carve = Carver {
        next: h.pool.base,
        end: h.pool.end(),
    };
    let heap = carve.take(HEAP_SIZE, PAGE)?;
    let msr_map_pa = carve.take(MSRPM_SIZE as u64, PAGE)?;
    let iopm_pa = carve.take(3 * PAGE, PAGE)?;
    let blank_pa = carve.take(PAGE, PAGE)?;
    let canary_pa = carve.take(PAGE, PAGE)?;
    let per_cpu_size = core::mem::size_of::<PerCpu>() as u64;
    let percpu_base = carve.take(per_cpu_size * u64::from(h.cpu_count), PAGE)?;
    let tables = carve.take(0, PAGE)?;
    let frames = BumpFrames::new(tables, h.pool.end() - tables);

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
    Ok(Pool {
        msr_map_pa,
        iopm_pa,
        blank_pa,
        canary_pa,
        percpu_base,
        frames,
    })
}

/// The core's own identity map (supervisor, no NX, APIC uncached).
/// Returns its top and root.
fn build_host_map(
    h: &Handoff,
    apic_base: u64,
    frames: &mut BumpFrames,
) -> Result<(u64, u64, super::iommu::Reach), CoreError> {
    let host_top = thinhv_abi::handoff::identity_map_top(h.phys_top);
    let host_fmt = X86Format {
        flavor: Flavor::Host,
        page_1g: h.features & features::PAGE_1G != 0,
        nx: false,
    };
    // SAFETY: only this core's table roots and frames from its own
    // allocator reach the engine (`IdentityMem::new`'s contract).
    let mut mem = unsafe { IdentityMem::new() };
    let oom = |_| CoreError::OUT_OF_MEMORY;
    let mut m = Mapper::create(&host_fmt, &mut mem, frames).map_err(oom)?;
    m.map(0, 0, host_top, Attrs::RWX, frames).map_err(oom)?;
    m.map(apic_base, apic_base, PAGE, Attrs::MMIO_RW, frames)
        .map_err(oom)?;
    // Appliances' MSI-X tables beyond the identity map (64-bit BARs
    // above the top of RAM): uncached, so that thinhv can emulate them. A
    // page that cannot be mapped leaves its function unremapped.
    let mut reach = super::iommu::Reach {
        top: host_top,
        high: alloc::vec::Vec::new(),
    };
    let limit = 1u64 << h.phys_addr_bits.clamp(32, 48);
    for page in super::iommu::appliance_table_pages(h.partitions(), host_top) {
        if page.saturating_add(PAGE) <= limit
            && m.map(page, page, PAGE, Attrs::MMIO_RW, frames).is_ok()
        {
            log::info!("appliance MSI-X table page {page:#x}: mapped (beyond the identity map)");
            reach.high.push(page);
        } else {
            log::warn!(
                "appliance MSI-X table page {page:#x}: cannot be mapped; its function's messages are not remapped"
            );
        }
    }
    Ok((host_top, m.root(), reach))
}

/// The guest's second-level tables (NPT, or EPT with MTRR types) and the
/// MSR map the policy asks for.
fn build_slat(
    h: &Handoff,
    plan: &npt::Plan,
    frames: &mut BumpFrames,
    msr_map_pa: u64,
) -> Result<(Slat, u64, Option<VmxGlobal>), CoreError> {
    if h.vendor == VENDOR_INTEL_VMX {
        let (fmt, root, g) = init_vmx(h, plan, frames, msr_map_pa)?;
        return Ok((Slat::Ept(fmt), root, Some(g)));
    }
    let fmt = X86Format {
        flavor: Flavor::Nested,
        page_1g: h.features & features::PAGE_1G != 0,
        nx: h.features & features::NX != 0,
    };
    // SAFETY: only this core's table roots and frames from its own
    // allocator reach the engine (`IdentityMem::new`'s contract).
    let mut mem = unsafe { IdentityMem::new() };
    let root = npt::build(&fmt, &mut mem, frames, plan).map_err(|_| CoreError::OUT_OF_MEMORY)?;
    // SAFETY: carved from the pool (8 KiB, zeroed), used by no one else.
    let map = unsafe { &mut *(msr_map_pa as *mut [u8; MSRPM_SIZE]) };
    // The MSR policy decides; MSRs outside the map's ranges exit anyway.
    for (m, read, write) in msr_policy::intercepts(h.vendor, has_mtrr()) {
        msrpm::intercept(map, m, read, write);
    }
    Ok((Slat::Npt(fmt), root, None))
}

/// The IOMMU's register windows hidden from the guest (reads as zeros,
/// writes discarded) so that the OS cannot switch it off; where the OS has
/// an emulated unit of its own (`emulated`), each window's first page out
/// of the OS's tables instead, so that every access exits
/// (`handlers::os_iommu`), and the rest hidden.
fn hide_iommu_windows(
    h: &Handoff,
    slat: Slat,
    slat_root: u64,
    blank_pa: u64,
    frames: &mut BumpFrames,
    emulated: bool,
) -> Result<(), CoreError> {
    if h.iommu.mode != thinhv_abi::handoff::IOMMU_MODE_PROTECT {
        return Ok(());
    }
    for u in h.iommu.units() {
        blank_out(slat, slat_root, u.window(), blank_pa, frames)?;
        if emulated {
            let len = if h.iommu.kind == thinhv_abi::handoff::IOMMU_KIND_AMDVI {
                thinhv_passthrough::vamdvi::WINDOW
            } else {
                0x1000
            };
            for page in (0..len).step_by(0x1000) {
                unmap_from_os(slat, slat_root, (u.base & !0xfff) + page, frames)?;
            }
            log::info!(
                "IOMMU: unit {:#x}: the OS programs an emulated unit at its registers ([iommu] os = \"emulated\")",
                u.base
            );
        }
    }
    Ok(())
}

/// Appliance RAM, in the OS's second-level tables: every page the blank
/// frame, read-only (reads see zeros, writes fault and are discarded, as
/// for thinhv's own region).
fn hide_appliance_ram(
    h: &Handoff,
    slat: Slat,
    slat_root: u64,
    blank_pa: u64,
    frames: &mut BumpFrames,
) -> Result<(), CoreError> {
    // BARs of functions thinhv keeps (an NVMe PF whose secondary
    // controllers it set up): no one's.
    for &bar in h.pci.held() {
        if bar.end() > thinhv_abi::handoff::identity_map_top(h.phys_top) {
            premap_gibs(slat, slat_root, bar, frames)?;
        }
        blank_out(slat, slat_root, bar, blank_pa, frames)?;
        log::info!(
            "PCI: BAR {:#x}+{:#x} of a function thinhv keeps out of the OS's second-level tables and IOMMU domain",
            bar.base,
            bar.size
        );
    }
    for p in h.partitions() {
        blank_out(slat, slat_root, p.ram, blank_pa, frames)?;
        if !p.image.is_empty() {
            blank_out(slat, slat_root, p.image, blank_pa, frames)?;
        }
        log::info!(
            "appliance {:?}: {} MiB at {:#x} out of the OS's second-level tables and IOMMU domain",
            p.name(),
            p.ram.size >> 20,
            p.ram.base
        );
        for d in p.devices() {
            for (_, bar) in d.bars() {
                // Above the map's top the OS's tables are filled a GiB at
                // a time on first touch (`npt::demand_map`), which would
                // map the BAR back: its GiBs are mapped now, as that would,
                // and the BAR blanked inside them.
                if bar.end() > thinhv_abi::handoff::identity_map_top(h.phys_top) {
                    premap_gibs(slat, slat_root, bar, frames)?;
                }
                blank_out(slat, slat_root, bar, blank_pa, frames)?;
            }
            log::info!(
                "appliance {:?}: PCI function {:02x}:{:02x}.{}: {} BAR(s) out of the OS's second-level tables and IOMMU domain",
                p.name(),
                d.rid >> 8,
                (d.rid >> 3) & 0x1f,
                d.rid & 7,
                d.bar_count
            );
        }
    }
    Ok(())
}

/// Each appliance's second-level tables: its guest-physical
/// `[0, RAM size)` on its host RAM, the local APIC page (reads reach
/// the processor's own APIC, writes trap as for the OS: the ICR is
/// filtered), and its functions' BARs at their addresses; nothing else. And one I/O permission map, every port
/// intercepted, for all appliance processors.
/// The MSI-X tables of appliances' functions whose messages are remapped:
/// (partition, routing ID, address of entry 0, entries).
fn appliance_msix_tables(
    h: &Handoff,
    reach: &super::iommu::Reach,
) -> alloc::vec::Vec<(thin_hv_core::partition::PartitionId, u16, u64, u16)> {
    let mut out = alloc::vec::Vec::new();
    for (i, p) in h.partitions().iter().enumerate() {
        let part = thin_hv_core::partition::PartitionId(u8::try_from(i + 1).unwrap_or(u8::MAX));
        for d in p.devices() {
            if let Some(Some((base, entries))) = super::iommu::appliance_msix(d)
                && super::iommu::appliance_remapped(d, reach)
            {
                out.push((part, d.rid, base, entries));
            }
        }
    }
    out
}

fn build_appliance_maps(
    h: &Handoff,
    slat: Slat,
    apic_base: u64,
    msix: &[(thin_hv_core::partition::PartitionId, u16, u64, u16)],
    frames: &mut BumpFrames,
) -> Result<([u64; thinhv_abi::handoff::MAX_APPLIANCES], u64), CoreError> {
    let mut roots = [0u64; thinhv_abi::handoff::MAX_APPLIANCES];
    if h.partitions().is_empty() {
        return Ok((roots, 0));
    }
    // Three consecutive frames from the bump allocator (SVM's I/O
    // permission map; VMX's I/O bitmaps A and B are its first two).
    let iopm = frames.alloc_frame().ok_or(CoreError::OUT_OF_MEMORY)?;
    for i in 1..3 {
        if frames.alloc_frame() != Some(iopm + i * PAGE) {
            return Err(CoreError::OUT_OF_MEMORY);
        }
    }
    // SAFETY: three frames just taken from the core's own allocator.
    unsafe { core::ptr::write_bytes(iopm as *mut u8, 0xff, 3 * PAGE as usize) };
    for (i, p) in h.partitions().iter().enumerate() {
        // SAFETY: only this core's table roots and frames from its own
        // allocator reach the engine (`IdentityMem::new`'s contract).
        let mut mem = unsafe { IdentityMem::new() };
        let part = thin_hv_core::partition::PartitionId(u8::try_from(i + 1).unwrap_or(u8::MAX));
        let tables: alloc::vec::Vec<(u64, u16)> = msix
            .iter()
            .filter(|t| t.0 == part)
            .map(|t| (t.2, t.3))
            .collect();
        roots[i] = match slat {
            Slat::Npt(fmt) => appliance_map(&fmt, &mut mem, p, apic_base, &tables, frames)?,
            Slat::Ept(fmt) => appliance_map(&fmt, &mut mem, p, apic_base, &tables, frames)?,
        };
    }
    Ok((roots, iopm))
}

/// Maps appliance `p`'s RAM where its guest-physical map has it
/// (`thinhv_abi::handoff::appliance_ram_ranges`): in its second-level
/// tables and in its IOMMU domain alike.
pub(super) fn map_appliance_ram<F: thinhv_paging::EntryFormat, M: thinhv_paging::PhysMem>(
    m: &mut Mapper<'_, F, M>,
    p: &thinhv_abi::handoff::PartitionInfo,
    frames: &mut BumpFrames,
) -> Result<(), thinhv_paging::MapError> {
    for (gpa, offset, len) in thinhv_abi::handoff::appliance_ram_ranges(p.ram.size) {
        if len != 0 {
            m.map(gpa, p.ram.base + offset, len, Attrs::RWX, frames)?;
        }
    }
    Ok(())
}

/// One appliance's second-level tables (`build_appliance_maps`).
fn appliance_map(
    fmt: &impl thinhv_paging::EntryFormat,
    mem: &mut IdentityMem,
    p: &thinhv_abi::handoff::PartitionInfo,
    apic_base: u64,
    msix: &[(u64, u16)],
    frames: &mut BumpFrames,
) -> Result<u64, CoreError> {
    let oom = |_| CoreError::OUT_OF_MEMORY;
    let mut m = Mapper::create(fmt, mem, frames).map_err(oom)?;
    map_appliance_ram(&mut m, p, frames).map_err(oom)?;
    m.map(apic_base, apic_base, PAGE, Attrs::MMIO_RO, frames)
        .map_err(oom)?;
    // Its functions' BARs, where the firmware put them, but for the pages
    // of MSI-X tables thinhv emulates.
    for d in p.devices() {
        for (_, bar) in d.bars() {
            m.map(bar.base, bar.base, bar.size, Attrs::MMIO_RW, frames)
                .map_err(oom)?;
        }
    }
    for &(base, entries) in msix {
        let end = (base + u64::from(entries) * 16).next_multiple_of(PAGE);
        let mut page = base & !(PAGE - 1);
        while page < end {
            m.unmap_page(page, frames).map_err(oom)?;
            page += PAGE;
        }
    }
    Ok(m.root())
}

/// Maps every GiB `range` touches 1:1 in the OS's second-level tables, as
/// a first touch there would (`npt::demand_map`), where nothing maps it
/// yet.
fn premap_gibs(
    slat: Slat,
    slat_root: u64,
    range: PhysRange,
    frames: &mut BumpFrames,
) -> Result<(), CoreError> {
    const GIB: u64 = 1 << 30;
    // SAFETY: only this core's table roots and frames from its own
    // allocator reach the engine (`IdentityMem::new`'s contract).
    let mut mem = unsafe { IdentityMem::new() };
    let mut gib = range.base & !(GIB - 1);
    while gib < range.end() {
        let r = match slat {
            Slat::Npt(fmt) => {
                let mut m = Mapper::open(&fmt, &mut mem, slat_root);
                if m.translate(gib).is_some() {
                    Ok(())
                } else {
                    m.map(gib, gib, GIB, Attrs::RWX, frames)
                }
            }
            Slat::Ept(fmt) => {
                let mut m = Mapper::open(&fmt, &mut mem, slat_root);
                if m.translate(gib).is_some() {
                    Ok(())
                } else {
                    m.map(gib, gib, GIB, Attrs::RWX, frames)
                }
            }
        };
        r.map_err(|_| CoreError::OUT_OF_MEMORY)?;
        gib += GIB;
    }
    Ok(())
}

/// Maps every page of `range` to the blank frame, read-only.
fn blank_out(
    slat: Slat,
    slat_root: u64,
    range: PhysRange,
    blank_pa: u64,
    frames: &mut BumpFrames,
) -> Result<(), CoreError> {
    // SAFETY: only this core's table roots and frames from its own
    // allocator reach the engine (`IdentityMem::new`'s contract).
    let mut mem = unsafe { IdentityMem::new() };
    let PhysRange { base, size } = range;
    let r = match slat {
        Slat::Npt(fmt) => Mapper::open(&fmt, &mut mem, slat_root).map_all_to_frame(
            base,
            size,
            blank_pa,
            Attrs::RO,
            frames,
        ),
        Slat::Ept(fmt) => Mapper::open(&fmt, &mut mem, slat_root).map_all_to_frame(
            base,
            size,
            blank_pa,
            Attrs::RO,
            frames,
        ),
    };
    r.map_err(|_| CoreError::OUT_OF_MEMORY)
}

/// Mediated PCI functions: their ECAM pages fault (every access is
/// emulated), and the configuration ports exit (the map serves as SVM's
/// I/O permission map and VMX's I/O bitmaps A and B alike).
fn trap_mediated_functions(
    h: &Handoff,
    slat: Slat,
    slat_root: u64,
    host_top: u64,
    iopm_pa: u64,
    frames: &mut BumpFrames,
) -> Result<(), CoreError> {
    for m in h.pci.mediated() {
        let page = h.pci.page_of(m);
        if page.saturating_add(PAGE) > host_top {
            // `Handoff::validate` refused this already (the loader leaves
            // such a function with the OS and says so): never run with a
            // function reported hidden that the OS can still reach.
            log::error!("PCI: ECAM page {page:#x} lies outside the core's map; refusing to start");
            return Err(CoreError::BAD_HANDOFF);
        }
        unmap_from_os(slat, slat_root, page, frames)?;
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
    Ok(())
}

/// Takes the 4 KiB `page` out of the OS's second-level tables, so that
/// every access to it exits.
fn unmap_from_os(
    slat: Slat,
    slat_root: u64,
    page: u64,
    frames: &mut BumpFrames,
) -> Result<(), CoreError> {
    // SAFETY: only this core's table roots and frames from its own
    // allocator reach the engine (`IdentityMem::new`'s contract).
    let mut mem = unsafe { IdentityMem::new() };
    let r = match slat {
        Slat::Npt(fmt) => Mapper::open(&fmt, &mut mem, slat_root).unmap_page(page, frames),
        Slat::Ept(fmt) => Mapper::open(&fmt, &mut mem, slat_root).unmap_page(page, frames),
    };
    r.map_err(|_| CoreError::OUT_OF_MEMORY)
}

/// Maps the 4 KiB `page` identity with `attrs` in the OS's second-level
/// tables.
fn map_in_os(
    slat: Slat,
    slat_root: u64,
    page: u64,
    attrs: Attrs,
    frames: &mut BumpFrames,
) -> Result<(), CoreError> {
    // SAFETY: only this core's table roots and frames from its own
    // allocator reach the engine (`IdentityMem::new`'s contract).
    let mut mem = unsafe { IdentityMem::new() };
    let r = match slat {
        Slat::Npt(fmt) => {
            Mapper::open(&fmt, &mut mem, slat_root).map(page, page, PAGE, attrs, frames)
        }
        Slat::Ept(fmt) => {
            Mapper::open(&fmt, &mut mem, slat_root).map(page, page, PAGE, attrs, frames)
        }
    };
    r.map_err(|_| CoreError::OUT_OF_MEMORY)
}

/// The I/O APICs whose entries thinhv judges (`handlers::ioapic`): their
/// register pages out of the OS's second-level tables, so that every
/// access exits.
fn trap_io_apics(
    h: &Handoff,
    slat: Slat,
    slat_root: u64,
    host_top: u64,
    frames: &mut BumpFrames,
) -> Result<(), CoreError> {
    for a in h.ioapics() {
        if a.base.saturating_add(PAGE) > host_top {
            // `Handoff::validate` refused this already.
            return Err(CoreError::BAD_HANDOFF);
        }
        unmap_from_os(slat, slat_root, a.base, frames)?;
        log::info!(
            "I/O APIC {} at {:#x}: the OS's redirection entries judged (its page trapped)",
            a.id,
            a.base
        );
    }
    Ok(())
}

/// The HPET whose FSB delivery the OS may not turn on
/// (`handlers::hpet`): its register page read-only (uncached) in the OS's
/// second-level tables, so that every store exits and reads do not.
fn guard_hpet(
    h: &Handoff,
    slat: Slat,
    slat_root: u64,
    host_top: u64,
    frames: &mut BumpFrames,
) -> Result<(), CoreError> {
    if h.hpet == 0 {
        return Ok(());
    }
    if h.hpet.saturating_add(PAGE) > host_top {
        // `Handoff::validate` refused this already.
        return Err(CoreError::BAD_HANDOFF);
    }
    map_in_os(slat, slat_root, h.hpet, Attrs::MMIO_RO, frames)?;
    // A timer the firmware left with FSB delivery on would send whatever
    // the OS writes into its FSB route register: off, and its interrupt
    // with it, before the OS runs.
    let reg = |off: u64| (h.hpet + off) as *mut u32;
    // SAFETY: `h.hpet` is the HPET's register page, below the core's
    // identity map (checked above; `Handoff::validate` too), read
    // natively before any guest runs; the capabilities register is a
    // dword at offset 0.
    let timers = (u64::from(unsafe { core::ptr::read_volatile(reg(0)) } >> 8) & 0x1f) + 1;
    let mut off = 0;
    for t in 0..timers {
        let at =
            thinhv_passthrough::hpet::TIMER_CONFIG + t * thinhv_passthrough::hpet::TIMER_STRIDE;
        // SAFETY: timer `t`'s configuration register, a dword inside the
        // same page (32 timers at most end at 0x500).
        unsafe {
            let v = core::ptr::read_volatile(reg(at));
            if u64::from(v) & thinhv_passthrough::hpet::FSB_EN != 0 {
                let (v, _) = thinhv_passthrough::hpet::without_fsb(at, 4, u64::from(v));
                core::ptr::write_volatile(reg(at), v as u32);
                off += 1;
            }
        }
    }
    log::info!(
        "HPET at {:#x}: the OS's stores pass without FSB delivery (its page read-only; {off} of its {timers} timers had it on)",
        h.hpet
    );
    Ok(())
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
    // SAFETY: only this core's table roots and frames from its own
    // allocator reach the engine (`IdentityMem::new`'s contract).
    let mut mem = unsafe { IdentityMem::new() };
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
