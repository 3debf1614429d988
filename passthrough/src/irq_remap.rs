//! Interrupt remapping as pure logic: what an interrupt message asks for,
//! whether its source's owner may ask for it, and the remapping entry and
//! the message that deliver it through the IOMMU instead.
//!
//! A message in compatibility format names its processor itself: address
//! 0xFEEx_xxxx carries the destination, data the vector and the delivery
//! mode (Intel SDM Vol. 3A §12.11.1, §12.11.2). Whoever programs a function
//! (or writes by DMA to 0xFEEx_xxxx) chooses any processor and any delivery
//! mode, INIT and NMI included. With remapping, the message names an entry
//! instead, and the entry (written by thinhv) names the processor:
//!
//! * VT-d (Intel VT-d 4.x §5.1): one table for the whole unit. A message
//!   in remappable format (address bit 4) carries a 16-bit handle; its
//!   entry checks the requester (source validation, SVT 01b, an exact
//!   routing ID), so one function cannot use another's entry. Messages in
//!   compatibility format are blocked when GSTS.CFIS is clear.
//! * AMD-Vi (AMD IOMMU 48882 §2.2.5): one table per device, named by its
//!   device table entry; fixed and arbitrated messages are looked up by
//!   data bits 10:0 (IntCtl 10b), so a device reaches only the entries of
//!   its own table. NMI, INIT, ExtINT, LINT0/1 pass only where their pass
//!   bits are set; SMI by SysMgt.
//!
//! [`judge`] decides a request against its owner's processors
//! ([`Cores`]), [`vtd`] and [`amdvi`] encode entries and messages, and
//! [`Slots`] hands out entries per source, the same entry again when a
//! source reprograms the same vector slot.
// Register fields are extracted by mask and shift; a table has at most
// 65536 entries (`Slots::new`).
#![allow(clippy::cast_possible_truncation)]

use alloc::vec::Vec;

/// The interrupt address window (Intel SDM Vol. 3A §12.11.1).
pub const MSI_WINDOW: u64 = 0xfee0_0000;

/// Delivery mode (MSI data bits 10:8, I/O APIC redirection entry bits
/// 10:8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Fixed.
    Fixed,
    /// Lowest priority (arbitrated).
    Lowest,
    /// SMI.
    Smi,
    /// NMI.
    Nmi,
    /// INIT.
    Init,
    /// ExtINT (the 8259's vector).
    ExtInt,
    /// 011b and 110b.
    Reserved(u8),
}

impl Delivery {
    /// From the 3-bit field.
    pub const fn from_bits(b: u8) -> Self {
        match b & 7 {
            0 => Self::Fixed,
            1 => Self::Lowest,
            2 => Self::Smi,
            4 => Self::Nmi,
            5 => Self::Init,
            7 => Self::ExtInt,
            r => Self::Reserved(r),
        }
    }

    /// The 3-bit field.
    pub const fn bits(self) -> u8 {
        match self {
            Self::Fixed => 0,
            Self::Lowest => 1,
            Self::Smi => 2,
            Self::Nmi => 4,
            Self::Init => 5,
            Self::ExtInt => 7,
            Self::Reserved(r) => r & 7,
        }
    }
}

/// Who a compatibility-format message is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dest {
    /// One APIC ID (physical mode); 0xFF is the broadcast.
    Physical(u8),
    /// A logical destination (flat or cluster, as the processors' logical
    /// IDs say).
    Logical(u8),
}

/// A decoded compatibility-format interrupt request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Destination.
    pub dest: Dest,
    /// Vector.
    pub vector: u8,
    /// Delivery mode.
    pub delivery: Delivery,
    /// Level-triggered (true) or edge.
    pub level: bool,
}

/// Why a request gets no entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The address is not in the interrupt window, or sets bits that are
    /// reserved in compatibility format (the remappable-format bit
    /// included: a source that does not know of remapping never sets it).
    Malformed,
    /// The destination names a processor the owner does not have (or the
    /// physical broadcast, which reaches every processor).
    Foreign,
    /// A delivery mode no source of this owner may use.
    Delivery(Delivery),
    /// A vector below 16 (reserved for exceptions; a processor refuses it
    /// with an APIC error).
    Vector(u8),
    /// The table has no free entry.
    Full,
    /// The processor's APIC ID does not fit the entry format (AMD-Vi's
    /// 32-bit entries and VT-d's xAPIC-mode entries carry 8 bits, of which
    /// 0xFF is the broadcast; above that needs x2APIC destinations).
    Wide(u32),
}

impl Refusal {
    /// For the log.
    pub const fn describe(self) -> &'static str {
        match self {
            Self::Malformed => "not a compatibility-format interrupt message",
            Self::Foreign => "its destination is not one of its owner's processors",
            Self::Delivery(_) => "its delivery mode is not one its owner's devices may use",
            Self::Vector(_) => "its vector is reserved",
            Self::Full => "the interrupt remapping table is full",
            Self::Wide(_) => "the APIC ID does not fit the remapping entry",
        }
    }
}

