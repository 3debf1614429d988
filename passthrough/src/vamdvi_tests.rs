//! The emulated AMD-Vi unit against thinhv's own AMD-Vi driver
//! (`crate::amdvi`), and against what a hostile OS programs.
use super::*;
use crate::amdvi::{self, Ring};
use crate::irq_remap::Cores;
use crate::vtd::Mmio;
use crate::vvtd::tests::programs;
use std::cell::RefCell;
use std::rc::Rc;

/// 1 MiB of OS RAM at 0; 0x80000..0x90000 is not the OS's.
struct Ram(Vec<u8>);

const DENIED: core::ops::Range<u64> = 0x8_0000..0x9_0000;

impl OsMemory for Ram {
    fn read(&self, gpa: u64, out: &mut [u8]) -> Result<(), Denied> {
        let end = gpa.checked_add(out.len() as u64).ok_or(Denied)?;
        if end > self.0.len() as u64 || (gpa < DENIED.end && end > DENIED.start) {
            return Err(Denied);
        }
        out.copy_from_slice(&self.0[gpa as usize..end as usize]);
        Ok(())
    }
    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), Denied> {
        let end = gpa.checked_add(data.len() as u64).ok_or(Denied)?;
        if end > self.0.len() as u64 || (gpa < DENIED.end && end > DENIED.start) {
            return Err(Denied);
        }
        self.0[gpa as usize..end as usize].copy_from_slice(data);
        Ok(())
    }
}

impl Ram {
    fn put(&mut self, gpa: u64, v: &[u64]) {
        for (i, w) in v.iter().enumerate() {
            let at = gpa as usize + i * 8;
            self.0[at..at + 8].copy_from_slice(&w.to_le_bytes());
        }
    }
    fn q(&self, gpa: u64) -> u64 {
        u64::from_le_bytes(self.0[gpa as usize..gpa as usize + 8].try_into().unwrap())
    }
}

struct Shared(Rc<RefCell<Ram>>);

impl OsMemory for Shared {
    fn read(&self, gpa: u64, out: &mut [u8]) -> Result<(), Denied> {
        self.0.borrow().read(gpa, out)
    }
    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), Denied> {
        self.0.borrow_mut().write(gpa, data)
    }
}

struct Bench {
    unit: RefCell<Unit>,
    ram: Rc<RefCell<Ram>>,
    fx: RefCell<Vec<Effects>>,
}

impl Bench {
    fn new(offer: Offer) -> Self {
        Self {
            unit: RefCell::new(Unit::new(offer)),
            ram: Rc::new(RefCell::new(Ram(vec![0; 0x10_0000]))),
            fx: RefCell::new(Vec::new()),
        }
    }
    fn w(&self, offset: u64, size: u8, value: u64) -> Effects {
        let mut fx = Effects::default();
        let mut mem = Shared(self.ram.clone());
        self.unit
            .borrow_mut()
            .write(offset, size, value, &mut mem, &mut fx);
        self.fx.borrow_mut().push(fx);
        fx
    }
    fn r(&self, offset: u64) -> u64 {
        self.unit.borrow().read(offset, 8)
    }
    fn record(&self, f: OsFault) -> Effects {
        let mut fx = Effects::default();
        let mut mem = Shared(self.ram.clone());
        self.unit.borrow_mut().record(&mut mem, f, &mut fx);
        fx
    }
    fn mem(&self) -> Shared {
        Shared(self.ram.clone())
    }
}

impl Mmio for &Bench {
    fn read32(&self, offset: u64) -> u32 {
        self.unit.borrow().read(offset, 4) as u32
    }
    fn read64(&self, offset: u64) -> u64 {
        self.r(offset)
    }
    fn write32(&mut self, offset: u64, value: u32) {
        self.w(offset, 4, u64::from(value));
    }
    fn write64(&mut self, offset: u64, value: u64) {
        self.w(offset, 8, value);
    }
}

