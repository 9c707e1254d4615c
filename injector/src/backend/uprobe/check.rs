//! What uprobes need, checked before anything is loaded, each failure one line saying
//! what is missing; and the verifier's reason when it rejects the program.

use std::path::Path;

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Whether this inject may load BPF programs and attach uprobes here, or what is missing.
pub fn available() -> Result<(), String> {
    if !Path::new("/sys/bus/event_source/devices/uprobe/type").exists() {
        return Err("this kernel has no uprobe PMU (/sys/bus/event_source/devices/uprobe is missing: a kernel \
                    built without CONFIG_UPROBE_EVENTS, or /sys not mounted)"
            .into());
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| eff & (1 << cap) != 0;
    if !(has(CAP_SYS_ADMIN) || has(CAP_BPF) && has(CAP_PERFMON)) {
        let missing: Vec<&str> = [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
            .iter()
            .filter(|(c, _)| !has(*c))
            .map(|p| p.1)
            .collect();
        return Err(format!(
            "uprobes need CAP_BPF and CAP_PERFMON (or root); inject lacks {}: run it as root, or grant them \
             (setcap cap_bpf,cap_perfmon+ep $(which inject))",
            missing.join(" and ")
        ));
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) < (5, 15) {
        return Err(format!("uprobes with attach cookies need Linux 5.15 or later; this kernel is {release}"));
    }
    Ok(())
}

/// Why the kernel refused the programs that write a request's `traceparent` (`load`: the
/// load error), in words: a kernel under lockdown (`integrity` or `confidentiality`)
/// refuses `bpf_probe_write_user` to every program, root's included.
pub fn writes_refused(load: &str) -> String {
    if !load.contains("bpf_probe_write_user") {
        return load.to_string();
    }
    let mode = std::fs::read_to_string("/sys/kernel/security/lockdown").ok().and_then(|l| {
        l.split_whitespace().find(|w| w.starts_with('[')).map(|w| w.trim_matches(['[', ']']).to_string())
    });
    match mode.as_deref() {
        Some("none") => format!("the kernel refuses bpf_probe_write_user to inject: {load}"),
        Some(m) => format!("the kernel is locked down ({m}), which refuses bpf_probe_write_user"),
        None => "the kernel refuses bpf_probe_write_user (kernel lockdown, or securityfs not mounted to tell)".into(),
    }
}

/// The verifier log's line that says why it refused: the last one before its statistics.
pub fn verifier_reason(log: &str) -> String {
    let stats = ["processed ", "verification time", "stack depth", "max_states_per_insn", "mark_read"];
    log.lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !stats.iter().any(|s| l.starts_with(s)))
        .unwrap_or("(the verifier gave no reason)")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verifier_reason_is_the_last_line_before_its_statistics() {
        let log = "0: R1=ctx() R10=fp0\n; u64 g = r->r14;\n12: (79) r2 = *(u64 *)(r6 +8)\nR6 invalid mem access \
                   'scalar'\nprocessed 13 insns (limit 1000000) max_states_per_insn 0 total_states 1\n";
        assert_eq!(verifier_reason(log), "R6 invalid mem access 'scalar'");
        assert_eq!(verifier_reason(""), "(the verifier gave no reason)");
    }

    #[test]
    fn root_here_has_what_uprobes_need_or_says_what_is_missing() {
        match available() {
            Ok(()) => {}
            Err(why) => assert!(why.contains("uprobe") && !why.contains('\n'), "{why}"),
        }
    }
}
