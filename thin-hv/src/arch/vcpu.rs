//! The neutral vCPU layer: what every backend does the same way around an
//! exit and around a CPU's life — claiming a CPU at launch, the state
//! transitions the status page shows, counting a handled exit, carrying
//! out its outcome, the INIT → SIPI sequence, and roll-back.
//!
//! The backends (`svm::exit`, `vmx::exit`) keep only what differs between
//! AMD and Intel, behind [`Backend`]: where the guest's registers live,
//! how the INIT state is written into the control block, how a SIPI starts
//! the guest, how the second-level TLB is flushed, how guest mode is left
//! for good, and what a fatal report names.
use super::core_state::{Core, percpu};
use super::idt::fatal;
use super::instr::{cpuid, rdmsr, reset_platform, wrmsr};
use super::percpu::{GuestRegs, PerCpu, RunState};
use crate::handlers::{Handled, Outcome};
use crate::hv::CpuSlot;
use crate::partition::PartitionState;
use core::fmt;
use core::sync::atomic::Ordering;
use thinhv_abi::exit::ExitReason;
use thinhv_abi::handoff::CoreError;
use thinhv_abi::status::CpuState;

/// What a CPU continues with natively when it leaves guest mode for good,
/// the part both backends restore alike (all fields 8 bytes; the offsets
/// are part of `svm_leave` and `vmx_leave`, which find it first in their
/// leave state).
#[derive(Debug, Default)]
#[repr(C)]
pub struct NativeState {
    /// +0
    pub cr0: u64,
    /// +8
    pub cr3: u64,
    /// +16: without the backend's enable bit (CR4.VMXE on VMX).
    pub cr4: u64,
    /// +24: without the backend's enable bit (EFER.SVME on SVM).
    pub efer: u64,
    /// +32
    pub gdt_limit: u64,
    /// +40
    pub gdt_base: u64,
    /// +48
    pub idt_limit: u64,
    /// +56
    pub idt_base: u64,
    /// +64
    pub cs: u64,
    /// +72
    pub ss: u64,
    /// +80
    pub ds: u64,
    /// +88
    pub es: u64,
    /// +96
    pub rip: u64,
    /// +104
    pub rsp: u64,
    /// +112
    pub rflags: u64,
}

const _: () = assert!(core::mem::size_of::<NativeState>() == 120);

