//! # wc-nvmf: an NVMe-over-TCP target
//!
//! Serves bdevs as NVMe namespaces over TCP to any NVMe/TCP host (the Linux
//! kernel's `nvme-tcp`, SPDK's initiator, our own), configured with SPDK's
//! `nvmf_*` RPCs and saved in an `nvmf` section of `save_config`.
//!
//! ## RPCs
//! | method | params | result |
//! |---|---|---|
//! | `nvmf_create_transport` | `trtype: "TCP"`, `max_queue_depth?`, `max_io_qpairs_per_ctrlr?`, `in_capsule_data_size?`, `max_io_size?`, `max_aq_depth?`, `c2h_success?`, ... (others accepted and ignored) | `true` |
//! | `nvmf_get_transports` | `trtype?` | `[{trtype, max_queue_depth, ...}]` |
//! | `nvmf_create_subsystem` | `nqn`, `serial_number?`, `model_number?`, `allow_any_host?`, `max_namespaces?`, `min_cntlid?`, `max_cntlid?` | `true` |
//! | `nvmf_delete_subsystem` | `nqn` | `true` |
//! | `nvmf_subsystem_add_ns` | `nqn`, `namespace: {bdev_name, nsid?, nguid?, eui64?, uuid?}` | the nsid |
//! | `nvmf_subsystem_remove_ns` | `nqn`, `nsid` | `true` |
//! | `nvmf_subsystem_add_listener` / `_remove_listener` | `nqn`, `listen_address: {trtype, adrfam?, traddr, trsvcid}` | `true` |
//! | `nvmf_subsystem_add_host` / `_remove_host` | `nqn`, `host` | `true` |
//! | `nvmf_subsystem_allow_any_host` | `nqn`, `allow_any_host` | `true` |
//! | `nvmf_get_subsystems` | `nqn?` | SPDK's subsystem objects (discovery first) |
//! | `nvmf_subsystem_get_controllers` | `nqn` | `[{cntlid, hostnqn, hostid, num_io_qpairs}]` |
//! | `nvmf_subsystem_get_qpairs` | `nqn` | `[{cntlid, qid, state, thread, listen_address, peer_address}]` |
//!
//! ## Protocol
//! NVMe/TCP (PDU format 1.0): ICReq/ICResp with header and data digests
//! (CRC32C) as the host asks, MAXH2CDATA 128 KiB; command capsules with
//! in-capsule data (8 KiB on the admin queue, `in_capsule_data_size` on
//! I/O queues), R2T + H2CData for larger writes (one R2T per command),
//! C2HData with the SUCCESS flag when `c2h_success`; C2HTermReq on protocol
//! errors. Fabrics Connect (host NQN checked unless `allow_any_host`,
//! dynamic controller ids), Property Get/Set (CAP, VS, CC, CSTS, enable and
//! shutdown). Admin: Identify (controller, namespace, active namespace
//! list, namespace id descriptors with the bdev's UUID), Get/Set Features
//! (number of queues, volatile write cache, async event config, keep-alive
//! timer, ...), Get Log Page (error, SMART, changed namespace list,
//! discovery), Asynchronous Event Request (namespace attribute notices),
//! Keep Alive (the controller is torn down when it expires). I/O: Read,
//! Write (FUA), Flush, Write Zeroes, Dataset Management (deallocate ->
//! unmap), Compare; anything else is Invalid Opcode. A bdev hot-removed
//! under a namespace detaches it: its I/O fails, hosts get a changed
//! namespace notice.
//!
//! ## Threading and buffers
//! See [`conn`](crate) (module docs): each queue pair is owned by one
//! reactor (round-robin at accept), polled through a per-reactor epoll;
//! per-queue-pair slot buffers are made at Connect; nothing is allocated
//! per I/O. Control state lives behind one mutex used by RPCs and Connect.

mod admin;
mod arena;
mod conn;
pub mod host;
pub mod opts;
pub mod rpc;
mod subsystem;
pub mod target;
#[cfg(feature = "testing")]
pub mod testing;

pub use conn::live_connections;
pub use opts::TransportOpts;
pub use subsystem::ListenAddress;
pub use target::{config_entries, shutdown, NvmfError};
