//! Pointer and slice arguments shown by their fields (`item=&{SKU:"a1" Qty:3}`), from
//! DWARF shapes (`go_abi::dwarf::Shape`): the plan copies, at the call, every word a
//! field needs through the pointer (each step nil-checked, a slice's elements only below
//! its length), so nothing of the target is read after the fact; the output names the
//! fields from where their bytes landed.
//!
//! Reads are whole aligned words of memory Go guarantees is there: a non-nil `*T` points
//! to a whole T, a slice to `len` elements. A field smaller than a word is read as the
//! aligned word that holds it, which only works when T is word-aligned (any field of 8
//! bytes makes it so); a T with smaller alignment is shown by its address.

use go_abi::dwarf::Shape;
use go_abi::signature::Scalar;
use trampolines::CapturePlan;
use trampolines::codegen::{Fetch, FieldCopy, Op, When};

use super::{float_text, quote};
use crate::ring::Record;

/// Elements of a slice argument shown, at most.
pub const MAX_ELEMS: u64 = 8;
/// Bytes of a record one value's fields may take.
const BUDGET: u16 = 768;

/// Where a value's parts landed in the record's data area.
#[derive(Debug, Clone)]
pub enum Part {
    /// The word at `at`, of which the scalar starts `shift` bytes in.
    Scalar {
        at: u16,
        shift: u8,
        scalar: Scalar,
    },
    /// A string's length word at `at`, then at most `max` of its bytes.
    Str {
        at: u16,
        max: u16,
    },
    /// A pointer's word, and its target when followed.
    Ptr {
        at: u16,
        target: Option<Box<Part>>,
    },
    Struct {
        fields: Vec<(String, Part)>,
    },
    /// A slice's length word (its elements are not copied here).
    SliceLen {
        at: u16,
        name: String,
    },
    /// An interface's two words.
    Iface {
        at: u16,
        empty: bool,
    },
    /// One word shown raw (maps, channels, funcs).
    Word {
        at: u16,
    },
    /// Not copied (no room left, or not word-aligned): its type's name.
    Skipped {
        name: String,
    },
}

/// A value shown by its fields: a pointer in a register, or a slice's elements.
#[derive(Debug, Clone)]
pub enum Deep {
    /// `*T` (its register is the value's first word).
    Pointer { target: Part },
    /// `[]T`: its first elements (the length is the value's second word).
    Slice { elems: Vec<Part> },
}

/// Plans the copies for a value whose words are the integer registers `regs` (ABI
/// indexes), starting at `dest` in the data area; None when it is not a pointer or slice
/// with a known target, or nothing fits.
pub fn plan(shape: &Shape, regs: &[u8], plan: &mut CapturePlan, dest: &mut u16, max_string: u16) -> Option<Deep> {
    let mut p = Planner { ops: Vec::new(), next: *dest, end: dest.checked_add(BUDGET)?, max_string };
    let deep = match (shape, regs) {
        (Shape::Pointer { target: Some(t), .. }, &[reg]) if word_aligned(t) => {
            Deep::Pointer { target: p.part(reg, &[], 0, t, &[]) }
        }
        (Shape::Slice { elem: Some(e), elem_size, .. }, &[ptr, len, _]) if word_aligned(e) => {
            let mut elems = Vec::new();
            for i in 0..MAX_ELEMS {
                let Ok(off) = i32::try_from(i * elem_size) else { break };
                let before = p.ops.len();
                let part = p.part(ptr, &[], off, e, &[When::above(len, i)]);
                // Nothing of it fitted: the budget is spent.
                if p.ops.len() == before {
                    break;
                }
                elems.push(part);
            }
            if elems.is_empty() {
                return None;
            }
            Deep::Slice { elems }
        }
        _ => return None,
    };
    plan.ops.extend(p.ops);
    *dest = p.next;
    Some(deep)
}

fn word_aligned(s: &Shape) -> bool {
    match s {
        Shape::Struct { align, size, .. } => *align >= 8 && *size > 0,
        Shape::Scalar { .. } => is_word(s),
        Shape::String | Shape::Pointer { .. } | Shape::Slice { .. } | Shape::Interface { .. } => true,
        Shape::Other { size, .. } => *size == 8,
    }
}

/// A scalar that fills a word (read at its own address, no neighbour's bytes).
fn is_word(s: &Shape) -> bool {
    matches!(s, Shape::Scalar { scalar: Scalar::Float64 | Scalar::Int { size: 8, .. }, .. })
}

struct Planner {
    ops: Vec<Op>,
    next: u16,
    end: u16,
    max_string: u16,
}

