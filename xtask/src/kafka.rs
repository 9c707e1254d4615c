//! A real Apache Kafka broker for the kafka-go tests: the broker's jars come from Maven
//! Central (`xtask/kafka/pom.xml`, resolved by `mvn` once into a cache outside the work
//! tree), and each test starts its own single-node KRaft cluster (broker and controller in
//! one JVM) on free loopback ports, with its log directories in a temporary directory,
//! stopped and removed when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::servers::{Proc, free_port};

/// The broker release the tests run against (Kafka 4 is KRaft only and needs Java 17).
pub const KAFKA_VERSION: &str = "4.1.2";

/// A first start on two cores takes about 8 s (the JVM, the metadata log's bootstrap).
const START: Duration = Duration::from_secs(60);

/// Where the broker's jars are cached: outside the work tree, like the Go toolchains, so
/// clean checkouts (CI) on the same machine reuse them. `INJECT_KAFKA_CACHE` overrides.
pub fn cache_dir() -> PathBuf {
    if let Ok(d) = std::env::var("INJECT_KAFKA_CACHE") {
        return PathBuf::from(d);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    PathBuf::from(home).join(".cache/inject/kafka")
}

fn pom() -> PathBuf {
    crate::workspace_root().join("xtask/kafka/pom.xml")
}

/// The broker's jar directory, if it is installed from the current pom.xml: the pom is
/// copied beside `lib/` as a stamp, so a changed pom installs again.
fn installed() -> Option<PathBuf> {
    let dir = cache_dir().join(KAFKA_VERSION);
    let lib = dir.join("lib");
    let want = std::fs::read(pom()).ok()?;
    let have = std::fs::read(dir.join("pom.xml")).ok()?;
    (want == have && lib.join(format!("kafka_2.13-{KAFKA_VERSION}.jar")).is_file()).then_some(lib)
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|p| p.is_file()))
}

/// The `java` that runs the broker: `$JAVA_HOME/bin/java` when set (as mvn does), else
/// the one on PATH.
pub fn java() -> Option<PathBuf> {
    std::env::var_os("JAVA_HOME")
        .map(|h| PathBuf::from(h).join("bin/java"))
        .filter(|j| j.is_file())
        .or_else(|| which("java"))
}

static INSTALL_LOCK: Mutex<()> = Mutex::new(());

/// The broker's jars, fetched from Maven Central with `mvn dependency:copy-dependencies`
/// when missing (seconds on a warm `~/.m2`, about 45 MB the first time); a no-op once
/// installed. A failure is one line naming what failed and mvn's first error.
pub fn install() -> Result<PathBuf> {
    if let Some(lib) = installed() {
        return Ok(lib);
    }
    let _guard = INSTALL_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(lib) = installed() {
        return Ok(lib);
    }
    let mvn = which("mvn").context("Apache Kafka's jars come from Maven Central through mvn, which is not on PATH (`cargo xtask test` installs Debian's maven)")?;
    let pom_text = std::fs::read(pom()).with_context(|| format!("reading {}", pom().display()))?;
    let dir = cache_dir().join(KAFKA_VERSION);
    eprintln!("xtask: fetching Apache Kafka {KAFKA_VERSION} from Maven Central into {}", dir.display());
    std::fs::create_dir_all(cache_dir())?;
    // A scratch copy: concurrent installers (two test binaries) never share a half-made
    // directory, and mvn writes nothing beside the checked-in pom.
    let tmp = cache_dir().join(format!(".{KAFKA_VERSION}.tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    std::fs::write(tmp.join("pom.xml"), &pom_text)?;
    let out = Command::new(mvn)
        .current_dir(&tmp)
        .args(["-B", "-q", "-ntp", "-Dstyle.color=never", "-f", "pom.xml", "dependency:copy-dependencies"])
        .arg(format!("-Dkafka.version={KAFKA_VERSION}"))
        .arg("-DincludeScope=runtime")
        .arg(format!("-DoutputDirectory={}", tmp.join("lib").display()))
        .output()
        .context("running mvn")?;
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let first =
            text.lines().find(|l| l.contains("[ERROR]")).or_else(|| text.lines().find(|l| !l.trim().is_empty()));
        let first = plain(first.unwrap_or("no output"));
        let first = first.split(" -> [Help").next().unwrap_or_default().trim();
        bail!("fetching Apache Kafka {KAFKA_VERSION} from Maven Central failed (mvn {}): {first}", out.status);
    }
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = std::fs::rename(&tmp, &dir) {
        // Another process may have put its copy in place first: take that one.
        let _ = std::fs::remove_dir_all(&tmp);
        return installed().with_context(|| format!("moving the jars into {}: {e}", dir.display()));
    }
    installed()
        .with_context(|| format!("{} holds no kafka_2.13-{KAFKA_VERSION}.jar after mvn", dir.join("lib").display()))
}

/// `line` without terminal escape sequences (mvn colours its errors even with `-B`).
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ parameters, then one final byte in @..~.
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Whether the broker can run here: a `java`, and the jars or an `mvn` to fetch them.
/// Fails under CI (the tests must run), else prints why the test is skipped.
pub fn require_kafka() -> Result<bool> {
    let why = if java().is_none() {
        Some("java is not installed")
    } else if installed().is_none() && which("mvn").is_none() {
        Some("the Kafka broker is not installed and mvn is missing")
    } else {
        None
    };
    let Some(why) = why else { return Ok(true) };
    if crate::in_ci() {
        bail!("{why}, and CI=true: `cargo xtask test` installs Java, Maven and the broker");
    }
    eprintln!("SKIP: {why} (`cargo xtask test` installs them)");
    Ok(false)
}

/// Small and quick rather than fast: the machine has two cores that the Go programs
/// under test need too. C1 only, since a test broker lives seconds, not hours.
const JVM_FLAGS: &[&str] = &[
    "-Xms64m",
    "-Xmx512m",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-XX:-UsePerfData",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
];

/// A random KRaft cluster id: 16 bytes in unpadded URL-safe base64, as Kafka's own
/// `random-uuid` prints (made here to spare a JVM start).
fn cluster_id() -> Result<String> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(22);
    for chunk in b.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &x)| n | (u32::from(x) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    Ok(out)
}

