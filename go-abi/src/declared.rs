//! A signature the user declares in Go syntax (`(sku string, qty int, discount float64)
//! float64`), for functions whose binary has no DWARF: the names and types come from the
//! declaration, where each value lives from the register-ABI assignment, and the
//! assignment's argument frame must equal the pclntab's for the function, so a
//! declaration that cannot be the function's is refused before anything is patched.
//!
//! Types are those whose layout the declaration alone gives: the basic types, pointers,
//! slices, maps, channels, funcs, interfaces, arrays of these, and a few standard named
//! types (`time.Duration`, `context.Context`, `time.Time`...). A struct or another named
//! type is refused with what to write instead.

use crate::abi::{self, GoType, PointerKind, StructType};
use crate::signature::{Signature, Value, interface, scalar};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeclaredError {
    #[error("{what} at byte {at} of {text:?}")]
    Syntax { what: &'static str, at: usize, text: String },
    #[error(
        "unknown type {0:?}: declare its underlying type (int64 for a time.Duration-like int, *T for any pointer), or \
         use a build with DWARF"
    )]
    UnknownType(String),
    #[error(
        "{name}: the declared parameters and results take {declared} bytes of argument frame, the function's take \
         {actual}: the declaration is not this function's"
    )]
    Frame { name: String, declared: u64, actual: i32 },
}

/// A parsed declaration: parameters and results as (name, type as written, layout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declared {
    pub params: Vec<(String, String, GoType)>,
    pub results: Vec<(String, String, GoType)>,
}

/// Splits `main.priceOf(sku string) float64` into the name and the declaration, at the
/// first `(` that follows an identifier or a glob (a method's `(*T)` follows a dot).
pub fn split_pattern(pattern: &str) -> (&str, Option<&str>) {
    let b = pattern.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        if c == b'(' && i > 0 && (b[i - 1].is_ascii_alphanumeric() || b"_]*?".contains(&b[i - 1])) {
            return (pattern[..i].trim_end(), Some(&pattern[i..]));
        }
    }
    (pattern, None)
}

/// Parses `(params) results`.
pub fn parse(text: &str) -> Result<Declared, DeclaredError> {
    let err = |what, at| DeclaredError::Syntax { what, at, text: text.to_string() };
    let t = text.trim_start();
    let base = text.len() - t.len();
    if !t.starts_with('(') {
        return Err(err("expected `(`", base));
    }
    let close = matching(t, 0).ok_or_else(|| err("unbalanced `(`", base))?;
    let params = list(&t[1..close], base + 1, text, "~p")?;
    let rest = t[close + 1..].trim();
    let rest_at = text.len() - t[close + 1..].trim_start().len();
    let results = if rest.is_empty() {
        Vec::new()
    } else if rest.starts_with('(') {
        let end = matching(rest, 0).ok_or_else(|| err("unbalanced `(`", rest_at))?;
        if !rest[end + 1..].trim().is_empty() {
            return Err(err("text after the results", rest_at + end + 1));
        }
        list(&rest[1..end], rest_at + 1, text, "~r")?
    } else {
        let ty = layout(rest)?;
        vec![("~r0".to_string(), normal(rest), ty)]
    };
    Ok(Declared { params, results })
}

/// The signature of a function with pclntab argument size `args` (`name` for messages):
/// a pointer receiver first when the name is a method's (`pkg.(*T).M`).
pub fn signature(d: &Declared, name: &str, args: i32) -> Result<Signature, DeclaredError> {
    let mut params = d.params.clone();
    if let Some(recv) = pointer_receiver(name) {
        params.insert(0, ("recv".into(), recv, GoType::Pointer(PointerKind::Pointer)));
    }
    let inputs: Vec<GoType> = params.iter().map(|p| p.2.clone()).collect();
    let outputs: Vec<GoType> = d.results.iter().map(|p| p.2.clone()).collect();
    let a = abi::assign(&inputs, &outputs);
    if i64::try_from(a.arg_frame_size()).ok() != Some(i64::from(args)) {
        return Err(DeclaredError::Frame { name: name.into(), declared: a.arg_frame_size(), actual: args });
    }
    let value = |(n, t, ty): &(String, String, GoType), location| Value {
        name: n.clone(),
        type_name: t.clone(),
        location,
        interface: interface(ty),
        scalar: scalar(ty),
    };
    Ok(Signature {
        params: params.iter().zip(a.params).map(|(p, l)| value(p, l)).collect(),
        results: d.results.iter().zip(a.results).map(|(p, l)| value(p, l)).collect(),
    })
}

/// `*T` for `pkg.(*T).M`.
fn pointer_receiver(name: &str) -> Option<String> {
    let start = name.find(".(*")? + 3;
    let end = start + name[start..].find(')')?;
    Some(format!("*{}", &name[start..end]))
}

