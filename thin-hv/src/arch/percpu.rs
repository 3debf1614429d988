//! Per-CPU memory: control blocks, host GDT/TSS, world-switch state and
//! stacks, one `PerCpu` per processor carved from the pool.
use crate::svm::vmcb::Vmcb;
use core::mem::{offset_of, size_of};
use thinhv_abi::layout::{IST_SIZE, STACK_SIZE, per_cpu_bytes};

/// Guest registers not held by the control block, indexed by encoding
/// (RAX and RSP slots unused on SVM: the VMCB holds them).
pub type GuestRegs = [u64; 16];

/// What the world-switch assembly reads and writes. Offsets are part of
/// the assembly in [`super::svm`]; they are checked below.
#[derive(Debug)]
#[repr(C)]
pub struct RunState {
    /// +0: guest GPRs.
    pub regs: GuestRegs,
    /// +128: physical address of the guest control block (VMCB, or VMCS
    /// region).
    pub guest_control_pa: u64,
    /// +136: physical address of the host state block (SVM's VMSAVE/VMLOAD
    /// area; 0 on VMX).
    pub host_state_pa: u64,
    /// +144: CPU index.
    pub cpu: u64,
    /// +152: number of exits so far on this CPU.
    pub exits: u64,
    /// +160: VMX: an NMI is held for the guest until it can take one.
    pub nmi_pending: u64,
}

/// Offsets used by the assembly.
pub const RUN_GUEST_CONTROL: usize = 128;
/// Offsets used by the assembly.
pub const RUN_HOST_STATE: usize = 136;
const _: () = assert!(offset_of!(RunState, guest_control_pa) == RUN_GUEST_CONTROL);
const _: () = assert!(offset_of!(RunState, host_state_pa) == RUN_HOST_STATE);

/// 64-bit TSS (Intel SDM Vol. 3A §8.7, Figure 8-11).
#[derive(Debug, Default, Clone, Copy)]
#[repr(C, packed(4))]
pub struct Tss {
    /// +0
    pub reserved0: u32,
    /// +4: RSP0..2.
    pub rsp: [u64; 3],
    /// +28
    pub reserved1: u64,
    /// +36: IST1..7.
    pub ist: [u64; 7],
    /// +92
    pub reserved2: u64,
    /// +100
    pub reserved3: u16,
    /// +102: I/O map base (beyond the limit: no I/O bitmap).
    pub iomap_base: u16,
}

const _: () = assert!(size_of::<Tss>() == 104);

/// The page holding GDT, TSS and the world-switch state.
#[derive(Debug)]
#[repr(C, align(4096))]
pub struct MiscPage {
    /// Host GDT: null, code64 (0x08), data (0x10), TSS (0x18, 16 bytes).
    pub gdt: [u64; 6],
    /// Host TSS.
    pub tss: Tss,
    /// World-switch state.
    pub run: RunState,
    /// Padding to a page.
    pub pad: [u8; 4096 - 48 - 104 - size_of::<RunState>()],
}

/// One CPU's memory.
#[repr(C, align(4096))]
pub struct PerCpu {
    /// The guest's control block. SVM: its VMCB. VMX: the page is the
    /// VMCS region ([`PerCpu::vmcs_region_pa`]), in the processor's own
    /// format, reached only through VMREAD/VMWRITE; it is never read as a
    /// `Vmcb` there.
    pub guest_control: Vmcb,
    /// SVM: the host save area (VM_HSAVE_PA), owned by the processor. VMX:
    /// the VMXON region ([`PerCpu::vmxon_region_pa`]).
    pub host_save_area: [u8; 4096],
    /// SVM: the host's hidden state (VMSAVE/VMLOAD). Unused on VMX.
    pub host_state: Vmcb,
    /// GDT, TSS, run state.
    pub misc: MiscPage,
    /// NMI stack (IST1).
    pub ist_nmi: [u8; IST_SIZE as usize],
    /// Double-fault stack (IST2).
    pub ist_df: [u8; IST_SIZE as usize],
    /// Machine-check stack (IST3).
    pub ist_mc: [u8; IST_SIZE as usize],
    /// Host stack.
    pub stack: [u8; STACK_SIZE as usize],
}

const _: () = assert!(size_of::<PerCpu>() as u64 == per_cpu_bytes());

/// GDT selectors.
pub const SEL_CODE: u16 = 0x08;
/// GDT selectors.
pub const SEL_DATA: u16 = 0x10;
/// GDT selectors.
pub const SEL_TSS: u16 = 0x18;

impl PerCpu {
    /// Physical (= virtual) address of a field.
    pub fn pa_of<T>(field: &T) -> u64 {
        core::ptr::from_ref(field) as u64
    }

    /// VMX: the VMCS region (the `guest_control` page).
    pub fn vmcs_region_pa(&self) -> u64 {
        Self::pa_of(&self.guest_control)
    }

    /// VMX: the VMXON region (the `host_save_area` page).
    pub fn vmxon_region_pa(&self) -> u64 {
        Self::pa_of(&self.host_save_area)
    }

    /// Top of the host stack (16-byte aligned).
    pub fn stack_top(&self) -> u64 {
        (Self::pa_of(&self.stack) + STACK_SIZE) & !0xf
    }

    /// Fills GDT and TSS.
    pub fn init_gdt(&mut self) {
        let ist_top =
            |s: &[u8; IST_SIZE as usize]| (core::ptr::from_ref(s) as u64 + IST_SIZE) & !0xf;
        let tss = Tss {
            ist: [
                ist_top(&self.ist_nmi),
                ist_top(&self.ist_df),
                ist_top(&self.ist_mc),
                0,
                0,
                0,
                0,
            ],
            iomap_base: 104,
            ..Tss::default()
        };
        self.misc.tss = tss;
        let base = core::ptr::from_ref(&self.misc.tss) as u64;
        let limit = (size_of::<Tss>() - 1) as u64;
        // Available 64-bit TSS (type 9), present.
        let low = (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (0x89u64 << 40)
            | (((limit >> 16) & 0xf) << 48)
            | (((base >> 24) & 0xff) << 56);
        self.misc.gdt = [
            0,
            0x00af_9b00_0000_ffff,
            0x00cf_9300_0000_ffff,
            low,
            base >> 32,
            0,
        ];
    }
}
