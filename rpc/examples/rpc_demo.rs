//! A stand-alone RPC server for trying `spdk-rpc` against `wc-rpc`.
//!
//! ```text
//! cargo run -p wc-rpc --example rpc_demo -- /tmp/demo.sock [--wait-for-rpc]
//! spdk-rpc -s /tmp/demo.sock rpc_get_methods
//! spdk-rpc -s /tmp/demo.sock spdk_kill_instance SIGTERM   # stops the demo
//! ```
//!
//! Handlers run on one "app thread" fed through the dispatcher, as in the target.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread;

use serde::Deserialize;
use serde_json::{json, Value};
use wc_rpc::{
    decode, no_params, register_builtin, Dispatcher, Job, Registry, RpcError, RpcServer, RpcState,
    StateMask,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KillParams {
    sig_name: String,
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .unwrap_or_else(|| "/var/tmp/spdk.sock".to_owned());
    let wait_for_rpc = args.any(|a| a == "--wait-for-rpc");

    // The "app thread": runs every handler, one at a time.
    let (job_tx, job_rx) = mpsc::channel::<Job>();
    thread::spawn(move || {
        for job in job_rx {
            job();
        }
    });
    let dispatcher: Dispatcher = Arc::new(move |job| {
        // If the app thread is gone the job is dropped and the request answers -32603.
        let _ = job_tx.send(job);
    });

    let registry = Registry::new();
    if let Err(e) = register_builtin(&registry) {
        return Err(std::io::Error::other(e));
    }
    let server = RpcServer::start(&path, registry.clone(), dispatcher)?;
    let gate = server.pause_handle();

    let reg = registry.clone();
    registry
        .register_fn(
            "framework_start_init",
            StateMask::STARTUP,
            move |p, resp| {
                if let Err(e) = no_params("framework_start_init", p.as_ref()) {
                    return resp.err(e);
                }
                // SPDK pauses the server while subsystems initialise.
                gate.pause();
                reg.set_state(RpcState::Runtime);
                gate.resume();
                resp.ok(json!(true));
            },
        )
        .map_err(std::io::Error::other)?;

    registry
        .register_fn("demo_echo", StateMask::RUNTIME, |p, resp| {
            resp.ok(p.unwrap_or(Value::Null))
        })
        .map_err(std::io::Error::other)?;

    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    registry
        .register_fn("spdk_kill_instance", StateMask::RUNTIME, move |p, resp| {
            let p: KillParams = match decode(p) {
                Ok(p) => p,
                Err(e) => return resp.err(e),
            };
            match p.sig_name.as_str() {
                "SIGINT" | "SIGTERM" => {
                    resp.ok(json!(true));
                    let _ = stop_tx.send(());
                }
                _ => resp.err(RpcError::from_errno(libc::EINVAL)),
            }
        })
        .map_err(std::io::Error::other)?;

    if !wait_for_rpc {
        registry.set_state(RpcState::Runtime);
    }
    eprintln!("rpc_demo listening on {path}");
    let _ = stop_rx.recv();
    // Let the writer flush the spdk_kill_instance reply before connections are closed.
    thread::sleep(std::time::Duration::from_millis(50));
    drop(server);
    eprintln!("rpc_demo stopped");
    Ok(())
}
