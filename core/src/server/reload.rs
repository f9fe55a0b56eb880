//! Hot reload: a changed plugin, a changed `server.ron`, or `plughost reload` (SIGUSR1) is
//! prepared on the main thread (load the new library beside the old one, build the new plan,
//! and create a probe instance of everything that will be new), and only then handed to the
//! workers, which swap between two requests. Anything that fails leaves the old version
//! serving.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::{atomic::Ordering, mpsc, Arc},
    time::{Duration, Instant},
};

use plughost_plugin_api::abi::{ThreadKind, WorkerInfo};

use super::{
    sockets::SocketFile,
    state::State,
    watcher::{watch_key, Watcher},
    worker::Control,
    Workers,
};
use crate::{
    config::{log_level, Config, Loaded},
    jobs::Services,
    plan::{Plan, SocketPlan},
    plugin::{host::Host, loader, Registry, Slot},
};

/// What a reload was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// `plughost reload` / SIGUSR1: re-read the config, reload every plugin.
    All,
    /// These plugins' files changed.
    Plugins(BTreeSet<String>),
    /// The config file changed.
    Config,
}

impl Trigger {
    /// For the log.
    pub fn describe(&self) -> String {
        match self {
            Trigger::All => "reloading every plugin".into(),
            Trigger::Config => "the config changed".into(),
            Trigger::Plugins(names) => format!(
                "plugin file of {} changed",
                names.iter().cloned().collect::<Vec<_>>().join(", ")
            ),
        }
    }
}

/// A reload ready for the workers.
#[derive(Debug)]
pub struct Prepared {
    /// The config now in force (with keys that need a restart kept as they were).
    pub config: Config,
    /// The loaded plugins.
    pub registry: Arc<Registry>,
    /// The new plan.
    pub plan: Arc<Plan>,
    /// Plugins whose library was (re)loaded.
    pub loaded: Vec<String>,
}

/// Keys that only a restart can change: keep the running values and say so.
fn keep_restart_only(old: &Config, new: &mut Config) {
    let mut kept = Vec::new();
    if new.listen != old.listen {
        kept.push(format!("listen ({} stays)", old.listen));
        new.listen = old.listen.clone();
    }
    if new.worker_num != old.worker_num {
        kept.push(format!("worker_num ({} stays)", old.worker_num));
        new.worker_num = old.worker_num;
    }
    if new.task_worker_num != old.task_worker_num {
        kept.push(format!("task_worker_num ({} stays)", old.task_worker_num));
        new.task_worker_num = old.task_worker_num;
    }
    if new.task_queue_size != old.task_queue_size {
        kept.push(format!("task_queue_size ({} stays)", old.task_queue_size));
        new.task_queue_size = old.task_queue_size;
    }
    if new.runtime_dir != old.runtime_dir {
        kept.push(format!("runtime_dir ({} stays)", old.runtime_dir.display()));
        new.runtime_dir = old.runtime_dir.clone();
    }
    if new.log.file != old.log.file {
        kept.push("log.file".to_owned());
        new.log.file = old.log.file.clone();
    }
    if new.env_file != old.env_file {
        kept.push("env_file".to_owned());
        new.env_file = old.env_file.clone();
    }
    let tables = crate::table::changes(&old.tables, &new.tables);
    if !tables.is_empty() {
        // The tables hold live data in memory allocated at start: the running ones stay.
        log::warn!(
            "config: refusing to change {}: a table's definition changes only with `plughost restart`; the running tables and their rows stay",
            tables.join(", ")
        );
        new.tables = old.tables.clone();
    }
    if !kept.is_empty() {
        log::warn!(
            "config: changing {} needs `plughost restart`; the running values stay until then",
            kept.join(", ")
        );
    }
}

