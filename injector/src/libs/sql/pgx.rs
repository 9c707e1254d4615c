//! pgx's native API without code changes (github.com/jackc/pgx/v5, v5.7 on): a CLIENT
//! span per `Conn.Query` (and `QueryRow`, which calls it), `Conn.Exec` and
//! `Conn.SendBatch`, which `pgxpool` and `pgx.Tx` delegate to; attributes as for
//! database/sql, the server and database from the connection's config. A pgx call made
//! by database/sql's pgx driver is the same call as database/sql's span around it: it is
//! not reported twice.

use trampolines::codegen::{ByteCopy, CapturePlan, Fetch, Op};

use super::describe::{Dsn, Statement, bytes_text, statement};
use super::plan::Errors;
use crate::libs::reg::{RAX, RCX, RDI, RSI};
use crate::libs::{Described, LibState, Library, Notes, PlanCx, Planned, field, string_at, word_at};
use crate::ring::Record;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Probe {
    Query,
    Exec,
    Batch,
}

impl Probe {
    fn from_u8(p: u8) -> Option<Probe> {
        [Probe::Query, Probe::Exec, Probe::Batch].get(usize::from(p)).copied()
    }
}

const PGX: &str = "github.com/jackc/pgx/v5";

const CANDIDATES: &[(Probe, &str)] = &[
    (Probe::Query, "github.com/jackc/pgx/v5.(*Conn).Query"),
    (Probe::Exec, "github.com/jackc/pgx/v5.(*Conn).Exec"),
    (Probe::Batch, "github.com/jackc/pgx/v5.(*Conn).SendBatch"),
];

/// Where values land in the entry records (after the span ids).
mod at {
    use ring_abi::span_ids;
    pub const HOST: u16 = span_ids::LEN as u16;
    pub const HOST_MAX: u16 = 64;
    pub const PORT: u16 = HOST + 8 + HOST_MAX;
    pub const DATABASE: u16 = PORT + 8;
    pub const DATABASE_MAX: u16 = 64;
    /// The batch's queued queries (a slice's length).
    pub const BATCH: u16 = DATABASE + 8 + DATABASE_MAX;
    /// The query's bytes after a word (its length is RSI's).
    pub const QUERY: u16 = BATCH + 8;
    pub const QUERY_MAX: u16 = super::super::plan::at::QUERY_MAX;
}

pub struct Pgx;

impl Library for Pgx {
    fn name(&self) -> &'static str {
        "pgx"
    }

    fn scope(&self) -> &'static str {
        "inject/github.com/jackc/pgx/v5"
    }

    fn plan(&self, cx: &PlanCx<'_>) -> Planned {
        if !cx.funcs.iter().any(|f| f.name == CANDIDATES[0].1) {
            return Planned::default();
        }
        let mut offsets =
            go_abi::runtime::FieldOffsets::new(cx.ctx.dwarf.as_ref(), cx.release).with_modules(&cx.bin.build_info.deps);
        let errors = Errors::new(cx, &mut offsets);
        let mut get = |k: &str| {
            offsets.get(&format!("{PGX}{k}")).and_then(|o| i32::try_from(o).ok()).ok_or_else(|| format!("{PGX}{k}"))
        };
        // The connection's config: Conn.config -> ConnConfig's embedded pgconn.Config.
        let conn = (|| -> Result<Vec<Op>, String> {
            let config = get(".Conn.config")?;
            let embedded = get(".ConnConfig.Config")?;
            let host = get("/pgconn.Config.Host")?;
            let port = get("/pgconn.Config.Port")?;
            let database = get("/pgconn.Config.Database")?;
            Ok(vec![
                field(RAX, vec![config], embedded + host, Fetch::Str { max: at::HOST_MAX }, at::HOST, Vec::new()),
                field(RAX, vec![config], embedded + port, Fetch::Word, at::PORT, Vec::new()),
                field(
                    RAX,
                    vec![config],
                    embedded + database,
                    Fetch::Str { max: at::DATABASE_MAX },
                    at::DATABASE,
                    Vec::new(),
                ),
            ])
        })();
        let batch = get(".Batch.QueuedQueries");
        let candidates: Vec<(u8, &str)> = CANDIDATES.iter().map(|&(p, n)| (p as u8, n)).collect();
        super::super::plan_candidates(cx, &candidates, |p| {
            let probe = Probe::from_u8(p).ok_or_else(|| format!("probe {p}"))?;
            let mut ops = vec![Op::ChildSpan { dest: 0 }];
            ops.extend(conn.clone()?);
            let mut entry = CapturePlan { ints: 1 << RAX, ..CapturePlan::default() };
            let ret = match probe {
                // Query / Exec(ctx, sql string, args ...any): sql in RDI, RSI; they return
                // (Rows | CommandTag, error): the error in RCX, RDI.
                Probe::Query | Probe::Exec => {
                    entry.ints |= 1 << RSI;
                    entry.copies = vec![ByteCopy { ptr: RDI, len: RSI, max: at::QUERY_MAX, dest: at::QUERY + 8 }];
                    CapturePlan { ints: (1 << RCX) | (1 << RDI), ops: errors.ops(RCX, RDI), ..CapturePlan::default() }
                }
                // SendBatch(ctx, b *Batch): b in RDI; errors come with the results, later.
                Probe::Batch => {
                    let queued = batch.clone()?;
                    ops.push(field(RDI, Vec::new(), queued + 8, Fetch::Word, at::BATCH, Vec::new()));
                    CapturePlan::default()
                }
            };
            entry.ops = ops;
            Ok((entry, ret))
        })
    }

    fn is_span(&self, _probe: u8) -> bool {
        true
    }

    fn state(&self) -> Box<dyn LibState> {
        Box::new(super::NoEvents)
    }

    fn describe(
        &self,
        probe: u8,
        entry: &Record,
        ret: Option<&Record>,
        notes: Option<&Notes>,
        type_name: &mut dyn FnMut(u64) -> Option<String>,
    ) -> Option<Described> {
        // Called by database/sql's pgx driver: database/sql's span is this call.
        if notes.is_some_and(|n| n.inside == Some(super::DatabaseSql.name())) {
            return None;
        }
        let probe = Probe::from_u8(probe)?;
        let data = &entry.data;
        let conn = Dsn {
            host: string_at(data, at::HOST, at::HOST_MAX),
            port: word_at(data, at::PORT).map(|p| i64::from(p as u16)).filter(|p| *p != 0),
            database: string_at(data, at::DATABASE, at::DATABASE_MAX),
        };
        let (query, batch) = match probe {
            Probe::Batch => (None, word_at(data, at::BATCH).map(|n| n as i64)),
            _ => (bytes_text(data, at::QUERY + 8, (entry.ints[4] as usize).min(usize::from(at::QUERY_MAX))), None),
        };
        let step = (probe == Probe::Batch).then_some("BATCH");
        let error = ret.map(|r| (r.ints[2], &r.data[..])).filter(|_| probe != Probe::Batch);
        let st = Statement { system: "postgresql", conn, query: query.as_deref(), step, batch };
        Some(statement(st, error, super::query_text(), type_name))
    }
}
