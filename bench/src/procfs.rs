//! What the kernel says about a server process: its CPU time (the process's CPU clock,
//! to the nanosecond, exited threads included), how that time splits between user space
//! and the kernel and its minor page faults (from `/proc/<pid>/stat`, which keeps the
//! counts of exited threads too, the times in clock ticks of 10 ms),
//! its threads' context switches (`/proc/<pid>/task/*/status`: the threads alive now)
//! and its resident memory (`VmRSS` in `/proc/<pid>/status`).

use anyhow::{anyhow, Context as _};

/// What a process has used so far.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// CPU time, user space and kernel, in seconds: the process's CPU clock
    /// (`clock_getcpuclockid`), to the nanosecond. `user + system` says the same in
    /// clock ticks, so a round of half a second read that way is off by up to 4 %.
    pub clock: f64,
    /// CPU time in user space, in seconds (clock ticks).
    pub user: f64,
    /// CPU time in the kernel on the process's behalf, in seconds (clock ticks).
    pub system: f64,
    /// Page faults served without I/O: mostly memory touched for the first time.
    pub minor_faults: u64,
    /// Times a thread gave up its CPU to wait (parked with nothing to do, or blocked).
    pub voluntary_switches: u64,
    /// Times a thread was taken off its CPU while it could still run (preempted).
    pub involuntary_switches: u64,
}

impl Usage {
    /// CPU time, user space and kernel, in seconds (the CPU clock).
    pub fn cpu(&self) -> f64 {
        self.clock
    }

    /// What was used between `earlier` and `self`.
    #[must_use]
    pub fn since(&self, earlier: &Usage) -> Usage {
        Usage {
            clock: self.clock - earlier.clock,
            user: self.user - earlier.user,
            system: self.system - earlier.system,
            minor_faults: self.minor_faults.saturating_sub(earlier.minor_faults),
            voluntary_switches: self.voluntary_switches.saturating_sub(earlier.voluntary_switches),
            involuntary_switches: self
                .involuntary_switches
                .saturating_sub(earlier.involuntary_switches),
        }
    }
}

impl std::ops::Add for Usage {
    type Output = Usage;

    fn add(self, other: Usage) -> Usage {
        Usage {
            clock: self.clock + other.clock,
            user: self.user + other.user,
            system: self.system + other.system,
            minor_faults: self.minor_faults + other.minor_faults,
            voluntary_switches: self.voluntary_switches + other.voluntary_switches,
            involuntary_switches: self.involuntary_switches + other.involuntary_switches,
        }
    }
}

/// What a process has used so far (its CPU clock, `/proc/<pid>/stat`, and each
/// thread's status for the context switches).
pub fn usage(pid: u32, ticks_per_second: f64) -> anyhow::Result<Usage> {
    let clock = cpu_clock(pid)?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    let (minor_faults, utime, stime) =
        parse_stat(&stat).ok_or_else(|| anyhow!("cannot parse /proc/{pid}/stat"))?;
    let (voluntary_switches, involuntary_switches) = switches(pid)?;
    #[allow(clippy::cast_precision_loss)]
    Ok(Usage {
        clock,
        user: utime as f64 / ticks_per_second,
        system: stime as f64 / ticks_per_second,
        minor_faults,
        voluntary_switches,
        involuntary_switches,
    })
}

/// The CPU time of process `pid` so far, in seconds, to the nanosecond: its CPU clock,
/// which counts every thread it has run, exited ones too.
fn cpu_clock(pid: u32) -> anyhow::Result<f64> {
    let raw = i32::try_from(pid).with_context(|| format!("{pid} is not a process id"))?;
    let id = nix::time::clock_getcpuclockid(nix::unistd::Pid::from_raw(raw))
        .with_context(|| format!("cannot find the CPU clock of process {pid}"))?;
    let now = nix::time::clock_gettime(id)
        .with_context(|| format!("cannot read the CPU clock of process {pid}"))?;
    #[allow(clippy::cast_precision_loss)]
    Ok(now.tv_sec() as f64 + now.tv_nsec() as f64 / 1e9)
}

/// The voluntary and involuntary context switches of the process's threads alive now
/// (a thread that exited takes its counts with it; a server's runtime threads live as
/// long as it does).
fn switches(pid: u32) -> anyhow::Result<(u64, u64)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("cannot list /proc/{pid}/task"))?;
    let mut sum = (0, 0);
    for task in tasks.flatten() {
        // A thread may exit between the listing and the read.
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        if let Some((voluntary, involuntary)) = parse_switches(&status) {
            sum = (sum.0 + voluntary, sum.1 + involuntary);
        }
    }
    Ok(sum)
}

