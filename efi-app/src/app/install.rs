//! Installing the core: reserve, load, start on every CPU, or roll back.
use super::hypercall::vmmcall;
use super::platform::{self, Processor};
use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::arch::naked_asm;
use core::ffi::c_void;
use core::fmt::Write as _;
use core::sync::atomic::{AtomicU64, Ordering};
use core::time::Duration;
use thinhv_abi::PhysRange;
use thinhv_abi::handoff::{
    CORE_OP_INIT, CORE_OP_RELEASE, CORE_OP_VIRTUALIZE, CPU_PARTITION_SHIFT, CoreError, CpuInfo,
    Handoff, MAX_CPUS, MAX_RAM_RANGES, MAX_RO_RANGES, ON_FATAL_HALT, ON_FATAL_RESET,
    partition_flags,
};
use thinhv_abi::hypercall::{Function, Status};
use thinhv_config::{Config, OnFatal};
use thinhv_efi::{blob, cpu_check, elf_load, memmap, plan};
use uefi::boot::{self, AllocateType, MemoryType};
use uefi::println;
use uefi::proto::pi::mp::MpServices;

/// The embedded core (header + ELF), see `build.rs`.
static CORE_BLOB: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/core.blob"));

/// How long all APs together may take to virtualize.
const AP_TIMEOUT: Duration = Duration::from_secs(20);

/// `extern "sysv64" fn(op, a0, a1, a2) -> u64`.
type CoreEntry = u64;

/// Calls the core's entry to virtualize the calling CPU. Returns the core's
/// status: 0 when the CPU now runs in guest mode (the call "returns" there,
/// at label 2, with RAX = 0 from the guest state), nonzero on failure.
///
/// # Safety
/// `entry` is the core's entry after `CORE_OP_INIT` succeeded; called on the
/// CPU `cpu` describes, natively.
#[unsafe(naked)]
unsafe extern "sysv64" fn virtualize_this_cpu(entry: CoreEntry, cpu: u64) -> u64 {
    naked_asm!(
        "push rbx",
        "push rbp",
        "push r12",
        "push r13",
        "push r14",
        "push r15",
        "sub rsp, 8",
        "mov rax, rdi",
        "mov edi, {op}",
        // rsi = cpu (already), rdx = resume RIP, rcx = resume RSP.
        "lea rdx, [rip + 2f]",
        "mov rcx, rsp",
        "call rax",
        // Failure: RAX = error code.
        "2:",
        // Success resumes here in guest mode with RSP = RCX above, RAX = 0.
        "add rsp, 8",
        "pop r15",
        "pop r14",
        "pop r13",
        "pop r12",
        "pop rbp",
        "pop rbx",
        "ret",
        op = const CORE_OP_VIRTUALIZE,
    );
}

/// Shared with the AP procedure (in loader memory, which stays visible to
/// every CPU in guest mode).
struct ApContext {
    entry: CoreEntry,
    apic_ids: [u32; MAX_CPUS],
    numbers: [usize; MAX_CPUS],
    count: usize,
    results: [AtomicU64; MAX_CPUS],
}

/// Result slot not yet written.
const NOT_RUN: u64 = u64::MAX;

extern "efiapi" fn ap_virtualize(arg: *mut c_void) {
    // SAFETY: `arg` is the `ApContext` the BSP passed, alive until
    // `startup_all_aps` returns (it waits for every AP or times out; the
    // context is leaked, never freed, for the timeout case).
    let ctx = unsafe { &*arg.cast::<ApContext>() };
    let me = platform::apic_id();
    let Some(idx) = ctx.apic_ids[..ctx.count].iter().position(|&a| a == me) else {
        return;
    };
    // SAFETY: this runs on the CPU `idx` names, natively; the core is
    // initialized (the BSP did it before starting APs).
    let r = unsafe { virtualize_this_cpu(ctx.entry, idx as u64) };
    ctx.results[idx].store(r, Ordering::SeqCst);
}

extern "efiapi" fn ap_devirtualize(arg: *mut c_void) {
    // SAFETY: as in `ap_virtualize`.
    let ctx = unsafe { &*arg.cast::<ApContext>() };
    let me = platform::apic_id();
    let Some(idx) = ctx.apic_ids[..ctx.count].iter().position(|&a| a == me) else {
        return;
    };
    if ctx.results[idx].load(Ordering::SeqCst) == 0 {
        // SAFETY: this CPU is under thinhv (its result says so), before the seal.
        let r = unsafe { vmmcall(Function::DEVIRTUALIZE.0, 0, 0, 0) };
        if r[0] == Status::OK.0 {
            ctx.results[idx].store(NOT_RUN, Ordering::SeqCst);
        }
    }
}

