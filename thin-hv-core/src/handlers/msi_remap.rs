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
//! destination mode) and writes the function's MSI entry of its remapping
//! table (the last; MSI-X entry `k` is entry `k`): the message, or not
//! present where it is refused. The function itself holds the message
//! that names that entry, so whatever the owner
//! writes, and whatever the function writes by DMA to the interrupt
//! window, reaches at most the processor judged here. Multiple Message
//! Enable stays 0 (one vector: Linux on x86 uses one without remapping of
//! its own).
// Configuration offsets are below 0x100, message halves are split by
// truncation on purpose.
#![allow(clippy::cast_possible_truncation)]
use super::appliance_pci::{Function, TSC_KHZ_UNKNOWN, byte_at};
use crate::env::Env;
use crate::hv::Hv;
use crate::partition::{MsiShadow, PartitionId};
use core::sync::atomic::Ordering;
use thinhv_passthrough::irq_remap::{self, Cores, Policy, Target};
use thinhv_passthrough::reset;

/// Refused messages logged one by one for each function (one busy
/// function does not silence the next); after that every 1024th of all.
const LOG_FIRST: u64 = 8;
/// Functions whose refusals are logged by their own count; beyond them,
/// by the count of all.
const LOG_FUNCTIONS: usize = 64;

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
    let mut f = Function {
        env,
        rid,
        tsc_khz: TSC_KHZ_UNKNOWN,
    };
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
pub(crate) struct PartitionCores<'a> {
    pub(crate) hv: &'a Hv,
    pub(crate) id: PartitionId,
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
    let mut v = Function {
        env,
        rid,
        tsc_khz: TSC_KHZ_UNKNOWN,
    }
    .read(dword, 4)
    .to_le_bytes();
    for (k, b) in v.iter_mut().enumerate() {
        if let Some(s) = cap.shadow_byte(&shadow, dword + k as u16) {
            *b = s;
        }
    }
    Some(u32::from_le_bytes(v))
}

/// A store of the owner's into the configuration space of a remapped
/// function, `raw` writing it to the function: the MSI capability as
/// [`write`] keeps it; the rest passes, with one care. A store that leaves
/// MSI-X enabled and unmasked reaches the function first with Function
/// Mask set; the owner's value follows only once thinhv has trapped the
/// table and written every entry, so no entry sends a message thinhv has
/// not judged (where no remapping table holds the function's messages,
/// VT-d, that message would reach any processor). A table thinhv refused
/// stays masked.
pub(super) fn store<E: Env>(
    env: &mut E,
    owner: Owner,
    rid: u16,
    reg: u16,
    size: u8,
    value: u32,
    mut raw: impl FnMut(&mut E, u32),
) {
    if write(env, owner, rid, reg, size, value) {
        return;
    }
    let Some(masked) = masked_first(env, owner, rid, reg, size, value) else {
        raw(env, value);
        after_write(env, owner, rid, reg, size);
        return;
    };
    raw(env, masked);
    after_write(env, owner, rid, reg, size);
    let trapped = env.hv().msix.lock().contains_key(&rid);
    raw(env, if trapped { value } else { masked });
}

/// `value` with Function Mask set, where the store (`size` bytes at `reg`)
/// sets MSI-X Enable with Function Mask clear.
fn masked_first(
    env: &mut impl Env,
    owner: Owner,
    rid: u16,
    reg: u16,
    size: u8,
    value: u32,
) -> Option<u32> {
    let cap = msix_cap(env, owner, rid)?;
    // Enable (bit 7) and Function Mask (bit 6) of the control's high byte.
    let high = cap + 3;
    if reg > high || reg + u16::from(size) <= high {
        return None;
    }
    let shift = 8 * u32::from(high - reg);
    let byte = (value >> shift) & 0xff;
    (byte & 0x80 != 0 && byte & 0x40 == 0).then_some(value | 0x40 << shift)
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
    let mut f = Function {
        env,
        rid,
        tsc_khz: TSC_KHZ_UNKNOWN,
    };
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
        Function {
            env,
            rid,
            tsc_khz: TSC_KHZ_UNKNOWN,
        }
        .write(cap.control(), 2, u32::from(c & !(7 << 4)));
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
    let (addr, data) = (shadow.addr, u32::from(shadow.data));
    let Some(message) = write_entry(
        env,
        owner.partition(),
        rid,
        MSI_SLOT,
        (addr, data),
        enabled,
        &mut shadow.refused,
    ) else {
        return;
    };
    let (addr, data) = message;
    let mut f = Function {
        env,
        rid,
        tsc_khz: TSC_KHZ_UNKNOWN,
    };
    f.write(cap.at + 4, 4, addr as u32);
    if cap.wide {
        f.write(cap.at + 8, 4, (addr >> 32) as u32);
    }
    f.write(cap.data(), 2, data & 0xffff);
}

