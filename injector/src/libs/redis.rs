//! github.com/redis/go-redis/v9 without code changes: a CLIENT span per command and per
//! pipeline (`MULTI` for a transaction's), by the OpenTelemetry database conventions for
//! Redis: `db.system.name` redis, the command as `db.operation.name` and name, the
//! client's address as `server.*`, its database index as `db.namespace`; a pipeline's
//! `db.operation.batch.size`. A nil reply (`redis.Nil`) is not an error.
//!
//! The span is the client's `processStartingAt` (v9.19 on; `process`, a one-line wrapper
//! of it the compiler inlines, before) or `processPipeline`/`processTxPipeline`. The
//! command's name is read where the client writes it: the RESP writer's `WriteArgs(args)`
//! has the arguments in registers, and the first, checked to be a string by its type
//! descriptor before it is read, names the command (an event for the open span).
//!
//! `db.query.text` is opt-in, as for SQL ([`super::sql::QueryText`]). Every argument
//! after the command's name is a value, so the sanitized text is the name and a `?` per
//! argument, from `WriteArgs`' count alone. The raw text needs the values: then the
//! writer's `bytes(b)`, through which every argument passes already encoded, is probed
//! too, and each call appends to the open command (an event per argument, paid only in
//! raw mode). A pipeline's commands are joined by `; `.

use trampolines::codegen::{ByteCopy, CapturePlan, Fetch, Op, When};

use super::sql::QueryText;
use super::{
    Alt, Attr, Described, LibProbe, LibState, Library, Notes, OpenSpans, PlanCx, Planned, SpanKind, field, one_of,
};
use crate::libs::reg::{RAX, RBX, RCX, RSI};
use crate::ring::Record;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Probe {
    Command,
    Pipeline,
    TxPipeline,
    /// The RESP writer writes a command's arguments.
    Write,
    /// The RESP writer writes one argument (raw query text only).
    Arg,
}

impl Probe {
    fn from_u8(p: u8) -> Option<Probe> {
        [Probe::Command, Probe::Pipeline, Probe::TxPipeline, Probe::Write, Probe::Arg].get(usize::from(p)).copied()
    }
}

const REDIS: &str = "github.com/redis/go-redis/v9";
const PROCESS_AT: &str = "github.com/redis/go-redis/v9.(*baseClient).processStartingAt";
const PROCESS: &str = "github.com/redis/go-redis/v9.(*baseClient).process";

/// Where values land in the records.
mod at {
    use ring_abi::span_ids;
    pub const ADDR: u16 = span_ids::LEN as u16;
    pub const ADDR_MAX: u16 = 100;
    pub const DB: u16 = ADDR + 8 + ADDR_MAX;
    /// Returns: a `RedisError`'s or `errorString`'s text.
    pub const MESSAGE: u16 = 0;
    pub const MESSAGE_MAX: u16 = 120;
    /// Write events: the command name.
    pub const NAME: u16 = 0;
    pub const NAME_MAX: u16 = 32;
    /// Argument events: the argument's bytes (its length in the RCX word).
    pub const ARG: u16 = 0;
    pub const ARG_MAX: u16 = 64;
}

/// Notes a span gathers from write events: the commands' names (space-separated); with
/// query text on, the text so far, and in raw mode how many of the current command's
/// arguments are still to come and whether one has been written yet.
const OPS: &str = "redis.ops";
const TEXT: &str = "redis.text";
const PENDING: &str = "redis.pending";
const STARTED: &str = "redis.started";
/// Raw text beyond this is cut (with `…`).
const TEXT_MAX: usize = 1024;

pub struct GoRedis;

