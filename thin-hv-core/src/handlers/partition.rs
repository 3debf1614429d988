//! Appliance partitions claiming their processors.
use crate::env::Env;
use crate::partition::{PartitionId, PartitionState};

/// Every unclaimed appliance partition claims its processors: each gets a
/// virtual INIT (mailbox and wake-up, as `handlers::ipi` does for the OS's
/// own INITs) and from then on waits in thinhv, out of reach of every IPI
/// from another partition (`Hv::isolated`). Returns the processors
/// claimed.
pub fn claim_cpus(env: &mut impl Env) -> u64 {
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
                p.state().name()
            );
        }
    }
    env.publish_appliances();
    claimed
}