/// Installs thinhv. `Ok` carries a one-line summary; `Err` the reason it
/// is not running (with every CPU left native).
pub fn install(config: &Config) -> Result<String, String> {
    let probe = platform::probe();
    let caps = cpu_check::assess(&probe).map_err(|u| String::from(u.message()))?;
    let intel = caps.vendor == thinhv_abi::hypercall::VENDOR_INTEL_VMX;
    super::hypercall::set_intel(intel);
    println!(
        "thinhv: processor: {} ({}), {}-bit physical addresses",
        if intel {
            "Intel VT-x with EPT and unrestricted guest"
        } else {
            "AMD-V with nested paging"
        },
        cpu_check::describe(caps.features),
        caps.phys_addr_bits
    );
    let elf = blob::verify(CORE_BLOB).map_err(|e| format!("{e}"))?;
    let layout =
        elf_load::layout(elf).map_err(|e| format!("the embedded core is unusable: {e}"))?;

    let mp = platform::mp_services();
    let all = platform::processors(mp.as_deref());
    let cpus: Vec<Processor> = all.iter().copied().filter(|p| p.enabled).collect();
    if cpus.len() < all.len() {
        println!(
            "thinhv: warning: {} processor(s) disabled by the firmware stay outside the hypervisor",
            all.len() - cpus.len()
        );
    }
    if cpus.is_empty() || cpus.len() > MAX_CPUS {
        return Err(format!(
            "{} processors: thinhv handles 1 to {MAX_CPUS}",
            cpus.len()
        ));
    }
    let bsp_apic = platform::apic_id();
    let mem = platform::memory().ok_or("cannot read the firmware memory map")?;
    // The device inventory and ownership (a failure here costs the
    // inventory and the rules, never the boot). Before the appliances:
    // they may be given functions.
    let (functions, regions) = match super::pci::ecam_regions() {
        Ok(regions) => (super::pci::functions(&regions), regions),
        Err(e) => {
            println!("thinhv: no PCI inventory: {e}");
            (Vec::new(), Vec::new())
        }
    };
    let segment0 = regions.iter().find(|r| r.segment == 0);
    let boot_device = super::pci::boot_device_path().and_then(|path| {
        thinhv_passthrough::policy::boot_device(
            &functions,
            0,
            segment0.map_or(0, |r| r.bus_start),
            &path,
        )
    });
    // Appliances first: their RAM leaves the OS's memory map (reserved
    // type), so the map read again below no longer holds it.
    let appliance_cpus: Vec<thinhv_efi::appliances::Cpu> = cpus
        .iter()
        .map(|c| thinhv_efi::appliances::Cpu {
            apic_id: c.apic_id,
            bsp: c.apic_id == bsp_apic,
        })
        .collect();
    let (mut rules, budgets) = thinhv_efi::inventory::rules(config);
    let (list, shared_pfs) = super::appliances::prepare(
        config,
        &appliance_cpus,
        mem.ram_bytes,
        &functions,
        boot_device,
        1u64 << caps.phys_addr_bits.min(52),
        &regions,
        &budgets,
        regions
            .iter()
            .find(|r| r.segment == 0)
            .map_or(0, |r| r.bus_start),
    );
    let mut appliances = ApplianceRam { list, armed: true };
    // The VFs the loader enabled for appliances are functions from now on
    // (the inventory hides them from the OS like the appliances' others).
    let mut functions = functions;
    functions.extend(shared_pfs.iter().flat_map(|s| s.vfs.iter().cloned()));
    let mem = if appliances.list.is_empty() {
        mem
    } else {
        platform::memory().ok_or("cannot read the firmware memory map")?
    };
    let page_1g = caps.features & thinhv_abi::handoff::features::PAGE_1G != 0;
    let max_bus = functions.iter().map(|f| f.bdf.bus).max().unwrap_or(0);
    let max_apic = cpus.iter().map(|c| c.apic_id).max().unwrap_or(0);
    let mut iommu = super::iommu::prepare(config, max_bus, max_apic);
    // The OS's own unit remaps interrupts where no appliance shares the
    // real unit's table with it and the platform remaps (`os-iommu.md`).
    if iommu.os == thinhv_abi::handoff::IOMMU_OS_EMULATED
        && appliances.list.is_empty()
        && iommu.remaps_interrupts()
        && super::iommu::dmar_remaps()
    {
        iommu.flags |= thinhv_abi::handoff::IOMMU_FLAG_OS_REMAP;
    }
    // An appliance's functions DMA to its guest-physical addresses, which
    // only its IOMMU domain puts in its own RAM: without the IOMMU they
    // would reach the OS's memory.
    if iommu.mode != thinhv_abi::handoff::IOMMU_MODE_PROTECT {
        appliances.list.retain(|a| {
            if a.devices.is_empty() {
                return true;
            }
            println!(
                "thinhv: {} left out: it has PCI functions and the IOMMU is not thinhv's (their DMA would reach the OS's memory); the OS boots without it",
                config.appliance[a.index].label()
            );
            super::appliances::release(a);
            false
        });
    }
    // An appliance's functions are hidden from the OS (configuration
    // space mediated, no DMA in the OS's domain) like `owner = "hidden"`
    // ones; the core also takes their BARs from the OS.
    // The bridges above them too (everything behind those is the
    // appliance's, `assign_devices` made sure): the OS could otherwise
    // reset the function through them (Secondary Bus Reset), disable
    // their link or turn their forwarding off.
    for a in &appliances.list {
        let t = &config.appliance[a.index];
        let mut hide: Vec<(thinhv_passthrough::pci::Bdf, bool)> = Vec::new();
        for d in &a.devices {
            hide.push((d.bdf, false));
            for &b in &d.upstream {
                if !hide.iter().any(|&(h, _)| h == b) {
                    hide.push((b, true));
                }
            }
        }
        rules.extend(hide.into_iter().map(|(bdf, bridge_ok)| {
            thinhv_passthrough::policy::DeviceRule {
                matcher: alloc::format!("{bdf}"),
                owner: String::from("hidden"),
                line: t.line,
                bridge_ok,
            }
        }));
    }
    // An NVMe PF with an appliance's VF is thinhv's: hidden from the OS,
    // which gets its VF 1 in the PF's place (below).
    for s in shared_pfs.iter().filter(|s| s.nvme) {
        rules.push(thinhv_passthrough::policy::DeviceRule {
            matcher: alloc::format!("{}", s.pf),
            owner: String::from("hidden"),
            line: None,
            bridge_ok: false,
        });
    }
    // A rule the core could not enforce (another segment, an ECAM page
    // beyond the core's map) fails here, visibly, and the function stays
    // the OS's.
    // A `[[sriov]]` rule that names only NVMe PFs thinhv keeps was the
    // loader's (VF 1 for the OS or none): the OS's inventory has no PF
    // left for it.
    let kept: Vec<_> = shared_pfs.iter().filter(|s| s.nvme).map(|s| s.pf).collect();
    let os_budgets: Vec<_> = budgets
        .iter()
        .filter(|r| {
            let Ok(m) = thinhv_passthrough::policy::Matcher::parse(&r.device) else {
                return true;
            };
            let mut pfs = functions
                .iter()
                .filter(|f| f.sriov.is_some() && m.matches(f))
                .peekable();
            pfs.peek().is_none() || pfs.any(|f| !kept.contains(&f.bdf))
        })
        .cloned()
        .collect();
    let mut inventory = thinhv_efi::inventory::Inventory::assess(
        functions,
        &rules,
        &os_budgets,
        boot_device,
        iommu.mode == thinhv_abi::handoff::IOMMU_MODE_PROTECT,
        &thinhv_efi::inventory::reach(segment0, mem.top),
    );
    inventory.config_rules = Some(config.device.len());
    for l in inventory.report() {
        println!("thinhv: {l}");
    }
    let (mut pci, pci_warnings) = inventory.handoff(segment0);
    for w in pci_warnings {
        println!("thinhv: {w}");
    }
    // A PF with an appliance's VF: its VF budget becomes a view of its
    // SR-IOV registers, the device keeping the loader's setup.
    for s in shared_pfs.iter().filter(|s| s.nvme) {
        present_nvme_vf(&mut pci, &regions, &inventory.functions, s);
        guard_bridges_above(&mut pci, &inventory.functions, s.pf);
    }
    // The OS drives an emulated AMD-Vi unit in the real one's place: the
    // real unit's function shows it NpCache and keeps its MSI to itself.
    if iommu.mode == thinhv_abi::handoff::IOMMU_MODE_PROTECT
        && iommu.kind == thinhv_abi::handoff::IOMMU_KIND_AMDVI
        && iommu.os == thinhv_abi::handoff::IOMMU_OS_EMULATED
        && !guard_amdvi_functions(&mut pci, &inventory.functions)
    {
        // Without its function's view, what the OS writes there would
        // reach the real unit: no unit for it.
        println!("thinhv: IOMMU: the OS gets no AMD-Vi unit of its own");
        iommu.os = thinhv_abi::handoff::IOMMU_OS_NONE;
    }
    // The OS's VFs of each such PF, enabled by the loader's setup from the
    // start (the OS's VF Enable is a view): their interrupts are remapped
    // like its other functions' (`remap_os_msi`).
    let mut os_vfs_of_shared = alloc::vec::Vec::new();
    for s in shared_pfs.iter().filter(|s| !s.nvme) {
        let k = pci.shared_count as usize;
        let vfs: alloc::vec::Vec<_> = inventory
            .functions
            .iter()
            .find(|f| f.bdf == s.pf)
            .map(|pf| {
                // Every VF the device has enabled: the OS's, those beyond
                // its budget that no appliance has (the OS can still
                // program them), and the appliances' (skipped where
                // remapped: they are not the OS's).
                (1..=s.setup.num_vfs)
                    .map_while(|i| super::pci::vf_of(&regions, pf, &s.setup, i).ok())
                    .collect()
            })
            .unwrap_or_default();
        let rid = |i: usize| {
            vfs.get(i)
                .map(|f: &thinhv_passthrough::pci::Function| f.bdf.rid())
        };
        let (first_vf_offset, vf_stride) = (
            rid(0).map_or(0, |r| r.wrapping_sub(s.pf.rid())),
            rid(1).zip(rid(0)).map_or(0, |(b, a)| b.wrapping_sub(a)),
        );
        let found = pci.mediated[..pci.count as usize].iter_mut().find(|m| {
            m.bus == s.pf.bus
                && m.devfn == s.pf.devfn()
                && m.action == thinhv_abi::handoff::PCI_ACTION_VF_BUDGET
                && m.os_vfs == s.setup.os_vfs
        });
        match found {
            Some(m) if k < thinhv_abi::handoff::MAX_SHARED_PFS => {
                m.action = thinhv_abi::handoff::PCI_ACTION_VF_SHARED;
                m.reserved = k as u8;
                pci.shared[k] = thinhv_abi::handoff::SharedPf {
                    rid: s.pf.rid(),
                    cap: s.setup.cap,
                    os_vfs: s.setup.os_vfs,
                    initial_vfs: s.setup.initial_vfs,
                    num_vfs: s.setup.num_vfs,
                    control: s.setup.control,
                    devctl: s.devctl,
                    first_vf_offset,
                    page_size: s.setup.page_size,
                    vf_bars: s.setup.vf_bars,
                    vf_bar_masks: s.setup.vf_bar_masks,
                    vf_stride,
                    reserved: 0,
                };
                pci.shared_count += 1;
                if vfs.len() == usize::from(s.setup.num_vfs) {
                    os_vfs_of_shared.push((s.pf, vfs));
                } else {
                    println!(
                        "thinhv: warning: interrupts: {}: {} of its {} VF(s) answer: the OS's are not remapped",
                        s.pf,
                        vfs.len(),
                        s.setup.num_vfs
                    );
                }
            }
            _ => println!(
                "thinhv: {}: its VF budget is not mediated (see above): its VFs cannot be shared with an appliance",
                s.pf
            ),
        }
    }
    // An appliance whose function the inventory could not take from the
    // OS is left out: a function is never the OS's and an appliance's.
    appliances.list.retain(|a| {
        let Some(bdf) = a
            .devices
            .iter()
            .flat_map(|d| core::iter::once(d.bdf).chain(d.upstream.iter().copied()))
            .find(|b| pci.find(b.bus, b.devfn()).is_none() || !pci.is_blocked(b.rid()))
            .or_else(|| {
                // A VF's PF must be shared (its view mediated), or an NVMe
                // PF thinhv keeps.
                a.devices.iter().find_map(|d| {
                    let (pf_rid, _) = d.vf?;
                    let pf = thinhv_passthrough::pci::Bdf::from_rid(0, pf_rid);
                    let shared = pci.find(pf.bus, pf.devfn()).is_some_and(|m| {
                        matches!(
                            m.action,
                            thinhv_abi::handoff::PCI_ACTION_VF_SHARED
                                | thinhv_abi::handoff::PCI_ACTION_PRESENT_VF
                        ) || (m.action == thinhv_abi::handoff::PCI_ACTION_HIDE
                            && shared_pfs.iter().any(|s| s.nvme && s.pf == pf))
                    });
                    (!shared).then_some(pf)
                })
            })
        else {
            return true;
        };
        println!(
            "thinhv: appliance {:?} left out: its device or the bridge above it {bdf} stays with the OS (see above); the OS boots without it",
            config.appliance[a.index].name
        );
        super::appliances::release(a);
        false
    });
    // With appliances on an AMD-Vi unit, the OS's functions' messages are
    // remapped too (their address and data judged against the OS's
    // processors): none can reach an appliance's processor.
    let mut os_irq_left = None;
    if iommu.remaps_interrupts() && !appliances.list.is_empty() {
        // An MSI-X table beyond the core's own map is mapped by the core
        // when the OS enables MSI-X; only one beyond the physical address
        // width cannot be.
        let budget_vfs = budget_vfs(&mut pci, &inventory.functions, &regions);
        os_irq_left = Some(remap_os_msi(
            &mut pci,
            &inventory.functions,
            &os_vfs_of_shared,
            &budget_vfs,
            &regions,
            1u64 << caps.phys_addr_bits.min(52),
            &mut iommu,
        ));
    }
    // The appliance's functions leave the firmware's hands quiet and
    // reset: their firmware drivers stopped (else they would drive the
    // function until the OS leaves boot services, and write into the
    // appliance's RAM through its IOMMU domain once it starts), then bus
    // mastering and MSI off, a Function Level Reset where the function
    // has one, and its BARs put back. Its driver in the appliance turns
    // bus mastering on.
    let root_bus = segment0.map_or(0, |r| r.bus_start);
    for a in &appliances.list {
        for d in &a.devices {
            let khz = super::appliances::tsc_khz();
            // SAFETY: RDTSC has no side effects.
            let t0 = unsafe { core::arch::x86_64::_rdtsc() };
            let stopped =
                super::pci::disconnect_firmware_drivers(&inventory.functions, root_bus, d.bdf);
            // A VF's BARs are its PF's VF BARs: none of its own to put back.
            let bars: Vec<thinhv_passthrough::reset::Bar> = d
                .bars
                .iter()
                .filter(|_| d.vf.is_none())
                .map(|&(index, flags, base, _)| thinhv_passthrough::reset::Bar {
                    index,
                    wide: flags & thinhv_abi::handoff::BAR_REG_64 != 0,
                    base,
                })
                .collect();
            // Its bridges forward memory and its DMA (the firmware may have
            // left that to the OS, which no longer sees them).
            for &b in &d.upstream {
                super::pci::enable_forwarding(&regions, b);
            }
            let report = super::pci::reset_function(&regions, d.bdf, &bars);
            // SAFETY: as above.
            let ms = unsafe { core::arch::x86_64::_rdtsc() }.wrapping_sub(t0) / khz;
            match report {
                Some(r) => println!(
                    "thinhv: appliance {:?}: {}: firmware handles disconnected {stopped}; {r} ({ms} ms)",
                    config.appliance[a.index].name, d.bdf
                ),
                None => println!("thinhv: warning: {}: does not answer; not reset", d.bdf),
            }
        }
    }
    let (mut devices, devices_dropped) = inventory.records();
    // The appliances' functions are theirs, not merely hidden.
    for (i, a) in appliances.list.iter().enumerate() {
        for r in &mut devices {
            if a.devices
                .iter()
                .any(|d| d.bdf.bus == r.bus && d.bdf.devfn() == r.devfn)
            {
                r.owner = thinhv_abi::status::OWNER_APPLIANCE;
                r.iommu_domain =
                    u8::try_from(thinhv_abi::handoff::appliance_iommu_domain(i)).unwrap_or(0);
            }
        }
    }
    // Second-level splits around each trapped ECAM page, and a context
    // table per bus with a blocked requester; the tables conventional
    // bridges' IDs share (AMD-Vi), and the splits around the HPET's
    // read-only page.
    let pci_pages = 2 * u64::from(pci.count)
        + u64::from(pci.blocked_count)
        + 2
        + thinhv_abi::handoff::MAX_SHARED_TABLES as u64
        + 2;
    // A page table per 2 MiB of appliance RAM mapped to the blank frame in
    // the OS's second-level tables, and the levels above.
    let appliance_pages: u64 = appliances
        .list
        .iter()
        .map(|a| {
            (a.ram.size + a.image.size).div_ceil(2 << 20)
                // The levels above, for its RAM below and above its MMIO
                // hole in its own tables too.
                + 12
                // With PCI functions: its IOMMU domain's tables (2 MiB
                // pages where the unit has them, else one table per 2 MiB)
                // and context tables; each BAR split out of the OS's
                // tables and mapped in its own, a few tables each.
                + if a.devices.is_empty() {
                    0
                } else {
                    a.ram.size.div_ceil(2 << 20) + 8
                }
                + a.devices.iter().map(|d| 12 * d.bars.len() as u64).sum::<u64>()
        })
        .sum();
    let iommu_pages = thinhv_abi::layout::iommu_pages(
        if iommu.mode == thinhv_abi::handoff::IOMMU_MODE_PROTECT {
            iommu.kind
        } else {
            0
        },
        u64::from(iommu.device_ids),
        iommu.remaps_interrupts()
            && (!appliances.list.is_empty()
                || iommu.flags & thinhv_abi::handoff::IOMMU_FLAG_OS_REMAP != 0),
    ) + if iommu.mode == thinhv_abi::handoff::IOMMU_MODE_PROTECT
        && iommu.os == thinhv_abi::handoff::IOMMU_OS_EMULATED
    {
        thinhv_abi::layout::OS_IOMMU_PAGES
    } else {
        0
    };
    let p = plan::plan(
        layout.span,
        cpus.len() as u64,
        mem.top,
        page_1g,
        iommu_pages + pci_pages + appliance_pages,
    );

    // The reservation: EfiReservedMemoryType, which no OS reclaims.
    let pages = (p.total / 4096) as usize;
    let region = boot::allocate_pages(AllocateType::AnyPages, MemoryType::RESERVED, pages)
        .map_err(|e| format!("cannot reserve {} KiB: {:?}", p.total / 1024, e.status()))?;
    let base = region.as_ptr() as u64;
    let release = || {
        // SAFETY: the pages were allocated above and no CPU uses them any
        // more (all are native again when this runs).
        let _ = unsafe { boot::free_pages(region, pages) };
    };
    // SAFETY: freshly allocated, `p.total` bytes, owned by the loader.
    let all_bytes = unsafe { core::slice::from_raw_parts_mut(region.as_ptr(), p.total as usize) };
    all_bytes.fill(0);
    let (protected, status, image, pool) = p.ranges(base);
    let image_bytes =
        &mut all_bytes[p.image_offset as usize..(p.image_offset + p.image_size) as usize];
    let loaded = match elf_load::load(elf, image_bytes, image.base) {
        Ok(l) => l,
        Err(e) => {
            release();
            return Err(format!("the embedded core cannot be loaded: {e}"));
        }
    };
    if loaded.ro.len() > MAX_RO_RANGES {
        release();
        return Err(String::from(
            "the embedded core has too many read-only segments",
        ));
    }
    let ro_crc = elf_load::ro_crc(image_bytes, &loaded.ro);

    // The hand-off, in the first page of the protected region.
    let mut h = Handoff::new();
    h.devices_pa = devices.as_ptr() as u64;
    h.device_count = devices.len() as u32;
    h.devices_dropped = devices_dropped;
    h.iommu = iommu;
    h.pci = pci;
    h.region = PhysRange::new(base, p.total);
    h.protected = protected;
    h.status = status;
    h.image = image;
    h.pool = pool;
    for (i, &(off, len)) in loaded.ro.iter().enumerate() {
        h.ro_ranges[i] = PhysRange::new(image.base + off, len);
    }
    h.ro_count = loaded.ro.len() as u32;
    h.ro_crc = ro_crc;
    h.vendor = caps.vendor;
    h.cpu_count = cpus.len() as u32;
    for (i, c) in cpus.iter().enumerate() {
        let partition = appliances
            .list
            .iter()
            .position(|a| a.apic_ids.contains(&c.apic_id))
            .map_or(0, |p| p as u32 + 1);
        h.cpus[i] = CpuInfo {
            apic_id: c.apic_id,
            flags: u32::from(c.apic_id == bsp_apic) | partition << CPU_PARTITION_SHIFT,
        };
    }
    for (i, a) in appliances.list.iter().enumerate() {
        let t = &config.appliance[a.index];
        let p = &mut h.partitions[i];
        let n = t.name.len().min(p.name.len() - 1);
        p.name[..n].copy_from_slice(&t.name.as_bytes()[..n]);
        p.ram = a.ram;
        p.cpu_count = a.apic_ids.len() as u32;
        p.flags = (if t.on_crash == thinhv_config::OnCrash::Restart {
            partition_flags::RESTART_ON_CRASH
        } else {
            0
        }) | (if t.control == thinhv_config::Control::Os {
            partition_flags::OS_CONTROL
        } else {
            0
        }) | (if super::appliances::starts_in_x2apic(t) {
            partition_flags::X2APIC
        } else {
            0
        });
        p.entry_rip = a.entry.rip;
        p.entry_rsi = a.entry.rsi;
        p.entry_cr3 = a.entry.cr3;
        p.entry_gdt = a.entry.gdt.0;
        p.tsc_khz = super::appliances::tsc_khz();
        p.image = a.image;
        p.piece_count = a.pieces.len() as u32;
        for (slot, piece) in p.pieces.iter_mut().zip(&a.pieces) {
            *slot = *piece;
        }
        p.console_port = match t.console {
            thinhv_config::Console::Log => 0,
            thinhv_config::Console::Port(port) => port,
        };
        p.device_count = a.devices.len() as u32;
        for (slot, d) in p.devices.iter_mut().zip(&a.devices) {
            slot.rid = d.bdf.rid();
            slot.vdevfn = d.vdevfn;
            if let Some((pf_rid, ids)) = d.vf {
                slot.pf_rid = pf_rid;
                slot.vf_ids = ids;
            }
            slot.bar_count = d.bars.len() as u8;
            for (k, &(index, flags, base, size)) in d.bars.iter().enumerate() {
                slot.bars[k] = PhysRange::new(base, size);
                slot.bar_regs[k] = index | flags;
            }
        }
    }
    h.partition_count = appliances.list.len() as u32;
    // Exact RAM ranges: what does not fit is dropped, never merged across
    // a gap (a gap may hold device registers).
    let ram = memmap::fit(&mem.ram, MAX_RAM_RANGES);
    if ram.dropped > 0 {
        println!(
            "thinhv: memory map: {} RAM ranges, the core takes {MAX_RAM_RANGES}; the {} smallest ({} KiB of RAM) are refused as hypercall buffers",
            mem.ram.len(),
            ram.dropped,
            ram.dropped_bytes / 1024
        );
    }
    for (i, r) in ram.kept.iter().enumerate() {
        h.ram[i] = *r;
    }
    h.ram_count = ram.kept.len() as u32;
    h.features = caps.features;
    h.phys_top = mem.top;
    if !appliances.list.is_empty() {
        let sources = super::iommu::interrupt_sources();
        let unjudged = judge_io_apics(&mut h, sources.as_ref());
        let hpets = guard_hpet(&mut h);
        if let Some((functions, vf_pfs)) = os_irq_left {
            block_compat_if_all_remapped(
                &mut h,
                (functions, vf_pfs),
                unjudged,
                hpets,
                sources.as_ref(),
            );
        }
    }
    h.phys_addr_bits = caps.phys_addr_bits;
    h.config.log_level = config.hypervisor.log_level.as_u8();
    h.config.serial_port = config.hypervisor.serial.port();
    h.config.hide_hypervisor = u8::from(config.cpu.hide_hypervisor);
    h.config.on_fatal = match config.hypervisor.on_fatal {
        OnFatal::Halt => ON_FATAL_HALT,
        OnFatal::Reset => ON_FATAL_RESET,
    };
    h.config.debug_fail_cpu = config.debug.fail_cpu.unwrap_or(u32::MAX);
    h.config.debug_host_fault = u8::from(config.debug.host_fault);
    // `Config::parse` checked that the profile resolves.
    h.cpuid = config.cpu.cpuid_profile().unwrap_or_default();
    h.config.init_sipi = match config.cpu.init_sipi {
        thinhv_config::InitSipi::Auto => thinhv_abi::handoff::INIT_SIPI_AUTO,
        thinhv_config::InitSipi::Activity => thinhv_abi::handoff::INIT_SIPI_ACTIVITY,
        thinhv_config::InitSipi::Intercept => thinhv_abi::handoff::INIT_SIPI_INTERCEPT,
    };
    if let Err(e) = h.validate() {
        release();
        return Err(format!("internal error: inconsistent hand-off ({e})"));
    }
    let handoff_pa = base;
    // SAFETY: `base` is page-aligned memory the loader owns; the plan puts
    // the image at `HANDOFF_AREA`, past the end of the hand-off.
    unsafe { core::ptr::write(handoff_pa as *mut Handoff, h) };
    let entry = image.base + loaded.entry;
    println!(
        "thinhv: core loaded at {:#x} ({} KiB, {} relocations), {} KiB reserved in all",
        image.base,
        p.image_size / 1024,
        loaded.relocations,
        p.total / 1024
    );
    if h.cpuid.active != 0 {
        println!(
            "thinhv: CPU profile {}: {} CPUID leaves masked, XCR0 limited to {:#x}{}",
            config.cpu.profile,
            h.cpuid.count,
            h.cpuid.xcr0_allowed,
            if config.cpu.hide.is_empty() && config.cpu.mask.is_empty() {
                ""
            } else {
                " (with [cpu] hide/mask)"
            }
        );
    }

    // SAFETY: `entry` is the relocated entry of the verified core; the
    // hand-off is complete. The call runs natively on the BSP.
    let init: extern "sysv64" fn(u64, u64, u64, u64) -> u64 =
        unsafe { core::mem::transmute(entry) };
    let r = init(CORE_OP_INIT, handoff_pa, 0, 0);
    if r != 0 {
        release();
        return Err(format!(
            "the core refused to start: {}",
            CoreError(r).describe()
        ));
    }

    // From here on the IOMMU translates with tables in the region: a
    // roll-back asks the core to switch it off (every CPU native again)
    // before the region is freed, and keeps the region if it cannot.
    let release_after_init = || {
        let r = init(CORE_OP_RELEASE, 0, 0, 0);
        if r == 0 {
            release();
        } else {
            println!(
                "thinhv: roll-back: {}; its memory stays reserved",
                CoreError(r).describe()
            );
        }
    };

    // BSP first: from now on its INIT/SIPI to the APs are seen by thinhv.
    let bsp_idx = cpus
        .iter()
        .position(|c| c.bsp)
        .or_else(|| cpus.iter().position(|c| c.apic_id == bsp_apic))
        .unwrap_or(0);
    // SAFETY: on the BSP, natively, after a successful CORE_OP_INIT.
    let r = unsafe { virtualize_this_cpu(entry, bsp_idx as u64) };
    if r != 0 {
        release_after_init();
        return Err(format!(
            "the boot processor could not be virtualized: {}",
            CoreError(r).describe()
        ));
    }

    let ctx = Box::leak(Box::new(ApContext {
        entry,
        apic_ids: core::array::from_fn(|i| cpus.get(i).map_or(u32::MAX, |c| c.apic_id)),
        numbers: core::array::from_fn(|i| cpus.get(i).map_or(usize::MAX, |c| c.number)),
        count: cpus.len(),
        results: core::array::from_fn(|_| AtomicU64::new(NOT_RUN)),
    }));
    ctx.results[bsp_idx].store(0, Ordering::SeqCst);
    let ctx_ptr = core::ptr::from_mut(ctx).cast::<c_void>();
    if cpus.len() > 1 {
        let Some(mp) = mp.as_deref() else {
            if rollback(None, ctx, ctx_ptr, bsp_idx) == 0 {
                release_after_init();
            }
            return Err(String::from(
                "no MP services protocol to start the other processors",
            ));
        };
        let started = mp.startup_all_aps(true, ap_virtualize, ctx_ptr, None, Some(AP_TIMEOUT));
        let failed: Vec<(usize, u64)> = (0..cpus.len())
            .map(|i| (i, ctx.results[i].load(Ordering::SeqCst)))
            .filter(|&(_, r)| r != 0)
            .collect();
        if started.is_err() || !failed.is_empty() {
            let why = match failed.first() {
                Some(&(i, NOT_RUN)) => {
                    format!("processor {i} (APIC {}) did not come up", cpus[i].apic_id)
                }
                Some(&(i, code)) => format!(
                    "processor {i} (APIC {}) could not be virtualized: {}",
                    cpus[i].apic_id,
                    CoreError(code).describe()
                ),
                None => format!(
                    "starting the processors failed: {:?}",
                    started.err().map(|e| e.status())
                ),
            };
            let left = rollback(Some(mp), ctx, ctx_ptr, bsp_idx);
            if left > 0 {
                // The region must stay reserved: some CPU still uses it.
                return Err(format!(
                    "{why}; {left} processor(s) could not be rolled back"
                ));
            }
            release_after_init();
            return Err(format!(
                "{why}; every processor was returned to native mode"
            ));
        }
    }

    if config.debug.host_fault {
        println!("thinhv: [debug] host_fault: asking the core for an exception in host mode");
        // SAFETY: the BSP is under thinhv; the call does not return if the
        // core honours it (the platform halts or resets).
        let r = unsafe { vmmcall(Function::DEBUG_HOST_FAULT.0, 0, 0, 0) };
        println!(
            "thinhv: [debug] host_fault refused: {}",
            Status(r[0]).name()
        );
    }
    // SAFETY: the BSP is under thinhv; sealing closes the loader-only calls.
    let r = unsafe { vmmcall(Function::SEAL.0, 0, 0, 0) };
    if !appliances.list.is_empty() {
        carve_for_appliances(&appliances.list);
    }
    if r[0] == Status::OK.0 {
        let owned = |rid: u16| {
            !h.pci.is_blocked(rid)
                && !h
                    .partitions()
                    .iter()
                    .any(|p| p.devices().iter().any(|d| d.rid == rid))
        };
        super::iommu::after_seal(&h.iommu, h.phys_addr_bits, r[1], r[2], r[3], owned);
    } else {
        log::warn!("seal returned {}", Status(r[0]).name());
    }
    appliances.keep();
    // SAFETY: as above; the version call has no side effects.
    let v = unsafe { vmmcall(Function::VERSION.0, 0, 0, 0) };
    Ok(format!(
        "{} of {} processors virtualized, {} KiB reserved, status page at {:#x}",
        v[3],
        cpus.len(),
        p.total / 1024,
        status.base
    ))
}

