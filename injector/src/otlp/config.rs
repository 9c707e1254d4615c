//! OTLP configuration the way every OpenTelemetry agent takes it: the standard OTEL_*
//! variables, each with a flag that wins over it. Everything is resolved and checked at
//! start, so a typo is an error before we touch the target, not a silent fallback.

use std::collections::BTreeMap;
use std::time::Duration;

use thiserror::Error;

use super::tls::{Pem, Tls};

#[derive(Debug, Clone, Default, clap::Args)]
pub struct OtelArgs {
    /// OTLP endpoint, as OTEL_EXPORTER_OTLP_ENDPOINT (for HTTP, /v1/traces is appended).
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// grpc, http/protobuf or http/json (OTEL_EXPORTER_OTLP_PROTOCOL; default http/protobuf).
    #[arg(long, value_name = "PROTOCOL")]
    pub otlp_protocol: Option<String>,
    /// An extra request header or gRPC metadata entry, KEY=VALUE (repeatable; adds to
    /// OTEL_EXPORTER_OTLP_HEADERS).
    #[arg(long = "otlp-header", value_name = "KEY=VALUE")]
    pub otlp_headers: Vec<String>,
    /// Time limit for one export request, in ms or with a unit (10s, 500ms)
    /// (OTEL_EXPORTER_OTLP_TIMEOUT; default 10s).
    #[arg(long, value_name = "DURATION")]
    pub otlp_timeout: Option<String>,
    /// gzip or none (OTEL_EXPORTER_OTLP_COMPRESSION).
    #[arg(long, value_name = "NAME")]
    pub otlp_compression: Option<String>,
    /// Spans held while the endpoint is slow or down; beyond this they are dropped and
    /// counted (OTEL_BSP_MAX_QUEUE_SIZE; default 65536).
    #[arg(long, value_name = "N")]
    pub otlp_queue: Option<usize>,
    /// service.name (OTEL_SERVICE_NAME; default: the executable's name).
    #[arg(long, value_name = "NAME")]
    pub service_name: Option<String>,
    /// A resource attribute, KEY=VALUE (repeatable; wins over OTEL_RESOURCE_ATTRIBUTES).
    #[arg(long = "resource-attr", value_name = "KEY=VALUE")]
    pub resource_attrs: Vec<String>,
    /// always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off
    /// or parentbased_traceidratio (OTEL_TRACES_SAMPLER; default parentbased_always_on).
    #[arg(long, value_name = "NAME")]
    pub sampler: Option<String>,
    /// The sampler's argument: the ratio for the traceidratio samplers (OTEL_TRACES_SAMPLER_ARG).
    #[arg(long, value_name = "ARG")]
    pub sampler_arg: Option<String>,
    /// PEM file of the CA certificate(s) an `https://` endpoint's certificate is verified
    /// against, besides the system's roots (OTEL_EXPORTER_OTLP_CERTIFICATE).
    #[arg(long, value_name = "FILE")]
    pub otlp_certificate: Option<String>,
    /// PEM file of inject's client certificate, for mutual TLS
    /// (OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE).
    #[arg(long, value_name = "FILE")]
    pub otlp_client_certificate: Option<String>,
    /// PEM file of the client certificate's private key (OTEL_EXPORTER_OTLP_CLIENT_KEY).
    #[arg(long, value_name = "FILE")]
    pub otlp_client_key: Option<String>,
    /// gRPC without TLS to an endpoint given without a scheme (OTEL_EXPORTER_OTLP_INSECURE;
    /// without it such an endpoint is https).
    #[arg(long)]
    pub otlp_insecure: bool,
    /// Where the RED metrics go: otlp, prometheus, console or none (OTEL_METRICS_EXPORTER;
    /// default otlp when spans go to OTLP, else none).
    #[arg(long = "metrics", value_name = "EXPORTER")]
    pub metrics: Option<String>,
    /// Also a duration histogram per function --func names (`inject.function.duration`).
    #[arg(long)]
    pub func_metrics: bool,
}

