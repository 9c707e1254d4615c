//! The console's views of finished calls. Calls finish children first, so printing them
//! as they come puts each child above its parent; the tree view holds a trace's spans
//! until its root finishes, then prints them as one block: the root, then each child under
//! its parent in start order, with its offset from the root's start (a waterfall). What
//! finishes after its block was printed comes as a late line naming its parent; what waits
//! too long for a root (one that runs on, or never finishes) is printed without it, saying
//! so, so that neither memory nor delay grows without bound. The lines view prints every
//! call at once, in end order, as the console always did.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::time::{Duration, Instant};

/// A finished call or span, formatted, waiting to be placed.
#[derive(Debug, Clone)]
pub struct Node {
    pub trace_id: u128,
    pub span_id: u64,
    pub parent: Option<u64>,
    /// The parent is in another process: this span starts a tree here.
    pub remote_parent: bool,
    pub goid: u64,
    /// Calls open under it on its goroutine when it began (the lines view's indentation).
    pub depth: usize,
    /// Start, ns since the Unix epoch.
    pub start_ns: u128,
    /// None when only the entry was seen.
    pub dur_ns: Option<f64>,
    /// What was called: `main.query(id=1) = 3`, or a span's `SERVER GET /items/{id}`.
    pub head: String,
    /// How much of `head` names it (for a late child's line naming its parent).
    pub name_len: usize,
    /// A library span's attributes (and error), shown after its ids; None for a function,
    /// whose ids would only be noise on a console.
    pub attrs: Option<String>,
}

/// Which ids a library span's line shows.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ids {
    /// Trace, span and parent: a line that stands on its own.
    Full,
    /// The span's own: a line inside a block, whose trace and parent its place says.
    Span,
}

impl Node {
    pub fn name(&self) -> &str {
        self.head.get(..self.name_len).unwrap_or(&self.head)
    }

    fn text(&self, ids: Ids) -> String {
        let mut s = self.head.clone();
        match &self.attrs {
            None => match self.dur_ns {
                Some(ns) => s.push_str(&format!("  {}", duration(ns))),
                None => s.push_str("  (entry only)"),
            },
            Some(attrs) => {
                match ids {
                    Ids::Full => s.push_str(&format!(" [trace {:032x} span {:016x}", self.trace_id, self.span_id)),
                    Ids::Span => s.push_str(&format!(" [span {:016x}", self.span_id)),
                }
                if let (Ids::Full, Some(p)) = (ids, self.parent) {
                    s.push_str(&format!(" parent {p:016x}{}", if self.remote_parent { " (remote)" } else { "" }));
                }
                s.push_str("] ");
                s.push_str(attrs);
                if let Some(ns) = self.dur_ns {
                    s.push_str(&format!("  {}", duration(ns)));
                }
            }
        }
        s
    }

    /// The lines view: wall-clock start, goroutine, indentation by stack depth.
    pub fn line(&self) -> String {
        format!(
            "{} g{:<5} {:indent$}{}",
            clock_time(self.start_ns),
            self.goid,
            "",
            self.text(Ids::Full),
            indent = 2 * self.depth
        )
    }
}

pub fn duration(ns: f64) -> String {
    if ns < 1e3 {
        format!("{ns:.0}ns")
    } else if ns < 1e6 {
        format!("{:.1}µs", ns / 1e3)
    } else if ns < 1e9 {
        format!("{:.2}ms", ns / 1e6)
    } else {
        format!("{:.3}s", ns / 1e9)
    }
}

pub fn clock_time(unix_ns: u128) -> String {
    let secs = (unix_ns / 1_000_000_000) as u64;
    let micros = (unix_ns / 1000 % 1_000_000) as u64;
    format!("{:02}:{:02}:{:02}.{micros:06}", secs / 3600 % 24, secs / 60 % 60, secs % 60)
}

