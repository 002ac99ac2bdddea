//! The results of a run: the table printed at the end, the JSON results
//! file, the targets of issue 7 checked against the figures, and the
//! section of `docs/benchmarks.md` that holds the latest table.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;
use serde::Serialize;

use crate::cli::{Mode, Variant};
use crate::consume::ConsumeResult;
use crate::publish::PublishResult;

/// Where the results section of the Markdown file starts.
pub const START_MARKER: &str = "<!-- bench:results:start -->";
/// Where it ends.
pub const END_MARKER: &str = "<!-- bench:results:end -->";

/// A consumer's peak memory counts as flat across sizes when the largest
/// size's peak is at most this multiple of the smallest size's.
pub const FLAT_MEMORY_RATIO: f64 = 1.15;

/// Everything one run measured.
#[derive(Serialize, Debug)]
pub struct Report {
    /// When the run started (UTC).
    pub date: String,
    /// How long the whole run took, in seconds.
    pub duration_s: f64,
    /// The machine it ran on.
    pub machine: Machine,
    /// What was run.
    pub settings: Settings,
    /// The consumer variants, by topic size.
    pub consumers: Vec<SizeResult>,
    /// The producer variants, each the median of its rounds (empty when
    /// skipped).
    pub producer: Vec<PublishResult>,
    /// Every producer round, in the order run.
    pub producer_rounds: Vec<PublishResult>,
    /// The targets, checked.
    pub targets: Vec<Target>,
}

/// The machine a run measured on.
#[derive(Serialize, Debug)]
pub struct Machine {
    /// Cores available to the process.
    pub nproc: usize,
    /// Total memory, in GiB.
    pub memory_gib: f64,
    /// The CPU model as `/proc/cpuinfo` names it.
    pub cpu_model: String,
    /// The 1-minute load average when the run started (other work on the
    /// machine shows here).
    pub load_average_at_start: f64,
}

impl Machine {
    /// This machine, as `/proc` describes it.
    pub fn describe() -> Self {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let meminfo = read("/proc/meminfo");
        let memory_kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|v| v.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_else(|| "unknown".to_owned());
        let load = read("/proc/loadavg");
        Self {
            nproc: std::thread::available_parallelism().map(usize::from).unwrap_or(1),
            memory_gib: memory_kib / (1024.0 * 1024.0),
            cpu_model,
            load_average_at_start: load
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_default(),
        }
    }
}

/// What a run was asked to do.
#[derive(Serialize, Debug)]
pub struct Settings {
    /// The command line, as given.
    pub command: String,
    /// The code measured, when known.
    pub revision: Option<String>,
    /// Kafka bootstrap servers.
    pub kafka_bootstrap: String,
    /// Topic sizes.
    pub sizes: Vec<u64>,
    /// Partitions per topic.
    pub partitions: i32,
    /// Distinct users (and event tokens).
    pub users: u64,
    /// Bytes of JSON per record value.
    pub payload_bytes: u64,
    /// Extra flags given to the secure consumer.
    pub consumer_args: Vec<String>,
    /// Measured publishes per producer variant.
    pub publishes: u64,
    /// Publishes in flight.
    pub concurrency: u64,
    /// Rounds per producer variant.
    pub producer_rounds: u64,
}

/// The consumer variants at one topic size.
#[derive(Serialize, Debug)]
pub struct SizeResult {
    /// Records in the topic.
    pub size: u64,
    /// How long filling the topic took, in seconds.
    pub fill_seconds: f64,
    /// Each variant's result, in the order run.
    pub variants: Vec<ConsumeResult>,
}

impl SizeResult {
    fn variant(&self, variant: Variant) -> Option<&ConsumeResult> {
        self.variants.iter().find(|v| v.variant == variant)
    }
}

/// One target of the issue and how the run did.
#[derive(Serialize, Debug)]
pub struct Target {
    /// What is aimed at.
    pub goal: String,
    /// The figure measured.
    pub measured: String,
    /// Whether the goal is met; `None` where the issue asks only for the
    /// figure, or where the run could not measure it (`measured` then
    /// starts with [`NOT_MEASURED`]).
    pub met: Option<bool>,
}

