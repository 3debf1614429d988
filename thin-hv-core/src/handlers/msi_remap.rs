//! MSI programming of a function whose messages are remapped
//! (`Env::remaps_interrupts`; `docs/appliances.md`, "Interrupt
//! isolation"): an appliance's function, or one of the OS's
//! (`PCI_ACTION_MSI`).
//!
//! The owner writes the message address and data of the function's MSI
//! capability as on bare metal; thinhv keeps what it wrote (its reads
//! return that), judges the message against the owner's processors
//! ([`thinhv_passthrough::irq_remap::judge`]: a fixed or lowest-priority
//! interrupt to one of its own processors; the entry names it in physical
//! destination mode) and writes entry 0 of the function's remapping
//! table: the message, or not present where it is refused. The function
//! itself holds the message that names entry 0, so whatever the owner
//! writes, and whatever the function writes by DMA to the interrupt
//! window, reaches at most the processor judged here. Multiple Message
//! Enable stays 0 (one vector: Linux on x86 uses one without remapping of
//! its own).
// Configuration offsets are below 0x100, message halves are split by
// truncation on purpose.
#![allow(clippy::cast_possible_truncation)]
use super::appliance_pci::{TSC_KHZ_UNKNOWN, byte_at};
use crate::env::Env;
use crate::hv::Hv;
use crate::partition::{MsiShadow, PartitionId};
use core::sync::atomic::Ordering;
use thinhv_passthrough::irq_remap::{self, Cores, Policy, Target};
use thinhv_passthrough::mediate::CONFIG_ADDRESS;
use thinhv_passthrough::reset::{self, FunctionConfig};

/// Refused messages logged one by one; after that every 1024th.
const LOG_FIRST: u64 = 8;
/// CONFIG_DATA.
const DATA: u16 = CONFIG_ADDRESS + 4;

/// Whose function, and where thinhv keeps what its owner wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Owner {
    /// An appliance's function `i`.
    Appliance(PartitionId, usize),
    /// The OS's function mediated at index `k` (`PciHandoff::mediated`).
    Os(usize),
}

impl Owner {
    fn partition(self) -> PartitionId {
        match self {
            Self::Appliance(id, _) => id,
            Self::Os(_) => PartitionId::OS,
        }
    }

    /// Runs `f` on the owner's shadow of the function.
    fn with_shadow<T>(self, hv: &Hv, f: impl FnOnce(&mut MsiShadow) -> T) -> Option<T> {
        match self {
            Self::Appliance(id, i) => hv.appliance(id)?.msi_shadow.lock().get_mut(i).map(f),
            Self::Os(k) => hv.os_msi.lock().get_mut(k).map(f),
        }
    }
}

/// The function with routing ID `rid` through the configuration ports.
struct Config<'a, E: Env> {
    env: &'a mut E,
    rid: u16,
}

impl<E: Env> Config<'_, E> {
    fn address(&self, reg: u16) -> u32 {
        1 << 31 | u32::from(self.rid) << 8 | u32::from(reg & 0xfc)
    }
    fn read(&mut self, reg: u16, size: u8) -> u32 {
        let a = self.address(reg);
        self.env
            .legacy_config_access(a, DATA + (reg & 3), size, None)
    }
    fn write(&mut self, reg: u16, size: u8, value: u32) {
        let a = self.address(reg);
        self.env
            .legacy_config_access(a, DATA + (reg & 3), size, Some(value));
    }
}

impl<E: Env> FunctionConfig for Config<'_, E> {
    fn read32(&mut self, reg: u16) -> u32 {
        self.read(reg, 4)
    }
    fn write32(&mut self, reg: u16, value: u32) {
        self.write(reg, 4, value);
    }
    fn write16(&mut self, reg: u16, value: u16) {
        self.write(reg, 2, u32::from(value));
    }
    fn wait_us(&mut self, us: u32) {
        let ticks = u64::from(us) * TSC_KHZ_UNKNOWN / 1000;
        let start = self.env.tsc();
        while self.env.tsc().wrapping_sub(start) < ticks {
            core::hint::spin_loop();
        }
    }
}

/// Where the registers of a function's MSI capability are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MsiCap {
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
        let hi_end = if self.wide { lo + 8 } else { lo + 4 };
        if (lo..hi_end).contains(&at) {
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

/// The MSI capability of `rid`, if its messages are remapped and it has
/// one (looked up once).
fn cap(env: &mut impl Env, owner: Owner, rid: u16) -> Option<MsiCap> {
    if !env.remaps_interrupts(rid) {
        return None;
    }
    let known = owner.with_shadow(env.hv(), |s| *s)?;
    if known.cap != 0 {
        return Some(MsiCap {
            at: known.cap,
            wide: known.wide,
        });
    }
    let mut f = Config { env, rid };
    let at = reset::find_capability(&mut f, reset::CAP_MSI)?;
    let control = f.read(at + 2, 2);
    let cap = MsiCap {
        at,
        wide: control & (1 << 7) != 0,
    };
    owner.with_shadow(env.hv(), |s| {
        s.cap = cap.at;
        s.wide = cap.wide;
    });
    Some(cap)
}

/// A partition's processors, as interrupt destinations. A logical
/// destination resolves against the logical IDs the OS's kernel wrote
/// (`ipi::logical_match`); an appliance's are refused (Linux programs
/// physical ones in x2APIC mode without remapping of its own).
struct PartitionCores<'a> {
    hv: &'a Hv,
    id: PartitionId,
}

