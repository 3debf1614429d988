//! The VMX world switch in assembly: first launch, the exit entry point
//! with VMRESUME, and leaving VMX operation for good.
//!
//! Guest GPRs except RSP live in [`RunState::regs`](crate::arch::percpu::RunState)
//! (RAX included); RSP and RIP in the VMCS. The host stack's top slot
//! (`HOST_RSP`) holds the pointer to the CPU's `RunState`.
use core::arch::naked_asm;

/// Executes VMLAUNCH with RAX = 0 (the guest's status at its resume
/// point). Returns only if the instruction fails (1).
///
/// # Safety
/// The current VMCS is complete and checked; its guest state resumes the
/// loader, its host state is the core's.
#[unsafe(naked)]
pub unsafe extern "sysv64" fn vmx_launch() -> u64 {
    naked_asm!("xor eax, eax", "vmlaunch", "mov eax, 1", "ret");
}

/// The VM-exit entry point (`HOST_RIP`).
///
/// # Safety
/// Only the processor jumps here, on a VM exit, with RSP = `HOST_RSP`.
#[unsafe(naked)]
pub unsafe extern "sysv64" fn vmx_exit_stub() -> ! {
    naked_asm!(
        "push rax",
        "mov rax, [rsp + 8]",
        "mov [rax + 8], rcx",
        "mov [rax + 16], rdx",
        "mov [rax + 24], rbx",
        "mov [rax + 40], rbp",
        "mov [rax + 48], rsi",
        "mov [rax + 56], rdi",
        "mov [rax + 64], r8",
        "mov [rax + 72], r9",
        "mov [rax + 80], r10",
        "mov [rax + 88], r11",
        "mov [rax + 96], r12",
        "mov [rax + 104], r13",
        "mov [rax + 112], r14",
        "mov [rax + 120], r15",
        "pop rcx",
        "mov [rax], rcx",
        "mov rdi, rax",
        "call {handler}",
        "mov rax, [rsp]",
        "mov rcx, [rax + 8]",
        "mov rdx, [rax + 16]",
        "mov rbx, [rax + 24]",
        "mov rbp, [rax + 40]",
        "mov rsi, [rax + 48]",
        "mov rdi, [rax + 56]",
        "mov r8,  [rax + 64]",
        "mov r9,  [rax + 72]",
        "mov r10, [rax + 80]",
        "mov r11, [rax + 88]",
        "mov r12, [rax + 96]",
        "mov r13, [rax + 104]",
        "mov r14, [rax + 112]",
        "mov r15, [rax + 120]",
        "mov rax, [rax]",
        "vmresume",
        // VMRESUME failed: report (never returns).
        "mov rdi, [rsp]",
        "call {failed}",
        "ud2",
        handler = sym super::exit::vmx_exit,
        failed = sym super::exit::vmx_resume_failed,
    );
}

/// What `vmx_leave` restores (all fields 8 bytes).
#[derive(Debug, Default)]
#[repr(C)]
pub struct VmxLeave {
    /// +0..+120: control registers, descriptor tables, selectors, RIP,
    /// RSP, RFLAGS.
    pub native: crate::arch::vcpu::NativeState,
    /// +120
    pub fs: u64,
    /// +128
    pub gs: u64,
    /// +136
    pub tr: u64,
    /// +144
    pub ldtr: u64,
    /// +152
    pub fs_base: u64,
    /// +160
    pub gs_base: u64,
    /// +168
    pub pat: u64,
}

const _: () = {
    use core::mem::offset_of;
    assert!(offset_of!(VmxLeave, native) == 0);
    assert!(offset_of!(VmxLeave, fs) == 120);
    assert!(offset_of!(VmxLeave, ldtr) == 144);
    assert!(offset_of!(VmxLeave, pat) == 168);
};

/// Loads the guest's state into the processor (VMX already off) and
/// continues at its RIP with its registers from `run`.
///
/// # Safety
/// After VMXOFF, with CR4.VMXE clear, before the loader seals: the guest's
/// page tables map this code and stack identically (firmware).
#[unsafe(naked)]
pub unsafe extern "sysv64" fn vmx_leave(
    run: *const super::super::percpu::RunState,
    st: *const VmxLeave,
) -> ! {
    naked_asm!(
        "mov rax, [rsi + 16]",
        "mov cr4, rax",
        "mov rax, [rsi + 8]",
        "mov cr3, rax",
        "mov rax, [rsi + 0]",
        "mov cr0, rax",
        "mov ecx, 0x277",
        "mov rax, [rsi + 168]",
        "mov rdx, rax",
        "shr rdx, 32",
        "wrmsr",
        "mov ecx, 0xc0000080",
        "mov rax, [rsi + 24]",
        "mov rdx, rax",
        "shr rdx, 32",
        "wrmsr",
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
        "mov rax, [rsi + 120]",
        "mov fs, ax",
        "mov rax, [rsi + 128]",
        "mov gs, ax",
        "mov rax, [rsi + 144]",
        "lldt ax",
        "mov rax, [rsi + 136]",
        "test ax, ax",
        "jz 2f",
        "ltr ax",
        "2:",
        "mov ecx, 0xc0000100",
        "mov rax, [rsi + 152]",
        "mov rdx, rax",
        "shr rdx, 32",
        "wrmsr",
        "mov ecx, 0xc0000101",
        "mov rax, [rsi + 160]",
        "mov rdx, rax",
        "shr rdx, 32",
        "wrmsr",
        // IRETQ frame: SS, RSP, RFLAGS, CS, RIP.
        "push qword ptr [rsi + 72]",
        "push qword ptr [rsi + 104]",
        "push qword ptr [rsi + 112]",
        "push qword ptr [rsi + 64]",
        "push qword ptr [rsi + 96]",
        "mov rax, [rdi]",
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
    );
}
