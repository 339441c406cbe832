//! The analyser against PostgreSQL's planner: for every statement of a corpus, the relations
//! the policy decides on (names resolved with the upstream catalog, views and inheritance
//! expanded) include every relation `EXPLAIN (VERBOSE, FORMAT JSON)` says the plan touches.
//! A relation the planner reads that the analyser missed is a relation a policy could not deny.

use integration_tests::text_rows;
use pgbastion_devkit::PgCluster;
use pgbastion_policy::{analyze, Catalog, Fact};
use std::collections::BTreeSet;
use tokio_postgres::NoTls;

const SCHEMA: &str = r#"
CREATE SCHEMA sales;
CREATE TABLE sales.customers (id int PRIMARY KEY, name text, ssn text, region text);
CREATE TABLE sales.orders (id int PRIMARY KEY, customer_id int, total numeric, created date);
CREATE TABLE items (id int, order_id int, sku text);
CREATE TABLE "Mixed Case" ("Id" int, val text);
CREATE VIEW sales.big_orders AS
    SELECT o.*, c.name FROM sales.orders o JOIN sales.customers c ON c.id = o.customer_id
    WHERE o.total > 100;
CREATE VIEW v2 AS SELECT * FROM sales.big_orders WHERE name LIKE 'A%';
CREATE TABLE events (id int, at date, payload text) PARTITION BY RANGE (at);
CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
CREATE TABLE base_log (id int, msg text);
CREATE TABLE child_log (extra text) INHERITS (base_log);
CREATE MATERIALIZED VIEW region_counts AS SELECT region, count(*) FROM sales.customers GROUP BY region;
"#;

const CORPUS: &[&str] = &[
    "SELECT * FROM sales.customers",
    "SELECT c.name, o.total FROM sales.customers c JOIN sales.orders o ON o.customer_id = c.id",
    "SELECT * FROM sales.big_orders",
    "SELECT * FROM v2",
    "SELECT * FROM events WHERE at > '2026-03-01'",
    "SELECT * FROM events",
    "SELECT * FROM base_log",
    "SELECT * FROM ONLY base_log",
    "SELECT * FROM \"Mixed Case\"",
    "SELECT * FROM region_counts",
    "SELECT (SELECT count(*) FROM items) AS n",
    "SELECT * FROM sales.orders WHERE customer_id IN (SELECT id FROM sales.customers WHERE region = 'EU')",
    "SELECT * FROM sales.orders o WHERE EXISTS (SELECT 1 FROM items i WHERE i.order_id = o.id)",
    "WITH recent AS (SELECT * FROM sales.orders WHERE created > now() - interval '1 day') \
     SELECT * FROM recent JOIN items ON items.order_id = recent.id",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < (SELECT count(*) FROM items)) SELECT * FROM r",
    "SELECT id FROM sales.customers UNION SELECT id FROM sales.orders EXCEPT SELECT id FROM items",
    "SELECT * FROM sales.customers c, LATERAL (SELECT * FROM sales.orders o WHERE o.customer_id = c.id LIMIT 1) last",
    "INSERT INTO items SELECT id, id, 'x' FROM sales.orders",
    "UPDATE sales.orders SET total = 0 FROM sales.customers c WHERE c.id = orders.customer_id AND c.region = 'EU'",
    "DELETE FROM items USING sales.orders WHERE items.order_id = orders.id",
    "WITH moved AS (DELETE FROM items WHERE sku = 'x' RETURNING *) INSERT INTO base_log SELECT id, sku FROM moved",
    "SELECT row_to_json(c) FROM sales.customers c",
    "SELECT count(*) FROM sales.customers GROUP BY region HAVING count(*) > (SELECT count(*) FROM items)",
    "SELECT * FROM sales.orders ORDER BY (SELECT max(id) FROM items)",
    "SELECT * FROM generate_series(1, 3) g JOIN items ON items.id = g",
    "SELECT * FROM (SELECT * FROM sales.orders) sub JOIN (VALUES (1)) v(x) ON v.x = sub.id",
    "MERGE INTO items i USING sales.orders o ON i.order_id = o.id \
     WHEN MATCHED THEN UPDATE SET sku = 'y' WHEN NOT MATCHED THEN INSERT VALUES (o.id, o.id, 'z')",
    "SELECT * FROM SALES.CUSTOMERS",
    "SELECT * FROM \"sales\".\"customers\"",
    "TABLE sales.orders",
    "SELECT * FROM events_2025",
    "INSERT INTO events VALUES (1, '2026-05-01', 'x')",
    "UPDATE events SET payload = 'y' WHERE id = 1",
    "DELETE FROM base_log WHERE id = 3",
    "SELECT * FROM sales.customers WHERE id = ANY (ARRAY(SELECT customer_id FROM sales.orders))",
    "SELECT * FROM items FOR UPDATE",
    "SELECT a.id FROM items a JOIN items b USING (id) JOIN public.items c ON c.id = a.id",
    "SELECT * FROM sales.customers WHERE name IN (SELECT name FROM sales.big_orders)",
    "SELECT DISTINCT ON (region) region, name FROM sales.customers ORDER BY region, name",
    "SELECT name, rank() OVER (PARTITION BY region ORDER BY id) FROM sales.customers",
    "SELECT * FROM sales.orders WHERE total > ALL (SELECT total FROM sales.big_orders)",
    "SELECT CASE WHEN EXISTS (SELECT 1 FROM events) THEN 1 END",
    "INSERT INTO base_log (id, msg) VALUES (1, 'a') RETURNING (SELECT count(*) FROM child_log)",
    "SELECT * FROM items JOIN LATERAL unnest(ARRAY[items.id]) u(x) ON true",
];

