//! The emulated unit against thinhv's own VT-d driver (`crate::vtd`,
//! written from the specification for real units), and against what a
//! hostile OS programs.
use super::*;
use crate::irq_remap::{Cores, Policy, vtd as irvtd};
use crate::vtd::{self, Mmio, QueueMemory};
use std::cell::RefCell;
use std::rc::Rc;

/// 1 MiB of OS RAM at 0, with 0x80000..0x90000 not the OS's.
struct Ram {
    bytes: Vec<u8>,
}

const DENIED: core::ops::Range<u64> = 0x8_0000..0x9_0000;

impl Ram {
    fn new() -> Self {
        Self {
            bytes: vec![0; 0x10_0000],
        }
    }
    fn ok(&self, gpa: u64, len: usize) -> Result<usize, Denied> {
        let end = gpa.checked_add(len as u64).ok_or(Denied)?;
        if end > self.bytes.len() as u64 || (gpa < DENIED.end && end > DENIED.start) {
            return Err(Denied);
        }
        Ok(gpa as usize)
    }
    fn put(&mut self, gpa: u64, v: &[u64]) {
        for (i, w) in v.iter().enumerate() {
            let at = gpa as usize + i * 8;
            self.bytes[at..at + 8].copy_from_slice(&w.to_le_bytes());
        }
    }
    fn dword(&self, gpa: u64) -> u32 {
        let at = gpa as usize;
        u32::from_le_bytes(self.bytes[at..at + 4].try_into().unwrap())
    }
}

impl OsMemory for Ram {
    fn read(&self, gpa: u64, out: &mut [u8]) -> Result<(), Denied> {
        let at = self.ok(gpa, out.len())?;
        out.copy_from_slice(&self.bytes[at..at + out.len()]);
        Ok(())
    }
    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), Denied> {
        let at = self.ok(gpa, data.len())?;
        self.bytes[at..at + data.len()].copy_from_slice(data);
        Ok(())
    }
}

impl OsMemory for Rc<RefCell<Ram>> {
    fn read(&self, gpa: u64, out: &mut [u8]) -> Result<(), Denied> {
        self.borrow().read(gpa, out)
    }
    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), Denied> {
        self.borrow_mut().write(gpa, data)
    }
}

/// The unit as thinhv's driver sees a real one: register accesses, each
/// one's effects kept.
struct Bench {
    unit: RefCell<Unit>,
    ram: Rc<RefCell<Ram>>,
    fx: RefCell<Vec<Effects>>,
}

impl Bench {
    fn new(offer: Offer) -> Self {
        Self {
            unit: RefCell::new(Unit::new(offer)),
            ram: Rc::new(RefCell::new(Ram::new())),
            fx: RefCell::new(Vec::new()),
        }
    }
    fn w(&self, offset: u64, size: u8, value: u64) -> Effects {
        let mut fx = Effects::default();
        let mut mem = self.ram.clone();
        self.unit
            .borrow_mut()
            .write(offset, size, value, &mut mem, &mut fx);
        self.fx.borrow_mut().push(fx);
        fx
    }
    fn r(&self, offset: u64, size: u8) -> u64 {
        self.unit.borrow().read(offset, size)
    }
    /// Effects of every write so far, merged by "any".
    fn any(&self, f: impl Fn(&Effects) -> bool) -> bool {
        self.fx.borrow().iter().any(f)
    }
}

impl Mmio for &Bench {
    fn read32(&self, offset: u64) -> u32 {
        self.r(offset, 4) as u32
    }
    fn read64(&self, offset: u64) -> u64 {
        self.r(offset, 8)
    }
    fn write32(&mut self, offset: u64, value: u32) {
        self.w(offset, 4, u64::from(value));
    }
    fn write64(&mut self, offset: u64, value: u64) {
        self.w(offset, 8, value);
    }
}

/// The driver's queue in OS RAM at 0x1000, its status dword at 0x2000.
struct Queue {
    ram: Rc<RefCell<Ram>>,
    token: u32,
}

impl QueueMemory for Queue {
    fn write(&mut self, i: usize, d: [u64; 2]) {
        self.ram
            .borrow_mut()
            .put(0x1000 + (i as u64 % 256) * 16, &d);
    }
    fn base(&self) -> u64 {
        0x1000
    }
    fn status_address(&self) -> u64 {
        0x2000
    }
    fn status(&self) -> u32 {
        self.ram.borrow().dword(0x2000)
    }
    fn next_token(&mut self) -> u32 {
        self.token += 1;
        self.token
    }
}

const OFFER: Offer = Offer {
    host_width: 46,
    remapping: true,
    x2apic: true,
};

#[test]
fn thinhvs_own_driver_brings_the_emulated_unit_up_with_queue_and_remapping() {
    let b = Bench::new(OFFER);
    let mut q = Queue {
        ram: b.ram.clone(),
        token: 0,
    };
    let c = vtd::enable_queued(&mut &b, 0x4000, &mut q).expect("translation on");
    assert_eq!(c.address_width(), Some(2), "4-level tables");
    assert!(c.caching_mode() && c.coherent() && c.queued_invalidation());
    assert!(c.interrupt_remapping() && c.extended_interrupt_mode());
    assert!(!c.rwbf());
    assert_eq!(c.fault_count(), FAULT_RECORDS as u64);
    assert_eq!((c.fault_offset(), c.iotlb_offset()), (reg::FRCD, reg::IVA));
    assert_eq!(b.unit.borrow().root(), Some(0x4000));
    assert!(b.any(|f| f.root) && b.any(|f| f.translation == Some(true)));
    assert!(b.any(|f| f.context.all) && b.any(|f| f.iotlb.all));
    // The token the driver waited for is in OS RAM.
    assert_eq!(q.status(), 1);
    // A domain-selective IOTLB invalidation through the queue.
    b.fx.borrow_mut().clear();
    vtd::queue_run(&mut &b, &mut q, &[vtd::desc::iotlb_domain(0x105)]).expect("completes");
    assert!(b.any(|f| f.iotlb.scopes() == [Scope::Domain(0x105)]));
    assert!(!b.any(|f| f.iotlb.all || !f.context.is_empty()));

    vtd::enable_remapping(&mut &b, &mut q, 0x6000, 12, true, false).expect("remapping on");
    let t = b.unit.borrow().irt().unwrap();
    assert_eq!((t.base, t.entries, t.x2apic), (0x6000, 4096, true));
    assert!(b.any(|f| f.irt) && b.any(|f| f.entries.all));
    assert!(b.any(|f| f.remapping == Some(true)));
    assert!(!b.unit.borrow().compat_passes());
    assert_eq!(q.status(), 3);

    // The same unit without remapping offered: IR and EIM clear, and the
    // driver's table pointer never latches.
    let plain = Bench::new(Offer {
        remapping: false,
        ..OFFER
    });
    let c = vtd::caps(&&plain);
    assert!(!c.interrupt_remapping() && !c.extended_interrupt_mode());
    let mut q = Queue {
        ram: plain.ram.clone(),
        token: 0,
    };
    vtd::enable_queued(&mut &plain, 0x4000, &mut q).unwrap();
    assert!(vtd::enable_remapping(&mut &plain, &mut q, 0x6000, 12, false, false).is_err());
    assert_eq!(plain.unit.borrow().irt(), None);
}

