#!/usr/bin/env bash
# Side-by-side pgbench in one run, all in front of the same upstream started by `pgbastion demo`:
#   direct            PostgreSQL itself
#   pgbouncer         PgBouncer, session mode, no TLS
#   pgbouncer_tls     the same PgBouncer configuration with client TLS required
#   pgbastion         TLS verify-full, token authentication, as carol (policy dbadmins: classes
#                     only, no relation rules)
#   pgbastion_policy  the same, as alice (policy analysts: read-only, relation and column rules,
#                     decided with the upstream catalog)
#   pgbastion_plain   carol through the same configuration with allow_plaintext on loopback
#   pgbastion_noaudit carol through the same configuration with the audit log off (the demo
#                     writes a redacted audit file, so "pgbastion" is audit on)
# Targets are interleaved cell by cell, so ratios within one repetition compare the same
# stretch of time on a shared machine.
#
# Usage: bench/compare.sh
# Environment (optional):
#   DURATION=15        seconds per pgbench run        REPEAT=2    repetitions per cell
#   CLIENTS="1 8"      client counts                  PROTOCOLS="prepared simple"
#   SCALE=10           pgbench -i scale               IDLE=500    idle sessions for the memory check (0: skip)
#   SHARED_BENCH=../shared/bench   where start-pgbouncer.sh lives
# Prints CSV lines (label,protocol,clients,rep,tps,median_latency_us) and a summary of ratios.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
shared=${SHARED_BENCH:-$root/../shared/bench}
DURATION=${DURATION:-15}
REPEAT=${REPEAT:-2}
CLIENTS=${CLIENTS:-1 8}
PROTOCOLS=${PROTOCOLS:-prepared simple}
SCALE=${SCALE:-10}
IDLE=${IDLE:-500}
TARGETS=${TARGETS:-direct pgbouncer pgbouncer_tls pgbastion pgbastion_policy pgbastion_plain pgbastion_noaudit}