/// The index of the bracket closing the one at `open`.
fn matching(s: &str, open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in s.char_indices().skip_while(|(i, _)| *i < open) {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// Top-level comma-separated parts of `s`, with their offsets.
fn parts(s: &str) -> Vec<(usize, &str)> {
    let (mut out, mut depth, mut from) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push((from, &s[from..i]));
                from = i + 1;
            }
            _ => {}
        }
    }
    out.push((from, &s[from..]));
    out
}

/// A parameter list: `a, b int, s string` (names, a type for each run) or `int, string`
/// (types only: named `prefix0`, `prefix1`...).
fn list(s: &str, at: usize, text: &str, prefix: &str) -> Result<Vec<(String, String, GoType)>, DeclaredError> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    let entries: Vec<(usize, &str)> = parts(s).into_iter().map(|(o, p)| (at + o, p.trim())).collect();
    // Named when some entry is `name type`: its first word an identifier, then more.
    let split = |e: &str| -> Option<(String, String)> {
        let (n, t) = e.split_once(|c: char| c.is_whitespace())?;
        let ident = n.chars().next().is_some_and(|c| c.is_alphabetic() || c == '_')
            && n.chars().all(|c| c.is_alphanumeric() || c == '_');
        (ident && !t.trim().is_empty()).then(|| (n.to_string(), t.trim().to_string()))
    };
    let named = entries.iter().any(|(_, e)| split(e).is_some() && !e.starts_with("chan ") && !e.starts_with("func"));
    let mut out = Vec::new();
    if !named {
        for (i, (o, e)) in entries.iter().enumerate() {
            if e.is_empty() {
                return Err(DeclaredError::Syntax { what: "empty parameter", at: *o, text: text.into() });
            }
            out.push((format!("{prefix}{i}"), normal(e), layout(e)?));
        }
        return Ok(out);
    }
    let mut waiting: Vec<String> = Vec::new();
    for (o, e) in entries {
        match split(e) {
            Some((n, t)) => {
                let ty = layout(&t)?;
                for w in waiting.drain(..) {
                    out.push((w, normal(&t), ty.clone()));
                }
                out.push((n, normal(&t), ty));
            }
            None if !e.is_empty() && e.chars().all(|c| c.is_alphanumeric() || c == '_') => waiting.push(e.to_string()),
            None => return Err(DeclaredError::Syntax { what: "expected `name type`", at: o, text: text.into() }),
        }
    }
    if !waiting.is_empty() {
        return Err(DeclaredError::Syntax {
            what: "a parameter name without a type",
            at: at + s.len(),
            text: text.into(),
        });
    }
    Ok(out)
}

