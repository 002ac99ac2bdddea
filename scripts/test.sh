#!/usr/bin/env bash
# The project's test command: starts the real services the tests need
# (Apache Kafka, Keycloak and PostgreSQL), runs every test of the
# workspace, and stops the services again, whatever the outcome.
#
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh -p event-identity`
# or `scripts/test.sh --test end_to_end`); with `-p`/`--package` only the
# packages named are tested, otherwise the whole workspace is.
# Set EI_KEEP_SERVICES=1 to leave the services running afterwards.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

stop_services() {
	if [ "${EI_KEEP_SERVICES:-0}" != 1 ]; then
		scripts/kafka.sh stop || true
		scripts/keycloak.sh stop || true
		scripts/postgres.sh stop || true
	fi
}
trap stop_services EXIT

# The tests find the services through these (see tests/src/lib.rs).
export EI_TEST_KAFKA="127.0.0.1:${EI_KAFKA_PORT:-19092}"
export EI_TEST_KEYCLOAK="http://127.0.0.1:${EI_KEYCLOAK_PORT:-18080}"

# cargo ignores -p when --workspace is given, so only add it without -p.
scope=(--workspace)
for arg in "$@"; do
	case "$arg" in
	-p | -p* | --package | --package=*) scope=() ;;
	esac
done

# Build first, so the services do not idle through the compile. The
# process tests run the service binaries themselves, so build those too.
cargo build --workspace --locked --bins
cargo test "${scope[@]}" --locked --no-run "$@"

start=$(date +%s)
scripts/kafka.sh start >/dev/null &
kafka=$!
scripts/keycloak.sh start >/dev/null &
keycloak=$!
scripts/postgres.sh start || { echo "test.sh: PostgreSQL did not start" >&2; exit 1; }
failed=0
wait "$kafka" || { echo "test.sh: Kafka did not start" >&2; failed=1; }
wait "$keycloak" || { echo "test.sh: Keycloak did not start" >&2; failed=1; }
[ "$failed" = 0 ] || exit 1
echo "test.sh: services ready in $(($(date +%s) - start))s" >&2

cargo test "${scope[@]}" --locked "$@"
