//! `thinhv install` and `thinhv uninstall`: put `thinhv.efi` (and its
//! configuration) on the ESP and a `Boot####` entry first in `BootOrder`,
//! through efivarfs; and take them away again.
//!
//! thinhv chain-loads the entry that follows its own in `BootOrder`, so
//! putting it first keeps the previous first entry as the OS it starts. The
//! order before installation is kept on the ESP
//! (`\EFI\thinhv\install-state.txt`) for `uninstall`, which restores it.
//! The firmware boot menu is the way back when nothing else works: the
//! previous entries stay in place.
use crate::gpt;
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use thinhv_efi::boot_option::{
    LOAD_OPTION_ACTIVE, LoadOption, Partition, hd_file_path, parse_order, variable_name,
};

/// The EFI global variable vendor GUID (`Boot####`, `BootOrder`).
pub const EFI_GLOBAL_GUID: &str = "8be4df61-93ca-11d2-aa0d-00e098032b8c";
/// NON_VOLATILE | BOOTSERVICE_ACCESS | RUNTIME_ACCESS.
const ATTRIBUTES: u32 = 0x7;
/// Where thinhv lives on the ESP.
pub const ESP_DIR: &str = "EFI/thinhv";
/// The loader's path as the firmware sees it.
pub const LOADER_PATH: &str = "\\EFI\\thinhv\\thinhv.efi";
/// The boot entry's description.
pub const DESCRIPTION: &str = "thinhv";
/// Kept for `uninstall`.
pub const STATE_FILE: &str = "install-state.txt";
/// Default efivarfs mount.
pub const EFIVARS: &str = "/sys/firmware/efi/efivars";

/// An efivarfs directory (or a fake one in tests).
pub struct Efivarfs {
    dir: PathBuf,
}

const FS_IOC_GETFLAGS: libc::c_ulong = 0x8008_6601;
const FS_IOC_SETFLAGS: libc::c_ulong = 0x4008_6602;
const FS_IMMUTABLE_FL: libc::c_long = 0x10;

/// Clears the immutable flag efivarfs sets on variables (as `chattr -i`);
/// file systems without flags (a test's temporary directory) are fine.
fn clear_immutable(path: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut flags: libc::c_long = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one `long` into `flags`, which lives
    // for the call; the descriptor is open.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_GETFLAGS as _, &raw mut flags) };
    if r != 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOTTY | libc::EOPNOTSUPP | libc::EINVAL) => Ok(()),
            _ => Err(e),
        };
    }
    if flags & FS_IMMUTABLE_FL == 0 {
        return Ok(());
    }
    flags &= !FS_IMMUTABLE_FL;
    // SAFETY: FS_IOC_SETFLAGS reads one `long` from `flags`.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_SETFLAGS as _, &raw const flags) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Efivarfs {
    /// At `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-{EFI_GLOBAL_GUID}"))
    }

    /// A global variable's data (without the attribute word).
    pub fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        match fs::read(self.path(name)) {
            Ok(b) if b.len() >= 4 => Ok(Some(b[4..].to_vec())),
            Ok(_) => Ok(Some(Vec::new())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes a global variable (one `write`, as efivarfs requires).
    pub fn write(&self, name: &str, data: &[u8]) -> io::Result<()> {
        let p = self.path(name);
        clear_immutable(&p)?;
        let mut b = ATTRIBUTES.to_le_bytes().to_vec();
        b.extend_from_slice(data);
        fs::write(&p, &b)
    }

    /// Deletes a global variable.
    pub fn delete(&self, name: &str) -> io::Result<()> {
        let p = self.path(name);
        clear_immutable(&p)?;
        match fs::remove_file(&p) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }

    /// `BootOrder`.
    pub fn boot_order(&self) -> io::Result<Vec<u16>> {
        Ok(self
            .read("BootOrder")?
            .map(|b| parse_order(&b))
            .unwrap_or_default())
    }

    /// Every `Boot####` entry that parses.
    pub fn boot_entries(&self) -> io::Result<Vec<(u16, LoadOption)>> {
        let mut out = Vec::new();
        let suffix = format!("-{EFI_GLOBAL_GUID}");
        for e in fs::read_dir(&self.dir)? {
            let name = e?.file_name().to_string_lossy().into_owned();
            let Some(var) = name.strip_suffix(&suffix) else {
                continue;
            };
            let Some(hex) = var.strip_prefix("Boot") else {
                continue;
            };
            if hex.len() != 4 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                continue;
            }
            let Ok(n) = u16::from_str_radix(hex, 16) else {
                continue;
            };
            if let Some(data) = self.read(var)?
                && let Some(o) = LoadOption::parse(&data)
            {
                out.push((n, o));
            }
        }
        out.sort_by_key(|e| e.0);
        Ok(out)
    }
}

