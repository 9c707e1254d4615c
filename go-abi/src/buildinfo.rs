//! `.go.buildinfo`: the Go version, module graph and build settings the linker embeds in
//! every Go executable (stripped ones too).

use crate::elf::Elf;

const MAGIC: &[u8; 14] = b"\xff Go buildinf:";
const HEADER_LEN: usize = 32;
const FLAG_INLINE_STRINGS: u8 = 2;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BuildInfoError {
    #[error("no Go build info (.go.buildinfo) found: not a Go executable")]
    NotFound,
    #[error("malformed Go build info: {reason}")]
    Malformed { reason: String },
}

fn malformed(reason: impl Into<String>) -> BuildInfoError {
    BuildInfoError::Malformed { reason: reason.into() }
}

/// One module of the main module's graph.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Module {
    pub path: String,
    pub version: String,
    pub sum: String,
    /// A `=>` replacement line that followed this module.
    pub replace: Option<Box<Module>>,
}

/// What `go version -m` shows.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BuildInfo {
    /// As the runtime reports it, e.g. `go1.21.13`.
    pub go_version: String,
    /// The main package's import path (`path` line).
    pub path: String,
    pub main: Option<Module>,
    pub deps: Vec<Module>,
    /// `build` lines, in order: `-buildmode`, `-ldflags`, `CGO_ENABLED`, `GOAMD64`, ...
    pub settings: Vec<(String, String)>,
}

impl BuildInfo {
    pub fn setting(&self, key: &str) -> Option<&str> {
        self.settings.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Reads the build info of an ELF executable: the section when named, else a scan of
    /// the writable segments for the 16-byte-aligned magic (sections can be stripped).
    pub fn from_elf(elf: &Elf<'_>) -> Result<Self, BuildInfoError> {
        if let Some((_, data)) = elf.section(".go.buildinfo")
            && data.starts_with(MAGIC)
        {
            return Self::decode(data, elf);
        }
        for seg in elf.segments.iter().filter(|s| s.writable) {
            let mut off = 0;
            while off + HEADER_LEN <= seg.data.len() {
                if seg.data[off..].starts_with(MAGIC) {
                    return Self::decode(&seg.data[off..], elf);
                }
                off += 16;
            }
        }
        Err(BuildInfoError::NotFound)
    }

    /// Decodes the blob that starts with the magic. `elf` resolves the pointer-based
    /// layout of Go 1.17 and older, which only serves to name the version in an error.
    pub fn decode(blob: &[u8], elf: &Elf<'_>) -> Result<Self, BuildInfoError> {
        if blob.len() < HEADER_LEN || !blob.starts_with(MAGIC) {
            return Err(malformed("header too short or bad magic"));
        }
        let ptr_size = blob[14] as usize;
        let flags = blob[15];
        let (version, modinfo) = if flags & FLAG_INLINE_STRINGS != 0 {
            let mut rest = &blob[HEADER_LEN..];
            let v = read_varint_string(&mut rest).ok_or_else(|| malformed("truncated version string"))?;
            let m = read_varint_string(&mut rest).ok_or_else(|| malformed("truncated module info"))?;
            (v.to_vec(), m.to_vec())
        } else {
            if ptr_size != 8 || flags & 1 != 0 {
                return Err(malformed(format!("pointer size {ptr_size}, flags {flags:#x}")));
            }
            let string_at = |ptr_field: usize| -> Option<Vec<u8>> {
                let hdr = u64::from_le_bytes(blob.get(ptr_field..ptr_field + 8)?.try_into().ok()?);
                let data = elf.read_u64(hdr)?;
                let len = elf.read_u64(hdr.checked_add(8)?)?;
                Some(elf.read(data, usize::try_from(len).ok().filter(|l| *l < 1 << 20)?)?.to_vec())
            };
            let v = string_at(16).ok_or_else(|| malformed("unreadable version pointer"))?;
            (v, string_at(24).unwrap_or_default())
        };
        let go_version = String::from_utf8(version).map_err(|_| malformed("version is not UTF-8"))?;
        if go_version.is_empty() {
            return Err(malformed("empty Go version"));
        }
        let mut info = BuildInfo { go_version, ..Default::default() };
        info.parse_modinfo(&strip_sentinels(&modinfo));
        Ok(info)
    }

    fn parse_modinfo(&mut self, text: &str) {
        for line in text.lines() {
            let mut f = line.split('\t');
            let tag = f.next().unwrap_or("");
            let fields: Vec<&str> = f.collect();
            let module = || Module {
                path: fields.first().copied().unwrap_or_default().to_string(),
                version: fields.get(1).copied().unwrap_or_default().to_string(),
                sum: fields.get(2).copied().unwrap_or_default().to_string(),
                replace: None,
            };
            match tag {
                "path" => self.path = fields.first().copied().unwrap_or_default().to_string(),
                "mod" => self.main = Some(module()),
                "dep" => self.deps.push(module()),
                "=>" => {
                    let target = match self.deps.last_mut() {
                        Some(d) => Some(d),
                        None => self.main.as_mut(),
                    };
                    if let Some(m) = target {
                        m.replace = Some(Box::new(module()));
                    }
                }
                "build" => {
                    let kv = fields.join("\t");
                    let (k, v) = split_setting(&kv);
                    self.settings.push((k, v));
                }
                _ => {}
            }
        }
    }
}

/// `key=value`, where either side may be a Go-quoted string (keys or values with spaces,
/// quotes or `=`).
fn split_setting(s: &str) -> (String, String) {
    let (key, rest) = if s.starts_with('"') {
        match unquote_prefix(s) {
            Some((k, rest)) => (k, rest.strip_prefix('=').unwrap_or(rest)),
            None => (s.to_string(), ""),
        }
    } else {
        match s.split_once('=') {
            Some((k, v)) => (k.to_string(), v),
            None => (s.to_string(), ""),
        }
    };
    let value = if rest.starts_with('"') {
        unquote_prefix(rest).map(|(v, _)| v).unwrap_or_else(|| rest.to_string())
    } else {
        rest.to_string()
    };
    (key, value)
}

/// Decodes a leading Go double-quoted string; returns it and what follows.
fn unquote_prefix(s: &str) -> Option<(String, &str)> {
    let mut out = String::new();
    let mut chars = s.char_indices().skip(1);
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, &s[i + 1..])),
            '\\' => {
                let (_, e) = chars.next()?;
                match e {
                    'n' => out.push('\n'),
                    't' => out.push('\t'),
                    'r' => out.push('\r'),
                    '\\' | '"' | '\'' => out.push(e),
                    'x' => {
                        let h: String = (0..2).filter_map(|_| chars.next().map(|(_, c)| c)).collect();
                        out.push(u8::from_str_radix(&h, 16).ok()? as char);
                    }
                    'u' | 'U' => {
                        let n = if e == 'u' { 4 } else { 8 };
                        let h: String = (0..n).filter_map(|_| chars.next().map(|(_, c)| c)).collect();
                        out.push(char::from_u32(u32::from_str_radix(&h, 16).ok()?)?);
                    }
                    other => {
                        out.push('\\');
                        out.push(other);
                    }
                }
            }
            c => out.push(c),
        }
    }
    None
}

