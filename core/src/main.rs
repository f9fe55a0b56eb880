//! The `plughost` command.

#[cfg(feature = "alloc-stats")]
#[global_allocator]
static ALLOC: plughost::alloc::Counting = plughost::alloc::Counting;

fn main() {
    std::process::exit(plughost::cli::main());
}