/// A 256-entry ring in OS RAM at `base`.
struct OsRing {
    ram: Rc<RefCell<Ram>>,
    base: u64,
}

impl Ring for OsRing {
    fn read(&self, i: usize) -> [u32; 4] {
        let r = self.ram.borrow();
        let at = self.base + (i as u64 % 256) * 16;
        let (a, b) = (r.q(at), r.q(at + 8));
        [a as u32, (a >> 32) as u32, b as u32, (b >> 32) as u32]
    }
    fn write(&mut self, i: usize, e: [u32; 4]) {
        let at = self.base + (i as u64 % 256) * 16;
        self.ram.borrow_mut().put(
            at,
            &[
                u64::from(e[0]) | (u64::from(e[1]) << 32),
                u64::from(e[2]) | (u64::from(e[3]) << 32),
            ],
        );
    }
}

const OFFER: Offer = Offer {
    host_width: 46,
    x2apic: true,
};
const DEVTAB: u64 = 0x10000;
const CMDS: u64 = 0x20000;
const EVENTS: u64 = 0x21000;

fn up(b: &Bench) -> (OsRing, OsRing) {
    amdvi::enable(&mut &*b, DEVTAB, 2, CMDS, EVENTS).expect("on");
    (
        OsRing {
            ram: b.ram.clone(),
            base: CMDS,
        },
        OsRing {
            ram: b.ram.clone(),
            base: EVENTS,
        },
    )
}

#[test]
fn thinhvs_own_driver_brings_the_emulated_amd_vi_unit_up_and_down() {
    let b = Bench::new(OFFER);
    assert_eq!(b.r(reg::EFR), (1 << 2) | (1 << 6) | (1 << 7));
    let (mut cmds, _) = up(&b);
    assert!(b.unit.borrow().enabled());
    assert_eq!(
        b.r(reg::STATUS) & (status::CMD_BUF_RUN | status::EVENT_LOG_RUN),
        status::CMD_BUF_RUN | status::EVENT_LOG_RUN
    );
    assert!(b.fx.borrow().iter().any(|f| f.translation == Some(true)));
    amdvi::submit(
        &mut &b,
        &mut cmds,
        &[
            amdvi::cmd_invalidate_devtab(5),
            amdvi::cmd_invalidate_domain(3),
            amdvi::cmd_invalidate_interrupt_table(5),
            amdvi::cmd_completion_wait(0x2000, 0x77),
        ],
    );
    let fx = *b.fx.borrow().last().unwrap();
    assert_eq!(fx.devices.scopes(), &[Scope::Device { sid: 5, mask: 0 }]);
    assert_eq!(
        fx.pages.scopes(),
        &[Scope::Domain(3)],
        "the all-pages address"
    );
    assert_eq!(
        fx.interrupt_tables.scopes(),
        &[Scope::Device { sid: 5, mask: 0 }]
    );
    assert_eq!(b.ram.borrow().q(0x2000), 0x77);
    assert_eq!(b.r(reg::CMD_HEAD), 4 << 4);
    // A page-selective invalidation: 2^2 pages at 0x4000_0000 (S set,
    // trailing ones 1, the size encoded in bit 12).
    amdvi::submit(&mut &b, &mut cmds, &[[0, 3 << 28 | 9, 0x4000_1000 | 1, 0]]);
    let fx = *b.fx.borrow().last().unwrap();
    assert_eq!(
        fx.pages.scopes(),
        &[Scope::Pages {
            domain: 9,
            addr: 0x4000_0000,
            order: 2
        }]
    );
    amdvi::disable(&mut &b).expect("off");
    assert_eq!(
        b.r(reg::STATUS) & (status::CMD_BUF_RUN | status::EVENT_LOG_RUN),
        0
    );
    // The rings' bases are fixed while they run, free when they do not.
    b.w(reg::CMD_BUF, 8, 0x30000 | (9 << 56));
    assert_eq!(b.r(reg::CMD_BUF), 0x30000 | (9 << 56));
}

