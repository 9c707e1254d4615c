//! The kafkasvc fixture (segmentio/kafka-go) against a real Apache Kafka broker, without
//! inject: the baseline the messaging instrumentation's tests build on. A consumer
//! (a group reader, with ReadMessage or FetchMessage and CommitMessages, or a partition
//! reader) GETs an httpserver backend for every message a producer's HTTP handlers wrote;
//! every message must be consumed exactly once, with its key, in offset order per
//! partition. On the oldest Go with the oldest kafka-go, and on the newest Go with the
//! oldest and the newest kafka-go.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use tests::servers::{Kafka, require_kafka};
use tests::{Proc, start_fixture};
use xtask::{Flavor, GoToolchain, KAFKA_GO, KAFKA_GO_OLDEST, build_fixture, build_pinned_fixture, test_toolchains};

const LIMIT: Duration = Duration::from_secs(30);

/// The producer's requests: (path, messages written, key).
const REQUESTS: &[(&str, usize, &str)] = &[
    ("/produce?n=5&key=alpha", 5, "alpha"),
    ("/produce?n=3", 3, "-"),
    ("/produce1?key=beta", 1, "beta"),
    ("/produce1", 1, "-"),
];

use tests::http_get as get;

/// How the consumer reads.
#[derive(Debug, Clone, Copy)]
enum Reading {
    /// A group reader, ReadMessage (which commits).
    Group,
    /// A group reader, FetchMessage then CommitMessages.
    GroupCommit,
    /// A reader of partition 0 without a group (the topic has one partition).
    Partition,
}

/// One run: a Go, a kafka-go release, a way of reading.
struct Case {
    tc: GoToolchain,
    kafka_go: &'static str,
    reading: Reading,
    exe: PathBuf,
    backend: PathBuf,
}

/// The runs: the oldest kafka-go on every Go, and the newest each Go builds where it
/// differs; the ways of reading taken in turn.
fn cases() -> Result<Vec<Case>> {
    let mut out = Vec::new();
    for tc in test_toolchains()? {
        let mut versions = vec![KAFKA_GO_OLDEST];
        let newest = xtask::kafka_go_newest(&tc.version);
        if newest != KAFKA_GO_OLDEST {
            versions.push(newest);
        }
        for kafka_go in versions {
            let reading = [Reading::Group, Reading::GroupCommit, Reading::Partition][out.len() % 3];
            let exe = build_pinned_fixture("kafkasvc", None, &[(KAFKA_GO, kafka_go)], &tc, Flavor::Default)?;
            let backend = build_fixture("httpserver", &tc, Flavor::Default)?;
            out.push(Case { tc: tc.clone(), kafka_go, reading, exe, backend });
        }
    }
    Ok(out)
}

/// What the test needs first: Java and the broker (without them, outside CI, it skips),
/// the suite's lock, and a broker started.
fn prepare() -> Result<Option<(std::sync::MutexGuard<'static, ()>, Kafka)>> {
    if !require_kafka()? {
        return Ok(None);
    }
    let serial = tests::exclusive();
    let t = Instant::now();
    xtask::kafka::install()?;
    let installed = t.elapsed();
    let t = Instant::now();
    let kafka = Kafka::start()?;
    eprintln!(
        "kafka: broker {} installed in {installed:.1?}, started in {:.1?}",
        xtask::kafka::KAFKA_VERSION,
        t.elapsed()
    );
    Ok(Some((serial, kafka)))
}

/// One CONSUMED line: (topic, partition, offset, key).
fn consumed(p: &Proc) -> Result<Vec<(String, u32, u64, String)>> {
    Ok(messages(p)?.into_iter().map(|m| (m.topic, m.partition, m.offset, m.key)).collect())
}

/// A message as the consumer printed it.
struct Consumed {
    topic: String,
    partition: u32,
    offset: u64,
    key: String,
    /// Query-escaped, as printed.
    value: String,
    /// `K=V&...` (each query-escaped), or `-`.
    headers: String,
}

fn messages(p: &Proc) -> Result<Vec<Consumed>> {
    p.seen
        .iter()
        .filter(|(err, l)| !err && l.starts_with("CONSUMED "))
        .map(|(_, l)| {
            let f: Vec<&str> = l.split(' ').collect();
            ensure!(f.len() == 7, "malformed line {l:?}");
            Ok(Consumed {
                topic: f[1].to_string(),
                partition: f[2].parse()?,
                offset: f[3].parse()?,
                key: f[4].to_string(),
                value: f[5].to_string(),
                headers: f[6].to_string(),
            })
        })
        .collect()
}

