//! Writer of the status page (`thinhv_abi::status`): counters, CPU states
//! and the log ring, updated with atomics so readers in the guest see
//! consistent words.
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use thinhv_abi::exit::{EXIT_REASON_COUNT, ExitReason};
use thinhv_abi::status::{
    CPUS_OFFSET, CpuRecord, CpuState, DeviceRecord, IommuRecord, MAX_DEVICES, MAX_IOMMU_RECORDS,
    STATUS_MAGIC, StatusPageHeader, devices_offset, iommu_offset, status_area_layout,
};
use zerocopy::IntoBytes;

/// The status area.
#[derive(Clone, Copy, Debug)]
pub struct StatusPage {
    base: u64,
    size: u64,
    cpus: usize,
    log_offset: u64,
    log_size: u64,
}

impl StatusPage {
    /// Describes the area at `base` (size checked against the layout).
    pub fn new(base: u64, size: u64, cpus: usize) -> Option<Self> {
        let (need, log_offset) = status_area_layout(cpus);
        (size >= need as u64).then_some(Self {
            base,
            size,
            cpus,
            log_offset: log_offset as u64,
            log_size: thinhv_abi::status::LOG_RING_SIZE as u64,
        })
    }

    /// Writes the header and CPU records.
    pub fn init(&self, header: &StatusPageHeader, apic_ids: &[u32]) {
        // SAFETY: the area belongs to the core (reserved by the loader,
        // read-only for the guest) and is `size` bytes long.
        unsafe { core::ptr::write_bytes(self.base as *mut u8, 0, self.size as usize) };
        let mut h = *header;
        h.magic = STATUS_MAGIC;
        h.cpus_offset = CPUS_OFFSET as u32;
        h.cpu_record_size = core::mem::size_of::<CpuRecord>() as u32;
        h.max_cpus = self.cpus as u32;
        h.exit_reason_count = EXIT_REASON_COUNT as u32;
        h.log_offset = self.log_offset as u32;
        h.log_size = self.log_size as u32;
        h.devices_offset = devices_offset(self.cpus) as u32;
        h.device_record_size = core::mem::size_of::<DeviceRecord>() as u32;
        h.device_count = 0;
        h.iommu_offset = iommu_offset(self.cpus) as u32;
        h.iommu_count = 0;
        h.area_size = self.size;
        self.write(0, h.as_bytes());
        for (i, id) in apic_ids.iter().enumerate().take(self.cpus) {
            let rec = CpuRecord {
                apic_id: *id,
                state: CpuState::OFFLINE.0,
                exits: [0; EXIT_REASON_COUNT],
            };
            self.write(Self::cpu_offset(i), rec.as_bytes());
        }
    }

    /// Writes IOMMU record `i`.
    pub fn publish_iommu(&self, i: usize, r: &IommuRecord) {
        if i < MAX_IOMMU_RECORDS {
            let off = iommu_offset(self.cpus) + i * core::mem::size_of::<IommuRecord>();
            self.write(off as u64, r.as_bytes());
        }
    }

    /// Writes appliance record `i`.
    pub fn publish_appliance(&self, i: usize, r: &thinhv_abi::status::ApplianceRecord) {
        if i < thinhv_abi::handoff::MAX_APPLIANCES {
            let off = thinhv_abi::status::appliances_offset(self.cpus)
                + i * core::mem::size_of::<thinhv_abi::status::ApplianceRecord>();
            self.write(off as u64, r.as_bytes());
        }
    }

    /// Sets the number of IOMMU records.
    pub fn set_iommu_count(&self, n: usize) {
        let n = n.min(MAX_IOMMU_RECORDS) as u32;
        self.write(
            core::mem::offset_of!(StatusPageHeader, iommu_count) as u64,
            n.as_bytes(),
        );
    }

    /// Publishes the device inventory (at most [`MAX_DEVICES`] records).
    pub fn publish_devices(&self, records: &[DeviceRecord], dropped: u32) {
        let n = records.len().min(MAX_DEVICES);
        let base = devices_offset(self.cpus) as u64;
        for (i, r) in records[..n].iter().enumerate() {
            self.write(
                base + (i * core::mem::size_of::<DeviceRecord>()) as u64,
                r.as_bytes(),
            );
        }
        let extra = dropped.saturating_add(u32::try_from(records.len() - n).unwrap_or(u32::MAX));
        self.write(
            core::mem::offset_of!(StatusPageHeader, device_count) as u64,
            (n as u32).as_bytes(),
        );
        self.write(
            core::mem::offset_of!(StatusPageHeader, devices_dropped) as u64,
            extra.as_bytes(),
        );
    }

