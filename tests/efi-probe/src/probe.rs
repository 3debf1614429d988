//! The checks. Each prints `key=value`; nothing here decides pass or fail.
use core::arch::{asm, naked_asm};
use core::sync::atomic::{AtomicU64, Ordering};
use thinhv_abi::cpuid::{LEAF_SIGNATURE, LEAF1_ECX_HYPERVISOR, signature_from_regs};
use thinhv_abi::hypercall::{Function, Status, StatusReport};
use uefi::println;
use zerocopy::FromBytes;

pub(crate) fn cpuid(leaf: u32, sub: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, sub);
    [r.eax, r.ebx, r.ecx, r.edx]
}

pub(crate) fn intel() -> bool {
    let l = cpuid(0, 0);
    l[1] == u32::from_le_bytes(*b"Genu")
}

/// A hypercall (VMMCALL or VMCALL by vendor).
pub(crate) fn hc(f: Function, a0: u64, a1: u64, a2: u64) -> [u64; 4] {
    let (rax, rbx, rcx, rdx): (u64, u64, u64, u64);
    // SAFETY: only called after the thinhv signature was seen; the call
    // writes at most the buffer it names (guest memory the probe owns).
    unsafe {
        if intel() {
            asm!("xchg {b}, rbx", "vmcall", "xchg {b}, rbx", b = inout(reg) a0 => rbx,
                inout("rax") f.0 => rax, inout("rcx") a1 => rcx, inout("rdx") a2 => rdx);
        } else {
            asm!("xchg {b}, rbx", "vmmcall", "xchg {b}, rbx", b = inout(reg) a0 => rbx,
                inout("rax") f.0 => rax, inout("rcx") a1 => rcx, inout("rdx") a2 => rdx);
        }
    }
    [rax, rbx, rcx, rdx]
}

// ---- Catching #UD and #GP for one instruction at a time ---------------

/// Vector of the last exception caught (0: none).
static CAUGHT: AtomicU64 = AtomicU64::new(0);
/// Bytes to skip when one is caught (the length of the probed instruction).
static SKIP: AtomicU64 = AtomicU64::new(0);

#[unsafe(naked)]
extern "C" fn ud_stub() {
    // Frame: RIP, CS, RFLAGS, RSP, SS (no error code for #UD).
    naked_asm!(
        "push rax",
        "mov qword ptr [rip + {caught}], 6",
        "mov rax, [rip + {skip}]",
        "add [rsp + 8], rax",
        "pop rax",
        "iretq",
        caught = sym CAUGHT, skip = sym SKIP,
    );
}

#[unsafe(naked)]
extern "C" fn gp_stub() {
    // Frame: error code, RIP, CS, RFLAGS, RSP, SS.
    naked_asm!(
        "push rax",
        "mov qword ptr [rip + {caught}], 13",
        "mov rax, [rip + {skip}]",
        "add [rsp + 16], rax",
        "pop rax",
        "add rsp, 8",
        "iretq",
        caught = sym CAUGHT, skip = sym SKIP,
    );
}

#[repr(C, packed)]
struct Dtr {
    limit: u16,
    base: u64,
}

/// The firmware's IDT (identity-mapped, writable boot-services memory) and
/// the code segment the probe runs in: where the checks put their own
/// handlers for a moment.
pub(crate) struct Idt {
    entries: *mut [u64; 2],
    cs: u16,
}

impl Idt {
    /// The IDT this CPU uses now.
    pub(crate) fn current() -> Self {
        let mut d = Dtr { limit: 0, base: 0 };
        let cs: u16;
        // SAFETY: SIDT stores into `d`; reading CS has no side effects.
        unsafe {
            asm!("sidt [{}]", in(reg) &raw mut d);
            asm!("mov {:x}, cs", out(reg) cs);
        }
        Self {
            entries: d.base as *mut [u64; 2],
            cs,
        }
    }

