//! Hardware task switches, emulated for the VMX backend.
//!
//! In VMX non-root operation the processor never switches tasks: after the
//! checks on the gate and on the new TSS descriptor (type, P, S, limit),
//! every attempt exits (SDM Vol. 3C "Treatment of Task Switches", §26.4.2;
//! qualification in Table 28-2). This module does the rest as the
//! processor would (Vol. 3A §8.3 "Task Switching", Table 8-2): it saves the
//! current task's state in its TSS, loads the new task's from its TSS,
//! keeps the busy bits, EFLAGS.NT and the back link as the source (CALL,
//! JMP, IRET, a task gate in the IDT) asks, sets CR0.TS, clears the DR7
//! local enables, and pushes the error code of an exception delivered
//! through a task gate. 32-bit and 16-bit TSSs are handled, and a 32-bit
//! TSS whose EFLAGS has VM set starts a virtual-8086 task.
//!
//! Differences from the processor, all of them about a guest that breaks
//! the rules (a correct OS never sees them):
//! * every check on the new task's LDT and segment selectors is made
//!   before anything is written, so a fault is taken in the old task's
//!   context with its registers unchanged (the processor takes those after
//!   the commit point in the new task's context);
//! * guest memory is reached through the guest's page tables without
//!   their permission bits (the processor's TSS accesses are supervisor
//!   accesses), and only RAM outside the hypervisor: a TSS, GDT or LDT that
//!   cannot be reached that way gives #TS with the new TSS's selector (or
//!   the old TR's, for the old TSS) where the processor would raise #PF;
//! * the busy bits and the back link are written without the processor's
//!   locked accesses (another CPU switching to the same TSS at the same
//!   time may both succeed);
//! * the T flag of the new TSS (a debug trap on entering the task, DR6.BT)
//!   is not emulated;
//! * for a 16-bit TSS, FS and GS keep their values and the upper halves of
//!   the 32-bit registers are cleared.
use super::state::{AR_UNUSABLE, Seg};
use crate::env::Env;
use crate::guest::{GuestCpu, PagingRegs, vector};
use crate::guest_mem::{check_buffer, read_guest_phys, translate};
use crate::handlers::Outcome;

/// Index of ES in [`TaskState::segs`] (encoding order).
pub const ES: usize = 0;
/// Index of CS.
pub const CS: usize = 1;
/// Index of SS.
pub const SS: usize = 2;
/// Index of DS.
pub const DS: usize = 3;
/// Index of FS.
pub const FS: usize = 4;
/// Index of GS.
pub const GS: usize = 5;
/// Index of ESP in [`TaskState::gprs`].
const ESP: usize = 4;

const CR0_PE: u64 = 1;
const CR0_TS: u64 = 1 << 3;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LMA: u64 = 1 << 10;
const EFLAGS_FIXED1: u64 = 1 << 1;
const EFLAGS_NT: u64 = 1 << 14;
const EFLAGS_VM: u64 = 1 << 17;
/// EFLAGS bits a task switch may load (SDM Vol. 1 §3.4.3): CF, PF, AF,
/// ZF, SF, TF, IF, DF, OF, IOPL, NT, RF, VM, AC, VIF, VIP, ID.
const EFLAGS_LOADABLE: u64 = 0x003f_7fd5;
/// DR7 L0–L3: cleared on every task switch (SDM Vol. 3B §18.2.4).
const DR7_LOCAL_ENABLES: u64 = 0x55;

/// Access-rights bits (descriptor bits 40–47 in 7:0, 52–55 in 15:12).
mod ar {
    /// Accessed (segments) / busy (TSS, bit 1 of the type).
    pub const ACCESSED: u32 = 1 << 0;
    /// Readable code / writable data.
    pub const RW: u32 = 1 << 1;
    /// TSS busy bit.
    pub const BUSY: u32 = 1 << 1;
    /// Conforming code.
    pub const CONFORMING: u32 = 1 << 2;
    /// Code (with S).
    pub const CODE: u32 = 1 << 3;
    /// 32-bit TSS (system types 9 and 11).
    pub const TSS32: u32 = 1 << 3;
    /// S: code or data (not system).
    pub const S: u32 = 1 << 4;
    /// Present.
    pub const P: u32 = 1 << 7;
    /// D/B.
    pub const DB: u32 = 1 << 14;
}

