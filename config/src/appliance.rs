//! `[[appliance]]`: a vendor's Linux appliance on cores, memory and PCI
//! functions of its own, beside the OS (`docs/appliances.md`).
//!
//! What can be checked without the machine is checked here (names, sizes,
//! paths, overlaps between tables); whether the machine has the CPUs, the
//! memory and the devices is decided at boot (`thinhv_efi::appliances`),
//! where a table that cannot be honoured is reported and left out — the OS
//! boots without that appliance.
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;
use serde::Deserialize;
use serde::de::{self, Visitor};

/// Most appliances one configuration may declare.
pub const MAX_APPLIANCES: usize = 8;
/// Longest appliance name, in bytes.
pub const MAX_NAME_LEN: usize = 31;
/// Least memory an appliance may have, in MiB (a Linux kernel with a small
/// initramfs needs about this much).
pub const MIN_MEMORY_MIB: u32 = 64;
/// Most memory one appliance may have, in MiB (1 TiB).
pub const MAX_MEMORY_MIB: u32 = 1 << 20;
/// Longest command line, in bytes (Linux's `COMMAND_LINE_SIZE` on x86).
pub const MAX_CMDLINE_LEN: usize = 2047;

/// `cpus`: how many (taken from the highest APIC IDs) or which.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CpuSpec {
    /// This many processors, the highest APIC IDs not yet taken.
    Count(u32),
    /// Exactly these APIC IDs.
    ApicIds(Vec<u32>),
}

impl fmt::Display for CpuSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Count(n) => write!(f, "{n}"),
            Self::ApicIds(ids) => {
                write!(f, "[")?;
                for (i, id) in ids.iter().enumerate() {
                    write!(f, "{}{id}", if i == 0 { "" } else { ", " })?;
                }
                write!(f, "]")
            }
        }
    }
}

struct CpuSpecVisitor;

impl<'de> Visitor<'de> for CpuSpecVisitor {
    type Value = CpuSpec;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a number of processors, or a list of APIC IDs such as [6, 7]")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<CpuSpec, E> {
        match u32::try_from(v) {
            Ok(n) if n > 0 => Ok(CpuSpec::Count(n)),
            _ => Err(E::custom(format!(
                "cpus = {v}: an appliance needs at least one processor"
            ))),
        }
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<CpuSpec, E> {
        self.visit_i64(i64::try_from(v).unwrap_or(-1))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<CpuSpec, A::Error> {
        let mut ids = Vec::new();
        while let Some(id) = seq.next_element::<u32>()? {
            if ids.contains(&id) {
                return Err(de::Error::custom(format!(
                    "cpus: APIC ID {id} is listed twice"
                )));
            }
            ids.push(id);
        }
        if ids.is_empty() {
            return Err(de::Error::custom(
                "cpus = []: an appliance needs at least one processor",
            ));
        }
        Ok(CpuSpec::ApicIds(ids))
    }
}

impl<'de> Deserialize<'de> for CpuSpec {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(CpuSpecVisitor)
    }
}

/// `console`: where the appliance's serial output goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Console {
    /// Captured into a ring the OS reads (`thinhv appliance console NAME`).
    Log,
    /// The 16550 at this I/O port, given to the appliance.
    Port(u16),
}

impl fmt::Display for Console {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Log => write!(f, "\"log\""),
            Self::Port(p) => write!(f, "\"{p:#x}\""),
        }
    }
}

impl<'de> Deserialize<'de> for Console {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.trim().eq_ignore_ascii_case("log") {
            return Ok(Self::Log);
        }
        match crate::Serial::from_name(&s) {
            Some(crate::Serial::Port(p)) => Ok(Self::Port(p)),
            _ => Err(de::Error::custom(format!(
                "console = {s:?}: expected \"log\" or a COM port (\"com2\", \"0x2f8\")"
            ))),
        }
    }
}

