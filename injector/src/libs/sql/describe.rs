//! How a database/sql span is named and attributed, by the OpenTelemetry database
//! semantic conventions (stable): `db.system.name` from the driver (its type), else the
//! port; `server.address`, `server.port` and `db.namespace` from the data source name;
//! `db.operation.name` and `db.collection.name` from the query, which names the span
//! (`{operation} {table}`, the conventions' `db.query.summary`); on failure
//! `db.response.status_code` (PostgreSQL's SQLSTATE) and `error.type`; the query text
//! only when asked for, with literals replaced unless raw text was asked for.

use super::plan::at;
use super::query::{sanitize, summarize_with_summary};
use super::{Probe, QueryText};
use crate::libs::{Attr, Described, SpanKind};
use crate::ring::Record;

use crate::libs::{string_at as string, word_at as word};

pub(super) fn bytes_text(data: &[u8], start: u16, n: usize) -> Option<String> {
    let start = usize::from(start);
    let bytes = data.get(start..start + n)?;
    (n > 0).then(|| String::from_utf8_lossy(bytes).into_owned())
}

/// The server, port and database a data source name names: a URL
/// (`postgres://user:pw@host:port/db?...`), key=value pairs (`host=h port=5432
/// dbname=db`), or MySQL's `user:pw@tcp(host:port)/db`. The password is never kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dsn {
    pub host: Option<String>,
    pub port: Option<i64>,
    pub database: Option<String>,
}

pub fn parse_dsn(dsn: &str) -> Dsn {
    let dsn = dsn.trim();
    let mut out = Dsn::default();
    let split_host_port = |hp: &str| -> (Option<String>, Option<i64>) {
        // The first of a list of hosts (`h1:5432,h2:5432`).
        let hp = hp.split(',').next().unwrap_or("");
        if let Some(rest) = hp.strip_prefix('[')
            && let Some((h, p)) = rest.split_once(']')
        {
            return (Some(h.to_string()), p.strip_prefix(':').and_then(|p| p.parse().ok()));
        }
        match hp.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (Some(h.to_string()).filter(|h| !h.is_empty()), p.parse().ok()),
            _ => (Some(hp.to_string()).filter(|h| !h.is_empty()), None),
        }
    };
    if let Some((_, rest)) = dsn.split_once("://") {
        let (auth_host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let host = auth_host.rsplit_once('@').map_or(auth_host, |(_, h)| h);
        (out.host, out.port) = split_host_port(host);
        let db = path.split(['?', '#']).next().unwrap_or("");
        out.database = Some(db.to_string()).filter(|d| !d.is_empty());
        // host= in the query (a socket directory) when the URL has none.
        if out.host.is_none()
            && let Some(q) = rest.split_once('?').map(|(_, q)| q)
        {
            for kv in q.split('&') {
                match kv.split_once('=') {
                    Some(("host", v)) => out.host = Some(v.to_string()).filter(|v| !v.is_empty()),
                    Some(("port", v)) => out.port = v.parse().ok(),
                    _ => {}
                }
            }
        }
        return out;
    }
    // MySQL: [user[:pw]@][proto[(addr)]]/db[?params]
    if let Some(open) = dsn.find("tcp(").or_else(|| dsn.find("unix(")) {
        let addr_start = dsn[open..].find('(').map_or(open, |i| open + i + 1);
        if let Some(close) = dsn[addr_start..].find(')') {
            (out.host, out.port) = split_host_port(&dsn[addr_start..addr_start + close]);
            let after = &dsn[addr_start + close + 1..];
            if let Some(db) = after.strip_prefix('/') {
                out.database = Some(db.split('?').next().unwrap_or("").to_string()).filter(|d| !d.is_empty());
            }
        }
        return out;
    }
    if dsn.contains('=') {
        // key=value pairs; values may be 'quoted'.
        let mut rest = dsn;
        while let Some((k, v)) = rest.trim_start().split_once('=') {
            let k = k.trim();
            let v = v.trim_start();
            let (value, tail) = if let Some(q) = v.strip_prefix('\'') {
                let end = q.find('\'').unwrap_or(q.len());
                (&q[..end], q.get(end + 1..).unwrap_or(""))
            } else {
                let end = v.find(char::is_whitespace).unwrap_or(v.len());
                (&v[..end], &v[end..])
            };
            match k {
                "host" | "hostaddr" if out.host.is_none() => {
                    out.host = Some(value.split(',').next().unwrap_or("").to_string()).filter(|v| !v.is_empty())
                }
                "port" => out.port = value.split(',').next().and_then(|p| p.parse().ok()),
                "dbname" | "database" => out.database = Some(value.to_string()).filter(|v| !v.is_empty()),
                _ => {}
            }
            rest = tail;
        }
    }
    out
}

