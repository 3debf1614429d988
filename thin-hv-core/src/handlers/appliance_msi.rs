//! An appliance's MSI programming, where its function's messages are
//! remapped (`Env::remaps_interrupts`; `docs/appliances.md`, "Interrupt
//! isolation").
//!
//! The appliance writes the message address and data of its function's
//! MSI capability as on bare metal; thinhv keeps what it wrote (its reads
//! return that), judges the message against the appliance's processors
//! ([`thinhv_passthrough::irq_remap::judge`]: a fixed or lowest-priority
//! interrupt to one of its own processors, in physical destination mode)
//! and writes entry 0 of the function's remapping table: the message, or
//! not present where it is refused. The function itself holds the message
//! that names entry 0, so whatever the appliance writes, and whatever the
//! function writes by DMA to the interrupt window, reaches at most the
//! processor judged here. Multiple Message Enable stays 0 (one vector:
//! Linux on x86 uses one without remapping of its own).
// Configuration offsets are below 0x100, message halves are split by
// truncation on purpose.
#![allow(clippy::cast_possible_truncation)]
use super::appliance_pci::{Function, TSC_KHZ_UNKNOWN, byte_at, real_address};
use crate::env::Env;
use crate::hv::Hv;
use crate::partition::{MsiShadow, PartitionId};
use core::sync::atomic::Ordering;
use thinhv_abi::handoff::PartitionDevice;
use thinhv_passthrough::irq_remap::{self, Cores, Policy, Target};
use thinhv_passthrough::mediate::CONFIG_ADDRESS;
use thinhv_passthrough::reset;

/// Refused messages logged one by one; after that every 1024th.
const LOG_FIRST: u64 = 8;
/// CONFIG_DATA.
const DATA: u16 = CONFIG_ADDRESS + 4;

/// Where the registers of a function's MSI capability are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct MsiCap {
    at: u16,
    wide: bool,
}

impl MsiCap {
    fn control(self) -> u16 {
        self.at + 2
    }
    fn data(self) -> u16 {
        self.at + if self.wide { 0xc } else { 8 }
    }
    /// First byte past what thinhv keeps (address and data).
    fn end(self) -> u16 {
        self.data() + 2
    }
    /// The shadow's byte at configuration offset `at`, if it keeps it.
    fn shadow_byte(self, s: &MsiShadow, at: u16) -> Option<u8> {
        let lo = self.at + 4;
        if (lo..lo + 4).contains(&at) {
            return Some(s.addr.to_le_bytes()[usize::from(at - lo)]);
        }
        if self.wide && (lo + 4..lo + 8).contains(&at) {
            return Some(s.addr.to_le_bytes()[usize::from(at - lo)]);
        }
        let d = self.data();
        (d..d + 2)
            .contains(&at)
            .then(|| s.data.to_le_bytes()[usize::from(at - d)])
    }
    fn set_shadow_byte(self, s: &mut MsiShadow, at: u16, b: u8) {
        let lo = self.at + 4;
        let hi_end = if self.wide { lo + 8 } else { lo + 4 };
        if (lo..hi_end).contains(&at) {
            let mut a = s.addr.to_le_bytes();
            a[usize::from(at - lo)] = b;
            s.addr = u64::from_le_bytes(a);
        } else if (self.data()..self.end()).contains(&at) {
            let mut d = s.data.to_le_bytes();
            d[usize::from(at - self.data())] = b;
            s.data = u16::from_le_bytes(d);
        }
    }
}

/// The MSI capability of the appliance's function `i` (`dev`), if its
/// messages are remapped and it has one (looked up once).
fn cap(env: &mut impl Env, id: PartitionId, i: usize, dev: &PartitionDevice) -> Option<MsiCap> {
    if !env.remaps_interrupts(dev.rid) {
        return None;
    }
    let known = env.hv().appliance(id)?.msi_shadow.lock().get(i).copied()?;
    if known.cap != 0 {
        return Some(MsiCap {
            at: known.cap,
            wide: known.wide,
        });
    }
    let mut f = Function {
        env,
        dev,
        tsc_khz: TSC_KHZ_UNKNOWN,
    };
    let at = reset::find_capability(&mut f, reset::CAP_MSI)?;
    let control = f
        .env
        .legacy_config_access(real_address(dev, at), DATA, 4, None)
        >> 16;
    let cap = MsiCap {
        at,
        wide: control & (1 << 7) != 0,
    };
    if let Some(s) = env.hv().appliance(id)?.msi_shadow.lock().get_mut(i) {
        s.cap = cap.at;
        s.wide = cap.wide;
    }
    Some(cap)
}

/// An appliance's processors, as interrupt destinations. Logical
/// destinations are not resolved (refused): Linux programs physical ones
/// in x2APIC mode without remapping of its own.
struct ApplianceCores<'a> {
    hv: &'a Hv,
    id: PartitionId,
}

impl Cores for ApplianceCores<'_> {
    fn has(&self, apic_id: u32) -> bool {
        self.hv
            .cpu_by_apic_id(apic_id)
            .is_some_and(|c| self.hv.partition_of(c) == self.id)
    }
    fn logical(&self, _dest: u8, _out: &mut alloc::vec::Vec<u32>) -> bool {
        true
    }
}