#[derive(Debug, Error, PartialEq)]
pub enum ConfigError {
    #[error("{source_name}: {value:?} is not a valid endpoint: {why}")]
    Endpoint { source_name: String, value: String, why: String },
    #[error("{source_name}: unknown protocol {value:?}; use grpc, http/protobuf or http/json")]
    Protocol { source_name: String, value: String },
    #[error("{source_name}: {entry:?} is not KEY=VALUE with a valid header name and value")]
    Header { source_name: String, entry: String },
    #[error("{source_name}: {value:?} is not a duration (milliseconds, or a number with ms/s/m)")]
    Duration { source_name: String, value: String },
    #[error("{source_name}: unknown compression {value:?}; use gzip or none")]
    Compression { source_name: String, value: String },
    #[error("{source_name}: {entry:?} is not KEY=VALUE")]
    Attribute { source_name: String, entry: String },
    #[error("{source_name}: unknown sampler {value:?}; use {SAMPLERS}")]
    Sampler { source_name: String, value: String },
    #[error("{source_name}: {value:?} is not a ratio between 0 and 1")]
    SamplerArg { source_name: String, value: String },
    #[error("{source_name}: {value:?} is not a positive number")]
    Number { source_name: String, value: String },
    #[error("{source_name}: unknown exporter {value:?}; inject exports traces with otlp, console or none")]
    Exporter { source_name: String, value: String },
    #[error("{source_name}: cannot use {path}: {why}")]
    File { source_name: String, path: String, why: String },
    #[error("{given} needs {missing} too: a client certificate goes with its private key")]
    ClientPair { given: String, missing: String },
    #[error("{source_name}: {value:?} is not true or false")]
    Bool { source_name: String, value: String },
    #[error("{source_name}: unknown metrics exporter {value:?}; use otlp, prometheus, console or none")]
    MetricsExporter { source_name: String, value: String },
    #[error(
        "{source_name}: {value:?}: use cumulative, delta or lowmemory (and cumulative when Prometheus scrapes: it \
         reads totals)"
    )]
    Temporality { source_name: String, value: String },
}

const SAMPLERS: &str =
    "always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off or parentbased_traceidratio";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
    HttpJson,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampler {
    AlwaysOn,
    AlwaysOff,
    Ratio(f64),
    /// Follows a remote parent's sampled flag; roots use the inner sampler.
    ParentBased(RootSampler),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RootSampler {
    AlwaysOn,
    AlwaysOff,
    Ratio(f64),
}

impl RootSampler {
    fn sample(self, trace_id: u128) -> bool {
        match self {
            RootSampler::AlwaysOn => true,
            RootSampler::AlwaysOff => false,
            RootSampler::Ratio(r) => ratio_sample(r, trace_id),
        }
    }

    /// The bound the trace id's shifted low half is held to (see [`ratio_sample`]).
    fn below(self) -> u64 {
        match self {
            RootSampler::AlwaysOn => u64::MAX,
            RootSampler::AlwaysOff => 0,
            RootSampler::Ratio(r) => ratio_bound(r),
        }
    }
}

/// The specification's TraceIdRatioBased rule (as the Go and Java SDKs apply it): the
/// low 8 bytes of the trace id against the ratio, so every span of a trace, in every
/// process, gets the same verdict.
fn ratio_sample(ratio: f64, trace_id: u128) -> bool {
    ((trace_id as u64) >> 1) < ratio_bound(ratio)
}

fn ratio_bound(ratio: f64) -> u64 {
    (ratio.clamp(0.0, 1.0) * (1u64 << 63) as f64) as u64
}

impl Sampler {
    /// The same decisions for the spans the trampolines begin, which must send the flag
    /// before the collector sees them.
    pub fn rule(&self) -> trampolines::codegen::Sampling {
        let (parent_based, root) = match *self {
            Sampler::AlwaysOn => (false, RootSampler::AlwaysOn),
            Sampler::AlwaysOff => (false, RootSampler::AlwaysOff),
            Sampler::Ratio(r) => (false, RootSampler::Ratio(r)),
            Sampler::ParentBased(root) => (true, root),
        };
        trampolines::codegen::Sampling { parent_based, root_below: root.below() }
    }

    /// `remote_parent`: the sampled flag of a parent from another process, if any.
    pub fn sample(&self, trace_id: u128, remote_parent: Option<bool>) -> bool {
        match *self {
            Sampler::AlwaysOn => true,
            Sampler::AlwaysOff => false,
            Sampler::Ratio(r) => ratio_sample(r, trace_id),
            Sampler::ParentBased(root) => match remote_parent {
                Some(sampled) => sampled,
                None => root.sample(trace_id),
            },
        }
    }
}

/// Where spans go when no --output is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultOutput {
    Otlp,
    Console,
    None,
}

