use super::*;

use crate::test_mem::{OsRam, Tables};
use std::collections::HashMap;
use thinhv_paging::FrameAlloc;
use thinhv_passthrough::vvtd::reg;

/// Frames, those given back reused first (as thinhv's pool does), each
/// return noted with the real unit's flush count at that moment.
struct Frames {
    next: u64,
    free: Vec<u64>,
    left: u32,
    flushes: std::rc::Rc<std::cell::Cell<usize>>,
    freed: Vec<(u64, usize)>,
}

impl FrameAlloc for Frames {
    fn alloc_frame(&mut self) -> Option<u64> {
        if let Some(f) = self.free.pop() {
            return Some(f);
        }
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        self.next += 0x1000;
        Some(self.next)
    }
}

impl Frames {
    /// As many frames as asked for, their returns noted against `real`'s
    /// flushes.
    fn plenty(real: &Real) -> Self {
        Self {
            next: 0x1_0000_0000,
            free: Vec::new(),
            left: u32::MAX,
            flushes: real.flush_count.clone(),
            freed: Vec::new(),
        }
    }
}

impl FreeFrames for Frames {
    fn free_frame(&mut self, frame: u64) {
        self.free.push(frame);
        self.freed.push((frame, self.flushes.get()));
    }
}

/// thinhv's page is 0x9_0000; everything else is the OS's (or nothing
/// refused, for the control).
struct Reach(bool);

impl DmaReach for Reach {
    fn os_may_dma(&self, gpa: u64) -> bool {
        !self.0 || gpa & !0xfff != 0x9_0000
    }
}

/// The real unit: the context entries as set, flushes, the remapping
/// table's OS part and whether remapping is on.
#[derive(Default)]
struct Real {
    ctx: HashMap<u16, RealContext>,
    set: usize,
    flushes: usize,
    flush_count: std::rc::Rc<std::cell::Cell<usize>>,
    irt: HashMap<u32, [u64; 2]>,
    irte_flushes: usize,
    remapping: Option<(bool, bool, bool)>,
    /// What was done, in order: "irte", "iec", "on", "off", "flush".
    events: Vec<&'static str>,
    /// Invalidations and context changes fail.
    fail_flush: bool,
    fail_ctx: bool,
    /// The requesters thinhv's own tables give its domain for the OS
    /// (00:01.0, 00:02.0, 00:03.0, 00:05.0; 00:04.0 is an appliance's),
    /// and which of them [`RealUnit::set_unnamed`] blocked.
    unnamed_blocked: Vec<u16>,
    /// What each flush invalidated: `None` everything, else the IOTLBs
    /// of those real domains.
    scopes: Vec<Option<Vec<u16>>>,
}

/// The requesters of [`Real`] on thinhv's domain for the OS.
const DEFAULTS: [u16; 4] = [0x08, 0x10, 0x18, 0x28];

impl RealUnit for Real {
    fn set_context(&mut self, rid: u16, c: RealContext) -> bool {
        if self.fail_ctx {
            return false;
        }
        self.ctx.insert(rid, c);
        self.set += 1;
        true
    }
    fn flush(&mut self, domains: Option<&[u16]>) -> bool {
        self.events.push("flush");
        self.scopes.push(domains.map(<[u16]>::to_vec));
        if self.fail_flush {
            return false;
        }
        self.flushes += 1;
        self.flush_count.set(self.flushes);
        true
    }
    fn write_irte(&mut self, index: u32, entry: [u64; 2]) {
        self.events.push("irte");
        self.irt.insert(index, entry);
    }
    fn irte_flush(&mut self) {
        self.events.push("iec");
        self.irte_flushes += 1;
    }
    fn set_remapping(&mut self, on: bool, x2apic: bool, compat: bool) {
        self.events.push(if on { "on" } else { "off" });
        self.remapping = Some((on, x2apic, compat));
    }
    fn set_unnamed(&mut self, blocked: bool, named: &dyn Fn(u16) -> bool) -> bool {
        self.events.push(if blocked { "block" } else { "unblock" });
        self.unnamed_blocked = if blocked {
            DEFAULTS.into_iter().filter(|&r| !named(r)).collect()
        } else {
            Vec::new()
        };
        true
    }
}

/// The OS's processors: APIC IDs 0 and 1 (2 is an appliance's).
struct Cores2;

impl thinhv_passthrough::irq_remap::Cores for Cores2 {
    fn has(&self, apic_id: u32) -> bool {
        apic_id < 2
    }
    fn logical(&self, dest: u8, out: &mut Vec<u32>) -> bool {
        out.extend((0..2).filter(|i| dest & (1 << i) != 0));
        dest & !3 != 0
    }
}

struct Bed {
    os: OsRam,
    pt: Tables,
    frames: Frames,
    real: Real,
    unit: OsVtd,
    protect: bool,
}

