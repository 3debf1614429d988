//! Task switches on a fake linear memory (identity, 64 KiB, with holes).
use super::*;
use crate::guest::vector;

/// Flat guest memory; `hole` is a range that can be neither read nor
/// written (a page the guest's tables do not map, or MMIO).
struct Mem {
    bytes: Vec<u8>,
    hole: core::ops::Range<u64>,
    writes: usize,
}

impl Mem {
    fn new() -> Self {
        Self {
            bytes: vec![0; 0x1_0000],
            hole: 0..0,
            writes: 0,
        }
    }
    fn ok(&self, la: u64, len: usize) -> bool {
        let end = la + len as u64;
        end <= self.bytes.len() as u64 && (end <= self.hole.start || la >= self.hole.end)
    }
    fn put(&mut self, at: u64, b: &[u8]) {
        self.bytes[at as usize..at as usize + b.len()].copy_from_slice(b);
    }
    fn u16(&self, at: u64) -> u16 {
        u16::from_le_bytes(self.bytes[at as usize..at as usize + 2].try_into().unwrap())
    }
    fn u32(&self, at: u64) -> u32 {
        u32::from_le_bytes(self.bytes[at as usize..at as usize + 4].try_into().unwrap())
    }
    fn desc(&self, sel: u16) -> u64 {
        let at = GDT + u64::from(sel & !7);
        u64::from_le_bytes(self.bytes[at as usize..at as usize + 8].try_into().unwrap())
    }
}

impl LinearMem for Mem {
    fn read(&self, la: u64, buf: &mut [u8]) -> bool {
        if !self.ok(la, buf.len()) {
            return false;
        }
        buf.copy_from_slice(&self.bytes[la as usize..la as usize + buf.len()]);
        true
    }
    fn write(&mut self, la: u64, data: &[u8]) -> bool {
        if !self.ok(la, data.len()) {
            return false;
        }
        self.writes += 1;
        self.put(la, data);
        true
    }
}

const GDT: u64 = 0x1000;
const TSS_A: u64 = 0x3000;
const TSS_B: u64 = 0x4000;
const TSS_C: u64 = 0x5000;
const LDT: u64 = 0x6000;

const CODE0: u16 = 0x08;
const DATA0: u16 = 0x10;
const CODE3: u16 = 0x1b;
const DATA3: u16 = 0x23;
const SEL_A: u16 = 0x28;
const SEL_B: u16 = 0x30;
const SEL_C: u16 = 0x38;
const SEL_LDT: u16 = 0x40;
const SEL_ABSENT: u16 = 0x48;
const SEL_SMALL: u16 = 0x50;
const SEL_CODE0_ABSENT: u16 = 0x58;
const SEL_DATA0_ABSENT: u16 = 0x60;

/// A descriptor: base, 20-bit limit, access byte, flags nibble (G, D/B, L, AVL).
fn desc(base: u32, limit: u32, access: u8, flags: u8) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (u64::from(access) << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (u64::from(flags & 0xf) << 52)
        | ((base >> 24) << 56)
}