    /// Points `vector` at `handler` (a 64-bit interrupt gate, DPL 0, in
    /// the probe's code segment); returns the entry it replaced.
    ///
    /// # Safety
    /// Interrupts are disabled until the caller puts the old entry back
    /// with [`Idt::restore`], and `handler` is a complete handler for
    /// `vector` (so nothing else is delivered through the temporary gate).
    pub(crate) unsafe fn replace(&self, vector: usize, handler: u64) -> [u64; 2] {
        let h = handler;
        let gate = [
            (h & 0xffff)
                | (u64::from(self.cs) << 16)
                | (0x8eu64 << 40)
                | (((h >> 16) & 0xffff) << 48),
            h >> 32,
        ];
        // SAFETY: the firmware's IDT is identity-mapped and writable, and
        // `vector` < 256 lies inside it; the caller's contract covers the
        // window in which the gate is ours.
        unsafe {
            let e = self.entries.add(vector);
            let old = e.read_volatile();
            e.write_volatile(gate);
            old
        }
    }

    /// Puts back an entry [`Idt::replace`] returned.
    ///
    /// # Safety
    /// `old` is what `replace` returned for `vector`.
    pub(crate) unsafe fn restore(&self, vector: usize, old: [u64; 2]) {
        // SAFETY: as in `replace`.
        unsafe { self.entries.add(vector).write_volatile(old) };
    }
}

/// Runs `f` (one instruction of `len` bytes) with #UD and #GP caught;
/// returns the vector caught, 0 if none.
pub(crate) fn catching(len: u64, f: impl FnOnce()) -> u64 {
    let idt = Idt::current();
    // SAFETY: interrupts are disabled while entries 6 and 13 are ours; the
    // stubs handle #UD and #GP completely, and the old entries go back.
    unsafe {
        asm!("cli");
        let old6 = idt.replace(6, ud_stub as *const () as u64);
        let old13 = idt.replace(13, gp_stub as *const () as u64);
        CAUGHT.store(0, Ordering::SeqCst);
        SKIP.store(len, Ordering::SeqCst);
        f();
        idt.restore(6, old6);
        idt.restore(13, old13);
        asm!("sti");
    }
    CAUGHT.load(Ordering::SeqCst)
}

