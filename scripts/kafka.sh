#!/usr/bin/env bash
# Throw-away single-node Apache Kafka broker (KRaft, broker+controller in one JVM) on loopback,
# for tests and CI. No Docker: the jars come from Maven Central (scripts/kafka/pom.xml), are
# copied once into a cache folder, and the broker runs from that classpath with plain `java`.
#
# Usage:
#   scripts/kafka.sh start     fetch jars if needed, wipe the run dir, format storage, start the broker
#                              and wait until it serves metadata and consumer groups; prints the
#                              bootstrap address (127.0.0.1:PORT) on stdout. Stops an earlier broker first.
#   scripts/kafka.sh resume    start again on the previous run's data (as after an outage); a plain
#                              start when there is none
#   scripts/kafka.sh stop      stop the broker (TERM, then KILL); exit 0 also when it was not running
#   scripts/kafka.sh status    exit 0 if the broker is running and answers requests, 1 otherwise
#   scripts/kafka.sh restart   stop + start
#   scripts/kafka.sh fetch     only resolve/cache the jars (e.g. to warm a CI cache)
#   scripts/kafka.sh tool MAIN_CLASS [ARGS...]
#                              run a Kafka CLI class on the same classpath, e.g.
#                              scripts/kafka.sh tool org.apache.kafka.tools.TopicCommand --bootstrap-server 127.0.0.1:19092 --list
#   scripts/kafka.sh logs      print the tail of the broker log
#
# Environment:
#   EI_KAFKA_PORT               PLAINTEXT listener port (default 19092)
#   EI_KAFKA_CONTROLLER_PORT    CONTROLLER listener port (default 19093)
#   EI_CACHE_DIR                jar cache (default $HOME/.cache/event-identity); jars in kafka-<version>/libs
#   EI_RUN_DIR                  run dirs root (default <repo>/target/services); this script uses <root>/kafka
#   EI_KAFKA_START_TIMEOUT      seconds to wait for readiness (default 120)
#   EI_KAFKA_JAVA               java binary (default: $JAVA_HOME/bin/java if set, else java on PATH; needs 17+)
#   EI_KAFKA_HEAP_OPTS          broker heap options (default "-Xms256m -Xmx512m")
#   EI_KAFKA_JAVA_OPTS          extra broker JVM options (word-split; e.g. -XX:TieredStopAtLevel=4 for C2)
set -euo pipefail

KAFKA_VERSION=4.4.0 # keep in step with kafka.version in scripts/kafka/pom.xml

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
POM="$SCRIPT_DIR/kafka/pom.xml"
LOG4J_CONF="$SCRIPT_DIR/kafka/log4j2.xml"

CACHE_DIR="${EI_CACHE_DIR:-${HOME:-/tmp}/.cache/event-identity}"
KAFKA_HOME="$CACHE_DIR/kafka-$KAFKA_VERSION"
LIBS_DIR="$KAFKA_HOME/libs"
MARKER="$KAFKA_HOME/libs.complete"