/// `db.system.name` from the driver's type (`*pq.Driver`, `*stdlib.Driver`...), else
/// from a well-known port.
pub fn system_name(driver: Option<&str>, port: Option<i64>) -> &'static str {
    let d = driver.unwrap_or("").to_ascii_lowercase();
    let by_type = [
        ("pq.", "postgresql"),
        ("stdlib.", "postgresql"),
        ("pgx", "postgresql"),
        ("mysql", "mysql"),
        ("sqlite", "sqlite"),
        ("mssql", "microsoft.sql_server"),
        ("clickhouse", "clickhouse"),
        ("godror", "oracle.db"),
        ("ora.", "oracle.db"),
        ("snowflake", "snowflake"),
        ("spanner", "gcp.spanner"),
        ("duckdb", "duckdb"),
    ];
    if let Some((_, s)) = by_type.iter().find(|(k, _)| d.contains(k)) {
        return s;
    }
    match port {
        Some(5432) => "postgresql",
        Some(3306) => "mysql",
        Some(1433) => "microsoft.sql_server",
        _ => "other_sql",
    }
}

pub(super) fn describe(
    probe: Probe,
    entry: &Record,
    ret: Option<&Record>,
    text: QueryText,
    type_name: &mut dyn FnMut(u64) -> Option<String>,
) -> Option<Described> {
    let data = &entry.data;
    // A Commit or Rollback of a transaction that had ended does nothing but return
    // ErrTxDone (the `defer tx.Rollback()` after a Commit): no span, as with the
    // compile-time instrumentation, which never sees it.
    if matches!(probe, Probe::Commit | Probe::Rollback) && word(data, at::DONE).is_some_and(|d| d & 0xffff_ffff != 0) {
        return None;
    }
    // `stdlib.OpenDB(config)`'s connector: its config's fields in the DSN's and the
    // driver's places (plan.rs, `at::HOST_MAX`).
    let connector = word(data, at::CONNECTOR).filter(|w| *w != 0).and_then(&mut *type_name);
    let from_config = connector.as_deref().is_some_and(|n| n.ends_with("stdlib.connector"));
    // The driver's type names the system; else the connector's (pgx's, a driver's own).
    let driver = if from_config {
        connector.clone()
    } else {
        [at::DRIVER, at::CONNECTOR]
            .into_iter()
            .filter_map(|a| word(data, a).filter(|w| *w != 0))
            .find_map(|w| type_name(w).filter(|n| system_name(Some(n), None) != "other_sql"))
    };
    let dsn = if from_config {
        Dsn {
            host: string(data, at::DSN, at::HOST_MAX),
            // pgconn.Config.Port is a uint16.
            port: word(data, at::DRIVER).map(|p| (p & 0xffff) as i64).filter(|p| *p != 0),
            database: string(data, at::CONFIG_DB, at::CONFIG_DB_MAX),
        }
    } else {
        string(data, at::DSN, at::DSN_MAX).map(|d| cached(&DSNS, &d, || parse_dsn(&d))).unwrap_or_default()
    };
    let system = system_name(driver.as_deref(), dsn.port);
    let query = match probe {
        Probe::Query => bytes_text(data, at::QUERY + 8, (entry.ints[8] as usize).min(usize::from(at::QUERY_MAX))),
        Probe::Exec => bytes_text(data, at::QUERY + 8, (entry.ints[6] as usize).min(usize::from(at::QUERY_MAX))),
        Probe::StmtQuery | Probe::StmtExec => string(data, at::QUERY, at::QUERY_MAX),
        Probe::Begin | Probe::Commit | Probe::Rollback => None,
    };
    let step = match probe {
        Probe::Begin => Some("BEGIN"),
        Probe::Commit => Some("COMMIT"),
        Probe::Rollback => Some("ROLLBACK"),
        _ => None,
    };
    // The error: the itab in the return's first error register.
    let error = ret.map(|r| {
        let itab = match probe {
            Probe::Query | Probe::StmtQuery | Probe::Begin => r.ints[1],
            Probe::Exec | Probe::StmtExec => r.ints[2],
            Probe::Commit | Probe::Rollback => r.ints[0],
        };
        (itab, &r.data[..])
    });
    Some(statement(Statement { system, conn: dsn, query: query.as_deref(), step, batch: None }, error, text, type_name))
}

