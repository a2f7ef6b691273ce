//! The `herald` binary: parse the command line and hand over to the library.

// jemalloc rather than the system's malloc (issue 19; figures in bench/notes.md): its
// per-thread caches and arenas take the many small allocations a message makes, and
// frees from the other runtime thread, without glibc's arena locks, and it grows the heap
// without glibc's page-at-a-time `mprotect` of a thread's arena.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = herald::cli::parse();
    match herald::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            #[allow(clippy::print_stderr)] // The one place a fatal error is reported.
            {
                eprintln!("herald: {err:#}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}