/// Decodes an MSI or MSI-X message (`addr`, `data`) in compatibility
/// format.
pub const fn decode_msi(addr: u64, data: u32) -> Result<Request, Refusal> {
    // Bits 31:20 the window, 19:12 the destination, 11:4 reserved (bit 4
    // is VT-d's remappable format), 3 redirection hint, 2 destination mode.
    if addr & !0xf_fffc != MSI_WINDOW || addr & 0xff0 != 0 {
        return Err(Refusal::Malformed);
    }
    let id = ((addr >> 12) & 0xff) as u8;
    let dest = if addr & 4 != 0 {
        Dest::Logical(id)
    } else {
        Dest::Physical(id)
    };
    Ok(Request {
        dest,
        vector: (data & 0xff) as u8,
        delivery: Delivery::from_bits(((data >> 8) & 7) as u8),
        level: data & (1 << 15) != 0,
    })
}

/// Decodes an I/O APIC redirection entry in compatibility format (82093AA
/// datasheet §3.2.4): vector 7:0, delivery 10:8, destination mode 11,
/// trigger 15, destination 63:56.
pub const fn decode_ioapic(rte: u64) -> Result<Request, Refusal> {
    if rte & (1 << 48) != 0 {
        return Err(Refusal::Malformed);
    }
    let id = (rte >> 56) as u8;
    let dest = if rte & (1 << 11) != 0 {
        Dest::Logical(id)
    } else {
        Dest::Physical(id)
    };
    Ok(Request {
        dest,
        vector: (rte & 0xff) as u8,
        delivery: Delivery::from_bits(((rte >> 8) & 7) as u8),
        level: rte & (1 << 15) != 0,
    })
}

/// The processors of one owner (the OS, or one appliance), as an interrupt
/// destination resolves against them.
pub trait Cores {
    /// Whether the processor with this APIC ID is the owner's.
    fn has(&self, apic_id: u32) -> bool;
    /// The owner's processors that an 8-bit logical destination names, in
    /// order, as APIC IDs; and whether it names any other processor (one
    /// that is not the owner's).
    fn logical(&self, dest: u8, out: &mut Vec<u32>) -> bool;
}

/// What an owner's sources may send beyond fixed and lowest-priority
/// interrupts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// NMI to the owner's own processors.
    pub nmi: bool,
    /// ExtINT (the I/O APIC's virtual wire from the OS's 8259).
    pub extint: bool,
}

/// A judged request: one processor, physical destination mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    /// APIC ID.
    pub apic_id: u32,
    /// Vector (ignored for NMI and ExtINT).
    pub vector: u8,
    /// Fixed, lowest priority, NMI or ExtINT.
    pub delivery: Delivery,
    /// Level-triggered.
    pub level: bool,
}

/// Decides `req` for a source of the owner whose processors are `cores`.
/// A logical destination becomes the first processor it names (Linux
/// programs one processor per message; lowest priority may pick any of
/// them), and is refused whole if it names any processor that is not the
/// owner's. Every entry is written in physical mode, so it reaches exactly
/// the processor judged here, whatever logical IDs are programmed later.
pub fn judge(req: &Request, cores: &impl Cores, policy: Policy) -> Result<Target, Refusal> {
    match req.delivery {
        Delivery::Fixed | Delivery::Lowest => {
            if req.vector < 16 {
                return Err(Refusal::Vector(req.vector));
            }
        }
        Delivery::Nmi if policy.nmi => {}
        Delivery::ExtInt if policy.extint => {}
        d => return Err(Refusal::Delivery(d)),
    }
    let apic_id = match req.dest {
        Dest::Physical(0xff) => return Err(Refusal::Foreign),
        Dest::Physical(id) => {
            if !cores.has(u32::from(id)) {
                return Err(Refusal::Foreign);
            }
            u32::from(id)
        }
        Dest::Logical(mask) => {
            let mut named = Vec::new();
            if cores.logical(mask, &mut named) {
                return Err(Refusal::Foreign);
            }
            *named.first().ok_or(Refusal::Foreign)?
        }
    };
    Ok(Target {
        apic_id,
        vector: req.vector,
        delivery: req.delivery,
        level: req.level,
    })
}

/// Who an entry is for: a source (routing ID, or the I/O APIC's) and its
/// slot there (MSI-X table entry, MSI vector, I/O APIC pin).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key {
    /// The source's routing ID (VT-d: the one its entry validates).
    pub source: u16,
    /// The slot within the source.
    pub slot: u16,
}

/// Entries of one remapping table, handed out by key.
#[derive(Clone, Debug)]
pub struct Slots {
    keys: Vec<Option<Key>>,
}

impl Slots {
    /// A table of `n` entries (at most 65536), all free.
    pub fn new(n: usize) -> Self {
        assert!(n <= 1 << 16, "a remapping table has at most 65536 entries");
        Self {
            keys: alloc::vec![None; n],
        }
    }

    /// The entry of `key`: the one it has, else `preferred` if free, else
    /// the first free one.
    pub fn assign(&mut self, key: Key, preferred: Option<u16>) -> Result<u16, Refusal> {
        if let Some(i) = self.index_of(key) {
            return Ok(i);
        }
        let pick = preferred
            .filter(|&p| self.keys.get(usize::from(p)) == Some(&None))
            .map(usize::from)
            .or_else(|| self.keys.iter().position(Option::is_none))
            .ok_or(Refusal::Full)?;
        self.keys[pick] = Some(key);
        Ok(pick as u16)
    }

    /// The entry of `key`: the one it has, else the first free one in
    /// `range` (the share of the table its source may use, so that no
    /// source takes another's entries however many it asks for).
    pub fn assign_within(
        &mut self,
        key: Key,
        range: core::ops::Range<usize>,
    ) -> Result<u16, Refusal> {
        if let Some(i) = self.index_of(key) {
            return Ok(i);
        }
        let end = range.end.min(self.keys.len());
        let pick = (range.start.min(end)..end)
            .find(|&i| self.keys[i].is_none())
            .ok_or(Refusal::Full)?;
        self.keys[pick] = Some(key);
        Ok(pick as u16)
    }

