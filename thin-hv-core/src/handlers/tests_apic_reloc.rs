//! The local APIC relocated with IA32_APIC_BASE, on the fakes (issue 11,
//! item 1 and the relocation difference): the guest's APIC answers at the
//! new base, its ICR stays filtered there, other CPUs see plain memory at
//! that page, the hardware's base never moves, and moving back restores
//! the second-level tables. The fake's MSRs are one set for all CPUs (one
//! IA32_APIC_BASE: every CPU in the same mode); `slat_holes` are the pages
//! out of the fake's second-level tables.
use super::fake::*;
use super::*;
use crate::guest::Gpr;
use crate::handlers::msr_policy::{self, Rule};
use core::sync::atomic::Ordering;
use thinhv_abi::hypercall::{VENDOR_AMD_SVM, VENDOR_INTEL_VMX};

const RIP: u64 = 0x30_0000;
const WRMSR: &[u8] = &[0x0f, 0x30];
const RDMSR: &[u8] = &[0x0f, 0x32];
/// Where the guest moves its APIC: MMIO space nothing else uses here.
const X: u64 = 0xfec8_0000;
/// IA32_APIC_BASE: enabled, BSP.
const FLAGS: u64 = 0x900;
/// `mov eax, [rdx]`
const LOAD32: &[u8] = &[0x8b, 0x02];
/// `movzx eax, byte [rdx]`
const LOAD8: &[u8] = &[0x0f, 0xb6, 0x02];
/// `mov [rdx], eax`
const STORE32: &[u8] = &[0x89, 0x02];
/// `mov [rdx], ax`
const STORE16: &[u8] = &[0x66, 0x89, 0x02];

const ID: u32 = 0x20;
const VERSION: u32 = 0x30;
const TPR: u32 = 0x80;
const ICR_LOW: u32 = 0x300;
const ICR_HIGH: u32 = 0x310;

fn at(env: &mut FakeEnv, code: &[u8]) -> FakeCpu {
    env.put(RIP, code);
    FakeCpu {
        rip: RIP,
        ..Default::default()
    }
}

/// Four CPUs in xAPIC mode at 0xFEE00000; the APIC holds an ID, a version
/// and a TPR.
fn machine() -> FakeEnv {
    let mut env = FakeEnv::new();
    env.msrs.insert(0x1b, APIC | FLAGS);
    env.apic.insert(ID, 0x0300_0000);
    env.apic.insert(VERSION, 0x0005_0014);
    env.apic.insert(TPR, 0);
    env
}

/// WRMSR IA32_APIC_BASE = `value` on CPU `on`: (#GP raised, outcome).
fn set_base(env: &mut FakeEnv, on: usize, value: u64) -> (bool, Outcome) {
    env.cpu = on;
    let mut cpu = at(env, WRMSR);
    cpu.regs[Gpr::Rcx as usize] = 0x1b;
    let h = handle(&Exit::MsrWrite { msr: 0x1b, value }, &mut cpu, env);
    let gp = cpu.exceptions == vec![(13, Some(0))];
    assert_eq!(cpu.rip, if gp { RIP } else { RIP + 2 });
    (gp, h.outcome)
}

/// RDMSR IA32_APIC_BASE on CPU `on`.
fn get_base(env: &mut FakeEnv, on: usize) -> u64 {
    env.cpu = on;
    let mut cpu = at(env, RDMSR);
    handle(&Exit::MsrRead { msr: 0x1b }, &mut cpu, env);
    assert!(cpu.exceptions.is_empty());
    (cpu.regs[Gpr::Rdx as usize] << 32) | (cpu.regs[Gpr::Rax as usize] & 0xffff_ffff)
}

/// A load or store (`code`, address in RDX, value in RAX) at `gpa` on CPU
/// `on` that faulted on a not-present page; the CPU after it.
fn touch(env: &mut FakeEnv, on: usize, gpa: u64, code: &[u8], rax: u64) -> (FakeCpu, Handled) {
    env.cpu = on;
    let mut cpu = at(env, code);
    cpu.regs[Gpr::Rax as usize] = rax;
    cpu.regs[Gpr::Rdx as usize] = gpa;
    let write = code == STORE32 || code == STORE16;
    let exit = Exit::NestedFault {
        gpa,
        write,
        fetch: false,
        present: false,
        guest_table_walk: false,
    };
    let h = handle(&exit, &mut cpu, env);
    (cpu, h)
}

fn read32(env: &mut FakeEnv, on: usize, gpa: u64) -> u32 {
    let (cpu, h) = touch(env, on, gpa, LOAD32, 0xdead_beef_dead_beef);
    assert_eq!(h.reason, thinhv_abi::exit::ExitReason::APIC_ACCESS);
    assert!(cpu.exceptions.is_empty(), "{:?}", cpu.exceptions);
    assert_eq!(cpu.rip, RIP + 2, "the load is completed");
    let rax = cpu.regs[Gpr::Rax as usize];
    assert_eq!(rax >> 32, 0, "a 32-bit load zero-extends");
    rax as u32
}

