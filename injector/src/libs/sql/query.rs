//! What a span can say of a query without a SQL parser: its operation and the table it
//! works on (`db.operation.name`, `db.collection.name`, the span name), and the text with
//! every literal replaced by `?` (`db.query.text` when asked for, sanitized). A lexer that
//! knows SQL's quoting (strings, `E''` escapes, dollar quotes, quoted identifiers,
//! comments) is enough for both, and never fails: text it does not understand gives no
//! operation, never a literal in a name.

/// One lexical unit of a query.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token<'q> {
    /// A keyword or an unquoted identifier (possibly `schema.table`).
    Word(&'q str),
    /// A `"quoted"` identifier, as written.
    Quoted(&'q str),
    /// A string, number, dollar-quoted or bit-string literal.
    Literal,
    /// A `$1` or `?` or `:name` placeholder, as written.
    Placeholder(&'q str),
    /// Anything else: operators, punctuation (one character).
    Punct(&'q str),
}

/// The tokens of `q` with the byte range each covers; comments and space are dropped.
fn lex(q: &str) -> Vec<(Token<'_>, std::ops::Range<usize>)> {
    let b = q.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let start = i;
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        // -- line comment; /* block comment */ (PostgreSQL nests them).
        if c == b'-' && b.get(i + 1) == Some(&b'-') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0usize;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            continue;
        }
        // 'string' with '' inside; E'..' (backslash escapes), B'..', X'..', N'..'.
        let prefixed =
            matches!(c, b'e' | b'E' | b'b' | b'B' | b'x' | b'X' | b'n' | b'N') && b.get(i + 1) == Some(&b'\'');
        if c == b'\'' || prefixed {
            let backslash = matches!(c, b'e' | b'E');
            i += if prefixed { 2 } else { 1 };
            while i < b.len() {
                if backslash && b[i] == b'\\' {
                    i += 2;
                } else if b[i] == b'\'' {
                    if b.get(i + 1) == Some(&b'\'') {
                        i += 2;
                    } else {
                        i += 1;
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push((Token::Literal, start..i.min(b.len())));
            continue;
        }
        if c == b'"' || c == b'`' {
            i += 1;
            while i < b.len() && b[i] != c {
                i += 1;
            }
            i = (i + 1).min(b.len());
            out.push((Token::Quoted(&q[start..i]), start..i));
            continue;
        }
        if c == b'$' {
            // $1 placeholder, or $tag$ ... $tag$ / $$ ... $$ dollar quoting.
            if b.get(i + 1).is_some_and(u8::is_ascii_digit) {
                i += 1;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
                out.push((Token::Placeholder(&q[start..i]), start..i));
                continue;
            }
            let mut j = i + 1;
            while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
                j += 1;
            }
            if b.get(j) == Some(&b'$') {
                let tag = &q[i..=j];
                let body = j + 1;
                let end = q[body..].find(tag).map_or(b.len(), |k| body + k + tag.len());
                out.push((Token::Literal, start..end));
                i = end;
                continue;
            }
        }
        if c == b'?' {
            i += 1;
            out.push((Token::Placeholder("?"), start..i));
            continue;
        }
        if c == b':'
            && b.get(i + 1).is_some_and(|n| n.is_ascii_alphabetic() || *n == b'_')
            && b.get(i.wrapping_sub(1)) != Some(&b':')
        {
            i += 1;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            out.push((Token::Placeholder(&q[start..i]), start..i));
            continue;
        }
        if c.is_ascii_digit() || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit)) {
            // 12, 1.5, .5, 1e-3, 0x1F.
            i += 1;
            while i < b.len() {
                let d = b[i];
                let exp_sign = (d == b'-' || d == b'+') && matches!(b[i - 1], b'e' | b'E');
                if d.is_ascii_alphanumeric() || d == b'.' || d == b'_' || exp_sign {
                    i += 1;
                } else {
                    break;
                }
            }
            out.push((Token::Literal, start..i));
            continue;
        }
        if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 {
            while i < b.len()
                && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'.' || b[i] == b'$' || b[i] >= 0x80)
            {
                i += 1;
            }
            out.push((Token::Word(&q[start..i]), start..i));
            continue;
        }
        let w = q[i..].chars().next().map_or(1, char::len_utf8);
        i += w;
        out.push((Token::Punct(&q[start..i]), start..i));
    }
    out
}

/// `q` with every literal replaced by `?` (placeholders, identifiers and keywords kept);
/// a literal cut off by the capture limit is replaced too.
pub fn sanitize(q: &str) -> String {
    let b = q.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut at = 0;
    for (t, r) in lex(q) {
        if t == Token::Literal {
            out.extend_from_slice(b.get(at..r.start).unwrap_or_default());
            out.push(b'?');
            at = r.end;
        }
    }
    out.extend_from_slice(b.get(at..).unwrap_or_default());
    String::from_utf8_lossy(&out).into_owned()
}