/// What a database span is made of, whichever library made the call.
pub(super) struct Statement<'a> {
    pub system: &'a str,
    pub conn: Dsn,
    pub query: Option<&'a str>,
    /// A transaction step or batch (`BEGIN`, `BATCH`): the operation, whatever the query.
    pub step: Option<&'a str>,
    /// Operations in a batch.
    pub batch: Option<i64>,
}

/// A query's operation, tables and summary.
#[derive(Debug, Clone, Default)]
struct Analysed {
    summary: super::query::Summary,
    walked: Option<(String, usize)>,
}

/// Distinct texts remembered per cache: a service runs a few hundred statements, and
/// one that builds its text with literals in it must not grow the cache without bound.
const CACHE_MAX: usize = 4096;

type Cache<T> = std::cell::RefCell<std::collections::HashMap<Box<str>, T>>;

thread_local! {
    // Lexing a query for its summary, its sanitized text, parsing a DSN: a few
    // microseconds per span, the output thread's largest cost under database load, for
    // texts that repeat.
    static ANALYSED: Cache<Analysed> = Default::default();
    static SANITIZED: Cache<String> = Default::default();
    static DSNS: Cache<Dsn> = Default::default();
}

fn cached<T: Clone>(cache: &'static std::thread::LocalKey<Cache<T>>, key: &str, make: impl FnOnce() -> T) -> T {
    cache.with(|c| {
        if let Some(v) = c.borrow().get(key) {
            return v.clone();
        }
        let v = make();
        let mut c = c.borrow_mut();
        if c.len() >= CACHE_MAX {
            c.clear();
        }
        c.insert(key.into(), v.clone());
        v
    })
}

fn analysed(q: &str) -> Analysed {
    cached(&ANALYSED, q, || {
        let (summary, walked) = summarize_with_summary(q);
        Analysed { summary, walked }
    })
}

fn sanitized(q: &str) -> String {
    cached(&SANITIZED, q, || sanitize(q))
}

