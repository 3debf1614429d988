use super::fake::*;
use super::*;
use crate::guest::Gpr;
use crate::guest::PagingRegs;
use crate::guest_mem::translate;
use thinhv_abi::hypercall::{Function, Status, StatusReport};
use thinhv_abi::status::CpuState;
use zerocopy::FromBytes;

pub(super) const RIP: u64 = 0x10_0000;

/// A CPU at CPL 0 in 64-bit mode without paging, with `code` at RIP.
pub(super) fn at(env: &mut FakeEnv, code: &[u8]) -> FakeCpu {
    env.put(RIP, code);
    FakeCpu {
        rip: RIP,
        ..Default::default()
    }
}

const CPUID: &[u8] = &[0x0f, 0xa2];
const VMMCALL: &[u8] = &[0x0f, 0x01, 0xd9];
const WRMSR: &[u8] = &[0x0f, 0x30];
const RDMSR: &[u8] = &[0x0f, 0x32];

#[test]
fn cpuid_announces_thinhv_and_hides_virtualization() {
    let mut env = FakeEnv::new();
    let mut cpu = at(&mut env, CPUID);
    cpu.regs[Gpr::Rax as usize] = 1;
    let h = handle(&Exit::Cpuid, &mut cpu, &mut env);
    assert_eq!(h.outcome, Outcome::Resume);
    assert_eq!(cpu.rip, RIP + 2, "RIP advanced by decoding");
    let ecx = cpu.regs[Gpr::Rcx as usize] as u32;
    assert_ne!(ecx & (1 << 31), 0, "hypervisor bit");
    assert_eq!(ecx & (1 << 5), 0, "VMX hidden");

    let mut cpu = at(&mut env, CPUID);
    cpu.regs[Gpr::Rax as usize] = 0x4000_0000;
    handle(&Exit::Cpuid, &mut cpu, &mut env);
    let sig = thinhv_abi::cpuid::signature_from_regs(
        cpu.regs[Gpr::Rbx as usize] as u32,
        cpu.regs[Gpr::Rcx as usize] as u32,
        cpu.regs[Gpr::Rdx as usize] as u32,
    );
    assert_eq!(&sig, b"ThinHVThinHV");
    assert_eq!(
        cpu.regs[Gpr::Rax as usize],
        u64::from(thinhv_abi::cpuid::LEAF_MAX)
    );

    let mut cpu = at(&mut env, CPUID);
    cpu.regs[Gpr::Rax as usize] = 0x4000_0002;
    handle(&Exit::Cpuid, &mut cpu, &mut env);
    assert_eq!(cpu.regs[Gpr::Rax as usize], PROTECTED.size + STATUS.size);
    assert_eq!(cpu.regs[Gpr::Rcx as usize], STATUS.base & 0xffff_ffff);

    env.integrity.current_crc = 7;
    let mut cpu = at(&mut env, CPUID);
    cpu.regs[Gpr::Rax as usize] = 0x4000_0004;
    handle(&Exit::Cpuid, &mut cpu, &mut env);
    let r = |g: Gpr| cpu.regs[g as usize];
    assert_eq!(
        (r(Gpr::Rax), r(Gpr::Rbx), r(Gpr::Rcx)),
        (1, 7, 1),
        "expected, current, canary"
    );

    let mut cpu = at(&mut env, CPUID);
    cpu.regs[Gpr::Rax as usize] = 0x8000_0001;
    handle(&Exit::Cpuid, &mut cpu, &mut env);
    assert_eq!(cpu.regs[Gpr::Rcx as usize] & (1 << 2), 0, "SVM hidden");

    let mut cpu = at(&mut env, CPUID);
    cpu.regs[Gpr::Rax as usize] = 0x8000_000a;
    handle(&Exit::Cpuid, &mut cpu, &mut env);
    assert_eq!(&cpu.regs[..4], &[0, 0, 0, 0]);
}

#[test]
fn hidden_hypervisor_passes_the_processor_through() {
    let mut env = FakeEnv::new();
    env.hv.config.hide_hypervisor = 1;
    let mut cpu = at(&mut env, CPUID);
    cpu.regs[Gpr::Rax as usize] = 1;
    handle(&Exit::Cpuid, &mut cpu, &mut env);
    assert_eq!(cpu.regs[Gpr::Rcx as usize] as u32 & (1 << 31), 0);
    let mut cpu = at(&mut env, CPUID);
    cpu.regs[Gpr::Rax as usize] = 0x4000_0000;
    handle(&Exit::Cpuid, &mut cpu, &mut env);
    assert_eq!(cpu.regs[Gpr::Rbx as usize], 0x22, "hardware's answer");
}

#[test]
fn the_hardware_next_rip_is_used_when_given() {
    let mut env = FakeEnv::new();
    let mut cpu = at(&mut env, CPUID);
    cpu.hint = Some(RIP + 7);
    handle(&Exit::Cpuid, &mut cpu, &mut env);
    assert_eq!(cpu.rip, RIP + 7);
}

#[test]
fn undecodable_instruction_faults_instead_of_looping() {
    let mut env = FakeEnv::new();
    let mut cpu = at(&mut env, &[0x06]); // push es: invalid in 64-bit mode
    let h = handle(&Exit::Cpuid, &mut cpu, &mut env);
    assert_eq!(h.outcome, Outcome::Resume);
    assert_eq!(cpu.exceptions, vec![(13, Some(0))]);
    assert_eq!(cpu.rip, RIP);
}

pub(super) fn hypercall(env: &mut FakeEnv, cpl: u8, f: Function, a: [u64; 3]) -> FakeCpu {
    let mut cpu = at(env, VMMCALL);
    cpu.cpl = cpl;
    cpu.regs[Gpr::Rax as usize] = f.0;
    cpu.regs[Gpr::Rbx as usize] = a[0];
    cpu.regs[Gpr::Rcx as usize] = a[1];
    cpu.regs[Gpr::Rdx as usize] = a[2];
    let h = handle(&Exit::Hypercall, &mut cpu, env);
    assert_eq!(h.reason, thinhv_abi::exit::ExitReason::HYPERCALL);
    cpu
}

pub(super) fn status(cpu: &FakeCpu) -> Status {
    Status(cpu.regs[Gpr::Rax as usize])
}

