#!/usr/bin/env bash
# The main job on real components, a shorter scenario than the one-command
# demo: starts Kafka and Keycloak, runs the event-producer and
# event-consumer binaries against them, publishes one event as alice
# (allowed) and one as bob (not allowed), a retry with the same
# Idempotency-Key, and a record without a token, then prints what the
# consumer recorded and the dead-letter reasons, and stops everything.
# Logs and the inbox go to $EI_RUN_DIR/demo (default target/demo).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

kafka_port="${EI_KAFKA_PORT:-19092}"
keycloak_port="${EI_KEYCLOAK_PORT:-18080}"
producer_addr=127.0.0.1:${EI_DEMO_PRODUCER_PORT:-18081}
consumer_ops=127.0.0.1:${EI_DEMO_CONSUMER_PORT:-18082}
issuer="http://127.0.0.1:$keycloak_port/realms/event-identity"
run_dir="${EI_RUN_DIR:-target}/demo"
case "$run_dir" in /*) ;; *) run_dir="$PWD/$run_dir" ;; esac
topic="demo-$(date +%s)"

pids=()
cleanup() {
	for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
	wait 2>/dev/null || true
	scripts/kafka.sh stop || true
	scripts/keycloak.sh stop || true
}
trap cleanup EXIT
say() { printf '\n== %s\n' "$*"; }

say "building the binaries (release)"
cargo build --release --locked --bins -p event-identity-producer -p event-identity-consumer
bin="${CARGO_TARGET_DIR:-target}/release"

say "starting Kafka and Keycloak"
scripts/kafka.sh start >/dev/null &
kafka=$!
scripts/keycloak.sh start >/dev/null &
keycloak=$!
wait "$kafka"
wait "$keycloak"

rm -rf "$run_dir" && mkdir -p "$run_dir"
export EI_KAFKA_BOOTSTRAP="127.0.0.1:$kafka_port" EI_ISSUER="$issuer" EI_TOPICS="$topic" EI_TOPIC="$topic"

for t in "$topic" "$topic.dead-letter"; do
	scripts/kafka.sh tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$EI_KAFKA_BOOTSTRAP" \
		--create --topic "$t" --partitions 1 --replication-factor 1 >/dev/null
done

say "starting event-consumer and event-producer (logs in $run_dir)"
EI_AUDIENCE=order-consumer \
	EI_GROUP=demo-consumer \
	EI_DEAD_LETTER_TOPIC="$topic.dead-letter" \
	EI_ROUTES="type=com.example.order.created,scope=events:order.created,claim_equals_field=tenant:tenant" \
	EI_DATABASE_URL="sqlite://$run_dir/inbox.db?mode=rwc" \
	EI_OPS_LISTEN="$consumer_ops" \
	"$bin/event-consumer" >"$run_dir/consumer.log" 2>&1 &
pids+=($!)
EI_PRODUCER_LISTEN="$producer_addr" \
	EI_CLIENT_ID=event-producer \
	EI_CLIENT_SECRET=producer-secret \
	EI_ROUTES="type=com.example.order.created,requires=orders:write,scope=events:order.created,audience=order-consumer" \
	"$bin/event-producer" >"$run_dir/producer.log" 2>&1 &
pids+=($!)
# Both must answer ready: the producer once it reaches Kafka and the
# issuer, the consumer once it holds the topic's partition.
ready=
for _ in $(seq 1 150); do
	kill -0 "${pids[@]}" 2>/dev/null || break
	curl -sf "http://$producer_addr/readyz" >/dev/null &&
		curl -sf "http://$consumer_ops/readyz" >/dev/null && { ready=1; break; }
	sleep 0.2
done
if [ -z "$ready" ]; then
	echo "demo.sh: the producer ($producer_addr) or the consumer (ops $consumer_ops) stopped or did not become ready in 30 s; their logs end with:" >&2
	tail -n 5 "$run_dir/producer.log" "$run_dir/consumer.log" >&2
	exit 1
fi

token() {
	curl -sf "$issuer/protocol/openid-connect/token" \
		-d grant_type=password -d client_id=event-api -d "username=$1" -d "password=$1-password" \
		-d "scope=openid orders:write" | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])'
}
publish() { # USER_TOKEN IDEMPOTENCY_KEY ORDER
	local answer
	answer=$(curl -s -w '\n  -> HTTP %{http_code}' "http://$producer_addr/v1/events" \
		-H "Authorization: Bearer $1" -H "Idempotency-Key: $2" -H 'Content-Type: application/json' \
		-d "{\"type\":\"com.example.order.created\",\"key\":\"$3\",\"data\":{\"order_id\":\"$3\",\"tenant\":\"acme\",\"total\":42}}")
	printf '%s\n' "$answer"
}

say "alice publishes order-1 (allowed)"
alice=$(token alice)
publish "$alice" order-1-attempt order-1
say "alice retries with the same Idempotency-Key (published again under the same message ID; the consumer records it once)"
publish "$alice" order-1-attempt order-1
say "bob publishes order-2 (not allowed: no orders:write)"
publish "$(token bob)" order-2-attempt order-2
say "someone writes a record without a token straight to the topic"
printf '{"order_id":"forged","tenant":"acme"}\n' | scripts/kafka.sh tool org.apache.kafka.tools.ConsoleProducer \
	--bootstrap-server "127.0.0.1:$kafka_port" --topic "$topic" \
	>/dev/null 2>&1 || true

sleep 3
say "what the consumer recorded (inbox $run_dir/inbox.db)"
python3 - "$run_dir/inbox.db" <<'PY'
import json, sqlite3, sys
db = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
# The realm gives its users fixed IDs, so the demo can name them.
users = {"11111111-1111-4111-8111-111111111111": "alice", "22222222-2222-4222-8222-222222222222": "bob"}
rows = db.execute("SELECT message_id, subject, claims, data FROM events").fetchall()
print(f"{len(rows)} event(s) processed")
for message_id, subject, claims, data in rows:
    c = json.loads(claims)
    print(f"  {message_id}  sub={subject} ({users.get(subject, '?')})  "
          f"tenant={c.get('tenant')}  scope={c.get('scope')}  azp={c.get('azp')}  data={data}")
PY
say "the dead-letter topic $topic.dead-letter (reading it takes up to 8 s)"
scripts/kafka.sh tool org.apache.kafka.tools.consumer.ConsoleConsumer \
	--bootstrap-server "127.0.0.1:$kafka_port" --topic "$topic.dead-letter" --from-beginning \
	--timeout-ms 8000 --formatter-property print.headers=true 2>/dev/null |
	grep -o 'dlq_reason:[a-z_]*\|dlq_source_offset:[0-9]*' | paste -sd' ' - || echo "  (empty)"
