//! Single-stepping over emulated instructions, control-register accesses
//! and task switches (VMX exits), on the fakes.
use super::fake::*;
use super::*;
use crate::guest::{Gpr, dr6};
use crate::vmx::state::{AR_UNUSABLE, Seg};
use crate::vmx::task_switch::TaskState;
use thinhv_abi::hypercall::{Function, Status};

const RIP: u64 = 0x10_0000;
const RF: u64 = 1 << 16;

fn at(env: &mut FakeEnv, code: &[u8], rflags: u64) -> FakeCpu {
    env.put(RIP, code);
    FakeCpu {
        rip: RIP,
        rflags,
        ..Default::default()
    }
}

/// Runs `exit` over `code` with RFLAGS = `rflags`; returns the CPU.
fn step(env: &mut FakeEnv, code: &[u8], rflags: u64, exit: &Exit) -> FakeCpu {
    let mut cpu = at(env, code, rflags);
    cpu.regs[Gpr::Rcx as usize] = 0xc000_0080;
    handle(exit, &mut cpu, env);
    cpu
}

#[test]
fn single_step_over_cpuid_msr_io_and_hypercalls_raises_db_after_the_instruction() {
    let cases: [(&str, &[u8], Exit); 5] = [
        ("cpuid", &[0x0f, 0xa2], Exit::Cpuid),
        (
            "rdmsr efer",
            &[0x0f, 0x32],
            Exit::MsrRead { msr: 0xc000_0080 },
        ),
        (
            "wrmsr efer",
            &[0x0f, 0x30],
            Exit::MsrWrite {
                msr: 0xc000_0080,
                value: 0xd01,
            },
        ),
        (
            "in eax, dx",
            &[0xed],
            Exit::PortIo {
                port: 0xcfc,
                size: 4,
                input: true,
                string: false,
            },
        ),
        ("vmmcall", &[0x0f, 0x01, 0xd9], Exit::Hypercall),
    ];
    for (name, code, exit) in cases {
        let mut env = FakeEnv::new();
        let cpu = step(&mut env, code, 0x302, &exit);
        assert!(cpu.exceptions.is_empty(), "{name}: {:?}", cpu.exceptions);
        assert_eq!(cpu.rip, RIP + code.len() as u64, "{name}: RIP past it");
        assert_eq!(cpu.completed, vec![dr6::BS], "{name}: single-step trap");
        // Without TF the instruction still completes (interrupt shadow
        // ends), with no trap.
        let mut env = FakeEnv::new();
        let cpu = step(&mut env, code, 0x202, &exit);
        assert_eq!(cpu.completed, vec![0], "{name} without TF");
    }
}

#[test]
fn single_step_from_user_mode_and_over_a_refused_hypercall() {
    // A hypercall from CPL 3 is refused but completes (RAX = NOT_PERMITTED):
    // the trap follows it as for any completed instruction.
    let mut env = FakeEnv::new();
    let mut cpu = at(&mut env, &[0x0f, 0x01, 0xd9], 0x302);
    cpu.cpl = 3;
    cpu.regs[Gpr::Rax as usize] = Function::VERSION.0;
    handle(&Exit::Hypercall, &mut cpu, &mut env);
    assert_eq!(Status(cpu.regs[Gpr::Rax as usize]), Status::NOT_PERMITTED);
    assert_eq!(cpu.completed, vec![dr6::BS]);
    // CPUID at CPL 3 (it does not fault): the same trap.
    let mut cpu = at(&mut env, &[0x0f, 0xa2], 0x3302);
    cpu.cpl = 3;
    handle(&Exit::Cpuid, &mut cpu, &mut env);
    assert_eq!(cpu.completed, vec![dr6::BS]);
}

#[test]
fn no_trap_when_the_instruction_faults_or_does_not_complete() {
    // RDMSR of an MSR a processor without SVM does not have: #GP, no trap.
    let mut env = FakeEnv::new();
    let mut cpu = at(&mut env, &[0x0f, 0x32], 0x302);
    handle(&Exit::MsrRead { msr: 0xc001_0117 }, &mut cpu, &mut env);
    assert_eq!(cpu.exceptions, vec![(13, Some(0))]);
    assert_eq!(cpu.rip, RIP);
    assert!(cpu.completed.is_empty());
    // A nested fault mapped on first touch: the instruction runs again.
    let mut cpu = at(&mut env, &[0x8b, 0x00], 0x302);
    let h = handle(
        &Exit::NestedFault {
            gpa: 0x40_0000_0000,
            write: false,
            fetch: false,
            present: false,
            guest_table_walk: false,
        },
        &mut cpu,
        &mut env,
    );
    assert_eq!(h.outcome, Outcome::ResumeFlushTlb);
    assert!(cpu.completed.is_empty());
    // A real NMI: nothing completed.
    let mut cpu = at(&mut env, &[0x90], 0x302);
    handle(&Exit::Nmi, &mut cpu, &mut env);
    assert!(cpu.completed.is_empty());
}

