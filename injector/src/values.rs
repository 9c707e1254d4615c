//! What a probe captures for a function, and how captured bits become values a person
//! reads: the capture plan comes from the signature (DWARF names and types, registers
//! from the ABI assignment), and formatting follows the Go type.

use std::fmt::Write;

use go_abi::abi::{Location, Reg};
use go_abi::signature::{Scalar, Signature, Value};
use trampolines::CapturePlan;
use trampolines::codegen::{ByteCopy, Fetch, FieldCopy, Op, When};

use crate::ring::Record;

pub mod deep;

/// Each parameter's and result's DWARF shape, for showing pointers and slices by their
/// fields (in the signature's order; None where not known).
#[derive(Debug, Clone, Default)]
pub struct Shapes {
    pub params: Vec<Option<go_abi::dwarf::Shape>>,
    pub results: Vec<Option<go_abi::dwarf::Shape>>,
}

/// How one parameter or result is read from a record.
#[derive(Debug, Clone)]
pub struct ValueSpec {
    pub name: String,
    pub type_name: String,
    pub location: Location,
    /// Where its bytes were copied in the record's data area, and the bound.
    pub copy: Option<(u16, u16)>,
    /// An interface: `Some(empty)` (see `go_abi::signature::Value::interface`).
    pub interface: Option<bool>,
    /// An `error`: where the message of each message-first error type (by its itab) was
    /// copied.
    pub messages: Vec<(u64, u16)>,
    pub scalar: Option<Scalar>,
    /// A stack-assigned value: where its words were copied in the data area, and how many.
    pub stack: Option<(u16, u16)>,
    /// A pointer or slice shown by its fields: where they were copied.
    pub deep: Option<deep::Deep>,
    /// Why the backend cannot capture it (a float under uprobes), shown as `?`.
    pub unavailable: Option<&'static str>,
}

/// Names the dynamic type of an interface from its first word (a type descriptor when
/// `empty`, else an itab), both run-time addresses.
pub type TypeNamer<'a> = dyn FnMut(u64, bool) -> Option<String> + 'a;

/// Everything needed to capture and show one side (entry or return) of a function.
#[derive(Debug, Clone, Default)]
pub struct Side {
    pub plan: CapturePlan,
    pub values: Vec<ValueSpec>,
    /// Where the entry record holds the return address (the caller's code).
    pub caller: Option<u16>,
    /// Where the entry record holds the stack's frame count (then the return addresses).
    pub stack: Option<u16>,
}

/// Adds the return address (the word at SP at the entry) to an entry side: the output
/// names the caller and its file:line from it; with `frames` > 1, the return addresses of
/// that many frames of the stack (`--stack`).
pub fn capture_caller(side: &mut Side, frames: u8) {
    let Ok(dest) = u16::try_from(side.plan.data_len().next_multiple_of(8)) else { return };
    if frames > 1 {
        side.plan.ops.push(Op::Stack { n: frames, dest });
        side.caller = Some(dest + 8);
        side.stack = Some(dest);
        return;
    }
    side.plan.ops.push(Op::Field(FieldCopy {
        reg: trampolines::codegen::SP,
        path: Vec::new(),
        off: 0,
        fetch: Fetch::Word,
        dest,
        when: Vec::new(),
        keep_on_miss: false,
    }));
    side.caller = Some(dest);
}

fn int_index(r: Reg) -> Option<u8> {
    go_abi::abi::INT_ARG_REGS.iter().position(|x| *x == r).map(|i| i as u8)
}

fn has_bytes(type_name: &str) -> bool {
    type_name == "string" || type_name == "[]uint8" || type_name == "[]byte"
}

/// Bytes of an error's message kept.
const MESSAGE_MAX: u16 = 120;

/// Words of a stack-assigned value copied (a larger one is shown by its place).
const STACK_WORDS_MAX: u64 = 16;

