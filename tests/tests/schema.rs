//! The schemas of inject's JSON output (docs/schema/) are valid, accept each kind of
//! record inject writes, and reject what it does not write: the tests that check real
//! output against them (attach, capture, http, grpc, launch, otlp, storm, versions) cannot
//! pass because the check lets everything through.

use anyhow::{Result, bail, ensure};
use serde_json::{Value, json};
use tests::schema::{Schema, parse_jsonl};

/// A call that returned, as `--output jsonl` writes it.
fn returned_call() -> Value {
    json!({
        "name": "main.(*server).worker",
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "span_id": "00f067aa0ba902b7",
        "parent_span_id": null,
        "goroutine": 35,
        "depth": 0,
        "start_time_unix_nano": 1_754_000_000_000_000_000u64,
        "end_time_unix_nano": 1_754_000_000_000_120_000u64,
        "duration_ns": 120_000,
        "args": {
            "s": {"type": "*main.server", "data": "0xc000010000"},
            "i": 2,
            "f": 0.25,
            "g": {"unavailable": "in a float register, which uprobes cannot read"},
            "inf": "+Inf",
            "name": "pear",
            "long": {"value": "abc", "len": 1_048_576},
            "raw": {"value": "\u{fffd}", "len": 1, "hex": "ff"},
            "buf": {"ptr": "0xc000100000", "len": 3, "cap": 8},
            "ok": true,
            "p": "nil",
            "heap": {"word": "0xc000200000", "data": "0x1"},
            "pair": ["0x1", "2.5"],
            "big": null
        },
        "results": {
            "~r0": {"type": "*fmt.wrapError", "message": "worker 1: refused", "truncated": false}
        },
        "caller": {"function": "main.(*server).fanout.func1", "file": "/src/main.go", "line": 88},
        "stack": [{"function": "main.(*server).fanout.func1", "file": "/src/main.go", "line": 88},
                  {"function": "runtime.goexit", "file": "/go/src/runtime/asm_amd64.s", "line": 1700}],
        "error": "returned error *fmt.wrapError(\"worker 1: refused\")"
    })
}

/// A call whose return was not seen.
fn entry_only_call() -> Value {
    let mut v = returned_call();
    let o = v.as_object_mut().unwrap();
    o.remove("end_time_unix_nano");
    o.remove("duration_ns");
    o.insert("results".into(), json!({}));
    o.insert("error".into(), Value::Null);
    o.insert("entry_only".into(), json!(true));
    v
}

/// A net/http server span that failed.
/// A span the application made (Auto SDK), as `write_app` writes it.
fn app_span() -> Value {
    json!({
        "name": "reserve", "kind": "INTERNAL",
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "span_id": "b7ad6b7169203331",
        "parent_span_id": "00f067aa0ba902b7", "parent_remote": false, "goroutine": 34,
        "start_time_unix_nano": 1_754_000_000_000_000_000u64, "end_time_unix_nano": 1_754_000_000_000_004_000u64,
        "duration_ns": 4000, "error": "out of stock",
        "attributes": {"shop.sku": "b2", "shop.qty": 30, "shop.rush": true},
        "scope": {"name": "shop", "version": "1.0.0"},
        "events": [{"name": "exception", "time_unix_nano": 1_754_000_000_000_002_000u64,
                    "attributes": {"exception.type": "*errors.errorString", "exception.message": "out of stock"}}]
    })
}

fn library_span() -> Value {
    json!({
        "name": "GET /fanout",
        "kind": "SERVER",
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "span_id": "b7ad6b7169203331",
        "parent_span_id": "00f067aa0ba902b7",
        "parent_remote": true,
        "goroutine": 34,
        "start_time_unix_nano": 1_754_000_000_000_000_000u64,
        "end_time_unix_nano": 1_754_000_000_002_000_000u64,
        "duration_ns": 2_000_000,
        "error": "error.type 502",
        "attributes": {
            "http.request.method": "GET",
            "url.scheme": "http",
            "url.path": "/fanout",
            "server.address": "127.0.0.1",
            "server.port": 8080,
            "network.protocol.version": "1.1",
            "http.route": "/fanout",
            "http.response.status_code": 502,
            "error.type": "502"
        }
    })
}

