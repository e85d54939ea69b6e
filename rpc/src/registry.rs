//! Method registry, STARTUP/RUNTIME state and the [`Responder`] a handler answers through.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::ops::BitOr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, OnceLock, RwLock, Weak};

use serde::Serialize;
use serde_json::Value;

use crate::error::RpcError;

/// The set of states in which a method may be called (`SPDK_RPC_STARTUP` / `SPDK_RPC_RUNTIME`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct StateMask(u32);

impl StateMask {
    /// Callable before `framework_start_init` (SPDK's `SPDK_RPC_STARTUP = 0x1`).
    pub const STARTUP: StateMask = StateMask(1);
    /// Callable once the framework is initialised (SPDK's `SPDK_RPC_RUNTIME = 0x2`).
    pub const RUNTIME: StateMask = StateMask(2);
    /// Callable in both states (`STARTUP | RUNTIME`).
    pub const BOTH: StateMask = StateMask(3);

    /// The raw bits.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// A mask from raw bits; bits other than STARTUP and RUNTIME are dropped.
    pub const fn from_bits(bits: u32) -> StateMask {
        StateMask(bits & 3)
    }

    /// SPDK's test: `(self & other) == other`.
    pub const fn contains(self, other: StateMask) -> bool {
        self.0 & other.0 == other.0
    }
}

impl BitOr for StateMask {
    type Output = StateMask;
    fn bitor(self, rhs: StateMask) -> StateMask {
        StateMask(self.0 | rhs.0)
    }
}

impl fmt::Debug for StateMask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            0 => f.write_str("StateMask(NONE)"),
            1 => f.write_str("StateMask(STARTUP)"),
            2 => f.write_str("StateMask(RUNTIME)"),
            _ => f.write_str("StateMask(STARTUP | RUNTIME)"),
        }
    }
}

/// The application's current RPC state (SPDK's `g_rpc_state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RpcState {
    /// Before `framework_start_init` (`--wait-for-rpc`): only STARTUP methods work.
    Startup,
    /// Subsystems are initialised: only RUNTIME methods work.
    Runtime,
}

impl RpcState {
    /// The single-bit mask for this state.
    pub const fn mask(self) -> StateMask {
        match self {
            RpcState::Startup => StateMask::STARTUP,
            RpcState::Runtime => StateMask::RUNTIME,
        }
    }
}

/// A method implementation. It is called on whatever thread the server's dispatcher runs
/// jobs on (the app's main reactor in the target), and must answer exactly once through the
/// [`Responder`] — now, or later from any thread.
pub type Handler = Arc<dyn Fn(Option<Value>, Responder) + Send + Sync>;

type Completion = Box<dyn FnOnce(Result<Value, RpcError>) + Send>;

/// The one-shot reply channel of a request.
///
/// Consumed by [`respond`](Self::respond). If it is dropped without answering (a handler bug,
/// a panic, a dispatcher that discarded the job), it answers `-32603 "Internal error"` so
/// that no request is ever left without a reply.
#[must_use = "a request must be answered; dropping the Responder sends -32603"]
pub struct Responder {
    done: Option<Completion>,
}

impl Responder {
    /// A responder that hands the outcome to `f` (used by the server; handy in tests).
    pub fn new(f: impl FnOnce(Result<Value, RpcError>) + Send + 'static) -> Self {
        Self {
            done: Some(Box::new(f)),
        }
    }

    /// A responder whose outcome arrives on the returned channel.
    pub fn channel() -> (Responder, mpsc::Receiver<Result<Value, RpcError>>) {
        let (tx, rx) = mpsc::channel();
        let r = Responder::new(move |res| {
            // The receiver may be gone; nobody is left to tell.
            let _ = tx.send(res);
        });
        (r, rx)
    }

    /// Sends the reply. For a notification (no `id`) a successful result is discarded by the
    /// server, as SPDK does; errors are still sent, with `"id": null`.
    pub fn respond(mut self, result: Result<Value, RpcError>) {
        if let Some(done) = self.done.take() {
            done(result);
        }
    }

    /// Sends a successful reply.
    pub fn ok(self, value: Value) {
        self.respond(Ok(value));
    }