/// The one vendor seam of the exit path.
pub trait Backend {
    /// The guest's general-purpose registers that the control block does
    /// not hold.
    fn regs(&mut self) -> &mut GuestRegs;
    /// Discards the guest's cached second-level translations on this CPU.
    fn flush_tlb(&mut self, core: &Core);
    /// Writes the architectural INIT state into the control block (the
    /// neutral layer resets the registers). Returns whether this CPU must
    /// wait in the host for its SIPI; `false` when the processor waits by
    /// itself and exits on the SIPI (VMX wait-for-SIPI activity state).
    fn enter_init(&mut self, core: &Core, cpu: usize) -> bool;
    /// The SIPI has arrived in the host wait, before the guest starts.
    /// Returns how many physical NMIs (wake-ups) it took in host mode
    /// just now; a backend whose host NMI handler leaves them for the next
    /// exit (VMX) takes none here.
    fn sipi_arrived(&mut self, _core: &Core, _cpu: usize) -> u32 {
        0
    }
    /// Starts the guest in real mode at the SIPI vector's page.
    fn start_at(&mut self, core: &Core, cpu: usize, vector: u8);
    /// Makes this CPU run in partition `p`'s address space (second-level
    /// root, I/O map) from its next entry; called before every start of
    /// an appliance processor.
    fn enter_partition(&mut self, core: &Core, cpu: usize, slat_root: u64, iopm_pa: u64);
    /// Starts the guest in 64-bit mode at an appliance's entry (the Linux
    /// 64-bit boot protocol). Returns false where the backend cannot.
    fn start_long(&mut self, core: &Core, cpu: usize, entry: &LongEntry) -> bool;
    /// Leaves guest mode on this CPU for good and continues natively where
    /// the guest was, with RAX = `rax` if given (roll-back before the
    /// seal). The neutral layer did the bookkeeping.
    fn leave(&mut self, core: &Core, cpu: usize, rax: Option<u64>) -> !;
    /// Names the exit in a fatal report (exit code, qualification, RIP).
    fn describe(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result;
    /// Just before the guest runs again (pending NMIs handed over).
    fn before_entry(&mut self, core: &Core, cpu: usize);
}

/// Where an appliance's first processor starts (guest-physical).
#[derive(Clone, Copy, Debug)]
pub struct LongEntry {
    /// RIP.
    pub rip: u64,
    /// RSI (the zero page).
    pub rsi: u64,
    /// CR3 (identity map).
    pub cr3: u64,
    /// GDT base (limit `APPLIANCE_GDT_LIMIT`, code 0x10, data 0x18).
    pub gdt: u64,
    /// RSP: a stack below the boot structures.
    pub rsp: u64,
}

/// The host NMI handler took an NMI on this CPU: counted in its shared
/// slot for the exit path (never its `PerCpu`, which the interrupted exit
/// may hold as `&mut`); where the backend can (a live VMCS), it asks for an
/// exit as soon as the guest runs. No logging: the interrupted code may
/// hold the logger.
pub fn host_nmi_taken(slot: &CpuSlot) {
    slot.host_nmis.fetch_add(1, Ordering::SeqCst);
    if slot.vmx_live.load(Ordering::SeqCst) {
        super::vmx::exit::arm_nmi_window();
    }
}

/// This processor's initial APIC ID (CPUID 0xB when it reports one, else
/// CPUID 1).
pub fn apic_id() -> u32 {
    if cpuid(0, 0)[0] >= 0xb && cpuid(0xb, 0)[1] != 0 {
        cpuid(0xb, 0)[3]
    } else {
        cpuid(1, 0)[1] >> 24
    }
}

/// The checks every backend makes before virtualizing CPU `cpu`: it is
/// known, not virtualized yet, and the one running this code.
pub fn claim(core: &Core, cpu: u64) -> Result<(usize, &CpuSlot), CoreError> {
    let idx = usize::try_from(cpu).map_err(|_| CoreError::BAD_CPU)?;
    let slot = core.hv.cpus().get(idx).ok_or(CoreError::BAD_CPU)?;
    let here = apic_id();
    if slot.virtualized() || slot.apic_id != here {
        log::error!(
            "cpu {idx}: refused (state {}, APIC ID {here} expected {})",
            slot.state().name(),
            slot.apic_id
        );
        return Err(CoreError::BAD_CPU);
    }
    if u64::from(core.handoff.config.debug_fail_cpu) == cpu {
        log::warn!("cpu {idx}: refusing on purpose ([debug] fail_cpu)");
        return Err(CoreError::INJECTED_FAILURE);
    }
    Ok((idx, slot))
}

/// CPU `idx`'s `PerCpu`, zeroed, with its host GDT and TSS.
///
/// # Safety
/// Only CPU `idx` itself calls this, at launch, while nothing (no guest, no
/// handler, no other reference) uses its `PerCpu`.
pub unsafe fn fresh_percpu(core: &Core, idx: usize) -> &'static mut PerCpu {
    // SAFETY: the caller's contract: this CPU's own `PerCpu`, not in use.
    let pc: &mut PerCpu = unsafe { &mut *percpu(core, idx) };
    // SAFETY: `pc` is plain memory carved from the pool for this CPU; every
    // field is valid as zeros.
    unsafe {
        core::ptr::write_bytes(
            core::ptr::from_mut(pc).cast::<u8>(),
            0,
            core::mem::size_of::<PerCpu>(),
        );
    };
    pc.init_gdt();
    pc
}

/// The world-switch state at launch: no registers yet, no exits, no NMI
/// held; the control block (VMCB or VMCS) and the host-state block (SVM's
/// VMSAVE area; none on VMX) at `control_pa` and `host_pa`.
pub fn init_run(run: &mut RunState, cpu: u64, control_pa: u64, host_pa: u64) {
    run.regs = [0; 16];
    run.guest_control_pa = control_pa;
    run.host_state_pa = host_pa;
    run.cpu = cpu;
    run.exits = 0;
    run.nmi_pending = 0;
}

/// Records CPU `cpu`'s state for the handlers and on the status page.
pub fn set_state(core: &Core, cpu: usize, state: CpuState) {
    core.hv.cpus()[cpu].set_state(state);
    core.status.set_cpu_state(cpu, state);
}

/// CPU `cpu` is about to enter guest mode for the first time.
pub fn went_online(core: &Core, cpu: usize) {
    set_state(core, cpu, CpuState::RUNNING);
    let n = core.hv.cpus_virtualized.fetch_add(1, Ordering::SeqCst) + 1;
    core.status.set_virtualized(n);
}

