#!/usr/bin/env bash
# A throw-away PostgreSQL cluster on loopback, from Debian's packages, for
# the shared-inbox tests. Trust authentication, superuser `events`, no
# password: for tests only.
#
#   scripts/postgres.sh start    new cluster, started, waits until it accepts connections
#   scripts/postgres.sh stop     stops it; 0 when it was not running
#   scripts/postgres.sh status   0 when it accepts connections
#
# Environment: EI_POSTGRES_PORT (default 15432), EI_RUN_DIR (default
# <repo>/target/services; this script uses <root>/postgres).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
port="${EI_POSTGRES_PORT:-15432}"
run_root="${EI_RUN_DIR:-$repo/target/services}"
case "$run_root" in /*) ;; *) run_root="$PWD/$run_root" ;; esac
dir="$run_root/postgres"

log() { printf 'postgres.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
[ -n "$bin" ] || die "no PostgreSQL server under /usr/lib/postgresql (apt-get install postgresql)"
as_postgres() { runuser -u postgres -- "$@"; }

cmd_stop() {
	if [ -f "$dir/data/postmaster.pid" ]; then
		as_postgres "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
		log "stopped"
	fi
}

cmd_start() {
	local t0=$SECONDS
	cmd_stop
	rm -rf "$dir"
	mkdir -p "$dir"
	chown postgres: "$dir"
	as_postgres "$bin/initdb" -D "$dir/data" -A trust -U events >"$dir/initdb.log" 2>&1 ||
		{ cat "$dir/initdb.log" >&2; die "initdb failed"; }
	as_postgres "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 \
		-o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=200" start >/dev/null ||
		{ tail -n 20 "$dir/postgres.log" >&2; die "PostgreSQL did not start"; }
	"$bin/pg_isready" -h 127.0.0.1 -p "$port" -q || die "PostgreSQL does not accept connections"
	log "PostgreSQL ready on 127.0.0.1:$port in $((SECONDS - t0))s"
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
status) "$bin/pg_isready" -h 127.0.0.1 -p "$port" -q ;;
*) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
