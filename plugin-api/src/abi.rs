//! The FFI side of the plugin boundary: the root module, the component trait objects and the
//! host handle. Plugin authors do not use this module directly; `export_plugin!` and the
//! traits in [`crate::component`] build on it. The host (plughost's core) uses it to load
//! plugins.

// sabi_trait generates impls inside consts, and trait-object types without Debug.
#![allow(non_local_definitions, missing_debug_implementations)]

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings,
    sabi_trait,
    sabi_types::VersionStrings,
    std_types::{RArc, RBox, ROption, RResult, RStr, RString, RVec},
    StableAbi,
};

use crate::http::{Flow, Request, Response};

/// The kinds of component a plugin can provide.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ComponentKind {
    /// Answers requests on the routes that name it.
    HttpHandler,
    /// Sees every request before the handler and every response after it.
    Middleware,
    /// Runs after every request on its worker, to reset per-request state.
    Cleaner,
    /// Server start/stop and worker start/stop/error hooks.
    Lifecycle,
}

impl ComponentKind {
    /// The name used in manifests, logs and `server.ron`.
    pub fn as_str(self) -> &'static str {
        match self {
            ComponentKind::HttpHandler => "http",
            ComponentKind::Middleware => "middleware",
            ComponentKind::Cleaner => "cleaner",
            ComponentKind::Lifecycle => "lifecycle",
        }
    }
}

impl std::fmt::Display for ComponentKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One component a plugin provides: its kind and its name inside the plugin.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct ComponentDesc {
    /// The kind.
    pub kind: ComponentKind,
    /// The name, unique per kind inside the plugin.
    pub name: RString,
}

/// What a plugin says about itself.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct Manifest {
    /// The plugin's name.
    pub name: RString,
    /// The plugin's own version.
    pub version: RString,
    /// The plugin-api version the plugin was built against.
    pub api_version: RString,
    /// The components it provides.
    pub components: RVec<ComponentDesc>,
}

/// An error crossing the boundary from plugin code.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub enum PluginError {
    /// Plugin code panicked; the message and location.
    Panic(RString),
    /// A factory or hook returned an error.
    Failed(RString),
    /// `instantiate` was asked for a component the plugin does not provide.
    UnknownComponent(RString),
}

impl std::fmt::Display for PluginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PluginError::Panic(m) => write!(f, "panicked: {m}"),
            PluginError::Failed(m) => write!(f, "{m}"),
            PluginError::UnknownComponent(m) => write!(f, "no such component: {m}"),
        }
    }
}

impl std::error::Error for PluginError {}

/// The result of every call into plugin code.
pub type PluginResult<T> = RResult<T, PluginError>;

/// The kind of thread an instance lives on.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread (server start/stop hooks).
    Main,
    /// An HTTP worker.
    Worker,
}

impl ThreadKind {
    /// Lower-case name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Worker => "worker",
        }
    }
}

/// Which thread a hook runs on.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerInfo {
    /// The thread's kind.
    pub kind: ThreadKind,
    /// Its id among threads of that kind.
    pub id: u32,
}

