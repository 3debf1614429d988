//! An NVMe PF that thinhv keeps, set up before the OS: its firmware
//! driver stopped, the function reset, an admin queue of the loader's, and
//! the virtualization management sequence of
//! [`thinhv_passthrough::nvme_virt`] run through it. Afterwards the
//! controller stays enabled (disabling it would take every secondary
//! controller offline) with bus mastering off: it fetches no command and
//! writes no memory from then on.
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::ptr::NonNull;
use thinhv_passthrough::nvme_virt::{self, Command, Failed, Primary, Provisioned};
use thinhv_passthrough::pci::{EcamRegion, Function};
use thinhv_passthrough::reset::FunctionConfig;
use thinhv_passthrough::shared_pf::Setup;
use uefi::boot::{self, AllocateType, MemoryType};

/// Admin queue entries.
const ENTRIES: u16 = 8;
/// Controller registers (NVM Express Base Specification 2.0 §3.1).
const REG_CAP: u64 = 0x00;
const REG_CC: u64 = 0x14;
const REG_CSTS: u64 = 0x1c;
const REG_AQA: u64 = 0x24;
const REG_ASQ: u64 = 0x28;
const REG_ACQ: u64 = 0x30;
const DOORBELLS: u64 = 0x1000;

/// The PF's admin queue, the loader's: three pages (submission queue,
/// completion queue, one data page).
struct Admin<'a> {
    regions: &'a [EcamRegion],
    pf: &'a Function,
    setup: &'a Setup,
    bar0: u64,
    pages: NonNull<u8>,
    tail: u16,
    head: u16,
    phase: bool,
    cid: u16,
    /// Doorbell stride in bytes.
    stride: u64,
    /// CAP.TO, in 500 ms units.
    timeout: u64,
}

impl Admin<'_> {
    fn read32(&self, reg: u64) -> u32 {
        // SAFETY: `bar0` is the PF's BAR 0 as the firmware assigned it
        // (identity-mapped MMIO while boot services run); its registers are
        // only read and written by this loader, the firmware's driver
        // stopped.
        unsafe { core::ptr::read_volatile((self.bar0 + reg) as *const u32) }
    }
    fn write32(&self, reg: u64, v: u32) {
        // SAFETY: as `read32`.
        unsafe { core::ptr::write_volatile((self.bar0 + reg) as *mut u32, v) }
    }
    fn page(&self, k: usize) -> *mut u8 {
        // SAFETY: `pages` spans three pages (`provision` allocates them).
        unsafe { self.pages.as_ptr().add(k * 4096) }
    }
    fn config(&self) -> super::pci::EcamFunction<'_> {
        super::pci::function(self.regions, self.pf.bdf)
    }

    /// Waits for CSTS.RDY to read `ready` (up to CAP.TO).
    fn wait_ready(&self, ready: bool) -> Result<(), String> {
        let ms = (self.timeout.max(1) * 500).min(30_000);
        for _ in 0..ms {
            let csts = self.read32(REG_CSTS);
            if csts == u32::MAX {
                return Err(String::from("its registers read all ones"));
            }
            if csts & 2 != 0 {
                return Err(String::from("Controller Fatal Status"));
            }
            if (csts & 1 != 0) == ready {
                return Ok(());
            }
            boot::stall(core::time::Duration::from_millis(1));
        }
        Err(format!(
            "CSTS.RDY did not become {} in {ms} ms",
            u8::from(ready)
        ))
    }

    /// The controller disabled, its admin queue the loader's pages, enabled
    /// again; memory space and bus mastering on.
    fn start(&mut self) -> Result<(), String> {
        let mut c = self.config();
        let cmd = c.read32(0x04) & 0xffff;
        c.write16(0x04, (cmd | 0x6) as u16);
        let cap = u64::from(self.read32(REG_CAP)) | u64::from(self.read32(REG_CAP + 4)) << 32;
        self.stride = 4 << ((cap >> 32) & 0xf);
        self.timeout = (cap >> 24) & 0xff;
        self.write32(REG_CC, 0);
        self.wait_ready(false)?;
        // SAFETY: the three pages are the loader's (`provision` allocates them).
        unsafe { core::ptr::write_bytes(self.pages.as_ptr(), 0, 3 * 4096) };
        let n = u32::from(ENTRIES - 1);
        self.write32(REG_AQA, n << 16 | n);
        let (sq, cq) = (self.page(0) as u64, self.page(1) as u64);
        self.write32(REG_ASQ, sq as u32);
        self.write32(REG_ASQ + 4, (sq >> 32) as u32);
        self.write32(REG_ACQ, cq as u32);
        self.write32(REG_ACQ + 4, (cq >> 32) as u32);
        // I/O queue entry sizes 64 and 16 bytes, 4 KiB pages, NVM command
        // set, enable.
        self.write32(REG_CC, 4 << 20 | 6 << 16 | 1);
        self.tail = 0;
        self.head = 0;
        self.phase = true;
        self.wait_ready(true)
    }
}