fn write32(env: &mut FakeEnv, on: usize, gpa: u64, value: u32) -> Outcome {
    let (cpu, h) = touch(env, on, gpa, STORE32, u64::from(value));
    assert_eq!(h.reason, thinhv_abi::exit::ExitReason::APIC_ACCESS);
    assert!(cpu.exceptions.is_empty(), "{:?}", cpu.exceptions);
    assert_eq!(cpu.rip, RIP + 2, "the store is completed");
    h.outcome
}

fn holes(env: &FakeEnv) -> Vec<u64> {
    env.slat_holes.iter().copied().collect()
}

fn vbase(env: &FakeEnv, cpu: usize) -> u64 {
    env.hv.cpus()[cpu].apic_vbase.load(Ordering::SeqCst)
}

/// No ICR write with delivery mode INIT or STARTUP reached the APIC.
fn no_real_init_sipi(env: &FakeEnv) -> bool {
    env.apic_writes
        .iter()
        .all(|&(o, v)| o != ICR_LOW || !matches!((v >> 8) & 7, 5 | 6))
}

#[test]
fn apic_base_reads_and_writes_exit_on_both_backends() {
    for vendor in [VENDOR_AMD_SVM, VENDOR_INTEL_VMX] {
        assert!(
            msr_policy::intercepts(vendor, true).any(|(m, r, w)| m == 0x1b && r && w),
            "vendor {vendor}"
        );
        assert_eq!(
            msr_policy::lookup(vendor, 0x1b),
            (Rule::ApicBase, Rule::ApicBase)
        );
    }
}

#[test]
fn the_relocated_apic_answers_at_the_new_base() {
    let mut env = machine();
    assert_eq!(get_base(&mut env, 0), APIC | FLAGS, "nothing moved yet");
    let (gp, outcome) = set_base(&mut env, 0, X | FLAGS);
    assert!(!gp);
    assert_eq!(
        outcome,
        Outcome::ResumeFlushTlb,
        "this CPU drops its cached translations"
    );
    // The hardware's base never moves; the guest reads its own back.
    assert!(env.msr_writes.is_empty(), "{:x?}", env.msr_writes);
    assert_eq!(env.msrs[&0x1b], APIC | FLAGS);
    assert_eq!(get_base(&mut env, 0), X | FLAGS);
    assert_eq!(get_base(&mut env, 1), APIC | FLAGS, "CPU 1 did not move");
    // The new page and the real one are out of the tables.
    assert_eq!(holes(&env), vec![X, APIC]);
    // ID, version, TPR through the new base.
    assert_eq!(read32(&mut env, 0, X + 0x20), 0x0300_0000);
    assert_eq!(read32(&mut env, 0, X + 0x30), 0x0005_0014);
    let (cpu, _) = touch(&mut env, 0, X + 0x30, LOAD8, u64::MAX);
    assert_eq!(cpu.regs[Gpr::Rax as usize], 0x14, "a byte of the version");
    assert_eq!(cpu.rip, RIP + 3);
    assert_eq!(write32(&mut env, 0, X + 0x80, 0x20), Outcome::Resume);
    assert_eq!(env.apic_writes, vec![(TPR, 0x20)], "the real TPR");
    assert_eq!(read32(&mut env, 0, X + 0x80), 0x20);
    // Nothing of the relocation reached physical memory at X.
    assert!(env.mmio_log.borrow().is_empty());
}

#[test]
fn an_icr_init_through_the_new_base_is_a_virtual_init() {
    let mut env = machine();
    assert!(!set_base(&mut env, 0, X | FLAGS).0);
    // INIT to CPU 2 written at the new base: a mailbox post and a wake-up,
    // never a real INIT.
    write32(&mut env, 0, X + 0x310, 2 << 24);
    assert_eq!(env.apic[&ICR_HIGH], 2 << 24);
    assert_eq!(write32(&mut env, 0, X + 0x300, 0xc500), Outcome::Resume);
    assert!(env.hv.cpus()[2].mailbox.init_pending());
    assert_eq!(env.nmis_sent, vec![2]);
    write32(&mut env, 0, X + 0x300, 0x0699);
    assert_eq!(env.hv.cpus()[2].mailbox.take_sipi(), Some(0x99));
    assert!(no_real_init_sipi(&env), "{:x?}", env.apic_writes);
    // INIT to itself: the CPU waits for its SIPI (thinhv's INIT state).
    write32(&mut env, 0, X + 0x310, 0);
    assert_eq!(
        write32(&mut env, 0, X + 0x300, 0x4500),
        Outcome::WaitForSipi
    );
    // Any other IPI is forwarded as written.
    write32(&mut env, 0, X + 0x310, 3 << 24);
    env.apic_writes.clear();
    write32(&mut env, 0, X + 0x300, 0x40ec);
    assert_eq!(
        env.apic_writes,
        vec![(ICR_HIGH, 3 << 24), (ICR_LOW, 0x40ec)]
    );
}

