#!/usr/bin/env bash
# The pooling grid, in one run, all in front of the same upstream started by `pgbastion demo`:
#   direct        PostgreSQL itself
#   pgbouncer     PgBouncer, session mode (pool 100), no TLS, SCRAM client authentication
#   pgbouncer_tx  PgBouncer, transaction mode, pool of $TX_POOL, no TLS
#   pgbastion     `pgbastion serve` with the demo's configuration: TLS verify-full, token
#                 authentication, carol's policy, audit log to a file, session pools,
#                 [runtime] worker_threads = $THREADS, busy_poll = $BUSY_POLL
#   pgbastion_tx  the same in transaction mode with a pool of $TX_POOL
#   pgbastion_plain, pgbastion_plain_tx
#                 the same two without TLS and without the audit log (token and policy
#                 still on): what pgbastion costs under PgBouncer's own conditions
# Cells: select (-S) with -M simple/extended/prepared at -c 1/8/64; tpcb (the default
# TPC-B-like script, -M simple) at -c 8; connect (-S -C, a new connection and so a new
# authentication per transaction, -M simple) at -c 8. Targets are interleaved cell by cell
# (reversed on even repetitions), so ratios compare the same stretch of time.
#
# Usage: bench/grid.sh
# Environment (optional):
#   DURATION=10   seconds per run          REPEAT=1     repetitions
#   CLIENTS="1 8 64"  PROTOCOLS="simple extended prepared"  MODES="select tpcb connect"
#   TARGETS="direct pgbouncer pgbouncer_tx pgbastion pgbastion_tx pgbastion_plain pgbastion_plain_tx"
#   TX_POOL=8   SCALE=10
#   THREADS=1     pgbastion's worker threads (0: one per CPU)
#   BUSY_POLL=100us  pgbastion's busy polling (only with THREADS=1; 0s: off)
#   IDLE=5000     idle client sessions held on pgbastion_tx for the memory check (0: skip)
#   SHARED_BENCH=../shared/bench   where start-pgbouncer.sh lives
# Prints CSV lines (target,mode,protocol,clients,rep,tps,median_latency_us), then the ratios.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
shared=${SHARED_BENCH:-$root/../shared/bench}
DURATION=${DURATION:-10}
REPEAT=${REPEAT:-1}
CLIENTS=${CLIENTS:-1 8 64}
PROTOCOLS=${PROTOCOLS:-simple extended prepared}
MODES=${MODES:-select tpcb connect}
TARGETS=${TARGETS:-direct pgbouncer pgbouncer_tx pgbastion pgbastion_tx pgbastion_plain pgbastion_plain_tx}
TX_POOL=${TX_POOL:-8}
SCALE=${SCALE:-10}
THREADS=${THREADS:-1}
if [ "$THREADS" = 1 ]; then BUSY_POLL=${BUSY_POLL:-100us}; else BUSY_POLL=${BUSY_POLL:-0s}; fi
IDLE=${IDLE:-5000}