/// 32-bit protected mode, no paging; task A (TR 0x28) running at CPL 0.
fn setup() -> (Mem, TaskState) {
    let mut m = Mem::new();
    let table: [(u16, u64); 12] = [
        (CODE0, desc(0, 0xfffff, 0x9a, 0xc)),
        (DATA0, desc(0, 0xfffff, 0x92, 0xc)),
        (CODE3 & !3, desc(0, 0xfffff, 0xfa, 0xc)),
        (DATA3 & !3, desc(0, 0xfffff, 0xf2, 0xc)),
        (SEL_A, desc(TSS_A as u32, 0x67, 0x8b, 0)),
        (SEL_B, desc(TSS_B as u32, 0x67, 0x89, 0)),
        (SEL_C, desc(TSS_C as u32, 0x2b, 0x81, 0)),
        (SEL_LDT, desc(LDT as u32, 0x17, 0x82, 0)),
        (SEL_ABSENT, desc(TSS_B as u32, 0x67, 0x09, 0)),
        (SEL_SMALL, desc(TSS_B as u32, 0x50, 0x89, 0)),
        (SEL_CODE0_ABSENT, desc(0, 0xfffff, 0x1a, 0xc)),
        (SEL_DATA0_ABSENT, desc(0, 0xfffff, 0x12, 0xc)),
    ];
    for (sel, d) in table {
        m.put(GDT + u64::from(sel), &d.to_le_bytes());
    }
    // Task B's TSS: CR3, EIP 0x8000, EFLAGS IF, GPRs 0x100.., ring 0 flat.
    let b = tss32_image(0xa000, 0x8000, 0x202, CODE0, DATA0, 0);
    m.put(TSS_B, &b);
    let data = Seg {
        selector: DATA0,
        base: 0,
        limit: 0xffff_ffff,
        ar: 0xc093,
    };
    let st = TaskState {
        gprs: [1, 2, 3, 4, 0x9ff0, 6, 7, 8],
        rip: 0x7000,
        rflags: 0x202,
        segs: [
            data,
            Seg {
                selector: CODE0,
                base: 0,
                limit: 0xffff_ffff,
                ar: 0xc09b,
            },
            data,
            data,
            data,
            data,
        ],
        ldtr: Seg {
            selector: 0,
            base: 0,
            limit: 0,
            ar: AR_UNUSABLE,
        },
        tr: Seg {
            selector: SEL_A,
            base: TSS_A,
            limit: 0x67,
            ar: 0x8b,
        },
        gdtr: (GDT, 0x67),
        cr0: 0x8000_0031,
        cr3: 0x9000,
        cr4: 0,
        efer: 0,
        dr7: 0x4ff,
        pdptes: None,
    };
    (m, st)
}

fn tss32_image(cr3: u32, eip: u32, eflags: u32, cs: u16, ds: u16, ldt: u16) -> [u8; 0x68] {
    let mut b = [0u8; 0x68];
    let mut put = |at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    put(0x1c, cr3);
    put(0x20, eip);
    put(0x24, eflags);
    for i in 0..8 {
        put(0x28 + 4 * i, 0x100 + i as u32);
    }
    put(0x38, 0xbff0); // ESP
    for (i, s) in [ds, cs, ds, ds, ds, ds].iter().enumerate() {
        put(0x48 + 4 * i, u32::from(*s));
    }
    put(0x60, u32::from(ldt));
    b
}

fn req(selector: u16, source: Source) -> Request {
    Request {
        selector,
        source,
        event: 0,
        error_code: 0,
        insn_len: 7,
    }
}

fn busy(m: &Mem, sel: u16) -> bool {
    m.desc(sel) & (1 << 41) != 0
}

#[test]
fn call_saves_the_old_task_links_and_loads_the_new_one() {
    let (mut m, st) = setup();
    let new = switch(&st, &req(SEL_B, Source::Call), &mut m).unwrap();
    // The old TSS holds the state after the CALL instruction.
    assert_eq!(m.u32(TSS_A + 0x20), 0x7007, "EIP past the 7-byte CALL");
    assert_eq!(m.u32(TSS_A + 0x24), 0x202);
    assert_eq!(m.u32(TSS_A + 0x28), 1, "EAX");
    assert_eq!(m.u32(TSS_A + 0x38), 0x9ff0, "ESP");
    assert_eq!(m.u32(TSS_A + 0x4c), u32::from(CODE0), "CS");
    assert_eq!(m.u32(TSS_A + 0x1c), 0, "CR3 is not saved");
    // Back link, busy bits: both tasks busy (nested).
    assert_eq!(m.u16(TSS_B), SEL_A);
    assert!(busy(&m, SEL_A) && busy(&m, SEL_B));
    // The new task.
    assert_eq!(new.rip, 0x8000);
    assert_eq!(new.rflags, 0x202 | EFLAGS_NT, "NT set by CALL");
    assert_eq!(new.gprs[0], 0x100);
    assert_eq!(new.gprs[ESP], 0xbff0);
    assert_eq!(new.cr3, 0xa000, "CR3 loaded with paging on");
    assert_ne!(new.cr0 & CR0_TS, 0, "CR0.TS set");
    assert_eq!(new.dr7, 0x4aa, "DR7 L0-L3 cleared, G0-G3 kept");
    assert_eq!(
        new.tr,
        Seg {
            selector: SEL_B,
            base: TSS_B,
            limit: 0x67,
            ar: 0x8b
        }
    );
    assert_eq!(new.ldtr.ar, AR_UNUSABLE);
    assert_eq!(new.segs[CS].ar, 0xc09b, "accessed");
    assert_eq!(new.segs[SS].ar, 0xc093);
    // The accessed bits reached the descriptors.
    assert_ne!(m.desc(CODE0) & (1 << 40), 0);
    assert_ne!(m.desc(DATA0) & (1 << 40), 0);
}

