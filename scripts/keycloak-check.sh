#!/usr/bin/env bash
# Smoke check of the running Keycloak (scripts/keycloak.sh start) against the
# realm contract in realm/event-identity-realm.json: user tokens, the
# order-writer permission, RFC 8693 standard token exchange and the JWKS.
#
#   scripts/keycloak-check.sh        # assertions + short summary
#   scripts/keycloak-check.sh -v     # also print every decoded token payload
#
# Exits non-zero if any assertion fails. Needs only python3 (stdlib).
set -euo pipefail

export EI_KEYCLOAK_PORT="${EI_KEYCLOAK_PORT:-18080}"
export KC_CHECK_VERBOSE=0
[[ "${1:-}" == "-v" ]] && KC_CHECK_VERBOSE=1

exec python3 - <<'PY'
import base64, json, os, sys, time, urllib.error, urllib.parse, urllib.request

PORT = os.environ["EI_KEYCLOAK_PORT"]
VERBOSE = os.environ.get("KC_CHECK_VERBOSE") == "1"
BASE = f"http://127.0.0.1:{PORT}"
ISS = f"{BASE}/realms/event-identity"
TOKEN = f"{ISS}/protocol/openid-connect/token"
CERTS = f"{ISS}/protocol/openid-connect/certs"
TE = "urn:ietf:params:oauth:grant-type:token-exchange"
AT = "urn:ietf:params:oauth:token-type:access_token"

passed = failed = 0

def check(cond, what):
    global passed, failed
    if cond:
        passed += 1
        print(f"keycloak-check: ok   {what}")
    else:
        failed += 1
        print(f"keycloak-check: FAIL {what}")

def post(form, auth=None):
    data = urllib.parse.urlencode(form).encode()
    req = urllib.request.Request(TOKEN, data=data, method="POST")
    req.add_header("Content-Type", "application/x-www-form-urlencoded")
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)

def get(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.load(r)

def payload(jwt):
    seg = jwt.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4)))

def show(title, obj):
    if VERBOSE:
        print(f"--- {title}")
        print(json.dumps(obj, indent=2))

def aud_list(p):
    a = p.get("aud", [])
    return [a] if isinstance(a, str) else list(a)

def scopes(p):
    return (p.get("scope") or "").split()

def password_grant(client, user, pw):
    return post({"grant_type": "password", "client_id": client, "username": user,
                 "password": pw, "scope": "openid orders:write"})

def exchange(subject, **extra):
    form = {"grant_type": TE, "subject_token": subject, "subject_token_type": AT}
    form.update(extra)
    return post(form, auth="event-producer:producer-secret")

ALICE_SUB = "11111111-1111-4111-8111-111111111111"  # user ids are fixed in the realm file
BOB_SUB = "22222222-2222-4222-8222-222222222222"

# 0. discovery
try:
    wk = get(f"{ISS}/.well-known/openid-configuration")
except (urllib.error.URLError, OSError) as e:
    print(f"keycloak-check: Keycloak not reachable at {ISS} ({e}); run scripts/keycloak.sh start")
    sys.exit(1)
check(wk["issuer"] == ISS, f"issuer is {ISS}")

# 1. alice: may publish
st, alice = password_grant("event-api", "alice", "alice-password")
check(st == 200, f"alice password grant at event-api -> {st}")
a = payload(alice["access_token"])
show("alice @ event-api", a)
check(a["iss"] == ISS, "alice token iss")
check("event-producer" in aud_list(a), "alice token aud contains event-producer")
check("orders:write" in scopes(a), "alice token scope contains orders:write")
check(a.get("tenant") == "acme", "alice token tenant=acme")
check(a.get("sub") == ALICE_SUB, f"alice token sub == {ALICE_SUB}")
check(a["exp"] - a["iat"] == 300, "alice token lifetime 300 s")

# 2. bob: may not publish
st, bob = password_grant("event-api", "bob", "bob-password")
check(st == 200, f"bob password grant at event-api -> {st}")
b = payload(bob["access_token"])
show("bob @ event-api", b)
check("orders:write" not in scopes(b), "bob token scope lacks orders:write")
check(b.get("sub") == BOB_SUB, f"bob token sub == {BOB_SUB}")
check("event-producer" in aud_list(b) and b.get("tenant") == "acme", "bob token aud/tenant")

# short-lived client
st, short = password_grant("event-api-short", "alice", "alice-password")
s = payload(short["access_token"])
show("alice @ event-api-short", s)
check(st == 200 and s["exp"] - s["iat"] == 2, "event-api-short token lifetime 2 s")
check("orders:write" in scopes(s) and "event-producer" in aud_list(s), "event-api-short token scope/aud")

# 3. token exchange -> event token
st, ev = exchange(alice["access_token"], scope="events:order.created",
                  audience="order-consumer", requested_token_type=AT)
check(st == 200, f"exchange alice -> {st} {ev if st != 200 else ''}")
e = payload(ev["access_token"])
show("event token (alice, scope+audience)", e)
show("exchange response (tokens elided)",
     {k: (v if not k.endswith("_token") else "<jwt>") for k, v in ev.items()})
check(e.get("scope") == "events:order.created", "event token scope == events:order.created")
check(aud_list(e) == ["order-consumer"], "event token aud == order-consumer")
check(e.get("sub") == a["sub"], "event token sub == alice sub")
check(e["iss"] == ISS, "event token iss")
check(e["exp"] - e["iat"] == 43200, "event token lifetime 43200 s")
check(e.get("azp") == "event-producer", "event token azp == event-producer")
check(e.get("tenant") == "acme", "event token tenant == acme")
check(ev.get("issued_token_type") == AT and "refresh_token" not in ev, "access token issued, no refresh token")

# 4. variants
st, r = exchange(alice["access_token"], scope="events:order.created", requested_token_type=AT)
check(st == 200 and aud_list(payload(r["access_token"])) == ["order-consumer"],
      "exchange without audience -> aud order-consumer (from the scope's audience mapper)")
st, r = exchange(alice["access_token"], scope="orders:write", audience="order-consumer", requested_token_type=AT)
check(st == 400 and r.get("error") == "invalid_scope", f"exchange with scope orders:write -> {st} {r.get('error')}")
st, r = exchange(bob["access_token"], scope="events:order.created", audience="order-consumer", requested_token_type=AT)
check(st == 400, f"exchange of bob's token with audience -> {st} {r.get('error_description')}")
st, r = exchange(short["access_token"], scope="events:order.created", audience="order-consumer")
check(st == 200, "exchange of a fresh event-api-short token works")
time.sleep(3)
st, r = exchange(short["access_token"], scope="events:order.created", audience="order-consumer")
check(st == 400, f"exchange of an expired user token -> {st} {r.get('error_description')}")

# 5. JWKS
keys = get(CERTS)["keys"]
for k in keys:
    print("keycloak-check: jwk", {f: k.get(f) for f in ("kid", "kty", "alg", "use")})
check(any(k.get("use") == "sig" and k.get("alg") == "RS256" for k in keys), "JWKS has an RS256 signing key")
seg = ev["access_token"].split(".")[0]
hdr = json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4)))
check(any(k.get("kid") == hdr.get("kid") for k in keys), "event token kid is in the JWKS")

print(f"keycloak-check: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
PY