command -v pgbench >/dev/null || { echo "pgbench not found (apt-get install postgresql-client)" >&2; exit 2; }
[ -x "$shared/start-pgbouncer.sh" ] || { echo "start-pgbouncer.sh not found in $shared" >&2; exit 2; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

work=$(mktemp -d /tmp/pgbastion-bench.XXXXXX)
chmod 755 "$work"
demo_pid=""
plain_pid=""
noaudit_pid=""
cleanup() {
    [ -n "$plain_pid" ] && kill "$plain_pid" 2>/dev/null && wait "$plain_pid" 2>/dev/null || true
    [ -n "$noaudit_pid" ] && kill "$noaudit_pid" 2>/dev/null && wait "$noaudit_pid" 2>/dev/null || true
    [ -n "${pgb_dir:-}" ] && PGB_DIR=$pgb_dir "$shared/start-pgbouncer.sh" stop session >/dev/null 2>&1 || true
    [ -f "${pgbt_dir:-/nonexistent}/pgbouncer.pid" ] && kill "$(cat "$pgbt_dir/pgbouncer.pid")" 2>/dev/null || true
    [ -n "$demo_pid" ] && kill "$demo_pid" 2>/dev/null && wait "$demo_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

cargo build --release -q -p pgbastion --manifest-path "$root/Cargo.toml"
proxy_port=$(free_port)
"$root/target/release/pgbastion" demo --listen "127.0.0.1:$proxy_port" >"$work/demo.out" 2>"$work/demo.err" &
demo_pid=$!
for _ in $(seq 1 600); do grep -q '^upstream:' "$work/demo.out" 2>/dev/null && break; sleep 0.1; done
grep -q '^upstream:' "$work/demo.out" || { cat "$work/demo.err" >&2; exit 1; }

# upstream: postgresql://demo_owner:PASSWORD@127.0.0.1:PORT/demo
upstream=$(sed -n 's/^upstream: //p' "$work/demo.out")
up_password=$(echo "$upstream" | sed -E 's|postgresql://[^:]+:([^@]+)@.*|\1|')
up_port=$(echo "$upstream" | sed -E 's|.*:([0-9]+)/demo$|\1|')
token_url=$(grep -o 'http://[^ )]*/token/carol' "$work/demo.out" | head -1)
alice_token_url=${token_url%/carol}/alice
rootcert=$(grep -o 'sslrootcert=[^"]*' "$work/demo.out" | head -1 | cut -d= -f2)

# The same configuration without TLS, for the diagnostic target.
plain_port=$(free_port)
config_path=$(grep -o '/tmp/pgbastion-demo-[^ ]*/pgbastion.toml' "$work/demo.out" | head -1)
sed -e "s/^address = \"127.0.0.1:$proxy_port\"/address = \"127.0.0.1:$plain_port\"/" -e "s/^allow_plaintext = .*/allow_plaintext = true/" \
    -e "s|^path = .*|path = \"$work/plain-audit.log\"|" "$config_path" >"$work/plain.toml"
"$root/target/release/pgbastion" serve --config "$work/plain.toml" >"$work/plain.log" 2>&1 &
plain_pid=$!
sleep 1
kill -0 "$plain_pid" 2>/dev/null || { echo "the plaintext pgbastion did not start:" >&2; cat "$work/plain.log" >&2; exit 1; }
# The same configuration (TLS on) with the audit log off.
noaudit_port=$(free_port)
sed -e "s/^address = \"127.0.0.1:$proxy_port\"/address = \"127.0.0.1:$noaudit_port\"/" -e 's/^sink = .*/sink = "off"/' -e '/^path = /d' \
    "$config_path" >"$work/noaudit.toml"
"$root/target/release/pgbastion" serve --config "$work/noaudit.toml" >"$work/noaudit.log" 2>&1 &
noaudit_pid=$!
sleep 1
kill -0 "$noaudit_pid" 2>/dev/null || { echo "the audit-off pgbastion did not start:" >&2; cat "$work/noaudit.log" >&2; exit 1; }

PGPASSWORD=$up_password pgbench -i -q -s "$SCALE" -h 127.0.0.1 -p "$up_port" -U demo_owner demo >/dev/null 2>&1
PGPASSWORD=$up_password psql -q -h 127.0.0.1 -p "$up_port" -U demo_owner demo \
    -c "GRANT SELECT ON ALL TABLES IN SCHEMA public TO analyst" >/dev/null

pgb_port=$(free_port)
pgb_dir=$work/pgbouncer
PG_HOST=127.0.0.1 PG_PORT=$up_port BENCH_DB=demo BENCH_USER=demo_owner BENCH_PASSWORD=$up_password \
    PGB_PORT=$pgb_port PGB_DIR=$pgb_dir "$shared/start-pgbouncer.sh" session >/dev/null

# The same PgBouncer configuration, on another port, with client TLS required (the demo's
# certificate), for a comparison in which both proxies encrypt.
pgbt_port=$(free_port)
pgbt_dir=$work/pgbouncer-tls
cp -a "$pgb_dir" "$pgbt_dir"
rm -f "$pgbt_dir"/*.pid "$pgbt_dir"/*.log
cp "$(dirname "$config_path")/server.crt" "$(dirname "$config_path")/server.key" "$pgbt_dir/"
sed -i -e "s|$pgb_dir|$pgbt_dir|g" -e "s/^listen_port *=.*/listen_port = $pgbt_port/" "$pgbt_dir/pgbouncer.ini"
printf 'client_tls_sslmode = require\nclient_tls_cert_file = %s\nclient_tls_key_file = %s\n' \
    "$pgbt_dir/server.crt" "$pgbt_dir/server.key" >>"$pgbt_dir/pgbouncer.ini"
if [ "$(id -u)" = 0 ]; then chown -R postgres: "$pgbt_dir"; as_pgb() { runuser -u postgres -- "$@"; }; else as_pgb() { "$@"; }; fi
as_pgb pgbouncer -d -q "$pgbt_dir/pgbouncer.ini" || { cat "$pgbt_dir"/*.log >&2; exit 1; }

# target_env LABEL -> the libpq environment for that target
target_env() {
    case "$1" in
        direct) echo "PGHOST=127.0.0.1 PGPORT=$up_port PGUSER=demo_owner PGPASSWORD=$up_password PGSSLMODE=disable" ;;
        pgbouncer) echo "PGHOST=127.0.0.1 PGPORT=$pgb_port PGUSER=demo_owner PGPASSWORD=$up_password PGSSLMODE=disable" ;;
        pgbouncer_tls) echo "PGHOST=127.0.0.1 PGPORT=$pgbt_port PGUSER=demo_owner PGPASSWORD=$up_password PGSSLMODE=require" ;;
        pgbastion_policy) echo "PGHOST=127.0.0.1 PGPORT=$proxy_port PGUSER=alice PGPASSWORD=$(curl -s "$alice_token_url") PGSSLMODE=verify-full PGSSLROOTCERT=$rootcert" ;;
        pgbastion_plain) echo "PGHOST=127.0.0.1 PGPORT=$plain_port PGUSER=carol PGPASSWORD=$(curl -s "$token_url") PGSSLMODE=disable" ;;
        pgbastion_noaudit) echo "PGHOST=127.0.0.1 PGPORT=$noaudit_port PGUSER=carol PGPASSWORD=$(curl -s "$token_url") PGSSLMODE=verify-full PGSSLROOTCERT=$rootcert" ;;
        pgbastion) echo "PGHOST=127.0.0.1 PGPORT=$proxy_port PGUSER=carol PGPASSWORD=$(curl -s "$token_url") PGSSLMODE=verify-full PGSSLROOTCERT=$rootcert" ;;
    esac
}

# run LABEL PROTOCOL CLIENTS REP: prints one CSV line
run() {
    local label=$1 proto=$2 c=$3 rep=$4 j=2 logdir
    [ "$c" -lt 2 ] && j=1
    logdir=$(mktemp -d "$work/log.XXXX")
    local out
    out=$(cd "$logdir" && env $(target_env "$label") PGDATABASE=demo \
        pgbench -n -S -M "$proto" -c "$c" -j "$j" -T "$DURATION" -l 2>&1) || { echo "$label,$proto,$c,$rep,FAIL,FAIL"; echo "$out" >&2; return; }
    local tps median
    tps=$(echo "$out" | sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p')
    # Per-transaction log: client_id transaction_no latency_us script_no epoch epoch_us
    median=$(cat "$logdir"/pgbench_log.* | awk '{print $3}' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
    rm -rf "$logdir"
    echo "$label,$proto,$c,$rep,$tps,$median"
}

echo "label,protocol,clients,rep,tps,median_latency_us" | tee "$work/results.csv"
for rep in $(seq 1 "$REPEAT"); do
    for proto in $PROTOCOLS; do
        for c in $CLIENTS; do
            order=$TARGETS
            [ $((rep % 2)) -eq 0 ] && order=$(echo "$TARGETS" | tr ' ' '\n' | tac | tr '\n' ' ')
            for label in $order; do run "$label" "$proto" "$c" "$rep" | tee -a "$work/results.csv"; done
        done
    done
done

echo
echo "summary (per cell: mean over repetitions of same-run TPS ratios; latency added is the median over direct)"
awk -F, 'NR > 1 && $5 != "FAIL" { tps[$1","$2","$3","$4] = $5; lat[$1","$2","$3","$4] = $6; cells[$2","$3] = 1; reps[$4] = 1 }
function ratio(a, b, cell,   r, n, sum, k) {
    n = 0; sum = 0
    for (r in reps) { k = "," cell "," r; if ((a k) in tps && (b k) in tps) { n++; sum += tps[a k] / tps[b k] } }
    return n ? sprintf("%.2fx", sum / n) : "-"
}
function added(a, cell,   r, n, sum, k) {
    n = 0; sum = 0
    for (r in reps) { k = "," cell "," r; if ((a k) in lat && ("direct" k) in lat) { n++; sum += lat[a k] - lat["direct" k] } }
    return n ? sprintf("%d us", sum / n) : "-"
}
END {
    for (cell in cells)
        printf "%-12s pgbastion/pgbouncer %s  pgbastion/pgbouncer_tls %s  pgbastion/direct %s  policy on/off %s  audit on/off %s  plain/pgbouncer %s  pgbouncer_tls/pgbouncer %s  latency added: pgbastion %s, pgbouncer %s\n", cell,
            ratio("pgbastion", "pgbouncer", cell), ratio("pgbastion", "pgbouncer_tls", cell), ratio("pgbastion", "direct", cell),
            ratio("pgbastion_policy", "pgbastion", cell), ratio("pgbastion", "pgbastion_noaudit", cell), ratio("pgbastion_plain", "pgbouncer", cell), ratio("pgbouncer_tls", "pgbouncer", cell),
            added("pgbastion", cell), added("pgbouncer", cell)
}' "$work/results.csv" | sort

if [ "$IDLE" -gt 0 ]; then
    rss() { awk '/^VmRSS:/ {print $2}' "/proc/$demo_pid/status"; }
    before=$(rss)
    printf '\\sleep 20 s\n' > "$work/idle.sql"
    ( env $(target_env pgbastion) PGDATABASE=demo pgbench -n -f "$work/idle.sql" -c "$IDLE" -j 2 -T 25 >/dev/null 2>&1 ) &
    bench=$!
    peak=$before
    for _ in $(seq 1 40); do
        sleep 0.5
        now=$(rss); [ "$now" -gt "$peak" ] && peak=$now
    done
    wait "$bench" || true
    echo "idle sessions: $IDLE, proxy RSS before ${before} KiB, peak ${peak} KiB, $(( (peak - before) / IDLE )) KiB per session"
fi
