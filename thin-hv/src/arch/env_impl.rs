//! [`Env`] over real hardware.
use super::core_state::{Core, Slat, canary_byte};
use super::instr::{cpuid, rdmsr, wrmsr};
use super::phys::IdentityMem;
use crate::apic::{APIC_BASE_EXTD, IA32_APIC_BASE, X2APIC_ICR_MSR, nmi_icr, reg};
use crate::env::{Env, Integrity};
use crate::hv::Hv;
use core::sync::atomic::Ordering;
use thinhv_abi::exit::EXIT_REASON_COUNT;
use thinhv_abi::hypercall::StatusReport;
use thinhv_passthrough::irq_remap;

/// The environment of one CPU's exit handler.
pub struct HwEnv {
    /// Global state.
    pub core: &'static Core,
    /// This CPU.
    pub cpu: usize,
}

/// ICR delivery-status bit (xAPIC): a previous IPI is still being sent.
const ICR_BUSY: u32 = 1 << 12;

impl HwEnv {
    fn x2apic() -> bool {
        // SAFETY: IA32_APIC_BASE exists on every x86-64 processor.
        unsafe { rdmsr(IA32_APIC_BASE) & APIC_BASE_EXTD != 0 }
    }

    fn mmio(&self, offset: u32) -> *mut u32 {
        (self.core.hv.apic_base + u64::from(offset & 0xff0)) as *mut u32
    }
}

impl HwEnv {
    /// The last line before an MMIO access a handler asks for: inside the
    /// host's identity map, never the core's memory or its status page.
    fn mmio_allowed(&self, pa: u64, size: u8) -> bool {
        let len = u64::from(size.clamp(1, 4));
        let mapped = pa.checked_add(len).is_some_and(|end| {
            end <= self.core.host_top
                || (pa & !0xfff == (end - 1) & !0xfff
                    && self.core.high_mmio.lock().contains(&(pa & !0xfff)))
        });
        let ok = mapped && !self.core.hv.touches_hypervisor(pa, len);
        if !ok {
            log::warn!("MMIO access refused at {pa:#x} (size {size})");
        }
        ok
    }
}

impl HwEnv {
    /// Makes the device page `page`, beyond the core's initial map,
    /// reachable by the core (mapped uncached into its own tables, once),
    /// and the GiB around it present in the second-level tables (as a
    /// first touch would), so that the caller can take the page out.
    fn map_high(&mut self, page: u64) -> bool {
        use thinhv_paging::x86::{Flavor, X86Format};
        use thinhv_paging::{Attrs, Mapper};
        let core = self.core;
        let mut high = core.high_mmio.lock();
        if !high.contains(&page) {
            let fmt = X86Format {
                flavor: Flavor::Host,
                page_1g: core.handoff.features & thinhv_abi::handoff::features::PAGE_1G != 0,
                nx: false,
            };
            let mut frames = core.frames.lock();
            // SAFETY: only this core's table roots and frames from its own
            // allocator reach the engine (`IdentityMem::new`'s contract).
            // The page lies beyond every RAM range (above `host_top`), so
            // the new entry aliases none of the core's memory; nothing was
            // mapped there before, so no processor has it cached.
            let mut mem = unsafe { IdentityMem::new() };
            if Mapper::open(&fmt, &mut mem, core.host_cr3)
                .map(page, page, 4096, Attrs::MMIO_RW, &mut *frames)
                .is_err()
            {
                return false;
            }
            high.push(page);
        }
        drop(high);
        self.demand_map(page)
    }

    /// The message a function whose message was refused holds where
    /// thinhv writes judged messages itself (VT-d): vector 15, fixed, to
    /// its owner's first processor.
    fn parked_message(&self, rid: u16) -> Result<(u64, u32), irq_remap::Refusal> {
        let hv = &self.core.hv;
        let owner = (1..=thinhv_abi::handoff::MAX_APPLIANCES)
            .find_map(|n| {
                let id = thin_hv_core::partition::PartitionId(u8::try_from(n).ok()?);
                hv.appliance(id)
                    .filter(|p| p.info.devices().iter().any(|d| d.rid == rid))
                    .map(|_| id)
            })
            .unwrap_or(thin_hv_core::partition::PartitionId::OS);
        let cpu = hv
            .cpus()
            .iter()
            .find(|c| c.partition == owner)
            .ok_or(irq_remap::Refusal::Foreign)?;
        irq_remap::compat::msi(&irq_remap::Target {
            apic_id: cpu.apic_id,
            vector: 15,
            delivery: irq_remap::Delivery::Fixed,
            level: false,
        })
    }
}

