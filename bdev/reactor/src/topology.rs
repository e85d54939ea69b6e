//! Core topology through hwloc: which CPUs exist, their NUMA node, and
//! binding a thread to one CPU.

use std::sync::OnceLock;

use hwlocality::cpu::binding::CpuBindingFlags;
use hwlocality::cpu::cpuset::CpuSet;
use hwlocality::object::types::ObjectType;
use hwlocality::Topology;

fn topology() -> Option<&'static Topology> {
    static TOPO: OnceLock<Option<Topology>> = OnceLock::new();
    TOPO.get_or_init(|| match Topology::new() {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!("hwloc topology unavailable: {e}");
            None
        }
    })
    .as_ref()
}

/// OS indices of the CPUs this process may run on.
pub fn online_cpus() -> Vec<u32> {
    if let Some(t) = topology() {
        let cpus: Vec<u32> = t
            .objects_with_type(ObjectType::PU)
            .filter_map(|pu| pu.os_index())
            .map(|i| i as u32)
            .collect();
        if !cpus.is_empty() {
            return cpus;
        }
    }
    let n = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    (0..n as u32).collect()
}

/// NUMA node of a CPU, when hwloc knows it.
pub fn numa_node_of(cpu: u32) -> Option<u32> {
    let t = topology()?;
    let pu = t
        .objects_with_type(ObjectType::PU)
        .find(|pu| pu.os_index() == Some(cpu as usize))?;
    let mut node = None;
    for numa in t.objects_with_type(ObjectType::NUMANode) {
        if let (Some(ns), Some(ps)) = (numa.cpuset(), pu.cpuset()) {
            if ns.includes(ps) {
                node = numa.os_index().map(|i| i as u32);
            }
        }
    }
    node
}

/// Binds the calling thread to `cpu`.
pub fn pin_current_thread(cpu: u32) -> Result<(), String> {
    let t = topology().ok_or("no topology")?;
    let mut set = CpuSet::new();
    set.set(cpu as usize);
    t.bind_cpu(&set, CpuBindingFlags::THREAD)
        .map_err(|e| e.to_string())
}