#[test]
fn registers_ignore_what_hardware_ignores() {
    let b = Bench::new(Offer {
        x2apic: false,
        ..OFFER
    });
    let before = [reg::VER, reg::CAP, reg::ECAP, reg::IQH].map(|o| b.r(o, 8));
    for o in [reg::VER, reg::CAP, reg::ECAP, reg::IQH, reg::GSTS] {
        b.w(o, 4, 0xffff_ffff);
        b.w(o, 8, u64::MAX);
    }
    assert_eq!(
        [reg::VER, reg::CAP, reg::ECAP, reg::IQH].map(|o| b.r(o, 8)),
        before
    );
    assert_eq!(b.r(reg::GSTS, 4), 0);
    // RTADDR: scalable mode (bit 11) and bits above the OS's width read 0;
    // IQA: 256-bit descriptors (DW, bit 11) read 0; IRTA: EIME reads 0
    // where x2APIC is not offered.
    b.w(reg::RTADDR, 8, u64::MAX);
    assert_eq!(b.r(reg::RTADDR, 8), (1 << 46) - 0x1000);
    b.w(reg::IQA, 8, 0x5000 | (1 << 11) | 7);
    assert_eq!(b.r(reg::IQA, 8), 0x5007);
    b.w(reg::IRTA, 8, 0x6000 | (1 << 11) | 0xf);
    assert_eq!(b.r(reg::IRTA, 8), 0x600f);
    // Halves: a quadword register written as two dwords.
    b.w(reg::RTADDR, 4, 0x1234_5000);
    b.w(reg::RTADDR_HI, 4, 0x12);
    assert_eq!(b.r(reg::RTADDR, 8), 0x12_1234_5000);
    assert_eq!(b.r(reg::RTADDR_HI, 4), 0x12);
    // Other sizes, unaligned, beyond the window: nothing.
    b.w(reg::FEDATA, 2, 0xffff);
    b.w(reg::FEDATA + 1, 4, 0xffff);
    b.w(WINDOW, 4, 1);
    assert_eq!(b.r(reg::FEDATA, 4), 0);
    assert_eq!(b.r(reg::FEDATA, 2), 0);
    // Both event interrupts come out of reset masked.
    assert_eq!(b.r(reg::FECTL, 4), 1 << 31);
    assert_eq!(b.r(reg::IECTL, 4), 1 << 31);
    // Not offered: nothing latches or turns on.
    assert_eq!(b.r(reg::VER, 4), 0x10);
    b.w(reg::GCMD, 4, 0x0800_0000 | (1 << 29) | (1 << 28)); // WBF, SFL, EAFL
    assert_eq!(b.r(reg::GSTS, 4), 0);
}

/// The OS's tables: root at 0x10000, context table for bus 0 at 0x11000,
/// a 4-level second-level table at 0x20000.. mapping IOVA 0x4000_0000 to
/// 0x30000 read-write and 0x4000_1000 to 0x31000 read-only.
fn tables(ram: &mut Ram) {
    ram.put(0x10000, &[0x11001, 0]);
    // 00:02.0 (devfn 0x10): 4-level tables, domain 7.
    ram.put(0x11000 + 0x10 * 16, &[0x20001, (7 << 8) | 2]);
    // 00:03.0: pass-through, domain 8.
    ram.put(0x11000 + 0x18 * 16, &[0x1 | (2 << 2), 8 << 8]);
    // 00:04.0: device-TLB translation type (not offered).
    ram.put(0x11000 + 0x20 * 16, &[0x20001 | (1 << 2), (9 << 8) | 2]);
    // 00:05.0: tables in memory that is not the OS's.
    ram.put(0x11000 + 0x28 * 16, &[DENIED.start | 1, (10 << 8) | 2]);
    // 00:06.0: not present, faults not to be recorded.
    ram.put(0x11000 + 0x30 * 16, &[2, 0]);
    // IOVA 0x4000_0000: indexes 0, 1, 0, 0 and 1.
    ram.put(0x20000, &[0x21003]);
    ram.put(0x21000 + 8, &[0x22003]);
    ram.put(0x22000, &[0x23003]);
    ram.put(0x23000, &[0x30003, 0x31001]);
}