fn drop_record() -> Value {
    json!({"dropped": 12, "dropped_by_function": {"main.add3": 12}})
}

fn summary() -> Value {
    let pause = json!({"stop_ms": 0.2, "work_ms": 1.5, "retries": 0, "parked": 0, "resume_ms": 0.1});
    let mut s = json!({
        "stop": "signal 15",
        "sites": [{
            "name": "main.depth",
            "verdict": "installed: entry and 2 exits", "backend": "trampoline",
            "entries": 10, "returns": 10, "dropped": 0,
            "jumps": [{"at": 4_198_400, "pinned": null}, {"at": 4_198_480, "pinned": 144}]
        }, {
            "name": "main.asm", "verdict": "refused: written in assembly", "backend": null,
            "entries": 0, "returns": 0, "dropped": 0, "jumps": []
        }],
        "records": 20, "tickets": 20, "consumed": 20, "unpublished": 0, "dropped": 0, "dropped_full": 0,
        "lossless": true, "wait_timeouts": 0, "corrupt": 0, "calls": 10, "unmatched_returns": 0, "abandoned": 0,
        "open_calls": 0, "output_dropped": 0, "output_errors": 0,
        "install_pause_ms": 1.8, "prepare_pause_ms": 0.9, "install_pause": pause, "prepare_pause": pause,
        "ring_bytes": 35_127_296u64, "trampoline_bytes": 4096, "ring_reserve_ms": 12.5,
        "remove_pause_ms": 1.1, "restored": 3, "uprobes": 0, "unmapped": true, "kept_bytes": 528_384, "threads": 6,
        "otlp": {
            "endpoint": "http://127.0.0.1:4318", "protocol": "http/protobuf", "exported": 10, "sampled_out": 0,
            "dropped_queue_full": 0, "dropped_export_failed": 0, "requests": 1, "failed_requests": 0,
            "last_error": null
        },
        "metrics": {"recorded": 10, "exports": 2, "failed_exports": 0, "last_error": null, "prometheus": "127.0.0.1:9464"}
    });
    for lib in ["http", "grpc"] {
        for c in ["injected", "inject_no_room", "app_traceparent", "tracestate_injected", "tracestate_no_room"] {
            s[format!("{lib}_{c}")] = json!(0);
        }
    }
    s["http_panics"] = json!(0);
    s["kafka_headers_added"] = json!(12);
    s["kafka_headers_own"] = json!(1);
    for (c, n) in [("app_spans_started", 4), ("app_spans", 4), ("app_spans_too_large", 0), ("app_spans_unreadable", 0)]
    {
        s[c] = json!(n);
    }
    s
}

#[test]
fn each_kind_of_record_inject_writes_matches() -> Result<()> {
    for v in [returned_call(), entry_only_call(), library_span(), app_span(), drop_record()] {
        Schema::Jsonl.check(&v)?;
    }
    let mut stripped = returned_call();
    stripped["args"] = json!({"RAX": 1u64 << 63, "RBX": 0});
    stripped["results"] = json!({});
    stripped["error"] = Value::Null;
    stripped["caller"] = Value::Null;
    stripped["stack"] = Value::Null;
    Schema::Jsonl.check(&stripped)?;
    // A library span whose end was not seen has neither end nor duration.
    let mut open = library_span();
    let o = open.as_object_mut().unwrap();
    o.remove("end_time_unix_nano");
    o.remove("duration_ns");
    o.insert("error".into(), Value::Null);
    Schema::Jsonl.check(&open)?;
    Schema::Summary.check(&summary())?;
    // What a session without export, whose target exited, writes.
    let mut s = summary();
    for k in ["otlp", "remove_pause_ms", "restored", "unmapped", "kept_bytes", "metrics"] {
        s[k] = Value::Null;
    }
    s["stop"] = json!("target exited with status 0");
    Schema::Summary.check(&s)?;
    // Lines as a file has them.
    let text: String = [returned_call(), drop_record(), library_span()].iter().map(|v| format!("{v}\n")).collect();
    ensure!(parse_jsonl(&text)?.len() == 3);
    Ok(())
}

