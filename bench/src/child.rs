//! Child processes: each measured variant runs in its own process (this
//! binary, re-executed with a hidden subcommand), prints one JSON line of
//! results on stdout, and reports its own peak resident memory, so that no
//! variant's allocations count against another's.

use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The peak resident set size of this process so far, in KiB (`VmHWM` of
/// `/proc/self/status`); `None` where there is no such file.
pub fn peak_rss_kib() -> Option<u64> {
    status_kib("VmHWM:")
}

/// The resident set size of this process now, in KiB (`VmRSS` of
/// `/proc/self/status`).
pub fn rss_kib() -> Option<u64> {
    status_kib("VmRSS:")
}

fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix(field))?;
    line.trim().trim_end_matches("kB").trim().parse().ok()
}

/// CPU time this process has used so far, all threads, user and system
/// (`utime + stime` of `/proc/self/stat`, in the kernel's fixed 100 Hz
/// user ticks); zero where there is no such file.
pub fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The command name may hold spaces: count fields after its `)`.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // Fields 14 and 15 of the file; the first after `)` is field 3.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// Scheduler figures of this process, summed over its threads.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sched {
    /// Time threads were runnable but waited for a CPU (`run_delay` of
    /// `/proc/self/task/*/schedstat`): high when other work takes the
    /// cores.
    pub run_queue_wait: Duration,
    /// Context switches, voluntary and not (`/proc/self/task/*/status`):
    /// each time a thread went to sleep or was preempted.
    pub context_switches: u64,
}

impl Sched {
    /// The figures now; zero where `/proc` does not tell.
    pub fn now() -> Self {
        let mut sched = Self::default();
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return sched };
        for task in tasks.flatten() {
            let path = task.path();
            let schedstat = std::fs::read_to_string(path.join("schedstat")).unwrap_or_default();
            let delay_ns = schedstat.split_whitespace().nth(1).and_then(|v| v.parse().ok());
            sched.run_queue_wait += Duration::from_nanos(delay_ns.unwrap_or(0));
            let status = std::fs::read_to_string(path.join("status")).unwrap_or_default();
            sched.context_switches += status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        }
        sched
    }

    /// What happened between `earlier` and `self`.
    pub fn since(self, earlier: Self) -> Self {
        Self {
            run_queue_wait: self.run_queue_wait.saturating_sub(earlier.run_queue_wait),
            context_switches: self.context_switches.saturating_sub(earlier.context_switches),
        }
    }
}

/// Prints `result` as the child's one line of output.
pub fn emit<T: Serialize>(result: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(result)?);
    Ok(())
}

/// Runs this binary with `args` and parses the JSON line it prints. Its
/// standard error (logs) goes to ours.
pub async fn run<T: DeserializeOwned>(args: &[String]) -> anyhow::Result<T> {
    let exe = std::env::current_exe().context("the benchmark's own path")?;
    let output = tokio::process::Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .output()
        .await
        .context("starting a benchmark child")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(
        output.status.success(),
        "benchmark child {} failed ({}){}",
        args.first().map(String::as_str).unwrap_or_default(),
        output.status,
        if stdout.trim().is_empty() { String::new() } else { format!(": {stdout}") }
    );
    let line = stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("a child's result line: {line:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_peak_memory_and_uses_cpu() {
        assert!(peak_rss_kib().is_some_and(|kib| kib > 0));
        assert!(rss_kib().is_some_and(|kib| kib <= peak_rss_kib().unwrap_or(0)));
        let started = cpu_time();
        let mut x = 0u64;
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(x > 0 && cpu_time() > started);
    }
}