/// How `Target::measured` begins for a target the run could not measure.
const NOT_MEASURED: &str = "not measured";

fn mib(kib: Option<u64>) -> Option<f64> {
    kib.map(|k| k as f64 / 1024.0)
}

fn ratio(value: f64, base: f64) -> Option<f64> {
    (base > 0.0).then(|| value / base)
}

fn times(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.2}×")).unwrap_or_else(|| "-".to_owned())
}

fn number(value: f64) -> String {
    let rounded = value.round() as u64;
    let digits = rounded.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn describe(variant: Variant) -> &'static str {
    match variant {
        Variant::Plain => "(a) plain StreamConsumer, counts only",
        Variant::SecureNoop => "(b) secure, no-op handler, SQLite file markers",
        Variant::SecureSqlite => "(c) secure, RecordEvents, SQLite file inbox",
        Variant::SecurePostgres => "(d) secure, RecordEvents, PostgreSQL inbox",
    }
}

impl Report {
    /// Checks the targets against the figures.
    pub fn check_targets(&mut self) {
        let mut targets = Vec::new();
        for size in &self.consumers {
            let Some(plain) = size.variant(Variant::Plain) else { continue };
            for (variant, goal) in [
                (Variant::SecureNoop, Some(0.98)),
                (Variant::SecureSqlite, Some(0.9)),
                (Variant::SecurePostgres, None),
            ] {
                let Some(result) = size.variant(variant) else { continue };
                let r = ratio(result.messages_per_s, plain.messages_per_s).unwrap_or_default();
                let what = format!(
                    "{} {} msg/s at {} events",
                    variant.label(),
                    variant.name(),
                    number(size.size as f64)
                );
                targets.push(Target {
                    goal: match goal {
                        Some(goal) => format!("{what} ≥ {goal}× (a)"),
                        None => format!("{what}: reported as a ratio to (a)"),
                    },
                    measured: format!(
                        "{} vs {} msg/s = {r:.3}×",
                        number(result.messages_per_s),
                        number(plain.messages_per_s)
                    ),
                    met: goal.map(|goal| r >= goal),
                });
            }
        }

        let bare = self.producer.iter().find(|p| p.mode == Mode::Bare);
        let secure = self.producer.iter().find(|p| p.mode == Mode::Secure);
        if let (Some(bare), Some(secure)) = (bare, secure) {
            let r = ratio(secure.p99_ms, bare.p99_ms).unwrap_or_default();
            targets.push(Target {
                goal: "producer p99 with a warm event-token cache ≤ 1.5× bare produce-and-ack p99"
                    .to_owned(),
                measured: format!("{:.2} vs {:.2} ms = {r:.2}×", secure.p99_ms, bare.p99_ms),
                met: Some(r <= 1.5),
            });
        }

        if let (Some(first), Some(last)) = (self.consumers.first(), self.consumers.last())
            && first.size < last.size
        {
            for result in &last.variants {
                let small = first.variant(result.variant).and_then(|r| mib(r.peak_rss_kib));
                let (Some(small), Some(large)) = (small, mib(result.peak_rss_kib)) else {
                    continue;
                };
                let r = large / small;
                targets.push(Target {
                    goal: format!(
                        "{} {} peak memory flat from {} to {} events \
                         (≤ {FLAT_MEMORY_RATIO}×)",
                        result.variant.label(),
                        result.variant.name(),
                        number(first.size as f64),
                        number(last.size as f64)
                    ),
                    measured: format!("{small:.1} → {large:.1} MiB = {r:.2}×"),
                    met: Some(r <= FLAT_MEMORY_RATIO),
                });
            }
        } else if !self.consumers.is_empty() {
            targets.push(Target {
                goal: format!("consumer peak memory flat from N/4 to 4N (≤ {FLAT_MEMORY_RATIO}×)"),
                measured: format!(
                    "{NOT_MEASURED}: this run had one size (`--sizes` takes several)"
                ),
                met: None,
            });
        }
        self.targets = targets;
    }

