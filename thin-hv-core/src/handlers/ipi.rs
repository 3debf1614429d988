//! INIT and STARTUP IPIs aimed at virtualized CPUs become mailbox posts;
//! every other IPI goes to the APIC unchanged.
//!
//! The target is made to exit (an NMI on SVM, a real INIT on VMX, see
//! `Env::kick_for_init`); it then waits for the SIPI in host mode and
//! starts in real mode at the vector of the first SIPI.
//!
//! A CPU not under thinhv (an APIC ID thinhv does not know: one the
//! firmware reported disabled, or none at all; or a known CPU that is not
//! virtualized) gets the real INIT or SIPI, addressed to it alone, only
//! until the loader seals the hypervisor: that is how the firmware's MP
//! services start the processors thinhv then virtualizes (the BSP first,
//! then every AP). After the seal such an IPI is refused, counted
//! ([`Hv::refused_ipis`](crate::hv::Hv)) and logged (the first few, then
//! every 1024th, so a guest cannot flood the log): a CPU the OS could start
//! natively would run outside the second-level tables and could reprogram
//! the IOMMU. Broadcasts never reach the hardware as broadcasts (thinhv
//! sends one IPI per known CPU), and INIT/SIPI in logical destination mode
//! are not resolved and never sent (Intel SDM Vol. 3A §11.6.1, §11.6.2: a
//! logical destination may name any set of processors, disabled ones
//! included).
//!
//! Partitions: no IPI crosses from one partition to another once the
//! target's partition has claimed its processors (`Hv::isolated`). INIT
//! and STARTUP to such a CPU are refused like those to unknown CPUs; any
//! other IPI (fixed, NMI, SMI, lowest priority) to it is dropped and
//! counted ([`Hv::cross_partition_ipis`](crate::hv::Hv)); the shorthands
//! "all including self" and "all excluding self" (and the physical
//! broadcast ID) are sent as one physical IPI per CPU of the sender's own
//! partition. A logical destination never reaches the APIC as one either:
//! thinhv resolves it against the logical IDs of the sender's partition
//! (in xAPIC mode the ones each CPU's kernel wrote, which thinhv keeps; in
//! x2APIC mode the ones the processor derives from the APIC ID, SDM Vol.
//! 3A §12.12.10.2) and sends one physical IPI per CPU it names. An
//! appliance in x2APIC mode has a non-zero logical ID the hardware fixes,
//! and an xAPIC sender's 0xFF reaches x2APIC processors as a broadcast, so
//! an unresolved logical IPI from the OS could reach it.
use super::Outcome;
use crate::apic::{DeliveryMode, Destination, Icr, physical_icr, reg};
use crate::env::Env;
use core::sync::atomic::Ordering;

/// Refused INIT/SIPI logged one by one; after that every 1024th.
const LOG_FIRST: u64 = 8;