#[test]
fn the_oss_tables_translate_and_fault_as_hardware_does() {
    let b = Bench::new(OFFER);
    tables(&mut b.ram.borrow_mut());
    let u = || b.unit.borrow();
    let mem = b.ram.clone();
    // Translation off: requests pass untranslated.
    assert_eq!(u().context(&mem, 0x10), Ok(Context::Off));
    // On without a root table latched.
    b.w(reg::GCMD, 4, u64::from(gsts::TES));
    assert_eq!(u().context(&mem, 0x10), Err((reason::ROOT_ACCESS, false)));
    b.w(reg::RTADDR, 8, 0x10000);
    b.w(reg::GCMD, 4, u64::from(gsts::TES | gsts::RTPS));
    let ctx = u().context(&mem, 0x10).unwrap();
    assert_eq!(
        ctx,
        Context::Tables {
            domain: 7,
            root: 0x20000,
            levels: 4
        }
    );
    let walk = |iova| u().walk(&mem, 0x20000, 4, iova);
    assert_eq!(
        walk(0x4000_0000),
        Ok(Some(Page {
            gpa: 0x30000,
            read: true,
            write: true
        }))
    );
    assert_eq!(
        walk(0x4000_1000),
        Ok(Some(Page {
            gpa: 0x31000,
            read: true,
            write: false
        }))
    );
    assert_eq!(walk(0x4000_2000), Ok(None));
    assert_eq!(walk(1 << 48), Err(reason::BEYOND_AW));
    assert_eq!(u().walk(&mem, 0x20000, 3, 1 << 39), Err(reason::BEYOND_AW));
    assert_eq!(
        u().context(&mem, 0x18),
        Ok(Context::PassThrough { domain: 8 })
    );
    assert_eq!(
        u().context(&mem, 0x20),
        Err((reason::CONTEXT_INVALID, false))
    );
    assert_eq!(u().walk(&mem, DENIED.start, 4, 0), Err(reason::SL_ACCESS));
    assert_eq!(
        u().context(&mem, 0x30),
        Err((reason::CONTEXT_NOT_PRESENT, true))
    );
    assert_eq!(
        u().context(&mem, 0x100),
        Err((reason::ROOT_NOT_PRESENT, false))
    );
    // A large page (not offered: PS in a directory), a reserved context
    // bit, an entry beyond the OS's width. Bit 7 of a 4 KiB leaf is
    // ignored.
    b.ram.borrow_mut().put(0x22000, &[0x23003 | (1 << 7)]);
    assert_eq!(walk(0x4000_0000), Err(reason::SL_RESERVED));
    b.ram.borrow_mut().put(0x22000, &[0x23003]);
    b.ram.borrow_mut().put(0x23000, &[0x30003 | (1 << 7)]);
    assert_eq!(
        walk(0x4000_0000),
        Ok(Some(Page {
            gpa: 0x30000,
            read: true,
            write: true
        }))
    );
    b.ram.borrow_mut().put(0x23000, &[(1 << 47) | 0x30003]);
    assert_eq!(walk(0x4000_0000), Err(reason::SL_RESERVED));
    b.ram
        .borrow_mut()
        .put(0x11000 + 0x10 * 16, &[0x20001 | (1 << 4), 2]);
    assert_eq!(
        u().context(&mem, 0x10),
        Err((reason::CONTEXT_RESERVED, false))
    );
    // A context entry naming domain 256 (ND offers 256).
    b.ram
        .borrow_mut()
        .put(0x11000 + 0x10 * 16, &[0x20001, (256 << 8) | 2]);
    assert_eq!(
        u().context(&mem, 0x10),
        Err((reason::CONTEXT_RESERVED, false))
    );
    // The root table in memory that is not the OS's.
    b.w(reg::RTADDR, 8, DENIED.start);
    b.w(reg::GCMD, 4, u64::from(gsts::TES | gsts::RTPS));
    assert_eq!(u().context(&mem, 0x10), Err((reason::ROOT_ACCESS, false)));
    // A context table there.
    b.ram.borrow_mut().put(0x10000, &[DENIED.start | 1, 0]);
    b.w(reg::RTADDR, 8, 0x10000);
    b.w(reg::GCMD, 4, u64::from(gsts::TES | gsts::RTPS));
    assert_eq!(
        u().context(&mem, 0x10),
        Err((reason::CONTEXT_ACCESS, false))
    );
}

/// Queue of 256 descriptors at 0x40000, on.
fn queue_on(b: &Bench) {
    b.w(reg::IQT, 8, 0);
    b.w(reg::IQA, 8, 0x40000);
    b.w(reg::GCMD, 4, u64::from(gsts::QIES));
    assert_eq!(b.r(reg::GSTS, 4) as u32 & gsts::QIES, gsts::QIES);
}

fn put_desc(b: &Bench, i: u64, d: [u64; 2]) {
    b.ram.borrow_mut().put(0x40000 + (i % 256) * 16, &d);
}

#[test]
fn the_queue_wraps_and_stops_on_the_descriptor_it_refuses() {
    let b = Bench::new(OFFER);
    queue_on(&b);
    // Move head and tail to 250, then submit 10 across the wrap: domain
    // flushes 1..=9 (coalesced into "all" past 8) and a wait.
    for i in 0..250 {
        put_desc(&b, i, vtd::desc::IEC_GLOBAL);
    }
    b.w(reg::IQT, 8, 250 << 4);
    assert_eq!(b.r(reg::IQH, 8), 250 << 4);
    for d in 0..9u64 {
        put_desc(&b, 250 + d, [0x2 | (2 << 4) | (d << 16), 0]);
    }
    put_desc(&b, 259, vtd::desc::wait(0x2000, 0xabcd));
    let fx = b.w(reg::IQT, 8, 4 << 4);
    assert_eq!(b.r(reg::IQH, 8), 4 << 4, "wrapped to the tail");
    assert!(fx.iotlb.all, "nine domains coalesce into everything");
    assert_eq!(b.ram.borrow().dword(0x2000), 0xabcd);
    assert_eq!(fx.queue_error, None);

    // Refused: a device-TLB invalidation (not offered). The head stays on
    // it, IQE is set, and the fault event (unmasked) fires.
    b.w(reg::FEDATA, 4, 0x41);
    b.w(reg::FEADDR, 4, 0xfee0_0000);
    b.w(reg::FECTL, 4, 0);
    put_desc(&b, 4, [0x2 | (2 << 4) | (1 << 16), 0]);
    put_desc(&b, 5, [0x3, 0]);
    put_desc(&b, 6, [0x2 | (2 << 4) | (2 << 16), 0]);
    let fx = b.w(reg::IQT, 8, 7 << 4);
    assert_eq!(fx.queue_error, Some(QueueError::Type(3)));
    assert_eq!(fx.iotlb.scopes(), &[Scope::Domain(1)]);
    assert_eq!(b.r(reg::IQH, 8), 5 << 4);
    assert_eq!(b.r(reg::FSTS, 4) as u32 & fsts::IQE, fsts::IQE);
    let ev = fx.fault_event.expect("fault event");
    assert_eq!((ev.addr, ev.data), (0xfee0_0000, 0x41));
    // Nothing runs while IQE is set.
    let fx = b.w(reg::IQT, 8, 7 << 4);
    assert_eq!(fx, Effects::default());
    // The OS fixes the descriptor and clears IQE: the queue resumes from
    // the head at once, as Linux expects after replacing the descriptor.
    put_desc(&b, 5, [0x2 | (2 << 4) | (3 << 16), 0]);
    let fx = b.w(reg::FSTS, 4, u64::from(fsts::IQE));
    assert_eq!(b.r(reg::FECTL, 4) & (1 << 30), 0);
    assert_eq!(fx.iotlb.scopes(), &[Scope::Domain(3), Scope::Domain(2)]);
    assert_eq!(b.r(reg::IQH, 8), 7 << 4);
    assert_eq!(b.w(reg::IQT, 8, 7 << 4), Effects::default());

    // Each kind of refusal, each from a fresh queue.
    let cases: [([u64; 2], QueueError); 7] = [
        // Reserved bits of a context-cache descriptor.
        ([0x1 | (1 << 4) | (1 << 8), 0], QueueError::Reserved),
        // Page-selective beyond MAMV.
        ([0x2 | (3 << 4), 10], QueueError::Reserved),
        // Page-selective address not aligned to its size.
        ([0x2 | (3 << 4), 0x1000 | 1], QueueError::Reserved),
        // A wait storing status into memory that is not the OS's.
        (vtd::desc::wait(DENIED.start, 1), QueueError::Status),
        // Page-request drain (not offered).
        ([0x5 | (1 << 7), 0], QueueError::Reserved),
        // PASID-based IOTLB (type 6) and a type with upper bits.
        ([0x6, 0], QueueError::Type(6)),
        ([0x1 | (1 << 9), 0], QueueError::Type(0x11)),
    ];
    for (d, e) in cases {
        let b = Bench::new(OFFER);
        queue_on(&b);
        put_desc(&b, 0, d);
        assert_eq!(b.w(reg::IQT, 8, 1 << 4).queue_error, Some(e), "{d:x?}");
        assert_eq!(b.r(reg::IQH, 8), 0);
    }
    // The tail beyond the queue's size; the queue in memory that is not
    // the OS's (the head stays on the descriptor it could not fetch).
    let b = Bench::new(OFFER);
    queue_on(&b);
    assert_eq!(
        b.w(reg::IQT, 8, 256 << 4).queue_error,
        Some(QueueError::Tail)
    );
    let b = Bench::new(OFFER);
    b.w(reg::IQA, 8, DENIED.start - 0x1000 + 1); // two pages: 512 entries
    b.w(reg::GCMD, 4, u64::from(gsts::QIES));
    for i in 0..256 {
        b.ram
            .borrow_mut()
            .put(DENIED.start - 0x1000 + i * 16, &vtd::desc::IEC_GLOBAL);
    }
    let fx = b.w(reg::IQT, 8, 300 << 4);
    assert_eq!(fx.queue_error, Some(QueueError::Fetch));
    assert_eq!(b.r(reg::IQH, 8), 256 << 4);
    // Interrupt entry cache descriptors where remapping is not offered.
    let b = Bench::new(Offer {
        remapping: false,
        ..OFFER
    });
    queue_on(&b);
    put_desc(&b, 0, vtd::desc::IEC_GLOBAL);
    assert_eq!(
        b.w(reg::IQT, 8, 1 << 4).queue_error,
        Some(QueueError::Type(4))
    );
}