fn order_text(o: &[u16]) -> String {
    if o.is_empty() {
        return "(empty)".into();
    }
    o.iter()
        .map(|n| format!("{n:04X}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn order_bytes(o: &[u16]) -> Vec<u8> {
    o.iter().flat_map(|n| n.to_le_bytes()).collect()
}

/// Whether `o` is thinhv's entry.
pub fn is_thinhv_entry(o: &LoadOption) -> bool {
    o.file_path()
        .is_some_and(|p| p.eq_ignore_ascii_case(LOADER_PATH))
}

/// What `install` decides about boot entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootPlan {
    /// thinhv's `Boot####`.
    pub entry: u16,
    /// The entry exists already (it is rewritten in place).
    pub exists: bool,
    /// `BootOrder` after.
    pub new_order: Vec<u16>,
    /// `BootOrder` as it was before thinhv (kept for `uninstall`).
    pub previous_order: Vec<u16>,
}

/// Pure: the boot-entry part of an installation.
pub fn plan_install(
    order: &[u16],
    entries: &[(u16, LoadOption)],
    saved_previous: Option<&[u16]>,
) -> Result<BootPlan, String> {
    let existing = entries
        .iter()
        .find(|(_, o)| is_thinhv_entry(o))
        .map(|e| e.0);
    let entry = match existing {
        Some(n) => n,
        None => (0..=u16::MAX)
            .find(|n| !entries.iter().any(|e| e.0 == *n) && !order.contains(n))
            .ok_or("no free Boot#### number")?,
    };
    let rest: Vec<u16> = order.iter().copied().filter(|&n| n != entry).collect();
    let previous_order = saved_previous.map_or_else(|| rest.clone(), <[u16]>::to_vec);
    let mut new_order = vec![entry];
    new_order.extend(&rest);
    Ok(BootPlan {
        entry,
        exists: existing.is_some(),
        new_order,
        previous_order,
    })
}

/// Pure: `BootOrder` after uninstalling `entry`: the saved order when the
/// same entries remain (in any order), else the current one without thinhv.
pub fn plan_uninstall(order: &[u16], entry: u16, saved_previous: Option<&[u16]>) -> Vec<u16> {
    let rest: Vec<u16> = order.iter().copied().filter(|&n| n != entry).collect();
    if let Some(prev) = saved_previous {
        let (mut a, mut b) = (rest.clone(), prev.to_vec());
        a.sort_unstable();
        b.sort_unstable();
        if a == b {
            return prev.to_vec();
        }
    }
    rest
}

/// The state file's text.
fn state_text(entry: u16, previous: &[u16]) -> String {
    format!(
        "# Written by `thinhv install`; read by `thinhv uninstall`.\nboot_entry = {entry:04X}\nprevious_boot_order = {}\n",
        order_text(previous)
    )
}

/// Parses the state file: (entry, previous order).
pub fn parse_state(text: &str) -> Option<(u16, Vec<u16>)> {
    let mut entry = None;
    let mut prev = None;
    for l in text.lines() {
        let Some((k, v)) = l.split_once('=') else {
            continue;
        };
        let v = v.trim();
        match k.trim() {
            "boot_entry" => entry = u16::from_str_radix(v, 16).ok(),
            "previous_boot_order" => {
                prev = if v == "(empty)" {
                    Some(Vec::new())
                } else {
                    v.split(',')
                        .map(|x| u16::from_str_radix(x.trim(), 16).ok())
                        .collect()
                };
            }
            _ => {}
        }
    }
    Some((entry?, prev?))
}

/// Options of `install` / `uninstall`.
#[derive(Debug, Default)]
pub struct Options {
    /// The ESP's mount point.
    pub esp: Option<PathBuf>,
    /// Configuration to install.
    pub config: Option<PathBuf>,
    /// The `thinhv.efi` to install.
    pub efi: Option<PathBuf>,
    /// efivarfs directory.
    pub efivars: Option<PathBuf>,
    /// The ESP's partition, when it cannot be found from the mount.
    pub partition: Option<Partition>,
    /// Print, change nothing.
    pub dry_run: bool,
    /// `uninstall`: leave `\EFI\thinhv` on the ESP.
    pub keep_files: bool,
}

/// Parses the arguments after the subcommand.
pub fn parse_options(args: &[String]) -> Result<Options, String> {
    let mut o = Options::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match a.as_str() {
            "--esp" => o.esp = Some(value("--esp")?.into()),
            "--config" => o.config = Some(value("--config")?.into()),
            "--efi" => o.efi = Some(value("--efi")?.into()),
            "--efivars" => o.efivars = Some(value("--efivars")?.into()),
            "--esp-partition" => {
                let v = value("--esp-partition")?;
                o.partition = Some(gpt::parse_partition_spec(&v)?);
            }
            "--dry-run" | "-n" => o.dry_run = true,
            "--keep-files" => o.keep_files = true,
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    if o.esp.is_none() {
        return Err(
            "--esp DIR is required (the mounted EFI system partition, e.g. /boot/efi)".into(),
        );
    }
    Ok(o)
}

fn default_efi() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("thinhv.efi")))
        .unwrap_or_else(|| PathBuf::from("thinhv.efi"))
}