#[test]
fn iret_returns_to_the_linked_task() {
    let (mut m, st) = setup();
    let b = switch(&st, &req(SEL_B, Source::Call), &mut m).unwrap();
    // B runs, then IRET with NT: back to A at the saved EIP.
    let mut b = b;
    b.rip = 0x8123;
    b.gprs[0] = 0xaa;
    let a = switch(&b, &req(SEL_A, Source::Iret), &mut m).unwrap();
    assert_eq!(a.rip, 0x7007);
    assert_eq!(a.gprs[0], 1);
    assert_eq!(a.rflags, 0x202, "A's own EFLAGS, no NT");
    assert!(!busy(&m, SEL_B), "B no longer busy");
    assert!(busy(&m, SEL_A));
    assert_eq!(
        m.u32(TSS_B + 0x24) & EFLAGS_NT as u32,
        0,
        "NT cleared in B's saved EFLAGS"
    );
    assert_eq!(m.u32(TSS_B + 0x20), 0x8123 + 7);
    assert_eq!(m.u32(TSS_B + 0x28), 0xaa);
    assert_eq!(a.tr.selector, SEL_A);
    // IRET to a task that is not busy: #TS.
    let e = switch(&a, &req(SEL_B, Source::Iret), &mut m).unwrap_err();
    assert_eq!(
        e,
        Fault {
            vector: vector::TS,
            error_code: Some(u32::from(SEL_B))
        }
    );
}

#[test]
fn jmp_moves_the_busy_bit_without_a_link() {
    let (mut m, st) = setup();
    let new = switch(&st, &req(SEL_B, Source::Jmp), &mut m).unwrap();
    assert!(!busy(&m, SEL_A) && busy(&m, SEL_B));
    assert_eq!(m.u16(TSS_B), 0, "no back link");
    assert_eq!(new.rflags & EFLAGS_NT, 0);
    // Jumping to a busy task is a #GP.
    let e = switch(&new, &req(SEL_B, Source::Jmp), &mut m).unwrap_err();
    assert_eq!(e.vector, vector::GP);
    assert_eq!(e.error_code, Some(u32::from(SEL_B)));
}

#[test]
fn an_exception_through_a_task_gate_pushes_its_error_code() {
    let (mut m, st) = setup();
    // #GP(0x1234), a hardware exception (type 3) with an error code.
    let r = Request {
        selector: SEL_B,
        source: Source::Gate,
        event: event::VALID | event::HAS_ERROR | (3 << 8) | 0x0d,
        error_code: 0x1234,
        insn_len: 0,
    };
    let new = switch(&st, &r, &mut m).unwrap();
    assert_eq!(
        m.u32(TSS_A + 0x20),
        0x7000,
        "a fault saves the faulting EIP"
    );
    assert_eq!(new.gprs[ESP], 0xbff0 - 4);
    assert_eq!(m.u32(0xbff0 - 4), 0x1234);
    assert_eq!(m.u16(TSS_B), SEL_A, "linked");
    assert_ne!(new.rflags & EFLAGS_NT, 0);
    // A software interrupt (INT n, type 4, 2 bytes) saves the next EIP.
    let (mut m, st) = setup();
    let r = Request {
        selector: SEL_B,
        source: Source::Gate,
        event: event::VALID | (4 << 8) | 0x80,
        error_code: 0,
        insn_len: 2,
    };
    let new = switch(&st, &r, &mut m).unwrap();
    assert_eq!(m.u32(TSS_A + 0x20), 0x7002);
    assert_eq!(new.gprs[ESP], 0xbff0, "nothing pushed");
}

