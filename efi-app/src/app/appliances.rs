//! Appliance partitions at boot: which tables are honoured
//! (`thinhv_efi::appliances`), their RAM reserved from the OS, their
//! processors taken out of the OS's MADT, and the ExitBootServices hook
//! after which they claim their processors (`docs/appliances.md`).
use super::acpi_tables::rsdp_address;
use super::hypercall::vmmcall;
use alloc::string::String;
use alloc::vec::Vec;
use core::ffi::c_void;
use core::sync::atomic::{AtomicUsize, Ordering};
use thinhv_abi::PhysRange;
use thinhv_abi::hypercall::{Function, Status};
use thinhv_config::Config;
use thinhv_efi::appliance_image::{self, Entry};
use thinhv_efi::appliances::{Cpu, Decision, decide};
use thinhv_passthrough::shared_pf::Setup;
use uefi::boot::{self, AllocateType, MemoryType};
use uefi::println;

/// One appliance the machine can run.
#[derive(Clone, Debug)]
pub struct Accepted {
    /// Index of its `[[appliance]]` table.
    pub index: usize,
    /// Its processors.
    pub apic_ids: Vec<u32>,
    /// Its RAM (2 MiB aligned, reserved from the OS).
    pub ram: PhysRange,
    /// How its first processor starts.
    pub entry: Entry,
    /// The copy of its image a restart puts back (reserved, hidden).
    pub image: PhysRange,
    /// Where each piece of `image` goes.
    pub pieces: Vec<PhysRange>,
    /// The PCI functions it is given.
    pub devices: Vec<thinhv_efi::appliances::AssignedDevice>,
}

const ALIGN: u64 = 2 << 20;

/// Decides every table and reserves the RAM of those accepted; prints why
/// any other is left out.
///
/// VFs the tables name (`vf:<PF>#<n>`) are enabled here, before the OS:
/// the PFs whose VFs an accepted appliance has are returned with their
/// setup and those VFs; a PF whose VFs no accepted appliance kept is put
/// back as the firmware left it.
#[allow(clippy::too_many_arguments)]
pub fn prepare(
    config: &Config,
    cpus: &[Cpu],
    ram_bytes: u64,
    functions: &[thinhv_passthrough::pci::Function],
    boot_device: Option<thinhv_passthrough::pci::Bdf>,
    addr_limit: u64,
    regions: &[thinhv_passthrough::pci::EcamRegion],
    budgets: &[thinhv_passthrough::policy::SriovRule],
    root_bus: u8,
) -> (Vec<Accepted>, Vec<SharedPf>) {
    let mut out: Vec<Accepted> = Vec::new();
    let mut shared: Vec<SharedPf> = Vec::new();
    let mut touched: Vec<&thinhv_passthrough::pci::Function> = Vec::new();
    for (i, d) in decide(&config.appliance, cpus, ram_bytes)
        .into_iter()
        .enumerate()
    {
        let a = &config.appliance[i];
        let taken: Vec<_> = out
            .iter()
            .flat_map(|o| o.devices.iter().map(|d| d.bdf))
            .collect();
        match d {
            Decision::Refused(why) => {
                println!(
                    "thinhv: {} left out: {why}; the OS boots without it",
                    a.label()
                );
            }
            Decision::Accepted { apic_ids } => match enable_vfs(
                a,
                &config.appliance,
                root_bus,
                functions,
                &taken,
                regions,
                budgets,
                &shared,
                &mut touched,
            )
            .and_then(|vfs| {
                thinhv_efi::appliances::assign_devices(
                    &a.devices,
                    functions,
                    &vfs.iter().map(|(v, _)| v.clone()).collect::<Vec<_>>(),
                    &taken,
                    boot_device,
                    addr_limit,
                )
                .map(|devices| (devices, vfs))
            })
            .and_then(|(devices, vfs)| load(a, &apic_ids, &devices).map(|l| (l, devices, vfs)))
            {
                Ok(((ram, entry, image, pieces), devices, vfs)) => {
                    for (v, setup) in vfs {
                        match shared.iter_mut().find(|s| s.pf == v.pf) {
                            Some(s) => {
                                s.setup = setup;
                                s.vfs.push(v.function);
                            }
                            None => shared.push(SharedPf {
                                nvme: functions.iter().any(|f| f.bdf == v.pf && f.is_nvme()),
                                pf: v.pf,
                                setup,
                                devctl: devctl_of(functions, v.pf),
                                vfs: alloc::vec![v.function],
                            }),
                        }
                    }
                    for d in &devices {
                        println!(
                            "thinhv: appliance {:?}: PCI function {} as its 00:{:02x}.0",
                            a.name,
                            d.bdf,
                            d.vdevfn >> 3
                        );
                    }
                    println!(
                        "thinhv: appliance {:?}: APIC IDs {:?}, {} MiB at {:#x}",
                        a.name, apic_ids, a.memory, ram.base
                    );
                    out.push(Accepted {
                        index: i,
                        apic_ids,
                        ram,
                        entry,
                        image,
                        pieces,
                        devices,
                    });
                }
                Err(why) => {
                    println!(
                        "thinhv: {} left out: {why}; the OS boots without it",
                        a.label()
                    );
                }
            },
        }
    }
    // A PF the loader enabled VFs of for an appliance left out: as the
    // firmware left it (or as the appliances it kept need it).
    for pf in touched {
        match shared.iter().find(|s| s.pf == pf.bdf) {
            Some(s) if !super::pci::holds(regions, pf.bdf, &s.setup) => {
                let _ = super::pci::provision(regions, pf.bdf, &s.setup);
            }
            Some(_) => {}
            None => super::pci::restore_sriov(regions, pf),
        }
    }
    (out, shared)
}

