//! Hypercall buffers in device memory, as a hostile kernel would name them:
//! STATUS and LOG_READ asked to write into the local APIC, the HPET, an
//! ECAM page, an IOMMU's registers, the legacy VGA window and the page
//! above the top of the memory map. thinhv must refuse every one with
//! BAD_ADDRESS (3) — had it written, the hypervisor itself would have
//! stored guest-chosen bytes into device registers.
//!
//! Where a write would land on a register, the buffer covers read-only
//! registers only (the APIC version, the HPET capabilities, an IOMMU's
//! capability or feature register), so that a hypervisor that wrongly
//! accepts cannot take the machine down: the report then shows OK (0).
//!
//! [`fragment_if_asked`] runs natively before thinhv (the probe's `arm`
//! mode): when the ESP holds [`FRAGMENT_MARKER`] it splits a block of RAM
//! into many small ranges, so that the firmware's memory map holds more
//! RAM ranges than thinhv's loader passes to the core. A loader that merged
//! ranges across the smallest gaps then covered the legacy VGA window
//! (a 384 KiB hole, smaller than the holes made here) with RAM.
use crate::probe::{hc, kv};
use core::ptr::NonNull;
use thinhv_abi::hypercall::{Function, Status};
use uefi::boot::{self, AllocateType, MemoryType};
use uefi::mem::memory_map::MemoryMap;
use uefi::println;

/// ESP file whose presence asks the native probe to fragment the map.
pub const FRAGMENT_MARKER: &str = "\\EFI\\thinhv\\fragment-memory-map";
/// Pages in each piece (512 KiB: larger than the VGA hole).
const PIECE_PAGES: usize = 128;
/// RAM ranges added (each followed by a reserved piece).
const PIECES: usize = 200;

/// The legacy VGA window (PC architecture; not RAM the OS owns).
const VGA_WINDOW: u64 = 0xa_0000;
/// The HPET's usual base (IA-PC HPET specification; q35).
const HPET_BASE: u64 = 0xfed0_0000;
/// Local APIC version register (read-only; Intel SDM Vol. 3A Table 11-1).
const APIC_VERSION: u64 = 0x30;
/// VT-d capability register (read-only; VT-d specification §11.4.2).
const VTD_CAP: u64 = 0x08;
/// AMD-Vi extended feature register (read-only).
const AMDVI_EFR: u64 = 0x30;

/// Whether the probe's own ESP holds the file `path` (a test's request).
pub(crate) fn esp_has(path: &str) -> bool {
    use uefi::proto::media::file::{File, FileAttribute, FileMode};
    let Ok(mut fs) = boot::get_image_file_system(boot::image_handle()) else {
        return false;
    };
    let Ok(mut root) = fs.open_volume() else {
        return false;
    };
    let Ok(name) = uefi::CString16::try_from(path) else {
        return false;
    };
    root.open(&name, FileMode::Read, FileAttribute::empty())
        .is_ok()
}

/// Whether a memory type is RAM the OS owns after `ExitBootServices`
/// (the loader's rule).
fn os_ram(t: MemoryType) -> bool {
    matches!(
        t,
        MemoryType::LOADER_CODE
            | MemoryType::LOADER_DATA
            | MemoryType::BOOT_SERVICES_CODE
            | MemoryType::BOOT_SERVICES_DATA
            | MemoryType::CONVENTIONAL
            | MemoryType::ACPI_RECLAIM
            | MemoryType::PERSISTENT_MEMORY
    )
}

/// OS RAM ranges in the current map (adjacent ones joined), and the first
/// address above the highest of them that no descriptor describes (a hole
/// just above the top of RAM; reserved memory there, thinhv's own region
/// included, is stepped over).
fn ram_ranges() -> (usize, u64) {
    let Ok(map) = boot::memory_map(MemoryType::LOADER_DATA) else {
        return (0, 0);
    };
    let span = |d: &uefi::mem::memory_map::MemoryDescriptor| {
        (d.phys_start, d.phys_start + d.page_count * 4096)
    };
    let mut ram: alloc::vec::Vec<(u64, u64)> = map
        .entries()
        .filter(|d| os_ram(d.ty) && d.page_count > 0)
        .map(span)
        .collect();
    ram.sort_unstable();
    let mut n = 0;
    let mut end = None;
    for (s, e) in ram {
        match end {
            Some(x) if s <= x => end = Some(e.max(x)),
            _ => {
                n += 1;
                end = Some(e);
            }
        }
    }
    let mut hole = end.unwrap_or(0);
    for _ in 0..map.entries().len() {
        match map
            .entries()
            .map(span)
            .find(|&(s, e)| s <= hole && hole < e)
        {
            Some((_, e)) => hole = e,
            None => break,
        }
    }
    (n, hole)
}

/// Natively, before thinhv starts: many small RAM ranges when the ESP asks
/// for them (see the module documentation).
pub fn fragment_if_asked() {
    if !esp_has(FRAGMENT_MARKER) {
        return;
    }
    let Ok(block) = boot::allocate_pages(
        AllocateType::AnyPages,
        MemoryType::RESERVED,
        2 * PIECES * PIECE_PAGES,
    ) else {
        println!("THINHV-PROBE-FRAGMENTED failed: no memory");
        return;
    };
    let mut freed = 0;
    for i in 0..PIECES {
        let at = block.as_ptr() as u64 + ((2 * i + 1) * PIECE_PAGES * 4096) as u64;
        let Some(p) = NonNull::new(at as *mut u8) else {
            continue;
        };
        // SAFETY: every odd piece of the block allocated above, never
        // touched; the even pieces stay reserved (left to the OS as such).
        if unsafe { boot::free_pages(p, PIECE_PAGES) }.is_ok() {
            freed += 1;
        }
    }
    println!(
        "THINHV-PROBE-FRAGMENTED {freed} pieces freed, {} RAM ranges",
        ram_ranges().0
    );
}

