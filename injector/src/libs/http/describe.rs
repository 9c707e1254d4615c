//! How a net/http span is named and attributed: the OpenTelemetry HTTP semantic
//! conventions, from the values its probes read.

use trampolines::codegen::Fetch;

use super::plan::{Val, dests};
use super::{Probe, QUERY_ON_SERVER};
use crate::libs::{Attr, Described, Notes, SpanKind};

/// The notes events leave on a server span, by their attribute names.
pub(super) const STATUS: &str = "http.response.status_code";
pub(super) const ROUTE: &str = "http.route";
pub(super) const USER_AGENT: &str = "user_agent.original";

/// A value a span probe read.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Read {
    Missing,
    Word(u64),
    /// The bytes copied and whether the string was longer.
    Str(String, bool),
}

/// The values of a span probe's record.
fn reads(probe: Probe, ret: bool, data: &[u8]) -> Vec<(Val, Read)> {
    dests(probe, ret)
        .map(|(sp, dest)| {
            let (val, fetch, at) = (sp.val, sp.fetch, dest as usize);
            let Some(word) = data.get(at..at + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default())) else {
                return (val, Read::Missing);
            };
            let read = match fetch {
                Fetch::Word => Read::Word(word),
                Fetch::Str { max } => {
                    let n = (word as usize).min(max as usize);
                    match data.get(at + 8..at + 8 + n) {
                        Some(b) => Read::Str(String::from_utf8_lossy(b).into_owned(), word > u64::from(max)),
                        None => Read::Missing,
                    }
                }
            };
            (val, read)
        })
        .collect()
}

/// `Key: value` of a header line, the key lowercased.
pub fn header_line(line: &[u8]) -> Option<(String, String)> {
    let s = std::str::from_utf8(line).ok()?;
    let (k, v) = s.split_once(':')?;
    Some((k.trim().to_ascii_lowercase(), v.trim().to_string()))
}

/// `http.route` from a mux pattern: Go 1.22 patterns may start with a method and a host
/// (`GET example.com/items/{id}`); the route is the path.
pub fn route(pattern: &str) -> Option<String> {
    let p = pattern.trim();
    let p = p.split_once(' ').map_or(p, |(_, rest)| rest.trim_start());
    let path = &p[p.find('/')?..];
    Some(path.to_string())
}

const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "QUERY"];

fn text(reads: &[(Val, Read)], val: Val) -> Option<&str> {
    reads.iter().find(|(v, _)| *v == val).and_then(|(_, r)| match r {
        Read::Str(s, _) if !s.is_empty() => Some(s.as_str()),
        _ => None,
    })
}

fn word(reads: &[(Val, Read)], val: Val) -> Option<u64> {
    reads.iter().find(|(v, _)| *v == val).and_then(|(_, r)| if let Read::Word(w) = r { Some(*w) } else { None })
}

/// "HTTP/1.1" → "1.1", "HTTP/2.0" → "2".
fn protocol_version(proto: &str) -> Option<String> {
    let v = proto.strip_prefix("HTTP/")?;
    Some(v.strip_suffix(".0").filter(|m| *m != "1").unwrap_or(v).to_string())
}