/// Writes entry `slot` of `rid`'s remapping table for the owner's message
/// `(addr, data)`: what it asks for where `live` (MSI enabled, the MSI-X
/// entry unmasked) and [`irq_remap::judge`] accepts it for the owner's
/// processors, else not present (a refusal noted once per message in
/// `last`). Returns the message naming the entry, for the function.
fn write_entry(
    env: &mut impl Env,
    owner: PartitionId,
    rid: u16,
    slot: u16,
    (addr, data): (u64, u32),
    live: bool,
    last: &mut Option<(u64, u32)>,
) -> Option<(u64, u32)> {
    // Address 0: the owner took its message away (Linux writes a zeroed
    // message when it frees the interrupt, MSI still enabled). Not present,
    // and no refusal: it asks for nothing.
    let target: Option<Target> = if live && addr != 0 {
        let cores = PartitionCores {
            hv: env.hv(),
            id: owner,
        };
        match irq_remap::decode_msi(addr, data)
            .and_then(|r| irq_remap::judge(&r, &cores, Policy::default()))
        {
            Ok(t) => {
                *last = None;
                Some(t)
            }
            Err(why) => {
                note_refusal(env, owner, rid, last, addr, data, why.describe());
                None
            }
        }
    } else {
        None
    };
    match env.remap_interrupt(rid, slot, target) {
        Ok(m) => Some(m),
        Err(why) => {
            note_refusal(env, owner, rid, last, addr, data, why.describe());
            env.remap_interrupt(rid, slot, None).ok()
        }
    }
}

/// Writes `message` into the MSI-X entry at `at` (address, both halves,
/// and data; vector control is left alone).
fn write_msix_message(env: &mut impl Env, at: u64, (addr, data): (u64, u32)) {
    env.mmio_write(at, 4, addr as u32);
    env.mmio_write(at + 4, 4, (addr >> 32) as u32);
    env.mmio_write(at + 8, 4, data);
}

/// Counts and logs (rate-limited) a refused message, once however often
/// its owner writes it again (`last`).
fn note_refusal(
    env: &impl Env,
    owner: PartitionId,
    rid: u16,
    last: &mut Option<(u64, u32)>,
    addr: u64,
    data: u32,
    why: &str,
) {
    if *last == Some((addr, data)) {
        return;
    }
    *last = Some((addr, data));
    let n = env.hv().refused_msis.fetch_add(1, Ordering::Relaxed) + 1;
    if logs_refusal(&mut env.hv().msi_refusals_logged.lock(), rid, n) {
        let whose = if owner.is_os() {
            "the OS"
        } else {
            env.hv().appliance(owner).map_or("?", |p| p.name())
        };
        log::warn!(
            "{whose}: MSI of PCI {} (address {addr:#x}, data {data:#06x}) refused: {why} ({n} so far)",
            thinhv_passthrough::pci::Bdf::from_rid(0, rid),
        );
    }
}

/// Whether the `n`th refused message of all, by `rid`, is logged
/// (`logged`: how many each function had, for the first
/// [`LOG_FUNCTIONS`]).
fn logs_refusal(logged: &mut alloc::collections::BTreeMap<u16, u64>, rid: u16, n: u64) -> bool {
    let own = if logged.len() < LOG_FUNCTIONS || logged.contains_key(&rid) {
        let k = logged.entry(rid).or_insert(0);
        *k += 1;
        *k
    } else {
        n
    };
    own <= LOG_FIRST || n.is_multiple_of(1024)
}

