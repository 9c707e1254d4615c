//! The test suite's OTLP receiver as a process of its own, for benchmarks that must not
//! count its CPU time as ours: `otlp-receiver http|grpc` prints `LISTENING <endpoint>`,
//! then answers each line on stdin with `SPANS <received so far>`, until stdin closes.

use std::io::BufRead;

use anyhow::{Result, bail};
use tests::otlp::{Receiver, Transport};

fn main() -> Result<()> {
    let transport = match std::env::args().nth(1).as_deref() {
        Some("http") => Transport::Http,
        Some("grpc") => Transport::Grpc,
        _ => bail!("usage: otlp-receiver http|grpc"),
    };
    let rx = Receiver::start_counting(transport)?;
    println!("LISTENING {}", rx.endpoint());
    for line in std::io::stdin().lock().lines() {
        line?;
        println!("SPANS {}", rx.span_count());
    }
    Ok(())
}