impl Cores for PartitionCores<'_> {
    fn has(&self, apic_id: u32) -> bool {
        self.hv
            .cpu_by_apic_id(apic_id)
            .is_some_and(|c| self.hv.partition_of(c) == self.id)
    }
    fn logical(&self, dest: u8, out: &mut alloc::vec::Vec<u32>) -> bool {
        if !self.id.is_os() {
            return true;
        }
        for (i, c) in self.hv.cpus().iter().enumerate() {
            if self.hv.partition_of(i) == self.id
                && super::ipi::logical_match(self.hv, self.id, u32::from(dest), i, false)
            {
                out.push(c.apic_id);
            }
        }
        false
    }
}

/// The dword at `dword` of `rid` as its owner sees it, where thinhv keeps
/// part of it; `None` elsewhere.
pub(super) fn read(env: &mut impl Env, owner: Owner, rid: u16, dword: u16) -> Option<u32> {
    let cap = cap(env, owner, rid)?;
    if dword <= cap.at || dword >= cap.end() {
        return None;
    }
    let shadow = owner.with_shadow(env.hv(), |s| *s)?;
    let mut v = Config { env, rid }.read(dword, 4).to_le_bytes();
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
    owner: Owner,
    rid: u16,
    reg: u16,
    size: u8,
    value: u32,
) -> bool {
    let Some(cap) = cap(env, owner, rid) else {
        return false;
    };
    let end = reg + u16::from(size);
    if end <= cap.control() || reg >= cap.end() {
        return false;
    }
    let Some(mut shadow) = owner.with_shadow(env.hv(), |s| *s) else {
        return true;
    };
    let mut f = Config { env, rid };
    let mut control: Option<u16> = None;
    for at in reg..end {
        let Some(b) = byte_at(reg, size, value, at) else {
            continue;
        };
        if (cap.control()..cap.control() + 2).contains(&at) {
            let c = match control {
                Some(c) => c,
                None => f.read(cap.control(), 2) as u16,
            };
            let shift = 8 * (at - cap.control());
            control = Some((c & !(0xff << shift)) | u16::from(b) << shift);
        } else if cap.shadow_byte(&shadow, at).is_some() {
            cap.set_shadow_byte(&mut shadow, at, b);
        } else {
            // Bytes beside what thinhv keeps (the capability header, the
            // data dword's upper half): as written.
            f.write(at, 1, u32::from(b));
        }
    }
    let enabled = control.unwrap_or_else(|| f.read(cap.control(), 2) as u16) & 1 != 0;
    // The message first, then the control word (an enable reaches the
    // function after its entry and message are in place).
    program(env, owner, rid, cap, &mut shadow, enabled);
    owner.with_shadow(env.hv(), |s| *s = shadow);
    if let Some(c) = control {
        // Multiple Message Enable 0: one vector.
        Config { env, rid }.write(cap.control(), 2, u32::from(c & !(7 << 4)));
    }
    true
}

/// Writes the entry for what the owner programmed (when the function may
/// send it: MSI enabled) and the message naming it into the function.
fn program(
    env: &mut impl Env,
    owner: Owner,
    rid: u16,
    cap: MsiCap,
    shadow: &mut MsiShadow,
    enabled: bool,
) {
    let target: Option<Target> = if enabled {
        let cores = PartitionCores {
            hv: env.hv(),
            id: owner.partition(),
        };
        let judged = irq_remap::decode_msi(shadow.addr, u32::from(shadow.data))
            .and_then(|r| irq_remap::judge(&r, &cores, Policy::default()));
        match judged {
            Ok(t) => {
                shadow.refused = None;
                Some(t)
            }
            Err(why) => {
                refused(env, owner, rid, shadow, why.describe());
                None
            }
        }
    } else {
        None
    };
    let message = match env.remap_interrupt(rid, 0, target) {
        Ok(m) => m,
        Err(why) => {
            refused(env, owner, rid, shadow, why.describe());
            match env.remap_interrupt(rid, 0, None) {
                Ok(m) => m,
                Err(_) => return,
            }
        }
    };
    let (addr, data) = message;
    let mut f = Config { env, rid };
    f.write(cap.at + 4, 4, addr as u32);
    if cap.wide {
        f.write(cap.at + 8, 4, (addr >> 32) as u32);
    }
    f.write(cap.data(), 2, data & 0xffff);
}

fn refused(env: &impl Env, owner: Owner, rid: u16, shadow: &mut MsiShadow, why: &str) {
    let message = (shadow.addr, shadow.data);
    if shadow.refused == Some(message) {
        return;
    }
    shadow.refused = Some(message);
    let n = env.hv().refused_msis.fetch_add(1, Ordering::Relaxed) + 1;
    if n <= LOG_FIRST || n.is_multiple_of(1024) {
        let whose = match owner {
            Owner::Appliance(id, _) => env.hv().appliance(id).map_or("?", |p| p.name()),
            Owner::Os(_) => "the OS",
        };
        log::warn!(
            "{whose}: MSI of PCI {} (address {:#x}, data {:#06x}) refused: {why} ({n} so far)",
            thinhv_passthrough::pci::Bdf::from_rid(0, rid),
            shadow.addr,
            shadow.data
        );
    }
}