    /// The entry `key` has.
    pub fn index_of(&self, key: Key) -> Option<u16> {
        self.keys
            .iter()
            .position(|k| *k == Some(key))
            .map(|i| i as u16)
    }

    /// Frees the entry of `key`; returns it.
    pub fn release(&mut self, key: Key) -> Option<u16> {
        let i = self.index_of(key)?;
        self.keys[usize::from(i)] = None;
        Some(i)
    }

    /// Frees every entry of `source` (its function changed hands or was
    /// reset); returns them.
    pub fn release_source(&mut self, source: u16) -> Vec<u16> {
        let mut freed = Vec::new();
        for (i, k) in self.keys.iter_mut().enumerate() {
            if k.is_some_and(|k| k.source == source) {
                *k = None;
                freed.push(i as u16);
            }
        }
        freed
    }

    /// Entries in use.
    pub fn used(&self) -> usize {
        self.keys.iter().filter(|k| k.is_some()).count()
    }
}

/// VT-d interrupt remapping (Intel VT-d 4.x §5.1, §9.10, §11.4.8.2).
/// Messages in compatibility format (Intel SDM Vol. 3A §11.11), as thinhv
/// writes them into a function whose messages it judges but no remapping
/// table holds (VT-d, where thinhv does not enable interrupt remapping).
pub mod compat {
    use super::{Delivery, Refusal, Target};

    /// The message for `t`: physical destination mode, its delivery mode,
    /// vector and trigger (level messages assert). An APIC ID above 255
    /// does not fit the address.
    pub fn msi(t: &Target) -> Result<(u64, u32), Refusal> {
        let id = u8::try_from(t.apic_id).map_err(|_| Refusal::Wide(t.apic_id))?;
        let mode: u32 = match t.delivery {
            Delivery::Fixed => 0,
            Delivery::Lowest => 1,
            Delivery::Nmi => 4,
            Delivery::ExtInt => 7,
            d => return Err(Refusal::Delivery(d)),
        };
        let level = if t.level { 3 << 14 } else { 0 };
        Ok((
            0xfee0_0000 | u64::from(id) << 12,
            level | mode << 8 | u32::from(t.vector),
        ))
    }
}

/// I/O APIC redirection entries in compatibility format, as thinhv writes
/// them for an entry the OS programmed (82093AA datasheet §3.2.4).
pub mod ioapic {
    use super::{Delivery, Target};

    /// Interrupt mask.
    pub const MASK: u64 = 1 << 16;
    /// Trigger mode: level.
    pub const LEVEL: u64 = 1 << 15;
    /// Remote IRR (read-only).
    pub const REMOTE_IRR: u64 = 1 << 14;
    /// Input pin polarity: active low.
    pub const ACTIVE_LOW: u64 = 1 << 13;
    /// Delivery status (read-only).
    pub const DELIVERY_STATUS: u64 = 1 << 12;
    /// The bits the hardware keeps, whatever is written.
    pub const READ_ONLY: u64 = REMOTE_IRR | DELIVERY_STATUS;

    /// The entry for `t`, judged from the OS's entry `rte`: its pin's
    /// polarity and mask as the OS wrote them, and `t` in physical
    /// destination mode. `None` for a processor the 8-bit destination
    /// cannot name.
    pub fn physical(rte: u64, t: &Target) -> Option<u64> {
        let id = u8::try_from(t.apic_id).ok()?;
        let mode: u64 = match t.delivery {
            Delivery::Fixed => 0,
            Delivery::Lowest => 1,
            Delivery::Nmi => 4,
            Delivery::ExtInt => 7,
            _ => return None,
        };
        Some(
            u64::from(id) << 56
                | (rte & (MASK | ACTIVE_LOW))
                | if t.level { LEVEL } else { 0 }
                | mode << 8
                | u64::from(t.vector),
        )
    }

    /// A masked entry that names no one: for an entry the OS may not have
    /// (the pin, its polarity and trigger mode, kept as it wrote them).
    pub const fn refused(rte: u64) -> u64 {
        MASK | (rte & (LEVEL | ACTIVE_LOW | 0xff))
    }
}

pub mod vtd {
    use super::{Delivery, Refusal, Target};

    /// IRTA: the table's address, x2APIC destinations (EIME, bit 11) and
    /// its size as 2^(S+1) entries (S in bits 3:0).
    pub const fn irta(table_pa: u64, entries_log2: u8, x2apic: bool) -> u64 {
        (table_pa & !0xfff)
            | ((x2apic as u64) << 11)
            | ((entries_log2.saturating_sub(1) & 0xf) as u64)
    }

    /// The entry for `t`, usable only by the source with routing ID `sid`
    /// (SVT 01b, SQ 00b: all 16 bits compared). Physical destination mode,
    /// no redirection hint; the destination in bits 47:40 (xAPIC) or 63:32
    /// (x2APIC, EIME set).
    pub const fn irte(t: &Target, sid: u16, x2apic: bool) -> Result<[u64; 2], Refusal> {
        irte_validated(t, sid, 0, SVT_SID, x2apic)
    }

    /// SVT 01b: the whole source ID is compared (SQ 00b).
    pub const SVT_SID: u8 = 1;
    /// SVT 10b: the requester's bus must lie within SID's buses, the first
    /// in bits 15:8 and the last in bits 7:0 (VT-d §9.10).
    pub const SVT_BUSES: u8 = 2;