/// Names and attributes a database span; `error` is the returned error's itab (0: none)
/// and the return record's data, with the SQLSTATE and message at `at::CODE` and
/// `at::MESSAGE`.
pub(super) fn statement(
    st: Statement<'_>,
    error: Option<(u64, &[u8])>,
    text: QueryText,
    type_name: &mut dyn FnMut(u64) -> Option<String>,
) -> Described {
    let (operation, mut collection, walked) = match st.step {
        Some(step) => (Some(step.to_string()), None, None),
        None => {
            let a = st.query.map(analysed).unwrap_or_default();
            (a.summary.operation.clone(), a.summary.collection.clone(), a.walked.clone())
        }
    };
    // Every operation and table in order; a query of several tables has no one collection.
    let summary = operation.clone().map(|op| match walked {
        Some((text, tables)) if tables > 1 => {
            collection = None;
            text
        }
        // `CREATE TABLE t`, `TRUNCATE t`: a table the walk does not look for.
        Some((_, 0)) | None => match &collection {
            Some(c) => format!("{op} {c}"),
            None => op,
        },
        Some((text, _)) => text,
    });
    let mut attrs: Vec<(&'static str, Attr)> = vec![("db.system.name", Attr::S(st.system.to_string()))];
    if let Some(op) = &operation {
        attrs.push(("db.operation.name", Attr::S(op.clone())));
    }
    if let Some(c) = &collection {
        attrs.push(("db.collection.name", Attr::S(c.clone())));
    }
    if let Some(db) = &st.conn.database {
        attrs.push(("db.namespace", Attr::S(db.clone())));
    }
    if let Some(h) = &st.conn.host {
        attrs.push(("server.address", Attr::S(h.clone())));
    }
    if let Some(p) = st.conn.port {
        attrs.push(("server.port", Attr::I(p)));
    }
    if let Some(n) = st.batch.filter(|n| *n >= 2) {
        attrs.push(("db.operation.batch.size", Attr::I(n)));
    }
    if let Some(q) = st.query {
        match text {
            QueryText::Off => {}
            QueryText::Sanitized => attrs.push(("db.query.text", Attr::S(sanitized(q)))),
            QueryText::Raw => attrs.push(("db.query.text", Attr::S(q.to_string()))),
        }
    }
    if let Some(s) = &summary {
        attrs.push(("db.query.summary", Attr::S(s.clone())));
    }
    let name = summary.unwrap_or_else(|| st.system.to_string());
    let error = error.and_then(|(itab, data)| {
        if itab == 0 {
            return None;
        }
        let code = string(data, at::CODE, at::CODE_MAX);
        let message = string(data, at::MESSAGE, at::MESSAGE_MAX);
        let ty = type_name(itab);
        match &code {
            Some(c) => {
                attrs.push(("db.response.status_code", Attr::S(c.clone())));
                attrs.push(("error.type", Attr::S(c.clone())));
            }
            None => attrs.push(("error.type", Attr::S(ty.clone().unwrap_or_else(|| "_OTHER".into())))),
        }
        Some(message.or(ty).unwrap_or_else(|| "error".into()))
    });
    Described { kind: SpanKind::Client, name, attrs, error }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_source_names() {
        let d = |h: Option<&str>, p: Option<i64>, db: Option<&str>| Dsn {
            host: h.map(Into::into),
            port: p,
            database: db.map(Into::into),
        };
        let cases = [
            ("postgres://inject@127.0.0.1:5433/shop?sslmode=disable", d(Some("127.0.0.1"), Some(5433), Some("shop"))),
            ("postgresql://u:p%40ss@db.example:5432/app", d(Some("db.example"), Some(5432), Some("app"))),
            ("postgres://[::1]:6000/x", d(Some("::1"), Some(6000), Some("x"))),
            ("postgres:///app?host=/var/run/postgresql", d(Some("/var/run/postgresql"), None, Some("app"))),
            (
                "host=10.0.0.5 port=5432 dbname=orders user=me password='a b'",
                d(Some("10.0.0.5"), Some(5432), Some("orders")),
            ),
            ("user:pw@tcp(mysql.local:3306)/shop?parseTime=true", d(Some("mysql.local"), Some(3306), Some("shop"))),
            ("file:test.db?cache=shared", d(None, None, None)),
            ("", d(None, None, None)),
        ];
        for (dsn, want) in cases {
            assert_eq!(parse_dsn(dsn), want, "{dsn}");
        }
    }

    #[test]
    fn system_names() {
        assert_eq!(system_name(Some("*pq.Driver"), None), "postgresql");
        assert_eq!(system_name(Some("*stdlib.Driver"), None), "postgresql");
        assert_eq!(system_name(Some("*mysql.MySQLDriver"), None), "mysql");
        assert_eq!(system_name(Some("*sqlite3.SQLiteDriver"), None), "sqlite");
        assert_eq!(system_name(None, Some(5432)), "postgresql");
        assert_eq!(system_name(None, None), "other_sql");
    }
}
