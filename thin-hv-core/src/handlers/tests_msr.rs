//! Handler tests for the MSR policy, INVD and the CPUID bits that follow
//! the guest (issue 11, items 3, 4 and 8, and the OSXSAVE difference).
use super::fake::*;
use super::*;
use crate::guest::Gpr;
use thinhv_abi::hypercall::VENDOR_INTEL_VMX;

const RIP: u64 = 0x20_0000;
const WRMSR: &[u8] = &[0x0f, 0x30];
const RDMSR: &[u8] = &[0x0f, 0x32];

fn at(env: &mut FakeEnv, code: &[u8]) -> FakeCpu {
    env.put(RIP, code);
    FakeCpu {
        rip: RIP,
        ..Default::default()
    }
}

/// WRMSR `msr` = `value` on a fresh CPU; returns it after the exit.
pub(super) fn wrmsr(env: &mut FakeEnv, msr: u32, value: u64) -> FakeCpu {
    let mut cpu = at(env, WRMSR);
    cpu.regs[Gpr::Rcx as usize] = u64::from(msr);
    handle(&Exit::MsrWrite { msr, value }, &mut cpu, env);
    cpu
}

fn rdmsr(env: &mut FakeEnv, msr: u32) -> (FakeCpu, u64) {
    let mut cpu = at(env, RDMSR);
    handle(&Exit::MsrRead { msr }, &mut cpu, env);
    let v = (cpu.regs[Gpr::Rdx as usize] << 32) | (cpu.regs[Gpr::Rax as usize] & 0xffff_ffff);
    (cpu, v)
}

fn gp(cpu: &FakeCpu) -> bool {
    cpu.exceptions == vec![(13, Some(0))] && cpu.rip == RIP
}

fn done(cpu: &FakeCpu) -> bool {
    cpu.exceptions.is_empty() && cpu.rip == RIP + 2
}

/// A fake processor with 8 variable MTRRs, fixed ranges and WC, and the
/// firmware's values in them.
fn with_mtrrs(env: &mut FakeEnv) {
    env.msrs.insert(0xfe, 0x508);
    env.msrs.insert(0x2ff, 0xc00);
    for (i, m) in msr_policy::MTRR_FIXED.iter().enumerate() {
        env.msrs.insert(*m, 0x0606_0606_0606_0606 + i as u64);
    }
    for m in 0x200..0x210 {
        env.msrs.insert(m, 0);
    }
    env.msrs.insert(0x200, 0x8000_0000);
    env.msrs.insert(0x201, 0xff_8000_0800);
}

#[test]
fn mtrr_writes_are_emulated_and_never_reach_the_hardware() {
    let mut env = FakeEnv::new();
    with_mtrrs(&mut env);
    // Reads start from the hardware's values.
    assert_eq!(rdmsr(&mut env, 0x201).1, 0xff_8000_0800);
    assert_eq!(rdmsr(&mut env, 0x2ff).1, 0xc00);
    // A valid write is seen by the guest and not by the processor.
    assert!(done(&wrmsr(&mut env, 0x2ff, 0x006)));
    assert!(done(&wrmsr(&mut env, 0x202, 0x1_0000_0006)));
    assert_eq!(rdmsr(&mut env, 0x2ff).1, 0x006);
    assert_eq!(rdmsr(&mut env, 0x202).1, 0x1_0000_0006);
    assert_eq!(env.msrs[&0x2ff], 0xc00, "hardware MTRRs unchanged");
    assert!(env.msr_writes.is_empty());
    // Invalid values raise #GP and change nothing.
    assert!(gp(&wrmsr(&mut env, 0x2ff, 0x002)), "type 2");
    assert!(gp(&wrmsr(&mut env, 0x2ff, 0x1006)), "reserved bit 12");
    assert!(gp(&wrmsr(&mut env, 0x203, 0x801)), "mask bit 0");
    assert!(gp(&wrmsr(&mut env, 0x250, 0x0606_0606_0606_0603)));
    assert_eq!(rdmsr(&mut env, 0x2ff).1, 0x006);
    // Pairs beyond MTRRCAP.VCNT do not exist.
    assert!(gp(&rdmsr(&mut env, 0x210).0));
    assert!(gp(&wrmsr(&mut env, 0x211, 0x800)));
    // Each CPU has its own MTRRs.
    env.cpu = 1;
    assert_eq!(rdmsr(&mut env, 0x2ff).1, 0xc00);
}

