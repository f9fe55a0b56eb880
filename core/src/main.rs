//! The `plughost` command.

#[cfg(feature = "alloc-stats")]
#[global_allocator]
static ALLOC: plughost::runtime::alloc::Counting = plughost::runtime::alloc::Counting;

fn main() {
    std::process::exit(plughost::cli::main());
}
