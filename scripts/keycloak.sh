#!/usr/bin/env bash
# Run a real Keycloak (Quarkus distribution from Maven Central, no Docker) for
# tests and CI, with the realm imported from realm/event-identity-realm.json.
#
#   scripts/keycloak.sh start    # (re)start with fresh state, wait until ready
#   scripts/keycloak.sh stop     # stop the whole process tree; 0 if not running
#   scripts/keycloak.sh status   # 0 when the realm's well-known URL answers
#   scripts/keycloak.sh env      # print the settings it would use
#
# Environment (all optional):
#   EI_CACHE_DIR            download/unpack cache   (default ~/.cache/event-identity)
#   EI_RUN_DIR              log/pid/state directory (default <repo>/target/services)
#   EI_KEYCLOAK_PORT        HTTP port               (default 18080)
#   EI_KEYCLOAK_VERSION     distribution version    (default 26.7.3; 26.5.6 is tried if it fails)
#   EI_KEYCLOAK_JAVA_HOME   JDK >= 21 to run it     (default: newest JDK >= 21 under /usr/lib/jvm)
#   EI_KEYCLOAK_HEAP        JVM heap options        (default "-Xms64m -Xmx768m")
#   EI_KEYCLOAK_JAVA_OPTS_APPEND extra JVM options (default "-XX:TieredStopAtLevel=1")
#   EI_KEYCLOAK_TIMEOUT     seconds to wait for readiness (default 240)
#
# The issuer is pinned with --hostname, so tokens always carry
#   iss = http://127.0.0.1:${EI_KEYCLOAK_PORT}/realms/event-identity
# whatever host name the client used.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"

KC_REALM="event-identity"
KC_REALM_FILE="$REPO_ROOT/realm/event-identity-realm.json"
KC_PORT="${EI_KEYCLOAK_PORT:-18080}"
KC_HOST="127.0.0.1"
KC_BASE_URL="http://$KC_HOST:$KC_PORT"
KC_WELL_KNOWN="$KC_BASE_URL/realms/$KC_REALM/.well-known/openid-configuration"
KC_VERSION="${EI_KEYCLOAK_VERSION:-26.7.3}"
KC_FALLBACK_VERSION="26.5.6"
CACHE_DIR="${EI_CACHE_DIR:-${HOME:-/root}/.cache/event-identity}"
RUN_DIR="${EI_RUN_DIR:-$REPO_ROOT/target/services}/keycloak"
KC_LOG="$RUN_DIR/keycloak.log"
KC_PID_FILE="$RUN_DIR/keycloak.pid"
KC_HEAP="${EI_KEYCLOAK_HEAP:--Xms64m -Xmx768m}"
# C1 only: roughly halves start time on 2 busy cores; set to "" to disable.
KC_JAVA_OPTS_APPEND="${EI_KEYCLOAK_JAVA_OPTS_APPEND--XX:TieredStopAtLevel=1}"
KC_TIMEOUT="${EI_KEYCLOAK_TIMEOUT:-240}"