/// A PF whose VFs the OS shares with appliances.
pub struct SharedPf {
    /// An NVMe PF, which thinhv keeps (the OS gets its VF 1 in its place).
    pub nvme: bool,
    /// The PF.
    pub pf: thinhv_passthrough::pci::Bdf,
    /// What the loader wrote into its SR-IOV capability.
    pub setup: Setup,
    /// Offset of its Device Control register (0: none).
    pub devctl: u16,
    /// The appliances' VFs of it.
    pub vfs: Vec<thinhv_passthrough::pci::Function>,
}

/// Offset of the Device Control register of function `bdf` (0: not PCI
/// Express).
fn devctl_of(
    functions: &[thinhv_passthrough::pci::Function],
    bdf: thinhv_passthrough::pci::Bdf,
) -> u16 {
    functions
        .iter()
        .find(|f| f.bdf == bdf)
        .and_then(|f| {
            f.caps
                .iter()
                .find(|c| c.0 == thinhv_passthrough::pci::CAP_ID_PCIE)
        })
        .map_or(0, |c| c.1 + 8)
}

/// Enables the VFs appliance table `a` names, each on top of what earlier
/// appliances' VFs of the same PF need (`shared`), and returns them; the
/// PFs written are added to `touched`.
#[allow(clippy::too_many_arguments)]
fn enable_vfs<'f>(
    a: &thinhv_config::Appliance,
    all: &[thinhv_config::Appliance],
    root_bus: u8,
    functions: &'f [thinhv_passthrough::pci::Function],
    taken: &[thinhv_passthrough::pci::Bdf],
    regions: &[thinhv_passthrough::pci::EcamRegion],
    budgets: &[thinhv_passthrough::policy::SriovRule],
    shared: &[SharedPf],
    touched: &mut Vec<&'f thinhv_passthrough::pci::Function>,
) -> Result<Vec<(thinhv_efi::appliances::EnabledVf, Setup)>, String> {
    let mut out: Vec<(thinhv_efi::appliances::EnabledVf, Setup)> = Vec::new();
    for d in &a.devices {
        let Some((pf, index)) = thinhv_config::appliance::vf_entry(d) else {
            continue;
        };
        let (pf, os_vfs) = thinhv_efi::appliances::vf_pf(pf, index, functions, budgets, taken)
            .map_err(|e| alloc::format!("device \"{d}\": {e}"))?;
        let before = shared
            .iter()
            .find(|s| s.pf == pf.bdf)
            .map(|s| s.setup.num_vfs)
            .into_iter()
            .chain(
                out.iter()
                    .filter(|(v, _)| v.pf == pf.bdf)
                    .map(|(_, s)| s.num_vfs),
            );
        let mut num_vfs = before.fold(index, u16::max);
        // An NVMe PF's secondary controllers are set up once, for every
        // appliance that names one (and the OS's VF 1).
        let nvme_wants = pf
            .is_nvme()
            .then(|| nvme_wants(all, functions, budgets, pf, os_vfs));
        let first_nvme = pf.is_nvme()
            && !shared.iter().any(|s| s.pf == pf.bdf)
            && !out.iter().any(|(v, _)| v.pf == pf.bdf);
        if let Some(w) = &nvme_wants {
            num_vfs = w.iter().map(|w| w.0).fold(num_vfs, u16::max);
        }
        let setup = thinhv_passthrough::shared_pf::setup_for(pf, os_vfs, num_vfs)
            .ok_or_else(|| alloc::format!("device \"{d}\": {} has no SR-IOV", pf.bdf))?;
        if !touched.iter().any(|t| t.bdf == pf.bdf) {
            touched.push(pf);
        }
        let khz = tsc_khz();
        // SAFETY: RDTSC has no side effects.
        let t0 = unsafe { core::arch::x86_64::_rdtsc() };
        let vf = if let Some(wants) = nvme_wants {
            if first_nvme {
                let done = super::nvme::provision(regions, pf, &setup, &wants, || {
                    super::pci::disconnect_firmware_drivers(functions, root_bus, pf.bdf);
                })
                .map_err(|e| alloc::format!("device \"{d}\": {e}"))?;
                for p in done {
                    println!(
                        "thinhv: NVMe {}: VF {} is secondary controller {:#x} with namespace {}, {} queues and {} interrupts, online",
                        pf.bdf, p.vfn, p.scid, p.nsid, p.nvq, p.nvi
                    );
                }
            }
            super::pci::vf_of(regions, pf, &setup, index)
        } else {
            super::pci::enable_vf(regions, pf, &setup, index)
        }
        .map_err(|e| alloc::format!("device \"{d}\": {e}"))?;
        // SAFETY: as above.
        let ms = unsafe { core::arch::x86_64::_rdtsc() }.wrapping_sub(t0) / khz;
        println!(
            "thinhv: appliance {:?}: VF {index} of {} enabled at {} (NumVFs {num_vfs}, the OS's budget {os_vfs}) in {ms} ms",
            a.name, pf.bdf, vf.bdf
        );
        // Earlier VFs of the same PF now hold the larger setup.
        for (_, s) in out.iter_mut().filter(|(v, _)| v.pf == pf.bdf) {
            *s = setup;
        }
        out.push((
            thinhv_efi::appliances::EnabledVf {
                entry: d.clone(),
                function: vf,
                pf: pf.bdf,
            },
            setup,
        ));
    }
    Ok(out)
}

