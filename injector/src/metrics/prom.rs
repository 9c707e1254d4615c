//! The Prometheus exporter: the same histograms, cumulative, on a scrape endpoint
//! (`GET /metrics`, text exposition format 0.0.4) for users without a collector. Names
//! follow the OpenTelemetry-to-Prometheus rules: dots become underscores and the unit
//! (seconds) a suffix; attribute keys become labels the same way.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;

use anyhow::{Context, Result};

use super::{INSTRUMENTS, Metrics};

/// `http.server.request.duration` as `http_server_request_duration`.
fn name(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect()
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The exposition text of every series.
pub fn render(m: &Metrics) -> String {
    let series = m.store.lock().map(|mut s| s.take(false)).unwrap_or_default();
    let mut out = String::new();
    let mut last = usize::MAX;
    for ((i, attrs), h) in &series {
        let inst = &INSTRUMENTS[*i];
        let base = format!("{}_seconds", name(inst.name));
        if *i != last {
            out.push_str(&format!("# HELP {base} {}\n# TYPE {base} histogram\n", inst.description));
            last = *i;
        }
        let labels: Vec<String> = attrs.iter().map(|(k, v)| format!("{}=\"{}\"", name(k), escape(&v.text()))).collect();
        let with = |extra: Option<String>| {
            let mut l = labels.clone();
            l.extend(extra);
            if l.is_empty() { String::new() } else { format!("{{{}}}", l.join(",")) }
        };
        let mut cumulative = 0;
        for (b, n) in inst.bounds.iter().zip(&h.buckets) {
            cumulative += n;
            out.push_str(&format!("{base}_bucket{} {cumulative}\n", with(Some(format!("le=\"{b}\"")))));
        }
        out.push_str(&format!("{base}_bucket{} {}\n", with(Some("le=\"+Inf\"".into())), h.count));
        out.push_str(&format!("{base}_sum{} {}\n", with(None), h.sum));
        out.push_str(&format!("{base}_count{} {}\n", with(None), h.count));
    }
    out
}

/// Serves `/metrics` on `addr` (host:port) from a thread of its own; returns the address
/// bound.
pub fn serve(addr: &str, m: Metrics) -> Result<String> {
    let listener = TcpListener::bind(addr)
        .with_context(|| format!("the Prometheus endpoint {addr} (OTEL_EXPORTER_PROMETHEUS_HOST/PORT)"))?;
    let bound = listener.local_addr()?.to_string();
    std::thread::Builder::new().name("prometheus".into()).spawn(move || {
        for stream in listener.incoming().flatten() {
            let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(5)));
            let mut reader = BufReader::new(&stream);
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            // The rest of the request's head.
            let mut h = String::new();
            while reader.read_line(&mut h).is_ok_and(|n| n > 2) {
                h.clear();
            }
            let path = line.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = if path == "/metrics" || path.starts_with("/metrics?") {
                ("200 OK", render(&m))
            } else {
                ("404 Not Found", "try /metrics\n".to_string())
            };
            let mut s = &stream;
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    })?;
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::libs::{Attr, Described, SpanKind};

    #[test]
    fn histograms_render_as_prometheus_text() {
        let m = Metrics::new(false);
        let d = Described {
            kind: SpanKind::Server,
            name: "GET /a".into(),
            attrs: vec![("http.request.method", Attr::S("GET".into())), ("http.response.status_code", Attr::I(200))],
            error: None,
        };
        m.span(&d, 0.003);
        m.span(&d, 0.02);
        let t = render(&m);
        assert!(t.contains("# TYPE http_server_request_duration_seconds histogram"), "{t}");
        let labels = "http_request_method=\"GET\",http_response_status_code=\"200\"";
        assert!(t.contains(&format!("http_server_request_duration_seconds_bucket{{{labels},le=\"0.005\"}} 1")), "{t}");
        assert!(t.contains(&format!("http_server_request_duration_seconds_bucket{{{labels},le=\"0.025\"}} 2")), "{t}");
        assert!(t.contains(&format!("http_server_request_duration_seconds_count{{{labels}}} 2")), "{t}");
        assert_eq!(render(&m), t, "cumulative: a scrape resets nothing");
    }
}
