//! `writecache_tgt`: the storage target. See `writecache_tgt -h`.

use clap::Parser;

// Reactors hand buffers to each other (messages, commit logs): glibc's
// arena locks then park threads in futex waits on the I/O path, mimalloc's
// cross-thread frees do not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// An SPDK-style storage target with a dm-writecache-compatible cache.
#[derive(Parser, Debug)]
#[command(name = "writecache_tgt", version, about)]
struct Cli {
    #[command(flatten)]
    app: wc_tgt::AppArgs,
    /// Directory for vhost sockets (SPDK's `-S`).
    #[arg(short = 'S')]
    vhost_dir_short: Option<std::path::PathBuf>,
}

fn main() {
    let mut cli = Cli::parse();
    if cli.vhost_dir_short.is_some() {
        cli.app.vhost_dir = cli.vhost_dir_short.take();
    }
    std::process::exit(wc_tgt::run_target(cli.app));
}
