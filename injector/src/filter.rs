//! `--where`: which `--func` calls are shown, by a condition over their arguments and
//! results by name, `goroutine` and `duration` (`qty > 100 && sku != "x"`,
//! `duration > 2ms || err != nil`). Checked against every probed function's names before
//! anything is patched; evaluated on the collector's side, so a call it leaves out was
//! still recorded by the trampolines (the probe's cost) and paired, but neither formatted
//! nor exported.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::Value as Json;
use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
pub enum FilterError {
    #[error("--where: {what} at byte {at} of {text:?}")]
    Syntax { what: String, at: usize, text: String },
    #[error("--where: {function} has no {name:?}; its names: {names}")]
    Unknown { function: String, name: String, names: String },
}

#[derive(Debug, Clone, PartialEq)]
enum Lit {
    Num(f64),
    Str(String),
    Bool(bool),
    Nil,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, PartialEq)]
enum Expr {
    Or(Box<Expr>, Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Cmp(String, Cmp, Lit),
    /// A name alone: true when its value is true (a bool) or non-zero / non-empty.
    Truthy(String),
}

/// A parsed condition.
#[derive(Debug)]
pub struct Filter {
    expr: Expr,
    text: String,
    pub shown: AtomicU64,
    pub left_out: AtomicU64,
}

struct Parser<'a> {
    s: &'a str,
    at: usize,
}

impl Parser<'_> {
    fn err(&self, what: &str) -> FilterError {
        FilterError::Syntax { what: what.into(), at: self.at, text: self.s.into() }
    }
    fn ws(&mut self) {
        while let Some(c) = self.s[self.at..].chars().next().filter(|c| c.is_whitespace()) {
            self.at += c.len_utf8();
        }
    }
    fn eat(&mut self, tok: &str) -> bool {
        self.ws();
        if self.s[self.at..].starts_with(tok) {
            self.at += tok.len();
            true
        } else {
            false
        }
    }
    fn or(&mut self) -> Result<Expr, FilterError> {
        let mut e = self.and()?;
        while self.eat("||") {
            e = Expr::Or(Box::new(e), Box::new(self.and()?));
        }
        Ok(e)
    }
    fn and(&mut self) -> Result<Expr, FilterError> {
        let mut e = self.unary()?;
        while self.eat("&&") {
            e = Expr::And(Box::new(e), Box::new(self.unary()?));
        }
        Ok(e)
    }
    fn unary(&mut self) -> Result<Expr, FilterError> {
        if self.eat("!") && !self.s[self.at..].starts_with('=') {
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        if self.eat("(") {
            let e = self.or()?;
            if !self.eat(")") {
                return Err(self.err("a ')' expected"));
            }
            return Ok(e);
        }
        let name = self.name()?;
        let op = [("==", Cmp::Eq), ("!=", Cmp::Ne), ("<=", Cmp::Le), (">=", Cmp::Ge), ("<", Cmp::Lt), (">", Cmp::Gt)]
            .into_iter()
            .find(|(t, _)| self.eat(t))
            .map(|(_, c)| c);
        match op {
            Some(c) => Ok(Expr::Cmp(name, c, self.lit()?)),
            None => Ok(Expr::Truthy(name)),
        }
    }
    fn name(&mut self) -> Result<String, FilterError> {
        self.ws();
        let rest = &self.s[self.at..];
        let n = rest.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '~' || c == '.')).unwrap_or(rest.len());
        if n == 0 || rest.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(self.err("a name expected"));
        }
        self.at += n;
        Ok(rest[..n].to_string())
    }
    fn lit(&mut self) -> Result<Lit, FilterError> {
        self.ws();
        let rest = &self.s[self.at..];
        if let Some(body) = rest.strip_prefix('"') {
            let end = body.find('"').ok_or_else(|| self.err("an unterminated string"))?;
            self.at += end + 2;
            return Ok(Lit::Str(body[..end].to_string()));
        }
        for (word, lit) in [("true", Lit::Bool(true)), ("false", Lit::Bool(false)), ("nil", Lit::Nil)] {
            if rest.starts_with(word) && !rest[word.len()..].starts_with(|c: char| c.is_alphanumeric() || c == '_') {
                self.at += word.len();
                return Ok(lit);
            }
        }
        let n =
            rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '+')).unwrap_or(rest.len());
        let (num, unit) = rest[..n].split_at(rest[..n].find(|c: char| c.is_ascii_alphabetic()).unwrap_or(n));
        let scale = match unit {
            "" | "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            _ => return Err(self.err("a number, a duration (ns, us, ms, s), a string, true, false or nil expected")),
        };
        let v: f64 = num.parse().map_err(|_| self.err("a number, a string, true, false or nil expected"))?;
        self.at += n;
        Ok(Lit::Num(v * scale))
    }
}

