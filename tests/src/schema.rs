//! inject's JSON output checked against its published schemas (docs/schema/): the tests
//! read JSON lines and summaries only through these helpers, so what inject writes and
//! what the schemas document cannot drift apart unnoticed.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// One of the schemas in docs/schema/.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schema {
    /// A line of `--output jsonl`.
    Jsonl,
    /// The `--summary-json` file.
    Summary,
    /// A line of `--stats --output jsonl`.
    Stats,
}

impl Schema {
    pub fn path(self) -> std::path::PathBuf {
        let name = match self {
            Schema::Jsonl => "jsonl.schema.json",
            Schema::Summary => "summary.schema.json",
            Schema::Stats => "stats.schema.json",
        };
        xtask::workspace_root().join("docs/schema").join(name)
    }

    /// The compiled schema, itself checked against the draft 2020-12 meta-schema.
    fn validator(self) -> Result<&'static jsonschema::Validator> {
        static JSONL: OnceLock<Result<jsonschema::Validator, String>> = OnceLock::new();
        static SUMMARY: OnceLock<Result<jsonschema::Validator, String>> = OnceLock::new();
        static STATS: OnceLock<Result<jsonschema::Validator, String>> = OnceLock::new();
        let cell = match self {
            Schema::Jsonl => &JSONL,
            Schema::Summary => &SUMMARY,
            Schema::Stats => &STATS,
        };
        let compiled = cell.get_or_init(|| {
            let path = self.path();
            let text = std::fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
            let schema: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            jsonschema::draft202012::new(&schema).map_err(|e| format!("{}: not a valid schema: {e}", path.display()))
        });
        compiled.as_ref().map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Fails with every violation (where in the value, and why) when `v` does not match.
    pub fn check(self, v: &Value) -> Result<()> {
        let problems: Vec<String> =
            self.validator()?.iter_errors(v).map(|e| format!("at {:?}: {e}", e.instance_path().to_string())).collect();
        if problems.is_empty() {
            return Ok(());
        }
        let mut text = v.to_string();
        if text.len() > 600 {
            let cut = (0..=600).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
            text.truncate(cut);
            text.push('…');
        }
        bail!("does not match {}:\n  {}\nin {text}", self.path().display(), problems.join("\n  "))
    }
}

/// Parses one JSON line of inject's and checks it against the JSON lines schema.
pub fn parse_line(line: &str) -> Result<Value> {
    let v: Value = serde_json::from_str(line).with_context(|| format!("not JSON: {line:?}"))?;
    Schema::Jsonl.check(&v)?;
    Ok(v)
}

/// Every line of a `--output jsonl` text, each checked against the schema.
pub fn parse_jsonl(text: &str) -> Result<Vec<Value>> {
    text.lines().enumerate().map(|(i, l)| parse_line(l).with_context(|| format!("JSON line {}", i + 1))).collect()
}

/// Reads a `--output-file` of JSON lines, every line checked against the schema.
pub fn read_jsonl(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_jsonl(&text).with_context(|| path.display().to_string())
}

/// Checks every line of a `--output-file` of JSON lines and hands it to `f`, one at a time
/// (files of millions of calls); returns how many lines there were.
pub fn for_each_line(path: &Path, mut f: impl FnMut(Value) -> Result<()>) -> Result<usize> {
    use std::io::BufRead;
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut n = 0;
    for line in std::io::BufReader::new(file).lines() {
        n += 1;
        f(parse_line(&line?).with_context(|| format!("{} line {n}", path.display()))?)?;
    }
    Ok(n)
}

/// Reads a `--summary-json` file, checked against the summary schema.
pub fn read_summary(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    Schema::Summary.check(&v).with_context(|| path.display().to_string())?;
    Ok(v)
}

/// Reads a `--stats --output jsonl` file, every line checked against the stats schema.
pub fn read_stats(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .map(|(i, l)| -> Result<Value> {
            let v: Value = serde_json::from_str(l).with_context(|| format!("not JSON: {l:?}"))?;
            Schema::Stats.check(&v).with_context(|| format!("{} line {}", path.display(), i + 1))?;
            Ok(v)
        })
        .collect()
}