/// What a query does: its operation (upper case) and the table it works on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub operation: Option<String>,
    pub collection: Option<String>,
}

/// Operations whose statement names the table after one of these words.
const OPERATIONS: &[&str] = &[
    "SELECT",
    "INSERT",
    "UPDATE",
    "DELETE",
    "MERGE",
    "UPSERT",
    "REPLACE",
    "CREATE",
    "ALTER",
    "DROP",
    "TRUNCATE",
    "COPY",
    "CALL",
    "EXPLAIN",
    "BEGIN",
    "COMMIT",
    "ROLLBACK",
    "SAVEPOINT",
    "RELEASE",
    "SET",
    "SHOW",
    "GRANT",
    "REVOKE",
    "VACUUM",
    "ANALYZE",
    "LOCK",
    "PREPARE",
    "EXECUTE",
    "DEALLOCATE",
    "LISTEN",
    "NOTIFY",
    "WITH",
    "VALUES",
];

fn ident(t: &Token<'_>) -> Option<String> {
    match t {
        Token::Word(w) => Some((*w).to_string()),
        Token::Quoted(q) => Some((*q).to_string()),
        _ => None,
    }
}

fn is_kw(t: Option<&Token<'_>>, kw: &str) -> bool {
    matches!(t, Some(Token::Word(w)) if w.eq_ignore_ascii_case(kw))
}

/// The operation and main table of the first statement of `q`. A `WITH` query is named
/// by the statement after its common table expressions.
#[cfg(test)]
pub fn summarize(q: &str) -> Summary {
    summarize_tokens(&tokens(q))
}

/// [`summarize`] and, for a query with an operation, [`query_summary`], lexing once.
pub fn summarize_with_summary(q: &str) -> (Summary, Option<(String, usize)>) {
    let toks = tokens(q);
    let s = summarize_tokens(&toks);
    let text = s.operation.as_deref().map(|op| summary_tokens(&toks, op));
    (s, text)
}

fn tokens(q: &str) -> Vec<Token<'_>> {
    lex(q).into_iter().map(|(t, _)| t).collect()
}

