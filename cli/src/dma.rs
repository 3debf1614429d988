//! `thinhv dma-probe`: a test tool for the guest. It drives QEMU's `edu`
//! device (1234:11e8) from user space — BAR0 mapped through sysfs
//! `resource0`, bus mastering switched on through sysfs `config` — to copy
//! a page by DMA into ordinary memory and into thinhv's region, and prints
//! `key=value` lines with what happened (the host test decides). Root only;
//! meaningful only under thinhv with an IOMMU, on a machine with `edu`.
use crate::cpuid::{cpuid, presence};
use crate::devmem;
use crate::report::read_page;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::process::ExitCode;
use std::ptr::NonNull;

pub(crate) const EDU_BUFFER: u64 = 0x40000;
pub(crate) const PATTERN: u8 = 0x5a;
pub(crate) const PAGE: usize = 4096;

pub(crate) fn find_edu() -> Option<String> {
    for e in fs::read_dir("/sys/bus/pci/devices").ok()?.flatten() {
        let p = e.path();
        let id = |f: &str| fs::read_to_string(p.join(f)).unwrap_or_default();
        if id("vendor").trim() == "0x1234" && id("device").trim() == "0x11e8" {
            return Some(e.file_name().to_string_lossy().into_owned());
        }
    }
    None
}

/// A shared mapping of BAR0.
struct Bar {
    base: NonNull<u8>,
    len: usize,
}

// The mapping is page-aligned and every register offset is aligned to its
// size, so the narrower-to-wider pointer casts below are aligned.
#[allow(clippy::cast_ptr_alignment)]
impl Bar {
    fn open(bdf: &str) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/sys/bus/pci/devices/{bdf}/resource0"))?;
        let len = usize::try_from(f.metadata()?.len()).unwrap_or(0).max(PAGE);
        // SAFETY: mapping the device's BAR file shared; the kernel checks
        // the length; the mapping outlives every access (dropped last).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            base: NonNull::new(p.cast()).ok_or_else(std::io::Error::last_os_error)?,
            len,
        })
    }
    fn r32(&self, off: usize) -> u32 {
        assert!(off + 4 <= self.len);
        // SAFETY: inside the mapped BAR, 4-byte aligned register.
        unsafe { self.base.as_ptr().add(off).cast::<u32>().read_volatile() }
    }
    fn w32(&self, off: usize, v: u32) {
        assert!(off + 4 <= self.len);
        // SAFETY: as in `r32`.
        unsafe { self.base.as_ptr().add(off).cast::<u32>().write_volatile(v) }
    }
    fn r64(&self, off: usize) -> u64 {
        assert!(off + 8 <= self.len);
        // SAFETY: as in `r32`, 8-byte register.
        unsafe { self.base.as_ptr().add(off).cast::<u64>().read_volatile() }
    }
    fn w64(&self, off: usize, v: u64) {
        assert!(off + 8 <= self.len);
        // SAFETY: as in `r64`.
        unsafe { self.base.as_ptr().add(off).cast::<u64>().write_volatile(v) }
    }
}

