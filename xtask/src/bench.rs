//! `cargo xtask bench [NAME]`: the benchmarks behind the performance claims of DESIGN.md.
//! They print numbers and a PASS/FAIL line against the goal; they assert nothing (timing
//! is not a test).
//!
//! `functions-100mb`: "listing the functions of a 100 MB Go binary takes under a second".
//! A generated Go program (sources in `target/bench/big/src/`, never in `fixtures/`) of
//! 24 packages x 5000 distinct `//go:noinline` functions of six shapes (plain, methods,
//! slices/maps/errors, closures, floats and structs by value, generics), all reachable
//! through per-file tables, plus 2 MiB of distinct string data per package, is built with
//! the system `go` into `target/bench/big/big`: ~182k functions in a ~140 MB executable
//! (the function count and pclntab size of the largest Go programs deployed), and linked
//! again with `-ldflags=-s -w` (~115 MB, no DWARF). Then `inject functions --all --json
//! --exe BIG > /dev/null` and `inject info` (release build) are timed over several
//! warm-cache runs, beside `go tool nm BIG > /dev/null` as a reference. PASS/FAIL is
//! judged on the default (unstripped) build.
//!
//! Cost on 2 cores: the first run generates the sources (~1 s) and builds them (~3-4 min
//! of `go build`, ~1 GB more in the Go build cache, ~320 MB under target/bench/big);
//! later runs reuse both binaries (cached by a stamp of the generator and Go version) and
//! take ~30 s, mostly the timed runs.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use xtask::{inject_binary, workspace_root};

const BENCHMARKS: &[&str] = &[
    "functions-100mb",
    "attach-100",
    "attach-under-load",
    "call-overhead",
    "collector",
    "drain",
    "export",
    "launch",
    "http",
    "grpc",
    "db",
    "kafka",
    "debug",
];

pub fn run(name: Option<&str>) -> Result<()> {
    use crate::bench_probe;
    match name {
        None => {
            bench_probe::attach_100()?;
            crate::bench_http::attach_under_load()?;
            bench_probe::call_overhead()?;
            bench_probe::collector()?;
            bench_probe::drain()?;
            crate::bench_export::export()?;
            bench_probe::launch()?;
            crate::bench_http::http()?;
            crate::bench_grpc::grpc()?;
            crate::bench_db::db()?;
            crate::bench_kafka::kafka()?;
            crate::bench_debug::debug()?;
            functions_100mb()
        }
        Some("functions-100mb") => functions_100mb(),
        Some("attach-100") => bench_probe::attach_100(),
        Some("attach-under-load") => crate::bench_http::attach_under_load(),
        Some("call-overhead") => bench_probe::call_overhead(),
        Some("collector") => bench_probe::collector(),
        Some("drain") => bench_probe::drain(),
        Some("export") => crate::bench_export::export(),
        Some("launch") => bench_probe::launch(),
        Some("http") => crate::bench_http::http(),
        Some("grpc") => crate::bench_grpc::grpc(),
        Some("db") => crate::bench_db::db(),
        Some("kafka") => crate::bench_kafka::kafka(),
        Some("debug") => crate::bench_debug::debug(),
        Some(other) => bail!("unknown benchmark {other:?}; known: {}", BENCHMARKS.join(", ")),
    }
}

/// Shape of the generated program. Changing any of it (or the generator) must change
/// GENERATOR, so the cached binary is rebuilt.
const GENERATOR: &str = "big-v3";
const PACKAGES: usize = 24;
const FUNCS_PER_PACKAGE: usize = 5000;
const FUNCS_PER_FILE: usize = 500;
const BLOB_BYTES_PER_PACKAGE: usize = 2 << 20;
const MODULE: &str = "inject.test/big";

/// Timed runs per command, after one untimed warm-up run.
const RUNS: usize = 7;
const GOAL_MS: f64 = 1000.0;
const MIN_SIZE: u64 = 100 * 1000 * 1000;