pub(crate) fn rdmsr_caught(msr: u32) -> (u64, u64) {
    let mut v = 0u64;
    let caught = catching(2, || {
        let (lo, hi): (u32, u32);
        // SAFETY: a #GP for an absent MSR is caught; the instruction is
        // 2 bytes (0F 32) and EAX/EDX are zeroed first.
        unsafe {
            asm!("xor eax, eax", "xor edx, edx", "rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi);
        };
        v = (u64::from(hi) << 32) | u64::from(lo);
    });
    (caught, v)
}

// ---- An application processor, woken by the firmware -----------------

static AP_RAN: AtomicU64 = AtomicU64::new(0);
static AP_SIG: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
/// The AP's CPUID 7.0 EBX and 1 ECX (a CPU profile must mask every CPU).
static AP_FEATURES: AtomicU64 = AtomicU64::new(0);

extern "efiapi" fn ap_procedure(_: *mut core::ffi::c_void) {
    let s = cpuid(LEAF_SIGNATURE, 0);
    AP_SIG[0].store(u64::from(s[1]) | (u64::from(s[2]) << 32), Ordering::SeqCst);
    AP_SIG[1].store(u64::from(s[3]), Ordering::SeqCst);
    let f = (u64::from(cpuid(7, 0)[1]) << 32) | u64::from(cpuid(1, 0)[2]);
    AP_FEATURES.store(f, Ordering::SeqCst);
    AP_RAN.store(1, Ordering::SeqCst);
}

/// Runs a procedure on the first AP through MP services. OVMF wakes an AP
/// with INIT-SIPI-SIPI, so this exercises thinhv's INIT/SIPI path on a CPU
/// that is already in guest mode. Returns the AP's MP number.
fn ap_check() -> Option<usize> {
    use uefi::proto::pi::mp::MpServices;
    let h = uefi::boot::get_handle_for_protocol::<MpServices>().ok()?;
    let mp = uefi::boot::open_protocol_exclusive::<MpServices>(h).ok()?;
    let count = mp.get_number_of_processors().ok()?;
    kv("mp_processors", count.total);
    let ap = (0..count.total).find(|&i| {
        mp.get_processor_info(i)
            .is_ok_and(|p| !p.is_bsp() && p.is_enabled())
    })?;
    let r = mp.startup_this_ap(
        ap,
        ap_procedure,
        core::ptr::null_mut(),
        None,
        Some(core::time::Duration::from_secs(30)),
    );
    kv("ap_startup_status", if r.is_ok() { "ok" } else { "failed" });
    kv("ap_ran", AP_RAN.load(Ordering::SeqCst));
    let mut sig = [0u8; 12];
    sig[..8].copy_from_slice(&AP_SIG[0].load(Ordering::SeqCst).to_le_bytes());
    sig[8..].copy_from_slice(&AP_SIG[1].load(Ordering::SeqCst).to_le_bytes()[..4]);
    let shown = sig.map(|b| if b.is_ascii_graphic() { b } else { b'.' });
    kv("ap_signature", core::str::from_utf8(&shown).unwrap_or("?"));
    let f = AP_FEATURES.load(Ordering::SeqCst);
    kv("ap_cpuid7_ebx", format_args!("{:#x}", f >> 32));
    kv("ap_cpuid1_ecx", format_args!("{:#x}", f & 0xffff_ffff));
    Some(ap)
}

// ---- The checks ---------------------------------------------------------

pub(crate) fn kv(key: &str, value: impl core::fmt::Display) {
    println!("{key}={value}");
}

pub fn run() {
    let l1 = cpuid(1, 0);
    kv(
        "hypervisor_bit",
        u8::from(l1[2] & LEAF1_ECX_HYPERVISOR != 0),
    );
    let s = cpuid(LEAF_SIGNATURE, 0);
    let sig = signature_from_regs(s[1], s[2], s[3]);
    let shown: [u8; 12] = sig.map(|b| if b.is_ascii_graphic() { b } else { b'.' });
    kv("signature", core::str::from_utf8(&shown).unwrap_or("?"));
    kv("vmx_bit", (l1[2] >> 5) & 1);
    let e1 = cpuid(0x8000_0001, 0);
    kv("svm_bit", (e1[2] >> 2) & 1);
    kv("svm_leaf_edx", cpuid(0x8000_000a, 0)[3]);
    // The MSR and CPUID attacks run bare too: there they are the control
    // that shows each would succeed without thinhv.
    crate::attacks::msr_attacks();
    crate::attacks::cpuid_follows_cr4();
    crate::timing::exit_round_trips();
    crate::transparency::single_step();
    crate::nmi::blocked_nmi_stays_pending();
    if sig != thinhv_abi::cpuid::SIGNATURE {
        kv("thinhv", "absent");
        return;
    }
    let (c, efer) = rdmsr_caught(0xc000_0080);
    kv("efer_read_fault", c);
    kv("efer_svme", (efer >> 12) & 1);
    let (c, _) = rdmsr_caught(0xc001_0117);
    kv("hsave_read_fault", c);
    let (c, _) = rdmsr_caught(0x3a);
    kv("feature_control_read_fault", c);
    // VMRUN (0F 01 D8) and VMXON [mem] would be #UD for a guest without
    // virtualization; VMRUN is 3 bytes.
    let c = catching(3, || {
        // SAFETY: the resulting #UD is caught and the instruction skipped;
        // RAX points at the probe's own stack, never used as a VMCB.
        unsafe { asm!("vmrun", in("rax") 0u64, options(nostack)) };
    });
    kv("vmrun_fault", c);
    let c = catching(3, || {
        // SAFETY: as above for STGI (0F 01 DC).
        unsafe { asm!("stgi", options(nostack)) };
    });
    kv("stgi_fault", c);
    if intel() {
        vmx_hidden_checks();
    }
    let (c, fc) = rdmsr_caught(0x3a);
    if c == 0 {
        kv("feature_control", format_args!("{fc:#x}"));
    }
    xsetbv_check();
    feature_report();

    let v = hc(Function::VERSION, 0, 0, 0);
    kv("hc_version_status", v[0]);
    kv("hc_version", v[1]);
    kv("hc_abi", v[2]);
    kv("hc_cpus", v[3]);

    let mut buf = [0u8; 256];
    let r = hc(
        Function::STATUS,
        buf.as_mut_ptr() as u64,
        buf.len() as u64,
        0,
    );
    kv("hc_status_status", r[0]);
    let Ok((report, _)) = StatusReport::read_from_prefix(&buf) else {
        return;
    };
    kv("status_cpus_virtualized", report.cpus_virtualized);
    kv("status_cpus_expected", report.cpus_expected);
    kv("status_bytes_reserved", report.bytes_reserved);
    kv(
        "status_protected_base",
        format_args!("{:#x}", report.protected_base),
    );
    kv("status_protected_size", report.protected_size);
    kv("status_sealed", report.sealed);
    let (pbase, psize) = (report.protected_base, report.protected_size);
    let blocked_before = report.blocked_writes;

    let mut log = [0u8; 4096];
    let r = hc(
        Function::LOG_READ,
        log.as_mut_ptr() as u64,
        log.len() as u64,
        0,
    );
    kv("hc_log_status", r[0]);
    kv("hc_log_bytes", r[1]);
    let text = core::str::from_utf8(&log[..(r[1] as usize).min(log.len())]).unwrap_or("");
    kv(
        "hc_log_mentions_core",
        u8::from(text.contains("thinhv core") && text.contains("core ready")),
    );

    // Pointers into the hypervisor: refused, nothing changes.
    let cases = [
        ("status_into_protected", Function::STATUS, pbase, 0x100),
        ("status_straddling", Function::STATUS, pbase - 0x10, 0x100),
        (
            "log_into_protected",
            Function::LOG_READ,
            pbase + psize / 2,
            0x100,
        ),
        (
            "log_into_status_page",
            Function::LOG_READ,
            report.status_page_base,
            0x100,
        ),
        (
            "counts_into_protected",
            Function::EXIT_COUNTS,
            pbase + 0x2000,
            0x1000,
        ),
    ];
    for (name, f, gpa, len) in cases {
        let r = hc(f, gpa, len, 0);
        kv(name, r[0]);
    }
    let r = hc(Function::DEVIRTUALIZE, 0, 0, 0);
    kv("devirtualize_after_seal", r[0]);
    let r = hc(Function(0x7777), 0, 0, 0);
    kv("unknown_function", r[0]);

    // Reads of the protected region return none of its bytes.
    let mut nonzero = 0u64;
    let mut a = pbase;
    while a < pbase + psize {
        // SAFETY: the region is identity-mapped guest-physical memory; the
        // hypervisor shows the guest a blank page there.
        let v = unsafe { core::ptr::read_volatile(a as *const u64) };
        nonzero += u64::from(v.count_ones() != 0);
        a += 8;
    }
    kv("protected_nonzero_qwords", nonzero);

    // Writes change nothing.
    let targets = [pbase, pbase + ((psize / 2) & !0xfff), pbase + psize - 8];
    let mut visible = 0u64;
    for t in targets {
        // SAFETY: as above; the write is discarded by the hypervisor.
        unsafe {
            core::ptr::write_volatile(t as *mut u64, 0xdead_beef_cafe_f00d);
            visible += u64::from(core::ptr::read_volatile(t as *const u64) != 0);
        }
    }
    kv("protected_writes_visible", visible);
    let r = hc(
        Function::STATUS,
        buf.as_mut_ptr() as u64,
        buf.len() as u64,
        0,
    );
    if r[0] == Status::OK.0
        && let Ok((after, _)) = StatusReport::read_from_prefix(&buf)
    {
        kv(
            "blocked_writes_delta",
            after.blocked_writes - blocked_before,
        );
    }
    let i = hc(Function::INTEGRITY, 0, 0, 0);
    kv("integrity_status", i[0]);
    kv("integrity_expected", format_args!("{:#010x}", i[1]));
    kv("integrity_current", format_args!("{:#010x}", i[2]));
    kv("integrity_canary", i[3]);
    let mut counts = [0u64; thinhv_abi::exit::EXIT_REASON_COUNT];
    let r = hc(
        Function::EXIT_COUNTS,
        counts.as_mut_ptr() as u64,
        core::mem::size_of_val(&counts) as u64,
        0,
    );
    kv("hc_counts_status", r[0]);
    kv(
        "cpu0_cpuid_exits",
        counts[thinhv_abi::exit::ExitReason::CPUID.index()],
    );
    kv(
        "cpu0_protected_exits",
        counts[thinhv_abi::exit::ExitReason::PROTECTED_ACCESS.index()],
    );
    if let Some(ap) = ap_check() {
        let r = hc(
            Function::EXIT_COUNTS,
            counts.as_mut_ptr() as u64,
            core::mem::size_of_val(&counts) as u64,
            ap as u64,
        );
        if r[0] == Status::OK.0 {
            use thinhv_abi::exit::ExitReason as R;
            kv("ap_init_exits", counts[R::INIT.index()]);
            kv("ap_sipi_exits", counts[R::SIPI.index()]);
            kv("ap_cpuid_exits", counts[R::CPUID.index()]);
        }
    }
    crate::attacks::invd_attack();
    crate::dma::check(
        (pbase, psize),
        (report.status_page_base, report.status_page_size),
    );
    // Only reached under thinhv (the signature check above returns).
    crate::attacks_hc::hc_buffer_attacks((report.status_page_base, report.status_page_size));
    crate::attacks_ipi::init_sipi_to_cpus_outside();
}

/// VMX-specific hiding (Intel only: on AMD these instructions and bits are
/// reserved by the processor itself, and emulators differ in how they
/// treat them).
fn vmx_hidden_checks() {
    // VMXON [rax] (F3 0F C7 30): #UD for a guest without VMX.
    let region = [0u64; 2];
    let c = catching(4, || {
        // SAFETY: the #UD is caught and the 4-byte instruction skipped; the
        // operand points at a buffer on the stack.
        unsafe { asm!("vmxon qword ptr [rax]", in("rax") &raw const region, options(nostack)) };
    });
    kv("vmxon_fault", c);
    let cr4: u64;
    // SAFETY: reading CR4 at CPL 0.
    unsafe { asm!("mov {}, cr4", out(reg) cr4) };
    kv("cr4_vmxe", (cr4 >> 13) & 1);
    let c = catching(3, || {
        // SAFETY: setting CR4.VMXE must fault for a guest without VMX (the
        // #GP is caught; MOV CR4, RAX is 3 bytes); if it did not, it is put
        // back at once.
        unsafe {
            asm!("mov cr4, rax", "mov cr4, rcx", in("rax") cr4 | (1 << 13), in("rcx") cr4, options(nostack));
        };
    });
    kv("cr4_vmxe_set_fault", c);
}

/// The feature registers a CPU profile governs, and the XSAVE leaf.
fn feature_report() {
    let l1 = cpuid(1, 0);
    let l7 = cpuid(7, 0);
    let x1 = cpuid(0x8000_0001, 0);
    let d0 = cpuid(0xd, 0);
    kv("cpuid1_ecx", format_args!("{:#x}", l1[2]));
    kv("cpuid1_edx", format_args!("{:#x}", l1[3]));
    kv("cpuid7_ebx", format_args!("{:#x}", l7[1]));
    kv("cpuid7_ecx", format_args!("{:#x}", l7[2]));
    kv("cpuid7_edx", format_args!("{:#x}", l7[3]));
    kv("cpuid7_1_eax", format_args!("{:#x}", cpuid(7, 1)[0]));
    kv("xsave_d1_eax", format_args!("{:#x}", cpuid(0xd, 1)[0]));
    kv("ext1_ecx", format_args!("{:#x}", x1[2]));
    kv("ext1_edx", format_args!("{:#x}", x1[3]));
    kv(
        "xsave_xcr0_supported",
        format_args!("{:#x}", u64::from(d0[0]) | (u64::from(d0[3]) << 32)),
    );
    kv("xsave_max_size", d0[2]);
    kv("xsave_avx_leaf_eax", cpuid(0xd, 2)[0]);
}

/// XSETBV works for the guest: with CR4.OSXSAVE on, set XCR0 to x87|SSE and
/// read it back; then try x87|SSE|AVX, which a CPU profile without AVX must
/// refuse with #GP (`xsetbv_avx_fault`). OSXSAVE is set even when CPUID
/// hides XSAVE: a profile hides the feature, the processor still has it.
fn xsetbv_check() {
    let cr4: u64;
    // SAFETY: reading CR4 at CPL 0.
    unsafe { asm!("mov {}, cr4", out(reg) cr4) };
    // `mov cr4, rax` (0F 22 E0, 3 bytes): a #GP (no XSAVE) is caught.
    let c = catching(3, || {
        // SAFETY: setting OSXSAVE only enables XGETBV/XSETBV; CR4 is
        // restored below.
        unsafe { asm!("mov cr4, rax", in("rax") cr4 | (1 << 18), options(nostack)) };
    });
    if c != 0 {
        kv("xsetbv", "no-xsave");
        return;
    }
    let mut xcr0 = 0u64;
    let c = catching(3, || {
        let (lo, hi): (u32, u32);
        // SAFETY: XSETBV (0F 01 D1) with XCR0 = x87|SSE, a valid value; a
        // fault is caught. Then XGETBV reads it back.
        unsafe {
            asm!("xsetbv", in("ecx") 0u32, in("eax") 3u32, in("edx") 0u32);
            asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi);
        }
        xcr0 = (u64::from(hi) << 32) | u64::from(lo);
    });
    let avx = catching(3, || {
        // SAFETY: XSETBV (0F 01 D1) with x87|SSE|AVX: valid on a processor
        // with AVX unless a CPU profile hides it; a fault is caught.
        unsafe { asm!("xsetbv", in("ecx") 0u32, in("eax") 7u32, in("edx") 0u32) };
    });
    let back = catching(3, || {
        // SAFETY: XCR0 back to x87|SSE before CR4.OSXSAVE is cleared.
        unsafe { asm!("xsetbv", in("ecx") 0u32, in("eax") 3u32, in("edx") 0u32) };
    });
    // SAFETY: restores the firmware's CR4.
    unsafe { asm!("mov cr4, {}", in(reg) cr4) };
    kv("xsetbv_fault", c);
    kv("xcr0_after_xsetbv", xcr0);
    kv("xsetbv_avx_fault", avx);
    kv("xsetbv_restore_fault", back);
}