impl Planner {
    /// Room for `n` bytes at `next`, taken; None when the value's budget is spent.
    fn take(&mut self, n: u16) -> Option<u16> {
        let at = self.next;
        let end = at.checked_add(n.next_multiple_of(8))?;
        (end <= self.end).then(|| {
            self.next = end;
            at
        })
    }

    fn copy(&mut self, reg: u8, path: &[i32], off: i32, fetch: Fetch, when: &[When]) -> Option<u16> {
        let n = match fetch {
            Fetch::Word => 8,
            Fetch::Str { max } => 8 + max,
        };
        let dest = self.take(n)?;
        self.ops.push(Op::Field(FieldCopy {
            reg,
            path: path.to_vec(),
            off,
            fetch,
            dest,
            when: when.to_vec(),
            keep_on_miss: false,
        }));
        Some(dest)
    }

    /// The part of shape `s` at `off` from what `path` leads to from `reg`.
    fn part(&mut self, reg: u8, path: &[i32], off: i32, s: &Shape, when: &[When]) -> Part {
        let skipped = || Part::Skipped { name: s.name() };
        let word = |p: &mut Planner, at: i32| p.copy(reg, path, at, Fetch::Word, when);
        match s {
            Shape::Scalar { scalar, .. } => {
                let aligned = off & !7;
                match word(self, aligned) {
                    Some(at) => Part::Scalar { at, shift: (off - aligned) as u8, scalar: *scalar },
                    None => skipped(),
                }
            }
            Shape::String => {
                let max = self.max_string;
                match self.copy(reg, path, off, Fetch::Str { max }, when) {
                    Some(at) => Part::Str { at, max },
                    None => skipped(),
                }
            }
            Shape::Pointer { target, .. } => {
                let Some(at) = word(self, off) else { return skipped() };
                let target = target.as_deref().filter(|t| word_aligned(t)).map(|t| {
                    let mut deeper = path.to_vec();
                    deeper.push(off);
                    Box::new(self.part(reg, &deeper, 0, t, when))
                });
                Part::Ptr { at, target }
            }
            Shape::Struct { fields, .. } => {
                let mut out = Vec::with_capacity(fields.len());
                for f in fields {
                    let Ok(fo) = i32::try_from(f.offset) else { break };
                    out.push((f.name.clone(), self.part(reg, path, off + fo, &f.shape, when)));
                }
                Part::Struct { fields: out }
            }
            Shape::Slice { name, .. } => match word(self, off + 8) {
                Some(at) => Part::SliceLen { at, name: name.clone() },
                None => skipped(),
            },
            Shape::Interface { empty, .. } => {
                if self.end.saturating_sub(self.next) < 16 {
                    return skipped();
                }
                match (word(self, off), word(self, off + 8)) {
                    (Some(at), Some(_)) => Part::Iface { at, empty: *empty },
                    _ => skipped(),
                }
            }
            Shape::Other { size: 8, .. } => match word(self, off) {
                Some(at) => Part::Word { at },
                None => skipped(),
            },
            Shape::Other { .. } => skipped(),
        }
    }
}

/// Names an interface's dynamic type from its first word.
pub type Namer<'a> = dyn FnMut(u64, bool) -> Option<String> + 'a;

fn word_at(rec: &Record, at: u16) -> u64 {
    let at = usize::from(at);
    rec.data.get(at..at + 8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes)
}

/// The value as text and JSON; `words` are its registers' values.
pub fn show(deep: &Deep, words: &[u64], rec: &Record, types: &mut Namer<'_>) -> (String, serde_json::Value) {
    match deep {
        Deep::Pointer { .. } if words.first().is_none_or(|&p| p == 0) => ("nil".into(), serde_json::Value::Null),
        Deep::Pointer { target } => {
            let (t, j) = part(target, rec, types);
            (format!("&{t}"), j)
        }
        Deep::Slice { elems } => {
            let len = words.get(1).copied().unwrap_or(0);
            let shown: Vec<(String, serde_json::Value)> =
                elems.iter().take(usize::try_from(len).unwrap_or(usize::MAX)).map(|e| part(e, rec, types)).collect();
            let texts: Vec<&str> = shown.iter().map(|(t, _)| t.as_str()).collect();
            let json: Vec<serde_json::Value> = shown.iter().map(|(_, j)| j.clone()).collect();
            if len as usize > shown.len() {
                (format!("[{} …] (len={len})", texts.join(" ")), serde_json::json!({"len": len, "elements": json}))
            } else {
                (format!("[{}]", texts.join(" ")), serde_json::Value::Array(json))
            }
        }
    }
}