#[test]
fn faults_before_the_commit_point_change_nothing() {
    let (m0, st) = setup();
    let check = |mutate: &dyn Fn(&mut Mem), r: Request, want: Fault| {
        let mut m = Mem {
            bytes: m0.bytes.clone(),
            hole: 0..0,
            writes: 0,
        };
        mutate(&mut m);
        let e = switch(&st, &r, &mut m).unwrap_err();
        assert_eq!(e, want, "{r:?}");
        assert_eq!(m.writes, 0, "nothing written for {want:?}");
    };
    // Error codes carry the selector without its RPL.
    let f = |vector: u8, sel: u16| Fault {
        vector,
        error_code: Some(u32::from(sel & 0xfffc)),
    };
    let none = |_: &mut Mem| {};
    check(
        &none,
        req(SEL_ABSENT, Source::Call),
        f(vector::NP, SEL_ABSENT),
    );
    check(&none, req(SEL_SMALL, Source::Jmp), f(vector::TS, SEL_SMALL));
    check(&none, req(CODE0, Source::Jmp), f(vector::GP, CODE0));
    check(&none, req(0x0c, Source::Call), f(vector::GP, 0x0c));
    check(&none, req(0x1f8, Source::Call), f(vector::GP, 0x1f8));
    // The new task's segments.
    let cs = |sel: u16| move |m: &mut Mem| m.put(TSS_B + 0x4c, &u32::from(sel).to_le_bytes());
    check(&cs(0), req(SEL_B, Source::Call), f(vector::TS, 0));
    check(&cs(DATA0), req(SEL_B, Source::Call), f(vector::TS, DATA0));
    // A DPL 3 non-conforming code segment named with RPL 0.
    check(
        &cs(CODE3 & !3),
        req(SEL_B, Source::Call),
        f(vector::TS, CODE3 & !3),
    );
    check(
        &cs(SEL_CODE0_ABSENT),
        req(SEL_B, Source::Call),
        f(vector::NP, SEL_CODE0_ABSENT),
    );
    let ss = |sel: u16| move |m: &mut Mem| m.put(TSS_B + 0x50, &u32::from(sel).to_le_bytes());
    check(&ss(0), req(SEL_B, Source::Call), f(vector::TS, 0));
    check(&ss(CODE0), req(SEL_B, Source::Call), f(vector::TS, CODE0));
    check(&ss(DATA3), req(SEL_B, Source::Call), f(vector::TS, DATA3));
    check(
        &ss(SEL_DATA0_ABSENT),
        req(SEL_B, Source::Call),
        f(vector::SS, SEL_DATA0_ABSENT),
    );
    // DS with RPL 3 on a DPL 0 segment.
    let ds = |m: &mut Mem| m.put(TSS_B + 0x54, &u32::from(DATA0 | 3).to_le_bytes());
    check(&ds, req(SEL_B, Source::Call), f(vector::TS, DATA0 | 3));
    // An LDT selector that names a TSS.
    let ldt = |m: &mut Mem| m.put(TSS_B + 0x60, &u32::from(SEL_A).to_le_bytes());
    check(&ldt, req(SEL_B, Source::Call), f(vector::TS, SEL_A));
    // A new TSS the guest cannot reach.
    let hole = |m: &mut Mem| m.hole = TSS_B..TSS_B + 0x1000;
    check(&hole, req(SEL_B, Source::Call), f(vector::TS, SEL_B));
    // Through a task gate for a hardware event, the error codes have EXT.
    let gate = Request {
        selector: SEL_ABSENT,
        source: Source::Gate,
        event: event::VALID | (2 << 8) | 0x02,
        error_code: 0,
        insn_len: 0,
    };
    check(
        &none,
        gate,
        Fault {
            vector: vector::NP,
            error_code: Some(u32::from(SEL_ABSENT) | 1),
        },
    );
}

#[test]
fn no_task_switch_in_ia32e_or_real_mode() {
    let (mut m, mut st) = setup();
    st.efer = EFER_LMA | (1 << 8);
    let gp0 = Fault {
        vector: vector::GP,
        error_code: Some(0),
    };
    assert_eq!(switch(&st, &req(SEL_B, Source::Call), &mut m), Err(gp0));
    st.efer = 0;
    st.cr0 = 0x10;
    assert_eq!(switch(&st, &req(SEL_B, Source::Call), &mut m), Err(gp0));
    assert_eq!(m.writes, 0);
}