/// `v` with the value at JSON pointer `at` set to `new` (added when its object lacks it).
fn with(mut v: Value, at: &str, new: Value) -> Value {
    let (parent, key) = at.rsplit_once('/').unwrap();
    v.pointer_mut(parent).and_then(Value::as_object_mut).unwrap().insert(key.into(), new);
    v
}

/// `v` without the key at JSON pointer `at`.
fn without(mut v: Value, at: &str) -> Value {
    let (parent, key) = at.rsplit_once('/').unwrap();
    v.pointer_mut(parent).and_then(Value::as_object_mut).unwrap().remove(key);
    v
}

/// Fails unless `schema` rejects every case's value, at its path (a JSON pointer, "" for
/// the whole value) and saying its reason.
fn all_rejected(schema: Schema, cases: &[(&str, Value, &str, &str)]) -> Result<()> {
    for (case, v, path, why) in cases {
        match schema.check(v) {
            Ok(()) => bail!("{case}: accepted {v}"),
            Err(e) => {
                let e = format!("{e:#}");
                ensure!(
                    e.contains(&format!("at {path:?}: ")) && e.contains(why),
                    "{case}: not at {path:?} for {why:?}: {e}"
                );
                eprintln!("{case}: {}", e.lines().nth(1).unwrap_or_default().trim());
            }
        }
    }
    Ok(())
}

#[test]
fn json_lines_inject_does_not_write_are_rejected() -> Result<()> {
    let (call, lib, gap) = (returned_call(), library_span(), drop_record());
    let required = "is a required property";
    let unknown = "Additional properties are not allowed";
    all_rejected(
        Schema::Jsonl,
        &[
            ("wrong type", with(call.clone(), "/goroutine", json!("35")), "/goroutine", "is not of type \"integer\""),
            ("negative", with(call.clone(), "/depth", json!(-1)), "/depth", "less than the minimum"),
            ("missing error", without(call.clone(), "/error"), "", "\"error\" is a required property"),
            ("unknown key", with(call.clone(), "/status", json!("ok")), "", "('status' was unexpected)"),
            ("neither ended nor entry-only", without(call.clone(), "/duration_ns"), "", required),
            ("ended and entry-only", with(call.clone(), "/entry_only", json!(true)), "/duration_ns", "False schema"),
            (
                "entry_only false",
                with(entry_only_call(), "/entry_only", json!(false)),
                "/entry_only",
                "true was expected",
            ),
            ("short trace id", with(call.clone(), "/trace_id", json!("4bf92f35")), "/trace_id", "does not match"),
            (
                "upper-case span id",
                with(lib.clone(), "/span_id", json!("B7AD6B7169203331")),
                "/span_id",
                "does not match",
            ),
            ("error as bool", with(call.clone(), "/error", json!(true)), "/error", "is not of types"),
            ("function error text", with(call.clone(), "/error", json!("boom")), "/error", "does not match"),
            ("empty library error", with(lib.clone(), "/error", json!("")), "/error", "shorter than 1 character"),
            ("kind", with(lib.clone(), "/kind", json!("INTERNAL")), "/kind", "is not one of"),
            ("library depth", with(lib.clone(), "/depth", json!(0)), "", unknown),
            ("end without duration", without(lib.clone(), "/duration_ns"), "", required),
            ("unknown attribute", with(lib.clone(), "/attributes/http.status", json!(200)), "/attributes", unknown),
            (
                "status code as text",
                with(lib.clone(), "/attributes/http.response.status_code", json!("502")),
                "/attributes/http.response.status_code",
                "is not of type",
            ),
            (
                "slice without cap",
                with(call.clone(), "/args/buf", json!({"ptr": "0xc0", "len": 3})),
                "/args/buf",
                "anyOf",
            ),
            // An object of fields is a struct shown by its fields; a negative length is nothing.
            ("negative slice length", with(call, "/args/m", json!({"Items": {"len": -1}})), "/args/m", "anyOf"),
            ("no drops", with(gap.clone(), "/dropped", json!(0)), "/dropped", "less than the minimum"),
            (
                "drops as text",
                with(gap, "/dropped_by_function/main.add3", json!("12")),
                "/dropped_by_function/main.add3",
                "is not of type",
            ),
        ],
    )
}

