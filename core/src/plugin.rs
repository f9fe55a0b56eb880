//! Plugins: loading `.so` files ([`loader`]), the set of loaded plugins and the components
//! the config uses from them ([`registry`]), the host API plugins call ([`host`]), and one
//! thread's instances of components ([`bank`]).

pub mod bank;
pub mod host;
pub mod loader;
pub mod registry;

pub use loader::Library;
pub use registry::{Registry, Slot};