#[test]
fn an_illegal_command_stops_the_buffer_and_is_logged_with_its_address() {
    let b = Bench::new(OFFER);
    let (mut cmds, events) = up(&b);
    // INVALIDATE_IOTLB_PAGES (no device IOTLBs offered), then a wait that
    // must not run.
    amdvi::submit(
        &mut &b,
        &mut cmds,
        &[
            amdvi::cmd_invalidate_devtab(1),
            [0, 4 << 28, 0, 0],
            amdvi::cmd_completion_wait(0x2000, 0x55),
        ],
    );
    let fx = *b.fx.borrow().last().unwrap();
    assert_eq!(fx.stopped, Some(event::ILLEGAL_COMMAND_ERROR));
    assert_eq!(b.r(reg::STATUS) & status::CMD_BUF_RUN, 0);
    assert_eq!(b.r(reg::CMD_HEAD), 1 << 4, "the head stays on it");
    assert_eq!(b.ram.borrow().q(0x2000), 0);
    let (ev, overflow) = amdvi::take_events(&mut &b, &events);
    assert!(!overflow);
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].code, event::ILLEGAL_COMMAND_ERROR);
    assert_eq!(ev[0].address, CMDS + 16);
    // The OS repairs the command and restarts the buffer: it resumes at
    // the head.
    cmds.write(1, amdvi::cmd_invalidate_devtab(2));
    let c = b.r(reg::CONTROL);
    b.w(reg::CONTROL, 8, c & !ctrl::CMD_BUF_EN);
    b.w(reg::CONTROL, 8, c);
    assert_eq!(b.ram.borrow().q(0x2000), 0x55);
    assert_eq!(b.r(reg::CMD_HEAD), 3 << 4);
    // Each kind of refusal from a fresh unit: reserved bits, a wait that
    // neither stores nor interrupts, a store outside the OS's memory
    // (COMMAND_HARDWARE_ERROR naming the store's address), a PASID.
    let cases: [([u32; 4], u8, Option<u64>); 5] = [
        ([1 << 16, 2 << 28, 0, 0], event::ILLEGAL_COMMAND_ERROR, None),
        ([0, 1 << 28, 0, 0], event::ILLEGAL_COMMAND_ERROR, None),
        (
            amdvi::cmd_completion_wait(DENIED.start, 1),
            event::COMMAND_HARDWARE_ERROR,
            Some(DENIED.start),
        ),
        ([7, 3 << 28, 0, 0], event::ILLEGAL_COMMAND_ERROR, None),
        ([0, 0xf << 28, 0, 0], event::ILLEGAL_COMMAND_ERROR, None),
    ];
    for (c, code, address) in cases {
        let b = Bench::new(OFFER);
        let (mut cmds, events) = up(&b);
        amdvi::submit(&mut &b, &mut cmds, &[c]);
        let (ev, _) = amdvi::take_events(&mut &b, &events);
        assert_eq!(ev.len(), 1, "{c:x?}");
        assert_eq!(ev[0].code, code, "{c:x?}");
        assert_eq!(ev[0].address, address.unwrap_or(CMDS), "{c:x?}");
    }
}

fn page_fault(i: u64) -> OsFault {
    OsFault {
        code: event::IO_PAGE_FAULT,
        device_id: 0x10,
        domain: 3,
        address: 0x4000_0000 + (i << 12),
        write: i.is_multiple_of(2),
        interrupt: false,
        present: true,
        reserved: false,
    }
}