/// The accepted appliances' RAM, given back unless the installation
/// succeeds.
struct ApplianceRam {
    list: Vec<super::appliances::Accepted>,
    armed: bool,
}

impl ApplianceRam {
    fn keep(mut self) {
        self.armed = false;
    }
}

impl Drop for ApplianceRam {
    fn drop(&mut self) {
        if self.armed {
            for a in &self.list {
                super::appliances::release(a);
            }
        }
    }
}

/// After the seal: the appliances' processors out of the OS's MADT, and
/// the hook after which they claim them.
/// NVMe PF `s`, thinhv's: its BARs held from everyone, and (with an OS
/// budget of 1) its VF 1 shown to the OS in its place, that VF's DMA in
/// the OS's domain.
fn present_nvme_vf(
    pci: &mut thinhv_abi::handoff::PciHandoff,
    regions: &[thinhv_passthrough::pci::EcamRegion],
    functions: &[thinhv_passthrough::pci::Function],
    shared: &super::appliances::SharedPf,
) {
    use thinhv_abi::handoff::{BAR_REG_64, BAR_REG_PREFETCH, MAX_HELD_BARS, PartitionDevice};
    let Some(pf) = functions.iter().find(|f| f.bdf == shared.pf) else {
        return;
    };
    for b in pf
        .bars
        .iter()
        .filter(|b| b.base != 0 && b.kind != thinhv_passthrough::bars::BarKind::Io)
    {
        let k = pci.held_count as usize;
        if k < MAX_HELD_BARS {
            pci.held[k] = PhysRange::new(b.base, b.size);
            pci.held_count += 1;
        } else {
            println!(
                "thinhv: warning: {}: BAR {} not held (too many)",
                pf.bdf, b.index
            );
        }
    }
    if shared.setup.os_vfs == 0 {
        return;
    }
    let slot = (0..thinhv_abi::handoff::MAX_SHARED_PFS).find(|&k| pci.presented[k].rid == 0);
    let vf = super::pci::vf_of(regions, pf, &shared.setup, 1);
    let m = pci.mediated[..pci.count as usize]
        .iter_mut()
        .find(|m| m.bus == pf.bdf.bus && m.devfn == pf.bdf.devfn());
    match (slot, vf, m) {
        (Some(k), Ok(vf), Some(m)) => {
            let mut d = PartitionDevice {
                rid: vf.bdf.rid(),
                vf_ids: u32::from(vf.vendor) | u32::from(vf.device) << 16,
                pf_rid: pf.bdf.rid(),
                ..PartitionDevice::default()
            };
            for b in vf.bars.iter().filter(|b| b.base != 0) {
                let n = usize::from(d.bar_count);
                if n < d.bars.len() {
                    d.bars[n] = PhysRange::new(b.base, b.size);
                    d.bar_regs[n] = b.index
                        | if b.kind == thinhv_passthrough::bars::BarKind::Mem64 {
                            BAR_REG_64
                        } else {
                            0
                        }
                        | if b.prefetchable { BAR_REG_PREFETCH } else { 0 };
                    d.bar_count += 1;
                }
            }
            // Its BAR 0 fixed for the OS (an Enhanced Allocation entry in
            // 16 free bytes of the VF's configuration space): Linux would
            // otherwise place it anew after a remove and rescan, where the
            // slot cannot follow.
            if d.bar_count == 1 && d.bars[0].end() <= 1 << 32 {
                use thinhv_passthrough::reset::FunctionConfig;
                let mut c = super::pci::function(regions, vf.bdf);
                let mut bytes = [0u8; 256];
                for (i, ch) in bytes.chunks_mut(4).enumerate() {
                    ch.copy_from_slice(&c.read32(4 * i as u16).to_le_bytes());
                }
                d.vdevfn = thinhv_passthrough::fixed_bar::free_slot(|o| bytes[usize::from(o)])
                    .and_then(|o| u8::try_from(o).ok())
                    .unwrap_or(0);
            }
            if d.vdevfn == 0 {
                println!(
                    "thinhv: NVMe {}: no room for an Enhanced Allocation capability in {}: the OS may move its BAR (a remove and rescan does), and its controller then no longer answers",
                    pf.bdf, vf.bdf
                );
            }
            pci.presented[k] = d;
            m.action = thinhv_abi::handoff::PCI_ACTION_PRESENT_VF;
            m.reserved = k as u8;
            if !pci.unblock(vf.bdf.rid()) {
                println!(
                    "thinhv: warning: {}: its DMA stays blocked (no room to unblock it)",
                    vf.bdf
                );
            }
            println!(
                "thinhv: NVMe {}: kept by thinhv; the OS sees its VF 1 ({}) in its place",
                pf.bdf, vf.bdf
            );
        }
        (_, Err(e), _) => println!(
            "thinhv: NVMe {}: the OS gets none of its controllers: {e}",
            pf.bdf
        ),
        _ => println!(
            "thinhv: NVMe {}: the OS gets none of its controllers (not mediated)",
            pf.bdf
        ),
    }
}