/// Requester 00:02.0 (0x10): second-level tables of domain 5 (root at
/// 0x20000, one leaf table at 0x23000 for IOVA 0x4000_0000..); 00:03.0
/// (0x18): pass-through; 00:04.0 (0x20): an appliance's (not the OS's),
/// its entry present in the OS's table all the same.
fn bed(protect: bool) -> Bed {
    let mut os = OsRam(vec![0; 0x10_0000]);
    // Root table at 0x10000, bus 0's context table at 0x11000.
    os.put(0x10000, 0x11001);
    let ctx = |os: &mut OsRam, df: u64, lo: u64, hi: u64| {
        os.put(0x11000 + df * 16, lo);
        os.put(0x11000 + df * 16 + 8, hi);
    };
    ctx(&mut os, 0x10, 0x20001, 2 | (5 << 8));
    ctx(&mut os, 0x18, 1 | (2 << 2), 2 | (6 << 8));
    ctx(&mut os, 0x20, 0x20001, 2 | (5 << 8));
    os.put(0x20000, 0x21003);
    os.put(0x21000 + 8, 0x22003);
    os.put(0x22000, 0x23003);
    os.put(0x23000, 0x5003);
    let real = Real::default();
    Bed {
        os,
        pt: Tables::default(),
        frames: Frames::plenty(&real),
        real,
        unit: OsVtd::new(
            0xfed9_0000,
            Offer {
                host_width: 39,
                remapping: false,
                x2apic: false,
            },
        ),
        protect,
    }
}

impl Bed {
    fn write(&mut self, offset: u64, value: u64) {
        let reach = Reach(self.protect);
        let owned = |rid: u16| rid != 0x20;
        let mut m = Machine {
            cores: &Cores2,
            os: &mut self.os,
            reach: &reach,
            owned: &owned,
            pt: &mut self.pt,
            frames: &mut self.frames,
            real: &mut self.real,
        };
        self.unit.write(offset, 8, value, &mut m);
    }
    fn leaf(&self, iova: u64) -> u64 {
        let (s, _, _) = &self.unit.dma.shadows[&5];
        s.entry(&self.pt, iova)
    }
    fn context_flush(&mut self) {
        self.write(reg::CCMD, (1 << 63) | (1 << 61));
    }
    fn page_flush(&mut self, iova: u64) {
        self.write(reg::IVA, iova);
        self.write(reg::IOTLB, (1 << 63) | (3 << 60) | (5 << 32));
    }
    fn enable(&mut self) {
        self.write(reg::RTADDR, 0x10000);
        self.write(reg::GCMD, 1 << 30);
        self.write(reg::GCMD, 1 << 31);
    }
}

#[test]
fn the_oss_context_entries_point_its_requesters_at_shadows_and_only_its_own() {
    let mut b = bed(true);
    // Before translation: nothing changes in the real unit.
    b.write(reg::RTADDR, 0x10000);
    b.write(reg::GCMD, 1 << 30);
    assert_eq!(b.real.set, 0);
    b.write(reg::GCMD, 1 << 31);
    let shadow = b.unit.dma.shadows[&5].0.root();
    assert_eq!(
        b.real.ctx.get(&0x10),
        Some(&RealContext::Shadow {
            root: shadow,
            domain: real_domain(5),
            read: true,
            write: true,
        })
    );
    // Pass-through stays on thinhv's domain for the OS (nothing to set);
    // the appliance's requester is never touched.
    assert_eq!(b.real.ctx.get(&0x18), None);
    assert_eq!(b.real.ctx.get(&0x20), None);
    assert!(b.real.flushes >= 1);
    // The OS's mapping is in the shadow, with its rights.
    assert_eq!(b.leaf(0x4000_0000) & !0xfff, 0x5000);
    assert_eq!(b.leaf(0x4000_0000) & 3, 3);
    assert_eq!(b.leaf(0x4000_1000), 0);
}

#[test]
fn a_mapping_reaches_the_shadow_at_the_oss_invalidation_and_never_thinhvs_page() {
    for protect in [true, false] {
        let mut b = bed(protect);
        b.enable();
        // Write-only at 0x4000_1000, and thinhv's page at 0x4000_2000.
        b.os.put(0x23008, 0x6002);
        b.os.put(0x23010, 0x9_0003);
        assert_eq!(b.leaf(0x4000_1000), 0, "not before the invalidation");
        let before = b.real.flushes;
        b.page_flush(0x4000_1000);
        assert_eq!(b.leaf(0x4000_1000) & 3, 2, "write-only, as the OS asked");
        assert_eq!(b.real.flushes, before + 1, "the real IOTLB flushed");
        // A new leaf: the IOTLB of its real domain alone.
        assert_eq!(b.real.scopes.last(), Some(&Some(vec![real_domain(5)])));
        // A failed invalidation: the next one is global, whatever for.
        b.real.fail_flush = true;
        b.os.put(0x23018, 0x7003);
        b.page_flush(0x4000_3000);
        b.real.fail_flush = false;
        b.os.put(0x23020, 0x8003);
        b.page_flush(0x4000_4000);
        assert_eq!(b.real.scopes.last(), Some(&None));
        b.os.put(0x23028, 0x8003);
        b.page_flush(0x4000_5000);
        assert_eq!(b.real.scopes.last(), Some(&Some(vec![real_domain(5)])));
        b.page_flush(0x4000_2000);
        // The control: without the check thinhv's page is mapped.
        assert_eq!(b.leaf(0x4000_2000) != 0, !protect, "protect {protect}");
        // Unmapped at the next invalidation.
        b.os.put(0x23008, 0);
        b.page_flush(0x4000_1000);
        assert_eq!(b.leaf(0x4000_1000), 0);
    }
}