/// VMX interruption-information fields (SDM Vol. 3C Table 25-17).
mod event {
    pub const VALID: u32 = 1 << 31;
    pub const HAS_ERROR: u32 = 1 << 11;
    pub const TYPE_EXT_INT: u32 = 0;
    pub const TYPE_NMI: u32 = 2;
    pub const TYPE_HW_EXCEPTION: u32 = 3;
    pub const TYPE_SW_INT: u32 = 4;
    pub const TYPE_PRIV_SW_EXCEPTION: u32 = 5;
    pub const TYPE_SW_EXCEPTION: u32 = 6;

    pub const fn kind(e: u32) -> u32 {
        (e >> 8) & 7
    }

    #[allow(clippy::cast_possible_truncation, reason = "masked to 8 bits")]
    pub const fn vector(e: u32) -> u8 {
        (e & 0xff) as u8
    }
}

/// The registers a task switch saves and loads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskState {
    /// EAX..EDI in encoding order (ESP included).
    pub gprs: [u64; 8],
    /// EIP.
    pub rip: u64,
    /// EFLAGS.
    pub rflags: u64,
    /// ES, CS, SS, DS, FS, GS.
    pub segs: [Seg; 6],
    /// LDTR.
    pub ldtr: Seg,
    /// TR.
    pub tr: Seg,
    /// GDTR (base, limit).
    pub gdtr: (u64, u32),
    /// CR0 as the guest sees it.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4 as the guest sees it.
    pub cr4: u64,
    /// EFER.
    pub efer: u64,
    /// DR7.
    pub dr7: u64,
    /// With PAE paging, the PDPTEs CR3 names (the processor takes them
    /// from the VMCS on VM entry when EPT is on, SDM Vol. 3C §27.3.2.4).
    pub pdptes: Option<[u64; 4]>,
}

/// What started the switch (exit qualification bits 31:30).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// CALL to a TSS or a task gate.
    Call,
    /// IRET with EFLAGS.NT set.
    Iret,
    /// JMP to a TSS or a task gate.
    Jmp,
    /// An interrupt or exception through a task gate in the IDT.
    Gate,
}

impl Source {
    /// From the qualification's source field.
    pub const fn from_qualification(source: u8) -> Self {
        match source & 3 {
            0 => Self::Call,
            1 => Self::Iret,
            2 => Self::Jmp,
            _ => Self::Gate,
        }
    }
}

/// One task switch to emulate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Selector of the new TSS.
    pub selector: u16,
    /// What started it.
    pub source: Source,
    /// For [`Source::Gate`]: the event delivered (interruption-information
    /// format).
    pub event: u32,
    /// Its error code.
    pub error_code: u32,
    /// Length of the instruction that started it (0 for hardware events).
    pub insn_len: u8,
}

impl Request {
    /// Whether a fault's error code has EXT set: the switch is the delivery
    /// of an event external to the program (SDM Vol. 3A §6.13).
    fn ext(&self) -> u32 {
        let k = event::kind(self.event);
        u32::from(
            self.source == Source::Gate
                && matches!(
                    k,
                    event::TYPE_EXT_INT
                        | event::TYPE_NMI
                        | event::TYPE_HW_EXCEPTION
                        | event::TYPE_PRIV_SW_EXCEPTION
                ),
        )
    }

    /// The EIP saved in the old TSS: past the instruction for CALL, JMP,
    /// IRET and software interrupts and exceptions (traps); the current
    /// instruction for faults, NMIs and external interrupts.
    fn return_eip(&self, rip: u64) -> u64 {
        let past = match self.source {
            Source::Call | Source::Iret | Source::Jmp => true,
            Source::Gate => matches!(
                event::kind(self.event),
                event::TYPE_SW_INT | event::TYPE_PRIV_SW_EXCEPTION | event::TYPE_SW_EXCEPTION
            ),
        };
        let eip = if past {
            rip.wrapping_add(u64::from(self.insn_len))
        } else {
            rip
        };
        eip & 0xffff_ffff
    }
}