#[test]
fn a_wait_raises_the_completion_event_once_unmasked() {
    let b = Bench::new(OFFER);
    queue_on(&b);
    b.w(reg::IEDATA, 4, 0x51);
    b.w(reg::IEADDR, 4, 0xfee0_1000);
    b.w(reg::IEUADDR, 4, 0x100);
    // Masked (as out of reset): pending, no event.
    put_desc(&b, 0, [0x5 | (1 << 4), 0]);
    let fx = b.w(reg::IQT, 8, 1 << 4);
    assert_eq!(fx.completion_event, None);
    assert_eq!(b.r(reg::ICS, 4), 1);
    assert_eq!(b.r(reg::IECTL, 4), (1 << 31) | (1 << 30));
    // Unmasking delivers it.
    let fx = b.w(reg::IECTL, 4, 0);
    assert_eq!(
        fx.completion_event,
        Some(Event {
            addr: 0xfee0_1000,
            upper: 0x100,
            data: 0x51
        })
    );
    assert_eq!(b.r(reg::IECTL, 4), 0);
    // Unmasked: at once. Clearing IWC clears ICS.
    put_desc(&b, 1, [0x5 | (1 << 4), 0]);
    assert!(b.w(reg::IQT, 8, 2 << 4).completion_event.is_some());
    b.w(reg::ICS, 4, 1);
    assert_eq!(b.r(reg::ICS, 4), 0);
}

#[test]
fn register_based_invalidation_completes_at_once_with_what_was_done() {
    let b = Bench::new(OFFER);
    let c = vtd::caps(&&b);
    vtd::invalidate_all(&mut &b, &c).expect("completes");
    assert!(b.any(|f| f.context.all) && b.any(|f| f.iotlb.all));
    // thinhv's domain-selective IOTLB invalidation, as a unit reads it.
    b.fx.borrow_mut().clear();
    vtd::invalidate_domains(&mut &b, &c, &[0x105, 0x107]).expect("completes");
    let domains: Vec<Scope> =
        b.fx.borrow()
            .iter()
            .flat_map(|f| f.iotlb.scopes().to_vec())
            .collect();
    assert_eq!(domains, [Scope::Domain(0x105), Scope::Domain(0x107)]);
    assert!(!b.any(|f| f.iotlb.all || !f.context.is_empty()));
    // Domain-selective context, device-selective context.
    let fx = b.w(reg::CCMD, 8, (1 << 63) | (2 << 61) | 5);
    assert_eq!(fx.context.scopes(), &[Scope::Domain(5)]);
    // CIRG (62:61) and CAIG (60:59) both domain-selective.
    assert_eq!(b.r(reg::CCMD, 8) >> 59, 0b1010);
    let fx = b.w(
        reg::CCMD,
        8,
        (1 << 63) | (3 << 61) | (1 << 32) | (0x0110 << 16),
    );
    assert_eq!(
        fx.context.scopes(),
        &[Scope::Device {
            sid: 0x110,
            mask: 1
        }]
    );
    // Page-selective: 2^2 pages at 0x4000_0000 of domain 3; beyond MAMV
    // done as the domain, and IAIG says so.
    b.w(reg::IVA, 8, 0x4000_0000 | 2);
    let fx = b.w(reg::IOTLB, 8, (1 << 63) | (3 << 60) | (3 << 32));
    assert_eq!(
        fx.iotlb.scopes(),
        &[Scope::Pages {
            domain: 3,
            addr: 0x4000_0000,
            order: 2
        }]
    );
    assert_eq!((b.r(reg::IOTLB, 8) >> 57) & 3, 3);
    b.w(reg::IVA, 8, 0x4000_0000 | 0x14);
    let fx = b.w(reg::IOTLB, 8, (1 << 63) | (3 << 60) | (3 << 32));
    assert_eq!(fx.iotlb.scopes(), &[Scope::Domain(3)]);
    assert_eq!((b.r(reg::IOTLB, 8) >> 57) & 3, 2);
    assert_eq!(b.r(reg::IOTLB, 8) >> 63, 0);
}

/// What Linux's fault handler does (`dmar_fault`): from FSTS.FRI, each
/// record whose F is set, cleared as it goes; then PPF's causes cleared.
fn linux_reads_faults(b: &Bench) -> Vec<u64> {
    let fsts = b.r(reg::FSTS, 4);
    let mut pages = Vec::new();
    if fsts & u64::from(fsts::PPF) == 0 {
        return pages;
    }
    let mut i = (fsts >> 8) & 0xff;
    for _ in 0..FAULT_RECORDS {
        let at = reg::FRCD + 16 * i;
        if b.r(at + 12, 4) & (1 << 31) == 0 {
            break;
        }
        pages.push(b.r(at, 8));
        b.w(at + 12, 4, 1 << 31);
        i = (i + 1) % FAULT_RECORDS as u64;
    }
    b.w(reg::FSTS, 4, u64::from(fsts::PFO));
    pages
}