/// The MSI-X capability of `rid` (looked up once), if its messages are
/// remapped.
fn msix_cap(env: &mut impl Env, owner: Owner, rid: u16) -> Option<u16> {
    if !env.remaps_interrupts(rid) {
        return None;
    }
    let known = owner.with_shadow(env.hv(), |s| s.msix)?;
    if known != 0 {
        return (known != 1).then_some(known);
    }
    let at = reset::find_capability(
        &mut Function {
            env,
            rid,
            tsc_khz: TSC_KHZ_UNKNOWN,
        },
        reset::CAP_MSIX,
    );
    // A VF the OS may create and remove (a PF with a plain budget) reads
    // as nothing while absent: found nothing is not remembered for it.
    if at.is_some() || !budget_vf(env.hv(), rid) {
        owner.with_shadow(env.hv(), |s| s.msix = at.unwrap_or(1));
    }
    at
}

/// Whether `rid` is one of the VFs the OS may create on a PF with a plain
/// budget (`PciHandoff::budget`, at the loader's First VF Offset and VF
/// Stride).
fn budget_vf(hv: &Hv, rid: u16) -> bool {
    hv.pci.budget().iter().any(|s| {
        s.first_vf_offset != 0
            && (1..=s.os_vfs).any(|k| {
                u32::from(s.rid)
                    + u32::from(s.first_vf_offset)
                    + u32::from(k - 1) * u32::from(s.vf_stride)
                    == u32::from(rid)
            })
    })
}

/// After a write at `reg` (`size` bytes) reached `rid`: where it covered
/// the MSI-X Message Control word and MSI-X is enabled now, the table is
/// trapped (once per place: `setup_msix`).
pub(super) fn after_write(env: &mut impl Env, owner: Owner, rid: u16, reg: u16, size: u8) {
    let Some(cap) = msix_cap(env, owner, rid) else {
        return;
    };
    let control = cap + 2;
    if reg + u16::from(size) <= control || reg >= control + 2 {
        return;
    }
    let mut f = Function {
        env,
        rid,
        tsc_khz: TSC_KHZ_UNKNOWN,
    };
    if f.read(control, 2) & (1 << 15) != 0 {
        // As a table store: one at a time (`msix_write32`).
        crate::hv::hold(&env.hv().msix_writer);
        setup_msix(env, owner, rid, cap);
        crate::hv::release(&env.hv().msix_writer);
    }
}

/// The remapping entry of a function's MSI (the table's last), apart from
/// its MSI-X entries.
const MSI_SLOT: u16 = irq_remap::amdvi::ENTRIES as u16 - 1;
/// An entry never written (not present): the message of MSI-X entries
/// beyond [`MSIX_MAX`].
const NEVER_SLOT: u16 = irq_remap::amdvi::ENTRIES as u16 - 2;
/// MSI-X entries thinhv remaps: those below the two above.
const MSIX_MAX: u16 = NEVER_SLOT;

