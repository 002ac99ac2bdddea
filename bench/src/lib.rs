//! Benchmarks of what security costs: the secure consumer and producer of
//! identity-bearing events, each measured against a plain rdkafka client
//! doing the same Kafka work on the same records.
//!
//! [`run`] is the orchestrator: it starts the development issuer, fills a
//! topic per size, and runs every variant in its own child process (this
//! same binary, re-executed with a hidden subcommand) so that each peak
//! memory figure is that variant's alone. [`consume`] and [`publish`] are
//! what the children do; [`report`] turns their results into the table,
//! the JSON results file and the section of `docs/benchmarks.md`.
//!
//! [`steps`] times the secure consumer's steps one by one, without Kafka.
//!
//! `scripts/bench.sh` is the command; `docs/benchmarks.md` says what is
//! measured and how.

pub mod child;
pub mod cli;
pub mod consume;
pub mod publish;
pub mod report;
pub mod run;
pub mod steps;
pub mod workload;

/// The event type every benchmark record carries.
pub const EVENT_TYPE: &str = "com.example.order.created";
/// Its event scope.
pub const EVENT_SCOPE: &str = "events:order.created";
/// The consumers' audience.
pub const CONSUMER_AUDIENCE: &str = "order-consumer";
/// The producer's OAuth client, as the development issuer's default
/// exchange policy knows it.
pub const PRODUCER_CLIENT_ID: &str = "event-producer";
/// That client's secret (a development secret, public).
pub const PRODUCER_CLIENT_SECRET: &str = "producer-secret";
/// The tenant every user and every event belongs to, so the consumer's
/// `claim_equals_field=tenant:tenant` rule runs and passes.
pub const TENANT: &str = "acme";