fn names(e: &Expr, out: &mut Vec<String>) {
    match e {
        Expr::Or(a, b) | Expr::And(a, b) => {
            names(a, out);
            names(b, out);
        }
        Expr::Not(a) => names(a, out),
        Expr::Cmp(n, ..) | Expr::Truthy(n) => {
            if !out.contains(n) {
                out.push(n.clone());
            }
        }
    }
}

/// A value a name has in one call.
pub enum Val<'a> {
    Json(&'a Json),
    Num(f64),
}

fn compare(v: &Val<'_>, c: Cmp, lit: &Lit) -> bool {
    use std::cmp::Ordering as O;
    let ord = match (v, lit) {
        (Val::Num(x), Lit::Num(y)) => x.partial_cmp(y),
        (Val::Json(Json::Number(x)), Lit::Num(y)) => x.as_f64().and_then(|x| x.partial_cmp(y)),
        // A hex word (pointers, raw registers) against a number.
        (Val::Json(Json::String(s)), Lit::Num(y)) => {
            s.strip_prefix("0x").and_then(|h| u64::from_str_radix(h, 16).ok()).and_then(|x| (x as f64).partial_cmp(y))
        }
        (Val::Json(Json::String(s)), Lit::Str(t)) => Some(s.as_str().cmp(t.as_str())),
        (Val::Json(Json::Bool(b)), Lit::Bool(t)) => Some(b.cmp(t)),
        (Val::Json(Json::Null), Lit::Nil) => Some(O::Equal),
        // nil: a nil pointer (0x0), an error or interface that is null.
        (Val::Json(j), Lit::Nil) => Some(if is_nil(j) { O::Equal } else { O::Greater }),
        _ => None,
    };
    match (ord, c) {
        (Some(o), Cmp::Eq) => o == O::Equal,
        (Some(o), Cmp::Ne) => o != O::Equal,
        (None, Cmp::Ne) => true,
        (Some(o), Cmp::Lt) => o == O::Less,
        (Some(o), Cmp::Le) => o != O::Greater,
        (Some(o), Cmp::Gt) => o == O::Greater,
        (Some(o), Cmp::Ge) => o != O::Less,
        (None, _) => false,
    }
}

fn is_nil(j: &Json) -> bool {
    match j {
        Json::Null => true,
        Json::String(s) => s == "0x0" || s == "nil",
        Json::Object(o) => o.get("value").is_some_and(is_nil) || o.is_empty(),
        _ => false,
    }
}

fn truthy(v: &Val<'_>) -> bool {
    match v {
        Val::Num(x) => *x != 0.0,
        Val::Json(Json::Bool(b)) => *b,
        Val::Json(Json::Number(n)) => n.as_f64().is_some_and(|x| x != 0.0),
        Val::Json(Json::String(s)) => !s.is_empty() && s != "0x0",
        Val::Json(j) => !is_nil(j),
    }
}

fn eval<'v>(e: &Expr, get: &dyn Fn(&str) -> Option<Val<'v>>) -> bool {
    match e {
        Expr::Or(a, b) => eval(a, get) || eval(b, get),
        Expr::And(a, b) => eval(a, get) && eval(b, get),
        Expr::Not(a) => !eval(a, get),
        Expr::Cmp(n, c, lit) => get(n).is_some_and(|v| compare(&v, *c, lit)),
        Expr::Truthy(n) => get(n).is_some_and(|v| truthy(&v)),
    }
}

impl Filter {
    pub fn parse(text: &str) -> Result<Filter, FilterError> {
        let mut p = Parser { s: text, at: 0 };
        let expr = p.or()?;
        p.ws();
        if p.at != text.len() {
            return Err(p.err("'&&', '||' or the end expected"));
        }
        Ok(Filter { expr, text: text.to_string(), shown: AtomicU64::new(0), left_out: AtomicU64::new(0) })
    }