/// The secondary controllers of NVMe PF `pf` to set up (VF, namespace):
/// VF 1 for the OS when its budget is 1, and every VF an appliance table
/// names; VF `k` gets namespace `k` (`docs/appliances.md`).
fn nvme_wants(
    all: &[thinhv_config::Appliance],
    functions: &[thinhv_passthrough::pci::Function],
    budgets: &[thinhv_passthrough::policy::SriovRule],
    pf: &thinhv_passthrough::pci::Function,
    os_vfs: u16,
) -> Vec<(u16, u32)> {
    let mut vfs: Vec<u16> = (1..=os_vfs).collect();
    for a in all {
        for d in &a.devices {
            if let Some((name, index)) = thinhv_config::appliance::vf_entry(d)
                && thinhv_efi::appliances::vf_pf(name, index, functions, budgets, &[])
                    .is_ok_and(|(f, _)| f.bdf == pf.bdf)
                && !vfs.contains(&index)
            {
                vfs.push(index);
            }
        }
    }
    vfs.into_iter().map(|v| (v, u32::from(v))).collect()
}

/// Reads the appliance's files, lays its RAM out, reserves the RAM and
/// fills it (everything else zero).
fn load(
    a: &thinhv_config::Appliance,
    apic_ids: &[u32],
    devices: &[thinhv_efi::appliances::AssignedDevice],
) -> Result<(PhysRange, Entry, PhysRange, Vec<PhysRange>), String> {
    let kernel =
        super::config_file::read_esp(&a.kernel).map_err(|e| alloc::format!("kernel {e}"))?;
    let initrd = match &a.initrd {
        Some(p) => Some(super::config_file::read_esp(p).map_err(|e| alloc::format!("initrd {e}"))?),
        None => None,
    };
    // `noapic`: its platform has no I/O APIC, and Linux must know it
    // before it decides on x2APIC (`starts_in_x2apic`).
    let cmdline = alloc::format!(
        "{} tsc_early_khz={}{}",
        a.cmdline,
        tsc_khz(),
        if starts_in_x2apic(a) { " noapic" } else { "" }
    );
    let img = appliance_image::build(&appliance_image::Spec {
        kernel: &kernel,
        initrd: initrd.as_deref(),
        cmdline: cmdline.trim_start(),
        ram: a.memory_bytes(),
        apic_ids,
        console_port: match a.console {
            thinhv_config::Console::Log => appliance_image::CONSOLE_PORT,
            thinhv_config::Console::Port(port) => port,
        },
        pci_windows: &devices
            .iter()
            .flat_map(|d| d.bars.iter().map(|&(_, _, base, size)| (base, size)))
            .collect::<Vec<_>>(),
    })
    .map_err(|e| alloc::format!("kernel {}: {e}", a.kernel))?;
    if img.pieces.len() > thinhv_abi::handoff::MAX_IMAGE_PIECES {
        return Err(String::from("internal: too many image pieces"));
    }
    let total: u64 = img.pieces.iter().map(|(_, b)| b.len() as u64).sum();
    let image = reserve(total.div_ceil(4096) * 4096)?;
    let ram = match reserve(a.memory_bytes()) {
        Ok(r) => r,
        Err(e) => {
            free_range(image);
            return Err(e);
        }
    };
    // SAFETY: `image` was just reserved, identity-mapped, used by nothing.
    let copy =
        unsafe { core::slice::from_raw_parts_mut(image.base as *mut u8, image.size as usize) };
    let mut at = 0usize;
    let mut pieces = Vec::new();
    for (gpa, piece) in &img.pieces {
        copy[at..at + piece.len()].copy_from_slice(piece);
        at += piece.len();
        pieces.push(PhysRange::new(*gpa, piece.len() as u64));
    }
    // SAFETY: `ram` was just reserved for this appliance, identity-mapped,
    // and nothing else uses it.
    let bytes = unsafe { core::slice::from_raw_parts_mut(ram.base as *mut u8, ram.size as usize) };
    bytes.fill(0);
    for (gpa, piece) in &img.pieces {
        let Some(at) =
            thinhv_abi::handoff::appliance_ram_offset(ram.size, *gpa, piece.len() as u64)
        else {
            free_range(ram);
            free_range(image);
            return Err(String::from("internal: an image piece outside its RAM"));
        };
        let at = at as usize;
        bytes[at..at + piece.len()].copy_from_slice(piece);
    }
    log::info!(
        "appliance {:?}: kernel at {:#x}, initrd at {:#x}+{:#x}, command line {cmdline:?}",
        a.name,
        img.kernel_at,
        img.initrd_at.0,
        img.initrd_at.1
    );
    Ok((ram, img.entry, image, pieces))
}