command -v pgbench >/dev/null || { echo "pgbench not found (apt-get install postgresql-client)" >&2; exit 2; }
[ -x "$shared/start-pgbouncer.sh" ] || { echo "start-pgbouncer.sh not found in $shared" >&2; exit 2; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

work=$(mktemp -d /tmp/pgbastion-grid.XXXXXX)
chmod 755 "$work"
demo_pid=""
cleanup() {
    # serve_variant runs in a subshell: its pids are in files.
    for pid in $(cat "$work"/*.pid 2>/dev/null); do kill "$pid" 2>/dev/null || true; done
    for mode in session transaction; do
        dir=$work/pgbouncer-$mode
        [ -d "$dir" ] && PGB_DIR=$dir "$shared/start-pgbouncer.sh" stop "$mode" >/dev/null 2>&1 || true
    done
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
rootcert=$(grep -o 'sslrootcert=[^"]*' "$work/demo.out" | head -1 | cut -d= -f2)
token=$(curl -s "$token_url")
config_path=$(grep -o '/tmp/pgbastion-demo-[^ ]*/pgbastion.toml' "$work/demo.out" | head -1)

# serve_variant NAME MODE POOL [plain] -> starts `pgbastion serve` on a free port, prints the
# port; "plain": no TLS on the listener, no audit log
serve_variant() {
    local name=$1 mode=$2 pool=$3 plain=${4:-} port
    port=$(free_port)
    sed -e "s/^address = \"127.0.0.1:$proxy_port\"/address = \"127.0.0.1:$port\"/" \
        -e "s|^path = .*|path = \"$work/audit-$name.log\"|" \
        -e "s/^mode = \"session\"/mode = \"$mode\"/" -e "s/^max_size = 100\$/max_size = $pool/" \
        -e "s/^worker_threads = .*/worker_threads = $THREADS/" \
        -e "s/^busy_poll = .*/busy_poll = \"$BUSY_POLL\"/" "$config_path" >"$work/$name.toml"
    # One admin listener is enough (the demo's).
    printf '\n' >>"$work/$name.toml"
    if [ -n "$plain" ]; then
        sed -i -e 's/^allow_plaintext = false/allow_plaintext = true/' -e 's/^sink = .*/sink = "off"/' \
            -e '/^path = /d' "$work/$name.toml"
    fi
    sed -i '/^\[admin\]/,/^\[/ s/^enabled = true/enabled = false/' "$work/$name.toml"
    "$root/target/release/pgbastion" serve --config "$work/$name.toml" >"$work/$name.log" 2>&1 &
    echo "$!" >"$work/$name.pid"
    echo "$port"
}
session_port=$(serve_variant session session 100)
tx_port=$(serve_variant transaction transaction "$TX_POOL")
plain_port=$(serve_variant plain session 100 plain)
plain_tx_port=$(serve_variant plain_tx transaction "$TX_POOL" plain)
sleep 1
for name in session transaction plain plain_tx; do
    kill -0 "$(cat "$work/$name.pid")" 2>/dev/null || { echo "pgbastion ($name) did not start:" >&2; cat "$work/$name.log" >&2; exit 1; }
done

PGPASSWORD=$up_password pgbench -i -q -s "$SCALE" -h 127.0.0.1 -p "$up_port" -U demo_owner demo >/dev/null 2>&1
# 64 clients direct and through session pools, plus the connections pgbench -C leaves closing.
PGPASSWORD=$up_password psql -q -h 127.0.0.1 -p "$up_port" -U demo_owner demo \
    -c "SELECT 1" >/dev/null

declare -A pgb_port
for mode in session transaction; do
    pgb_port[$mode]=$(free_port)
    size=100
    [ "$mode" = transaction ] && size=$TX_POOL
    PG_HOST=127.0.0.1 PG_PORT=$up_port BENCH_DB=demo BENCH_USER=demo_owner BENCH_PASSWORD=$up_password \
        PGB_PORT=${pgb_port[$mode]} PGB_DIR=$work/pgbouncer-$mode POOL_SIZE=$size MAX_CLIENT_CONN=6000 \
        "$shared/start-pgbouncer.sh" "$mode" >/dev/null
done

# target_env LABEL -> the libpq environment for that target
target_env() {
    case "$1" in
        direct) echo "PGHOST=127.0.0.1 PGPORT=$up_port PGUSER=demo_owner PGPASSWORD=$up_password PGSSLMODE=disable" ;;
        pgbouncer) echo "PGHOST=127.0.0.1 PGPORT=${pgb_port[session]} PGUSER=demo_owner PGPASSWORD=$up_password PGSSLMODE=disable" ;;
        pgbouncer_tx) echo "PGHOST=127.0.0.1 PGPORT=${pgb_port[transaction]} PGUSER=demo_owner PGPASSWORD=$up_password PGSSLMODE=disable" ;;
        pgbastion) echo "PGHOST=127.0.0.1 PGPORT=$session_port PGUSER=carol PGPASSWORD=$token PGSSLMODE=verify-full PGSSLROOTCERT=$rootcert" ;;
        pgbastion_tx) echo "PGHOST=127.0.0.1 PGPORT=$tx_port PGUSER=carol PGPASSWORD=$token PGSSLMODE=verify-full PGSSLROOTCERT=$rootcert" ;;
        pgbastion_plain) echo "PGHOST=127.0.0.1 PGPORT=$plain_port PGUSER=carol PGPASSWORD=$token PGSSLMODE=disable" ;;
        pgbastion_plain_tx) echo "PGHOST=127.0.0.1 PGPORT=$plain_tx_port PGUSER=carol PGPASSWORD=$token PGSSLMODE=disable" ;;
    esac
}