/// `voluntary_ctxt_switches` and `nonvoluntary_ctxt_switches` of a thread's status.
fn parse_switches(status: &str) -> Option<(u64, u64)> {
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|line| line.starts_with(name))?;
        line[name.len()..].trim().parse().ok()
    };
    Some((
        field("voluntary_ctxt_switches:")?,
        field("nonvoluntary_ctxt_switches:")?,
    ))
}

/// minflt, utime and stime (fields 10, 14 and 15) of a `/proc/<pid>/stat` line. The
/// command name (field 2) may hold spaces and parentheses, so fields are counted from
/// the last `)`.
fn parse_stat(stat: &str) -> Option<(u64, u64, u64)> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace();
    // After the name: field 3 (state) is the first; minflt is field 10, the 8th here.
    let minflt: u64 = fields.nth(7)?.parse().ok()?;
    // utime is field 14, three after minflt.
    let utime: u64 = fields.nth(3)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((minflt, utime, stime))
}

/// Resident set size, in bytes.
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    parse_rss(&status).ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))
}

fn parse_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The kernel's clock ticks per second for `/proc/<pid>/stat` (`getconf CLK_TCK`).
pub fn ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .and_then(|text| text.trim().parse::<f64>().ok())
        .unwrap_or(100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_a_strange_name_and_status() {
        let stat = "1234 (a (b) c) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 70 0 0 20 0 3 0 5 1000 200";
        assert_eq!(parse_stat(stat), Some((100, 250, 70)));
        assert_eq!(
            parse_rss("Name:\therald\nVmRSS:\t   2048 kB\n"),
            Some(2 * 1024 * 1024)
        );
        assert_eq!(parse_rss("Name:\therald\n"), None);
        let status = "Name:\therald\nvoluntary_ctxt_switches:\t1200\nnonvoluntary_ctxt_switches:\t34\n";
        assert_eq!(parse_switches(status), Some((1200, 34)));
        assert_eq!(
            parse_switches("Name:\therald\nvoluntary_ctxt_switches:\t1\n"),
            None
        );
    }

    #[test]
    fn usage_subtracts_and_adds_each_part() {
        let earlier = Usage {
            clock: 1.5,
            user: 1.0,
            system: 0.5,
            minor_faults: 100,
            voluntary_switches: 10,
            involuntary_switches: 2,
        };
        let later = Usage {
            clock: 2.26,
            user: 1.25,
            system: 1.0,
            minor_faults: 130,
            voluntary_switches: 15,
            involuntary_switches: 3,
        };
        let used = later.since(&earlier);
        assert_eq!(
            used,
            Usage {
                clock: 2.26 - 1.5,
                user: 0.25,
                system: 0.5,
                minor_faults: 30,
                voluntary_switches: 5,
                involuntary_switches: 1,
            }
        );
        assert!((used.cpu() - 0.76).abs() < 1e-12, "the CPU clock, not the ticks");
        // A count that went down (a process of the sum exited) counts as none.
        assert_eq!(earlier.since(&later).minor_faults, 0);
        assert_eq!((earlier + later).minor_faults, 230);
        assert_eq!(earlier.since(&later).voluntary_switches, 0);
        assert_eq!((earlier + later).involuntary_switches, 5);
    }

    #[test]
    fn reads_this_process() -> anyhow::Result<()> {
        let pid = std::process::id();
        assert!(rss_bytes(pid)? > 0);
        let ticks = ticks_per_second();
        let before = usage(pid, ticks)?;
        // Some work, until this process's CPU clock shows 30 ms of it (or 10 s pass).
        let start = tokio::time::Instant::now();
        let mut spin = 0_u64;
        while cpu_clock(pid)? - before.clock < 0.03 && start.elapsed() < std::time::Duration::from_secs(10) {
            for _ in 0..10_000 {
                spin = std::hint::black_box(spin.wrapping_add(1));
            }
        }
        let now = usage(pid, ticks)?;
        assert!(now.since(&before).cpu() >= 0.03, "{now:?} after {before:?}");
        // The clock is this process's: the ticks of /proc/<pid>/stat say the same, to
        // within their truncation.
        assert!(
            (now.clock - (now.user + now.system)).abs() <= 3.0 / ticks,
            "{now:?}"
        );
        assert!(before.minor_faults > 0, "a running process has touched memory");
        // A sleep gives up the CPU: at least one voluntary switch.
        std::thread::sleep(std::time::Duration::from_millis(1));
        assert!(switches(pid)?.0 > 0);
        Ok(())
    }
}