#[test]
fn linuxs_fault_handler_finds_each_fault_from_where_fri_points() {
    let b = Bench::new(OFFER);
    b.w(reg::FECTL, 4, 0);
    let f = |i: u64| OsFault {
        sid: 0x10,
        reason: reason::WRITE,
        info: 0x4000_0000 + (i << 12),
        write: true,
    };
    // Three rounds of faults, the handler running after each: the records
    // are used in turn, and FRI follows where the first pending one is.
    let mut n = 0;
    for round in [3u64, 1, 6] {
        let mut events = 0;
        for _ in 0..round {
            let mut fx = Effects::default();
            b.unit.borrow_mut().record(f(n), &mut fx);
            events += usize::from(fx.fault_event.is_some());
            n += 1;
        }
        assert_eq!(events, 1);
        let want: Vec<u64> = (n - round..n).map(|i| 0x4000_0000 + (i << 12)).collect();
        assert_eq!(linux_reads_faults(&b), want, "round of {round}");
    }
}

#[test]
fn faults_fill_the_records_in_turn_then_overflow_and_the_driver_reads_them() {
    let b = Bench::new(OFFER);
    b.w(reg::FECTL, 4, 0);
    let f = |i: u64| OsFault {
        sid: 0x10,
        reason: reason::WRITE,
        info: 0x4000_0000 + (i << 12) + 0x123,
        write: true,
    };
    let mut events = 0;
    for i in 0..FAULT_RECORDS as u64 {
        let mut fx = Effects::default();
        b.unit.borrow_mut().record(f(i), &mut fx);
        events += usize::from(fx.fault_event.is_some());
    }
    assert_eq!(events, 1, "one event until the OS clears the records");
    assert_eq!((b.r(reg::FSTS, 4) >> 8) & 0xff, 0, "FRI wrapped");
    let mut fx = Effects::default();
    b.unit.borrow_mut().record(f(99), &mut fx);
    assert_eq!(
        b.r(reg::FSTS, 4) as u32 & (fsts::PFO | fsts::PPF),
        fsts::PFO | fsts::PPF
    );
    assert_eq!(b.unit.borrow().faults_lost, 1);
    // thinhv's own fault reader takes them all, in order, and clears them.
    let c = vtd::caps(&&b);
    let (faults, overflow) = vtd::take_faults(&mut &b, &c);
    assert!(overflow);
    assert_eq!(faults.len(), FAULT_RECORDS);
    for (i, got) in faults.iter().enumerate() {
        assert_eq!(got.source, 0x10);
        assert_eq!(got.reason, reason::WRITE);
        assert_eq!(got.address, 0x4000_0000 + ((i as u64) << 12));
        assert!(got.write);
    }
    assert_eq!(b.r(reg::FSTS, 4) as u32 & (fsts::PFO | fsts::PPF), 0);
    // A new fault after the OS cleared everything fires again; an
    // interrupt fault's record carries its index in bits 63:48.
    let mut fx = Effects::default();
    b.unit.borrow_mut().record(
        OsFault {
            sid: 0xf0f8,
            reason: reason::IRTE_NOT_PRESENT,
            info: 0x2a << 48,
            write: true,
        },
        &mut fx,
    );
    assert!(fx.fault_event.is_some());
    let (faults, _) = vtd::take_faults(&mut &b, &c);
    assert_eq!(faults[0].interrupt_index, Some(0x2a));
    assert_eq!(faults[0].source, 0xf0f8);
    // Masked: pending; unmasking delivers.
    b.w(reg::FECTL, 4, 1 << 31);
    let mut fx = Effects::default();
    b.unit.borrow_mut().record(f(1), &mut fx);
    assert_eq!(fx.fault_event, None);
    assert_eq!(b.r(reg::FECTL, 4) >> 30, 3);
    assert!(b.w(reg::FECTL, 4, 0).fault_event.is_some());
}

/// The OS's processors are APIC IDs 0 to 3; 4 and up are an appliance's.
struct OsCores;

impl Cores for OsCores {
    fn has(&self, id: u32) -> bool {
        id < 4
    }
    fn logical(&self, dest: u8, out: &mut Vec<u32>) -> bool {
        // Flat mode, one bit per processor.
        out.extend((0..8).filter(|b| dest & (1 << b) != 0));
        dest & 0xf0 != 0
    }
}

/// The OS's requesters: bus 0 devices 0 to 7, bus 2; the appliance has
/// 00:08.0 and bus 3.
struct OsSources;

impl Sources for OsSources {
    fn is_os(&self, sid: u16) -> bool {
        (sid >> 8 == 0 && (sid & 0xff) >> 3 < 8) || sid >> 8 == 2
    }
    fn buses_are_os(&self, first: u8, last: u8) -> bool {
        (first..=last).all(|b| b == 2)
    }
}

fn os_entry(dest: u32, sid: u16, sq: u8, svt: u8) -> OsIrte {
    OsIrte {
        logical: false,
        level: false,
        delivery: Delivery::Fixed,
        vector: 0x31,
        dest,
        sid,
        sq,
        svt,
        x2apic: true,
    }
}