/// Every `Schema`.`Relation Name` anywhere in an EXPLAIN (VERBOSE, FORMAT JSON) plan.
fn planned(value: &serde_json::Value, out: &mut BTreeSet<String>) {
    match value {
        serde_json::Value::Object(map) => {
            if let (Some(schema), Some(relation)) = (
                map.get("Schema").and_then(|v| v.as_str()),
                map.get("Relation Name").and_then(|v| v.as_str()),
            ) {
                out.insert(format!("{schema}.{relation}"));
            }
            map.values().for_each(|v| planned(v, out));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| planned(v, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_analyser_reports_every_relation_the_planner_reads() {
    let cluster = tokio::task::block_in_place(PgCluster::start).expect("PostgreSQL");
    let (client, connection) = tokio_postgres::connect(&cluster.url("demo_owner", "demo"), NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    client.batch_execute(SCHEMA).await.expect("schema");
    let facts = text_rows(&client, Catalog::QUERY).await;
    let catalog = Catalog::new(1, facts.iter().filter_map(|row| Fact::from_row(row)));
    let search_path = ["demo_owner".to_string(), "public".to_string()];

    let mut missed = Vec::new();
    for sql in CORPUS {
        let plan = text_rows(&client, &format!("EXPLAIN (VERBOSE, FORMAT JSON) {sql}")).await;
        let plan: serde_json::Value =
            serde_json::from_str(plan[0][0].as_deref().expect("a plan")).expect("JSON plan");
        let mut by_planner = BTreeSet::new();
        planned(&plan, &mut by_planner);
        assert!(
            !by_planner.is_empty() || sql.starts_with("SELECT CASE"),
            "{sql}: no relations planned"
        );

        let statements = analyze(sql).unwrap_or_else(|err| panic!("{sql}: {err}"));
        let mut by_analyser = BTreeSet::new();
        for info in &statements {
            for name in info.reads.iter().chain(&info.writes) {
                for candidate in name.candidates(&search_path) {
                    if catalog.contains(&candidate) {
                        by_analyser
                            .extend(catalog.reaches(&candidate).into_iter().map(|r| r.relation));
                        by_analyser.insert(candidate);
                    }
                }
            }
        }
        let unseen: Vec<&String> = by_planner.difference(&by_analyser).collect();
        if !unseen.is_empty() {
            missed.push(format!(
                "{sql}\n    planner: {by_planner:?}\n    missed: {unseen:?}"
            ));
        }
    }
    println!("{} statements compared with the planner", CORPUS.len());
    assert!(
        missed.is_empty(),
        "relations the analyser missed:\n{}",
        missed.join("\n")
    );
}