fn part(p: &Part, rec: &Record, types: &mut Namer<'_>) -> (String, serde_json::Value) {
    match p {
        Part::Scalar { at, shift, scalar } => {
            let b = word_at(rec, *at) >> (8 * u32::from(*shift));
            match *scalar {
                Scalar::Bool => (((b & 0xff) != 0).to_string(), serde_json::json!(b & 0xff != 0)),
                Scalar::Int { size, signed } => {
                    let bits = 8 * u32::from(size.clamp(1, 8));
                    if signed {
                        let v = ((b << (64 - bits)) as i64) >> (64 - bits);
                        (v.to_string(), serde_json::json!(v))
                    } else {
                        let v = if bits == 64 { b } else { b & ((1u64 << bits) - 1) };
                        (v.to_string(), serde_json::json!(v))
                    }
                }
                Scalar::Float64 => float_text(f64::from_bits(b)),
                Scalar::Float32 => float_text(f64::from(f32::from_bits(b as u32))),
            }
        }
        Part::Str { at, max } => {
            let len = word_at(rec, *at);
            let n = (len as usize).min(usize::from(*max));
            let start = usize::from(*at) + 8;
            let bytes = rec.data.get(start..start + n).unwrap_or(&[]);
            let cut = len > u64::from(*max);
            let json = match std::str::from_utf8(bytes) {
                Ok(s) if !cut => serde_json::json!(s),
                _ => serde_json::json!({"value": String::from_utf8_lossy(bytes), "len": len}),
            };
            (quote(bytes, cut), json)
        }
        Part::Ptr { at, target } => match (word_at(rec, *at), target) {
            (0, _) => ("nil".into(), serde_json::Value::Null),
            (_, Some(t)) => {
                let (t, j) = part(t, rec, types);
                (format!("&{t}"), j)
            }
            (v, None) => (format!("{v:#x}"), serde_json::json!(format!("{v:#x}"))),
        },
        Part::Struct { fields } => {
            let shown: Vec<(&String, (String, serde_json::Value))> =
                fields.iter().map(|(n, f)| (n, part(f, rec, types))).collect();
            let text = shown.iter().map(|(n, (t, _))| format!("{n}:{t}")).collect::<Vec<_>>().join(" ");
            let json: serde_json::Map<String, serde_json::Value> =
                shown.into_iter().map(|(n, (_, j))| (n.clone(), j)).collect();
            (format!("{{{text}}}"), serde_json::Value::Object(json))
        }
        Part::SliceLen { at, name } => {
            let len = word_at(rec, *at);
            (format!("{name}(len={len})"), serde_json::json!({"len": len}))
        }
        Part::Iface { at, empty } => {
            let (w, data) = (word_at(rec, *at), word_at(rec, *at + 8));
            if w == 0 {
                return ("nil".into(), serde_json::Value::Null);
            }
            match types(w, *empty) {
                Some(t) => (format!("{t}({data:#x})"), serde_json::json!({"type": t, "data": format!("{data:#x}")})),
                None => (
                    format!("{{{w:#x}, {data:#x}}}"),
                    serde_json::json!({"word": format!("{w:#x}"), "data": format!("{data:#x}")}),
                ),
            }
        }
        Part::Word { at } => {
            let v = word_at(rec, *at);
            let t = if v == 0 { "nil".to_string() } else { format!("{v:#x}") };
            (t.clone(), serde_json::json!(t))
        }
        Part::Skipped { name } => (format!("<{name}>"), serde_json::json!(format!("<{name}>"))),
    }
}

#[cfg(test)]
mod tests {
    use go_abi::dwarf::ShapeField;

    use super::*;

    fn field(name: &str, offset: u64, shape: Shape) -> ShapeField {
        ShapeField { name: name.into(), offset, shape }
    }

    fn int(size: u8) -> Shape {
        Shape::Scalar { name: "int".into(), scalar: Scalar::Int { size, signed: true } }
    }

    /// `struct { Name string; N int32; Ok bool; Next *T }` (size 32, word-aligned).
    fn item(next: Option<Box<Shape>>) -> Shape {
        Shape::Struct {
            name: "main.T".into(),
            size: 32,
            align: 8,
            fields: vec![
                field("Name", 0, Shape::String),
                field("N", 16, int(4)),
                field("Ok", 20, Shape::Scalar { name: "bool".into(), scalar: Scalar::Bool }),
                field("Next", 24, Shape::Pointer { name: "*main.T".into(), target: next }),
            ],
        }
    }

