//! Loads one plugin library the way abi_stable allows us to: copy the `.so` to a unique path
//! (glibc dedupes by path and inode, and cargo's output is a hard link), then
//! `lib_header_from_path` + `init_root_module`. Never `RootModule::load_from*`, which caches
//! one module per type. Libraries are never unloaded: abi_stable keeps pointers into them.

use std::{
    fs::{DirBuilder, File, OpenOptions},
    io::{Read, Write},
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt},
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

static HELD_COUNT: AtomicU64 = AtomicU64::new(0);
static HELD_BYTES: AtomicU64 = AtomicU64::new(0);

/// Library versions mapped into the process (never unmapped) and their total file size.
pub fn held() -> (u64, u64) {
    (
        HELD_COUNT.load(Ordering::Relaxed),
        HELD_BYTES.load(Ordering::Relaxed),
    )
}

/// Reads `path`, checks it, copies it into `runtime_dir/plugins/` and loads the copy.
///
/// What is checked is what is loaded: the file is read once, its owner and mode are taken
/// from the open file (unless `allow_insecure`), its ELF headers are checked against its
/// length (`dlopen` maps segments a truncated file does not have, and the process dies of
/// SIGBUS), and those same bytes are written to a new copy that no one else can have made.
pub fn load(
    name: &str,
    path: &Path,
    runtime_dir: &Path,
    allow_insecure: bool,
) -> Result<Library, PluginError> {
    let refuse = |reason: String| PluginError::Refused {
        name: name.to_owned(),
        path: path.to_path_buf(),
        reason,
    };
    let bytes = read_plugin_file(path, allow_insecure).map_err(refuse)?;
    check_elf(&bytes).map_err(|why| refuse(format!("not a loadable library: {why}")))?;
    let dir = runtime_dir.join("plugins");
    private_dir(&dir).map_err(refuse)?;
    let copy = dir.join(format!("{name}-{:016x}.so", unpredictable()));
    write_new(&copy, &bytes).map_err(|source| PluginError::Copy {
        name: name.to_owned(),
        path: path.to_path_buf(),
        to: copy.clone(),
        source,
    })?;
    let size = bytes.len() as u64;
    drop(bytes);
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

/// The plugin file's bytes, refused when others than its owner can write it, or when its
/// owner is neither root nor the user the server runs as (unless `allow_insecure`).
fn read_plugin_file(path: &Path, allow_insecure: bool) -> Result<Vec<u8>, String> {
    let mut file = File::open(path).map_err(|e| format!("cannot open it: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot stat it: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let mode = meta.mode() & 0o7777;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if !allow_insecure {
        if mode & 0o022 != 0 {
            return Err(format!(
                "it is writable by {} (mode {mode:04o}), so they could run code in this server; \
                 chmod go-w it, or set allow_insecure_plugin_files: true",
                if mode & 0o002 != 0 {
                    "anyone"
                } else {
                    "its group"
                }
            ));
        }
        if meta.uid() != 0 && meta.uid() != me {
            return Err(format!(
                "it is owned by uid {}, not by root or the server's user (uid {me}); \
                 chown it, or set allow_insecure_plugin_files: true",
                meta.uid()
            ));
        }
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read it: {e}"))?;
    Ok(bytes)
}

/// Checks that `data` is an ELF shared object for this machine whose segments all lie within
/// it.
pub fn check_elf(data: &[u8]) -> Result<(), String> {
    use object::{
        elf::{self, FileHeader64},
        read::elf::{FileHeader, ProgramHeader},
        Endianness,
    };
    let header = FileHeader64::<Endianness>::parse(data)
        .map_err(|e| format!("not a 64-bit ELF file ({e})"))?;
    let endian = header
        .endian()
        .map_err(|e| format!("not a 64-bit ELF file ({e})"))?;
    if header.e_type(endian) != elf::ET_DYN {
        return Err(format!(
            "an ELF file of type {}, not a shared object",
            header.e_type(endian)
        ));
    }
    let machine = header.e_machine(endian);
    let ours = if cfg!(target_arch = "aarch64") {
        elf::EM_AARCH64
    } else {
        elf::EM_X86_64
    };
    if machine != ours {
        return Err(format!(
            "built for another machine (ELF machine {machine}, this one is {ours})"
        ));
    }
    let segments = header
        .program_headers(endian, data)
        .map_err(|e| format!("its program headers are unreadable ({e}); truncated?"))?;
    let len = data.len() as u64;
    for ph in segments {
        let (offset, size) = (ph.p_offset(endian), ph.p_filesz(endian));
        if offset.checked_add(size).is_none_or(|end| end > len) {
            return Err(format!(
                "a segment of {size} bytes at offset {offset} lies past the end of the file \
                 ({len} bytes): it is truncated or corrupt"
            ));
        }
    }
    Ok(())
}

/// Creates `dir` (mode 0700) if needed; refuses it when others can write to it (they could
/// replace a copy between its write and its load).
pub fn private_dir(dir: &Path) -> Result<(), String> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    check_private(dir)
}

/// Refuses a folder that others than its owner can write to.
pub fn check_private(dir: &Path) -> Result<(), String> {
    let meta = std::fs::symlink_metadata(dir)
        .map_err(|e| format!("cannot stat {}: {e}", dir.display()))?;
    let mode = meta.mode() & 0o7777;
    if !meta.is_dir() || mode & 0o022 != 0 {
        return Err(format!(
            "{} must be a folder only its owner can write to (it is {}mode {mode:04o}); chmod 700 it",
            dir.display(),
            if meta.is_dir() { "" } else { "not a folder, " }
        ));
    }
    Ok(())
}

/// Writes `bytes` to a file that must not exist yet (not even as a symlink), mode 0600.
pub fn write_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Waits until `path`'s size and modification time stop changing (a copy still being written
/// is not loaded half-way); false when they still change after `max`.
pub fn wait_until_settled(path: &Path, max: std::time::Duration) -> bool {
    let stat = || {
        std::fs::metadata(path)
            .ok()
            .map(|m| (m.len(), m.modified().ok()))
    };
    let deadline = std::time::Instant::now() + max;
    let mut last = stat();
    loop {
        std::thread::sleep(std::time::Duration::from_millis(50));
        let now = stat();
        if now == last {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        last = now;
    }
}

/// A number no one can guess ahead (std's hasher keys come from the OS's randomness).
fn unpredictable() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(SEQ.fetch_add(1, Ordering::Relaxed));
    h.finish()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("plughost-loader-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_copy_never_follows_a_planted_symlink() {
        let dir = temp_dir("symlink");
        let victim = dir.join("victim");
        std::fs::write(&victim, "keep me").unwrap();
        let planted = dir.join("copy.so");
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        let err = write_new(&planted, b"plugin bytes").unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
        // A fresh name works, and only its owner can read the copy.
        let fresh = dir.join("fresh.so");
        write_new(&fresh, b"plugin bytes").unwrap();
        assert_eq!(std::fs::metadata(&fresh).unwrap().mode() & 0o777, 0o600);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn copy_names_are_not_predictable() {
        assert_ne!(unpredictable(), unpredictable());
    }

    #[test]
    fn a_folder_others_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir("private");
        let sub = dir.join("plugins");
        private_dir(&sub).unwrap();
        assert_eq!(std::fs::metadata(&sub).unwrap().mode() & 0o777, 0o700);
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = private_dir(&sub).unwrap_err();
        assert!(err.contains("mode 0777"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn elf_checks() {
        let me = std::fs::read("/proc/self/exe").unwrap();
        // A test binary is an executable (or PIE: type DYN); either way it parses.
        let _ = check_elf(&me);
        assert!(check_elf(b"not an elf at all")
            .unwrap_err()
            .contains("not a 64-bit ELF"));
    }
}