#[test]
fn pat_writes_with_reserved_types_raise_gp() {
    let mut env = FakeEnv::new();
    let cpu = wrmsr(&mut env, 0x277, 0x0007_0406_0007_0406);
    assert!(done(&cpu));
    assert_eq!(cpu.pat, Some(0x0007_0406_0007_0406));
    let cpu = wrmsr(&mut env, 0x277, 0x0007_0406_0007_0402);
    assert!(gp(&cpu));
    assert_eq!(cpu.pat, None, "G_PAT never gets a reserved type");
}

#[test]
fn efer_reserved_and_unsupported_bits_raise_gp() {
    let mut env = FakeEnv::new();
    // The fake processor: SYSCALL, NX, LM, FFXSR (0x2fd3_fbff).
    let ok = |v: u64| {
        let mut env = FakeEnv::new();
        let mut cpu = at(&mut env, WRMSR);
        cpu.efer = 0x500;
        handle(
            &Exit::MsrWrite {
                msr: 0xc000_0080,
                value: v,
            },
            &mut cpu,
            &mut env,
        );
        (done(&cpu), cpu.efer)
    };
    assert_eq!(ok(0xd01), (true, 0xd01), "SCE|LME|LMA|NXE");
    for bad in [1 << 12, 1 << 13, 1 << 15, 1 << 2, 1 << 9, 1 << 21, 1 << 40] {
        assert!(!ok(0xd01 | bad).0, "{bad:#x}");
    }
    // EFER reads hide SVME.
    let mut cpu = at(&mut env, RDMSR);
    cpu.efer = 0x1d01;
    handle(&Exit::MsrRead { msr: 0xc000_0080 }, &mut cpu, &mut env);
    assert_eq!(cpu.regs[Gpr::Rax as usize], 0xd01);
}

#[test]
fn hwcr_syscfg_and_memory_decoding_msrs_are_guarded() {
    let mut env = FakeEnv::new();
    let hwcr = 0xc001_0015;
    env.msrs.insert(hwcr, 0x0100_0010);
    // Clearing INVDWBINVD (bit 4) would make INVD a true INVD.
    assert!(gp(&wrmsr(&mut env, hwcr, 0x0100_0000)));
    // IRPerfEn may change, and reaches the processor.
    assert!(done(&wrmsr(&mut env, hwcr, 0x4100_0010)));
    assert_eq!(env.msr_writes, vec![(hwcr, 0x4100_0010)]);
    // SYSCFG: only clearing MtrrFixDramModEn.
    let syscfg = 0xc001_0010;
    env.msrs.insert(syscfg, 0x000e_0600);
    assert!(done(&wrmsr(&mut env, syscfg, 0x0006_0600)));
    assert!(gp(&wrmsr(&mut env, syscfg, 0x0086_0600)), "SMEE");
    // TOP_MEM, TOP_MEM2, IORRs, the ECAM base: same value only.
    for m in [
        0xc001_001a,
        0xc001_001d,
        0xc001_0016,
        0xc001_0019,
        0xc001_0058,
    ] {
        env.msrs.insert(m, 0x8000_0000);
        assert!(done(&wrmsr(&mut env, m, 0x8000_0000)), "{m:#x} rewrite");
        assert!(gp(&wrmsr(&mut env, m, 0x4000_0000)), "{m:#x} change");
    }
    assert_eq!(env.msr_writes.len(), 2);
    // SVM's own MSRs stay absent.
    assert!(gp(&wrmsr(&mut env, 0xc001_0117, 0x1000)));
    assert!(gp(&rdmsr(&mut env, 0xc001_0114).0));
    // An MSR that exits without a rule: #GP.
    assert!(gp(&wrmsr(&mut env, 0x4000_0000, 1)));
}

#[test]
fn apic_base_relocation_is_emulated_and_mode_changes_forwarded() {
    let mut env = FakeEnv::new();
    env.msrs.insert(0x1b, 0xfee0_0900);
    // Relocation: emulated, the hardware's base kept where the ICR trap is
    // (`tests_apic_reloc`); then back.
    assert!(done(&wrmsr(&mut env, 0x1b, 0xfed0_0900)));
    assert!(done(&wrmsr(&mut env, 0x1b, 0xfee0_0900)));
    assert!(env.msr_writes.is_empty());
    // Reserved bit, and EXTD without x2APIC in CPUID (the fake has it: bit 21).
    assert!(gp(&wrmsr(&mut env, 0x1b, 0xfee0_0901)));
    // xAPIC → x2APIC: forwarded.
    assert!(done(&wrmsr(&mut env, 0x1b, 0xfee0_0d00)));
    assert_eq!(env.msr_writes, vec![(0x1b, 0xfee0_0d00)]);
    // x2APIC → xAPIC directly: #GP as on hardware.
    assert!(gp(&wrmsr(&mut env, 0x1b, 0xfee0_0900)));
}

