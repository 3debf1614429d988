//! The AMD-Vi unit thinhv shows the OS (issue 14), as pure logic: its
//! registers, the command buffer, the event log, and the reads of the OS's
//! device table, I/O page tables and interrupt remapping tables, which
//! thinhv composes into the real unit's. The AMD-Vi counterpart of
//! [`crate::vvtd`], with the same rules: everything the OS programs is
//! untrusted, OS memory is touched only through [`OsMemory`] (a refusal is
//! the hardware error event the real unit would log, never a panic), and
//! a register write does bounded work (one pass over the command buffer,
//! at most 32768 commands).
//!
//! Offered (AMD I/O Virtualization Technology (IOMMU) Specification 48882,
//! rev. 3.x): the device table (up to 2 MiB), host page tables of 1 to 4
//! levels with level skipping and every page size (NextLevel 0 and 7), the
//! command buffer with COMPLETION_WAIT (store and interrupt),
//! INVALIDATE_DEVTAB_ENTRY, INVALIDATE_IOMMU_PAGES,
//! INVALIDATE_INTERRUPT_TABLE and INVALIDATE_IOMMU_ALL (EFR.IASup), the
//! event log, the exclusion range, interrupt remapping with 32-bit entries,
//! and where x2APIC is offered 128-bit entries (EFR.GASup with GAMSup 000b:
//! no guest virtual APIC) with 32-bit destinations (EFR.XTSup). Not offered
//! and clear in EFR: prefetch, peripheral page requests, guest (nested)
//! translation, device IOTLBs (INVALIDATE_IOTLB_PAGES is an illegal
//! command), the hardware error registers, performance counters, SMI
//! filters, 5- and 6-level tables (modes 5 and 6 are illegal).
//!
//! Read from QEMU's and Linux's use of the specification and not measured
//! on hardware: a device table entry with V clear passes DMA
//! untranslated (thinhv's protection still applies to it); one with V
//! set and TV clear passes none (Linux blocks devices so since 6.13, and
//! QEMU's model isolates them).
// Register and entry fields are extracted by mask and shift.
#![allow(clippy::cast_possible_truncation)]

use crate::irq_remap::{Cores, Delivery, Policy, Refusal, Target};
use crate::vvtd::{Denied, Flushes, OsIrte, OsMemory, Page, Scope, merge, part, read_u64s, sized};

/// Register offsets (AMD 48882 chapter 3).
pub use crate::amdvi::reg;

/// Control register bits.
pub mod ctrl {
    /// Translation (and the unit) enabled.
    pub const IOMMU_EN: u64 = 1 << 0;
    /// Event logging enabled.
    pub const EVENT_LOG_EN: u64 = 1 << 2;
    /// Event log interrupt enabled.
    pub const EVENT_INT_EN: u64 = 1 << 3;
    /// COMPLETION_WAIT interrupt enabled.
    pub const COM_WAIT_INT_EN: u64 = 1 << 4;
    /// Command buffer enabled.
    pub const CMD_BUF_EN: u64 = 1 << 12;
    /// 128-bit interrupt remapping entries (guest APIC, legacy mode only).
    pub const GA_EN: u64 = 1 << 17;
    /// x2APIC: 32-bit destinations in 128-bit entries.
    pub const XT_EN: u64 = 1 << 50;
    /// The unit's own interrupts through the IntCapXT registers (MMIO
    /// 170h to 180h) instead of its MSI capability.
    pub const INT_CAP_XT_EN: u64 = 1 << 51;
    /// Bits the OS may set: the enables above, InvTimeOut (7:5), PassPW,
    /// ResPassPW, Coherent, Isoc (8 to 11), HtTunEn (1).
    pub const KEPT: u64 = IOMMU_EN
        | (1 << 1)
        | EVENT_LOG_EN
        | EVENT_INT_EN
        | COM_WAIT_INT_EN
        | (0x7 << 5)
        | (0xf << 8)
        | CMD_BUF_EN;
}

/// Status register bits (MMIO 2020h).
pub mod status {
    /// The event log overflowed (write 1 to clear).
    pub const EVENT_OVERFLOW: u64 = 1 << 0;
    /// An event was logged (write 1 to clear).
    pub const EVENT_LOG_INT: u64 = 1 << 1;
    /// A COMPLETION_WAIT with I completed (write 1 to clear).
    pub const COM_WAIT_INT: u64 = 1 << 2;
    /// Event logging runs (read-only).
    pub const EVENT_LOG_RUN: u64 = 1 << 3;
    /// Command processing runs (read-only).
    pub const CMD_BUF_RUN: u64 = 1 << 4;
    /// The write-1-to-clear bits.
    pub const W1C: u64 = EVENT_OVERFLOW | EVENT_LOG_INT | COM_WAIT_INT;
}

/// Event codes (AMD 48882 §2.5).
pub mod event {
    /// A device table entry with reserved or unsupported settings.
    pub const ILLEGAL_DEV_TABLE_ENTRY: u8 = 0x1;
    /// A request the page tables (or the interrupt table) refused.
    pub const IO_PAGE_FAULT: u8 = 0x2;
    /// The device table could not be read.
    pub const DEV_TAB_HARDWARE_ERROR: u8 = 0x3;
    /// A page table (or interrupt table) could not be read.
    pub const PAGE_TAB_HARDWARE_ERROR: u8 = 0x4;
    /// A command the unit does not know or does not offer.
    pub const ILLEGAL_COMMAND_ERROR: u8 = 0x5;
    /// A command's memory access failed.
    pub const COMMAND_HARDWARE_ERROR: u8 = 0x6;
}

/// The register window (16 KiB).
pub const WINDOW: u64 = 0x4000;
/// The IntCapXT registers (where x2APIC is offered): the event log's, the
/// peripheral page request log's and the guest virtual APIC log's
/// interrupts, as the OS programs them: DM 2, destination 31:8 (bits
/// 23:0) and 63:56 (bits 31:24), vector 39:32.
pub const INT_CAP_XT: [u64; 3] = [0x170, 0x178, 0x180];
/// A page-selective invalidation larger than 2^MAX_ORDER pages is done as
/// the whole domain.
pub const MAX_ORDER: u8 = 9;

/// What thinhv offers the OS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offer {
    /// The OS's physical address width (bounds table entries; at most 52).
    pub host_width: u8,
    /// x2APIC destinations (EFR.XTSup, with EFR.GASup for the 128-bit
    /// entries they need).
    pub x2apic: bool,
}

