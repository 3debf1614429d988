//! Exit handling, written once for both vendors against [`GuestCpu`] and
//! [`Env`].
pub mod apic_reloc;
mod appliance_io;
mod appliance_pci;
mod cpuid;
mod cr_access;
mod debug_trap;
mod hpet;
mod hypercall;
pub mod ioapic;
mod ipi;
pub(crate) mod msi_remap;
pub mod msr;
pub mod msr_policy;
mod npf;
mod os_iommu;
pub mod partition;
pub(crate) mod pcicfg;
pub mod shared_pf;
mod xsetbv;

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod fake;
#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests;
#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests_apic_reloc;
#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests_hostile;
#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests_ioapic;
#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests_msr;
#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests_partition;
#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests_pcicfg;
#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests_vmx_tf;

pub use cpuid::{HvInfo, filter_cpuid, profile_cpuid};
pub use ipi::icr_write;
pub use pcicfg::trap_config_ports;

use crate::env::Env;
use crate::exit::Exit;
use crate::guest::{CpuMode, GuestCpu, vector};
use crate::guest_mem::fetch_instruction;
use crate::insn::{self, Decoded, decode};
use core::sync::atomic::Ordering;
use thinhv_abi::exit::ExitReason;

/// What the vendor loop does after a handler returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Re-enter the guest.
    Resume,
    /// Re-enter the guest after flushing this CPU's guest TLB (the
    /// second-level tables changed).
    ResumeFlushTlb,
    /// This CPU received INIT: put it in wait-for-SIPI, then start it in
    /// real mode at the SIPI vector.
    WaitForSipi,
    /// Leave guest mode and continue natively (loader roll-back).
    Devirtualize,
    /// The guest triple-faulted: reset the platform.
    Reset,
    /// Nothing sensible can continue on this CPU.
    Fatal(&'static str),
    /// Tests only: raise an exception in host mode (see
    /// `Function::DEBUG_HOST_FAULT`).
    HostFaultTest,
    /// A SIPI arrived for this CPU in wait-for-SIPI: start it in real mode
    /// at the vector's page (VMX).
    StartAt(u8),
}

/// A handled exit: what to do next and which counter to bump.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handled {
    /// Next step.
    pub outcome: Outcome,
    /// Counter.
    pub reason: ExitReason,
}

impl Handled {
    const fn new(outcome: Outcome, reason: ExitReason) -> Self {
        Self { outcome, reason }
    }
}

/// Handles one exit. The caller has already taken the physical NMI of
/// [`Exit::Nmi`] (vendor-specific; SVM: in its NMI sink, never with GIF
/// set in host mode), and [`GuestCpu::inject_nmi`] only owes the guest an
/// NMI, which the backend injects once the guest can take it. An instruction the handler completed
/// for the guest ends as on the processor (single-step trap, breakpoints,
/// interrupt shadow: [`debug_trap`]).
pub fn handle(exit: &Exit, cpu: &mut impl GuestCpu, env: &mut impl Env) -> Handled {
    let before = debug_trap::before(exit, cpu, env);
    let mut handled = dispatch(exit, cpu, env);
    debug_trap::after(exit, cpu, before, handled.outcome);
    // Where the OS has an IOMMU of its own, now and then (once a
    // millisecond at most) the real units' faults are collected and the
    // OS's own reported to it: at any of its exits, since in x2APIC mode
    // its EOIs and timer no longer exit.
    os_iommu::tick(env);
    // A page left the second-level tables (another processor trapped an
    // MSI-X table): this processor's cached translations go before it
    // resumes (`msi_remap::trap_pages_everywhere`).
    if handled.outcome == Outcome::Resume
        && env.hv().cpus()[env.cpu_index()]
            .flush_tlb
            .swap(false, Ordering::SeqCst)
    {
        handled.outcome = Outcome::ResumeFlushTlb;
    }
    handled
}

