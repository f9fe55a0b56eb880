//! The plugin API of plughost: the stable ABI between the server and its `.so` plugins, and
//! the traits a plugin author implements.
//!
//! A first plugin is a `cdylib` crate:
//!
//! ```toml
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! plughost-plugin-api = "0.6"
//! ```
//!
//! ```
//! use plughost_plugin_api::prelude::*;
//!
//! /// Answers `GET /hello/{name}`; one instance per worker thread, so `&mut self` needs no lock.
//! #[derive(Default)]
//! struct Hello {
//!     served: u64,
//! }
//!
//! impl HttpHandler for Hello {
//!     fn handle(&mut self, req: &Request<'_>, resp: &mut Response) {
//!         self.served += 1;
//!         let name = req.param("name").unwrap_or("world");
//!         resp.text(200, &format!("hello, {name} (#{} on worker {})\n", self.served, req.worker_id));
//!     }
//! }
//!
//! fn plugin() -> Plugin {
//!     Plugin::new("hello", env!("CARGO_PKG_VERSION")).http("hello", |_cx| Ok(Hello::default()))
//! }
//!
//! export_plugin!(plugin);
//! # fn main() {}
//! ```
//!
//! Then enable it in `server.ron` and route to it:
//!
//! ```ron
//! plugins: {
//!     "hello": (path: "target/debug/libhello.so"),
//! },
//! routes: [
//!     (path: "/hello/{name}", handler: "hello.hello"),
//! ],
//! ```
//!
//! Every call into plugin code runs inside `catch_unwind` compiled into the plugin, so a panic
//! costs one request a 500; `export_plugin!` refuses to compile a plugin built with
//! `panic = "abort"`. The plugin's `log` records reach the server's log with the plugin's name
//! as the target.

#![warn(missing_docs, missing_debug_implementations)]

pub mod abi;
pub mod broadcast;
pub mod component;
pub mod deferred;
#[doc(hidden)]
pub mod export;
pub mod fallible;
pub mod http;
pub mod stats;
pub mod table;
pub mod web;

pub use abi::{
    ColumnDesc, ColumnKind, ComponentKind, Handshake, HostError, Message, MessageKind, Propagation,
    Schedule, ThreadKind, Value, ValueRef, WorkerInfo, API_VERSION,
};
pub use broadcast::Broadcast;
pub use component::{
    Cleaner, Context, CronJob, Error, EventListener, Host, HttpHandler, Lifecycle, Middleware,
    Plugin, Process, ProcessContext, SocketHandler, TaskHandler, WebSocketHandler,
};
pub use deferred::{Closed, ResponseHandle};
pub use fallible::{HttpError, TryHttpHandler};
pub use http::{Flow, Header, HttpVersion, Param, Request, Response};
pub use stats::{ServerPhase, ServerStats};
pub use table::{Counter, Fields, Numeric, Row, Table};
pub use web::{Cookie, MultipartError, MultipartLimits, Part, SameSite};

/// Re-exported for hosts and for the code `export_plugin!` generates.
pub use abi_stable;
/// Re-exported so plugins log through the same `log` the forwarder is installed in.
pub use log;

/// Everything a plugin usually needs.
pub mod prelude {
    pub use crate::{
        export_plugin, log, Broadcast, Cleaner, Closed, Context, Cookie, Counter, CronJob, Error,
        EventListener, Fields, Flow, Handshake, Host, HostError, HttpError, HttpHandler, Lifecycle,
        Message, MessageKind, Middleware, Plugin, Process, ProcessContext, Propagation, Request,
        Response, ResponseHandle, Row, SameSite, Schedule, SocketHandler, Table, TaskHandler,
        TryHttpHandler, Value, WebSocketHandler, WorkerInfo,
    };
}

/// Exports a plugin from a `cdylib` crate. Give it a function that returns the [`Plugin`].
///
/// It generates the root module abi_stable checks when the server loads the library, and
/// fails to compile unless the crate is built with `panic = "unwind"`, without which a
/// panic could not be caught before it reached the server.
#[macro_export]
macro_rules! export_plugin {
    ($builder:path) => {
        const _: () = ::core::assert!(
            cfg!(panic = "unwind"),
            "plughost plugins must be built with panic = \"unwind\": a panic must be caught inside the plugin"
        );

        #[doc(hidden)]
        pub struct __PlughostEntry;

        impl $crate::export::Entry for __PlughostEntry {
            fn plugin() -> &'static $crate::Plugin {
                static PLUGIN: ::std::sync::OnceLock<$crate::Plugin> = ::std::sync::OnceLock::new();
                PLUGIN.get_or_init($builder)
            }
        }

        #[doc(hidden)]
        #[export_name = "_1as_0lib_1header_0root_bmodule_bloader"]
        pub static __PLUGHOST_ROOT_MODULE: $crate::export::Header =
            $crate::export::lib_header::<__PlughostEntry>();
    };
}