log() { echo "keycloak.sh: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- download --

# install_version VERSION -> prints the unpacked home dir; non-zero on failure
install_version() {
  local version="$1"
  local home="$CACHE_DIR/keycloak-$version"
  local marker="$home/.ei-installed"
  if [[ -f "$marker" ]]; then
    echo "$home"
    return 0
  fi
  command -v mvn >/dev/null 2>&1 || { log "mvn not found (needed to download Keycloak)"; return 1; }
  mkdir -p "$CACHE_DIR/downloads"
  local zip="$CACHE_DIR/downloads/keycloak-quarkus-dist-$version.zip"
  if [[ ! -s "$zip" ]]; then
    log "downloading org.keycloak:keycloak-quarkus-dist:$version:zip from Maven Central"
    local mvn_log="$CACHE_DIR/downloads/mvn-$version.log"
    # (run from the download dir so that no pom.xml of the caller's cwd is read)
    if ! (cd "$CACHE_DIR/downloads" && mvn -q -B -Dstyle.color=never \
        org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy \
        "-Dartifact=org.keycloak:keycloak-quarkus-dist:$version:zip" \
        "-DoutputDirectory=$CACHE_DIR/downloads") >"$mvn_log" 2>&1; then
      log "maven download of $version failed:"
      tail -n 30 "$mvn_log" >&2 || true
      return 1
    fi
    [[ -s "$zip" ]] || { log "maven did not produce $zip"; return 1; }
  fi
  log "unpacking $zip"
  local tmp
  tmp="$(mktemp -d "$CACHE_DIR/.unpack-$version.XXXXXX")"
  if command -v unzip >/dev/null 2>&1; then
    unzip -q "$zip" -d "$tmp" || { rm -rf "$tmp"; log "unzip failed"; return 1; }
  else
    python3 -m zipfile -e "$zip" "$tmp" || { rm -rf "$tmp"; log "unpack failed"; return 1; }
    chmod +x "$tmp"/keycloak-*/bin/*.sh
  fi
  [[ -x "$tmp/keycloak-$version/bin/kc.sh" ]] || { rm -rf "$tmp"; log "unexpected zip layout"; return 1; }
  rm -rf "$home"
  mv "$tmp/keycloak-$version" "$home"
  rm -rf "$tmp"
  echo "$version" >"$marker"
  rm -f "$zip" # a copy stays in the local Maven repository (~/.m2)
  echo "$home"
}

ensure_installed() {
  local home
  if home="$(install_version "$KC_VERSION")"; then
    KC_HOME="$home"
    return 0
  fi
  if [[ "$KC_VERSION" != "$KC_FALLBACK_VERSION" ]]; then
    log "WARNING: Keycloak $KC_VERSION unavailable, falling back to $KC_FALLBACK_VERSION"
    if home="$(install_version "$KC_FALLBACK_VERSION")"; then
      KC_VERSION="$KC_FALLBACK_VERSION"
      KC_HOME="$home"
      return 0
    fi
  fi
  die "could not download/unpack Keycloak"
}

# -------------------------------------------------------------------- java --

# java_major JAVA_HOME -> prints the major version (e.g. 25), or nothing
java_major() {
  local jh="$1" v=""
  [[ -x "$jh/bin/java" ]] || return 0
  if [[ -f "$jh/release" ]]; then
    v="$(sed -n 's/^JAVA_VERSION="\([^"]*\)".*/\1/p' "$jh/release" | head -n1)"
  fi
  if [[ -z "$v" ]]; then
    v="$("$jh/bin/java" -version 2>&1 | sed -n 's/.*version "\([^"]*\)".*/\1/p' | head -n1)"
  fi
  v="${v#1.}"
  echo "${v%%[.+-]*}"
}

select_java() {
  local m
  if [[ -n "${EI_KEYCLOAK_JAVA_HOME:-}" ]]; then
    m="$(java_major "$EI_KEYCLOAK_JAVA_HOME")"
    [[ -n "$m" && "$m" -ge 21 ]] ||
      die "EI_KEYCLOAK_JAVA_HOME=$EI_KEYCLOAK_JAVA_HOME is not a JDK >= 21 (found '${m:-none}')"
    KC_JAVA_HOME="$EI_KEYCLOAK_JAVA_HOME"
    return 0
  fi
  local best="" best_m=0 d
  for d in /usr/lib/jvm/*; do
    [[ -d "$d" && ! -L "$d" ]] || continue
    m="$(java_major "$d")"
    [[ -n "$m" ]] || continue
    if [[ "$m" -ge 21 && "$m" -gt "$best_m" ]]; then
      best="$d"
      best_m="$m"
    fi
  done
  [[ -n "$best" ]] ||
    die "Keycloak 26 needs Java 21+; none found under /usr/lib/jvm (set EI_KEYCLOAK_JAVA_HOME)"
  KC_JAVA_HOME="$best"
}

# --------------------------------------------------------------- processes --

http_code() {
  curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$1" 2>/dev/null || true
}

is_ready() {
  [[ "$(http_code "$KC_WELL_KNOWN")" == "200" ]]
}

# pids of every process in session SID
session_pids() {
  local sid="$1"
  ps -eo pid=,sid= | awk -v s="$sid" '$2 == s { print $1 }'
}

read_pid() {
  [[ -f "$KC_PID_FILE" ]] || return 1
  local pid
  pid="$(tr -dc '0-9' <"$KC_PID_FILE")"
  [[ -n "$pid" ]] || return 1
  echo "$pid"
}

# Sessions of Keycloak JVMs serving our port even if the pid file is gone
# (e.g. `cargo clean` wiped target/ while Keycloak was running). Matches only
# a Keycloak JVM (-Dkc.home.dir=...) started with --http-port=<our port>.
orphan_sessions() {
  ps -eo sid=,args= | awk -v port="--http-port=$KC_PORT" '
    index($0, "-Dkc.home.dir=") && index($0, "io.quarkus.bootstrap.runner.QuarkusEntryPoint") {
      n = split($0, a, " ")
      for (i = 2; i <= n; i++) if (a[i] == port || a[i] == "\047" port "\047") { print $1; break }
    }' | sort -u
}

# stop_session SID: TERM the whole session, then KILL after 30 s
stop_session() {
  local sid="$1" pids i
  pids="$(session_pids "$sid")"
  [[ -n "$pids" ]] || return 0
  log "stopping session $sid (pids: ${pids//$'\n'/ })"
  kill -TERM -- "-$sid" 2>/dev/null || true
  # shellcheck disable=SC2086
  kill -TERM $pids 2>/dev/null || true
  for ((i = 0; i < 150; i++)); do
    pids="$(session_pids "$sid")"
    [[ -z "$pids" ]] && return 0
    sleep 0.2
  done
  log "session $sid still alive after 30 s, sending KILL to ${pids//$'\n'/ }"
  kill -KILL -- "-$sid" 2>/dev/null || true
  # shellcheck disable=SC2086
  kill -KILL $pids 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    [[ -z "$(session_pids "$sid")" ]] && return 0
    sleep 0.2
  done
  log "WARNING: session $sid did not go away"
}

cmd_stop() {
  local sids="" sid
  if sid="$(read_pid)" && [[ -n "$(session_pids "$sid")" ]]; then
    sids="$sid"
  fi
  for sid in $(orphan_sessions); do
    [[ " $sids " == *" $sid "* ]] || {
      log "found a Keycloak on port $KC_PORT not recorded in the pid file (session $sid)"
      sids="$sids $sid"
    }
  done
  if [[ -z "${sids// /}" ]]; then
    rm -f "$KC_PID_FILE"
    log "not running"
    return 0
  fi
  for sid in $sids; do
    stop_session "$sid"
  done
  rm -f "$KC_PID_FILE"
  log "stopped"
}

cmd_status() {
  if is_ready; then
    log "up: $KC_WELL_KNOWN"
    return 0
  fi
  log "down: $KC_WELL_KNOWN does not answer 200"
  return 1
}

cmd_start() {
  [[ -f "$KC_REALM_FILE" ]] || die "realm file $KC_REALM_FILE missing"
  python3 -c 'import json,sys; json.load(open(sys.argv[1]))' "$KC_REALM_FILE" ||
    die "realm file $KC_REALM_FILE is not valid JSON"
  mkdir -p "$RUN_DIR"
  cmd_stop
  if [[ "$(http_code "$KC_BASE_URL/")" != "000" ]]; then
    die "port $KC_PORT is in use by something that is not our Keycloak (see: ss -ltnp | grep :$KC_PORT)"
  fi
  ensure_installed
  select_java
  log "Keycloak $KC_VERSION at $KC_HOME, Java $(java_major "$KC_JAVA_HOME") at $KC_JAVA_HOME"

  # Fresh state every run: the database is in memory (--db=dev-mem), and
  # data/ (import dir, transaction logs, tmp) is recreated, so the realm is
  # imported anew on every start.
  rm -rf "$KC_HOME/data"
  mkdir -p "$KC_HOME/data/import"
  cp "$KC_REALM_FILE" "$KC_HOME/data/import/$KC_REALM-realm.json"

  : >"$KC_LOG"
  local t0 t1 i sid=""
  t0="$(date +%s)"
  # setsid: own session, so stop can take the whole tree (kc.sh + java).
  # (Variables for the launcher are EI_-prefixed: KC_* would be read by
  # Keycloak as configuration options.)
  rm -f "$KC_PID_FILE"
  # shellcheck disable=SC2016 # expanded by the inner bash
  EI_KC_HOME="$KC_HOME" EI_KC_PORT="$KC_PORT" EI_KC_HOST="$KC_HOST" EI_KC_PID_FILE="$KC_PID_FILE" \
  JAVA_HOME="$KC_JAVA_HOME" JAVA="$KC_JAVA_HOME/bin/java" \
  JAVA_OPTS_KC_HEAP="$KC_HEAP" JAVA_OPTS_APPEND="$KC_JAVA_OPTS_APPEND" \
  KC_BOOTSTRAP_ADMIN_USERNAME=admin KC_BOOTSTRAP_ADMIN_PASSWORD=admin \
    setsid bash -c 'echo $$ >"$EI_KC_PID_FILE"; exec "$EI_KC_HOME/bin/kc.sh" start-dev \
        --http-host="$EI_KC_HOST" --http-port="$EI_KC_PORT" \
        --hostname="http://$EI_KC_HOST:$EI_KC_PORT" \
        --db=dev-mem \
        --import-realm' \
    </dev/null >>"$KC_LOG" 2>&1 &

  for ((i = 0; i < 50; i++)); do
    sid="$(read_pid 2>/dev/null)" && break
    sleep 0.1
  done
  [[ -n "$sid" ]] || die "launcher did not write $KC_PID_FILE"
  log "started (session $sid), log: $KC_LOG; waiting up to ${KC_TIMEOUT}s for $KC_WELL_KNOWN"

  while :; do
    if is_ready; then
      t1="$(date +%s)"
      log "ready in $((t1 - t0)) s: issuer $KC_BASE_URL/realms/$KC_REALM"
      return 0
    fi
    if [[ -z "$(session_pids "$sid")" ]]; then
      log "Keycloak exited during startup; last log lines:"
      tail -n 60 "$KC_LOG" >&2 || true
      rm -f "$KC_PID_FILE"
      exit 1
    fi
    if (($(date +%s) - t0 >= KC_TIMEOUT)); then
      log "not ready after ${KC_TIMEOUT}s; last log lines:"
      tail -n 60 "$KC_LOG" >&2 || true
      cmd_stop
      exit 1
    fi
    sleep 1
  done
}

cmd_env() {
  cat <<EOF
KEYCLOAK_VERSION=$KC_VERSION
KEYCLOAK_HOME=$CACHE_DIR/keycloak-$KC_VERSION
KEYCLOAK_BASE_URL=$KC_BASE_URL
KEYCLOAK_ISSUER=$KC_BASE_URL/realms/$KC_REALM
KEYCLOAK_TOKEN_URL=$KC_BASE_URL/realms/$KC_REALM/protocol/openid-connect/token
KEYCLOAK_JWKS_URL=$KC_BASE_URL/realms/$KC_REALM/protocol/openid-connect/certs
KEYCLOAK_LOG=$KC_LOG
KEYCLOAK_PID_FILE=$KC_PID_FILE
EOF
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) cmd_env ;;
  *)
    echo "usage: $0 start|stop|status|env" >&2
    exit 2
    ;;
esac
