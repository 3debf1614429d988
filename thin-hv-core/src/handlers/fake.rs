//! Fakes of the guest CPU and the host environment for handler tests.
use crate::env::{Env, Integrity};
use crate::guest::{CpuMode, GpFault, Gpr, GuestCpu, PagingRegs};
use crate::hv::Hv;
use std::collections::HashMap;
use thinhv_abi::PhysRange;
use thinhv_abi::exit::EXIT_REASON_COUNT;
use thinhv_abi::handoff::{CpuInfo, Handoff};
use thinhv_abi::hypercall::StatusReport;
use thinhv_abi::status::CpuState;

pub const PROTECTED: PhysRange = PhysRange::new(0x7e00_0000, 0x20_0000);
pub const STATUS: PhysRange = PhysRange::new(0x7e20_0000, 0x1_1000);
pub const APIC: u64 = 0xfee0_0000;

#[derive(Default)]
pub struct FakeCpu {
    pub regs: [u64; 16],
    pub rip: u64,
    pub cpl: u8,
    pub hint: Option<u64>,
    pub mode: Option<CpuMode>,
    pub paging: PagingRegs,
    pub efer: u64,
    pub exceptions: Vec<(u8, Option<u32>)>,
    pub nmis: usize,
    pub crs: Vec<(u8, u64)>,
    pub rflags: u64,
    pub debugctl: u64,
    pub dr7: u64,
    pub drs: [u64; 4],
    /// ES, CS, SS, DS, FS, GS bases.
    pub segment_bases: [u64; 6],
    /// DR6 bits of each `complete_instruction` call.
    pub completed: Vec<u64>,
    pub task: Option<crate::vmx::task_switch::TaskState>,
    pub delivered: Vec<u32>,
    pub pat: Option<u64>,
}

impl GuestCpu for FakeCpu {
    fn gpr(&self, r: Gpr) -> u64 {
        self.regs[r as usize]
    }
    fn set_gpr(&mut self, r: Gpr, v: u64) {
        self.regs[r as usize] = v;
    }
    fn rip(&self) -> u64 {
        self.rip
    }
    fn set_rip(&mut self, rip: u64) {
        self.rip = rip;
    }
    fn cpl(&self) -> u8 {
        self.cpl
    }
    fn next_rip_hint(&self) -> Option<u64> {
        self.hint
    }
    fn mode(&self) -> CpuMode {
        self.mode.unwrap_or(CpuMode::Bits64)
    }
    fn cs_base(&self) -> u64 {
        0
    }
    fn segment_base(&self, seg: crate::guest::SegReg) -> u64 {
        self.segment_bases[seg as usize]
    }
    fn paging(&self) -> PagingRegs {
        PagingRegs {
            efer: self.efer,
            ..self.paging
        }
    }
    fn guest_efer(&self) -> u64 {
        self.efer
    }
    fn set_guest_efer(&mut self, v: u64) {
        self.efer = v;
    }
    fn inject_exception(&mut self, v: u8, e: Option<u32>) {
        self.exceptions.push((v, e));
    }
    fn inject_nmi(&mut self) {
        self.nmis += 1;
    }
    fn set_guest_pat(&mut self, value: u64) {
        self.pat = Some(value);
    }
    fn write_cr(&mut self, cr: u8, value: u64) -> Result<(), GpFault> {
        if cr == 4 && value & (1 << 13) != 0 {
            return Err(GpFault);
        }
        self.crs.push((cr, value));
        Ok(())
    }
    fn read_cr(&self, cr: u8) -> Option<u64> {
        match cr {
            0 => Some(self.paging.cr0),
            3 => Some(self.paging.cr3),
            4 => Some(self.paging.cr4),
            _ => None,
        }
    }
    fn rflags(&self) -> u64 {
        self.rflags
    }
    fn debugctl(&self) -> u64 {
        self.debugctl
    }
    fn dr7(&self) -> u64 {
        self.dr7
    }
    fn breakpoint_address(&self, n: u8) -> u64 {
        self.drs[usize::from(n & 3)]
    }
    fn complete_instruction(&mut self, dr6: u64) {
        self.rflags &= !(1 << 16);
        self.completed.push(dr6);
    }
    fn task_state(&self) -> Option<crate::vmx::task_switch::TaskState> {
        self.task
    }
    fn set_task_state(&mut self, state: &crate::vmx::task_switch::TaskState, delivered: u32) {
        self.task = Some(*state);
        self.delivered.push(delivered);
    }
}