fn read32(pa: u64) -> u32 {
    // SAFETY: 4-byte aligned reads of the ACPI tables, ECAM and thinhv's
    // status area, all identity-mapped and readable for the guest; reads
    // have no side effects there.
    unsafe { core::ptr::read_volatile(pa as *const u32) }
}

fn read64(pa: u64) -> u64 {
    (u64::from(read32(pa + 4)) << 32) | u64::from(read32(pa))
}

/// The ECAM window of segment 0 from the MCFG (ACPI 6.5 §5.2 "MCFG",
/// PCI Firmware specification §4.1.2): (base of bus 0's slot, first bus).
fn ecam() -> Option<(u64, u8)> {
    let rsdp = uefi::system::with_config_table(|t| {
        t.iter()
            .find(|e| e.guid == uefi::table::cfg::ConfigTableEntry::ACPI2_GUID)
            .map(|e| e.address as u64)
    })?;
    let xsdt = read64(rsdp + 24);
    if xsdt == 0 {
        return None;
    }
    let len = u64::from(read32(xsdt + 4));
    let mut at = xsdt + 36;
    while at + 8 <= xsdt + len {
        let t = read64(at);
        at += 8;
        if t == 0 || read32(t) != u32::from_le_bytes(*b"MCFG") {
            continue;
        }
        let tlen = u64::from(read32(t + 4));
        let mut e = t + 44;
        while e + 16 <= t + tlen {
            let base = read64(e);
            let w = read32(e + 8);
            let (segment, start_bus) = (w & 0xffff, ((w >> 16) & 0xff) as u8);
            if segment == 0 {
                return Some((base, start_bus));
            }
            e += 16;
        }
    }
    None
}

/// An ECAM page of the first bus that no function answers (vendor ID all
/// ones), so a write that got through would reach no register.
fn empty_ecam_page() -> Option<u64> {
    let (base, start_bus) = ecam()?;
    let bus = base + (u64::from(start_bus) << 20);
    (0..32u64)
        .rev()
        .map(|dev| bus + (dev << 15) + (7 << 12))
        .find(|&pa| read32(pa) & 0xffff == 0xffff)
}

/// The first IOMMU in thinhv's status area, with a read-only register.
fn iommu_register(status: (u64, u64)) -> Option<u64> {
    if status.0 == 0 {
        return None;
    }
    let (off, n) = (read32(status.0 + 0x78), read32(status.0 + 0x7c));
    if n == 0 || u64::from(off) + 32 > status.1 {
        return None;
    }
    let rec = status.0 + u64::from(off);
    let base = read64(rec);
    // SAFETY: a byte of the readable status area.
    let kind = unsafe { core::ptr::read_volatile((rec + 8) as *const u8) };
    match kind {
        thinhv_abi::handoff::IOMMU_KIND_VTD => Some(base + VTD_CAP),
        thinhv_abi::handoff::IOMMU_KIND_AMDVI => Some(base + AMDVI_EFR),
        _ => None,
    }
}

/// Size of the report STATUS writes.
const REPORT: u64 = core::mem::size_of::<thinhv_abi::hypercall::StatusReport>() as u64;

/// One target: LOG_READ of 8 bytes (onto read-only registers), and STATUS
/// too where the whole report may land harmlessly. Prints the status of
/// the first call that was not refused (3 when both were).
fn attack(what: &str, gpa: Option<u64>, whole_report: bool) {
    let Some(gpa) = gpa else {
        kv(&alloc::format!("attack_hc_mmio_{what}"), "none");
        return;
    };
    kv(
        &alloc::format!("attack_hc_mmio_{what}_at"),
        format_args!("{gpa:#x}"),
    );
    let mut seen = hc(Function::LOG_READ, gpa, 8, 0)[0];
    if whole_report && seen == Status::BAD_ADDRESS.0 {
        seen = hc(Function::STATUS, gpa, REPORT, 0)[0];
    }
    kv(&alloc::format!("attack_hc_mmio_{what}"), seen);
}

/// Under thinhv (after the seal): every buffer in device memory is refused.
/// `status` is thinhv's status area (base, size).
pub fn hc_buffer_attacks(status: (u64, u64)) {
    let apic = crate::apic::page();
    attack("lapic", Some(apic + APIC_VERSION), false);
    attack("hpet", Some(HPET_BASE), false);
    attack("ecam", empty_ecam_page(), true);
    attack("iommu", iommu_register(status), false);
    attack("vga_window", Some(VGA_WINDOW), true);
    let (ranges, top) = ram_ranges();
    kv("attack_hc_ram_ranges", ranges);
    attack("above_ram", (top != 0).then_some(top), true);
    // A buffer in RAM still works (the control).
    let mut buf = [0u8; REPORT as usize];
    kv(
        "attack_hc_ram_control",
        hc(Function::STATUS, buf.as_mut_ptr() as u64, REPORT, 0)[0],
    );
}