    /// Checks that every name is one of `function`'s (`known`: its argument and result
    /// names; `goroutine` and `duration` always are).
    pub fn check(&self, function: &str, known: &[String]) -> Result<(), FilterError> {
        let mut used = Vec::new();
        names(&self.expr, &mut used);
        for n in used {
            if n != "goroutine" && n != "duration" && !known.contains(&n) {
                let mut all: Vec<String> = known.to_vec();
                all.extend(["goroutine".into(), "duration".into()]);
                return Err(FilterError::Unknown { function: function.into(), name: n, names: all.join(", ") });
            }
        }
        Ok(())
    }

    /// Whether a call with these values is shown (and counts it).
    pub fn keep<'v>(&self, get: &dyn Fn(&str) -> Option<Val<'v>>) -> bool {
        let k = eval(&self.expr, get);
        if k { &self.shown } else { &self.left_out }.fetch_add(1, Ordering::Relaxed);
        k
    }

    pub fn text(&self) -> &str {
        &self.text
    }
}

static ACTIVE: OnceLock<Filter> = OnceLock::new();

/// The session's `--where`, if any.
pub fn active() -> Option<&'static Filter> {
    ACTIVE.get()
}

/// Parses `--where` and checks it against the names of every function `--func` probes
/// (its arguments and results; the argument registers without a signature), before
/// anything is patched.
pub fn install(text: Option<&str>, sites: &[crate::plan::ProbeSite]) -> Result<(), FilterError> {
    let Some(text) = text else { return Ok(()) };
    let f = Filter::parse(text)?;
    for s in sites.iter().filter(|s| s.role == crate::plan::Role::Func) {
        let known: Vec<String> = if s.typed {
            s.on_entry.values.iter().chain(&s.on_return.values).map(|v| v.name.clone()).collect()
        } else {
            go_abi::abi::INT_ARG_REGS.iter().map(|r| r.to_string()).collect()
        };
        f.check(&s.name, &known)?;
    }
    let _ = ACTIVE.set(f);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn keep(text: &str, vals: &[(&str, Json)], dur: Option<f64>) -> bool {
        let f = Filter::parse(text).unwrap();
        f.keep(&|n| {
            if n == "duration" {
                return dur.map(Val::Num);
            }
            vals.iter().find(|(k, _)| *k == n).map(|(_, v)| Val::Json(v))
        })
    }

    #[test]
    fn conditions_over_names() {
        let v = [("qty", json!(150)), ("sku", json!("sku-3")), ("err", json!(null)), ("ok", json!(true))];
        assert!(keep("qty > 100 && sku != \"x\"", &v, None));
        assert!(!keep("qty > 200 || sku == \"x\"", &v, None));
        assert!(keep("!(qty <= 100) && (ok || qty == 1)", &v, None));
        assert!(keep("err == nil && ok == true", &v, None));
        assert!(keep("duration >= 1.5ms", &v, Some(2e6)));
        assert!(!keep("duration > 2s", &v, Some(2e6)));
        assert!(!keep("duration > 1", &v, None), "entry-only calls have no duration");
        assert!(keep("ok", &v, None));
        assert!(keep(
            "err != nil || qty >= 150",
            &[("err", json!({"type": "*errors.errorString"})), ("qty", json!(1))],
            None
        ));
    }

    #[test]
    fn mistakes_are_errors_that_say_where() {
        for (text, needle) in [
            ("qty >", "a number"),
            ("qty > 1 &&", "a name"),
            ("(qty > 1", "')'"),
            ("qty > 1 junk", "the end"),
            ("sku == \"open", "unterminated"),
            ("duration > 3 days", "the end"),
            ("duration > 3h", "duration"),
        ] {
            let e = Filter::parse(text).unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
        // Nothing a user types makes it panic: multi-byte spaces and letters, stray bytes.
        for text in ["\u{a0}qty\u{a0}>\u{a0}1", "qty > 5µs", "é == \"ü\"", "\u{2003}", "(((", "!", "a.b ~ 1", "\"", ""]
        {
            let _ = Filter::parse(text);
        }
        assert!(Filter::parse("\u{a0}qty\u{3000}>\u{a0}1").is_ok());
        let f = Filter::parse("qtyy > 1").unwrap();
        let e = f.check("main.priceOf", &["sku".into(), "qty".into()]).unwrap_err().to_string();
        assert_eq!(e, "--where: main.priceOf has no \"qtyy\"; its names: sku, qty, goroutine, duration");
    }
}