#[test]
fn an_unwritable_old_tss_faults_with_the_old_selector() {
    let (mut m, st) = setup();
    m.hole = TSS_A..TSS_A + 0x100;
    let e = switch(&st, &req(SEL_B, Source::Jmp), &mut m).unwrap_err();
    assert_eq!(
        e,
        Fault {
            vector: vector::TS,
            error_code: Some(u32::from(SEL_A))
        }
    );
    assert!(!busy(&m, SEL_B), "the new task was not marked busy");
}

#[test]
fn a_task_with_an_ldt_and_user_segments() {
    let (mut m, st) = setup();
    // The LDT holds a ring-3 code (0x04|7 = 0x07) and data (0x0f) segment.
    m.put(LDT, &desc(0x10_0000, 0xff, 0xfa, 0x4).to_le_bytes());
    m.put(LDT + 8, &desc(0x20_0000, 0xff, 0xf2, 0x4).to_le_bytes());
    let img = tss32_image(0xa000, 0x10, 0x3202, 0x07, 0x0f, SEL_LDT);
    m.put(TSS_B, &img);
    let new = switch(&st, &req(SEL_B, Source::Jmp), &mut m).unwrap();
    assert_eq!(new.ldtr.base, LDT);
    assert_eq!(new.ldtr.ar, 0x82);
    assert_eq!(new.segs[CS].base, 0x10_0000);
    assert_eq!(new.segs[CS].limit, 0xff);
    assert_eq!(new.segs[CS].ar, 0x40fb);
    assert_eq!(new.segs[SS].base, 0x20_0000);
    assert_eq!(new.rflags, 0x3202, "IOPL 3 loaded");
    // Accessed bits in the LDT.
    assert_eq!(m.bytes[LDT as usize + 5], 0xfb);
    assert_eq!(m.bytes[LDT as usize + 13], 0xf3);
}

#[test]
fn a_32_bit_tss_with_vm_set_starts_a_virtual_8086_task() {
    let (mut m, st) = setup();
    let mut img = tss32_image(0xa000, 0x100, 0x2_0202, 0x1234, 0x2000, 0);
    // SS = 0x3000.
    img[0x50..0x54].copy_from_slice(&0x3000u32.to_le_bytes());
    m.put(TSS_B, &img);
    let new = switch(&st, &req(SEL_B, Source::Jmp), &mut m).unwrap();
    assert_ne!(new.rflags & EFLAGS_VM, 0);
    assert_eq!(
        new.segs[CS],
        Seg {
            selector: 0x1234,
            base: 0x12340,
            limit: 0xffff,
            ar: 0xf3
        }
    );
    assert_eq!(new.segs[SS].base, 0x30000);
}

#[test]
fn a_16_bit_tss() {
    let (mut m, mut st) = setup();
    // Leave paging off: a 16-bit TSS has no CR3.
    st.cr0 = 0x31;
    let mut b = [0u8; 0x2c];
    b[0x0e..0x10].copy_from_slice(&0x1234u16.to_le_bytes()); // IP
    b[0x10..0x12].copy_from_slice(&0x0202u16.to_le_bytes()); // FLAGS
    for i in 0..8 {
        b[0x12 + 2 * i..0x14 + 2 * i].copy_from_slice(&(0x10 + i as u16).to_le_bytes());
    }
    for (i, s) in [DATA0, CODE0, DATA0, DATA0].iter().enumerate() {
        b[0x22 + 2 * i..0x24 + 2 * i].copy_from_slice(&s.to_le_bytes());
    }
    m.put(TSS_C, &b);
    let new = switch(&st, &req(SEL_C, Source::Call), &mut m).unwrap();
    assert_eq!(new.rip, 0x1234);
    assert_eq!(new.gprs[1], 0x11);
    assert_eq!(new.cr3, st.cr3, "no CR3 in a 16-bit TSS");
    assert_eq!(new.tr.ar, 0x83, "busy 16-bit TSS");
    assert_eq!(new.segs[FS], st.segs[FS]);
    assert_eq!(m.u16(TSS_C), SEL_A, "back link");
    // Back to A by IRET: the 16-bit save area of C is written.
    let mut c = new;
    c.rip = 0x1300;
    let a = switch(&c, &req(SEL_A, Source::Iret), &mut m).unwrap();
    assert_eq!(a.rip, 0x7007);
    assert_eq!(m.u16(TSS_C + 0x0e), 0x1300 + 7);
    assert_eq!(m.u16(TSS_C + 0x24), CODE0);
}
