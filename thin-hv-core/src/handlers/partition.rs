//! Appliance partitions claiming their processors.
use crate::env::Env;
use crate::partition::{PartitionId, PartitionState};
use thinhv_abi::hypercall::Status;
use thinhv_abi::status::{ControlCommand, ControlOp, ControlResult};

/// Every unclaimed appliance partition claims its processors: each gets a
/// virtual INIT (mailbox and wake-up, as `handlers::ipi` does for the OS's
/// own INITs) and from then on waits in thinhv, out of reach of every IPI
/// from another partition (`Hv::isolated`). Returns the processors
/// claimed.
pub fn claim_cpus(env: &mut impl Env) -> u64 {
    // Before any appliance runs: interrupt remapping (where the IOMMU
    // does it, every message judged from now on names an entry), then the
    // OS's I/O APIC entries, the firmware's included, judged (naming
    // entries where the IOMMU remaps them).
    env.start_interrupt_remapping();
    super::ioapic::load_all(env);
    let mut claimed = 0u64;
    let n = env.hv().cpus().len();
    for id in (1u8..)
        .take(thinhv_abi::handoff::MAX_APPLIANCES)
        .map(PartitionId)
    {
        if !env
            .hv()
            .appliance(id)
            .is_some_and(|p| p.transition(PartitionState::UNCLAIMED, PartitionState::STOPPED))
        {
            continue;
        }
        let mut cpus = 0;
        let bootable = env.hv().appliance(id).is_some_and(|p| {
            p.info.entry_rip != 0 && p.transition(PartitionState::STOPPED, PartitionState::STARTING)
        });
        // The state the claim left it in: once posted, its first
        // processor may be running it before the line below is written.
        let state = if bootable {
            PartitionState::STARTING
        } else {
            PartitionState::STOPPED
        };
        for i in 0..n {
            let slot = &env.hv().cpus()[i];
            if slot.partition != id || !slot.virtualized() {
                continue;
            }
            let apic_id = slot.apic_id;
            if bootable && cpus == 0 {
                // Its first processor starts the kernel; the others wait
                // for its INIT-SIPI-SIPI, as on a machine of their own.
                slot.mailbox.post_boot();
            }
            slot.mailbox.post_init();
            env.kick_for_init(apic_id);
            cpus += 1;
        }
        claimed += cpus;
        if let Some(p) = env.hv().appliance(id) {
            log::info!(
                "appliance {:?} (partition {}): {cpus} processor(s) claimed, state {}",
                p.name(),
                id.0,
                state.name()
            );
        }
    }
    env.publish_appliances();
    claimed
}

/// A request the OS wrote to the control doorbell
/// (`thinhv appliance stop|start|restart`, `docs/appliances.md`). Who may
/// write it inside the OS is the OS's business (the doorbell is reached
/// through `/dev/mem`, root only); what thinhv enforces is the vendor's
/// `control = "none"`, which no OS, however privileged, gets past.
pub fn control(env: &mut impl Env, word: u64) -> ControlResult {
    let seq = u32::try_from((word >> 16) & 0xffff_ffff).unwrap_or(0);
    let done = |status| ControlResult { seq, status };
    let Some(cmd) = ControlCommand::decode(word) else {
        log::warn!("appliance control: {word:#x} is not a request; ignored");
        return done(Status::INVALID_ARGUMENT);
    };
    let id = PartitionId(cmd.partition);
    let Some(p) = env.hv().appliance(id).filter(|_| !id.is_os()) else {
        log::warn!(
            "appliance control: {} of partition {}: no such appliance",
            cmd.op.name(),
            id.0
        );
        return done(Status::INVALID_ARGUMENT);
    };
    if !p.os_may_control() {
        log::warn!(
            "appliance {:?}: {} from the OS refused (control = \"none\")",
            p.name(),
            cmd.op.name()
        );
        return done(Status::NOT_PERMITTED);
    }
    if !p.claimed() {
        return done(Status::NOT_PERMITTED);
    }
    log::info!(
        "appliance {:?}: {} requested by the OS (cpu {}), state {}",
        p.name(),
        cmd.op.name(),
        env.cpu_index(),
        p.state().name()
    );
    if matches!(cmd.op, ControlOp::Stop | ControlOp::Restart) {
        stop(env, id, "stopped from the OS");
    }
    if matches!(cmd.op, ControlOp::Start | ControlOp::Restart) {
        start(env, id);
    }
    env.publish_appliances();
    done(Status::OK)
}

/// Stops appliance `id`: every processor of it gets a virtual INIT and
/// waits in thinhv (those already waiting stay). Nothing happens to one
/// already stopped.
pub fn stop(env: &mut impl Env, id: PartitionId, why: &str) {
    let Some(p) = env.hv().appliance(id) else {
        return;
    };
    if p.stop().is_none() {
        return;
    }
    p.set_reason(why);
    quiesce_devices(env, id);
    park(env, id, None);
}