/// `+1.25ms` from the block's top (`-` for a start a clock's skew puts before it).
fn offset(start: u128, from: u128) -> String {
    if start >= from {
        format!("+{}", duration((start - from) as f64))
    } else {
        format!("-{}", duration((from - start) as f64))
    }
}

/// The wall-clock column's width (`15:04:05.123456`): offsets are right-aligned to it.
const TIME_WIDTH: usize = 15;

/// How long spans wait for their root, and how many wait at once.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A trace from which nothing has come for this long is printed as it is: its root is
    /// still running (or its end was lost), and a debugging session must see what happened.
    pub idle: Duration,
    /// Nor does any span wait longer than this: a root that runs on while children keep
    /// coming (a worker loop) must not hide them.
    pub hold: Duration,
    /// Spans held over all traces (each a few hundred bytes); past it, the oldest trace's
    /// are printed.
    pub held: usize,
    /// Printed spans remembered, so that a child finishing after its block can name its
    /// parent; one forgotten waits `idle` and is printed on its own.
    pub placed: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { idle: Duration::from_secs(1), hold: Duration::from_secs(5), held: 50_000, placed: 1 << 16 }
    }
}

/// A trace's finished spans waiting for their root.
struct Pending {
    /// When it began to wait, in `Tree::order`.
    seq: u64,
    first: Instant,
    last: Instant,
    nodes: HashMap<u64, Node>,
    /// Held spans by parent, in the order they came.
    children: HashMap<u64, Vec<u64>>,
}

/// A printed span, for the children that finish after it was printed.
struct Placed {
    name: String,
    /// The start of its block's top line (late lines' offsets are from it).
    top_start: u128,
    depth: usize,
}

/// Where a block's top line goes.
enum At {
    /// On its own: a root here, or spans printed without their parent.
    Top,
    /// Under a parent printed earlier.
    Late { parent: String, top_start: u128, depth: usize },
}

/// Why held spans were printed without their parent.
#[derive(Debug, Clone, Copy)]
enum Why {
    Idle(Duration),
    Hold(Duration),
    Full(usize),
    Stopped,
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Why::Idle(d) => write!(f, "nothing more came for {:.1} s", d.as_secs_f64()),
            Why::Hold(d) => write!(f, "held {:.1} s", d.as_secs_f64()),
            Why::Full(n) => write!(f, "the buffer of {n} spans is full"),
            Why::Stopped => write!(f, "tracing stopped"),
        }
    }
}

/// Assembles finished spans into trees per trace.
pub struct Tree {
    limits: Limits,
    pending: HashMap<u128, Pending>,
    /// Traces in the order they began to wait (entries of traces since printed are
    /// skipped, and dropped when they outnumber the live ones).
    order: VecDeque<(u64, u128)>,
    seq: u64,
    held: usize,
    placed: HashMap<(u128, u64), Placed>,
    placed_order: VecDeque<(u128, u64)>,
    /// Spans printed before their parent, by (trace, parent): the parent's line says so.
    early: HashMap<(u128, u64), usize>,
    next_tick: Option<Instant>,
}

impl Default for Tree {
    fn default() -> Tree {
        Tree::new(Limits::default())
    }
}

impl Tree {
    pub fn new(limits: Limits) -> Tree {
        Tree {
            limits,
            pending: HashMap::new(),
            order: VecDeque::new(),
            seq: 0,
            held: 0,
            placed: HashMap::new(),
            placed_order: VecDeque::new(),
            early: HashMap::new(),
            next_tick: None,
        }
    }

