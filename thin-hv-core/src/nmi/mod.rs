//! The guest's NMIs on a processor that does not track the guest's NMI
//! blocking itself: AMD SVM without NMI virtualization. Vendor-neutral
//! bookkeeping; [`svm`] applies it to a VMCB.
//!
//! On bare metal an NMI blocks further NMIs from its delivery until the
//! next IRET (any IRET, even one of a nested exception handler); one NMI
//! that arrives meanwhile is latched and delivered right after that IRET,
//! more are lost (SDM Vol. 3A §6.7.1; AMD APM Vol. 2 §8.2.3). Under SVM
//! every physical NMI exits (the NMI intercept) and thinhv hands the
//! guest's own NMIs over through event injection, which does not make the
//! processor block NMIs for the guest: the VMM tracks that (APM Vol. 2
//! §15.20). [`NmiTracker`] does:
//!
//! * An NMI is injected only while the guest is [`Phase::Open`]; injecting
//!   one makes it [`Phase::Blocked`]. NMIs that arrive while it is not
//!   open are counted, at most one (the latch); while open but not
//!   injectable yet (an event already being injected, an interrupt shadow),
//!   at most two (the one being delivered and the latched one).
//! * While blocked the guest's IRETs exit (intercept vector 3, bit 20,
//!   APM Vol. 2 Table B-1). The intercept is taken before the IRET
//!   executes: its RIP is the IRET's. thinhv then lets it run with the
//!   single-step trap armed ([`Phase::Stepping`]): RFLAGS.TF set at its
//!   start raises #DB right after it, even though it loads RFLAGS itself
//!   (SDM Vol. 3B §18.3.1.4; APM Vol. 2 §13.1.3.3), and that #DB exits.
//!   The guest is open again exactly when the IRET completed, where a
//!   latched NMI is injected before the next instruction, as the hardware
//!   delivers it. No NRIP save is needed (the TCG test bed has none).
//! * The step is undone before anything else sees the guest: TF goes back
//!   to the guest's value, DR6 loses the BS bit thinhv caused, and a #DB
//!   the guest caused itself (its own TF, breakpoints) is delivered to it.
//!   If the IRET faults instead, the fault is reflected to the guest and
//!   NMIs stay blocked (the IRET did not complete); the fault handler's own
//!   IRET then unblocks them, as on the processor.
//! * An NMI whose injection an exit interrupted (EXITINTINFO, APM Vol. 2
//!   §15.7.2) is injected again before anything else and the guest stays
//!   blocked; if a handler replaces it with another event, it goes back to
//!   the pending count. Nothing is lost and nothing doubled.
//! * When an NMI is owed but cannot be injected at this entry (the
//!   event-injection field is busy, the guest is in an interrupt shadow, or
//!   the step cannot be armed), the backend asks for an exit at the guest's
//!   next interrupt window ([`Entry::window`]) and tries again there.
#[cfg(test)]
mod tests;

pub mod svm;

/// DR6.BS: the #DB was a single-step trap (SDM Vol. 3B §18.2.3).
pub const DR6_BS: u64 = 1 << 14;

/// NMIs owed to a blocked guest: the processor latches one.
const MAX_PENDING_BLOCKED: u8 = 1;
/// NMIs owed to an open guest that cannot take one at this entry: the one
/// about to be delivered and the one latched behind it.
const MAX_PENDING_OPEN: u8 = 2;

/// Where the guest stands with respect to NMIs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Not blocking NMIs: one can be injected.
    Open,
    /// In an NMI handler since thinhv injected the NMI: blocking NMIs
    /// until its next IRET, which exits.
    Blocked,
    /// At that IRET, executing it with the single-step trap armed.
    Stepping(Step),
}

/// The IRET being stepped over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    /// Its address (the RIP of the IRET exit).
    pub rip: u64,
    /// RFLAGS.TF as the guest had it at the IRET.
    pub guest_tf: bool,
    /// DR6 as the guest had it at the IRET.
    pub dr6: u64,
    /// Whether TF is set for the entry under way (else the step waits for
    /// an interrupt window, see [`NmiTracker::entry`]).
    pub armed: bool,
}

/// What the guest looks like at an entry, as far as injection cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Guest {
    /// Its RIP.
    pub rip: u64,
    /// An event is already queued for this entry (a re-injection, an
    /// exception a handler raised).
    pub event_busy: bool,
    /// It is in the interrupt shadow of an STI or MOV SS.
    pub shadow: bool,
}

/// What the next entry needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    /// Inject an NMI now.
    pub inject: bool,
    /// Exit before the guest's next IRET.
    pub iret_exit: bool,
    /// Single-step the instruction at RIP (TF, with #DB and the faults it
    /// can raise exiting).
    pub step: bool,
    /// Exit at the guest's next interrupt window.
    pub window: bool,
}

/// How an exit ended a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepExit {
    /// A #DB exit with DR6 (as the processor left it) having BS: the
    /// stepped instruction completed.
    Trapped {
        /// DR6 at the exit.
        dr6: u64,
    },
    /// A #DB without BS (an instruction breakpoint on the IRET) or another
    /// intercepted exception: the IRET did not complete.
    Faulted,
    /// Any other exit: the IRET has not run yet.
    Other,
}

