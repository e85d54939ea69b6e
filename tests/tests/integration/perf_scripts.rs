//! The benchmark scripts in `perf/` kept from rotting: `perf/fio.sh
//! --smoke` (fio's nbd engine through the target's NBD export, every
//! workload of the matrix at one queue depth, a few seconds) must run and
//! write its report; `ram_tmp` (perf/common.sh), where every script puts
//! its cache files, mounts and removes its huge-page tmpfs.

use std::process::Command;
use std::time::Duration;

use crate::harness::{run_bounded, tgt_binary, unique_dir, workspace_root};

#[test]
fn fio_sh_smoke_writes_the_report() {
    require_clients!("fio");
    let dir = unique_dir("fio-smoke");
    let out_dir = dir.join("results");
    let mut cmd = Command::new("bash");
    cmd.arg(workspace_root().join("perf/fio.sh"))
        .arg("--smoke")
        .env("WRITECACHE_TGT", tgt_binary())
        .env("RESULTS_DIR", &out_dir)
        .env("ORIGIN_DIR_PARENT", &dir)
        // `ram_tmp`'s mount is checked on its own below.
        .env("CACHE_PAGES", "4k");
    let out = run_bounded(cmd, Duration::from_secs(180));
    assert_eq!(out.code, 0, "perf/fio.sh --smoke: {}", out.all());
    let md = std::fs::read_to_string(out_dir.join("fio.md")).expect("fio.md");
    for title in [
        "## 4 KiB random write",
        "## 4 KiB random read, cache hits",
        "## 4 KiB random read, cache misses",
        "## 128 KiB sequential write",
        "## 4 KiB random 70% read / 30% write",
    ] {
        assert!(md.contains(title), "no '{title}' in\n{md}");
    }
    // Every headline ratio measured (no failed cell).
    let headline: Vec<&str> = md
        .lines()
        .skip_while(|l| !l.starts_with("## Headline"))
        .skip(4)
        .take_while(|l| l.starts_with('|'))
        .collect();
    assert_eq!(headline.len(), 5, "{md}");
    for l in &headline {
        let ratio = l.rsplit('|').nth(1).unwrap_or("").trim();
        assert!(ratio.parse::<f64>().is_ok_and(|r| r > 0.0), "{l}");
    }
    // Misses really missed and hits really hit.
    assert!(
        md.contains("miss phase 0.0% hits, hit phase 100.0% hits"),
        "{md}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `ram_tmp` puts the cache files on a tmpfs mounted with `huge=always`
/// where it can (root, THP), else in the parent dir with a warning; the
/// script's exit unmounts and removes it either way.
#[test]
fn ram_tmp_mounts_huge_pages_and_cleans_up() {
    let dir = unique_dir("ram-tmp");
    let script = format!(
        "source {}; ram_tmp {} t; echo \"TMP=$TMP\"; echo \"MNT=$HUGE_MNT\"; \
         touch \"$TMP/f\"; grep -F \" $HUGE_MNT tmpfs \" /proc/mounts || true",
        workspace_root().join("perf/common.sh").display(),
        dir.display()
    );
    let mut cmd = Command::new("bash");
    cmd.arg("-c").arg(script);
    let out = run_bounded(cmd, Duration::from_secs(30));
    assert_eq!(out.code, 0, "{}", out.all());
    let text = out.all();
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or_default()
            .to_string()
    };
    let (tmp, mnt) = (field("TMP="), field("MNT="));
    assert!(tmp.starts_with(dir.to_str().unwrap()), "{text}");
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if mnt.is_empty() {
        assert!(text.contains("4 KiB pages"), "no fallback warning: {text}");
    } else {
        assert!(root, "{text}");
        assert!(tmp.starts_with(&mnt), "{text}");
        assert!(text.contains("huge=always"), "not mounted huge: {text}");
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
        assert!(!mounts.contains(&mnt), "still mounted: {mnt}");
        assert!(!std::path::Path::new(&mnt).exists(), "{mnt} left behind");
    }
    assert!(!std::path::Path::new(&tmp).exists(), "{tmp} left behind");
    let _ = std::fs::remove_dir_all(&dir);
}