impl Primary for Admin<'_> {
    fn run(&mut self, cmd: Command, data: &mut [u8; 4096]) -> Result<u32, Failed> {
        self.cid = self.cid.wrapping_add(1);
        let page = self.page(2);
        // SAFETY: the data page is the loader's; the controller reads or
        // writes it only while this command runs.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), page, 4096) };
        let entry = cmd.entry(self.cid, page as u64);
        #[allow(clippy::cast_ptr_alignment)] // the pages are page-aligned (`allocate_pages`)
        let sq = self.page(0).cast::<u32>();
        for (i, w) in entry.iter().enumerate() {
            // SAFETY: entry `tail` of the submission queue page (8 entries
            // of 64 bytes).
            unsafe { core::ptr::write_volatile(sq.add(usize::from(self.tail) * 16 + i), *w) };
        }
        self.tail = (self.tail + 1) % ENTRIES;
        self.write32(DOORBELLS, u32::from(self.tail));
        #[allow(clippy::cast_ptr_alignment)] // as `sq`
        let cq = self.page(1).cast::<u32>().cast_const();
        for _ in 0..2000 {
            // SAFETY: entry `head` of the completion queue page (8 entries
            // of 16 bytes), which the controller writes.
            let dw0 = unsafe { core::ptr::read_volatile(cq.add(usize::from(self.head) * 4)) };
            // SAFETY: as above.
            let dw3 = unsafe { core::ptr::read_volatile(cq.add(usize::from(self.head) * 4 + 3)) };
            let (status, phase) = nvme_virt::completion_status(dw3);
            if phase == self.phase {
                self.head = (self.head + 1) % ENTRIES;
                if self.head == 0 {
                    self.phase = !self.phase;
                }
                self.write32(DOORBELLS + self.stride, u32::from(self.head));
                // SAFETY: as the copy in.
                unsafe { core::ptr::copy_nonoverlapping(page, data.as_mut_ptr(), 4096) };
                return if status == 0 {
                    Ok(dw0)
                } else {
                    Err(Failed(status))
                };
            }
            boot::stall(core::time::Duration::from_millis(1));
        }
        Err(Failed(0xffff))
    }

    fn reset_function(&mut self) -> Result<(), String> {
        let bars: Vec<thinhv_passthrough::reset::Bar> = self
            .pf
            .bars
            .iter()
            .filter(|b| b.base != 0 && b.kind != thinhv_passthrough::bars::BarKind::Io)
            .map(|b| thinhv_passthrough::reset::Bar {
                index: b.index,
                wide: b.kind == thinhv_passthrough::bars::BarKind::Mem64,
                base: b.base,
            })
            .collect();
        let mut c = self.config();
        let r = thinhv_passthrough::reset::reset(&mut c, &bars)
            .ok_or_else(|| String::from("it does not answer"))?;
        if r.method != thinhv_passthrough::reset::Method::Flr {
            return Err(format!("it cannot be reset by FLR ({r})"));
        }
        self.start()
    }

    fn enable_vfs(&mut self, num_vfs: u16) -> Result<(), String> {
        let mut setup = *self.setup;
        setup.num_vfs = num_vfs;
        let _ = super::pci::provision(self.regions, self.pf.bdf, &setup);
        if super::pci::holds(self.regions, self.pf.bdf, &setup) {
            Ok(())
        } else {
            Err(format!("VF Enable with NumVFs {num_vfs} did not take"))
        }
    }
}

/// Sets up PF `pf`'s secondary controllers `wants` (VF, namespace) with
/// its SR-IOV capability as `setup`: the firmware's driver stopped
/// (`disconnect`), the function reset by FLR, the loader's admin queue,
/// [`nvme_virt::provision`]; then bus mastering off, the controller left
/// enabled.
pub fn provision(
    regions: &[EcamRegion],
    pf: &Function,
    setup: &Setup,
    wants: &[(u16, u32)],
    disconnect: impl FnOnce(),
) -> Result<Vec<Provisioned>, String> {
    let bar0 = pf
        .bars
        .iter()
        .find(|b| b.index == 0 && b.base != 0)
        .ok_or_else(|| format!("{}: its BAR 0 has no address", pf.bdf))?
        .base;
    disconnect();
    let pages = boot::allocate_pages(AllocateType::AnyPages, MemoryType::LOADER_DATA, 3)
        .map_err(|e| format!("no memory for its admin queue: {:?}", e.status()))?;
    let mut p = Admin {
        regions,
        pf,
        setup,
        bar0,
        pages,
        tail: 0,
        head: 0,
        phase: true,
        cid: 0,
        stride: 4,
        timeout: 1,
    };
    let num_vfs = wants.iter().map(|w| w.0).fold(setup.num_vfs, u16::max);
    let out = p
        .reset_function()
        .and_then(|()| nvme_virt::provision(&mut p, wants, num_vfs));
    // Bus mastering off: the controller neither fetches commands nor
    // writes the pages, which go back to the firmware.
    let mut c = p.config();
    let cmd = c.read32(0x04) & 0xffff;
    c.write16(0x04, (cmd & !0x4) as u16);
    // SAFETY: allocated above; the controller cannot reach them any more.
    let _ = unsafe { boot::free_pages(pages, 3) };
    out.map_err(|e| format!("{}: {e}", pf.bdf))
}
