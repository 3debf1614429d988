//! `thinhv vfio-probe`: a test tool for the guest where the OS has an
//! IOMMU of its own (issue 14). It gives QEMU's `edu` device to VFIO
//! (`vfio-pci`), maps pages of this process into the device's domain
//! through the VFIO type-1 API, and has the device copy by DMA: into a
//! mapped page (it lands), to the physical address of an unmapped page
//! (it must land nowhere), and into thinhv's memory mapped through
//! `/dev/mem` (the OS's own tables then name it; thinhv must refuse it).
//! Prints `key=value` lines; the host test decides. Root only.
use crate::cpuid::{cpuid, presence};
use crate::dma::{EDU_BUFFER, EduDma, PAGE, PATTERN, count, find_edu, pinned_pages};
use crate::report::read_page;
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::process::ExitCode;

/// `_IO(';', 100 + n)`.
const fn vfio_io(n: u64) -> u64 {
    (0x3b << 8) | (100 + n)
}
const GET_API_VERSION: u64 = vfio_io(0);
const CHECK_EXTENSION: u64 = vfio_io(1);
const SET_IOMMU: u64 = vfio_io(2);
const GROUP_GET_STATUS: u64 = vfio_io(3);
const GROUP_SET_CONTAINER: u64 = vfio_io(4);
const GROUP_GET_DEVICE_FD: u64 = vfio_io(6);
const DEVICE_GET_REGION_INFO: u64 = vfio_io(8);
const IOMMU_MAP_DMA: u64 = vfio_io(13);
const IOMMU_UNMAP_DMA: u64 = vfio_io(14);
/// VFIO_TYPE1v2_IOMMU.
const TYPE1V2: u64 = 3;
/// Regions of a PCI device: BAR0, configuration space.
const BAR0: u32 = 0;
const CONFIG: u32 = 7;

/// I/O addresses the probe maps.
const IOVA_SRC: u64 = 0x10_0000;
const IOVA_DST: u64 = 0x10_1000;
const IOVA_THINHV: u64 = 0x20_0000;

