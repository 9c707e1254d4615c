//! Which database/sql functions are probed, and what each captures. Every public path
//! funnels into a few unexported methods that have kept their signatures from Go 1.21 to
//! 1.27: `(*DB).queryDC` and `execDC` (every `DB`, `Conn` and `Tx` query and exec, the
//! query in registers), `(*DB).beginDC` (`DB.BeginTx` and `Conn.BeginTx`); prepared
//! statements run through the exported `(*Stmt).QueryContext` and `ExecContext`, and
//! transactions end in `(*Tx).Commit` and `rollback`. Struct offsets come from the
//! binary's DWARF, else from go-abi's table for its Go release and driver versions.

use trampolines::codegen::{ByteCopy, CapturePlan, Fetch, FieldCopy, Op, When};

use super::Probe;
use crate::libs::reg::{R8, R9, R10, R11, RAX, RBX, RCX, RDI};
use crate::libs::{Alt, PlanCx, Planned, field, one_of};

/// Where values land in the records (the collector decodes with these). Entries fit the
/// 1 KiB slots a binary with net/http already has (at most 840 bytes of data).
pub(super) mod at {
    use ring_abi::span_ids;
    /// Entries start with the span's ids (`ring_abi::span_ids`), made in the target.
    /// The `*DB` when a field gives it (statements and transactions; else RAX's).
    pub const DB: u16 = span_ids::LEN as u16;
    /// `Tx.done` at Commit and Rollback: non-zero when the transaction had ended, so
    /// the call reaches no database.
    pub const DONE: u16 = DB + 8;
    /// The `DB.connector` interface's type word, and for the connectors known the
    /// driver's type word and the data source name.
    pub const CONNECTOR: u16 = DONE + 8;
    pub const DRIVER: u16 = CONNECTOR + 8;
    pub const DSN: u16 = DRIVER + 8;
    pub const DSN_MAX: u16 = 120;
    /// `stdlib.OpenDB(config)`'s connector keeps a parsed config, not a DSN: its host
    /// goes where the DSN would, its database after it, its port where the driver would.
    pub const HOST_MAX: u16 = 56;
    pub const CONFIG_DB: u16 = DSN + 8 + HOST_MAX;
    pub const CONFIG_DB_MAX: u16 = DSN_MAX - 8 - HOST_MAX;
    /// The query: its length (a field copy's, or 0 when a register holds it), then its
    /// bytes.
    pub const QUERY: u16 = DSN + 8 + DSN_MAX;
    pub const QUERY_MAX: u16 = 512;
    /// Returns: a PostgreSQL error's SQLSTATE, and an error's message.
    pub const CODE: u16 = 0;
    pub const CODE_MAX: u16 = 8;
    pub const MESSAGE: u16 = CODE + 8 + CODE_MAX;
    pub const MESSAGE_MAX: u16 = 200;
}

const CANDIDATES: &[(Probe, &str)] = &[
    (Probe::Query, "database/sql.(*DB).queryDC"),
    (Probe::Exec, "database/sql.(*DB).execDC"),
    (Probe::StmtQuery, "database/sql.(*Stmt).QueryContext"),
    (Probe::StmtExec, "database/sql.(*Stmt).ExecContext"),
    (Probe::Begin, "database/sql.(*DB).beginDC"),
    (Probe::Commit, "database/sql.(*Tx).Commit"),
    // Rollback is a one-line wrapper the compiler inlines into callers; the work (and
    // the rollback a cancelled context makes) is in rollback.
    (Probe::Rollback, "database/sql.(*Tx).rollback"),
];

/// The errors whose fields a return reads: (concrete type, SQLSTATE field, message field).
const SQL_ERRORS: &[(&str, &str, &str)] = &[
    ("*github.com/lib/pq.Error", "github.com/lib/pq.Error.Code", "github.com/lib/pq.Error.Message"),
    (
        "*github.com/jackc/pgx/v5/pgconn.PgError",
        "github.com/jackc/pgx/v5/pgconn.PgError.Code",
        "github.com/jackc/pgx/v5/pgconn.PgError.Message",
    ),
];

/// Connectors whose data source name a span reads: (concrete type, its DSN field, its
/// driver field if it has one). `sql.Open` makes a `dsnConnector` unless the driver
/// opens connectors itself, as pgx's does (`driverConnector`, whose type names the
/// system).
const CONNECTORS: &[(&str, &str, Option<&str>)] = &[
    ("database/sql.dsnConnector", "database/sql.dsnConnector.dsn", Some("database/sql.dsnConnector.driver")),
    ("*github.com/jackc/pgx/v5/stdlib.driverConnector", "github.com/jackc/pgx/v5/stdlib.driverConnector.name", None),
];

struct Connector {
    itab: u64,
    dsn: i32,
    driver: Option<i32>,
}

/// pgx's `stdlib.connector` (made by `stdlib.OpenDB(config)`): its type, and where its
/// embedded `pgconn.Config` keeps the host, port and database.
struct ConfigConnector {
    itab: u64,
    host: i32,
    port: i32,
    database: i32,
}

const PGX_CONNECTOR: &str = "github.com/jackc/pgx/v5/stdlib.connector";