/// An exception the switch raises instead of completing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Vector.
    pub vector: u8,
    /// Error code.
    pub error_code: Option<u32>,
}

/// Guest linear memory as a task switch reaches it.
pub trait LinearMem {
    /// Reads `buf.len()` bytes at linear address `la`; false if any byte
    /// cannot be read.
    fn read(&self, la: u64, buf: &mut [u8]) -> bool;
    /// Writes `data` at `la`; false if any byte cannot be written (nothing
    /// is written then).
    fn write(&mut self, la: u64, data: &[u8]) -> bool;
}

fn read_u64(mem: &impl LinearMem, la: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    mem.read(la, &mut b).then(|| u64::from_le_bytes(b))
}

/// A segment descriptor (8 bytes, SDM Vol. 3A §3.4.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Desc(u64);

#[allow(clippy::cast_possible_truncation, reason = "each field is masked")]
impl Desc {
    const fn base(self) -> u64 {
        ((self.0 >> 16) & 0xff_ffff) | (((self.0 >> 56) & 0xff) << 24)
    }

    const fn limit(self) -> u32 {
        let raw = ((self.0 & 0xffff) | ((self.0 >> 32) & 0xf_0000)) as u32;
        if self.0 & (1 << 55) != 0 {
            (raw << 12) | 0xfff
        } else {
            raw
        }
    }

    const fn ar(self) -> u32 {
        (((self.0 >> 40) & 0xff) | (((self.0 >> 52) & 0xf) << 12)) as u32
    }

    const fn dpl(self) -> u16 {
        ((self.ar() >> 5) & 3) as u16
    }

    const fn has(self, bits: u32) -> bool {
        self.ar() & bits == bits
    }

    const fn seg(self, selector: u16) -> Seg {
        Seg {
            selector,
            base: self.base(),
            limit: self.limit(),
            ar: self.ar(),
        }
    }
}

const fn is_null(selector: u16) -> bool {
    selector & 0xfffc == 0
}

/// A segment register that holds no usable segment.
const fn unusable(selector: u16) -> Seg {
    Seg {
        selector,
        base: 0,
        limit: 0,
        ar: AR_UNUSABLE,
    }
}

/// Linear address of the descriptor `selector` names in the GDT or `ldt`,
/// or `None` beyond the table's limit.
fn desc_addr(selector: u16, gdtr: (u64, u32), ldt: &Seg) -> Option<u64> {
    let offset = u64::from(selector & !7);
    let (base, limit) = if selector & 4 != 0 {
        if ldt.ar & AR_UNUSABLE != 0 {
            return None;
        }
        (ldt.base, ldt.limit)
    } else {
        (gdtr.0, gdtr.1)
    };
    (offset + 7 <= u64::from(limit)).then_some(base.wrapping_add(offset))
}

fn lookup(mem: &impl LinearMem, selector: u16, gdtr: (u64, u32), ldt: &Seg) -> Option<(u64, Desc)> {
    let la = desc_addr(selector, gdtr, ldt)?;
    Some((la, Desc(read_u64(mem, la)?)))
}

/// The dynamic fields of a TSS (SDM Vol. 3A Figures 8-2 and 8-11).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Image {
    eip: u64,
    eflags: u64,
    gprs: [u64; 8],
    sels: [u16; 6],
    ldt: u16,
    cr3: Option<u64>,
}

/// Size of a TSS the switch reads.
const TSS32_SIZE: usize = 0x68;
const TSS16_SIZE: usize = 0x2c;
/// Smallest limit of a 32-bit and a 16-bit TSS (SDM Vol. 3A §8.2.2).
const TSS32_MIN_LIMIT: u32 = 0x67;
const TSS16_MIN_LIMIT: u32 = 0x2b;

