//! `thinhv selftest`: what a root process in the guest can check about
//! thinhv's protection. Prints `key=value` lines (read by the integration
//! tests, which decide pass or fail) and a summary.
use crate::NOT_PRESENT;
use crate::cpuid::{cpuid, presence, vendor};
use crate::devmem;
use crate::report::read_page;
use std::process::ExitCode;
use thinhv_abi::cpuid::LEAF_INTEGRITY;
use thinhv_abi::hypercall::{Function, Status};

/// A hypercall from user mode (CPL 3). thinhv must refuse it with
/// `NOT_PERMITTED`; RAX comes back with the status.
fn user_mode_hypercall() -> u64 {
    let intel = &vendor() == b"GenuineIntel";
    let mut rax = Function::VERSION.0;
    // SAFETY: only called when thinhv's signature is present, so the
    // instruction exits to the hypervisor instead of raising #UD; it
    // changes no memory. RBX is preserved around it (LLVM reserves RBX).
    unsafe {
        if intel {
            core::arch::asm!("xchg {t}, rbx", "vmcall", "xchg {t}, rbx", t = inout(reg) 0u64 => _,
                inout("rax") rax, inout("rcx") 0u64 => _, inout("rdx") 0u64 => _);
        } else {
            core::arch::asm!("xchg {t}, rbx", "vmmcall", "xchg {t}, rbx", t = inout(reg) 0u64 => _,
                inout("rax") rax, inout("rcx") 0u64 => _, inout("rdx") 0u64 => _);
        }
    }
    rax
}

/// Runs the checks.
pub fn run() -> ExitCode {
    let p = presence();
    println!("signature={}", String::from_utf8_lossy(&p.signature));
    println!("hypervisor_bit={}", u8::from(p.hypervisor_bit));
    if !p.is_thinhv() {
        println!("thinhv: not running; nothing to test");
        return ExitCode::from(NOT_PRESENT);
    }
    println!("cpus_virtualized={}", p.cpus_virtualized);
    println!("cpus_expected={}", p.cpus_expected);
    let mut failures = 0;

    let rax = user_mode_hypercall();
    println!("user_hypercall_status={rax}");
    if Status(rax) != Status::NOT_PERMITTED {
        println!(
            "FAIL: a hypercall from user mode returned {rax}, expected {}",
            Status::NOT_PERMITTED.0
        );
        failures += 1;
    }

    let page = match read_page(&p) {
        Ok(pg) => pg,
        Err(e) => {
            println!("FAIL: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (base, size) = (page.header.protected_base, page.header.protected_size);
    println!("protected_base={base:#x}");
    println!("protected_size={size}");
    let blocked_before = page.header.blocked_writes;

    // Reads: the whole region, through /dev/mem.
    match devmem::read(base, usize::try_from(size).unwrap_or(0)) {
        Ok(bytes) => {
            let nonzero = bytes.iter().filter(|&&b| b != 0).count();
            println!("protected_read_bytes={}", bytes.len());
            println!("protected_read_nonzero={nonzero}");
            if nonzero != 0 {
                println!("FAIL: {nonzero} bytes of the protected region were readable");
                failures += 1;
            }
        }
        Err(e) => {
            println!("protected_read_error={e}");
            failures += 1;
        }
    }

    // Writes: a pattern at the start, the middle and the last page.
    let pattern = vec![0xa5u8; 4096];
    let targets = [base, base + ((size / 2) & !0xfff), base + size - 4096];
    for (i, &t) in targets.iter().enumerate() {
        match devmem::write(t, &pattern) {
            Ok(n) => println!("protected_write{i}_returned={n}"),
            Err(e) => println!(
                "protected_write{i}_error={}",
                e.raw_os_error().unwrap_or(-1)
            ),
        }
        let back = devmem::read(t, 4096).unwrap_or_default();
        let seen = back.iter().filter(|b| **b == 0xa5).count();
        println!("protected_write{i}_visible={seen}");
        if seen != 0 {
            println!("FAIL: a write to the protected region at {t:#x} became visible");
            failures += 1;
        }
    }
    // Writes to the status page are refused too.
    let _ = devmem::write(p.status_page + 0x1000, &pattern);
    let after = read_page(&p).map_or(blocked_before, |pg| pg.header.blocked_writes);
    println!(
        "blocked_writes_delta={}",
        after.saturating_sub(blocked_before)
    );

    let integ = cpuid(LEAF_INTEGRITY, 0);
    println!("integrity_expected_crc={:#010x}", integ[0]);
    println!("integrity_current_crc={:#010x}", integ[1]);
    println!("integrity_canary_ok={}", integ[2]);
    if integ[0] != integ[1] || integ[2] != 1 {
        println!("FAIL: the hypervisor's integrity check failed");
        failures += 1;
    }
    println!("selftest_failures={failures}");
    if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