fn free_range(r: PhysRange) {
    if let Some(p) = core::ptr::NonNull::new(r.base as *mut u8) {
        // SAFETY: reserved by `reserve`, used by nothing while thinhv is
        // not running.
        let _ = unsafe { boot::free_pages(p, (r.size / 4096) as usize) };
    }
}

/// Whether the appliance's processors start in x2APIC mode: its table
/// asks for it (the default) and the processor has it. Linux keeps a mode
/// the platform handed over only when it skips interrupt remapping, which
/// it does without I/O APIC support (`noapic`): otherwise, with no
/// remapping unit and no hypervisor it knows, it switches back to xAPIC
/// (`try_to_enable_x2apic`; `docs/appliances.md`).
pub fn starts_in_x2apic(a: &thinhv_config::Appliance) -> bool {
    a.apic == thinhv_config::ApicMode::X2apic && super::platform::cpuid(1, 0)[2] & (1 << 21) != 0
}

/// The TSC frequency in kHz, measured against the firmware's Stall (the
/// appliance's kernel is told it: it has no PIT or HPET to calibrate
/// against).
pub fn tsc_khz() -> u64 {
    static KHZ: AtomicUsize = AtomicUsize::new(0);
    let known = KHZ.load(Ordering::Relaxed);
    if known != 0 {
        return known as u64;
    }
    // SAFETY: RDTSC has no side effects.
    let t0 = unsafe { core::arch::x86_64::_rdtsc() };
    boot::stall(core::time::Duration::from_millis(100));
    // SAFETY: as above.
    let t1 = unsafe { core::arch::x86_64::_rdtsc() };
    let khz = (t1.wrapping_sub(t0) / 100).max(1);
    KHZ.store(khz as usize, Ordering::Relaxed);
    khz
}