/// Every function of the OS's that signals by MSI or MSI-X (and is not
/// mediated otherwise) gets `PCI_ACTION_MSI`: the core keeps and judges
/// what the OS writes into its MSI capability and MSI-X table, and its
/// IOMMU entry remaps its messages; so do a PF whose VFs the OS shares
/// with appliances (its mediation flagged `MEDIATION_REMAP_MSI`) and
/// every VF of it that is not an appliance's (`shared_vfs`: the device
/// has them enabled from the start, the OS's view aside). A function
/// mediated for another reason (an NVMe VF in its PF's place) is not
/// remapped (said), nor one whose MSI-X table lies at or beyond
/// `limit` (the physical address width), where no one can reach it.
/// On AMD-Vi a function behind a conventional bridge, everything below it
/// the OS's, is remapped through a table the IDs it may send with share
/// (`iommu.shared`; the core gives each function there a part of it).
/// Returns how many of the OS's interrupt sources stay outside thinhv's
/// entries: functions not remapped (a table beyond reach, behind a
/// conventional bridge on VT-d without a bus check, mediated otherwise),
/// and SR-IOV PFs on which the OS can create virtual functions (their
/// tables are not trapped).
fn remap_os_msi(
    pci: &mut thinhv_abi::handoff::PciHandoff,
    functions: &[thinhv_passthrough::pci::Function],
    shared_vfs: &[(
        thinhv_passthrough::pci::Bdf,
        alloc::vec::Vec<thinhv_passthrough::pci::Function>,
    )],
    budget_vfs: &[(thinhv_passthrough::pci::Bdf, alloc::vec::Vec<u16>)],
    regions: &[thinhv_passthrough::pci::EcamRegion],
    limit: u64,
    iommu: &mut thinhv_abi::handoff::IommuHandoff,
) -> (usize, usize) {
    use thinhv_passthrough::pci::{CAP_ID_MSI, CAP_ID_MSIX};
    let vtd = iommu.kind == thinhv_abi::handoff::IOMMU_KIND_VTD;
    let mut ivrs_aliases = None;
    // Functions per shared table (AMD-Vi, behind a conventional bridge),
    // and how many one table has room for.
    let mut shared_members = [0usize; thinhv_abi::handoff::MAX_SHARED_TABLES];
    let shared_room = thinhv_passthrough::irq_remap::amdvi::ENTRIES
        / thinhv_passthrough::irq_remap::amdvi::MIN_SHARE;
    let mut names = String::new();
    let (mut n, mut other, mut over, mut beyond) = (0, 0, 0, 0);
    let mut vf_names = String::new();
    // The budget PFs whose VFs are registered after every function that
    // exists (below): a PF counts as remapped only once all of its VFs
    // are.
    let mut pending_pfs = alloc::vec::Vec::new();
    for f in functions
        .iter()
        .chain(shared_vfs.iter().flat_map(|(_, vfs)| vfs))
    {
        let rid = f.bdf.rid();
        let signals = f
            .caps
            .iter()
            .any(|c| c.0 == CAP_ID_MSI || c.0 == CAP_ID_MSIX);
        if f.bdf.segment != 0 || !signals || pci.is_blocked(rid) {
            continue;
        }
        // Behind a conventional bridge a function's messages carry the
        // bridge's ID, not its own: an entry bound to its own would refuse
        // them. On VT-d its entries check the bridge's buses instead;
        // elsewhere it is left as the OS programs it (and said).
        // AMD-Vi, behind a conventional bridge: the IDs whose table it
        // will share.
        let mut shared = None;
        let source = match conventional_source(f, functions, regions, pci, vtd) {
            Ok(thinhv_efi::iommu_plan::MsiSource::Shared {
                bridge,
                first,
                last,
            }) => {
                let aliases = ivrs_aliases.get_or_insert_with(super::iommu::ivrs_aliases);
                let ids = thinhv_efi::iommu_plan::shared_ids(bridge.rid(), first, last, aliases);
                // An ID the IVRS aliases them to, or one it says sends
                // with theirs, that is another owner's (outside the
                // bridge's buses, which msi_source checked) must not share
                // their table.
                let foreign = ids
                    .iter()
                    .skip(2)
                    .flat_map(|r| r.first..=r.last)
                    .find(|&id| {
                        pci.is_blocked(id)
                            || pci
                                .find((id >> 8) as u8, (id & 0xff) as u8)
                                .is_some_and(|m| m.action == thinhv_abi::handoff::PCI_ACTION_HIDE)
                    });
                if let Some(id) = foreign {
                    println!(
                        "thinhv: warning: interrupts: {}: behind the conventional PCI bridge {bridge}, whose IDs the IVRS aliases to or from {}, not the OS's: not remapped, a hostile OS can aim it at an appliance's processors",
                        f.bdf,
                        thinhv_passthrough::pci::Bdf::from_rid(0, id)
                    );
                    beyond += 1;
                    continue;
                }
                // The table is taken once the function is registered
                // (below): one left out before that keeps its IDs' entries
                // as they were.
                shared = Some(ids);
                thinhv_efi::iommu_plan::MsiSource::Shared {
                    bridge,
                    first,
                    last,
                }
            }
            Ok(s) => s,
            Err(why) => {
                println!(
                    "thinhv: warning: interrupts: {}: {why}: not remapped, a hostile OS can aim it at an appliance's processors",
                    f.bdf
                );
                beyond += 1;
                continue;
            }
        };
        if let Some(cap) = f.caps.iter().find(|c| c.0 == CAP_ID_MSIX) {
            let table = super::pci::read32(regions, f.bdf, cap.1 + 4);
            let at = f
                .bars
                .iter()
                .find(|b| u32::from(b.index) == table & 7)
                .map(|b| b.base + u64::from(table & !7));
            if at.is_none_or(|a| a == 0 || a >= limit) {
                println!(
                    "thinhv: warning: interrupts: {}: its MSI-X table ({}) is beyond the physical address width: not remapped, a hostile OS can aim it at an appliance's processors",
                    f.bdf,
                    at.map_or_else(|| String::from("in no memory BAR"), |a| format!("{a:#x}"))
                );
                beyond += 1;
                continue;
            }
        }
        if let Some(i) = pci.mediated[..pci.count as usize]
            .iter()
            .position(|m| m.bus == f.bdf.bus && m.devfn == f.bdf.devfn())
        {
            // A PF whose VFs it shares with appliances keeps its SR-IOV
            // view and has its own messages remapped too; any other
            // mediation is said.
            let m = &mut pci.mediated[i];
            let own = source == thinhv_efi::iommu_plan::MsiSource::Own;
            // (A budget of 0: the OS creates no VF.)
            let budget = m.action == thinhv_abi::handoff::PCI_ACTION_VF_BUDGET;
            if own && budget && m.os_vfs > 0 && budget_vfs.iter().any(|(pf, _)| *pf == f.bdf) {
                pending_pfs.push((i, f.bdf));
            } else if own
                && (m.action == thinhv_abi::handoff::PCI_ACTION_VF_SHARED
                    || budget && m.os_vfs == 0)
            {
                m.flags |= thinhv_abi::handoff::MEDIATION_REMAP_MSI;
                n += 1;
                let _ = write!(names, " {}", f.bdf);
            } else {
                other += 1;
            }
            continue;
        }
        let k = pci.count as usize;
        if k >= thinhv_abi::handoff::MAX_PCI_MEDIATED {
            over += 1;
            continue;
        }
        if let (
            Some(ids),
            thinhv_efi::iommu_plan::MsiSource::Shared {
                bridge,
                first,
                last,
            },
        ) = (&shared, source)
        {
            let table = thinhv_efi::iommu_plan::add_shared(iommu, ids);
            let members = table.map(|t| {
                let m = &mut shared_members[usize::from(t)];
                *m += 1;
                *m
            });
            if members.is_none_or(|m| m > shared_room) {
                println!(
                    "thinhv: warning: interrupts: {}: behind the conventional PCI bridge {bridge}: not remapped ({}); {}",
                    f.bdf,
                    if members.is_none() {
                        "too many such bridges"
                    } else {
                        "too many functions share its IDs"
                    },
                    if members.is_none() {
                        "a hostile OS can aim it at an appliance's processors"
                    } else {
                        "its messages name entries of the table the others there share, and are lost"
                    }
                );
                if let Some(t) = table {
                    shared_members[usize::from(t)] -= 1;
                }
                beyond += 1;
                continue;
            }
            println!(
                "thinhv: interrupts: {}: behind the conventional PCI bridge {bridge}: remapped through the table its IDs share (the bridge's, buses {first:02x}-{last:02x}{})",
                f.bdf,
                if ids.len() > 2 {
                    ", the IDs the IVRS aliases to or from them"
                } else {
                    ""
                }
            );
        }
        pci.mediated[k] = thinhv_abi::handoff::PciMediation {
            bus: f.bdf.bus,
            devfn: f.bdf.devfn(),
            action: thinhv_abi::handoff::PCI_ACTION_MSI,
            sriov_cap: f.msi_only().unwrap_or(0),
            ..Default::default()
        };
        if let thinhv_efi::iommu_plan::MsiSource::Buses {
            bridge: b,
            first,
            last,
        } = source
        {
            let m = &mut pci.mediated[k];
            m.source_check = thinhv_abi::handoff::MSI_SOURCE_BUSES;
            m.source = u16::from(first) << 8 | u16::from(last);
            println!(
                "thinhv: interrupts: {}: behind the PCI Express to PCI bridge {b}: its entries accept requesters on buses {first:02x}-{last:02x} (the IDs its messages carry)",
                f.bdf
            );
        }
        pci.count += 1;
        n += 1;
        let _ = write!(names, " {}", f.bdf);
    }
    // The VFs the OS may create on a PF with a plain budget, registered
    // now (they answer only once it turns VF Enable on) where the
    // functions that exist left room; the PF counts as remapped only if
    // all of its VFs are.
    let mut budget_done = alloc::vec::Vec::new();
    for (pf, rids) in budget_vfs {
        let room = (pci.count as usize + rids.len()) <= thinhv_abi::handoff::MAX_PCI_MEDIATED;
        if !room {
            over += rids.len();
            continue;
        }
        for &rid in rids {
            let k = pci.count as usize;
            pci.mediated[k] = thinhv_abi::handoff::PciMediation {
                bus: (rid >> 8) as u8,
                devfn: (rid & 0xff) as u8,
                action: thinhv_abi::handoff::PCI_ACTION_MSI,
                ..Default::default()
            };
            pci.count += 1;
            n += 1;
            let _ = write!(
                vf_names,
                " {}",
                thinhv_passthrough::pci::Bdf::from_rid(pf.segment, rid)
            );
        }
        budget_done.push(*pf);
    }
    for (i, bdf) in pending_pfs {
        if budget_done.contains(&bdf) {
            pci.mediated[i].flags |= thinhv_abi::handoff::MEDIATION_REMAP_MSI;
            n += 1;
            let _ = write!(names, " {bdf}");
        } else {
            other += 1;
        }
    }
    // A PF shared with appliances whose VFs of the OS's all answer, or
    // one with a plain budget whose VFs are all registered: those are
    // remapped, and the OS creates no other.
    let vf_pfs = functions
        .iter()
        .filter(|f| f.sriov.is_some() && !pci.is_blocked(f.bdf.rid()))
        .filter(|f| !shared_vfs.iter().any(|(pf, _)| *pf == f.bdf))
        .filter(|f| !budget_done.contains(&f.bdf))
        .filter(|f| {
            pci.find(f.bdf.bus, f.bdf.devfn()).is_none_or(|m| {
                !(m.action == thinhv_abi::handoff::PCI_ACTION_HIDE
                    || m.action == thinhv_abi::handoff::PCI_ACTION_VF_BUDGET && m.os_vfs == 0)
            })
        })
        .count();
    println!(
        "thinhv: interrupts: the OS's MSI and MSI-X functions remapped ({n}):{names}{vf_names}"
    );
    if other > 0 {
        println!(
            "thinhv: warning: interrupts: {other} function(s) of the OS's mediated otherwise are not remapped: a hostile OS can aim them at an appliance's processors"
        );
    }
    if over > 0 {
        println!(
            "thinhv: warning: interrupts: {over} function(s) of the OS's not remapped (too many mediated functions)"
        );
    }
    (other + over + beyond, vf_pfs)
}