    /// Sends an error reply.
    pub fn err(self, error: RpcError) {
        self.respond(Err(error));
    }

    /// Serialises `result` and sends it; a serialisation failure becomes `-32603`.
    pub fn respond_with<T: Serialize>(self, result: Result<T, RpcError>) {
        let r = result.and_then(|v| {
            serde_json::to_value(v)
                .map_err(|e| RpcError::internal(format!("Failed to encode result: {e}")))
        });
        self.respond(r);
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            tracing::error!("RPC request dropped without a response; replying -32603");
            done(Err(RpcError::internal("Internal error")));
        }
    }
}

impl fmt::Debug for Responder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Responder")
            .field("answered", &self.done.is_none())
            .finish()
    }
}

/// Why a registration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    /// A method or alias of that name already exists.
    #[error("RPC method {0} is already registered")]
    Duplicate(String),
    /// `register_alias` named a target that is not a registered method.
    #[error("cannot register alias {alias}: method {target} is not registered")]
    UnknownTarget {
        /// The alias being registered.
        alias: String,
        /// The missing target.
        target: String,
    },
    /// `register_alias` named another alias as target.
    #[error("cannot register alias {alias}: {target} is itself an alias")]
    AliasOfAlias {
        /// The alias being registered.
        alias: String,
        /// The target, which is an alias.
        target: String,
    },
}

enum Entry {
    Method {
        states: StateMask,
        handler: Handler,
    },
    Alias {
        target: String,
        warned: Arc<AtomicBool>,
    },
}

#[derive(Default)]
struct Table {
    entries: HashMap<String, Entry>,
    /// Registration order (methods and aliases), for stable `rpc_get_methods` output.
    order: Vec<String>,
    /// `--rpcs-allowed`: when set, everything else is "Method not found".
    allowlist: Option<HashSet<String>>,
}

impl Table {
    fn allowed(&self, name: &str) -> bool {
        self.allowlist.as_ref().is_none_or(|a| a.contains(name))
    }

    /// Resolves `name` (following one alias level) to its handler and mask.
    fn resolve(&self, name: &str) -> Option<(Handler, StateMask)> {
        match self.entries.get(name)? {
            Entry::Method { states, handler } => {
                self.allowed(name).then(|| (handler.clone(), *states))
            }
            Entry::Alias { target, warned } => {
                if !(self.allowed(name) || self.allowed(target)) {
                    return None;
                }
                match self.entries.get(target.as_str())? {
                    Entry::Method { states, handler } => {
                        if !warned.swap(true, Ordering::Relaxed) {
                            tracing::warn!(
                                "RPC method {name} is deprecated.  Use {target} instead."
                            );
                        }
                        Some((handler.clone(), *states))
                    }
                    Entry::Alias { .. } => None,
                }
            }
        }
    }

    /// Like `resolve` without the deprecation warning: is `name` listable?
    fn resolve_allowed(&self, name: &str) -> Option<()> {
        match self.entries.get(name)? {
            Entry::Method { .. } => self.allowed(name).then_some(()),
            Entry::Alias { target, .. } => {
                (self.allowed(name) || self.allowed(target)).then_some(())
            }
        }
    }

    fn states_of(&self, name: &str) -> Option<StateMask> {
        match self.entries.get(name)? {
            Entry::Method { states, .. } => Some(*states),
            Entry::Alias { target, .. } => match self.entries.get(target.as_str())? {
                Entry::Method { states, .. } => Some(*states),
                Entry::Alias { .. } => None,
            },
        }
    }
}

struct StateCell {
    state: RpcState,
    /// `framework_wait_init` callers waiting for RUNTIME.
    waiters: Vec<Responder>,
}

struct Inner {
    table: RwLock<Table>,
    state: Mutex<StateCell>,
}

/// The method table plus the current [`RpcState`].
///
/// `Registry` is a cheap handle (`Clone` shares the same table). A new registry starts in
/// [`RpcState::Startup`] and empty: call [`register_builtin`](crate::register_builtin) to add
/// `rpc_get_methods`, `spdk_get_version` and `framework_wait_init`.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

