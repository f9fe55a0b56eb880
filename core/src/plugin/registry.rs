//! The loaded plugins, and the component slots the config uses from them: which library,
//! which component, with what config text. Built on the main thread, shared read-only with the
//! workers, which create their own instances from the slots.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use abi_stable::std_types::RResult;
use plughost_plugin_api::abi::{Component, ComponentKind, HostBox, WorkerInfo};

use crate::{
    config::{ComponentRef, Config},
    error::PluginError,
    plugin::{loader, Library},
    runtime::calls,
};

/// One component the config uses: where to make instances of it from.
#[derive(Debug, Clone)]
pub struct Slot {
    /// `plugin.component`.
    pub reference: ComponentRef,
    /// Its kind.
    pub kind: ComponentKind,
    /// The RON text of its config.
    pub config: String,
    /// The library that provides it.
    pub library: Arc<Library>,
    /// Its id in the record of calls the supervisor reads after a crash.
    pub call: u32,
}

impl Slot {
    /// Whether an instance made from `self` can serve for `other`: same component of the same
    /// library version with the same config.
    pub fn same_as(&self, other: &Slot) -> bool {
        self.reference == other.reference
            && self.kind == other.kind
            && self.config == other.config
            && Arc::ptr_eq(&self.library, &other.library)
    }

    /// Creates an instance on the calling thread.
    pub fn instantiate(
        &self,
        host: &HostBox,
        worker: WorkerInfo,
    ) -> Result<Component, PluginError> {
        let _inside = calls::enter(self.call);
        let result = (self.library.module.instantiate())(
            self.kind,
            self.reference.component.as_str().into(),
            self.config.as_str().into(),
            host.clone(),
            worker,
        );
        let fail = |reason: String| PluginError::Instantiate {
            plugin: self.reference.plugin.clone(),
            kind: self.kind.as_str(),
            component: self.reference.component.clone(),
            reason,
        };
        match result {
            RResult::ROk(c) if c.kind() == self.kind => Ok(c),
            RResult::ROk(c) => Err(fail(format!("the plugin returned a {} instead", c.kind()))),
            RResult::RErr(e) => Err(fail(e.to_string())),
        }
    }
}

/// Every loaded plugin by name, and the slots of the current config.
#[derive(Debug, Default)]
pub struct Registry {
    /// Loaded libraries by plugin name (the current version of each).
    pub libraries: BTreeMap<String, Arc<Library>>,
}

impl Registry {
    /// Loads every enabled plugin of `config`.
    pub fn load(config: &Config) -> Result<Registry, PluginError> {
        let all = config.enabled_plugins().map(|(n, _)| n.clone()).collect();
        Registry::default().update(config, &all).map(|(r, _)| r)
    }

    /// The registry for `config`: plugins in `force`, new ones and ones whose path changed are
    /// loaded (beside the old versions, which stay mapped); the others are kept. Also returns
    /// the names loaded.
    pub fn update(
        &self,
        config: &Config,
        force: &BTreeSet<String>,
    ) -> Result<(Registry, Vec<String>), PluginError> {
        let mut libraries = BTreeMap::new();
        let mut loaded = Vec::new();
        for (name, p) in config.enabled_plugins() {
            match self.libraries.get(name) {
                Some(lib) if lib.path == p.path && !force.contains(name) => {
                    libraries.insert(name.clone(), lib.clone());
                }
                _ => {
                    let lib = loader::load(
                        name,
                        &p.path,
                        &config.runtime_dir,
                        config.allow_insecure_plugin_files,
                    )?;
                    log::info!(
                        "loaded plugin {name} ({} {}, plugin-api {}) from {}: {}",
                        lib.manifest.name,
                        lib.manifest.version,
                        lib.manifest.api_version,
                        p.path.display(),
                        describe_components(&lib)
                    );
                    libraries.insert(name.clone(), Arc::new(lib));
                    loaded.push(name.clone());
                }
            }
        }
        Ok((Registry { libraries }, loaded))
    }

    /// The slot for `reference` as a `kind`, checked against the plugin's manifest.
    pub fn slot(
        &self,
        config: &Config,
        reference: &ComponentRef,
        kind: ComponentKind,
    ) -> Result<Slot, PluginError> {
        let library =
            self.libraries
                .get(&reference.plugin)
                .ok_or_else(|| PluginError::Manifest {
                    name: reference.plugin.clone(),
                    path: Default::default(),
                    reason: "not loaded".into(),
                })?;
        let provided = library
            .manifest
            .components
            .iter()
            .any(|c| c.kind == kind && c.name.as_str() == reference.component);
        if !provided {
            return Err(PluginError::UnknownComponent {
                plugin: reference.plugin.clone(),
                path: library.path.clone(),
                kind: kind.to_string(),
                component: reference.component.clone(),
                provides: describe_components(library),
            });
        }
        Ok(Slot {
            call: calls::id(&format!("{reference} ({kind})")),
            reference: reference.clone(),
            kind,
            config: config.component_config(reference),
            library: library.clone(),
        })
    }
}

/// `http hello, middleware timing` — for logs and errors.
pub fn describe_components(lib: &Library) -> String {
    let list: Vec<String> = lib
        .manifest
        .components
        .iter()
        .map(|c| format!("{} {}", c.kind, c.name))
        .collect();
    if list.is_empty() {
        "no components".to_owned()
    } else {
        list.join(", ")
    }
}