/// The broker's configuration: one node that is broker and controller, plaintext on
/// loopback, every internal topic with one replica (and one partition, so the first
/// consumer group does not wait for fifty), groups rebalanced without the initial delay.
fn properties(port: u16, controller: u16, data: &Path) -> String {
    format!(
        "process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:{controller}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={}
auto.create.topics.enable=true
num.partitions=1
default.replication.factor=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
",
        data.display()
    )
}

/// A single-node Kafka cluster of its own (KRaft, no authentication, loopback only).
pub struct Kafka {
    proc: Option<Proc>,
    dir: PathBuf,
    pub port: u16,
}

impl Kafka {
    /// Installs the broker if needed, formats its storage and starts it; returns once it
    /// logged that it started (its listeners are open and it has registered).
    pub fn start() -> Result<Kafka> {
        let lib = install()?;
        let java = java().context("java is not installed (Kafka 4 needs Java 17)")?;
        let port = free_port()?;
        let mut controller = free_port()?;
        while controller == port {
            controller = free_port()?;
        }
        let dir = std::env::temp_dir().join(format!("inject-kafka.{}.{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        // From here on Drop removes the directory, on every error path too.
        let mut kafka = Kafka { proc: None, dir, port };
        let props = kafka.dir.join("server.properties");
        std::fs::write(&props, properties(port, controller, &kafka.dir.join("data")))?;
        let classpath = format!("{}/*", lib.display());
        let log_config = format!(
            "-Dlog4j2.configurationFile={}",
            crate::workspace_root().join("xtask/kafka/log4j2.properties").display()
        );
        let jvm = |heap_max: Option<&str>| {
            let mut c = Command::new(&java);
            c.args(JVM_FLAGS);
            if let Some(h) = heap_max {
                c.arg(h);
            }
            c.arg(&log_config).arg("-cp").arg(&classpath);
            c
        };
        let mut format = jvm(Some("-Xmx256m"));
        format.args(["kafka.tools.StorageTool", "format", "--standalone", "--ignore-formatted", "-t", &cluster_id()?]);
        format.arg("-c").arg(&props);
        let out = format.output().context("running Kafka's StorageTool")?;
        ensure!(
            out.status.success(),
            "formatting the Kafka log directory failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut broker = jvm(None);
        broker.arg("kafka.Kafka").arg(&props);
        let proc = kafka.proc.insert(Proc::spawn(broker, "kafka")?);
        proc.wait_for_any("Kafka Server started", START)?;
        Ok(kafka)
    }

    /// The bootstrap address clients dial: `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's process id (its JVM), for a bench that reads its CPU time.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.id())
    }
}

impl Drop for Kafka {
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            // SIGTERM: a controlled shutdown (about 2 s), then a kill at the deadline.
            p.stop(15, Duration::from_secs(30));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_are_taken_out_of_mvn_lines() {
        assert_eq!(super::plain("\x1b[0m\x1b[1;31m[ERROR]\x1b[m Failed"), "[ERROR] Failed");
        assert_eq!(super::plain("plain"), "plain");
    }

    #[test]
    fn cluster_ids_are_22_url_safe_characters() {
        let id = super::cluster_id().unwrap_or_default();
        assert_eq!(id.len(), 22, "{id}");
        assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "{id}");
    }
}