/// edu's DMA registers, however they are reached (BAR0 mapped, or VFIO's
/// device file).
pub(crate) trait EduDma {
    /// The 64-bit register at `off`.
    fn reg(&self, off: u64) -> u64;
    /// Writes the 64-bit register at `off`.
    fn set_reg(&self, off: u64, v: u64);
    /// edu copies a page, `to_ram` from its buffer at `dst`, else from
    /// `src` into its buffer; whether it completed within 2 s.
    fn dma(&self, src: u64, dst: u64, to_ram: bool) -> bool {
        self.set_reg(0x80, src);
        self.set_reg(0x88, dst);
        self.set_reg(0x90, PAGE as u64);
        self.set_reg(0x98, 1 | if to_ram { 2 } else { 0 });
        for _ in 0..2000 {
            if self.reg(0x98) & 1 == 0 {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        false
    }
}

impl EduDma for Bar {
    fn reg(&self, off: u64) -> u64 {
        self.r64(usize::try_from(off).unwrap_or(usize::MAX))
    }
    fn set_reg(&self, off: u64, v: u64) {
        self.w64(usize::try_from(off).unwrap_or(usize::MAX), v);
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// Two locked pages and their physical addresses (`/proc/self/pagemap`).
pub(crate) fn pinned_pages() -> std::io::Result<(NonNull<u8>, [u64; 2])> {
    // SAFETY: an anonymous private mapping of two pages.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            2 * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_LOCKED,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let base = NonNull::new(p.cast::<u8>()).ok_or_else(std::io::Error::last_os_error)?;
    // SAFETY: the two pages just mapped; touching them makes them present.
    unsafe { std::ptr::write_bytes(base.as_ptr(), 0, 2 * PAGE) };
    let pm = fs::File::open("/proc/self/pagemap")?;
    let mut pa = [0u64; 2];
    for (i, slot) in pa.iter_mut().enumerate() {
        let va = base.as_ptr() as u64 + (i * PAGE) as u64;
        let mut e = [0u8; 8];
        pm.read_exact_at(&mut e, va / PAGE as u64 * 8)?;
        let v = u64::from_le_bytes(e);
        if v >> 63 == 0 || v & ((1 << 55) - 1) == 0 {
            return Err(std::io::Error::other("page not present or PFN hidden"));
        }
        *slot = (v & ((1 << 55) - 1)) * PAGE as u64;
    }
    Ok((base, pa))
}

pub(crate) fn count(b: &[u8]) -> usize {
    b.iter().filter(|&&x| x == PATTERN).count()
}

/// `bdf`'s configuration space through sysfs `config`, read and write.
fn open_config(bdf: &str) -> Result<fs::File, String> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/sys/bus/pci/devices/{bdf}/config"))
        .map_err(|e| e.to_string())
}

/// Memory space and bus mastering on for `bdf` (through sysfs `config`),
/// its BAR0 mapped, and the control: a page of this process copied into
/// the device and back into another page by DMA (`dma_completed`,
/// `dma_ordinary_bytes` of 4096 when it landed).
fn edu_ready(bdf: &str) -> Result<Bar, String> {
    let cfg = open_config(bdf)?;
    let mut cmd = [0u8; 2];
    cfg.read_exact_at(&mut cmd, 4).map_err(|e| e.to_string())?;
    let c = u16::from_le_bytes(cmd) | 0x6;
    cfg.write_all_at(&c.to_le_bytes(), 4)
        .map_err(|e| e.to_string())?;
    let bar = Bar::open(bdf).map_err(|e| format!("resource0: {e}"))?;
    println!("edu_ident={:#x}", bar.r32(0));
    let (pages, pa) = pinned_pages().map_err(|e| format!("pages: {e}"))?;
    // SAFETY: the two pinned pages (left mapped: the process ends soon).
    let buf = unsafe { std::slice::from_raw_parts_mut(pages.as_ptr(), 2 * PAGE) };
    buf[..PAGE].fill(PATTERN);
    let ok = bar.dma(pa[0], EDU_BUFFER, false) && bar.dma(EDU_BUFFER, pa[1], true);
    println!("dma_completed={}", u8::from(ok));
    println!("dma_ordinary_bytes={}", count(&buf[PAGE..]));
    Ok(bar)
}

/// `thinhv dma-probe --to ADDR...`: after the control round trip, the
/// device writes its page of the pattern at each bus address `ADDR` (hex)
/// and reports whether the DMA completed (`dma_to_ADDR_completed`).
/// Whether it landed, or was refused and counted, is for the caller to
/// see (the IOMMU's fault count on the status page, the target's memory).
/// Needs no thinhv: an appliance runs it as well as the OS.
fn run_to(bdf: &str, addrs: &[String]) -> Result<ExitCode, String> {
    let bar = edu_ready(bdf)?;
    for a in addrs {
        let to =
            u64::from_str_radix(a.trim_start_matches("0x"), 16).map_err(|e| format!("{a}: {e}"))?;
        let ok = bar.dma(EDU_BUFFER, to, true);
        println!("dma_to_{to:#x}_completed={}", u8::from(ok));
    }
    Ok(ExitCode::SUCCESS)
}

/// `thinhv dma-probe --raise ADDR DATA [N]`: programs the edu's MSI
/// capability through sysfs `config` (message address `ADDR`, data
/// `DATA`, both hex; MSI enabled, memory space and bus mastering on) and
/// raises its interrupt `N` times (default 3), 20 ms apart, acknowledging
/// each. Prints what the capability reads back (`msi_readback=ADDR/DATA`)
/// and `msi_raised=N`. Whether the messages were delivered, and where, is
/// for the target to see; no driver of the kernel's owns the vector.
fn run_raise(bdf: &str, args: &[String]) -> Result<ExitCode, String> {
    let hex = |a: &str| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok();
    let (Some(addr), Some(data)) = (
        args.first().and_then(|a| hex(a)),
        args.get(1)
            .and_then(|a| hex(a))
            .and_then(|d| u16::try_from(d).ok()),
    ) else {
        return Err("usage: thinhv dma-probe --raise ADDR DATA [N]".into());
    };
    let times: u32 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(3);
    let cfg = open_config(bdf)?;
    let mut space = [0u8; 256];
    cfg.read_exact_at(&mut space, 0)
        .map_err(|e| e.to_string())?;
    let mut at = usize::from(space[0x34] & 0xfc);
    let mut found = None;
    for _ in 0..48 {
        if at < 0x40 {
            break;
        }
        if space[at] == 0x05 {
            found = Some(at);
            break;
        }
        at = usize::from(space[at + 1] & 0xfc);
    }
    let cap = found.ok_or("no MSI capability")?;
    let wide = space[cap + 2] & 0x80 != 0;
    let data_at = cap + if wide { 0xc } else { 8 };
    let put = |bytes: &[u8], off: usize| {
        cfg.write_all_at(bytes, off as u64)
            .map_err(|e| format!("config {off:#x}: {e}"))
    };
    put(&((addr & 0xffff_ffff) as u32).to_le_bytes(), cap + 4)?;
    if wide {
        put(&((addr >> 32) as u32).to_le_bytes(), cap + 8)?;
    }
    put(&data.to_le_bytes(), data_at)?;
    let control = u16::from_le_bytes([space[cap + 2], space[cap + 3]]) | 1;
    put(&control.to_le_bytes(), cap + 2)?;
    let command = u16::from_le_bytes([space[4], space[5]]) | 0x6;
    put(&command.to_le_bytes(), 4)?;
    cfg.read_exact_at(&mut space, 0)
        .map_err(|e| e.to_string())?;
    let lo = u32::from_le_bytes(space[cap + 4..cap + 8].try_into().unwrap_or_default());
    let hi = if wide {
        u32::from_le_bytes(space[cap + 8..cap + 12].try_into().unwrap_or_default())
    } else {
        0
    };
    let d = u16::from_le_bytes([space[data_at], space[data_at + 1]]);
    println!(
        "msi_readback={:#x}/{d:#x}",
        u64::from(hi) << 32 | u64::from(lo)
    );
    let bar = Bar::open(bdf).map_err(|e| format!("resource0: {e}"))?;
    for _ in 0..times {
        bar.w32(0x60, 1);
        std::thread::sleep(std::time::Duration::from_millis(20));
        bar.w32(0x64, 1);
    }
    println!("msi_raised={times}");
    Ok(ExitCode::SUCCESS)
}

/// `thinhv dma-probe [--to ADDR... | --raise ADDR DATA [N]]`.
pub fn run(args: &[String]) -> ExitCode {
    let Some(bdf) = find_edu() else {
        println!("edu_found=0");
        return ExitCode::SUCCESS;
    };
    println!("edu_found=1");
    println!("edu_bdf={bdf}");
    let r = if args.first().is_some_and(|a| a == "--to") {
        run_to(&bdf, &args[1..])
    } else if args.first().is_some_and(|a| a == "--raise") {
        run_raise(&bdf, &args[1..])
    } else {
        into_thinhv(&bdf)
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            println!("dma_probe_error={e}");
            ExitCode::FAILURE
        }
    }
}

/// The default probe: DMA into thinhv's status area and its image, and
/// the IOMMU's fault counts after (`NOT_PRESENT` without thinhv).
fn into_thinhv(bdf: &str) -> Result<ExitCode, String> {
    let p = presence();
    if !p.is_thinhv() {
        println!("thinhv=absent");
        return Ok(ExitCode::from(crate::NOT_PRESENT));
    }
    let bar = edu_ready(bdf)?;

    // thinhv's status area: its last page, read back through /dev/mem.
    let page = read_page(&p)?;
    let last = p.status_page + u64::from(p.status_size) - PAGE as u64;
    let before = devmem::read(last, PAGE).map_err(|e| e.to_string())?;
    let ok = bar.dma(EDU_BUFFER, last, true);
    let after = devmem::read(last, PAGE).map_err(|e| e.to_string())?;
    println!("dma_status_completed={}", u8::from(ok));
    println!(
        "dma_into_status_bytes={}",
        count(&after).saturating_sub(count(&before))
    );
    let translating = page
        .iommus
        .iter()
        .any(|u| u.state == thinhv_abi::status::IOMMU_STATE_TRANSLATING);
    if translating {
        // The core's image: its CRC says whether anything landed.
        let target = page.header.protected_base + 0x10000;
        let i0 = cpuid(thinhv_abi::cpuid::LEAF_INTEGRITY, 0);
        let ok = bar.dma(EDU_BUFFER, target, true);
        let i1 = cpuid(thinhv_abi::cpuid::LEAF_INTEGRITY, 0);
        println!("dma_core_completed={}", u8::from(ok));
        println!("dma_core_target={target:#x}");
        println!(
            "dma_core_crc_unchanged={}",
            u8::from(i0[1] == i1[1] && i1[0] == i1[1])
        );
    } else {
        println!("dma_core_skipped=1");
    }
    // Reading thinhv's CPUID leaves makes it collect the faults.
    let _ = cpuid(thinhv_abi::cpuid::LEAF_SIGNATURE, 0);
    let page = read_page(&p)?;
    if let Some(u) = page.iommus.first() {
        println!("iommu_state={}", u.state);
        println!("iommu_faults={}", u.faults);
        println!(
            "iommu_last_fault_source={:02x}:{:02x}.{}",
            u.last_fault_source >> 8,
            (u.last_fault_source >> 3) & 0x1f,
            u.last_fault_source & 7
        );
        println!("iommu_last_fault_address={:#x}", u.last_fault_address);
    }
    Ok(ExitCode::SUCCESS)
}