/// `size` bytes of EfiReservedMemoryType, 2 MiB aligned (the slack around
/// the aligned part is given back).
fn reserve(size: u64) -> Result<PhysRange, String> {
    let pages = usize::try_from((size + ALIGN) / 4096).map_err(|_| String::from("too large"))?;
    let mem = boot::allocate_pages(AllocateType::AnyPages, MemoryType::RESERVED, pages)
        .map_err(|e| alloc::format!("cannot reserve {} MiB: {:?}", size >> 20, e.status()))?;
    let start = mem.as_ptr() as u64;
    let base = start.div_ceil(ALIGN) * ALIGN;
    let end = start + pages as u64 * 4096;
    let free = |from: u64, to: u64| {
        if to > from
            && let Some(p) = core::ptr::NonNull::new(from as *mut u8)
        {
            // SAFETY: part of the allocation above, not used by anyone.
            let _ = unsafe { boot::free_pages(p, ((to - from) / 4096) as usize) };
        }
    };
    free(start, base);
    free(base + size, end);
    Ok(PhysRange::new(base, size))
}

/// Gives back an appliance's RAM and image copy (when the installation
/// fails).
pub fn release(a: &Accepted) {
    free_range(a.ram);
    free_range(a.image);
}

/// The ACPI table at `pa` (0: none), its length read first and bounded.
fn acpi_table(pa: u64) -> Option<&'static [u8]> {
    if pa == 0 {
        return None;
    }
    // SAFETY: root-table entries point at tables in identity-mapped
    // ACPI memory; the length field is read before the whole table.
    let len = unsafe { core::ptr::read_unaligned((pa + 4) as *const u32) } as usize;
    (36..=1 << 20)
        .contains(&len)
        // SAFETY: as above, `len` bytes.
        .then(|| unsafe { core::slice::from_raw_parts(pa as *const u8, len) })
}

