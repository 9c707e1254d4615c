//! Database spans against real servers: the dbsvc fixture (database/sql with lib/pq and
//! pgx's driver, pgx native, go-redis) on a PostgreSQL cluster and a redis-server the
//! test starts on loopback.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use tests::servers::{Postgres, Redis, require_servers};
use tests::{Proc, require_ptrace, scratch, start_fixture};
use xtask::{Flavor, GoToolchain, build_pinned_fixture, test_toolchains};

const LIMIT: Duration = Duration::from_secs(30);

use tests::http_get as get;

struct Servers {
    pg: Postgres,
    redis: Redis,
}

fn servers() -> Result<Servers> {
    Ok(Servers { pg: Postgres::start()?, redis: Redis::start()? })
}

/// What each test here needs first: ptrace and the servers (without them, outside CI, the
/// test skips), the suite's lock, and PostgreSQL and Redis started.
fn prepare() -> Result<Option<(std::sync::MutexGuard<'static, ()>, Servers)>> {
    if !require_ptrace()? || !require_servers()? {
        return Ok(None);
    }
    let serial = tests::exclusive();
    Ok(Some((serial, servers()?)))
}

fn dbsvc(tc: &GoToolchain, flavor: Flavor, pgx: &str, redis: &str, otel: bool) -> Result<std::path::PathBuf> {
    let overlay = otel.then_some("dbsvc-otel");
    build_pinned_fixture("dbsvc", overlay, &[(xtask::PGX, pgx), (xtask::GO_REDIS, redis)], tc, flavor)
}

fn start_dbsvc(exe: &std::path::Path, s: &Servers, env: &[(&str, &str)]) -> Result<(Proc, String)> {
    let pg = s.pg.url();
    let redis = s.redis.addr();
    let p = start_fixture(exe, &["-pg", &pg, "-redis", &redis], env)?;
    let addr = p.value("LISTEN").context("LISTEN")?;
    Ok((p, addr))
}

/// The fixture's routes work against the real servers without inject: the baseline every
/// other test compares with.
#[test]
fn the_fixture_serves_from_postgres_and_redis() -> Result<()> {
    if !require_servers()? {
        return Ok(());
    }
    let s = servers()?;
    let tc = test_toolchains()?.pop().context("toolchains")?;
    let exe = dbsvc(&tc, Flavor::Default, xtask::pgx_newest(&tc.version), xtask::go_redis_newest(&tc.version), false)?;
    let (mut p, addr) = start_dbsvc(&exe, &s, &[])?;
    let (code, body) = get(&addr, "/order?sku=sku-1&qty=2")?;
    ensure!(code == 200 && body.starts_with("sku-1 "), "/order: {code} {body}");
    let (code, body) = get(&addr, "/fail?kind=unique")?;
    ensure!(code == 500 && body.contains("23505"), "/fail: {code} {body}");
    p.signal(15);
    ensure!(p.wait(LIMIT)?.success(), "dbsvc failed:\n{}", p.transcript());
    Ok(())
}

/// inject attached to a dbsvc process, writing JSON lines to a file.
struct Traced {
    inject: Proc,
    jsonl: std::path::PathBuf,
}

fn attach(p: &Proc, extra: &[&str], env: &[(&str, &str)]) -> Result<Traced> {
    let jsonl = scratch(&format!("db-{}.jsonl", p.pid()));
    let pid = p.pid().to_string();
    let mut args: Vec<String> =
        ["--pid", &pid, "--output", "jsonl", "--output-file", &jsonl.display().to_string()].map(String::from).into();
    args.extend(extra.iter().map(|s| s.to_string()));
    let inject = tests::start_inject_env(&args, env, true)?;
    Ok(Traced { inject, jsonl })
}

impl Traced {
    /// Detaches and returns every span written.
    fn finish(mut self) -> Result<Vec<Value>> {
        self.inject.signal(15);
        ensure!(self.inject.wait(LIMIT)?.success(), "inject:\n{}", self.inject.transcript());
        let lines = tests::schema::read_jsonl(&self.jsonl)?;
        let _ = std::fs::remove_file(&self.jsonl);
        Ok(lines)
    }
}