impl Offer {
    /// EFR: IASup, and XTSup and GASup where x2APIC is offered; HATS 00b
    /// (4 levels).
    pub const fn efr(&self) -> u64 {
        (1 << 6) | if self.x2apic { (1 << 2) | (1 << 7) } else { 0 }
    }

    pub(crate) const fn kept(self) -> u64 {
        ctrl::KEPT
            | if self.x2apic {
                ctrl::GA_EN | ctrl::XT_EN | ctrl::INT_CAP_XT_EN
            } else {
                0
            }
    }

    const fn pa_mask(self) -> u64 {
        let w = if self.host_width > 52 {
            52
        } else if self.host_width < 32 {
            32
        } else {
            self.host_width
        };
        (1u64 << w) - 1
    }
}

/// What one register write means beyond the unit's own registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// The unit was turned on (true) or off.
    pub translation: Option<bool>,
    /// The device table base moved: every composed entry is stale.
    pub device_table: bool,
    /// Device table entries invalidated (`Scope::Device`).
    pub devices: Flushes,
    /// I/O page invalidations (`Scope::Pages` or `Scope::Domain`).
    pub pages: Flushes,
    /// Interrupt tables invalidated (`Scope::Device`).
    pub interrupt_tables: Flushes,
    /// The event log interrupt (through the unit's MSI capability).
    pub event_interrupt: bool,
    /// The command buffer stopped at a command it refused.
    pub stopped: Option<u8>,
}

/// A request the OS's tables refused, to be logged for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OsFault {
    /// Event code ([`event`]).
    pub code: u8,
    /// Requester.
    pub device_id: u16,
    /// The device's domain (IO_PAGE_FAULT).
    pub domain: u16,
    /// The address (or for an interrupt, the message's).
    pub address: u64,
    /// A write.
    pub write: bool,
    /// An interrupt request (flag I).
    pub interrupt: bool,
    /// The translation was present but refused the access (flag PR).
    pub present: bool,
    /// Reserved bits were set (flag RZ).
    pub reserved: bool,
}

/// The emulated unit's state.
#[derive(Clone, Debug)]
pub struct Unit {
    offer: Offer,
    devtab: u64,
    cmdbuf: u64,
    evtlog: u64,
    control: u64,
    excl_base: u64,
    excl_limit: u64,
    cmd_head: u64,
    cmd_tail: u64,
    evt_head: u64,
    evt_tail: u64,
    status: u64,
    int_cap_xt: [u64; 3],
    /// Events logged for the OS.
    pub events_logged: u64,
    /// Events lost (log off, full, or not in the OS's memory).
    pub events_lost: u64,
}

/// Entries of a ring whose length field is `len` (2^len, 8 to 15).
pub(crate) const fn ring_entries(reg: u64) -> u64 {
    let len = (reg >> 56) & 0xf;
    1 << if len < 8 { 8 } else { len }
}

impl Unit {
    /// A unit out of reset: everything off.
    pub const fn new(offer: Offer) -> Self {
        Self {
            offer,
            devtab: 0,
            cmdbuf: 0,
            evtlog: 0,
            control: 0,
            excl_base: 0,
            excl_limit: 0,
            cmd_head: 0,
            cmd_tail: 0,
            evt_head: 0,
            evt_tail: 0,
            status: 0,
            int_cap_xt: [0; 3],
            events_logged: 0,
            events_lost: 0,
        }
    }

    /// Translation is on.
    pub const fn enabled(&self) -> bool {
        self.control & ctrl::IOMMU_EN != 0
    }

    /// The highest device ID the device table covers.
    pub const fn last_device(&self) -> u16 {
        let entries = ((self.devtab & 0x1ff) + 1) * 4096 / 32;
        if entries > 0x1_0000 {
            0xffff
        } else {
            (entries - 1) as u16
        }
    }

    /// The control register.
    pub const fn control(&self) -> u64 {
        self.control
    }

    fn running(&self, bit: u64) -> bool {
        self.enabled() && self.control & bit != 0
    }

    /// Reads `size` (4 or 8) bytes at `offset`.
    pub fn read(&self, offset: u64, size: u8) -> u64 {
        if !sized(offset, size, WINDOW) {
            return 0;
        }
        let q = match offset & !7 {
            reg::DEV_TABLE => self.devtab,
            reg::CMD_BUF => self.cmdbuf,
            reg::EVENT_LOG => self.evtlog,
            reg::CONTROL => self.control,
            reg::EXCL_BASE => self.excl_base,
            reg::EXCL_LIMIT => self.excl_limit,
            reg::EFR => self.offer.efr(),
            reg::CMD_HEAD => self.cmd_head,
            reg::CMD_TAIL => self.cmd_tail,
            reg::EVT_HEAD => self.evt_head,
            reg::EVT_TAIL => self.evt_tail,
            reg::STATUS => self.status,
            o if self.offer.x2apic && INT_CAP_XT.contains(&o) => {
                self.int_cap_xt[((o - INT_CAP_XT[0]) / 8) as usize]
            }
            _ => 0,
        };
        part(q, offset, size)
    }