#[test]
fn an_os_entry_is_composed_only_for_the_oss_sources_and_processors() {
    let p = Policy::default();
    let ok = compose(&os_entry(3, 0x0010, 0, 1), &OsSources, &OsCores, p, true).unwrap();
    let t = irvtd::target_of(ok, true).unwrap();
    assert_eq!((t.apic_id, t.vector), (3, 0x31));
    assert_eq!(ok[1], 0x0010 | (1 << 18), "the OS's source validation kept");
    // The same into an xAPIC-mode real table.
    let ok = compose(&os_entry(3, 0x0010, 0, 1), &OsSources, &OsCores, p, false).unwrap();
    assert_eq!(irvtd::target_of(ok, false).unwrap().apic_id, 3);
    // The controls' refusals.
    let refused = |e: OsIrte| compose(&e, &OsSources, &OsCores, p, true).unwrap_err();
    assert_eq!(refused(os_entry(3, 0x10, 0, 0)), IrteRefusal::Unvalidated);
    assert_eq!(refused(os_entry(3, 0x10, 0, 3)), IrteRefusal::Unvalidated);
    assert_eq!(refused(os_entry(3, 0x40, 0, 1)), IrteRefusal::ForeignSource);
    // 00:07.x with SQ 11b admits 00:07.0-7 only (the OS's); from 00:08.0
    // it would admit the appliance's.
    assert!(compose(&os_entry(3, 0x3f, 3, 1), &OsSources, &OsCores, p, true).is_ok());
    assert_eq!(refused(os_entry(3, 0x44, 3, 1)), IrteRefusal::ForeignSource);
    // Bus ranges.
    assert!(compose(&os_entry(3, 0x0202, 0, 2), &OsSources, &OsCores, p, true).is_ok());
    assert_eq!(
        refused(os_entry(3, 0x0203, 0, 2)),
        IrteRefusal::ForeignSource
    );
    assert_eq!(
        refused(os_entry(3, 0x0302, 0, 2)),
        IrteRefusal::ForeignSource
    );
    // Processors: an appliance's, the x2APIC broadcast, a logical cluster
    // naming one of the appliance's.
    assert_eq!(
        refused(os_entry(4, 0x10, 0, 1)),
        IrteRefusal::Target(Refusal::Foreign)
    );
    assert_eq!(
        refused(os_entry(u32::MAX, 0x10, 0, 1)),
        IrteRefusal::Target(Refusal::Foreign)
    );
    let logical = |dest| OsIrte {
        logical: true,
        ..os_entry(dest, 0x10, 0, 1)
    };
    let t = compose(&logical(0b0100), &OsSources, &OsCores, p, true).unwrap();
    assert_eq!(irvtd::target_of(t, true).unwrap().apic_id, 2);
    assert_eq!(
        refused(logical(0b1_0100)),
        IrteRefusal::Target(Refusal::Foreign)
    );
    assert_eq!(
        refused(logical((1 << 16) | 1)),
        IrteRefusal::Target(Refusal::Foreign)
    );
    assert_eq!(refused(logical(0)), IrteRefusal::Target(Refusal::Foreign));
    // Delivery modes: NMI only where the policy allows, never INIT or SMI;
    // a reserved vector.
    for (d, allowed) in [
        (Delivery::Nmi, false),
        (Delivery::Init, false),
        (Delivery::Smi, false),
        (Delivery::ExtInt, false),
    ] {
        let e = OsIrte {
            delivery: d,
            ..os_entry(1, 0x10, 0, 1)
        };
        assert_eq!(compose(&e, &OsSources, &OsCores, p, true).is_ok(), allowed);
    }
    let nmi = OsIrte {
        delivery: Delivery::Nmi,
        ..os_entry(1, 0x10, 0, 1)
    };
    let pol = Policy {
        nmi: true,
        extint: false,
    };
    assert!(compose(&nmi, &OsSources, &OsCores, pol, true).is_ok());
    assert_eq!(
        refused(OsIrte {
            vector: 3,
            ..os_entry(1, 0x10, 0, 1)
        }),
        IrteRefusal::Target(Refusal::Vector(3))
    );
    // An xAPIC-mode OS table: 8-bit destinations; 0xFF is the broadcast.
    let x = |dest| OsIrte {
        x2apic: false,
        ..os_entry(dest, 0x10, 0, 1)
    };
    assert!(compose(&x(2), &OsSources, &OsCores, p, true).is_ok());
    assert_eq!(refused(x(0xff)), IrteRefusal::Target(Refusal::Foreign));
    // An APIC ID that does not fit an xAPIC-mode real table.
    struct Wide;
    impl Cores for Wide {
        fn has(&self, _: u32) -> bool {
            true
        }
        fn logical(&self, _: u8, _: &mut Vec<u32>) -> bool {
            true
        }
    }
    assert_eq!(
        compose(&os_entry(300, 0x10, 0, 1), &OsSources, &Wide, p, false).unwrap_err(),
        IrteRefusal::Target(Refusal::Wide(300))
    );
}

#[test]
fn the_oss_remapping_entries_are_read_and_fault_as_hardware_does() {
    let b = Bench::new(OFFER);
    let mem = b.ram.clone();
    assert_eq!(
        b.unit.borrow().os_irte(&mem, 0),
        Err((reason::IRT_INDEX, false)),
        "remapping off"
    );
    // 65536 entries at 0x50000 (as Linux programs), x2APIC mode.
    b.w(reg::IRTA, 8, 0x50000 | (1 << 11) | 0xf);
    b.w(reg::GCMD, 4, u64::from(gsts::IRTPS));
    b.w(reg::GCMD, 4, u64::from(gsts::IRES));
    let entry = [1 | (0x31 << 16) | (2 << 32), 0x10 | (1 << 18)];
    b.ram.borrow_mut().put(0x50000 + 5 * 16, &entry);
    let e = b.unit.borrow().os_irte(&mem, 5).unwrap();
    assert_eq!(e, os_entry(2, 0x10, 0, 1));
    let read = |i| b.unit.borrow().os_irte(&mem, i);
    assert_eq!(read(6), Err((reason::IRTE_NOT_PRESENT, false)));
    // Index 2^15 and up: beyond what thinhv composes.
    assert_eq!(read(1 << 15), Err((reason::IRT_INDEX, false)));
    // Posted (IM, bit 15) is not offered: reserved.
    b.ram
        .borrow_mut()
        .put(0x50000 + 7 * 16, &[entry[0] | (1 << 15), entry[1]]);
    assert_eq!(read(7), Err((reason::IRTE_RESERVED, false)));
    b.ram
        .borrow_mut()
        .put(0x50000 + 7 * 16, &[entry[0] | 2, entry[1] | (1 << 20)]);
    assert_eq!(read(7), Err((reason::IRTE_RESERVED, true)));
    // The table in memory that is not the OS's: the entries within it
    // cannot be read.
    b.w(reg::IRTA, 8, (DENIED.start - 0x1000) | (1 << 11) | 0xf);
    b.w(reg::GCMD, 4, u64::from(gsts::IRES | gsts::IRTPS));
    assert!(read(0).is_err_and(|e| e.0 != reason::IRT_ACCESS));
    assert_eq!(read(256), Err((reason::IRT_ACCESS, false)));
    // xAPIC mode: destination bits outside 47:40 are reserved.
    b.w(reg::IRTA, 8, 0x50000 | 0xf);
    b.w(reg::GCMD, 4, u64::from(gsts::IRES | gsts::IRTPS));
    b.ram.borrow_mut().put(
        0x50000 + 5 * 16,
        &[1 | (0x31 << 16) | (2 << 40), 0x10 | (1 << 18)],
    );
    assert_eq!(read(5).unwrap().dest, 2);
    b.ram.borrow_mut().put(0x50000 + 5 * 16, &entry);
    assert_eq!(read(5), Err((reason::IRTE_RESERVED, false)));
    // Remapping off again: nothing is read.
    b.w(reg::GCMD, 4, 0);
    assert_eq!(read(5), Err((reason::IRT_INDEX, false)));
}