/// Prepares a reload. `new_config` is the freshly read config when the trigger read one.
pub fn prepare(
    old_config: &Config,
    old_registry: &Registry,
    old_plan: &Plan,
    new_config: Option<Config>,
    trigger: &Trigger,
    host: &Host,
) -> Result<Prepared, String> {
    let mut config = new_config.unwrap_or_else(|| old_config.clone());
    keep_restart_only(old_config, &mut config);
    let force: BTreeSet<String> = match trigger {
        Trigger::All => config.enabled_plugins().map(|(n, _)| n.clone()).collect(),
        Trigger::Plugins(names) => names.clone(),
        Trigger::Config => BTreeSet::new(),
    };
    let (registry, loaded) = old_registry
        .update(&config, &force)
        .map_err(|e| e.to_string())?;
    let plan = Plan::build(&config, &registry).map_err(|e| e.to_string())?;
    probe(old_plan, &plan, host)?;
    if config.log.level != old_config.log.level {
        if let Some(level) = log_level(&config.log.level) {
            log::set_max_level(level);
            log::info!("log level is now {}", config.log.level);
        }
    }
    Ok(Prepared {
        config,
        registry: Arc::new(registry),
        plan: Arc::new(plan),
        loaded,
    })
}

/// Creates (and drops) one instance of every slot the workers will have to create, on this
/// thread, so a factory that fails or panics is caught before any worker swaps.
fn probe(old: &Plan, new: &Plan, host: &Host) -> Result<(), String> {
    let info = WorkerInfo {
        kind: ThreadKind::Main,
        id: 0,
    };
    let boxed = host.boxed();
    let pairs: [(&[Slot], &[Slot]); 6] = [
        (&old.handlers, &new.handlers),
        (&old.middleware, &new.middleware),
        (&old.cleaners, &new.cleaners),
        (&old.hooks, &new.hooks),
        (&old.websocket, &new.websocket),
        (&old.socket_handlers, &new.socket_handlers),
    ];
    for (old_slots, new_slots) in pairs {
        for slot in new_slots {
            if !old_slots.iter().any(|o| o.same_as(slot)) {
                slot.instantiate(&boxed, info).map_err(|e| e.to_string())?;
            }
        }
    }
    // Task handlers, listeners, cron jobs and custom processes.
    for slot in new.services.all_slots() {
        if !old.services.all_slots().any(|o| o.same_as(slot)) {
            slot.instantiate(&boxed, info).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// What is in force now, and how to change it.
pub(crate) struct Live {
    config: Config,
    config_path: PathBuf,
    registry: Arc<Registry>,
    plan: Arc<Plan>,
    host: Host,
    watcher: Option<Watcher>,
    /// The running jobs.
    pub services: Services,
    /// The unix socket files of `sockets`, by socket key: removed when their socket is.
    pub socket_files: Vec<(String, SocketFile)>,
    /// Builds of a plugin that changed beside its configured path, said once each.
    strays: BTreeSet<PathBuf>,
}

impl Live {
    /// What `run` started with.
    pub fn new(
        loaded: &Loaded,
        registry: Arc<Registry>,
        plan: Arc<Plan>,
        host: Host,
        services: Services,
    ) -> Live {
        Live {
            config: loaded.config.clone(),
            config_path: loaded.path.clone(),
            registry,
            plan,
            host,
            watcher: None,
            services,
            socket_files: Vec::new(),
            strays: BTreeSet::new(),
        }
    }

    /// Starts the inotify watcher when `reload.inotify` is on; changes arrive on `tx`.
    pub fn start_watcher<E: Send + 'static>(
        &mut self,
        tx: mpsc::Sender<E>,
        wrap: fn(PathBuf) -> E,
    ) {
        if !self.config.reload.inotify {
            return;
        }
        match Watcher::start(tx, wrap) {
            Ok(w) => {
                self.watcher = Some(w);
                self.watch_all();
                log::info!(
                    "hot reload: watching the plugin files and {} (debounce {} ms)",
                    self.config_path.display(),
                    self.config.reload.debounce_ms
                );
            }
            Err(e) => log::error!("hot reload: cannot start the inotify watcher: {e}"),
        }
    }

    /// How long file changes must be quiet before a reload.
    pub fn debounce(&self) -> Duration {
        Duration::from_millis(self.config.reload.debounce_ms)
    }

    /// `max_wait_time`.
    pub fn max_wait(&self) -> Duration {
        Duration::from_secs(self.config.max_wait_time)
    }

    /// Watches the folders of the config, the enabled plugins and `reload.watch`.
    fn watch_all(&mut self) {
        let Some(w) = self.watcher.as_mut() else {
            return;
        };
        let mut dirs: Vec<PathBuf> = Vec::new();
        dirs.extend(self.config_path.parent().map(PathBuf::from));
        for (_, p) in self.config.enabled_plugins() {
            dirs.extend(p.path.parent().map(PathBuf::from));
            // A debug build beside a configured release path (or the other way round) is
            // noticed, to be named (see `trigger_for`).
            dirs.extend(other_profile(&p.path).filter(|d| d.is_dir()));
        }
        for extra in &self.config.reload.watch {
            if extra.is_dir() {
                dirs.push(extra.clone());
            } else {
                dirs.extend(extra.parent().map(PathBuf::from));
            }
        }
        for dir in dirs {
            if let Err(e) = w.watch(&dir) {
                log::warn!("hot reload: cannot watch {}: {e}", dir.display());
            }
        }
    }

    /// What a set of changed files means, if anything.
    pub fn trigger_for(&mut self, changed: &BTreeSet<PathBuf>) -> Option<Trigger> {
        self.name_strays(changed);
        let config_key = watch_key(&self.config_path);
        if changed.iter().any(|p| Some(p) == config_key.as_ref()) {
            return Some(Trigger::Config);
        }
        for extra in &self.config.reload.watch {
            let hit = match extra.canonicalize() {
                Ok(dir) if dir.is_dir() => changed.iter().any(|p| p.starts_with(&dir)),
                _ => watch_key(extra).is_some_and(|k| changed.contains(&k)),
            };
            if hit {
                return Some(Trigger::All);
            }
        }
        let plugins: BTreeSet<String> = self
            .config
            .enabled_plugins()
            .filter(|(_, p)| watch_key(&p.path).is_some_and(|k| changed.contains(&k)))
            .map(|(n, _)| n.clone())
            .collect();
        (!plugins.is_empty()).then_some(Trigger::Plugins(plugins))
    }

    /// Says once per path when a plugin's file changed in the other profile's folder than
    /// the one its config names: a `cargo build` while the config names the release build
    /// (or the other way round) reloads nothing, and should not do so silently.
    fn name_strays(&mut self, changed: &BTreeSet<PathBuf>) {
        for (name, p) in self.config.enabled_plugins() {
            let Some(other) = other_profile(&p.path).and_then(|d| d.canonicalize().ok()) else {
                continue;
            };
            let stray = other.join(p.path.file_name().unwrap_or_default());
            if changed.contains(&stray) && self.strays.insert(stray.clone()) {
                log::warn!(
                    "{} changed, but plugin {name} is configured as {}: nothing reloads (build that profile, or point the config at this file)",
                    stray.display(),
                    p.path.display()
                );
            }
        }
    }

    /// Prepares the reload on this thread, then has every worker swap.
    pub fn apply(&mut self, trigger: &Trigger, workers: &Workers, state: &State) {
        let started = Instant::now();
        let fail = |why: String| {
            state.stats.reload_failures.fetch_add(1, Ordering::Relaxed);
            state.set_last_reload(format!("refused: {why}"));
            log::error!("reload refused, the running version keeps serving: {why}");
        };
        if let Trigger::Plugins(names) = trigger {
            for (name, p) in self.config.enabled_plugins() {
                if names.contains(name)
                    && !loader::wait_until_settled(&p.path, Duration::from_secs(5))
                {
                    log::warn!(
                        "{} is still changing after 5 s; loading it anyway",
                        p.path.display()
                    );
                }
            }
        }
        let new_config = match trigger {
            Trigger::Plugins(_) => None,
            _ => match Config::load(&self.config_path, None) {
                Ok(l) => Some(l.config),
                Err(e) if *trigger == Trigger::Config => {
                    return fail(format!("{e}; keeping the running config"));
                }
                Err(e) => {
                    log::error!("{e}; keeping the running config");
                    None
                }
            },
        };
        // `host.env` answers the file as it is now, on every thread, new instances included.
        if let Some(n) = self.host.reread_env() {
            log::debug!("env file re-read: {n} values");
        }
        let prepared = match prepare(
            &self.config,
            &self.registry,
            &self.plan,
            new_config,
            trigger,
            &self.host,
        ) {
            Ok(p) => p,
            Err(why) => return fail(why),
        };
        // Sockets the reload adds are bound first: one that cannot be refuses the reload.
        let old_plan = self.plan.clone();
        let added = |s: &SocketPlan| old_plan.socket(&s.key).is_none();
        let (listeners, files) =
            match super::sockets::bind(&prepared.plan, added, (workers.len(), false), &self.host) {
                Ok(bound) => bound,
                Err(e) => return fail(format!("{e}; the running sockets stay")),
            };
        let failures = swap_workers(workers, &prepared.plan, self.config.max_wait_time);
        self.swap_sockets(&prepared.plan, workers, listeners, files);
        self.config = prepared.config;
        self.registry = prepared.registry;
        self.plan = prepared.plan;
        self.services.reload(&self.plan);
        if let Ok(mut r) = state.registry.write() {
            *r = self.registry.clone();
        }
        self.watch_all();
        report(&prepared.loaded, workers.len(), &failures, started, state);
    }
}

impl Live {
    /// After the workers moved to `plan`: hands them the sockets it added, and forgets the
    /// files and UDP senders of the sockets it removed (each worker stopped their loops).
    fn swap_sockets(
        &mut self,
        plan: &Plan,
        workers: &Workers,
        listeners: super::sockets::PerWorker,
        files: Vec<(String, SocketFile)>,
    ) {
        for ((tx, _), mine) in workers.iter().zip(listeners) {
            if !mine.is_empty() {
                let _ = tx.try_send(Control::Sockets(mine));
            }
        }
        for s in &self.plan.sockets {
            if plan.socket(&s.key).is_none() {
                self.host.sockets().udp.remove(&s.key);
                log::info!("socket {} removed", s.key);
            }
        }
        self.socket_files
            .retain(|(key, _)| plan.socket(key).is_some());
        self.socket_files.extend(files);
    }
}

/// Logs how a reload went and records it for `info`.
fn report(loaded: &[String], n: usize, failures: &[String], started: Instant, state: &State) {
    let (held, bytes) = loader::held();
    let what = if loaded.is_empty() {
        "config".to_owned()
    } else {
        format!("plugin {}", loaded.join(", "))
    };
    let summary = format!(
        "reloaded {what} on {}/{n} workers in {} ms",
        n - failures.len(),
        started.elapsed().as_millis()
    );
    // `info` says how it went before the log does, so whoever reads the log line and then
    // asks `info` sees the same reload.
    if failures.is_empty() {
        state.stats.reloads.fetch_add(1, Ordering::Relaxed);
        state.set_last_reload(format!("ok: {summary}"));
        log::info!(
            "{summary}; library versions held: {held} ({} kB)",
            bytes / 1024
        );
    } else {
        // The workers that failed keep serving their old instances.
        state.stats.reload_failures.fetch_add(1, Ordering::Relaxed);
        let why = failures.join("; ");
        state.set_last_reload(format!("failed: {summary}; {why}"));
        log::error!(
            "reload failed on {}/{n} workers: {summary}; {why}",
            failures.len()
        );
    }
}

/// Has every worker move to `plan` between two requests; returns each failure ("worker 1
/// kept its old instances: ...").
fn swap_workers(workers: &Workers, plan: &Arc<Plan>, max_wait_time: u64) -> Vec<String> {
    let (reply_tx, replies) = mpsc::channel();
    for (tx, _) in workers {
        let _ = tx.try_send(Control::Reload(plan.clone(), reply_tx.clone()));
    }
    drop(reply_tx);
    let mut failures = Vec::new();
    let mut answered = 0;
    let deadline = Instant::now() + Duration::from_secs(max_wait_time + 30);
    for _ in workers {
        let left = deadline.saturating_duration_since(Instant::now());
        match replies.recv_timeout(left) {
            Ok((_, Ok(_))) => answered += 1,
            Ok((id, Err(e))) => {
                answered += 1;
                failures.push(format!("worker {id} kept its old instances: {e}"));
            }
            Err(_) => break,
        }
    }
    if answered < workers.len() {
        failures.push(format!(
            "{} worker(s) did not answer within {}s (stuck in a plugin call?)",
            workers.len() - answered,
            max_wait_time + 30
        ));
    }
    failures
}

/// For a plugin at `.../target/release/libx.so`, `.../target/debug` (and the other way
/// round).
fn other_profile(path: &Path) -> Option<PathBuf> {
    let dir = path.parent()?;
    let other = match dir.file_name()?.to_str()? {
        "release" => "debug",
        "debug" => "release",
        _ => return None,
    };
    Some(dir.with_file_name(other))
}