#[repr(C)]
#[derive(Default)]
struct GroupStatus {
    argsz: u32,
    flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct RegionInfo {
    argsz: u32,
    flags: u32,
    index: u32,
    cap_offset: u32,
    size: u64,
    offset: u64,
}

#[repr(C)]
struct DmaMap {
    argsz: u32,
    flags: u32,
    vaddr: u64,
    iova: u64,
    size: u64,
}

#[repr(C)]
struct DmaUnmap {
    argsz: u32,
    flags: u32,
    iova: u64,
    size: u64,
}

// `argsz` is the structure's size, as the kernel's UAPI lays it out.
const _: () = assert!(std::mem::size_of::<DmaUnmap>() == 24);
const _: () = assert!(std::mem::size_of::<RegionInfo>() == 32);
const _: () = assert!(std::mem::size_of::<DmaMap>() == 32);

fn ioctl<T>(f: &File, req: u64, arg: *mut T) -> std::io::Result<i32> {
    // SAFETY: `req` is a VFIO request whose argument is `T` (or an
    // integer passed as the pointer), valid for the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), req as _, arg) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn ioctl_value(f: &File, req: u64, value: u64) -> std::io::Result<i32> {
    ioctl(f, req, value as *mut u8)
}

/// The device, opened through VFIO, with its BAR0 and configuration
/// space offsets in the device file.
struct Device {
    fd: File,
    bar0: u64,
}

impl EduDma for Device {
    fn reg(&self, off: u64) -> u64 {
        let mut b = [0u8; 8];
        let _ = self.fd.read_at(&mut b, self.bar0 + off);
        u64::from_le_bytes(b)
    }
    fn set_reg(&self, off: u64, v: u64) {
        let _ = self.fd.write_at(&v.to_le_bytes(), self.bar0 + off);
    }
}

fn region(dev: &File, index: u32) -> Result<u64, String> {
    let mut r = RegionInfo {
        argsz: 32,
        index,
        ..RegionInfo::default()
    };
    ioctl(dev, DEVICE_GET_REGION_INFO, &raw mut r).map_err(|e| format!("region {index}: {e}"))?;
    Ok(r.offset)
}

fn map(container: &File, vaddr: u64, iova: u64) -> std::io::Result<i32> {
    let mut m = DmaMap {
        argsz: 32,
        flags: 3,
        vaddr,
        iova,
        size: PAGE as u64,
    };
    ioctl(container, IOMMU_MAP_DMA, &raw mut m)
}

/// `bdf` given to `vfio-pci`; its group and device opened in a type-1
/// container.
fn open(bdf: &str) -> Result<(File, File, Device), String> {
    let dir = format!("/sys/bus/pci/devices/{bdf}");
    if fs::read_link(format!("{dir}/driver")).is_ok() {
        fs::write(format!("{dir}/driver/unbind"), bdf).map_err(|e| format!("unbind: {e}"))?;
    }
    fs::write(format!("{dir}/driver_override"), "vfio-pci")
        .map_err(|e| format!("driver_override: {e}"))?;
    fs::write("/sys/bus/pci/drivers_probe", bdf).map_err(|e| format!("drivers_probe: {e}"))?;
    let group =
        fs::read_link(format!("{dir}/iommu_group")).map_err(|e| format!("no IOMMU group: {e}"))?;
    let group = group
        .file_name()
        .and_then(|g| g.to_str())
        .ok_or("group name")?
        .to_string();
    println!("vfio_group={group}");
    let rw = |p: &str| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .map_err(|e| format!("{p}: {e}"))
    };
    let container = rw("/dev/vfio/vfio")?;
    let g = rw(&format!("/dev/vfio/{group}"))?;
    println!(
        "vfio_api={}",
        ioctl_value(&container, GET_API_VERSION, 0).map_err(|e| e.to_string())?
    );
    if ioctl_value(&container, CHECK_EXTENSION, TYPE1V2).unwrap_or(0) != 1 {
        return Err("no type-1 v2 IOMMU".into());
    }
    let mut st = GroupStatus { argsz: 8, flags: 0 };
    ioctl(&g, GROUP_GET_STATUS, &raw mut st).map_err(|e| format!("group status: {e}"))?;
    if st.flags & 1 == 0 {
        return Err("group not viable".into());
    }
    let mut cfd = container.as_raw_fd();
    ioctl(&g, GROUP_SET_CONTAINER, &raw mut cfd).map_err(|e| format!("set container: {e}"))?;
    ioctl_value(&container, SET_IOMMU, TYPE1V2).map_err(|e| format!("set IOMMU: {e}"))?;
    let mut name = bdf.as_bytes().to_vec();
    name.push(0);
    let fd =
        ioctl(&g, GROUP_GET_DEVICE_FD, name.as_mut_ptr()).map_err(|e| format!("device fd: {e}"))?;
    // SAFETY: the kernel just returned this new descriptor, owned by no one
    // else.
    let dev: File = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
    let config = region(&dev, CONFIG)?;
    let bar0 = region(&dev, BAR0)?;
    // Memory space and bus mastering on.
    let mut cmd = [0u8; 2];
    dev.read_exact_at(&mut cmd, config + 4)
        .map_err(|e| e.to_string())?;
    let c = u16::from_le_bytes(cmd) | 0x6;
    dev.write_all_at(&c.to_le_bytes(), config + 4)
        .map_err(|e| e.to_string())?;
    Ok((container, g, Device { fd: dev, bar0 }))
}

/// `thinhv vfio-probe`.
pub fn run() -> ExitCode {
    let Some(bdf) = find_edu() else {
        println!("edu_found=0");
        return ExitCode::SUCCESS;
    };
    match probe(&bdf) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("vfio_error={e}");
            ExitCode::FAILURE
        }
    }
}

