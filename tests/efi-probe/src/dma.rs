//! DMA from a real device against thinhv's region: QEMU's `edu` device
//! (1234:11e8) copies a page through its DMA engine (BAR0 registers 0x80
//! source, 0x88 destination, 0x90 count, 0x98 command; its own buffer at
//! device address 0x40000). Reports whether the copies landed; the host
//! test decides.
use crate::probe::{hc, kv};
use core::arch::asm;
use thinhv_abi::hypercall::Function;

const EDU_ID: u32 = 0x11e8_1234;
const EDU_BUFFER: u64 = 0x40000;
const PATTERN: u8 = 0xa5;

fn cfg_read(bus: u8, dev: u8, func: u8, off: u8) -> u32 {
    let addr = 0x8000_0000u32
        | (u32::from(bus) << 16)
        | (u32::from(dev) << 11)
        | (u32::from(func) << 8)
        | u32::from(off & 0xfc);
    let v: u32;
    // SAFETY: the legacy configuration mechanism (ports 0xCF8/0xCFC) that
    // q35 decodes; reads have no side effects on the devices probed.
    unsafe {
        asm!("out dx, eax", in("dx") 0xcf8u16, in("eax") addr, options(nostack));
        asm!("in eax, dx", in("dx") 0xcfcu16, out("eax") v, options(nostack));
    }
    v
}

fn cfg_write(bus: u8, dev: u8, func: u8, off: u8, v: u32) {
    let addr = 0x8000_0000u32
        | (u32::from(bus) << 16)
        | (u32::from(dev) << 11)
        | (u32::from(func) << 8)
        | u32::from(off & 0xfc);
    // SAFETY: as in `cfg_read`; only the edu device's command register is
    // written.
    unsafe {
        asm!("out dx, eax", in("dx") 0xcf8u16, in("eax") addr, options(nostack));
        asm!("out dx, eax", in("dx") 0xcfcu16, in("eax") v, options(nostack));
    }
}

fn find_edu() -> Option<(u8, u8, u8)> {
    for bus in 0..=255u8 {
        for dev in 0..32u8 {
            if cfg_read(bus, dev, 0, 0) == EDU_ID {
                return Some((bus, dev, 0));
            }
        }
    }
    None
}

struct Edu {
    bar: u64,
}

impl Edu {
    fn r64(&self, off: u64) -> u64 {
        // SAFETY: BAR0 of the edu device, MMIO the firmware assigned and
        // identity-maps; 8-byte aligned register.
        unsafe { core::ptr::read_volatile((self.bar + off) as *const u64) }
    }
    fn r32(&self, off: u64) -> u32 {
        // SAFETY: as in `r64`; registers below 0x80 take 4-byte accesses.
        unsafe { core::ptr::read_volatile((self.bar + off) as *const u32) }
    }
    fn w64(&self, off: u64, v: u64) {
        // SAFETY: as in `r64`.
        unsafe { core::ptr::write_volatile((self.bar + off) as *mut u64, v) }
    }
    /// One DMA of `len` bytes; `to_ram`: device buffer → RAM. Returns
    /// whether the device reported completion.
    fn dma(&self, src: u64, dst: u64, len: u64, to_ram: bool) -> bool {
        self.w64(0x80, src);
        self.w64(0x88, dst);
        self.w64(0x90, len);
        self.w64(0x98, 1 | if to_ram { 2 } else { 0 });
        for _ in 0..2000 {
            if self.r64(0x98) & 1 == 0 {
                return true;
            }
            uefi::boot::stall(core::time::Duration::from_millis(1));
        }
        false
    }
}

/// Before thinhv (the probe booted first, natively): memory decoding and
/// bus mastering on for the edu device, as a firmware driver could leave a
/// device that thinhv is told to hide. Returns its address.
pub fn arm() -> Option<(u8, u8, u8)> {
    let (bus, dev, func) = find_edu()?;
    let cmd = cfg_read(bus, dev, func, 0x04);
    cfg_write(bus, dev, func, 0x04, (cmd & 0xffff) | 0x6);
    Some((bus, dev, func))
}