/// What the backend must change after a step ended or was interrupted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepFix {
    /// Put RFLAGS.TF back to this (the guest's).
    pub tf: Option<bool>,
    /// Put DR6 back to this.
    pub dr6: Option<u64>,
    /// Deliver a #DB to the guest (its own trap or breakpoint).
    pub deliver_db: bool,
    /// Deliver the exception this exit intercepted to the guest.
    pub reflect: bool,
}

/// One CPU's guest NMI state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NmiTracker {
    pending: u8,
    phase: Phase,
}

impl Default for NmiTracker {
    fn default() -> Self {
        Self::new()
    }
}

impl NmiTracker {
    /// Open, nothing pending (the state after INIT or reset).
    pub const fn new() -> Self {
        Self {
            pending: 0,
            phase: Phase::Open,
        }
    }

    /// The phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// NMIs owed to the guest and not yet injected.
    pub fn pending(&self) -> u8 {
        self.pending
    }

    /// INIT: nothing pending, nothing blocked.
    pub fn reset(&mut self) {
        *self = Self::new();
    }

    /// An NMI for the guest arrived. Returns `false` when it is lost, as
    /// the processor loses an NMI when one is latched already.
    pub fn arrived(&mut self) -> bool {
        let max = if self.phase == Phase::Open {
            MAX_PENDING_OPEN
        } else {
            MAX_PENDING_BLOCKED
        };
        if self.pending < max {
            self.pending += 1;
            true
        } else {
            false
        }
    }

    /// The exit interrupted the delivery of an NMI thinhv injected; it is
    /// injected again and the guest stays blocked.
    pub fn delivery_interrupted(&mut self) {
        if matches!(self.phase, Phase::Open) {
            self.phase = Phase::Blocked;
        }
    }

    /// That NMI was replaced by another event before the entry: it never
    /// reached the guest, which is open and owed it.
    pub fn delivery_displaced(&mut self) {
        self.phase = Phase::Open;
        self.pending = (self.pending + 1).min(MAX_PENDING_OPEN);
    }

    /// The guest is about to execute an IRET at `rip` (an IRET exit), with
    /// TF and DR6 as given. Returns whether the exit was expected (the
    /// guest was blocked); an unexpected one only needs the intercept off.
    pub fn iret(&mut self, rip: u64, tf: bool, dr6: u64) -> bool {
        if self.phase != Phase::Blocked {
            return false;
        }
        self.phase = Phase::Stepping(Step {
            rip,
            guest_tf: tf,
            dr6,
            armed: false,
        });
        true
    }

    /// An exit while stepping, at `rip`, `interrupted` when EXITINTINFO
    /// shows an event whose delivery the exit cut short. Returns what to
    /// undo or deliver; the phase moves on.
    pub fn step_exit(&mut self, exit: StepExit, rip: u64, interrupted: bool) -> StepFix {
        let Phase::Stepping(s) = self.phase else {
            return StepFix::default();
        };
        if !s.armed {
            // No trap was armed (a shadow or a busy injection at the last
            // entry): the IRET ran unwatched once RIP moved.
            if rip != s.rip {
                self.phase = Phase::Open;
            }
            return StepFix::default();
        }
        match exit {
            StepExit::Trapped { dr6 } if !interrupted => {
                // The IRET completed and loaded the guest's RFLAGS. BS is
                // thinhv's unless the guest stepped too; other new bits
                // (a data breakpoint the IRET's reads hit) are the guest's.
                let ours = if s.guest_tf { 0 } else { DR6_BS };
                let guest = (dr6 & !s.dr6) & !ours;
                self.phase = Phase::Open;
                StepFix {
                    tf: None,
                    dr6: Some(s.dr6 | guest),
                    deliver_db: guest != 0,
                    reflect: false,
                }
            }
            StepExit::Trapped { .. } | StepExit::Faulted => {
                // The IRET did not complete (or an event delivery was cut
                // short, which the re-injection repeats): still blocked.
                self.phase = Phase::Blocked;
                StepFix {
                    tf: Some(s.guest_tf),
                    dr6: None,
                    deliver_db: false,
                    reflect: !interrupted,
                }
            }
            StepExit::Other => {
                self.phase = Phase::Stepping(Step { armed: false, ..s });
                StepFix {
                    tf: Some(s.guest_tf),
                    ..StepFix::default()
                }
            }
        }
    }

    /// Decides the next entry: injects when the guest can take an NMI,
    /// else arranges the exit that will let it.
    pub fn entry(&mut self, g: Guest) -> Entry {
        let mut e = Entry::default();
        match self.phase {
            Phase::Open => {
                if self.pending > 0 {
                    if g.event_busy || g.shadow {
                        e.window = true;
                    } else {
                        self.pending -= 1;
                        self.phase = Phase::Blocked;
                        e.inject = true;
                        e.iret_exit = true;
                    }
                }
            }
            Phase::Blocked => e.iret_exit = true,
            Phase::Stepping(s) => {
                if g.event_busy {
                    // Another event is delivered before the IRET; stepping
                    // now would push TF into its frame. Its handler's IRET
                    // exits first and unblocks NMIs, as on the processor.
                    self.phase = Phase::Blocked;
                    e.iret_exit = true;
                } else if g.shadow {
                    // After MOV SS the processor suppresses the trap after
                    // the next instruction: watch for RIP to move instead.
                    self.phase = Phase::Stepping(Step { armed: false, ..s });
                    e.window = self.pending > 0;
                } else {
                    self.phase = Phase::Stepping(Step { armed: true, ..s });
                    e.step = true;
                }
            }
        }
        e
    }
}