#[test]
fn vmx_keeps_its_own_msr_rules() {
    let mut env = FakeEnv::new();
    env.hv.vendor = VENDOR_INTEL_VMX;
    // The VMX capability MSRs are absent, FEATURE_CONTROL locked.
    assert!(gp(&rdmsr(&mut env, 0x480).0));
    assert!(gp(&wrmsr(&mut env, 0x3a, 0x5)));
    // AMD's MSRs exit on VMX (outside the bitmap) and are absent.
    assert!(gp(&wrmsr(&mut env, 0xc001_0015, 0)));
    assert!(gp(&rdmsr(&mut env, 0xc001_0010).0));
    // MTRRs are emulated there too.
    with_mtrrs(&mut env);
    assert!(done(&wrmsr(&mut env, 0x2ff, 0x806)));
    assert_eq!(env.msrs[&0x2ff], 0xc00);
}

#[test]
fn invd_is_done_as_wbinvd_on_svm_too() {
    // The SVM decoder turns exit code 0x76 into Exit::Invd (it was Other,
    // and fatal, before INVD was intercepted).
    let exit = crate::svm::exit_code::decode(0x76, 0, 0, 0, 0, 0);
    let mut env = FakeEnv::new();
    let mut cpu = at(&mut env, &[0x0f, 0x08]);
    let h = handle(&exit, &mut cpu, &mut env);
    assert_eq!(h.outcome, Outcome::Resume);
    assert_eq!((env.wbinvds, cpu.rip), (1, RIP + 2));
}

#[test]
fn cpuid_follows_the_guests_cr4_and_hides_smx() {
    use super::cpuid::follow_guest_cr4;
    let mut env = FakeEnv::new();
    let leaf1 = |env: &mut FakeEnv, cr4: u64| {
        let mut cpu = at(env, &[0x0f, 0xa2]);
        cpu.regs[Gpr::Rax as usize] = 1;
        cpu.paging.cr4 = cr4;
        handle(&Exit::Cpuid, &mut cpu, env);
        cpu.regs[Gpr::Rcx as usize] as u32
    };
    // The fake processor (host) reports OSXSAVE set; the guest has not set
    // CR4.OSXSAVE yet.
    assert_eq!(leaf1(&mut env, 0x20) & (1 << 27), 0);
    assert_ne!(leaf1(&mut env, 0x20 | 1 << 18) & (1 << 27), 0);
    // OSPKE follows CR4.PKE where the processor has PKU (leaf 7 ECX bit 3).
    let pku = [0, 0, 1 << 3, 0];
    assert_eq!(follow_guest_cr4(7, 0, pku, 0)[2], 1 << 3);
    assert_eq!(follow_guest_cr4(7, 0, pku, 1 << 22)[2], (1 << 3) | (1 << 4));
    assert_eq!(follow_guest_cr4(7, 0, [0, 0, 1 << 4, 0], 1 << 22)[2], 0);
    // SMX hidden (leaf 1 ECX bit 6), TCE hidden (0x8000_0001 ECX bit 17).
    let raw = [0, 0, 1 << 6, 0];
    let info = HvInfo::default();
    assert_eq!(filter_cpuid(1, 0, raw, &info)[2] & (1 << 6), 0);
    assert_eq!(
        filter_cpuid(0x8000_0001, 0, [0, 0, 1 << 17, 0], &info)[2],
        0
    );
}

#[test]
fn exit_cost_reports_a_cpus_handler_time() {
    use thinhv_abi::hypercall::{Function, Status};
    let mut env = FakeEnv::new();
    env.hv.cpus()[1].add_exit_cost(300);
    env.hv.cpus()[1].add_exit_cost(500);
    let call = |env: &mut FakeEnv, index: u64| {
        let mut cpu = at(env, &[0x0f, 0x01, 0xd9]);
        cpu.regs[Gpr::Rax as usize] = Function::EXIT_COST.0;
        cpu.regs[Gpr::Rdx as usize] = index;
        handle(&Exit::Hypercall, &mut cpu, env);
        (
            cpu.regs[Gpr::Rax as usize],
            cpu.regs[Gpr::Rbx as usize],
            cpu.regs[Gpr::Rcx as usize],
        )
    };
    assert_eq!(call(&mut env, 1), (Status::OK.0, 800, 2));
    assert_eq!(call(&mut env, 0), (Status::OK.0, 0, 0));
    assert_eq!(call(&mut env, 9).0, Status::INVALID_ARGUMENT.0);
}