fn run(kafka: &Kafka, case: &Case, n: usize) -> Result<()> {
    let started = Instant::now();
    let what = format!("Go {} kafka-go {} {:?}", case.tc.version, case.kafka_go, case.reading);
    let topic = format!("smoke-{n}");
    let partitions = if matches!(case.reading, Reading::Partition) { "1" } else { "3" };
    let brokers = kafka.addr();
    let mut backend = start_fixture(&case.backend, &[], &[])?;
    let url = format!("http://{}/hello", backend.value("LISTEN").context("backend LISTEN")?);
    let mut args = vec!["-mode", "consumer", "-brokers", &brokers, "-topic", &topic, "-partitions", partitions];
    args.extend(["-backend", &url]);
    match case.reading {
        Reading::Group => args.extend(["-group", &topic]),
        Reading::GroupCommit => args.extend(["-group", &topic, "-commit"]),
        Reading::Partition => args.extend(["-group", "", "-partition", "0"]),
    }
    let mut consumer = start_fixture(&case.exe, &args, &[])?;
    let args = ["-mode", "producer", "-brokers", &brokers, "-topic", &topic, "-partitions", partitions];
    let mut producer = start_fixture(&case.exe, &args, &[])?;
    let addr = producer.value("LISTEN").context("producer LISTEN")?;
    for (path, count, _) in REQUESTS {
        let (code, body) = get(&addr, path)?;
        ensure!(code == 200 && body.trim() == format!("wrote {count}"), "{what}: {path}: {code} {body}");
    }
    let want: usize = REQUESTS.iter().map(|r| r.1).sum();
    // The group may be joined after the messages were written (it starts at the first
    // offset): wait for the consumption, not for the join.
    let deadline = Instant::now() + LIMIT;
    while consumed(&consumer)?.len() < want && Instant::now() < deadline {
        consumer.drain(Duration::from_millis(100));
    }
    // Anything read twice would come right after.
    consumer.drain(Duration::from_millis(500));
    consumer.signal(15);
    ensure!(consumer.wait(LIMIT)?.success(), "{what}: the consumer failed:\n{}", consumer.transcript());
    producer.signal(15);
    ensure!(producer.wait(LIMIT)?.success(), "{what}: the producer failed:\n{}", producer.transcript());
    backend.signal(15);
    ensure!(backend.wait(LIMIT)?.success(), "{what}: the backend failed:\n{}", backend.transcript());
    let lines = consumed(&consumer)?;
    let transcript = || consumer.transcript();
    ensure!(lines.len() == want, "{what}: {} messages consumed, want {want}:\n{}", lines.len(), transcript());
    // Every backend GET answered 200 (else the consumer prints an ERROR line).
    ensure!(!consumer.seen.iter().any(|(e, l)| !e && l.starts_with("ERROR")), "{what}:\n{}", transcript());
    let mut keys: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, count, key) in REQUESTS {
        *keys.entry(key).or_default() += count;
    }
    let mut got: BTreeMap<&str, usize> = BTreeMap::new();
    let mut next: BTreeMap<u32, u64> = BTreeMap::new();
    let mut alpha = None;
    for (t, partition, offset, key) in &lines {
        ensure!(*t == topic, "{what}: topic {t}:\n{}", transcript());
        *got.entry(key).or_default() += 1;
        // A fresh topic read from its first offset: per partition 0, 1, 2, ...
        let expected = next.entry(*partition).or_default();
        ensure!(
            *offset == *expected,
            "{what}: partition {partition} offset {offset}, want {expected}:\n{}",
            transcript()
        );
        *expected += 1;
        if key == "alpha" {
            // One key, one partition (the writer's Hash balancer).
            ensure!(
                *alpha.get_or_insert(*partition) == *partition,
                "{what}: key alpha on two partitions:\n{}",
                transcript()
            );
        }
    }
    ensure!(got == keys, "{what}: keys {got:?}, want {keys:?}:\n{}", transcript());
    // Nothing but what the application wrote: no headers, its values.
    for m in messages(&consumer)? {
        ensure!(m.headers == "-" && m.value.starts_with("message+"), "{what}: {} {}", m.value, m.headers);
    }
    eprintln!("kafka: {what}: {want} messages over {} partition(s) in {:.1?}", next.len(), started.elapsed());
    Ok(())
}