/// A small xorshift, so that every run checks the same programs (the
/// AMD-Vi model's test uses it too).
pub(crate) fn programs(seed: u64, n: usize, len: usize) -> impl Iterator<Item = Vec<u8>> {
    let mut s = seed;
    (0..n).map(move |_| {
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 24) as u8
            })
            .collect()
    })
}

#[test]
fn random_programming_never_breaks_the_units_invariants() {
    let mut total = fuzz::Reach::default();
    for p in programs(0x7468_696e_6876, 400, 1 + 10 * 300) {
        let r = fuzz::run(&p);
        total.runs += r.runs;
        total.wraps += r.wraps;
        total.errors += r.errors;
        total.fault_events += r.fault_events;
        total.completion_events += r.completion_events;
        total.translating += r.translating;
    }
    // The programs reach what they are meant to check.
    println!("{total:?}");
    assert!(total.runs > 1000 && total.wraps > 20 && total.errors > 100);
    assert!(total.fault_events > 10 && total.completion_events > 10);
    assert!(total.translating > 1000);
}

#[test]
fn the_fuzz_driver_reaches_the_queue_the_tables_and_the_faults() {
    // A program in the driver's own encoding (`fuzz::run`): what it
    // reached is what the program asked for.
    let step = |what: u8, reg_index: u8, value: u64| {
        let mut s = vec![what, reg_index];
        s.extend_from_slice(&value.to_le_bytes());
        s
    };
    let mut p = vec![0x60];
    // 4: the queue at 0x3000 (256 descriptors), turned on.
    p.extend(step(0x04, 0, 0x3000));
    // 0 with 0x80: one descriptor written at the tail (value 0: a global
    // context-cache invalidation), the tail moved past it.
    p.extend(step(0x80, 0, 0));
    // The same with a wait storing its status (value 63).
    p.extend(step(0x80, 0, 63));
    let r = fuzz::run(&p);
    assert_eq!((r.runs, r.errors, r.wraps), (2, 0, 0), "{r:?}");
    // 5 with 0x20: an 8-byte register write, OFFSETS[10] = IQT, a tail
    // beyond the queue: refused.
    p.extend(step(0x25, 10, 256 << 4));
    let r = fuzz::run(&p);
    assert_eq!((r.runs, r.errors), (2, 1), "{r:?}");
    // The OS puts the tail back on the head (an IQT write while IQE is set
    // runs nothing), clears the error (3; fetching resumes and finds
    // nothing to do), and the queue is usable again. Clearing IQE with the
    // tail still beyond the queue would be refused again at once.
    p.extend(step(0x25, 10, 2 << 4));
    p.extend(step(0x03, 0, 0));
    p.extend(step(0x80, 0, 0));
    let r = fuzz::run(&p);
    assert_eq!((r.runs, r.errors), (3, 1), "{r:?}");
}

#[test]
fn the_oss_leaves_are_walked_in_order_within_range_and_budget() {
    let b = Bench::new(OFFER);
    tables(&mut b.ram.borrow_mut());
    // A third page far away (index 1 at the top level), and a branch in
    // memory that is not the OS's (skipped: nothing below it).
    b.ram.borrow_mut().put(0x20000 + 8, &[0x24003]);
    b.ram.borrow_mut().put(0x24000, &[0x25003]);
    b.ram.borrow_mut().put(0x25000, &[0x26003]);
    b.ram.borrow_mut().put(0x26000 + 5 * 8, &[0x32002]);
    b.ram.borrow_mut().put(0x21000 + 16, &[DENIED.start | 3]);
    let mem = b.ram.clone();
    let u = b.unit.borrow();
    let mut got = Vec::new();
    let resume = u.leaves(&mem, 0x20000, 4, 0..u64::MAX, 100_000, &mut |iova, p| {
        got.push((iova, p.gpa, p.read, p.write));
    });
    assert_eq!(resume, None);
    assert_eq!(
        got,
        [
            (0x4000_0000, 0x30000, true, true),
            (0x4000_1000, 0x31000, true, false),
            ((1 << 39) + 0x5000, 0x32000, false, true),
        ]
    );
    let full = got.clone();
    // A range that starts inside: only what is in it.
    got.clear();
    u.leaves(
        &mem,
        0x20000,
        4,
        0x4000_1000..1 << 39,
        100_000,
        &mut |iova, _| {
            got.push((iova, 0, false, false));
        },
    );
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, 0x4000_1000);
    // Budgets count entries read: with 8 per call (at least twice the
    // levels), each call moves on, and resuming finds the same pages.
    let mut again = Vec::new();
    let (mut from, mut calls) = (Some(0), 0);
    while let Some(f) = from {
        from = u.leaves(&mem, 0x20000, 4, f..u64::MAX, 1, &mut |iova, p| {
            again.push((iova, p.gpa, p.read, p.write));
        });
        assert!(from.is_none_or(|r| r > f), "no progress from {f:#x}");
        calls += 1;
    }
    assert_eq!(again, full);
    assert!(calls > 100, "{calls} calls");
    // Tables pointed at many times over cost their reads: a top table
    // whose 512 entries all point at one table whose 512 entries all
    // point at the same empty table reads 512 * 512 * 512 entries in all,
    // never more than the budget in one call.
    {
        let mut r = b.ram.borrow_mut();
        for i in 0..512 {
            r.put(0x60000 + i * 8, &[0x61003]);
            r.put(0x61000 + i * 8, &[0x62003]);
        }
    }
    let mut reads_bounded = 0;
    let r = u.leaves(&mem, 0x60000, 3, 0..u64::MAX, 10_000, &mut |_, _| {
        reads_bounded += 1;
    });
    assert_eq!(reads_bounded, 0);
    let r = r.expect("the budget ran out");
    assert!(r > 0 && r < 1 << 39);
    // The same tables entered one level down, as 3-level tables: index 1
    // maps the two pages at 1 GiB; index 2's table is not the OS's memory.
    got.clear();
    u.leaves(&mem, 0x21000, 3, 0..u64::MAX, 100, &mut |iova, _| {
        got.push((iova, 0, false, false));
    });
    let at: Vec<u64> = got.iter().map(|g| g.0).collect();
    assert_eq!(at, [1 << 30, (1 << 30) + 0x1000]);
}