fn efivars_of(o: &Options) -> Result<Efivarfs, String> {
    let dir = o.efivars.clone().unwrap_or_else(|| PathBuf::from(EFIVARS));
    if !dir.is_dir() {
        return Err(format!(
            "{}: no efivarfs. Boot in UEFI mode, or mount it: mount -t efivarfs efivarfs {EFIVARS}",
            dir.display()
        ));
    }
    Ok(Efivarfs::new(dir))
}

/// Copies `from` to `to` through a temporary file and a rename, so a
/// failure never leaves a half-written loader on the ESP.
fn copy_atomic(from: &Path, to: &Path) -> io::Result<()> {
    let tmp = to.with_extension("tmp");
    fs::copy(from, &tmp)?;
    fs::rename(&tmp, to)
}

/// Does the installation; returns the report (what was, or would be, done).
pub fn install(o: &Options) -> Result<String, String> {
    let esp = o.esp.as_deref().ok_or("--esp is required")?;
    let efi = o.efi.clone().unwrap_or_else(default_efi);
    let image =
        fs::read(&efi).map_err(|e| format!("{}: {e} (give it with --efi FILE)", efi.display()))?;
    if image.get(..2) != Some(b"MZ") {
        return Err(format!("{}: not a UEFI (PE) image", efi.display()));
    }
    if let Some(c) = &o.config {
        let text = fs::read_to_string(c).map_err(|e| format!("{}: {e}", c.display()))?;
        thinhv_config::Config::parse(&text).map_err(|e| {
            format!(
                "{}; nothing installed (`thinhv check` shows every setting)",
                e.to_string()
                    .replacen(thinhv_config::FILE_NAME, &c.display().to_string(), 1)
            )
        })?;
    }
    let partition = match o.partition {
        Some(p) => p,
        None => gpt::esp_partition(esp)?,
    };
    let vars = efivars_of(o)?;
    let order = vars.boot_order().map_err(|e| format!("BootOrder: {e}"))?;
    let entries = vars
        .boot_entries()
        .map_err(|e| format!("boot entries: {e}"))?;
    let dir = esp.join(ESP_DIR);
    let state_path = dir.join(STATE_FILE);
    let saved = fs::read_to_string(&state_path)
        .ok()
        .and_then(|t| parse_state(&t));
    let plan = plan_install(&order, &entries, saved.as_ref().map(|s| s.1.as_slice()))?;
    let dp = hd_file_path(&partition, LOADER_PATH).ok_or("device path too long")?;
    let option = LoadOption {
        attributes: LOAD_OPTION_ACTIVE,
        description: DESCRIPTION.into(),
        device_path: dp,
        optional_data: Vec::new(),
    };
    let option_bytes = option.to_bytes().ok_or("cannot encode the boot entry")?;

    let mut r = String::new();
    let verb = if o.dry_run { "would" } else { "did" };
    let _ = writeln!(
        r,
        "thinhv install{}: ESP {} ({})",
        if o.dry_run {
            " (dry run: nothing changed)"
        } else {
            ""
        },
        esp.display(),
        gpt::describe(&partition)
    );
    let target = dir.join("thinhv.efi");
    let _ = writeln!(r, "  {verb} copy {} -> {}", efi.display(), target.display());
    if let Some(c) = &o.config {
        let _ = writeln!(
            r,
            "  {verb} copy {} -> {} (checked: valid)",
            c.display(),
            dir.join(thinhv_config::FILE_NAME).display()
        );
    }
    let _ = writeln!(
        r,
        "  {verb} {} {} \"{DESCRIPTION}\" -> {LOADER_PATH}",
        if plan.exists { "rewrite" } else { "create" },
        variable_name(plan.entry)
    );
    let _ = writeln!(
        r,
        "  {verb} set BootOrder {} -> {}",
        order_text(&order),
        order_text(&plan.new_order)
    );
    match plan.new_order.get(1) {
        Some(next) => {
            let desc = entries
                .iter()
                .find(|e| e.0 == *next)
                .map_or("?", |e| e.1.description.as_str());
            let _ = writeln!(
                r,
                "  thinhv starts Boot{next:04X} (\"{desc}\") next, unless thinhv.toml names [boot] next"
            );
        }
        None => {
            let _ = writeln!(
                r,
                "  warning: no other boot entry: set [boot] next in thinhv.toml, or thinhv has nothing to start"
            );
        }
    }
    let _ = writeln!(
        r,
        "  {verb} record the previous BootOrder ({}) in {}",
        order_text(&plan.previous_order),
        state_path.display()
    );
    if o.dry_run {
        return Ok(r);
    }
    let fail = |what: &str, e: io::Error| format!("{what}: {e}\n(done so far:)\n{r}");
    fs::create_dir_all(&dir).map_err(|e| fail(&dir.display().to_string(), e))?;
    copy_atomic(&efi, &target).map_err(|e| fail(&target.display().to_string(), e))?;
    if let Some(c) = &o.config {
        let to = dir.join(thinhv_config::FILE_NAME);
        copy_atomic(c, &to).map_err(|e| fail(&to.display().to_string(), e))?;
    }
    fs::write(&state_path, state_text(plan.entry, &plan.previous_order))
        .map_err(|e| fail(&state_path.display().to_string(), e))?;
    // The entry before the order, so BootOrder never names a missing entry.
    vars.write(&variable_name(plan.entry), &option_bytes)
        .map_err(|e| fail(&variable_name(plan.entry), e))?;
    vars.write("BootOrder", &order_bytes(&plan.new_order))
        .map_err(|e| fail("BootOrder", e))?;
    Ok(r)
}