/// Plans the capture of `values` (parameters or results), copying up to `max_string`
/// bytes of each string and byte slice held in registers, and the message of an `error`
/// whose dynamic type is one of `error_itabs` (checked by its itab before any read).
pub fn side(values: &[Value], shapes: &[Option<go_abi::dwarf::Shape>], max_string: u16, error_itabs: &[u64]) -> Side {
    let mut plan = CapturePlan::default();
    let mut specs = Vec::new();
    let mut dest = 0u16;
    for (i, v) in values.iter().enumerate() {
        let mut deep = None;
        let mut copy = None;
        let mut messages = Vec::new();
        let mut stack = None;
        // On the stack, at SP plus its offset at the entry and at a RET alike: its words,
        // and a string's or byte slice's bytes through its header there.
        if let Location::Stack { offset, size } = v.location
            && size.div_ceil(8) <= STACK_WORDS_MAX
            && let Ok(off) = i32::try_from(offset)
        {
            let words = size.div_ceil(8) as u16;
            for k in 0..words {
                plan.ops.push(Op::Field(FieldCopy {
                    reg: trampolines::codegen::SP,
                    path: Vec::new(),
                    off: off + 8 * i32::from(k),
                    fetch: Fetch::Word,
                    dest: dest + 8 * k,
                    when: Vec::new(),
                    keep_on_miss: false,
                }));
            }
            stack = Some((dest, words));
            dest += 8 * words;
            if has_bytes(&v.type_name) && max_string > 0 {
                plan.ops.push(Op::Field(FieldCopy {
                    reg: trampolines::codegen::SP,
                    path: Vec::new(),
                    off,
                    fetch: Fetch::Str { max: max_string },
                    dest,
                    when: Vec::new(),
                    keep_on_miss: false,
                }));
                copy = Some((dest + 8, max_string));
                dest += 8 + max_string.next_multiple_of(8);
            }
        }
        if let Location::Registers(pieces) = &v.location {
            for p in pieces {
                match p.reg {
                    Reg::X(n) if n < 8 => plan.floats |= 1 << n,
                    r => {
                        if let Some(i) = int_index(r) {
                            plan.ints |= 1 << i;
                        }
                    }
                }
            }
            if has_bytes(&v.type_name)
                && max_string > 0
                && let (Some(ptr), Some(len)) =
                    (pieces.first().and_then(|p| int_index(p.reg)), pieces.get(1).and_then(|p| int_index(p.reg)))
            {
                plan.copies.push(ByteCopy { ptr, len, max: max_string, dest });
                copy = Some((dest, max_string));
                dest += max_string.next_multiple_of(8);
            }
            if v.type_name == "error"
                && v.interface == Some(false)
                && let (Some(itab_reg), Some(data_reg)) =
                    (pieces.first().and_then(|p| int_index(p.reg)), pieces.get(1).and_then(|p| int_index(p.reg)))
            {
                for &itab in error_itabs {
                    plan.ops.push(Op::Field(FieldCopy {
                        reg: data_reg,
                        path: Vec::new(),
                        off: 0,
                        fetch: Fetch::Str { max: MESSAGE_MAX },
                        dest,
                        when: vec![When::reg(itab_reg, itab)],
                        keep_on_miss: false,
                    }));
                    messages.push((itab, dest));
                    dest += 8 + MESSAGE_MAX;
                }
            }
            let regs: Option<Vec<u8>> = pieces.iter().map(|p| int_index(p.reg)).collect();
            if let (Some(Some(shape)), Some(regs)) = (shapes.get(i), regs) {
                deep = deep::plan(shape, &regs, &mut plan, &mut dest, max_string);
            }
        }
        specs.push(ValueSpec {
            name: v.name.clone(),
            type_name: v.type_name.clone(),
            location: v.location.clone(),
            copy,
            interface: v.interface,
            messages,
            scalar: v.scalar,
            stack,
            deep,
            unavailable: None,
        });
    }
    Side { plan, values: specs, caller: None, stack: None }
}

/// Entry and return sides from a signature (with its values' shapes, when DWARF has
/// them); without one (stripped binaries) every argument register is recorded and shown
/// raw.
pub fn sides(sig: Option<&Signature>, shapes: &Shapes, max_string: u16, error_itabs: &[u64]) -> (Side, Side) {
    match sig {
        Some(s) => (
            side(&s.params, &shapes.params, max_string, error_itabs),
            side(&s.results, &shapes.results, max_string, error_itabs),
        ),
        None => {
            let raw = Side { plan: CapturePlan { ints: 0x1ff, ..CapturePlan::default() }, ..Side::default() };
            (raw.clone(), raw)
        }
    }
}

/// One formatted value: text for the console, JSON for files and exporters.
#[derive(Debug, Clone)]
pub struct Shown {
    pub name: String,
    pub text: String,
    pub json: serde_json::Value,
}

fn reg_bits(rec: &Record, r: Reg) -> Option<u64> {
    match r {
        Reg::X(n) => rec.floats.get(n as usize).copied(),
        r => int_index(r).map(|i| rec.ints[i as usize]),
    }
}

/// Go's `%q` for bytes: printable ASCII as is, the rest escaped.
fn quote(bytes: &[u8], truncated: bool) -> String {
    let mut out = String::with_capacity(bytes.len() + 2);
    out.push('"');
    match std::str::from_utf8(bytes) {
        Ok(s) => {
            for c in s.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\t' => out.push_str("\\t"),
                    c if c.is_control() => {
                        let _ = write!(out, "\\x{:02x}", c as u32);
                    }
                    c => out.push(c),
                }
            }
        }
        Err(_) => {
            for &b in bytes {
                if (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\' {
                    out.push(b as char);
                } else {
                    let _ = write!(out, "\\x{b:02x}");
                }
            }
        }
    }
    out.push('"');
    if truncated {
        out.push('…');
    }
    out
}

