//! Running QEMU under a timeout and reading its serial output.
//!
//! The process is always ended by its PID (`Child::kill`) when the
//! [`Run`] is dropped, so a failing or panicking test never leaves an
//! emulator behind. Nothing is ever killed by name.
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Why waiting ended without the marker.
#[derive(Debug)]
pub enum WaitError {
    /// The deadline passed.
    Timeout {
        /// What was waited for.
        marker: String,
        /// How long.
        after: Duration,
    },
    /// QEMU exited first.
    Exited(ExitStatus),
    /// I/O trouble.
    Io(String),
}

impl std::fmt::Display for WaitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Timeout { marker, after } => write!(f, "no {marker:?} within {after:?}"),
            Self::Exited(s) => write!(f, "QEMU exited ({s}) before the marker"),
            Self::Io(e) => write!(f, "{e}"),
        }
    }
}

/// A running emulator.
#[derive(Debug)]
pub struct Run {
    child: Child,
    serial: PathBuf,
    started: Instant,
    pid: u32,
    group: bool,
}

impl Run {
    /// Starts `cmd`, whose serial port writes to `serial` (a file the
    /// command line names). stdout/stderr go to `serial.qemu.log`.
    pub fn start(cmd: Command, serial: &Path) -> std::io::Result<Self> {
        Self::spawn(cmd, serial, false)
    }

    /// Like [`Run::start`], in a new process group that is killed as a
    /// whole (for wrappers such as `script` around the emulator).
    pub fn start_group(cmd: Command, serial: &Path) -> std::io::Result<Self> {
        Self::spawn(cmd, serial, true)
    }

    fn spawn(mut cmd: Command, serial: &Path, group: bool) -> std::io::Result<Self> {
        let _ = fs::remove_file(serial);
        fs::write(serial, b"")?;
        let qlog = fs::File::create(serial.with_extension("qemu.log"))?;
        cmd.stdin(Stdio::null())
            .stdout(qlog.try_clone()?)
            .stderr(qlog);
        if group {
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        }
        let child = cmd.spawn()?;
        let pid = child.id();
        Ok(Self {
            child,
            serial: serial.to_path_buf(),
            started: Instant::now(),
            pid,
            group,
        })
    }

