//! The service binaries run as separate processes, for tests that kill,
//! signal and restart them, and bulk writes of event records.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::kafka_bootstrap;
use crate::{CONSUMER_AUDIENCE, EVENT_SCOPE, EVENT_TYPE, dead_letter_topic, group_of};

/// The path of a workspace binary (`event-consumer`, `event-producer`),
/// built next to the test executables by `scripts/test.sh`.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let path = exe.parent().and_then(Path::parent).expect("a target directory").join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`, \
         which scripts/test.sh does)",
        path.display()
    );
    path
}

/// A running service binary whose output goes to a log file.
pub struct ServiceProcess {
    child: Child,
    log: PathBuf,
}

impl ServiceProcess {
    /// Starts binary `name` with `env` (and nothing else of the test's
    /// `EI_*` environment), logging to `log`.
    pub fn start(name: &str, env: &[(String, String)], log: &Path) -> Self {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let err = out.try_clone().unwrap();
        let mut command = Command::new(binary(name));
        for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("EI_")) {
            command.env_remove(key);
        }
        let child = command
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("the binary starts");
        Self { child, log: log.to_owned() }
    }

    /// The process ID.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process with SIGKILL and reaps it.
    pub fn kill(mut self) {
        self.child.kill().expect("SIGKILL delivered");
        self.child.wait().expect("reaped");
    }

    /// Sends SIGTERM and waits up to `limit` for the exit; its status and
    /// how long it took. Panics with the log's tail if it does not exit.
    pub fn terminate(mut self, limit: Duration) -> (ExitStatus, Duration) {
        let started = Instant::now();
        let sent = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        assert!(sent.is_ok_and(|s| s.success()), "SIGTERM delivered");
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return (status, started.elapsed());
            }
            if started.elapsed() > limit {
                let _ = self.child.kill();
                panic!("no exit {limit:?} after SIGTERM; log:\n{}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("wait").is_none()
    }

    /// The last lines of the process's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The environment of an `event-consumer` process for `topic` (group,
/// dead-letter topic and route as the in-process test consumers use).
pub fn consumer_env(topic: &str, issuer: &str, database_url: &str) -> Vec<(String, String)> {
    [
        ("EI_KAFKA_BOOTSTRAP", kafka_bootstrap()),
        ("EI_GROUP", group_of(topic)),
        ("EI_TOPICS", topic.to_owned()),
        ("EI_DEAD_LETTER_TOPIC", dead_letter_topic(topic)),
        ("EI_ISSUER", issuer.to_owned()),
        ("EI_AUDIENCE", CONSUMER_AUDIENCE.to_owned()),
        ("EI_ROUTES", format!("type={EVENT_TYPE},scope={EVENT_SCOPE}")),
        ("EI_DATABASE_URL", database_url.to_owned()),
        ("EI_MAX_RETRY_BACKOFF_MS", "1000".to_owned()),
        ("EI_SESSION_TIMEOUT_MS", "3000".to_owned()),
        ("EI_OPS_LISTEN", "127.0.0.1:0".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// One event record to write.
pub struct EventRecord {
    /// Target partition.
    pub partition: i32,
    /// `ce_id`.
    pub id: String,
    /// The event token.
    pub token: String,
    /// The JSON value.
    pub value: String,
}

/// Writes `records` in chunks of `chunk`, pausing `pause` between chunks
/// (a steady stream rather than one burst); returns when all are acked.
pub async fn write_events(topic: &str, records: &[EventRecord], chunk: usize, pause: Duration) {
    let writer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .set("linger.ms", "5")
        .create()
        .unwrap();
    for part in records.chunks(chunk.max(1)) {
        let sends = part.iter().map(|r| {
            let authorization = format!("Bearer {}", r.token);
            let headers = OwnedHeaders::new()
                .insert(Header { key: "ce_specversion", value: Some("1.0") })
                .insert(Header { key: "ce_id", value: Some(r.id.as_str()) })
                .insert(Header { key: "ce_type", value: Some(EVENT_TYPE) })
                .insert(Header { key: "ce_source", value: Some("/test-writer") })
                .insert(Header { key: "content-type", value: Some("application/json") })
                .insert(Header { key: "authorization", value: Some(authorization.as_str()) });
            let record = FutureRecord::to(topic)
                .partition(r.partition)
                .key(r.id.as_str())
                .payload(r.value.as_str())
                .headers(headers);
            writer.send_result(record).expect("queued")
        });
        for delivery in futures_util::future::join_all(sends).await {
            delivery.expect("delivery report").map_err(|(e, _)| e).expect("record written");
        }
        tokio::time::sleep(pause).await;
    }
}

/// The end (high-watermark) offsets of `topic`'s first `partitions`.
pub async fn end_offsets(topic: &str, partitions: i32) -> Vec<i64> {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let client: BaseConsumer =
            ClientConfig::new().set("bootstrap.servers", kafka_bootstrap()).create().unwrap();
        (0..partitions)
            .map(|p| client.fetch_watermarks(&topic, p, Duration::from_secs(10)).unwrap().1)
            .collect()
    })
    .await
    .unwrap()
}

/// The committed offsets of `topic`'s test group on its first
/// `partitions` (-1001 where none is committed), read in one request.
pub async fn committed_offsets(topic: &str, partitions: i32) -> Vec<i64> {
    use rdkafka::{Offset, TopicPartitionList};
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let client: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", kafka_bootstrap())
            .set("group.id", group_of(&topic))
            .create()
            .unwrap();
        let mut list = TopicPartitionList::new();
        for partition in 0..partitions {
            list.add_partition(&topic, partition);
        }
        let committed = client.committed_offsets(list, Duration::from_secs(10)).unwrap();
        (0..partitions)
            .map(|p| match committed.find_partition(&topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(offset)) => offset,
                _ => -1001,
            })
            .collect()
    })
    .await
    .unwrap()
}