#[test]
fn summaries_inject_does_not_write_are_rejected() -> Result<()> {
    let s = summary();
    let unknown = "Additional properties are not allowed";
    all_rejected(
        Schema::Summary,
        &[
            ("missing", without(s.clone(), "/otlp"), "", "\"otlp\" is a required property"),
            ("counter missing", without(s.clone(), "/http_injected"), "", "\"http_injected\" is a required property"),
            ("unknown counter", with(s.clone(), "/http_new_thing", json!(1)), "", unknown),
            ("negative", with(s.clone(), "/records", json!(-1)), "/records", "less than the minimum"),
            ("fraction", with(s.clone(), "/calls", json!(1.5)), "/calls", "is not of type"),
            ("stop", with(s.clone(), "/stop", json!("stopped")), "/stop", "does not match"),
            ("verdict", with(s.clone(), "/sites/0/verdict", json!("ok")), "/sites/0/verdict", "does not match"),
            (
                "pinned byte",
                with(s.clone(), "/sites/0/jumps/1/pinned", json!(300)),
                "/sites/0/jumps/1/pinned",
                "maximum",
            ),
            (
                "pause",
                with(s.clone(), "/install_pause/retries", json!(0.5)),
                "/install_pause/retries",
                "is not of type",
            ),
            ("protocol", with(s.clone(), "/otlp/protocol", json!("thrift")), "/otlp/protocol", "is not one of"),
            ("otlp key", with(s.clone(), "/otlp/dropped", json!(0)), "/otlp", unknown),
            ("restored", with(s, "/restored", json!(true)), "/restored", "is not of types"),
        ],
    )
}

/// A `--stats --output jsonl` interval line and totals line, as inject writes them.
fn stats_lines() -> (Value, Value) {
    let interval = json!({
        "stats": "interval", "time_unix_nano": 1_754_000_000_000_000_000u64, "elapsed_s": 1.0, "interval_s": 0.2,
        "functions": [
            {"name": "main.tick", "calls": 20_000_000, "interval_calls": 4_000_000, "calls_per_s": 2.0e7,
             "errors": null, "interval_errors": null, "timed": 15_625, "sampling": 256,
             "latency_ns": {"p50": 10, "p90": 10, "p99": 21, "max": 3_210_000, "mean": 12}},
            {"name": "main.nap", "calls": 0, "interval_calls": 0, "calls_per_s": 0.0, "errors": 0,
             "interval_errors": 0, "timed": 0, "sampling": 1, "latency_ns": null}
        ]
    });
    let total = json!({
        "stats": "total", "time_unix_nano": 1_754_000_000_000_000_000u64, "elapsed_s": 2.5,
        "functions": [
            {"name": "main.nap", "calls": 20, "calls_per_s": 8.0, "errors": 0, "returns": 20, "timed": 20,
             "untimed_returns": 0, "missed": 0, "sampling": 1,
             "latency_ns": {"p50": 2_120_000, "p90": 2_300_000, "p99": 2_400_000, "max": 2_400_000, "mean": 2_150_000},
             "histogram": [{"from_ns": 2_097_152, "to_ns": 4_194_303, "count": 20}]}
        ]
    });
    (interval, total)
}

#[test]
fn stats_lines_match_and_what_inject_does_not_write_is_rejected() -> Result<()> {
    let (interval, total) = stats_lines();
    Schema::Stats.check(&interval)?;
    Schema::Stats.check(&total)?;
    let required = "is a required property";
    all_rejected(
        Schema::Stats,
        &[
            ("no interval length", without(interval.clone(), "/interval_s"), "", required),
            (
                "negative calls",
                with(total.clone(), "/functions/0/calls", json!(-1)),
                "/functions/0/calls",
                "less than the minimum",
            ),
            (
                "sampling 0",
                with(total.clone(), "/functions/0/sampling", json!(0)),
                "/functions/0/sampling",
                "less than the minimum",
            ),
            ("unknown kind", with(total.clone(), "/stats", json!("partial")), "/stats", "is not one of"),
            ("no calls", without(total.clone(), "/functions/0/calls"), "/functions/0", required),
            ("unknown key", with(total, "/functions/0/p50", json!(1)), "/functions/0", "was unexpected"),
        ],
    )
}