/// 32-bit TSS offsets.
mod tss32 {
    pub const CR3: usize = 0x1c;
    pub const EIP: usize = 0x20;
    pub const EFLAGS: usize = 0x24;
    pub const GPRS: usize = 0x28;
    pub const SELS: usize = 0x48;
    pub const LDT: usize = 0x60;
}

/// 16-bit TSS offsets.
mod tss16 {
    pub const IP: usize = 0x0e;
    pub const FLAGS: usize = 0x10;
    pub const GPRS: usize = 0x12;
    pub const SELS: usize = 0x22;
    pub const LDT: usize = 0x2a;
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]))
}

fn parse(b: &[u8], tss32: bool, old: &TaskState) -> Image {
    if tss32 {
        Image {
            eip: u32_at(b, tss32::EIP),
            eflags: u32_at(b, tss32::EFLAGS),
            gprs: core::array::from_fn(|i| u32_at(b, tss32::GPRS + 4 * i)),
            sels: core::array::from_fn(|i| u16_at(b, tss32::SELS + 4 * i)),
            ldt: u16_at(b, tss32::LDT),
            cr3: Some(u32_at(b, tss32::CR3)),
        }
    } else {
        let mut sels = [0u16; 6];
        for (i, s) in sels.iter_mut().enumerate().take(4) {
            *s = u16_at(b, tss16::SELS + 2 * i);
        }
        sels[FS] = old.segs[FS].selector;
        sels[GS] = old.segs[GS].selector;
        Image {
            eip: u64::from(u16_at(b, tss16::IP)),
            // A 16-bit TSS has no VM flag: the new task is not virtual-8086.
            eflags: u64::from(u16_at(b, tss16::FLAGS)),
            gprs: core::array::from_fn(|i| u64::from(u16_at(b, tss16::GPRS + 2 * i))),
            sels,
            ldt: u16_at(b, tss16::LDT),
            cr3: None,
        }
    }
}

/// The bytes of the old task's dynamic fields, at their TSS offset.
#[allow(
    clippy::cast_possible_truncation,
    reason = "TSS fields are 16 or 32 bits"
)]
fn save_image(st: &TaskState, eip: u64, eflags: u64, tss32: bool) -> (usize, [u8; 0x40]) {
    let mut b = [0u8; 0x40];
    if tss32 {
        // 0x20..0x60: EIP, EFLAGS, 8 GPRs, 6 selectors (16 bits each in a
        // 32-bit slot; the upper halves are reserved and written as 0).
        let mut put = |off: usize, v: u32| {
            b[off - tss32::EIP..off - tss32::EIP + 4].copy_from_slice(&v.to_le_bytes());
        };
        put(tss32::EIP, eip as u32);
        put(tss32::EFLAGS, eflags as u32);
        for (i, r) in st.gprs.iter().enumerate() {
            put(tss32::GPRS + 4 * i, *r as u32);
        }
        for (i, s) in st.segs.iter().enumerate() {
            put(tss32::SELS + 4 * i, u32::from(s.selector));
        }
        (tss32::EIP, b)
    } else {
        // 0x0e..0x2a: IP, FLAGS, 8 GPRs, ES, CS, SS, DS.
        let mut put = |off: usize, v: u16| {
            b[off - tss16::IP..off - tss16::IP + 2].copy_from_slice(&v.to_le_bytes());
        };
        put(tss16::IP, eip as u16);
        put(tss16::FLAGS, eflags as u16);
        for (i, r) in st.gprs.iter().enumerate() {
            put(tss16::GPRS + 2 * i, *r as u16);
        }
        for (i, s) in st.segs.iter().take(4).enumerate() {
            put(tss16::SELS + 2 * i, s.selector);
        }
        (tss16::IP, b)
    }
}