    /// Writes `size` (4 or 8) bytes at `offset`, with OS memory through
    /// `mem`; effects beyond the unit are added to `fx`.
    pub fn write(
        &mut self,
        offset: u64,
        size: u8,
        value: u64,
        mem: &mut impl OsMemory,
        fx: &mut Effects,
    ) {
        if !sized(offset, size, WINDOW) {
            return;
        }
        let at = offset & !7;
        let pa = self.offer.pa_mask() & !0xfff;
        let m = |old| merge(old, offset, size, value);
        match at {
            reg::DEV_TABLE => {
                self.devtab = m(self.devtab) & (pa | 0x1ff);
                fx.device_table = true;
            }
            // The rings' bases are fixed while they run.
            // The rings' pointers keep within a ring made smaller.
            reg::CMD_BUF if self.control & ctrl::CMD_BUF_EN == 0 => {
                self.cmdbuf = m(self.cmdbuf) & (pa | (0xf << 56));
                let mask = (ring_entries(self.cmdbuf) << 4) - 1;
                self.cmd_head &= mask;
                self.cmd_tail &= mask;
            }
            reg::EVENT_LOG if self.control & ctrl::EVENT_LOG_EN == 0 => {
                self.evtlog = m(self.evtlog) & (pa | (0xf << 56));
                let mask = (ring_entries(self.evtlog) << 4) - 1;
                self.evt_head &= mask;
                self.evt_tail &= mask;
            }
            reg::CONTROL => {
                let new = m(self.control) & self.offer.kept();
                self.set_control(new, mem, fx);
            }
            reg::EXCL_BASE => self.excl_base = m(self.excl_base) & (pa | 3),
            reg::EXCL_LIMIT => self.excl_limit = m(self.excl_limit) & pa,
            reg::CMD_HEAD if self.control & ctrl::CMD_BUF_EN == 0 => {
                self.cmd_head = m(self.cmd_head) & 0x7fff0 & ((ring_entries(self.cmdbuf) << 4) - 1);
            }
            reg::CMD_TAIL => {
                self.cmd_tail = m(self.cmd_tail) & 0x7fff0 & ((ring_entries(self.cmdbuf) << 4) - 1);
                self.run_commands(mem, fx);
            }
            reg::EVT_HEAD => {
                self.evt_head = m(self.evt_head) & 0x7fff0 & ((ring_entries(self.evtlog) << 4) - 1);
            }
            reg::EVT_TAIL if self.control & ctrl::EVENT_LOG_EN == 0 => {
                self.evt_tail = m(self.evt_tail) & 0x7fff0 & ((ring_entries(self.evtlog) << 4) - 1);
            }
            reg::STATUS => self.status &= !(m(0) & status::W1C),
            o if self.offer.x2apic && INT_CAP_XT.contains(&o) => {
                let r = &mut self.int_cap_xt[((o - INT_CAP_XT[0]) / 8) as usize];
                *r = m(*r) & 0xff00_00ff_ffff_ff04;
            }
            _ => {}
        }
    }

    fn set_control(&mut self, new: u64, mem: &mut impl OsMemory, fx: &mut Effects) {
        let old = self.control;
        self.control = new;
        if (old ^ new) & ctrl::IOMMU_EN != 0 {
            fx.translation = Some(new & ctrl::IOMMU_EN != 0);
        }
        // Logging and command processing run while the unit and their
        // enable are on; an overflow or an error stops them until their
        // enable is turned off and on again.
        let was = |bit| old & ctrl::IOMMU_EN != 0 && old & bit != 0;
        if self.running(ctrl::EVENT_LOG_EN) && !was(ctrl::EVENT_LOG_EN) {
            self.status |= status::EVENT_LOG_RUN;
        } else if !self.running(ctrl::EVENT_LOG_EN) {
            self.status &= !status::EVENT_LOG_RUN;
        }
        if self.running(ctrl::CMD_BUF_EN) && !was(ctrl::CMD_BUF_EN) {
            self.status |= status::CMD_BUF_RUN;
            self.run_commands(mem, fx);
        } else if !self.running(ctrl::CMD_BUF_EN) {
            self.status &= !status::CMD_BUF_RUN;
        }
    }

    /// Processes commands from head to tail, wrapping; stops (CmdBufRun
    /// clear, the head on it) at the first it refuses, logging the error.
    fn run_commands(&mut self, mem: &mut impl OsMemory, fx: &mut Effects) {
        if self.status & status::CMD_BUF_RUN == 0 {
            return;
        }
        let entries = ring_entries(self.cmdbuf);
        let base = self.cmdbuf & 0x000f_ffff_ffff_f000;
        let tail = (self.cmd_tail >> 4) % entries;
        let mut head = (self.cmd_head >> 4) % entries;
        while head != tail {
            let at = base + head * 16;
            let result = match read_u64s::<2>(mem, at) {
                Ok([a, b]) => self.command(
                    [a as u32, (a >> 32) as u32, b as u32, (b >> 32) as u32],
                    mem,
                    fx,
                ),
                Err(Denied) => Err((event::COMMAND_HARDWARE_ERROR, None)),
            };
            if let Err((code, address)) = result {
                // The event names the command's own address unless a
                // store of it failed.
                let address = address.unwrap_or(at);
                self.cmd_head = head << 4;
                self.status &= !status::CMD_BUF_RUN;
                fx.stopped = Some(code);
                self.log(
                    mem,
                    [
                        0,
                        u32::from(code) << 28,
                        address as u32,
                        (address >> 32) as u32,
                    ],
                    fx,
                );
                return;
            }
            head = (head + 1) % entries;
        }
        self.cmd_head = head << 4;
    }

    /// One command (AMD 48882 §2.4). Err: the event to log, and the
    /// address it names where that is not the command's.
    fn command(
        &mut self,
        c: [u32; 4],
        mem: &mut impl OsMemory,
        fx: &mut Effects,
    ) -> Result<(), (u8, Option<u64>)> {
        let illegal = |_: [u32; 4]| (event::ILLEGAL_COMMAND_ERROR, None);
        match c[1] >> 28 {
            // COMPLETION_WAIT: S 0, I 1, F 2; store address 51:3; data.
            1 => {
                if c[0] & 0b11 == 0 || c[1] & 0x0ff0_0000 != 0 {
                    return Err(illegal(c));
                }
                if c[0] & 1 != 0 {
                    let addr = u64::from(c[0] & !7) | (u64::from(c[1] & 0xf_ffff) << 32);
                    let data = u64::from(c[2]) | (u64::from(c[3]) << 32);
                    mem.write(addr, &data.to_le_bytes())
                        .map_err(|Denied| (event::COMMAND_HARDWARE_ERROR, Some(addr)))?;
                }
                if c[0] & 2 != 0 {
                    self.status |= status::COM_WAIT_INT;
                    if self.control & ctrl::COM_WAIT_INT_EN != 0 {
                        fx.event_interrupt = true;
                    }
                }
            }
            // INVALIDATE_DEVTAB_ENTRY: DeviceID 15:0.
            2 => fx.devices.add(device_only(c).ok_or_else(|| illegal(c))?),
            // INVALIDATE_IOMMU_PAGES: PASID (none offered: 0), DomainID,
            // S 0, PDE 1, GN 2 (0); address 63:12, with S the range's size
            // in its trailing ones from bit 12.
            3 => {
                if c[0] != 0 || c[1] & 0x0fff_0000 != 0 || c[2] & 0xffc != 0 || c[2] & 4 != 0 {
                    return Err(illegal(c));
                }
                let domain = c[1] as u16;
                let addr = u64::from(c[2] & !0xfff) | (u64::from(c[3]) << 32);
                let order = if c[2] & 1 == 0 {
                    0
                } else {
                    (addr >> 12).trailing_ones() + 1
                };
                if order > u32::from(MAX_ORDER) {
                    fx.pages.add(Scope::Domain(domain));
                } else {
                    let size = 1u64 << (12 + order);
                    fx.pages.add(Scope::Pages {
                        domain,
                        addr: addr & !(size - 1),
                        order: order as u8,
                    });
                }
            }
            // INVALIDATE_INTERRUPT_TABLE: DeviceID 15:0.
            5 => fx
                .interrupt_tables
                .add(device_only(c).ok_or_else(|| illegal(c))?),
            // INVALIDATE_IOMMU_ALL.
            8 => {
                if c[0] != 0 || c[1] & 0x0fff_ffff != 0 || c[2] != 0 || c[3] != 0 {
                    return Err(illegal(c));
                }
                fx.devices.everything();
                fx.pages.everything();
                fx.interrupt_tables.everything();
            }
            // INVALIDATE_IOTLB_PAGES (no device IOTLBs), PREFETCH, PPR
            // completion, and the rest: not offered.
            _ => return Err(illegal(c)),
        }
        Ok(())
    }

