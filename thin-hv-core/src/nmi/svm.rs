//! [`NmiTracker`] on a VMCB (AMD APM Vol. 2, rev. 3.42): what an exit
//! means for the guest's NMIs, and the intercepts, RFLAGS.TF, event
//! injection and virtual-interrupt window of the next entry. Pure: the
//! exit dispatcher (`arch::svm::exit`) calls [`on_exit`], runs the
//! handlers unless the exit was the NMI machinery's own, then
//! [`after_handlers`] and [`before_entry`].
use super::{DR6_BS, Guest, NmiTracker, StepExit, StepFix};
use crate::svm::exit_code::ExitCode;
use crate::svm::vmcb::{Vmcb, event, misc1};

/// RFLAGS.TF.
pub const RFLAGS_TF: u64 = 1 << 8;
/// `int_state` bit 0: interrupt shadow (APM Vol. 2 §15.21, Table B-1
/// offset 0x68).
const INTERRUPT_SHADOW: u64 = 1;
/// Intercept vector 3 bit 4: virtual interrupt (VINTR), Table B-1.
pub const INTERCEPT_VINTR: u32 = 1 << 4;
/// `int_ctl` (Table B-1 offset 0x60): V_IRQ (bit 8) and V_IGN_TPR
/// (bit 20). A virtual interrupt pending regardless of the virtual TPR is
/// taken at the guest's next interrupt window (RFLAGS.IF set, no shadow);
/// with the VINTR intercept it exits there instead of being delivered
/// (APM Vol. 2 §15.21).
pub const V_IRQ: u64 = 1 << 8;
/// See [`V_IRQ`].
pub const V_IGN_TPR: u64 = 1 << 20;

/// Exception vectors.
const DB: u8 = 1;
const NP: u8 = 11;
const SS: u8 = 12;
const GP: u8 = 13;
const PF: u8 = 14;
/// The exceptions that exit while an IRET is stepped: the #DB that ends
/// the step, and the faults the IRET itself can raise (#NP, #SS, #GP,
/// #PF), which would otherwise push thinhv's TF into a guest frame.
pub const STEP_EXCEPTIONS: u32 = 1 << DB | 1 << NP | 1 << SS | 1 << GP | 1 << PF;

/// EXITINTINFO `TYPE` values (APM Vol. 2 §15.7.2, same encoding as
/// EVENTINJ, §15.20).
const TYPE_MASK: u64 = 7 << 8;
const VECTOR_MASK: u64 = 0xff;

/// The EVENTINJ value that delivers again the event whose delivery an exit
/// interrupted (EXITINTINFO, APM Vol. 2 §15.7.2), or `None`.
///
/// Bits 12–30 are cleared (reserved in EVENTINJ). QEMU TCG labels every
/// interrupted external interrupt and NMI as an exception of its vector;
/// VMRUN refuses to inject an exception of vector 2 or above 31 (its
/// consistency checks), so such an entry is given back its real type: an
/// NMI for vector 2, an external interrupt above 31 (vectors 0–31 are
/// exceptions on the processor). Documented in `docs/emulator-faults.md`.
pub fn reinjection(exit_int_info: u64) -> Option<u64> {
    if exit_int_info & event::VALID == 0 {
        return None;
    }
    let mut e = exit_int_info & !(0x7_ffff << 12);
    if e & TYPE_MASK == event::TYPE_EXCEPTION {
        let vector = e & VECTOR_MASK;
        if vector == 2 {
            e = (e & !(TYPE_MASK | event::EV)) | event::TYPE_NMI;
            e &= 0xffff_ffff;
        } else if vector > 31 {
            e = (e & !(TYPE_MASK | event::EV)) | event::TYPE_INTR;
            e &= 0xffff_ffff;
        }
    }
    Some(e)
}

/// Whether an EVENTINJ value injects an NMI.
pub fn is_nmi(e: u64) -> bool {
    e & event::VALID != 0 && e & TYPE_MASK == event::TYPE_NMI
}

/// What an exit meant for the NMI machinery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    /// The exit was the NMI machinery's own (IRET, the interrupt window, an
    /// exception intercepted for a step): no handler has anything to do.
    pub owned: bool,
    /// EVENTINJ holds this re-injected NMI (for [`after_handlers`]).
    pub reinjected_nmi: Option<u64>,
}

