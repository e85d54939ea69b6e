//! Runtime behaviour: messages across reactors, pollers, timers, tasks,
//! sleep mode, shutdown, and the deterministic harness.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use wc_reactor::{
    current, for_each_reactor, CoreMask, Harness, IdleMode, PollStatus, Runtime, RuntimeConfig,
};

fn runtime(n: usize, idle: IdleMode) -> Runtime {
    let mut cfg = RuntimeConfig::new(CoreMask::from_cores(0..n as u32));
    cfg.idle = idle;
    cfg.pin = false;
    Runtime::start(cfg).expect("runtime starts")
}

#[test]
fn messages_cross_reactors_and_run_on_their_target() {
    let rt = runtime(2, IdleMode::sleep());
    let (tx, rx) = mpsc::channel();
    let target = rt.handles()[1].clone();
    rt.handles()[0].send(move || {
        let from = current().index();
        let tx = tx.clone();
        target.send(move || {
            tx.send((
                from,
                current().index(),
                std::thread::current().name().map(String::from),
            ))
            .unwrap();
        });
    });
    let (from, to, name) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!((from, to), (0, 1));
    assert_eq!(name.as_deref(), Some("reactor_1"));
    rt.shutdown();
}

#[test]
fn many_senders_lose_no_message() {
    let rt = runtime(2, IdleMode::sleep());
    let count = Arc::new(AtomicUsize::new(0));
    let target = rt.handles()[1].clone();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let target = target.clone();
            let count = count.clone();
            std::thread::spawn(move || {
                for _ in 0..10_000 {
                    let count = count.clone();
                    target.send(move || {
                        count.fetch_add(1, Ordering::Relaxed);
                    });
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let got = target
        .call_blocking(|| ())
        .map(|_| count.load(Ordering::Relaxed));
    assert_eq!(got, Some(40_000));
    rt.shutdown();
}

#[test]
fn pollers_run_and_unregister_themselves() {
    let rt = runtime(1, IdleMode::sleep());
    let (tx, rx) = mpsc::channel();
    rt.main().send(move || {
        let mut n = 0;
        let handle = std::rc::Rc::new(std::cell::RefCell::new(None::<wc_reactor::PollerHandle>));
        let h2 = handle.clone();
        let p = current().register_poller("count", None, move || {
            n += 1;
            if n == 100 {
                h2.borrow().as_ref().unwrap().unregister();
                tx.send(n).unwrap();
            }
            PollStatus::Busy
        });
        *handle.borrow_mut() = Some(p);
    });
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 100);
    // Once unregistered the poller must not run again (no second send).
    assert!(rx.recv_timeout(Duration::from_millis(50)).is_err());
    let names = rt
        .main()
        .call_blocking(|| current().poller_names())
        .unwrap();
    assert!(names.is_empty(), "{names:?}");
    rt.shutdown();
}

#[test]
fn periodic_poller_and_timer_respect_their_period() {
    let rt = runtime(1, IdleMode::sleep());
    let (tx, rx) = mpsc::channel();
    let t0 = Instant::now();
    rt.main().send(move || {
        let tx2 = tx.clone();
        current().schedule_timer(Duration::from_millis(30), move || {
            tx2.send(("timer", Instant::now())).unwrap();
        });
        let mut runs = 0;
        current().register_poller("tick", Some(Duration::from_millis(10)), move || {
            runs += 1;
            if runs == 5 {
                tx.send(("poller", Instant::now())).unwrap();
            }
            PollStatus::Busy
        });
    });
    let mut got = [
        rx.recv_timeout(Duration::from_secs(5)).unwrap(),
        rx.recv_timeout(Duration::from_secs(5)).unwrap(),
    ];
    got.sort_by_key(|(n, _)| *n);
    let poller = got[0].1 - t0;
    let timer = got[1].1 - t0;
    assert!(
        poller >= Duration::from_millis(50),
        "poller ran early: {poller:?}"
    );
    assert!(
        timer >= Duration::from_millis(30),
        "timer fired early: {timer:?}"
    );
    rt.shutdown();
}

#[test]
fn sleeping_reactor_wakes_on_message_and_stays_mostly_idle() {
    let rt = runtime(1, IdleMode::sleep());
    std::thread::sleep(Duration::from_millis(300));
    let (busy, idle) = rt.main().busy_idle_ticks();
    let t0 = Instant::now();
    let v = rt.main().call_blocking(|| 42).unwrap();
    assert_eq!(v, 42);
    assert!(
        t0.elapsed() < Duration::from_millis(50),
        "wake took {:?}",
        t0.elapsed()
    );
    assert!(rt.main().in_interrupt());
    assert!(idle > busy, "busy {busy} idle {idle}");
    // The thread really sleeps: its CPU time is far below wall time.
    rt.shutdown();
}

#[test]
fn busy_mode_runs_too() {
    let rt = runtime(1, IdleMode::Busy);
    assert_eq!(rt.main().call_blocking(|| 7), Some(7));
    assert!(!rt.main().in_interrupt());
    rt.shutdown();
}

#[test]
fn local_tasks_are_woken_from_other_threads() {
    let rt = runtime(2, IdleMode::sleep());
    let other = rt.handles()[1].clone();
    let (tx, rx) = mpsc::channel();
    rt.main().send(move || {
        let me = current().index();
        current()
            .spawn_local(async move {
                let v = other.call(|| current().index() * 10).await.unwrap();
                tx.send((me, v, current().index())).unwrap();
            })
            .detach();
    });
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), (0, 10, 0));
    rt.shutdown();
}