    fn write(&self, offset: u64, bytes: &[u8]) {
        assert!(offset + bytes.len() as u64 <= self.size);
        // SAFETY: bounds checked above; the area is the core's.
        unsafe {
            core::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (self.base + offset) as *mut u8,
                bytes.len(),
            );
        }
    }

    fn cpu_offset(cpu: usize) -> u64 {
        (CPUS_OFFSET + cpu * core::mem::size_of::<CpuRecord>()) as u64
    }

    fn u64_at(&self, offset: u64) -> &AtomicU64 {
        assert!(offset.is_multiple_of(8) && offset + 8 <= self.size);
        // SAFETY: in bounds and 8-byte aligned (the base is page-aligned);
        // the memory lives as long as the hypervisor and is only accessed
        // atomically by the core (the guest can only read it).
        unsafe { AtomicU64::from_ptr((self.base + offset) as *mut u64) }
    }

    fn u32_at(&self, offset: u64) -> &AtomicU32 {
        assert!(offset.is_multiple_of(4) && offset + 4 <= self.size);
        // SAFETY: as in `u64_at`, 4-byte aligned.
        unsafe { AtomicU32::from_ptr((self.base + offset) as *mut u32) }
    }

    /// Counts an exit.
    pub fn count(&self, cpu: usize, reason: ExitReason) {
        if cpu < self.cpus {
            let off = Self::cpu_offset(cpu) + 8 + 8 * reason.index() as u64;
            self.u64_at(off).fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Exit counters of one CPU.
    pub fn counts(&self, cpu: usize) -> Option<[u64; EXIT_REASON_COUNT]> {
        (cpu < self.cpus).then(|| {
            core::array::from_fn(|i| {
                self.u64_at(Self::cpu_offset(cpu) + 8 + 8 * i as u64)
                    .load(Ordering::Relaxed)
            })
        })
    }

    /// Records a CPU's state.
    pub fn set_cpu_state(&self, cpu: usize, state: CpuState) {
        if cpu < self.cpus {
            self.u32_at(Self::cpu_offset(cpu) + 4)
                .store(state.0, Ordering::Relaxed);
        }
    }

    /// Sets `cpus_virtualized`.
    pub fn set_virtualized(&self, n: u32) {
        self.u32_at(0x1c).store(n, Ordering::Relaxed);
    }

    /// Sets flag bits.
    pub fn set_flags(&self, bits: u32) {
        self.u32_at(0x60).fetch_or(bits, Ordering::Relaxed);
    }

    /// Mirrors the blocked-write count.
    pub fn set_blocked_writes(&self, n: u64) {
        self.u32_at(0x64).store(n as u32, Ordering::Relaxed);
    }

    /// The result of the last appliance control request, beside its
    /// doorbell.
    pub fn set_control_result(&self, r: thinhv_abi::status::ControlResult) {
        let off = thinhv_abi::status::control_offset(self.cpus) as u64 + 8;
        self.u64_at(off).store(r.encode(), Ordering::SeqCst);
    }

    /// Bytes ever logged.
    pub fn log_head(&self) -> u64 {
        self.u64_at(0x58).load(Ordering::Acquire)
    }

    fn ring(&self) -> *mut u8 {
        (self.base + self.log_offset) as *mut u8
    }

    /// Appends to the log ring. Callers serialize (the logger's lock).
    pub fn log_append(&self, data: &[u8]) {
        let head = self.log_head();
        // SAFETY: the ring is `log_size` bytes inside the area; only the
        // logger (holding its lock) writes it.
        let ring = unsafe { core::slice::from_raw_parts_mut(self.ring(), self.log_size as usize) };
        let new = crate::log_ring::write(ring, head, data);
        self.u64_at(0x58).store(new, Ordering::Release);
    }

    /// Reads the log ring (see `crate::log_ring::read`).
    pub fn log_read(&self, pos: u64, out: &mut [u8]) -> (usize, u64, u64) {
        let head = self.log_head();
        // SAFETY: as in `log_append`; a concurrent writer can only make the
        // copy contain newer bytes, never read out of bounds.
        let ring = unsafe { core::slice::from_raw_parts(self.ring(), self.log_size as usize) };
        crate::log_ring::read(ring, head, pos, out)
    }
}
