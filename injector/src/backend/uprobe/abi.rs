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
    pub pad: u32,
    pub copies: [Copy; MAX_COPIES],
    pub fields: [Field; MAX_FIELDS],
}

/// Offsets into `runtime.g` the program reads through R14, and whether it records at all.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Config {
    pub goid_off: u64,
    pub stack_lo_off: u64,
    pub stack_hi_off: u64,
    pub enabled: u64,
}

// SAFETY: plain integers with every padding byte an explicit field.
unsafe impl aya::Pod for Plan {}
// SAFETY: as above.
unsafe impl aya::Pod for Config {}

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
    if plan.guard.is_some() || plan.bare || plan.off {
        return Err("its probes filter or skip records in the target, which the uprobe program does not yet".into());
    }
    if plan.copies.len() > MAX_COPIES {
        return Err(format!("{} strings in registers (the uprobe program copies {MAX_COPIES})", plan.copies.len()));
    }
    let mut p = Plan { site, kind: kind as u8, data_len: data_len as u16, ..Plan::default() };
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
            other => {
                return Err(format!(
                    "its probes do trace-context work ({}) the uprobe program does not yet",
                    op_name(other)
                ));
            }
        }
    }
    Ok(p)
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
        assert_eq!(size_of::<Plan>(), 16 + 8 * MAX_COPIES + 96 * MAX_FIELDS);
    }

    #[test]
    fn a_func_plan_encodes_and_a_context_op_is_refused() {
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
        plan.ops.push(Op::ServerEnd);
        let why = encode(3, ring_abi::Kind::Entry, &plan).unwrap_err();
        assert!(why.contains("ServerEnd"), "{why}");
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