    /// The results table, in Markdown.
    pub fn table(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "| events | variant | messages/s | × plain | CPU µs/msg | × plain | p50 ms | p99 ms \
             | p99 × plain | peak MiB | × plain |\n\
             |---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for size in &self.consumers {
            let plain = size.variant(Variant::Plain);
            for result in &size.variants {
                let base = |f: fn(&ConsumeResult) -> Option<f64>| {
                    if result.variant == Variant::Plain {
                        return "1.00×".to_owned();
                    }
                    times(plain.and_then(f).zip(f(result)).and_then(|(p, v)| ratio(v, p)))
                };
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {:.1} | {} | - | - | - | {} | {} |",
                    number(size.size as f64),
                    describe(result.variant),
                    number(result.messages_per_s),
                    base(|r| Some(r.messages_per_s)),
                    result.cpu_us_per_message,
                    base(|r| Some(r.cpu_us_per_message)),
                    mib(result.peak_rss_kib)
                        .map(|m| format!("{m:.1}"))
                        .unwrap_or_else(|| "-".into()),
                    base(|r| mib(r.peak_rss_kib)),
                );
            }
        }
        let bare = self.producer.iter().find(|p| p.mode == Mode::Bare);
        for result in &self.producer {
            let base = |f: fn(&PublishResult) -> Option<f64>| {
                times(bare.and_then(f).zip(f(result)).and_then(|(b, v)| ratio(v, b)))
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {:.1} | {} | {:.2} | {:.2} | {} | {} | {} |",
                number(result.publishes as f64),
                match result.mode {
                    Mode::Bare => "producer: bare FutureProducer, produce-and-ack ¹",
                    Mode::Secure => "producer: Publisher (authenticate + publish), warm cache ¹",
                },
                number(result.publishes_per_s),
                base(|r| Some(r.publishes_per_s)),
                result.cpu_us_per_publish,
                base(|r| Some(r.cpu_us_per_publish)),
                result.p50_ms,
                result.p99_ms,
                base(|r| Some(r.p99_ms)),
                mib(result.peak_rss_kib).map(|m| format!("{m:.1}")).unwrap_or_else(|| "-".into()),
                base(|r| mib(r.peak_rss_kib)),
            );
        }
        out
    }

    /// Each consumer's scheduling, and the secure consumer's own timings,
    /// in Markdown.
    pub fn inside_table(&self) -> String {
        let mut out = String::from(
            "| events | variant | start-up s | verification mean µs | handler mean µs \
             | context switches/msg | run-queue wait s | MiB at ¼ ½ ¾ 1 of the run \
             | dead-lettered | retries |\n\
             |---:|---|---:|---:|---:|---:|---:|---|---:|---:|\n",
        );
        let us = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into());
        for size in &self.consumers {
            for result in &size.variants {
                let secure = result.secure.as_ref();
                let _ = writeln!(
                    out,
                    "| {} | {} {} | {:.1} | {} | {} | {:.2} | {:.1} | {} | {} | {} |",
                    number(size.size as f64),
                    result.variant.label(),
                    result.variant.name(),
                    result.startup_seconds,
                    us(secure.and_then(|s| s.verification_mean_us)),
                    us(secure.and_then(|s| s.handler_mean_us)),
                    result.context_switches_per_message,
                    result.run_queue_wait_s,
                    result
                        .rss_kib_by_quarter
                        .iter()
                        .map(|kib| format!("{:.0}", *kib as f64 / 1024.0))
                        .collect::<Vec<_>>()
                        .join(" "),
                    secure.map(|s| s.dead_lettered.to_string()).unwrap_or_else(|| "-".into()),
                    secure.map(|s| s.retries.to_string()).unwrap_or_else(|| "-".into()),
                );
            }
        }
        out
    }

    /// The targets, in Markdown.
    pub fn targets_table(&self) -> String {
        let mut out = String::from("| target | measured | |\n|---|---|---|\n");
        for target in &self.targets {
            let verdict = match target.met {
                Some(true) => "met",
                Some(false) => "**missed**",
                None if target.measured.starts_with(NOT_MEASURED) => "-",
                None => "reported",
            };
            let _ = writeln!(out, "| {} | {} | {verdict} |", target.goal, target.measured);
        }
        out
    }

    /// The whole results section: when, where, the tables.
    pub fn section(&self) -> String {
        let m = &self.machine;
        let s = &self.settings;
        let minutes = (self.duration_s / 60.0).floor();
        let seconds = self.duration_s - minutes * 60.0;
        let mut out = String::new();
        let _ = writeln!(out, "Latest run: {}, {minutes:.0} min {seconds:.0} s.\n", self.date);
        let _ = writeln!(out, "Command: `{}`\n", s.command);
        if let Some(revision) = &s.revision {
            let _ = writeln!(out, "Code: {revision}\n");
        }
        let _ = writeln!(
            out,
            "Machine: {} × {}, {:.1} GiB memory, load average {:.2} at the start. Kafka at {} \
             ({} partitions per topic), {} users, {}-byte JSON values.\n",
            m.nproc,
            m.cpu_model,
            m.memory_gib,
            m.load_average_at_start,
            s.kafka_bootstrap,
            s.partitions,
            number(s.users as f64),
            s.payload_bytes
        );
        if !s.consumer_args.is_empty() {
            let _ = writeln!(out, "Secure consumer flags: `{}`\n", s.consumer_args.join(" "));
        }
        out.push_str(&self.table());
        if !self.producer.is_empty() {
            let _ = writeln!(
                out,
                "\n¹ Median of {} rounds, the two variants taking turns; {} in flight.",
                s.producer_rounds, s.concurrency
            );
        }
        if !self.consumers.is_empty() {
            out.push_str(
                "\nInside each consumer (start-up before the first record; the means from the \
                 secure consumer's own metrics; scheduling over the measured interval):\n\n",
            );
            out.push_str(&self.inside_table());
        }
        if !self.targets.is_empty() {
            out.push_str("\nTargets:\n\n");
            out.push_str(&self.targets_table());
        }
        out
    }

    /// Writes the report as JSON to `path`, creating its folder.
    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let json = serde_json::to_string_pretty(self)?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))
    }

    /// Replaces the results section of the Markdown file at `path`.
    pub fn update_markdown(&self, path: &Path) -> anyhow::Result<()> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let updated = replace_section(&text, &self.section()).with_context(|| {
            format!("{} has no {START_MARKER} ... {END_MARKER} section", path.display())
        })?;
        std::fs::write(path, updated).with_context(|| format!("writing {}", path.display()))
    }
}

/// `text` with what lies between the markers replaced by `section`.
fn replace_section(text: &str, section: &str) -> Option<String> {
    let start = text.find(START_MARKER)? + START_MARKER.len();
    let end = start + text[start..].find(END_MARKER)?;
    Some(format!("{}\n{}\n{}", &text[..start], section.trim_end(), &text[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_between_the_markers_is_replaced_and_the_rest_kept() {
        let text = format!("# Title\n\n{START_MARKER}\nold\n{END_MARKER}\n\nAfter.\n");
        let updated = replace_section(&text, "new table\n").unwrap();
        assert_eq!(
            updated,
            format!("# Title\n\n{START_MARKER}\nnew table\n{END_MARKER}\n\nAfter.\n")
        );
        assert!(replace_section("no markers", "x").is_none());
    }

    #[test]
    fn numbers_get_thousands_separators() {
        assert_eq!(number(0.4), "0");
        assert_eq!(number(999.0), "999");
        assert_eq!(number(1_000.0), "1,000");
        assert_eq!(number(1_234_567.0), "1,234,567");
    }
}