#[test]
fn a_context_taken_away_blocks_its_requester_and_translation_off_gives_it_back() {
    let mut b = bed(true);
    b.enable();
    b.os.put(0x11000 + 0x10 * 16, 0);
    b.context_flush();
    assert_eq!(b.real.ctx.get(&0x10), Some(&RealContext::Blocked));
    // A context entry changed: everything invalidated.
    assert_eq!(b.real.scopes.last(), Some(&None));
    // The shadow of the domain no one uses is freed.
    assert_eq!(b.unit.domains(), 0);
    assert!(!b.frames.freed.is_empty());
    // Translation off: back on thinhv's domain for the OS.
    b.write(reg::GCMD, 0);
    assert_eq!(b.real.ctx.get(&0x10), Some(&RealContext::Os));
    assert_eq!(b.real.ctx.get(&0x20), None);
}

#[test]
fn a_requester_the_os_never_named_is_blocked_while_it_translates_and_its_faults_are_the_oss() {
    let mut b = bed(true);
    b.write(reg::RTADDR, 0x10000);
    b.write(reg::GCMD, 1 << 30);
    assert!(b.real.unnamed_blocked.is_empty(), "not before translation");
    b.write(reg::GCMD, 1 << 31);
    // 00:01.0 and 00:05.0 have no entry in the OS's tables: blocked, as a
    // real unit blocks them; 00:02.0 (tables) and 00:03.0 (pass-through)
    // are set one by one, the appliance's 00:04.0 is never thinhv's
    // domain for the OS.
    assert_eq!(b.real.unnamed_blocked, [0x08, 0x28]);
    // The control: a requester the OS names later leaves the blocked set.
    b.os.put(0x11000 + 0x08 * 16, 1 | (2 << 2));
    b.os.put(0x11000 + 0x08 * 16 + 8, 2 | (7 << 8));
    b.context_flush();
    assert_eq!(b.real.ctx.get(&0x08), Some(&RealContext::Os));
    // Its faults are the OS's to hear about (no context entry).
    b.write(reg::FEDATA & !7, 0x40 << 32);
    b.write(reg::FEADDR, 0xfee0_0000);
    let f = RealFault {
        unit: 0,
        sid: 0x28,
        addr: 0x1000,
        write: false,
    };
    assert!(
        b.unit
            .fault(f, &b.os)
            .is_some_and(|fx| fx.fault_event.is_some())
    );
    // Translation off: no one blocked, and everything invalidated.
    b.write(reg::GCMD, 0);
    assert!(b.real.unnamed_blocked.is_empty());
    assert!(
        b.real.events.ends_with(&["unblock", "flush"]),
        "{:?}",
        b.real.events
    );
    assert_eq!(b.real.scopes.last(), Some(&None));
}

#[test]
fn a_real_fault_the_oss_tables_caused_is_the_oss_and_one_of_thinhvs_protection_is_not() {
    let mut b = bed(true);
    b.enable();
    // The fault event: vector 0x40 to APIC 0, unmasked.
    b.write(reg::FEDATA & !7, 0x40 << 32);
    b.write(reg::FEADDR, 0xfee0_0000);
    let fault = |sid, addr, write| RealFault {
        unit: 0,
        sid,
        addr,
        write,
    };
    // 0x4000_1000 is not in the OS's tables of 00:02.0: its fault, with
    // an event while unmasked.
    let fx = b.unit.fault(fault(0x10, 0x4000_1000, true), &b.os);
    assert!(fx.and_then(|f| f.fault_event).is_some(), "{fx:?}");
    assert_eq!(b.unit.unit.faults_recorded, 1);
    // Its tables allow 0x4000_0000 (thinhv refused it, say: its page):
    // not the OS's to hear about.
    assert_eq!(b.unit.fault(fault(0x10, 0x4000_0000, true), &b.os), None);
    // A pass-through requester's fault is always thinhv's protection.
    assert_eq!(b.unit.fault(fault(0x18, 0x9_0000, false), &b.os), None);
    assert_eq!(b.unit.unit.faults_recorded, 1);
    assert_eq!(b.unit.status().faults, 1);
    // The OS reads its record: requester, reason 5 (write not allowed by
    // a missing entry), the page.
    let hi = b.unit.unit.read(reg::FRCD + 8, 8);
    assert_eq!(hi & 0xffff, 0x10);
    assert_eq!(b.unit.unit.read(reg::FRCD, 8), 0x4000_1000);
}

