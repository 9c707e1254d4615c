//! github.com/segmentio/kafka-go without code changes: a PRODUCER span per
//! `(*Writer).WriteMessages` call, by the OpenTelemetry messaging conventions for Kafka:
//! named `send <topic>`, `messaging.system` kafka, the operation (`send`), the topic as
//! `messaging.destination.name`, `messaging.batch.message_count` for a call of several
//! messages and the key (`messaging.kafka.message.key`) for a call of one, the broker the
//! writer was given (`kafka.TCP(...)`) as `server.*`, and the error the call returned.
//!
//! The span is the whole call, on the caller's goroutine: for a synchronous writer (the
//! default) WriteMessages returns once every message was acknowledged or failed, which is
//! what the caller waited for. It is a child of the span the goroutine serves (a handler's
//! request, from any goroutine under it). The topic is the writer's, or else the first
//! message's (a writer without a topic takes each message's own).

use trampolines::codegen::{CapturePlan, Fetch, Op, When};

use super::{Alt, Attr, Described, LibState, Library, Notes, PlanCx, Planned, SpanKind, field, one_of};
use crate::ring::Record;

const RAX: u8 = 0;
const RBX: u8 = 1;
const RDI: u8 = 3;
const RSI: u8 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Probe {
    Write,
}

impl Probe {
    fn from_u8(p: u8) -> Option<Probe> {
        [Probe::Write].get(usize::from(p)).copied()
    }
}

const KAFKA: &str = "github.com/segmentio/kafka-go";
const WRITE: &str = "github.com/segmentio/kafka-go.(*Writer).WriteMessages";

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
        super::plan_candidates(cx, &[(Probe::Write as u8, WRITE)], |p| {
            Ok(match Probe::from_u8(p).ok_or_else(|| format!("probe {p}"))? {
                Probe::Write => {
                    (CapturePlan { ints: 1 << RSI, ops: entry.clone()?, ..CapturePlan::default() }, ret.clone())
                }
            })
        })
    }

    fn is_span(&self, probe: u8) -> bool {
        Probe::from_u8(probe).is_some()
    }

    fn state(&self) -> Box<dyn LibState> {
        Box::new(super::sql::NoEvents)
    }

    fn describe(
        &self,
        probe: u8,
        entry: &Record,
        ret: Option<&Record>,
        _notes: Option<&Notes>,
        type_name: &mut dyn FnMut(u64) -> Option<String>,
    ) -> Option<Described> {
        Probe::from_u8(probe)?;
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