/// Checks and loads the new task's segment registers (SDM Vol. 3A
/// Table 8-2, conditions 6–9). Returns them with the linear addresses of
/// their descriptors (to set the accessed bits).
fn load_segments(
    mem: &impl LinearMem,
    img: &Image,
    vm86: bool,
    gdtr: (u64, u32),
    ldt: &Seg,
    fault: impl Fn(u8, u16) -> Fault,
) -> Result<([Seg; 6], [Option<u64>; 6]), Fault> {
    let mut segs = [Seg::default(); 6];
    let mut touched = [None; 6];
    if vm86 {
        // Virtual-8086 mode: segments are real-mode style, at CPL 3
        // (SDM Vol. 3A §20.2.1; Vol. 3C §27.3.1.2).
        for (s, sel) in segs.iter_mut().zip(img.sels) {
            *s = Seg {
                selector: sel,
                base: u64::from(sel) << 4,
                limit: 0xffff,
                ar: 0xf3,
            };
        }
        return Ok((segs, touched));
    }
    let cs_sel = img.sels[CS];
    let cpl = cs_sel & 3;
    // CS: a present code segment, DPL = RPL (conforming: DPL <= RPL).
    if is_null(cs_sel) {
        return Err(fault(vector::TS, cs_sel));
    }
    let (la, d) = lookup(mem, cs_sel, gdtr, ldt).ok_or_else(|| fault(vector::TS, cs_sel))?;
    let conforming = d.has(ar::CONFORMING);
    if !d.has(ar::S | ar::CODE) || (conforming && d.dpl() > cpl) || (!conforming && d.dpl() != cpl)
    {
        return Err(fault(vector::TS, cs_sel));
    }
    if !d.has(ar::P) {
        return Err(fault(vector::NP, cs_sel));
    }
    segs[CS] = d.seg(cs_sel);
    touched[CS] = Some(la);
    // SS: a present writable data segment, RPL = DPL = CPL.
    let ss_sel = img.sels[SS];
    if is_null(ss_sel) {
        return Err(fault(vector::TS, ss_sel));
    }
    let (la, d) = lookup(mem, ss_sel, gdtr, ldt).ok_or_else(|| fault(vector::TS, ss_sel))?;
    if ss_sel & 3 != cpl || d.dpl() != cpl || !d.has(ar::S | ar::RW) || d.has(ar::CODE) {
        return Err(fault(vector::TS, ss_sel));
    }
    if !d.has(ar::P) {
        return Err(fault(vector::SS, ss_sel));
    }
    segs[SS] = d.seg(ss_sel);
    touched[SS] = Some(la);
    // DS, ES, FS, GS: null, or a present data or readable code segment
    // whose DPL is at least CPL and RPL (conforming code excepted).
    for i in [ES, DS, FS, GS] {
        let sel = img.sels[i];
        if is_null(sel) {
            segs[i] = unusable(sel);
            continue;
        }
        let (la, d) = lookup(mem, sel, gdtr, ldt).ok_or_else(|| fault(vector::TS, sel))?;
        let code = d.has(ar::CODE);
        let conforming_code = code && d.has(ar::CONFORMING);
        if !d.has(ar::S)
            || (code && !d.has(ar::RW))
            || (!conforming_code && (d.dpl() < cpl || d.dpl() < (sel & 3)))
        {
            return Err(fault(vector::TS, sel));
        }
        if !d.has(ar::P) {
            return Err(fault(vector::NP, sel));
        }
        segs[i] = d.seg(sel);
        touched[i] = Some(la);
    }
    for s in segs.iter_mut().filter(|s| s.ar & AR_UNUSABLE == 0) {
        s.ar |= ar::ACCESSED;
    }
    Ok((segs, touched))
}

/// Sets or clears the busy bit of the TSS descriptor at `la`.
fn set_busy(mem: &mut impl LinearMem, la: u64, busy: bool) -> bool {
    let mut b = [0u8; 1];
    if !mem.read(la + 5, &mut b) {
        return false;
    }
    #[allow(clippy::cast_possible_truncation, reason = "bit 1 of the type byte")]
    let bit = ar::BUSY as u8;
    b[0] = if busy { b[0] | bit } else { b[0] & !bit };
    mem.write(la + 5, &b)
}