    /// Logs `e` at the tail, as hardware does: only while logging runs;
    /// a full log (the tail one short of the head) sets EventOverflow and
    /// stops logging; each logged event sets EventLogInt and, where the OS
    /// enabled it, raises the event interrupt.
    fn log(&mut self, mem: &mut impl OsMemory, e: [u32; 4], fx: &mut Effects) {
        if self.status & status::EVENT_LOG_RUN == 0 {
            self.events_lost += 1;
            return;
        }
        let entries = ring_entries(self.evtlog);
        let tail = (self.evt_tail >> 4) % entries;
        let next = (tail + 1) % entries;
        if next == (self.evt_head >> 4) % entries {
            self.status |= status::EVENT_OVERFLOW;
            self.status &= !status::EVENT_LOG_RUN;
            self.events_lost += 1;
            fx.event_interrupt |= self.control & ctrl::EVENT_INT_EN != 0;
            return;
        }
        let mut b = [0u8; 16];
        for (i, d) in e.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&d.to_le_bytes());
        }
        let at = (self.evtlog & 0x000f_ffff_ffff_f000) + tail * 16;
        if mem.write(at, &b).is_err() {
            // A log outside the OS's memory: nothing written, logging
            // stops.
            self.status &= !status::EVENT_LOG_RUN;
            self.events_lost += 1;
            return;
        }
        self.evt_tail = next << 4;
        self.events_logged += 1;
        self.status |= status::EVENT_LOG_INT;
        fx.event_interrupt |= self.control & ctrl::EVENT_INT_EN != 0;
    }

    /// Logs a fault of the OS's own making: IO_PAGE_FAULT and
    /// ILLEGAL_DEV_TABLE_ENTRY carry the device, the domain (page faults)
    /// and flags I (19), PR (20), RW (21), RZ (23); the hardware errors the
    /// device and address.
    pub fn record(&mut self, mem: &mut impl OsMemory, f: OsFault, fx: &mut Effects) {
        let flags = (u32::from(f.interrupt) << 19)
            | (u32::from(f.present) << 20)
            | (u32::from(f.write) << 21)
            | (u32::from(f.reserved) << 23);
        let domain = if f.code == event::IO_PAGE_FAULT {
            u32::from(f.domain)
        } else {
            0
        };
        let e = [
            u32::from(f.device_id),
            domain | flags | (u32::from(f.code) << 28),
            f.address as u32,
            (f.address >> 32) as u32,
        ];
        self.log(mem, e, fx);
    }
}

/// The device a command that names only a DeviceID (dword 0, 15:0) is
/// for; `None` where any other bit but the opcode is set.
const fn device_only(c: [u32; 4]) -> Option<Scope> {
    if c[0] >> 16 != 0 || c[1] & 0x0fff_ffff != 0 || c[2] != 0 || c[3] != 0 {
        return None;
    }
    Some(Scope::Device {
        sid: c[0] as u16,
        mask: 0,
    })
}

/// How the OS's device table entry treats one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Device {
    /// Domain.
    pub domain: u16,
    /// DMA.
    pub dma: Dma,
    /// Interrupts.
    pub interrupts: Interrupts,
    /// Faults not to be logged (SA, "suppress all").
    pub quiet: bool,
    /// The exclusion range applies to it (EX).
    pub exclusion: bool,
}

/// What the OS's entry does with a device's DMA. The entry's IR and IW
/// are the device's own rights, on top of its domain's page tables (which
/// the domain's shadow follows): the real device table entry must carry
/// them, or a device the OS allowed only to read could write through its
/// domain's shadow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dma {
    /// Passed untranslated (unit off, V clear, or the exclusion
    /// range).
    Untranslated,
    /// Mode 0: untranslated, with these rights.
    Mode0 {
        /// Reads allowed (IR).
        read: bool,
        /// Writes allowed (IW).
        write: bool,
    },
    /// Translated through the I/O page tables.
    Tables {
        /// OS-physical top table.
        root: u64,
        /// Levels (mode, 1 to 4).
        levels: u8,
        /// IR.
        read: bool,
        /// IW.
        write: bool,
    },
}

/// What the OS's entry does with a device's interrupts: what the OS asks
/// for, never what the real entry gets. The real entry stays remapped
/// through thinhv's judged entries, whatever the OS says: `Unremapped` and
/// the pass bits (INIT, ExtINT, NMI; LINT0/1 and SysMgt are not even
/// decoded) are requests thinhv judges message by message as today (a
/// message passing unremapped could name any processor and any delivery
/// mode), never copied into the real device table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interrupts {
    /// Not remapped (IV clear, or IntCtl 01b): messages pass as sent.
    Unremapped,
    /// Fixed and arbitrated messages refused (IntCtl 00b).
    Aborted,
    /// Remapped through the table at `base` of `entries` entries.
    Table {
        /// OS-physical table.
        base: u64,
        /// 2^IntTabLen.
        entries: u32,
        /// NMIs pass unremapped (NMIPass).
        nmi_pass: bool,
        /// INITs pass (InitPass).
        init_pass: bool,
        /// ExtINT passes (EIntPass).
        extint_pass: bool,
    },
}

