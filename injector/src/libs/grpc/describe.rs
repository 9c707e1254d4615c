//! How a gRPC span is named and attributed: the OpenTelemetry RPC semantic conventions
//! as otelgrpc (OpenTelemetry Go's gRPC instrumentation, v0.72) emits them by default:
//! the name `package.Service/Method`; `rpc.system.name`, `rpc.method` (the full method),
//! `rpc.response.status_code` (the code's canonical name), `server.address` and
//! `server.port`; status Error on a server for the codes that mean a server fault, on a
//! client for any code but OK, with the status message.

use super::plan::at;
use super::{CODE, MESSAGE, Probe};
use crate::libs::{Attr, Described, Notes, SpanKind};
use crate::ring::Record;

pub(super) use crate::libs::{string_at as string, word_at as word};

/// The canonical name of a gRPC status code (`google.rpc.Code`).
pub(super) fn code_name(code: u32) -> Option<&'static str> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    NAMES.get(code as usize).copied()
}

/// Codes that make a server span an error: the server failed, not the caller.
fn server_fault(code: u32) -> bool {
    matches!(code, 2 | 4 | 12 | 13 | 14 | 15)
}

/// `host:port` of a dial target: `dns:///host:port`, `passthrough:///host:port`,
/// `host:port`, or a bare host.
fn target_host_port(target: &str) -> (String, Option<i64>) {
    let t = target.split_once(":///").map_or(target, |(_, rest)| rest);
    let t = t.rsplit_once('/').map_or(t, |(_, rest)| rest);
    if let Some(rest) = t.strip_prefix('[')
        && let Some((h, p)) = rest.split_once(']')
    {
        return (h.to_string(), p.strip_prefix(':').and_then(|p| p.parse().ok()));
    }
    match t.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => match p.parse() {
            Ok(port) => (h.to_string(), Some(port)),
            Err(_) => (t.to_string(), None),
        },
        _ => (t.to_string(), None),
    }
}

fn ip_text(bytes: &[u8]) -> Option<String> {
    match bytes.len() {
        4 => Some(std::net::Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).to_string()),
        16 => {
            let v6 = std::net::Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?);
            Some(v6.to_ipv4_mapped().map_or_else(|| v6.to_string(), |v4| v4.to_string()))
        }
        _ => None,
    }
}

pub(super) fn describe(probe: Probe, entry: &Record, ret: Option<&Record>, notes: Option<&Notes>) -> Described {
    let data = &entry.data;
    let (kind, method) = match probe {
        Probe::Server => (SpanKind::Server, string(data, at::SERVER_METHOD, at::METHOD_MAX)),
        _ => {
            // The method's length: Invoke's RSI, NewStream's R8.
            let len = if probe == Probe::Stream { entry.ints[5] } else { entry.ints[4] };
            let n = (len as usize).min(usize::from(at::METHOD_MAX));
            let start = usize::from(at::CLIENT_METHOD);
            let m = data.get(start..start + n).map(|b| String::from_utf8_lossy(b).into_owned());
            (SpanKind::Client, m.filter(|m| !m.is_empty()))
        }
    };
    let method = method.unwrap_or_default();
    let full = method.strip_prefix('/').unwrap_or(&method).to_string();
    let mut attrs: Vec<(&'static str, Attr)> = Vec::new();
    if method.starts_with('/') {
        attrs.push(("rpc.method", Attr::S(full.clone())));
    }
    attrs.push(("rpc.system.name", Attr::S("grpc".into())));
    // The status: a server's from what it wrote (OK when it wrote none: a handler that
    // returned nil), a client's from the error its call returned or its stream ended
    // with (u32::MAX: not known, the stream was still open at the end).
    let (code, message): (u32, Option<String>) = match (probe, ret) {
        (Probe::Server, _) => {
            let code =
                notes.and_then(|n| n.get(CODE)).and_then(|a| if let Attr::I(c) = a { Some(*c as u32) } else { None });
            let msg = notes
                .and_then(|n| n.get(MESSAGE))
                .and_then(|a| if let Attr::S(s) = a { Some(s.clone()) } else { None });
            (code.unwrap_or(0), msg)
        }
        // A stream's span ends at finish (another site: its error in RBX, RCX), or where
        // NewStream returned when it failed (its error in RCX, RDI) or never finished.
        (Probe::Stream, Some(r)) if r.site == entry.site && r.ints[2] == 0 => (u32::MAX, None),
        // finish(io.EOF) is a stream that ended well.
        (Probe::Stream, Some(r))
            if r.site != entry.site
                && (r.ints[1] == 0
                    || string(&r.data, at::ERROR_TEXT, at::ERROR_TEXT_MAX).as_deref() == Some("EOF")) =>
        {
            (0, None)
        }
        (Probe::Client, Some(r)) if r.ints[0] == 0 => (0, None),
        (_, Some(r)) if word(&r.data, at::IS_STATUS).is_some_and(|w| w != 0) => {
            (word(&r.data, at::CODE).map_or(2, |c| c as u32), string(&r.data, at::MESSAGE, at::MESSAGE_MAX))
        }
        // Not a gRPC status: grpc-go's status.FromError calls that Unknown.
        (_, Some(_)) => (2, None),
        (_, None) => (0, None),
    };
    if let Some(name) = code_name(code) {
        attrs.push(("rpc.response.status_code", Attr::S(name.into())));
    }
    match probe {
        Probe::Server => {
            let ip = word(data, at::SERVER_IP).filter(|n| *n <= u64::from(at::IP_MAX)).and_then(|n| {
                let start = usize::from(at::SERVER_IP) + 8;
                data.get(start..start + n as usize).and_then(ip_text)
            });
            if let Some(ip) = ip {
                attrs.push(("server.address", Attr::S(ip)));
                if let Some(port) = word(data, at::SERVER_PORT).filter(|p| (1..=65535).contains(p)) {
                    attrs.push(("server.port", Attr::I(port as i64)));
                }
            }
        }
        _ => {
            if let Some(t) = string(data, at::CLIENT_TARGET, at::TARGET_MAX) {
                let (host, port) = target_host_port(&t);
                attrs.push(("server.address", Attr::S(host)));
                if let Some(p) = port {
                    attrs.push(("server.port", Attr::I(p)));
                }
            }
        }
    }
    let failed = match kind {
        SpanKind::Server => server_fault(code),
        SpanKind::Client | SpanKind::Producer | SpanKind::Consumer => code != 0 && code != u32::MAX,
    };
    let error = failed.then(|| message.unwrap_or_else(|| code_name(code).unwrap_or("UNKNOWN").to_string()));
    let name = if full.is_empty() { "grpc".to_string() } else { full };
    Described { kind, name, attrs, error }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_split_like_otelgrpc() {
        assert_eq!(target_host_port("127.0.0.1:50051"), ("127.0.0.1".into(), Some(50051)));
        assert_eq!(target_host_port("dns:///svc.local:443"), ("svc.local".into(), Some(443)));
        assert_eq!(target_host_port("passthrough:///[::1]:80"), ("::1".into(), Some(80)));
        assert_eq!(target_host_port("svc"), ("svc".into(), None));
        assert_eq!(code_name(5), Some("NOT_FOUND"));
        assert_eq!(code_name(17), None);
        assert_eq!(ip_text(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1]).as_deref(), Some("127.0.0.1"));
    }
}