    fn record(words: &[(u16, u64)], bytes: &[(u16, &[u8])]) -> Record {
        let mut data = vec![0u8; 1024];
        for &(at, w) in words {
            data[usize::from(at)..][..8].copy_from_slice(&w.to_le_bytes());
        }
        for &(at, b) in bytes {
            data[usize::from(at)..][..b.len()].copy_from_slice(b);
        }
        Record {
            ring: 0,
            site: 0,
            kind: ring_abi::Kind::Entry,
            goid: 1,
            tsc: 0,
            sp: 0,
            ints: [0; 9],
            floats: [0; 8],
            data,
        }
    }

    #[test]
    fn a_pointer_shows_its_fields_from_where_the_plan_put_them() {
        let shape = Shape::Pointer { name: "*main.T".into(), target: Some(Box::new(item(None))) };
        let mut cp = CapturePlan::default();
        let mut dest = 16;
        let deep = super::plan(&shape, &[3], &mut cp, &mut dest, 8).expect("planned");
        // Name (length + 8 bytes), the word of N and Ok, Next: from register 3, no path.
        let fields: Vec<(i32, u16)> = cp
            .ops
            .iter()
            .map(|o| match o {
                Op::Field(f) => {
                    assert_eq!((f.reg, f.path.len()), (3, 0));
                    (f.off, f.dest)
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(fields, [(0, 16), (16, 32), (16, 40), (24, 48)]);
        assert_eq!(dest, 56);
        let rec = record(&[(16, 2), (32, 7 | (1 << 32)), (40, 7 | (1 << 32)), (48, 0)], &[(24, b"hi")]);
        let (text, json) = show(&deep, &[0xc000], &rec, &mut |_, _| None);
        assert_eq!(text, r#"&{Name:"hi" N:7 Ok:true Next:nil}"#);
        assert_eq!(json, serde_json::json!({"Name": "hi", "N": 7, "Ok": true, "Next": null}));
        assert_eq!(show(&deep, &[0], &rec, &mut |_, _| None).0, "nil");
    }

    #[test]
    fn slice_elements_are_read_only_below_the_length_and_the_budget_holds() {
        let shape = Shape::Slice { name: "[]main.T".into(), elem_size: 32, elem: Some(Box::new(item(None))) };
        let mut cp = CapturePlan::default();
        let mut dest = 0;
        let deep = super::plan(&shape, &[0, 1, 2], &mut cp, &mut dest, 8).expect("planned");
        let Deep::Slice { elems } = &deep else { panic!("{deep:?}") };
        assert_eq!(elems.len(), MAX_ELEMS as usize);
        for o in &cp.ops {
            let Op::Field(f) = o else { panic!("{o:?}") };
            let i = f.off as u64 / 32;
            assert_eq!(f.when, [When::above(1, i)], "element {i} only when the length is above it");
        }
        assert!(dest <= BUDGET);
        // Length 1: one element shown; length 20: eight, and the length.
        let rec = record(&[], &[]);
        assert_eq!(show(&deep, &[0xc000, 1, 1], &rec, &mut |_, _| None).0, r#"[{Name:"" N:0 Ok:false Next:nil}]"#);
        let (text, json) = show(&deep, &[0xc000, 20, 20], &rec, &mut |_, _| None);
        assert!(text.ends_with("…] (len=20)"), "{text}");
        assert_eq!(json["len"], 20);
        assert_eq!(json["elements"].as_array().map(Vec::len), Some(8));
        // Too large an element for the budget: nothing planned, the header is shown.
        let big = Shape::Struct {
            name: "main.Big".into(),
            size: 2048,
            align: 8,
            fields: (0..100).map(|i| field(&format!("S{i}"), 16 * i, Shape::String)).collect(),
        };
        let shape = Shape::Slice { name: "[]main.Big".into(), elem_size: 2048, elem: Some(Box::new(big)) };
        let mut cp = CapturePlan::default();
        let deep = super::plan(&shape, &[0, 1, 2], &mut cp, &mut 0, 64);
        assert!(deep.is_some_and(|d| matches!(d, Deep::Slice { ref elems } if elems.len() == 1)));
    }

    #[test]
    fn narrow_structs_are_not_read_field_by_field() {
        let narrow = Shape::Struct {
            name: "main.Pair".into(),
            size: 8,
            align: 4,
            fields: vec![field("A", 0, int(4)), field("B", 4, int(4))],
        };
        let shape = Shape::Pointer { name: "*main.Pair".into(), target: Some(Box::new(narrow)) };
        let mut cp = CapturePlan::default();
        assert!(super::plan(&shape, &[0], &mut cp, &mut 0, 8).is_none());
        assert!(cp.ops.is_empty());
    }
}