pub struct FakeEnv {
    pub hv: Hv,
    pub cpu: usize,
    pub mem: HashMap<u64, u8>,
    pub apic: HashMap<u32, u32>,
    pub apic_writes: Vec<(u32, u32)>,
    pub x2apic_writes: Vec<u64>,
    pub nmis_sent: Vec<u32>,
    pub demand_ok: bool,
    pub demand_calls: Vec<u64>,
    pub integrity: Integrity,
    pub log: Vec<u8>,
    pub xcr0: Option<u64>,
    pub wbinvds: usize,
    pub msrs: HashMap<u32, u64>,
    pub msr_writes: Vec<(u32, u64)>,
    pub iommu_enables: u32,
    pub iommu_polls: std::cell::Cell<u32>,
    /// Device memory: byte-addressed; every access is recorded.
    pub mmio: HashMap<u64, u8>,
    pub mmio_log: std::cell::RefCell<Vec<(char, u64, u8, u32)>>,
    /// An I/O APIC at [`FAKE_IOAPIC`]: its IOREGSEL and its registers by
    /// index (IOWIN reaches the selected one; delivery status and remote
    /// IRR bits of an entry's low dword are kept as they are).
    pub ioapic_sel: std::cell::Cell<u32>,
    pub ioapic_regs: std::cell::RefCell<HashMap<u32, u32>>,
    /// Port space: the 0xCF8 latch and data bytes.
    pub ports: std::cell::RefCell<HashMap<u16, u32>>,
    pub port_log: std::cell::RefCell<Vec<(char, u16, u8, u32)>>,
    /// A host bridge's configuration space behind 0xCF8/0xCFC, as dwords
    /// keyed by the CONFIG_ADDRESS that selects them (enable bit set,
    /// offset dword-aligned). A data-port access whose hardware latch
    /// selects a dword here reaches it; any other goes to `ports`.
    pub cf8_space: std::cell::RefCell<HashMap<u32, u32>>,
    /// Whether `Hv::legacy_config_lock` was held, for each port access
    /// (in `port_log` order).
    pub cf8_locked: std::cell::RefCell<Vec<bool>>,
    /// `apic_page_trap` calls, in order: (page, trap).
    pub apic_traps: Vec<(u64, bool)>,
    /// Pages out of the fake second-level tables now.
    pub slat_holes: std::collections::BTreeSet<u64>,
    /// `apic_page_trap(_, true)` succeeds (else: "cannot trap").
    pub apic_trap_ok: bool,
    /// `publish_control` calls, in order.
    pub control_results: std::cell::RefCell<Vec<thinhv_abi::status::ControlResult>>,
    /// The time-stamp counter [`Env::tsc`] reads (it advances per read).
    pub tsc: std::cell::Cell<u64>,
    /// Routing IDs whose interrupts are remapped, and the entries written
    /// ((rid, slot) → target; `None` not present), AMD-Vi style: the
    /// message names its slot in data.
    pub remapped: Vec<u16>,
    pub irq_entries: HashMap<(u16, u16), Option<thinhv_passthrough::irq_remap::Target>>,
    /// VT-d style instead: the message names entry slot + 1 in remappable
    /// format (entry 0, never present, for a refused one).
    pub vtd_format: bool,
    /// `start_interrupt_remapping` calls.
    pub remapping_starts: u32,
}

/// Where the fake I/O APIC's registers are.
pub const FAKE_IOAPIC: u64 = 0xfec0_0000;