fn dispatch(exit: &Exit, cpu: &mut impl GuestCpu, env: &mut impl Env) -> Handled {
    let reason = exit.reason();
    match *exit {
        Exit::Cpuid => {
            cpuid::handle(cpu, env);
            Handled::new(advance_or_fault(cpu, env), reason)
        }
        Exit::Hypercall => Handled::new(hypercall::handle(cpu, env), reason),
        Exit::MsrRead { msr } => Handled::new(msr::read(cpu, env, msr), reason),
        Exit::MsrWrite { msr, value } => Handled::new(msr::write(cpu, env, msr, value), reason),
        Exit::NestedFault {
            gpa,
            write,
            fetch,
            present,
            ..
        } => npf::handle(cpu, env, gpa, write, fetch, present),
        Exit::VirtInstruction => {
            cpu.inject_exception(vector::UD, None);
            Handled::new(Outcome::Resume, reason)
        }
        Exit::Init => Handled::new(Outcome::WaitForSipi, reason),
        Exit::Sipi { vector } => Handled::new(Outcome::StartAt(vector), reason),
        Exit::Invd => {
            // Discarding the caches could lose the hypervisor's own data:
            // write them back instead (INVD's effect, minus the loss).
            env.wbinvd();
            Handled::new(advance_or_fault(cpu, env), reason)
        }
        Exit::CrWrite { cr, gpr } => Handled::new(cr_access::mov_to(cpu, env, cr, gpr), reason),
        Exit::CrRead { cr, gpr } => Handled::new(cr_access::mov_from(cpu, env, cr, gpr), reason),
        Exit::Clts => Handled::new(cr_access::cr0_op(cpu, env, crate::vmx::cr::clts), reason),
        Exit::Lmsw { source } => Handled::new(
            cr_access::cr0_op(cpu, env, |cr0| crate::vmx::cr::lmsw(cr0, source)),
            reason,
        ),
        Exit::TaskSwitch {
            selector,
            source,
            event,
            error_code,
            insn_len,
        } => {
            use crate::vmx::task_switch::{Request, Source, handle};
            let req = Request {
                selector,
                source: Source::from_qualification(source),
                event,
                error_code,
                insn_len,
            };
            Handled::new(handle(cpu, env, &req), reason)
        }
        Exit::TableMisconfig { gpa } => {
            log::error!(
                "cpu {}: second-level table misconfigured at {gpa:#x}",
                env.cpu_index()
            );
            Handled::new(
                Outcome::Fatal("second-level table misconfiguration"),
                reason,
            )
        }
        Exit::Nmi => {
            let mb = &env.hv().cpus()[env.cpu_index()].mailbox;
            let wakes = mb.take_wakes();
            if mb.take_init() {
                Handled::new(Outcome::WaitForSipi, ExitReason::INIT)
            } else {
                if wakes == 0 {
                    // A real NMI: the guest owns it.
                    cpu.inject_nmi();
                }
                Handled::new(Outcome::Resume, reason)
            }
        }
        Exit::Shutdown => {
            log::error!(
                "guest triple fault on cpu {} at rip {:#x}: resetting the platform",
                env.cpu_index(),
                cpu.rip()
            );
            Handled::new(Outcome::Reset, reason)
        }
        Exit::Xsetbv => Handled::new(xsetbv::handle(cpu, env), reason),
        Exit::PortIo {
            port,
            size,
            input,
            string,
        } => {
            if env.hv().space_of(env.cpu_index()).is_os() {
                Handled::new(pcicfg::port(cpu, env, port, size, input, string), reason)
            } else {
                // Its configuration ports as for the OS; any other port is
                // counted on its own (every port of an appliance exits).
                let reason = if (0xcf8..=0xcff).contains(&port) {
                    reason
                } else {
                    ExitReason::PORT_IO
                };
                Handled::new(
                    appliance_io::port(cpu, env, port, size, input, string),
                    reason,
                )
            }
        }
        Exit::EntryFailed { detail } => {
            log::error!(
                "VM entry failed on cpu {} (detail {detail:#x})",
                env.cpu_index()
            );
            Handled::new(Outcome::Fatal("VM entry failed"), reason)
        }
        Exit::Other { code, info1, info2 } => {
            log::error!(
                "unexpected exit {code:#x} (info {info1:#x} {info2:#x}) on cpu {} at rip {:#x}",
                env.cpu_index(),
                cpu.rip()
            );
            Handled::new(Outcome::Fatal("unexpected exit"), reason)
        }
    }
}

/// Decodes the instruction at the guest's RIP.
pub(crate) fn decode_current(cpu: &impl GuestCpu, env: &impl Env) -> Option<Decoded> {
    let mut bytes = [0u8; 15];
    let n = fetch_instruction(env, cpu, &mut bytes);
    decode(&bytes[..n], cpu.mode(), cpu.rip())
}

pub(crate) fn wrap_ip(mode: CpuMode, ip: u64) -> u64 {
    match mode {
        CpuMode::Bits16 => ip & 0xffff,
        CpuMode::Bits32 => ip & 0xffff_ffff,
        CpuMode::Bits64 => ip,
    }
}

/// Moves RIP past the current instruction (hardware hint, else decode).
pub(crate) fn advance(cpu: &mut impl GuestCpu, env: &impl Env) -> bool {
    if let Some(next) = cpu.next_rip_hint() {
        cpu.set_rip(next);
        return true;
    }
    let mut bytes = [0u8; 15];
    let n = fetch_instruction(env, cpu, &mut bytes);
    // The exit's own instruction without prefixes needs no decoder.
    let len = insn::exit_insn_len(&bytes[..n])
        .or_else(|| decode(&bytes[..n], cpu.mode(), cpu.rip()).map(|d| d.len()));
    match len {
        Some(len) => {
            let next = wrap_ip(cpu.mode(), cpu.rip().wrapping_add(len as u64));
            cpu.set_rip(next);
            true
        }
        None => false,
    }
}

/// [`advance`], or a #GP into the guest when the instruction cannot be read
/// (so a broken guest mapping never loops).
pub(crate) fn advance_or_fault(cpu: &mut impl GuestCpu, env: &impl Env) -> Outcome {
    if !advance(cpu, env) {
        log::warn!(
            "cpu {}: cannot decode instruction at {:#x}; injecting #GP",
            env.cpu_index(),
            cpu.rip()
        );
        cpu.inject_exception(vector::GP, Some(0));
    }
    Outcome::Resume
}