/// The dword at `dword` as the appliance sees it, where thinhv keeps part
/// of it; `None` elsewhere.
pub(super) fn read(
    env: &mut impl Env,
    id: PartitionId,
    i: usize,
    dev: &PartitionDevice,
    dword: u16,
) -> Option<u32> {
    let cap = cap(env, id, i, dev)?;
    if dword + 4 <= cap.at + 4 || dword >= cap.end() {
        return None;
    }
    let shadow = env.hv().appliance(id)?.msi_shadow.lock().get(i).copied()?;
    let mut v = env
        .legacy_config_access(real_address(dev, dword), DATA, 4, None)
        .to_le_bytes();
    for (k, b) in v.iter_mut().enumerate() {
        if let Some(s) = cap.shadow_byte(&shadow, dword + k as u16) {
            *b = s;
        }
    }
    Some(u32::from_le_bytes(v))
}

/// A write into the MSI capability of a remapped function: handled (true)
/// or not this module's (false).
pub(super) fn write(
    env: &mut impl Env,
    id: PartitionId,
    i: usize,
    dev: &PartitionDevice,
    reg: u16,
    size: u8,
    value: u32,
) -> bool {
    let Some(cap) = cap(env, id, i, dev) else {
        return false;
    };
    let end = reg + u16::from(size);
    if end <= cap.control() || reg >= cap.end() {
        return false;
    }
    let Some(mut shadow) = env
        .hv()
        .appliance(id)
        .and_then(|p| p.msi_shadow.lock().get(i).copied())
    else {
        return true;
    };
    let mut control: Option<u16> = None;
    for at in reg..end {
        let Some(b) = byte_at(reg, size, value, at) else {
            continue;
        };
        if (cap.control()..cap.control() + 2).contains(&at) {
            let c = control.get_or_insert_with(|| {
                (env.legacy_config_access(real_address(dev, cap.control()), DATA + 2, 2, None))
                    as u16
            });
            let shift = 8 * (at - cap.control());
            *c = (*c & !(0xff << shift)) | u16::from(b) << shift;
        } else if cap.shadow_byte(&shadow, at).is_some() {
            cap.set_shadow_byte(&mut shadow, at, b);
        } else {
            // Bytes beside what thinhv keeps (the capability header, the
            // data dword's upper half): as written.
            env.legacy_config_access(
                real_address(dev, at & !3),
                DATA + (at & 3),
                1,
                Some(u32::from(b)),
            );
        }
    }
    let enabled = match control {
        Some(c) => c & 1 != 0,
        None => {
            env.legacy_config_access(real_address(dev, cap.control()), DATA + 2, 2, None) & 1 != 0
        }
    };
    // The message first, then the control word (an enable reaches the
    // function after its entry and message are in place).
    program(env, id, dev, cap, &mut shadow, enabled);
    if let Some(p) = env.hv().appliance(id)
        && let Some(s) = p.msi_shadow.lock().get_mut(i)
    {
        *s = shadow;
    }
    if let Some(c) = control {
        // Multiple Message Enable 0: one vector.
        env.legacy_config_access(
            real_address(dev, cap.control()),
            DATA + 2,
            2,
            Some(u32::from(c & !(7 << 4))),
        );
    }
    true
}

/// Writes the entry for what the appliance programmed (when the function
/// may send it: MSI enabled) and the message naming it into the function.
fn program(
    env: &mut impl Env,
    id: PartitionId,
    dev: &PartitionDevice,
    cap: MsiCap,
    shadow: &mut MsiShadow,
    enabled: bool,
) {
    let target: Option<Target> = if enabled {
        let judged = irq_remap::decode_msi(shadow.addr, u32::from(shadow.data)).and_then(|r| {
            irq_remap::judge(&r, &ApplianceCores { hv: env.hv(), id }, Policy::default())
        });
        match judged {
            Ok(t) => {
                shadow.refused = None;
                Some(t)
            }
            Err(why) => {
                refused(env, id, dev, shadow, why.describe());
                None
            }
        }
    } else {
        None
    };
    let message = match env.remap_interrupt(dev.rid, 0, target) {
        Ok(m) => m,
        Err(why) => {
            refused(env, id, dev, shadow, why.describe());
            match env.remap_interrupt(dev.rid, 0, None) {
                Ok(m) => m,
                Err(_) => return,
            }
        }
    };
    let (addr, data) = message;
    env.legacy_config_access(real_address(dev, cap.at + 4), DATA, 4, Some(addr as u32));
    if cap.wide {
        env.legacy_config_access(
            real_address(dev, cap.at + 8),
            DATA,
            4,
            Some((addr >> 32) as u32),
        );
    }
    env.legacy_config_access(
        real_address(dev, cap.data()),
        DATA + (cap.data() & 3),
        2,
        Some(data & 0xffff),
    );
}

fn refused(
    env: &impl Env,
    id: PartitionId,
    dev: &PartitionDevice,
    shadow: &mut MsiShadow,
    why: &str,
) {
    let message = (shadow.addr, shadow.data);
    if shadow.refused == Some(message) {
        return;
    }
    shadow.refused = Some(message);
    let n = env.hv().refused_msis.fetch_add(1, Ordering::Relaxed) + 1;
    if n <= LOG_FIRST || n.is_multiple_of(1024) {
        let name = env.hv().appliance(id).map_or("?", |p| p.name());
        log::warn!(
            "appliance {name}: MSI of PCI {} (address {:#x}, data {:#06x}) refused: {why} ({n} so far)",
            thinhv_passthrough::pci::Bdf::from_rid(0, dev.rid),
            shadow.addr,
            shadow.data
        );
    }
}