/// HTTP handler, as a trait object.
#[sabi_trait]
pub trait HttpHandlerFfi {
    /// Fill `resp` for `req`.
    #[sabi(last_prefix_field)]
    fn handle(&mut self, req: &Request<'_>, resp: &mut Response) -> PluginResult<()>;
}

/// Middleware, as a trait object.
#[sabi_trait]
pub trait MiddlewareFfi {
    /// Before the handler; `Flow::Respond` answers with `resp` at once.
    fn on_request(&mut self, req: &Request<'_>, resp: &mut Response) -> PluginResult<Flow>;
    /// After the response is generated.
    #[sabi(last_prefix_field)]
    fn on_response(&mut self, req: &Request<'_>, resp: &mut Response) -> PluginResult<()>;
}

/// Cleaner, as a trait object.
#[sabi_trait]
pub trait CleanerFfi {
    /// After every request on its worker.
    #[sabi(last_prefix_field)]
    fn clean(&mut self) -> PluginResult<()>;
}

/// Lifecycle hooks, as a trait object.
#[sabi_trait]
pub trait LifecycleFfi {
    /// Once, on the main thread, when the server has started.
    fn on_server_start(&mut self) -> PluginResult<()>;
    /// Once, on the main thread, when the server stops.
    fn on_server_stop(&mut self) -> PluginResult<()>;
    /// On each worker when its instances are created.
    fn on_worker_start(&mut self, worker: WorkerInfo) -> PluginResult<()>;
    /// On each worker before its instances are dropped.
    fn on_worker_stop(&mut self, worker: WorkerInfo) -> PluginResult<()>;
    /// On a worker after plugin code on it failed.
    #[sabi(last_prefix_field)]
    fn on_worker_error(&mut self, worker: WorkerInfo, error: RStr<'_>) -> PluginResult<()>;
}

/// A boxed HTTP handler instance.
pub type HttpHandlerBox = HttpHandlerFfi_TO<'static, RBox<()>>;
/// A boxed middleware instance.
pub type MiddlewareBox = MiddlewareFfi_TO<'static, RBox<()>>;
/// A boxed cleaner instance.
pub type CleanerBox = CleanerFfi_TO<'static, RBox<()>>;
/// A boxed lifecycle instance.
pub type LifecycleBox = LifecycleFfi_TO<'static, RBox<()>>;

/// One live instance of a component. Instances stay on the thread that created them.
#[repr(u8)]
#[derive(StableAbi)]
pub enum Component {
    /// An HTTP handler.
    HttpHandler(HttpHandlerBox),
    /// A middleware.
    Middleware(MiddlewareBox),
    /// A cleaner.
    Cleaner(CleanerBox),
    /// Lifecycle hooks.
    Lifecycle(LifecycleBox),
}

impl std::fmt::Debug for Component {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Component({})", self.kind())
    }
}

impl Component {
    /// The kind of this instance.
    pub fn kind(&self) -> ComponentKind {
        match self {
            Component::HttpHandler(_) => ComponentKind::HttpHandler,
            Component::Middleware(_) => ComponentKind::Middleware,
            Component::Cleaner(_) => ComponentKind::Cleaner,
            Component::Lifecycle(_) => ComponentKind::Lifecycle,
        }
    }
}

/// Log levels as they cross the boundary (the `log` crate's numbering: 1 = error .. 5 = trace).
pub type LogLevel = u8;

/// What the host offers plugin code. Callable from any thread.
#[sabi_trait]
pub trait HostFfi: Clone + Send + Sync + 'static {
    /// Writes a log record through the host's logger.
    fn log(&self, level: LogLevel, target: RStr<'_>, message: RStr<'_>);
    /// The most verbose level the host logs now (0 = off).
    fn max_level(&self) -> LogLevel;
    /// The `-x` version string given to `plughost start`, empty when none.
    fn app_version(&self) -> RString;
    /// An environment value: the process environment first, then the env file the host read.
    #[sabi(last_prefix_field)]
    fn env(&self, key: RStr<'_>) -> ROption<RString>;
}

/// The host handle as it crosses the boundary.
pub type HostBox = HostFfi_TO<RArc<()>>;

/// The root module every plugin exports.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
#[sabi(missing_field(panic))]
pub struct PluginMod {
    /// The plugin's manifest.
    pub manifest: extern "C" fn() -> PluginResult<Manifest>,
    /// Creates one instance of a component, on the calling thread.
    #[sabi(last_prefix_field)]
    pub instantiate: extern "C" fn(
        kind: ComponentKind,
        name: RStr<'_>,
        config: RStr<'_>,
        host: HostBox,
        worker: WorkerInfo,
    ) -> PluginResult<Component>,
}

impl RootModule for PluginModRef {
    declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "plughost_plugin";
    const NAME: &'static str = "plughost plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

/// The plugin-api version this crate is (and so the one a host or plugin was built with).
pub const API_VERSION: &str = env!("CARGO_PKG_VERSION");