/// The linker wraps modinfo in 16-byte sentinels; Go strips them when the 17th byte from
/// the end is a newline.
fn strip_sentinels(m: &[u8]) -> String {
    if m.len() >= 33 && m[m.len() - 17] == b'\n' {
        String::from_utf8_lossy(&m[16..m.len() - 16]).into_owned()
    } else {
        String::new()
    }
}

fn read_varint_string<'b>(rest: &mut &'b [u8]) -> Option<&'b [u8]> {
    let (len, n) = read_uvarint(rest)?;
    let len = usize::try_from(len).ok()?;
    let s = rest.get(n..n.checked_add(len)?)?;
    *rest = &rest[n + len..];
    Some(s)
}

/// Go's unsigned LEB128 varint; None when truncated or longer than 10 bytes.
pub(crate) fn read_uvarint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v: u64 = 0;
    for (i, &byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_with_quotes() {
        assert_eq!(split_setting("-buildmode=exe"), ("-buildmode".into(), "exe".into()));
        assert_eq!(split_setting("-ldflags=\"-s -w\""), ("-ldflags".into(), "-s -w".into()));
        assert_eq!(split_setting("CGO_ENABLED=1"), ("CGO_ENABLED".into(), "1".into()));
        assert_eq!(split_setting("\"a=b\"=\"c \\\"d\\\"\""), ("a=b".into(), "c \"d\"".into()));
    }

    #[test]
    fn modinfo_lines() {
        let mut b = BuildInfo::default();
        b.parse_modinfo("path\tex.com/a\nmod\tex.com/a\t(devel)\t\ndep\tex.com/b\tv1.0.0\th1:x=\n=>\t../b\t(devel)\t\nbuild\t-race=true\n");
        assert_eq!(b.path, "ex.com/a");
        assert_eq!(b.main.as_ref().unwrap().version, "(devel)");
        assert_eq!(b.deps[0].replace.as_ref().unwrap().path, "../b");
        assert_eq!(b.setting("-race"), Some("true"));
    }

    #[test]
    fn varints() {
        assert_eq!(read_uvarint(&[0x05]), Some((5, 1)));
        assert_eq!(read_uvarint(&[0x80, 0x01]), Some((128, 2)));
        assert_eq!(read_uvarint(&[0x80]), None);
        assert_eq!(read_uvarint(&[0xff; 11]), None);
    }
}