#[test]
fn the_oss_remapping_entries_reach_the_real_table_judged_and_remapping_follows_its_own() {
    let mut b = bed(true);
    b.unit.set_offer(Offer {
        host_width: 39,
        remapping: true,
        x2apic: false,
    });
    // Its table at 0x30000, 2^(3+1) entries: entry 0 vector 0x41 to APIC
    // 1 from 00:02.0 (SVT 01b, SQ 0); entry 1 to APIC 2 (an appliance's);
    // entry 2 from 00:04.0 (not the OS's).
    let irte =
        |vector: u64, dest: u64, sid: u64| [1 | (vector << 16) | (dest << 40), sid | (1 << 18)];
    for (i, e) in [
        irte(0x41, 1, 0x10),
        irte(0x42, 2, 0x10),
        irte(0x43, 0, 0x20),
    ]
    .into_iter()
    .enumerate()
    {
        b.os.put(0x30000 + 16 * i as u64, e[0]);
        b.os.put(0x30000 + 16 * i as u64 + 8, e[1]);
    }
    b.write(reg::IRTA, 0x30000 | 3);
    b.write(reg::GCMD, 1 << 24);
    assert!(b.real.irt.is_empty() || b.real.irt.values().all(|e| e[0] & 1 == 0));
    // Turning remapping on: the entries first, then the real unit.
    b.real.events.clear();
    b.write(reg::GCMD, 1 << 25);
    assert_eq!(b.real.remapping, Some((true, false, false)));
    let on = b.real.events.iter().position(|e| *e == "on").unwrap();
    assert!(b.real.events[..on].contains(&"irte"), "{:?}", b.real.events);
    assert!(
        !b.real.events[on..].contains(&"irte"),
        "{:?}",
        b.real.events
    );
    assert!(b.real.irte_flushes >= 1);
    let e0 = b.real.irt[&0];
    assert_eq!(e0[0] & 1, 1);
    assert_eq!((e0[0] >> 16) & 0xff, 0x41);
    assert_eq!((e0[0] >> 40) & 0xff, 1);
    assert_eq!(b.real.irt[&1][0] & 1, 0, "an appliance's processor");
    assert_eq!(b.real.irt[&2][0] & 1, 0, "a source that is not the OS's");
    assert_eq!(b.unit.status().entries, 1);
    assert_eq!(b.unit.entries.refused, 2);
    // The OS changes entry 0: nothing before its invalidation (through
    // its queue, which the model's own tests drive).
    b.os.put(0x30000, irte(0x51, 0, 0x10)[0]);
    b.write(reg::FEDATA & !7, 0);
    assert_eq!((b.real.irt[&0][0] >> 16) & 0xff, 0x41);
    // A new table latched while on: the real units follow it.
    b.real.remapping = None;
    b.write(reg::GCMD, (1 << 25) | (1 << 24));
    assert_eq!(b.real.remapping, Some((true, false, false)));
    // Remapping off: the real unit's first, then the OS's entries go.
    b.real.events.clear();
    b.write(reg::GCMD, 1 << 24);
    assert_eq!(b.real.remapping, Some((false, false, false)));
    assert_eq!(b.real.events.first(), Some(&"off"), "{:?}", b.real.events);
    assert_eq!(
        b.real.irt[&0][0] & 1,
        0,
        "no OS entry left in the real table"
    );
    assert_eq!(b.unit.status().entries, 0);
}

#[test]
fn a_failed_real_flush_keeps_retired_shadows_until_one_completes() {
    let mut b = bed(true);
    b.enable();
    b.real.fail_flush = true;
    b.os.put(0x11000 + 0x10 * 16, 0);
    b.context_flush();
    assert_eq!(b.unit.domains(), 0);
    assert!(b.frames.freed.is_empty(), "nothing freed without a flush");
    b.real.fail_flush = false;
    b.write(reg::CCMD, (1 << 63) | (1 << 61));
    assert!(!b.frames.freed.is_empty(), "freed once a flush completed");
}

#[test]
fn a_context_change_the_real_unit_refused_is_tried_again() {
    let mut b = bed(true);
    b.real.fail_ctx = true;
    b.enable();
    assert_eq!(b.real.ctx.get(&0x10), None);
    b.real.fail_ctx = false;
    b.context_flush();
    assert!(matches!(
        b.real.ctx.get(&0x10),
        Some(RealContext::Shadow { .. })
    ));
}