/// First thing after an exit: queues the interrupted event again, undoes
/// what [`before_entry`] set up, and handles the exits the NMI machinery
/// asked for.
pub fn on_exit(t: &mut NmiTracker, vmcb: &mut Vmcb) -> Seen {
    let c = &mut vmcb.control;
    let again = reinjection(c.exit_int_info);
    c.event_inj = again.unwrap_or(0);
    let interrupted = again.is_some();
    let mut reinjected_nmi = None;
    if let Some(e) = again
        && is_nmi(e)
    {
        t.delivery_interrupted();
        reinjected_nmi = Some(e);
    }
    // The window is one-shot: no virtual interrupt may stay pending once
    // thinhv no longer intercepts it.
    c.int_ctl &= !(V_IRQ | V_IGN_TPR);
    c.intercept_misc1 &= !INTERCEPT_VINTR;

    let code = ExitCode(c.exit_code);
    let step_vector = code
        .0
        .checked_sub(ExitCode::EXCP_BASE.0)
        .and_then(|v| u8::try_from(v).ok())
        .filter(|v| *v < 32 && STEP_EXCEPTIONS & (1 << v) != 0);
    let mut owned = false;
    if matches!(t.phase(), super::Phase::Stepping(_)) {
        let exit = match step_vector {
            Some(DB) if vmcb.save.dr6 & DR6_BS != 0 => StepExit::Trapped { dr6: vmcb.save.dr6 },
            Some(_) => StepExit::Faulted,
            None => StepExit::Other,
        };
        let fix = t.step_exit(exit, vmcb.save.rip, interrupted);
        apply_fix(vmcb, fix, step_vector);
        owned = step_vector.is_some();
    } else if step_vector.is_some() {
        // Intercepted for a step that has ended since (an INIT reset the
        // tracker): give the guest its exception.
        apply_fix(
            vmcb,
            StepFix {
                reflect: !interrupted,
                ..StepFix::default()
            },
            step_vector,
        );
        owned = true;
    }
    match code {
        ExitCode::IRET => {
            let s = &vmcb.save;
            t.iret(s.rip, s.rflags & RFLAGS_TF != 0, s.dr6);
            owned = true;
        }
        ExitCode::VINTR => owned = true,
        _ => {}
    }
    Seen {
        owned,
        reinjected_nmi,
    }
}

fn apply_fix(vmcb: &mut Vmcb, fix: StepFix, vector: Option<u8>) {
    if let Some(tf) = fix.tf {
        vmcb.save.rflags = (vmcb.save.rflags & !RFLAGS_TF) | if tf { RFLAGS_TF } else { 0 };
    }
    if let Some(dr6) = fix.dr6 {
        vmcb.save.dr6 = dr6;
    }
    if fix.deliver_db {
        vmcb.control.event_inj = event::exception(DB, None);
    } else if fix.reflect
        && let Some(v) = vector
    {
        // The intercepted exception, as the processor would have delivered
        // it: its error code in EXITINFO1, for #PF the address in EXITINFO2
        // (CR2 is not written when #PF is intercepted), APM Vol. 2 §15.12.
        let code = matches!(v, NP | SS | GP | PF)
            .then(|| u32::try_from(vmcb.control.exit_info1 & 0xffff_ffff).unwrap_or(0));
        if v == PF {
            vmcb.save.cr2 = vmcb.control.exit_info2;
        }
        vmcb.control.event_inj = event::exception(v, code);
    }
}

/// After the handlers: an NMI re-injected at the exit that a handler
/// replaced with another event is owed again.
pub fn after_handlers(t: &mut NmiTracker, vmcb: &Vmcb, seen: Seen) {
    if let Some(e) = seen.reinjected_nmi
        && vmcb.control.event_inj != e
    {
        t.delivery_displaced();
    }
}

/// Last thing before VMRUN: injects an NMI the guest can take now and sets
/// the intercepts, TF and window the tracker's phase needs.
pub fn before_entry(t: &mut NmiTracker, vmcb: &mut Vmcb) {
    let g = Guest {
        rip: vmcb.save.rip,
        event_busy: vmcb.control.event_inj & event::VALID != 0,
        shadow: vmcb.control.int_state & INTERRUPT_SHADOW != 0,
    };
    let e = t.entry(g);
    let c = &mut vmcb.control;
    if e.inject {
        c.event_inj = event::nmi();
    }
    set(&mut c.intercept_misc1, misc1::IRET, e.iret_exit);
    set(&mut c.intercept_exceptions, STEP_EXCEPTIONS, e.step);
    if e.step {
        vmcb.save.rflags |= RFLAGS_TF;
    }
    set(&mut c.intercept_misc1, INTERCEPT_VINTR, e.window);
    if e.window {
        c.int_ctl |= V_IRQ | V_IGN_TPR;
    } else {
        c.int_ctl &= !(V_IRQ | V_IGN_TPR);
    }
}

/// Clears everything [`before_entry`] may have set (INIT).
pub fn clear(vmcb: &mut Vmcb) {
    let c = &mut vmcb.control;
    c.intercept_misc1 &= !(misc1::IRET | INTERCEPT_VINTR);
    c.intercept_exceptions &= !STEP_EXCEPTIONS;
    c.int_ctl &= !(V_IRQ | V_IGN_TPR);
}

fn set(word: &mut u32, bits: u32, on: bool) {
    if on {
        *word |= bits;
    } else {
        *word &= !bits;
    }
}