fn attr<'a>(span: &'a Value, key: &str) -> Option<&'a Value> {
    span["attributes"].get(key)
}

fn show(spans: &[&Value]) -> String {
    spans
        .iter()
        .map(|s| {
            format!(
                "  {} {} g={} trace={} span={} parent={} attrs={} error={}",
                s["kind"],
                s["name"],
                s["goroutine"],
                s["trace_id"],
                s["span_id"],
                s["parent_span_id"],
                s["attributes"],
                s["error"]
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The spans of the trace whose root is the server span named `name`, the root first.
fn trace_of<'a>(spans: &'a [Value], name: &str) -> Result<Vec<&'a Value>> {
    let roots: Vec<&Value> = spans.iter().filter(|s| s["name"] == name && s["kind"] == "SERVER").collect();
    ensure!(roots.len() == 1, "{} server spans {name}:\n{}", roots.len(), show(&spans.iter().collect::<Vec<_>>()));
    let trace = &roots[0]["trace_id"];
    let mut out = vec![roots[0]];
    out.extend(spans.iter().filter(|s| s["trace_id"] == *trace && s["kind"] != "SERVER"));
    Ok(out)
}

/// The database calls of one /order request, in the order the handler makes them, as
/// (span name, whether it runs on a goroutine the handler started, whether through
/// database/sql, else pgx's own API).
const ORDER_DB: &[(&str, bool, bool)] = &[
    ("SELECT items", false, true),
    ("BEGIN", false, true),
    ("UPDATE items", false, true),
    ("COMMIT", false, true),
    ("SELECT items", false, true),
    ("INSERT audit", true, true),
    ("DELETE audit", true, false),
    ("SELECT items", false, false),
    ("BATCH", false, false),
];

/// The database/sql calls of /order (name, on a goroutine of its own).
fn order_sql() -> Vec<(&'static str, bool)> {
    ORDER_DB.iter().filter(|w| w.2).map(|w| (w.0, w.1)).collect()
}

/// One request to the fixture gives one trace: its server span, and a CLIENT span for
/// every database call the handler makes (database/sql through lib/pq and pgx's driver,
/// a transaction, a prepared statement; pgx's pool, a batch), also from a goroutine it
/// started without a context.Context; none twice (pgx under database/sql's driver);
/// with the conventions' attributes, no query text by default, and none for the
/// `defer tx.Rollback()` after a Commit.
/// One request's trace; `extra`: more inject arguments (`--backend uprobe`).
fn one_request_one_trace(
    tc: &GoToolchain,
    flavor: Flavor,
    (pgx, redis): (&str, &str),
    s: &Servers,
    extra: &[&str],
) -> Result<()> {
    let what = format!("Go {} {flavor:?} pgx {pgx} go-redis {redis} {}", tc.version, extra.join(" "));
    let exe = dbsvc(tc, flavor, pgx, redis, false)?;
    let (mut p, addr) = start_dbsvc(&exe, s, &[])?;
    let traced = attach(&p, extra, &[])?;
    let (code, body) = get(&addr, "/order?sku=sku-1&qty=1")?;
    ensure!(code == 200, "{what}: /order: {code} {body}");
    let spans = traced.finish()?;
    p.signal(15);
    p.wait(LIMIT)?;
    let trace = trace_of(&spans, "GET /order").with_context(|| what.clone())?;
    let root = trace[0];
    let sql: Vec<&Value> =
        trace.iter().copied().filter(|s| attr(s, "db.system.name").is_some_and(|v| v != "redis")).collect();
    let names: Vec<&str> = sql.iter().map(|s| s["name"].as_str().unwrap_or("")).collect();
    let want: Vec<&str> = ORDER_DB.iter().map(|w| w.0).collect();
    ensure!(
        names == want,
        "{what}: SQL spans {names:?}, want {want:?}:\n{}\nall spans:\n{}",
        show(&trace),
        show(&spans.iter().collect::<Vec<_>>())
    );
    for (span, (_, spawned, _)) in sql.iter().zip(ORDER_DB) {
        ensure!(span["kind"] == "CLIENT", "{what}: {span}");
        if *spawned {
            ensure!(span["goroutine"] != root["goroutine"], "{what}: not on a goroutine of its own: {span}");
        }
        ensure!(span["parent_span_id"] == root["span_id"], "{what}: not a child of the server span: {span}");
        for (k, v) in [("db.system.name", "postgresql"), ("server.address", "127.0.0.1"), ("db.namespace", "shop")] {
            ensure!(attr(span, k).and_then(Value::as_str) == Some(v), "{what}: {k} is not {v:?}: {span}");
        }
        ensure!(
            attr(span, "server.port").and_then(Value::as_i64) == Some(i64::from(s.pg.port)),
            "{what}: server.port: {span}"
        );
        ensure!(attr(span, "db.query.text").is_none(), "{what}: query text without the switch: {span}");
        ensure!(span["error"].is_null(), "{what}: error on {span}");
    }
    ensure!(attr(sql[0], "db.collection.name").and_then(Value::as_str) == Some("items"), "{what}: {}", sql[0]);
    ensure!(attr(sql[0], "db.operation.name").and_then(Value::as_str) == Some("SELECT"), "{what}: {}", sql[0]);
    // Redis: a miss (not an error), a SET, a pipeline of two commands.
    let redis: Vec<&Value> =
        trace.iter().copied().filter(|s| attr(s, "db.system.name").is_some_and(|v| v == "redis")).collect();
    let names: Vec<&str> = redis.iter().map(|s| s["name"].as_str().unwrap_or("")).collect();
    ensure!(names == ["GET", "SET", "PIPELINE"], "{what}: Redis spans {names:?}:\n{}", show(&trace));
    for span in &redis {
        ensure!(span["kind"] == "CLIENT" && span["parent_span_id"] == root["span_id"], "{what}: {span}");
        ensure!(span["error"].is_null(), "{what}: error on {span}");
        ensure!(attr(span, "server.port").and_then(Value::as_i64) == Some(i64::from(s.redis.port)), "{what}: {span}");
        ensure!(attr(span, "db.namespace").and_then(Value::as_str) == Some("0"), "{what}: {span}");
        ensure!(attr(span, "db.query.text").is_none(), "{what}: query text without the switch: {span}");
    }
    ensure!(attr(redis[2], "db.operation.batch.size").and_then(Value::as_i64) == Some(2), "{what}: {}", redis[2]);
    let batch = sql.last().context("no spans")?;
    ensure!(attr(batch, "db.operation.batch.size").and_then(Value::as_i64) == Some(2), "{what}: batch size: {batch}");
    eprintln!(
        "{what}: GET /order -> {} database spans (database/sql and pgx) and {} Redis spans, one trace",
        sql.len(),
        redis.len()
    );
    Ok(())
}

#[test]
fn one_request_is_one_trace_with_its_database_spans() -> Result<()> {
    let Some((_serial, s)) = prepare()? else { return Ok(()) };
    let tcs = test_toolchains()?;
    let (old, new) = (&tcs[0], tcs.last().context("toolchains")?);
    one_request_one_trace(old, Flavor::Default, (xtask::PGX_OLDEST, xtask::GO_REDIS_OLDEST), &s, &[])?;
    let newest = (xtask::pgx_newest(&new.version), xtask::go_redis_newest(&new.version));
    for flavor in [Flavor::Default, Flavor::Stripped, Flavor::Pie] {
        one_request_one_trace(new, flavor, newest, &s, &[])?;
    }
    // The same spans with every probe a kernel uprobe (docs/uprobe.md).
    if tests::require_bpf()? {
        one_request_one_trace(new, Flavor::Default, newest, &s, &["--backend", "uprobe"])?;
    }
    Ok(())
}

/// A database pgx's `stdlib.OpenDB(config)` opened has no data source name: its spans
/// read the server and the database from the connector's parsed config, through DWARF
/// (default builds) and through the offset table (stripped), with the oldest and newest
/// Go and pgx.
#[test]
fn a_database_opened_from_a_config_names_its_server() -> Result<()> {
    let Some((_serial, s)) = prepare()? else { return Ok(()) };
    let tcs = test_toolchains()?;
    let (old, new) = (&tcs[0], tcs.last().context("toolchains")?);
    let newest = (xtask::pgx_newest(&new.version), xtask::go_redis_newest(&new.version));
    let cases = [
        (old, Flavor::Stripped, xtask::PGX_OLDEST, xtask::GO_REDIS_OLDEST),
        (new, Flavor::Default, newest.0, newest.1),
        (new, Flavor::Stripped, newest.0, newest.1),
    ];
    for (tc, flavor, pgx, redis) in cases {
        let what = format!("Go {} {flavor:?} pgx {pgx}", tc.version);
        let exe = dbsvc(tc, flavor, pgx, redis, false)?;
        let (mut p, addr) = start_dbsvc(&exe, &s, &[])?;
        let traced = attach(&p, &[], &[])?;
        let (code, body) = get(&addr, "/opendb")?;
        ensure!(code == 200, "{what}: /opendb: {code} {body}");
        let spans = traced.finish()?;
        p.signal(15);
        p.wait(LIMIT)?;
        let trace = trace_of(&spans, "GET /opendb").with_context(|| what.clone())?;
        let q = trace
            .iter()
            .find(|s| s["name"] == "SELECT items")
            .with_context(|| format!("{what}: no SELECT items span:\n{}", show(&trace)))?;
        ensure!(q["parent_span_id"] == trace[0]["span_id"], "{what}: not under the server span: {q}");
        for (k, v) in [("db.system.name", "postgresql"), ("server.address", "127.0.0.1"), ("db.namespace", "shop")] {
            ensure!(attr(q, k).and_then(Value::as_str) == Some(v), "{what}: {k} is not {v:?}: {q}");
        }
        ensure!(attr(q, "server.port").and_then(Value::as_i64) == Some(i64::from(s.pg.port)), "{what}: {q}");
        eprintln!("{what}: stdlib.OpenDB's span names postgresql at 127.0.0.1:{}, database shop", s.pg.port);
    }
    Ok(())
}

/// Failing queries are Error spans with PostgreSQL's SQLSTATE as the status code and
/// error type, through lib/pq (database/sql) and pgx's pool alike; literals never reach a span
/// name, and the query text appears only with the switch, sanitized unless raw.
#[test]
fn errors_carry_the_sqlstate_and_query_text_is_opt_in() -> Result<()> {
    let Some((_serial, s)) = prepare()? else { return Ok(()) };
    let tc = test_toolchains()?.pop().context("toolchains")?;
    let exe = dbsvc(&tc, Flavor::Default, xtask::pgx_newest(&tc.version), xtask::go_redis_newest(&tc.version), false)?;
    for (mode, env) in [("flag raw", None), ("variable", Some(("OTEL_GO_AUTO_INCLUDE_DB_STATEMENT", "true")))] {
        let (mut p, addr) = start_dbsvc(&exe, &s, &[])?;
        let extra: &[&str] = if env.is_none() { &["--db-query-text", "raw"] } else { &[] };
        let traced = attach(&p, extra, env.as_slice())?;
        for (path, code) in
            [("/fail?kind=syntax", 500), ("/fail?kind=unique", 500), ("/literal", 200), ("/rollback", 200)]
        {
            let (c, body) = get(&addr, path)?;
            ensure!(c == code, "{path}: {c} {body}");
        }
        let spans = traced.finish()?;
        p.signal(15);
        p.wait(LIMIT)?;
        let errors: Vec<&Value> = spans.iter().filter(|s| attr(s, "db.response.status_code").is_some()).collect();
        let codes: Vec<&str> = errors.iter().filter_map(|s| attr(s, "db.response.status_code")?.as_str()).collect();
        // Each failing query runs through lib/pq (database/sql) and then pgx's pool, then
        // an LPUSH fails on Redis.
        for c in ["42601", "23505", "WRONGTYPE"] {
            let n = codes.iter().filter(|x| **x == c).count();
            ensure!(n == 2, "{mode}: {n} spans with status code {c}, want 2:\n{}", show(&errors));
        }
        for e in &errors {
            ensure!(e["error"].is_string(), "{mode}: not an error span: {e}");
            ensure!(attr(e, "error.type") == attr(e, "db.response.status_code"), "{mode}: error.type: {e}");
        }
        let literal = spans
            .iter()
            .find(|s| {
                attr(s, "db.query.text")
                    .and_then(Value::as_str)
                    .is_some_and(|t| t.contains("count(*) FROM items WHERE sku"))
            })
            .with_context(|| format!("{mode}: no /literal query span:\n{}", show(&spans.iter().collect::<Vec<_>>())))?;
        let text = attr(literal, "db.query.text").and_then(Value::as_str).unwrap_or("");
        match env {
            None => ensure!(text.contains("'sku-1'") && text.contains("> 3"), "raw text: {text}"),
            Some(_) => {
                ensure!(text == "SELECT count(*) FROM items WHERE sku = ? AND qty > ?", "sanitized text: {text}")
            }
        }
        ensure!(literal["name"] == "SELECT items", "{mode}: name {}", literal["name"]);
        // Redis: the failing handler's SET (with an expiry) and LPUSH; every argument is
        // a value, so the sanitized text keeps only the command.
        let redis_text = |name: &str| -> Result<String> {
            let span = spans
                .iter()
                .find(|s| s["name"] == name && attr(s, "db.system.name").is_some_and(|v| v == "redis"))
                .with_context(|| format!("{mode}: no Redis {name} span"))?;
            Ok(attr(span, "db.query.text").and_then(Value::as_str).unwrap_or("(none)").to_string())
        };
        let want = match env {
            None => ["set fail:string v ex 60", "lpush fail:string x"],
            Some(_) => ["SET ? ? ? ?", "LPUSH ? ?"],
        };
        for (name, want) in ["SET", "LPUSH"].into_iter().zip(want) {
            let got = redis_text(name)?;
            ensure!(got == want, "{mode}: Redis {name} text {got:?}, want {want:?}");
        }
        let rollback = spans.iter().filter(|s| s["name"] == "ROLLBACK").count();
        ensure!(rollback == 1, "{mode}: {rollback} ROLLBACK spans");
        if spans.iter().any(|s| s["name"].as_str().is_some_and(|n| n.contains('\'') || n.contains("sku-1"))) {
            bail!("{mode}: a literal in a span name");
        }
    }
    Ok(())
}

/// A database/sql span as the comparison sees it: its place among the trace's database
/// calls, whether it is a transaction step (named alike by both sides) or a statement,
/// its kind, whether its parent is the server span, its error status, and the attributes
/// both sides read from the connection.
#[derive(Debug, Clone, PartialEq)]
struct SqlShape {
    step: String,
    kind: i32,
    under_server: bool,
    error: bool,
    attrs: std::collections::BTreeMap<String, String>,
}

/// otelsql names spans by the driver method (`sql.conn.query`, `sql.tx.commit`), inject
/// by the conventions (`SELECT items`, `COMMIT`): both name transaction steps, and
/// anything else is a statement.
fn step(name: &str) -> String {
    match name {
        "sql.conn.begin_tx" | "BEGIN" => "BEGIN".into(),
        "sql.tx.commit" | "COMMIT" => "COMMIT".into(),
        "sql.tx.rollback" | "ROLLBACK" => "ROLLBACK".into(),
        _ => "statement".into(),
    }
}

/// The database/sql spans of each /order trace in `spans`, in start order.
fn sql_shapes(spans: &[tests::otlp::Received], scope: &str) -> Vec<Vec<SqlShape>> {
    per_order_trace(spans, |s, server| {
        s.scope.contains(scope).then(|| SqlShape {
            step: step(&s.span.name),
            kind: s.span.kind,
            under_server: s.parent_id() == Some(server.span_id()),
            error: s.span.status.as_ref().is_some_and(|st| st.code == 2),
            attrs: ["db.system.name", "server.address", "server.port"]
                .iter()
                .filter_map(|k| Some((k.to_string(), s.attr_str(k)?)))
                .collect(),
        })
    })
}

/// A go-redis span as the comparison sees it. redisotel names a command by its name in
/// lower case (`get`) and a pipeline `redis.pipeline incr expire`, counts a pipeline's
/// commands in `db.redis.num_cmd` and writes the raw command as `db.statement` (by an
/// older version of the conventions, as is `db.system`); inject uses the current names
/// (`GET`, `PIPELINE`, `db.operation.batch.size`, `db.query.text`, `db.system.name`).
/// redisotel joins a pipeline's commands with a newline, inject with `; `.
#[derive(Debug, Clone, PartialEq)]
struct RedisShape {
    step: String,
    kind: i32,
    under_server: bool,
    error: bool,
    attrs: std::collections::BTreeMap<&'static str, String>,
}

/// The go-redis spans of each /order trace in `spans`, in start order (redisotel's
/// connection dials left out: inject makes no span for them).
fn redis_shapes(spans: &[tests::otlp::Received], official: bool) -> Vec<Vec<RedisShape>> {
    let pick = |s: &tests::otlp::Received, new: &str, old: &str| s.attr_str(if official { old } else { new });
    per_order_trace(spans, |s, server| {
        if !s.scope.contains("go-redis") || s.span.name == "redis.dial" {
            return None;
        }
        let step = match s.span.name.strip_prefix("redis.pipeline ") {
            Some(_) => "PIPELINE".to_string(),
            None => s.span.name.to_ascii_uppercase(),
        };
        let mut attrs = std::collections::BTreeMap::new();
        for (key, new, old) in [
            ("system", "db.system.name", "db.system"),
            ("server.address", "server.address", "server.address"),
            ("server.port", "server.port", "server.port"),
            ("batch", "db.operation.batch.size", "db.redis.num_cmd"),
            ("text", "db.query.text", "db.statement"),
        ] {
            if let Some(v) = pick(s, new, old) {
                attrs.insert(key, if key == "text" { digits_as_0(&v.replace('\n', "; ")) } else { v });
            }
        }
        Some(RedisShape {
            step,
            kind: s.span.kind,
            under_server: s.parent_id() == Some(server.span_id()),
            error: s.span.status.as_ref().is_some_and(|st| st.code == 2),
            attrs,
        })
    })
}

/// The stock a SET writes grows with every order: numbers are compared by place only.
fn digits_as_0(text: &str) -> String {
    let mut out = String::new();
    let mut in_number = false;
    for c in text.chars() {
        if !c.is_ascii_digit() {
            out.push(c);
        } else if !in_number {
            out.push('0');
        }
        in_number = c.is_ascii_digit();
    }
    out
}

/// For each trace with an /order server span, `shape` of its other spans that it keeps,
/// in start order.
fn per_order_trace<T>(
    spans: &[tests::otlp::Received],
    shape: impl Fn(&tests::otlp::Received, &tests::otlp::Received) -> Option<T>,
) -> Vec<Vec<T>> {
    let mut traces: std::collections::HashMap<String, Vec<&tests::otlp::Received>> = Default::default();
    for s in spans {
        traces.entry(s.trace_id()).or_default().push(s);
    }
    let mut out = Vec::new();
    for t in traces.values_mut() {
        let Some(server) =
            t.iter().copied().find(|s| s.span.kind == 2 && s.attr_str("url.path").as_deref() == Some("/order"))
        else {
            continue;
        };
        t.sort_by_key(|s| s.span.start_time_unix_nano);
        out.push(t.iter().filter_map(|s| shape(s, server)).collect());
    }
    out
}

/// The official compile-time instrumentations are the reference: the fixture built with
/// otelhttp, otelsql and redisotel (configured as their documentation shows) gives, per
/// /order request, database/sql and go-redis spans that inject, attached to the plain
/// build, must reproduce: as many, in the same order of transaction steps, statements and
/// commands, CLIENT, children of the server span (also the one from a goroutine without a
/// context), with equal system name, server address and port, and for Redis equal
/// pipeline sizes and raw command text (`--db-query-text raw` against redisotel's
/// default statement).
#[test]
fn database_spans_match_the_official_instrumentation() -> Result<()> {
    use tests::otlp::{Receiver, Transport};
    let Some((_serial, s)) = prepare()? else { return Ok(()) };
    let tc = test_toolchains()?.pop().context("toolchains")?;
    let (pgx, redis) = (xtask::pgx_newest(&tc.version), xtask::go_redis_newest(&tc.version));
    const N: usize = 3;
    let mut runs = Vec::new();
    for otel in [true, false] {
        let rx = Receiver::start(Transport::Http)?;
        let endpoint = rx.endpoint();
        let exe = dbsvc(&tc, Flavor::Default, pgx, redis, otel)?;
        let env: Vec<(&str, &str)> = if otel {
            vec![("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint), ("OTEL_SERVICE_NAME", "dbsvc")]
        } else {
            vec![]
        };
        let (mut p, addr) = start_dbsvc(&exe, &s, &env)?;
        let inject = if otel {
            None
        } else {
            let pid = p.pid().to_string();
            let args: Vec<String> =
                ["--pid", &pid, "--otlp-endpoint", &endpoint, "--db-query-text", "raw"].map(String::from).into();
            Some(tests::start_inject_env(&args, &[("OTEL_SERVICE_NAME", "dbsvc")], true)?)
        };
        for _ in 0..N {
            let (code, body) = get(&addr, "/order?sku=sku-1&qty=1")?;
            ensure!(code == 200, "/order: {code} {body}");
        }
        if let Some(mut i) = inject {
            i.signal(15);
            ensure!(i.wait(LIMIT)?.success(), "inject:\n{}", i.transcript());
        }
        p.signal(15);
        ensure!(p.wait(LIMIT)?.success(), "dbsvc:\n{}", p.transcript());
        let spans = rx.spans();
        if !otel {
            // The RED metrics inject exported at detach: one count per database call, the
            // same calls its spans are.
            let calls = spans.iter().filter(|s| s.attr("db.system.name").is_some()).count() as u64;
            let mut series: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
            for p in rx.metric("db.client.operation.duration").iter().filter(|p| p.scope == "inject") {
                let c = series.entry(format!("{:?}", p.attributes)).or_default();
                *c = (*c).max(p.count.unwrap_or(0));
            }
            let counted: u64 = series.values().sum();
            ensure!(calls > 0 && counted == calls, "db.client.operation.duration counted {counted}, {calls} spans");
        }
        let scope = if otel { "otelsql" } else { "database/sql" };
        let shapes = sql_shapes(&spans, scope);
        ensure!(shapes.len() == N, "{scope}: {} /order traces for {N} requests", shapes.len());
        runs.push((shapes, redis_shapes(&spans, otel)));
    }
    let (official, ours) = (&runs[0].0, &runs[1].0);
    let want = &official[0];
    ensure!(official.iter().all(|t| t == want), "otelsql's traces differ among themselves: {official:#?}");
    // Where inject goes further: the goroutine the handler starts runs its query without
    // the request's context.Context, so otelsql starts a trace of its own for it; inject
    // follows the goroutine's lineage and keeps it in the request's trace.
    let order_sql = order_sql();
    let with_context = order_sql.iter().filter(|w| !w.1).count();
    ensure!(want.len() == with_context, "otelsql gave {} database spans per request: {want:#?}", want.len());
    for got in ours {
        ensure!(
            got.len() == order_sql.len() && got[..with_context] == want[..],
            "database spans differ:\n otelsql: {want:#?}\n inject:  {got:#?}"
        );
        let spawned = &got[with_context..];
        ensure!(
            spawned.iter().all(|g| g.under_server && g.kind == want[0].kind && g.attrs == want[0].attrs),
            "the goroutine's spans: {spawned:#?}"
        );
    }
    let (official, ours) = (&runs[0].1, &runs[1].1);
    let redis = &official[0];
    ensure!(redis.len() == 3, "redisotel gave {} spans per request: {redis:#?}", redis.len());
    ensure!(official.iter().all(|t| t == redis), "redisotel's traces differ among themselves: {official:#?}");
    for got in ours {
        ensure!(got == redis, "go-redis spans differ:\n redisotel: {redis:#?}\n inject:    {got:#?}");
    }
    eprintln!(
        "{} database/sql spans per /order request equal to otelsql's in order, kind, parent and attributes; \
         +{} from a goroutine without a context, in the request's trace (otelsql: a trace of its own); \
         {} go-redis spans equal to redisotel's, command text included",
        want.len(),
        order_sql.len() - with_context,
        redis.len()
    );
    Ok(())
}