fn float_text(f: f64) -> (String, serde_json::Value) {
    if f.is_nan() {
        ("NaN".into(), "NaN".into())
    } else if f.is_infinite() {
        let s = if f > 0.0 { "+Inf" } else { "-Inf" };
        (s.into(), s.into())
    } else {
        (format!("{f}"), serde_json::json!(f))
    }
}

/// Formats one value of `rec`.
pub fn show(spec: &ValueSpec, rec: &Record, types: &mut TypeNamer<'_>) -> Shown {
    let name = spec.name.clone();
    if let Some(why) = spec.unavailable {
        return Shown { name, text: "?".into(), json: serde_json::json!({ "unavailable": why }) };
    }
    // The value's words: its registers, or the copy of its stack slots.
    let src = match (&spec.location, spec.stack) {
        (Location::Registers(p), _) => Words::Regs(p),
        (Location::Stack { .. }, Some((at, n))) => Words::Stack { at: usize::from(at), n: usize::from(n) },
        (Location::Stack { offset, size }, None) => {
            return Shown {
                name,
                text: format!("<{size} bytes at stack+{offset}>"),
                json: serde_json::json!({"stack_offset": offset, "size": size}),
            };
        }
    };
    let bits = |i: usize| src.bits(rec, i);
    let count = src.len();
    let t = spec.type_name.as_str();
    let (text, json) = if let Some(d) = &spec.deep {
        let words: Vec<u64> = (0..count).map(bits).collect();
        deep::show(d, &words, rec, types)
    } else if let (Some(empty), 2) = (spec.interface, count) {
        let (word, data) = (bits(0), bits(1));
        if word == 0 {
            ("nil".to_string(), serde_json::Value::Null)
        } else {
            let message = spec.messages.iter().find(|m| m.0 == word).and_then(|&(_, at)| {
                let at = usize::from(at);
                let len = u64::from_le_bytes(rec.data.get(at..at + 8)?.try_into().ok()?);
                let n = (len as usize).min(usize::from(MESSAGE_MAX));
                Some((rec.data.get(at + 8..at + 8 + n)?, len > u64::from(MESSAGE_MAX)))
            });
            match (types(word, empty), message) {
                (Some(name), Some((bytes, cut))) => (
                    format!("{name}({})", quote(bytes, cut)),
                    serde_json::json!({"type": name, "message": String::from_utf8_lossy(bytes), "truncated": cut}),
                ),
                (Some(name), None) => {
                    (format!("{name}({data:#x})"), serde_json::json!({"type": name, "data": format!("{data:#x}")}))
                }
                // A type or itab the runtime made on the heap: not in the file.
                (None, _) => (
                    format!("{t}{{{word:#x}, {data:#x}}}"),
                    serde_json::json!({"word": format!("{word:#x}"), "data": format!("{data:#x}")}),
                ),
            }
        }
    } else if let Some((dest, max)) = spec.copy {
        let len = bits(1) as i64;
        let n = len.clamp(0, max as i64) as usize;
        let start = dest as usize;
        let bytes = rec.data.get(start..start + n).unwrap_or(&[]);
        let truncated = len > max as i64;
        let text = quote(bytes, truncated);
        // A plain JSON string when that is exact; else the text with the true length
        // and, for bytes that are not UTF-8 (a cut inside a character), their hex.
        let exact = std::str::from_utf8(bytes).ok();
        let json = match (exact, truncated || t != "string") {
            (Some(s), false) => serde_json::json!(s),
            _ => {
                let mut o = serde_json::json!({ "value": String::from_utf8_lossy(bytes), "len": len });
                if exact.is_none() {
                    o["hex"] = serde_json::json!(bytes.iter().map(|b| format!("{b:02x}")).collect::<String>());
                }
                o
            }
        };
        (text, json)
    } else if let (Some(s), 1) = (spec.scalar, count) {
        // Basic types and the named types over them (time.Duration, http.ConnState...).
        let b = bits(0);
        match s {
            Scalar::Bool => (((b & 0xff) != 0).to_string(), serde_json::json!(b & 0xff != 0)),
            Scalar::Int { size, signed: true } => {
                let v =
                    ((b << (64 - 8 * u32::from(size.clamp(1, 8)))) as i64) >> (64 - 8 * u32::from(size.clamp(1, 8)));
                (v.to_string(), serde_json::json!(v))
            }
            Scalar::Int { size, signed: false } => {
                let v = if size >= 8 { b } else { b & ((1u64 << (8 * u32::from(size))) - 1) };
                (v.to_string(), serde_json::json!(v))
            }
            Scalar::Float64 => float_text(f64::from_bits(b)),
            Scalar::Float32 => float_text(f32::from_bits(b as u32) as f64),
        }
    } else {
        match t {
            "bool" => {
                let b = bits(0) & 0xff != 0;
                (b.to_string(), serde_json::json!(b))
            }
            "int" | "int64" => (format!("{}", bits(0) as i64), serde_json::json!(bits(0) as i64)),
            "int32" | "rune" => (format!("{}", bits(0) as i32), serde_json::json!(bits(0) as i32)),
            "int16" => (format!("{}", bits(0) as i16), serde_json::json!(bits(0) as i16)),
            "int8" => (format!("{}", bits(0) as i8), serde_json::json!(bits(0) as i8)),
            "uint" | "uint64" => (format!("{}", bits(0)), serde_json::json!(bits(0))),
            "uint32" => (format!("{}", bits(0) as u32), serde_json::json!(bits(0) as u32)),
            "uint16" => (format!("{}", bits(0) as u16), serde_json::json!(bits(0) as u16)),
            "uint8" | "byte" => (format!("{}", bits(0) as u8), serde_json::json!(bits(0) as u8)),
            "uintptr" => (format!("{:#x}", bits(0)), serde_json::json!(bits(0))),
            "float64" => float_text(f64::from_bits(bits(0))),
            "float32" => float_text(f32::from_bits(bits(0) as u32) as f64),
            _ if t.starts_with("[]") && count == 3 => {
                let (ptr, len, cap) = (bits(0), bits(1) as i64, bits(2) as i64);
                (
                    format!("{t}(len={len} cap={cap})"),
                    serde_json::json!({"ptr": format!("{ptr:#x}"), "len": len, "cap": cap}),
                )
            }
            _ if count == 1 && !src.is_float(0) => {
                // Pointer-shaped: pointers, maps, channels, funcs, and one-word structs.
                let v = bits(0);
                let text = if v == 0 { "nil".into() } else { format!("{v:#x}") };
                (text.clone(), serde_json::json!(text))
            }
            _ => {
                // Interfaces (type word, data word), structs and arrays in registers:
                // raw pieces, integers in hex, floats as floats.
                let parts: Vec<String> = (0..count).map(|i| src.part(rec, i)).collect();
                let text = format!("{t}{{{}}}", parts.join(", "));
                (text.clone(), serde_json::json!(parts))
            }
        }
    };
    Shown { name, text, json }
}