/// The PFs with a plain VF budget (`PCI_ACTION_VF_BUDGET`, `os_vfs` above
/// 0) whose VFs' messages can be remapped, with the routing IDs of the
/// VFs the OS may create: First VF Offset and VF Stride read with NumVFs
/// set to the budget (they may depend on it; VF Enable is off, so nothing
/// appears), NumVFs then put back. Each gets a `PciHandoff::budget` entry
/// the core finds their MSI-X tables by. A PF whose VFs the firmware left
/// enabled, or that has no room, is said and left out.
fn budget_vfs(
    pci: &mut thinhv_abi::handoff::PciHandoff,
    functions: &[thinhv_passthrough::pci::Function],
    regions: &[thinhv_passthrough::pci::EcamRegion],
) -> alloc::vec::Vec<(thinhv_passthrough::pci::Bdf, alloc::vec::Vec<u16>)> {
    use thinhv_passthrough::reset::FunctionConfig;
    let mut out = alloc::vec::Vec::new();
    for i in 0..(pci.count as usize).min(thinhv_abi::handoff::MAX_PCI_MEDIATED) {
        let m = pci.mediated[i];
        if m.action != thinhv_abi::handoff::PCI_ACTION_VF_BUDGET || m.os_vfs == 0 {
            continue;
        }
        let Some((pf, cap)) = functions
            .iter()
            .find(|f| f.bdf.segment == 0 && f.bdf.bus == m.bus && f.bdf.devfn() == m.devfn)
            .and_then(|f| Some((f, f.sriov?)))
        else {
            continue;
        };
        let k = pci.budget_count as usize;
        if k >= thinhv_abi::handoff::MAX_SHARED_PFS {
            println!(
                "thinhv: warning: interrupts: {}: too many PFs with a VF budget: the VFs the OS creates are not remapped",
                pf.bdf
            );
            continue;
        }
        // Control and NumVFs as they are now (the firmware may have
        // changed them since the inventory).
        let mut f = super::pci::function(regions, pf.bdf);
        if f.read32(cap.offset + 8) & 1 != 0 {
            println!(
                "thinhv: warning: interrupts: {}: its VFs are enabled: the VFs the OS creates are not remapped",
                pf.bdf
            );
            continue;
        }
        let num_vfs = (f.read32(cap.offset + 0x10) & 0xffff) as u16;
        f.write16(cap.offset + 0x10, m.os_vfs);
        let v = f.read32(cap.offset + 0x14);
        // The layout with ARI Capable Hierarchy the other way (the OS
        // sets it where the port above forwards ARI, and a device may then
        // place its VFs elsewhere): where it differs, the VFs' IDs are not
        // known before the OS.
        let control = (f.read32(cap.offset + 8) & 0xffff) as u16;
        f.write16(cap.offset + 8, control ^ 0x10);
        let flipped = (f.read32(cap.offset + 8) & 0x10) as u16 != control & 0x10;
        let v_ari = if flipped {
            f.read32(cap.offset + 0x14)
        } else {
            v
        };
        f.write16(cap.offset + 8, control);
        f.write16(cap.offset + 0x10, num_vfs);
        if v_ari != v {
            println!(
                "thinhv: warning: interrupts: {}: its VFs' routing IDs change with ARI Capable Hierarchy (First VF Offset and VF Stride {v:#010x}, else {v_ari:#010x}): the VFs the OS creates are not remapped",
                pf.bdf
            );
            continue;
        }
        let (offset, stride) = ((v & 0xffff) as u16, (v >> 16) as u16);
        let rids: alloc::vec::Vec<u16> = (1..=m.os_vfs)
            .map_while(|k| {
                u16::try_from(
                    u32::from(pf.bdf.rid())
                        + u32::from(offset)
                        + u32::from(k - 1) * u32::from(stride),
                )
                .ok()
            })
            // On a bus the ECAM region decodes (else the core could not
            // trap its configuration space).
            .take_while(|r| (pci.bus_start..=pci.bus_end).contains(&((r >> 8) as u8)))
            .collect();
        if offset == 0 || (stride == 0 && m.os_vfs > 1) || rids.len() != usize::from(m.os_vfs) {
            println!(
                "thinhv: warning: interrupts: {}: its VFs' routing IDs do not fit (First VF Offset {offset:#x}, VF Stride {stride:#x}): the VFs the OS creates are not remapped",
                pf.bdf
            );
            continue;
        }
        let masks = thinhv_passthrough::shared_pf::setup_for(pf, m.os_vfs, m.os_vfs)
            .map(|s| s.vf_bar_masks)
            .unwrap_or_default();
        pci.budget[k] = thinhv_abi::handoff::SharedPf {
            rid: pf.bdf.rid(),
            cap: cap.offset,
            os_vfs: m.os_vfs,
            first_vf_offset: offset,
            vf_stride: stride,
            // The page size the masks were sized under.
            page_size: f.read32(cap.offset + 0x20),
            vf_bar_masks: masks,
            ..Default::default()
        };
        pci.budget_count += 1;
        out.push((pf.bdf, rids));
    }
    out
}

