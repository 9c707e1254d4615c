//! Where a session's telemetry goes: the span sink the output thread writes (console, JSON
//! lines, OTLP) and the metrics exporters beside it, opened together before the target is
//! touched (a bad setting is an error then) and finished together at the end.

use std::path::Path;

use anyhow::{Context, Result};

use crate::metrics::export::{MetricsTotals, Running};
use crate::otlp::{ExportTotals, Exporting, OtelArgs, OtelConfig};
use crate::output::{Format, Sink};

/// The running exporters.
pub struct Exports {
    pub spans: Option<Exporting>,
    pub metrics: Option<Running>,
}

impl Exports {
    /// Sends what is left (spans queued, the metrics' last interval) and reports.
    pub fn finish(self) -> (Option<ExportTotals>, Option<MetricsTotals>) {
        (self.spans.map(Exporting::finish), self.metrics.map(Running::finish))
    }
}

/// Opens the span sink for `format` and starts the metrics exporters the configuration
/// asks for. `launch`: the program owns our standard output (console output goes to
/// standard error) and the OTLP client is built lazily, so as not to delay it.
pub fn open(
    format: Format,
    output_file: Option<&Path>,
    otel: &OtelConfig,
    args: &OtelArgs,
    process: &crate::otlp::span::Process,
    launch: bool,
) -> Result<(Sink, Exports)> {
    let resource = || crate::otlp::span::resource(otel, process);
    let metrics = crate::metrics::export::start(args, format == Format::Otlp, resource)?;
    let mut exports = Exports { spans: None, metrics };
    let sink = match format {
        Format::None => Sink::None,
        Format::Otlp => {
            let (spans, exporting) = crate::otlp::start(otel, resource(), !launch)?;
            exports.spans = Some(exporting);
            Sink::Otlp { spans, sampler: otel.sampler, scopes: crate::otlp::span::scopes() }
        }
        Format::Console | Format::Lines | Format::Jsonl => {
            let out: Box<dyn std::io::Write + Send> = match output_file {
                Some(p) => Box::new(std::io::BufWriter::with_capacity(
                    1 << 20,
                    std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
                )),
                None if launch => Box::new(std::io::LineWriter::new(std::io::stderr())),
                None => Box::new(std::io::LineWriter::new(std::io::stdout())),
            };
            Sink::text(format, out)
        }
    };
    Ok((sink, exports))
}