/// Undoes [`install`].
pub fn uninstall(o: &Options) -> Result<String, String> {
    let esp = o.esp.as_deref().ok_or("--esp is required")?;
    let vars = efivars_of(o)?;
    let dir = esp.join(ESP_DIR);
    let state_path = dir.join(STATE_FILE);
    let saved = fs::read_to_string(&state_path)
        .ok()
        .and_then(|t| parse_state(&t));
    let order = vars.boot_order().map_err(|e| format!("BootOrder: {e}"))?;
    let entries = vars
        .boot_entries()
        .map_err(|e| format!("boot entries: {e}"))?;
    let mut ours: Vec<u16> = entries
        .iter()
        .filter(|(_, o)| is_thinhv_entry(o))
        .map(|e| e.0)
        .collect();
    if let Some((n, _)) = &saved
        && !ours.contains(n)
        && entries.iter().any(|e| e.0 == *n && is_thinhv_entry(&e.1))
    {
        ours.push(*n);
    }
    let mut new_order = order.clone();
    for n in &ours {
        new_order = plan_uninstall(&new_order, *n, saved.as_ref().map(|s| s.1.as_slice()));
    }
    let mut r = String::new();
    let verb = if o.dry_run { "would" } else { "did" };
    let _ = writeln!(
        r,
        "thinhv uninstall{}: ESP {}",
        if o.dry_run {
            " (dry run: nothing changed)"
        } else {
            ""
        },
        esp.display()
    );
    if ours.is_empty() {
        let _ = writeln!(r, "  no thinhv boot entry found");
    }
    for n in &ours {
        let _ = writeln!(r, "  {verb} delete {}", variable_name(*n));
    }
    let _ = writeln!(
        r,
        "  {verb} set BootOrder {} -> {}",
        order_text(&order),
        order_text(&new_order)
    );
    if !o.keep_files {
        let _ = writeln!(r, "  {verb} remove {}", dir.display());
    }
    if o.dry_run {
        return Ok(r);
    }
    vars.write("BootOrder", &order_bytes(&new_order))
        .map_err(|e| format!("BootOrder: {e}"))?;
    for n in &ours {
        vars.delete(&variable_name(*n))
            .map_err(|e| format!("{}: {e}", variable_name(*n)))?;
    }
    if !o.keep_files && dir.exists() {
        fs::remove_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    Ok(r)
}

/// `thinhv install ...`.
pub fn run_install(args: &[String]) -> ExitCode {
    run(args, install)
}

/// `thinhv uninstall ...`.
pub fn run_uninstall(args: &[String]) -> ExitCode {
    run(args, uninstall)
}

fn run(args: &[String], f: fn(&Options) -> Result<String, String>) -> ExitCode {
    let o = match parse_options(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("thinhv: {e}\n{}", crate::USAGE);
            return ExitCode::from(2);
        }
    };
    match f(&o) {
        Ok(r) => {
            print!("{r}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("thinhv: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use thinhv_efi::boot_option::PartitionId;

    fn option(desc: &str, path: &str) -> LoadOption {
        let part = Partition {
            number: 1,
            start: 2048,
            size: 100_000,
            id: PartitionId::Gpt([1; 16]),
        };
        LoadOption {
            attributes: LOAD_OPTION_ACTIVE,
            description: desc.into(),
            device_path: hd_file_path(&part, path).unwrap(),
            optional_data: Vec::new(),
        }
    }

    #[test]
    fn install_goes_first_and_keeps_the_old_order() {
        let entries = vec![
            (0, option("UEFI Shell", "\\EFI\\shell.efi")),
            (1, option("debian", "\\EFI\\debian\\shimx64.efi")),
        ];
        let p = plan_install(&[1, 0], &entries, None).unwrap();
        assert_eq!(p.entry, 2);
        assert!(!p.exists);
        assert_eq!(p.new_order, [2, 1, 0]);
        assert_eq!(p.previous_order, [1, 0]);
        // Again, with the entry in place and the state saved: same entry,
        // the original previous order.
        let mut with = entries.clone();
        with.push((2, option("thinhv", "\\EFI\\THINHV\\thinhv.efi")));
        let p2 = plan_install(&[1, 2, 0], &with, Some(&[1, 0])).unwrap();
        assert_eq!((p2.entry, p2.exists), (2, true));
        assert_eq!(p2.new_order, [2, 1, 0]);
        assert_eq!(p2.previous_order, [1, 0]);
        // Gaps are reused; numbers named only in BootOrder are avoided.
        let p3 = plan_install(&[5, 0], &[(0, option("a", "\\a.efi"))], None).unwrap();
        assert_eq!(p3.entry, 1);
    }

    #[test]
    fn uninstall_restores_the_saved_order_when_it_still_fits() {
        assert_eq!(plan_uninstall(&[2, 0, 1], 2, Some(&[1, 0])), [1, 0]);
        // An entry added since: the saved order no longer fits.
        assert_eq!(plan_uninstall(&[2, 1, 0, 7], 2, Some(&[1, 0])), [1, 0, 7]);
        assert_eq!(plan_uninstall(&[2, 1], 2, None), [1]);
    }

    #[test]
    fn state_file_round_trips() {
        let t = state_text(0x1a, &[1, 0]);
        assert_eq!(parse_state(&t), Some((0x1a, vec![1, 0])));
        assert_eq!(parse_state(&state_text(3, &[])), Some((3, vec![])));
        assert_eq!(parse_state("boot_entry = zz\n"), None);
    }

    #[test]
    fn options_need_an_esp() {
        assert!(parse_options(&[]).is_err());
        assert!(parse_options(&["--esp".into()]).is_err());
        assert!(parse_options(&["--esp".into(), "/x".into(), "--bogus".into()]).is_err());
        let o = parse_options(&["--esp".into(), "/x".into(), "-n".into()]).unwrap();
        assert!(o.dry_run);
    }
}
