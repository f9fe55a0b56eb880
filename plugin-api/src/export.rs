//! The machinery behind [`export_plugin!`](crate::export_plugin): the root module, the
//! logger that forwards a plugin's `log` records to the host, and the panic hook.

use std::sync::OnceLock;

use abi_stable::{
    library::{__call_root_module_loader, CheckTypeLayout, LibHeader, RootModuleResult},
    prefix_type::PrefixTypeTrait,
    std_types::{RResult, RStr},
};

use crate::{
    abi::{
        Component, ComponentKind, HostBox, Manifest, PluginMod, PluginModRef, PluginResult,
        WorkerInfo,
    },
    component::{guard, install_panic_hook, Plugin, PANIC_TARGET},
};

pub use abi_stable::library::LibHeader as Header;

/// The symbol name abi_stable looks up in a library (checked against abi_stable in a test).
pub const ROOT_SYMBOL: &str = "_1as_0lib_1header_0root_bmodule_bloader";

/// Connects the plugin's builder function to the generated root module.
pub trait Entry: 'static {
    /// The plugin, built once.
    fn plugin() -> &'static Plugin;
}

/// The value of the exported static: the library header abi_stable checks when loading.
pub const fn lib_header<E: Entry>() -> LibHeader {
    // SAFETY: `root_loader` returns the erased `PluginModRef` that
    // `__call_root_module_loader` builds from `module::<E>`, as `from_constructor` requires.
    unsafe { LibHeader::from_constructor::<PluginModRef>(root_loader::<E>, CheckTypeLayout::Yes) }
}

extern "C" fn root_loader<E: Entry>() -> RootModuleResult {
    __call_root_module_loader(module::<E>)
}

fn module<E: Entry>() -> PluginModRef {
    install_panic_hook();
    PluginMod {
        manifest: manifest::<E>,
        instantiate: instantiate::<E>,
    }
    .leak_into_prefix()
}

extern "C" fn manifest<E: Entry>() -> PluginResult<Manifest> {
    guard(|| E::plugin().manifest())
}

extern "C" fn instantiate<E: Entry>(
    kind: ComponentKind,
    name: RStr<'_>,
    config: RStr<'_>,
    host: HostBox,
    worker: WorkerInfo,
) -> PluginResult<Component> {
    match guard(|| {
        let plugin = E::plugin();
        install_logger(plugin.name(), &host);
        plugin
    }) {
        RResult::ROk(plugin) => plugin.instantiate(kind, name, config, host, worker),
        RResult::RErr(e) => RResult::RErr(e),
    }
}

/// Forwards the plugin's `log` records to the host, with the plugin's name as the target.
struct Forward {
    host: HostBox,
    target: String,
}

impl log::Log for Forward {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() as u8 <= self.host.max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let message = record.args().to_string();
            // A panic outside a call keeps its target, with the plugin's name, so the host
            // can count it.
            let target = if record.target() == PANIC_TARGET {
                format!("{}::{PANIC_TARGET}", self.target)
            } else {
                self.target.clone()
            };
            self.host.log(
                record.level() as u8,
                target.as_str().into(),
                message.as_str().into(),
            );
        }
    }

    fn flush(&self) {}
}

fn install_logger(plugin: &str, host: &HostBox) {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let forward = Forward {
            host: host.clone(),
            target: plugin.to_owned(),
        };
        // Fails only if the plugin installed a logger of its own; then that one stays.
        if log::set_boxed_logger(Box::new(forward)).is_ok() {
            log::set_max_level(log::LevelFilter::Trace);
        }
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn root_symbol_matches_abi_stable() {
        assert_eq!(
            super::ROOT_SYMBOL,
            abi_stable::library::ROOT_MODULE_LOADER_NAME
        );
    }
}