#[test]
fn other_cpus_see_plain_memory_at_the_new_base() {
    let mut env = machine();
    assert!(!set_base(&mut env, 0, X | FLAGS).0);
    env.mmio_write(X + 0x20, 4, 0x1234_5678);
    env.mmio_log.borrow_mut().clear();
    // CPU 1's APIC is still at 0xFEE00000: X is what the bus has there,
    // with the guest's width.
    assert_eq!(read32(&mut env, 1, X + 0x20), 0x1234_5678);
    let (cpu, h) = touch(&mut env, 1, X + 0x22, STORE16, 0xabcd);
    assert_eq!(h.reason, thinhv_abi::exit::ExitReason::APIC_ACCESS);
    assert_eq!(cpu.rip, RIP + 3);
    assert_eq!(
        *env.mmio_log.borrow(),
        vec![('r', X + 0x20, 4, 0x1234_5678), ('w', X + 0x22, 2, 0xabcd)]
    );
    assert!(env.apic_writes.is_empty(), "CPU 1's APIC untouched");
    // The real page, out of the tables now, is still CPU 1's own APIC.
    assert_eq!(read32(&mut env, 1, APIC + 0x20), 0x0300_0000);
    write32(&mut env, 1, APIC + 0x80, 0x10);
    assert_eq!(env.apic_writes, vec![(TPR, 0x10)]);
    // CPU 0 moved away: nothing of its APIC answers at the real page any
    // more (all ones, writes dropped), and nothing reaches the hardware.
    env.apic_writes.clear();
    assert_eq!(read32(&mut env, 0, APIC + 0x20), u32::MAX);
    write32(&mut env, 0, APIC + 0x300, 0xc501);
    assert!(env.apic_writes.is_empty());
    assert!(env.nmis_sent.is_empty());
    assert_eq!(
        env.mmio_log.borrow().len(),
        2,
        "no access of CPU 0 at the real page"
    );
}

#[test]
fn moving_back_restores_the_tables() {
    let mut env = machine();
    assert!(!set_base(&mut env, 0, X | FLAGS).0);
    // CPU 1 moves to the same page: each sees its own APIC there.
    assert!(!set_base(&mut env, 1, X | 0x800).0);
    assert_eq!(holes(&env), vec![X, APIC]);
    assert_eq!(env.apic_traps, vec![(X, true), (APIC, true)]);
    // CPU 0 moves back: X stays out for CPU 1, and so does the real page.
    let (gp, outcome) = set_base(&mut env, 0, APIC | FLAGS);
    assert!(!gp);
    assert_eq!(outcome, Outcome::ResumeFlushTlb);
    assert_eq!(holes(&env), vec![X, APIC]);
    assert_eq!(
        read32(&mut env, 0, APIC + 0x20),
        0x0300_0000,
        "its APIC again"
    );
    // CPU 1 moves back: everything as at start.
    assert!(!set_base(&mut env, 1, APIC | 0x800).0);
    assert!(holes(&env).is_empty());
    assert_eq!(
        env.apic_traps[2..],
        [(APIC, false), (X, false)],
        "the real page first, then X"
    );
    assert_eq!(env.hv.apic_reloc.trapped(), 0);
    assert_eq!(get_base(&mut env, 0), APIC | FLAGS);
    assert!(env.msr_writes.is_empty());
    // A fault at X now is not the relocation's: the first-touch path
    // (which finds it mapped and retries).
    let (_, h) = touch(&mut env, 0, X + 0x20, LOAD32, 0);
    assert_eq!(h.reason, thinhv_abi::exit::ExitReason::NESTED_FAULT);
    assert_eq!(env.demand_calls, vec![X + 0x20]);
}

#[test]
fn invalid_writes_still_raise_gp_and_change_nothing() {
    let mut env = machine();
    assert!(!set_base(&mut env, 0, X | FLAGS).0);
    let traps = env.apic_traps.len();
    for (value, why) in [
        (X | FLAGS | 1 << 9, "reserved bit 9"),
        (X | FLAGS | 1, "reserved bit 0"),
        ((1 << 40) | FLAGS, "a base above MAXPHYADDR"),
        (0xfed0_0000 | 0x500, "EXTD without EN"),
    ] {
        let (gp, _) = set_base(&mut env, 0, value);
        assert!(gp, "{why}");
        assert_eq!(vbase(&env, 0), X, "{why}");
    }
    // x2APIC, then straight back to xAPIC: invalid as on hardware.
    assert!(!set_base(&mut env, 0, X | 0xd00).0);
    assert_eq!(env.msr_writes, vec![(0x1b, APIC | 0xd00)]);
    assert!(set_base(&mut env, 0, X | FLAGS).0, "x2APIC → xAPIC");
    assert_eq!(env.msrs[&0x1b], APIC | 0xd00);
    assert_eq!(env.apic_traps.len(), traps, "the tables untouched");
}