/// CPU `cpu` is no longer under thinhv (its launch failed, or roll-back).
pub fn went_offline(core: &Core, cpu: usize) {
    set_state(core, cpu, CpuState::OFFLINE);
    let n = core.hv.cpus_virtualized.fetch_sub(1, Ordering::SeqCst) - 1;
    core.status.set_virtualized(n);
}

/// Leaves guest mode on this CPU for good: bookkeeping, then the backend's
/// way out, with RAX = `rax` if given.
pub fn roll_back(core: &Core, cpu: usize, b: &mut impl Backend, rax: Option<u64>) -> ! {
    went_offline(core, cpu);
    b.leave(core, cpu, rax)
}

/// Counts a handled exit on the status page (and mirrors the count of
/// discarded writes when this exit added one).
pub fn account(core: &Core, cpu: usize, handled: &Handled) {
    core.status.count(cpu, handled.reason);
    if handled.reason == ExitReason::PROTECTED_ACCESS {
        core.status
            .set_blocked_writes(core.hv.blocked_writes.load(Ordering::Relaxed));
    }
}

/// Carries out what the handlers decided, then prepares the entry.
pub fn apply(core: &Core, cpu: usize, outcome: Outcome, b: &mut impl Backend) {
    // Nothing an appliance does stops the machine: what would reset the
    // platform or stop thinhv on an OS processor stops the appliance.
    let outcome = match outcome {
        Outcome::Reset | Outcome::Fatal(_) if !core.hv.space_of(cpu).is_os() => {
            let why = match outcome {
                Outcome::Fatal(w) => w,
                _ => "triple fault",
            };
            crash_partition(core, cpu, why);
            Outcome::WaitForSipi
        }
        o => o,
    };
    match outcome {
        Outcome::Resume => {}
        Outcome::ResumeFlushTlb => b.flush_tlb(core),
        Outcome::WaitForSipi => init_then_sipi(core, cpu, b),
        Outcome::StartAt(vector) => start(core, cpu, vector, b),
        Outcome::Devirtualize => {
            log::info!("cpu {cpu}: leaving guest mode (roll-back)");
            roll_back(core, cpu, b, None);
        }
        Outcome::Reset => {
            log::error!("resetting the platform after a guest triple fault");
            reset_platform();
        }
        Outcome::HostFaultTest => {
            // SAFETY: UD2 only raises #UD, which the host IDT reports before
            // stopping or resetting per `on_fatal`; this is the test of it.
            unsafe { core::arch::asm!("ud2", options(nomem, nostack)) };
        }
        Outcome::Fatal(why) => fatal(format_args!("{why} ({})", Describe(&*b))),
    }
    b.before_entry(core, cpu);
}

/// INIT on this CPU: the INIT state, then the wait for a SIPI (here or in
/// the processor), then real mode at its vector (SDM Vol. 3A §10.4.7.3,
/// APM Vol. 2 §15.21 and Table 14-1).
pub fn init_then_sipi(core: &Core, cpu: usize, b: &mut impl Backend) {
    set_state(core, cpu, CpuState::WAIT_FOR_SIPI);
    let regs = b.regs();
    *regs = [0; 16];
    // RDX after INIT holds the processor signature (CPUID 1 EAX).
    regs[2] = u64::from(cpuid(1, 0)[0]);
    let host_waits = b.enter_init(core, cpu);
    log::debug!("cpu {cpu}: INIT, waiting for SIPI");
    if !host_waits {
        return;
    }
    let slot = &core.hv.cpus()[cpu];
    // An INIT of its own posted nothing: the first SIPI counts from here.
    slot.mailbox.arm();
    let vector = loop {
        // A further INIT while waiting changes nothing.
        let _ = slot.mailbox.take_init();
        if slot.mailbox.take_boot() {
            let nmis = b.sipi_arrived(core, cpu);
            slot.mailbox.wakes_taken_in_host(nmis);
            // Started by thinhv, not by a SIPI: one sent to it later is
            // ignored (an INIT posted meanwhile arms it again).
            slot.mailbox.disarm();
            if boot_appliance(core, cpu, b) {
                return;
            }
            slot.mailbox.arm();
        }
        if let Some(v) = slot.mailbox.take_sipi() {
            break v;
        }
        core::hint::spin_loop();
    };
    let nmis = b.sipi_arrived(core, cpu);
    slot.mailbox.wakes_taken_in_host(nmis);
    core.status.count(cpu, ExitReason::SIPI);
    start(core, cpu, vector, b);
}

