//! PCI configuration accesses thinhv mediates (hidden functions, VF
//! budgets): loads and stores on the ECAM page of a mediated function
//! (nested page fault: the page is not present in the second-level
//! tables), and IN/OUT that touch the legacy configuration ports
//! 0xCF8..=0xCFF (I/O intercept, whenever anything is mediated).
//!
//! The legacy mechanism (PCI Local Bus Specification 3.0 §3.2.2.3.2) has
//! one address latch for the whole machine, which a check-then-access
//! scheme cannot trust: another CPU can change it between the check and
//! the access. So each CPU has its own latch ([`crate::hv::CpuSlot`]): a
//! dword OUT to 0xCF8 stores there, a dword IN reads it back, and the
//! hardware's latch is written only by thinhv, immediately before each
//! data-port access it performs, under [`crate::hv::Hv::legacy_config_lock`]
//! ([`Env::legacy_config_access`]). An access that straddles the data
//! window is split as a chipset splits it
//! ([`mediate::split_port_access`]): its data bytes are mediated like any
//! other, the rest is ordinary I/O.
//!
//! What an access returns or writes is decided by
//! [`thinhv_passthrough::mediate`]; everything it lets through reaches the
//! device with the guest's own width.
use super::{Outcome, advance, decode_current, wrap_ip};
use crate::env::Env;
use crate::guest::{Gpr, GuestCpu, vector};
use crate::insn::{Load, StoreSource};
use core::sync::atomic::Ordering;
use thinhv_abi::handoff::{
    PCI_ACTION_AMDVI_UNIT, PCI_ACTION_BRIDGE_GUARD, PCI_ACTION_HIDE, PCI_ACTION_PRESENT_VF,
    PCI_ACTION_VF_BUDGET, PCI_ACTION_VF_SHARED, PciMediation,
};
use thinhv_passthrough::mediate::{self, CONFIG_DATA, Policy, PortPiece, PortRole, Refusal};

/// The low 32 bits.
const fn low32(v: u64) -> u32 {
    (v & 0xffff_ffff) as u32
}

fn policy_of(m: &PciMediation) -> Policy {
    match m.action {
        PCI_ACTION_HIDE => Policy::Hidden,
        PCI_ACTION_BRIDGE_GUARD => Policy::BridgeGuard {
            pcie_cap: m.sriov_cap,
        },
        _ => Policy::VfBudget {
            cap: m.sriov_cap,
            os_vfs: m.os_vfs,
            initial_vfs: m.initial_vfs,
        },
    }
}

fn bdf(m: &PciMediation) -> (u8, u8, u8) {
    (m.bus, m.devfn >> 3, m.devfn & 7)
}

pub(super) fn report(env: &impl Env, m: &PciMediation, refusal: Refusal) {
    let count = env.hv().refused_pci_writes.fetch_add(1, Ordering::Relaxed) + 1;
    let (bus, dev, func) = bdf(m);
    match refusal {
        Refusal::NumVfsAboveBudget { asked, budget } => log::warn!(
            "PCI 0000:{bus:02x}:{dev:02x}.{func}: NumVFs = {asked} refused: the OS may use {budget} VFs ({count} refused writes)"
        ),
        Refusal::VfEnableAboveBudget { num_vfs, budget } => log::warn!(
            "PCI 0000:{bus:02x}:{dev:02x}.{func}: VF Enable with NumVFs = {num_vfs} refused: the OS may use {budget} VFs ({count} refused writes)"
        ),
        Refusal::BridgeReset => log::warn!(
            "PCI 0000:{bus:02x}:{dev:02x}.{func}: Secondary Bus Reset refused: it would take an NVMe PF thinhv keeps, and every secondary controller, offline ({count} refused writes)"
        ),
        Refusal::LinkDisable => log::warn!(
            "PCI 0000:{bus:02x}:{dev:02x}.{func}: Link Disable refused: it would take an NVMe PF thinhv keeps, and every secondary controller, offline ({count} refused writes)"
        ),
    }
}

/// The function the OS sees in place of `m` (a PF thinhv keeps), with its
/// index in `PciHandoff::presented`.
fn presented(
    env: &impl Env,
    m: &PciMediation,
) -> Option<(usize, thinhv_abi::handoff::PartitionDevice)> {
    let k = usize::from(m.reserved);
    (m.action == PCI_ACTION_PRESENT_VF)
        .then(|| env.hv().pci.presented.get(k).copied())
        .flatten()
        .filter(|d| d.rid != 0)
        .map(|d| (k, d))
}

