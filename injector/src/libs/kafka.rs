//! github.com/segmentio/kafka-go without code changes, by the OpenTelemetry messaging
//! conventions for Kafka:
//! - a PRODUCER span per `(*Writer).WriteMessages` call: `send <topic>`, the topic as
//!   `messaging.destination.name`, `messaging.batch.message_count` for a call of several
//!   messages and the key for a call of one, the broker the writer was given
//!   (`kafka.TCP(...)`) as `server.*`, and the error the call returned. The span is the
//!   whole call, on the caller's goroutine, a child of the span the goroutine serves;
//! - its context into the messages: each message without headers of its own gets a
//!   `traceparent` header as kafka-go copies it into a batch (`(*writeBatch).add`); the
//!   header lives in the ring's arena (`ring_abi::arena`), not in the application's memory;
//! - a CONSUMER span `process <topic>` per message `(*Reader).FetchMessage` (and so
//!   `ReadMessage`) returns: from the return to the goroutine's next fetch, the processing
//!   of the message. Its parent is the message's `traceparent` (the producer's span), and
//!   it is the context of the goroutine meanwhile, so the calls made while processing the
//!   message are its children; inside a span the goroutine serves, it is that span's
//!   child instead, and the goroutine's context stays.

use trampolines::codegen::{CapturePlan, Fetch, Guard, Op, SP, When};

use super::{
    Alt, Attr, Described, LibProbe, LibState, Library, Notes, OpenSpans, PlanCx, Planned, SpanKind, field, one_of,
};
use crate::libs::reg::{RAX, RBX, RDI, RSI};
use crate::ring::Record;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Probe {
    Write,
    /// A message copied into a batch: its header (an event).
    Add,
    /// A message fetched (return) and the next fetch (entry): events that open and end
    /// the message's processing span.
    Fetch,
}

impl Probe {
    fn from_u8(p: u8) -> Option<Probe> {
        [Probe::Write, Probe::Add, Probe::Fetch].get(usize::from(p)).copied()
    }
}

const KAFKA: &str = "github.com/segmentio/kafka-go";
const WRITE: &str = "github.com/segmentio/kafka-go.(*Writer).WriteMessages";
const ADD: &str = "github.com/segmentio/kafka-go.(*writeBatch).add";
const FETCH: &str = "github.com/segmentio/kafka-go.(*Reader).FetchMessage";
/// Where a stack-assigned `Message` lies, from the stack pointer at the entry of `add`
/// (its first argument after the receiver, which a register holds) and at the return of
/// `FetchMessage` (its first result; both arguments are in registers): just above the
/// return address.
const MSG_ON_STACK: i32 = 8;

/// Where values land in the records.
mod at {
    use ring_abi::span_ids;
    /// Entry: the writer's topic, the first message's topic and key, the broker address.
    pub const TOPIC: u16 = span_ids::LEN as u16;
    pub const TOPIC_MAX: u16 = 120;
    pub const MSG_TOPIC: u16 = TOPIC + 8 + TOPIC_MAX;
    pub const KEY: u16 = MSG_TOPIC + 8 + TOPIC_MAX;
    pub const KEY_MAX: u16 = 64;
    pub const ADDR: u16 = KEY + 8 + KEY_MAX;
    pub const ADDR_MAX: u16 = 100;
    /// Return: an `errorString`'s text.
    pub const MESSAGE: u16 = 0;
    pub const MESSAGE_MAX: u16 = 120;
    /// Fetch entry: the reader's consumer group and first broker.
    pub const GROUP: u16 = 0;
    pub const GROUP_MAX: u16 = 120;
    pub const BROKER: u16 = GROUP + 8 + GROUP_MAX;
    /// Fetch return: the span's ids, then the message's topic, partition, offset, key.
    pub const M_TOPIC: u16 = span_ids::LEN as u16;
    pub const PARTITION: u16 = M_TOPIC + 8 + TOPIC_MAX;
    pub const OFFSET: u16 = PARTITION + 8;
    pub const M_KEY: u16 = OFFSET + 8;
}

pub struct KafkaGo;