struct Build<'o, 'd> {
    offsets: &'o mut go_abi::runtime::FieldOffsets<'d>,
    connectors: Vec<Connector>,
    config_connector: Option<ConfigConnector>,
    errors: Errors,
}

impl Build<'_, '_> {
    fn get(&mut self, key: &str) -> Result<i32, String> {
        self.offsets.get(key).and_then(|o| i32::try_from(o).ok()).ok_or_else(|| key.to_string())
    }

    /// The connection's description from the `*DB` reached from `reg` through `path`:
    /// the connector's type and, for the connectors known, the DSN and the driver's type.
    fn connection_ops(&mut self, reg: u8, path: Vec<i32>) -> Result<Vec<Op>, String> {
        let connector = self.get("database/sql.DB.connector")?;
        let mut ops = vec![field(reg, path.clone(), connector, Fetch::Word, at::CONNECTOR, Vec::new())];
        let (mut drivers, mut dsns) = (Vec::new(), Vec::new());
        for c in &self.connectors {
            let when = vec![When::at(reg, path.clone(), connector, c.itab)];
            let mut to = path.clone();
            to.push(connector + 8);
            if let Some(driver) = c.driver {
                drivers.push(Alt { reg, path: to.clone(), off: driver, when: when.clone() });
            }
            dsns.push(Alt { reg, path: to, off: c.dsn, when });
        }
        ops.extend(one_of(at::DRIVER, Fetch::Word, drivers));
        ops.extend(one_of(at::DSN, Fetch::Str { max: at::DSN_MAX }, dsns));
        // After the alternatives above, which wrote 0 for a connector they do not know:
        // these write only for OpenDB's, and leave what is there otherwise.
        if let Some(c) = &self.config_connector {
            let when = vec![When::at(reg, path.clone(), connector, c.itab)];
            let mut to = path;
            to.push(connector + 8);
            let copy = |off: i32, fetch: Fetch, dest: u16| {
                Op::Field(FieldCopy { reg, path: to.clone(), off, fetch, dest, when: when.clone(), keep_on_miss: true })
            };
            ops.push(copy(c.host, Fetch::Str { max: at::HOST_MAX }, at::DSN));
            ops.push(copy(c.database, Fetch::Str { max: at::CONFIG_DB_MAX }, at::CONFIG_DB));
            ops.push(copy(c.port, Fetch::Word, at::DRIVER));
        }
        Ok(ops)
    }
}

/// The error types a return reads: each driver error's (itab, SQLSTATE offset, message
/// offset) and `*errors.errorString`'s (itab, text offset), those the binary links.
pub(super) struct Errors {
    drivers: Vec<(u64, i32, i32)>,
    error_string: Option<(u64, i32)>,
}

impl Errors {
    pub(super) fn new(cx: &PlanCx<'_>, offsets: &mut go_abi::runtime::FieldOffsets<'_>) -> Errors {
        let itab = |c: &str, i: &str| cx.bin.itab(c, i).map(|a| a + cx.bias);
        let mut get = |k: &str| offsets.get(k).and_then(|o| i32::try_from(o).ok());
        let mut drivers = Vec::new();
        for &(ty, code, message) in SQL_ERRORS {
            if let (Some(t), Some(c), Some(m)) = (itab(ty, "error"), get(code), get(message)) {
                drivers.push((t, c, m));
            }
        }
        let error_string = itab("*errors.errorString", "error").zip(get("errors.errorString.s"));
        Errors { drivers, error_string }
    }

    /// The returned error in registers `itab` and `data`: a driver error's SQLSTATE and
    /// message, or an `*errors.errorString`'s text.
    pub(super) fn ops(&self, itab: u8, data: u8) -> Vec<Op> {
        let alt = |t: u64, off: i32| Alt { reg: data, path: Vec::new(), off, when: vec![When::reg(itab, t)] };
        let codes = self.drivers.iter().map(|&(t, code, _)| alt(t, code)).collect();
        let messages = self.drivers.iter().map(|&(t, _, m)| alt(t, m)).chain(self.error_string.map(|(t, s)| alt(t, s)));
        let mut ops = one_of(at::CODE, Fetch::Str { max: at::CODE_MAX }, codes);
        ops.extend(one_of(at::MESSAGE, Fetch::Str { max: at::MESSAGE_MAX }, messages.collect()));
        ops
    }
}