/// Messages written by kafka-go's Writer from HTTP handlers are read by its Reader, once
/// each, and each makes one backend request.
#[test]
fn kafka_go_writes_and_reads_through_a_real_broker() -> Result<()> {
    let started = Instant::now();
    if !require_kafka()? {
        return Ok(());
    }
    // Built first: a cold build takes minutes, during which the broker would sit idle.
    let cases = cases()?;
    let Some((_serial, kafka)) = prepare()? else { return Ok(()) };
    for (n, case) in cases.iter().enumerate() {
        run(&kafka, case, n)?;
    }
    drop(kafka);
    eprintln!("kafka: {} runs in {:.1?}", cases.len(), started.elapsed());
    Ok(())
}

/// A producer request: path, status, and its span's batch count, key, whether an error.
type Write = (&'static str, u16, Option<i64>, Option<&'static str>, bool);

/// A PRODUCER span for every `WriteMessages` call, child of the HTTP request that made it
/// (from the handler, or from a goroutine it started), by the messaging conventions: a
/// batch's count, a single message's key, the broker, the error kafka-go returned. On the
/// oldest and newest Go with the oldest and newest kafka-go each builds, stripped builds
/// (offsets from the table) included.
#[test]
fn writes_are_producer_spans_under_their_request() -> Result<()> {
    if !tests::require_ptrace()? || !require_kafka()? {
        return Ok(());
    }
    let mut builds = Vec::new();
    for tc in test_toolchains()? {
        let newest = xtask::kafka_go_newest(&tc.version);
        for (kafka_go, flavor) in [(KAFKA_GO_OLDEST, Flavor::Stripped), (newest, Flavor::Default)] {
            let exe = build_pinned_fixture("kafkasvc", None, &[(KAFKA_GO, kafka_go)], &tc, flavor)?;
            builds.push((format!("Go {} kafka-go {kafka_go} {}", tc.version, flavor.name()), exe));
        }
    }
    let Some((_serial, kafka)) = prepare()? else { return Ok(()) };
    let brokers = kafka.addr();
    let port: i64 = brokers.rsplit(':').next().context("port")?.parse()?;
    for (n, (what, exe)) in builds.iter().enumerate() {
        let topic = format!("spans-{n}");
        let args = ["-mode", "producer", "-brokers", &brokers, "-topic", &topic, "-partitions", "2"];
        let mut producer = start_fixture(exe, &args, &[])?;
        let addr = producer.value("LISTEN").context("producer LISTEN")?;
        let jsonl = tests::scratch(&format!("kafka-{}.jsonl", producer.pid()));
        let pid = producer.pid().to_string();
        let inject_args: Vec<String> =
            ["--pid", &pid, "--output", "jsonl", "--output-file", &jsonl.display().to_string()]
                .map(String::from)
                .into();
        let mut inject = tests::start_inject_env(&inject_args, &[], true)?;
        let calls: &[Write] = &[
            ("/produce?n=5&key=alpha", 200, Some(5), None, false),
            ("/produce1?key=beta", 200, None, Some("beta"), false),
            ("/produce?n=3&go=1", 200, Some(3), None, false),
            ("/produce1?topic=other", 500, None, None, true),
        ];
        for (path, status, ..) in calls {
            let (code, body) = get(&addr, path)?;
            ensure!(code == *status, "{what}: {path}: {code} {body}");
        }
        inject.signal(15);
        ensure!(inject.wait(LIMIT)?.success(), "{what}: inject:\n{}", inject.transcript());
        producer.signal(15);
        ensure!(producer.wait(LIMIT)?.success(), "{what}: the producer failed:\n{}", producer.transcript());
        let spans = tests::schema::read_jsonl(&jsonl)?;
        let _ = std::fs::remove_file(&jsonl);
        let servers: Vec<&serde_json::Value> = spans.iter().filter(|s| s["kind"] == "SERVER").collect();
        let producers: Vec<&serde_json::Value> = spans.iter().filter(|s| s["kind"] == "PRODUCER").collect();
        let all = || spans.iter().map(|s| format!("  {s}")).collect::<Vec<_>>().join("\n");
        ensure!(
            servers.len() == calls.len(),
            "{what}: {} server spans, want {}:\n{}",
            servers.len(),
            calls.len(),
            all()
        );
        ensure!(
            producers.len() == calls.len(),
            "{what}: {} producer spans, want {}:\n{}",
            producers.len(),
            calls.len(),
            all()
        );
        for (i, (path, _, count, key, error)) in calls.iter().enumerate() {
            let server = servers[i];
            let p = producers
                .iter()
                .find(|p| p["trace_id"] == server["trace_id"])
                .with_context(|| format!("{what}: {path}: no producer span in its request's trace:\n{}", all()))?;
            let a = &p["attributes"];
            let ctx = || format!("{what}: {path}: {p}");
            ensure!(p["parent_span_id"] == server["span_id"], "{}: not the server span's child", ctx());
            ensure!(p["name"] == format!("send {topic}").as_str(), "{}: name", ctx());
            ensure!(a["messaging.system"] == "kafka" && a["messaging.operation.type"] == "send", "{}", ctx());
            ensure!(a["messaging.operation.name"] == "send", "{}", ctx());
            ensure!(a["messaging.destination.name"] == topic.as_str(), "{}: destination", ctx());
            ensure!(a["server.address"] == "127.0.0.1" && a["server.port"] == port, "{}: broker", ctx());
            ensure!(a.get("messaging.batch.message_count").and_then(|v| v.as_i64()) == *count, "{}: count", ctx());
            ensure!(a.get("messaging.kafka.message.key").and_then(|v| v.as_str()) == *key, "{}: key", ctx());
            match error {
                true => {
                    let e = p["error"].as_str().unwrap_or_default();
                    ensure!(e.contains("Topic must not be specified"), "{}: error", ctx());
                    ensure!(a["error.type"] == "*errors.errorString", "{}: error.type", ctx());
                }
                false => ensure!(p["error"].is_null() && a.get("error.type").is_none(), "{}: an error", ctx()),
            }
        }
        eprintln!("kafka: {what}: {} producer spans, each under its request", producers.len());
    }
    Ok(())
}