impl Library for KafkaGo {
    fn name(&self) -> &'static str {
        "kafka-go"
    }

    fn scope(&self) -> &'static str {
        "inject/github.com/segmentio/kafka-go"
    }

    fn plan(&self, cx: &PlanCx<'_>) -> Planned {
        if !cx.funcs.iter().any(|f| f.name == WRITE) {
            return Planned::default();
        }
        let mut offsets =
            go_abi::runtime::FieldOffsets::new(cx.ctx.dwarf.as_ref(), cx.release).with_modules(&cx.bin.build_info.deps);
        let itab = |c: &str, i: &str| cx.bin.itab(c, i).map(|a| a + cx.bias);
        // Without itab symbols (stripped, Go 1.27) itabs are found by the type's name as
        // the binary spells it: package `kafka`, which its path's last element is not.
        let network_address =
            itab(&format!("*{KAFKA}.networkAddress"), "net.Addr").or_else(|| itab("*kafka.networkAddress", "net.Addr"));
        let error_string = itab("*errors.errorString", "error").zip(offsets.get("errors.errorString.s"));
        let mut get = |k: &str| {
            offsets.get(&format!("{KAFKA}{k}")).and_then(|o| i32::try_from(o).ok()).ok_or_else(|| format!("{KAFKA}{k}"))
        };
        let entry = (|| -> Result<Vec<Op>, String> {
            let topic = get(".Writer.Topic")?;
            let addr = get(".Writer.Addr")?;
            let msg_topic = get(".Message.Topic")?;
            let key = get(".Message.Key")?;
            let mut ops = vec![
                Op::ChildSpan { dest: 0 },
                // (w *Writer) WriteMessages(ctx, msgs ...Message): w in RAX, msgs in RDI, RSI.
                field(RAX, Vec::new(), topic, Fetch::Str { max: at::TOPIC_MAX }, at::TOPIC, Vec::new()),
                // The first message, when there is one: `make([]Message, 0)` points at
                // the runtime's zero base, after which no Message lies.
                field(
                    RDI,
                    Vec::new(),
                    msg_topic,
                    Fetch::Str { max: at::TOPIC_MAX },
                    at::MSG_TOPIC,
                    vec![When::nonzero(RSI)],
                ),
                field(RDI, Vec::new(), key, Fetch::Str { max: at::KEY_MAX }, at::KEY, vec![When::nonzero(RSI)]),
            ];
            // The broker: kafka.TCP(address) makes a *networkAddress (its `address` a
            // host:port); any other net.Addr names no server.
            let broker = network_address.zip(get(".networkAddress.address").ok()).map(|(t, a)| Alt {
                reg: RAX,
                path: vec![addr + 8],
                off: a,
                when: vec![When::at(RAX, Vec::new(), addr, t)],
            });
            ops.extend(one_of(at::ADDR, Fetch::Str { max: at::ADDR_MAX }, broker.into_iter().collect()));
            Ok(ops)
        })();
        // The error (RAX itab, RBX data): an errorString's text, else its type names it.
        let messages = error_string
            .and_then(|(t, s)| {
                Some(Alt { reg: RBX, path: Vec::new(), off: i32::try_from(s).ok()?, when: vec![When::reg(RAX, t)] })
            })
            .into_iter()
            .collect();
        let ret = CapturePlan {
            ints: 0b11,
            ops: one_of(at::MESSAGE, Fetch::Str { max: at::MESSAGE_MAX }, messages),
            ..CapturePlan::default()
        };
        let headers = get(".Message.Headers");
        // Headers go in only where a message is copied into a batch (`add` may be inlined).
        let inject = headers.is_ok() && cx.funcs.iter().any(|f| f.name == ADD);
        let consume = (|| -> Result<(CapturePlan, CapturePlan), String> {
            let config = get(".Reader.config")?;
            let group = get(".ReaderConfig.GroupID")?;
            let brokers = get(".ReaderConfig.Brokers")?;
            let mut msg = |k: &str| get(&format!(".Message.{k}")).map(|o| MSG_ON_STACK + o);
            // Entry: the previous message's processing ends; the reader names its group
            // and (its first) broker.
            let entry = CapturePlan {
                ops: vec![
                    Op::ConsumeEnd,
                    field(RAX, Vec::new(), config + group, Fetch::Str { max: at::GROUP_MAX }, at::GROUP, Vec::new()),
                    field(
                        RAX,
                        vec![config + brokers],
                        0,
                        Fetch::Str { max: at::ADDR_MAX },
                        at::BROKER,
                        vec![When { differs: true, ..When::at(RAX, Vec::new(), config + brokers + 8, 0) }],
                    ),
                ],
                ..CapturePlan::default()
            };
            // Return, when no error came back (RAX: the error's itab): the message.
            let ret = CapturePlan {
                guard: Some(Guard::Zero { reg: RAX }),
                ops: vec![
                    Op::ConsumeBegin { headers: msg("Headers")?, dest: 0 },
                    field(SP, Vec::new(), msg("Topic")?, Fetch::Str { max: at::TOPIC_MAX }, at::M_TOPIC, Vec::new()),
                    field(SP, Vec::new(), msg("Partition")?, Fetch::Word, at::PARTITION, Vec::new()),
                    field(SP, Vec::new(), msg("Offset")?, Fetch::Word, at::OFFSET, Vec::new()),
                    field(SP, Vec::new(), msg("Key")?, Fetch::Str { max: at::KEY_MAX }, at::M_KEY, Vec::new()),
                ],
                ..CapturePlan::default()
            };
            Ok((entry, ret))
        })();
        let mut ret = ret;
        if inject {
            ret.ops.push(Op::KafkaEnd);
        }
        let candidates = [(Probe::Write as u8, WRITE), (Probe::Add as u8, ADD), (Probe::Fetch as u8, FETCH)];
        super::plan_candidates(cx, &candidates, |p| {
            Ok(match Probe::from_u8(p).ok_or_else(|| format!("probe {p}"))? {
                Probe::Write => {
                    let mut ops = entry.clone()?;
                    if inject {
                        ops.push(Op::KafkaSlot { dest: 0 });
                    }
                    (CapturePlan { ints: 1 << RSI, ops, ..CapturePlan::default() }, ret.clone())
                }
                Probe::Add => {
                    if !inject {
                        return Err(format!("{KAFKA}.Message.Headers"));
                    }
                    let entry = CapturePlan {
                        ops: vec![Op::KafkaHeader { headers: MSG_ON_STACK + headers.clone()?, dest: 0 }],
                        guard: Some(Guard::Tagged { bit: ring_abi::ctx::KAFKA_TAG_BIT }),
                        ..CapturePlan::default()
                    };
                    (entry, CapturePlan { off: true, ..CapturePlan::default() })
                }
                Probe::Fetch => consume.clone()?,
            })
        })
    }

    fn is_span(&self, probe: u8) -> bool {
        Probe::from_u8(probe) == Some(Probe::Write)
    }

    fn state(&self) -> Box<dyn LibState> {
        Box::new(KafkaState::default())
    }

    fn describe(
        &self,
        probe: u8,
        entry: &Record,
        ret: Option<&Record>,
        notes: Option<&Notes>,
        type_name: &mut dyn FnMut(u64) -> Option<String>,
    ) -> Option<Described> {
        if Probe::from_u8(probe)? == Probe::Fetch {
            return Some(describe_process(entry, notes));
        }
        let data = &entry.data;
        let count = entry.ints[usize::from(RSI)];
        // WriteMessages of nothing returns at once, sending nothing.
        if count == 0 {
            return None;
        }
        let topic = super::string_at(data, at::TOPIC, at::TOPIC_MAX)
            .or_else(|| super::string_at(data, at::MSG_TOPIC, at::TOPIC_MAX));
        let mut attrs: Vec<(&'static str, Attr)> = vec![
            ("messaging.system", Attr::S("kafka".into())),
            ("messaging.operation.name", Attr::S("send".into())),
            ("messaging.operation.type", Attr::S("send".into())),
        ];
        if let Some(t) = &topic {
            attrs.push(("messaging.destination.name", Attr::S(t.clone())));
        }
        // The conventions: a batch's count, a single message's key.
        if count >= 2 {
            attrs.push(("messaging.batch.message_count", Attr::I(i64::try_from(count).unwrap_or(i64::MAX))));
        } else if let Some(k) = super::string_at(data, at::KEY, at::KEY_MAX) {
            attrs.push(("messaging.kafka.message.key", Attr::S(k)));
        }
        if let Some(addr) = super::string_at(data, at::ADDR, at::ADDR_MAX) {
            let (host, port) = super::split_host_port(&addr);
            attrs.push(("server.address", Attr::S(host)));
            if let Some(p) = port {
                attrs.push(("server.port", Attr::I(p)));
            }
        }
        let error = ret.and_then(|r| {
            let itab = r.ints[0];
            if itab == 0 {
                return None;
            }
            let message = super::string_at(&r.data, at::MESSAGE, at::MESSAGE_MAX);
            let ty = type_name(itab);
            attrs.push(("error.type", Attr::S(ty.clone().unwrap_or_else(|| "_OTHER".into()))));
            Some(message.or(ty).unwrap_or_else(|| "error".into()))
        });
        let name = match &topic {
            Some(t) => format!("send {t}"),
            None => "send".into(),
        };
        Some(Described { kind: SpanKind::Producer, name, attrs, error })
    }
}

