//! The BPF program's plan and record layouts (`probe.bpf.c`), and the translation of a
//! [`CapturePlan`] into a plan the program runs. Field for field what the C declares: a
//! test checks the sizes against the object's map definitions.

use trampolines::CapturePlan;
use trampolines::codegen::{Fetch, Op};

pub const MAX_COPIES: usize = 8;
pub const MAX_FIELDS: usize = 16;
pub const MAX_PATH: usize = 4;
pub const MAX_WHEN: usize = 2;
pub const MAX_FRAMES: u8 = 32;
pub const MAX_OPS: usize = 3;
/// Bytes of copied data a record carries at most.
pub const DATA_MAX: usize = 4096;
/// Bytes of a record before its data: site, kind, cpu, data length, goid, time, depth,
/// the nine integer registers.
pub const HEADER_LEN: usize = 40 + 8 * ring_abi::slot::NINTS;

const WHEN_HAS_OFF: u8 = 1;
const WHEN_BYTE: u8 = 2;
const WHEN_DIFFERS: u8 = 4;
const WHEN_ABOVE: u8 = 8;

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Copy {
    pub ptr: u8,
    pub len: u8,
    pub max: u16,
    pub dest: u16,
    pub pad: u16,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct When {
    pub reg: u8,
    pub npath: u8,
    pub flags: u8,
    pub pad: u8,
    pub off: i32,
    pub path: [i32; MAX_PATH],
    pub equals: u64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Field {
    pub reg: u8,
    pub npath: u8,
    pub fetch: u8,
    pub nwhen: u8,
    pub keep_on_miss: u8,
    pub pad0: u8,
    pub max: u16,
    pub dest: u16,
    pub pad1: u16,
    pub off: i32,
    pub path: [i32; MAX_PATH],
    pub when: [When; MAX_WHEN],
}

/// A [`trampolines::codegen::Guard`]: record only when it holds.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Guard {
    pub kind: u8,
    pub a: u8,
    pub b: u8,
    pub nfirst: u8,
    pub min_len: u16,
    pub pad: u16,
    pub first: [u8; 4],
    pub bit: u32,
}

/// A trace-context [`Op`], as the program's `struct ctxop` holds it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct CtxOp {
    pub code: u8,
    pub a: u8,
    pub b: u8,
    pub c: u8,
    pub dest: u16,
    pub d: u8,
    pub flag: u8,
    pub off1: i32,
    pub off2: i32,
    pub imm: u64,
}

/// The program's operation codes (`OP_*` in probe.bpf.c).
mod code {
    pub const STASH_LINE: u8 = 1;
    pub const STASH_FIELD: u8 = 2;
    pub const SERVER_BEGIN: u8 = 3;
    pub const FORGET: u8 = 4;
    pub const CLIENT_BEGIN: u8 = 5;
    pub const CHILD_SPAN: u8 = 6;
    pub const INHERIT: u8 = 7;
    pub const INJECT_LINE: u8 = 8;
    pub const UNDO_LINE: u8 = 9;
    pub const PENDING_TO_REQUEST: u8 = 10;
    pub const PENDING_FROM_REQUEST: u8 = 11;
    pub const CLEAR_PENDING: u8 = 12;
    pub const CLIENT_BEGIN_HERE: u8 = 13;
    pub const CLIENT_END_HERE: u8 = 14;
    pub const CLIENT_TO_REQUEST: u8 = 15;
    pub const OUTGOING_FROM_REQUEST: u8 = 16;
    pub const STAND_DOWN: u8 = 17;
    pub const CONSUME_BEGIN: u8 = 18;
    pub const CONSUME_END: u8 = 19;
}

/// One attach point's plan: what its records carry.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Plan {
    pub site: u32,
    pub kind: u8,
    pub ncopies: u8,
    pub nfields: u8,
    pub stack_n: u8,
    pub stack_dest: u16,
    pub data_len: u16,
    pub nops: u8,
    /// Run the operations, record nothing (the trampolines' `bare`).
    pub norecord: u8,
    pub pad0: u8,
    pub pad1: u8,
    pub guard: Guard,
    pub ops: [CtxOp; MAX_OPS],
    pub copies: [Copy; MAX_COPIES],
    pub fields: [Field; MAX_FIELDS],
}