impl Env for HwEnv {
    type OsIommu = super::os_iommu::Host;

    fn os_iommu(&mut self) -> Option<super::os_iommu::Host> {
        super::os_iommu::Host::new(self.core)
    }

    fn take_os_iommu_faults(&mut self) -> alloc::vec::Vec<thin_hv_core::os_iommu::RealFault> {
        self.core.iommu.take_os_faults()
    }

    fn publish_os_iommu(&self, index: usize, status: thin_hv_core::os_iommu::OsUnitStatus) {
        self.core.iommu.publish_os(index, status);
    }

    fn hv(&self) -> &Hv {
        &self.core.hv
    }

    fn cpu_index(&self) -> usize {
        self.cpu
    }

    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        cpuid(leaf, subleaf)
    }

    fn read_phys(&self, gpa: u64, buf: &mut [u8]) {
        let len = buf.len() as u64;
        let part = self.core.hv.space_of(self.cpu);
        let Some(pa) = self.core.hv.host_address(part, gpa, len) else {
            buf.fill(0);
            return;
        };
        if pa
            .checked_add(len)
            .is_none_or(|end| end > self.core.host_top)
            || self.core.hv.protected.overlaps(pa, len)
            || self
                .core
                .hv
                .foreign_ram(self.core.hv.space_of(self.cpu), pa, len)
        {
            // Outside the map, the core's own memory or another partition's
            // RAM (a guest page table pointed there must not make the walker
            // read it): all zeros.
            buf.fill(0);
            return;
        }
        // SAFETY: the range is inside the core's identity map and outside
        // the core's protected memory (both checked just above), so the
        // copy neither faults nor aliases anything the core holds.
        unsafe { core::ptr::copy_nonoverlapping(pa as *const u8, buf.as_mut_ptr(), buf.len()) };
    }

    fn write_phys(&mut self, gpa: u64, data: &[u8]) {
        let len = data.len() as u64;
        let part = self.core.hv.space_of(self.cpu);
        let Some(pa) = self.core.hv.host_address(part, gpa, len) else {
            log::warn!("write_phys refused at guest {gpa:#x}+{len:#x}: no memory there");
            return;
        };
        if pa
            .checked_add(len)
            .is_none_or(|end| end > self.core.host_top)
            || self.core.hv.touches_hypervisor(pa, len)
            || self
                .core
                .hv
                .foreign_ram(self.core.hv.space_of(self.cpu), pa, len)
        {
            // Callers validate buffers (`guest_mem::check_buffer`); this is
            // the last line, whatever a handler passes.
            log::warn!("write_phys refused at {pa:#x}+{len:#x}");
            return;
        }
        // SAFETY: the range is inside the core's identity map and touches
        // neither the core's memory nor its status page (both checked just
        // above): it is guest memory, which the core holds no references
        // into.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), pa as *mut u8, data.len()) };
    }

    fn lapic_read(&self, offset: u32) -> u32 {
        if Self::x2apic() {
            if offset == reg::ICR_HIGH {
                return 0;
            }
            // SAFETY: x2APIC register MSRs 0x800..0x8ff exist in x2APIC mode.
            return unsafe { rdmsr(0x800 + (offset >> 4)) } as u32;
        }
        // SAFETY: the APIC page is mapped uncached in the core's tables.
        unsafe { core::ptr::read_volatile(self.mmio(offset)) }
    }

    fn lapic_write(&mut self, offset: u32, value: u32) {
        if Self::x2apic() {
            if offset != reg::ICR_HIGH {
                // SAFETY: as in `lapic_read`; writes are what the guest asked
                // for on its own APIC.
                unsafe { wrmsr(0x800 + (offset >> 4), u64::from(value)) };
            }
            return;
        }
        if offset == reg::ICR_LOW {
            for _ in 0..100_000 {
                // SAFETY: the APIC page is mapped uncached.
                if unsafe { core::ptr::read_volatile(self.mmio(reg::ICR_LOW)) } & ICR_BUSY == 0 {
                    break;
                }
                core::hint::spin_loop();
            }
        }
        // SAFETY: the APIC page is mapped uncached; the guest asked for
        // this write on its own APIC (or the core sends an IPI).
        unsafe { core::ptr::write_volatile(self.mmio(offset), value) };
    }

    fn x2apic_icr_write(&mut self, value: u64) {
        // SAFETY: the guest's own ICR write, passed on unchanged.
        unsafe { wrmsr(X2APIC_ICR_MSR, value) };
    }

    fn kick_for_init(&mut self, apic_id: u32) {
        let x2 = Self::x2apic();
        // An NMI: every CPU under thinhv takes NMIs itself (SVM: NMI
        // intercept, held by GIF in host mode; VMX: NMI exiting, recorded
        // by the host handler in root mode). A real INIT would reset an SVM
        // CPU in host mode, and on VMX stays latched while the CPU is in
        // root operation (SDM Vol. 3C §26.2).
        let v = nmi_icr(apic_id, x2);
        if x2 {
            // SAFETY: an IPI to a CPU under thinhv, which takes it as above.
            unsafe { wrmsr(X2APIC_ICR_MSR, v) };
        } else {
            self.lapic_write(reg::ICR_HIGH, (v >> 32) as u32);
            self.lapic_write(reg::ICR_LOW, v as u32);
        }
    }

    fn demand_map(&mut self, gpa: u64) -> bool {
        if gpa < self.core.host_top {
            // Everything below was mapped at start: a hole there is one
            // thinhv made (a mediated ECAM page, a page the APIC
            // relocation traps), never filled here — mapping the GiB again
            // would also make the xAPIC page writable.
            // SAFETY: the engine is given only this core's table roots and
            // frames from its pool (`IdentityMem::new`'s contract).
            let mut mem = unsafe { IdentityMem::new() };
            return match &self.core.slat {
                Slat::Npt(fmt) => thinhv_paging::Mapper::open(fmt, &mut mem, self.core.slat_root)
                    .translate(gpa)
                    .is_some(),
                Slat::Ept(fmt) => thinhv_paging::Mapper::open(fmt, &mut mem, self.core.slat_root)
                    .translate(gpa)
                    .is_some(),
            };
        }
        let mut frames = self.core.frames.lock();
        // SAFETY: only this core's table roots and frames from its own
        // allocator reach the engine (`IdentityMem::new`'s contract).
        let mut mem = unsafe { IdentityMem::new() };
        let avoid = [self.core.hv.protected, self.core.hv.status];
        let bits = self.core.hv.phys_addr_bits;
        match (&self.core.slat, &self.core.vmx) {
            (Slat::Npt(fmt), _) => crate::npt::demand_map(
                fmt,
                &mut mem,
                &mut *frames,
                self.core.slat_root,
                gpa,
                bits,
                &avoid,
            ),
            (Slat::Ept(fmt), Some(vmx)) => {
                let base = gpa & !((1u64 << 30) - 1);
                if (bits < 64 && gpa >> bits.min(52) != 0)
                    || avoid.iter().any(|r| r.overlaps(base, 1 << 30))
                {
                    return false;
                }
                if thinhv_paging::Mapper::open(fmt, &mut mem, self.core.slat_root)
                    .translate(gpa)
                    .is_some()
                {
                    return true;
                }
                super::core_state::ept_map_typed(
                    fmt,
                    &mut mem,
                    &mut *frames,
                    self.core.slat_root,
                    &vmx.mtrrs,
                    base,
                    base + (1 << 30),
                )
                .is_ok()
            }
            (Slat::Ept(_), None) => false,
        }
    }

    fn apic_page_trap(&mut self, page: u64, trap: bool) -> bool {
        use thinhv_paging::{Attrs, Mapper};
        const PAGE: u64 = 4096;
        let core = self.core;
        let hv = &core.hv;
        let iommu_window = core
            .handoff
            .iommu
            .units()
            .iter()
            .any(|u| u.window().overlaps(page, PAGE));
        let bits = hv.phys_addr_bits.min(52);
        let high = page.saturating_add(PAGE) > core.host_top;
        if !page.is_multiple_of(PAGE)
            || (high && page.saturating_add(PAGE) > 1u64 << bits)
            || hv.touches_hypervisor(page, PAGE)
            || hv.pci.mediated_at(page).is_some()
            || hv.is_ioapic_page(page)
            || hv.is_hpet_page(page)
            || iommu_window
        {
            // Outside the core's own map (it could not make the accesses
            // for the other CPUs), or a page the second-level tables
            // already keep from the guest.
            return false;
        }
        if high && trap && !self.map_high(page) {
            return false;
        }
        let mut frames = core.frames.lock();
        // SAFETY: only this core's table roots and frames from its own
        // allocator reach the engine (`IdentityMem::new`'s contract).
        let mut mem = unsafe { IdentityMem::new() };
        let xapic_page = page == hv.apic_base;
        match (&core.slat, &core.vmx) {
            (Slat::Npt(fmt), _) => {
                let mut m = Mapper::open(fmt, &mut mem, core.slat_root);
                if trap {
                    m.unmap_page(page, &mut *frames).is_ok()
                } else {
                    // As `npt::build` maps it.
                    let attrs = if xapic_page {
                        Attrs::MMIO_RO
                    } else {
                        Attrs::RWX
                    };
                    m.map(page, page, PAGE, attrs, &mut *frames).is_ok()
                }
            }
            (Slat::Ept(fmt), Some(vmx)) => {
                if trap {
                    Mapper::open(fmt, &mut mem, core.slat_root)
                        .unmap_page(page, &mut *frames)
                        .is_ok()
                } else if xapic_page && vmx.intercept_sipi {
                    // As `init_vmx` maps it.
                    Mapper::open(fmt, &mut mem, core.slat_root)
                        .map(page, page, PAGE, Attrs::MMIO_RO, &mut *frames)
                        .is_ok()
                } else {
                    super::core_state::ept_map_typed(
                        fmt,
                        &mut mem,
                        &mut *frames,
                        core.slat_root,
                        &vmx.mtrrs,
                        page,
                        page + PAGE,
                    )
                    .is_ok()
                }
            }
            (Slat::Ept(_), None) => false,
        }
    }

    fn status_report(&self) -> StatusReport {
        let hv = &self.core.hv;
        let h = &self.core.handoff;
        let exits_total = (0..hv.cpus().len())
            .filter_map(|c| self.core.status.counts(c))
            .map(|a| a.iter().sum::<u64>())
            .sum();
        StatusReport {
            size: core::mem::size_of::<StatusReport>() as u32,
            abi_version: thinhv_abi::ABI_VERSION,
            version: thinhv_abi::VERSION,
            vendor: h.vendor,
            cpus_expected: h.cpu_count,
            cpus_virtualized: hv.cpus_virtualized.load(Ordering::Relaxed),
            bytes_reserved: h.region.size,
            protected_base: h.protected.base,
            protected_size: h.protected.size,
            status_page_base: h.status.base,
            status_page_size: h.status.size,
            exits_total,
            blocked_writes: hv.blocked_writes.load(Ordering::Relaxed),
            log_head: self.core.status.log_head(),
            sealed: u32::from(hv.is_sealed()),
            hidden: u32::from(hv.hidden()),
        }
    }

    fn exit_counts(&self, cpu: usize) -> Option<[u64; EXIT_REASON_COUNT]> {
        self.core.status.counts(cpu)
    }

    fn log_read(&self, pos: u64, out: &mut [u8]) -> (usize, u64, u64) {
        self.core.status.log_read(pos, out)
    }

    fn read_msr(&self, msr: u32) -> u64 {
        // SAFETY: the handlers only ask for MSRs that exist on this
        // processor (IA32_FEATURE_CONTROL, read on Intel only).
        unsafe { rdmsr(msr) }
    }

    fn write_msr(&mut self, w: crate::handlers::msr_policy::CheckedWrite) {
        // SAFETY: a `CheckedWrite` exists only for an MSR the processor has
        // (HWCR and SYSCFG on SVM processors, IA32_APIC_BASE everywhere) and
        // a value the MSR policy checked leaves the host's memory decoding,
        // caches and APIC page as they were.
        unsafe { wrmsr(w.msr(), w.value()) };
    }

    fn xsetbv(&mut self, xcr0: u64) {
        // SAFETY: the value passed the processor's own XSETBV rules
        // (`handlers::xsetbv`); host CR4.OSXSAVE is set on VMX and, when a
        // CPU profile makes SVM intercept XSETBV, on SVM. XCR0 belongs to the guest (the
        // core uses no extended state).
        unsafe {
            core::arch::asm!("xsetbv", in("ecx") 0u32, in("eax") xcr0 as u32, in("edx") (xcr0 >> 32) as u32,
                options(nomem, nostack));
        }
    }

    fn wbinvd(&mut self) {
        // SAFETY: writing back and invalidating caches loses no data.
        unsafe { core::arch::asm!("wbinvd", options(nostack)) };
    }

    fn iommu_enable(&mut self) -> (u32, u32) {
        self.core.iommu.enable()
    }

    fn iommu_poll(&self) {
        self.core.iommu.poll();
    }

    fn remaps_interrupts(&self, rid: u16) -> bool {
        self.core.iommu.remaps(rid)
    }

    fn remap_interrupt(
        &mut self,
        rid: u16,
        slot: u16,
        target: Option<irq_remap::Target>,
    ) -> Result<(u64, u32), irq_remap::Refusal> {
        match self.core.iommu.message_format() {
            super::iommu::MessageFormat::VtdTable => {
                // VT-d remapping: the entry holds the judged target; a
                // refused message names entry 0, which is never present.
                let handle = self.core.iommu.set_vtd_entry(rid, slot, target)?;
                return Ok(irq_remap::vtd::msi(handle));
            }
            super::iommu::MessageFormat::VtdCompat => {
                // VT-d: the judged message itself; a refused one becomes
                // vector 15 at the owner's own first processor, which its
                // APIC refuses as an illegal vector (an APIC error there,
                // nothing delivered, no one else reached).
                return match target {
                    Some(t) => irq_remap::compat::msi(&t),
                    None => self.parked_message(rid),
                };
            }
            super::iommu::MessageFormat::AmdViTable | super::iommu::MessageFormat::None => {}
        }
        let entry = match target {
            Some(t) => irq_remap::amdvi::irte(&t)?,
            None => 0,
        };
        match self.core.iommu.set_irte(rid, slot, entry) {
            Ok(index) => Ok(irq_remap::amdvi::msi(index)),
            // Its part of the table its IDs share has no room for the
            // slot: refused (and counted) like any other.
            Err(super::iommu::IrteError::Full) => Err(irq_remap::Refusal::Full),
            Err(super::iommu::IrteError::Failed(why)) => {
                log::error!(
                    "IOMMU: interrupt remapping entry {slot} of {:02x}:{:02x}.{}: {why}",
                    rid >> 8,
                    (rid >> 3) & 0x1f,
                    rid & 7
                );
                Err(irq_remap::Refusal::Malformed)
            }
        }
    }

    fn start_interrupt_remapping(&mut self) {
        self.core.iommu.start_remapping();
    }

    fn mmio_read(&self, pa: u64, size: u8) -> u32 {
        if !self.mmio_allowed(pa, size) {
            return u32::MAX;
        }
        let size = size.clamp(1, 4);
        if !pa.is_multiple_of(u64::from(size)) {
            // A misaligned access (the guest's own; the CPU splits it on
            // the bus as well): byte by byte, low address first.
            return (0..u64::from(size)).fold(0, |v, i| v | (self.mmio_read(pa + i, 1) << (8 * i)));
        }
        // SAFETY: the handlers pass addresses inside the ECAM page of a
        // mediated function or a page the APIC relocation traps (below the
        // host map's top, `apic_page_trap`; identity-mapped); never the
        // core's own memory (both checked above, whatever a handler
        // passes); `pa` is aligned to the access width (checked above).
        unsafe {
            match size {
                1 => u32::from(core::ptr::read_volatile(pa as *const u8)),
                2 => u32::from(core::ptr::read_volatile(pa as *const u16)),
                _ => core::ptr::read_volatile(pa as *const u32),
            }
        }
    }

    fn mmio_write(&mut self, pa: u64, size: u8, value: u32) {
        if !self.mmio_allowed(pa, size) {
            return;
        }
        let size = size.clamp(1, 4);
        if !pa.is_multiple_of(u64::from(size)) {
            for i in 0..u64::from(size) {
                self.mmio_write(pa + i, 1, value >> (8 * i));
            }
            return;
        }
        // SAFETY: as `mmio_read`; the mediation decided this write may
        // reach the device.
        unsafe {
            match size {
                1 => core::ptr::write_volatile(pa as *mut u8, value as u8),
                2 => core::ptr::write_volatile(pa as *mut u16, value as u16),
                _ => core::ptr::write_volatile(pa as *mut u32, value),
            }
        }
    }

    fn legacy_config_access(
        &mut self,
        address: u32,
        port: u16,
        size: u8,
        write: Option<u32>,
    ) -> u32 {
        // The guard borrows the core (static), not `self`.
        let _pair = self.core.hv.legacy_config_lock.lock();
        // SAFETY: the guest made this configuration access (an intercepted
        // data-port IN/OUT, `port` in 0xCFC..=0xCFF, already mediated);
        // selecting its address in CONFIG_ADDRESS first is what the
        // guest's own OUT to 0xCF8 did on bare metal. Nothing in the core
        // relies on the latch's value between these pairs.
        unsafe {
            super::instr::port_out(thinhv_passthrough::mediate::CONFIG_ADDRESS, 4, address);
            match write {
                Some(v) => {
                    super::instr::port_out(port, size, v);
                    0
                }
                None => super::instr::port_in(port, size),
            }
        }
    }

    fn port_read(&self, port: u16, size: u8) -> u32 {
        // SAFETY: the guest executed this IN (an intercepted configuration
        // port); thinhv performs it on its behalf.
        unsafe { super::instr::port_in(port, size) }
    }

    fn publish_appliances(&self) {
        super::vcpu::publish_appliances(self.core);
    }

    fn publish_control(&self, result: thinhv_abi::status::ControlResult) {
        self.core.status.set_control_result(result);
    }

    fn tsc(&self) -> u64 {
        // SAFETY: RDTSC has no side effects; CR4.TSD is clear in thinhv.
        unsafe { core::arch::x86_64::_rdtsc() }
    }

    fn port_write(&mut self, port: u16, size: u8, value: u32) {
        // SAFETY: as `port_read`, for the guest's OUT.
        unsafe { super::instr::port_out(port, size, value) }
    }

    fn integrity(&self) -> Integrity {
        let mut h = crc32fast::Hasher::new();
        for r in self.core.handoff.ro_ranges() {
            // SAFETY: the read-only ranges lie inside the loaded image
            // (validated hand-off), identity-mapped for the host.
            let bytes =
                unsafe { core::slice::from_raw_parts(r.base as *const u8, r.size as usize) };
            h.update(bytes);
        }
        // SAFETY: the canary page was carved from the pool at start.
        let canary = unsafe { core::slice::from_raw_parts(self.core.canary_pa as *const u8, 4096) };
        Integrity {
            expected_crc: self.core.handoff.ro_crc,
            current_crc: h.finalize(),
            canary_ok: canary.iter().enumerate().all(|(i, &b)| b == canary_byte(i)),
        }
    }
}