#[test]
fn btf_single_steps_branches_only() {
    let mut env = FakeEnv::new();
    let mut cpu = at(&mut env, &[0x0f, 0xa2], 0x302);
    cpu.debugctl = 1 << 1;
    handle(&Exit::Cpuid, &mut cpu, &mut env);
    assert_eq!(cpu.completed, vec![0], "CPUID is not a branch");
}

#[test]
fn rf_is_cleared_when_the_instruction_completes() {
    let mut env = FakeEnv::new();
    let cpu = step(&mut env, &[0x0f, 0xa2], 0x202 | RF, &Exit::Cpuid);
    assert_eq!(cpu.rflags & RF, 0);
}

#[test]
fn single_step_over_an_apic_write() {
    let mut env = FakeEnv::new();
    // mov [rax], ecx to the APIC's EOI register.
    let mut cpu = at(&mut env, &[0x89, 0x08], 0x302);
    cpu.regs[Gpr::Rax as usize] = APIC + 0xb0;
    let h = handle(
        &Exit::NestedFault {
            gpa: APIC + 0xb0,
            write: true,
            fetch: false,
            present: true,
            guest_table_walk: false,
        },
        &mut cpu,
        &mut env,
    );
    assert_eq!(h.outcome, Outcome::Resume);
    assert_eq!(cpu.rip, RIP + 2);
    assert_eq!(env.apic_writes, vec![(0xb0, 0)]);
    assert_eq!(cpu.completed, vec![dr6::BS]);
}

#[test]
fn data_breakpoints_on_emulated_memory_accesses() {
    let apic_write = |env: &mut FakeEnv, dr7: u64, dr0: u64, code: &[u8], fs: u64| {
        // A store to the APIC's TPR; RAX holds the address (less FS base).
        let mut cpu = at(env, code, 0x202);
        cpu.mode = Some(crate::guest::CpuMode::Bits64);
        cpu.regs[Gpr::Rax as usize] = APIC + 0x80 - fs;
        cpu.segment_bases[crate::guest::SegReg::Fs as usize] = fs;
        cpu.drs[0] = dr0;
        cpu.dr7 = dr7;
        let exit = Exit::NestedFault {
            gpa: APIC + 0x80,
            write: true,
            fetch: false,
            present: true,
            guest_table_walk: false,
        };
        handle(&exit, &mut cpu, env);
        assert_eq!(cpu.rip, RIP + code.len() as u64, "completed");
        cpu.completed
    };
    let mov = [0x89, 0x08]; // mov [rax], ecx
    let mov_fs = [0x64, 0x89, 0x08]; // mov fs:[rax], ecx
    // L0, R/W0 = 01b (writes), LEN0 = 11b (4 bytes) at the TPR: B0.
    let dr7 = 1 | (0b01 << 16) | (0b11 << 18);
    let mut env = FakeEnv::new();
    assert_eq!(apic_write(&mut env, dr7, APIC + 0x80, &mov, 0), vec![1]);
    // Through FS (its base counts in 64-bit mode).
    let mut env = FakeEnv::new();
    assert_eq!(
        apic_write(&mut env, dr7, APIC + 0x80, &mov_fs, 0x1000),
        vec![1]
    );
    // Elsewhere, or disabled, or an I/O breakpoint: no B bits.
    let mut env = FakeEnv::new();
    assert_eq!(apic_write(&mut env, dr7, APIC + 0x90, &mov, 0), vec![0]);
    let mut env = FakeEnv::new();
    assert_eq!(apic_write(&mut env, 0, APIC + 0x80, &mov, 0), vec![0]);
    let mut env = FakeEnv::new();
    let io = 1 | (0b10 << 16) | (0b11 << 18);
    assert_eq!(apic_write(&mut env, io, APIC + 0x80, &mov, 0), vec![0]);
}