fn functions_100mb() -> Result<()> {
    let go = system_go()?;
    let (big, stripped) = build_big(&go)?;
    let size = fs::metadata(&big)?.len();
    let stripped_size = fs::metadata(&stripped)?.len();
    ensure!(size >= MIN_SIZE, "the generated binary is only {:.1} MB; raise the generator's sizes", mb(size));

    // SAFETY: xtask is single-threaded here; nothing reads the environment concurrently.
    if std::env::var("INJECT_PROFILE").as_deref() != Ok("release") {
        unsafe { std::env::set_var("INJECT_PROFILE", "release") };
    }
    eprintln!("xtask: building inject (release)");
    let inject = inject_binary()?;

    let listing = xtask::output(Command::new(&inject).args(["functions", "--all", "--json", "--exe"]).arg(&big))
        .context("inject functions")?;
    let rows_listed = listing.matches("\"entry\":").count();
    let info = xtask::output(Command::new(&inject).args(["info", "--exe"]).arg(&big)).context("inject info")?;
    // `inject info` says "..., N functions, ..." (the pclntab's count).
    let functions = info
        .split([',', '\n'])
        .find_map(|part| part.trim().strip_suffix(" functions")?.rsplit(' ').next()?.parse::<usize>().ok())
        .unwrap_or(rows_listed);
    let nm = Command::new(&go.0).args(["tool", "nm"]).arg(&big).env("GOTOOLCHAIN", "local").output()?;
    ensure!(nm.status.success(), "go tool nm failed: {}", String::from_utf8_lossy(&nm.stderr));
    let nm_text = String::from_utf8_lossy(&nm.stdout);
    let nm_funcs = nm_text.lines().filter(|l| l.split_whitespace().nth(1) == Some("T")).count();

    let mut functions_cmd = Command::new(&inject);
    functions_cmd.args(["functions", "--all", "--json", "--exe"]).arg(&big);
    let mut info_cmd = Command::new(&inject);
    info_cmd.args(["info", "--exe"]).arg(&big);
    let mut nm_cmd = Command::new(&go.0);
    nm_cmd.args(["tool", "nm"]).arg(&big).env("GOTOOLCHAIN", "local");
    let mut stripped_functions_cmd = Command::new(&inject);
    stripped_functions_cmd.args(["functions", "--all", "--json", "--exe"]).arg(&stripped);
    let mut stripped_info_cmd = Command::new(&inject);
    stripped_info_cmd.args(["info", "--exe"]).arg(&stripped);
    eprintln!("xtask: timing ({RUNS} runs each after a warm-up)");
    let rows = [
        ("inject functions --all --json", time(&mut functions_cmd)?),
        ("inject info", time(&mut info_cmd)?),
        ("go tool nm (reference)", time(&mut nm_cmd)?),
        ("inject functions, -s -w build", time(&mut stripped_functions_cmd)?),
        ("inject info, -s -w build", time(&mut stripped_info_cmd)?),
    ];

    println!("benchmark functions-100mb: listing the functions of a 100 MB Go binary takes under a second");
    println!(
        "binary   {} ({:.1} MB, built with {}; {PACKAGES}x{FUNCS_PER_PACKAGE} generated functions)",
        big.display(),
        mb(size),
        go.1
    );
    println!(
        "         {functions} functions in the pclntab, {rows_listed} listed by inject; go tool nm: {nm_funcs} \
         text symbols"
    );
    println!(
        "stripped {} ({:.1} MB, the same program linked with -ldflags=-s -w: no DWARF)",
        stripped.display(),
        mb(stripped_size)
    );
    println!("stdout   to /dev/null; warm page cache; {RUNS} runs after one warm-up");
    println!();
    println!("{:<32} {:>10} {:>10} {:>10}", "command", "median ms", "min ms", "max ms");
    for (name, t) in &rows {
        println!("{name:<32} {:>10.1} {:>10.1} {:>10.1}", t.median, t.min, t.max);
    }
    let (functions_t, nm_t, stripped_t) = (&rows[0].1, &rows[2].1, &rows[3].1);
    println!();
    println!(
        "ratio    inject functions / go tool nm = {:.2} (median {:.0} ms vs {:.0} ms)",
        functions_t.median / nm_t.median,
        functions_t.median,
        nm_t.median
    );
    println!(
        "stripped inject functions on the -s -w build: median {:.0} ms ({:.0} ms of the full build's time goes to \
         DWARF)",
        stripped_t.median,
        functions_t.median - stripped_t.median
    );
    let verdict = if functions_t.median < GOAL_MS { "PASS" } else { "FAIL" };
    println!(
        "{verdict}: inject functions --all --json on a {:.0} MB Go binary ({functions} functions): median {:.0} ms, \
         goal < {GOAL_MS:.0} ms",
        mb(size),
        functions_t.median
    );
    Ok(())
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

struct Timing {
    median: f64,
    min: f64,
    max: f64,
}

/// Wall time of `c` (stdout and stderr to /dev/null), RUNS times after a warm-up.
fn time(c: &mut Command) -> Result<Timing> {
    c.stdout(Stdio::null()).stderr(Stdio::null());
    let mut ms = Vec::with_capacity(RUNS);
    for i in 0..=RUNS {
        let start = Instant::now();
        let status = c.status().with_context(|| format!("running {c:?}"))?;
        let elapsed = start.elapsed().as_secs_f64() * 1000.0;
        ensure!(status.success(), "{c:?} failed ({status})");
        if i > 0 {
            ms.push(elapsed);
        }
    }
    ms.sort_by(f64::total_cmp);
    Ok(Timing { median: ms[ms.len() / 2], min: ms[0], max: ms[ms.len() - 1] })
}

/// The `go` on PATH and its version.
fn system_go() -> Result<(PathBuf, String)> {
    let go = PathBuf::from("go");
    let version = xtask::output(Command::new(&go).args(["env", "GOVERSION"]).env("GOTOOLCHAIN", "local"))
        .context("the benchmark builds its Go program with the system `go`; is Go on PATH?")?;
    Ok((go, version.trim().to_string()))
}

/// Generates and builds the big program, as built by default and with `-s -w`, or
/// returns the cached binaries.
fn build_big(go: &(PathBuf, String)) -> Result<(PathBuf, PathBuf)> {
    let dir = workspace_root().join("target/bench/big");
    let (bin, stripped) = (dir.join("big"), dir.join("big-stripped"));
    let stamp_path = dir.join("stamp");
    let stamp = format!("{GENERATOR} {PACKAGES}x{FUNCS_PER_PACKAGE} blob={BLOB_BYTES_PER_PACKAGE} {}\n", go.1);
    if bin.exists() && stripped.exists() && fs::read_to_string(&stamp_path).ok().as_deref() == Some(stamp.as_str()) {
        eprintln!("xtask: reusing {} ({})", bin.display(), stamp.trim());
        return Ok((bin, stripped));
    }
    let _ = fs::remove_file(&stamp_path);
    let src = dir.join("src");
    let _ = fs::remove_dir_all(&src);
    let t = Instant::now();
    generate(&src)?;
    eprintln!("xtask: generated {} in {:.1} s", src.display(), t.elapsed().as_secs_f64());
    eprintln!("xtask: go build ({} with {PACKAGES} packages; a few minutes on 2 cores)", go.1);
    for (out, ldflags) in [(&bin, None), (&stripped, Some("-ldflags=-s -w"))] {
        let t = Instant::now();
        let tmp = dir.join(format!(".big.{}", std::process::id()));
        xtask::run(
            Command::new(&go.0)
                .current_dir(&src)
                .env("GOTOOLCHAIN", "local")
                .env("GOFLAGS", "-mod=mod")
                .env("CGO_ENABLED", "0")
                .args(["build", "-buildvcs=false"])
                .args(ldflags)
                .arg("-o")
                .arg(&tmp)
                .arg("."),
        )
        .context("building the generated program")?;
        fs::rename(&tmp, out)?;
        eprintln!("xtask: built {} in {:.0} s", out.display(), t.elapsed().as_secs_f64());
    }
    fs::write(&stamp_path, stamp)?;
    Ok((bin, stripped))
}

/// Writes the module: main.go importing packages p00.. each of FUNCS_PER_PACKAGE
/// functions in files of FUNCS_PER_FILE, and a string blob.
fn generate(src: &Path) -> Result<()> {
    fs::create_dir_all(src)?;
    fs::write(src.join("go.mod"), format!("module {MODULE}\n\ngo 1.21\n"))?;
    let mut main = String::from(
        "// Code generated by `cargo xtask bench functions-100mb`; DO NOT EDIT.\n\n\
         // Command big is a large Go program for inject's function-listing benchmark.\npackage main\n\n\
         import (\n\t\"fmt\"\n\t\"os\"\n\n",
    );
    for p in 0..PACKAGES {
        writeln!(main, "\tp{p:02} \"{MODULE}/p{p:02}\"")?;
    }
    main.push_str(")\n\nfunc main() {\n\tn := 0\n");
    for p in 0..PACKAGES {
        writeln!(main, "\tn += p{p:02}.Count(len(os.Args))")?;
    }
    main.push_str("\tfmt.Println(\"functions:\", n)\n}\n");
    fs::write(src.join("main.go"), main)?;
    for p in 0..PACKAGES {
        generate_package(src, p)?;
    }
    Ok(())
}

fn generate_package(src: &Path, p: usize) -> Result<()> {
    let dir = src.join(format!("p{p:02}"));
    fs::create_dir_all(&dir)?;
    let files = FUNCS_PER_PACKAGE.div_ceil(FUNCS_PER_FILE);
    // Distinct bytes per package, so the linker cannot share them.
    let mut rng = 0x2545_f491_4f6c_dd1d_u64 ^ (p as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut blob = String::with_capacity(BLOB_BYTES_PER_PACKAGE);
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789 ";
    for _ in 0..BLOB_BYTES_PER_PACKAGE {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        blob.push(ALPHABET[(rng % ALPHABET.len() as u64) as usize] as char);
    }
    let mut common = format!(
        "// Code generated by `cargo xtask bench functions-100mb`; DO NOT EDIT.\n\n\
         package p{p:02}\n\nimport \"errors\"\n\n\
         // Point is passed and returned by value (register ABI).\ntype Point struct{{ X, Y int }}\n\n\
         var errOdd = errors.New(\"odd\")\n\n\
         // Count makes every function reachable (through the tables) so the linker keeps it.\n\
         func Count(n int) int {{\n\treturn n*0"
    );
    for f in 0..files {
        write!(common, " + len(table{f})")?;
    }
    common.push_str("\n}\n\nvar blob = \"");
    common.push_str(&blob);
    common.push_str("\"\n");
    fs::write(dir.join("common.go"), common)?;
    for f in 0..files {
        let first = f * FUNCS_PER_FILE;
        let last = (first + FUNCS_PER_FILE).min(FUNCS_PER_PACKAGE);
        let mut code = format!(
            "// Code generated by `cargo xtask bench functions-100mb`; DO NOT EDIT.\n\npackage p{p:02}\n\n\
             import \"strings\"\n\nvar _ = strings.Contains\n"
        );
        let mut table = Vec::with_capacity(last - first);
        for i in first..last {
            table.push(function(&mut code, p, i)?);
        }
        writeln!(code, "\nvar table{f} = []any{{\n\t{},\n}}", table.join(",\n\t"))?;
        fs::write(dir.join(format!("f{f:02}.go")), code)?;
    }
    Ok(())
}

/// Appends function `i` of package `p` to `code` and returns the expression that
/// references it. Six shapes, all `//go:noinline`, each with its own constants.
fn function(code: &mut String, p: usize, i: usize) -> Result<String> {
    let k = (p * 7919 + i * 104_729) % 65_521;
    let m = i % 13 + 2;
    Ok(match i % 6 {
        0 => {
            let callee = if i >= 6 { format!("F{}(x - 1)", i - 6) } else { "x".into() };
            writeln!(
                code,
                "\n//go:noinline\nfunc F{i}(x int) int {{\n\ts := x ^ {k}\n\tfor j := 0; j < x%{m}; j++ {{\n\t\t\
                 s += j*{m} + int(blob[(s+j)&0xffff])\n\t}}\n\tif s > {k} && x > 0 {{\n\t\treturn s - {callee}\n\t}}\n\t\
                 return s + {i}\n}}"
            )?;
            format!("F{i}")
        }
        1 => {
            writeln!(
                code,
                "\ntype T{i} struct {{\n\ta, b int\n\ts string\n}}\n\n//go:noinline\n\
                 func (t *T{i}) M{i}(s string, n int) (string, int) {{\n\tif n > len(s) || n < 0 {{\n\t\t\
                 return t.s, t.a + {k}\n\t}}\n\tt.b += n * {m}\n\tif strings.HasPrefix(s, \"k{k}\") {{\n\t\t\
                 t.s = s[:n]\n\t}}\n\treturn s[n:] + t.s, t.b ^ {i}\n}}"
            )?;
            format!("(*T{i}).M{i}")
        }
        2 => {
            writeln!(
                code,
                "\n//go:noinline\nfunc S{i}(v []int, m map[string]int) (int, error) {{\n\ttotal := {k}\n\t\
                 for _, x := range v {{\n\t\ttotal += x * {m}\n\t}}\n\tif w, ok := m[\"k{k}\"]; ok {{\n\t\t\
                 return total + w, nil\n\t}}\n\tif total%2 == 1 {{\n\t\treturn 0, errOdd\n\t}}\n\t\
                 return total, nil\n}}"
            )?;
            format!("S{i}")
        }
        3 => {
            writeln!(
                code,
                "\n//go:noinline\nfunc C{i}(n int) func(int) int {{\n\tbase := n * {k}\n\t\
                 return func(x int) int {{\n\t\tif x > {m} {{\n\t\t\treturn base + x - {i}\n\t\t}}\n\t\t\
                 return base * x\n\t}}\n}}"
            )?;
            format!("C{i}")
        }
        4 => {
            writeln!(
                code,
                "\n//go:noinline\nfunc V{i}(a, b float64, p Point, xs ...int) (float64, Point) {{\n\t\
                 for _, x := range xs {{\n\t\tp.X += x * {m}\n\t\tp.Y -= x ^ {k}\n\t}}\n\t\
                 return a*{m}.5 + b/float64(p.X|1), Point{{p.Y + {i}, p.X}}\n}}"
            )?;
            format!("V{i}")
        }
        _ => {
            writeln!(
                code,
                "\n//go:noinline\nfunc G{i}[T int | float64](v []T, scale T) T {{\n\tvar s T\n\t\
                 for j, x := range v {{\n\t\tif j%{m} == 0 {{\n\t\t\ts += x * scale\n\t\t}} else {{\n\t\t\t\
                 s -= x\n\t\t}}\n\t}}\n\treturn s + T({k})\n}}"
            )?;
            format!("G{i}[int]")
        }
    })
}
