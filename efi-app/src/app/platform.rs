//! Platform discovery: the processor, the processors, the memory map.
use alloc::vec::Vec;
use core::arch::asm;
use thinhv_efi::cpu_check::{Probe, VmxProbe};
use thinhv_efi::memmap::{Descriptor, MemType, Summary, summarize};
use uefi::boot::{self, ScopedProtocol};
use uefi::mem::memory_map::MemoryMap;
use uefi::proto::pi::mp::MpServices;

/// CPUID.
pub fn cpuid(leaf: u32, sub: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, sub);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// VM_CR (AMD).
const MSR_VM_CR: u32 = 0xc001_0114;

fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: only called for VM_CR after CPUID reported SVM, or for the VMX
    // MSRs after CPUID reported VMX (and the optional ones when advertised):
    // the MSRs exist, and reading them has no side effects.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Reads what `cpu_check::assess` needs on this processor.
pub fn probe() -> Probe {
    let l0 = cpuid(0, 0);
    let mut vendor = [0u8; 12];
    vendor[0..4].copy_from_slice(&l0[1].to_le_bytes());
    vendor[4..8].copy_from_slice(&l0[3].to_le_bytes());
    vendor[8..12].copy_from_slice(&l0[2].to_le_bytes());
    let max_ext = cpuid(0x8000_0000, 0)[0];
    let ext = |leaf: u32| {
        if max_ext >= leaf {
            cpuid(leaf, 0)
        } else {
            [0; 4]
        }
    };
    let e1 = ext(0x8000_0001);
    let e8 = ext(0x8000_0008);
    let ea = ext(0x8000_000a);
    let amd = &vendor == b"AuthenticAMD" || &vendor == b"HygonGenuine";
    let svm = amd && max_ext >= 0x8000_000a && e1[2] & (1 << 2) != 0;
    let vmx = &vendor == b"GenuineIntel" && cpuid(1, 0)[2] & (1 << 5) != 0;
    Probe {
        vendor,
        max_ext_leaf: max_ext,
        leaf1_ecx: cpuid(1, 0)[2],
        ext1_ecx: e1[2],
        ext1_edx: e1[3],
        ext8_eax: e8[0],
        svm_edx: ea[3],
        svm_asids: ea[1],
        vm_cr: svm.then(|| rdmsr(MSR_VM_CR)),
        vmx: vmx.then(vmx_probe),
    }
}

/// The VMX MSRs (they exist when CPUID reports VMX; the TRUE and
/// secondary ones are read only when advertised).
fn vmx_probe() -> VmxProbe {
    let basic = rdmsr(0x480);
    let proc1 = rdmsr(if basic & (1 << 55) != 0 { 0x48e } else { 0x482 });
    let proc1_allowed1 = (proc1 >> 32) as u32;
    let proc2_allowed1 = if proc1_allowed1 & (1 << 31) != 0 {
        (rdmsr(0x48b) >> 32) as u32
    } else {
        0
    };
    let ept_vpid = if proc2_allowed1 & ((1 << 1) | (1 << 5)) != 0 {
        rdmsr(0x48c)
    } else {
        0
    };
    VmxProbe {
        feature_control: rdmsr(0x3a),
        proc1_allowed1,
        proc2_allowed1,
        ept_vpid,
        misc: rdmsr(0x485),
    }
}

/// The APIC ID of the calling processor.
pub fn apic_id() -> u32 {
    if cpuid(0, 0)[0] >= 0xb && cpuid(0xb, 0)[1] != 0 {
        cpuid(0xb, 0)[3]
    } else {
        cpuid(1, 0)[1] >> 24
    }
}

/// One processor as MP services reports it.
#[derive(Clone, Copy, Debug)]
pub struct Processor {
    /// MP services number.
    pub number: usize,
    /// APIC ID.
    pub apic_id: u32,
    /// The bootstrap processor.
    pub bsp: bool,
    /// Enabled.
    pub enabled: bool,
}

/// The MP services protocol, if the firmware has it.
pub fn mp_services() -> Option<ScopedProtocol<MpServices>> {
    let h = boot::get_handle_for_protocol::<MpServices>().ok()?;
    boot::open_protocol_exclusive::<MpServices>(h).ok()
}

/// Every processor. Without MP services: the BSP alone.
pub fn processors(mp: Option<&MpServices>) -> Vec<Processor> {
    let Some(mp) = mp else {
        return alloc::vec![Processor {
            number: 0,
            apic_id: apic_id(),
            bsp: true,
            enabled: true
        }];
    };
    let Ok(count) = mp.get_number_of_processors() else {
        return alloc::vec![Processor {
            number: 0,
            apic_id: apic_id(),
            bsp: true,
            enabled: true
        }];
    };
    (0..count.total)
        .filter_map(|i| {
            let info = mp.get_processor_info(i).ok()?;
            Some(Processor {
                number: i,
                apic_id: u32::try_from(info.processor_id).unwrap_or(u32::MAX),
                bsp: info.is_bsp(),
                enabled: info.is_enabled(),
            })
        })
        .collect()
}

/// The memory map, reduced.
pub fn memory() -> Option<Summary> {
    let map = boot::memory_map(boot::MemoryType::LOADER_DATA).ok()?;
    let descs: Vec<Descriptor> = map
        .entries()
        .map(|d| Descriptor {
            ty: MemType(d.ty.0),
            phys_start: d.phys_start,
            pages: d.page_count,
        })
        .collect();
    Some(summarize(&descs))
}