/// A producer request of the trace test: path, messages, key, whether its messages carry
/// a header of their own (then inject adds none, and the consumer starts a trace).
const THROUGH: &[(&str, usize, &str, bool)] = &[
    ("/produce1?key=one", 1, "one", false),
    ("/produce?n=3&key=three", 3, "three", false),
    ("/produce1?key=own&hdr=app:v1", 1, "own", true),
];

/// Sends the [`THROUGH`] requests to the producer at `addr`, waits for the consumer to
/// print every message, then detaches both injects (`[producer's, consumer's]`). Returns
/// how many messages were written.
fn produce_through(what: &str, addr: &str, consumer: &mut Proc, injects: [&mut Proc; 2]) -> Result<usize> {
    for (path, count, ..) in THROUGH {
        let (code, body) = get(addr, path)?;
        ensure!(code == 200 && body.trim() == format!("wrote {count}"), "{what}: {path}: {code} {body}");
    }
    let want: usize = THROUGH.iter().map(|r| r.1).sum();
    let deadline = Instant::now() + LIMIT;
    while messages(consumer)?.len() < want && Instant::now() < deadline {
        consumer.drain(Duration::from_millis(100));
    }
    consumer.drain(Duration::from_millis(300));
    for (p, name) in injects.into_iter().zip(["producer's inject", "consumer's inject"]) {
        p.signal(15);
        ensure!(p.wait(LIMIT)?.success(), "{what}: {name}:\n{}", p.transcript());
    }
    Ok(want)
}

/// Attaches an inject writing JSON lines and a summary; returns it and both paths.
fn attach(p: &Proc, name: &str) -> Result<(Proc, PathBuf, PathBuf)> {
    attach_by(p, name, "auto")
}

/// As [`attach`], with `--backend backend`.
fn attach_by(p: &Proc, name: &str, backend: &str) -> Result<(Proc, PathBuf, PathBuf)> {
    let jsonl = tests::scratch(&format!("kafka-{name}-{}.jsonl", p.pid()));
    let summary = tests::scratch(&format!("kafka-{name}-{}.json", p.pid()));
    let pid = p.pid().to_string();
    let args: Vec<String> = [
        "--pid",
        &pid,
        "--output",
        "jsonl",
        "--output-file",
        &jsonl.display().to_string(),
        "--summary-json",
        &summary.display().to_string(),
        "--metrics",
        "console",
        "--backend",
        backend,
    ]
    .map(String::from)
    .into();
    // The metrics once, at exit.
    let env = [("OTEL_METRIC_EXPORT_INTERVAL", "600000")];
    Ok((tests::start_inject_env(&args, &env, true)?, jsonl, summary))
}

