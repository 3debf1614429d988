//! The world switch in assembly: first launch, the VMRUN loop, and leaving
//! guest mode for good (devirtualize).
//!
//! Guest RAX and RSP live in the VMCB; the other GPRs in
//! [`RunState::regs`](crate::arch::percpu::RunState). Host state after
//! #VMEXIT comes from the host save area (GDTR, IDTR, CR0/3/4, EFER, RSP,
//! RIP, RAX, CS/SS/DS/ES) and VMLOAD of the host state block (TR, FS, GS,
//! LDTR, syscall MSRs); AMD APM Vol. 2 §15.5 and §15.6.
use core::arch::naked_asm;

/// What `svm_launch` switches to. All fields are 8 bytes so that the
/// offsets in the assembly are plain multiples of 8.
#[derive(Debug)]
#[repr(C)]
pub struct HostSwitch {
    /// +0: the core's CR3.
    pub cr3: u64,
    /// +8: host stack top.
    pub stack_top: u64,
    /// +16: GDT limit.
    pub gdt_limit: u64,
    /// +24: GDT base.
    pub gdt_base: u64,
    /// +32: IDT limit.
    pub idt_limit: u64,
    /// +40: IDT base.
    pub idt_base: u64,
}

/// What `svm_leave` restores (all fields 8 bytes, offsets in the comments).
#[derive(Debug)]
#[repr(C)]
pub struct LeaveState {
    /// +0..+120: control registers, descriptor tables, selectors, RIP,
    /// RSP, RFLAGS.
    pub native: crate::arch::vcpu::NativeState,
    /// +120
    pub rax: u64,
    /// +128
    pub cr2: u64,
    /// +136
    pub pat: u64,
}

// Layout checks for the offsets the assembly uses.
const _: () = {
    use core::mem::offset_of;
    assert!(offset_of!(HostSwitch, stack_top) == 8);
    assert!(offset_of!(HostSwitch, gdt_limit) == 16);
    assert!(offset_of!(HostSwitch, idt_base) == 40);
    use crate::arch::vcpu::NativeState;
    assert!(offset_of!(LeaveState, native) == 0);
    assert!(offset_of!(NativeState, efer) == 24);
    assert!(offset_of!(NativeState, gdt_limit) == 32);
    assert!(offset_of!(NativeState, idt_base) == 56);
    assert!(offset_of!(NativeState, cs) == 64);
    assert!(offset_of!(NativeState, es) == 88);
    assert!(offset_of!(NativeState, rip) == 96);
    assert!(offset_of!(LeaveState, rax) == 120);
    assert!(offset_of!(LeaveState, pat) == 136);
};

/// Switches this CPU to the core's CR3, GDT, TSS, IDT and stack, saves the
/// host hidden state, and enters the VMRUN loop. Never returns.
///
/// # Safety
/// Host mode, EFER.SVME set, VM_HSAVE_PA set; `run` and `sw` valid and
/// the structures they name fully initialized.
#[unsafe(naked)]
pub unsafe extern "sysv64" fn svm_launch(
    run: *mut super::super::percpu::RunState,
    sw: *const HostSwitch,
) -> ! {
    naked_asm!(
        "cli",
        "clgi",
        "mov rax, [rsi]",
        "mov cr3, rax",
        // lgdt from a packed copy on the current stack.
        "sub rsp, 16",
        "mov ax, [rsi + 16]",
        "mov [rsp], ax",
        "mov rax, [rsi + 24]",
        "mov [rsp + 2], rax",
        "lgdt [rsp]",
        "mov ax, [rsi + 32]",
        "mov [rsp], ax",
        "mov rax, [rsi + 40]",
        "mov [rsp + 2], rax",
        "lidt [rsp]",
        "add rsp, 16",
        // Reload CS with the core's code selector.
        "lea rax, [rip + 2f]",
        "push 0x08",
        "push rax",
        "retfq",
        "2:",
        "mov ax, 0x10",
        "mov ss, ax",
        "mov ds, ax",
        "mov es, ax",
        "mov ax, 0x18",
        "ltr ax",
        // Save the host's hidden state (TR, FS, GS, ...) for after #VMEXIT.
        "mov rax, [rdi + {host_state}]",
        "vmsave rax",
        "mov rsp, [rsi + 8]",
        "jmp {run_loop}",
        host_state = const super::super::percpu::RUN_HOST_STATE,
        run_loop = sym svm_run_loop,
    );
}