#[test]
fn the_event_log_fills_overflows_and_stops_until_the_os_restarts_it() {
    let b = Bench::new(OFFER);
    let (_, events) = up(&b);
    // Without EventIntEn, no interrupt; with it, one per event.
    assert!(!b.record(page_fault(0)).event_interrupt);
    let c = b.r(reg::CONTROL);
    b.w(reg::CONTROL, 8, c | ctrl::EVENT_INT_EN);
    for i in 1..255 {
        assert!(b.record(page_fault(i)).event_interrupt);
    }
    // 255 fill a 256-entry log; the next overflows and stops logging.
    let fx = b.record(page_fault(255));
    assert!(fx.event_interrupt);
    let st = b.r(reg::STATUS);
    assert_eq!(st & status::EVENT_OVERFLOW, status::EVENT_OVERFLOW);
    assert_eq!(st & status::EVENT_LOG_RUN, 0);
    assert_eq!(
        (b.unit.borrow().events_logged, b.unit.borrow().events_lost),
        (255, 1)
    );
    let (ev, _) = amdvi::take_events(&mut &b, &events);
    assert_eq!(ev.len(), 255);
    for (i, e) in ev.iter().enumerate() {
        assert_eq!(e.code, event::IO_PAGE_FAULT);
        assert_eq!(e.device_id, 0x10);
        assert_eq!(e.address, 0x4000_0000 + ((i as u64) << 12));
        assert_eq!(e.write, i.is_multiple_of(2));
    }
    // Stopped: nothing is logged until EventLogEn goes off and on.
    b.record(page_fault(0));
    assert_eq!(b.unit.borrow().events_lost, 2);
    b.w(reg::STATUS, 8, status::EVENT_OVERFLOW);
    let c = b.r(reg::CONTROL);
    b.w(reg::CONTROL, 8, c & !ctrl::EVENT_LOG_EN);
    b.w(reg::CONTROL, 8, c);
    b.record(page_fault(1));
    assert_eq!(b.unit.borrow().events_logged, 256);
    // A log outside the OS's memory: nothing written, logging stops.
    let b = Bench::new(OFFER);
    amdvi::enable(&mut &b, DEVTAB, 2, CMDS, DENIED.start).unwrap();
    b.record(page_fault(0));
    assert_eq!(b.unit.borrow().events_lost, 1);
    assert_eq!(b.r(reg::STATUS) & status::EVENT_LOG_RUN, 0);
}

#[test]
fn device_entries_decode_and_refuse_what_is_not_offered() {
    let b = Bench::new(OFFER);
    let dev = |id| b.unit.borrow().device(&b.mem(), id);
    assert_eq!(dev(1).unwrap().dma, Dma::Untranslated, "unit off");
    up(&b);
    let put = |id: u64, e: [u64; 4]| b.ram.borrow_mut().put(DEVTAB + id * 32, &e);
    // 1: V clear. 2: TV clear. 3: mode 0 read-only. 4: 4-level tables,
    // domain 7, an interrupt table of 2^8 entries passing NMIs. 5: mode 5.
    // 6: guest translation. 7: IntTabLen 12.
    put(2, [1, 0, 0, 0]);
    put(3, [1 | 2 | (1 << 61), 3, 0, 0]);
    put(
        4,
        [
            1 | 2 | (4 << 9) | 0x40000 | (3 << 61),
            7 | (1 << 34),
            1 | (8 << 1) | 0x5_0000 | (2 << 60) | (1 << 58),
            0,
        ],
    );
    put(5, [1 | 2 | (5 << 9), 0, 0, 0]);
    put(6, [1 | 2 | (1 << 55), 0, 0, 0]);
    put(7, [1 | 2, 0, 1 | (12 << 1) | (2 << 60), 0]);
    assert_eq!(dev(1).unwrap().dma, Dma::Untranslated);
    // V without TV: no translation information, no DMA.
    assert_eq!(
        dev(2).unwrap().dma,
        Dma::Mode0 {
            read: false,
            write: false
        }
    );
    assert_eq!(
        dev(3).unwrap().dma,
        Dma::Mode0 {
            read: true,
            write: false
        }
    );
    let d = dev(4).unwrap();
    assert_eq!(
        d.dma,
        Dma::Tables {
            root: 0x40000,
            levels: 4,
            read: true,
            write: true
        }
    );
    assert_eq!(d.domain, 7);
    assert!(d.quiet);
    assert_eq!(
        d.interrupts,
        Interrupts::Table {
            base: 0x5_0000,
            entries: 256,
            nmi_pass: true,
            init_pass: false,
            extint_pass: false
        }
    );
    for id in [5, 6, 7] {
        assert_eq!(
            dev(id).unwrap_err().code,
            event::ILLEGAL_DEV_TABLE_ENTRY,
            "{id}"
        );
    }
    // Beyond the table's 2 pages (256 entries); the table in memory that
    // is not the OS's.
    assert_eq!(dev(256).unwrap_err().code, event::ILLEGAL_DEV_TABLE_ENTRY);
    b.w(reg::DEV_TABLE, 8, DENIED.start | 1);
    assert_eq!(dev(0).unwrap_err().code, event::DEV_TAB_HARDWARE_ERROR);
}