/// The OS's function `m` whose MSI thinhv remaps: its owner record.
fn msi_owner(env: &impl Env, m: &PciMediation) -> Option<super::msi_remap::Owner> {
    m.remaps_msi()
        .then(|| {
            env.hv()
                .pci
                .mediated()
                .iter()
                .position(|x| x.bus == m.bus && x.devfn == m.devfn)
        })
        .flatten()
        .map(super::msi_remap::Owner::Os)
}

fn rid_of(m: &PciMediation) -> u16 {
    u16::from(m.bus) << 8 | u16::from(m.devfn)
}

/// An access to the OS's function `m` that the MSI remapping leaves
/// alone (`write`: the value a store writes; `device` performs it, `Some`
/// a store): through the SR-IOV view of a PF the OS shares with an
/// appliance, or the VF budget of its own PF, else to the device.
fn beneath<E: Env>(
    env: &mut E,
    m: &PciMediation,
    offset: u16,
    size: u8,
    write: Option<u32>,
    device: impl FnOnce(&mut E, Option<u32>) -> u32,
) -> u32 {
    match (m.action, write) {
        (PCI_ACTION_VF_SHARED, _) => super::shared_pf::access(env, m, offset, size, write, device),
        (PCI_ACTION_VF_BUDGET, _) => policed(env, m, offset, size, write, device),
        _ => device(env, write),
    }
}

/// An access to `m` as its policy has it (a VF budget, a hidden
/// function): a load reads through the policy; a store reaches the device
/// (`device`, `Some`) as far as the policy lets it, and a refusal is
/// reported. Returns what a load reads.
fn policed<E: Env>(
    env: &mut E,
    m: &PciMediation,
    offset: u16,
    size: u8,
    write: Option<u32>,
    device: impl FnOnce(&mut E, Option<u32>) -> u32,
) -> u32 {
    if m.action == PCI_ACTION_AMDVI_UNIT {
        return unit_function(env, m, offset, size, write, device);
    }
    let policy = policy_of(m);
    let Some(value) = write else {
        return mediate::read(&policy, offset, size, || device(env, None));
    };
    let w = mediate::write(&policy, offset, size, value, |reg| read16(env, m, reg));
    if let Some(v) = w.forward {
        device(env, Some(v));
    }
    if let Some(r) = w.refused {
        report(env, m, r);
    }
    0
}

/// An access to the real AMD-Vi unit's own function where the OS drives
/// an emulated unit in its place ([`mediate::UnitFunction`]): the MSI
/// registers are the OS's unit's copy, a load otherwise the device's
/// (NpCache shown), and no store reaches the device.
fn unit_function<E: Env>(
    env: &mut E,
    m: &PciMediation,
    offset: u16,
    size: u8,
    write: Option<u32>,
    device: impl FnOnce(&mut E, Option<u32>) -> u32,
) -> u32 {
    use crate::os_iommu::OsUnit;
    let view = mediate::UnitFunction {
        cap: m.sriov_cap,
        msi: m.source,
    };
    let control = if view.msi == 0 {
        0
    } else {
        read16(env, m, view.msi + 2)
    };
    let real = if write.is_none() {
        device(env, None)
    } else {
        0
    };
    let hv = env.hv();
    let mut units = hv.os_units.lock();
    let mut none = mediate::Msi::default();
    let msi = units
        .iter_mut()
        .find_map(|u| match u {
            OsUnit::AmdVi(a) => Some(&mut a.msi),
            OsUnit::Vtd(_) => None,
        })
        .unwrap_or(&mut none);
    match write {
        None => view.read(offset, size, real, control, msi),
        Some(v) => {
            view.write(offset, size, v, control, msi);
            0
        }
    }
}

/// Reads the 16-bit register `reg` of `m` through ECAM.
fn read16(env: &impl Env, m: &PciMediation, reg: u16) -> u16 {
    (env.mmio_read(env.hv().pci.page_of(m) + u64::from(reg), 2) & 0xffff) as u16
}

