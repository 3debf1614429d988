//! Partitions: the OS is partition 0, each appliance another
//! (`docs/appliances.md`). A partition owns its processors, its RAM and
//! its state; whatever crosses partitions is checked where thinhv sees it
//! (`handlers::ipi` for IPIs, [`crate::hv::Hv::foreign_ram`] for memory
//! thinhv reads or writes for a guest).
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use thinhv_abi::PhysRange;
use thinhv_abi::handoff::PartitionInfo;
use thinhv_abi::status::ApplianceRecord;

/// A partition number: 0 is the OS, `n` is appliance `n`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct PartitionId(pub u8);

impl PartitionId {
    /// The OS.
    pub const OS: Self = Self(0);

    /// Whether this is the OS's partition.
    pub const fn is_os(self) -> bool {
        self.0 == 0
    }
}

/// Where an appliance partition is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionState(pub u32);

#[allow(missing_docs)]
impl PartitionState {
    /// Its processors still serve the firmware (until the OS's
    /// ExitBootServices: the firmware's own AP handling at that point needs
    /// every processor it started, `docs/appliances.md`).
    pub const UNCLAIMED: Self = Self(0);
    /// Claimed: its processors wait in thinhv, nothing runs.
    pub const STOPPED: Self = Self(1);
    pub const STARTING: Self = Self(2);
    pub const RUNNING: Self = Self(3);
    pub const CRASHED: Self = Self(4);

    /// Its name in logs and listings.
    pub const fn name(self) -> &'static str {
        thinhv_abi::status::appliance_state_name(self.0)
    }
}

/// The BAR registers of a function given to an appliance, as it sees
/// them (`handlers::appliance_pci`).
#[derive(Clone, Copy, Debug, Default)]
pub struct BarShadow {
    pub(crate) value: [u32; 6],
    pub(crate) mask: [u32; 6],
    pub(crate) flags: [u32; 6],
}

/// One appliance partition.
#[derive(Debug)]
pub struct Partition {
    /// What the loader set up.
    pub info: PartitionInfo,
    state: AtomicU32,
    /// Its console UART (`console = "log"`).
    pub console: spin::Mutex<crate::uart::Uart>,
    /// TSC when its kernel last started.
    pub started_tsc: AtomicU64,
    /// Starts after the first.
    pub restarts: AtomicU32,
    /// Crashes.
    pub crashes: AtomicU32,
    /// Why it last stopped.
    reason: spin::Mutex<[u8; 40]>,
    /// Its RAM holds the image as the loader laid it out, never run: the
    /// first boot needs no scrub and no restore.
    pub fresh: AtomicBool,
    /// Its processors were handed over in x2APIC mode.
    pub in_x2apic: AtomicBool,
    /// Its functions' BARs as it sees them.
    pub bar_shadow: spin::Mutex<[BarShadow; thinhv_abi::handoff::MAX_PARTITION_DEVICES]>,
    /// Its functions' MSI address and data as it wrote them, where the
    /// function's messages are remapped (`handlers::msi_remap`).
    pub msi_shadow: spin::Mutex<[MsiShadow; thinhv_abi::handoff::MAX_PARTITION_DEVICES]>,
}

/// The MSI address and data an appliance wrote into one of its functions
/// (the function holds a message naming its remapping entry instead).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiShadow {
    /// Message address, both halves.
    pub addr: u64,
    /// Message data (16 bits).
    pub data: u16,
    /// Where its MSI capability is (0: not looked up yet), and whether
    /// its address is 64 bits wide.
    pub cap: u16,
    /// See `cap`.
    pub wide: bool,
    /// The message last refused (address, data), counted once however
    /// often the owner writes it again.
    pub refused: Option<(u64, u32)>,
    /// Where its MSI-X capability is: 0 not looked up yet, 1 none.
    pub msix: u16,
}

/// An MSI-X table thinhv traps: where it is, and the messages its owner
/// wrote into it (the function holds messages naming its remapping
/// entries).
#[derive(Clone, Debug, Default)]
pub struct MsixTable {
    /// Whose function.
    pub owner: PartitionId,
    /// Physical address of entry 0.
    pub base: u64,
    /// Entries.
    pub entries: u16,
    /// Per entry: address, data, and the message last refused.
    pub shadow: alloc::vec::Vec<MsixEntry>,
}

/// One MSI-X entry as its owner wrote it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsixEntry {
    /// Message address.
    pub addr: u64,
    /// Message data.
    pub data: u32,
    /// The message last refused.
    pub refused: Option<(u64, u32)>,
}

