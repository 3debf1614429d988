//! The intercepts every guest VMCB carries (AMD APM Vol. 2 §15.9–§15.13,
//! Table B-1 "VMCB Layout, Control Area" offsets 0x0C and 0x10), in one
//! place so that a test can say what a guest can and cannot do unseen.
use super::vmcb::{misc1, misc2};

/// Vector 3 (offset 0x0C): NMI and INIT (thinhv's wake-ups and the
/// virtual INIT), CPUID, INVD (a guest INVD would discard the hypervisor's
/// unwritten data: §15.13.1 lists it among the instruction intercepts; it
/// is done as WBINVD), INVLPGA, the MSR map, and shutdown (triple fault).
pub const MISC1: u32 = misc1::NMI
    | misc1::INIT
    | misc1::CPUID
    | misc1::INVD
    | misc1::INVLPGA
    | misc1::MSR_PROT
    | misc1::SHUTDOWN;

/// Vector 4 (offset 0x10): every SVM instruction (the guest sees no SVM:
/// #UD) and VMMCALL (hypercalls).
pub const MISC2: u32 = misc2::VMRUN
    | misc2::VMMCALL
    | misc2::VMLOAD
    | misc2::VMSAVE
    | misc2::STGI
    | misc2::CLGI
    | misc2::SKINIT;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_cannot_invd_or_touch_svm_unseen() {
        // APM Table B-1: INVD is bit 22 of vector 3.
        assert_ne!(MISC1 & (1 << 22), 0, "INVD");
        assert_ne!(MISC1 & misc1::INIT, 0);
        assert_ne!(MISC1 & misc1::NMI, 0);
        assert_ne!(MISC1 & misc1::SHUTDOWN, 0);
        assert_ne!(MISC1 & misc1::MSR_PROT, 0);
        for bit in [
            misc2::VMRUN,
            misc2::VMLOAD,
            misc2::VMSAVE,
            misc2::STGI,
            misc2::CLGI,
            misc2::SKINIT,
        ] {
            assert_ne!(MISC2 & bit, 0);
        }
    }
}