#[test]
fn for_each_reactor_visits_all_then_completes_on_caller() {
    let rt = runtime(2, IdleMode::sleep());
    let seen = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::channel();
    let s = seen.clone();
    rt.handles()[1].send(move || {
        let s2 = s.clone();
        for_each_reactor(
            move || {
                s2.fetch_add(1 << (current().index() * 4), Ordering::SeqCst);
            },
            move || {
                tx.send((s.load(Ordering::SeqCst), current().index()))
                    .unwrap();
            },
        );
    });
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), (0x11, 1));
    rt.shutdown();
}

#[test]
fn shutdown_joins_and_drains_pending_messages() {
    let rt = runtime(2, IdleMode::sleep());
    let count = Arc::new(AtomicUsize::new(0));
    for h in rt.handles() {
        for _ in 0..100 {
            let c = count.clone();
            h.send(move || {
                c.fetch_add(1, Ordering::SeqCst);
            });
        }
    }
    rt.shutdown();
    assert_eq!(count.load(Ordering::SeqCst), 200);
}

#[test]
fn bad_main_core_is_refused() {
    let mut cfg = RuntimeConfig::new(CoreMask::parse("0x1").unwrap());
    cfg.main_core = Some(3);
    cfg.pin = false;
    assert!(Runtime::start(cfg).is_err());
    let mut cfg = RuntimeConfig::new(CoreMask::parse("[1000]").unwrap());
    cfg.pin = true;
    let err = Runtime::start(cfg).err().expect("core 1000 does not exist");
    assert!(err.to_string().contains("1000"), "{err}");
}

/// A schedule chosen by a seeded generator replays exactly.
fn run_schedule(seed: u64) -> Vec<(usize, u32)> {
    let h = Harness::new(3);
    let log = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let mut state = seed;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for i in 0..3 {
        let log = log.clone();
        h.on(i, || {
            let mut n = 0u32;
            current().register_poller("p", None, move || {
                n += 1;
                log.borrow_mut().push((current().index(), n));
                PollStatus::Busy
            });
        });
    }
    for _ in 0..50 {
        h.poll((next() % 3) as usize);
    }
    let v = log.borrow().clone();
    v
}

#[test]
fn harness_reproduces_a_schedule() {
    assert_eq!(run_schedule(42), run_schedule(42));
    assert_ne!(run_schedule(42), run_schedule(43));
}

#[test]
fn harness_delivers_messages_only_when_target_polls() {
    let h = Harness::new(2);
    let hit = Arc::new(AtomicUsize::new(0));
    let target = h.handle(1);
    let hit2 = hit.clone();
    h.on(0, || {
        target.send(move || {
            assert_eq!(current().index(), 1);
            hit2.fetch_add(1, Ordering::SeqCst);
        })
    });
    h.poll(0);
    assert_eq!(hit.load(Ordering::SeqCst), 0);
    h.poll(1);
    assert_eq!(hit.load(Ordering::SeqCst), 1);
}

/// Runs of a poller (event-driven or not) that never finds work, on an
/// otherwise idle sleep-mode reactor, over `window` after it settled.
fn idle_runs(event: bool, window: Duration) -> usize {
    let rt = runtime(1, IdleMode::sleep());
    let runs = Arc::new(AtomicUsize::new(0));
    let r2 = runs.clone();
    rt.main()
        .call_blocking(move || {
            let f = move || {
                r2.fetch_add(1, Ordering::Relaxed);
                PollStatus::Idle
            };
            if event {
                current().register_event_poller("idle_event", f);
            } else {
                current().register_poller("idle_active", None, f);
            }
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let before = runs.load(Ordering::Relaxed);
    std::thread::sleep(window);
    let n = runs.load(Ordering::Relaxed) - before;
    rt.shutdown();
    n
}

#[test]
fn event_pollers_let_an_idle_reactor_sleep() {
    let window = Duration::from_millis(300);
    // An active poller may have work in flight: the reactor naps (10 us,
    // backing off to 1 ms) to look again. An event poller only finds work
    // the reactor queued itself, so the idle reactor sleeps until a
    // message or timer (here: its 100 ms bound).
    let event = idle_runs(true, window);
    assert!(event <= 20, "event poller ran {event} times in {window:?}");
    let active = idle_runs(false, window);
    assert!(
        active > event,
        "active poller ran {active} times, event {event}"
    );
    // Both count as active pollers in the stats.
    let rt = runtime(1, IdleMode::sleep());
    rt.main()
        .call_blocking(|| {
            current().register_event_poller("e", || PollStatus::Idle);
        })
        .unwrap();
    assert_eq!(rt.main().poller_counts(), (1, 0));
    rt.shutdown();
}

/// A paused poller is skipped until resumed, and may pause itself from
/// inside its own run.
#[test]
fn paused_pollers_are_skipped_until_resumed() {
    let h = Harness::new(1);
    let runs = Arc::new(AtomicUsize::new(0));
    let r2 = runs.clone();
    let handle = h.on(0, move || {
        let me = std::rc::Rc::new(std::cell::OnceCell::<wc_reactor::PollerHandle>::new());
        let me2 = me.clone();
        let p = current().register_poller("pausing", None, move || {
            // Pauses itself on its third run.
            if r2.fetch_add(1, Ordering::SeqCst) == 2 {
                me2.get().expect("set before the first poll").pause();
            }
            PollStatus::Idle
        });
        let _ = me.set(p.clone());
        p
    });
    for _ in 0..10 {
        h.poll(0);
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        3,
        "paused itself on its third run"
    );
    h.on(0, || {
        assert!(handle.is_paused());
        handle.resume();
    });
    h.poll(0);
    assert_eq!(runs.load(Ordering::SeqCst), 4, "runs again once resumed");
    h.on(0, || handle.pause());
    for _ in 0..5 {
        h.poll(0);
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        4,
        "paused from outside the poller"
    );
    h.on(0, || handle.unregister());
}