/// Handles a guest write to the ICR (`value` as the 64-bit ICR; for xAPIC
/// the destination sits in bits 56–63). Returns [`Outcome::WaitForSipi`]
/// when the guest sent INIT to its own CPU.
pub fn icr_write(env: &mut impl Env, value: u64, x2apic: bool) -> Outcome {
    let icr = Icr::decode(value, x2apic);
    if !icr.is_init_or_sipi() {
        if env.hv().has_appliances() {
            route_within_partition(env, value, &icr, x2apic);
        } else {
            forward(env, value, x2apic);
        }
        return Outcome::Resume;
    }
    if icr.is_init_deassert() {
        return Outcome::Resume;
    }
    let me = env.cpu_index();
    let guest_high = (!x2apic).then(|| env.lapic_read(reg::ICR_HIGH));
    let mut outcome = Outcome::Resume;
    match icr.dest {
        Destination::Logical(d) => {
            refuse(
                env,
                &icr,
                format_args!("logical destination {d:#x}"),
                "logical destination mode is not virtualized",
            );
        }
        Destination::SelfOnly => {
            if icr.mode == DeliveryMode::INIT {
                outcome = Outcome::WaitForSipi;
            }
        }
        Destination::Physical(id) => {
            if env.hv().cpu_by_apic_id(id) == Some(me) {
                if icr.mode == DeliveryMode::INIT {
                    outcome = Outcome::WaitForSipi;
                }
            } else {
                deliver(env, id, &icr, x2apic);
            }
        }
        Destination::AllIncludingSelf | Destination::AllExcludingSelf => {
            let n = env.hv().cpus().len();
            let from = env.hv().space_of(me);
            for i in 0..n {
                if i == me || env.hv().isolated(from, i) {
                    continue;
                }
                let id = env.hv().cpus()[i].apic_id;
                deliver(env, id, &icr, x2apic);
            }
            if icr.dest == Destination::AllIncludingSelf && icr.mode == DeliveryMode::INIT {
                outcome = Outcome::WaitForSipi;
            }
        }
    }
    if let Some(high) = guest_high {
        // Leave the destination register as the guest wrote it.
        env.lapic_write(reg::ICR_HIGH, high);
    }
    outcome
}

fn deliver(env: &mut impl Env, apic_id: u32, icr: &Icr, x2apic: bool) {
    let hv = env.hv();
    let from = hv.space_of(env.cpu_index());
    match hv.cpu_by_apic_id(apic_id) {
        Some(i) if hv.isolated(from, i) => {
            refuse(
                env,
                icr,
                format_args!("APIC {apic_id:#x}"),
                "the CPU belongs to another partition",
            );
        }
        Some(i) if hv.cpus()[i].virtualized() => {
            let slot = &hv.cpus()[i];
            if icr.mode == DeliveryMode::INIT {
                slot.mailbox.post_init();
                log::debug!("cpu {}: virtual INIT to apic {apic_id}", env.cpu_index());
                env.kick_for_init(apic_id);
            } else {
                let taken = slot.mailbox.post_sipi(icr.vector);
                log::debug!(
                    "cpu {}: virtual SIPI {:#x} to apic {apic_id} ({})",
                    env.cpu_index(),
                    icr.vector,
                    if taken { "taken" } else { "ignored" }
                );
            }
        }
        known if hv.is_sealed() => {
            let why = if known.is_some() {
                "the CPU is not under thinhv"
            } else {
                "no CPU under thinhv has this APIC ID"
            };
            refuse(env, icr, format_args!("APIC {apic_id:#x}"), why);
        }
        _ => {
            // Not under thinhv yet, before the seal: the firmware starting
            // an AP. The real IPI, to this CPU only.
            forward(
                env,
                physical_icr(apic_id, icr.mode, icr.vector, x2apic) | level_bits(icr),
                x2apic,
            );
        }
    }
}

/// A non-INIT/SIPI IPI while appliances exist: to the sender's own
/// partition only.
fn route_within_partition(env: &mut impl Env, value: u64, icr: &Icr, x2apic: bool) {
    let me = env.cpu_index();
    let from = env.hv().space_of(me);
    let guest_high = (!x2apic).then(|| env.lapic_read(reg::ICR_HIGH));
    match icr.dest {
        Destination::Logical(d) => {
            for i in 0..env.hv().cpus().len() {
                if !logical_match(env.hv(), from, d, i, x2apic) {
                    continue;
                }
                let id = env.hv().cpus()[i].apic_id;
                forward(
                    env,
                    physical_icr(id, icr.mode, icr.vector, x2apic) | level_bits(icr),
                    x2apic,
                );
                if icr.mode == DeliveryMode::LOWEST {
                    break;
                }
            }
        }
        Destination::SelfOnly => forward(env, value, x2apic),
        Destination::Physical(id) => match env.hv().cpu_by_apic_id(id) {
            Some(t) if env.hv().isolated(from, t) => drop_crossing(env, icr, id),
            _ => forward(env, value, x2apic),
        },
        Destination::AllIncludingSelf | Destination::AllExcludingSelf => {
            let n = env.hv().cpus().len();
            for i in 0..n {
                if (i == me && icr.dest == Destination::AllExcludingSelf)
                    || env.hv().isolated(from, i)
                {
                    continue;
                }
                let id = env.hv().cpus()[i].apic_id;
                let one = physical_icr(id, icr.mode, icr.vector, x2apic) | level_bits(icr);
                forward(env, one, x2apic);
            }
        }
    }
    if let Some(high) = guest_high {
        env.lapic_write(reg::ICR_HIGH, high);
    }
}