#[test]
fn hypercalls_from_user_mode_are_refused_and_change_nothing() {
    let mut env = FakeEnv::new();
    let buf = 0x20_0000;
    for cpl in [1, 3] {
        let cpu = hypercall(&mut env, cpl, Function::STATUS, [buf, 0x1000, 0]);
        assert_eq!(status(&cpu), Status::NOT_PERMITTED);
        assert_eq!(cpu.regs[Gpr::Rbx as usize], buf, "RBX untouched");
        assert_eq!(cpu.rip, RIP + 3);
        assert!(
            env.get(buf, 0x60).iter().all(|&b| b == 0),
            "nothing written"
        );
    }
    let cpu = hypercall(&mut env, 3, Function::SEAL, [0; 3]);
    assert_eq!(status(&cpu), Status::NOT_PERMITTED);
    assert!(!env.hv.is_sealed());
}

#[test]
fn status_hypercall_writes_a_report_into_guest_ram() {
    let mut env = FakeEnv::new();
    let cpu = hypercall(&mut env, 0, Function::STATUS, [0x20_0000, 0x1000, 0]);
    assert_eq!(status(&cpu), Status::OK);
    assert_eq!(cpu.regs[Gpr::Rbx as usize], 0x60);
    let r = StatusReport::read_from_bytes(&env.get(0x20_0000, 0x60)).unwrap();
    assert_eq!(r.cpus_virtualized, 4);
    let cpu = hypercall(&mut env, 0, Function::STATUS, [0x20_0000, 0x10, 0]);
    assert_eq!(status(&cpu), Status::BUFFER_TOO_SMALL);
    assert_eq!(cpu.regs[Gpr::Rbx as usize], 0x60);
}

#[test]
fn pointers_into_the_hypervisor_or_outside_ram_are_refused() {
    let mut env = FakeEnv::new();
    let cases = [
        PROTECTED.base,
        PROTECTED.base + 0x1000,
        PROTECTED.base - 0x10, // straddles into the protected region
        STATUS.base,
        0x7e00_0000 - 0x1000 + 0x100 + PROTECTED.size, // inside the status page
        0x9000_0000,                                   // MMIO hole: not RAM
        u64::MAX - 0x10,                               // wraps
    ];
    for gpa in cases {
        env.put(RIP, VMMCALL);
        let before = env.mem.clone();
        let cpu = hypercall(&mut env, 0, Function::STATUS, [gpa, 0x100, 0]);
        assert_eq!(status(&cpu), Status::BAD_ADDRESS, "{gpa:#x}");
        assert_eq!(env.mem, before, "memory changed for {gpa:#x}");
        let cpu = hypercall(&mut env, 0, Function::LOG_READ, [gpa, 0x100, 0]);
        assert_eq!(status(&cpu), Status::BAD_ADDRESS, "{gpa:#x}");
        assert_eq!(env.mem, before);
    }
    let cpu = hypercall(&mut env, 0, Function::LOG_READ, [0x1000, 0, 0]);
    assert_eq!(status(&cpu), Status::INVALID_ARGUMENT);
    let cpu = hypercall(&mut env, 0, Function::LOG_READ, [0x1000, 64 << 20, 0]);
    assert_eq!(status(&cpu), Status::INVALID_ARGUMENT);
}

#[test]
fn log_read_copies_and_resumes() {
    let mut env = FakeEnv::new();
    let cpu = hypercall(&mut env, 0, Function::LOG_READ, [0x3000, 5, 0]);
    assert_eq!(status(&cpu), Status::OK);
    assert_eq!(cpu.regs[Gpr::Rbx as usize], 5);
    assert_eq!(env.get(0x3000, 5), b"line ");
    let next = cpu.regs[Gpr::Rcx as usize];
    let cpu = hypercall(&mut env, 0, Function::LOG_READ, [0x3000, 100, next]);
    assert_eq!(cpu.regs[Gpr::Rbx as usize], 13);
    assert_eq!(env.get(0x3000, 13), b"one\nline two\n");
    assert_eq!(cpu.regs[Gpr::Rcx as usize], 18);
    assert_eq!(cpu.regs[Gpr::Rdx as usize], 18);
}

#[test]
fn integrity_and_exit_counts() {
    let mut env = FakeEnv::new();
    let cpu = hypercall(&mut env, 0, Function::INTEGRITY, [0; 3]);
    assert_eq!(status(&cpu), Status::OK);
    env.integrity.current_crc = 2;
    let cpu = hypercall(&mut env, 0, Function::INTEGRITY, [0; 3]);
    assert_eq!(status(&cpu), Status::INTEGRITY_FAILURE);
    assert_eq!(cpu.regs[Gpr::Rcx as usize], 2);
    let cpu = hypercall(&mut env, 0, Function::EXIT_COUNTS, [0x4000, 0x200, 2]);
    assert_eq!(status(&cpu), Status::OK);
    assert_eq!(env.get(0x4000, 8), 200u64.to_le_bytes());
    let cpu = hypercall(&mut env, 0, Function::EXIT_COUNTS, [0x4000, 0x200, 9]);
    assert_eq!(status(&cpu), Status::INVALID_ARGUMENT);
    let cpu = hypercall(&mut env, 0, Function(0x77), [0; 3]);
    assert_eq!(status(&cpu), Status::UNKNOWN_FUNCTION);
}

#[test]
fn devirtualize_only_until_sealed() {
    let mut env = FakeEnv::new();
    let mut cpu = at(&mut env, VMMCALL);
    cpu.regs[Gpr::Rax as usize] = Function::DEVIRTUALIZE.0;
    assert_eq!(
        handle(&Exit::Hypercall, &mut cpu, &mut env).outcome,
        Outcome::Devirtualize
    );
    assert_eq!(status(&cpu), Status::OK);
    assert_eq!(cpu.rip, RIP + 3);
    let cpu = hypercall(&mut env, 0, Function::SEAL, [0; 3]);
    assert_eq!(status(&cpu), Status::OK);
    // Sealing switches the IOMMU on once and reports the units.
    assert_eq!(env.iommu_enables, 1);
    assert_eq!(
        (cpu.regs[Gpr::Rbx as usize], cpu.regs[Gpr::Rcx as usize]),
        (1, 1)
    );
    let cpu = hypercall(&mut env, 0, Function::SEAL, [0; 3]);
    assert_eq!(status(&cpu), Status::NOT_PERMITTED);
    assert_eq!(env.iommu_enables, 1);
    assert!(
        env.iommu_polls.get() >= 2,
        "every hypercall polls DMA faults"
    );
    let mut cpu = at(&mut env, VMMCALL);
    cpu.regs[Gpr::Rax as usize] = Function::DEVIRTUALIZE.0;
    assert_eq!(
        handle(&Exit::Hypercall, &mut cpu, &mut env).outcome,
        Outcome::Resume
    );
    assert_eq!(status(&cpu), Status::NOT_PERMITTED);
}