#[test]
fn io_breakpoints_on_an_emulated_port_access() {
    let io = Exit::PortIo {
        port: 0xcfc,
        size: 4,
        input: true,
        string: false,
    };
    let mut env = FakeEnv::new();
    let mut cpu = at(&mut env, &[0xed], 0x202);
    // DR2 = 0xcfe, L2, R/W2 = 10b (I/O), LEN2 = 01b (2 bytes).
    cpu.drs[2] = 0xcfe;
    cpu.dr7 = (1 << 4) | (0b10 << 24) | (0b01 << 26);
    cpu.paging.cr4 = 1 << 3;
    handle(&io, &mut cpu, &mut env);
    assert_eq!(cpu.completed, vec![0b100], "B2");
    // Without CR4.DE, R/W = 10b is not an I/O breakpoint.
    let mut cpu = at(&mut env, &[0xed], 0x302);
    cpu.drs[2] = 0xcfe;
    cpu.dr7 = (1 << 4) | (0b10 << 24) | (0b01 << 26);
    handle(&io, &mut cpu, &mut env);
    assert_eq!(cpu.completed, vec![dr6::BS]);
}

// ---- Control-register accesses -----------------------------------------

#[test]
fn clts_and_lmsw_emulate_cr0_bits_0_to_3() {
    let mut env = FakeEnv::new();
    // CLTS (0F 06) with CR0 = NE|ET|TS|MP|PE (no paging: the fake
    // fetches through these registers).
    let mut cpu = at(&mut env, &[0x0f, 0x06], 0x202);
    cpu.paging.cr0 = 0x3b;
    let h = handle(&Exit::Clts, &mut cpu, &mut env);
    assert_eq!(h.reason, thinhv_abi::exit::ExitReason::CR_ACCESS);
    assert_eq!(cpu.crs, vec![(0, 0x33)]);
    assert_eq!(cpu.rip, RIP + 2);
    assert!(cpu.exceptions.is_empty());
    // LMSW ax (0F 01 F0) with 0: PE stays set, MP and TS clear.
    let mut cpu = at(&mut env, &[0x0f, 0x01, 0xf0], 0x202);
    cpu.paging.cr0 = 0x3b;
    handle(&Exit::Lmsw { source: 0 }, &mut cpu, &mut env);
    assert_eq!(cpu.crs, vec![(0, 0x31)]);
    assert!(cpu.exceptions.is_empty());
    assert_eq!(cpu.rip, RIP + 3);
    // At CPL 3: #GP, nothing written.
    let mut cpu = at(&mut env, &[0x0f, 0x06], 0x202);
    cpu.cpl = 3;
    handle(&Exit::Clts, &mut cpu, &mut env);
    assert_eq!(cpu.exceptions, vec![(13, Some(0))]);
    assert!(cpu.crs.is_empty());
}

#[test]
fn mov_from_and_to_cr3_and_cr8() {
    let mut env = FakeEnv::new();
    // mov rdx, cr3 (0F 20 DA).
    let mut cpu = at(&mut env, &[0x0f, 0x20, 0xda], 0x302);
    cpu.paging.cr3 = 0x1234_5000;
    handle(&Exit::CrRead { cr: 3, gpr: 2 }, &mut cpu, &mut env);
    assert_eq!(cpu.regs[Gpr::Rdx as usize], 0x1234_5000);
    assert_eq!(cpu.rip, RIP + 3);
    assert_eq!(cpu.completed, vec![dr6::BS], "single-stepped too");
    // mov cr8, rax (44 0F 22 C0) with 9: TPR = 0x90.
    let mut cpu = at(&mut env, &[0x44, 0x0f, 0x22, 0xc0], 0x202);
    cpu.regs[Gpr::Rax as usize] = 9;
    handle(&Exit::CrWrite { cr: 8, gpr: 0 }, &mut cpu, &mut env);
    assert_eq!(env.apic_writes.last(), Some(&(0x80, 0x90)));
    assert_eq!(cpu.rip, RIP + 4);
    // mov rax, cr8 reads it back.
    let mut cpu = at(&mut env, &[0x44, 0x0f, 0x20, 0xc0], 0x202);
    handle(&Exit::CrRead { cr: 8, gpr: 0 }, &mut cpu, &mut env);
    assert_eq!(cpu.regs[Gpr::Rax as usize], 9);
    // Reserved CR8 bits: #GP, no write.
    let writes = env.apic_writes.len();
    let mut cpu = at(&mut env, &[0x44, 0x0f, 0x22, 0xc0], 0x202);
    cpu.regs[Gpr::Rax as usize] = 0x10;
    handle(&Exit::CrWrite { cr: 8, gpr: 0 }, &mut cpu, &mut env);
    assert_eq!(cpu.exceptions, vec![(13, Some(0))]);
    assert_eq!(env.apic_writes.len(), writes);
    // In 32-bit mode the destination gets 32 bits.
    let mut cpu = at(&mut env, &[0x0f, 0x20, 0xc0], 0x202);
    cpu.mode = Some(crate::guest::CpuMode::Bits32);
    cpu.paging.cr0 = 0xffff_ffff_0000_0011;
    handle(&Exit::CrRead { cr: 0, gpr: 0 }, &mut cpu, &mut env);
    assert_eq!(cpu.regs[Gpr::Rax as usize], 0x11);
    assert!(cpu.exceptions.is_empty());
    // A register nothing can exit on (CR2 reads never exit): #UD.
    let mut cpu = at(&mut env, &[0x0f, 0x20, 0xd0], 0x202);
    handle(&Exit::CrRead { cr: 2, gpr: 0 }, &mut cpu, &mut env);
    assert_eq!(cpu.exceptions, vec![(6, None)]);
}