/// Whether CPU `cpu` is in reach of partition `part` and named by the
/// logical destination `dest`. An xAPIC destination (8 bits) is matched
/// against the logical ID and model the CPU's kernel wrote (flat: a bit
/// mask; cluster: cluster in bits 4–7, mask in bits 0–3; SDM Vol. 3A
/// §11.6.2.2), an x2APIC one (32 bits, cluster in bits 16–31, mask in bits
/// 0–15, all ones a broadcast) against the logical ID the processor
/// derives from its APIC ID (§12.12.10.2). An appliance's CPU counts only
/// once it runs in its partition.
pub(crate) fn logical_match(
    hv: &crate::hv::Hv,
    part: crate::partition::PartitionId,
    dest: u32,
    cpu: usize,
    x2apic: bool,
) -> bool {
    let Some(c) = hv.cpus().get(cpu) else {
        return false;
    };
    if hv.isolated(part, cpu) || (!part.is_os() && !c.entered.load(Ordering::SeqCst)) {
        return false;
    }
    if x2apic {
        let id = c.apic_id;
        return dest == u32::MAX || (dest >> 16 == id >> 4 && dest & (1 << (id & 0xf)) != 0);
    }
    let id = c.vldr.load(Ordering::SeqCst) >> 24;
    let flat = c.vdfr.load(Ordering::SeqCst) >> 28 == 0xf;
    let d = dest & 0xff;
    if flat {
        id & d != 0
    } else {
        d == 0xff || (id >> 4 == d >> 4 && id & d & 0xf != 0)
    }
}

/// Counts (and logs, rate-limited) an IPI dropped at a partition border.
fn drop_crossing(env: &impl Env, icr: &Icr, apic_id: u32) {
    let n = env
        .hv()
        .cross_partition_ipis
        .fetch_add(1, Ordering::Relaxed)
        + 1;
    if n <= LOG_FIRST || n.is_multiple_of(1024) {
        log::warn!(
            "cpu {}: IPI (mode {}, vector {:#x}) to APIC {apic_id:#x} dropped: another \
             partition's CPU ({n} dropped so far)",
            env.cpu_index(),
            icr.mode.0,
            icr.vector
        );
    }
}

/// Counts a refused INIT or SIPI and logs it (rate-limited).
fn refuse(env: &impl Env, icr: &Icr, target: core::fmt::Arguments<'_>, why: &str) {
    let n = env.hv().refused_ipis.fetch_add(1, Ordering::Relaxed) + 1;
    if n <= LOG_FIRST || n.is_multiple_of(1024) {
        log::warn!(
            "cpu {}: {} to {target} refused: {why} ({n} refused so far)",
            env.cpu_index(),
            if icr.mode == DeliveryMode::INIT {
                "INIT"
            } else {
                "STARTUP"
            }
        );
    }
}

fn level_bits(icr: &Icr) -> u64 {
    if icr.level_triggered { 1 << 15 } else { 0 }
}

fn forward(env: &mut impl Env, value: u64, x2apic: bool) {
    if x2apic {
        env.x2apic_icr_write(value);
    } else {
        env.lapic_write(reg::ICR_HIGH, ((value >> 32) & 0xffff_ffff) as u32);
        env.lapic_write(reg::ICR_LOW, (value & 0xffff_ffff) as u32);
    }
}