/// A message's processing: `entry` is the record of the fetch's return (the message),
/// `notes` what the fetch's entry said of the reader.
fn describe_process(entry: &Record, notes: Option<&Notes>) -> Described {
    let data = &entry.data;
    let topic = super::string_at(data, at::M_TOPIC, at::TOPIC_MAX);
    let mut attrs: Vec<(&'static str, Attr)> = vec![
        ("messaging.system", Attr::S("kafka".into())),
        ("messaging.operation.name", Attr::S("process".into())),
        ("messaging.operation.type", Attr::S("process".into())),
    ];
    if let Some(t) = &topic {
        attrs.push(("messaging.destination.name", Attr::S(t.clone())));
    }
    if let Some(p) = super::word_at(data, at::PARTITION) {
        attrs.push(("messaging.destination.partition.id", Attr::S(p.to_string())));
    }
    if let Some(o) = super::word_at(data, at::OFFSET) {
        attrs.push(("messaging.kafka.offset", Attr::I(o as i64)));
    }
    if let Some(k) = super::string_at(data, at::M_KEY, at::KEY_MAX) {
        attrs.push(("messaging.kafka.message.key", Attr::S(k)));
    }
    attrs.extend(notes.into_iter().flat_map(|n| n.attrs.iter().cloned()));
    let name = match &topic {
        Some(t) => format!("process {t}"),
        None => "process".into(),
    };
    Described { kind: SpanKind::Consumer, name, attrs, error: None }
}