#[test]
fn a_shadow_replaced_under_the_same_domain_is_freed_only_after_the_real_flush() {
    let mut b = bed(true);
    b.enable();
    let flushes = b.real.flushes;
    // The OS moves domain 5 to new tables (a copy at 0x40000 that maps
    // 0x4000_0000 to 0x7000) and invalidates the context cache: the old
    // shadow goes, a new one (on its frames, reused) comes.
    b.os.put(0x40000, 0x41003);
    b.os.put(0x41000 + 8, 0x42003);
    b.os.put(0x42000, 0x43003);
    b.os.put(0x43000, 0x7003);
    b.os.put(0x11000 + 0x10 * 16, 0x40001);
    b.context_flush();
    assert!(b.real.flushes > flushes, "the real unit flushed");
    assert!(!b.frames.freed.is_empty());
    for &(frame, at) in &b.frames.freed {
        assert!(at > flushes, "frame {frame:#x} freed before the real flush");
    }
    assert_eq!(b.leaf(0x4000_0000) & !0xfff, 0x7000);
}

#[test]
fn a_domain_without_frames_falls_back_to_thinhvs_domain_for_the_os_never_to_stale_entries() {
    let mut b = bed(true);
    // Frames for the root and one table only: the shadow cannot hold the
    // OS's leaf.
    b.frames.left = 2;
    b.enable();
    assert_eq!(b.unit.domains(), 0);
    // Its requester keeps (or is given back) thinhv's domain for the OS.
    assert!(b.real.ctx.get(&0x10).is_none_or(|c| *c == RealContext::Os));
    // Everything it held is back in the pool, after a flush.
    assert_eq!(b.frames.free.len(), 2);
    // Given frames and new tables, the domain is shadowed again.
    b.frames.left = 100;
    b.os.put(0x40000, 0x21003);
    b.os.put(0x11000 + 0x10 * 16, 0x40001);
    b.context_flush();
    assert_eq!(b.unit.domains(), 1);
    assert!(matches!(
        b.real.ctx.get(&0x10),
        Some(RealContext::Shadow { .. })
    ));
}

#[test]
fn a_fallen_back_domain_is_shadowed_again_at_its_next_whole_invalidation() {
    let mut b = bed(true);
    b.frames.left = 2;
    b.enable();
    assert_eq!(b.unit.domains(), 0);
    // A page-selective invalidation does not retry it.
    b.frames.left = 100;
    b.page_flush(0x4000_0000);
    assert_eq!(b.unit.domains(), 0);
    // A domain-selective one does, once.
    b.write(reg::IOTLB, (1 << 63) | (2 << 60) | (5 << 32));
    assert_eq!(b.unit.domains(), 1);
    assert!(matches!(
        b.real.ctx.get(&0x10),
        Some(RealContext::Shadow { .. })
    ));
    assert_eq!(b.leaf(0x4000_0000) & !0xfff, 0x5000);
}

/// thinhv's domain for the OS in [`real_tables`].
const OS: [u64; 2] = [0x9001, 0x102];

/// [`RealTables`] over [`real_tables`].
fn tables_over(defaults: &[u64; 1024]) -> RealTables<'_> {
    RealTables {
        root: 0x1000,
        shared_ctx: 0x2000,
        os_entry: OS,
        defaults,
    }
}

/// thinhv's real tables for [`RealTables`]: root at 0x1000, the shared
/// context table at 0x2000 (every bus but 1), bus 1's own table at 0x3000
/// with an appliance's 01:01.0 (0x108); every other requester on
/// thinhv's domain for the OS.
fn real_tables() -> (Tables, Box<[u64; 1024]>) {
    let mut pt = Tables::default();
    let mut defaults = Box::new([u64::MAX; 1024]);
    defaults[0x108 / 64] &= !(1 << (0x108 % 64));
    for df in 0..256u16 {
        RealTables::write_context(&mut pt, 0x2000, df, OS);
        let e = if df == 0x08 { [0x8001, 0x202] } else { OS };
        RealTables::write_context(&mut pt, 0x3000, 0x100 | df, e);
    }
    for bus in 0..256usize {
        pt.write_entry(0x1000, 2 * bus, if bus == 1 { 0x3001 } else { 0x2001 });
    }
    (pt, defaults)
}

/// Requester `rid`'s real context entry, through the root table.
fn real_entry(pt: &Tables, rid: u16) -> [u64; 2] {
    let t = pt.read_entry(0x1000, 2 * usize::from(rid >> 8)) & !0xfff;
    let df = 2 * usize::from(rid & 0xff);
    [pt.read_entry(t, df), pt.read_entry(t, df + 1)]
}