impl Unit {
    /// The OS's entry for `device_id` (AMD 48882 Table 7): V 0, TV 1, Mode
    /// 11:9, root 51:12, GV 55 (not offered: illegal), IR 61, IW 62;
    /// DomainID 79:64, SA 98; IV 128, IntTabLen 132:129, table 179:134,
    /// InitPass 184, EIntPass 185, NMIPass 186, IntCtl 189:188. Err is the
    /// fault to log (without address, write or interrupt flags).
    pub fn device(&self, mem: &impl OsMemory, device_id: u16) -> Result<Device, OsFault> {
        let fault = |code, reserved| OsFault {
            code,
            device_id,
            domain: 0,
            address: 0,
            write: false,
            interrupt: false,
            present: false,
            reserved,
        };
        let untranslated = Device {
            domain: 0,
            dma: Dma::Untranslated,
            interrupts: Interrupts::Unremapped,
            quiet: false,
            exclusion: false,
        };
        if !self.enabled() {
            return Ok(untranslated);
        }
        let pages = (self.devtab & 0x1ff) + 1;
        if u64::from(device_id) * 32 >= pages * 4096 {
            return Err(fault(event::ILLEGAL_DEV_TABLE_ENTRY, false));
        }
        let at = (self.devtab & 0x000f_ffff_ffff_f000) + u64::from(device_id) * 32;
        let [q0, q1, q2, _] = read_u64s::<4>(mem, at)
            .map_err(|Denied| fault(event::DEV_TAB_HARDWARE_ERROR, false))?;
        if q0 & 1 == 0 {
            return Ok(untranslated);
        }
        if q0 & (1 << 55) != 0 {
            return Err(fault(event::ILLEGAL_DEV_TABLE_ENTRY, true));
        }
        let domain = q1 as u16;
        let quiet = q1 & (1 << 34) != 0;
        let (read, write) = (q0 & (1 << 61) != 0, q0 & (1 << 62) != 0);
        // TV clear with V set: no translation information, so no DMA
        // (Linux's blocked domain since 6.13; SNP requires it).
        let dma = if q0 & 2 == 0 {
            Dma::Mode0 {
                read: false,
                write: false,
            }
        } else {
            match (q0 >> 9) & 7 {
                0 => Dma::Mode0 { read, write },
                m @ 1..=4 => {
                    let root = q0 & 0x000f_ffff_ffff_f000;
                    if root & !self.offer.pa_mask() != 0 {
                        return Err(fault(event::ILLEGAL_DEV_TABLE_ENTRY, true));
                    }
                    Dma::Tables {
                        root,
                        levels: m as u8,
                        read,
                        write,
                    }
                }
                _ => return Err(fault(event::ILLEGAL_DEV_TABLE_ENTRY, true)),
            }
        };
        let interrupts = if q2 & 1 == 0 {
            Interrupts::Unremapped
        } else {
            match (q2 >> 60) & 3 {
                0 => Interrupts::Aborted,
                1 => Interrupts::Unremapped,
                2 => {
                    let len = (q2 >> 1) & 0xf;
                    if len > 11 {
                        return Err(fault(event::ILLEGAL_DEV_TABLE_ENTRY, true));
                    }
                    Interrupts::Table {
                        base: q2 & 0x000f_ffff_ffff_ffc0 & self.offer.pa_mask(),
                        entries: 1 << len,
                        init_pass: q2 & (1 << 56) != 0,
                        extint_pass: q2 & (1 << 57) != 0,
                        nmi_pass: q2 & (1 << 58) != 0,
                    }
                }
                _ => return Err(fault(event::ILLEGAL_DEV_TABLE_ENTRY, true)),
            }
        };
        Ok(Device {
            domain,
            dma,
            interrupts,
            quiet,
            exclusion: q1 & (1 << 39) != 0,
        })
    }

    /// Whether `addr` lies in the exclusion range (ExEn) and the range
    /// applies to the device: to every device with Allow, else to those
    /// whose entry sets EX (`ex`). Such DMA passes untranslated.
    pub const fn excluded(&self, addr: u64, ex: bool) -> bool {
        self.excl_base & 1 != 0
            && (self.excl_base & 2 != 0 || ex)
            && addr >= self.excl_base & !0xfff
            && addr <= self.excl_limit | 0xfff
    }

    /// Translates `iova` through I/O page tables (entries: PR 0, NextLevel
    /// 11:9, address 51:12, IR 61, IW 62). NextLevel 0 above level 1 is a
    /// large page of that level; 7 a page whose size is given by the
    /// trailing ones of its address from bit 12; a NextLevel below the
    /// next level skips levels, whose index bits must be 0. `Ok(None)`:
    /// not mapped. Err: the event (PAGE_TAB_HARDWARE_ERROR when a table
    /// cannot be read, IO_PAGE_FAULT with RZ for a malformed entry).
    pub fn walk(
        &self,
        mem: &impl OsMemory,
        root: u64,
        levels: u8,
        iova: u64,
    ) -> Result<Option<Page>, u8> {
        let width = 12 + 9 * u32::from(levels);
        if width < 64 && iova >> width != 0 {
            return Ok(None);
        }
        let mut table = root;
        let mut level = u32::from(levels);
        let (mut read, mut write) = (true, true);
        loop {
            let i = (iova >> (12 + 9 * (level - 1))) & 0x1ff;
            let [e] = read_u64s::<1>(mem, table + i * 8)
                .map_err(|Denied| event::PAGE_TAB_HARDWARE_ERROR)?;
            if e & 1 == 0 {
                return Ok(None);
            }
            let addr = e & 0x000f_ffff_ffff_f000;
            if addr & !self.offer.pa_mask() != 0 {
                return Err(event::IO_PAGE_FAULT);
            }
            read &= e & (1 << 61) != 0;
            write &= e & (1 << 62) != 0;
            let next = ((e >> 9) & 7) as u32;
            let size = match next {
                0 => 1u64 << (12 + 9 * (level - 1)),
                7 => {
                    let size = 1u64 << (13 + (addr >> 12).trailing_ones());
                    if size > 1u64 << (12 + 9 * level) || size >= 1 << 52 {
                        return Err(event::IO_PAGE_FAULT);
                    }
                    size
                }
                n if n < level => {
                    // Skipped levels: their index bits must be 0.
                    for skipped in n + 1..level {
                        if (iova >> (12 + 9 * (skipped - 1))) & 0x1ff != 0 {
                            return Ok(None);
                        }
                    }
                    table = addr;
                    level = n;
                    continue;
                }
                _ => return Err(event::IO_PAGE_FAULT),
            };
            if level == 1 && next != 0 && next != 7 {
                return Err(event::IO_PAGE_FAULT);
            }
            let base = addr & !(size - 1);
            return Ok(Some(Page {
                gpa: base + (iova & (size - 1) & !0xfff),
                read,
                write,
            }));
        }
    }