impl Library for GoRedis {
    fn name(&self) -> &'static str {
        "go-redis"
    }

    fn scope(&self) -> &'static str {
        "inject/github.com/redis/go-redis/v9"
    }

    fn plan(&self, cx: &PlanCx<'_>) -> Planned {
        let has = |n: &str| cx.funcs.iter().any(|f| f.name == n);
        let process = if has(PROCESS_AT) {
            PROCESS_AT
        } else if has(PROCESS) {
            PROCESS
        } else {
            return Planned::default();
        };
        let mut offsets =
            go_abi::runtime::FieldOffsets::new(cx.ctx.dwarf.as_ref(), cx.release).with_modules(&cx.bin.build_info.deps);
        let itab = |c: &str| cx.bin.itab(c, "error").map(|a| a + cx.bias);
        let redis_error = itab(&format!("{REDIS}/internal/proto.RedisError"));
        let error_string = itab("*errors.errorString").zip(offsets.get("errors.errorString.s"));
        let mut get = |k: &str| {
            offsets.get(&format!("{REDIS}{k}")).and_then(|o| i32::try_from(o).ok()).ok_or_else(|| format!("{REDIS}{k}"))
        };
        let client = (|| -> Result<Vec<Op>, String> {
            let opt = get(".baseClient.opt")?;
            let addr = get(".Options.Addr")?;
            let db = get(".Options.DB")?;
            Ok(vec![
                Op::ChildSpan { dest: 0 },
                field(RAX, vec![opt], addr, Fetch::Str { max: at::ADDR_MAX }, at::ADDR, Vec::new()),
                field(RAX, vec![opt], db, Fetch::Word, at::DB, Vec::new()),
            ])
        })();
        // The error (RAX itab, RBX data): a RedisError (a string type: the data word points
        // at its string header) or an errorString, its text.
        let alt = |t: u64, off: i32| Alt { reg: RBX, path: Vec::new(), off, when: vec![When::reg(RAX, t)] };
        let messages = redis_error
            .map(|t| alt(t, 0))
            .into_iter()
            .chain(error_string.and_then(|(t, s)| Some(alt(t, i32::try_from(s).ok()?))))
            .collect();
        let error_ops = one_of(at::MESSAGE, Fetch::Str { max: at::MESSAGE_MAX }, messages);
        let mut candidates = vec![
            (Probe::Command as u8, process),
            (Probe::Pipeline as u8, "github.com/redis/go-redis/v9.(*baseClient).processPipeline"),
            (Probe::TxPipeline as u8, "github.com/redis/go-redis/v9.(*baseClient).processTxPipeline"),
            (Probe::Write as u8, "github.com/redis/go-redis/v9/internal/proto.(*Writer).WriteArgs"),
        ];
        if super::sql::query_text() == QueryText::Raw {
            candidates.push((Probe::Arg as u8, "github.com/redis/go-redis/v9/internal/proto.(*Writer).bytes"));
        }
        let ret = CapturePlan { ints: 0b11, ops: error_ops, ..CapturePlan::default() };
        super::plan_candidates(cx, &candidates, |p| {
            Ok(match Probe::from_u8(p).ok_or_else(|| format!("probe {p}"))? {
                // process(ctx, cmd) / processStartingAt(ctx, cmd, ...) error.
                Probe::Command => (CapturePlan { ops: client.clone()?, ..CapturePlan::default() }, ret.clone()),
                // processPipeline(ctx, cmds []Cmder) error: the commands' count in RSI.
                Probe::Pipeline | Probe::TxPipeline => {
                    (CapturePlan { ints: 1 << RSI, ops: client.clone()?, ..CapturePlan::default() }, ret.clone())
                }
                // (w *Writer) WriteArgs(args []interface{}): args in RBX, RCX; the first is
                // the command's name when it is a string.
                Probe::Write => {
                    let name = field(
                        RBX,
                        vec![8],
                        0,
                        Fetch::Str { max: at::NAME_MAX },
                        at::NAME,
                        vec![When::eface_string(RBX, Vec::new())],
                    );
                    let entry = CapturePlan { ints: 1 << RCX, ops: vec![name], ..CapturePlan::default() };
                    (entry, CapturePlan { off: true, ..CapturePlan::default() })
                }
                // (w *Writer) bytes(b []byte): b in RBX, RCX.
                Probe::Arg => {
                    let copies = vec![ByteCopy { ptr: RBX, len: RCX, max: at::ARG_MAX, dest: at::ARG }];
                    let entry = CapturePlan { ints: 1 << RCX, copies, ..CapturePlan::default() };
                    (entry, CapturePlan { off: true, ..CapturePlan::default() })
                }
            })
        })
    }

    fn is_span(&self, probe: u8) -> bool {
        matches!(Probe::from_u8(probe), Some(Probe::Command | Probe::Pipeline | Probe::TxPipeline))
    }

    fn state(&self) -> Box<dyn LibState> {
        Box::new(Writes)
    }

    fn describe(
        &self,
        probe: u8,
        entry: &Record,
        ret: Option<&Record>,
        notes: Option<&Notes>,
        type_name: &mut dyn FnMut(u64) -> Option<String>,
    ) -> Option<Described> {
        let probe = Probe::from_u8(probe)?;
        let data = &entry.data;
        let ops: Vec<String> = match notes.and_then(|n| n.get(OPS)) {
            Some(Attr::S(s)) => s.split(' ').map(str::to_string).collect(),
            _ => Vec::new(),
        };
        let operation = match probe {
            Probe::Command => ops.first().cloned(),
            Probe::Pipeline => Some("PIPELINE".to_string()),
            _ => Some("MULTI".to_string()),
        };
        let mut attrs: Vec<(&'static str, Attr)> = vec![("db.system.name", Attr::S("redis".into()))];
        if let Some(op) = &operation {
            attrs.push(("db.operation.name", Attr::S(op.clone())));
        }
        if let Some(db) = super::word_at(data, at::DB) {
            attrs.push(("db.namespace", Attr::S(db.to_string())));
        }
        if let Some(addr) = super::string_at(data, at::ADDR, at::ADDR_MAX) {
            let (host, port) = match addr.rsplit_once(':') {
                Some((h, p)) => (h.trim_start_matches('[').trim_end_matches(']').to_string(), p.parse::<i64>().ok()),
                None => (addr.clone(), None),
            };
            attrs.push(("server.address", Attr::S(host)));
            if let Some(p) = port {
                attrs.push(("server.port", Attr::I(p)));
            }
        }
        if probe != Probe::Command {
            attrs.push(("db.operation.batch.size", Attr::I(entry.ints[4] as i64)));
        }
        if let Some(Attr::S(text)) = notes.and_then(|n| n.get(TEXT)) {
            attrs.push(("db.query.text", Attr::S(text.clone())));
        }
        let error = ret.and_then(|r| {
            let itab = r.ints[0];
            if itab == 0 {
                return None;
            }
            let message = super::string_at(&r.data, at::MESSAGE, at::MESSAGE_MAX);
            let ty = type_name(itab);
            let redis_error = ty.as_deref().is_some_and(|t| t.ends_with("proto.RedisError"));
            // A nil reply: the key is missing, which the caller asked about.
            if redis_error && message.as_deref() == Some("redis: nil") {
                return None;
            }
            // A server error's prefix (`ERR`, `WRONGTYPE`) is its status.
            let kind = match (&message, redis_error) {
                (Some(m), true) => m.split(' ').next().unwrap_or("ERR").to_string(),
                _ => ty.clone().unwrap_or_else(|| "_OTHER".into()),
            };
            if redis_error {
                attrs.push(("db.response.status_code", Attr::S(kind.clone())));
            }
            attrs.push(("error.type", Attr::S(kind)));
            Some(message.or(ty).unwrap_or_else(|| "error".into()))
        });
        let name = operation.unwrap_or_else(|| "redis".into());
        Some(Described { kind: SpanKind::Client, name, attrs, error })
    }
}