RUN_ROOT="${EI_RUN_DIR:-$REPO_ROOT/target/services}"
case "$RUN_ROOT" in /*) ;; *) RUN_ROOT="$PWD/$RUN_ROOT" ;; esac
RUN_DIR="$RUN_ROOT/kafka"
DATA_DIR="$RUN_DIR/data"
CONFIG_FILE="$RUN_DIR/server.properties"
PID_FILE="$RUN_DIR/kafka.pid"
LOG_FILE="$RUN_DIR/kafka.log"

HOST=127.0.0.1
PORT="${EI_KAFKA_PORT:-19092}"
CONTROLLER_PORT="${EI_KAFKA_CONTROLLER_PORT:-19093}"
BOOTSTRAP="$HOST:$PORT"
START_TIMEOUT="${EI_KAFKA_START_TIMEOUT:-120}"
STOP_TIMEOUT=30
READY_GROUP=ei-kafka-sh-readiness

log() { printf 'kafka.sh: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

now_ms() { date +%s%3N; }
elapsed() { # elapsed START_MS -> "12.3s"
	local d=$(($(now_ms) - $1))
	printf '%d.%ds' $((d / 1000)) $((d % 1000 / 100))
}

# --- java ------------------------------------------------------------------------------------------

pick_java() {
	if [[ -n "${EI_KAFKA_JAVA:-}" ]]; then
		JAVA="$EI_KAFKA_JAVA"
	elif [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then
		JAVA="$JAVA_HOME/bin/java"
	elif command -v java >/dev/null 2>&1; then
		JAVA="$(command -v java)"
	else
		die "no java found (Kafka $KAFKA_VERSION needs Java 17+; set EI_KAFKA_JAVA or JAVA_HOME)"
	fi
	local v
	v="$("$JAVA" -version 2>&1 | sed -n 's/.* version "\([0-9]*\).*/\1/p' | head -n1)"
	if [[ -z "$v" || "$v" -lt 17 ]]; then
		die "$JAVA is Java '${v:-?}', Kafka $KAFKA_VERSION needs Java 17+ (set EI_KAFKA_JAVA or JAVA_HOME)"
	fi
}

# --- jars ------------------------------------------------------------------------------------------

pom_sha() { sha256sum "$POM" | cut -d' ' -f1; }

# The marker holds the pom's SHA-256 on line 1 and the jar names after it; complete = all present.
libs_complete() {
	[[ -f "$MARKER" ]] || return 1
	[[ "$(head -n1 "$MARKER")" == "pom_sha256=$(pom_sha)" ]] || return 1
	local jar n=0
	while IFS= read -r jar; do
		[[ -f "$LIBS_DIR/$jar" ]] || return 1
		n=$((n + 1))
	done < <(tail -n +2 "$MARKER")
	[[ $n -gt 0 ]]
}

fetch_libs() {
	libs_complete && return 0
	mkdir -p "$KAFKA_HOME"
	# Serialise concurrent fetches into the same cache (another start in parallel).
	if command -v flock >/dev/null 2>&1; then
		exec 9>"$KAFKA_HOME/.lock"
		flock -w 900 9 || die "timed out waiting for the lock on $KAFKA_HOME/.lock"
		if libs_complete; then
			exec 9>&-
			return 0
		fi
	fi
	command -v mvn >/dev/null 2>&1 || die "mvn not found: needed once to fetch the Kafka jars into $LIBS_DIR"
	local t0 tmp
	t0=$(now_ms)
	tmp="$KAFKA_HOME/libs.tmp.$$"
	rm -rf "$tmp"
	log "resolving Kafka $KAFKA_VERSION jars with Maven into $LIBS_DIR (once, then cached) ..."
	if ! mvn -q -B -Dstyle.color=never -f "$POM" dependency:copy-dependencies \
		-DincludeScope=runtime -DoutputDirectory="$tmp" >"$KAFKA_HOME/mvn.log" 2>&1; then
		rm -rf "$tmp"
		tail -n 40 "$KAFKA_HOME/mvn.log" | sed 's/^/  | /' >&2
		die "Maven could not resolve the jars of $POM (full output: $KAFKA_HOME/mvn.log)"
	fi
	local need
	for need in "kafka_2.13-$KAFKA_VERSION.jar" "kafka-tools-$KAFKA_VERSION.jar" "kafka-clients-$KAFKA_VERSION.jar"; do
		[[ -f "$tmp/$need" ]] || {
			rm -rf "$tmp"
			die "$need missing after Maven (is kafka.version in $POM $KAFKA_VERSION?)"
		}
	done
	# The SLF4J binding must match the slf4j-api that Maven resolved, or the broker logs nothing.
	if compgen -G "$tmp/slf4j-api-1.*.jar" >/dev/null && ! compgen -G "$tmp/log4j-slf4j-impl-*.jar" >/dev/null; then
		rm -rf "$tmp"
		die "slf4j-api 1.x resolved but no log4j-slf4j-impl in $POM"
	fi
	if compgen -G "$tmp/slf4j-api-2.*.jar" >/dev/null && ! compgen -G "$tmp/log4j-slf4j2-impl-*.jar" >/dev/null; then
		rm -rf "$tmp"
		die "slf4j-api 2.x resolved: $POM must depend on log4j-slf4j2-impl instead of log4j-slf4j-impl"
	fi
	rm -rf "$LIBS_DIR"
	mv "$tmp" "$LIBS_DIR"
	{
		echo "pom_sha256=$(pom_sha)"
		(cd "$LIBS_DIR" && ls -1 -- *.jar)
	} >"$MARKER.tmp"
	mv "$MARKER.tmp" "$MARKER"
	log "cached $(($(wc -l <"$MARKER") - 1)) jars in $LIBS_DIR ($(elapsed "$t0"))"
	exec 9>&-
}