#[test]
fn io_page_tables_walk_as_amd_vi_does() {
    let b = Bench::new(OFFER);
    let mut ram = b.ram.borrow_mut();
    let pde = |next: u64, level: u64| next | 1 | (level << 9) | (3 << 61);
    // 4-level tree at 0x40000 for IOVA 0x4000_0000 (indexes 0, 1, 0, 0).
    ram.put(0x40000, &[pde(0x41000, 3)]);
    ram.put(0x41000 + 8, &[pde(0x42000, 2)]);
    ram.put(0x42000, &[pde(0x43000, 1), (0x20_0000 | 1 | (1 << 61))]); // 2 MiB read-only at index 1
    // A 4 KiB page; a 64 KiB page (NextLevel 7, trailing ones 3) over 16
    // entries; a read-write page under a read-only directory.
    ram.put(0x43000, &[0x30000 | 1 | (3 << 61)]);
    for i in 16..32 {
        ram.put(
            0x43000 + i * 8,
            &[0x60000 | 0x7000 | 1 | (7 << 9) | (3 << 61)],
        );
    }
    // Level skipping: 0x40000 index 2 goes straight to a level-1 table;
    // IOVA index bits of levels 3 and 2 must then be 0.
    ram.put(0x40000 + 16, &[pde(0x44000, 1)]);
    ram.put(0x44000 + 5 * 8, &[0x33000 | 1 | (1 << 62)]);
    // A table in memory that is not the OS's; NextLevel 7 larger than
    // its level allows.
    ram.put(0x43000 + 40 * 8, &[0]);
    ram.put(0x40000 + 24, &[pde(DENIED.start, 3)]);
    ram.put(
        0x43000 + 50 * 8,
        &[0x6_ffff_f000 | 1 | (7 << 9) | (3 << 61)],
    );
    drop(ram);
    let mem = b.mem();
    let u = b.unit.borrow();
    let walk = |iova| u.walk(&mem, 0x40000, 4, iova);
    let page = |gpa, read, write| Ok(Some(Page { gpa, read, write }));
    assert_eq!(walk(0x4000_0000), page(0x30000, true, true));
    assert_eq!(walk(0x4000_1000), Ok(None));
    assert_eq!(
        walk(0x4020_5000),
        page(0x20_5000, true, false),
        "2 MiB page, read-only"
    );
    assert_eq!(
        walk(0x4001_3000),
        page(0x63000, true, true),
        "inside the 64 KiB page"
    );
    assert_eq!(walk((2u64 << 39) + 0x5000), page(0x33000, false, true));
    assert_eq!(
        walk((2u64 << 39) + (1 << 30) + 0x5000),
        Ok(None),
        "skipped bits set"
    );
    assert_eq!(walk(3u64 << 39), Err(event::PAGE_TAB_HARDWARE_ERROR));
    assert_eq!(walk(0x4003_2000), Err(event::IO_PAGE_FAULT));
    assert_eq!(walk(1 << 48), Ok(None), "beyond 4 levels");
    assert_eq!(
        u.walk(&mem, 0x42000, 2, 0x20_5000),
        page(0x20_5000, true, false)
    );
}