fn linked(funcs: &[go_abi::Func<'_>]) -> bool {
    funcs.iter().any(|f| f.name == CANDIDATES[0].1 || f.name == CANDIDATES[1].1)
}

pub(super) fn plan(cx: &PlanCx<'_>) -> Planned {
    if !linked(cx.funcs) {
        return Planned::default();
    }
    let mut offsets =
        go_abi::runtime::FieldOffsets::new(cx.ctx.dwarf.as_ref(), cx.release).with_modules(&cx.bin.build_info.deps);
    let itab = |c: &str, i: &str| cx.bin.itab(c, i).map(|a| a + cx.bias);
    let errors = Errors::new(cx, &mut offsets);
    let mut connectors = Vec::new();
    for &(ty, dsn, driver) in CONNECTORS {
        let Some(t) = itab(ty, "database/sql/driver.Connector") else { continue };
        let Some(dsn) = offsets.get(dsn).and_then(|o| i32::try_from(o).ok()) else { continue };
        let driver = match driver {
            Some(d) => match offsets.get(d).and_then(|o| i32::try_from(o).ok()) {
                Some(o) => Some(o),
                None => continue,
            },
            None => None,
        };
        connectors.push(Connector { itab: t, dsn, driver });
    }
    let config_connector = (|| {
        let mut get = |k: &str| offsets.get(k).and_then(|o| i32::try_from(o).ok());
        let base = get(&format!("{PGX_CONNECTOR}.ConnConfig"))? + get("github.com/jackc/pgx/v5.ConnConfig.Config")?;
        let field = |f: &str| format!("github.com/jackc/pgx/v5/pgconn.Config.{f}");
        Some(ConfigConnector {
            itab: itab(PGX_CONNECTOR, "database/sql/driver.Connector")?,
            host: base + get(&field("Host"))?,
            port: base + get(&field("Port"))?,
            database: base + get(&field("Database"))?,
        })
    })();
    let mut b = Build { offsets: &mut offsets, connectors, config_connector, errors };
    let candidates: Vec<(u8, &str)> = CANDIDATES.iter().map(|&(p, n)| (p as u8, n)).collect();
    crate::libs::plan_candidates(cx, &candidates, |p| {
        let probe = Probe::from_u8(p).ok_or_else(|| format!("probe {p}"))?;
        let (mut entry, ret) = plans(probe, &mut b)?;
        entry.ops.insert(0, Op::ChildSpan { dest: 0 });
        Ok((entry, ret))
    })
}

fn plans(probe: Probe, b: &mut Build<'_, '_>) -> Result<(CapturePlan, CapturePlan), String> {
    let query_copy = |ptr: u8, len: u8| ByteCopy { ptr, len, max: at::QUERY_MAX, dest: at::QUERY + 8 };
    // The error's registers at the return: after a pointer result (RBX, RCX) or an
    // interface one (RCX, RDI); Commit and Rollback return only the error (RAX, RBX).
    let ret = |b: &Build<'_, '_>, itab: u8, data: u8| CapturePlan {
        ints: (1 << itab) | (1 << data),
        ops: b.errors.ops(itab, data),
        ..CapturePlan::default()
    };
    Ok(match probe {
        // queryDC(ctx, txctx, dc, releaseConn, query string, args): query in R10, R11.
        Probe::Query => {
            let entry = CapturePlan {
                ints: (1 << RAX) | (1 << R11),
                copies: vec![query_copy(R10, R11)],
                ops: b.connection_ops(RAX, Vec::new())?,
                ..CapturePlan::default()
            };
            (entry, ret(b, RBX, RCX))
        }
        // execDC(ctx, dc, release, query string, args): query in R8, R9.
        Probe::Exec => {
            let entry = CapturePlan {
                ints: (1 << RAX) | (1 << R9),
                copies: vec![query_copy(R8, R9)],
                ops: b.connection_ops(RAX, Vec::new())?,
                ..CapturePlan::default()
            };
            (entry, ret(b, RCX, RDI))
        }
        // (s *Stmt) QueryContext / ExecContext(ctx, args ...any): the statement's query
        // and DB are its fields.
        Probe::StmtQuery | Probe::StmtExec => {
            let db = b.get("database/sql.Stmt.db")?;
            let query = b.get("database/sql.Stmt.query")?;
            let mut ops = vec![
                field(RAX, Vec::new(), query, Fetch::Str { max: at::QUERY_MAX }, at::QUERY, Vec::new()),
                field(RAX, Vec::new(), db, Fetch::Word, at::DB, Vec::new()),
            ];
            ops.extend(b.connection_ops(RAX, vec![db])?);
            let entry = CapturePlan { ints: 1 << RAX, ops, ..CapturePlan::default() };
            let r = if probe == Probe::StmtQuery { ret(b, RBX, RCX) } else { ret(b, RCX, RDI) };
            (entry, r)
        }
        // beginDC(ctx, dc, release, opts) (*Tx, error).
        Probe::Begin => {
            let entry =
                CapturePlan { ints: 1 << RAX, ops: b.connection_ops(RAX, Vec::new())?, ..CapturePlan::default() };
            (entry, ret(b, RBX, RCX))
        }
        // (tx *Tx) Commit() error / rollback(discardConn bool) error.
        Probe::Commit | Probe::Rollback => {
            let db = b.get("database/sql.Tx.db")?;
            let done = b.get("database/sql.Tx.done")?;
            let mut ops = vec![
                field(RAX, Vec::new(), db, Fetch::Word, at::DB, Vec::new()),
                field(RAX, Vec::new(), done, Fetch::Word, at::DONE, Vec::new()),
            ];
            ops.extend(b.connection_ops(RAX, vec![db])?);
            (CapturePlan { ints: 1 << RAX, ops, ..CapturePlan::default() }, ret(b, RAX, RBX))
        }
    })
}
