//! Test support shared by the target's own tests and the initiator's
//! (`wc-bdev-nvme`) tests against this target: a free loopback port and
//! one call that exports a bdev as a namespace of a new subsystem on a
//! new TCP listener. Only with the `testing` feature.

use std::net::SocketAddr;

use crate::target::{self, NsArgs, SubsystemArgs};

/// A loopback port nothing listens on right now (the kernel's pick).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Creates the TCP transport unless it exists. Run on the control-plane
/// reactor.
pub fn ensure_transport() {
    let exists =
        target::get_transports(None).is_ok_and(|t| t.as_array().is_some_and(|a| !a.is_empty()));
    if exists {
        return;
    }
    let mut p = serde_json::Map::new();
    p.insert("trtype".into(), "TCP".into());
    target::create_transport(&p).expect("TCP transport");
}

/// Exports bdev `bdev` as namespace 1 of a new subsystem `nqn` (serial
/// `WC123`) listening on 127.0.0.1 at a free port, creating the TCP
/// transport first if needed; `allow_any` lets every host in. Returns
/// the listener's address. Run on the control-plane reactor.
pub fn export_bdev(nqn: &str, bdev: &str, allow_any: bool) -> SocketAddr {
    ensure_transport();
    target::create_subsystem(SubsystemArgs {
        nqn: nqn.to_string(),
        serial_number: Some("WC123".into()),
        model_number: None,
        allow_any_host: allow_any,
        max_namespaces: None,
        min_cntlid: None,
        max_cntlid: None,
    })
    .expect("subsystem");
    add_namespace(nqn, bdev, None);
    let port = free_port();
    let (a, sa) = target::parse_listen_address("TCP", None, "127.0.0.1", Some(&port.to_string()))
        .expect("listen address");
    target::add_listener(nqn, a, sa).expect("listener");
    sa
}

/// Adds bdev `bdev` to subsystem `nqn` as namespace `nsid` (or the next
/// free one); returns the namespace ID. Run on the control-plane reactor.
pub fn add_namespace(nqn: &str, bdev: &str, nsid: Option<u32>) -> u32 {
    target::add_ns(
        nqn,
        NsArgs {
            bdev_name: bdev.to_string(),
            nsid,
            nguid: None,
            eui64: None,
            uuid: None,
        },
    )
    .expect("namespace")
}