/// Traps the MSI-X table of `rid` (capability at `cap`) where its BAR puts
/// it now: its pages leave the owner's second-level tables, what the
/// function holds becomes the owner's (as written so far), and each entry
/// the message naming its remapping entry (written where unmasked).
fn setup_msix<E: Env>(env: &mut E, owner: Owner, rid: u16, msix: u16) {
    let mut f = Function {
        env,
        rid,
        tsc_khz: TSC_KHZ_UNKNOWN,
    };
    let entries = (f.read(msix + 2, 2) & 0x7ff) as u16 + 1;
    let table = f.read(msix + 4, 4);
    let bir = (table & 7) as u16;
    let bar = if bir < 6 {
        let lo = f.read(0x10 + 4 * bir, 4);
        let hi = if lo & 0b111 == 0b100 && bir < 5 {
            f.read(0x14 + 4 * bir, 4)
        } else {
            0
        };
        (lo & 1 == 0).then_some(u64::from(hi) << 32 | u64::from(lo & !0xf))
    } else {
        None
    };
    // A VF's own BAR registers read 0: its BARs are its slots of its PF's
    // VF BARs.
    let base = bar
        .filter(|b| *b != 0)
        .or_else(|| vf_bar(env, rid, bir))
        .and_then(|b| b.checked_add(u64::from(table & !7)));
    let Some(base) = base.filter(|b| *b != 0) else {
        log::error!(
            "PCI {}: its MSI-X table is not in a memory BAR: its MSI-X messages are refused",
            thinhv_passthrough::pci::Bdf::from_rid(0, rid)
        );
        forget_table(env, rid);
        return;
    };
    let old = env.hv().msix.lock().get(&rid).cloned();
    if old
        .as_ref()
        .is_some_and(|t| t.base == base && t.entries == entries)
    {
        return;
    }
    let mut t = crate::partition::MsixTable {
        owner: owner.partition(),
        base,
        entries,
        shadow: alloc::vec![crate::partition::MsixEntry::default(); usize::from(entries)],
    };
    // Only pages of device memory nobody else owns: never RAM, another
    // partition's memory or BARs, thinhv's, the interrupt window (the
    // local APIC), an I/O APIC's registers, the platform's own registers
    // (an IOMMU unit's, ECAM: thinhv writes entries there), a page another
    // trap holds. (The owner places its BARs, a VF's in its PF's VF BARs.)
    let owner_part = owner.partition();
    let refused_page = |env: &E, page: u64| {
        let hv = env.hv();
        hv.touches_hypervisor(page, 4096)
            || hv.foreign_ram(owner_part, page, 4096)
            || hv.ram().iter().any(|r| r.overlaps(page, 4096))
            || (0xfee0_0000..0xfef0_0000).contains(&page)
            || page == hv.apic_base & !0xfff
            || hv.is_ioapic_page(page)
            || hv.is_platform_page(page)
            || hv
                .msix
                .lock()
                .iter()
                .any(|(r, t)| *r != rid && t.pages().contains(&page))
    };
    let bdf = thinhv_passthrough::pci::Bdf::from_rid(0, rid);
    if t.pages().step_by(4096).any(|p| refused_page(env, p)) || t.pages().is_empty() {
        log::error!(
            "PCI {bdf}: its MSI-X table at {base:#x} is not device memory of its own: its MSI-X messages are refused"
        );
        forget_table(env, rid);
        return;
    }
    if let Some(t) = &old {
        for page in t.pages().step_by(4096) {
            env.apic_page_trap(page, false);
        }
        env.hv().msix.lock().remove(&rid);
    }
    let mut trapped = alloc::vec::Vec::new();
    for page in t.pages().step_by(4096) {
        if !env.apic_page_trap(page, true) {
            // Outside thinhv's map: its programming cannot be followed.
            // Its entries stay not present (remapping is never turned off
            // for a place the owner chose).
            for p in trapped {
                env.apic_page_trap(p, false);
            }
            log::error!(
                "PCI {bdf}: its MSI-X table at {base:#x} cannot be trapped (outside thinhv's map): its MSI-X messages are refused"
            );
            if let Some(t) = &old {
                clear_entries(env, rid, t.entries);
            }
            return;
        }
        trapped.push(page);
    }
    flush_everywhere(env);
    for i in 0..entries {
        let at = base + u64::from(i) * 16;
        let e = &mut t.shadow[usize::from(i)];
        e.addr = u64::from(env.mmio_read(at, 4)) | u64::from(env.mmio_read(at + 4, 4)) << 32;
        e.data = env.mmio_read(at + 8, 4);
    }
    log::info!(
        "PCI {}: MSI-X table of {entries} entries at {base:#x} trapped, its messages remapped",
        thinhv_passthrough::pci::Bdf::from_rid(0, rid)
    );
    for i in 0..entries {
        let unmasked = env.mmio_read(base + u64::from(i) * 16 + 12, 4) & 1 == 0;
        program_entry(env, rid, &mut t, i, unmasked);
    }
    env.hv().msix.lock().insert(rid, t);
}

/// Forgets the table of `rid` thinhv trapped, if any, where its new one
/// is refused: its pages go back to the owner and its remapping entries
/// become not present, so neither what the function holds at the old
/// place nor anything at the new one delivers, and [`store`] keeps the
/// function masked (it asks whether a table is trapped).
fn forget_table(env: &mut impl Env, rid: u16) {
    let Some(t) = env.hv().msix.lock().remove(&rid) else {
        return;
    };
    for page in t.pages().step_by(4096) {
        env.apic_page_trap(page, false);
    }
    clear_entries(env, rid, t.entries);
}