#[test]
fn unnamed_requesters_are_blocked_in_the_real_tables_and_named_ones_keep_their_entries() {
    let (mut pt, defaults) = real_tables();
    let t = tables_over(&defaults);
    // 00:02.0 (pass-through, so its entry is thinhv's domain for the OS)
    // on a bus that shares the common table, 01:03.0 on bus 1.
    let named = |rid: u16| rid == 0x10 || rid == 0x118;
    let mut next = 0x10_0000u64;
    let mut frame = || {
        next += 0x1000;
        Some(next)
    };
    assert!(t.set_unnamed(&mut pt, true, &named, &mut frame));
    // Bus 0 got a table of its own: its named requester keeps its entry,
    // the others are blocked; so is every requester of a shared bus.
    assert_ne!(pt.read_entry(0x1000, 0) & !0xfff, 0x2000);
    assert_eq!(real_entry(&pt, 0x10), OS);
    assert_eq!(real_entry(&pt, 0x08), [0, 0]);
    assert_eq!(real_entry(&pt, 0x210), [0, 0]);
    // Bus 1: the appliance's entry untouched, the named one kept.
    assert_eq!(real_entry(&pt, 0x108), [0x8001, 0x202]);
    assert_eq!(real_entry(&pt, 0x118), OS);
    assert_eq!(real_entry(&pt, 0x110), [0, 0]);
    // Let through again: thinhv's domain for the OS everywhere it was.
    assert!(t.set_unnamed(&mut pt, false, &named, &mut frame));
    for rid in [0x08, 0x10, 0x110, 0x118, 0x210, 0xff07] {
        assert_eq!(real_entry(&pt, rid), OS, "{rid:#x}");
    }
    assert_eq!(real_entry(&pt, 0x108), [0x8001, 0x202]);
}

#[test]
fn without_a_frame_for_a_named_requesters_bus_nothing_is_blocked() {
    let (mut pt, defaults) = real_tables();
    let t = tables_over(&defaults);
    assert!(!t.set_unnamed(&mut pt, true, &|rid| rid == 0x10, &mut || None));
    for rid in [0x08, 0x10, 0x110, 0x210] {
        assert_eq!(real_entry(&pt, rid), OS, "{rid:#x}");
    }
}

/// The OS's AMD-Vi unit over the same fakes: device table at 0x30000 (one
/// page, IDs 0 to 127), command buffer at 0x40000, event log at 0x41000.
/// 00:01.0 (0x08): V without TV (Linux's blocked entry); 00:02.0 (0x10):
/// 3-level tables of domain 5 (IOVA 0x4000_0000 -> 0x5000), the entry
/// allowing reads alone; 00:03.0 (0x18): mode 0 with IR and IW (identity);
/// 00:04.0 (0x20): an appliance's; 00:05.0 (0x28): V clear.
struct AmdBed {
    os: OsRam,
    pt: Tables,
    frames: Frames,
    real: Real,
    unit: crate::os_amdvi::OsAmdVi,
    commands: u64,
}

const DTE_V: u64 = 1;
const DTE_TV: u64 = 2;
const AMD_R: u64 = 1 << 61;
const AMD_W: u64 = 1 << 62;

fn amd_bed() -> AmdBed {
    let mut os = OsRam(vec![0; 0x10_0000]);
    let dte = |os: &mut OsRam, id: u64, q0: u64, q1: u64| {
        os.put(0x30000 + id * 32, q0);
        os.put(0x30000 + id * 32 + 8, q1);
    };
    dte(&mut os, 0x08, DTE_V, 9);
    dte(
        &mut os,
        0x10,
        DTE_V | DTE_TV | (3 << 9) | 0x20000 | AMD_R,
        5,
    );
    dte(&mut os, 0x18, DTE_V | DTE_TV | AMD_R | AMD_W, 6);
    dte(
        &mut os,
        0x20,
        DTE_V | DTE_TV | (3 << 9) | 0x20000 | AMD_R,
        5,
    );
    // IOVA 0x4000_0000: level-3 index 1, then 0, 0.
    os.put(0x20000 + 8, 0x21001 | (2 << 9) | AMD_R | AMD_W);
    os.put(0x21000, 0x22001 | (1 << 9) | AMD_R | AMD_W);
    os.put(0x22000, 0x5001 | AMD_R | AMD_W);
    let real = Real::default();
    AmdBed {
        os,
        pt: Tables::default(),
        frames: Frames::plenty(&real),
        real,
        unit: crate::os_amdvi::OsAmdVi::new(
            0xfed8_0000,
            thinhv_passthrough::vamdvi::Offer {
                host_width: 39,
                x2apic: false,
            },
        ),
        commands: 0,
    }
}