/// Which of the object's programs runs a plan: the header writes are programs of their
/// own, so the capture program loads where the kernel refuses writes to user memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    Probe,
    /// Writes a `traceparent` line into the request's buffer.
    Line,
    /// Takes it back out when the application wrote its own.
    Undo,
}

impl Program {
    pub const ALL: [Program; 3] = [Program::Probe, Program::Line, Program::Undo];

    /// Its function's name in the object.
    pub fn name(self) -> &'static str {
        match self {
            Program::Probe => "inject_probe",
            Program::Line => "inject_line",
            Program::Undo => "inject_undo",
        }
    }

    /// Whether it writes the target's memory (`bpf_probe_write_user`).
    pub fn writes(self) -> bool {
        self != Program::Probe
    }
}

impl Plan {
    /// The program that runs this plan.
    pub fn program(&self) -> Program {
        match self.ops[0].code {
            code::INJECT_LINE if self.nops == 1 => Program::Line,
            code::UNDO_LINE if self.nops == 1 => Program::Undo,
            _ => Program::Probe,
        }
    }
}

/// Offsets into `runtime.g` the program reads through R14, whether it records at all, and
/// the sampler its spans follow.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Config {
    pub goid_off: u64,
    pub stack_lo_off: u64,
    pub stack_hi_off: u64,
    pub enabled: u64,
    pub root_below: u64,
    pub parent_based: u64,
}

// SAFETY: plain integers with every padding byte an explicit field.
unsafe impl aya::Pod for Plan {}
// SAFETY: as above.
unsafe impl aya::Pod for Config {}

/// Whether a plan's only context work is writing a span out (an HTTP/2 `traceparent`
/// field, a Kafka message's header): run where no span is kept, it writes nothing.
pub fn only_writes_out(plan: &CapturePlan) -> bool {
    plan.ops.iter().all(|op| {
        matches!(
            op,
            Op::Field(_) | Op::Stack { .. } | Op::InjectH2 { .. } | Op::InjectH2After { .. } | Op::KafkaHeader { .. }
        )
    })
}

/// Whether a plan keeps trace context (its operations or its guard use the context
/// tables): such plans must all run on one backend, where the context lives.
pub fn uses_context(plan: &CapturePlan) -> bool {
    use trampolines::codegen::Guard as G;
    plan.ops.iter().any(|op| !matches!(op, Op::Field(_) | Op::Stack { .. }))
        || matches!(plan.guard, Some(G::InRequests { .. } | G::Tagged { .. } | G::Own))
}

fn path(p: &[i32]) -> Result<(u8, [i32; MAX_PATH]), String> {
    if p.len() > MAX_PATH {
        return Err(format!("a read through {} pointers (the uprobe program follows {MAX_PATH})", p.len()));
    }
    let mut out = [0; MAX_PATH];
    out[..p.len()].copy_from_slice(p);
    Ok((p.len() as u8, out))
}