    /// Calls `f(iova, page)` for every 4 KiB page the I/O page tables at
    /// `root` map in `range`, in order (a large page as its 4 KiB pages),
    /// skipping what is not present or malformed and tables that cannot be
    /// read. The budget counts entries read and pages reported (tables an
    /// OS points at many times over are read as often); the return is
    /// where to resume if it ran out, always beyond `range.start` (a
    /// budget below `2 * levels` counts as that).
    pub fn leaves(
        &self,
        mem: &impl OsMemory,
        root: u64,
        levels: u8,
        range: core::ops::Range<u64>,
        budget: u64,
        f: &mut impl FnMut(u64, Page),
    ) -> Option<u64> {
        let top = 12 + 9 * u32::from(levels.clamp(1, 4));
        let mut left = budget.max(2 * u64::from(levels.clamp(1, 4)));
        let walk = Leaves {
            unit: self,
            from: range.start & !0xfff,
            to: range.end.min(1 << top),
        };
        walk.table(
            mem,
            root,
            u32::from(levels.clamp(1, 4)),
            0,
            (true, true),
            &mut left,
            f,
        )
    }

    /// The OS's remapping entry `index` of `table` (32-bit entries, or
    /// 128-bit where the OS set GAEn): RemapEn 0, IntType 4:2, DM 6,
    /// GuestMode 7 (not offered: refused), destination 15:8 (32-bit) or
    /// 31:8 and 127:120 (128-bit, 32 bits only with XTEn), vector 23:16
    /// (32-bit) or 71:64. Err: the fault to log (IO_PAGE_FAULT with I).
    pub fn os_irte(
        &self,
        mem: &impl OsMemory,
        device_id: u16,
        table: Interrupts,
        index: u32,
    ) -> Result<OsIrte, OsFault> {
        let fault = |code, present, reserved| OsFault {
            code,
            device_id,
            domain: 0,
            address: 0,
            write: true,
            interrupt: true,
            present,
            reserved,
        };
        let Interrupts::Table { base, entries, .. } = table else {
            return Err(fault(event::IO_PAGE_FAULT, false, false));
        };
        if index >= entries {
            return Err(fault(event::IO_PAGE_FAULT, false, false));
        }
        let wide = self.control & ctrl::GA_EN != 0;
        let (lo, hi) = if wide {
            let [lo, hi] = read_u64s::<2>(mem, base + u64::from(index) * 16)
                .map_err(|Denied| fault(event::PAGE_TAB_HARDWARE_ERROR, false, false))?;
            (lo, hi)
        } else {
            let mut b = [0u8; 4];
            mem.read(base + u64::from(index) * 4, &mut b)
                .map_err(|Denied| fault(event::PAGE_TAB_HARDWARE_ERROR, false, false))?;
            (u64::from(u32::from_le_bytes(b)), 0)
        };
        if lo & 1 == 0 {
            return Err(fault(event::IO_PAGE_FAULT, false, false));
        }
        let x2apic = wide && self.control & ctrl::XT_EN != 0;
        let (dest, vector, reserved) = if wide {
            let d24 = ((lo >> 8) & 0xff_ffff) as u32;
            let d = d24 | (((hi >> 56) as u32) << 24);
            // Destination bits above 7 need XTEn.
            let over = !x2apic && d > 0xff;
            (
                d,
                (hi & 0xff) as u8,
                lo & 0xffff_ffff_0000_0000 != 0 || hi & 0x00ff_ffff_ffff_ff00 != 0 || over,
            )
        } else {
            (
                ((lo >> 8) & 0xff) as u32,
                ((lo >> 16) & 0xff) as u8,
                lo & 0xff00_0000 != 0,
            )
        };
        if reserved || lo & (1 << 7) != 0 {
            return Err(fault(event::IO_PAGE_FAULT, true, true));
        }
        Ok(OsIrte {
            logical: lo & (1 << 6) != 0,
            level: false,
            delivery: Delivery::from_bits(((lo >> 2) & 7) as u8),
            vector,
            dest,
            sid: device_id,
            sq: 0,
            svt: 1,
            x2apic,
        })
    }
}

/// A walk of every page in a range.
struct Leaves<'a> {
    unit: &'a Unit,
    from: u64,
    to: u64,
}

impl Leaves<'_> {
    /// The table at `table` of `level`, covering IOVAs from `base`.
    #[allow(clippy::too_many_arguments)]
    fn table(
        &self,
        mem: &impl OsMemory,
        table: u64,
        level: u32,
        base: u64,
        rights: (bool, bool),
        left: &mut u64,
        f: &mut impl FnMut(u64, Page),
    ) -> Option<u64> {
        let span = 1u64 << (12 + 9 * (level - 1));
        let first = (self.from.saturating_sub(base) / span).min(512);
        for i in first..512 {
            let at = base + i * span;
            if at >= self.to {
                break;
            }
            if *left == 0 {
                return Some(at.max(self.from));
            }
            *left -= 1;
            let Ok([e]) = read_u64s::<1>(mem, table + i * 8) else {
                return None;
            };
            if e & 1 == 0 {
                continue;
            }
            let addr = e & 0x000f_ffff_ffff_f000;
            if addr & !self.unit.offer.pa_mask() != 0 {
                continue;
            }
            let r = (
                rights.0 && e & (1 << 61) != 0,
                rights.1 && e & (1 << 62) != 0,
            );
            let next = ((e >> 9) & 7) as u32;
            let size = match next {
                0 => span,
                7 => {
                    let size = 1u64 << (13 + (addr >> 12).trailing_ones());
                    if size > 1u64 << (12 + 9 * level) || size >= 1 << 52 {
                        continue;
                    }
                    size
                }
                n if n < level => {
                    // Skipped levels: only the first 2^(12 + 9n) bytes of
                    // this entry's span are reachable.
                    let sub = Leaves {
                        unit: self.unit,
                        from: self.from,
                        to: self.to.min(at + (1u64 << (12 + 9 * n))),
                    };
                    if let Some(resume) = sub.table(mem, addr, n, at, r, left, f) {
                        return Some(resume);
                    }
                    continue;
                }
                _ => continue,
            };
            if level == 1 && next != 0 && next != 7 {
                continue;
            }
            let page_base = addr & !(size - 1);
            let mut iova = at.max(self.from);
            while iova < (at + span).min(self.to) {
                if *left == 0 {
                    return Some(iova);
                }
                *left -= 1;
                f(
                    iova,
                    Page {
                        gpa: page_base + (iova & (size - 1) & !0xfff),
                        read: r.0,
                        write: r.1,
                    },
                );
                iova += 0x1000;
            }
        }
        None
    }
}