/// Where `f`'s messages come from (`iommu_plan::msi_source`), the bridges'
/// PCI Express device/port type read from their configuration space.
fn conventional_source(
    f: &thinhv_passthrough::pci::Function,
    functions: &[thinhv_passthrough::pci::Function],
    regions: &[thinhv_passthrough::pci::EcamRegion],
    pci: &thinhv_abi::handoff::PciHandoff,
    vtd: bool,
) -> Result<thinhv_efi::iommu_plan::MsiSource, String> {
    let conventional = |b: &thinhv_passthrough::pci::Function| {
        b.caps
            .iter()
            .find(|c| c.0 == thinhv_passthrough::pci::CAP_ID_PCIE)
            .map(|c| {
                // Device/port type, PCI Express capabilities bits 7:4: 7
                // is a PCI Express to PCI/PCI-X bridge.
                (super::pci::read32(regions, b.bdf, c.1) >> 20) & 0xf == 7
            })
    };
    let not_os = |g: &thinhv_passthrough::pci::Function| {
        pci.is_blocked(g.bdf.rid())
            || pci
                .find(g.bdf.bus, g.bdf.devfn())
                .is_some_and(|m| m.action == thinhv_abi::handoff::PCI_ACTION_HIDE)
    };
    thinhv_efi::iommu_plan::msi_source(f, functions, conventional, not_os, vtd)
}