/// The calls a histogram counted, from the console metrics exporter's lines.
fn console_count(transcript: &str, name: &str) -> u64 {
    let prefix = format!("inject: metric {name} {{");
    transcript
        .lines()
        .filter_map(|l| l.split_once(&prefix))
        .filter_map(|(_, rest)| rest.split(" count=").nth(1)?.split(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// One HTTP request to the producer is one trace through Kafka: its server span, the
/// PRODUCER span of its WriteMessages call, a `traceparent` header on each message (and
/// nothing else changed: the consumer prints keys, values and headers), a CONSUMER
/// `process` span per message continuing it, and the backend request the consumer makes
/// while processing, its child. A message with headers of its own gets none (counted),
/// and its processing starts a trace. On the oldest and newest Go with the oldest
/// (stripped) and newest kafka-go.
#[test]
fn a_request_is_one_trace_through_kafka() -> Result<()> {
    if !tests::require_ptrace()? || !require_kafka()? {
        return Ok(());
    }
    let mut builds = Vec::new();
    for tc in test_toolchains()? {
        let newest = xtask::kafka_go_newest(&tc.version);
        let backend = build_fixture("httpserver", &tc, Flavor::Default)?;
        for (kafka_go, flavor) in [(KAFKA_GO_OLDEST, Flavor::Stripped), (newest, Flavor::Default)] {
            let exe = build_pinned_fixture("kafkasvc", None, &[(KAFKA_GO, kafka_go)], &tc, flavor)?;
            builds.push((format!("Go {} kafka-go {kafka_go} {}", tc.version, flavor.name()), exe, backend.clone()));
        }
    }
    let Some((_serial, kafka)) = prepare()? else { return Ok(()) };
    let brokers = kafka.addr();
    for (n, (what, exe, backend)) in builds.iter().enumerate() {
        let topic = format!("trace-{n}");
        let mut back = start_fixture(backend, &[], &[])?;
        let url = format!("http://{}/hello", back.value("LISTEN").context("backend LISTEN")?);
        let args = ["-mode", "consumer", "-brokers", &brokers, "-topic", &topic, "-partitions", "1", "-backend", &url];
        let mut consumer = start_fixture(exe, &args, &[])?;
        let args = ["-mode", "producer", "-brokers", &brokers, "-topic", &topic, "-partitions", "1"];
        let mut producer = start_fixture(exe, &args, &[])?;
        let addr = producer.value("LISTEN").context("producer LISTEN")?;
        let (mut pi, p_jsonl, p_summary) = attach(&producer, "producer")?;
        let (mut ci, c_jsonl, c_summary) = attach(&consumer, "consumer")?;
        let want = produce_through(what, &addr, &mut consumer, [&mut pi, &mut ci])?;
        // Detached: every byte of code is back, and of inject's memory only the header
        // arena is left (batches may point there); a second inject attaches beside it.
        ensure!(tests::text_differs_from_file(producer.pid(), exe)?.is_none(), "{what}: code left patched");
        let left = inject_maps(producer.pid())?;
        ensure!(left.len() == 1 && left[0] == ring_abi::arena::LEN as u64, "{what}: inject memory left: {left:?}");
        if n < 2 {
            // Once more, detached (n 0) or killed and cleaned up by `inject detach` (n 1):
            // the arena it wrote headers from stays too.
            let (mut again, jsonl, summary) = attach(&producer, "again")?;
            let (code, body) = get(&addr, "/produce1?key=again")?;
            ensure!(code == 200, "{what}: after a second attach: {code} {body}");
            if n == 0 {
                again.signal(15);
                ensure!(again.wait(LIMIT)?.success(), "{what}: the second inject:\n{}", again.transcript());
                let spans = tests::schema::read_jsonl(&jsonl)?;
                ensure!(spans.iter().any(|s| s["kind"] == "PRODUCER"), "{what}: second attach: {spans:?}");
            } else {
                // The request returned once its batch was written: the arena is in use.
                again.signal(9);
                again.wait(LIMIT)?;
                let args = ["detach".to_string(), "--pid".into(), producer.pid().to_string()];
                let mut detach = tests::start_inject(&args, false)?;
                ensure!(detach.wait(LIMIT)?.success(), "{what}: inject detach:\n{}", detach.transcript());
                ensure!(tests::text_differs_from_file(producer.pid(), exe)?.is_none(), "{what}: not restored");
            }
            let left = inject_maps(producer.pid())?;
            ensure!(
                left == [ring_abi::arena::LEN as u64; 2],
                "{what}: inject memory left after a second detach: {left:?}"
            );
            for f in [&jsonl, &summary] {
                let _ = std::fs::remove_file(f);
            }
            let (code, body) = get(&addr, "/produce1?key=again")?;
            ensure!(code == 200, "{what}: after the second detach: {code} {body}");
            consumer.drain(Duration::from_millis(300));
        }
        for (p, name) in [(&mut producer, "producer"), (&mut consumer, "consumer"), (&mut back, "backend")] {
            p.signal(15);
            ensure!(p.wait(LIMIT)?.success(), "{what}: the {name} failed:\n{}", p.transcript());
        }
        let msgs: Vec<Consumed> = messages(&consumer)?.into_iter().filter(|m| m.key != "again").collect();
        let transcript = || consumer.transcript();
        ensure!(msgs.len() == want, "{what}: {} messages consumed, want {want}:\n{}", msgs.len(), transcript());
        let ps = tests::schema::read_jsonl(&p_jsonl)?;
        let cs = tests::schema::read_jsonl(&c_jsonl)?;
        let (psum, csum) = (tests::schema::read_summary(&p_summary)?, tests::schema::read_summary(&c_summary)?);
        for f in [&p_jsonl, &c_jsonl, &p_summary, &c_summary] {
            let _ = std::fs::remove_file(f);
        }
        let all = || {
            let side = |v: &[serde_json::Value]| v.iter().map(|s| format!("  {s}")).collect::<Vec<_>>().join("\n");
            format!("producer side:\n{}\nconsumer side:\n{}\n{}", side(&ps), side(&cs), transcript())
        };
        let of =
            |v: &[serde_json::Value], kind: &str| v.iter().filter(|s| s["kind"] == kind).cloned().collect::<Vec<_>>();
        let (servers, producers) = (of(&ps, "SERVER"), of(&ps, "PRODUCER"));
        let (process, clients) = (of(&cs, "CONSUMER"), of(&cs, "CLIENT"));
        ensure!(servers.len() == THROUGH.len() && producers.len() == THROUGH.len(), "{what}: spans:\n{}", all());
        ensure!(process.len() == want && clients.len() == want, "{what}: consumer spans:\n{}", all());
        let mut values = std::collections::BTreeSet::new();
        for m in &msgs {
            let (i, (path, _, key, own)) =
                THROUGH.iter().enumerate().find(|(_, r)| r.2 == m.key).context("a key nobody wrote")?;
            let ctx = || format!("{what}: {path}: offset {}", m.offset);
            // The application's bytes as it wrote them.
            ensure!(m.value.starts_with("message+") && values.insert(m.value.clone()), "{}: value {}", ctx(), m.value);
            ensure!(m.topic == topic && m.partition == 0, "{}: topic {} partition {}", ctx(), m.topic, m.partition);
            let server = &servers[i];
            let producer = producers
                .iter()
                .find(|p| p["trace_id"] == server["trace_id"] && p["parent_span_id"] == server["span_id"])
                .with_context(|| format!("{}: no producer span under its request:\n{}", ctx(), all()))?;
            let span = process
                .iter()
                .find(|s| s["attributes"]["messaging.kafka.offset"] == m.offset)
                .with_context(|| format!("{}: no process span:\n{}", ctx(), all()))?;
            let a = &span["attributes"];
            ensure!(span["name"] == format!("process {topic}").as_str(), "{}: {span}", ctx());
            ensure!(
                a["messaging.system"] == "kafka" && a["messaging.operation.type"] == "process",
                "{}: {span}",
                ctx()
            );
            ensure!(a["messaging.destination.name"] == topic.as_str(), "{}: {span}", ctx());
            ensure!(a["messaging.destination.partition.id"] == "0", "{}: {span}", ctx());
            ensure!(a["messaging.kafka.message.key"] == *key, "{}: {span}", ctx());
            // The reader's group and broker are read as a fetch begins: the first fetch
            // was waiting before inject attached.
            if m.offset > 0 {
                ensure!(a["messaging.consumer.group.name"] == "kafkasvc", "{}: {span}", ctx());
                ensure!(a["server.address"] == "127.0.0.1", "{}: {span}", ctx());
            }
            if *own {
                ensure!(m.headers == "app=v1", "{}: headers {}", ctx(), m.headers);
                ensure!(
                    span["parent_span_id"].is_null() && span["trace_id"] != server["trace_id"],
                    "{}: {span}",
                    ctx()
                );
            } else {
                let tp = format!(
                    "00-{}-{}-01",
                    producer["trace_id"].as_str().unwrap_or_default(),
                    producer["span_id"].as_str().unwrap_or_default()
                );
                ensure!(m.headers == format!("traceparent={tp}"), "{}: headers {}, want {tp}", ctx(), m.headers);
                ensure!(span["trace_id"] == server["trace_id"], "{}: not in the request's trace: {span}", ctx());
                ensure!(span["parent_span_id"] == producer["span_id"] && span["parent_remote"] == true, "{}", ctx());
            }
            let client = clients
                .iter()
                .find(|c| c["parent_span_id"] == span["span_id"])
                .with_context(|| format!("{}: no backend request under its processing:\n{}", ctx(), all()))?;
            ensure!(client["trace_id"] == span["trace_id"], "{}: {client}", ctx());
        }
        let added = THROUGH.iter().filter(|r| !r.3).map(|r| r.1 as u64).sum::<u64>();
        let own = THROUGH.iter().filter(|r| r.3).map(|r| r.1 as u64).sum::<u64>();
        ensure!(
            psum["kafka_headers_added"] == added && psum["kafka_headers_own"] == own,
            "{what}: producer summary {psum}"
        );
        ensure!(csum["dropped"] == 0 && psum["dropped"] == 0, "{what}: records dropped");
        // The RED metrics count every send and every message processed.
        let (sends, processed) = (
            console_count(&pi.transcript(), "messaging.client.operation.duration"),
            console_count(&ci.transcript(), "messaging.process.duration"),
        );
        ensure!(
            sends == THROUGH.len() as u64 && processed == want as u64,
            "{what}: metrics counted {sends} sends and {processed} messages processed"
        );
        ensure!(psum["kept_bytes"] == ring_abi::arena::LEN as u64 && csum["kept_bytes"] == 0, "{what}: kept");
        eprintln!("kafka: {what}: {want} messages, each one trace from its request to the consumer's backend call");
    }
    Ok(())
}

/// kafka-go under uprobes (`--backend uprobe`): a consumer traced by uprobes continues the
/// trace of each message a trampoline-traced producer wrote (CONSUMER spans under the
/// PRODUCER span, the backend request under the processing); a producer traced by uprobes
/// makes its PRODUCER spans under their requests, but writes no header (the trampolines'
/// arena holds it, and uprobes have none: said on attaching, none counted), so the
/// consumer's processing starts traces of its own. Newest Go and kafka-go.
#[test]
fn kafka_go_under_uprobes() -> Result<()> {
    if !tests::require_ptrace()? || !tests::require_bpf()? || !require_kafka()? {
        return Ok(());
    }
    let tc = test_toolchains()?.pop().context("no Go")?;
    let kafka_go = xtask::kafka_go_newest(&tc.version);
    let exe = build_pinned_fixture("kafkasvc", None, &[(KAFKA_GO, kafka_go)], &tc, Flavor::Default)?;
    let backend = build_fixture("httpserver", &tc, Flavor::Default)?;
    let Some((_serial, kafka)) = prepare()? else { return Ok(()) };
    let brokers = kafka.addr();
    for (n, producer_backend) in ["trampoline", "uprobe"].into_iter().enumerate() {
        let what = format!("Go {} kafka-go {kafka_go}, producer on {producer_backend}s", tc.version);
        let topic = format!("uprobe-{n}");
        let mut back = start_fixture(&backend, &[], &[])?;
        let url = format!("http://{}/hello", back.value("LISTEN").context("backend LISTEN")?);
        let args = ["-mode", "consumer", "-brokers", &brokers, "-topic", &topic, "-partitions", "1", "-backend", &url];
        let mut consumer = start_fixture(&exe, &args, &[])?;
        let args = ["-mode", "producer", "-brokers", &brokers, "-topic", &topic, "-partitions", "1"];
        let mut producer = start_fixture(&exe, &args, &[])?;
        let addr = producer.value("LISTEN").context("producer LISTEN")?;
        let (mut pi, p_jsonl, p_summary) = attach_by(&producer, "producer", producer_backend)?;
        let (mut ci, c_jsonl, c_summary) = attach_by(&consumer, "consumer", "uprobe")?;
        let want = produce_through(&what, &addr, &mut consumer, [&mut pi, &mut ci])?;
        for (p, name) in [(&mut producer, "producer"), (&mut consumer, "consumer"), (&mut back, "backend")] {
            p.signal(15);
            ensure!(p.wait(LIMIT)?.success(), "{what}: the {name} failed:\n{}", p.transcript());
        }
        let msgs = messages(&consumer)?;
        ensure!(msgs.len() == want, "{what}: {} messages consumed, want {want}", msgs.len());
        let (ps, cs) = (tests::schema::read_jsonl(&p_jsonl)?, tests::schema::read_jsonl(&c_jsonl)?);
        let psum = tests::schema::read_summary(&p_summary)?;
        let csum = tests::schema::read_summary(&c_summary)?;
        for f in [&p_jsonl, &c_jsonl, &p_summary, &c_summary] {
            let _ = std::fs::remove_file(f);
        }
        let of =
            |v: &[serde_json::Value], kind: &str| v.iter().filter(|s| s["kind"] == kind).cloned().collect::<Vec<_>>();
        let (servers, producers) = (of(&ps, "SERVER"), of(&ps, "PRODUCER"));
        let (process, clients) = (of(&cs, "CONSUMER"), of(&cs, "CLIENT"));
        let all = || format!("producer side: {ps:?}\nconsumer side: {cs:?}");
        ensure!(servers.len() == THROUGH.len() && producers.len() == THROUGH.len(), "{what}: {}", all());
        ensure!(process.len() == want && clients.len() == want, "{what}: consumer spans: {}", all());
        ensure!(csum["dropped"] == 0 && psum["dropped"] == 0, "{what}: records dropped");
        let uprobes = |sum: &serde_json::Value| {
            sum["sites"].as_array().map_or(0, |v| v.iter().filter(|s| s["backend"] == "uprobe").count())
        };
        ensure!(uprobes(&csum) > 0, "{what}: the consumer's sites: {}", csum["sites"]);
        for m in &msgs {
            let (i, (path, _, _, own)) =
                THROUGH.iter().enumerate().find(|(_, r)| r.2 == m.key).context("a key nobody wrote")?;
            let ctx = || format!("{what}: {path}: offset {}", m.offset);
            let (server, span) =
                (&servers[i], process.iter().find(|s| s["attributes"]["messaging.kafka.offset"] == m.offset));
            let span = span.with_context(|| format!("{}: no process span: {}", ctx(), all()))?;
            let producer = producers
                .iter()
                .find(|p| p["trace_id"] == server["trace_id"] && p["parent_span_id"] == server["span_id"])
                .with_context(|| format!("{}: no producer span under its request: {}", ctx(), all()))?;
            ensure!(span["name"] == format!("process {topic}").as_str(), "{}: {span}", ctx());
            let carried = producer_backend == "trampoline" && !own;
            if carried {
                ensure!(m.headers.starts_with("traceparent="), "{}: headers {}", ctx(), m.headers);
                ensure!(span["trace_id"] == server["trace_id"], "{}: not in the request's trace: {span}", ctx());
                ensure!(span["parent_span_id"] == producer["span_id"] && span["parent_remote"] == true, "{}", ctx());
            } else {
                ensure!(!m.headers.contains("traceparent"), "{}: headers {}", ctx(), m.headers);
                ensure!(span["parent_span_id"].is_null() && span["trace_id"] != server["trace_id"], "{}", ctx());
            }
            let client = clients.iter().find(|c| c["parent_span_id"] == span["span_id"]);
            ensure!(
                client.is_some_and(|c| c["trace_id"] == span["trace_id"]),
                "{}: no backend request under its processing: {}",
                ctx(),
                all()
            );
        }
        if producer_backend == "uprobe" {
            ensure!(uprobes(&psum) > 0 && psum["kafka_headers_added"] == 0, "{what}: producer summary {psum}");
            let said = pi.transcript().contains("messages leave without one");
            ensure!(said, "{what}: the producer's inject did not say its messages leave without a header");
        }
        eprintln!("kafka: {what}: {want} messages, consumer on uprobes, traces as expected");
    }
    Ok(())
}

/// The sizes of the mappings of inject's memory (its memfd) in `pid`.
fn inject_maps(pid: i32) -> Result<Vec<u64>> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    Ok(maps
        .lines()
        .filter(|l| l.contains(ring_abi::MEMFD_NAME))
        .filter_map(|l| {
            let (a, b) = l.split_whitespace().next()?.split_once('-')?;
            Some(u64::from_str_radix(b, 16).ok()? - u64::from_str_radix(a, 16).ok()?)
        })
        .collect())
}
