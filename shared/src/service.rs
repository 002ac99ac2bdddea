//! What both binaries do the same way at their edge: settings, logging,
//! signals, the start-up broker check and the operations endpoint.

use std::io::IsTerminal as _;

/// Sets up `tracing` to standard error: human-readable text, or one JSON
/// object per line when `json` is true. `RUST_LOG` overrides the default
/// `info` level.
pub fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Completes on the first SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = interrupt => {},
                    _ = term.recv() => {},
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot watch SIGTERM; only SIGINT stops the service");
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    tracing::info!("shutdown requested");
}

/// Parses a binary's settings from its flags and environment. `--help` and
/// `--version` print and exit 0; a bad or missing setting prints one line
/// naming it (`<binary>: error: ...`) and exits 2.
pub fn parse_config<T: clap::Parser>(binary: &str) -> T {
    match T::try_parse() {
        Ok(config) => config,
        Err(error) if !error.use_stderr() => error.exit(),
        Err(error) => {
            exit_with(binary, &error.render().to_string(), 2);
        }
    }
}

/// Prints `message` as one line prefixed by `binary` and exits with `code`.
/// Clap's usage hints and blank lines are dropped.
pub fn exit_with(binary: &str, message: &str, code: i32) -> ! {
    eprintln!("{binary}: {}", one_line(message));
    std::process::exit(code)
}

/// `message` on one line: lines joined by spaces, clap's usage and help
/// hints dropped.
pub fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .take_while(|line| !line.starts_with("Usage:") && !line.starts_with("For more information"))
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Checks at start that a Kafka broker answers at `bootstrap` within
/// `timeout`; the number of brokers it reports.
pub async fn check_kafka(bootstrap: &str, timeout: std::time::Duration) -> Result<usize, String> {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};

    let bootstrap = bootstrap.to_owned();
    let check = tokio::task::spawn_blocking(move || {
        let client: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()
            .map_err(|e| format!("{bootstrap:?} is not usable: {e}"))?;
        let metadata = client.fetch_metadata(None, timeout).map_err(|e| {
            format!("no Kafka broker answered at {bootstrap} within {timeout:?} ({e})")
        })?;
        Ok(metadata.brokers().len())
    });
    check.await.map_err(|e| format!("the broker check failed: {e}"))?
}

/// How long a client may take to send a request's headers before its
/// connection is closed: an unfinished request holds neither a connection
/// slot nor a shutdown.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves `router` on `listener` until `stop` completes, then stops
/// accepting and completes once the open connections have finished their
/// requests. A client that does not send a request's headers within
/// [`HEADER_READ_TIMEOUT`] is disconnected.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;

    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    builder.http2().timer(TokioTimer::new());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let stream = tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let service = TowerToHyperService::new(router.clone());
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
        let connection = graceful.watch(connection.into_owned());
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Serves the operations endpoint until `stop` completes; once stopped it
/// gives open requests at most `drain` before dropping them, so no client
/// can hold up a shutdown.
pub async fn serve_ops(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
    drain: std::time::Duration,
) {
    let (stopped_tx, stopped) = tokio::sync::oneshot::channel();
    let server = serve_http(listener, router, async move {
        stop.await;
        let _ = stopped_tx.send(());
    });
    tokio::pin!(server);
    tokio::select! {
        () = &mut server => return,
        _ = stopped => {}
    }
    if tokio::time::timeout(drain, server).await.is_err() {
        tracing::warn!("operations requests still open at shutdown were dropped");
    }
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn clap_errors_become_one_line() {
        let rendered = "error: the following required arguments were not provided:\n  \
                        --audience <AUDIENCE>\n\nUsage: event-consumer --audience <AUDIENCE>\n\n\
                        For more information, try '--help'.\n";
        assert_eq!(
            one_line(rendered),
            "error: the following required arguments were not provided: --audience <AUDIENCE>"
        );
    }
}
