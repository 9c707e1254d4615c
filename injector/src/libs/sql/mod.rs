//! database/sql without code changes: a CLIENT span per query, exec, prepared statement
//! execution and transaction begin, commit and rollback, for any driver, by the
//! OpenTelemetry database semantic conventions. The parent is the goroutine's active span
//! (the request's server span, or the one its creator had: lineage needs no
//! `context.Context`). Nothing goes on the wire: the span ids are the collector's.
//!
//! The query text is read at the call (at most `plan::at::QUERY_MAX` bytes) for the
//! operation and table; it is exported only when asked for ([`QueryText`]).

mod describe;
pub mod pgx;
mod plan;
pub mod query;

use std::sync::atomic::{AtomicU8, Ordering};

use super::{Described, LibProbe, LibState, Library, Notes, OpenSpans, PlanCx, Planned};
use crate::ring::Record;

/// What each probe is for; all are spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Probe {
    Query,
    Exec,
    StmtQuery,
    StmtExec,
    Begin,
    Commit,
    Rollback,
}

impl Probe {
    const ALL: [Probe; 7] =
        [Probe::Query, Probe::Exec, Probe::StmtQuery, Probe::StmtExec, Probe::Begin, Probe::Commit, Probe::Rollback];

    fn from_u8(p: u8) -> Option<Probe> {
        Probe::ALL.get(usize::from(p)).copied()
    }
}

/// Whether spans carry `db.query.text` (`--db-query-text`, or
/// `OTEL_GO_AUTO_INCLUDE_DB_STATEMENT=true` as OpenTelemetry Go's eBPF instrumentation
/// reads it, for sanitized text).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
#[repr(u8)]
pub enum QueryText {
    #[default]
    Off,
    /// Literals replaced by `?`.
    Sanitized,
    Raw,
}

impl QueryText {
    /// The flag's choice, else the OpenTelemetry Go instrumentation's variable
    /// (sanitized, as that instrumentation's text would be read by the same people), else
    /// nothing.
    pub fn chosen(flag: Option<QueryText>) -> QueryText {
        flag.unwrap_or_else(|| match std::env::var("OTEL_GO_AUTO_INCLUDE_DB_STATEMENT") {
            Ok(v) if v.trim().eq_ignore_ascii_case("true") => QueryText::Sanitized,
            _ => QueryText::Off,
        })
    }
}

static QUERY_TEXT: AtomicU8 = AtomicU8::new(QueryText::Off as u8);

/// Sets what every database span of the session carries of its query.
pub fn set_query_text(t: QueryText) {
    QUERY_TEXT.store(t as u8, Ordering::Relaxed);
}

pub(crate) fn query_text() -> QueryText {
    match QUERY_TEXT.load(Ordering::Relaxed) {
        1 => QueryText::Sanitized,
        2 => QueryText::Raw,
        _ => QueryText::Off,
    }
}

pub struct DatabaseSql;

impl Library for DatabaseSql {
    fn name(&self) -> &'static str {
        "database/sql"
    }

    fn scope(&self) -> &'static str {
        "inject/database/sql"
    }

    fn plan(&self, cx: &PlanCx<'_>) -> Planned {
        plan::plan(cx)
    }

    fn is_span(&self, _probe: u8) -> bool {
        true
    }

    fn state(&self) -> Box<dyn LibState> {
        Box::new(NoEvents)
    }

    fn describe(
        &self,
        probe: u8,
        entry: &Record,
        ret: Option<&Record>,
        _notes: Option<&Notes>,
        type_name: &mut dyn FnMut(u64) -> Option<String>,
    ) -> Option<Described> {
        describe::describe(Probe::from_u8(probe)?, entry, ret, query_text(), type_name)
    }
}

/// The database libraries have no event probes.
pub(super) struct NoEvents;

impl LibState for NoEvents {
    fn span_start(&mut self, _probe: u8, _rec: &Record) -> Option<Notes> {
        None
    }

    fn event(&mut self, _probe: LibProbe, _rec: Record, _spans: &mut dyn OpenSpans) {}

    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}