/// Headers added and left out, and what each goroutine's last fetch said of its reader.
#[derive(Default)]
struct KafkaState {
    added: u64,
    own_headers: u64,
    readers: std::collections::HashMap<u64, Notes>,
}

impl LibState for KafkaState {
    fn span_start(&mut self, _probe: u8, _rec: &Record) -> Option<Notes> {
        None
    }

    fn event(&mut self, probe: LibProbe, rec: Record, spans: &mut dyn OpenSpans) {
        match Probe::from_u8(probe.probe) {
            Some(Probe::Add) => match super::word_at(&rec.data, 0) {
                Some(1) => self.added += 1,
                Some(2) => self.own_headers += 1,
                _ => {}
            },
            Some(Probe::Fetch) if rec.kind == ring_abi::Kind::Entry => {
                // The previous message's processing ends where the goroutine fetches again.
                spans.release(probe.lib, rec.goid, rec.clone());
                let mut n = Notes::default();
                if let Some(g) = super::string_at(&rec.data, at::GROUP, at::GROUP_MAX) {
                    n.set("messaging.consumer.group.name", Attr::S(g));
                }
                if let Some(b) = super::string_at(&rec.data, at::BROKER, at::ADDR_MAX) {
                    let (host, port) = super::split_host_port(&b);
                    n.set("server.address", Attr::S(host));
                    if let Some(p) = port {
                        n.set("server.port", Attr::I(p));
                    }
                }
                if self.readers.len() >= 1 << 16 {
                    self.readers.clear();
                }
                self.readers.insert(rec.goid, n);
            }
            Some(Probe::Fetch) => {
                let notes = self.readers.get(&rec.goid).cloned();
                spans.begin_held(probe.lib, rec.goid, rec, notes);
            }
            _ => {}
        }
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![("kafka_headers_added", self.added), ("kafka_headers_own", self.own_headers)]
    }
}