/// The program's plan for `plan`, or why the uprobe program cannot run it: trace-context
/// operations (library probes) and guards are the trampolines' alone so far.
pub fn encode(site: u32, kind: ring_abi::Kind, plan: &CapturePlan) -> Result<Plan, String> {
    let data_len = plan.data_len();
    if data_len > DATA_MAX {
        return Err(format!("its records copy {data_len} bytes (the uprobe program copies at most {DATA_MAX})"));
    }
    if plan.off {
        return Err("it records nothing at this point (not attached)".into());
    }
    if plan.copies.len() > MAX_COPIES {
        return Err(format!("{} strings in registers (the uprobe program copies {MAX_COPIES})", plan.copies.len()));
    }
    let mut p = Plan {
        site,
        kind: kind as u8,
        data_len: data_len as u16,
        norecord: u8::from(plan.bare),
        guard: guard(plan.guard.as_ref())?,
        ..Plan::default()
    };
    for (c, out) in plan.copies.iter().zip(p.copies.iter_mut()) {
        *out = Copy { ptr: c.ptr, len: c.len, max: c.max, dest: c.dest, pad: 0 };
    }
    p.ncopies = plan.copies.len() as u8;
    for op in &plan.ops {
        match op {
            Op::Field(f) => {
                let i = usize::from(p.nfields);
                if i == MAX_FIELDS {
                    return Err(format!("more than {MAX_FIELDS} reads through pointers"));
                }
                if f.when.len() > MAX_WHEN {
                    return Err(format!("a read under {} conditions", f.when.len()));
                }
                let (npath, fpath) = path(&f.path)?;
                let mut out = Field {
                    reg: f.reg,
                    npath,
                    path: fpath,
                    off: f.off,
                    dest: f.dest,
                    keep_on_miss: u8::from(f.keep_on_miss),
                    nwhen: f.when.len() as u8,
                    ..Field::default()
                };
                match f.fetch {
                    Fetch::Word => out.fetch = 0,
                    Fetch::Str { max } => (out.fetch, out.max) = (1, max),
                }
                for (w, o) in f.when.iter().zip(out.when.iter_mut()) {
                    let (npath, wpath) = path(&w.path)?;
                    let flags = w.off.map_or(0, |_| WHEN_HAS_OFF)
                        | if w.byte { WHEN_BYTE } else { 0 }
                        | if w.differs { WHEN_DIFFERS } else { 0 }
                        | if w.above { WHEN_ABOVE } else { 0 };
                    *o = When {
                        reg: w.reg,
                        npath,
                        flags,
                        pad: 0,
                        off: w.off.unwrap_or(0),
                        path: wpath,
                        equals: w.equals,
                    };
                }
                p.fields[i] = out;
                p.nfields += 1;
            }
            Op::Stack { n, dest } => {
                p.stack_n = (*n).min(MAX_FRAMES);
                p.stack_dest = *dest;
            }
            // The incoming `tracestate` is not kept under uprobes: outgoing requests go
            // without it (docs/uprobe.md).
            Op::AdoptTracestate => {}
            // The header of a Kafka message is written in the trampolines' arena, which
            // uprobes do not have: the slot is never made (so `add` finds none, and
            // `WriteMessages`'s end has none to forget), and messages leave without one.
            Op::KafkaSlot { .. } | Op::KafkaEnd => {}
            other => {
                let op = ctx_op(other).ok_or_else(|| unsupported(other))?;
                let i = usize::from(p.nops);
                if i == MAX_OPS {
                    return Err(format!("more than {MAX_OPS} trace-context operations"));
                }
                p.ops[i] = op;
                p.nops += 1;
            }
        }
    }
    if p.ops[..usize::from(p.nops)].iter().any(|o| matches!(o.code, code::INJECT_LINE | code::UNDO_LINE))
        && (p.nops > 1 || p.nfields > 0 || p.ncopies > 0 || p.stack_n > 0)
    {
        return Err("a header write with other work at one point".into());
    }
    Ok(p)
}

fn guard(g: Option<&trampolines::codegen::Guard>) -> Result<Guard, String> {
    use trampolines::codegen::Guard as G;
    Ok(match g {
        None => Guard::default(),
        Some(G::FirstByte { ptr, len, min_len, first }) => {
            if first.len() > 4 {
                return Err(format!("a guard on {} first bytes (the uprobe program checks 4)", first.len()));
            }
            let mut f = [0; 4];
            f[..first.len()].copy_from_slice(first);
            Guard {
                kind: 1,
                a: *ptr,
                b: *len,
                nfirst: first.len() as u8,
                min_len: u16::from(*min_len),
                first: f,
                ..Guard::default()
            }
        }
        Some(G::InRequests { key }) => Guard { kind: 2, a: *key, ..Guard::default() },
        Some(G::Tagged { bit }) => Guard { kind: 3, bit: *bit, ..Guard::default() },
        Some(G::Own) => Guard { kind: 4, ..Guard::default() },
        Some(G::Zero { reg }) => Guard { kind: 5, a: *reg, ..Guard::default() },
    })
}