impl crate::vvtd::OsPageTables for Unit {
    fn page(&self, mem: &impl OsMemory, root: u64, levels: u8, iova: u64) -> Option<Page> {
        self.walk(mem, root, levels, iova).ok().flatten()
    }
    fn pages(
        &self,
        mem: &impl OsMemory,
        root: u64,
        levels: u8,
        range: core::ops::Range<u64>,
        budget: u64,
        f: &mut impl FnMut(u64, Page),
    ) -> Option<u64> {
        self.leaves(mem, root, levels, range, budget, f)
    }
}

/// Brings a device's real interrupt table up to date with the OS's entry
/// for it: each of its first `real_entries` OS entries judged ([`judge`])
/// and handed to `write(index, Some(target))`, or `None` (an entry that
/// delivers nothing) where the OS has none, it cannot be read, or thinhv
/// refuses it. Entries beyond `real_entries` are not composed (their
/// messages find nothing). Returns (composed, refused).
#[allow(clippy::too_many_arguments)]
pub fn sync_table(
    unit: &Unit,
    mem: &impl OsMemory,
    device_id: u16,
    table: Interrupts,
    real_entries: u32,
    cores: &impl Cores,
    policy: Policy,
    write: &mut impl FnMut(u32, Option<Target>),
) -> (u32, u32) {
    let Interrupts::Table { entries, .. } = table else {
        return (0, 0);
    };
    let (mut composed, mut refused) = (0, 0);
    for index in 0..entries.min(real_entries) {
        let judged = unit
            .os_irte(mem, device_id, table, index)
            .ok()
            .map(|e| judge(&e, cores, policy));
        let t = if let Some(Ok(t)) = judged {
            composed += 1;
            Some(t)
        } else {
            refused += u32::from(judged.is_some());
            None
        };
        write(index, t);
    }
    (composed, refused)
}

/// Where the OS aimed the event log's interrupt, where it uses the
/// IntCapXT register (IntCapXTEn): `None` otherwise (the interrupt then
/// goes through the unit's MSI capability, whose message thinhv's MSI
/// mediation judges). Judged as any message of the OS's: the OS may aim
/// it anywhere.
pub fn event_target(
    unit: &Unit,
    cores: &impl Cores,
    policy: Policy,
) -> Option<Result<Target, Refusal>> {
    if unit.control & ctrl::INT_CAP_XT_EN == 0 {
        return None;
    }
    let r = unit.int_cap_xt[0];
    let e = OsIrte {
        logical: r & 4 != 0,
        level: false,
        delivery: Delivery::Fixed,
        vector: (r >> 32) as u8,
        dest: ((r >> 8) & 0xff_ffff) as u32 | (((r >> 56) as u32) << 24),
        sid: 0,
        sq: 0,
        svt: 1,
        x2apic: true,
    };
    Some(judge(&e, cores, policy))
}

/// The processor an OS entry of a device's own table may reach, judged as
/// [`crate::vvtd::compose`] judges a VT-d entry's (the table is the
/// device's own, so no source validation is needed).
pub fn judge(e: &OsIrte, cores: &impl Cores, policy: Policy) -> Result<Target, Refusal> {
    crate::vvtd::judge_target(e, cores, policy)
}

/// Drives a unit with an arbitrary program and checks its invariants after
/// every step: the cargo-fuzz target `vamdvi` and the stable test
/// `random_programming_never_breaks_the_amd_vi_units_invariants` share it.
pub mod fuzz {
    use super::{Effects, Interrupts, Offer, Unit, ctrl, reg, status};
    use crate::vvtd::fuzz::{HOLE, Memory, SIZE};

    /// What a program reached.
    #[derive(Clone, Copy, Debug, Default)]
    pub struct Reach {
        /// Command runs that ended at the tail.
        pub runs: u32,
        /// Of those, runs that wrapped.
        pub wraps: u32,
        /// Runs stopped on a command.
        pub stops: u32,
        /// Events logged.
        pub logged: u64,
        /// Event interrupts raised.
        pub interrupts: u32,
    }

    const OFFSETS: [u64; 13] = [
        reg::DEV_TABLE,
        reg::CMD_BUF,
        reg::EVENT_LOG,
        reg::CONTROL,
        reg::CONTROL + 4,
        reg::EXCL_BASE,
        reg::EXCL_LIMIT,
        reg::EFR,
        reg::CMD_HEAD,
        reg::CMD_TAIL,
        reg::EVT_HEAD,
        reg::EVT_TAIL,
        reg::STATUS,
    ];

    /// A valid command from `v`, storing (where it stores) below the hole.
    fn command(v: u64) -> [u32; 4] {
        let lo = v as u32;
        match v % 16 {
            0..=3 => [lo & 0xffff, 2 << 28, 0, 0],
            4..=7 => [
                0,
                (3 << 28) | (lo & 0xffff),
                ((v >> 20) as u32 & !0xfff) | ((v >> 40) as u32 & 3),
                (v >> 44) as u32 & 0xf,
            ],
            8..=10 => [lo & 0xffff, 5 << 28, 0, 0],
            11 => [0, 8 << 28, 0, 0],
            _ => {
                let addr = ((v >> 8) % HOLE.start) & !7;
                [
                    (addr as u32) | 1 | ((v >> 60) as u32 & 2),
                    1 << 28,
                    (v >> 16) as u32,
                    0,
                ]
            }
        }
    }