#[derive(Debug, Clone)]
pub struct OtelConfig {
    /// The full traces URL (HTTP) or the server address (gRPC).
    pub endpoint: String,
    pub protocol: Protocol,
    /// Headers from flags only: the exporter crate reads OTEL_EXPORTER_OTLP_HEADERS itself
    /// (we still check it here).
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
    pub gzip: bool,
    pub queue: usize,
    pub batch: usize,
    pub delay: Duration,
    pub service_name: Option<String>,
    /// User-given resource attributes, variables first, flags after (later wins).
    pub resource: BTreeMap<String, String>,
    pub sampler: Sampler,
    /// CA and client certificate for `https://` endpoints.
    pub tls: super::tls::Tls,
    /// OTEL_SDK_DISABLED=true.
    pub disabled: bool,
    pub default_output: DefaultOutput,
}

/// Reads a variable; a test passes a map instead of the process environment.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

pub(crate) fn non_empty(env: Env<'_>, name: &str) -> Option<(String, String)> {
    env(name).map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).map(|v| (name.to_string(), v))
}

/// The flag, else the traces-specific variable, else the generic one.
pub(crate) fn pick(flag: &Option<String>, flag_name: &str, env: Env<'_>, names: &[&str]) -> Option<(String, String)> {
    if let Some(v) = flag {
        return Some((flag_name.to_string(), v.clone()));
    }
    names.iter().find_map(|n| non_empty(env, n))
}

/// Percent-decoding for W3C-baggage-style lists (OTEL_*_HEADERS, OTEL_RESOURCE_ATTRIBUTES).
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn parse_pairs(list: &str) -> Vec<Result<(String, String), String>> {
    list.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|entry| {
            let (k, v) = entry.split_once('=').ok_or_else(|| entry.to_string())?;
            let (k, v) = (k.trim(), v.trim());
            if k.is_empty() {
                return Err(entry.to_string());
            }
            Ok((percent_decode(k).ok_or(entry)?, percent_decode(v).ok_or(entry)?))
        })
        .collect()
}

fn check_header(source_name: &str, k: &str, v: &str, entry: &str) -> Result<(), ConfigError> {
    let bad = || ConfigError::Header { source_name: source_name.to_string(), entry: entry.to_string() };
    http::HeaderName::from_bytes(k.as_bytes()).map_err(|_| bad())?;
    http::HeaderValue::from_str(v).map_err(|_| bad())?;
    Ok(())
}

fn parse_duration(source_name: &str, value: &str) -> Result<Duration, ConfigError> {
    let bad = || ConfigError::Duration { source_name: source_name.to_string(), value: value.to_string() };
    let v = value.trim();
    let (num, scale) = if let Some(n) = v.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('m') {
        (n, 60.0)
    } else {
        (v, 1e-3)
    };
    let x: f64 = num.trim().parse().map_err(|_| bad())?;
    if !x.is_finite() || x < 0.0 || x * scale > 1e6 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(x * scale))
}

fn parse_count(source_name: &str, value: &str) -> Result<usize, ConfigError> {
    match value.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(ConfigError::Number { source_name: source_name.to_string(), value: value.to_string() }),
    }
}