/// A registry handle that does not keep the registry alive (for handlers stored in it).
#[derive(Clone)]
pub(crate) struct WeakRegistry(Weak<Inner>);

impl WeakRegistry {
    pub(crate) fn upgrade(&self) -> Option<Registry> {
        self.0.upgrade().map(|inner| Registry { inner })
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("state", &self.state())
            .field("methods", &self.method_names(false, true))
            .finish()
    }
}

impl Registry {
    /// An empty registry in [`RpcState::Startup`].
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                table: RwLock::new(Table::default()),
                state: Mutex::new(StateCell {
                    state: RpcState::Startup,
                    waiters: Vec::new(),
                }),
            }),
        }
    }

    pub(crate) fn downgrade(&self) -> WeakRegistry {
        WeakRegistry(Arc::downgrade(&self.inner))
    }

    fn read_table(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.inner.table.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_table(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.inner.table.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `name`, callable in the states of `states`.
    pub fn register(
        &self,
        name: &str,
        states: StateMask,
        handler: Handler,
    ) -> Result<(), RegisterError> {
        let mut t = self.write_table();
        if t.entries.contains_key(name) {
            return Err(RegisterError::Duplicate(name.to_owned()));
        }
        t.entries
            .insert(name.to_owned(), Entry::Method { states, handler });
        t.order.push(name.to_owned());
        Ok(())
    }

    /// [`register`](Self::register) for a closure.
    pub fn register_fn<F>(&self, name: &str, states: StateMask, f: F) -> Result<(), RegisterError>
    where
        F: Fn(Option<Value>, Responder) + Send + Sync + 'static,
    {
        self.register(name, states, Arc::new(f))
    }

    /// Registers a deprecated alias: calling `alias` logs a one-time warning and runs
    /// `target` (same state mask). `target` must already be registered.
    pub fn register_alias(&self, alias: &str, target: &str) -> Result<(), RegisterError> {
        let mut t = self.write_table();
        if t.entries.contains_key(alias) {
            return Err(RegisterError::Duplicate(alias.to_owned()));
        }
        match t.entries.get(target) {
            None => {
                return Err(RegisterError::UnknownTarget {
                    alias: alias.to_owned(),
                    target: target.to_owned(),
                })
            }
            Some(Entry::Alias { .. }) => {
                return Err(RegisterError::AliasOfAlias {
                    alias: alias.to_owned(),
                    target: target.to_owned(),
                })
            }
            Some(Entry::Method { .. }) => {}
        }
        t.entries.insert(
            alias.to_owned(),
            Entry::Alias {
                target: target.to_owned(),
                warned: Arc::new(AtomicBool::new(false)),
            },
        );
        t.order.push(alias.to_owned());
        Ok(())
    }

    /// Whether `name` is a registered method or alias (ignoring the allow-list).
    pub fn contains(&self, name: &str) -> bool {
        self.read_table().entries.contains_key(name)
    }

    /// Restricts callable methods to `allowed` (SPDK's `--rpcs-allowed`); `None` lifts it.
    /// Other methods answer "Method not found" and are left out of `rpc_get_methods`.
    pub fn set_allowlist<I, S>(&self, allowed: Option<I>)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.write_table().allowlist = allowed.map(|i| i.into_iter().map(Into::into).collect());
    }

    /// The current state.
    pub fn state(&self) -> RpcState {
        lock(&self.inner.state).state
    }

    /// Sets the current state. Switching to RUNTIME answers `true` to every pending
    /// `framework_wait_init`.
    pub fn set_state(&self, state: RpcState) {
        let waiters = {
            let mut cell = lock(&self.inner.state);
            cell.state = state;
            if state == RpcState::Runtime {
                std::mem::take(&mut cell.waiters)
            } else {
                Vec::new()
            }
        };
        tracing::debug!(?state, waiters = waiters.len(), "RPC state changed");
        for w in waiters {
            w.ok(Value::Bool(true));
        }
    }

    /// Answers `true` once the state is RUNTIME (immediately if it already is).
    pub fn wait_for_runtime(&self, responder: Responder) {
        {
            let mut cell = lock(&self.inner.state);
            if cell.state != RpcState::Runtime {
                cell.waiters.push(responder);
                return;
            }
        }
        responder.ok(Value::Bool(true));
    }

    /// Names of registered methods, in registration order.
    ///
    /// `current`: only those callable in the current state. `include_aliases`: also list
    /// deprecated aliases. Methods outside the allow-list are never listed.
    pub fn method_names(&self, current: bool, include_aliases: bool) -> Vec<String> {
        let state = self.state().mask();
        let t = self.read_table();
        t.order
            .iter()
            .filter(|name| {
                let is_alias = matches!(t.entries.get(name.as_str()), Some(Entry::Alias { .. }));
                if is_alias && !include_aliases {
                    return false;
                }
                if t.resolve_allowed(name).is_none() {
                    return false;
                }
                !current || t.states_of(name).is_some_and(|m| m.contains(state))
            })
            .cloned()
            .collect()
    }

    /// Names of the methods callable in `state` (whatever the current state is), as the
    /// config loader needs to split a file into its STARTUP and RUNTIME passes.
    pub fn method_names_in(&self, state: RpcState, include_aliases: bool) -> Vec<String> {
        let mask = state.mask();
        let t = self.read_table();
        t.order
            .iter()
            .filter(|name| {
                let is_alias = matches!(t.entries.get(name.as_str()), Some(Entry::Alias { .. }));
                (include_aliases || !is_alias)
                    && t.resolve_allowed(name).is_some()
                    && t.states_of(name).is_some_and(|m| m.contains(mask))
            })
            .cloned()
            .collect()
    }

    /// Runs `method` with `params`, answering through `responder`.
    ///
    /// Unknown (or not allowed) methods get `-32601`; a method not callable in the current
    /// state gets `-1` with SPDK's message. The handler runs on the calling thread; a panic
    /// in it is caught and logged, and its dropped responder answers `-32603`.
    pub fn dispatch(&self, method: &str, params: Option<Value>, responder: Responder) {
        let resolved = self.read_table().resolve(method);
        let Some((handler, states)) = resolved else {
            tracing::debug!(method, "RPC method not found");
            responder.err(RpcError::method_not_found());
            return;
        };
        let state = self.state();
        if !states.contains(state.mask()) {
            responder.err(match state {
                RpcState::Startup => RpcError::invalid_state_startup(),
                RpcState::Runtime => RpcError::invalid_state_runtime(),
            });
            return;
        }
        tracing::trace!(method, "RPC dispatch");
        if catch_unwind(AssertUnwindSafe(|| handler(params, responder))).is_err() {
            tracing::error!(method, "RPC handler panicked");
        }
    }

    /// Dispatches and blocks until the handler answers (for tests and tools; do not call
    /// it on the thread the handler needs to answer from).
    pub fn call_blocking(&self, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
        let (r, rx) = Responder::channel();
        self.dispatch(method, params, r);
        rx.recv()
            .unwrap_or_else(|_| Err(RpcError::internal("Internal error")))
    }
}