fn start(core: &Core, cpu: usize, vector: u8, b: &mut impl Backend) {
    enter_own_partition(core, cpu, b);
    b.start_at(core, cpu, vector);
    set_state(core, cpu, CpuState::RUNNING);
    log::debug!(
        "cpu {cpu}: SIPI {vector:#x}, starting at {:#x}",
        u64::from(vector) << 12
    );
}

/// An appliance processor runs in its partition's address space from its
/// first start after the claim on (the OS's processors keep theirs).
fn enter_own_partition(core: &Core, cpu: usize, b: &mut impl Backend) {
    let p = core.hv.partition_of(cpu);
    // Before its claim, the firmware still starts it (its ExitBootServices
    // wakes every processor): in the OS's address space.
    if !core
        .hv
        .appliance(p)
        .is_some_and(crate::partition::Partition::claimed)
    {
        return;
    }
    let root = core.appliance_slat[usize::from(p.0) - 1];
    if root != 0 {
        b.enter_partition(core, cpu, root, core.appliance_iopm_pa);
        let slot = &core.hv.cpus()[cpu];
        // Its kernel's logical IDs start from the reset values.
        slot.vldr.store(0, Ordering::SeqCst);
        slot.vdfr.store(u32::MAX, Ordering::SeqCst);
        slot.entered.store(true, Ordering::SeqCst);
        hand_over_apic_mode(core, p);
    }
}

/// A platform that enables x2APIC hands its processors over in that mode,
/// and Linux keeps it ("x2apic: enabled by BIOS"): told `noapic` (the
/// loader's, for a platform without an I/O APIC) it skips interrupt
/// remapping and the check that would switch back to xAPIC
/// (`docs/appliances.md`). Its EOI, timer and other registers are then
/// MSRs that never exit; the ICR MSR still does.
fn hand_over_apic_mode(core: &Core, p: crate::partition::PartitionId) {
    let Some(part) = core.hv.appliance(p) else {
        return;
    };
    if !part.wants_x2apic(cpuid(1, 0)[2] & (1 << 21) != 0) {
        return;
    }
    // SAFETY: IA32_APIC_BASE exists on every x86-64 processor.
    let base = unsafe { rdmsr(crate::apic::IA32_APIC_BASE) };
    for value in crate::apic::to_x2apic(base).into_iter().flatten() {
        // SAFETY: the processor has x2APIC (checked above) and `to_x2apic`
        // gives only architecturally valid transitions at the same base;
        // thinhv's own APIC accesses follow the mode (`HwEnv::x2apic`).
        unsafe { wrmsr(crate::apic::IA32_APIC_BASE, value) };
    }
    part.in_x2apic.store(true, Ordering::SeqCst);
}

/// Writes every appliance's record to the status page.
pub fn publish_appliances(core: &Core) {
    for (id, p) in core.hv.appliances() {
        let first = core
            .hv
            .cpus()
            .iter()
            .find(|c| c.partition == id)
            .map_or(u32::MAX, |c| c.apic_id);
        let mask = core
            .hv
            .cpus()
            .iter()
            .enumerate()
            .filter(|(i, c)| c.partition == id && *i < 64)
            .fold(0u64, |m, (i, _)| m | 1 << i);
        core.status
            .publish_appliance(usize::from(id.0) - 1, &p.record(first, mask));
    }
}

/// An appliance processor crashed (`why`): its partition crashes
/// ([`crate::handlers::partition::crash`]; this processor parks through
/// the caller's INIT wait).
fn crash_partition(core: &Core, cpu: usize, why: &str) {
    let Some(global) = super::core_state::get() else {
        return;
    };
    let id = core.hv.partition_of(cpu);
    let mut env = super::env_impl::HwEnv { core: global, cpu };
    crate::handlers::partition::crash(&mut env, id, why, Some(cpu));
}