#[test]
fn a_real_fault_is_the_oss_where_its_tables_refuse_and_thinhvs_where_they_allow() {
    let b = Bench::new(OFFER);
    tables(&mut b.ram.borrow_mut());
    let mem = b.ram.clone();
    let classify = |sid, addr, write| b.unit.borrow().classify(&mem, sid, addr, write);
    // Translation off: everything the OS allows; any fault is thinhv's.
    assert_eq!(classify(0x10, 0x4000_2000, true), Err(ThinhvFault));
    b.w(reg::RTADDR, 8, 0x10000);
    b.w(reg::GCMD, 4, u64::from(gsts::RTPS));
    b.w(reg::GCMD, 4, u64::from(gsts::TES));
    // Mapped read-write: thinhv's (its protection refused the page).
    assert_eq!(classify(0x10, 0x4000_0000, true), Err(ThinhvFault));
    // A write to the read-only page, a read of an unmapped one.
    let os = |reason, addr, write| {
        Ok(Some(OsFault {
            sid: 0x10,
            reason,
            info: addr,
            write,
        }))
    };
    assert_eq!(
        classify(0x10, 0x4000_1234, true),
        os(reason::WRITE, 0x4000_1000, true)
    );
    assert_eq!(classify(0x10, 0x4000_1234, false), Err(ThinhvFault));
    assert_eq!(
        classify(0x10, 0x4000_2000, false),
        os(reason::READ, 0x4000_2000, false)
    );
    // Pass-through: thinhv's. Not present with FPD: nobody records it.
    assert_eq!(classify(0x18, 0x1000, true), Err(ThinhvFault));
    assert_eq!(classify(0x30, 0x1000, true), Ok(None));
    assert_eq!(
        classify(0x100, 0, false),
        Ok(Some(OsFault {
            sid: 0x100,
            reason: reason::ROOT_NOT_PRESENT,
            info: 0,
            write: false
        }))
    );
}

#[test]
fn the_real_tables_os_half_follows_the_oss_entries_at_each_invalidation() {
    let b = Bench::new(OFFER);
    let mem = b.ram.clone();
    // 256 entries at 0x50000, x2APIC mode, remapping on.
    b.w(reg::IRTA, 8, 0x50000 | (1 << 11) | 7);
    b.w(reg::GCMD, 4, u64::from(gsts::IRTPS));
    b.w(reg::GCMD, 4, u64::from(gsts::IRES));
    let put = |i: u64, e: OsIrte| {
        let lo = 1
            | (u64::from(e.logical) << 2)
            | (u64::from(e.delivery.bits()) << 5)
            | (u64::from(e.vector) << 16)
            | (u64::from(e.dest) << 32);
        let hi = u64::from(e.sid) | (u64::from(e.sq) << 16) | (u64::from(e.svt) << 18);
        b.ram.borrow_mut().put(0x50000 + i * 16, &[lo, hi]);
    };
    put(0, os_entry(1, 0x10, 0, 1));
    put(1, os_entry(4, 0x10, 0, 1)); // the appliance's processor
    put(2, os_entry(2, 0x40, 0, 1)); // the appliance's function
    put(3, os_entry(2, 0x10, 0, 0)); // no source validation
    put(5, os_entry(3, 0x18, 0, 1));
    let mut real = std::collections::BTreeMap::new();
    let s = sync_entries(
        &b.unit.borrow(),
        &mem,
        None,
        &OsSources,
        &OsCores,
        Policy::default(),
        true,
        &mut |i, e| {
            real.insert(i, e);
        },
    );
    assert_eq!((s.composed, s.refused), (2, 3));
    assert_eq!(s.absent, (1 << IRT_MAX_LOG2) - 5);
    assert_eq!(
        s.first_refusal,
        Some((1, IrteRefusal::Target(Refusal::Foreign)))
    );
    assert_eq!(irvtd::target_of(real[&0], true).unwrap().apic_id, 1);
    assert_eq!(irvtd::target_of(real[&5], true).unwrap().apic_id, 3);
    for i in [1, 2, 3, 4, 6, 255, 256, (1 << 15) - 1] {
        assert_eq!(real[&i], [0, 0], "{i}");
    }
    assert!(
        !real.contains_key(&(1 << 15)),
        "the real table's upper half is thinhv's"
    );
    // An index-selective invalidation touches its entries only.
    put(1, os_entry(2, 0x10, 0, 1));
    let mut touched = Vec::new();
    let s = sync_entries(
        &b.unit.borrow(),
        &mem,
        Some(Scope::Entries { index: 0, order: 1 }),
        &OsSources,
        &OsCores,
        Policy::default(),
        true,
        &mut |i, e| touched.push((i, irvtd::target_of(e, true).map(|t| t.apic_id))),
    );
    assert_eq!(s.composed, 2);
    assert_eq!(touched, [(0, Some(1)), (1, Some(2))]);
    // Remapping off: every entry in scope goes not present.
    b.w(reg::GCMD, 4, 0);
    let mut n = 0;
    sync_entries(
        &b.unit.borrow(),
        &mem,
        Some(Scope::Entries { index: 0, order: 3 }),
        &OsSources,
        &OsCores,
        Policy::default(),
        true,
        &mut |_, e| {
            assert_eq!(e, [0, 0]);
            n += 1;
        },
    );
    assert_eq!(n, 8);
}

#[test]
fn the_oss_event_interrupts_reach_only_its_own_processors() {
    let p = Policy::default();
    let ev = |addr, upper, data| Event { addr, upper, data };
    // Fixed, vector 0x41, to APIC 2 (xAPIC), then to the appliance's 4.
    let t = event_target(ev(0xfee0_2000, 0, 0x41), false, &OsCores, p).unwrap();
    assert_eq!((t.apic_id, t.vector), (2, 0x41));
    assert_eq!(
        event_target(ev(0xfee0_4000, 0, 0x41), false, &OsCores, p),
        Err(Refusal::Foreign)
    );
    // NMI and INIT are refused, as the broadcast is.
    assert!(event_target(ev(0xfee0_2000, 0, 0x400), false, &OsCores, p).is_err());
    assert!(event_target(ev(0xfee0_2000, 0, 0x500), false, &OsCores, p).is_err());
    assert!(event_target(ev(0xfeef_f000, 0, 0x41), false, &OsCores, p).is_err());
    // x2APIC: the upper address widens the destination: 0x100 | 2 is not
    // the OS's, 2 is.
    assert_eq!(
        event_target(ev(0xfee0_2000, 0x100, 0x41), true, &OsCores, p),
        Err(Refusal::Foreign)
    );
    assert_eq!(
        event_target(ev(0xfee0_2000, 0, 0x41), true, &OsCores, p)
            .unwrap()
            .apic_id,
        2
    );
    // Not an interrupt address.
    assert_eq!(
        event_target(ev(0x1000, 0, 0x41), false, &OsCores, p),
        Err(Refusal::Malformed)
    );
}