/// The remapping entries of MSI-X entries `0..entries` of `rid` not
/// present.
fn clear_entries(env: &mut impl Env, rid: u16, entries: u16) {
    for i in 0..entries.min(MSIX_MAX) {
        let _ = env.remap_interrupt(rid, i, None);
    }
}

/// BAR `bir` of `rid` where it is a VF whose messages thinhv remaps (the
/// caller asks for no other), from its PF's VF BAR plus its slot. VF `k`'s
/// routing ID is `SriovCap::vf_rid` of a First VF Offset and VF Stride.
/// - A PF the OS shares with an appliance (`PciHandoff::shared`): the
///   loader's setup, which the device keeps (`handlers::shared_pf`).
/// - A PF with a plain budget (`PciHandoff::budget`): the OS's own VFs,
///   read from the device now: VF Enable on, `k` within NumVFs and the
///   budget, the VF BAR where the OS put it.
pub(super) fn vf_bar(env: &mut impl Env, rid: u16, bir: u16) -> Option<u64> {
    let b = usize::from(bir);
    let index = |s: &thinhv_abi::handoff::SharedPf, offset: u16, stride: u16, n: u16| {
        // First VF Offset 0: no VF known (never the PF itself).
        if offset == 0 || rid == s.rid {
            return None;
        }
        let layout = thinhv_passthrough::sriov::SriovCap {
            first_vf_offset: offset,
            vf_stride: stride,
            ..Default::default()
        };
        (1..=n).find(|&k| layout.vf_rid(s.rid, k) == Some(rid))
    };
    let slot = |s: &thinhv_abi::handoff::SharedPf, k: u16, lo: u32, hi: u32| {
        let wide = lo & 0b110 == 0b100 && b < 5;
        let hi_mask = if wide {
            s.vf_bar_masks[b + 1]
        } else {
            u32::MAX
        };
        let hi = if wide { hi } else { 0 };
        let lo_mask = s.vf_bar_masks[b] & !0xf;
        let mask = u64::from(hi_mask) << 32 | u64::from(lo_mask);
        // A zero mask: a BAR never sized, not a 4 GiB slot.
        let size = if lo_mask == 0 && !wide {
            0
        } else {
            (!mask).wrapping_add(1)
        };
        let base = u64::from(hi) << 32 | u64::from(lo & !0xf);
        (lo & 1 == 0 && base != 0 && size != 0)
            .then(|| base.checked_add(u64::from(k - 1).checked_mul(size)?))
            .flatten()
    };
    if b >= 6 {
        return None;
    }
    let shared = env.hv().pci.shared().iter().find_map(|s| {
        let k = index(s, s.first_vf_offset, s.vf_stride, s.num_vfs)?;
        slot(
            s,
            k,
            s.vf_bars[b],
            s.vf_bars.get(b + 1).copied().unwrap_or(0),
        )
    });
    if shared.is_some() {
        return shared;
    }
    let budget: alloc::vec::Vec<_> = env.hv().pci.budget().to_vec();
    budget.iter().find_map(|s| {
        // The SR-IOV capability is extended configuration space: through
        // ECAM (the PF is mediated, so its page lies in the ECAM region).
        let page = env.hv().pci.ecam_base + (u64::from(s.rid) << 12);
        let read = |reg: u16, size: u8| env.mmio_read(page + u64::from(reg), size);
        // The VF BAR masks hold under the page size the loader sized them
        // with: under another, the slot is unknown (the table stays masked).
        if read(s.cap + 0x20, 4) != s.page_size {
            return None;
        }
        let control = read(s.cap + 8, 2);
        let num_vfs = (read(s.cap + 0x10, 2) as u16).min(s.os_vfs);
        let offset = read(s.cap + 0x14, 2) as u16;
        let stride = read(s.cap + 0x16, 2) as u16;
        let at = s.cap + 0x24 + 4 * bir;
        let (lo, hi) = (read(at, 4), if b < 5 { read(at + 4, 4) } else { 0 });
        if control & 1 == 0 {
            return None;
        }
        let k = index(s, offset, stride, num_vfs)?;
        slot(s, k, lo, hi)
    })
}

