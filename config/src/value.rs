//! Value types with their accepted spellings.
use alloc::string::String;
use core::fmt;
use serde::Deserialize;
use serde::de::{self, Visitor};

/// `hypervisor.log_level`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Nothing.
    Off,
    /// Errors only.
    Error,
    /// Errors and warnings.
    Warn,
    /// Normal (default).
    Info,
    /// Verbose.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    /// The spelling in the file.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Error => "error",
            Self::Warn => "warn",
            Self::Info => "info",
            Self::Debug => "debug",
            Self::Trace => "trace",
        }
    }

    /// 0 (off) ..= 5 (trace), as [`thinhv_abi`]'s `CoreConfig` carries it.
    pub const fn as_u8(self) -> u8 {
        self as u8
    }
}

/// `hypervisor.on_fatal`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFatal {
    /// Print the state and stop the CPU (default).
    Halt,
    /// Print the state and reset the machine.
    Reset,
}

impl OnFatal {
    /// The spelling in the file.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Halt => "halt",
            Self::Reset => "reset",
        }
    }
}

/// `cpu.init_sipi`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InitSipi {
    /// The VMX wait-for-SIPI activity state when the processor has it,
    /// else interception (default).
    #[default]
    Auto,
    /// Always the VMX wait-for-SIPI activity state.
    Activity,
    /// Intercept writes to the APIC's interrupt command register and start
    /// APs from the hypervisor (what SVM always does).
    Intercept,
}

impl InitSipi {
    /// The spelling in the file.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Activity => "activity",
            Self::Intercept => "intercept",
        }
    }
}

/// `iommu.mode`: who owns the platform IOMMU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IommuMode {
    /// `protect`, unless a processor's APIC ID is above 254: such processors
    /// need the OS's own interrupt remapping, which needs the IOMMU, so the
    /// IOMMU is then left to the OS (with a warning).
    #[default]
    Auto,
    /// thinhv owns the IOMMU and hides it from the OS: no device can DMA
    /// into the hypervisor.
    Protect,
    /// The OS owns the IOMMU; thinhv is not protected from DMA.
    Off,
}

impl IommuMode {
    /// The spelling in the file.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Off => "off",
            Self::Protect => "protect",
        }
    }
}

/// `iommu.interrupts`: whether thinhv remaps interrupt messages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IommuInterrupts {
    /// With appliances, on an AMD-Vi unit thinhv owns: the OS's and the
    /// appliances' functions reach only their own processors.
    #[default]
    Remap,
    /// Messages pass as functions send them: a partition's devices can
    /// interrupt, NMI or INIT the other's processors (said at boot).
    Off,
}

impl IommuInterrupts {
    /// The spelling in the file.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Remap => "remap",
            Self::Off => "off",
        }
    }
}

/// `iommu.os`: whether the OS gets an IOMMU of its own, emulated by
/// thinhv (`docs/os-iommu.md`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IommuOs {
    /// The OS sees no IOMMU where thinhv owns the platform's (its DMAR or
    /// IVRS is hidden).
    #[default]
    None,
    /// The OS sees a unit of the platform's kind whose registers thinhv
    /// emulates, its translation composed with thinhv's protection (VT-d,
    /// DMA translation; `docs/os-iommu.md` says what is not yet offered).
    Emulated,
}

impl IommuOs {
    /// The spelling in the file.
    pub const fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Emulated => "emulated",
        }
    }
}

/// `hypervisor.serial`: an I/O port (`0x3f8`, `"0x2f8"`, `"com1"`..`"com4"`)
/// or `"none"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Serial {
    /// No serial log.
    None,
    /// 16550 at this I/O port.
    Port(u16),
}

impl Serial {
    /// The port, 0 for none.
    pub const fn port(self) -> u16 {
        match self {
            Self::None => 0,
            Self::Port(p) => p,
        }
    }

    pub(crate) fn from_name(s: &str) -> Option<Self> {
        let l = s.trim().to_ascii_lowercase();
        match l.as_str() {
            "none" | "off" => Some(Self::None),
            "com1" => Some(Self::Port(0x3f8)),
            "com2" => Some(Self::Port(0x2f8)),
            "com3" => Some(Self::Port(0x3e8)),
            "com4" => Some(Self::Port(0x2e8)),
            _ => {
                let digits = l.strip_prefix("0x")?;
                let v = u16::from_str_radix(digits, 16).ok()?;
                Self::checked(i64::from(v))
            }
        }
    }

    fn checked(v: i64) -> Option<Self> {
        // The 16550 has 8 registers; the port must leave room for them.
        match u16::try_from(v) {
            Ok(p) if p != 0 && p <= 0xfff8 => Some(Self::Port(p)),
            _ => None,
        }
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => write!(f, "\"none\""),
            Self::Port(p) => write!(f, "{p:#x}"),
        }
    }
}

struct SerialVisitor;

const SERIAL_EXPECTED: &str = "an I/O port such as 0x3f8, \"com1\"..\"com4\", or \"none\"";

impl Visitor<'_> for SerialVisitor {
    type Value = Serial;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(SERIAL_EXPECTED)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Serial, E> {
        Serial::checked(v).ok_or_else(|| {
            E::custom(alloc::format!(
                "serial port {v:#x} out of range; expected {SERIAL_EXPECTED}"
            ))
        })
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Serial, E> {
        self.visit_i64(i64::try_from(v).unwrap_or(-1))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Serial, E> {
        Serial::from_name(v).ok_or_else(|| {
            E::custom(alloc::format!(
                "bad serial {v:?}; expected {SERIAL_EXPECTED}"
            ))
        })
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Serial, E> {
        self.visit_str(&v)
    }
}

impl<'de> Deserialize<'de> for Serial {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SerialVisitor)
    }
}