/// A hidden edu device in thinhv's inventory (status area records):
/// (bus, devfn, BAR0).
fn hidden_edu(status: (u64, u64)) -> Option<(u8, u8, u64)> {
    let hdr = status.0 as *const u8;
    // SAFETY: header fields of the readable status area (devices offset,
    // record size and count at 0x68, 0x6C, 0x70).
    let (off, size, n) = unsafe {
        (
            core::ptr::read_unaligned(hdr.add(0x68).cast::<u32>()),
            core::ptr::read_unaligned(hdr.add(0x6c).cast::<u32>()),
            core::ptr::read_unaligned(hdr.add(0x70).cast::<u32>()),
        )
    };
    for i in 0..u64::from(n) {
        let rec = status.0 + u64::from(off) + i * u64::from(size);
        if rec + 0x28 > status.0 + status.1 {
            return None;
        }
        // SAFETY: a device record inside the status area.
        let (vendor, device, owner, bus, devfn, bar0) = unsafe {
            (
                core::ptr::read_unaligned((rec + 4) as *const u16),
                core::ptr::read_unaligned((rec + 6) as *const u16),
                core::ptr::read_unaligned((rec + 0x11) as *const u8),
                core::ptr::read_unaligned((rec + 2) as *const u8),
                core::ptr::read_unaligned((rec + 3) as *const u8),
                core::ptr::read_unaligned((rec + 0x20) as *const u64),
            )
        };
        if vendor == 0x1234 && device == 0x11e8 && owner == thinhv_abi::status::OWNER_HIDDEN {
            return Some((bus, devfn, bar0 & !0xf));
        }
    }
    None
}

fn count(page: &[u8], b: u8) -> usize {
    page.iter().filter(|&&x| x == b).count()
}

