//! The OS's accesses to a PF whose VFs it shares with appliances
//! (`thinhv_passthrough::shared_pf`, `docs/appliances.md`, "VFs"): its
//! SR-IOV registers are a view, the device keeps the loader's setup; a
//! reset of the PF that took the VFs (the OS's Function Level Reset, or
//! any other that clears VF Enable) is seen at the OS's next access to the
//! PF, the setup written again, and every appliance with a VF of it
//! restarted (its VF lost its state with the PF).
use crate::env::Env;
use crate::partition::PartitionId;
use thinhv_abi::handoff::{MAX_SHARED_PFS, PciMediation, SharedPf};
use thinhv_passthrough::mediate::all_ones;
use thinhv_passthrough::pci::Bdf;
use thinhv_passthrough::shared_pf::{Setup, View};

/// What the core keeps of one shared PF.
#[derive(Clone, Copy, Debug, Default)]
pub struct State {
    /// The OS's SR-IOV registers.
    pub view: View,
    /// Time-stamp of the OS's Function Level Reset of the PF, until the
    /// setup is back (0: none pending).
    pub reset_at: u64,
    /// A processor is writing the setup back.
    pub provisioning: bool,
}

/// The states of the hand-off's shared PFs, as the OS first sees them.
pub fn initial(pci: &thinhv_abi::handoff::PciHandoff) -> [State; MAX_SHARED_PFS] {
    core::array::from_fn(|i| State {
        view: pci
            .shared()
            .get(i)
            .map(|s| setup_of(s).initial_view())
            .unwrap_or_default(),
        reset_at: 0,
        provisioning: false,
    })
}

/// The pure setup of a hand-off entry.
pub fn setup_of(s: &SharedPf) -> Setup {
    Setup {
        cap: s.cap,
        os_vfs: s.os_vfs,
        initial_vfs: s.initial_vfs,
        num_vfs: s.num_vfs,
        control: s.control,
        page_size: s.page_size,
        vf_bars: s.vf_bars,
        vf_bar_masks: s.vf_bar_masks,
    }
}

/// A function leaves a Function Level Reset within 100 ms (PCIe Base 6.0
/// §6.6.2); the setup is written back no earlier.
const FLR_MS: u64 = 100;

/// The OS's access of `size` bytes at `offset` of the shared PF `m`
/// (`write`: the value it stores); `device` performs an access of the
/// same offset and size on the device (`Some`: a store). Returns what a
/// load reads.
pub(super) fn access<E: Env>(
    env: &mut E,
    m: &PciMediation,
    offset: u16,
    size: u8,
    write: Option<u32>,
    device: impl FnOnce(&mut E, Option<u32>) -> u32,
) -> u32 {
    let i = usize::from(m.reserved);
    let Some(s) = env.hv().pci.shared().get(i).copied() else {
        return all_ones(size);
    };
    let setup = setup_of(&s);
    recover(env, m, i, &s, &setup);
    let Some(value) = write else {
        let view = env.hv().shared_pfs.lock()[i].view;
        return setup.read(&view, offset, size, || device(env, None));
    };
    let pf = Bdf::from_rid(0, s.rid);
    // The OS's Function Level Reset of the PF: it happens (the OS's
    // driver recovers its PF that way), and takes the VFs with it.
    let flr = s.devctl != 0
        && super::appliance_pci::byte_at(offset, size, value, s.devctl + 1)
            .is_some_and(|b| b & 0x80 != 0);
    let outcome = {
        let mut st = env.hv().shared_pfs.lock();
        let o = setup.write(&mut st[i].view, offset, size, value);
        if flr {
            st[i].view = setup.view_after_reset();
        }
        o
    };
    if flr {
        let t = env.tsc();
        env.hv().shared_pfs.lock()[i].reset_at = t.max(1);
        log::warn!(
            "PCI {pf}: Function Level Reset by the OS; it resets the PF's VFs, an appliance's too"
        );
    }
    if let Some(v) = outcome.forward {
        device(env, Some(v));
    }
    if let Some(r) = outcome.refused {
        super::pcicfg::report(env, m, r);
    }
    if let Some(on) = outcome.vf_enable {
        log::info!(
            "PCI {pf}: the OS turned its VFs {} (its view; the device keeps VF Enable for an appliance's VF)",
            if on { "on" } else { "off" }
        );
    }
    0
}

/// Writes the setup back into a PF that lost it (VF Enable clear: a
/// reset), once an FLR the OS started has had its 100 ms, and restarts
/// every appliance with a VF of it.
fn recover(env: &mut impl Env, m: &PciMediation, i: usize, s: &SharedPf, setup: &Setup) {
    let page = env.hv().pci.page_of(m);
    let khz = env
        .hv()
        .appliances()
        .find_map(|(_, p)| (p.info.tsc_khz != 0).then_some(p.info.tsc_khz))
        .unwrap_or(super::appliance_pci::TSC_KHZ_UNKNOWN);
    {
        // One processor writes it back; the others go on meanwhile.
        let mut st = env.hv().shared_pfs.lock();
        let control = (env.mmio_read(page + u64::from(s.cap) + 8, 2) & 0xffff) as u16;
        if st[i].provisioning
            || !setup.lost(control)
            || (st[i].reset_at != 0 && env.tsc().wrapping_sub(st[i].reset_at) < FLR_MS * khz)
        {
            return;
        }
        st[i].provisioning = true;
    }
    for w in setup.provision() {
        env.mmio_write(page + u64::from(w.offset), w.size, w.value);
    }
    {
        let mut st = env.hv().shared_pfs.lock();
        st[i].reset_at = 0;
        st[i].provisioning = false;
    }
    let pf = Bdf::from_rid(0, s.rid);
    log::warn!(
        "PCI {pf}: its VFs were reset with it (VF Enable read clear); NumVFs {} and VF Enable written again",
        s.num_vfs
    );
    let ids: [Option<(PartitionId, u16)>; thinhv_abi::handoff::MAX_APPLIANCES] = {
        let mut out = [None; thinhv_abi::handoff::MAX_APPLIANCES];
        for (k, (id, p)) in env.hv().appliances().enumerate() {
            if let Some(d) = p.info.devices().iter().find(|d| d.pf_rid == s.rid)
                && k < out.len()
            {
                out[k] = Some((id, d.rid));
            }
        }
        out
    };
    for (id, vf) in ids.into_iter().flatten() {
        let name = env.hv().appliance(id).map_or("", |p| p.name());
        log::warn!(
            "appliance {name:?}: its VF {} was reset with its PF {pf}",
            Bdf::from_rid(0, vf)
        );
        super::partition::crash(env, id, "its VF was reset with its PF", None);
    }
}
