//! INIT and SIPI to a processor thinhv does not run, as a hostile kernel
//! would send them after the seal (issue 11, item 2).
//!
//! [`disable_ap_if_asked`] runs natively before thinhv (the probe's `arm`
//! mode): when the ESP holds [`DISABLE_AP_MARKER`] it disables the first AP
//! through MP services, so the firmware reports it disabled and thinhv
//! leaves it out. Under thinhv, [`init_sipi_to_cpus_outside`] then sends
//! INIT-SIPI-SIPI to it — by logical destination, by the "all excluding
//! self" shorthand and by its physical APIC ID — with the SIPI vector at a
//! real-mode stub that stores a marker. A marker means the processor
//! started natively, outside the second-level tables and the IOMMU's
//! protection: the attack succeeded.
use crate::attacks_hc::esp_has;
use crate::probe::kv;
use core::arch::asm;
use core::time::Duration;
use uefi::boot::{self, AllocateType, MemoryType};
use uefi::println;
use uefi::proto::pi::mp::MpServices;

/// ESP file whose presence asks the native probe to disable an AP.
pub const DISABLE_AP_MARKER: &str = "\\EFI\\thinhv\\disable-ap";

/// xAPIC ICR (SDM Vol. 3A Table 11-1) and the x2APIC ICR MSR.
const ICR_LOW: u64 = 0x300;
const ICR_HIGH: u64 = 0x310;
const X2APIC_ICR: u32 = 0x830;
/// ICR low halves (SDM Vol. 3A §11.6.1): INIT, level, assert; STARTUP.
const INIT: u32 = 0x0000_c500;
const STARTUP: u32 = 0x0000_0600;
/// Destination mode logical; shorthand "all excluding self".
const LOGICAL: u32 = 1 << 11;
const ALL_BUT_SELF: u32 = 3 << 18;

/// Where the stub stores its marker, in its page.
const MARKER_OFFSET: u64 = 0x800;
const MARKER: u16 = 0x1234;
/// Real mode at CS = vector << 8, IP = 0: `mov word [cs:0x800], 0x1234`,
/// then `cli; hlt; jmp $-1`.
const STUB: [u8; 11] = [
    0x2e, 0xc7, 0x06, 0x00, 0x08, 0x34, 0x12, // mov word cs:[0x800], 0x1234
    0xfa, // cli
    0xf4, // hlt
    0xeb, 0xfd, // jmp back to hlt
];

fn mp() -> Option<boot::ScopedProtocol<MpServices>> {
    let h = boot::get_handle_for_protocol::<MpServices>().ok()?;
    boot::open_protocol_exclusive::<MpServices>(h).ok()
}

/// Natively, before thinhv starts: the first AP disabled when the ESP asks.
pub fn disable_ap_if_asked() {
    if !esp_has(DISABLE_AP_MARKER) {
        return;
    }
    let Some(mp) = mp() else {
        println!("THINHV-PROBE-AP-DISABLED none: no MP services");
        return;
    };
    let Ok(count) = mp.get_number_of_processors() else {
        return;
    };
    let ap = (0..count.total).find_map(|i| {
        let p = mp.get_processor_info(i).ok()?;
        (!p.is_bsp() && p.is_enabled()).then_some((i, p.processor_id))
    });
    match ap {
        Some((i, id)) if mp.enable_disable_ap(i, false, None).is_ok() => {
            println!("THINHV-PROBE-AP-DISABLED apic {id}");
        }
        _ => println!("THINHV-PROBE-AP-DISABLED none"),
    }
}

/// Sends one IPI through this CPU's ICR (xAPIC page or x2APIC MSR).
fn send(low: u32, dest: u32) {
    if crate::apic::x2apic() {
        // SAFETY: the x2APIC ICR; an IPI is what the probe means to send
        // (thinhv intercepts the write).
        unsafe {
            asm!("wrmsr", in("ecx") X2APIC_ICR, in("eax") low, in("edx") dest, options(nostack));
        }
    } else {
        let page = crate::apic::page();
        // SAFETY: this CPU's xAPIC registers, identity-mapped by the
        // firmware; ICR high first, the write to ICR low sends (thinhv
        // traps both).
        unsafe {
            core::ptr::write_volatile((page + ICR_HIGH) as *mut u32, dest << 24);
            core::ptr::write_volatile((page + ICR_LOW) as *mut u32, low);
        }
    }
}