fn summarize_tokens(toks: &[Token<'_>]) -> Summary {
    let mut i = 0;
    let upper = |t: Option<&Token<'_>>| match t {
        Some(Token::Word(w)) => Some(w.to_ascii_uppercase()),
        _ => None,
    };
    let Some(mut op) = upper(toks.first()).filter(|w| OPERATIONS.contains(&w.as_str())) else {
        return Summary::default();
    };
    if op == "WITH" {
        // Skip `name [(cols)] AS [NOT] [MATERIALIZED] ( ... )`, comma-separated, to the
        // statement's own keyword at depth 0.
        let mut depth = 0i32;
        i = 1;
        let mut found = None;
        while i < toks.len() {
            match &toks[i] {
                Token::Punct("(") => depth += 1,
                Token::Punct(")") => depth -= 1,
                Token::Word(w) if depth == 0 => {
                    let u = w.to_ascii_uppercase();
                    if matches!(u.as_str(), "SELECT" | "INSERT" | "UPDATE" | "DELETE" | "MERGE") {
                        found = Some(u);
                        break;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        match found {
            Some(u) => op = u,
            None => return Summary { operation: Some(op), collection: None },
        }
    }
    let rest = &toks[i + 1..];
    let after = |kw: &str| -> Option<String> {
        let mut depth = 0i32;
        for (k, t) in rest.iter().enumerate() {
            match t {
                Token::Punct("(") => depth += 1,
                Token::Punct(")") => depth -= 1,
                Token::Word(w) if depth == 0 && w.eq_ignore_ascii_case(kw) => {
                    let mut j = k + 1;
                    while is_kw(rest.get(j), "ONLY") || is_kw(rest.get(j), "LATERAL") {
                        j += 1;
                    }
                    return rest.get(j).and_then(ident);
                }
                _ => {}
            }
        }
        None
    };
    let collection = match op.as_str() {
        "SELECT" => after("FROM"),
        "INSERT" | "REPLACE" | "UPSERT" | "MERGE" => after("INTO"),
        "DELETE" => after("FROM"),
        "UPDATE" | "COPY" | "LOCK" | "TRUNCATE" => {
            let mut j = 0;
            while is_kw(rest.get(j), "ONLY") || is_kw(rest.get(j), "TABLE") {
                j += 1;
            }
            rest.get(j).and_then(ident)
        }
        "CREATE" | "ALTER" | "DROP" => {
            // CREATE [UNIQUE] [TEMP] TABLE|INDEX|VIEW [IF [NOT] EXISTS] name: the object kind
            // joins the operation (`CREATE TABLE`), the name is the collection for tables.
            let mut j = 0;
            while matches!(
                upper(rest.get(j)).as_deref(),
                Some("OR" | "REPLACE" | "UNIQUE" | "TEMP" | "TEMPORARY" | "UNLOGGED" | "GLOBAL" | "LOCAL")
            ) {
                j += 1;
            }
            let kind = upper(rest.get(j));
            if let Some(k) = &kind {
                op = format!("{op} {k}");
            }
            j += 1;
            while matches!(upper(rest.get(j)).as_deref(), Some("IF" | "NOT" | "EXISTS" | "CONCURRENTLY")) {
                j += 1;
            }
            if kind.as_deref() == Some("TABLE") { rest.get(j).and_then(ident) } else { None }
        }
        _ => None,
    };
    Summary { operation: Some(op), collection }
}

/// Words that end a `FROM a, b` list's table (or alias) and start the next clause.
const CLAUSES: &[&str] = &[
    "WHERE",
    "JOIN",
    "INNER",
    "LEFT",
    "RIGHT",
    "FULL",
    "CROSS",
    "NATURAL",
    "ON",
    "USING",
    "GROUP",
    "ORDER",
    "LIMIT",
    "OFFSET",
    "HAVING",
    "WINDOW",
    "UNION",
    "EXCEPT",
    "INTERSECT",
    "FOR",
    "RETURNING",
    "SET",
    "VALUES",
    "SELECT",
];

/// The conventions' `db.query.summary` of `q`, whose first operation is `op` (as
/// [`summarize`] named it): each operation and the tables it names, in the order they
/// appear (`SELECT orders customers`, `INSERT shipping_details SELECT orders`), an
/// operation repeated with no table between (a subquery's) once; and how many tables.
#[cfg(test)]
pub fn query_summary(q: &str, op: &str) -> (String, usize) {
    summary_tokens(&tokens(q), op)
}

fn summary_tokens(toks: &[Token<'_>], op: &str) -> (String, usize) {
    let word = |k: usize| match toks.get(k) {
        Some(Token::Word(w)) => Some(w.to_ascii_uppercase()),
        _ => None,
    };
    let mut parts = vec![op.to_string()];
    let mut tables = 0;
    let mut last_op = op.split(' ').next().unwrap_or(op).to_string();
    let mut table_since_op = false;
    // From the start: the first operation is not repeated (it is `last_op`), and an
    // UPDATE's table follows its keyword.
    let mut k = 0;
    while k < toks.len() {
        let w = word(k);
        match w.as_deref() {
            Some(o @ ("SELECT" | "INSERT" | "UPDATE" | "DELETE" | "MERGE")) => {
                if o != last_op || table_since_op {
                    parts.push(o.to_string());
                    last_op = o.to_string();
                    table_since_op = false;
                }
                if o == "UPDATE" {
                    k += 1;
                    while matches!(word(k).as_deref(), Some("ONLY")) {
                        k += 1;
                    }
                    if let Some(t) = toks.get(k).and_then(ident) {
                        parts.push(t);
                        tables += 1;
                        table_since_op = true;
                    }
                }
            }
            Some("FROM" | "JOIN" | "INTO" | "USING") => {
                // `FROM a [AS] [x], b ...`: each table of the list.
                loop {
                    k += 1;
                    while matches!(word(k).as_deref(), Some("ONLY" | "LATERAL")) {
                        k += 1;
                    }
                    let Some(t) = toks.get(k).and_then(ident) else { break };
                    if word(k).is_some_and(|u| CLAUSES.contains(&u.as_str()) || u == "SELECT") {
                        break;
                    }
                    parts.push(t);
                    tables += 1;
                    table_since_op = true;
                    if is_kw(toks.get(k + 1), "AS") {
                        k += 1;
                    }
                    if matches!(toks.get(k + 1), Some(Token::Word(_) | Token::Quoted(_)))
                        && !word(k + 1).is_some_and(|u| CLAUSES.contains(&u.as_str()))
                    {
                        k += 1;
                    }
                    if !matches!(toks.get(k + 1), Some(Token::Punct(","))) {
                        break;
                    }
                    k += 1;
                }
            }
            _ => {}
        }
        k += 1;
    }
    (parts.join(" "), tables)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_become_question_marks() {
        let cases = [
            ("SELECT * FROM t WHERE a = 'x' AND b = 42", "SELECT * FROM t WHERE a = ? AND b = ?"),
            ("SELECT 'it''s', E'a\\'b', 1.5e-3, .5, 0x1F", "SELECT ?, ?, ?, ?, ?"),
            ("SELECT $1, $2 FROM t WHERE c = ?", "SELECT $1, $2 FROM t WHERE c = ?"),
            ("SELECT $$ a 'b' $$, $x$ y $x$", "SELECT ?, ?"),
            ("SELECT col1, t2.c3 FROM t2", "SELECT col1, t2.c3 FROM t2"),
            ("SELECT \"a'b\" FROM t -- 'c'\n WHERE x = 'open", "SELECT \"a'b\" FROM t -- 'c'\n WHERE x = ?"),
            ("SELECT a::int, :name FROM t", "SELECT a::int, :name FROM t"),
            ("", ""),
        ];
        for (q, want) in cases {
            assert_eq!(sanitize(q), want, "{q}");
        }
    }

    #[test]
    fn operation_and_table() {
        let s = |op: &str, t: Option<&str>| Summary { operation: Some(op.into()), collection: t.map(Into::into) };
        let cases = [
            ("SELECT qty FROM items WHERE sku = $1", s("SELECT", Some("items"))),
            ("  select count(*) from public.items", s("SELECT", Some("public.items"))),
            ("SELECT (SELECT 1 FROM a) FROM b", s("SELECT", Some("b"))),
            ("INSERT INTO audit (sku, at) VALUES ($1, now())", s("INSERT", Some("audit"))),
            ("UPDATE items SET qty = qty + $1", s("UPDATE", Some("items"))),
            ("DELETE FROM \"Items\" WHERE 1=1", s("DELETE", Some("\"Items\""))),
            ("/* c */ WITH x AS (SELECT 1 FROM a) SELECT * FROM x", s("SELECT", Some("x"))),
            ("CREATE TABLE IF NOT EXISTS items (sku text)", s("CREATE TABLE", Some("items"))),
            ("CREATE UNIQUE INDEX i ON t (c)", s("CREATE INDEX", None)),
            ("BEGIN", s("BEGIN", None)),
            ("SELECT 1", s("SELECT", None)),
        ];
        for (q, want) in cases {
            assert_eq!(summarize(q), want, "{q}");
        }
        assert_eq!(summarize("FOO bar"), Summary::default());
        let cases = [
            ("SELECT qty FROM items WHERE sku = $1", "SELECT items", 1),
            ("SELECT * FROM orders o JOIN customers c ON o.c = c.id", "SELECT orders customers", 2),
            ("select a.x from a, b AS bb, c where a.y = bb.y", "SELECT a b c", 3),
            ("INSERT INTO shipping_details SELECT * FROM orders", "INSERT shipping_details SELECT orders", 2),
            ("SELECT (SELECT 1 FROM a) FROM b", "SELECT a b", 2),
            ("WITH x AS (SELECT 1 FROM a) SELECT * FROM x", "SELECT a SELECT x", 2),
            ("UPDATE items SET qty = 1 FROM audit WHERE 1=1", "UPDATE items audit", 2),
            ("DELETE FROM audit WHERE at < now()", "DELETE audit", 1),
            ("CREATE TABLE IF NOT EXISTS items (sku text)", "CREATE TABLE", 0),
            ("SELECT 1", "SELECT", 0),
            ("SELECT * FROM (SELECT 1) AS t", "SELECT", 0),
        ];
        for (q, want, n) in cases {
            let op = summarize(q).operation.expect("an operation");
            assert_eq!(query_summary(q, &op), (want.to_string(), n), "{q}");
        }
        assert_eq!(summarize("'x'"), Summary::default());
        assert_eq!(summarize(""), Summary::default());
    }

    /// Random text from SQL's significant characters (quotes, dollars, comments, digits,
    /// escapes) and multi-byte UTF-8: never a panic, and the sanitized text has no literal
    /// left in it.
    #[test]
    fn random_queries_never_panic_and_sanitize_fully() {
        const PIECES: &[&str] = &[
            "'", "''", "\"", "$", "$1", "$a$", "$$", "E'", "e'", "\\", "--", "\n", "/*", "*/", ":", "::", "?", "1",
            "2.5", "e", "-", "+", "x", "_", ".", " ", "SELECT", "FROM", "t", "é", "日本", "`", "(", ")", "0x1F", "B'",
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let n = (next() % 24) as usize;
            let q: String = (0..n).map(|_| PIECES[(next() % PIECES.len() as u64) as usize]).collect();
            let clean = sanitize(&q);
            let _ = summarize(&q);
            let _ = query_summary(&q, "SELECT");
            assert!(lex(&clean).iter().all(|(t, _)| *t != Token::Literal), "{q:?} sanitized to {clean:?}");
        }
    }

    #[test]
    fn any_bytes_lex_without_panicking() {
        for q in ["'", "$", "$a", "$a$", "E'\\", "/*", "/* /* */", "\"", "1e", "é'x'", "::", "-", "--"] {
            let _ = sanitize(q);
            let _ = summarize(q);
            let _ = query_summary(q, "SELECT");
        }
    }
}