/// The RSDP (ACPI 2.0, 36 bytes), and the XSDT's and RSDT's addresses.
fn root_pointers() -> Result<(&'static mut [u8], u64, u64), &'static str> {
    let rsdp_pa = rsdp_address().ok_or("no RSDP")?;
    // SAFETY: the ACPI 2.0 RSDP is 36 bytes of identity-mapped memory the
    // firmware published; boot services are still running.
    let rsdp = unsafe { core::slice::from_raw_parts_mut(rsdp_pa as *mut u8, 36) };
    let xsdt_pa = u64::from_le_bytes(rsdp[24..32].try_into().map_err(|_| "RSDP")?);
    let rsdt_pa = u64::from(u32::from_le_bytes(
        rsdp[16..20].try_into().map_err(|_| "RSDP")?,
    ));
    Ok((rsdp, xsdt_pa, rsdt_pa))
}

/// The addresses of every table with `signature` the XSDT and the RSDT
/// list (each once).
fn find_tables(xsdt_pa: u64, rsdt_pa: u64, signature: [u8; 4]) -> Vec<u64> {
    let root_entries = |pa: u64, size: usize| -> Vec<u64> {
        acpi_table(pa).map_or(Vec::new(), |t| {
            t[36..]
                .chunks_exact(size)
                .map(|e| {
                    let mut b = [0u8; 8];
                    b[..size].copy_from_slice(e);
                    u64::from_le_bytes(b)
                })
                .collect()
        })
    };
    let mut out = Vec::new();
    for pa in root_entries(xsdt_pa, 8)
        .into_iter()
        .chain(root_entries(rsdt_pa, 4))
    {
        if !out.contains(&pa) && acpi_table(pa).is_some_and(|t| t[..4] == signature) {
            out.push(pa);
        }
    }
    out
}

/// The HPETs' register blocks the firmware's HPET tables give (in
/// memory, each once), and how many of its HPET tables give none.
pub fn hpets() -> (Vec<u64>, usize) {
    let Ok((_, xsdt_pa, rsdt_pa)) = root_pointers() else {
        return (Vec::new(), 0);
    };
    let mut bases = Vec::new();
    let mut unusable = 0;
    for pa in find_tables(xsdt_pa, rsdt_pa, *b"HPET") {
        match acpi_table(pa).and_then(thinhv_passthrough::hpet::table_base) {
            Some(b) if !bases.contains(&b) => bases.push(b),
            Some(_) => {}
            None => unusable += 1,
        }
    }
    (bases, unusable)
}

/// The address of the MADT the XSDT (else the RSDT) lists.
fn find_madt(xsdt_pa: u64, rsdt_pa: u64) -> Result<u64, &'static str> {
    find_tables(xsdt_pa, rsdt_pa, *b"APIC")
        .first()
        .copied()
        .ok_or("no MADT")
}

/// The I/O APICs the firmware's MADT lists.
pub fn io_apics() -> Result<Vec<thinhv_passthrough::madt::IoApic>, &'static str> {
    let (_, xsdt_pa, rsdt_pa) = root_pointers()?;
    let madt = acpi_table(find_madt(xsdt_pa, rsdt_pa)?).ok_or("MADT")?;
    thinhv_passthrough::madt::io_apics(madt).map_err(|_| "the MADT is malformed")
}

/// Replaces the MADT the RSDP leads to by a copy without `apic_ids`
/// (XSDT and RSDT entries both). Returns the processor entries removed.
pub fn carve_madt(apic_ids: &[u32]) -> Result<usize, &'static str> {
    let (rsdp, xsdt_pa, rsdt_pa) = root_pointers()?;
    let table = acpi_table;
    let old = find_madt(xsdt_pa, rsdt_pa)?;
    let carved = thinhv_passthrough::madt::without_processors(table(old).ok_or("MADT")?, apic_ids)
        .map_err(|_| "the MADT is malformed")?;
    replace_table(rsdp, xsdt_pa, rsdt_pa, old, &carved.table)?;
    Ok(carved.processors)
}

/// The bytes of the first table with `signature` the XSDT (else the
/// RSDT) lists, and its address.
pub fn firmware_table(signature: [u8; 4]) -> Result<(u64, &'static [u8]), &'static str> {
    let (_, xsdt_pa, rsdt_pa) = root_pointers()?;
    let pa = find_tables(xsdt_pa, rsdt_pa, signature)
        .first()
        .copied()
        .ok_or("not listed")?;
    Ok((pa, acpi_table(pa).ok_or("malformed")?))
}

/// Replaces the table at `old` by a copy of `bytes` wherever the RSDP's
/// root tables list it.
pub fn replace_firmware_table(old: u64, bytes: &[u8]) -> Result<(), &'static str> {
    let (rsdp, xsdt_pa, rsdt_pa) = root_pointers()?;
    replace_table(rsdp, xsdt_pa, rsdt_pa, old, bytes)
}