fn probe(bdf: &str) -> Result<(), String> {
    let p = presence();
    let (container, _group, dev) = open(bdf)?;
    let (pages, _) = pinned_pages().map_err(|e| format!("pages: {e}"))?;
    let (other, other_pa) = pinned_pages().map_err(|e| format!("pages: {e}"))?;
    // SAFETY: the pinned pages (left mapped: the process ends soon).
    let buf = unsafe { std::slice::from_raw_parts_mut(pages.as_ptr(), 2 * PAGE) };
    // SAFETY: as above.
    let victim = unsafe { std::slice::from_raw_parts_mut(other.as_ptr(), 2 * PAGE) };
    buf[..PAGE].fill(PATTERN);
    let base = pages.as_ptr() as u64;
    map(&container, base, IOVA_SRC).map_err(|e| format!("map: {e}"))?;
    map(&container, base + PAGE as u64, IOVA_DST).map_err(|e| format!("map: {e}"))?;
    // Where mapped: the page comes back.
    let ok = dev.dma(IOVA_SRC, EDU_BUFFER, false) && dev.dma(EDU_BUFFER, IOVA_DST, true);
    println!("vfio_dma_completed={}", u8::from(ok));
    println!("vfio_dma_bytes={}", count(&buf[PAGE..]));
    // Unmapped, the page is out of the domain at once (the OS's unmap
    // reached the real unit before it returned): the same DMA lands
    // nowhere.
    let mut u = DmaUnmap {
        argsz: 24,
        flags: 0,
        iova: IOVA_DST,
        size: PAGE as u64,
    };
    ioctl(&container, IOMMU_UNMAP_DMA, &raw mut u).map_err(|e| format!("unmap: {e}"))?;
    buf[PAGE..].fill(0);
    let ok = dev.dma(EDU_BUFFER, IOVA_DST, true);
    println!("vfio_after_unmap_completed={}", u8::from(ok));
    println!("vfio_after_unmap_bytes={}", count(&buf[PAGE..]));
    // Nowhere else: to the physical address of a page of this process
    // that the domain does not map (where the device's addresses were
    // physical ones, it would land there).
    let ok = dev.dma(EDU_BUFFER, other_pa[0], true);
    println!("vfio_unmapped_completed={}", u8::from(ok));
    println!("vfio_unmapped_bytes={}", count(&victim[..PAGE]));
    // thinhv's memory: a page of its image, mapped through /dev/mem into
    // the device's domain by the OS's own tables.
    if !p.is_thinhv() {
        println!("thinhv=absent");
        return Ok(());
    }
    let page = read_page(&p)?;
    let refused_before = page.iommus.first().map_or(0, |u| u.os_refused);
    let target = page.header.protected_base + 0x10000;
    let mem = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/mem")
        .map_err(|e| format!("/dev/mem: {e}"))?;
    // SAFETY: a shared mapping of one page of /dev/mem, never touched
    // through this process (only its address is given to VFIO).
    let m = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            mem.as_raw_fd(),
            i64::try_from(target).map_err(|e| e.to_string())?,
        )
    };
    if m == libc::MAP_FAILED {
        println!("vfio_thinhv_mmap={}", std::io::Error::last_os_error());
        return Ok(());
    }
    match map(&container, m as u64, IOVA_THINHV) {
        Ok(_) => println!("vfio_thinhv_map=ok"),
        Err(e) => {
            println!("vfio_thinhv_map={e}");
            return Ok(());
        }
    }
    println!("vfio_thinhv_target={target:#x}");
    let i0 = cpuid(thinhv_abi::cpuid::LEAF_INTEGRITY, 0);
    let ok = dev.dma(EDU_BUFFER, IOVA_THINHV, true);
    let i1 = cpuid(thinhv_abi::cpuid::LEAF_INTEGRITY, 0);
    println!("vfio_thinhv_completed={}", u8::from(ok));
    println!(
        "vfio_thinhv_crc_unchanged={}",
        u8::from(i0[1] == i1[1] && i1[0] == i1[1])
    );
    let page = read_page(&p)?;
    let refused_after = page.iommus.first().map_or(0, |u| u.os_refused);
    println!(
        "vfio_thinhv_refused={}",
        refused_after.saturating_sub(refused_before)
    );
    Ok(())
}