/// Checks an endpoint URL: http or https, a host, no query.
pub(crate) fn check_endpoint(source_name: &str, value: &str) -> Result<http::Uri, ConfigError> {
    let bad = |why: &str| ConfigError::Endpoint {
        source_name: source_name.to_string(),
        value: value.to_string(),
        why: why.to_string(),
    };
    let uri: http::Uri = value.parse().map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        Some(other) => return Err(bad(&format!("the scheme must be http or https, not {other}"))),
        None => return Err(bad("give a scheme and host, e.g. http://localhost:4318")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    if uri.query().is_some() {
        return Err(bad("an endpoint takes no query string"));
    }
    Ok(uri)
}

fn parse_sampler(name: &(String, String), arg: Option<&(String, String)>) -> Result<Sampler, ConfigError> {
    let ratio = || -> Result<f64, ConfigError> {
        match arg {
            None => Ok(1.0),
            Some((src, v)) => match v.trim().parse::<f64>() {
                Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
                _ => Err(ConfigError::SamplerArg { source_name: src.clone(), value: v.clone() }),
            },
        }
    };
    Ok(match name.1.trim().to_ascii_lowercase().as_str() {
        "always_on" => Sampler::AlwaysOn,
        "always_off" => Sampler::AlwaysOff,
        "traceidratio" => Sampler::Ratio(ratio()?),
        "parentbased_always_on" => Sampler::ParentBased(RootSampler::AlwaysOn),
        "parentbased_always_off" => Sampler::ParentBased(RootSampler::AlwaysOff),
        "parentbased_traceidratio" => Sampler::ParentBased(RootSampler::Ratio(ratio()?)),
        _ => return Err(ConfigError::Sampler { source_name: name.0.clone(), value: name.1.clone() }),
    })
}

impl OtelConfig {
    pub fn resolve(args: &OtelArgs, env: Env<'_>) -> Result<OtelConfig, ConfigError> {
        Self::resolve_signal(args, env, "TRACES")
    }

    /// The configuration of one signal (`TRACES`, `METRICS`): its own variables
    /// (`OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`...) win over the generic ones, and a generic
    /// HTTP endpoint gets the signal's path (`/v1/metrics`).
    pub fn resolve_signal(args: &OtelArgs, env: Env<'_>, sig: &str) -> Result<OtelConfig, ConfigError> {
        let n = |w: &str| format!("OTEL_EXPORTER_OTLP_{sig}_{w}");
        let path = format!("/v1/{}", sig.to_ascii_lowercase());
        let protocol =
            match pick(&args.otlp_protocol, "--otlp-protocol", env, &[&n("PROTOCOL"), "OTEL_EXPORTER_OTLP_PROTOCOL"]) {
                None => Protocol::HttpProtobuf,
                Some((src, v)) => match v.to_ascii_lowercase().as_str() {
                    "grpc" => Protocol::Grpc,
                    "http/protobuf" => Protocol::HttpProtobuf,
                    "http/json" => Protocol::HttpJson,
                    _ => return Err(ConfigError::Protocol { source_name: src, value: v }),
                },
            };
        let insecure = insecure(args, env, &n("INSECURE"))?;
        // gRPC may name host:port alone: TLS unless insecure, as the specification says.
        let schemed = |e: Option<(String, String)>| match e {
            Some((src, v)) if protocol == Protocol::Grpc && !v.contains("://") => {
                Some((src, format!("{}://{v}", if insecure { "http" } else { "https" })))
            }
            e => e,
        };
        // The generic endpoint is a base (HTTP appends the signal's path); the signal's own is used as is.
        let traces = schemed(non_empty(env, &n("ENDPOINT")));
        let generic = schemed(match &args.otlp_endpoint {
            Some(v) => Some(("--otlp-endpoint".to_string(), v.clone())),
            None => non_empty(env, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        });
        let endpoint_configured = generic.is_some() || traces.is_some();
        let endpoint = match (&args.otlp_endpoint, traces, generic) {
            (None, Some((src, v)), _) => {
                check_endpoint(&src, &v)?;
                v
            }
            (_, _, Some((src, v))) => {
                check_endpoint(&src, &v)?;
                match protocol {
                    Protocol::Grpc => v,
                    _ => format!("{}{path}", v.trim_end_matches('/')),
                }
            }
            (_, _, None) => match protocol {
                Protocol::Grpc => "http://localhost:4317".to_string(),
                _ => format!("http://localhost:4318{path}"),
            },
        };

        // Variables are checked for the clear error; flags are passed on.
        for name in [n("HEADERS").as_str(), "OTEL_EXPORTER_OTLP_HEADERS"] {
            if let Some((src, list)) = non_empty(env, name) {
                for pair in parse_pairs(&list) {
                    let (k, v) =
                        pair.map_err(|entry| ConfigError::Header { source_name: src.clone(), entry: entry.clone() })?;
                    check_header(&src, &k, &v, &format!("{k}={v}"))?;
                }
            }
        }
        let mut headers = Vec::new();
        for entry in &args.otlp_headers {
            let src = "--otlp-header";
            let (k, v) = entry
                .split_once('=')
                .ok_or_else(|| ConfigError::Header { source_name: src.into(), entry: entry.clone() })?;
            check_header(src, k.trim(), v.trim(), entry)?;
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }

        let timeout =
            match pick(&args.otlp_timeout, "--otlp-timeout", env, &[&n("TIMEOUT"), "OTEL_EXPORTER_OTLP_TIMEOUT"]) {
                Some((src, v)) => parse_duration(&src, &v)?,
                None => Duration::from_secs(10),
            };
        let gzip = match pick(
            &args.otlp_compression,
            "--otlp-compression",
            env,
            &[&n("COMPRESSION"), "OTEL_EXPORTER_OTLP_COMPRESSION"],
        ) {
            None => false,
            Some((src, v)) => match v.to_ascii_lowercase().as_str() {
                "gzip" => true,
                "none" => false,
                _ => return Err(ConfigError::Compression { source_name: src, value: v }),
            },
        };
        let queue = match (args.otlp_queue, non_empty(env, "OTEL_BSP_MAX_QUEUE_SIZE")) {
            (Some(0), _) => return Err(ConfigError::Number { source_name: "--otlp-queue".into(), value: "0".into() }),
            (Some(n), _) => n,
            (None, Some((src, v))) => parse_count(&src, &v)?,
            (None, None) => 65_536,
        };
        let batch = match non_empty(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE") {
            Some((src, v)) => parse_count(&src, &v)?,
            None => 1024,
        }
        .min(queue);
        // The specification's default is 5 s; a debugging user wants spans within a second.
        let delay = match non_empty(env, "OTEL_BSP_SCHEDULE_DELAY") {
            Some((src, v)) => parse_duration(&src, &v)?,
            None => Duration::from_millis(500),
        };

        let mut resource = BTreeMap::new();
        if let Some((src, list)) = non_empty(env, "OTEL_RESOURCE_ATTRIBUTES") {
            for pair in parse_pairs(&list) {
                let (k, v) = pair.map_err(|entry| ConfigError::Attribute { source_name: src.clone(), entry })?;
                resource.insert(k, v);
            }
        }
        for entry in &args.resource_attrs {
            let (k, v) = entry.split_once('=').filter(|(k, _)| !k.trim().is_empty()).ok_or_else(|| {
                ConfigError::Attribute { source_name: "--resource-attr".into(), entry: entry.clone() }
            })?;
            resource.insert(k.trim().to_string(), v.trim().to_string());
        }
        let service_name = args.service_name.clone().or_else(|| non_empty(env, "OTEL_SERVICE_NAME").map(|(_, v)| v));

        let sampler_name = pick(&args.sampler, "--sampler", env, &["OTEL_TRACES_SAMPLER"]);
        let sampler_arg = pick(&args.sampler_arg, "--sampler-arg", env, &["OTEL_TRACES_SAMPLER_ARG"]);
        let sampler = match &sampler_name {
            Some(name) => parse_sampler(name, sampler_arg.as_ref())?,
            None => Sampler::ParentBased(RootSampler::AlwaysOn),
        };

        let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
        let default_output = match non_empty(env, "OTEL_TRACES_EXPORTER") {
            Some((src, v)) => match v.to_ascii_lowercase().as_str() {
                "otlp" => DefaultOutput::Otlp,
                "console" => DefaultOutput::Console,
                "none" => DefaultOutput::None,
                _ => return Err(ConfigError::Exporter { source_name: src, value: v }),
            },
            None if endpoint_configured => DefaultOutput::Otlp,
            None => DefaultOutput::Console,
        };
        let tls = resolve_tls(
            &Sources {
                ca: (&args.otlp_certificate, [&n("CERTIFICATE"), "OTEL_EXPORTER_OTLP_CERTIFICATE"]),
                cert: (
                    &args.otlp_client_certificate,
                    [&n("CLIENT_CERTIFICATE"), "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"],
                ),
                key: (&args.otlp_client_key, [&n("CLIENT_KEY"), "OTEL_EXPORTER_OTLP_CLIENT_KEY"]),
            },
            env,
        )?;
        Ok(OtelConfig {
            endpoint,
            protocol,
            headers,
            timeout,
            gzip,
            queue,
            batch,
            delay,
            service_name,
            resource,
            sampler,
            tls,
            disabled,
            default_output,
        })
    }
}

/// `--otlp-insecure`, else the signal's variable, else OTEL_EXPORTER_OTLP_INSECURE.
pub(crate) fn insecure(args: &OtelArgs, env: Env<'_>, signal_var: &str) -> Result<bool, ConfigError> {
    if args.otlp_insecure {
        return Ok(true);
    }
    match [signal_var, "OTEL_EXPORTER_OTLP_INSECURE"].iter().find_map(|n| non_empty(env, n)) {
        None => Ok(false),
        Some((src, v)) => match v.to_ascii_lowercase().as_str() {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(ConfigError::Bool { source_name: src, value: v }),
        },
    }
}

/// The flags and the variables of one signal (`TRACES`, `METRICS`), the signal's own
/// variable winning over the generic one.
pub struct Sources<'a> {
    pub ca: (&'a Option<String>, [&'a str; 2]),
    pub cert: (&'a Option<String>, [&'a str; 2]),
    pub key: (&'a Option<String>, [&'a str; 2]),
}