#[test]
fn mov_to_cr_in_32_bit_mode_uses_32_bits() {
    let mut env = FakeEnv::new();
    let mut cpu = at(&mut env, &[0x0f, 0x22, 0xc0], 0x202);
    cpu.mode = Some(crate::guest::CpuMode::Bits32);
    cpu.regs[Gpr::Rax as usize] = 0xdead_0000_0000_0031;
    handle(&Exit::CrWrite { cr: 0, gpr: 0 }, &mut cpu, &mut env);
    assert_eq!(cpu.crs, vec![(0, 0x31)]);
}

// ---- Task switches through the neutral handler ---------------------------

const GDT: u64 = 0x2000;
const TSS_A: u64 = 0x3000;
const TSS_B: u64 = 0x4000;

fn desc(base: u64, limit: u64, access: u64, flags: u64) -> u64 {
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (access << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (flags << 52)
        | ((base >> 24) << 56)
}

/// A 32-bit guest without paging in task A (TR 0x28); task B is 0x30,
/// and 0x38 is a TSS inside the hypervisor's memory.
fn task_setup(env: &mut FakeEnv) -> FakeCpu {
    for (sel, d) in [
        (0x08u64, desc(0, 0xfffff, 0x9b, 0xc)),
        (0x10, desc(0, 0xfffff, 0x93, 0xc)),
        (0x28, desc(TSS_A, 0x67, 0x8b, 0)),
        (0x30, desc(TSS_B, 0x67, 0x89, 0)),
        (0x38, desc(PROTECTED.base, 0x67, 0x89, 0)),
    ] {
        env.put(GDT + sel, &d.to_le_bytes());
    }
    let mut b = [0u8; 0x68];
    b[0x20..0x24].copy_from_slice(&0x5000u32.to_le_bytes()); // EIP
    b[0x24..0x28].copy_from_slice(&2u32.to_le_bytes()); // EFLAGS
    b[0x38..0x3c].copy_from_slice(&0x9000u32.to_le_bytes()); // ESP
    for (i, s) in [0x10u32, 0x08, 0x10, 0x10, 0x10, 0x10].iter().enumerate() {
        b[0x48 + 4 * i..0x4c + 4 * i].copy_from_slice(&s.to_le_bytes());
    }
    env.put(TSS_B, &b);
    let flat = |selector: u16, ar: u32| Seg {
        selector,
        base: 0,
        limit: 0xffff_ffff,
        ar,
    };
    FakeCpu {
        rip: 0x7000,
        mode: Some(crate::guest::CpuMode::Bits32),
        task: Some(TaskState {
            rip: 0x7000,
            rflags: 0x202,
            segs: [
                flat(0x10, 0xc093),
                flat(0x08, 0xc09b),
                flat(0x10, 0xc093),
                flat(0x10, 0xc093),
                flat(0x10, 0xc093),
                flat(0x10, 0xc093),
            ],
            ldtr: Seg {
                ar: AR_UNUSABLE,
                ..Seg::default()
            },
            tr: Seg {
                selector: 0x28,
                base: TSS_A,
                limit: 0x67,
                ar: 0x8b,
            },
            gdtr: (GDT, 0x3f),
            cr0: 0x11,
            ..TaskState::default()
        }),
        ..Default::default()
    }
}

fn task_switch(selector: u16, source: u8, event: u32, error_code: u32) -> Exit {
    Exit::TaskSwitch {
        selector,
        source,
        event,
        error_code,
        insn_len: 5,
    }
}

#[test]
fn a_task_switch_exit_switches_tasks_and_never_stops_the_machine() {
    let mut env = FakeEnv::new();
    let mut cpu = task_setup(&mut env);
    // JMP 0x30:0 (source 2).
    let h = handle(&task_switch(0x30, 2, 0, 0), &mut cpu, &mut env);
    assert_eq!(h.outcome, Outcome::Resume);
    assert_eq!(h.reason, thinhv_abi::exit::ExitReason::OTHER);
    let t = cpu.task.unwrap();
    assert_eq!((t.rip, t.tr.selector, t.gprs[4]), (0x5000, 0x30, 0x9000));
    assert_eq!(cpu.delivered, vec![0]);
    assert!(cpu.exceptions.is_empty());
    assert!(
        cpu.completed.is_empty(),
        "a task switch is not single-stepped here"
    );
    // Old state saved at A: EIP past the 5-byte JMP.
    assert_eq!(env.get(TSS_A + 0x20, 4), 0x7005u32.to_le_bytes());
}

#[test]
fn an_nmi_through_a_task_gate_is_delivered_by_the_switch() {
    let mut env = FakeEnv::new();
    let mut cpu = task_setup(&mut env);
    let nmi = (1 << 31) | (2 << 8) | 0x02;
    handle(&task_switch(0x30, 3, nmi, 0), &mut cpu, &mut env);
    assert_eq!(cpu.delivered, vec![nmi]);
    let t = cpu.task.unwrap();
    assert_ne!(t.rflags & (1 << 14), 0, "NT");
    assert_eq!(env.get(TSS_B, 2), vec![0x28, 0], "back link");
    assert_eq!(
        env.get(TSS_A + 0x20, 4),
        0x7000u32.to_le_bytes(),
        "not advanced"
    );
}

#[test]
fn task_switch_faults_are_reflected_with_the_double_fault_rules() {
    // A TSS in the hypervisor's memory cannot be read: #TS(selector).
    let mut env = FakeEnv::new();
    let mut cpu = task_setup(&mut env);
    let before = cpu.task;
    handle(&task_switch(0x38, 0, 0, 0), &mut cpu, &mut env);
    assert_eq!(cpu.exceptions, vec![(10, Some(0x38))]);
    assert_eq!(cpu.task, before, "registers unchanged");
    assert!(env.get(PROTECTED.base, 0x68).iter().all(|b| *b == 0));
    // The same while a #GP (contributory) goes through a task gate: #DF.
    let mut cpu = task_setup(&mut env);
    let gp = (1 << 31) | (1 << 11) | (3 << 8) | 0x0d;
    let h = handle(&task_switch(0x38, 3, gp, 0), &mut cpu, &mut env);
    assert_eq!(h.outcome, Outcome::Resume);
    assert_eq!(cpu.exceptions, vec![(8, Some(0))]);
    // While delivering #DF: a triple fault, which resets as on bare metal.
    let mut cpu = task_setup(&mut env);
    let df = (1 << 31) | (1 << 11) | (3 << 8) | 0x08;
    let h = handle(&task_switch(0x38, 3, df, 0), &mut cpu, &mut env);
    assert_eq!(h.outcome, Outcome::Reset);
    // A benign event (an external interrupt): the fault itself, with EXT.
    let mut cpu = task_setup(&mut env);
    handle(
        &task_switch(0x38, 3, (1 << 31) | 0x30, 0),
        &mut cpu,
        &mut env,
    );
    assert_eq!(cpu.exceptions, vec![(10, Some(0x39))]);
    // A backend without task-switch state (SVM never exits on them): #GP.
    let mut cpu = FakeCpu::default();
    handle(&task_switch(0x30, 0, 0, 0), &mut cpu, &mut env);
    assert_eq!(cpu.exceptions, vec![(13, Some(0))]);
}