/// A load or store the guest made at `offset` of the ECAM page (at `gpa`)
/// of the mediated function `m`.
pub(super) fn ecam(
    cpu: &mut impl GuestCpu,
    env: &mut impl Env,
    gpa: u64,
    m: PciMediation,
    offset: u16,
) -> Outcome {
    let me = env.cpu_index();
    let Some(d) = decode_current(cpu, env) else {
        log::error!(
            "cpu {me}: cannot decode the configuration access at rip {:#x}; #GP",
            cpu.rip()
        );
        cpu.inject_exception(vector::GP, Some(0));
        return Outcome::Resume;
    };
    let next = wrap_ip(cpu.mode(), cpu.rip().wrapping_add(d.len() as u64));
    let fits =
        |size: u8| matches!(size, 1 | 2 | 4) && usize::from(offset) + usize::from(size) <= 4096;
    let shared = m.action == PCI_ACTION_VF_SHARED;
    let presented = presented(env, &m);
    let msi = msi_owner(env, &m);
    if let Some(load) = d.load().filter(|l| fits(l.size)) {
        let v = if let Some(owner) = msi {
            super::msi_remap::read(env, owner, rid_of(&m), offset & !3).map_or_else(
                || {
                    beneath(env, &m, offset, load.size, None, |env, _| {
                        env.mmio_read(gpa, load.size)
                    })
                },
                |v| (v >> (8 * (offset & 3))) & mediate::all_ones(load.size),
            )
        } else if let Some((k, dev)) = presented {
            super::appliance_pci::read(
                env,
                super::appliance_pci::Viewer::Os(k),
                &dev,
                offset,
                load.size,
            )
        } else if shared {
            super::shared_pf::access(env, &m, offset, load.size, None, |env, _| {
                env.mmio_read(gpa, load.size)
            })
        } else {
            policed(env, &m, offset, load.size, None, |env, _| {
                env.mmio_read(gpa, load.size)
            })
        };
        set_loaded(cpu, load, v);
    } else if let Some(store) = d.store().filter(|s| fits(s.size) && !s.exchange) {
        let value = match store.source {
            StoreSource::Immediate(v) => v,
            StoreSource::Register(r) => cpu.gpr(r),
        };
        let value = low32(value) & mediate::all_ones(store.size);
        if let Some(owner) = msi {
            super::msi_remap::store(
                env,
                owner,
                rid_of(&m),
                offset,
                store.size,
                value,
                |env, v| {
                    beneath(env, &m, offset, store.size, Some(v), |env, v| {
                        if let Some(v) = v {
                            env.mmio_write(gpa, store.size, v);
                        }
                        0
                    });
                },
            );
        } else if let Some((k, dev)) = presented {
            super::appliance_pci::write(
                env,
                super::appliance_pci::Viewer::Os(k),
                &dev,
                offset,
                store.size,
                value,
            );
        } else if shared {
            super::shared_pf::access(env, &m, offset, store.size, Some(value), |env, v| {
                if let Some(v) = v {
                    env.mmio_write(gpa, store.size, v);
                }
                0
            });
        } else {
            policed(env, &m, offset, store.size, Some(value), |env, v| {
                if let Some(v) = v {
                    env.mmio_write(gpa, store.size, v);
                }
                0
            });
        }
    } else {
        log::error!(
            "cpu {me}: unsupported configuration access {:?} at {gpa:#x} (rip {:#x}); skipped",
            d.mnemonic(),
            cpu.rip()
        );
    }
    cpu.set_rip(next);
    resume(env)
}

/// Resume, flushing this CPU's guest TLB where a page left its
/// second-level tables meanwhile (`CpuSlot::flush_tlb`).
fn resume(env: &impl Env) -> Outcome {
    if env.hv().cpus()[env.cpu_index()]
        .flush_tlb
        .swap(false, Ordering::SeqCst)
    {
        Outcome::ResumeFlushTlb
    } else {
        Outcome::Resume
    }
}

fn set_loaded(cpu: &mut impl GuestCpu, load: Load, value: u32) {
    let old = cpu.gpr(load.dest);
    cpu.set_gpr(load.dest, load.merge(old, u64::from(value)));
}

/// Sets the bits of the configuration ports, CONFIG_ADDRESS as well as
/// CONFIG_DATA, in an I/O intercept map: one bit per port, port `p` at
/// byte `p / 8`, bit `p % 8` — SVM's I/O permission map (AMD APM Vol. 2
/// §15.10.1) and VMX's I/O bitmaps A and B back to back (Intel SDM Vol. 3C
/// §25.6.4) alike. An access exits when the bit of any port it touches is
/// set (APM §15.10.1; SDM §26.1.3), so every access overlapping
/// 0xCF8..=0xCFF comes here.
pub fn trap_config_ports(map: &mut [u8]) {
    for port in mediate::CONFIG_PORTS {
        if let Some(b) = map.get_mut(usize::from(port / 8)) {
            *b |= 1 << (port % 8);
        }
    }
}