fn replace_table(
    rsdp: &mut [u8],
    xsdt_pa: u64,
    rsdt_pa: u64,
    old: u64,
    bytes: &[u8],
) -> Result<(), &'static str> {
    let new = copy_to_acpi_memory(bytes)?;
    let rewrite = |pa: u64, size: usize| -> Result<Option<u64>, &'static str> {
        if pa == 0 {
            return Ok(None);
        }
        let t = acpi_table(pa).ok_or("root table length")?;
        let root = thinhv_passthrough::acpi::root_mapped(t, size, |e| {
            Some(if e == old { new } else { e })
        })
        .ok_or("root table malformed")?;
        copy_to_acpi_memory(&root).map(Some)
    };
    let xsdt = rewrite(xsdt_pa, 8)?;
    let rsdt = rewrite(rsdt_pa, 4)?.and_then(|a| u32::try_from(a).ok());
    if !thinhv_passthrough::acpi::patch_rsdp(rsdp, rsdt, xsdt) {
        return Err("RSDP malformed");
    }
    Ok(())
}

/// A copy of `bytes` in new ACPI-reclaim memory below 4 GiB (an RSDT entry
/// can reach it).
fn copy_to_acpi_memory(bytes: &[u8]) -> Result<u64, &'static str> {
    let pages = bytes.len().div_ceil(4096);
    let mem = boot::allocate_pages(
        AllocateType::MaxAddress(0xffff_ffff),
        MemoryType::ACPI_RECLAIM,
        pages,
    )
    .map_err(|_| "no memory for the new table")?;
    // SAFETY: freshly allocated, `pages` pages.
    unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), mem.as_ptr(), bytes.len()) };
    Ok(mem.as_ptr() as u64)
}

/// The firmware's ExitBootServices.
static FIRMWARE_EBS: AtomicUsize = AtomicUsize::new(0);

type Ebs = unsafe extern "efiapi" fn(*mut c_void, usize) -> uefi::Status;

/// Calls the firmware's ExitBootServices; once it succeeded (the
/// firmware's own processor handling, which needs every processor it
/// started, is over), the appliances claim their processors.
unsafe extern "efiapi" fn exit_boot_services_hook(image: *mut c_void, key: usize) -> uefi::Status {
    let f = FIRMWARE_EBS.load(Ordering::SeqCst);
    // SAFETY: `f` is the firmware's ExitBootServices, saved by `hook` before
    // this function was installed in its place.
    let firmware: Ebs = unsafe { core::mem::transmute::<usize, Ebs>(f) };
    // SAFETY: the caller's arguments, passed on unchanged.
    let status = unsafe { firmware(image, key) };
    if status == uefi::Status::SUCCESS {
        // SAFETY: this CPU runs under thinhv (it is the one the loader ran
        // on); the call only changes appliance state.
        let r = unsafe { vmmcall(Function::CLAIM_APPLIANCE_CPUS.0, 0, 0, 0) };
        let _ = Status(r[0]);
    }
    status
}

/// Puts [`exit_boot_services_hook`] into the boot services table.
pub fn hook_exit_boot_services() -> Result<(), &'static str> {
    let st = uefi::table::system_table_raw().ok_or("no system table")?;
    // SAFETY: the firmware's system table, valid while boot services run;
    // only the ExitBootServices pointer and the header CRC change, as the
    // UEFI specification allows a driver to (§4.2: the CRC is recomputed).
    unsafe {
        let bs = (*st.as_ptr()).boot_services;
        if bs.is_null() {
            return Err("no boot services table");
        }
        let old = (*bs).exit_boot_services as usize;
        if old == exit_boot_services_hook as *const () as usize {
            return Ok(());
        }
        FIRMWARE_EBS.store(old, Ordering::SeqCst);
        (*bs).exit_boot_services = exit_boot_services_hook;
        let size = (*bs).header.size as usize;
        (*bs).header.crc = 0;
        let bytes = core::slice::from_raw_parts(bs.cast::<u8>(), size);
        (*bs).header.crc = crc32fast::hash(bytes);
    }
    Ok(())
}