impl MsixTable {
    /// The pages it spans.
    pub fn pages(&self) -> core::ops::Range<u64> {
        let first = self.base & !0xfff;
        // Empty where it would wrap (an owner's BAR near the top).
        let end = self
            .base
            .checked_add(u64::from(self.entries) * 16 + 0xfff)
            .map_or(first, |e| e & !0xfff);
        first..end
    }
}

impl Partition {
    /// From the hand-off.
    pub fn new(info: PartitionInfo) -> Self {
        Self {
            info,
            state: AtomicU32::new(PartitionState::UNCLAIMED.0),
            console: spin::Mutex::new(crate::uart::Uart::default()),
            started_tsc: AtomicU64::new(0),
            restarts: AtomicU32::new(0),
            crashes: AtomicU32::new(0),
            reason: spin::Mutex::new([0; 40]),
            fresh: AtomicBool::new(true),
            in_x2apic: AtomicBool::new(false),
            bar_shadow: spin::Mutex::new(core::array::from_fn(|i| {
                info.devices()
                    .get(i)
                    .map(BarShadow::new)
                    .unwrap_or_default()
            })),
            msi_shadow: spin::Mutex::new(Default::default()),
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        self.info.name()
    }

    /// Its RAM.
    pub fn ram(&self) -> PhysRange {
        self.info.ram
    }

    /// Its state.
    pub fn state(&self) -> PartitionState {
        PartitionState(self.state.load(Ordering::SeqCst))
    }

    /// Moves from `from` to `to`; false if it was not in `from`.
    pub fn transition(&self, from: PartitionState, to: PartitionState) -> bool {
        self.state
            .compare_exchange(from.0, to.0, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// Stops it, from whatever state it is in once claimed; returns the
    /// state it left, or `None` when it was unclaimed or already stopped.
    pub fn stop(&self) -> Option<PartitionState> {
        self.state
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |s| {
                let s = PartitionState(s);
                (s != PartitionState::UNCLAIMED && s != PartitionState::STOPPED)
                    .then_some(PartitionState::STOPPED.0)
            })
            .ok()
            .map(PartitionState)
    }

    /// Whether the OS may stop and start it (`control = "os"`).
    pub fn os_may_control(&self) -> bool {
        self.info.flags & thinhv_abi::handoff::partition_flags::OS_CONTROL != 0
    }

    /// Records why it stopped (cut to 40 bytes).
    pub fn set_reason(&self, why: &str) {
        let mut r = self.reason.lock();
        *r = [0; 40];
        let n = why.len().min(40);
        r[..n].copy_from_slice(&why.as_bytes()[..n]);
    }

    /// Its record for the status page (`thinhv appliances`).
    /// `cpu_mask`: its processors by CPU index.
    pub fn record(&self, first_apic_id: u32, cpu_mask: u64) -> ApplianceRecord {
        let mut r: ApplianceRecord = zerocopy::FromZeros::new_zeroed();
        r.name = self.info.name;
        r.state = self.state().0;
        r.cpu_count = self.info.cpu_count;
        r.ram_base = self.info.ram.base;
        r.ram_size = self.info.ram.size;
        r.started_tsc = self.started_tsc.load(Ordering::SeqCst);
        r.tsc_khz = self.info.tsc_khz;
        r.restarts = self.restarts.load(Ordering::SeqCst);
        r.crashes = self.crashes.load(Ordering::SeqCst);
        r.flags = u32::from(self.info.flags)
            | if self.in_x2apic.load(Ordering::SeqCst) {
                thinhv_abi::status::APPLIANCE_IN_X2APIC
            } else {
                0
            };
        r.console_port = self.info.console_port;
        r.first_apic_id = u16::try_from(first_apic_id).unwrap_or(u16::MAX);
        r.reason = *self.reason.lock();
        r.cpu_mask = cpu_mask;
        r
    }

    /// Whether its processors start in x2APIC mode on a processor with
    /// CPUID.1:ECX.x2APIC `has_x2apic`.
    pub fn wants_x2apic(&self, has_x2apic: bool) -> bool {
        has_x2apic && self.info.flags & thinhv_abi::handoff::partition_flags::X2APIC != 0
    }

    /// Whether its processors are its own (no longer the firmware's).
    pub fn claimed(&self) -> bool {
        self.state() != PartitionState::UNCLAIMED
    }
}
