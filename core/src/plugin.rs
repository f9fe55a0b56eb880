//! Plugins: loading `.so` files ([`loader`]), the set of loaded plugins and the components
//! the config uses from them ([`registry`]), the host API plugins call ([`host`]) with the
//! deferred responses it keeps ([`deferred`]), and one thread's instances of components
//! ([`bank`]).

pub mod bank;
pub mod context;
pub mod deferred;
pub mod host;
pub mod loader;
pub mod registry;

pub use loader::Library;
pub use registry::{Registry, Slot};