/// ESP path of thinhv when the probe boots first (`arm` mode).
const THINHV_AFTER_PROBE: &str = "\\EFI\\thinhv\\thinhv.efi";

/// Booted natively with thinhv beside it: arm the edu device (as a
/// firmware driver might leave a device thinhv then hides), then start
/// thinhv, which starts the probe again under it.
fn arm_then_start_thinhv() -> bool {
    use uefi::boot::{self, LoadImageSource, OpenProtocolAttributes, OpenProtocolParams};
    use uefi::proto::device_path::DevicePath;
    use uefi::proto::device_path::build::{DevicePathBuilder, media::FilePath};
    use uefi::proto::loaded_image::LoadedImage;
    let s = cpuid(LEAF_SIGNATURE, 0);
    if signature_from_regs(s[1], s[2], s[3]) == thinhv_abi::cpuid::SIGNATURE {
        return false;
    }
    let Ok(li) = boot::open_protocol_exclusive::<LoadedImage>(boot::image_handle()) else {
        return false;
    };
    let Some(device) = li.device() else {
        return false;
    };
    drop(li);
    // SAFETY: GET_PROTOCOL does not take ownership; the path is read while
    // the handle exists.
    let Ok(dp) = (unsafe {
        boot::open_protocol::<DevicePath>(
            OpenProtocolParams {
                handle: device,
                agent: boot::image_handle(),
                controller: None,
            },
            OpenProtocolAttributes::GetProtocol,
        )
    }) else {
        return false;
    };
    let Ok(name) = uefi::CString16::try_from(THINHV_AFTER_PROBE) else {
        return false;
    };
    let mut buf = alloc::vec::Vec::new();
    let mut b = DevicePathBuilder::with_vec(&mut buf);
    for node in dp.node_iter() {
        let Ok(next) = b.push(&node) else {
            return false;
        };
        b = next;
    }
    let Ok(full) = b
        .push(&FilePath { path_name: &name })
        .and_then(DevicePathBuilder::finalize)
    else {
        return false;
    };
    let Ok(handle) = boot::load_image(
        boot::image_handle(),
        LoadImageSource::FromDevicePath {
            device_path: full,
            boot_policy: uefi::proto::BootPolicy::ExactMatch,
        },
    ) else {
        return false;
    };
    crate::attacks_hc::fragment_if_asked();
    crate::attacks_ipi::disable_ap_if_asked();
    match crate::dma::arm() {
        Some((b, d, f)) => println!("THINHV-PROBE-ARMED edu {b:02x}:{d:02x}.{f}"),
        None => println!("THINHV-PROBE-ARMED no edu"),
    }
    let _ = boot::start_image(handle);
    true
}