/// The VMRUN loop. `rdi` = `RunState`. Never returns; leaves only through
/// [`svm_leave`] (devirtualize) or a fatal stop inside the exit handler.
///
/// # Safety
/// As for [`svm_launch`], on the host stack.
#[unsafe(naked)]
pub unsafe extern "sysv64" fn svm_run_loop(run: *mut super::super::percpu::RunState) -> ! {
    naked_asm!(
        "2:",
        "push rdi",
        "sub rsp, 8",
        "mov rax, [rdi + {guest_control}]",
        "vmload rax",
        "mov rcx, [rdi + 8]",
        "mov rdx, [rdi + 16]",
        "mov rbx, [rdi + 24]",
        "mov rbp, [rdi + 40]",
        "mov rsi, [rdi + 48]",
        "mov r8,  [rdi + 64]",
        "mov r9,  [rdi + 72]",
        "mov r10, [rdi + 80]",
        "mov r11, [rdi + 88]",
        "mov r12, [rdi + 96]",
        "mov r13, [rdi + 104]",
        "mov r14, [rdi + 112]",
        "mov r15, [rdi + 120]",
        "mov rdi, [rdi + 56]",
        "vmrun rax",
        // #VMEXIT: rax = guest VMCB (host RAX), rsp as before VMRUN.
        "xchg rdi, [rsp + 8]",
        "mov [rdi + 8], rcx",
        "mov [rdi + 16], rdx",
        "mov [rdi + 24], rbx",
        "mov [rdi + 40], rbp",
        "mov [rdi + 48], rsi",
        "mov [rdi + 64], r8",
        "mov [rdi + 72], r9",
        "mov [rdi + 80], r10",
        "mov [rdi + 88], r11",
        "mov [rdi + 96], r12",
        "mov [rdi + 104], r13",
        "mov [rdi + 112], r14",
        "mov [rdi + 120], r15",
        "mov rcx, [rsp + 8]",
        "mov [rdi + 56], rcx",
        "mov [rsp + 8], rdi",
        "vmsave rax",
        "mov rax, [rdi + {host_state}]",
        "vmload rax",
        "call {handler}",
        "add rsp, 8",
        "pop rdi",
        "jmp 2b",
        guest_control = const super::super::percpu::RUN_GUEST_CONTROL,
        host_state = const super::super::percpu::RUN_HOST_STATE,
        handler = sym super::exit::svm_exit,
    );
}

/// Leaves guest mode for good on this CPU: loads the guest's state into
/// the processor, clears EFER.SVME and continues at the guest's RIP with
/// its registers. `rdi` = `RunState`, `rsi` = `LeaveState`.
///
/// # Safety
/// Host mode; the guest state must be a valid native state whose page
/// tables map this code and the host stack identically (true for the
/// firmware before the OS starts, the only time thinhv leaves).
#[unsafe(naked)]
pub unsafe extern "sysv64" fn svm_leave(
    run: *const super::super::percpu::RunState,
    st: *const LeaveState,
) -> ! {
    naked_asm!(
        "mov rax, [rdi + {guest_control}]",
        "vmload rax",
        "stgi",
        "mov rax, [rsi + 128]",
        "mov cr2, rax",
        "mov rax, [rsi + 16]",
        "mov cr4, rax",
        "mov rax, [rsi + 8]",
        "mov cr3, rax",
        "mov rax, [rsi + 0]",
        "mov cr0, rax",
        "mov ecx, 0x277",
        "mov rax, [rsi + 136]",
        "mov rdx, rax",
        "shr rdx, 32",
        "wrmsr",
        "mov ecx, 0xc0000080",
        "mov rax, [rsi + 24]",
        "mov rdx, rax",
        "shr rdx, 32",
        "wrmsr",
        // LGDT/LIDT from packed copies on the stack.
        "sub rsp, 16",
        "mov ax, [rsi + 32]",
        "mov [rsp], ax",
        "mov rax, [rsi + 40]",
        "mov [rsp + 2], rax",
        "lgdt [rsp]",
        "mov ax, [rsi + 48]",
        "mov [rsp], ax",
        "mov rax, [rsi + 56]",
        "mov [rsp + 2], rax",
        "lidt [rsp]",
        "add rsp, 16",
        "mov rax, [rsi + 80]",
        "mov ds, ax",
        "mov rax, [rsi + 88]",
        "mov es, ax",
        // IRETQ frame: SS, RSP, RFLAGS, CS, RIP.
        "push qword ptr [rsi + 72]",
        "push qword ptr [rsi + 104]",
        "push qword ptr [rsi + 112]",
        "push qword ptr [rsi + 64]",
        "push qword ptr [rsi + 96]",
        "mov rax, [rsi + 120]",
        "mov rcx, [rdi + 8]",
        "mov rdx, [rdi + 16]",
        "mov rbx, [rdi + 24]",
        "mov rbp, [rdi + 40]",
        "mov r8,  [rdi + 64]",
        "mov r9,  [rdi + 72]",
        "mov r10, [rdi + 80]",
        "mov r11, [rdi + 88]",
        "mov r12, [rdi + 96]",
        "mov r13, [rdi + 104]",
        "mov r14, [rdi + 112]",
        "mov r15, [rdi + 120]",
        "mov rsi, [rdi + 48]",
        "mov rdi, [rdi + 56]",
        "iretq",
        guest_control = const super::super::percpu::RUN_GUEST_CONTROL,
    );
}