/// Appliance `id` crashed (`why`): a processor of it faulted (`on_cpu`,
/// which parks on its own way out), or a device under it was lost (its
/// VF reset with the OS's PF; any processor may run this). Only a running
/// appliance crashes (a sibling that faults while the first is being
/// handled, or during a restart, just stops): it is marked crashed, its
/// functions quiesced and its processors stopped, and with
/// `on_crash = "restart"` its first processor is asked to boot it again
/// (its functions reset first).
pub fn crash(env: &mut impl Env, id: PartitionId, why: &str, on_cpu: Option<usize>) {
    let Some(p) = env.hv().appliance(id) else {
        return;
    };
    if !p.transition(PartitionState::RUNNING, PartitionState::CRASHED) {
        return;
    }
    match on_cpu {
        Some(cpu) => log::error!(
            "appliance {:?}: crashed on cpu {cpu} ({why}); its processors are stopped, the OS runs on",
            p.name()
        ),
        None => log::error!(
            "appliance {:?}: crashed ({why}); its processors are stopped, the OS runs on",
            p.name()
        ),
    }
    p.crashes.fetch_add(1, core::sync::atomic::Ordering::SeqCst);
    p.set_reason(why);
    let restart = p.info.flags & thinhv_abi::handoff::partition_flags::RESTART_ON_CRASH != 0;
    quiesce_devices(env, id);
    park(env, id, on_cpu);
    if restart {
        if let Some(p) = env.hv().appliance(id) {
            log::warn!(
                "appliance {:?}: restarting ({} restart(s) so far)",
                p.name(),
                p.restarts.load(core::sync::atomic::Ordering::SeqCst) + 1
            );
        }
        start(env, id);
    }
    env.publish_appliances();
}

/// Every processor of appliance `id` (but `except`, which parks on its
/// own way out) gets a virtual INIT and the wake-up to take it: it then
/// waits in thinhv.
pub fn park(env: &mut impl Env, id: PartitionId, except: Option<usize>) {
    for i in 0..env.hv().cpus().len() {
        let slot = &env.hv().cpus()[i];
        if Some(i) != except && slot.partition == id && slot.virtualized() {
            let apic_id = slot.apic_id;
            slot.mailbox.post_init();
            env.kick_for_init(apic_id);
        }
    }
}

/// Starts appliance `id` if it is stopped or crashed: its first processor
/// is asked to boot it, which (once every other processor of it waits)
/// scrubs its RAM and restores its image unless the image was never run.
/// A running or starting appliance is left alone.
pub fn start(env: &mut impl Env, id: PartitionId) {
    let Some(p) = env.hv().appliance(id) else {
        return;
    };
    if !p.transition(PartitionState::STOPPED, PartitionState::STARTING)
        && !p.transition(PartitionState::CRASHED, PartitionState::STARTING)
    {
        return;
    }
    if let Some(slot) = env
        .hv()
        .cpus()
        .iter()
        .find(|s| s.partition == id && s.virtualized())
    {
        // It waits in thinhv, or will once it takes the INIT a stop
        // posted before this; a processor polls its mailbox while it
        // waits, so no wake-up is needed.
        slot.mailbox.post_boot();
    }
}

/// Quiesces appliance `id`'s PCI functions (bus mastering and INTx off,
/// MSI and MSI-X disabled): a stopped appliance's device must not write
/// into RAM thinhv is about to scrub and fill again, nor interrupt anyone.
/// No waiting (an OS processor runs this on a stop); the reset comes
/// before the appliance boots again ([`reset_devices`]).
pub fn quiesce_devices(env: &mut impl Env, id: PartitionId) {
    let Some(p) = env.hv().appliance(id) else {
        return;
    };
    let devices = p.info.devices;
    let n = p.info.devices().len();
    for d in &devices[..n] {
        let q = super::appliance_pci::quiesce(env, d);
        let name = env.hv().appliance(id).map_or("", |p| p.name());
        let bdf = thinhv_passthrough::pci::Bdf::from_rid(0, d.rid);
        if let Some(q) = q {
            log::info!("appliance {name:?}: stopped: PCI {bdf}: {q}");
        }
    }
}

/// Quiesces and resets appliance `id`'s PCI functions and puts their BARs
/// back (`thinhv_passthrough::reset`), logging what each did: run on the
/// appliance's own first processor before it boots again, while the
/// others wait. False when a function did not come back as its driver
/// expects it (not answering, or its BARs not restored).
pub fn reset_devices(env: &mut impl Env, id: PartitionId) -> bool {
    let Some(p) = env.hv().appliance(id) else {
        return true;
    };
    let (devices, tsc_khz) = (p.info.devices, p.info.tsc_khz);
    let n = p.info.devices().len();
    let mut ok = true;
    for d in &devices[..n] {
        let bdf = thinhv_passthrough::pci::Bdf::from_rid(0, d.rid);
        let t0 = env.tsc();
        let report = super::appliance_pci::reset(env, d, tsc_khz);
        let khz = if tsc_khz == 0 {
            super::appliance_pci::TSC_KHZ_UNKNOWN
        } else {
            tsc_khz
        };
        let ms = env.tsc().wrapping_sub(t0) / khz;
        let name = env.hv().appliance(id).map_or("", |p| p.name());
        if let Some(r) = report {
            ok &= r.ok();
            if r.reset_seen == Some(false) {
                log::warn!("appliance {name:?}: PCI {bdf}: {r} ({ms} ms)");
            } else {
                log::info!("appliance {name:?}: PCI {bdf}: {r} ({ms} ms)");
            }
        } else {
            ok = false;
            log::error!("appliance {name:?}: PCI {bdf}: not answering; not reset");
        }
    }
    ok
}