    /// Spans waiting for their root.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.held
    }

    /// Takes a finished span: a root prints at once with what waited for it, a child of a
    /// printed span prints at once as a late line, anything else waits.
    pub fn add(&mut self, node: Node, now: Instant, out: &mut dyn Write) -> io::Result<()> {
        let trace = node.trace_id;
        let parent = match node.parent {
            Some(p) if !node.remote_parent => p,
            _ => return self.print_below(node, At::Top, out),
        };
        if let Some(pl) = self.placed.get(&(trace, parent)) {
            let at = At::Late { parent: pl.name.clone(), top_start: pl.top_start, depth: pl.depth + 1 };
            return self.print_below(node, at, out);
        }
        self.hold(node, parent, now, out)?;
        while self.held > self.limits.held {
            let Some(oldest) = self.oldest() else { break };
            self.flush(oldest, Why::Full(self.limits.held), out)?;
        }
        Ok(())
    }

    fn hold(&mut self, node: Node, parent: u64, now: Instant, out: &mut dyn Write) -> io::Result<()> {
        let trace = node.trace_id;
        let p = match self.pending.entry(trace) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                self.seq += 1;
                self.order.push_back((self.seq, trace));
                e.insert(Pending {
                    seq: self.seq,
                    first: now,
                    last: now,
                    nodes: HashMap::new(),
                    children: HashMap::new(),
                })
            }
        };
        if p.nodes.contains_key(&node.span_id) {
            // Two spans with one id (ids are random: a corrupt record): the second is
            // printed on its own rather than replace the first.
            return self.print_below(node, At::Top, out);
        }
        p.last = now;
        p.children.entry(parent).or_default().push(node.span_id);
        p.nodes.insert(node.span_id, node);
        self.held += 1;
        if self.order.len() > 2 * self.pending.len() + 64 {
            let pending = &self.pending;
            self.order.retain(|(seq, t)| pending.get(t).is_some_and(|p| p.seq == *seq));
        }
        Ok(())
    }

    /// The trace that has waited longest.
    fn oldest(&mut self) -> Option<u128> {
        while let Some(&(seq, t)) = self.order.front() {
            if self.pending.get(&t).is_some_and(|p| p.seq == seq) {
                return Some(t);
            }
            self.order.pop_front();
        }
        None
    }

    /// Prints the traces that have waited past the limits; cheap when called often.
    pub fn tick(&mut self, now: Instant, out: &mut dyn Write) -> io::Result<()> {
        if self.pending.is_empty() || self.next_tick.is_some_and(|t| now < t) {
            return Ok(());
        }
        self.next_tick = Some(now + self.limits.idle.min(self.limits.hold) / 10);
        let mut due: Vec<(u64, u128, Why)> = self
            .pending
            .iter()
            .filter_map(|(&t, p)| {
                let (idle, held) = (now.saturating_duration_since(p.last), now.saturating_duration_since(p.first));
                if idle >= self.limits.idle {
                    Some((p.seq, t, Why::Idle(idle)))
                } else if held >= self.limits.hold {
                    Some((p.seq, t, Why::Hold(held)))
                } else {
                    None
                }
            })
            .collect();
        due.sort_by_key(|d| d.0);
        for (_, t, why) in due {
            self.flush(t, why, out)?;
        }
        Ok(())
    }

    /// At the end: prints everything still waiting.
    pub fn finish(&mut self, out: &mut dyn Write) -> io::Result<()> {
        let mut traces: Vec<(u64, u128)> = self.pending.iter().map(|(&t, p)| (p.seq, t)).collect();
        traces.sort_unstable();
        for (_, t) in traces {
            self.flush(t, Why::Stopped, out)?;
        }
        self.order.clear();
        Ok(())
    }

    /// Prints a trace's held spans without the parent they wait for: a header saying why,
    /// then each subtree, earliest first.
    fn flush(&mut self, trace: u128, why: Why, out: &mut dyn Write) -> io::Result<()> {
        let Some(mut p) = self.pending.remove(&trace) else { return Ok(()) };
        self.held -= p.nodes.len();
        let n = p.nodes.len();
        writeln!(
            out,
            "--- trace {trace:032x}: {n} span{} printed before {} parent ended ({why}) ---",
            if n == 1 { "" } else { "s" },
            if n == 1 { "its" } else { "their" }
        )?;
        let mut tops: Vec<(u128, u64)> = p
            .nodes
            .values()
            .filter(|n| n.parent.is_none_or(|q| !p.nodes.contains_key(&q)))
            .map(|n| (n.start_ns, n.span_id))
            .collect();
        // Tops whose parent is elsewhere: it will say how many were printed before it.
        let mut parent_elsewhere = true;
        loop {
            if tops.is_empty() {
                // Whatever is left hangs in a cycle of parents (corrupt ids): each is
                // printed as a top rather than lost.
                parent_elsewhere = false;
                tops = p.nodes.values().map(|n| (n.start_ns, n.span_id)).collect();
                if tops.is_empty() {
                    break;
                }
            }
            tops.sort_unstable();
            for (_, id) in std::mem::take(&mut tops) {
                let Some(top) = p.nodes.remove(&id) else { continue };
                let parent = top.parent;
                let block = take_below(&mut p, top);
                if let Some(q) = parent.filter(|_| parent_elsewhere) {
                    if self.early.len() >= self.limits.placed {
                        self.early.clear();
                    }
                    *self.early.entry((trace, q)).or_default() += block.len();
                }
                self.print(block, At::Top, out)?;
            }
        }
        Ok(())
    }

    /// Prints `top` with whatever of its trace waited under it.
    fn print_below(&mut self, top: Node, at: At, out: &mut dyn Write) -> io::Result<()> {
        let trace = top.trace_id;
        let block = match self.pending.get_mut(&trace) {
            Some(p) => {
                let before = p.nodes.len();
                let block = take_below(p, top);
                self.held -= before - p.nodes.len();
                if p.nodes.is_empty() {
                    self.pending.remove(&trace);
                }
                block
            }
            None => vec![(top, 0)],
        };
        self.print(block, at, out)
    }

    /// Writes a block (its top first, depths relative to it) and remembers where each
    /// span went.
    fn print(&mut self, block: Vec<(Node, usize)>, at: At, out: &mut dyn Write) -> io::Result<()> {
        let Some(top) = block.first().map(|b| &b.0) else { return Ok(()) };
        let (top_start, base, late) = match &at {
            At::Top => (top.start_ns, 0, None),
            At::Late { parent, top_start, depth } => (*top_start, *depth, Some(parent.as_str())),
        };
        for (i, (n, d)) in block.iter().enumerate() {
            let time = if i == 0 && late.is_none() {
                clock_time(n.start_ns)
            } else {
                format!("{:>TIME_WIDTH$}", offset(n.start_ns, top_start))
            };
            let mut suffix = String::new();
            if i == 0
                && let Some(parent) = late
            {
                suffix = format!("  [late: under {parent} in the tree of {}]", clock_time(top_start));
            }
            if let Some(k) = self.early.remove(&(n.trace_id, n.span_id)) {
                suffix.push_str(&format!("  [{k} span{} under it printed above]", if k == 1 { "" } else { "s" }));
            }
            let ids = if i == 0 { Ids::Full } else { Ids::Span };
            writeln!(out, "{time} g{:<5} {:indent$}{}{suffix}", n.goid, "", n.text(ids), indent = 2 * (base + d))?;
        }
        for (n, d) in block {
            self.place(&n, top_start, base + d);
        }
        Ok(())
    }

    fn place(&mut self, n: &Node, top_start: u128, depth: usize) {
        if self.placed_order.len() >= self.limits.placed
            && let Some(k) = self.placed_order.pop_front()
        {
            self.placed.remove(&k);
        }
        let key = (n.trace_id, n.span_id);
        if self.placed.insert(key, Placed { name: n.name().to_string(), top_start, depth }).is_none() {
            self.placed_order.push_back(key);
        }
    }
}