/// Runs the DMA checks. `protected` is thinhv's protected region (from the
/// status hypercall); `status` its status area.
pub fn check(protected: (u64, u64), status: (u64, u64)) {
    let bar = if let Some((bus, dev, func)) = find_edu() {
        kv("edu_found", 1);
        kv("edu_bdf", format_args!("{bus:02x}:{dev:02x}.{func}"));
        kv(
            "edu_source_id",
            format_args!("{:#06x}", (u16::from(bus) << 8) | (u16::from(dev) << 3)),
        );
        let bar = u64::from(cfg_read(bus, dev, func, 0x10) & !0xf);
        // Memory decoding and bus mastering on.
        let cmd = cfg_read(bus, dev, func, 0x04);
        cfg_write(bus, dev, func, 0x04, (cmd & 0xffff) | 0x6);
        bar
    } else if let Some((bus, devfn, bar)) = hidden_edu(status) {
        // Hidden by thinhv: absent from configuration space, but armed
        // before thinhv started (its BAR from thinhv's inventory).
        kv("edu_found", 0);
        kv("edu_hidden", 1);
        kv(
            "edu_bdf",
            format_args!("{bus:02x}:{:02x}.{}", devfn >> 3, devfn & 7),
        );
        kv(
            "edu_source_id",
            format_args!("{:#06x}", (u16::from(bus) << 8) | u16::from(devfn)),
        );
        kv(
            "edu_cf8_id",
            format_args!("{:#x}", cfg_read(bus, devfn >> 3, devfn & 7, 0)),
        );
        kv(
            "edu_cf8_command",
            format_args!("{:#x}", cfg_read(bus, devfn >> 3, devfn & 7, 4)),
        );
        bar
    } else {
        kv("edu_found", 0);
        return;
    };
    let edu = Edu { bar };
    kv("edu_ident", format_args!("{:#x}", edu.r32(0)));
    let Ok(pages) = uefi::boot::allocate_pages(
        uefi::boot::AllocateType::AnyPages,
        uefi::boot::MemoryType::LOADER_DATA,
        2,
    ) else {
        kv("dma_alloc", "failed");
        return;
    };
    let src = pages.as_ptr() as u64;
    let dst = src + 4096;
    // SAFETY: two pages just allocated for the probe.
    let buf = unsafe { core::slice::from_raw_parts_mut(pages.as_ptr(), 8192) };
    buf[..4096].fill(PATTERN);
    buf[4096..].fill(0);
    // RAM → device buffer, then device buffer → ordinary RAM.
    let ok1 = edu.dma(src, EDU_BUFFER, 4096, false);
    let ok2 = edu.dma(EDU_BUFFER, dst, 4096, true);
    kv("dma_completed", u8::from(ok1 && ok2));
    kv("dma_ordinary_bytes", count(&buf[4096..], PATTERN));

    // Device buffer → the last page of thinhv's status area (the guest can
    // read it back through its read-only mapping) and → a page of the
    // core's image (checked by the CRC).
    let status_page = status.0 + status.1 - 4096;
    // SAFETY: the status area is mapped read-only for the guest.
    let before = unsafe { core::slice::from_raw_parts(status_page as *const u8, 4096) }.to_vec();
    let ok3 = edu.dma(EDU_BUFFER, status_page, 4096, true);
    // SAFETY: as above.
    let after = unsafe { core::slice::from_raw_parts(status_page as *const u8, 4096) };
    kv("dma_status_completed", u8::from(ok3));
    kv(
        "dma_into_status_bytes",
        count(after, PATTERN).saturating_sub(count(&before, PATTERN)),
    );
    // The IOMMU records in the status area (offset and count at 0x78/0x7C
    // of its header).
    let hdr = status.0 as *const u8;
    // SAFETY: the status area header is readable (read-only mapping).
    let (off, n) = unsafe {
        (
            core::ptr::read_unaligned(hdr.add(0x78).cast::<u32>()),
            core::ptr::read_unaligned(hdr.add(0x7c).cast::<u32>()),
        )
    };
    let rec = (n > 0 && u64::from(off) + 32 <= status.1).then(|| status.0 + u64::from(off));
    // SAFETY: the first IOMMU record, inside the status area.
    let state = rec.map_or(0, |r| unsafe {
        core::ptr::read_volatile((r + 9) as *const u8)
    });
    // Into the core's image only when the IOMMU translates: without it the
    // write would land in thinhv's code.
    if state == thinhv_abi::status::IOMMU_STATE_TRANSLATING {
        let core_page = protected.0 + 0x10000;
        let integrity_before = hc(Function::INTEGRITY, 0, 0, 0);
        let ok4 = core_page + 4096 <= protected.0 + protected.1
            && edu.dma(EDU_BUFFER, core_page, 4096, true);
        let integrity_after = hc(Function::INTEGRITY, 0, 0, 0);
        kv("dma_core_completed", u8::from(ok4));
        kv("dma_core_target", format_args!("{core_page:#x}"));
        kv(
            "dma_core_crc_unchanged",
            u8::from(
                integrity_before[2] == integrity_after[2]
                    && integrity_after[1] == integrity_after[2],
            ),
        );
    } else {
        kv("dma_core_skipped", 1);
        // Collect faults the same way as above, for the report.
        let _ = hc(Function::INTEGRITY, 0, 0, 0);
    }
    kv("iommu_count", n);
    if let Some(rec) = rec {
        // SAFETY: as above.
        let (state, faults, addr, source, write) = unsafe {
            (
                core::ptr::read_volatile((rec + 9) as *const u8),
                core::ptr::read_volatile((rec + 0x0c) as *const u32),
                core::ptr::read_volatile((rec + 0x10) as *const u64),
                core::ptr::read_volatile((rec + 0x18) as *const u16),
                core::ptr::read_volatile((rec + 0x1b) as *const u8),
            )
        };
        kv("iommu_state", state);
        kv("iommu_faults", faults);
        kv("iommu_last_fault_address", format_args!("{addr:#x}"));
        kv("iommu_last_fault_source", format_args!("{source:#06x}"));
        kv("iommu_last_fault_write", write);
    }
    // The log ring (offset and size at 0x50/0x54 of the header) names the
    // blocked DMA.
    // SAFETY: header fields of the readable status area.
    let (log_off, log_size) = unsafe {
        (
            core::ptr::read_unaligned(hdr.add(0x50).cast::<u32>()),
            core::ptr::read_unaligned(hdr.add(0x54).cast::<u32>()),
        )
    };
    if u64::from(log_off) + u64::from(log_size) <= status.1 {
        // SAFETY: the log ring lies inside the status area.
        let ring =
            unsafe { core::slice::from_raw_parts(hdr.add(log_off as usize), log_size as usize) };
        let needle = b"DMA write by ";
        kv(
            "iommu_fault_logged",
            u8::from(ring.windows(needle.len()).any(|w| w == needle)),
        );
    }
    // SAFETY: the pages were allocated above and the device is idle.
    let _ = unsafe { uefi::boot::free_pages(pages, 2) };
}
