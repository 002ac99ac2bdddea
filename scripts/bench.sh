#!/usr/bin/env bash
# The benchmark command: what security costs, measured against a plain
# consumer and a bare producer on the real broker the tests use (see
# docs/benchmarks.md).
#
# Builds the benchmark in release mode, starts Kafka (scripts/kafka.sh) and
# PostgreSQL (scripts/postgres.sh) unless they already answer, runs
# `event-identity-bench run` with this script's arguments, and stops only
# the services it started. Prints the table and writes every figure to
# target/bench/results.json; the default run (no arguments) also writes the
# table into docs/benchmarks.md, any other run only with
# EI_BENCH_DOCS=1 (so a partial run does not replace the published one).
#
#   scripts/bench.sh                                  the default run (see docs/benchmarks.md)
#   scripts/bench.sh --sizes 50000,200000,800000      consumer sizes
#   scripts/bench.sh --variants plain,secure-sqlite --publishes 0
#   scripts/bench.sh --batch-size 512 --consumer-arg=--session-timeout-ms=6000
#   target/release/event-identity-bench run --help    every option
#                                (under $CARGO_TARGET_DIR if it is set)
#
# Environment: EI_KAFKA_PORT (default 19092) and EI_POSTGRES_PORT (default
# 15432), as scripts/test.sh; EI_KEEP_SERVICES=1 leaves the services this
# script started running; EI_BENCH_DOCS=1 (see above).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

kafka_port="${EI_KAFKA_PORT:-19092}"
postgres_port="${EI_POSTGRES_PORT:-15432}"
export EI_KAFKA_PORT="$kafka_port" EI_POSTGRES_PORT="$postgres_port"

log() { printf 'bench.sh: %s\n' "$*" >&2; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Build first, so the services do not idle through the compile.
cargo build --release --locked -p event-identity-bench

started=()
stop_started() {
	if [ "${EI_KEEP_SERVICES:-0}" = 1 ]; then
		[ "${#started[@]}" -eq 0 ] || log "leaving ${started[*]} running (EI_KEEP_SERVICES=1)"
		return
	fi
	local service
	for service in ${started[@]+"${started[@]}"}; do
		scripts/"$service".sh stop || true
	done
}
trap stop_started EXIT

# A broker or server already answering on the port (the engineer's, the
# tests', or anyone's) is used as it is and left running.
if scripts/kafka.sh status >/dev/null 2>&1 || port_open "$kafka_port"; then
	log "Kafka already running on 127.0.0.1:$kafka_port: using it"
else
	scripts/kafka.sh start >/dev/null
	started+=(kafka)
fi
if scripts/postgres.sh status >/dev/null 2>&1; then
	log "PostgreSQL already running on 127.0.0.1:$postgres_port: using it"
else
	scripts/postgres.sh start
	started+=(postgres)
fi

# What was measured: the commit, and whether the measured code differs
# from it in the checkout.
revision="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
git diff --quiet HEAD -- shared producer consumer 2>/dev/null ||
	revision="$revision with uncommitted changes to shared/, producer/ or consumer/"

markdown=()
if [ $# -eq 0 ] || [ "${EI_BENCH_DOCS:-0}" = 1 ]; then
	markdown=(--markdown docs/benchmarks.md)
else
	log "not the default run: docs/benchmarks.md is left as it is (EI_BENCH_DOCS=1 writes it)"
fi

EI_BENCH_COMMAND="scripts/bench.sh${*:+ $*}" EI_BENCH_REVISION="$revision" \
	"${CARGO_TARGET_DIR:-target}/release/event-identity-bench" run \
	--kafka-bootstrap "127.0.0.1:$kafka_port" \
	--postgres "postgres://events@127.0.0.1:$postgres_port" \
	--results target/bench/results.json \
	${markdown[@]+"${markdown[@]}"} \
	"$@"