/// The program's form of a trace-context operation, or None for one it does not run.
fn ctx_op(op: &Op) -> Option<CtxOp> {
    let o = |code| CtxOp { code, ..CtxOp::default() };
    Some(match *op {
        Op::StashTraceparent { ptr, len } => CtxOp { a: ptr, b: len, ..o(code::STASH_LINE) },
        Op::StashTraceparentField { name_ptr, name_len, value_ptr, value_len } => {
            CtxOp { a: name_ptr, b: name_len, c: value_ptr, d: value_len, ..o(code::STASH_FIELD) }
        }
        Op::ServerBegin { dest } => CtxOp { dest, ..o(code::SERVER_BEGIN) },
        Op::ServerEnd | Op::Forget => o(code::FORGET),
        Op::ClientBegin { req, header_off, dest } => CtxOp { a: req, off1: header_off, dest, ..o(code::CLIENT_BEGIN) },
        Op::ChildSpan { dest } => CtxOp { dest, ..o(code::CHILD_SPAN) },
        Op::Inherit { g, goid_off, parent_goid_off } => {
            CtxOp { a: g, off1: goid_off, off2: parent_goid_off, ..o(code::INHERIT) }
        }
        Op::InjectTraceparent { map, itab, data, write_fn, buf_off, n_off, dest } => {
            CtxOp { a: map, b: itab, c: data, imm: write_fn, off1: buf_off, off2: n_off, dest, ..o(code::INJECT_LINE) }
        }
        Op::UndoOwnTraceparent { buf_off, n_off, dest } => {
            CtxOp { off1: buf_off, off2: n_off, dest, ..o(code::UNDO_LINE) }
        }
        Op::PendingToRequest { key } => CtxOp { a: key, ..o(code::PENDING_TO_REQUEST) },
        Op::PendingFromRequest { key } => CtxOp { a: key, ..o(code::PENDING_FROM_REQUEST) },
        Op::ClearPending => o(code::CLEAR_PENDING),
        Op::ClientBeginHere { dest } => CtxOp { dest, ..o(code::CLIENT_BEGIN_HERE) },
        Op::ClientEndHere => o(code::CLIENT_END_HERE),
        Op::ClientToRequest { key } => CtxOp { a: key, ..o(code::CLIENT_TO_REQUEST) },
        Op::OutgoingFromRequest { key, deref } => CtxOp {
            a: key,
            off1: deref.unwrap_or(0),
            flag: u8::from(deref.is_some()),
            ..o(code::OUTGOING_FROM_REQUEST)
        },
        Op::StandDown { name_ptr, name_len, dest } => CtxOp { a: name_ptr, b: name_len, dest, ..o(code::STAND_DOWN) },
        Op::ConsumeBegin { headers, dest } => CtxOp { off1: headers, dest, ..o(code::CONSUME_BEGIN) },
        Op::ConsumeEnd => o(code::CONSUME_END),
        _ => return None,
    })
}

/// Why the program does not run `op`, for the verdict.
fn unsupported(op: &Op) -> String {
    match op {
        Op::InjectH2 { .. } | Op::InjectH2After { .. } => {
            "it writes a traceparent field into outgoing HTTP/2 frames, which the uprobe program does not yet: \
             those requests leave without one"
                .into()
        }
        Op::KafkaHeader { .. } => {
            "it writes each message's traceparent header from the trampolines' arena, which uprobes do not have: \
             messages leave without one"
                .into()
        }
        other => format!("its probes do trace-context work ({}) the uprobe program does not yet", op_name(other)),
    }
}

fn op_name(op: &Op) -> String {
    let dbg = format!("{op:?}");
    dbg.split([' ', '{', '(']).next().unwrap_or("?").to_string()
}

/// One record of the ring buffer, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event<'a> {
    pub site: u32,
    pub kind: u8,
    pub cpu: u32,
    pub goid: u64,
    pub ktime: u64,
    pub sp: u64,
    pub ints: [u64; ring_abi::slot::NINTS],
    pub data: &'a [u8],
}