impl AmdBed {
    fn write(&mut self, offset: u64, value: u64) -> thinhv_passthrough::vamdvi::Effects {
        let reach = Reach(true);
        let owned = |rid: u16| rid != 0x20;
        let mut m = Machine {
            cores: &Cores2,
            os: &mut self.os,
            reach: &reach,
            owned: &owned,
            pt: &mut self.pt,
            frames: &mut self.frames,
            real: &mut self.real,
        };
        self.unit.write(offset, 8, value, &mut m)
    }
    fn enable(&mut self) {
        use thinhv_passthrough::vamdvi::{ctrl, reg};
        self.write(reg::DEV_TABLE, 0x30000);
        self.write(reg::CMD_BUF, 0x40000 | (8 << 56));
        self.write(reg::EVENT_LOG, 0x41000 | (8 << 56));
        self.write(
            reg::CONTROL,
            ctrl::IOMMU_EN | ctrl::CMD_BUF_EN | ctrl::EVENT_LOG_EN,
        );
    }
    /// One command through the buffer.
    fn command(&mut self, c: [u32; 4]) {
        let at = 0x40000 + (self.commands % 256) * 16;
        self.os.put(at, u64::from(c[0]) | (u64::from(c[1]) << 32));
        self.os
            .put(at + 8, u64::from(c[2]) | (u64::from(c[3]) << 32));
        self.commands += 1;
        self.write(
            thinhv_passthrough::vamdvi::reg::CMD_TAIL,
            (self.commands % 256) << 4,
        );
    }
    fn leaf(&self, iova: u64) -> u64 {
        let (s, _, _) = &self.unit.dma.shadows[&5];
        s.entry(&self.pt, iova)
    }
}

#[test]
fn the_oss_amdvi_device_entries_reach_the_real_ones_with_their_rights_and_blocked_ones_block() {
    use thinhv_passthrough::amdvi as real_cmds;
    let mut b = amd_bed();
    b.enable();
    let shadow = b.unit.dma.shadow_root(5).unwrap();
    // Tables: the shadow, under the OS's domain 0x1000 above, with the
    // entry's read-only right on top of the leaves'.
    assert_eq!(
        b.real.ctx.get(&0x10),
        Some(&RealContext::Shadow {
            root: shadow,
            domain: 0x1005,
            read: true,
            write: false,
        })
    );
    assert_eq!(b.leaf(0x4000_0000) & 0x000f_ffff_ffff_f000, 0x5000);
    assert_eq!(b.leaf(0x4000_0000) & (AMD_R | AMD_W), AMD_R | AMD_W);
    // Identity (mode 0, both rights) and V clear: thinhv's domain for the
    // OS, nothing to set; the appliance's entry never touched.
    assert_eq!(b.real.ctx.get(&0x18), None);
    assert_eq!(b.real.ctx.get(&0x28), None);
    assert_eq!(b.real.ctx.get(&0x20), None);
    // V without TV names no DMA: blocked with what the OS never named.
    assert_eq!(b.real.unnamed_blocked, vec![0x08]);
    // A new mapping reaches the shadow at the OS's page invalidation, and
    // only that domain's IOTLB is invalidated.
    b.os.put(0x22000 + 8, 0x6001 | AMD_R | AMD_W);
    assert_eq!(b.leaf(0x4000_1000), 0, "not before the invalidation");
    b.command(real_cmds::cmd_invalidate_domain(5));
    assert_eq!(b.leaf(0x4000_1000) & 0x000f_ffff_ffff_f000, 0x6000);
    assert_eq!(b.real.scopes.last(), Some(&Some(vec![0x1005])));
    // The identity device blocked (TV cleared) and its entry invalidated:
    // its real entry blocks, and the unit forgets everything it cached.
    b.os.put(0x30000 + 0x18 * 32, DTE_V);
    b.command(real_cmds::cmd_invalidate_devtab(0x18));
    assert_eq!(b.real.ctx.get(&0x18), Some(&RealContext::Blocked));
    assert_eq!(b.real.scopes.last(), Some(&None));
    // And back to identity.
    b.os.put(0x30000 + 0x18 * 32, DTE_V | DTE_TV | AMD_R | AMD_W);
    b.command(real_cmds::cmd_invalidate_devtab(0x18));
    assert_eq!(b.real.ctx.get(&0x18), Some(&RealContext::Os));
    // The unit off: every device back on thinhv's domain for the OS.
    b.write(thinhv_passthrough::vamdvi::reg::CONTROL, 0);
    assert_eq!(b.real.ctx.get(&0x10), Some(&RealContext::Os));
    assert!(b.real.unnamed_blocked.is_empty());
}

