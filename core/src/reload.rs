//! Hot reload: a changed plugin, a changed `server.ron`, or `plughost reload` (SIGUSR1) is
//! prepared on the main thread (load the new library beside the old one, build the new plan,
//! and create a probe instance of everything that will be new), and only then handed to the
//! workers, which swap between two requests. Anything that fails leaves the old version
//! serving.

pub mod watcher;

use std::{collections::BTreeSet, sync::Arc};

use plughost_plugin_api::abi::{ThreadKind, WorkerInfo};

use crate::{
    config::{log_level, Config},
    host::Host,
    pipeline::Plan,
    plugin::{Registry, Slot},
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
    let pairs: [(&[Slot], &[Slot]); 4] = [
        (&old.handlers, &new.handlers),
        (&old.middleware, &new.middleware),
        (&old.cleaners, &new.cleaners),
        (&old.hooks, &new.hooks),
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