    /// Runs `data` as a program (byte 0 the offer, then steps of 10 bytes).
    /// Panics where an invariant breaks.
    pub fn run(data: &[u8]) -> Reach {
        let mut reach = Reach::default();
        let Some((&first, rest)) = data.split_first() else {
            return reach;
        };
        let offer = Offer {
            host_width: 36 + (first & 0x1f),
            x2apic: first & 0x20 != 0,
        };
        let mut unit = Unit::new(offer);
        let mut mem = Memory::new(rest);
        for step in rest.chunks_exact(10) {
            let mut v = [0u8; 8];
            v.copy_from_slice(&step[2..]);
            let value = u64::from_le_bytes(v);
            let what = step[0];
            let mut fx = Effects::default();
            let head = unit.read(reg::CMD_HEAD, 8) >> 4;
            let logged = unit.events_logged;
            match what % 8 {
                0..=2 => {
                    // The OS writes 1 to 32 commands at the tail, and
                    // half the time moves the tail past them.
                    let entries = super::ring_entries(unit.read(reg::CMD_BUF, 8));
                    let base = unit.read(reg::CMD_BUF, 8) & 0x000f_ffff_ffff_f000;
                    let tail = unit.read(reg::CMD_TAIL, 8) >> 4;
                    let n = 1 + (value >> 59);
                    for i in 0..n {
                        let c = command(value.rotate_left(i as u32 * 5) ^ i);
                        let mut b = [0u8; 16];
                        for (k, d) in c.iter().enumerate() {
                            b[k * 4..k * 4 + 4].copy_from_slice(&d.to_le_bytes());
                        }
                        mem.os_write(base + ((tail + i) % entries) * 16, &b);
                    }
                    if what & 0x80 != 0 {
                        unit.write(
                            reg::CMD_TAIL,
                            8,
                            ((tail + n) % entries) << 4,
                            &mut mem,
                            &mut fx,
                        );
                    }
                }
                3 => unit.write(reg::STATUS, 8, status::W1C, &mut mem, &mut fx),
                // The OS sets its tables and rings up (not always in its
                // RAM) and turns things on: when its command buffer has
                // stopped, and now and then anyway.
                4 if unit.read(reg::STATUS, 8) & status::CMD_BUF_RUN == 0 || what & 0x70 == 0 => {
                    let at = |k: u32| (value.rotate_left(k) % (SIZE + 0x1000)) & !0xfff;
                    let off = ctrl::IOMMU_EN | ctrl::CMD_BUF_EN | ctrl::EVENT_LOG_EN;
                    let c = unit.control();
                    unit.write(reg::CONTROL, 8, c & !off, &mut mem, &mut fx);
                    unit.write(reg::DEV_TABLE, 8, at(0) | (value >> 61), &mut mem, &mut fx);
                    unit.write(
                        reg::CMD_BUF,
                        8,
                        at(13) | ((8 + (value >> 62)) << 56),
                        &mut mem,
                        &mut fx,
                    );
                    unit.write(reg::EVENT_LOG, 8, at(29) | (8 << 56), &mut mem, &mut fx);
                    for r in [reg::CMD_HEAD, reg::CMD_TAIL, reg::EVT_HEAD, reg::EVT_TAIL] {
                        unit.write(r, 8, 0, &mut mem, &mut fx);
                    }
                    let on = off
                        | (value
                            & (ctrl::EVENT_INT_EN
                                | ctrl::COM_WAIT_INT_EN
                                | ctrl::GA_EN
                                | ctrl::XT_EN));
                    unit.write(reg::CONTROL, 8, c | on, &mut mem, &mut fx);
                }
                5 => {
                    // A fault of the OS's own making, from its tables.
                    let id = (value >> 16) as u16;
                    if let Err(f) = unit.device(&mem, id) {
                        unit.record(&mut mem, f, &mut fx);
                    } else if let Ok(d) = unit.device(&mem, id) {
                        if let super::Dma::Tables { root, levels, .. } = d.dma {
                            let _ = unit.walk(&mem, root, levels, value >> 20);
                        }
                        if let Interrupts::Table { .. } = d.interrupts {
                            let _ = unit.os_irte(&mem, id, d.interrupts, u32::from(step[1]));
                        }
                    }
                }
                _ => {
                    let offset = if what & 0x40 != 0 {
                        u64::from(step[1]) * 8 % super::WINDOW
                    } else {
                        OFFSETS[usize::from(step[1]) % OFFSETS.len()]
                    };
                    let size = if what & 0x20 != 0 { 8 } else { 4 };
                    let value = if what & 0x10 != 0 {
                        value % (SIZE + 0x2000)
                    } else {
                        value
                    };
                    unit.write(offset, size, value, &mut mem, &mut fx);
                }
            }
            check(&unit, &mem);
            let new_head = unit.read(reg::CMD_HEAD, 8) >> 4;
            let advanced = what % 8 <= 2 && what & 0x80 != 0;
            if fx.stopped.is_some() {
                reach.stops += 1;
            } else if advanced && new_head != head && new_head == unit.read(reg::CMD_TAIL, 8) >> 4 {
                reach.runs += 1;
                reach.wraps += u32::from(new_head < head);
            }
            reach.logged += unit.events_logged - logged;
            reach.interrupts += u32::from(fx.event_interrupt);
        }
        reach
    }

    fn check(u: &Unit, mem: &Memory) {
        let c = u.read(reg::CONTROL, 8);
        assert_eq!(
            c & !u.offer.kept(),
            0,
            "control {c:#x} shows what is not offered"
        );
        let st = u.read(reg::STATUS, 8);
        assert_eq!(st & !0x1f, 0, "status {st:#x}");
        let on = |bit| c & ctrl::IOMMU_EN != 0 && c & bit != 0;
        assert!(st & status::CMD_BUF_RUN == 0 || on(ctrl::CMD_BUF_EN));
        assert!(st & status::EVENT_LOG_RUN == 0 || on(ctrl::EVENT_LOG_EN));
        for (r, ring) in [
            (reg::CMD_HEAD, reg::CMD_BUF),
            (reg::CMD_TAIL, reg::CMD_BUF),
            (reg::EVT_TAIL, reg::EVENT_LOG),
            (reg::EVT_HEAD, reg::EVENT_LOG),
        ] {
            let p = u.read(r, 8);
            assert_eq!(p & 0xf, 0);
            assert!(
                p >> 4 < super::ring_entries(u.read(ring, 8)),
                "{r:#x}: {p:#x}"
            );
        }
        // The unit writes only completion stores (8 bytes) and events (16).
        assert_eq!(
            mem.sizes & !((1 << 8) | (1 << 16)),
            0,
            "writes of sizes {:#x}",
            mem.sizes
        );
    }
}

#[cfg(test)]
#[path = "vamdvi_tests.rs"]
mod tests;