# run LABEL MODE PROTOCOL CLIENTS REP: prints one CSV line
run() {
    local label=$1 mode=$2 proto=$3 c=$4 rep=$5 j=2 logdir out tps median
    [ "$c" -lt 2 ] && j=1
    local args=(-n -M "$proto" -c "$c" -j "$j" -T "$DURATION" -l)
    case "$mode" in
        select) args+=(-S) ;;
        connect) args+=(-S -C) ;;
        tpcb) ;;
    esac
    logdir=$(mktemp -d "$work/log.XXXX")
    if ! out=$(cd "$logdir" && env $(target_env "$label") PGDATABASE=demo pgbench "${args[@]}" 2>&1) \
        || ! echo "$out" | grep -q '^tps = '; then
        echo "$label,$mode,$proto,$c,$rep,FAIL,FAIL"
        echo "$out" | grep -v '^progress' | tail -3 >&2
        rm -rf "$logdir"
        return
    fi
    tps=$(echo "$out" | sed -n 's/^tps = \([0-9.]*\) .*/\1/p' | head -1)
    # Per-transaction log: client_id transaction_no latency_us script_no epoch epoch_us
    median=$(cat "$logdir"/pgbench_log.* | awk '{print $3}' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
    rm -rf "$logdir"
    echo "$label,$mode,$proto,$c,$rep,$tps,$median"
    sleep 0.3
}

cells=()
for mode in $MODES; do
    case "$mode" in
        select) for proto in $PROTOCOLS; do for c in $CLIENTS; do cells+=("select $proto $c"); done; done ;;
        tpcb) cells+=("tpcb simple 8") ;;
        connect) cells+=("connect simple 8") ;;
    esac
done

echo "target,mode,protocol,clients,rep,tps,median_latency_us" | tee "$work/results.csv"
for rep in $(seq 1 "$REPEAT"); do
    for cell in "${cells[@]}"; do
        order=$TARGETS
        [ $((rep % 2)) -eq 0 ] && order=$(echo "$TARGETS" | tr ' ' '\n' | tac | tr '\n' ' ')
        for label in $order; do
            # shellcheck disable=SC2086
            run "$label" $cell "$rep" | tee -a "$work/results.csv"
        done
    done
done

echo
echo "ratios (mean over repetitions of same-run TPS ratios; latency added: median over direct)"
awk -F, 'NR > 1 && $6 != "FAIL" { k = $2","$3","$4; tps[$1","k","$5] = $6; lat[$1","k","$5] = $7; cells[k] = 1; reps[$5] = 1 }
function ratio(a, b, cell,   r, n, sum) {
    n = 0; sum = 0
    for (r in reps) if ((a","cell","r) in tps && (b","cell","r) in tps) { n++; sum += tps[a","cell","r] / tps[b","cell","r] }
    return n ? sprintf("%.2fx", sum / n) : "-"
}
function added(a, cell,   r, n, sum) {
    n = 0; sum = 0
    for (r in reps) if ((a","cell","r) in lat && ("direct,"cell","r) in lat) { n++; sum += lat[a","cell","r] - lat["direct,"cell","r] }
    return n ? sprintf("%d us", sum / n) : "-"
}
END {
    for (cell in cells)
        printf "%-20s session: pgbastion/pgbouncer %s  transaction: pgbastion_tx/pgbouncer_tx %s  pgbastion/direct %s  pgbouncer/direct %s  latency added: pgbastion %s, pgbouncer %s  without TLS and audit: session %s, transaction %s, latency added %s\n", cell,
            ratio("pgbastion", "pgbouncer", cell), ratio("pgbastion_tx", "pgbouncer_tx", cell), ratio("pgbastion", "direct", cell),
            ratio("pgbouncer", "direct", cell), added("pgbastion", cell), added("pgbouncer", cell),
            ratio("pgbastion_plain", "pgbouncer", cell), ratio("pgbastion_plain_tx", "pgbouncer_tx", cell), added("pgbastion_plain", cell)
}' "$work/results.csv" | sort

if [ "$IDLE" -gt 0 ]; then
    # Idle sessions held open by one Python process (pgbench cannot hold thousands), each
    # authenticated over TLS with the token; the proxy's resident memory is read meanwhile.
    tx_pid=$(cat "$work/transaction.pid")
    rss() { awk '/^VmRSS:/ {print $2}' "/proc/$tx_pid/status"; }
    before=$(rss)
    python3 "$root/bench/idle_sessions.py" 127.0.0.1 "$tx_port" carol "$token" "$rootcert" "$IDLE" 10 &
    holder=$!
    peak=$before
    while kill -0 "$holder" 2>/dev/null; do
        now=$(rss); [ "$now" -gt "$peak" ] && peak=$now
        sleep 0.5
    done
    wait "$holder" || echo "idle sessions: the holder failed" >&2
    echo "idle sessions on pgbastion_tx: $IDLE, RSS before ${before} KiB, peak ${peak} KiB ($(( peak / 1024 )) MiB), $(( (peak - before) / IDLE )) KiB per session"
fi