#[test]
fn the_host_fault_test_hook_is_closed_unless_configured_and_before_seal() {
    let mut env = FakeEnv::new();
    let cpu = hypercall(&mut env, 0, Function::DEBUG_HOST_FAULT, [0; 3]);
    assert_eq!(status(&cpu), Status::NOT_PERMITTED);
    env.hv.config.debug_host_fault = 1;
    let mut cpu = at(&mut env, VMMCALL);
    cpu.regs[Gpr::Rax as usize] = Function::DEBUG_HOST_FAULT.0;
    assert_eq!(
        handle(&Exit::Hypercall, &mut cpu, &mut env).outcome,
        Outcome::HostFaultTest
    );
    hypercall(&mut env, 0, Function::SEAL, [0; 3]);
    let cpu = hypercall(&mut env, 0, Function::DEBUG_HOST_FAULT, [0; 3]);
    assert_eq!(status(&cpu), Status::NOT_PERMITTED);
}

#[test]
fn efer_hides_and_keeps_svme() {
    let mut env = FakeEnv::new();
    let mut cpu = at(&mut env, RDMSR);
    cpu.efer = 0xd00 | (1 << 12);
    handle(&Exit::MsrRead { msr: 0xc000_0080 }, &mut cpu, &mut env);
    assert_eq!(cpu.regs[Gpr::Rax as usize], 0xd00);
    assert_eq!(cpu.rip, RIP + 2);
    // Setting SVME: #GP, nothing changes.
    let mut cpu = at(&mut env, WRMSR);
    cpu.efer = 0xd00;
    handle(
        &Exit::MsrWrite {
            msr: 0xc000_0080,
            value: 0xd00 | (1 << 12),
        },
        &mut cpu,
        &mut env,
    );
    assert_eq!(cpu.exceptions, vec![(13, Some(0))]);
    assert_eq!(cpu.efer, 0xd00);
    // Turning LME off with paging on: #GP.
    let mut cpu = at(&mut env, WRMSR);
    cpu.efer = 0xd00;
    cpu.paging.cr0 = 1 << 31;
    handle(
        &Exit::MsrWrite {
            msr: 0xc000_0080,
            value: 0x800,
        },
        &mut cpu,
        &mut env,
    );
    assert_eq!(cpu.exceptions.len(), 1);
    // Enabling NXE is fine; LMA is kept.
    let mut cpu = at(&mut env, WRMSR);
    cpu.efer = 0x500;
    handle(
        &Exit::MsrWrite {
            msr: 0xc000_0080,
            value: 0x901,
        },
        &mut cpu,
        &mut env,
    );
    assert_eq!(cpu.efer, 0xd01);
    assert_eq!(cpu.rip, RIP + 2);
    // The SVM control MSRs do not exist for the guest.
    for msr in [msr::MSR_VM_CR, msr::MSR_VM_HSAVE_PA] {
        let mut cpu = at(&mut env, RDMSR);
        handle(&Exit::MsrRead { msr }, &mut cpu, &mut env);
        assert_eq!(cpu.exceptions, vec![(13, Some(0))]);
        let mut cpu = at(&mut env, WRMSR);
        handle(&Exit::MsrWrite { msr, value: 0x1000 }, &mut cpu, &mut env);
        assert_eq!(cpu.exceptions, vec![(13, Some(0))]);
        assert_eq!(cpu.rip, RIP);
    }
}

#[test]
fn svm_instructions_raise_ud() {
    let mut env = FakeEnv::new();
    let mut cpu = at(&mut env, &[0x0f, 0x01, 0xd8]);
    handle(&Exit::VirtInstruction, &mut cpu, &mut env);
    assert_eq!(cpu.exceptions, vec![(6, None)]);
    assert_eq!(cpu.rip, RIP);
}

pub(super) fn npf(gpa: u64, write: bool, fetch: bool, present: bool) -> Exit {
    Exit::NestedFault {
        gpa,
        write,
        fetch,
        present,
        guest_table_walk: false,
    }
}