impl FakeEnv {
    /// Four CPUs (APIC IDs 0, 1, 2, 3), this one is CPU 0; RAM is
    /// 0..0x7e00_0000 and 0x1_0000_0000..0x2_0000_0000.
    pub fn new() -> Self {
        let mut h = Handoff::new();
        h.protected = PROTECTED;
        h.status = STATUS;
        h.cpu_count = 4;
        for i in 0..4 {
            h.cpus[i] = CpuInfo {
                apic_id: i as u32,
                flags: u32::from(i == 0),
            };
        }
        h.ram[0] = PhysRange::new(0, 0x7e00_0000);
        h.ram[1] = PhysRange::new(0x1_0000_0000, 0x1_0000_0000);
        h.ram_count = 2;
        h.phys_addr_bits = 40;
        h.vendor = 1;
        let hv = Hv::from_handoff(&h, APIC);
        for c in hv.cpus() {
            c.set_state(CpuState::RUNNING);
        }
        Self {
            hv,
            cpu: 0,
            mem: HashMap::new(),
            apic: HashMap::new(),
            apic_writes: Vec::new(),
            x2apic_writes: Vec::new(),
            nmis_sent: Vec::new(),
            demand_ok: true,
            demand_calls: Vec::new(),
            integrity: Integrity {
                expected_crc: 1,
                current_crc: 1,
                canary_ok: true,
            },
            log: b"line one\nline two\n".to_vec(),
            xcr0: None,
            wbinvds: 0,
            msrs: HashMap::from([(0x3a, 0x5)]),
            msr_writes: Vec::new(),
            iommu_enables: 0,
            iommu_polls: std::cell::Cell::new(0),
            mmio: HashMap::new(),
            mmio_log: std::cell::RefCell::default(),
            ioapic_sel: std::cell::Cell::new(0),
            ioapic_regs: std::cell::RefCell::default(),
            ports: std::cell::RefCell::default(),
            port_log: std::cell::RefCell::default(),
            cf8_space: std::cell::RefCell::default(),
            cf8_locked: std::cell::RefCell::default(),
            apic_traps: Vec::new(),
            slat_holes: std::collections::BTreeSet::new(),
            apic_trap_ok: true,
            control_results: std::cell::RefCell::default(),
            tsc: std::cell::Cell::new(0),
            remapped: Vec::new(),
            irq_entries: HashMap::new(),
            vtd_format: false,
            remapping_starts: 0,
        }
    }

    /// [`Self::new`] with CPUs 2 and 3 (APIC IDs 2, 3) given to appliance
    /// partition 1, whose RAM is 0x4000_0000..0x5000_0000 (out of the
    /// OS's RAM ranges, as the loader reserves it).
    pub fn with_appliance() -> Self {
        let mut h = Handoff::new();
        h.cpu_count = 4;
        for i in 0..4 {
            h.cpus[i] = CpuInfo {
                apic_id: i as u32,
                flags: u32::from(i == 0)
                    | if i >= 2 {
                        1 << thinhv_abi::handoff::CPU_PARTITION_SHIFT
                    } else {
                        0
                    },
            };
        }
        h.partition_count = 1;
        h.partitions[0].ram = PhysRange::new(0x4000_0000, 0x1000_0000);
        h.partitions[0].cpu_count = 2;
        h.partitions[0].name[..5].copy_from_slice(b"appl1");
        let mut env = Self::new();
        let old = &env.hv;
        let mut hv = Hv::from_handoff(&h, APIC);
        hv.protected = old.protected;
        hv.status = old.status;
        hv.phys_addr_bits = old.phys_addr_bits;
        hv.vendor = old.vendor;
        for c in hv.cpus() {
            c.set_state(CpuState::RUNNING);
        }
        env.hv = hv;
        env
    }

    /// The dword of `cf8_space` data port `port` reaches with the
    /// hardware latch as it is now, and the port's byte in it. A chipset
    /// splits an access that straddles 0xCFC or 0xCFF, so each byte is
    /// looked up on its own.
    fn cf8_byte(&self, port: u16) -> Option<(u32, usize)> {
        let latch = *self.ports.borrow().get(&0xcf8)?;
        let key = latch & !3;
        let byte = usize::from(port.checked_sub(0xcfc).filter(|b| *b < 4)?);
        (latch & (1 << 31) != 0 && self.cf8_space.borrow().contains_key(&key))
            .then_some((key, byte))
    }

    fn note_lock(&self) {
        self.cf8_locked
            .borrow_mut()
            .push(self.hv.legacy_config_lock.is_locked());
    }

    fn hw_in(&self, port: u16, size: u8) -> u32 {
        self.note_lock();
        let mut b = self
            .ports
            .borrow()
            .get(&port)
            .unwrap_or(&u32::MAX)
            .to_le_bytes();
        for (i, x) in b.iter_mut().enumerate().take(usize::from(size)) {
            if let Some((key, byte)) = self.cf8_byte(port + i as u16) {
                *x = self.cf8_space.borrow()[&key].to_le_bytes()[byte];
            }
        }
        let v = u32::from_le_bytes(b);
        self.port_log.borrow_mut().push(('r', port, size, v));
        v & thinhv_passthrough::mediate::all_ones(size)
    }

