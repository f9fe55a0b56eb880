//! Plugins: loading `.so` files ([`loader`]) and the set of loaded plugins and the
//! components the config uses from them ([`registry`]).

pub mod loader;
pub mod registry;

pub use loader::Library;
pub use registry::{Registry, Slot};