/// A type's text with runs of spaces made one.
fn normal(t: &str) -> String {
    t.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The layout of a type written in Go syntax.
fn layout(t: &str) -> Result<GoType, DeclaredError> {
    let t = t.trim();
    let unknown = || DeclaredError::UnknownType(normal(t));
    let ptr = |k| Ok(GoType::Pointer(k));
    if t.starts_with('*') {
        return ptr(PointerKind::Pointer);
    }
    if let Some(e) = t.strip_prefix("[]") {
        layout(e)?;
        return Ok(GoType::Slice);
    }
    if t.starts_with("map[") {
        return ptr(PointerKind::Map);
    }
    if t.starts_with("chan ") || t.starts_with("chan<-") || t.starts_with("<-chan") {
        return ptr(PointerKind::Chan);
    }
    if t.starts_with("func(") || t == "func()" {
        return ptr(PointerKind::Func);
    }
    if t.starts_with('[') {
        let end = t.find(']').ok_or_else(unknown)?;
        let len: u64 = t[1..end].trim().parse().map_err(|_| unknown())?;
        return Ok(GoType::array(len, layout(&t[end + 1..])?));
    }
    if let Some(body) = t.strip_prefix("interface") {
        let body = body.trim();
        let inner = body.strip_prefix('{').and_then(|b| b.strip_suffix('}')).ok_or_else(unknown)?;
        return Ok(GoType::Interface { empty: inner.trim().is_empty() });
    }
    Ok(match t {
        "bool" => GoType::Bool,
        "int" | "int64" => GoType::int(8, true),
        "uint" | "uint64" => GoType::int(8, false),
        "int8" => GoType::int(1, true),
        "uint8" | "byte" => GoType::int(1, false),
        "int16" => GoType::int(2, true),
        "uint16" => GoType::int(2, false),
        "int32" | "rune" => GoType::int(4, true),
        "uint32" => GoType::int(4, false),
        "uintptr" => GoType::Uintptr,
        "float32" => GoType::Float32,
        "float64" => GoType::Float64,
        "complex64" => GoType::Complex64,
        "complex128" => GoType::Complex128,
        "string" => GoType::String,
        "unsafe.Pointer" => GoType::Pointer(PointerKind::UnsafePointer),
        "any" => GoType::Interface { empty: true },
        // Named types of the standard library whose layout is fixed.
        "error"
        | "context.Context"
        | "fmt.Stringer"
        | "io.Reader"
        | "io.Writer"
        | "io.ReadCloser"
        | "io.WriteCloser"
        | "net.Conn"
        | "net.Addr"
        | "http.ResponseWriter"
        | "http.Handler" => GoType::Interface { empty: false },
        "time.Duration" => GoType::int(8, true),
        "time.Month" | "time.Weekday" => GoType::int(8, true),
        "time.Time" => GoType::Struct(StructType::from_fields([
            ("wall", GoType::int(8, false)),
            ("ext", GoType::int(8, true)),
            ("loc", GoType::Pointer(PointerKind::Pointer)),
        ])),
        _ => return Err(unknown()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::{Location, Reg};

    fn regs(v: &Value) -> Vec<Reg> {
        match &v.location {
            Location::Registers(p) => p.iter().map(|p| p.reg).collect(),
            Location::Stack { .. } => Vec::new(),
        }
    }

    #[test]
    fn patterns_split_at_the_declaration() {
        assert_eq!(split_pattern("main.priceOf(sku string) float64"), ("main.priceOf", Some("(sku string) float64")));
        assert_eq!(split_pattern("main.(*Store).Get(k string)"), ("main.(*Store).Get", Some("(k string)")));
        assert_eq!(split_pattern("main.(*Store).Get"), ("main.(*Store).Get", None));
        assert_eq!(split_pattern("main.*"), ("main.*", None));
        assert_eq!(split_pattern("main.p*(a int)"), ("main.p*", Some("(a int)")));
        assert_eq!(split_pattern("main.f ()"), ("main.f ()", None));
    }

    #[test]
    fn named_grouped_and_unnamed_lists() {
        let d = parse("(sku string, qty int, discount float64) float64").unwrap();
        let names: Vec<&str> = d.params.iter().map(|p| p.0.as_str()).collect();
        assert_eq!(names, ["sku", "qty", "discount"]);
        assert_eq!(d.results[0].0, "~r0");
        let d = parse("(a, b int, s []byte) (n int, err error)").unwrap();
        let got: Vec<(&str, &str)> = d.params.iter().map(|p| (p.0.as_str(), p.1.as_str())).collect();
        assert_eq!(got, [("a", "int"), ("b", "int"), ("s", "[]byte")]);
        assert_eq!(d.results[1].1, "error");
        let d = parse("(int, map[string]int, func(int) int) (int, bool)").unwrap();
        assert_eq!(d.params.len(), 3);
        assert_eq!(d.results.iter().map(|p| p.0.as_str()).collect::<Vec<_>>(), ["~r0", "~r1"]);
        assert_eq!(parse("()").unwrap(), Declared { params: vec![], results: vec![] });
    }

    #[test]
    fn registers_follow_the_abi() {
        // Go 1.21+ amd64: sku in RAX, RBX; qty in RCX; discount in X0; the result in X0.
        let d = parse("(sku string, qty int, discount float64) float64").unwrap();
        // The spill area for the register arguments: 16 + 8 + 8 bytes.
        let s = signature(&d, "main.priceOf", 32).unwrap();
        assert_eq!(regs(&s.params[0]), [Reg::Rax, Reg::Rbx]);
        assert_eq!(regs(&s.params[1]), [Reg::Rcx]);
        assert_eq!(regs(&s.params[2]), [Reg::X(0)]);
        assert_eq!(regs(&s.results[0]), [Reg::X(0)]);
        // A method's pointer receiver comes first.
        let s = signature(&parse("(k string)").unwrap(), "main.(*Store).Get", 24).unwrap();
        assert_eq!((s.params[0].type_name.as_str(), regs(&s.params[1])), ("*Store", vec![Reg::Rbx, Reg::Rcx]));
    }

    #[test]
    fn a_declaration_of_another_frame_is_refused() {
        // Ten ints: the tenth on the stack (8 bytes), nine spill slots (72).
        let ten = parse("(a, b, c, d, e, f, g, h, i, j int)").unwrap();
        assert!(signature(&ten, "main.f", 80).is_ok());
        assert!(matches!(signature(&ten, "main.f", 72), Err(DeclaredError::Frame { declared: 80, actual: 72, .. })));
    }

    #[test]
    fn bad_declarations_say_what_is_wrong() {
        for bad in ["sku string", "(sku string", "(a, b)x y", "(a b c)", "(x Item)", "(a int) (b", "(,)", "(a,)"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert_eq!(parse("(p Point)"), Err(DeclaredError::UnknownType("Point".into())));
        // Never a panic, whatever the text.
        for s in ["(", ")", "()(", "(]", "([", "(a [x]int)", "(a [99999999999999999999]int)", "(é ü)", "(a\u{0}b int)"]
        {
            let _ = parse(s);
        }
    }
}