    fn hw_out(&self, port: u16, size: u8, value: u32) {
        self.note_lock();
        // A non-dword write to 0xCF8 is not CONFIG_ADDRESS (PCI Local Bus
        // 3.0 §3.2.2.3.2): the latch keeps its value.
        if port == 0xcf8 && size != 4 {
            self.port_log.borrow_mut().push(('w', port, size, value));
            return;
        }
        let mut plain = false;
        for (i, x) in value
            .to_le_bytes()
            .iter()
            .enumerate()
            .take(usize::from(size))
        {
            match self.cf8_byte(port + i as u16) {
                Some((key, byte)) => {
                    let mut space = self.cf8_space.borrow_mut();
                    let mut b = space[&key].to_le_bytes();
                    b[byte] = *x;
                    space.insert(key, u32::from_le_bytes(b));
                }
                None => plain = true,
            }
        }
        if plain {
            self.ports.borrow_mut().insert(port, value);
        }
        self.port_log.borrow_mut().push(('w', port, size, value));
    }

    pub fn put(&mut self, pa: u64, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            self.mem.insert(pa + i as u64, *b);
        }
    }

    pub fn get(&self, pa: u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| *self.mem.get(&(pa + i as u64)).unwrap_or(&0))
            .collect()
    }
}

impl Env for FakeEnv {
    type OsIommu = crate::os_iommu::NoHost;
    fn hv(&self) -> &Hv {
        &self.hv
    }
    fn cpu_index(&self) -> usize {
        self.cpu
    }
    fn cpuid(&self, leaf: u32, sub: u32) -> [u32; 4] {
        match (leaf, sub) {
            // XSAVE: x87, SSE, AVX and AVX-512 (opmask, ZMM_Hi256,
            // Hi16_ZMM) with their sizes and offsets; XSAVEOPT..XSAVES.
            (0xd, 0) => return [0xe7, 0x340, 0xa80, 0],
            (0xd, 1) => return [0xf, 0x340, 0x100, 0],
            (0xd, 2) => return [256, 576, 0, 0],
            (0xd, 5) => return [64, 1088, 0, 0],
            (0xd, 6) => return [512, 1152, 0, 0],
            (0xd, 7) => return [1024, 1664, 0, 0],
            (0xd, 8) => return [128, 0, 1, 0],
            (0xd, _) => return [0; 4],
            // AVX2, AVX-512F, BMI1.
            (7, 0) => return [0, (1 << 5) | (1 << 16) | (1 << 3), 0, 0],
            _ => {}
        }
        match leaf {
            1 => [
                0x00a0_0f11,
                0x0001_0800,
                0x7ffa_3223 | (1 << 5),
                0x178b_fbff,
            ],
            0x8000_0001 => [0, 0, 0x0000_37ff, 0x2fd3_fbff],
            0x8000_000a => [1, 16, 0, 0x1],
            0x4000_0000 => [0x11, 0x22, 0x33, 0x44],
            _ => [leaf, 0, 0, 0],
        }
    }
    fn read_phys(&self, pa: u64, buf: &mut [u8]) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = *self.mem.get(&(pa + i as u64)).unwrap_or(&0);
        }
    }
    fn write_phys(&mut self, pa: u64, data: &[u8]) {
        self.put(pa, data);
    }
    fn lapic_read(&self, off: u32) -> u32 {
        *self.apic.get(&off).unwrap_or(&0)
    }
    fn lapic_write(&mut self, off: u32, v: u32) {
        self.apic.insert(off, v);
        self.apic_writes.push((off, v));
    }
    fn x2apic_icr_write(&mut self, v: u64) {
        self.x2apic_writes.push(v);
    }
    fn kick_for_init(&mut self, apic_id: u32) {
        self.nmis_sent.push(apic_id);
    }
    fn publish_control(&self, result: thinhv_abi::status::ControlResult) {
        self.control_results.borrow_mut().push(result);
    }
    fn demand_map(&mut self, gpa: u64) -> bool {
        self.demand_calls.push(gpa);
        self.demand_ok
    }
    fn apic_page_trap(&mut self, page: u64, trap: bool) -> bool {
        assert_eq!(page % 4096, 0, "{page:#x}");
        if trap && !self.apic_trap_ok {
            return false;
        }
        self.apic_traps.push((page, trap));
        if trap {
            self.slat_holes.insert(page);
        } else {
            self.slat_holes.remove(&page);
        }
        true
    }
    fn status_report(&self) -> StatusReport {
        StatusReport {
            size: 0x60,
            vendor: 1,
            cpus_expected: 4,
            cpus_virtualized: 4,
            ..Default::default()
        }
    }
    fn exit_counts(&self, cpu: usize) -> Option<[u64; EXIT_REASON_COUNT]> {
        (cpu < 4).then(|| core::array::from_fn(|i| (cpu * 100 + i) as u64))
    }
    fn log_read(&self, pos: u64, out: &mut [u8]) -> (usize, u64, u64) {
        crate::log_ring::read(&self.log, self.log.len() as u64, pos, out)
    }
    fn integrity(&self) -> Integrity {
        self.integrity
    }
    fn read_msr(&self, msr: u32) -> u64 {
        self.msrs[&msr]
    }
    fn write_msr(&mut self, w: crate::handlers::msr_policy::CheckedWrite) {
        self.msrs.insert(w.msr(), w.value());
        self.msr_writes.push((w.msr(), w.value()));
    }
    fn xsetbv(&mut self, xcr0: u64) {
        self.xcr0 = Some(xcr0);
    }
    fn wbinvd(&mut self) {
        self.wbinvds += 1;
    }
    fn iommu_enable(&mut self) -> (u32, u32) {
        self.iommu_enables += 1;
        (1, 1)
    }
    fn iommu_poll(&self) {
        self.iommu_polls.set(self.iommu_polls.get() + 1);
    }
    fn mmio_read(&self, pa: u64, size: u8) -> u32 {
        if pa == FAKE_IOAPIC + 0x10 {
            let v = *self
                .ioapic_regs
                .borrow()
                .get(&self.ioapic_sel.get())
                .unwrap_or(&0);
            self.mmio_log.borrow_mut().push(('r', pa, size, v));
            return v;
        }
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate().take(usize::from(size)) {
            *x = *self.mmio.get(&(pa + i as u64)).unwrap_or(&0xff);
        }
        let v = u32::from_le_bytes(b);
        self.mmio_log.borrow_mut().push(('r', pa, size, v));
        v
    }
    fn mmio_write(&mut self, pa: u64, size: u8, value: u32) {
        if pa == FAKE_IOAPIC {
            self.ioapic_sel.set(value);
        }
        if pa == FAKE_IOAPIC + 0x10 {
            let sel = self.ioapic_sel.get();
            let mut regs = self.ioapic_regs.borrow_mut();
            let keep = if sel >= 0x10 && sel.is_multiple_of(2) {
                regs.get(&sel).copied().unwrap_or(0) & 0x5000
            } else {
                0
            };
            regs.insert(sel, (value & !0x5000) | keep);
            self.mmio_log.borrow_mut().push(('w', pa, size, value));
            return;
        }
        for (i, x) in value
            .to_le_bytes()
            .iter()
            .enumerate()
            .take(usize::from(size))
        {
            self.mmio.insert(pa + i as u64, *x);
        }
        self.mmio_log.borrow_mut().push(('w', pa, size, value));
    }
    fn remaps_interrupts(&self, rid: u16) -> bool {
        self.remapped.contains(&rid)
    }
    fn remap_interrupt(
        &mut self,
        rid: u16,
        slot: u16,
        target: Option<thinhv_passthrough::irq_remap::Target>,
    ) -> Result<(u64, u32), thinhv_passthrough::irq_remap::Refusal> {
        if !self.remapped.contains(&rid) {
            return Err(thinhv_passthrough::irq_remap::Refusal::Malformed);
        }
        self.irq_entries.insert((rid, slot), target);
        if self.vtd_format {
            let handle = if target.is_some() { slot + 1 } else { 0 };
            return Ok(thinhv_passthrough::irq_remap::vtd::msi(handle));
        }
        Ok(thinhv_passthrough::irq_remap::amdvi::msi(slot))
    }
    fn start_interrupt_remapping(&mut self) {
        self.remapping_starts += 1;
    }
    fn legacy_config_access(
        &mut self,
        address: u32,
        port: u16,
        size: u8,
        write: Option<u32>,
    ) -> u32 {
        let _pair = self.hv.legacy_config_lock.lock();
        self.hw_out(0xcf8, 4, address);
        match write {
            Some(v) => {
                self.hw_out(port, size, v);
                0
            }
            None => self.hw_in(port, size),
        }
    }
    fn port_read(&self, port: u16, size: u8) -> u32 {
        self.hw_in(port, size)
    }
    fn port_write(&mut self, port: u16, size: u8, value: u32) {
        self.hw_out(port, size, value);
    }
    fn tsc(&self) -> u64 {
        // A thousand ticks per read: waits end after a bounded number of
        // reads.
        let t = self.tsc.get() + 1000;
        self.tsc.set(t);
        t
    }
}