#[test]
fn pages_thinhv_cannot_emulate_are_refused_with_nothing_changed() {
    let mut env = machine();
    for page in [0x10_0000, PROTECTED.base, STATUS.base, 0x1_8000_0000] {
        let (gp, _) = set_base(&mut env, 0, page | FLAGS);
        assert!(gp, "{page:#x}");
        assert_eq!(vbase(&env, 0), APIC);
    }
    // An I/O APIC's registers thinhv judges: moving back would map them
    // to the OS.
    env.hv
        .ioapics
        .lock()
        .push(super::ioapic::IoApicGuard::new(FAKE_IOAPIC, None));
    let (gp, _) = set_base(&mut env, 0, FAKE_IOAPIC | FLAGS);
    assert!(gp);
    assert_eq!(vbase(&env, 0), APIC);
    // The HPET whose FSB delivery thinhv withholds: its stores would pass
    // unfiltered, and moving back would map it writable. (The control:
    // the same page before the loader names it moves.)
    let hpet = 0xfed0_0000;
    let (gp, _) = set_base(&mut env, 1, hpet | FLAGS);
    assert!(!gp);
    assert_eq!(vbase(&env, 1), hpet);
    assert!(!set_base(&mut env, 1, APIC | FLAGS).0);
    assert_eq!(vbase(&env, 1), APIC);
    env.hv.hpet = hpet;
    let (gp, _) = set_base(&mut env, 0, hpet | FLAGS);
    assert!(gp);
    assert_eq!(vbase(&env, 0), APIC);
    // The core cannot take the page out of its tables.
    env.apic_trap_ok = false;
    assert!(set_base(&mut env, 0, X | FLAGS).0);
    assert_eq!(vbase(&env, 0), APIC);
    assert!(holes(&env).is_empty());
    assert_eq!(env.hv.apic_reloc.trapped(), 0);
    assert!(env.msr_writes.is_empty());
}

#[test]
fn x2apic_mode_follows_the_guest_while_relocated() {
    let mut env = machine();
    assert!(!set_base(&mut env, 0, X | FLAGS).0);
    // x2APIC on: the mode reaches the processor at its own base; the ICR
    // MSR stays intercepted and virtualized.
    assert!(!set_base(&mut env, 0, X | 0xd00).0);
    assert_eq!(env.msrs[&0x1b], APIC | 0xd00);
    assert_eq!(get_base(&mut env, 0), X | 0xd00);
    assert_eq!(msr_policy::lookup(env.hv.vendor, 0x830).1, Rule::X2apicIcr);
    let mut cpu = at(&mut env, WRMSR);
    handle(
        &Exit::MsrWrite {
            msr: 0x830,
            value: (3 << 32) | 0x4500,
        },
        &mut cpu,
        &mut env,
    );
    assert!(env.hv.cpus()[3].mailbox.take_init());
    assert!(env.x2apic_writes.is_empty());
    // In x2APIC mode the MMIO page is not the APIC (SDM Vol. 3A §12.12.1):
    // X is plain memory for this CPU too.
    env.mmio_write(X + 0x20, 4, 0x77);
    assert_eq!(read32(&mut env, 0, X + 0x20), 0x77);
    // Disabled, then xAPIC again: the registers are back at X.
    assert!(!set_base(&mut env, 0, X | 0x100).0);
    assert!(!set_base(&mut env, 0, X | FLAGS).0);
    assert_eq!(env.msrs[&0x1b], APIC | FLAGS);
    assert_eq!(read32(&mut env, 0, X + 0x20), 0x0300_0000);
}

#[test]
fn with_the_vmx_activity_state_icr_writes_at_the_new_base_reach_the_apic() {
    // `init_sipi = "activity"`: INIT and SIPI go to the processor (INIT
    // always exits on VMX), so the relocated ICR acts as the real one.
    let mut env = machine();
    env.hv.vendor = VENDOR_INTEL_VMX;
    env.hv.config.init_sipi = thinhv_abi::handoff::INIT_SIPI_ACTIVITY;
    assert!(!set_base(&mut env, 0, X | FLAGS).0);
    write32(&mut env, 0, X + 0x310, 2 << 24);
    write32(&mut env, 0, X + 0x300, 0xc500);
    assert_eq!(
        env.apic_writes,
        vec![(ICR_HIGH, 2 << 24), (ICR_LOW, 0xc500)]
    );
    assert!(env.nmis_sent.is_empty());
}