/// `on_crash`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnCrash {
    /// Scrub its memory, reload kernel and initrd, start it again (default).
    #[default]
    Restart,
    /// Leave it stopped.
    Stop,
}

impl OnCrash {
    /// The spelling in the file.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Restart => "restart",
            Self::Stop => "stop",
        }
    }
}

/// `control`: who may stop, start and restart the appliance.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Control {
    /// The OS's root (`thinhv appliance stop|start|restart`; default).
    #[default]
    Os,
    /// Nobody: the OS can list it and read its console, not stop it.
    None,
}

impl Control {
    /// The spelling in the file.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Os => "os",
            Self::None => "none",
        }
    }
}

/// `apic`: the local APIC mode the appliance's processors start in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApicMode {
    /// x2APIC where the processor has it (default): its kernel keeps the
    /// mode the platform hands over, its EOI and timer registers are MSRs
    /// that never exit, and only the ICR is thinhv's.
    #[default]
    X2apic,
    /// xAPIC (a kernel built without x2APIC support): every write to the
    /// APIC page exits, since the page holds the ICR.
    Xapic,
}

impl ApicMode {
    /// The spelling in the file.
    pub const fn name(self) -> &'static str {
        match self {
            Self::X2apic => "x2apic",
            Self::Xapic => "xapic",
        }
    }
}

/// One `[[appliance]]` table.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Appliance {
    /// Its name in `thinhv appliances` and the log: letters, digits, `-`,
    /// `_`, at most [`MAX_NAME_LEN`] bytes, unique.
    pub name: String,
    /// Its processors.
    pub cpus: CpuSpec,
    /// Its RAM, in MiB.
    pub memory: u32,
    /// ESP path of its kernel (a bzImage).
    pub kernel: String,
    /// ESP path of its initrd.
    #[serde(default)]
    pub initrd: Option<String>,
    /// Its kernel command line.
    #[serde(default)]
    pub cmdline: String,
    /// PCI functions given whole to it (`[[device]] match` syntax).
    #[serde(default)]
    pub devices: Vec<String>,
    /// Its console.
    #[serde(default = "default_console")]
    pub console: Console,
    /// What a crash does.
    #[serde(default)]
    pub on_crash: OnCrash,
    /// Who may stop it.
    #[serde(default)]
    pub control: Control,
    /// The APIC mode its processors start in.
    #[serde(default)]
    pub apic: ApicMode,
    /// Line of the `[[appliance]]` header (filled in by
    /// [`crate::Config::parse`]).
    #[serde(skip)]
    pub line: Option<usize>,
}

fn default_console() -> Console {
    Console::Log
}

impl Appliance {
    /// `[[appliance]] "name"` (line N) for messages.
    pub fn label(&self) -> String {
        match self.line {
            Some(l) => format!("[[appliance]] {:?} (line {l})", self.name),
            None => format!("[[appliance]] {:?}", self.name),
        }
    }

    /// Its memory in bytes.
    pub fn memory_bytes(&self) -> u64 {
        u64::from(self.memory) << 20
    }
}