/// Performs the task switch `req` from `st`. Returns the new state, or the
/// exception the guest gets instead (its registers unchanged; memory the
/// switch already wrote stays written).
pub fn switch(st: &TaskState, req: &Request, mem: &mut impl LinearMem) -> Result<TaskState, Fault> {
    let ext = req.ext();
    let fault = |v: u8, sel: u16| Fault {
        vector: v,
        error_code: Some(u32::from(sel & 0xfffc) | ext),
    };
    if st.efer & EFER_LMA != 0 || st.cr0 & CR0_PE == 0 {
        // IA-32e mode has no task switching (the processor raises #GP
        // before any exit), real mode has no TSS.
        return Err(Fault {
            vector: vector::GP,
            error_code: Some(0),
        });
    }
    let sel = req.selector;
    let iret = req.source == Source::Iret;
    // The new TSS descriptor: in the GDT, available (busy for IRET),
    // present, big enough. The processor checked this before exiting; the
    // GDT is guest memory another CPU may have changed since.
    let bad = if iret { vector::TS } else { vector::GP };
    if sel & 4 != 0 {
        return Err(fault(bad, sel));
    }
    let (new_la, nd) = lookup(mem, sel, st.gdtr, &st.ldtr).ok_or_else(|| fault(bad, sel))?;
    let ty = nd.ar() & 0x1f;
    if !matches!(ty, 1 | 3 | 9 | 11) || (ty & ar::BUSY != 0) != iret {
        return Err(fault(bad, sel));
    }
    if !nd.has(ar::P) {
        return Err(fault(vector::NP, sel));
    }
    let new32 = ty & ar::TSS32 != 0;
    let (size, min) = if new32 {
        (TSS32_SIZE, TSS32_MIN_LIMIT)
    } else {
        (TSS16_SIZE, TSS16_MIN_LIMIT)
    };
    if nd.limit() < min {
        return Err(fault(vector::TS, sel));
    }
    let mut raw = [0u8; TSS32_SIZE];
    if !mem.read(nd.base(), &mut raw[..size]) {
        return Err(fault(vector::TS, sel));
    }
    let img = parse(&raw[..size], new32, st);

    // The new task's LDT and segments, checked before anything changes.
    let ldtr = if is_null(img.ldt) {
        unusable(img.ldt)
    } else {
        let d = (img.ldt & 4 == 0)
            .then(|| lookup(mem, img.ldt, st.gdtr, &st.ldtr))
            .flatten()
            .map(|(_, d)| d)
            .filter(|d| d.ar() & 0x1f == 2 && d.has(ar::P))
            .ok_or_else(|| fault(vector::TS, img.ldt))?;
        d.seg(img.ldt)
    };
    let mut eflags = (img.eflags & EFLAGS_LOADABLE) | EFLAGS_FIXED1;
    if matches!(req.source, Source::Call | Source::Gate) {
        eflags |= EFLAGS_NT;
    }
    let vm86 = eflags & EFLAGS_VM != 0;
    let (segs, touched) = load_segments(mem, &img, vm86, st.gdtr, &ldtr, fault)?;

    // Commit: save the old task, then the busy bits and the back link.
    let old_tr = st.tr.selector;
    let old_flags = if iret {
        st.rflags & !EFLAGS_NT
    } else {
        st.rflags
    };
    let (at, bytes) = save_image(
        st,
        req.return_eip(st.rip),
        old_flags,
        st.tr.ar & ar::TSS32 != 0,
    );
    let len = if st.tr.ar & ar::TSS32 != 0 {
        tss32::LDT - tss32::EIP
    } else {
        tss16::LDT - tss16::IP
    };
    if !mem.write(st.tr.base.wrapping_add(at as u64), &bytes[..len]) {
        return Err(fault(vector::TS, old_tr));
    }
    if matches!(req.source, Source::Jmp | Source::Iret)
        && !is_null(old_tr)
        && old_tr & 4 == 0
        && let Some(la) = desc_addr(old_tr, st.gdtr, &st.ldtr)
        && !set_busy(mem, la, false)
    {
        return Err(fault(vector::TS, old_tr));
    }
    if !iret && !set_busy(mem, new_la, true) {
        return Err(fault(vector::TS, sel));
    }
    if matches!(req.source, Source::Call | Source::Gate)
        && !mem.write(nd.base(), &old_tr.to_le_bytes())
    {
        return Err(fault(vector::TS, sel));
    }
    for la in touched.into_iter().flatten() {
        // The accessed bit of each loaded descriptor; a descriptor the
        // switch just read is writable RAM, a failure changes nothing.
        let mut b = [0u8; 1];
        if mem.read(la + 5, &mut b) && b[0] & 1 == 0 {
            b[0] |= 1;
            let _ = mem.write(la + 5, &b);
        }
    }

    let mut out = *st;
    out.tr = Seg {
        selector: sel,
        base: nd.base(),
        limit: nd.limit(),
        ar: nd.ar() | ar::BUSY,
    };
    out.ldtr = ldtr;
    out.segs = segs;
    out.gprs = img.gprs;
    out.rip = img.eip;
    out.rflags = eflags;
    if let Some(cr3) = img.cr3
        && st.cr0 & CR0_PG != 0
    {
        out.cr3 = cr3;
    }
    out.cr0 |= CR0_TS;
    out.dr7 &= !DR7_LOCAL_ENABLES;
    out.pdptes = None;

    // An exception with an error code delivered through the task gate:
    // the code goes on the new task's stack (SDM Vol. 3A §6.12.2).
    if req.source == Source::Gate && req.event & event::HAS_ERROR != 0 {
        let ss = out.segs[SS];
        let (size, mask) = match (new32, ss.ar & ar::DB != 0) {
            (true, true) => (4u64, 0xffff_ffffu64),
            (true, false) => (4, 0xffff),
            (false, true) => (2, 0xffff_ffff),
            (false, false) => (2, 0xffff),
        };
        let esp = out.gprs[ESP];
        let new_esp = (esp & !mask) | (esp.wrapping_sub(size) & mask);
        let code = req.error_code.to_le_bytes();
        #[allow(clippy::cast_possible_truncation, reason = "2 or 4")]
        let n = size as usize;
        if !mem.write(ss.base.wrapping_add(new_esp & mask), &code[..n]) {
            return Err(Fault {
                vector: vector::SS,
                error_code: Some(ext),
            });
        }
        out.gprs[ESP] = new_esp;
    }
    Ok(out)
}