struct OsCores;

impl Cores for OsCores {
    fn has(&self, id: u32) -> bool {
        id < 4 || id == 0x100
    }
    fn logical(&self, dest: u8, out: &mut Vec<u32>) -> bool {
        out.extend((0..8).filter(|b| dest & (1 << b) != 0));
        dest & 0xf0 != 0
    }
}

#[test]
fn os_remapping_entries_decode_in_both_formats_and_judge_against_the_oss_processors() {
    let b = Bench::new(OFFER);
    up(&b);
    let table = Interrupts::Table {
        base: 0x5_0000,
        entries: 256,
        nmi_pass: false,
        init_pass: false,
        extint_pass: false,
    };
    // 32-bit: entry 3 to APIC 2, vector 0x41; entry 4 to APIC 5 (the
    // appliance's); entry 5 guest mode; entry 6 not present.
    let e32 = |dest: u32, vector: u32| 1 | (dest << 8) | (vector << 16);
    {
        let mut r = b.ram.borrow_mut();
        for (i, v) in [
            (3, e32(2, 0x41)),
            (4, e32(5, 0x42)),
            (5, e32(1, 0x43) | 0x80),
            (6, 0),
        ] {
            r.0[0x5_0000 + i * 4..0x5_0000 + i * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
    }
    let mem = b.mem();
    let irte = |i| b.unit.borrow().os_irte(&mem, 0x10, table, i);
    let e = irte(3).unwrap();
    assert_eq!((e.dest, e.vector, e.x2apic), (2, 0x41, false));
    assert_eq!(judge(&e, &OsCores, Policy::default()).unwrap().apic_id, 2);
    let e = irte(4).unwrap();
    assert_eq!(
        judge(&e, &OsCores, Policy::default()),
        Err(Refusal::Foreign)
    );
    assert!(irte(5).unwrap_err().reserved);
    assert!(!irte(6).unwrap_err().present);
    assert!(irte(256).is_err());
    assert!(
        b.unit
            .borrow()
            .os_irte(&mem, 0x10, Interrupts::Aborted, 0)
            .is_err()
    );
    // 128-bit with GAEn and XTEn: a 32-bit destination.
    let c = b.r(reg::CONTROL);
    b.w(reg::CONTROL, 8, c | ctrl::GA_EN | ctrl::XT_EN);
    b.ram
        .borrow_mut()
        .put(0x5_0000 + 7 * 16, &[1 | (0x100 << 8), 0x51]);
    let e = irte(7).unwrap();
    assert_eq!((e.dest, e.vector, e.x2apic), (0x100, 0x51, true));
    assert_eq!(
        judge(&e, &OsCores, Policy::default()).unwrap().apic_id,
        0x100
    );
    b.ram
        .borrow_mut()
        .put(0x5_0000 + 8 * 16, &[1 | (5 << 8), 0x51 | (1 << 56)]);
    assert_eq!(
        judge(&irte(8).unwrap(), &OsCores, Policy::default()),
        Err(Refusal::Foreign),
        "destination 0x0100_0005"
    );
    // Without XTEn, a destination above 8 bits is reserved.
    b.w(reg::CONTROL, 8, c | ctrl::GA_EN);
    assert!(irte(7).unwrap_err().reserved);
    // Where x2APIC is not offered, GAEn and XTEn stay clear.
    let plain = Bench::new(Offer {
        x2apic: false,
        ..OFFER
    });
    plain.w(reg::CONTROL, 8, ctrl::GA_EN | ctrl::XT_EN | ctrl::IOMMU_EN);
    assert_eq!(plain.r(reg::CONTROL), ctrl::IOMMU_EN);
    assert_eq!(plain.r(reg::EFR), 1 << 6);
}

#[test]
fn the_exclusion_range_applies_as_the_os_set_it() {
    let b = Bench::new(OFFER);
    b.w(reg::EXCL_BASE, 8, 0x10_0000 | 1);
    b.w(reg::EXCL_LIMIT, 8, 0x1f_f000);
    let u = || b.unit.borrow();
    assert!(u().excluded(0x10_0000, true) && u().excluded(0x1f_ffff, true));
    assert!(!u().excluded(0x20_0000, true));
    assert!(!u().excluded(0x10_0000, false), "only for EX without Allow");
    b.w(reg::EXCL_BASE, 8, 0x10_0000 | 3);
    assert!(u().excluded(0x10_0000, false));
    b.w(reg::EXCL_BASE, 8, 0x10_0000 | 2);
    assert!(!u().excluded(0x10_0000, true), "ExEn clear");
}

#[test]
fn random_programming_never_breaks_the_amd_vi_units_invariants() {
    let mut total = fuzz::Reach::default();
    for p in programs(0x0061_6d64_7669, 400, 1 + 10 * 300) {
        let r = fuzz::run(&p);
        total.runs += r.runs;
        total.wraps += r.wraps;
        total.stops += r.stops;
        total.logged += r.logged;
        total.interrupts += r.interrupts;
    }
    println!("{total:?}");
    // The programs reach what they are meant to check.
    assert!(
        total.runs > 1000 && total.wraps > 20 && total.stops > 100,
        "{total:?}"
    );
    assert!(total.logged > 1000 && total.interrupts > 100, "{total:?}");
}

#[test]
fn every_page_of_the_oss_io_page_tables_is_walked_within_range_and_budget() {
    let b = Bench::new(OFFER);
    {
        let mut ram = b.ram.borrow_mut();
        let pde = |next: u64, level: u64| next | 1 | (level << 9) | (3 << 61);
        // 3 levels at 0x40000: index 0 a 2 MiB page onto 0x20_0000;
        // index 1 skips straight to a level-1 table holding one page (its
        // span beyond the first 2 MiB is unreachable); index 2 in memory
        // that is not the OS's.
        ram.put(0x40000, &[pde(0x41000, 2)]);
        ram.put(0x41000, &[0x20_0000 | 1 | (3 << 61)]);
        ram.put(0x40000 + 8, &[pde(0x42000, 1)]);
        ram.put(0x42000 + 3 * 8, &[0x33000 | 1 | (1 << 62)]);
        ram.put(0x40000 + 16, &[pde(DENIED.start, 2)]);
    }
    let mem = b.mem();
    let u = b.unit.borrow();
    let mut got = Vec::new();
    let resume = u.leaves(&mem, 0x40000, 3, 0..u64::MAX, 10_000, &mut |iova, p| {
        got.push((iova, p));
    });
    assert_eq!(resume, None);
    assert_eq!(got.len(), 512 + 1);
    assert_eq!(got[5].0, 0x5000);
    assert_eq!(got[5].1.gpa, 0x20_5000);
    let last = got[512];
    assert_eq!(
        (last.0, last.1.gpa, last.1.read, last.1.write),
        ((1 << 30) + 0x3000, 0x33000, false, true)
    );
    // Each agrees with the walk.
    for (iova, p) in &got {
        assert_eq!(u.walk(&mem, 0x40000, 3, *iova), Ok(Some(*p)));
    }
    // A budget of 100, resumed until done, gives the same pages.
    let mut again = Vec::new();
    let mut from = Some(0);
    while let Some(f) = from {
        from = u.leaves(&mem, 0x40000, 3, f..u64::MAX, 100, &mut |iova, p| {
            again.push((iova, p));
        });
    }
    assert_eq!(again, got);
    // A range inside the 2 MiB page.
    got.clear();
    u.leaves(&mem, 0x40000, 3, 0x1000..0x3000, 10, &mut |iova, p| {
        got.push((iova, p));
    });
    assert_eq!(
        got.iter().map(|g| g.0).collect::<Vec<_>>(),
        [0x1000, 0x2000]
    );
}

#[test]
fn a_devices_real_table_follows_the_oss_entries_for_it() {
    let b = Bench::new(OFFER);
    up(&b);
    let table = Interrupts::Table {
        base: 0x5_0000,
        entries: 1024,
        nmi_pass: false,
        init_pass: false,
        extint_pass: false,
    };
    {
        let mut r = b.ram.borrow_mut();
        let e32 = |dest: u32, vector: u32| 1u32 | (dest << 8) | (vector << 16);
        for (i, v) in [
            (0usize, e32(1, 0x41)),
            (1, e32(5, 0x42)),
            (2, e32(1, 0x43) | (5 << 2)),
            (600, e32(2, 0x44)),
        ] {
            r.0[0x5_0000 + i * 4..0x5_0000 + i * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
    }
    let mut real = Vec::new();
    let (composed, refused) = sync_table(
        &b.unit.borrow(),
        &b.mem(),
        0x10,
        table,
        512,
        &OsCores,
        Policy::default(),
        &mut |i, t| real.push((i, t.map(|t| t.apic_id))),
    );
    // Entry 0 composed; 1 (the appliance's processor) and 2 (INIT)
    // refused; entry 600 is beyond the real table's 512.
    assert_eq!((composed, refused), (1, 2));
    assert_eq!(real.len(), 512);
    assert_eq!(real[0], (0, Some(1)));
    assert_eq!(real[1], (1, None));
    assert_eq!(real[2], (2, None));
    // No table: nothing to write.
    let (c, r) = sync_table(
        &b.unit.borrow(),
        &b.mem(),
        0x10,
        Interrupts::Unremapped,
        512,
        &OsCores,
        Policy::default(),
        &mut |_, _| panic!("written"),
    );
    assert_eq!((c, r), (0, 0));
}

#[test]
fn the_event_interrupt_the_os_programs_in_int_cap_xt_reaches_only_its_processors() {
    let b = Bench::new(OFFER);
    up(&b);
    let p = Policy::default();
    assert_eq!(
        event_target(&b.unit.borrow(), &OsCores, p),
        None,
        "IntCapXTEn clear"
    );
    let c = b.r(reg::CONTROL);
    b.w(reg::CONTROL, 8, c | ctrl::INT_CAP_XT_EN);
    // Vector 0x61 to x2APIC 0x100 (the OS's), then to 0x0100_0005 (not).
    b.w(INT_CAP_XT[0], 8, (0x100 << 8) | (0x61 << 32));
    assert_eq!(b.r(INT_CAP_XT[0]), (0x100 << 8) | (0x61 << 32));
    let t = event_target(&b.unit.borrow(), &OsCores, p)
        .unwrap()
        .unwrap();
    assert_eq!((t.apic_id, t.vector), (0x100, 0x61));
    b.w(INT_CAP_XT[0], 8, (5 << 8) | (0x61 << 32) | (1 << 56));
    assert_eq!(
        event_target(&b.unit.borrow(), &OsCores, p),
        Some(Err(Refusal::Foreign))
    );
    // A reserved vector.
    b.w(INT_CAP_XT[0], 8, (2 << 8) | (3 << 32));
    assert_eq!(
        event_target(&b.unit.borrow(), &OsCores, p),
        Some(Err(Refusal::Vector(3)))
    );
    // Without x2APIC offered the registers and IntCapXTEn do not exist.
    let plain = Bench::new(Offer {
        x2apic: false,
        ..OFFER
    });
    plain.w(INT_CAP_XT[0], 8, u64::MAX);
    assert_eq!(plain.r(INT_CAP_XT[0]), 0);
    plain.w(reg::CONTROL, 8, ctrl::INT_CAP_XT_EN);
    assert_eq!(event_target(&plain.unit.borrow(), &OsCores, p), None);
}