/// Where a value's words are: registers, or copied stack slots.
enum Words<'a> {
    Regs(&'a [go_abi::abi::RegPiece]),
    Stack { at: usize, n: usize },
}

impl Words<'_> {
    fn len(&self) -> usize {
        match self {
            Words::Regs(p) => p.len(),
            Words::Stack { n, .. } => *n,
        }
    }

    fn bits(&self, rec: &Record, i: usize) -> u64 {
        match self {
            Words::Regs(p) => p.get(i).and_then(|p| reg_bits(rec, p.reg)).unwrap_or(0),
            Words::Stack { at, n } if i < *n => {
                rec.data.get(at + 8 * i..at + 8 * i + 8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes)
            }
            Words::Stack { .. } => 0,
        }
    }

    fn is_float(&self, i: usize) -> bool {
        matches!(self, Words::Regs(p) if p.get(i).is_some_and(|p| p.reg.is_float()))
    }

    /// One word as a struct or array part: floats as floats, the rest in hex (a word on
    /// the stack is shown in hex: its type's fields are not known here).
    fn part(&self, rec: &Record, i: usize) -> String {
        match self {
            Words::Regs(p) => match p.get(i).map(|p| (p.reg, p.size, reg_bits(rec, p.reg))) {
                Some((Reg::X(_), 4, Some(b))) => float_text(f32::from_bits(b as u32) as f64).0,
                Some((Reg::X(_), _, Some(b))) => float_text(f64::from_bits(b)).0,
                Some((_, _, Some(b))) => format!("{b:#x}"),
                _ => "?".into(),
            },
            Words::Stack { .. } => format!("{:#x}", self.bits(rec, i)),
        }
    }
}

/// Raw argument registers, for functions without a signature (stripped binaries).
pub fn show_raw(rec: &Record) -> Vec<Shown> {
    go_abi::abi::INT_ARG_REGS
        .iter()
        .zip(rec.ints)
        .map(|(r, v)| Shown { name: r.to_string(), text: format!("{v:#x}"), json: serde_json::json!(v) })
        .collect()
}