impl<'a> Event<'a> {
    /// Decodes a record; None for one too short for its own length word.
    pub fn parse(b: &'a [u8]) -> Option<Event<'a>> {
        let u32_at = |o: usize| -> Option<u32> { Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?)) };
        let u64_at = |o: usize| -> Option<u64> { Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?)) };
        let data_len = u32_at(12)? as usize;
        let mut ints = [0; ring_abi::slot::NINTS];
        for (i, v) in ints.iter_mut().enumerate() {
            *v = u64_at(40 + 8 * i)?;
        }
        Some(Event {
            site: u32_at(0)?,
            kind: *b.get(4)?,
            cpu: u32_at(8)?,
            goid: u64_at(16)?,
            ktime: u64_at(24)?,
            sp: u64_at(32)?,
            ints,
            data: b.get(HEADER_LEN..HEADER_LEN + data_len)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sizes the C program declares, read from the checked-in object's map definitions.
    #[test]
    fn layouts_match_the_program() {
        let obj = aya_obj::Object::parse(super::super::PROGRAM).expect("the checked-in object parses");
        let value = |name: &str| obj.maps.get(name).map(|m| m.value_size()).expect(name) as usize;
        assert_eq!(value("plans"), size_of::<Plan>());
        assert_eq!(value("config"), size_of::<Config>());
        assert_eq!(value("scratch"), HEADER_LEN + 2 * DATA_MAX);
        assert_eq!(value("tmps"), 88 + 72);
        assert_eq!(size_of::<Plan>(), 16 + 16 + 24 * MAX_OPS + 8 * MAX_COPIES + 96 * MAX_FIELDS);
        let names: Vec<&str> = obj.programs.keys().map(String::as_str).collect();
        for p in Program::ALL {
            assert!(names.contains(&p.name()), "{} not in {names:?}", p.name());
        }
    }

    #[test]
    fn plans_encode_with_their_context_ops_and_unknown_ops_are_refused() {
        use trampolines::codegen::{ByteCopy, FieldCopy};
        let mut plan = CapturePlan { ints: 0x7, ..CapturePlan::default() };
        plan.copies.push(ByteCopy { ptr: 0, len: 1, max: 64, dest: 0 });
        plan.ops.push(Op::Field(FieldCopy {
            reg: trampolines::codegen::SP,
            path: vec![8],
            off: 16,
            fetch: Fetch::Str { max: 32 },
            dest: 64,
            when: vec![trampolines::codegen::When::reg(2, 0x1234)],
            keep_on_miss: false,
        }));
        plan.ops.push(Op::Stack { n: 8, dest: 112 });
        let p = encode(3, ring_abi::Kind::Return, &plan).unwrap();
        assert_eq!((p.site, p.kind, p.ncopies, p.nfields, p.stack_n, p.stack_dest), (3, 2, 1, 1, 8, 112));
        assert_eq!((p.fields[0].npath, p.fields[0].path[0], p.fields[0].fetch, p.fields[0].max), (1, 8, 1, 32));
        assert_eq!((p.fields[0].nwhen, p.fields[0].when[0].reg, p.fields[0].when[0].equals), (1, 2, 0x1234));
        assert_eq!(usize::from(p.data_len), plan.data_len());
        assert_eq!(p.program(), Program::Probe);
        plan.ops.push(Op::ServerEnd);
        let p = encode(3, ring_abi::Kind::Entry, &plan).unwrap();
        assert_eq!((p.nops, p.ops[0].code), (1, code::FORGET));
        plan.ops.push(Op::AutoEnd { span: 0 });
        let why = encode(3, ring_abi::Kind::Entry, &plan).unwrap_err();
        assert!(why.contains("AutoEnd"), "{why}");
        // A header write runs in a program of its own, alone.
        let line = Op::InjectTraceparent { map: 0, itab: 1, data: 2, write_fn: 0x1000, buf_off: 8, n_off: 40, dest: 0 };
        let mut inject = CapturePlan { ops: vec![line.clone()], ..CapturePlan::default() };
        inject.guard = Some(trampolines::codegen::Guard::InRequests { key: 0 });
        let p = encode(4, ring_abi::Kind::Entry, &inject).unwrap();
        assert_eq!((p.program(), p.guard.kind, p.ops[0].imm, p.ops[0].off2), (Program::Line, 2, 0x1000, 40));
        inject.ops.push(Op::ServerEnd);
        assert!(encode(4, ring_abi::Kind::Entry, &inject).is_err());
        assert!(uses_context(&inject) && !uses_context(&CapturePlan::default()));
    }

    #[test]
    fn events_decode_and_short_ones_do_not() {
        let mut b = vec![0u8; HEADER_LEN + 5];
        b[0] = 7;
        b[4] = 1;
        b[12] = 5;
        b[16] = 42;
        b[HEADER_LEN..].copy_from_slice(b"hello");
        let e = Event::parse(&b).unwrap();
        assert_eq!((e.site, e.kind, e.goid, e.data), (7, 1, 42, &b"hello"[..]));
        assert!(Event::parse(&b[..HEADER_LEN + 4]).is_none());
        assert!(Event::parse(&b[..10]).is_none());
    }
}