#[test]
fn an_amdvi_fault_the_oss_tables_caused_is_logged_for_it_and_one_of_thinhvs_protection_is_not() {
    use thinhv_passthrough::vamdvi::{ctrl, reg};
    let mut b = amd_bed();
    b.enable();
    b.write(
        reg::CONTROL,
        ctrl::IOMMU_EN | ctrl::CMD_BUF_EN | ctrl::EVENT_LOG_EN | ctrl::EVENT_INT_EN,
    );
    let fault = |sid, addr, write| RealFault {
        unit: 0,
        sid,
        addr,
        write,
    };
    let mut unit = OsUnit::AmdVi(b.unit);
    // Not mapped in 00:02.0's tables: the OS's; its MSI is off, so no
    // interrupt yet.
    assert_eq!(
        unit.fault(fault(0x10, 0x4000_2000, false), &mut b.os),
        Some(None)
    );
    // A write its entry does not allow, to a page its tables map: the
    // OS's too (a present translation refused).
    let OsUnit::AmdVi(u) = &mut unit else {
        unreachable!()
    };
    u.msi = thinhv_passthrough::mediate::Msi {
        control: 1,
        addr: 0xfee0_0000,
        upper: 0,
        data: 0x41,
    };
    let ev = unit.fault(fault(0x10, 0x4000_0000, true), &mut b.os);
    assert_eq!(
        ev.flatten().map(|(e, _)| (e.addr, e.data)),
        Some((0xfee0_0000, 0x41))
    );
    // A read it allows: thinhv's protection refused it (its page, say);
    // not the OS's to hear of. V clear: untranslated, thinhv's alike.
    assert_eq!(unit.fault(fault(0x10, 0x4000_0000, false), &mut b.os), None);
    assert_eq!(unit.fault(fault(0x28, 0x9_0000, true), &mut b.os), None);
    assert_eq!(unit.status().faults, 2);
    // The OS's event log: IO_PAGE_FAULT for 00:02.0 in domain 5, the
    // second with PR (present) and RW (write).
    let e0 = u64::from_le_bytes(b.os.0[0x41000..0x41008].try_into().unwrap());
    let e1 = u64::from_le_bytes(b.os.0[0x41010..0x41018].try_into().unwrap());
    assert_eq!(e0 & 0xffff, 0x10);
    assert_eq!((e0 >> 60) & 0xf, 2);
    assert_eq!((e0 >> 32) & 0xffff, 5);
    assert_eq!((e1 >> (32 + 20)) & 3, 3, "PR and RW");
    let a0 = u64::from_le_bytes(b.os.0[0x41008..0x41010].try_into().unwrap());
    assert_eq!(a0, 0x4000_2000);
}

/// A real AMD-Vi device table of eight entries, with every store logged.
struct Dtes {
    e: Vec<[u64; 4]>,
    stores: Vec<(u16, usize, u64)>,
}

impl DeviceTable for Dtes {
    fn ids(&self) -> u32 {
        u32::try_from(self.e.len()).unwrap()
    }
    fn read(&self, id: u16, q: usize) -> u64 {
        self.e[usize::from(id)][q]
    }
    fn write(&mut self, id: u16, q: usize, value: u64) {
        self.e[usize::from(id)][q] = value;
        self.stores.push((id, q, value));
    }
}

#[test]
fn the_real_amdvi_entries_change_only_their_dma_half_and_blocking_spares_thinhvs_and_appliances() {
    use thinhv_passthrough::amdvi::{dte, dte_blocked};
    let open = dte(0x8_0000, 1);
    let t = RealDevTable {
        open_q0: open[0],
        open_domain: 1,
    };
    // 0, 3: the OS's (3 with thinhv's interrupt table); 1: hidden
    // (thinhv's closed entry, domain 2); 2: an appliance's (its tables,
    // domain 0x40); 4: the OS's, to be shadowed.
    let irq = [open[0], open[1], 0xabc0_0001, 0];
    let mut d = Dtes {
        e: vec![
            open,
            dte_blocked(2),
            dte(0x9_0000, 0x40),
            irq,
            open,
            open,
            open,
            open,
        ],
        stores: Vec::new(),
    };
    let shadow = RealContext::Shadow {
        root: 0x7_7000,
        domain: 0x1005,
        read: true,
        write: false,
    };
    assert!(t.set(&mut d, 4, shadow));
    assert_eq!(d.e[4][0], 0x7_7000 | 0b11 | (4 << 9) | (1 << 61));
    assert_eq!(d.e[4][1] & 0xffff, 0x1005);
    // Through a blocked entry: the unit never sees the new domain with
    // the old tables.
    assert_eq!(
        d.stores,
        vec![(4, 0, 0b11), (4, 1, d.e[4][1]), (4, 0, d.e[4][0])]
    );
    assert!(!t.set(&mut d, 8, shadow), "past the table");
    // The OS translates: what it never named is blocked, thinhv's closed
    // entry and the appliance's are not touched, the interrupt half
    // stays.
    let before = d.e.clone();
    t.set_unnamed(&mut d, true, &|id| id == 4 || id == 7);
    for id in [0, 3, 5, 6] {
        assert_eq!(d.e[id][0], RealDevTable::BLOCKED_Q0, "{id}");
        assert_eq!(d.e[id][1..], before[id][1..], "{id}");
    }
    for id in [1, 2, 4, 7] {
        assert_eq!(d.e[id], before[id], "{id}");
    }
    // Off: they get thinhv's domain for the OS again; the closed entry
    // (blocked too, but domain 2) stays closed.
    t.set_unnamed(&mut d, false, &|id| id == 4 || id == 7);
    assert_eq!(d.e, before);
    // The control: the same blocking without the domain check would
    // have opened the hidden function.
    let loose = RealDevTable {
        open_q0: open[0],
        open_domain: 2,
    };
    loose.set_unnamed(&mut d, false, &|_| false);
    assert_eq!(
        d.e[1][0], open[0],
        "a closed entry with the OS's domain ID opens"
    );
}