    /// The entry for `t`, usable only by the requesters whose bus lies in
    /// `first..=last` (SVT 10b): a function behind a PCI Express to PCI
    /// bridge, whose messages carry the bridge's secondary bus.
    pub const fn irte_buses(
        t: &Target,
        first: u8,
        last: u8,
        x2apic: bool,
    ) -> Result<[u64; 2], Refusal> {
        if first > last {
            return Err(Refusal::Malformed);
        }
        irte_validated(t, (first as u16) << 8 | last as u16, 0, SVT_BUSES, x2apic)
    }

    /// The entry for `t` with source validation `svt` of `sid` qualified by
    /// `sq` (which low function bits SVT 01b ignores): what [`irte`] and
    /// [`irte_buses`] write, and what an OS entry is composed into
    /// (`vvtd::compose`).
    pub const fn irte_validated(
        t: &Target,
        sid: u16,
        sq: u8,
        svt: u8,
        x2apic: bool,
    ) -> Result<[u64; 2], Refusal> {
        let dst = if x2apic {
            t.apic_id as u64
        } else if t.apic_id >= 0xff {
            // 0xFF is the broadcast in an 8-bit destination.
            return Err(Refusal::Wide(t.apic_id));
        } else {
            (t.apic_id as u64) << 8
        };
        let lo = 1 // P
            | ((t.level as u64) << 4)
            | ((t.delivery.bits() as u64) << 5)
            | ((t.vector as u64) << 16)
            | (dst << 32);
        let hi = (sid as u64) | (((sq & 3) as u64) << 16) | (((svt & 3) as u64) << 18);
        Ok([lo, hi])
    }

    /// An entry that is not present: a message naming it faults.
    pub const NOT_PRESENT: [u64; 2] = [0, 0];

    /// The message naming entry `handle` (remappable format, no subhandle):
    /// address 0xFEE, handle 14:0 in bits 19:5, format bit 4, handle 15 in
    /// bit 2; data 0.
    pub const fn msi(handle: u16) -> (u64, u32) {
        let h = handle as u64;
        (
            super::MSI_WINDOW | ((h & 0x7fff) << 5) | (1 << 4) | ((h >> 15) << 2),
            0,
        )
    }

    /// The handle a remappable-format message names, if it is one
    /// (subhandle valid: handle + data bits 15:0).
    pub const fn handle_of(addr: u64, data: u32) -> Option<u16> {
        if addr & !0xf_ffff != super::MSI_WINDOW || addr & (1 << 4) == 0 {
            return None;
        }
        let mut h = ((addr >> 5) & 0x7fff) | (((addr >> 2) & 1) << 15);
        if addr & (1 << 3) != 0 {
            h = h.wrapping_add((data & 0xffff) as u64);
        }
        Some(h as u16)
    }

    /// An I/O APIC redirection entry in remappable format for entry
    /// `handle`: handle 14:0 in bits 63:49, format bit 48, handle 15 in
    /// bit 11; vector and trigger mode as the entry has them (the I/O APIC
    /// matches EOIs by vector); polarity and mask as the OS wrote them.
    pub const fn ioapic_rte(handle: u16, t: &Target, active_low: bool, masked: bool) -> u64 {
        let h = handle as u64;
        ((h & 0x7fff) << 49)
            | (1 << 48)
            | ((masked as u64) << 16)
            | ((t.level as u64) << 15)
            | ((active_low as u64) << 13)
            | ((h >> 15) << 11)
            | (t.vector as u64)
    }

    /// The entry's destination and vector, for the log and the tests.
    pub const fn target_of(e: [u64; 2], x2apic: bool) -> Option<Target> {
        if e[0] & 1 == 0 {
            return None;
        }
        let dst = (e[0] >> 32) as u32;
        Some(Target {
            apic_id: if x2apic { dst } else { (dst >> 8) & 0xff },
            vector: (e[0] >> 16) as u8,
            delivery: Delivery::from_bits(((e[0] >> 5) & 7) as u8),
            level: e[0] & (1 << 4) != 0,
        })
    }
}

/// AMD-Vi interrupt remapping (AMD IOMMU 48882 rev. 3.x §2.2.5, device
/// table entry bits 191:128 in Table 7).
pub mod amdvi {
    use super::{Delivery, Refusal, Target};

    /// Entries per device table: fixed and arbitrated messages index by
    /// data bits 10:0 with bits 10:8 their delivery mode (000b, 001b), so
    /// no index above 511 can be reached by one.
    pub const ENTRIES: usize = 512;
    /// IntTabLen for [`ENTRIES`] (2^9).
    pub const INT_TAB_LEN: u64 = 9;

