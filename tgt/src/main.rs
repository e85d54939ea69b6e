//! `writecache_tgt`: the storage target. See `writecache_tgt -h`.

use clap::Parser;

/// An SPDK-style storage target with a dm-writecache-compatible cache.
#[derive(Parser, Debug)]
#[command(name = "writecache_tgt", version, about)]
struct Cli {
    #[command(flatten)]
    app: wc_tgt::AppArgs,
}

fn main() {
    let cli = Cli::parse();
    std::process::exit(wc_tgt::run_target(cli.app));
}