/// Before an appliance boots again: once every other processor of it
/// waits in thinhv, its RAM is scrubbed and the copy of its image the
/// loader kept is put back. False (and the appliance crashed, with the
/// reason) when a processor does not stop or the copy does not fit.
fn renew_image(core: &Core, cpu: usize, p: &crate::partition::Partition) -> bool {
    let id = core.hv.partition_of(cpu);
    let failed = |why: &str| {
        log::error!("appliance {:?}: {why}; not started", p.name());
        p.set_reason(why);
        let _ = p.transition(PartitionState::STARTING, PartitionState::CRASHED);
        publish_appliances(core);
        false
    };
    // Every other processor of the partition parked (a few seconds at
    // most; one that never parks leaves the appliance crashed).
    let parked = |i: usize, s: &CpuSlot| {
        i == cpu || s.partition != id || !s.virtualized() || s.state() == CpuState::WAIT_FOR_SIPI
    };
    let mut spins = 0u64;
    while !core.hv.cpus().iter().enumerate().all(|(i, s)| parked(i, s)) {
        core::hint::spin_loop();
        spins += 1;
        if spins > 2_000_000_000 {
            return failed("a processor did not stop");
        }
    }
    // Its PCI functions quiesced, reset and their BARs put back (FLR
    // waits about 100 ms, on this processor, the appliance's own).
    if let Some(global) = super::core_state::get() {
        let mut env = super::env_impl::HwEnv { core: global, cpu };
        if !crate::handlers::partition::reset_devices(&mut env, id) {
            return failed("a PCI function of it did not come back from its reset");
        }
    }
    let ram = p.ram();
    // SAFETY: the appliance's RAM is in the core's identity map, belongs to
    // no one but the appliance, and none of its processors runs now.
    unsafe { core::ptr::write_bytes(ram.base as *mut u8, 0, ram.size as usize) };
    let mut from = p.info.image.base;
    for piece in p.info.pieces() {
        let at = thinhv_abi::handoff::appliance_ram_offset(ram.size, piece.base, piece.size);
        let Some(at) = at.filter(|_| from + piece.size <= p.info.image.end()) else {
            return failed("its image copy is inconsistent");
        };
        // SAFETY: both ranges are in the core's identity map: the image
        // copy the loader reserved for this appliance (hidden from the OS)
        // and the appliance's RAM (bounds checked just above); they do not
        // overlap.
        unsafe {
            core::ptr::copy_nonoverlapping(
                from as *const u8,
                (ram.base + at) as *mut u8,
                piece.size as usize,
            );
        }
        from += piece.size;
    }
    let n = p.restarts.fetch_add(1, Ordering::SeqCst) + 1;
    log::warn!(
        "appliance {:?}: starting again ({n} restart(s)): RAM scrubbed, image restored",
        p.name()
    );
    true
}

/// Starts this CPU at its appliance's entry (the loader laid the RAM out;
/// after the first run, [`renew_image`] lays it out again). False, with
/// the CPU still waiting, when the appliance is not to start after all (a
/// stop came first) or cannot.
fn boot_appliance(core: &Core, cpu: usize, b: &mut impl Backend) -> bool {
    let id = core.hv.partition_of(cpu);
    let (Some(p), Some(info)) = (
        core.hv.appliance(id),
        core.handoff
            .partitions()
            .get(usize::from(id.0).wrapping_sub(1)),
    ) else {
        return false;
    };
    if p.state() != PartitionState::STARTING {
        return false;
    }
    if core.appliance_slat[usize::from(id.0) - 1] == 0 {
        log::error!("appliance {:?}: no address space; stays stopped", p.name());
        let _ = p.transition(PartitionState::STARTING, PartitionState::STOPPED);
        return false;
    }
    if !p.fresh.swap(false, Ordering::SeqCst) && !renew_image(core, cpu, p) {
        return false;
    }
    enter_own_partition(core, cpu, b);
    let entry = LongEntry {
        rip: info.entry_rip,
        rsi: info.entry_rsi,
        cr3: info.entry_cr3,
        gdt: info.entry_gdt,
        rsp: info.entry_cr3,
    };
    if !b.start_long(core, cpu, &entry) {
        log::error!(
            "appliance {:?}: this backend cannot start it; stays stopped",
            p.name()
        );
        let _ = p.transition(PartitionState::STARTING, PartitionState::STOPPED);
        return false;
    }
    // SAFETY: RDTSC has no side effects.
    p.started_tsc
        .store(unsafe { core::arch::x86_64::_rdtsc() }, Ordering::SeqCst);
    // A stop that came meanwhile posted an INIT, which this CPU takes at
    // its first exit (the stop's kick makes one).
    let _ = p.transition(PartitionState::STARTING, PartitionState::RUNNING);
    set_state(core, cpu, CpuState::RUNNING);
    publish_appliances(core);
    log::info!(
        "appliance {:?}: cpu {cpu} starts its kernel at {:#x}",
        p.name(),
        entry.rip
    );
    true
}

struct Describe<'a, B: ?Sized>(&'a B);

impl<B: Backend + ?Sized> fmt::Display for Describe<'_, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.describe(f)
    }
}