/// ESP file whose presence makes the probe leave boot services at its end,
/// as an OS loader does, and wait there: thinhv's appliance partitions
/// start once the firmware's ExitBootServices has returned
/// (`docs/appliances.md`).
const EXIT_BOOT_SERVICES_MARKER: &str = "\\EFI\\thinhv\\exit-boot-services";

/// Leaves boot services and waits with interrupts off. It writes nothing
/// after that: the appliance's processor starts at once and thinhv logs
/// it to COM1, and two writers on one UART garble each other's lines
/// (seen in Bochs 3.0); thinhv's claim line shows that boot services were
/// left.
fn exit_boot_services_and_wait() -> ! {
    // SAFETY: nothing of boot services is used after this (the wait is
    // HLT).
    let _map = unsafe { uefi::boot::exit_boot_services(None) };
    loop {
        // SAFETY: CLI and HLT only stop this processor.
        unsafe { core::arch::asm!("cli; hlt", options(nomem, nostack)) };
    }
}

#[uefi::entry]
fn main() -> uefi::Status {
    if uefi::helpers::init().is_err() {
        return uefi::Status::ABORTED;
    }
    if arm_then_start_thinhv() {
        println!("thinhv returned to the probe");
        return uefi::Status::ABORTED;
    }
    println!("THINHV-PROBE-BEGIN");
    run();
    println!("THINHV-PROBE-END");
    uefi::boot::stall(core::time::Duration::from_millis(200));
    if crate::attacks_hc::esp_has(EXIT_BOOT_SERVICES_MARKER) {
        exit_boot_services_and_wait();
    }
    uefi::runtime::reset(
        uefi::runtime::ResetType::SHUTDOWN,
        uefi::Status::SUCCESS,
        None,
    )
}