/// Guest linear memory of a CPU in legacy protected mode, reached through
/// its page tables, limited to RAM outside the hypervisor.
pub struct GuestLinear<'a, E: Env> {
    /// The host side.
    pub env: &'a mut E,
    /// The guest's paging registers.
    pub paging: PagingRegs,
}

/// Up to two guest-physical pieces of an access (gpa, offset in the
/// access, length), and how many there are.
type Pieces = ([(u64, usize, usize); 2], usize);

impl<E: Env> GuestLinear<'_, E> {
    /// The guest-physical pieces of `len` bytes at `la`, or `None` if any
    /// page cannot be reached.
    fn pieces(&self, la: u64, len: usize) -> Option<Pieces> {
        let mut out = [(0, 0, 0); 2];
        let mut n = 0;
        let mut done = 0;
        while done < len {
            let a = la.wrapping_add(done as u64) & 0xffff_ffff;
            let gpa = translate(&*self.env, &self.paging, a)?;
            let room = usize::try_from(0x1000 - (a & 0xfff)).ok()?;
            let chunk = room.min(len - done);
            check_buffer(self.env.hv(), gpa, chunk as u64).ok()?;
            *out.get_mut(n)? = (gpa, done, chunk);
            n += 1;
            done += chunk;
        }
        Some((out, n))
    }
}