/// Takes `top` and its held descendants out of `p`, in print order (depth first, children
/// in start order), with their depth below `top`.
fn take_below(p: &mut Pending, top: Node) -> Vec<(Node, usize)> {
    let mut block = Vec::new();
    let mut stack: Vec<(u64, usize)> = Vec::new();
    push_children(p, top.span_id, 1, &mut stack);
    block.push((top, 0));
    while let Some((id, d)) = stack.pop() {
        if let Some(n) = p.nodes.remove(&id) {
            push_children(p, id, d + 1, &mut stack);
            block.push((n, d));
        }
    }
    block
}

/// Stacks the held children of `parent`, the earliest to come off first.
fn push_children(p: &mut Pending, parent: u64, depth: usize, stack: &mut Vec<(u64, usize)>) {
    let Some(mut kids) = p.children.remove(&parent) else { return };
    kids.sort_by_key(|k| p.nodes.get(k).map_or(0, |n| n.start_ns));
    stack.extend(kids.into_iter().rev().map(|k| (k, depth)));
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u128 = 1_000_000;
    /// 10:00:00 on some day, in ns since the epoch.
    const T0: u128 = 1_700_000_000 / 86_400 * 86_400 * 1_000_000_000 + 36_000 * 1_000_000_000;

    /// A function's call: `name(id=span)`, started `start` ms after T0, `dur` ms long.
    fn call(trace: u128, span: u64, parent: Option<u64>, start: u128, dur: u128, name: &str) -> Node {
        let head = format!("{name}(id={span})");
        Node {
            trace_id: trace,
            span_id: span,
            parent,
            remote_parent: false,
            goid: span,
            depth: 0,
            start_ns: T0 + start * MS,
            dur_ns: Some((dur * MS) as f64),
            name_len: name.len(),
            head,
            attrs: None,
        }
    }

    fn span(trace: u128, span: u64, parent: Option<u64>, remote: bool, start: u128, name: &str) -> Node {
        let head = format!("SERVER {name}");
        Node {
            remote_parent: remote,
            name_len: head.len(),
            head,
            attrs: Some("http.response.status_code=200".into()),
            ..call(trace, span, parent, start, 3, name)
        }
    }

    /// Feeds `nodes` at `now`; returns the lines printed.
    fn feed(tree: &mut Tree, nodes: Vec<Node>, now: Instant) -> Vec<String> {
        let mut out = Vec::new();
        for n in nodes {
            tree.add(n, now, &mut out).expect("writing to a Vec");
        }
        lines(out)
    }

    fn lines(out: Vec<u8>) -> Vec<String> {
        String::from_utf8(out).expect("utf-8").lines().map(str::to_string).collect()
    }

    fn tick(tree: &mut Tree, now: Instant) -> Vec<String> {
        let mut out = Vec::new();
        tree.tick(now, &mut out).expect("writing to a Vec");
        lines(out)
    }

    /// The text after the time and goroutine columns (indentation kept).
    fn body(line: &str) -> &str {
        line.get(TIME_WIDTH + 8..).unwrap_or("")
    }

    #[test]
    fn a_root_prints_with_its_children_under_it_in_start_order() {
        // handle(1) { query(2) { scan(3) }; query(4); render(5) }, arriving in end order.
        let nodes = vec![
            call(7, 3, Some(2), 2, 1, "main.scan"),
            call(7, 2, Some(1), 1, 3, "main.query"),
            call(7, 4, Some(1), 5, 2, "main.query"),
            call(7, 5, Some(1), 8, 1, "main.render"),
        ];
        let mut tree = Tree::default();
        let now = Instant::now();
        assert!(feed(&mut tree, nodes, now).is_empty(), "children wait for their root");
        assert_eq!(tree.held(), 4);
        let out = feed(&mut tree, vec![call(7, 1, None, 0, 10, "main.handle")], now);
        let bodies: Vec<&str> = out.iter().map(|l| body(l)).collect();
        assert_eq!(
            bodies,
            [
                "main.handle(id=1)  10.00ms",
                "  main.query(id=2)  3.00ms",
                "    main.scan(id=3)  1.00ms",
                "  main.query(id=4)  2.00ms",
                "  main.render(id=5)  1.00ms",
            ],
            "{out:#?}"
        );
        assert!(out[0].starts_with("10:00:00.000000 g1     "), "the root has its wall-clock start: {out:?}");
        let times: Vec<&str> = out[1..].iter().map(|l| l[..TIME_WIDTH].trim_start()).collect();
        assert_eq!(times, ["+1.00ms", "+2.00ms", "+5.00ms", "+8.00ms"], "offsets from the root's start");
        assert_eq!(tree.held(), 0);
    }

    #[test]
    fn a_call_with_no_parent_prints_as_soon_as_it_finishes() {
        let mut tree = Tree::default();
        let now = Instant::now();
        for i in 1..=3 {
            let out = feed(&mut tree, vec![call(u128::from(i), i, None, u128::from(i), 1, "main.priceOf")], now);
            assert_eq!(out.len(), 1, "call {i}: {out:?}");
            assert_eq!(body(&out[0]), format!("main.priceOf(id={i})  1.00ms"));
        }
        assert_eq!(tree.held(), 0);
    }

    #[test]
    fn a_child_that_ends_after_its_tree_was_printed_comes_as_a_late_line_naming_its_parent() {
        let mut tree = Tree::default();
        let now = Instant::now();
        feed(&mut tree, vec![span(9, 1, None, false, 0, "GET /fanout")], now);
        // A goroutine started under the request outlives it: its own child first.
        let out = feed(
            &mut tree,
            vec![call(9, 3, Some(2), 6, 1, "main.flush"), call(9, 2, Some(1), 5, 4, "main.background")],
            now,
        );
        assert_eq!(out.len(), 2, "{out:#?}");
        assert_eq!(
            body(&out[0]),
            "  main.background(id=2)  4.00ms  [late: under SERVER GET /fanout in the tree of 10:00:00.000000]"
        );
        assert_eq!(out[0][..TIME_WIDTH].trim_start(), "+5.00ms");
        assert_eq!(body(&out[1]), "    main.flush(id=3)  1.00ms", "its own child under it");
        // A grandchild finishing later still names its parent, one level deeper.
        let out = feed(&mut tree, vec![call(9, 4, Some(3), 9, 1, "main.write")], now);
        assert_eq!(
            body(&out[0]),
            "      main.write(id=4)  1.00ms  [late: under main.flush in the tree of 10:00:00.000000]"
        );
        assert_eq!(tree.held(), 0);
    }

    #[test]
    fn a_remote_parent_starts_a_tree_of_its_own() {
        let mut tree = Tree::default();
        let now = Instant::now();
        let child = call(5, 11, Some(10), 1, 1, "main.hello");
        assert!(feed(&mut tree, vec![child], now).is_empty());
        let out = feed(&mut tree, vec![span(5, 10, Some(0xfeed), true, 0, "GET /hello")], now);
        assert_eq!(out.len(), 2, "{out:#?}");
        assert_eq!(
            body(&out[0]),
            "SERVER GET /hello [trace 00000000000000000000000000000005 span 000000000000000a parent \
             000000000000feed (remote)] http.response.status_code=200  3.00ms"
        );
        assert_eq!(body(&out[1]), "  main.hello(id=11)  1.00ms");
        // Children in a tree show their own span id only.
        let out =
            feed(&mut tree, vec![span(6, 21, Some(20), false, 1, "GET /x"), span(6, 20, None, false, 0, "GET /")], now);
        assert_eq!(body(&out[1]), "  SERVER GET /x [span 0000000000000015] http.response.status_code=200  3.00ms");
    }

    #[test]
    fn spans_whose_root_does_not_finish_are_printed_after_a_second_with_nothing_new() {
        let mut tree = Tree::default();
        let t = Instant::now();
        feed(&mut tree, vec![call(3, 2, Some(1), 1, 1, "main.step"), call(3, 4, Some(3), 3, 1, "main.step")], t);
        assert!(tick(&mut tree, t + Duration::from_millis(900)).is_empty(), "not yet");
        let out = tick(&mut tree, t + Duration::from_millis(1100));
        assert_eq!(out.len(), 3, "{out:#?}");
        assert_eq!(
            out[0],
            "--- trace 00000000000000000000000000000003: 2 spans printed before their parent ended (nothing more \
             came for 1.1 s) ---"
        );
        assert!(out[1].starts_with("10:00:00.001000 ") && body(&out[1]) == "main.step(id=2)  1.00ms", "{out:?}");
        assert!(out[2].starts_with("10:00:00.003000 ") && body(&out[2]) == "main.step(id=4)  1.00ms", "{out:?}");
        assert_eq!(tree.held(), 0);
        // The parent, when it ends, says what was printed before it; a later child is late.
        let out = feed(&mut tree, vec![call(3, 1, None, 0, 5000, "main.loop")], t + Duration::from_secs(5));
        assert_eq!(out, ["10:00:00.000000 g1     main.loop(id=1)  5.000s  [1 span under it printed above]"]);
        let out = feed(&mut tree, vec![call(3, 5, Some(1), 4000, 1, "main.step")], t + Duration::from_secs(6));
        assert_eq!(body(&out[0]), "  main.step(id=5)  1.00ms  [late: under main.loop in the tree of 10:00:00.000000]");
    }

    #[test]
    fn a_root_that_runs_on_does_not_hide_its_children_longer_than_the_hold() {
        let mut tree = Tree::default();
        let t = Instant::now();
        let mut printed = Vec::new();
        // A child every half second: never a second with nothing new.
        for i in 0..12u64 {
            let now = t + Duration::from_millis(500 * i);
            printed.extend(feed(&mut tree, vec![call(4, 10 + i, Some(1), u128::from(i) * 500, 1, "main.tick")], now));
            printed.extend(tick(&mut tree, now));
        }
        let headers: Vec<&String> = printed.iter().filter(|l| l.starts_with("---")).collect();
        assert!(!headers.is_empty() && headers[0].contains("(held 5.0 s)"), "{printed:#?}");
        let calls = printed.iter().filter(|l| l.contains("main.tick")).count();
        assert_eq!(calls + tree.held(), 12, "every call printed or still held: {printed:#?}");
        assert!(calls >= 10, "the first 10 waited at most 5 s: {printed:#?}");
    }

    #[test]
    fn a_full_buffer_prints_the_trace_that_waited_longest() {
        let limits = Limits { held: 4, ..Limits::default() };
        let mut tree = Tree::new(limits);
        let t = Instant::now();
        let a = vec![
            call(1, 2, Some(1), 1, 1, "main.a"),
            call(1, 3, Some(1), 2, 1, "main.a"),
            call(1, 4, Some(1), 3, 1, "main.a"),
        ];
        assert!(feed(&mut tree, a, t).is_empty());
        let b = vec![call(2, 6, Some(5), 1, 1, "main.b"), call(2, 7, Some(5), 2, 1, "main.b")];
        let out = feed(&mut tree, b, t);
        assert_eq!(out.len(), 4, "{out:#?}");
        assert!(out[0].ends_with("3 spans printed before their parent ended (the buffer of 4 spans is full) ---"));
        assert!(out[1..].iter().all(|l| l.contains("main.a")), "{out:#?}");
        assert_eq!(tree.held(), 2);
        let mut rest = Vec::new();
        tree.finish(&mut rest).expect("writing to a Vec");
        let rest = lines(rest);
        assert_eq!(rest.len(), 3, "{rest:#?}");
        assert!(rest[0].ends_with("(tracing stopped) ---"), "{rest:#?}");
        assert_eq!(tree.held(), 0);
    }

    #[test]
    fn a_flood_of_traces_stays_within_the_buffer_and_loses_nothing() {
        let limits = Limits { held: 100, placed: 50, ..Limits::default() };
        let mut tree = Tree::new(limits);
        let t = Instant::now();
        let mut out = Vec::new();
        // 10,000 traces of one child each whose root never comes, and roots in between.
        for i in 0..10_000u64 {
            tree.add(call(u128::from(i), 2 * i + 1, Some(2 * i), 1, 1, "main.orphan"), t, &mut out).expect("Vec");
            tree.add(call((u128::from(i) + 1) << 64, 7, None, 1, 1, "main.root"), t, &mut out).expect("Vec");
            assert!(tree.held() <= 100 && tree.placed.len() <= 50 && tree.order.len() <= 2 * 100 + 65);
        }
        tree.finish(&mut out).expect("Vec");
        let out = lines(out);
        assert_eq!(out.iter().filter(|l| l.contains("main.orphan")).count(), 10_000);
        assert_eq!(out.iter().filter(|l| l.contains("main.root")).count(), 10_000);
    }

    #[test]
    fn a_child_whose_printed_parent_was_forgotten_is_printed_on_its_own_later() {
        let mut tree = Tree::new(Limits { placed: 2, ..Limits::default() });
        let t = Instant::now();
        feed(&mut tree, (1..=3).map(|i| call(8, i, None, u128::from(i), 1, "main.root")).collect(), t);
        // Root 1 was forgotten (only 2 remembered): its child waits, then prints alone.
        assert!(feed(&mut tree, vec![call(8, 9, Some(1), 5, 1, "main.child")], t).is_empty());
        let out = tick(&mut tree, t + Duration::from_secs(2));
        assert_eq!(out.len(), 2, "{out:#?}");
        assert!(body(&out[1]).starts_with("main.child(id=9)"));
        // Root 3 is remembered: its child is late.
        let out = feed(&mut tree, vec![call(8, 10, Some(3), 5, 1, "main.child")], t);
        assert!(out[0].contains("[late: under main.root"), "{out:#?}");
    }

    #[test]
    fn parents_in_a_cycle_are_printed_not_lost() {
        // Corrupt ids: 2 and 3 parent each other, 4 its own parent.
        let mut tree = Tree::default();
        let t = Instant::now();
        let nodes = vec![
            call(1, 2, Some(3), 1, 1, "main.x"),
            call(1, 3, Some(2), 2, 1, "main.y"),
            call(1, 4, Some(4), 3, 1, "main.z"),
        ];
        assert!(feed(&mut tree, nodes, t).is_empty());
        let out = tick(&mut tree, t + Duration::from_secs(2));
        for name in ["main.x", "main.y", "main.z"] {
            assert_eq!(out.iter().filter(|l| l.contains(name)).count(), 1, "{name}: {out:#?}");
        }
        assert!(out.iter().all(|l| !l.contains("printed above")), "no parent was elsewhere: {out:#?}");
        assert_eq!(tree.held(), 0);
    }

    #[test]
    fn the_lines_view_is_the_console_as_it_was() {
        let mut f = call(1, 2, Some(1), 0, 1, "main.priceOf");
        f.depth = 2;
        f.head = "main.priceOf(sku=\"pear\", qty=1) = 71".into();
        assert_eq!(f.line(), "10:00:00.000000 g2         main.priceOf(sku=\"pear\", qty=1) = 71  1.00ms");
        f.dur_ns = None;
        assert!(f.line().ends_with("= 71  (entry only)"));
        let mut s = span(0xab, 0xcd, Some(0xef), true, 0, "GET /x");
        s.attrs = Some("url.path=\"/x\" ERROR boom".into());
        assert_eq!(
            s.line(),
            "10:00:00.000000 g205   SERVER GET /x [trace 000000000000000000000000000000ab span 00000000000000cd parent \
             00000000000000ef (remote)] url.path=\"/x\" ERROR boom  3.00ms"
        );
    }
}