/// Each AMD-Vi unit's own function, where the OS drives an emulated unit
/// in the real one's place (`PCI_ACTION_AMDVI_UNIT`): Linux drives a unit
/// only through its function, takes NpCache from its capability header,
/// and programs the unit's interrupt in its MSI capability; none of that
/// may reach the real unit thinhv drives. False where a unit's function
/// could not be so mediated (or none is named).
fn guard_amdvi_functions(
    pci: &mut thinhv_abi::handoff::PciHandoff,
    functions: &[thinhv_passthrough::pci::Function],
) -> bool {
    let units = super::iommu::amdvi_functions();
    let mut all = !units.is_empty();
    for (id, cap) in units {
        let Some(f) = functions
            .iter()
            .find(|f| f.bdf.segment == 0 && f.bdf.rid() == id)
        else {
            println!(
                "thinhv: warning: IOMMU: the AMD-Vi unit's function {:02x}:{:02x}.{} is not on the bus: the OS cannot drive its unit",
                id >> 8,
                (id >> 3) & 0x1f,
                id & 7
            );
            all = false;
            continue;
        };
        let k = pci.count as usize;
        if pci.find(f.bdf.bus, f.bdf.devfn()).is_some()
            || k >= thinhv_abi::handoff::MAX_PCI_MEDIATED
        {
            println!(
                "thinhv: warning: IOMMU: the AMD-Vi unit's function {} is mediated otherwise: the OS cannot drive its unit",
                f.bdf
            );
            all = false;
            continue;
        }
        pci.mediated[k] = thinhv_abi::handoff::PciMediation {
            bus: f.bdf.bus,
            devfn: f.bdf.devfn(),
            action: thinhv_abi::handoff::PCI_ACTION_AMDVI_UNIT,
            sriov_cap: cap,
            source: f
                .caps
                .iter()
                .find(|c| c.0 == thinhv_passthrough::pci::CAP_ID_MSI)
                .map_or(0, |c| c.1),
            ..Default::default()
        };
        pci.count += 1;
        println!(
            "thinhv: IOMMU: the AMD-Vi unit's function {}: the OS's view (its unit's interrupt, NpCache); nothing it writes reaches the real unit",
            f.bdf
        );
    }
    all
}

/// The bridges above `bdf` (an NVMe PF thinhv keeps) stay the OS's, but
/// their Secondary Bus Reset and Link Disable are refused: either would
/// reset the PF, which takes every secondary controller offline, and
/// nothing after the loader can bring them back.
fn guard_bridges_above(
    pci: &mut thinhv_abi::handoff::PciHandoff,
    functions: &[thinhv_passthrough::pci::Function],
    bdf: thinhv_passthrough::pci::Bdf,
) {
    let mut at = bdf;
    while let Some(b) = thinhv_passthrough::bars::parent_of(functions, at) {
        if b.bdf == at {
            break;
        }
        let k = pci.count as usize;
        if pci.find(b.bdf.bus, b.bdf.devfn()).is_some() {
            // Already mediated (hidden): nothing the OS can write.
        } else if k < thinhv_abi::handoff::MAX_PCI_MEDIATED {
            pci.mediated[k] = thinhv_abi::handoff::PciMediation {
                bus: b.bdf.bus,
                devfn: b.bdf.devfn(),
                action: thinhv_abi::handoff::PCI_ACTION_BRIDGE_GUARD,
                sriov_cap: b
                    .caps
                    .iter()
                    .find(|c| c.0 == thinhv_passthrough::pci::CAP_ID_PCIE)
                    .map_or(0, |c| c.1),
                ..Default::default()
            };
            pci.count += 1;
            println!(
                "thinhv: PCI {}: the OS's, but its Secondary Bus Reset and Link Disable are refused (the NVMe PF {bdf} below is thinhv's)",
                b.bdf
            );
        } else {
            println!(
                "thinhv: warning: PCI {}: cannot be guarded (too many mediated functions): the OS can reset the NVMe PF {bdf} below",
                b.bdf
            );
        }
        at = b.bdf;
    }
}