impl<E: Env> LinearMem for GuestLinear<'_, E> {
    fn read(&self, la: u64, buf: &mut [u8]) -> bool {
        // Accesses here are at most a TSS (0x68 bytes): two pages at most.
        let Some((pieces, n)) = self.pieces(la, buf.len()) else {
            return false;
        };
        for &(gpa, at, len) in &pieces[..n] {
            self.env.read_phys(gpa, &mut buf[at..at + len]);
        }
        true
    }

    fn write(&mut self, la: u64, data: &[u8]) -> bool {
        let Some((pieces, n)) = self.pieces(la, data.len()) else {
            return false;
        };
        for &(gpa, at, len) in &pieces[..n] {
            self.env.write_phys(gpa, &data[at..at + len]);
        }
        true
    }
}

/// The PDPTEs for PAE paging with `cr3` (SDM Vol. 3A §4.4.1), from RAM.
fn pdptes(env: &impl Env, cr3: u64) -> Option<[u64; 4]> {
    let base = cr3 & 0xffff_ffe0;
    check_buffer(env.hv(), base, 32).ok()?;
    let mut b = [0u8; 32];
    read_guest_phys(env, base, &mut b).then(|| {
        core::array::from_fn(|i| {
            let mut e = [0u8; 8];
            e.copy_from_slice(&b[i * 8..i * 8 + 8]);
            u64::from_le_bytes(e)
        })
    })
}

/// Handles a task-switch exit: performs the switch, or raises what the
/// processor would have raised. A fault while a task gate delivers an
/// exception follows the double-fault rules (SDM Vol. 3A §6.15, Table
/// 6-5); a fault while delivering #DF is a triple fault (shutdown).
pub fn handle(cpu: &mut impl GuestCpu, env: &mut impl Env, req: &Request) -> Outcome {
    let Some(st) = cpu.task_state() else {
        log::error!(
            "cpu {}: task switch exit on a backend without task-switch emulation; #GP",
            env.cpu_index()
        );
        cpu.inject_exception(vector::GP, Some(0));
        return Outcome::Resume;
    };
    let mut mem = GuestLinear {
        env: &mut *env,
        paging: cpu.paging(),
    };
    let result = switch(&st, req, &mut mem).and_then(|mut new| {
        let pae = new.cr0 & CR0_PG != 0 && new.cr4 & CR4_PAE != 0;
        if pae {
            new.pdptes = Some(pdptes(env, new.cr3).ok_or(Fault {
                vector: vector::TS,
                error_code: Some(u32::from(req.selector & 0xfffc) | req.ext()),
            })?);
        }
        Ok(new)
    });
    match result {
        Ok(new) => {
            log::debug!(
                "cpu {}: task switch ({:?}) from TSS {:#x} to {:#x}, eip {:#x}",
                env.cpu_index(),
                req.source,
                st.tr.selector,
                req.selector,
                new.rip
            );
            let delivered = if req.source == Source::Gate {
                req.event
            } else {
                0
            };
            cpu.set_task_state(&new, delivered);
            Outcome::Resume
        }
        Err(f) => deliver_fault(cpu, env, req, f),
    }
}

fn deliver_fault(cpu: &mut impl GuestCpu, env: &impl Env, req: &Request, f: Fault) -> Outcome {
    log::warn!(
        "cpu {}: task switch ({:?}) to TSS {:#x} faults: vector {} error {:?}",
        env.cpu_index(),
        req.source,
        req.selector,
        f.vector,
        f.error_code
    );
    let contributory = |v: u8| matches!(v, 0 | vector::TS | vector::NP | vector::SS | vector::GP);
    if req.source == Source::Gate
        && req.event & event::VALID != 0
        && event::kind(req.event) == event::TYPE_HW_EXCEPTION
    {
        let first = event::vector(req.event);
        if first == vector::DF {
            log::error!(
                "cpu {}: fault while delivering #DF through a task gate: triple fault, resetting the platform",
                env.cpu_index()
            );
            return Outcome::Reset;
        }
        let pf_then = first == vector::PF && (contributory(f.vector) || f.vector == vector::PF);
        if (contributory(first) && contributory(f.vector)) || pf_then {
            cpu.inject_exception(vector::DF, Some(0));
            return Outcome::Resume;
        }
    }
    cpu.inject_exception(f.vector, f.error_code);
    Outcome::Resume
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
#[path = "task_switch_tests.rs"]
mod tests;