    /// The PID (for logs).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Time since start.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The serial output so far.
    pub fn output(&self) -> String {
        let bytes = fs::read(&self.serial).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// What QEMU itself printed (errors).
    pub fn qemu_messages(&self) -> String {
        fs::read_to_string(self.serial.with_extension("qemu.log")).unwrap_or_default()
    }

    /// Asks QEMU's monitor (the socket [`monitor_socket`] names) for
    /// `command`; `None` when there is no monitor (Bochs, a long path) or it
    /// does not answer within a few seconds.
    pub fn monitor(&self, command: &str) -> Option<String> {
        let path = monitor_socket(&self.serial)?;
        let mut s = UnixStream::connect(path).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut out = Vec::new();
        let mut buf = [0u8; 16384];
        let mut prompt = |s: &mut UnixStream, out: &mut Vec<u8>| -> Option<()> {
            let mark = out.len();
            loop {
                let n = s.read(&mut buf).ok()?;
                if n == 0 {
                    return None;
                }
                out.extend_from_slice(&buf[..n]);
                if out[mark..].windows(6).any(|w| w == b"(qemu)") {
                    return Some(());
                }
            }
        };
        prompt(&mut s, &mut out)?;
        out.clear();
        s.write_all(format!("{command}\n").as_bytes()).ok()?;
        prompt(&mut s, &mut out)?;
        Some(String::from_utf8_lossy(&out).replace('\r', ""))
    }

    /// For a run that did not reach its marker: where each CPU was (QEMU's
    /// monitor) and what the serial output says last and first went wrong.
    pub fn hang_report(&self) -> HangReport {
        let mut cpus = Vec::new();
        if let Some(regs) = self.monitor("info registers -a") {
            for l in regs.lines() {
                let t = l.trim_start();
                if ["CPU#", "RIP=", "RAX=", "RSI=", "CS =", "CR0="]
                    .iter()
                    .any(|p| t.starts_with(p))
                {
                    cpus.push(l.to_string());
                }
            }
        }
        // Each CPU's local APIC: its timer and pending/in-service vectors
        // (a CPU that never wakes again shows why here).
        let n = cpus.iter().filter(|l| l.starts_with("CPU#")).count();
        for i in 0..n {
            if let Some(l) = self.monitor(&format!("info lapic {i}")) {
                let keep: Vec<String> = l
                    .lines()
                    .map(str::trim)
                    .filter(|t| {
                        ["LVTT", "Timer", "ISR", "IRR", "APR"]
                            .iter()
                            .any(|p| t.starts_with(p))
                    })
                    .map(|t| t.split_whitespace().collect::<Vec<_>>().join(" "))
                    .collect();
                if !keep.is_empty() {
                    cpus.push(format!("lapic {i}: {}", keep.join(" | ")));
                }
            }
        }
        let out = self.output();
        let all: Vec<String> = out.lines().map(str::to_string).collect();
        // The kernel's first report of trouble (a stall report carries the
        // stuck CPU's backtrace), which later repeats push out of view.
        let trouble = all
            .iter()
            .position(|l| KERNEL_TROUBLE.iter().any(|t| l.contains(t)))
            .map(|first| all.iter().skip(first).take(60).cloned().collect())
            .unwrap_or_default();
        // Kernel messages (`[  12.345678] ...`) can bury the last thing a
        // program printed, such as which step of a script was running.
        let programs: Vec<String> = all
            .iter()
            .filter(|l| !l.trim_start().starts_with('['))
            .cloned()
            .collect();
        let tail = |v: &[String], n: usize| v[v.len().saturating_sub(n)..].to_vec();
        HangReport {
            cpus,
            trouble,
            last_program_lines: tail(&programs, 15),
            last_lines: tail(&all, 15),
        }
    }

    /// Waits until the serial output contains `marker`; returns the time
    /// since start.
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) -> Result<Duration, WaitError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.output().contains(marker) {
                return Ok(self.elapsed());
            }
            if let Some(status) = self
                .child
                .try_wait()
                .map_err(|e| WaitError::Io(e.to_string()))?
            {
                // One last look: the marker may have been the last thing written.
                if self.output().contains(marker) {
                    return Ok(self.elapsed());
                }
                return Err(WaitError::Exited(status));
            }
            if Instant::now() >= deadline {
                return Err(WaitError::Timeout {
                    marker: marker.into(),
                    after: timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for QEMU to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, WaitError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self
                .child
                .try_wait()
                .map_err(|e| WaitError::Io(e.to_string()))?
            {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                return Err(WaitError::Timeout {
                    marker: "<exit>".into(),
                    after: timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Ends the emulator now: by PID, or by the process group it leads
    /// (its own children only) for [`Run::start_group`].
    pub fn kill(&mut self) {
        if self.group {
            // The group was created for this child: its ID is the child's PID.
            // Quiet: the group is usually gone already ("No such process").
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", self.pid)])
                .stderr(Stdio::null())
                .status();
        } else if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Where a run that missed its end marker stood.
#[derive(Debug, Clone, Default)]
pub struct HangReport {
    /// QEMU monitor lines per CPU (`CPU#n`, RAX, RSI, RIP, CS, CR0 rows),
    /// then one `lapic n:` line per CPU (timer, ISR, IRR, TPR/PPR); empty
    /// when the monitor did not answer.
    pub cpus: Vec<String>,
    /// From the kernel's first report of trouble, up to 60 lines.
    pub trouble: Vec<String>,
    /// The last lines that are not kernel messages.
    pub last_program_lines: Vec<String>,
    /// The last lines.
    pub last_lines: Vec<String>,
}

impl HangReport {
    /// Everything, in sections.
    pub fn full(&self) -> String {
        let mut r = String::new();
        let mut section = |title: &str, lines: &[String]| {
            let _ = writeln!(r, "----- {title} -----");
            if lines.is_empty() {
                r.push_str("(none)\n");
            }
            for l in lines {
                r.push_str(l);
                r.push('\n');
            }
        };
        section("where the CPUs were (QEMU monitor)", &self.cpus);
        section("the kernel's first report of trouble", &self.trouble);
        section("last lines not from the kernel", &self.last_program_lines);
        section("last lines", &self.last_lines);
        r
    }

    /// At most about 25 lines for the end of a long log that may be cut:
    /// each CPU's RIP, the last 4 program lines, the first lines of the
    /// kernel's report that name code (`RIP:` and call-trace frames).
    pub fn brief(&self, name: &str) -> String {
        let mut r = format!("HANG {name}: the run stopped making progress\n");
        let cpu_lines = self.cpus.iter().filter(|l| {
            l.starts_with("CPU#") || l.starts_with("lapic ") || l.trim_start().starts_with("RIP=")
        });
        let mut any = false;
        for l in cpu_lines {
            any = true;
            let _ = writeln!(r, "  {}", l.trim());
        }
        if !any {
            r.push_str("  (no answer from QEMU's monitor)\n");
        }
        r.push_str("  last program output:\n");
        for l in &self.last_program_lines[self.last_program_lines.len().saturating_sub(4)..] {
            let _ = writeln!(r, "    {l}");
        }
        let code: Vec<&String> = self
            .trouble
            .iter()
            .filter(|l| l.contains("RIP:") || l.contains("+0x") || l.contains("NMI backtrace"))
            .take(12)
            .collect();
        if !code.is_empty() {
            r.push_str("  kernel's first report names:\n");
            for l in code {
                let _ = writeln!(r, "    {}", l.trim());
            }
        }
        r
    }
}

/// What starts a Linux report of a stuck or broken kernel.
const KERNEL_TROUBLE: [&str; 7] = [
    "rcu: INFO:",
    "BUG:",
    "WARNING:",
    "Kernel panic",
    "watchdog: ",
    "INFO: task ",
    "NMI backtrace",
];

/// The monitor socket QEMU opens for a run whose serial log is `serial`:
/// beside it, unless the path is too long for a Unix socket address.
pub fn monitor_socket(serial: &Path) -> Option<PathBuf> {
    let p = serial.with_extension("mon");
    (p.as_os_str().len() < 100).then_some(p)
}

/// `key=value` lines between `begin` and `end` markers (first occurrence).
pub fn section<'a>(text: &'a str, begin: &str, end: &str) -> Option<&'a str> {
    let start = text.find(begin)? + begin.len();
    let stop = text[start..].find(end)? + start;
    Some(&text[start..stop])
}

/// The value of `key=` on its own line, last occurrence.
pub fn value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let prefix = format!("{key}=");
    text.lines()
        .filter_map(|l| {
            l.trim_end_matches('\r')
                .trim_start()
                .strip_prefix(prefix.as_str())
        })
        .next_back()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsing_helpers() {
        let t = "noise\nA-BEGIN\nx=1\r\ny=two\nx=3\nA-END\n";
        let s = section(t, "A-BEGIN", "A-END").unwrap();
        assert_eq!(value(s, "x"), Some("3"));
        assert_eq!(value(s, "y"), Some("two"));
        assert_eq!(value(s, "z"), None);
        assert!(section(t, "B-BEGIN", "A-END").is_none());
    }

    #[test]
    fn a_hung_process_times_out_and_is_killed() {
        let dir = std::env::temp_dir().join(format!("thinhv-runner-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let serial = dir.join("serial.txt");
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("echo hello > {}; sleep 30", serial.display()));
        let mut run = Run::start(cmd, &serial).unwrap();
        assert!(run.wait_for("hello", Duration::from_secs(10)).is_ok());
        let e = run
            .wait_for("never", Duration::from_millis(300))
            .unwrap_err();
        assert!(matches!(e, WaitError::Timeout { .. }));
        let pid = run.pid();
        drop(run);
        // The process is gone (reaped), so no /proc entry remains for it.
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists()
                || fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map_or(true, |s| s.contains(" Z "))
        );
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg("exit 3");
        let mut run = Run::start(cmd, &serial).unwrap();
        assert!(matches!(
            run.wait_for("x", Duration::from_secs(10)),
            Err(WaitError::Exited(_))
        ));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_hang_report_has_the_registers_and_the_last_lines() {
        use std::os::unix::net::UnixListener;
        let dir = std::env::temp_dir().join(format!("thinhv-hang-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let serial = dir.join("serial.txt");
        let listener = UnixListener::bind(monitor_socket(&serial).unwrap()).unwrap();
        // A monitor that answers the way QEMU's does.
        let fake = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"QEMU 10.0.2 monitor\r\n(qemu) ").unwrap();
            let mut cmd = [0u8; 64];
            let n = s.read(&mut cmd).unwrap();
            assert_eq!(&cmd[..n], b"info registers -a\n");
            s.write_all(b"info registers -a\r\n\r\nCPU#0\r\nRAX=0 RBX=0\r\nRIP=ffffffff81000000 RFL=00000246\r\nES =0000\r\n(qemu) ")
                .unwrap();
        });
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(format!(
            "printf '[   0.5] ok\\n[   0.6] rcu: INFO: stall\\n[   0.7] RIP: here\\nstep one\\n[   1.0] kernel noise\\n' > {}; sleep 30",
            serial.display()
        ));
        let mut run = Run::start(cmd, &serial).unwrap();
        run.wait_for("noise", Duration::from_secs(10)).unwrap();
        let h = run.hang_report();
        fake.join().unwrap();
        let r = h.full();
        let b = h.brief("t");
        assert!(b.contains("CPU#0\n  RIP=ffffffff81000000"), "{b}");
        assert!(b.contains("last program output:\n    step one\n"), "{b}");
        assert!(b.contains("names:\n    [   0.7] RIP: here\n"), "{b}");
        assert!(b.lines().count() <= 25, "{b}");
        assert!(
            r.contains("CPU#0\nRAX=0 RBX=0\nRIP=ffffffff81000000"),
            "{r}"
        );
        assert!(!r.contains("ES =0000"), "{r}");
        assert!(
            r.contains("not from the kernel -----\nstep one\n-----"),
            "{r}"
        );
        assert!(
            r.ends_with("[   0.7] RIP: here\nstep one\n[   1.0] kernel noise\n"),
            "{r}"
        );
        drop(run);
        fs::remove_dir_all(dir).unwrap();
    }
}