# The java command line for a Kafka CLI class on the broker's classpath; its logging goes to stderr.
tool_java() {
	TOOL_JAVA=("$JAVA" -Xms32m -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true
		-Dlog4j2.configurationFile="$LOG4J_CONF"
		-Dei.kafka.log.level="${EI_KAFKA_TOOL_LOG_LEVEL:-WARN}" -Dei.kafka.log.target=SYSTEM_ERR
		-Dlog4j.shutdownHookEnabled=false
		-cp "$LIBS_DIR/*")
}

# run_tool MAIN_CLASS ARGS...
run_tool() {
	tool_java
	"${TOOL_JAVA[@]}" "$@"
}

# run_tool_timeout SECONDS MAIN_CLASS ARGS...: the same, killed after SECONDS.
run_tool_timeout() {
	local secs="$1"
	shift
	tool_java
	timeout -k 5 "$secs" "${TOOL_JAVA[@]}" "$@"
}

# --- process helpers --------------------------------------------------------------------------------

read_pid() {
	[[ -f "$PID_FILE" ]] || return 1
	local pid
	pid="$(tr -dc '0-9' <"$PID_FILE")"
	[[ -n "$pid" ]] || return 1
	echo "$pid"
}

# is_our_broker PID: alive and (where /proc tells) a java running kafka.Kafka.
is_our_broker() {
	local pid="$1"
	kill -0 "$pid" 2>/dev/null || return 1
	if [[ -r "/proc/$pid/cmdline" ]]; then
		{ tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null | grep -q 'kafka\.Kafka' || return 1
	fi
}

# orphan_pid: a broker of this run dir whose pid file is gone (e.g. `cargo clean` wiped target/):
# the java whose command line ends in `kafka.Kafka <this run dir>/server.properties`.
orphan_pid() {
	local f pid
	for f in /proc/[0-9]*/cmdline; do
		pid="${f#/proc/}"
		pid="${pid%/cmdline}"
		[[ "$pid" != "$$" ]] || continue
		if { tr '\0' '\n' <"$f"; } 2>/dev/null | tail -n 2 | tr '\n' ' ' | grep -qxF "kafka.Kafka $CONFIG_FILE "; then
			echo "$pid"
			return 0
		fi
	done
	return 1
}

running_pid() {
	local pid
	if pid="$(read_pid)" && is_our_broker "$pid"; then
		echo "$pid"
		return 0
	fi
	pid="$(orphan_pid)" || return 1
	echo "$pid"
}

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

log_tail() {
	if [[ -f "$LOG_FILE" ]]; then
		log "last 60 lines of $LOG_FILE:"
		tail -n 60 "$LOG_FILE" | sed 's/^/  | /' >&2
	else
		log "no broker log at $LOG_FILE"
	fi
}

# A Kafka cluster id: 16 random bytes, base64url without padding, not starting with '-' -- what
# `kafka.tools.StorageTool random-uuid` prints, without paying a JVM start (which takes seconds on a
# busy 2-core machine). Falls back to StorageTool where base64 or /dev/urandom are missing.
new_cluster_id() {
	local id=""
	if command -v base64 >/dev/null 2>&1 && [[ -r /dev/urandom ]]; then
		while [[ -z "$id" || "$id" == -* ]]; do
			id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
		done
	else
		id="$(run_tool kafka.tools.StorageTool random-uuid 2>>"$RUN_DIR/format.log" | tail -n1)"
	fi
	[[ "$id" =~ ^[A-Za-z0-9_-]{22}$ ]] || die "bad cluster id '$id'"
	echo "$id"
}

# --- config -----------------------------------------------------------------------------------------

write_config() {
	cat >"$CONFIG_FILE" <<EOF
# Generated by scripts/kafka.sh: single-node KRaft broker+controller for tests, loopback only.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$CONTROLLER_PORT
listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$PORT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
log.dirs=$DATA_DIR

num.partitions=1
default.replication.factor=1
auto.create.topics.enable=true
delete.topic.enable=true

# Internal topics: one replica, and few partitions so that the first group/transaction is quick.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
share.coordinator.state.topic.num.partitions=1

group.initial.rebalance.delay.ms=0
# Tests kill consumers and wait for the group to notice: allow short sessions.
group.min.session.timeout.ms=1000

# Small footprint: few threads, a small log-cleaner buffer (the default takes 128 MiB of heap).
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
log.cleaner.dedupe.buffer.size=16777216
EOF
}

# --- readiness --------------------------------------------------------------------------------------

# Client settings for the readiness probes: fail fast, the loop retries.
write_probe_config() {
	cat >"$RUN_DIR/probe.properties" <<EOF
request.timeout.ms=5000
default.api.timeout.ms=10000
retry.backoff.ms=200
EOF
}

# broker_answers: a real Metadata + ApiVersions round trip (not just an open port).
broker_answers() {
	run_tool_timeout 30 org.apache.kafka.tools.BrokerApiVersionsCommand \
		--bootstrap-server "$BOOTSTRAP" --command-config "$RUN_DIR/probe.properties" \
		>"$RUN_DIR/probe.out" 2>&1 &&
		grep -q "^$HOST:$PORT" "$RUN_DIR/probe.out"
}

# The readiness probe is one JVM that does it all: bootstrap Metadata, FindCoordinator (which creates
# __consumer_offsets) and a describe of a group on the loaded coordinator. It is started right after
# the broker, so that its JVM start-up overlaps the broker's; until the broker listens, its admin
# client just retries the connection. An unknown group is the expected answer
# ("GroupIdNotFoundException" / "does not exist"): only a loaded coordinator gives it.

# start_probe SECONDS: run the probe in the background, killed after SECONDS; sets PROBE_PID.
start_probe() {
	local secs="$1"
	tool_java
	timeout -k 5 "$secs" "${TOOL_JAVA[@]}" org.apache.kafka.tools.consumer.group.ConsumerGroupCommand \
		--bootstrap-server "$BOOTSTRAP" --command-config "$RUN_DIR/probe.properties" \
		--describe --group "$READY_GROUP" --timeout $(((secs > 10 ? secs - 5 : secs) * 1000)) \
		</dev/null >"$RUN_DIR/probe.out" 2>&1 &
	PROBE_PID=$!
}

# probe_ok EXIT_CODE: did the finished probe see a working group coordinator?
probe_ok() {
	grep -qE 'GroupIdNotFoundException|does not exist' "$RUN_DIR/probe.out" && return 0
	[[ $1 -eq 0 ]] && ! grep -qiE 'error|exception' "$RUN_DIR/probe.out"
}

stop_probe() {
	if [[ -n "${PROBE_PID:-}" ]]; then
		kill -TERM "$PROBE_PID" 2>/dev/null || true
		wait "$PROBE_PID" 2>/dev/null || true
		PROBE_PID=""
	fi
}

# wait_ready PID: poll until the broker serves metadata and groups; on failure stop it and exit 1.
wait_ready() {
	local pid="$1" deadline left rc why=""
	deadline=$(($(now_ms) + START_TIMEOUT * 1000))
	PROBE_PID=""
	while :; do
		if ! kill -0 "$pid" 2>/dev/null; then
			why="the broker (pid $pid) exited during startup"
			break
		fi
		left=$(((deadline - $(now_ms)) / 1000))
		if [[ $left -le 0 ]]; then
			why="broker not ready after ${START_TIMEOUT}s"
			break
		fi
		if [[ -z "$PROBE_PID" ]]; then
			start_probe $((left < 5 ? 5 : left > 90 ? 90 : left))
		elif ! kill -0 "$PROBE_PID" 2>/dev/null; then # finished (bash has reaped it; wait gives its status)
			rc=0
			wait "$PROBE_PID" || rc=$?
			PROBE_PID=""
			probe_ok "$rc" && return 0
			sleep 0.5 # e.g. refused before the listener was up: try again
		fi
		sleep 0.2
	done
	stop_probe
	log "$why"
	if [[ -s "$RUN_DIR/probe.out" ]]; then
		log "last readiness probe output ($RUN_DIR/probe.out):"
		tail -n 20 "$RUN_DIR/probe.out" | sed 's/^/  > /' >&2
	fi
	log_tail
	cmd_stop >/dev/null 2>&1 || true
	rm -f "$PID_FILE"
	exit 1
}

# --- commands ---------------------------------------------------------------------------------------

cmd_stop() {
	local pid t0
	if ! pid="$(running_pid)"; then
		if [[ -f "$PID_FILE" ]]; then
			log "not running (stale pid file $PID_FILE removed)"
			rm -f "$PID_FILE"
		else
			log "not running"
		fi
		return 0
	fi
	t0=$(now_ms)
	log "stopping broker (pid $pid) ..."
	kill -TERM "$pid" 2>/dev/null || true
	local i
	for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	if kill -0 "$pid" 2>/dev/null; then
		log "broker did not exit within ${STOP_TIMEOUT}s of SIGTERM; sending SIGKILL"
		kill -KILL "$pid" 2>/dev/null || true
		for ((i = 0; i < 50; i++)); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		kill -0 "$pid" 2>/dev/null && die "pid $pid survived SIGKILL"
	fi
	rm -f "$PID_FILE"
	log "stopped ($(elapsed "$t0"))"
}

cmd_start() {
	local t0 pid cluster_id
	t0=$(now_ms)
	[[ "$PORT" =~ ^[0-9]+$ && "$CONTROLLER_PORT" =~ ^[0-9]+$ ]] || die "EI_KAFKA_PORT/EI_KAFKA_CONTROLLER_PORT must be numbers"
	[[ "$PORT" != "$CONTROLLER_PORT" ]] || die "EI_KAFKA_PORT and EI_KAFKA_CONTROLLER_PORT must differ"
	pick_java
	fetch_libs

	if pid="$(running_pid)"; then
		log "a broker from a previous start is still running (pid $pid): stopping it first"
		cmd_stop
	fi
	local p
	for p in "$PORT" "$CONTROLLER_PORT"; do
		port_open "$p" && die "port $HOST:$p is already in use by another process (set EI_KAFKA_PORT / EI_KAFKA_CONTROLLER_PORT)"
	done

	if [[ "${1:-}" == resume && -s "$CONFIG_FILE" && -d "$DATA_DIR" ]]; then
		# Restart on the data of the previous run, as after a broker outage.
		cluster_id="(resumed)"
	else
		rm -rf "$RUN_DIR"
		mkdir -p "$DATA_DIR"
		write_config
		write_probe_config

		cluster_id="$(new_cluster_id)"
		if ! run_tool kafka.tools.StorageTool format -t "$cluster_id" -c "$CONFIG_FILE" >>"$RUN_DIR/format.log" 2>&1; then
			sed 's/^/  | /' "$RUN_DIR/format.log" >&2
			die "StorageTool format failed"
		fi
	fi

	# shellcheck disable=SC2206 # word splitting of the option strings is intended
	local heap=(${EI_KAFKA_HEAP_OPTS:--Xms256m -Xmx512m}) extra=(${EI_KAFKA_JAVA_OPTS:-})
	# -XX:TieredStopAtLevel=1 (C1 only): C2 compiling the broker's start-up code doubles the time to
	# "Kafka Server started" on a busy 2-core machine (12 s -> 5 s measured); a test broker does not need
	# peak throughput. EI_KAFKA_JAVA_OPTS comes later on the command line, so it can override it.
	# setsid: own session, so the broker outlives this script and ignores the caller's Ctrl-C.
	# The inner shell writes its own pid, then exec's java: the pid file is the JVM's pid.
	local launcher=()
	command -v setsid >/dev/null 2>&1 && launcher=(setsid)
	# shellcheck disable=SC2016 # $$ and $1 belong to the inner shell
	${launcher[@]+"${launcher[@]}"} bash -c 'echo $$ >"$1"; shift; exec "$@"' kafka-broker "$PID_FILE" \
		"$JAVA" "${heap[@]}" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExitOnOutOfMemoryError \
		-XX:TieredStopAtLevel=1 \
		-Djava.awt.headless=true \
		-Dlog4j2.configurationFile="$LOG4J_CONF" -Dkafka.logs.dir="$RUN_DIR" \
		${extra[@]+"${extra[@]}"} \
		-cp "$LIBS_DIR/*" kafka.Kafka "$CONFIG_FILE" \
		</dev/null >"$LOG_FILE" 2>&1 &
	local i
	for ((i = 0; i < 50; i++)); do
		[[ -s "$PID_FILE" ]] && break
		sleep 0.1
	done
	pid="$(read_pid)" || die "the broker did not write $PID_FILE"
	log "broker starting (pid $pid, cluster $cluster_id, log $LOG_FILE) ..."

	wait_ready "$pid"
	log "Kafka $KAFKA_VERSION ready on $BOOTSTRAP (pid $pid) in $(elapsed "$t0")"
	echo "$BOOTSTRAP"
}

cmd_status() {
	local pid
	if ! pid="$(running_pid)"; then
		log "not running"
		return 1
	fi
	pick_java
	libs_complete || die "jar cache $LIBS_DIR is incomplete"
	mkdir -p "$RUN_DIR"
	[[ -f "$RUN_DIR/probe.properties" ]] || write_probe_config
	if broker_answers; then
		log "running and ready on $BOOTSTRAP (pid $pid)"
		return 0
	fi
	log "running (pid $pid) but not answering on $BOOTSTRAP"
	return 1
}

main() {
	local cmd="${1:-}"
	[[ $# -gt 0 ]] && shift
	case "$cmd" in
	start) cmd_start ;;
	resume) cmd_start resume ;;
	stop) cmd_stop ;;
	restart)
		cmd_stop
		cmd_start
		;;
	status) cmd_status ;;
	fetch)
		fetch_libs
		log "jars ready in $LIBS_DIR"
		;;
	tool)
		[[ $# -ge 1 ]] || die "usage: $0 tool MAIN_CLASS [ARGS...]"
		pick_java
		fetch_libs
		run_tool "$@"
		;;
	logs) log_tail ;;
	*)
		sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
		[[ -z "$cmd" || "$cmd" == -h || "$cmd" == --help || "$cmd" == help ]] || die "unknown command '$cmd'"
		exit 2
		;;
	esac
}

main "$@"