/// Writes the remapping entry for MSI-X entry `i` of `t` (what its owner
/// wrote, judged, where the entry is unmasked; else not present) and the
/// message naming it into the function.
fn program_entry(
    env: &mut impl Env,
    rid: u16,
    t: &mut crate::partition::MsixTable,
    i: u16,
    unmasked: bool,
) {
    let at = t.base + u64::from(i) * 16;
    let Some(e) = t.shadow.get_mut(usize::from(i)) else {
        return;
    };
    if i >= MSIX_MAX {
        // It names an entry that is never written: every message it sends
        // is aborted.
        if let Ok(message) = env.remap_interrupt(rid, NEVER_SLOT, None) {
            write_msix_message(env, at, message);
        }
        return;
    }
    let message = (e.addr, e.data);
    if let Some(m) = write_entry(env, t.owner, rid, i, message, unmasked, &mut e.refused) {
        write_msix_message(env, at, m);
    }
}

/// Pages left the second-level tables the OS's processors share: every
/// processor of the OS flushes its cached translations before it resumes.
/// This one at the end of its exit; the others at their next exit, which
/// a wake-up NMI forces (taken as a kick, never given to the guest). Not
/// waited for: a processor that waits in host mode for another would
/// hold off that one's NMI if it did the same.
fn flush_everywhere(env: &mut impl Env) {
    let me = env.cpu_index();
    let mut kick = alloc::vec::Vec::new();
    for (i, c) in env.hv().cpus().iter().enumerate() {
        if env.hv().partition_of(i).is_os() && c.virtualized() {
            c.flush_tlb.store(true, Ordering::SeqCst);
            // One waiting for its SIPI flushes when it starts; a kick
            // there would only be mistaken for its INIT's.
            if i != me && c.state() == thinhv_abi::status::CpuState::RUNNING {
                c.mailbox.wake_nmis.fetch_add(1, Ordering::SeqCst);
                kick.push(c.apic_id);
            }
        }
    }
    for apic_id in kick {
        env.kick_for_init(apic_id);
    }
}

/// A load or store of the owner's at `gpa`, in a page of an MSI-X table
/// thinhv traps (`None`: not such a page). Entries' address and data are
/// the owner's as it wrote them; a write there, or one that unmasks an
/// entry, writes the entry's remapping entry; the rest of the page is the
/// function's.
pub(super) fn msix_access(
    cpu: &mut impl crate::guest::GuestCpu,
    env: &mut impl Env,
    gpa: u64,
) -> Option<super::Outcome> {
    let rid = {
        let tables = env.hv().msix.lock();
        let (rid, t) = tables.iter().find(|(_, t)| t.pages().contains(&gpa))?;
        if t.owner != env.hv().space_of(env.cpu_index()) {
            return None;
        }
        *rid
    };
    let Some(d) = super::decode_current(cpu, env) else {
        log::error!(
            "cpu {}: cannot decode the MSI-X table access at rip {:#x}; #GP",
            env.cpu_index(),
            cpu.rip()
        );
        cpu.inject_exception(crate::guest::vector::GP, Some(0));
        return Some(super::Outcome::Resume);
    };
    let next = super::wrap_ip(cpu.mode(), cpu.rip().wrapping_add(d.len() as u64));
    if let Some(load) = d.load().filter(|l| matches!(l.size, 4 | 8)) {
        let mut v = 0u64;
        for half in 0..u64::from(load.size / 4) {
            v |= u64::from(msix_read32(env, rid, gpa + 4 * half)) << (32 * half);
        }
        let old = cpu.gpr(load.dest);
        cpu.set_gpr(load.dest, load.merge(old, v));
    } else if let Some(store) = d.store().filter(|s| matches!(s.size, 4 | 8) && !s.exchange) {
        let value = match store.source {
            crate::insn::StoreSource::Immediate(v) => v,
            crate::insn::StoreSource::Register(r) => cpu.gpr(r),
        };
        for half in 0..u64::from(store.size / 4) {
            msix_write32(env, rid, gpa + 4 * half, (value >> (32 * half)) as u32);
        }
    } else {
        log::error!(
            "cpu {}: unsupported MSI-X table access {:?} at {gpa:#x} (rip {:#x}); skipped",
            env.cpu_index(),
            d.mnemonic(),
            cpu.rip()
        );
    }
    cpu.set_rip(next);
    Some(super::Outcome::Resume)
}