/// The process-wide registry (created empty, in STARTUP, on first use).
pub fn registry() -> &'static Registry {
    static GLOBAL: OnceLock<Registry> = OnceLock::new();
    GLOBAL.get_or_init(Registry::new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn echo_registry() -> Registry {
        let r = Registry::new();
        r.register_fn("echo", StateMask::BOTH, |p, resp| {
            resp.ok(p.unwrap_or(Value::Null))
        })
        .unwrap();
        r.register_fn("startup_only", StateMask::STARTUP, |_, resp| {
            resp.ok(json!("s"))
        })
        .unwrap();
        r.register_fn("runtime_only", StateMask::RUNTIME, |_, resp| {
            resp.ok(json!("r"))
        })
        .unwrap();
        r
    }

    #[test]
    fn mask_semantics() {
        assert!(StateMask::BOTH.contains(StateMask::STARTUP));
        assert!(StateMask::BOTH.contains(StateMask::RUNTIME));
        assert!(!StateMask::STARTUP.contains(StateMask::RUNTIME));
        assert_eq!(StateMask::STARTUP | StateMask::RUNTIME, StateMask::BOTH);
        assert_eq!(StateMask::from_bits(0xff).bits(), 3);
        assert_eq!(RpcState::Runtime.mask(), StateMask::RUNTIME);
    }

    #[test]
    fn dispatch_and_states() {
        let r = echo_registry();
        assert_eq!(r.state(), RpcState::Startup);
        assert_eq!(
            r.call_blocking("echo", Some(json!({"a": 1}))),
            Ok(json!({"a": 1}))
        );
        assert_eq!(r.call_blocking("startup_only", None), Ok(json!("s")));
        assert_eq!(
            r.call_blocking("runtime_only", None),
            Err(RpcError::invalid_state_startup())
        );
        r.set_state(RpcState::Runtime);
        assert_eq!(r.call_blocking("runtime_only", None), Ok(json!("r")));
        assert_eq!(
            r.call_blocking("startup_only", None),
            Err(RpcError::invalid_state_runtime())
        );
        assert_eq!(
            r.call_blocking("nope", None),
            Err(RpcError::method_not_found())
        );
    }

    #[test]
    fn duplicates_and_aliases() {
        let r = echo_registry();
        assert_eq!(
            r.register_fn("echo", StateMask::BOTH, |_, resp| resp.ok(Value::Null)),
            Err(RegisterError::Duplicate("echo".into()))
        );
        assert!(matches!(
            r.register_alias("x", "missing"),
            Err(RegisterError::UnknownTarget { .. })
        ));
        r.register_alias("old_echo", "echo").unwrap();
        assert!(matches!(
            r.register_alias("older_echo", "old_echo"),
            Err(RegisterError::AliasOfAlias { .. })
        ));
        assert_eq!(
            r.register_alias("old_echo", "echo"),
            Err(RegisterError::Duplicate("old_echo".into()))
        );
        assert_eq!(
            r.call_blocking("old_echo", Some(json!([1]))),
            Ok(json!([1]))
        );
        assert_eq!(
            r.method_names(false, false),
            vec!["echo", "startup_only", "runtime_only"]
        );
        assert_eq!(
            r.method_names(false, true),
            vec!["echo", "startup_only", "runtime_only", "old_echo"]
        );
        assert_eq!(
            r.method_names(true, true),
            vec!["echo", "startup_only", "old_echo"]
        );
    }

    #[test]
    fn allowlist_hides_methods() {
        let r = echo_registry();
        r.set_allowlist(Some(["echo"]));
        assert_eq!(r.method_names(false, false), vec!["echo"]);
        assert_eq!(
            r.call_blocking("startup_only", None),
            Err(RpcError::method_not_found())
        );
        r.set_allowlist(None::<Vec<String>>);
        assert_eq!(r.method_names(false, false).len(), 3);
    }

    #[test]
    fn dropped_responder_and_panic_answer_internal_error() {
        let r = Registry::new();
        r.register_fn("drop", StateMask::BOTH, |_, resp| drop(resp))
            .unwrap();
        r.register_fn("panic", StateMask::BOTH, |_, _resp| panic!("boom"))
            .unwrap();
        let ie = Err(RpcError::internal("Internal error"));
        assert_eq!(r.call_blocking("drop", None), ie);
        assert_eq!(r.call_blocking("panic", None), ie);
    }

    #[test]
    fn wait_for_runtime_queues_until_state_change() {
        let r = Registry::new();
        let (a, rx_a) = Responder::channel();
        r.wait_for_runtime(a);
        assert!(rx_a.try_recv().is_err());
        r.set_state(RpcState::Startup);
        assert!(rx_a.try_recv().is_err());
        r.set_state(RpcState::Runtime);
        assert_eq!(rx_a.try_recv().unwrap(), Ok(Value::Bool(true)));
        let (b, rx_b) = Responder::channel();
        r.wait_for_runtime(b);
        assert_eq!(rx_b.try_recv().unwrap(), Ok(Value::Bool(true)));
    }

    #[test]
    fn respond_with_serialises() {
        let (resp, rx) = Responder::channel();
        resp.respond_with(Ok::<_, RpcError>(vec![1u8, 2]));
        assert_eq!(rx.recv().unwrap(), Ok(json!([1, 2])));
    }

    #[test]
    fn global_registry_is_shared() {
        assert!(std::ptr::eq(registry(), registry()));
    }
}