/// IN or OUT that touches an intercepted configuration port
/// (0xCF8..=0xCFF): split into its pieces, each performed on this CPU's
/// behalf; the pieces' results make up what an IN loads.
pub(super) fn port(
    cpu: &mut impl GuestCpu,
    env: &mut impl Env,
    port: u16,
    size: u8,
    input: bool,
    string: bool,
) -> Outcome {
    if string || !matches!(size, 1 | 2 | 4) {
        log::error!(
            "cpu {}: string or odd-sized I/O on port {port:#x} at rip {:#x}; #GP",
            env.cpu_index(),
            cpu.rip()
        );
        cpu.inject_exception(vector::GP, Some(0));
        return Outcome::Resume;
    }
    let value = if input {
        0
    } else {
        low32(cpu.gpr(Gpr::Rax)) & mediate::all_ones(size)
    };
    let mut loaded = 0;
    for p in mediate::split_port_access(port, size).as_slice() {
        let part = (value >> (8 * p.shift)) & mediate::all_ones(p.size);
        let got = match p.role {
            PortRole::Address => address_latch(env, input, part),
            PortRole::Data => data(env, *p, input, part),
            PortRole::Plain if input => env.port_read(p.port, p.size),
            PortRole::Plain => {
                env.port_write(p.port, p.size, part);
                0
            }
        };
        loaded |= (got & mediate::all_ones(p.size)) << (8 * p.shift);
    }
    match complete_port(cpu, env, size, input.then_some(loaded)) {
        Outcome::Resume => resume(env),
        other => other,
    }
}

/// Ends an emulated IN or OUT of `size` bytes: an IN's value into AL, AX
/// or EAX, then past the instruction (#GP if it cannot be decoded).
pub(super) fn complete_port(
    cpu: &mut impl GuestCpu,
    env: &impl Env,
    size: u8,
    loaded: Option<u32>,
) -> Outcome {
    if let Some(value) = loaded {
        let rax = Load {
            dest: Gpr::Rax,
            dest_size: size,
            size,
        };
        set_loaded(cpu, rax, value);
    }
    if !advance(cpu, env) {
        cpu.inject_exception(vector::GP, Some(0));
    }
    Outcome::Resume
}

/// A dword IN or OUT at 0xCF8: this CPU's own latch, which only this CPU
/// touches. It holds what the guest wrote, as QEMU's host bridges do (the
/// hardware's read-only bits are the hardware's business: thinhv writes
/// the value there before each data access it performs).
fn address_latch(env: &impl Env, input: bool, value: u32) -> u32 {
    let latch = &env.hv().cpus()[env.cpu_index()].cf8_latch;
    if input {
        latch.load(Ordering::Relaxed)
    } else {
        latch.store(value, Ordering::Relaxed);
        0
    }
}

/// Bytes of the data window (one piece): decoded against this CPU's latch
/// and mediated when they address a mediated function; whatever reaches
/// the hardware goes there as a latch-then-data pair.
fn data(env: &mut impl Env, p: PortPiece, input: bool, value: u32) -> u32 {
    let address = env.hv().cpus()[env.cpu_index()]
        .cf8_latch
        .load(Ordering::Relaxed);
    // The piece lies in 0xCFC..=0xCFF (`split_port_access`).
    let byte = (p.port.wrapping_sub(CONFIG_DATA) & 3) as u8;
    let target = mediate::cf8_target(address, byte)
        .and_then(|(bus, devfn, off)| env.hv().pci.find(bus, devfn).map(|m| (*m, off)));
    if let Some((k, dev, off)) =
        target.and_then(|(m, off)| presented(env, &m).map(|(k, dev)| (k, dev, off)))
    {
        let who = super::appliance_pci::Viewer::Os(k);
        return if input {
            super::appliance_pci::read(env, who, &dev, off, p.size)
        } else {
            super::appliance_pci::write(env, who, &dev, off, p.size, value);
            0
        };
    }
    if let Some((m, off)) = target
        && let Some(owner) = msi_owner(env, &m)
    {
        return if input {
            super::msi_remap::read(env, owner, rid_of(&m), off & !3).map_or_else(
                || {
                    beneath(env, &m, off, p.size, None, |env, v| {
                        env.legacy_config_access(address, p.port, p.size, v)
                    })
                },
                |v| (v >> (8 * (off & 3))) & mediate::all_ones(p.size),
            )
        } else {
            super::msi_remap::store(env, owner, rid_of(&m), off, p.size, value, |env, v| {
                beneath(env, &m, off, p.size, Some(v), |env, v| {
                    env.legacy_config_access(address, p.port, p.size, v)
                });
            });
            0
        };
    }
    match target {
        Some((m, off)) if m.action == PCI_ACTION_VF_SHARED => {
            super::shared_pf::access(env, &m, off, p.size, (!input).then_some(value), |env, v| {
                env.legacy_config_access(address, p.port, p.size, v)
            })
        }
        None if input => env.legacy_config_access(address, p.port, p.size, None),
        None => env.legacy_config_access(address, p.port, p.size, Some(value)),
        Some((m, off)) => policed(env, &m, off, p.size, (!input).then_some(value), |env, v| {
            env.legacy_config_access(address, p.port, p.size, v)
        }),
    }
}