/// The checks that need no machine: each table alone, then the tables
/// against each other and against the rest of the file. Returns
/// `(index of the table, message)` for the first problem.
pub(crate) fn validate(cfg: &crate::Config) -> Result<(), (usize, String)> {
    let list = &cfg.appliance;
    if list.len() > MAX_APPLIANCES {
        return Err((
            MAX_APPLIANCES,
            format!(
                "{} [[appliance]] tables; thinhv runs at most {MAX_APPLIANCES}",
                list.len()
            ),
        ));
    }
    if !list.is_empty() && cfg.cpu.init_sipi == crate::InitSipi::Activity {
        return Err((
            0,
            "[[appliance]] needs cpu.init_sipi = \"auto\" or \"intercept\": with \"activity\" \
             the OS's INIT and SIPI reach processors without thinhv seeing them"
                .to_string(),
        ));
    }
    for (i, a) in list.iter().enumerate() {
        check_one(a).map_err(|m| (i, format!("[[appliance]] {:?}: {m}", a.name)))?;
    }
    for (i, a) in list.iter().enumerate() {
        let p = |m: String| (i, format!("[[appliance]] {:?}: {m}", a.name));
        for b in &list[..i] {
            if a.name == b.name {
                return Err(p("the name is used twice".to_string()));
            }
            if let (CpuSpec::ApicIds(x), CpuSpec::ApicIds(y)) = (&a.cpus, &b.cpus)
                && let Some(id) = x.iter().find(|id| y.contains(id))
            {
                return Err(p(format!(
                    "APIC ID {id} is also given to appliance {:?}",
                    b.name
                )));
            }
            if let Some(d) = a.devices.iter().find(|d| b.devices.contains(d)) {
                return Err(p(format!(
                    "device {d:?} is also given to appliance {:?}",
                    b.name
                )));
            }
            if let (Console::Port(x), Console::Port(y)) = (a.console, b.console)
                && x == y
            {
                return Err(p(format!(
                    "console port {x:#x} is also given to appliance {:?}",
                    b.name
                )));
            }
        }
        if let Some(d) = a
            .devices
            .iter()
            .find(|d| cfg.device.iter().any(|r| &r.matcher == *d))
        {
            return Err(p(format!(
                "device {d:?} also has a [[device]] rule; a function has one owner"
            )));
        }
        if let Console::Port(port) = a.console
            && port == cfg.hypervisor.serial.port()
        {
            return Err(p(format!(
                "console port {port:#x} is thinhv's own log port (hypervisor.serial)"
            )));
        }
    }
    Ok(())
}

fn check_one(a: &Appliance) -> Result<(), String> {
    if a.name.is_empty() || a.name.len() > MAX_NAME_LEN {
        return Err(format!("name must be 1 to {MAX_NAME_LEN} bytes"));
    }
    if !a
        .name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err("name may hold only letters, digits, '-' and '_'".to_string());
    }
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&a.memory) {
        return Err(format!(
            "memory = {} MiB; an appliance takes {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB} MiB",
            a.memory
        ));
    }
    if let CpuSpec::Count(n) = a.cpus
        && n as usize > thinhv_abi::handoff::MAX_CPUS
    {
        return Err(format!("cpus = {n}: more than any machine thinhv runs on"));
    }
    crate::check_esp_path(&a.kernel).map_err(|m| m.replace("boot.next", "kernel"))?;
    if let Some(initrd) = &a.initrd {
        crate::check_esp_path(initrd).map_err(|m| m.replace("boot.next", "initrd"))?;
    }
    if a.cmdline.len() > MAX_CMDLINE_LEN {
        return Err(format!(
            "cmdline is longer than {MAX_CMDLINE_LEN} bytes (Linux's limit)"
        ));
    }
    if a.cmdline.contains('\0') {
        return Err("cmdline contains a NUL".to_string());
    }
    for (i, d) in a.devices.iter().enumerate() {
        if a.devices[..i].contains(d) {
            return Err(format!("device {d:?} is listed twice"));
        }
        if d.starts_with("vf:") && vf_entry(d).is_none() {
            return Err(format!(
                "device {d:?}: a VF is named \"vf:<PF>#<n>\", n from 1 (\"vf:8086:10c9#3\")"
            ));
        }
    }
    Ok(())
}

/// A `devices` entry naming a VF, `vf:<PF>#<n>`: the PF's match (the
/// `[[device]] match` syntax) and the VF's index `n` (from 1); `None` for
/// any other entry or a malformed one.
pub fn vf_entry(d: &str) -> Option<(&str, u16)> {
    let (pf, n) = d.strip_prefix("vf:")?.rsplit_once('#')?;
    let n: u16 = n.trim().parse().ok().filter(|&n| n >= 1)?;
    (!pf.trim().is_empty()).then_some((pf.trim(), n))
}