/// Entry and dword of `gpa` in `t`, if it is in the table.
fn entry_of(t: &crate::partition::MsixTable, gpa: u64) -> Option<(u16, u64)> {
    let off = gpa.checked_sub(t.base)?;
    let i = u16::try_from(off / 16).ok().filter(|i| *i < t.entries)?;
    Some((i, (off % 16) & !3))
}

fn msix_read32(env: &mut impl Env, rid: u16, gpa: u64) -> u32 {
    let shadow = env.hv().msix.lock().get(&rid).and_then(|t| {
        let (i, field) = entry_of(t, gpa)?;
        let e = t.shadow.get(usize::from(i))?;
        match field {
            0 => Some(e.addr as u32),
            4 => Some((e.addr >> 32) as u32),
            8 => Some(e.data),
            _ => None,
        }
    });
    shadow.unwrap_or_else(|| env.mmio_read(gpa & !3, 4))
}

/// A store of the owner's into a trapped MSI-X table page. One at a
/// time, machine-wide: each works on a copy of the table's shadow and puts
/// it back, which two processors writing different entries at once would
/// otherwise race on (writes are rare: at setup and affinity changes).
fn msix_write32(env: &mut impl Env, rid: u16, gpa: u64, value: u32) {
    crate::hv::hold(&env.hv().msix_writer);
    msix_write32_alone(env, rid, gpa, value);
    crate::hv::release(&env.hv().msix_writer);
}

fn msix_write32_alone(env: &mut impl Env, rid: u16, gpa: u64, value: u32) {
    let Some(mut t) = env.hv().msix.lock().get(&rid).cloned() else {
        return;
    };
    let Some((i, field)) = entry_of(&t, gpa) else {
        env.mmio_write(gpa & !3, 4, value);
        return;
    };
    if let Some(e) = t.shadow.get_mut(usize::from(i)) {
        match field {
            0 => e.addr = (e.addr & !0xffff_ffff) | u64::from(value),
            4 => e.addr = (e.addr & 0xffff_ffff) | u64::from(value) << 32,
            8 => e.data = value,
            _ => {}
        }
    }
    let control = t.base + u64::from(i) * 16 + 12;
    if field == 12 {
        // Vector control: an unmask reaches the function after its entry
        // is written; a mask before the entry goes.
        let unmasked = value & 1 == 0;
        if unmasked {
            program_entry(env, rid, &mut t, i, true);
            env.mmio_write(control, 4, value);
        } else {
            env.mmio_write(control, 4, value);
            program_entry(env, rid, &mut t, i, false);
        }
    } else {
        let unmasked = env.mmio_read(control, 4) & 1 == 0;
        program_entry(env, rid, &mut t, i, unmasked);
    }
    if let Some(slot) = env.hv().msix.lock().get_mut(&rid) {
        slot.shadow = t.shadow;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_function_has_its_first_refusals_logged_whatever_the_others_did() {
        let mut logged = alloc::collections::BTreeMap::new();
        let mut n = 0;
        let mut log = |n: &mut u64, rid| {
            *n += 1;
            logs_refusal(&mut logged, rid, *n)
        };
        // A busy function: its first eight, then silence.
        assert!((0..8).all(|_| log(&mut n, 0x0100)));
        assert!((0..20).all(|_| !log(&mut n, 0x0100)));
        // The next function still gets its first eight.
        assert!((0..8).all(|_| log(&mut n, 0x0210)));
        assert!(!log(&mut n, 0x0210));
        // Beyond LOG_FUNCTIONS functions, the count of all decides.
        for rid in 0..LOG_FUNCTIONS as u16 {
            log(&mut n, 0x1000 + rid);
        }
        assert!(!log(&mut n, 0x2000));
        // Every 1024th of all, whoever sent it.
        n = 1023;
        assert!(log(&mut n, 0x0100));
        assert!(!log(&mut n, 0x2000));
    }
}
