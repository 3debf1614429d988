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
    fn write_cr(&mut self, cr: u8, value: u64) -> Result<(), GpFault> {
        if cr == 4 && value & (1 << 13) != 0 {
            return Err(GpFault);
        }
        self.crs.push((cr, value));
        Ok(())
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
    pub iommu_enables: u32,
    pub iommu_polls: std::cell::Cell<u32>,
    /// Device memory: byte-addressed; every access is recorded.
    pub mmio: HashMap<u64, u8>,
    pub mmio_log: std::cell::RefCell<Vec<(char, u64, u8, u32)>>,
    /// Port space: the 0xCF8 latch and data bytes.
    pub ports: std::cell::RefCell<HashMap<u16, u32>>,
    pub port_log: std::cell::RefCell<Vec<(char, u16, u8, u32)>>,
}

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
            iommu_enables: 0,
            iommu_polls: std::cell::Cell::new(0),
            mmio: HashMap::new(),
            mmio_log: std::cell::RefCell::default(),
            ports: std::cell::RefCell::default(),
            port_log: std::cell::RefCell::default(),
        }
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
    fn demand_map(&mut self, gpa: u64) -> bool {
        self.demand_calls.push(gpa);
        self.demand_ok
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
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate().take(usize::from(size)) {
            *x = *self.mmio.get(&(pa + i as u64)).unwrap_or(&0xff);
        }
        let v = u32::from_le_bytes(b);
        self.mmio_log.borrow_mut().push(('r', pa, size, v));
        v
    }
    fn mmio_write(&mut self, pa: u64, size: u8, value: u32) {
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
    fn port_read(&self, port: u16, size: u8) -> u32 {
        let v = *self.ports.borrow().get(&port).unwrap_or(&u32::MAX);
        self.port_log.borrow_mut().push(('r', port, size, v));
        v & thinhv_passthrough::mediate::all_ones(size)
    }
    fn port_write(&mut self, port: u16, size: u8, value: u32) {
        self.ports.borrow_mut().insert(port, value);
        self.port_log.borrow_mut().push(('w', port, size, value));
    }
}