/// Adds each written command's name, and its text when asked for, to the span open on
/// the writing goroutine.
struct Writes;

/// Appends one written argument to the current command's raw text.
fn argument(n: &mut Notes, rec: &Record) {
    let pending = match n.get(PENDING) {
        Some(Attr::I(k)) if *k > 0 => *k,
        _ => return,
    };
    n.set(PENDING, Attr::I(pending - 1));
    let started = matches!(n.get(STARTED), Some(Attr::I(1)));
    n.set(STARTED, Attr::I(1));
    // Appended in place: a command's text grows one argument at a time.
    let Some(Attr::S(text)) = n.get_mut(TEXT) else { return };
    if text.len() >= TEXT_MAX {
        return;
    }
    let len = rec.ints[usize::from(RCX)] as usize;
    let have = len.min(usize::from(at::ARG_MAX));
    let start = usize::from(at::ARG);
    let bytes = rec.data.get(start..start + have).unwrap_or_default();
    if started {
        text.push(' ');
    }
    text.push_str(&String::from_utf8_lossy(bytes));
    if len > have || text.len() > TEXT_MAX {
        text.push('…');
    }
}

impl LibState for Writes {
    fn span_start(&mut self, _probe: u8, _rec: &Record) -> Option<Notes> {
        None
    }

    fn event(&mut self, probe: LibProbe, rec: Record, spans: &mut dyn OpenSpans) {
        let Some(kind) = Probe::from_u8(probe.probe) else { return };
        let span = |p: Probe| LibProbe { lib: probe.lib, probe: p as u8 };
        let Some(p) = [Probe::Command, Probe::Pipeline, Probe::TxPipeline]
            .into_iter()
            .find(|p| spans.notes(rec.goid, span(*p)).is_some())
        else {
            return;
        };
        let Some(n) = spans.notes(rec.goid, span(p)) else { return };
        if kind == Probe::Arg {
            return argument(n, &rec);
        }
        let Some(name) = super::string_at(&rec.data, at::NAME, at::NAME_MAX) else { return };
        let name = name.to_ascii_uppercase();
        let args = rec.ints[usize::from(RCX)];
        if p == Probe::Command && n.get(OPS).is_some() {
            // A retried command writes itself again: its first writing is the span's.
            n.set(PENDING, Attr::I(0));
            return;
        }
        let ops = match n.get(OPS) {
            Some(Attr::S(s)) => format!("{s} {name}"),
            _ => name.clone(),
        };
        n.set(OPS, Attr::S(ops));
        let text = match super::sql::query_text() {
            QueryText::Off => return,
            QueryText::Sanitized => {
                let values = usize::try_from(args.saturating_sub(1)).unwrap_or(0).min(TEXT_MAX / 2);
                format!("{name}{}", " ?".repeat(values))
            }
            QueryText::Raw => {
                n.set(PENDING, Attr::I(i64::try_from(args).unwrap_or(0)));
                n.set(STARTED, Attr::I(0));
                String::new()
            }
        };
        let all = match n.get(TEXT) {
            // A long pipeline's text ends where it passes the bound.
            Some(Attr::S(s)) if s.len() >= TEXT_MAX => return n.set(PENDING, Attr::I(0)),
            Some(Attr::S(s)) if s.len() + text.len() > TEXT_MAX => format!("{s}; …"),
            Some(Attr::S(s)) => format!("{s}; {text}"),
            _ => text,
        };
        n.set(TEXT, Attr::S(all));
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}