    /// A function's part of a table it shares with other functions
    /// (behind one conventional bridge their messages carry the same IDs,
    /// so one table must serve them all): entries `first..first + len`.
    /// Its slots are numbered as in a table of its own ([`Share::OWN`]):
    /// MSI-X entries from 0, the MSI message at `ENTRIES - 1`, the entry
    /// that is never written at `ENTRIES - 2`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Share {
        /// First entry.
        pub first: u16,
        /// Entries.
        pub len: u16,
    }

    /// The fewest entries a share has: the MSI message, the entry never
    /// written, and room for MSI-X.
    pub const MIN_SHARE: usize = 8;

    impl Share {
        /// A table of the function's own.
        pub const OWN: Self = Self {
            first: 0,
            len: ENTRIES as u16,
        };

        /// The `i`th of `n` equal shares of a table, or `None` where they
        /// would be smaller than [`MIN_SHARE`] (or `i` is not below `n`).
        pub const fn nth(i: usize, n: usize) -> Option<Self> {
            if n == 0 || i >= n || ENTRIES / n < MIN_SHARE {
                return None;
            }
            let len = ENTRIES / n;
            Some(Self {
                first: (i * len) as u16,
                len: len as u16,
            })
        }

        /// The table's entry for the function's `slot`, or `None` where
        /// its share has no room for it.
        pub const fn index(self, slot: u16) -> Option<u16> {
            let msi = ENTRIES as u16 - 1;
            let k = if slot == msi {
                self.len - 1
            } else if slot == msi - 1 {
                self.len - 2
            } else if slot < self.len - 2 {
                slot
            } else {
                return None;
            };
            Some(self.first + k)
        }

        /// The entry that is never written (`ENTRIES - 2`'s): what a
        /// refused message names.
        pub const fn never(self) -> u16 {
            self.first + self.len - 2
        }
    }

    /// `e` (a device table entry) with interrupts remapped through the
    /// table at `table` (IV, IntTabLen, IntTableRootPtr, IntCtl 10b): fixed
    /// and arbitrated messages go through the table; INIT, NMI, ExtINT,
    /// LINT0/1 are target-aborted (pass bits clear) unless `pass` names
    /// them (ExtINT and LINT for the I/O APIC's virtual wire); SMIs are
    /// blocked (SysMgt 00b).
    pub const fn dte(mut e: [u64; 4], table: u64, extint: bool) -> [u64; 4] {
        e[1] &= !(3 << 40);
        let mut q2 = 1 // IV
            | (INT_TAB_LEN << 1)
            | (table & 0x000f_ffff_ffff_ffc0)
            | (2 << 60); // IntCtl 10b
        if extint {
            q2 |= (1 << 57) | (1 << 62) | (1 << 63); // EIntPass, Lint0Pass, Lint1Pass
        }
        e[2] = q2;
        e
    }

    /// Device table entry bits 191:128 (`e[2]`) that abort every
    /// interrupt of the device: IV set, IntCtl 00b (fixed and arbitrated
    /// messages target-aborted), no pass bit (INIT, NMI, ExtINT, LINT0/1
    /// aborted), no table. (SMIs follow SysMgt, bits 105:104 in `e[1]`,
    /// which thinhv's entries leave 00b: blocked.)
    pub const ABORT_ALL: u64 = 1;

    /// Whether a device table entry's bits 191:128 leave the device's
    /// interrupts unremapped (IV clear: they pass as sent).
    pub const fn passes_unremapped(q2: u64) -> bool {
        q2 & 1 == 0
    }

    /// The 32-bit entry for `t`: RemapEn, IntType, DM 0 (physical),
    /// Destination 15:8, Vector 23:16.
    pub const fn irte(t: &Target) -> Result<u32, Refusal> {
        // 0xFF is the broadcast in an 8-bit destination.
        if t.apic_id >= 0xff {
            return Err(Refusal::Wide(t.apic_id));
        }
        let int_type = match t.delivery {
            Delivery::Fixed => 0,
            Delivery::Lowest => 1,
            // NMI and ExtINT do not go through the table: their pass bits.
            d => return Err(Refusal::Delivery(d)),
        };
        Ok(1 | (int_type << 2) | (t.apic_id << 8) | ((t.vector as u32) << 16))
    }

    /// The message naming entry `index` of the source's own table:
    /// address 0xFEE0_0000, data the index (bits 10:0; below 512, so a
    /// fixed-delivery message).
    pub const fn msi(index: u16) -> (u64, u32) {
        (super::MSI_WINDOW, (index & 0x1ff) as u32)
    }

    /// An I/O APIC redirection entry naming entry `index` of the I/O
    /// APIC's table: vector field the index, fixed delivery, physical
    /// destination 0, trigger and polarity and mask as the OS wrote them.
    /// The I/O APIC matches a broadcast EOI against the vector field, so
    /// the I/O APIC's entries are allocated at the index of their vector.
    pub const fn ioapic_rte(index: u8, level: bool, active_low: bool, masked: bool) -> u64 {
        (index as u64)
            | ((active_low as u64) << 13)
            | ((level as u64) << 15)
            | ((masked as u64) << 16)
    }

    /// The entry's destination and vector.
    pub const fn target_of(e: u32) -> Option<Target> {
        if e & 1 == 0 {
            return None;
        }
        Some(Target {
            apic_id: (e >> 8) & 0xff,
            vector: (e >> 16) as u8,
            delivery: if (e >> 2) & 7 == 1 {
                Delivery::Lowest
            } else {
                Delivery::Fixed
            },
            level: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_of_a_table_are_disjoint_and_keep_each_functions_slots_apart() {
        use amdvi::{ENTRIES, MIN_SHARE, Share};
        let msi = ENTRIES as u16 - 1;
        // A table of its own: every slot is its entry.
        assert_eq!(Share::OWN.index(0), Some(0));
        assert_eq!(Share::OWN.index(509), Some(509));
        assert_eq!(Share::OWN.index(msi), Some(msi));
        assert_eq!(Share::OWN.never(), msi - 1);
        for n in 1..=ENTRIES / MIN_SHARE {
            let mut seen = alloc::vec![false; ENTRIES];
            for i in 0..n {
                let s = Share::nth(i, n).unwrap();
                assert!(usize::from(s.len) >= MIN_SHARE);
                let mut mine = alloc::vec::Vec::new();
                for slot in (0..s.len - 2).chain([msi - 1, msi]) {
                    mine.push(s.index(slot).unwrap());
                }
                if n > 1 {
                    // Beyond its room for MSI-X entries.
                    assert_eq!(s.index(s.len - 2), None);
                    assert_eq!(s.index(msi - 2), None);
                }
                assert_eq!(s.index(msi - 1), Some(s.never()));
                for e in mine {
                    let e = usize::from(e);
                    assert!(
                        e < ENTRIES && !seen[e],
                        "entry {e} of {n} shares given twice"
                    );
                    seen[e] = true;
                }
            }
        }
        assert_eq!(Share::nth(0, ENTRIES / MIN_SHARE + 1), None);
        assert_eq!(Share::nth(2, 2), None);
        assert_eq!(Share::nth(0, 0), None);
    }

    /// An owner with APIC IDs `ids`; in xAPIC flat mode each processor's
    /// logical ID is 1 << its position in `all` (every processor of the
    /// machine, in order).
    struct Owner {
        ids: Vec<u32>,
        all: Vec<u32>,
    }

    impl Cores for Owner {
        fn has(&self, id: u32) -> bool {
            self.ids.contains(&id)
        }
        fn logical(&self, dest: u8, out: &mut Vec<u32>) -> bool {
            let mut foreign = false;
            for (i, id) in self.all.iter().enumerate() {
                if dest & (1 << i) != 0 {
                    if self.has(*id) {
                        out.push(*id);
                    } else {
                        foreign = true;
                    }
                }
            }
            foreign
        }
    }

    fn os() -> Owner {
        Owner {
            ids: alloc::vec![0, 1],
            all: alloc::vec![0, 1, 2, 3],
        }
    }

    #[test]
    fn linux_messages_decode() {
        // Physical, fixed, edge, vector 0x41 to APIC ID 1.
        assert_eq!(
            decode_msi(0xfee0_1000, 0x41),
            Ok(Request {
                dest: Dest::Physical(1),
                vector: 0x41,
                delivery: Delivery::Fixed,
                level: false
            })
        );
        // Logical, lowest priority, level.
        let r = decode_msi(0xfee0_3004, 0x8122).unwrap();
        assert_eq!(r.dest, Dest::Logical(3));
        assert_eq!(r.delivery, Delivery::Lowest);
        assert!(r.level);
        // NMI and INIT decode as what they are.
        assert_eq!(
            decode_msi(0xfee0_2000, 0x400).unwrap().delivery,
            Delivery::Nmi
        );
        assert_eq!(
            decode_msi(0xfee0_2000, 0x500).unwrap().delivery,
            Delivery::Init
        );
        // Not the window, a 64-bit address, remappable format, reserved bits.
        for addr in [0xfed0_0000, 0x1_fee0_0000, 0xfee0_0010, 0xfee0_0100] {
            assert_eq!(decode_msi(addr, 0x41), Err(Refusal::Malformed), "{addr:#x}");
        }
    }

    #[test]
    fn ioapic_entries_decode() {
        // Pin programmed by Linux: vector 0x30, fixed, physical, level,
        // active low, destination 1.
        let r = decode_ioapic(0x0100_0000_0000_a030).unwrap();
        assert_eq!(r.dest, Dest::Physical(1));
        assert_eq!(r.vector, 0x30);
        assert!(r.level);
        assert_eq!(
            decode_ioapic(0x0000_0000_0000_0700).unwrap().delivery,
            Delivery::ExtInt
        );
        assert_eq!(decode_ioapic(1 << 48), Err(Refusal::Malformed));
    }

    #[test]
    fn only_the_owners_processors_and_only_fixed_or_lowest_priority() {
        let owner = os();
        let p = Policy::default();
        let ok = decode_msi(0xfee0_1000, 0x41).unwrap();
        assert_eq!(
            judge(&ok, &owner, p),
            Ok(Target {
                apic_id: 1,
                vector: 0x41,
                delivery: Delivery::Fixed,
                level: false
            })
        );
        // An appliance's processor (APIC ID 2), the broadcast.
        for addr in [0xfee0_2000, 0xfeef_f000] {
            assert_eq!(
                judge(&decode_msi(addr, 0x41).unwrap(), &owner, p),
                Err(Refusal::Foreign)
            );
        }
        // NMI, INIT, SMI, ExtINT, reserved: refused even to its own.
        for (data, d) in [
            (0x400, Delivery::Nmi),
            (0x500, Delivery::Init),
            (0x200, Delivery::Smi),
            (0x700, Delivery::ExtInt),
            (0x300, Delivery::Reserved(3)),
        ] {
            assert_eq!(
                judge(&decode_msi(0xfee0_0000, data).unwrap(), &owner, p),
                Err(Refusal::Delivery(d))
            );
        }
        // Allowed by policy: NMI to its own, never to another's.
        let nmi = Policy {
            nmi: true,
            extint: false,
        };
        assert!(judge(&decode_msi(0xfee0_0000, 0x400).unwrap(), &owner, nmi).is_ok());
        assert_eq!(
            judge(&decode_msi(0xfee0_3000, 0x400).unwrap(), &owner, nmi),
            Err(Refusal::Foreign)
        );
        // Exception vectors.
        assert_eq!(
            judge(&decode_msi(0xfee0_0000, 0x02).unwrap(), &owner, p),
            Err(Refusal::Vector(2))
        );
    }

    #[test]
    fn a_logical_destination_is_the_owners_first_or_refused_whole() {
        let owner = os();
        let p = Policy::default();
        // Flat mask 0b10: processor 1.
        let t = judge(&decode_msi(0xfee0_2004, 0x41).unwrap(), &owner, p).unwrap();
        assert_eq!(t.apic_id, 1);
        // 0b11: both the OS's; the first.
        let t = judge(&decode_msi(0xfee0_3004, 0x141).unwrap(), &owner, p).unwrap();
        assert_eq!(t.apic_id, 0);
        // 0b110: includes processor 2, the appliance's.
        assert_eq!(
            judge(&decode_msi(0xfee0_6004, 0x41).unwrap(), &owner, p),
            Err(Refusal::Foreign)
        );
        // 0: names no one.
        assert_eq!(
            judge(&decode_msi(0xfee0_0004, 0x41).unwrap(), &owner, p),
            Err(Refusal::Foreign)
        );
    }

    #[test]
    fn entries_are_kept_per_source_and_slot() {
        let mut s = Slots::new(4);
        let a0 = Key {
            source: 0x100,
            slot: 0,
        };
        let a1 = Key {
            source: 0x100,
            slot: 1,
        };
        let b0 = Key {
            source: 0x200,
            slot: 0,
        };
        assert_eq!(s.assign(a0, None), Ok(0));
        assert_eq!(s.assign(a1, None), Ok(1));
        // Reprogramming the same slot keeps its entry.
        assert_eq!(s.assign(a0, Some(3)), Ok(0));
        // A preferred index where free.
        assert_eq!(s.assign(b0, Some(3)), Ok(3));
        assert_eq!(s.used(), 3);
        assert_eq!(s.release_source(0x100), alloc::vec![0, 1]);
        assert_eq!(s.release(b0), Some(3));
        assert_eq!(s.release(b0), None);
        for slot in 0..4 {
            s.assign(Key { source: 1, slot }, None).unwrap();
        }
        assert_eq!(
            s.assign(Key { source: 2, slot: 0 }, None),
            Err(Refusal::Full)
        );
    }

    #[test]
    fn vtd_entries_validate_the_source_and_name_one_processor() {
        let t = Target {
            apic_id: 3,
            vector: 0x41,
            delivery: Delivery::Lowest,
            level: true,
        };
        let e = vtd::irte(&t, 0x0108, false).unwrap();
        // P, TM, DLM 001b, vector, destination in 47:40; DM 0, RH 0.
        assert_eq!(e[0], 1 | 1 << 4 | 1 << 5 | 0x41 << 16 | 3 << 40);
        // SID 01:01.0, SQ 00b, SVT 01b.
        assert_eq!(e[1], 0x0108 | 1 << 18);
        assert_eq!(vtd::target_of(e, false), Some(t));
        // x2APIC: the whole 32 bits; xAPIC refuses what does not fit.
        let wide = Target {
            apic_id: 0x1_0003,
            ..t
        };
        assert_eq!(vtd::irte(&wide, 0, true).unwrap()[0] >> 32, 0x1_0003);
        assert_eq!(vtd::irte(&wide, 0, false), Err(Refusal::Wide(0x1_0003)));
        assert_eq!(vtd::target_of(vtd::NOT_PRESENT, false), None);
        // IRTA: 2^(S+1) entries, EIME.
        assert_eq!(vtd::irta(0x8_0000, 8, true), 0x8_0000 | 1 << 11 | 7);
        // Behind a PCI Express to PCI bridge: buses 2 to 4 (first in
        // 15:8, last in 7:0), SVT 10b; the rest as above.
        let e = vtd::irte_buses(&t, 2, 4, false).unwrap();
        assert_eq!(e[1], 0x0204 | 2 << 18);
        assert_eq!(e[0], vtd::irte(&t, 0x0108, false).unwrap()[0]);
        assert_eq!(vtd::irte_buses(&t, 4, 2, false), Err(Refusal::Malformed));
    }

    #[test]
    fn vtd_messages_name_their_handle_and_nothing_else() {
        for h in [0u16, 5, 0x7fff, 0x8000, 0xffff] {
            let (addr, data) = vtd::msi(h);
            assert_eq!(vtd::handle_of(addr, data), Some(h));
            // A remappable message is not a compatibility one.
            assert_eq!(decode_msi(addr, data), Err(Refusal::Malformed));
        }
        // Subhandle.
        assert_eq!(vtd::handle_of(0xfee0_0018, 7), Some(7));
        assert_eq!(vtd::handle_of(0xfee0_1000, 0x41), None);
        // The I/O APIC's entry: handle, format, vector and trigger as the
        // entry, polarity and mask as written.
        let t = Target {
            apic_id: 0,
            vector: 0x30,
            delivery: Delivery::Fixed,
            level: true,
        };
        let rte = vtd::ioapic_rte(0x8005, &t, true, true);
        assert_eq!(
            rte,
            5 << 49 | 1 << 48 | 1 << 16 | 1 << 15 | 1 << 13 | 1 << 11 | 0x30
        );
        assert_eq!(decode_ioapic(rte), Err(Refusal::Malformed));
    }

    #[test]
    fn compatibility_messages_name_the_judged_processor_in_physical_mode() {
        // Logical flat 0x02 (processor 1), lowest priority, level: the
        // message names APIC ID 1 physically and asserts.
        let r = decode_msi(0xfee0_2004, 0x8131).unwrap();
        let t = judge(&r, &os(), Policy::default()).unwrap();
        assert_eq!(compat::msi(&t), Ok((0xfee0_1000, 0xc131)));
        assert_eq!(
            decode_msi(0xfee0_1000, 0xc131).unwrap().dest,
            Dest::Physical(1)
        );
        let wide = Target {
            apic_id: 0x100,
            ..t
        };
        assert_eq!(compat::msi(&wide), Err(Refusal::Wide(0x100)));
    }

    #[test]
    fn io_apic_entries_in_physical_mode_with_the_pins_polarity() {
        // Logical (bit 11), lowest priority, level, active low, masked:
        // written as physical to the processor the judge chose.
        let rte = 0x0300_0000_0001_a931u64;
        let t = judge(&decode_ioapic(rte).unwrap(), &os(), Policy::default()).unwrap();
        let hw = ioapic::physical(rte, &t).unwrap();
        assert_eq!(hw, 0x0000_0000_0001_a131);
        assert_eq!(decode_ioapic(hw).unwrap().dest, Dest::Physical(0));
        let far = Target { apic_id: 300, ..t };
        assert_eq!(ioapic::physical(rte, &far), None);
        // An NMI at another partition's processor: masked, naming no one.
        let nmi = 0x0200_0000_0000_0400u64;
        assert_eq!(ioapic::refused(nmi), ioapic::MASK);
        assert_eq!(ioapic::refused(rte), 0x0001_a031);
    }

    #[test]
    fn amdvi_entries_and_messages() {
        let t = Target {
            apic_id: 2,
            vector: 0x41,
            delivery: Delivery::Lowest,
            level: false,
        };
        let e = amdvi::irte(&t).unwrap();
        assert_eq!(e, 1 | 1 << 2 | 2 << 8 | 0x41 << 16);
        assert_eq!(amdvi::target_of(e), Some(t));
        assert_eq!(
            amdvi::irte(&Target { apic_id: 256, ..t }),
            Err(Refusal::Wide(256))
        );
        assert_eq!(
            amdvi::irte(&Target {
                delivery: Delivery::Nmi,
                ..t
            }),
            Err(Refusal::Delivery(Delivery::Nmi))
        );
        // The message: index in data 10:0, a fixed-delivery one, and it
        // decodes as a harmless physical message to APIC ID 0 where no
        // IOMMU remaps it.
        let (addr, data) = amdvi::msi(300);
        assert_eq!((addr, data), (0xfee0_0000, 300));
        assert_eq!(decode_msi(addr, data).unwrap().delivery, Delivery::Lowest);
        assert_eq!(
            amdvi::ioapic_rte(0x30, true, true, false),
            0x30 | 1 << 13 | 1 << 15
        );
    }

    #[test]
    fn amdvi_device_entry_remaps_and_passes_only_the_virtual_wire() {
        let base = [0x1234_5003, 3 << 40 | 7, 0, 0];
        let e = amdvi::dte(base, 0x8_0000, false);
        assert_eq!(e[0], base[0]);
        assert_eq!(e[1], 7, "SysMgt 00b");
        assert_eq!(e[2], 1 | 9 << 1 | 0x8_0000 | 2 << 60);
        for bit in [56, 57, 58, 62, 63] {
            assert_eq!(e[2] >> bit & 1, 0, "bit {bit}");
        }
        let io = amdvi::dte(base, 0x8_0000, true);
        for bit in [57, 62, 63] {
            assert_eq!(io[2] >> bit & 1, 1, "bit {bit}");
        }
        for bit in [56, 58] {
            assert_eq!(io[2] >> bit & 1, 0, "bit {bit}");
        }
        assert!(!amdvi::passes_unremapped(e[2]));
        assert!(amdvi::passes_unremapped(base[2]), "IV clear: unremapped");
    }

    #[test]
    fn a_source_takes_entries_only_from_its_own_share() {
        let mut s = Slots::new(16);
        let k = |source, slot| Key { source, slot };
        assert_eq!(s.assign_within(k(1, 0), 4..6), Ok(4));
        assert_eq!(s.assign_within(k(1, 1), 4..6), Ok(5));
        assert_eq!(
            s.assign_within(k(1, 2), 4..6),
            Err(Refusal::Full),
            "its share is full"
        );
        assert_eq!(s.assign_within(k(1, 0), 4..6), Ok(4), "the one it has");
        assert_eq!(
            s.assign_within(k(2, 0), 6..99),
            Ok(6),
            "another share is untouched"
        );
        assert_eq!(
            s.assign_within(k(3, 0), 20..30),
            Err(Refusal::Full),
            "beyond the table"
        );
        s.release(k(1, 1));
        assert_eq!(s.assign_within(k(1, 2), 4..6), Ok(5));
    }

    #[test]
    fn amdvi_abort_all_refuses_every_kind_of_interrupt() {
        let q2 = amdvi::ABORT_ALL;
        assert!(!amdvi::passes_unremapped(q2), "IV set");
        assert_eq!(q2 >> 60 & 3, 0, "IntCtl 00b: fixed and arbitrated aborted");
        assert_eq!(q2 >> 1 & 0xf, 0, "no table");
        for bit in [56, 57, 58, 62, 63] {
            assert_eq!(q2 >> bit & 1, 0, "pass bit {bit} clear");
        }
    }
}