/// INIT, 10 ms, SIPI, SIPI (SDM Vol. 3A §9.4.4.1), then up to 200 ms for
/// the marker. Returns whether the processor ran the stub.
fn init_sipi_sipi(mode: u32, dest: u32, stub: u64) -> bool {
    let vector = u32::try_from(stub >> 12).unwrap_or(0) & 0xff;
    send(INIT | mode, dest);
    boot::stall(Duration::from_millis(10));
    for _ in 0..2 {
        send(STARTUP | mode | vector, dest);
        boot::stall(Duration::from_micros(200));
    }
    for _ in 0..200 {
        // SAFETY: the stub's page, allocated below, still owned.
        if unsafe { core::ptr::read_volatile((stub + MARKER_OFFSET) as *const u16) } == MARKER {
            return true;
        }
        boot::stall(Duration::from_millis(1));
    }
    false
}

/// Under thinhv, after the seal: INIT-SIPI-SIPI to the AP the firmware
/// reports disabled, three ways; reports whether it started.
pub fn init_sipi_to_cpus_outside() {
    let target = mp().and_then(|mp| {
        let count = mp.get_number_of_processors().ok()?;
        (0..count.total).find_map(|i| {
            let p = mp.get_processor_info(i).ok()?;
            (!p.is_bsp() && !p.is_enabled()).then_some(p.processor_id)
        })
    });
    let Some(id) = target.and_then(|id| u32::try_from(id).ok()) else {
        kv("attack_ipi", "none");
        return;
    };
    kv("attack_ipi_target_apic", id);
    // The stub: one page below 1 MiB (a SIPI vector names a page there).
    let Ok(page) = boot::allocate_pages(
        AllocateType::MaxAddress(0x9_ffff),
        MemoryType::LOADER_DATA,
        1,
    ) else {
        kv("attack_ipi", "no-low-memory");
        return;
    };
    let stub = page.as_ptr() as u64;
    // SAFETY: the page was just allocated for the probe; 4 KiB.
    let bytes = unsafe { core::slice::from_raw_parts_mut(page.as_ptr(), 4096) };
    bytes.fill(0);
    bytes[..STUB.len()].copy_from_slice(&STUB);
    // Logical (flat model, every bit) and the shorthand first: they never
    // reached CPUs thinhv does not know. Then the physical ID.
    let cases = [
        ("logical", LOGICAL, 0xff),
        ("broadcast", ALL_BUT_SELF, 0),
        ("physical", 0, id),
    ];
    for (what, mode, dest) in cases {
        let started = init_sipi_sipi(mode, dest, stub);
        kv(
            &alloc::format!("attack_ipi_{what}_started"),
            u8::from(started),
        );
        if started {
            // The processor is out; what follows would prove nothing.
            break;
        }
    }
    // The page stays allocated: a processor that did start still runs
    // its `hlt` there.
    let log = thinhv_log();
    for (what, needle) in [
        (
            "physical",
            alloc::format!("INIT to APIC {id:#x} refused: no CPU under thinhv has this APIC ID"),
        ),
        ("sipi", alloc::format!("STARTUP to APIC {id:#x} refused")),
        (
            "logical",
            alloc::string::String::from("INIT to logical destination 0xff refused"),
        ),
    ] {
        kv(
            &alloc::format!("attack_ipi_logged_{what}"),
            u8::from(log.contains(needle.as_str())),
        );
    }
}

/// thinhv's log as far as its ring holds it (LOG_READ from position 0;
/// after the seal warnings go to the ring only, not to the serial port).
fn thinhv_log() -> alloc::string::String {
    use thinhv_abi::hypercall::{Function, Status};
    let mut out = alloc::vec::Vec::new();
    let mut chunk = [0u8; 4096];
    let mut pos = 0;
    for _ in 0..64 {
        let r = crate::probe::hc(
            Function::LOG_READ,
            chunk.as_mut_ptr() as u64,
            chunk.len() as u64,
            pos,
        );
        let n = usize::try_from(r[1]).unwrap_or(0).min(chunk.len());
        if r[0] != Status::OK.0 || n == 0 {
            break;
        }
        out.extend_from_slice(&chunk[..n]);
        pos = r[2];
    }
    alloc::string::String::from_utf8_lossy(&out).into_owned()
}