#[test]
fn writes_to_a_bar_thinhv_keeps_are_discarded_and_counted() {
    let mut env = FakeEnv::new();
    let bar = thinhv_abi::PhysRange::new(0xc100_0000, 0x4000);
    // The control: before the BAR is held, the same write is no protected
    // access (an unexpected fault, #GP).
    let mut cpu = at(&mut env, &[0x89, 0x18]);
    let h = handle(&npf(bar.base + 0x14, true, false, true), &mut cpu, &mut env);
    assert_ne!(h.reason, thinhv_abi::exit::ExitReason::PROTECTED_ACCESS);
    env.hv.pci.held[0] = bar;
    env.hv.pci.held_count = 1;
    assert!(
        env.hv
            .foreign_ram(crate::partition::PartitionId::OS, bar.base + 0x3ffc, 8)
    );
    assert!(
        env.hv
            .foreign_ram(crate::partition::PartitionId(1), bar.base, 1)
    );
    let mut cpu = at(&mut env, &[0x89, 0x18]);
    let h = handle(&npf(bar.base + 0x14, true, false, true), &mut cpu, &mut env);
    assert_eq!(h.reason, thinhv_abi::exit::ExitReason::PROTECTED_ACCESS);
    assert_eq!(cpu.rip, RIP + 2, "instruction skipped");
    assert!(cpu.exceptions.is_empty());
    assert_eq!(
        env.hv
            .blocked_writes
            .load(core::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn writes_to_the_protected_region_are_discarded_and_counted() {
    let mut env = FakeEnv::new();
    // mov dword [rax], ebx
    let mut cpu = at(&mut env, &[0x89, 0x18]);
    let h = handle(
        &npf(PROTECTED.base + 0x40, true, false, true),
        &mut cpu,
        &mut env,
    );
    assert_eq!(h.reason, thinhv_abi::exit::ExitReason::PROTECTED_ACCESS);
    assert_eq!(cpu.rip, RIP + 2, "instruction skipped");
    assert!(cpu.exceptions.is_empty());
    assert_eq!(
        env.hv
            .blocked_writes
            .load(core::sync::atomic::Ordering::Relaxed),
        1
    );
    // The status page is protected the same way.
    let mut cpu = at(&mut env, &[0xf3, 0xa4]);
    handle(&npf(STATUS.base, true, false, true), &mut cpu, &mut env);
    assert_eq!(cpu.rip, RIP + 2);
    // Executing hypervisor memory: #UD, RIP unchanged.
    let mut cpu = at(&mut env, &[0x90]);
    handle(&npf(PROTECTED.base, false, true, true), &mut cpu, &mut env);
    assert_eq!(cpu.exceptions, vec![(6, None)]);
    assert_eq!(cpu.rip, RIP);
}

/// `mov dword [rdx+0x300], eax`
const MOV_ICR: &[u8] = &[0x89, 0x82, 0x00, 0x03, 0x00, 0x00];

pub(super) fn icr(env: &mut FakeEnv, high: u32, low: u32) -> Outcome {
    env.apic.insert(0x310, high);
    let mut cpu = at(env, MOV_ICR);
    cpu.regs[Gpr::Rax as usize] = u64::from(low);
    let h = handle(&npf(APIC + 0x300, true, false, true), &mut cpu, env);
    assert_eq!(h.reason, thinhv_abi::exit::ExitReason::APIC_ACCESS);
    assert_eq!(cpu.rip, RIP + 6);
    h.outcome
}

#[test]
fn linux_init_sipi_sipi_to_a_virtualized_cpu_goes_through_the_mailbox() {
    let mut env = FakeEnv::new();
    assert_eq!(icr(&mut env, 2 << 24, 0xc500), Outcome::Resume);
    let slot = &env.hv.cpus()[2];
    assert!(slot.mailbox.init_pending());
    assert_eq!(env.nmis_sent, vec![2]);
    // Nothing INIT-like reached the APIC.
    assert!(
        env.apic_writes
            .iter()
            .all(|&(o, v)| o != 0x300 || (v >> 8) & 7 != 5)
    );
    icr(&mut env, 2 << 24, 0x8500); // de-assert: ignored
    assert_eq!(env.nmis_sent.len(), 1);
    icr(&mut env, 2 << 24, 0x0699);
    icr(&mut env, 2 << 24, 0x0677); // second SIPI: ignored
    let slot = &env.hv.cpus()[2];
    assert!(slot.mailbox.take_init());
    assert_eq!(slot.mailbox.take_sipi(), Some(0x99));
    assert!(
        env.apic_writes
            .iter()
            .all(|&(o, v)| o != 0x300 || (v >> 8) & 7 < 5)
    );
    // The guest's ICR high is left as it wrote it.
    assert_eq!(env.apic[&0x310], 2 << 24);
}

#[test]
fn ipis_to_cpus_not_under_thinhv_are_real_and_targeted() {
    let mut env = FakeEnv::new();
    env.hv.cpus()[1].set_state(CpuState::OFFLINE);
    env.hv.cpus()[3].set_state(CpuState::OFFLINE);
    // INIT to all excluding self: CPU 2 virtual, 1 and 3 real and physical.
    icr(&mut env, 0, 0x000c_4500);
    assert_eq!(env.nmis_sent, vec![2]);
    let sent: Vec<_> = env
        .apic_writes
        .windows(2)
        .filter(|w| w[1].0 == 0x300)
        .map(|w| (w[0].1 >> 24, (w[1].1 >> 8) & 7, (w[1].1 >> 18) & 3))
        .collect();
    assert_eq!(
        sent,
        vec![(1, 5, 0), (3, 5, 0)],
        "physical INITs to 1 and 3 only"
    );
    // A fixed IPI is forwarded unchanged.
    env.apic_writes.clear();
    icr(&mut env, 3 << 24, 0x40fd);
    assert_eq!(env.apic_writes, vec![(0x310, 3 << 24), (0x300, 0x40fd)]);
}

#[test]
fn init_to_self_and_unknown_ids() {
    let mut env = FakeEnv::new();
    assert_eq!(icr(&mut env, 0, 0x0004_4500), Outcome::WaitForSipi);
    assert_eq!(
        icr(&mut env, 0, 0x4500),
        Outcome::WaitForSipi,
        "physical ID 0 is this CPU"
    );
    env.apic_writes.clear();
    icr(&mut env, 9 << 24, 0x4500);
    assert_eq!(
        env.apic_writes.iter().filter(|w| w.0 == 0x300).count(),
        1,
        "unknown ID: real INIT"
    );
    env.apic_writes.clear();
    icr(&mut env, 1 << 24, 0x4d00); // logical
    assert!(
        env.apic_writes.iter().all(|w| w.0 != 0x300),
        "logical INIT dropped"
    );
}

#[test]
fn other_apic_writes_pass_through_and_xchg_returns_the_old_value() {
    let mut env = FakeEnv::new();
    // mov dword [rax+0xb0], 0   (c7 80 b0 00 00 00 00 00 00 00)
    let mut cpu = at(&mut env, &[0xc7, 0x80, 0xb0, 0, 0, 0, 0, 0, 0, 0]);
    handle(&npf(APIC + 0xb0, true, false, true), &mut cpu, &mut env);
    assert_eq!(env.apic_writes, vec![(0xb0, 0)]);
    assert_eq!(cpu.rip, RIP + 10);
    env.apic.insert(0x380, 0x1234);
    // xchg [rdi], esi
    let mut cpu = at(&mut env, &[0x87, 0x37]);
    cpu.regs[Gpr::Rsi as usize] = 0xffff_ffff_0000_5678;
    handle(&npf(APIC + 0x380, true, false, true), &mut cpu, &mut env);
    assert_eq!(env.apic[&0x380], 0x5678);
    assert_eq!(cpu.regs[Gpr::Rsi as usize], 0x1234);
}

#[test]
fn x2apic_icr_writes_are_virtualized_too() {
    let mut env = FakeEnv::new();
    let mut cpu = at(&mut env, WRMSR);
    handle(
        &Exit::MsrWrite {
            msr: 0x830,
            value: (3u64 << 32) | 0x4500,
        },
        &mut cpu,
        &mut env,
    );
    assert_eq!(env.nmis_sent, vec![3]);
    assert!(env.x2apic_writes.is_empty());
    assert_eq!(cpu.rip, RIP + 2);
    let mut cpu = at(&mut env, WRMSR);
    handle(
        &Exit::MsrWrite {
            msr: 0x830,
            value: (3u64 << 32) | 0x40ec,
        },
        &mut cpu,
        &mut env,
    );
    assert_eq!(env.x2apic_writes, vec![(3u64 << 32) | 0x40ec]);
}

#[test]
fn nmis_are_wake_ups_or_reflected() {
    let mut env = FakeEnv::new();
    let mut cpu = FakeCpu::default();
    // A real NMI goes to the guest.
    assert_eq!(
        handle(&Exit::Nmi, &mut cpu, &mut env).outcome,
        Outcome::Resume
    );
    assert_eq!(cpu.nmis, 1);
    // A wake-up with a pending INIT enters wait-for-SIPI, and is not injected.
    env.hv.cpus()[0].mailbox.post_init();
    let h = handle(&Exit::Nmi, &mut cpu, &mut env);
    assert_eq!(h.outcome, Outcome::WaitForSipi);
    assert_eq!(cpu.nmis, 1);
    // A stale wake-up (INIT already consumed) is swallowed.
    env.hv.cpus()[0]
        .mailbox
        .wake_nmis
        .store(1, core::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        handle(&Exit::Nmi, &mut cpu, &mut env).outcome,
        Outcome::Resume
    );
    assert_eq!(cpu.nmis, 1);
    // A real INIT.
    assert_eq!(
        handle(&Exit::Init, &mut cpu, &mut env).outcome,
        Outcome::WaitForSipi
    );
}

#[test]
fn first_touch_is_mapped_and_other_faults_never_loop() {
    let mut env = FakeEnv::new();
    let mut cpu = at(&mut env, &[0x8b, 0x00]);
    let h = handle(
        &npf(0x80_0000_0000, false, false, false),
        &mut cpu,
        &mut env,
    );
    assert_eq!(h.outcome, Outcome::ResumeFlushTlb);
    assert_eq!(env.demand_calls, vec![0x80_0000_0000]);
    env.demand_ok = false;
    let h = handle(
        &npf(0x80_0000_0000, false, false, false),
        &mut cpu,
        &mut env,
    );
    assert_eq!(h.outcome, Outcome::Resume);
    assert_eq!(cpu.exceptions, vec![(13, Some(0))]);
}

#[test]
fn shutdown_resets_and_unknown_exits_are_fatal() {
    let mut env = FakeEnv::new();
    let mut cpu = FakeCpu::default();
    assert_eq!(
        handle(&Exit::Shutdown, &mut cpu, &mut env).outcome,
        Outcome::Reset
    );
    assert!(matches!(
        handle(
            &Exit::Other {
                code: 0x99,
                info1: 0,
                info2: 0
            },
            &mut cpu,
            &mut env
        )
        .outcome,
        Outcome::Fatal(_)
    ));
}

/// Builds 4-level tables in fake memory mapping `linear` (4 KiB page) to
/// `phys`, with the tables at `base`.
fn four_level(env: &mut FakeEnv, base: u64, linear: u64, phys: u64) -> u64 {
    let idx = |l: u32| (linear >> (12 + 9 * l)) & 0x1ff;
    for l in (0..4u32).rev() {
        let table = base + u64::from(3 - l) * 0x1000;
        let entry = if l == 0 {
            phys | 3
        } else {
            (table + 0x1000) | 3
        };
        env.put(table + idx(l) * 8, &entry.to_le_bytes());
    }
    base
}

#[test]
fn guest_page_walks() {
    let mut env = FakeEnv::new();
    let cr3 = four_level(&mut env, 0x50_0000, 0xffff_8000_1234_5000, 0x77_7000);
    let regs = PagingRegs {
        cr0: 1 << 31,
        cr3,
        cr4: 1 << 5,
        efer: 1 << 10,
    };
    assert_eq!(
        translate(&env, &regs, 0xffff_8000_1234_5678),
        Some(0x77_7678)
    );
    assert_eq!(translate(&env, &regs, 0xffff_8000_1234_6000), None);
    // 2 MiB page at the PD level.
    env.put(0x50_2000 + 0x91 * 8, &(0x4020_0000u64 | 0x83).to_le_bytes());
    assert_eq!(
        translate(&env, &regs, 0xffff_8000_1221_2345),
        Some(0x4021_2345)
    );
    // Paging off: linear is physical (32 bits).
    assert_eq!(
        translate(&env, &PagingRegs::default(), 0x1_0000_1234),
        Some(0x1234)
    );
    // 32-bit paging with a 4 MiB PSE-36 page.
    env.put(
        0x60_0000 + 0x3 * 4,
        &(0x00c0_0000u32 | (0x5 << 13) | 0x83).to_le_bytes(),
    );
    let regs32 = PagingRegs {
        cr0: 1 << 31,
        cr3: 0x60_0000,
        cr4: 1 << 4,
        efer: 0,
    };
    assert_eq!(translate(&env, &regs32, 0x00d2_3456), Some(0x5_00d2_3456));
    // PAE: PDPT → PD → PT.
    env.put(0x70_0000 + 8, &(0x70_1000u64 | 1).to_le_bytes());
    env.put(0x70_1000 + 2 * 8, &(0x70_2000u64 | 3).to_le_bytes());
    env.put(0x70_2000 + 3 * 8, &(0xab_c000u64 | 3).to_le_bytes());
    let pae = PagingRegs {
        cr0: 1 << 31,
        cr3: 0x70_0000,
        cr4: 1 << 5,
        efer: 0,
    };
    assert_eq!(translate(&env, &pae, 0x4040_3010), Some(0xab_c010));
}

#[test]
fn guest_page_tables_inside_the_hypervisor_read_as_empty() {
    let mut env = FakeEnv::new();
    // Tables planted in the protected region are invisible to the walk.
    let cr3 = four_level(&mut env, PROTECTED.base, 0x40_0000, 0x1000);
    let regs = PagingRegs {
        cr0: 1 << 31,
        cr3,
        cr4: 1 << 5,
        efer: 1 << 10,
    };
    assert_eq!(translate(&env, &regs, 0x40_0000), None);
    // And code "fetched" from there reads as zeros, not hypervisor bytes.
    env.put(PROTECTED.base, &[0x0f, 0xa2]);
    let mut out = [0xffu8; 15];
    let cpu = FakeCpu {
        rip: PROTECTED.base,
        ..Default::default()
    };
    let n = crate::guest_mem::fetch_instruction(&env, &cpu, &mut out);
    assert_eq!(n, 15);
    assert_eq!(&out[..2], &[0, 0]);
}

#[test]
fn vmx_exits_go_through_the_neutral_handlers() {
    let mut env = FakeEnv::new();
    // SIPI: start at the vector.
    let mut cpu = FakeCpu::default();
    assert_eq!(
        handle(&Exit::Sipi { vector: 0x9a }, &mut cpu, &mut env).outcome,
        Outcome::StartAt(0x9a)
    );
    // INVD becomes WBINVD and is skipped (0F 08).
    let mut cpu = at(&mut env, &[0x0f, 0x08]);
    handle(&Exit::Invd, &mut cpu, &mut env);
    assert_eq!((env.wbinvds, cpu.rip), (1, RIP + 2));
    // MOV CR4, RBX (0F 22 E3): accepted, or #GP when it sets VMXE.
    let mut cpu = at(&mut env, &[0x0f, 0x22, 0xe3]);
    cpu.regs[Gpr::Rbx as usize] = 0x6f0;
    handle(&Exit::CrWrite { cr: 4, gpr: 3 }, &mut cpu, &mut env);
    assert_eq!((cpu.crs.clone(), cpu.rip), (vec![(4, 0x6f0)], RIP + 3));
    let mut cpu = at(&mut env, &[0x0f, 0x22, 0xe3]);
    cpu.regs[Gpr::Rbx as usize] = 0x6f0 | 1 << 13;
    handle(&Exit::CrWrite { cr: 4, gpr: 3 }, &mut cpu, &mut env);
    assert_eq!(
        (cpu.exceptions.clone(), cpu.rip),
        (vec![(13, Some(0))], RIP)
    );
    // IA32_FEATURE_CONTROL reads as locked with VMX off (a VMX-only rule).
    env.hv.vendor = thinhv_abi::hypercall::VENDOR_INTEL_VMX;
    let mut cpu = at(&mut env, RDMSR);
    handle(&Exit::MsrRead { msr: 0x3a }, &mut cpu, &mut env);
    assert_eq!(cpu.regs[Gpr::Rax as usize], 0x1);
    // Table misconfiguration is a hypervisor bug: stop, never loop.
    let mut cpu = FakeCpu::default();
    assert!(matches!(
        handle(&Exit::TableMisconfig { gpa: 0x1000 }, &mut cpu, &mut env).outcome,
        Outcome::Fatal(_)
    ));
}

#[test]
fn xsetbv_is_checked_then_done() {
    let mut env = FakeEnv::new();
    // xsetbv (0F 01 D1) with XCR0 = x87|SSE|AVX.
    let mut cpu = at(&mut env, &[0x0f, 0x01, 0xd1]);
    cpu.regs[Gpr::Rax as usize] = 0x7;
    handle(&Exit::Xsetbv, &mut cpu, &mut env);
    assert_eq!((env.xcr0, cpu.rip), (Some(0x7), RIP + 3));
    for (rcx, rax, cpl) in [(0, 0x5, 0), (1, 0x3, 0), (0, 0x3, 3), (0, 0xf, 0)] {
        let mut env = FakeEnv::new();
        let mut cpu = at(&mut env, &[0x0f, 0x01, 0xd1]);
        cpu.regs[Gpr::Rax as usize] = rax;
        cpu.regs[Gpr::Rcx as usize] = rcx;
        cpu.cpl = cpl;
        handle(&Exit::Xsetbv, &mut cpu, &mut env);
        assert_eq!(
            (env.xcr0, cpu.exceptions.clone()),
            (None, vec![(13, Some(0))]),
            "{rcx} {rax:#x} {cpl}"
        );
    }
}

/// A profile like `x86-64-v2` on the fake processor: AVX2, AVX-512 and BMI1
/// hidden in leaf 7, XSAVE limited to x87 and SSE.
fn v2_like() -> thinhv_abi::handoff::CpuidProfile {
    use thinhv_abi::handoff::{CpuidMask, CpuidProfile};
    let mut p = CpuidProfile {
        active: 1,
        count: 1,
        xcr0_allowed: 0b11,
        ..CpuidProfile::default()
    };
    p.masks[0] = CpuidMask {
        leaf: 7,
        subleaf: 0,
        regs: [u32::MAX, 0, 0, 0],
    };
    p
}

fn cpuid_of(env: &mut FakeEnv, leaf: u32, sub: u32) -> [u32; 4] {
    let mut cpu = at(env, CPUID);
    cpu.regs[Gpr::Rax as usize] = u64::from(leaf);
    cpu.regs[Gpr::Rcx as usize] = u64::from(sub);
    handle(&Exit::Cpuid, &mut cpu, env);
    core::array::from_fn(|i| cpu.regs[[Gpr::Rax, Gpr::Rbx, Gpr::Rcx, Gpr::Rdx][i] as usize] as u32)
}

#[test]
fn the_cpu_profile_masks_features_and_keeps_xsave_consistent() {
    let mut env = FakeEnv::new();
    // Without a profile: the processor's answer.
    assert_eq!(cpuid_of(&mut env, 7, 0)[1], (1 << 5) | (1 << 16) | (1 << 3));
    assert_eq!(cpuid_of(&mut env, 0xd, 0), [0xe7, 0x340, 0xa80, 0]);
    env.hv.cpuid = v2_like();
    assert_eq!(
        cpuid_of(&mut env, 7, 0),
        [0, 0, 0, 0],
        "AVX2, AVX-512F, BMI1 hidden"
    );
    // XSAVE leaf: components, and the maximum size of what is left.
    assert_eq!(cpuid_of(&mut env, 0xd, 0), [0x3, 0x340, 576, 0]);
    // The AVX and AVX-512 sub-leaves read as absent; the supervisor
    // component (8, in 0xD.1 ECX) and 0xD.1 itself stay.
    for i in [2, 5, 6, 7] {
        assert_eq!(cpuid_of(&mut env, 0xd, i), [0; 4], "0xd.{i}");
    }
    assert_eq!(cpuid_of(&mut env, 0xd, 8), [128, 0, 1, 0]);
    assert_eq!(cpuid_of(&mut env, 0xd, 1), [0xf, 0x340, 0x100, 0]);
    // Leaf 1 untouched by this profile, but still filtered by thinhv.
    assert_eq!(cpuid_of(&mut env, 1, 0)[2] & (1 << 5), 0, "VMX hidden");
    // Only AVX hidden: the maximum size is AVX-512's end without it.
    let mut p = v2_like();
    p.xcr0_allowed = 0xe3;
    p.count = 0;
    env.hv.cpuid = p;
    assert_eq!(cpuid_of(&mut env, 0xd, 0)[2], 1664 + 1024);
    p.xcr0_allowed = 0x7;
    env.hv.cpuid = p;
    assert_eq!(cpuid_of(&mut env, 0xd, 0)[2], 576 + 256);
}

#[test]
fn xsetbv_refuses_state_the_profile_hides() {
    let mut env = FakeEnv::new();
    env.hv.cpuid = v2_like();
    let mut cpu = at(&mut env, &[0x0f, 0x01, 0xd1]);
    cpu.regs[Gpr::Rax as usize] = 0x7;
    handle(&Exit::Xsetbv, &mut cpu, &mut env);
    assert_eq!(
        (env.xcr0, cpu.exceptions.clone()),
        (None, vec![(13, Some(0))])
    );
    let mut cpu = at(&mut env, &[0x0f, 0x01, 0xd1]);
    cpu.regs[Gpr::Rax as usize] = 0x3;
    handle(&Exit::Xsetbv, &mut cpu, &mut env);
    assert_eq!((env.xcr0, cpu.rip), (Some(0x3), RIP + 3));
}

/// ECAM at 0xb000_0000; 0000:00:03.0 hidden, 0000:01:00.0 an igb PF with
/// 8 VFs limited to 2 (SR-IOV capability at 0x160).
fn pci_env() -> FakeEnv {
    use thinhv_abi::handoff::{PCI_ACTION_HIDE, PCI_ACTION_VF_BUDGET, PciMediation};
    let mut env = FakeEnv::new();
    let p = &mut env.hv.pci;
    p.ecam_base = ECAM;
    p.bus_end = 0xff;
    p.mediated[0] = PciMediation {
        bus: 0,
        devfn: 3 << 3,
        action: PCI_ACTION_HIDE,
        ..Default::default()
    };
    p.mediated[1] = PciMediation {
        bus: 1,
        devfn: 0,
        action: PCI_ACTION_VF_BUDGET,
        sriov_cap: 0x160,
        os_vfs: 2,
        initial_vfs: 8,
        total_vfs: 8,
        ..Default::default()
    };
    p.count = 2;
    // The devices: the hidden NIC's IDs, and the PF's SR-IOV capability.
    env.mmio_write(HIDDEN, 4, 0x10d3_8086);
    env.mmio_write(PF, 4, 0x10c9_8086);
    env.mmio_write(PF + 0x16c, 4, 0x0008_0008);
    env.mmio_write(PF + 0x170, 2, 0);
    env.mmio_log.borrow_mut().clear();
    env
}

const ECAM: u64 = 0xb000_0000;
const HIDDEN: u64 = ECAM + (3 << 15);
const PF: u64 = ECAM + (1 << 20);

#[test]
fn a_hidden_function_reads_all_ones_through_ecam_and_drops_writes() {
    let mut env = pci_env();
    // mov eax, [rdx]  (Linux's mmio_config_readl)
    let mut cpu = at(&mut env, &[0x8b, 0x02]);
    cpu.regs[Gpr::Rax as usize] = 0xdead_beef_0000_0000;
    let h = handle(&npf(HIDDEN, false, false, false), &mut cpu, &mut env);
    assert_eq!(h.reason, thinhv_abi::exit::ExitReason::PCI_CONFIG);
    assert_eq!(
        cpu.regs[Gpr::Rax as usize],
        0xffff_ffff,
        "all ones, zero-extended"
    );
    assert_eq!(cpu.rip, RIP + 2);
    // mov ax, [rdx]: the upper bits kept.
    let mut cpu = at(&mut env, &[0x66, 0x8b, 0x02]);
    cpu.regs[Gpr::Rax as usize] = 0x1234_5678_0000_0000;
    handle(&npf(HIDDEN + 0x0e, false, false, false), &mut cpu, &mut env);
    assert_eq!(cpu.regs[Gpr::Rax as usize], 0x1234_5678_0000_ffff);
    // mov word [rdx+4], ax: dropped.
    let mut cpu = at(&mut env, &[0x66, 0x89, 0x42, 0x04]);
    handle(&npf(HIDDEN + 4, true, false, false), &mut cpu, &mut env);
    assert!(
        env.mmio_log.borrow().is_empty(),
        "the device was never touched"
    );
    assert_eq!(cpu.rip, RIP + 4);
    assert!(env.demand_calls.is_empty(), "not mistaken for a demand map");
}

#[test]
fn an_ecam_access_ends_like_the_instruction_single_step_and_data_breakpoint() {
    use crate::guest::dr6;
    // mov eax, [rdx] from the hidden function, stepped (TF): the #DB comes
    // after it with DR6.BS.
    let mut env = pci_env();
    let mut cpu = at(&mut env, &[0x8b, 0x02]);
    cpu.mode = Some(crate::guest::CpuMode::Bits64);
    cpu.regs[Gpr::Rdx as usize] = HIDDEN;
    cpu.rflags = 0x302;
    handle(&npf(HIDDEN, false, false, false), &mut cpu, &mut env);
    assert_eq!(cpu.rip, RIP + 2);
    assert_eq!(cpu.completed, vec![dr6::BS]);
    // The same load under a read/write data breakpoint on DR1 (R/W1 = 11b,
    // LEN1 = 4 bytes): B1; a write-only breakpoint does not see a load.
    for (rw, bits) in [(0b11u64, 0b10u64), (0b01, 0)] {
        let mut env = pci_env();
        let mut cpu = at(&mut env, &[0x8b, 0x02]);
        cpu.mode = Some(crate::guest::CpuMode::Bits64);
        cpu.regs[Gpr::Rdx as usize] = HIDDEN;
        cpu.rflags = 0x202;
        cpu.drs[1] = HIDDEN;
        cpu.dr7 = (1 << 2) | (rw << 20) | (0b11 << 22);
        handle(&npf(HIDDEN, false, false, false), &mut cpu, &mut env);
        assert_eq!(cpu.completed, vec![bits], "R/W = {rw:02b}");
    }
}

#[test]
fn a_vf_budget_shows_the_os_its_share_and_refuses_more() {
    let mut env = pci_env();
    // TotalVFs/InitialVFs as one dword: 2 and 2.
    let mut cpu = at(&mut env, &[0x8b, 0x02]);
    handle(&npf(PF + 0x16c, false, false, false), &mut cpu, &mut env);
    assert_eq!(cpu.regs[Gpr::Rax as usize], 0x0002_0002);
    // movzx eax, word [rdx] of TotalVFs alone.
    let mut cpu = at(&mut env, &[0x0f, 0xb7, 0x02]);
    handle(&npf(PF + 0x16e, false, false, false), &mut cpu, &mut env);
    assert_eq!(cpu.regs[Gpr::Rax as usize], 2);
    // Vendor/device pass through.
    let mut cpu = at(&mut env, &[0x8b, 0x02]);
    handle(&npf(PF, false, false, false), &mut cpu, &mut env);
    assert_eq!(cpu.regs[Gpr::Rax as usize], 0x10c9_8086);
    // NumVFs = 2 reaches the device; NumVFs = 3 does not.
    let mut cpu = at(&mut env, &[0x66, 0x89, 0x02]);
    cpu.regs[Gpr::Rax as usize] = 2;
    handle(&npf(PF + 0x170, true, false, false), &mut cpu, &mut env);
    assert_eq!(env.mmio_read(PF + 0x170, 2), 2);
    let mut cpu = at(&mut env, &[0x66, 0x89, 0x02]);
    cpu.regs[Gpr::Rax as usize] = 3;
    handle(&npf(PF + 0x170, true, false, false), &mut cpu, &mut env);
    assert_eq!(env.mmio_read(PF + 0x170, 2), 2, "refused");
    assert_eq!(
        env.hv
            .refused_pci_writes
            .load(core::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn legacy_ports_hide_the_same_function_and_pass_the_rest() {
    let mut env = pci_env();
    let io = |port, size, input| Exit::PortIo {
        port,
        size,
        input,
        string: false,
    };
    // The OS selected 00:03.0 register 0 (in this CPU's own latch).
    env.hv.cpus()[0]
        .cf8_latch
        .store(0x8000_1800, core::sync::atomic::Ordering::Relaxed);
    env.ports.borrow_mut().insert(0xcfc, 0x10d3_8086);
    // in eax, dx
    let mut cpu = at(&mut env, &[0xed]);
    let h = handle(&io(0xcfc, 4, true), &mut cpu, &mut env);
    assert_eq!(h.reason, thinhv_abi::exit::ExitReason::PCI_CONFIG);
    assert_eq!(cpu.regs[Gpr::Rax as usize], 0xffff_ffff);
    assert_eq!(cpu.rip, RIP + 1);
    // out dx, ax to the command register: dropped.
    env.port_log.borrow_mut().clear();
    let mut cpu = at(&mut env, &[0x66, 0xef]);
    cpu.regs[Gpr::Rax as usize] = 0x6;
    handle(&io(0xcfe, 2, false), &mut cpu, &mut env);
    assert!(
        env.port_log
            .borrow()
            .iter()
            .all(|e| e.0 == 'r' && e.1 == 0xcf8),
        "{:?}",
        env.port_log.borrow()
    );
    // Another function: passed through both ways.
    env.hv.cpus()[0]
        .cf8_latch
        .store(0x8000_1000, core::sync::atomic::Ordering::Relaxed);
    let mut cpu = at(&mut env, &[0xed]);
    cpu.regs[Gpr::Rax as usize] = 0xffff_ffff_0000_0000;
    handle(&io(0xcfc, 4, true), &mut cpu, &mut env);
    assert_eq!(cpu.regs[Gpr::Rax as usize], 0x10d3_8086);
    let mut cpu = at(&mut env, &[0xee]);
    cpu.regs[Gpr::Rax as usize] = 0x1ff;
    handle(&io(0xcfd, 1, false), &mut cpu, &mut env);
    assert_eq!(env.ports.borrow()[&0xcfd], 0xff);
    // String I/O is refused with #GP.
    let mut cpu = at(&mut env, &[0x6d]);
    handle(
        &Exit::PortIo {
            port: 0xcfc,
            size: 4,
            input: true,
            string: true,
        },
        &mut cpu,
        &mut env,
    );
    assert_eq!(cpu.exceptions, vec![(vector::GP, Some(0))]);
}

/// `mov [rdx], eax` (a store of `value`) or `mov eax, [rdx]` at `gpa`, a
/// page the second-level tables leave out (a nested fault, not present),
/// on the current processor; EAX after, and the exit's handling.
pub(super) fn trapped_access(env: &mut FakeEnv, gpa: u64, value: Option<u32>) -> (u32, Handled) {
    let code: &[u8] = if value.is_some() {
        &[0x89, 0x02]
    } else {
        &[0x8b, 0x02]
    };
    let mut cpu = at(env, code);
    cpu.regs[Gpr::Rax as usize] = u64::from(value.unwrap_or(0));
    let h = handle(&npf(gpa, value.is_some(), false, false), &mut cpu, env);
    assert_eq!(cpu.rip, RIP + 2, "instruction completed");
    ((cpu.regs[Gpr::Rax as usize] & 0xffff_ffff) as u32, h)
}