/// Reads a PEM file that must hold at least one block of one of `kinds`.
fn read_pem(source_name: &str, path: &str, kinds: &[&str], what: &str) -> Result<Pem, ConfigError> {
    let bad = |why: String| ConfigError::File { source_name: source_name.to_string(), path: path.to_string(), why };
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let text = String::from_utf8_lossy(&bytes);
    if !kinds.iter().any(|k| text.contains(&format!("-----BEGIN {k}-----"))) {
        return Err(bad(format!("it holds no PEM {what}")));
    }
    Ok(Pem { path: path.to_string(), bytes })
}

/// Resolves the TLS settings of one signal.
pub fn resolve_tls(s: &Sources<'_>, env: Env<'_>) -> Result<Tls, ConfigError> {
    let ca = pick(s.ca.0, "--otlp-certificate", env, &s.ca.1)
        .map(|(src, p)| read_pem(&src, &p, &["CERTIFICATE"], "certificate"))
        .transpose()?;
    let cert = pick(s.cert.0, "--otlp-client-certificate", env, &s.cert.1);
    let key = pick(s.key.0, "--otlp-client-key", env, &s.key.1);
    let client = match (cert, key) {
        (None, None) => None,
        (Some((src, p)), Some((ksrc, k))) => Some((
            read_pem(&src, &p, &["CERTIFICATE"], "certificate")?,
            read_pem(&ksrc, &k, &["PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"], "private key")?,
        )),
        (Some((src, _)), None) => return Err(ConfigError::ClientPair { given: src, missing: s.key.1[1].into() }),
        (None, Some((src, _))) => {
            return Err(ConfigError::ClientPair { given: src, missing: s.cert.1[1].into() });
        }
    };
    Ok(Tls { ca, client })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn resolve(args: &OtelArgs, vars: &[(&str, &str)]) -> Result<OtelConfig, ConfigError> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        OtelConfig::resolve(args, &|n| map.get(n).cloned())
    }

    #[test]
    fn endpoints_follow_the_specification() {
        let c = resolve(&OtelArgs::default(), &[]).unwrap();
        assert_eq!(c.endpoint, "http://localhost:4318/v1/traces");
        assert_eq!(c.default_output, DefaultOutput::Console);
        let c = resolve(&OtelArgs::default(), &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")]).unwrap();
        assert_eq!(c.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(c.default_output, DefaultOutput::Otlp);
        let c = resolve(
            &OtelArgs::default(),
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4318"),
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://b:9999/custom"),
            ],
        )
        .unwrap();
        assert_eq!(c.endpoint, "http://b:9999/custom");
        let c = resolve(&OtelArgs::default(), &[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]).unwrap();
        assert_eq!((c.protocol, c.endpoint.as_str()), (Protocol::Grpc, "http://localhost:4317"));
        // TLS: https endpoints; gRPC's host:port is https unless insecure.
        let c = resolve(&OtelArgs::default(), &[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4318")]).unwrap();
        assert_eq!(c.endpoint, "https://c:4318/v1/traces");
        let grpc = [("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"), ("OTEL_EXPORTER_OTLP_ENDPOINT", "c:4317")];
        assert_eq!(resolve(&OtelArgs::default(), &grpc).unwrap().endpoint, "https://c:4317");
        let args = OtelArgs { otlp_insecure: true, ..Default::default() };
        assert_eq!(resolve(&args, &grpc).unwrap().endpoint, "http://c:4317");
        // A flag wins over both variables.
        let args = OtelArgs { otlp_endpoint: Some("http://flag:1".into()), ..Default::default() };
        let c = resolve(&args, &[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://b:2/x")]).unwrap();
        assert_eq!(c.endpoint, "http://flag:1/v1/traces");
    }

    #[test]
    fn malformed_values_are_errors_naming_their_source() {
        for (vars, needle) in [
            (vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "localhost:4318")], "OTEL_EXPORTER_OTLP_ENDPOINT"),
            (vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://x")], "scheme"),
            (vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "http://")], "OTEL_EXPORTER_OTLP_ENDPOINT"),
            (vec![("OTEL_EXPORTER_OTLP_HEADERS", "novalue")], "OTEL_EXPORTER_OTLP_HEADERS"),
            (vec![("OTEL_EXPORTER_OTLP_HEADERS", "bad name=1")], "bad name"),
            (vec![("OTEL_EXPORTER_OTLP_HEADERS", "k=%zz")], "OTEL_EXPORTER_OTLP_HEADERS"),
            (vec![("OTEL_EXPORTER_OTLP_TIMEOUT", "soon")], "OTEL_EXPORTER_OTLP_TIMEOUT"),
            (vec![("OTEL_EXPORTER_OTLP_PROTOCOL", "udp")], "udp"),
            (vec![("OTEL_TRACES_SAMPLER", "sometimes")], "sometimes"),
            (vec![("OTEL_TRACES_SAMPLER", "traceidratio"), ("OTEL_TRACES_SAMPLER_ARG", "2")], "ratio"),
            (vec![("OTEL_RESOURCE_ATTRIBUTES", "a=1,broken")], "broken"),
            (vec![("OTEL_BSP_MAX_QUEUE_SIZE", "-1")], "OTEL_BSP_MAX_QUEUE_SIZE"),
            (vec![("OTEL_TRACES_EXPORTER", "zipkin")], "zipkin"),
            (vec![("OTEL_EXPORTER_OTLP_INSECURE", "maybe")], "OTEL_EXPORTER_OTLP_INSECURE"),
            (vec![("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent.pem")], "/nonexistent.pem"),
            (vec![("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/k.pem")], "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"),
        ] {
            let e = resolve(&OtelArgs::default(), &vars).unwrap_err().to_string();
            assert!(e.contains(needle), "{vars:?}: {e}");
        }
    }

    #[test]
    fn lists_are_percent_decoded_and_flags_win() {
        let args = OtelArgs {
            resource_attrs: vec!["deployment.environment=prod".into()],
            otlp_headers: vec!["X-Team=a".into()],
            ..Default::default()
        };
        let c = resolve(
            &args,
            &[
                ("OTEL_RESOURCE_ATTRIBUTES", "team=a%20b, deployment.environment=dev"),
                ("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer%20x"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
                ("OTEL_SERVICE_NAME", "svc"),
            ],
        )
        .unwrap();
        assert_eq!(c.resource["team"], "a b");
        assert_eq!(c.resource["deployment.environment"], "prod");
        assert_eq!(c.headers, vec![("x-team".to_string(), "a".to_string())]);
        assert_eq!(c.timeout, Duration::from_millis(2500));
        assert_eq!(c.service_name.as_deref(), Some("svc"));
    }

    #[test]
    fn samplers() {
        let id_low = |low: u64| u128::from(low);
        assert!(Sampler::AlwaysOn.sample(5, None));
        assert!(!Sampler::AlwaysOff.sample(5, None));
        assert!(Sampler::Ratio(0.5).sample(id_low(0), None));
        assert!(!Sampler::Ratio(0.5).sample(id_low(u64::MAX), None));
        let pb = Sampler::ParentBased(RootSampler::AlwaysOff);
        assert!(pb.sample(1, Some(true)));
        assert!(!pb.sample(1, None));
        // About the ratio of a uniform spread of ids.
        let mut x = 0x1234_5678_9abc_def0_u64;
        let kept = (0..100_000)
            .filter(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                Sampler::Ratio(0.25).sample(id_low(x), None)
            })
            .count();
        assert!((23_000..27_000).contains(&kept), "{kept}");
        let c = resolve(
            &OtelArgs::default(),
            &[("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"), ("OTEL_TRACES_SAMPLER_ARG", "0.1")],
        )
        .unwrap();
        assert_eq!(c.sampler, Sampler::ParentBased(RootSampler::Ratio(0.1)));
    }

    fn tls(ca: Option<String>, cert: Option<String>) -> Result<Tls, ConfigError> {
        let key = None;
        let s = Sources {
            ca: (&ca, ["OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "OTEL_EXPORTER_OTLP_CERTIFICATE"]),
            cert: (&cert, ["OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE", "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"]),
            key: (&key, ["OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", "OTEL_EXPORTER_OTLP_CLIENT_KEY"]),
        };
        resolve_tls(&s, &|_| None)
    }

    #[test]
    fn files_are_read_and_checked_naming_their_source() {
        let dir = std::env::temp_dir().join(format!("inject-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n").unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "hello").unwrap();
        let (ca_s, junk_s) = (ca.display().to_string(), junk.display().to_string());
        assert_eq!(tls(Some(ca_s.clone()), None).unwrap().ca.unwrap().path, ca_s);
        let e = tls(Some(junk_s), None).unwrap_err().to_string();
        assert!(e.contains("--otlp-certificate") && e.contains("no PEM certificate"), "{e}");
        let e = tls(Some("/nonexistent/ca.pem".into()), None).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/ca.pem") && e.contains("No such file"), "{e}");
        let e = tls(None, Some(ca_s)).unwrap_err().to_string();
        assert!(e.contains("--otlp-client-certificate") && e.contains("OTEL_EXPORTER_OTLP_CLIENT_KEY"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