/// With appliances, the OS's I/O APIC entries are judged like its MSIs
/// (`[iommu] interrupts = "remap"`, whatever the IOMMU): thinhv traps
/// their register pages, so that no entry the OS writes sends an
/// interrupt, NMI, INIT or SMI to an appliance's processor.
///
/// Each gets the source ID the DMAR (or the IVRS) names for it: on VT-d
/// its entries then go through the unit's remapping table; on AMD-Vi its
/// messages are the ones left unremapped when the rest are aborted.
/// Returns how many I/O APICs are not judged or have no known source ID.
fn judge_io_apics(h: &mut Handoff, sources: Option<&thinhv_efi::iommu_plan::IrqSources>) -> usize {
    if h.iommu.interrupts != thinhv_abi::handoff::IOMMU_INTERRUPTS_REMAP {
        println!(
            "thinhv: warning: interrupts: [iommu] interrupts = \"off\": the OS's I/O APIC entries are not judged; a hostile OS can aim them at an appliance's processors"
        );
        return 0;
    }
    let list = match super::appliances::io_apics() {
        Ok(l) => l,
        Err(e) => {
            println!(
                "thinhv: warning: interrupts: cannot read the I/O APICs from the MADT ({e}); their entries are not judged"
            );
            return 1;
        }
    };
    let mut left = 0;
    let top = thinhv_abi::handoff::identity_map_top(h.phys_top);
    for a in list {
        let base = u64::from(a.address);
        if base % 4096 != 0 || base.saturating_add(4096) > top {
            println!(
                "thinhv: warning: interrupts: I/O APIC {} at {base:#x} cannot be trapped (not a page of its own in thinhv's map); its entries are not judged",
                a.id
            );
            left += 1;
            continue;
        }
        let Some(slot) = h.ioapics.get_mut(h.ioapic_count as usize) else {
            println!(
                "thinhv: warning: interrupts: I/O APIC {} at {base:#x}: more I/O APICs than thinhv judges; its entries are not judged",
                a.id
            );
            left += 1;
            continue;
        };
        let sid = sources.and_then(|s| s.ioapic(a.id));
        *slot = thinhv_abi::handoff::IoApicInfo {
            base,
            gsi_base: a.gsi_base,
            id: u32::from(a.id),
            source: sid.map_or(0, |s| {
                thinhv_abi::handoff::IOAPIC_SOURCE_KNOWN | u32::from(s)
            }),
            reserved: 0,
        };
        h.ioapic_count += 1;
        if sources.is_some() && sid.is_none() {
            left += 1;
        }
        println!(
            "thinhv: interrupts: I/O APIC {} at {base:#x} (GSI {}+): its entries judged{}",
            a.id,
            a.gsi_base,
            sid.map_or_else(String::new, |s| format!(
                " (source {:02x}:{:02x}.{} in the {})",
                s >> 8,
                (s >> 3) & 0x1f,
                s & 7,
                if h.iommu.kind == thinhv_abi::handoff::IOMMU_KIND_AMDVI {
                    "IVRS"
                } else {
                    "DMAR"
                }
            ))
        );
    }
    left
}

/// With appliances, the OS may not turn on an HPET timer's FSB delivery
/// (`[iommu] interrupts = "remap"`): thinhv makes the HPET's register
/// page read-only for it and passes every store on without
/// Tn_FSB_EN_CNF, so that no timer sends a message of the OS's
/// composing; its timers interrupt through their I/O APIC routes, which
/// thinhv judges. Returns (HPETs guarded, HPETs the firmware's tables give
/// that are not: more than one, one that is not a page of its own in
/// thinhv's map, a table that gives no register block in memory).
fn guard_hpet(h: &mut Handoff) -> (usize, usize) {
    if h.iommu.interrupts != thinhv_abi::handoff::IOMMU_INTERRUPTS_REMAP {
        return (0, 0);
    }
    let (bases, unusable) = super::appliances::hpets();
    let top = thinhv_abi::handoff::identity_map_top(h.phys_top);
    let mut left = unusable;
    if unusable > 0 {
        println!(
            "thinhv: warning: interrupts: {unusable} HPET table(s) give no register block in memory: their FSB delivery is not withheld"
        );
    }
    for base in bases {
        if h.hpet != 0 || base % 4096 != 0 || base.saturating_add(4096) > top {
            println!(
                "thinhv: warning: interrupts: HPET at {base:#x}: {}; the OS can turn on its FSB delivery and aim it at an appliance's processors",
                if h.hpet != 0 {
                    "thinhv guards one HPET"
                } else {
                    "not a page of its own in thinhv's map"
                }
            );
            left += 1;
            continue;
        }
        h.hpet = base;
        println!(
            "thinhv: interrupts: HPET at {base:#x}: the OS's stores pass without FSB delivery (its timers interrupt through the I/O APIC)"
        );
    }
    (usize::from(h.hpet != 0), left)
}

/// Whether the IOMMU may refuse every interrupt message that names no
/// entry of thinhv's once the appliances are claimed
/// (`IOMMU_FLAG_BLOCK_COMPAT`: on VT-d compatibility format blocked, on
/// AMD-Vi every requester ID without a remapping table aborted, the I/O
/// APICs' excepted): only where every interrupt source of the OS's sends
/// through an entry thinhv writes. Without it, a device's own DMA to the
/// interrupt window still passes as written; the warning names why.
fn block_compat_if_all_remapped(
    h: &mut Handoff,
    (functions, vf_pfs): (usize, usize),
    ioapics: usize,
    hpets: (usize, usize),
    sources: Option<&thinhv_efi::iommu_plan::IrqSources>,
) {
    let why =
        thinhv_efi::iommu_plan::unremapped_sources(functions, vf_pfs, ioapics, hpets, sources);
    let amd = h.iommu.kind == thinhv_abi::handoff::IOMMU_KIND_AMDVI;
    if why.is_empty() {
        h.iommu.flags |= thinhv_abi::handoff::IOMMU_FLAG_BLOCK_COMPAT;
        println!(
            "thinhv: interrupts: every interrupt source of the OS's goes through thinhv's entries: {} once the appliances start",
            if amd {
                "the interrupts of every other requester ID aborted (AMD-Vi, the I/O APICs excepted, where every appliance function is remapped)"
            } else {
                "compatibility-format messages blocked (where the VT-d unit remaps interrupts and every appliance function is remapped)"
            }
        );
    } else {
        println!(
            "thinhv: warning: interrupts: {} ({}): a device's own DMA to the interrupt window is not stopped",
            if amd {
                "requester IDs without a remapping table keep sending unremapped on AMD-Vi"
            } else {
                "compatibility-format messages stay allowed on VT-d"
            },
            why.join("; ")
        );
    }
}

fn carve_for_appliances(list: &[super::appliances::Accepted]) {
    let ids: Vec<u32> = list
        .iter()
        .flat_map(|a| a.apic_ids.iter().copied())
        .collect();
    match super::appliances::carve_madt(&ids) {
        Ok(n) => {
            println!("thinhv: MADT: {n} appliance processor entries removed from the OS's view");
        }
        Err(e) => println!(
            "thinhv: MADT: cannot remove the appliance processors ({e}); the OS sees them but cannot start them"
        ),
    }
    if let Err(e) = super::appliances::hook_exit_boot_services() {
        println!(
            "thinhv: cannot hook ExitBootServices ({e}): the appliance processors stay with the firmware"
        );
    }
}

/// Returns every virtualized CPU to native mode; returns how many could not.
fn rollback(
    mp: Option<&MpServices>,
    ctx: &ApContext,
    ctx_ptr: *mut c_void,
    bsp_idx: usize,
) -> usize {
    if let Some(mp) = mp {
        for i in 0..ctx.count {
            if i != bsp_idx && ctx.results[i].load(Ordering::SeqCst) == 0 {
                let _ = mp.startup_this_ap(
                    ctx.numbers[i],
                    ap_devirtualize,
                    ctx_ptr,
                    None,
                    Some(Duration::from_secs(5)),
                );
            }
        }
    }
    // SAFETY: the BSP is under thinhv (it was virtualized first), not sealed.
    let r = unsafe { vmmcall(Function::DEVIRTUALIZE.0, 0, 0, 0) };
    if r[0] == Status::OK.0 {
        ctx.results[bsp_idx].store(NOT_RUN, Ordering::SeqCst);
    }
    (0..ctx.count)
        .filter(|&i| ctx.results[i].load(Ordering::SeqCst) == 0)
        .count()
}
