//! Loads one plugin library the way abi_stable allows us to: copy the `.so` to a unique path
//! (glibc dedupes by path and inode, and cargo's output is a hard link), then
//! `lib_header_from_path` + `init_root_module`. Never `RootModule::load_from*`, which caches
//! one module per type. Libraries are never unloaded: abi_stable keeps pointers into them.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use abi_stable::library::{lib_header_from_path, LibraryError};
use plughost_plugin_api::abi::{Manifest, PluginModRef, API_VERSION};

use crate::error::PluginError;

/// A loaded (and leaked) plugin library.
pub struct Library {
    /// The plugin's name in the config.
    pub name: String,
    /// The file named in the config.
    pub path: PathBuf,
    /// The copy that was loaded (removed once mapped).
    pub copy: PathBuf,
    /// Size of the copy in bytes.
    pub size: u64,
    /// The root module.
    pub module: PluginModRef,
    /// What the plugin says it provides.
    pub manifest: Manifest,
}

impl std::fmt::Debug for Library {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Library")
            .field("name", &self.name)
            .field("path", &self.path)
            .field("copy", &self.copy)
            .field("manifest", &self.manifest)
            .finish_non_exhaustive()
    }
}

static SEQ: AtomicU64 = AtomicU64::new(0);
static HELD_COUNT: AtomicU64 = AtomicU64::new(0);
static HELD_BYTES: AtomicU64 = AtomicU64::new(0);

/// Library versions mapped into the process (never unmapped) and their total file size.
pub fn held() -> (u64, u64) {
    (
        HELD_COUNT.load(Ordering::Relaxed),
        HELD_BYTES.load(Ordering::Relaxed),
    )
}

/// Copies `path` into `runtime_dir/plugins/` and loads it.
pub fn load(name: &str, path: &Path, runtime_dir: &Path) -> Result<Library, PluginError> {
    let dir = runtime_dir.join("plugins");
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let copy = dir.join(format!("{name}-{}-{seq}.so", std::process::id()));
    let copy_err = |source| PluginError::Copy {
        name: name.to_owned(),
        path: path.to_path_buf(),
        to: copy.clone(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(copy_err)?;
    let size = std::fs::copy(path, &copy).map_err(copy_err)?;
    let load_err = |reason: String| PluginError::Load {
        name: name.to_owned(),
        path: path.to_path_buf(),
        reason,
    };
    let header = lib_header_from_path(&copy);
    // The mapping outlives the file: the copy is only needed for the dlopen.
    let _ = std::fs::remove_file(&copy);
    let header = header.map_err(|e| load_err(describe(&e, None)))?;
    HELD_COUNT.fetch_add(1, Ordering::Relaxed);
    HELD_BYTES.fetch_add(size, Ordering::Relaxed);
    let theirs = header.version_strings().version.to_string();
    let module = header
        .init_root_module::<PluginModRef>()
        .map_err(|e| load_err(describe(&e, Some(&theirs))))?;
    let manifest = match (module.manifest())() {
        abi_stable::std_types::RResult::ROk(m) => m,
        abi_stable::std_types::RResult::RErr(e) => {
            return Err(PluginError::Manifest {
                name: name.to_owned(),
                path: path.to_path_buf(),
                reason: format!("reading its manifest failed: {e}"),
            })
        }
    };
    Ok(Library {
        name: name.to_owned(),
        path: path.to_path_buf(),
        copy,
        size,
        module,
        manifest,
    })
}

/// Boils abi_stable's layout dump (hundreds of lines walking from the root module down) to
/// the type that differs, the fields only one side has, and abi_stable's own error lines.
fn summarize_layout_error(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let first_error = lines
        .iter()
        .position(|l| l.starts_with("Error:"))
        .unwrap_or(lines.len());
    let block = |header: &str| {
        lines[..first_error]
            .iter()
            .rposition(|l| l.starts_with(header))
    };
    let mut out = Vec::new();
    if let (Some(e), Some(f)) = (
        block("Layout of expected type:"),
        block("Layout of found type:"),
    ) {
        let type_name = lines[f..first_error]
            .iter()
            .find_map(|l| l.trim().strip_prefix("type:"))
            .unwrap_or("?");
        out.push(format!("type {type_name} differs"));
        let fields = |block: &[&str]| -> Vec<String> {
            block
                .iter()
                .filter_map(|l| l.trim().strip_prefix("field_name:"))
                .map(str::to_owned)
                .collect()
        };
        let (ours, theirs) = (fields(&lines[e..f]), fields(&lines[f..first_error]));
        let only = |a: &[String], b: &[String]| -> Vec<String> {
            a.iter().filter(|x| !b.contains(x)).cloned().collect()
        };
        let (plugin_only, server_only) = (only(&theirs, &ours), only(&ours, &theirs));
        if !plugin_only.is_empty() {
            out.push(format!(
                "fields only in the plugin: {}",
                plugin_only.join(", ")
            ));
        }
        if !server_only.is_empty() {
            out.push(format!(
                "fields only in the server: {}",
                server_only.join(", ")
            ));
        }
    }
    out.extend(
        lines[first_error..]
            .split(|l| l.trim().is_empty())
            .filter(|chunk| !chunk.is_empty())
            .take(4)
            .map(|chunk| chunk.iter().map(|l| l.trim()).collect::<Vec<_>>().join(" ")),
    );
    out.join("; ")
}

/// The useful part of abi_stable's error: its layout dumps run to hundreds of lines, so keep
/// the head and the tail, and say which plugin-api each side was built with.
fn describe(e: &LibraryError, plugin_api: Option<&str>) -> String {
    let versions = match plugin_api {
        Some(theirs) => {
            format!(" (server plugin-api {API_VERSION}, plugin built with plugin-api {theirs})")
        }
        None => String::new(),
    };
    match e {
        LibraryError::OpenError { err, .. } => {
            format!("not a loadable library: {err}")
        }
        LibraryError::GetSymbolError { .. } => {
            "not a plughost plugin: it exports no abi_stable root module (did the crate call export_plugin!?)".to_owned()
        }
        LibraryError::IncompatibleVersionNumber { .. } => format!(
            "incompatible plugin-api version{versions}; rebuild the plugin against plugin-api {API_VERSION}"
        ),
        LibraryError::AbiInstability(_) => format!(
            "incompatible plugin ABI{versions}; rebuild the plugin against this server's plugin-api. abi_stable says: {}",
            summarize_layout_error(&e.to_string())
        ),
        other => format!("{other}{versions}"),
    }
}
