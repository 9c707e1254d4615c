//! How many slots the ring gets by default: as many as keep ~86 ms of records, within an
//! eighth of inject's memory cgroup limit.

/// Ring slots by default: 2^19 slots of 256 bytes hold ~86 ms of records at the 6.1
/// million a second `cargo xtask bench drain` measured inject draining from a target that
/// keeps both cores of a 2-core machine busy writing them, and 100 ms at 5.2 million.
const DEFAULT_RING_SLOTS: u64 = 1 << 19;

/// [`DEFAULT_RING_SLOTS`], or fewer when inject's own memory cgroup is small: the ring's
/// pages are allocated up front and charged to inject, which must not be OOM-killed for it
/// (an inject in the target's pod shares the pod's limit). Says so when it caps.
pub fn default_ring_slots() -> u64 {
    let limit = cgroup_memory_limit();
    let slots = ring_slots_within(limit);
    if let Some(limit) = limit.filter(|_| slots < DEFAULT_RING_SLOTS) {
        eprintln!(
            "inject: ring of {slots} slots ({} MiB), an eighth of this cgroup's {} MiB memory limit (--ring-slots to \
             choose)",
            (slots * 256) >> 20,
            limit >> 20
        );
    }
    slots
}

/// The default slots within a memory limit: a power of two whose memory is at most an
/// eighth of it (at least 1024 slots).
fn ring_slots_within(limit: Option<u64>) -> u64 {
    let Some(limit) = limit else { return DEFAULT_RING_SLOTS };
    let fit = (limit / 8 / 256).max(1024);
    DEFAULT_RING_SLOTS.min(1 << (63 - fit.leading_zeros()))
}

/// The memory limit of the cgroup this process is in, when it has one: v2 `memory.max` or
/// v1 `memory.limit_in_bytes`, under the path /proc/self/cgroup names or, in a container
/// whose cgroup is mounted as the root, at the root.
fn cgroup_memory_limit() -> Option<u64> {
    let cg = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let v2 = cg.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or("/");
    let v1 = cg.lines().find_map(|l| l.split_once(":memory:").map(|(_, p)| p)).unwrap_or("/");
    let tries = [
        format!("/sys/fs/cgroup{}/memory.max", v2.trim_end_matches('/')),
        "/sys/fs/cgroup/memory.max".to_string(),
        format!("/sys/fs/cgroup/memory{}/memory.limit_in_bytes", v1.trim_end_matches('/')),
        "/sys/fs/cgroup/memory/memory.limit_in_bytes".to_string(),
    ];
    tries.iter().filter_map(|p| std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok()).find(|&v| v < 1 << 60)
}

#[cfg(test)]
mod ring_size_tests {
    use super::*;

    #[test]
    fn default_ring_fits_an_eighth_of_the_memory_limit() {
        assert_eq!(ring_slots_within(None), DEFAULT_RING_SLOTS);
        assert_eq!(ring_slots_within(Some(64 << 30)), DEFAULT_RING_SLOTS);
        // 256 MiB: 32 MiB of 256-byte slots.
        assert_eq!(ring_slots_within(Some(256 << 20)), 1 << 17);
        // 300 MiB: the power of two below 37.5 MiB.
        assert_eq!(ring_slots_within(Some(300 << 20)), 1 << 17);
        assert_eq!(ring_slots_within(Some(1 << 20)), 1024);
    }
}