/// Names and attributes an HTTP span by the semantic conventions. `type_name` names the
/// dynamic type of an error result from its itab.
pub(super) fn describe(
    probe: Probe,
    entry: &[u8],
    ret: Option<(&[u8], [u64; 3])>,
    notes: Option<&Notes>,
    type_name: &mut dyn FnMut(u64) -> Option<String>,
) -> Described {
    let er = reads(probe, false, entry);
    let mut attrs: Vec<(&'static str, Attr)> = Vec::with_capacity(14);
    let method = text(&er, Val::Method).unwrap_or("GET");
    let known = METHODS.contains(&method);
    attrs.push(("http.request.method", Attr::S(if known { method } else { "_OTHER" }.to_string())));
    if !known {
        attrs.push(("http.request.method_original", Attr::S(method.to_string())));
    }
    let name_method = if known { method } else { "HTTP" };
    let mut error = None;
    if probe == Probe::Server {
        let scheme = if word(&er, Val::Tls).unwrap_or(0) != 0 { "https" } else { "http" };
        attrs.push(("url.scheme", Attr::S(scheme.into())));
        if let Some(p) = text(&er, Val::Path) {
            attrs.push(("url.path", Attr::S(p.to_string())));
        }
        if QUERY_ON_SERVER.load(std::sync::atomic::Ordering::Relaxed)
            && let Some(q) = text(&er, Val::Query)
        {
            attrs.push(("url.query", Attr::S(q.to_string())));
        }
        if let Some(h) = text(&er, Val::Host) {
            let (host, port) = super::super::split_host_port(h);
            attrs.push(("server.address", Attr::S(host)));
            let port = port.or(Some(if scheme == "https" { 443 } else { 80 }));
            attrs.extend(port.map(|p| ("server.port", Attr::I(p))));
        }
        if let Some(r) = text(&er, Val::Remote) {
            // RemoteAddr is the socket's peer: the client, and the network peer (which
            // otelhttp reports too).
            let (host, port) = super::super::split_host_port(r);
            attrs.push(("client.address", Attr::S(host.clone())));
            attrs.extend(port.map(|p| ("client.port", Attr::I(p))));
            attrs.push(("network.peer.address", Attr::S(host)));
            attrs.extend(port.map(|p| ("network.peer.port", Attr::I(p))));
        }
        if let Some(v) = text(&er, Val::Proto).and_then(protocol_version) {
            attrs.push(("network.protocol.version", Attr::S(v)));
        }
        let notes = notes.cloned().unwrap_or_default();
        let note = |key| match notes.get(key) {
            Some(Attr::S(s)) => Some(s.clone()),
            _ => None,
        };
        if let Some(ua) = note(USER_AGENT) {
            attrs.push((USER_AGENT, Attr::S(ua)));
        }
        let route = note(ROUTE);
        if let Some(r) = &route {
            attrs.push((ROUTE, Attr::S(r.clone())));
        }
        // A handler that wrote nothing answers 200 when it returns; one that panicked
        // sent whatever it wrote before (HTTP/1 then drops the connection).
        let written = match notes.get(STATUS) {
            Some(Attr::I(code)) => u16::try_from(*code).ok(),
            _ => None,
        };
        let status = written.or((!notes.panicked && ret.is_some()).then_some(200));
        if let Some(code) = status {
            attrs.push(("http.response.status_code", Attr::I(i64::from(code))));
            if code >= 500 {
                attrs.push(("error.type", Attr::S(code.to_string())));
                error = Some(String::new());
            }
        }
        if notes.panicked {
            attrs.retain(|(k, _)| *k != "error.type");
            attrs.push(("error.type", Attr::S("panic".into())));
            error = Some("the handler panicked".into());
        }
        let name = match route {
            Some(r) => format!("{name_method} {r}"),
            None => name_method.to_string(),
        };
        return Described { kind: SpanKind::Server, name, attrs, error };
    }
    // Client.
    let scheme = text(&er, Val::Scheme).unwrap_or("http");
    let url_host = text(&er, Val::UrlHost).unwrap_or("");
    let host = text(&er, Val::Host).unwrap_or(url_host);
    let path = text(&er, Val::Path).unwrap_or("");
    let mut full = format!("{scheme}://{url_host}{path}");
    if let Some(q) = text(&er, Val::Query) {
        full.push('?');
        full.push_str(q);
    }
    attrs.push(("url.full", Attr::S(full)));
    let (addr, port) = super::super::split_host_port(host);
    attrs.push(("server.address", Attr::S(addr)));
    let port = port.or(match scheme {
        "https" => Some(443),
        "http" => Some(80),
        _ => None,
    });
    attrs.extend(port.map(|p| ("server.port", Attr::I(p))));
    if let Some((data, regs)) = ret {
        let rr = reads(probe, true, data);
        if regs[1] != 0 {
            let ty = type_name(regs[1]).unwrap_or_else(|| "error".into());
            attrs.push(("error.type", Attr::S(ty.clone())));
            error = Some(format!("transport error ({ty})"));
        } else if regs[0] != 0 {
            if let Some(code) = word(&rr, Val::Status) {
                attrs.push(("http.response.status_code", Attr::I(code as i64)));
                if code >= 400 {
                    attrs.push(("error.type", Attr::S(code.to_string())));
                    error = Some(String::new());
                }
            }
            if let Some(v) = text(&rr, Val::Proto).and_then(protocol_version) {
                attrs.push(("network.protocol.version", Attr::S(v)));
            }
        }
    }
    Described { kind: SpanKind::Client, name: name_method.to_string(), attrs, error }
}
